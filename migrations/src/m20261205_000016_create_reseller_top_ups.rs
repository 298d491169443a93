//! `reseller_top_ups`: each `add-count` the daemon asked of the reseller
//! API for this tenant, recorded before the call (so that an instance that
//! lost the tenant cannot make one: the record is a fenced write) and
//! finished with its outcome. `day` is the calendar day in `edm.timezone`
//! the call counts towards (`reseller.top_up_max_per_day`).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ResellerTopUps {
    Table,
    Id,
    Day,
    At,
    Count,
    Outcome,
    Detail,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ResellerTopUps::Table)
                    .col(big_pk_auto(ResellerTopUps::Id))
                    .col(string(ResellerTopUps::Day))
                    .col(big_integer(ResellerTopUps::At))
                    .col(big_integer(ResellerTopUps::Count))
                    .col(string(ResellerTopUps::Outcome))
                    .col(string_null(ResellerTopUps::Detail))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("reseller_top_ups_by_day")
                    .table(ResellerTopUps::Table)
                    .col(ResellerTopUps::Day)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ResellerTopUps::Table).to_owned())
            .await
    }
}
