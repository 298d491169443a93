//! The reseller API (`[reseller]`): each tenant's EDM service read through
//! the reseller account, and the optional top-up.

use std::time::Duration;

use crm_edm_sync::edm::password_md5;
use crm_edm_sync::sandbox::{RESELLER_PASSWORD, RESELLER_USER, Sandbox};

use crate::common::binary::{ok, run, text_of};
use crate::common::daemon::{Daemon, metrics_text, sandbox, write_config};
use crate::common::{TestDb, seed_basic};

/// `[reseller]` with the sandbox's reseller account and `extra` keys.
fn reseller_section(extra: &str) -> String {
    format!(
        "\n[reseller]\nusername = \"{RESELLER_USER}\"\npassword = \"{RESELLER_PASSWORD}\"\n{extra}\n"
    )
}

/// The daemon test config with a reseller section appended.
fn config_with_reseller(
    dir: &std::path::Path,
    sb: &Sandbox,
    db: &TestDb,
    extra: &str,
) -> std::path::PathBuf {
    let path = write_config(dir, sb, db);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&reseller_section(extra));
    std::fs::write(&path, text).unwrap();
    path
}

const TOP_UP: &str = "top_up_below = 100\ntop_up_count = 1000\ntop_up_max_per_day = 1";

/// No output holds the reseller's password or its MD5.
fn assert_no_reseller_secret(text: &str) {
    assert!(!text.contains(RESELLER_PASSWORD), "{text}");
    assert!(!text.contains(&password_md5(RESELLER_PASSWORD)), "{text}");
}

/// The value of one series in Prometheus text.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn check_reads_the_tenants_service_through_the_reseller_account() {
    // Arrange
    let sb = sandbox().await;
    sb.edm.set_service("enabled", "2030-06-30", 4321);
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_reseller(dir.path(), &sb, &db, TOP_UP);

    // Act
    let out = run(&config, &["check"]).await;

    // Assert: the reseller API was asked about the tenant's account.
    let text = text_of(&out);
    let line = text
        .lines()
        .find(|l| l.starts_with("reseller:"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.starts_with("reseller: ok: customer demo"), "{line}");
    assert!(
        line.contains("4321 sends left") && line.contains("2030-06-30"),
        "{line}"
    );
    assert!(
        line.contains("top-up of 1000 when below 100, at most 1 a day"),
        "{line}"
    );
    assert_eq!(
        sb.count("service-info"),
        2,
        "one read by account, one by reseller"
    );
    assert_no_reseller_secret(&text);
}

#[tokio::test]
async fn a_wrong_reseller_password_fails_check_naming_the_account() {
    let sb = sandbox().await;
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &sb, &db);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "\n[reseller]\nusername = \"{RESELLER_USER}\"\npassword = \"wrong-password-1\"\n"
    ));
    std::fs::write(&path, text).unwrap();

    let out = run(&path, &["check"]).await;

    let text = text_of(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("reseller: FAILED (account reseller, customer demo)"),
        "{text}"
    );
    assert!(
        !text.contains("wrong-password-1") && !text.contains(&password_md5("wrong-password-1")),
        "{text}"
    );
}

