//! The consent trail through the real binary: the scripted life of an
//! address (added, edited twice, routed to another list, unsubscribed by
//! its recipient, bounced), the reasons the daemon gives for its own
//! unsubscribes, and the range export as JSON lines and CSV.

use std::process::Output;

use serde_json::{Value, json};

use crate::common::binary::{self, text_of};
use crate::common::{TestDb, config_text, edm_today, seed_basic};
use crm_edm_sync::sandbox::{Sandbox, SandboxCampaign};
use crm_edm_sync::state::AuditRecord;

struct Cli {
    sb: Sandbox,
    _db: TestDb,
    dir: tempfile::TempDir,
}

impl Cli {
    /// Ten customers (6–10 routed to list 2), one link-man each, on `db`,
    /// no unsubscribe ratio, nothing run yet.
    async fn seeded(db: TestDb) -> Cli {
        let sb = Sandbox::start().await.unwrap();
        sb.edm.create_list(1, "客户");
        sb.edm.create_list(2, "VIP");
        seed_basic(&sb);
        let dir = tempfile::tempdir().unwrap();
        let text = config_text(
            &sb,
            &db.url,
            "max_unsubscribe_ratio = 1.0",
            "[log]\nformat = \"json\"\n",
        );
        std::fs::write(dir.path().join("config.toml"), text).unwrap();
        Cli { sb, _db: db, dir }
    }

    fn config(&self) -> std::path::PathBuf {
        self.dir.path().join("config.toml")
    }

    async fn run(&self, args: &[&str]) -> Output {
        binary::run(&self.config(), args).await
    }

    async fn ok(&self, args: &[&str]) -> Output {
        binary::ok(&self.config(), args).await
    }

    async fn contacts(&self) {
        self.ok(&["--once", "--job", "contacts"]).await;
    }

    /// `audit EMAIL --json`.
    async fn trail(&self, email: &str) -> Vec<AuditRecord> {
        let out = self.ok(&["audit", email, "--json"]).await;
        serde_json::from_slice(&out.stdout).expect("a JSON array")
    }
}

/// `(list_id, event, reason)` of each entry.
fn events(trail: &[AuditRecord]) -> Vec<(Option<i64>, String, Option<String>)> {
    trail
        .iter()
        .map(|r| (r.list_id, r.event.as_str().to_string(), r.reason.clone()))
        .collect()
}

fn entry(
    list: Option<i64>,
    event: &str,
    reason: Option<&str>,
) -> (Option<i64>, String, Option<String>) {
    (list, event.to_string(), reason.map(str::to_string))
}

/// A campaign to list 1 sent today in which `address` bounced hard.
fn bounced_in_list_1(address: &str) -> SandboxCampaign {
    SandboxCampaign {
        id: 7,
        name: "活动".into(),
        list_id: 1,
        date: edm_today().format("%Y-%m-%d").to_string(),
        send_status: 3,
        track_status: 1,
        bounces: vec![("not_exist".into(), address.into())],
        ..Default::default()
    }
}

/// lm1 (link-man 10 of customer 1) lives a whole life; lm2, lm3 and lm4
/// leave for each of the other reasons; returns the CLI after it.
async fn scripted_life(db: TestDb) -> Cli {
    let cli = Cli::seeded(db).await;
    let crm = &cli.sb.crm;
    cli.contacts().await;
    crm.set_linkman_field(10, "mobile", json!("13900000000"));
    cli.contacts().await;
    crm.set_linkman_field(10, "name", json!("改名"));
    cli.contacts().await;
    crm.set_customer_field(1, "type_id", json!(2));
    cli.contacts().await;
    cli.sb.edm.user_unsubscribe(2, "lm1@example.com");
    cli.contacts().await;
    cli.sb
        .edm
        .put_campaign(bounced_in_list_1("lm1@example.com"));
    cli.ok(&["--once", "--job", "writeback"]).await;
    crm.set_linkman_field(20, "email", json!("lm2-new@example.com"));
    crm.set_linkman_field(30, "email", json!("not an address"));
    crm.remove_linkman(40);
    cli.contacts().await;
    cli
}

