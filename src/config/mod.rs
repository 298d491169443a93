//! Typed, layered settings (DESIGN.md "Configuration — contract").
//!
//! Why one file over 600 lines: every key's struct field, its built-in
//! default (the `DEFAULTS` text) and its validation are read side by side
//! when a key is added; the tests are in `config/tests.rs`.
//!
//! Layers, later wins: built-in defaults → TOML file → environment variables
//! `CRM_EDM_SYNC__SECTION__KEY`. Unknown keys and bad values are errors that
//! name the key. Secrets are [`SecretString`]s from the moment they are read
//! and are never printed by `Debug`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

use crate::domain::{ListId, VAR_COUNT};

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
    /// Logging.
    pub log: LogSettings,
    /// The ops HTTP endpoint (daemon mode).
    pub http: HttpSettings,
    /// Daemon behaviour: shutdown drain, instance lock.
    pub daemon: DaemonSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSettings {
    /// After SIGTERM/SIGINT, how long a running job may take to finish its
    /// current batch and record its state before the process exits anyway.
    pub shutdown_timeout_secs: u64,
    /// How long `--once` waits for another instance to release the state
    /// database before it gives up.
    pub lock_wait_secs: u64,
    /// How often a standby daemon tries to take over, and an active one
    /// checks that it still holds the lock.
    pub lock_poll_secs: u64,
    /// This instance's name in the lease row, logs and `User-Agent`
    /// (`crm-edm-sync/VERSION (ID)`); empty: `HOST-PID`.
    pub instance_id: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrmSettings {
    /// Site root; `/WebApi/Handler/1.0/CRM/...` is appended.
    pub base_url: String,
    /// The logged-in user's access token.
    pub token: SecretString,
    /// Customers per `GetAllList` page, 1..=100.
    pub page_size: u32,
    /// `GetLinkManList` requests in flight, ≥ 1.
    pub concurrency: usize,
    /// Per-request timeout.
    pub timeout_secs: u64,
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
    pub base_url: String,
    pub username: String,
    /// Plain password; sent as its lowercase hex MD5.
    pub password: SecretString,
    /// Addresses per `ml-addr-add` / `ml-unsub` call.
    pub batch_size: usize,
    /// Addresses per `ml-addr-list` page when a list is read (not in the
    /// contract; the API's default of 50 would make large reads slow).
    pub list_page_size: u32,
    pub timeout_secs: u64,
    pub max_retries: u32,
    /// Runs in which EDM may refuse an operation (its line isolated from
    /// its batch) before it is parked (no longer sent until its content
    /// changes or `--retry-parked`), ≥ 1.
    pub max_attempts: u32,
    /// EDM requests in flight at once.
    pub concurrency: usize,
    /// The service's IANA zone: the dates sent to EDM (`task-list` `date`)
    /// are days in it. `Asia/Shanghai` by default, EDM's own zone.
    pub timezone: String,
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSettings {
    /// Six-field cron (seconds first), in `sync.timezone`.
    pub schedule: String,
    /// The IANA zone both schedules (`sync.schedule`,
    /// `writeback.schedule`) are read in; `UTC` by default, so existing
    /// configurations keep their meaning.
    pub timezone: String,
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
    pub schedule: String,
    pub lookback_days: u32,
    /// ContactHistory contact category.
    pub type_id: i64,
    /// ContactHistory contact route (3 = email).
    pub route_id: i64,
    /// Title and content of each kind of record.
    pub templates: Templates,
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

/// The built-in defaults, the lowest layer. The credentials have no
/// meaningful default; they are empty and `validate` rejects them.
const DEFAULTS: &str = r#"
[crm]
base_url = ""
token = ""
page_size = 100
concurrency = 4
timeout_secs = 30
max_retries = 5
max_attempts = 5
max_pages = 100000
[crm.fields]
customer_id = "id"
customer_name = "name"
linkman_id = "id"
linkman_name = "name"
linkman_email = "email"

[edm]
base_url = "http://www.bestedm.org/mm-ms/api"
username = ""
password = ""
batch_size = 500
list_page_size = 1000
timeout_secs = 30
max_retries = 5
max_attempts = 5
concurrency = 4
timezone = "Asia/Shanghai"
auth = "query"

[database]
url = "sqlite://state.db?mode=rwc"
retention_days = 90

[sync]
schedule = "0 */15 * * * *"
timezone = "UTC"
list_id = 1
max_unsubscribe_ratio = 0.2

[writeback]
schedule = "0 5 * * * *"
lookback_days = 14
type_id = 1
route_id = 3

[writeback.templates]
open_title = "邮件打开：{campaign}"
open_content = "{name}（{email}）打开了群发邮件《{campaign}》（任务号 {sn}）{count} 次，首次 {first}，最近 {last}。"
click_title = "邮件点击：{campaign}"
click_content = "{name}（{email}）点击了群发邮件《{campaign}》（任务号 {sn}）中的链接 {count} 次，首次 {first}，最近 {last}。点击的链接：{links}"
bounce_title = "邮件退信：{campaign}"
bounce_content = "发往 {name}（{email}）的群发邮件《{campaign}》（任务号 {sn}）被退回：{reason}。今后不再向该地址发送。"
unsubscribe_title = "邮件退订：{list}"
unsubscribe_content = "{name}（{email}）于 {time} 退订了邮件列表 {list}，今后不再向其发送该列表的邮件。"

[log]
format = "json"
level = "info"

[http]
listen = "127.0.0.1:9187"

[daemon]
shutdown_timeout_secs = 60
lock_wait_secs = 60
lock_poll_secs = 5
instance_id = ""
"#;

/// A settings error; its text always names the offending key or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} not found")]
    Missing { path: PathBuf },
    #[error("{0}")]
    Load(String),
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

impl Settings {
    /// Loads the layers for `explicit` (the `--config` flag), reading the
    /// process environment.
    pub fn load(explicit: Option<&Path>) -> Result<Settings, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(explicit, env)
    }

    /// As [`Settings::load`], with the environment given (for tests).
    pub fn load_with_env(
        explicit: Option<&Path>,
        env: Vec<(String, String)>,
    ) -> Result<Settings, ConfigError> {
        let file = match explicit {
            Some(path)
                if !path.exists()
                    && std::fs::metadata(path)
                        .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) =>
            {
                return Err(ConfigError::Missing {
                    path: path.to_path_buf(),
                });
            }
            Some(path) => Some(path.to_path_buf()),
            None => [SYSTEM_CONFIG, LOCAL_CONFIG]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists()),
        };
        if let Some(path) = &file {
            check_syntax(path)?;
        }
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = &file {
            builder = builder.add_source(
                config::File::from(path.as_path())
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let env_map: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                // No `try_parsing`: it would turn a token such as "0123"
                // into the number 123. Numeric keys parse from text anyway.
                .source(Some(env_map)),
        );
        let where_ = file
            .as_ref()
            .map(|p| format!(" (file {})", p.display()))
            .unwrap_or_default();
        let raw = builder
            .build()
            .map_err(|e| ConfigError::Load(format!("cannot read settings{where_}: {e}")))?;
        let settings: Settings = raw
            .try_deserialize()
            .map_err(|e| ConfigError::Load(format!("bad settings{where_}: {e}")))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Parses settings from TOML text alone (defaults below it, no
    /// environment). Used by tests and the demo.
    pub fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .map_err(|e| ConfigError::Load(format!("cannot read settings: {e}")))?;
        let settings: Settings = raw
            .try_deserialize()
            .map_err(|e| ConfigError::Load(format!("bad settings: {e}")))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the values serde cannot: ranges, URLs, cron expressions,
    /// route fields and non-empty credentials.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use secrecy::ExposeSecret;
        let bad = |key: &str, reason: &str| {
            Err(ConfigError::Invalid {
                key: key.to_string(),
                reason: reason.to_string(),
            })
        };
        check_url("crm.base_url", &self.crm.base_url)?;
        check_url("edm.base_url", &self.edm.base_url)?;
        if self.crm.token.expose_secret().trim().is_empty() {
            return bad("crm.token", "must be set");
        }
        if !(1..=100).contains(&self.crm.page_size) {
            return bad("crm.page_size", "must be between 1 and 100");
        }
        if self.crm.concurrency == 0 || self.crm.concurrency > 256 {
            return bad("crm.concurrency", "must be between 1 and 256");
        }
        if self.crm.timeout_secs == 0 {
            return bad("crm.timeout_secs", "must be at least 1");
        }
        if self.database.retention_days == 0 {
            return bad("database.retention_days", "must be at least 1");
        }
        if self.crm.max_attempts == 0 {
            return bad("crm.max_attempts", "must be at least 1");
        }
        if self.edm.max_attempts == 0 {
            return bad("edm.max_attempts", "must be at least 1");
        }
        for (key, value) in [
            ("crm.fields.customer_id", &self.crm.fields.customer_id),
            ("crm.fields.customer_name", &self.crm.fields.customer_name),
            ("crm.fields.linkman_id", &self.crm.fields.linkman_id),
            ("crm.fields.linkman_name", &self.crm.fields.linkman_name),
            ("crm.fields.linkman_email", &self.crm.fields.linkman_email),
        ] {
            if value.trim().is_empty() {
                return bad(key, "must not be empty");
            }
        }
        if self.edm.username.trim().is_empty() {
            return bad("edm.username", "must be set");
        }
        if self.edm.password.expose_secret().is_empty() {
            return bad("edm.password", "must be set");
        }
        if self.edm.batch_size == 0 || self.edm.batch_size > 10_000 {
            return bad("edm.batch_size", "must be between 1 and 10000");
        }
        if self.edm.list_page_size == 0 || self.edm.list_page_size > 10_000 {
            return bad("edm.list_page_size", "must be between 1 and 10000");
        }
        if self.edm.concurrency == 0 || self.edm.concurrency > 64 {
            return bad("edm.concurrency", "must be between 1 and 64");
        }
        if self.crm.max_requests_per_sec == Some(0) {
            return bad("crm.max_requests_per_sec", "must be at least 1 (or unset)");
        }
        if self.edm.max_requests_per_sec == Some(0) {
            return bad("edm.max_requests_per_sec", "must be at least 1 (or unset)");
        }
        if self.crm.max_pages == 0 {
            return bad("crm.max_pages", "must be at least 1");
        }
        if self.edm.timeout_secs == 0 {
            return bad("edm.timeout_secs", "must be at least 1");
        }
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
        check_cron("sync.schedule", &self.sync.schedule)?;
        check_cron("writeback.schedule", &self.writeback.schedule)?;
        check_zone("sync.timezone", &self.sync.timezone)?;
        check_zone("edm.timezone", &self.edm.timezone)?;
        if self.sync.list_id.0 < 1 {
            return bad("sync.list_id", "must be a list id ≥ 1");
        }
        if !(0.0..=1.0).contains(&self.sync.max_unsubscribe_ratio) {
            return bad("sync.max_unsubscribe_ratio", "must be between 0 and 1");
        }
        for (i, route) in self.sync.routes.iter().enumerate() {
            if route.list_id.0 < 1 {
                return bad(
                    &format!("sync.routes[{i}].list_id"),
                    "must be a list id ≥ 1",
                );
            }
            check_field_ref(&format!("sync.routes[{i}].field"), &route.field)?;
        }
        for (i, slot) in self.sync.vars.slots().iter().enumerate() {
            if let Some(field) = slot {
                check_field_ref(&format!("sync.vars.var{}", i + 1), field)?;
            }
        }
        if self.writeback.lookback_days == 0 || self.writeback.lookback_days > 366 {
            return bad("writeback.lookback_days", "must be between 1 and 366");
        }
        for (key, template) in self.writeback.templates.all() {
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
        if self.daemon.lock_poll_secs == 0 || self.daemon.lock_poll_secs > 3600 {
            return bad("daemon.lock_poll_secs", "must be between 1 and 3600");
        }
        if self.daemon.shutdown_timeout_secs > 3600 {
            return bad("daemon.shutdown_timeout_secs", "must be at most 3600");
        }
        if !valid_log_filter(&self.log.level) {
            return bad("log.level", "is not a valid level or filter directive");
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
        if example_host(&self.crm.base_url) {
            keys.push("crm.base_url");
        }
        if set_me(self.crm.token.expose_secret()) {
            keys.push("crm.token");
        }
        if example_host(&self.edm.base_url) {
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

fn check_url(key: &str, value: &str) -> Result<(), ConfigError> {
    match url::Url::parse(value) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Ok(()),
        Ok(_) => Err(ConfigError::Invalid {
            key: key.into(),
            reason: "must be an http:// or https:// URL".into(),
        }),
        Err(e) => Err(ConfigError::Invalid {
            key: key.into(),
            reason: if value.is_empty() {
                "must be set".into()
            } else {
                format!("not a URL: {e}")
            },
        }),
    }
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

/// A six-field (seconds first) or seven-field (with year) cron expression,
/// parsed with the same `croner` settings tokio-cron-scheduler uses, so a
/// schedule that passes here is one the scheduler accepts.
fn check_zone(key: &str, zone: &str) -> Result<(), ConfigError> {
    match zone.parse::<chrono_tz::Tz>() {
        Ok(_) => Ok(()),
        Err(_) => Err(ConfigError::Invalid {
            key: key.into(),
            reason: format!("{zone:?} is not an IANA time zone name (e.g. UTC, Asia/Shanghai)"),
        }),
    }
}

impl Settings {
    /// The zone the schedules are read in (`sync.timezone`).
    pub fn schedule_zone(&self) -> chrono_tz::Tz {
        self.sync.timezone.parse().unwrap_or(chrono_tz::UTC)
    }

    /// EDM's zone (`edm.timezone`): the days of its dates.
    pub fn edm_zone(&self) -> chrono_tz::Tz {
        self.edm
            .timezone
            .parse()
            .unwrap_or(chrono_tz::Asia::Shanghai)
    }
}

/// Reads the config file and checks it is TOML, describing what is wrong
/// by file, line, column and key, never by its text: the parser's own
/// errors quote the offending line, which may hold a secret (a
/// `password = "…` missing its closing quote, a duplicated `token`).
fn check_syntax(path: &Path) -> Result<(), ConfigError> {
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
    let Err(e) = toml::from_str::<toml::Table>(text) else {
        return Ok(());
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

fn check_cron(key: &str, value: &str) -> Result<(), ConfigError> {
    let fields = value.split_whitespace().count();
    let reason = if !(6..=7).contains(&fields) {
        Some(format!(
            "{value:?} has {fields} fields; six (seconds first) or seven are needed"
        ))
    } else {
        croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .dom_and_dow(true)
            .build()
            .parse(value)
            .err()
            .map(|e| format!("{value:?} is not a valid cron expression: {e}"))
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(ConfigError::Invalid {
            key: key.into(),
            reason,
        }),
    }
}

#[cfg(test)]
mod tests;
