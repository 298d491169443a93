//! Every state the daemon stores or dispatches on, as an enum: operation
//! kinds and statuses, write-back ledger statuses and record kinds,
//! suppression reasons and sources, run statuses and jobs. It stands on
//! layer 1 and uses only the ids (layer 0).
//!
//! Stored with sea-orm active enums under the very strings the columns
//! already hold (no data migration); matched exhaustively everywhere, so a
//! new state is a compile error wherever it must be handled.

use std::fmt;

use sea_orm::entity::prelude::*;

use crate::ids::CampaignId;

/// Writes each enum's `as_str` for `Display`.
macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}

/// An EDM write the daemon records before sending.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    EnumIter,
    DeriveActiveEnum,
    serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum OpKind {
    /// `ml-addr-add`.
    #[sea_orm(string_value = "add")]
    Add,
    /// `ml-addr-edit`.
    #[sea_orm(string_value = "edit")]
    Edit,
    /// `ml-unsub`.
    #[sea_orm(string_value = "unsub")]
    Unsub,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Add => "add",
            OpKind::Edit => "edit",
            OpKind::Unsub => "unsub",
        }
    }
}

/// Where a recorded operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum OpStatus {
    /// Recorded; not confirmed by EDM yet.
    #[sea_orm(string_value = "pending")]
    Pending,
    /// EDM confirmed it (or the list showed it took effect).
    #[sea_orm(string_value = "done")]
    Done,
    /// Did not take effect; the next plan decides again.
    #[sea_orm(string_value = "superseded")]
    Superseded,
}

impl OpStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OpStatus::Pending => "pending",
            OpStatus::Done => "done",
            OpStatus::Superseded => "superseded",
        }
    }
}

/// Where a write-back ledger row stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum LedgerStatus {
    /// Recorded; the CRM has not answered `{"value": true}` yet.
    #[sea_orm(string_value = "pending")]
    Pending,
    /// Written.
    #[sea_orm(string_value = "done")]
    Done,
    /// Refused by the CRM in `crm.max_attempts` runs: no longer sent,
    /// until `--retry-parked`.
    #[sea_orm(string_value = "parked")]
    Parked,
}

impl LedgerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerStatus::Pending => "pending",
            LedgerStatus::Done => "done",
            LedgerStatus::Parked => "parked",
        }
    }
}

/// What a ContactHistory record reports.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    EnumIter,
    DeriveActiveEnum,
    serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum RecordKind {
    #[sea_orm(string_value = "open")]
    Open,
    #[sea_orm(string_value = "click")]
    Click,
    #[sea_orm(string_value = "bounce")]
    Bounce,
    #[sea_orm(string_value = "unsubscribe")]
    Unsubscribe,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Open => "open",
            RecordKind::Click => "click",
            RecordKind::Bounce => "bounce",
            RecordKind::Unsubscribe => "unsubscribe",
        }
    }
}

/// Why an address gets no operation.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    EnumIter,
    DeriveActiveEnum,
    serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum SuppressionReason {
    /// A user unsubscribe seen in `unsubscribe-export` (rule 6).
    #[sea_orm(string_value = "user_unsubscribe")]
    UserUnsubscribe,
    /// A hard bounce: suppressed in every list.
    #[sea_orm(string_value = "bounce")]
    Bounce,
    /// `forget`: the address, kept as its keyed hash, is never added again.
    #[sea_orm(string_value = "forgotten")]
    Forgotten,
}

impl SuppressionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SuppressionReason::UserUnsubscribe => "user_unsubscribe",
            SuppressionReason::Bounce => "bounce",
            SuppressionReason::Forgotten => "forgotten",
        }
    }
}

/// Where a suppression was learnt, with its facts as data. Stored as the
/// text the column has always held (`unsubscribe-export TIME`, `campaign
/// ID TYPE`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SuppressionSource {
    /// An `unsubscribe-export` line and its time, as EDM wrote it.
    Export { time: String },
    /// An `unsubscribe-export` line first read while the state database
    /// was behind EDM (restored from a backup): it may be the daemon's own
    /// `ml-unsub` that the restored database forgot, or the recipient's.
    /// Kept suppressed, and named so.
    ExportWhileBehind { time: String },
    /// A `failexport` line of a campaign.
    Bounce {
        campaign_id: CampaignId,
        bounce_type: HardBounce,
    },
    /// Text this version does not recognise (kept as it is).
    Other(String),
}

