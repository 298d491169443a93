//! The typed values of settings that arrive as text or whole seconds: a
//! time zone, a cron schedule, an API's base URL, a duration. Each is
//! parsed once, when the settings are read (an error names the key), so
//! that no user of the settings parses again or falls back on a default.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// An IANA time zone (`sync.timezone`, `edm.timezone`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Zone(pub chrono_tz::Tz);

impl<'de> Deserialize<'de> for Zone {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.trim().parse::<chrono_tz::Tz>().map(Zone).map_err(|_| {
            serde::de::Error::custom(format!(
                "{text:?} is not an IANA time zone name (e.g. UTC, Asia/Shanghai)"
            ))
        })
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name())
    }
}

/// A six-field (seconds first) or seven-field (with year) cron expression
/// (`sync.schedule`, `writeback.schedule`), checked with the same `croner`
/// settings tokio-cron-scheduler uses, so that a schedule read here is one
/// the scheduler accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronSchedule(String);

impl CronSchedule {
    /// `text` as a schedule, or why it is not one.
    pub fn parse(text: &str) -> Result<CronSchedule, String> {
        let fields = text.split_whitespace().count();
        if !(6..=7).contains(&fields) {
            return Err(format!(
                "{text:?} has {fields} fields; six (seconds first) or seven are needed"
            ));
        }
        croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .dom_and_dow(true)
            .build()
            .parse(text)
            .map_err(|e| format!("{text:?} is not a valid cron expression: {e}"))?;
        Ok(CronSchedule(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for CronSchedule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, CronSchedule::parse)
    }
}

impl fmt::Display for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An API's base URL (`crm.base_url`, `edm.base_url`): an `http://` or
/// `https://` URL without its trailing `/`, or unset (empty: commands that
/// reach only the state database need none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BaseUrl(String);

impl BaseUrl {
    /// `text` as a base URL (empty: unset), or why it is not one.
    pub fn parse(text: &str) -> Result<BaseUrl, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(BaseUrl::default());
        }
        match url::Url::parse(text) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {
                Ok(BaseUrl(text.trim_end_matches('/').to_string()))
            }
            Ok(_) => Err("must be an http:// or https:// URL".to_string()),
            Err(e) => Err(format!("not a URL: {e}")),
        }
    }

    pub fn is_set(&self) -> bool {
        !self.0.is_empty()
    }

    /// The URL, no trailing `/`; empty when unset.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for BaseUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, BaseUrl::parse)
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A value read from text by `parse`, its error as the key's error.
fn from_text<'de, D: Deserializer<'de>, T>(
    deserializer: D,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse(&text).map_err(serde::de::Error::custom)
}

/// A schedule that may be turned off (`reconcile.schedule`): `""` is
/// `None`, anything else must be a [`CronSchedule`].
pub(super) fn optional_schedule<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<CronSchedule>, D::Error> {
    from_text(deserializer, |text| {
        if text.trim().is_empty() {
            Ok(None)
        } else {
            CronSchedule::parse(text).map(Some)
        }
    })
}

/// A `*_secs` key: whole seconds, read as a [`Duration`].
pub(super) fn seconds<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    u64::deserialize(deserializer).map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zone_is_an_iana_name() {
        let zone: Zone = toml::Value::from("Asia/Shanghai").try_into().unwrap();
        assert_eq!(zone, Zone(chrono_tz::Asia::Shanghai));
        let bad: Result<Zone, _> = toml::Value::from("Mars/Base").try_into();
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("not an IANA time zone name")
        );
    }

    #[test]
    fn a_schedule_has_six_or_seven_fields_and_parses_as_cron() {
        assert!(CronSchedule::parse("0 */15 * * * *").is_ok());
        assert!(CronSchedule::parse("0 0 9 * * Mon 2027").is_ok());
        assert!(
            CronSchedule::parse("*/15 * * * *")
                .unwrap_err()
                .contains("5 fields")
        );
        assert!(
            CronSchedule::parse("0 0 25 * * *")
                .unwrap_err()
                .contains("not a valid cron expression")
        );
    }

    #[test]
    fn a_base_url_is_http_or_https_without_its_trailing_slash_or_unset() {
        assert_eq!(
            BaseUrl::parse("https://crm.acme.cn/").unwrap().as_str(),
            "https://crm.acme.cn"
        );
        assert!(!BaseUrl::parse("").unwrap().is_set());
        assert!(BaseUrl::parse("ftp://x").unwrap_err().contains("http://"));
        assert!(
            BaseUrl::parse("crm.acme.cn")
                .unwrap_err()
                .contains("not a URL")
        );
    }
}
