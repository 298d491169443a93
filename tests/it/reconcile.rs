//! The drift report through the real binary: each kind of drift made in
//! the sandbox as a person would make it in EDM's web UI, reported without
//! a write to EDM, and the repair that `--full` makes of it — which leaves
//! a reactivated member alone.

use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use crate::common::binary::{self, text_of};
use crate::common::daemon::{Daemon, metrics_text};
use crate::common::{TestDb, config_text, seed_basic};
use crm_edm_sync::sandbox::Sandbox;

struct Cli {
    sb: Sandbox,
    _db: TestDb,
    dir: tempfile::TempDir,
}

impl Cli {
    /// Ten customers (6–10 routed to list 2), one link-man each, on `db`,
    /// synced once.
    async fn synced(db: TestDb) -> Cli {
        let sb = Sandbox::start().await.unwrap();
        sb.edm.create_list(1, "客户");
        sb.edm.create_list(2, "VIP");
        seed_basic(&sb);
        let dir = tempfile::tempdir().unwrap();
        let text = config_text(&sb, &db.url, "", "[log]\nformat = \"json\"\n");
        std::fs::write(dir.path().join("config.toml"), text).unwrap();
        let cli = Cli { sb, _db: db, dir };
        cli.ok(&["--once", "--job", "contacts"]).await;
        cli
    }

    fn config(&self) -> std::path::PathBuf {
        self.dir.path().join("config.toml")
    }

    async fn ok(&self, args: &[&str]) -> Output {
        binary::ok(&self.config(), args).await
    }

    /// `reconcile --json`: the lists by id.
    async fn reconcile(&self) -> (Value, Output) {
        let out = self.ok(&["reconcile", "--json"]).await;
        let report: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
        (report, out)
    }

    fn id_of(&self, list: i64, address: &str) -> i64 {
        self.sb
            .edm
            .addresses(list)
            .iter()
            .find(|a| a.address == address)
            .map(|a| a.id)
            .unwrap_or_else(|| panic!("{address} in list {list}"))
    }
}

/// The counts of `list_id` in a report: members, missing, changed,
/// reactivated, foreign.
fn counts(report: &Value, list_id: i64) -> [u64; 5] {
    let list = report["lists"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["list_id"] == list_id)
        .unwrap_or_else(|| panic!("list {list_id} in {report}"));
    ["members", "missing", "changed", "reactivated", "foreign"].map(|k| list[k].as_u64().unwrap())
}

/// Drift of every kind in list 1, made by hand in EDM and the CRM after the
/// first sync; list 2 untouched.
async fn drifted(cli: &Cli) {
    let edm = &cli.sb.edm;
    // missing: deleted in EDM's web UI.
    edm.delete_address(cli.id_of(1, "lm1@example.com"));
    // changed: a fullname and a var edited in EDM.
    edm.rename_address(cli.id_of(1, "lm2@example.com"), "Someone else");
    edm.set_var(cli.id_of(1, "lm3@example.com"), 2, "000");
    // reactivated: the daemon unsubscribes lm4 (its link-man was deleted),
    // and the recipient lm5 unsubscribes; both are put back by hand.
    cli.sb.crm.remove_linkman(40);
    edm.user_unsubscribe(1, "lm5@example.com");
    cli.ok(&["--once", "--job", "contacts", "--force"]).await;
    assert!(!edm.emails(1).contains(&"lm4@example.com".to_string()));
    edm.reactivate(1, "lm4@example.com", "联系人4");
    edm.reactivate(1, "lm5@example.com", "联系人5");
    // foreign: someone else's address.
    edm.add_existing(1, "stranger@example.com", "S");
}

