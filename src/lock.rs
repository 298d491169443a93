//! One active instance per state database.
//!
//! A lock is per tenant: each tenant's state has its own.
//!
//! On PostgreSQL: a session advisory lock, one key per tenant
//! ([`advisory_key`]), held on a dedicated connection (not a pooled one,
//! which could be recycled and silently drop the lock) that this process
//! shares for every lock it takes on the database ([`Session`]); if that
//! connection dies, every lock is gone and the holders must stop. The
//! daemon also shows it is alive there ([`instances`]): how many instances
//! share the database decides each one's share of the tenants. On SQLite:
//! an exclusive lock on a file beside the database (`state.db.lock`),
//! released by the kernel when the process dies.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::Context as _;
use sea_orm::sqlx::{self, Connection, PgConnection};
use secrecy::{ExposeSecret, SecretString};

/// The class (first key) of the two-key advisory locks by which daemons
/// show they are alive ("ces!" in ASCII); the second key is the process's.
pub const PRESENCE_CLASS: i32 = 0x63_65_73_21;

/// The advisory-lock key: "crm-edm" in ASCII, so it is recognisable in
/// `pg_locks`.
pub const ADVISORY_KEY: i64 = 0x63_72_6d_2d_65_64_6d;

/// The advisory-lock key of the state at `url`: [`ADVISORY_KEY`] for the
/// `default` tenant (so an instance of an earlier release, which takes
/// that key, and this one exclude each other), and for another tenant a
/// key made from its schema's name.
pub fn advisory_key(url: &str) -> i64 {
    crate::state::tenant_schema(url).map_or(ADVISORY_KEY, |schema| {
        crate::state::schema_key("tenant", schema)
    })
}

/// A held instance lock; dropping it releases it.
#[derive(Debug)]
pub enum InstanceLock {
    Postgres(PostgresLock),
    File(std::fs::File, PathBuf),
    /// An in-memory SQLite database belongs to one process anyway.
    Unshared,
}

/// Where the lock of a database lives.
#[derive(Debug, Clone, PartialEq)]
pub enum LockTarget {
    Postgres(String),
    File(PathBuf),
    Unshared,
}

impl LockTarget {
    pub fn of(url: &SecretString) -> LockTarget {
        let url = url.expose_secret();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return LockTarget::Postgres(url.to_string());
        }
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        let path = path.split('?').next().unwrap_or(path);
        if path.is_empty() || path.contains(":memory:") {
            return LockTarget::Unshared;
        }
        LockTarget::File(PathBuf::from(format!("{path}.lock")))
    }

    /// Tries once; `Ok(None)` when another instance holds it.
    pub async fn try_acquire(&self) -> anyhow::Result<Option<InstanceLock>> {
        match self {
            LockTarget::Unshared => Ok(Some(InstanceLock::Unshared)),
            LockTarget::File(path) => {
                // A tenant's lock sits beside its file, in the tenants'
                // directory, which its first run creates.
                if let Some(dir) = path
                    .parent()
                    .filter(|d| d.extension().is_some_and(|x| x == "tenants"))
                {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                }
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(path)
                    .with_context(|| format!("cannot open the lock file {}", path.display()))?;
                match file.try_lock() {
                    Ok(()) => Ok(Some(InstanceLock::File(file, path.clone()))),
                    Err(std::fs::TryLockError::WouldBlock) => Ok(None),
                    Err(std::fs::TryLockError::Error(e)) => {
                        Err(e).with_context(|| format!("cannot lock {}", path.display()))
                    }
                }
            }
            LockTarget::Postgres(url) => {
                let session = Session::of(url);
                let key = advisory_key(url);
                Ok(session.try_lock(key).await?.map(|generation| {
                    InstanceLock::Postgres(PostgresLock {
                        session,
                        key,
                        generation,
                    })
                }))
            }
        }
    }

    /// Waits up to `bound` for the lock, trying every `poll`.
    pub async fn acquire_within(
        &self,
        bound: Duration,
        poll: Duration,
    ) -> anyhow::Result<InstanceLock> {
        let deadline = tokio::time::Instant::now() + bound;
        let mut said = false;
        loop {
            if let Some(lock) = self.try_acquire().await? {
                return Ok(lock);
            }
            if !said {
                tracing::info!(
                    wait_secs = bound.as_secs(),
                    "another instance holds the state database; waiting"
                );
                said = true;
            }
            if tokio::time::Instant::now() + poll > deadline {
                anyhow::bail!(
                    "another crm-edm-sync instance holds the state database (waited {} s, daemon.lock_wait_secs); stop it or try again later",
                    bound.as_secs()
                );
            }
            tokio::time::sleep(poll).await;
        }
    }
}

