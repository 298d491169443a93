//! Daemon mode: serve `/healthz` and `/metrics`, tell systemd it is ready,
//! then serve every tenant of the configuration (`tenants`) — one without
//! `tenants.dir`, `default` — each in its own scope (`scope::within`):
//! while this instance holds a tenant's lock it runs the tenant's contacts
//! job on `sync.schedule`, its write-back job on `writeback.schedule` and
//! its drift report on `reconcile.schedule` (`tenant`).
//!
//! - At most `daemon.max_parallel_jobs` jobs run at once over all tenants;
//!   a tenant waiting for a slot delays no other tenant's running job.
//! - With tenant files, each tenant's ticks come a stable share of the
//!   schedule's period late (`schedule::spread_offset`), so that a
//!   thousand tenants on one schedule do not fire in one second. Without
//!   them the single tenant fires on the schedule, as it always did.
//! - SIGHUP reads the config, its secret files and the tenant files again
//!   (and, with `tenants.dir`, so does a look every
//!   [`TENANT_FILES_EVERY`]): a changed tenant takes its new settings at
//!   its next run, a new one starts, a removed one stops (its state stays
//!   until `tenant purge`). A refused file leaves the other tenants — and
//!   its own running settings — as they were, and `/healthz` names it.
//! - SIGTERM or SIGINT: every tenant drains as one did before (see
//!   `tenant`); a second signal exits at once (status 1).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::{Access, Settings};
use crate::jobs::Context;
use crate::ops_endpoint::FleetHealth;
use crate::reload::Live;
use crate::stored_enums::Job;

mod tenant;

/// How often, with `tenants.dir`, the tenant files are read again without
/// a SIGHUP: a file added, changed or removed takes effect within it.
pub(crate) const TENANT_FILES_EVERY: Duration = Duration::from_secs(30);

/// New tenants whose state is opened (created, migrated) at once.
const OPENED_AT_ONCE: usize = 4;

/// What every tenant of this instance shares.
#[derive(Clone)]
struct Shared {
    /// One permit per job allowed to run at once (`daemon.max_parallel_jobs`).
    jobs: Arc<Semaphore>,
    /// Whether ticks are spread over the period (with tenant files).
    spread: bool,
    health: Arc<FleetHealth>,
    /// How many tenants this instance may hold.
    balance: Arc<Balance>,
}

/// This instance's share of the tenants: with T tenants and N instances
/// on one database, each holds at most ⌈T/N⌉ — it tries no lock beyond
/// it, and hands a tenant over (between its jobs) while it holds more, as
/// when an instance joins. A dead instance leaves the count at once (its
/// presence lock dies with its connection): the others' shares grow, and
/// they take its tenants at their next try.
#[derive(Debug, Default)]
struct Balance {
    held: AtomicUsize,
    tenants: AtomicUsize,
    instances: AtomicUsize,
}

impl Balance {
    fn share(&self) -> usize {
        let n = self.instances.load(Ordering::SeqCst).max(1);
        self.tenants.load(Ordering::SeqCst).div_ceil(n)
    }

    /// Takes a place for one more tenant, if under the share.
    fn reserve(&self) -> bool {
        let share = self.share();
        self.held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| {
                (h < share).then_some(h + 1)
            })
            .is_ok()
    }

    /// Gives back a place taken by [`Balance::reserve`].
    fn unreserve(&self) {
        let _ = self
            .held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| h.checked_sub(1));
    }

    /// Whether this instance holds more than its share: if so, one place
    /// is given up (the caller lets its tenant go).
    fn give_one_up(&self) -> bool {
        let share = self.share();
        self.held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| {
                (h > share).then(|| h - 1)
            })
            .is_ok()
    }
}

impl Shared {
    /// The instance's role follows its tenants: active while it holds one.
    fn role_changed(&self) {
        crate::metrics::set_role(self.health.any_active());
    }

