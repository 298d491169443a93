//! `check`: before an operator starts the daemon, everything that can be
//! known without writing — each line `NAME: ok …`, `NAME: FAILED: …` (exit
//! 1) or `NAME: WARNING: …` (exit unchanged):
//!
//! - the config loaded, and no value is still a placeholder of the shipped
//!   example (`set-me…`, an `example.com` host), named by key;
//! - `writeback.type_id` and `writeback.route_id` are values of the CRM's
//!   documented dictionaries (contact category 1–7, contact route 1–4;
//!   the CRM has no read call that would accept or refuse them without
//!   writing a record);
//! - the state database opens and migrates;
//! - EDM accepts the credentials, and every configured list id exists in
//!   the account (`maillist-list`), named by key; a disabled list warns;
//! - EDM's sending service (`service-info`): a warning when it is
//!   disabled, ends within 14 days, or has fewer sends left than the
//!   synced lists have addresses;
//! - the CRM answers one page of customers.

use std::process::ExitCode;

use crate::config::Settings;
use crate::domain::ListId;
use crate::edm::{MailList, ServiceInfo};

/// Days before the service's last day from which `check` warns.
pub(crate) const EXPIRY_WARNING_DAYS: i64 = 14;

/// A warning for each schedule that never fires from `now` on (a valid
/// cron such as `0 0 0 30 2 *`: 30 February), naming its key.
pub(crate) fn schedule_findings(
    settings: &Settings,
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<String> {
    [
        ("sync.schedule", &settings.sync.schedule),
        ("writeback.schedule", &settings.writeback.schedule),
    ]
    .into_iter()
    .filter(|(_, cron)| {
        crate::schedule::ZonedCron::parse(cron.as_str(), settings.schedule_zone())
            .is_ok_and(|z| z.next_after(now).is_none())
    })
    .map(|(key, cron)| {
        format!("config: WARNING: {key} = {cron:?} never fires: that job will never run")
    })
    .collect()
}

/// The state database's line, read only: a typo in `database.url` must
/// not get a new, empty database; what the daemon will create or migrate
/// is said, not done. `Err` is a failure.
async fn database_finding(settings: &Settings) -> Result<String, String> {
    use crate::state::Schema;
    match crate::state::Store::inspect(&settings.database.url).await {
        Ok(Some(Schema::Current)) => Ok("database: ok".into()),
        Ok(None) | Ok(Some(Schema::Absent)) => Ok(
            "database: ok: no state database there yet (the daemon will create it; check database.url if one should exist)".into(),
        ),
        Ok(Some(Schema::Behind(n))) => Ok(format!(
            "database: ok: {n} migration(s) behind this binary (the daemon will migrate it)"
        )),
        Ok(Some(Schema::Ahead(unknown))) => Err(format!(
            "database: FAILED: migrated by a newer crm-edm-sync (unknown migrations: {}); run that version",
            unknown.join(", ")
        )),
        Err(e) => Err(format!("database: FAILED: {e:#}")),
    }
}

/// The documented `ContactHistory/Add` dictionaries (docs/remote-apis.md).
const TYPE_IDS: std::ops::RangeInclusive<i64> = 1..=7;
const ROUTE_IDS: std::ops::RangeInclusive<i64> = 1..=4;

pub(crate) async fn run(settings: Settings) -> anyhow::Result<ExitCode> {
    let (ok, lines) = findings(&settings).await?;
    for line in lines {
        println!("{line}");
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::cli::EXIT_FAILED)
    })
}

