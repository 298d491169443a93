//! Test helpers: a sandbox, a fresh state database and a [`Context`] wired
//! to both.
//!
//! PostgreSQL tests need a server: `CRM_EDM_SYNC_TEST_PG` names it
//! (`postgres://postgres@127.0.0.1:5432`; `.ci/run` sets it). Without it,
//! the tests that are about PostgreSQL alone skip with a line on stderr,
//! and those run on both databases run on SQLite only — so `cargo test`
//! runs on a machine without a PostgreSQL server.
//! `CRM_EDM_SYNC_TEST_DB=postgres` runs every test that uses
//! [`TestDb::new`] against a fresh PostgreSQL database (created on that
//! server, dropped afterwards); SQLite in a temporary directory otherwise.
#![allow(dead_code)]

use std::time::Duration;

pub mod binary;
pub mod daemon;

use crm_edm_sync::config::Settings;
use crm_edm_sync::jobs::{Context, RunOptions};
use crm_edm_sync::sandbox::Sandbox;
use crm_edm_sync::sync::contacts::{self, ContactsReport};
use sea_orm::{ConnectionTrait, Database};
use serde_json::json;

/// A GET with a client built as the crate builds its own (the TLS
/// provider installed first).
pub async fn http_get(url: impl reqwest::IntoUrl) -> reqwest::Result<reqwest::Response> {
    crm_edm_sync::remote::client_builder()
        .build()?
        .get(url)
        .send()
        .await
}

/// The PostgreSQL server the tests may use (`CRM_EDM_SYNC_TEST_PG`), with
/// no database in it: `postgres://postgres@127.0.0.1:5432`.
pub fn pg_server() -> Option<String> {
    std::env::var("CRM_EDM_SYNC_TEST_PG")
        .ok()
        .map(|s| s.trim().trim_end_matches('/').to_string())
        .filter(|s| !s.is_empty())
}

/// The server's administrative database, where test databases are made.
pub fn pg_admin_url() -> Option<String> {
    pg_server().map(|server| format!("{server}/postgres"))
}

/// Says on stderr that a PostgreSQL test was skipped.
pub fn skipped_without_postgres(test: &str) {
    eprintln!("{test}: skipped: no PostgreSQL server (set CRM_EDM_SYNC_TEST_PG)");
}

/// A fresh state database, removed when dropped.
pub struct TestDb {
    pub url: String,
    pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// SQLite, or PostgreSQL when `CRM_EDM_SYNC_TEST_DB=postgres`.
    pub async fn new() -> TestDb {
        if std::env::var("CRM_EDM_SYNC_TEST_DB").as_deref() == Ok("postgres") {
            Self::postgres()
                .await
                .expect("CRM_EDM_SYNC_TEST_DB=postgres needs CRM_EDM_SYNC_TEST_PG naming a server")
        } else {
            Self::sqlite()
        }
    }

    /// SQLite, and PostgreSQL when a server is named.
    pub async fn all() -> Vec<TestDb> {
        let mut dbs = vec![Self::sqlite()];
        dbs.extend(Self::postgres().await);
        dbs
    }

    /// A fresh PostgreSQL database on the named server; `None` without one.
    pub async fn postgres() -> Option<TestDb> {
        let server = pg_server()?;
        let name = format!("ces_test_{}", uuid::Uuid::new_v4().simple());
        let admin = Database::connect(format!("{server}/postgres"))
            .await
            .expect("the PostgreSQL server CRM_EDM_SYNC_TEST_PG names answers");
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        Some(TestDb {
            url: format!("{server}/{name}"),
            pg_name: Some(name),
            _dir: None,
        })
    }

    /// A fresh SQLite file in a temporary directory.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        TestDb {
            url: format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("state.db").display()
            ),
            pg_name: None,
            _dir: Some(dir),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let (Some(name), Some(admin_url)) = (self.pg_name.take(), pg_admin_url()) {
            // Drop runs outside any async context we can rely on: use a
            // runtime of its own on a plain thread.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async {
                    let admin = Database::connect(admin_url).await.ok()?;
                    admin
                        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await
                        .ok()
                })
            })
            .join();
        }
    }
}

/// A sandbox with lists 1 and 2, a fresh database and a context.
pub struct Env {
    pub sb: Sandbox,
    pub db: TestDb,
    pub ctx: Context,
}

/// The `[sync]` section the tests use: default list 1, customers with
/// `type_id` 2 go to list 2, var1 is the customer's name, var2 the mobile.
pub fn sync_section(extra: &str) -> String {
    format!(
        "[sync]\nlist_id = 1\n{extra}\n[[sync.routes]]\nfield = \"customer.type_id\"\nequals = \"2\"\nlist_id = 2\n[sync.vars]\nvar1 = \"customer.name\"\nvar2 = \"mobile\"\n"
    )
}

