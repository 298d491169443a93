//! `--once`: the jobs it runs and what it prints, whether this process
//! runs them or the active daemon does for it (a [`RunAsk`] through the
//! state database; see [`ask_the_daemon`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::cli::EXIT_FAILED;
use crate::config::Settings;
use crate::domain::MemberFields;
use crate::jobs::{Context, RunOptions};
use crate::state::{RunAsk, Store};
use crate::stored_enums::{Job, RequestState};
use crate::sync::contacts::{self, ContactsReport, Outcome, Preview};
use crate::writeback;

/// What `--once` runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OnceJobs {
    /// `None`: both jobs, contacts first.
    pub job: Option<Job>,
    pub opts: RunOptions,
    /// `--plan FILE` (with `--dry-run`).
    pub plan: Option<PathBuf>,
}

impl OnceJobs {
    /// The request the daemon is sent (a dry run is never sent: it runs
    /// in the asking process, which needs no lock for it).
    pub fn ask(&self) -> RunAsk {
        RunAsk {
            job: self.job,
            full: self.opts.full,
            force: self.opts.force,
            retry_parked: self.opts.retry_parked,
        }
    }

    /// The jobs of a request the daemon took.
    pub fn from_ask(ask: RunAsk) -> OnceJobs {
        OnceJobs {
            job: ask.job,
            opts: RunOptions {
                dry_run: false,
                force: ask.force,
                full: ask.full,
                retry_parked: ask.retry_parked,
            },
            plan: None,
        }
    }

    /// The jobs, in the order they run.
    pub fn jobs(&self) -> Vec<Job> {
        match self.job {
            Some(job) => vec![job],
            None => Job::ALL.to_vec(),
        }
    }
}

/// What a `--once` run printed on stdout, and whether every job succeeded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Printed {
    pub ok: bool,
    pub text: String,
}

/// How every failure line of `--once`'s report begins (a job's error, a
/// refusal, a run the stopping daemon cut short); the rest of the report is
/// the plan and what was done.
pub const FAILURE_PREFIX: &str = "crm-edm-sync: ";

impl Printed {
    /// The report's failure lines, without their prefix.
    pub fn failures(&self) -> impl Iterator<Item = &str> {
        self.text
            .lines()
            .filter_map(|line| line.strip_prefix(FAILURE_PREFIX))
    }

