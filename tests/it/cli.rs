//! The real binary against the sandbox: exit codes, the JSON summary event,
//! and no secret in any output.

use std::process::Output;
use std::time::Duration;

use crate::common::{TestDb, config_text, seed_basic};
use crm_edm_sync::edm::{basic_credentials, password_md5};
use crm_edm_sync::sandbox::{EDM_PASSWORD, EDM_USER, Fault, Sandbox, TOKEN};

const BIN: &str = env!("CARGO_BIN_EXE_crm-edm-sync");

struct Cli {
    sb: Sandbox,
    _db: TestDb,
    dir: tempfile::TempDir,
}

async fn setup(log_level: &str) -> Cli {
    let sb = Sandbox::start().await.unwrap();
    sb.edm.create_list(1, "客户");
    sb.edm.create_list(2, "VIP");
    seed_basic(&sb);
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        &sb,
        &db.url,
        "",
        &format!(
            "[log]\nformat = \"json\"\nlevel = \"{log_level}\"\n[http]\nlisten = \"127.0.0.1:0\"\n"
        ),
    );
    std::fs::write(dir.path().join("config.toml"), text).unwrap();
    Cli { sb, _db: db, dir }
}

impl Cli {
    fn config(&self) -> String {
        self.dir.path().join("config.toml").display().to_string()
    }

    async fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.arg("--config")
            .arg(self.config())
            .args(args)
            .env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .expect("binary finished in time")
            .expect("binary ran")
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The JSON log lines of an output whose `message` is `msg`.
fn events(o: &Output, msg: &str) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == msg)
        .collect()
}

#[tokio::test]
async fn once_exits_zero_and_logs_one_json_summary_event_with_the_counts() {
    let cli = setup("info").await;

    let out = cli.run(&["--once", "--job", "contacts"], &[]).await;

    assert!(out.status.success(), "{}", text(&out));
    let summaries = events(&out, "run finished");
    assert_eq!(summaries.len(), 1, "{}", text(&out));
    let s = &summaries[0];
    assert_eq!(s["job"], "contacts");
    assert_eq!(s["added"], 10);
    for field in [
        "run_id",
        "updated",
        "unsubscribed",
        "adopted",
        "skipped_invalid",
        "suppressed",
        "failed",
        "duration_ms",
    ] {
        assert!(!s[field].is_null(), "summary lacks {field}: {s}");
    }
    // Every stderr line is a JSON object.
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
}

#[tokio::test]
async fn writeback_logs_one_summary_event_with_counts_per_kind() {
    let cli = setup("info").await;
    assert!(
        cli.run(&["--once", "--job", "contacts"], &[])
            .await
            .status
            .success()
    );
    let day = crate::common::edm_today().format("%Y-%m-%d").to_string();
    cli.sb
        .edm
        .put_campaign(crm_edm_sync::sandbox::SandboxCampaign {
            id: 7,
            name: "活动".into(),
            list_id: 1,
            date: day.clone(),
            send_status: 3,
            track_status: 2,
            opens: vec![
                (
                    "lm1@example.com".into(),
                    2,
                    format!("{day} 09:00:00"),
                    format!("{day} 10:00:00"),
                ),
                ("x@example.com".into(), 1, String::new(), String::new()),
            ],
            ..Default::default()
        });

    let out = cli.run(&["--once", "--job", "writeback"], &[]).await;

    assert!(out.status.success(), "{}", text(&out));
    let summaries = events(&out, "run finished");
    assert_eq!(summaries.len(), 1, "{}", text(&out));
    let s = &summaries[0];
    assert_eq!(s["job"], "writeback");
    assert_eq!(
        (s["open"].as_u64(), s["unmatched"].as_u64()),
        (Some(1), Some(1))
    );
    for field in [
        "run_id",
        "click",
        "bounce",
        "unsubscribe",
        "failed",
        "duration_ms",
    ] {
        assert!(!s[field].is_null(), "summary lacks {field}: {s}");
    }
}

#[tokio::test]
async fn a_record_whose_answer_was_lost_is_sent_again_with_a_warning() {
    let cli = setup("info").await;
    assert!(
        cli.run(&["--once", "--job", "contacts"], &[])
            .await
            .status
            .success()
    );
    let day = crate::common::edm_today().format("%Y-%m-%d").to_string();
    cli.sb
        .edm
        .put_campaign(crm_edm_sync::sandbox::SandboxCampaign {
            id: 8,
            name: "活动".into(),
            list_id: 1,
            date: day,
            send_status: 3,
            track_status: 1,
            opens: vec![("lm2@example.com".into(), 1, String::new(), String::new())],
            ..Default::default()
        });
    cli.sb.inject("ContactHistory/Add", Fault::LoseAnswer, 1);

    let first = cli.run(&["--once", "--job", "writeback"], &[]).await;

    assert!(first.status.success(), "{}", text(&first));
    let warnings: Vec<_> = String::from_utf8_lossy(&first.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["level"] == "WARN"
                && v["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("may already be in the CRM")
        })
        .collect();
    assert_eq!(warnings.len(), 1, "{}", text(&first));
    assert_eq!(warnings[0]["link_man_id"], 20);
}

