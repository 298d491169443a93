//! Applying a plan to EDM: every operation recorded pending before it is
//! sent and marked done after EDM confirms it (rule 9); adds and
//! unsubscribes in batches, the next batch recorded while the current one
//! is out; an answer lost is checked against the list before anything is
//! sent again.

use std::collections::{BTreeMap, HashMap};

use super::lookup::lookup;
use super::plan::{Plan, PlannedAdd, PlannedEdit};
use super::report::ContactsCounts;
use crate::domain::{AddressId, Email, ListId, MemberKey, MemberState, Members, Origin, RunId};
use crate::jobs::Context;
use crate::metrics::{Ended, Operation};
use crate::remote::{Idempotence, Next, RemoteError};
use crate::state::{AuditEntry, EdmRefusal, NewOperation, NewRefusal, RefusalKey};
use crate::stored_enums::{AuditEvent, AuditSource, OpKind, UnsubReason};

/// Applies a plan: every operation recorded before it is sent, marked done
/// after EDM confirms it.
pub struct Applier<'a> {
    pub ctx: &'a Context,
    pub run_id: &'a RunId,
    pub members: &'a mut Members,
    pub counts: &'a mut ContactsCounts,
    /// `--retry-parked`: send parked operations too.
    pub retry_parked: bool,
    /// The refusal memory, loaded when applying starts.
    pub refusals: HashMap<RefusalKey, EdmRefusal>,
    /// Members added by this run, per list. The rows themselves are in
    /// the state database only: nothing later in the run reads them, and
    /// keeping a first sync's million rows in `members` as well as its
    /// plan doubled its peak memory.
    added: BTreeMap<ListId, usize>,
    /// Why each planned unsubscribe is sent (few: the consent trail's
    /// reasons).
    unsub_reasons: HashMap<MemberKey, UnsubReason>,
    /// Consent-trail entries of parked operations `--retry-parked` sends.
    retried: Vec<AuditEntry>,
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

    /// The EDM call that sends it, as logs and errors name it.
    fn call(&self) -> &'static str {
        match self {
            BatchKind::Add => "ml-addr-add",
            BatchKind::Unsub => "ml-unsub",
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

impl<'a> Applier<'a> {
    pub fn new(
        ctx: &'a Context,
        run_id: &'a RunId,
        members: &'a mut Members,
        counts: &'a mut ContactsCounts,
        retry_parked: bool,
    ) -> Self {
        Applier {
            ctx,
            run_id,
            members,
            counts,
            retry_parked,
            refusals: HashMap::new(),
            added: BTreeMap::new(),
            unsub_reasons: HashMap::new(),
            retried: Vec::new(),
        }
    }

    /// How many addresses list `list_id` is believed to hold: the state
    /// database's present members and this run's adds.
    pub(super) fn known_in(&self, list_id: ListId) -> usize {
        self.members.present_in(list_id) + self.added.get(&list_id).copied().unwrap_or(0)
    }

    /// Whether the operation `(op, key)` with `content` is parked: EDM
    /// refused it in `edm.max_attempts` runs and it has not changed since.
    /// `--retry-parked` sends it anyway. Counts what it holds back.
    fn parked(&mut self, op: OpKind, key: &MemberKey, content: &str) -> bool {
        let held = self
            .refusals
            .get(&(op, key.list_id, key.email.to_string()))
            .is_some_and(|r| r.parked && r.content == content);
        if held && self.retry_parked {
            self.retried.push(
                AuditEntry::now(
                    AuditEvent::Retried,
                    AuditSource::Operator,
                    key.email.as_str(),
                )
                .in_list(key.list_id)
                .because(op.as_str())
                .in_run(Some(self.run_id)),
            );
            return false;
        }
        if held {
            self.counts.parked += 1;
        }
        held
    }

    /// Takes out of the plan the operations EDM refused in
    /// `edm.max_attempts` runs (unless `--retry-parked`, whose resends
    /// enter the consent trail).
    async fn hold_back_parked(&mut self, plan: &mut Plan) -> anyhow::Result<()> {
        let adds = std::mem::take(&mut plan.adds);
        plan.adds = adds
            .into_iter()
            .filter(|a| !self.parked(OpKind::Add, &a.key, &a.fields.ml_addr_line(&a.key.email)))
            .collect();
        let unsubs = std::mem::take(&mut plan.unsubs);
        plan.unsubs = unsubs
            .into_iter()
            .filter(|u| !self.parked(OpKind::Unsub, &u.key, ""))
            .collect();
        let edits = std::mem::take(&mut plan.edits);
        plan.edits = edits
            .into_iter()
            .filter(|e| !self.parked(OpKind::Edit, &e.key, &e.fields.ml_addr_line(&e.key.email)))
            .collect();
        self.ctx
            .store
            .append_audit(&std::mem::take(&mut self.retried))
            .await?;
        if self.counts.parked > 0 {
            tracing::warn!(
                count = self.counts.parked,
                "parked operations not sent (refused by EDM in edm.max_attempts runs); `status` lists them, --retry-parked sends them"
            );
        }
        Ok(())
    }

    /// Adoptions and owner changes: state only, no EDM write.
    async fn change_owners(&mut self, plan: &Plan) -> anyhow::Result<()> {
        let rows: Vec<MemberState> = plan
            .owner_changes
            .iter()
            .filter_map(|c| {
                self.members.get(&c.key).map(|m| MemberState {
                    origin: if c.adopt { Origin::Adopted } else { m.origin },
                    // Wanted again: no longer an address the daemon
                    // took out.
                    unsubscribed: m.unsubscribed && !c.adopt,
                    link_man_id: Some(c.link_man_id),
                    customer_id: Some(c.customer_id),
                    ..m.clone()
                })
            })
            .collect();
        let audit: Vec<AuditEntry> = plan
            .owner_changes
            .iter()
            .filter(|c| c.adopt)
            .map(|c| {
                AuditEntry::now(AuditEvent::Adopted, AuditSource::Crm, c.key.email.as_str())
                    .in_list(c.key.list_id)
                    .by(Some(c.link_man_id), Some(c.customer_id))
                    .in_run(Some(self.run_id))
            })
            .collect();
        self.ctx.store.upsert_members(&rows, &audit).await?;
        for row in rows {
            self.members.insert(row.key.clone(), row);
        }
        Ok(())
    }

    pub async fn apply(&mut self, mut plan: Plan) -> anyhow::Result<()> {
        self.refusals = self.ctx.store.load_refusals().await?;
        if !self.refusals.is_empty() {
            self.hold_back_parked(&mut plan).await?;
        }
        // State-only changes first.
        if !plan.owner_changes.is_empty() {
            self.change_owners(&plan).await?;
            self.counts.adopted = plan.adoptions();
        }
        let batch_size = self.ctx.settings.edm.batch_size;
        self.unsub_reasons = plan
            .unsubs
            .iter()
            .map(|u| (u.key.clone(), u.reason))
            .collect();
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

    /// The consent-trail entry of an add or unsubscribe that took effect
    /// (`m`: the member it left).
    fn trail_entry(&self, kind: &BatchKind, m: &MemberState) -> AuditEntry {
        let email = m.key.email.as_str();
        let entry = match kind {
            BatchKind::Add => AuditEntry::now(AuditEvent::Added, AuditSource::Crm, email),
            BatchKind::Unsub => AuditEntry::unsubscribed(
                email,
                self.unsub_reasons
                    .get(&m.key)
                    .copied()
                    .unwrap_or(UnsubReason::LinkmanDeleted),
            ),
        };
        entry
            .in_list(m.key.list_id)
            .by(m.link_man_id, m.customer_id)
            .in_run(Some(self.run_id))
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
    /// are recorded pending before it is sent (rule 9); the next
    /// batch's are recorded while the current one is out, so the state DB
    /// write is not between two EDM calls. A batch recorded but not sent,
    /// because the run stops, has its operations taken back. Returns false
    /// when a shutdown stopped it.
    async fn send_batches(
        &mut self,
        kind: BatchKind,
        batches: impl Iterator<Item = Batch> + Send,
    ) -> anyhow::Result<bool> {
        let ctx = self.ctx;
        let run_id = self.run_id;
        let op = kind.op();
        let mut recorded = false;
        let mut batches = batches.peekable();
        while let Some(batch) = batches.next() {
            if self.stopping() {
                if recorded {
                    self.take_back(op, &batch).await?;
                }
                return Ok(false);
            }
            if !recorded {
                let ops = self.operations(op, &batch);
                ctx.store.record_operations(run_id, &ops).await?;
            }
            let Some(next) = batches.peek() else {
                self.deliver(&kind, &batch).await?;
                break;
            };
            let next_ops = self.operations(op, next);
            let (delivered, next_recorded) = tokio::join!(
                self.deliver(&kind, &batch),
                ctx.store.record_operations(run_id, &next_ops)
            );
            recorded = next_recorded.is_ok();
            if let Err(e) = delivered {
                if recorded && let Some(next) = batches.peek() {
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
                    reason: (op == OpKind::Unsub)
                        .then(|| self.unsub_reasons.get(&key).copied())
                        .flatten(),
                }
            })
            .collect()
    }

    /// Sends one recorded batch, repeated as EDM's resend policy says:
    /// at most `edm.max_retries + 1` requests, and after a lost answer the
    /// list is checked and only what did not take effect is sent again
    /// (rule 9).
    async fn deliver(&mut self, kind: &BatchKind, batch: &Batch) -> anyhow::Result<()> {
        self.deliver_lines(kind, batch.list_id, batch.emails.to_vec(), &batch.adds)
            .await
    }

    /// Sends `emails` of one list as one request. A refusal with an EDM
    /// error code does not say which line it is about, so the lines are
    /// split in two and each half sent (bisection) until a refused line is
    /// alone: the others arrive in this run, at most
    /// `2 × ceil(log2(batch_size))` more requests per refused line.
    fn deliver_lines<'s>(
        &'s mut self,
        kind: &'s BatchKind,
        list_id: ListId,
        emails: Vec<Email>,
        adds: &'s HashMap<Email, PlannedAdd>,
    ) -> futures::future::BoxFuture<'s, anyhow::Result<()>> {
        Box::pin(self.deliver_lines_inner(kind, list_id, emails, adds))
    }

    async fn deliver_lines_inner(
        &mut self,
        kind: &BatchKind,
        list_id: ListId,
        emails: Vec<Email>,
        adds: &HashMap<Email, PlannedAdd>,
    ) -> anyhow::Result<()> {
        let op = kind.op();
        let mut remaining: Vec<Email> = emails;
        let ctx = self.ctx;
        let mut attempts = ctx
            .edm
            .resend_policy()
            .attempts(kind.call(), Idempotence::NotIdempotent);
        loop {
            self.prove_lease(op, list_id, remaining.len()).await?;
            let error = match self.send_lines(kind, list_id, &remaining, adds).await {
                Ok(()) => {
                    let done: Vec<(Email, Option<AddressId>)> =
                        remaining.drain(..).map(|e| (e, None)).collect();
                    return self.complete(kind, list_id, done, adds).await;
                }
                Err(e) if e.is_auth() => {
                    return self.stop_on_credentials(op, list_id, &remaining, e).await;
                }
                Err(e) if e.refusal().is_some() => {
                    return self
                        .isolate_refused(kind, list_id, remaining, adds, e)
                        .await;
                }
                Err(e) => e,
            };
            match attempts.after(error).await {
                Next::Again => {}
                Next::AgainAfterLoss(lost) => {
                    tracing::warn!(
                        list_id = list_id.0,
                        operation = %op,
                        count = remaining.len(),
                        attempt = attempts.made(),
                        error = %lost,
                        "answer lost; checking the list before sending again"
                    );
                    match self
                        .settle_lost(kind, list_id, remaining, adds, &lost)
                        .await?
                    {
                        Some(again) if !again.is_empty() => remaining = again,
                        _ => return Ok(()),
                    }
                }
                Next::GiveUp(error) => {
                    let text = error.to_string();
                    return self
                        .leave_pending(
                            op,
                            list_id,
                            &remaining,
                            &text,
                            "operations failed; they stay pending for the next run",
                        )
                        .await;
                }
            }
        }
    }

    /// EDM refused the credentials: the batch stays pending and the run
    /// stops.
    async fn stop_on_credentials(
        &mut self,
        op: OpKind,
        list_id: ListId,
        remaining: &[Email],
        e: RemoteError,
    ) -> anyhow::Result<()> {
        let refs: Vec<&Email> = remaining.iter().collect();
        self.ctx
            .store
            .note_failure(self.run_id, op, list_id, &refs, &e.to_string())
            .await?;
        Err(anyhow::Error::new(e).context("EDM refused the credentials; run stopped"))
    }

    /// EDM refused the batch with an error code: a batch of more than one
    /// line is split in two and each half delivered on its own; a line
    /// alone is refused.
    async fn isolate_refused(
        &mut self,
        kind: &BatchKind,
        list_id: ListId,
        mut remaining: Vec<Email>,
        adds: &HashMap<Email, PlannedAdd>,
        e: RemoteError,
    ) -> anyhow::Result<()> {
        if remaining.len() == 1 {
            return self
                .refuse_line(kind, list_id, &remaining[0], adds, &e)
                .await;
        }
        tracing::info!(
            list_id = list_id.0,
            operation = %kind.op(),
            count = remaining.len(),
            error = %e,
            "EDM refused the batch; splitting it to isolate the refused lines"
        );
        let second = remaining.split_off(remaining.len() / 2);
        self.deliver_lines(kind, list_id, remaining, adds).await?;
        self.deliver_lines(kind, list_id, second, adds).await
    }

    /// The batch was recorded (fenced) while the one before it was out;
    /// the lease is proved once more before it leaves.
    async fn prove_lease(&self, op: OpKind, list_id: ListId, n: usize) -> anyhow::Result<()> {
        if self.ctx.store.holds_lease().await {
            return Ok(());
        }
        Err(anyhow::anyhow!(
            "this instance no longer holds the state database's lease: batch of {n} {op} in list {list_id} not sent"
        ))
    }

    /// A line EDM refused on its own (its batch split down to it).
    async fn refuse_line(
        &mut self,
        kind: &BatchKind,
        list_id: ListId,
        email: &Email,
        adds: &HashMap<Email, PlannedAdd>,
        e: &RemoteError,
    ) -> anyhow::Result<()> {
        // What was sent, so that a parked add is sent again when it changes
        // (every add line has its member).
        let content = match kind {
            BatchKind::Add => adds
                .get(email)
                .map(|m| m.fields.ml_addr_line(email))
                .unwrap_or_default(),
            BatchKind::Unsub => String::new(),
        };
        self.refuse(kind.op(), list_id, email, content, e).await
    }

    /// One request for the batch: the add lines, or the addresses to
    /// unsubscribe.
    async fn send_lines(
        &mut self,
        kind: &BatchKind,
        list_id: ListId,
        remaining: &[Email],
        adds: &HashMap<Email, PlannedAdd>,
    ) -> Result<(), RemoteError> {
        self.counts.edm_writes += 1;
        match kind {
            BatchKind::Add => {
                // Every address of an add batch has its member; one without
                // (none) would be sent as the bare address.
                let lines: Vec<String> = remaining
                    .iter()
                    .map(|e| {
                        adds.get(e)
                            .map_or_else(|| e.as_str().to_string(), |m| m.fields.ml_addr_line(e))
                    })
                    .collect();
                self.ctx.edm.add_batch(list_id, &lines).await
            }
            BatchKind::Unsub => self.ctx.edm.unsub(list_id, remaining).await,
        }
    }

    /// After a lost answer (rule 9): looks the batch up in the list,
    /// completes what took effect, and returns what is to be sent again;
    /// `None` when the list could not be checked (the batch stays pending).
    async fn settle_lost(
        &mut self,
        kind: &BatchKind,
        list_id: ListId,
        mut remaining: Vec<Email>,
        adds: &HashMap<Email, PlannedAdd>,
        lost: &RemoteError,
    ) -> anyhow::Result<Option<Vec<Email>>> {
        let found = match lookup(self.ctx, list_id, &remaining, self.known_in(list_id)).await {
            Ok(found) => found,
            Err(check) => {
                let text = format!("{lost}; then checking the list failed: {check}");
                self.leave_pending(
                    kind.op(),
                    list_id,
                    &remaining,
                    &text,
                    "operations stay pending for the next run",
                )
                .await?;
                return Ok(None);
            }
        };
        let (took_effect, again): (Vec<Email>, Vec<Email>) = match kind {
            BatchKind::Add => remaining.drain(..).partition(|e| found.contains_key(e)),
            BatchKind::Unsub => remaining.drain(..).partition(|e| !found.contains_key(e)),
        };
        let done = took_effect
            .into_iter()
            .map(|e| {
                let id = found.get(&e).map(|a| a.id);
                (e, id)
            })
            .collect();
        self.complete(kind, list_id, done, adds).await?;
        Ok(Some(again))
    }

    /// Notes why a batch failed on its operations, which stay pending for
    /// the next run, and counts them failed.
    async fn leave_pending(
        &mut self,
        op: OpKind,
        list_id: ListId,
        remaining: &[Email],
        text: &str,
        message: &'static str,
    ) -> anyhow::Result<()> {
        let refs: Vec<&Email> = remaining.iter().collect();
        self.ctx
            .store
            .note_failure(self.run_id, op, list_id, &refs, text)
            .await?;
        tracing::error!(list_id = list_id.0, operation = %op, count = refs.len(), error = %text, "{message}");
        self.counts.failed += refs.len();
        crate::metrics::operations(metric_kind(op), Ended::Failed, refs.len());
        Ok(())
    }

    /// One line EDM refused on its own: its operation is superseded, the
    /// refusal remembered (parked after `edm.max_attempts` runs), the run
    /// counts it failed.
    pub(super) async fn refuse(
        &mut self,
        op: OpKind,
        list_id: ListId,
        email: &Email,
        content: String,
        e: &RemoteError,
    ) -> anyhow::Result<()> {
        let (code, message) = e.refusal().unwrap_or_default();
        let text = e.to_string();
        self.ctx
            .store
            .refuse_operations(self.run_id, op, list_id, &[email], &text)
            .await?;
        let max = self.ctx.settings.edm.max_attempts;
        let noted = self
            .ctx
            .store
            .note_refusals(
                self.run_id,
                &[NewRefusal {
                    kind: op,
                    list_id,
                    email: email.clone(),
                    content,
                    code: code.to_string(),
                    message: message.to_string(),
                }],
                max,
            )
            .await?;
        let runs = noted.first().map_or(1, |r| r.failed_runs);
        if noted.first().is_some_and(|r| r.parked) {
            let entry = AuditEntry::now(AuditEvent::Parked, AuditSource::Edm, email.as_str())
                .in_list(list_id)
                .because(op.as_str())
                .detail(format!("{code} {message}"))
                .in_run(Some(self.run_id));
            self.ctx.store.append_audit(&[entry]).await?;
            tracing::error!(list_id = list_id.0, operation = %op, address = %email.masked(), code, edm_message = message, runs, "EDM refused this operation in edm.max_attempts runs: parked, not sent again until it changes or --retry-parked");
        } else {
            tracing::error!(list_id = list_id.0, operation = %op, address = %email.masked(), code, edm_message = message, runs, max_attempts = max, "EDM refused this operation; the rest of its batch was applied");
        }
        if let Some(r) = noted.into_iter().next() {
            self.refusals.insert((op, list_id, email.to_string()), r);
        }
        self.counts.failed += 1;
        self.counts.refused += 1;
        crate::metrics::operations(metric_kind(op), Ended::Failed, 1);
        Ok(())
    }

    /// Forgets the refusals of operations that have now succeeded.
    pub(super) async fn forget_refused(
        &mut self,
        op: OpKind,
        list_id: ListId,
        emails: &[&Email],
    ) -> anyhow::Result<()> {
        if self.refusals.is_empty() {
            return Ok(());
        }
        let keys: Vec<RefusalKey> = emails
            .iter()
            .map(|e| (op, list_id, e.to_string()))
            .filter(|k| self.refusals.contains_key(k))
            .collect();
        for k in &keys {
            self.refusals.remove(k);
        }
        self.ctx.store.forget_refusals(&keys).await
    }

    /// Marks operations done and records the members they produced.
    async fn complete(
        &mut self,
        kind: &BatchKind,
        list_id: ListId,
        done: Vec<(Email, Option<AddressId>)>,
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
                        unsubscribed: false,
                        link_man_id: Some(a.link_man_id),
                        customer_id: Some(a.customer_id),
                        edm_id: *edm_id,
                        fields: a.fields.clone(),
                    }),
                    BatchKind::Unsub => self
                        .members
                        .get(&key)
                        .map(MemberState::unsubscribed_by_the_daemon),
                }
            })
            .collect();
        let refs: Vec<&Email> = done.iter().map(|(e, _)| e).collect();
        let op = match kind {
            BatchKind::Add => OpKind::Add,
            BatchKind::Unsub => OpKind::Unsub,
        };
        let audit: Vec<AuditEntry> = rows.iter().map(|m| self.trail_entry(kind, m)).collect();
        self.ctx
            .store
            .complete_operations(self.run_id, op, list_id, &refs, &rows, &audit)
            .await?;
        match kind {
            BatchKind::Add => self.counts.added += refs.len(),
            BatchKind::Unsub => self.counts.unsubscribed += refs.len(),
        }
        crate::metrics::operations(metric_kind(op), Ended::Done, refs.len());
        match kind {
            BatchKind::Add => *self.added.entry(list_id).or_default() += rows.len(),
            BatchKind::Unsub => {
                for row in rows {
                    self.members.insert(row.key.clone(), row);
                }
            }
        }
        let emails: Vec<Email> = done.into_iter().map(|(e, _)| e).collect();
        let refs: Vec<&Email> = emails.iter().collect();
        self.forget_refused(op, list_id, &refs).await
    }
}

