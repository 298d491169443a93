//! The project's own fake CRM and EDM: stateful HTTP servers on loopback
//! that follow docs/remote-apis.md — auth checks, paging, the `ml_addr` line format, XML
//! that looks like the documents (declaration, indentation, CDATA, and the
//! documented quirks `</ fullname >` and `</aillist>`). They power `demo`,
//! the integration tests and the benchmark.
//!
//! Why one file over 600 lines: the fault model (armed faults, seeded
//! chaos, the request log) shared by both fake servers, with its tests.
//!
//! A [`Sandbox`] owns both servers; its handles seed and mutate data, read
//! back EDM state and the request log, and inject faults.

mod crm;
mod edm;
pub mod shapes;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use crm::{ContactRecord, CrmHandle, PageFault};
pub use edm::{EdmHandle, SandboxAddress, SandboxCampaign};

/// The CRM token the sandbox accepts.
pub const TOKEN: &str = "sandbox-crm-token-5f2c9e";
/// The EDM username the sandbox accepts.
pub const EDM_USER: &str = "demo";
/// The EDM password (plain) whose MD5 the sandbox accepts.
pub const EDM_PASSWORD: &str = "sandbox-edm-password-81d4";
/// The sandbox's reseller account (`service.php`), whose customer is
/// [`EDM_USER`].
pub const RESELLER_USER: &str = "reseller";
/// Its password (sent as MD5, like the user API's).
pub const RESELLER_PASSWORD: &str = "sandbox-reseller-password-3e7a";

/// Locks a mutex, recovering the data if a panicking thread poisoned it
/// (the sandbox's state stays usable for the test that observes it).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Which fake server a request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Crm,
    Edm,
}

/// One request as the sandbox saw it; secrets are not kept.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedRequest {
    pub server: Server,
    /// `Customer/GetAllList`, `ml-addr-add`, …
    pub operation: String,
    /// Every parameter except `token`, `username` and `password`.
    pub params: BTreeMap<String, String>,
    /// The HTTP status answered.
    pub status: u16,
    /// Whether the request was carried out (also when its answer was then
    /// lost or cut short).
    pub applied: bool,
    /// The request's `User-Agent` (`crm-edm-sync/VERSION (instance ID)`):
    /// which instance sent it.
    pub user_agent: String,
}

tokio::task_local! {
    /// The `User-Agent` of the request being handled, set around each
    /// handler by [`serve`]'s middleware, read by `record`.
    static USER_AGENT: String;
}

/// Runs the handler with the request's `User-Agent` at hand for `record`.
async fn remember_user_agent(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let agent = request
        .headers()
        .get(axum::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    USER_AGENT.scope(agent, next.run(request)).await
}

impl LoggedRequest {
    /// EDM operations that change a list.
    pub fn is_edm_write(&self) -> bool {
        self.server == Server::Edm
            && matches!(
                self.operation.as_str(),
                "ml-addr-add"
                    | "ml-addr-edit"
                    | "ml-addr-del"
                    | "ml-unsub"
                    | "ml-sub"
                    | "ml-addr-empty"
            )
    }
}

/// A fault to inject into the next `remaining` requests of an operation.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Carry the request out, then answer 502 with an HTML page: the answer
    /// is lost, the effect is not.
    LoseAnswer,
    /// Answer this status with an HTML page, without carrying it out.
    Status(u16),
    /// Answer 200 with an HTML page, without carrying it out.
    HtmlOk,
    /// Wait this long before handling the request.
    Delay(Duration),
    /// Answer 200 with these bytes, without carrying the request out.
    Body(Vec<u8>),
    /// Carry the request out, then send half the answer and drop the
    /// connection.
    Truncate,
    /// Wait this long before handling the request (past the client's
    /// timeout, the client gives up and the request is not carried out).
    Hang(Duration),
    /// Answer 429 with `Retry-After: secs`, without carrying it out.
    TooMany(u64),
    /// Answer 429 with `Retry-After` as an HTTP-date this many seconds
    /// ahead, without carrying it out.
    TooManyUntil(u64),
    /// Carry the request out at once, then hold the answer this long: a
    /// client killed meanwhile never learns that it took effect.
    SlowAnswer(Duration),
}

