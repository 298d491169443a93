//! Poison records: what EDM or the CRM refused outright, and for how many
//! runs. An EDM batch refused with an error code is split until the
//! refused lines are alone (the applier's bisection); each refused line is
//! noted here once per run ([`Store::note_refusals`]). Past
//! `edm.max_attempts` runs it is parked: the applier no longer sends it
//! unless its content changed or the run was started with
//! `--retry-parked`. Contact-history records count their refused runs on
//! their ledger row and turn `parked` past `crm.max_attempts`
//! ([`Store::record_refused`]). A success forgets the refusal.

use crate::domain::RunId;
use std::collections::HashMap;

use anyhow::Context;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveEnum, ActiveValue::Set, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, TransactionTrait,
};

use super::entities::{ledger, refusal};
use super::*;
use crate::domain::Email;

/// An operation EDM refused, as remembered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EdmRefusal {
    pub kind: OpKind,
    pub list_id: ListId,
    pub email: String,
    /// What was sent: a parked operation is sent again when it changes.
    pub content: String,
    pub code: String,
    pub message: String,
    pub failed_runs: u32,
    pub parked: bool,
    /// Milliseconds since the Unix epoch.
    pub updated_at: i64,
}

impl From<refusal::Model> for EdmRefusal {
    fn from(m: refusal::Model) -> EdmRefusal {
        EdmRefusal {
            kind: m.kind,
            list_id: m.list_id,
            email: m.email,
            content: m.content,
            code: m.code,
            message: m.message,
            failed_runs: u32::try_from(m.failed_runs).unwrap_or(0),
            parked: m.parked,
            updated_at: m.updated_at,
        }
    }
}

/// One refused line of this run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRefusal {
    pub kind: OpKind,
    pub list_id: ListId,
    pub email: Email,
    pub content: String,
    pub code: String,
    pub message: String,
}

/// A parked contact-history record, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParkedRecord {
    pub kind: RecordKind,
    pub scope: crate::domain::RecordScope,
    pub link_man_id: crate::domain::LinkManId,
    pub email: String,
    pub failed_runs: u32,
    pub last_error: Option<String>,
}

/// The refusal key: `(kind, list, address)`.
pub type RefusalKey = (OpKind, ListId, String);

impl Store {
    /// Every remembered refusal, by key.
    pub async fn load_refusals(&self) -> anyhow::Result<HashMap<RefusalKey, EdmRefusal>> {
        let rows = refusal::Entity::find()
            .all(&self.db)
            .await
            .context("cannot read the refusals")?;
        Ok(rows
            .into_iter()
            .map(|m| ((m.kind, m.list_id, m.email.clone()), EdmRefusal::from(m)))
            .collect())
    }

    /// Notes this run's refused lines: a run counts once per line, a line
    /// whose content changed starts counting again, and one refused in
    /// `max_attempts` runs is parked. Returns the refusals as they now
    /// stand.
    pub async fn note_refusals(
        &self,
        run_id: &RunId,
        items: &[NewRefusal],
        max_attempts: u32,
    ) -> anyhow::Result<Vec<EdmRefusal>> {
        let known: HashMap<RefusalKey, refusal::Model> = refusal::Entity::find()
            .all(&self.db)
            .await
            .context("cannot read the refusals")?
            .into_iter()
            .map(|m| ((m.kind, m.list_id, m.email.clone()), m))
            .collect();
        let now = now_ms();
        let mut out = Vec::with_capacity(items.len());
        let txn = self.db.begin().await?;
        for item in one_per_key(items, |i| (i.kind, i.list_id, i.email.to_string()), true) {
            let key = (item.kind, item.list_id, item.email.to_string());
            let failed_runs = match known.get(&key) {
                Some(b) if b.content != item.content => 1,
                Some(b) if b.last_run_id == *run_id => u32::try_from(b.failed_runs).unwrap_or(0),
                Some(b) => u32::try_from(b.failed_runs).unwrap_or(0) + 1,
                None => 1,
            };
            let parked = failed_runs >= max_attempts.max(1);
            refusal::Entity::insert(refusal::ActiveModel {
                kind: Set(item.kind),
                list_id: Set(item.list_id),
                email: Set(item.email.to_string()),
                content: Set(item.content.clone()),
                code: Set(item.code.clone()),
                message: Set(item.message.clone()),
                failed_runs: Set(failed_runs as i32),
                last_run_id: Set(run_id.clone()),
                parked: Set(parked),
                created_at: Set(now),
                updated_at: Set(now),
                ..Default::default()
            })
            .on_conflict(
                OnConflict::columns([
                    refusal::Column::Kind,
                    refusal::Column::ListId,
                    refusal::Column::Email,
                ])
                .update_columns([
                    refusal::Column::Content,
                    refusal::Column::Code,
                    refusal::Column::Message,
                    refusal::Column::FailedRuns,
                    refusal::Column::LastRunId,
                    refusal::Column::Parked,
                    refusal::Column::UpdatedAt,
                ])
                .to_owned(),
            )
            .exec_without_returning(&txn)
            .await
            .context("cannot record a refusal")?;
            out.push(EdmRefusal {
                kind: item.kind,
                list_id: item.list_id,
                email: item.email.to_string(),
                content: item.content.clone(),
                code: item.code.clone(),
                message: item.message.clone(),
                failed_runs,
                parked,
                updated_at: now,
            });
        }
        txn.commit().await.context("cannot commit refusals")?;
        Ok(out)
    }

