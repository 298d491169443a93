//! The real binary in daemon mode: graceful shutdown, one active instance
//! per database, the ops endpoints.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::daemon::{BIN, Daemon, metrics_text, sandbox, write_config};
use crate::common::{TestDb, config_text, seed_basic};
use crm_edm_sync::sandbox::Fault;
use serde_json::json;

/// A sandbox with 60 link-men for list 1, whose adds take 300 ms each.
async fn sixty_linkmen_with_slow_adds() -> crm_edm_sync::sandbox::Sandbox {
    let sb = sandbox().await;
    for c in 1..=60i64 {
        sb.crm
            .put_customer(c, json!({"name": format!("c{c}"), "type_id": 1}));
        sb.crm.put_linkman(
            c,
            c * 10,
            json!({"name": format!("n{c}"), "email": format!("p{c}@example.com")}),
        );
    }
    sb.inject(
        "ml-addr-add",
        Fault::Delay(Duration::from_millis(300)),
        1000,
    );
    sb
}

#[tokio::test]
async fn sigterm_during_a_run_exits_zero_and_the_next_run_completes_the_pending_work() {
    // Arrange: 60 link-men in list 1, adds in batches of 5, each batch slow.
    let sb = sixty_linkmen_with_slow_adds().await;
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &sb, &db);
    let mut daemon = Daemon::start(&config, &[("CRM_EDM_SYNC__EDM__BATCH_SIZE", "5")]);

    // Act: stop it once the adds are under way.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sb.count("ml-addr-add") < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        sb.count("ml-addr-add") >= 2,
        "the adds never got under way:\n{}",
        daemon.log()
    );
    daemon.signal("-TERM");
    let code = daemon.exit_code(Duration::from_secs(30)).await;

    // Assert: a clean exit that stopped between batches.
    assert_eq!(code, Some(0), "{}", daemon.log());
    daemon
        .expect("stop requested", 1, Duration::from_secs(5))
        .await;
    let sent = sb.count("ml-addr-add");
    assert!(
        sent < 12,
        "the run should have stopped early, sent {sent} batches"
    );
    let held = sb.edm.emails(1);
    assert!(held.len() < 60);

    // The next run completes it: exactly the desired members, no duplicate.
    sb.clear_faults();
    let out = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["--once", "--job", "contacts"])
        .env("CRM_EDM_SYNC__EDM__BATCH_SIZE", "5")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut expected: Vec<String> = (1..=60).map(|c| format!("p{c}@example.com")).collect();
    expected.sort();
    assert_eq!(sb.edm.emails(1), expected);
}

async fn only_one_of_two_daemons_runs_jobs_and_the_other_takes_over(db: TestDb) {
    let sb = sandbox().await;
    seed_basic(&sb);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &sb, &db);

    let first = Daemon::start(&config, &[]);
    first
        .expect("holding the instance lock", 1, Duration::from_secs(20))
        .await;
    let mut second = Daemon::start(&config, &[]);
    second
        .expect("standing by", 1, Duration::from_secs(20))
        .await;
    first
        .expect("run finished", 3, Duration::from_secs(20))
        .await;
    assert_eq!(
        second.count("run finished"),
        0,
        "the standby ran a job:\n{}",
        second.log()
    );
    assert_eq!(second.count("holding the instance lock"), 0);

    // The active one dies without a word.
    first.signal("-KILL");

    second
        .expect("holding the instance lock", 1, Duration::from_secs(10))
        .await;
    second
        .expect("run finished", 1, Duration::from_secs(10))
        .await;
    assert_eq!(
        sb.edm.emails(1).len(),
        5,
        "no duplicate after the take-over"
    );
    second.signal("-TERM");
    assert_eq!(second.exit_code(Duration::from_secs(30)).await, Some(0));
}

#[tokio::test]
async fn two_daemons_on_one_postgresql_database_only_one_runs_jobs_the_other_takes_over() {
    let Some(db) = TestDb::postgres().await else {
        return crate::common::skipped_without_postgres("two daemons on PostgreSQL");
    };
    only_one_of_two_daemons_runs_jobs_and_the_other_takes_over(db).await;
}

#[tokio::test]
async fn two_daemons_on_one_sqlite_file_only_one_runs_jobs_the_other_takes_over() {
    only_one_of_two_daemons_runs_jobs_and_the_other_takes_over(TestDb::sqlite()).await;
}

