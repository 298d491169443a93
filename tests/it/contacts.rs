//! The contacts job end to end: the real clients over HTTP against the
//! sandbox, a real state database (SQLite, or PostgreSQL with
//! `CRM_EDM_SYNC_TEST_DB=postgres`).

use crate::common::{emails, env, env_with, seed_basic};
use crm_edm_sync::domain::ListId;
use crm_edm_sync::jobs::RunOptions;
use crm_edm_sync::sandbox::Fault;
use crm_edm_sync::sync::contacts::{self, Outcome};
use crm_edm_sync::sync::plan::PlanRefusal;
use serde_json::json;

#[tokio::test]
async fn first_sync_puts_every_valid_linkman_into_its_routed_list() {
    // Arrange
    let e = env().await;
    seed_basic(&e.sb);
    // Act
    let report = e.sync().await;
    // Assert
    assert_eq!(report.outcome, Outcome::Applied);
    assert_eq!(e.sb.edm.emails(1), emails(1..=5));
    assert_eq!(e.sb.edm.emails(2), emails(6..=10));
    assert_eq!(report.counts.added, 10);
    let lm7 =
        e.sb.edm
            .addresses(2)
            .into_iter()
            .find(|a| a.address == "lm7@example.com")
            .unwrap();
    assert_eq!(lm7.fullname, "联系人7");
    assert_eq!(lm7.vars[0], "公司7");
    assert_eq!(lm7.vars[1], "13800000007");
    // One batched add per list, sent as a POST form, never in the URL.
    assert_eq!(e.sb.count("ml-addr-add"), 2);
    // Rule 5: each list was read once before its first add.
    assert_eq!(e.sb.count("ml-addr-list"), 2);
}

#[tokio::test]
async fn rerun_without_crm_change_makes_zero_edm_writes() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sync().await;
    e.sb.clear_requests();

    let report = e.sync().await;

    assert_eq!(report.outcome, Outcome::Applied);
    assert_eq!(e.sb.edm_writes(), 0, "{:?}", e.sb.requests());
    assert_eq!(report.counts.edm_writes, 0);
    // The lists are not read again either: only the pull and the exports.
    assert_eq!(e.sb.count("ml-addr-list"), 0);
    assert_eq!(e.sb.count("unsubscribe-export"), 2);
}

#[tokio::test]
async fn renamed_linkman_is_edited_with_fullname_and_all_ten_vars() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sync().await;
    e.sb.crm.set_linkman_field(30, "name", json!("张三丰"));
    e.sb.clear_requests();

    let report = e.sync().await;

    assert_eq!(report.counts.updated, 1);
    assert_eq!(e.sb.count("ml-addr-edit"), 1);
    assert_eq!(e.sb.count("ml-addr-add") + e.sb.count("ml-unsub"), 0);
    let edit =
        e.sb.requests()
            .into_iter()
            .find(|r| r.operation == "ml-addr-edit")
            .unwrap();
    assert_eq!(edit.params["fullname"], "张三丰");
    assert_eq!(edit.params["var1"], "公司3");
    for i in 3..=10 {
        assert_eq!(
            edit.params.get(&format!("var{i}")).map(String::as_str),
            Some(""),
            "var{i}"
        );
    }
    let held =
        e.sb.edm
            .addresses(1)
            .into_iter()
            .find(|a| a.address == "lm3@example.com")
            .unwrap();
    assert_eq!(held.fullname, "张三丰");
    // The id found for the edit is remembered: the next edit needs no lookup.
    e.sb.crm.set_linkman_field(30, "name", json!("张三"));
    e.sb.clear_requests();
    e.sync().await;
    assert_eq!(e.sb.count("ml-addr-edit"), 1);
    assert_eq!(e.sb.count("ml-addr-list"), 0);
}

#[tokio::test]
async fn deleted_linkman_is_unsubscribed_from_its_list() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sync().await;
    e.sb.crm.remove_linkman(20);

    let report = e.sync().await;

    assert_eq!(report.counts.unsubscribed, 1);
    assert_eq!(
        e.sb.edm.emails(1),
        vec![
            "lm1@example.com",
            "lm3@example.com",
            "lm4@example.com",
            "lm5@example.com"
        ]
    );
    // The daemon never deletes addresses.
    assert_eq!(e.sb.count("ml-addr-del"), 0);
}

