//! The write-back job end to end against the sandbox: campaigns, opens,
//! clicks, bounces and unsubscribes become ContactHistory records, once.

use crate::common::{Env, env_with, seed_basic};
use crm_edm_sync::jobs::RunOptions;
use crm_edm_sync::sandbox::{ContactRecord, Fault, SandboxCampaign};
use crm_edm_sync::writeback;
use serde_json::json;

/// A date `offset_days` before today in EDM's zone (`edm.timezone`,
/// Asia/Shanghai by default), as `task-list` files campaigns.
fn today(offset_days: i64) -> String {
    (crate::common::edm_today() - chrono::Duration::days(offset_days))
        .format("%Y-%m-%d")
        .to_string()
}

fn ts(h: u32) -> String {
    format!("{} {h:02}:00:00", today(0))
}

/// Campaign 100 (list 1, done, opens and clicks): lm1 and lm2 open, a
/// stranger opens, lm1 clicks two links, lm3 bounces (not_exist), a stranger
/// bounces (user_reject), lm4 is over quota (not a hard bounce).
fn campaign_100() -> SandboxCampaign {
    SandboxCampaign {
        id: 100,
        sn: "20261120-100".into(),
        name: "双十一促销".into(),
        list_id: 1,
        date: today(1),
        send_status: 3,
        track_status: 2,
        opens: vec![
            ("lm1@example.com".into(), 3, ts(9), ts(12)),
            ("LM2@example.com".into(), 1, ts(10), ts(10)),
            ("stranger@example.com".into(), 1, ts(10), ts(10)),
        ],
        clicks: vec![
            (
                "lm1@example.com".into(),
                "https://shop.example.cn/a".into(),
                2,
                ts(9),
                ts(11),
            ),
            (
                "lm1@example.com".into(),
                "https://shop.example.cn/b".into(),
                1,
                ts(11),
                ts(11),
            ),
        ],
        bounces: vec![
            ("not_exist".into(), "lm3@example.com".into()),
            ("user_reject".into(), "nobody@example.com".into()),
            ("over_quota".into(), "lm4@example.com".into()),
        ],
    }
}

/// Campaigns the job must not read: waiting (101), outside the lookback
/// (102), and one with opens only (103, whose clicks must not be read).
fn other_campaigns() -> Vec<SandboxCampaign> {
    vec![
        SandboxCampaign {
            id: 101,
            name: "未发送".into(),
            list_id: 2,
            date: today(0),
            send_status: 1,
            track_status: 2,
            opens: vec![("lm6@example.com".into(), 1, ts(9), ts(9))],
            ..Default::default()
        },
        SandboxCampaign {
            id: 102,
            name: "很久以前".into(),
            list_id: 1,
            date: today(30),
            send_status: 3,
            track_status: 2,
            opens: vec![("lm5@example.com".into(), 1, ts(9), ts(9))],
            ..Default::default()
        },
        SandboxCampaign {
            id: 103,
            name: "只跟踪打开".into(),
            list_id: 2,
            date: today(0),
            send_status: 2,
            track_status: 1,
            opens: vec![("lm7@example.com".into(), 1, ts(9), ts(9))],
            clicks: vec![(
                "lm7@example.com".into(),
                "https://x.cn".into(),
                1,
                ts(9),
                ts(9),
            )],
            ..Default::default()
        },
    ]
}

/// A synced sandbox with the campaigns above; write-back type 5, route 3.
async fn synced() -> Env {
    let e = env_with(
        "",
        "[writeback]\ntype_id = 5\nroute_id = 3\nlookback_days = 7\n",
    )
    .await;
    seed_basic(&e.sb);
    e.sync().await;
    e.sb.edm.put_campaign(campaign_100());
    for c in other_campaigns() {
        e.sb.edm.put_campaign(c);
    }
    e
}

fn find<'a>(
    history: &'a [ContactRecord],
    link_man: i64,
    title_part: &str,
) -> Vec<&'a ContactRecord> {
    history
        .iter()
        .filter(|r| r.link_man_id == link_man && r.title.contains(title_part))
        .collect()
}

