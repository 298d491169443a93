//! Opening the state database: read-write (migrated under a lock, only when
//! behind), read-only (nothing created, migrated or written), and reading
//! where its schema stands.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context;
use migrations::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};
use secrecy::{ExposeSecret, SecretString};

use super::integrity;
use super::*;

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

/// A tenant's pool (many per process) is smaller, and on PostgreSQL it
/// holds a connection only while the tenant works (opened when first
/// needed, let go a second after): a fleet of idle tenants, or one
/// starting, does not exhaust the server's connections. Returns the most
/// connections the pool may open.
fn size_for_tenants(options: &mut ConnectOptions, raw: &str) -> u32 {
    let tenant = tenant_schema(raw).is_some();
    if !is_sqlite(raw) {
        let idle = if tenant { 1 } else { 60 };
        options
            .idle_timeout(Duration::from_secs(idle))
            .connect_lazy(tenant);
    }
    match (is_sqlite(raw), tenant) {
        (true, _) => 1,
        (false, true) => 2,
        (false, false) => 8,
    }
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
    let max = size_for_tenants(&mut options, raw);
    options
        .max_connections(max)
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
    if access == Access::Write && !raw.contains(":memory:") {
        // A connection a failed write left inside a transaction is closed,
        // never pooled again (see `integrity`). (`:memory:` keeps its one
        // connection: closing it would drop the database.)
        options.map_sqlx_sqlite_pool_opts(|pool| {
            pool.after_release(|conn, _meta| {
                Box::pin(async move { Ok(integrity::release_clean_sqlite(conn).await) })
            })
        });
    }
    if access != Access::Write {
        options.map_sqlx_postgres_opts(|o| o.options([("default_transaction_read_only", "on")]));
    }
    let port = postgres_tcp_port(raw);
    // (One call: sea-orm keeps only the last function given.)
    options.map_sqlx_postgres_pool_opts(move |pool| {
        let pool = pool.after_release(|conn, _meta| {
            Box::pin(async move { Ok(integrity::release_clean_postgres(conn).await) })
        });
        let Some(port) = port else { return pool };
        // Every new pooled connection, not just the first (see
        // `nodelay`): sqlx 0.9.0 leaves Nagle on.
        pool.after_connect(move |_conn, _meta| {
            Box::pin(async move {
                nodelay::set_on_sockets_to(port);
                Ok(())
            })
        })
    });
    match Database::connect(options).await {
        Ok(db) => Ok(db),
        Err(e) => Err(cannot_open(
            &why_not_connected(e.to_string(), raw).await,
            raw,
        )),
    }
}

/// The pool says only "pool timed out" when every connection attempt
/// failed: one direct attempt says why (refused, no such host, bad
/// password, no such database).
async fn why_not_connected(reason: String, raw: &str) -> String {
    if !reason.contains("timed out") || is_sqlite(raw) {
        return reason;
    }
    use sea_orm::sqlx::Connection as _;
    let direct = tokio::time::timeout(
        Duration::from_secs(10),
        sea_orm::sqlx::PgConnection::connect(raw),
    )
    .await;
    match direct {
        Ok(Err(cause)) => format!("{cause} (after the pool timed out)"),
        _ => reason,
    }
}

/// The PostgreSQL schema a tenant's URL puts first on the connection's
/// `search_path` (`options[search_path]=tenant_x`); `None` for `default`
/// and SQLite.
pub fn tenant_schema(raw: &str) -> Option<&str> {
    let query = raw.split_once('?')?.1;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("options[search_path]="))
}

/// The database of a tenant's URL: the URL without its `search_path`.
pub fn database_of(raw: &str) -> String {
    match tenant_schema(raw) {
        Some(schema) => raw
            .replace(&format!("options[search_path]={schema}"), "")
            .trim_end_matches(['?', '&'])
            .to_string(),
        None => raw.to_string(),
    }
}

