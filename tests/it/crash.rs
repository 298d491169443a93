//! Crash safety (rule 9): the real binary is killed with SIGKILL in
//! the middle of applying a large plan, several times at different points;
//! a rerun always ends with the EDM lists exactly as desired, no address
//! added twice, and nothing left pending. The same for the write-back
//! ledger: no ContactHistory record written twice outside the logged
//! window.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::{TestDb, applied_adds, config_text};
use crm_edm_sync::sandbox::{Fault, Sandbox};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_crm-edm-sync");

struct Setup {
    sb: Sandbox,
    _db: TestDb,
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

async fn setup() -> Setup {
    let sb = Sandbox::start().await.unwrap();
    sb.edm.create_list(1, "客户");
    sb.edm.create_list(2, "VIP");
    for c in 1..=300i64 {
        sb.crm.put_customer(
            c,
            json!({"name": format!("公司{c}"), "type_id": if c % 3 == 0 { 2 } else { 1 }}),
        );
        sb.crm.put_linkman(
            c,
            c * 10,
            json!({"name": format!("人{c}"), "email": format!("p{c}@example.com")}),
        );
    }
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        config_text(
            &sb,
            &db.url,
            "",
            "[log]\nformat = \"json\"\n[writeback]\nlookback_days = 2\n",
        ),
    )
    .unwrap();
    Setup {
        sb,
        _db: db,
        _dir: dir,
        config,
    }
}