#[tokio::test]
async fn email_change_unsubscribes_the_old_address_and_adds_the_new() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sync().await;
    e.sb.crm
        .set_linkman_field(40, "email", json!("New.Four@Example.com"));

    let report = e.sync().await;

    assert_eq!((report.counts.added, report.counts.unsubscribed), (1, 1));
    let list1 = e.sb.edm.emails(1);
    assert!(list1.contains(&"new.four@example.com".to_string()));
    assert!(!list1.contains(&"lm4@example.com".to_string()));
    // The old address got no edit: only the unsubscribe.
    assert_eq!(e.sb.count("ml-addr-edit"), 0);
}

#[tokio::test]
async fn route_change_moves_the_member_and_back_and_own_unsubscribes_are_not_suppressions() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sync().await;

    // Customer 2 becomes a VIP: its link-man moves from list 1 to list 2.
    e.sb.crm.set_customer_field(2, "type_id", json!(2));
    let moved = e.sync().await;
    assert_eq!((moved.counts.added, moved.counts.unsubscribed), (1, 1));
    assert!(!e.sb.edm.emails(1).contains(&"lm2@example.com".to_string()));
    assert!(e.sb.edm.emails(2).contains(&"lm2@example.com".to_string()));

    // And back: the daemon's own ml-unsub in list 1 shows in list 1's export,
    // but is recognised as its own, so the address may be added again.
    e.sb.crm.set_customer_field(2, "type_id", json!(1));
    let back = e.sync().await;

    assert_eq!(back.counts.user_unsubscribes, 0);
    assert_eq!(back.counts.suppressed, 0);
    assert_eq!((back.counts.added, back.counts.unsubscribed), (1, 1));
    assert_eq!(e.sb.edm.emails(1), emails(1..=5));
    assert_eq!(e.sb.edm.emails(2), emails(6..=10));
    assert_eq!(e.sb.edm.export_lines(1).len(), 1);
    // A third run changes nothing.
    e.sb.clear_requests();
    e.sync().await;
    assert_eq!(e.sb.edm_writes(), 0);
}

#[tokio::test]
async fn edm_side_unsubscribe_is_suppressed_even_for_a_new_linkman_with_that_address() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sync().await;
    e.sb.edm.user_unsubscribe(1, "lm3@example.com");

    // The CRM still has the link-man, renamed: no add, no edit.
    e.sb.crm.set_linkman_field(30, "name", json!("改名"));
    e.sb.clear_requests();
    let report = e.sync().await;
    assert_eq!(report.counts.user_unsubscribes, 1);
    assert_eq!(report.counts.suppressed, 1);
    assert_eq!(e.sb.edm_writes(), 0, "{:?}", e.sb.requests());

    // The link-man is deleted and a new one, in another customer, gets the
    // same address: still nothing, in this run and later.
    e.sb.crm.remove_linkman(30);
    e.sb.crm
        .put_linkman(4, 99, json!({"name": "新人", "email": "LM3@example.com"}));
    e.sb.clear_requests();
    e.sync().await;
    e.sync().await;
    assert_eq!(e.sb.edm_writes(), 0, "{:?}", e.sb.requests());
    assert!(!e.sb.edm.emails(1).contains(&"lm3@example.com".to_string()));
    // The suppression is per list: the same address in list 2 is added.
    e.sb.crm.put_linkman(
        6,
        98,
        json!({"name": "VIP 新人", "email": "lm3@example.com"}),
    );
    e.sync().await;
    assert!(e.sb.edm.emails(2).contains(&"lm3@example.com".to_string()));
}

#[tokio::test]
async fn preexisting_address_is_adopted_never_added_twice_nor_unsubscribed() {
    let e = env().await;
    seed_basic(&e.sb);
    let existing = e.sb.edm.add_existing(1, "LM1@example.com", "手工录入");
    e.sb.edm.add_existing(1, "someone.else@example.com", "别人");

    let report = e.sync().await;

    assert_eq!(report.counts.adopted, 1);
    assert_eq!(report.counts.added, 9);
    let held: Vec<_> =
        e.sb.edm
            .addresses(1)
            .into_iter()
            .filter(|a| a.address.eq_ignore_ascii_case("lm1@example.com"))
            .collect();
    assert_eq!(held.len(), 1, "adopted address added twice");
    // Its fields are kept in step (one edit, by its known id).
    assert_eq!(held[0].id, existing);
    assert_eq!(held[0].fullname, "联系人1");
    // Deleting the link-man does not unsubscribe an adopted address, and the
    // foreign address is left alone throughout.
    e.sb.crm.remove_linkman(10);
    e.sb.clear_requests();
    let after = e.sync().await;
    assert_eq!(after.counts.unsubscribed, 0);
    assert_eq!(e.sb.count("ml-unsub"), 0);
    assert!(
        e.sb.edm
            .emails(1)
            .contains(&"someone.else@example.com".to_string())
    );
}

