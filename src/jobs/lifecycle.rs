//! The one run lifecycle both jobs use: a run id, the run row from start to
//! end (runs an earlier process left unfinished are marked abandoned first),
//! the run counted in the metrics, and the pending gauges refreshed. A dry
//! run goes through it too and records nothing.

use crate::domain::RunId;
use std::time::Instant;

use super::{Context, abandon_unfinished_runs, refresh_pending};
use crate::state::UnrecordedEnd;
use crate::stored_enums::{Job, RunStatus};

/// A run under way.
#[derive(Debug)]
pub struct Run {
    pub id: RunId,
    job: Job,
    started: Instant,
    /// Whether it has a run row (not for a dry run, which writes nothing).
    recorded: bool,
}

impl Run {
    /// Starts a run of `job`; when `record`, marks runs an earlier process
    /// left `running` as abandoned and records this one as running.
    pub async fn start(ctx: &Context, job: Job, record: bool) -> anyhow::Result<Run> {
        let id = RunId::fresh();
        // Every later line of the run carries it (the job's span).
        tracing::Span::current().record("run_id", id.as_str());
        if record && let Err(e) = record_start(ctx, &id, job).await {
            // Nothing was sent: the run stops before its first request.
            ctx.store.writable().failed(&format!("{e:#}"));
            crate::metrics::run_finished(job.as_str(), RunStatus::Failed.as_str());
            return Err(e.context("cannot record the run's start; nothing was sent"));
        }
        if record {
            ctx.store.writable().succeeded();
        }
        Ok(Run {
            id,
            job,
            started: Instant::now(),
            recorded: record,
        })
    }

    /// Milliseconds since the run started.
    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Ends the run: records how it ended (when it has a row), counts it in
    /// the metrics and refreshes the pending gauges. An error says the end
    /// could not be recorded; the metrics are counted either way.
    pub async fn finish(
        &self,
        ctx: &Context,
        status: RunStatus,
        counts: &serde_json::Value,
        error: Option<&str>,
    ) -> anyhow::Result<()> {
        let recorded = if self.recorded {
            ctx.store.finish_run(&self.id, status, counts, error).await
        } else {
            Ok(())
        };
        // A run whose end could not be recorded counts as failed.
        let counted = match &recorded {
            Ok(()) => status,
            Err(e) => {
                let reason = format!("{e:#}");
                ctx.store.writable().failed(&reason);
                ctx.store.writable().keep_unrecorded(UnrecordedEnd {
                    run_id: self.id.clone(),
                    counts: counts.clone(),
                    error: format!(
                        "the end of this run ({status}{}) could not be recorded: {reason}",
                        error.map(|e| format!(": {e}")).unwrap_or_default()
                    ),
                });
                RunStatus::Failed
            }
        };
        if self.recorded && recorded.is_ok() {
            ctx.store.writable().succeeded();
        }
        crate::metrics::run_finished(self.job.as_str(), counted.as_str());
        if self.recorded {
            prune(ctx).await;
        }
        refresh_pending(&ctx.store).await;
        recorded
    }
}

/// Before a run's start is recorded: the ends of earlier runs that could
/// not be recorded are written (as failed, saying why), then runs an
/// earlier process left `running` are marked abandoned, then this run is
/// recorded as running.
async fn record_start(ctx: &Context, id: &RunId, job: Job) -> anyhow::Result<()> {
    let ends = ctx.store.writable().take_unrecorded();
    for (i, end) in ends.iter().enumerate() {
        let written = ctx
            .store
            .finish_run(
                &end.run_id,
                RunStatus::Failed,
                &end.counts,
                Some(&end.error),
            )
            .await;
        if let Err(e) = written {
            ctx.store.writable().put_back(ends[i..].to_vec());
            return Err(e);
        }
        tracing::info!(earlier_run_id = %end.run_id, "the end of an earlier run that could not be recorded is recorded now, as failed");
    }
    abandon_unfinished_runs(ctx).await?;
    ctx.store.start_run(id, job, false).await
}

/// Bounded state: what is older than `database.retention_days` and no
/// longer needed goes (see `state::retention`). A failure is logged, not
/// fatal: the next run tries again.
async fn prune(ctx: &Context) {
    let days = i64::from(ctx.settings.database.retention_days);
    let cutoff = (ctx.now() - chrono::Duration::days(days)).timestamp_millis();
    match ctx.store.prune(cutoff).await {
        Ok(p) if p.total() > 0 => tracing::info!(
            operations = p.operations,
            runs = p.runs,
            export_lines = p.export_lines,
            run_requests = p.run_requests,
            retention_days = days,
            "state older than the retention window pruned"
        ),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot prune old state; the next run tries again")
        }
    }
    let audit_days = ctx.settings.database.audit_retention_days;
    if audit_days == 0 {
        return;
    }
    let cutoff = (ctx.now() - chrono::Duration::days(i64::from(audit_days))).timestamp_millis();
    match ctx.store.prune_audit(cutoff).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            entries = n,
            audit_retention_days = audit_days,
            "consent-trail entries older than their retention pruned"
        ),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot prune the consent trail; the next run tries again")
        }
    }
}