impl InstanceLock {
    /// Whether the lock is still held: a PostgreSQL lock dies with its
    /// connection; a lock file is lost when the file at its path is no
    /// longer the one this process locked (removed or replaced, so that
    /// another instance could lock a new file there).
    pub async fn still_held(&mut self) -> bool {
        match self {
            InstanceLock::Postgres(lock) => lock.session.holds(lock.key, lock.generation).await,
            InstanceLock::File(file, path) => {
                use std::os::unix::fs::MetadataExt;
                match (std::fs::metadata(&*path), file.metadata()) {
                    (Ok(at_path), Ok(ours)) => {
                        at_path.ino() == ours.ino() && at_path.dev() == ours.dev()
                    }
                    _ => false,
                }
            }
            InstanceLock::Unshared => true,
        }
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        match self {
            InstanceLock::File(file, _) => {
                let _ = file.unlock();
            }
            InstanceLock::Postgres(lock) => lock.session.unlock(lock.key, lock.generation),
            InstanceLock::Unshared => {}
        }
    }
}

/// A tenant's advisory lock, held on its database's [`Session`].
#[derive(Debug)]
pub struct PostgresLock {
    session: Arc<Session>,
    key: i64,
    /// The session's connection it was taken on: a lock of an earlier,
    /// lost connection is not held, whatever key the new one holds.
    generation: u64,
}

/// This process's one connection to a PostgreSQL database for advisory
/// locks: every tenant lock, and the daemon's presence. Reconnected when
/// lost (a new generation: every lock of the old one is gone).
#[derive(Debug)]
pub struct Session {
    url: String,
    conn: tokio::sync::Mutex<Option<PgConnection>>,
    generation: AtomicU64,
    held: std::sync::Mutex<HashSet<i64>>,
    /// The second key of this process's presence lock, once taken in the
    /// current generation.
    presence: std::sync::Mutex<Option<(u64, i32)>>,
    /// When the connection last answered: a check within
    /// [`PING_FRESH`] of it does not ask again.
    answered: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How long an answer of the lock connection vouches for it.
const PING_FRESH: Duration = Duration::from_millis(500);

/// The sessions of this process, by database (URL without the tenant's
/// `search_path`).
static SESSIONS: LazyLock<std::sync::Mutex<HashMap<String, Arc<Session>>>> =
    LazyLock::new(Default::default);

impl Session {
    /// The session of the database `url` is on.
    fn of(url: &str) -> Arc<Session> {
        let base = crate::state::database_of(url);
        let mut all = SESSIONS.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(base.clone())
            .or_insert_with(|| {
                Arc::new(Session {
                    url: base,
                    conn: tokio::sync::Mutex::new(None),
                    generation: AtomicU64::new(0),
                    held: Default::default(),
                    presence: Default::default(),
                    answered: Default::default(),
                })
            })
            .clone()
    }

