//! The jobs layer: what both jobs share — the [`Context`] (settings, both
//! clients, the store, the redactor, the shutdown token), the one run
//! lifecycle ([`lifecycle`]), and the reading of the lists'
//! `unsubscribe-export` ([`exports`]). The contacts job (`sync`) and the
//! write-back job (`writeback`) sit on top of it.

pub mod exports;
pub mod interpret;
pub mod lifecycle;
pub mod private_file;

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;

use crate::config::Settings;
use crate::crm::CrmClient;
use crate::edm::{EdmClient, password_md5};
use crate::instance::Instance;
use crate::metrics::Backlog;
use crate::redact::Redactor;
use crate::state::{Lease, Store};

/// What a job needs: settings, both clients, the store.
#[derive(Clone, Debug)]
pub struct Context {
    pub settings: Arc<Settings>,
    pub crm: CrmClient,
    pub edm: EdmClient,
    pub store: Store,
    pub redactor: Arc<Redactor>,
    /// This process (`daemon.instance_id`): the lease holder and the
    /// `User-Agent` of both clients.
    pub instance: Arc<Instance>,
    /// Cancelled when the process is asked to stop: a job finishes its
    /// current batch, records its state and returns.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The wall clock the jobs read dates from (tests set another).
    pub clock: Clock,
}

/// Where "now" comes from.
pub type Clock = fn() -> chrono::DateTime<chrono::Utc>;

/// Every secret the settings hold, for the redactor: the token, the EDM
/// password, its MD5 and its Basic-auth form, and the database password.
pub fn secrets_of(settings: &Settings) -> Vec<String> {
    let password = settings.edm.password.expose_secret().to_string();
    let mut secrets = vec![
        settings.crm.token.expose_secret().to_string(),
        password_md5(&password),
        crate::edm::basic_credentials(&settings.edm.username, &password),
        password,
    ];
    if let Some(reseller) = settings.reseller.password.as_ref() {
        let plain = reseller.expose_secret().to_string();
        secrets.push(password_md5(&plain));
        secrets.push(plain);
    }
    if let Ok(url) = url::Url::parse(settings.database.url.expose_secret())
        && let Some(p) = url.password()
    {
        secrets.push(p.to_string());
    }
    secrets
}

/// Both API clients as every command builds them: one redactor of the
/// settings' secrets, and this process's `User-Agent` on every request.
pub struct Clients {
    pub crm: CrmClient,
    pub edm: EdmClient,
    pub redactor: Arc<Redactor>,
    pub instance: Arc<Instance>,
}

impl Clients {
    pub fn new(settings: &Settings) -> anyhow::Result<Clients> {
        let redactor = Arc::new(Redactor::new(secrets_of(settings)));
        let instance = Instance::current(&settings.daemon.instance_id);
        let agent = instance.user_agent();
        Ok(Clients {
            crm: CrmClient::new(&settings.crm, redactor.clone())?.with_user_agent(&agent),
            edm: EdmClient::new(&settings.edm, redactor.clone())?.with_user_agent(&agent),
            redactor,
            instance,
        })
    }
}

impl Context {
    /// Builds the clients and opens (and migrates) the state database.
    pub async fn new(settings: Settings) -> anyhow::Result<Context> {
        let store = Store::connect(&settings.database.url).await?;
        Context::with_store(settings, store)
    }

    /// For `--dry-run`: the same clients, and the state database opened
    /// read-only — nothing is created, migrated or written. A database
    /// that does not exist yet reads as empty (an in-memory one), as a
    /// first run would see it.
    pub async fn new_read_only(settings: Settings) -> anyhow::Result<Context> {
        let store = match Store::open_read_only(&settings.database.url).await? {
            Some(store) => store,
            None => {
                tracing::info!("no state database yet: the dry run plans as a first run would");
                Store::empty_in_memory().await?
            }
        };
        Context::with_store(settings, store)
    }

    /// Both clients built from `settings`, around `store`.
    fn with_store(settings: Settings, store: Store) -> anyhow::Result<Context> {
        let Clients {
            crm,
            edm,
            redactor,
            instance,
        } = Clients::new(&settings)?;
        let shutdown = tokio_util::sync::CancellationToken::new();
        let ctx = Context {
            settings: Arc::new(settings),
            crm,
            edm,
            store,
            redactor,
            instance,
            shutdown: shutdown.clone(),
            clock: chrono::Utc::now,
        };
        // `with_shutdown` is the one place the clients get the token.
        Ok(ctx.with_shutdown(shutdown))
    }