#[tokio::test]
async fn writes_one_record_per_campaign_linkman_and_kind_on_the_right_customer() {
    let e = synced().await;

    let report = writeback::run(&e.ctx).await.unwrap();

    let h = e.sb.crm.history();
    assert_eq!(h.len(), 5, "{h:#?}");
    assert_eq!(
        (
            report.counts.open,
            report.counts.click,
            report.counts.bounce,
            report.counts.unsubscribe
        ),
        (3, 1, 1, 0)
    );
    for r in &h {
        assert_eq!((r.type_id, r.route_id), (5, 3));
        assert_eq!(
            r.customer_id * 10,
            r.link_man_id,
            "record on the link-man's own customer"
        );
    }
    let open1 = find(&h, 10, "邮件打开");
    assert_eq!(open1.len(), 1);
    assert!(open1[0].title.contains("双十一促销"));
    assert!(open1[0].content.contains("3 次"), "{}", open1[0].content);
    assert!(open1[0].content.contains("20261120-100"));
    assert_eq!(find(&h, 20, "邮件打开").len(), 1);
    let click = find(&h, 10, "邮件点击");
    assert_eq!(click.len(), 1, "one record per campaign, not per click");
    assert!(click[0].content.contains("https://shop.example.cn/a"));
    assert!(click[0].content.contains("https://shop.example.cn/b"));
    let bounce = find(&h, 30, "邮件退信");
    assert_eq!(bounce.len(), 1);
    assert!(bounce[0].content.contains("邮箱不存在"));
    // Campaign 103 tracks opens only: its opens are written, its clicks not read.
    assert_eq!(find(&h, 70, "邮件打开").len(), 1);
    assert_eq!(find(&h, 70, "邮件点击").len(), 0);
}

#[tokio::test]
async fn only_sending_or_done_campaigns_in_the_lookback_are_read() {
    let e = synced().await;
    e.sb.clear_requests();

    let report = writeback::run(&e.ctx).await.unwrap();

    assert_eq!(report.counts.campaigns, 2);
    let opened: Vec<String> =
        e.sb.requests()
            .into_iter()
            .filter(|r| r.operation == "open-detail")
            .map(|r| r.params["id"].clone())
            .collect();
    assert_eq!(opened, vec!["100", "103"]);
    let clicked: Vec<String> =
        e.sb.requests()
            .into_iter()
            .filter(|r| r.operation == "click-detail")
            .map(|r| r.params["id"].clone())
            .collect();
    assert_eq!(clicked, vec!["100"]);
    // One task-list read per day of the lookback.
    assert_eq!(e.sb.count("task-list"), 7);
    assert_eq!(e.sb.edm_writes(), 0, "write-back makes no EDM writes");
}

#[tokio::test]
async fn unknown_addresses_are_counted_as_unmatched_and_skipped() {
    let e = synced().await;

    let report = writeback::run(&e.ctx).await.unwrap();

    // stranger's open, nobody's bounce.
    assert_eq!(report.counts.unmatched, 2);
    assert!(e.sb.crm.history().iter().all(|r| r.link_man_id != 0));
}