#[tokio::test]
async fn the_daemon_tops_up_a_tenant_below_the_threshold_at_most_the_days_bound() {
    // Arrange: 50 sends left, a top-up below 100, once a day.
    let sb = sandbox().await;
    seed_basic(&sb);
    sb.edm.set_service("enabled", "2099-12-31", 50);
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_reseller(dir.path(), &sb, &db, TOP_UP);

    // Act: a daemon runs; the quota is spent again; a second daemon runs.
    let mut first = Daemon::start(&config, &[]);
    let ops = first.ops_url().await;
    first
        .expect(
            "topping up the tenant's EDM sends through the reseller account",
            1,
            Duration::from_secs(20),
        )
        .await;
    let mut text = String::new();
    for _ in 0..50 {
        text = metrics_text(&ops).await;
        if series(
            &text,
            r#"crm_edm_sync_reseller_top_ups_total{tenant="default",outcome="added"}"#,
        ) == Some(1.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.signal("-TERM");
    assert_eq!(first.exit_code(Duration::from_secs(30)).await, Some(0));
    sb.edm.set_service("enabled", "2099-12-31", 40);
    let mut second = Daemon::start(&config, &[]);
    let ops = second.ops_url().await;
    second
        .expect("holding the instance lock", 1, Duration::from_secs(20))
        .await;
    for _ in 0..50 {
        if series(
            &metrics_text(&ops).await,
            r#"crm_edm_sync_edm_quota_available{tenant="default"}"#,
        ) == Some(40.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    second.signal("-TERM");
    assert_eq!(second.exit_code(Duration::from_secs(30)).await, Some(0));

    // Assert: one top-up, naming the daemon and the tenant, counted and
    // logged at WARN; the second daemon asked none (one a day).
    let top_ups = sb.edm.top_ups();
    assert_eq!(top_ups.len(), 1, "{top_ups:?}");
    let (customer, count, remark) = &top_ups[0];
    assert_eq!((customer.as_str(), *count), ("demo", 1000));
    assert!(
        remark.contains("crm-edm-sync") && remark.contains("tenant default"),
        "{remark}"
    );
    assert_eq!(
        series(
            &text,
            r#"crm_edm_sync_reseller_top_ups_total{tenant="default",outcome="added"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        first
            .find("topping up the tenant's EDM sends through the reseller account")
            .unwrap()["level"],
        "WARN"
    );
    assert_eq!(
        second.count("topping up the tenant's EDM sends through the reseller account"),
        0
    );
    assert_eq!(sb.count("add-count"), 1);
    assert_no_reseller_secret(&format!("{}{}", first.log(), second.log()));
}

#[tokio::test]
async fn understock_is_an_error_naming_the_reseller_account_and_is_not_asked_again_that_day() {
    // Arrange: the reseller's own pool holds less than a top-up.
    let sb = sandbox().await;
    sb.edm.set_service("enabled", "2099-12-31", 50);
    sb.edm.set_reseller_pool(10);
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_reseller(
        dir.path(),
        &sb,
        &db,
        "top_up_below = 100\ntop_up_count = 1000\ntop_up_max_per_day = 5",
    );

    // Act: two daemons one after the other, the same day.
    for round in 0..2 {
        let mut daemon = Daemon::start(&config, &[]);
        daemon.ops_url().await;
        daemon
            .expect("holding the instance lock", 1, Duration::from_secs(20))
            .await;
        if round == 0 {
            daemon
                .expect("has no sends left to give", 1, Duration::from_secs(20))
                .await;
            let line = daemon.find("has no sends left to give").unwrap();
            assert_eq!(line["level"], "ERROR");
            assert!(
                line["message"]
                    .as_str()
                    .unwrap()
                    .contains("reseller account reseller"),
                "{line}"
            );
        } else {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        daemon.signal("-TERM");
        assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));
    }

    // Assert: asked once only.
    assert_eq!(sb.count("add-count"), 1);
    assert!(sb.edm.top_ups().is_empty());
}

#[tokio::test]
async fn a_dry_run_plan_shows_the_top_up_it_would_ask() {
    // Arrange
    let sb = sandbox().await;
    seed_basic(&sb);
    sb.edm.set_service("enabled", "2099-12-31", 7);
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_reseller(dir.path(), &sb, &db, TOP_UP);
    let plan = dir.path().join("plan.jsonl");

    // Act
    let out = ok(
        &config,
        &[
            "--once",
            "--dry-run",
            "--job",
            "contacts",
            "--plan",
            plan.to_str().unwrap(),
        ],
    )
    .await;

    // Assert: said, written, and not done.
    assert!(
        text_of(&out).contains("plan: top up 1000 sends"),
        "{}",
        text_of(&out)
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&plan)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let top_up = lines
        .iter()
        .find(|l| l["kind"] == "top_up")
        .expect("a top_up line");
    assert_eq!(
        top_up,
        &serde_json::json!({"kind": "top_up", "tenant": "default", "count": 1000, "qty_available": 7})
    );
    assert_eq!(sb.count("add-count"), 0);
}
