//! The `operations` table: every EDM write, recorded pending before it is
//! sent and marked done after EDM confirms it (rule 9).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::domain::RunId;
use anyhow::Context;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveEnum, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, QueryTrait, TransactionTrait,
};

use super::entities::operation;
use super::*;
use crate::domain::{CustomerId, Email, LinkManId, ListId, MemberFields, MemberState};

/// A planned operation about to be recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct NewOperation {
    pub kind: OpKind,
    pub list_id: ListId,
    pub email: Email,
    pub edm_id: Option<crate::domain::AddressId>,
    pub link_man_id: Option<LinkManId>,
    pub customer_id: Option<CustomerId>,
    pub fields: MemberFields,
    /// For `unsub`: why.
    pub reason: Option<crate::stored_enums::UnsubReason>,
}

/// An operation still pending, as recovery needs it (rule 9).
#[derive(Debug, Clone, PartialEq)]
pub struct PendingOperation {
    pub id: i64,
    pub kind: OpKind,
    pub list_id: ListId,
    pub email: String,
    pub link_man_id: Option<LinkManId>,
    pub customer_id: Option<CustomerId>,
    /// For `unsub`: why it was planned (`None` for one recorded before
    /// reasons were kept).
    pub reason: Option<crate::stored_enums::UnsubReason>,
}

/// A pending operation, for `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingRow {
    pub id: i64,
    pub kind: OpKind,
    pub list_id: ListId,
    pub email: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: i64,
}

/// The row ids of the operations this process recorded and has not
/// settled (marked done, failed, refused or taken back) yet: at most the
/// batches in flight. A batch's rows are then found by primary key.
///
/// Why: finding them by run, kind, list and address let PostgreSQL choose
/// the `(kind, list_id, export_matched)` index whenever its statistics
/// took this run's rows for a few, and filter every operation of the list
/// for each batch — 185 000 rows a batch, and most of the database time,
/// at a million link-men. A batch whose ids are not all known (recorded by
/// another process, or before a restart) is still found the old way.
///
/// A run that ends on an error between recording a batch and settling it
/// leaves its ids here; so that a daemon running for years cannot gather
/// them, the whole memory is dropped once it holds [`MAX_IN_FLIGHT`]
/// (batches are then found the old way until the next is recorded).
#[derive(Debug, Clone, Default)]
pub(super) struct InFlight(Arc<Mutex<InFlightIds>>);

/// Row ids by run, by (kind, list), by address: a batch is one inner map,
/// found once, and its addresses are looked up without a copy of the key.
type InFlightIds = HashMap<RunId, HashMap<(OpKind, ListId), HashMap<Email, i64>>>;

/// Far above the batches one run has in flight (two of `edm.batch_size`).
const MAX_IN_FLIGHT: usize = 100_000;

impl InFlight {
    fn note(&self, run_id: &RunId, rows: impl IntoIterator<Item = (OpKind, ListId, Email, i64)>) {
        let mut ids = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let held: usize = ids
            .values()
            .flat_map(HashMap::values)
            .map(HashMap::len)
            .sum();
        if held >= MAX_IN_FLIGHT {
            ids.clear();
        }
        let run = ids.entry(run_id.clone()).or_default();
        for (kind, list_id, email, id) in rows {
            run.entry((kind, list_id)).or_default().insert(email, id);
        }
    }

    /// Takes the ids of `emails` out; `None` unless every one was known.
    fn take(
        &self,
        run_id: &RunId,
        kind: OpKind,
        list_id: ListId,
        emails: &[&Email],
    ) -> Option<Vec<i64>> {
        let mut ids = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let run = ids.get_mut(run_id)?;
        let batch = run.get_mut(&(kind, list_id))?;
        let found: Vec<i64> = emails.iter().filter_map(|e| batch.remove(*e)).collect();
        if batch.is_empty() {
            run.remove(&(kind, list_id));
        }
        if run.is_empty() {
            ids.remove(run_id);
        }
        (found.len() == emails.len()).then_some(found)
    }
}