    /// How late `job`'s ticks come for the tenant of `settings`.
    fn offset(&self, settings: &Settings, job: Job, cron: &str, zone: chrono_tz::Tz) -> Duration {
        if !self.spread {
            return Duration::ZERO;
        }
        crate::schedule::ZonedCron::parse(cron, zone)
            .map(|c| crate::schedule::spread_offset(&format!("{}/{job}", settings.tenant), &c))
            .unwrap_or_default()
    }
}

/// Runs the daemon until a signal stops it. `config` is the `--config`
/// file, read again on SIGHUP.
pub(crate) async fn run(settings: Settings, config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let metrics = crate::metrics::install_recorder()?;
    crate::metrics::build_info(
        &crate::instance::Instance::current(&settings.daemon.instance_id).id,
    );
    crate::metrics::set_role(false);
    let health = Arc::new(FleetHealth::new(settings.tenants.dir.is_some()));
    let stop = CancellationToken::new();
    let shared = Shared {
        jobs: Arc::new(Semaphore::new(settings.daemon.max_parallel_jobs)),
        spread: settings.tenants.dir.is_some(),
        health: health.clone(),
        balance: Arc::new(Balance::default()),
    };
    let counting = count_instances(&settings, shared.balance.clone()).await;
    let listen = settings.http.listen;
    let (contacts, writeback) = (
        settings.sync.schedule.clone(),
        settings.writeback.schedule.clone(),
    );
    let max_parallel_jobs = settings.daemon.max_parallel_jobs;
    let tenant_files = settings.tenants.dir.is_some();
    let (url, poll) = (settings.database.url.clone(), settings.daemon.lock_poll);
    let fleet = Arc::new(Fleet::new(settings, config, shared, stop.clone()));
    // Before anything says it listens: a signal from then on is handled.
    spawn_signal_handler(stop.clone(), fleet.clone())?;
    // The single tenant's series exist before the endpoint answers; many
    // tenants start behind an endpoint that already answers.
    if !tenant_files {
        fleet.start().await?;
    }
    let (addr, ops_task) = crate::ops_endpoint::serve(listen, metrics, health).await?;
    tracing::info!(listen = %addr, "ops endpoint listening: /healthz, /metrics");
    tracing::info!(
        contacts = %contacts,
        writeback = %writeback,
        max_parallel_jobs,
        "daemon started"
    );
    let _only_instance = match tenant_files {
        true => sqlite_fleet_lock(&url, poll, &stop).await?,
        false => None,
    };
    if tenant_files && !stop.is_cancelled() {
        fleet.serving.store(true, Ordering::SeqCst);
        if let Err(e) = fleet.start().await {
            ops_task.abort();
            return Err(e);
        }
    }
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    let watchdog = spawn_watchdog(fleet.clone());
    if fleet.reads_tenant_files() {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(TENANT_FILES_EVERY) => fleet.refresh(Why::Look).await,
            }
        }
    } else {
        stop.cancelled().await;
    }
    let stopped = fleet.stop_all().await;
    counting.abort();
    if let Some(w) = watchdog {
        w.abort();
    }
    ops_task.abort();
    stopped?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// On SQLite one instance serves a tenants directory, as one served a
