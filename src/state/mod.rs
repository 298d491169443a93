//! The state database: what the daemon pushed, what it is about to push,
//! what it must never touch, and what each run did. SQLite by default,
//! PostgreSQL by URL; migrations run at connect time.
//!
//! Writes on the hot path are batched ([`CHUNK`] rows a statement) inside
//! transactions, so a run makes a handful of round trips per EDM batch, not
//! one per member.

pub mod entities;
pub mod nodelay;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use migrations::{Migrator, MigratorTrait};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveEnum, ActiveValue::Set, ColumnTrait, ConnectOptions, ConnectionTrait, Database,
    DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect, TransactionTrait,
};
use secrecy::{ExposeSecret, SecretString};

use crate::domain::{
    Email, ListId, MemberFields, MemberKey, MemberState, Origin, Suppressions, VAR_COUNT,
};
pub use crate::states::{
    Job, LedgerStatus, OpKind, OpStatus, RecordKind, RunStatus, SuppressionReason,
    SuppressionSource,
};
use entities::{ledger, list_state, member, operation, run, suppression, unsub_line};

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
pub const ALL_LISTS: ListId = 0;

/// A ContactHistory record about to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    pub kind: RecordKind,
    pub scope: String,
    pub link_man_id: i64,
    pub customer_id: i64,
    pub email: String,
    pub title: String,
    pub content: String,
}

/// A planned operation about to be recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct NewOperation {
    pub kind: OpKind,
    pub list_id: ListId,
    pub email: Email,
    pub edm_id: Option<i64>,
    pub link_man_id: Option<i64>,
    pub customer_id: Option<i64>,
    pub fields: MemberFields,
}

/// A user unsubscribe seen in an export.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSuppression {
    pub list_id: ListId,
    pub email: String,
    pub reason: SuppressionReason,
    pub source: SuppressionSource,
}

/// One export line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeenLine {
    pub list_id: ListId,
    pub email: String,
    pub time: String,
}

/// Per-list bookkeeping.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ListBook {
    pub initial_read_at: Option<i64>,
    pub export_read_at: Option<i64>,
}

/// What a run learned from EDM before planning (exports, recovery checks,
/// list reads), written in one transaction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observations {
    pub new_lines: Vec<SeenLine>,
    pub suppressions: Vec<NewSuppression>,
    /// `unsub` operations whose export line was seen.
    pub matched_ops: Vec<i64>,
    /// Operations from earlier runs, resolved: `(id, status)`.
    pub resolved_ops: Vec<(i64, OpStatus)>,
    /// Member rows to write whole.
    pub members: Vec<MemberState>,
    /// Lists whose export was read, and when.
    pub export_reads: Vec<(ListId, i64)>,
    /// Lists read whole (behaviour 5), and when.
    pub list_reads: Vec<(ListId, i64)>,
}

/// A summary row for `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRow {
    pub id: String,
    pub job: Job,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub status: RunStatus,
    pub dry_run: bool,
    pub counts: serde_json::Value,
    pub error: Option<String>,
}

/// A pending operation, for `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingRow {
    pub id: i64,
    pub kind: OpKind,
    pub list_id: ListId,
    pub email: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: i64,
}

/// The state database.
#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
}

fn vars_to_json(fields: &MemberFields) -> String {
    serde_json::to_string(&fields.vars().collect::<Vec<_>>()).unwrap_or_else(|_| "[]".into())
}

fn vars_from_json(text: &str) -> [String; VAR_COUNT] {
    let parsed: Vec<String> = serde_json::from_str(text).unwrap_or_default();
    std::array::from_fn(|i| parsed.get(i).cloned().unwrap_or_default())
}

fn member_row(m: &MemberState, now: i64) -> member::ActiveModel {
    member::ActiveModel {
        list_id: Set(m.key.list_id),
        email: Set(m.key.email.to_string()),
        origin: Set(m.origin),
        present: Set(m.present),
        link_man_id: Set(m.link_man_id),
        customer_id: Set(m.customer_id),
        edm_id: Set(m.edm_id),
        fullname: Set(m.fields.fullname().to_string()),
        vars: Set(vars_to_json(&m.fields)),
        updated_at: Set(now),
        ..Default::default()
    }
}

/// Where a state database's schema stands against this binary's
/// migrations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schema {
    /// No migration was ever applied (a new, empty database).
    Absent,
    /// Every migration this binary knows is applied, and no other.
    Current,
    /// This many migrations are still to be applied.
    Behind(usize),
    /// Migrations this binary does not know were applied (a newer binary
    /// wrote it).
    Ahead(Vec<String>),
}

fn is_sqlite(raw: &str) -> bool {
    raw.starts_with("sqlite:")
}

/// The file of an SQLite URL; `None` for PostgreSQL and in-memory
/// databases.
pub fn sqlite_file(raw: &str) -> Option<std::path::PathBuf> {
    let path = raw
        .strip_prefix("sqlite://")
        .or_else(|| raw.strip_prefix("sqlite:"))?;
    let path = path.split('?').next().unwrap_or(path);
    (!path.is_empty() && !path.contains(":memory:")).then(|| std::path::PathBuf::from(path))
}

/// How a pool is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Read-write: the jobs' pool.
    Write,
    /// Read-only; SQLite through the `-wal` file another connection keeps.
    Shared,
    /// Read-only, SQLite with no `-wal` file beside it: nothing has it
    /// open, so it is read as an immutable file and no `-wal`/`-shm` is
    /// created.
    Snapshot,
}