/// `check` of every tenant (`tenants.dir`, no `--tenant`): one line each —
/// `NAME: ok`, `NAME: ok, WARNING: …` or `NAME: FAILED: …` (exit 1), a
/// refused tenant file among the failures.
pub(crate) async fn run_all(set: &crate::config::TenantSet) -> anyhow::Result<ExitCode> {
    let mut all_ok = true;
    let mut lines: Vec<(String, String)> = set
        .refused
        .iter()
        .map(|r| (r.name.clone(), format!("FAILED: {}", r.error)))
        .collect();
    all_ok &= set.refused.is_empty();
    for settings in &set.tenants {
        let name = settings.tenant.to_string();
        let (ok, found) = crate::scope::within(&name, findings(settings)).await?;
        all_ok &= ok;
        lines.push((name, one_line(ok, &found)));
    }
    lines.sort();
    for (name, line) in lines {
        println!("{name}: {line}");
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::cli::EXIT_FAILED)
    })
}

/// A tenant's findings in one line: its failures, else its warnings, else
/// `ok`.
fn one_line(ok: bool, found: &[String]) -> String {
    let pick = |word: &str| -> Vec<&str> {
        found
            .iter()
            .filter(|l| l.contains(word))
            .map(String::as_str)
            .collect()
    };
    let (failed, warned) = (pick("FAILED"), pick("WARNING"));
    if !ok {
        format!("FAILED: {}", failed.join("; "))
    } else if !warned.is_empty() {
        format!("ok, {}", warned.join("; "))
    } else {
        "ok".to_string()
    }
}

/// Every line `check` prints for `settings`, and whether all is well.
async fn findings(settings: &Settings) -> anyhow::Result<(bool, Vec<String>)> {
    let mut out = Vec::new();
    let clients = crate::jobs::Clients::new(settings)?;
    let mut ok = check_config(settings, &mut out);
    out.extend(schedule_findings(settings, chrono::Utc::now()));
    match database_finding(settings).await {
        Ok(line) => out.push(line),
        Err(line) => {
            ok = false;
            out.push(clients.redactor.redact(&line));
        }
    }
    ok &= check_edm(settings, &clients, &mut out).await;
    ok &= check_reseller(settings, &clients, &mut out).await;
    match clients.crm.customers_page(1, 1).await {
        Ok(_) => out.push("crm: ok".to_string()),
        Err(e) => {
            ok = false;
            out.push(format!(
                "crm: FAILED: {}",
                clients.redactor.redact(&e.to_string())
            ));
        }
    }
    Ok((ok, out))
}

/// The `config:` lines: example placeholders left in, contact-history ids
/// the CRM does not have. Whether all is well.
fn check_config(settings: &Settings, out: &mut Vec<String>) -> bool {
    let mut ok = true;
    let placeholders = settings.placeholders();
    if placeholders.is_empty() {
        out.push("config: ok".to_string());
    } else {
        ok = false;
        for key in placeholders {
            out.push(format!(
                "config: FAILED: {key} is still the example's placeholder"
            ));
        }
    }
    if !TYPE_IDS.contains(&settings.writeback.type_id) {
        ok = false;
        out.push(format!(
            "config: FAILED: writeback.type_id = {} is not a contact category of the CRM (1–7)",
            settings.writeback.type_id
        ));
    }
    if !ROUTE_IDS.contains(&settings.writeback.route_id) {
        ok = false;
        out.push(format!(
            "config: FAILED: writeback.route_id = {} is not a contact route of the CRM (1–4; 3 is email)",
            settings.writeback.route_id
        ));
    }
    ok
}