/// The whole config text for `sb` and `db_url`.
pub fn config_text(sb: &Sandbox, db_url: &str, sync_extra: &str, more: &str) -> String {
    format!(
        "{}\n{}\n{more}\n",
        sb.config_toml(db_url),
        sync_section(sync_extra)
    )
}

pub async fn env() -> Env {
    env_with("", "").await
}

/// `sync_extra`: lines inside `[sync]`; `more`: further sections.
pub async fn env_with(sync_extra: &str, more: &str) -> Env {
    let sb = Sandbox::start().await.expect("sandbox");
    sb.edm.create_list(1, "客户");
    sb.edm.create_list(2, "VIP");
    let db = TestDb::new().await;
    let settings =
        Settings::from_toml(&config_text(&sb, &db.url, sync_extra, more)).expect("settings");
    let ctx = Context::new(settings)
        .await
        .expect("context")
        .with_min_retry_delay(Duration::from_millis(5));
    Env { sb, db, ctx }
}

/// Ten customers, one link-man each: customers 1–5 (type 1) go to list 1,
/// 6–10 (type 2) to list 2. Link-man `10·c`, `lm{c}@example.com`.
pub fn seed_basic(sb: &Sandbox) {
    for c in 1..=10i64 {
        sb.crm.put_customer(
            c,
            json!({"name": format!("公司{c}"), "type_id": if c > 5 { 2 } else { 1 }}),
        );
        sb.crm.put_linkman(c, c * 10, json!({"name": format!("联系人{c}"), "email": format!("lm{c}@example.com"), "mobile": format!("1380000{c:04}")}));
    }
}

pub fn emails(range: std::ops::RangeInclusive<i64>) -> Vec<String> {
    let mut v: Vec<String> = range.map(|c| format!("lm{c}@example.com")).collect();
    v.sort();
    v
}

impl Env {
    pub async fn run(&self, opts: RunOptions) -> ContactsReport {
        contacts::run(&self.ctx, opts).await.expect("run completes")
    }

    pub async fn sync(&self) -> ContactsReport {
        self.run(RunOptions::default()).await
    }

    /// A second context on the same database with other settings.
    pub async fn ctx_with(&self, sync_extra: &str, more: &str) -> Context {
        let settings = Settings::from_toml(&config_text(&self.sb, &self.db.url, sync_extra, more))
            .expect("settings");
        Context::new(settings)
            .await
            .expect("context")
            .with_min_retry_delay(Duration::from_millis(5))
    }

    /// A second context on the same database, its settings changed by `f`.
    pub async fn ctx_from(&self, f: impl FnOnce(&mut Settings)) -> Context {
        let mut settings =
            Settings::from_toml(&config_text(&self.sb, &self.db.url, "", "")).expect("settings");
        f(&mut settings);
        Context::new(settings)
            .await
            .expect("context")
            .with_min_retry_delay(Duration::from_millis(5))
    }
}

/// How many times each (list, address) was added by an `ml-addr-add` that
/// took effect, from the sandbox's request log.
pub fn applied_adds(sb: &Sandbox) -> std::collections::BTreeMap<(String, String), usize> {
    let mut out = std::collections::BTreeMap::new();
    for r in sb
        .requests()
        .into_iter()
        .filter(|r| r.operation == "ml-addr-add" && r.applied)
    {
        let list = r.params.get("list_id").cloned().unwrap_or_default();
        for line in r
            .params
            .get("ml_addr")
            .map(String::as_str)
            .unwrap_or("")
            .lines()
        {
            let address = line.split(';').next().unwrap_or("").to_string();
            *out.entry((list.clone(), address)).or_insert(0) += 1;
        }
    }
    out
}

/// A campaign (id 1, list 1) sent today with opens tracked, opened once by
/// `p1@example.com` … `p{n}@example.com`.
pub fn opened_today_by_p1_to(n: i64) -> crm_edm_sync::sandbox::SandboxCampaign {
    crm_edm_sync::sandbox::SandboxCampaign {
        id: 1,
        name: "活动".into(),
        list_id: 1,
        date: edm_today().format("%Y-%m-%d").to_string(),
        send_status: 3,
        track_status: 1,
        opens: (1..=n)
            .map(|c| (format!("p{c}@example.com"), 1, String::new(), String::new()))
            .collect(),
        ..Default::default()
    }
}

/// Today in EDM's zone (`edm.timezone`, Asia/Shanghai by default): the
/// date `task-list` files a campaign sent now under.
pub fn edm_today() -> chrono::NaiveDate {
    crm_edm_sync::writeback::edm_today(chrono::Utc::now(), chrono_tz::Asia::Shanghai)
}
