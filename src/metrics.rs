//! The daemon's metrics: their names and the one place each is recorded.
//! A leaf of the crate (it imports nothing from it): the HTTP callers, the
//! jobs and the ops endpoint all record through it.
//!
//! Metrics go through the `metrics` facade; without an installed recorder
//! (tests, `--once`) recording costs nothing.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Metric names.
pub(crate) mod metric {
    pub(crate) const RUNS: &str = "crm_edm_sync_runs_total";
    pub(crate) const OPERATIONS: &str = "crm_edm_sync_operations_total";
    pub(crate) const HTTP_REQUESTS: &str = "crm_edm_sync_http_requests_total";
    pub(crate) const HTTP_RETRIES: &str = "crm_edm_sync_http_retries_total";
    pub(crate) const LAST_SUCCESS: &str = "crm_edm_sync_last_success_timestamp_seconds";
    pub(crate) const PENDING: &str = "crm_edm_sync_pending_operations";
    pub(crate) const PARKED: &str = "crm_edm_sync_parked_operations";
    pub(crate) const ACTIVE: &str = "crm_edm_sync_active";
    pub(crate) const ROLE: &str = "crm_edm_sync_role";
    pub(crate) const BUILD_INFO: &str = "crm_edm_sync_build_info";
    pub(crate) const EDM_SERVICE_ENABLED: &str = "crm_edm_sync_edm_service_enabled";
    pub(crate) const EDM_SERVICE_EXPIRES: &str =
        "crm_edm_sync_edm_service_expiration_timestamp_seconds";
    pub(crate) const EDM_QUOTA_LEFT: &str = "crm_edm_sync_edm_quota_available";
    pub(crate) const STATE_DB_WRITABLE: &str = "crm_edm_sync_state_db_writable";
    pub(crate) const DRIFT_MEMBERS: &str = "crm_edm_sync_drift_members";
    pub(crate) const TOP_UPS: &str = "crm_edm_sync_reseller_top_ups_total";
    pub(crate) const TENANT_HELD: &str = "crm_edm_sync_tenant_held";
}

/// Run outcomes a job's run ends with.
pub(crate) const OUTCOMES: [&str; 4] = ["succeeded", "failed", "refused", "interrupted"];
/// Operation kinds and their outcomes.
pub(crate) const OPERATION_KINDS: [&str; 4] = ["add", "edit", "unsub", "contact_history"];
pub(crate) const OPERATION_OUTCOMES: [&str; 2] = ["done", "failed"];
/// The remote APIs.
pub(crate) const APIS: [&str; 2] = ["crm", "edm"];
/// The kinds of the pending and parked gauges.
pub(crate) const QUEUE_KINDS: [&str; 2] = ["edm", "contact_history"];