/// "cannot open the state database" and why, with the secrets of `raw`
/// taken out.
fn cannot_open(why: &dyn std::fmt::Display, raw: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot open the state database: {}",
        redact_db_error(&why.to_string(), raw)
    )
}

/// Runs `sql` on the PostgreSQL database of the tenant URL `raw`, on a
/// connection of its own that is on no tenant's `search_path`.
async fn on_the_database(raw: &str, sql: &str) -> anyhow::Result<()> {
    use sea_orm::sqlx::{self, Connection, PgConnection};
    let mut conn = PgConnection::connect(&database_of(raw))
        .await
        .map_err(|e| cannot_open(&e, raw))?;
    let done = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    done.map(|_| ()).map_err(anyhow::Error::from)
}

/// Whether creating a schema failed only because another session created
/// it at the same moment (SQLSTATE 23505 on the catalogue, or 42P06).
fn created_by_another(e: &anyhow::Error) -> bool {
    use sea_orm::sqlx;
    e.chain()
        .any(|cause| match cause.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Database(db)) => {
                matches!(db.code().as_deref(), Some("23505" | "42P06"))
            }
            _ => false,
        })
}

/// Creates a tenant's PostgreSQL schema through `db`, the tenant's own
/// pool (a schema named in `search_path` need not exist yet): the
/// connection it opens is the one the schema check and the migration use
/// next, so opening a tenant costs the server one connection, not two — a
/// thousand tenants opening on three instances at once ran it out of
/// connections. Nothing for `default`, whose place exists as it always
/// did.
async fn prepare_tenant_schema(db: &DatabaseConnection, raw: &str) -> anyhow::Result<()> {
    use sea_orm::sqlx;
    if let Some(schema) = tenant_schema(raw) {
        // The name is `tenant_` and [a-z0-9_]: nothing to escape.
        let sql = format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"");
        let created = async {
            let pool = db.get_postgres_connection_pool();
            let mut conn = pool.acquire().await.map_err(|e| cannot_open(&e, raw))?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut *conn)
                .await?;
            anyhow::Ok(())
        }
        .await;
        return match created {
            // Two instances creating it at the same moment: `IF NOT
            // EXISTS` does not stop the second from failing on the
            // catalogue's unique index; the schema is there all the same.
            Err(e) if created_by_another(&e) => Ok(()),
            other => other.with_context(|| format!("cannot create the tenant's schema {schema}")),
        };
    }
    Ok(())
}

/// Creates the directory of a tenant's SQLite file, before it is opened.
async fn prepare_tenant_dir(raw: &str) -> anyhow::Result<()> {
    if let Some(dir) = sqlite_file(raw)
        .as_deref()
        .and_then(std::path::Path::parent)
        .filter(|d| d.extension().is_some_and(|x| x == "tenants"))
    {
        tokio::fs::create_dir_all(dir)
            .await
            .with_context(|| format!("cannot create the tenants' directory {}", dir.display()))?;
    }
    Ok(())
}

