//! The `runs` table: one row per job run, from start to its end (or to
//! `abandoned` when its process died).

use crate::domain::RunId;
use std::collections::HashSet;

use anyhow::Context;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveEnum, ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};

use super::entities::run;
use super::*;

/// A summary row for `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRow {
    pub id: String,
    pub job: Job,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub status: RunStatus,
    pub dry_run: bool,
    pub counts: serde_json::Value,
    pub error: Option<String>,
}

impl From<run::Model> for RunRow {
    fn from(r: run::Model) -> Self {
        RunRow {
            id: r.id,
            job: r.job,
            started_at: r.started_at,
            finished_at: r.finished_at,
            status: r.status,
            dry_run: r.dry_run,
            counts: serde_json::from_str(&r.counts).unwrap_or(serde_json::Value::Null),
            error: r.error,
        }
    }
}

impl Store {
    /// Marks runs still `running` as `abandoned`: their process ended
    /// without finishing them (SIGKILL, power loss, a crash). Called by a
    /// job about to start while this process holds the instance lock, so
    /// no other run can be going. Returns `(id, job)` of each.
    pub async fn abandon_running_runs(&self) -> anyhow::Result<Vec<(String, Job)>> {
        let rows = run::Entity::find()
            .filter(run::Column::Status.eq(RunStatus::Running))
            .all(&self.db)
            .await
            .context("cannot read runs")?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        run::Entity::update_many()
            .col_expr(
                run::Column::Status,
                Expr::value(RunStatus::Abandoned.to_value()),
            )
            .col_expr(run::Column::FinishedAt, Some(now_ms()).into())
            .col_expr(
                run::Column::Error,
                Some(
                    "the process ended without finishing this run (killed or crashed)".to_string(),
                )
                .into(),
            )
            .filter(run::Column::Id.is_in(ids))
            .filter(run::Column::Status.eq(RunStatus::Running))
            .exec(&self.db)
            .await
            .context("cannot mark abandoned runs")?;
        Ok(rows.into_iter().map(|r| (r.id, r.job)).collect())
    }

    /// Starts a run record.
    pub async fn start_run(&self, id: &RunId, job: Job, dry_run: bool) -> anyhow::Result<()> {
        run::Entity::insert(run::ActiveModel {
            id: Set(id.as_str().to_string()),
            job: Set(job),
            started_at: Set(now_ms()),
            finished_at: Set(None),
            status: Set(RunStatus::Running),
            dry_run: Set(dry_run),
            counts: Set("{}".into()),
            error: Set(None),
        })
        .exec_without_returning(&self.db)
        .await
        .context("cannot record the run")?;
        Ok(())
    }

    /// Finishes a run record.
    pub async fn finish_run(
        &self,
        id: &RunId,
        status: RunStatus,
        counts: &serde_json::Value,
        error: Option<&str>,
    ) -> anyhow::Result<()> {
        run::Entity::update_many()
            .col_expr(run::Column::FinishedAt, Some(now_ms()).into())
            .col_expr(run::Column::Status, Expr::value(status.to_value()))
            .col_expr(run::Column::Counts, counts.to_string().into())
            .col_expr(run::Column::Error, error.map(str::to_string).into())
            .filter(run::Column::Id.eq(id.as_str()))
            .exec(&self.db)
            .await
            .context("cannot finish the run record")?;
        Ok(())
    }

    /// The latest runs, newest first.
    pub async fn recent_runs(&self, limit: u64) -> anyhow::Result<Vec<RunRow>> {
        let rows = run::Entity::find()
            .order_by_desc(run::Column::StartedAt)
            .limit(limit)
            .all(&self.db)
            .await
            .context("cannot read runs")?;
        Ok(rows.into_iter().map(RunRow::from).collect())
    }

    /// When `job` last finished a run that succeeded (ms since the epoch),
    /// for the last-success gauge after a restart.
    pub async fn last_success(&self, job: Job) -> anyhow::Result<Option<i64>> {
        let at: Option<Option<i64>> = run::Entity::find()
            .select_only()
            .column_as(run::Column::FinishedAt.max(), "at")
            .filter(run::Column::Job.eq(job))
            .filter(run::Column::Status.eq(RunStatus::Succeeded))
            .filter(run::Column::DryRun.eq(false))
            .into_tuple()
            .one(&self.db)
            .await
            .context("cannot read the last successful run")?;
        Ok(at.flatten())
    }

    /// The latest finished (not dry) run of each job, newest first.
    pub async fn last_finished_runs(&self) -> anyhow::Result<Vec<RunRow>> {
        let rows = run::Entity::find()
            .filter(run::Column::FinishedAt.is_not_null())
            .filter(run::Column::DryRun.eq(false))
            .order_by_desc(run::Column::StartedAt)
            .limit(100)
            .all(&self.db)
            .await
            .context("cannot read runs")?;
        let mut seen = HashSet::new();
        Ok(rows
            .into_iter()
            .filter(|r| seen.insert(r.job))
            .map(RunRow::from)
            .collect())
    }
}