#[tokio::test]
async fn the_trail_of_an_address_tells_its_whole_life_oldest_first() {
    for db in TestDb::all().await {
        // Arrange
        let cli = scripted_life(db).await;

        // Act
        let trail = cli.trail("lm1@example.com").await;

        // Assert
        assert_eq!(
            events(&trail),
            vec![
                entry(Some(1), "added", None),
                entry(Some(1), "edited", None),
                entry(Some(1), "edited", None),
                entry(Some(1), "unsubscribed", Some("rerouted")),
                entry(Some(2), "added", None),
                entry(Some(2), "recipient_unsubscribed", None),
                entry(None, "bounced", Some("not_exist")),
            ],
            "{trail:#?}"
        );
        let details: Vec<Option<&str>> = trail.iter().map(|r| r.detail.as_deref()).collect();
        assert_eq!(details[1], Some("var2"));
        assert_eq!(details[2], Some("fullname"));
        assert!(
            details[6].is_some_and(|d| d.contains("campaign 7")),
            "{details:?}"
        );
        let sources: Vec<&str> = trail.iter().map(|r| r.source.as_str()).collect();
        assert_eq!(sources, ["crm", "crm", "crm", "crm", "crm", "edm", "edm"]);
        for r in &trail {
            assert!(
                chrono::DateTime::parse_from_rfc3339(&r.at).is_ok(),
                "{}",
                r.at
            );
            assert!(r.run_id.is_some(), "{r:?}");
        }
        assert_eq!(trail[0].link_man_id, Some(10));
        assert_eq!(trail[0].customer_id, Some(1));
        assert_eq!(trail[3].link_man_id, Some(10));
        // The recipient's unsubscribe names the member's link-man too.
        assert_eq!(trail[5].link_man_id, Some(10));
        assert_eq!(trail[5].customer_id, Some(1));
        assert!(
            trail[5]
                .detail
                .as_deref()
                .is_some_and(|d| d.starts_with("unsubscribe-export 2026-")),
            "{:?}",
            trail[5].detail
        );
    }
}

#[tokio::test]
async fn the_daemon_says_why_it_unsubscribed_each_address() {
    // Arrange
    let cli = scripted_life(TestDb::new().await).await;

    // Act
    let lm2 = cli.trail("lm2@example.com").await;
    let lm3 = cli.trail("lm3@example.com").await;
    let lm4 = cli.trail("lm4@example.com").await;
    let new = cli.trail("lm2-new@example.com").await;

    // Assert
    for (trail, reason) in [
        (&lm2, "email_changed"),
        (&lm3, "email_lost"),
        (&lm4, "linkman_deleted"),
    ] {
        assert_eq!(
            events(trail),
            vec![
                entry(Some(1), "added", None),
                entry(Some(1), "unsubscribed", Some(reason))
            ],
            "{trail:#?}"
        );
    }
    assert_eq!(events(&new), vec![entry(Some(1), "added", None)]);
}

#[tokio::test]
async fn a_masked_address_from_the_logs_is_answered_for_every_address_it_may_be() {
    // Arrange
    let cli = Cli::seeded(TestDb::new().await).await;
    cli.contacts().await;

    // Act
    let trail = cli.trail("l***@example.com").await;
    let text = cli.ok(&["audit", "lm1@example.com"]).await;

    // Assert: every lmN address, each added once.
    assert_eq!(trail.len(), 10, "{trail:#?}");
    assert!(trail.iter().all(|r| r.event.as_str() == "added"));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("lm1@example.com  list 1  added"), "{text}");
    assert!(text.contains("link-man 10 customer 1  by crm"), "{text}");
}

