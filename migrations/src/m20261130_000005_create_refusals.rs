//! Poison records. `refusals`: EDM operations (add, unsubscribe, edit) that
//! EDM refused with an error code once isolated from their batch, keyed by
//! (kind, list, address), with how many runs refused them; past
//! `edm.max_attempts` runs one is parked (not sent again until its content
//! changes or `--retry-parked`). The ledger gains the same count for
//! contact-history records (`crm.max_attempts`), whose `status` may now be
//! `parked`.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Refusals {
    Table,
    Id,
    Kind,
    ListId,
    Email,
    Content,
    Code,
    Message,
    FailedRuns,
    LastRunId,
    Parked,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum WritebackLedger {
    Table,
    FailedRuns,
    LastFailedRun,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Refusals::Table)
                    .col(big_pk_auto(Refusals::Id))
                    .col(string(Refusals::Kind))
                    .col(big_integer(Refusals::ListId))
                    .col(string(Refusals::Email))
                    .col(text(Refusals::Content))
                    .col(string(Refusals::Code))
                    .col(text(Refusals::Message))
                    .col(integer(Refusals::FailedRuns))
                    .col(string(Refusals::LastRunId))
                    .col(boolean(Refusals::Parked))
                    .col(big_integer(Refusals::CreatedAt))
                    .col(big_integer(Refusals::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("refusals_key")
                    .table(Refusals::Table)
                    .col(Refusals::Kind)
                    .col(Refusals::ListId)
                    .col(Refusals::Email)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(WritebackLedger::Table)
                    .add_column(integer(WritebackLedger::FailedRuns).default(0))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(WritebackLedger::Table)
                    .add_column(string_null(WritebackLedger::LastFailedRun))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(WritebackLedger::Table)
                    .drop_column(WritebackLedger::LastFailedRun)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(WritebackLedger::Table)
                    .drop_column(WritebackLedger::FailedRuns)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table(Refusals::Table).to_owned())
            .await
    }
}
