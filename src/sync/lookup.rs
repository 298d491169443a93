//! Finding addresses in an EDM list, in as few requests as it takes.

use std::collections::HashMap;

use crate::domain::{Email, ListId};
use crate::edm::EdmAddress;
use crate::jobs::Context;
use crate::remote::RemoteError;

/// Finds which of `emails` list `list_id` holds: one keyword search each
/// when that is fewer requests than reading the whole list (`known`: how
/// many addresses the list is believed to hold), else one whole read.
pub async fn lookup(
    ctx: &Context,
    list_id: ListId,
    emails: &[Email],
    known: usize,
) -> Result<HashMap<Email, EdmAddress>, RemoteError> {
    let pages = known / ctx.edm.list_page_size() as usize + 1;
    let mut found: HashMap<Email, EdmAddress> = HashMap::new();
    let mut keep = |addr: EdmAddress| {
        if let Some(email) = addr.email.clone() {
            match found.get(&email) {
                Some(existing) if existing.id <= addr.id => {}
                _ => {
                    found.insert(email, addr);
                }
            }
        }
    };
    if emails.len() <= pages {
        for email in emails {
            for addr in ctx.edm.find(list_id, email).await? {
                keep(addr);
            }
        }
    } else {
        let wanted: std::collections::HashSet<&Email> = emails.iter().collect();
        ctx.edm
            .addr_each(list_id, |addr| {
                if addr.email.as_ref().is_some_and(|e| wanted.contains(e)) {
                    keep(addr);
                }
            })
            .await?;
    }
    Ok(found)
}