    /// Forgets refusals that a success made moot.
    pub async fn forget_refusals(&self, keys: &[RefusalKey]) -> anyhow::Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin().await?;
        for (kind, list_id, email) in keys {
            refusal::Entity::delete_many()
                .filter(refusal::Column::Kind.eq(*kind))
                .filter(refusal::Column::ListId.eq(*list_id))
                .filter(refusal::Column::Email.eq(email.as_str()))
                .exec(&txn)
                .await
                .context("cannot forget a refusal")?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// Parked EDM operations, oldest first, at most `limit`, and how many
    /// there are.
    pub async fn parked_operations(&self, limit: u64) -> anyhow::Result<(u64, Vec<EdmRefusal>)> {
        let total = refusal::Entity::find()
            .filter(refusal::Column::Parked.eq(true))
            .count(&self.db)
            .await?;
        let rows = refusal::Entity::find()
            .filter(refusal::Column::Parked.eq(true))
            .order_by_asc(refusal::Column::UpdatedAt)
            .limit(limit)
            .all(&self.db)
            .await?;
        Ok((total, rows.into_iter().map(EdmRefusal::from).collect()))
    }

    /// Notes that the CRM refused a record in this run (a run counts
    /// once); past `max_attempts` runs the row is parked. The row stays
    /// pending otherwise. Returns whether it is now parked.
    pub async fn record_refused(
        &self,
        id: i64,
        run_id: &RunId,
        error: &str,
        max_attempts: u32,
    ) -> anyhow::Result<bool> {
        let txn = self.db.begin().await?;
        let Some(row) = ledger::Entity::find_by_id(id).one(&txn).await? else {
            return Ok(false);
        };
        let counted = row.last_failed_run.as_deref() == Some(run_id.as_str());
        let failed_runs = row.failed_runs + i32::from(!counted);
        let parked = failed_runs as u32 >= max_attempts.max(1);
        let status = if parked {
            LedgerStatus::Parked
        } else {
            LedgerStatus::Pending
        };
        ledger::Entity::update_many()
            .col_expr(ledger::Column::LastError, Some(error.to_string()).into())
            .col_expr(ledger::Column::Uncertain, false.into())
            .col_expr(
                ledger::Column::Attempts,
                sea_orm::sea_query::ExprTrait::add(Expr::col(ledger::Column::Attempts), 1),
            )
            .col_expr(ledger::Column::FailedRuns, failed_runs.into())
            .col_expr(
                ledger::Column::LastFailedRun,
                Some(run_id.to_string()).into(),
            )
            .col_expr(ledger::Column::Status, Expr::value(status.to_value()))
            .col_expr(ledger::Column::UpdatedAt, now_ms().into())
            .filter(ledger::Column::Id.eq(id))
            .exec(&txn)
            .await
            .context("cannot record a refused write-back record")?;
        txn.commit().await?;
        Ok(parked)
    }

    /// Parked ledger rows back to pending (`--retry-parked`); returns how
    /// many.
    pub async fn unpark_records(&self) -> anyhow::Result<u64> {
        let n = ledger::Entity::update_many()
            .col_expr(
                ledger::Column::Status,
                Expr::value(LedgerStatus::Pending.to_value()),
            )
            .filter(ledger::Column::Status.eq(LedgerStatus::Parked))
            .exec(&self.db)
            .await
            .context("cannot unpark write-back records")?
            .rows_affected;
        Ok(n)
    }

    /// Parked contact-history records, oldest first, at most `limit`, and
    /// how many there are.
    pub async fn parked_records(&self, limit: u64) -> anyhow::Result<(u64, Vec<ParkedRecord>)> {
        let total = ledger::Entity::find()
            .filter(ledger::Column::Status.eq(LedgerStatus::Parked))
            .count(&self.db)
            .await?;
        let rows = ledger::Entity::find()
            .filter(ledger::Column::Status.eq(LedgerStatus::Parked))
            .order_by_asc(ledger::Column::UpdatedAt)
            .limit(limit)
            .all(&self.db)
            .await?;
        Ok((
            total,
            rows.into_iter()
                .map(|r| ParkedRecord {
                    kind: r.kind,
                    scope: r.scope,
                    link_man_id: r.link_man_id,
                    email: r.email,
                    failed_runs: u32::try_from(r.failed_runs).unwrap_or(0),
                    last_error: r.last_error,
                })
                .collect(),
        ))
    }
}