/// This run's pending `kind` operations on `emails` in `list_id`: the
/// rows a batch was recorded as.
fn pending_of_run(
    run_id: &RunId,
    kind: OpKind,
    list_id: ListId,
    emails: &[&Email],
) -> sea_orm::Condition {
    sea_orm::Condition::all()
        .add(operation::Column::RunId.eq(run_id.clone()))
        .add(operation::Column::Kind.eq(kind))
        .add(operation::Column::ListId.eq(list_id))
        .add(operation::Column::Status.eq(OpStatus::Pending))
        .add(operation::Column::Email.is_in(emails.iter().map(|e| e.to_string())))
}

/// Pairs the ids a `RETURNING` gave (in any order) with the operations
/// recorded.
fn ids_of(
    chunk: &[NewOperation],
    rows: &[sea_orm::QueryResult],
) -> anyhow::Result<Vec<(OpKind, ListId, Email, i64)>> {
    let by_key: HashMap<(&str, i64, &str), &NewOperation> = chunk
        .iter()
        .map(|op| ((op.kind.as_str(), op.list_id.0, op.email.as_str()), op))
        .collect();
    rows.iter()
        .map(|row| {
            let id: i64 = row.try_get("", "id")?;
            let kind: String = row.try_get("", "kind")?;
            let list_id: i64 = row.try_get("", "list_id")?;
            let email: String = row.try_get("", "email")?;
            let op = by_key
                .get(&(kind.as_str(), list_id, email.as_str()))
                .context("an operation recorded twice in one statement")?;
            Ok((op.kind, op.list_id, op.email.clone(), id))
        })
        .collect()
}

impl Store {
    /// The daemon's own `ml-unsub`s to `list_id` since `since` that no
    /// export line has matched yet: `(operation id, email)`, oldest first.
    pub async fn unmatched_unsubs(
        &self,
        list_id: ListId,
        since: Option<i64>,
    ) -> anyhow::Result<Vec<(i64, String)>> {
        let mut query = operation::Entity::find()
            .filter(operation::Column::Kind.eq(OpKind::Unsub))
            .filter(operation::Column::ListId.eq(list_id))
            .filter(operation::Column::ExportMatched.eq(false))
            .filter(operation::Column::Status.ne(OpStatus::Superseded));
        if let Some(since) = since {
            query = query.filter(operation::Column::CreatedAt.gte(since));
        }
        let rows = query
            .order_by_asc(operation::Column::Id)
            .all(&self.db)
            .await
            .context("cannot read unsubscribe operations")?;
        Ok(rows.into_iter().map(|r| (r.id, r.email)).collect())
    }

    /// Operations still pending (from this or earlier runs).
    pub async fn pending_operations(&self) -> anyhow::Result<Vec<PendingOperation>> {
        let rows = operation::Entity::find()
            .filter(operation::Column::Status.eq(OpStatus::Pending))
            .order_by_asc(operation::Column::Id)
            .all(&self.db)
            .await
            .context("cannot read pending operations")?;
        Ok(rows
            .into_iter()
            .map(|r| PendingOperation {
                id: r.id,
                kind: r.kind,
                list_id: r.list_id,
                email: r.email,
                link_man_id: r.link_man_id,
                customer_id: r.customer_id,
                reason: r.reason,
            })
            .collect())
    }

    /// Records operations as pending before they are sent (rule 9).
    pub async fn record_operations(
        &self,
        run_id: &RunId,
        ops: &[NewOperation],
    ) -> anyhow::Result<()> {
        let now = now_ms();
        let txn = self.db.begin().await?;
        self.check_fence(&txn).await?;
        let mut recorded = Vec::with_capacity(ops.len());
        for chunk in ops.chunks(CHUNK) {
            let mut insert =
                operation::Entity::insert_many(chunk.iter().map(|op| operation::ActiveModel {
                    run_id: Set(run_id.clone()),
                    kind: Set(op.kind),
                    list_id: Set(op.list_id),
                    email: Set(op.email.to_string()),
                    edm_id: Set(op.edm_id),
                    link_man_id: Set(op.link_man_id),
                    customer_id: Set(op.customer_id),
                    fullname: Set(op.fields.fullname().to_string()),
                    vars: Set(vars_to_json(&op.fields)),
                    status: Set(OpStatus::Pending),
                    attempts: Set(0),
                    last_error: Set(None),
                    export_matched: Set(false),
                    created_at: Set(now),
                    updated_at: Set(now),
                    reason: Set(op.reason),
                    ..Default::default()
                }))
                .into_query();
            insert.returning(sea_orm::sea_query::Query::returning().columns([
                operation::Column::Id,
                operation::Column::Kind,
                operation::Column::ListId,
                operation::Column::Email,
            ]));
            let rows = txn
                .query_all(&insert)
                .await
                .context("cannot record operations")?;
            recorded.extend(ids_of(chunk, &rows)?);
        }
        txn.commit().await.context("cannot commit operations")?;
        self.in_flight.note(run_id, recorded);
        self.analyze_if_grown(ops.len() as u64).await;
        Ok(())
    }

