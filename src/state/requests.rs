//! `--once` next to an active daemon: the request row it writes, the
//! daemon's claim, and the outcome the daemon writes back (migration 11).
//! Each change is one conditional `UPDATE`, so a request is claimed by
//! one daemon at most, and a requester that gives up cancels only a
//! request no daemon took.

use anyhow::Context;
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder};

use super::entities::run_request;
use super::*;
use crate::stored_enums::RequestState;

/// What `--once` asks the daemon to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunAsk {
    /// `None`: both jobs, contacts first.
    pub job: Option<Job>,
    pub full: bool,
    pub force: bool,
    pub retry_parked: bool,
}

/// A request as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRequest {
    pub id: i64,
    pub ask: RunAsk,
    pub state: RequestState,
    pub requested_by: String,
    /// When it was asked (ms since the epoch).
    pub requested_at: i64,
    pub claimed_by: Option<String>,
    pub succeeded: Option<bool>,
    pub output: Option<String>,
}

impl From<run_request::Model> for RunRequest {
    fn from(m: run_request::Model) -> RunRequest {
        RunRequest {
            id: m.id,
            ask: RunAsk {
                job: m.job,
                full: m.full,
                force: m.force,
                retry_parked: m.retry_parked,
            },
            state: m.state,
            requested_by: m.requested_by,
            requested_at: m.requested_at,
            claimed_by: m.claimed_by,
            succeeded: m.succeeded,
            output: m.output,
        }
    }
}

impl Store {
    /// Queues `ask` for the active daemon; returns the request's id.
    pub async fn request_run(&self, ask: RunAsk, requested_by: &str) -> anyhow::Result<i64> {
        let row = run_request::ActiveModel {
            job: Set(ask.job),
            full: Set(ask.full),
            force: Set(ask.force),
            retry_parked: Set(ask.retry_parked),
            state: Set(RequestState::Queued),
            requested_by: Set(requested_by.to_string()),
            requested_at: Set(now_ms()),
            claimed_by: Set(None),
            claimed_at: Set(None),
            finished_at: Set(None),
            succeeded: Set(None),
            output: Set(None),
            ..Default::default()
        };
        let id = run_request::Entity::insert(row)
            .exec(&self.db)
            .await
            .context("cannot record the run request")?
            .last_insert_id;
        Ok(id)
    }

    /// The request `id`, as it stands.
    pub async fn run_request(&self, id: i64) -> anyhow::Result<Option<RunRequest>> {
        Ok(run_request::Entity::find_by_id(id)
            .one(&self.db)
            .await
            .context("cannot read the run request")?
            .map(RunRequest::from))
    }

    /// Requests not yet answered (queued, or running in a daemon), oldest
    /// first: `--once` runs waiting for the daemon, for `status`.
    pub async fn open_run_requests(&self) -> anyhow::Result<Vec<RunRequest>> {
        Ok(run_request::Entity::find()
            .filter(run_request::Column::State.is_in([RequestState::Queued, RequestState::Running]))
            .order_by_asc(run_request::Column::Id)
            .all(&self.db)
            .await
            .context("cannot read the run requests")?
            .into_iter()
            .map(RunRequest::from)
            .collect())
    }

    /// Cancels request `id` if no daemon took it; `false` if one did.
    pub async fn cancel_run_request(&self, id: i64) -> anyhow::Result<bool> {
        let done = run_request::Entity::update_many()
            .col_expr(
                run_request::Column::State,
                Expr::value(RequestState::Cancelled.as_str()),
            )
            .col_expr(run_request::Column::FinishedAt, Expr::value(now_ms()))
            .filter(run_request::Column::Id.eq(id))
            .filter(run_request::Column::State.eq(RequestState::Queued))
            .exec(&self.db)
            .await
            .context("cannot cancel the run request")?;
        Ok(done.rows_affected == 1)
    }

    /// Takes the oldest queued request for `claimer`, if there is one.
    pub async fn claim_run_request(&self, claimer: &str) -> anyhow::Result<Option<RunRequest>> {
        let Some(next) = run_request::Entity::find()
            .filter(run_request::Column::State.eq(RequestState::Queued))
            .order_by_asc(run_request::Column::Id)
            .one(&self.db)
            .await
            .context("cannot read the run requests")?
        else {
            return Ok(None);
        };
        let taken = run_request::Entity::update_many()
            .col_expr(
                run_request::Column::State,
                Expr::value(RequestState::Running.as_str()),
            )
            .col_expr(run_request::Column::ClaimedBy, Expr::value(claimer))
            .col_expr(run_request::Column::ClaimedAt, Expr::value(now_ms()))
            .filter(run_request::Column::Id.eq(next.id))
            .filter(run_request::Column::State.eq(RequestState::Queued))
            .exec(&self.db)
            .await
            .context("cannot claim the run request")?;
        if taken.rows_affected != 1 {
            return Ok(None); // cancelled (or taken) meanwhile
        }
        self.run_request(next.id).await
    }

