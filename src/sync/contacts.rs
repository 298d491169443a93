//! One contacts run, in this order:
//!
//! 1. Load what the state DB records, then pull the whole CRM over it: a
//!    link-man mapped exactly as recorded marks its recorded member
//!    instead of being copied (`desired`). A pull that did not complete
//!    applies nothing (rule 7). Owned members whose link-man the pull
//!    did not return are looked at again by id before anything is
//!    planned (`vanished`).
//! 2. Read `unsubscribe-export` of every synced list; new lines are the
//!    daemon's own unsubscribes or user unsubscribes (rule 6).
//! 3. Resolve operations left pending by earlier runs by checking the list
//!    (rule 9).
//! 4. Read whole lists where rule 5 asks for it (before the first add
//!    into a list, and on `--full`); where the state DB is behind EDM
//!    (`behind`), look up the planned adds before sending them.
//! 5. Plan (pure), check the safety limits (rule 7); `--dry-run` stops
//!    here and changes nothing.
//! 6. Apply: state-only changes, then unsubscribes, adds (batched) and
//!    edits, each recorded as pending before it is sent and marked done
//!    after EDM confirms it.

use crate::domain::RunId;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use anyhow::Context as _;

use super::apply::Applier;
use super::behind;
use super::desired::{Desired, DesiredBuilder, MappingRules};
use super::lookup::lookup;
use super::plan::{check_safety, desired_total, members_per_list, plan_with, planned_adds};
use super::vanished::second_look;
use crate::domain::{Email, ListId, Members};
use crate::jobs::exports::View;
use crate::jobs::interpret::{reconcile_list, resolve_pending};
use crate::jobs::lifecycle::Run;
use crate::jobs::{Context, RunOptions};
use crate::state::{Finding, FindingKind, now_ms};
use crate::stored_enums::{Job, OpKind, OpStatus, RunStatus};

/// The job name in logs, runs and metrics.
pub const JOB: Job = Job::Contacts;

pub use super::report::{ContactsCounts, ContactsReport, Outcome, Preview};

/// Runs the contacts job once, records the run and emits its summary event.
#[tracing::instrument(name = "run", skip_all, fields(job = %JOB, run_id = tracing::field::Empty))]
pub async fn run(ctx: &Context, opts: RunOptions) -> anyhow::Result<ContactsReport> {
    // A dry run writes nothing, not even its own run row.
    let run = Run::start(ctx, JOB, !opts.dry_run).await?;
    let mut counts = ContactsCounts::default();
    let result = run_inner(ctx, opts, &run.id, &mut counts).await;
    let duration_ms = run.elapsed_ms();
    let counts_json = serde_json::to_value(&counts).unwrap_or_default();
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(e) => {
            let text = ctx.redactor.redact(&format!("{e:#}"));
            if let Err(db) = run
                .finish(ctx, RunStatus::Failed, &counts_json, Some(&text))
                .await
            {
                tracing::error!(run_id = %run.id, error = %format!("{db:#}"), "cannot record the end of the run");
            }
            summary_event(&run.id, &counts, duration_ms, RunStatus::Failed);
            return Err(e);
        }
    };
    let report = ContactsReport {
        run_id: run.id.clone(),
        counts,
        outcome,
        duration_ms,
    };
    let error = match &report.outcome {
        Outcome::Refused(r) => Some(r.to_string()),
        Outcome::Partial => Some(format!(
            "{} operations failed and stay pending",
            report.counts.failed
        )),
        Outcome::Applied | Outcome::DryRun(_) | Outcome::Interrupted => None,
    };
    if let Err(db) = run
        .finish(ctx, report.status(), &counts_json, error.as_deref())
        .await
    {
        // Counted as failed: what it did is not on record.
        summary_event(&run.id, &report.counts, duration_ms, RunStatus::Failed);
        return Err(db.context("cannot record the end of the run"));
    }
    summary_event(&run.id, &report.counts, duration_ms, report.status());
    Ok(report)
}

