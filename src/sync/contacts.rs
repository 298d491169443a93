//! One contacts run, in this order:
//!
//! 1. Pull the whole CRM. A pull that did not complete applies nothing
//!    (behaviour 7).
//! 2. Read `unsubscribe-export` of every synced list; new lines are the
//!    daemon's own unsubscribes or user unsubscribes (behaviour 6).
//! 3. Resolve operations left pending by earlier runs by checking the list
//!    (behaviour 9).
//! 4. Read whole lists where behaviour 5 asks for it (before the first add
//!    into a list, and on `--full`).
//! 5. Plan (pure), check the safety limits (behaviour 7); `--dry-run` stops
//!    here and changes nothing.
//! 6. Apply: state-only changes, then unsubscribes, adds (batched) and
//!    edits, each recorded as pending before it is sent and marked done
//!    after EDM confirms it.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::Context as _;
use serde::Serialize;

use super::desired::{Desired, DesiredBuilder, MappingRules};
use super::observe::{classify_export, reconcile_list, resolve_pending};
use super::plan::{
    MemberState, Origin, Plan, PlannedAdd, PlannedEdit, Refusal, Suppressions, check_safety,
    members_per_list, plan,
};
use super::{Context, RunOptions};
use crate::domain::{Email, ListId, MemberKey};
use crate::edm::EdmAddress;
use crate::remote::RemoteError;
use crate::state::{ListBook, NewOperation, Observations, now_ms};
use crate::states::{Job, OpKind, OpStatus, RunStatus};

/// The job name in logs, runs and metrics.
pub const JOB: Job = Job::Contacts;

/// What a contacts run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ContactsCounts {
    pub customers: usize,
    pub linkmen: usize,
    pub desired: usize,
    pub added: usize,
    pub updated: usize,
    pub unsubscribed: usize,
    pub adopted: usize,
    pub skipped_invalid: usize,
    pub suppressed: usize,
    pub failed: usize,
    pub duplicates: usize,
    pub without_email: usize,
    pub user_unsubscribes: usize,
    pub recovered: usize,
    pub lists_read: usize,
    pub edm_writes: usize,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Everything planned was applied (or the plan was empty).
    Applied,
    /// Some operations failed; they stay pending for the next run.
    Partial,
    /// The plan broke a safety limit and was not applied.
    Refused(Refusal),
    /// `--dry-run`: the plan, not applied.
    DryRun(Box<Plan>),
    /// Stopped by a shutdown between batches; what was not sent is
    /// planned again next run.
    Interrupted,
}

/// The result of a contacts run.
#[derive(Debug, Clone)]
pub struct ContactsReport {
    pub run_id: String,
    pub counts: ContactsCounts,
    pub outcome: Outcome,
    pub duration_ms: u64,
}

impl ContactsReport {
    /// Whether the run should make the process exit 0.
    pub fn is_success(&self) -> bool {
        matches!(
            self.outcome,
            Outcome::Applied | Outcome::DryRun(_) | Outcome::Interrupted
        )
    }

    fn status(&self) -> RunStatus {
        match self.outcome {
            Outcome::Applied => RunStatus::Succeeded,
            Outcome::DryRun(_) => RunStatus::Succeeded,
            Outcome::Interrupted => RunStatus::Interrupted,
            Outcome::Partial => RunStatus::Failed,
            Outcome::Refused(_) => RunStatus::Refused,
        }
    }
}

