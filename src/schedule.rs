//! When the daemon's jobs run: six-field cron schedules read in
//! `sync.timezone`, fired by tokio-cron-scheduler, one run of a job at a
//! time.
//!
//! tokio-cron-scheduler reads a zoned schedule with the zone's UTC offset of
//! the day the job was added, and keeps it: after a daylight-saving change
//! a job at `0 0 3 * * *` in Europe/Berlin would fire at 02:00 or 04:00
//! local time until the daemon restarts. So each tick is armed as a one-shot
//! job at the next time the schedule gives in the zone, computed afresh
//! from the zone's rules ([`ZonedCron::next_after`], croner), and each tick
//! arms the next: the offset of the day of each tick counts. A local time
//! that happens twice (clocks turned back) fires once; one that does not
//! happen (clocks turned forward) fires at the first time after it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tokio_cron_scheduler::{Job as CronJob, JobScheduler};

/// A cron schedule read in a time zone.
#[derive(Debug, Clone)]
pub(crate) struct ZonedCron {
    cron: croner::Cron,
    zone: chrono_tz::Tz,
}

impl ZonedCron {
    /// Parses a six-field (seconds first) schedule the way the scheduler
    /// and the config check do.
    pub(crate) fn parse(schedule: &str, zone: chrono_tz::Tz) -> anyhow::Result<ZonedCron> {
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .dom_and_dow(true)
            .build()
            .parse(schedule)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(ZonedCron { cron, zone })
    }

    /// The first time after `after` the schedule fires, read in the zone
    /// with the offset in force at that time.
    pub(crate) fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        use chrono::Timelike;
        // croner carries the start's fraction of a second into the result.
        let after = after.with_nanosecond(0)?;
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.zone), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// Lets one run of a job in at a time, counting what it let in and what it
/// turned away.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    running: AtomicBool,
    /// Ticks that started a run.
    pub started: AtomicU64,
    /// Ticks skipped because the previous run was still going.
    pub skipped: AtomicU64,
}

/// Held while a run is going; lets the next one in when dropped (also if
/// the run panicked).
pub(crate) struct GateGuard<'a>(&'a Gate);

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::SeqCst);
    }
}

impl Gate {
    pub(crate) fn try_enter(&self) -> Option<GateGuard<'_>> {
        if self.running.swap(true, Ordering::SeqCst) {
            self.skipped.fetch_add(1, Ordering::SeqCst);
            None
        } else {
            self.started.fetch_add(1, Ordering::SeqCst);
            Some(GateGuard(self))
        }
    }
}

/// When a job's ticks come: a cron schedule read in a zone, each tick
/// `offset` after the time it gives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing<'a> {
    pub(crate) cron: &'a str,
    pub(crate) zone: chrono_tz::Tz,
    pub(crate) offset: std::time::Duration,
}

/// What a scheduled job runs.
pub(crate) type JobFn = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// Adds `job` to `scheduler` on `schedule`, read in `zone`: each tick runs
/// it unless its gate says it is still running; runs of all jobs sharing
/// `turn` take turns. Returns the id of the first tick's one-shot job.
pub(crate) async fn schedule(
    scheduler: &JobScheduler,
    name: &'static str,
    timing: Timing<'_>,
    gate: Arc<Gate>,
    turn: Arc<tokio::sync::Mutex<()>>,
    job: JobFn,
) -> anyhow::Result<uuid::Uuid> {
    let Timing {
        cron: schedule,
        zone,
        offset,
    } = timing;
    let cron = ZonedCron::parse(schedule, zone)
        .map_err(|e| anyhow::anyhow!("cannot schedule {name} on {schedule:?}: {e}"))?;
    if cron.next_after(Utc::now()).is_none() {
        tracing::warn!(
            job = name,
            schedule,
            "the schedule never fires: this job will never run"
        );
        return Ok(uuid::Uuid::nil());
    }
    // Each tick runs in the tenant that armed it (the scheduler's own
    // task is in none).
    let tenant = crate::scope::current();
    let tick: JobFn = Arc::new(move || {
        let (gate, turn, job) = (gate.clone(), turn.clone(), job.clone());
        Box::pin(crate::scope::within(&tenant, async move {
            let Some(_running) = gate.try_enter() else {
                tracing::warn!(job = name, "previous run still going; tick skipped");
                return;
            };
            let _turn = turn.lock().await;
            job().await;
        }))
    });
    let offset = chrono::Duration::from_std(offset).unwrap_or_default();
    let when = Arc::new(Ticks { cron, offset });
    arm(scheduler.clone(), name, when, Utc::now() - offset, tick).await
}

