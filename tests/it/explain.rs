//! `explain` through the real binary: why an address is (not) in each
//! list, from the state database and, with `--live`, from the CRM and EDM
//! — changing nothing, and never printing a secret.

use std::process::Output;
use std::time::Duration;

use crate::common::{TestDb, config_text, seed_basic};
use crm_edm_sync::edm::password_md5;
use crm_edm_sync::sandbox::{EDM_PASSWORD, Sandbox, SandboxCampaign, TOKEN};

const BIN: &str = env!("CARGO_BIN_EXE_crm-edm-sync");

struct Cli {
    sb: Sandbox,
    _db: TestDb,
    dir: tempfile::TempDir,
}

/// Ten customers (6–10 routed to list 2), one link-man each, with
/// `prepare` applied to the sandbox; nothing run yet.
async fn seeded(prepare: impl FnOnce(&Sandbox)) -> Cli {
    let sb = Sandbox::start().await.unwrap();
    sb.edm.create_list(1, "客户");
    sb.edm.create_list(2, "VIP");
    seed_basic(&sb);
    prepare(&sb);
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&sb, &db.url, "", "[log]\nformat = \"json\"\n");
    std::fs::write(dir.path().join("config.toml"), text).unwrap();
    Cli { sb, _db: db, dir }
}

/// [`seeded`], then synced once.
async fn synced_after(prepare: impl FnOnce(&Sandbox)) -> Cli {
    let cli = seeded(prepare).await;
    let first = cli.run(&["--once", "--job", "contacts"]).await;
    assert!(first.status.success(), "{}", text_of(&first));
    cli
}

/// Ten customers, one link-man each, synced once.
async fn synced() -> Cli {
    synced_after(|_| {}).await
}

