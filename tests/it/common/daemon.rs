//! The real binary in daemon mode, for the tests that run it: its config,
//! the process with its JSON log lines collected as they come, and the ops
//! endpoint.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crm_edm_sync::sandbox::Sandbox;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{TestDb, config_text};

pub const BIN: &str = env!("CARGO_BIN_EXE_crm-edm-sync");

/// A config that runs contacts every second, write-back once a year, the
/// drift report never, and tries the lock every second.
pub fn write_config(dir: &std::path::Path, sb: &Sandbox, db: &TestDb) -> std::path::PathBuf {
    let text = config_text(
        sb,
        &db.url,
        "schedule = \"* * * * * *\"",
        "[writeback]\nschedule = \"0 0 0 1 1 *\"\n[reconcile]\nschedule = \"\"\n[log]\nformat = \"json\"\nlevel = \"info\"\n[http]\nlisten = \"127.0.0.1:0\"\n[daemon]\nlock_poll_secs = 1\nshutdown_timeout_secs = 30\nlock_wait_secs = 2\n",
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A daemon process whose JSON log lines are collected as they come.
pub struct Daemon {
    pub child: tokio::process::Child,
    pub lines: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Daemon {
    pub fn start(config: &std::path::Path, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("daemon starts");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let value = serde_json::from_str(&line).unwrap_or_else(|_| json!({"raw": line}));
                sink.lock().unwrap().push(value);
            }
        });
        Daemon { child, lines }
    }

    pub fn count(&self, message: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["message"].as_str().is_some_and(|m| m.contains(message)))
            .count()
    }

    pub fn find(&self, message: &str) -> Option<serde_json::Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find(|v| v["message"].as_str().is_some_and(|m| m.contains(message)))
            .cloned()
    }

    pub async fn wait_for(&self, message: &str, n: usize, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if self.count(message) >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Waits for `n` log lines containing `message`; fails with the log.
    pub async fn expect(&self, message: &str, n: usize, within: Duration) {
        assert!(
            self.wait_for(message, n, within).await,
            "expected {n}× {message:?} within {within:?}:\n{}",
            self.log()
        );
    }

    /// Waits for `n` log lines for which `matches` holds; fails with the
    /// log, naming `what` was awaited.
    pub async fn expect_lines(
        &self,
        what: &str,
        matches: impl Fn(&serde_json::Value) -> bool,
        n: usize,
        within: Duration,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        let count = || {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| matches(l))
                .count()
        };
        while count() < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            count() >= n,
            "expected {n}× {what} within {within:?}:\n{}",
            self.log()
        );
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running").to_string();
        std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
    }

    pub async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("exits in time")
            .unwrap()
            .code()
    }

    pub fn log(&self) -> String {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The ops endpoint's base URL, from its log line.
    pub async fn ops_url(&self) -> String {
        self.expect("ops endpoint listening", 1, Duration::from_secs(20))
            .await;
        let line = self.find("ops endpoint listening").unwrap();
        format!("http://{}", line["listen"].as_str().unwrap())
    }
}

pub async fn sandbox() -> Sandbox {
    let sb = Sandbox::start().await.unwrap();
    sb.edm.create_list(1, "客户");
    sb.edm.create_list(2, "VIP");
    sb
}

/// The ops endpoint's `/metrics` text.
pub async fn metrics_text(url: &str) -> String {
    crate::common::http_get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
