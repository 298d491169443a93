//! What both remote clients share: the error type that knows whether a
//! failure is worth retrying, secret redaction, and one retrying HTTP call.
//!
//! Why one file over 600 lines: the error classification, the retry loop
//! and the request limits decide together whether a call is repeated;
//! a third is their tests. The pager is in `remote/pager.rs`.
//!
//! Which failures are transient follows rule 10: connect errors, timeouts,
//! HTTP 408/429/5xx and a 2xx body that cannot be parsed; everything else
//! is permanent. How they are repeated is the one policy in
//! `remote/resend.rs`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub use crate::redact::{REDACTED, Redactor};
pub use pager::Pager;
pub use resend::{Attempts, Idempotence, Next, ResendPolicy, full_jitter};
pub use tls::client_builder;

mod pager;
mod resend;
mod tls;

/// Which remote system a call went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    Crm,
    Edm,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Crm => "crm",
            Api::Edm => "edm",
        }
    }
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Api::Crm => "CRM",
            Api::Edm => "EDM",
        })
    }
}

/// What went wrong with one remote call.
#[derive(Debug, Clone, PartialEq)]
pub enum ErrorKind {
    /// No connection was made; the request was not sent.
    Connect(String),
    /// No answer within the timeout; the request may have taken effect.
    Timeout,
    /// The connection broke during the exchange (including a truncated
    /// body); the request may have taken effect.
    Transport(String),
    /// A non-2xx HTTP status.
    Status {
        status: u16,
        excerpt: String,
        retry_after: Option<Duration>,
    },
    /// The server refused the credentials; `credential` names the setting.
    Auth {
        credential: &'static str,
        detail: String,
    },
    /// A 2xx body that could not be read as the documented format.
    Malformed { detail: String, excerpt: String },
    /// The API answered, and said no (EDM status code, CRM `value:false`,
    /// a CRM object without `value`).
    Rejected { code: String, message: String },
    /// The body was larger than the client accepts.
    TooLarge { limit: usize },
}

/// The settings to check when EDM refuses the credentials.
pub const EDM_CREDENTIALS: &str = "edm.username/edm.password/edm.auth";

/// A failed remote call: which API, which operation, what happened. Its text
/// never contains a URL or a secret.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{api} {operation}: {kind}")]
pub struct RemoteError {
    pub api: Api,
    pub operation: String,
    pub kind: ErrorKind,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Connect(d) => write!(f, "cannot connect: {d}"),
            ErrorKind::Timeout => write!(f, "no answer before the timeout"),
            ErrorKind::Transport(d) => write!(f, "connection failed during the exchange: {d}"),
            ErrorKind::Status {
                status, excerpt, ..
            } => write!(f, "HTTP status {status}, body: {excerpt:?}"),
            ErrorKind::Auth { credential, detail } => {
                write!(f, "credentials rejected, check `{credential}`: {detail}")
            }
            ErrorKind::Malformed { detail, excerpt } => {
                write!(f, "unreadable answer ({detail}), body: {excerpt:?}")
            }
            ErrorKind::Rejected { code, message } => {
                write!(f, "refused with code {code:?}: {message}")
            }
            ErrorKind::TooLarge { limit } => write!(f, "answer larger than {limit} bytes"),
        }
    }
}

impl RemoteError {
    pub fn new(api: Api, operation: impl Into<String>, kind: ErrorKind) -> Self {
        RemoteError {
            api,
            operation: operation.into(),
            kind,
        }
    }

    /// Transient: worth another attempt (rule 10).
    pub fn is_retriable(&self) -> bool {
        match &self.kind {
            ErrorKind::Connect(_)
            | ErrorKind::Timeout
            | ErrorKind::Transport(_)
            | ErrorKind::Malformed { .. } => true,
            ErrorKind::Status { status, .. } => {
                *status == 408 || *status == 429 || (500..600).contains(status)
            }
            ErrorKind::Auth { .. } | ErrorKind::Rejected { .. } | ErrorKind::TooLarge { .. } => {
                false
            }
        }
    }

