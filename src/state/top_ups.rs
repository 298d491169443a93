//! The reseller top-ups of this tenant (`reseller_top_ups`): how many
//! were asked on a day, recorded (fenced) before each call and finished
//! with its outcome.

use anyhow::Context;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, TransactionTrait,
};

use super::entities::top_up;
use super::*;

/// How a top-up ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopUpOutcome {
    /// The sends were added.
    Added,
    /// The reseller's own pool is short: no other try that day.
    Understock,
    /// Refused otherwise, or no answer.
    Failed,
}

impl TopUpOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            TopUpOutcome::Added => "added",
            TopUpOutcome::Understock => "understock",
            TopUpOutcome::Failed => "failed",
        }
    }
}

/// The top-ups of one day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopUpDay {
    /// Every one asked (whatever its outcome: each counts towards the
    /// day's bound).
    pub asked: u32,
    /// Whether one was refused `understock`.
    pub understock: bool,
}

impl Store {
    /// The top-ups asked on `day`.
    pub async fn top_ups_on(&self, day: &str) -> anyhow::Result<TopUpDay> {
        let rows = top_up::Entity::find()
            .filter(top_up::Column::Day.eq(day))
            .all(&self.db)
            .await
            .context("cannot read the reseller top-ups")?;
        Ok(TopUpDay {
            asked: u32::try_from(rows.len()).unwrap_or(u32::MAX),
            understock: rows
                .iter()
                .any(|r| r.outcome == TopUpOutcome::Understock.as_str()),
        })
    }

    /// Records a top-up of `count` about to be asked on `day`, in a
    /// transaction that proves this instance still holds the tenant
    /// ([`Store::check_fence`]); its row id.
    pub async fn record_top_up(&self, day: &str, count: u64) -> anyhow::Result<i64> {
        let txn = self.db.begin().await?;
        self.check_fence(&txn).await?;
        let row = top_up::ActiveModel {
            day: Set(day.to_string()),
            at: Set(now_ms()),
            count: Set(i64::try_from(count).unwrap_or(i64::MAX)),
            outcome: Set("asked".to_string()),
            detail: Set(None),
            ..Default::default()
        }
        .insert(&txn)
        .await
        .context("cannot record the top-up")?;
        txn.commit().await.context("cannot record the top-up")?;
        Ok(row.id)
    }

    /// Finishes the top-up `id` with its outcome.
    pub async fn finish_top_up(
        &self,
        id: i64,
        outcome: TopUpOutcome,
        detail: Option<String>,
    ) -> anyhow::Result<()> {
        top_up::Entity::update_many()
            .col_expr(top_up::Column::Outcome, outcome.as_str().into())
            .col_expr(top_up::Column::Detail, detail.into())
            .filter(top_up::Column::Id.eq(id))
            .exec(&self.db)
            .await
            .context("cannot record the top-up's outcome")?;
        Ok(())
    }
}
