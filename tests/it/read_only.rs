//! `status` and `--dry-run` change nothing: they leave the state database
//! byte-for-byte as they found it (no migration, no run row, no lock file),
//! a missing database is reported by `status` and read as empty by a dry
//! run — on SQLite and on PostgreSQL.

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use crate::common::{TestDb, config_text, seed_basic};
use crm_edm_sync::sandbox::Sandbox;
use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_crm-edm-sync");

const TABLES: [&str; 8] = [
    "members",
    "operations",
    "suppressions",
    "unsub_lines",
    "list_state",
    "runs",
    "writeback_ledger",
    "seaql_migrations",
];

struct Setup {
    sb: Sandbox,
    db: TestDb,
    dir: tempfile::TempDir,
}

async fn setup(db: TestDb) -> Setup {
    let sb = Sandbox::start().await.unwrap();
    sb.edm.create_list(1, "客户");
    sb.edm.create_list(2, "VIP");
    seed_basic(&sb);
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&sb, &db.url, "", "[log]\nformat = \"json\"\n");
    std::fs::write(dir.path().join("config.toml"), text).unwrap();
    Setup { sb, db, dir }
}

impl Setup {
    async fn run(&self, args: &[&str]) -> Output {
        let out = tokio::process::Command::new(BIN)
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .args(args)
            .env_remove("RUST_LOG")
            .output();
        tokio::time::timeout(Duration::from_secs(60), out)
            .await
            .expect("finished in time")
            .expect("ran")
    }

    /// Everything the state database is: for SQLite every file beside it
    /// whose name starts with the database's (the database, its journal,
    /// its lock files) with its bytes; for PostgreSQL every row of every
    /// table, and which tables exist.
    async fn snapshot(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if self.db.url.starts_with("sqlite:") {
            let file = self
                .db
                .url
                .trim_start_matches("sqlite://")
                .split('?')
                .next()
                .unwrap()
                .to_string();
            let file = std::path::Path::new(&file);
            let stem = file.file_name().unwrap().to_string_lossy().to_string();
            for entry in std::fs::read_dir(file.parent().unwrap()).unwrap() {
                let entry = entry.unwrap();
                let name = entry.file_name().to_string_lossy().to_string();
                if name.ends_with("-shm") {
                    // SQLite's shared-memory WAL index, not the database:
                    // every reader updates its read marks there.
                    out.insert(name, "exists".into());
                } else if name.starts_with(&stem) {
                    let bytes = std::fs::read(entry.path()).unwrap();
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    std::hash::Hash::hash(&bytes, &mut h);
                    let digest = std::hash::Hasher::finish(&h);
                    out.insert(name, format!("{} bytes, hash {digest:x}", bytes.len()));
                }
            }
        } else {
            let db = Database::connect(&self.db.url).await.unwrap();
            for table in TABLES {
                let rows = db
                    .query_all_raw(Statement::from_string(
                        DbBackend::Postgres,
                        format!("SELECT row_to_json(t)::text AS r FROM {table} t ORDER BY 1"),
                    ))
                    .await;
                let text = match rows {
                    Ok(rows) => rows
                        .iter()
                        .map(|r| r.try_get::<String>("", "r").unwrap())
                        .collect::<Vec<_>>()
                        .join("\n"),
                    Err(_) => "(no table)".into(),
                };
                out.insert(table.to_string(), text);
            }
            db.close().await.unwrap();
        }
        out
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// SQLite, and PostgreSQL when a server is named.
async fn both_databases() -> Vec<TestDb> {
    TestDb::all().await
}

#[tokio::test]
async fn status_and_dry_run_leave_an_existing_state_database_byte_for_byte_as_they_found_it() {
    for db in both_databases().await {
        // Arrange: one real run, then a CRM change a dry run would plan.
        let s = setup(db).await;
        let first = s.run(&["--once", "--job", "contacts"]).await;
        assert!(first.status.success(), "{}", text(&first));
        s.sb.crm
            .put_linkman(1, 11, json!({"name": "新人", "email": "new@example.com"}));
        s.sb.crm.remove_linkman(20);
        let writes = s.sb.edm_writes();
        let before = s.snapshot().await;

        // Act
        let status = s.run(&["status"]).await;
        let status_json = s.run(&["status", "--json"]).await;
        let dry = s.run(&["--once", "--dry-run"]).await;

        // Assert
        assert!(status.status.success(), "{}", text(&status));
        assert!(status_json.status.success(), "{}", text(&status_json));
        assert!(dry.status.success(), "{}", text(&dry));
        let plan = String::from_utf8_lossy(&dry.stdout);
        assert!(
            plan.contains("1 adds") && plan.contains("1 unsubscribes"),
            "{plan}"
        );
        assert_eq!(s.snapshot().await, before, "{}", s.db.url);
        assert_eq!(s.sb.edm_writes(), writes, "the dry run wrote to EDM");
    }
}

#[tokio::test]
async fn status_reports_a_missing_database_and_creates_nothing() {
    for db in both_databases().await {
        // Arrange: nothing has run.
        let s = setup(db).await;
        let before = s.snapshot().await;

        // Act
        let out = s.run(&["status"]).await;
        let json_out = s.run(&["status", "--json"]).await;

        // Assert
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("no state database yet"),
            "{}",
            text(&out)
        );
        let v: serde_json::Value = serde_json::from_slice(&json_out.stdout).unwrap();
        assert_eq!(v["database"], "missing", "{v}");
        assert_eq!(s.snapshot().await, before, "{}", s.db.url);
    }
}

#[tokio::test]
async fn a_dry_run_reads_a_missing_database_as_empty_and_creates_nothing() {
    for db in both_databases().await {
        // Arrange: nothing has run.
        let s = setup(db).await;
        let before = s.snapshot().await;

        // Act
        let out = s.run(&["--once", "--dry-run"]).await;

        // Assert: the plan of a first run (ten members to add), and no file,
        // table or row anywhere.
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("10 adds"),
            "{}",
            text(&out)
        );
        assert_eq!(s.snapshot().await, before, "{}", s.db.url);
        assert_eq!(s.sb.edm_writes(), 0);
    }
}