/// Random faults for every request of an operation, drawn per request
/// from the seed and the request itself, so a failing run can be repeated
/// whatever order concurrent requests arrive in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chaos {
    /// Answer 500/502/503 without carrying it out.
    pub p_5xx: f64,
    /// Hang for `hang_for` first.
    pub p_hang: f64,
    pub hang_for: Duration,
    /// Wait `delay` first.
    pub p_delay: f64,
    pub delay: Duration,
    /// Carry it out, then cut the answer short.
    pub p_truncate: f64,
    /// Answer 200 with an HTML page.
    pub p_html: f64,
    /// Carry it out, then answer 502.
    pub p_lose_answer: f64,
}

impl Chaos {
    fn draw(&self, rng: &mut fastrand::Rng) -> Option<Fault> {
        let r = rng.f64();
        let mut edge = 0.0;
        let mut pick = |p: f64| {
            edge += p;
            r < edge
        };
        if pick(self.p_5xx) {
            Some(Fault::Status([500, 502, 503][rng.usize(..3)]))
        } else if pick(self.p_hang) {
            Some(Fault::Hang(self.hang_for))
        } else if pick(self.p_delay) {
            Some(Fault::Delay(self.delay))
        } else if pick(self.p_truncate) {
            Some(Fault::Truncate)
        } else if pick(self.p_html) {
            Some(Fault::HtmlOk)
        } else if pick(self.p_lose_answer) {
            Some(Fault::LoseAnswer)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone)]
struct Armed {
    operation: String,
    fault: Fault,
    remaining: u32,
}

/// The request log and the armed faults, shared by both servers.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    log: Mutex<Vec<LoggedRequest>>,
    faults: Mutex<Vec<Armed>>,
    /// Per operation: requests being handled now, and the most at once.
    in_flight: Mutex<BTreeMap<String, (usize, usize)>>,
    /// Random faults per operation (`*`: every operation), the seed, and
    /// how many times each request (operation and parameters) was seen.
    chaos: Mutex<ChaosState>,
    /// Answer in the shapes real servers send (see [`shapes`]).
    pub(crate) real_shapes: std::sync::atomic::AtomicBool,
}

/// The chaos profiles and what their draws depend on.
#[derive(Debug, Default)]
struct ChaosState {
    profiles: BTreeMap<String, Chaos>,
    seed: u64,
    /// Per request key: how many times it was drawn for.
    seen: BTreeMap<String, u64>,
}

impl Shared {
    pub(crate) fn real_shapes(&self) -> bool {
        self.real_shapes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl ChaosState {
    /// The fault for one request: drawn from a generator seeded by the
    /// seed, the request's key (operation and parameters) and how many
    /// times that same request was seen before — not by the order in
    /// which requests arrive — so a seed gives every request the same
    /// fate however concurrent requests interleave, and a retry of a
    /// request draws anew.
    fn draw(&mut self, operation: &str, params: &BTreeMap<String, String>) -> Option<Fault> {
        let profile = self
            .profiles
            .get(operation)
            .or_else(|| self.profiles.get("*"))?
            .clone();
        let key = format!("{operation}?{params:?}");
        let n = self.seen.entry(key.clone()).or_insert(0);
        *n += 1;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&(self.seed, key, *n), &mut hasher);
        let mut rng = fastrand::Rng::with_seed(std::hash::Hasher::finish(&hasher));
        profile.draw(&mut rng)
    }
}

/// Counts a request as in flight until dropped.
pub(crate) struct InFlight<'a> {
    shared: &'a Shared,
    operation: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(entry) = lock(&self.shared.in_flight).get_mut(&self.operation) {
            entry.0 = entry.0.saturating_sub(1);
        }
    }
}

impl Shared {
    /// Takes the fault armed for `operation`, else draws a random one for
    /// this request (see [`ChaosState::draw`]).
    pub(crate) fn take_fault(
        &self,
        operation: &str,
        params: &BTreeMap<String, String>,
    ) -> Option<Fault> {
        self.take_armed(operation)
            .or_else(|| lock(&self.chaos).draw(operation, params))
    }