/// The `edm:` lines: the account answers, the synced lists exist, the
/// sending service (a warning only). Whether all is well.
async fn check_edm(
    settings: &Settings,
    clients: &crate::jobs::Clients,
    out: &mut Vec<String>,
) -> bool {
    let (edm, redactor) = (&clients.edm, &clients.redactor);
    let account = match edm.customer_info().await {
        Ok(account) => account,
        Err(e) => {
            out.push(format!(
                "edm: FAILED (edm.auth = {:?}): {}",
                edm.auth().as_str(),
                redactor.redact(&e.to_string())
            ));
            return false;
        }
    };
    out.push(format!(
        "edm: ok (account {}, edm.auth = {:?})",
        account.username,
        edm.auth().as_str()
    ));
    let lists = match edm.maillist_list().await {
        Ok(lists) => lists,
        Err(e) => {
            out.push(format!(
                "edm lists: FAILED: {}",
                redactor.redact(&e.to_string())
            ));
            return false;
        }
    };
    let mut ok = true;
    for line in list_findings(settings, &lists) {
        ok &= !line.contains("FAILED");
        out.push(line);
    }
    match edm.service_info().await {
        Ok(service) => {
            let today = crate::writeback::edm_today(chrono::Utc::now(), settings.edm_zone());
            let addresses = synced_addresses(settings, &lists);
            for line in service_findings(&service, today, addresses) {
                out.push(line);
            }
        }
        Err(e) => out.push(format!(
            "edm service: WARNING: cannot read service-info: {}",
            redactor.redact(&e.to_string())
        )),
    }
    ok
}

/// The `reseller:` line, with a reseller account: the tenant's service as
/// the reseller API reports it, and the top-up rule. Whether all is well.
async fn check_reseller(
    settings: &Settings,
    clients: &crate::jobs::Clients,
    out: &mut Vec<String>,
) -> bool {
    let Some(account) = settings.reseller_edm() else {
        return true;
    };
    let customer = &settings.edm.username;
    let client = match crate::edm::EdmClient::new(&account, clients.redactor.clone()) {
        Ok(c) => c,
        Err(e) => {
            out.push(format!("reseller: FAILED: {e:#}"));
            return false;
        }
    };
    match client.customer_service_info(customer).await {
        Ok(s) => {
            let rule = settings
                .reseller
                .top_up()
                .map_or("no top-up".to_string(), |r| {
                    format!(
                        "top-up of {} when below {}, at most {} a day",
                        r.count, r.below, r.max_per_day
                    )
                });
            out.push(format!(
                "reseller: ok: customer {customer} (account {}): {} (status {:?}), ends {}, {} sends left; {rule}",
                account.username,
                if s.enabled { "enabled" } else { "disabled" },
                s.status,
                s.expires.map_or("on an unknown date".to_string(), |d| d.to_string()),
                s.quota_left.map_or("an unknown number of".to_string(), |q| q.to_string()),
            ));
            true
        }
        Err(e) => {
            out.push(format!(
                "reseller: FAILED (account {}, customer {customer}): {}",
                account.username,
                clients.redactor.redact(&e.to_string())
            ));
            false
        }
    }
}

/// Each configured list id (`sync.list_id`, `sync.routes[i].list_id`)
/// against the account's lists.
pub(crate) fn list_findings(settings: &Settings, lists: &[MailList]) -> Vec<String> {
    let keyed = std::iter::once(("sync.list_id".to_string(), settings.sync.list_id)).chain(
        settings
            .sync
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("sync.routes[{i}].list_id"), r.list_id)),
    );
    let known: Vec<String> = lists.iter().map(|l| l.id.to_string()).collect();
    keyed
        .map(|(key, id)| match lists.iter().find(|l| l.id == id) {
            None => format!(
                "edm lists: FAILED: {key} = {id}: no such list in the EDM account (it has: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
            Some(l) if !l.enabled => format!(
                "edm lists: WARNING: {key} = {id} ({}) is disabled in EDM",
                l.subject
            ),
            Some(l) => format!("edm lists: ok: {key} = {id} ({})", l.subject),
        })
        .collect()
}

/// The addresses the synced lists hold, as `maillist-list` counts them.
fn synced_addresses(settings: &Settings, lists: &[MailList]) -> u64 {
    let synced: Vec<ListId> = settings.synced_lists();
    lists
        .iter()
        .filter(|l| synced.contains(&l.id))
        .filter_map(|l| l.count)
        .sum()
}

