//! The write-back job: what recipients did with recent campaigns becomes
//! ContactHistory records on the right CRM customer and link-man, each
//! written once over the daemon's life (docs/sync-rules.md, "Write-back").
//!
//! 1. The synced lists' `unsubscribe-export` is read as the contacts job
//!    reads it, so user unsubscribes are current.
//! 2. Campaigns of the last `writeback.lookback_days` days that are sending
//!    or done; their opens (`track_status` ≥ 1), clicks (= 2) and hard
//!    bounces (`not_exist`, `user_reject`).
//! 3. Every hard-bounced address, known or not, becomes a suppression in
//!    every list.
//! 4. One record per once-only key; the ledger row is pending before the
//!    CRM call and done after `{"value": true}`. A row found pending and
//!    uncertain (the call may have reached the CRM) is sent again with a
//!    warning: that is the one case where a record can be written twice.
//!
//! The job makes no EDM writes.

pub mod events;

use crate::domain::RunId;
use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::domain::{CampaignId, ListId, RecordScope};
use crate::edm::{Campaign, HardBounce};
use crate::jobs::Context;
use crate::jobs::exports::View;
use crate::jobs::lifecycle::Run;
use crate::metrics::{Ended, Operation};
use crate::remote::{Idempotence, Next};
use crate::state::{LedgerRow, NewRecord, NewSuppression};
use crate::stored_enums::{Job, RecordKind, RunStatus, SuppressionReason, SuppressionSource};
use events::{CampaignEvents, MemberIndex, Unsubscribe};

/// The job name in logs, runs and metrics.
pub const JOB: Job = Job::Writeback;

/// What a write-back run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WritebackCounts {
    pub campaigns: usize,
    /// Records written, per kind.
    pub open: usize,
    pub click: usize,
    pub bounce: usize,
    pub unsubscribe: usize,
    /// Events of addresses no synced member has.
    pub unmatched: usize,
    /// Records that failed; they stay pending for the next run.
    pub failed: usize,
    /// Of those, records the CRM refused in `crm.max_attempts` runs, now
    /// parked: no longer sent until `--retry-parked`.
    pub parked: usize,
    /// Records already in the ledger (written, or pending and retried).
    pub already_recorded: usize,
    /// Pending records from earlier runs sent again.
    pub retried: usize,
    /// Of those, how many may have been written already (logged at warn).
    pub possibly_duplicated: usize,
    /// Addresses newly suppressed because they hard-bounced.
    pub new_bounce_suppressions: usize,
    /// User unsubscribes first seen by this run.
    pub new_user_unsubscribes: usize,
}

/// The result of a write-back run.
#[derive(Debug, Clone)]
pub struct WritebackReport {
    pub run_id: RunId,
    pub counts: WritebackCounts,
    pub duration_ms: u64,
}

impl WritebackReport {
    pub fn is_success(&self) -> bool {
        self.counts.failed == 0
    }
}

/// Runs the write-back job once, records the run and emits its summary.
pub async fn run(ctx: &Context) -> anyhow::Result<WritebackReport> {
    run_with(ctx, false).await
}

/// [`run`], sending parked records again when `retry_parked`
/// (`--retry-parked`).
#[tracing::instrument(name = "run", skip_all, fields(job = %JOB, run_id = tracing::field::Empty))]
pub async fn run_with(ctx: &Context, retry_parked: bool) -> anyhow::Result<WritebackReport> {
    let run = Run::start(ctx, JOB, true).await?;
    let run_id = run.id.clone();
    let mut counts = WritebackCounts::default();
    let result = run_inner(ctx, &run_id, retry_parked, &mut counts).await;
    let duration_ms = run.elapsed_ms();
    let counts_json = serde_json::to_value(&counts).unwrap_or_default();
    let (status, error) = match &result {
        Ok(()) if ctx.shutdown.is_cancelled() => (RunStatus::Interrupted, None),
        Ok(()) if counts.failed == 0 => (RunStatus::Succeeded, None),
        Ok(()) => (
            RunStatus::Failed,
            Some(format!("{} records failed and stay pending", counts.failed)),
        ),
        Err(e) => (
            RunStatus::Failed,
            Some(ctx.redactor.redact(&format!("{e:#}"))),
        ),
    };
    let mut result = result;
    let mut status = status;
    if let Err(db) = run
        .finish(ctx, status, &counts_json, error.as_deref())
        .await
    {
        tracing::error!(run_id = %run_id, error = %format!("{db:#}"), "cannot record the end of the run");
        // Counted as failed: what it did is not on record.
        status = RunStatus::Failed;
        if result.is_ok() {
            result = Err(db.context("cannot record the end of the run"));
        }
    }
    tracing::info!(
        job = %JOB,
        run_id = %run_id,
        status = %status,
        campaigns = counts.campaigns,
        open = counts.open,
        click = counts.click,
        bounce = counts.bounce,
        unsubscribe = counts.unsubscribe,
        unmatched = counts.unmatched,
        failed = counts.failed,
        parked = counts.parked,
        already_recorded = counts.already_recorded,
        retried = counts.retried,
        possibly_duplicated = counts.possibly_duplicated,
        new_bounce_suppressions = counts.new_bounce_suppressions,
        new_user_unsubscribes = counts.new_user_unsubscribes,
        duration_ms,
        "run finished"
    );
    result?;
    Ok(WritebackReport {
        run_id,
        counts,
        duration_ms,
    })
}

