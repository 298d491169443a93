//! The process ([`main`]) and what each command does, given parsed flags
//! and loaded settings. Returns the process exit code: 0 success; 1 a
//! failed or refused run, or an unreachable API in `check`; 2 bad
//! configuration.

use std::process::ExitCode;

use crate::cli::{Cli, Command};
use crate::config::{LogFormat, Settings};
use crate::jobs::{Context, RunOptions};
use crate::telemetry;

pub use crate::cli::{EXIT_CONFIG, EXIT_FAILED};

/// `--once` interrupted by Ctrl-C while it followed the daemon's run
/// (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

/// The whole process after the allocator: parse the command line, load
/// settings, set up logging, run the command. In the library rather than
/// in `main.rs` so that its code is compiled once, here: a binary that
/// drove the runtime itself compiled a second copy of every generic it
/// reached (44 s of a first release build).
pub fn main() -> ExitCode {
    // A file-size limit (RLIMIT_FSIZE) reached by the state database makes
    // its write fail (EFBIG), which the store reports like a full disk,
    // instead of killing the process with SIGXFSZ mid-write.
    // SAFETY: setting a signal's disposition to "ignore" before any other
    // thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    quiet_on_closed_stdout();
    let cli = Cli::parse_checked();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crm-edm-sync: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    if cli.command == Some(Command::Demo) {
        // The demo prints its own report; only problems are logged.
        telemetry::init(LogFormat::Pretty, "warn");
        return runtime.block_on(async {
            match crate::demo::run().await {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("crm-edm-sync: demo failed: {e:#}");
                    ExitCode::from(1)
                }
            }
        });
    }
    let settings = match Settings::load(cli.config.as_deref(), cli.access()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("crm-edm-sync: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::init(settings.log.format, &settings.log.level);
    runtime.block_on(run(cli, settings))
}

/// Standard output that cannot be written is not a crash: a reader that
/// went away (`demo | head -1`) ends the process quietly with status 0,
/// any other failure (a full disk) with one line on stderr and status 1 —
/// instead of a panic and status 101. (`println!` panics on a write error;
/// this hook catches exactly that panic, wherever it happens.)
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if let Some(cause) = text.strip_prefix("failed printing to stdout: ") {
            if cause.contains("Broken pipe") {
                std::process::exit(0);
            }
            eprintln!("crm-edm-sync: cannot write to standard output: {cause}");
            std::process::exit(1);
        }
        default(info);
    }));
}

