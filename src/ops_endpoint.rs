//! What an operator's monitoring reads in daemon mode, on `http.listen`:
//!
//! - `GET /healthz`: 200 `{"status":"ok",…}` when the state database
//!   answers and takes writes (the runs' own records got through) and the
//!   last finished run of each job succeeded (or none ran yet); 503 with a
//!   JSON `reason` otherwise.
//! - `GET /metrics`: Prometheus text — runs by job and outcome, operations
//!   by kind and outcome, HTTP requests and retries by API, the last
//!   success per job, pending operations.
//!
//! The metrics themselves are named and recorded in [`crate::metrics`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::state::{Store, Writable};
use crate::stored_enums::Job;

#[derive(Clone)]
struct OpsState {
    store: Store,
    metrics: PrometheusHandle,
    active: Arc<AtomicBool>,
    /// The jobs' store's [`Writable`]: `store` here is a reader beside it.
    writable: Writable,
}

/// How long `/healthz` waits for the state database.
const HEALTH_DB_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(800);

/// Serves `/healthz` and `/metrics` until the task is aborted.
pub(crate) async fn serve(
    listen: SocketAddr,
    store: Store,
    metrics: PrometheusHandle,
    active: Arc<AtomicBool>,
    writable: Writable,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (http.listen): {e}"))?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .route("/metrics", axum::routing::get(render_metrics))
        .with_state(OpsState {
            store,
            metrics,
            active,
            writable,
        });
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

async fn healthz(State(s): State<OpsState>) -> Response {
    let role = if s.active.load(Ordering::SeqCst) {
        "active"
    } else {
        "standby"
    };
    let failing = |reason: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"status": "failing", "role": role, "reason": reason})),
        )
            .into_response()
    };
    // Answer within a second whatever happens to the database: a check
    // that takes longer is itself the answer.
    let read = async {
        s.store
            .connection()
            .ping()
            .await
            .map_err(|e| format!("state database unreachable: {e}"))?;
        s.store
            .last_finished_runs()
            .await
            .map_err(|e| format!("cannot read runs: {e:#}"))
    };
    if let Some(reason) = s.writable.failing() {
        return failing(format!("the state database does not take writes: {reason}"));
    }
    let runs = match tokio::time::timeout(HEALTH_DB_TIMEOUT, read).await {
        Ok(Ok(r)) => r,
        Ok(Err(reason)) => return failing(reason),
        Err(_) => {
            return failing(format!(
                "state database did not answer within {} ms",
                HEALTH_DB_TIMEOUT.as_millis()
            ));
        }
    };
    for job in Job::ALL {
        if let Some(run) = runs.iter().find(|r| r.job == job)
            && !run.status.is_healthy()
        {
            let error = run.error.clone().unwrap_or_default();
            return failing(format!("last {job} run {}: {error}", run.status));
        }
    }
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({"status": "ok", "role": role})),
    )
        .into_response()
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