/// Today in EDM's zone (`edm.timezone`): the day `task-list` files a
/// campaign sent now under. At 23:30 UTC it is already tomorrow in Beijing.
pub fn edm_today(now: chrono::DateTime<chrono::Utc>, zone: chrono_tz::Tz) -> chrono::NaiveDate {
    now.with_timezone(&zone).date_naive()
}

/// The dates (`YYYY-MM-DD`, in EDM's zone) of the last `days` days, today
/// first.
pub fn lookback_dates(today: chrono::NaiveDate, days: u32) -> Vec<String> {
    (0..days as i64)
        .map(|d| {
            (today - chrono::Duration::days(d))
                .format("%Y-%m-%d")
                .to_string()
        })
        .collect()
}

async fn run_inner(
    ctx: &Context,
    run_id: &RunId,
    retry_parked: bool,
    counts: &mut WritebackCounts,
) -> anyhow::Result<()> {
    let lists = ctx.settings.synced_lists();
    settle_owed_records(ctx).await?;

    // 1. Unsubscribes, as the contacts job classifies them.
    let mut view = View::load_lean(ctx).await?;
    let Some(read) = ctx.unless_shutdown(view.read_exports(ctx, &lists)).await else {
        tracing::info!(
            "shutdown while reading the unsubscribe exports; nothing more is read or written"
        );
        return Ok(());
    };
    counts.new_user_unsubscribes = read?;
    ctx.store
        .persist_observations(&view.obs, Some(run_id))
        .await?;
    let View { suppressions, .. } = view;

    // 2. Campaigns and their events.
    let Some(read) = ctx.unless_shutdown(read_campaign_events(ctx)).await else {
        tracing::info!("shutdown while reading campaigns; nothing more is read or written");
        return Ok(());
    };
    let all_events = read?;
    counts.campaigns = all_events.len();

    // 3. Hard bounces suppress, known or not.
    counts.new_bounce_suppressions =
        suppress_hard_bounces(ctx, run_id, &all_events, &suppressions).await?;

    // 4. Records, by the owners of the addresses the events and the
    // unsubscribes name (read for those addresses only). They own what
    // they need: the members and the events are not held through the
    // sending.
    let records = build_records(ctx, &all_events, counts).await?;
    drop(all_events);
    let to_send = ledger_records(ctx, records, retry_parked, counts).await?;
    send_all(ctx, run_id, to_send, counts).await
}

/// Step 3: suppresses in every list each hard-bounced address not
/// suppressed yet; returns how many.
async fn suppress_hard_bounces(
    ctx: &Context,
    run_id: &RunId,
    all_events: &[CampaignEvents],
    suppressions: &crate::domain::Suppressions,
) -> anyhow::Result<usize> {
    let mut new_bounces: Vec<NewSuppression> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for ev in all_events {
        for (bounce_type, address) in &ev.bounces {
            let already = crate::domain::Email::parse(address)
                .map(|e| suppressions.bounced.contains(&e))
                .unwrap_or(false);
            if !already && seen.insert(address.as_str()) {
                new_bounces.push(NewSuppression {
                    list_id: None,
                    email: address.clone(),
                    reason: SuppressionReason::Bounce,
                    source: SuppressionSource::Bounce {
                        campaign_id: ev.campaign.id,
                        bounce_type: *bounce_type,
                    },
                });
            }
        }
    }
    if !new_bounces.is_empty() {
        ctx.store
            .add_suppressions(&new_bounces, Some(run_id))
            .await?;
        tracing::info!(
            count = new_bounces.len(),
            "hard-bounced addresses suppressed in every list"
        );
    }
    Ok(new_bounces.len())
}

