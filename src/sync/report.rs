//! What a contacts run did and how it ended.

use crate::domain::RunId;
use serde::Serialize;

use super::plan::{Plan, PlanRefusal};
use crate::domain::{ListId, MemberKey};
use crate::stored_enums::RunStatus;

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
    /// What the second look at link-men missing from the pull found (see
    /// `vanished`).
    #[serde(flatten)]
    pub second_look: super::vanished::SecondLook,
    /// Lists where the state DB was found behind EDM (see `behind`).
    pub lists_behind: usize,
    /// Planned adds EDM already held there: learnt, not sent again.
    pub relearnt: usize,
    /// Link-men whose address was forgotten (`forget`): never added.
    pub forgotten: usize,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Everything planned was applied (or the plan was empty).
    Applied,
    /// Some operations failed; they stay pending for the next run.
    Partial,
    /// The plan broke a safety limit and was not applied.
    Refused(PlanRefusal),
    /// `--dry-run`: the plan, not applied.
    DryRun(Box<Preview>),
    /// Stopped by a shutdown between batches; what was not sent is
    /// planned again next run.
    Interrupted,
}

/// What a dry run found: the plan, the user unsubscribes it read for the
/// first time (they would be suppressed), and the refusal the real run
/// would meet.
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    pub plan: Plan,
    pub user_unsubscribes: Vec<MemberKey>,
    pub refusal: Option<PlanRefusal>,
}

/// The result of a contacts run.
#[derive(Debug, Clone)]
pub struct ContactsReport {
    pub run_id: RunId,
    pub counts: ContactsCounts,
    pub outcome: Outcome,
    pub duration_ms: u64,
}

impl ContactsReport {
    /// Whether the run should make the process exit 0.
    /// A dry run whose plan would be refused fails, as the real run would.
    pub fn is_success(&self) -> bool {
        match &self.outcome {
            Outcome::Applied | Outcome::Interrupted => true,
            Outcome::DryRun(preview) => preview.refusal.is_none(),
            Outcome::Partial | Outcome::Refused(_) => false,
        }
    }

    pub fn status(&self) -> RunStatus {
        match &self.outcome {
            Outcome::Applied => RunStatus::Succeeded,
            Outcome::DryRun(preview) if preview.refusal.is_some() => RunStatus::Refused,
            Outcome::DryRun(_) => RunStatus::Succeeded,
            Outcome::Interrupted => RunStatus::Interrupted,
            Outcome::Partial => RunStatus::Failed,
            Outcome::Refused(_) => RunStatus::Refused,
        }
    }
}

impl Preview {
    /// The plan as JSON lines (`--dry-run --plan FILE`), one object per
    /// line with a `kind`: `add`, `edit` (with `old` and `new` fields),
    /// `unsub`, `adopt` and `owner_change` (state only), `suppressed` (a
    /// desired member that gets nothing), `user_unsubscribe` (an export
    /// line read for the first time), and last, when the real run would
    /// refuse the plan, `refusal`. Addresses are written in full: the file
    /// is the operator's, asked for by name.
    pub fn json_lines(&self) -> impl Iterator<Item = serde_json::Value> + '_ {
        use serde_json::json;
        let fields = |f: &crate::domain::MemberFields| json!({ "fullname": f.fullname(), "vars": f.vars().collect::<Vec<_>>() });
        let p = &self.plan;
        let adds = p.adds.iter().map(move |a| {
            json!({
                "kind": "add",
                "list_id": a.key.list_id,
                "email": a.key.email.as_str(),
                "link_man_id": a.link_man_id,
                "customer_id": a.customer_id,
                "fields": fields(&a.fields),
            })
        });
        let edits = p.edits.iter().map(move |e| {
            json!({
                "kind": "edit",
                "list_id": e.key.list_id,
                "email": e.key.email.as_str(),
                "link_man_id": e.link_man_id,
                "customer_id": e.customer_id,
                "edm_id": e.edm_id,
                "old": fields(&e.old),
                "new": fields(&e.fields),
            })
        });
        let unsubs = p.unsubs.iter().map(|u| {
            json!({
                "kind": "unsub",
                "list_id": u.key.list_id,
                "email": u.key.email.as_str(),
                "link_man_id": u.link_man_id,
            })
        });
        let owners = p.owner_changes.iter().map(|c| {
            json!({
                "kind": if c.adopt { "adopt" } else { "owner_change" },
                "list_id": c.key.list_id,
                "email": c.key.email.as_str(),
                "link_man_id": c.link_man_id,
                "customer_id": c.customer_id,
            })
        });
        let suppressed = p.suppressed.iter().map(
            |k| json!({ "kind": "suppressed", "list_id": k.list_id, "email": k.email.as_str() }),
        );
        let user = self.user_unsubscribes.iter().map(|k| {
            json!({ "kind": "user_unsubscribe", "list_id": k.list_id, "email": k.email.as_str() })
        });
        // One line per list the refusal is about, each with the same
        // fields whatever refused it (an empty pull is about every list).
        let refusal =
            self.refusal.iter().flat_map(|r| {
                let lists: Vec<(ListId, usize, usize, f64)> = match r {
                    PlanRefusal::Ratio {
                        list_id,
                        unsubs,
                        members,
                        ratio,
                    } => vec![(*list_id, *unsubs, *members, *ratio)],
                    PlanRefusal::EmptyPull { lists, ratio, .. } => {
                        lists.iter().map(|&(l, u, m)| (l, u, m, *ratio)).collect()
                    }
                };
                lists.into_iter().map(move |(list_id, unsubs, members, ratio)| {
                json!({
                    "kind": "refusal", "reason": r.in_words(), "list_id": list_id,
                    "unsubscribes": unsubs, "members": members, "max_unsubscribe_ratio": ratio,
                })
            })
            });
        adds.chain(edits)
            .chain(unsubs)
            .chain(owners)
            .chain(suppressed)
            .chain(user)
            .chain(refusal)
    }
}
