//! The strict pass over the layers, before the `config` crate builds the
//! settings.
//!
//! The `config` crate coerces: `concurrency = 4.7` becomes 4, `list_id =
//! true` becomes 1, `page_size = "50"` becomes 50 — a typo turned into a
//! running daemon. This pass stacks the same layers (built-in defaults →
//! file → environment) into one TOML table and deserialises it with TOML's
//! own types, which coerce nothing. An error names the key, the type the
//! key wants and where the value came from (the file, or the environment
//! variable by its name), and never the value itself: it may be a secret
//! put in the wrong place.

use std::collections::BTreeMap;

use toml::{Table, Value};

use super::{ConfigError, ENV_PREFIX, Settings};

/// Keys without a built-in default, with the kind of value each takes, so
/// that the environment can set them too.
const OPTIONAL_KEYS: &[(&str, Kind)] = &[
    ("crm.max_requests_per_sec", Kind::Integer),
    ("edm.max_requests_per_sec", Kind::Integer),
    ("crm.token_file", Kind::Text),
    ("edm.password_file", Kind::Text),
    ("tenants.dir", Kind::Text),
    ("reseller.username", Kind::Text),
    ("reseller.password", Kind::Text),
    ("reseller.password_file", Kind::Text),
    ("reseller.base_url", Kind::Text),
    ("reseller.top_up_below", Kind::Integer),
    ("reseller.top_up_count", Kind::Integer),
    ("reseller.top_up_max_per_day", Kind::Integer),
];

/// The kinds of value a key takes, as TOML spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Integer,
    Float,
    Boolean,
    Text,
    Section,
    List,
}

impl Kind {
    fn of(value: &Value) -> Kind {
        match value {
            Value::Integer(_) => Kind::Integer,
            Value::Float(_) => Kind::Float,
            Value::Boolean(_) => Kind::Boolean,
            Value::Table(_) => Kind::Section,
            Value::Array(_) => Kind::List,
            Value::String(_) | Value::Datetime(_) => Kind::Text,
        }
    }
}

/// Where each key's value came from: the environment variable that set it.
/// Keys not in it came from the file (or the defaults).
pub(super) type EnvOrigins = BTreeMap<String, String>;

/// The layers, stacked and checked; returns which variable set which key,
/// and the stacked table. `file` is the parsed config file and its name as
/// shown; `env` the variables under [`ENV_PREFIX`].
pub(super) fn check_layers(
    defaults: &str,
    file: Option<(&Table, &str)>,
    env: &[(String, String)],
) -> Result<(EnvOrigins, Table), ConfigError> {
    let mut table: Table = defaults
        .parse()
        .map_err(|e| ConfigError::Load(format!("built-in defaults are not TOML: {e}")))?;
    if let Some((file, _)) = file {
        merge(&mut table, file.clone());
    }
    let origins = overlay_environment(&mut table, env)?;
    let shown = file.map(|(_, shown)| shown);
    serde_path_to_error::deserialize::<_, Settings>(Value::Table(table.clone())).map_err(|e| {
        let key = e.path().to_string();
        // TOML's own message adds "in `key`" lines; the key is named
        // already.
        let message = e.inner().to_string();
        let reason = describe(message.lines().next().unwrap_or_default().trim());
        ConfigError::Invalid {
            reason: format!("{reason}{}", origin_of(&key, &origins, shown)),
            key,
        }
    })?;
    Ok((origins, table))
}

/// " (from environment variable X)" or " (in file F)": where `key`'s value
/// came from, for an error about it.
pub(super) fn origin_of(key: &str, origins: &EnvOrigins, file: Option<&str>) -> String {
    let from_env = origins
        .iter()
        .find(|(k, _)| key == k.as_str() || key.starts_with(&format!("{k}.")));
    match (from_env, file) {
        (Some((_, var)), _) => format!(" (from environment variable {var})"),
        (None, Some(file)) => format!(" (in file {file})"),
        (None, None) => String::new(),
    }
}

/// Puts `over`'s keys into `base`, section by section; a list or a value
/// replaces what was there.
pub(super) fn merge(base: &mut Table, over: Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(inner)), Value::Table(over_inner)) => merge(inner, over_inner),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Sets each `CRM_EDM_SYNC__SECTION__KEY` variable's value into `table`,
/// read as the kind of value the key takes. Returns which variable set
/// which key.
fn overlay_environment(
    table: &mut Table,
    env: &[(String, String)],
) -> Result<EnvOrigins, ConfigError> {
    let prefix = format!("{ENV_PREFIX}__");
    let mut origins = EnvOrigins::new();
    for (var, text) in env {
        let Some(rest) = var.strip_prefix(&prefix) else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
        let key = path.join(".");
        let unknown = || {
            ConfigError::Load(format!(
                "environment variable {var} sets no known key (`{key}`); the form is {ENV_PREFIX}__SECTION__KEY, e.g. {ENV_PREFIX}__EDM__BATCH_SIZE"
            ))
        };
        let kind = kind_at(table, &path).ok_or_else(unknown)?;
        let value = read_as(kind, text).map_err(|wanted| ConfigError::Invalid {
            key: key.clone(),
            reason: format!("{wanted} (from environment variable {var})"),
        })?;
        set_at(table, &path, value).ok_or_else(unknown)?;
        origins.insert(key, var.clone());
    }
    Ok(origins)
}