#[tokio::test]
async fn address_added_by_someone_else_after_the_first_read_is_not_added_twice_when_read_fully() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sync().await;
    e.sb.edm.add_existing(1, "late@example.com", "别人加的");
    e.sb.crm.put_linkman(
        1,
        11,
        json!({"name": "后来者", "email": "late@example.com"}),
    );

    let report = e
        .run(RunOptions {
            full: true,
            ..Default::default()
        })
        .await;

    assert_eq!(report.counts.adopted, 1);
    assert_eq!(report.counts.added, 0);
    assert_eq!(
        e.sb.edm
            .emails(1)
            .iter()
            .filter(|a| *a == "late@example.com")
            .count(),
        1
    );
}

#[tokio::test]
async fn lost_add_answer_is_checked_against_the_list_before_being_sent_again() {
    let e = env().await;
    seed_basic(&e.sb);
    // The first add to each list takes effect but its answer is lost.
    e.sb.inject("ml-addr-add", Fault::LoseAnswer, 1);

    let report = e.sync().await;

    assert_eq!(report.outcome, Outcome::Applied);
    assert_eq!(report.counts.added, 10);
    assert_eq!(
        e.sb.edm.emails(1),
        emails(1..=5),
        "no duplicate, none missing"
    );
    assert_eq!(e.sb.edm.emails(2), emails(6..=10));
    // The lost batch was not re-sent: the list showed it had taken effect.
    assert_eq!(e.sb.count("ml-addr-add"), 2);
}

/// One resend policy: a batch gets `edm.max_retries + 1` requests however
/// its failures mix. Lost answers (checked, then sent again) and 429s
/// (sent again blindly) once drew on two budgets that multiplied, up to
/// (max_retries + 1)² requests for one batch.
#[tokio::test]
async fn a_batch_whose_answers_are_lost_and_throttled_in_turn_gets_max_retries_plus_one_requests() {
    // Arrange: two add batches (one per list), two repeats each, and more
    // failures than both can use: a 502 that did not take effect, then
    // two 429s, over and over.
    let e = env().await;
    seed_basic(&e.sb);
    let ctx = e.ctx_from(|s| s.edm.max_retries = 2).await;
    for _ in 0..4 {
        e.sb.inject("ml-addr-add", Fault::Status(502), 1);
        e.sb.inject("ml-addr-add", Fault::TooMany(0), 2);
    }

    // Act
    let first = contacts::run(&ctx, RunOptions::default()).await.unwrap();

    // Assert: three requests per batch, then the adds stay pending.
    assert_eq!(e.sb.count("ml-addr-add"), 6);
    assert_eq!(first.outcome, Outcome::Partial);
    assert_eq!(first.counts.failed, 10, "{:?}", first.counts);
    e.sb.clear_faults();
    let second = contacts::run(&ctx, RunOptions::default()).await.unwrap();
    assert_eq!(second.outcome, Outcome::Applied);
    assert_eq!(e.sb.edm.emails(1), emails(1..=5));
    assert_eq!(e.sb.edm.emails(2), emails(6..=10));
}

#[tokio::test]
async fn add_left_pending_by_a_failed_run_is_recovered_next_run_without_a_duplicate() {
    let e = env().await;
    seed_basic(&e.sb);
    // No retries: the lost answer leaves the operations pending, as a crash
    // between send and confirm would.
    let no_retry = e.ctx_from(|s| s.edm.max_retries = 0).await;
    e.sb.inject("ml-addr-add", Fault::LoseAnswer, 1);
    let first = contacts::run(&no_retry, RunOptions::default())
        .await
        .unwrap();
    assert_eq!(first.outcome, Outcome::Partial);
    assert!(first.counts.failed > 0);
    let (pending, _) = e.ctx.store.pending_summary(100).await.unwrap();
    assert_eq!(pending as usize, first.counts.failed);

    let second = e.sync().await;

    assert_eq!(second.outcome, Outcome::Applied);
    assert_eq!(second.counts.recovered, first.counts.failed);
    assert_eq!(e.sb.edm.emails(1), emails(1..=5));
    assert_eq!(e.sb.edm.emails(2), emails(6..=10));
    assert_eq!(e.ctx.store.pending_summary(100).await.unwrap().0, 0);
    e.sb.clear_requests();
    e.sync().await;
    assert_eq!(e.sb.edm_writes(), 0);
}

