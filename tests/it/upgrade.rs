//! Upgrading from the previous release: a state database that release
//! wrote (kept in `tests/fixtures/previous-release/`, one file for each
//! backend) opens under this binary, becomes tenant `default` of a
//! tenants directory, and loses nothing — neither a member nor an
//! unsubscribe.
//!
//! The fixtures come from [`writes_the_previous_release_fixtures`], run
//! by hand with the previous release's binary (see its doc comment).

use std::path::{Path, PathBuf};

use crm_edm_sync::sandbox::Sandbox;
use sea_orm::{ConnectionTrait, Database};
use serde_json::json;

use crate::common::binary::ok;
use crate::common::{TestDb, applied_adds};
use crate::tenants::{main_config, put_tenant, tenant_file};

/// The release whose databases the fixtures hold.
const PREVIOUS_RELEASE: &str = "b23466b";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/previous-release")
}

/// The company both releases sync: three customers, one link-man each
/// (`lm1@…`, `lm2@…`, `lm3@…`), and list 1.
fn company(sb: &Sandbox) {
    sb.edm.create_list(1, "客户");
    for c in 1..=3 {
        sb.crm.put_customer(c, json!({"name": format!("公司{c}")}));
        sb.crm.put_linkman(
            c,
            c * 10,
            json!({"name": format!("lm{c}"), "email": format!("lm{c}@example.com")}),
        );
    }
}

fn single_config(dir: &Path, sb: &Sandbox, url: &str) -> PathBuf {
    let path = dir.join("single.toml");
    std::fs::write(
        &path,
        format!("{}\n[sync]\nlist_id = 1\n", sb.config_toml(url)),
    )
    .unwrap();
    path
}

/// Writes the fixtures with the previous release's binary: it adds the
/// three link-men, lm2 unsubscribes through EDM, and a second run records
/// that. Run by hand when a release is cut:
///
/// ```text
/// git worktree add /tmp/previous <release> && cargo build --manifest-path /tmp/previous/Cargo.toml
/// CRM_EDM_SYNC_PREVIOUS_BIN=/tmp/previous/target/debug/crm-edm-sync \
///   CRM_EDM_SYNC_TEST_PG=postgres://postgres@127.0.0.1:5432 \
///   cargo test --test it upgrade::writes -- --ignored
/// ```
///
/// and change [`PREVIOUS_RELEASE`].
#[tokio::test]
#[ignore = "writes the fixtures; needs the previous release's binary"]
async fn writes_the_previous_release_fixtures() {
    let previous = std::env::var("CRM_EDM_SYNC_PREVIOUS_BIN").expect("CRM_EDM_SYNC_PREVIOUS_BIN");
    std::fs::create_dir_all(fixtures()).unwrap();
    let pg = TestDb::postgres().await.expect("CRM_EDM_SYNC_TEST_PG");
    for db in [TestDb::sqlite(), pg] {
        let sb = Sandbox::start().await.unwrap();
        company(&sb);
        let dir = tempfile::tempdir().unwrap();
        let config = single_config(dir.path(), &sb, &db.url);
        // The sandbox answers on this test's runtime: wait without
        // blocking it.
        let once = || async {
            let status = tokio::process::Command::new(&previous)
                .arg("--config")
                .arg(&config)
                .args(["--once", "--job", "contacts"])
                .status()
                .await
                .unwrap();
            assert!(status.success());
        };
        once().await;
        sb.edm.user_unsubscribe(1, "lm2@example.com");
        once().await;
        if db.url.starts_with("sqlite:") {
            let file = fixtures().join("state.db");
            let _ = std::fs::remove_file(&file);
            let conn = Database::connect(&db.url).await.unwrap();
            conn.execute_unprepared(&format!("VACUUM INTO '{}'", file.display()))
                .await
                .unwrap();
        } else {
            let dump = std::process::Command::new("pg_dump")
                .args(["--inserts", "--no-owner", "--no-privileges", &db.url])
                .output()
                .unwrap();
            assert!(dump.status.success());
            std::fs::write(fixtures().join("state.sql"), dump.stdout).unwrap();
        }
    }
}

/// Puts the previous release's database for `db`'s backend in place.
async fn restore_previous_release(db: &TestDb) {
    if let Some(path) = db.url.strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap();
        std::fs::copy(fixtures().join("state.db"), path).unwrap();
        return;
    }
    let dump = std::fs::read_to_string(fixtures().join("state.sql")).unwrap();
    // psql's own commands (`\restrict`) are not SQL.
    let sql: String = dump
        .lines()
        .filter(|l| !l.starts_with('\\'))
        .collect::<Vec<_>>()
        .join("\n");
    let conn = Database::connect(&db.url).await.unwrap();
    conn.execute_unprepared(&sql).await.unwrap();
}

#[tokio::test]
async fn a_database_written_by_the_previous_release_becomes_tenant_default_with_nothing_lost() {
    for db in TestDb::all().await {
        // Arrange: the previous release's database, and EDM as that
        // release left it (three members, lm2 unsubscribed by himself).
        restore_previous_release(&db).await;
        let sb = Sandbox::start().await.unwrap();
        company(&sb);
        for c in 1..=3 {
            sb.edm
                .add_existing(1, &format!("lm{c}@example.com"), &format!("lm{c}"));
        }
        sb.edm.user_unsubscribe(1, "lm2@example.com");
        let dir = tempfile::tempdir().unwrap();
        let config = main_config(dir.path(), &db, "");
        put_tenant(&config, "default", &tenant_file(&sb, ""));

        // Act: this release runs over it as tenant `default`.
        ok(&config, &["--once", "--job", "contacts"]).await;
        let status = ok(&config, &["status", "--tenant", "default", "--json"]).await;
        let trail = ok(
            &config,
            &["audit", "lm2@example.com", "--tenant", "default", "--json"],
        )
        .await;

        // Assert: nobody was added again, lm2 stayed out of the list, the
        // earlier runs and lm2's consent trail are all still there.
        assert!(
            applied_adds(&sb).is_empty(),
            "{}: {:?}",
            db.url,
            applied_adds(&sb)
        );
        assert_eq!(
            sb.edm.emails(1),
            ["lm1@example.com", "lm3@example.com"],
            "{}",
            db.url
        );
        let report: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        let contacts_runs = report["runs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["job"] == "contacts")
            .count();
        assert_eq!(
            contacts_runs, 3,
            "{} ({PREVIOUS_RELEASE}): {report}",
            db.url
        );
        let trail: serde_json::Value = serde_json::from_slice(&trail.stdout).unwrap();
        let events: Vec<&str> = trail
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event"].as_str().unwrap())
            .collect();
        assert!(
            events.starts_with(&["added", "recipient_unsubscribed"]),
            "{}: {events:?}",
            db.url
        );
    }
}