    fn take_armed(&self, operation: &str) -> Option<Fault> {
        let mut faults = lock(&self.faults);
        let pos = faults
            .iter()
            .position(|a| a.operation == operation && a.remaining > 0)?;
        faults[pos].remaining -= 1;
        let fault = faults[pos].fault.clone();
        if faults[pos].remaining == 0 {
            faults.remove(pos);
        }
        Some(fault)
    }

    pub(crate) fn enter(&self, operation: &str) -> InFlight<'_> {
        let mut map = lock(&self.in_flight);
        let entry = map.entry(operation.to_string()).or_insert((0, 0));
        entry.0 += 1;
        entry.1 = entry.1.max(entry.0);
        InFlight {
            shared: self,
            operation: operation.to_string(),
        }
    }

    pub(crate) fn record(
        &self,
        server: Server,
        operation: &str,
        params: &BTreeMap<String, String>,
        status: u16,
        applied: bool,
    ) {
        let params = params
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "token" | "username" | "password"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        lock(&self.log).push(LoggedRequest {
            server,
            operation: operation.to_string(),
            params,
            status,
            applied,
            user_agent: USER_AGENT.try_with(Clone::clone).unwrap_or_default(),
        });
    }
}

/// Both fake servers, running until dropped.
pub struct Sandbox {
    /// `crm.base_url` for the daemon.
    pub crm_url: String,
    /// `edm.base_url` for the daemon.
    pub edm_url: String,
    pub crm: CrmHandle,
    pub edm: EdmHandle,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn serve(router: axum::Router) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let router = router.layer(axum::middleware::from_fn(remember_user_agent));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "sandbox server stopped");
        }
    });
    Ok((addr, task))
}

impl Sandbox {
    /// Starts both servers on loopback, on ports the OS picks, with no data
    /// (EDM has no lists yet).
    pub async fn start() -> anyhow::Result<Sandbox> {
        let shared = Arc::new(Shared::default());
        shared
            .real_shapes
            .store(shapes::from_env(), std::sync::atomic::Ordering::SeqCst);
        let crm = CrmHandle::new(shared.clone());
        let edm = EdmHandle::new(shared.clone());
        let (crm_addr, crm_task) = serve(crm.router()).await?;
        let (edm_addr, edm_task) = serve(edm.router()).await?;
        Ok(Sandbox {
            crm_url: format!("http://{crm_addr}"),
            edm_url: format!("http://{edm_addr}/mm-ms/api"),
            crm,
            edm,
            shared,
            tasks: vec![crm_task, edm_task],
        })
    }

    /// The EDM base URL under which the sandbox takes HTTP Basic auth
    /// (`edm.auth = "basic"`), beside [`Sandbox::edm_url`] (query auth).
    pub fn edm_basic_url(&self) -> String {
        self.edm_url.replace("/mm-ms/api", "/mm-ms/apinew")
    }

    /// From now on, both servers answer in the shapes real servers send
    /// (`true`) or as the documents show (`false`); see [`shapes`]. A
    /// sandbox starts in real shapes when `CRM_EDM_SYNC_SANDBOX_SHAPES=real`.
    pub fn real_shapes(&self, on: bool) {
        self.shared
            .real_shapes
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the servers answer in the shapes real servers send.
    pub fn in_real_shapes(&self) -> bool {
        self.shared.real_shapes()
    }

    /// Arms `fault` for the next `times` requests of `operation`
    /// (`Customer/GetAllList`, `ml-addr-add`, …).
    pub fn inject(&self, operation: &str, fault: Fault, times: u32) {
        lock(&self.shared.faults).push(Armed {
            operation: operation.to_string(),
            fault,
            remaining: times,
        });
    }

    /// Disarms every fault, armed or random.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
        lock(&self.shared.chaos).profiles.clear();
    }

    /// Random faults for every request of `operation` (`*` for all),
    /// drawn from a generator seeded with `seed`.
    pub fn chaos(&self, operation: &str, chaos: Chaos, seed: u64) {
        let mut c = lock(&self.shared.chaos);
        c.profiles.insert(operation.to_string(), chaos);
        c.seed = seed;
        c.seen.clear();
    }

    /// The most requests to `operation` that were handled at once.
    pub fn max_in_flight(&self, operation: &str) -> usize {
        lock(&self.shared.in_flight)
            .get(operation)
            .map(|e| e.1)
            .unwrap_or(0)
    }

