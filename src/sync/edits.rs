//! Applying a plan's edits: EDM ids found where they are not known yet
//! (one list read or a keyword search each, whichever is fewer requests),
//! then the edits recorded a chunk at a time and sent with
//! `edm.concurrency` calls in flight (`ml-addr-edit` takes one address).

use std::collections::HashMap;

use crate::metrics::{Ended, Operation};

use anyhow::Context as _;
use futures::StreamExt;

use super::apply::Applier;
use super::lookup::lookup;
use super::plan::PlannedEdit;
use crate::domain::{AddressId, Email, ListId, MemberState, Origin};
use crate::state::{AuditEntry, NewOperation};
use crate::stored_enums::{AuditEvent, AuditSource, OpKind};

impl Applier<'_> {
    /// Sends the edits of one list, finding EDM ids that are not known yet.
    pub(super) async fn send_edits(
        &mut self,
        list_id: ListId,
        edits: Vec<PlannedEdit>,
    ) -> anyhow::Result<()> {
        let ready = self.edm_ids(list_id, edits).await?;
        // A chunk at a time: recorded pending (one fenced transaction),
        // then sent with `edm.concurrency` edits in flight; answers are
        // handled as they come, and completed edits written a chunk at a
        // time.
        let ctx = self.ctx;
        let in_flight = ctx.settings.edm.concurrency.max(1);
        let mut done: Vec<MemberState> = Vec::new();
        for chunk in ready.chunks(crate::state::CHUNK) {
            if ctx.shutdown.is_cancelled() {
                break;
            }
            self.record_edits(list_id, chunk).await?;
            // Owned items: a stream of futures borrowing the chunk is not
            // `Send` for every lifetime, which the daemon's spawn needs.
            let mut answers = futures::stream::iter(chunk.to_vec())
                .map(move |(edit, id)| async move {
                    if ctx.shutdown.is_cancelled() {
                        // Not sent: it stays pending and is resolved by the
                        // next run.
                        return (edit, id, None);
                    }
                    let answer = ctx.edm.edit(id, &edit.key.email, &edit.fields).await;
                    (edit, id, Some(answer))
                })
                .buffer_unordered(in_flight);
            while let Some((edit, id, answer)) = answers.next().await {
                let Some(answer) = answer else {
                    continue;
                };
                self.counts.edm_writes += 1;
                match answer {
                    Ok(()) => {
                        done.push(self.edited(&edit, id));
                        if done.len() >= crate::state::CHUNK {
                            self.complete_edits(list_id, std::mem::take(&mut done))
                                .await?;
                        }
                    }
                    Err(e) if e.refusal().is_some() => {
                        let content = edit.fields.ml_addr_line(&edit.key.email);
                        self.refuse(OpKind::Edit, list_id, &edit.key.email, content, &e)
                            .await?;
                    }
                    Err(e) => {
                        let text = e.to_string();
                        ctx.store
                            .note_failure(
                                self.run_id,
                                OpKind::Edit,
                                list_id,
                                &[&edit.key.email],
                                &text,
                            )
                            .await?;
                        if e.is_auth() {
                            // The edits still out are dropped with the
                            // stream: they stay pending for the next run.
                            drop(answers);
                            self.complete_edits(list_id, done).await?;
                            return Err(anyhow::Error::new(e)
                                .context("EDM refused the credentials; run stopped"));
                        }
                        tracing::error!(list_id = list_id.0, address = %edit.key.email.masked(), error = %text, "edit failed; it stays pending for the next run");
                        self.counts.failed += 1;
                        crate::metrics::operations(Operation::Edit, Ended::Failed, 1);
                    }
                }
            }
        }
        self.complete_edits(list_id, done).await
    }

    /// The EDM id of each edit: known, or found in the list; an edit whose
    /// member EDM no longer holds is dropped and the member marked absent
    /// (the next run adds it again).
    async fn edm_ids(
        &mut self,
        list_id: ListId,
        edits: Vec<PlannedEdit>,
    ) -> anyhow::Result<Vec<(PlannedEdit, AddressId)>> {
        let unknown: Vec<Email> = edits
            .iter()
            .filter(|e| e.edm_id.is_none())
            .map(|e| e.key.email.clone())
            .collect();
        let found = if unknown.is_empty() {
            HashMap::new()
        } else {
            lookup(self.ctx, list_id, &unknown, self.known_in(list_id))
                .await
                .with_context(|| format!("cannot find EDM ids for edits in list {list_id}"))?
        };
        let mut ready: Vec<(PlannedEdit, AddressId)> = Vec::with_capacity(edits.len());
        let mut vanished: Vec<MemberState> = Vec::new();
        for edit in edits {
            match edit
                .edm_id
                .or_else(|| found.get(&edit.key.email).map(|a| a.id))
            {
                Some(id) => ready.push((edit, id)),
                None => {
                    // EDM no longer holds it: mark it absent; the next run
                    // adds it again.
                    tracing::warn!(list_id = list_id.0, address = %edit.key.email.masked(), "member to edit is not in the EDM list; it will be added again next run");
                    if let Some(m) = self.members.get(&edit.key) {
                        vanished.push(MemberState {
                            present: false,
                            edm_id: None,
                            ..m.clone()
                        });
                    }
                }
            }
        }
        if !vanished.is_empty() {
            self.ctx.store.upsert_members(&vanished, &[]).await?;
            for m in vanished {
                self.members.insert(m.key.clone(), m);
            }
        }
        Ok(ready)
    }

    /// Records a chunk of edits pending (one fenced transaction).
    async fn record_edits(
        &mut self,
        list_id: ListId,
        chunk: &[(PlannedEdit, AddressId)],
    ) -> anyhow::Result<()> {
        let records: Vec<NewOperation> = chunk
            .iter()
            .map(|(e, id)| NewOperation {
                kind: OpKind::Edit,
                list_id,
                email: e.key.email.clone(),
                edm_id: Some(*id),
                link_man_id: Some(e.link_man_id),
                customer_id: Some(e.customer_id),
                fields: e.fields.clone(),
                reason: None,
            })
            .collect();
        self.ctx
            .store
            .record_operations(self.run_id, &records)
            .await?;
        Ok(())
    }

    /// The member as EDM holds it after `edit` took effect (id `id`).
    fn edited(&self, edit: &PlannedEdit, id: AddressId) -> MemberState {
        let base = self.members.get(&edit.key);
        MemberState {
            key: edit.key.clone(),
            origin: base.map(|m| m.origin).unwrap_or(Origin::Owned),
            present: true,
            unsubscribed: false,
            link_man_id: Some(edit.link_man_id),
            customer_id: Some(edit.customer_id),
            edm_id: Some(id),
            fields: edit.fields.clone(),
        }
    }

    async fn complete_edits(
        &mut self,
        list_id: ListId,
        done: Vec<MemberState>,
    ) -> anyhow::Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let emails: Vec<Email> = done.iter().map(|m| m.key.email.clone()).collect();
        let refs: Vec<&Email> = emails.iter().collect();
        let audit: Vec<AuditEntry> = done
            .iter()
            .map(|m| {
                let changed = self
                    .members
                    .get(&m.key)
                    .map(|old| m.fields.changed_from(&old.fields).join(", "))
                    .unwrap_or_default();
                AuditEntry::now(AuditEvent::Edited, AuditSource::Crm, m.key.email.as_str())
                    .in_list(list_id)
                    .by(m.link_man_id, m.customer_id)
                    .detail(changed)
                    .in_run(Some(self.run_id))
            })
            .collect();
        self.ctx
            .store
            .complete_operations(self.run_id, OpKind::Edit, list_id, &refs, &done, &audit)
            .await?;
        self.counts.updated += done.len();
        crate::metrics::operations(Operation::Edit, Ended::Done, done.len());
        for m in done {
            self.members.insert(m.key.clone(), m);
        }
        self.forget_refused(OpKind::Edit, list_id, &refs).await
    }
}
