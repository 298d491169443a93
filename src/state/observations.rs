//! What a run learns from EDM before it plans — export lines, user
//! unsubscribes and bounces (the `suppressions` table), per-list
//! bookkeeping — written in one transaction.

use std::collections::{HashMap, HashSet};

use anyhow::Context;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveEnum, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter,
    QueryOrder, TransactionTrait,
};

use super::entities::{list_state, operation, suppression, unsub_line};
use super::*;
use crate::domain::{Email, ListId, MemberKey, MemberState, RunId, Suppressions};

/// A user unsubscribe seen in an export.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSuppression {
    /// The list it holds for; `None`: every list (a hard bounce).
    pub list_id: Option<ListId>,
    pub email: String,
    pub reason: SuppressionReason,
    pub source: SuppressionSource,
}

/// One export line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeenLine {
    pub list_id: ListId,
    pub email: String,
    pub time: String,
}

/// Per-list bookkeeping.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ListBook {
    pub initial_read_at: Option<i64>,
    pub export_read_at: Option<i64>,
}

/// What a run learned from EDM before planning (exports, recovery checks,
/// list reads), written in one transaction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observations {
    pub new_lines: Vec<SeenLine>,
    pub suppressions: Vec<NewSuppression>,
    /// `unsub` operations whose export line was seen.
    pub matched_ops: Vec<i64>,
    /// Operations from earlier runs, resolved: `(id, status)`.
    pub resolved_ops: Vec<(i64, OpStatus)>,
    /// Member rows to write whole.
    pub members: Vec<MemberState>,
    /// Lists whose export was read, and when.
    pub export_reads: Vec<(ListId, i64)>,
    /// Lists read whole (rule 5), and when.
    pub list_reads: Vec<(ListId, i64)>,
    /// Consent-trail entries of what was learnt (operations of earlier
    /// runs found done); each new suppression gets its own entry too.
    pub audit: Vec<AuditEntry>,
}

impl Store {
    /// The suppressions in force.
    pub async fn load_suppressions(&self) -> anyhow::Result<Suppressions> {
        let rows = suppression::Entity::find()
            .all(&self.db)
            .await
            .context("cannot read suppressions")?;
        let mut out = Suppressions::default();
        let mut forgotten = std::collections::HashSet::new();
        for row in rows {
            if row.reason == SuppressionReason::Forgotten {
                forgotten.insert(row.email);
                continue;
            }
            let Ok(email) = Email::parse(&row.email) else {
                continue; // an address that is not valid is never sent anyway
            };
            if row.list_id == ALL_LISTS {
                out.bounced.insert(email);
            } else {
                out.user.insert(MemberKey::new(row.list_id, email));
            }
        }
        if !forgotten.is_empty() {
            out.forgotten = crate::domain::Forgotten::new(self.forget_key().await?, forgotten);
        }
        Ok(out)
    }