    /// Requests to `operation` being handled now.
    pub fn in_flight(&self, operation: &str) -> usize {
        lock(&self.shared.in_flight)
            .get(operation)
            .map(|e| e.0)
            .unwrap_or(0)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        lock(&self.shared.log).clone()
    }

    /// Forgets the request log (to count one run's requests).
    pub fn clear_requests(&self) {
        lock(&self.shared.log).clear();
    }

    /// Requests to `operation` so far.
    pub fn count(&self, operation: &str) -> usize {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.operation == operation)
            .count()
    }

    /// EDM writes so far.
    pub fn edm_writes(&self) -> usize {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.is_edm_write())
            .count()
    }

    /// A config file's text that points the daemon at this sandbox.
    pub fn config_toml(&self, database_url: &str) -> String {
        format!(
            r#"[crm]
base_url = "{crm}"
token = "{token}"
timeout_secs = 5
max_retries = 2

[edm]
base_url = "{edm}"
username = "{user}"
password = "{password}"
timeout_secs = 5
max_retries = 2

[database]
url = "{db}"
"#,
            crm = self.crm_url,
            token = TOKEN,
            edm = self.edm_url,
            user = EDM_USER,
            password = EDM_PASSWORD,
            db = database_url,
        )
    }
}

/// What happens to the answer of a request that is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum After {
    Answer,
    /// Answer 502 ([`lost`]).
    Lose,
    /// Send half of it and drop the connection ([`truncated`]).
    Truncate,
    /// Answer in full, but only after this long.
    Slow(Duration),
}

/// What the fault (if any) means for a request about to be handled.
pub(crate) enum Before {
    /// Carry it out, then answer as `After` says.
    Proceed(After),
    /// The fault answered already; do not carry it out.
    Answered(axum::response::Response),
}

/// Takes the fault armed for `operation`: waits out a delay, or answers
/// for a fault that does not let the request through (recording it).
pub(crate) async fn before(
    shared: &Shared,
    server: Server,
    operation: &str,
    p: &BTreeMap<String, String>,
) -> Before {
    use axum::response::IntoResponse;
    let fault = shared.take_fault(operation, p);
    match fault {
        Some(Fault::Delay(d)) | Some(Fault::Hang(d)) => {
            // If the client gives up meanwhile, the connection closes and
            // this handler is dropped: the request is not carried out.
            tokio::time::sleep(d).await;
            Before::Proceed(After::Answer)
        }
        Some(Fault::LoseAnswer) => Before::Proceed(After::Lose),
        Some(Fault::Truncate) => Before::Proceed(After::Truncate),
        Some(Fault::SlowAnswer(d)) => Before::Proceed(After::Slow(d)),
        Some(Fault::Status(code)) => {
            Before::Answered(html_error(shared, server, operation, p, code))
        }
        Some(Fault::HtmlOk) => Before::Answered(html_error(shared, server, operation, p, 200)),
        Some(Fault::TooMany(secs)) => {
            shared.record(server, operation, p, 429, false);
            Before::Answered(
                (
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", secs.to_string())],
                    "slow down",
                )
                    .into_response(),
            )
        }
        Some(Fault::TooManyUntil(secs)) => {
            shared.record(server, operation, p, 429, false);
            let at = std::time::SystemTime::now() + Duration::from_secs(secs);
            Before::Answered(
                (
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", httpdate::fmt_http_date(at))],
                    "slow down",
                )
                    .into_response(),
            )
        }
        Some(Fault::Body(body)) => {
            shared.record(server, operation, p, 200, false);
            Before::Answered((axum::http::StatusCode::OK, body).into_response())
        }
        None => Before::Proceed(After::Answer),
    }
}

