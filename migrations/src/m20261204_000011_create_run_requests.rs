//! `run_requests`: `--once` asks the active daemon to run a job next,
//! through the state database both reach. The requester appends a
//! `queued` row; the daemon claims it (`running`), runs it between its
//! scheduled runs and writes the outcome and what `--once` prints
//! (`done`); a requester that gives up first marks it `cancelled`.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum RunRequests {
    Table,
    Id,
    Job,
    Full,
    Force,
    RetryParked,
    State,
    RequestedBy,
    RequestedAt,
    ClaimedBy,
    ClaimedAt,
    FinishedAt,
    Succeeded,
    Output,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(RunRequests::Table)
                    .col(big_pk_auto(RunRequests::Id))
                    // NULL: both jobs, contacts first.
                    .col(string_null(RunRequests::Job))
                    .col(boolean(RunRequests::Full))
                    .col(boolean(RunRequests::Force))
                    .col(boolean(RunRequests::RetryParked))
                    .col(string(RunRequests::State))
                    .col(string(RunRequests::RequestedBy))
                    .col(big_integer(RunRequests::RequestedAt))
                    .col(string_null(RunRequests::ClaimedBy))
                    .col(big_integer_null(RunRequests::ClaimedAt))
                    .col(big_integer_null(RunRequests::FinishedAt))
                    .col(boolean_null(RunRequests::Succeeded))
                    .col(text_null(RunRequests::Output))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("run_requests_by_state")
                    .table(RunRequests::Table)
                    .col(RunRequests::State)
                    .col(RunRequests::Id)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(RunRequests::Table).to_owned())
            .await
    }
}