    /// Whether the server may have carried out the request although the
    /// client saw a failure: the answer was lost, not the request. For such
    /// errors a non-idempotent call must be checked before it is re-sent.
    pub fn maybe_applied(&self) -> bool {
        match &self.kind {
            ErrorKind::Connect(_) => false,
            ErrorKind::Status { status, .. } => *status >= 500,
            ErrorKind::Timeout
            | ErrorKind::Transport(_)
            | ErrorKind::Malformed { .. }
            | ErrorKind::TooLarge { .. } => true,
            // An EDM error code for a batch does not say which lines
            // failed; a CRM `value:false` says plainly that nothing was
            // written.
            ErrorKind::Rejected { .. } => self.api == Api::Edm,
            ErrorKind::Auth { .. } => false,
        }
    }

    pub fn is_auth(&self) -> bool {
        matches!(self.kind, ErrorKind::Auth { .. })
    }

    /// The API's own refusal — an EDM error code, a CRM `value:false` —
    /// as `(code, message)`: the request was understood and said no.
    pub fn refusal(&self) -> Option<(&str, &str)> {
        match &self.kind {
            ErrorKind::Rejected { code, message } => Some((code, message)),
            _ => None,
        }
    }

    /// What the server asked for in `Retry-After`, if anything.
    pub fn retry_after(&self) -> Option<Duration> {
        match &self.kind {
            ErrorKind::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The largest body a client reads (issue: "a body over a size limit").
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Requests per second allowed to one API (governor's direct limiter).
type Limiter = governor::DefaultDirectRateLimiter;

/// How hard a client may press on its API.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub timeout: Duration,
    pub max_retries: u32,
    /// Requests in flight at once.
    pub in_flight: usize,
    /// Requests started per second, if limited.
    pub per_second: Option<u32>,
}

impl Limits {
    /// The CRM client's limits: every CRM call shares `crm.concurrency`.
    pub fn of_crm(crm: &crate::config::CrmSettings) -> Limits {
        Limits {
            timeout: crm.timeout,
            max_retries: crm.max_retries,
            in_flight: crm.concurrency,
            per_second: crm.max_requests_per_sec,
        }
    }

    /// The EDM client's limits.
    pub fn of_edm(edm: &crate::config::EdmSettings) -> Limits {
        Limits {
            timeout: edm.timeout,
            max_retries: edm.max_retries,
            in_flight: edm.concurrency,
            per_second: edm.max_requests_per_sec,
        }
    }
}

/// One API's HTTP caller: a shared `reqwest::Client`, the resend policy,
/// the rate and in-flight limits, and the redactor.
#[derive(Clone)]
pub struct HttpCaller {
    pub(crate) client: reqwest::Client,
    pub(crate) api: Api,
    pub(crate) max_body: usize,
    pub(crate) redactor: Arc<Redactor>,
    policy: ResendPolicy,
    in_flight: Arc<tokio::sync::Semaphore>,
    limiter: Option<Arc<Limiter>>,
    /// Sent with every request: `crm-edm-sync/VERSION (instance ID)`.
    user_agent: Arc<str>,
}

impl fmt::Debug for HttpCaller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCaller")
            .field("api", &self.api)
            .field("max_retries", &self.policy.max_retries())
            .field("rate_limited", &self.limiter.is_some())
            .finish()
    }
}

/// A `Retry-After` value (RFC 9110 §10.2.3): delay-seconds, or an
/// HTTP-date, read as the time left until then (zero when it has passed).
/// `None` when it is neither.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The first delay between two attempts of a call, outside tests.
pub const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);

impl HttpCaller {
    pub fn new(api: Api, limits: Limits, redactor: Arc<Redactor>) -> anyhow::Result<Self> {
        let client = tls::Clients::shared().with_timeout(limits.timeout)?;
        let limiter = limits
            .per_second
            .and_then(std::num::NonZeroU32::new)
            .map(|n| {
                Arc::new(governor::RateLimiter::direct(governor::Quota::per_second(
                    n,
                )))
            });
        Ok(HttpCaller {
            client,
            api,
            policy: ResendPolicy::new(api, limits.max_retries, FIRST_RETRY_DELAY),
            max_body: MAX_BODY_BYTES,
            redactor,
            in_flight: Arc::new(tokio::sync::Semaphore::new(limits.in_flight.max(1))),
            limiter,
            user_agent: Arc::from(crate::instance::default_user_agent()),
        })
    }

    /// Names this instance in every request's `User-Agent`.
    pub fn with_user_agent(mut self, user_agent: &str) -> Self {
        self.user_agent = Arc::from(user_agent);
        self
    }

