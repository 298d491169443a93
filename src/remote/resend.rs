//! The one resend policy of every remote call (rule 10 in
//! `docs/sync-rules.md`): how many attempts a call gets, how long to wait
//! before each repeat, and what a lost answer means.
//!
//! - Attempts: `max_retries + 1` requests at most for one call, however
//!   its failures mix (a lost answer, then a refused connection, then a
//!   429 all draw on the same budget).
//! - Delays: backon's exponential schedule (`first_delay`, doubling, at
//!   most 30 s) with full jitter, never sooner than the server's
//!   `Retry-After` (capped at five minutes). A shutdown cuts the wait
//!   short and the call is given up: what it was sending stays pending.
//! - Lost answers: a call that is not idempotent (an EDM add or
//!   unsubscribe, a CRM contact-history record) whose answer was lost may
//!   have taken effect. It is repeated only through [`Next::AgainAfterLoss`],
//!   which tells its caller to check first (EDM: read the list, send only
//!   what did not arrive) or to count the repeat as a possible duplicate
//!   (CRM: nothing to check against).
//!
//! [`HttpCaller::execute`](super::HttpCaller::execute) drives idempotent
//! calls through this policy itself. The two callers of non-idempotent
//! calls drive it in their own loop, because only they can check: each
//! failed attempt goes to [`Attempts::after`], which waits and says
//! whether and how to send again. Nothing else in the crate sleeps
//! between attempts or counts them.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

use super::{Api, RemoteError};

/// The longest planned delay between two attempts.
const MAX_DELAY: Duration = Duration::from_secs(30);
/// The longest `Retry-After` honoured; a server asking for more is
/// waited on this long and then asked again.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Whether a call may be repeated blindly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotence {
    /// Reads and edits: any transient failure is sent again.
    Idempotent,
    /// Adds, unsubscribes and contact-history records: sent again blindly
    /// only when the request certainly did not take effect; after a lost
    /// answer the caller checks or counts first ([`Next::AgainAfterLoss`]).
    NotIdempotent,
}

/// A draw in `[0, 1]` that scales the planned delay (full jitter).
pub(super) type Jitter = fn() -> f64;

/// How one API's calls are repeated.
#[derive(Debug, Clone)]
pub struct ResendPolicy {
    api: Api,
    /// Requests one call may make, the first included (`max_retries + 1`).
    attempts: u32,
    first_delay: Duration,
    jitter: Jitter,
    shutdown: CancellationToken,
}

/// What to do after a failed attempt.
#[derive(Debug)]
pub enum Next {
    /// Send again: the request certainly did not take effect, or the call
    /// is idempotent. The wait is over.
    Again,
    /// The answer was lost (this error): the request may have taken
    /// effect. The wait is over; check or count before sending again.
    AgainAfterLoss(RemoteError),
    /// Give the call up with this error: it is permanent, the attempts are
    /// spent, or a shutdown came during the wait.
    GiveUp(RemoteError),
}

impl ResendPolicy {
    /// `max_retries` repeats after the first attempt, the first after
    /// about `first_delay`.
    pub fn new(api: Api, max_retries: u32, first_delay: Duration) -> ResendPolicy {
        ResendPolicy {
            api,
            attempts: max_retries.saturating_add(1),
            first_delay,
            jitter: fastrand::f64,
            shutdown: CancellationToken::new(),
        }
    }

    /// The same policy with its first delay changed (tests and the demo
    /// keep fault scenarios fast).
    pub fn with_first_delay(mut self, first_delay: Duration) -> ResendPolicy {
        self.first_delay = first_delay;
        self
    }

    /// The same policy drawing its jitter from `jitter` (tests pin it to
    /// see exact delays).
    pub fn with_jitter(mut self, jitter: Jitter) -> ResendPolicy {
        self.jitter = jitter;
        self
    }

    /// The same policy giving up its waits when `shutdown` is cancelled.
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> ResendPolicy {
        self.shutdown = shutdown;
        self
    }

    /// The delay planned before the first repeat.
    pub fn first_delay(&self) -> Duration {
        self.first_delay
    }

    /// The repeats allowed after the first attempt (`max_retries`).
    pub fn max_retries(&self) -> u32 {
        self.attempts - 1
    }

