//! Poison records: an address EDM refuses is isolated from its batch by
//! bisection and the rest of the batch arrives in the same run; after
//! `edm.max_attempts` runs it is parked (no longer sent), until its content
//! changes or `--retry-parked`. Contact-history records the CRM refuses are
//! parked after `crm.max_attempts` runs the same way.

use crate::common::{env, env_with};
use crm_edm_sync::jobs::{Context, RunOptions};
use crm_edm_sync::sandbox::{Fault, Sandbox};
use crm_edm_sync::sync::contacts::{self, Outcome};
use crm_edm_sync::writeback;
use serde_json::json;

/// 16 link-men of list 1, `p1@example.com` … `p16@example.com`.
fn seed_sixteen(sb: &Sandbox) {
    for c in 1..=16i64 {
        sb.crm
            .put_customer(c, json!({"name": format!("公司{c}"), "type_id": 1}));
        sb.crm.put_linkman(
            c,
            c * 10,
            json!({"name": format!("联系人{c}"), "email": format!("p{c}@example.com")}),
        );
    }
}

/// A context whose batches hold 8 addresses and which parks after two
/// refusing runs.
async fn small_batches(e: &crate::common::Env) -> Context {
    e.ctx_from(|s| {
        s.edm.batch_size = 8;
        s.edm.max_attempts = 2;
    })
    .await
}

/// The `ml-addr-add` requests that carried `address`.
fn adds_carrying(sb: &Sandbox, address: &str) -> usize {
    sb.requests()
        .iter()
        .filter(|r| r.operation == "ml-addr-add")
        .filter(|r| {
            r.params.get("ml_addr").is_some_and(|l| {
                l.lines()
                    .any(|line| line.starts_with(&format!("{address};")))
            })
        })
        .count()
}

#[tokio::test]
async fn a_refused_address_is_isolated_and_the_rest_of_its_batch_arrives_in_the_first_run() {
    // Arrange: EDM refuses any batch carrying p5.
    let e = env().await;
    seed_sixteen(&e.sb);
    e.sb.edm
        .refuse_address("p5@example.com", "add_address_error", "地址被拒绝");
    let ctx = small_batches(&e).await;

    // Act
    let report = contacts::run(&ctx, RunOptions::default()).await.unwrap();

    // Assert: the other 15 arrived; p5 is refused, with EDM's code.
    let mut expected: Vec<String> = (1..=16)
        .filter(|c| *c != 5)
        .map(|c| format!("p{c}@example.com"))
        .collect();
    expected.sort();
    assert_eq!(e.sb.edm.emails(1), expected);
    assert_eq!(report.counts.added, 15);
    assert_eq!(report.counts.refused, 1);
    assert_eq!(report.counts.failed, 1);
    assert_eq!(report.outcome, Outcome::Partial);
    // Two batches of 8: the clean one once, the poisoned one split down to
    // p5 alone: at most 2 × ceil(log2(8)) = 6 more requests.
    let adds = e.sb.count("ml-addr-add");
    assert!(adds <= 2 + 6, "{adds} add requests");
    let status = crm_edm_sync::status::render(&ctx.store).await.unwrap();
    assert!(status.contains("parked operations: 0"), "{status}");
    assert!(status.contains("pending operations: 0"), "{status}");
}

