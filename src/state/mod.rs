//! The state database: what the daemon pushed, what it is about to push,
//! what it must never touch, and what each run did. SQLite by default,
//! PostgreSQL by URL; migrations run at connect time.
//!
//! One file per table (`members`, `operations`, `observations` for export
//! lines, suppressions and list bookkeeping, `records` for the write-back
//! ledger, `runs`), each adding
//! its methods to [`Store`]; `connect` opens it.
//!
//! Writes on the hot path are batched ([`CHUNK`] rows a statement) inside
//! transactions, so a run makes a handful of round trips per EDM batch, not
//! one per member.

mod audit;
mod connect;
mod entities;
pub mod fleet;
mod forget;
mod integrity;
mod lease;
mod lookups;
mod members;
pub mod nodelay;
mod notes;
mod observations;
mod operations;
mod records;
mod refusals;
mod requests;
mod retention;
mod runs;
mod top_ups;
mod writable;

pub use audit::{AuditEntry, AuditRecord};
pub use connect::{
    MIGRATION_LOCK_KEY, Schema, database_of, purge_state, schema_key, schema_of, sqlite_file,
    tenant_schema,
};
pub use forget::Forgot;
pub use lease::{Fenced, Lease};
pub use lookups::{
    AddressFacts, MemberFact, OperationFact, RecordFact, RefusalFact, SuppressionFact,
};
pub use notes::{Finding, FindingKind};
pub use observations::{ListBook, NewSuppression, Observations, SeenLine};
pub use operations::{NewOperation, PendingOperation, PendingRow};
pub use records::{LedgerRow, NewRecord};
pub use refusals::{EdmRefusal, NewRefusal, ParkedRecord, RefusalKey};
pub use requests::{RunAsk, RunRequest};
pub use retention::Pruned;
pub use runs::RunRow;
pub use top_ups::{TopUpDay, TopUpOutcome};
pub use writable::{UnrecordedEnd, Writable};

use std::collections::HashMap;

use sea_orm::DatabaseConnection;

use crate::domain::ListId;
pub use crate::stored_enums::{
    Job, LedgerStatus, OpKind, OpStatus, RecordKind, RunStatus, SuppressionReason,
    SuppressionSource,
};
use members::{upsert_members, vars_to_json};

/// The TCP port of a PostgreSQL URL (5432 when it names none); `None`
/// for SQLite and for a URL that does not parse.
fn postgres_tcp_port(raw: &str) -> Option<u16> {
    let url = url::Url::parse(raw).ok()?;
    matches!(url.scheme(), "postgres" | "postgresql").then(|| url.port().unwrap_or(5432))
}

/// Rows per multi-row statement (well under SQLite's and PostgreSQL's
/// bound-parameter limits for our widest table).
pub const CHUNK: usize = 500;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Suppression `list_id` meaning "every list" (hard bounces).
/// Stored only: `NewSuppression::list_id` is `None` for it.
const ALL_LISTS: ListId = ListId(0);

/// The state database.
#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
    /// The lease epoch this instance took ([`Store::take_lease`]); 0 when
    /// it took none (dry runs, library tests): its writes are not fenced.
    /// Shared by every clone of the store.
    fence: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// Whether it takes writes, as the runs' records last found it;
    /// shared by every clone.
    writable: Writable,
    /// Operations this process recorded, and the count at which the
    /// planner's statistics are refreshed next (PostgreSQL).
    analyzed: std::sync::Arc<std::sync::Mutex<(u64, u64)>>,
    /// The row ids of the operations this process recorded and has not
    /// settled yet; shared by every clone.
    in_flight: operations::InFlight,
}

/// Recorded operations after which PostgreSQL's statistics are first
/// refreshed; each refresh puts the next one four times as far.
const FIRST_ANALYZE: u64 = 2_000;

impl Store {
    fn around(db: DatabaseConnection) -> Store {
        Store {
            db,
            fence: Default::default(),
            writable: Writable::default(),
            analyzed: std::sync::Arc::new(std::sync::Mutex::new((0, FIRST_ANALYZE))),
            in_flight: Default::default(),
        }
    }