/// A schedule's ticks, each `offset` after the time the schedule gives.
struct Ticks {
    cron: ZonedCron,
    offset: chrono::Duration,
}

/// A stable share of `cron`'s period for `key` (a tenant and a job): the
/// same key always gets the same offset, and many keys spread evenly over
/// the shortest gap between the schedule's next ticks, so that a thousand
/// tenants on one schedule do not all fire in the same second.
pub(crate) fn spread_offset(key: &str, cron: &ZonedCron) -> std::time::Duration {
    use sha2::Digest;
    let mut at = Utc::now();
    let mut shortest: Option<chrono::Duration> = None;
    for _ in 0..4 {
        let Some(next) = cron.next_after(at) else {
            break;
        };
        if let Some(gap) = cron.next_after(next).map(|after| after - next) {
            shortest = Some(shortest.map_or(gap, |s| s.min(gap)));
        }
        at = next;
    }
    let Some(period) = shortest.and_then(|p| p.to_std().ok()) else {
        return std::time::Duration::ZERO;
    };
    let digest = sha2::Sha256::digest(key.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    let share = u64::from_be_bytes(bytes) as f64 / u64::MAX as f64;
    std::time::Duration::from_secs((period.as_secs_f64() * share).floor() as u64)
}

/// Adds the one-shot job of the schedule's next tick after `after`; when
/// it fires it arms the one after it, then runs `tick`.
fn arm(
    scheduler: JobScheduler,
    name: &'static str,
    cron: Arc<Ticks>,
    after: DateTime<Utc>,
    tick: JobFn,
) -> BoxFuture<'static, anyhow::Result<uuid::Uuid>> {
    Box::pin(async move {
        let base = cron
            .cron
            .next_after(after)
            .ok_or_else(|| anyhow::anyhow!("the schedule of {name} never fires again"))?;
        let at = base + cron.offset;
        let wait = (at - Utc::now()).to_std().unwrap_or_default();
        let one = CronJob::new_one_shot_at_instant_async(
            std::time::Instant::now() + wait,
            move |_id, scheduler| {
                let (cron, tick) = (cron.clone(), tick.clone());
                Box::pin(async move {
                    // The scheduler counts whole seconds and looks twice a
                    // second: it may fire a little early.
                    if let Ok(early) = (at - Utc::now()).to_std() {
                        tokio::time::sleep(early).await;
                    }
                    if let Err(e) = arm(scheduler, name, cron, base, tick.clone()).await {
                        tracing::error!(job = name, error = %format!("{e:#}"), "cannot arm the next tick");
                    }
                    tick().await;
                })
            },
        )?;
        Ok(scheduler.add(one).await?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn gate_lets_one_in_and_counts_the_ones_turned_away() {
        let gate = Gate::default();
        let first = gate.try_enter();
        assert!(first.is_some());
        assert!(gate.try_enter().is_none());
        assert!(gate.try_enter().is_none());
        drop(first);
        assert!(gate.try_enter().is_some());
        assert_eq!(gate.started.load(Ordering::SeqCst), 2);
        assert_eq!(gate.skipped.load(Ordering::SeqCst), 2);
    }

    /// Real time: tokio-cron-scheduler reads the wall clock, so
    /// `tokio::time::pause` cannot drive it. A job that takes 1.5 s on an
    /// every-second schedule must run, have ticks skipped, and never
    /// overlap itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_scheduler_fires_and_skips_ticks_while_a_run_is_going() {
        let scheduler = JobScheduler::new().await.unwrap();
        let gate = Arc::new(Gate::default());
        let in_flight = Arc::new(AtomicU64::new(0));
        let max_in_flight = Arc::new(AtomicU64::new(0));
        let (f_in, f_max) = (in_flight.clone(), max_in_flight.clone());
        let job: JobFn = Arc::new(move || {
            let (in_flight, max_in_flight) = (f_in.clone(), f_max.clone());
            Box::pin(async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                max_in_flight.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1500)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
            })
        });
        schedule(
            &scheduler,
            "test",
            Timing {
                cron: "* * * * * *",
                zone: chrono_tz::UTC,
                offset: Duration::ZERO,
            },
            gate.clone(),
            Arc::new(tokio::sync::Mutex::new(())),
            job,
        )
        .await
        .unwrap();
        let mut scheduler = scheduler;
        scheduler.start().await.unwrap();

        tokio::time::sleep(Duration::from_millis(5200)).await;
        scheduler.shutdown().await.unwrap();

        assert!(gate.started.load(Ordering::SeqCst) >= 2, "runs: {:?}", gate);
        assert!(
            gate.skipped.load(Ordering::SeqCst) >= 1,
            "skips: {:?}",
            gate
        );
        assert_eq!(max_in_flight.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_bad_schedule_is_an_error_naming_it() {
        let scheduler = JobScheduler::new().await.unwrap();
        let job: JobFn = Arc::new(|| Box::pin(async {}));
        let err = schedule(
            &scheduler,
            "x",
            Timing {
                cron: "every minute",
                zone: chrono_tz::UTC,
                offset: Duration::ZERO,
            },
            Arc::default(),
            Arc::default(),
            job,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("every minute"), "{err}");
    }

    /// `sync.timezone`: a schedule is read in its zone. Nine o'clock in
    /// Asia/Shanghai (UTC+8, no daylight saving) is one o'clock UTC.
    #[tokio::test]
    async fn a_schedule_of_nine_in_asia_shanghai_fires_at_one_utc() {
        use chrono::Timelike;
        // Arrange
        let scheduler = JobScheduler::new().await.unwrap();
        let job: JobFn = Arc::new(|| Box::pin(async {}));

        // Act
        let id = schedule(
            &scheduler,
            "t",
            Timing {
                cron: "0 0 9 * * *",
                zone: chrono_tz::Asia::Shanghai,
                offset: Duration::ZERO,
            },
            Arc::default(),
            Arc::default(),
            job,
        )
        .await
        .unwrap();
        let mut scheduler = scheduler;
        let next = scheduler.next_tick_for_job(id).await.unwrap().unwrap();
        let due = ZonedCron::parse("0 0 9 * * *", chrono_tz::Asia::Shanghai)
            .unwrap()
            .next_after(Utc::now())
            .unwrap();

        // Assert: nine in Shanghai is one UTC; the scheduler's own tick is
        // armed for it (counted in whole seconds: up to one early, and the
        // tick then waits for it).
        assert_eq!((due.hour(), due.minute(), due.second()), (1, 0, 0), "{due}");
        let early = due - next;
        assert!(
            early >= chrono::Duration::zero() && early <= chrono::Duration::seconds(1),
            "{next} for {due}"
        );
        let until = due - chrono::Utc::now();
        assert!(until > chrono::Duration::zero() && until <= chrono::Duration::days(1));
    }

    /// A valid cron that never fires (30 February) starts nothing and
    /// stops nothing: the daemon comes up, the job never runs, a WARN says so.
    #[tokio::test]
    async fn a_schedule_that_never_fires_adds_no_job_and_is_no_error() {
        let scheduler = JobScheduler::new().await.unwrap();
        let job: JobFn = Arc::new(|| Box::pin(async {}));
        let id = schedule(
            &scheduler,
            "t",
            Timing {
                cron: "0 0 0 30 2 *",
                zone: chrono_tz::UTC,
                offset: Duration::ZERO,
            },
            Arc::default(),
            Arc::default(),
            job,
        )
        .await
        .unwrap();
        assert!(id.is_nil());
    }

    /// Ticks with an offset fire that long after the schedule's time, and
    /// the offset of a key is the same every time and within the period.
    #[tokio::test]
    async fn a_spread_offset_is_stable_within_the_period_and_delays_each_tick() {
        // Arrange: an hourly schedule.
        let cron = ZonedCron::parse("0 0 * * * *", chrono_tz::UTC).unwrap();

        // Act
        let offsets: Vec<Duration> = (0..200)
            .map(|i| spread_offset(&format!("tenant-{i}/contacts"), &cron))
            .collect();
        let again = spread_offset("tenant-7/contacts", &cron);
        let scheduler = JobScheduler::new().await.unwrap();
        let job: JobFn = Arc::new(|| Box::pin(async {}));
        let offset = Duration::from_secs(1234);
        let id = schedule(
            &scheduler,
            "t",
            Timing {
                cron: "0 0 * * * *",
                zone: chrono_tz::UTC,
                offset,
            },
            Arc::default(),
            Arc::default(),
            job,
        )
        .await
        .unwrap();
        let mut scheduler = scheduler;
        let next = scheduler.next_tick_for_job(id).await.unwrap().unwrap();

        // Assert: stable, inside the hour, spread over it.
        assert_eq!(again, offsets[7]);
        assert!(offsets.iter().all(|o| *o < Duration::from_secs(3600)));
        let quarters: std::collections::BTreeSet<u64> =
            offsets.iter().map(|o| o.as_secs() / 900).collect();
        assert_eq!(quarters.len(), 4, "{offsets:?}");
        use chrono::Timelike;
        let due = next + chrono::Duration::seconds(1);
        assert_eq!((due.minute() * 60 + due.second()) / 10, 1234 / 10, "{next}");
    }

    fn at(rfc3339: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .with_timezone(&Utc)
    }

    /// The next `n` ticks after `from`, in the zone's local time.
    fn ticks(schedule: &str, zone: chrono_tz::Tz, from: &str, n: usize) -> Vec<String> {
        let cron = ZonedCron::parse(schedule, zone).unwrap();
        let mut t = at(from);
        (0..n)
            .map(|_| {
                t = cron.next_after(t).unwrap();
                t.with_timezone(&zone).format("%m-%d %H:%M %Z").to_string()
            })
            .collect()
    }

    /// 2026: clocks go forward on 29 March (02:00 CET → 03:00 CEST) and
    /// back on 25 October (03:00 CEST → 02:00 CET) in Europe/Berlin.
    #[test]
    fn a_schedule_at_three_in_berlin_fires_at_three_local_time_across_both_changes_of_2026() {
        let berlin = chrono_tz::Europe::Berlin;
        assert_eq!(
            ticks("0 0 3 * * *", berlin, "2026-03-27T12:00:00Z", 4),
            [
                "03-28 03:00 CET",
                "03-29 03:00 CEST",
                "03-30 03:00 CEST",
                "03-31 03:00 CEST"
            ]
        );
        assert_eq!(
            ticks("0 0 3 * * *", berlin, "2026-10-23T12:00:00Z", 4),
            [
                "10-24 03:00 CEST",
                "10-25 03:00 CET",
                "10-26 03:00 CET",
                "10-27 03:00 CET"
            ]
        );
    }

    /// Half past two: on 29 March it does not happen (fired once, at the
    /// first time after it); on 25 October it happens twice (fired once).
    #[test]
    fn a_local_time_that_is_skipped_or_repeated_fires_once() {
        let berlin = chrono_tz::Europe::Berlin;
        let spring = ticks("0 30 2 * * *", berlin, "2026-03-28T12:00:00Z", 2);
        assert_eq!(spring.len(), 2);
        assert!(spring[0].starts_with("03-29 03:"), "{spring:?}");
        assert_eq!(spring[1], "03-30 02:30 CEST");
        let autumn = ticks("0 30 2 * * *", berlin, "2026-10-24T12:00:00Z", 2);
        assert_eq!(autumn, ["10-25 02:30 CEST", "10-26 02:30 CET"]);
    }

    /// The zone's offset of each day counts: the tick after a Berlin tick
    /// in winter, taken in summer, is at 03:00 summer time (01:00 UTC), not
    /// 02:00 UTC as the offset of the first day would say.
    #[test]
    fn each_tick_is_computed_with_the_offset_of_its_own_day() {
        let cron = ZonedCron::parse("0 0 3 * * *", chrono_tz::Europe::Berlin).unwrap();
        assert_eq!(
            cron.next_after(at("2026-03-28T12:00:00Z")),
            Some(at("2026-03-29T01:00:00Z"))
        );
        assert_eq!(
            cron.next_after(at("2026-01-10T12:00:00Z")),
            Some(at("2026-01-11T02:00:00Z"))
        );
    }
}
