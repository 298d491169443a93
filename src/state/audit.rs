//! The consent trail (`audit_trail`): appended to in the same transaction
//! as the state change it records, read by `audit` and `explain`, pruned
//! after `database.audit_retention_days`.

use anyhow::Context;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use serde::Serialize;

use super::entities::audit_entry;
use super::*;
use crate::domain::{CustomerId, LinkManId, ListId, RunId};
use crate::stored_enums::{AuditEvent, AuditSource, UnsubReason};

/// One entry to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// Milliseconds since the epoch, UTC.
    pub at: i64,
    /// `None`: every list.
    pub list_id: Option<ListId>,
    pub email: String,
    pub event: AuditEvent,
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub link_man_id: Option<LinkManId>,
    pub customer_id: Option<CustomerId>,
    pub source: AuditSource,
    pub run_id: Option<RunId>,
}

impl AuditEntry {
    /// An entry about `email` now, with nothing else known yet.
    pub fn now(event: AuditEvent, source: AuditSource, email: &str) -> AuditEntry {
        AuditEntry {
            at: now_ms(),
            list_id: None,
            email: email.to_string(),
            event,
            reason: None,
            detail: None,
            link_man_id: None,
            customer_id: None,
            source,
            run_id: None,
        }
    }

    /// The daemon's unsubscribe of `email` took effect, for `reason`: a
    /// bounce is EDM's doing, `forget` the operator's, the rest the CRM's.
    pub fn unsubscribed(email: &str, reason: UnsubReason) -> AuditEntry {
        let source = match reason {
            UnsubReason::Bounce => AuditSource::Edm,
            UnsubReason::Forget => AuditSource::Operator,
            UnsubReason::LinkmanDeleted
            | UnsubReason::EmailChanged
            | UnsubReason::EmailLost
            | UnsubReason::Rerouted => AuditSource::Crm,
        };
        AuditEntry::now(AuditEvent::Unsubscribed, source, email).because(reason.as_str())
    }

    pub fn in_list(mut self, list_id: ListId) -> Self {
        self.list_id = Some(list_id);
        self
    }

    pub fn by(mut self, link_man_id: Option<LinkManId>, customer_id: Option<CustomerId>) -> Self {
        self.link_man_id = link_man_id;
        self.customer_id = customer_id;
        self
    }

    pub fn because(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn in_run(mut self, run_id: Option<&RunId>) -> Self {
        self.run_id = run_id.cloned();
        self
    }
}

/// One entry as `audit` prints it (the contract's field names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AuditRecord {
    /// RFC 3339, UTC.
    pub at: String,
    pub email: String,
    pub list_id: Option<i64>,
    pub event: AuditEvent,
    pub reason: Option<String>,
    pub link_man_id: Option<i64>,
    pub customer_id: Option<i64>,
    pub source: AuditSource,
    pub run_id: Option<String>,
    /// What else is known (the fields an edit changed, a campaign, EDM's
    /// time of an unsubscribe, the ratio a forced run passed).
    pub detail: Option<String>,
}

impl From<audit_entry::Model> for AuditRecord {
    fn from(m: audit_entry::Model) -> Self {
        AuditRecord {
            at: chrono::DateTime::from_timestamp_millis(m.at)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            email: m.email,
            list_id: m.list_id.map(|l| l.0),
            event: m.event,
            reason: m.reason,
            link_man_id: m.link_man_id.map(|l| l.0),
            customer_id: m.customer_id.map(|c| c.0),
            source: m.source,
            run_id: m.run_id,
            detail: m.detail,
        }
    }
}

/// Appends `entries` with `db` (a transaction of the change they record).
pub(super) async fn insert_audit<C: ConnectionTrait>(
    db: &C,
    entries: &[AuditEntry],
) -> anyhow::Result<()> {
    for chunk in entries.chunks(CHUNK) {
        audit_entry::Entity::insert_many(chunk.iter().map(|e| audit_entry::ActiveModel {
            at: Set(e.at),
            list_id: Set(e.list_id),
            email: Set(e.email.clone()),
            event: Set(e.event),
            reason: Set(e.reason.clone()),
            detail: Set(e.detail.clone()),
            link_man_id: Set(e.link_man_id),
            customer_id: Set(e.customer_id),
            source: Set(e.source),
            run_id: Set(e.run_id.as_ref().map(|r| r.as_str().to_string())),
            ..Default::default()
        }))
        .exec_without_returning(db)
        .await
        .context("cannot append to the consent trail")?;
    }
    Ok(())
}

/// Rows read a page at a time by the range export.
const PAGE: u64 = 2000;