    /// Closes the pool. On SQLite the last connection to close folds the
    /// WAL into the database file and removes `-wal` and `-shm`, so a
    /// process that ends cleanly leaves the database as one file.
    pub async fn close(&self) {
        if let Err(e) = self.db.clone().close().await {
            tracing::warn!(error = %e, "cannot close the state database cleanly");
        }
    }

    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Whether the database takes writes, as the runs' records last found
    /// it (see [`Writable`]).
    pub fn writable(&self) -> &Writable {
        &self.writable
    }
}

/// `items` with one item per key: the last one (what an upsert would have
/// left) when `keep_last`, else the first (what `DO NOTHING` keeps), in
/// their first order. PostgreSQL refuses an `INSERT … ON CONFLICT DO
/// UPDATE` that meets one key twice ("cannot affect row a second time"),
/// where SQLite takes the last; every batched write goes through this, so
/// a caller that hands the same key twice (an export line and a pending
/// operation that both say a member left) writes the same on both.
fn one_per_key<'a, T, K: std::hash::Hash + Eq>(
    items: &'a [T],
    key: impl Fn(&'a T) -> K,
    keep_last: bool,
) -> Vec<&'a T> {
    let mut slot: HashMap<K, usize> = HashMap::with_capacity(items.len());
    let mut out: Vec<&T> = Vec::with_capacity(items.len());
    for item in items {
        match slot.entry(key(item)) {
            std::collections::hash_map::Entry::Occupied(e) => {
                if keep_last {
                    out[*e.get()] = item;
                }
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(out.len());
                out.push(item);
            }
        }
    }
    out
}

/// Database errors may echo the URL, which may carry a password.
pub(crate) fn redact_db_error(text: &str, url: &str) -> String {
    let mut out = text.replace(url, "[database.url]");
    if let Ok(parsed) = url::Url::parse(url)
        && let Some(password) = parsed.password()
        && !password.is_empty()
    {
        out = out.replace(password, crate::redact::REDACTED);
    }
    out
}

