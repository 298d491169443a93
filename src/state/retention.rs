//! Bounded state (`database.retention_days`): at the end of a run, done
//! and superseded operations, finished runs and export lines older than
//! the window are deleted, `CHUNK`-sized deletes at a time so no statement
//! holds the database for long. Never pruned: pending operations; an
//! own `ml-unsub` that rule 6's matching may still pair with an
//! export line (not yet matched, and not older than its list's last export
//! read); the newest finished run of each job; the write-back ledger and
//! the suppressions (the exactly-once and never-resubscribe memory); the
//! refusals; the members; `--once` requests not finished. Pruned export lines stay counted as seen through
//! a per-list watermark (`lines_seen_through`).

use anyhow::Context;
use sea_orm::sea_query::{Condition, OnConflict};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QuerySelect};

use super::entities::{list_state, operation, run, unsub_line};
use super::*;

/// Rows a pruning pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Pruned {
    pub operations: u64,
    pub runs: u64,
    pub export_lines: u64,
    /// Finished or cancelled `--once` requests (`state::requests`).
    pub run_requests: u64,
}

impl Pruned {
    pub fn total(&self) -> u64 {
        self.operations + self.runs + self.export_lines + self.run_requests
    }
}

/// Rows per pruning delete.
const PRUNE_CHUNK: u64 = 5_000;

impl Store {
    /// Deletes what is older than `cutoff_ms` (milliseconds since the Unix
    /// epoch) and no longer needed; see the module documentation.
    pub async fn prune(&self, cutoff_ms: i64) -> anyhow::Result<Pruned> {
        let books = list_state::Entity::find()
            .all(&self.db)
            .await
            .context("cannot read the list bookkeeping")?;
        let mut pruned = Pruned {
            operations: self.prune_operations(cutoff_ms, &books).await?,
            runs: self.prune_runs(cutoff_ms).await?,
            ..Pruned::default()
        };
        for book in &books {
            pruned.export_lines += self.prune_export_lines(cutoff_ms, book).await?;
        }
        pruned.run_requests = self.prune_run_requests(cutoff_ms).await?;
        Ok(pruned)
    }

    /// Operations: done or superseded, untouched since the cutoff; an
    /// unsubscribe only once matched, superseded, or older than its list's
    /// last export read (the matching reads only newer ones).
    async fn prune_operations(
        &self,
        cutoff_ms: i64,
        books: &[list_state::Model],
    ) -> anyhow::Result<u64> {
        let mut unsub_done = Condition::any()
            .add(operation::Column::ExportMatched.eq(true))
            .add(operation::Column::Status.eq(OpStatus::Superseded));
        for b in books {
            if let Some(read_at) = b.export_read_at {
                unsub_done = unsub_done.add(
                    Condition::all()
                        .add(operation::Column::ListId.eq(b.list_id))
                        .add(operation::Column::CreatedAt.lt(read_at)),
                );
            }
        }
        let prunable = Condition::all()
            .add(operation::Column::Status.is_in([OpStatus::Done, OpStatus::Superseded]))
            .add(operation::Column::UpdatedAt.lt(cutoff_ms))
            .add(
                Condition::any()
                    .add(operation::Column::Kind.ne(OpKind::Unsub))
                    .add(unsub_done),
            );
        let mut deleted = 0;
        loop {
            let ids: Vec<i64> = operation::Entity::find()
                .select_only()
                .column(operation::Column::Id)
                .filter(prunable.clone())
                .limit(PRUNE_CHUNK)
                .into_tuple()
                .all(&self.db)
                .await
                .context("cannot find operations to prune")?;
            if ids.is_empty() {
                return Ok(deleted);
            }
            deleted += operation::Entity::delete_many()
                .filter(operation::Column::Id.is_in(ids.iter().copied()))
                .exec(&self.db)
                .await
                .context("cannot prune operations")?
                .rows_affected;
            if (ids.len() as u64) < PRUNE_CHUNK {
                return Ok(deleted);
            }
        }
    }

    /// Runs: finished before the cutoff, except each job's newest.
    async fn prune_runs(&self, cutoff_ms: i64) -> anyhow::Result<u64> {
        let keep: Vec<String> = self
            .last_finished_runs()
            .await?
            .into_iter()
            .map(|r| r.id)
            .collect();
        let mut deleted = 0;
        loop {
            let ids: Vec<String> = run::Entity::find()
                .select_only()
                .column(run::Column::Id)
                .filter(run::Column::FinishedAt.lt(cutoff_ms))
                .filter(run::Column::Id.is_not_in(keep.iter().cloned()))
                .limit(PRUNE_CHUNK)
                .into_tuple()
                .all(&self.db)
                .await
                .context("cannot find runs to prune")?;
            if ids.is_empty() {
                return Ok(deleted);
            }
            deleted += run::Entity::delete_many()
                .filter(run::Column::Id.is_in(ids.iter().cloned()))
                .exec(&self.db)
                .await
                .context("cannot prune runs")?
                .rows_affected;
            if (ids.len() as u64) < PRUNE_CHUNK {
                return Ok(deleted);
            }
        }
    }

    /// Export lines of one list: every line first seen before the cutoff,
    /// under a watermark of the newest such line's time. The watermark is
    /// written first, so a pass cut short leaves only lines that already
    /// count as seen. Every query is a range of `(list_id, seen_at)` over
    /// the old lines only (migration 8), so a run's pruning costs what it
    /// deletes, not what is kept.
    async fn prune_export_lines(
        &self,
        cutoff_ms: i64,
        book: &list_state::Model,
    ) -> anyhow::Result<u64> {
        let list_id = book.list_id;
        let through: Option<String> = unsub_line::Entity::find()
            .select_only()
            .column_as(unsub_line::Column::Time.max(), "through")
            .filter(unsub_line::Column::ListId.eq(list_id))
            .filter(unsub_line::Column::SeenAt.lt(cutoff_ms))
            .into_tuple()
            .one(&self.db)
            .await
            .context("cannot read export lines")?
            .flatten();
        let Some(through) = through else {
            return Ok(0);
        };
        let watermark = book
            .lines_seen_through
            .clone()
            .map_or(through.clone(), |b| b.max(through));
        list_state::Entity::insert(list_state::ActiveModel {
            list_id: Set(list_id),
            initial_read_at: Set(None),
            export_read_at: Set(None),
            lines_seen_through: Set(Some(watermark)),
        })
        .on_conflict(
            OnConflict::column(list_state::Column::ListId)
                .update_column(list_state::Column::LinesSeenThrough)
                .to_owned(),
        )
        .exec_without_returning(&self.db)
        .await
        .context("cannot record the export-line watermark")?;
        let mut deleted = 0;
        loop {
            let ids: Vec<i64> = unsub_line::Entity::find()
                .select_only()
                .column(unsub_line::Column::Id)
                .filter(unsub_line::Column::ListId.eq(list_id))
                .filter(unsub_line::Column::SeenAt.lt(cutoff_ms))
                .limit(PRUNE_CHUNK)
                .into_tuple()
                .all(&self.db)
                .await
                .context("cannot find export lines to prune")?;
            if ids.is_empty() {
                return Ok(deleted);
            }
            deleted += unsub_line::Entity::delete_many()
                .filter(unsub_line::Column::Id.is_in(ids.iter().copied()))
                .exec(&self.db)
                .await
                .context("cannot prune export lines")?
                .rows_affected;
            if (ids.len() as u64) < PRUNE_CHUNK {
                return Ok(deleted);
            }
        }
    }
}
