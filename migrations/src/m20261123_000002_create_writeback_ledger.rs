//! The write-back ledger: one row per ContactHistory record the daemon
//! writes, keyed by (kind, scope, link-man), pending before the CRM call
//! and done after `{"value": true}`.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum WritebackLedger {
    Table,
    Id,
    Kind,
    Scope,
    LinkManId,
    CustomerId,
    Email,
    Title,
    Content,
    Status,
    Uncertain,
    Attempts,
    LastError,
    CreatedAt,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(WritebackLedger::Table)
                    .if_not_exists()
                    .col(big_pk_auto(WritebackLedger::Id))
                    .col(string(WritebackLedger::Kind))
                    .col(string(WritebackLedger::Scope))
                    .col(big_integer(WritebackLedger::LinkManId))
                    .col(big_integer(WritebackLedger::CustomerId))
                    .col(string(WritebackLedger::Email))
                    .col(text(WritebackLedger::Title))
                    .col(text(WritebackLedger::Content))
                    .col(string(WritebackLedger::Status))
                    .col(boolean(WritebackLedger::Uncertain))
                    .col(integer(WritebackLedger::Attempts))
                    .col(text_null(WritebackLedger::LastError))
                    .col(big_integer(WritebackLedger::CreatedAt))
                    .col(big_integer(WritebackLedger::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("writeback_ledger_key")
                    .table(WritebackLedger::Table)
                    .col(WritebackLedger::Kind)
                    .col(WritebackLedger::Scope)
                    .col(WritebackLedger::LinkManId)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("writeback_ledger_status")
                    .table(WritebackLedger::Table)
                    .col(WritebackLedger::Status)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(WritebackLedger::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}