/// Step 4: the records the events and the recipients' unsubscribes call
/// for, by the members who own their addresses.
async fn build_records(
    ctx: &Context,
    all_events: &[CampaignEvents],
    counts: &mut WritebackCounts,
) -> anyhow::Result<Vec<NewRecord>> {
    let list_names: HashMap<ListId, String> = match ctx.edm.maillist_list().await {
        Ok(ls) => ls.into_iter().map(|l| (l.id, l.subject)).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read list names; records name lists by id");
            HashMap::new()
        }
    };
    let unsubscribes = recipient_unsubscribes(ctx).await?;
    let named = addresses_named(all_events, &unsubscribes);
    let members = ctx.store.members_with_addresses(&named).await?;
    drop(named);
    let index = MemberIndex::new(&members);
    let (records, unmatched) = events::records(
        all_events,
        &unsubscribes,
        &index,
        &ctx.settings.writeback.templates,
        &list_names,
    );
    counts.unmatched = unmatched.total();
    if unmatched.total() > 0 {
        tracing::info!(
            open = unmatched.open,
            click = unmatched.click,
            bounce = unmatched.bounce,
            unsubscribe = unmatched.unsubscribe,
            "events of addresses no synced member has were skipped"
        );
    }
    Ok(records)
}

/// Every address an event or an unsubscribe names, once.
fn addresses_named<'e>(
    all_events: &'e [CampaignEvents],
    unsubscribes: &'e [Unsubscribe],
) -> Vec<&'e str> {
    let mut out: Vec<&str> = all_events
        .iter()
        .flat_map(|ev| {
            let opens = ev.opens.iter().map(|o| o.address.as_str());
            let clicks = ev.clicks.iter().map(|c| c.address.as_str());
            let bounces = ev.bounces.iter().map(|(_, a)| a.as_str());
            opens.chain(clicks).chain(bounces)
        })
        .chain(unsubscribes.iter().map(|u| u.address.as_str()))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The recipients' own unsubscribes from the synced lists, as the export
/// classification recorded them.
async fn recipient_unsubscribes(ctx: &Context) -> anyhow::Result<Vec<Unsubscribe>> {
    let synced: HashSet<ListId> = ctx.settings.synced_lists().into_iter().collect();
    Ok(ctx
        .store
        .user_unsubscribes()
        .await?
        .into_iter()
        .filter(|(list, _, _)| synced.contains(list))
        // Read while the state database was behind: perhaps the daemon's
        // own unsubscribe, so no "recipient unsubscribed" record is
        // written for it.
        .filter(|(_, _, source)| !source.while_behind())
        .map(|(list_id, address, source)| Unsubscribe {
            list_id,
            address,
            time: match source {
                SuppressionSource::Export { time } => time,
                // Not written by this version for a user unsubscribe;
                // shown as it is.
                other @ (SuppressionSource::Bounce { .. }
                | SuppressionSource::ExportWhileBehind { .. }
                | SuppressionSource::Other(_)) => other.to_text(),
            },
        })
        .collect())
}

