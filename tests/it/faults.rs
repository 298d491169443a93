//! Faults real APIs produce, and bad input: the sync converges, applies
//! nothing it should not, and says what was wrong.

use std::time::Duration;

use crate::common::{Env, applied_adds, env, seed_basic};
use crm_edm_sync::jobs::{Context, RunOptions};
use crm_edm_sync::sandbox::{Chaos, Fault, PageFault, Sandbox};
use crm_edm_sync::sync::contacts::{self, Outcome};
use crm_edm_sync::sync::plan::PlanRefusal;
use serde_json::json;

/// Forty customers, one or two link-men each, over both lists.
fn seed_forty(sb: &Sandbox) -> (Vec<String>, Vec<String>) {
    let (mut list1, mut list2) = (Vec::new(), Vec::new());
    for c in 1..=40i64 {
        let vip = c % 4 == 0;
        sb.crm.put_customer(
            c,
            json!({"name": format!("公司{c}"), "type_id": if vip { 2 } else { 1 }}),
        );
        for k in 0..(1 + c % 2) {
            let id = c * 10 + k;
            let email = format!("p{id}@example.com");
            sb.crm
                .put_linkman(c, id, json!({"name": format!("人{id}"), "email": email}));
            if vip {
                list2.push(email)
            } else {
                list1.push(email)
            }
        }
    }
    list1.sort();
    list2.sort();
    (list1, list2)
}

/// Runs the contacts job until a run applies cleanly and EDM holds
/// exactly `want`; returns how many runs it took.
async fn converge(
    ctx: &Context,
    sb: &Sandbox,
    want: &(Vec<String>, Vec<String>),
    max_runs: usize,
) -> usize {
    for n in 1..=max_runs {
        let report = contacts::run(ctx, RunOptions::default()).await;
        let clean = matches!(&report, Ok(r) if r.outcome == Outcome::Applied);
        if clean && sb.edm.emails(1) == want.0 && sb.edm.emails(2) == want.1 {
            return n;
        }
    }
    panic!(
        "no convergence in {max_runs} runs: list 1 has {:?}, list 2 has {:?}",
        sb.edm.emails(1).len(),
        sb.edm.emails(2).len()
    );
}

async fn fault_ctx(e: &Env) -> Context {
    e.ctx_from(|s| {
        s.crm.timeout = Duration::from_secs(1);
        s.edm.timeout = Duration::from_secs(1);
        s.crm.max_retries = 2;
        s.edm.max_retries = 2;
        s.edm.batch_size = 10;
    })
    .await
}

#[tokio::test]
async fn with_20pc_5xx_and_5pc_hangs_on_every_endpoint_the_sync_converges_without_duplicate_adds() {
    // Arrange
    let e = env().await;
    let want = seed_forty(&e.sb);
    let ctx = fault_ctx(&e).await;
    let chaos = Chaos {
        p_5xx: 0.20,
        p_hang: 0.05,
        hang_for: Duration::from_millis(2500),
        ..Default::default()
    };
    e.sb.chaos("*", chaos, 20261123);

    // Act
    let runs = converge(&ctx, &e.sb, &want, 25).await;

    // Assert: the faults did strike (else this proves nothing), and the
    // runs converged with every address added once.
    let struck = e.sb.requests().iter().filter(|r| r.status >= 500).count();
    assert!(struck > 0, "the chaos struck no request in {runs} runs");
    let adds = applied_adds(&e.sb);
    assert!(
        adds.values().all(|&n| n == 1),
        "an address was added twice: {adds:?}"
    );
    assert_eq!(adds.len(), want.0.len() + want.1.len());
    assert_eq!(e.ctx.store.pending_summary(1).await.unwrap().0, 0);

    // And changes under the same faults converge too.
    for c in [3i64, 5, 7] {
        e.sb.crm.remove_linkman(c * 10);
    }
    e.sb.crm.set_linkman_field(90, "name", json!("改名"));
    let mut want2 = want.clone();
    want2.0.retain(|a| {
        !["p30@example.com", "p50@example.com", "p70@example.com"].contains(&a.as_str())
    });
    converge(&ctx, &e.sb, &want2, 25).await;
    let adds = applied_adds(&e.sb);
    assert!(
        adds.values().all(|&n| n == 1),
        "an address was added twice: {adds:?}"
    );
    let renamed =
        e.sb.edm
            .addresses(1)
            .into_iter()
            .find(|a| a.address == "p90@example.com")
            .unwrap();
    assert_eq!(renamed.fullname, "改名");
}