    /// Lowers the largest body this caller reads (tests).
    pub fn with_max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Shortens the first backoff delay (tests and the demo use this to keep
    /// fault scenarios fast).
    pub fn with_min_delay(mut self, min_delay: Duration) -> Self {
        self.policy = self.policy.with_first_delay(min_delay);
        self
    }

    /// Gives up the waits between attempts when `shutdown` is cancelled.
    pub fn with_shutdown(mut self, shutdown: tokio_util::sync::CancellationToken) -> Self {
        self.policy = self.policy.with_shutdown(shutdown);
        self
    }

    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// How this caller's calls are repeated; callers of calls that are not
    /// idempotent drive it themselves.
    pub fn policy(&self) -> &ResendPolicy {
        &self.policy
    }

    /// Sends the request `build` makes, reads the body and hands it to
    /// `parse`. An idempotent call is repeated as the resend policy says;
    /// one that is not gets this single attempt, its caller driving the
    /// policy (only it can check what a lost answer did).
    pub async fn execute<T, B, P>(
        &self,
        operation: &str,
        idempotence: Idempotence,
        build: B,
        parse: P,
    ) -> Result<T, RemoteError>
    where
        B: Fn() -> reqwest::RequestBuilder,
        P: Fn(&[u8]) -> Result<T, RemoteError>,
    {
        let once = async || parse(&self.send_once(operation, build()).await?);
        if idempotence == Idempotence::NotIdempotent {
            return once().await;
        }
        let mut attempts = self.policy.attempts(operation, idempotence);
        loop {
            let error = match once().await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            match attempts.after(error).await {
                Next::Again | Next::AgainAfterLoss(_) => {}
                Next::GiveUp(error) => return Err(error),
            }
        }
    }

    async fn send_once(
        &self,
        operation: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<Bytes, RemoteError> {
        let err = |kind| RemoteError::new(self.api, operation, kind);
        // Held until the body is read: the in-flight limit covers the
        // whole exchange.
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| err(ErrorKind::Connect("client is shutting down".into())))?;
        if let Some(limiter) = &self.limiter {
            limiter.until_ready().await;
        }
        crate::metrics::http_request(self.api.as_str());
        let response = request
            .header(reqwest::header::USER_AGENT, &*self.user_agent)
            .send()
            .await
            .map_err(|e| err(classify(&e)))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
        if let Some(len) = response.content_length()
            && len as usize > self.max_body
        {
            return Err(err(ErrorKind::TooLarge {
                limit: self.max_body,
            }));
        }
        let body = read_limited(response, self.max_body)
            .await
            .map_err(|e| err(e.unwrap_or_else(|e| classify(&e))))?;
        if !status.is_success() {
            let excerpt = self.redactor.excerpt(&body);
            return Err(err(match (self.api, status.as_u16()) {
                (Api::Crm, 401 | 403) => ErrorKind::Auth {
                    credential: "crm.token",
                    detail: format!("HTTP status {}, body: {excerpt:?}", status.as_u16()),
                },
                (Api::Edm, 401 | 403) => ErrorKind::Auth {
                    credential: EDM_CREDENTIALS,
                    detail: format!("HTTP status {}, body: {excerpt:?}", status.as_u16()),
                },
                (_, code) => ErrorKind::Status {
                    status: code,
                    excerpt,
                    retry_after,
                },
            }));
        }
        Ok(body)
    }
}

/// Reads the body up to `limit` bytes: `Err(Ok(kind))` for an oversize
/// body, `Err(Err(e))` for a transport failure (a truncated body).
async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Bytes, Result<ErrorKind, reqwest::Error>> {
    let mut buf = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > limit {
                    return Err(Ok(ErrorKind::TooLarge { limit }));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(Bytes::from(buf)),
            Err(e) => return Err(Err(e)),
        }
    }
}

/// Maps a reqwest failure to a kind, without its URL.
fn classify(e: &reqwest::Error) -> ErrorKind {
    if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_connect() {
        ErrorKind::Connect(source_chain(e))
    } else {
        ErrorKind::Transport(source_chain(e))
    }
}

