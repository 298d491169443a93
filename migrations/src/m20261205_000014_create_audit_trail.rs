//! `audit_trail`: the consent trail. Every change of an address's state in
//! a list is appended here and never updated in place (only pruned after
//! `database.audit_retention_days`, or its address replaced by a keyed
//! hash by `forget`). `operations.reason` keeps why an unsubscribe was
//! planned, so that one settled by a later run is entered with its reason.
//!
//! The trail of an existing database starts here: one `imported` entry per
//! known member (its origin and whether EDM holds it) and per suppression.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden, Clone, Copy)]
enum AuditTrail {
    Table,
    Id,
    At,
    ListId,
    Email,
    Event,
    Reason,
    Detail,
    LinkManId,
    CustomerId,
    Source,
    RunId,
}

#[derive(DeriveIden)]
enum Operations {
    Table,
    Reason,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AuditTrail::Table)
                    .col(big_pk_auto(AuditTrail::Id))
                    // Milliseconds since the epoch, UTC.
                    .col(big_integer(AuditTrail::At))
                    // NULL: every list (a bounce, `forget`).
                    .col(big_integer_null(AuditTrail::ListId))
                    .col(string(AuditTrail::Email))
                    .col(string(AuditTrail::Event))
                    .col(string_null(AuditTrail::Reason))
                    .col(string_null(AuditTrail::Detail))
                    .col(big_integer_null(AuditTrail::LinkManId))
                    .col(big_integer_null(AuditTrail::CustomerId))
                    .col(string(AuditTrail::Source))
                    .col(string_null(AuditTrail::RunId))
                    .to_owned(),
            )
            .await?;
        for (name, columns) in [
            ("audit_trail_by_email", [AuditTrail::Email, AuditTrail::At]),
            ("audit_trail_by_time", [AuditTrail::At, AuditTrail::Id]),
        ] {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(AuditTrail::Table)
                        .col(columns[0])
                        .col(columns[1])
                        .to_owned(),
                )
                .await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table(Operations::Table)
                    .add_column(string_null(Operations::Reason))
                    .to_owned(),
            )
            .await?;
        import(manager).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Operations::Table)
                    .drop_column(Operations::Reason)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table(AuditTrail::Table).to_owned())
            .await
    }
}

/// One `imported` entry per member and per suppression, at the time of
/// the migration.
async fn import(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let db = manager.get_connection();
    db.execute_unprepared(&format!(
        "INSERT INTO audit_trail (at, list_id, email, event, reason, detail, link_man_id, customer_id, source) \
         SELECT {now}, list_id, email, 'imported', origin, \
                CASE WHEN present THEN 'in the list' ELSE 'not in the list' END, \
                link_man_id, customer_id, CASE WHEN origin = 'foreign' THEN 'edm' ELSE 'crm' END \
         FROM members"
    ))
    .await?;
    db.execute_unprepared(&format!(
        "INSERT INTO audit_trail (at, list_id, email, event, reason, detail, source) \
         SELECT {now}, CASE WHEN list_id = 0 THEN NULL ELSE list_id END, email, 'imported', reason, source, 'edm' \
         FROM suppressions"
    ))
    .await?;
    Ok(())
}