#[tokio::test]
async fn every_kind_of_drift_is_reported_and_nothing_is_written_to_edm() {
    for db in TestDb::all().await {
        // Arrange
        let cli = Cli::synced(db).await;
        drifted(&cli).await;
        let writes_before = cli.sb.edm_writes();
        let report_file = cli.dir.path().join("drift.jsonl");

        // Act
        let out = cli
            .ok(&[
                "reconcile",
                "--json",
                "--report",
                report_file.to_str().unwrap(),
            ])
            .await;

        // Assert: the counts (list 1 holds lm2, lm3, lm4, lm5 and the
        // stranger), the lines of the report, no EDM write.
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(report["run_id"].as_str().is_some_and(|r| !r.is_empty()));
        assert_eq!(counts(&report, 1), [5, 1, 2, 2, 1], "{report}");
        assert_eq!(counts(&report, 2), [5, 0, 0, 0, 0], "{report}");
        assert_eq!(cli.sb.edm_writes(), writes_before, "reconcile wrote to EDM");
        let mut lines: Vec<(i64, String, String)> = std::fs::read_to_string(&report_file)
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (
                    v["list_id"].as_i64().unwrap(),
                    v["email"].as_str().unwrap().to_string(),
                    v["kind"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        lines.sort();
        let expected: Vec<(i64, String, String)> = [
            ("lm1@example.com", "missing"),
            ("lm2@example.com", "changed"),
            ("lm3@example.com", "changed"),
            ("lm4@example.com", "reactivated"),
            ("lm5@example.com", "reactivated"),
            ("stranger@example.com", "foreign"),
        ]
        .iter()
        .map(|(e, k)| (1, e.to_string(), k.to_string()))
        .collect();
        assert_eq!(lines, expected);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&report_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // The log's summary carries every list's counts as JSON.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let finished: Value = stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["message"] == "run finished" && v["job"] == "reconcile")
            .unwrap_or_else(|| panic!("no run finished line: {stderr}"));
        assert_eq!(finished["reactivated"], 2, "{finished}");
        assert_eq!(finished["lists"][0]["list_id"], 1, "{finished}");
        assert_eq!(finished["lists"][0]["missing"], 1, "{finished}");
        assert!(
            !stderr.contains("lm4@example.com"),
            "a full address in the log: {stderr}"
        );
    }
}

#[tokio::test]
async fn the_text_report_masks_reactivated_addresses_and_names_the_repair() {
    // Arrange
    let cli = Cli::synced(TestDb::new().await).await;
    drifted(&cli).await;

    // Act
    let out = cli.ok(&["reconcile"]).await;

    // Assert
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("list 1: 5 members in EDM; missing 1, changed 2, reactivated 2, foreign 1"),
        "{text}"
    );
    assert!(text.contains("l***@example.com"), "{text}");
    assert!(!text.contains("lm4@example.com"), "{text}");
    assert!(text.contains("--once --job contacts --full"), "{text}");
}

#[tokio::test]
async fn a_full_resync_repairs_missing_and_changed_and_leaves_reactivated_members_alone() {
    for db in TestDb::all().await {
        // Arrange
        let cli = Cli::synced(db).await;
        drifted(&cli).await;

        // Act
        cli.ok(&["--once", "--job", "contacts", "--full"]).await;
        let (report, _) = cli.reconcile().await;

        // Assert: lm1 is back, lm2 and lm3 hold the CRM's texts again;
        // lm4 and lm5 are still active and still reported.
        assert_eq!(counts(&report, 1), [6, 0, 0, 2, 1], "{report}");
        let emails = cli.sb.edm.emails(1);
        for kept in ["lm4@example.com", "lm5@example.com"] {
            assert!(emails.contains(&kept.to_string()), "{kept} was touched");
        }
    }
}

#[tokio::test]
async fn a_member_the_daemon_adds_again_is_no_longer_reactivated() {
    // Arrange: lm4 unsubscribed by the daemon, then its link-man returns.
    let cli = Cli::synced(TestDb::new().await).await;
    cli.sb.crm.remove_linkman(40);
    cli.ok(&["--once", "--job", "contacts", "--force"]).await;
    cli.sb.crm.put_linkman(
        4,
        40,
        serde_json::json!({"name": "联系人4", "email": "lm4@example.com", "mobile": "13800000004"}),
    );

    // Act
    cli.ok(&["--once", "--job", "contacts"]).await;
    let (report, _) = cli.reconcile().await;

    // Assert
    assert_eq!(counts(&report, 1), [5, 0, 0, 0, 0], "{report}");
}

#[tokio::test]
async fn a_recipient_unsubscribe_since_the_last_sync_is_not_reported_missing() {
    // Arrange
    let cli = Cli::synced(TestDb::new().await).await;
    cli.sb.edm.user_unsubscribe(1, "lm1@example.com");

    // Act
    let (report, _) = cli.reconcile().await;
    let (again, _) = cli.reconcile().await;

    // Assert: and the report recorded it, as the contacts job would.
    assert_eq!(counts(&report, 1), [4, 0, 0, 0, 0], "{report}");
    assert_eq!(counts(&again, 1), [4, 0, 0, 0, 0], "{again}");
    let status = cli.ok(&["status", "--json"]).await;
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(
        status.to_string().contains("reconcile"),
        "the run is not recorded: {status}"
    );
}

/// A daemon config for `cli`'s sandbox and database with these
/// schedules.
fn daemon_config(cli: &Cli, db_url: &str, contacts: &str, reconcile: &str) -> std::path::PathBuf {
    let text = config_text(
        &cli.sb,
        db_url,
        &format!("schedule = \"{contacts}\""),
        &format!(
            "[writeback]\nschedule = \"0 0 0 1 1 *\"\n[reconcile]\nschedule = \"{reconcile}\"\n[log]\nformat = \"json\"\n[http]\nlisten = \"127.0.0.1:0\"\n[daemon]\nlock_poll_secs = 1\n"
        ),
    );
    let path = cli.dir.path().join("daemon.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn the_daemon_runs_the_report_on_its_schedule_and_exports_the_counts_as_gauges() {
    // Arrange: a foreign address and a reactivated one in list 1.
    let db = TestDb::new().await;
    let url = db.url.clone();
    let cli = Cli::synced(db).await;
    cli.sb.edm.add_existing(1, "stranger@example.com", "S");
    cli.sb.edm.user_unsubscribe(1, "lm5@example.com");
    cli.ok(&["--once", "--job", "contacts"]).await;
    cli.sb.edm.reactivate(1, "lm5@example.com", "联系人5");
    let config = daemon_config(&cli, &url, "0 0 0 1 1 *", "* * * * * *");

    // Act
    let mut daemon = Daemon::start(&config, &[]);
    let ops = daemon.ops_url().await;
    daemon
        .expect("list compared", 2, Duration::from_secs(20))
        .await;
    daemon
        .expect("run finished", 1, Duration::from_secs(20))
        .await;
    let text = metrics_text(&ops).await;
    daemon.signal("-TERM");
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));

    // Assert
    let gauge = |list: &str, kind: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("crm_edm_sync_drift_members{")
                    && l.contains(&format!("list_id=\"{list}\""))
                    && l.contains(&format!("kind=\"{kind}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {kind} gauge of list {list}: {text}"))
    };
    assert_eq!(gauge("1", "reactivated"), 1.0);
    assert_eq!(gauge("1", "foreign"), 1.0);
    assert_eq!(gauge("1", "missing"), 0.0);
    assert_eq!(gauge("2", "changed"), 0.0);
    let finished = daemon.find("run finished").unwrap();
    assert_eq!(finished["job"], "reconcile", "{finished}");
}

