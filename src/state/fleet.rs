//! What a daemon reads of each tenant it serves, every second or on every
//! `/healthz`, through one connection per process that sits on no tenant's
//! `search_path` (the lock connection, `lock::Session`): the tables are
//! named with the tenant's schema. A thousand idle tenants then cost no
//! connection of their own; a tenant's pool opens only while it works.

use anyhow::Context;
use sea_orm::ActiveEnum;
use sea_orm::sqlx::{self, PgConnection};

use crate::stored_enums::{Job, RequestState, RunStatus};

/// A tenant's lease epoch and whether a `--once` request waits for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peek {
    /// `None` before anyone took the lease.
    pub epoch: Option<i64>,
    pub asked: bool,
}

/// `schema.` (quoted) for a tenant's schema, nothing for `default`'s
/// tables on the connection's own `search_path`. Schema names are
/// `tenant_` and `[a-z0-9_]` (see `config::Tenant::schema`).
fn prefix(schema: Option<&str>) -> anyhow::Result<String> {
    match schema {
        None => Ok(String::new()),
        Some(s)
            if s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') =>
        {
            Ok(format!("\"{s}\"."))
        }
        Some(s) => anyhow::bail!("{s:?} is not a tenant schema"),
    }
}

/// Reads the tenant's [`Peek`] on `conn`.
pub async fn peek(conn: &mut PgConnection, schema: Option<&str>) -> anyhow::Result<Peek> {
    let p = prefix(schema)?;
    let sql = format!(
        "SELECT (SELECT epoch FROM {p}lease WHERE id = 1 AND epoch > 0), EXISTS (SELECT 1 FROM {p}run_requests WHERE state = $1)"
    );
    let (epoch, asked): (Option<i64>, bool) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(RequestState::Queued.to_value())
        .fetch_one(conn)
        .await
        .context("cannot read the tenant's lease and requests")?;
    Ok(Peek { epoch, asked })
}

/// Reads the [`Peek`] of every schema of `schemas` on `conn` in one
/// statement (what a daemon's lock connection reads every second for all
/// the tenants it holds), in their order. One schema whose tables cannot
/// be read fails the whole statement: the caller then reads them one by
/// one ([`peek`]), so that only that tenant learns of it.
pub async fn peek_many(
    conn: &mut PgConnection,
    schemas: &[Option<&str>],
) -> anyhow::Result<Vec<Peek>> {
    if schemas.is_empty() {
        return Ok(Vec::new());
    }
    let mut parts = Vec::with_capacity(schemas.len());
    for (i, schema) in schemas.iter().enumerate() {
        let p = prefix(*schema)?;
        parts.push(format!(
            "SELECT {i}::int4, (SELECT epoch FROM {p}lease WHERE id = 1 AND epoch > 0), EXISTS (SELECT 1 FROM {p}run_requests WHERE state = $1)"
        ));
    }
    let sql = parts.join(" UNION ALL ");
    // Not prepared: the set of held tenants changes, and a statement kept
    // per set would fill the connection's cache.
    let rows: Vec<(i32, Option<i64>, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(RequestState::Queued.to_value())
        .persistent(false)
        .fetch_all(conn)
        .await
        .context("cannot read the tenants' leases and requests")?;
    let mut peeks = vec![None; schemas.len()];
    for (i, epoch, asked) in rows {
        if let Some(slot) = usize::try_from(i).ok().and_then(|i| peeks.get_mut(i)) {
            *slot = Some(Peek { epoch, asked });
        }
    }
    peeks
        .into_iter()
        .map(|p| p.context("a tenant's lease is missing from the answer"))
        .collect()
}

/// The last finished (not dry) run of each job of the tenant, newest
/// first: its job, how it ended and its error.
pub async fn last_finished(
    conn: &mut PgConnection,
    schema: Option<&str>,
) -> anyhow::Result<Vec<(Job, RunStatus, Option<String>)>> {
    let p = prefix(schema)?;
    let sql = format!(
        "SELECT job, status, error FROM {p}runs WHERE finished_at IS NOT NULL AND dry_run = false ORDER BY started_at DESC LIMIT 100"
    );
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(conn)
        .await
        .context("cannot read runs")?;
    let mut seen = std::collections::HashSet::new();
    Ok(rows
        .into_iter()
        .filter_map(|(job, status, error)| {
            let job = Job::try_from_value(&job).ok()?;
            let status = RunStatus::try_from_value(&status).ok()?;
            seen.insert(job).then_some((job, status, error))
        })
        .collect())
}
