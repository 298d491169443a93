//! A state database restored from a backup is behind EDM: it re-learns
//! before it writes, adds nobody twice, and names the unsubscribes it
//! cannot tell apart.

use crate::common::{TestDb, applied_adds, env};
use crm_edm_sync::jobs::{Context, RunOptions};
use crm_edm_sync::sandbox::Sandbox;
use crm_edm_sync::sync::contacts;
use sea_orm::{ConnectionTrait, Database};
use serde_json::json;

fn put(sb: &Sandbox, c: i64) {
    sb.crm
        .put_customer(c, json!({"name": format!("公司{c}"), "type_id": 1}));
    sb.crm.put_linkman(
        c,
        c * 10,
        json!({"name": format!("联系人{c}"), "email": format!("p{c}@x.cn")}),
    );
}

/// A copy of the state database at one moment, put back on `restore`.
/// The store must be closed around both (as an operator stops the daemon).
struct Backup {
    db_url: String,
    copy: String,
}

impl Backup {
    async fn take(db: &TestDb) -> Backup {
        if let Some(file) = sqlite_file(&db.url) {
            let copy = format!("{file}.bak");
            std::fs::copy(&file, &copy).unwrap();
            return Backup {
                db_url: db.url.clone(),
                copy,
            };
        }
        let name = db.url.rsplit('/').next().unwrap().to_string();
        let copy = format!("{name}_bak");
        admin(&format!("CREATE DATABASE {copy} TEMPLATE {name}")).await;
        Backup {
            db_url: db.url.clone(),
            copy,
        }
    }

    async fn restore(&self) {
        if let Some(file) = sqlite_file(&self.db_url) {
            for side in ["-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{file}{side}"));
            }
            std::fs::copy(&self.copy, &file).unwrap();
            return;
        }
        let name = self.db_url.rsplit('/').next().unwrap();
        admin(&format!("DROP DATABASE {name} WITH (FORCE)")).await;
        admin(&format!("CREATE DATABASE {name} TEMPLATE {}", self.copy)).await;
    }

    async fn drop_copy(&self) {
        if sqlite_file(&self.db_url).is_none() {
            admin(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.copy
            ))
            .await;
        }
    }
}

fn sqlite_file(url: &str) -> Option<String> {
    let path = url.strip_prefix("sqlite://")?;
    Some(path.split('?').next().unwrap().to_string())
}

async fn admin(sql: &str) {
    let conn = Database::connect(crate::common::pg_admin_url().expect("a PostgreSQL server"))
        .await
        .unwrap();
    conn.execute_unprepared(sql).await.unwrap();
    conn.close().await.unwrap();
}

async fn run(ctx: &Context) -> contacts::ContactsReport {
    contacts::run(ctx, RunOptions::default()).await.unwrap()
}

#[tokio::test]
async fn a_database_restored_from_before_a_run_adds_nobody_twice_and_names_the_unsubscribes_it_cannot_tell()
 {
    // Arrange: 120 people synced; a backup; then a run that adds 30 and
    // unsubscribes 20; then the backup restored.
    let e = env().await;
    for c in 1..=120 {
        put(&e.sb, c);
    }
    e.sync().await;
    e.ctx.store.close().await;
    let backup = Backup::take(&e.db).await;
    for c in 1..=20 {
        e.sb.crm.remove_customer(c);
    }
    for c in 121..=150 {
        put(&e.sb, c);
    }
    let after_backup = e.ctx_with("", "").await;
    let lost = run(&after_backup).await;
    after_backup.store.close().await;
    backup.restore().await;

    // Act
    let restored = e.ctx_with("", "").await;
    let report = run(&restored).await;
    let again = run(&restored).await;

    // Assert: the lost run did what it says; the next adds nobody twice
    // and EDM holds exactly the CRM's 130 people.
    assert_eq!((lost.counts.added, lost.counts.unsubscribed), (30, 20));
    let twice: Vec<_> = applied_adds(&e.sb)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(twice.is_empty(), "added twice: {twice:?}");
    assert_eq!(report.counts.added, 0);
    assert_eq!(report.counts.lists_behind, 1);
    assert_eq!(report.counts.relearnt, 30);
    let mut want: Vec<String> = (21..=150).map(|c| format!("p{c}@x.cn")).collect();
    want.sort();
    let mut held = e.sb.edm.emails(1);
    held.sort();
    assert_eq!(held, want);
    assert_eq!(again.counts.edm_writes, 0);
    // The 20 unsubscribes the restored database forgot are suppressed and
    // named as read while it was behind.
    let (total, shown) = restored.store.behind_unsubscribes(100).await.unwrap();
    assert_eq!(total, 20);
    assert!(shown.iter().all(|(list, email, _)| {
        list.0 == 1
            && email
                .trim_start_matches('p')
                .trim_end_matches("@x.cn")
                .parse::<i64>()
                .unwrap()
                <= 20
    }));
    let status = crm_edm_sync::status::render(&restored.store).await.unwrap();
    assert!(
        status.contains("unsubscribed while the state database was behind"),
        "{status}"
    );
    let question = crm_edm_sync::explain::Question {
        email: Some("p7@x.cn".into()),
        linkman: None,
        live: false,
        json: false,
    };
    let answers = crm_edm_sync::explain::answer(&restored.settings, &restored.store, &question)
        .await
        .unwrap();
    let explained = crm_edm_sync::explain::to_text(&answers[0]);
    assert!(
        explained.contains("unsubscribed while the state database was behind"),
        "{explained}"
    );
    restored.store.close().await;
    backup.drop_copy().await;
}
