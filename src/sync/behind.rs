//! A state database behind EDM — restored from a backup, or left behind by
//! a full disk — re-learns before it writes.
//!
//! Such a database does not know the members the daemon added since, and
//! would add them again; it does not know the daemon's own `ml-unsub`s
//! since either, so their export lines read as user unsubscribes. A list
//! is read whole only before the first add into it and on `--full`, so
//! the daemon notices otherwise: before a run writes into a list it has
//! read before, or when the export showed new user unsubscribes in it, it
//! compares the member count `maillist-list` gives for every list (one
//! request) with the addresses the state database records as present
//! there, after this run's export and pending operations are folded in.
//! Where they differ the database is behind for that list:
//!
//! - every address the plan would add is looked up in the list first
//!   (`lookup`: a keyword search each or one whole read, whichever is fewer
//!   requests); one EDM holds is learnt as present, so the planner adopts
//!   it instead of adding it twice;
//! - this run's new user unsubscribes in that list are kept suppressed —
//!   the safe side — but recorded as read while the database was behind
//!   (`status` and `explain` name them), since the restored database
//!   cannot tell the daemon's own unsubscribe from the recipient's.
//!
//! Equal counts with a database that is behind need the daemon to have
//! added nothing since (adds raise EDM's count, and every unsubscribe
//! since is a new export line); a list whose count differs for another
//! reason (addresses added in EDM by hand, duplicates) costs the lookup
//! each run that adds to it, and nothing else.

use std::collections::{BTreeSet, HashMap};

use anyhow::Context as _;

use super::lookup::lookup;
use crate::domain::{Email, ListId, MemberKey, Members};
use crate::jobs::Context;
use crate::jobs::interpret::held_by_edm;
use crate::state::Observations;
use crate::stored_enums::{SuppressionReason, SuppressionSource};

/// One list where the state database is behind EDM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Behind {
    pub list_id: ListId,
    /// What EDM counts in the list.
    pub edm_count: u64,
    /// What the state database records as present there.
    pub expected: u64,
}

/// The lists worth comparing: those the plan adds into (`adds_into`) that
/// were not read whole in this run, and those with new user unsubscribes.
pub fn candidates(adds_into: &BTreeSet<ListId>, obs: &Observations) -> BTreeSet<ListId> {
    let read: BTreeSet<ListId> = obs.list_reads.iter().map(|(l, _)| *l).collect();
    adds_into
        .iter()
        .copied()
        .filter(|l| !read.contains(l))
        .chain(
            obs.suppressions
                .iter()
                .filter(|s| s.reason == SuppressionReason::UserUnsubscribe)
                .filter_map(|s| s.list_id)
                .filter(|l| !read.contains(l)),
        )
        .collect()
}

/// Compares EDM's count of each of `lists` with the present members the
/// state database records there; no request when `lists` is empty.
pub async fn lists_behind(
    ctx: &Context,
    lists: &BTreeSet<ListId>,
    members: &Members,
) -> anyhow::Result<Vec<Behind>> {
    if lists.is_empty() {
        return Ok(Vec::new());
    }
    let counts = ctx
        .edm
        .maillist_list()
        .await
        .context("cannot read the lists' member counts (maillist-list); nothing was applied")?;
    let mut expected: HashMap<ListId, u64> = HashMap::new();
    for m in members.values().filter(|m| m.present) {
        *expected.entry(m.key.list_id).or_default() += 1;
    }
    Ok(counts
        .into_iter()
        .filter(|l| lists.contains(&l.id))
        .filter_map(|l| {
            let expected = expected.get(&l.id).copied().unwrap_or(0);
            let edm_count = l.count?;
            (edm_count != expected).then_some(Behind {
                list_id: l.id,
                edm_count,
                expected,
            })
        })
        .collect())
}

/// Re-learns `behind`'s list before anything is written into it: the
/// planned adds EDM already holds become present members (adopted by the
/// planner), and this run's new user unsubscribes there are marked as
/// read while behind. `planned_adds`: the keys the plan adds, in every
/// list. Returns how many planned adds EDM already held.
pub async fn relearn(
    ctx: &Context,
    behind: Behind,
    planned_adds: &[&MemberKey],
    members: &mut Members,
    obs: &mut Observations,
) -> anyhow::Result<usize> {
    let list_id = behind.list_id;
    let adds: Vec<Email> = planned_adds
        .iter()
        .filter(|k| k.list_id == list_id)
        .map(|k| k.email.clone())
        .collect();
    let found = if adds.is_empty() {
        HashMap::new()
    } else {
        lookup(ctx, list_id, &adds, members.present_in(list_id))
            .await
            .with_context(|| {
                format!("cannot look up list {list_id}'s planned adds; nothing was applied")
            })?
    };
    for (email, addr) in &found {
        let key = MemberKey::new(list_id, email.clone());
        let learnt = held_by_edm(key.clone(), addr, members.get(&key));
        members.insert(key, learnt.clone());
        obs.members.push(learnt);
    }
    let mut marked = 0;
    for s in obs
        .suppressions
        .iter_mut()
        .filter(|s| s.list_id == Some(list_id))
    {
        if let SuppressionSource::Export { time } = &s.source {
            s.source = SuppressionSource::ExportWhileBehind { time: time.clone() };
            marked += 1;
        }
    }
    tracing::warn!(
        list_id = list_id.0,
        edm_count = behind.edm_count,
        expected = behind.expected,
        planned_adds = adds.len(),
        already_in_edm = found.len(),
        unsubscribed_while_behind = marked,
        "the state database is behind EDM for this list (restored from a backup?): planned adds EDM already holds are learnt, not sent again; new unsubscribes stay suppressed and are named as read while behind"
    );
    Ok(found.len())
}