/// An HA pair booting together on a fresh database: both migrate at the
/// same moment, both come up, one active and one standing by (the
/// migrations run under a migration lock). Three fresh databases, so the
/// two really race to create the tables.
async fn two_daemons_started_at_once_on_a_fresh_database_both_come_up(postgres: bool) {
    for _ in 0..3 {
        // Arrange
        let db = if postgres {
            let Some(db) = TestDb::postgres().await else {
                return crate::common::skipped_without_postgres(
                    "two daemons booting on PostgreSQL",
                );
            };
            db
        } else {
            TestDb::sqlite()
        };
        let sb = sandbox().await;
        seed_basic(&sb);
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &sb, &db);

        // Act: both at once; wait until one holds the lock and the other
        // stands by, or either exits (at most 30 s).
        let mut a = Daemon::start(&config, &[]);
        let mut b = Daemon::start(&config, &[]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let up = |a: &Daemon, b: &Daemon| {
            a.count("holding the instance lock") + b.count("holding the instance lock") >= 1
                && a.count("standing by") + b.count("standing by") >= 1
        };
        let mut exits = (None, None);
        while tokio::time::Instant::now() < deadline && !up(&a, &b) {
            exits = (a.child.try_wait().unwrap(), b.child.try_wait().unwrap());
            if exits.0.is_some() || exits.1.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Assert
        let logs = format!("first:\n{}\nsecond:\n{}", a.log(), b.log());
        assert_eq!(exits, (None, None), "an instance exited: {logs}");
        assert!(up(&a, &b), "not one active and one standby: {logs}");
        assert_eq!(
            a.count("holding the instance lock") + b.count("holding the instance lock"),
            1,
            "{logs}"
        );
        assert!(!logs.contains("already exists"), "{logs}");
        a.signal("-TERM");
        b.signal("-TERM");
        assert_eq!(
            a.exit_code(Duration::from_secs(30)).await,
            Some(0),
            "{logs}"
        );
        assert_eq!(
            b.exit_code(Duration::from_secs(30)).await,
            Some(0),
            "{logs}"
        );
    }
}

#[tokio::test]
async fn two_daemons_started_at_once_on_a_fresh_postgresql_database_both_come_up() {
    two_daemons_started_at_once_on_a_fresh_database_both_come_up(true).await;
}

#[tokio::test]
async fn two_daemons_started_at_once_on_a_fresh_sqlite_file_both_come_up() {
    two_daemons_started_at_once_on_a_fresh_database_both_come_up(false).await;
}

/// Runs the binary with `config` and `args`, within a minute.
async fn once(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG");
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("--once finished in time")
        .unwrap()
}

fn all_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A daemon whose schedules fire only on 1 January, holding the lock.
async fn idle_daemon(
    sb: &crm_edm_sync::sandbox::Sandbox,
    db: &TestDb,
    dir: &std::path::Path,
) -> (Daemon, std::path::PathBuf) {
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        config_with(sb, db, "0 0 0 1 1 *", "0 0 0 1 1 *", ""),
    )
    .unwrap();
    let daemon = Daemon::start(&config, &[]);
    daemon
        .expect("holding the instance lock", 1, Duration::from_secs(20))
        .await;
    (daemon, config)
}

#[tokio::test]
async fn once_beside_an_active_daemon_is_run_by_the_daemon_and_answered_here() {
    // Arrange: an idle active daemon; ten link-men not yet in EDM.
    let sb = sandbox().await;
    seed_basic(&sb);
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, config) = idle_daemon(&sb, &db, dir.path()).await;

    // Act
    let out = once(&config, &["--once", "--job", "contacts"]).await;

    // Assert: the daemon ran it (its log has the run), EDM holds the
    // link-men, and --once exits 0 as if it had run itself.
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        all_text(&out),
        daemon.log()
    );
    assert!(
        all_text(&out).contains("asked it to run this next"),
        "{}",
        all_text(&out)
    );
    daemon
        .expect("running a --once request next", 1, Duration::from_secs(5))
        .await;
    let finished = daemon.find("run finished").expect("the daemon's run");
    assert_eq!(finished["job"], "contacts", "{finished}");
    assert_eq!(finished["status"], "succeeded", "{finished}");
    assert_eq!(sb.edm.addresses(1).len() + sb.edm.addresses(2).len(), 10);
    daemon.signal("-TERM");
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));
}

#[tokio::test]
async fn a_refused_plan_run_by_the_daemon_is_printed_here_and_force_applies_it() {
    // Arrange: ten members synced, then the CRM loses five of them: a
    // plan over the 20 % unsubscribe limit.
    let sb = sandbox().await;
    seed_basic(&sb);
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, config) = idle_daemon(&sb, &db, dir.path()).await;
    let first = once(&config, &["--once", "--job", "contacts"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", all_text(&first));
    for c in 1..=5 {
        sb.crm.remove_customer(c);
    }

    let held =
        |sb: &crm_edm_sync::sandbox::Sandbox| sb.edm.addresses(1).len() + sb.edm.addresses(2).len();

    // Act
    let refused = once(&config, &["--once", "--job", "contacts"]).await;
    let held_after_refusal = held(&sb);
    let forced = once(&config, &["--once", "--job", "contacts", "--force"]).await;

    // Assert: the refusal in words here — in the report on stdout, and as
    // an ERROR line on this process's stderr — nothing applied; then applied.
    assert_eq!(refused.status.code(), Some(1), "{}", all_text(&refused));
    let stdout = String::from_utf8_lossy(&refused.stdout);
    assert!(
        stdout.contains("crm-edm-sync: contacts: refused"),
        "{stdout}"
    );
    let errors: Vec<serde_json::Value> = String::from_utf8_lossy(&refused.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &serde_json::Value| e["message"] == "run failed")
        .collect();
    assert_eq!(errors.len(), 1, "{}", all_text(&refused));
    assert_eq!(errors[0]["level"], "ERROR");
    assert_eq!(errors[0]["ran_by"], "daemon");
    assert!(
        errors[0]["error"]
            .as_str()
            .unwrap()
            .starts_with("contacts: refused"),
        "{}",
        errors[0]
    );
    assert_eq!(held_after_refusal, 10);
    assert_eq!(forced.status.code(), Some(0), "{}", all_text(&forced));
    assert_eq!(held(&sb), 5);
    daemon.signal("-TERM");
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));
}

