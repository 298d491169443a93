//! What the state database knows about one address (`explain`): its
//! member rows, suppressions, operations, refusals and contact-history
//! records. Each query is an indexed lookup by address (or by link-man
//! over the members), so a question costs the same after years of runs.

use crate::domain::RunId;
use anyhow::Context;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use serde::Serialize;

use super::entities::{audit_entry, ledger, member, operation, refusal, suppression};
use super::members::vars_from_json;
use super::*;
use crate::domain::{CustomerId, LinkManId, Origin};
use crate::stored_enums::{LedgerStatus, RecordKind, SuppressionReason};

/// A member row: the state database's view of one (list, address).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberFact {
    pub list_id: ListId,
    pub email: String,
    pub origin: Origin,
    /// Whether EDM holds it, as far as the daemon knows.
    pub present: bool,
    pub link_man_id: Option<LinkManId>,
    pub customer_id: Option<CustomerId>,
    pub edm_id: Option<crate::domain::AddressId>,
    pub fullname: String,
    pub vars: Vec<String>,
    /// When the row last changed (ms since the epoch).
    pub since_ms: i64,
}

/// A suppression: no operation of any kind for (list, address).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SuppressionFact {
    /// The list; `None` for a hard bounce, which holds in every list (its
    /// row's list 0 never shows as a list).
    pub list_id: Option<ListId>,
    pub email: String,
    pub reason: SuppressionReason,
    pub source: String,
    pub since_ms: i64,
    /// Learnt while the state database was behind EDM: perhaps the
    /// daemon's own unsubscribe, perhaps the recipient's.
    pub unsubscribed_while_behind: bool,
}

/// An EDM operation on the address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OperationFact {
    pub id: i64,
    pub run_id: RunId,
    pub kind: OpKind,
    pub list_id: ListId,
    pub email: String,
    pub status: OpStatus,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// A refusal of the address by EDM (parked after `edm.max_attempts` runs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefusalFact {
    pub kind: OpKind,
    pub list_id: ListId,
    pub email: String,
    pub code: String,
    pub message: String,
    pub failed_runs: i32,
    pub parked: bool,
    pub last_run_id: RunId,
    pub updated_ms: i64,
}

/// A contact-history record written (or to be written) for the address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordFact {
    pub kind: RecordKind,
    pub scope: crate::domain::RecordScope,
    pub link_man_id: LinkManId,
    pub customer_id: CustomerId,
    pub email: String,
    pub title: String,
    pub status: LedgerStatus,
    pub uncertain: bool,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub failed_runs: i32,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// Everything recorded about some addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AddressFacts {
    pub members: Vec<MemberFact>,
    pub suppressions: Vec<SuppressionFact>,
    /// Newest first, at most the limit asked for per address.
    pub operations: Vec<OperationFact>,
    pub refusals: Vec<RefusalFact>,
    pub records: Vec<RecordFact>,
}

impl Store {
    /// The addresses of the members a link-man owns or last owned.
    pub async fn emails_of_linkman(&self, id: LinkManId) -> anyhow::Result<Vec<String>> {
        let mut emails: Vec<String> = member::Entity::find()
            .select_only()
            .column(member::Column::Email)
            .filter(member::Column::LinkManId.eq(id))
            .into_tuple()
            .all(&self.db)
            .await
            .context("cannot read the members of a link-man")?;
        emails.sort();
        emails.dedup();
        Ok(emails)
    }

    /// The recorded addresses a masked address from a log line
    /// (`l***@example.com`, `x*** (no @)`) may stand for — members,
    /// suppressions, refused or parked operations, and the findings logged
    /// once (invalid emails, shared addresses) — those whose masked form is
    /// the same.
    pub async fn emails_matching_mask(&self, masked: &str) -> anyhow::Result<Vec<String>> {
        let masked = masked.trim().to_ascii_lowercase();
        let first = masked.split("***").next().unwrap_or_default().to_string();
        // Invalid addresses are recorded only with their findings; the
        // `x*** (no @)` form is only theirs.
        let mut emails = self.finding_addresses_matching(&masked).await?;
        let Some((_, domain)) = masked.rsplit_once('@') else {
            emails.sort();
            emails.dedup();
            return Ok(emails);
        };
        let suffix = format!("@{domain}");
        let (prefix, suffix) = (first.as_str(), suffix.as_str());
        let members: Vec<String> = member::Entity::find()
            .select_only()
            .column(member::Column::Email)
            .filter(member::Column::Email.starts_with(prefix))
            .filter(member::Column::Email.ends_with(suffix))
            .into_tuple()
            .all(&self.db)
            .await
            .context("cannot read the members of a domain")?;
        let suppressed: Vec<String> = suppression::Entity::find()
            .select_only()
            .column(suppression::Column::Email)
            .filter(suppression::Column::Email.starts_with(prefix))
            .filter(suppression::Column::Email.ends_with(suffix))
            .into_tuple()
            .all(&self.db)
            .await
            .context("cannot read the suppressions of a domain")?;
        // An address EDM refused (or parked) may never have become a member.
        let refused: Vec<String> = refusal::Entity::find()
            .select_only()
            .column(refusal::Column::Email)
            .filter(refusal::Column::Email.starts_with(prefix))
            .filter(refusal::Column::Email.ends_with(suffix))
            .into_tuple()
            .all(&self.db)
            .await
            .context("cannot read the refusals of a domain")?;
        // A pending add (`status` lists it masked) is not a member yet.
        let operated: Vec<String> = operation::Entity::find()
            .select_only()
            .column(operation::Column::Email)
            .filter(operation::Column::Email.starts_with(prefix))
            .filter(operation::Column::Email.ends_with(suffix))
            .distinct()
            .into_tuple()
            .all(&self.db)
            .await
            .context("cannot read the operations of a domain")?;
        // An address whose rows are gone may still have its trail.
        let trailed: Vec<String> = audit_entry::Entity::find()
            .select_only()
            .column(audit_entry::Column::Email)
            .filter(audit_entry::Column::Email.starts_with(prefix))
            .filter(audit_entry::Column::Email.ends_with(suffix))
            .distinct()
            .into_tuple()
            .all(&self.db)
            .await
            .context("cannot read the consent trail of a domain")?;
        emails.extend(
            members
                .into_iter()
                .chain(suppressed)
                .chain(refused)
                .chain(operated)
                .chain(trailed),
        );
        emails.retain(|e| crate::domain::mask_address(e).to_ascii_lowercase() == masked);
        emails.sort();
        emails.dedup();
        Ok(emails)
    }

