//! `forget`: an address replaced by its keyed hash in every table that
//! holds it, and the bytes it leaves behind overwritten.

use anyhow::Context;
use sea_orm::sea_query::{Alias, Cond, Expr, ExprTrait, Func, Query};
use sea_orm::{ConnectionTrait, DatabaseBackend, TransactionTrait};

use super::*;

/// Where an address is kept: a table, the column that holds it whole
/// (rewritten to the hash when equal to the address), and the text columns
/// that may quote it (the address replaced inside them).
const PLACES: &[(&str, Option<&str>, &[&str])] = &[
    ("members", Some("email"), &[]),
    ("operations", Some("email"), &["last_error"]),
    ("suppressions", Some("email"), &["source"]),
    ("unsub_lines", Some("email"), &[]),
    (
        "writeback_ledger",
        Some("email"),
        &["title", "content", "last_error"],
    ),
    ("refusals", Some("email"), &["content", "message"]),
    ("audit_trail", Some("email"), &["detail"]),
    ("runs", None, &["error", "counts"]),
    ("run_requests", None, &["output"]),
];

/// What `forget` changed in the state database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forgot {
    /// Rows that held the address, by table.
    pub rows: Vec<(&'static str, u64)>,
}

impl Store {
    /// The key `forget` hashes with (made by the migration that created
    /// it).
    pub async fn forget_key(&self) -> anyhow::Result<Vec<u8>> {
        let row = self
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                self.db.get_database_backend(),
                "SELECT value FROM secrets WHERE name = 'forget_key'".to_string(),
            ))
            .await
            .context("cannot read the forget key")?
            .context("the state database has no forget key (a migration is missing)")?;
        let hex_key: String = row.try_get("", "value")?;
        Ok(hex_key.into_bytes())
    }

    /// What `email` (normalised) is kept as once forgotten, under this
    /// database's key.
    pub async fn forgotten_hash(&self, email: &str) -> anyhow::Result<String> {
        let key = self.forget_key().await?;
        Ok(crate::domain::Forgotten::new(key, Default::default()).hash(email))
    }

    /// Replaces `email` by `hash` in every table, records the hash as
    /// forgotten (never added again) and appends `entries` (the trail's
    /// `forgotten` entry among them) — one transaction; then overwrites
    /// what the old rows leave in the files.
    pub async fn forget(
        &self,
        email: &str,
        hash: &str,
        entries: &[AuditEntry],
    ) -> anyhow::Result<Forgot> {
        let backend = self.db.get_database_backend();
        let txn = self.db.begin().await?;
        self.check_fence(&txn).await?;
        if backend == DatabaseBackend::Sqlite {
            // Deleted and rewritten content is zeroed in the file.
            txn.execute_unprepared("PRAGMA secure_delete = ON").await?;
        }
        let mut out = Forgot::default();
        for &(table, column, texts) in PLACES {
            let n = rewrite(&txn, table, column, texts, email, hash).await?;
            if n > 0 {
                out.rows.push((table, n));
            }
        }
        // The findings logged once about it: their digests are of the
        // address, unkeyed.
        let notes = txn
            .execute(
                Query::delete()
                    .from_table(Alias::new("log_notes"))
                    .and_where(Expr::expr(Func::lower(Expr::col(Alias::new("address")))).eq(email)),
            )
            .await
            .context("cannot delete the findings of the address")?;
        if notes.rows_affected() > 0 {
            out.rows.push(("log_notes", notes.rows_affected()));
        }
        observations::insert_suppressions(
            &txn,
            &[NewSuppression {
                list_id: None,
                email: hash.to_string(),
                reason: SuppressionReason::Forgotten,
                source: SuppressionSource::Other("forget".into()),
            }],
            entries,
        )
        .await?;
        txn.commit().await.context("cannot commit the forgetting")?;
        self.scrub(backend).await?;
        Ok(out)
    }

    /// Overwrites the bytes the rewritten rows left: SQLite rebuilds the
    /// file and empties its write-ahead log; PostgreSQL rewrites the
    /// tables (`VACUUM FULL`), so no dead row holds the address.
    async fn scrub(&self, backend: DatabaseBackend) -> anyhow::Result<()> {
        let statements: Vec<String> = match backend {
            DatabaseBackend::Sqlite => vec![
                "PRAGMA secure_delete = ON".into(),
                "VACUUM".into(),
                "PRAGMA wal_checkpoint(TRUNCATE)".into(),
            ],
            _ => {
                let tables: Vec<&str> = PLACES
                    .iter()
                    .map(|(t, _, _)| *t)
                    .chain(["log_notes"])
                    .collect();
                vec![format!("VACUUM FULL {}", tables.join(", "))]
            }
        };
        for statement in statements {
            self.db
                .execute_unprepared(&statement)
                .await
                .with_context(|| format!("cannot overwrite what was deleted ({statement})"))?;
        }
        Ok(())
    }
}

/// Rewrites `email` to `hash` in `table`: the whole `column` where it is
/// the address, and inside each of `texts`.
async fn rewrite<C: ConnectionTrait>(
    db: &C,
    table: &str,
    column: Option<&str>,
    texts: &[&str],
    email: &str,
    hash: &str,
) -> anyhow::Result<u64> {
    let mut update = Query::update();
    update.table(Alias::new(table));
    let mut which = Cond::any();
    if let Some(column) = column {
        update.value(
            Alias::new(column),
            Expr::case(Expr::col(Alias::new(column)).eq(email), hash)
                .finally(Expr::col(Alias::new(column))),
        );
        which = which.add(Expr::col(Alias::new(column)).eq(email));
    }
    for text in texts {
        update.value(
            Alias::new(*text),
            Func::cust(Alias::new("REPLACE"))
                .arg(Expr::col(Alias::new(*text)))
                .arg(email)
                .arg(hash),
        );
        which = which.add(Expr::col(Alias::new(*text)).like(format!("%{email}%")));
    }
    update.cond_where(which);
    let done = db
        .execute(&update)
        .await
        .with_context(|| format!("cannot forget the address in {table}"))?;
    Ok(done.rows_affected())
}
