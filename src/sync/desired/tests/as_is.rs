//! One property pins the builder's shortcut down: a pull that names the
//! members it wants exactly as recorded, instead of copying them, plans
//! exactly what a pull that copied every member plans. Whatever the pull
//! (repeated link-men, shared and invalid addresses, padded names), the
//! records (gone from EDM, adopted, foreign, another owner or text) and
//! what the read phase learns afterwards (members replaced, in two
//! rounds, as the pending checks and then the list reads replace them).

use proptest::prelude::*;

use super::*;
use crate::domain::Suppressions;
use crate::sync::plan::{desired_total, plan};

const EMAILS: [&str; 4] = ["a@x.cn", "b@x.cn", " B@x.cn", "not-an-address"];
const NAMES: [&str; 3] = ["Li", "Li ", "Wang"];

#[derive(Debug, Clone)]
struct Lm {
    id: u8,
    email: Option<usize>,
    name: usize,
}

#[derive(Debug, Clone)]
struct Cust {
    id: u8,
    vip: bool,
    name: usize,
    linkmen: Vec<Lm>,
}

fn linkman() -> impl Strategy<Value = Lm> {
    (
        1u8..8,
        proptest::option::weighted(0.9, 0..EMAILS.len()),
        0..NAMES.len(),
    )
        .prop_map(|(id, email, name)| Lm { id, email, name })
}

fn customers() -> impl Strategy<Value = Vec<Cust>> {
    let customer = (
        1u8..5,
        any::<bool>(),
        0..NAMES.len(),
        proptest::collection::vec(linkman(), 0..4),
    )
        .prop_map(|(id, vip, name, linkmen)| Cust {
            id,
            vip,
            name,
            linkmen,
        });
    proptest::collection::vec(customer, 0..5)
}

fn pull_of(customers: &[Cust]) -> CrmSnapshot {
    snapshot(
        customers
            .iter()
            .map(|c| {
                let data = json!({"id": c.id, "type_id": if c.vip { 2 } else { 1 }, "name": NAMES[c.name]});
                let linkmen = c
                    .linkmen
                    .iter()
                    .map(|l| {
                        let mut v = json!({"id": l.id, "name": NAMES[l.name]});
                        if let Some(e) = l.email {
                            v["email"] = json!(EMAILS[e]);
                        }
                        v
                    })
                    .collect();
                (data, linkmen)
            })
            .collect(),
    )
}

/// A change to one record: 0–3 none (most records are as a sync left
/// them), then gone from EDM, adopted, foreign, renamed, another
/// link-man, no customer, a name padded with a space.
fn change_record(m: &mut MemberState, code: u8) {
    match code {
        4 => m.present = false,
        5 => m.origin = Origin::Adopted,
        6 => m.origin = Origin::Foreign,
        7 => m.fields = renamed(&m.fields, "Wang"),
        8 => m.link_man_id = m.link_man_id.map(|l| LinkManId(l.0 + 1)),
        9 => m.customer_id = None,
        10 => m.fields = renamed(&m.fields, &format!("{} ", m.fields.fullname())),
        _ => {}
    }
}

/// The records a sync of `earlier` left, each changed by its code.
fn records(earlier: &[Cust], codes: &[u8]) -> Members {
    let synced = recorded_from(&desired_members(&pull_of(earlier), &rules()));
    let rows = synced
        .values()
        .cloned()
        .zip(codes.iter().chain(std::iter::repeat(&0)))
        .map(|(mut m, &code)| {
            change_record(&mut m, code);
            m
        })
        .collect();
    Members::from_rows(rows)
}

/// What the read phase learns of the `pick`-th member: a replacement
/// (the same record, gone from EDM, renamed, foreign) or a new address.
fn learn(members: &Members, pick: u8, what: u8) -> MemberState {
    let mut keys: Vec<&MemberKey> = members.values().map(|m| &m.key).collect();
    keys.sort();
    let found = keys
        .get(pick as usize % keys.len().max(1))
        .map(|k| members[*k].clone());
    let Some(mut m) = found.filter(|_| what < 4) else {
        return MemberState {
            key: key(ListId(2), "new@x.cn"),
            origin: Origin::Owned,
            present: true,
            unsubscribed: false,
            link_man_id: Some(LinkManId(3)),
            customer_id: Some(CustomerId(1)),
            edm_id: None,
            fields: MemberFields::new("New", &[""; VAR_COUNT]),
        };
    };
    match what {
        1 => m.present = false,
        2 => m.fields = renamed(&m.fields, "Wang"),
        3 => m.origin = Origin::Foreign,
        _ => {}
    }
    m
}

fn suppressions(user: &[(bool, usize)], bounced: &[usize]) -> Suppressions {
    let key_of = |&(vip, e): &(bool, usize)| {
        Email::parse(EMAILS[e])
            .ok()
            .map(|email| MemberKey::new(ListId(if vip { 2 } else { 1 }), email))
    };
    Suppressions {
        user: user.iter().filter_map(key_of).collect(),
        bounced: bounced
            .iter()
            .filter_map(|&e| Email::parse(EMAILS[e]).ok())
            .collect(),
        ..Default::default()
    }
}

proptest! {
    #[test]
    fn members_wanted_as_recorded_plan_what_copied_members_plan(
        earlier in customers(),
        now in customers(),
        keep_earlier in any::<bool>(),
        codes in proptest::collection::vec(0u8..11, 0..8),
        learnt in proptest::collection::vec((any::<u8>(), 0u8..5), 0..4),
        split in 0usize..4,
        user in proptest::collection::vec((any::<bool>(), 0..EMAILS.len()), 0..2),
        bounced in proptest::collection::vec(0..EMAILS.len(), 0..2),
    ) {
        // Arrange: the records a sync of an earlier CRM left, changed;
        // this pull is the earlier CRM again or another one.
        let recorded = records(&earlier, &codes);
        let snap = pull_of(if keep_earlier { &earlier } else { &now });
        let suppressions = suppressions(&user, &bounced);

        // Act: one pull copies every member, the other names the
        // members it wants as recorded; the read phase then replaces
        // the same members in both, in two rounds.
        let copied = desired_members(&snap, &rules());
        let named = desired_over(&snap, &rules(), &recorded);
        let (mut copied_state, mut named_state) = (recorded.clone(), recorded.clone());
        named_state.want_as_is(named.as_is.clone()).unwrap();
        let mut named_members = named.members.clone();
        for (round, learnt) in [&learnt[..split.min(learnt.len())], &learnt[split.min(learnt.len())..]].into_iter().enumerate() {
            for &(pick, what) in learnt {
                let m = learn(&copied_state, pick, what);
                copied_state.insert(m.key.clone(), m.clone());
                named_state.insert(m.key.clone(), m);
            }
            named_members.take_reopened(&mut named_state);
            prop_assert!(named_state.take_reopened().is_empty(), "round {round} left members reopened");
        }

        // Assert: the same findings, the same count, the same plan.
        prop_assert_eq!(&copied.collisions, &named.collisions);
        prop_assert_eq!(&copied.invalid, &named.invalid);
        prop_assert_eq!(&copied.repeated_linkmen, &named.repeated_linkmen);
        prop_assert_eq!(copied.without_email, named.without_email);
        prop_assert_eq!(
            desired_total(&copied.members, &copied_state),
            desired_total(&named_members, &named_state)
        );
        prop_assert_eq!(
            plan(copied.members, &copied_state, &suppressions),
            plan(named_members, &named_state, &suppressions)
        );
    }
}
