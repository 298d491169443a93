//! Nothing lost when the state database stops taking writes: the daemon
//! fails the runs that cannot record, says so (`/healthz`, a gauge, one
//! ERROR line), recovers by itself once it can write again, and a restart
//! on the database it leaves behind adds nobody twice.
//!
//! The fault is real: on SQLite the daemon's file-size limit
//! (`RLIMIT_FSIZE`, set on the running process with `prlimit`) makes every
//! write to the database and its WAL fail as a full disk does; on
//! PostgreSQL (`CRM_EDM_SYNC_TEST_DB=postgres`) a deferred constraint
//! trigger makes every `COMMIT` that touches `runs` or `operations` fail.

use std::time::Duration;

use crate::common::daemon::{BIN, Daemon, metrics_text, sandbox};
use crate::common::{TestDb, applied_adds};
use sea_orm::{ConnectionTrait, Database};
use serde_json::json;

/// Makes the state database refuse writes, or lifts that.
async fn set_full(db: &TestDb, daemon: &Daemon, full: bool) {
    if db.url.starts_with("sqlite") {
        let pid = daemon.child.id().expect("running") as libc::pid_t;
        let limit = if full { 0 } else { libc::RLIM_INFINITY };
        let rlim = libc::rlimit {
            rlim_cur: limit,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: plain system call on a child process of ours.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &rlim, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
        return;
    }
    let conn = Database::connect(db.url.as_str()).await.unwrap();
    let sql = if full {
        "CREATE OR REPLACE FUNCTION ces_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'injected: could not extend file: No space left on device'; END $$;
         CREATE CONSTRAINT TRIGGER ces_full_runs AFTER INSERT OR UPDATE ON runs DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ces_full();
         CREATE CONSTRAINT TRIGGER ces_full_ops AFTER INSERT OR UPDATE ON operations DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ces_full();"
    } else {
        "DROP TRIGGER ces_full_runs ON runs; DROP TRIGGER ces_full_ops ON operations;"
    };
    conn.execute_unprepared(sql).await.unwrap();
    conn.close().await.unwrap();
}

async fn healthz(url: &str) -> (u16, serde_json::Value) {
    let r = crate::common::http_get(format!("{url}/healthz"))
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.bytes().await.unwrap_or_default();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

/// Waits up to `within` for `/healthz` to answer `status`.
async fn healthz_becomes(url: &str, status: u16, within: Duration) -> (u16, serde_json::Value) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let got = healthz(url).await;
        if got.0 == status || tokio::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Both jobs every second or two, on the test database.
fn write_config(
    dir: &std::path::Path,
    sb: &crm_edm_sync::sandbox::Sandbox,
    db: &TestDb,
) -> std::path::PathBuf {
    let text = crate::common::config_text(
        sb,
        &db.url,
        "schedule = \"* * * * * *\"",
        "[writeback]\nschedule = \"*/2 * * * * *\"\nlookback_days = 2\n[log]\nformat = \"json\"\nlevel = \"info\"\n[http]\nlisten = \"127.0.0.1:0\"\n[daemon]\nlock_poll_secs = 1\nshutdown_timeout_secs = 30\nlock_wait_secs = 2\n",
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn person(sb: &crm_edm_sync::sandbox::Sandbox, c: i64) {
    sb.crm
        .put_customer(c, json!({"name": format!("c{c}"), "type_id": 1}));
    sb.crm.put_linkman(
        c,
        c * 10,
        json!({"name": format!("n{c}"), "email": format!("p{c}@example.com")}),
    );
}

/// Waits up to 30 s for `done`.
async fn until(mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn count(url: &str, sql: &str) -> i64 {
    let state = Database::connect(url).await.unwrap();
    let n = state
        .query_one_raw(sea_orm::Statement::from_string(
            state.get_database_backend(),
            sql.to_string(),
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap();
    state.close().await.unwrap();
    n
}

#[tokio::test]
async fn a_state_database_that_stops_taking_writes_fails_runs_loudly_and_the_daemon_recovers_by_itself()
 {
    // Arrange: 30 people synced and 10 of them written back as having
    // opened a campaign, by a daemon running both jobs every second or two.
    let sb = sandbox().await;
    for c in 1..=30i64 {
        person(&sb, c);
    }
    sb.edm
        .put_campaign(crate::common::opened_today_by_p1_to(10));
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &sb, &db);
    let mut daemon = Daemon::start(&config, &[]);
    let url = daemon.ops_url().await;
    until(|| sb.crm.history().len() == 10 && sb.edm.emails(1).len() == 30).await;
    assert_eq!(
        healthz_becomes(&url, 200, Duration::from_secs(10)).await.0,
        200,
        "{}",
        daemon.log()
    );

    // Act 1: the database stops taking writes; meanwhile 20 people join
    // the CRM, 5 leave it, and 10 more open a second campaign.
    set_full(&db, &daemon, true).await;
    for c in 31..=50i64 {
        person(&sb, c);
    }
    for c in 1..=5i64 {
        sb.crm.remove_customer(c);
    }
    let mut second = crate::common::opened_today_by_p1_to(20);
    second.id = 2;
    second.name = "第二次".into();
    second.opens.drain(..10);
    sb.edm.put_campaign(second);
    let failed_before = daemon.count("run failed");
    daemon
        .expect("run failed", failed_before + 4, Duration::from_secs(30))
        .await;
    let (full_status, full_body) = healthz(&url).await;
    let full_metrics = metrics_text(&url).await;
    let held_while_full = sb.edm.emails(1);
    let history_while_full = sb.crm.history().len();

    // Act 2: room again.
    set_full(&db, &daemon, false).await;
    let (recovered_status, _) = healthz_becomes(&url, 200, Duration::from_secs(30)).await;
    until(|| sb.crm.history().len() >= 20 && sb.edm.emails(1).len() == 45).await;
    let recovered_metrics = metrics_text(&url).await;
    daemon.signal("-TERM");
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));

    // Act 3: a manual run of both jobs on the database the daemon left.
    let once = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("--once")
        .output()
        .await
        .unwrap();

    // Assert: while full, nothing was sent, and the daemon said why.
    let log = daemon.log();
    assert_eq!(
        held_while_full.len(),
        30,
        "a write was sent that was not recorded"
    );
    assert_eq!(
        history_while_full, 10,
        "a record was sent that was not recorded"
    );
    assert_eq!(full_status, 503, "{full_body}\n{log}");
    assert!(
        full_body["reason"]
            .as_str()
            .unwrap_or("")
            .contains("does not take writes"),
        "{full_body}"
    );
    assert_eq!(
        gauge(
            &full_metrics,
            r#"crm_edm_sync_state_db_writable{tenant="default"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        daemon.count("the state database does not take writes"),
        1,
        "one ERROR line for the change, not one per run:\n{log}"
    );
    // Recovered by itself, without a restart.
    assert_eq!(recovered_status, 200, "{log}");
    assert_eq!(daemon.count("the state database takes writes again"), 1);
    assert_eq!(
        gauge(
            &recovered_metrics,
            r#"crm_edm_sync_state_db_writable{tenant="default"}"#
        ),
        Some(1.0)
    );
    // After the restart: EDM exact, nobody added twice, the 5 own
    // unsubscribes known as the daemon's, each record written once.
    assert!(once.status.success(), "{once:?}");
    let mut want: Vec<String> = (6..=50).map(|c| format!("p{c}@example.com")).collect();
    want.sort();
    let mut held = sb.edm.emails(1);
    held.sort();
    assert_eq!(held, want, "{log}");
    let twice: Vec<_> = applied_adds(&sb)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(twice.is_empty(), "added twice: {twice:?}");
    let user_unsubscribes = count(
        &db.url,
        "SELECT COUNT(*) AS n FROM suppressions WHERE reason = 'user_unsubscribe'",
    )
    .await;
    assert_eq!(
        user_unsubscribes, 0,
        "an own unsubscribe was taken for a recipient's"
    );
    let history = sb.crm.history();
    let distinct: std::collections::BTreeSet<(i64, String)> = history
        .iter()
        .map(|r| (r.link_man_id, r.title.clone()))
        .collect();
    assert_eq!((history.len(), distinct.len()), (20, 20), "{history:?}");
    let running = count(
        &db.url,
        "SELECT COUNT(*) AS n FROM runs WHERE status = 'running'",
    )
    .await;
    assert_eq!(running, 0);
}

/// Makes every write that marks a contact-history record done fail, as a
/// full disk would, on either backend; `false` lifts it.
async fn fail_ledger_done(db: &TestDb, on: bool) {
    let conn = Database::connect(db.url.as_str()).await.unwrap();
    let sql = match (db.url.starts_with("sqlite"), on) {
        (true, true) => "CREATE TRIGGER ces_full_done BEFORE UPDATE ON writeback_ledger WHEN NEW.status = 'done' BEGIN SELECT RAISE(ROLLBACK, 'injected: database or disk is full'); END",
        (true, false) => "DROP TRIGGER ces_full_done",
        (false, true) => {
            "CREATE OR REPLACE FUNCTION ces_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'injected: could not extend file: No space left on device'; END $$;
             CREATE TRIGGER ces_full_done BEFORE UPDATE ON writeback_ledger FOR EACH ROW WHEN (NEW.status = 'done') EXECUTE FUNCTION ces_full();"
        }
        (false, false) => "DROP TRIGGER ces_full_done ON writeback_ledger",
    };
    conn.execute_unprepared(sql).await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn records_the_crm_confirmed_while_the_ledger_took_no_writes_are_not_sent_again() {
    // Arrange: 30 people who opened today's campaign; the ledger refuses
    // to record any of them done.
    let e = crate::common::env().await;
    for c in 1..=30i64 {
        e.sb.crm
            .put_customer(c, json!({"name": format!("公司{c}"), "type_id": 1}));
        e.sb.crm.put_linkman(
            c,
            c * 10,
            json!({"name": format!("人{c}"), "email": format!("p{c}@example.com")}),
        );
    }
    e.sync().await;
    e.sb.edm
        .put_campaign(crate::common::opened_today_by_p1_to(30));
    fail_ledger_done(&e.db, true).await;

    // Act
    let failed = crm_edm_sync::writeback::run(&e.ctx).await;
    let sent_while_failing = e.sb.crm.history().len();
    fail_ledger_done(&e.db, false).await;
    let next = crm_edm_sync::writeback::run(&e.ctx).await;

    // Assert: the failing run stopped loudly after the calls in flight;
    // the next one recorded what the CRM had confirmed and sent only the
    // rest: each record once.
    let err = format!("{:#}", failed.unwrap_err());
    assert!(err.contains("did not take the ledger's writes"), "{err}");
    assert!(sent_while_failing > 0);
    let next = next.unwrap();
    assert_eq!(next.counts.possibly_duplicated, 0, "{:?}", next.counts);
    assert_eq!(e.sb.crm.history().len(), 30);
    let mut people: Vec<i64> = e.sb.crm.history().iter().map(|r| r.link_man_id).collect();
    people.sort();
    people.dedup();
    assert_eq!(people.len(), 30);
    assert!(e.ctx.store.pending_records().await.unwrap().is_empty());
}