/// Runs the command `cli` names with `settings`. `demo` is handled by
/// `main` because it needs no settings.
pub async fn run(cli: Cli, settings: Settings) -> ExitCode {
    let set = match settings.tenant_set(cli.access()) {
        Ok(set) => set,
        Err(e) => {
            eprintln!("crm-edm-sync: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let redactor = crate::redact::Redactor::new(
        std::iter::once(&settings)
            .chain(&set.tenants)
            .flat_map(crate::jobs::secrets_of),
    );
    let result = match fleet_wide(&cli, &settings, &set).await {
        Some(result) => result,
        None => match one_tenant(&cli, &settings, &set) {
            Ok(tenant) => {
                let name = tenant.tenant.to_string();
                crate::scope::within(&name, run_for(cli, tenant)).await
            }
            Err(problem) => {
                eprintln!("crm-edm-sync: {problem}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
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

/// The commands that serve or cover every tenant: the daemon, `health`,
/// `tenant purge`, and — with `tenants.dir` and no `--tenant` — `status`,
/// `check` and `--once`. `None`: the command is about one tenant.
async fn fleet_wide(
    cli: &Cli,
    settings: &Settings,
    set: &crate::config::TenantSet,
) -> Option<anyhow::Result<ExitCode>> {
    let every = settings.tenants.dir.is_some() && cli.tenant.is_none();
    Some(match &cli.command {
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
        Some(Command::Tenant {
            action: crate::cli::TenantAction::Purge { name },
        }) => crate::purge::run(settings, set, name).await,
        Some(Command::Status { json }) if every => crate::status::print_all(set, *json).await,
        Some(Command::Check) if every => crate::check::run_all(set).await,
        None if cli.once && every => once_every_tenant(cli, set).await,
        None if !cli.once => crate::daemon::run(settings.clone(), cli.config.clone()).await,
        _ => return None,
    })
}

/// The settings of the one tenant a command is about: `--tenant NAME`, or
/// the only tenant there is. A tenant whose file was removed can still be
/// read (`status`, `explain`, `audit`) until it is purged.
fn one_tenant(
    cli: &Cli,
    settings: &Settings,
    set: &crate::config::TenantSet,
) -> Result<Settings, String> {
    let names = set.names().join(", ");
    let Some(name) = &cli.tenant else {
        return match set.tenants.as_slice() {
            [only] if set.refused.is_empty() => Ok(only.clone()),
            _ => Err(format!(
                "`{}` is about one tenant: name it with --tenant NAME (tenants: {names})",
                cli.command.as_ref().map_or("--once", Command::name)
            )),
        };
    };
    if let Some(found) = set.get(name) {
        return Ok(found.clone());
    }
    if let Some(refused) = set.refused.iter().find(|r| &r.name == name) {
        return Err(refused.error.clone());
    }
    let tenant: crate::config::Tenant = name.parse()?;
    let removed_but_readable =
        settings.tenants.dir.is_some() && cli.access() == crate::config::Access::StateOnly;
    if !removed_but_readable {
        return Err(format!("no tenant {name} (tenants: {names})"));
    }
    let mut scoped = settings.clone();
    scoped.database.url = crate::config::scoped_database_url(&settings.database.url, &tenant);
    scoped.tenant = tenant;
    Ok(scoped)
}

/// `--once` of every tenant, one after the other, each under a heading;
/// the exit code is the worst of theirs (a refused tenant file is a
/// configuration error).
async fn once_every_tenant(cli: &Cli, set: &crate::config::TenantSet) -> anyhow::Result<ExitCode> {
    let mut worst: u8 = 0;
    for refused in &set.refused {
        println!("== tenant {}: refused: {}", refused.name, refused.error);
        worst = worst.max(EXIT_CONFIG);
    }
    for settings in &set.tenants {
        let name = settings.tenant.to_string();
        println!("== tenant {name}");
        let code = crate::scope::within(&name, once(cli, settings.clone())).await;
        let code = match code {
            Ok(code) if code == ExitCode::SUCCESS => 0,
            Ok(_) => EXIT_FAILED,
            Err(e) => {
                let line = format!("{e:#}");
                tracing::error!(error = %line, "command failed");
                println!("crm-edm-sync: {line}");
                EXIT_FAILED
            }
        };
        worst = worst.max(code);
    }
    Ok(ExitCode::from(worst))
}

/// The command of one tenant, with its settings.
async fn run_for(cli: Cli, settings: Settings) -> anyhow::Result<ExitCode> {
    match cli.command {
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
        Some(Command::Reconcile { json, report }) => {
            crate::reconcile::print(settings, crate::reconcile::Question { json, report }).await
        }
        Some(Command::Audit {
            email,
            json,
            since,
            until,
            format,
        }) => {
            let question = crate::audit::Question {
                email,
                json,
                since,
                until,
                format,
            };
            crate::audit::print(&settings, question).await
        }
        Some(Command::Forget {
            email,
            dry_run,
            include_adopted,
        }) => {
            let question = crate::forget::Question {
                email,
                dry_run,
                include_adopted,
            };
            crate::forget::print(settings, question).await
        }
        Some(Command::Check) => crate::check::run(settings).await,
        None => once(&cli, settings).await,
        Some(other @ (Command::Health | Command::Demo | Command::Tenant { .. })) => {
            anyhow::bail!("`{}` is not a command of one tenant", other.name())
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
    // Fenced: a daemon that takes over (should this process lose its
    // lock) makes every later batch of ours fail.
    let printed = crate::jobs::holding(settings, lock, async |ctx: &Context| {
        crate::once::run_jobs(ctx, &what).await
    })
    .await?;
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
            // The daemon logged the run's errors in its own log; this
            // process's log (stderr) gets them too, as a run here would.
            for failure in printed.failures() {
                tracing::error!(error = %failure, ran_by = "daemon", "run failed");
            }
            print!("{}", printed.text);
            Err(printed.exit_code())
        }
        Asked::RunHere(lock) => Ok(lock),
        Asked::NobodyTook => anyhow::bail!(
            "another crm-edm-sync instance holds the state database and took no request (waited {} s, daemon.lock_wait_secs): it is another --once, or a daemon standing by; try again later",
            settings.daemon.lock_wait.as_secs()
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
