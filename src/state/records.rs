//! The `writeback_ledger` table: one row per ContactHistory record, pending
//! before the CRM call, done after `{"value": true}`.

use std::collections::HashSet;

use anyhow::Context;
use sea_orm::Condition;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveEnum, ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    TransactionTrait,
};

use super::entities::ledger;
use super::*;
use crate::domain::{CustomerId, LinkManId, RecordScope};

/// A ContactHistory record about to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    pub kind: RecordKind,
    pub scope: RecordScope,
    pub link_man_id: LinkManId,
    pub customer_id: CustomerId,
    pub email: String,
    pub title: String,
    pub content: String,
}

/// A write-back ledger row still pending: the record to send, and whether
/// an earlier call may have written it already.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerRow {
    pub id: i64,
    pub kind: RecordKind,
    pub scope: RecordScope,
    pub link_man_id: LinkManId,
    pub customer_id: CustomerId,
    pub title: String,
    pub content: String,
    /// A call for it went out and its answer was not recorded.
    pub uncertain: bool,
    pub attempts: i32,
}

impl From<ledger::Model> for LedgerRow {
    fn from(r: ledger::Model) -> Self {
        LedgerRow {
            id: r.id,
            kind: r.kind,
            scope: r.scope,
            link_man_id: r.link_man_id,
            customer_id: r.customer_id,
            title: r.title,
            content: r.content,
            uncertain: r.uncertain,
            attempts: r.attempts,
        }
    }
}

impl Store {
    /// The ledger keys `(kind, scope, link_man_id)` already recorded for
    /// `scopes`, done or pending.
    pub async fn ledger_keys(
        &self,
        scopes: &[RecordScope],
    ) -> anyhow::Result<HashSet<(RecordKind, RecordScope, LinkManId)>> {
        let mut out = HashSet::new();
        for chunk in scopes.chunks(CHUNK) {
            let rows: Vec<(RecordKind, RecordScope, LinkManId)> = ledger::Entity::find()
                .select_only()
                .column(ledger::Column::Kind)
                .column(ledger::Column::Scope)
                .column(ledger::Column::LinkManId)
                .filter(ledger::Column::Scope.is_in(chunk.iter().cloned()))
                .into_tuple()
                .all(&self.db)
                .await
                .context("cannot read the write-back ledger")?;
            out.extend(rows);
        }
        Ok(out)
    }

    /// Ledger rows still pending, oldest first.
    pub async fn pending_records(&self) -> anyhow::Result<Vec<LedgerRow>> {
        self.pending_rows(Condition::all(), |_| true).await
    }

    /// Pending ledger rows that also meet `condition` and `keep`, oldest
    /// first, read 2 000 at a time by id: the driver never holds a whole
    /// write-back's rows at once (a hundred thousand records cost 140 MB
    /// as SQLite values next to the rows being built).
    async fn pending_rows(
        &self,
        condition: Condition,
        keep: impl Fn(&ledger::Model) -> bool,
    ) -> anyhow::Result<Vec<LedgerRow>> {
        const PAGE: u64 = 2000;
        let mut out = Vec::new();
        let mut after = i64::MIN;
        loop {
            let page = ledger::Entity::find()
                .filter(ledger::Column::Status.eq(LedgerStatus::Pending))
                .filter(condition.clone())
                .filter(ledger::Column::Id.gt(after))
                .order_by_asc(ledger::Column::Id)
                .limit(PAGE)
                .all(&self.db)
                .await
                .context("cannot read pending write-back records")?;
            let Some(last) = page.last() else { break };
            after = last.id;
            let n = page.len() as u64;
            out.extend(page.into_iter().filter(|r| keep(r)).map(LedgerRow::from));
            if n < PAGE {
                break;
            }
        }
        Ok(out)
    }

