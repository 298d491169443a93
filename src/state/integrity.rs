//! No write is lost silently: a pooled connection goes back to the pool
//! only when it is outside any transaction, as SQLite and sqlx both see it.
//!
//! When a statement or a `COMMIT` fails with `SQLITE_FULL`, `SQLITE_IOERR`
//! (a full disk) or a `RAISE(ROLLBACK)`, SQLite rolls the whole transaction
//! back by itself. sqlx does not notice: it still counts one transaction
//! open, its `ROLLBACK` on drop then fails ("no transaction is active")
//! and leaves the count at one, so the connection's next `begin` becomes a
//! `SAVEPOINT` and a later rollback a `ROLLBACK TO`, which leaves a real
//! transaction open for ever. Every write after that lands in a
//! transaction that is never committed and vanishes when the process ends.
//!
//! [`release_clean`] runs when a connection is given back (`after_release`):
//! it lets a queued rollback run, then asks sqlx's count and SQLite itself
//! (`sqlite3_get_autocommit`); a connection inside a transaction by either
//! is closed (SQLite rolls an open transaction back on close) instead of
//! pooled, and the next acquire opens a fresh one. PostgreSQL ends a
//! transaction whose `COMMIT` failed and ignores sqlx's extra `ROLLBACK`;
//! its connections are checked by sqlx's count the same way, and a
//! connection whose server went away fails the ping and is dropped.

use sea_orm::sqlx::{self, Connection};

/// Whether a connection given back to the pool may be pooled again
/// (SQLite).
pub(super) async fn release_clean_sqlite(conn: &mut sqlx::SqliteConnection) -> bool {
    // A rollback queued by a dropped transaction runs before the ping.
    if conn.ping().await.is_err() {
        return false;
    }
    let counted = conn.is_in_transaction();
    let open = match conn.lock_handle().await {
        Ok(mut handle) => {
            let db = handle.as_raw_handle().as_ptr();
            // SAFETY: `db` is the live handle `handle` keeps locked; the
            // call only reads a flag of the connection.
            unsafe { libsqlite3_sys::sqlite3_get_autocommit(db) == 0 }
        }
        Err(_) => return false,
    };
    clean_or_warn(counted, open)
}

/// Whether a connection given back to the pool may be pooled again
/// (PostgreSQL).
pub(super) async fn release_clean_postgres(conn: &mut sqlx::PgConnection) -> bool {
    if conn.ping().await.is_err() {
        return false;
    }
    clean_or_warn(conn.is_in_transaction(), false)
}

fn clean_or_warn(counted: bool, open: bool) -> bool {
    if counted || open {
        tracing::warn!(
            sqlx_counts_a_transaction = counted,
            database_has_a_transaction = open,
            "a state database connection came back from a failed write still inside a transaction: it is closed (its transaction rolled back) and a fresh one opened"
        );
        return false;
    }
    true
}

// Uses `state::tests`' helpers (a fresh PostgreSQL database).
#[cfg(test)]
mod tests {
    use super::super::tests::fresh_postgres;
    use super::super::*;
    use crate::domain::RunId;
    use crate::domain::{CustomerId, Email, LinkManId, MemberFields};
    use sea_orm::ConnectionTrait;
    use sea_orm::sqlx::{self, Connection};
    use secrecy::SecretString;

    fn add(email: &str) -> NewOperation {
        NewOperation {
            reason: None,
            kind: OpKind::Add,
            list_id: ListId(1),
            email: Email::parse(email).unwrap(),
            edm_id: None,
            link_man_id: Some(LinkManId(10)),
            customer_id: Some(CustomerId(1)),
            fields: MemberFields::named("A"),
        }
    }

    /// Runs SQL on a connection of its own, beside the store's pool: the
    /// fault is set and lifted from outside, as a disk fills and empties.
    async fn sqlite_outside(path: &std::path::Path, sql: &str) {
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    }

