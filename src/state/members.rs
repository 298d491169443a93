//! The `members` table: what the daemon knows each list holds.

use anyhow::Context;
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, TransactionTrait,
};

use super::entities::member;
use super::*;
use crate::domain::{
    Email, ListId, MemberFields, MemberKey, MemberState, Members, Origin, VAR_COUNT,
};

pub(super) fn vars_to_json(fields: &MemberFields) -> String {
    serde_json::to_string(&fields.vars().collect::<Vec<_>>()).unwrap_or_else(|_| "[]".into())
}

pub(super) fn vars_from_json(text: &str) -> [String; VAR_COUNT] {
    let parsed: Vec<String> = serde_json::from_str(text).unwrap_or_default();
    std::array::from_fn(|i| parsed.get(i).cloned().unwrap_or_default())
}

pub(super) fn member_row(m: &MemberState, now: i64) -> member::ActiveModel {
    member::ActiveModel {
        list_id: Set(m.key.list_id),
        email: Set(m.key.email.to_string()),
        origin: Set(m.origin),
        present: Set(m.present),
        unsubscribed: Set(m.unsubscribed),
        link_man_id: Set(m.link_man_id),
        customer_id: Set(m.customer_id),
        edm_id: Set(m.edm_id),
        fullname: Set(m.fields.fullname().to_string()),
        vars: Set(vars_to_json(&m.fields)),
        updated_at: Set(now),
        ..Default::default()
    }
}

/// A member row as the run knows it; a row whose address is not valid is
/// logged and left out.
fn member_state(row: member::Model) -> Option<MemberState> {
    if row.email.starts_with(crate::domain::FORGOTTEN_PREFIX) {
        // `forget` kept only its hash: not an address any more.
        return None;
    }
    let Ok(email) = Email::parse(&row.email) else {
        tracing::warn!(
            member_id = row.id,
            "member row with an invalid address ignored"
        );
        return None;
    };
    Some(MemberState {
        key: MemberKey::new(row.list_id, email),
        origin: row.origin,
        present: row.present,
        unsubscribed: row.unsubscribed,
        link_man_id: row.link_man_id,
        customer_id: row.customer_id,
        edm_id: row.edm_id,
        fields: MemberFields::raw(&row.fullname, &vars_from_json(&row.vars)),
    })
}

impl Store {
    /// Every member row, keyed. Read in pages by id, so the driver never
    /// buffers the whole table next to the map being built.
    pub async fn load_members(&self) -> anyhow::Result<Members> {
        const PAGE: u64 = 2000;
        use sea_orm::PaginatorTrait;
        // Sized once: a growing `Vec` would hold its old and new buffers
        // at once when it doubles.
        let count = member::Entity::find()
            .count(&self.db)
            .await
            .context("cannot count members")?;
        let mut out = Vec::with_capacity(count as usize);
        let mut after = i64::MIN;
        loop {
            let rows = member::Entity::find()
                .filter(member::Column::Id.gt(after))
                .order_by_asc(member::Column::Id)
                .limit(PAGE)
                .all(&self.db)
                .await
                .context("cannot read members")?;
            let Some(last) = rows.last() else { break };
            after = last.id;
            let n = rows.len() as u64;
            out.extend(rows.into_iter().filter_map(member_state));
            if n < PAGE {
                break;
            }
        }
        Ok(Members::from_rows(out))
    }

    /// The members, in any list, whose address is one of `addresses`
    /// (the write-back's owners of the addresses its events name): read
    /// list by list, [`CHUNK`] addresses a query, through the `(list_id,
    /// email)` index, so the cost follows the addresses asked for and not
    /// the size of the table. An address that is not valid has no member.
    pub async fn members_with_addresses(&self, addresses: &[&str]) -> anyhow::Result<Members> {
        let lists: Vec<ListId> = member::Entity::find()
            .select_only()
            .column(member::Column::ListId)
            .distinct()
            .into_tuple()
            .all(&self.db)
            .await
            .context("cannot read the lists members are in")?;
        let mut out = Vec::new();
        for list_id in lists {
            out.extend(self.members_of_list(list_id, addresses).await?);
        }
        Ok(Members::from_rows(out))
    }

    /// The members of `list_id` whose address is one of `addresses`.
    pub async fn members_of_list(
        &self,
        list_id: ListId,
        addresses: &[&str],
    ) -> anyhow::Result<Vec<MemberState>> {
        let mut emails: Vec<String> = addresses
            .iter()
            .filter_map(|a| Email::parse(a).ok())
            .map(String::from)
            .collect();
        emails.sort_unstable();
        emails.dedup();
        let mut out = Vec::new();
        for chunk in emails.chunks(CHUNK) {
            let rows = member::Entity::find()
                .filter(member::Column::ListId.eq(list_id))
                .filter(member::Column::Email.is_in(chunk.iter().cloned()))
                .all(&self.db)
                .await
                .with_context(|| format!("cannot read members of list {list_id}"))?;
            out.extend(rows.into_iter().filter_map(member_state));
        }
        Ok(out)
    }

