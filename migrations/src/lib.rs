//! Schema migrations of the state database, applied at start-up by every
//! command that touches the database (`Migrator::up`). One file per
//! migration, `mYYYYMMDD_HHMMSS_verb_noun.rs`, each with a `down()`.

pub use sea_orm_migration::prelude::*;

mod m20261123_000001_create_state_tables;
mod m20261123_000002_create_writeback_ledger;
mod m20261123_000003_index_operations_by_email;
mod m20261130_000004_create_lease;
mod m20261130_000005_create_refusals;
mod m20261130_000006_bound_state;
mod m20261130_000007_index_by_address;
mod m20261130_000008_index_export_lines_by_list;
mod m20261130_000009_create_log_notes;
mod m20261204_000010_describe_log_notes;
mod m20261204_000011_create_run_requests;
mod m20261205_000012_index_ledger_by_status_and_id;
mod m20261205_000013_mark_daemon_unsubscribes;
mod m20261205_000014_create_audit_trail;
mod m20261205_000015_create_forget_key;
mod m20261205_000016_create_reseller_top_ups;

/// The migrator: every migration in order.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261123_000001_create_state_tables::Migration),
            Box::new(m20261123_000002_create_writeback_ledger::Migration),
            Box::new(m20261123_000003_index_operations_by_email::Migration),
            Box::new(m20261130_000004_create_lease::Migration),
            Box::new(m20261130_000005_create_refusals::Migration),
            Box::new(m20261130_000006_bound_state::Migration),
            Box::new(m20261130_000007_index_by_address::Migration),
            Box::new(m20261130_000008_index_export_lines_by_list::Migration),
            Box::new(m20261130_000009_create_log_notes::Migration),
            Box::new(m20261204_000010_describe_log_notes::Migration),
            Box::new(m20261204_000011_create_run_requests::Migration),
            Box::new(m20261205_000012_index_ledger_by_status_and_id::Migration),
            Box::new(m20261205_000013_mark_daemon_unsubscribes::Migration),
            Box::new(m20261205_000014_create_audit_trail::Migration),
            Box::new(m20261205_000015_create_forget_key::Migration),
            Box::new(m20261205_000016_create_reseller_top_ups::Migration),
        ]
    }
}