/// The ledger rows to send: those earlier runs left pending first (with
/// what they were recorded with), then `records` not in the ledger yet,
/// recorded pending now.
async fn ledger_records(
    ctx: &Context,
    records: Vec<NewRecord>,
    retry_parked: bool,
    counts: &mut WritebackCounts,
) -> anyhow::Result<Vec<LedgerRow>> {
    if retry_parked {
        let n = ctx.store.unpark_records().await?;
        tracing::info!(
            count = n,
            "--retry-parked: parked contact-history records are sent again"
        );
    }
    let earlier = ctx.store.pending_records().await?;
    for row in earlier.iter().filter(|r| r.uncertain) {
        counts.possibly_duplicated += 1;
        tracing::warn!(
            kind = %row.kind,
            scope = %row.scope,
            link_man_id = row.link_man_id.0,
            attempts = row.attempts,
            "contact-history record may already be in the CRM (an earlier call's answer was lost); sending it again can write it twice"
        );
    }
    counts.retried = earlier.len();
    let scopes: Vec<RecordScope> = records
        .iter()
        .map(|r| r.scope)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let known = ctx.store.ledger_keys(&scopes).await?;
    let total = records.len();
    let fresh: Vec<_> = records
        .into_iter()
        .filter(|r| !known.contains(&(r.kind, r.scope, r.link_man_id)))
        .collect();
    counts.already_recorded = total - fresh.len();
    let inserted = ctx.store.insert_records(&fresh).await?;
    let mut to_send = earlier;
    to_send.extend(inserted);
    Ok(to_send)
}

/// The campaigns sent (or sending) in the lookback window, with their
/// opens, clicks and hard bounces: reads only.
async fn read_campaign_events(ctx: &Context) -> anyhow::Result<Vec<CampaignEvents>> {
    let settings = &ctx.settings;
    let today = edm_today(ctx.now(), settings.edm_zone());
    let mut campaigns: BTreeMap<CampaignId, Campaign> = BTreeMap::new();
    for date in lookback_dates(today, settings.writeback.lookback_days) {
        for c in ctx.edm.tasks_on(&date).await? {
            if c.send_status.has_gone_out() {
                campaigns.entry(c.id).or_insert(c);
            }
        }
    }
    let mut all_events = Vec::with_capacity(campaigns.len());
    for c in campaigns.into_values() {
        let mut ev = CampaignEvents::default();
        if c.tracking.opens() {
            ev.opens = ctx.edm.open_detail(c.id).await?;
        }
        if c.tracking.clicks() {
            ev.clicks = ctx.edm.click_detail(c.id).await?;
        }
        for bounce_type in HardBounce::ALL {
            for address in ctx
                .edm
                .failed_addresses(&c.send_date, bounce_type, c.id)
                .await?
            {
                ev.bounces.push((bounce_type, address));
            }
        }
        ev.campaign = c;
        all_events.push(ev);
    }
    Ok(all_events)
}

/// Sends the records with `crm.concurrency` calls in flight, refilled as
/// each answer arrives (a wave that waited for its slowest call cost a
/// quarter of the wall time at 20 ms latency).
///
/// The ledger is written in groups, never per record, and beside the calls
/// rather than between them: the next `concurrency` records are marked
/// uncertain (one write) while the current ones are out, and none is sent
/// before its mark is written; answers are recorded done `concurrency` at
/// a time (one write). A crash can thus leave at most `6 × concurrency`
/// records uncertain (one window in flight, one marked ahead, up to four
/// answered but not yet recorded while a write is slow; about two windows
/// in practice), and those are the only ones a later run re-sends with a
/// warning; a run that stops takes the mark back from those it never sent.
/// No database connection is held across a CRM call. A credentials error
/// stops new calls; a shutdown stops them too; the calls in flight are
/// awaited and recorded either way.
async fn send_all(
    ctx: &Context,
    run_id: &RunId,
    rows: Vec<LedgerRow>,
    counts: &mut WritebackCounts,
) -> anyhow::Result<()> {
    use futures::{FutureExt, StreamExt};

    let window = ctx.settings.crm.concurrency.max(1);
    let mut unsent = rows.into_iter();
    let mut ledger = Ledgering::new(window);
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut stopped = false;
    loop {
        // Answers not yet recorded hold back new calls past two windows, so
        // a slow database bounds what a crash can leave uncertain.
        while !stopped && in_flight.len() < window && ledger.done.len() < 2 * window {
            stopped = ledger.must_stop(ctx);
            if stopped {
                break;
            }
            let Some(row) = ledger.marked.pop_front() else {
                break;
            };
            in_flight.push(send_record(ctx, row).boxed());
        }
        if !stopped {
            ledger.mark_ahead(ctx, &mut unsent, window);
        }
        ledger.record_answers(ctx, window);
        if in_flight.is_empty() && ledger.marking.is_none() && ledger.recording.is_none() {
            // Nothing out and nothing being written: everything was sent,
            // or the run stopped.
            break;
        }
        tokio::select! {
            Some(answer) = in_flight.next(), if !in_flight.is_empty() => {
                ledger.on_answer(ctx, run_id, answer, counts).await;
            }
            next = when_some(&mut ledger.marking) => {
                ledger.marking = None;
                ledger.marked_ahead(next);
            }
            (ids, written) = when_some(&mut ledger.recording) => {
                ledger.recording = None;
                ledger_written(ids, written, &mut ledger.owed, &mut ledger.db_error);
            }
        }
    }
    ledger.finish(ctx).await
}