#[tokio::test]
async fn lost_unsubscribe_answer_is_checked_and_not_mistaken_for_a_user_unsubscribe() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sync().await;
    e.sb.crm.remove_linkman(50);
    e.sb.inject("ml-unsub", Fault::LoseAnswer, 1);

    let report = e.sync().await;

    assert_eq!(report.outcome, Outcome::Applied);
    assert_eq!(report.counts.unsubscribed, 1);
    assert_eq!(e.sb.count("ml-unsub"), 1, "took effect, so not re-sent");
    let next = e.sync().await;
    assert_eq!(next.counts.user_unsubscribes, 0);
}

#[tokio::test]
async fn separators_in_fields_become_spaces_and_chinese_arrives_intact() {
    let e = env().await;
    e.sb.crm
        .put_customer(1, json!({"name": "甲;乙\t公司", "type_id": 1}));
    e.sb.crm.put_linkman(1, 10, json!({"name": "欧阳;娜娜\n(市场部)\r\t", "email": "oy@example.com", "mobile": 13800138000u64}));
    e.sb.crm.put_linkman(
        1,
        11,
        json!({"name": "第二个", "email": "two@example.com", "mobile": "a;b;c"}),
    );

    e.sync().await;

    let held = e.sb.edm.addresses(1);
    let oy = held.iter().find(|a| a.address == "oy@example.com").unwrap();
    assert_eq!(oy.fullname, "欧阳 娜娜 (市场部)  ");
    assert_eq!(oy.vars[0], "甲 乙 公司");
    assert_eq!(oy.vars[1], "13800138000");
    let two = held
        .iter()
        .find(|a| a.address == "two@example.com")
        .unwrap();
    assert_eq!(two.vars[1], "a b c");
    assert_eq!(
        two.vars[2], "",
        "a separator in one field does not shift the next"
    );
    // What EDM holds equals what was planned: a rerun makes no edit.
    e.sb.clear_requests();
    e.sync().await;
    assert_eq!(e.sb.edm_writes(), 0);
}

#[tokio::test]
async fn invalid_emails_are_counted_and_never_sent() {
    let e = env().await;
    e.sb.crm.put_customer(1, json!({"name": "c", "type_id": 1}));
    let bad = [
        "no-at-sign",
        "a;b@example.com",
        "\"q\"@example.com",
        "张三@example.com",
        "a b@example.com",
        "x@localhost",
        // Non-ASCII letters whose Unicode lowercase is ASCII (Kelvin
        // sign → k, capital I with dot → i): invalid as given, never
        // folded into another, all-ASCII address.
        "\u{212A}ing@example.com",
        "\u{130}nfo@example.com",
    ];
    for (i, addr) in bad.iter().enumerate() {
        e.sb.crm
            .put_linkman(1, 100 + i as i64, json!({"name": "n", "email": addr}));
    }
    e.sb.crm
        .put_linkman(1, 200, json!({"name": "ok", "email": "ok@example.com"}));

    let report = e.sync().await;

    assert_eq!(report.counts.skipped_invalid, bad.len());
    assert_eq!(e.sb.edm.emails(1), vec!["ok@example.com"]);
    let sent: String =
        e.sb.requests()
            .iter()
            .filter(|r| r.is_edm_write())
            .map(|r| format!("{:?}", r.params))
            .collect();
    for addr in bad {
        assert!(!sent.contains(addr), "{addr} was sent");
    }
}

#[tokio::test]
async fn duplicate_emails_in_a_list_are_one_member_owned_by_the_lowest_linkman_id() {
    let e = env().await;
    e.sb.crm
        .put_customer(1, json!({"name": "c1", "type_id": 1}));
    e.sb.crm
        .put_customer(2, json!({"name": "c2", "type_id": 1}));
    e.sb.crm
        .put_linkman(2, 7, json!({"name": "低", "email": "Shared@example.com"}));
    e.sb.crm
        .put_linkman(1, 9, json!({"name": "高", "email": "shared@example.com "}));

    let report = e.sync().await;

    assert_eq!(report.counts.duplicates, 1);
    let held = e.sb.edm.addresses(1);
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].fullname, "低");
    assert_eq!(
        held[0].vars[0], "c2",
        "the owner's customer fills customer fields"
    );
}