    pub async fn list_books(&self) -> anyhow::Result<HashMap<ListId, ListBook>> {
        let rows = list_state::Entity::find()
            .all(&self.db)
            .await
            .context("cannot read list state")?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.list_id,
                    ListBook {
                        initial_read_at: r.initial_read_at,
                        export_read_at: r.export_read_at,
                    },
                )
            })
            .collect())
    }

    /// Of the export lines of `list_id` for `emails`, those already seen,
    /// as `(email, time)`: one indexed lookup per 500 addresses, so the
    /// cost follows the export read, not the history kept.
    pub async fn seen_lines_of(
        &self,
        list_id: ListId,
        emails: &[&str],
    ) -> anyhow::Result<HashSet<(String, String)>> {
        let mut out = HashSet::new();
        for chunk in emails.chunks(CHUNK) {
            let rows = unsub_line::Entity::find()
                .filter(unsub_line::Column::ListId.eq(list_id))
                .filter(unsub_line::Column::Email.is_in(chunk.iter().copied()))
                .all(&self.db)
                .await
                .context("cannot read seen export lines")?;
            out.extend(rows.into_iter().map(|r| (r.email, r.time)));
        }
        Ok(out)
    }

    /// The newest export-line time of `list_id` whose rows were pruned:
    /// lines up to it count as seen.
    pub async fn lines_seen_through(&self, list_id: ListId) -> anyhow::Result<Option<String>> {
        Ok(list_state::Entity::find_by_id(list_id)
            .one(&self.db)
            .await
            .context("cannot read the list bookkeeping")?
            .and_then(|l| l.lines_seen_through))
    }

    /// Writes what a run observed, in one transaction.
    /// `run_id`: the run that learnt it, for the consent trail.
    pub async fn persist_observations(
        &self,
        obs: &Observations,
        run_id: Option<&RunId>,
    ) -> anyhow::Result<()> {
        let now = now_ms();
        let new_lines = one_per_key(&obs.new_lines, |l| l, false);
        let txn = self.db.begin().await?;
        for chunk in new_lines.chunks(CHUNK) {
            unsub_line::Entity::insert_many(chunk.iter().map(|l| unsub_line::ActiveModel {
                list_id: Set(l.list_id),
                email: Set(l.email.clone()),
                time: Set(l.time.clone()),
                seen_at: Set(now),
                ..Default::default()
            }))
            .on_conflict(
                OnConflict::columns([
                    unsub_line::Column::ListId,
                    unsub_line::Column::Email,
                    unsub_line::Column::Time,
                ])
                .do_nothing()
                .to_owned(),
            )
            .exec_without_returning(&txn)
            .await
            .context("cannot record export lines")?;
        }
        let entries = suppression_entries(obs, run_id);
        insert_suppressions(&txn, &obs.suppressions, &entries).await?;
        let learnt: Vec<AuditEntry> = obs
            .audit
            .iter()
            .map(|e| AuditEntry {
                run_id: e.run_id.clone().or_else(|| run_id.cloned()),
                ..e.clone()
            })
            .collect();
        super::audit::insert_audit(&txn, &learnt).await?;
        for chunk in obs.matched_ops.chunks(CHUNK) {
            operation::Entity::update_many()
                .col_expr(operation::Column::ExportMatched, true.into())
                .col_expr(operation::Column::UpdatedAt, now.into())
                .filter(operation::Column::Id.is_in(chunk.iter().copied()))
                .exec(&txn)
                .await
                .context("cannot mark matched unsubscribes")?;
        }
        for status in [OpStatus::Done, OpStatus::Superseded] {
            let ids: Vec<i64> = obs
                .resolved_ops
                .iter()
                .filter(|(_, s)| *s == status)
                .map(|(id, _)| *id)
                .collect();
            for chunk in ids.chunks(CHUNK) {
                operation::Entity::update_many()
                    .col_expr(operation::Column::Status, Expr::value(status.to_value()))
                    .col_expr(operation::Column::UpdatedAt, now.into())
                    .filter(operation::Column::Id.is_in(chunk.iter().copied()))
                    .exec(&txn)
                    .await
                    .context("cannot resolve earlier operations")?;
            }
        }
        upsert_members(&txn, &obs.members, now).await?;
        for (list_id, at) in &obs.export_reads {
            upsert_list_book(&txn, *list_id, None, Some(*at)).await?;
        }
        for (list_id, at) in &obs.list_reads {
            upsert_list_book(&txn, *list_id, Some(*at), None).await?;
        }
        txn.commit().await.context("cannot commit observations")?;
        Ok(())
    }

    /// Adds suppressions (duplicates are ignored).
    pub async fn add_suppressions(
        &self,
        items: &[NewSuppression],
        run_id: Option<&RunId>,
    ) -> anyhow::Result<()> {
        let txn = self.db.begin().await?;
        let entries: Vec<AuditEntry> = one_per_key(items, |s| (s.list_id, s.email.as_str()), false)
            .iter()
            .map(|s| suppression_entry(s, run_id))
            .collect();
        insert_suppressions(&txn, items, &entries).await?;
        txn.commit().await?;
        Ok(())
    }

    /// User-unsubscribe suppressions: `(list_id, email, source)`.
    pub async fn user_unsubscribes(
        &self,
    ) -> anyhow::Result<Vec<(ListId, String, SuppressionSource)>> {
        let rows = suppression::Entity::find()
            .filter(suppression::Column::Reason.eq(SuppressionReason::UserUnsubscribe))
            .order_by_asc(suppression::Column::Id)
            .all(&self.db)
            .await
            .context("cannot read suppressions")?;
        Ok(rows
            .into_iter()
            .map(|r| (r.list_id, r.email, SuppressionSource::parse(&r.source)))
            .collect())
    }

    /// Suppression counts by reason.
    /// Suppressions learnt while the state database was behind EDM
    /// (newest first): how many, and up to `limit` of them as
    /// `(list_id, email, export line time)`.
    pub async fn behind_unsubscribes(
        &self,
        limit: usize,
    ) -> anyhow::Result<(u64, Vec<(ListId, String, String)>)> {
        let rows = suppression::Entity::find()
            .filter(
                suppression::Column::Source
                    .like(format!("%{}", SuppressionSource::behind_suffix())),
            )
            .order_by_desc(suppression::Column::CreatedAt)
            .all(&self.db)
            .await
            .context("cannot read suppressions")?;
        let total = rows.len() as u64;
        let shown = rows
            .into_iter()
            .take(limit)
            .filter_map(|r| match SuppressionSource::parse(&r.source) {
                SuppressionSource::ExportWhileBehind { time } => Some((r.list_id, r.email, time)),
                _ => None,
            })
            .collect();
        Ok((total, shown))
    }

    pub async fn suppression_counts(&self) -> anyhow::Result<Vec<(SuppressionReason, u64)>> {
        let rows = suppression::Entity::find().all(&self.db).await?;
        let mut counts: std::collections::BTreeMap<SuppressionReason, u64> = Default::default();
        for r in rows {
            *counts.entry(r.reason).or_insert(0) += 1;
        }
        Ok(counts.into_iter().collect())
    }
}