/// Finishes a request that was carried out: records it and answers as
/// `after` says.
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish(
    shared: &Shared,
    server: Server,
    operation: &str,
    p: &BTreeMap<String, String>,
    after: After,
    status: axum::http::StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match after {
        After::Answer => {
            shared.record(server, operation, p, status.as_u16(), true);
            (status, [("content-type", content_type)], body).into_response()
        }
        After::Lose => {
            shared.record(server, operation, p, 502, true);
            html_response(502)
        }
        After::Truncate => {
            shared.record(server, operation, p, status.as_u16(), true);
            let half = body[..body.len() / 2].to_vec();
            let total = body.len();
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
                Ok(half),
                Err(std::io::Error::other("sandbox cut the answer short")),
            ];
            axum::response::Response::builder()
                .status(status)
                .header("content-type", content_type)
                .header("content-length", total.to_string())
                .body(axum::body::Body::from_stream(futures::stream::iter(chunks)))
                .unwrap_or_else(|_| html_response(500))
        }
        After::Slow(d) => {
            shared.record(server, operation, p, status.as_u16(), true);
            let total = body.len();
            let held = futures::stream::once(async move {
                tokio::time::sleep(d).await;
                Ok::<_, std::io::Error>(body)
            });
            axum::response::Response::builder()
                .status(status)
                .header("content-type", content_type)
                .header("content-length", total.to_string())
                .body(axum::body::Body::from_stream(held))
                .unwrap_or_else(|_| html_response(500))
        }
    }
}

fn html_error(
    shared: &Shared,
    server: Server,
    operation: &str,
    p: &BTreeMap<String, String>,
    status: u16,
) -> axum::response::Response {
    shared.record(server, operation, p, status, false);
    html_response(status)
}

fn html_response(status: u16) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::BAD_GATEWAY),
        [("content-type", "text/html")],
        html_page(status),
    )
        .into_response()
}

/// Parameters of a request: the query string, then the form body (a body
/// field wins).
pub(crate) fn params(query: Option<&str>, body: &[u8]) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    if let Some(q) = query {
        for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
            out.insert(k.into_owned(), v.into_owned());
        }
    }
    for (k, v) in url::form_urlencoded::parse(body) {
        out.insert(k.into_owned(), v.into_owned());
    }
    out
}

/// An HTML error page, as a proxy in front of a real API would send.
fn html_page(status: u16) -> String {
    format!(
        "<!DOCTYPE html>\n<html><head><title>{status} Error</title></head><body><h1>{status}</h1><p>upstream error</p></body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(customer: u32) -> BTreeMap<String, String> {
        [("customer_id".to_string(), customer.to_string())].into()
    }

    fn state(seed: u64) -> ChaosState {
        let mut s = ChaosState {
            seed,
            ..Default::default()
        };
        s.profiles.insert(
            "*".into(),
            Chaos {
                p_5xx: 0.5,
                ..Default::default()
            },
        );
        s
    }

    #[test]
    fn a_seed_gives_each_request_the_same_fault_whatever_the_arrival_order() {
        // Arrange: the same 40 requests, each sent twice (a retry), in two
        // different orders.
        let forward: Vec<u32> = (1..=40).chain(1..=40).collect();
        let mut shuffled = forward.clone();
        fastrand::Rng::with_seed(3).shuffle(&mut shuffled[..40]);
        fastrand::Rng::with_seed(4).shuffle(&mut shuffled[40..]);

        // Act
        let fates = |order: &[u32]| {
            let mut s = state(99);
            let mut out: BTreeMap<(u32, usize), bool> = BTreeMap::new();
            for &c in order {
                let attempt = out.keys().filter(|(k, _)| *k == c).count();
                let fault = s.draw("LinkMan/GetLinkManList", &params(c));
                out.insert((c, attempt), fault.is_some());
            }
            out
        };
        let a = fates(&forward);
        let b = fates(&shuffled);

        // Assert: same fates; some requests failed and some did not; a
        // retry draws anew.
        assert_eq!(a, b);
        let failed = a.values().filter(|f| **f).count();
        assert!(failed > 10 && failed < 70, "{failed} of 80");
        assert!((1..=40).any(|c| a[&(c, 0)] != a[&(c, 1)]));
        assert_ne!(fates(&forward), {
            let mut s = state(100);
            let mut out = BTreeMap::new();
            for (i, &c) in forward.iter().enumerate() {
                out.insert(
                    (c, usize::from(i >= 40)),
                    s.draw("LinkMan/GetLinkManList", &params(c)).is_some(),
                );
            }
            out
        });
    }
}