#[tokio::test]
async fn ctrl_c_while_following_the_daemon_leaves_its_run_going_and_says_so() {
    // Arrange: 60 link-men, adds of 5 that take 300 ms each.
    let sb = sixty_linkmen_with_slow_adds().await;
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, config) = idle_daemon(&sb, &db, dir.path()).await;
    let follower = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["--once", "--job", "contacts"])
        .env("CRM_EDM_SYNC__EDM__BATCH_SIZE", "5")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    daemon
        .expect("running a --once request next", 1, Duration::from_secs(20))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while sb.count("ml-addr-add") < 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Act: Ctrl-C reaches the follower only.
    let pid = follower.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), follower.wait_with_output())
        .await
        .expect("the follower stops at once")
        .unwrap();

    // Assert: it says the run goes on, and the daemon finishes it.
    assert_eq!(out.status.code(), Some(130), "{}", all_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("the daemon's run goes on"),
        "{}",
        all_text(&out)
    );
    daemon
        .expect("run finished", 1, Duration::from_secs(60))
        .await;
    assert_eq!(daemon.find("run finished").unwrap()["status"], "succeeded");
    assert_eq!(sb.edm.addresses(1).len(), 60);
    daemon.signal("-TERM");
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));
}

#[tokio::test]
async fn once_beside_another_once_waits_for_the_lock_and_runs_itself() {
    // Arrange: the lock held by this test, as another --once would hold it
    // (it takes no request).
    let sb = sandbox().await;
    seed_basic(&sb);
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &sb, &db);
    let url = secrecy::SecretString::from(db.url.clone());
    crm_edm_sync::state::Store::connect(&url)
        .await
        .unwrap()
        .close()
        .await;
    let target = crm_edm_sync::lock::LockTarget::of(&url);
    let held = target.try_acquire().await.unwrap().expect("the lock");

    // Act 1: held longer than daemon.lock_wait_secs (2 s).
    let started = std::time::Instant::now();
    let gave_up = once(&config, &["--once", "--job", "contacts"]).await;

    // Assert 1
    assert_eq!(gave_up.status.code(), Some(1), "{}", all_text(&gave_up));
    assert!(
        all_text(&gave_up).contains("took no request"),
        "{}",
        all_text(&gave_up)
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "it waited"
    );

    // Act 2: released after one second.
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(held);
    });
    let ran = once(&config, &["--once", "--job", "contacts"]).await;
    release.await.unwrap();

    // Assert 2: it ran here once the lock came free.
    assert_eq!(ran.status.code(), Some(0), "{}", all_text(&ran));
    assert_eq!(sb.edm.addresses(1).len() + sb.edm.addresses(2).len(), 10);
}

#[tokio::test]
async fn healthz_turns_503_after_a_failed_run_and_200_after_a_good_one() {
    let sb = sandbox().await;
    seed_basic(&sb);
    sb.inject("Customer/GetAllList", Fault::Status(500), 100_000);
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &sb, &db);
    let mut daemon = Daemon::start(&config, &[("CRM_EDM_SYNC__CRM__MAX_RETRIES", "0")]);
    let url = daemon.ops_url().await;
    let http = crm_edm_sync::remote::client_builder().build().unwrap();

    daemon
        .expect("run finished", 1, Duration::from_secs(20))
        .await;
    let failing = http.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(failing.status().as_u16(), 503);
    let body: serde_json::Value = serde_json::from_slice(&failing.bytes().await.unwrap()).unwrap();
    assert_eq!(body["status"], "failing");
    assert!(
        body["reason"].as_str().unwrap().contains("contacts"),
        "{body}"
    );
    // The container health check says the same.
    let unhealthy = health(&config, url.trim_start_matches("http://"), dir.path()).await;
    assert_eq!(unhealthy.status.code(), Some(1), "{unhealthy:?}");
    assert!(
        String::from_utf8_lossy(&unhealthy.stdout).contains("answered 503"),
        "{unhealthy:?}"
    );

    sb.clear_faults();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut status = 0;
    while tokio::time::Instant::now() < deadline {
        status = http
            .get(format!("{url}/healthz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status, 200, "{}", daemon.log());
    daemon.signal("-TERM");
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));
}

/// `name{labels}` → value, from Prometheus text; panics on a malformed line.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "bad labels in {line:?}");
        }
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        out.insert(series.to_string(), value);
    }
    out
}

