//! Properties of the pure planner over generated desired members, state and
//! suppressions: applying a plan to the state it was computed from yields
//! the desired state, and planning again gives an empty plan.

use std::collections::{BTreeMap, HashMap, HashSet};

use crm_edm_sync::domain::{CustomerId, Email, LinkManId, ListId, MemberFields, MemberKey};
use crm_edm_sync::sync::desired::DesiredMember;
use crm_edm_sync::sync::plan::{MemberState, Origin, Plan, Suppressions, plan};
use proptest::prelude::*;

fn email(i: u8) -> Email {
    Email::parse(&format!("u{i}@example.com")).unwrap()
}

fn fields(v: u8) -> MemberFields {
    MemberFields::named(&format!("name{}", v % 3))
}

/// What EDM would hold after the plan, as the state DB records it.
fn apply(
    plan: &Plan,
    mut state: HashMap<MemberKey, MemberState>,
) -> HashMap<MemberKey, MemberState> {
    for c in &plan.owner_changes {
        let m = state
            .get_mut(&c.key)
            .expect("owner change of a known member");
        m.link_man_id = Some(c.link_man_id);
        m.customer_id = Some(c.customer_id);
        if c.adopt {
            m.origin = Origin::Adopted;
        }
    }
    for u in &plan.unsubs {
        state
            .get_mut(&u.key)
            .expect("unsub of a known member")
            .present = false;
    }
    for a in &plan.adds {
        state.insert(
            a.key.clone(),
            MemberState {
                key: a.key.clone(),
                origin: Origin::Owned,
                present: true,
                link_man_id: Some(a.link_man_id),
                customer_id: Some(a.customer_id),
                edm_id: None,
                fields: a.fields.clone(),
            },
        );
    }
    for e in &plan.edits {
        let m = state.get_mut(&e.key).expect("edit of a known member");
        m.fields = e.fields.clone();
        m.link_man_id = Some(e.link_man_id);
        m.customer_id = Some(e.customer_id);
    }
    state
}

fn origin_of(n: u8) -> Origin {
    match n % 3 {
        0 => Origin::Owned,
        1 => Origin::Adopted,
        _ => Origin::Foreign,
    }
}

prop_compose! {
    fn scenario()(
        desired in proptest::collection::btree_map((1i64..=3, 0u8..20), (1i64..50, 0u8..6), 0..25),
        state in proptest::collection::btree_map((1i64..=3, 0u8..20), (1i64..50, 0u8..6, 0u8..3, any::<bool>()), 0..25),
        user in proptest::collection::btree_set((1i64..=3, 0u8..20), 0..4),
        bounced in proptest::collection::btree_set(0u8..20, 0..3),
    ) -> (BTreeMap<MemberKey, DesiredMember>, HashMap<MemberKey, MemberState>, Suppressions) {
        let desired = desired.into_iter().map(|((list, e), (lm, f))| {
            let key = MemberKey::new(ListId(list), email(e));
            (key.clone(), DesiredMember { key, link_man_id: LinkManId(lm), customer_id: CustomerId(lm * 10), fields: fields(f) })
        }).collect();
        let user_keys: HashSet<MemberKey> = user.into_iter().map(|(l, e)| MemberKey::new(ListId(l), email(e))).collect();
        let state = state.into_iter().map(|((list, e), (lm, f, o, present))| {
            let key = MemberKey::new(ListId(list), email(e));
            // A user-unsubscribed address has left the list.
            let present = present && !user_keys.contains(&key);
            (key.clone(), MemberState { key, origin: origin_of(o), present, link_man_id: Some(LinkManId(lm)), customer_id: Some(CustomerId(lm * 10)), edm_id: None, fields: fields(f) })
        }).collect();
        let sup = Suppressions { user: user_keys, bounced: bounced.into_iter().map(email).collect() };
        (desired, state, sup)
    }
}

proptest! {
    #[test]
    fn applying_a_plan_reaches_the_desired_state_and_a_second_plan_is_empty((desired, state, sup) in scenario()) {
        let first = plan(&desired, &state, &sup);
        let after = apply(&first, state.clone());

        // Every desired, unsuppressed member is held with its fields and owner.
        for (key, want) in &desired {
            let blocked = sup.user.contains(key) || sup.bounced.contains(&key.email);
            if blocked {
                continue;
            }
            let have = after.get(key).expect("desired member is recorded");
            prop_assert!(have.present);
            prop_assert_eq!(&have.fields, &want.fields);
            prop_assert_eq!(have.link_man_id, Some(want.link_man_id));
            prop_assert!(have.origin != Origin::Foreign);
        }
        // Every member the daemon owns and holds is desired and not bounced.
        for (key, have) in &after {
            if have.present && have.origin == Origin::Owned && !sup.user.contains(key) {
                prop_assert!(desired.contains_key(key), "owned member not desired: {key}");
                prop_assert!(!sup.bounced.contains(&key.email));
            }
        }
        // Adopted and foreign members are never unsubscribed.
        for u in &first.unsubs {
            prop_assert_eq!(state[&u.key].origin, Origin::Owned);
        }
        // Suppressed keys get no add or edit.
        for key in first.adds.iter().map(|a| &a.key).chain(first.edits.iter().map(|e| &e.key)) {
            prop_assert!(!sup.user.contains(key) && !sup.bounced.contains(&key.email));
        }

        let second = plan(&desired, &after, &sup);
        prop_assert!(second.is_empty(), "second plan not empty: {:?}", second);
    }
}
