//! `audit`: the consent trail, read-only. `audit EMAIL` prints an
//! address's entries oldest first (an address pasted masked from a log
//! line is answered for every recorded address it may stand for);
//! `audit --since DATE [--until DATE]` exports every entry of a range of
//! days (UTC, both ends inclusive) as JSON lines or CSV, a page at a
//! time.

use std::io::Write as _;
use std::process::ExitCode;

use chrono::NaiveDate;

use crate::cli::{AuditFormat, EXIT_CONFIG, EXIT_FAILED};
use crate::config::Settings;
use crate::domain::{Email, mask_address};
use crate::state::{AuditRecord, Store};

/// What `audit` was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub email: Option<String>,
    pub json: bool,
    pub since: Option<String>,
    pub until: Option<String>,
    pub format: Option<AuditFormat>,
}

/// A question that cannot be asked: exit 2 with this line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadQuestion(String);

/// Whether `raw` is an address as the logs mask it (`l***@example.com`,
/// or `x*** (no @)` for an invalid one).
pub fn is_masked(raw: &str) -> bool {
    raw.contains("***")
}

/// The milliseconds a `--since`/`--until` day starts at (UTC).
fn day_start(flag: &str, text: &str) -> Result<i64, BadQuestion> {
    NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
        .ok_or_else(|| BadQuestion(format!("{flag}: {text:?} is not a date (YYYY-MM-DD)")))
}

/// The range `--since`/`--until` name: from the start of the first day to
/// the end of the last (`until` absent: no end).
pub fn range(since: &str, until: Option<&str>) -> Result<(i64, i64), BadQuestion> {
    let from = day_start("--since", since)?;
    let to = match until {
        Some(until) => day_start("--until", until)? + 86_400_000,
        None => i64::MAX,
    };
    if to <= from {
        return Err(BadQuestion(format!(
            "--until {} is before --since {since}",
            until.unwrap_or_default()
        )));
    }
    Ok((from, to))
}

/// The addresses `raw` names: every recorded one a masked form may stand
/// for, or the address itself; an address that is neither is refused,
/// named masked.
async fn addresses(store: &Store, raw: &str) -> anyhow::Result<Result<Vec<String>, BadQuestion>> {
    if is_masked(raw) {
        return Ok(Ok(store.emails_matching_mask(raw).await?));
    }
    Ok(match Email::parse(raw) {
        // A forgotten address's trail is kept under its keyed hash.
        Ok(email) => Ok(std::iter::once(email.as_str().to_string())
            .chain(hashed(store, email.as_str()).await)
            .collect()),
        Err(reason) => Err(BadQuestion(format!(
            "{} is not a valid address: {reason}",
            mask_address(raw.trim())
        ))),
    })
}

/// What `email` is kept as once forgotten; `None` from a database older
/// than `forget` (no key: nothing was forgotten in it).
pub async fn hashed(store: &Store, email: &str) -> Option<String> {
    store.forgotten_hash(email).await.ok()
}

/// `crm-edm-sync audit …`.
pub async fn print(settings: &Settings, q: Question) -> anyhow::Result<ExitCode> {
    let bad = |b: BadQuestion| {
        println!("crm-edm-sync: audit: {b}");
        Ok(ExitCode::from(EXIT_CONFIG))
    };
    let range = match q.since.as_deref().map(|s| range(s, q.until.as_deref())) {
        Some(Err(b)) => return bad(b),
        Some(Ok(r)) => Some(r),
        None => None,
    };
    let Some(store) = Store::open_read_only(&settings.database.url).await? else {
        println!(
            "no state database yet: nothing has run against database.url (or it points elsewhere)"
        );
        return Ok(ExitCode::from(EXIT_FAILED));
    };
    let result = match (range, q.email.as_deref()) {
        (Some((from, to)), _) => export(&store, from, to, q.format.unwrap_or_default()).await,
        (None, Some(raw)) => match addresses(&store, raw).await {
            Ok(Ok(emails)) => trail(&store, raw, &emails, q.json).await,
            Ok(Err(b)) => {
                store.close().await;
                return bad(b);
            }
            Err(e) => Err(e),
        },
        (None, None) => Err(anyhow::anyhow!("audit needs an address or --since")),
    };
    store.close().await;
    result.map(|()| ExitCode::SUCCESS)
}