/// Opens a pool on `raw` without touching the schema.
///
/// Read-only is enforced by the database, not only by our code:
/// PostgreSQL sessions start with `default_transaction_read_only`; SQLite
/// is opened `mode=ro` (never created, never checkpointed: a read-write
/// connection would fold another process's WAL into the file when it
/// closes, changing its bytes). When no `-wal` file exists nothing has the
/// database open, and it is read as immutable, so that SQLite does not
/// leave `-wal` and `-shm` files behind. A writer that starts during such
/// a read writes to its own WAL; only its checkpoint touches the file,
/// and only a long dry run could meet one (it then fails or prints a plan
/// from a mixed state: run it again).
async fn open_pool(raw: &str, access: Access) -> anyhow::Result<DatabaseConnection> {
    let mut options = ConnectOptions::new(raw.to_string());
    options
        .max_connections(if is_sqlite(raw) { 1 } else { 8 })
        .acquire_timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(10))
        // Statements carry addresses; they do not belong in the logs.
        .sqlx_logging(false);
    if is_sqlite(raw) {
        if raw.contains(":memory:") {
            // Each connection to `:memory:` is a database of its own: keep
            // the one connection for the pool's whole life.
            options
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
        }
        // Per connection, so a reopened pooled connection has them too.
        options.map_sqlx_sqlite_opts(move |o| {
            let o = o.busy_timeout(Duration::from_secs(10));
            match access {
                Access::Shared => o.read_only(true).create_if_missing(false),
                Access::Snapshot => o.read_only(true).create_if_missing(false).immutable(true),
                Access::Write => o
                    .journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal),
            }
        });
    }
    if access != Access::Write {
        options.map_sqlx_postgres_opts(|o| o.options([("default_transaction_read_only", "on")]));
    }
    if let Some(port) = postgres_tcp_port(raw) {
        // Every new pooled connection, not just the first (see
        // `nodelay`): sqlx 0.9.0 leaves Nagle on.
        options.map_sqlx_postgres_pool_opts(move |pool| {
            pool.after_connect(move |_conn, _meta| {
                Box::pin(async move {
                    nodelay::set_on_sockets_to(port);
                    Ok(())
                })
            })
        });
    }
    Database::connect(options).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot open the state database: {}",
            redact_db_error(&e.to_string(), raw)
        )
    })
}

/// Reads the schema's state without creating anything (sea-orm's own
/// check creates its table, and on PostgreSQL logs a notice every time).
pub async fn schema_of(db: &DatabaseConnection) -> anyhow::Result<Schema> {
    use sea_orm::{DbBackend, Statement};
    let backend = db.get_database_backend();
    let exists_sql = match backend {
        DbBackend::Sqlite => {
            "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = 'seaql_migrations'"
        }
        _ => {
            "SELECT COUNT(*) AS n FROM information_schema.tables WHERE table_name = 'seaql_migrations' AND table_schema = current_schema()"
        }
    };
    let exists: i64 = db
        .query_one_raw(Statement::from_string(backend, exists_sql))
        .await
        .context("cannot read the state database's schema")?
        .and_then(|row| row.try_get::<i64>("", "n").ok())
        .unwrap_or(0);
    if exists == 0 {
        return Ok(Schema::Absent);
    }
    let applied: HashSet<String> = db
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT version FROM seaql_migrations",
        ))
        .await
        .context("cannot read the applied migrations")?
        .into_iter()
        .filter_map(|row| row.try_get::<String>("", "version").ok())
        .collect();
    if applied.is_empty() {
        return Ok(Schema::Absent);
    }
    let known: Vec<String> = Migrator::migrations()
        .iter()
        .map(|m| m.name().to_string())
        .collect();
    let unknown: Vec<String> = applied
        .iter()
        .filter(|v| !known.contains(v))
        .cloned()
        .collect();
    if !unknown.is_empty() {
        return Ok(Schema::Ahead(unknown));
    }
    let behind = known.iter().filter(|k| !applied.contains(*k)).count();
    Ok(if behind == 0 {
        Schema::Current
    } else {
        Schema::Behind(behind)
    })
}

/// The PostgreSQL advisory-lock key held while migrating ("cesmigr"), so
/// that two instances starting at once on a fresh database do not both
/// create the tables.
pub const MIGRATION_LOCK_KEY: i64 = 0x63_65_73_6d_69_67_72;

/// Applies the pending migrations while holding a migration lock: a
/// PostgreSQL advisory lock on a connection of its own, or an exclusive
/// lock on `<file>.migrate.lock` beside an SQLite file. The second
/// instance waits, then finds nothing left to do.
async fn migrate_locked(db: &DatabaseConnection, raw: &str) -> anyhow::Result<()> {
    let failed = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "cannot migrate the state database: {}",
            redact_db_error(&e.to_string(), raw)
        )
    };
    if postgres_tcp_port(raw).is_some() || raw.starts_with("postgres") {
        use sea_orm::sqlx::{self, Connection, PgConnection};
        let mut lock = PgConnection::connect(raw).await.map_err(|e| failed(&e))?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(MIGRATION_LOCK_KEY)
            .execute(&mut lock)
            .await
            .map_err(|e| failed(&e))?;
        let result = Migrator::up(db, None).await;
        // Closing the connection releases the lock whatever happened.
        let _ = lock.close().await;
        result.map_err(|e| failed(&e))?;
    } else if let Some(file) = sqlite_file(raw) {
        let path = std::path::PathBuf::from(format!("{}.migrate.lock", file.display()));
        let lock = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)?;
            f.lock()?;
            Ok(f)
        })
        .await
        .map_err(|e| failed(&e))?
        .map_err(|e| failed(&e))?;
        let result = Migrator::up(db, None).await;
        let _ = lock.unlock();
        result.map_err(|e| failed(&e))?;
    } else {
        Migrator::up(db, None).await.map_err(|e| failed(&e))?;
    }
    Ok(())
}