/// A fresh PostgreSQL database for another module's tests.
#[cfg(all(test, target_os = "linux"))]
pub(crate) use tests::fresh_postgres;

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::domain::{CustomerId, LinkManId, ListId, RunId};
    use crate::domain::{Email, MemberFields, MemberKey, MemberState, Origin, VAR_COUNT};
    use migrations::{Migrator, MigratorTrait};
    use sea_orm::{ConnectionTrait, Database};
    use secrecy::SecretString;

    /// Read-held by tests that open connections to PostgreSQL other than a
    /// store's pool (admin connections, the migration lock, raw
    /// connections: Nagle on), write-held by the test that counts the
    /// store's new sockets, so that it does not count theirs.
    pub(super) static FOREIGN_PG_SOCKETS: tokio::sync::RwLock<()> =
        tokio::sync::RwLock::const_new(());

    #[tokio::test]
    async fn postgres_connections_are_opened_with_nodelay() {
        // Arrange: a fresh database, and the sockets to PostgreSQL that
        // exist before the store connects.
        let _alone = FOREIGN_PG_SOCKETS.write().await;
        let Some((url, _guard)) = fresh_postgres().await else {
            return;
        };
        let port = postgres_tcp_port(&url).unwrap();
        let before = nodelay::sockets_to(port);

        // Act
        let store = Store::connect(&SecretString::from(url)).await.unwrap();
        let opened: Vec<i32> = nodelay::sockets_to(port)
            .into_iter()
            .filter(|fd| !before.contains(fd))
            .collect();
        let all_nodelay = opened.iter().all(|&fd| nodelay::has_nodelay(fd));
        store.close().await;

        // Assert
        assert!(!opened.is_empty(), "the store opened no socket to {port}");
        assert!(all_nodelay, "a pooled connection has Nagle on");
    }

    /// The PostgreSQL server the tests may use (`CRM_EDM_SYNC_TEST_PG`,
    /// e.g. `postgres://postgres@127.0.0.1:5432`; `.ci/run` sets it).
    /// Without it the PostgreSQL half of a test is skipped, saying so on
    /// stderr, so that `cargo test` runs on a machine without a server.
    pub(crate) fn pg_server() -> Option<String> {
        let server = std::env::var("CRM_EDM_SYNC_TEST_PG")
            .ok()
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .filter(|s| !s.is_empty());
        if server.is_none() {
            eprintln!("PostgreSQL part skipped: no server (set CRM_EDM_SYNC_TEST_PG)");
        }
        server
    }

    /// A fresh PostgreSQL database: its URL and a guard that drops it;
    /// `None` without a server.
    pub(crate) async fn fresh_postgres() -> Option<(String, impl Drop)> {
        struct DropDb(String, String);
        impl Drop for DropDb {
            fn drop(&mut self) {
                let (admin_url, name) = (self.0.clone(), self.1.clone());
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .ok()?;
                    rt.block_on(async {
                        let admin = Database::connect(admin_url).await.ok()?;
                        admin
                            .execute_unprepared(&format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            ))
                            .await
                            .ok()
                    })
                })
                .join();
            }
        }
        let server = pg_server()?;
        let admin_url = format!("{server}/postgres");
        let admin = Database::connect(admin_url.clone())
            .await
            .expect("the PostgreSQL server CRM_EDM_SYNC_TEST_PG names answers");
        let name = format!("ces_unit_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Some((format!("{server}/{name}"), DropDb(admin_url, name)))
    }

    /// A fresh SQLite file in `dir`, and a fresh PostgreSQL database when
    /// a server is named (its guard with it).
    pub(super) async fn both_urls(dir: &std::path::Path) -> (Vec<String>, Option<impl Drop>) {
        let sqlite = format!("sqlite://{}?mode=rwc", dir.join("s.db").display());
        match fresh_postgres().await {
            Some((pg, guard)) => (vec![sqlite, pg], Some(guard)),
            None => (vec![sqlite], None),
        }
    }

    /// A store on `url` whose schema was taken back to just before
    /// migration `n` (counted from 1), filled with `rows` (SQL statements
    /// separated by `;`) and migrated again: an older database upgraded.
    pub(super) async fn upgraded_from_before(n: usize, url: &str, rows: &str) -> Store {
        let store = Store::connect(&SecretString::from(url.to_string()))
            .await
            .unwrap();
        let db = store.connection();
        let newer = (Migrator::migrations().len() + 1 - n) as u32;
        Migrator::down(db, Some(newer)).await.unwrap();
        for statement in rows.split(';').filter(|s| !s.trim().is_empty()) {
            db.execute_unprepared(statement).await.unwrap();
        }
        Migrator::up(db, None).await.unwrap();
        store
    }

    pub(super) fn member(email: &str, present: bool, fullname: &str) -> MemberState {
        MemberState {
            key: MemberKey::new(ListId(1), Email::parse(email).unwrap()),
            origin: Origin::Owned,
            present,
            unsubscribed: false,
            link_man_id: Some(LinkManId(10)),
            customer_id: Some(CustomerId(1)),
            edm_id: None,
            fields: MemberFields::new(fullname, &[""; VAR_COUNT]),
        }
    }

    /// Marking a batch done finds the rows this process recorded by their
    /// ids (on PostgreSQL the search by address could pick an index that
    /// read every operation of the list); rows another process recorded
    /// are still found by address.
    #[tokio::test]
    async fn a_recorded_batch_is_marked_done_by_row_id_and_another_process_finds_its_own_by_address()
     {
        let _sockets = FOREIGN_PG_SOCKETS.read().await;
        let dir = tempfile::tempdir().unwrap();
        let (urls, _guard) = both_urls(dir.path()).await;
        for url in urls {
            // Arrange: one batch recorded here, one by another store (as
            // another process would); one row of the first has its address
            // changed behind the store's back, so only its id finds it.
            let here = Store::connect(&SecretString::from(url.clone()))
                .await
                .unwrap();
            let other = Store::connect(&SecretString::from(url.clone()))
                .await
                .unwrap();
            let run = RunId::from_stored("r");
            let ops = |names: &[&str]| -> Vec<NewOperation> {
                names
                    .iter()
                    .map(|n| NewOperation {
                        reason: None,
                        kind: OpKind::Add,
                        list_id: ListId(1),
                        email: Email::parse(&format!("{n}@x.cn")).unwrap(),
                        edm_id: None,
                        link_man_id: Some(LinkManId(1)),
                        customer_id: Some(CustomerId(1)),
                        fields: MemberFields::named("A"),
                    })
                    .collect()
            };
            here.record_operations(&run, &ops(&["a", "b"]))
                .await
                .unwrap();
            other.record_operations(&run, &ops(&["c"])).await.unwrap();
            here.db
                .execute_unprepared(
                    "UPDATE operations SET email = 'moved@x.cn' WHERE email = 'b@x.cn'",
                )
                .await
                .unwrap();
            let emails = |names: &[&str]| -> Vec<Email> {
                names
                    .iter()
                    .map(|n| Email::parse(&format!("{n}@x.cn")).unwrap())
                    .collect()
            };
            let (ab, c) = (emails(&["a", "b"]), emails(&["c"]));

            // Act: this store completes its batch, and the other's.
            let refs: Vec<&Email> = ab.iter().collect();
            here.complete_operations(&run, OpKind::Add, ListId(1), &refs, &[], &[])
                .await
                .unwrap();
            let refs: Vec<&Email> = c.iter().collect();
            here.complete_operations(&run, OpKind::Add, ListId(1), &refs, &[], &[])
                .await
                .unwrap();

            // Assert: nothing is left pending, the moved row included.
            let pending = here.pending_operations().await.unwrap();
            assert!(pending.is_empty(), "{url}: {pending:?}");
            here.close().await;
            other.close().await;
        }
    }

    /// A first sync grows `operations` from nothing within one run; on
    /// PostgreSQL the store refreshes the planner's statistics as it does
    /// (without them each batch's "mark done" scanned the whole run).
    #[tokio::test]
    async fn postgres_statistics_are_refreshed_as_a_run_records_thousands_of_operations() {
        let _sockets = FOREIGN_PG_SOCKETS.read().await;
        let Some((url, _guard)) = fresh_postgres().await else {
            return;
        };
        // Arrange
        let store = Store::connect(&SecretString::from(url)).await.unwrap();
        let reltuples = |store: &Store| {
            let db = store.db.clone();
            async move {
                let row = db
                    .query_one_raw(sea_orm::Statement::from_string(
                        sea_orm::DatabaseBackend::Postgres,
                        "SELECT reltuples::float8 AS n FROM pg_class WHERE relname = 'operations'",
                    ))
                    .await
                    .unwrap()
                    .unwrap();
                row.try_get::<f64>("", "n").unwrap()
            }
        };
        let batch = |from: usize| -> Vec<NewOperation> {
            (from..from + 500)
                .map(|k| NewOperation {
                    reason: None,
                    kind: OpKind::Add,
                    list_id: ListId(1),
                    email: Email::parse(&format!("m{k}@x.cn")).unwrap(),
                    edm_id: None,
                    link_man_id: Some(LinkManId(k as i64)),
                    customer_id: Some(CustomerId(1)),
                    fields: MemberFields::named("A"),
                })
                .collect()
        };
        let run = RunId::from_stored("first-sync");

        // Act: three batches (1 500), then a fourth (2 000 in all).
        for k in 0..3 {
            store
                .record_operations(&run, &batch(k * 500))
                .await
                .unwrap();
        }
        let before = reltuples(&store).await;
        store.record_operations(&run, &batch(1500)).await.unwrap();
        let after = reltuples(&store).await;
        store.close().await;

        // Assert: never analysed (-1, or 0 before PostgreSQL 14) below
        // 2 000 operations; the statistics count them once past it.
        assert!(before <= 0.0, "analysed too early: {before}");
        assert_eq!(after, 2000.0);
    }

    /// The write-back reads only the members its events name: by address,
    /// in every list, however many addresses (more than one statement's
    /// worth), on both databases.
    #[tokio::test]
    async fn members_are_read_by_address_in_every_list_on_sqlite_and_postgres() {
        let _sockets = FOREIGN_PG_SOCKETS.read().await;
        let dir = tempfile::tempdir().unwrap();
        let (urls, _guard) = both_urls(dir.path()).await;
        for url in urls {
            // Arrange: 700 members in list 1, the first of them in list 2
            // too, and one more nobody asks for.
            let store = Store::connect(&SecretString::from(url.clone()))
                .await
                .unwrap();
            let mut rows: Vec<MemberState> = (0..700)
                .map(|k| member(&format!("m{k}@x.cn"), true, "A"))
                .collect();
            let mut in_two = member("m0@x.cn", true, "B");
            in_two.key.list_id = ListId(2);
            rows.push(in_two);
            rows.push(member("other@x.cn", true, "O"));
            store.upsert_members(&rows, &[]).await.unwrap();
            let mut asked: Vec<String> = (0..650).map(|k| format!("M{k}@X.cn")).collect();
            asked.push("not an address".into());
            let asked: Vec<&str> = asked.iter().map(String::as_str).collect();

            // Act
            let found = store.members_with_addresses(&asked).await.unwrap();
            let in_list_2 = store
                .members_of_list(ListId(2), &["m0@x.cn", "m1@x.cn"])
                .await
                .unwrap();
            store.close().await;

            // Assert
            assert_eq!(found.len(), 651, "{url}");
            let key = |list, e: &str| MemberKey::new(ListId(list), Email::parse(e).unwrap());
            assert_eq!(found[&key(2, "m0@x.cn")].fields.fullname(), "B", "{url}");
            assert!(found.contains_key(&key(1, "m649@x.cn")), "{url}");
            assert!(!found.contains_key(&key(1, "m650@x.cn")), "{url}");
            assert!(!found.contains_key(&key(1, "other@x.cn")), "{url}");
            assert_eq!(in_list_2.len(), 1, "{url}");
        }
    }

    /// A write-back's records are read back page by page: more than a
    /// page of them (2 000), in two campaigns, all come back once, oldest
    /// first, on both databases.
    #[tokio::test]
    async fn more_than_a_page_of_records_is_read_back_whole_on_sqlite_and_postgres() {
        let _sockets = FOREIGN_PG_SOCKETS.read().await;
        let dir = tempfile::tempdir().unwrap();
        let (urls, _guard) = both_urls(dir.path()).await;
        for url in urls {
            // Arrange
            let store = Store::connect(&SecretString::from(url.clone()))
                .await
                .unwrap();
            let records: Vec<NewRecord> = (0..2500i64)
                .map(|k| NewRecord {
                    kind: RecordKind::Open,
                    scope: crate::domain::RecordScope::Campaign(crate::domain::CampaignId(k % 2)),
                    link_man_id: LinkManId(k),
                    customer_id: CustomerId(1),
                    email: format!("m{k}@x.cn"),
                    title: "t".into(),
                    content: "c".into(),
                })
                .collect();

            // Act
            let inserted = store.insert_records(&records).await.unwrap();
            let pending = store.pending_records().await.unwrap();
            store.close().await;

            // Assert
            assert_eq!(inserted.len(), 2500, "{url}");
            assert_eq!(pending.len(), 2500, "{url}");
            assert!(pending.windows(2).all(|w| w[0].id < w[1].id), "{url}");
            let mut men: Vec<i64> = inserted.iter().map(|r| r.link_man_id.0).collect();
            men.sort_unstable();
            assert_eq!(men, (0..2500).collect::<Vec<_>>(), "{url}");
        }
    }

    /// Rule 9 after a kill: an export line and a pending operation can
    /// both report one member; PostgreSQL refuses an upsert that meets a
    /// key twice. Every batched write takes the same key twice on both
    /// databases, and an upsert keeps the last row.
    #[tokio::test]
    async fn batched_writes_accept_a_key_twice_on_sqlite_and_postgres() {
        let _sockets = FOREIGN_PG_SOCKETS.read().await;
        let dir = tempfile::tempdir().unwrap();
        let (urls, _guard) = both_urls(dir.path()).await;
        for url in urls {
            // Arrange
            let store = Store::connect(&SecretString::from(url.clone()))
                .await
                .unwrap();
            let line = SeenLine {
                list_id: ListId(1),
                email: "a@x.cn".into(),
                time: "2026-11-30 10:00:00".into(),
            };
            let sup = NewSuppression {
                list_id: Some(ListId(1)),
                email: "b@x.cn".into(),
                reason: SuppressionReason::UserUnsubscribe,
                source: SuppressionSource::Export {
                    time: "2026-11-30 10:00:00".into(),
                },
            };
            let obs = Observations {
                new_lines: vec![line.clone(), line],
                suppressions: vec![sup.clone(), sup],
                members: vec![
                    member("a@x.cn", true, "first"),
                    member("c@x.cn", true, "c"),
                    member("a@x.cn", false, "last"),
                ],
                ..Default::default()
            };
            let record = NewRecord {
                kind: RecordKind::Open,
                scope: crate::domain::RecordScope::Campaign(crate::domain::CampaignId(1)),
                link_man_id: LinkManId(10),
                customer_id: CustomerId(1),
                email: "a@x.cn".into(),
                title: "t".into(),
                content: "c".into(),
            };

            // Act
            store.persist_observations(&obs, None).await.unwrap();
            store
                .upsert_members(
                    &[member("c@x.cn", true, "c1"), member("c@x.cn", true, "c2")],
                    &[],
                )
                .await
                .unwrap();
            let pending = store
                .insert_records(&[record.clone(), record])
                .await
                .unwrap();

            // Assert
            let members = store.load_members().await.unwrap();
            let a = &members[&MemberKey::new(ListId(1), Email::parse("a@x.cn").unwrap())];
            assert!(!a.present, "{url}");
            assert_eq!(a.fields.fullname(), "last", "{url}");
            let c = &members[&MemberKey::new(ListId(1), Email::parse("c@x.cn").unwrap())];
            assert_eq!(c.fields.fullname(), "c2", "{url}");
            assert_eq!(
                store
                    .seen_lines_of(ListId(1), &["a@x.cn"])
                    .await
                    .unwrap()
                    .len(),
                1,
                "{url}"
            );
            assert_eq!(store.user_unsubscribes().await.unwrap().len(), 1, "{url}");
            assert_eq!(pending.len(), 1, "{url}");
            store.connection().clone().close().await.unwrap();
        }
    }

    /// The fencing token: once a second instance took the lease, the
    /// first one can record no operation and mark no record as being sent
    /// (its transaction fails and keeps nothing); the new holder can.
    #[tokio::test]
    async fn a_store_whose_lease_was_taken_over_can_record_no_write_on_sqlite_and_postgres() {
        let _sockets = FOREIGN_PG_SOCKETS.read().await;
        use crate::instance::Instance;
        let dir = tempfile::tempdir().unwrap();
        let (urls, _guard) = both_urls(dir.path()).await;
        for url in urls {
            // Arrange: "old" took the lease, then "new" took it over.
            let secret = SecretString::from(url.clone());
            let old = Store::connect(&secret).await.unwrap();
            let new = Store::connect(&secret).await.unwrap();
            let (first, none) = old.take_lease(&Instance::current("old")).await.unwrap();
            let (second, before) = new.take_lease(&Instance::current("new")).await.unwrap();
            let record = NewRecord {
                kind: RecordKind::Open,
                scope: crate::domain::RecordScope::Campaign(crate::domain::CampaignId(1)),
                link_man_id: LinkManId(10),
                customer_id: CustomerId(1),
                email: "a@x.cn".into(),
                title: "t".into(),
                content: "c".into(),
            };
            let rows = new.insert_records(&[record]).await.unwrap();
            let op = |email: &str| NewOperation {
                reason: None,
                kind: OpKind::Add,
                list_id: ListId(1),
                email: Email::parse(email).unwrap(),
                edm_id: None,
                link_man_id: Some(LinkManId(10)),
                customer_id: Some(CustomerId(1)),
                fields: MemberFields::named("A"),
            };

            // Act
            let refused = old
                .record_operations(&RunId::from_stored("run-old"), &[op("a@x.cn")])
                .await;
            let unmarked = old.mark_records_uncertain(&[rows[0].id]).await;
            let accepted = new
                .record_operations(&RunId::from_stored("run-new"), &[op("b@x.cn")])
                .await;

            // Assert
            assert!(none.is_none(), "{url}");
            assert_eq!(second.epoch, first.epoch + 1, "{url}");
            assert_eq!(before.map(|l| l.holder), Some("old".to_string()), "{url}");
            let fenced = refused.unwrap_err().downcast::<Fenced>().unwrap();
            assert_eq!(
                (fenced.ours, fenced.current),
                (first.epoch, second.epoch),
                "{url}"
            );
            assert_eq!(fenced.holder, "new", "{url}");
            assert!(
                unmarked.unwrap_err().downcast_ref::<Fenced>().is_some(),
                "{url}"
            );
            accepted.unwrap();
            let pending = new.pending_operations().await.unwrap();
            let emails: Vec<&str> = pending.iter().map(|p| p.email.as_str()).collect();
            assert_eq!(
                emails,
                ["b@x.cn"],
                "{url}: nothing of the fenced write is kept"
            );
            assert!(!old.holds_lease().await && new.holds_lease().await, "{url}");
            old.connection().clone().close().await.unwrap();
            new.connection().clone().close().await.unwrap();
        }
    }

    /// Bounded state: what is older than the window and no longer needed
    /// goes; what rule 6, recovery, the ledger and the suppressions
    /// need stays, and pruned export lines still count as seen.
    #[tokio::test]
    async fn pruning_removes_old_finished_state_and_keeps_what_is_still_needed_on_sqlite_and_postgres()
     {
        let _sockets = FOREIGN_PG_SOCKETS.read().await;
        let dir = tempfile::tempdir().unwrap();
        let (urls, _guard) = both_urls(dir.path()).await;
        for url in urls {
            // Arrange: 200-day-old history.
            let store = Store::connect(&SecretString::from(url.clone()))
                .await
                .unwrap();
            let day = 86_400_000i64;
            let now = now_ms();
            let old = now - 200 * day;
            let e = |a: &str| Email::parse(a).unwrap();
            let op = |kind, email: &str| NewOperation {
                reason: None,
                kind,
                list_id: ListId(1),
                email: e(email),
                edm_id: None,
                link_man_id: Some(LinkManId(10)),
                customer_id: Some(CustomerId(1)),
                fields: MemberFields::named("A"),
            };
            store
                .record_operations(
                    &RunId::from_stored("r-old"),
                    &[
                        op(OpKind::Add, "add@x.cn"),
                        op(OpKind::Unsub, "matched@x.cn"),
                        op(OpKind::Unsub, "unmatched@x.cn"),
                        op(OpKind::Add, "pending@x.cn"),
                    ],
                )
                .await
                .unwrap();
            store
                .complete_operations(
                    &RunId::from_stored("r-old"),
                    OpKind::Add,
                    ListId(1),
                    &[&e("add@x.cn")],
                    &[],
                    &[],
                )
                .await
                .unwrap();
            store
                .complete_operations(
                    &RunId::from_stored("r-old"),
                    OpKind::Unsub,
                    ListId(1),
                    &[&e("matched@x.cn"), &e("unmatched@x.cn")],
                    &[],
                    &[],
                )
                .await
                .unwrap();
            for id in ["run-1", "run-2", "run-3"] {
                let id = RunId::from_stored(id);
                store.start_run(&id, Job::Contacts, false).await.unwrap();
                store
                    .finish_run(&id, RunStatus::Succeeded, &serde_json::json!({}), None)
                    .await
                    .unwrap();
            }
            let line = |email: &str, time: &str| SeenLine {
                list_id: ListId(1),
                email: email.into(),
                time: time.into(),
            };
            store
                .persist_observations(
                    &Observations {
                        new_lines: vec![
                            line("matched@x.cn", "2026-01-01 00:00:01"),
                            line("gone@x.cn", "2026-01-02 00:00:00"),
                        ],
                        suppressions: vec![NewSuppression {
                            list_id: Some(ListId(1)),
                            email: "gone@x.cn".into(),
                            reason: SuppressionReason::UserUnsubscribe,
                            source: SuppressionSource::Export {
                                time: "2026-01-02 00:00:00".into(),
                            },
                        }],
                        export_reads: vec![(ListId(1), old - 100 * day)],
                        ..Default::default()
                    },
                    None,
                )
                .await
                .unwrap();
            store
                .insert_records(&[NewRecord {
                    kind: RecordKind::Open,
                    scope: crate::domain::RecordScope::Campaign(crate::domain::CampaignId(1)),
                    link_man_id: LinkManId(10),
                    customer_id: CustomerId(1),
                    email: "add@x.cn".into(),
                    title: "t".into(),
                    content: "c".into(),
                }])
                .await
                .unwrap();
            let db = store.connection();
            for sql in [
                format!("UPDATE operations SET created_at = {old}, updated_at = {old}"),
                "UPDATE operations SET export_matched = TRUE WHERE email = 'matched@x.cn'".into(),
                format!(
                    "UPDATE runs SET started_at = {old} + CAST(SUBSTR(id, 5) AS BIGINT), finished_at = {old} + CAST(SUBSTR(id, 5) AS BIGINT)"
                ),
                format!("UPDATE unsub_lines SET seen_at = {old}"),
                format!("UPDATE writeback_ledger SET created_at = {old}, updated_at = {old}"),
                format!("UPDATE suppressions SET created_at = {old}"),
            ] {
                db.execute_unprepared(&sql).await.unwrap();
            }
            // A line first seen today, later than the old ones.
            store
                .persist_observations(
                    &Observations {
                        new_lines: vec![line("today@x.cn", "2026-11-30 08:00:00")],
                        ..Default::default()
                    },
                    None,
                )
                .await
                .unwrap();

            // Act
            let pruned = store.prune(now - 90 * day).await.unwrap();

            // Assert
            assert_eq!(
                pruned,
                Pruned {
                    operations: 2,
                    runs: 2,
                    export_lines: 2,
                    run_requests: 0,
                },
                "{url}"
            );
            let left: Vec<(String, String)> = db
                .query_all_raw(sea_orm::Statement::from_string(
                    db.get_database_backend(),
                    "SELECT email, status FROM operations ORDER BY email",
                ))
                .await
                .unwrap()
                .into_iter()
                .map(|r| {
                    (
                        r.try_get("", "email").unwrap(),
                        r.try_get("", "status").unwrap(),
                    )
                })
                .collect();
            assert_eq!(
                left,
                [
                    ("pending@x.cn".to_string(), "pending".to_string()),
                    ("unmatched@x.cn".to_string(), "done".to_string())
                ],
                "{url}: the pending add and the unsubscribe the export may still match stay"
            );
            let runs = store.recent_runs(10).await.unwrap();
            assert_eq!(runs.len(), 1, "{url}");
            assert_eq!(runs[0].id, "run-3", "{url}: each job's newest run stays");
            let seen = store
                .seen_lines_of(ListId(1), &["matched@x.cn", "gone@x.cn", "today@x.cn"])
                .await
                .unwrap();
            assert_eq!(seen.len(), 1, "{url}");
            assert_eq!(
                store
                    .lines_seen_through(ListId(1))
                    .await
                    .unwrap()
                    .as_deref(),
                Some("2026-01-02 00:00:00"),
                "{url}"
            );
            assert_eq!(
                store.pending_records().await.unwrap().len(),
                1,
                "{url}: ledger kept"
            );
            assert_eq!(
                store.user_unsubscribes().await.unwrap().len(),
                1,
                "{url}: suppressions kept"
            );
            store.connection().clone().close().await.unwrap();
        }
    }

    /// A PostgreSQL that refuses connections is named as refusing them,
    /// not as "pool timed out", and the URL's password is not printed.
    #[tokio::test]
    async fn a_postgresql_that_refuses_connections_is_reported_as_such() {
        // Act
        let err = Store::connect(&SecretString::from(
            "postgres://postgres:Secret-Pw-7@127.0.0.1:1/none".to_string(),
        ))
        .await
        .unwrap_err()
        .to_string();

        // Assert
        assert!(err.contains("Connection refused"), "{err}");
        assert!(!err.contains("Secret-Pw-7"), "{err}");
    }

    #[tokio::test]
    async fn every_migration_reverts_and_reapplies() {
        // Arrange: a migrated database.
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("s.db").display());
        let store = Store::connect(&SecretString::from(url)).await.unwrap();
        let db = store.connection();

        // Act: every `down()`, then every `up()` again.
        Migrator::down(db, None).await.unwrap();
        let after_down = Migrator::get_applied_migrations(db).await.unwrap().len();
        Migrator::up(db, None).await.unwrap();

        // Assert
        assert_eq!(after_down, 0);
        assert_eq!(
            Migrator::get_applied_migrations(db).await.unwrap().len(),
            Migrator::migrations().len()
        );
        assert!(store.load_members().await.unwrap().is_empty());
    }

    #[test]
    fn the_port_comes_from_a_postgres_url_only() {
        assert_eq!(
            postgres_tcp_port("postgres://u@db.example:6432/x"),
            Some(6432)
        );
        assert_eq!(postgres_tcp_port("postgresql://u@db.example/x"), Some(5432));
        assert_eq!(postgres_tcp_port("sqlite://state.db?mode=rwc"), None);
    }
}