    /// The connection, alive: reconnects (a new generation, nothing held)
    /// when there is none or it does not answer.
    async fn alive<'a>(
        &self,
        conn: &'a mut Option<PgConnection>,
    ) -> anyhow::Result<&'a mut PgConnection> {
        let answers = match conn.as_mut() {
            Some(c) => c.ping().await.is_ok(),
            None => false,
        };
        if !answers {
            self.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
            self.generation.fetch_add(1, Ordering::SeqCst);
            let fresh = PgConnection::connect(&self.url).await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot open the lock connection to PostgreSQL: {}",
                    crate::state::redact_db_error(&e.to_string(), &self.url)
                )
            })?;
            *conn = Some(fresh);
        }
        conn.as_mut().context("no lock connection")
    }

    /// Takes `key` if free; the generation it was taken in.
    async fn try_lock(&self, key: i64) -> anyhow::Result<Option<u64>> {
        let mut guard = self.conn.lock().await;
        let conn = self.alive(&mut guard).await?;
        let generation = self.generation.load(Ordering::SeqCst);
        if self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key)
        {
            // Held by this process already (another of its holders).
            return Ok(None);
        }
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(conn)
            .await
            .context("cannot take the advisory lock")?;
        if got {
            self.held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key);
        }
        Ok(got.then_some(generation))
    }

    /// Whether the connection answered (a ping or any read on it) within
    /// [`PING_FRESH`].
    fn answered_lately(&self) -> bool {
        self.answered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() < PING_FRESH)
    }

    /// Notes whether the connection just answered.
    fn note_answer(&self, ok: bool) {
        *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = ok.then(std::time::Instant::now);
    }

    /// Whether the connection answers (asked at most every
    /// [`PING_FRESH`]).
    async fn answers(&self, conn: &mut PgConnection) -> bool {
        if self.answered_lately() {
            return true;
        }
        let ok = conn.ping().await.is_ok();
        self.note_answer(ok);
        ok
    }

    /// Whether `key`, taken in `generation`, is still held.
    ///
    /// While the connection answered lately, this asks nothing and does
    /// not wait for the connection: with hundreds of tenants, their
    /// every-second checks queue on it, and a check that waited its turn
    /// past its bound would read as a lost lock — every tenant dropping
    /// its job at once, then taking its lock and lease again, a storm of
    /// connections. A lost connection still shows at once: the next read
    /// fails, and a reconnect starts a new generation.
    async fn holds(&self, key: i64, generation: u64) -> bool {
        let mine = || {
            self.generation.load(Ordering::SeqCst) == generation
                && self
                    .held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&key)
        };
        if !mine() {
            return false;
        }
        if self.answered_lately() {
            return true;
        }
        let mut guard = self.conn.lock().await;
        let Some(conn) = guard.as_mut() else {
            return false;
        };
        self.answers(conn).await && mine()
    }

    /// Lets `key` go (in the background: called from `Drop`).
    fn unlock(self: &Arc<Session>, key: i64, generation: u64) {
        if self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let session = self.clone();
        runtime.spawn(async move {
            let mut guard = session.conn.lock().await;
            if session.generation.load(Ordering::SeqCst) != generation {
                return;
            }
            if let Some(conn) = guard.as_mut() {
                let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(key)
                    .execute(conn)
                    .await;
            }
        });
    }

    /// Shows this process alive (its presence lock, taken again on a new
    /// connection) and counts the daemons alive on the database, itself
    /// included.
    async fn instances(&self) -> anyhow::Result<usize> {
        let mut guard = self.conn.lock().await;
        let conn = self.alive(&mut guard).await?;
        let generation = self.generation.load(Ordering::SeqCst);
        let mine = *self.presence.lock().unwrap_or_else(|p| p.into_inner());
        if mine.is_none_or(|(g, _)| g != generation) {
            let mut taken = None;
            for _ in 0..8 {
                let second: i32 = rand_i32();
                let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                    .bind(PRESENCE_CLASS)
                    .bind(second)
                    .fetch_one(&mut *conn)
                    .await
                    .context("cannot show this instance alive")?;
                if got {
                    taken = Some((generation, second));
                    break;
                }
            }
            *self.presence.lock().unwrap_or_else(|p| p.into_inner()) = taken;
        }
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = $1::bigint::oid AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .bind(i64::from(PRESENCE_CLASS))
        .fetch_one(conn)
        .await
        .context("cannot count the instances")?;
        Ok(usize::try_from(n).unwrap_or(1).max(1))
    }
}

