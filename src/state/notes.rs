//! Findings already logged once (`log_notes`): see migration 9.

use std::collections::HashSet;

use anyhow::Context;
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter};

use super::entities::log_note;
use super::*;

/// Rows per insert or delete.
const CHUNK: usize = 500;

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

    /// Makes `current` the findings on record: adds the new ones, drops
    /// those no longer true (so they are logged again should they return).
    pub async fn set_log_notes(
        &self,
        before: &HashSet<String>,
        current: &HashSet<String>,
    ) -> anyhow::Result<()> {
        let gone: Vec<&String> = before.difference(current).collect();
        for chunk in gone.chunks(CHUNK) {
            log_note::Entity::delete_many()
                .filter(log_note::Column::Digest.is_in(chunk.iter().map(|d| d.to_string())))
                .exec(&self.db)
                .await
                .context("cannot forget logged findings")?;
        }
        let new: Vec<&String> = current.difference(before).collect();
        let now = now_ms();
        for chunk in new.chunks(CHUNK) {
            log_note::Entity::insert_many(chunk.iter().map(|d| log_note::ActiveModel {
                digest: Set(d.to_string()),
                noted_at: Set(now),
            }))
            .on_conflict_do_nothing()
            .exec_without_returning(&self.db)
            .await
            .context("cannot record logged findings")?;
        }
        Ok(())
    }
}
