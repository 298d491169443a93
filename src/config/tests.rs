//! Tests of the settings: layers, defaults, and an error naming the key
//! for every bad value.

use super::*;
use crate::domain::ListId;
use secrecy::ExposeSecret;

const MINIMAL: &str = r#"
[crm]
base_url = "http://crm.test"
token = "tok"
[edm]
username = "u"
password = "p"
"#;

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

#[test]
fn defaults_fill_everything_not_given() {
    let s = Settings::from_toml(MINIMAL).unwrap();
    assert_eq!(s.crm.page_size, 100);
    assert_eq!(s.crm.concurrency, 4);
    assert_eq!(s.crm.fields.linkman_email, "email");
    assert_eq!(s.edm.batch_size, 500);
    assert_eq!(s.sync.max_unsubscribe_ratio, 0.2);
    assert_eq!(s.writeback.route_id, 3);
    assert_eq!(s.log.format, LogFormat::Json);
    assert_eq!(s.synced_lists(), vec![ListId(1)]);
}

#[test]
fn environment_overrides_the_file() {
    let file = write_config(MINIMAL);
    let env = vec![
        (
            "CRM_EDM_SYNC__EDM__PASSWORD".to_string(),
            "from-env".to_string(),
        ),
        ("CRM_EDM_SYNC__CRM__PAGE_SIZE".to_string(), "50".to_string()),
        ("UNRELATED".to_string(), "x".to_string()),
    ];
    let s = Settings::load_with_env(Some(file.path()), env).unwrap();
    assert_eq!(s.edm.password.expose_secret(), "from-env");
    assert_eq!(s.crm.page_size, 50);
}

#[test]
fn a_numeric_looking_secret_from_the_environment_stays_text() {
    let file = write_config(MINIMAL);
    let env = vec![("CRM_EDM_SYNC__CRM__TOKEN".to_string(), "0123".to_string())];
    let s = Settings::load_with_env(Some(file.path()), env).unwrap();
    assert_eq!(s.crm.token.expose_secret(), "0123");
}

#[test]
fn unknown_key_is_an_error_naming_it() {
    let err = Settings::from_toml(&format!("{MINIMAL}\n[sync]\nlist_idd = 3\n")).unwrap_err();
    assert!(err.to_string().contains("list_idd"), "{err}");
    let err = Settings::from_toml(&format!("{MINIMAL}\n[sync.vars]\nvar11 = \"x\"\n")).unwrap_err();
    assert!(err.to_string().contains("var11"), "{err}");
}

#[test]
fn unknown_environment_key_is_an_error_naming_it() {
    let file = write_config(MINIMAL);
    let env = vec![("CRM_EDM_SYNC__EDM__PASSWROD".to_string(), "x".to_string())];
    let err = Settings::load_with_env(Some(file.path()), env).unwrap_err();
    assert!(err.to_string().contains("passwrod"), "{err}");
}

#[test]
fn bad_values_are_errors_naming_the_key() {
    let cases = [
        ("[crm]\npage_size = 101", "crm.page_size"),
        ("[crm]\nconcurrency = 0", "crm.concurrency"),
        ("[edm]\nbatch_size = 0", "edm.batch_size"),
        ("[edm]\nmax_attempts = 0", "edm.max_attempts"),
        ("[database]\nretention_days = 0", "database.retention_days"),
        ("[edm]\ntimezone = \"Beijing\"", "edm.timezone"),
        ("[sync]\ntimezone = \"+08:00\"", "sync.timezone"),
        ("[crm]\nmax_attempts = 0", "crm.max_attempts"),
        (
            "[sync]\nmax_unsubscribe_ratio = 1.5",
            "sync.max_unsubscribe_ratio",
        ),
        ("[sync]\nschedule = \"*/15 * * * *\"", "sync.schedule"),
        (
            "[writeback]\nschedule = \"0 61 * * * *\"",
            "writeback.schedule",
        ),
        ("[sync]\nlist_id = 0", "sync.list_id"),
        ("[database]\nurl = \"mysql://x\"", "database.url"),
        ("[log]\nlevel = \"loud!!\"", "log.level"),
        (
            "[[sync.routes]]\nfield = \"\"\nequals = \"1\"\nlist_id = 2",
            "sync.routes[0].field",
        ),
    ];
    for (extra, key) in cases {
        let text = merge(MINIMAL, extra);
        let err = Settings::from_toml(&text).unwrap_err();
        assert!(err.to_string().contains(key), "{extra}: {err}");
    }
}