#[tokio::test]
async fn unsubscribe_ratio_above_the_limit_refuses_the_whole_plan_unless_forced() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sync().await;
    // 2 of 5 in list 1 (0.4 > 0.2), plus an add that must not happen either.
    e.sb.crm.remove_linkman(10);
    e.sb.crm.remove_linkman(20);
    e.sb.crm
        .put_linkman(3, 31, json!({"name": "新", "email": "new@example.com"}));
    e.sb.clear_requests();

    let refused = e.sync().await;

    assert!(
        matches!(
            refused.outcome,
            Outcome::Refused(PlanRefusal::Ratio {
                list_id: ListId(1),
                unsubs: 2,
                members: 5,
                ..
            })
        ),
        "{:?}",
        refused.outcome
    );
    assert!(!refused.is_success());
    assert_eq!(e.sb.edm_writes(), 0);
    let status = crm_edm_sync::status::render(&e.ctx.store).await.unwrap();
    assert!(status.contains("contacts refused"), "{status}");

    let forced = e
        .run(RunOptions {
            force: true,
            ..Default::default()
        })
        .await;
    assert_eq!(forced.outcome, Outcome::Applied);
    assert_eq!(
        e.sb.edm.emails(1),
        vec![
            "lm3@example.com",
            "lm4@example.com",
            "lm5@example.com",
            "new@example.com"
        ]
    );
}

#[tokio::test]
async fn configured_ratio_is_honoured() {
    let e = env_with("max_unsubscribe_ratio = 0.5", "").await;
    seed_basic(&e.sb);
    e.sync().await;
    e.sb.crm.remove_linkman(10);
    e.sb.crm.remove_linkman(20);
    let report = e.sync().await;
    assert_eq!(report.outcome, Outcome::Applied);
    assert_eq!(report.counts.unsubscribed, 2);
}

#[tokio::test]
async fn empty_crm_after_a_good_sync_is_refused() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sync().await;
    for c in 1..=10 {
        e.sb.crm.remove_customer(c);
    }
    e.sb.clear_requests();

    let report = e.sync().await;

    assert!(
        matches!(
            report.outcome,
            Outcome::Refused(PlanRefusal::EmptyPull { members: 10, .. })
        ),
        "{:?}",
        report.outcome
    );
    assert_eq!(e.sb.edm_writes(), 0);
    assert_eq!(e.sb.edm.emails(1).len(), 5);
}

#[tokio::test]
async fn incomplete_crm_pull_applies_nothing() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sync().await;
    e.sb.crm.remove_linkman(10);
    e.sb.crm
        .put_linkman(2, 21, json!({"name": "x", "email": "x@example.com"}));
    // Link-man calls keep failing past the retries (2 retries → 3 attempts).
    e.sb.inject("LinkMan/GetLinkManList", Fault::Status(503), 1000);
    e.sb.clear_requests();

    let err = contacts::run(&e.ctx, RunOptions::default())
        .await
        .unwrap_err();

    let text = format!("{err:#}");
    assert!(text.contains("CRM pull did not complete"), "{text}");
    assert!(text.contains("LinkMan/GetLinkManList"), "{text}");
    assert!(text.contains("503"), "{text}");
    assert_eq!(e.sb.edm_writes(), 0);
    assert_eq!(e.sb.count("unsubscribe-export"), 0);
    let runs = e.ctx.store.recent_runs(1).await.unwrap();
    assert_eq!(
        runs[0].status,
        crm_edm_sync::stored_enums::RunStatus::Failed
    );
    // The next run, with the CRM healthy, applies the change.
    e.sb.clear_faults();
    let report = e.sync().await;
    assert_eq!((report.counts.added, report.counts.unsubscribed), (1, 1));
}

#[tokio::test]
async fn transient_crm_failures_are_retried_within_the_run() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sb.inject("Customer/GetAllList", Fault::Status(502), 1);
    e.sb.inject("LinkMan/GetLinkManList", Fault::HtmlOk, 2);

    let report = e.sync().await;

    assert_eq!(report.outcome, Outcome::Applied);
    assert_eq!(report.counts.added, 10);
}

#[tokio::test]
async fn dry_run_reports_the_plan_and_changes_nothing() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sb.edm.user_unsubscribe(2, "lm9@example.com");

    let report = e
        .run(RunOptions {
            dry_run: true,
            ..Default::default()
        })
        .await;

    let Outcome::DryRun(preview) = &report.outcome else {
        panic!("{:?}", report.outcome)
    };
    assert_eq!(preview.plan.adds.len(), 9);
    assert_eq!(preview.plan.suppressed.len(), 1);
    assert_eq!(preview.user_unsubscribes.len(), 1);
    assert_eq!(preview.refusal, None);
    assert_eq!(e.sb.edm_writes(), 0);
    // Nothing recorded: no members, no suppressions, no operations.
    assert!(e.ctx.store.load_members().await.unwrap().is_empty());
    assert!(e.ctx.store.suppression_counts().await.unwrap().is_empty());
    assert_eq!(e.ctx.store.pending_summary(10).await.unwrap().0, 0);
    let text = crm_edm_sync::once::render_plan(&report, preview);
    assert!(text.contains("9 adds"), "{text}");
    assert!(text.contains("nothing was changed"), "{text}");
    // The real run after it sees the same unsubscribe.
    let real = e.sync().await;
    assert_eq!(real.counts.added, 9);
    assert_eq!(real.counts.user_unsubscribes, 1);
}

