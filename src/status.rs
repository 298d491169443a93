//! `status`: what the state database says — the last runs with their
//! counts, operations still pending with their last error, suppressions and
//! members per list. Reads only the database; prints no secret (the
//! database URL is not shown).

use std::fmt::Write;
use std::process::ExitCode;

use crate::config::Settings;
use crate::domain::{ListId, Origin};
use crate::state::{EdmRefusal, ParkedRecord, PendingRow, RunRequest, RunRow, Store};
use crate::stored_enums::{LedgerStatus, RecordKind, SuppressionReason, SuppressionSource};

/// Runs shown per job.
const RUNS_PER_JOB: usize = 5;
/// Pending operations shown.
const PENDING: u64 = 20;
/// Parked operations and records shown.
const PARKED: u64 = 20;

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
    let report = StatusReport::read(&store).await;
    store.close().await;
    let report = report?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

/// `status` of every tenant (`tenants.dir`, no `--tenant`): one line each
/// — who holds it, its last contacts and write-back runs, what is pending
/// and parked — or, with `--json`, `{"tenants": [{"tenant", "holder",
/// "status"}…]}`. A refused tenant file is a line (and an entry with
/// `refused`) too. Exit 1 when a tenant has no state database yet.
pub async fn print_all(set: &crate::config::TenantSet, json: bool) -> anyhow::Result<ExitCode> {
    let mut entries: Vec<(String, serde_json::Value, String)> = Vec::new();
    for r in &set.refused {
        let line = format!("refused: {}", r.error);
        entries.push((
            r.name.clone(),
            serde_json::json!({"refused": r.error}),
            line,
        ));
    }
    let mut all_there = true;
    for settings in &set.tenants {
        let name = settings.tenant.to_string();
        let (value, line) = match tenant_summary(settings).await {
            Ok(Some(found)) => found,
            Ok(None) => {
                all_there = false;
                let what = "no state database yet";
                (serde_json::json!({"database": "missing"}), what.to_string())
            }
            // One tenant's state that cannot be read (being migrated, a
            // schema of a newer release) is its line, not the command's end.
            Err(e) => {
                all_there = false;
                let e = format!("{e:#}");
                (
                    serde_json::json!({"error": e}),
                    format!("cannot read its state: {e}"),
                )
            }
        };
        entries.push((name, value, line));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    if json {
        let tenants: Vec<serde_json::Value> = entries
            .into_iter()
            .map(|(name, mut value, _)| {
                value["tenant"] = serde_json::Value::String(name);
                value
            })
            .collect();
        let all = serde_json::json!({ "tenants": tenants });
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        for (name, _, line) in entries {
            println!("{name}: {line}");
        }
    }
    Ok(if all_there {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::cli::EXIT_FAILED)
    })
}

/// One tenant's entry and line; `None` without a state database.
async fn tenant_summary(
    settings: &Settings,
) -> anyhow::Result<Option<(serde_json::Value, String)>> {
    let Some(store) = Store::open_read_only(&settings.database.url).await? else {
        return Ok(None);
    };
    let read = async {
        let lease = store.lease().await?;
        let report = StatusReport::read(&store).await?;
        anyhow::Ok((lease, report))
    };
    let read = read.await;
    store.close().await;
    let (lease, report) = read?;
    let holder = match &lease {
        Some(l) if l.pid != 0 => format!("held by {} (epoch {})", l.holder, l.epoch),
        Some(l) => format!("released by {} (epoch {})", l.holder, l.epoch),
        None => "never held".to_string(),
    };
    let mut line = holder;
    for job in crate::stored_enums::Job::ALL {
        match report.runs.iter().find(|r| r.job == job && !r.dry_run) {
            Some(r) => {
                let _ = write!(line, "; {job} {} {}", r.status, when(r.started_at));
            }
            None => {
                let _ = write!(line, "; {job} never ran");
            }
        }
    }
    let _ = write!(
        line,
        "; {} pending, {} parked",
        report.pending_total,
        report.parked_total + report.parked_records_total
    );
    let value = serde_json::json!({
        "holder": lease.map(|l| serde_json::json!({
            "instance": l.holder, "host": l.host, "pid": l.pid,
            "epoch": l.epoch, "since": when(l.acquired_at), "released": l.pid == 0,
        })),
        "status": report.to_json(),
    });
    Ok(Some((value, line)))
}

