//! The diff: desired members × what the state DB knows → a plan of EDM
//! writes (adds, edits, unsubscribes) and state-only changes (adoptions,
//! owner changes). Pure: no I/O, no clock (so it is tested without a server or a clock).
//!
//! Rules (docs/sync-rules.md): a suppressed key gets no operation (rule 6, and
//! bounces: never added or edited, unsubscribed where the daemon owns it);
//! only members the daemon added are unsubscribed, adopted ones never
//! (rule 5); an address EDM already holds that is a desired member is
//! adopted, never added twice.
//!
//! Why one file over 600 lines: the diff and the safety check are 240
//! lines; the rest are their tests, one per behaviour rule, kept beside
//! the rules they pin down.

use std::collections::BTreeMap;

use crate::domain::{CustomerId, LinkManId, ListId, MemberFields, MemberKey, Members};
use crate::stored_enums::UnsubReason;
use crate::sync::desired::{Departures, DesiredMember, DesiredMembers};

pub use crate::domain::{MemberState, Origin, Suppressions};

/// A planned `ml-addr-add`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedAdd {
    pub key: MemberKey,
    pub link_man_id: LinkManId,
    pub customer_id: CustomerId,
    pub fields: MemberFields,
}

/// A planned `ml-addr-edit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedEdit {
    pub key: MemberKey,
    /// EDM's id when known; otherwise found before the edit is sent.
    pub edm_id: Option<crate::domain::AddressId>,
    pub link_man_id: LinkManId,
    pub customer_id: CustomerId,
    pub fields: MemberFields,
    /// The fields the state DB records now (what the edit replaces).
    pub old: MemberFields,
}

/// A planned `ml-unsub`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedUnsub {
    pub key: MemberKey,
    pub link_man_id: Option<LinkManId>,
    /// Why: for the consent trail.
    pub reason: UnsubReason,
}

/// A state-only change: who owns a member, and whether it becomes adopted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerChange {
    pub key: MemberKey,
    pub link_man_id: LinkManId,
    pub customer_id: CustomerId,
    /// `true` when a foreign address becomes adopted.
    pub adopt: bool,
}

/// The plan of one contacts run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub adds: Vec<PlannedAdd>,
    pub edits: Vec<PlannedEdit>,
    pub unsubs: Vec<PlannedUnsub>,
    /// Adoptions and owner changes (no EDM write).
    pub owner_changes: Vec<OwnerChange>,
    /// Desired members that got nothing because they are suppressed.
    pub suppressed: Vec<MemberKey>,
}

impl Plan {
    /// EDM writes the plan will make (before batching).
    pub fn write_count(&self) -> usize {
        self.adds.len() + self.edits.len() + self.unsubs.len()
    }

    pub fn adoptions(&self) -> usize {
        self.owner_changes.iter().filter(|c| c.adopt).count()
    }

    pub fn is_empty(&self) -> bool {
        self.write_count() == 0 && self.owner_changes.is_empty()
    }
}

/// Whether `want` gets an add: no suppression blocks it, and the state DB
/// knows of no such member in EDM.
fn is_add(want: &DesiredMember, state: &Members, suppressions: &Suppressions) -> bool {
    !suppressions.blocks_writes(&want.key) && !state.get(&want.key).is_some_and(|h| h.present)
}

/// The keys [`plan`] would add, borrowed from `desired`: what the read
/// phase needs (which lists get adds and, where the state DB is behind
/// EDM, which addresses) without copying a million members' texts.
pub fn planned_adds<'d>(
    desired: &'d DesiredMembers,
    state: &Members,
    suppressions: &Suppressions,
) -> Vec<&'d MemberKey> {
    desired
        .iter()
        .filter(|want| is_add(want, state, suppressions))
        .map(|want| &want.key)
        .collect()
}

/// Computes the plan. Takes the desired members: their texts move into
/// the planned adds and edits rather than being copied, and the planned
/// adds are collected into the desired members' own buffer (the two types
/// have one layout, so `collect` reuses the allocation): a first sync of a
/// million link-men does not hold a second million-entry `Vec` (64 MB).
///
/// A member the pull wants exactly as recorded ([`Members::wanted_as_is`])
/// is desired as it is: it gets nothing, unless a suppression blocks it.
pub fn plan(desired: DesiredMembers, state: &Members, suppressions: &Suppressions) -> Plan {
    plan_with(desired, &Departures::default(), state, suppressions)
}

