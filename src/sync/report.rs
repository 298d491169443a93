//! What a contacts run did and how it ended.

use serde::Serialize;

use super::plan::{Plan, Refusal};
use crate::states::RunStatus;

/// What a contacts run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ContactsCounts {
    pub customers: usize,
    pub linkmen: usize,
    pub desired: usize,
    pub added: usize,
    pub updated: usize,
    pub unsubscribed: usize,
    pub adopted: usize,
    pub skipped_invalid: usize,
    pub suppressed: usize,
    pub failed: usize,
    /// Lines EDM refused with an error code once isolated from their batch
    /// (counted in `failed` too).
    pub refused: usize,
    /// Planned operations not sent because they are parked (refused in
    /// `edm.max_attempts` runs, content unchanged).
    pub parked: usize,
    pub duplicates: usize,
    pub without_email: usize,
    pub user_unsubscribes: usize,
    pub recovered: usize,
    pub lists_read: usize,
    pub edm_writes: usize,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Everything planned was applied (or the plan was empty).
    Applied,
    /// Some operations failed; they stay pending for the next run.
    Partial,
    /// The plan broke a safety limit and was not applied.
    Refused(Refusal),
    /// `--dry-run`: the plan, not applied.
    DryRun(Box<Plan>),
    /// Stopped by a shutdown between batches; what was not sent is
    /// planned again next run.
    Interrupted,
}

/// The result of a contacts run.
#[derive(Debug, Clone)]
pub struct ContactsReport {
    pub run_id: String,
    pub counts: ContactsCounts,
    pub outcome: Outcome,
    pub duration_ms: u64,
}

impl ContactsReport {
    /// Whether the run should make the process exit 0.
    pub fn is_success(&self) -> bool {
        matches!(
            self.outcome,
            Outcome::Applied | Outcome::DryRun(_) | Outcome::Interrupted
        )
    }

    pub fn status(&self) -> RunStatus {
        match self.outcome {
            Outcome::Applied => RunStatus::Succeeded,
            Outcome::DryRun(_) => RunStatus::Succeeded,
            Outcome::Interrupted => RunStatus::Interrupted,
            Outcome::Partial => RunStatus::Failed,
            Outcome::Refused(_) => RunStatus::Refused,
        }
    }
}