#[tokio::test]
async fn the_range_export_round_trips_as_json_lines_and_as_csv() {
    // Arrange
    let cli = scripted_life(TestDb::new().await).await;
    let since = (chrono::Utc::now() - chrono::Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();

    // Act
    let jsonl = cli.ok(&["audit", "--since", &since]).await;
    let csv = cli
        .ok(&["audit", "--since", &since, "--format", "csv"])
        .await;
    let none = cli
        .ok(&[
            "audit",
            "--since",
            "2020-01-01",
            "--until",
            "2020-01-31",
            "--format",
            "csv",
        ])
        .await;

    // Assert
    let from_jsonl: Vec<AuditRecord> = String::from_utf8_lossy(&jsonl.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let mut reader = csv::Reader::from_reader(csv.stdout.as_slice());
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    let from_csv: Vec<AuditRecord> = reader
        .deserialize()
        .map(|r| r.expect("a CSV row"))
        .collect();
    assert_eq!(
        header,
        [
            "at",
            "email",
            "list_id",
            "event",
            "reason",
            "link_man_id",
            "customer_id",
            "source",
            "run_id",
            "detail"
        ]
    );
    // Ten first adds; lm1's six later entries; three unsubscribes and
    // lm2's new address.
    assert_eq!(from_jsonl.len(), 10 + 6 + 3 + 1);
    let blank = |mut r: AuditRecord| {
        r.reason = r.reason.filter(|s| !s.is_empty());
        r.detail = r.detail.filter(|s| !s.is_empty());
        r
    };
    let a: Vec<AuditRecord> = from_jsonl.into_iter().map(blank).collect();
    let b: Vec<AuditRecord> = from_csv.into_iter().map(blank).collect();
    assert_eq!(a, b);
    let line: Value = serde_json::from_str(
        String::from_utf8_lossy(&jsonl.stdout)
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    for field in [
        "at",
        "email",
        "list_id",
        "event",
        "reason",
        "link_man_id",
        "customer_id",
        "source",
        "run_id",
    ] {
        assert!(line.get(field).is_some(), "{field} missing: {line}");
    }
    assert_eq!(String::from_utf8_lossy(&none.stdout).lines().count(), 1);
}

#[tokio::test]
async fn a_bad_address_or_date_is_refused_naming_it() {
    // Arrange
    let cli = Cli::seeded(TestDb::new().await).await;
    cli.contacts().await;

    // Act
    let address = cli.run(&["audit", "secret-person.example.com"]).await;
    let since = cli.run(&["audit", "--since", "2026-13-01"]).await;
    let until = cli
        .run(&["audit", "--since", "2026-01-01", "--until", "soon"])
        .await;

    // Assert
    assert_eq!(address.status.code(), Some(2), "{}", text_of(&address));
    let said = text_of(&address);
    assert!(
        said.contains("s*** (no @)") || said.contains("s***"),
        "{said}"
    );
    assert!(!said.contains("secret-person"), "{said}");
    assert_eq!(since.status.code(), Some(2));
    assert!(text_of(&since).contains("--since"), "{}", text_of(&since));
    assert_eq!(until.status.code(), Some(2));
    assert!(text_of(&until).contains("--until"), "{}", text_of(&until));
}

fn in_forty_days() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() + chrono::Duration::days(40)
}

fn in_eleven_years() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() + chrono::Duration::days(4000)
}

#[tokio::test]
async fn the_trail_is_pruned_after_its_own_retention_and_kept_for_ever_at_zero() {
    // Arrange: ten added entries, now.
    let e = crate::common::env().await;
    seed_basic(&e.sb);
    e.sync().await;
    let everyone: Vec<String> = crate::common::emails(1..=10);
    let for_ever = e
        .ctx_from(|s| s.database.audit_retention_days = 0)
        .await
        .with_clock(in_eleven_years);
    let thirty_days = e
        .ctx_from(|s| {
            s.database.audit_retention_days = 30;
            s.database.retention_days = 3650;
        })
        .await
        .with_clock(in_forty_days);

    // Act
    crm_edm_sync::sync::contacts::run(&for_ever, Default::default())
        .await
        .unwrap();
    let kept = e.ctx.store.audit_of(&everyone).await.unwrap();
    crm_edm_sync::sync::contacts::run(&thirty_days, Default::default())
        .await
        .unwrap();
    let left = e.ctx.store.audit_of(&everyone).await.unwrap();

    // Assert
    assert_eq!(kept.len(), 10);
    assert!(left.is_empty(), "{left:#?}");
}

/// `(list_id, event, reason)` of the entries of `email`, read directly.
async fn entries_of(
    ctx: &crm_edm_sync::jobs::Context,
    email: &str,
) -> Vec<(Option<i64>, String, Option<String>)> {
    events(&ctx.store.audit_of(&[email.to_string()]).await.unwrap())
}

#[tokio::test]
async fn an_unsubscribe_an_earlier_run_left_pending_enters_the_trail_with_its_reason_when_found_done()
 {
    // Arrange: lm1's link-man gets another email; the unsubscribe's answer
    // is lost and, without retries, left pending.
    let e = crate::common::env().await;
    seed_basic(&e.sb);
    e.sync().await;
    e.sb.crm
        .set_linkman_field(10, "email", json!("lm1-new@example.com"));
    let no_retry = e
        .ctx_from(|s| {
            s.edm.max_retries = 0;
            s.sync.max_unsubscribe_ratio = 1.0;
        })
        .await;
    e.sb.inject("ml-unsub", crm_edm_sync::sandbox::Fault::LoseAnswer, 1);
    crm_edm_sync::sync::contacts::run(&no_retry, Default::default())
        .await
        .unwrap();
    let before = entries_of(&e.ctx, "lm1@example.com").await;

    // Act
    let report = e.sync().await;

    // Assert
    assert_eq!(report.counts.recovered, 1);
    assert_eq!(before, vec![entry(Some(1), "added", None)]);
    assert_eq!(
        entries_of(&e.ctx, "lm1@example.com").await,
        vec![
            entry(Some(1), "added", None),
            entry(Some(1), "unsubscribed", Some("email_changed")),
        ]
    );
}

#[tokio::test]
async fn a_run_forced_past_the_ratio_enters_each_unsubscribe_as_forced_first() {
    // Arrange: three of list 1's five link-men deleted (0.6 > 0.2).
    let e = crate::common::env().await;
    seed_basic(&e.sb);
    e.sync().await;
    for lm in [10, 20, 30] {
        e.sb.crm.remove_linkman(lm);
    }

    // Act
    let report = e
        .run(crm_edm_sync::jobs::RunOptions {
            force: true,
            ..Default::default()
        })
        .await;

    // Assert
    assert_eq!(report.counts.unsubscribed, 3);
    let trail = e
        .ctx
        .store
        .audit_of(&["lm2@example.com".to_string()])
        .await
        .unwrap();
    assert_eq!(
        events(&trail),
        vec![
            entry(Some(1), "added", None),
            entry(Some(1), "forced", Some("linkman_deleted")),
            entry(Some(1), "unsubscribed", Some("linkman_deleted")),
        ]
    );
    assert_eq!(trail[1].source.as_str(), "operator");
    assert!(
        trail[1]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("max_unsubscribe_ratio")),
        "{:?}",
        trail[1].detail
    );
}