    /// Records the outcome of request `id` and what `--once` prints.
    pub async fn finish_run_request(
        &self,
        id: i64,
        succeeded: bool,
        output: &str,
    ) -> anyhow::Result<()> {
        run_request::Entity::update_many()
            .col_expr(
                run_request::Column::State,
                Expr::value(RequestState::Done.as_str()),
            )
            .col_expr(run_request::Column::Succeeded, Expr::value(succeeded))
            .col_expr(run_request::Column::Output, Expr::value(output))
            .col_expr(run_request::Column::FinishedAt, Expr::value(now_ms()))
            .filter(run_request::Column::Id.eq(id))
            .exec(&self.db)
            .await
            .context("cannot record the outcome of the run request")?;
        Ok(())
    }

    /// Marks requests a daemon took but never finished (it stopped or
    /// died) as done and failed, so their requesters stop waiting.
    pub async fn fail_unfinished_run_requests(&self, why: &str) -> anyhow::Result<u64> {
        let done = run_request::Entity::update_many()
            .col_expr(
                run_request::Column::State,
                Expr::value(RequestState::Done.as_str()),
            )
            .col_expr(run_request::Column::Succeeded, Expr::value(false))
            .col_expr(run_request::Column::Output, Expr::value(why))
            .col_expr(run_request::Column::FinishedAt, Expr::value(now_ms()))
            .filter(run_request::Column::State.eq(RequestState::Running))
            .exec(&self.db)
            .await
            .context("cannot close unfinished run requests")?;
        Ok(done.rows_affected)
    }

    /// Deletes finished and cancelled requests older than `cutoff_ms`
    /// (bounded state; queued and running ones stay).
    pub(crate) async fn prune_run_requests(&self, cutoff_ms: i64) -> anyhow::Result<u64> {
        let done = run_request::Entity::delete_many()
            .filter(run_request::Column::State.is_in([RequestState::Done, RequestState::Cancelled]))
            .filter(run_request::Column::FinishedAt.lt(cutoff_ms))
            .exec(&self.db)
            .await
            .context("cannot prune old run requests")?;
        Ok(done.rows_affected)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::super::tests::{FOREIGN_PG_SOCKETS, both_urls};
    use super::*;
    use secrecy::SecretString;

    #[tokio::test]
    async fn a_request_is_claimed_once_cancelled_only_while_queued_and_pruned_when_old_on_sqlite_and_postgres()
     {
        let _sockets = FOREIGN_PG_SOCKETS.read().await;
        let dir = tempfile::tempdir().unwrap();
        let (urls, _guard) = both_urls(dir.path()).await;
        for url in urls {
            // Arrange: two daemons' stores on one database; two requests.
            let secret = SecretString::from(url.clone());
            let (a, b) = (
                Store::connect(&secret).await.unwrap(),
                Store::connect(&secret).await.unwrap(),
            );
            let ask = RunAsk {
                job: Some(Job::Contacts),
                force: true,
                ..RunAsk::default()
            };
            let first = a.request_run(ask, "once-1").await.unwrap();
            let second = a.request_run(RunAsk::default(), "once-2").await.unwrap();

            // Act
            let open_before = a.open_run_requests().await.unwrap();
            let claimed_a = a.claim_run_request("daemon-a").await.unwrap().unwrap();
            let claimed_b = b.claim_run_request("daemon-b").await.unwrap().unwrap();
            let none_left = a.claim_run_request("daemon-a").await.unwrap();
            let cancel_taken = a.cancel_run_request(first).await.unwrap();
            a.finish_run_request(first, false, "crm-edm-sync: contacts: refused\n")
                .await
                .unwrap();
            let open_while_running = a.open_run_requests().await.unwrap();
            let third = a.request_run(RunAsk::default(), "once-3").await.unwrap();
            let cancel_queued = a.cancel_run_request(third).await.unwrap();
            let failed = b.fail_unfinished_run_requests("gone").await.unwrap();
            let pruned = a.prune_run_requests(now_ms() + 1).await.unwrap();

            // Assert: `status` sees the two queued, then the one running.
            let ids = |r: &[RunRequest]| r.iter().map(|r| r.id).collect::<Vec<_>>();
            assert_eq!(ids(&open_before), [first, second], "{url}");
            assert_eq!(ids(&open_while_running), [second], "{url}");
            // Oldest first, each taken by one daemon only.
            assert_eq!((claimed_a.id, claimed_a.ask), (first, ask), "{url}");
            assert_eq!(claimed_a.claimed_by.as_deref(), Some("daemon-a"));
            assert_eq!(claimed_b.id, second, "{url}");
            assert!(none_left.is_none(), "{url}");
            assert!(!cancel_taken && cancel_queued, "{url}");
            assert_eq!(failed, 1, "only the unfinished one: {url}");
            assert_eq!(pruned, 3, "{url}");
            assert!(a.run_request(first).await.unwrap().is_none(), "{url}");
            a.close().await;
            b.close().await;
        }
    }
}
