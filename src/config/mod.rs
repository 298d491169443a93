//! Typed, layered settings (the README, "Configuration").
//!
//! Why one file over 600 lines: every key's struct field and its
//! validation are read side by side when a key is added; the defaults are
//! `config/default.toml`, the tests are in `config/tests.rs`.
//!
//! Layers, later wins: built-in defaults → TOML file → environment variables
//! `CRM_EDM_SYNC__SECTION__KEY`. Unknown keys and bad values are errors that
//! name the key. Secrets are [`SecretString`]s from the moment they are read
//! and are never printed by `Debug`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use crate::domain::{ListId, VAR_COUNT};
pub use reseller::{ResellerSettings, TopUp};
pub use tenants::{
    DEFAULT_TENANT, RefusedTenant, Tenant, TenantSet, TenantsSettings, scoped_database_url,
};
pub use values::{BaseUrl, CronSchedule, Zone};

/// The environment-variable prefix (`CRM_EDM_SYNC__EDM__PASSWORD`).
pub const ENV_PREFIX: &str = "CRM_EDM_SYNC";
/// The system-wide config file used when `--config` is not given.
pub const SYSTEM_CONFIG: &str = "/etc/crm-edm-sync/config.toml";
/// The fallback config file, relative to the working directory.
pub const LOCAL_CONFIG: &str = "config/default.toml";

/// Everything the daemon can be told.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The 全程云 CRM WebApi.
    pub crm: CrmSettings,
    /// The bestedm user API.
    pub edm: EdmSettings,
    /// The state database.
    pub database: DatabaseSettings,
    /// The contacts job.
    pub sync: SyncSettings,
    /// The write-back job.
    pub writeback: WritebackSettings,
    /// The drift report.
    pub reconcile: ReconcileSettings,
    /// Logging.
    pub log: LogSettings,
    /// The ops HTTP endpoint (daemon mode).
    pub http: HttpSettings,
    /// Daemon behaviour: shutdown drain, instance lock.
    pub daemon: DaemonSettings,
    /// Where the tenant files are (`tenants.dir`).
    pub tenants: TenantsSettings,
    /// The bestedm reseller account (optional).
    pub reseller: ResellerSettings,
    /// Which tenant these settings are: `default` without `tenants.dir`;
    /// with it, set by [`Settings::tenant_set`].
    #[serde(skip)]
    pub tenant: Tenant,
    /// Every key as the layers gave it, for telling what a reload changed.
    #[serde(skip)]
    pub layers: Layers,
}

/// The defaults, file and environment stacked into one TOML table (secrets
/// included, so it never prints).
#[derive(Clone, Default)]
pub struct Layers(toml::Table);

impl std::fmt::Debug for Layers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Layers(..)")
    }
}

impl Layers {
    /// Sets the dotted `key` to its value in `from` (or removes it when
    /// `from` has none).
    pub fn copy_key(&mut self, from: &Layers, key: &str) {
        let path: Vec<&str> = key.split('.').collect();
        let Some((last, parents)) = path.split_last() else {
            return;
        };
        let mut source = Some(&from.0);
        for part in parents {
            source = source.and_then(|t| t.get(*part)).and_then(|v| v.as_table());
        }
        let value = source.and_then(|t| t.get(*last)).cloned();
        let mut target = &mut self.0;
        for part in parents {
            let entry = target
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(inner) = entry.as_table_mut() else {
                return;
            };
            target = inner;
        }
        match value {
            Some(v) => target.insert(last.to_string(), v),
            None => target.remove(*last),
        };
    }

