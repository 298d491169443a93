//! `crm-edm-sync demo`: the sandbox CRM and EDM on loopback, a temporary
//! SQLite state DB, and three contacts runs — a first sync, an unchanged
//! rerun (zero EDM writes), and a run after the CRM and EDM changed — with
//! what each run did printed to stdout.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;

use crate::config::Settings;
use crate::jobs::{Context, RunOptions};
use crate::sandbox::{Sandbox, SandboxCampaign};
use crate::sync::contacts::{self, ContactsReport};

const COMPANIES: [&str; 12] = [
    "北京华信科技有限公司",
    "上海浦江贸易有限公司",
    "广州南方电子有限公司",
    "深圳前海物流有限公司",
    "杭州西湖软件有限公司",
    "成都天府食品有限公司",
    "武汉长江机械有限公司",
    "南京金陵医药有限公司",
    "西安古城文化传媒有限公司",
    "重庆山城建材有限公司",
    "苏州园林设计有限公司",
    "天津港湾船务有限公司",
];
const SURNAMES: [&str; 10] = ["王", "李", "张", "刘", "陈", "杨", "赵", "黄", "周", "吴"];
const CITIES: [&str; 3] = ["北京", "上海", "广州"];
const GIVEN: [&str; 10] = ["伟", "芳", "娜", "敏", "静", "磊", "洋", "艳", "勇", "军"];

/// Seeds the demo data set: 36 customers (every third one a VIP, routed to
/// list 2), 1–3 link-men each, with Chinese names, a few invalid emails,
/// two link-men sharing an address, a name with `;` and a newline, and one
/// address already in EDM list 1 before the first sync (it is adopted).
pub(crate) fn seed(sb: &Sandbox) {
    sb.edm.create_list(1, "客户联系人");
    sb.edm.create_list(2, "VIP 客户");
    let mut lm_id = 1000;
    for c in 1..=36i64 {
        let vip = c % 3 == 0;
        sb.crm.put_customer(
            c,
            json!({
                "name": format!("{}{}", COMPANIES[(c as usize) % COMPANIES.len()], c),
                "type_id": if vip { 2 } else { 1 },
                "city": CITIES[(c as usize) % 3],
            }),
        );
        for k in 0..(1 + c % 3) {
            lm_id += 1;
            let name = format!(
                "{}{}",
                SURNAMES[(lm_id as usize) % SURNAMES.len()],
                GIVEN[(lm_id as usize / 10) % GIVEN.len()]
            );
            sb.crm.put_linkman(
                c,
                lm_id,
                json!({
                    "name": name,
                    "email": format!("contact{lm_id}@customer{c}.example.cn"),
                    "mobile": format!("1380013{:04}", lm_id),
                    "position": if k == 0 { "总经理" } else { "采购" },
                }),
            );
        }
    }
    // Invalid addresses: counted and skipped, never sent.
    sb.crm
        .put_linkman(4, 2001, json!({"name": "赵六", "email": "赵六@例子.中国"}));
    sb.crm.put_linkman(
        5,
        2002,
        json!({"name": "钱七", "email": "qianqi at example.cn"}),
    );
    sb.crm.put_linkman(
        7,
        2003,
        json!({"name": "孙八", "email": "sun;ba@example.cn"}),
    );
    // Two link-men of one company share an address: one member, owned by
    // the lower id.
    sb.crm.put_linkman(
        8,
        2004,
        json!({"name": "前台", "email": "info@customer8.example.cn"}),
    );
    sb.crm.put_linkman(
        8,
        2005,
        json!({"name": "前台（备用）", "email": "INFO@customer8.example.cn "}),
    );
    // Separators in a name become spaces.
    sb.crm.put_linkman(
        10,
        2006,
        json!({"name": "欧阳;娜娜\n(市场部)", "email": "ouyang@customer10.example.cn"}),
    );
    // Already in EDM before the daemon's first add: adopted, not re-added.
    sb.edm
        .add_existing(1, "contact1001@customer1.example.cn", "王伟（手工录入）");
}

