//! The real binary run once with a config file, for the command tests
//! (`reconcile`, `audit`): its output, checked for secrets every time.

use std::process::Output;
use std::time::Duration;

use crm_edm_sync::edm::password_md5;
use crm_edm_sync::sandbox::{EDM_PASSWORD, TOKEN};

pub const BIN: &str = env!("CARGO_BIN_EXE_crm-edm-sync");

/// `crm-edm-sync --config CONFIG ARGS…` with `RUST_LOG` unset, within a
/// minute; fails the test if stdout or stderr holds a secret.
pub async fn run(config: &std::path::Path, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG");
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("binary finished in time")
        .expect("binary ran");
    let all = text_of(&out);
    for secret in [TOKEN, EDM_PASSWORD, &password_md5(EDM_PASSWORD)] {
        assert!(!all.contains(secret), "a secret was printed: {all}");
    }
    out
}

/// [`run`], which must exit 0.
pub async fn ok(config: &std::path::Path, args: &[&str]) -> Output {
    let out = run(config, args).await;
    assert!(out.status.success(), "{args:?}: {}", text_of(&out));
    out
}

/// stdout then stderr, as text.
pub fn text_of(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