impl SuppressionSource {
    const EXPORT: &'static str = "unsubscribe-export ";
    const BEHIND: &'static str = " (state database behind)";
    const CAMPAIGN: &'static str = "campaign ";

    /// Whether it was read while the state database was behind EDM.
    pub fn while_behind(&self) -> bool {
        matches!(self, SuppressionSource::ExportWhileBehind { .. })
    }

    /// What an operator reads for a suppression learnt while the state
    /// database was behind.
    pub const BEHIND_NOTE: &'static str = "unsubscribed while the state database was behind: the restored database cannot tell whether this was the daemon's own unsubscribe or the recipient's, so it stays suppressed; lift it only after checking (README, \"Restore a backup\")";

    /// The stored text that marks one read while behind (for queries).
    pub fn behind_suffix() -> &'static str {
        Self::BEHIND
    }

    /// The stored text.
    pub fn to_text(&self) -> String {
        match self {
            SuppressionSource::Export { time } => format!("{}{time}", Self::EXPORT),
            SuppressionSource::ExportWhileBehind { time } => {
                format!("{}{time}{}", Self::EXPORT, Self::BEHIND)
            }
            SuppressionSource::Bounce {
                campaign_id,
                bounce_type,
            } => format!("{}{campaign_id} {}", Self::CAMPAIGN, bounce_type.as_str()),
            SuppressionSource::Other(text) => text.clone(),
        }
    }

    /// Reads the stored text back.
    pub fn parse(text: &str) -> SuppressionSource {
        if let Some(time) = text.strip_prefix(Self::EXPORT) {
            if let Some(time) = time.strip_suffix(Self::BEHIND) {
                return SuppressionSource::ExportWhileBehind {
                    time: time.to_string(),
                };
            }
            return SuppressionSource::Export {
                time: time.to_string(),
            };
        }
        if let Some(rest) = text.strip_prefix(Self::CAMPAIGN)
            && let Some((id, bounce_type)) = rest.split_once(' ')
            && let Ok(campaign_id) = id.parse().map(CampaignId)
            && let Some(bounce_type) = HardBounce::parse(bounce_type)
        {
            return SuppressionSource::Bounce {
                campaign_id,
                bounce_type,
            };
        }
        SuppressionSource::Other(text.to_string())
    }
}

impl fmt::Display for SuppressionSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

/// The hard-bounce types of `failexport.php` the daemon reads: an address
/// that bounced so is suppressed in every list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HardBounce {
    /// `not_exist` (type 1): the mailbox does not exist.
    NotExist,
    /// `user_reject` (type 3): the recipient's server refused it.
    UserReject,
}

impl HardBounce {
    /// Every type, in the order they are read.
    pub const ALL: [HardBounce; 2] = [HardBounce::NotExist, HardBounce::UserReject];

    /// The `type` parameter of `failexport.php`.
    pub fn as_str(self) -> &'static str {
        match self {
            HardBounce::NotExist => "not_exist",
            HardBounce::UserReject => "user_reject",
        }
    }

    /// A stored or sent type name back; `None` for one this version does
    /// not know.
    pub fn parse(text: &str) -> Option<HardBounce> {
        HardBounce::ALL.into_iter().find(|b| b.as_str() == text)
    }

    /// Why the mail came back, in the contact-history record's words.
    pub fn reason(self) -> &'static str {
        match self {
            HardBounce::NotExist => "邮箱不存在",
            HardBounce::UserReject => "用户拒收",
        }
    }
}

/// One of the two jobs.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    EnumIter,
    DeriveActiveEnum,
    serde::Serialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum Job {
    /// CRM link-men → EDM lists.
    #[sea_orm(string_value = "contacts")]
    Contacts,
    /// Campaign activity → CRM contact history.
    #[sea_orm(string_value = "writeback")]
    Writeback,
    /// The drift report: every synced list compared with the state DB;
    /// writes nothing to EDM. Its own command (`reconcile`), not a
    /// `--job`.
    #[sea_orm(string_value = "reconcile")]
    #[value(skip)]
    Reconcile,
}