/// Deletes all the state at `url` (`tenant purge`): a tenant's PostgreSQL
/// schema is dropped and its SQLite file removed; the state where
/// `default` lives (the main file or schema, shared with no other tenant's
/// rows) has every table dropped. The caller holds the state's lock.
pub async fn purge_state(url: &SecretString) -> anyhow::Result<()> {
    let raw = url.expose_secret();
    if let Some(schema) = tenant_schema(raw) {
        return on_the_database(raw, &format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .await
            .with_context(|| format!("cannot drop the schema {schema}"));
    }
    if let Some(file) = sqlite_file(raw).filter(|f| {
        f.parent()
            .is_some_and(|d| d.extension().is_some_and(|x| x == "tenants"))
    }) {
        for suffix in ["", "-wal", "-shm", ".migrate.lock"] {
            let path = std::path::PathBuf::from(format!("{}{suffix}", file.display()));
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", path.display()));
                }
            }
        }
        return Ok(());
    }
    let db = open_pool(raw, Access::Write).await?;
    let reset = Migrator::reset(&db).await;
    let _ = db.close().await;
    reset.map_err(|e| {
        anyhow::anyhow!(
            "cannot drop the state's tables: {}",
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

/// The migration lock of the state at `raw`: [`MIGRATION_LOCK_KEY`] for
/// `default`'s, and one per tenant schema, so that tenants starting
/// together migrate side by side.
fn migration_lock_key(raw: &str) -> i64 {
    tenant_schema(raw).map_or(MIGRATION_LOCK_KEY, |schema| schema_key("migration", schema))
}

/// An advisory-lock key for `purpose` (`migration`, `tenant`) of a tenant
/// schema: the first 8 bytes of a SHA-256, the same in every process.
pub fn schema_key(purpose: &str, schema: &str) -> i64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("crm-edm-sync {purpose} {schema}"));
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// Applies the pending migrations while holding a migration lock: a
/// PostgreSQL advisory lock on a connection of its own. (SQLite: the
/// caller already holds [`SqliteOpenLock`].) The second instance waits,
/// then finds nothing left to do.
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
            .bind(migration_lock_key(raw))
            .execute(&mut lock)
            .await
            .map_err(|e| failed(&e))?;
        let result = Migrator::up(db, None).await;
        // Closing the connection releases the lock whatever happened.
        let _ = lock.close().await;
        result.map_err(|e| failed(&e))?;
    } else {
        Migrator::up(db, None).await.map_err(|e| failed(&e))?;
    }
    Ok(())
}

/// An exclusive lock on `<file>.migrate.lock` beside an SQLite database,
/// held while a writer opens it: creating the file, switching it to WAL
/// and migrating it are then one process at a time, so two instances
/// starting together on a new file neither meet "database is locked" nor
/// both create the tables. Released when dropped.
struct SqliteOpenLock(std::fs::File);

impl SqliteOpenLock {
    async fn take(file: &std::path::Path) -> anyhow::Result<SqliteOpenLock> {
        let path = std::path::PathBuf::from(format!("{}.migrate.lock", file.display()));
        let shown = path.display().to_string();
        let file = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)?;
            f.lock()?;
            Ok(f)
        })
        .await?
        .with_context(|| format!("cannot lock {shown}"))?;
        Ok(SqliteOpenLock(file))
    }
}

impl Drop for SqliteOpenLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