fn summary_event(run_id: &RunId, c: &ContactsCounts, duration_ms: u64, status: RunStatus) {
    tracing::info!(
        job = %JOB,
        run_id = %run_id,
        status = %status,
        added = c.added,
        updated = c.updated,
        unsubscribed = c.unsubscribed,
        adopted = c.adopted,
        skipped_invalid = c.skipped_invalid,
        suppressed = c.suppressed,
        failed = c.failed,
        refused = c.refused,
        parked = c.parked,
        duplicates = c.duplicates,
        user_unsubscribes = c.user_unsubscribes,
        recovered = c.recovered,
        customers = c.customers,
        linkmen = c.linkmen,
        edm_writes = c.edm_writes,
        customers_read_late = c.second_look.customers_read_late,
        vanished_confirmed = c.second_look.vanished_confirmed,
        vanished_kept = c.second_look.vanished_kept,
        vanished_unconfirmed = c.second_look.vanished_unconfirmed,
        lists_behind = c.lists_behind,
        relearnt = c.relearnt,
        forgotten = c.forgotten,
        duration_ms,
        "run finished"
    );
}

async fn run_inner(
    ctx: &Context,
    opts: RunOptions,
    run_id: &RunId,
    counts: &mut ContactsCounts,
) -> anyhow::Result<Outcome> {
    // 1–4: reads only (the pull, the exports, the pending checks, the
    // list reads). A shutdown drops them where they are: nothing was
    // written, and no read outlives the drain by more than the request in
    // flight, which is dropped with them.
    let Some(observed) = ctx.unless_shutdown(observe(ctx, opts, counts)).await else {
        tracing::info!("shutdown while reading the CRM and EDM; nothing was applied");
        return Ok(Outcome::Interrupted);
    };
    let observed = observed?;
    log_mapping(ctx, &observed.desired, !opts.dry_run).await;
    decide_and_apply(ctx, opts, run_id, counts, observed).await
}

/// What the read phase learnt, for the plan.
struct Observed {
    desired: Desired,
    members: Members,
    suppressions: crate::domain::Suppressions,
    obs: crate::state::Observations,
    /// The safety ratio's denominator: what the state DB recorded before
    /// this run changed anything.
    members_before: BTreeMap<ListId, usize>,
}

/// Steps 1–4b: everything the plan is made of, read and not yet written.
async fn observe(
    ctx: &Context,
    opts: RunOptions,
    counts: &mut ContactsCounts,
) -> anyhow::Result<Observed> {
    // 1. Pull, over what the state DB records: a link-man mapped exactly
    // as recorded is marked on the recorded member, not copied.
    let mut view = View::load(ctx).await?;
    let mut builder =
        DesiredBuilder::new(MappingRules::from_settings(&ctx.settings), &view.members);
    ctx.crm
        .pull_each(|c| builder.add(&c.customer.data, c.customer.id, &c.linkmen))
        .await
        .context("CRM pull did not complete; nothing was applied")?;
    // 1b. Nobody is unsubscribed for having vanished from one pull only.
    counts.second_look = second_look(ctx, &mut builder, &view.members).await;
    counts.customers = builder.customers;
    counts.linkmen = builder.linkmen;
    let mut desired = builder.finish();
    // Forgotten addresses have no member row (they are kept hashed): a
    // link-man that still has one is never a candidate again.
    counts.forgotten = desired.members.drop_forgotten(&view.suppressions.forgotten);
    view.members
        .want_as_is(std::mem::take(&mut desired.as_is))?;
    counts.desired = desired_total(&desired.members, &view.members);
    counts.skipped_invalid = desired.invalid.len();
    counts.without_email = desired.without_email;
    counts.duplicates = desired.collisions.len();
    let lists = ctx.settings.synced_lists();
    let members_before = members_per_list(&view.members);

    // 2. Exports.
    counts.user_unsubscribes = view.read_exports(ctx, &lists).await?;
    let View {
        mut members,
        suppressions,
        books,
        mut obs,
        ..
    } = view;

    // 3. Operations left pending by earlier runs.
    counts.recovered = check_pending(ctx, &mut members, &mut obs).await?;
    desired.members.take_reopened(&mut members);

    // 4. Whole-list reads (rule 5), then 4b: a state database behind
    // EDM re-learns before it writes.
    let first_adds = planned_adds(&desired.members, &members, &suppressions);
    let adds_into: BTreeSet<ListId> = first_adds.iter().map(|k| k.list_id).collect();
    for &list_id in &lists {
        let first_add = adds_into.contains(&list_id)
            && books
                .get(&list_id)
                .and_then(|b| b.initial_read_at)
                .is_none();
        if opts.full || first_add {
            read_whole_list(ctx, list_id, &mut members, &mut obs).await?;
            counts.lists_read += 1;
        }
    }
    let candidates = behind::candidates(&adds_into, &obs);
    for list in behind::lists_behind(ctx, &candidates, &members).await? {
        counts.lists_behind += 1;
        counts.relearnt += behind::relearn(ctx, list, &first_adds, &mut members, &mut obs).await?;
    }
    drop(first_adds);
    Ok(Observed {
        desired,
        members,
        suppressions,
        obs,
        members_before,
    })
}