/// [`plan`], with why each recorded member the pull no longer wants left
/// (the unsubscribes' reasons; without it, a member not wanted is taken
/// for one whose link-man was deleted).
pub fn plan_with(
    desired: DesiredMembers,
    departures: &Departures,
    state: &Members,
    suppressions: &Suppressions,
) -> Plan {
    let mut plan = Plan {
        unsubs: planned_unsubs(&desired, departures, state, suppressions),
        ..Plan::default()
    };
    plan.suppressed = state
        .values_as_is()
        .filter(|(have, as_is)| *as_is && suppressions.blocks_writes(&have.key))
        .map(|(have, _)| have.key.clone())
        .collect();
    let adds = desired
        .into_iter()
        .filter_map(|want| {
            if suppressions.blocks_writes(&want.key) {
                plan.suppressed.push(want.key);
                return None;
            }
            match state.get(&want.key) {
                Some(have) if have.present => {
                    keep_in_step(&mut plan, want, have);
                    None
                }
                _ => Some(PlannedAdd {
                    key: want.key,
                    link_man_id: want.link_man_id,
                    customer_id: want.customer_id,
                    fields: want.fields,
                }),
            }
        })
        .collect();
    plan.adds = adds;
    plan.suppressed.sort_unstable();
    plan
}

/// What lets [`plan`] collect the adds in place.
const _: () = assert!(
    std::mem::size_of::<PlannedAdd>() == std::mem::size_of::<DesiredMember>()
        && std::mem::align_of::<PlannedAdd>() == std::mem::align_of::<DesiredMember>()
);

/// A desired member EDM holds: an adoption or owner change, and an edit
/// where the texts differ.
fn keep_in_step(plan: &mut Plan, want: DesiredMember, have: &MemberState) {
    let adopt = have.origin == Origin::Foreign;
    let owner_differs =
        have.link_man_id != Some(want.link_man_id) || have.customer_id != Some(want.customer_id);
    if adopt || owner_differs {
        plan.owner_changes.push(OwnerChange {
            key: want.key.clone(),
            link_man_id: want.link_man_id,
            customer_id: want.customer_id,
            adopt,
        });
    }
    if !have.fields.same_values(&want.fields) {
        plan.edits.push(PlannedEdit {
            key: want.key,
            edm_id: have.edm_id,
            link_man_id: want.link_man_id,
            customer_id: want.customer_id,
            fields: want.fields,
            old: have.fields.clone(),
        });
    }
}

/// Owned members EDM holds that no desired member wants (or that bounced),
/// sorted by key; a user unsubscribe is never unsubscribed again.
fn planned_unsubs(
    desired: &DesiredMembers,
    departures: &Departures,
    state: &Members,
    suppressions: &Suppressions,
) -> Vec<PlannedUnsub> {
    let mut unsubs: Vec<PlannedUnsub> = state
        .values_as_is()
        .filter(|(have, _)| have.present && have.origin == Origin::Owned)
        .filter(|(have, _)| !suppressions.user.contains(&have.key))
        .filter(|(have, as_is)| {
            let wanted = *as_is || desired.contains_key(&have.key);
            !wanted || suppressions.bounced.contains(&have.key.email)
        })
        .map(|(have, _)| PlannedUnsub {
            key: have.key.clone(),
            link_man_id: have.link_man_id,
            reason: if suppressions.bounced.contains(&have.key.email) {
                UnsubReason::Bounce
            } else {
                departures
                    .reason(&have.key)
                    .unwrap_or(UnsubReason::LinkmanDeleted)
            },
        })
        .collect();
    unsubs.sort_by(|a, b| a.key.cmp(&b.key));
    unsubs
}

/// Why a plan was refused (rule 7).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanRefusal {
    #[error(
        "list {list_id}: {unsubs} planned unsubscribes of {members} members exceeds sync.max_unsubscribe_ratio {ratio} (use --force to apply)"
    )]
    Ratio {
        list_id: ListId,
        unsubs: usize,
        members: usize,
        ratio: f64,
    },
    #[error(
        "the CRM pull produced no valid member while the state DB records {members} members (use --force to apply)"
    )]
    EmptyPull {
        members: usize,
        /// Per list: planned unsubscribes and recorded members.
        lists: Vec<(ListId, usize, usize)>,
        ratio: f64,
    },
}

