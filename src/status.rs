//! `status`: what the state database says — the last runs with their
//! counts, operations still pending with their last error, suppressions and
//! members per list. Reads only the database; prints no secret (the
//! database URL is not shown).

use std::fmt::Write;
use std::process::ExitCode;

use crate::config::Settings;
use crate::state::Store;

/// Runs shown per job.
const RUNS_PER_JOB: usize = 5;
/// Pending operations shown.
const PENDING: u64 = 20;

/// Prints the report. Opens the database read-only: `status` creates,
/// migrates and writes nothing. A database that does not exist yet is
/// reported as such (exit 1: most often the wrong `database.url`).
pub async fn print(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let Some(store) = Store::open_read_only(&settings.database.url).await? else {
        let what =
            "no state database yet: nothing has run against database.url (or it points elsewhere)";
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"database": "missing", "message": what})
                )?
            );
        } else {
            println!("{what}");
        }
        return Ok(ExitCode::from(crate::cli::EXIT_FAILED));
    };
    let report = if json {
        render_json(&store)
            .await
            .and_then(|v| Ok(format!("{}\n", serde_json::to_string_pretty(&v)?)))
    } else {
        render(&store).await
    };
    store.close().await;
    print!("{}", report?);
    Ok(ExitCode::SUCCESS)
}

/// The last runs of each job, newest first.
async fn runs_per_job(store: &Store) -> anyhow::Result<Vec<crate::state::RunRow>> {
    let mut per_job: std::collections::HashMap<crate::states::Job, usize> = Default::default();
    Ok(store
        .recent_runs(200)
        .await?
        .into_iter()
        .filter(|r| {
            let n = per_job.entry(r.job).or_insert(0);
            *n += 1;
            *n <= RUNS_PER_JOB
        })
        .collect())
}

/// The status report as JSON, for scripts.
pub async fn render_json(store: &Store) -> anyhow::Result<serde_json::Value> {
    use serde_json::json;
    let runs: Vec<serde_json::Value> = runs_per_job(store)
        .await?
        .into_iter()
        .map(|r| {
            json!({
                "id": r.id, "job": r.job, "status": r.status, "dry_run": r.dry_run,
                "started_at": when(r.started_at), "finished_at": r.finished_at.map(when),
                "counts": r.counts, "error": r.error,
            })
        })
        .collect();
    let (pending_total, pending) = store.pending_summary(PENDING).await?;
    let pending: Vec<serde_json::Value> = pending
        .into_iter()
        .map(|p| {
            json!({
                "id": p.id, "kind": p.kind, "list_id": p.list_id,
                "address": crate::domain::mask_address(&p.email),
                "attempts": p.attempts, "last_error": p.last_error, "since": when(p.created_at),
            })
        })
        .collect();
    let suppressions: serde_json::Map<String, serde_json::Value> = store
        .suppression_counts()
        .await?
        .into_iter()
        .map(|(k, n)| (k.to_string(), json!(n)))
        .collect();
    let records: Vec<serde_json::Value> = store
        .ledger_counts()
        .await?
        .into_iter()
        .map(|(kind, status, n)| json!({"kind": kind, "status": status, "count": n}))
        .collect();
    let members: Vec<serde_json::Value> = store
        .member_counts()
        .await?
        .into_iter()
        .map(|(list, origin, present, n)| json!({"list_id": list, "origin": origin, "present": present, "count": n}))
        .collect();
    Ok(json!({
        "runs": runs,
        "pending_operations": {"total": pending_total, "oldest": pending},
        "suppressions": suppressions,
        "contact_history_records": records,
        "members": members,
    }))
}

fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// The status report as text.
pub async fn render(store: &Store) -> anyhow::Result<String> {
    let mut out = String::new();
    let runs = runs_per_job(store).await?;
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