/// Step 3: looks up in EDM the operations earlier runs left pending, and
/// settles them. Returns how many had in fact been done.
async fn check_pending(
    ctx: &Context,
    members: &mut Members,
    obs: &mut crate::state::Observations,
) -> anyhow::Result<usize> {
    let mut recovered = 0;
    let pending = ctx.store.pending_operations().await?;
    let mut pending_by_list: BTreeMap<ListId, Vec<_>> = BTreeMap::new();
    for op in pending {
        pending_by_list.entry(op.list_id).or_default().push(op);
    }
    for (list_id, ops) in pending_by_list {
        let to_check: Vec<Email> = ops
            .iter()
            .filter(|op| op.kind != OpKind::Edit)
            .filter_map(|op| Email::parse(&op.email).ok())
            .collect();
        let found = if to_check.is_empty() {
            HashMap::new()
        } else {
            lookup(ctx, list_id, &to_check, members.present_in(list_id))
                .await
                .with_context(|| {
                    format!("cannot check list {list_id} for operations left pending")
                })?
        };
        for (op, r) in ops.iter().zip(resolve_pending(&ops, &found, members)) {
            if r.status == OpStatus::Done {
                recovered += 1;
                obs.audit.extend(settled_entry(op, r.member.as_ref()));
            }
            if let Some(m) = r.member {
                members.insert(m.key.clone(), m.clone());
                obs.members.push(m);
            }
            obs.resolved_ops.push((r.op_id, r.status));
        }
        tracing::info!(
            list_id = list_id.0,
            operations = ops.len(),
            "operations left pending by an earlier run resolved"
        );
    }
    Ok(recovered)
}

/// The consent-trail entry of an add or unsubscribe an earlier run sent
/// and this one found done (`member`: the row it leaves).
fn settled_entry(
    op: &crate::state::PendingOperation,
    member: Option<&crate::domain::MemberState>,
) -> Option<crate::state::AuditEntry> {
    use crate::state::AuditEntry;
    use crate::stored_enums::{AuditEvent, AuditSource, UnsubReason};
    let entry = match op.kind {
        OpKind::Add => AuditEntry::now(AuditEvent::Added, AuditSource::Crm, &op.email),
        OpKind::Unsub => {
            AuditEntry::unsubscribed(&op.email, op.reason.unwrap_or(UnsubReason::LinkmanDeleted))
        }
        OpKind::Edit => return None,
    };
    let (link_man_id, customer_id) = member
        .map(|m| (m.link_man_id, m.customer_id))
        .unwrap_or((op.link_man_id, op.customer_id));
    Some(entry.in_list(op.list_id).by(link_man_id, customer_id))
}