/// Runs the contacts job once, records the run and emits its summary event.
#[tracing::instrument(skip_all, fields(job = %JOB))]
pub async fn run(ctx: &Context, opts: RunOptions) -> anyhow::Result<ContactsReport> {
    let run_id = uuid::Uuid::new_v4().to_string();
    let started = Instant::now();
    // A dry run writes nothing, not even its own run row.
    let record = !opts.dry_run;
    if record {
        super::abandon_unfinished_runs(ctx).await?;
        ctx.store.start_run(&run_id, JOB, false).await?;
    }
    let mut counts = ContactsCounts::default();
    let result = run_inner(ctx, opts, &run_id, &mut counts).await;
    let duration_ms = started.elapsed().as_millis() as u64;
    let counts_json = serde_json::to_value(&counts).unwrap_or_default();
    let report = match result {
        Ok(outcome) => ContactsReport {
            run_id: run_id.clone(),
            counts,
            outcome,
            duration_ms,
        },
        Err(e) => {
            let text = ctx.redactor.redact(&format!("{e:#}"));
            if !record {
            } else if let Err(db) = ctx
                .store
                .finish_run(&run_id, RunStatus::Failed, &counts_json, Some(&text))
                .await
            {
                tracing::error!(run_id = %run_id, error = %format!("{db:#}"), "cannot record the end of the run");
            }
            summary_event(&run_id, &counts, duration_ms, RunStatus::Failed);
            crate::metrics::run_finished(JOB.as_str(), RunStatus::Failed.as_str());
            return Err(e);
        }
    };
    let error = match &report.outcome {
        Outcome::Refused(r) => Some(r.to_string()),
        Outcome::Partial => Some(format!(
            "{} operations failed and stay pending",
            report.counts.failed
        )),
        Outcome::Applied | Outcome::DryRun(_) | Outcome::Interrupted => None,
    };
    if record {
        ctx.store
            .finish_run(&run_id, report.status(), &counts_json, error.as_deref())
            .await?;
    }
    summary_event(&run_id, &report.counts, duration_ms, report.status());
    crate::metrics::run_finished(JOB.as_str(), report.status().as_str());
    crate::sync::refresh_pending(&ctx.store).await;
    Ok(report)
}

fn summary_event(run_id: &str, c: &ContactsCounts, duration_ms: u64, status: RunStatus) {
    tracing::info!(
        job = %JOB,
        run_id,
        status = %status,
        added = c.added,
        updated = c.updated,
        unsubscribed = c.unsubscribed,
        adopted = c.adopted,
        skipped_invalid = c.skipped_invalid,
        suppressed = c.suppressed,
        failed = c.failed,
        duplicates = c.duplicates,
        user_unsubscribes = c.user_unsubscribes,
        recovered = c.recovered,
        customers = c.customers,
        linkmen = c.linkmen,
        edm_writes = c.edm_writes,
        duration_ms,
        "run finished"
    );
}

