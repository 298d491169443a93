//! Logging: JSON lines by default (one object per event, fields flattened),
//! `pretty` for people. `RUST_LOG` overrides `log.level`. Logs go to
//! stderr; stdout is kept for what a command prints (`status`, the dry-run
//! plan, the demo's report).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Libraries whose INFO lines say nothing an operator acts on, quieted to
/// `warn` unless `RUST_LOG` says otherwise: PostgreSQL's notices ("relation
/// … already exists, skipping"), sea-orm's migrator ("Applying all pending
/// migrations"; the daemon logs one line of its own when it migrates) and
/// the scheduler's internals.
pub const QUIET: &str =
    "sqlx::postgres::notice=warn,sea_orm_migration=warn,tokio_cron_scheduler=warn";

/// The filter for `log.level`: that level, with [`QUIET`] appended.
pub fn directives(level: &str) -> String {
    format!("{level},{QUIET}")
}

/// Installs the global subscriber. Safe to call once per process.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(directives(level)))
        .unwrap_or_else(|_| EnvFilter::new(directives("info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    // A second call (tests) keeps the first subscriber.
    let _ = result;
}