impl Store {
    /// Connects and applies every pending migration (under a migration
    /// lock, see [`migrate_locked`]). A database already current is not
    /// touched: no statement is run to check it that could write or log.
    pub async fn connect(url: &SecretString) -> anyhow::Result<Store> {
        let raw = url.expose_secret();
        let db = open_pool(raw, Access::Write).await?;
        match schema_of(&db).await? {
            Schema::Current => {}
            Schema::Ahead(unknown) => anyhow::bail!(
                "the state database was migrated by a newer crm-edm-sync (unknown migrations: {}); run that version",
                unknown.join(", ")
            ),
            Schema::Absent | Schema::Behind(_) => {
                migrate_locked(&db, raw).await?;
                tracing::info!("state database migrated to the current schema");
            }
        }
        Ok(Store { db })
    }

    /// Opens the state database for reading only: nothing is created,
    /// migrated or written. `Ok(None)` when there is no state database yet
    /// (no SQLite file, or a database no run has migrated).
    pub async fn open_read_only(url: &SecretString) -> anyhow::Result<Option<Store>> {
        let raw = url.expose_secret();
        let mut access = Access::Shared;
        if let Some(file) = sqlite_file(raw) {
            if !file.exists() {
                return Ok(None);
            }
            let wal = std::path::PathBuf::from(format!("{}-wal", file.display()));
            if !wal.exists() {
                access = Access::Snapshot;
            }
        }
        let db = open_pool(raw, access).await?;
        match schema_of(&db).await? {
            Schema::Current => Ok(Some(Store { db })),
            Schema::Absent => {
                let _ = db.close().await;
                Ok(None)
            }
            Schema::Behind(n) => anyhow::bail!(
                "the state database's schema is {n} migration(s) behind this binary, and a read-only command does not migrate it: run `crm-edm-sync --once` (or start the daemon) first"
            ),
            Schema::Ahead(unknown) => anyhow::bail!(
                "the state database was migrated by a newer crm-edm-sync (unknown migrations: {}); run that version",
                unknown.join(", ")
            ),
        }
    }

    /// A second, read-only pool on a database this process also writes
    /// (the ops endpoint's): its reads never wait behind the jobs' writes
    /// for a pooled connection (SQLite's pool has one).
    pub async fn reader_beside(url: &SecretString) -> anyhow::Result<Store> {
        let db = open_pool(url.expose_secret(), Access::Shared).await?;
        Ok(Store { db })
    }