    /// The same context reading the time from `clock`.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Now, by the context's clock.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        (self.clock)()
    }

    /// The same store, instance, clock, shutdown and retry delays, with
    /// `settings` and clients built from them (a reload).
    pub fn with_settings(&self, settings: Settings) -> anyhow::Result<Context> {
        let redactor = Arc::new(Redactor::new(secrets_of(&settings)));
        let agent = self.instance.user_agent();
        let ctx = Context {
            crm: CrmClient::new(&settings.crm, redactor.clone())?
                .with_user_agent(&agent)
                .with_min_retry_delay(self.crm.resend_policy().first_delay()),
            edm: EdmClient::new(&settings.edm, redactor.clone())?
                .with_user_agent(&agent)
                .with_min_retry_delay(self.edm.resend_policy().first_delay()),
            settings: Arc::new(settings),
            redactor,
            store: self.store.clone(),
            instance: self.instance.clone(),
            shutdown: self.shutdown.clone(),
            clock: self.clock,
        };
        // The clients' waits end on this context's shutdown too.
        Ok(ctx.with_shutdown(self.shutdown.clone()))
    }

    /// Runs `read` unless a shutdown comes first: then `None`, and the
    /// read is dropped where it is, with its request in flight, so a drain
    /// never waits for more reads. Only for reads: a write cut short may
    /// leave nothing on record.
    pub async fn unless_shutdown<T>(
        &self,
        read: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => None,
            out = read => Some(out),
        }
    }

    /// The same context stopping on `token`.
    pub fn with_shutdown(mut self, token: tokio_util::sync::CancellationToken) -> Self {
        self.crm = self.crm.with_shutdown(token.clone());
        self.edm = self.edm.with_shutdown(token.clone());
        self.shutdown = token;
        self
    }

    /// Shortens the first retry delay of both clients (tests and the demo
    /// use this so that fault scenarios finish quickly).
    pub fn with_min_retry_delay(mut self, delay: Duration) -> Self {
        self.crm = self.crm.with_min_retry_delay(delay);
        self.edm = self.edm.with_min_retry_delay(delay);
        self
    }
}

/// Before a job records its run: runs an earlier process left `running`
/// are marked `abandoned`, each with a warning, so `status` does not show
/// them running for ever.
pub async fn abandon_unfinished_runs(ctx: &Context) -> anyhow::Result<()> {
    for (run_id, job) in ctx.store.abandon_running_runs().await? {
        tracing::warn!(
            run_id = %run_id,
            abandoned_job = %job,
            "a run an earlier process did not finish (killed or crashed) is marked abandoned"
        );
        crate::metrics::run_abandoned();
    }
    Ok(())
}

/// After the instance lock was acquired: takes the lease (the fencing
/// token every later write is checked against) and, when the instance it
/// replaces may still be running — it lost its lock without stopping, on
/// this host with its process alive or on another host — waits before the
/// first write until any request that one had in flight has landed or
/// timed out: the longer client timeout plus the two seconds the old
/// holder takes at most to notice and stop. A predecessor that stopped
/// cleanly (released the lease) or whose process is gone costs no wait.
/// Runs `work` as the holder of the instance lock `lock` (a `--once`, a
/// `reconcile` by hand): the state database opened and migrated, the
/// lease taken so that a daemon taking over fences this process's writes,
/// then released, the database closed and the lock let go.
pub async fn holding<T>(
    settings: Settings,
    lock: crate::lock::InstanceLock,
    work: impl AsyncFnOnce(&Context) -> T,
) -> anyhow::Result<T> {
    let ctx = Context::new(settings).await?;
    take_lease(&ctx).await?;
    let out = work(&ctx).await;
    if let Err(e) = ctx.store.release_lease().await {
        tracing::warn!(error = %format!("{e:#}"), "cannot mark the lease released");
    }
    ctx.store.close().await;
    drop(lock);
    Ok(out)
}

pub async fn take_lease(ctx: &Context) -> anyhow::Result<()> {
    let (taken, before) = ctx.store.take_lease(&ctx.instance).await?;
    tracing::info!(
        epoch = taken.epoch,
        instance = %taken.holder,
        "lease taken: writes from an earlier holder are refused from now on"
    );
    let Some(before) = before else {
        return Ok(());
    };
    if !may_still_run(&before, &ctx.instance) {
        return Ok(());
    }
    let wait = ctx.settings.edm.timeout.max(ctx.settings.crm.timeout) + Duration::from_secs(2);
    tracing::warn!(
        predecessor = %before.holder,
        predecessor_host = %before.host,
        wait_secs = wait.as_secs(),
        "the previous holder lost the lock without stopping and may still be running: waiting for its requests in flight to land before the first write"
    );
    tokio::select! {
        _ = tokio::time::sleep(wait) => Ok(()),
        _ = ctx.shutdown.cancelled() => Ok(()),
    }
}

