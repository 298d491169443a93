//! Logging: JSON lines by default (one object per event, fields flattened),
//! `pretty` for people. A JSON line also carries the fields of every span
//! it is written in (outermost first; the event's own fields win), so each
//! line a run writes has its `job` and `run_id`. `RUST_LOG` overrides `log.level`. Logs go to
//! stderr; stdout is kept for what a command prints (`status`, the dry-run
//! plan, the demo's report).

use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Libraries whose INFO lines say nothing an operator acts on, quieted to
/// `warn` unless `RUST_LOG` says otherwise: PostgreSQL's notices ("relation
/// … already exists, skipping"), sea-orm's migrator ("Applying all pending
/// migrations"; the daemon logs one line of its own when it migrates) and
/// the scheduler's internals.
pub(crate) const QUIET: &str =
    "sqlx::postgres::notice=warn,sea_orm_migration=warn,tokio_cron_scheduler=warn";

/// The filter for `log.level`: that level, with [`QUIET`] appended.
pub(crate) fn directives(level: &str) -> String {
    format!("{level},{QUIET}")
}

/// Why `RUST_LOG` cannot be used, if it cannot: it does not parse, or it
/// would silence this program's own lines — even its ERRORs — (no global
/// level, or `off`, and no `crm_edm_sync` directive).
pub(crate) fn unusable_rust_log(value: &str) -> Option<String> {
    if let Err(e) = EnvFilter::try_new(value) {
        return Some(format!("not a filter: {e}"));
    }
    let levels = ["trace", "debug", "info", "warn", "error"];
    let mut global = None;
    let mut ours = false;
    for d in value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let lower = d.to_ascii_lowercase();
        if levels.contains(&lower.as_str()) || lower == "off" {
            global = Some(lower);
        } else if lower.starts_with("crm_edm_sync") {
            ours = true;
        }
    }
    let silenced = !ours && global.as_deref().is_none_or(|g| g == "off");
    silenced.then(|| "it lets none of this program's lines through, not even ERRORs".to_string())
}

/// Changes the level filter of the installed subscriber (SIGHUP reload).
static RELOAD: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

/// Whether a usable `RUST_LOG` decided the filter at start: then it keeps
/// deciding, and `log.level` changes nothing until it is unset.
static RUST_LOG_RULES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Installs the global subscriber. Safe to call once per process.
/// `RUST_LOG` overrides `level`, unless it is unusable
/// ([`unusable_rust_log`]): then `level` is used and a WARN line says so.
pub(crate) fn init(format: LogFormat, level: &str) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let refused = rust_log.as_deref().and_then(unusable_rust_log);
    let from_env = match (&rust_log, &refused) {
        (Some(v), None) => EnvFilter::try_new(v).ok(),
        _ => None,
    };
    let env_rules = from_env.is_some();
    let filter = from_env
        .or_else(|| EnvFilter::try_new(directives(level)).ok())
        .unwrap_or_else(|| EnvFilter::new(directives("info")));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let lines = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let result = tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .try_init();
    // A second call (tests) keeps the first subscriber.
    if result.is_ok() {
        let _ = RELOAD.set(handle);
        RUST_LOG_RULES.store(env_rules, std::sync::atomic::Ordering::SeqCst);
        if let Some(why) = refused {
            tracing::warn!(reason = %why, log_level = level, "RUST_LOG is not used: log.level applies");
        }
    }
}

/// Applies a new `log.level` (a reload): from the next line on. `Err`
/// says why not (`RUST_LOG` decides, or no subscriber of ours is
/// installed).
pub(crate) fn set_level(level: &str) -> Result<(), String> {
    if RUST_LOG_RULES.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(
            "RUST_LOG is set and decides the level; log.level applies once it is unset".into(),
        );
    }
    let filter = EnvFilter::try_new(directives(level)).map_err(|e| e.to_string())?;
    RELOAD
        .get()
        .ok_or_else(|| "no log subscriber installed by this program".to_string())?
        .reload(filter)
        .map_err(|e| e.to_string())
}

