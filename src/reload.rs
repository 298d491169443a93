//! SIGHUP: the daemon reads its config (and its secret files) again.
//!
//! A valid new config takes effect at the next run of each job: limits,
//! routes, vars, templates, credentials, schedules and the log level. A
//! run already going finishes with the config it started with. An invalid
//! config is refused with an ERROR naming the key, and the running one
//! stays. One INFO line lists the keys that changed (secrets by name only).
//!
//! Some keys are read once, at start: the state database, the ops address,
//! the log format, the instance's name and the lock and drain timings. A
//! change to one of them is logged as a WARN and waits for a restart; the
//! running values stay.

use std::sync::{Arc, RwLock};

use secrecy::ExposeSecret;
use tokio::sync::watch;

use crate::config::Settings;
use crate::jobs::Context;

/// Keys only a restart applies.
pub(crate) const RESTART_ONLY: &[&str] = &[
    "database.url",
    "http.listen",
    "log.format",
    "daemon.instance_id",
    "daemon.lock_poll_secs",
    "daemon.lock_wait_secs",
    "daemon.shutdown_timeout_secs",
    "daemon.max_parallel_jobs",
    "tenants.dir",
];

/// Keys whose change re-arms the schedules.
const SCHEDULE_KEYS: &[&str] = &[
    "sync.schedule",
    "writeback.schedule",
    "reconcile.schedule",
    "sync.timezone",
];

/// Keys whose values are secrets: named in the change line, never shown.
const SECRET_KEYS: &[&str] = &["crm.token", "edm.password", "database.url"];

/// The context the next run of each job uses, replaced by a reload.
pub(crate) struct Live {
    current: RwLock<Context>,
    /// Bumped when the schedules change: the active period re-arms them.
    schedules: watch::Sender<u64>,
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    /// Keys that take effect at the next run.
    pub applied: Vec<String>,
    /// Keys that wait for a restart (their running values stay).
    pub restart_only: Vec<String>,
    /// Whether a schedule or its zone changed.
    pub schedules: bool,
}

impl Live {
    pub(crate) fn new(base: Context) -> Arc<Live> {
        Arc::new(Live {
            current: RwLock::new(base),
            schedules: watch::channel(0).0,
        })
    }

    /// The context for a run starting now.
    pub(crate) fn current(&self) -> Context {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Told when the schedules change.
    pub(crate) fn schedule_changes(&self) -> watch::Receiver<u64> {
        self.schedules.subscribe()
    }

    /// Whether `new` differs from the running settings in any key.
    pub(crate) fn differs(&self, new: &Settings) -> bool {
        let changes = changes(&self.current().settings, new);
        !(changes.applied.is_empty() && changes.restart_only.is_empty())
    }

    /// Makes `new` the settings of the next runs (keeping the running
    /// values of [`RESTART_ONLY`] keys); returns what changed.
    pub(crate) fn apply(&self, new: Settings) -> anyhow::Result<Changes> {
        let old = self.current();
        let changes = changes(&old.settings, &new);
        if changes.applied.is_empty() && changes.restart_only.is_empty() {
            tracing::info!("config reloaded: nothing changed");
            return Ok(changes);
        }
        if !changes.restart_only.is_empty() {
            tracing::warn!(
                keys = ?changes.restart_only,
                "config reload: these keys change only at the next restart; their running values stay"
            );
        }
        let effective = keep_restart_only(&old.settings, new);
        if changes.applied.iter().any(|k| k == "log.level")
            && let Err(why) = crate::telemetry::set_level(&effective.log.level)
        {
            tracing::warn!(reason = %why, "config reload: log.level not applied");
        }
        let next = old.with_settings(effective)?;
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = next;
        if changes.schedules {
            self.schedules.send_modify(|generation| *generation += 1);
        }
        if !changes.applied.is_empty() {
            tracing::info!(
                changed = ?changes.applied,
                "config reloaded: the next run of each job uses it"
            );
        }
        Ok(changes)
    }
}

/// The keys whose values differ between `old` and `new`.
pub(crate) fn changes(old: &Settings, new: &Settings) -> Changes {
    let (before, after) = (old.layers.flat(), new.layers.flat());
    let mut keys: Vec<String> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .cloned()
        .collect();
    // A secret read from a file changes without its key changing.
    for (key, was, is) in secrets(old, new) {
        if was != is {
            keys.push(key.to_string());
        }
    }
    keys.sort();
    keys.dedup();
    let (restart_only, applied): (Vec<String>, Vec<String>) = keys
        .into_iter()
        .map(|k| {
            if SECRET_KEYS.contains(&k.as_str()) {
                format!("{k} (secret)")
            } else {
                k
            }
        })
        .partition(|k| RESTART_ONLY.iter().any(|r| k.starts_with(r)));
    let schedules = applied.iter().any(|k| SCHEDULE_KEYS.contains(&k.as_str()));
    Changes {
        applied,
        restart_only,
        schedules,
    }
}

fn secrets<'a>(old: &'a Settings, new: &'a Settings) -> [(&'static str, &'a str, &'a str); 2] {
    [
        (
            "crm.token",
            old.crm.token.expose_secret(),
            new.crm.token.expose_secret(),
        ),
        (
            "edm.password",
            old.edm.password.expose_secret(),
            new.edm.password.expose_secret(),
        ),
    ]
}

