//! The drift report (`reconcile`): does each synced list still hold what
//! the state database says the daemon put there?
//!
//! Per list, in this order: the new lines of `unsubscribe-export` (a
//! recipient who unsubscribed since the last contacts run is recorded as
//! such, not reported `missing`), then the whole list, page by page,
//! compared as it arrives ([`compare`]). Nothing is written to EDM. With
//! the state database to itself (the daemon's scheduled run, or a
//! `reconcile` by hand while no daemon runs) it records the run and the
//! new export lines, as any job reading the exports does; next to a
//! running daemon it opens the database read-only and records nothing.
//!
//! A recipient who unsubscribes while their list is being read may show
//! as `missing` once: the export was read just before the list.
//!
//! The report only reports. `missing` and `changed` are repaired by
//! `--once --job contacts --full` (`--dry-run --plan FILE` shows how); a
//! `missing` member is never re-added by a schedule, because someone may
//! have removed that person on request; a `reactivated` one is never
//! touched by the daemon.

mod compare;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use serde::Serialize;

pub use compare::{DriftKind, Drifted, ListComparison, ListDrift};

use crate::config::Settings;
use crate::domain::{Email, ListId, RunId};
use crate::jobs::Context;
use crate::jobs::exports::View;
use crate::jobs::lifecycle::Run;
use crate::stored_enums::{Job, RunStatus};

/// The job name in logs, runs and metrics.
pub const JOB: Job = Job::Reconcile;

/// What one drift report found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriftReport {
    pub run_id: RunId,
    pub lists: Vec<ListDrift>,
    /// Every drifted or foreign member, in full (`--report FILE` only).
    #[serde(skip)]
    pub drifted: Vec<Drifted>,
}

impl DriftReport {
    /// The members of every list of one kind.
    pub fn total(&self, kind: DriftKind) -> usize {
        self.lists.iter().map(|l| l.of(kind)).sum()
    }
}

/// Runs the drift report once. `record`: the database is this process's
/// to write (the run row, the export lines read); otherwise nothing is
/// written.
#[tracing::instrument(name = "run", skip_all, fields(job = %JOB, run_id = tracing::field::Empty))]
pub async fn run(ctx: &Context, record: bool) -> anyhow::Result<DriftReport> {
    let run = Run::start(ctx, JOB, record).await?;
    let result = match ctx
        .unless_shutdown(compare_lists(ctx, &run.id, record))
        .await
    {
        Some(result) => result,
        None => {
            tracing::info!("shutdown while reading the lists; the drift report was not finished");
            Err(anyhow::anyhow!(
                "stopped while reading the lists; the drift report was not finished"
            ))
        }
    };
    let duration_ms = run.elapsed_ms();
    let (status, outcome) = match result {
        Ok((lists, drifted)) => (
            RunStatus::Succeeded,
            Ok(DriftReport {
                run_id: run.id.clone(),
                lists,
                drifted,
            }),
        ),
        Err(e) if ctx.shutdown.is_cancelled() => (RunStatus::Interrupted, Err(e)),
        Err(e) => (RunStatus::Failed, Err(e)),
    };
    let lists = outcome
        .as_ref()
        .map(|r| r.lists.clone())
        .unwrap_or_default();
    let counts = serde_json::json!({ "lists": lists });
    let error = outcome
        .as_ref()
        .err()
        .map(|e| ctx.redactor.redact(&format!("{e:#}")));
    let recorded = run.finish(ctx, status, &counts, error.as_deref()).await;
    summary_event(&run.id, &lists, duration_ms, status);
    if status == RunStatus::Succeeded {
        for list in &lists {
            for kind in DriftKind::ALL {
                crate::metrics::drift_members(list.list_id.0, kind.as_str(), list.of(kind));
            }
        }
    }
    let report = outcome?;
    recorded.context("cannot record the end of the run")?;
    Ok(report)
}

/// The `run finished` line: the totals, and every list's counts under
/// `lists` (a JSON array in the JSON log).
fn summary_event(run_id: &RunId, lists: &[ListDrift], duration_ms: u64, status: RunStatus) {
    let total = |kind| lists.iter().map(|l: &ListDrift| l.of(kind)).sum::<usize>();
    let per_list = serde_json::to_string(lists).unwrap_or_default();
    tracing::info!(
        job = %JOB,
        run_id = %run_id,
        status = %status,
        members = lists.iter().map(|l| l.members).sum::<usize>(),
        missing = total(DriftKind::Missing),
        changed = total(DriftKind::Changed),
        reactivated = total(DriftKind::Reactivated),
        foreign = total(DriftKind::Foreign),
        lists = %per_list,
        duration_ms,
        "run finished"
    );
}