#[tokio::test]
async fn each_retry_is_a_warning_and_exhaustion_an_error() {
    let cli = setup("info").await;
    // One transient failure, then (next run) more than the 2 retries allow.
    cli.sb.inject("Customer/GetAllList", Fault::Status(503), 1);
    let recovered = cli.run(&["--once", "--job", "contacts"], &[]).await;
    cli.sb.inject("Customer/GetAllList", Fault::Status(503), 3);
    let exhausted = cli.run(&["--once", "--job", "contacts"], &[]).await;

    assert!(recovered.status.success(), "{}", text(&recovered));
    let warns = events(&recovered, "transient failure, retrying");
    assert_eq!(warns.len(), 1, "{}", text(&recovered));
    assert_eq!(warns[0]["level"], "WARN");
    assert_eq!(warns[0]["api"], "crm");
    assert_eq!(warns[0]["operation"], "Customer/GetAllList");
    assert_eq!(warns[0]["attempt"], 1);
    assert_eq!(exhausted.status.code(), Some(1));
    assert_eq!(events(&exhausted, "transient failure, retrying").len(), 2);
    let gave_up = events(&exhausted, "retries exhausted");
    assert_eq!(gave_up.len(), 1, "{}", text(&exhausted));
    assert_eq!(gave_up[0]["level"], "ERROR");
    assert_eq!(gave_up[0]["attempts"], 3);
}

#[tokio::test]
async fn every_line_a_run_writes_carries_its_job_and_run_id_and_stderr_is_only_json() {
    // Arrange: a retry inside the pull and an invalid email; both jobs run.
    let cli = setup("info").await;
    cli.sb.crm.put_linkman(
        1,
        11,
        serde_json::json!({"name": "坏", "email": "not-an-address"}),
    );
    cli.sb.inject("Customer/GetAllList", Fault::Status(503), 1);

    // Act
    let out = cli.run(&["--once"], &[]).await;

    // Assert
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let contacts_run = events(&out, "run finished")
        .into_iter()
        .find(|e| e["job"] == "contacts")
        .expect("a contacts summary")["run_id"]
        .clone();
    for msg in ["transient failure, retrying", "invalid email skipped"] {
        let line = lines
            .iter()
            .find(|l| l["message"] == msg)
            .unwrap_or_else(|| panic!("no {msg:?} line: {stderr}"));
        assert_eq!(line["job"], "contacts", "{line}");
        assert_eq!(line["run_id"], contacts_run, "{line}");
    }
    let writeback = lines
        .iter()
        .find(|l| l["message"] == "run finished" && l["job"] == "writeback")
        .expect("a writeback summary");
    assert_ne!(writeback["run_id"], contacts_run);
}

#[tokio::test]
async fn an_invalid_or_shared_address_is_logged_once_and_counted_every_run() {
    // Arrange: link-man 11 has an invalid email; 12 shares lm1's address.
    let cli = setup("info").await;
    cli.sb.crm.put_linkman(
        1,
        11,
        serde_json::json!({"name": "坏", "email": "not-an-address"}),
    );
    cli.sb.crm.put_linkman(
        1,
        12,
        serde_json::json!({"name": "同", "email": "lm1@example.com"}),
    );
    let run = || cli.run(&["--once", "--job", "contacts"], &[]);

    // Act
    let first = run().await;
    let second = run().await;
    cli.sb
        .crm
        .set_linkman_field(11, "email", serde_json::json!("fixed@example.com"));
    let fixed = run().await;
    cli.sb
        .crm
        .set_linkman_field(11, "email", serde_json::json!("broken again"));
    let again = run().await;

    // Assert
    let logged = |o: &Output, msg: &str| events(o, msg).len();
    assert_eq!(
        logged(&first, "invalid email skipped"),
        1,
        "{}",
        text(&first)
    );
    assert_eq!(
        logged(
            &first,
            "link-men share an email in one list; the lowest id owns it"
        ),
        1,
        "{}",
        text(&first)
    );
    assert_eq!(
        logged(&second, "invalid email skipped"),
        0,
        "{}",
        text(&second)
    );
    assert_eq!(
        logged(
            &second,
            "link-men share an email in one list; the lowest id owns it"
        ),
        0,
        "{}",
        text(&second)
    );
    let summary = &events(&second, "run finished")[0];
    assert_eq!(
        summary["skipped_invalid"], 1,
        "counted every run: {summary}"
    );
    assert_eq!(summary["duplicates"], 1, "{summary}");
    assert_eq!(logged(&fixed, "invalid email skipped"), 0);
    assert_eq!(
        logged(&again, "invalid email skipped"),
        1,
        "{}",
        text(&again)
    );
}