/// `new` with the running values of the keys only a restart applies.
fn keep_restart_only(old: &Settings, mut new: Settings) -> Settings {
    new.database.url = old.database.url.clone();
    new.http.listen = old.http.listen;
    new.log.format = old.log.format;
    new.daemon = old.daemon.clone();
    for key in RESTART_ONLY {
        new.layers.copy_key(&old.layers, key);
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[crm]
base_url = "http://crm.test"
token = "tok-one"
[edm]
username = "u"
password = "p"
"#;

    #[test]
    fn a_reload_names_changed_keys_hides_secrets_and_defers_restart_only_ones() {
        // Arrange
        let old = Settings::from_toml(BASE).unwrap();
        let new = Settings::from_toml(&format!(
            "{}\n[sync]\nschedule = \"0 0 * * * *\"\nlist_id = 3\n[http]\nlisten = \"127.0.0.1:9999\"\n",
            BASE.replace("tok-one", "tok-two")
        ))
        .unwrap();

        // Act
        let changes = changes(&old, &new);

        // Assert
        assert_eq!(
            changes.applied,
            vec!["crm.token (secret)", "sync.list_id", "sync.schedule"]
        );
        assert_eq!(changes.restart_only, vec!["http.listen"]);
        assert!(changes.schedules);
        assert!(!format!("{changes:?}").contains("tok-"));
    }

    #[test]
    fn a_secret_file_whose_content_changed_is_read_again_and_named_as_changed() {
        // Arrange: the token in a file, loaded once.
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("crm-token");
        std::fs::write(&token, "first-token\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[crm]\nbase_url = \"http://crm.test\"\ntoken_file = \"{}\"\n[edm]\nusername = \"u\"\npassword = \"p\"\n",
                token.display()
            ),
        )
        .unwrap();
        let load = || {
            Settings::load_with_env(Some(&config), vec![], crate::config::Access::Remote).unwrap()
        };
        let old = load();

        // Act: the file rotated, the config untouched.
        std::fs::write(&token, "second-token\n").unwrap();
        let new = load();

        // Assert
        assert_eq!(new.crm.token.expose_secret(), "second-token");
        assert_eq!(changes(&old, &new).applied, vec!["crm.token (secret)"]);
    }

    #[test]
    fn the_running_values_of_restart_only_keys_stay() {
        let old = Settings::from_toml(BASE).unwrap();
        let new = Settings::from_toml(&format!(
            "{BASE}\n[http]\nlisten = \"127.0.0.1:9999\"\n[daemon]\ninstance_id = \"other\"\n"
        ))
        .unwrap();

        let kept = keep_restart_only(&old, new);

        assert_eq!(kept.http.listen, old.http.listen);
        assert_eq!(kept.daemon.instance_id, old.daemon.instance_id);
        assert!(changes(&old, &kept).restart_only.is_empty());
    }
}