impl Job {
    /// The jobs `--once` runs without `--job`, in order.
    pub const ALL: [Job; 2] = [Job::Contacts, Job::Writeback];
    /// The jobs the daemon schedules.
    pub const SCHEDULED: [Job; 3] = [Job::Contacts, Job::Writeback, Job::Reconcile];

    pub fn as_str(self) -> &'static str {
        match self {
            Job::Contacts => "contacts",
            Job::Writeback => "writeback",
            Job::Reconcile => "reconcile",
        }
    }
}

/// Where a `--once` request to the active daemon stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum RequestState {
    /// Written by `--once`; no daemon has taken it yet.
    #[sea_orm(string_value = "queued")]
    Queued,
    /// An active daemon took it and runs it.
    #[sea_orm(string_value = "running")]
    Running,
    /// Run; the outcome and the output are in the row.
    #[sea_orm(string_value = "done")]
    Done,
    /// The requester gave up before a daemon took it.
    #[sea_orm(string_value = "cancelled")]
    Cancelled,
}

impl RequestState {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Queued => "queued",
            RequestState::Running => "running",
            RequestState::Done => "done",
            RequestState::Cancelled => "cancelled",
        }
    }
}

/// What a consent-trail entry records about an address in a list.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    EnumIter,
    DeriveActiveEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum AuditEvent {
    /// Known when the trail began (the migration that created it).
    #[sea_orm(string_value = "imported")]
    Imported,
    /// The daemon added it (from a link-man).
    #[sea_orm(string_value = "added")]
    Added,
    /// It was in the list and a link-man wants it: kept in step from now.
    #[sea_orm(string_value = "adopted")]
    Adopted,
    /// The daemon changed its fullname or vars (`detail`: which).
    #[sea_orm(string_value = "edited")]
    Edited,
    /// The daemon unsubscribed it (`reason`: why).
    #[sea_orm(string_value = "unsubscribed")]
    Unsubscribed,
    /// Its recipient unsubscribed (the list's `unsubscribe-export`).
    #[sea_orm(string_value = "recipient_unsubscribed")]
    RecipientUnsubscribed,
    /// A campaign to it bounced hard (`reason`: the failexport type).
    #[sea_orm(string_value = "bounced")]
    Bounced,
    /// EDM refused an operation on it in `edm.max_attempts` runs.
    #[sea_orm(string_value = "parked")]
    Parked,
    /// A parked operation on it was sent again (`--retry-parked`).
    #[sea_orm(string_value = "retried")]
    Retried,
    /// It was unsubscribed in a run forced past a safety limit.
    #[sea_orm(string_value = "forced")]
    Forced,
    /// `forget`: the address is kept only as a keyed hash.
    #[sea_orm(string_value = "forgotten")]
    Forgotten,
}

impl AuditEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditEvent::Imported => "imported",
            AuditEvent::Added => "added",
            AuditEvent::Adopted => "adopted",
            AuditEvent::Edited => "edited",
            AuditEvent::Unsubscribed => "unsubscribed",
            AuditEvent::RecipientUnsubscribed => "recipient_unsubscribed",
            AuditEvent::Bounced => "bounced",
            AuditEvent::Parked => "parked",
            AuditEvent::Retried => "retried",
            AuditEvent::Forced => "forced",
            AuditEvent::Forgotten => "forgotten",
        }
    }
}

/// Who decided what a consent-trail entry records.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    EnumIter,
    DeriveActiveEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum AuditSource {
    /// The CRM's data (a link-man added, changed or deleted).
    #[sea_orm(string_value = "crm")]
    Crm,
    /// EDM (a recipient's unsubscribe, a bounce, a refusal).
    #[sea_orm(string_value = "edm")]
    Edm,
    /// An operator's command (`--force`, `--retry-parked`, `forget`).
    #[sea_orm(string_value = "operator")]
    Operator,
}

impl AuditSource {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditSource::Crm => "crm",
            AuditSource::Edm => "edm",
            AuditSource::Operator => "operator",
        }
    }
}

