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
fn zones_schedules_urls_and_durations_are_parsed_once_into_types() {
    // Arrange / Act
    let s = Settings::from_toml(&format!(
        "{MINIMAL}\n[daemon]\nlock_poll_secs = 7\n[sync]\ntimezone = \"Europe/Berlin\"\nschedule = \"0 0 3 * * *\"\n"
    ))
    .unwrap();

    // Assert: the values as their users need them; nothing is parsed again.
    assert_eq!(s.schedule_zone(), chrono_tz::Europe::Berlin);
    assert_eq!(s.edm_zone(), chrono_tz::Asia::Shanghai);
    assert_eq!(s.sync.schedule.as_str(), "0 0 3 * * *");
    assert_eq!(s.daemon.lock_poll, std::time::Duration::from_secs(7));
    assert_eq!(s.crm.timeout, std::time::Duration::from_secs(30));
    assert_eq!(s.crm.base_url.as_str(), "http://crm.test");
}

#[test]
fn the_built_in_defaults_are_the_shipped_default_file() {
    // The one place defaults are written: the file compiled in.
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"))
            .unwrap();
    assert_eq!(DEFAULTS, shipped);
    let table: toml::Table = shipped.parse().unwrap();
    for section in [
        "crm",
        "edm",
        "database",
        "sync",
        "writeback",
        "reconcile",
        "log",
        "http",
        "daemon",
    ] {
        assert!(
            table.contains_key(section),
            "[{section}] in config/default.toml"
        );
    }
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
    let s = Settings::load_with_env(Some(file.path()), env, Access::Remote).unwrap();
    assert_eq!(s.edm.password.expose_secret(), "from-env");
    assert_eq!(s.crm.page_size, 50);
}