/// A run's error goes to stderr, where the log is, as an ERROR line — so
/// stderr stays JSON lines only — and the report on stdout ends with it in
/// words, as it does for a refusal.
#[tokio::test]
async fn a_failed_once_logs_its_error_on_stderr_and_reports_it_on_stdout() {
    // Arrange: a CRM that answers 500 to every page.
    let cli = setup("info").await;
    cli.sb
        .inject("Customer/GetAllList", Fault::Status(500), 100);

    // Act
    let out = cli.run(&["--once", "--job", "contacts"], &[]).await;

    // Assert
    assert_eq!(out.status.code(), Some(1));
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON on stderr: {line}"
        );
    }
    let errors = events(&out, "run failed");
    assert_eq!(errors.len(), 1, "{}", text(&out));
    assert_eq!(errors[0]["level"], "ERROR");
    assert_eq!(errors[0]["job"], "contacts");
    let error = errors[0]["error"].as_str().unwrap();
    assert!(error.contains("500"), "{error}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim_end(),
        format!("crm-edm-sync: contacts: {error}")
    );
}

#[tokio::test]
async fn dry_run_prints_the_plan_and_exits_zero_without_writing() {
    let cli = setup("info").await;

    let out = cli
        .run(&["--once", "--job", "contacts", "--dry-run"], &[])
        .await;

    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("plan: 10 adds"), "{stdout}");
    assert!(stdout.contains("nothing was changed"), "{stdout}");
    assert_eq!(cli.sb.edm_writes(), 0);
}

#[tokio::test]
async fn refused_plan_exits_non_zero_and_logs_an_error() {
    let cli = setup("info").await;
    assert!(
        cli.run(&["--once", "--job", "contacts"], &[])
            .await
            .status
            .success()
    );
    for c in 1..=3 {
        cli.sb.crm.remove_linkman(c * 10);
    }

    let out = cli.run(&["--once", "--job", "contacts"], &[]).await;

    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let refusals = events(&out, "plan refused");
    assert_eq!(refusals.len(), 1, "{}", text(&out));
    assert_eq!(refusals[0]["level"], "ERROR");
    // --force applies it.
    let forced = cli
        .run(&["--once", "--job", "contacts", "--force"], &[])
        .await;
    assert!(forced.status.success(), "{}", text(&forced));
    assert_eq!(cli.sb.edm.emails(1).len(), 2);
}

#[tokio::test]
async fn a_dry_run_whose_plan_would_be_refused_says_so_in_words_and_exits_1() {
    // Arrange: list 1 holds five owned members; three of them leave the CRM.
    let cli = setup("info").await;
    let first = cli.run(&["--once", "--job", "contacts"], &[]).await;
    assert!(first.status.success(), "{}", text(&first));
    for c in 1..=3 {
        cli.sb.crm.remove_linkman(c * 10);
    }
    let writes = cli.sb.edm_writes();

    // Act
    let out = cli
        .run(&["--once", "--job", "contacts", "--dry-run"], &[])
        .await;

    // Assert: exit 1 like the real run, the refusal in words, no write.
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "refused: 3 of 5 members of list 1 would be unsubscribed (ratio 0.60 > 0.20); --force would apply it"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("nothing was changed"), "{stdout}");
    assert_eq!(cli.sb.edm_writes(), writes);
}