    /// A real `SQLITE_FULL`: the pool's connection may not grow the file
    /// past its size (`max_page_count`), so a large write fails with
    /// "database or disk is full"; later writes reach the disk.
    #[tokio::test]
    async fn a_write_refused_with_sqlite_full_fails_and_later_writes_reach_the_disk() {
        // Arrange: a store whose one pooled connection may not grow the file.
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("s.db").display());
        let store = Store::connect(&SecretString::from(url.clone()))
            .await
            .unwrap();
        store
            .record_operations(&RunId::from_stored("r0"), &[add("before@x.cn")])
            .await
            .unwrap();
        let db = store.connection();
        let pages: i64 = db
            .query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "PRAGMA page_count",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get_by_index(0)
            .unwrap();
        db.execute_unprepared(&format!("PRAGMA max_page_count = {pages}"))
            .await
            .unwrap();
        let many: Vec<NewOperation> = (0..2000).map(|i| add(&format!("m{i}@x.cn"))).collect();

        // Act
        let full = store
            .record_operations(&RunId::from_stored("r1"), &many)
            .await;
        let after = store
            .record_operations(&RunId::from_stored("r2"), &[add("after@x.cn")])
            .await;
        store.close().await;

        // Assert
        let err = format!("{:#}", full.unwrap_err());
        assert!(err.contains("full"), "{err}");
        after.unwrap();
        let reopened = Store::connect(&SecretString::from(url)).await.unwrap();
        let mut pending: Vec<String> = reopened
            .pending_operations()
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.email.to_string())
            .collect();
        pending.sort();
        assert_eq!(pending, ["after@x.cn", "before@x.cn"]);
        reopened.close().await;
    }

    // ---- Every write path, with the fault injected for real ----

    type Step = Box<dyn Fn(Store) -> futures::future::BoxFuture<'static, anyhow::Result<()>>>;
    type Check = Box<dyn Fn(Store) -> futures::future::BoxFuture<'static, bool>>;

    /// One write path of the store: what it needs first, the write, the
    /// table (and statements) it touches, and how its effect is seen.
    struct WritePath {
        name: &'static str,
        table: &'static str,
        ops: &'static [&'static str],
        prepare: Step,
        write: Step,
        written: Check,
    }

    fn step<F, Fut>(f: F) -> Step
    where
        F: Fn(Store) -> Fut + 'static,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        Box::new(move |s| Box::pin(f(s)))
    }

    fn check<F, Fut>(f: F) -> Check
    where
        F: Fn(Store) -> Fut + 'static,
        Fut: std::future::Future<Output = bool> + Send + 'static,
    {
        Box::new(move |s| Box::pin(f(s)))
    }

    fn nothing() -> Step {
        step(|_| async { Ok(()) })
    }

    fn record(email: &str) -> NewRecord {
        NewRecord {
            kind: RecordKind::Open,
            scope: crate::domain::RecordScope::Campaign(crate::domain::CampaignId(1)),
            link_man_id: LinkManId(10),
            customer_id: CustomerId(1),
            email: email.into(),
            title: "t".into(),
            content: "c".into(),
        }
    }

    /// Every write path the jobs use: runs, operations, members,
    /// suppressions, export lines, ledger, refusals, lease, notes,
    /// retention.
    fn write_paths() -> Vec<WritePath> {
        let mut paths = contacts_write_paths();
        paths.extend(bookkeeping_write_paths());
        paths
    }

    /// Runs, operations, members, suppressions, export lines.
    fn contacts_write_paths() -> Vec<WritePath> {
        use crate::domain::{MemberKey, MemberState, Origin};
        let member = || MemberState {
            key: MemberKey::new(ListId(1), Email::parse("m@x.cn").unwrap()),
            origin: Origin::Owned,
            present: true,
            unsubscribed: false,
            link_man_id: Some(LinkManId(10)),
            customer_id: Some(CustomerId(1)),
            edm_id: None,
            fields: MemberFields::named("M"),
        };
        let unsub_line = || SeenLine {
            list_id: ListId(1),
            email: "u@x.cn".into(),
            time: "2026-11-30 10:00:00".into(),
        };
        vec![
            WritePath {
                name: "start_run",
                table: "runs",
                ops: &["INSERT"],
                prepare: nothing(),
                write: step(|s| async move {
                    s.start_run(&RunId::from_stored("w"), Job::Contacts, false)
                        .await
                }),
                written: check(|s| async move {
                    s.recent_runs(5).await.unwrap().iter().any(|r| r.id == "w")
                }),
            },
            WritePath {
                name: "finish_run",
                table: "runs",
                ops: &["UPDATE"],
                prepare: step(|s| async move {
                    s.start_run(&RunId::from_stored("w"), Job::Contacts, false)
                        .await
                }),
                write: step(|s| async move {
                    s.finish_run(
                        &RunId::from_stored("w"),
                        RunStatus::Succeeded,
                        &serde_json::json!({}),
                        None,
                    )
                    .await
                }),
                written: check(|s| async move {
                    s.last_finished_runs()
                        .await
                        .unwrap()
                        .iter()
                        .any(|r| r.id == "w")
                }),
            },
            WritePath {
                name: "record_operations",
                table: "operations",
                ops: &["INSERT"],
                prepare: nothing(),
                write: step(|s| async move {
                    s.record_operations(&RunId::from_stored("w"), &[add("w@x.cn")])
                        .await
                }),
                written: check(|s| async move {
                    let pending = s.pending_operations().await.unwrap();
                    pending.iter().any(|p| p.email.as_str() == "w@x.cn")
                }),
            },
            WritePath {
                name: "complete_operations",
                table: "operations",
                ops: &["UPDATE"],
                prepare: step(|s| async move {
                    s.record_operations(&RunId::from_stored("w"), &[add("w@x.cn")])
                        .await
                }),
                write: step(|s| async move {
                    let w = Email::parse("w@x.cn").unwrap();
                    s.complete_operations(
                        &RunId::from_stored("w"),
                        OpKind::Add,
                        ListId(1),
                        &[&w],
                        &[],
                        &[],
                    )
                    .await
                }),
                written: check(|s| async move {
                    let pending = s.pending_operations().await.unwrap();
                    !pending.iter().any(|p| p.email.as_str() == "w@x.cn")
                }),
            },
            WritePath {
                name: "upsert_members",
                table: "members",
                ops: &["INSERT", "UPDATE"],
                prepare: nothing(),
                write: step(move |s| async move { s.upsert_members(&[member()], &[]).await }),
                written: check(|s| async move { s.load_members().await.unwrap().len() == 1 }),
            },
            WritePath {
                name: "add_suppressions",
                table: "suppressions",
                ops: &["INSERT"],
                prepare: nothing(),
                write: step(|s| async move {
                    s.add_suppressions(
                        &[NewSuppression {
                            list_id: None,
                            email: "b@x.cn".into(),
                            reason: SuppressionReason::Bounce,
                            source: SuppressionSource::Export {
                                time: "2026-11-30 10:00:00".into(),
                            },
                        }],
                        None,
                    )
                    .await
                }),
                written: check(|s| async move {
                    s.load_suppressions().await.unwrap().bounced.len() == 1
                }),
            },
            WritePath {
                name: "persist_observations (export lines)",
                table: "unsub_lines",
                ops: &["INSERT"],
                prepare: nothing(),
                write: step(move |s| async move {
                    s.persist_observations(
                        &Observations {
                            new_lines: vec![unsub_line()],
                            ..Default::default()
                        },
                        None,
                    )
                    .await
                }),
                written: check(|s| async move {
                    s.seen_lines_of(ListId(1), &["u@x.cn"]).await.unwrap().len() == 1
                }),
            },
        ]
    }

    /// The write-back ledger and the bookkeeping: refusals, lease, notes,
    /// retention.
    fn bookkeeping_write_paths() -> Vec<WritePath> {
        vec![
            WritePath {
                name: "insert_records (ledger)",
                table: "writeback_ledger",
                ops: &["INSERT"],
                prepare: nothing(),
                write: step(
                    |s| async move { s.insert_records(&[record("r@x.cn")]).await.map(|_| ()) },
                ),
                written: check(|s| async move { s.pending_records().await.unwrap().len() == 1 }),
            },
            WritePath {
                name: "records_done (ledger)",
                table: "writeback_ledger",
                ops: &["UPDATE"],
                prepare: step(|s| async move {
                    s.insert_records(&[record("r@x.cn")]).await.map(|_| ())
                }),
                write: step(|s| async move {
                    let ids: Vec<i64> = s.pending_records().await?.iter().map(|r| r.id).collect();
                    s.records_done(&ids).await
                }),
                written: check(|s| async move { s.pending_records().await.unwrap().is_empty() }),
            },
            WritePath {
                name: "note_refusals",
                table: "refusals",
                ops: &["INSERT", "UPDATE"],
                prepare: nothing(),
                write: step(|s| async move {
                    let refusal = NewRefusal {
                        kind: OpKind::Add,
                        list_id: ListId(1),
                        email: Email::parse("p@x.cn").unwrap(),
                        content: "p@x.cn,P".into(),
                        code: "E1".into(),
                        message: "refused".into(),
                    };
                    s.note_refusals(&RunId::from_stored("w"), &[refusal], 3)
                        .await
                        .map(|_| ())
                }),
                written: check(|s| async move { s.load_refusals().await.unwrap().len() == 1 }),
            },
            WritePath {
                name: "take_lease",
                table: "lease",
                ops: &["INSERT", "UPDATE"],
                prepare: nothing(),
                write: step(|s| async move {
                    s.take_lease(&crate::instance::Instance::current("w"))
                        .await
                        .map(|_| ())
                }),
                written: check(|s| async move {
                    s.lease().await.unwrap().is_some_and(|l| l.holder == "w")
                }),
            },
            WritePath {
                name: "set_log_notes",
                table: "log_notes",
                ops: &["INSERT"],
                prepare: nothing(),
                write: step(|s| async move {
                    let finding = crate::state::Finding {
                        kind: crate::state::FindingKind::Invalid,
                        address: "not-an-address".to_string(),
                        link_man_id: crate::domain::LinkManId(1),
                        customer_id: None,
                        list_id: None,
                        detail: "no @".to_string(),
                    };
                    let now = [("digest".to_string(), finding)].into_iter().collect();
                    s.set_log_notes(&Default::default(), &now).await
                }),
                written: check(|s| async move { s.log_notes().await.unwrap().contains("digest") }),
            },
            WritePath {
                name: "request_run (--once asks the daemon)",
                table: "run_requests",
                ops: &["INSERT"],
                prepare: nothing(),
                write: step(|s| async move {
                    s.request_run(Default::default(), "once").await.map(|_| ())
                }),
                // PostgreSQL's sequence moved on with the refused insert.
                written: check(|s| async move {
                    s.run_request(1).await.unwrap().is_some()
                        || s.run_request(2).await.unwrap().is_some()
                }),
            },
            WritePath {
                name: "finish_run_request (the daemon's answer)",
                table: "run_requests",
                ops: &["UPDATE"],
                prepare: step(|s| async move {
                    s.request_run(Default::default(), "once").await?;
                    s.claim_run_request("daemon").await.map(|_| ())
                }),
                write: step(|s| async move { s.finish_run_request(1, true, "ok").await }),
                written: check(|s| async move {
                    s.run_request(1).await.unwrap().unwrap().output.as_deref() == Some("ok")
                }),
            },
            WritePath {
                name: "prune (retention)",
                table: "operations",
                ops: &["DELETE"],
                prepare: step(|s| async move {
                    s.record_operations(&RunId::from_stored("old"), &[add("old@x.cn")])
                        .await?;
                    let old = Email::parse("old@x.cn").unwrap();
                    s.complete_operations(
                        &RunId::from_stored("old"),
                        OpKind::Add,
                        ListId(1),
                        &[&old],
                        &[],
                        &[],
                    )
                    .await?;
                    s.connection()
                        .execute_unprepared("UPDATE operations SET updated_at = 0, created_at = 0")
                        .await?;
                    Ok(())
                }),
                write: step(|s| async move { s.prune(1000).await.map(|_| ()) }),
                written: check(|s| async move {
                    let db = s.connection();
                    let row = db
                        .query_one_raw(sea_orm::Statement::from_string(
                            db.get_database_backend(),
                            "SELECT COUNT(*) AS n FROM operations WHERE email = 'old@x.cn'",
                        ))
                        .await
                        .unwrap()
                        .unwrap();
                    row.try_get::<i64>("", "n").unwrap() == 0
                }),
            },
        ]
    }

    /// How a write is made to fail.
    #[derive(Debug, Clone, Copy)]
    enum Fault {
        /// SQLite rolls the whole transaction back itself (what
        /// `SQLITE_FULL` and `SQLITE_IOERR` do), then, the disk still full,
        /// a second write fails its statement only.
        SqliteRolledBack,
        /// SQLite refuses the `COMMIT` itself (a deferred foreign key).
        SqliteCommit,
        /// PostgreSQL refuses the `COMMIT` (a deferred constraint trigger
        /// that raises).
        PostgresCommit,
        /// PostgreSQL's connection is terminated mid-transaction.
        PostgresTerminated,
    }

    fn fault_sql(fault: Fault, table: &str, op: &str, wave: usize) -> String {
        let name = format!("ces_fault_{}", op.to_lowercase());
        match fault {
            Fault::SqliteRolledBack => {
                let how = if wave == 0 { "ROLLBACK" } else { "ABORT" };
                format!(
                    "DROP TRIGGER IF EXISTS {name}; CREATE TRIGGER {name} BEFORE {op} ON {table} BEGIN SELECT RAISE({how}, 'injected: database or disk is full'); END"
                )
            }
            Fault::SqliteCommit => format!(
                "CREATE TABLE IF NOT EXISTS ces_fault_parent (id INTEGER PRIMARY KEY);
                 CREATE TABLE IF NOT EXISTS ces_fault_child (p INTEGER REFERENCES ces_fault_parent (id) DEFERRABLE INITIALLY DEFERRED);
                 DROP TRIGGER IF EXISTS {name};
                 CREATE TRIGGER {name} AFTER {op} ON {table} BEGIN INSERT INTO ces_fault_child VALUES (1); END"
            ),
            Fault::PostgresCommit => format!(
                "CREATE OR REPLACE FUNCTION ces_fault() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'injected: commit refused'; END $$;
                 DROP TRIGGER IF EXISTS {name} ON {table};
                 CREATE CONSTRAINT TRIGGER {name} AFTER {op} ON {table} DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ces_fault()"
            ),
            Fault::PostgresTerminated => format!(
                "CREATE OR REPLACE FUNCTION ces_fault() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$;
                 DROP TRIGGER IF EXISTS {name} ON {table};
                 CREATE TRIGGER {name} AFTER {op} ON {table} FOR EACH ROW EXECUTE FUNCTION ces_fault()"
            ),
        }
    }

    fn lift_sql(fault: Fault, table: &str, op: &str) -> String {
        let name = format!("ces_fault_{}", op.to_lowercase());
        match fault {
            Fault::SqliteRolledBack | Fault::SqliteCommit => format!("DROP TRIGGER {name}"),
            Fault::PostgresCommit | Fault::PostgresTerminated => {
                format!("DROP TRIGGER {name} ON {table}")
            }
        }
    }

    async fn postgres_outside(url: &str, sql: &str) {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    }

    /// For each write path: with the fault set, the write fails (twice
    /// for a disk that stays full); once it is lifted the same write and a
    /// later one succeed, and both are on disk when the database is
    /// opened again — nothing of the failure lingers in a pooled
    /// connection.
    async fn every_write_path_fails_loudly_and_loses_nothing_after(fault: Fault) {
        let _sockets = match fault {
            Fault::PostgresCommit | Fault::PostgresTerminated => {
                Some(super::super::tests::FOREIGN_PG_SOCKETS.read().await)
            }
            _ => None,
        };
        for path in write_paths() {
            // Arrange
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("s.db");
            let (url, _guard) = match fault {
                Fault::SqliteRolledBack | Fault::SqliteCommit => {
                    (format!("sqlite://{}?mode=rwc", file.display()), None)
                }
                Fault::PostgresCommit | Fault::PostgresTerminated => {
                    let Some((url, guard)) = fresh_postgres().await else {
                        return;
                    };
                    (url, Some(guard))
                }
            };
            let outside = |sql: String| {
                let url = url.clone();
                let file = file.clone();
                async move {
                    if url.starts_with("sqlite") {
                        sqlite_outside(&file, &sql).await
                    } else {
                        postgres_outside(&url, &sql).await
                    }
                }
            };
            let store = Store::connect(&SecretString::from(url.clone()))
                .await
                .unwrap();
            (path.prepare)(store.clone()).await.unwrap();
            let waves = if matches!(fault, Fault::SqliteRolledBack) {
                2
            } else {
                1
            };

            // Act
            let mut failures = Vec::new();
            for wave in 0..waves {
                for op in path.ops {
                    outside(fault_sql(fault, path.table, op, wave)).await;
                }
                failures.push((path.write)(store.clone()).await);
            }
            for op in path.ops {
                outside(lift_sql(fault, path.table, op)).await;
            }
            let retried = (path.write)(store.clone()).await;
            let later = store
                .record_operations(&RunId::from_stored("later"), &[add("later@x.cn")])
                .await;
            store.close().await;

            // Assert
            for failed in failures {
                assert!(
                    failed.is_err(),
                    "{fault:?} {}: the write succeeded",
                    path.name
                );
            }
            retried.unwrap_or_else(|e| panic!("{fault:?} {}: retry failed: {e:#}", path.name));
            later.unwrap_or_else(|e| panic!("{fault:?} {}: later write failed: {e:#}", path.name));
            let reopened = Store::connect(&SecretString::from(url.clone()))
                .await
                .unwrap();
            assert!(
                (path.written)(reopened.clone()).await,
                "{fault:?} {}: the retried write is not on disk",
                path.name
            );
            let pending = reopened.pending_operations().await.unwrap();
            assert!(
                pending.iter().any(|p| p.email.as_str() == "later@x.cn"),
                "{fault:?} {}: the later write is not on disk",
                path.name
            );
            reopened.close().await;
        }
    }

    #[tokio::test]
    async fn every_sqlite_write_path_survives_a_transaction_sqlite_rolled_back_itself() {
        every_write_path_fails_loudly_and_loses_nothing_after(Fault::SqliteRolledBack).await;
    }

    #[tokio::test]
    async fn every_sqlite_write_path_survives_a_refused_commit() {
        every_write_path_fails_loudly_and_loses_nothing_after(Fault::SqliteCommit).await;
    }

    #[tokio::test]
    async fn every_postgres_write_path_survives_a_refused_commit() {
        every_write_path_fails_loudly_and_loses_nothing_after(Fault::PostgresCommit).await;
    }

    #[tokio::test]
    async fn every_postgres_write_path_survives_its_connection_terminated_mid_transaction() {
        every_write_path_fails_loudly_and_loses_nothing_after(Fault::PostgresTerminated).await;
    }
}
