//! The `lease` table: one row whose `epoch` each new holder of the instance
//! lock increments ([`Store::take_lease`]). Every write that precedes a
//! remote call — recording a batch of EDM operations as pending, marking
//! contact-history records as being sent — checks, in its own transaction,
//! that the epoch is still the one this instance took
//! ([`Store::check_fence`]). An instance that lost its lock and has not
//! noticed yet therefore cannot start another write once a successor took
//! the lease: its transaction fails with [`Fenced`] and nothing is sent.
//!
//! On PostgreSQL the check is an `UPDATE … WHERE epoch = ours`, so it holds
//! the row until its transaction commits and a successor's increment waits
//! for it; on SQLite, writers are serialised anyway.

use anyhow::Context;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, TransactionTrait,
};

use super::entities::lease;
use super::*;
use crate::instance::Instance;

/// The lease's only row.
const ROW: i64 = 1;

/// Who holds (or last held) the state database, and since when.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Lease {
    /// Incremented by each new holder: the fencing token.
    pub epoch: i64,
    pub holder: String,
    pub host: String,
    pub pid: u32,
    /// Milliseconds since the Unix epoch.
    pub acquired_at: i64,
}

impl From<lease::Model> for Lease {
    fn from(m: lease::Model) -> Lease {
        Lease {
            epoch: m.epoch,
            holder: m.holder,
            host: m.host,
            pid: u32::try_from(m.pid).unwrap_or(0),
            acquired_at: m.acquired_at,
        }
    }
}

/// A write refused because another instance took the lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this instance no longer holds the state database: {holder} took it over (lease epoch {current}, ours {ours}); it makes no further write"
)]
pub struct Fenced {
    pub ours: i64,
    pub current: i64,
    pub holder: String,
}

impl Store {
    /// Takes the lease for `me`, right after the instance lock was
    /// acquired: increments the epoch, and fences this store's writes
    /// with it from now on. Returns the lease taken and the one it
    /// replaced (`None` on a new database).
    pub async fn take_lease(&self, me: &Instance) -> anyhow::Result<(Lease, Option<Lease>)> {
        let txn = self.db.begin().await?;
        let before = lease::Entity::find_by_id(ROW)
            .one(&txn)
            .await
            .context("cannot read the lease")?
            .filter(|l| l.epoch > 0)
            .map(Lease::from);
        lease::Entity::insert(lease::ActiveModel {
            id: Set(ROW),
            epoch: Set(0),
            holder: Set(String::new()),
            host: Set(String::new()),
            pid: Set(0),
            acquired_at: Set(0),
        })
        .on_conflict(
            OnConflict::column(lease::Column::Id)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await
        .context("cannot create the lease")?;
        let now = now_ms();
        lease::Entity::update_many()
            .col_expr(lease::Column::Epoch, Expr::col(lease::Column::Epoch).add(1))
            .col_expr(lease::Column::Holder, me.id.clone().into())
            .col_expr(lease::Column::Host, me.host.clone().into())
            .col_expr(lease::Column::Pid, i64::from(me.pid).into())
            .col_expr(lease::Column::AcquiredAt, now.into())
            .filter(lease::Column::Id.eq(ROW))
            .exec(&txn)
            .await
            .context("cannot take the lease")?;
        let taken: Lease = lease::Entity::find_by_id(ROW)
            .one(&txn)
            .await?
            .context("the lease row vanished")?
            .into();
        txn.commit().await.context("cannot commit the lease")?;
        self.fence
            .store(taken.epoch, std::sync::atomic::Ordering::SeqCst);
        Ok((taken, before))
    }

    /// The lease as it stands (`None` before any instance took it).
    pub async fn lease(&self) -> anyhow::Result<Option<Lease>> {
        Ok(lease::Entity::find_by_id(ROW)
            .one(&self.db)
            .await
            .context("cannot read the lease")?
            .filter(|l| l.epoch > 0)
            .map(Lease::from))
    }

    /// The epoch this store's writes are fenced with (0: none).
    pub fn fence_epoch(&self) -> i64 {
        self.fence.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the lease is still this instance's (always, when it took
    /// none). An error reading it counts as not: the caller stops writing.
    pub async fn holds_lease(&self) -> bool {
        let ours = self.fence_epoch();
        if ours == 0 {
            return true;
        }
        matches!(self.lease().await, Ok(Some(l)) if l.epoch == ours)
    }

    /// Inside a write transaction: proves this instance still holds the
    /// lease, or fails with [`Fenced`] (the transaction is then dropped,
    /// and nothing it wrote is kept).
    pub(crate) async fn check_fence<C: ConnectionTrait>(&self, txn: &C) -> anyhow::Result<()> {
        let ours = self.fence_epoch();
        if ours == 0 {
            return Ok(());
        }
        let held = lease::Entity::update_many()
            .col_expr(lease::Column::Epoch, Expr::col(lease::Column::Epoch))
            .filter(lease::Column::Id.eq(ROW))
            .filter(lease::Column::Epoch.eq(ours))
            .exec(txn)
            .await
            .context("cannot check the lease")?
            .rows_affected;
        if held == 1 {
            return Ok(());
        }
        let now = lease::Entity::find_by_id(ROW).one(txn).await?;
        Err(Fenced {
            ours,
            current: now.as_ref().map_or(0, |l| l.epoch),
            holder: now.map_or_else(|| "nobody".to_string(), |l| l.holder),
        }
        .into())
    }

    /// On a clean stop (the jobs drained): marks the lease as released
    /// (pid 0), so a successor knows no request of ours can still be in
    /// flight and need not wait for one. Does nothing if another instance
    /// took it meanwhile.
    pub async fn release_lease(&self) -> anyhow::Result<()> {
        let ours = self.fence_epoch();
        if ours == 0 {
            return Ok(());
        }
        lease::Entity::update_many()
            .col_expr(lease::Column::Pid, 0i64.into())
            .filter(lease::Column::Id.eq(ROW))
            .filter(lease::Column::Epoch.eq(ours))
            .exec(&self.db)
            .await
            .context("cannot release the lease")?;
        Ok(())
    }
}