#[tokio::test]
async fn a_dry_run_plan_file_holds_every_planned_operation_as_json_lines() {
    // Arrange: after a first sync, one link-man renamed, one gone, one new,
    // and one recipient unsubscribed in EDM.
    let cli = setup("info").await;
    let first = cli.run(&["--once", "--job", "contacts"], &[]).await;
    assert!(first.status.success(), "{}", text(&first));
    cli.sb
        .crm
        .set_linkman_field(40, "name", serde_json::json!("改名"));
    cli.sb.crm.remove_linkman(50);
    cli.sb.crm.put_linkman(
        1,
        11,
        serde_json::json!({"name": "新人", "email": "new@example.com"}),
    );
    cli.sb.edm.user_unsubscribe(2, "lm7@example.com");
    let plan = cli.dir.path().join("plan.jsonl");
    let writes = cli.sb.edm_writes();
    // An older plan lies there, readable by everyone: it is replaced by a
    // file of the owner's only, not written into.
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(&plan, "old plan\n").unwrap();
    std::fs::set_permissions(&plan, std::fs::Permissions::from_mode(0o644)).unwrap();

    // Act
    let out = cli
        .run(
            &[
                "--once",
                "--job",
                "contacts",
                "--dry-run",
                "--plan",
                plan.to_str().unwrap(),
            ],
            &[],
        )
        .await;

    // Assert
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("fullname \"联系人4\" → \"改名\""),
        "the edit sample shows old → new: {stdout}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&plan)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let of = |kind: &str| -> Vec<&serde_json::Value> {
        lines.iter().filter(|l| l["kind"] == kind).collect()
    };
    let adds = of("add");
    assert_eq!(adds.len(), 1, "{lines:?}");
    assert_eq!(adds[0]["email"], "new@example.com");
    assert_eq!(adds[0]["list_id"], 1);
    assert_eq!(adds[0]["link_man_id"], 11);
    assert_eq!(adds[0]["customer_id"], 1);
    assert_eq!(adds[0]["fields"]["fullname"], "新人");
    let edits = of("edit");
    assert_eq!(edits.len(), 1, "{lines:?}");
    assert_eq!(edits[0]["email"], "lm4@example.com");
    assert_eq!(edits[0]["old"]["fullname"], "联系人4");
    assert_eq!(edits[0]["new"]["fullname"], "改名");
    assert_eq!(edits[0]["new"]["vars"][0], "公司4");
    let unsubs = of("unsub");
    assert_eq!(unsubs.len(), 1, "{lines:?}");
    assert_eq!(unsubs[0]["email"], "lm5@example.com");
    assert_eq!(unsubs[0]["link_man_id"], 50);
    let user = of("user_unsubscribe");
    assert_eq!(user.len(), 1, "{lines:?}");
    assert_eq!(user[0]["email"], "lm7@example.com");
    assert_eq!(user[0]["list_id"], 2);
    assert_eq!(of("suppressed").len(), 1, "{lines:?}");
    assert!(of("refusal").is_empty(), "{lines:?}");
    assert_eq!(
        std::fs::metadata(&plan).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(cli.sb.edm_writes(), writes, "a dry run writes nothing");
}

#[tokio::test]
async fn a_plan_file_for_the_writeback_job_alone_is_refused_in_words() {
    let cli = setup("info").await;
    let plan = cli.dir.path().join("never.jsonl");

    let out = cli
        .run(
            &[
                "--once",
                "--job",
                "writeback",
                "--dry-run",
                "--plan",
                plan.to_str().unwrap(),
            ],
            &[],
        )
        .await;

    // A usage error (exit 2), found before any database is opened.
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--job writeback has none"),
        "{}",
        text(&out)
    );
    assert!(!plan.exists());
}

/// `--once` and its flags next to a command would be ignored (`--once
/// --dry-run check` even migrated the database): a usage error, exit 2,
/// before any database is opened.
#[tokio::test]
async fn run_flags_next_to_a_command_are_a_usage_error_before_any_database_is_opened() {
    let cli = setup("info").await;
    let untouched = cli.dir.path().join("never-opened.db");
    let url = format!("sqlite://{}?mode=rwc", untouched.display());
    for args in [
        vec!["--once", "--dry-run", "check"],
        vec!["--once", "status"],
        vec!["--full", "--once", "health"],
        vec!["--job", "contacts", "--once", "explain", "a@b.cn"],
    ] {
        let out = cli
            .run(&args, &[("CRM_EDM_SYNC__DATABASE__URL", url.as_str())])
            .await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("cannot be used with the command"),
            "{args:?}: {}",
            text(&out)
        );
        assert!(!untouched.exists(), "{args:?} opened the database");
    }
}

#[tokio::test]
async fn a_refused_dry_run_plan_file_ends_with_the_refusal() {
    let cli = setup("info").await;
    let first = cli.run(&["--once", "--job", "contacts"], &[]).await;
    assert!(first.status.success(), "{}", text(&first));
    for c in 1..=3 {
        cli.sb.crm.remove_linkman(c * 10);
    }
    let plan = cli.dir.path().join("refused.jsonl");

    let out = cli
        .run(
            &["--once", "--dry-run", "--plan", plan.to_str().unwrap()],
            &[],
        )
        .await;

    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let text_of_plan = std::fs::read_to_string(&plan).unwrap();
    let last: serde_json::Value =
        serde_json::from_str(text_of_plan.lines().last().unwrap()).unwrap();
    assert_eq!(last["kind"], "refusal");
    assert_eq!(last["list_id"], 1);
    assert_eq!(last["unsubscribes"], 3);
    assert_eq!(last["members"], 5);
    assert_eq!(
        text_of_plan
            .lines()
            .filter(|l| l.contains("\"unsub\""))
            .count(),
        3
    );
}