/// Names with `&`, `<`, `>` and spaces between them go out in an add and
/// come back from `ml-addr-list` as they were sent, whether EDM writes
/// text in CDATA or with entity references: a `--full` read finds no drift
/// and makes no edit, now and on every later run.
#[tokio::test]
async fn names_with_entities_and_spaces_round_trip_through_an_add_and_a_list_read() {
    for escaped in [false, true] {
        // Arrange
        let e = env().await;
        e.sb.edm.escape_text(escaped);
        e.sb.crm
            .put_customer(1, json!({"name": "A & B <co> ", "type_id": 1}));
        e.sb.crm.put_linkman(
            1,
            10,
            json!({"name": "x & <y>", "email": "amp@example.com", "mobile": "a &  b > c"}),
        );
        e.sb.crm.put_linkman(
            1,
            11,
            json!({"name": "&lt & &amp >", "email": "lit@example.com"}),
        );
        e.sync().await;

        // Act
        e.sb.clear_requests();
        let first = e
            .run(RunOptions {
                full: true,
                ..Default::default()
            })
            .await;
        let second = e
            .run(RunOptions {
                full: true,
                ..Default::default()
            })
            .await;

        // Assert
        let names: Vec<(String, String, String)> =
            e.sb.edm
                .addresses(1)
                .into_iter()
                .map(|a| (a.address, a.fullname, a.vars[0].clone()))
                .collect();
        assert_eq!(
            names,
            vec![
                (
                    "amp@example.com".into(),
                    "x & <y>".into(),
                    "A & B <co> ".into()
                ),
                (
                    "lit@example.com".into(),
                    "&lt & &amp >".into(),
                    "A & B <co> ".into()
                ),
            ],
            "escaped: {escaped}"
        );
        assert_eq!(
            first.counts.updated, 0,
            "escaped: {escaped}: {:?}",
            first.counts
        );
        assert_eq!(second.counts.updated, 0, "escaped: {escaped}");
        assert_eq!(
            e.sb.edm_writes(),
            0,
            "escaped: {escaped}: {:?}",
            e.sb.requests()
        );
    }
}

#[tokio::test]
async fn full_resync_repairs_drift_in_the_edm_lists() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sync().await;
    let lm1 =
        e.sb.edm
            .addresses(1)
            .into_iter()
            .find(|a| a.address == "lm1@example.com")
            .unwrap();
    let lm2 =
        e.sb.edm
            .addresses(1)
            .into_iter()
            .find(|a| a.address == "lm2@example.com")
            .unwrap();
    e.sb.edm.delete_address(lm1.id);
    e.sb.edm.rename_address(lm2.id, "被人改了");
    // A normal run does not notice.
    e.sb.clear_requests();
    e.sync().await;
    assert_eq!(e.sb.edm_writes(), 0);

    let report = e
        .run(RunOptions {
            full: true,
            ..Default::default()
        })
        .await;

    assert_eq!((report.counts.added, report.counts.updated), (1, 1));
    assert_eq!(e.sb.edm.emails(1), emails(1..=5));
    let lm2 =
        e.sb.edm
            .addresses(1)
            .into_iter()
            .find(|a| a.address == "lm2@example.com")
            .unwrap();
    assert_eq!(lm2.fullname, "联系人2");
}

#[tokio::test]
async fn wrong_edm_password_stops_the_run_naming_the_credential() {
    let e = env().await;
    seed_basic(&e.sb);
    let wrong = e
        .ctx_from(|s| s.edm.password = "not-the-password".to_string().into())
        .await;

    let err = contacts::run(&wrong, RunOptions::default())
        .await
        .unwrap_err();

    let text = format!("{err:#}");
    assert!(text.contains("edm.username/edm.password"), "{text}");
    assert!(!text.contains("not-the-password"));
    assert_eq!(e.sb.edm_writes(), 0);
}

#[tokio::test]
async fn wrong_crm_token_stops_the_run_naming_the_credential() {
    let e = env().await;
    seed_basic(&e.sb);
    let wrong = e
        .ctx_from(|s| s.crm.token = "wrong-token-value".to_string().into())
        .await;

    let err = contacts::run(&wrong, RunOptions::default())
        .await
        .unwrap_err();

    let text = format!("{err:#}");
    assert!(text.contains("crm.token"), "{text}");
    assert!(!text.contains("wrong-token-value"));
    // Not retried: an auth failure is permanent.
    assert_eq!(e.sb.count("Customer/GetAllList"), 1);
}