impl PlanRefusal {
    /// The refusal in an operator's words, for a dry run's stdout:
    /// `refused: 72 of 72 members of list 1 would be unsubscribed (ratio
    /// 1.00 > 0.20); --force would apply it`.
    pub fn in_words(&self) -> String {
        match self {
            PlanRefusal::Ratio {
                list_id,
                unsubs,
                members,
                ratio,
            } => {
                let why = if *members == 0 {
                    "no member is recorded in it yet".to_string()
                } else {
                    format!("ratio {:.2} > {ratio:.2}", *unsubs as f64 / *members as f64)
                };
                format!(
                    "refused: {unsubs} of {members} members of list {list_id} would be unsubscribed ({why}); --force would apply it"
                )
            }
            PlanRefusal::EmptyPull { members, .. } => format!(
                "refused: the CRM pull produced no valid member while {members} members are recorded; --force would apply it"
            ),
        }
    }
}

/// How many members the CRM wants: the desired members the pull holds and
/// the recorded members it wants as they are. The empty-pull check
/// (rule 7) is made on this.
pub fn desired_total(desired: &DesiredMembers, state: &Members) -> usize {
    desired.len() + state.wanted_as_is_count()
}

/// Members (owned and adopted) the state DB records per list before the
/// run: the safety ratio's denominator.
pub fn members_per_list(state: &Members) -> BTreeMap<ListId, usize> {
    let mut counts = BTreeMap::new();
    for m in state.values() {
        if m.present && m.origin != Origin::Foreign {
            *counts.entry(m.key.list_id).or_insert(0) += 1;
        }
    }
    counts
}