/// An empty pull is refused about every list: the plan file has a
/// refusal line per list with the same fields a ratio refusal has, and the
/// refused real run says so on stdout as every other failure does.
#[tokio::test]
async fn an_empty_pull_refusal_names_each_list_and_a_refused_run_says_so_on_stdout() {
    // Arrange: a good sync, then a CRM with no customer at all.
    let cli = setup("info").await;
    let first = cli.run(&["--once", "--job", "contacts"], &[]).await;
    assert!(first.status.success(), "{}", text(&first));
    for c in 1..=10 {
        cli.sb.crm.remove_customer(c);
    }
    let plan = cli.dir.path().join("empty.jsonl");

    // Act
    let dry = cli
        .run(
            &[
                "--once",
                "--job",
                "contacts",
                "--dry-run",
                "--plan",
                plan.to_str().unwrap(),
            ],
            &[],
        )
        .await;
    let real = cli.run(&["--once", "--job", "contacts"], &[]).await;

    // Assert
    assert_eq!(dry.status.code(), Some(1), "{}", text(&dry));
    let refusals: Vec<serde_json::Value> = std::fs::read_to_string(&plan)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|l: &serde_json::Value| l["kind"] == "refusal")
        .collect();
    let lists: Vec<i64> = refusals
        .iter()
        .map(|r| r["list_id"].as_i64().unwrap())
        .collect();
    assert_eq!(lists, [1, 2], "{refusals:?}");
    for r in &refusals {
        for field in ["unsubscribes", "members", "max_unsubscribe_ratio", "reason"] {
            assert!(!r[field].is_null(), "{field} missing: {r}");
        }
    }
    assert_eq!(real.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&real.stdout);
    assert!(
        stdout.contains("refused: the CRM pull produced no valid member"),
        "{stdout}"
    );
}

#[tokio::test]
async fn bad_config_exits_2_naming_the_key() {
    let cli = setup("info").await;
    let bad = cli.dir.path().join("bad.toml");
    std::fs::write(&bad, "[crm]\nbase_url = \"http://x.test\"\ntoken = \"t\"\npage_size = 500\n[edm]\nusername = \"u\"\npassword = \"p\"\n").unwrap();

    let out = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&bad)
        .args(["--once"])
        .output()
        .await
        .unwrap();

    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("crm.page_size"),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn unknown_config_key_exits_2_naming_it() {
    let cli = setup("info").await;
    let out = cli
        .run(&["status"], &[("CRM_EDM_SYNC__SYNC__LIST_IDD", "3")])
        .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("list_idd"),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn with_no_config_file_at_all_the_error_says_which_paths_were_tried() {
    // Arrange: a working directory without config/default.toml, and no
    // system-wide file on this machine.
    assert!(
        !std::path::Path::new("/etc/crm-edm-sync/config.toml").exists(),
        "this test needs a machine without /etc/crm-edm-sync/config.toml"
    );
    let empty = tempfile::tempdir().unwrap();

    // Act
    let out = tokio::process::Command::new(BIN)
        .arg("check")
        .current_dir(empty.path())
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap();

    // Assert
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "no config file found (tried /etc/crm-edm-sync/config.toml, config/default.toml"
        ),
        "{err}"
    );
    assert!(err.contains("crm.base_url"), "{err}");
}

#[tokio::test]
async fn status_explain_and_health_need_no_api_credentials() {
    // Arrange: a config with the state database and the ops address only,
    // after a run made with full settings.
    let cli = setup("info").await;
    cli.run(&["--once", "--job", "contacts"], &[]).await;
    let db_url = std::fs::read_to_string(cli.config())
        .unwrap()
        .lines()
        .find(|l| l.starts_with("url = "))
        .expect("the database url line")
        .to_string();
    let bare = cli.dir.path().join("bare.toml");
    std::fs::write(
        &bare,
        format!("[database]\n{db_url}\n[http]\nlisten = \"127.0.0.1:9\"\n"),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.arg("--config")
            .arg(&bare)
            .args(args)
            .env_remove("RUST_LOG");
        cmd.output().unwrap()
    };

    // Act
    let status = run(&["status"]);
    let explain = run(&["explain", "lm1@example.com"]);
    let health = run(&["health"]);
    let live = run(&["explain", "--live", "lm1@example.com"]);
    let once = run(&["--once"]);

    // Assert: the state-only commands answer; those that call the APIs
    // name the first missing key.
    assert_eq!(status.status.code(), Some(0), "{}", text(&status));
    assert!(
        text(&status).contains("contacts succeeded"),
        "{}",
        text(&status)
    );
    assert_eq!(explain.status.code(), Some(0), "{}", text(&explain));
    assert_eq!(
        health.status.code(),
        Some(1),
        "no daemon: {}",
        text(&health)
    );
    for out in [live, once] {
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(text(&out).contains("crm.base_url"), "{}", text(&out));
    }
}