#[tokio::test]
async fn an_address_refused_in_max_attempts_runs_is_parked_and_only_retry_parked_or_a_change_sends_it()
 {
    // Arrange
    let e = env().await;
    seed_sixteen(&e.sb);
    e.sb.edm
        .refuse_address("p5@example.com", "add_address_error", "地址被拒绝");
    let ctx = small_batches(&e).await;

    // Act 1: two runs refuse it (edm.max_attempts = 2).
    let first = contacts::run(&ctx, RunOptions::default()).await.unwrap();
    let second = contacts::run(&ctx, RunOptions::default()).await.unwrap();
    e.sb.clear_requests();
    let third = contacts::run(&ctx, RunOptions::default()).await.unwrap();

    // Assert 1: refused twice, then parked: no request carries it, the
    // run succeeds and says how many it held back; status lists it.
    assert_eq!((first.counts.refused, second.counts.refused), (1, 1));
    assert_eq!(third.counts.refused, 0);
    assert_eq!(third.counts.parked, 1);
    assert_eq!(third.outcome, Outcome::Applied);
    assert_eq!(adds_carrying(&e.sb, "p5@example.com"), 0);
    assert_eq!(e.sb.count("ml-addr-add"), 0);
    let status = crm_edm_sync::status::render(&ctx.store).await.unwrap();
    assert!(status.contains("parked operations: 1"), "{status}");
    assert!(
        status.contains("add list 1 p***@example.com refused in 2 runs"),
        "{status}"
    );
    assert!(status.contains("add_address_error 地址被拒绝"), "{status}");

    // Act 2: --retry-parked, EDM still refusing: sent (and refused) again.
    let retried = contacts::run(
        &ctx,
        RunOptions {
            retry_parked: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(retried.counts.refused, 1);
    assert_eq!(adds_carrying(&e.sb, "p5@example.com"), 1);

    // Act 3: its content changes (the link-man is renamed): sent again
    // without --retry-parked, and EDM now takes it.
    e.sb.edm.accept_address("p5@example.com");
    e.sb.crm.set_linkman_field(50, "name", json!("新名字"));
    let changed = contacts::run(&ctx, RunOptions::default()).await.unwrap();

    // Assert 3: it arrived and the refusal is forgotten.
    assert_eq!(changed.counts.added, 1);
    assert!(e.sb.edm.emails(1).contains(&"p5@example.com".to_string()));
    let status = crm_edm_sync::status::render(&ctx.store).await.unwrap();
    assert!(status.contains("parked operations: 0"), "{status}");
}

#[tokio::test]
async fn a_contact_history_record_refused_in_max_attempts_runs_is_parked_until_retry_parked() {
    // Arrange: p1…p3 synced and opened a campaign; the CRM refuses every
    // record (value:false) for two runs.
    let e = env_with("", "[writeback]\nlookback_days = 7\n").await;
    for c in 1..=3i64 {
        e.sb.crm
            .put_customer(c, json!({"name": format!("公司{c}"), "type_id": 1}));
        e.sb.crm.put_linkman(
            c,
            c * 10,
            json!({"name": format!("联系人{c}"), "email": format!("p{c}@example.com")}),
        );
    }
    e.sync().await;
    e.sb.edm
        .put_campaign(crate::common::opened_today_by_p1_to(3));
    let ctx = e
        .ctx_from(|s| {
            s.crm.max_attempts = 2;
            s.writeback.lookback_days = 7;
        })
        .await;
    let refuse = || {
        e.sb.inject(
            "ContactHistory/Add",
            Fault::Body(br#"{"value": false}"#.to_vec()),
            3,
        )
    };

    // Act 1: refused in two runs.
    refuse();
    let first = writeback::run(&ctx).await.unwrap();
    refuse();
    let second = writeback::run(&ctx).await.unwrap();
    e.sb.clear_requests();
    let third = writeback::run(&ctx).await.unwrap();

    // Assert 1: parked after the second; the third sends nothing.
    assert_eq!((first.counts.failed, first.counts.parked), (3, 0));
    assert_eq!((second.counts.failed, second.counts.parked), (3, 3));
    assert_eq!(e.sb.count("ContactHistory/Add"), 0);
    assert!(third.is_success());
    assert!(e.sb.crm.history().is_empty());
    let status = crm_edm_sync::status::render(&ctx.store).await.unwrap();
    assert!(
        status.contains("parked contact-history records: 3"),
        "{status}"
    );

    // Act 2: --retry-parked.
    let retried = writeback::run_with(&ctx, true).await.unwrap();

    // Assert 2: sent and written.
    assert!(retried.is_success());
    assert_eq!(e.sb.crm.history().len(), 3);
    let status = crm_edm_sync::status::render(&ctx.store).await.unwrap();
    assert!(
        status.contains("parked contact-history records: 0"),
        "{status}"
    );
}