#[tokio::test]
async fn an_empty_reconcile_schedule_never_runs_the_report() {
    // Arrange
    let db = TestDb::new().await;
    let url = db.url.clone();
    let cli = Cli::synced(db).await;
    let config = daemon_config(&cli, &url, "* * * * * *", "");

    // Act: two contacts runs go by.
    let mut daemon = Daemon::start(&config, &[]);
    daemon
        .expect("run finished", 2, Duration::from_secs(20))
        .await;
    daemon.signal("-TERM");
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));

    // Assert
    assert_eq!(daemon.count("list compared"), 0, "{}", daemon.log());
    assert!(
        daemon.find("the drift report runs by hand only").is_some(),
        "{}",
        daemon.log()
    );
}

#[tokio::test]
async fn reconcile_beside_a_running_daemon_reports_read_only() {
    // Arrange: a daemon holding the state database, idle.
    let db = TestDb::new().await;
    let url = db.url.clone();
    let cli = Cli::synced(db).await;
    cli.sb.edm.add_existing(1, "stranger@example.com", "S");
    let config = daemon_config(&cli, &url, "0 0 0 1 1 *", "");
    let mut daemon = Daemon::start(&config, &[]);
    daemon.ops_url().await;

    // Act
    let (report, out) = cli.reconcile().await;
    daemon.signal("-TERM");
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));

    // Assert: the report is made, and no run of it is recorded.
    assert_eq!(counts(&report, 1), [6, 0, 0, 0, 1], "{report}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("read-only and not recorded"),
        "{}",
        text_of(&out)
    );
    let status = cli.ok(&["status", "--json"]).await;
    assert!(
        !String::from_utf8_lossy(&status.stdout).contains("reconcile"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
}
