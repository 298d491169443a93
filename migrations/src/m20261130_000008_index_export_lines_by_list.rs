//! The end-of-run pruning of export lines works per list: the oldest line
//! of a list, the newest line time first seen before the cutoff, and the
//! lines to delete are each found through `(list_id, seen_at)`. With only
//! `(seen_at)` SQLite answered all three by walking every kept line of the
//! list (2.9 M at 100 000 link-men), every run, so a no-change rerun on a
//! year of kept history took 1.14 × its fresh time.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum UnsubLines {
    Table,
    ListId,
    SeenAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name("unsub_lines_list_seen_at")
                    .table(UnsubLines::Table)
                    .col(UnsubLines::ListId)
                    .col(UnsubLines::SeenAt)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("unsub_lines_seen_at")
                    .table(UnsubLines::Table)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
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
            .drop_index(
                Index::drop()
                    .name("unsub_lines_list_seen_at")
                    .table(UnsubLines::Table)
                    .to_owned(),
            )
            .await
    }
}