impl Session {
    /// A tenant's lease epoch and waiting requests, read on this
    /// connection (never reconnecting: a lost connection is an error).
    async fn peek(&self, schema: Option<&str>) -> anyhow::Result<crate::state::fleet::Peek> {
        let mut guard = self.conn.lock().await;
        let conn = guard.as_mut().context("the lock connection is gone")?;
        let peek = crate::state::fleet::peek(conn, schema).await;
        self.note_answer(peek.is_ok());
        peek
    }

    /// A tenant's last finished run of each job, read on this connection.
    async fn last_finished(&self, schema: Option<&str>) -> anyhow::Result<Vec<LastRun>> {
        let mut guard = self.conn.lock().await;
        let conn = self.alive(&mut guard).await?;
        crate::state::fleet::last_finished(conn, schema).await
    }
}

/// A job's last finished run: how it ended and its error.
pub type LastRun = (
    crate::stored_enums::Job,
    crate::stored_enums::RunStatus,
    Option<String>,
);

/// On PostgreSQL, the lease epoch and waiting `--once` requests of the
/// tenant at `url`, read on this process's lock connection (no tenant
/// pool is opened); `None` on SQLite, whose caller reads its own store.
pub async fn peek(url: &SecretString) -> Option<anyhow::Result<crate::state::fleet::Peek>> {
    match LockTarget::of(url) {
        LockTarget::Postgres(raw) => {
            let schema = crate::state::tenant_schema(&raw).map(str::to_string);
            Some(Session::of(&raw).peek(schema.as_deref()).await)
        }
        _ => None,
    }
}

/// On PostgreSQL, the tenant's last finished run of each job, read on the
/// lock connection; `None` on SQLite.
pub async fn last_finished(url: &SecretString) -> Option<anyhow::Result<Vec<LastRun>>> {
    match LockTarget::of(url) {
        LockTarget::Postgres(raw) => {
            let schema = crate::state::tenant_schema(&raw).map(str::to_string);
            Some(Session::of(&raw).last_finished(schema.as_deref()).await)
        }
        _ => None,
    }
}

/// A random second key for a presence lock.
fn rand_i32() -> i32 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// How many daemons share the state database at `url` (this one counted,
/// its presence shown): 1 on SQLite, which one instance serves.
pub async fn instances(url: &SecretString) -> anyhow::Result<usize> {
    match LockTarget::of(url) {
        LockTarget::Postgres(url) => Session::of(&url).instances().await,
        _ => Ok(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_target_follows_the_database_url() {
        let t = |u: &str| LockTarget::of(&SecretString::from(u.to_string()));
        assert_eq!(
            t("sqlite://state.db?mode=rwc"),
            LockTarget::File("state.db.lock".into())
        );
        assert_eq!(
            t("sqlite:///var/lib/x/state.db?mode=rwc"),
            LockTarget::File("/var/lib/x/state.db.lock".into())
        );
        assert_eq!(t("sqlite::memory:"), LockTarget::Unshared);
        assert!(matches!(t("postgres://u:p@h/db"), LockTarget::Postgres(_)));
    }

    #[tokio::test]
    async fn a_file_lock_is_exclusive_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let target = LockTarget::File(dir.path().join("state.db.lock"));
        let first = target.try_acquire().await.unwrap();
        assert!(first.is_some());
        assert!(target.try_acquire().await.unwrap().is_none());
        let err = target
            .acquire_within(Duration::from_millis(300), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("another crm-edm-sync instance"),
            "{err}"
        );
        drop(first);
        assert!(target.try_acquire().await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_lock_file_removed_or_replaced_is_no_longer_held() {
        // Arrange: a held lock file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db.lock");
        let target = LockTarget::File(path.clone());
        let mut held = target.try_acquire().await.unwrap().unwrap();
        assert!(held.still_held().await);

        // Act: someone removes it, and another instance locks a new file
        // at the same path.
        std::fs::remove_file(&path).unwrap();
        let usurper = target.try_acquire().await.unwrap();

        // Assert
        assert!(usurper.is_some(), "the new file can be locked");
        assert!(!held.still_held().await);
    }
}