    /// Writes member rows whole (adoptions, owner changes), with the
    /// consent-trail entries of the change, in one transaction.
    pub async fn upsert_members(
        &self,
        members: &[MemberState],
        audit: &[AuditEntry],
    ) -> anyhow::Result<()> {
        let txn = self.db.begin().await?;
        upsert_members(&txn, members, now_ms()).await?;
        super::audit::insert_audit(&txn, audit).await?;
        txn.commit().await?;
        Ok(())
    }

    /// Member counts per list: `(list_id, origin, present, count)`.
    pub async fn member_counts(&self) -> anyhow::Result<Vec<(ListId, Origin, bool, u64)>> {
        let rows: Vec<(ListId, Origin, bool, i64)> = member::Entity::find()
            .select_only()
            .column(member::Column::ListId)
            .column(member::Column::Origin)
            .column(member::Column::Present)
            .column_as(member::Column::Id.count(), "n")
            .group_by(member::Column::ListId)
            .group_by(member::Column::Origin)
            .group_by(member::Column::Present)
            .order_by_asc(member::Column::ListId)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(l, o, p, n)| (l, o, p, n as u64))
            .collect())
    }
}

pub(super) async fn upsert_members<C: ConnectionTrait>(
    db: &C,
    members: &[MemberState],
    now: i64,
) -> anyhow::Result<()> {
    let members = one_per_key(members, |m| &m.key, true);
    for chunk in members.chunks(CHUNK) {
        member::Entity::insert_many(chunk.iter().map(|m| member_row(m, now)))
            .on_conflict(
                OnConflict::columns([member::Column::ListId, member::Column::Email])
                    .update_columns([
                        member::Column::Origin,
                        member::Column::Present,
                        member::Column::Unsubscribed,
                        member::Column::LinkManId,
                        member::Column::CustomerId,
                        member::Column::EdmId,
                        member::Column::Fullname,
                        member::Column::Vars,
                        member::Column::UpdatedAt,
                    ])
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await
            .context("cannot write members")?;
    }
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::super::tests::{both_urls, upgraded_from_before};

    /// Rows as a database from before `members.unsubscribed` holds them.
    const OLD_ROWS: &str = "
        INSERT INTO members (list_id, email, origin, present, link_man_id, customer_id, edm_id, fullname, vars, updated_at) VALUES
          (1, 'gone@x.cn', 'owned', FALSE, 7, 3, NULL, 'G', '[]', 1),
          (1, 'back@x.cn', 'owned', FALSE, 8, 3, NULL, 'B', '[]', 1),
          (1, 'deleted@x.cn', 'owned', FALSE, 9, 3, NULL, 'D', '[]', 1),
          (1, 'kept@x.cn', 'owned', TRUE, 10, 3, 5, 'K', '[]', 1);
        INSERT INTO operations (run_id, kind, list_id, email, fullname, vars, status, attempts, export_matched, created_at, updated_at) VALUES
          ('r1', 'add', 1, 'gone@x.cn', 'G', '[]', 'done', 0, FALSE, 1, 1),
          ('r2', 'unsub', 1, 'gone@x.cn', '', '[]', 'done', 0, FALSE, 2, 2),
          ('r1', 'unsub', 1, 'back@x.cn', '', '[]', 'done', 0, FALSE, 1, 1),
          ('r2', 'add', 1, 'back@x.cn', 'B', '[]', 'done', 0, FALSE, 2, 2),
          ('r2', 'unsub', 1, 'deleted@x.cn', '', '[]', 'superseded', 0, FALSE, 2, 2);
    ";

    #[tokio::test]
    async fn the_migration_marks_absent_members_whose_last_completed_write_was_an_unsubscribe() {
        let _sockets = super::super::tests::FOREIGN_PG_SOCKETS.read().await;
        let dir = tempfile::tempdir().unwrap();
        let (urls, _guard) = both_urls(dir.path()).await;
        for url in urls {
            // Arrange, act: the schema before the column, holding old
            // rows, migrated.
            let store = upgraded_from_before(13, &url, OLD_ROWS).await;
            let members = store.load_members().await.unwrap();

            // Assert: only the address whose last add-or-unsubscribe
            // completed as an unsubscribe is marked.
            let marked: Vec<&str> = members
                .values()
                .filter(|m| m.unsubscribed)
                .map(|m| m.key.email.as_str())
                .collect();
            assert_eq!(marked, vec!["gone@x.cn"], "{url}");
            store.close().await;
        }
    }
}
