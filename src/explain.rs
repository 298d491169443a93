//! `explain EMAIL` (or `--linkman ID`): why an address is, or is not, in
//! each list — from the state database, and with `--live` also from the
//! CRM and EDM, printing where they disagree. It changes nothing: the
//! database is opened read-only, and `--live` only reads (`ml-addr-list`
//! keyword searches, `GetLinkManList`).
//!
//! The address asked about is printed in full (the operator typed it, or
//! asked for its link-man, or pasted its masked form from a log line —
//! `l***@example.com` is answered for every recorded address it may
//! stand for); any other address (a link-man's new email in the CRM) is
//! masked. Secrets never appear: remote errors go through the
//! redactor like every other line.

use std::collections::BTreeSet;
use std::process::ExitCode;

use serde::Serialize;

use crate::audit::is_masked;
use crate::config::Settings;
use crate::domain::{
    CustomerId, Email, LinkManId, ListId, MemberFields, VAR_COUNT, json_text, mask_address,
};
use crate::state::{
    AddressFacts, Finding, FindingKind, MemberFact, OperationFact, RecordFact, RefusalFact, Store,
    SuppressionFact,
};
use crate::status::when;

/// Operations shown per address, newest first.
const MAX_OPERATIONS: u64 = 20;
/// Consent-trail entries shown per address: the last ones.
const MAX_TRAIL: usize = 10;

/// What the operator asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub email: Option<String>,
    pub linkman: Option<LinkManId>,
    pub live: bool,
    pub json: bool,
}

/// The answer for one address.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub address: String,
    /// `None` when the address is a valid mailbox; else why not.
    pub invalid: Option<String>,
    pub lists: Vec<ListAnswer>,
    pub operations: Vec<OperationFact>,
    /// Refusals by EDM; `parked: true` ones are no longer sent.
    pub refusals: Vec<RefusalFact>,
    pub contact_history: Vec<RecordFact>,
    /// The last entries of the address's consent trail, oldest first
    /// (`audit EMAIL` prints them all).
    pub trail: Vec<crate::state::AuditRecord>,
    /// When `forget` took the address out (RFC 3339), if it did: the state
    /// database then keeps only its keyed hash.
    pub forgotten_at: Option<String>,
    /// What the logs said once about the address: invalid, or shared by
    /// link-men.
    pub findings: Vec<Finding>,
    pub live: Option<Live>,
}

/// The address in one list.
#[derive(Debug, Clone, Serialize)]
pub struct ListAnswer {
    pub list_id: ListId,
    /// How a link-man reaches this list: the default list, or routes.
    pub reached_by: Vec<String>,
    /// `owned`, `adopted`, `foreign`, `removed` (EDM no longer holds it) or
    /// `not a member`.
    pub state: String,
    pub member: Option<MemberFact>,
    pub suppression: Option<SuppressionFact>,
}