#[tokio::test]
async fn metrics_are_prometheus_text_and_count_what_the_runs_did() {
    let sb = sandbox().await;
    seed_basic(&sb);
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &sb, &db);
    let mut daemon = Daemon::start(&config, &[]);
    let url = daemon.ops_url().await;
    daemon
        .expect("run finished", 2, Duration::from_secs(20))
        .await;

    let text = metrics_text(&url).await;
    let m = parse_prometheus(&text);
    // A busy daemon's /metrics, for `.ci/run`'s `promtool check metrics`.
    std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("busy-metrics.txt"),
        &text,
    )
    .unwrap();

    let runs = m[r#"crm_edm_sync_runs_total{tenant="default",job="contacts",outcome="succeeded"}"#];
    assert!(runs >= 2.0, "{text}");
    assert_eq!(
        m[r#"crm_edm_sync_operations_total{tenant="default",kind="add",outcome="done"}"#], 10.0,
        "{text}"
    );
    assert!(
        m[r#"crm_edm_sync_http_requests_total{tenant="default",api="crm"}"#] >= 2.0 * 11.0,
        "{text}"
    );
    assert!(
        m[r#"crm_edm_sync_http_requests_total{tenant="default",api="edm"}"#] >= 4.0,
        "{text}"
    );
    assert!(
        m[r#"crm_edm_sync_last_success_timestamp_seconds{tenant="default",job="contacts"}"#]
            > 1.7e9,
        "{text}"
    );
    assert_eq!(
        m[r#"crm_edm_sync_pending_operations{tenant="default",kind="edm"}"#], 0.0,
        "{text}"
    );
    assert_eq!(m["crm_edm_sync_active"], 1.0, "{text}");
    // The counters match the sandbox's own log.
    assert_eq!(sb.count("ml-addr-add"), 2);
    daemon.signal("-TERM");
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let sb = sandbox().await;
    seed_basic(&sb);
    // Every add takes 20 s: the drain would take long.
    sb.inject("ml-addr-add", Fault::Delay(Duration::from_secs(20)), 10);
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &sb, &db);
    let mut daemon = Daemon::start(&config, &[]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // The request log records a request once answered; wait for the
    // daemon to be inside the slow call instead.
    while sb.max_in_flight("ml-addr-add") < 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        sb.max_in_flight("ml-addr-add"),
        1,
        "the daemon never got into the slow call:\n{}",
        daemon.log()
    );

    daemon.signal("-TERM");
    daemon
        .expect("stop requested", 1, Duration::from_secs(5))
        .await;
    let started = std::time::Instant::now();
    daemon.signal("-TERM");
    let code = daemon.exit_code(Duration::from_secs(10)).await;

    assert_eq!(code, Some(1), "{}", daemon.log());
    assert!(started.elapsed() < Duration::from_secs(5));
    // The log reader may still be catching up with the last line.
    daemon
        .expect("second stop signal", 1, Duration::from_secs(5))
        .await;
}

/// With both jobs every two seconds, some requests hanging past the client
/// timeout and many contact-history calls failing, the state database is
/// never held across a remote call and no write waits on another:
/// `/healthz` answers within a second the whole time and no run fails for
/// want of a database connection (SQLite's pool has one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_hanging_and_failing_requests_healthz_answers_within_a_second_and_the_pool_never_runs_dry()
 {
    // Arrange: 300 link-men, a campaign with an open each; one
    // contact-history call (and list read) in twenty hangs 3 s against 2 s
    // client timeouts, and one contact-history call in three answers 500
    // (not retried: crm.max_retries = 0).
    let sb = sandbox().await;
    for c in 1..=300i64 {
        sb.crm
            .put_customer(c, json!({"name": format!("c{c}"), "type_id": 1}));
        sb.crm.put_linkman(
            c,
            c * 10,
            json!({"name": format!("n{c}"), "email": format!("p{c}@example.com")}),
        );
    }
    sb.edm
        .put_campaign(crate::common::opened_today_by_p1_to(300));
    let hang = crm_edm_sync::sandbox::Chaos {
        p_hang: 0.05,
        hang_for: Duration::from_secs(3),
        ..Default::default()
    };
    sb.chaos("ml-addr-list", hang.clone(), 7);
    sb.chaos(
        "ContactHistory/Add",
        crm_edm_sync::sandbox::Chaos {
            p_5xx: 0.35,
            ..hang
        },
        7,
    );
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        &sb,
        &db.url,
        "schedule = \"*/2 * * * * *\"",
        "[writeback]\nschedule = \"1/2 * * * * *\"\nlookback_days = 1\n[log]\nformat = \"json\"\nlevel = \"info\"\n[http]\nlisten = \"127.0.0.1:0\"\n[daemon]\nlock_poll_secs = 1\nshutdown_timeout_secs = 10\n",
    );
    let config = dir.path().join("config.toml");
    std::fs::write(&config, text).unwrap();
    let mut daemon = Daemon::start(
        &config,
        &[
            ("CRM_EDM_SYNC__EDM__BATCH_SIZE", "20"),
            ("CRM_EDM_SYNC__EDM__TIMEOUT_SECS", "2"),
            ("CRM_EDM_SYNC__CRM__TIMEOUT_SECS", "2"),
            ("CRM_EDM_SYNC__EDM__MAX_RETRIES", "1"),
            ("CRM_EDM_SYNC__CRM__MAX_RETRIES", "0"),
        ],
    );
    let url = daemon.ops_url().await;
    let http = crm_edm_sync::remote::client_builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();

    // Act: ask /healthz every 100 ms until three write-back runs have
    // finished (at most 60 s).
    let mut slow = Vec::new();
    let mut answered = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < until && writeback_runs(&daemon) < 3 {
        let asked = tokio::time::Instant::now();
        match http.get(format!("{url}/healthz")).send().await {
            Ok(_) => answered += 1,
            Err(e) => slow.push(format!("after {:?}: {e}", asked.elapsed())),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let finished = writeback_runs(&daemon);
    daemon.signal("-TERM");
    let code = daemon.exit_code(Duration::from_secs(30)).await;

    // Assert
    let log = daemon.log();
    assert!(
        slow.is_empty(),
        "/healthz did not answer within 1 s: {slow:?}\n{log}"
    );
    assert!(answered > 10, "{answered} answers");
    assert!(
        finished >= 3,
        "only {finished} write-back runs finished:\n{log}"
    );
    assert!(sb.count("ContactHistory/Add") >= 300, "{log}");
    assert!(!log.contains("pool timed out"), "{log}");
    assert!(!log.to_lowercase().contains("acquire connection"), "{log}");
    assert_eq!(code, Some(0), "{log}");
}

/// Write-back runs that finished, whatever their outcome.
fn writeback_runs(daemon: &Daemon) -> usize {
    daemon
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|v| v["message"] == "run finished" && v["job"] == "writeback")
        .count()
}

/// A job that outlasts `daemon.shutdown_timeout_secs` after SIGTERM (here
/// inside a 20 s call) is awaited up to that bound, then stopped where it
/// stands; the daemon exits 0 at once, and the next run completes the work
/// with no address added twice.
#[tokio::test]
async fn a_job_past_the_drain_bound_is_stopped_where_it_stands_and_the_next_run_completes() {
    // Arrange
    let sb = sandbox().await;
    seed_basic(&sb);
    sb.inject("ml-addr-add", Fault::Delay(Duration::from_secs(20)), 1);
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &sb, &db);
    let mut daemon = Daemon::start(
        &config,
        &[("CRM_EDM_SYNC__DAEMON__SHUTDOWN_TIMEOUT_SECS", "1")],
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sb.in_flight("ml-addr-add") < 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sb.in_flight("ml-addr-add"), 1, "{}", daemon.log());

    // Act
    let asked = std::time::Instant::now();
    daemon.signal("-TERM");
    let code = daemon.exit_code(Duration::from_secs(15)).await;

    // Assert
    assert_eq!(code, Some(0), "{}", daemon.log());
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    daemon
        .expect("stopped where it stood", 1, Duration::from_secs(5))
        .await;
    let out = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["--once", "--job", "contacts"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sb.edm.emails(1).len(), 5);
    assert!(crate::common::applied_adds(&sb).values().all(|&n| n == 1));
}

/// How an active instance loses its lock while it keeps running.
#[derive(Clone, Copy)]
enum Usurp {
    /// Its PostgreSQL lock connection is terminated (`pg_terminate_backend`).
    TerminateLockConnection,
    /// Its lock file is removed, so another instance can lock a new one.
    RemoveLockFile,
}

/// Terminates the connection holding the instance's advisory lock on the
/// test database `url`.
async fn terminate_lock_connection(url: &str) -> u64 {
    use sea_orm::{ConnectionTrait, Database, Statement};
    let name = url.rsplit('/').next().unwrap();
    let key = crm_edm_sync::lock::ADVISORY_KEY;
    let admin = Database::connect(crate::common::pg_admin_url().expect("a PostgreSQL server"))
        .await
        .unwrap();
    let sql = format!(
        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
         WHERE l.locktype = 'advisory' AND l.granted AND d.datname = '{name}' \
         AND l.classid = {hi} AND l.objid = {lo}",
        hi = key >> 32,
        lo = key & 0xffff_ffff
    );
    let rows = admin
        .query_all_raw(Statement::from_string(admin.get_database_backend(), sql))
        .await
        .unwrap();
    rows.len() as u64
}

/// The lock holder loses its lock while an add batch is in flight and a
/// standby waits. The standby takes over; the old holder stops at once
/// and writes nothing once the standby has begun; EDM ends exact, every
/// address added once. Requests are told apart by their `User-Agent`.
async fn a_holder_that_loses_its_lock_mid_run_never_writes_after_its_successor(
    db: TestDb,
    usurp: Usurp,
) {
    // Arrange: 1 100 link-men in list 1 (three add batches), the first
    // three adds held 3 s by EDM before they take effect.
    let sb = sandbox().await;
    for c in 1..=1100i64 {
        sb.crm
            .put_customer(c, json!({"name": format!("公司{c}"), "type_id": 1}));
        sb.crm.put_linkman(
            c,
            c * 10,
            json!({"name": format!("联系人{c}"), "email": format!("m{c}@example.com")}),
        );
    }
    sb.inject("ml-addr-add", Fault::Delay(Duration::from_secs(3)), 3);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &sb, &db);
    let old = Daemon::start(&config, &[("CRM_EDM_SYNC__DAEMON__INSTANCE_ID", "alpha")]);
    old.expect("holding the instance lock", 1, Duration::from_secs(20))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while sb.in_flight("ml-addr-add") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no add batch went out within 60 s:\n{}",
            old.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let new = Daemon::start(&config, &[("CRM_EDM_SYNC__DAEMON__INSTANCE_ID", "beta")]);
    new.expect("standing by", 1, Duration::from_secs(20)).await;

    // Act: the holder loses its lock with its add batch in flight.
    match usurp {
        Usurp::TerminateLockConnection => {
            assert_eq!(terminate_lock_connection(&db.url).await, 1);
        }
        Usurp::RemoveLockFile => {
            let path = db.url.trim_start_matches("sqlite://");
            let path = path.split('?').next().unwrap();
            std::fs::remove_file(format!("{path}.lock")).unwrap();
        }
    }

    // Assert: the standby takes over, the old holder stops its job.
    new.expect("holding the instance lock", 1, Duration::from_secs(20))
        .await;
    old.expect("lost the instance lock", 1, Duration::from_secs(20))
        .await;
    new.expect("run finished", 1, Duration::from_secs(90)).await;
    let mut expected: Vec<String> = (1..=1100).map(|c| format!("m{c}@example.com")).collect();
    expected.sort();
    assert_eq!(sb.edm.emails(1), expected, "EDM ends exact");
    let adds = crate::common::applied_adds(&sb);
    let twice: Vec<_> = adds.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "added more than once: {twice:?}");
    let writes: Vec<_> = sb
        .requests()
        .into_iter()
        .filter(|r| r.is_edm_write())
        .collect();
    let by = |who: &str, r: &crm_edm_sync::sandbox::LoggedRequest| {
        r.user_agent.starts_with("crm-edm-sync/") && r.user_agent.ends_with(&format!("({who})"))
    };
    let first_new = writes
        .iter()
        .position(|r| by("beta", r))
        .expect("the successor wrote");
    let late: Vec<_> = writes[first_new..]
        .iter()
        .filter(|r| by("alpha", r))
        .collect();
    assert!(
        late.is_empty(),
        "the old holder wrote after its successor began: {late:?}"
    );
    assert!(
        writes.iter().all(|r| by("alpha", r) || by("beta", r)),
        "every write names its instance"
    );
}

#[tokio::test]
async fn a_postgresql_holder_whose_lock_connection_is_terminated_never_writes_after_its_successor()
{
    let Some(db) = TestDb::postgres().await else {
        return crate::common::skipped_without_postgres("a PostgreSQL holder losing its lock");
    };
    a_holder_that_loses_its_lock_mid_run_never_writes_after_its_successor(
        db,
        Usurp::TerminateLockConnection,
    )
    .await;
}

#[tokio::test]
async fn a_sqlite_holder_whose_lock_file_is_taken_over_never_writes_after_its_successor() {
    a_holder_that_loses_its_lock_mid_run_never_writes_after_its_successor(
        TestDb::sqlite(),
        Usurp::RemoveLockFile,
    )
    .await;
}

/// A parked operation shows in `/metrics`: an address EDM refuses, with
/// `edm.max_attempts = 1`, is parked by the first run and counted from then
/// on.
#[tokio::test]
async fn a_parked_operation_is_counted_in_metrics() {
    // Arrange
    let sb = sandbox().await;
    seed_basic(&sb);
    sb.edm
        .refuse_address("lm3@example.com", "add_address_error", "地址被拒绝");
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &sb, &db);

    // Act
    let mut daemon = Daemon::start(&config, &[("CRM_EDM_SYNC__EDM__MAX_ATTEMPTS", "1")]);
    let url = daemon.ops_url().await;
    daemon
        .expect("run finished", 2, Duration::from_secs(20))
        .await;
    let text = metrics_text(&url).await;

    // Assert
    let m = parse_prometheus(&text);
    assert_eq!(
        m[r#"crm_edm_sync_parked_operations{tenant="default",kind="edm"}"#], 1.0,
        "{text}"
    );
    assert_eq!(
        m[r#"crm_edm_sync_parked_operations{tenant="default",kind="contact_history"}"#], 0.0,
        "{text}"
    );
    assert!(!sb.edm.emails(1).contains(&"lm3@example.com".to_string()));
    assert_eq!(sb.edm.emails(1).len(), 4, "the rest of its batch arrived");
    daemon.signal("-TERM");
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));
}

