//! Reading the synced lists' `unsubscribe-export`, shared by both jobs: the
//! new lines are the daemon's own unsubscribes or user unsubscribes
//! (rule 6), folded into a [`View`] of what the state DB knows.

use std::collections::HashMap;

use anyhow::Context as _;

use super::Context;
use super::interpret::classify_export;
use crate::domain::{Email, ListId, MemberKey, Members, Suppressions};
use crate::state::{ListBook, Observations, now_ms};

/// What a run knows before it acts: the state DB's members, suppressions
/// and list bookkeeping, and what EDM showed during this run (not yet
/// written).
pub struct View {
    /// Every member ([`View::load`]), or only those the export lines read
    /// so far name ([`View::load_lean`]).
    pub members: Members,
    whole: bool,
    pub suppressions: Suppressions,
    pub books: HashMap<ListId, ListBook>,
    pub obs: Observations,
}

impl View {
    pub async fn load(ctx: &Context) -> anyhow::Result<View> {
        Ok(View {
            members: ctx.store.load_members().await?,
            whole: true,
            suppressions: ctx.store.load_suppressions().await?,
            books: ctx.store.list_books().await?,
            obs: Observations::default(),
        })
    }

    /// A view without the member table: `read_exports` reads the members
    /// its new lines name as it needs them. For the write-back, which
    /// needs no other member, so its memory follows the exports and the
    /// events, not the number of members.
    pub async fn load_lean(ctx: &Context) -> anyhow::Result<View> {
        Ok(View {
            members: Members::default(),
            whole: false,
            suppressions: ctx.store.load_suppressions().await?,
            books: ctx.store.list_books().await?,
            obs: Observations::default(),
        })
    }

    /// Reads `unsubscribe-export` of every list in `lists` and folds what
    /// the new lines mean (rule 6) into the view: the daemon's own
    /// unsubscribes are matched to their operations, every other new line
    /// is a user unsubscribe. Returns how many user unsubscribes were new.
    /// Shared by both jobs; an unreadable export is an error, because
    /// without it no write may be planned.
    pub async fn read_exports(&mut self, ctx: &Context, lists: &[ListId]) -> anyhow::Result<usize> {
        let mut user_unsubscribes = 0;
        for &list_id in lists {
            let read_at = now_ms();
            let mut lines = ctx.edm.unsubscribe_export(list_id).await.with_context(|| {
                format!("cannot read the unsubscribes of list {list_id}; nothing was applied")
            })?;
            // A forgotten address's lines (its `forget` unsubscribe, say)
            // are read, matched and kept under its hash, never in the clear.
            let forgotten = &self.suppressions.forgotten;
            if !forgotten.is_empty() {
                for line in lines.iter_mut().filter(|l| forgotten.contains(&l.address)) {
                    line.address = forgotten.hash(&line.address);
                }
            }
            // Only the lines after the pruning watermark are looked up, and
            // only those: the cost follows this export, not the history.
            let through = ctx.store.lines_seen_through(list_id).await?;
            let recent: std::collections::BTreeSet<&str> = lines
                .iter()
                .filter(|l| through.as_deref().is_none_or(|w| l.time.as_str() > w))
                .map(|l| l.address.as_str())
                .collect();
            let recent: Vec<&str> = recent.into_iter().collect();
            let seen = ctx.store.seen_lines_of(list_id, &recent).await?;
            if !self.whole {
                for m in ctx.store.members_of_list(list_id, &recent).await? {
                    self.members.insert(m.key.clone(), m);
                }
            }
            let since = self.books.get(&list_id).and_then(|b| b.export_read_at);
            let own = ctx.store.unmatched_unsubs(list_id, since).await?;
            let found = classify_export(
                list_id,
                &lines,
                &seen,
                through.as_deref(),
                &own,
                &self.members,
            );
            user_unsubscribes += found.suppressions.len();
            for s in &found.suppressions {
                if let Ok(email) = Email::parse(&s.email) {
                    tracing::info!(list_id = list_id.0, address = %email.masked(), "user unsubscribe: suppressed from now on");
                    self.suppressions
                        .user
                        .insert(MemberKey::new(list_id, email));
                }
            }
            for m in found.departed {
                self.members.insert(m.key.clone(), m.clone());
                self.obs.members.push(m);
            }
            self.obs.new_lines.extend(found.new_lines);
            self.obs.matched_ops.extend(found.matched_ops);
            self.obs.suppressions.extend(found.suppressions);
            self.obs.export_reads.push((list_id, read_at));
        }
        Ok(user_unsubscribes)
    }
}