/// Step 4 for one list: reads it whole and takes what EDM holds as the
/// record (a first add into it, or `--full`).
async fn read_whole_list(
    ctx: &Context,
    list_id: ListId,
    members: &mut Members,
    obs: &mut crate::state::Observations,
) -> anyhow::Result<()> {
    let read_at = now_ms();
    let addresses = ctx
        .edm
        .addr_all(list_id)
        .await
        .with_context(|| format!("cannot read list {list_id}; nothing was applied"))?;
    let found = reconcile_list(list_id, &addresses, members);
    tracing::info!(
        list_id = list_id.0,
        addresses = addresses.len(),
        duplicates = found.duplicates,
        missing = found.missing,
        drifted = found.drifted,
        "list read"
    );
    if found.missing > 0 || found.drifted > 0 {
        tracing::warn!(
            list_id = list_id.0,
            missing = found.missing,
            drifted = found.drifted,
            "EDM list drifted from the state DB; repairing"
        );
    }
    for m in found.members {
        members.insert(m.key.clone(), m.clone());
        obs.members.push(m);
    }
    obs.list_reads.push((list_id, read_at));
    Ok(())
}

/// Steps 5–6: the plan, its safety check, and (unless a dry run or
/// refused) its application.
async fn decide_and_apply(
    ctx: &Context,
    opts: RunOptions,
    run_id: &RunId,
    counts: &mut ContactsCounts,
    observed: Observed,
) -> anyhow::Result<Outcome> {
    let Observed {
        mut desired,
        mut members,
        suppressions,
        obs,
        members_before,
    } = observed;
    // Members the read phase replaced are desired as the pull saw them.
    desired.members.take_reopened(&mut members);
    let desired_count = desired_total(&desired.members, &members);
    // The plan takes the desired members' texts over.
    let the_plan = plan_with(
        desired.members,
        &desired.departures,
        &members,
        &suppressions,
    );
    counts.suppressed = the_plan.suppressed.len();
    let safety = check_safety(
        &the_plan,
        desired_count,
        &members_before,
        ctx.settings.sync.max_unsubscribe_ratio,
    );
    if opts.dry_run {
        return Ok(preview(counts, the_plan, &obs, safety));
    }
    ctx.store.persist_observations(&obs, Some(run_id)).await?;
    if let Err(refusal) = safety {
        if opts.force {
            tracing::warn!(reason = %refusal, "safety limit exceeded; applying because of --force");
            ctx.store
                .append_audit(&forced_entries(&the_plan, &refusal, run_id))
                .await?;
        } else {
            tracing::error!(reason = %refusal, "plan refused");
            return Ok(Outcome::Refused(refusal));
        }
    }

    // 6. Apply.
    let mut applier = Applier::new(ctx, run_id, &mut members, counts, opts.retry_parked);
    applier.apply(the_plan).await?;
    if ctx.shutdown.is_cancelled() {
        return Ok(Outcome::Interrupted);
    }
    Ok(if applier.counts.failed > 0 {
        Outcome::Partial
    } else {
        Outcome::Applied
    })
}

/// The consent-trail entries of a run forced past a safety limit: one per
/// planned unsubscribe, before it is sent, naming the limit it passed.
fn forced_entries(
    the_plan: &super::plan::Plan,
    refusal: &super::plan::PlanRefusal,
    run_id: &RunId,
) -> Vec<crate::state::AuditEntry> {
    use crate::state::AuditEntry;
    use crate::stored_enums::{AuditEvent, AuditSource};
    let passed = refusal.to_string();
    the_plan
        .unsubs
        .iter()
        .map(|u| {
            AuditEntry::now(
                AuditEvent::Forced,
                AuditSource::Operator,
                u.key.email.as_str(),
            )
            .in_list(u.key.list_id)
            .by(u.link_man_id, None)
            .because(u.reason.as_str())
            .detail(passed.clone())
            .in_run(Some(run_id))
        })
        .collect()
}