/// Every synced list: its export, then its addresses, compared.
async fn compare_lists(
    ctx: &Context,
    run_id: &RunId,
    record: bool,
) -> anyhow::Result<(Vec<ListDrift>, Vec<Drifted>)> {
    let mut view = View::load(ctx).await?;
    let mut in_flight: BTreeMap<ListId, HashSet<Email>> = BTreeMap::new();
    for op in ctx.store.pending_operations().await? {
        if let Ok(email) = Email::parse(&op.email) {
            in_flight.entry(op.list_id).or_default().insert(email);
        }
    }
    let none = HashSet::new();
    let mut lists = Vec::new();
    let mut drifted = Vec::new();
    for list_id in ctx.settings.synced_lists() {
        view.read_exports(ctx, &[list_id]).await?;
        let mut comparison = ListComparison::new(
            list_id,
            &view.members,
            &view.suppressions,
            in_flight.get(&list_id).unwrap_or(&none),
        );
        ctx.edm
            .addr_each(list_id, |a| comparison.see(&a))
            .await
            .with_context(|| format!("cannot read list {list_id}"))?;
        let (counts, rows) = comparison.finish();
        tracing::info!(
            list_id = list_id.0,
            members = counts.members,
            missing = counts.missing,
            changed = counts.changed,
            reactivated = counts.reactivated,
            foreign = counts.foreign,
            "list compared"
        );
        if counts.reactivated > 0 {
            tracing::warn!(
                list_id = list_id.0,
                reactivated = counts.reactivated,
                "addresses the daemon or their recipient unsubscribed, or that bounced, are active in the list again"
            );
        }
        lists.push(counts);
        drifted.extend(rows);
    }
    if record {
        ctx.store
            .persist_observations(&view.obs, Some(run_id))
            .await?;
    }
    Ok((lists, drifted))
}

/// What `reconcile` was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub json: bool,
    pub report: Option<PathBuf>,
}

/// `crm-edm-sync reconcile`: runs the report here and prints it. With
/// the instance lock free it runs as the daemon would (migrated, fenced,
/// recorded); while a daemon holds it, read-only beside it.
pub async fn print(settings: Settings, q: Question) -> anyhow::Result<ExitCode> {
    let target = crate::lock::LockTarget::of(&settings.database.url);
    let report = match target.try_acquire().await? {
        Some(lock) => {
            crate::jobs::holding(settings, lock, async |ctx: &Context| run(ctx, true).await)
                .await??
        }
        None => {
            tracing::info!(
                "another instance holds the state database: the report is made read-only and not recorded"
            );
            let ctx = Context::new_read_only(settings).await?;
            let report = run(&ctx, false).await;
            ctx.store.close().await;
            report?
        }
    };
    if let Some(path) = &q.report {
        write_report(path, &report.drifted)?;
    }
    if q.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", to_text(&report, q.report.as_deref()));
    }
    Ok(ExitCode::SUCCESS)
}

/// `--report FILE`: a JSON line per drifted or foreign member, readable by
/// its owner only (it holds full addresses).
fn write_report(path: &Path, rows: &[Drifted]) -> anyhow::Result<()> {
    crate::jobs::private_file::write_json_lines(path, rows)
        .with_context(|| format!("cannot write the report to {}", path.display()))
}

/// Masked addresses shown per list for `reactivated` in the text output.
const SHOWN: usize = 10;

/// The text output: a line per list, the masked `reactivated` addresses,
/// and what to do next.
pub fn to_text(report: &DriftReport, file: Option<&Path>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "drift report {}", report.run_id);
    for l in &report.lists {
        let _ = writeln!(
            out,
            "list {}: {} members in EDM; missing {}, changed {}, reactivated {}, foreign {}",
            l.list_id, l.members, l.missing, l.changed, l.reactivated, l.foreign
        );
        let reactivated: Vec<String> = report
            .drifted
            .iter()
            .filter(|d| d.list_id == l.list_id && d.kind == DriftKind::Reactivated)
            .map(|d| crate::domain::mask_address(&d.email))
            .collect();
        if !reactivated.is_empty() {
            let more = reactivated.len().saturating_sub(SHOWN);
            let _ = writeln!(
                out,
                "  reactivated: {}{}",
                reactivated[..reactivated.len().min(SHOWN)].join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            );
        }
    }
    let repairable = report.total(DriftKind::Missing) + report.total(DriftKind::Changed);
    if repairable > 0 {
        out.push_str("missing and changed members are repaired by `crm-edm-sync --once --job contacts --full` (add `--dry-run --plan FILE` to see the plan first)\n");
    }
    if report.total(DriftKind::Reactivated) > 0 {
        out.push_str("reactivated members are active again after an unsubscribe or a hard bounce; the daemon never touches them: check with `crm-edm-sync explain EMAIL` and remove them in EDM if they did not opt in again\n");
    }
    match file {
        Some(path) => {
            let _ = writeln!(
                out,
                "{} drifted or foreign members written to {}",
                report.drifted.len(),
                path.display()
            );
        }
        None if !report.drifted.is_empty() => {
            out.push_str("--report FILE lists every one of them with its full address\n");
        }
        None => {}
    }
    out
}