/// The service's state in words, with a warning for each of: disabled,
/// ending within [`EXPIRY_WARNING_DAYS`] (or ended), fewer sends left
/// than `addresses`.
pub(crate) fn service_findings(
    service: &ServiceInfo,
    today: chrono::NaiveDate,
    addresses: u64,
) -> Vec<String> {
    let mut lines = vec![format!(
        "edm service: {} (status {:?}), ends {}, {} sends left",
        if service.enabled {
            "enabled"
        } else {
            "disabled"
        },
        service.status,
        service
            .expires
            .map_or("on an unknown date".to_string(), |d| d.to_string()),
        service
            .quota_left
            .map_or("an unknown number of".to_string(), |q| q.to_string()),
    )];
    if !service.enabled {
        lines.push(
            "edm service: WARNING: the sending service is disabled: campaigns are not sent"
                .to_string(),
        );
    }
    if let Some(end) = service.expires {
        let days = (end - today).num_days();
        if days < 0 {
            lines.push(format!(
                "edm service: WARNING: the sending service ended on {end}"
            ));
        } else if days <= EXPIRY_WARNING_DAYS {
            lines.push(format!(
                "edm service: WARNING: the sending service ends on {end}, in {days} days"
            ));
        }
    }
    if let Some(q) = service.quota_left
        && (q <= 0 || (q as u64) < addresses)
    {
        lines.push(format!(
            "edm service: WARNING: quota low: {q} sends left, fewer than the {addresses} addresses of the synced lists"
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(enabled: bool, expires: &str, quota: i64) -> ServiceInfo {
        ServiceInfo {
            status: if enabled { "enabled" } else { "disabled" }.into(),
            enabled,
            expires: chrono::NaiveDate::parse_from_str(expires, "%Y-%m-%d").ok(),
            quota_left: Some(quota),
        }
    }

    fn day(d: &str) -> chrono::NaiveDate {
        chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn a_schedule_that_never_fires_is_a_warning_naming_its_key() {
        let text = "[crm]\nbase_url = \"http://c\"\ntoken = \"t\"\n[edm]\nusername = \"u\"\npassword = \"p\"\n[sync]\nschedule = \"0 0 0 30 2 *\"\n";
        let settings = Settings::from_toml(text).unwrap();
        let lines = schedule_findings(&settings, chrono::Utc::now());
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("WARNING: sync.schedule") && lines[0].contains("never fires"));
        let fine = Settings::from_toml(&text.replace("0 0 0 30 2 *", "0 */15 * * * *")).unwrap();
        assert!(schedule_findings(&fine, chrono::Utc::now()).is_empty());
    }

    #[test]
    fn a_healthy_service_gives_one_line_and_no_warning() {
        let lines = service_findings(&service(true, "2027-06-30", 50_000), day("2026-11-30"), 100);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("enabled") && lines[0].contains("50000 sends left"));
    }

    #[test]
    fn disabled_ending_soon_and_low_quota_each_warn() {
        let lines = service_findings(&service(false, "2026-12-10", 40), day("2026-11-30"), 100);
        let warnings: Vec<_> = lines.iter().filter(|l| l.contains("WARNING")).collect();
        assert_eq!(warnings.len(), 3, "{lines:?}");
        assert!(warnings[0].contains("disabled"));
        assert!(warnings[1].contains("ends on 2026-12-10, in 10 days"));
        assert!(warnings[2].contains("quota low: 40 sends left, fewer than the 100"));
        // 14 days ahead still warns, 15 does not; a past date says ended.
        let at_14 = service_findings(&service(true, "2026-12-14", 500), day("2026-11-30"), 1);
        assert!(at_14.iter().any(|l| l.contains("in 14 days")), "{at_14:?}");
        let at_15 = service_findings(&service(true, "2026-12-15", 500), day("2026-11-30"), 1);
        assert_eq!(at_15.len(), 1, "{at_15:?}");
        let ended = service_findings(&service(true, "2026-11-01", 500), day("2026-11-30"), 1);
        assert!(
            ended.iter().any(|l| l.contains("ended on 2026-11-01")),
            "{ended:?}"
        );
    }
}