/// Why the daemon unsubscribed an address it had added.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    EnumIter,
    DeriveActiveEnum,
    serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum UnsubReason {
    /// Its link-man is no longer in the CRM.
    #[sea_orm(string_value = "linkman_deleted")]
    LinkmanDeleted,
    /// Its link-man has another email now.
    #[sea_orm(string_value = "email_changed")]
    EmailChanged,
    /// Its link-man has no email now, or one that is not valid.
    #[sea_orm(string_value = "email_lost")]
    EmailLost,
    /// Its link-man's address belongs to another list now (a route).
    #[sea_orm(string_value = "rerouted")]
    Rerouted,
    /// It bounced hard.
    #[sea_orm(string_value = "bounce")]
    Bounce,
    /// `forget`.
    #[sea_orm(string_value = "forget")]
    Forget,
}

impl UnsubReason {
    pub fn as_str(self) -> &'static str {
        match self {
            UnsubReason::LinkmanDeleted => "linkman_deleted",
            UnsubReason::EmailChanged => "email_changed",
            UnsubReason::EmailLost => "email_lost",
            UnsubReason::Rerouted => "rerouted",
            UnsubReason::Bounce => "bounce",
            UnsubReason::Forget => "forget",
        }
    }
}

display_as_str!(AuditEvent, AuditSource, UnsubReason);

/// How a run ended (or that it has not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum RunStatus {
    #[sea_orm(string_value = "running")]
    Running,
    #[sea_orm(string_value = "succeeded")]
    Succeeded,
    /// Some operations or records failed and stay pending, or the run
    /// stopped on an error.
    #[sea_orm(string_value = "failed")]
    Failed,
    /// The plan broke a safety limit and was not applied.
    #[sea_orm(string_value = "refused")]
    Refused,
    /// Stopped by a shutdown; the rest is planned again next run.
    #[sea_orm(string_value = "interrupted")]
    Interrupted,
    /// Its process ended without finishing it (killed, crashed).
    #[sea_orm(string_value = "abandoned")]
    Abandoned,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Refused => "refused",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Abandoned => "abandoned",
        }
    }

    /// Whether `/healthz` may call the job healthy after a run that ended
    /// so.
    pub fn is_healthy(self) -> bool {
        match self {
            RunStatus::Succeeded | RunStatus::Interrupted | RunStatus::Running => true,
            RunStatus::Failed | RunStatus::Refused | RunStatus::Abandoned => false,
        }
    }
}

display_as_str!(
    OpKind,
    OpStatus,
    LedgerStatus,
    RecordKind,
    SuppressionReason,
    Job,
    RunStatus,
    RequestState
);

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::{ActiveEnum, Iterable};

    #[test]
    fn every_state_is_stored_under_the_string_it_displays() {
        // `as_str` is written out by hand for a `&'static str`; it must
        // match what the database and JSON hold.
        macro_rules! same_strings {
            ($($t:ty),*) => {$(
                for s in <$t>::iter() {
                    assert_eq!(s.to_value(), s.as_str());
                    assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
                }
            )*};
        }
        same_strings!(
            OpKind,
            OpStatus,
            LedgerStatus,
            RecordKind,
            SuppressionReason,
            Job,
            RunStatus,
            crate::domain::Origin
        );
    }

    #[test]
    fn suppression_sources_read_back_as_the_data_they_were_written_from() {
        let cases = [
            SuppressionSource::Export {
                time: "2026-11-30 10:00:00".into(),
            },
            SuppressionSource::Bounce {
                campaign_id: CampaignId(42),
                bounce_type: HardBounce::NotExist,
            },
            SuppressionSource::ExportWhileBehind {
                time: "2026-11-30 10:00:00".into(),
            },
            SuppressionSource::Other("hand-made".into()),
        ];
        for source in cases {
            assert_eq!(SuppressionSource::parse(&source.to_text()), source);
        }
        assert_eq!(
            SuppressionSource::parse("unsubscribe-export 2026-11-30 10:00:00").to_text(),
            "unsubscribe-export 2026-11-30 10:00:00"
        );
        assert_eq!(
            SuppressionSource::parse("campaign 42 user_reject"),
            SuppressionSource::Bounce {
                campaign_id: CampaignId(42),
                bounce_type: HardBounce::UserReject,
            }
        );
        // A bounce type this version does not know is kept as it is.
        assert_eq!(
            SuppressionSource::parse("campaign 42 soft_bounce"),
            SuppressionSource::Other("campaign 42 soft_bounce".into())
        );
    }
}
