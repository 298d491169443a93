//! What an operator's monitoring reads in daemon mode, on `http.listen`:
//!
//! - `GET /healthz`: 200 `{"status":"ok",…}` when, for every tenant, the
//!   state database answers and takes writes (the runs' own records got
//!   through) and the last finished contacts and write-back runs succeeded
//!   (or none ran yet), and no tenant file is refused; 503
//!   `{"status":"failing","role":…,"failing_tenants":[…],"reason":…}`
//!   otherwise.
//! - `GET /metrics`: Prometheus text — runs by job and outcome, operations
//!   by kind and outcome, HTTP requests and retries by API, the last
//!   success per job, pending operations.
//!
//! The metrics themselves are named and recorded in [`crate::metrics`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::state::{Store, Writable};
use crate::stored_enums::Job;

/// What `/healthz` knows of one tenant this process serves.
#[derive(Clone)]
pub(crate) struct TenantHealth {
    /// A reader beside the tenant's jobs' store.
    store: Store,
    /// The jobs' store's [`Writable`].
    writable: Writable,
    /// Whether this instance holds the tenant (runs its jobs).
    pub(crate) active: Arc<AtomicBool>,
    /// The tenant's `database.url`: on PostgreSQL its runs are read on the
    /// lock connection, no pool of the tenant's opened for it.
    url: secrecy::SecretString,
}

impl TenantHealth {
    pub(crate) fn new(
        store: Store,
        writable: Writable,
        url: secrecy::SecretString,
    ) -> TenantHealth {
        TenantHealth {
            store,
            writable,
            active: Arc::new(AtomicBool::new(false)),
            url,
        }
    }

    /// Each job's last finished run: how it ended and its error.
    async fn last_runs(&self) -> Result<Vec<crate::lock::LastRun>, String> {
        if let Some(read) = crate::lock::last_finished(&self.url).await {
            return read.map_err(|e| format!("cannot read runs: {e:#}"));
        }
        self.store
            .connection()
            .ping()
            .await
            .map_err(|e| format!("state database unreachable: {e}"))?;
        Ok(self
            .store
            .last_finished_runs()
            .await
            .map_err(|e| format!("cannot read runs: {e:#}"))?
            .into_iter()
            .map(|r| (r.job, r.status, r.error))
            .collect())
    }
}

/// Every tenant of this process as `/healthz` reports it: those it serves,
/// and the tenant files it refused.
#[derive(Default)]
pub(crate) struct FleetHealth {
    served: RwLock<BTreeMap<String, TenantHealth>>,
    refused: RwLock<BTreeMap<String, String>>,
    /// Whether tenants come from `tenants.dir` (a reason then names its
    /// tenant).
    named: AtomicBool,
}

impl FleetHealth {
    pub(crate) fn new(named: bool) -> FleetHealth {
        FleetHealth {
            named: AtomicBool::new(named),
            ..FleetHealth::default()
        }
    }

    pub(crate) fn insert(&self, tenant: &str, health: TenantHealth) {
        write(&self.served).insert(tenant.to_string(), health);
    }

    pub(crate) fn remove(&self, tenant: &str) {
        write(&self.served).remove(tenant);
    }

    /// The tenant files refused now (name → why), replacing the last set.
    pub(crate) fn set_refused(&self, refused: BTreeMap<String, String>) {
        *write(&self.refused) = refused;
    }

    /// Whether this instance holds at least one tenant.
    pub(crate) fn any_active(&self) -> bool {
        read(&self.served)
            .values()
            .any(|t| t.active.load(Ordering::SeqCst))
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone)]
struct OpsState {
    metrics: PrometheusHandle,
    fleet: Arc<FleetHealth>,
}

/// How long `/healthz` waits for the state database.
const HEALTH_DB_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(800);

/// Tenants whose state `/healthz` reads at once.
const HEALTH_READS_AT_ONCE: usize = 32;

/// Serves `/healthz` and `/metrics` until the task is aborted.
pub(crate) async fn serve(
    listen: SocketAddr,
    metrics: PrometheusHandle,
    fleet: Arc<FleetHealth>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (http.listen): {e}"))?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .route("/metrics", axum::routing::get(render_metrics))
        .with_state(OpsState { metrics, fleet });
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "ops endpoint stopped");
        }
    });
    Ok((addr, task))
}