/// One customer (list 1) with `n` link-men, `p{i}@example.com`.
async fn one_customer_with(n: i64) -> crate::common::Env {
    let e = env().await;
    e.sb.crm.put_customer(1, json!({"name": "c", "type_id": 1}));
    for i in 0..n {
        e.sb.crm.put_linkman(
            1,
            100 + i,
            json!({"name": format!("n{i}"), "email": format!("p{i}@example.com")}),
        );
    }
    e
}

#[tokio::test]
async fn batches_respect_edm_batch_size() {
    let e = one_customer_with(25).await;
    let small = e.ctx_from(|s| s.edm.batch_size = 10).await;

    let report = contacts::run(&small, RunOptions::default()).await.unwrap();

    assert_eq!(report.counts.added, 25);
    assert_eq!(e.sb.count("ml-addr-add"), 3);
    assert_eq!(e.sb.edm.emails(1).len(), 25);
}

#[tokio::test]
async fn status_shows_runs_members_and_suppressions() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sync().await;
    e.sb.edm.user_unsubscribe(1, "lm1@example.com");
    e.sync().await;

    let text = crm_edm_sync::status::render(&e.ctx.store).await.unwrap();

    assert!(text.contains("contacts succeeded"), "{text}");
    assert!(text.contains("added=10"), "{text}");
    assert!(text.contains("user_unsubscribe: 1"), "{text}");
    assert!(text.contains("pending operations: 0"), "{text}");
    assert!(text.contains("list 2: owned in list: 5"), "{text}");
}

#[tokio::test]
async fn customers_are_paged_from_one_until_a_short_page() {
    let e = env().await;
    seed_basic(&e.sb);
    let paged = e.ctx_from(|s| s.crm.page_size = 3).await;

    let report = contacts::run(&paged, RunOptions::default()).await.unwrap();

    assert_eq!(report.counts.customers, 10);
    let pages: Vec<String> =
        e.sb.requests()
            .into_iter()
            .filter(|r| r.operation == "Customer/GetAllList")
            .map(|r| format!("{}/{}", r.params["pageIndex"], r.params["pageSize"]))
            .collect();
    assert_eq!(pages, vec!["1/3", "2/3", "3/3", "4/3"]);
    // A last page that is exactly full is followed by one empty page.
    e.sb.crm.remove_customer(10);
    e.sb.clear_requests();
    contacts::run(
        &paged,
        RunOptions {
            force: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(e.sb.count("Customer/GetAllList"), 4);
}

#[tokio::test]
async fn linkman_requests_stay_within_crm_concurrency() {
    let e = env().await;
    for c in 1..=24i64 {
        e.sb.crm
            .put_customer(c, json!({"name": format!("c{c}"), "type_id": 1}));
        e.sb.crm.put_linkman(
            c,
            c * 10,
            json!({"name": "n", "email": format!("p{c}@example.com")}),
        );
    }
    e.sb.inject(
        "LinkMan/GetLinkManList",
        Fault::Delay(std::time::Duration::from_millis(40)),
        24,
    );
    let three = e.ctx_from(|s| s.crm.concurrency = 3).await;

    let report = contacts::run(&three, RunOptions::default()).await.unwrap();

    assert_eq!(report.counts.linkmen, 24);
    assert_eq!(e.sb.max_in_flight("LinkMan/GetLinkManList"), 3);
}

/// Edits are single calls; a rename touching many members keeps
/// `edm.concurrency` of them in flight (and never more), and every one
/// arrives.
#[tokio::test]
async fn edits_keep_edm_concurrency_calls_in_flight_and_no_more() {
    // Arrange: 24 members synced, then all renamed; each edit takes 40 ms.
    let e = env().await;
    for c in 1..=24i64 {
        e.sb.crm
            .put_customer(c, json!({"name": format!("c{c}"), "type_id": 1}));
        e.sb.crm.put_linkman(
            c,
            c * 10,
            json!({"name": "old", "email": format!("p{c}@example.com")}),
        );
    }
    e.sync().await;
    for c in 1..=24i64 {
        e.sb.crm
            .set_linkman_field(c * 10, "name", json!(format!("new{c}")));
    }
    e.sb.inject(
        "ml-addr-edit",
        Fault::Delay(std::time::Duration::from_millis(40)),
        24,
    );
    let four = e.ctx_from(|s| s.edm.concurrency = 4).await;

    // Act
    let report = contacts::run(&four, RunOptions::default()).await.unwrap();

    // Assert
    assert_eq!(report.counts.updated, 24);
    assert_eq!(e.sb.count("ml-addr-edit"), 24);
    assert_eq!(e.sb.max_in_flight("ml-addr-edit"), 4);
    let names: Vec<String> =
        e.sb.edm
            .addresses(1)
            .into_iter()
            .map(|a| a.fullname)
            .collect();
    assert!(names.iter().all(|n| n.starts_with("new")), "{names:?}");
}

#[tokio::test]
async fn configured_crm_field_names_and_string_ids_are_read() {
    let e = env().await;
    e.sb.crm.put_customer(
        7,
        json!({"cust_no": "7", "title": "公司七", "type_id": "1"}),
    );
    e.sb.crm.put_linkman(
        7,
        70,
        json!({"lm_no": " 70 ", "full_name": "七号", "mail": "Seven@Example.com"}),
    );
    let custom = e
        .ctx_from(|s| {
            s.crm.fields.customer_id = "cust_no".into();
            s.crm.fields.linkman_id = "lm_no".into();
            s.crm.fields.linkman_name = "full_name".into();
            s.crm.fields.linkman_email = "mail".into();
            s.sync.vars.var1 = Some("customer.title".into());
        })
        .await;

    contacts::run(&custom, RunOptions::default()).await.unwrap();

    let held = e.sb.edm.addresses(1);
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].address, "seven@example.com");
    assert_eq!(held[0].fullname, "七号");
    assert_eq!(held[0].vars[0], "公司七");
}

