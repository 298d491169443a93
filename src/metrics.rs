//! The daemon's metrics: their names and the one place each is recorded.
//! A leaf of the crate (it imports nothing from it): the HTTP callers, the
//! jobs and the ops endpoint all record through it.
//!
//! Metrics go through the `metrics` facade; without an installed recorder
//! (tests, `--once`) recording costs nothing.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Metric names.
pub mod metric {
    pub const RUNS: &str = "crm_edm_sync_runs_total";
    pub const OPERATIONS: &str = "crm_edm_sync_operations_total";
    pub const HTTP_REQUESTS: &str = "crm_edm_sync_http_requests_total";
    pub const HTTP_RETRIES: &str = "crm_edm_sync_http_retries_total";
    pub const LAST_SUCCESS: &str = "crm_edm_sync_last_success_timestamp_seconds";
    pub const PENDING: &str = "crm_edm_sync_pending_operations";
    pub const PARKED: &str = "crm_edm_sync_parked_operations";
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