    /// Records new ledger rows as pending (not yet uncertain: nothing was
    /// sent); keys already present are left as they are. Returns the rows
    /// now pending for those keys.
    pub async fn insert_records(&self, records: &[NewRecord]) -> anyhow::Result<Vec<LedgerRow>> {
        let now = now_ms();
        let unique = one_per_key(records, |r| (r.kind, r.scope, r.link_man_id), false);
        let txn = self.db.begin().await?;
        for chunk in unique.chunks(CHUNK) {
            ledger::Entity::insert_many(chunk.iter().map(|r| ledger::ActiveModel {
                kind: Set(r.kind),
                scope: Set(r.scope),
                link_man_id: Set(r.link_man_id),
                customer_id: Set(r.customer_id),
                email: Set(r.email.clone()),
                title: Set(r.title.clone()),
                content: Set(r.content.clone()),
                status: Set(LedgerStatus::Pending),
                uncertain: Set(false),
                attempts: Set(0),
                last_error: Set(None),
                created_at: Set(now),
                updated_at: Set(now),
                failed_runs: Set(0),
                last_failed_run: Set(None),
                ..Default::default()
            }))
            .on_conflict(
                OnConflict::columns([
                    ledger::Column::Kind,
                    ledger::Column::Scope,
                    ledger::Column::LinkManId,
                ])
                .do_nothing()
                .to_owned(),
            )
            .exec_without_returning(&txn)
            .await
            .context("cannot record write-back records")?;
        }
        txn.commit().await?;
        let scopes: Vec<RecordScope> = records
            .iter()
            .map(|r| r.scope)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let wanted: HashSet<(RecordKind, RecordScope, LinkManId)> = records
            .iter()
            .map(|r| (r.kind, r.scope, r.link_man_id))
            .collect();
        let mut rows = Vec::with_capacity(records.len());
        for chunk in scopes.chunks(CHUNK) {
            let in_chunk = Condition::all().add(ledger::Column::Scope.is_in(chunk.iter().cloned()));
            rows.extend(
                self.pending_rows(in_chunk, |r| {
                    wanted.contains(&(r.kind, r.scope, r.link_man_id))
                })
                .await?,
            );
        }
        Ok(rows)
    }

    /// Marks ledger rows as being sent: uncertain until the CRM answers.
    pub async fn mark_records_uncertain(&self, ids: &[i64]) -> anyhow::Result<()> {
        self.set_records_uncertain(ids, true).await
    }

    /// Takes the mark back from rows that were marked but, the run
    /// stopping, never sent.
    pub async fn unmark_records(&self, ids: &[i64]) -> anyhow::Result<()> {
        self.set_records_uncertain(ids, false).await
    }

    /// Marking (`uncertain`) precedes a CRM call, so it is fenced: an
    /// instance that lost the lease marks nothing and sends nothing.
    async fn set_records_uncertain(&self, ids: &[i64], uncertain: bool) -> anyhow::Result<()> {
        let txn = self.db.begin().await?;
        if uncertain {
            self.check_fence(&txn).await?;
        }
        for chunk in ids.chunks(CHUNK) {
            ledger::Entity::update_many()
                .col_expr(ledger::Column::Uncertain, uncertain.into())
                .col_expr(ledger::Column::UpdatedAt, now_ms().into())
                .filter(ledger::Column::Id.is_in(chunk.iter().copied()))
                .exec(&txn)
                .await
                .context("cannot mark write-back records")?;
        }
        txn.commit()
            .await
            .context("cannot commit write-back marks")?;
        Ok(())
    }

    /// Marks ledger rows done after `{"value": true}`.
    pub async fn records_done(&self, ids: &[i64]) -> anyhow::Result<()> {
        let now = now_ms();
        let txn = self.db.begin().await?;
        for chunk in ids.chunks(CHUNK) {
            ledger::Entity::update_many()
                .col_expr(
                    ledger::Column::Status,
                    Expr::value(LedgerStatus::Done.to_value()),
                )
                .col_expr(ledger::Column::Uncertain, false.into())
                .col_expr(
                    ledger::Column::Attempts,
                    sea_orm::sea_query::Expr::col(ledger::Column::Attempts).add(1),
                )
                .col_expr(ledger::Column::UpdatedAt, now.into())
                .filter(ledger::Column::Id.is_in(chunk.iter().copied()))
                .exec(&txn)
                .await
                .context("cannot mark write-back records done")?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// Notes a failed attempt; the row stays pending. `uncertain` says
    /// whether the CRM may have written it anyway.
    pub async fn record_failed(&self, id: i64, error: &str, uncertain: bool) -> anyhow::Result<()> {
        ledger::Entity::update_many()
            .col_expr(ledger::Column::LastError, Some(error.to_string()).into())
            .col_expr(ledger::Column::Uncertain, uncertain.into())
            .col_expr(
                ledger::Column::Attempts,
                sea_orm::sea_query::Expr::col(ledger::Column::Attempts).add(1),
            )
            .col_expr(ledger::Column::UpdatedAt, now_ms().into())
            .filter(ledger::Column::Id.eq(id))
            .exec(&self.db)
            .await
            .context("cannot record a write-back failure")?;
        Ok(())
    }

    /// Ledger counts: `(kind, status, count)`.
    pub async fn ledger_counts(&self) -> anyhow::Result<Vec<(RecordKind, LedgerStatus, u64)>> {
        let rows: Vec<(RecordKind, LedgerStatus, i64)> = ledger::Entity::find()
            .select_only()
            .column(ledger::Column::Kind)
            .column(ledger::Column::Status)
            .column_as(ledger::Column::Id.count(), "n")
            .group_by(ledger::Column::Kind)
            .group_by(ledger::Column::Status)
            .order_by_asc(ledger::Column::Kind)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows.into_iter().map(|(k, s, n)| (k, s, n as u64)).collect())
    }
}
