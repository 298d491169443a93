//! A second look before anyone is unsubscribed for having vanished from
//! one pull.
//!
//! `Customer/GetAllList` pages by number, with no cursor and no total. A
//! customer deleted from a page already read moves every later customer
//! up one place, and the first customer of the next page is not seen in
//! this pull; a link-man moved to a customer whose link-men were already
//! read is in neither read. Either way its member looks gone. So, after a
//! complete pull and before planning, for every member the daemon owns
//! whose link-man the pull did not return:
//!
//! 1. its customer, when the pull did not return that either, is asked for
//!    by id (`Customer/Get`): found, it is read late (`GetLinkManList`) and
//!    mapped like every other customer; not found, its link-men are gone
//!    with it;
//! 2. a link-man still missing whose customer was not found gone is asked
//!    for by id (`LinkMan/GetLinkMan`): not found, it is gone and its member
//!    is unsubscribed as planned; found, or when the CRM does not answer,
//!    its member is kept exactly as the state DB has it this run (neither
//!    unsubscribed nor edited), and the next pull settles it.
//!
//! One request per vanished customer, and one per vanished link-man whose
//! customer is still there; none when nothing vanished, nor for an empty
//! pull (no customer at all), which the safety check refuses as before. The run's summary
//! counts each outcome.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use futures::StreamExt;

use super::desired::{DesiredBuilder, DesiredMember};
use crate::domain::{CustomerId, LinkManId, MemberState, Members, Origin};
use crate::jobs::Context;

/// What the second look found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SecondLook {
    /// Customers the paging skipped, found by id and read late.
    pub customers_read_late: usize,
    /// Link-men confirmed gone (their customer or themselves not found).
    pub vanished_confirmed: usize,
    /// Link-men still in the CRM, missing from this pull only: kept.
    pub vanished_kept: usize,
    /// Link-men the CRM did not answer about: kept, to be looked at again
    /// next run.
    pub vanished_unconfirmed: usize,
}

/// Owned members present in EDM whose link-man the pull did not return,
/// by link-man.
fn vanished<'a>(
    builder: &DesiredBuilder<'_>,
    members: &'a Members,
) -> BTreeMap<LinkManId, Vec<&'a MemberState>> {
    let mut out: BTreeMap<LinkManId, Vec<&MemberState>> = BTreeMap::new();
    for m in members.values() {
        if m.origin != Origin::Owned || !m.present {
            continue;
        }
        if let Some(id) = m.link_man_id
            && !builder.has_linkman(id)
        {
            out.entry(id).or_default().push(m);
        }
    }
    out
}

/// Looks again at the CRM for what vanished from this pull (see the module
/// documentation), adding late-read customers and the members to keep to
/// `builder`.
pub async fn second_look(
    ctx: &Context,
    builder: &mut DesiredBuilder<'_>,
    members: &Members,
) -> SecondLook {
    let mut look = SecondLook::default();
    // An empty pull is no edit during the pull: the safety check refuses
    // it (or `--force` applies it as asked), without a request per member.
    if builder.customers == 0 {
        return look;
    }
    let gone = vanished(builder, members);
    if gone.is_empty() {
        return look;
    }
    let unseen: BTreeSet<CustomerId> = gone
        .values()
        .flatten()
        .filter_map(|m| m.customer_id)
        .filter(|c| !builder.has_customer(*c))
        .collect();
    let deleted = read_late(ctx, builder, unseen, &mut look).await;
    let still: Vec<(LinkManId, Vec<&MemberState>)> = gone
        .into_iter()
        .filter(|(id, _)| !builder.has_linkman(*id))
        .collect();
    let mut to_ask = HashMap::new();
    for (id, held) in still {
        let customer = held.iter().find_map(|m| m.customer_id);
        if customer.is_some_and(|c| deleted.contains(&c)) {
            look.vanished_confirmed += 1;
        } else {
            to_ask.insert(id, held);
        }
    }
    let answers = ask_linkmen(ctx, to_ask.keys().copied().collect()).await;
    let mut kept = Vec::new();
    for (id, answer) in answers {
        let held = to_ask.remove(&id).unwrap_or_default();
        match answer {
            Ok(None) => {
                look.vanished_confirmed += 1;
                continue;
            }
            Ok(Some(_)) => look.vanished_kept += 1,
            Err(e) => {
                tracing::warn!(link_man_id = id.0, error = %e, "cannot ask the CRM whether a link-man missing from this pull still exists; its member is kept this run");
                look.vanished_unconfirmed += 1;
            }
        }
        kept.push(id);
        for m in held {
            builder.hold(DesiredMember {
                key: m.key.clone(),
                link_man_id: id,
                customer_id: m.customer_id.unwrap_or(CustomerId(0)),
                fields: m.fields.clone(),
            });
        }
    }
    log(&look, &kept);
    look
}

/// Asks the CRM for each link-man by id, `crm.concurrency` at a time.
async fn ask_linkmen(
    ctx: &Context,
    ids: Vec<LinkManId>,
) -> Vec<(
    LinkManId,
    Result<Option<crate::crm::CrmMap>, crate::remote::RemoteError>,
)> {
    let concurrency = ctx.settings.crm.concurrency.max(1);
    let crm = &ctx.crm;
    futures::stream::iter(ids)
        .map(|id| async move { (id, crm.linkman(id).await) })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Asks for each customer in `unseen` by id; adds those found (with their
/// link-men) to `builder`. Returns the customers the CRM says it does not
/// have. A customer the CRM does not answer about is neither: its
/// link-men are asked for one by one.
async fn read_late(
    ctx: &Context,
    builder: &mut DesiredBuilder<'_>,
    unseen: BTreeSet<CustomerId>,
    look: &mut SecondLook,
) -> HashSet<CustomerId> {
    let concurrency = ctx.settings.crm.concurrency.max(1);
    let crm = &ctx.crm;
    let answers: Vec<_> = futures::stream::iter(unseen)
        .map(|id| async move {
            let found = match crm.customer(id).await {
                Ok(Some(data)) => crm.linkmen(id).await.map(|l| Some((data, l))),
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            (id, found)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut deleted = HashSet::new();
    for (id, found) in answers {
        match found {
            Ok(Some((data, linkmen))) => {
                builder.add(&data, id, &linkmen);
                look.customers_read_late += 1;
            }
            Ok(None) => {
                deleted.insert(id);
            }
            Err(e) => {
                tracing::warn!(customer_id = id.0, error = %e, "cannot read a customer missing from this pull; its link-men are asked for one by one")
            }
        }
    }
    deleted
}

fn log(look: &SecondLook, kept: &[LinkManId]) {
    if look.customers_read_late > 0 {
        tracing::warn!(
            customers = look.customers_read_late,
            "customers missing from the paged pull (the CRM changed while it was read) were found by id and read"
        );
    }
    if !kept.is_empty() {
        let shown: Vec<i64> = kept.iter().take(20).map(|id| id.0).collect();
        tracing::warn!(
            kept = look.vanished_kept,
            unconfirmed = look.vanished_unconfirmed,
            link_man_ids = ?shown,
            "link-men missing from this pull are kept as they are (still in the CRM, or it did not say): nobody is unsubscribed for them this run"
        );
    }
    if look.vanished_confirmed > 0 {
        tracing::info!(
            link_men = look.vanished_confirmed,
            "link-men missing from this pull confirmed gone from the CRM"
        );
    }
}