/// A record's call and what came of it: the row, the answer, and how many
/// times it was sent again after a lost answer.
type Sent = (LedgerRow, Result<(), crate::remote::RemoteError>, u32);

/// Sends one record, repeated as the CRM's resend policy says. A lost
/// answer (5xx, timeout, cut-short body) is repeated in the run too: the
/// CRM has nothing to check it against, so each such repeat is a warning
/// and counts as possibly duplicated (rule 10). The row stays marked
/// uncertain meanwhile.
async fn send_record(ctx: &Context, row: LedgerRow) -> Sent {
    let wb = &ctx.settings.writeback;
    let policy = ctx.crm.resend_policy();
    let mut attempts = policy.attempts("ContactHistory/Add", Idempotence::NotIdempotent);
    let mut resent = 0u32;
    loop {
        let answer = ctx
            .crm
            .add_contact_history(
                row.customer_id,
                row.link_man_id,
                wb.type_id,
                wb.route_id,
                &row.title,
                &row.content,
            )
            .await;
        let error = match answer {
            Ok(()) => return (row, Ok(()), resent),
            Err(error) => error,
        };
        match attempts.after(error).await {
            Next::Again => {}
            Next::AgainAfterLoss(lost) => {
                resent += 1;
                tracing::warn!(
                    kind = %row.kind,
                    scope = %row.scope,
                    link_man_id = row.link_man_id.0,
                    attempt = resent,
                    error = %lost,
                    "contact-history record may already be in the CRM (the call's answer was lost); sending it again in this run can write it twice"
                );
            }
            Next::GiveUp(error) => return (row, Err(error), resent),
        }
    }
}

/// The ledger's side of sending: the rows marked uncertain ahead of their
/// calls, the writes under way (one mark, one "done" at a time), the
/// answers not yet recorded, and what stops new calls.
struct Ledgering<'a> {
    marked: std::collections::VecDeque<LedgerRow>,
    marking: Option<futures::future::BoxFuture<'a, anyhow::Result<Vec<LedgerRow>>>>,
    recording: Option<futures::future::BoxFuture<'a, (Vec<i64>, anyhow::Result<()>)>>,
    /// Confirmed by the CRM, not yet recorded done.
    done: Vec<i64>,
    /// Confirmed by the CRM, and the ledger did not take their "done": the
    /// next run records them (not sent again).
    owed: Vec<i64>,
    /// A ledger write that failed (a full disk): no new call is made, the
    /// calls in flight are awaited, and what the CRM confirmed is owed.
    db_error: Option<anyhow::Error>,
    auth_error: Option<crate::remote::RemoteError>,
}