impl Setup {
    fn command(&self, job: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.arg("--config")
            .arg(&self.config)
            .args(["--once", "--job", job])
            .env_remove("RUST_LOG")
            .env("CRM_EDM_SYNC__EDM__BATCH_SIZE", "10")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Starts `job`, waits until `reached` says so, then SIGKILLs it.
    async fn kill_when(&self, job: &str, reached: impl Fn(&Sandbox) -> bool) -> String {
        let mut child = self.command(job).spawn().unwrap();
        // Drain stderr while it runs: a full pipe would block the child.
        let mut stderr = child.stderr.take().unwrap();
        let reader = tokio::spawn(async move {
            let mut text = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
            text
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !reached(&self.sb) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let pid = child.id().unwrap().to_string();
        std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap();
        let status = child.wait().await.unwrap();
        let log = reader.await.unwrap();
        assert!(
            reached(&self.sb),
            "the kill point was never reached:\n{log}"
        );
        assert_eq!(status.code(), None, "killed by a signal:\n{log}");
        log
    }

    async fn run_to_end(&self, job: &str) -> String {
        let out = tokio::time::timeout(Duration::from_secs(120), self.command(job).output())
            .await
            .expect("finishes")
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        stderr
    }

    fn applied(&self, operation: &str) -> usize {
        applied(&self.sb, operation)
    }

    /// What `status --json` says.
    async fn status_json(&self) -> serde_json::Value {
        let out = tokio::process::Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .args(["status", "--json"])
            .output()
            .await
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// Requests of `operation` that took effect.
fn applied(sb: &Sandbox, operation: &str) -> usize {
    sb.requests()
        .iter()
        .filter(|r| r.operation == operation && r.applied)
        .count()
}

fn want(filter: impl Fn(i64) -> bool) -> Vec<String> {
    let mut v: Vec<String> = (1..=300)
        .filter(|c| filter(*c))
        .map(|c| format!("p{c}@example.com"))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn sigkill_anywhere_in_a_large_sync_is_repaired_by_the_next_run() {
    let s = setup().await;
    // Slow enough that every kill lands in a different place.
    s.sb.inject(
        "ml-addr-add",
        Fault::Delay(Duration::from_millis(60)),
        10_000,
    );
    s.sb.inject("ml-unsub", Fault::Delay(Duration::from_millis(60)), 10_000);
    s.sb.inject(
        "ml-addr-edit",
        Fault::Delay(Duration::from_millis(15)),
        10_000,
    );
    s.sb.inject(
        "LinkMan/GetLinkManList",
        Fault::Delay(Duration::from_millis(5)),
        60,
    );

    // During the pull, then after 3, 11 and 21 of the 30 add batches.
    s.kill_when("contacts", |sb| sb.count("LinkMan/GetLinkManList") >= 40)
        .await;
    assert_eq!(s.applied("ml-addr-add"), 0);
    for batches in [3, 11, 21] {
        let before = s.applied("ml-addr-add");
        s.kill_when("contacts", |sb| {
            applied(sb, "ml-addr-add") >= before.max(batches)
        })
        .await;
    }
    s.run_to_end("contacts").await;

    assert_eq!(s.sb.edm.emails(1), want(|c| c % 3 != 0));
    assert_eq!(s.sb.edm.emails(2), want(|c| c % 3 == 0));
    let adds = applied_adds(&s.sb);
    assert_eq!(adds.len(), 300);
    assert!(adds.values().all(|&n| n == 1), "an address was added twice");

    // Edits and unsubscribes killed midway are repaired too.
    for c in 1..=40i64 {
        s.sb.crm
            .set_linkman_field(c * 10, "name", json!(format!("改名{c}")));
    }
    for c in 281..=300i64 {
        s.sb.crm.remove_linkman(c * 10);
    }
    let edits_before = s.applied("ml-addr-edit");
    s.kill_when("contacts", |sb| {
        applied(sb, "ml-addr-edit") >= edits_before + 10
    })
    .await;
    s.run_to_end("contacts").await;

    assert_eq!(s.sb.edm.emails(1), want(|c| c % 3 != 0 && c <= 280));
    assert_eq!(s.sb.edm.emails(2), want(|c| c % 3 == 0 && c <= 280));
    for a in
        s.sb.edm
            .addresses(1)
            .into_iter()
            .chain(s.sb.edm.addresses(2))
    {
        let c: i64 = a
            .address
            .trim_start_matches('p')
            .trim_end_matches("@example.com")
            .parse()
            .unwrap();
        let expected = if c <= 40 {
            format!("改名{c}")
        } else {
            format!("人{c}")
        };
        assert_eq!(a.fullname, expected, "{}", a.address);
    }
    assert!(applied_adds(&s.sb).values().all(|&n| n == 1));
    let v = s.status_json().await;
    assert_eq!(v["pending_operations"]["total"], 0, "{v}");
}

#[tokio::test]
async fn sigkill_during_write_back_duplicates_no_record_outside_the_logged_window() {
    let s = setup().await;
    s.run_to_end("contacts").await;
    s.sb.edm
        .put_campaign(crate::common::opened_today_by_p1_to(300));
    s.sb.inject(
        "ContactHistory/Add",
        Fault::Delay(Duration::from_millis(25)),
        100_000,
    );

    let mut logs = Vec::new();
    for written in [40usize, 150] {
        logs.push(
            s.kill_when("writeback", |sb| sb.crm.history().len() >= written)
                .await,
        );
    }
    logs.push(s.run_to_end("writeback").await);
    logs.push(s.run_to_end("writeback").await);

    let history = s.sb.crm.history();
    let mut per_linkman: BTreeMap<i64, usize> = BTreeMap::new();
    for r in &history {
        *per_linkman.entry(r.link_man_id).or_insert(0) += 1;
    }
    assert_eq!(per_linkman.len(), 300, "every link-man got its record");
    // Every record written twice was announced by a warn line naming its
    // link-man when it was sent again.
    let warned: Vec<i64> = logs
        .iter()
        .flat_map(|l| l.lines())
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["level"] == "WARN"
                && v["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("may already be in the CRM")
        })
        .filter_map(|v| v["link_man_id"].as_i64())
        .collect();
    for (link_man, n) in &per_linkman {
        assert!(*n <= 2, "link-man {link_man} has {n} records");
        if *n == 2 {
            assert!(
                warned.contains(link_man),
                "duplicate for {link_man} was not logged"
            );
        }
    }
    // The window at each kill: the calls in flight (crm.concurrency, 4)
    // plus the answers not yet recorded done, which hold back new calls
    // past two windows (send_all) — 3 × 4 per kill, two kills. On an idle
    // machine it is about one window per kill; under load (a parallel
    // build) the recording lags and more answers wait.
    let duplicates = per_linkman.values().filter(|&&n| n == 2).count();
    assert!(duplicates <= 2 * 3 * 4, "{duplicates} duplicates");
}

/// Kills while `ml-unsub` batches are out — link-men deleted, then
/// link-men whose email changed (an unsubscribe of the old address and an
/// add of the new) — and checks that the very next run ends exact. On
/// PostgreSQL that run used to fail: the export line and the pending
/// operation both said the member left, and one upsert met its key twice.
#[tokio::test]
async fn sigkill_during_unsubscribes_and_email_changes_is_repaired_by_the_next_run() {
    // Arrange: 300 members synced, every write slow enough to be caught.
    let s = setup().await;
    s.run_to_end("contacts").await;
    // Each write takes effect at once and is answered 300 ms later, so a
    // kill leaves a batch done in EDM and pending in the state DB.
    for op in ["ml-addr-add", "ml-unsub"] {
        s.sb.inject(op, Fault::SlowAnswer(Duration::from_millis(300)), 10_000);
    }

    // Act 1: 50 link-men leave; killed after two of five unsubscribe
    // batches took effect.
    for c in 251..=300i64 {
        s.sb.crm.remove_linkman(c * 10);
    }
    let before = s.applied("ml-unsub");
    s.kill_when("contacts", |sb| applied(sb, "ml-unsub") >= before + 2)
        .await;
    let log = s.run_to_end("contacts").await;

    // Assert 1: that next run ended exact.
    assert_eq!(
        s.sb.edm.emails(1),
        want(|c| c % 3 != 0 && c <= 250),
        "{log}"
    );
    assert_eq!(s.sb.edm.emails(2), want(|c| c % 3 == 0 && c <= 250));

    // Act 2: 30 link-men change their email; killed after one unsubscribe
    // batch of the old addresses took effect, then, in the run after it,
    // after one add batch of the new addresses took effect.
    for c in 1..=30i64 {
        s.sb.crm
            .set_linkman_field(c * 10, "email", json!(format!("new{c}@example.com")));
    }
    for operation in ["ml-unsub", "ml-addr-add"] {
        let before = s.applied(operation);
        s.kill_when("contacts", |sb| applied(sb, operation) > before)
            .await;
    }
    let log = s.run_to_end("contacts").await;

    // Assert 2: the old addresses are gone, the new ones in, once each.
    let mut want1 = want(|c| c % 3 != 0 && (31..=250).contains(&c));
    want1.extend(
        (1..=30)
            .filter(|c| c % 3 != 0)
            .map(|c| format!("new{c}@example.com")),
    );
    want1.sort();
    let mut want2 = want(|c| c % 3 == 0 && (31..=250).contains(&c));
    want2.extend(
        (1..=30)
            .filter(|c| c % 3 == 0)
            .map(|c| format!("new{c}@example.com")),
    );
    want2.sort();
    assert_eq!(s.sb.edm.emails(1), want1, "{log}");
    assert_eq!(s.sb.edm.emails(2), want2);
    assert!(
        applied_adds(&s.sb).values().all(|&n| n == 1),
        "an address was added twice"
    );
    let v = s.status_json().await;
    assert_eq!(v["pending_operations"]["total"], 0, "{v}");
    // The killed runs are not shown running for ever.
    let statuses: Vec<&str> = v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert!(!statuses.contains(&"running"), "{v}");
    assert_eq!(
        statuses.iter().filter(|s| **s == "abandoned").count(),
        3,
        "{v}"
    );
}