    /// The attempts of one call of `operation`, the first one under way.
    pub fn attempts(&self, operation: &str, idempotence: Idempotence) -> Attempts<'_> {
        let schedule = ExponentialBuilder::default()
            .with_min_delay(self.first_delay)
            .with_max_delay(MAX_DELAY)
            .with_max_times(self.max_retries() as usize)
            .build();
        Attempts {
            policy: self,
            operation: operation.to_string(),
            idempotence,
            made: 1,
            schedule,
        }
    }

    /// The wait before the next attempt: the planned delay scaled by the
    /// jitter, never below the server's `Retry-After`.
    fn delay(&self, planned: Duration, error: &RemoteError) -> Duration {
        full_jitter(planned, error.retry_after(), (self.jitter)())
    }
}

/// Full jitter: a delay drawn evenly from `[0, planned]`, but never below
/// what the server asked for in `Retry-After` (capped at five minutes).
pub fn full_jitter(planned: Duration, retry_after: Option<Duration>, draw: f64) -> Duration {
    let jittered = planned.mul_f64(draw.clamp(0.0, 1.0));
    match retry_after {
        Some(after) => jittered.max(after.min(MAX_RETRY_AFTER)),
        None => jittered,
    }
}

/// The attempts of one call: told of each failure, it decides, waits and
/// counts.
pub struct Attempts<'p> {
    policy: &'p ResendPolicy,
    operation: String,
    idempotence: Idempotence,
    /// Requests made so far, the one that just failed included.
    made: u32,
    schedule: ExponentialBackoff,
}