/// Runs `crm-edm-sync health` with `config`, the daemon's listen address
/// set to `listen`, and the state database pointed at a path that must
/// stay absent (health reads and writes no database).
async fn health(
    config: &std::path::Path,
    listen: &str,
    dir: &std::path::Path,
) -> std::process::Output {
    let untouched = dir.join("health-must-not-create.db");
    let out = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(config)
        .arg("health")
        .env_remove("RUST_LOG")
        .env("CRM_EDM_SYNC__HTTP__LISTEN", listen)
        .env(
            "CRM_EDM_SYNC__DATABASE__URL",
            format!("sqlite://{}?mode=rwc", untouched.display()),
        )
        .output()
        .await
        .unwrap();
    assert!(!untouched.exists(), "health created a database");
    out
}

#[tokio::test]
async fn a_standby_serves_metrics_with_every_series_from_start_up_and_the_last_success_from_the_database()
 {
    // Arrange: one successful run recorded, then an active daemon and a
    // standby on the same database.
    let sb = sandbox().await;
    seed_basic(&sb);
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &sb, &db);
    let before = chrono::Utc::now().timestamp() as f64;
    let once = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["--once", "--job", "contacts"])
        .output()
        .await
        .unwrap();
    assert!(once.status.success());
    let after = chrono::Utc::now().timestamp() as f64 + 1.0;
    let active = Daemon::start(&config, &[("CRM_EDM_SYNC__DAEMON__INSTANCE_ID", "alpha")]);
    active
        .expect("holding the instance lock", 1, Duration::from_secs(20))
        .await;
    let mut standby = Daemon::start(&config, &[("CRM_EDM_SYNC__DAEMON__INSTANCE_ID", "beta")]);
    let url = standby.ops_url().await;
    standby
        .expect("standing by", 1, Duration::from_secs(20))
        .await;

    // Act
    let text = metrics_text(&url).await;
    let healthy = health(&config, url.trim_start_matches("http://"), dir.path()).await;

    // Assert
    let m = parse_prometheus(&text);
    assert_eq!(m["crm_edm_sync_active"], 0.0, "{text}");
    assert_eq!(m[r#"crm_edm_sync_role{role="standby"}"#], 1.0, "{text}");
    assert_eq!(m[r#"crm_edm_sync_role{role="active"}"#], 0.0, "{text}");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        m[&format!(r#"crm_edm_sync_build_info{{version="{version}",instance="beta"}}"#)],
        1.0,
        "{text}"
    );
    for job in ["contacts", "writeback"] {
        for outcome in ["succeeded", "failed", "refused", "interrupted"] {
            let series = format!(
                r#"crm_edm_sync_runs_total{{tenant="default",job="{job}",outcome="{outcome}"}}"#
            );
            assert_eq!(m.get(&series), Some(&0.0), "{series} missing:\n{text}");
        }
    }
    for kind in ["add", "edit", "unsub", "contact_history"] {
        for outcome in ["done", "failed"] {
            let series = format!(
                r#"crm_edm_sync_operations_total{{tenant="default",kind="{kind}",outcome="{outcome}"}}"#
            );
            assert_eq!(m.get(&series), Some(&0.0), "{series} missing:\n{text}");
        }
    }
    assert_eq!(
        m.get(r#"crm_edm_sync_pending_operations{tenant="default",kind="edm"}"#),
        Some(&0.0),
        "{text}"
    );
    let last = m[r#"crm_edm_sync_last_success_timestamp_seconds{tenant="default",job="contacts"}"#];
    assert!(
        (before..=after).contains(&last),
        "last success {last} not the recorded run's ({before}..{after}):\n{text}"
    );
    // EDM's service-info is read at start-up into gauges.
    let mut service = BTreeMap::new();
    for _ in 0..100 {
        let text = metrics_text(&url).await;
        service = parse_prometheus(&text);
        if service.contains_key(r#"crm_edm_sync_edm_quota_available{tenant="default"}"#) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        service.get(r#"crm_edm_sync_edm_service_enabled{tenant="default"}"#),
        Some(&1.0),
        "{service:?}"
    );
    assert_eq!(
        service.get(r#"crm_edm_sync_edm_quota_available{tenant="default"}"#),
        Some(&1_000_000.0)
    );
    assert_eq!(
        service.get(r#"crm_edm_sync_edm_service_expiration_timestamp_seconds{tenant="default"}"#),
        Some(&4_102_358_400.0),
        "2099-12-31 00:00 UTC"
    );
    assert_eq!(healthy.status.code(), Some(0), "{healthy:?}");
    assert!(String::from_utf8_lossy(&healthy.stdout).starts_with("healthy: "));

    // The scheduler library's own INFO lines stay quiet.
    active
        .expect("run finished", 1, Duration::from_secs(20))
        .await;
    let scheduler_lines = active
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| {
            l["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("tokio_cron_scheduler"))
        })
        .count();
    assert_eq!(scheduler_lines, 0, "{}", active.log());
    // Every line a scheduled run writes carries its job and run_id.
    let run_lines: Vec<serde_json::Value> = active
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| {
            l["target"]
                .as_str()
                .is_some_and(|t| t.contains("sync::contacts"))
        })
        .cloned()
        .collect();
    assert!(!run_lines.is_empty());
    for l in run_lines {
        assert!(l["job"] == "contacts" && l["run_id"].is_string(), "{l}");
    }

    // A daemon that is gone is unhealthy.
    standby.signal("-TERM");
    assert_eq!(standby.exit_code(Duration::from_secs(30)).await, Some(0));
    let gone = health(&config, url.trim_start_matches("http://"), dir.path()).await;
    assert_eq!(gone.status.code(), Some(1), "{gone:?}");
    assert!(String::from_utf8_lossy(&gone.stdout).starts_with("unhealthy: no answer from "));
    active.signal("-TERM");
}

/// A fresh daemon — nothing ever ran — serves every series with its HELP:
/// the last success at 0 for both jobs, the EDM service gauges (NaN until
/// `service-info` answers), the role and the writable gauge.
#[tokio::test]
async fn a_fresh_daemon_serves_every_series_with_help_from_start_up() {
    // Arrange: EDM unreachable, so service-info never answers; no run due.
    let sb = sandbox().await;
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &sb, &db);
    let mut daemon = Daemon::start(
        &config,
        &[
            ("CRM_EDM_SYNC__SYNC__SCHEDULE", "0 0 0 1 1 *"),
            (
                "CRM_EDM_SYNC__EDM__BASE_URL",
                "http://127.0.0.1:9/mm-ms/api",
            ),
        ],
    );
    let url = daemon.ops_url().await;

    // Act
    let text = metrics_text(&url).await;
    let m = parse_prometheus(&text);
    daemon.signal("-TERM");
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));

    // Assert
    for job in ["contacts", "writeback"] {
        let series = format!(
            r#"crm_edm_sync_last_success_timestamp_seconds{{tenant="default",job="{job}"}}"#
        );
        assert_eq!(m.get(&series), Some(&0.0), "{text}");
    }
    for gauge in [
        r#"crm_edm_sync_edm_service_enabled{tenant="default"}"#,
        r#"crm_edm_sync_edm_service_expiration_timestamp_seconds{tenant="default"}"#,
        r#"crm_edm_sync_edm_quota_available{tenant="default"}"#,
    ] {
        assert!(m[gauge].is_nan(), "{gauge} should be unknown: {text}");
    }
    assert_eq!(
        m.get(r#"crm_edm_sync_state_db_writable{tenant="default"}"#),
        Some(&1.0),
        "{text}"
    );
    let families: std::collections::BTreeSet<&str> =
        m.keys().map(|k| k.split('{').next().unwrap()).collect();
    for family in families {
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{family} has no HELP:\n{text}"
        );
    }
}

#[tokio::test]
async fn sigterm_while_write_back_reads_campaigns_stops_the_reads_at_once() {
    // Arrange: 30 campaigns whose detail reads take 400 ms each; write-back
    // every second, contacts never.
    let sb = sandbox().await;
    seed_basic(&sb);
    let today = crate::common::edm_today().format("%Y-%m-%d").to_string();
    for id in 1..=30 {
        sb.edm.put_campaign(crm_edm_sync::sandbox::SandboxCampaign {
            id,
            sn: format!("sn-{id}"),
            name: format!("c{id}"),
            list_id: 1,
            date: today.clone(),
            send_status: 3,
            track_status: 1,
            ..Default::default()
        });
    }
    for op in ["open-detail", "failexport"] {
        sb.inject(op, Fault::Delay(Duration::from_millis(400)), 1000);
    }
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        &sb,
        &db.url,
        "schedule = \"0 0 0 1 1 *\"",
        "[writeback]\nschedule = \"* * * * * *\"\n[log]\nformat = \"json\"\nlevel = \"info\"\n[http]\nlisten = \"127.0.0.1:0\"\n[daemon]\nlock_poll_secs = 1\nshutdown_timeout_secs = 30\n",
    );
    let config = dir.path().join("config.toml");
    std::fs::write(&config, text).unwrap();
    let mut daemon = Daemon::start(&config, &[]);
    let reads =
        |sb: &crm_edm_sync::sandbox::Sandbox| sb.count("open-detail") + sb.count("failexport");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while reads(&sb) < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reads(&sb) >= 3, "the reads never began:\n{}", daemon.log());

    // Act
    let at_signal = reads(&sb);
    let signalled = tokio::time::Instant::now();
    daemon.signal("-TERM");
    let code = daemon.exit_code(Duration::from_secs(30)).await;

    // Assert: no read begins after the signal (the one in flight is
    // dropped), the drain is far shorter than the 90 reads left, and the
    // run is on record as interrupted.
    assert_eq!(code, Some(0), "{}", daemon.log());
    assert!(
        reads(&sb) <= at_signal + 1,
        "{} reads after the signal",
        reads(&sb) - at_signal
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "drained in {:?}",
        signalled.elapsed()
    );
    let finished = daemon.find("run finished").expect("a run finished line");
    assert_eq!(finished["status"], "interrupted", "{finished}");
    assert_eq!(finished["job"], "writeback", "{finished}");
}

/// A daemon config: contacts and write-back on the schedules given.
fn config_with(
    sb: &crm_edm_sync::sandbox::Sandbox,
    db: &TestDb,
    contacts: &str,
    writeback: &str,
    extra: &str,
) -> String {
    config_text(
        sb,
        &db.url,
        &format!("schedule = \"{contacts}\""),
        &format!(
            "[writeback]\nschedule = \"{writeback}\"\n[log]\nformat = \"json\"\nlevel = \"info\"\n[http]\nlisten = \"127.0.0.1:0\"\n[daemon]\nlock_poll_secs = 1\nshutdown_timeout_secs = 30\n{extra}"
        ),
    )
}

#[tokio::test]
async fn sighup_reloads_the_config_refuses_a_bad_one_and_never_stops_the_daemon() {
    // Arrange: contacts every second, write-back never (this year).
    let sb = sandbox().await;
    seed_basic(&sb);
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        config_with(&sb, &db, "* * * * * *", "0 0 0 1 1 *", ""),
    )
    .unwrap();
    let mut daemon = Daemon::start(&config, &[]);
    daemon
        .expect("run finished", 1, Duration::from_secs(30))
        .await;

    // Act 1: a config with a bad value.
    std::fs::write(
        &config,
        config_with(&sb, &db, "* * * * * *", "0 0 0 1 1 *", "")
            .replace("[crm]\n", "[crm]\npage_size = 500\n"),
    )
    .unwrap();
    daemon.signal("-HUP");

    // Assert 1: refused by key, the old config runs on.
    daemon
        .expect("config reload refused", 1, Duration::from_secs(10))
        .await;
    let refused = daemon.find("config reload refused").unwrap();
    assert_eq!(refused["level"], "ERROR", "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("crm.page_size"),
        "{refused}"
    );
    let contacts_before = daemon.count("run finished");
    daemon
        .expect("run finished", contacts_before + 1, Duration::from_secs(10))
        .await;

    // Act 2: a valid config that swaps the schedules and moves the ops
    // endpoint (a restart-only key).
    std::fs::write(
        &config,
        config_with(&sb, &db, "0 0 0 1 1 *", "* * * * * *", "")
            .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\""),
    )
    .unwrap();
    daemon.signal("-HUP");

    // Assert 2: the change is named, the restart-only key deferred, and
    // from then on write-back runs every second and contacts does not.
    daemon
        .expect("config reloaded", 1, Duration::from_secs(10))
        .await;
    let reloaded = daemon.find("config reloaded").unwrap();
    let changed = reloaded["changed"].as_str().unwrap().to_string();
    assert!(
        changed.contains("sync.schedule") && changed.contains("writeback.schedule"),
        "{reloaded}"
    );
    let deferred = daemon
        .find("only at the next restart")
        .expect("a restart-only warning");
    assert!(
        deferred["keys"].as_str().unwrap().contains("http.listen"),
        "{deferred}"
    );
    daemon
        .expect("schedules re-armed", 1, Duration::from_secs(10))
        .await;
    let jobs = |d: &Daemon, job: &str| {
        d.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["message"] == "run finished" && v["job"] == job)
            .count()
    };
    let contacts_at_reload = jobs(&daemon, "contacts");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while jobs(&daemon, "writeback") < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(jobs(&daemon, "writeback") >= 2, "{}", daemon.log());
    // At most the run already going when the schedules changed.
    assert!(
        jobs(&daemon, "contacts") <= contacts_at_reload + 1,
        "{}",
        daemon.log()
    );

    // Act 3: log.level to warn (and the ops address moved again, so that a
    // WARN line shows the reload happened).
    std::fs::write(
        &config,
        config_with(&sb, &db, "0 0 0 1 1 *", "* * * * * *", "")
            .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:2\"")
            .replace("level = \"info\"", "level = \"warn\""),
    )
    .unwrap();
    daemon.signal("-HUP");
    daemon
        .expect("only at the next restart", 2, Duration::from_secs(10))
        .await;
    let infos_after_warn = daemon.count("run finished");
    let reads_after_warn = sb.count("task-list");
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // Assert 3: write-back still runs every second, its INFO lines gone.
    assert!(
        sb.count("task-list") > reads_after_warn,
        "write-back stopped"
    );
    assert_eq!(
        daemon.count("run finished"),
        infos_after_warn,
        "{}",
        daemon.log()
    );

    // The daemon was never stopped by SIGHUP.
    daemon.signal("-TERM");
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));
}