async fn render_metrics(State(s): State<OpsState>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        s.metrics.render(),
    )
        .into_response()
}

/// 200 while every tenant's state database answers and takes writes and
/// its last contacts and write-back runs succeeded (or none ran yet), and
/// no tenant file is refused; else 503 naming the failing tenants.
async fn healthz(State(s): State<OpsState>) -> Response {
    use futures::StreamExt as _;
    let role = if s.fleet.any_active() {
        "active"
    } else {
        "standby"
    };
    let mut failing: Vec<(String, String)> = read(&s.fleet.refused)
        .iter()
        .map(|(name, why)| (name.clone(), format!("tenant file refused: {why}")))
        .collect();
    let served: Vec<(String, TenantHealth)> = read(&s.fleet.served)
        .iter()
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    let found: Vec<(String, String)> = futures::stream::iter(served)
        .map(|(name, tenant)| async move { tenant_failing(&tenant).await.map(|why| (name, why)) })
        .buffer_unordered(HEALTH_READS_AT_ONCE)
        .filter_map(std::future::ready)
        .collect()
        .await;
    failing.extend(found);
    if failing.is_empty() {
        return (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ok", "role": role})),
        )
            .into_response();
    }
    failing.sort();
    let named = s.fleet.named.load(Ordering::SeqCst);
    let reason = failing
        .iter()
        .map(|(name, why)| {
            if named {
                format!("{name}: {why}")
            } else {
                why.clone()
            }
        })
        .collect::<Vec<_>>()
        .join("; ");
    let names: Vec<&String> = failing.iter().map(|(n, _)| n).collect();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(serde_json::json!({
            "status": "failing",
            "role": role,
            "failing_tenants": names,
            "reason": reason,
        })),
    )
        .into_response()
}

/// Why a tenant fails its health check, if it does.
async fn tenant_failing(t: &TenantHealth) -> Option<String> {
    if let Some(reason) = t.writable.failing() {
        return Some(format!("the state database does not take writes: {reason}"));
    }
    // Answer within a second whatever happens to the database: a check
    // that takes longer is itself the answer.
    let runs = match tokio::time::timeout(HEALTH_DB_TIMEOUT, t.last_runs()).await {
        Ok(Ok(r)) => r,
        Ok(Err(reason)) => return Some(reason),
        Err(_) => {
            return Some(format!(
                "state database did not answer within {} ms",
                HEALTH_DB_TIMEOUT.as_millis()
            ));
        }
    };
    Job::ALL.iter().find_map(|&job| {
        let (_, status, error) = runs.iter().find(|(j, _, _)| *j == job)?;
        (!status.is_healthy()).then(|| {
            let error = error.clone().unwrap_or_default();
            format!("last {job} run {status}: {error}")
        })
    })
}

/// How long `health` waits for `/healthz` (it answers within a second).
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The address to ask for a daemon listening on `listen`: an unspecified
/// address (`0.0.0.0`, `::`, as in a container) is asked on loopback.
pub(crate) fn probe_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        }
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// `health`: asks the running daemon's `/healthz` on `listen` and returns
/// whether it answered 200, with a line saying what it answered. Reads
/// nothing else and writes nothing (no state database, no file).
pub(crate) async fn probe(listen: SocketAddr) -> (bool, String) {
    let url = format!("http://{}/healthz", probe_addr(listen));
    let client = match crate::remote::client_builder()
        .timeout(PROBE_TIMEOUT)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            return (
                false,
                format!("unhealthy: cannot build an HTTP client: {e}"),
            );
        }
    };
    match client.get(&url).send().await {
        Ok(answer) => {
            let status = answer.status();
            let body = answer.text().await.unwrap_or_default();
            let body = body.trim();
            if status.is_success() {
                (true, format!("healthy: {body}"))
            } else {
                (false, format!("unhealthy: {url} answered {status}: {body}"))
            }
        }
        Err(e) => (
            false,
            format!(
                "unhealthy: no answer from {url} within {} s (is the daemon running, and http.listen right?): {}",
                PROBE_TIMEOUT.as_secs(),
                crate::remote::source_chain(&e)
            ),
        ),
    }
}
