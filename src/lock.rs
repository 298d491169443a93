//! One active instance per state database.
//!
//! A lock is per tenant: each tenant's state has its own.
//!
//! On PostgreSQL: a session advisory lock, one key per tenant
//! ([`advisory_key`]), held on a dedicated connection (not a pooled one,
//! which could be recycled and silently drop the lock) that this process
//! shares for every lock it takes on the database ([`Session`]); if that
//! connection dies, every lock is gone and the holders must stop. Holders
//! learn it, and whether their lease is still theirs, from one watch per
//! process that reads every held tenant's lease on that connection
//! ([`Sighting`]), never by querying it each. The
//! daemon also shows it is alive there ([`instances`]): how many instances
//! share the database decides each one's share of the tenants. On SQLite:
//! an exclusive lock on a file beside the database (`state.db.lock`),
//! released by the kernel when the process dies.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
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
                let schema = crate::state::tenant_schema(url).map(str::to_string);
                Ok(session.try_lock(key, schema).await?.map(|generation| {
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
    /// Whether a lock file is still held: it is lost when the file at its
    /// path is no longer the one this process locked (removed or
    /// replaced, so that another instance could lock a new file there).
    /// A PostgreSQL lock answers through [`InstanceLock::sighting`].
    pub fn still_held(&self) -> bool {
        match self {
            InstanceLock::Postgres(lock) => lock.sighting(None).is_held(),
            InstanceLock::File(file, path) => {
                use std::os::unix::fs::MetadataExt;
                match (std::fs::metadata(path), file.metadata()) {
                    (Ok(at_path), Ok(ours)) => {
                        at_path.ino() == ours.ino() && at_path.dev() == ours.dev()
                    }
                    _ => false,
                }
            }
            InstanceLock::Unshared => true,
        }
    }

    /// On PostgreSQL, what the lock connection's watch last saw of this
    /// lock and its tenant's lease, in a round started after `since`
    /// (`None` on SQLite, whose caller reads its own store).
    pub fn sighting(&self, since: std::time::Instant) -> Option<Sighting> {
        match self {
            InstanceLock::Postgres(lock) => Some(lock.sighting(Some(since))),
            _ => None,
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

/// What the lock connection's watch last saw of a held PostgreSQL lock.
#[derive(Debug, Clone, PartialEq)]
pub enum Sighting {
    /// The lock is held, and this is its tenant's lease and requests.
    Held(crate::state::fleet::Peek),
    /// No round has read it since the asked instant: nothing new is known.
    NotYet,
    /// The lock is gone, for this reason.
    Lost(String),
}

impl Sighting {
    fn is_held(&self) -> bool {
        !matches!(self, Sighting::Lost(_))
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

impl PostgresLock {
    /// What the watch saw of this lock (in a round started after `since`,
    /// when given). Never waits for the connection.
    fn sighting(&self, since: Option<std::time::Instant>) -> Sighting {
        let s = &self.session;
        if s.generation.load(Ordering::SeqCst) != self.generation {
            return Sighting::Lost(
                "the lock connection was lost (it failed, or did not answer within 10 s): every lock on it is gone".into(),
            );
        }
        if !lock_of(&s.held).contains_key(&self.key) {
            return Sighting::Lost("the lock was let go".into());
        }
        let seen = lock_of(&s.seen);
        let current = seen.generation == Some(self.generation)
            && seen
                .started
                .is_some_and(|started| since.is_none_or(|since| started >= since));
        match seen.peeks.get(&self.key) {
            Some(Ok(peek)) if current => Sighting::Held(*peek),
            Some(Err(e)) if current => Sighting::Lost(format!(
                "cannot read the tenant's lease on the lock connection: {e}"
            )),
            _ => Sighting::NotYet,
        }
    }
}

/// How long one use of the lock connection may take (a ping, a lock, a
/// read). Past it the connection counts as lost and is closed — every
/// lock on it goes — rather than used again half-way through a query.
///
/// Generous on purpose: on a machine short of CPU, an answer that came
/// in time is read late, and a bound of a second or two then reads as a
/// lost connection — every tenant of the process dropped at once, and
/// taken again. A connection that really fails shows at once (its use
/// errs); the lease check in every write's own transaction is what keeps
/// an instance that lost its tenant from writing.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// How long opening the lock connection may take.
const CONNECT_WITHIN: Duration = Duration::from_secs(5);

/// How long an answer of the lock connection vouches for it: a use
/// within it does not ping first.
const PING_FRESH: Duration = Duration::from_millis(500);

/// How often the watch reads the lease of every tenant this process
/// holds (`Session::watch`), at most: a round that takes longer than a
/// tenth of it stretches the pause after it to nine times its length
/// (at most [`WATCH_AT_LEAST_EVERY`]), so that the watch never keeps the
/// connection busy more than a tenth of the time.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// The longest pause between two watch rounds.
pub const WATCH_AT_LEAST_EVERY: Duration = Duration::from_secs(5);

/// Tenants read per statement of a watch round.
const WATCH_CHUNK: usize = 200;

/// This process's one connection to a PostgreSQL database for advisory
/// locks: every tenant lock, and the daemon's presence. Reconnected when
/// lost (a new generation: every lock of the old one is gone).
///
/// Every use of the connection runs in a task of its own
/// ([`Session::on_conn`]), so that a caller that stops waiting never
/// leaves it half-way through a query, and within [`ANSWER_WITHIN`], past
/// which it is closed. Holders do not query it to learn whether they
/// still hold their tenant: one watch task reads every held tenant's
/// lease each [`WATCH_EVERY`], in one statement per [`WATCH_CHUNK`]
/// tenants, and each holder reads what it saw ([`Sighting`]). With a
/// thousand tenants, a thousand reads a second queued on one connection
/// would make a slow answer look like a thousand lost locks at once.
#[derive(Debug)]
pub struct Session {
    url: String,
    conn: tokio::sync::Mutex<Option<PgConnection>>,
    generation: AtomicU64,
    /// The keys held in the current generation, each with its tenant's
    /// schema (`None`: the `default` tenant's tables on the connection's
    /// own `search_path`).
    held: std::sync::Mutex<HashMap<i64, Option<String>>>,
    /// The second key of this process's presence lock, once taken in the
    /// current generation.
    presence: std::sync::Mutex<Option<(u64, i32)>>,
    /// When the connection last answered.
    answered: std::sync::Mutex<Option<std::time::Instant>>,
    /// What the last watch round saw.
    seen: std::sync::Mutex<Seen>,
    watching: AtomicBool,
}

/// A watch round: the generation it read in, when it started, and each
/// held key's tenant lease (or why it could not be read).
#[derive(Debug, Default)]
struct Seen {
    generation: Option<u64>,
    started: Option<std::time::Instant>,
    peeks: HashMap<i64, Result<crate::state::fleet::Peek, String>>,
}

/// A use of the lock connection: given the connection and its
/// generation, a future borrowing it.
type Op<T> =
    Box<dyn for<'c> FnOnce(&'c mut PgConnection, u64) -> BoxFuture<'c, anyhow::Result<T>> + Send>;

/// The guarded value, whether or not a holder panicked.
fn lock_of<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The sessions of this process, by database (URL without the tenant's
/// `search_path`).
static SESSIONS: LazyLock<std::sync::Mutex<HashMap<String, Arc<Session>>>> =
    LazyLock::new(Default::default);

impl Session {
    /// The session of the database `url` is on.
    fn of(url: &str) -> Arc<Session> {
        let base = crate::state::database_of(url);
        lock_of(&SESSIONS)
            .entry(base.clone())
            .or_insert_with(|| {
                Arc::new(Session {
                    url: base,
                    conn: tokio::sync::Mutex::new(None),
                    generation: AtomicU64::new(0),
                    held: Default::default(),
                    presence: Default::default(),
                    answered: Default::default(),
                    seen: Default::default(),
                    watching: AtomicBool::new(false),
                })
            })
            .clone()
    }

    /// Runs `op` on the connection — opened again first, when `reopen`,
    /// if it is gone or does not answer — in a task of its own, within
    /// [`ANSWER_WITHIN`]; past it the connection is closed.
    async fn on_conn<T: Send + 'static>(
        self: &Arc<Self>,
        reopen: bool,
        op: Op<T>,
    ) -> anyhow::Result<T> {
        let session = self.clone();
        tokio::spawn(async move {
            let mut guard = session.conn.lock().await;
            if reopen {
                session.alive(&mut guard).await?;
            }
            let generation = session.generation.load(Ordering::SeqCst);
            let conn = guard.as_mut().context("the lock connection is gone")?;
            match tokio::time::timeout(ANSWER_WITHIN, op(conn, generation)).await {
                Ok(Err(e)) if broken(&e) => {
                    tracing::warn!(error = %format!("{e:#}"), "the lock connection failed; it is closed, and every lock on it with it");
                    session.close(&mut guard);
                    Err(e)
                }
                Ok(result) => {
                    session.note_answer(result.is_ok());
                    result
                }
                Err(_) => {
                    session.close(&mut guard);
                    anyhow::bail!(
                        "the lock connection did not answer within {} s; it is closed, and every lock on it with it",
                        ANSWER_WITHIN.as_secs()
                    )
                }
            }
        })
        .await
        .context("a use of the lock connection ended abnormally")?
    }

    /// Closes the connection: every lock on it is gone (a new generation).
    fn close(&self, conn: &mut Option<PgConnection>) {
        *conn = None;
        lock_of(&self.held).clear();
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.note_answer(false);
    }

    /// Makes the connection alive: reconnects (a new generation, nothing
    /// held) when there is none or it does not answer.
    async fn alive(&self, conn: &mut Option<PgConnection>) -> anyhow::Result<()> {
        let answers = match conn.as_mut() {
            Some(_) if self.answered_lately() => true,
            Some(c) => matches!(
                tokio::time::timeout(ANSWER_WITHIN, c.ping()).await,
                Ok(Ok(()))
            ),
            None => false,
        };
        if answers {
            return Ok(());
        }
        if conn.is_some() {
            tracing::warn!(
                "the lock connection did not answer a ping within {} s: it is opened again, and every lock on it is gone",
                ANSWER_WITHIN.as_secs()
            );
        }
        self.close(conn);
        let fresh = tokio::time::timeout(CONNECT_WITHIN, PgConnection::connect(&self.url))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "cannot open the lock connection to PostgreSQL within {} s",
                    CONNECT_WITHIN.as_secs()
                )
            })?
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot open the lock connection to PostgreSQL: {}",
                    crate::state::redact_db_error(&e.to_string(), &self.url)
                )
            })?;
        *conn = Some(fresh);
        self.note_answer(true);
        Ok(())
    }

    /// Whether the connection answered within [`PING_FRESH`].
    fn answered_lately(&self) -> bool {
        lock_of(&self.answered).is_some_and(|at| at.elapsed() < PING_FRESH)
    }

    /// Notes whether the connection just answered.
    fn note_answer(&self, ok: bool) {
        *lock_of(&self.answered) = ok.then(std::time::Instant::now);
    }

    /// Takes `key` (the lock of the tenant in `schema`) if free; the
    /// generation it was taken in. The first lock taken starts the watch.
    async fn try_lock(
        self: &Arc<Self>,
        key: i64,
        schema: Option<String>,
    ) -> anyhow::Result<Option<u64>> {
        let session = self.clone();
        let taken = self
            .on_conn(
                true,
                Box::new(move |conn, generation| {
                    Box::pin(async move {
                        if lock_of(&session.held).contains_key(&key) {
                            // Held by this process already (another of its holders).
                            return Ok(None);
                        }
                        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                            .bind(key)
                            .fetch_one(conn)
                            .await
                            .context("cannot take the advisory lock")?;
                        if got {
                            lock_of(&session.held).insert(key, schema);
                        }
                        Ok(got.then_some(generation))
                    })
                }),
            )
            .await?;
        if taken.is_some() {
            self.watch();
        }
        Ok(taken)
    }

    /// Lets `key` go (in the background: called from `Drop`).
    fn unlock(self: &Arc<Session>, key: i64, generation: u64) {
        if self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        lock_of(&self.held).remove(&key);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let session = self.clone();
        runtime.spawn(async move {
            let _ = session
                .on_conn(
                    false,
                    Box::new(move |conn, now| {
                        Box::pin(async move {
                            if now == generation {
                                sqlx::query("SELECT pg_advisory_unlock($1)")
                                    .bind(key)
                                    .execute(conn)
                                    .await?;
                            }
                            Ok(())
                        })
                    }),
                )
                .await;
        });
    }

    /// Starts the watch, once per process and database: every
    /// [`WATCH_EVERY`], a round reads every held tenant's lease.
    fn watch(self: &Arc<Self>) {
        if self.watching.swap(true, Ordering::SeqCst) {
            return;
        }
        let session = self.clone();
        tokio::spawn(async move {
            let mut pause = WATCH_EVERY;
            loop {
                tokio::time::sleep(pause).await;
                let started = std::time::Instant::now();
                session.watch_round().await;
                pause = (started.elapsed() * 9).clamp(WATCH_EVERY, WATCH_AT_LEAST_EVERY);
            }
        });
    }

    /// One round of the watch: reads every held tenant's lease and
    /// requests, then publishes what it saw. A round that cannot read
    /// publishes nothing: the connection it could not use is closed or
    /// opened again, a new generation, which every holder sees.
    async fn watch_round(self: &Arc<Self>) {
        let held: Vec<(i64, Option<String>)> = lock_of(&self.held)
            .iter()
            .map(|(key, schema)| (*key, schema.clone()))
            .collect();
        if held.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let mut seen = Seen {
            generation: None,
            started: Some(started),
            peeks: HashMap::with_capacity(held.len()),
        };
        for chunk in held.chunks(WATCH_CHUNK) {
            let chunk = chunk.to_vec();
            let read = self
                .on_conn(
                    true,
                    Box::new(move |conn, generation| {
                        Box::pin(async move { Ok((generation, read_leases(conn, &chunk).await?)) })
                    }),
                )
                .await;
            match read {
                Ok((generation, peeks)) if seen.generation.is_none_or(|g| g == generation) => {
                    seen.generation = Some(generation);
                    seen.peeks.extend(peeks);
                }
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot read the held tenants' leases on the lock connection");
                    return;
                }
            }
        }
        *lock_of(&self.seen) = seen;
    }

    /// Shows this process alive (its presence lock, taken again on a new
    /// connection) and counts the daemons alive on the database, itself
    /// included.
    async fn instances(self: &Arc<Self>) -> anyhow::Result<usize> {
        let session = self.clone();
        self.on_conn(
            true,
            Box::new(move |conn, generation| {
                Box::pin(async move {
                    let mine = *lock_of(&session.presence);
                    if mine.is_none_or(|(g, _)| g != generation) {
                        let taken = take_presence(conn, generation).await?;
                        *lock_of(&session.presence) = taken;
                    }
                    let n: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = $1::bigint::oid AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    )
                    .bind(i64::from(PRESENCE_CLASS))
                    .fetch_one(conn)
                    .await
                    .context("cannot count the instances")?;
                    Ok(usize::try_from(n).unwrap_or(1).max(1))
                })
            }),
        )
        .await
    }

    /// A tenant's last finished run of each job, read on this connection.
    async fn last_finished(
        self: &Arc<Self>,
        schema: Option<String>,
    ) -> anyhow::Result<Vec<LastRun>> {
        self.on_conn(
            true,
            Box::new(move |conn, _| {
                Box::pin(async move {
                    crate::state::fleet::last_finished(conn, schema.as_deref()).await
                })
            }),
        )
        .await
    }
}

