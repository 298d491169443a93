//! The shipped deployment files say what the README promises: the image's
//! build context leaves `target/` out, its health check asks the daemon
//! (and writes nothing), and the `podman run` line stops within a timeout
//! longer than the daemon's drain, and what is deployed is the fully
//! optimised build.

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_container_build_context_leaves_out_target_and_the_state() {
    let ignore = read(".containerignore");
    let lines: Vec<&str> = ignore.lines().map(str::trim).collect();
    for entry in ["target/", ".git/", "*.db"] {
        assert!(lines.contains(&entry), ".containerignore lacks {entry}");
    }
}

#[test]
fn the_container_health_check_runs_the_health_subcommand() {
    let containerfile = read("Containerfile");
    let check = containerfile
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .expect("a HEALTHCHECK");
    assert!(
        check.ends_with(r#"CMD ["/usr/local/bin/crm-edm-sync", "health"]"#),
        "{check}"
    );
}

#[test]
fn the_readme_podman_run_line_stops_after_the_drain_time() {
    let readme = read("README.md");
    let default_drain: u64 = read("config/default.toml")
        .lines()
        .chain(include_str!("../../src/config/mod.rs").lines())
        .find_map(|l| l.trim().strip_prefix("shutdown_timeout_secs = "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the drain default");
    let stop: u64 = readme
        .split("--stop-timeout ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("a --stop-timeout in the README");
    assert!(
        stop > default_drain,
        "stop timeout {stop} ≤ drain {default_drain}"
    );
}

/// `--release` is the quick build for trying the daemon; what the image
/// and the install steps build is the `production` profile, at cargo's
/// full optimisation.
#[test]
fn what_is_deployed_is_built_with_the_production_profile() {
    // Arrange
    let manifest = read("Cargo.toml");
    let production = manifest
        .split("[profile.production]")
        .nth(1)
        .expect("a production profile");
    let production = production.split("\n[").next().unwrap();

    // Assert: production is fully optimised; every shipped build uses it.
    assert!(production.contains("opt-level = 3"), "{production}");
    assert!(production.contains("lto = false"), "{production}");
    for (file, text) in [
        ("README.md", read("README.md")),
        ("Containerfile", read("Containerfile")),
    ] {
        let builds: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("cargo build") && !l.contains("--timings"))
            .collect();
        assert!(!builds.is_empty(), "{file} shows no build");
        for line in builds {
            assert!(line.contains("--profile production"), "{file}: {line}");
        }
    }
}

/// podman's default (OCI) image format drops `HEALTHCHECK`: every podman
/// build command shipped asks for the docker format.
#[test]
fn every_podman_build_command_keeps_the_health_check() {
    for (file, text) in [
        ("README.md", read("README.md")),
        ("Containerfile", read("Containerfile")),
    ] {
        let builds: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("podman build"))
            .collect();
        assert!(!builds.is_empty(), "{file} shows no podman build");
        for line in builds {
            assert!(line.contains("--format docker"), "{file}: {line}");
        }
    }
}

#[test]
fn every_shipped_alert_has_a_firing_and_a_quiet_promtool_case() {
    // Arrange: the alert names in the rules, the cases in their unit tests
    // (run by `promtool test rules` in CI).
    let rules = read("deploy/prometheus/alerts.yml");
    let cases = read("deploy/prometheus/alerts.test.yml");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 10, "{alerts:?}");

    // Act: for each alert, the cases that expect it to fire and to stay quiet.
    let mut untested = Vec::new();
    for alert in &alerts {
        let blocks: Vec<&str> = cases
            .split("- eval_time:")
            .filter(|b| b.contains(&format!("alertname: {alert}\n")))
            .collect();
        let fires = blocks.iter().any(|b| b.contains("exp_labels:"));
        let quiet = blocks.iter().any(|b| b.contains("exp_alerts: []"));
        if !(fires && quiet) {
            untested.push(format!("{alert} (fires: {fires}, quiet: {quiet})"));
        }
    }

    // Assert
    assert!(
        untested.is_empty(),
        "alerts without both cases: {untested:?}"
    );
}

#[test]
fn the_systemd_unit_passes_secrets_as_credentials_and_reloads_with_sighup() {
    // Arrange
    let unit = read("systemd/crm-edm-sync.service");
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();

    // Assert: each secret is a credential the daemon reads through its
    // `*_file` key, from the credentials directory (`%d`).
    for (credential, variable) in [
        ("crm-token", "CRM_EDM_SYNC__CRM__TOKEN_FILE"),
        ("edm-password", "CRM_EDM_SYNC__EDM__PASSWORD_FILE"),
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("LoadCredential={credential}:/etc/crm-edm-sync/"))),
            "no LoadCredential for {credential}"
        );
        assert!(
            lines.contains(&format!("Environment={variable}=%d/{credential}").as_str()),
            "{variable} does not point at the credential"
        );
    }
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("__TOKEN=") || l.contains("__PASSWORD=")),
        "a secret value in the unit"
    );
    assert!(
        lines.contains(&"ExecReload=/bin/kill -HUP $MAINPID"),
        "no ExecReload"
    );
}
