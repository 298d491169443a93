//! The lease: one row whose `epoch` each new lock holder increments. Every
//! batch an instance records as pending is recorded in a transaction that
//! also checks the epoch is still the one it took, so an instance that lost
//! the lock (and has not noticed yet) cannot start another write: the
//! fencing token of the instance lock.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Lease {
    Table,
    Id,
    Epoch,
    Holder,
    Host,
    Pid,
    AcquiredAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Lease::Table)
                    .col(
                        ColumnDef::new(Lease::Id)
                            .big_integer()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Lease::Epoch).big_integer().not_null())
                    .col(ColumnDef::new(Lease::Holder).string().not_null())
                    .col(ColumnDef::new(Lease::Host).string().not_null())
                    .col(ColumnDef::new(Lease::Pid).big_integer().not_null())
                    .col(ColumnDef::new(Lease::AcquiredAt).big_integer().not_null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Lease::Table).to_owned())
            .await
    }
}
