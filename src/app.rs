//! What each command does, given parsed flags and loaded settings. Returns
//! the process exit code: 0 success; 1 a failed or refused run, or an
//! unreachable API in `check`; 2 bad configuration (reported by `main`).

use std::process::ExitCode;
use std::time::Duration;

use crate::cli::{Cli, Command, Job};
use crate::config::Settings;
use crate::domain::MemberFields;
use crate::jobs::{Context, RunOptions};
use crate::sync::contacts::{self, ContactsReport, Outcome, Preview};
use crate::writeback;

pub use crate::cli::{EXIT_CONFIG, EXIT_FAILED};

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
            let (healthy, line) = crate::ops::probe(settings.http.listen).await;
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

async fn once(cli: &Cli, settings: Settings) -> anyhow::Result<ExitCode> {
    if cli.dry_run {
        // A dry run changes nothing at all — no lock file, no migration,
        // no run row — so it needs no lock and opens the database
        // read-only.
        let ctx = Context::new_read_only(settings).await?;
        let code = run_jobs(cli, &ctx).await;
        ctx.store.close().await;
        return code;
    }
    // One active instance per database: wait for a running daemon's job
    // to finish, up to a bound.
    let _lock = crate::lock::LockTarget::of(&settings.database.url)
        .acquire_within(
            Duration::from_secs(settings.daemon.lock_wait_secs),
            Duration::from_millis(500),
        )
        .await?;
    let ctx = Context::new(settings).await?;
    // Fence this run's writes: a daemon that takes over (should this
    // process lose its lock) makes every later batch of ours fail.
    crate::jobs::take_lease(&ctx).await?;
    let code = run_jobs(cli, &ctx).await;
    if let Err(e) = ctx.store.release_lease().await {
        tracing::warn!(error = %format!("{e:#}"), "cannot mark the lease released");
    }
    ctx.store.close().await;
    code
}

async fn run_jobs(cli: &Cli, ctx: &Context) -> anyhow::Result<ExitCode> {
    let opts = RunOptions {
        dry_run: cli.dry_run,
        force: cli.force,
        full: cli.full,
        retry_parked: cli.retry_parked,
    };
    let mut ok = true;
    if matches!(cli.job, None | Some(Job::Contacts)) {
        match contacts::run(ctx, opts).await {
            Ok(report) => {
                if let Outcome::DryRun(preview) = &report.outcome {
                    print!("{}", render_plan(&report, preview));
                    if let Some(path) = &cli.plan {
                        write_plan(path, preview)?;
                        println!("plan written to {}", path.display());
                    }
                }
                // A refused real run says so on stdout, as every other
                // failure of --once does.
                if let Outcome::Refused(refusal) = &report.outcome {
                    println!("crm-edm-sync: contacts: {}", refusal.in_words());
                }
                ok &= report.is_success();
            }
            Err(e) => {
                ok = false;
                let e = redacted(ctx, e);
                tracing::error!(job = %contacts::JOB, error = %e, "run failed");
                println!("crm-edm-sync: contacts: {e:#}");
            }
        }
    }
    if matches!(cli.job, None | Some(Job::Writeback)) {
        if cli.dry_run {
            // Write-back has nothing to preview that is not also a write.
            tracing::info!(
                job = %writeback::JOB,
                "--dry-run: the writeback job is skipped"
            );
        } else {
            match writeback::run_with(ctx, cli.retry_parked).await {
                Ok(report) => ok &= report.is_success(),
                Err(e) => {
                    ok = false;
                    let e = redacted(ctx, e);
                    tracing::error!(job = %writeback::JOB, error = %e, "run failed");
                    println!("crm-edm-sync: writeback: {e:#}");
                }
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}

fn redacted(ctx: &Context, e: anyhow::Error) -> anyhow::Error {
    anyhow::anyhow!(ctx.redactor.redact(&format!("{e:#}")))
}

/// Samples shown per kind in a dry-run plan.
const SAMPLE: usize = 5;

/// The dry-run report: counts, then a sample of each kind with link-man ids
/// and masked addresses (the plan goes to a terminal, not a log, but it
/// need not spread addresses further than an operator needs; `--plan FILE`
/// has them all), edits with what changes, and the refusal in words when
/// the real run would refuse the plan.
pub fn render_plan(report: &ContactsReport, preview: &Preview) -> String {
    use std::fmt::Write;
    let c = &report.counts;
    let plan = &preview.plan;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "dry run {}: {} customers, {} link-men, {} desired members",
        report.run_id, c.customers, c.linkmen, c.desired
    );
    let _ = writeln!(
        out,
        "plan: {} adds, {} edits, {} unsubscribes, {} adoptions; {} suppressed, {} invalid emails skipped; {} new user unsubscribes",
        plan.adds.len(),
        plan.edits.len(),
        plan.unsubs.len(),
        plan.adoptions(),
        plan.suppressed.len(),
        c.skipped_invalid,
        preview.user_unsubscribes.len()
    );
    for a in plan.adds.iter().take(SAMPLE) {
        let _ = writeln!(
            out,
            "  add    list {} {} (link-man {})",
            a.key.list_id,
            a.key.email.masked(),
            a.link_man_id
        );
    }
    for e in plan.edits.iter().take(SAMPLE) {
        let _ = writeln!(
            out,
            "  edit   list {} {} (link-man {}): {}",
            e.key.list_id,
            e.key.email.masked(),
            e.link_man_id,
            changes(&e.old, &e.fields)
        );
    }
    for u in plan.unsubs.iter().take(SAMPLE) {
        let owner = u
            .link_man_id
            .map(|id| format!(" (link-man {id})"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  unsub  list {} {}{owner}",
            u.key.list_id,
            u.key.email.masked()
        );
    }
    if let Some(refusal) = &preview.refusal {
        let _ = writeln!(out, "{}", refusal.in_words());
    }
    let _ = writeln!(out, "nothing was changed");
    out
}

/// What an edit changes: `fullname "Old" → "New", var1 "" → "Acme"`.
fn changes(old: &MemberFields, new: &MemberFields) -> String {
    let mut parts = Vec::new();
    if old.fullname() != new.fullname() {
        parts.push(format!(
            "fullname {:?} → {:?}",
            old.fullname(),
            new.fullname()
        ));
    }
    for (i, (o, n)) in old.vars().zip(new.vars()).enumerate() {
        if o != n {
            parts.push(format!("var{} {o:?} → {n:?}", i + 1));
        }
    }
    parts.join(", ")
}

/// Writes `--plan FILE`: one JSON object a line, the file created (or
/// truncated) readable by its owner only, since it holds full addresses.
fn write_plan(path: &std::path::Path, preview: &Preview) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Write as _;
    // A new file, readable by its owner only (it holds full addresses),
    // written beside the target and renamed over it: a file already there
    // is replaced, never written into with its old, wider mode.
    let write = || -> std::io::Result<()> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        let file = tempfile::NamedTempFile::new_in(dir)?;
        let mut out = std::io::BufWriter::new(file);
        for line in preview.json_lines() {
            serde_json::to_writer(&mut out, &line)?;
            out.write_all(b"\n")?;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.as_file().sync_all()?;
        file.persist(path).map_err(|e| e.error)?;
        Ok(())
    };
    write().with_context(|| format!("cannot write the plan to {}", path.display()))
}
