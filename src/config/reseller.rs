//! `[reseller]`: the bestedm reseller account, which reads (and may top
//! up) the sending service of every tenant's EDM account. Every key is
//! optional; without `username` the daemon makes no reseller call.

use std::path::PathBuf;

use secrecy::SecretString;
use serde::Deserialize;

use super::{BaseUrl, ConfigError, bad};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResellerSettings {
    /// The reseller account's name; unset: no reseller calls.
    #[serde(default)]
    pub username: Option<String>,
    /// Its plain password (sent as its MD5, like `edm.password`).
    #[serde(default)]
    pub password: Option<SecretString>,
    /// A file holding the password instead; never together with
    /// `password`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Where `service.php` is served; unset: `edm.base_url`.
    #[serde(default)]
    pub base_url: Option<BaseUrl>,
    /// Top up a tenant whose `qty_available` is below this…
    #[serde(default)]
    pub top_up_below: Option<u64>,
    /// …by this many sends…
    #[serde(default)]
    pub top_up_count: Option<u64>,
    /// …at most this many times a calendar day (in `edm.timezone`).
    #[serde(default)]
    pub top_up_max_per_day: Option<u32>,
}

/// The top-up rule, when all three keys are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopUp {
    pub below: u64,
    pub count: u64,
    pub max_per_day: u32,
}

impl ResellerSettings {
    /// Whether a reseller account is configured.
    pub fn enabled(&self) -> bool {
        self.username
            .as_deref()
            .is_some_and(|u| !u.trim().is_empty())
    }

    /// The top-up rule, if one is set (validated: all three keys or none).
    pub fn top_up(&self) -> Option<TopUp> {
        Some(TopUp {
            below: self.top_up_below?,
            count: self.top_up_count?,
            max_per_day: self.top_up_max_per_day?,
        })
    }

    /// Reads `password_file` into `password`; both is an error.
    pub(super) fn read_secret_file(&mut self) -> Result<(), ConfigError> {
        let Some(path) = &self.password_file else {
            return Ok(());
        };
        if self.password.is_some() {
            return bad(
                "reseller.password_file",
                "set either `reseller.password` or `reseller.password_file`, not both",
            );
        }
        self.password = Some(super::secret_files::read("reseller.password_file", path)?);
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        use secrecy::ExposeSecret;
        let has_password = self
            .password
            .as_ref()
            .is_some_and(|p| !p.expose_secret().is_empty());
        if self.enabled() && !has_password {
            return bad(
                "reseller.password",
                "must be set (or reseller.password_file) when reseller.username is",
            );
        }
        if !self.enabled() && (has_password || self.base_url.is_some()) {
            return bad(
                "reseller.username",
                "must be set when other reseller keys are",
            );
        }
        let set = [
            self.top_up_below.is_some(),
            self.top_up_count.is_some(),
            self.top_up_max_per_day.is_some(),
        ];
        if set.iter().any(|s| *s) && !set.iter().all(|s| *s) {
            let missing = ["top_up_below", "top_up_count", "top_up_max_per_day"]
                .iter()
                .zip(set)
                .find(|(_, s)| !s)
                .map(|(k, _)| *k)
                .unwrap_or_default();
            return bad(
                &format!("reseller.{missing}"),
                "reseller.top_up_below, top_up_count and top_up_max_per_day go together: set all three or none",
            );
        }
        if let Some(rule) = self.top_up() {
            if !self.enabled() {
                return bad(
                    "reseller.username",
                    "must be set for a top-up (reseller.top_up_*)",
                );
            }
            if rule.count == 0 {
                return bad("reseller.top_up_count", "must be at least 1");
            }
            if rule.max_per_day == 0 {
                return bad("reseller.top_up_max_per_day", "must be at least 1");
            }
        }
        Ok(())
    }
}

impl super::Settings {
    /// The `[edm]` settings of the reseller client of this tenant: the
    /// reseller's account, `reseller.base_url` (else the tenant's
    /// `edm.base_url`), credentials in the query as the documents say, and
    /// the tenant's timeouts and limits. `None` without a reseller account.
    pub fn reseller_edm(&self) -> Option<super::EdmSettings> {
        let reseller = &self.reseller;
        if !reseller.enabled() {
            return None;
        }
        let mut edm = self.edm.clone();
        edm.username = reseller.username.clone().unwrap_or_default();
        edm.password = reseller.password.clone()?;
        edm.password_file = None;
        if let Some(url) = &reseller.base_url {
            edm.base_url = url.clone();
        }
        edm.auth = super::EdmAuth::Query;
        Some(edm)
    }
}
