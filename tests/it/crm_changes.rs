//! A CRM edited while a pull reads it: `Customer/GetAllList` pages by
//! number, so a deletion makes a customer skip a page boundary and a
//! moved link-man can be in neither customer's read. Nobody is
//! unsubscribed for having vanished from one pull: what vanished is
//! looked at again by id first.

use std::collections::BTreeSet;

use crate::common::{Env, applied_adds, env};
use crm_edm_sync::sandbox::Sandbox;
use serde_json::json;

/// Customers `ids`, two link-men each (`10·c + 1`, `10·c + 2`, addresses
/// `a{c}@x.cn`, `b{c}@x.cn`), all in list 1.
fn seed(sb: &Sandbox, ids: impl IntoIterator<Item = i64>) {
    for c in ids {
        put(sb, c);
    }
}

fn put(sb: &Sandbox, c: i64) {
    sb.crm
        .put_customer(c, json!({"name": format!("公司{c}"), "type_id": 1}));
    for (n, prefix) in [(1, "a"), (2, "b")] {
        sb.crm.put_linkman(
            c,
            c * 10 + n,
            json!({"name": format!("联系人{c}{prefix}"), "email": format!("{prefix}{c}@x.cn")}),
        );
    }
}

/// Every address an applied `ml-unsub` named.
fn unsubscribed(sb: &Sandbox) -> BTreeSet<String> {
    sb.requests()
        .into_iter()
        .filter(|r| r.operation == "ml-unsub" && r.applied)
        .flat_map(|r| {
            r.params
                .get("address")
                .cloned()
                .unwrap_or_default()
                .split([',', '\n'])
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

async fn synced(ids: impl IntoIterator<Item = i64>) -> Env {
    let e = env().await;
    seed(&e.sb, ids);
    let first = e.sync().await;
    assert_eq!(first.counts.added, e.sb.edm.emails(1).len());
    e
}

#[tokio::test]
async fn a_customer_deleted_after_its_page_was_read_does_not_unsubscribe_the_one_that_moved_up() {
    // Arrange: 250 customers in pages of 100; customer 5 is deleted right
    // after page 1 is served, so customer 101 moves up onto page 1.
    let e = synced(1..=250).await;
    e.sb.crm
        .after("Customer/GetAllList", ("pageIndex", "1"), |crm| {
            crm.remove_customer(5)
        });

    // Act
    let during = e.sync().await;
    let after = e.sync().await;

    // Assert: customer 101 was found by id and kept; only customer 5 left.
    assert_eq!(during.counts.second_look.customers_read_late, 1);
    let gone = unsubscribed(&e.sb);
    assert!(
        !gone.contains("a101@x.cn") && !gone.contains("b101@x.cn"),
        "{gone:?}"
    );
    assert_eq!(
        gone,
        BTreeSet::from(["a5@x.cn".to_string(), "b5@x.cn".to_string()])
    );
    assert_eq!(e.sb.edm.emails(1).len(), 498);
    assert!(applied_adds(&e.sb).values().all(|&n| n == 1));
    assert_eq!(after.counts.edm_writes, 0);
}

#[tokio::test]
async fn a_customer_inserted_between_two_pages_is_read_once_and_added_next_run() {
    // Arrange: customers 2, 4, … 500; customer 3 appears right after page
    // 1 is served, pushing customer 200 (page 1's last) onto page 2.
    let e = synced((2..=500).step_by(2)).await;
    e.sb.crm
        .after("Customer/GetAllList", ("pageIndex", "1"), |crm| {
            let sb_put = |c: i64| {
                crm.put_customer(c, json!({"name": format!("公司{c}"), "type_id": 1}));
                crm.put_linkman(
                    c,
                    c * 10 + 1,
                    json!({"name": "新", "email": format!("a{c}@x.cn")}),
                );
            };
            sb_put(3);
        });

    // Act
    let during = e.sync().await;
    let after = e.sync().await;

    // Assert
    assert_eq!(during.counts.unsubscribed, 0);
    assert_eq!(during.counts.added, 0, "customer 3 is not in this pull");
    assert_eq!(after.counts.added, 1);
    assert!(unsubscribed(&e.sb).is_empty());
    assert!(applied_adds(&e.sb).values().all(|&n| n == 1));
    assert!(e.sb.edm.emails(1).contains(&"a3@x.cn".to_string()));
}

#[tokio::test]
async fn a_linkman_moved_to_a_customer_already_read_is_kept_and_not_unsubscribed() {
    // Arrange: link-man 2001 (a200@x.cn) moves from customer 200 to
    // customer 1 right after customer 1's link-men were read.
    let e = synced(1..=250).await;
    e.sb.crm
        .after("LinkMan/GetLinkManList", ("cust_id", "1"), |crm| {
            crm.put_linkman(1, 2001, json!({"name": "联系人200a", "email": "a200@x.cn"}));
        });

    // Act
    let during = e.sync().await;
    let after = e.sync().await;

    // Assert: kept during the pull, owned by customer 1 after the next.
    assert_eq!(
        during.counts.second_look.vanished_kept, 1,
        "{:?}",
        during.counts
    );
    assert_eq!(during.counts.unsubscribed, 0);
    assert_eq!(after.counts.unsubscribed + after.counts.added, 0);
    assert!(unsubscribed(&e.sb).is_empty());
    assert_eq!(e.sb.edm.emails(1).len(), 500);
    let members = e.ctx.store.load_members().await.unwrap();
    let moved = members
        .values()
        .find(|m| m.key.email.as_str() == "a200@x.cn")
        .unwrap();
    assert_eq!(moved.customer_id.map(|c| c.0), Some(1));
}

#[tokio::test]
async fn a_linkman_really_deleted_is_confirmed_gone_and_unsubscribed_in_the_same_run() {
    // Arrange
    let e = synced(1..=20).await;
    e.sb.crm.remove_linkman(71);
    e.sb.crm.remove_customer(9);

    // Act
    let run = e.sync().await;

    // Assert: one request for the link-man, one for the customer, and
    // all three members unsubscribed.
    assert_eq!(run.counts.second_look.vanished_confirmed, 3);
    assert_eq!(run.counts.unsubscribed, 3);
    assert_eq!(e.sb.count("LinkMan/GetLinkMan"), 1);
    assert_eq!(e.sb.count("Customer/Get"), 1);
    assert_eq!(
        unsubscribed(&e.sb),
        BTreeSet::from([
            "a7@x.cn".to_string(),
            "a9@x.cn".to_string(),
            "b9@x.cn".to_string()
        ])
    );
}

#[tokio::test]
async fn a_pull_where_nothing_vanished_asks_for_nothing_by_id() {
    // Arrange
    let e = synced(1..=20).await;

    // Act
    e.sync().await;

    // Assert
    assert_eq!(e.sb.count("LinkMan/GetLinkMan"), 0);
    assert_eq!(e.sb.count("Customer/Get"), 0);
}
