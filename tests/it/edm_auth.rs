//! `edm.auth`: the credentials in the query (as the documents say) or in
//! an HTTP Basic `Authorization` header (as the public clients call the
//! scripts under `/mm-ms/apinew/`).

use crate::common::{config_text, env, seed_basic};
use crm_edm_sync::config::EdmAuth;
use crm_edm_sync::sync::contacts;

#[tokio::test]
async fn with_basic_auth_the_sync_works_and_no_request_carries_a_password() {
    // Arrange
    let e = env().await;
    seed_basic(&e.sb);
    let basic_url = e.sb.edm_basic_url();
    let ctx = e
        .ctx_from(|s| {
            s.edm.auth = EdmAuth::Basic;
            s.edm.base_url = crm_edm_sync::config::BaseUrl::parse(&basic_url).unwrap();
        })
        .await;

    // Act
    let report = contacts::run(&ctx, Default::default()).await.unwrap();

    // Assert
    assert_eq!(report.counts.added, 10);
    assert!(e.sb.count("ml-addr-add") > 0);
    assert_eq!(e.sb.edm.requests_with_a_password(), 0);
}

#[tokio::test]
async fn a_wrong_password_with_basic_auth_names_edm_auth_and_check_says_which_auth_it_used() {
    // Arrange
    let e = env().await;
    seed_basic(&e.sb);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_text(&e.sb, &e.db.url, "", "")).unwrap();
    let basic_url = e.sb.edm_basic_url();
    let run = |args: &'static [&'static str], password: &'static str| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_crm-edm-sync"));
        cmd.arg("--config")
            .arg(&config)
            .args(args)
            .env("CRM_EDM_SYNC__EDM__AUTH", "basic")
            .env("CRM_EDM_SYNC__EDM__BASE_URL", &basic_url)
            .env("CRM_EDM_SYNC__EDM__PASSWORD", password);
        cmd.output()
    };

    // Act
    let good = run(&["check"], crm_edm_sync::sandbox::EDM_PASSWORD)
        .await
        .unwrap();
    let bad = run(&["check"], "not-the-password-42").await.unwrap();

    // Assert
    let good = String::from_utf8_lossy(&good.stdout).to_string();
    assert!(
        good.contains("edm: ok") && good.contains("edm.auth = \"basic\""),
        "{good}"
    );
    let bad_out = String::from_utf8_lossy(&bad.stdout).to_string();
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        bad_out.contains("edm: FAILED (edm.auth = \"basic\")"),
        "{bad_out}"
    );
    assert!(
        bad_out.contains("edm.username/edm.password/edm.auth"),
        "{bad_out}"
    );
}

#[tokio::test]
async fn with_query_auth_every_request_carries_the_password_md5() {
    // Arrange
    let e = env().await;
    seed_basic(&e.sb);

    // Act
    e.sync().await;

    // Assert
    assert_eq!(
        e.sb.edm.requests_with_a_password(),
        e.sb.requests()
            .iter()
            .filter(|r| r.server == crm_edm_sync::sandbox::Server::Edm)
            .count()
    );
}

#[tokio::test]
async fn the_documented_query_auth_is_refused_where_only_basic_is_taken() {
    // Arrange: query auth (the default) against the Basic-only scripts.
    let e = env().await;
    seed_basic(&e.sb);
    let basic_url = e.sb.edm_basic_url();
    let ctx = e
        .ctx_from(|s| s.edm.base_url = crm_edm_sync::config::BaseUrl::parse(&basic_url).unwrap())
        .await;

    // Act
    let err = contacts::run(&ctx, Default::default()).await.unwrap_err();

    // Assert
    assert!(
        format!("{err:#}").contains("edm.username/edm.password/edm.auth"),
        "{err:#}"
    );
}
