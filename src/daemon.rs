//! Daemon mode: migrate, serve `/healthz` and `/metrics`, tell systemd it
//! is ready, then — while this instance holds the state database's lock —
//! run the contacts job on `sync.schedule`, the write-back job on
//! `writeback.schedule` and the drift report on `reconcile.schedule`
//! (tokio-cron-scheduler, six-field cron, read in `sync.timezone`, UTC by
//! default).
//!
//! - A job never overlaps itself: a tick that finds it running is skipped
//!   and logged. No two jobs run at the same time either.
//! - Another instance on the same database stands by, trying the lock every
//!   `daemon.lock_poll_secs`, and takes over when the active one stops or
//!   dies. An active instance that loses its PostgreSQL lock connection
//!   stops its jobs and stands by.
//! - SIGTERM or SIGINT (or a lost lock): no new ticks; the running job is
//!   cancelled — it finishes its current batch and records its state — and
//!   awaited (a `TaskTracker`, no polling), within
//!   `daemon.shutdown_timeout_secs`, past which it is dropped where it
//!   stands; then exit 0 (or stand by). A second signal exits at once
//!   (status 1). What was not sent stays to be planned again at the next
//!   start.
//! - SIGHUP (`systemctl reload`) reads the config and its secret files
//!   again: the next run of each job uses them (see `reload`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_cron_scheduler::JobScheduler;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::jobs::{Context, RunOptions};
use crate::lock::{InstanceLock, LockTarget};
use crate::reload::Live;
use crate::schedule::{Gate, JobFn, schedule};
use crate::stored_enums::Job;
use crate::sync::contacts;
use crate::writeback;

/// How an active period ended.
enum Period {
    Stopped,
    LockLost,
}