/// Creates every series of the current tenant from start-up — standby
/// included — so that an
/// alert on `increase(…[1h])` or a gauge's value sees a series, not
/// nothing: counters and gauges at 0 (the last success at 0: none yet),
/// the EDM service gauges at NaN until the first `service-info` read.
pub(crate) fn zero_series(jobs: &[&'static str]) {
    for &job in jobs {
        for outcome in OUTCOMES {
            metrics::counter!(metric::RUNS, "tenant" => tenant(), "job" => job, "outcome" => outcome).absolute(0);
        }
    }
    metrics::counter!(metric::RUNS, "tenant" => tenant(), "job" => "any", "outcome" => "abandoned")
        .absolute(0);
    for kind in OPERATION_KINDS {
        for outcome in OPERATION_OUTCOMES {
            metrics::counter!(metric::OPERATIONS, "tenant" => tenant(), "kind" => kind, "outcome" => outcome).absolute(0);
        }
    }
    for api in APIS {
        metrics::counter!(metric::HTTP_REQUESTS, "tenant" => tenant(), "api" => api).absolute(0);
        metrics::counter!(metric::HTTP_RETRIES, "tenant" => tenant(), "api" => api).absolute(0);
    }
    for outcome in TOP_UP_OUTCOMES {
        metrics::counter!(metric::TOP_UPS, "tenant" => tenant(), "outcome" => outcome).absolute(0);
    }
    for kind in QUEUE_KINDS {
        metrics::gauge!(metric::PENDING, "tenant" => tenant(), "kind" => kind).set(0.0);
        metrics::gauge!(metric::PARKED, "tenant" => tenant(), "kind" => kind).set(0.0);
    }
    state_db_writable(true);
    tenant_held(false);
    for &job in jobs {
        // 0: no success yet (the state database's last one replaces it).
        metrics::gauge!(metric::LAST_SUCCESS, "tenant" => tenant(), "job" => job).set(0.0);
    }
    // Unknown until the first service-info read: NaN, so that no alert on
    // a disabled service, an end date or a low quota fires on it.
    metrics::gauge!(metric::EDM_SERVICE_ENABLED, "tenant" => tenant()).set(f64::NAN);
    metrics::gauge!(metric::EDM_SERVICE_EXPIRES, "tenant" => tenant()).set(f64::NAN);
    metrics::gauge!(metric::EDM_QUOTA_LEFT, "tenant" => tenant()).set(f64::NAN);
}

/// The `tenant` label: the tenant of the work recording (every series
/// about a tenant's work carries it; the instance's own — build, role —
/// do not).
fn tenant() -> String {
    crate::scope::current().to_string()
}

/// This process's version and instance id, as a constant 1.
pub(crate) fn build_info(instance: &str) {
    metrics::gauge!(
        metric::BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "instance" => instance.to_string()
    )
    .set(1.0);
}

/// Whether this instance is the active one (holds the lock and runs the
/// jobs) or a standby: `crm_edm_sync_active` 1/0 and
/// `crm_edm_sync_role{role}` 1 for the role it has, 0 for the other.
pub(crate) fn set_role(active: bool) {
    let (a, s) = if active { (1.0, 0.0) } else { (0.0, 1.0) };
    metrics::gauge!(metric::ACTIVE).set(a);
    metrics::gauge!(metric::ROLE, "role" => "active").set(a);
    metrics::gauge!(metric::ROLE, "role" => "standby").set(s);
}

/// EDM's sending service (`service-info`): 1/0, its last day (midnight
/// UTC, Unix seconds), and the sends left. Unknown values are not set.
pub(crate) fn edm_service(enabled: bool, expires_unix: Option<i64>, quota_left: Option<i64>) {
    metrics::gauge!(metric::EDM_SERVICE_ENABLED, "tenant" => tenant()).set(if enabled {
        1.0
    } else {
        0.0
    });
    if let Some(t) = expires_unix {
        metrics::gauge!(metric::EDM_SERVICE_EXPIRES, "tenant" => tenant()).set(t as f64);
    }
    if let Some(q) = quota_left {
        metrics::gauge!(metric::EDM_QUOTA_LEFT, "tenant" => tenant()).set(q as f64);
    }
}

/// The last success of `job`, read from the state database at start-up,
/// so that a restart does not blank the gauge.
pub(crate) fn last_success_at(job: &'static str, unix_ms: i64) {
    metrics::gauge!(metric::LAST_SUCCESS, "tenant" => tenant(), "job" => job)
        .set(unix_ms as f64 / 1000.0);
}

/// The `kind` label of the pending and parked gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backlog {
    /// EDM operations (adds, edits, unsubscribes).
    Edm,
    /// Contact-history records for the CRM.
    ContactHistory,
}

impl Backlog {
    fn label(self) -> &'static str {
        match self {
            Backlog::Edm => "edm",
            Backlog::ContactHistory => "contact_history",
        }
    }
}

/// The `kind` label of the operations counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Add,
    Edit,
    Unsub,
    ContactHistory,
}

impl Operation {
    fn label(self) -> &'static str {
        match self {
            Operation::Add => "add",
            Operation::Edit => "edit",
            Operation::Unsub => "unsub",
            Operation::ContactHistory => "contact_history",
        }
    }
}

/// The `outcome` label of the operations counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    Done,
    Failed,
}

impl Ended {
    fn label(self) -> &'static str {
        match self {
            Ended::Done => "done",
            Ended::Failed => "failed",
        }
    }
}

/// Work left pending after a run.
pub(crate) fn pending(kind: Backlog, n: u64) {
    metrics::gauge!(metric::PENDING, "tenant" => tenant(), "kind" => kind.label()).set(n as f64);
}

