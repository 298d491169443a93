//! `secrets`: values the database keeps for itself. `forget_key` is the
//! key `forget` hashes an address with (HMAC-SHA-256): 256 random bits,
//! made here by the database's own generator, never printed. A forgotten
//! address is kept only as its keyed hash, which matches the address when
//! the CRM offers it again but cannot be turned back into it, nor found
//! by hashing guessed addresses without the key.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Secrets {
    Table,
    Name,
    Value,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Secrets::Table)
                    .col(string(Secrets::Name).primary_key())
                    .col(string(Secrets::Value))
                    .to_owned(),
            )
            .await?;
        let random = match manager.get_database_backend() {
            DatabaseBackend::Postgres => {
                "replace(gen_random_uuid()::text || gen_random_uuid()::text || gen_random_uuid()::text, '-', '')"
            }
            _ => "lower(hex(randomblob(32)))",
        };
        manager
            .get_connection()
            .execute_unprepared(&format!(
                "INSERT INTO secrets (name, value) VALUES ('forget_key', {random})"
            ))
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Secrets::Table).to_owned())
            .await
    }
}