/// `items` as batches of at most `size` addresses, list by list; `add_of`
/// says what an item adds (nothing for an unsubscribe). Each batch is made
/// when it is next, so only the batch out and the one after it exist at
/// once (a million adds made up front held a million-entry index). The
/// items are put in key order in place — they come in it, which the sort
/// sees in linear time — so each list is one run of them, rather than
/// copied into a `Vec` per list (88 MB beside the plan's own at a million
/// adds).
fn batches<T>(
    mut items: Vec<T>,
    size: usize,
    key_of: impl Fn(&T) -> &MemberKey + Copy,
    add_of: impl Fn(T) -> Option<PlannedAdd> + Copy,
) -> impl Iterator<Item = Batch> {
    items.sort_unstable_by(|a, b| key_of(a).cmp(key_of(b)));
    let size = size.max(1);
    let mut items = items.into_iter().peekable();
    std::iter::from_fn(move || {
        let list_id = key_of(items.peek()?).list_id;
        let mut batch = Batch {
            list_id,
            emails: Vec::with_capacity(size),
            adds: HashMap::new(),
        };
        while batch.emails.len() < size {
            let Some(item) = items.next_if(|i| key_of(i).list_id == list_id) else {
                break;
            };
            let email = key_of(&item).email.clone();
            if let Some(add) = add_of(item) {
                batch.adds.insert(email.clone(), add);
            }
            batch.emails.push(email);
        }
        Some(batch)
    })
}

