//! Whether the state database takes writes, as the runs' own records last
//! found it — what `/healthz`, the `crm_edm_sync_state_db_writable` gauge
//! and one log line per change tell an operator.
//!
//! A run records its start and its end; when either write fails (a full
//! disk, an I/O error, a database that went away), the database is marked
//! as not taking writes, with the error as the reason, and the run counts
//! as failed. The next write that gets through (the next run's start)
//! marks it writable again: the daemon recovers by itself, no restart.
//! The end of a run that could not be recorded is kept in memory and
//! written (as failed, saying why) by the next run that can write, so the
//! `runs` table does not show it `running` for ever nor blame a crash.

use crate::domain::RunId;
use std::sync::{Arc, Mutex};

/// A run whose end could not be recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct UnrecordedEnd {
    pub run_id: RunId,
    pub counts: serde_json::Value,
    pub error: String,
}

#[derive(Debug, Default)]
struct Inner {
    /// Why the last run record could not be written; `None` while writes
    /// get through.
    failing: Option<String>,
    unrecorded: Vec<UnrecordedEnd>,
    /// Ledger rows the CRM confirmed whose `done` could not be written.
    owed_records_done: Vec<i64>,
}

/// Shared by every clone of a [`super::Store`] (and handed to the ops
/// endpoint).
#[derive(Debug, Clone, Default)]
pub struct Writable(Arc<Mutex<Inner>>);

/// At most this many unrecorded ends are kept (a database that stays full
/// for days must not grow the daemon's memory).
const MAX_UNRECORDED: usize = 100;

impl Writable {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Some(reason)` while the state database does not take writes.
    pub fn failing(&self) -> Option<String> {
        self.inner().failing.clone()
    }

    /// A run record could not be written: logs an error on the change
    /// (not again while it lasts) and sets the gauge to 0.
    pub fn failed(&self, reason: &str) {
        let mut inner = self.inner();
        if inner.failing.is_none() {
            tracing::error!(
                error = %reason,
                "the state database does not take writes: runs fail (and send nothing they cannot record) until it does"
            );
        }
        inner.failing = Some(reason.to_string());
        crate::metrics::state_db_writable(false);
    }

    /// A run record was written: logs the recovery on the change and sets
    /// the gauge to 1.
    pub fn succeeded(&self) {
        let mut inner = self.inner();
        if let Some(was) = inner.failing.take() {
            tracing::warn!(
                previous_error = %was,
                "the state database takes writes again"
            );
        }
        crate::metrics::state_db_writable(true);
    }

    /// Keeps the end of a run that could not be recorded, for the next
    /// run that can write.
    pub fn keep_unrecorded(&self, end: UnrecordedEnd) {
        let mut inner = self.inner();
        if inner.unrecorded.len() < MAX_UNRECORDED {
            inner.unrecorded.push(end);
        }
    }

    /// The ends kept so far; they are handed over once.
    pub fn take_unrecorded(&self) -> Vec<UnrecordedEnd> {
        std::mem::take(&mut self.inner().unrecorded)
    }

    /// Ledger rows the CRM confirmed but the ledger could not record done:
    /// the next write-back run records them before it sends anything, so
    /// they are not sent twice (as long as this process lives).
    pub fn owe_records_done(&self, ids: &[i64]) {
        self.inner().owed_records_done.extend_from_slice(ids);
    }

    /// The ledger rows owed so far; handed over once.
    pub fn take_owed_records_done(&self) -> Vec<i64> {
        std::mem::take(&mut self.inner().owed_records_done)
    }

    /// Puts ends back that still could not be written.
    pub fn put_back(&self, ends: Vec<UnrecordedEnd>) {
        for end in ends {
            self.keep_unrecorded(end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_remembered_until_a_write_gets_through() {
        // Arrange
        let w = Writable::default();

        // Act / Assert
        assert_eq!(w.failing(), None);
        w.failed("database or disk is full");
        w.failed("database or disk is full (again)");
        assert_eq!(
            w.failing().as_deref(),
            Some("database or disk is full (again)")
        );
        w.succeeded();
        assert_eq!(w.failing(), None);
    }

    #[test]
    fn unrecorded_ends_are_handed_over_once_and_bounded() {
        // Arrange
        let w = Writable::default();
        let end = |i: usize| UnrecordedEnd {
            run_id: RunId::from_stored(format!("r{i}")),
            counts: serde_json::json!({}),
            error: "full".into(),
        };

        // Act
        for i in 0..MAX_UNRECORDED + 5 {
            w.keep_unrecorded(end(i));
        }
        let first = w.take_unrecorded();
        let second = w.take_unrecorded();

        // Assert
        assert_eq!(first.len(), MAX_UNRECORDED);
        assert_eq!(first[0], end(0));
        assert!(second.is_empty());
    }
}