/// Two campaigns sent yesterday: one to list 1 with opens (one by an
/// address the CRM does not know), clicks, a hard bounce (customer 4's
/// link-man, who has since moved to the VIP list) and an over-quota
/// address; one to the VIP list with opens only.
pub(crate) fn seed_campaigns(sb: &Sandbox) {
    let day = (crate::writeback::edm_today(chrono::Utc::now(), chrono_tz::Asia::Shanghai)
        - chrono::Duration::days(1))
    .format("%Y-%m-%d")
    .to_string();
    let at = |h: u32, m: u32| format!("{day} {h:02}:{m:02}:00");
    let addr = |lm: i64, c: i64| format!("contact{lm}@customer{c}.example.cn");
    sb.edm.put_campaign(SandboxCampaign {
        id: 501,
        sn: format!("{}-501", day.replace('-', "")),
        name: "年终答谢 · 新品发布会邀请".into(),
        list_id: 1,
        date: day.clone(),
        send_status: 3,
        track_status: 2,
        opens: vec![
            (addr(1001, 1), 3, at(9, 12), at(15, 40)),
            (addr(1005, 2), 1, at(10, 3), at(10, 3)),
            (addr(1011, 5), 2, at(11, 30), at(18, 2)),
            (
                "someone.forwarded@gmail.example".into(),
                1,
                at(12, 0),
                at(12, 0),
            ),
        ],
        clicks: vec![
            (
                addr(1001, 1),
                "https://www.example.cn/launch?utm=edm".into(),
                2,
                at(9, 13),
                at(15, 41),
            ),
            (
                addr(1001, 1),
                "https://www.example.cn/rsvp".into(),
                1,
                at(9, 15),
                at(9, 15),
            ),
        ],
        bounces: vec![
            ("not_exist".into(), addr(1008, 4)),
            ("over_quota".into(), addr(1013, 7)),
        ],
    });
    sb.edm.put_campaign(SandboxCampaign {
        id: 502,
        sn: format!("{}-502", day.replace('-', "")),
        name: "VIP 专享活动".into(),
        list_id: 2,
        date: day.clone(),
        send_status: 2,
        track_status: 1,
        opens: vec![(addr(1006, 3), 1, at(8, 0), at(8, 0))],
        ..Default::default()
    });
}

/// The config the demo uses for `sb`.
pub(crate) fn settings(sb: &Sandbox, database_url: &str) -> anyhow::Result<Settings> {
    let text = format!(
        "{}\n[sync]\nlist_id = 1\n[[sync.routes]]\nfield = \"customer.type_id\"\nequals = \"2\"\nlist_id = 2\n[sync.vars]\nvar1 = \"customer.name\"\nvar2 = \"mobile\"\nvar3 = \"customer.city\"\n[log]\nformat = \"pretty\"\n",
        sb.config_toml(database_url)
    );
    Ok(Settings::from_toml(&text)?)
}

fn describe(title: &str, report: &ContactsReport, writes: usize) -> String {
    let c = &report.counts;
    format!(
        "{title}\n  {} customers, {} link-men → {} desired members\n  added {}, updated {}, unsubscribed {}, adopted {}, skipped_invalid {}, suppressed {}, failed {}, duplicates {}\n  EDM write requests: {writes}   ({} ms, {})\n",
        c.customers,
        c.linkmen,
        c.desired,
        c.added,
        c.updated,
        c.unsubscribed,
        c.adopted,
        c.skipped_invalid,
        c.suppressed,
        c.failed,
        c.duplicates,
        report.duration_ms,
        if report.is_success() { "ok" } else { "FAILED" }
    )
}