    /// This run's pending `kind` operations on `emails` in `list_id`, by
    /// their ids when this process recorded every one of them (which
    /// settles them in [`InFlight`]), else by run, kind, list and address.
    fn batch_rows(
        &self,
        run_id: &RunId,
        kind: OpKind,
        list_id: ListId,
        emails: &[&Email],
    ) -> sea_orm::Condition {
        match self.in_flight.take(run_id, kind, list_id, emails) {
            Some(ids) => sea_orm::Condition::all()
                .add(operation::Column::Id.is_in(ids))
                .add(operation::Column::Status.eq(OpStatus::Pending)),
            None => pending_of_run(run_id, kind, list_id, emails),
        }
    }

    /// Refreshes PostgreSQL's statistics on `operations` and `members`
    /// each time this process has recorded four times as many operations
    /// as at the last refresh (2 000, 8 000, 32 000, …).
    ///
    /// Why: a first sync grows both tables from nothing within one run,
    /// faster than autovacuum analyses them (and some servers run without
    /// it). Without statistics the planner takes this run's operations of
    /// a list for a few rows, scans all of them for each batch's "mark
    /// done" instead of looking the batch's addresses up, and a million
    /// link-men took minutes of database time. SQLite's planner uses the
    /// index without statistics, so nothing is done there. A failure is
    /// only logged: the run is correct either way, only slower.
    async fn analyze_if_grown(&self, recorded: u64) {
        if self.db.get_database_backend() != sea_orm::DatabaseBackend::Postgres {
            return;
        }
        let due = {
            let mut counts = self
                .analyzed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            counts.0 += recorded;
            let due = counts.0 >= counts.1;
            if due {
                counts.1 = counts.0.saturating_mul(4);
            }
            due
        };
        use sea_orm::ConnectionTrait;
        if due
            && let Err(e) = self
                .db
                .execute_unprepared("ANALYZE operations, members")
                .await
        {
            tracing::warn!(error = %e, "cannot refresh the database's statistics");
        }
    }

    /// Marks this run's `kind` operations on `emails` in `list_id` done and
    /// writes the members they produced and their consent-trail entries,
    /// in one transaction.
    pub async fn complete_operations(
        &self,
        run_id: &RunId,
        kind: OpKind,
        list_id: ListId,
        emails: &[&Email],
        members: &[MemberState],
        audit: &[AuditEntry],
    ) -> anyhow::Result<()> {
        let now = now_ms();
        let txn = self.db.begin().await?;
        for chunk in emails.chunks(CHUNK) {
            operation::Entity::update_many()
                .col_expr(
                    operation::Column::Status,
                    Expr::value(OpStatus::Done.to_value()),
                )
                .col_expr(operation::Column::UpdatedAt, now.into())
                .col_expr(
                    operation::Column::Attempts,
                    sea_orm::sea_query::Expr::col(operation::Column::Attempts).add(1),
                )
                .filter(self.batch_rows(run_id, kind, list_id, chunk))
                .exec(&txn)
                .await
                .context("cannot mark operations done")?;
        }
        upsert_members(&txn, members, now).await?;
        audit::insert_audit(&txn, audit).await?;
        txn.commit()
            .await
            .context("cannot commit completed operations")?;
        Ok(())
    }