#[tokio::test]
async fn status_and_check_exit_zero_and_report() {
    let cli = setup("info").await;
    cli.run(&["--once", "--job", "contacts"], &[]).await;

    let status = cli.run(&["status"], &[]).await;
    let check = cli.run(&["check"], &[]).await;

    assert!(status.status.success(), "{}", text(&status));
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("contacts succeeded"),
        "{}",
        text(&status)
    );
    assert!(check.status.success(), "{}", text(&check));
    let out = String::from_utf8_lossy(&check.stdout);
    for line in ["config: ok", "database: ok", "edm: ok", "crm: ok"] {
        assert!(out.contains(line), "{out}");
    }
}

#[tokio::test]
async fn status_json_is_machine_readable() {
    let cli = setup("info").await;
    cli.run(&["--once", "--job", "contacts"], &[]).await;
    cli.sb.edm.user_unsubscribe(1, "lm1@example.com");
    cli.run(&["--once", "--job", "contacts"], &[]).await;

    let out = cli.run(&["status", "--json"], &[]).await;

    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{v}");
    assert!(
        runs.iter()
            .any(|r| r["job"] == "contacts" && r["counts"]["added"] == 10),
        "{v}"
    );
    assert_eq!(v["pending_operations"]["total"], 0);
    assert_eq!(v["suppressions"]["user_unsubscribe"], 1);
    assert!(
        v["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["list_id"] == 2 && m["count"] == 5),
        "{v}"
    );
}

#[tokio::test]
async fn check_says_which_api_failed() {
    let cli = setup("info").await;
    let out = cli
        .run(
            &["check"],
            &[("CRM_EDM_SYNC__CRM__TOKEN", "wrong-token-1234")],
        )
        .await;
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("crm: FAILED"), "{stdout}");
    assert!(stdout.contains("crm.token"), "{stdout}");
    assert!(stdout.contains("edm: ok"), "{stdout}");
}

/// `check` writes nothing: a `database.url` that names no database yet
/// (a typo, or a fresh install) is said, not created.
#[tokio::test]
async fn check_creates_no_state_database_and_says_there_is_none_yet() {
    // Arrange
    let cli = setup("info").await;
    let fresh = cli.dir.path().join("typo-state.db");
    let url = format!("sqlite://{}?mode=rwc", fresh.display());

    // Act
    let out = cli
        .run(&["check"], &[("CRM_EDM_SYNC__DATABASE__URL", url.as_str())])
        .await;

    // Assert
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(stdout.contains("no state database there yet"), "{stdout}");
    assert!(!fresh.exists(), "check created {}", fresh.display());
}

#[tokio::test]
async fn check_names_crm_token_when_the_crm_refuses_it_in_a_200_body() {
    let cli = setup("info").await;
    cli.sb.crm.auth_error_in_body(true);

    let out = cli
        .run(
            &["check"],
            &[("CRM_EDM_SYNC__CRM__TOKEN", "wrong-token-4321")],
        )
        .await;

    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("crm: FAILED"), "{stdout}");
    assert!(stdout.contains("crm.token"), "{stdout}");
    assert!(!text(&out).contains("wrong-token-4321"), "{}", text(&out));
}

#[tokio::test]
async fn check_fails_naming_a_list_id_the_edm_account_does_not_have() {
    let cli = setup("info").await;

    let out = cli
        .run(&["check"], &[("CRM_EDM_SYNC__SYNC__LIST_ID", "9")])
        .await;

    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "edm lists: FAILED: sync.list_id = 9: no such list in the EDM account (it has: 1, 2)"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("edm lists: ok: sync.routes[0].list_id = 2"),
        "{stdout}"
    );
}

#[tokio::test]
async fn check_warns_when_the_edm_service_is_disabled_ends_soon_or_is_short_of_quota() {
    let cli = setup("info").await;
    let soon = (crate::common::edm_today() + chrono::Duration::days(5))
        .format("%Y-%m-%d")
        .to_string();
    cli.sb.edm.set_service("disabled", &soon, 3);
    assert!(
        cli.run(&["--once", "--job", "contacts"], &[])
            .await
            .status
            .success()
    );

    let out = cli.run(&["check"], &[]).await;

    assert_eq!(
        out.status.code(),
        Some(0),
        "warnings do not fail: {}",
        text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("edm service: WARNING: the sending service is disabled"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "edm service: WARNING: the sending service ends on {soon}, in 5 days"
        )),
        "{stdout}"
    );
    assert!(
        stdout
            .contains("edm service: WARNING: quota low: 3 sends left, fewer than the 10 addresses"),
        "{stdout}"
    );
}

