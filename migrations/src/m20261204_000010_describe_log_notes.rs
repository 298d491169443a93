//! What each logged finding was about, so that `explain` can answer the
//! masked address a log line printed (`l***@example.com`, `x*** (no @)`):
//! the address as the CRM gave it, the link-man and customer, the list
//! (for a shared address) and the reason or the other link-men. Rows
//! written before this migration keep these empty until their finding is
//! logged again.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum LogNotes {
    Table,
    Kind,
    Address,
    LinkManId,
    CustomerId,
    ListId,
    Detail,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite's ALTER TABLE adds one at a time.
        for column in [
            ColumnDef::new(LogNotes::Kind).string().null().to_owned(),
            ColumnDef::new(LogNotes::Address).string().null().to_owned(),
            ColumnDef::new(LogNotes::LinkManId)
                .big_integer()
                .null()
                .to_owned(),
            ColumnDef::new(LogNotes::CustomerId)
                .big_integer()
                .null()
                .to_owned(),
            ColumnDef::new(LogNotes::ListId)
                .big_integer()
                .null()
                .to_owned(),
            ColumnDef::new(LogNotes::Detail).string().null().to_owned(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(LogNotes::Table)
                        .add_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [
            LogNotes::Detail,
            LogNotes::ListId,
            LogNotes::CustomerId,
            LogNotes::LinkManId,
            LogNotes::Address,
            LogNotes::Kind,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(LogNotes::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