/// Work parked after a run (no longer sent).
pub(crate) fn parked(kind: Backlog, n: u64) {
    metrics::gauge!(metric::PARKED, "tenant" => tenant(), "kind" => kind.label()).set(n as f64);
}

/// Whether the state database takes writes (1) or the last run record
/// could not be written (0).
pub(crate) fn state_db_writable(writable: bool) {
    metrics::gauge!(metric::STATE_DB_WRITABLE, "tenant" => tenant()).set(if writable {
        1.0
    } else {
        0.0
    });
}

/// A run ended with `outcome` (`succeeded`, `failed`, `refused`,
/// `interrupted`).
pub(crate) fn run_finished(job: &'static str, outcome: &'static str) {
    metrics::counter!(metric::RUNS, "tenant" => tenant(), "job" => job, "outcome" => outcome)
        .increment(1);
    if outcome == "succeeded" {
        metrics::gauge!(metric::LAST_SUCCESS, "tenant" => tenant(), "job" => job)
            .set(chrono::Utc::now().timestamp() as f64);
    }
}

/// A run an earlier process left unfinished was marked abandoned.
pub(crate) fn run_abandoned() {
    metrics::counter!(metric::RUNS, "tenant" => tenant(), "job" => "any", "outcome" => "abandoned")
        .increment(1);
}

/// `n` operations of `kind` ended with `outcome`.
pub(crate) fn operations(kind: Operation, outcome: Ended, n: usize) {
    if n > 0 {
        metrics::counter!(metric::OPERATIONS, "tenant" => tenant(), "kind" => kind.label(), "outcome" => outcome.label())
            .increment(n as u64);
    }
}

/// One HTTP request to `api` (`crm`, `edm`).
pub(crate) fn http_request(api: &'static str) {
    metrics::counter!(metric::HTTP_REQUESTS, "tenant" => tenant(), "api" => api).increment(1);
}

/// One retry of a request to `api`.
pub(crate) fn http_retry(api: &'static str) {
    metrics::counter!(metric::HTTP_RETRIES, "tenant" => tenant(), "api" => api).increment(1);
}

/// What the last drift report found in a list: `kind` is `missing`,
/// `changed`, `reactivated` or `foreign`. Set for every kind of every list
/// the report read, so a kind that went back to 0 reads 0.
pub(crate) fn drift_members(list_id: i64, kind: &'static str, n: usize) {
    metrics::gauge!(metric::DRIFT_MEMBERS, "tenant" => tenant(), "list_id" => list_id.to_string(), "kind" => kind)
        .set(n as f64);
}

/// Whether this instance holds the tenant (its lock and lease: it runs
/// the tenant's jobs), 1 or 0; summed over the instances, each tenant
/// should read exactly 1.
pub(crate) fn tenant_held(held: bool) {
    metrics::gauge!(metric::TENANT_HELD, "tenant" => tenant()).set(if held { 1.0 } else { 0.0 });
}

/// Outcomes of a reseller top-up.
pub(crate) const TOP_UP_OUTCOMES: [&str; 3] = ["added", "understock", "failed"];

/// A reseller top-up asked for the tenant ended with `outcome` (`added`,
/// `understock`, `failed`).
pub(crate) fn top_up(outcome: &'static str) {
    metrics::counter!(metric::TOP_UPS, "tenant" => tenant(), "outcome" => outcome).increment(1);
}