impl<'a> Ledgering<'a> {
    fn new(window: usize) -> Ledgering<'a> {
        Ledgering {
            marked: Default::default(),
            marking: None,
            recording: None,
            done: Vec::with_capacity(window),
            owed: Vec::new(),
            db_error: None,
            auth_error: None,
        }
    }

    /// Whether no further call may start: a rejected token, a ledger that
    /// takes no writes, or a shutdown.
    fn must_stop(&self, ctx: &Context) -> bool {
        if self.auth_error.is_some() || self.db_error.is_some() {
            return true;
        }
        if ctx.shutdown.is_cancelled() {
            tracing::info!("shutdown: no further contact-history records; the rest stay pending");
            return true;
        }
        false
    }

    /// Marks the next window uncertain (one write) while the current one
    /// is out, when nothing is marked ahead yet.
    fn mark_ahead(
        &mut self,
        ctx: &'a Context,
        unsent: &mut std::vec::IntoIter<LedgerRow>,
        window: usize,
    ) {
        use futures::FutureExt;
        if self.marking.is_some() || !self.marked.is_empty() || unsent.len() == 0 {
            return;
        }
        let next: Vec<LedgerRow> = unsent.by_ref().take(window).collect();
        self.marking = Some(
            async move {
                let ids: Vec<i64> = next.iter().map(|r| r.id).collect();
                ctx.store.mark_records_uncertain(&ids).await?;
                Ok(next)
            }
            .boxed(),
        );
    }

    /// What a mark write came to: rows ready to send, or a ledger error.
    fn marked_ahead(&mut self, next: anyhow::Result<Vec<LedgerRow>>) {
        match next {
            Ok(rows) => self.marked.extend(rows),
            Err(db) => {
                self.db_error.get_or_insert(db);
            }
        }
    }

    /// Records a window of answers done (one write), when one is full.
    fn record_answers(&mut self, ctx: &'a Context, window: usize) {
        use futures::FutureExt;
        if self.recording.is_some() || self.done.len() < window || self.db_error.is_some() {
            return;
        }
        let ids = std::mem::take(&mut self.done);
        self.recording = Some(
            async move {
                let written = ctx.store.records_done(&ids).await;
                (ids, written)
            }
            .boxed(),
        );
    }

    /// One record's answer: counted done, or refused (noted; a rejected
    /// token stops the sending).
    async fn on_answer(
        &mut self,
        ctx: &Context,
        run_id: &RunId,
        (row, answer, resent): Sent,
        counts: &mut WritebackCounts,
    ) {
        counts.possibly_duplicated += resent as usize;
        let e = match answer {
            Ok(()) => {
                self.done.push(row.id);
                match row.kind {
                    RecordKind::Open => counts.open += 1,
                    RecordKind::Click => counts.click += 1,
                    RecordKind::Bounce => counts.bounce += 1,
                    RecordKind::Unsubscribe => counts.unsubscribe += 1,
                }
                return;
            }
            Err(e) => e,
        };
        counts.failed += 1;
        crate::metrics::operations(Operation::ContactHistory, Ended::Failed, 1);
        self.settle_writes().await;
        if let Err(db) = note_refused(ctx, run_id, &row, &e, counts).await {
            self.db_error.get_or_insert(db);
        }
        if e.is_auth() {
            self.auth_error.get_or_insert(e);
        }
    }

    /// Finishes the writes under way, both at once: either may hold the
    /// only connection (SQLite) while the other waits for it, so awaiting
    /// one alone stalled every database user until the pool timed out.
    async fn settle_writes(&mut self) {
        let (marking, recording) = (self.marking.take(), self.recording.take());
        let (marked_now, recorded_now) = tokio::join!(
            async {
                match marking {
                    Some(f) => Some(f.await),
                    None => None,
                }
            },
            async {
                match recording {
                    Some(f) => Some(f.await),
                    None => None,
                }
            },
        );
        if let Some(next) = marked_now {
            self.marked_ahead(next);
        }
        if let Some((ids, written)) = recorded_now {
            ledger_written(ids, written, &mut self.owed, &mut self.db_error);
        }
    }

    /// After the last call: the answers recorded, the marks taken back
    /// from rows never sent, and the error that stopped the sending.
    async fn finish(mut self, ctx: &Context) -> anyhow::Result<()> {
        if self.db_error.is_none()
            && let Err(db) = record_done(ctx, &mut self.done).await
        {
            self.db_error = Some(db);
        }
        self.owed.append(&mut self.done);
        // Marked but never sent: not suspected of being in the CRM (unless
        // an earlier run's lost answer made them so). Tried after a ledger
        // failure too; if it fails as well, the next run sends them with a
        // needless "may already be in the CRM" warning, never twice.
        let unsent: Vec<i64> = self
            .marked
            .iter()
            .filter(|r| !r.uncertain)
            .map(|r| r.id)
            .collect();
        if !unsent.is_empty()
            && let Err(db) = ctx.store.unmark_records(&unsent).await
        {
            self.db_error.get_or_insert(db);
        }
        if let Some(db) = self.db_error {
            ctx.store.writable().owe_records_done(&self.owed);
            return Err(db.context(format!(
                "the state database did not take the ledger's writes: no further record was sent, the calls in flight were awaited, and the {} records the CRM confirmed are recorded done by the next run",
                self.owed.len()
            )));
        }
        if let Some(e) = self.auth_error {
            return Err(anyhow::Error::new(e).context("CRM refused the token; write-back stopped"));
        }
        Ok(())
    }
}

