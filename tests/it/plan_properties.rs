//! Properties of the whole contacts job — the real planner, apply path,
//! clients and state database, against the sandbox servers — over
//! generated CRMs, EDM lists that already hold people, and a generated
//! history of CRM edits and recipients' unsubscribes with a sync after
//! each. The expectation is computed here from the CRM alone (which
//! addresses each list should hold), never by the code under test:
//!
//! - every list holds every address its link-men route to it, except
//!   those whose recipient unsubscribed from it;
//! - a list holds nothing else but people it held before the first sync
//!   (the daemon never unsubscribes what it did not add);
//! - an address a recipient unsubscribed never comes back to that list;
//! - no list holds an address twice, and a rerun with no change writes
//!   nothing to EDM;
//! - a CRM with nobody in it is refused whole (rule 7) and writes nothing.

use std::collections::{BTreeMap, BTreeSet};

use crm_edm_sync::sandbox::Sandbox;
use crm_edm_sync::sync::contacts;
use crm_edm_sync::sync::plan::PlanRefusal;
use crm_edm_sync::sync::report::Outcome;
use proptest::prelude::*;
use serde_json::json;

use crate::common::{Env, env_with};

/// Customers 0..CUSTOMERS, link-men 0..LINKMEN, addresses from a pool of
/// POOL valid ones plus one that is not valid.
const CUSTOMERS: u8 = 4;
const LINKMEN: u8 = 8;
const POOL: u8 = 6;
const LISTS: [i64; 2] = [1, 2];

fn address(n: u8) -> String {
    if n >= POOL {
        "not-an-address".to_string()
    } else {
        format!("p{n}@example.com")
    }
}

/// One thing that happens between two syncs.
#[derive(Debug, Clone)]
enum Change {
    /// A link-man is created or edited: its customer, address and name.
    PutLinkMan {
        linkman: u8,
        customer: u8,
        email: u8,
        name: u8,
    },
    RemoveLinkMan {
        linkman: u8,
    },
    /// A customer's type changes: type 2 routes its link-men to list 2.
    Retype {
        customer: u8,
        vip: bool,
    },
    /// A recipient unsubscribes from a list (the `pick`-th address it
    /// holds, if any).
    RecipientUnsubscribes {
        second_list: bool,
        pick: u8,
    },
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (0..LINKMEN, 0..CUSTOMERS, 0..=POOL, 0u8..3).prop_map(|(linkman, customer, email, name)| {
            Change::PutLinkMan { linkman, customer, email, name }
        }),
        1 => (0..LINKMEN).prop_map(|linkman| Change::RemoveLinkMan { linkman }),
        1 => (0..CUSTOMERS, any::<bool>()).prop_map(|(customer, vip)| Change::Retype { customer, vip }),
        1 => (any::<bool>(), any::<u8>()).prop_map(|(second_list, pick)| {
            Change::RecipientUnsubscribes { second_list, pick }
        }),
    ]
}

/// The CRM as the test knows it, and what recipients did.
#[derive(Debug, Clone, Default)]
struct World {
    /// Customer → whether it is of type 2 (list 2).
    vip: BTreeMap<u8, bool>,
    /// Link-man → (customer, address number).
    linkmen: BTreeMap<u8, (u8, u8)>,
    /// (list, address) a recipient unsubscribed.
    unsubscribed: BTreeSet<(i64, String)>,
    /// (list, address) held before the first sync.
    held_before: BTreeSet<(i64, String)>,
}

impl World {
    /// What each list should hold: the valid addresses routed to it, less
    /// the ones unsubscribed from it.
    fn desired(&self) -> BTreeSet<(i64, String)> {
        self.linkmen
            .values()
            .filter(|(_, email)| *email < POOL)
            .map(|(customer, email)| {
                let list = if self.vip[customer] { 2 } else { 1 };
                (list, address(*email))
            })
            .filter(|key| !self.unsubscribed.contains(key))
            .collect()
    }

    /// Whether the CRM holds a link-man with a valid address at all.
    fn pulls_anyone(&self) -> bool {
        self.linkmen.values().any(|(_, email)| *email < POOL)
    }
}

prop_compose! {
    fn scenario()(
        vip in proptest::collection::vec(any::<bool>(), CUSTOMERS as usize),
        linkmen in proptest::collection::btree_map(0..LINKMEN, (0..CUSTOMERS, 0..=POOL), 0..7),
        held in proptest::collection::btree_set((any::<bool>(), 0..POOL), 0..4),
        changes in proptest::collection::vec(change(), 1..6),
    ) -> (World, Vec<Change>) {
        let world = World {
            vip: vip.into_iter().enumerate().map(|(c, v)| (c as u8, v)).collect(),
            linkmen,
            unsubscribed: BTreeSet::new(),
            held_before: held
                .into_iter()
                .map(|(second, e)| (if second { 2 } else { 1 }, address(e)))
                .collect(),
        };
        (world, changes)
    }
}