#[tokio::test]
async fn check_fails_naming_example_placeholders_and_unknown_contact_history_ids() {
    let cli = setup("info").await;

    let out = cli
        .run(
            &["check"],
            &[
                (
                    "CRM_EDM_SYNC__CRM__TOKEN",
                    "set-me-or-use-CRM_EDM_SYNC__CRM__TOKEN",
                ),
                ("CRM_EDM_SYNC__WRITEBACK__TYPE_ID", "9"),
                ("CRM_EDM_SYNC__WRITEBACK__ROUTE_ID", "0"),
            ],
        )
        .await;

    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("config: FAILED: crm.token is still the example's placeholder"),
        "{stdout}"
    );
    assert!(
        stdout.contains("config: FAILED: writeback.type_id = 9 is not a contact category"),
        "{stdout}"
    );
    assert!(
        stdout.contains("config: FAILED: writeback.route_id = 0 is not a contact route"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("set-me-or-use"),
        "the value is not printed: {stdout}"
    );
}

/// Rule 11: the token, the password and its MD5 never appear in any
/// output, at any log level, whether commands succeed or fail.
#[tokio::test]
async fn no_command_prints_the_token_the_password_or_its_md5() {
    let cli = setup("trace").await;
    let wrong_password = "Wrong-Edm-Password-777";
    let wrong_token = "Wrong-Crm-Token-888";
    let secrets = [
        TOKEN.to_string(),
        EDM_PASSWORD.to_string(),
        password_md5(EDM_PASSWORD),
        basic_credentials(EDM_USER, EDM_PASSWORD),
        wrong_password.to_string(),
        password_md5(wrong_password),
        basic_credentials(EDM_USER, wrong_password),
        wrong_token.to_string(),
    ];
    let basic_url = cli.sb.edm_basic_url();
    let basic = [
        ("RUST_LOG", "trace"),
        ("CRM_EDM_SYNC__EDM__AUTH", "basic"),
        ("CRM_EDM_SYNC__EDM__BASE_URL", basic_url.as_str()),
    ];
    let trace = [("RUST_LOG", "trace")];
    let mut outputs = Vec::new();
    outputs.push(
        cli.run(&["--once", "--job", "contacts", "--dry-run"], &trace)
            .await,
    );
    outputs.push(cli.run(&["--once", "--job", "contacts"], &trace).await);
    cli.sb.inject("ml-unsub", Fault::LoseAnswer, 1);
    cli.sb.inject("Customer/GetAllList", Fault::Status(503), 1);
    cli.sb.crm.remove_linkman(10);
    outputs.push(cli.run(&["--once", "--job", "contacts"], &trace).await);
    outputs.push(
        cli.run(
            &["--once"],
            &[("CRM_EDM_SYNC__EDM__PASSWORD", wrong_password)],
        )
        .await,
    );
    outputs.push(
        cli.run(&["--once"], &[("CRM_EDM_SYNC__CRM__TOKEN", wrong_token)])
            .await,
    );
    outputs.push(cli.run(&["status"], &trace).await);
    outputs.push(cli.run(&["check"], &trace).await);
    outputs.push(
        cli.run(
            &["check"],
            &[
                ("CRM_EDM_SYNC__EDM__PASSWORD", wrong_password),
                ("CRM_EDM_SYNC__CRM__TOKEN", wrong_token),
            ],
        )
        .await,
    );
    outputs.push(daemon_start_stop(&cli).await);
    // The same with HTTP Basic auth (`edm.auth = "basic"`).
    outputs.push(cli.run(&["--once", "--job", "contacts"], &basic).await);
    outputs.push(cli.run(&["check"], &basic).await);
    let wrong_basic = [
        basic[1],
        basic[2],
        ("CRM_EDM_SYNC__EDM__PASSWORD", wrong_password),
    ];
    outputs.push(cli.run(&["--once"], &wrong_basic).await);
    outputs.push(cli.run(&["check"], &wrong_basic).await);

    assert!(
        outputs.iter().any(|o| !o.status.success()),
        "some runs were meant to fail"
    );
    let mut total = 0;
    for out in &outputs {
        let all = text(out);
        total += all.len();
        for secret in &secrets {
            assert!(
                !all.contains(secret.as_str()),
                "output contains a secret:\n{all}"
            );
        }
    }
    assert!(total > 10_000, "trace output expected, got {total} bytes");
}