/// The kind of value the key at `path` takes: that of its current value,
/// or of a known optional key, or of a `sync.vars` slot.
fn kind_at(table: &Table, path: &[String]) -> Option<Kind> {
    let key = path.join(".");
    if let Some((_, kind)) = OPTIONAL_KEYS.iter().find(|(k, _)| *k == key) {
        return Some(*kind);
    }
    if let [section, vars, slot] = path {
        let n = slot
            .strip_prefix("var")
            .and_then(|n| n.parse::<usize>().ok());
        if section == "sync" && vars == "vars" && n.is_some_and(|n| (1..=10).contains(&n)) {
            return Some(Kind::Text);
        }
    }
    let (last, parents) = path.split_last()?;
    let mut at = table;
    for part in parents {
        at = at.get(part)?.as_table()?;
    }
    at.get(last).map(Kind::of)
}

/// Sets `value` at `path`, creating sections on the way; `None` when a
/// part of the path is a value, not a section.
fn set_at(table: &mut Table, path: &[String], value: Value) -> Option<()> {
    let (last, parents) = path.split_last()?;
    let mut at = table;
    for part in parents {
        at = at
            .entry(part.clone())
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()?;
    }
    at.insert(last.clone(), value);
    Some(())
}

/// An environment variable's text read as `kind`; the error says what was
/// wanted, not what was found (it may be a secret).
fn read_as(kind: Kind, text: &str) -> Result<Value, String> {
    let text_trimmed = text.trim();
    match kind {
        Kind::Text => Ok(Value::String(text.to_string())),
        Kind::Integer => text_trimmed
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| "expected a whole number".to_string()),
        Kind::Float => text_trimmed
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| "expected a number".to_string()),
        Kind::Boolean => match text_trimmed {
            "true" => Ok(Value::Boolean(true)),
            "false" => Ok(Value::Boolean(false)),
            _ => Err("expected true or false".to_string()),
        },
        Kind::Section => Err("names a section, not a key".to_string()),
        Kind::List => Err("is a list, which only the config file can set".to_string()),
    }
}

/// serde's message in an operator's words, without the value it quotes:
/// "invalid type: floating point `4.7`, expected usize" becomes "expected a
/// whole number ≥ 0, found a floating point number".
fn describe(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        let (found, wanted) = rest.split_once(", expected ").unwrap_or((rest, "?"));
        return format!(
            "expected {}, found {}",
            wanted_in_words(wanted),
            found_in_words(found)
        );
    }
    if let Some(rest) = message.strip_prefix("invalid value: ") {
        let (_, wanted) = rest.split_once(", expected ").unwrap_or((rest, "?"));
        return format!("expected {}", wanted_in_words(wanted));
    }
    if message == "invalid socket address syntax" {
        return "expected IP:PORT, e.g. 127.0.0.1:9187 or [::1]:9187".to_string();
    }
    // unknown field / unknown variant / missing field: serde names the
    // key or the accepted forms, and quotes only a key or an enum word.
    message.to_string()
}

fn wanted_in_words(wanted: &str) -> String {
    match wanted.trim() {
        "usize" | "u8" | "u16" | "u32" | "u64" => "a whole number ≥ 0".to_string(),
        "i8" | "i16" | "i32" | "i64" => "a whole number".to_string(),
        "f32" | "f64" => "a number".to_string(),
        "a boolean" | "bool" => "true or false".to_string(),
        "socket address" => "IP:PORT as text, e.g. \"127.0.0.1:9187\"".to_string(),
        other => other.to_string(),
    }
}

fn found_in_words(found: &str) -> String {
    let kind = found.split(['`', '"']).next().unwrap_or(found).trim();
    match kind {
        "floating point" => "a floating point number".to_string(),
        "integer" => "an integer".to_string(),
        "boolean" => "true or false".to_string(),
        "string" => "text (in quotes)".to_string(),
        "map" => "a section".to_string(),
        "sequence" => "a list".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_messages_lose_the_value_they_quote() {
        // Arrange / Act
        let described = [
            describe("invalid type: floating point `4.7`, expected usize"),
            describe("invalid type: integer `123456`, expected a string"),
            describe("invalid type: string \"50\", expected u32"),
        ];

        // Assert
        assert_eq!(
            described[0],
            "expected a whole number ≥ 0, found a floating point number"
        );
        assert_eq!(described[1], "expected a string, found an integer");
        assert!(
            !described
                .iter()
                .any(|d| d.contains("4.7") || d.contains("123456") || d.contains("50"))
        );
    }
}