/// An address's trail on stdout: JSON (an array) or a line an entry.
async fn trail(store: &Store, raw: &str, emails: &[String], json: bool) -> anyhow::Result<()> {
    let records = store.audit_of(emails).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(());
    }
    if records.is_empty() {
        println!("{}: no consent-trail entry", raw.trim());
    }
    for r in &records {
        println!("{}", to_line(r));
    }
    Ok(())
}

/// One entry as a line of text.
pub fn to_line(r: &AuditRecord) -> String {
    let mut line = format!(
        "{}  {}  {}  {}",
        r.at,
        r.email,
        r.list_id
            .map_or_else(|| "every list".to_string(), |l| format!("list {l}")),
        r.event.as_str()
    );
    if let Some(reason) = &r.reason {
        line.push_str(&format!(" ({reason})"));
    }
    if let Some(id) = r.link_man_id {
        line.push_str(&format!("  link-man {id}"));
    }
    if let Some(id) = r.customer_id {
        line.push_str(&format!(" customer {id}"));
    }
    line.push_str(&format!("  by {}", r.source.as_str()));
    if let Some(detail) = r.detail.as_deref().filter(|d| !d.is_empty()) {
        line.push_str(&format!(": {detail}"));
    }
    if let Some(run) = &r.run_id {
        line.push_str(&format!("  run {run}"));
    }
    line
}

/// Every entry of a range on stdout, a page at a time.
async fn export(store: &Store, from: i64, to: i64, format: AuditFormat) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let out = std::io::BufWriter::new(stdout.lock());
    match format {
        AuditFormat::Jsonl => {
            let mut out = out;
            store
                .audit_between(from, to, |r| {
                    serde_json::to_writer(&mut out, &r)?;
                    out.write_all(b"\n")?;
                    Ok(())
                })
                .await?;
            out.flush()?;
        }
        AuditFormat::Csv => {
            let mut out = csv::WriterBuilder::new()
                .has_headers(false)
                .from_writer(out);
            // The header, also when the range is empty.
            out.write_record(CSV_HEADER)?;
            store
                .audit_between(from, to, |r| Ok(out.serialize(CsvRow::from(r))?))
                .await?;
            out.flush()?;
        }
    }
    Ok(())
}

/// The CSV columns: the JSON fields, in their order.
pub const CSV_HEADER: [&str; 10] = [
    "at",
    "email",
    "list_id",
    "event",
    "reason",
    "link_man_id",
    "customer_id",
    "source",
    "run_id",
    "detail",
];

/// A CSV row (the header is written by hand, so that an empty range has
/// one too).
#[derive(serde::Serialize)]
struct CsvRow {
    at: String,
    email: String,
    list_id: Option<i64>,
    event: &'static str,
    reason: Option<String>,
    link_man_id: Option<i64>,
    customer_id: Option<i64>,
    source: &'static str,
    run_id: Option<String>,
    detail: Option<String>,
}

impl From<AuditRecord> for CsvRow {
    fn from(r: AuditRecord) -> Self {
        CsvRow {
            at: r.at,
            email: r.email,
            list_id: r.list_id,
            event: r.event.as_str(),
            reason: r.reason,
            link_man_id: r.link_man_id,
            customer_id: r.customer_id,
            source: r.source.as_str(),
            run_id: r.run_id,
            detail: r.detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_runs_from_the_first_day_to_the_end_of_the_last_in_utc() {
        let (from, to) = range("2026-01-02", Some("2026-01-03")).unwrap();

        assert_eq!(from, 1_767_312_000_000);
        assert_eq!(to - from, 2 * 86_400_000);
        assert_eq!(range("2026-01-02", None).unwrap().1, i64::MAX);
    }

    #[test]
    fn a_date_that_does_not_parse_names_its_flag() {
        let since = range("2026-13-01", None).unwrap_err().to_string();
        let until = range("2026-01-01", Some("yesterday"))
            .unwrap_err()
            .to_string();
        let reversed = range("2026-01-05", Some("2026-01-01"))
            .unwrap_err()
            .to_string();

        assert!(since.starts_with("--since: \"2026-13-01\""), "{since}");
        assert!(until.starts_with("--until: \"yesterday\""), "{until}");
        assert!(reversed.contains("before --since"), "{reversed}");
    }
}