    /// An empty state database in memory, for a dry run against a database
    /// that does not exist yet: it reads as a first run would.
    pub async fn empty_in_memory() -> anyhow::Result<Store> {
        Store::connect(&SecretString::from("sqlite::memory:".to_string())).await
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

    /// Every member row, keyed. Read in pages by id, so the driver never
    /// buffers the whole table next to the map being built.
    pub async fn load_members(&self) -> anyhow::Result<HashMap<MemberKey, MemberState>> {
        const PAGE: u64 = 2000;
        let mut out = HashMap::new();
        let mut after = i64::MIN;
        loop {
            let rows = member::Entity::find()
                .filter(member::Column::Id.gt(after))
                .order_by_asc(member::Column::Id)
                .limit(PAGE)
                .all(&self.db)
                .await
                .context("cannot read members")?;
            let Some(last) = rows.last() else { break };
            after = last.id;
            let n = rows.len() as u64;
            for row in rows {
                let Ok(email) = Email::parse(&row.email) else {
                    tracing::warn!(
                        member_id = row.id,
                        "member row with an invalid address ignored"
                    );
                    continue;
                };
                let origin = row.origin;
                let key = MemberKey::new(row.list_id, email);
                out.insert(
                    key.clone(),
                    MemberState {
                        key,
                        origin,
                        present: row.present,
                        link_man_id: row.link_man_id,
                        customer_id: row.customer_id,
                        edm_id: row.edm_id,
                        fields: MemberFields::raw(&row.fullname, &vars_from_json(&row.vars)),
                    },
                );
            }
            if n < PAGE {
                break;
            }
        }
        Ok(out)
    }

    /// The suppressions in force.
    pub async fn load_suppressions(&self) -> anyhow::Result<Suppressions> {
        let rows = suppression::Entity::find()
            .all(&self.db)
            .await
            .context("cannot read suppressions")?;
        let mut out = Suppressions::default();
        for row in rows {
            let Ok(email) = Email::parse(&row.email) else {
                continue; // an address that is not valid is never sent anyway
            };
            if row.list_id == ALL_LISTS {
                out.bounced.insert(email);
            } else {
                out.user.insert(MemberKey::new(row.list_id, email));
            }
        }
        Ok(out)
    }

    pub async fn list_books(&self) -> anyhow::Result<HashMap<ListId, ListBook>> {
        let rows = list_state::Entity::find()
            .all(&self.db)
            .await
            .context("cannot read list state")?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.list_id,
                    ListBook {
                        initial_read_at: r.initial_read_at,
                        export_read_at: r.export_read_at,
                    },
                )
            })
            .collect())
    }

    /// Export lines of a list already seen, as `(email, time)`.
    pub async fn seen_lines(&self, list_id: ListId) -> anyhow::Result<HashSet<(String, String)>> {
        let rows = unsub_line::Entity::find()
            .filter(unsub_line::Column::ListId.eq(list_id))
            .all(&self.db)
            .await
            .context("cannot read seen export lines")?;
        Ok(rows.into_iter().map(|r| (r.email, r.time)).collect())
    }

    /// The daemon's own `ml-unsub`s to `list_id` since `since` that no
    /// export line has matched yet: `(operation id, email)`, oldest first.
    pub async fn unmatched_unsubs(
        &self,
        list_id: ListId,
        since: Option<i64>,
    ) -> anyhow::Result<Vec<(i64, String)>> {
        let mut query = operation::Entity::find()
            .filter(operation::Column::Kind.eq(OpKind::Unsub))
            .filter(operation::Column::ListId.eq(list_id))
            .filter(operation::Column::ExportMatched.eq(false))
            .filter(operation::Column::Status.ne(OpStatus::Superseded));
        if let Some(since) = since {
            query = query.filter(operation::Column::CreatedAt.gte(since));
        }
        let rows = query
            .order_by_asc(operation::Column::Id)
            .all(&self.db)
            .await
            .context("cannot read unsubscribe operations")?;
        Ok(rows.into_iter().map(|r| (r.id, r.email)).collect())
    }

    /// Operations still pending (from this or earlier runs).
    pub async fn pending_operations(&self) -> anyhow::Result<Vec<operation::Model>> {
        operation::Entity::find()
            .filter(operation::Column::Status.eq(OpStatus::Pending))
            .order_by_asc(operation::Column::Id)
            .all(&self.db)
            .await
            .context("cannot read pending operations")
    }

    /// Writes what a run observed, in one transaction.
    pub async fn persist_observations(&self, obs: &Observations) -> anyhow::Result<()> {
        let now = now_ms();
        let new_lines = one_per_key(&obs.new_lines, |l| l, false);
        let txn = self.db.begin().await?;
        for chunk in new_lines.chunks(CHUNK) {
            unsub_line::Entity::insert_many(chunk.iter().map(|l| unsub_line::ActiveModel {
                list_id: Set(l.list_id),
                email: Set(l.email.clone()),
                time: Set(l.time.clone()),
                seen_at: Set(now),
                ..Default::default()
            }))
            .on_conflict(
                OnConflict::columns([
                    unsub_line::Column::ListId,
                    unsub_line::Column::Email,
                    unsub_line::Column::Time,
                ])
                .do_nothing()
                .to_owned(),
            )
            .exec_without_returning(&txn)
            .await
            .context("cannot record export lines")?;
        }
        insert_suppressions(&txn, &obs.suppressions).await?;
        for chunk in obs.matched_ops.chunks(CHUNK) {
            operation::Entity::update_many()
                .col_expr(operation::Column::ExportMatched, true.into())
                .col_expr(operation::Column::UpdatedAt, now.into())
                .filter(operation::Column::Id.is_in(chunk.iter().copied()))
                .exec(&txn)
                .await
                .context("cannot mark matched unsubscribes")?;
        }
        for status in [OpStatus::Done, OpStatus::Superseded] {
            let ids: Vec<i64> = obs
                .resolved_ops
                .iter()
                .filter(|(_, s)| *s == status)
                .map(|(id, _)| *id)
                .collect();
            for chunk in ids.chunks(CHUNK) {
                operation::Entity::update_many()
                    .col_expr(operation::Column::Status, Expr::value(status.to_value()))
                    .col_expr(operation::Column::UpdatedAt, now.into())
                    .filter(operation::Column::Id.is_in(chunk.iter().copied()))
                    .exec(&txn)
                    .await
                    .context("cannot resolve earlier operations")?;
            }
        }
        upsert_members(&txn, &obs.members, now).await?;
        for (list_id, at) in &obs.export_reads {
            upsert_list_book(&txn, *list_id, None, Some(*at)).await?;
        }
        for (list_id, at) in &obs.list_reads {
            upsert_list_book(&txn, *list_id, Some(*at), None).await?;
        }
        txn.commit().await.context("cannot commit observations")?;
        Ok(())
    }

    /// Writes member rows whole (adoptions, owner changes).
    pub async fn upsert_members(&self, members: &[MemberState]) -> anyhow::Result<()> {
        let txn = self.db.begin().await?;
        upsert_members(&txn, members, now_ms()).await?;
        txn.commit().await?;
        Ok(())
    }

    /// Records operations as pending before they are sent (behaviour 9).
    pub async fn record_operations(
        &self,
        run_id: &str,
        ops: &[NewOperation],
    ) -> anyhow::Result<()> {
        let now = now_ms();
        let txn = self.db.begin().await?;
        for chunk in ops.chunks(CHUNK) {
            operation::Entity::insert_many(chunk.iter().map(|op| operation::ActiveModel {
                run_id: Set(run_id.to_string()),
                kind: Set(op.kind),
                list_id: Set(op.list_id),
                email: Set(op.email.to_string()),
                edm_id: Set(op.edm_id),
                link_man_id: Set(op.link_man_id),
                customer_id: Set(op.customer_id),
                fullname: Set(op.fields.fullname().to_string()),
                vars: Set(vars_to_json(&op.fields)),
                status: Set(OpStatus::Pending),
                attempts: Set(0),
                last_error: Set(None),
                export_matched: Set(false),
                created_at: Set(now),
                updated_at: Set(now),
                ..Default::default()
            }))
            .exec_without_returning(&txn)
            .await
            .context("cannot record operations")?;
        }
        txn.commit().await.context("cannot commit operations")?;
        Ok(())
    }

    /// Marks this run's `kind` operations on `emails` in `list_id` done and
    /// writes the members they produced, in one transaction.
    pub async fn complete_operations(
        &self,
        run_id: &str,
        kind: OpKind,
        list_id: ListId,
        emails: &[&Email],
        members: &[MemberState],
    ) -> anyhow::Result<()> {
        let now = now_ms();
        let txn = self.db.begin().await?;
        for chunk in emails.chunks(CHUNK) {
            operation::Entity::update_many()
                .col_expr(
                    operation::Column::Status,
                    Expr::value(OpStatus::Done.to_value()),
                )
                .col_expr(operation::Column::UpdatedAt, now.into())
                .col_expr(
                    operation::Column::Attempts,
                    sea_orm::sea_query::Expr::col(operation::Column::Attempts).add(1),
                )
                .filter(operation::Column::RunId.eq(run_id))
                .filter(operation::Column::Kind.eq(kind))
                .filter(operation::Column::ListId.eq(list_id))
                .filter(operation::Column::Status.eq(OpStatus::Pending))
                .filter(operation::Column::Email.is_in(chunk.iter().map(|e| e.to_string())))
                .exec(&txn)
                .await
                .context("cannot mark operations done")?;
        }
        upsert_members(&txn, members, now).await?;
        txn.commit()
            .await
            .context("cannot commit completed operations")?;
        Ok(())
    }

    /// Deletes this run's pending `kind` operations on `emails` in
    /// `list_id` that were recorded but never sent (no attempt made): a
    /// batch recorded ahead that the run stopped before sending.
    pub async fn forget_operations(
        &self,
        run_id: &str,
        kind: OpKind,
        list_id: ListId,
        emails: &[&Email],
    ) -> anyhow::Result<()> {
        let txn = self.db.begin().await?;
        for chunk in emails.chunks(CHUNK) {
            operation::Entity::delete_many()
                .filter(operation::Column::RunId.eq(run_id))
                .filter(operation::Column::Kind.eq(kind))
                .filter(operation::Column::ListId.eq(list_id))
                .filter(operation::Column::Status.eq(OpStatus::Pending))
                .filter(operation::Column::Attempts.eq(0))
                .filter(operation::Column::Email.is_in(chunk.iter().map(|e| e.to_string())))
                .exec(&txn)
                .await
                .context("cannot take back unsent operations")?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// Notes a failed attempt on this run's operations; they stay pending.
    pub async fn note_failure(
        &self,
        run_id: &str,
        kind: OpKind,
        list_id: ListId,
        emails: &[&Email],
        error: &str,
    ) -> anyhow::Result<()> {
        let now = now_ms();
        let txn = self.db.begin().await?;
        for chunk in emails.chunks(CHUNK) {
            operation::Entity::update_many()
                .col_expr(operation::Column::LastError, Some(error.to_string()).into())
                .col_expr(operation::Column::UpdatedAt, now.into())
                .col_expr(
                    operation::Column::Attempts,
                    sea_orm::sea_query::Expr::col(operation::Column::Attempts).add(1),
                )
                .filter(operation::Column::RunId.eq(run_id))
                .filter(operation::Column::Kind.eq(kind))
                .filter(operation::Column::ListId.eq(list_id))
                .filter(operation::Column::Status.eq(OpStatus::Pending))
                .filter(operation::Column::Email.is_in(chunk.iter().map(|e| e.to_string())))
                .exec(&txn)
                .await
                .context("cannot record the failure")?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// Adds suppressions (duplicates are ignored).
    pub async fn add_suppressions(&self, items: &[NewSuppression]) -> anyhow::Result<()> {
        let txn = self.db.begin().await?;
        insert_suppressions(&txn, items).await?;
        txn.commit().await?;
        Ok(())
    }

    /// The ledger keys `(kind, scope, link_man_id)` already recorded for
    /// `scopes`, done or pending.
    pub async fn ledger_keys(
        &self,
        scopes: &[String],
    ) -> anyhow::Result<HashSet<(String, String, i64)>> {
        let mut out = HashSet::new();
        for chunk in scopes.chunks(CHUNK) {
            let rows: Vec<(String, String, i64)> = ledger::Entity::find()
                .select_only()
                .column(ledger::Column::Kind)
                .column(ledger::Column::Scope)
                .column(ledger::Column::LinkManId)
                .filter(ledger::Column::Scope.is_in(chunk.iter().cloned()))
                .into_tuple()
                .all(&self.db)
                .await
                .context("cannot read the write-back ledger")?;
            out.extend(rows);
        }
        Ok(out)
    }

    /// Ledger rows still pending, oldest first.
    pub async fn pending_records(&self) -> anyhow::Result<Vec<ledger::Model>> {
        ledger::Entity::find()
            .filter(ledger::Column::Status.eq(LedgerStatus::Pending))
            .order_by_asc(ledger::Column::Id)
            .all(&self.db)
            .await
            .context("cannot read pending write-back records")
    }

    /// Records new ledger rows as pending (not yet uncertain: nothing was
    /// sent); keys already present are left as they are. Returns the rows
    /// now pending for those keys.
    pub async fn insert_records(
        &self,
        records: &[NewRecord],
    ) -> anyhow::Result<Vec<ledger::Model>> {
        let now = now_ms();
        let unique = one_per_key(
            records,
            |r| (r.kind, r.scope.as_str(), r.link_man_id),
            false,
        );
        let txn = self.db.begin().await?;
        for chunk in unique.chunks(CHUNK) {
            ledger::Entity::insert_many(chunk.iter().map(|r| ledger::ActiveModel {
                kind: Set(r.kind),
                scope: Set(r.scope.clone()),
                link_man_id: Set(r.link_man_id),
                customer_id: Set(r.customer_id),
                email: Set(r.email.clone()),
                title: Set(r.title.clone()),
                content: Set(r.content.clone()),
                status: Set(LedgerStatus::Pending),
                uncertain: Set(false),
                attempts: Set(0),
                last_error: Set(None),
                created_at: Set(now),
                updated_at: Set(now),
                ..Default::default()
            }))
            .on_conflict(
                OnConflict::columns([
                    ledger::Column::Kind,
                    ledger::Column::Scope,
                    ledger::Column::LinkManId,
                ])
                .do_nothing()
                .to_owned(),
            )
            .exec_without_returning(&txn)
            .await
            .context("cannot record write-back records")?;
        }
        txn.commit().await?;
        let scopes: Vec<String> = records
            .iter()
            .map(|r| r.scope.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let wanted: HashSet<(RecordKind, &str, i64)> = records
            .iter()
            .map(|r| (r.kind, r.scope.as_str(), r.link_man_id))
            .collect();
        let mut rows = Vec::with_capacity(records.len());
        for chunk in scopes.chunks(CHUNK) {
            let found = ledger::Entity::find()
                .filter(ledger::Column::Status.eq(LedgerStatus::Pending))
                .filter(ledger::Column::Scope.is_in(chunk.iter().cloned()))
                .all(&self.db)
                .await?;
            rows.extend(
                found
                    .into_iter()
                    .filter(|r| wanted.contains(&(r.kind, r.scope.as_str(), r.link_man_id))),
            );
        }
        Ok(rows)
    }

    /// Marks ledger rows as being sent: uncertain until the CRM answers.
    pub async fn mark_records_uncertain(&self, ids: &[i64]) -> anyhow::Result<()> {
        self.set_records_uncertain(ids, true).await
    }

    /// Takes the mark back from rows that were marked but, the run
    /// stopping, never sent.
    pub async fn unmark_records(&self, ids: &[i64]) -> anyhow::Result<()> {
        self.set_records_uncertain(ids, false).await
    }

    async fn set_records_uncertain(&self, ids: &[i64], uncertain: bool) -> anyhow::Result<()> {
        for chunk in ids.chunks(CHUNK) {
            ledger::Entity::update_many()
                .col_expr(ledger::Column::Uncertain, uncertain.into())
                .col_expr(ledger::Column::UpdatedAt, now_ms().into())
                .filter(ledger::Column::Id.is_in(chunk.iter().copied()))
                .exec(&self.db)
                .await
                .context("cannot mark write-back records")?;
        }
        Ok(())
    }

    /// Marks ledger rows done after `{"value": true}`.
    pub async fn records_done(&self, ids: &[i64]) -> anyhow::Result<()> {
        let now = now_ms();
        let txn = self.db.begin().await?;
        for chunk in ids.chunks(CHUNK) {
            ledger::Entity::update_many()
                .col_expr(
                    ledger::Column::Status,
                    Expr::value(LedgerStatus::Done.to_value()),
                )
                .col_expr(ledger::Column::Uncertain, false.into())
                .col_expr(
                    ledger::Column::Attempts,
                    sea_orm::sea_query::Expr::col(ledger::Column::Attempts).add(1),
                )
                .col_expr(ledger::Column::UpdatedAt, now.into())
                .filter(ledger::Column::Id.is_in(chunk.iter().copied()))
                .exec(&txn)
                .await
                .context("cannot mark write-back records done")?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// Notes a failed attempt; the row stays pending. `uncertain` says
    /// whether the CRM may have written it anyway.
    pub async fn record_failed(&self, id: i64, error: &str, uncertain: bool) -> anyhow::Result<()> {
        ledger::Entity::update_many()
            .col_expr(ledger::Column::LastError, Some(error.to_string()).into())
            .col_expr(ledger::Column::Uncertain, uncertain.into())
            .col_expr(
                ledger::Column::Attempts,
                sea_orm::sea_query::Expr::col(ledger::Column::Attempts).add(1),
            )
            .col_expr(ledger::Column::UpdatedAt, now_ms().into())
            .filter(ledger::Column::Id.eq(id))
            .exec(&self.db)
            .await
            .context("cannot record a write-back failure")?;
        Ok(())
    }

    /// Ledger counts: `(kind, status, count)`.
    pub async fn ledger_counts(&self) -> anyhow::Result<Vec<(RecordKind, LedgerStatus, u64)>> {
        let rows: Vec<(RecordKind, LedgerStatus, i64)> = ledger::Entity::find()
            .select_only()
            .column(ledger::Column::Kind)
            .column(ledger::Column::Status)
            .column_as(ledger::Column::Id.count(), "n")
            .group_by(ledger::Column::Kind)
            .group_by(ledger::Column::Status)
            .order_by_asc(ledger::Column::Kind)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows.into_iter().map(|(k, s, n)| (k, s, n as u64)).collect())
    }

    /// User-unsubscribe suppressions: `(list_id, email, source)`.
    pub async fn user_unsubscribes(
        &self,
    ) -> anyhow::Result<Vec<(ListId, String, SuppressionSource)>> {
        let rows = suppression::Entity::find()
            .filter(suppression::Column::Reason.eq(SuppressionReason::UserUnsubscribe))
            .order_by_asc(suppression::Column::Id)
            .all(&self.db)
            .await
            .context("cannot read suppressions")?;
        Ok(rows
            .into_iter()
            .map(|r| (r.list_id, r.email, SuppressionSource::parse(&r.source)))
            .collect())
    }

    /// Marks runs still `running` as `abandoned`: their process ended
    /// without finishing them (SIGKILL, power loss, a crash). Called by a
    /// job about to start while this process holds the instance lock, so
    /// no other run can be going. Returns `(id, job)` of each.
    pub async fn abandon_running_runs(&self) -> anyhow::Result<Vec<(String, Job)>> {
        let rows = run::Entity::find()
            .filter(run::Column::Status.eq(RunStatus::Running))
            .all(&self.db)
            .await
            .context("cannot read runs")?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        run::Entity::update_many()
            .col_expr(
                run::Column::Status,
                Expr::value(RunStatus::Abandoned.to_value()),
            )
            .col_expr(run::Column::FinishedAt, Some(now_ms()).into())
            .col_expr(
                run::Column::Error,
                Some(
                    "the process ended without finishing this run (killed or crashed)".to_string(),
                )
                .into(),
            )
            .filter(run::Column::Id.is_in(ids))
            .filter(run::Column::Status.eq(RunStatus::Running))
            .exec(&self.db)
            .await
            .context("cannot mark abandoned runs")?;
        Ok(rows.into_iter().map(|r| (r.id, r.job)).collect())
    }

    /// Starts a run record.
    pub async fn start_run(&self, id: &str, job: Job, dry_run: bool) -> anyhow::Result<()> {
        run::Entity::insert(run::ActiveModel {
            id: Set(id.to_string()),
            job: Set(job),
            started_at: Set(now_ms()),
            finished_at: Set(None),
            status: Set(RunStatus::Running),
            dry_run: Set(dry_run),
            counts: Set("{}".into()),
            error: Set(None),
        })
        .exec_without_returning(&self.db)
        .await
        .context("cannot record the run")?;
        Ok(())
    }

    /// Finishes a run record.
    pub async fn finish_run(
        &self,
        id: &str,
        status: RunStatus,
        counts: &serde_json::Value,
        error: Option<&str>,
    ) -> anyhow::Result<()> {
        run::Entity::update_many()
            .col_expr(run::Column::FinishedAt, Some(now_ms()).into())
            .col_expr(run::Column::Status, Expr::value(status.to_value()))
            .col_expr(run::Column::Counts, counts.to_string().into())
            .col_expr(run::Column::Error, error.map(str::to_string).into())
            .filter(run::Column::Id.eq(id))
            .exec(&self.db)
            .await
            .context("cannot finish the run record")?;
        Ok(())
    }

    /// The latest runs, newest first.
    pub async fn recent_runs(&self, limit: u64) -> anyhow::Result<Vec<RunRow>> {
        let rows = run::Entity::find()
            .order_by_desc(run::Column::StartedAt)
            .limit(limit)
            .all(&self.db)
            .await
            .context("cannot read runs")?;
        Ok(rows
            .into_iter()
            .map(|r| RunRow {
                id: r.id,
                job: r.job,
                started_at: r.started_at,
                finished_at: r.finished_at,
                status: r.status,
                dry_run: r.dry_run,
                counts: serde_json::from_str(&r.counts).unwrap_or(serde_json::Value::Null),
                error: r.error,
            })
            .collect())
    }

    /// The latest finished (not dry) run of each job, newest first.
    pub async fn last_finished_runs(&self) -> anyhow::Result<Vec<RunRow>> {
        let rows = run::Entity::find()
            .filter(run::Column::FinishedAt.is_not_null())
            .filter(run::Column::DryRun.eq(false))
            .order_by_desc(run::Column::StartedAt)
            .limit(100)
            .all(&self.db)
            .await
            .context("cannot read runs")?;
        let mut seen = HashSet::new();
        Ok(rows
            .into_iter()
            .filter(|r| seen.insert(r.job))
            .map(|r| RunRow {
                id: r.id,
                job: r.job,
                started_at: r.started_at,
                finished_at: r.finished_at,
                status: r.status,
                dry_run: r.dry_run,
                counts: serde_json::from_str(&r.counts).unwrap_or(serde_json::Value::Null),
                error: r.error,
            })
            .collect())
    }

    /// Pending operations, oldest first, at most `limit`, and how many
    /// there are in all.
    pub async fn pending_summary(&self, limit: u64) -> anyhow::Result<(u64, Vec<PendingRow>)> {
        use sea_orm::PaginatorTrait;
        let total = operation::Entity::find()
            .filter(operation::Column::Status.eq(OpStatus::Pending))
            .count(&self.db)
            .await?;
        let rows = operation::Entity::find()
            .filter(operation::Column::Status.eq(OpStatus::Pending))
            .order_by_asc(operation::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?;
        Ok((
            total,
            rows.into_iter()
                .map(|r| PendingRow {
                    id: r.id,
                    kind: r.kind,
                    list_id: r.list_id,
                    email: r.email,
                    attempts: r.attempts,
                    last_error: r.last_error,
                    created_at: r.created_at,
                })
                .collect(),
        ))
    }

    /// Suppression counts by reason.
    pub async fn suppression_counts(&self) -> anyhow::Result<Vec<(SuppressionReason, u64)>> {
        let rows = suppression::Entity::find().all(&self.db).await?;
        let mut counts: std::collections::BTreeMap<SuppressionReason, u64> = Default::default();
        for r in rows {
            *counts.entry(r.reason).or_insert(0) += 1;
        }
        Ok(counts.into_iter().collect())
    }

    /// Member counts per list: `(list_id, origin, present, count)`.
    pub async fn member_counts(&self) -> anyhow::Result<Vec<(ListId, Origin, bool, u64)>> {
        let rows: Vec<(i64, Origin, bool, i64)> = member::Entity::find()
            .select_only()
            .column(member::Column::ListId)
            .column(member::Column::Origin)
            .column(member::Column::Present)
            .column_as(member::Column::Id.count(), "n")
            .group_by(member::Column::ListId)
            .group_by(member::Column::Origin)
            .group_by(member::Column::Present)
            .order_by_asc(member::Column::ListId)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(l, o, p, n)| (l, o, p, n as u64))
            .collect())
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

async fn upsert_members<C: ConnectionTrait>(
    db: &C,
    members: &[MemberState],
    now: i64,
) -> anyhow::Result<()> {
    let members = one_per_key(members, |m| &m.key, true);
    for chunk in members.chunks(CHUNK) {
        member::Entity::insert_many(chunk.iter().map(|m| member_row(m, now)))
            .on_conflict(
                OnConflict::columns([member::Column::ListId, member::Column::Email])
                    .update_columns([
                        member::Column::Origin,
                        member::Column::Present,
                        member::Column::LinkManId,
                        member::Column::CustomerId,
                        member::Column::EdmId,
                        member::Column::Fullname,
                        member::Column::Vars,
                        member::Column::UpdatedAt,
                    ])
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await
            .context("cannot write members")?;
    }
    Ok(())
}

async fn insert_suppressions<C: ConnectionTrait>(
    db: &C,
    items: &[NewSuppression],
) -> anyhow::Result<()> {
    let now = now_ms();
    let items = one_per_key(items, |s| (s.list_id, s.email.as_str()), false);
    for chunk in items.chunks(CHUNK) {
        suppression::Entity::insert_many(chunk.iter().map(|s| suppression::ActiveModel {
            list_id: Set(s.list_id),
            email: Set(s.email.clone()),
            reason: Set(s.reason),
            source: Set(s.source.to_text()),
            created_at: Set(now),
            ..Default::default()
        }))
        .on_conflict(
            OnConflict::columns([suppression::Column::ListId, suppression::Column::Email])
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(db)
        .await
        .context("cannot record suppressions")?;
    }
    Ok(())
}

async fn upsert_list_book<C: ConnectionTrait>(
    db: &C,
    list_id: ListId,
    initial_read_at: Option<i64>,
    export_read_at: Option<i64>,
) -> anyhow::Result<()> {
    let mut update = Vec::new();
    if initial_read_at.is_some() {
        update.push(list_state::Column::InitialReadAt);
    }
    if export_read_at.is_some() {
        update.push(list_state::Column::ExportReadAt);
    }
    list_state::Entity::insert(list_state::ActiveModel {
        list_id: Set(list_id),
        initial_read_at: Set(initial_read_at),
        export_read_at: Set(export_read_at),
    })
    .on_conflict(
        OnConflict::column(list_state::Column::ListId)
            .update_columns(update)
            .to_owned(),
    )
    .exec_without_returning(db)
    .await
    .context("cannot write list state")?;
    Ok(())
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn postgres_connections_are_opened_with_nodelay() {
        // Arrange: a fresh database, and the sockets to PostgreSQL that
        // exist before the store connects.
        let admin = Database::connect("postgres://postgres@127.0.0.1:5432/postgres")
            .await
            .expect("PostgreSQL reachable");
        let name = format!("ces_unit_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let before = nodelay::sockets_to(5432);

        // Act
        let url = SecretString::from(format!("postgres://postgres@127.0.0.1:5432/{name}"));
        let store = Store::connect(&url).await.unwrap();
        let opened: Vec<i32> = nodelay::sockets_to(5432)
            .into_iter()
            .filter(|fd| !before.contains(fd))
            .collect();
        let all_nodelay = opened.iter().all(|&fd| nodelay::has_nodelay(fd));
        store.connection().clone().close().await.unwrap();
        admin
            .execute_unprepared(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .await
            .unwrap();

        // Assert
        assert!(!opened.is_empty(), "the store opened no socket to 5432");
        assert!(all_nodelay, "a pooled connection has Nagle on");
    }

    /// A fresh PostgreSQL database: its URL and a guard that drops it.
    async fn fresh_postgres() -> (String, impl Drop) {
        struct DropDb(String);
        impl Drop for DropDb {
            fn drop(&mut self) {
                let name = self.0.clone();
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .ok()?;
                    rt.block_on(async {
                        let admin =
                            Database::connect("postgres://postgres@127.0.0.1:5432/postgres")
                                .await
                                .ok()?;
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
        let admin = Database::connect("postgres://postgres@127.0.0.1:5432/postgres")
            .await
            .expect("PostgreSQL reachable");
        let name = format!("ces_unit_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        (
            format!("postgres://postgres@127.0.0.1:5432/{name}"),
            DropDb(name),
        )
    }

    fn member(email: &str, present: bool, fullname: &str) -> MemberState {
        MemberState {
            key: MemberKey::new(1, Email::parse(email).unwrap()),
            origin: Origin::Owned,
            present,
            link_man_id: Some(10),
            customer_id: Some(1),
            edm_id: None,
            fields: MemberFields::new(fullname, &[""; VAR_COUNT]),
        }
    }

    /// Behaviour 9 after a kill: an export line and a pending operation can
    /// both report one member; PostgreSQL refuses an upsert that meets a
    /// key twice. Every batched write takes the same key twice on both
    /// databases, and an upsert keeps the last row.
    #[tokio::test]
    async fn batched_writes_accept_a_key_twice_on_sqlite_and_postgres() {
        let dir = tempfile::tempdir().unwrap();
        let (pg_url, _guard) = fresh_postgres().await;
        let sqlite_url = format!("sqlite://{}?mode=rwc", dir.path().join("s.db").display());
        for url in [sqlite_url, pg_url] {
            // Arrange
            let store = Store::connect(&SecretString::from(url.clone()))
                .await
                .unwrap();
            let line = SeenLine {
                list_id: 1,
                email: "a@x.cn".into(),
                time: "2026-11-30 10:00:00".into(),
            };
            let sup = NewSuppression {
                list_id: 1,
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
                scope: "campaign 1".into(),
                link_man_id: 10,
                customer_id: 1,
                email: "a@x.cn".into(),
                title: "t".into(),
                content: "c".into(),
            };

            // Act
            store.persist_observations(&obs).await.unwrap();
            store
                .upsert_members(&[member("c@x.cn", true, "c1"), member("c@x.cn", true, "c2")])
                .await
                .unwrap();
            let pending = store
                .insert_records(&[record.clone(), record])
                .await
                .unwrap();

            // Assert
            let members = store.load_members().await.unwrap();
            let a = &members[&MemberKey::new(1, Email::parse("a@x.cn").unwrap())];
            assert!(!a.present, "{url}");
            assert_eq!(a.fields.fullname(), "last", "{url}");
            let c = &members[&MemberKey::new(1, Email::parse("c@x.cn").unwrap())];
            assert_eq!(c.fields.fullname(), "c2", "{url}");
            assert_eq!(store.seen_lines(1).await.unwrap().len(), 1, "{url}");
            assert_eq!(store.user_unsubscribes().await.unwrap().len(), 1, "{url}");
            assert_eq!(pending.len(), 1, "{url}");
            store.connection().clone().close().await.unwrap();
        }
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