/// What the services said, and where they disagree with the state DB.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Live {
    /// Per list: EDM's address id when it holds the address.
    pub edm: Vec<LiveList>,
    /// Per owning link-man: whether the CRM still has it, and its email.
    pub crm: Vec<LiveLinkMan>,
    /// A remote that could not be asked, with its (redacted) error.
    pub errors: Vec<String>,
    pub disagreements: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LiveList {
    pub list_id: ListId,
    pub edm_id: Option<crate::domain::AddressId>,
    pub fullname: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LiveLinkMan {
    pub link_man_id: LinkManId,
    pub customer_id: CustomerId,
    pub found: bool,
    /// Its email in the CRM now: in full when it is the address asked
    /// about, masked otherwise.
    pub email: Option<String>,
}

/// Runs `explain` and prints the answer. Exit 0 with an answer (also for
/// an invalid address, or one the state DB does not know); 1 when there is
/// no state database.
pub async fn print(settings: &Settings, q: Question) -> anyhow::Result<ExitCode> {
    let Some(store) = Store::open_read_only(&settings.database.url).await? else {
        println!(
            "no state database yet: nothing has run against database.url (or it points elsewhere)"
        );
        return Ok(ExitCode::from(crate::cli::EXIT_FAILED));
    };
    let answers = answer(settings, &store, &q).await;
    store.close().await;
    let answers = answers?;
    if q.json {
        println!("{}", serde_json::to_string_pretty(&answers)?);
    } else {
        for a in &answers {
            print!("{}", to_text(a));
        }
        if let (true, Some(id)) = (answers.is_empty(), q.linkman) {
            println!(
                "link-man {id} owns no member in the state database: it has no valid email, or no run has seen it yet"
            );
        }
        if let Some(raw) = q.email.as_deref().filter(|r| is_masked(r)) {
            println!(
                "{raw} is masked (as in the logs): {} recorded addresses match it{}",
                answers.len(),
                if answers.is_empty() {
                    "; ask with the address from the CRM, or by --linkman ID from the log line"
                } else {
                    ""
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The explanations for the question.
pub async fn answer(
    settings: &Settings,
    store: &Store,
    q: &Question,
) -> anyhow::Result<Vec<Explanation>> {
    let mut addresses: Vec<String> = Vec::new();
    if let Some(raw) = &q.email {
        if is_masked(raw) {
            // Copied from a log line: every recorded address it may be.
            addresses.extend(store.emails_matching_mask(raw).await?);
        } else {
            addresses.push(raw.clone());
        }
    }
    if let Some(id) = q.linkman {
        addresses.extend(store.emails_of_linkman(id).await?);
    }
    let clients = if q.live {
        Some(crate::jobs::Clients::new(settings)?)
    } else {
        None
    };
    let mut out = Vec::new();
    for raw in addresses {
        let email = match Email::parse(&raw) {
            Ok(email) => email,
            Err(reason) => {
                out.push(Explanation {
                    address: raw.trim().to_string(),
                    invalid: Some(reason.to_string()),
                    lists: Vec::new(),
                    operations: Vec::new(),
                    refusals: Vec::new(),
                    contact_history: Vec::new(),
                    trail: Vec::new(),
                    forgotten_at: None,
                    findings: store.findings_of(raw.trim()).await?,
                    live: None,
                });
                continue;
            }
        };
        let facts = store.facts_of(email.as_str(), MAX_OPERATIONS).await?;
        let asked: Vec<String> = std::iter::once(email.as_str().to_string())
            .chain(crate::audit::hashed(store, email.as_str()).await)
            .collect();
        let mut trail = store.audit_of(&asked).await?;
        let forgotten_at = trail
            .iter()
            .rev()
            .find(|r| r.event == crate::stored_enums::AuditEvent::Forgotten)
            .map(|r| r.at.clone());
        trail.drain(..trail.len().saturating_sub(MAX_TRAIL));
        let findings = store.findings_of(email.as_str()).await?;
        let lists = per_list(settings, &facts);
        let live = match &clients {
            Some(c) => Some(live(settings, c, &email, &facts).await),
            None => None,
        };
        out.push(Explanation {
            address: email.as_str().to_string(),
            invalid: None,
            lists,
            operations: facts.operations,
            refusals: facts.refusals,
            contact_history: facts.records,
            trail,
            forgotten_at,
            findings,
            live,
        });
    }
    Ok(out)
}

/// The synced lists and any other list the address has a row in.
fn lists_of(settings: &Settings, facts: &AddressFacts) -> BTreeSet<ListId> {
    settings
        .synced_lists()
        .into_iter()
        .chain(facts.members.iter().map(|m| m.list_id))
        .chain(facts.suppressions.iter().filter_map(|s| s.list_id))
        .collect()
}

fn per_list(settings: &Settings, facts: &AddressFacts) -> Vec<ListAnswer> {
    lists_of(settings, facts)
        .into_iter()
        .map(|list_id| {
            let member = facts.members.iter().find(|m| m.list_id == list_id).cloned();
            let state = match &member {
                None => "not a member".to_string(),
                Some(m) if !m.present => "removed".to_string(),
                Some(m) => m.origin.to_string(),
            };
            ListAnswer {
                list_id,
                reached_by: reached_by(settings, list_id),
                state,
                member,
                // The list's own suppression, else a hard bounce (every
                // list).
                suppression: facts
                    .suppressions
                    .iter()
                    .find(|s| s.list_id == Some(list_id))
                    .or_else(|| facts.suppressions.iter().find(|s| s.list_id.is_none()))
                    .cloned(),
            }
        })
        .collect()
}

/// How the mapping rules send a link-man to `list_id`.
fn reached_by(settings: &Settings, list_id: ListId) -> Vec<String> {
    let mut ways = Vec::new();
    for (i, r) in settings.sync.routes.iter().enumerate() {
        if r.list_id == list_id {
            ways.push(format!("route {}: {} = {:?}", i + 1, r.field, r.equals));
        }
    }
    if settings.sync.list_id == list_id {
        ways.push("the default list (sync.list_id): link-men no route matches".to_string());
    }
    if ways.is_empty() {
        ways.push("no longer synced (not in the configuration)".to_string());
    }
    ways
}

/// Asks EDM (a keyword search of every list) and the CRM (the owning
/// customers' link-men), and compares.
async fn live(
    settings: &Settings,
    clients: &crate::jobs::Clients,
    email: &Email,
    facts: &AddressFacts,
) -> Live {
    let mut live = Live::default();
    for list_id in lists_of(settings, facts) {
        ask_edm(clients, list_id, email, facts, &mut live).await;
    }
    let owners: BTreeSet<(CustomerId, LinkManId)> = facts
        .members
        .iter()
        .filter_map(|m| Some((m.customer_id?, m.link_man_id?)))
        .collect();
    for owner in owners {
        ask_crm(settings, clients, owner, email, &mut live).await;
    }
    live
}

/// Whether EDM holds `email` in `list_id`, against the state database.
async fn ask_edm(
    clients: &crate::jobs::Clients,
    list_id: ListId,
    email: &Email,
    facts: &AddressFacts,
    live: &mut Live,
) {
    let member = facts.members.iter().find(|m| m.list_id == list_id);
    let found = match clients.edm.find(list_id, email).await {
        Ok(found) => found,
        Err(e) => {
            let e = clients.redactor.redact(&e.to_string());
            live.errors.push(format!("edm list {list_id}: {e}"));
            return;
        }
    };
    let held = found.first();
    live.edm.push(LiveList {
        list_id,
        edm_id: held.map(|a| a.id),
        fullname: held.map(|a| a.fields.fullname().to_string()),
    });
    let recorded = member.is_some_and(|m| m.present);
    let disagreement = match (recorded, held, member) {
        (true, None, _) => Some(format!(
            "list {list_id}: the state database says EDM holds it; EDM does not (a later run's pending check or `--once --full` repairs the record)"
        )),
        (false, Some(_), _) => Some(format!(
            "list {list_id}: EDM holds it; the state database does not record it there (`--once --full` reads the list)"
        )),
        (true, Some(a), Some(m)) => (!a.fields.same_values(&recorded_fields(m))).then(|| format!(
            "list {list_id}: EDM's fullname or variables differ from the state database's (`--once --full` repairs them)"
        )),
        _ => None,
    };
    live.disagreements.extend(disagreement);
}

/// The texts the state database recorded for `m`, compared with EDM's as
/// the sync compares them (white space at either end set aside: EDM's
/// answers are read trimmed, the CRM's texts are sent as they are).
fn recorded_fields(m: &crate::state::MemberFact) -> MemberFields {
    let vars: [&str; VAR_COUNT] = std::array::from_fn(|i| m.vars.get(i).map_or("", String::as_str));
    MemberFields::raw(&m.fullname, &vars)
}

/// Whether the CRM still has the owning link-man, with this email.
async fn ask_crm(
    settings: &Settings,
    clients: &crate::jobs::Clients,
    (customer_id, link_man_id): (CustomerId, LinkManId),
    email: &Email,
    live: &mut Live,
) {
    let linkmen = match clients.crm.linkmen(customer_id).await {
        Ok(linkmen) => linkmen,
        Err(e) => {
            let e = clients.redactor.redact(&e.to_string());
            live.errors.push(format!("crm customer {customer_id}: {e}"));
            return;
        }
    };
    let lm = linkmen.iter().find(|l| l.id == link_man_id);
    let now = lm.map(|l| json_text(l.data.get(&settings.crm.fields.linkman_email)));
    let same = now
        .as_deref()
        .and_then(|raw| Email::parse(raw).ok())
        .is_some_and(|e| &e == email);
    let shown = now.as_deref().map(|raw| {
        if same {
            email.as_str().to_string()
        } else {
            mask_address(raw.trim())
        }
    });
    match (&lm, same) {
        (None, _) => live.disagreements.push(format!(
            "crm: link-man {link_man_id} is no longer a link-man of customer {customer_id} (the next run unsubscribes the address where the daemon owns it)"
        )),
        (Some(_), false) => live.disagreements.push(format!(
            "crm: link-man {link_man_id}'s email is now {} (the next run moves the membership)",
            shown.clone().unwrap_or_default()
        )),
        (Some(_), true) => {}
    }
    live.crm.push(LiveLinkMan {
        link_man_id,
        customer_id,
        found: lm.is_some(),
        email: shown,
    });
}

/// The answer in words.
pub fn to_text(a: &Explanation) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{}", a.address);
    if let Some(reason) = &a.invalid {
        let _ = writeln!(
            out,
            "  not a valid mailbox: rule 2, {reason}; the daemon skips this link-man (logged masked, as `invalid email skipped`) and never sends it to EDM"
        );
        write_findings(&mut out, &a.findings);
        return out;
    }
    write_findings(&mut out, &a.findings);
    if let Some(at) = &a.forgotten_at {
        let _ = writeln!(
            out,
            "  forgotten at {at} (`forget`): the state database keeps only its keyed hash; it is never added again"
        );
    }
    for l in &a.lists {
        write_list(&mut out, l);
    }
    write_operations(&mut out, &a.operations);
    write_refusals(&mut out, &a.refusals);
    write_contact_history(&mut out, &a.contact_history);
    write_trail(&mut out, &a.trail);
    if let Some(live) = &a.live {
        write_live(&mut out, live);
    }
    out
}

/// The address in one list: its state, member row, route and suppression.
fn write_list(out: &mut String, l: &ListAnswer) {
    use std::fmt::Write;
    let _ = writeln!(out, "  list {}: {}", l.list_id, l.state);
    if let Some(m) = &l.member {
        let owner = match (m.link_man_id, m.customer_id) {
            (Some(lm), Some(c)) => format!("link-man {lm} of customer {c}"),
            (Some(lm), None) => format!("link-man {lm}"),
            _ => "no link-man (not ours)".to_string(),
        };
        let _ = writeln!(
            out,
            "    since {}; {owner}; EDM id {}; fullname {:?}",
            when(m.since_ms),
            m.edm_id.map_or("unknown".to_string(), |id| id.to_string()),
            m.fullname
        );
    }
    let _ = writeln!(out, "    reached by {}", l.reached_by.join("; "));
    if let Some(s) = &l.suppression {
        let _ = writeln!(
            out,
            "    suppressed{}: {} since {} ({}): no operation of any kind",
            if s.list_id.is_none() {
                " in every list"
            } else {
                ""
            },
            s.reason,
            when(s.since_ms),
            s.source
        );
        if s.unsubscribed_while_behind {
            let _ = writeln!(
                out,
                "    {}",
                crate::stored_enums::SuppressionSource::BEHIND_NOTE
            );
        }
    }
}

/// The operations on the address, newest first.
fn write_operations(out: &mut String, operations: &[OperationFact]) {
    use std::fmt::Write;
    if operations.is_empty() {
        let _ = writeln!(
            out,
            "  operations: none recorded (or pruned after database.retention_days)"
        );
        return;
    }
    let _ = writeln!(out, "  operations (newest first):");
    for o in operations {
        let _ = writeln!(
            out,
            "    {} {} list {} {}, {} attempts, run {}{}",
            when(o.created_ms),
            o.kind,
            o.list_id,
            o.status,
            o.attempts,
            o.run_id,
            o.last_error
                .as_deref()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        );
    }
}

/// EDM's refusals of the address (parked ones are no longer sent).
fn write_refusals(out: &mut String, refusals: &[RefusalFact]) {
    use std::fmt::Write;
    for r in refusals {
        let _ = writeln!(
            out,
            "  {} by EDM: {} list {} refused in {} runs ({} {}), last run {}",
            if r.parked { "parked" } else { "refused" },
            r.kind,
            r.list_id,
            r.failed_runs,
            r.code,
            r.message,
            r.last_run_id
        );
    }
}

/// The last entries of the address's consent trail.
fn write_trail(out: &mut String, trail: &[crate::state::AuditRecord]) {
    use std::fmt::Write;
    if trail.is_empty() {
        let _ = writeln!(out, "  consent trail: none");
        return;
    }
    let _ = writeln!(
        out,
        "  consent trail (the last {}; `audit EMAIL` has it all):",
        trail.len()
    );
    for r in trail {
        let _ = writeln!(out, "    {}", crate::audit::to_line(r));
    }
}

/// The contact-history records written (or to write) for the address.
fn write_contact_history(out: &mut String, records: &[RecordFact]) {
    use std::fmt::Write;
    if records.is_empty() {
        let _ = writeln!(out, "  contact history: none");
        return;
    }
    let _ = writeln!(out, "  contact history:");
    for r in records {
        let _ = writeln!(
            out,
            "    {} {} {} link-man {} customer {}: {}{}{}",
            when(r.created_ms),
            r.kind,
            r.scope,
            r.link_man_id,
            r.customer_id,
            r.status,
            if r.uncertain {
                " (may have been written twice)"
            } else {
                ""
            },
            r.last_error
                .as_deref()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        );
    }
}

/// What `--live` found, and where it disagrees with the state database.
fn write_live(out: &mut String, live: &Live) {
    use std::fmt::Write;
    let _ = writeln!(out, "  live:");
    for l in &live.edm {
        let _ = writeln!(
            out,
            "    edm list {}: {}",
            l.list_id,
            l.edm_id
                .map_or("not held".to_string(), |id| format!("held (id {id})"))
        );
    }
    for c in &live.crm {
        let _ = writeln!(
            out,
            "    crm customer {} link-man {}: {}",
            c.customer_id,
            c.link_man_id,
            match (c.found, &c.email) {
                (false, _) => "gone".to_string(),
                (true, Some(e)) => format!("email {e}"),
                (true, None) => "no email".to_string(),
            }
        );
    }
    for e in &live.errors {
        let _ = writeln!(out, "    could not ask: {e}");
    }
    if live.disagreements.is_empty() && live.errors.is_empty() {
        let _ = writeln!(out, "    the CRM and EDM agree with the state database");
    }
    for d in &live.disagreements {
        let _ = writeln!(out, "    disagrees: {d}");
    }
}

/// The findings logged once about the address, one line each.
fn write_findings(out: &mut String, findings: &[Finding]) {
    use std::fmt::Write;
    for f in findings {
        let _ = match (f.kind, f.list_id) {
            (FindingKind::Invalid, _) => writeln!(
                out,
                "  logged as invalid: the email of link-man {}{} ({})",
                f.link_man_id,
                f.customer_id
                    .map(|c| format!(" of customer {c}"))
                    .unwrap_or_default(),
                f.detail
            ),
            (FindingKind::Shared, list) => writeln!(
                out,
                "  logged as shared{}: {}",
                list.map(|l| format!(" in list {l}")).unwrap_or_default(),
                f.detail
            ),
        };
    }
}
