//! Findings already logged (an invalid email, link-men sharing an
//! address): each is logged once, not every run. A row per finding still
//! true, keyed by a digest of what was found; a finding that goes away
//! loses its row, so it is logged again if it comes back.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum LogNotes {
    Table,
    Digest,
    NotedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(LogNotes::Table)
                    .col(
                        ColumnDef::new(LogNotes::Digest)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(LogNotes::NotedAt).big_integer().not_null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(LogNotes::Table).to_owned())
            .await
    }
}
