//! `status`: what the state database says — the last runs with their
//! counts, operations still pending with their last error, suppressions and
//! members per list. Reads only the database; prints no secret (the
//! database URL is not shown).

use std::fmt::Write;
use std::process::ExitCode;

use crate::config::Settings;
use crate::state::Store;

/// Runs shown.
const RUNS: u64 = 10;
/// Pending operations shown.
const PENDING: u64 = 20;

pub async fn print(settings: &Settings) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&settings.database.url).await?;
    print!("{}", render(&store).await?);
    Ok(ExitCode::SUCCESS)
}

fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// The status report as text.
pub async fn render(store: &Store) -> anyhow::Result<String> {
    let mut out = String::new();
    let runs = store.recent_runs(RUNS).await?;
    let _ = writeln!(out, "last runs:");
    if runs.is_empty() {
        let _ = writeln!(out, "  none yet");
    }
    for r in &runs {
        let took = r
            .finished_at
            .map(|f| format!("{} ms", f - r.started_at))
            .unwrap_or_else(|| "unfinished".into());
        let dry = if r.dry_run { " (dry run)" } else { "" };
        let _ = writeln!(
            out,
            "  {} {} {}{} {} [{}]",
            when(r.started_at),
            r.job,
            r.status,
            dry,
            took,
            r.id
        );
        if let Some(obj) = r.counts.as_object() {
            let counts: Vec<String> = obj
                .iter()
                .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            if !counts.is_empty() {
                let _ = writeln!(out, "    {}", counts.join(" "));
            }
        }
        if let Some(e) = &r.error {
            let _ = writeln!(out, "    error: {e}");
        }
    }
    let (total, pending) = store.pending_summary(PENDING).await?;
    let _ = writeln!(out, "pending operations: {total}");
    for p in &pending {
        let _ = writeln!(
            out,
            "  #{} {} list {} {} since {} attempts={}{}",
            p.id,
            p.kind,
            p.list_id,
            crate::domain::mask_address(&p.email),
            when(p.created_at),
            p.attempts,
            p.last_error
                .as_deref()
                .map(|e| format!(" last error: {e}"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(out, "suppressions:");
    let sup = store.suppression_counts().await?;
    if sup.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for (reason, n) in sup {
        let _ = writeln!(out, "  {reason}: {n}");
    }
    let _ = writeln!(out, "contact-history records:");
    let ledger = store.ledger_counts().await?;
    if ledger.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for (kind, status, n) in ledger {
        let _ = writeln!(out, "  {kind} {status}: {n}");
    }
    let _ = writeln!(out, "members:");
    let counts = store.member_counts().await?;
    if counts.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for (list, origin, present, n) in counts {
        let state = if present { "in list" } else { "removed" };
        let _ = writeln!(out, "  list {list}: {origin} {state}: {n}");
    }
    Ok(out)
}
