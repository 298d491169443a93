//! One tenant in daemon mode: while this instance holds the tenant's lock,
//! run its contacts job on `sync.schedule`, its write-back job on
//! `writeback.schedule` and its drift report on `reconcile.schedule`
//! (tokio-cron-scheduler, six-field cron, read in `sync.timezone`, UTC by
//! default).
//!
//! - A job never overlaps itself: a tick that finds it running is skipped
//!   and logged. No two jobs of the tenant run at the same time either.
//! - Another instance on the same database stands by, trying the lock every
//!   `daemon.lock_poll_secs`, and takes over when the active one stops or
//!   dies. An active instance that loses its PostgreSQL lock connection
//!   stops the tenant's jobs and stands by.
//! - SIGTERM or SIGINT (or a lost lock): no new ticks; the running job is
//!   cancelled — it finishes its current batch and records its state — and
//!   awaited (a `TaskTracker`, no polling), within
//!   `daemon.shutdown_timeout_secs`, past which it is dropped where it
//!   stands; then return (or stand by). What was not sent stays to be
//!   planned again at the next start.
//! - A reload (`reload::Live`) gives the next run of each job the new
//!   settings, and re-arms the schedules when they changed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_cron_scheduler::JobScheduler;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Shared;
use crate::jobs::{Context, RunOptions};
use crate::lock::{InstanceLock, LockTarget, Sighting};
use crate::ops_endpoint::TenantHealth;
use crate::reload::Live;
use crate::schedule::{Gate, JobFn, schedule};
use crate::stored_enums::Job;
use crate::sync::contacts;
use crate::writeback;

/// How an active period ended.
enum Period {
    Stopped,
    LockLost,
    /// This instance held more than its share of the tenants: it let this
    /// one go, drained, for another instance to take.
    HandedOver,
}

/// Serves one tenant until `stop`: its series and health entry, its EDM
/// service gauges, and its turns at the lock. Runs inside the tenant's
/// scope (see `scope`), so every line and series it makes carries it.
pub(super) async fn serve(
    live: Arc<Live>,
    shared: Shared,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let base = live.current();
    let name = base.settings.tenant.to_string();
    // `/healthz` reads through a pool of its own, so that it answers
    // whatever the jobs are doing with theirs.
    let url = &base.settings.database.url;
    let reader = if crate::state::sqlite_file(secrecy::ExposeSecret::expose_secret(url)).is_some() {
        crate::state::Store::reader_beside(url).await?
    } else {
        // PostgreSQL reads beside the jobs on a pool of many connections
        // (and the checks go through the lock connection).
        base.store.clone()
    };
    let health = TenantHealth::new(reader.clone(), base.store.writable().clone(), url.clone());
    shared.health.insert(&name, health.clone());
    let taken = Arc::new(tokio::sync::Notify::new());
    let service_info = spawn_service_info(live.clone(), health.active.clone(), taken.clone());
    let turns = take_turns(&live, &shared, &reader, &stop, &health, &taken).await;
    service_info.abort();
    shared.health.remove(&name);
    reader.close().await;
    base.store.close().await;
    turns
}

/// Every series from start-up, standby or not; the last success as the
/// state database remembers it, so a restart does not blank it.
pub(super) async fn start_metrics(base: &Context) {
    crate::metrics::zero_series(&Job::SCHEDULED.map(|j| j.as_str()));
    crate::metrics::build_info(&base.instance.id);
    for job in Job::SCHEDULED {
        match base.store.last_success(job).await {
            Ok(Some(ms)) => crate::metrics::last_success_at(job.as_str(), ms),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(job = %job, error = %format!("{e:#}"), "cannot read the last successful run")
            }
        }
    }
}

