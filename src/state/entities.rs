//! sea-orm entities of the state database (see `migrations/`). Timestamps
//! are milliseconds since the Unix epoch.

/// What the daemon knows of one `(list_id, email)` in EDM.
pub(super) mod member {
    use sea_orm::entity::prelude::*;

    use crate::domain::Origin;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "members")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub list_id: crate::domain::ListId,
        /// Normalised address (rule 1).
        pub email: String,
        /// `owned` (the daemon added it), `adopted` (it was there and is a
        /// desired member), `foreign` (it was there and is not ours).
        pub origin: Origin,
        /// Whether EDM holds it now, as far as the daemon knows.
        pub present: bool,
        /// The daemon unsubscribed it and has not added it since.
        pub unsubscribed: bool,
        /// The link-man that owns (or last owned) it.
        pub link_man_id: Option<crate::domain::LinkManId>,
        pub customer_id: Option<crate::domain::CustomerId>,
        /// EDM's address id, once known.
        pub edm_id: Option<crate::domain::AddressId>,
        /// The fullname EDM holds.
        pub fullname: String,
        /// `var1`…`var10` as a JSON array of ten strings.
        pub vars: String,
        pub updated_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The outbox (rule 9): every planned EDM write, recorded before it
/// is sent.
pub(super) mod operation {
    use sea_orm::entity::prelude::*;

    use crate::stored_enums::{OpKind, OpStatus};

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "operations")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub run_id: crate::domain::RunId,
        /// `add`, `edit` or `unsub`.
        pub kind: OpKind,
        pub list_id: crate::domain::ListId,
        pub email: String,
        pub edm_id: Option<crate::domain::AddressId>,
        pub link_man_id: Option<crate::domain::LinkManId>,
        pub customer_id: Option<crate::domain::CustomerId>,
        pub fullname: String,
        pub vars: String,
        /// `pending` (recorded; maybe sent), `done` (EDM confirmed, or the
        /// list showed it took effect), `superseded` (shown not to have
        /// taken effect; the next plan decides again).
        pub status: OpStatus,
        pub attempts: i32,
        pub last_error: Option<String>,
        /// For `unsub`: its line in `unsubscribe-export` has been seen.
        pub export_matched: bool,
        pub created_at: i64,
        pub updated_at: i64,
        /// For `unsub`: why it was planned (the consent trail's reason).
        pub reason: Option<crate::stored_enums::UnsubReason>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Addresses that get no operation: user unsubscribes (per list) and
/// hard bounces (`list_id` 0: every list).
pub(super) mod suppression {
    use sea_orm::entity::prelude::*;

    use crate::stored_enums::SuppressionReason;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "suppressions")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub list_id: crate::domain::ListId,
        pub email: String,
        /// `user_unsubscribe` or `bounce`.
        pub reason: SuppressionReason,
        /// Where it came from, e.g. the export line's time.
        pub source: String,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `unsubscribe-export` lines already seen (rule 6).
pub(super) mod unsub_line {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "unsub_lines")]
    pub(crate) struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub list_id: crate::domain::ListId,
        pub email: String,
        pub time: String,
        pub seen_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Per-list bookkeeping.
pub(super) mod list_state {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "list_state")]
    pub(crate) struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub list_id: crate::domain::ListId,
        /// When the list was first read whole (rule 5).
        pub initial_read_at: Option<i64>,
        /// When its `unsubscribe-export` was last read (rule 6).
        pub export_read_at: Option<i64>,
        /// The newest export-line time pruned: lines up to it count as
        /// seen although their rows are gone.
        pub lines_seen_through: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// One run of a job.
pub(super) mod run {
    use sea_orm::entity::prelude::*;

    use crate::stored_enums::{Job, RunStatus};

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "runs")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub job: Job,
        pub started_at: i64,
        pub finished_at: Option<i64>,
        /// `running`, `succeeded`, `failed` or `refused`.
        pub status: RunStatus,
        pub dry_run: bool,
        /// The run's counts as a JSON object.
        pub counts: String,
        pub error: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The write-back ledger: one ContactHistory record per key, written once
/// over the daemon's life.
pub(super) mod ledger {
    use sea_orm::entity::prelude::*;

