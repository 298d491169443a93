//! `forget EMAIL`: unsubscribe an address where the daemon added it (and,
//! with `--include-adopted`, where it adopted it), then keep it only as a
//! keyed hash (`domain::Forgotten`) in every table of the state database,
//! the bytes it leaves behind overwritten. The daemon still recognises the
//! address: a link-man the CRM offers with it again is never added (the
//! contacts run counts it `forgotten`), and the drift report calls it
//! `reactivated` if EDM holds it again.
//!
//! An unsubscribe that fails stops it before anything is hashed (exit 1):
//! running it again completes it. It needs the state database to itself:
//! beside a running daemon it says so and changes nothing.

use std::process::ExitCode;

use crate::cli::{EXIT_CONFIG, EXIT_FAILED};
use crate::config::Settings;
use crate::domain::{Email, ListId, MemberState, Origin, mask_address};
use crate::jobs::Context;
use crate::state::{AuditEntry, NewOperation};
use crate::stored_enums::{AuditEvent, AuditSource, OpKind, UnsubReason};

/// What `forget` was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub email: String,
    pub dry_run: bool,
    pub include_adopted: bool,
}

/// Where the address is, and what becomes of it there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reach {
    /// Lists it is unsubscribed from.
    pub unsubscribe: Vec<ListId>,
    /// Lists the daemon adopted it in, left as they are (without
    /// `--include-adopted`).
    pub adopted_kept: Vec<ListId>,
    /// Lists where someone else put it: never the daemon's to remove.
    pub foreign: Vec<ListId>,
}

/// Where `members` (the address's rows) say it is.
pub fn reach(members: &[MemberState], include_adopted: bool) -> Reach {
    let mut out = Reach::default();
    for m in members.iter().filter(|m| m.present) {
        match m.origin {
            Origin::Owned => out.unsubscribe.push(m.key.list_id),
            Origin::Adopted if include_adopted => out.unsubscribe.push(m.key.list_id),
            Origin::Adopted => out.adopted_kept.push(m.key.list_id),
            Origin::Foreign => out.foreign.push(m.key.list_id),
        }
    }
    out
}