#[test]
fn a_numeric_looking_secret_from_the_environment_stays_text() {
    let file = write_config(MINIMAL);
    let env = vec![("CRM_EDM_SYNC__CRM__TOKEN".to_string(), "0123".to_string())];
    let s = Settings::load_with_env(Some(file.path()), env, Access::Remote).unwrap();
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
    let err = Settings::load_with_env(Some(file.path()), env, Access::Remote).unwrap_err();
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
        ("[reconcile]\nschedule = \"weekly\"", "reconcile.schedule"),
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
    let err = Settings::load_with_env(
        Some(Path::new("/nonexistent/c.toml")),
        vec![],
        Access::Remote,
    )
    .unwrap_err();
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

/// The shipped example with its secrets given as files, as the systemd
/// unit gives them.
fn example_with_secret_files() -> Result<Settings, ConfigError> {
    let token = secret_file("t0ken\n", 0o600);
    let password = secret_file("set-me\n", 0o600);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
    let env = [
        ("CRM_EDM_SYNC__CRM__TOKEN_FILE", token.path()),
        ("CRM_EDM_SYNC__EDM__PASSWORD_FILE", password.path()),
    ]
    .map(|(k, v)| (k.to_string(), v.display().to_string()))
    .to_vec();
    Settings::load_with_env(Some(&path), env, Access::Remote)
}

#[test]
fn shipped_example_config_is_valid() {
    let s = example_with_secret_files().unwrap();
    assert_eq!(s.synced_lists(), vec![ListId(1), ListId(2)]);
    assert_eq!(s.sync.vars.slots()[0], Some("customer.name"));
    // Without its secrets it names the first one missing.
    let err = Settings::from_toml(include_str!("../../config/example.toml")).unwrap_err();
    assert!(err.to_string().contains("crm.token"), "{err}");
}

#[test]
fn the_shipped_example_placeholders_are_named_by_key_and_real_values_are_not() {
    let example = example_with_secret_files().unwrap();
    assert_eq!(
        example.placeholders(),
        vec!["crm.base_url", "edm.username", "edm.password"]
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
    let s = Settings::load_with_env(Some(&path), env, Access::Remote).unwrap();
    assert_eq!(s.crm.base_url.as_str(), "https://crm.example.com");
    // Without them it names the first missing one.
    let err = Settings::load_with_env(Some(&path), vec![], Access::Remote).unwrap_err();
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
        let err = Settings::load_with_env(Some(file.path()), vec![], Access::Remote)
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
    let err = Settings::load_with_env(Some(file.path()), vec![], Access::Remote)
        .unwrap_err()
        .to_string();

    // Assert
    assert!(err.contains("is not UTF-8 text"), "{err}");
    assert!(err.len() < 200, "{err}");
}

#[test]
fn a_directory_given_as_config_is_named_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let err = Settings::load_with_env(Some(dir.path()), vec![], Access::Remote)
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

fn load_error(text: &str, env: &[(&str, &str)]) -> String {
    let file = write_config(text);
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Settings::load_with_env(Some(file.path()), env, Access::Remote)
        .unwrap_err()
        .to_string()
}

#[test]
fn a_value_of_the_wrong_type_is_refused_naming_the_key_and_the_type_wanted() {
    // Arrange: values the config crate would have coerced (4.7 → 4,
    // true → 1, "50" → 50).
    let cases = [
        (
            "[crm]\nconcurrency = 4.7",
            "crm.concurrency",
            "whole number",
        ),
        ("[sync]\nlist_id = true", "sync.list_id", "whole number"),
        ("[crm]\npage_size = \"50\"", "crm.page_size", "whole number"),
        ("[edm]\nbatch_size = 10.0", "edm.batch_size", "whole number"),
        ("[log]\nlevel = 3", "log.level", "string"),
        (
            "[[sync.routes]]\nfield = \"dept\"\nequals = \"x\"\nlist_id = \"2\"",
            "sync.routes[0].list_id",
            "whole number",
        ),
    ];
    for (extra, key, wanted) in cases {
        // Act
        let err = load_error(&merge(MINIMAL, extra), &[]);

        // Assert
        assert!(err.contains(&format!("`{key}`")), "{extra}: {err}");
        assert!(err.contains(wanted), "{extra}: {err}");
        assert!(err.contains("(in file "), "{extra}: {err}");
    }
}

#[test]
fn a_number_where_a_secret_belongs_is_refused_without_showing_it() {
    // Arrange: a token written without quotes.
    let text = MINIMAL.replace("token = \"tok\"", "token = 918273645");

    // Act
    let err = load_error(&text, &[]);

    // Assert
    assert!(err.contains("`crm.token`"), "{err}");
    assert!(err.contains("expected a string"), "{err}");
    assert!(!err.contains("918273645"), "{err}");
}

#[test]
fn whole_numbers_are_still_accepted_where_a_fraction_is_wanted() {
    let s = Settings::from_toml(&merge(MINIMAL, "[sync]\nmax_unsubscribe_ratio = 1")).unwrap();
    assert_eq!(s.sync.max_unsubscribe_ratio, 1.0);
}

#[test]
fn errors_from_the_environment_name_the_variable() {
    // Arrange / Act / Assert: a misspelt key, a value of the wrong type,
    // a value out of range.
    let err = load_error(MINIMAL, &[("CRM_EDM_SYNC__EDM__BACH_SIZE", "10")]);
    assert!(err.contains("CRM_EDM_SYNC__EDM__BACH_SIZE"), "{err}");
    assert!(err.contains("`edm.bach_size`"), "{err}");

    let err = load_error(MINIMAL, &[("CRM_EDM_SYNC__EDM__BATCH_SIZE", "lots")]);
    assert!(err.contains("CRM_EDM_SYNC__EDM__BATCH_SIZE"), "{err}");
    assert!(err.contains("whole number"), "{err}");
    assert!(!err.contains("lots"), "{err}");

    let err = load_error(MINIMAL, &[("CRM_EDM_SYNC__EDM__BATCH_SIZE", "0")]);
    assert!(
        err.contains("`edm.batch_size`") && err.contains("CRM_EDM_SYNC__EDM__BATCH_SIZE"),
        "{err}"
    );

    let err = load_error(MINIMAL, &[("CRM_EDM_SYNC__LOG__FORMAT", "xml")]);
    assert!(err.contains("CRM_EDM_SYNC__LOG__FORMAT"), "{err}");
    assert!(err.contains("`json`") && err.contains("`pretty`"), "{err}");
}

#[test]
fn the_environment_can_still_set_optional_keys_and_var_slots() {
    let file = write_config(MINIMAL);
    let env = [
        ("CRM_EDM_SYNC__EDM__MAX_REQUESTS_PER_SEC", "7"),
        ("CRM_EDM_SYNC__SYNC__VARS__VAR2", "customer.name"),
        ("CRM_EDM_SYNC__SYNC__MAX_UNSUBSCRIBE_RATIO", "0.5"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let s = Settings::load_with_env(Some(file.path()), env, Access::Remote).unwrap();
    assert_eq!(s.edm.max_requests_per_sec, Some(7));
    assert_eq!(s.sync.vars.slots()[1], Some("customer.name"));
    assert_eq!(s.sync.max_unsubscribe_ratio, 0.5);
}

#[test]
fn enum_and_address_errors_say_the_accepted_forms() {
    let err = load_error(&merge(MINIMAL, "[log]\nformat = \"jsn\""), &[]);
    assert!(err.contains("`log.format`"), "{err}");
    assert!(err.contains("`json` or `pretty`"), "{err}");

    let err = load_error(&merge(MINIMAL, "[http]\nlisten = \"localhost\""), &[]);
    assert!(err.contains("`http.listen`"), "{err}");
    assert!(err.contains("IP:PORT"), "{err}");

    let err = load_error(&merge(MINIMAL, "[edm]\nauth = \"digest\""), &[]);
    assert!(err.contains("`query` or `basic`"), "{err}");
}

#[test]
fn commands_on_the_state_database_alone_load_without_api_credentials() {
    // Arrange: a file with the database and nothing of the APIs.
    let file = write_config("[database]\nurl = \"sqlite://x.db\"\n");

    // Act
    let state_only = Settings::load_with_env(Some(file.path()), vec![], Access::StateOnly);
    let remote = Settings::load_with_env(Some(file.path()), vec![], Access::Remote);

    // Assert
    assert!(state_only.is_ok(), "{:?}", state_only.err());
    let err = remote.unwrap_err().to_string();
    assert!(err.contains("crm.base_url"), "{err}");
}

fn secret_file(content: &str, mode: u32) -> tempfile::NamedTempFile {
    use std::os::unix::fs::PermissionsExt;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), content).unwrap();
    std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(mode)).unwrap();
    file
}

#[test]
fn secrets_are_read_from_files_named_by_key_or_by_environment() {
    // Arrange: the token from a file named in the config, the password
    // from one named by an environment variable (as the systemd unit does
    // with its credentials directory).
    let token = secret_file("token-from-file\n", 0o600);
    let password = secret_file("  pass word \r\nsecond line ignored\n", 0o400);
    let text = format!(
        "[crm]\nbase_url = \"http://crm.test\"\ntoken_file = \"{}\"\n[edm]\nusername = \"u\"\n",
        token.path().display()
    );
    let file = write_config(&text);
    let env = vec![(
        "CRM_EDM_SYNC__EDM__PASSWORD_FILE".to_string(),
        password.path().display().to_string(),
    )];

    // Act
    let s = Settings::load_with_env(Some(file.path()), env, Access::Remote).unwrap();

    // Assert: the first line, trimmed at both ends.
    assert_eq!(s.crm.token.expose_secret(), "token-from-file");
    assert_eq!(s.edm.password.expose_secret(), "pass word");
}

#[test]
fn a_secret_file_that_is_missing_shared_or_doubled_is_refused_naming_the_key_not_the_content() {
    // Arrange
    let shared = secret_file("hunter2-secret\n", 0o644);
    let group = secret_file("hunter2-secret\n", 0o640);
    let private = secret_file("hunter2-secret\n", 0o600);
    let with = |line: String| {
        format!(
            "[crm]\nbase_url = \"http://crm.test\"\n{line}\n[edm]\nusername = \"u\"\npassword = \"p\"\n"
        )
    };
    let cases = [
        (
            with(format!("token_file = \"{}\"", shared.path().display())),
            "mode 0644",
        ),
        (
            with(format!("token_file = \"{}\"", group.path().display())),
            "mode 0640",
        ),
        (
            with("token_file = \"/nonexistent/crm-token\"".to_string()),
            "does not exist",
        ),
        (
            with(format!(
                "token = \"x\"\ntoken_file = \"{}\"",
                private.path().display()
            )),
            "not both",
        ),
    ];
    for (text, why) in cases {
        // Act
        let err = load_error(&text, &[]);

        // Assert
        assert!(err.contains("`crm.token_file`"), "{err}");
        assert!(err.contains(why), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}

#[test]
fn the_drift_report_runs_weekly_by_default_and_an_empty_schedule_turns_it_off() {
    let default = Settings::from_toml(MINIMAL).unwrap();
    let off = Settings::from_toml(&merge(MINIMAL, "[reconcile]\nschedule = \"\"")).unwrap();

    assert_eq!(
        default.reconcile.schedule.map(|s| s.to_string()),
        Some("0 0 4 * * Sun".to_string())
    );
    assert!(off.reconcile.schedule.is_none());
}

#[test]
fn reseller_top_up_keys_go_together_and_need_an_account() {
    // Arrange
    let with = |extra: &str| Settings::from_toml(&format!("{MINIMAL}\n[reseller]\n{extra}"));
    let account = "username = \"r\"\npassword = \"rp\"\n";

    // Act / Assert: all three, or none.
    let two = with(&format!("{account}top_up_below = 10\ntop_up_count = 100\n")).unwrap_err();
    assert!(
        two.to_string().contains("reseller.top_up_max_per_day"),
        "{two}"
    );
    let all = with(&format!(
        "{account}top_up_below = 10\ntop_up_count = 100\ntop_up_max_per_day = 2\n"
    ))
    .unwrap();
    assert_eq!(
        all.reseller.top_up(),
        Some(TopUp {
            below: 10,
            count: 100,
            max_per_day: 2
        })
    );
    // An account needs its password, and a top-up an account.
    let no_password = with("username = \"r\"\n").unwrap_err();
    assert!(
        no_password.to_string().contains("reseller.password"),
        "{no_password}"
    );
    let no_account =
        with("top_up_below = 10\ntop_up_count = 100\ntop_up_max_per_day = 2\n").unwrap_err();
    assert!(
        no_account.to_string().contains("reseller.username"),
        "{no_account}"
    );
    // None at all: off.
    assert!(!with("").unwrap().reseller.enabled());
}

#[test]
fn max_parallel_jobs_defaults_to_four_and_takes_one_to_256() {
    assert_eq!(
        Settings::from_toml(MINIMAL)
            .unwrap()
            .daemon
            .max_parallel_jobs,
        4
    );
    let zero =
        Settings::from_toml(&format!("{MINIMAL}\n[daemon]\nmax_parallel_jobs = 0\n")).unwrap_err();
    assert!(
        zero.to_string().contains("daemon.max_parallel_jobs"),
        "{zero}"
    );
}

#[test]
fn with_a_tenants_dir_the_main_config_needs_no_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let s = Settings::from_toml(&format!(
        "[tenants]\ndir = {:?}\n",
        dir.path().display().to_string()
    ));
    assert!(s.is_ok(), "{s:?}");
}