impl Attempts<'_> {
    /// Requests made so far.
    pub fn made(&self) -> u32 {
        self.made
    }

    /// After attempt [`made`](Self::made) failed with `error`: gives up,
    /// or waits and says how to send again.
    pub async fn after(&mut self, error: RemoteError) -> Next {
        if !error.is_retriable() {
            return Next::GiveUp(error);
        }
        let Some(planned) = self.schedule.next() else {
            self.exhausted(&error);
            return Next::GiveUp(error);
        };
        let wait = self.policy.delay(planned, &error);
        self.announce(&error, wait);
        tokio::select! {
            biased;
            _ = self.policy.shutdown.cancelled() => {
                tracing::info!(
                    api = self.policy.api.as_str(),
                    operation = %self.operation,
                    attempt = self.made,
                    "shutdown during the wait before sending again: the call is given up"
                );
                return Next::GiveUp(error);
            }
            _ = tokio::time::sleep(wait) => {}
        }
        self.made += 1;
        let lost = self.idempotence == Idempotence::NotIdempotent && error.maybe_applied();
        if lost {
            Next::AgainAfterLoss(error)
        } else {
            Next::Again
        }
    }

    /// One warning and one count per repeat.
    fn announce(&self, error: &RemoteError, wait: Duration) {
        let api = self.policy.api.as_str();
        crate::metrics::http_retry(api);
        tracing::warn!(
            api,
            operation = %self.operation,
            attempt = self.made,
            max_retries = self.policy.max_retries(),
            error = %error,
            retry_in_ms = wait.as_millis() as u64,
            "transient failure, retrying"
        );
    }

    fn exhausted(&self, error: &RemoteError) {
        if self.made > 1 {
            tracing::error!(
                api = self.policy.api.as_str(),
                operation = %self.operation,
                attempts = self.made,
                error = %error,
                "retries exhausted"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    //! On paused time: each test sees exactly when every attempt of one
    //! call was made and how the call ended.

    use super::*;
    use crate::remote::{ErrorKind, parse_retry_after};
    use tokio::time::Instant;

    const FIRST: Duration = Duration::from_millis(200);

    /// A policy whose jitter always draws its maximum, so that every delay
    /// is the planned one.
    fn policy(api: Api, max_retries: u32) -> ResendPolicy {
        ResendPolicy::new(api, max_retries, FIRST).with_jitter(|| 1.0)
    }

    fn failure(api: Api, kind: ErrorKind) -> RemoteError {
        RemoteError::new(api, "op", kind)
    }

    fn status(api: Api, status: u16, retry_after: Option<Duration>) -> RemoteError {
        failure(
            api,
            ErrorKind::Status {
                status,
                excerpt: String::new(),
                retry_after,
            },
        )
    }

    /// What a caller's loop saw.
    #[derive(Debug)]
    struct Trace {
        /// When each request was made, from the first.
        sent_at: Vec<Duration>,
        /// Repeats announced as coming after a lost answer.
        after_loss: usize,
        /// `None` when the last answer was a success.
        gave_up: Option<RemoteError>,
    }

    /// Drives one call whose requests answer `answers` in turn, as the
    /// write-back and the contacts job drive theirs.
    async fn drive(
        policy: &ResendPolicy,
        idempotence: Idempotence,
        answers: Vec<Result<(), RemoteError>>,
    ) -> Trace {
        let start = Instant::now();
        let mut answers = answers.into_iter();
        let mut attempts = policy.attempts("op", idempotence);
        let mut trace = Trace {
            sent_at: Vec::new(),
            after_loss: 0,
            gave_up: None,
        };
        loop {
            trace.sent_at.push(start.elapsed());
            let answer = answers.next().expect("a request the script did not expect");
            let Err(error) = answer else {
                return trace;
            };
            match attempts.after(error).await {
                Next::Again => {}
                Next::AgainAfterLoss(_) => trace.after_loss += 1,
                Next::GiveUp(error) => {
                    trace.gave_up = Some(error);
                    return trace;
                }
            }
        }
    }

    /// Asserts that the requests were made at `expected` (ms from the
    /// first, as planned), each wait at most 1 ms longer: tokio's timer
    /// rounds a deadline up to its next millisecond.
    #[track_caller]
    fn assert_sent_at(trace: &Trace, expected: &[u64]) {
        let got: Vec<u128> = trace.sent_at.iter().map(|d| d.as_millis()).collect();
        let gaps = |at: &[u128]| -> Vec<u128> { at.windows(2).map(|w| w[1] - w[0]).collect() };
        let want: Vec<u128> = expected.iter().map(|e| u128::from(*e)).collect();
        let on_time = got.len() == want.len()
            && gaps(&got)
                .iter()
                .zip(gaps(&want))
                .all(|(g, w)| *g >= w && *g <= w + 1);
        assert!(on_time, "sent at {got:?} ms, expected {expected:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_5xx_on_a_read_is_sent_again_after_200_then_400_ms_and_given_up_after_max_retries_plus_one()
     {
        // Arrange: every answer a 503, two repeats allowed.
        let policy = policy(Api::Crm, 2);
        let answers = vec![Err(status(Api::Crm, 503, None)); 3];

        // Act
        let trace = drive(&policy, Idempotence::Idempotent, answers).await;

        // Assert: three requests, 200 ms then 400 ms apart, then the 503.
        assert_sent_at(&trace, &[0, 200, 600]);
        assert_eq!(trace.after_loss, 0);
        assert!(matches!(
            trace.gave_up.unwrap().kind,
            ErrorKind::Status { status: 503, .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_is_sent_again_after_the_first_delay_and_a_success_ends_the_call() {
        let policy = policy(Api::Edm, 5);
        let answers = vec![Err(failure(Api::Edm, ErrorKind::Timeout)), Ok(())];

        let trace = drive(&policy, Idempotence::Idempotent, answers).await;

        assert_sent_at(&trace, &[0, 200]);
        assert!(trace.gave_up.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_delays_double_up_to_thirty_seconds() {
        let policy = policy(Api::Crm, 10);
        let mut answers = vec![Err(failure(Api::Crm, ErrorKind::Timeout)); 9];
        answers.push(Ok(()));

        let trace = drive(&policy, Idempotence::Idempotent, answers).await;

        assert_sent_at(
            &trace,
            &[0, 200, 600, 1400, 3000, 6200, 12600, 25400, 51000, 81000],
        );
    }

    #[tokio::test(start_paused = true)]
    async fn full_jitter_draws_each_delay_below_the_planned_one() {
        let policy = ResendPolicy::new(Api::Crm, 2, FIRST).with_jitter(|| 0.25);
        let answers = vec![Err(failure(Api::Crm, ErrorKind::Timeout)); 3];

        let trace = drive(&policy, Idempotence::Idempotent, answers).await;

        assert_sent_at(&trace, &[0, 50, 150]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_add_batch_answer_is_sent_again_only_as_a_repeat_after_loss() {
        // Arrange: the add's answer is lost (502 after it took effect).
        let policy = policy(Api::Edm, 2);
        let answers = vec![Err(status(Api::Edm, 502, None)), Ok(())];

        // Act
        let trace = drive(&policy, Idempotence::NotIdempotent, answers).await;

        // Assert: the caller was told to check before the second request.
        assert_sent_at(&trace, &[0, 200]);
        assert_eq!(trace.after_loss, 1);
        assert!(trace.gave_up.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_contact_history_answer_is_repeated_at_most_max_retries_times() {
        let policy = policy(Api::Crm, 2);
        let answers = vec![Err(failure(Api::Crm, ErrorKind::Timeout)); 3];

        let trace = drive(&policy, Idempotence::NotIdempotent, answers).await;

        assert_sent_at(&trace, &[0, 200, 600]);
        assert_eq!(trace.after_loss, 2, "each repeat announced as after a loss");
        assert_eq!(trace.gave_up.unwrap().kind, ErrorKind::Timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_of_every_kind_draw_on_one_budget_of_max_retries_plus_one_requests() {
        // Arrange: a refused connection (not sent), a lost answer, a 429 —
        // then answers the call must never reach.
        let policy = policy(Api::Edm, 2);
        let answers = vec![
            Err(failure(Api::Edm, ErrorKind::Connect("refused".into()))),
            Err(status(Api::Edm, 502, None)),
            Err(status(Api::Edm, 429, None)),
        ];

        // Act
        let trace = drive(&policy, Idempotence::NotIdempotent, answers).await;

        // Assert
        assert_eq!(trace.sent_at.len(), 3);
        assert_eq!(trace.after_loss, 1, "only the repeat after the 502");
        assert!(matches!(
            trace.gave_up.unwrap().kind,
            ErrorKind::Status { status: 429, .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_waits_its_retry_after_seconds() {
        let policy = policy(Api::Edm, 2);
        let answers = vec![
            Err(status(Api::Edm, 429, Some(Duration::from_secs(7)))),
            Ok(()),
        ];

        let trace = drive(&policy, Idempotence::NotIdempotent, answers).await;

        assert_sent_at(&trace, &[0, 7000]);
        assert_eq!(trace.after_loss, 0, "a 429 was not carried out");
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_waits_until_its_retry_after_http_date_and_at_most_five_minutes() {
        // Arrange: one answer asks for 90 s by date, the next for two hours.
        // Whole seconds, as an HTTP-date carries them.
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let now = std::time::UNIX_EPOCH + Duration::from_secs(secs);
        let in_90_s = httpdate::fmt_http_date(now + Duration::from_secs(90));
        let in_2_h = httpdate::fmt_http_date(now + Duration::from_secs(7200));
        let policy = policy(Api::Crm, 2);
        let answers = vec![
            Err(status(Api::Crm, 429, parse_retry_after(&in_90_s, now))),
            Err(status(Api::Crm, 429, parse_retry_after(&in_2_h, now))),
            Ok(()),
        ];

        // Act
        let trace = drive(&policy, Idempotence::Idempotent, answers).await;

        // Assert
        assert_sent_at(&trace, &[0, 90_000, 390_000]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_during_a_wait_gives_the_call_up_at_once_without_another_request() {
        // Arrange: the server asks for a minute; the shutdown comes after 1 s.
        let shutdown = CancellationToken::new();
        let policy = policy(Api::Edm, 5).with_shutdown(shutdown.clone());
        let answers = vec![
            Err(status(Api::Edm, 503, Some(Duration::from_secs(60)))),
            Ok(()),
        ];
        let start = Instant::now();
        let cancel = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            shutdown.cancel();
        };

        // Act
        let (trace, ()) = tokio::join!(drive(&policy, Idempotence::NotIdempotent, answers), cancel);

        // Assert
        assert_sent_at(&trace, &[0]);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert!(matches!(
            trace.gave_up.unwrap().kind,
            ErrorKind::Status { status: 503, .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_failure_is_given_up_at_once() {
        let policy = policy(Api::Edm, 5);
        let refused = ErrorKind::Rejected {
            code: "-3".into(),
            message: "invalid".into(),
        };
        let answers = vec![Err(failure(Api::Edm, refused))];

        let trace = drive(&policy, Idempotence::NotIdempotent, answers).await;

        assert_sent_at(&trace, &[0]);
        assert!(trace.gave_up.is_some());
    }
}