impl Store {
    /// Appends entries on their own (a change recorded elsewhere first).
    pub async fn append_audit(&self, entries: &[AuditEntry]) -> anyhow::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        insert_audit(&self.db, entries).await
    }

    /// The trail of these addresses, oldest first.
    pub async fn audit_of(&self, emails: &[String]) -> anyhow::Result<Vec<AuditRecord>> {
        let rows = audit_entry::Entity::find()
            .filter(audit_entry::Column::Email.is_in(emails.iter().cloned()))
            .order_by_asc(audit_entry::Column::At)
            .order_by_asc(audit_entry::Column::Id)
            .all(&self.db)
            .await
            .context("cannot read the consent trail")?;
        Ok(rows.into_iter().map(AuditRecord::from).collect())
    }

    /// Every entry from `since_ms` (inclusive) to `until_ms` (exclusive),
    /// oldest first, handed to `visit` a page at a time, so a range of
    /// years is never held whole.
    pub async fn audit_between(
        &self,
        since_ms: i64,
        until_ms: i64,
        mut visit: impl FnMut(AuditRecord) -> anyhow::Result<()>,
    ) -> anyhow::Result<u64> {
        let mut after: Option<(i64, i64)> = None;
        let mut seen = 0;
        loop {
            let mut query = audit_entry::Entity::find()
                .filter(audit_entry::Column::At.gte(since_ms))
                .filter(audit_entry::Column::At.lt(until_ms));
            if let Some((at, id)) = after {
                query = query.filter(
                    sea_orm::Condition::any()
                        .add(audit_entry::Column::At.gt(at))
                        .add(
                            sea_orm::Condition::all()
                                .add(audit_entry::Column::At.eq(at))
                                .add(audit_entry::Column::Id.gt(id)),
                        ),
                );
            }
            let rows = query
                .order_by_asc(audit_entry::Column::At)
                .order_by_asc(audit_entry::Column::Id)
                .limit(PAGE)
                .all(&self.db)
                .await
                .context("cannot read the consent trail")?;
            let Some(last) = rows.last() else {
                return Ok(seen);
            };
            after = Some((last.at, last.id));
            let full = rows.len() as u64 == PAGE;
            for row in rows {
                seen += 1;
                visit(AuditRecord::from(row))?;
            }
            if !full {
                return Ok(seen);
            }
        }
    }

    /// Deletes entries older than `cutoff_ms`; how many.
    pub async fn prune_audit(&self, cutoff_ms: i64) -> anyhow::Result<u64> {
        let done = audit_entry::Entity::delete_many()
            .filter(audit_entry::Column::At.lt(cutoff_ms))
            .exec(&self.db)
            .await
            .context("cannot prune the consent trail")?;
        Ok(done.rows_affected)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::super::tests::{both_urls, upgraded_from_before};
    use super::*;
    use secrecy::SecretString;

    const OLD_ROWS: &str = "
        INSERT INTO members (list_id, email, origin, present, unsubscribed, link_man_id, customer_id, edm_id, fullname, vars, updated_at) VALUES
          (1, 'kept@x.cn', 'owned', TRUE, FALSE, 10, 3, 5, 'K', '[]', 1),
          (2, 'theirs@x.cn', 'foreign', TRUE, FALSE, NULL, NULL, 6, 'T', '[]', 1);
        INSERT INTO suppressions (list_id, email, reason, source, created_at) VALUES
          (1, 'optout@x.cn', 'user_unsubscribe', 'unsubscribe-export 2026-01-01 00:00:00', 1),
          (0, 'bounced@x.cn', 'bounce', 'campaign 7 not_exist', 1);
    ";

    #[tokio::test]
    async fn an_existing_database_starts_its_trail_with_an_imported_entry_per_member_and_suppression()
     {
        let _sockets = super::super::tests::FOREIGN_PG_SOCKETS.read().await;
        let dir = tempfile::tempdir().unwrap();
        let (urls, _guard) = both_urls(dir.path()).await;
        for url in urls {
            // Arrange, act: the schema before the trail, holding rows,
            // migrated.
            let store = upgraded_from_before(14, &url, OLD_ROWS).await;
            let all: Vec<String> = ["kept@x.cn", "theirs@x.cn", "optout@x.cn", "bounced@x.cn"]
                .map(String::from)
                .to_vec();
            let trail = store.audit_of(&all).await.unwrap();

            // Assert
            type Row<'a> = (String, Option<i64>, &'a str, Option<&'a str>, &'a str);
            let got: Vec<Row> = trail
                .iter()
                .map(|r| {
                    (
                        r.email.clone(),
                        r.list_id,
                        r.event.as_str(),
                        r.reason.as_deref(),
                        r.source.as_str(),
                    )
                })
                .collect();
            let mut got = got;
            got.sort();
            assert_eq!(
                got,
                vec![
                    (
                        "bounced@x.cn".into(),
                        None,
                        "imported",
                        Some("bounce"),
                        "edm"
                    ),
                    (
                        "kept@x.cn".into(),
                        Some(1),
                        "imported",
                        Some("owned"),
                        "crm"
                    ),
                    (
                        "optout@x.cn".into(),
                        Some(1),
                        "imported",
                        Some("user_unsubscribe"),
                        "edm"
                    ),
                    (
                        "theirs@x.cn".into(),
                        Some(2),
                        "imported",
                        Some("foreign"),
                        "edm"
                    ),
                ],
                "{url}"
            );
            store.close().await;
        }
    }

    #[tokio::test]
    async fn pruning_removes_only_entries_older_than_the_cutoff() {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("s.db").display());
        let store = Store::connect(&SecretString::from(url)).await.unwrap();
        let at = |ms, email: &str| AuditEntry {
            at: ms,
            ..AuditEntry::now(AuditEvent::Added, AuditSource::Crm, email)
        };
        store
            .append_audit(&[at(1_000, "old@x.cn"), at(5_000, "new@x.cn")])
            .await
            .unwrap();

        // Act
        let pruned = store.prune_audit(2_000).await.unwrap();

        // Assert
        let left = store
            .audit_of(&["old@x.cn".into(), "new@x.cn".into()])
            .await
            .unwrap();
        assert_eq!(pruned, 1);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].email, "new@x.cn");
        store.close().await;
    }
}