/// Stands by until this instance gets the lock (while it holds less than
/// its share of the tenants), runs the jobs while it holds it, and stands
/// by again should it lose or hand it over — until a signal.
async fn take_turns(
    live: &Arc<Live>,
    shared: &Shared,
    ops_store: &crate::state::Store,
    stop: &CancellationToken,
    health: &TenantHealth,
    taken: &tokio::sync::Notify,
) -> anyhow::Result<()> {
    let settings = live.current().settings;
    let poll = settings.daemon.lock_poll;
    let target = LockTarget::of(&settings.database.url);
    let mut said_standby = false;
    while !stop.is_cancelled() {
        let mut pause = poll;
        // At its share, this instance leaves the tenant to the others.
        if shared.balance.reserve() {
            match target.try_acquire().await {
                Ok(Some(lock)) => {
                    said_standby = false;
                    health.active.store(true, Ordering::SeqCst);
                    crate::metrics::tenant_held(true);
                    taken.notify_one();
                    shared.role_changed();
                    tracing::info!("holding the instance lock: this instance runs the jobs");
                    let period = active_period(live, shared, ops_store, lock, stop).await;
                    health.active.store(false, Ordering::SeqCst);
                    crate::metrics::tenant_held(false);
                    // A tenant handed over gave its place up already.
                    if !matches!(period, Ok(Period::HandedOver)) {
                        shared.balance.unreserve();
                    }
                    shared.role_changed();
                    match period? {
                        Period::Stopped => return Ok(()),
                        Period::LockLost => tracing::warn!(
                            "jobs stopped after the instance lock was lost; standing by"
                        ),
                        Period::HandedOver => {}
                    }
                    // Give a waiting standby two polls' head start rather
                    // than grabbing the lock straight back.
                    pause = poll * 2;
                }
                Ok(None) => {
                    shared.balance.unreserve();
                    if !said_standby {
                        tracing::info!(
                            poll_secs = poll.as_secs(),
                            "another instance holds the state database: standing by"
                        );
                        said_standby = true;
                    }
                }
                Err(e) => {
                    shared.balance.unreserve();
                    tracing::warn!(error = %format!("{e:#}"), "cannot try the instance lock; will try again")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => {}
        }
    }
    Ok(())
}

/// What every generation of the schedules shares: one gate per job (a
/// job never overlaps itself, across a reload too), the turn both jobs
/// take, the tracker that stopping awaits, and the two stop tokens. The
/// runs `--once` asks for share them too.
#[derive(Clone)]
struct Runs {
    /// What the tenants of this instance share: the bound on jobs at once.
    shared: Shared,
    gates: [Arc<Gate>; 3],
    turn: Arc<tokio::sync::Mutex<()>>,
    tracker: TaskTracker,
    /// Cancelled to stop: the running job finishes its current batch.
    period: CancellationToken,
    /// Fired when the drain bound passes: the running job is dropped where
    /// it stands (what it did not record stays to be planned again).
    hard_stop: CancellationToken,
}

impl Runs {
    /// The gate of `job`'s runs.
    fn gate(&self, job: Job) -> &Arc<Gate> {
        match job {
            Job::Contacts => &self.gates[0],
            Job::Writeback => &self.gates[1],
            Job::Reconcile => &self.gates[2],
        }
    }
}

/// Runs the schedules while the lock is held; returns when a signal
/// arrives (after draining) or the lock is lost. A reload that changes a
/// schedule re-arms them without stopping a running job.
async fn active_period(
    live: &Arc<Live>,
    shared: &Shared,
    reader: &crate::state::Store,
    lock: InstanceLock,
    stop: &CancellationToken,
) -> anyhow::Result<Period> {
    let daemon = live.current().settings.daemon.clone();
    let (poll, drain) = (daemon.lock_poll, daemon.shutdown_timeout);
    let runs = Runs {
        shared: shared.clone(),
        gates: std::array::from_fn(|_| Arc::new(Gate::default())),
        turn: Arc::new(tokio::sync::Mutex::new(())),
        tracker: TaskTracker::new(),
        period: stop.child_token(),
        hard_stop: CancellationToken::new(),
    };
    let ctx = live.current().with_shutdown(runs.period.clone());
    crate::jobs::take_lease(&ctx).await?;
    // Requests an earlier holder took and never finished: their
    // requesters stop waiting.
    if let Err(e) = ctx
        .store
        .fail_unfinished_run_requests("the daemon that took this request stopped before it finished; what it did is recorded, and --once again completes it")
        .await
    {
        tracing::warn!(error = %format!("{e:#}"), "cannot close unfinished run requests");
    }
    let mut schedule_changes = live.schedule_changes();
    let mut scheduler = arm_schedules(live, &runs).await?;
    let check_every = poll.min(crate::lock::WATCH_EVERY);
    let mut watched = Watched::from_now();
    let ended = loop {
        tokio::select! {
            _ = stop.cancelled() => break Period::Stopped,
            Ok(()) = schedule_changes.changed() => {
                scheduler.shutdown().await?;
                scheduler = arm_schedules(live, &runs).await?;
                tracing::info!("schedules re-armed after a reload");
            }
            _ = tokio::time::sleep(check_every) => {
                let check = still_ours(&lock, reader, ctx.store.fence_epoch(), &mut watched).await;
                if let Some(reason) = check.lost {
                    tracing::error!(%reason, "lost the instance lock or lease: the running job is stopped at once");
                    break Period::LockLost;
                }
                // Between jobs, a tenant beyond this instance's share goes.
                if runs.tracker.is_empty() && runs.shared.balance.give_one_up() {
                    tracing::info!("this instance holds more than its share of the tenants: it hands this one over");
                    break Period::HandedOver;
                }
                if check.asked {
                    take_run_request(live, &runs).await;
                }
            }
        }
    };
    end_period(&ctx, &runs, scheduler, &ended, drain).await?;
    drop(lock);
    Ok(ended)
}

/// Ends an active period that `ended` so: the running job is cancelled
/// (it finishes its current batch and records its state) or, the lock
/// lost, dropped where it stands; no other starts; it is awaited, bounded
/// by `drain`; the lease is marked released unless it was lost.
async fn end_period(
    ctx: &Context,
    runs: &Runs,
    mut scheduler: JobScheduler,
    ended: &Period,
    drain: Duration,
) -> anyhow::Result<()> {
    let lost = matches!(ended, Period::LockLost);
    if lost {
        // Another instance may be writing already: the running job is
        // dropped where it stands, not drained (what it did not record
        // stays to be planned again, by the new holder).
        runs.hard_stop.cancel();
    }
    runs.period.cancel();
    scheduler.shutdown().await?;
    runs.tracker.close();
    if !runs.tracker.is_empty() {
        tracing::info!(
            drain_secs = drain.as_secs(),
            "waiting for the running job to finish its current batch"
        );
        if matches!(ended, Period::Stopped) {
            super::notify_systemd(&[sd_notify::NotifyState::Stopping]);
        }
    }
    drain_jobs(&runs.tracker, &runs.hard_stop, drain).await;
    if !lost && let Err(e) = ctx.store.release_lease().await {
        tracing::warn!(error = %format!("{e:#}"), "cannot mark the lease released");
    }
    Ok(())
}

/// A started scheduler with both jobs on their schedules as the current
/// settings give them. Each tick runs its job with the settings current
/// when it fires.
async fn arm_schedules(live: &Arc<Live>, runs: &Runs) -> anyhow::Result<JobScheduler> {
    let settings = live.current().settings;
    let scheduler = JobScheduler::new().await?;
    for job in Job::SCHEDULED {
        let gate = runs.gate(job);
        let cron = match job {
            Job::Contacts => settings.sync.schedule.to_string(),
            Job::Writeback => settings.writeback.schedule.to_string(),
            Job::Reconcile => match &settings.reconcile.schedule {
                Some(cron) => cron.to_string(),
                None => {
                    tracing::info!(job = %job, "reconcile.schedule is \"\": the drift report runs by hand only");
                    continue;
                }
            },
        };
        let f = job_fn(live.clone(), job, runs);
        let zone = settings.schedule_zone();
        let offset = runs.shared.offset(&settings, job, &cron, zone);
        let timing = crate::schedule::Timing {
            cron: &cron,
            zone,
            offset,
        };
        schedule(
            &scheduler,
            job.as_str(),
            timing,
            gate.clone(),
            runs.turn.clone(),
            f,
        )
        .await?;
    }
    scheduler.start().await?;
    Ok(scheduler)
}

/// What a tick of `job` does: unless the instance is stopping, run the job
/// as a tracked task (so stopping awaits it instead of polling) with the
/// context current at the tick.
fn job_fn(live: Arc<Live>, job: Job, runs: &Runs) -> JobFn {
    let (tracker, period, hard_stop, jobs) = (
        runs.tracker.clone(),
        runs.period.clone(),
        runs.hard_stop.clone(),
        runs.shared.jobs.clone(),
    );
    Arc::new(move || {
        if period.is_cancelled() {
            // A tick that waited for its turn while the instance was
            // stopping: no new run.
            return Box::pin(async {});
        }
        let ctx = live.current().with_shutdown(period.clone());
        let (hard_stop, slots) = (hard_stop.clone(), jobs.clone());
        let running = tracker.spawn(crate::scope::carried(async move {
            tokio::select! {
                _ = async {
                    // At most `daemon.max_parallel_jobs` over all tenants.
                    let Ok(_slot) = slots.acquire().await else { return };
                    run_job(&ctx, job).await
                } => {}
                _ = hard_stop.cancelled() => {
                    tracing::warn!(job = %job, "job stopped where it stood: the drain bound passed");
                }
            }
        }));
        Box::pin(async move {
            if let Err(e) = running.await {
                tracing::error!(job = %job, error = %e, "job task ended abnormally");
            }
        })
    })
}

/// Takes the oldest `--once` request, if any, and runs it as a tracked
/// task: next, between the scheduled runs.
async fn take_run_request(live: &Arc<Live>, runs: &Runs) {
    let ctx = live.current();
    let request = match ctx.store.claim_run_request(&ctx.instance.id).await {
        Ok(Some(request)) => request,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot read the run requests");
            return;
        }
    };
    let (live, runs_now) = (live.clone(), runs.clone());
    runs.tracker.spawn(crate::scope::carried(async move {
        let id = request.id;
        let store = live.current().store;
        let printed = tokio::select! {
            printed = serve_run_request(&live, &runs_now, request) => printed,
            _ = runs_now.hard_stop.cancelled() => crate::once::Printed {
                ok: false,
                text: format!("{}the daemon stopped this run where it stood (daemon.shutdown_timeout_secs passed); what was not sent is planned again at the next run\n", crate::once::FAILURE_PREFIX),
            },
        };
        if let Err(e) = store.finish_run_request(id, printed.ok, &printed.text).await {
            tracing::error!(request = id, error = %format!("{e:#}"), "cannot record the outcome of a --once request");
        }
    }));
}

/// Runs a request's jobs in order, each when its scheduled run (if one is
/// going) has ended and the other job is not running; returns what the
/// asking `--once` prints.
async fn serve_run_request(
    live: &Arc<Live>,
    runs: &Runs,
    request: crate::state::RunRequest,
) -> crate::once::Printed {
    let what = crate::once::OnceJobs::from_ask(request.ask);
    tracing::info!(
        request = request.id,
        requested_by = %request.requested_by,
        jobs = ?what.jobs(),
        "running a --once request next"
    );
    let mut printed = crate::once::Printed {
        ok: true,
        text: String::new(),
    };
    for job in what.jobs() {
        let gate = runs.gate(job);
        let _running = loop {
            if let Some(entered) = gate.try_enter() {
                break entered;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = runs.period.cancelled() => break_request(&mut printed, job),
            }
            if runs.period.is_cancelled() {
                return printed;
            }
        };
        let _turn = runs.turn.lock().await;
        let Ok(_slot) = runs.shared.jobs.acquire().await else {
            break_request(&mut printed, job);
            return printed;
        };
        if runs.period.is_cancelled() {
            break_request(&mut printed, job);
            return printed;
        }
        let ctx = live.current().with_shutdown(runs.period.clone());
        let (ok, text) = crate::once::run_job(&ctx, &what, job).await;
        printed.ok &= ok;
        printed.text.push_str(&text);
        if runs.period.is_cancelled() {
            break_request(&mut printed, job);
            return printed;
        }
    }
    printed
}

/// The daemon is stopping: the request's run ends here, failed.
fn break_request(printed: &mut crate::once::Printed, job: Job) {
    printed.text.push_str(&format!(
        "{}{job}: the daemon is stopping: this run was cut short; what was not sent is planned again at the next run\n",
        crate::once::FAILURE_PREFIX
    ));
    printed.ok = false;
}

/// What the check every second found.
struct Check {
    /// Why the lock or the lease is no longer this instance's; `None`
    /// while both are.
    lost: Option<String>,
    /// A `--once` request may wait (always, where it cannot be told
    /// without claiming one).
    asked: bool,
}

/// How long a PostgreSQL holder goes on without its lock connection's
/// watch seeing its lease before it counts the tenant lost. The watch
/// reads every second or few and closes a connection that fails or does
/// not answer within `lock::ANSWER_WITHIN` (every holder then sees its
/// lock gone at once): this bound only catches a watch that stopped
/// reading altogether.
const UNSEEN_FOR: Duration = Duration::from_secs(30);

/// When the lease was taken, and when the watch last saw it ours.
struct Watched {
    since: std::time::Instant,
    seen: std::time::Instant,
}

impl Watched {
    fn from_now() -> Watched {
        let now = std::time::Instant::now();
        Watched {
            since: now,
            seen: now,
        }
    }
}

/// Whether this instance still holds both its lock and the lease it took
/// (`epoch`), and whether a `--once` request waits.
///
/// On PostgreSQL it asks nothing: it reads what the lock connection's
/// watch last saw (`lock::Sighting`), so that a thousand tenants' checks
/// never queue on one connection. On SQLite it reads through `reader`, a
/// pool the jobs do not use, so a busy job cannot make the check wait.
async fn still_ours(
    lock: &InstanceLock,
    reader: &crate::state::Store,
    epoch: i64,
    watched: &mut Watched,
) -> Check {
    let lost = |why: String| Check {
        lost: Some(why),
        asked: false,
    };
    match lock.sighting(watched.since) {
        Some(Sighting::Lost(why)) => lost(why),
        Some(Sighting::Held(peek)) if epoch != 0 && peek.epoch != Some(epoch) => lost(format!(
            "another instance took the lease (epoch {} is no longer {epoch})",
            peek.epoch.unwrap_or(0)
        )),
        Some(Sighting::Held(peek)) => {
            watched.seen = std::time::Instant::now();
            Check {
                lost: None,
                asked: peek.asked,
            }
        }
        Some(Sighting::NotYet) if watched.seen.elapsed() > UNSEEN_FOR => lost(format!(
            "the lock connection has not confirmed the lease for {} s",
            UNSEEN_FOR.as_secs()
        )),
        Some(Sighting::NotYet) => Check {
            lost: None,
            asked: false,
        },
        None if !lock.still_held() => lost("the lock file was removed or replaced".into()),
        // No lease taken yet: nothing to compare.
        None if epoch == 0 => Check {
            lost: None,
            asked: true,
        },
        None => {
            let lease = tokio::time::timeout(Duration::from_secs(2), reader.lease()).await;
            match lease {
                Ok(Ok(Some(l))) if l.epoch == epoch => Check {
                    lost: None,
                    asked: true,
                },
                Ok(Ok(_)) => lost("another instance took the lease".into()),
                Ok(Err(e)) => lost(format!("cannot read the lease: {e:#}")),
                Err(_) => lost("the lease could not be read within 2 s".into()),
            }
        }
    }
}

/// Awaits the closed `tracker`'s jobs for at most `drain`. Past it,
/// `hard_stop` is fired so each job is dropped where it stands (what it did
/// not record stays to be planned again), and those are awaited too.
/// Returns whether the bound passed.
async fn drain_jobs(tracker: &TaskTracker, hard_stop: &CancellationToken, drain: Duration) -> bool {
    if tokio::time::timeout(drain, tracker.wait()).await.is_ok() {
        return false;
    }
    tracing::warn!(
        "shutdown_timeout_secs passed with a job still running; it is stopped where it stands: unsent work stays to be planned again"
    );
    hard_stop.cancel();
    tracker.wait().await;
    true
}

/// One scheduled run; errors are logged here, where they are handled.
async fn run_job(ctx: &Context, job: Job) {
    let result = match job {
        Job::Contacts => contacts::run(ctx, RunOptions::default()).await.map(|_| ()),
        Job::Writeback => writeback::run(ctx).await.map(|_| ()),
        Job::Reconcile => crate::reconcile::run(ctx, true).await.map(|_| ()),
    };
    if let Err(e) = result {
        tracing::error!(job = %job, error = %ctx.redactor.redact(&format!("{e:#}")), "run failed");
    }
}

/// How often the daemon reads EDM's `service-info` for its gauges (and
/// tops the tenant up when that is due).
const SERVICE_INFO_EVERY: Duration = Duration::from_secs(3600);

/// Reads the tenant's sending service now, every [`SERVICE_INFO_EVERY`]
/// and whenever this instance takes the tenant, into the
/// `crm_edm_sync_edm_service_*` and quota gauges (standby or not: it is
/// one read), topping it up while this instance holds it (`topup`). A
/// failure is a warning; the gauges keep their last values.
fn spawn_service_info(
    live: Arc<Live>,
    active: Arc<std::sync::atomic::AtomicBool>,
    taken: Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(crate::scope::carried(async move {
        loop {
            // The context of the current settings (a reload may change
            // the credentials). A top-up is a fenced write: only once the
            // lease is taken.
            let ctx = live.current();
            let holds = active.load(Ordering::SeqCst) && ctx.store.fence_epoch() > 0;
            crate::topup::refresh(&ctx, holds).await;
            tokio::select! {
                _ = tokio::time::sleep(SERVICE_INFO_EVERY) => {}
                _ = taken.notified() => {
                    // Taken: the lease follows within moments.
                    for _ in 0..50 {
                        if live.current().store.fence_epoch() > 0 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tracked job the way `active_period` spawns one: it ends on its
    /// own after `takes`, or when `hard_stop` fires. Returns what happened.
    fn tracked_job(
        tracker: &TaskTracker,
        hard_stop: &CancellationToken,
        takes: Duration,
    ) -> Arc<std::sync::Mutex<Option<&'static str>>> {
        let ended = Arc::new(std::sync::Mutex::new(None));
        let (seen, hard_stop) = (ended.clone(), hard_stop.clone());
        tracker.spawn(async move {
            let how = tokio::select! {
                _ = tokio::time::sleep(takes) => "finished",
                _ = hard_stop.cancelled() => "stopped",
            };
            *seen.lock().unwrap() = Some(how);
        });
        ended
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_awaits_a_job_that_finishes_within_the_bound() {
        // Arrange: a job needing 3 s of a 10 s drain.
        let (tracker, hard_stop) = (TaskTracker::new(), CancellationToken::new());
        let ended = tracked_job(&tracker, &hard_stop, Duration::from_secs(3));
        tracker.close();
        let start = tokio::time::Instant::now();

        // Act
        let timed_out = drain_jobs(&tracker, &hard_stop, Duration::from_secs(10)).await;

        // Assert: it ran to its end, and the drain returned when it did.
        assert!(!timed_out);
        assert_eq!(*ended.lock().unwrap(), Some("finished"));
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert!(!hard_stop.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_stops_a_job_still_running_when_the_bound_passes() {
        // Arrange: a job that would need an hour.
        let (tracker, hard_stop) = (TaskTracker::new(), CancellationToken::new());
        let ended = tracked_job(&tracker, &hard_stop, Duration::from_secs(3600));
        tracker.close();
        let start = tokio::time::Instant::now();

        // Act
        let timed_out = drain_jobs(&tracker, &hard_stop, Duration::from_secs(10)).await;

        // Assert: stopped at the bound, not later, and awaited before return.
        assert!(timed_out);
        assert_eq!(*ended.lock().unwrap(), Some("stopped"));
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert!(tracker.is_empty());
    }
}