    /// Every key (`edm.batch_size`, `sync.routes`) with its value as TOML
    /// text; a list is one key.
    pub fn flat(&self) -> std::collections::BTreeMap<String, String> {
        fn walk(
            prefix: &str,
            table: &toml::Table,
            out: &mut std::collections::BTreeMap<String, String>,
        ) {
            for (key, value) in table {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                match value {
                    toml::Value::Table(inner) => walk(&path, inner, out),
                    other => {
                        out.insert(path, other.to_string());
                    }
                }
            }
        }
        let mut out = std::collections::BTreeMap::new();
        walk("", &self.0, &mut out);
        out
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSettings {
    /// After SIGTERM/SIGINT, how long a running job may take to finish its
    /// current batch and record its state before the process exits anyway
    /// (`shutdown_timeout_secs`).
    #[serde(rename = "shutdown_timeout_secs", deserialize_with = "values::seconds")]
    pub shutdown_timeout: Duration,
    /// How long `--once` waits, when another instance holds the state
    /// database, for the lock or for a daemon to take its request
    /// (`lock_wait_secs`).
    #[serde(rename = "lock_wait_secs", deserialize_with = "values::seconds")]
    pub lock_wait: Duration,
    /// How often a standby daemon tries to take over, and an active one
    /// checks that it still holds the lock (`lock_poll_secs`).
    #[serde(rename = "lock_poll_secs", deserialize_with = "values::seconds")]
    pub lock_poll: Duration,
    /// This instance's name in the lease row, logs and `User-Agent`
    /// (`crm-edm-sync/VERSION (ID)`); empty: `HOST-PID`.
    pub instance_id: String,
    /// Jobs running at once in this instance, over all tenants, 1..=256.
    pub max_parallel_jobs: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrmSettings {
    /// Site root; `/WebApi/Handler/1.0/CRM/...` is appended.
    pub base_url: BaseUrl,
    /// The logged-in user's access token.
    pub token: SecretString,
    /// A file holding the token instead (a systemd credential, a mounted
    /// secret); never together with `token`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Customers per `GetAllList` page, 1..=100.
    pub page_size: u32,
    /// `GetLinkManList` requests in flight, ≥ 1.
    pub concurrency: usize,
    /// Per-request timeout (`timeout_secs`).
    #[serde(rename = "timeout_secs", deserialize_with = "values::seconds")]
    pub timeout: Duration,
    /// Retries of a transient failure before giving up.
    pub max_retries: u32,
    /// Runs in which the CRM may refuse a contact-history record before it
    /// is parked (no longer sent until `--retry-parked`), ≥ 1.
    pub max_attempts: u32,
    /// Requests started per second at most (all CRM calls); none if unset.
    #[serde(default)]
    pub max_requests_per_sec: Option<u32>,
    /// Guard against a CRM whose paging never ends.
    pub max_pages: u32,
    /// Which keys inside CRM objects hold what.
    pub fields: CrmFields,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrmFields {
    pub customer_id: String,
    pub customer_name: String,
    pub linkman_id: String,
    pub linkman_name: String,
    pub linkman_email: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdmSettings {
    /// e.g. `http://www.bestedm.org/mm-ms/api`.
    pub base_url: BaseUrl,
    pub username: String,
    /// Plain password; sent as its lowercase hex MD5.
    pub password: SecretString,
    /// A file holding the password instead; never together with `password`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Addresses per `ml-addr-add` / `ml-unsub` call.
    pub batch_size: usize,
    /// Addresses per `ml-addr-list` page when a list is read (not in the
    /// contract; the API's default of 50 would make large reads slow).
    pub list_page_size: u32,
    /// Per-request timeout (`timeout_secs`).
    #[serde(rename = "timeout_secs", deserialize_with = "values::seconds")]
    pub timeout: Duration,
    pub max_retries: u32,
    /// Runs in which EDM may refuse an operation (its line isolated from
    /// its batch) before it is parked (no longer sent until its content
    /// changes or `--retry-parked`), ≥ 1.
    pub max_attempts: u32,
    /// EDM requests in flight at once.
    pub concurrency: usize,
    /// The service's IANA zone: the dates sent to EDM (`task-list` `date`)
    /// are days in it. `Asia/Shanghai` by default, EDM's own zone.
    pub timezone: Zone,
    /// Requests started per second at most; none if unset.
    #[serde(default)]
    pub max_requests_per_sec: Option<u32>,
    /// How the credentials travel: `query` (as the documents say:
    /// `username` and the password's MD5 in the query string) or `basic`
    /// (HTTP Basic auth with the plain password, as the public clients call
    /// the scripts under `/mm-ms/apinew/`).
    pub auth: EdmAuth,
}

/// How EDM requests carry the credentials (`edm.auth`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EdmAuth {
    /// `username=…&password=MD5` in the query string.
    Query,
    /// `Authorization: Basic base64(username:password)`; no credential in
    /// the query.
    Basic,
}

impl EdmAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            EdmAuth::Query => "query",
            EdmAuth::Basic => "basic",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite://state.db?mode=rwc` or `postgres://user:pass@host/db`.
    pub url: SecretString,
    /// Done operations, finished runs and export lines older than this
    /// many days are pruned at the end of each run, ≥ 1.
    pub retention_days: u32,
    /// Consent-trail entries older than this many days are pruned at the
    /// end of each run; 0 keeps them for ever.
    pub audit_retention_days: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSettings {
    /// Six-field cron (seconds first), in `sync.timezone`.
    pub schedule: CronSchedule,
    /// The IANA zone both schedules (`sync.schedule`,
    /// `writeback.schedule`) are read in; `UTC` by default, so existing
    /// configurations keep their meaning.
    pub timezone: Zone,
    /// The default EDM list.
    pub list_id: ListId,
    /// Planned unsubscribes ÷ members per list above which a plan is refused.
    pub max_unsubscribe_ratio: f64,
    /// First match wins; else `list_id`.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// EDM `var1`…`var10` from CRM fields.
    #[serde(default)]
    pub vars: VarMapping,
}

/// Sends a link-man to `list_id` when the text form of `field` equals `equals`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// `customer.X` reads the owning customer, plain `X` the link-man.
    pub field: String,
    pub equals: String,
    pub list_id: ListId,
}

/// `[sync.vars]`: which CRM field fills which EDM variable.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VarMapping {
    pub var1: Option<String>,
    pub var2: Option<String>,
    pub var3: Option<String>,
    pub var4: Option<String>,
    pub var5: Option<String>,
    pub var6: Option<String>,
    pub var7: Option<String>,
    pub var8: Option<String>,
    pub var9: Option<String>,
    pub var10: Option<String>,
}

impl VarMapping {
    /// The ten slots in order.
    pub fn slots(&self) -> [Option<&str>; VAR_COUNT] {
        [
            self.var1.as_deref(),
            self.var2.as_deref(),
            self.var3.as_deref(),
            self.var4.as_deref(),
            self.var5.as_deref(),
            self.var6.as_deref(),
            self.var7.as_deref(),
            self.var8.as_deref(),
            self.var9.as_deref(),
            self.var10.as_deref(),
        ]
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WritebackSettings {
    pub schedule: CronSchedule,
    pub lookback_days: u32,
    /// ContactHistory contact category.
    pub type_id: i64,
    /// ContactHistory contact route (3 = email).
    pub route_id: i64,
    /// Title and content of each kind of record.
    pub templates: Templates,
}

/// `[reconcile]`: the drift report (`crm-edm-sync reconcile`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileSettings {
    /// When the daemon runs it (`""`: never; by hand only).
    #[serde(deserialize_with = "values::optional_schedule")]
    pub schedule: Option<CronSchedule>,
}

/// `[writeback.templates]`: title and content of the ContactHistory record
/// of each kind. `{name}` placeholders are filled in; see
/// [`crate::template::PLACEHOLDERS`].
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Templates {
    pub open_title: String,
    pub open_content: String,
    pub click_title: String,
    pub click_content: String,
    pub bounce_title: String,
    pub bounce_content: String,
    pub unsubscribe_title: String,
    pub unsubscribe_content: String,
}

impl Templates {
    fn all(&self) -> [(&'static str, &str); 8] {
        [
            ("open_title", &self.open_title),
            ("open_content", &self.open_content),
            ("click_title", &self.click_title),
            ("click_content", &self.click_content),
            ("bounce_title", &self.bounce_title),
            ("bounce_content", &self.bounce_content),
            ("unsubscribe_title", &self.unsubscribe_title),
            ("unsubscribe_content", &self.unsubscribe_content),
        ]
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG` overrides.
    pub level: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: SocketAddr,
}

/// The built-in defaults, the lowest layer: `config/default.toml`, the one
/// place every key's default is written. The credentials have no
/// meaningful default; they are empty and `validate` rejects them.
const DEFAULTS: &str = include_str!("../../config/default.toml");

/// A settings error; its text always names the offending key or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} not found")]
    Missing { path: PathBuf },
    #[error("{0}")]
    Load(String),
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    /// No `--config` and none of the usual files: what the settings lack
    /// is most likely the file itself.
    #[error(
        "no config file found (tried {tried}; give one with --config FILE); without one, {inner}"
    )]
    NoFile {
        tried: String,
        inner: Box<ConfigError>,
    },
}

/// What the command will reach, and so which settings it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The CRM and EDM APIs: their URLs and credentials must be set.
    Remote,
    /// The state database (and the local ops endpoint) only: `status`,
    /// `health`, `explain` without `--live`. Credentials may be absent.
    StateOnly,
}

impl Settings {
    /// Loads the layers for `explicit` (the `--config` flag), reading the
    /// process environment; `access` says whether the API credentials are
    /// needed.
    pub fn load(explicit: Option<&Path>, access: Access) -> Result<Settings, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(explicit, env, access)
    }

    /// As [`Settings::load`], with the environment given (for tests).
    pub fn load_with_env(
        explicit: Option<&Path>,
        env: Vec<(String, String)>,
        access: Access,
    ) -> Result<Settings, ConfigError> {
        let file = config_file(explicit)?;
        let parsed = match &file {
            Some(path) => Some(check_syntax(path)?),
            None => None,
        };
        let shown = file.as_ref().map(|p| p.display().to_string());
        let env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        let layers = parsed
            .as_ref()
            .zip(shown.as_deref())
            .map(|((table, text), shown)| (table, text.as_str(), shown));
        let (mut settings, origins) = assemble(layers, env)?;
        let checked = settings
            .read_secret_files()
            .and_then(|()| settings.validate_for(access))
            .map_err(|e| e.with_origin(&origins, shown.as_deref()));
        match (checked, &file) {
            (Ok(()), _) => Ok(settings),
            (Err(e), Some(_)) => Err(e),
            (Err(e), None) => Err(ConfigError::NoFile {
                tried: format!("{SYSTEM_CONFIG}, {LOCAL_CONFIG}"),
                inner: Box::new(e),
            }),
        }
    }

    /// Parses settings from TOML text alone (defaults below it, no
    /// environment), all keys needed. Used by tests and the demo.
    pub fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e| ConfigError::Load(format!("settings are not TOML: {e}")))?;
        let (mut settings, _) = assemble(Some((&table, text, "(given text)")), Vec::new())?;
        settings.read_secret_files()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Replaces a `*_file` secret by the file's content; both a value and
    /// a file for one secret is an error.
    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        use secrecy::ExposeSecret;
        let pairs = [
            ("crm.token", &self.crm.token_file, &mut self.crm.token),
            (
                "edm.password",
                &self.edm.password_file,
                &mut self.edm.password,
            ),
        ];
        for (key, file, secret) in pairs {
            let Some(path) = file else { continue };
            if !secret.expose_secret().is_empty() {
                return Err(ConfigError::Invalid {
                    key: format!("{key}_file"),
                    reason: format!("set either `{key}` or `{key}_file`, not both"),
                });
            }
            *secret = secret_files::read(&format!("{key}_file"), path)?;
        }
        self.reseller.read_secret_file()
    }

    /// Every check, the API credentials included.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_for(Access::Remote)
    }

    /// The checks a command with `access` needs.
    pub fn validate_for(&self, access: Access) -> Result<(), ConfigError> {
        // With tenant files, the credentials are each tenant's (checked
        // by `tenant_set`): the main config needs none.
        if access == Access::Remote && self.tenants.dir.is_none() {
            self.validate_remote_access()?;
        }
        self.reseller.validate()?;
        self.validate_crm()?;
        self.validate_edm()?;
        self.validate_state_and_daemon()?;
        self.validate_sync()?;
        self.validate_writeback()
    }

    /// The APIs' addresses and credentials (not needed by `status`,
    /// `health`, `explain` without `--live`).
    fn validate_remote_access(&self) -> Result<(), ConfigError> {
        use secrecy::ExposeSecret;
        if !self.crm.base_url.is_set() {
            return bad("crm.base_url", "must be set");
        }
        if self.crm.token.expose_secret().trim().is_empty() {
            return bad("crm.token", "must be set (or crm.token_file)");
        }
        if self.edm.username.trim().is_empty() {
            return bad("edm.username", "must be set");
        }
        if self.edm.password.expose_secret().is_empty() {
            return bad("edm.password", "must be set (or edm.password_file)");
        }
        Ok(())
    }

    fn validate_crm(&self) -> Result<(), ConfigError> {
        let crm = &self.crm;
        in_range("crm.page_size", crm.page_size, 1, 100)?;
        in_range("crm.concurrency", crm.concurrency, 1, 256)?;
        at_least_one("crm.timeout_secs", crm.timeout.as_secs())?;
        at_least_one("crm.max_attempts", crm.max_attempts)?;
        at_least_one("crm.max_pages", crm.max_pages)?;
        if crm.max_requests_per_sec == Some(0) {
            return bad("crm.max_requests_per_sec", "must be at least 1 (or unset)");
        }
        let fields = &crm.fields;
        for (key, value) in [
            ("crm.fields.customer_id", &fields.customer_id),
            ("crm.fields.customer_name", &fields.customer_name),
            ("crm.fields.linkman_id", &fields.linkman_id),
            ("crm.fields.linkman_name", &fields.linkman_name),
            ("crm.fields.linkman_email", &fields.linkman_email),
        ] {
            if value.trim().is_empty() {
                return bad(key, "must not be empty");
            }
        }
        Ok(())
    }

    fn validate_edm(&self) -> Result<(), ConfigError> {
        let edm = &self.edm;
        if !edm.base_url.is_set() {
            return bad("edm.base_url", "must be set");
        }
        at_least_one("edm.max_attempts", edm.max_attempts)?;
        in_range("edm.batch_size", edm.batch_size, 1, 10_000)?;
        in_range("edm.list_page_size", edm.list_page_size, 1, 10_000)?;
        in_range("edm.concurrency", edm.concurrency, 1, 64)?;
        at_least_one("edm.timeout_secs", edm.timeout.as_secs())?;
        if edm.max_requests_per_sec == Some(0) {
            return bad("edm.max_requests_per_sec", "must be at least 1 (or unset)");
        }
        Ok(())
    }

    fn validate_state_and_daemon(&self) -> Result<(), ConfigError> {
        use secrecy::ExposeSecret;
        at_least_one("database.retention_days", self.database.retention_days)?;
        let db = self.database.url.expose_secret();
        if !(db.starts_with("sqlite:")
            || db.starts_with("postgres://")
            || db.starts_with("postgresql://"))
        {
            return bad(
                "database.url",
                "must start with sqlite:, postgres:// or postgresql://",
            );
        }
        let id = &self.daemon.instance_id;
        if id.len() > 64
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c))
        {
            return bad(
                "daemon.instance_id",
                "must be at most 64 letters, digits and - _ . : @ (it travels in every request's User-Agent header)",
            );
        }
        in_range(
            "daemon.lock_poll_secs",
            self.daemon.lock_poll.as_secs(),
            1,
            3600,
        )?;
        in_range(
            "daemon.max_parallel_jobs",
            self.daemon.max_parallel_jobs,
            1,
            256,
        )?;
        in_range(
            "daemon.shutdown_timeout_secs",
            self.daemon.shutdown_timeout.as_secs(),
            0,
            3600,
        )?;
        if !valid_log_filter(&self.log.level) {
            return bad("log.level", "is not a valid level or filter directive");
        }
        Ok(())
    }

    fn validate_sync(&self) -> Result<(), ConfigError> {
        let sync = &self.sync;
        if sync.list_id.0 < 1 {
            return bad("sync.list_id", "must be a list id ≥ 1");
        }
        if !(0.0..=1.0).contains(&sync.max_unsubscribe_ratio) {
            return bad("sync.max_unsubscribe_ratio", "must be between 0 and 1");
        }
        for (i, route) in sync.routes.iter().enumerate() {
            if route.list_id.0 < 1 {
                return bad(
                    &format!("sync.routes[{i}].list_id"),
                    "must be a list id ≥ 1",
                );
            }
            check_field_ref(&format!("sync.routes[{i}].field"), &route.field)?;
        }
        for (i, slot) in sync.vars.slots().iter().enumerate() {
            if let Some(field) = slot {
                check_field_ref(&format!("sync.vars.var{}", i + 1), field)?;
            }
        }
        Ok(())
    }

    fn validate_writeback(&self) -> Result<(), ConfigError> {
        let writeback = &self.writeback;
        in_range("writeback.lookback_days", writeback.lookback_days, 1, 366)?;
        for (key, template) in writeback.templates.all() {
            if template.trim().is_empty() {
                return bad(&format!("writeback.templates.{key}"), "must not be empty");
            }
            if let Some(unknown) = crate::template::unknown_placeholder(template) {
                return Err(ConfigError::Invalid {
                    key: format!("writeback.templates.{key}"),
                    reason: format!(
                        "unknown placeholder {{{unknown}}}; known: {}",
                        crate::template::PLACEHOLDERS.join(", ")
                    ),
                });
            }
        }
        Ok(())
    }

    /// The keys whose value is still a placeholder of the shipped example
    /// (`set-me…`, a host under `example.com`): the daemon would run
    /// against nothing real. Checked by `check`.
    pub fn placeholders(&self) -> Vec<&'static str> {
        use secrecy::ExposeSecret;
        let set_me = |v: &str| v.trim().to_ascii_lowercase().starts_with("set-me");
        let example_host = |url: &str| {
            let host = url
                .split("://")
                .nth(1)
                .unwrap_or(url)
                .split(['/', ':', '?'])
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
            host == "example.com" || host.ends_with(".example.com")
        };
        let mut keys = Vec::new();
        if example_host(self.crm.base_url.as_str()) {
            keys.push("crm.base_url");
        }
        if set_me(self.crm.token.expose_secret()) {
            keys.push("crm.token");
        }
        if example_host(self.edm.base_url.as_str()) {
            keys.push("edm.base_url");
        }
        if set_me(&self.edm.username) {
            keys.push("edm.username");
        }
        if set_me(self.edm.password.expose_secret()) {
            keys.push("edm.password");
        }
        keys
    }

    /// Every EDM list the contacts job syncs: the default list and each
    /// route's, ascending, without repeats.
    pub fn synced_lists(&self) -> Vec<ListId> {
        let mut lists: Vec<ListId> = std::iter::once(self.sync.list_id)
            .chain(self.sync.routes.iter().map(|r| r.list_id))
            .collect();
        lists.sort_unstable();
        lists.dedup();
        lists
    }
}

/// `info`, or directives such as `warn,crm_edm_sync=debug`: every level
/// named must be one tracing knows.
/// The layers — built-in defaults, the file (its parsed table, its text
/// as read once, its name as shown), the `CRM_EDM_SYNC__…` variables —
/// checked strictly, then built by the `config` crate into settings (not
/// yet validated). Returns which variable set which key too.
fn assemble(
    file: Option<(&toml::Table, &str, &str)>,
    env: Vec<(String, String)>,
) -> Result<(Settings, strict::EnvOrigins), ConfigError> {
    let (origins, table) =
        strict::check_layers(DEFAULTS, file.map(|(table, _, shown)| (table, shown)), &env)?;
    let mut builder = config::Config::builder()
        .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
    if let Some((_, text, _)) = file {
        builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
    }
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            // No `try_parsing`: it would turn a token such as "0123" into
            // the number 123. Numeric keys parse from text anyway (the
            // strict pass has checked they are numbers).
            .source(Some(env.into_iter().collect())),
    );
    let where_ = file
        .map(|(_, _, shown)| format!(" (file {shown})"))
        .unwrap_or_default();
    let raw = builder
        .build()
        .map_err(|e| ConfigError::Load(format!("cannot read settings{where_}: {e}")))?;
    let mut settings: Settings = raw
        .try_deserialize()
        .map_err(|e| ConfigError::Load(format!("bad settings{where_}: {e}")))?;
    settings.layers = Layers(table);
    Ok((settings, origins))
}

fn bad(key: &str, reason: &str) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.to_string(),
    })
}

fn at_least_one<N: Into<u64>>(key: &str, value: N) -> Result<(), ConfigError> {
    if value.into() == 0 {
        return bad(key, "must be at least 1");
    }
    Ok(())
}

fn in_range<N: TryInto<u64>>(key: &str, value: N, low: u64, high: u64) -> Result<(), ConfigError> {
    match value.try_into() {
        Ok(v) if (low..=high).contains(&v) => Ok(()),
        _ if low == 0 => bad(key, &format!("must be at most {high}")),
        _ => bad(key, &format!("must be between {low} and {high}")),
    }
}

/// Where the file was, if `--config` named one: none of the usual places
/// is an error only for an explicit path that does not exist.
fn config_file(explicit: Option<&Path>) -> Result<Option<PathBuf>, ConfigError> {
    match explicit {
        Some(path)
            if std::fs::metadata(path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) =>
        {
            Err(ConfigError::Missing {
                path: path.to_path_buf(),
            })
        }
        Some(path) => Ok(Some(path.to_path_buf())),
        None => Ok([SYSTEM_CONFIG, LOCAL_CONFIG]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())),
    }
}

impl ConfigError {
    /// Adds where the offending value came from (an environment variable
    /// by name, or the file) to an error about one key.
    fn with_origin(self, origins: &strict::EnvOrigins, file: Option<&str>) -> ConfigError {
        match self {
            ConfigError::Invalid { key, reason } => ConfigError::Invalid {
                reason: format!("{reason}{}", strict::origin_of(&key, origins, file)),
                key,
            },
            other => other,
        }
    }
}

fn valid_log_filter(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    !filter.trim().is_empty()
        && filter.split(',').all(|directive| {
            let level = directive.rsplit('=').next().unwrap_or_default().trim();
            let target_ok = match directive.split_once('=') {
                Some((target, _)) => {
                    !target.trim().is_empty()
                        && target
                            .trim()
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_:-".contains(c))
                }
                None => true,
            };
            target_ok && LEVELS.contains(&level.to_ascii_lowercase().as_str())
        })
        && tracing_subscriber::EnvFilter::try_new(filter).is_ok()
}

fn check_field_ref(key: &str, value: &str) -> Result<(), ConfigError> {
    let name = value.strip_prefix("customer.").unwrap_or(value);
    if name.trim().is_empty() || name.contains(char::is_whitespace) {
        return Err(ConfigError::Invalid {
            key: key.into(),
            reason: format!("{value:?} is not a field name (use \"X\" or \"customer.X\")"),
        });
    }
    Ok(())
}

impl Settings {
    /// The zone the schedules are read in (`sync.timezone`).
    pub fn schedule_zone(&self) -> chrono_tz::Tz {
        self.sync.timezone.0
    }

    /// EDM's zone (`edm.timezone`): the days of its dates.
    pub fn edm_zone(&self) -> chrono_tz::Tz {
        self.edm.timezone.0
    }
}

/// Reads the config file and checks it is TOML, describing what is wrong
/// by file, line, column and key, never by its text: the parser's own
/// errors quote the offending line, which may hold a secret (a
/// `password = "…` missing its closing quote, a duplicated `token`).
fn check_syntax(path: &Path) -> Result<(toml::Table, String), ConfigError> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| {
        ConfigError::Load(match e.kind() {
            std::io::ErrorKind::IsADirectory => format!("config file {shown} is a directory"),
            std::io::ErrorKind::PermissionDenied => {
                format!("config file {shown}: permission denied")
            }
            kind => format!("cannot read config file {shown}: {kind}"),
        })
    })?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        ConfigError::Load(format!(
            "config file {shown} is not UTF-8 text (byte {} is not)",
            e.valid_up_to()
        ))
    })?;
    let e = match toml::from_str::<toml::Table>(text) {
        Ok(table) => return Ok((table, text.to_string())),
        Err(e) => e,
    };
    let at = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
    let line = text[..at].matches('\n').count() + 1;
    let column = text[..at].rsplit('\n').next().unwrap_or("").chars().count() + 1;
    let key = key_at_line(text, line)
        .map(|k| format!(" (key `{k}`)"))
        .unwrap_or_default();
    Err(ConfigError::Load(format!(
        "config file {shown} is not valid TOML at line {line}, column {column}{key}: {}",
        scrub(e.message(), text.lines().nth(line - 1).unwrap_or(""))
    )))
}

/// The dotted key the `line`-th line (from 1) sets, with the section it
/// is in (`edm.password`); `None` for a line that sets none.
fn key_at_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let own = lines.get(line.checked_sub(1)?)?;
    let (key, _) = own.split_once('=')?;
    let key = key.trim().trim_matches('"');
    let safe = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    };
    if !safe(key) {
        return None;
    }
    let section = lines[..line - 1]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
        .filter(|s| safe(s));
    Some(match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_string(),
    })
}

/// The parser's message without any word of the offending line's value.
fn scrub(message: &str, line: &str) -> String {
    let value = line.split_once('=').map(|(_, v)| v).unwrap_or(line);
    let mut out = message.to_string();
    for word in value
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() >= 3)
    {
        out = out.replace(word, "…");
    }
    out.lines().next().unwrap_or("").trim().to_string()
}

mod reseller;
mod secret_files;
mod strict;
mod tenants;
mod values;

#[cfg(test)]
mod tests;