/// Installs the Prometheus recorder for this process.
pub(crate) fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    metrics::describe_counter!(metric::RUNS, "Job runs by job and outcome");
    metrics::describe_counter!(metric::OPERATIONS, "Operations by kind and outcome");
    metrics::describe_counter!(metric::HTTP_REQUESTS, "HTTP requests by API");
    metrics::describe_counter!(metric::HTTP_RETRIES, "HTTP retries by API");
    metrics::describe_gauge!(
        metric::TENANT_HELD,
        "1 while this instance holds the tenant and runs its jobs"
    );
    metrics::describe_counter!(
        metric::TOP_UPS,
        "Reseller top-ups (add-count) asked for the tenant, by outcome"
    );
    metrics::describe_gauge!(
        metric::LAST_SUCCESS,
        "Unix time of the last successful run per job"
    );
    metrics::describe_gauge!(metric::PENDING, "Operations waiting for the next run");
    metrics::describe_gauge!(
        metric::ACTIVE,
        "1 while this instance holds the lock and runs jobs"
    );
    metrics::describe_gauge!(
        metric::PARKED,
        "Operations refused in max_attempts runs, no longer sent"
    );
    metrics::describe_gauge!(
        metric::ROLE,
        "1 for this instance's role (active or standby)"
    );
    metrics::describe_gauge!(
        metric::BUILD_INFO,
        "Version and instance id of this process"
    );
    metrics::describe_gauge!(
        metric::STATE_DB_WRITABLE,
        "1 while the state database takes the runs' writes, 0 after a run record could not be written"
    );
    metrics::describe_gauge!(
        metric::EDM_SERVICE_ENABLED,
        "1 while EDM's sending service is enabled (service-info)"
    );
    metrics::describe_gauge!(
        metric::EDM_SERVICE_EXPIRES,
        "Unix time of the last day of EDM's sending service"
    );
    metrics::describe_gauge!(
        metric::DRIFT_MEMBERS,
        "Members of a synced list that the last drift report (reconcile) found drifted, by kind"
    );
    metrics::describe_gauge!(
        metric::EDM_QUOTA_LEFT,
        "Sends left in EDM's quota (service-info)"
    );
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::metric::*;

    /// The metric names a file mentions (`crm_edm_sync_…`).
    fn names_in(text: &str) -> std::collections::BTreeSet<String> {
        let mut names = std::collections::BTreeSet::new();
        let mut rest = text;
        while let Some(at) = rest.find("crm_edm_sync_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
        names
    }

    /// With many tenants the dashboard shows the ones picked in its
    /// `tenant` variable: every query of a series about a tenant's work
    /// filters on it (instance-wide series have no `tenant` label).
    #[test]
    fn the_dashboard_filters_every_tenant_series_by_its_tenant_variable() {
        let text = std::fs::read_to_string("deploy/grafana/crm-edm-sync.json").unwrap();
        let board: serde_json::Value = serde_json::from_str(&text).unwrap();
        let variables = board["templating"]["list"].as_array().unwrap();
        assert!(
            variables.iter().any(|v| v["name"] == "tenant"),
            "no tenant variable"
        );
        let instance_wide = [ACTIVE, ROLE, BUILD_INFO];
        let mut filtered = 0;
        for panel in board["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for (at, _) in expr.match_indices("crm_edm_sync_") {
                    let tail = &expr[at..];
                    let name = &tail[..tail
                        .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                        .unwrap_or(tail.len())];
                    if instance_wide.contains(&name) {
                        continue;
                    }
                    let after = &expr[at + name.len()..];
                    assert!(
                        after.starts_with(r#"{tenant=~"$tenant"}"#),
                        "{:?}: {expr}",
                        panel["title"]
                    );
                    filtered += 1;
                }
            }
        }
        assert!(filtered >= 10, "{filtered}");
    }

    #[test]
    fn the_shipped_alerts_and_dashboard_name_only_metrics_the_daemon_exports() {
        let known = [
            RUNS,
            OPERATIONS,
            HTTP_REQUESTS,
            HTTP_RETRIES,
            LAST_SUCCESS,
            PENDING,
            PARKED,
            ACTIVE,
            ROLE,
            BUILD_INFO,
            EDM_SERVICE_ENABLED,
            EDM_SERVICE_EXPIRES,
            EDM_QUOTA_LEFT,
            STATE_DB_WRITABLE,
            DRIFT_MEMBERS,
            TOP_UPS,
            TENANT_HELD,
        ];
        for file in [
            "deploy/prometheus/alerts.yml",
            "deploy/grafana/crm-edm-sync.json",
        ] {
            let text = std::fs::read_to_string(file).unwrap();
            let names = names_in(&text);
            assert!(!names.is_empty(), "{file} names no metric");
            for name in names {
                assert!(
                    known.contains(&name.as_str()),
                    "{file} names {name}, which is not exported"
                );
            }
        }
    }
}