    /// Deletes this run's pending `kind` operations on `emails` in
    /// `list_id` that were recorded but never sent (no attempt made): a
    /// batch recorded ahead that the run stopped before sending.
    pub async fn forget_operations(
        &self,
        run_id: &RunId,
        kind: OpKind,
        list_id: ListId,
        emails: &[&Email],
    ) -> anyhow::Result<()> {
        let txn = self.db.begin().await?;
        for chunk in emails.chunks(CHUNK) {
            operation::Entity::delete_many()
                .filter(self.batch_rows(run_id, kind, list_id, chunk))
                .filter(operation::Column::Attempts.eq(0))
                .exec(&txn)
                .await
                .context("cannot take back unsent operations")?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// Notes a failed attempt on this run's operations; they stay pending.
    pub async fn note_failure(
        &self,
        run_id: &RunId,
        kind: OpKind,
        list_id: ListId,
        emails: &[&Email],
        error: &str,
    ) -> anyhow::Result<()> {
        self.failed_attempt(run_id, kind, list_id, emails, error, None)
            .await
            .context("cannot record the failure")
    }

    /// This run's operations on `emails` that EDM refused outright (an
    /// error code on their line alone): they did not take effect and are
    /// superseded, with the refusal as their last error; whether they are
    /// sent again is the next plan's (and the refusal memory's) call.
    pub async fn refuse_operations(
        &self,
        run_id: &RunId,
        kind: OpKind,
        list_id: ListId,
        emails: &[&Email],
        error: &str,
    ) -> anyhow::Result<()> {
        self.failed_attempt(
            run_id,
            kind,
            list_id,
            emails,
            error,
            Some(OpStatus::Superseded),
        )
        .await
        .context("cannot record the refusal")
    }

    /// One more attempt and its error on this run's pending operations on
    /// `emails`, and their new status if any.
    async fn failed_attempt(
        &self,
        run_id: &RunId,
        kind: OpKind,
        list_id: ListId,
        emails: &[&Email],
        error: &str,
        status: Option<OpStatus>,
    ) -> anyhow::Result<()> {
        let now = now_ms();
        let txn = self.db.begin().await?;
        for chunk in emails.chunks(CHUNK) {
            let mut update = operation::Entity::update_many()
                .col_expr(operation::Column::LastError, Some(error.to_string()).into())
                .col_expr(operation::Column::UpdatedAt, now.into())
                .col_expr(
                    operation::Column::Attempts,
                    sea_orm::sea_query::Expr::col(operation::Column::Attempts).add(1),
                );
            if let Some(status) = status {
                update = update.col_expr(operation::Column::Status, Expr::value(status.to_value()));
            }
            update
                .filter(self.batch_rows(run_id, kind, list_id, chunk))
                .exec(&txn)
                .await?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// Pending operations, oldest first, at most `limit`, and how many
    /// there are in all.
    pub async fn pending_summary(&self, limit: u64) -> anyhow::Result<(u64, Vec<PendingRow>)> {
        use sea_orm::PaginatorTrait;
        let total = operation::Entity::find()
            .filter(operation::Column::Status.eq(OpStatus::Pending))
            .count(&self.db)
            .await?;
        let rows = operation::Entity::find()
            .filter(operation::Column::Status.eq(OpStatus::Pending))
            .order_by_asc(operation::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?;
        Ok((
            total,
            rows.into_iter()
                .map(|r| PendingRow {
                    id: r.id,
                    kind: r.kind,
                    list_id: r.list_id,
                    email: r.email,
                    attempts: r.attempts,
                    last_error: r.last_error,
                    created_at: r.created_at,
                })
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_in_flight_ids_are_dropped_whole_once_they_reach_their_bound() {
        // Arrange: the memory full of one run's ids.
        let in_flight = InFlight::default();
        let run = RunId::from_stored("r");
        let email = |k: usize| Email::parse(&format!("m{k}@x.cn")).unwrap();
        in_flight.note(
            &run,
            (0..MAX_IN_FLIGHT).map(|k| (OpKind::Add, ListId(1), email(k), k as i64)),
        );

        // Act: one more batch is recorded.
        in_flight.note(&run, [(OpKind::Add, ListId(1), email(MAX_IN_FLIGHT), -1)]);

        // Assert: the old ids are gone (found by address from now on), the
        // new one is known.
        assert_eq!(
            in_flight.take(&run, OpKind::Add, ListId(1), &[&email(0)]),
            None
        );
        assert_eq!(
            in_flight.take(&run, OpKind::Add, ListId(1), &[&email(MAX_IN_FLIGHT)]),
            Some(vec![-1])
        );
    }
}
