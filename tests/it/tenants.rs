//! Tenants (`tenants.dir`): many CRM companies, each synced into its own
//! EDM account, by one configuration, one state database and one process.

use std::time::Duration;

use crm_edm_sync::sandbox::Sandbox;
use serde_json::json;

use crate::common::binary::{ok, run, text_of};
use crate::common::daemon::{Daemon, metrics_text};
use crate::common::{TestDb, applied_adds, http_get};

/// A tenant file for `sb`: its CRM and EDM, list 1, and `extra` lines.
pub(crate) fn tenant_file(sb: &Sandbox, extra: &str) -> String {
    let own = sb.config_toml("unused");
    let own = own.split("[database]").next().unwrap();
    format!("{own}\n[sync]\nlist_id = 1\n{extra}\n")
}

/// A sandbox with list 1 and `n` customers, one link-man each
/// (`{prefix}{c}@example.com`).
async fn company(prefix: &str, n: i64) -> Sandbox {
    let sb = Sandbox::start().await.unwrap();
    sb.edm.create_list(1, "客户");
    for c in 1..=n {
        sb.crm
            .put_customer(c, json!({"name": format!("{prefix}公司{c}")}));
        sb.crm.put_linkman(
            c,
            c * 10,
            json!({"name": format!("{prefix}{c}"), "email": format!("{prefix}{c}@example.com")}),
        );
    }
    sb
}

/// `count` tenants `{prefix}0`, `{prefix}1`, … of `config`, each a
/// company of `linkmen` link-men (`{prefix}{i}x1@example.com`, …).
async fn tenants_named(
    config: &std::path::Path,
    prefix: &str,
    count: usize,
    linkmen: i64,
) -> Vec<Sandbox> {
    let mut companies = Vec::new();
    for i in 0..count {
        let sb = company(&format!("{prefix}{i}x"), linkmen).await;
        put_tenant(config, &format!("{prefix}{i}"), &tenant_file(&sb, ""));
        companies.push(sb);
    }
    companies
}