/// Checks the plan against the safety limits of rule 7.
pub fn check_safety(
    plan: &Plan,
    desired_count: usize,
    members: &BTreeMap<ListId, usize>,
    max_ratio: f64,
) -> Result<(), PlanRefusal> {
    let total: usize = members.values().sum();
    let mut unsubs_per_list: BTreeMap<ListId, usize> = BTreeMap::new();
    for u in &plan.unsubs {
        *unsubs_per_list.entry(u.key.list_id).or_insert(0) += 1;
    }
    if desired_count == 0 && total > 0 {
        let lists = members
            .iter()
            .map(|(&list, &n)| (list, unsubs_per_list.get(&list).copied().unwrap_or(0), n))
            .collect();
        return Err(PlanRefusal::EmptyPull {
            members: total,
            lists,
            ratio: max_ratio,
        });
    }
    for (list_id, unsubs) in unsubs_per_list {
        let members = members.get(&list_id).copied().unwrap_or(0);
        let ratio = if members == 0 {
            f64::INFINITY
        } else {
            unsubs as f64 / members as f64
        };
        if ratio > max_ratio {
            return Err(PlanRefusal::Ratio {
                list_id,
                unsubs,
                members,
                ratio: max_ratio,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AddressId, CustomerId, LinkManId, ListId};
    use crate::domain::{Email, VAR_COUNT};
    use std::collections::HashSet;

    fn key(list: ListId, email: &str) -> MemberKey {
        MemberKey::new(list, Email::parse(email).unwrap())
    }

    fn fields(name: &str) -> MemberFields {
        MemberFields::named(name)
    }

    fn want(list: ListId, email: &str, lm: LinkManId, name: &str) -> (MemberKey, DesiredMember) {
        let k = key(list, email);
        (
            k.clone(),
            DesiredMember {
                key: k,
                link_man_id: lm,
                customer_id: CustomerId(lm.0 * 100),
                fields: fields(name),
            },
        )
    }

    fn have(
        list: ListId,
        email: &str,
        lm: LinkManId,
        name: &str,
        origin: Origin,
    ) -> (MemberKey, MemberState) {
        let k = key(list, email);
        (
            k.clone(),
            MemberState {
                key: k,
                origin,
                present: true,
                unsubscribed: false,
                link_man_id: Some(lm),
                customer_id: Some(CustomerId(lm.0 * 100)),
                edm_id: Some(AddressId(lm.0 + 1000)),
                fields: fields(name),
            },
        )
    }

    fn desired(items: Vec<(MemberKey, DesiredMember)>) -> DesiredMembers {
        items.into_iter().map(|(_, m)| m).collect()
    }

    fn state(items: Vec<(MemberKey, MemberState)>) -> Members {
        items.into_iter().collect()
    }

    #[test]
    fn new_members_are_added() {
        let d = desired(vec![
            want(ListId(1), "a@x.cn", LinkManId(1), "A"),
            want(ListId(2), "b@x.cn", LinkManId(2), "B"),
        ]);
        let p = plan(d, &Members::default(), &Suppressions::default());
        assert_eq!(p.adds.len(), 2);
        assert!(p.edits.is_empty() && p.unsubs.is_empty());
    }

    #[test]
    fn no_change_gives_an_empty_plan() {
        let d = desired(vec![want(ListId(1), "a@x.cn", LinkManId(1), "A")]);
        let s = state(vec![have(
            ListId(1),
            "a@x.cn",
            LinkManId(1),
            "A",
            Origin::Owned,
        )]);
        let p = plan(d, &s, &Suppressions::default());
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn changed_fields_are_one_edit_with_the_known_id() {
        let d = desired(vec![want(ListId(1), "a@x.cn", LinkManId(1), "A2")]);
        let s = state(vec![have(
            ListId(1),
            "a@x.cn",
            LinkManId(1),
            "A",
            Origin::Owned,
        )]);
        let p = plan(d, &s, &Suppressions::default());
        assert_eq!(p.edits.len(), 1);
        assert_eq!(p.edits[0].edm_id, Some(AddressId(1001)));
        assert_eq!(p.edits[0].fields.fullname(), "A2");
        assert!(p.adds.is_empty() && p.unsubs.is_empty());
    }

    #[test]
    fn a_var_change_alone_is_an_edit() {
        let (k, mut w) = want(ListId(1), "a@x.cn", LinkManId(1), "A");
        w.fields = w.fields.with_var(VAR_COUNT - 1, "new");
        let d = desired(vec![(k, w)]);
        let s = state(vec![have(
            ListId(1),
            "a@x.cn",
            LinkManId(1),
            "A",
            Origin::Owned,
        )]);
        assert_eq!(plan(d, &s, &Suppressions::default()).edits.len(), 1);
    }

    #[test]
    fn a_deleted_linkman_is_unsubscribed() {
        let s = state(vec![
            have(ListId(1), "a@x.cn", LinkManId(1), "A", Origin::Owned),
            have(ListId(1), "b@x.cn", LinkManId(2), "B", Origin::Owned),
        ]);
        let d = desired(vec![want(ListId(1), "b@x.cn", LinkManId(2), "B")]);
        let p = plan(d, &s, &Suppressions::default());
        assert_eq!(p.unsubs.len(), 1);
        assert_eq!(p.unsubs[0].key, key(ListId(1), "a@x.cn"));
    }

    #[test]
    fn an_email_change_unsubscribes_the_old_and_adds_the_new() {
        let s = state(vec![have(
            ListId(1),
            "old@x.cn",
            LinkManId(1),
            "A",
            Origin::Owned,
        )]);
        let d = desired(vec![want(ListId(1), "new@x.cn", LinkManId(1), "A")]);
        let p = plan(d, &s, &Suppressions::default());
        assert_eq!(p.unsubs[0].key, key(ListId(1), "old@x.cn"));
        assert_eq!(p.adds[0].key, key(ListId(1), "new@x.cn"));
    }

    #[test]
    fn a_route_change_moves_the_member_between_lists() {
        let s = state(vec![have(
            ListId(1),
            "a@x.cn",
            LinkManId(1),
            "A",
            Origin::Owned,
        )]);
        let d = desired(vec![want(ListId(2), "a@x.cn", LinkManId(1), "A")]);
        let p = plan(d, &s, &Suppressions::default());
        assert_eq!(p.unsubs[0].key, key(ListId(1), "a@x.cn"));
        assert_eq!(p.adds[0].key, key(ListId(2), "a@x.cn"));
    }

    #[test]
    fn a_member_the_daemon_unsubscribed_is_added_again_when_desired_again() {
        let (k, mut m) = have(ListId(1), "a@x.cn", LinkManId(1), "A", Origin::Owned);
        m.present = false;
        let p = plan(
            desired(vec![want(ListId(1), "a@x.cn", LinkManId(1), "A")]),
            &state(vec![(k, m)]),
            &Suppressions::default(),
        );
        assert_eq!(p.adds.len(), 1);
    }

    #[test]
    fn planned_adds_are_the_keys_the_plan_adds_and_no_other() {
        // Arrange: a new member, a held one with new texts, a foreign one
        // (adopted), a user-suppressed new one, a bounced new one, and one
        // recorded but gone from EDM (added again).
        let sup = Suppressions {
            user: [key(ListId(1), "s@x.cn")].into_iter().collect(),
            bounced: [Email::parse("b@x.cn").unwrap()].into_iter().collect(),
            ..Default::default()
        };
        let (gone_key, mut gone) = have(ListId(2), "g@x.cn", LinkManId(6), "G", Origin::Owned);
        gone.present = false;
        let s = state(vec![
            have(ListId(1), "h@x.cn", LinkManId(2), "H", Origin::Owned),
            have(ListId(1), "f@x.cn", LinkManId(3), "F", Origin::Foreign),
            (gone_key, gone),
        ]);
        let d = desired(vec![
            want(ListId(1), "n@x.cn", LinkManId(1), "N"),
            want(ListId(1), "h@x.cn", LinkManId(2), "H2"),
            want(ListId(1), "f@x.cn", LinkManId(3), "F"),
            want(ListId(1), "s@x.cn", LinkManId(4), "S"),
            want(ListId(2), "b@x.cn", LinkManId(5), "B"),
            want(ListId(2), "g@x.cn", LinkManId(6), "G"),
        ]);

        // Act
        let early: Vec<MemberKey> = planned_adds(&d, &s, &sup).into_iter().cloned().collect();
        let p = plan(d, &s, &sup);

        // Assert
        let added: Vec<MemberKey> = p.adds.iter().map(|a| a.key.clone()).collect();
        assert_eq!(early, added);
        assert_eq!(
            early,
            vec![key(ListId(1), "n@x.cn"), key(ListId(2), "g@x.cn")]
        );
    }

    #[test]
    fn user_suppression_blocks_every_operation() {
        let sup = Suppressions {
            user: [key(ListId(1), "a@x.cn"), key(ListId(1), "b@x.cn")]
                .into_iter()
                .collect(),
            bounced: HashSet::new(),
            ..Default::default()
        };
        // a: desired, not in state (would be an add); b: in state with
        // other fields (would be an edit), and still present by mistake.
        let d = desired(vec![
            want(ListId(1), "a@x.cn", LinkManId(1), "A"),
            want(ListId(1), "b@x.cn", LinkManId(2), "B2"),
        ]);
        let s = state(vec![have(
            ListId(1),
            "b@x.cn",
            LinkManId(2),
            "B",
            Origin::Owned,
        )]);
        let p = plan(d, &s, &sup);
        assert_eq!(p.write_count(), 0, "{p:?}");
        assert_eq!(p.suppressed.len(), 2);
        // Not desired any more: still no unsubscribe for a user-suppressed key.
        let p = plan(DesiredMembers::default(), &s, &sup);
        assert!(p.unsubs.is_empty());
    }

    #[test]
    fn user_suppression_is_per_list() {
        let sup = Suppressions {
            user: [key(ListId(1), "a@x.cn")].into_iter().collect(),
            bounced: HashSet::new(),
            ..Default::default()
        };
        let p = plan(
            desired(vec![want(ListId(2), "a@x.cn", LinkManId(1), "A")]),
            &Members::default(),
            &sup,
        );
        assert_eq!(p.adds.len(), 1);
    }

    #[test]
    fn bounced_address_is_unsubscribed_where_owned_and_never_added_or_edited() {
        let sup = Suppressions {
            user: HashSet::new(),
            bounced: [Email::parse("b@x.cn").unwrap()].into_iter().collect(),
            ..Default::default()
        };
        let d = desired(vec![
            want(ListId(1), "b@x.cn", LinkManId(1), "B2"),
            want(ListId(2), "b@x.cn", LinkManId(1), "B"),
            want(ListId(3), "b@x.cn", LinkManId(1), "B2"),
        ]);
        let s = state(vec![
            have(ListId(1), "b@x.cn", LinkManId(1), "B", Origin::Owned),
            have(ListId(3), "b@x.cn", LinkManId(1), "B", Origin::Adopted),
        ]);
        let p = plan(d, &s, &sup);
        assert_eq!(p.unsubs.len(), 1);
        assert_eq!(p.unsubs[0].key, key(ListId(1), "b@x.cn"));
        assert_eq!(p.unsubs[0].reason, UnsubReason::Bounce);
        assert!(p.adds.is_empty() && p.edits.is_empty());
    }

    #[test]
    fn an_unsubscribe_carries_the_reason_the_pull_gave_and_a_deleted_link_man_without_one() {
        // Arrange: two owned members nobody wants; the pull said why for
        // one of them.
        let s = state(vec![
            have(ListId(1), "old@x.cn", LinkManId(1), "A", Origin::Owned),
            have(ListId(1), "gone@x.cn", LinkManId(2), "B", Origin::Owned),
        ]);
        let d = crate::sync::desired::tests_support::departures(&[(
            key(ListId(1), "old@x.cn"),
            UnsubReason::EmailChanged,
        )]);

        // Act
        let p = plan_with(DesiredMembers::default(), &d, &s, &Suppressions::default());

        // Assert
        let reasons: Vec<(String, UnsubReason)> = p
            .unsubs
            .iter()
            .map(|u| (u.key.email.to_string(), u.reason))
            .collect();
        assert_eq!(
            reasons,
            vec![
                ("gone@x.cn".to_string(), UnsubReason::LinkmanDeleted),
                ("old@x.cn".to_string(), UnsubReason::EmailChanged),
            ]
        );
    }

    #[test]
    fn foreign_address_that_is_desired_is_adopted_not_added() {
        let d = desired(vec![want(ListId(1), "a@x.cn", LinkManId(7), "A")]);
        let (k, mut m) = have(ListId(1), "a@x.cn", LinkManId(0), "Old", Origin::Foreign);
        m.link_man_id = None;
        m.customer_id = None;
        let p = plan(d, &state(vec![(k, m)]), &Suppressions::default());
        assert!(p.adds.is_empty());
        assert_eq!(p.adoptions(), 1);
        assert_eq!(p.owner_changes[0].link_man_id, LinkManId(7));
        // Its fields are kept in step.
        assert_eq!(p.edits.len(), 1);
    }

    #[test]
    fn adopted_and_foreign_members_are_never_unsubscribed() {
        let s = state(vec![
            have(ListId(1), "a@x.cn", LinkManId(1), "A", Origin::Adopted),
            have(ListId(1), "f@x.cn", LinkManId(2), "F", Origin::Foreign),
        ]);
        let p = plan(DesiredMembers::default(), &s, &Suppressions::default());
        assert!(p.unsubs.is_empty());
    }

    #[test]
    fn owner_change_without_field_change_is_state_only() {
        let s = state(vec![have(
            ListId(1),
            "a@x.cn",
            LinkManId(5),
            "A",
            Origin::Owned,
        )]);
        let (key, mut moved) = want(ListId(1), "a@x.cn", LinkManId(3), "A");
        moved.customer_id = CustomerId(500);
        let d = desired(vec![(key, moved)]);
        let p = plan(d, &s, &Suppressions::default());
        assert_eq!(p.write_count(), 0);
        assert_eq!(p.owner_changes.len(), 1);
        assert!(!p.owner_changes[0].adopt);
    }

    #[test]
    fn ratio_above_limit_is_refused_per_list() {
        let s = state(
            (0..10)
                .map(|i| {
                    have(
                        ListId(1),
                        &format!("u{i}@x.cn"),
                        LinkManId(i),
                        "N",
                        Origin::Owned,
                    )
                })
                .chain((0..10).map(|i| {
                    have(
                        ListId(2),
                        &format!("v{i}@x.cn"),
                        LinkManId(i),
                        "N",
                        Origin::Owned,
                    )
                }))
                .collect(),
        );
        let keep: Vec<_> = (0..8)
            .map(|i| want(ListId(1), &format!("u{i}@x.cn"), LinkManId(i), "N"))
            .chain((0..10).map(|i| want(ListId(2), &format!("v{i}@x.cn"), LinkManId(i), "N")))
            .collect();
        let d = desired(keep);
        let n = d.len();
        let p = plan(d, &s, &Suppressions::default());
        let members = members_per_list(&s);
        // 2 of 10 = 0.2: at the limit, allowed.
        assert_eq!(check_safety(&p, n, &members, 0.2), Ok(()));
        // 3 of 10 in list 1 = 0.3: refused.
        let d = desired(
            (0..7)
                .map(|i| want(ListId(1), &format!("u{i}@x.cn"), LinkManId(i), "N"))
                .chain((0..10).map(|i| want(ListId(2), &format!("v{i}@x.cn"), LinkManId(i), "N")))
                .collect(),
        );
        let n = d.len();
        let p = plan(d, &s, &Suppressions::default());
        assert_eq!(
            check_safety(&p, n, &members, 0.2),
            Err(PlanRefusal::Ratio {
                list_id: ListId(1),
                unsubs: 3,
                members: 10,
                ratio: 0.2
            })
        );
    }

    #[test]
    fn a_refusal_in_words_names_the_counts_the_ratio_and_force() {
        let r = PlanRefusal::Ratio {
            list_id: ListId(1),
            unsubs: 72,
            members: 72,
            ratio: 0.2,
        };
        assert_eq!(
            r.in_words(),
            "refused: 72 of 72 members of list 1 would be unsubscribed (ratio 1.00 > 0.20); --force would apply it"
        );
        assert_eq!(
            PlanRefusal::EmptyPull {
                members: 9,
                lists: vec![(ListId(1), 9, 9)],
                ratio: 0.2
            }
            .in_words(),
            "refused: the CRM pull produced no valid member while 9 members are recorded; --force would apply it"
        );
    }

    #[test]
    fn members_wanted_as_recorded_are_desired_unchanged_and_still_suppressed() {
        // Arrange: a, b (bounced) and c (unsubscribed by its recipient)
        // are wanted as recorded; d, also recorded, is not wanted.
        let rows: Vec<MemberState> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| {
                have(
                    ListId(1),
                    &format!("{n}@x.cn"),
                    LinkManId(1),
                    n,
                    Origin::Owned,
                )
                .1
            })
            .collect();
        let mut state = Members::from_rows(rows);
        let positions = ["a", "b", "c"]
            .iter()
            .map(|n| {
                state
                    .position(&key(ListId(1), &format!("{n}@x.cn")))
                    .unwrap()
                    .0
            })
            .collect();
        let generation = state.generation();
        state
            .want_as_is(crate::domain::WantedAsIs::new(positions, generation))
            .unwrap();
        let suppressions = Suppressions {
            user: [key(ListId(1), "c@x.cn")].into_iter().collect(),
            bounced: [Email::parse("b@x.cn").unwrap()].into_iter().collect(),
            ..Default::default()
        };
        let desired = DesiredMembers::default();

        // Act
        let p = plan(desired.clone(), &state, &suppressions);
        let total = desired_total(&desired, &state);

        // Assert: only d and the bounced b are unsubscribed; the empty
        // pull check sees three wanted members, not none.
        let unsubs: Vec<&str> = p.unsubs.iter().map(|u| u.key.email.as_str()).collect();
        assert_eq!(unsubs, vec!["b@x.cn", "d@x.cn"]);
        assert_eq!(
            p.suppressed,
            vec![key(ListId(1), "b@x.cn"), key(ListId(1), "c@x.cn")]
        );
        assert!(p.adds.is_empty() && p.edits.is_empty() && p.owner_changes.is_empty());
        assert_eq!(total, 3);
        let before = members_per_list(&state);
        assert!(matches!(check_safety(&p, total, &before, 0.5), Ok(())));
        assert!(matches!(
            check_safety(&p, desired.len(), &before, 0.5),
            Err(PlanRefusal::EmptyPull { .. })
        ));
    }

    #[test]
    fn empty_pull_with_recorded_members_is_refused() {
        let s = state(vec![have(
            ListId(1),
            "a@x.cn",
            LinkManId(1),
            "A",
            Origin::Owned,
        )]);
        let p = plan(DesiredMembers::default(), &s, &Suppressions::default());
        assert_eq!(
            check_safety(&p, 0, &members_per_list(&s), 1.0),
            Err(PlanRefusal::EmptyPull {
                members: 1,
                lists: vec![(ListId(1), 1, 1)],
                ratio: 1.0
            })
        );
        // With nothing recorded an empty pull is fine.
        assert_eq!(
            check_safety(&Plan::default(), 0, &BTreeMap::new(), 0.2),
            Ok(())
        );
    }

    #[test]
    fn adopted_members_count_in_the_ratio_denominator_but_foreign_do_not() {
        let s = state(vec![
            have(ListId(1), "a@x.cn", LinkManId(1), "A", Origin::Owned),
            have(ListId(1), "b@x.cn", LinkManId(2), "B", Origin::Adopted),
            have(ListId(1), "c@x.cn", LinkManId(3), "C", Origin::Foreign),
        ]);
        assert_eq!(members_per_list(&s)[&ListId(1)], 2);
    }
}