/// Starts the daemon at trace level, waits until it holds the instance
/// lock (its jobs are scheduled), stops it with SIGTERM and returns all it
/// wrote.
async fn daemon_start_stop(cli: &Cli) -> Output {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(cli.config())
        .env("RUST_LOG", "trace")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = stderr.clone();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let reader = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let mut all = sink.lock().unwrap();
            all.push_str(&line);
            all.push('\n');
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !stderr.lock().unwrap().contains("holding the instance lock") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the daemon never took the lock:\n{}",
            stderr.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let mut out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("daemon stops on SIGTERM")
        .unwrap();
    reader.await.unwrap();
    out.stderr = stderr.lock().unwrap().clone().into_bytes();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("daemon started"), "{}", text(&out));
    out
}

/// The last line a failing command prints (and logs) goes through the
/// redactor: a secret that reached an error through text the daemon does
/// not shape itself — here the token inside a directory name, echoed by
/// the lock file's error — does not reach the terminal.
#[tokio::test]
async fn the_final_error_line_of_a_failing_command_is_scrubbed_of_secrets() {
    // Arrange: a database path that holds the token and cannot be opened.
    let cli = setup("info").await;
    let url = format!("sqlite:///nonexistent-{TOKEN}/state.db?mode=rwc");
    let text_cfg = config_text(&cli.sb, &url, "", "[log]\nformat = \"json\"\n");
    let config = cli.dir.path().join("leaky.toml");
    std::fs::write(&config, text_cfg).unwrap();

    // Act
    let out = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["--once", "--job", "contacts"])
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap();

    // Assert: it failed, said why, and named no secret.
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("lock file"), "{all}");
    assert!(!all.contains(TOKEN), "{all}");
}

/// Routine commands on a current database log no PostgreSQL notice
/// ("relation … already exists, skipping") and no migrator line; the one
/// run that migrates says so once, in the daemon's own words.
#[tokio::test]
async fn routine_commands_log_no_database_notices_or_migrator_lines() {
    for db in TestDb::all().await {
        // Arrange
        let sb = Sandbox::start().await.unwrap();
        sb.edm.create_list(1, "客户");
        sb.edm.create_list(2, "VIP");
        seed_basic(&sb);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            config_text(
                &sb,
                &db.url,
                "",
                "[log]\nformat = \"json\"\nlevel = \"info\"\n",
            ),
        )
        .unwrap();
        let run = |args: &'static [&'static str]| {
            let config = config.clone();
            async move {
                tokio::process::Command::new(BIN)
                    .arg("--config")
                    .arg(&config)
                    .args(args)
                    .env_remove("RUST_LOG")
                    .output()
                    .await
                    .unwrap()
            }
        };

        // Act
        let first = run(&["--once", "--job", "contacts"]).await;
        let second = run(&["--once", "--job", "contacts"]).await;
        let status = run(&["status"]).await;

        // Assert
        let lines = |o: &Output| -> Vec<serde_json::Value> {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        };
        for out in [&first, &second, &status] {
            assert!(out.status.success(), "{}", text(out));
            for line in lines(out) {
                let target = line["target"].as_str().unwrap_or("");
                let message = line["message"].as_str().unwrap_or("");
                assert!(!message.contains("already exists"), "{line}");
                assert!(!target.starts_with("sea_orm_migration"), "{line}");
                assert!(!target.starts_with("sqlx"), "{line}");
            }
        }
        let migrated = |o: &Output| {
            lines(o)
                .iter()
                .filter(|l| l["message"].as_str().unwrap_or("").contains("migrated"))
                .count()
        };
        assert_eq!(migrated(&first), 1, "{}", text(&first));
        assert_eq!(migrated(&second), 0, "{}", text(&second));
    }
}

#[tokio::test]
async fn a_config_in_an_unreadable_directory_is_named_permission_denied_not_missing() {
    // Arrange: a config in a directory only its owner (root, or this
    // user) may enter; the binary run as someone else (nobody, when the
    // tests run as root) or with the directory closed to everyone.
    let dir = tempfile::tempdir().unwrap();
    let closed = dir.path().join("closed");
    std::fs::create_dir(&closed).unwrap();
    let config = closed.join("config.toml");
    std::fs::write(&config, "[crm]\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    let as_root = nix_is_root();
    let mode = if as_root { 0o700 } else { 0o000 };
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = if as_root {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
        c
    } else {
        std::process::Command::new(BIN)
    };

    // Act
    let out = cmd
        .arg("--config")
        .arg(&config)
        .arg("status")
        .output()
        .unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();

    // Assert
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    assert!(!err.contains("not found"), "{err}");
}

/// Whether this process runs as root (it may read any directory).
fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap_or(false)
}