#[tokio::test]
async fn a_parked_operation_and_its_retry_enter_the_trail() {
    // Arrange: EDM refuses lm1's add; one attempt parks it.
    let e = crate::common::env().await;
    seed_basic(&e.sb);
    e.sb.edm
        .refuse_address("lm1@example.com", "add_address_error", "地址被拒绝");
    let once = e.ctx_from(|s| s.edm.max_attempts = 1).await;
    crm_edm_sync::sync::contacts::run(&once, Default::default())
        .await
        .unwrap();
    e.sb.edm.accept_address("lm1@example.com");

    // Act
    crm_edm_sync::sync::contacts::run(
        &once,
        crm_edm_sync::jobs::RunOptions {
            retry_parked: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();

    // Assert
    let trail = e
        .ctx
        .store
        .audit_of(&["lm1@example.com".to_string()])
        .await
        .unwrap();
    assert_eq!(
        events(&trail),
        vec![
            entry(Some(1), "parked", Some("add")),
            entry(Some(1), "retried", Some("add")),
            entry(Some(1), "added", None),
        ]
    );
    assert_eq!(trail[0].source.as_str(), "edm");
    assert!(
        trail[0]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("add_address_error")),
        "{:?}",
        trail[0].detail
    );
    assert_eq!(trail[1].source.as_str(), "operator");
}

/// Every byte of the state database as a dump: the SQLite file and its
/// write-ahead log, or `pg_dump` of the PostgreSQL database.
fn database_bytes(url: &str) -> Vec<u8> {
    if url.starts_with("postgres") {
        let out = std::process::Command::new("pg_dump")
            .args(["--data-only", "--dbname", url])
            .output()
            .expect("pg_dump runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return out.stdout;
    }
    let path = url
        .trim_start_matches("sqlite://")
        .split('?')
        .next()
        .unwrap()
        .to_string();
    let mut bytes = std::fs::read(&path).unwrap();
    if let Ok(wal) = std::fs::read(format!("{path}-wal")) {
        bytes.extend(wal);
    }
    bytes
}

fn holds(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn a_forgotten_address_is_in_no_table_no_dump_and_no_output_and_is_never_added_again() {
    for db in TestDb::all().await {
        // Arrange: lm1 added, opened a campaign (a contact-history record
        // quotes it), and is explained once.
        let url = db.url.clone();
        let cli = Cli::seeded(db).await;
        cli.contacts().await;
        let mut campaign = bounced_in_list_1("nobody@example.com");
        campaign.opens = vec![("lm1@example.com".into(), 1, String::new(), String::new())];
        cli.sb.edm.put_campaign(campaign);
        cli.ok(&["--once", "--job", "writeback"]).await;
        assert!(holds(&database_bytes(&url), "lm1@example.com"));

        // Act
        let dry = cli.ok(&["forget", "lm1@example.com", "--dry-run"]).await;
        let still_there = cli
            .sb
            .edm
            .emails(1)
            .contains(&"lm1@example.com".to_string());
        let forgot = cli.ok(&["forget", "lm1@example.com"]).await;
        let after_forget = cli.sb.edm.emails(1);
        let rerun = cli.ok(&["--once", "--job", "contacts"]).await;
        let explain = cli.ok(&["explain", "lm1@example.com"]).await;
        let trail = cli.trail("lm1@example.com").await;
        let status = cli.ok(&["status"]).await;

        // Assert: the dry run changed nothing.
        assert!(String::from_utf8_lossy(&dry.stdout).contains("would be unsubscribed from list 1"));
        assert!(still_there);
        // Forgotten: unsubscribed, and the next run does not add it back.
        assert!(!after_forget.contains(&"lm1@example.com".to_string()));
        assert!(
            !cli.sb
                .edm
                .emails(1)
                .contains(&"lm1@example.com".to_string())
        );
        let finished: Value = String::from_utf8_lossy(&rerun.stderr)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["message"] == "run finished")
            .expect("a run finished line");
        assert_eq!(finished["forgotten"], 1, "{finished}");
        assert_eq!(finished["added"], 0, "{finished}");
        // Explain and audit say so.
        assert!(
            String::from_utf8_lossy(&explain.stdout).contains("forgotten at "),
            "{}",
            text_of(&explain)
        );
        let events: Vec<&str> = trail.iter().map(|r| r.event.as_str()).collect();
        assert!(
            events.ends_with(&["unsubscribed", "forgotten"]),
            "{events:?}"
        );
        assert_eq!(trail[trail.len() - 2].reason.as_deref(), Some("forget"));
        // The address is nowhere: not in the database's bytes, not in any
        // output since (`explain` prints back only what the operator
        // typed).
        let bytes = database_bytes(&url);
        assert!(
            !holds(&bytes, "lm1@example.com"),
            "{url}: the address is still stored"
        );
        assert!(holds(&bytes, "lm2@example.com"), "{url}: the dump is empty");
        for out in [&forgot, &rerun, &status] {
            assert!(
                !text_of(out).contains("lm1@example.com"),
                "{}",
                text_of(out)
            );
        }
        assert!(trail.iter().all(|r| r.email != "lm1@example.com"));
    }
}

#[tokio::test]
async fn a_forgotten_address_put_back_in_edm_is_reported_reactivated() {
    // Arrange
    let cli = Cli::seeded(TestDb::new().await).await;
    cli.contacts().await;
    cli.ok(&["forget", "lm1@example.com"]).await;
    cli.sb.edm.reactivate(1, "lm1@example.com", "联系人1");

    // Act
    let out = cli.ok(&["reconcile", "--json"]).await;

    // Assert
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["lists"][0]["list_id"], 1, "{report}");
    assert_eq!(report["lists"][0]["reactivated"], 1, "{report}");
}

#[tokio::test]
async fn forget_keeps_adopted_lists_unless_asked_and_refuses_a_bad_address() {
    // Arrange: lm1 was in list 1 before the daemon (adopted).
    let cli = Cli::seeded(TestDb::new().await).await;
    cli.sb.edm.add_existing(1, "lm1@example.com", "联系人1");
    cli.contacts().await;

    // Act
    let kept = cli.ok(&["forget", "lm1@example.com", "--dry-run"]).await;
    let asked = cli
        .ok(&[
            "forget",
            "lm1@example.com",
            "--dry-run",
            "--include-adopted",
        ])
        .await;
    let bad = cli.run(&["forget", "someone.example.com"]).await;

    // Assert
    let kept = String::from_utf8_lossy(&kept.stdout);
    assert!(kept.contains("in no list the daemon added it to"), "{kept}");
    assert!(kept.contains("adopted in list 1"), "{kept}");
    assert!(String::from_utf8_lossy(&asked.stdout).contains("would be unsubscribed from list 1"));
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        !text_of(&bad).contains("someone.example.com"),
        "{}",
        text_of(&bad)
    );
}

