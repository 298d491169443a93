//! The contacts job's state: members, the operation outbox, suppressions,
//! unsubscribe-export lines seen, per-list bookkeeping, and runs.
//!
//! Timestamps are milliseconds since the Unix epoch (`BIGINT`), which reads
//! the same on SQLite and PostgreSQL.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Members {
    Table,
    Id,
    ListId,
    Email,
    Origin,
    Present,
    LinkManId,
    CustomerId,
    EdmId,
    Fullname,
    Vars,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Operations {
    Table,
    Id,
    RunId,
    Kind,
    ListId,
    Email,
    EdmId,
    LinkManId,
    CustomerId,
    Fullname,
    Vars,
    Status,
    Attempts,
    LastError,
    ExportMatched,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Suppressions {
    Table,
    Id,
    ListId,
    Email,
    Reason,
    Source,
    CreatedAt,
}

#[derive(DeriveIden)]
enum UnsubLines {
    Table,
    Id,
    ListId,
    Email,
    Time,
    SeenAt,
}

#[derive(DeriveIden)]
enum ListState {
    Table,
    ListId,
    InitialReadAt,
    ExportReadAt,
}

#[derive(DeriveIden)]
enum Runs {
    Table,
    Id,
    Job,
    StartedAt,
    FinishedAt,
    Status,
    DryRun,
    Counts,
    Error,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Members::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Members::Id))
                    .col(big_integer(Members::ListId))
                    .col(string(Members::Email))
                    .col(string(Members::Origin))
                    .col(boolean(Members::Present))
                    .col(big_integer_null(Members::LinkManId))
                    .col(big_integer_null(Members::CustomerId))
                    .col(big_integer_null(Members::EdmId))
                    .col(text(Members::Fullname))
                    .col(text(Members::Vars))
                    .col(big_integer(Members::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("members_list_email")
                    .table(Members::Table)
                    .col(Members::ListId)
                    .col(Members::Email)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("members_email")
                    .table(Members::Table)
                    .col(Members::Email)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Operations::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Operations::Id))
                    .col(string(Operations::RunId))
                    .col(string(Operations::Kind))
                    .col(big_integer(Operations::ListId))
                    .col(string(Operations::Email))
                    .col(big_integer_null(Operations::EdmId))
                    .col(big_integer_null(Operations::LinkManId))
                    .col(big_integer_null(Operations::CustomerId))
                    .col(text(Operations::Fullname))
                    .col(text(Operations::Vars))
                    .col(string(Operations::Status))
                    .col(integer(Operations::Attempts))
                    .col(text_null(Operations::LastError))
                    .col(boolean(Operations::ExportMatched))
                    .col(big_integer(Operations::CreatedAt))
                    .col(big_integer(Operations::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("operations_status")
                    .table(Operations::Table)
                    .col(Operations::Status)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("operations_run")
                    .table(Operations::Table)
                    .col(Operations::RunId)
                    .col(Operations::Kind)
                    .col(Operations::ListId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("operations_unsub_match")
                    .table(Operations::Table)
                    .col(Operations::Kind)
                    .col(Operations::ListId)
                    .col(Operations::ExportMatched)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Suppressions::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Suppressions::Id))
                    .col(big_integer(Suppressions::ListId))
                    .col(string(Suppressions::Email))
                    .col(string(Suppressions::Reason))
                    .col(text(Suppressions::Source))
                    .col(big_integer(Suppressions::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("suppressions_list_email")
                    .table(Suppressions::Table)
                    .col(Suppressions::ListId)
                    .col(Suppressions::Email)
                    .unique()
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(UnsubLines::Table)
                    .if_not_exists()
                    .col(big_pk_auto(UnsubLines::Id))
                    .col(big_integer(UnsubLines::ListId))
                    .col(string(UnsubLines::Email))
                    .col(string(UnsubLines::Time))
                    .col(big_integer(UnsubLines::SeenAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("unsub_lines_unique")
                    .table(UnsubLines::Table)
                    .col(UnsubLines::ListId)
                    .col(UnsubLines::Email)
                    .col(UnsubLines::Time)
                    .unique()
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(ListState::Table)
                    .if_not_exists()
                    .col(big_integer(ListState::ListId).primary_key())
                    .col(big_integer_null(ListState::InitialReadAt))
                    .col(big_integer_null(ListState::ExportReadAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Runs::Table)
                    .if_not_exists()
                    .col(string(Runs::Id).primary_key())
                    .col(string(Runs::Job))
                    .col(big_integer(Runs::StartedAt))
                    .col(big_integer_null(Runs::FinishedAt))
                    .col(string(Runs::Status))
                    .col(boolean(Runs::DryRun))
                    .col(text(Runs::Counts))
                    .col(text_null(Runs::Error))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("runs_job_started")
                    .table(Runs::Table)
                    .col(Runs::Job)
                    .col(Runs::StartedAt)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Runs::Table.into_iden(),
            ListState::Table.into_iden(),
            UnsubLines::Table.into_iden(),
            Suppressions::Table.into_iden(),
            Operations::Table.into_iden(),
            Members::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