impl Store {
    /// Connects and applies every pending migration (under a migration
    /// lock: a PostgreSQL advisory lock, or the lock file beside SQLite). A database already current is not
    /// touched: no statement is run to check it that could write or log.
    pub async fn connect(url: &SecretString) -> anyhow::Result<Store> {
        let raw = url.expose_secret();
        prepare_tenant_dir(raw).await?;
        let _opening = match sqlite_file(raw) {
            Some(file) => Some(SqliteOpenLock::take(&file).await?),
            None => None,
        };
        let db = open_pool(raw, Access::Write).await?;
        if !is_sqlite(raw) {
            prepare_tenant_schema(&db, raw).await?;
        }
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
        Ok(Store::around(db))
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
            Schema::Current => Ok(Some(Store::around(db))),
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

    /// Where the state database at `url` stands, read without writing
    /// anything (for `check`): `None` when there is none yet (no SQLite
    /// file; nothing is created).
    pub async fn inspect(url: &SecretString) -> anyhow::Result<Option<Schema>> {
        let raw = url.expose_secret();
        let mut access = Access::Shared;
        if let Some(file) = sqlite_file(raw) {
            if !file.exists() {
                return Ok(None);
            }
            if !std::path::PathBuf::from(format!("{}-wal", file.display())).exists() {
                access = Access::Snapshot;
            }
        }
        let db = open_pool(raw, access).await?;
        let schema = schema_of(&db).await;
        let _ = db.close().await;
        schema.map(Some)
    }

    /// A second, read-only pool on a database this process also writes
    /// (the ops endpoint's): its reads never wait behind the jobs' writes
    /// for a pooled connection (SQLite's pool has one).
    pub async fn reader_beside(url: &SecretString) -> anyhow::Result<Store> {
        let db = open_pool(url.expose_secret(), Access::Shared).await?;
        Ok(Store::around(db))
    }

    /// An empty state database in memory, for a dry run against a database
    /// that does not exist yet: it reads as a first run would.
    pub async fn empty_in_memory() -> anyhow::Result<Store> {
        Store::connect(&SecretString::from("sqlite::memory:".to_string())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Tenant, scoped_database_url};
    use crate::domain::{Email, ListId, MemberKey};

    /// Two tenants on one database (one SQLite file's neighbour, one
    /// PostgreSQL database): what one records, the other does not see,
    /// and each has a lease of its own.
    #[tokio::test]
    async fn each_tenant_keeps_its_state_apart_on_the_same_database() {
        let dir = tempfile::tempdir().unwrap();
        let (urls, _guard) = super::super::tests::both_urls(dir.path()).await;
        for url in urls {
            // Arrange: the default tenant and `acme-co`, on one database.
            let main = SecretString::from(url.clone());
            let acme_url = scoped_database_url(&main, &"acme-co".parse::<Tenant>().unwrap());
            let default = Store::connect(&main).await.unwrap();
            let acme = Store::connect(&acme_url).await.unwrap();
            let key = MemberKey::new(ListId(1), Email::parse("a@b.cn").unwrap());

            // Act: each records the same address under a name of its own.
            let mut row = super::super::tests::member("a@b.cn", true, "Default's");
            default.upsert_members(&[row.clone()], &[]).await.unwrap();
            row.fields =
                crate::domain::MemberFields::new("Acme's", &[""; crate::domain::VAR_COUNT]);
            acme.upsert_members(&[row], &[]).await.unwrap();
            let me = crate::instance::Instance::current("one");
            let (default_lease, _) = default.take_lease(&me).await.unwrap();
            let (acme_lease, _) = acme.take_lease(&me).await.unwrap();
            let (acme_again, _) = acme.take_lease(&me).await.unwrap();

            // Assert: each reads its own row, and the leases count apart.
            let name = |s: &Store| {
                let s = s.clone();
                let key = key.clone();
                async move {
                    let members = s.load_members().await.unwrap();
                    members.get(&key).unwrap().fields.fullname().to_string()
                }
            };
            assert_eq!(name(&default).await, "Default's", "{url}");
            assert_eq!(name(&acme).await, "Acme's", "{url}");
            assert_eq!(
                (default_lease.epoch, acme_lease.epoch, acme_again.epoch),
                (1, 1, 2)
            );
            if url.starts_with("sqlite") {
                assert!(dir.path().join("s.db.tenants/acme-co.db").exists());
            } else {
                assert_eq!(
                    tenant_schema(acme_url.expose_secret()),
                    Some("tenant_acme_co")
                );
            }
            default.close().await;
            acme.close().await;
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn instances_creating_a_tenants_schema_at_the_same_moment_all_succeed() {
        // Arrange: ten tenants' URLs on a fresh database.
        let Some((url, _guard)) = crate::state::fresh_postgres().await else {
            return;
        };
        let tenants: Vec<String> = (0..10)
            .map(|i| format!("{url}?options[search_path]=tenant_race{i}"))
            .collect();

        // Act: four openers at once for each, as instances starting
        // together do.
        let mut openers = tokio::task::JoinSet::new();
        for tenant in &tenants {
            for _ in 0..4 {
                let tenant = tenant.clone();
                openers.spawn(async move {
                    let db = open_pool(&tenant, Access::Write).await?;
                    prepare_tenant_schema(&db, &tenant).await
                });
            }
        }
        let failed: Vec<String> = openers
            .join_all()
            .await
            .into_iter()
            .filter_map(|r| r.err().map(|e| format!("{e:#}")))
            .collect();

        // Assert
        assert!(failed.is_empty(), "{failed:?}");
    }
}