/// Runs the demo and prints its report.
pub(crate) async fn run() -> anyhow::Result<ExitCode> {
    let sb = Sandbox::start().await?;
    seed(&sb);
    let dir = tempfile::tempdir()?;
    let db = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("demo-state.db").display()
    );
    let ctx = Context::new(settings(&sb, &db)?)
        .await?
        .with_min_retry_delay(Duration::from_millis(20));
    println!(
        "crm-edm-sync demo: sandbox CRM at {}, EDM at {}",
        sb.crm_url, sb.edm_url
    );
    println!(
        "state database: {}\n",
        dir.path().join("demo-state.db").display()
    );

    let mut ok = contacts_step(&ctx, &sb, "run 1 — first sync").await?;
    ok &= contacts_step(&ctx, &sb, "run 2 — CRM unchanged").await?;
    let second_writes = sb.edm_writes();
    change_both_sides(&sb);
    ok &= contacts_step(&ctx, &sb, "run 3 — after the changes").await?;
    ok &= writeback_step(&ctx, &sb).await?;
    ok &= contacts_step(
        &ctx,
        &sb,
        "run 5 — contacts after write-back (the bounced address leaves its list)",
    )
    .await?;

    println!(
        "EDM now holds {} addresses in list 1 and {} in list 2.",
        sb.edm.addresses(1).len(),
        sb.edm.addresses(2).len()
    );
    println!("\n{}", crate::status::render(&ctx.store).await?);
    if second_writes != 0 {
        println!("unexpected: the unchanged rerun wrote to EDM");
        ok = false;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One contacts run, described with the EDM writes it made.
async fn contacts_step(ctx: &Context, sb: &Sandbox, title: &str) -> anyhow::Result<bool> {
    sb.clear_requests();
    let report = contacts::run(ctx, RunOptions::default()).await?;
    println!("{}", describe(title, &report, sb.edm_writes()));
    Ok(report.is_success())
}

/// Changes in the CRM and in EDM between runs 2 and 3.
fn change_both_sides(sb: &Sandbox) {
    sb.crm
        .set_linkman_field(1002, "name", json!("李芳（已升职）"));
    sb.crm.remove_linkman(1004);
    sb.crm
        .set_linkman_field(1010, "email", json!("new.address@customer7.example.cn"));
    sb.crm.set_customer_field(4, "type_id", json!(2));
    sb.crm.put_linkman(
        11,
        3001,
        json!({"name": "新客户经理", "email": "manager@customer11.example.cn"}),
    );
    sb.edm
        .user_unsubscribe(1, "contact1003@customer2.example.cn");
    sb.crm
        .set_linkman_field(1003, "name", json!("已退订的联系人改名"));
    println!(
        "between runs: a name changed, a link-man deleted, an email changed, customer 4 became a VIP,\n  a link-man was added, and a recipient unsubscribed through EDM (then was renamed in the CRM)\n"
    );
}

/// Run 4: write-back of two campaigns, with a few of its records.
async fn writeback_step(ctx: &Context, sb: &Sandbox) -> anyhow::Result<bool> {
    seed_campaigns(sb);
    sb.clear_requests();
    let wb = crate::writeback::run(ctx).await?;
    let c = &wb.counts;
    println!(
        "run 4 — write-back of yesterday's two campaigns\n  {} campaigns → ContactHistory records: open {}, click {}, bounce {}, unsubscribe {}; unmatched {}, failed {}\n  hard bounces newly suppressed: {}   EDM write requests: {}   ({} ms)\n",
        c.campaigns,
        c.open,
        c.click,
        c.bounce,
        c.unsubscribe,
        c.unmatched,
        c.failed,
        c.new_bounce_suppressions,
        sb.edm_writes(),
        wb.duration_ms
    );
    for r in sb.crm.history().iter().take(3) {
        println!(
            "  e.g. customer {} link-man {}: {} — {}",
            r.customer_id, r.link_man_id, r.title, r.content
        );
    }
    println!();
    Ok(wb.is_success())
}