    use crate::stored_enums::{LedgerStatus, RecordKind};

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "writeback_ledger")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        /// `open`, `click`, `bounce` or `unsubscribe`.
        pub kind: RecordKind,
        /// `campaign:ID` (open, click, bounce) or `list:ID` (unsubscribe).
        pub scope: crate::domain::RecordScope,
        pub link_man_id: crate::domain::LinkManId,
        pub customer_id: crate::domain::CustomerId,
        pub email: String,
        pub title: String,
        pub content: String,
        /// `pending` or `done`.
        pub status: LedgerStatus,
        /// A call may have reached the CRM without its answer arriving:
        /// sending again may write the record twice.
        pub uncertain: bool,
        pub attempts: i32,
        pub last_error: Option<String>,
        pub created_at: i64,
        pub updated_at: i64,
        /// Runs in which the CRM refused it (a run counts once).
        pub failed_runs: i32,
        pub last_failed_run: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// EDM operations refused with an error code once isolated from their
/// batch: the poison-record memory.
pub(super) mod refusal {
    use sea_orm::entity::prelude::*;

    use crate::stored_enums::OpKind;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "refusals")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub kind: OpKind,
        pub list_id: crate::domain::ListId,
        pub email: String,
        /// What was sent (the `ml_addr` line; empty for an unsubscribe):
        /// a parked operation is sent again when this changes.
        pub content: String,
        pub code: String,
        pub message: String,
        /// Runs that refused it (a run counts once).
        pub failed_runs: i32,
        pub last_run_id: crate::domain::RunId,
        pub parked: bool,
        pub created_at: i64,
        pub updated_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The lease: one row (`id` 1) whose `epoch` each new lock holder
/// increments — the fencing token of the instance lock.
pub(super) mod lease {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "lease")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i64,
        pub epoch: i64,
        /// The holder's `daemon.instance_id` (or `HOST-PID`).
        pub holder: String,
        pub host: String,
        pub pid: i64,
        pub acquired_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `--once` requests to the active daemon (`run_requests`).
pub(super) mod run_request {
    use sea_orm::entity::prelude::*;

    use crate::stored_enums::{Job, RequestState};

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "run_requests")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        /// `None`: both jobs, contacts first.
        pub job: Option<Job>,
        pub full: bool,
        pub force: bool,
        pub retry_parked: bool,
        pub state: RequestState,
        pub requested_by: String,
        pub requested_at: i64,
        pub claimed_by: Option<String>,
        pub claimed_at: Option<i64>,
        pub finished_at: Option<i64>,
        pub succeeded: Option<bool>,
        /// What `--once` prints, as it would have printed it.
        pub output: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Findings already logged once (`log_notes`).
pub(super) mod log_note {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "log_notes")]
    pub(crate) struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub digest: String,
        pub noted_at: i64,
        /// `invalid` or `shared` (empty on rows older than migration 10).
        pub kind: Option<String>,
        /// The address as the CRM gave it (trimmed).
        pub address: Option<String>,
        pub link_man_id: Option<i64>,
        pub customer_id: Option<i64>,
        pub list_id: Option<i64>,
        /// Why invalid, or which link-men share it.
        pub detail: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The consent trail: one row per change of an address's state in a list,
/// never updated in place.
pub(super) mod audit_entry {
    use sea_orm::entity::prelude::*;

    use crate::stored_enums::{AuditEvent, AuditSource};

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_trail")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub at: i64,
        /// `None`: every list.
        pub list_id: Option<crate::domain::ListId>,
        pub email: String,
        pub event: AuditEvent,
        pub reason: Option<String>,
        pub detail: Option<String>,
        pub link_man_id: Option<crate::domain::LinkManId>,
        pub customer_id: Option<crate::domain::CustomerId>,
        pub source: AuditSource,
        pub run_id: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The reseller top-ups asked for this tenant (`reseller_top_ups`).
pub(super) mod top_up {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "reseller_top_ups")]
    pub(crate) struct Model {
        #[sea_orm(primary_key)]
        pub(crate) id: i64,
        /// `YYYY-MM-DD` in `edm.timezone`.
        pub(crate) day: String,
        pub(crate) at: i64,
        pub(crate) count: i64,
        /// `asked` (recorded, the call not yet answered), `added`,
        /// `understock`, `failed`.
        pub(crate) outcome: String,
        pub(crate) detail: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