#[tokio::test]
async fn a_second_run_writes_nothing_new() {
    let e = synced().await;
    writeback::run(&e.ctx).await.unwrap();

    let again = writeback::run(&e.ctx).await.unwrap();

    assert_eq!(e.sb.crm.history().len(), 5);
    assert_eq!(again.counts.already_recorded, 5);
    assert_eq!(
        (again.counts.open, again.counts.click, again.counts.bounce),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn crm_failures_leave_exactly_those_records_pending_and_a_later_run_completes_them() {
    let e = synced().await;
    // Two definite refusals: nothing was written, nothing to retry in the run.
    e.sb.inject(
        "ContactHistory/Add",
        Fault::Body(br#"{"value": false}"#.to_vec()),
        2,
    );

    let first = writeback::run(&e.ctx).await.unwrap();

    assert_eq!(first.counts.failed, 2);
    assert_eq!(first.counts.possibly_duplicated, 0);
    assert!(!first.is_success());
    assert_eq!(e.sb.crm.history().len(), 3);
    let status = crm_edm_sync::status::render(&e.ctx.store).await.unwrap();
    assert!(
        status.contains("pending: 2") || status.matches(" pending: 1").count() == 2,
        "{status}"
    );

    let second = writeback::run(&e.ctx).await.unwrap();

    assert_eq!(second.counts.failed, 0);
    assert_eq!(second.counts.retried, 2);
    // A value:false says plainly that nothing was written.
    assert_eq!(second.counts.possibly_duplicated, 0);
    let h = e.sb.crm.history();
    assert_eq!(h.len(), 5, "{h:#?}");
    let third = writeback::run(&e.ctx).await.unwrap();
    assert_eq!(third.counts.retried, 0);
    assert_eq!(e.sb.crm.history().len(), 5);
}

/// Rule 10: an HTTP 5xx is transient, so a record answered 500 is
/// sent again in the same run (not left for the next), with the warning
/// and count of a record that may already be in the CRM.
#[tokio::test]
async fn a_record_answered_500_is_retried_within_the_run_with_a_warning() {
    // Arrange: the first call answers 500 (not carried out), twice over.
    let e = synced().await;
    e.sb.inject("ContactHistory/Add", Fault::Status(500), 2);

    // Act
    let first = writeback::run(&e.ctx).await.unwrap();

    // Assert
    assert_eq!(first.counts.failed, 0, "{:?}", first.counts);
    assert!(first.is_success());
    assert_eq!(first.counts.possibly_duplicated, 2);
    assert_eq!(e.sb.crm.history().len(), 5);
    assert_eq!(e.sb.count("ContactHistory/Add"), 7);
    let second = writeback::run(&e.ctx).await.unwrap();
    assert_eq!(second.counts.retried, 0);
    assert_eq!(e.sb.crm.history().len(), 5);
}

/// The in-run retries are bounded by `crm.max_retries`; past them the
/// record stays pending (and uncertain) for the next run.
#[tokio::test]
async fn a_record_answered_500_past_max_retries_stays_pending_for_the_next_run() {
    // Arrange: more 500s than crm.max_retries (2 in these tests) allow,
    // all for the first record (one call at a time).
    let e = synced().await;
    let ctx = e.ctx_from(|s| s.crm.concurrency = 1).await;
    let max_retries = ctx.settings.crm.max_retries;
    e.sb.inject("ContactHistory/Add", Fault::Status(500), max_retries + 1);

    // Act
    let first = writeback::run(&ctx).await.unwrap();
    let second = writeback::run(&ctx).await.unwrap();

    // Assert
    assert_eq!(first.counts.failed, 1);
    assert_eq!(first.counts.possibly_duplicated, max_retries as usize);
    assert_eq!(second.counts.retried, 1);
    assert_eq!(second.counts.possibly_duplicated, 1, "{:?}", second.counts);
    assert_eq!(second.counts.failed, 0);
    assert_eq!(e.sb.crm.history().len(), 5);
}

#[tokio::test]
async fn a_lost_answer_is_the_one_logged_case_of_a_record_written_twice() {
    let e = synced().await;
    e.sb.inject("ContactHistory/Add", Fault::LoseAnswer, 1);

    let first = writeback::run(&e.ctx).await.unwrap();
    let second = writeback::run(&e.ctx).await.unwrap();

    // Sent again in the run, with the warning.
    assert_eq!(first.counts.failed, 0);
    assert_eq!(first.counts.possibly_duplicated, 1);
    assert_eq!(second.counts.retried, 0);
    // The CRM holds that record twice and every other once.
    assert_eq!(e.sb.crm.history().len(), 6);
}

#[tokio::test]
async fn a_bounced_address_is_suppressed_and_unsubscribed_by_the_next_contacts_run() {
    let e = synced().await;

    let report = writeback::run(&e.ctx).await.unwrap();
    assert_eq!(report.counts.new_bounce_suppressions, 2);
    let contacts = e.sync().await;

    assert_eq!(contacts.counts.unsubscribed, 1);
    assert!(!e.sb.edm.emails(1).contains(&"lm3@example.com".to_string()));
    let status = crm_edm_sync::status::render(&e.ctx.store).await.unwrap();
    assert!(status.contains("bounce: 2"), "{status}");
    // Never added or edited again, whatever the CRM says.
    e.sb.crm.set_linkman_field(30, "name", json!("改名"));
    e.sb.crm
        .put_linkman(7, 71, json!({"name": "同地址", "email": "lm3@example.com"}));
    e.sb.clear_requests();
    e.sync().await;
    let writes: Vec<_> =
        e.sb.requests()
            .into_iter()
            .filter(|r| r.is_edm_write())
            .collect();
    assert!(
        writes
            .iter()
            .all(|r| !format!("{:?}", r.params).contains("lm3@")),
        "{writes:?}"
    );
    // An over-quota address is not a hard bounce.
    assert!(e.sb.edm.emails(1).contains(&"lm4@example.com".to_string()));
}

#[tokio::test]
async fn a_user_unsubscribe_gets_one_record_per_list_and_linkman() {
    let e = synced().await;
    e.sb.edm.user_unsubscribe(1, "lm5@example.com");
    // The daemon's own unsubscribe (customer 4 moves to list 2) is not one.
    e.sb.crm.set_customer_field(4, "type_id", json!(2));
    e.sync().await;

    let report = writeback::run(&e.ctx).await.unwrap();

    assert_eq!(report.counts.unsubscribe, 1);
    let h = e.sb.crm.history();
    let unsub = find(&h, 50, "邮件退订");
    assert_eq!(unsub.len(), 1, "{h:#?}");
    assert!(
        unsub[0].title.contains("客户"),
        "list named by its EDM subject: {}",
        unsub[0].title
    );
    assert_eq!(find(&h, 40, "邮件退订").len(), 0);
    let again = writeback::run(&e.ctx).await.unwrap();
    assert_eq!(again.counts.unsubscribe, 0);
}

#[tokio::test]
async fn write_back_sees_a_user_unsubscribe_before_the_contacts_job_does() {
    let e = synced().await;
    e.sb.edm.user_unsubscribe(2, "lm8@example.com");

    let report = writeback::run(&e.ctx).await.unwrap();

    assert_eq!(report.counts.new_user_unsubscribes, 1);
    assert_eq!(report.counts.unsubscribe, 1);
    // And the contacts job then treats it as the suppression it is (lm3,
    // bounced in campaign 100, is the other one).
    e.sb.crm.set_linkman_field(80, "name", json!("改名"));
    e.sb.clear_requests();
    let c = e.run(RunOptions::default()).await;
    assert_eq!(c.counts.suppressed, 2);
    let writes: Vec<_> =
        e.sb.requests()
            .into_iter()
            .filter(|r| r.is_edm_write())
            .collect();
    assert!(
        writes
            .iter()
            .all(|r| !format!("{:?}", r.params).contains("lm8@")),
        "{writes:?}"
    );
}

#[tokio::test]
async fn a_wrong_token_stops_the_job_naming_the_credential() {
    let e = synced().await;
    let wrong = e
        .ctx_from(|s| s.crm.token = "wrong-token-5678".to_string().into())
        .await;

    // The exports and campaigns are EDM reads; the first CRM call fails.
    let err = writeback::run(&wrong).await.unwrap_err();

    let text = format!("{err:#}");
    assert!(text.contains("crm.token"), "{text}");
    assert!(!text.contains("wrong-token-5678"));
    assert!(e.sb.crm.history().is_empty());
}

#[tokio::test]
async fn campaigns_are_paged_through_task_list() {
    let e = env_with("", "[writeback]\nlookback_days = 1\n").await;
    seed_basic(&e.sb);
    e.sync().await;
    for id in 1..=150 {
        e.sb.edm.put_campaign(SandboxCampaign {
            id,
            name: format!("c{id}"),
            list_id: 1,
            date: today(0),
            send_status: 3,
            track_status: 1,
            opens: if id == 150 {
                vec![("lm1@example.com".into(), 1, ts(9), ts(9))]
            } else {
                vec![]
            },
            ..Default::default()
        });
    }
    e.sb.clear_requests();

    let report = writeback::run(&e.ctx).await.unwrap();

    assert_eq!(report.counts.campaigns, 150);
    assert_eq!(e.sb.count("task-list"), 2);
    assert_eq!(
        report.counts.open, 1,
        "the campaign on the second page is read"
    );
}

#[tokio::test]
async fn configured_templates_shape_the_records() {
    let e = env_with(
        "",
        "[writeback.templates]\nopen_title = \"Opened: {campaign}\"\nopen_content = \"{name} <{email}> opened {campaign} ({sn}) {count}x between {first} and {last}\"\n",
    )
    .await;
    seed_basic(&e.sb);
    e.sync().await;
    e.sb.edm.put_campaign(campaign_100());

    writeback::run(&e.ctx).await.unwrap();

    let h = e.sb.crm.history();
    let open = h
        .iter()
        .find(|r| r.link_man_id == 10 && r.title.starts_with("Opened"))
        .unwrap();
    assert_eq!(open.title, "Opened: 双十一促销");
    assert_eq!(
        open.content,
        format!(
            "联系人1 <lm1@example.com> opened 双十一促销 (20261120-100) 3x between {} and {}",
            ts(9),
            ts(12)
        )
    );
    // Kinds without an override keep the Chinese default.
    assert!(h.iter().any(|r| r.title.starts_with("邮件点击")));
}

#[tokio::test]
async fn a_slow_record_does_not_hold_up_the_others() {
    // Arrange: five records, two calls at a time; the first call takes 3 s.
    let e = synced().await;
    let ctx = e.ctx_from(|s| s.crm.concurrency = 2).await;
    e.sb.inject(
        "ContactHistory/Add",
        Fault::Delay(std::time::Duration::from_secs(3)),
        1,
    );

    // Act: run, and watch the sandbox while the slow call is out.
    let job = tokio::spawn(async move { writeback::run(&ctx).await });
    let mut others_answered_meanwhile = false;
    while !job.is_finished() {
        // Answered calls are logged; the slow one is logged when it ends.
        // Reading the count first and the in-flight gauge second means the
        // slow call was still out when the count was taken.
        let answered = e.sb.count("ContactHistory/Add");
        if answered == 4 && e.sb.in_flight("ContactHistory/Add") == 1 {
            others_answered_meanwhile = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let report = job.await.unwrap().unwrap();

    // Assert: the window refilled around the slow call (waves of two
    // would have sent one other record while it was out).
    assert!(
        others_answered_meanwhile,
        "the other four records waited for the slow one"
    );
    assert_eq!(report.counts.failed, 0);
    assert_eq!(e.sb.crm.history().len(), 5);
    assert_eq!(e.sb.max_in_flight("ContactHistory/Add"), 2);
}

#[tokio::test]
async fn a_shutdown_mid_write_back_leaves_unsent_records_pending_and_unsuspected() {
    // Arrange: two calls at a time. Of the first two, one takes 2 s and
    // one 10 ms; the record sent after the quick one takes 2 s too.
    let e = synced().await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let ctx = e
        .ctx_from(|s| s.crm.concurrency = 2)
        .await
        .with_shutdown(shutdown.clone());
    let slow = std::time::Duration::from_secs(2);
    for delay in [slow, std::time::Duration::from_millis(10), slow] {
        e.sb.inject("ContactHistory/Add", Fault::Delay(delay), 1);
    }

    // Act: shut down once the quick call has answered.
    let job = tokio::spawn(async move { writeback::run(&ctx).await });
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while e.sb.count("ContactHistory/Add") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no contact-history call was answered within 20 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    shutdown.cancel();
    let first = job.await.unwrap().unwrap();
    let sent_before_stop = e.sb.count("ContactHistory/Add");
    let second = writeback::run(&e.ctx).await.unwrap();

    // Assert: the calls in flight were awaited and recorded (two, or three
    // when the record after the quick one went out before the stop was
    // seen); those never sent, marked ahead or not, are retried without a
    // "may be written twice" warning.
    assert!((2..=3).contains(&sent_before_stop), "{sent_before_stop}");
    assert_eq!(first.counts.failed, 0);
    assert_eq!(
        first.counts.open + first.counts.click + first.counts.bounce + first.counts.unsubscribe,
        sent_before_stop
    );
    assert_eq!(second.counts.retried, 5 - sent_before_stop);
    assert_eq!(second.counts.possibly_duplicated, 0);
    assert_eq!(e.sb.crm.history().len(), 5);
}

/// SQLite has one pooled connection. A CRM failure that arrives while the
/// ledger is being marked ahead and answers are being recorded must not
/// leave one of those writes holding the connection while the job waits
/// for the other: that stalled every database user for the pool's acquire
/// timeout and then failed the run ("pool timed out").
#[tokio::test]
async fn crm_failures_amid_ledger_writes_never_stall_the_database() {
    // Arrange: 300 link-men with an open each; one call in three answers
    // 500 and is not retried (crm.max_retries = 0), so failures arrive
    // all through the marking and recording of the ledger.
    let e = env_with("", "[writeback]\nlookback_days = 2\n").await;
    for c in 1..=300i64 {
        e.sb.crm
            .put_customer(c, json!({"name": format!("公司{c}"), "type_id": 1}));
        e.sb.crm.put_linkman(
            c,
            c * 10,
            json!({"name": format!("人{c}"), "email": format!("p{c}@example.com")}),
        );
    }
    e.sync().await;
    e.sb.edm
        .put_campaign(crate::common::opened_today_by_p1_to(300));
    e.sb.chaos(
        "ContactHistory/Add",
        crm_edm_sync::sandbox::Chaos {
            p_5xx: 0.35,
            ..Default::default()
        },
        11,
    );
    let ctx = e
        .ctx_from(|s| {
            s.crm.max_retries = 0;
            s.writeback.lookback_days = 2;
        })
        .await;

    // Act
    let started = std::time::Instant::now();
    let report = writeback::run(&ctx).await;

    // Assert
    let report = report.expect("the run ends without a database error");
    assert!(report.counts.failed > 0, "{:?}", report.counts);
    assert_eq!(
        report.counts.open + report.counts.failed,
        300,
        "{:?}",
        report.counts
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(9),
        "the run took {:?}: a database write waited for the pool",
        started.elapsed()
    );
}

/// 2026-11-29 23:30 UTC: already 07:30 on 2026-11-30 in Beijing.
fn half_past_eleven_utc_on_the_29th() -> chrono::DateTime<chrono::Utc> {
    "2026-11-29T23:30:00Z".parse().unwrap()
}

/// `edm.timezone`: a campaign sent at 07:00 Beijing time on 30 November
/// is filed by EDM under 2026-11-30. A run at 23:30 UTC on the 29th —
/// the 30th in Beijing — asks `task-list` for the 30th and finds it.
#[tokio::test]
async fn a_campaign_sent_at_seven_beijing_time_is_found_on_its_beijing_date_by_a_run_the_utc_day_before()
 {
    // Arrange: p1…p3 are members; the campaign opened by them is dated
    // 2026-11-30; the run's clock reads 23:30 UTC on the 29th; the
    // lookback is one day.
    let e = env_with("", "[writeback]\nlookback_days = 1\n").await;
    seed_basic(&e.sb);
    e.sync().await;
    e.sb.edm.put_campaign(SandboxCampaign {
        id: 7,
        name: "早安".into(),
        list_id: 1,
        date: "2026-11-30".into(),
        send_status: 3,
        track_status: 1,
        opens: (1..=3)
            .map(|c| {
                (
                    format!("lm{c}@example.com"),
                    1,
                    "2026-11-30 07:05:00".into(),
                    "2026-11-30 07:05:00".into(),
                )
            })
            .collect(),
        ..Default::default()
    });
    let ctx = e.ctx.clone().with_clock(half_past_eleven_utc_on_the_29th);

    // Act
    let report = writeback::run(&ctx).await.unwrap();

    // Assert: task-list was asked for the Beijing date, and the opens
    // were written.
    let asked: Vec<String> =
        e.sb.requests()
            .iter()
            .filter(|r| r.operation == "task-list")
            .filter_map(|r| r.params.get("date").cloned())
            .collect();
    assert_eq!(asked, ["2026-11-30"]);
    assert_eq!(report.counts.campaigns, 1);
    assert_eq!(report.counts.open, 3);
}