#[tokio::test]
async fn a_linkman_without_a_usable_id_fails_the_pull_naming_the_field() {
    let e = env().await;
    seed_basic(&e.sb);
    e.sync().await;
    e.sb.crm.set_linkman_field(30, "id", json!("abc"));
    e.sb.clear_requests();

    let err = contacts::run(&e.ctx, RunOptions::default())
        .await
        .unwrap_err();

    let text = format!("{err:#}");
    assert!(text.contains("crm.fields.linkman_id"), "{text}");
    assert!(text.contains("\"abc\""), "{text}");
    assert_eq!(e.sb.edm_writes(), 0);
}

/// One customer with 25 link-men (three add batches of ten), the first
/// `ml-addr-add` held for a second.
async fn three_batches_first_one_slow() -> crate::common::Env {
    let e = one_customer_with(25).await;
    e.sb.inject(
        "ml-addr-add",
        Fault::Delay(std::time::Duration::from_secs(1)),
        1,
    );
    e
}

#[tokio::test]
async fn the_next_batch_is_recorded_while_the_current_one_is_out() {
    // Arrange
    let e = three_batches_first_one_slow().await;
    let small = e.ctx_from(|s| s.edm.batch_size = 10).await;

    // Act: run, and read the state DB while the first batch is out.
    let job = tokio::spawn(async move { contacts::run(&small, RunOptions::default()).await });
    let mut two_batches_pending_meanwhile = false;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while !job.is_finished() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run never ended"
        );
        if e.sb.in_flight("ml-addr-add") == 1 {
            let pending = e.ctx.store.pending_operations().await.unwrap().len();
            two_batches_pending_meanwhile |= pending == 20;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let report = job.await.unwrap().unwrap();

    // Assert
    assert!(
        two_batches_pending_meanwhile,
        "the second batch was not recorded while the first was out"
    );
    assert_eq!(report.counts.added, 25);
    assert_eq!(e.sb.count("ml-addr-add"), 3);
    assert!(e.ctx.store.pending_operations().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_shutdown_takes_back_the_batch_recorded_ahead() {
    // Arrange
    let e = three_batches_first_one_slow().await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let small = e
        .ctx_from(|s| s.edm.batch_size = 10)
        .await
        .with_shutdown(shutdown.clone());

    // Act: shut down while the first batch is out and the second recorded.
    let job = tokio::spawn(async move { contacts::run(&small, RunOptions::default()).await });
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while !(e.sb.in_flight("ml-addr-add") == 1
        && e.ctx.store.pending_operations().await.unwrap().len() == 20)
    {
        assert!(!job.is_finished(), "the run ended before the check");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the state never came"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    shutdown.cancel();
    let first = job.await.unwrap().unwrap();
    let pending_after = e.ctx.store.pending_operations().await.unwrap().len();
    e.sb.clear_requests();
    let second = e.sync().await;

    // Assert: the first batch landed; the second, never sent, left nothing
    // pending, so the next run adds the rest without checking the list.
    assert_eq!(first.counts.added, 10);
    assert_eq!(pending_after, 0);
    assert_eq!(second.counts.added, 15);
    assert_eq!(e.sb.count("ml-addr-list"), 0);
    assert_eq!(e.sb.edm.emails(1).len(), 25);
}