#[tokio::test]
async fn a_forget_whose_unsubscribe_fails_hashes_nothing_and_a_second_one_completes_it() {
    // Arrange: EDM answers the first `ml-unsub` with an error page and
    // does not carry it out.
    let db = TestDb::new().await;
    let url = db.url.clone();
    let cli = Cli::seeded(db).await;
    cli.contacts().await;
    cli.sb
        .inject("ml-unsub", crm_edm_sync::sandbox::Fault::Status(500), 1);

    // Act
    let failed = cli.run(&["forget", "lm1@example.com"]).await;
    let kept = holds(&database_bytes(&url), "lm1@example.com");
    let again = cli.run(&["forget", "lm1@example.com"]).await;

    // Assert
    assert_eq!(failed.status.code(), Some(1), "{}", text_of(&failed));
    assert!(
        text_of(&failed).contains("nothing was hashed"),
        "{}",
        text_of(&failed)
    );
    assert!(kept, "the address was hashed although EDM still holds it");
    assert!(again.status.success(), "{}", text_of(&again));
    assert!(
        !cli.sb
            .edm
            .emails(1)
            .contains(&"lm1@example.com".to_string())
    );
    assert!(!holds(&database_bytes(&url), "lm1@example.com"));
}

#[tokio::test]
async fn an_address_found_in_a_list_and_wanted_is_entered_as_adopted() {
    // Arrange: lm1 was in list 1 before the first sync.
    let cli = Cli::seeded(TestDb::new().await).await;
    cli.sb.edm.add_existing(1, "lm1@example.com", "联系人1");

    // Act
    cli.contacts().await;

    // Assert: adopted, then its vars set to the CRM's.
    let trail = cli.trail("lm1@example.com").await;
    assert_eq!(
        events(&trail),
        vec![
            entry(Some(1), "adopted", None),
            entry(Some(1), "edited", None)
        ],
        "{trail:#?}"
    );
    assert_eq!(trail[0].link_man_id, Some(10));
    assert_eq!(trail[0].source.as_str(), "crm");
}