#[test]
fn wrong_type_is_an_error_naming_the_key() {
    let err = Settings::from_toml(&merge(MINIMAL, "[crm]\npage_size = \"many\"")).unwrap_err();
    assert!(err.to_string().contains("page_size"), "{err}");
}

#[test]
fn missing_credentials_are_reported_by_key() {
    let err = Settings::from_toml("[crm]\nbase_url = \"http://x.test\"").unwrap_err();
    assert!(err.to_string().contains("crm.token"), "{err}");
}

#[test]
fn missing_explicit_file_is_an_error_naming_it() {
    let err = Settings::load_with_env(Some(Path::new("/nonexistent/c.toml")), vec![]).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/c.toml"), "{err}");
}

#[test]
fn routes_and_vars_are_read_and_lists_collected() {
    let text = format!(
        "{MINIMAL}\n[sync]\nlist_id = 3\n[[sync.routes]]\nfield = \"customer.type_id\"\nequals = \"2\"\nlist_id = 2\n[[sync.routes]]\nfield = \"dept\"\nequals = \"x\"\nlist_id = 3\n[sync.vars]\nvar1 = \"customer.name\"\nvar10 = \"mobile\"\n"
    );
    let s = Settings::from_toml(&text).unwrap();
    assert_eq!(s.sync.routes.len(), 2);
    assert_eq!(s.synced_lists(), vec![ListId(2), ListId(3)]);
    assert_eq!(s.sync.vars.slots()[0], Some("customer.name"));
    assert_eq!(s.sync.vars.slots()[9], Some("mobile"));
}

#[test]
fn debug_output_does_not_show_secrets() {
    let s = Settings::from_toml(MINIMAL).unwrap();
    let dbg = format!("{s:?}");
    assert!(!dbg.contains("tok\""), "{dbg}");
    assert!(dbg.contains("REDACTED"), "{dbg}");
}

#[test]
fn templates_have_chinese_defaults_and_can_be_overridden() {
    let s = Settings::from_toml(MINIMAL).unwrap();
    assert!(s.writeback.templates.open_title.contains("邮件打开"));
    let s = Settings::from_toml(&format!(
        "{MINIMAL}\n[writeback.templates]\nopen_title = \"Opened {{campaign}}\"\n"
    ))
    .unwrap();
    assert_eq!(s.writeback.templates.open_title, "Opened {campaign}");
    assert!(s.writeback.templates.click_title.contains("邮件点击"));
}

#[test]
fn unknown_template_placeholder_is_an_error_naming_the_key() {
    let err = Settings::from_toml(&format!(
        "{MINIMAL}\n[writeback.templates]\nclick_content = \"{{nmae}} clicked\"\n"
    ))
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("writeback.templates.click_content"), "{text}");
    assert!(text.contains("{nmae}"), "{text}");
}

#[test]
fn shipped_example_config_is_valid() {
    let s = Settings::from_toml(include_str!("../../config/example.toml")).unwrap();
    assert_eq!(s.synced_lists(), vec![ListId(1), ListId(2)]);
    assert_eq!(s.sync.vars.slots()[0], Some("customer.name"));
}

#[test]
fn the_shipped_example_placeholders_are_named_by_key_and_real_values_are_not() {
    let example = Settings::from_toml(include_str!("../../config/example.toml")).unwrap();
    assert_eq!(
        example.placeholders(),
        vec!["crm.base_url", "crm.token", "edm.username", "edm.password"]
    );
    let real = Settings::from_toml(
        "[crm]\nbase_url = \"https://crm.acme.cn\"\ntoken = \"t\"\n[edm]\nusername = \"u\"\npassword = \"p\"\n",
    )
    .unwrap();
    assert!(real.placeholders().is_empty(), "{:?}", real.placeholders());
}