/// A main config over `dir/tenants` on `db`, with daemon timings for tests.
pub(crate) fn main_config(dir: &std::path::Path, db: &TestDb, more: &str) -> std::path::PathBuf {
    let tenants = dir.join("tenants");
    std::fs::create_dir_all(&tenants).unwrap();
    let text = format!(
        "[tenants]\ndir = {:?}\n[database]\nurl = {:?}\n[sync]\nschedule = \"* * * * * *\"\n[writeback]\nschedule = \"0 0 0 1 1 *\"\n[reconcile]\nschedule = \"\"\n[http]\nlisten = \"127.0.0.1:0\"\n[daemon]\nlock_poll_secs = 1\nshutdown_timeout_secs = 30\nlock_wait_secs = 2\n{more}\n",
        tenants.display().to_string(),
        db.url
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub(crate) fn put_tenant(config: &std::path::Path, name: &str, text: &str) {
    std::fs::write(
        config
            .parent()
            .unwrap()
            .join("tenants")
            .join(format!("{name}.toml")),
        text,
    )
    .unwrap();
}

fn addresses(sb: &Sandbox) -> Vec<String> {
    let mut found: Vec<String> = sb.edm.addresses(1).into_iter().map(|a| a.address).collect();
    found.sort();
    found
}

#[tokio::test]
async fn each_tenant_syncs_its_own_crm_into_its_own_edm_and_keeps_its_state_apart() {
    for db in TestDb::all().await {
        // Arrange: two companies, two EDM accounts, one database.
        let (acme, beta) = (company("acme", 3).await, company("beta", 2).await);
        let dir = tempfile::tempdir().unwrap();
        let config = main_config(dir.path(), &db, "");
        put_tenant(&config, "acme", &tenant_file(&acme, ""));
        put_tenant(&config, "beta", &tenant_file(&beta, ""));

        // Act: `--once` without `--tenant` runs every tenant.
        let once = ok(&config, &["--once", "--job", "contacts"]).await;
        let status = ok(&config, &["status"]).await;
        let beta_alone = ok(&config, &["status", "--tenant", "beta", "--json"]).await;

        // Assert: each account holds its own company's people, no other's.
        assert_eq!(
            addresses(&acme),
            [
                "acme1@example.com",
                "acme2@example.com",
                "acme3@example.com"
            ],
            "{}",
            db.url
        );
        assert_eq!(addresses(&beta), ["beta1@example.com", "beta2@example.com"]);
        let printed = text_of(&once);
        assert!(
            printed.contains("== tenant acme") && printed.contains("== tenant beta"),
            "{printed}"
        );
        // `status` without `--tenant`: one line each; with it, the tenant's
        // own report.
        let lines = String::from_utf8_lossy(&status.stdout).to_string();
        assert_eq!(lines.lines().count(), 2, "{lines}");
        assert!(
            lines.lines().next().unwrap().starts_with("acme: held by")
                || lines.contains("acme: released by"),
            "{lines}"
        );
        let report: serde_json::Value = serde_json::from_slice(&beta_alone.stdout).unwrap();
        let members: u64 = report["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["count"].as_u64())
            .sum();
        assert_eq!(members, 2, "{report}");
    }
}

#[tokio::test]
async fn a_tenant_file_with_a_bad_key_is_named_and_the_other_tenants_run() {
    // Arrange
    let db = TestDb::new().await;
    let acme = company("acme", 2).await;
    let dir = tempfile::tempdir().unwrap();
    let config = main_config(dir.path(), &db, "");
    put_tenant(&config, "acme", &tenant_file(&acme, ""));
    put_tenant(
        &config,
        "broken",
        &tenant_file(&acme, "max_unsubscribe_ratio = \"high\""),
    );

    // Act
    let once = run(&config, &["--once", "--job", "contacts"]).await;
    let check = run(&config, &["check"]).await;

    // Assert: acme ran; broken is named by file and key; exit 2.
    assert_eq!(addresses(&acme).len(), 2);
    let printed = text_of(&once);
    assert_eq!(once.status.code(), Some(2), "{printed}");
    assert!(
        printed.contains("broken.toml") && printed.contains("sync.max_unsubscribe_ratio"),
        "{printed}"
    );
    let checked = String::from_utf8_lossy(&check.stdout).to_string();
    assert_eq!(check.status.code(), Some(1), "{checked}");
    assert!(
        checked.lines().any(|l| l.starts_with("acme: ok")),
        "{checked}"
    );
    assert!(
        checked
            .lines()
            .any(|l| l.starts_with("broken: FAILED") && l.contains("sync.max_unsubscribe_ratio")),
        "{checked}"
    );
}

#[tokio::test]
async fn a_single_tenant_database_becomes_tenant_default_with_nothing_lost() {
    for db in TestDb::all().await {
        // Arrange: a deployment without tenant files has synced.
        let sb = company("lm", 3).await;
        let dir = tempfile::tempdir().unwrap();
        let single = dir.path().join("single.toml");
        std::fs::write(
            &single,
            format!("{}\n[sync]\nlist_id = 1\n", sb.config_toml(&db.url)),
        )
        .unwrap();
        ok(&single, &["--once", "--job", "contacts"]).await;
        let adds_before = applied_adds(&sb);

        // Act: the same company becomes tenant `default` of a tenants dir,
        // beside a new one.
        let config = main_config(dir.path(), &db, "");
        put_tenant(&config, "default", &tenant_file(&sb, ""));
        let other = company("new", 1).await;
        put_tenant(&config, "other", &tenant_file(&other, ""));
        ok(&config, &["--once", "--job", "contacts"]).await;
        let status = ok(&config, &["status", "--tenant", "default", "--json"]).await;

        // Assert: `default` found its members (nothing added again), and
        // its earlier run is still there.
        assert_eq!(applied_adds(&sb), adds_before, "{}", db.url);
        let report: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        assert_eq!(
            report["runs"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["job"] == "contacts")
                .count(),
            2,
            "{report}"
        );
        assert_eq!(addresses(&other), ["new1@example.com"]);
    }
}

#[tokio::test]
async fn a_removed_tenant_keeps_its_state_until_purged() {
    for db in TestDb::all().await {
        // Arrange: a tenant that has run.
        let acme = company("acme", 1).await;
        let dir = tempfile::tempdir().unwrap();
        let config = main_config(dir.path(), &db, "");
        put_tenant(&config, "acme", &tenant_file(&acme, ""));
        ok(&config, &["--once", "--job", "contacts"]).await;

        // Act / Assert: purge is refused while its file is there…
        let refused = run(&config, &["tenant", "purge", "acme"]).await;
        assert_eq!(refused.status.code(), Some(1), "{}", text_of(&refused));
        assert!(
            text_of(&refused).contains("acme.toml"),
            "{}",
            text_of(&refused)
        );
        // …the state stays readable once the file is removed…
        std::fs::remove_file(dir.path().join("tenants/acme.toml")).unwrap();
        let kept = ok(&config, &["status", "--tenant", "acme", "--json"]).await;
        let report: serde_json::Value = serde_json::from_slice(&kept.stdout).unwrap();
        assert!(!report["runs"].as_array().unwrap().is_empty(), "{report}");
        // …and purging deletes it.
        ok(&config, &["tenant", "purge", "acme"]).await;
        let gone = run(&config, &["status", "--tenant", "acme"]).await;
        assert_eq!(gone.status.code(), Some(1), "{}", text_of(&gone));
        assert!(
            text_of(&gone).contains("no state database yet"),
            "{}",
            text_of(&gone)
        );
        if db.url.starts_with("sqlite") {
            let file = db
                .url
                .trim_start_matches("sqlite://")
                .split('?')
                .next()
                .unwrap()
                .to_string();
            assert!(!std::path::Path::new(&format!("{file}.tenants/acme.db")).exists());
        }
    }
}

#[tokio::test]
async fn a_daemon_serves_every_tenant_with_its_name_on_each_line_and_series() {
    // Arrange: two tenants; beta's CRM refuses its token.
    let db = TestDb::new().await;
    let (acme, beta) = (company("acme", 2).await, company("beta", 2).await);
    let dir = tempfile::tempdir().unwrap();
    let config = main_config(dir.path(), &db, "");
    put_tenant(&config, "acme", &tenant_file(&acme, ""));
    put_tenant(
        &config,
        "beta",
        &tenant_file(&beta, "").replace(crm_edm_sync::sandbox::TOKEN, "wrong-token"),
    );

    // Act
    let mut daemon = Daemon::start(&config, &[]);
    let ops = daemon.ops_url().await;
    // Both tenants ran: beta's run failed, acme's succeeded.
    daemon
        .expect("run failed", 1, Duration::from_secs(30))
        .await;
    daemon
        .expect_lines(
            "a succeeded run of acme",
            |l| {
                l["message"] == "run finished"
                    && l["tenant"] == "acme"
                    && l["status"] == "succeeded"
            },
            1,
            Duration::from_secs(30),
        )
        .await;
    let health = http_get(format!("{ops}/healthz")).await.unwrap();
    let (code, body) = (health.status(), health.text().await.unwrap());
    let text = metrics_text(&ops).await;
    daemon.signal("-TERM");
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));

    // Assert: acme synced; beta failed alone, and is named.
    assert_eq!(addresses(&acme).len(), 2, "{}", daemon.log());
    assert!(addresses(&beta).is_empty());
    assert_eq!(code, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "failing");
    assert_eq!(body["failing_tenants"], json!(["beta"]), "{body}");
    // Every line of a run names its tenant; every series of its work too.
    let lines = daemon.lines.lock().unwrap().clone();
    let run_lines: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l.get("run_id").is_some()).collect();
    assert!(!run_lines.is_empty());
    for line in &run_lines {
        assert!(
            line["tenant"] == "acme" || line["tenant"] == "beta",
            "{line}"
        );
    }
    assert!(
        text.contains(
            r#"crm_edm_sync_runs_total{tenant="acme",job="contacts",outcome="succeeded"}"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"crm_edm_sync_runs_total{tenant="beta",job="contacts",outcome="failed"}"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_tenant_file_added_or_removed_takes_effect_on_sighup_without_a_restart() {
    // Arrange: a daemon serving acme.
    let db = TestDb::new().await;
    let (acme, late) = (company("acme", 1).await, company("late", 2).await);
    let dir = tempfile::tempdir().unwrap();
    let config = main_config(dir.path(), &db, "");
    put_tenant(&config, "acme", &tenant_file(&acme, ""));
    let mut daemon = Daemon::start(&config, &[]);
    daemon.ops_url().await;
    daemon
        .expect("run finished", 1, Duration::from_secs(30))
        .await;

    // Act: a new tenant file, a SIGHUP; then acme's file removed.
    put_tenant(&config, "late", &tenant_file(&late, ""));
    daemon.signal("-HUP");
    daemon
        .expect("tenant starts", 2, Duration::from_secs(10))
        .await;
    for _ in 0..100 {
        if addresses(&late).len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::remove_file(dir.path().join("tenants/acme.toml")).unwrap();
    daemon.signal("-HUP");
    daemon
        .expect("tenant file removed", 1, Duration::from_secs(10))
        .await;
    daemon.signal("-TERM");
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));

    // Assert
    assert_eq!(addresses(&late).len(), 2);
    let removed = daemon.find("tenant file removed").unwrap();
    assert_eq!(removed["tenant"], "acme", "{removed}");
}

#[tokio::test]
async fn a_tenant_name_is_checked_and_names_the_tenants_there_are() {
    // Arrange
    let db = TestDb::new().await;
    let acme = company("acme", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = main_config(dir.path(), &db, "");
    put_tenant(&config, "acme", &tenant_file(&acme, ""));
    put_tenant(&config, "beta", &tenant_file(&acme, ""));

    // Act
    let bad = run(&config, &["status", "--tenant", "Not_A_Name"]).await;
    let unknown = run(&config, &["--once", "--tenant", "gamma"]).await;
    let which = run(&config, &["explain", "acme1@example.com"]).await;

    // Assert
    assert_eq!(bad.status.code(), Some(2), "{}", text_of(&bad));
    assert_eq!(unknown.status.code(), Some(2), "{}", text_of(&unknown));
    assert!(
        text_of(&unknown).contains("acme, beta"),
        "{}",
        text_of(&unknown)
    );
    assert_eq!(which.status.code(), Some(2), "{}", text_of(&which));
    assert!(text_of(&which).contains("--tenant"), "{}", text_of(&which));
}

/// Who holds each tenant, as `status --json` says: tenant → instance
/// (`None`: released or never held).
async fn holders(config: &std::path::Path) -> std::collections::BTreeMap<String, Option<String>> {
    // Exit 1 while a tenant has no state yet: read what there is.
    let out = run(config, &["status", "--json"]).await;
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    all["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let holder = &t["holder"];
            let held = holder.is_object() && holder["released"] == false;
            (
                t["tenant"].as_str().unwrap().to_string(),
                held.then(|| holder["instance"].as_str().unwrap().to_string()),
            )
        })
        .collect()
}

/// How many tenants each instance holds.
fn shares(
    held: &std::collections::BTreeMap<String, Option<String>>,
) -> std::collections::BTreeMap<String, usize> {
    let mut per = std::collections::BTreeMap::new();
    for instance in held.values().flatten() {
        *per.entry(instance.clone()).or_insert(0) += 1;
    }
    per
}

/// Polls `holders` until `done` says so, or `within` passes.
async fn until(
    config: &std::path::Path,
    within: Duration,
    done: impl Fn(&std::collections::BTreeMap<String, Option<String>>) -> bool,
) -> std::collections::BTreeMap<String, Option<String>> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let held = holders(config).await;
        if done(&held) || tokio::time::Instant::now() > deadline {
            return held;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn instances_on_one_postgres_database_share_the_tenants_and_take_over_a_dead_ones() {
    let Some(db) = TestDb::postgres().await else {
        crate::common::skipped_without_postgres("instances_share_the_tenants");
        return;
    };
    // Arrange: six tenants, one instance holding all of them.
    let dir = tempfile::tempdir().unwrap();
    let config = main_config(dir.path(), &db, "");
    let companies = tenants_named(&config, "t", 6, 2).await;
    let id = |name: &str| ("CRM_EDM_SYNC__DAEMON__INSTANCE_ID", name.to_string());
    let start = |name: &str| {
        let (k, v) = id(name);
        Daemon::start(&config, &[(k, v.as_str())])
    };
    let _a = start("a");
    let all_a = until(&config, Duration::from_secs(30), |h| {
        h.values().all(|i| i.as_deref() == Some("a"))
    })
    .await;
    assert!(
        all_a.values().all(|i| i.as_deref() == Some("a")),
        "{all_a:?}"
    );

    // Act: two more instances join.
    let b = start("b");
    let _c = start("c");
    let fair = |h: &std::collections::BTreeMap<String, Option<String>>| {
        let per = shares(h);
        per.len() == 3 && per.values().all(|n| *n == 2) && h.values().all(Option::is_some)
    };
    let balanced = until(&config, Duration::from_secs(60), fair).await;

    // Assert: each holds its share (⌈6/3⌉ = 2).
    assert!(fair(&balanced), "{balanced:?}");

    // Act: one instance dies without a word.
    let held_by_b: Vec<String> = balanced
        .iter()
        .filter(|(_, i)| i.as_deref() == Some("b"))
        .map(|(t, _)| t.clone())
        .collect();
    // Within the bound the design gives: the survivors' next poll of the
    // locks (`lock_poll_secs` = 1), plus the wait fencing needs before a
    // successor's first write (the largest client timeout, 5 s, + 2 s).
    let bound = Duration::from_secs(1 + 5 + 2);
    let killed = std::time::Instant::now();
    b.signal("-KILL");
    let after = until(&config, bound, |h| {
        h.values()
            .all(|i| matches!(i.as_deref(), Some("a") | Some("c")))
    })
    .await;
    let took = killed.elapsed();

    // Assert: its tenants are taken over by the two left, each at most
    // ⌈6/2⌉ = 3, and nobody was added twice.
    assert!(
        after
            .values()
            .all(|i| matches!(i.as_deref(), Some("a") | Some("c"))),
        "{after:?} after {took:?} (b held {held_by_b:?})"
    );
    assert!(shares(&after).values().all(|n| *n <= 3), "{after:?}");
    for sb in &companies {
        assert!(
            applied_adds(sb).values().all(|n| *n == 1),
            "{:?}",
            applied_adds(sb)
        );
        assert_eq!(addresses(sb).len(), 2);
    }
}

#[tokio::test]
async fn on_sqlite_a_second_instance_stands_by_for_every_tenant_until_the_first_is_gone() {
    // Arrange: three tenants on SQLite, served by instance a.
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let config = main_config(dir.path(), &db, "");
    let companies = tenants_named(&config, "s", 3, 1).await;
    let start = |name: &str| Daemon::start(&config, &[("CRM_EDM_SYNC__DAEMON__INSTANCE_ID", name)]);
    let a = start("a");
    let all = |who: &'static str| {
        move |h: &std::collections::BTreeMap<String, Option<String>>| {
            h.len() == 3 && h.values().all(|i| i.as_deref() == Some(who))
        }
    };
    let held = until(&config, Duration::from_secs(30), all("a")).await;
    assert!(all("a")(&held), "{held:?}");

    // Act: a second instance starts on the same state database.
    let b = start("b");
    let ops_b = b.ops_url().await;
    b.expect("standing by", 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let while_a_lives = holders(&config).await;
    let health_b = http_get(format!("{ops_b}/healthz")).await.unwrap();
    let health_b: serde_json::Value =
        serde_json::from_str(&health_b.text().await.unwrap()).unwrap();

    // Assert: b serves nothing while a lives.
    assert!(all("a")(&while_a_lives), "{while_a_lives:?}\n{}", b.log());
    assert_eq!(b.count("tenant starts"), 0, "{}", b.log());
    assert_eq!(health_b["role"], "standby", "{health_b}");

    // Act: a dies without a word.
    a.signal("-KILL");
    let after = until(&config, Duration::from_secs(30), all("b")).await;

    for sb in &companies {
        for _ in 0..100 {
            if !addresses(sb).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Assert: b serves every tenant, and nobody was added twice.
    assert!(all("b")(&after), "{after:?}\n{}", b.log());
    for sb in &companies {
        assert!(
            applied_adds(sb).values().all(|n| *n == 1),
            "{:?}",
            applied_adds(sb)
        );
        assert_eq!(addresses(sb).len(), 1);
    }
}

/// Each run's span of time by its `run_id`: (tenant, first line, last line).
fn run_spans(lines: &[serde_json::Value]) -> Vec<(String, String, String)> {
    let mut spans: std::collections::BTreeMap<String, (String, String, String)> =
        Default::default();
    for line in lines {
        let (Some(run), Some(at)) = (line["run_id"].as_str(), line["timestamp"].as_str()) else {
            continue;
        };
        let tenant = line["tenant"].as_str().unwrap_or("").to_string();
        let span = spans
            .entry(run.to_string())
            .or_insert_with(|| (tenant, at.to_string(), at.to_string()));
        span.1 = span.1.clone().min(at.to_string());
        span.2 = span.2.clone().max(at.to_string());
    }
    spans.into_values().collect()
}

/// Each finished run's (tenant, start, end), in milliseconds since the
/// epoch, from its `run finished` line (its time less `duration_ms`).
fn finished_runs(lines: &[serde_json::Value]) -> Vec<(String, i64, i64)> {
    lines
        .iter()
        .filter(|l| l["message"] == "run finished")
        .map(|l| {
            let end = chrono::DateTime::parse_from_rfc3339(l["timestamp"].as_str().unwrap())
                .unwrap()
                .timestamp_millis();
            let took = l["duration_ms"].as_i64().unwrap();
            (l["tenant"].as_str().unwrap().to_string(), end - took, end)
        })
        .collect()
}

#[tokio::test]
async fn a_slow_tenant_and_a_refused_plan_neither_delay_nor_fail_another_tenant() {
    // Arrange: `quick`; `slow`, whose CRM takes 4 s for every customers
    // page; `fussy`, which syncs two link-men and then loses both
    // customers, so its plan is refused (an empty pull).
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = main_config(dir.path(), &db, "");
    let (quick, slow, fussy) = (
        company("q", 1).await,
        company("s", 1).await,
        company("f", 2).await,
    );
    slow.inject(
        "Customer/GetAllList",
        crm_edm_sync::sandbox::Fault::Delay(Duration::from_secs(4)),
        1000,
    );
    for (name, sb) in [("quick", &quick), ("slow", &slow), ("fussy", &fussy)] {
        put_tenant(&config, name, &tenant_file(sb, ""));
    }
    let mut daemon = Daemon::start(&config, &[]);
    let ops = daemon.ops_url().await;
    for _ in 0..300 {
        if addresses(&fussy).len() == 2 && addresses(&quick).len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(addresses(&fussy).len(), 2, "{}", daemon.log());

    // Act: fussy's customers go; its runs are refused from then on.
    fussy.crm.remove_customer(1);
    fussy.crm.remove_customer(2);
    let of = |tenant: &'static str, status: &'static str| {
        move |l: &serde_json::Value| {
            l["message"] == "run finished" && l["tenant"] == tenant && l["status"] == status
        }
    };
    daemon
        .expect_lines(
            "a refused run of fussy",
            of("fussy", "refused"),
            1,
            Duration::from_secs(30),
        )
        .await;
    let quick_before = daemon
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| of("quick", "succeeded")(l))
        .count();
    daemon
        .expect_lines(
            "three more succeeded runs of quick",
            of("quick", "succeeded"),
            quick_before + 3,
            Duration::from_secs(20),
        )
        .await;
    let health = http_get(format!("{ops}/healthz")).await.unwrap();
    let body: serde_json::Value = serde_json::from_str(&health.text().await.unwrap()).unwrap();
    daemon.signal("-TERM");
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));

    // Assert: fussy alone is failing, and kept its members; quick ran
    // start to end inside one of slow's runs.
    assert_eq!(body["failing_tenants"], json!(["fussy"]), "{body}");
    assert_eq!(addresses(&fussy).len(), 2);
    let runs = finished_runs(&daemon.lines.lock().unwrap());
    let (slows, quicks): (Vec<_>, Vec<_>) = runs
        .iter()
        .filter(|r| r.0 == "slow" || r.0 == "quick")
        .partition(|r| r.0 == "slow");
    assert!(
        quicks
            .iter()
            .any(|q| slows.iter().any(|s| s.1 < q.1 && q.2 < s.2)),
        "{runs:?}"
    );
}

#[tokio::test]
async fn no_more_jobs_run_at_once_than_max_parallel_jobs_over_all_tenants() {
    // Arrange: three tenants whose CRM answers slowly; one job at a time.
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = main_config(dir.path(), &db, "max_parallel_jobs = 1");
    let mut companies = Vec::new();
    for name in ["a", "b", "c"] {
        let sb = company(name, 1).await;
        sb.inject(
            "Customer/GetAllList",
            crm_edm_sync::sandbox::Fault::Delay(Duration::from_millis(700)),
            3,
        );
        put_tenant(&config, name, &tenant_file(&sb, ""));
        companies.push(sb);
    }

    // Act
    let mut daemon = Daemon::start(&config, &[]);
    daemon.ops_url().await;
    daemon
        .expect("run finished", 6, Duration::from_secs(40))
        .await;
    daemon.signal("-TERM");
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));

    // Assert: every tenant ran, and no two runs overlapped in time.
    let lines = daemon.lines.lock().unwrap().clone();
    let spans = run_spans(&lines);
    let tenants: std::collections::BTreeSet<&str> = spans.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(tenants.len(), 3, "{spans:?}");
    for (i, x) in spans.iter().enumerate() {
        for y in &spans[i + 1..] {
            let apart = x.2 <= y.1 || y.2 <= x.1;
            assert!(
                apart,
                "two runs at once with max_parallel_jobs = 1: {x:?} and {y:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_tenant_file_added_without_a_signal_is_served_within_a_minute() {
    // Arrange: a daemon serving acme.
    let db = TestDb::new().await;
    let (acme, late) = (company("acme", 1).await, company("late", 1).await);
    let dir = tempfile::tempdir().unwrap();
    let config = main_config(dir.path(), &db, "");
    put_tenant(&config, "acme", &tenant_file(&acme, ""));
    let mut daemon = Daemon::start(&config, &[]);
    daemon.ops_url().await;
    daemon
        .expect("run finished", 1, Duration::from_secs(30))
        .await;

    // Act: a file appears; no signal is sent.
    put_tenant(&config, "late", &tenant_file(&late, ""));
    let served = daemon
        .wait_for("tenant starts", 2, Duration::from_secs(60))
        .await;
    for _ in 0..100 {
        if addresses(&late).len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.signal("-TERM");
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));

    // Assert
    assert!(served, "{}", daemon.log());
    assert_eq!(addresses(&late), ["late1@example.com"]);
}

#[tokio::test]
async fn a_tenant_whose_file_turns_bad_keeps_running_on_its_settings_and_is_named_failing() {
    // Arrange: a daemon serving acme.
    let db = TestDb::new().await;
    let acme = company("acme", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = main_config(dir.path(), &db, "");
    put_tenant(&config, "acme", &tenant_file(&acme, ""));
    let mut daemon = Daemon::start(&config, &[]);
    let ops = daemon.ops_url().await;
    daemon
        .expect("run finished", 1, Duration::from_secs(30))
        .await;

    // Act: the file gets a bad value; SIGHUP; a new link-man appears.
    put_tenant(&config, "acme", &tenant_file(&acme, "list_id = \"one\""));
    daemon.signal("-HUP");
    daemon
        .expect("tenant file refused", 1, Duration::from_secs(10))
        .await;
    acme.crm
        .put_linkman(1, 99, json!({"name": "new", "email": "acme99@example.com"}));
    for _ in 0..100 {
        if addresses(&acme).len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health = http_get(format!("{ops}/healthz")).await.unwrap();
    let (code, body) = (health.status(), health.text().await.unwrap());
    daemon.signal("-TERM");
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));

    // Assert: still synced with its running settings, and named.
    assert_eq!(addresses(&acme).len(), 2, "{}", daemon.log());
    assert_eq!(code, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["failing_tenants"], json!(["acme"]), "{body}");
    assert!(
        body["reason"].as_str().unwrap().contains("sync.list_id"),
        "{body}"
    );
}