/// Runs the daemon until a signal stops it. `config` is the `--config`
/// file, read again on SIGHUP.
pub(crate) async fn run(settings: Settings, config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let listen = settings.http.listen;
    let base = Context::new(settings).await?;
    let metrics = crate::metrics::install_recorder()?;
    start_metrics(&base).await;
    let active = Arc::new(AtomicBool::new(false));
    // `/healthz` reads through a pool of its own, so that it answers
    // whatever the jobs are doing with theirs.
    let ops_store = crate::state::Store::reader_beside(&base.settings.database.url).await?;
    let (addr, ops_task) = crate::ops_endpoint::serve(
        listen,
        ops_store.clone(),
        metrics,
        active.clone(),
        base.store.writable().clone(),
    )
    .await?;
    tracing::info!(listen = %addr, "ops endpoint listening: /healthz, /metrics");
    let stop = CancellationToken::new();
    let live = Live::new(base.clone(), config);
    spawn_signal_handler(stop.clone(), live.clone())?;
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    let watchdog = spawn_watchdog(ops_store.clone());
    let service_info = spawn_service_info(live.clone());
    tracing::info!(
        contacts = %base.settings.sync.schedule,
        writeback = %base.settings.writeback.schedule,
        "daemon started"
    );
    let turns = take_turns(&live, &ops_store, &stop, &active).await;
    if let Some(w) = watchdog {
        w.abort();
    }
    service_info.abort();
    ops_task.abort();
    ops_store.close().await;
    base.store.close().await;
    turns?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Every series from start-up, standby or not; the last success as the
/// state database remembers it, so a restart does not blank it.
async fn start_metrics(base: &Context) {
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

/// Stands by until this instance gets the lock, runs the jobs while it
/// holds it, and stands by again should it lose it — until a signal.
async fn take_turns(
    live: &Arc<Live>,
    ops_store: &crate::state::Store,
    stop: &CancellationToken,
    active: &AtomicBool,
) -> anyhow::Result<()> {
    let settings = live.current().settings;
    let poll = settings.daemon.lock_poll;
    let drain = settings.daemon.shutdown_timeout;
    let target = LockTarget::of(&settings.database.url);
    let mut said_standby = false;
    while !stop.is_cancelled() {
        match target.try_acquire().await {
            Ok(Some(lock)) => {
                said_standby = false;
                active.store(true, Ordering::SeqCst);
                crate::metrics::set_role(true);
                tracing::info!("holding the instance lock: this instance runs the jobs");
                let period = active_period(live, ops_store, lock, stop, poll, drain).await;
                active.store(false, Ordering::SeqCst);
                crate::metrics::set_role(false);
                if let Period::Stopped = period? {
                    return Ok(());
                }
                tracing::error!(
                    "lost the instance lock (lock connection gone, lock file replaced or lease taken by another instance); jobs stopped, standing by"
                );
                // Give a waiting standby two polls' head start rather than
                // grabbing the lock straight back.
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = stop.cancelled() => {}
                }
            }
            Ok(None) if !said_standby => {
                tracing::info!(
                    poll_secs = poll.as_secs(),
                    "another instance holds the state database: standing by"
                );
                said_standby = true;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot try the instance lock; will try again")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
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
    reader: &crate::state::Store,
    mut lock: InstanceLock,
    stop: &CancellationToken,
    poll: Duration,
    drain: Duration,
) -> anyhow::Result<Period> {
    let runs = Runs {
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
    let check_every = poll.min(Duration::from_secs(1));
    let lost = loop {
        tokio::select! {
            _ = stop.cancelled() => break false,
            Ok(()) = schedule_changes.changed() => {
                scheduler.shutdown().await?;
                scheduler = arm_schedules(live, &runs).await?;
                tracing::info!("schedules re-armed after a reload");
            }
            _ = tokio::time::sleep(check_every) => {
                if !still_ours(&mut lock, reader, ctx.store.fence_epoch()).await {
                    break true;
                }
                take_run_request(live, &runs).await;
            }
        }
    };
    if lost {
        // Another instance may be writing already: the running job is
        // dropped where it stands, not drained (what it did not record
        // stays to be planned again, by the new holder).
        tracing::error!("lost the instance lock or lease: the running job is stopped at once");
        runs.hard_stop.cancel();
    }
    // Cancel the running job (it finishes its current batch and records
    // its state), start no other, and await it — bounded by the drain —
    // before standing by or exiting.
    runs.period.cancel();
    scheduler.shutdown().await?;
    runs.tracker.close();
    if !runs.tracker.is_empty() {
        tracing::info!(
            drain_secs = drain.as_secs(),
            "waiting for the running job to finish its current batch"
        );
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
    }
    drain_jobs(&runs.tracker, &runs.hard_stop, drain).await;
    if !lost && let Err(e) = ctx.store.release_lease().await {
        tracing::warn!(error = %format!("{e:#}"), "cannot mark the lease released");
    }
    drop(lock);
    Ok(if lost {
        Period::LockLost
    } else {
        Period::Stopped
    })
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
        schedule(
            &scheduler,
            job.as_str(),
            &cron,
            zone,
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
    let (tracker, period, hard_stop) = (
        runs.tracker.clone(),
        runs.period.clone(),
        runs.hard_stop.clone(),
    );
    Arc::new(move || {
        if period.is_cancelled() {
            // A tick that waited for its turn while the instance was
            // stopping: no new run.
            return Box::pin(async {});
        }
        let ctx = live.current().with_shutdown(period.clone());
        let hard_stop = hard_stop.clone();
        let running = tracker.spawn(async move {
            tokio::select! {
                _ = run_job(&ctx, job) => {}
                _ = hard_stop.cancelled() => {
                    tracing::warn!(job = %job, "job stopped where it stood: the drain bound passed");
                }
            }
        });
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
    runs.tracker.spawn(async move {
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
    });
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

/// Whether this instance still holds both its lock and the lease it took
/// (read through `reader`, a pool the jobs do not use, so a busy job
/// cannot make the check wait). A check that does not answer within two
/// seconds counts as lost: an instance that cannot prove it holds the
/// database stops writing.
async fn still_ours(lock: &mut InstanceLock, reader: &crate::state::Store, epoch: i64) -> bool {
    let bound = Duration::from_secs(2);
    let lock_held = tokio::time::timeout(bound, lock.still_held()).await == Ok(true);
    let lease_held = epoch == 0
        || matches!(
            tokio::time::timeout(bound, reader.lease()).await,
            Ok(Ok(Some(l))) if l.epoch == epoch
        );
    lock_held && lease_held
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

/// SIGTERM or SIGINT stops (a second one exits at once); SIGHUP reloads
/// the config (`systemctl reload`), as often as it comes.
fn spawn_signal_handler(stop: CancellationToken, live: Arc<Live>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reading the config again");
            let live = live.clone();
            // Reading files: off the runtime's threads.
            if let Err(e) = tokio::task::spawn_blocking(move || live.reload()).await {
                tracing::error!(error = %e, "config reload ended abnormally");
            }
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
/// How often the daemon reads EDM's `service-info` for its gauges.
const SERVICE_INFO_EVERY: Duration = Duration::from_secs(3600);

/// Reads EDM's sending service now and every [`SERVICE_INFO_EVERY`] into
/// the `crm_edm_sync_edm_service_*` and quota gauges (active and standby
/// alike: it is one read). A failure is a warning; the gauges keep their
/// last values.
fn spawn_service_info(live: Arc<Live>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            // The client of the current settings (a reload may change the
            // credentials).
            let edm = live.current().edm;
            match edm.service_info().await {
                Ok(s) => crate::metrics::edm_service(
                    s.enabled,
                    s.expires
                        .and_then(|d| d.and_hms_opt(0, 0, 0))
                        .map(|t| t.and_utc().timestamp()),
                    s.quota_left,
                ),
                Err(e) => tracing::warn!(error = %e, "cannot read EDM's service-info"),
            }
            tokio::time::sleep(SERVICE_INFO_EVERY).await;
        }
    })
}

fn spawn_watchdog(store: crate::state::Store) -> Option<tokio::task::JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()? / 2;
    Some(tokio::spawn(async move {
        loop {
            if store.connection().ping().await.is_ok() {
                notify_systemd(&[sd_notify::NotifyState::Watchdog]);
            }
            tokio::time::sleep(interval).await;
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