#[tokio::test]
async fn lost_and_truncated_answers_on_every_write_converge_without_duplicate_adds() {
    let e = env().await;
    let want = seed_forty(&e.sb);
    let ctx = fault_ctx(&e).await;
    let chaos = Chaos {
        p_truncate: 0.15,
        p_lose_answer: 0.15,
        p_html: 0.05,
        ..Default::default()
    };
    for op in [
        "ml-addr-add",
        "ml-unsub",
        "ml-addr-edit",
        "ml-addr-list",
        "unsubscribe-export",
    ] {
        e.sb.chaos(op, chaos.clone(), 99);
    }

    converge(&ctx, &e.sb, &want, 25).await;

    let adds = applied_adds(&e.sb);
    assert!(
        adds.values().all(|&n| n == 1),
        "an address was added twice: {adds:?}"
    );
    assert_eq!(e.ctx.store.pending_summary(1).await.unwrap().0, 0);
}

#[tokio::test]
async fn an_empty_first_crm_page_after_a_good_sync_is_refused() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sync().await;
    e.sb.crm.page_fault(Some(PageFault::EmptyFirst));
    e.sb.clear_requests();

    let report = e.sync().await;

    assert!(
        matches!(
            report.outcome,
            Outcome::Refused(PlanRefusal::EmptyPull { .. })
        ),
        "{:?}",
        report.outcome
    );
    assert_eq!(e.sb.edm_writes(), 0);
}

#[tokio::test]
async fn a_failing_crm_page_applies_nothing_and_is_named() {
    let e = env().await;
    seed_basic(&e.sb);
    let ctx = e.ctx_from(|s| s.crm.page_size = 3).await;
    e.sb.crm.page_fault(Some(PageFault::FailOn(3)));

    let err = contacts::run(&ctx, RunOptions::default())
        .await
        .unwrap_err();

    let text = format!("{err:#}");
    assert!(text.contains("Customer/GetAllList page 3"), "{text}");
    assert!(text.contains("500"), "{text}");
    assert_eq!(e.sb.edm_writes(), 0);
}

#[tokio::test]
async fn a_crm_page_served_twice_stops_the_pull_instead_of_looping() {
    let e = env().await;
    seed_basic(&e.sb);
    let ctx = e.ctx_from(|s| s.crm.page_size = 3).await;
    e.sb.crm.page_fault(Some(PageFault::Repeat(2)));

    let err = contacts::run(&ctx, RunOptions::default())
        .await
        .unwrap_err();

    assert!(
        format!("{err:#}").contains("page 2 repeats page 1"),
        "{err:#}"
    );
    assert_eq!(e.sb.edm_writes(), 0);
}

#[tokio::test]
async fn more_pages_than_crm_max_pages_stops_the_pull() {
    let e = env().await;
    seed_basic(&e.sb);
    let ctx = e
        .ctx_from(|s| {
            s.crm.page_size = 3;
            s.crm.max_pages = 2;
        })
        .await;

    let err = contacts::run(&ctx, RunOptions::default())
        .await
        .unwrap_err();

    assert!(
        format!("{err:#}").contains("more than 2 pages (crm.max_pages)"),
        "{err:#}"
    );
}

// ---- bad input ----

#[tokio::test]
async fn malformed_xml_from_edm_is_retried_then_reported_naming_the_operation() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sb.inject(
        "unsubscribe-export",
        Fault::Body(b"<result><status>succ".to_vec()),
        3,
    );

    let err = contacts::run(&e.ctx, RunOptions::default())
        .await
        .unwrap_err();

    let text = format!("{err:#}");
    assert!(text.contains("unsubscribe-export"), "{text}");
    assert!(text.contains("unreadable answer"), "{text}");
    assert_eq!(e.sb.edm_writes(), 0);
    // Once, not three times, it would have been retried through.
    e.sb.clear_faults();
    e.sb.inject(
        "ml-addr-list",
        Fault::Body(b"<data><addr><id>1</id>".to_vec()),
        1,
    );
    let report = e.sync().await;
    assert_eq!(report.outcome, Outcome::Applied);
}

#[tokio::test]
async fn truncated_json_from_the_crm_is_retried() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sb.inject(
        "LinkMan/GetLinkManList",
        Fault::Body(br#"{"value": [{"id": 10, "email": "lm1@exa"#.to_vec()),
        2,
    );
    e.sb.inject("Customer/GetAllList", Fault::Truncate, 1);

    let report = e.sync().await;

    assert_eq!(report.outcome, Outcome::Applied);
    assert_eq!(report.counts.added, 10);
}

#[tokio::test]
async fn value_null_from_the_crm_is_a_clear_error() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sb.inject(
        "Customer/GetAllList",
        Fault::Body(br#"{"value": null}"#.to_vec()),
        1,
    );

    let err = contacts::run(&e.ctx, RunOptions::default())
        .await
        .unwrap_err();

    assert!(
        format!("{err:#}").contains("\"value\" is null instead of an array"),
        "{err:#}"
    );
}

