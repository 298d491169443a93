//! What an operator's monitoring reads in daemon mode, on `http.listen`:
//!
//! - `GET /healthz`: 200 `{"status":"ok",…}` when the state database
//!   answers and the last finished run of each job succeeded (or none ran
//!   yet); 503 with a JSON `reason` otherwise.
//! - `GET /metrics`: Prometheus text — runs by job and outcome, operations
//!   by kind and outcome, HTTP requests and retries by API, the last
//!   success per job, pending operations.
//!
//! The library records metrics through the `metrics` facade everywhere;
//! without an installed recorder (tests, `--once`) that costs nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::state::Store;

/// Metric names.
pub mod metric {
    pub const RUNS: &str = "crm_edm_sync_runs_total";
    pub const OPERATIONS: &str = "crm_edm_sync_operations_total";
    pub const HTTP_REQUESTS: &str = "crm_edm_sync_http_requests_total";
    pub const HTTP_RETRIES: &str = "crm_edm_sync_http_retries_total";
    pub const LAST_SUCCESS: &str = "crm_edm_sync_last_success_timestamp_seconds";
    pub const PENDING: &str = "crm_edm_sync_pending_operations";
    pub const ACTIVE: &str = "crm_edm_sync_active";
}

/// A run ended with `outcome` (`succeeded`, `failed`, `refused`,
/// `interrupted`).
pub fn run_finished(job: &'static str, outcome: &'static str) {
    metrics::counter!(metric::RUNS, "job" => job, "outcome" => outcome).increment(1);
    if outcome == "succeeded" {
        metrics::gauge!(metric::LAST_SUCCESS, "job" => job)
            .set(chrono::Utc::now().timestamp() as f64);
    }
}

/// A run an earlier process left unfinished was marked abandoned.
pub fn run_abandoned() {
    metrics::counter!(metric::RUNS, "job" => "any", "outcome" => "abandoned").increment(1);
}

/// `n` operations of `kind` (`add`, `edit`, `unsub`, `contact_history`)
/// ended with `outcome` (`done`, `failed`).
pub fn operations(kind: &'static str, outcome: &'static str, n: usize) {
    if n > 0 {
        metrics::counter!(metric::OPERATIONS, "kind" => kind, "outcome" => outcome)
            .increment(n as u64);
    }
}

/// One HTTP request to `api` (`crm`, `edm`).
pub fn http_request(api: &'static str) {
    metrics::counter!(metric::HTTP_REQUESTS, "api" => api).increment(1);
}

/// One retry of a request to `api`.
pub fn http_retry(api: &'static str) {
    metrics::counter!(metric::HTTP_RETRIES, "api" => api).increment(1);
}

/// Pending work after a run: EDM operations and contact-history records.
pub async fn refresh_pending(store: &Store) {
    if let Ok((edm, _)) = store.pending_summary(0).await {
        metrics::gauge!(metric::PENDING, "kind" => "edm").set(edm as f64);
    }
    if let Ok(counts) = store.ledger_counts().await {
        let pending: u64 = counts
            .iter()
            .filter(|(_, s, _)| s == "pending")
            .map(|(_, _, n)| n)
            .sum();
        metrics::gauge!(metric::PENDING, "kind" => "contact_history").set(pending as f64);
    }
}

/// Installs the Prometheus recorder for this process.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    metrics::describe_counter!(metric::RUNS, "Job runs by job and outcome");
    metrics::describe_counter!(metric::OPERATIONS, "Operations by kind and outcome");
    metrics::describe_counter!(metric::HTTP_REQUESTS, "HTTP requests by API");
    metrics::describe_counter!(metric::HTTP_RETRIES, "HTTP retries by API");
    metrics::describe_gauge!(
        metric::LAST_SUCCESS,
        "Unix time of the last successful run per job"
    );
    metrics::describe_gauge!(metric::PENDING, "Operations waiting for the next run");
    metrics::describe_gauge!(
        metric::ACTIVE,
        "1 while this instance holds the lock and runs jobs"
    );
    Ok(handle)
}

#[derive(Clone)]
struct OpsState {
    store: Store,
    metrics: PrometheusHandle,
    active: Arc<AtomicBool>,
}

/// How long `/healthz` waits for the state database.
const HEALTH_DB_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(800);

/// The jobs whose last run `/healthz` judges.
const JOBS: [&str; 2] = [crate::sync::contacts::JOB, crate::writeback::JOB];

/// Serves `/healthz` and `/metrics` until the task is aborted.
pub async fn serve(
    listen: SocketAddr,
    store: Store,
    metrics: PrometheusHandle,
    active: Arc<AtomicBool>,
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
    for job in JOBS {
        if let Some(run) = runs.iter().find(|r| r.job == job)
            && run.status != "succeeded"
            && run.status != "interrupted"
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
