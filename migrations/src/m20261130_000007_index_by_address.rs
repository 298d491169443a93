//! `explain EMAIL` looks an address up in the operations and in the
//! write-back ledger; without these indexes each question would read the
//! whole table (millions of rows after a year).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Operations {
    Table,
    Email,
}

#[derive(DeriveIden)]
enum WritebackLedger {
    Table,
    Email,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name("operations_email")
                    .table(Operations::Table)
                    .col(Operations::Email)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("writeback_ledger_email")
                    .table(WritebackLedger::Table)
                    .col(WritebackLedger::Email)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (name, table) in [
            ("writeback_ledger_email", WritebackLedger::Table.into_iden()),
            ("operations_email", Operations::Table.into_iden()),
        ] {
            manager
                .drop_index(Index::drop().name(name).table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}
