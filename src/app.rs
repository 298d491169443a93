//! What each command does, given parsed flags and loaded settings. Returns
//! the process exit code: 0 success; 1 a failed or refused run, or an
//! unreachable API in `check`; 2 bad configuration (reported by `main`).

use std::process::ExitCode;

use crate::cli::{Cli, Command};
use crate::config::Settings;
use crate::jobs::{Context, RunOptions};

pub use crate::cli::{EXIT_CONFIG, EXIT_FAILED};

/// `--once` interrupted by Ctrl-C while it followed the daemon's run
/// (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Runs the command `cli` names with `settings`. `demo` is handled by
/// `main` because it needs no settings.
pub async fn run(cli: Cli, settings: Settings) -> ExitCode {
    let redactor = crate::redact::Redactor::new(crate::jobs::secrets_of(&settings));
    let result = match cli.command {
        Some(Command::Status { json }) => crate::status::print(&settings, json).await,
        Some(Command::Explain {
            email,
            linkman,
            live,
            json,
        }) => {
            let question = crate::explain::Question {
                email,
                linkman: linkman.map(crate::domain::LinkManId),
                live,
                json,
            };
            crate::explain::print(&settings, question).await
        }
        Some(Command::Check) => crate::check::run(settings).await,
        Some(Command::Health) => {
            let (healthy, line) = crate::ops_endpoint::probe(settings.http.listen).await;
            println!("{line}");
            Ok(if healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILED)
            })
        }
        Some(Command::Demo) => crate::demo::run().await,
        None if cli.once => once(&cli, settings).await,
        None => crate::daemon::run(settings, cli.config.clone()).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // The chain on one line; redacted by construction (no URL or
            // secret is put into an error), and scrubbed here again: a
            // secret can still arrive inside text we do not control (a
            // path, a driver's message).
            let line = redactor.redact(&format!("{e:#}"));
            tracing::error!(error = %line, "command failed");
            println!("crm-edm-sync: {line}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// `--once`. A dry run changes nothing (no lock, no migration, no run
/// row) and runs here, beside a daemon or not. A real run runs here when
/// this process gets the instance lock; when an active daemon holds it,
/// the daemon is asked to run it next through the state database, and its
/// run is followed and printed as if it ran here.
async fn once(cli: &Cli, settings: Settings) -> anyhow::Result<ExitCode> {
    let what = once_jobs(cli);
    if cli.dry_run {
        let ctx = Context::new_read_only(settings).await?;
        let printed = crate::once::run_jobs(&ctx, &what).await;
        ctx.store.close().await;
        print!("{}", printed.text);
        return Ok(printed.exit_code());
    }
    let target = crate::lock::LockTarget::of(&settings.database.url);
    let lock = match target.try_acquire().await? {
        Some(lock) => lock,
        None => match ask_the_daemon(&settings, &what).await? {
            Ok(lock) => lock,
            Err(code) => return Ok(code),
        },
    };
    let ctx = Context::new(settings).await?;
    // Fence this run's writes: a daemon that takes over (should this
    // process lose its lock) makes every later batch of ours fail.
    crate::jobs::take_lease(&ctx).await?;
    let printed = crate::once::run_jobs(&ctx, &what).await;
    if let Err(e) = ctx.store.release_lease().await {
        tracing::warn!(error = %format!("{e:#}"), "cannot mark the lease released");
    }
    ctx.store.close().await;
    drop(lock);
    print!("{}", printed.text);
    Ok(printed.exit_code())
}

/// The lock is held by another instance: asks it (if it is a daemon) to
/// run `what`. `Ok(lock)`: run here after all (the lock came free first);
/// `Err(code)`: done, with this exit code.
async fn ask_the_daemon(
    settings: &Settings,
    what: &crate::once::OnceJobs,
) -> anyhow::Result<Result<crate::lock::InstanceLock, ExitCode>> {
    use crate::once::Asked;
    let store = crate::state::Store::connect(&settings.database.url).await?;
    let me = crate::instance::Instance::current(&settings.daemon.instance_id);
    let asked = crate::once::ask_the_daemon(settings, &store, what, &me.id).await;
    store.close().await;
    Ok(match asked? {
        Asked::Ran(printed) => {
            print!("{}", printed.text);
            Err(printed.exit_code())
        }
        Asked::RunHere(lock) => Ok(lock),
        Asked::NobodyTook => anyhow::bail!(
            "another crm-edm-sync instance holds the state database and took no request (waited {} s, daemon.lock_wait_secs): it is another --once, or a daemon standing by; try again later",
            settings.daemon.lock_wait_secs
        ),
        Asked::Interrupted(message) => {
            println!("{message}");
            Err(ExitCode::from(EXIT_INTERRUPTED))
        }
    })
}

/// `--once`'s jobs, as the flags give them.
fn once_jobs(cli: &Cli) -> crate::once::OnceJobs {
    crate::once::OnceJobs {
        job: cli.job,
        opts: RunOptions {
            dry_run: cli.dry_run,
            force: cli.force,
            full: cli.full,
            retry_parked: cli.retry_parked,
        },
        plan: cli.plan.clone(),
    }
}