fn put_customer(sb: &Sandbox, customer: u8, vip: bool) {
    sb.crm.put_customer(
        i64::from(customer) + 1,
        json!({"name": format!("公司{customer}"), "type_id": if vip { 2 } else { 1 }}),
    );
}

fn put_linkman(sb: &Sandbox, linkman: u8, customer: u8, email: u8, name: u8) {
    sb.crm.put_linkman(
        i64::from(customer) + 1,
        i64::from(linkman) + 100,
        json!({"name": format!("联系人{linkman}-{name}"), "email": address(email)}),
    );
}

/// Sets the sandboxes up as `world` says.
fn seed(sb: &Sandbox, world: &World) {
    for (customer, vip) in &world.vip {
        put_customer(sb, *customer, *vip);
    }
    for (linkman, (customer, email)) in &world.linkmen {
        put_linkman(sb, *linkman, *customer, *email, 0);
    }
    for (list, addr) in &world.held_before {
        sb.edm.add_existing(*list, addr, "已有");
    }
}

/// Makes `change` happen in the sandboxes and in `world`.
fn happen(sb: &Sandbox, world: &mut World, change: &Change) {
    match change.clone() {
        Change::PutLinkMan {
            linkman,
            customer,
            email,
            name,
        } => {
            if let Some((before, _)) = world.linkmen.get(&linkman)
                && *before != customer
            {
                sb.crm.remove_linkman(i64::from(linkman) + 100);
            }
            put_linkman(sb, linkman, customer, email, name);
            world.linkmen.insert(linkman, (customer, email));
        }
        Change::RemoveLinkMan { linkman } => {
            sb.crm.remove_linkman(i64::from(linkman) + 100);
            world.linkmen.remove(&linkman);
        }
        Change::Retype { customer, vip } => {
            put_customer(sb, customer, vip);
            world.vip.insert(customer, vip);
        }
        Change::RecipientUnsubscribes { second_list, pick } => {
            let list = if second_list { 2 } else { 1 };
            let held = sb.edm.emails(list);
            if !held.is_empty() {
                let addr = held[usize::from(pick) % held.len()].clone();
                sb.edm.user_unsubscribe(list, &addr);
                world.unsubscribed.insert((list, addr));
            }
        }
    }
}

/// Every property of one sync's outcome, as a message when one fails.
fn check(sb: &Sandbox, world: &World) -> Result<(), String> {
    let desired = world.desired();
    for list in LISTS {
        let held = sb.edm.emails(list);
        let unique: BTreeSet<&String> = held.iter().collect();
        if unique.len() != held.len() {
            return Err(format!("list {list} holds an address twice: {held:?}"));
        }
        for addr in &held {
            let key = (list, addr.clone());
            if world.unsubscribed.contains(&key) {
                return Err(format!("{addr} is back in list {list} after unsubscribing"));
            }
            if !desired.contains(&key) && !world.held_before.contains(&key) {
                return Err(format!(
                    "list {list} holds {addr}, neither desired nor held before"
                ));
            }
        }
        for (_, addr) in desired.iter().filter(|(l, _)| *l == list) {
            if !unique.contains(addr) {
                return Err(format!("list {list} lacks {addr}: {held:?}"));
            }
        }
    }
    Ok(())
}

async fn sync_and_check(e: &Env, world: &World, when: &str) -> Result<(), TestCaseError> {
    e.sb.clear_requests();
    let report = contacts::run(&e.ctx, Default::default()).await.unwrap();
    if let Outcome::Refused(PlanRefusal::EmptyPull { .. }) = report.outcome {
        // Rule 7: a pull with nobody in it while members are recorded is
        // refused whole, whatever the ratio.
        prop_assert!(!world.pulls_anyone(), "{}: {:?}", when, report);
        prop_assert_eq!(e.sb.edm_writes(), 0, "{}: a refused plan wrote", when);
        return Ok(());
    }
    prop_assert!(report.outcome == Outcome::Applied, "{}: {:?}", when, report);
    check(&e.sb, world).map_err(|m| TestCaseError::fail(format!("{when}: {m}")))?;
    e.sb.clear_requests();
    let again = contacts::run(&e.ctx, Default::default()).await.unwrap();
    prop_assert_eq!(e.sb.edm_writes(), 0, "{}: a rerun wrote: {:?}", when, again);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn every_sync_reaches_what_the_crm_says_keeps_consent_and_a_rerun_writes_nothing(
        (world, changes) in scenario()
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            // Arrange: ratio 1: the generated histories may delete freely.
            let e = env_with("max_unsubscribe_ratio = 1.0", "").await;
            let mut world = world;
            seed(&e.sb, &world);

            // Act / Assert: the first sync, then one after each change.
            sync_and_check(&e, &world, "first sync").await?;
            for (i, change) in changes.iter().enumerate() {
                happen(&e.sb, &mut world, change);
                sync_and_check(&e, &world, &format!("after change {i} {change:?}")).await?;
            }
            Ok::<(), TestCaseError>(())
        })?;
    }
}