    /// What the state database records about `email` (normalised), with
    /// at most `max_operations` operations, newest first.
    pub async fn facts_of(&self, email: &str, max_operations: u64) -> anyhow::Result<AddressFacts> {
        let members = member::Entity::find()
            .filter(member::Column::Email.eq(email))
            .order_by_asc(member::Column::ListId)
            .all(&self.db)
            .await
            .context("cannot read the members of an address")?;
        let suppressions = suppression::Entity::find()
            .filter(suppression::Column::Email.eq(email))
            .order_by_asc(suppression::Column::ListId)
            .all(&self.db)
            .await
            .context("cannot read the suppressions of an address")?;
        let operations = operation::Entity::find()
            .filter(operation::Column::Email.eq(email))
            .order_by_desc(operation::Column::Id)
            .limit(max_operations)
            .all(&self.db)
            .await
            .context("cannot read the operations of an address")?;
        let refusals = refusal::Entity::find()
            .filter(refusal::Column::Email.eq(email))
            .order_by_asc(refusal::Column::ListId)
            .all(&self.db)
            .await
            .context("cannot read the refusals of an address")?;
        let records = ledger::Entity::find()
            .filter(ledger::Column::Email.eq(email))
            .order_by_asc(ledger::Column::Id)
            .all(&self.db)
            .await
            .context("cannot read the contact-history records of an address")?;
        Ok(AddressFacts {
            members: members.into_iter().map(MemberFact::from).collect(),
            suppressions: suppressions
                .into_iter()
                .map(SuppressionFact::from)
                .collect(),
            operations: operations.into_iter().map(OperationFact::from).collect(),
            refusals: refusals.into_iter().map(RefusalFact::from).collect(),
            records: records.into_iter().map(RecordFact::from).collect(),
        })
    }
}

impl From<member::Model> for MemberFact {
    fn from(m: member::Model) -> MemberFact {
        MemberFact {
            list_id: m.list_id,
            email: m.email,
            origin: m.origin,
            present: m.present,
            link_man_id: m.link_man_id,
            customer_id: m.customer_id,
            edm_id: m.edm_id,
            fullname: m.fullname,
            vars: vars_from_json(&m.vars).to_vec(),
            since_ms: m.updated_at,
        }
    }
}

impl From<suppression::Model> for SuppressionFact {
    fn from(s: suppression::Model) -> SuppressionFact {
        SuppressionFact {
            list_id: (s.list_id != super::ALL_LISTS).then_some(s.list_id),
            email: s.email,
            reason: s.reason,
            unsubscribed_while_behind: SuppressionSource::parse(&s.source).while_behind(),
            source: s.source,
            since_ms: s.created_at,
        }
    }
}

impl From<operation::Model> for OperationFact {
    fn from(o: operation::Model) -> OperationFact {
        OperationFact {
            id: o.id,
            run_id: o.run_id,
            kind: o.kind,
            list_id: o.list_id,
            email: o.email,
            status: o.status,
            attempts: o.attempts,
            last_error: o.last_error,
            created_ms: o.created_at,
            updated_ms: o.updated_at,
        }
    }
}

impl From<refusal::Model> for RefusalFact {
    fn from(r: refusal::Model) -> RefusalFact {
        RefusalFact {
            kind: r.kind,
            list_id: r.list_id,
            email: r.email,
            code: r.code,
            message: r.message,
            failed_runs: r.failed_runs,
            parked: r.parked,
            last_run_id: r.last_run_id,
            updated_ms: r.updated_at,
        }
    }
}

impl From<ledger::Model> for RecordFact {
    fn from(r: ledger::Model) -> RecordFact {
        RecordFact {
            kind: r.kind,
            scope: r.scope,
            link_man_id: r.link_man_id,
            customer_id: r.customer_id,
            email: r.email,
            title: r.title,
            status: r.status,
            uncertain: r.uncertain,
            attempts: r.attempts,
            last_error: r.last_error,
            failed_runs: r.failed_runs,
            created_ms: r.created_at,
            updated_ms: r.updated_at,
        }
    }
}