/// single tenant: it holds `<state file>.fleet.lock` for its life, and a
/// second instance stands by on it (serving nothing, `/healthz` role
/// `standby`) until the first is gone. Instances share tenants through
/// PostgreSQL only. `None` on PostgreSQL, or when stopped while waiting.
async fn sqlite_fleet_lock(
    url: &secrecy::SecretString,
    poll: Duration,
    stop: &CancellationToken,
) -> anyhow::Result<Option<crate::lock::InstanceLock>> {
    use crate::lock::LockTarget;
    let LockTarget::File(tenant_lock) = LockTarget::of(url) else {
        return Ok(None);
    };
    let target = LockTarget::File(tenant_lock.with_extension("fleet.lock"));
    let mut said = false;
    loop {
        if let Some(lock) = target.try_acquire().await? {
            if said {
                tracing::info!("the other instance is gone: this instance serves the tenants");
            }
            return Ok(Some(lock));
        }
        if !said {
            tracing::info!(
                "another instance serves the tenants of this SQLite state database: standing by (instances share tenants through PostgreSQL only)"
            );
            said = true;
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// Counts the instances sharing the state database now and every
/// `daemon.lock_poll_secs` into `balance` (showing this one alive). A
/// count that fails keeps the last one.
async fn count_instances(
    settings: &Settings,
    balance: Arc<Balance>,
) -> tokio::task::JoinHandle<()> {
    let (url, poll) = (settings.database.url.clone(), settings.daemon.lock_poll);
    let count = move || {
        let (url, balance) = (url.clone(), balance.clone());
        async move {
            match crate::lock::instances(&url).await {
                Ok(n) => {
                    let before = balance.instances.swap(n, Ordering::SeqCst);
                    if before != n {
                        tracing::info!(
                            instances = n,
                            share = balance.share(),
                            "instances sharing the state database"
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot count the instances sharing the state database")
                }
            }
        }
    };
    count().await;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(poll).await;
            count().await;
        }
    })
}

/// Why the tenant files are read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// SIGHUP: every outcome is logged.
    Reload,
    /// The periodic look: only what changed is logged.
    Look,
}

/// The tenants this instance serves, each a task of its own.
struct Fleet {
    config: Option<PathBuf>,
    /// The main settings this instance started with (the keys only a
    /// restart applies are read from them).
    main: Settings,
    shared: Shared,
    stop: CancellationToken,
    slots: tokio::sync::Mutex<BTreeMap<String, Slot>>,
    /// Whether this instance serves tenants: with tenant files on SQLite,
    /// not while another instance does (`sqlite_fleet_lock`).
    serving: std::sync::atomic::AtomicBool,
    /// What was last said about each refused tenant file (or the config),
    /// so that the periodic look repeats nothing.
    said: std::sync::Mutex<BTreeMap<String, String>>,
}

/// One served tenant.
struct Slot {
    live: Arc<Live>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Fleet {
    fn new(
        main: Settings,
        config: Option<PathBuf>,
        shared: Shared,
        stop: CancellationToken,
    ) -> Fleet {
        let serving = main.tenants.dir.is_none();
        Fleet {
            config,
            main,
            shared,
            stop,
            slots: tokio::sync::Mutex::new(BTreeMap::new()),
            serving: std::sync::atomic::AtomicBool::new(serving),
            said: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    fn reads_tenant_files(&self) -> bool {
        self.main.tenants.dir.is_some()
    }

    /// Starts every tenant of the settings the daemon started with. A
    /// single tenant (no `tenants.dir`) whose state cannot be opened
    /// stops the daemon, as it always did; with tenant files, that tenant
    /// is tried again at the next look.
    async fn start(&self) -> anyhow::Result<()> {
        let set = self.main.tenant_set(Access::Remote)?;
        if !self.reads_tenant_files() {
            self.shared.balance.tenants.store(1, Ordering::SeqCst);
            let Some(only) = set.tenants.into_iter().next() else {
                anyhow::bail!("no tenant to serve");
            };
            let ctx = Context::new(only).await?;
            let slot = self.slot(ctx).await;
            self.slots
                .lock()
                .await
                .insert(crate::scope::DEFAULT.to_string(), slot);
            return Ok(());
        }
        self.apply(set, Why::Reload).await;
        Ok(())
    }

    /// Reads the config and the tenant files again and applies them.
    async fn refresh(&self, why: Why) {
        if !self.serving.load(Ordering::SeqCst) {
            tracing::info!("standing by: the tenant files are read once this instance serves");
            return;
        }
        let (config, running) = (self.config.clone(), self.main.tenants.clone());
        let loaded = tokio::task::spawn_blocking(move || {
            let mut main = Settings::load(config.as_deref(), Access::Remote)?;
            // Where the tenant files are is read at start only.
            main.tenants = running.clone();
            let set = main.tenant_set(Access::Remote)?;
            Ok::<_, crate::config::ConfigError>(set)
        })
        .await;
        match loaded {
            Ok(Ok(set)) => {
                self.say("(config)", None, why);
                self.apply(set, why).await;
            }
            Ok(Err(e)) => self.say(
                "(config)",
                Some((
                    "config reload refused: the running config stays",
                    e.to_string(),
                )),
                why,
            ),
            Err(e) => tracing::error!(error = %e, "config reload ended abnormally"),
        }
    }

    /// Logs a refusal once (and every time on a SIGHUP); forgets it when
    /// it is gone.
    fn say(&self, key: &str, problem: Option<(&'static str, String)>, why: Why) {
        let mut said = self.said.lock().unwrap_or_else(|p| p.into_inner());
        match problem {
            None => {
                said.remove(key);
            }
            Some((message, error)) => {
                if why == Why::Reload || said.get(key) != Some(&error) {
                    tracing::error!(error = %error, "{message}");
                }
                said.insert(key.to_string(), error);
            }
        }
    }

    /// Makes the served tenants those of `set`: new ones start, changed
    /// ones take their new settings at their next run, removed ones stop.
    async fn apply(&self, set: crate::config::TenantSet, why: Why) {
        let refused: BTreeMap<String, String> = set
            .refused
            .iter()
            .map(|r| (r.name.clone(), r.error.clone()))
            .collect();
        for r in &set.refused {
            self.say(
                &r.name,
                Some((
                    "tenant file refused: the other tenants keep running (and this one, if it ran, with its running settings)",
                    r.error.clone(),
                )),
                why,
            );
        }
        self.shared.health.set_refused(refused.clone());
        // The tenants to share: the usable ones, and a refused one that
        // still runs on its running settings.
        let running_refused = {
            let slots = self.slots.lock().await;
            refused.keys().filter(|n| slots.contains_key(*n)).count()
        };
        self.shared
            .balance
            .tenants
            .store(set.tenants.len() + running_refused, Ordering::SeqCst);
        let mut slots = self.slots.lock().await;
        // A tenant whose task ended with an error starts again.
        slots.retain(|_, slot| !slot.task.is_finished());
        let wanted: Vec<String> = set.tenants.iter().map(|t| t.tenant.to_string()).collect();
        let gone: Vec<String> = slots
            .keys()
            .filter(|n| !wanted.contains(n) && !refused.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(slot) = slots.remove(&name) {
                crate::scope::within(&name, async {
                    tracing::info!("tenant file removed: the tenant stops (its state stays until `tenant purge`)");
                })
                .await;
                stop_slot(&name, slot).await;
            }
        }
        let (running, new): (Vec<Settings>, Vec<Settings>) = set
            .tenants
            .into_iter()
            .partition(|t| slots.contains_key(t.tenant.as_str()));
        for settings in running {
            self.serve_tenant(&mut slots, settings, why).await;
        }
        self.start_tenants(&mut slots, new, why).await;
    }

    /// Opens the state of each new tenant (creating and migrating it),
    /// [`OPENED_AT_ONCE`] at a time, and starts serving it.
    async fn start_tenants(
        &self,
        slots: &mut BTreeMap<String, Slot>,
        new: Vec<Settings>,
        why: Why,
    ) {
        use futures::StreamExt as _;
        let mut opened = futures::stream::iter(new)
            .map(|settings| {
                let name = settings.tenant.to_string();
                let opening = crate::scope::within(&name, async {
                    tracing::info!("tenant starts");
                    Context::new(settings).await
                });
                async move { (name, opening.await) }
            })
            .buffer_unordered(OPENED_AT_ONCE);
        // Each is served as soon as its state is open; a stop ends the
        // opening (what was not opened is not served).
        while let Some((name, ctx)) = tokio::select! {
            next = opened.next() => next,
            _ = self.stop.cancelled() => None,
        } {
            match ctx {
                Ok(ctx) => {
                    self.say(&name, None, why);
                    let slot = self.slot(ctx).await;
                    slots.insert(name, slot);
                }
                Err(e) => self.say(
                    &name,
                    Some((
                        "cannot open the tenant's state; tried again at the next look",
                        format!("{e:#}"),
                    )),
                    why,
                ),
            }
        }
    }

    /// A running tenant takes `settings` at its next run (when they
    /// changed).
    async fn serve_tenant(&self, slots: &mut BTreeMap<String, Slot>, settings: Settings, why: Why) {
        let name = settings.tenant.to_string();
        self.say(&name, None, why);
        let Some(slot) = slots.get(&name) else {
            return;
        };
        let live = slot.live.clone();
        crate::scope::within(&name, async move {
            if (why == Why::Reload || live.differs(&settings))
                && let Err(e) = live.apply(settings)
            {
                tracing::error!(error = %format!("{e:#}"), "config reload refused: the running config stays");
            }
        })
        .await;
    }

    /// Starts serving the tenant of `ctx`. A tenant that stops with an
    /// error stops the daemon when it is the only one (no `tenants.dir`),
    /// as it always did; with tenant files it is started again at the next
    /// look.
    async fn slot(&self, ctx: Context) -> Slot {
        let name = ctx.settings.tenant.to_string();
        crate::scope::within(&name, tenant::start_metrics(&ctx)).await;
        let live = Live::new(ctx);
        let stop = self.stop.child_token();
        let (single, everything) = (!self.reads_tenant_files(), self.stop.clone());
        let serving = tenant::serve(live.clone(), self.shared.clone(), stop.clone());
        let task = tokio::spawn(crate::scope::within(&name, async move {
            let served = serving.await;
            if let Err(e) = &served {
                if single {
                    everything.cancel();
                } else {
                    tracing::error!(error = %format!("{e:#}"), "the tenant stopped with an error; it starts again at the next look");
                }
            }
            served
        }));
        Slot { live, stop, task }
    }

    /// Stops every tenant (each drains its running job) and waits for all.
    async fn stop_all(&self) -> anyhow::Result<()> {
        self.stop.cancel();
        let slots = std::mem::take(&mut *self.slots.lock().await);
        let mut first_error = None;
        let ended = futures::future::join_all(
            slots
                .into_iter()
                .map(|(name, slot)| async move { (name.clone(), slot.task.await) }),
        )
        .await;
        for (name, result) in ended {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(tenant = %name, error = %format!("{e:#}"), "tenant stopped with an error");
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    tracing::error!(tenant = %name, error = %e, "tenant task ended abnormally")
                }
            }
        }
        match first_error {
            Some(e) if !self.reads_tenant_files() => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether a tenant's state database answers (the watchdog's ping).
    async fn database_answers(&self) -> bool {
        let stores: Vec<crate::state::Store> = self
            .slots
            .lock()
            .await
            .values()
            .map(|s| s.live.current().store)
            .take(1)
            .collect();
        match stores.first() {
            Some(store) => store.connection().ping().await.is_ok(),
            None => true,
        }
    }
}

/// Stops one tenant's task: it drains its running job and returns.
async fn stop_slot(name: &str, slot: Slot) {
    slot.stop.cancel();
    match slot.task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(tenant = %name, error = %format!("{e:#}"), "tenant stopped with an error")
        }
        Err(e) => tracing::error!(tenant = %name, error = %e, "tenant task ended abnormally"),
    }
}

/// SIGTERM or SIGINT stops (a second one exits at once); SIGHUP reloads
/// the config (`systemctl reload`), as often as it comes.
fn spawn_signal_handler(stop: CancellationToken, fleet: Arc<Fleet>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reading the config again");
            fleet.refresh(Why::Reload).await;
        }
    });
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!(
            "stop requested: no new runs; the running job finishes its current batch (a second signal exits at once)"
        );
        stop.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!(
            "second stop signal: exiting at once; unsent work stays to be planned again"
        );
        std::process::exit(1);
    });
    Ok(())
}

/// Tells systemd (when it started us with `Type=notify`); a no-op otherwise.
fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Pings systemd's watchdog at half its interval while the state database
/// answers.
fn spawn_watchdog(fleet: Arc<Fleet>) -> Option<tokio::task::JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()? / 2;
    Some(tokio::spawn(async move {
        loop {
            if fleet.database_answers().await {
                notify_systemd(&[sd_notify::NotifyState::Watchdog]);
            }
            tokio::time::sleep(interval).await;
        }
    }))
}