    pub fn exit_code(&self) -> ExitCode {
        if self.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Runs `what`'s jobs in order with `ctx`; returns what `--once` prints.
pub async fn run_jobs(ctx: &Context, what: &OnceJobs) -> Printed {
    let mut printed = Printed {
        ok: true,
        text: String::new(),
    };
    for job in what.jobs() {
        let (ok, text) = run_job(ctx, what, job).await;
        printed.ok &= ok;
        printed.text.push_str(&text);
    }
    printed
}

/// One job of `what`: whether it succeeded, and its lines.
pub async fn run_job(ctx: &Context, what: &OnceJobs, job: Job) -> (bool, String) {
    let mut text = String::new();
    let ok = match job {
        Job::Contacts => match contacts::run(ctx, what.opts).await {
            Ok(report) => {
                if let Outcome::DryRun(preview) = &report.outcome {
                    text.push_str(&render_plan(&report, preview));
                    let top_up = planned_top_up(ctx, &mut text).await;
                    if let Some(path) = &what.plan {
                        if let Err(e) = write_plan(path, preview, top_up) {
                            return (failed(ctx, job, e, &mut text), text);
                        }
                        text.push_str(&format!("plan written to {}\n", path.display()));
                    }
                }
                // A refused real run says so on stdout, as every other
                // failure of --once does.
                if let Outcome::Refused(refusal) = &report.outcome {
                    text.push_str(&format!(
                        "{FAILURE_PREFIX}contacts: {}\n",
                        refusal.in_words()
                    ));
                }
                report.is_success()
            }
            Err(e) => failed(ctx, job, e, &mut text),
        },
        Job::Writeback if what.opts.dry_run => {
            // Write-back has nothing to preview that is not also a write.
            tracing::info!(job = %writeback::JOB, "--dry-run: the writeback job is skipped");
            true
        }
        Job::Writeback => match writeback::run_with(ctx, what.opts.retry_parked).await {
            Ok(report) => report.is_success(),
            Err(e) => failed(ctx, job, e, &mut text),
        },
        // Not a `--job` (it has its own command), but a request row may
        // name any job: the report, as `reconcile` prints it.
        Job::Reconcile => match crate::reconcile::run(ctx, !what.opts.dry_run).await {
            Ok(report) => {
                text.push_str(&crate::reconcile::to_text(&report, None));
                true
            }
            Err(e) => failed(ctx, job, e, &mut text),
        },
    };
    (ok, text)
}

/// Logs a job's error and adds its line to `text`; `false`.
fn failed(ctx: &Context, job: Job, e: anyhow::Error, text: &mut String) -> bool {
    let e = ctx.redactor.redact(&format!("{e:#}"));
    tracing::error!(job = %job, error = %e, "run failed");
    text.push_str(&format!("{FAILURE_PREFIX}{job}: {e}\n"));
    false
}

/// How often the asking process looks at its request.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// What became of asking the daemon.
pub enum Asked {
    /// The daemon ran it: what it printed.
    Ran(Printed),
    /// The lock came free before any daemon took the request (it was
    /// cancelled): run it here.
    RunHere(crate::lock::InstanceLock),
    /// Nobody took it within `daemon.lock_wait_secs` (it was cancelled).
    NobodyTook,
    /// Ctrl-C: the message to print (the daemon's run goes on, or the
    /// request was cancelled).
    Interrupted(String),
}

/// Asks the daemon holding the state database to run `what` next, and
/// follows that run to its end. Another `--once` may hold the lock instead
/// (it serves no request): the lock is tried meanwhile, and whichever
/// comes first — a daemon taking the request, the lock coming free — wins;
/// past `daemon.lock_wait_secs` with neither, the request is cancelled.
pub async fn ask_the_daemon(
    settings: &Settings,
    store: &Store,
    what: &OnceJobs,
    me: &str,
) -> anyhow::Result<Asked> {
    let target = crate::lock::LockTarget::of(&settings.database.url);
    let id = store.request_run(what.ask(), me).await?;
    tracing::info!(
        request = id,
        "another instance holds the state database: asked it to run this next"
    );
    let deadline = tokio::time::Instant::now() + settings.daemon.lock_wait;
    let mut announced = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = 0u64;
    loop {
        tick += 1;
        tokio::select! {
            _ = &mut ctrl_c => return Ok(Asked::Interrupted(interrupted(store, id).await?)),
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
        // The lock is tried every fourth look (a PostgreSQL lock try is a
        // connection of its own).
        let try_lock = tick.is_multiple_of(4);
        let request = store
            .run_request(id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("run request {id} vanished from the state database"))?;
        match request.state {
            RequestState::Done => {
                return Ok(Asked::Ran(Printed {
                    ok: request.succeeded == Some(true),
                    text: request.output.unwrap_or_default(),
                }));
            }
            RequestState::Cancelled => anyhow::bail!("run request {id} was cancelled"),
            RequestState::Running => {
                if !announced {
                    let by = request.claimed_by.unwrap_or_default();
                    tracing::info!(request = id, daemon = %by, "the active daemon took the request; following its run");
                    announced = true;
                }
                if try_lock && let Some(lock) = target.try_acquire().await? {
                    // The daemon that took it is gone: it will not finish.
                    drop(lock);
                    store
                        .fail_unfinished_run_requests("the daemon stopped before the run finished; what it did is recorded, and --once again completes it")
                        .await?;
                }
            }
            RequestState::Queued => {
                if try_lock
                    && let Some(lock) = target.try_acquire().await?
                    && store.cancel_run_request(id).await?
                {
                    return Ok(Asked::RunHere(lock));
                }
                if tokio::time::Instant::now() >= deadline && store.cancel_run_request(id).await? {
                    return Ok(Asked::NobodyTook);
                }
            }
        }
    }
}

/// Ctrl-C while following request `id`: cancelled if no daemon took it;
/// else its run goes on.
async fn interrupted(store: &Store, id: i64) -> anyhow::Result<String> {
    Ok(if store.cancel_run_request(id).await? {
        format!(
            "interrupted: run request {id} was cancelled before a daemon took it; nothing was run"
        )
    } else {
        format!(
            "interrupted: the daemon's run goes on (request {id}); `crm-edm-sync status` shows how it ends"
        )
    })
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

/// The reseller top-up the dry run's moment calls for (a line of the
/// plan, and its `--plan` line); a service that cannot be read is said,
/// and plans none.
async fn planned_top_up(ctx: &Context, text: &mut String) -> Option<serde_json::Value> {
    match crate::topup::planned(ctx).await {
        Ok(Some(top_up)) => {
            text.push_str(&format!(
                "plan: top up {} sends through the reseller account ({} left, below reseller.top_up_below = {})\n",
                top_up.count,
                top_up.qty_available,
                ctx.settings.reseller.top_up_below.unwrap_or_default()
            ));
            Some(top_up.json_line(ctx.settings.tenant.as_str()))
        }
        Ok(None) => None,
        Err(e) => {
            let e = ctx.redactor.redact(&format!("{e:#}"));
            text.push_str(&format!(
                "plan: no top-up planned: cannot read the service: {e}\n"
            ));
            None
        }
    }
}

/// Writes `--plan FILE`: one JSON object a line, the file created (or
/// truncated) readable by its owner only, since it holds full addresses.
fn write_plan(
    path: &std::path::Path,
    preview: &Preview,
    top_up: Option<serde_json::Value>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    // Readable by its owner only: it holds full addresses.
    crate::jobs::private_file::write_json_lines(path, preview.json_lines().chain(top_up))
        .with_context(|| format!("cannot write the plan to {}", path.display()))
}