/// A dry run's answer: the plan, the user unsubscribes it would record,
/// and the refusal a real run would meet.
fn preview(
    counts: &mut ContactsCounts,
    the_plan: super::plan::Plan,
    obs: &crate::state::Observations,
    safety: Result<(), super::plan::PlanRefusal>,
) -> Outcome {
    counts.added = the_plan.adds.len();
    counts.updated = the_plan.edits.len();
    counts.unsubscribed = the_plan.unsubs.len();
    counts.adopted = the_plan.adoptions();
    if let Err(refusal) = &safety {
        tracing::warn!(reason = %refusal, "dry run: this plan would be refused");
    }
    let user_unsubscribes = obs
        .suppressions
        .iter()
        .filter_map(|s| {
            let list_id = s.list_id?;
            Email::parse(&s.email)
                .ok()
                .map(|e| crate::domain::MemberKey::new(list_id, e))
        })
        .collect();
    Outcome::DryRun(Box::new(super::report::Preview {
        plan: the_plan,
        user_unsubscribes,
        refusal: safety.err(),
    }))
}

/// Logs each invalid email and each address link-men share once: a
/// finding an earlier run logged, still true, is not logged again (a
/// finding that went away and came back is). Every run's summary counts
/// them (`skipped_invalid`, `duplicates`). `record`: remember what was
/// logged (not in a dry run). If the memory cannot be read, everything is
/// logged.
async fn log_mapping(ctx: &Context, desired: &Desired, record: bool) {
    let before = match ctx.store.log_notes().await {
        Ok(notes) => notes,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot read which findings were logged; logging them all");
            HashSet::new()
        }
    };
    let mut current = HashMap::new();
    for invalid in &desired.invalid {
        let digest = note_digest(&format!(
            "invalid\0{}\0{}\0{}",
            invalid.link_man_id, invalid.masked, invalid.reason
        ));
        if !before.contains(&digest) {
            tracing::info!(
                link_man_id = invalid.link_man_id.0,
                customer_id = invalid.customer_id.0,
                address = %invalid.masked,
                reason = %invalid.reason,
                "invalid email skipped"
            );
        }
        current.insert(
            digest,
            Finding {
                kind: FindingKind::Invalid,
                address: invalid.address.clone(),
                link_man_id: invalid.link_man_id,
                customer_id: Some(invalid.customer_id),
                list_id: None,
                detail: invalid.reason.to_string(),
            },
        );
    }
    for c in &desired.collisions {
        let digest = note_digest(&format!(
            "shared\0{}\0{}\0{}\0{:?}",
            c.key.list_id, c.key.email, c.owner, c.others
        ));
        if !before.contains(&digest) {
            tracing::warn!(
                list_id = c.key.list_id.0,
                address = %c.key.email.masked(),
                owner = c.owner.0,
                others = ?c.others,
                "link-men share an email in one list; the lowest id owns it"
            );
        }
        let others: Vec<String> = c.others.iter().map(|o| o.to_string()).collect();
        current.insert(
            digest,
            Finding {
                kind: FindingKind::Shared,
                address: c.key.email.as_str().to_string(),
                link_man_id: c.owner,
                customer_id: None,
                list_id: Some(c.key.list_id),
                detail: format!(
                    "link-man {} owns it; link-men {} have it too",
                    c.owner,
                    others.join(", ")
                ),
            },
        );
    }
    let changed = current.len() != before.len() || current.keys().any(|d| !before.contains(d));
    if record
        && changed
        && let Err(e) = ctx.store.set_log_notes(&before, &current).await
    {
        tracing::warn!(error = %format!("{e:#}"), "cannot record which findings were logged");
    }
    if !desired.repeated_linkmen.is_empty() {
        tracing::warn!(
            link_man_ids = ?desired.repeated_linkmen,
            "link-men returned by more than one customer; kept with the first"
        );
    }
}

/// The key a logged finding is remembered by (no address in the clear).
fn note_digest(finding: &str) -> String {
    use md5::Digest;
    hex::encode(md5::Md5::digest(finding.as_bytes()))
}