/// Whether `e` says the connection itself failed (rather than a
/// statement on it): an I/O or protocol error, or the server ending the
/// session (SQLSTATE classes 08, connection exception, and 57, operator
/// intervention, as `pg_terminate_backend` or a shutdown).
fn broken(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|cause| match cause.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::Tls(_)) => true,
            Some(sqlx::Error::Database(db)) => db
                .code()
                .is_some_and(|code| code.starts_with("08") || code.starts_with("57")),
            _ => false,
        })
}

/// Reads the lease and requests of every `(key, schema)` of `held`: in
/// one statement, or — when that fails, as one tenant's missing tables
/// make it — one by one, so that only that tenant learns of its error.
/// A failed connection is an error.
async fn read_leases(
    conn: &mut PgConnection,
    held: &[(i64, Option<String>)],
) -> anyhow::Result<Vec<(i64, Result<crate::state::fleet::Peek, String>)>> {
    let schemas: Vec<Option<&str>> = held.iter().map(|(_, s)| s.as_deref()).collect();
    match crate::state::fleet::peek_many(conn, &schemas).await {
        Ok(peeks) => {
            let keys = held.iter().map(|(k, _)| *k);
            return Ok(keys.zip(peeks.into_iter().map(Ok)).collect());
        }
        Err(e) if broken(&e) => return Err(e),
        Err(_) => {}
    }
    let mut out = Vec::with_capacity(held.len());
    for (key, schema) in held {
        match crate::state::fleet::peek(conn, schema.as_deref()).await {
            Err(e) if broken(&e) => return Err(e),
            peek => out.push((*key, peek.map_err(|e| format!("{e:#}")))),
        }
    }
    Ok(out)
}