impl Cli {
    async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .args(args)
            .env_remove("RUST_LOG");
        tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .expect("binary finished in time")
            .expect("binary ran")
    }

    async fn explain(&self, args: &[&str]) -> String {
        let out = self.run(&[&["explain"], args].concat()).await;
        assert!(out.status.success(), "{}", text_of(&out));
        let all = text_of(&out);
        for secret in [TOKEN, EDM_PASSWORD, &password_md5(EDM_PASSWORD)] {
            assert!(!all.contains(secret), "a secret was printed: {all}");
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn text_of(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn explain_names_the_list_state_owner_route_and_operations_of_an_address() {
    let cli = synced().await;

    let text = cli.explain(&["lm1@example.com"]).await;

    assert!(text.starts_with("lm1@example.com\n"), "{text}");
    assert!(text.contains("  list 1: owned"), "{text}");
    assert!(text.contains("link-man 10 of customer 1"), "{text}");
    assert!(
        text.contains("reached by the default list (sync.list_id)"),
        "{text}"
    );
    assert!(text.contains("  list 2: not a member"), "{text}");
    assert!(
        text.contains("reached by route 1: customer.type_id = \"2\""),
        "{text}"
    );
    assert!(
        text.contains(" add list 1 done, 1 attempts, run "),
        "{text}"
    );
    assert!(text.contains("contact history: none"), "{text}");
}

#[tokio::test]
async fn explain_ends_with_the_last_entries_of_the_consent_trail() {
    // Arrange: lm1 added, then renamed in the CRM and edited.
    let cli = synced().await;
    cli.sb
        .crm
        .set_linkman_field(10, "name", serde_json::json!("改名"));
    let again = cli.run(&["--once", "--job", "contacts"]).await;
    assert!(again.status.success(), "{}", text_of(&again));

    // Act
    let text = cli.explain(&["lm1@example.com"]).await;
    let json = cli.explain(&["lm1@example.com", "--json"]).await;

    // Assert
    assert!(
        text.contains("consent trail (the last 2; `audit EMAIL` has it all):"),
        "{text}"
    );
    assert!(text.contains("list 1  added"), "{text}");
    assert!(
        text.contains("list 1  edited  link-man 10 customer 1  by crm: fullname"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json[0]["trail"][1]["event"], "edited", "{json}");
}

#[tokio::test]
async fn explain_shows_a_user_unsubscribe_as_a_suppression_with_its_source() {
    // Arrange: lm7 (list 2) unsubscribes in EDM; the next run reads it.
    let cli = synced().await;
    cli.sb.edm.user_unsubscribe(2, "lm7@example.com");
    assert!(
        cli.run(&["--once", "--job", "contacts"])
            .await
            .status
            .success()
    );

    // Act
    let text = cli.explain(&["LM7@example.com"]).await;
    let json: serde_json::Value =
        serde_json::from_str(&cli.explain(&["lm7@example.com", "--json"]).await).unwrap();

    // Assert
    assert!(text.contains("  list 2: removed"), "{text}");
    assert!(
        text.contains("suppressed: user_unsubscribe since "),
        "{text}"
    );
    let list2 = &json[0]["lists"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["list_id"] == 2)
        .unwrap()
        .clone();
    assert_eq!(list2["state"], "removed");
    assert_eq!(list2["suppression"]["reason"], "user_unsubscribe");
    assert_eq!(json[0]["address"], "lm7@example.com");
}

#[tokio::test]
async fn explain_lists_refusals_and_contact_history_records() {
    // Arrange: EDM refuses lm4; lm1 opened campaign 100; both jobs ran.
    let cli = seeded(|sb| {
        sb.edm
            .refuse_address("lm4@example.com", "add_address_error", "address refused");
        let today = crate::common::edm_today().format("%Y-%m-%d").to_string();
        sb.edm.put_campaign(SandboxCampaign {
            id: 100,
            sn: "20261120-100".into(),
            name: "促销".into(),
            list_id: 1,
            date: today.clone(),
            send_status: 3,
            track_status: 1,
            opens: vec![(
                "lm1@example.com".into(),
                2,
                format!("{today} 09:00:00"),
                format!("{today} 10:00:00"),
            )],
            ..Default::default()
        });
    })
    .await;
    cli.run(&["--once"]).await;

    // Act
    let refused = cli.explain(&["lm4@example.com"]).await;
    let opened = cli.explain(&["lm1@example.com"]).await;

    // Assert
    assert!(
        refused.contains(
            "refused by EDM: add list 1 refused in 1 runs (add_address_error address refused)"
        ),
        "{refused}"
    );
    assert!(refused.contains("  list 1: not a member"), "{refused}");
    assert!(
        opened.contains(" open campaign:100 link-man 10 customer 1: done"),
        "{opened}"
    );
}

#[tokio::test]
async fn explain_by_linkman_explains_the_addresses_it_owns() {
    let cli = synced().await;

    let text = cli.explain(&["--linkman", "30"]).await;
    let none = cli.explain(&["--linkman", "999"]).await;

    assert!(text.starts_with("lm3@example.com\n"), "{text}");
    assert!(text.contains("link-man 30 of customer 3"), "{text}");
    assert!(
        none.contains("link-man 999 owns no member in the state database"),
        "{none}"
    );
}

#[tokio::test]
async fn explain_says_why_an_invalid_address_is_never_synced() {
    let cli = synced().await;

    let text = cli.explain(&["not an@address"]).await;

    assert!(text.contains("not a valid mailbox: rule 2, "), "{text}");
}

#[tokio::test]
async fn explain_live_prints_where_the_crm_and_edm_disagree_and_changes_nothing() {
    // Arrange: lm2 deleted from EDM behind the daemon's back; link-man 30's
    // email changed in the CRM.
    let cli = synced().await;
    let lm2 = cli
        .sb
        .edm
        .addresses(1)
        .into_iter()
        .find(|a| a.address == "lm2@example.com")
        .unwrap();
    cli.sb.edm.delete_address(lm2.id);
    cli.sb
        .crm
        .set_linkman_field(30, "email", serde_json::json!("someone.else@example.com"));
    let writes = cli.sb.edm_writes();
    let status_before = cli.run(&["status", "--json"]).await.stdout;

    // Act
    let missing = cli.explain(&["lm2@example.com", "--live"]).await;
    let moved = cli.explain(&["lm3@example.com", "--live"]).await;
    let agreed = cli.explain(&["lm1@example.com", "--live"]).await;

    // Assert
    assert!(missing.contains("edm list 1: not held"), "{missing}");
    assert!(
        missing.contains("disagrees: list 1: the state database says EDM holds it; EDM does not"),
        "{missing}"
    );
    assert!(
        moved.contains("disagrees: crm: link-man 30's email is now s***@example.com"),
        "{moved}"
    );
    assert!(
        !moved.contains("someone.else@example.com"),
        "another address is masked: {moved}"
    );
    assert!(
        agreed.contains("the CRM and EDM agree with the state database"),
        "{agreed}"
    );
    assert_eq!(cli.sb.edm_writes(), writes, "explain --live writes nothing");
    let status_after = cli.run(&["status", "--json"]).await.stdout;
    assert_eq!(
        status_before, status_after,
        "the state database is unchanged"
    );
}

#[tokio::test]
async fn a_masked_address_from_a_log_line_is_explained_for_every_address_it_may_be() {
    // Arrange: lm1 and lm10 both mask to l***@example.com.
    let cli = synced().await;

    // Act
    let text = cli.explain(&["l***@example.com"]).await;
    let none = cli.explain(&["z***@example.com"]).await;

    // Assert
    assert!(text.contains("lm1@example.com\n  list 1: owned"), "{text}");
    assert!(text.contains("lm10@example.com\n"), "{text}");
    assert!(
        text.contains(
            "l***@example.com is masked (as in the logs): 10 recorded addresses match it"
        ),
        "{text}"
    );
    assert!(none.contains("0 recorded addresses match it"), "{none}");
}

#[tokio::test]
async fn a_hard_bounce_shows_in_every_synced_list_with_its_campaign_and_never_as_list_0() {
    // Arrange: campaign 300 to list 1 hard-bounces on lm1; write-back
    // suppresses it in every list.
    let cli = synced().await;
    let today = crate::common::edm_today().format("%Y-%m-%d").to_string();
    cli.sb.edm.put_campaign(SandboxCampaign {
        id: 300,
        sn: "20261120-300".into(),
        name: "退信".into(),
        list_id: 1,
        date: today,
        send_status: 3,
        track_status: 1,
        bounces: vec![("not_exist".into(), "lm1@example.com".into())],
        ..Default::default()
    });
    let wb = cli.run(&["--once", "--job", "writeback"]).await;
    assert!(wb.status.success(), "{}", text_of(&wb));

    // Act
    let text = cli.explain(&["lm1@example.com"]).await;
    let json: serde_json::Value =
        serde_json::from_str(&cli.explain(&["lm1@example.com", "--json"]).await).unwrap();

    // Assert: lists 1 and 2 (both synced) carry the bounce; no list 0.
    assert!(!text.contains("list 0"), "{text}");
    assert_eq!(
        text.matches("suppressed in every list: bounce since ")
            .count(),
        2,
        "{text}"
    );
    assert!(text.contains("(campaign 300 not_exist)"), "{text}");
    let lists = json[0]["lists"].as_array().unwrap();
    let ids: Vec<i64> = lists
        .iter()
        .map(|l| l["list_id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2]);
    for l in lists {
        assert_eq!(l["suppression"]["reason"], "bounce", "{l}");
        assert!(l["suppression"]["list_id"].is_null(), "{l}");
    }
}

#[tokio::test]
async fn every_masked_address_the_logs_print_is_answered_with_its_candidates() {
    // Arrange: an invalid email (customer 11), an address two link-men
    // share (customer 12), and an address EDM refuses to add (lm4).
    let cli = seeded(|sb| {
        sb.crm
            .put_customer(11, serde_json::json!({"name": "公司11", "type_id": 1}));
        sb.crm.put_linkman(
            11,
            110,
            serde_json::json!({"name": "无效", "email": "Not-An-Address"}),
        );
        sb.crm
            .put_customer(12, serde_json::json!({"name": "公司12", "type_id": 1}));
        for id in [120, 121] {
            sb.crm.put_linkman(
                12,
                id,
                serde_json::json!({"name": "共用", "email": "shared@example.com"}),
            );
        }
        sb.edm
            .refuse_address("lm4@example.com", "add_address_error", "address refused");
    })
    .await;
    let run = cli.run(&["--once", "--job", "contacts"]).await;
    let logs = text_of(&run);
    // The masked forms are those the log lines print.
    for masked in ["N*** (no @)", "s***@example.com", "l***@example.com"] {
        assert!(logs.contains(masked), "{masked} not in the logs: {logs}");
    }

    // Act
    let invalid = cli.explain(&["N*** (no @)"]).await;
    let shared = cli.explain(&["s***@example.com"]).await;
    let refused = cli.explain(&["l***@example.com"]).await;

    // Assert
    assert!(invalid.starts_with("Not-An-Address\n"), "{invalid}");
    assert!(
        invalid.contains("logged as invalid: the email of link-man 110 of customer 11"),
        "{invalid}"
    );
    assert!(
        invalid.contains("1 recorded addresses match it"),
        "{invalid}"
    );
    assert!(shared.starts_with("shared@example.com\n"), "{shared}");
    assert!(
        shared
            .contains("logged as shared in list 1: link-man 120 owns it; link-men 121 have it too"),
        "{shared}"
    );
    // Several candidates: lm1…lm10 are members; lm4 only a refusal.
    assert!(refused.contains("lm4@example.com\n"), "{refused}");
    assert!(
        refused.contains("refused by EDM: add list 1 refused in 1 runs"),
        "{refused}"
    );
    assert!(
        refused.contains("10 recorded addresses match it"),
        "{refused}"
    );
}

/// EDM's answers are read trimmed while the daemon sends the CRM's texts as
/// they are: a name with a space at its end is the same value in both, as
/// the sync itself judges it, and `--live` finds no disagreement.
#[tokio::test]
async fn explain_live_sets_white_space_at_either_end_of_a_value_aside() {
    // Arrange: link-man 10's name ends in a space in the CRM, and is sent
    // so; EDM answers it trimmed.
    let cli = synced_after(|sb| {
        sb.crm
            .set_linkman_field(10, "name", serde_json::json!(" 联系人1 "));
    })
    .await;

    // Act
    let text = cli.explain(&["lm1@example.com", "--live"]).await;

    // Assert
    assert!(!text.contains("differ"), "{text}");
    assert!(
        text.contains("the CRM and EDM agree with the state database"),
        "{text}"
    );
}