/// The last runs of each job, newest first.
async fn runs_per_job(store: &Store) -> anyhow::Result<Vec<RunRow>> {
    let mut per_job: std::collections::HashMap<crate::stored_enums::Job, usize> =
        Default::default();
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

/// What `status` reports, read once from the store and rendered as text
/// for people or as JSON for scripts (the same facts in both).
#[derive(Debug, Clone, PartialEq)]
pub struct StatusReport {
    pub runs: Vec<RunRow>,
    /// `--once` runs asked of the daemon and not yet answered.
    pub requests: Vec<RunRequest>,
    pub pending_total: u64,
    pub pending: Vec<PendingRow>,
    pub suppressions: Vec<(SuppressionReason, u64)>,
    pub records: Vec<(RecordKind, LedgerStatus, u64)>,
    pub members: Vec<(ListId, Origin, bool, u64)>,
    /// EDM operations parked (refused in `edm.max_attempts` runs).
    pub parked_total: u64,
    pub parked: Vec<EdmRefusal>,
    /// Contact-history records parked (refused in `crm.max_attempts` runs).
    pub parked_records_total: u64,
    pub parked_records: Vec<ParkedRecord>,
    /// Suppressions learnt while the state database was behind EDM:
    /// how many, and the newest `(list_id, email, export time)`.
    pub behind_total: u64,
    pub behind: Vec<(ListId, String, String)>,
}

impl StatusReport {
    pub async fn read(store: &Store) -> anyhow::Result<StatusReport> {
        let (pending_total, pending) = store.pending_summary(PENDING).await?;
        let (parked_total, parked) = store.parked_operations(PARKED).await?;
        let (parked_records_total, parked_records) = store.parked_records(PARKED).await?;
        let (behind_total, behind) = store.behind_unsubscribes(PARKED as usize).await?;
        Ok(StatusReport {
            behind_total,
            behind,
            parked_total,
            parked,
            parked_records_total,
            parked_records,
            runs: runs_per_job(store).await?,
            requests: store.open_run_requests().await?,
            pending_total,
            pending,
            suppressions: store.suppression_counts().await?,
            records: store.ledger_counts().await?,
            members: store.member_counts().await?,
        })
    }

    /// The report as JSON, for scripts.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let runs: Vec<serde_json::Value> = self
            .runs
            .iter()
            .map(|r| {
                json!({
                    "id": r.id, "job": r.job, "status": r.status, "dry_run": r.dry_run,
                    "started_at": when(r.started_at), "finished_at": r.finished_at.map(when),
                    "counts": r.counts, "error": r.error,
                })
            })
            .collect();
        let pending: Vec<serde_json::Value> = self
            .pending
            .iter()
            .map(|p| {
                json!({
                    "id": p.id, "kind": p.kind, "list_id": p.list_id,
                    "address": crate::domain::mask_address(&p.email),
                    "attempts": p.attempts, "last_error": p.last_error, "since": when(p.created_at),
                })
            })
            .collect();
        let suppressions: serde_json::Map<String, serde_json::Value> = self
            .suppressions
            .iter()
            .map(|(k, n)| (k.to_string(), json!(n)))
            .collect();
        let records: Vec<serde_json::Value> = self
            .records
            .iter()
            .map(|(kind, status, n)| json!({"kind": kind, "status": status, "count": n}))
            .collect();
        let members: Vec<serde_json::Value> = self
            .members
            .iter()
            .map(|(list, origin, present, n)| json!({"list_id": list, "origin": origin, "present": present, "count": n}))
            .collect();
        let parked: Vec<serde_json::Value> = self
            .parked
            .iter()
            .map(|r| {
                json!({
                    "kind": r.kind, "list_id": r.list_id,
                    "address": crate::domain::mask_address(&r.email),
                    "code": r.code, "message": r.message, "runs": r.failed_runs,
                    "since": when(r.updated_at),
                })
            })
            .collect();
        let parked_records: Vec<serde_json::Value> = self
            .parked_records
            .iter()
            .map(|r| {
                json!({
                    "kind": r.kind, "scope": r.scope, "link_man_id": r.link_man_id,
                    "address": crate::domain::mask_address(&r.email),
                    "runs": r.failed_runs, "last_error": r.last_error,
                })
            })
            .collect();
        json!({
            "runs": runs,
            "run_requests": self.requests_json(),
            "pending_operations": {"total": self.pending_total, "oldest": pending},
            "parked_operations": {"total": self.parked_total, "oldest": parked},
            "parked_records": {"total": self.parked_records_total, "oldest": parked_records},
            "suppressions": suppressions,
            "unsubscribed_while_behind": {
                "total": self.behind_total,
                "note": SuppressionSource::BEHIND_NOTE,
                "members": self.behind.iter().map(|(list_id, email, time)| json!({
                    "list_id": list_id, "address": crate::domain::mask_address(email), "export_time": time,
                })).collect::<Vec<_>>(),
            },
            "contact_history_records": records,
            "members": members,
        })
    }

    /// The `--once` runs asked of the daemon, as JSON.
    fn requests_json(&self) -> Vec<serde_json::Value> {
        self.requests
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.id, "job": r.ask.job, "full": r.ask.full, "force": r.ask.force,
                    "retry_parked": r.ask.retry_parked, "state": r.state.as_str(),
                    "requested_by": r.requested_by, "requested_at": when(r.requested_at),
                    "claimed_by": r.claimed_by,
                })
            })
            .collect()
    }

    /// The report as text, for people.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        self.write_runs(&mut out);
        self.write_requests(&mut out);
        self.write_operations(&mut out);
        self.write_suppressions(&mut out);
        self.write_records_and_members(&mut out);
        out
    }

    /// `--once` runs waiting for the daemon (none: nothing is printed).
    fn write_requests(&self, out: &mut String) {
        if self.requests.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "--once runs asked of the daemon: {}",
            self.requests.len()
        );
        for r in &self.requests {
            let job = r
                .ask
                .job
                .map_or("contacts then writeback".to_string(), |j| j.to_string());
            let flags: String = [
                (r.ask.full, " --full"),
                (r.ask.force, " --force"),
                (r.ask.retry_parked, " --retry-parked"),
            ]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, flag)| *flag)
            .collect();
            let _ = writeln!(
                out,
                "  #{} {job}{flags}: {} since {}, asked by {}{}",
                r.id,
                r.state.as_str(),
                when(r.requested_at),
                r.requested_by,
                r.claimed_by
                    .as_deref()
                    .map(|d| format!(", run by {d}"))
                    .unwrap_or_default()
            );
        }
    }

    /// The last runs, with their counts and errors.
    fn write_runs(&self, out: &mut String) {
        let _ = writeln!(out, "last runs:");
        if self.runs.is_empty() {
            let _ = writeln!(out, "  none yet");
        }
        for r in &self.runs {
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
    }

    /// Pending and parked operations, parked contact-history records.
    fn write_operations(&self, out: &mut String) {
        let _ = writeln!(out, "pending operations: {}", self.pending_total);
        for p in &self.pending {
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
        let _ = writeln!(
            out,
            "parked operations: {} (not sent until they change or --retry-parked)",
            self.parked_total
        );
        for r in &self.parked {
            let _ = writeln!(
                out,
                "  {} list {} {} refused in {} runs, last {}: {} {}",
                r.kind,
                r.list_id,
                crate::domain::mask_address(&r.email),
                r.failed_runs,
                when(r.updated_at),
                r.code,
                r.message
            );
        }
        let _ = writeln!(
            out,
            "parked contact-history records: {} (not sent until --retry-parked)",
            self.parked_records_total
        );
        for r in &self.parked_records {
            let _ = writeln!(
                out,
                "  {} {} link-man {} {} refused in {} runs: {}",
                r.kind,
                r.scope,
                r.link_man_id,
                crate::domain::mask_address(&r.email),
                r.failed_runs,
                r.last_error.as_deref().unwrap_or("")
            );
        }
    }

    /// Suppressions by reason, and those learnt while the database was
    /// behind EDM.
    fn write_suppressions(&self, out: &mut String) {
        let _ = writeln!(out, "suppressions:");
        if self.suppressions.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for (reason, n) in &self.suppressions {
            let _ = writeln!(out, "  {reason}: {n}");
        }
        if self.behind_total > 0 {
            let _ = writeln!(
                out,
                "{}: {}",
                SuppressionSource::BEHIND_NOTE,
                self.behind_total
            );
            for (list_id, email, time) in &self.behind {
                let _ = writeln!(
                    out,
                    "  list {list_id} {} (export line {time})",
                    crate::domain::mask_address(email)
                );
            }
        }
    }

    /// Contact-history records by kind and status; members by list.
    fn write_records_and_members(&self, out: &mut String) {
        let _ = writeln!(out, "contact-history records:");
        if self.records.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for (kind, status, n) in &self.records {
            let _ = writeln!(out, "  {kind} {status}: {n}");
        }
        let _ = writeln!(out, "members:");
        if self.members.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for (list, origin, present, n) in &self.members {
            let state = if *present { "in list" } else { "removed" };
            let _ = writeln!(out, "  list {list}: {origin} {state}: {n}");
        }
    }
}

/// The status report as text.
pub async fn render(store: &Store) -> anyhow::Result<String> {
    Ok(StatusReport::read(store).await?.to_text())
}

/// A time the state database holds (ms since the epoch), in UTC.
pub fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ListId;

    #[test]
    fn text_and_json_render_the_same_facts() {
        // Arrange
        let report = StatusReport {
            runs: vec![],
            requests: vec![RunRequest {
                id: 4,
                ask: crate::state::RunAsk {
                    job: Some(crate::stored_enums::Job::Contacts),
                    full: true,
                    ..Default::default()
                },
                state: crate::stored_enums::RequestState::Running,
                requested_by: "ops-host-811".into(),
                requested_at: 0,
                claimed_by: Some("daemon-host-12".into()),
                succeeded: None,
                output: None,
            }],
            pending_total: 3,
            pending: vec![PendingRow {
                id: 7,
                kind: crate::stored_enums::OpKind::Unsub,
                list_id: ListId(2),
                email: "zhang@example.com".into(),
                attempts: 4,
                last_error: Some("refused".into()),
                created_at: 0,
            }],
            suppressions: vec![(SuppressionReason::Bounce, 5)],
            records: vec![(RecordKind::Open, LedgerStatus::Done, 9)],
            members: vec![(ListId(1), Origin::Adopted, true, 11)],
            parked_total: 1,
            parked: vec![EdmRefusal {
                kind: crate::stored_enums::OpKind::Add,
                list_id: ListId(1),
                email: "li@example.com".into(),
                content: "li@example.com;Li;;;;;;;;;;;".into(),
                code: "add_address_error".into(),
                message: "地址被拒绝".into(),
                failed_runs: 5,
                parked: true,
                updated_at: 0,
            }],
            parked_records_total: 0,
            parked_records: vec![],
            behind_total: 0,
            behind: vec![],
        };

        // Act
        let text = report.to_text();
        let json = report.to_json();

        // Assert
        assert!(
            text.contains("#4 contacts --full: running since 1970-01-01"),
            "{text}"
        );
        assert!(
            text.contains("asked by ops-host-811, run by daemon-host-12"),
            "{text}"
        );
        assert_eq!(json["run_requests"][0]["state"], "running");
        assert_eq!(json["run_requests"][0]["claimed_by"], "daemon-host-12");
        assert!(text.contains("pending operations: 3"), "{text}");
        assert_eq!(json["pending_operations"]["total"], 3);
        assert!(text.contains("#7 unsub list 2 z***@example.com"), "{text}");
        assert_eq!(
            json["pending_operations"]["oldest"][0]["address"],
            "z***@example.com"
        );
        assert!(text.contains("bounce: 5"), "{text}");
        assert_eq!(json["suppressions"]["bounce"], 5);
        assert!(text.contains("open done: 9"), "{text}");
        assert_eq!(json["contact_history_records"][0]["kind"], "open");
        assert!(text.contains("list 1: adopted in list: 11"), "{text}");
        assert_eq!(json["members"][0]["origin"], "adopted");
        assert!(text.contains("parked operations: 1"), "{text}");
        assert!(
            text.contains("add list 1 l***@example.com refused in 5 runs"),
            "{text}"
        );
        assert!(text.contains("add_address_error 地址被拒绝"), "{text}");
        assert_eq!(json["parked_operations"]["total"], 1);
        assert_eq!(
            json["parked_operations"]["oldest"][0]["code"],
            "add_address_error"
        );
        assert_eq!(
            json["parked_operations"]["oldest"][0]["address"],
            "l***@example.com"
        );
    }
}