/// The error's cause chain as text, without the URL reqwest attaches.
pub fn source_chain(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut parts = Vec::new();
    let mut current: Option<&dyn Error> = e.source();
    while let Some(err) = current {
        parts.push(err.to_string());
        current = err.source();
    }
    if parts.is_empty() {
        // reqwest's own Display starts with the kind and may include the
        // URL; strip it to be sure.
        let mut text = String::from("request failed");
        if e.is_body() || e.is_decode() {
            text = "body could not be read".into();
        }
        return text;
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> RemoteError {
        RemoteError::new(
            Api::Edm,
            "op",
            ErrorKind::Status {
                status: code,
                excerpt: String::new(),
                retry_after: None,
            },
        )
    }

    #[test]
    fn transient_and_permanent_failures_follow_rule_10() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(status(code).is_retriable(), "{code}");
        }
        for code in [400, 401, 404, 410, 422] {
            assert!(!status(code).is_retriable(), "{code}");
        }
        let kinds = [
            (ErrorKind::Timeout, true),
            (ErrorKind::Connect("refused".into()), true),
            (ErrorKind::Transport("reset".into()), true),
            (
                ErrorKind::Malformed {
                    detail: "x".into(),
                    excerpt: "y".into(),
                },
                true,
            ),
            (
                ErrorKind::Rejected {
                    code: "c".into(),
                    message: "m".into(),
                },
                false,
            ),
            (
                ErrorKind::Auth {
                    credential: "crm.token",
                    detail: String::new(),
                },
                false,
            ),
        ];
        for (kind, retriable) in kinds {
            let e = RemoteError::new(Api::Crm, "op", kind.clone());
            assert_eq!(e.is_retriable(), retriable, "{kind:?}");
        }
    }

    #[test]
    fn only_unsent_requests_are_known_not_applied() {
        assert!(!RemoteError::new(Api::Edm, "op", ErrorKind::Connect("x".into())).maybe_applied());
        assert!(!status(429).maybe_applied());
        assert!(!status(408).maybe_applied());
        assert!(status(502).maybe_applied());
        assert!(RemoteError::new(Api::Edm, "op", ErrorKind::Timeout).maybe_applied());
        let rejected = ErrorKind::Rejected {
            code: "c".into(),
            message: "m".into(),
        };
        assert!(RemoteError::new(Api::Edm, "ml-addr-add", rejected.clone()).maybe_applied());
        assert!(!RemoteError::new(Api::Crm, "ContactHistory/Add", rejected).maybe_applied());
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_as_an_http_date() {
        // Arrange
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_785_000_000);
        let in_90_s = httpdate::fmt_http_date(now + Duration::from_secs(90));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(5));

        // Act / Assert
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after(&in_90_s, now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }

    #[test]
    fn full_jitter_spreads_over_zero_to_the_planned_delay_and_honours_retry_after() {
        let planned = Duration::from_secs(4);
        assert_eq!(full_jitter(planned, None, 0.0), Duration::ZERO);
        assert_eq!(full_jitter(planned, None, 0.5), Duration::from_secs(2));
        assert_eq!(full_jitter(planned, None, 1.0), planned);
        assert_eq!(
            full_jitter(planned, Some(Duration::from_secs(10)), 0.1),
            Duration::from_secs(10)
        );
        assert_eq!(
            full_jitter(planned, Some(Duration::from_secs(3600)), 0.1),
            Duration::from_secs(300)
        );
    }

    #[test]
    fn redactor_scrubs_every_secret_and_keeps_other_text() {
        let r = Redactor::new(["s3cret-token".to_string(), "0123456789abcdef".to_string()]);
        let out = r.redact("token=s3cret-token&password=0123456789abcdef&do=x");
        assert_eq!(out, "token=[REDACTED]&password=[REDACTED]&do=x");
    }

    #[test]
    fn excerpt_is_short_single_line_and_redacted() {
        let r = Redactor::new(["hunter22".to_string()]);
        let body = format!(
            "<html>\n<body>error hunter22 {}</body></html>",
            "x".repeat(1000)
        );
        let ex = r.excerpt(body.as_bytes());
        assert!(!ex.contains('\n'));
        assert!(!ex.contains("hunter22"));
        assert!(ex.chars().count() <= 161);
    }

    #[test]
    fn error_text_names_api_operation_and_cause() {
        let e = RemoteError::new(
            Api::Edm,
            "ml-addr-add",
            ErrorKind::Rejected {
                code: "add_error".into(),
                message: "bad".into(),
            },
        );
        assert_eq!(
            e.to_string(),
            "EDM ml-addr-add: refused with code \"add_error\": bad"
        );
    }
}