/// `crm-edm-sync forget EMAIL [--dry-run] [--include-adopted]`.
pub async fn print(settings: Settings, q: Question) -> anyhow::Result<ExitCode> {
    let email = match Email::parse(&q.email) {
        Ok(email) => email,
        Err(reason) => {
            println!(
                "crm-edm-sync: forget: {} is not a valid address: {reason}",
                mask_address(q.email.trim())
            );
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    if q.dry_run {
        let ctx = Context::new_read_only(settings).await?;
        let members = rows_of(&ctx, &email).await;
        ctx.store.close().await;
        let reach = reach(&members?, q.include_adopted);
        print!("{}", describe(&email, &reach, true));
        return Ok(ExitCode::SUCCESS);
    }
    let target = crate::lock::LockTarget::of(&settings.database.url);
    let Some(lock) = target.try_acquire().await? else {
        println!(
            "crm-edm-sync: forget: another instance (a running daemon) holds the state database; nothing was changed. Stop it, run forget, and start it again"
        );
        return Ok(ExitCode::from(EXIT_FAILED));
    };
    crate::jobs::holding(settings, lock, async |ctx: &Context| {
        forget(ctx, &email, q.include_adopted).await
    })
    .await?
}

/// The address's member rows.
async fn rows_of(ctx: &Context, email: &Email) -> anyhow::Result<Vec<MemberState>> {
    let members = ctx.store.members_with_addresses(&[email.as_str()]).await?;
    Ok(members.values().cloned().collect())
}

/// Unsubscribes, then hashes; what it printed decides the exit code.
async fn forget(ctx: &Context, email: &Email, include_adopted: bool) -> anyhow::Result<ExitCode> {
    let members = rows_of(ctx, email).await?;
    let reach = reach(&members, include_adopted);
    let run_id = crate::domain::RunId::fresh();
    for &list_id in &reach.unsubscribe {
        let member = members.iter().find(|m| m.key.list_id == list_id);
        if let Err(e) = unsubscribe(ctx, &run_id, email, list_id, member).await {
            let e = ctx.redactor.redact(&format!("{e:#}"));
            tracing::error!(list_id = list_id.0, error = %e, "forget: unsubscribe failed; nothing was hashed");
            println!(
                "crm-edm-sync: forget: cannot unsubscribe {} from list {list_id}: {e}; nothing was hashed: run forget again",
                email.masked()
            );
            return Ok(ExitCode::from(EXIT_FAILED));
        }
    }
    let hash = ctx.store.forgotten_hash(email.as_str()).await?;
    let entry =
        AuditEntry::now(AuditEvent::Forgotten, AuditSource::Operator, &hash).in_run(Some(&run_id));
    let forgot = ctx.store.forget(email.as_str(), &hash, &[entry]).await?;
    let rows: u64 = forgot.rows.iter().map(|(_, n)| n).sum();
    tracing::info!(
        address = %email.masked(),
        rows,
        lists = reach.unsubscribe.len(),
        "address forgotten: kept only as its keyed hash"
    );
    print!("{}", describe(email, &reach, false));
    println!(
        "{rows} rows in {} tables now hold only its keyed hash; it is never added again",
        forgot.rows.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// One list's `ml-unsub`, recorded as the daemon records its own (so the
/// export line it leaves is matched, not taken for the recipient's).
async fn unsubscribe(
    ctx: &Context,
    run_id: &crate::domain::RunId,
    email: &Email,
    list_id: ListId,
    member: Option<&MemberState>,
) -> anyhow::Result<()> {
    let op = NewOperation {
        kind: OpKind::Unsub,
        list_id,
        email: email.clone(),
        edm_id: member.and_then(|m| m.edm_id),
        link_man_id: member.and_then(|m| m.link_man_id),
        customer_id: member.and_then(|m| m.customer_id),
        fields: Default::default(),
        reason: Some(UnsubReason::Forget),
    };
    ctx.store.record_operations(run_id, &[op]).await?;
    ctx.edm.unsub(list_id, std::slice::from_ref(email)).await?;
    let gone: Vec<MemberState> = member
        .map(MemberState::unsubscribed_by_the_daemon)
        .into_iter()
        .collect();
    let entry = AuditEntry::unsubscribed(email.as_str(), UnsubReason::Forget)
        .in_list(list_id)
        .by(
            member.and_then(|m| m.link_man_id),
            member.and_then(|m| m.customer_id),
        )
        .in_run(Some(run_id));
    ctx.store
        .complete_operations(run_id, OpKind::Unsub, list_id, &[email], &gone, &[entry])
        .await
}

/// What was (or would be) done, in words; the address masked, as every
/// output after `forget` must leave it.
fn describe(email: &Email, reach: &Reach, dry_run: bool) -> String {
    use std::fmt::Write as _;
    let lists = |l: &[ListId]| {
        l.iter()
            .map(|id| id.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::new();
    let verb = if dry_run { "would be" } else { "was" };
    if reach.unsubscribe.is_empty() {
        let _ = writeln!(out, "{}: in no list the daemon added it to", email.masked());
    } else {
        let _ = writeln!(
            out,
            "{} {verb} unsubscribed from list {}",
            email.masked(),
            lists(&reach.unsubscribe)
        );
    }
    if !reach.adopted_kept.is_empty() {
        let _ = writeln!(
            out,
            "adopted in list {} (it was there before the daemon): left as it is; --include-adopted unsubscribes it there too",
            lists(&reach.adopted_kept)
        );
    }
    if !reach.foreign.is_empty() {
        let _ = writeln!(
            out,
            "in list {} by someone else's hand: left as it is",
            lists(&reach.foreign)
        );
    }
    if dry_run {
        let _ = writeln!(
            out,
            "then every row that holds it would keep only its keyed hash; nothing was changed (--dry-run)"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{MemberFields, MemberKey};

    fn row(list: i64, origin: Origin, present: bool) -> MemberState {
        MemberState {
            key: MemberKey::new(ListId(list), Email::parse("a@x.cn").unwrap()),
            origin,
            present,
            unsubscribed: false,
            link_man_id: None,
            customer_id: None,
            edm_id: None,
            fields: MemberFields::default(),
        }
    }

    #[test]
    fn only_lists_the_daemon_added_it_to_are_unsubscribed_unless_adopted_ones_are_asked_for() {
        let rows = [
            row(1, Origin::Owned, true),
            row(2, Origin::Adopted, true),
            row(3, Origin::Foreign, true),
            row(4, Origin::Owned, false),
        ];

        let plain = reach(&rows, false);
        let with_adopted = reach(&rows, true);

        assert_eq!(plain.unsubscribe, vec![ListId(1)]);
        assert_eq!(plain.adopted_kept, vec![ListId(2)]);
        assert_eq!(plain.foreign, vec![ListId(3)]);
        assert_eq!(with_adopted.unsubscribe, vec![ListId(1), ListId(2)]);
        assert!(with_adopted.adopted_kept.is_empty());
    }
}