/// Whether the holder of `before` may still be running and sending.
fn may_still_run(before: &Lease, me: &Instance) -> bool {
    if before.pid == 0 {
        return false; // released on a clean stop
    }
    if before.host != me.host {
        return true; // cannot tell: assume it may
    }
    before.pid != me.pid && crate::instance::process_alive(before.pid)
}

/// Pending work after a run: EDM operations and contact-history records.
pub async fn refresh_pending(store: &Store) {
    if let Ok((edm, _)) = store.pending_summary(0).await {
        crate::metrics::pending(Backlog::Edm, edm);
    }
    if let Ok(counts) = store.ledger_counts().await {
        let pending: u64 = counts
            .iter()
            .filter(|(_, s, _)| *s == crate::stored_enums::LedgerStatus::Pending)
            .map(|(_, _, n)| n)
            .sum();
        crate::metrics::pending(Backlog::ContactHistory, pending);
    }
    if let Ok((n, _)) = store.parked_operations(0).await {
        crate::metrics::parked(Backlog::Edm, n);
    }
    if let Ok((n, _)) = store.parked_records(0).await {
        crate::metrics::parked(Backlog::ContactHistory, n);
    }
}

/// Flags of a contacts run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Compute and print the plan; change nothing.
    pub dry_run: bool,
    /// Apply even past the unsubscribe safety ratio.
    pub force: bool,
    /// Re-read the EDM lists and repair any drift.
    pub full: bool,
    /// Send parked operations (and, for write-back, parked records) again.
    pub retry_parked: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: &str = "[crm]\nbase_url = \"http://crm.test\"\ntoken = \"t\"\n[edm]\nusername = \"u\"\npassword = \"p\"\n";

    #[tokio::test]
    async fn a_reloaded_context_keeps_the_retry_delays_and_the_shutdown() {
        // Arrange: a context whose clients retry fast (as tests and the
        // demo make them).
        let settings = Settings::from_toml(SETTINGS).unwrap();
        let store = Store::empty_in_memory().await.unwrap();
        let ctx = Context::with_store(settings.clone(), store)
            .unwrap()
            .with_min_retry_delay(Duration::from_millis(5));

        // Act
        let reloaded = ctx.with_settings(settings).unwrap();
        ctx.shutdown.cancel();

        // Assert
        for policy in [reloaded.crm.resend_policy(), reloaded.edm.resend_policy()] {
            assert_eq!(policy.first_delay(), Duration::from_millis(5));
        }
        assert!(reloaded.shutdown.is_cancelled());
    }

    #[tokio::test]
    async fn the_clients_give_up_their_waits_when_the_context_shuts_down() {
        use crate::remote::{Api, ErrorKind, Idempotence, Next, RemoteError};
        // Arrange: a reloaded context, shut down; a failure asking for a
        // minute's wait.
        let settings = Settings::from_toml(SETTINGS).unwrap();
        let store = Store::empty_in_memory().await.unwrap();
        let ctx = Context::with_store(settings.clone(), store).unwrap();
        let reloaded = ctx.with_settings(settings).unwrap();
        ctx.shutdown.cancel();
        let busy = RemoteError::new(
            Api::Edm,
            "ml-addr-add",
            ErrorKind::Status {
                status: 503,
                excerpt: String::new(),
                retry_after: Some(Duration::from_secs(60)),
            },
        );
        // Virtual time from here (the database pool needs real time).
        tokio::time::pause();
        let start = tokio::time::Instant::now();

        // Act
        let mut attempts = reloaded
            .edm
            .resend_policy()
            .attempts("ml-addr-add", Idempotence::NotIdempotent);
        let next = attempts.after(busy).await;

        // Assert: given up at once, no wait.
        assert!(matches!(next, Next::GiveUp(_)), "{next:?}");
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    fn lease(host: &str, pid: u32) -> Lease {
        Lease {
            epoch: 1,
            holder: "old".into(),
            host: host.into(),
            pid,
            acquired_at: 0,
        }
    }

    #[test]
    fn a_successor_waits_only_for_a_predecessor_that_may_still_be_sending() {
        let me = Instance::current("me");
        // Released on a clean stop: no request of its can be in flight.
        assert!(!may_still_run(&lease(&me.host, 0), &me));
        // On this host, its process gone (killed, crashed).
        assert!(!may_still_run(&lease(&me.host, 4_194_305), &me));
        // This very process, taking the lease back after standing by.
        assert!(!may_still_run(&lease(&me.host, me.pid), &me));
        // On this host and alive (pid 1 always is).
        assert!(may_still_run(&lease(&me.host, 1), &me));
        // On another host: it cannot be told, so it may.
        assert!(may_still_run(&lease("elsewhere", 4_194_305), &me));
    }
}