/// One JSON object a line: `timestamp`, `level`, the event's fields
/// (`message` among them), the fields of the spans it is in, `target`.
struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert(
            "level".into(),
            Value::String(event.metadata().level().to_string()),
        );
        event.record(&mut Fields(&mut line));
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&fields.fields) {
                    for (k, v) in fields {
                        line.entry(k).or_insert(v);
                    }
                }
            }
        }
        line.insert(
            "target".into(),
            Value::String(event.metadata().target().to_string()),
        );
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// Fields whose text is JSON and is written as JSON, not as a string:
/// the per-list counts of a drift report's `run finished` line.
const JSON_FIELDS: &[&str] = &["lists"];

/// Records an event's fields into a JSON object.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        let value = JSON_FIELDS
            .contains(&field.name())
            .then(|| serde_json::from_str::<Value>(&text).ok())
            .flatten()
            .unwrap_or(Value::String(text));
        self.0.insert(field.name().into(), value);
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.into()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names a JSON line has of its own: an event field of the same
    /// name would overwrite it (a field `message` replaced the line's
    /// message with EDM's text).
    const RESERVED: [&str; 6] = ["message", "level", "timestamp", "target", "fields", "span"];

    /// The field names of every `tracing::…!(…)` call in `text`.
    fn event_fields(text: &str) -> Vec<String> {
        let mut names = Vec::new();
        for level in ["trace", "debug", "info", "warn", "error"] {
            let opener = format!("tracing::{level}!(");
            let mut rest = text;
            while let Some(at) = rest.find(&opener) {
                let body = &rest[at + opener.len()..];
                let (mut depth, mut in_str, mut end) = (1, false, body.len());
                let mut parts = vec![String::new()];
                let mut prev = ' ';
                for (i, c) in body.char_indices() {
                    match c {
                        '"' if prev != '\\' => in_str = !in_str,
                        '(' | '[' | '{' if !in_str => depth += 1,
                        ')' | ']' | '}' if !in_str => {
                            depth -= 1;
                            if depth == 0 {
                                end = i;
                                break;
                            }
                        }
                        ',' if !in_str && depth == 1 => {
                            parts.push(String::new());
                            prev = c;
                            continue;
                        }
                        _ => {}
                    }
                    if let Some(p) = parts.last_mut() {
                        p.push(c);
                    }
                    prev = c;
                }
                for part in parts {
                    let part = part.trim();
                    if part.is_empty() || part.starts_with('"') {
                        continue;
                    }
                    let name = part.split('=').next().unwrap_or("").trim();
                    let name = name.trim_start_matches(['%', '?']);
                    if name
                        .chars()
                        .all(|c| c.is_alphanumeric() || c == '_' || c == '.')
                    {
                        names.push(name.to_string());
                    }
                }
                rest = &body[end..];
            }
        }
        names
    }

    fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn no_event_the_code_emits_has_a_field_named_like_the_line_itself() {
        // Arrange
        let mut files = Vec::new();
        rust_files(std::path::Path::new("src"), &mut files);

        // Act
        let mut clashes = Vec::new();
        let mut seen = 0;
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap();
            // The code, not its tests (which sit at the end of a file).
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            for name in event_fields(code) {
                seen += 1;
                if RESERVED.contains(&name.as_str()) {
                    clashes.push(format!("{}: {name}", file.display()));
                }
            }
        }

        // Assert
        assert!(
            seen > 100,
            "only {seen} event fields found: the scan is broken"
        );
        assert!(clashes.is_empty(), "{clashes:?}");
        assert_eq!(
            event_fields(r#"tracing::error!(code, message, x = %y, "text, with comma")"#),
            ["code", "message", "x"]
        );
    }

    #[test]
    fn a_rust_log_that_would_silence_this_program_is_refused_and_a_usable_one_is_not() {
        for bad in ["off", "nonsense", "sqlx=debug", "[[[", "crm=info,off"] {
            assert!(
                unusable_rust_log(bad).is_some(),
                "{bad:?} should be refused"
            );
        }
        for good in [
            "info",
            "debug,sqlx=warn",
            "crm_edm_sync=trace",
            "WARN",
            "error",
        ] {
            assert_eq!(unusable_rust_log(good), None, "{good:?}");
        }
    }
}