#[test]
fn shipped_default_config_loads_with_credentials_from_the_environment() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
    let env = [
        ("CRM_EDM_SYNC__CRM__BASE_URL", "https://crm.example.com"),
        ("CRM_EDM_SYNC__CRM__TOKEN", "t0ken"),
        ("CRM_EDM_SYNC__EDM__USERNAME", "u"),
        ("CRM_EDM_SYNC__EDM__PASSWORD", "p"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec();
    let s = Settings::load_with_env(Some(&path), env).unwrap();
    assert_eq!(s.crm.base_url, "https://crm.example.com");
    // Without them it names the first missing one.
    let err = Settings::load_with_env(Some(&path), vec![]).unwrap_err();
    assert!(err.to_string().contains("crm.base_url"), "{err}");
}

/// Appends `extra` to `base`, merging a repeated `[section]` header into
/// the base's section (TOML forbids declaring a table twice).
fn merge(base: &str, extra: &str) -> String {
    let mut out = base.to_string();
    let mut lines = extra.lines();
    let header = lines.next().unwrap_or_default();
    if header.starts_with("[[") || !out.contains(header) {
        out.push('\n');
        out.push_str(extra);
    } else {
        let rest: Vec<&str> = lines.collect();
        out = out.replacen(header, &format!("{header}\n{}", rest.join("\n")), 1);
    }
    out
}

/// A config file that is not TOML is named by file, line, column and key;
/// the secret on the broken line never appears (the parser's own error
/// quotes that line).
#[test]
fn a_toml_syntax_error_names_file_line_and_key_but_never_the_value() {
    let cases = [
        (
            "[crm]\nbase_url = \"http://x\"\ntoken = \"Tok3n-Secret-9\n",
            3,
            "crm.token",
        ),
        (
            "[edm]\npassword = \"Pa55-Secret-1\"\npassword = \"Pa55-Secret-1\"\n",
            3,
            "edm.password",
        ),
        ("[edm]\npassword = Pa55-Secret-1\n", 2, "edm.password"),
    ];
    for (text, line, key) in cases {
        // Arrange
        let file = write_config(text);

        // Act
        let err = Settings::load_with_env(Some(file.path()), vec![])
            .unwrap_err()
            .to_string();

        // Assert
        assert!(err.contains(&file.path().display().to_string()), "{err}");
        assert!(err.contains(&format!("line {line}, column")), "{err}");
        assert!(err.contains(&format!("key `{key}`")), "{err}");
        assert!(!err.contains("Secret"), "{err}");
    }
}

#[test]
fn bytes_that_are_not_text_are_not_echoed() {
    // Arrange: 300 bytes that are not UTF-8.
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    let bytes: Vec<u8> = (0..300u32).map(|i| (i * 97 % 256) as u8 | 0x80).collect();
    std::fs::write(file.path(), &bytes).unwrap();

    // Act
    let err = Settings::load_with_env(Some(file.path()), vec![])
        .unwrap_err()
        .to_string();

    // Assert
    assert!(err.contains("is not UTF-8 text"), "{err}");
    assert!(err.len() < 200, "{err}");
}

#[test]
fn a_directory_given_as_config_is_named_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let err = Settings::load_with_env(Some(dir.path()), vec![])
        .unwrap_err()
        .to_string();
    assert!(err.contains("is a directory"), "{err}");
}

/// The instance id travels in a header: a line break or a space there made
/// every request fail as if the network did.
#[test]
fn an_instance_id_that_cannot_travel_in_a_header_is_refused_naming_the_key() {
    for bad in ["a\nb", "has space", "é", &"x".repeat(65)] {
        let err = Settings::from_toml(&merge(
            MINIMAL,
            &format!("[daemon]\ninstance_id = {bad:?}\n"),
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("daemon.instance_id"), "{bad:?}: {err}");
    }
    for good in ["", "sync-a.example.cn", "node_1:9187", "ops@db1"] {
        Settings::from_toml(&merge(
            MINIMAL,
            &format!("[daemon]\ninstance_id = {good:?}\n"),
        ))
        .unwrap_or_else(|e| panic!("{good:?}: {e}"));
    }
}