/// Records suppressions (one already there is kept as it is) and their
/// consent-trail `entries` ([`suppression_entry`]).
pub(super) async fn insert_suppressions<C: ConnectionTrait>(
    db: &C,
    items: &[NewSuppression],
    entries: &[AuditEntry],
) -> anyhow::Result<()> {
    let now = now_ms();
    let items = one_per_key(items, |s| (s.list_id, s.email.as_str()), false);
    super::audit::insert_audit(db, entries).await?;
    for chunk in items.chunks(CHUNK) {
        suppression::Entity::insert_many(chunk.iter().map(|s| suppression::ActiveModel {
            list_id: Set(s.list_id.unwrap_or(ALL_LISTS)),
            email: Set(s.email.clone()),
            reason: Set(s.reason),
            source: Set(s.source.to_text()),
            created_at: Set(now),
            ..Default::default()
        }))
        .on_conflict(
            OnConflict::columns([suppression::Column::ListId, suppression::Column::Email])
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(db)
        .await
        .context("cannot record suppressions")?;
    }
    Ok(())
}

/// The consent-trail entries of the suppressions a run learnt: a
/// recipient's unsubscribe is entered with the link-man and customer of
/// the member it took out of the list.
fn suppression_entries(obs: &Observations, run_id: Option<&RunId>) -> Vec<AuditEntry> {
    let owners: HashMap<(ListId, &str), &MemberState> = obs
        .members
        .iter()
        .map(|m| ((m.key.list_id, m.key.email.as_str()), m))
        .collect();
    one_per_key(&obs.suppressions, |s| (s.list_id, s.email.as_str()), false)
        .iter()
        .map(|s| {
            let owner = s.list_id.and_then(|l| owners.get(&(l, s.email.as_str())));
            suppression_entry(s, run_id).by(
                owner.and_then(|m| m.link_man_id),
                owner.and_then(|m| m.customer_id),
            )
        })
        .collect()
}

/// The consent-trail entry of a new suppression: `recipient_unsubscribed`
/// with EDM's time as its detail, or `bounced` with the failexport type as
/// its reason and the campaign as its detail.
fn suppression_entry(s: &NewSuppression, run_id: Option<&RunId>) -> AuditEntry {
    use crate::stored_enums::{AuditEvent, AuditSource, SuppressionSource};
    let event = match s.reason {
        SuppressionReason::UserUnsubscribe => AuditEvent::RecipientUnsubscribed,
        SuppressionReason::Bounce => AuditEvent::Bounced,
        SuppressionReason::Forgotten => AuditEvent::Forgotten,
    };
    let mut entry = AuditEntry::now(event, AuditSource::Edm, &s.email)
        .detail(s.source.to_text())
        .in_run(run_id);
    entry.list_id = s.list_id;
    match &s.source {
        SuppressionSource::Bounce { bounce_type, .. } => entry.because(bounce_type.as_str()),
        SuppressionSource::ExportWhileBehind { .. } => entry.because("state database behind"),
        SuppressionSource::Export { .. } | SuppressionSource::Other(_) => entry,
    }
}

pub(super) async fn upsert_list_book<C: ConnectionTrait>(
    db: &C,
    list_id: ListId,
    initial_read_at: Option<i64>,
    export_read_at: Option<i64>,
) -> anyhow::Result<()> {
    let mut update = Vec::new();
    if initial_read_at.is_some() {
        update.push(list_state::Column::InitialReadAt);
    }
    if export_read_at.is_some() {
        update.push(list_state::Column::ExportReadAt);
    }
    list_state::Entity::insert(list_state::ActiveModel {
        list_id: Set(list_id),
        initial_read_at: Set(initial_read_at),
        export_read_at: Set(export_read_at),
        lines_seen_through: Set(None),
    })
    .on_conflict(
        OnConflict::column(list_state::Column::ListId)
            .update_columns(update)
            .to_owned(),
    )
    .exec_without_returning(db)
    .await
    .context("cannot write list state")?;
    Ok(())
}