async fn run_inner(
    ctx: &Context,
    opts: RunOptions,
    run_id: &str,
    counts: &mut ContactsCounts,
) -> anyhow::Result<Outcome> {
    let settings = &ctx.settings;
    // 1. Pull.
    let mut builder = DesiredBuilder::new(MappingRules::from_settings(settings));
    let pulled = tokio::select! {
        pulled = ctx.crm.pull_each(|c| builder.add(&c.customer.data, c.customer.id, &c.linkmen)) => pulled,
        _ = ctx.shutdown.cancelled() => {
            tracing::info!("shutdown during the CRM pull; nothing was applied");
            return Ok(Outcome::Interrupted);
        }
    };
    pulled.context("CRM pull did not complete; nothing was applied")?;
    counts.customers = builder.customers;
    counts.linkmen = builder.linkmen;
    let desired = builder.finish();
    log_mapping(&desired);
    counts.desired = desired.members.len();
    counts.skipped_invalid = desired.invalid.len();
    counts.without_email = desired.without_email;
    counts.duplicates = desired.collisions.len();

    let lists = settings.synced_lists();
    let mut view = View::load(ctx).await?;
    // The safety ratio's denominator: what the state DB recorded before
    // this run changed anything.
    let members_before = members_per_list(&view.members);

    // 2. Exports.
    counts.user_unsubscribes = view.read_exports(ctx, &lists).await?;
    let View {
        mut members,
        suppressions,
        books,
        mut obs,
    } = view;

    // 3. Operations left pending by earlier runs.
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
            lookup(ctx, list_id, &to_check, &members)
                .await
                .with_context(|| {
                    format!("cannot check list {list_id} for operations left pending")
                })?
        };
        for r in resolve_pending(&ops, &found, &members) {
            if r.status == OpStatus::Done {
                counts.recovered += 1;
            }
            if let Some(m) = r.member {
                members.insert(m.key.clone(), m.clone());
                obs.members.push(m);
            }
            obs.resolved_ops.push((r.op_id, r.status));
        }
        tracing::info!(
            list_id,
            operations = ops.len(),
            "operations left pending by an earlier run resolved"
        );
    }

    // 4. Whole-list reads (behaviour 5).
    let adds_into = plan(&desired.members, &members, &suppressions).lists_with_adds();
    for &list_id in &lists {
        let first_add = adds_into.contains(&list_id)
            && books
                .get(&list_id)
                .and_then(|b| b.initial_read_at)
                .is_none();
        if !(opts.full || first_add) {
            continue;
        }
        let read_at = now_ms();
        let addresses = ctx
            .edm
            .addr_all(list_id)
            .await
            .with_context(|| format!("cannot read list {list_id}; nothing was applied"))?;
        let found = reconcile_list(list_id, &addresses, &members);
        counts.lists_read += 1;
        tracing::info!(
            list_id,
            addresses = addresses.len(),
            duplicates = found.duplicates,
            missing = found.missing,
            drifted = found.drifted,
            "list read"
        );
        if found.missing > 0 || found.drifted > 0 {
            tracing::warn!(
                list_id,
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
    }

    // 5. Plan and safety.
    let the_plan = plan(&desired.members, &members, &suppressions);
    counts.suppressed = the_plan.suppressed.len();
    let safety = check_safety(
        &the_plan,
        desired.members.len(),
        &members_before,
        settings.sync.max_unsubscribe_ratio,
    );
    // The plan carries what it needs; the desired map can go.
    drop(desired);
    if opts.dry_run {
        counts.added = the_plan.adds.len();
        counts.updated = the_plan.edits.len();
        counts.unsubscribed = the_plan.unsubs.len();
        counts.adopted = the_plan.adoptions();
        if let Err(refusal) = &safety {
            tracing::warn!(reason = %refusal, "dry run: this plan would be refused");
        }
        return Ok(Outcome::DryRun(Box::new(the_plan)));
    }
    ctx.store.persist_observations(&obs).await?;
    if let Err(refusal) = safety {
        if opts.force {
            tracing::warn!(reason = %refusal, "safety limit exceeded; applying because of --force");
        } else {
            tracing::error!(reason = %refusal, "plan refused");
            return Ok(Outcome::Refused(refusal));
        }
    }

    // 6. Apply.
    let mut applier = Applier {
        ctx,
        run_id,
        members: &mut members,
        counts,
    };
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

/// What a run knows before it acts: the state DB's members, suppressions
/// and list bookkeeping, and what EDM showed during this run (not yet
/// written).
pub(crate) struct View {
    pub members: HashMap<MemberKey, MemberState>,
    pub suppressions: Suppressions,
    pub books: HashMap<ListId, ListBook>,
    pub obs: Observations,
}

impl View {
    pub async fn load(ctx: &Context) -> anyhow::Result<View> {
        Ok(View {
            members: ctx.store.load_members().await?,
            suppressions: ctx.store.load_suppressions().await?,
            books: ctx.store.list_books().await?,
            obs: Observations::default(),
        })
    }

    /// Reads `unsubscribe-export` of every list in `lists` and folds what
    /// the new lines mean (behaviour 6) into the view: the daemon's own
    /// unsubscribes are matched to their operations, every other new line
    /// is a user unsubscribe. Returns how many user unsubscribes were new.
    /// Shared by both jobs; an unreadable export is an error, because
    /// without it no write may be planned.
    pub async fn read_exports(&mut self, ctx: &Context, lists: &[ListId]) -> anyhow::Result<usize> {
        let mut user_unsubscribes = 0;
        for &list_id in lists {
            let read_at = now_ms();
            let lines = ctx.edm.unsubscribe_export(list_id).await.with_context(|| {
                format!("cannot read the unsubscribes of list {list_id}; nothing was applied")
            })?;
            let seen = ctx.store.seen_lines(list_id).await?;
            let since = self.books.get(&list_id).and_then(|b| b.export_read_at);
            let own = ctx.store.unmatched_unsubs(list_id, since).await?;
            let found = classify_export(list_id, &lines, &seen, &own, &self.members);
            user_unsubscribes += found.suppressions.len();
            for s in &found.suppressions {
                if let Ok(email) = Email::parse(&s.email) {
                    tracing::info!(list_id, address = %email.masked(), "user unsubscribe: suppressed from now on");
                    self.suppressions
                        .user
                        .insert(MemberKey::new(list_id, email));
                }
            }
            for m in found.departed {
                self.members.insert(m.key.clone(), m.clone());
                self.obs.members.push(m);
            }
            self.obs.new_lines.extend(found.new_lines);
            self.obs.matched_ops.extend(found.matched_ops);
            self.obs.suppressions.extend(found.suppressions);
            self.obs.export_reads.push((list_id, read_at));
        }
        Ok(user_unsubscribes)
    }
}

fn log_mapping(desired: &Desired) {
    for invalid in &desired.invalid {
        tracing::info!(
            link_man_id = invalid.link_man_id,
            customer_id = invalid.customer_id,
            address = %invalid.masked,
            reason = %invalid.reason,
            "invalid email skipped"
        );
    }
    for c in &desired.collisions {
        tracing::warn!(
            list_id = c.key.list_id,
            address = %c.key.email.masked(),
            owner = c.owner,
            others = ?c.others,
            "link-men share an email in one list; the lowest id owns it"
        );
    }
    if !desired.repeated_linkmen.is_empty() {
        tracing::warn!(
            link_man_ids = ?desired.repeated_linkmen,
            "link-men returned by more than one customer; kept with the first"
        );
    }
}

/// Finds which of `emails` list `list_id` holds: one keyword search each
/// when that is fewer requests than reading the whole list, else one
/// whole read.
async fn lookup(
    ctx: &Context,
    list_id: ListId,
    emails: &[Email],
    members: &HashMap<MemberKey, MemberState>,
) -> Result<HashMap<Email, EdmAddress>, RemoteError> {
    let known = members
        .values()
        .filter(|m| m.key.list_id == list_id && m.present)
        .count();
    let pages = known / ctx.edm.list_page_size() as usize + 1;
    let mut found: HashMap<Email, EdmAddress> = HashMap::new();
    let mut keep = |addr: EdmAddress| {
        if let Some(email) = addr.email.clone() {
            match found.get(&email) {
                Some(existing) if existing.id <= addr.id => {}
                _ => {
                    found.insert(email, addr);
                }
            }
        }
    };
    if emails.len() <= pages {
        for email in emails {
            for addr in ctx.edm.find(list_id, email).await? {
                keep(addr);
            }
        }
    } else {
        let wanted: std::collections::HashSet<&Email> = emails.iter().collect();
        ctx.edm
            .addr_each(list_id, |addr| {
                if addr.email.as_ref().is_some_and(|e| wanted.contains(e)) {
                    keep(addr);
                }
            })
            .await?;
    }
    Ok(found)
}

/// Applies a plan: every operation recorded before it is sent, marked done
/// after EDM confirms it.
struct Applier<'a> {
    ctx: &'a Context,
    run_id: &'a str,
    members: &'a mut HashMap<MemberKey, MemberState>,
    counts: &'a mut ContactsCounts,
}

/// An add or unsubscribe batch, and what is left of it to send.
enum BatchKind {
    Add,
    Unsub,
}

impl BatchKind {
    fn op(&self) -> OpKind {
        match self {
            BatchKind::Add => OpKind::Add,
            BatchKind::Unsub => OpKind::Unsub,
        }
    }
}

/// Up to `edm.batch_size` addresses of one list, sent in one request.
struct Batch {
    list_id: ListId,
    emails: Vec<Email>,
    /// What to add, by address (empty for an unsubscribe batch).
    adds: HashMap<Email, PlannedAdd>,
}

impl Applier<'_> {
    async fn apply(&mut self, plan: Plan) -> anyhow::Result<()> {
        // State-only changes first.
        if !plan.owner_changes.is_empty() {
            let rows: Vec<MemberState> = plan
                .owner_changes
                .iter()
                .filter_map(|c| {
                    self.members.get(&c.key).map(|m| MemberState {
                        origin: if c.adopt { Origin::Adopted } else { m.origin },
                        link_man_id: Some(c.link_man_id),
                        customer_id: Some(c.customer_id),
                        ..m.clone()
                    })
                })
                .collect();
            self.ctx.store.upsert_members(&rows).await?;
            for row in rows {
                self.members.insert(row.key.clone(), row);
            }
            self.counts.adopted = plan.adoptions();
        }
        let batch_size = self.ctx.settings.edm.batch_size;
        let unsubs = batches(plan.unsubs, batch_size, |u| &u.key, |_| None);
        if !self.send_batches(BatchKind::Unsub, unsubs).await? {
            return Ok(());
        }
        let adds = batches(plan.adds, batch_size, |a| &a.key, Some);
        if !self.send_batches(BatchKind::Add, adds).await? {
            return Ok(());
        }
        for (list_id, edits) in group_by_list(plan.edits, |e: &PlannedEdit| e.key.list_id) {
            if self.stopping() {
                return Ok(());
            }
            self.send_edits(list_id, edits).await?;
        }
        Ok(())
    }

    /// A shutdown was asked for: send no further batch.
    fn stopping(&self) -> bool {
        let stop = self.ctx.shutdown.is_cancelled();
        if stop {
            tracing::info!("shutdown: no further batches; the rest is planned again next run");
        }
        stop
    }

    /// Sends add or unsubscribe batches in order. Each batch's operations
    /// are recorded pending before it is sent (behaviour 9); the next
    /// batch's are recorded while the current one is out, so the state DB
    /// write is not between two EDM calls. A batch recorded but not sent,
    /// because the run stops, has its operations taken back. Returns false
    /// when a shutdown stopped it.
    async fn send_batches(&mut self, kind: BatchKind, batches: Vec<Batch>) -> anyhow::Result<bool> {
        let ctx = self.ctx;
        let run_id = self.run_id;
        let op = kind.op();
        let mut recorded = false;
        for (i, batch) in batches.iter().enumerate() {
            if self.stopping() {
                if recorded {
                    self.take_back(op, batch).await?;
                }
                return Ok(false);
            }
            if !recorded {
                let ops = self.operations(op, batch);
                ctx.store.record_operations(run_id, &ops).await?;
            }
            let Some(next) = batches.get(i + 1) else {
                self.deliver(&kind, batch).await?;
                break;
            };
            let next_ops = self.operations(op, next);
            let (delivered, next_recorded) = tokio::join!(
                self.deliver(&kind, batch),
                ctx.store.record_operations(run_id, &next_ops)
            );
            recorded = next_recorded.is_ok();
            if let Err(e) = delivered {
                if recorded {
                    self.take_back(op, next).await?;
                }
                return Err(e);
            }
            next_recorded?;
        }
        Ok(true)
    }

    /// Deletes the pending operations of a batch recorded but never sent.
    async fn take_back(&self, op: OpKind, batch: &Batch) -> anyhow::Result<()> {
        let emails: Vec<&Email> = batch.emails.iter().collect();
        self.ctx
            .store
            .forget_operations(self.run_id, op, batch.list_id, &emails)
            .await
    }

    /// The pending operations a batch is recorded as.
    fn operations(&self, op: OpKind, batch: &Batch) -> Vec<NewOperation> {
        let Batch {
            list_id,
            emails,
            adds,
        } = batch;
        let list_id = *list_id;
        emails
            .iter()
            .map(|email| {
                let key = MemberKey::new(list_id, email.clone());
                let add = adds.get(email);
                let existing = self.members.get(&key);
                NewOperation {
                    kind: op,
                    list_id,
                    email: email.clone(),
                    edm_id: existing.and_then(|m| m.edm_id),
                    link_man_id: add
                        .map(|a| a.link_man_id)
                        .or_else(|| existing.and_then(|m| m.link_man_id)),
                    customer_id: add
                        .map(|a| a.customer_id)
                        .or_else(|| existing.and_then(|m| m.customer_id)),
                    fields: add.map(|a| a.fields.clone()).unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Sends one recorded batch. When the answer is lost, the list is
    /// checked and only what did not take effect is sent again
    /// (behaviour 9), at most `edm.max_retries` times.
    async fn deliver(&mut self, kind: &BatchKind, batch: &Batch) -> anyhow::Result<()> {
        let Batch {
            list_id,
            emails,
            adds,
        } = batch;
        let list_id = *list_id;
        let op = kind.op();
        let mut remaining: Vec<Email> = emails.to_vec();
        let max_tries = self.ctx.settings.edm.max_retries + 1;
        for attempt in 1..=max_tries {
            let lines: Vec<String>;
            self.counts.edm_writes += 1;
            let result = match kind {
                BatchKind::Add => {
                    lines = remaining
                        .iter()
                        .map(|e| adds[e].fields.ml_addr_line(e))
                        .collect();
                    self.ctx.edm.add_batch(list_id, &lines).await
                }
                BatchKind::Unsub => self.ctx.edm.unsub(list_id, &remaining).await,
            };
            match result {
                Ok(()) => {
                    let done: Vec<(Email, Option<i64>)> =
                        remaining.drain(..).map(|e| (e, None)).collect();
                    self.complete(kind, list_id, done, adds).await?;
                    return Ok(());
                }
                Err(e) if e.is_auth() => {
                    let refs: Vec<&Email> = remaining.iter().collect();
                    let text = e.to_string();
                    self.ctx
                        .store
                        .note_failure(self.run_id, op, list_id, &refs, &text)
                        .await?;
                    return Err(
                        anyhow::Error::new(e).context("EDM refused the credentials; run stopped")
                    );
                }
                Err(e) if e.is_retriable() && e.maybe_applied() && attempt < max_tries => {
                    tracing::warn!(
                        list_id,
                        operation = %op,
                        count = remaining.len(),
                        attempt,
                        error = %e,
                        "answer lost; checking the list before sending again"
                    );
                    let found = match lookup(self.ctx, list_id, &remaining, self.members).await {
                        Ok(found) => found,
                        Err(check) => {
                            let refs: Vec<&Email> = remaining.iter().collect();
                            let text = format!("{e}; then checking the list failed: {check}");
                            self.ctx
                                .store
                                .note_failure(self.run_id, op, list_id, &refs, &text)
                                .await?;
                            tracing::error!(list_id, operation = %op, count = refs.len(), error = %text, "operations stay pending for the next run");
                            self.counts.failed += refs.len();
                            crate::metrics::operations(op.as_str(), "failed", refs.len());
                            return Ok(());
                        }
                    };
                    let (took_effect, again): (Vec<Email>, Vec<Email>) = match kind {
                        BatchKind::Add => remaining.drain(..).partition(|e| found.contains_key(e)),
                        BatchKind::Unsub => {
                            remaining.drain(..).partition(|e| !found.contains_key(e))
                        }
                    };
                    let done = took_effect
                        .into_iter()
                        .map(|e| {
                            let id = found.get(&e).map(|a| a.id);
                            (e, id)
                        })
                        .collect();
                    self.complete(kind, list_id, done, adds).await?;
                    remaining = again;
                    if remaining.is_empty() {
                        return Ok(());
                    }
                }
                Err(e) => {
                    let refs: Vec<&Email> = remaining.iter().collect();
                    let text = e.to_string();
                    self.ctx
                        .store
                        .note_failure(self.run_id, op, list_id, &refs, &text)
                        .await?;
                    tracing::error!(list_id, operation = %op, count = refs.len(), error = %text, "operations failed; they stay pending for the next run");
                    self.counts.failed += refs.len();
                    crate::metrics::operations(op.as_str(), "failed", refs.len());
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Marks operations done and records the members they produced.
    async fn complete(
        &mut self,
        kind: &BatchKind,
        list_id: ListId,
        done: Vec<(Email, Option<i64>)>,
        adds: &HashMap<Email, PlannedAdd>,
    ) -> anyhow::Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let rows: Vec<MemberState> = done
            .iter()
            .filter_map(|(email, edm_id)| {
                let key = MemberKey::new(list_id, email.clone());
                match kind {
                    BatchKind::Add => adds.get(email).map(|a| MemberState {
                        key,
                        origin: Origin::Owned,
                        present: true,
                        link_man_id: Some(a.link_man_id),
                        customer_id: Some(a.customer_id),
                        edm_id: *edm_id,
                        fields: a.fields.clone(),
                    }),
                    BatchKind::Unsub => self.members.get(&key).map(|m| MemberState {
                        present: false,
                        edm_id: None,
                        ..m.clone()
                    }),
                }
            })
            .collect();
        let refs: Vec<&Email> = done.iter().map(|(e, _)| e).collect();
        let op = match kind {
            BatchKind::Add => OpKind::Add,
            BatchKind::Unsub => OpKind::Unsub,
        };
        self.ctx
            .store
            .complete_operations(self.run_id, op, list_id, &refs, &rows)
            .await?;
        match kind {
            BatchKind::Add => self.counts.added += refs.len(),
            BatchKind::Unsub => self.counts.unsubscribed += refs.len(),
        }
        crate::metrics::operations(op.as_str(), "done", refs.len());
        for row in rows {
            self.members.insert(row.key.clone(), row);
        }
        Ok(())
    }

    /// Sends the edits of one list, finding EDM ids that are not known yet.
    async fn send_edits(&mut self, list_id: ListId, edits: Vec<PlannedEdit>) -> anyhow::Result<()> {
        let unknown: Vec<Email> = edits
            .iter()
            .filter(|e| e.edm_id.is_none())
            .map(|e| e.key.email.clone())
            .collect();
        let found = if unknown.is_empty() {
            HashMap::new()
        } else {
            lookup(self.ctx, list_id, &unknown, self.members)
                .await
                .with_context(|| format!("cannot find EDM ids for edits in list {list_id}"))?
        };
        let mut ready: Vec<(PlannedEdit, i64)> = Vec::with_capacity(edits.len());
        let mut vanished: Vec<MemberState> = Vec::new();
        for edit in edits {
            match edit
                .edm_id
                .or_else(|| found.get(&edit.key.email).map(|a| a.id))
            {
                Some(id) => ready.push((edit, id)),
                None => {
                    // EDM no longer holds it: mark it absent; the next run
                    // adds it again.
                    tracing::warn!(list_id, address = %edit.key.email.masked(), "member to edit is not in the EDM list; it will be added again next run");
                    if let Some(m) = self.members.get(&edit.key) {
                        vanished.push(MemberState {
                            present: false,
                            edm_id: None,
                            ..m.clone()
                        });
                    }
                }
            }
        }
        if !vanished.is_empty() {
            self.ctx.store.upsert_members(&vanished).await?;
            for m in vanished {
                self.members.insert(m.key.clone(), m);
            }
        }
        let records: Vec<NewOperation> = ready
            .iter()
            .map(|(e, id)| NewOperation {
                kind: OpKind::Edit,
                list_id,
                email: e.key.email.clone(),
                edm_id: Some(*id),
                link_man_id: Some(e.link_man_id),
                customer_id: Some(e.customer_id),
                fields: e.fields.clone(),
            })
            .collect();
        self.ctx
            .store
            .record_operations(self.run_id, &records)
            .await?;
        let mut done: Vec<MemberState> = Vec::new();
        for (edit, id) in ready {
            if self.ctx.shutdown.is_cancelled() {
                break;
            }
            self.counts.edm_writes += 1;
            match self.ctx.edm.edit(id, &edit.key.email, &edit.fields).await {
                Ok(()) => {
                    let base = self.members.get(&edit.key).cloned();
                    done.push(MemberState {
                        key: edit.key.clone(),
                        origin: base.as_ref().map(|m| m.origin).unwrap_or(Origin::Owned),
                        present: true,
                        link_man_id: Some(edit.link_man_id),
                        customer_id: Some(edit.customer_id),
                        edm_id: Some(id),
                        fields: edit.fields.clone(),
                    });
                    if done.len() >= crate::state::CHUNK {
                        self.complete_edits(list_id, std::mem::take(&mut done))
                            .await?;
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    self.ctx
                        .store
                        .note_failure(
                            self.run_id,
                            OpKind::Edit,
                            list_id,
                            &[&edit.key.email],
                            &text,
                        )
                        .await?;
                    if e.is_auth() {
                        self.complete_edits(list_id, done).await?;
                        return Err(anyhow::Error::new(e)
                            .context("EDM refused the credentials; run stopped"));
                    }
                    tracing::error!(list_id, address = %edit.key.email.masked(), error = %text, "edit failed; it stays pending for the next run");
                    self.counts.failed += 1;
                    crate::metrics::operations(OpKind::Edit.as_str(), "failed", 1);
                }
            }
        }
        self.complete_edits(list_id, done).await
    }

    async fn complete_edits(
        &mut self,
        list_id: ListId,
        done: Vec<MemberState>,
    ) -> anyhow::Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let emails: Vec<Email> = done.iter().map(|m| m.key.email.clone()).collect();
        let refs: Vec<&Email> = emails.iter().collect();
        self.ctx
            .store
            .complete_operations(self.run_id, OpKind::Edit, list_id, &refs, &done)
            .await?;
        self.counts.updated += done.len();
        crate::metrics::operations(OpKind::Edit.as_str(), "done", done.len());
        for m in done {
            self.members.insert(m.key.clone(), m);
        }
        Ok(())
    }
}

/// `items` as batches of at most `size` addresses, list by list; `add_of`
/// says what an item adds (nothing for an unsubscribe).
fn batches<T>(
    items: Vec<T>,
    size: usize,
    key_of: impl Fn(&T) -> &MemberKey,
    add_of: impl Fn(T) -> Option<PlannedAdd>,
) -> Vec<Batch> {
    let mut out = Vec::new();
    for (list_id, items) in group_by_list(items, |t| key_of(t).list_id) {
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let mut batch = Batch {
                list_id,
                emails: Vec::with_capacity(size),
                adds: HashMap::new(),
            };
            for item in items.by_ref().take(size.max(1)) {
                let email = key_of(&item).email.clone();
                if let Some(add) = add_of(item) {
                    batch.adds.insert(email.clone(), add);
                }
                batch.emails.push(email);
            }
            out.push(batch);
        }
    }
    out
}

fn group_by_list<T>(items: Vec<T>, list_of: impl Fn(&T) -> ListId) -> BTreeMap<ListId, Vec<T>> {
    let mut out: BTreeMap<ListId, Vec<T>> = BTreeMap::new();
    for item in items {
        out.entry(list_of(&item)).or_default().push(item);
    }
    out
}
