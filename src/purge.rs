//! `tenant purge NAME`: deletes the state a removed tenant left behind.
//!
//! A tenant whose file is removed stops being served, and its state stays
//! (a file removed by mistake loses nothing). Purging it is a separate,
//! deliberate step, refused while the tenant still has a file (usable or
//! refused) or while any instance holds its lock.

use std::process::ExitCode;

use crate::config::{Settings, Tenant, TenantSet, scoped_database_url};

/// Purges `name`'s state; `main` is the main configuration and `set` its
/// tenants.
pub async fn run(main: &Settings, set: &TenantSet, name: &str) -> anyhow::Result<ExitCode> {
    let tenant: Tenant = match name.parse() {
        Ok(t) => t,
        Err(why) => return refuse(crate::cli::EXIT_CONFIG, &why),
    };
    if main.tenants.dir.is_none() {
        return refuse(
            crate::cli::EXIT_CONFIG,
            "without tenants.dir the configuration has one tenant, default, which is never purged",
        );
    }
    if set.names().iter().any(|n| n == name) {
        let dir = main
            .tenants
            .dir
            .as_deref()
            .unwrap_or(std::path::Path::new("."));
        return refuse(
            crate::cli::EXIT_FAILED,
            &format!(
                "tenant {name} still has its file {}: remove it first (the daemon stops serving it within a minute, or at once on SIGHUP)",
                dir.join(format!("{name}.toml")).display()
            ),
        );
    }
    let url = scoped_database_url(&main.database.url, &tenant);
    match crate::state::Store::inspect(&url).await? {
        None | Some(crate::state::Schema::Absent) => {
            println!("tenant {name}: no state to purge");
            return Ok(ExitCode::SUCCESS);
        }
        Some(_) => {}
    }
    let target = crate::lock::LockTarget::of(&url);
    let Some(lock) = target.try_acquire().await? else {
        return refuse(
            crate::cli::EXIT_FAILED,
            &format!(
                "an instance still holds tenant {name}: try again once it has stopped serving it"
            ),
        );
    };
    crate::state::purge_state(&url).await?;
    drop(lock);
    if let crate::lock::LockTarget::File(path) = &target {
        let _ = std::fs::remove_file(path);
    }
    tracing::warn!(tenant = name, "tenant purged: its state is deleted");
    println!("tenant {name}: state deleted");
    Ok(ExitCode::SUCCESS)
}

fn refuse(code: u8, why: &str) -> anyhow::Result<ExitCode> {
    println!("crm-edm-sync: tenant purge: {why}");
    Ok(ExitCode::from(code))
}
