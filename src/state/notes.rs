//! Findings already logged once (`log_notes`, migrations 9 and 10): an
//! invalid email, link-men sharing an address. Each row also says what the
//! finding was about, so that `explain` answers the masked address its
//! log line printed.

use std::collections::{HashMap, HashSet};

use anyhow::Context;
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
use serde::Serialize;

use super::entities::log_note;
use super::*;
use crate::domain::{CustomerId, LinkManId};

/// Rows per insert or delete.
const CHUNK: usize = 500;

/// What a logged finding was about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    /// The address: as the CRM gave it (trimmed) when invalid, normalised
    /// when shared.
    pub address: String,
    pub link_man_id: LinkManId,
    pub customer_id: Option<CustomerId>,
    /// The list a shared address is shared in.
    pub list_id: Option<ListId>,
    /// Why the address is invalid, or which link-men share it.
    pub detail: String,
}

/// The kinds of finding logged once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// Not a valid mailbox: the link-man is skipped.
    Invalid,
    /// Link-men share the address in one list; the lowest id owns it.
    Shared,
}

impl FindingKind {
    fn as_str(self) -> &'static str {
        match self {
            FindingKind::Invalid => "invalid",
            FindingKind::Shared => "shared",
        }
    }

    fn parse(text: &str) -> Option<FindingKind> {
        match text {
            "invalid" => Some(FindingKind::Invalid),
            "shared" => Some(FindingKind::Shared),
            _ => None,
        }
    }
}

impl Store {
    /// The digests of the findings logged so far.
    pub async fn log_notes(&self) -> anyhow::Result<HashSet<String>> {
        Ok(log_note::Entity::find()
            .all(&self.db)
            .await
            .context("cannot read the logged findings")?
            .into_iter()
            .map(|n| n.digest)
            .collect())
    }

    /// Makes `current` (digest → finding) the findings on record: adds
    /// the new ones, drops those no longer true (so they are logged again
    /// should they return).
    pub async fn set_log_notes(
        &self,
        before: &HashSet<String>,
        current: &HashMap<String, Finding>,
    ) -> anyhow::Result<()> {
        let gone: Vec<&String> = before
            .iter()
            .filter(|d| !current.contains_key(*d))
            .collect();
        for chunk in gone.chunks(CHUNK) {
            log_note::Entity::delete_many()
                .filter(log_note::Column::Digest.is_in(chunk.iter().map(|d| d.to_string())))
                .exec(&self.db)
                .await
                .context("cannot forget logged findings")?;
        }
        let new: Vec<(&String, &Finding)> = current
            .iter()
            .filter(|(d, _)| !before.contains(*d))
            .collect();
        let now = now_ms();
        for chunk in new.chunks(CHUNK) {
            log_note::Entity::insert_many(chunk.iter().map(|(d, f)| log_note::ActiveModel {
                digest: Set(d.to_string()),
                noted_at: Set(now),
                kind: Set(Some(f.kind.as_str().to_string())),
                address: Set(Some(f.address.clone())),
                link_man_id: Set(Some(f.link_man_id.0)),
                customer_id: Set(f.customer_id.map(|c| c.0)),
                list_id: Set(f.list_id.map(|l| l.0)),
                detail: Set(Some(f.detail.clone())),
            }))
            .on_conflict_do_nothing()
            .exec_without_returning(&self.db)
            .await
            .context("cannot record logged findings")?;
        }
        Ok(())
    }

    /// The findings about `address` (exactly as recorded).
    pub async fn findings_of(&self, address: &str) -> anyhow::Result<Vec<Finding>> {
        let rows = log_note::Entity::find()
            .filter(log_note::Column::Address.eq(address))
            .all(&self.db)
            .await
            .context("cannot read the findings of an address")?;
        let mut found: Vec<Finding> = rows.into_iter().filter_map(finding_of).collect();
        found.sort_by_key(|f| (f.list_id, f.link_man_id));
        Ok(found)
    }

    /// The recorded addresses of findings whose masked form is `masked`
    /// (both forms: `l***@domain` and `x*** (no @)`).
    /// (All rows are read: one per current finding, and an invalid
    /// address keeps the CRM's letter case, which `LIKE` on PostgreSQL
    /// would not match.)
    pub(crate) async fn finding_addresses_matching(
        &self,
        masked: &str,
    ) -> anyhow::Result<Vec<String>> {
        let rows: Vec<Option<String>> = log_note::Entity::find()
            .select_only()
            .column(log_note::Column::Address)
            .into_tuple()
            .all(&self.db)
            .await
            .context("cannot read the logged findings")?;
        Ok(rows
            .into_iter()
            .flatten()
            .filter(|a| crate::domain::mask_address(a).to_lowercase() == masked)
            .collect())
    }
}

fn finding_of(row: log_note::Model) -> Option<Finding> {
    Some(Finding {
        kind: FindingKind::parse(row.kind.as_deref()?)?,
        address: row.address?,
        link_man_id: LinkManId(row.link_man_id?),
        customer_id: row.customer_id.map(CustomerId),
        list_id: row.list_id.map(ListId),
        detail: row.detail.unwrap_or_default(),
    })
}
