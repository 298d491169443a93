//! `members.unsubscribed`: the daemon's own `ml-unsub` of this member took
//! effect and the daemon has not added it since. A member EDM no longer
//! holds is otherwise the same row whether the daemon unsubscribed it or
//! somebody deleted it in EDM; the drift report needs to tell them apart
//! (an unsubscribed address that is active again is a consent risk, a
//! deleted one that is back is not the daemon's doing).
//!
//! Existing rows are marked from the operations still kept: an absent
//! member whose latest completed add or unsubscribe is an unsubscribe.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Members {
    Table,
    Unsubscribed,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Members::Table)
                    .add_column(boolean(Members::Unsubscribed).default(false))
                    .to_owned(),
            )
            .await?;
        manager
            .get_connection()
            .execute_unprepared(
                "UPDATE members SET unsubscribed = TRUE \
                 WHERE present = FALSE AND origin = 'owned' \
                 AND (SELECT o.kind FROM operations o \
                      WHERE o.list_id = members.list_id AND o.email = members.email \
                      AND o.status = 'done' AND o.kind <> 'edit' \
                      ORDER BY o.id DESC LIMIT 1) = 'unsub'",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Members::Table)
                    .drop_column(Members::Unsubscribed)
                    .to_owned(),
            )
            .await
    }
}