#[tokio::test]
async fn forget_beside_a_running_daemon_changes_nothing_and_says_why() {
    // Arrange: an idle daemon holds the state database.
    let db = TestDb::new().await;
    let url = db.url.clone();
    let cli = Cli::seeded(db).await;
    cli.contacts().await;
    let daemon_config = cli.dir.path().join("daemon.toml");
    std::fs::write(
        &daemon_config,
        config_text(
            &cli.sb,
            &url,
            "schedule = \"0 0 0 1 1 *\"",
            "[writeback]\nschedule = \"0 0 0 1 1 *\"\n[reconcile]\nschedule = \"\"\n[log]\nformat = \"json\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
        ),
    )
    .unwrap();
    let mut daemon = crate::common::daemon::Daemon::start(&daemon_config, &[]);
    daemon.ops_url().await;

    // Act
    let out = cli.run(&["forget", "lm1@example.com"]).await;
    daemon.signal("-TERM");
    assert_eq!(
        daemon.exit_code(std::time::Duration::from_secs(30)).await,
        Some(0)
    );

    // Assert
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(
        text_of(&out).contains("nothing was changed"),
        "{}",
        text_of(&out)
    );
    assert!(
        cli.sb
            .edm
            .emails(1)
            .contains(&"lm1@example.com".to_string())
    );
    assert!(holds(&database_bytes(&url), "lm1@example.com"));
}