/// The output of `slot`'s future, or never when the slot is empty (a
/// `select!` branch that is simply not ready).
async fn when_some<F: std::future::Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// Records done the rows an earlier run of this process had confirmed by
/// the CRM but could not record (the state database did not take the
/// write), before anything is read or sent: they are not sent again.
async fn settle_owed_records(ctx: &Context) -> anyhow::Result<()> {
    let owed = ctx.store.writable().take_owed_records_done();
    if owed.is_empty() {
        return Ok(());
    }
    if let Err(e) = ctx.store.records_done(&owed).await {
        ctx.store.writable().owe_records_done(&owed);
        return Err(e.context("cannot record contact-history records an earlier run sent"));
    }
    tracing::info!(
        records = owed.len(),
        "contact-history records the CRM confirmed while the state database took no writes are recorded done now, not sent again"
    );
    Ok(())
}

/// A failed call's row in the ledger: a credentials error or a lost
/// answer stays pending (the latter uncertain); a refusal counts towards
/// parking. An error is the ledger's write failing.
async fn note_refused(
    ctx: &Context,
    run_id: &RunId,
    row: &LedgerRow,
    e: &crate::remote::RemoteError,
    counts: &mut WritebackCounts,
) -> anyhow::Result<()> {
    let text = e.to_string();
    if e.is_auth() {
        ctx.store.record_failed(row.id, &text, false).await?;
    } else if e.is_retriable() {
        ctx.store
            .record_failed(row.id, &text, e.maybe_applied())
            .await?;
        tracing::error!(kind = %row.kind, scope = %row.scope, link_man_id = row.link_man_id.0, error = %text, "contact-history record failed; it stays pending for the next run");
    } else {
        // The CRM said no (`value:false`, a 4xx): a poison record once it
        // has said so in max_attempts runs.
        let max = ctx.settings.crm.max_attempts;
        if ctx.store.record_refused(row.id, run_id, &text, max).await? {
            counts.parked += 1;
            tracing::error!(kind = %row.kind, scope = %row.scope, link_man_id = row.link_man_id.0, error = %text, max_attempts = max, "contact-history record refused in crm.max_attempts runs: parked, no longer sent until --retry-parked");
        } else {
            tracing::error!(kind = %row.kind, scope = %row.scope, link_man_id = row.link_man_id.0, error = %text, "contact-history record refused by the CRM; it stays pending for the next run");
        }
    }
    Ok(())
}

/// What a `records_done` write did: counted, or (it failed) its ids owed
/// and the error kept.
fn ledger_written(
    ids: Vec<i64>,
    written: anyhow::Result<()>,
    owed: &mut Vec<i64>,
    db_error: &mut Option<anyhow::Error>,
) {
    match written {
        Ok(()) => crate::metrics::operations(Operation::ContactHistory, Ended::Done, ids.len()),
        Err(db) => {
            owed.extend(ids);
            db_error.get_or_insert(db);
        }
    }
}

/// Records `done` in the ledger (one write) and empties it.
async fn record_done(ctx: &Context, done: &mut Vec<i64>) -> anyhow::Result<()> {
    if done.is_empty() {
        return Ok(());
    }
    ctx.store.records_done(done).await?;
    crate::metrics::operations(Operation::ContactHistory, Ended::Done, done.len());
    done.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookback_covers_today_and_the_days_before() {
        let today = chrono::NaiveDate::from_ymd_opt(2026, 3, 2).unwrap();
        assert_eq!(
            lookback_dates(today, 3),
            vec!["2026-03-02", "2026-03-01", "2026-02-28"]
        );
        assert_eq!(lookback_dates(today, 1), vec!["2026-03-02"]);
    }

    #[test]
    fn edm_today_is_the_date_in_edm_zone_not_utc() {
        let late: chrono::DateTime<chrono::Utc> = "2026-11-29T23:30:00Z".parse().unwrap();
        let date = |y, m, d| chrono::NaiveDate::from_ymd_opt(y, m, d).unwrap();
        assert_eq!(
            edm_today(late, chrono_tz::Asia::Shanghai),
            date(2026, 11, 30)
        );
        assert_eq!(edm_today(late, chrono_tz::UTC), date(2026, 11, 29));
    }
}