fn group_by_list<T>(items: Vec<T>, list_of: impl Fn(&T) -> ListId) -> BTreeMap<ListId, Vec<T>> {
    let mut out: BTreeMap<ListId, Vec<T>> = BTreeMap::new();
    for item in items {
        out.entry(list_of(&item)).or_default().push(item);
    }
    out
}
/// The `kind` label an EDM operation is counted under.
fn metric_kind(op: OpKind) -> Operation {
    match op {
        OpKind::Add => Operation::Add,
        OpKind::Edit => Operation::Edit,
        OpKind::Unsub => Operation::Unsub,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CustomerId, LinkManId, MemberFields};

    fn add(list: i64, name: &str) -> PlannedAdd {
        PlannedAdd {
            key: MemberKey::new(ListId(list), Email::parse(&format!("{name}@x.cn")).unwrap()),
            link_man_id: LinkManId(1),
            customer_id: CustomerId(1),
            fields: MemberFields::named(name),
        }
    }

    #[test]
    fn batches_hold_one_list_each_at_most_size_addresses_in_key_order() {
        // Arrange: two lists' adds, interleaved and out of order.
        let items = vec![
            add(2, "d"),
            add(1, "c"),
            add(2, "a"),
            add(1, "a"),
            add(1, "b"),
            add(2, "b"),
            add(1, "d"),
        ];

        // Act
        let made: Vec<Batch> = batches(items, 3, |a| &a.key, Some).collect();

        // Assert: list 1 in two batches (3 + 1), then list 2 in one (3),
        // each address in key order and with what it adds.
        let shape: Vec<(i64, Vec<&str>)> = made
            .iter()
            .map(|b| (b.list_id.0, b.emails.iter().map(Email::as_str).collect()))
            .collect();
        assert_eq!(
            shape,
            [
                (1, vec!["a@x.cn", "b@x.cn", "c@x.cn"]),
                (1, vec!["d@x.cn"]),
                (2, vec!["a@x.cn", "b@x.cn", "d@x.cn"]),
            ]
        );
        for b in &made {
            for email in &b.emails {
                assert_eq!(b.adds[email].key.email, *email);
            }
        }
    }
}