/// Takes a presence lock of this process on `conn`: a random second key
/// under [`PRESENCE_CLASS`], tried a few times.
async fn take_presence(
    conn: &mut PgConnection,
    generation: u64,
) -> anyhow::Result<Option<(u64, i32)>> {
    for _ in 0..8 {
        let second: i32 = rand_i32();
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(PRESENCE_CLASS)
            .bind(second)
            .fetch_one(&mut *conn)
            .await
            .context("cannot show this instance alive")?;
        if got {
            return Ok(Some((generation, second)));
        }
    }
    Ok(None)
}

/// A job's last finished run: how it ended and its error.
pub type LastRun = (
    crate::stored_enums::Job,
    crate::stored_enums::RunStatus,
    Option<String>,
);

/// On PostgreSQL, the tenant's last finished run of each job, read on the
/// lock connection; `None` on SQLite.
pub async fn last_finished(url: &SecretString) -> Option<anyhow::Result<Vec<LastRun>>> {
    match LockTarget::of(url) {
        LockTarget::Postgres(raw) => {
            let schema = crate::state::tenant_schema(&raw).map(str::to_string);
            Some(Session::of(&raw).last_finished(schema).await)
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
        let held = target.try_acquire().await.unwrap().unwrap();
        assert!(held.still_held());

        // Act: someone removes it, and another instance locks a new file
        // at the same path.
        std::fs::remove_file(&path).unwrap();
        let usurper = target.try_acquire().await.unwrap();

        // Assert
        assert!(usurper.is_some(), "the new file can be locked");
        assert!(!held.still_held());
    }
}

#[cfg(test)]
mod watch_tests {
    use super::*;
    use std::time::Instant;

    /// A fresh database with `n` tenant schemas, each holding the two
    /// tables the watch reads: the lease (epoch 7) and no request, but
    /// tenant 0 has a queued one. Returns the tenants' URLs, an admin
    /// connection and the guard that drops the database.
    async fn tenants(n: usize) -> Option<(Vec<String>, PgConnection, impl Drop)> {
        let (url, guard) = crate::state::fresh_postgres().await?;
        let mut admin = PgConnection::connect(&url).await.unwrap();
        let mut urls = Vec::new();
        for i in 0..n {
            let s = format!("tenant_t{i}");
            let asked = if i == 0 {
                "INSERT INTO {s}.run_requests VALUES ('queued');"
            } else {
                ""
            };
            let sql = format!(
                "CREATE SCHEMA {s}; CREATE TABLE {s}.lease (id int, epoch bigint); INSERT INTO {s}.lease VALUES (1, 7); CREATE TABLE {s}.run_requests (state text); {}",
                asked.replace("{s}", &s)
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut admin)
                .await
                .unwrap();
            urls.push(format!("{url}?options[search_path]={s}"));
        }
        Some((urls, admin, guard))
    }

    /// Takes every tenant's lock.
    async fn take_all(urls: &[String]) -> Vec<InstanceLock> {
        let mut locks = Vec::new();
        for url in urls {
            let target = LockTarget::of(&SecretString::from(url.clone()));
            locks.push(
                target
                    .try_acquire()
                    .await
                    .unwrap()
                    .expect("the lock is free"),
            );
        }
        locks
    }

    /// Polls until every lock's sighting (after `since`) is no longer
    /// `NotYet`, within `bound`; returns them.
    async fn settled(locks: &[InstanceLock], since: Instant, bound: Duration) -> Vec<Sighting> {
        let deadline = Instant::now() + bound;
        loop {
            let all: Vec<Sighting> = locks.iter().map(|l| l.sighting(since).unwrap()).collect();
            if all.iter().all(|s| *s != Sighting::NotYet) || Instant::now() > deadline {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_watch_sees_every_held_tenants_lease_and_a_lost_connection() {
        // Arrange: 250 tenants (two statements a round), all held here.
        let Some((urls, mut admin, _guard)) = tenants(250).await else {
            return;
        };
        let locks = take_all(&urls).await;
        let since = Instant::now();

        // Act: a round or two of the watch.
        let seen = settled(&locks, since, Duration::from_secs(5)).await;

        // Assert: each lease read, and tenant 0's request.
        let expect = |asked| {
            Sighting::Held(crate::state::fleet::Peek {
                epoch: Some(7),
                asked,
            })
        };
        assert_eq!(seen[0], expect(true));
        assert!(seen[1..].iter().all(|s| *s == expect(false)), "{seen:?}");

        // Act: PostgreSQL ends the lock connection.
        let ended: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND pid <> pg_backend_pid() AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&mut admin)
        .await
        .unwrap();
        assert!(ended > 0, "the lock connection holds the locks");
        let deadline = Instant::now() + Duration::from_secs(5);
        while locks.iter().any(|l| l.still_held()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Assert: every holder learns it, without asking the connection.
        for lock in &locks {
            assert!(
                matches!(lock.sighting(since), Some(Sighting::Lost(_))),
                "{:?}",
                lock.sighting(since)
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tenant_whose_lease_cannot_be_read_is_lost_alone() {
        // Arrange: three held tenants; the second loses its tables.
        let Some((urls, mut admin, _guard)) = tenants(3).await else {
            return;
        };
        let locks = take_all(&urls).await;
        sqlx::raw_sql("DROP TABLE tenant_t1.lease")
            .execute(&mut admin)
            .await
            .unwrap();
        let since = Instant::now();

        // Act
        let seen = settled(&locks, since, Duration::from_secs(5)).await;

        // Assert
        assert!(
            matches!(&seen[1], Sighting::Lost(why) if why.contains("cannot read the tenant's lease")),
            "{seen:?}"
        );
        assert!(
            matches!(seen[0], Sighting::Held(_)) && matches!(seen[2], Sighting::Held(_)),
            "{seen:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lock_connection_busy_for_seconds_loses_no_tenant() {
        // Arrange: 50 held tenants, seen held.
        let Some((urls, _admin, _guard)) = tenants(50).await else {
            return;
        };
        let locks = take_all(&urls).await;
        let session = Session::of(&urls[0]);
        let seen = settled(&locks, Instant::now(), Duration::from_secs(5)).await;
        assert!(
            seen.iter().all(|s| matches!(s, Sighting::Held(_))),
            "{seen:?}"
        );

        // Act: uses of the connection queue for 4 s, each under the
        // bound; the holders look every 50 ms meanwhile.
        let busy = tokio::spawn(async move {
            for _ in 0..4 {
                let slow: Op<()> = Box::new(|conn, _| {
                    Box::pin(async move {
                        sqlx::query("SELECT pg_sleep(1)").execute(conn).await?;
                        Ok(())
                    })
                });
                session.on_conn(false, slow).await.unwrap();
            }
        });
        let mut lost = Vec::new();
        while !busy.is_finished() {
            lost.extend(
                locks
                    .iter()
                    .filter_map(|l| match l.sighting(Instant::now()) {
                        Some(Sighting::Lost(why)) => Some(why),
                        _ => None,
                    }),
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Assert: nobody lost, and the watch sees them all again after.
        assert!(lost.is_empty(), "{lost:?}");
        let after = settled(&locks, Instant::now(), Duration::from_secs(5)).await;
        assert!(
            after.iter().all(|s| matches!(s, Sighting::Held(_))),
            "{after:?}"
        );
    }
}
