//! Bounded state (`database.retention_days`): done operations, finished
//! runs and export lines older than the window are pruned at the end of a
//! run. Indexes let each pruning chunk find its rows without a scan, and a
//! per-list watermark (`lines_seen_through`: the newest export-line time
//! pruned) keeps pruned lines counted as seen, so an old line is never
//! mistaken for a new user unsubscribe.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Operations {
    Table,
    Status,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum UnsubLines {
    Table,
    SeenAt,
}

#[derive(DeriveIden)]
enum Runs {
    Table,
    FinishedAt,
}

#[derive(DeriveIden)]
enum ListState {
    Table,
    LinesSeenThrough,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name("operations_prune")
                    .table(Operations::Table)
                    .col(Operations::Status)
                    .col(Operations::UpdatedAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("unsub_lines_seen_at")
                    .table(UnsubLines::Table)
                    .col(UnsubLines::SeenAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("runs_finished_at")
                    .table(Runs::Table)
                    .col(Runs::FinishedAt)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(ListState::Table)
                    .add_column(string_null(ListState::LinesSeenThrough))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(ListState::Table)
                    .drop_column(ListState::LinesSeenThrough)
                    .to_owned(),
            )
            .await?;
        for (name, table) in [
            ("runs_finished_at", Runs::Table.into_iden()),
            ("unsub_lines_seen_at", UnsubLines::Table.into_iden()),
            ("operations_prune", Operations::Table.into_iden()),
        ] {
            manager
                .drop_index(Index::drop().name(name).table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}
