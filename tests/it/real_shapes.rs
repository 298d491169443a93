//! The answers real servers send, which the vendor documents never show:
//! the sandbox's real-shapes switch (`Sandbox::real_shapes`, or
//! `CRM_EDM_SYNC_SANDBOX_SHAPES=real` for every test; `.ci/run` runs the
//! contacts and write-back tests that way too) and what the daemon makes of
//! them.

use crate::common::{env, opened_today_by_p1_to};
use crm_edm_sync::jobs::RunOptions;
use crm_edm_sync::writeback;
use serde_json::json;

fn full() -> RunOptions {
    RunOptions {
        full: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn the_sandbox_in_real_shapes_answers_as_real_servers_do() {
    // Arrange
    let e = env().await;
    e.sb.real_shapes(true);
    e.sb.edm.create_list(3, "一个");
    let url = format!(
        "{}/mloperate.php?do=maillist-list&username={}&password={}",
        e.sb.edm_url,
        crm_edm_sync::sandbox::EDM_USER,
        crm_edm_sync::edm::password_md5(crm_edm_sync::sandbox::EDM_PASSWORD)
    );

    // Act
    let answer = crate::common::http_get(&url).await.unwrap();
    let headers = answer.headers().clone();
    let body = answer.text().await.unwrap();

    // Assert
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert!(headers.get("content-length").is_none(), "{headers:?}");
    assert!(body.starts_with('\u{feff}'), "{body:?}");
    assert!(body.contains("<ext_info>"), "{body}");
    assert!(body.contains("\r\n"), "{body:?}");
}

/// Padded fullname and var values read trimmed and compared trimmed, and a
/// CRM value with leading or trailing white space is sent as it is:
/// nothing looks drifted.
#[tokio::test]
async fn a_full_rerun_over_padded_answers_makes_no_write() {
    // Arrange
    let e = env().await;
    e.sb.real_shapes(true);
    e.sb.crm
        .put_customer(1, json!({"name": " 北京公司\t", "type_id": 1}));
    e.sb.crm.put_linkman(
        1,
        10,
        json!({"name": "  王小明 ", "email": "w@example.com", "mobile": " 138 "}),
    );
    e.sb.crm
        .put_linkman(1, 11, json!({"name": "李四", "email": "l@example.com"}));
    e.sync().await;

    // Act
    let first = e.run(full()).await;
    let second = e.run(full()).await;

    // Assert
    assert_eq!(first.counts.edm_writes, 0, "{:?}", first.counts);
    assert_eq!(second.counts.edm_writes, 0, "{:?}", second.counts);
    let held = e.sb.edm.addresses(1);
    let w = held.iter().find(|a| a.address == "w@example.com").unwrap();
    // Sent as the CRM has them (rule 3: only separators change).
    assert_eq!(
        (w.fullname.as_str(), w.vars[0].as_str(), w.vars[1].as_str()),
        ("  王小明 ", " 北京公司 ", " 138 ")
    );
}

/// A list of exactly one member, read whole, and a CRM link-man whose
/// optional fields are `null` amid unknown fields.
#[tokio::test]
async fn one_item_lists_and_null_crm_fields_are_read() {
    // Arrange
    let e = env().await;
    e.sb.real_shapes(true);
    e.sb.crm
        .put_customer(1, json!({"name": "甲", "type_id": 1}));
    e.sb.crm.put_linkman(
        1,
        10,
        json!({"name": null, "email": "one@example.com", "mobile": null}),
    );
    e.sb.crm.put_linkman(1, 11, json!({"name": "无邮件"}));

    // Act
    let first = e.sync().await;
    let again = e.run(full()).await;

    // Assert
    assert_eq!(first.counts.added, 1);
    assert_eq!(first.counts.without_email, 1);
    assert_eq!(again.counts.edm_writes, 0);
    assert_eq!(e.sb.edm.emails(1), ["one@example.com"]);
}

/// "No date" is `0000-00-00 00:00:00` on real servers: it is no time, not
/// the earliest one.
#[tokio::test]
async fn zero_dates_are_no_date_in_contact_history() {
    // Arrange: one campaign, opened once by p1, its times unknown.
    let e = env().await;
    e.sb.real_shapes(true);
    e.sb.crm
        .put_customer(1, json!({"name": "甲", "type_id": 1}));
    e.sb.crm
        .put_linkman(1, 10, json!({"name": "p1", "email": "p1@example.com"}));
    e.sync().await;
    e.sb.edm.put_campaign(opened_today_by_p1_to(1));

    // Act
    let report = writeback::run(&e.ctx).await.unwrap();

    // Assert
    assert_eq!(report.counts.open, 1);
    let history = e.sb.crm.history();
    assert_eq!(history.len(), 1);
    assert!(
        !history[0].content.contains("0000-00-00"),
        "{}",
        history[0].content
    );
}