#[tokio::test]
async fn a_customer_id_that_is_a_float_fails_the_pull_naming_the_field() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sb.crm.set_customer_field(4, "id", json!(4.5));

    let err = contacts::run(&e.ctx, RunOptions::default())
        .await
        .unwrap_err();

    let text = format!("{err:#}");
    assert!(text.contains("crm.fields.customer_id"), "{text}");
    assert!(text.contains("non-integer number 4.5"), "{text}");
    assert_eq!(e.sb.edm_writes(), 0);
}

#[tokio::test]
async fn an_edm_answer_declared_in_gbk_is_decoded() {
    let e = env().await;
    seed_basic(&e.sb);
    let (gbk, _, _) = encoding_rs::GBK.encode(
        "<?xml version=\"1.0\" encoding=\"GBK\"?>\n<data><addr><id>901</id><list_id>1</list_id><address>lm1@example.com</address><fullname>张三（旧）</fullname></addr></data>",
    );
    e.sb.inject("ml-addr-list", Fault::Body(gbk.into_owned()), 1);

    let report = e.sync().await;

    // The address that the GBK answer listed was adopted, not added.
    assert_eq!(report.counts.adopted, 1);
    assert_eq!(report.counts.added, 9);
}

#[tokio::test]
async fn an_answer_over_the_size_limit_is_refused_with_a_clear_error() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sync().await;
    let mut small = e.ctx.clone();
    small.edm = small.edm.clone().with_max_body(300);

    let err = contacts::run(
        &small,
        RunOptions {
            full: true,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();

    let text = format!("{err:#}");
    assert!(text.contains("answer larger than 300 bytes"), "{text}");
    assert!(text.contains("ml-addr-list"), "{text}");
}

#[tokio::test]
async fn nul_and_10kb_fields_are_stored_and_sent_without_breaking_the_line_format() {
    let e = env().await;
    let long = "长".repeat(3500); // 10.5 kB of UTF-8
    e.sb.crm
        .put_customer(1, json!({"name": long, "type_id": 1}));
    e.sb.crm.put_linkman(
        1,
        10,
        json!({"name": "a\u{0}b;c\td\ne", "email": "x@example.com", "mobile": "1\u{0}2"}),
    );
    e.sb.crm
        .put_linkman(1, 11, json!({"name": "next", "email": "y@example.com"}));

    let report = e.sync().await;

    assert_eq!(report.outcome, Outcome::Applied);
    let held = e.sb.edm.addresses(1);
    let x = held.iter().find(|a| a.address == "x@example.com").unwrap();
    assert_eq!(x.fullname, "a b c d e");
    assert_eq!(x.vars[0], long);
    assert_eq!(x.vars[1], "1 2");
    assert_eq!(
        held.iter()
            .find(|a| a.address == "y@example.com")
            .unwrap()
            .fullname,
        "next"
    );
    e.sb.clear_requests();
    e.sync().await;
    assert_eq!(e.sb.edm_writes(), 0, "what was stored equals what was sent");
}

#[tokio::test]
async fn a_429_with_retry_after_is_retried_no_sooner_than_asked() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sb.inject("Customer/GetAllList", Fault::TooMany(2), 1);
    let started = std::time::Instant::now();

    let report = e.sync().await;

    // A lower bound only: slower is never a failure.
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(report.outcome, Outcome::Applied);
    assert_eq!(e.sb.count("Customer/GetAllList"), 2);
}

/// `Retry-After` may be an HTTP-date (RFC 9110); it is honoured like
/// delay-seconds. The date has whole seconds, so 3 s ahead is at least 2 s.
#[tokio::test]
async fn a_429_with_an_http_date_retry_after_is_retried_no_sooner_than_that_date() {
    // Arrange
    let e = env().await;
    seed_basic(&e.sb);
    e.sb.inject("Customer/GetAllList", Fault::TooManyUntil(3), 1);
    let started = std::time::Instant::now();

    // Act
    let report = e.sync().await;

    // Assert: a lower bound only; slower is never a failure.
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(report.outcome, Outcome::Applied);
    assert_eq!(e.sb.count("Customer/GetAllList"), 2);
}

#[tokio::test]
async fn crm_max_requests_per_sec_spaces_the_requests() {
    let e = env().await;
    seed_basic(&e.sb); // 1 page + 10 link-man calls
    let limited = e.ctx_from(|s| s.crm.max_requests_per_sec = Some(4)).await;
    let started = std::time::Instant::now();

    contacts::run(&limited, RunOptions::default())
        .await
        .unwrap();

    // 11 requests at 4 a second (the first 4 at once): at least 1.5 s.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}
