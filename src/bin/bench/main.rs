//! The benchmark: the contacts and write-back jobs against the sandbox at a
//! chosen size and added latency, measured against lower bounds.
//!
//! Why one file over 600 lines: a benchmark binary whose scenarios, bounds
//! and targets are read top to bottom as one script (BENCHMARKS.md
//! explains each bound).
//!
//! ```sh
//! cargo run --profile production --bin bench -- --linkmen 100000 --latency-ms 20 --db sqlite
//! cargo run --profile production --bin bench -- --linkmen 10000 --latency-ms 0 --db postgres
//! ```
//!
//! The sandbox runs in this process; each job runs as the real binary in a
//! child process (`--once --job …`), so wall time, CPU time (`wait4`
//! rusage) and peak RSS (the child's `VmHWM`) are the daemon's own. For each scenario it prints requests
//! by API and operation, the lower bounds on requests and on wall time, the
//! ratios measured / bound, CPU time per link-man and peak RSS; then checks
//! the issue's targets and exits 1 when one is missed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use crm_edm_sync::sandbox::{Chaos, Sandbox, SandboxCampaign, Server};
use serde_json::json;

mod fleet;

#[derive(Parser, Debug)]
#[command(about = "crm-edm-sync benchmark against the sandbox")]
struct Args {
    /// Link-men (customers are half as many; 1–3 link-men each).
    #[arg(long, default_value_t = 10_000)]
    linkmen: i64,
    /// Latency added to every sandbox request, milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// `sqlite` or `postgres` (a fresh database on 127.0.0.1:5432).
    #[arg(long, default_value = "sqlite")]
    db: String,
    /// `crm.concurrency`.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// The crm-edm-sync binary (default: beside this one).
    #[arg(long)]
    bin: Option<std::path::PathBuf>,
    /// A command to run each job under, for profiling, e.g.
    /// `--wrap "heaptrack -o /tmp/contacts"` (split at spaces). The figures
    /// are then the wrapper's, not the daemon's.
    #[arg(long)]
    wrap: Option<String>,
    /// Addresses EDM refuses (poison records), spread over list 1's
    /// link-men. Each may cost the first sync at most
    /// `2 × ceil(log2(edm.batch_size))` more requests (bisection); with
    /// `edm.max_attempts = 1` it is parked there, so the reruns send none.
    #[arg(long, default_value_t = 0)]
    refuse: i64,
    /// Instead of the scenarios: a first sync, the no-change rerun on the
    /// fresh database, then this many years of 15-minute runs with 1 %
    /// churn written as back-dated rows a month at a time (pruned as the
    /// runs would with `database.retention_days` 90), and the no-change
    /// rerun again. Reports the state DB size per month.
    #[arg(long, default_value_t = 0)]
    history_years: i64,
    /// With `--history-years`: write this many months instead (a shorter
    /// history for profiling; the window is full after four).
    #[arg(long)]
    history_months: Option<i64>,
    /// Instead of the scenarios: for each of these sizes (link-men,
    /// comma-separated, e.g. `10000,100000,300000,1000000`), a fresh
    /// sandbox and state database, a first sync, the no-change rerun and
    /// a write-back with 10 % opening; then a table of the sizes and how
    /// the cost per link-man grew from the smallest to the largest.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    sweep: Vec<i64>,
    /// With `--sweep`: run the sizes this many times over, one round
    /// after the other. The table keeps each size's and scenario's
    /// fastest run; the curve's targets are checked on the median
    /// round's growth, because a shared machine drifts by 10–50 % within
    /// one sweep.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Instead of the scenarios: this many tenants of `--linkmen` each, on
    /// PostgreSQL, served by `--instances` daemons (see `fleet`).
    #[arg(long, default_value_t = 0)]
    tenants: usize,
    /// With `--tenants`: how many daemons share them.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// With `--tenants` and two instances or more: SIGKILL the second once
    /// a third of the tenants converged.
    #[arg(long)]
    kill_one: bool,
    /// With `--tenants`: tenant 0 has this many link-men instead.
    #[arg(long, default_value_t = 0)]
    big: i64,
    /// With `--tenants`: `sync.schedule`.
    #[arg(long, default_value = "0 */5 * * * *")]
    schedule: String,
    /// With `--tenants`: `daemon.max_parallel_jobs`.
    #[arg(long, default_value_t = 4)]
    max_parallel_jobs: usize,
}

/// The curve's targets, from the smallest size of a sweep to the largest:
/// the wall per link-man may grow by 5 % (a million link-men in at most
/// 10.5 times the time of 100 000), the CPU per link-man by 20 %.
const CURVE_WALL: f64 = 1.05;
const CURVE_CPU: f64 = 1.2;

const PAGE_SIZE: i64 = 100;
const BATCH: i64 = 500;
/// `edm.list_page_size` and `edm.concurrency` (their defaults).
const LIST_PAGE: i64 = 1000;
const EDM_CONCURRENCY: i64 = 4;
const LOOKBACK_DAYS: i64 = 14;
/// The synced lists: 1 and 2 (VIP customers).
const LISTS: i64 = 2;

/// What a child run cost.
struct Measured {
    wall: Duration,
    cpu: Duration,
    max_rss_kb: i64,
    ok: bool,
    exit_code: Option<i32>,
    /// CPU time this process (the sandbox, serving the child) used while
    /// the child ran.
    sandbox_cpu: Duration,
}

/// CPU time (user + system) this process has used so far.
fn own_cpu() -> Duration {
    // SAFETY: a zeroed rusage is a valid value for getrusage to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is to a live local.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    timeval(usage.ru_utime) + timeval(usage.ru_stime)
}

fn timeval(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

fn run_child(
    wrap: &[String],
    bin: &std::path::Path,
    config: &std::path::Path,
    job: &str,
) -> Measured {
    run_command(wrap, bin, config, &["--once", "--job", job])
}

/// The binary with `args` (after `--config`), measured.
fn run_command(
    wrap: &[String],
    bin: &std::path::Path,
    config: &std::path::Path,
    args: &[&str],
) -> Measured {
    let started = Instant::now();
    let sandbox_before = own_cpu();
    let mut command = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = std::process::Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => std::process::Command::new(bin),
    };
    // Reaped below with wait4, which also gives its resource usage.
    #[allow(clippy::zombie_processes)]
    let child = command
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("the crm-edm-sync binary starts");
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // Peak RSS is read from the child's own /proc/PID/status (VmHWM, the
    // high-water mark of its address space since exec), sampled until it
    // exits. `ru_maxrss` cannot be used: it survives exec and so includes
    // what the child inherited when forked from this process, which holds
    // the whole sandbox.
    let mut hwm_kb: i64 = 0;
    loop {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(line) = text.lines().find(|l| l.starts_with("VmHWM:"))
        {
            let kb: i64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            hwm_kb = hwm_kb.max(kb);
        }
        // SAFETY: pid is our own child; the pointers are to live locals.
        let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if rc == pid {
            break;
        }
        assert!(rc == 0, "wait4 failed");
        std::thread::sleep(Duration::from_millis(2));
    }
    let wall = started.elapsed();
    Measured {
        wall,
        sandbox_cpu: own_cpu().saturating_sub(sandbox_before),
        cpu: timeval(usage.ru_utime) + timeval(usage.ru_stime),
        max_rss_kb: hwm_kb,
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        exit_code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
    }
}

/// The peak RSS a run of `linkmen` may reach: 150 MB up to 100 000
/// link-men, then growing with the 0.3th power of the size (300 MB at
/// 1 000 000): memory must grow much slower than the work.
fn rss_budget_mb(linkmen: i64) -> f64 {
    150.0 * (linkmen as f64 / 100_000.0).max(1.0).powf(0.3)
}

/// The scenario table's header. `daemon CPU` and `sandbox CPU` are shares
/// of the wall; the sandbox's cost per request must not grow with its data
/// (it would then be what the bench measures).
fn print_header() {
    println!(
        "| scenario | wall | requests | request bound | req ratio | wall bound | wall ratio | CPU / link-man | peak RSS | EDM writes | daemon CPU | sandbox CPU | |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
}

fn requests(sb: &Sandbox) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in sb.requests() {
        let api = if r.server == Server::Crm {
            "crm"
        } else {
            "edm"
        };
        *out.entry(format!("{api} {}", r.operation)).or_insert(0) += 1;
    }
    out
}

fn ceil(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

struct Row {
    scenario: String,
    m: Measured,
    reqs: usize,
    req_bound: i64,
    wall_bound: Duration,
    linkmen: i64,
    detail: BTreeMap<String, usize>,
    edm_writes: usize,
}

impl Row {
    /// The targets this row misses (empty when it meets them all):
    /// requests ≤ 1.02 × bound, no EDM write on the no-change rerun, wall
    /// ≤ 1.25 × bound under latency, from 100 000 link-men on and with no
    /// latency a first sync ≤ 150 µs and a rerun ≤ 80 µs of wall per
    /// link-man (15 s and 8 s at 100 000), and peak RSS within
    /// [`rss_budget_mb`]. Every target scales with the work, so a large
    /// run is not judged by a small run's seconds.
    fn misses(&self, latency: Duration) -> Vec<String> {
        let mut out = Vec::new();
        let name = &self.scenario;
        if !self.m.ok {
            out.push(format!("{name}: the run failed"));
        }
        let req_ratio = self.reqs as f64 / self.req_bound.max(1) as f64;
        if req_ratio > 1.02 {
            out.push(format!("{name}: requests {req_ratio:.3} × bound > 1.02"));
        }
        if name == "no-change rerun" && self.edm_writes > 0 {
            out.push(format!("{name}: {} EDM writes", self.edm_writes));
        }
        let wall = self.m.wall.as_secs_f64();
        if !latency.is_zero() && wall > 1.25 * self.wall_bound.as_secs_f64() {
            let ratio = wall / self.wall_bound.as_secs_f64();
            out.push(format!("{name}: wall {ratio:.2} × bound > 1.25"));
        }
        if latency.is_zero() && self.linkmen >= 100_000 {
            let per_linkman_us = match name.as_str() {
                "first sync" => Some(150.0),
                "no-change rerun" => Some(80.0),
                _ => None,
            };
            if let Some(us) = per_linkman_us {
                let limit = us * self.linkmen as f64 / 1e6;
                if wall > limit {
                    out.push(format!(
                        "{name}: {wall:.2} s > {limit:.1} s ({us} µs a link-man)"
                    ));
                }
            }
        }
        let rss_mb = self.m.max_rss_kb as f64 / 1024.0;
        let budget = rss_budget_mb(self.linkmen);
        if rss_mb > budget {
            out.push(format!("{name}: peak RSS {rss_mb:.0} MB > {budget:.0} MB"));
        }
        out
    }

    /// The daemon's CPU and the sandbox's, each as a share of the wall:
    /// what part of the time each was computing (over 100 % together,
    /// they competed for the cores).
    fn shares(&self) -> (f64, f64) {
        let wall = self.m.wall.as_secs_f64().max(1e-9);
        (
            100.0 * self.m.cpu.as_secs_f64() / wall,
            100.0 * self.m.sandbox_cpu.as_secs_f64() / wall,
        )
    }

    fn wall_per_linkman_us(&self) -> f64 {
        self.m.wall.as_secs_f64() * 1e6 / self.linkmen.max(1) as f64
    }

    fn cpu_per_linkman_us(&self) -> f64 {
        self.m.cpu.as_secs_f64() * 1e6 / self.linkmen.max(1) as f64
    }

    fn print(&self) {
        let ratio_req = self.reqs as f64 / self.req_bound.max(1) as f64;
        let ratio_wall = if self.wall_bound.is_zero() {
            f64::NAN
        } else {
            self.m.wall.as_secs_f64() / self.wall_bound.as_secs_f64()
        };
        let (daemon, sandbox) = self.shares();
        println!(
            "| {} | {:.2} s | {} | {} | {:.3} | {:.2} s | {:.2} | {:.1} µs | {:.0} MB | {} | {daemon:.0} % | {sandbox:.0} % ({:.1} µs/req) | {} |",
            self.scenario,
            self.m.wall.as_secs_f64(),
            self.reqs,
            self.req_bound,
            ratio_req,
            self.wall_bound.as_secs_f64(),
            ratio_wall,
            self.m.cpu.as_secs_f64() * 1e6 / self.linkmen as f64,
            self.m.max_rss_kb as f64 / 1024.0,
            self.edm_writes,
            self.m.sandbox_cpu.as_secs_f64() * 1e6 / self.reqs.max(1) as f64,
            if self.m.ok { "ok" } else { "FAILED" },
        );
        let detail: Vec<String> = self
            .detail
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        eprintln!("    {}: {}", self.scenario, detail.join(" "));
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = args.bin.clone().unwrap_or_else(|| {
        let me = std::env::current_exe().expect("own path");
        me.with_file_name("crm-edm-sync")
    });
    let wrap: Vec<String> = args
        .wrap
        .as_deref()
        .map(|w| w.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    if !args.sweep.is_empty() {
        return sweep(&args, &bin, &wrap).await;
    }
    if args.tenants > 0 {
        let misses = fleet::run(&fleet::FleetArgs {
            tenants: args.tenants,
            linkmen: args.linkmen,
            latency: Duration::from_millis(args.latency_ms),
            instances: args.instances.max(1),
            kill_one: args.kill_one,
            big: args.big,
            schedule: args.schedule.clone(),
            max_parallel_jobs: args.max_parallel_jobs,
            bin: bin.clone(),
        })
        .await?;
        return verdict(misses, false);
    }
    let latency = Duration::from_millis(args.latency_ms);
    let c = args.concurrency as i64;

    // Data: customers 1..=n/2, link-men 1–3 each (2 on average), every
    // third customer a VIP routed to list 2.
    let sb = Sandbox::start().await?;
    let data = seed(&sb, args.linkmen);
    let (refused, poisoned) = poison(&sb, &data.seeded, args.refuse);
    let db = bench_database(&args.db).await?;
    let config = write_bench_config(&sb, &db, c)?;
    slow_down(&sb, latency);
    println!(
        "\nbench: {} link-men, {} customers, latency {} ms, crm.concurrency {c}, db {}\n",
        data.linkmen, data.customers, args.latency_ms, args.db
    );
    print_header();

    if args.history_years > 0 {
        let months = args.history_months.unwrap_or(args.history_years * 12);
        let result = history(months, &bin, &config, &db, data.linkmen).await;
        cleanup(&args, &config).await?;
        return result;
    }
    let mut bench = Bench::new(&sb, &wrap, &bin, &config, &data, latency, c);
    bench.refused = refused;
    bench.scenarios(&data, &poisoned).await;
    cleanup(&args, &config).await?;
    let mut misses: Vec<String> = bench.rows.iter().flat_map(|r| r.misses(latency)).collect();
    misses.append(&mut bench.extra_misses);
    verdict(misses, !wrap.is_empty())
}

/// `--sweep`: the first sync, the no-change rerun and the write-back at
/// each size on a fresh sandbox and database, `--rounds` times over, then
/// the curve of each size's and scenario's fastest run.
async fn sweep(args: &Args, bin: &std::path::Path, wrap: &[String]) -> anyhow::Result<()> {
    let latency = Duration::from_millis(args.latency_ms);
    let c = args.concurrency as i64;
    let mut rounds: Vec<Vec<Row>> = Vec::new();
    for round in 1..=args.rounds.max(1) {
        let mut rows: Vec<Row> = Vec::new();
        for &size in &args.sweep {
            let sb = Sandbox::start().await?;
            let data = seed(&sb, size);
            let db = bench_database(&args.db).await?;
            let config = write_bench_config(&sb, &db, c)?;
            slow_down(&sb, latency);
            println!(
                "\nsweep: {} link-men, latency {} ms, db {}, round {round}\n",
                data.linkmen, args.latency_ms, args.db
            );
            print_header();
            let mut bench = Bench::new(&sb, wrap, bin, &config, &data, latency, c);
            bench.first_sync(&data);
            bench.no_change_rerun();
            bench.write_back(&data);
            rows.append(&mut bench.rows);
            cleanup(args, &config).await?;
        }
        rounds.push(rows);
    }
    let mut misses: Vec<String> = rounds
        .iter()
        .flatten()
        .flat_map(|r| r.misses(latency))
        .collect();
    let (by_round, curve_missed) = curve_by_round(&rounds);
    print_curve(&fastest(rounds.into_iter().flatten().collect()));
    for line in by_round {
        println!("{line}");
    }
    misses.extend(curve_missed);
    verdict(misses, !wrap.is_empty())
}

/// The curve's targets, checked on the median round: in each round, how
/// each scenario's cost per link-man grew from the smallest size to the
/// largest (the two runs nearest in time), then the median over the
/// rounds. A drifting machine slows or speeds both runs of a round
/// alike more often than it does the fastest runs of different rounds.
///
/// Returns a line per scenario and the targets missed.
fn curve_by_round(rounds: &[Vec<Row>]) -> (Vec<String>, Vec<String>) {
    let (mut lines, mut misses) = (Vec::new(), Vec::new());
    for scenario in ["first sync", "no-change rerun", "write-back"] {
        let ratios: Vec<(f64, f64, &Row, &Row)> = rounds
            .iter()
            .filter_map(|round| {
                let of: Vec<&Row> = round.iter().filter(|r| r.scenario == scenario).collect();
                let (small, large) = (*of.first()?, *of.last()?);
                (of.len() > 1).then(|| {
                    let wall = large.wall_per_linkman_us() / small.wall_per_linkman_us();
                    let cpu = large.cpu_per_linkman_us() / small.cpu_per_linkman_us();
                    (wall, cpu, small, large)
                })
            })
            .collect();
        let Some(&(_, _, small, large)) = ratios.first() else {
            continue;
        };
        let wall = median(ratios.iter().map(|r| r.0).collect());
        let cpu = median(ratios.iter().map(|r| r.1).collect());
        let each: Vec<String> = ratios.iter().map(|r| format!("×{:.2}", r.0)).collect();
        lines.push(format!(
            "{scenario}: wall per link-man per round {} from {} to {} link-men; median ×{wall:.2} wall, ×{cpu:.2} CPU",
            each.join(", "),
            small.linkmen,
            large.linkmen
        ));
        misses.extend(curve_misses(scenario, small, large, wall, cpu));
    }
    (lines, misses)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Of the rows of one size and scenario, the one with the least wall, in
/// the order the sizes and scenarios were first run.
fn fastest(rows: Vec<Row>) -> Vec<Row> {
    let mut best: Vec<Row> = Vec::new();
    for row in rows {
        match best
            .iter_mut()
            .find(|b| b.linkmen == row.linkmen && b.scenario == row.scenario)
        {
            Some(b) if row.m.wall < b.m.wall => *b = row,
            Some(_) => {}
            None => best.push(row),
        }
    }
    best
}

/// The sweep's table: per size and scenario, the wall, the daemon's CPU
/// per link-man and its peak RSS; then, per scenario, how each grew from
/// the smallest size to the largest (the targets are checked per round,
/// [`curve_by_round`]).
fn print_curve(rows: &[Row]) {
    println!(
        "\n| link-men | scenario | wall | wall / link-man | CPU / link-man | peak RSS | sandbox µs/req |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        println!(
            "| {} | {} | {:.2} s | {:.1} µs | {:.1} µs | {:.0} MB | {:.1} |",
            r.linkmen,
            r.scenario,
            r.m.wall.as_secs_f64(),
            r.wall_per_linkman_us(),
            r.cpu_per_linkman_us(),
            r.m.max_rss_kb as f64 / 1024.0,
            r.m.sandbox_cpu.as_secs_f64() * 1e6 / r.reqs.max(1) as f64,
        );
    }
    println!();
    for scenario in ["first sync", "no-change rerun", "write-back"] {
        let of: Vec<&Row> = rows.iter().filter(|r| r.scenario == scenario).collect();
        let (Some(small), Some(large)) = (of.first(), of.last()) else {
            continue;
        };
        if of.len() < 2 {
            continue;
        }
        println!(
            "{scenario}: per-link-man cost ×{:.2} wall, ×{:.2} CPU from {} to {} link-men (×{:.0} the work); peak RSS {:.0} → {:.0} MB (×{:.2})",
            large.wall_per_linkman_us() / small.wall_per_linkman_us(),
            large.cpu_per_linkman_us() / small.cpu_per_linkman_us(),
            small.linkmen,
            large.linkmen,
            large.linkmen as f64 / small.linkmen as f64,
            small.m.max_rss_kb as f64 / 1024.0,
            large.m.max_rss_kb as f64 / 1024.0,
            large.m.max_rss_kb as f64 / small.m.max_rss_kb.max(1) as f64,
        );
    }
}

/// How `scenario`'s cost per link-man grew from `small`'s size to
/// `large`'s (`wall`, `cpu`: the median round's), against the curve's
/// targets.
fn curve_misses(scenario: &str, small: &Row, large: &Row, wall: f64, cpu: f64) -> Vec<String> {
    let mut out = Vec::new();
    if wall > CURVE_WALL {
        out.push(format!(
            "{scenario}: wall per link-man ×{wall:.2} (median round) from {} to {} link-men > ×{CURVE_WALL}",
            small.linkmen, large.linkmen
        ));
    }
    if cpu > CURVE_CPU {
        out.push(format!(
            "{scenario}: CPU per link-man ×{cpu:.2} (median round) from {} to {} link-men > ×{CURVE_CPU}",
            small.linkmen, large.linkmen
        ));
    }
    out
}

/// The benchmark's scenarios, run one after the other on one sandbox and
/// one state database, each a child process measured as a whole.
struct Bench<'a> {
    sb: &'a Sandbox,
    wrap: &'a [String],
    bin: &'a std::path::Path,
    config: &'a std::path::Path,
    refused: i64,
    linkmen: i64,
    latency: Duration,
    concurrency: i64,
    pull_pages: i64,
    customers: i64,
    /// Each scenario's row.
    rows: Vec<Row>,
    /// Targets missed that are not a row's own.
    extra_misses: Vec<String>,
}

impl<'a> Bench<'a> {
    fn new(
        sb: &'a Sandbox,
        wrap: &'a [String],
        bin: &'a std::path::Path,
        config: &'a std::path::Path,
        data: &Seeded,
        latency: Duration,
        concurrency: i64,
    ) -> Self {
        Bench {
            sb,
            wrap,
            bin,
            config,
            refused: 0,
            linkmen: data.linkmen,
            latency,
            concurrency,
            pull_pages: data.customers / PAGE_SIZE + 1,
            customers: data.customers,
            rows: Vec::new(),
            extra_misses: Vec::new(),
        }
    }

    /// Requests of a whole CRM pull.
    fn pull(&self) -> i64 {
        self.pull_pages + self.customers
    }

    /// The wall time bound of a pull and `extra` requests one after the
    /// other.
    fn pull_wall(&self, extra: i64) -> Duration {
        let l = self.latency;
        l * (self.pull_pages.max(ceil(self.customers, self.concurrency)) as u32)
            + l * (extra as u32)
    }

    /// Runs `job` once in a child process and prints its row. A run that
    /// refused addresses ends partial (exit 1) by design: only the first
    /// sync meets the refused addresses (they are parked there).
    fn scenario(&mut self, name: &str, job: &str, req_bound: i64, wall_bound: Duration) {
        self.measure(name, &["--once", "--job", job], req_bound, wall_bound);
    }

    /// Runs the binary with `args` once in a child process, prints its row
    /// and returns it.
    fn measure(&mut self, name: &str, args: &[&str], req_bound: i64, wall_bound: Duration) -> &Row {
        self.sb.clear_requests();
        let mut m = run_command(self.wrap, self.bin, self.config, args);
        if name == "first sync" && self.refused > 0 && !m.ok {
            m.ok = m.exit_code == Some(1);
        }
        let detail = requests(self.sb);
        let row = Row {
            scenario: name.to_string(),
            reqs: detail.values().sum(),
            req_bound,
            wall_bound,
            linkmen: self.linkmen,
            edm_writes: self
                .sb
                .requests()
                .iter()
                .filter(|r| r.is_edm_write())
                .count(),
            detail,
            m,
        };
        row.print();
        self.rows.push(row);
        &self.rows[self.rows.len() - 1]
    }

    /// The pull, one export read per list, the list reads rule 5 requires
    /// (one page each: the lists are empty), and the add batches.
    fn first_sync(&mut self, data: &Seeded) {
        let adds: i64 = data.per_list.iter().map(|&k| ceil(k, BATCH)).sum();
        // Each refused address: two requests per halving of its batch.
        let bisection = self.refused * 2 * (BATCH as f64).log2().ceil() as i64;
        let first_extra = LISTS + LISTS + adds + bisection;
        let (pull, wall) = (self.pull(), self.pull_wall(first_extra));
        self.scenario("first sync", "contacts", pull + first_extra, wall);
    }

    /// No change: the pull and the export reads, zero writes.
    fn no_change_rerun(&mut self) {
        let wall = self.pull_wall(LISTS);
        self.scenario("no-change rerun", "contacts", self.pull() + LISTS, wall);
    }

    /// The drift report (`reconcile`) of the synced state: each list's
    /// export and its pages. Its wall is also held against reading the
    /// same pages alone (in this process, with the daemon's client): from
    /// 100 000 link-men on, at most [`DRIFT_OVER_READ`] times that.
    async fn drift_report(&mut self, data: &Seeded) {
        let pages: i64 = data.per_list.iter().map(|&k| k / LIST_PAGE + 1).sum();
        let read_alone = match read_lists_alone(self.config).await {
            Ok(t) => t,
            Err(e) => {
                self.extra_misses
                    .push(format!("drift report: cannot read the lists alone: {e:#}"));
                return;
            }
        };
        let bound = LISTS + pages;
        let row = self.measure(
            "drift report",
            &["reconcile"],
            bound,
            self.latency * (bound as u32),
        );
        let (wall, edm_writes) = (row.m.wall, row.edm_writes);
        let ratio = wall.as_secs_f64() / read_alone.as_secs_f64().max(1e-9);
        println!(
            "    drift report: {:.2} s, the lists read alone {:.2} s: {ratio:.2} × (target ≤ {DRIFT_OVER_READ} from 100 000 link-men)",
            wall.as_secs_f64(),
            read_alone.as_secs_f64()
        );
        if self.linkmen >= 100_000 && ratio > DRIFT_OVER_READ {
            self.extra_misses.push(format!(
                "drift report: {ratio:.2} × the time of reading the lists > {DRIFT_OVER_READ}"
            ));
        }
        if edm_writes > 0 {
            self.extra_misses
                .push(format!("drift report: {edm_writes} EDM writes"));
        }
    }

    /// 20 campaigns over the lookback, 10 % of link-men open each.
    fn write_back(&mut self, data: &Seeded) {
        let (l, c) = (self.latency, self.concurrency);
        let per_campaign = seed_campaigns(self.sb, &data.seeded, data.linkmen);
        let records = 20 * per_campaign;
        // task-list per day, open-detail and two failexport reads per
        // campaign, the exports, then one record each.
        let wb_reads = LOOKBACK_DAYS + 20 * 3 + LISTS;
        let wall = l * (wb_reads as u32) + l * (ceil(records, c) as u32);
        self.scenario("write-back", "writeback", wb_reads + records, wall);
    }

    async fn scenarios(&mut self, data: &Seeded, poisoned: &std::collections::HashSet<i64>) {
        let (sb, c, l) = (self.sb, self.concurrency, self.latency);
        let (pull, lists) = (self.pull(), LISTS);
        self.first_sync(data);
        print_list_read_bytes(sb, data.per_list[0]).await;
        self.no_change_rerun();
        self.drift_report(data).await;

        // 1 % churn: renames (edits), deletions (unsubscribes) and new
        // link-men (adds), a third each.
        let churned = churn(sb, &data.seeded, data.linkmen, data.customers);
        let touched = |l: [bool; 2]| l.iter().filter(|&&b| b).count() as i64;
        let min_writes = churned.each + touched(churned.unsub_lists) + touched(churned.add_lists);
        let (second_look, count_check) = (churned.each, 1);
        let wall = self.pull_wall(lists + min_writes + ceil(second_look, c) + count_check);
        self.scenario(
            "1 % churn rerun",
            "contacts",
            pull + lists + min_writes + second_look + count_check,
            wall,
        );

        let (list_reads, edits) = mass_rename(sb, data, &churned.removed, poisoned);
        let wall = self.pull_wall(lists + list_reads) + l * (ceil(edits, EDM_CONCURRENCY) as u32);
        self.scenario(
            "mass rename",
            "contacts",
            pull + lists + list_reads + edits,
            wall,
        );
        self.write_back(data);
    }
}

/// The daemon's config for the bench: the sandbox's, with the routes and
/// vars of a real deployment and limits that fit a long run.
fn write_bench_config(sb: &Sandbox, db: &str, c: i64) -> anyhow::Result<std::path::PathBuf> {
    let config = std::env::temp_dir().join(format!("ces-bench-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "{}\n[crm]\n[sync]\nlist_id = 1\n[[sync.routes]]\nfield = \"customer.type_id\"\nequals = \"2\"\nlist_id = 2\n[sync.vars]\nvar1 = \"customer.name\"\nvar2 = \"mobile\"\n[writeback]\nlookback_days = {LOOKBACK_DAYS}\n[log]\nformat = \"json\"\n",
            sb.config_toml(db)
                .replace("timeout_secs = 5", "timeout_secs = 60")
                .replacen("[edm]\n", "[edm]\nmax_attempts = 1\n", 1)
                .replacen("[crm]\n", &format!("[crm]\npage_size = {PAGE_SIZE}\nconcurrency = {c}\n"), 1)
        )
        .replacen("\n[crm]\n[sync]", "\n[sync]", 1),
    )?;
    Ok(config)
}

/// The drift report may take at most this many times the time of reading
/// the lists it compares.
const DRIFT_OVER_READ: f64 = 2.0;

/// Reads every synced list whole with the daemon's own EDM client, as the
/// drift report does, and nothing else: the time it took.
async fn read_lists_alone(config: &std::path::Path) -> anyhow::Result<Duration> {
    let text = std::fs::read_to_string(config)?;
    let settings = crm_edm_sync::config::Settings::from_toml(&text)?;
    let ctx = crm_edm_sync::jobs::Context::new(settings).await?;
    let started = Instant::now();
    let mut held = 0usize;
    for list in ctx.settings.synced_lists() {
        ctx.edm.addr_each(list, |_| held += 1).await?;
    }
    let took = started.elapsed();
    ctx.store.close().await;
    anyhow::ensure!(held > 0, "the lists hold nothing");
    Ok(took)
}

/// Every sandbox answer delayed by `latency` (none at zero).
fn slow_down(sb: &Sandbox, latency: Duration) {
    if latency.is_zero() {
        return;
    }
    sb.chaos(
        "*",
        Chaos {
            p_delay: 1.0,
            delay: latency,
            ..Default::default()
        },
        1,
    );
}

/// What a whole read of the larger list costs on the wire, plain and
/// gzipped (the daemon offers gzip; the sandbox compresses when asked).
async fn print_list_read_bytes(sb: &Sandbox, members: i64) {
    match list_read_bytes(sb, 1, members).await {
        Ok((pages, plain, gzip)) => println!(
            "    list 1 read whole ({members} members, {pages} pages of 1000): {plain} bytes plain, {gzip} bytes gzip ({:.1} %)",
            100.0 * gzip as f64 / plain.max(1) as f64
        ),
        Err(e) => println!("    list 1 read whole: cannot measure: {e:#}"),
    }
}

/// Mass rename: up to 10 000 members renamed at once (one edit each), sent
/// with `edm.concurrency` in flight. Their EDM ids are unknown (batch adds
/// return none), so each list is read once first (`known /
/// list_page_size + 1` pages). Returns those list pages and the edits.
fn mass_rename(
    sb: &Sandbox,
    data: &Seeded,
    removed: &std::collections::HashSet<i64>,
    poisoned: &std::collections::HashSet<i64>,
) -> (i64, i64) {
    let renamed: Vec<(i64, bool)> = data
        .seeded
        .iter()
        // A parked address renamed would be sent (and refused) again.
        .filter(|(id, _, _)| !removed.contains(id) && !poisoned.contains(id))
        .take(10_000)
        .map(|&(id, _, vip)| (id, vip))
        .collect();
    let mut renamed_per_list = [0i64; 2];
    for &(id, vip) in &renamed {
        sb.crm
            .set_linkman_field(id, "name", json!(format!("再改名{id}")));
        renamed_per_list[usize::from(vip)] += 1;
    }
    let list_reads: i64 = (0..2)
        .filter(|&k| renamed_per_list[k] > 0)
        .map(|k| data.per_list[k] / LIST_PAGE + 1)
        .sum();
    (list_reads, renamed.len() as i64)
}

/// The seeded CRM: customers, link-men, link-men per list, and each
/// link-man as `(id, customer, vip)`.
struct Seeded {
    customers: i64,
    linkmen: i64,
    per_list: [i64; 2],
    seeded: Vec<(i64, i64, bool)>,
}

/// Customers 1..=n/2 with 1–3 link-men each (2 on average), every third
/// customer a VIP routed to list 2; lists 1 and 2 created in EDM.
fn seed(sb: &Sandbox, n: i64) -> Seeded {
    sb.edm.create_list(1, "客户");
    sb.edm.create_list(2, "VIP");
    let customers = n / 2;
    let mut lm = 0i64;
    let mut per_list = [0i64; 2];
    let mut seeded: Vec<(i64, i64, bool)> = Vec::with_capacity(n as usize);
    for cust in 1..=customers {
        let vip = cust % 3 == 0;
        sb.crm.put_customer(
            cust,
            json!({"name": format!("客户公司{cust}"), "type_id": if vip { 2 } else { 1 }}),
        );
        let k = match cust % 3 {
            0 => 2,
            1 => 1,
            _ => 3,
        };
        for _ in 0..k {
            if lm >= n {
                break;
            }
            lm += 1;
            sb.crm.put_linkman(cust, lm, json!({"name": format!("联系人{lm}"), "email": format!("lm{lm}@customer{cust}.example.cn"), "mobile": format!("138{lm:08}")}));
            per_list[usize::from(vip)] += 1;
            seeded.push((lm, cust, vip));
        }
    }
    Seeded {
        customers,
        linkmen: lm,
        per_list,
        seeded,
    }
}

/// Poison records: addresses EDM refuses, spread over the first half (not
/// on the renamed link-men the churn scenario picks, which start at index
/// 0). Returns how many, and their link-man ids.
fn poison(
    sb: &Sandbox,
    seeded: &[(i64, i64, bool)],
    refuse: i64,
) -> (i64, std::collections::HashSet<i64>) {
    let mut refused = 0i64;
    let mut poisoned = std::collections::HashSet::new();
    for &(id, cust, _) in seeded.iter().skip(1).step_by(3).take(refuse as usize) {
        sb.edm.refuse_address(
            &format!("lm{id}@customer{cust}.example.cn"),
            "add_address_error",
            "address refused",
        );
        poisoned.insert(id);
        refused += 1;
    }
    (refused, poisoned)
}

/// A fresh state database of the kind `--db` names: its URL.
async fn bench_database(kind: &str) -> anyhow::Result<String> {
    Ok(match kind {
        "sqlite" => {
            let dir = std::env::temp_dir().join(format!("ces-bench-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            format!("sqlite://{}?mode=rwc", dir.join("state.db").display())
        }
        "postgres" => {
            use sea_orm::ConnectionTrait;
            let name = format!("ces_bench_{}", std::process::id());
            let admin =
                sea_orm::Database::connect("postgres://postgres@127.0.0.1:5432/postgres").await?;
            admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name}"))
                .await?;
            admin
                .execute_unprepared(&format!("CREATE DATABASE {name}"))
                .await?;
            // Loopback: no TLS. A TLS handshake is a per-connection cost
            // (and under sqlx 0.9.0 a Nagle-delayed one, ~90 ms here, see
            // state::nodelay) outside the sync's own work.
            format!("postgres://postgres@127.0.0.1:5432/{name}?sslmode=disable")
        }
        other => anyhow::bail!("--db must be sqlite or postgres, not {other}"),
    })
}

/// What the churn changed: how many of each change, which link-men were
/// removed, and which lists get unsubscribes and adds.
struct Churn {
    each: i64,
    removed: std::collections::HashSet<i64>,
    unsub_lists: [bool; 2],
    add_lists: [bool; 2],
}

/// 1 % churn in the CRM: renames, deletions and new link-men, a third
/// each.
fn churn(sb: &Sandbox, seeded: &[(i64, i64, bool)], linkmen: i64, customers: i64) -> Churn {
    let churn = (linkmen / 100).max(3);
    let each = churn / 3;
    let half = seeded.len() / 2;
    let mut removed = std::collections::HashSet::new();
    let mut unsub_lists = [false; 2];
    let mut add_lists = [false; 2];
    for &(id, _, _) in seeded[..half]
        .iter()
        .step_by((half / each as usize).max(1))
        .take(each as usize)
    {
        sb.crm
            .set_linkman_field(id, "name", json!(format!("改名{id}")));
    }
    for &(id, _, vip) in seeded[half..]
        .iter()
        .step_by((half / each as usize).max(1))
        .take(each as usize)
    {
        sb.crm.remove_linkman(id);
        removed.insert(id);
        unsub_lists[usize::from(vip)] = true;
    }
    for i in 0..each {
        let cust = 1 + (i * 7) % customers;
        sb.crm.put_linkman(
            cust,
            linkmen + 1 + i,
            json!({"name": "新人", "email": format!("new{i}@customer{cust}.example.cn")}),
        );
        add_lists[usize::from(cust % 3 == 0)] = true;
    }
    // Minimal writes: one edit per rename, one unsubscribe batch and one
    // add batch per list touched (each well under the batch size). Before
    // that, each deleted link-man is confirmed gone by id (`LinkMan/
    // GetLinkMan`, `crm.concurrency` at a time) and, as the run adds to
    // lists it has read before, one `maillist-list` compares their counts.
    Churn {
        each,
        removed,
        unsub_lists,
        add_lists,
    }
}

/// 20 campaigns over the lookback, 10 % of the link-men opening; returns
/// the opens per campaign.
fn seed_campaigns(sb: &Sandbox, seeded: &[(i64, i64, bool)], linkmen: i64) -> i64 {
    let today = crm_edm_sync::writeback::edm_today(chrono::Utc::now(), chrono_tz::Asia::Shanghai);
    let per_campaign = (linkmen / 10 / 20).max(1);
    for k in 0..20i64 {
        let date = (today - chrono::Duration::days(k % LOOKBACK_DAYS))
            .format("%Y-%m-%d")
            .to_string();
        let opens = (0..per_campaign)
            .map(|i| {
                let (id, cust, _) = seeded[((k * per_campaign + i) % linkmen) as usize];
                (
                    format!("lm{id}@customer{cust}.example.cn"),
                    1,
                    String::new(),
                    String::new(),
                )
            })
            .collect();
        sb.edm.put_campaign(SandboxCampaign {
            id: 1000 + k,
            name: format!("活动{k}"),
            list_id: 1,
            date,
            send_status: 3,
            track_status: 1,
            opens,
            ..Default::default()
        });
    }
    per_campaign
}

/// Prints whether every target was met; an error names how many were not.
fn verdict(misses: Vec<String>, wrapped: bool) -> anyhow::Result<()> {
    if wrapped {
        println!("\ntargets: not checked (the figures are the wrapper's)");
        Ok(())
    } else if misses.is_empty() {
        println!("\ntargets: all met");
        Ok(())
    } else {
        println!("\ntargets missed:");
        for miss in &misses {
            println!("- {miss}");
        }
        anyhow::bail!("{} target(s) missed", misses.len())
    }
}

/// Reads list `list_id` (`members` addresses) whole twice, as the daemon
/// does (`ml-addr-list`, 1000 a page), without and with
/// `Accept-Encoding: gzip`, and counts the body bytes on the wire:
/// `(pages, plain, gzip)`.
async fn list_read_bytes(
    sb: &Sandbox,
    list_id: i64,
    members: i64,
) -> anyhow::Result<(i64, u64, u64)> {
    let raw = crm_edm_sync::remote::client_builder().no_gzip().build()?;
    let pages = members / 1000 + 1;
    let md5 = crm_edm_sync::edm::password_md5(crm_edm_sync::sandbox::EDM_PASSWORD);
    let mut sizes = [0u64; 2];
    for (i, encoding) in ["identity", "gzip"].into_iter().enumerate() {
        for page in 1..=pages {
            let url = format!(
                "{}/mloperate.php?do=ml-addr-list&list_id={list_id}&page={page}&limit=1000&username={}&password={md5}",
                sb.edm_url,
                crm_edm_sync::sandbox::EDM_USER
            );
            let answer = raw
                .get(&url)
                .header("accept-encoding", encoding)
                .send()
                .await?;
            sizes[i] += answer.bytes().await?.len() as u64;
        }
    }
    Ok((pages, sizes[0], sizes[1]))
}

/// Removes the bench's config and state database.
async fn cleanup(args: &Args, config: &std::path::Path) -> anyhow::Result<()> {
    std::fs::remove_file(config).ok();
    if args.db == "postgres" {
        use sea_orm::ConnectionTrait;
        let name = format!("ces_bench_{}", std::process::id());
        let admin =
            sea_orm::Database::connect("postgres://postgres@127.0.0.1:5432/postgres").await?;
        admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
        admin
            .execute_unprepared(&format!(
                "DROP DATABASE IF EXISTS {name}_fresh WITH (FORCE)"
            ))
            .await?;
    } else {
        std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("ces-bench-{}", std::process::id())),
        )
        .ok();
    }
    Ok(())
}

/// Drops the PostgreSQL database a fleet run used.
async fn drop_bench_database(url: &str) {
    use sea_orm::ConnectionTrait;
    let Some(name) = url.rsplit('/').next().and_then(|n| n.split('?').next()) else {
        return;
    };
    if let Ok(admin) =
        sea_orm::Database::connect("postgres://postgres@127.0.0.1:5432/postgres").await
    {
        let _ = admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }
}

/// The median wall time of three no-change reruns.
fn rerun_wall(bin: &std::path::Path, config: &std::path::Path) -> anyhow::Result<Duration> {
    let mut walls = Vec::new();
    for _ in 0..3 {
        let m = run_child(&[], bin, config, "contacts");
        anyhow::ensure!(m.ok, "a no-change rerun failed");
        walls.push(m.wall);
    }
    walls.sort();
    Ok(walls[1])
}

/// Reruns timed in turns on the fresh copy and on the history.
const PAIRS: usize = 5;

/// Copies the state database `url` names (SQLite: `VACUUM INTO` a file
/// beside it; PostgreSQL: a database made from it as a template) and
/// writes a config for the copy beside `config`.
async fn snapshot(config: &std::path::Path, url: &str) -> anyhow::Result<std::path::PathBuf> {
    use sea_orm::ConnectionTrait;
    let copy = if let Some(path) = crm_edm_sync::state::sqlite_file(url) {
        let fresh = format!("{}.fresh", path.display());
        let db = sea_orm::Database::connect(url).await?;
        db.execute_unprepared(&format!("VACUUM INTO '{fresh}'"))
            .await?;
        db.close().await?;
        format!("sqlite://{fresh}?mode=rwc")
    } else {
        let name = format!("ces_bench_{}", std::process::id());
        let admin =
            sea_orm::Database::connect("postgres://postgres@127.0.0.1:5432/postgres").await?;
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}_fresh TEMPLATE {name}"))
            .await?;
        admin.close().await?;
        url.replace(&name, &format!("{name}_fresh"))
    };
    let text = std::fs::read_to_string(config)?;
    anyhow::ensure!(text.contains(url), "the bench config names its database");
    let fresh_config = config.with_extension("fresh.toml");
    std::fs::write(&fresh_config, text.replace(url, &copy))?;
    Ok(fresh_config)
}

/// The no-change rerun's median wall time on `fresh` and on `after`,
/// run in turns after one unmeasured run of each (the first run on the
/// history also prunes what aged past the window while the bench wrote).
fn paired_reruns(
    bin: &std::path::Path,
    fresh: &std::path::Path,
    after: &std::path::Path,
) -> anyhow::Result<(Duration, Duration)> {
    let mut walls = (Vec::new(), Vec::new());
    for round in 0..=PAIRS {
        let f = run_child(&[], bin, fresh, "contacts");
        let a = run_child(&[], bin, after, "contacts");
        anyhow::ensure!(f.ok && a.ok, "a no-change rerun failed");
        if round > 0 {
            walls.0.push(f.wall);
            walls.1.push(a.wall);
        }
    }
    walls.0.sort();
    walls.1.sort();
    Ok((walls.0[PAIRS / 2], walls.1[PAIRS / 2]))
}

/// The state database's size in bytes. SQLite: the file after its WAL is
/// checkpointed and truncated (the bench writes a month in one statement,
/// whose WAL says nothing of the daemon's, which writes a batch at a time).
async fn db_size(store: &crm_edm_sync::state::Store, url: &str) -> anyhow::Result<u64> {
    use sea_orm::ConnectionTrait;
    let db = store.connection();
    if let Some(path) = crm_edm_sync::state::sqlite_file(url) {
        db.execute_unprepared("PRAGMA wal_checkpoint(TRUNCATE)")
            .await?;
        let file = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let wal = std::fs::metadata(format!("{}-wal", path.display()))
            .map(|m| m.len())
            .unwrap_or(0);
        return Ok(file + wal);
    }
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT pg_database_size(current_database()) AS n",
        ))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no size"))?;
    Ok(row.try_get::<i64>("", "n")? as u64)
}

/// Three (or `years`) years of 15-minute runs at 1 % churn, written as
/// back-dated rows a 30-day month at a time — each month's operations
/// (a third each add, edit and unsubscribe, the unsubscribes matched by
/// their export line), runs and export lines — then pruned as the runs of
/// that month would have (`database.retention_days` 90).
/// What one month of history writes: the database kind, the operations a
/// run, and the rows a month.
struct Month {
    postgres: bool,
    churn: i64,
    ops: i64,
    runs: i64,
    lines: i64,
}

impl Month {
    /// The month `m`'s operations, runs and export lines, starting at
    /// `start` (ms), one statement each.
    fn inserts(&self, m: i64, start: i64) -> [String; 3] {
        let quarter_hour: i64 = 900_000;
        let churn = self.churn;
        // Addresses in index order (zero-padded), so that writing a month
        // in one statement appends to the address indexes instead of
        // scattering millions of inserts over them (the daemon writes a
        // run's 1 000).
        let pad = if self.postgres {
            "lpad(n::text, 9, '0')"
        } else {
            "printf('%09d', n)"
        };
        let ops = format!(
            "INSERT INTO operations (run_id, kind, list_id, email, edm_id, link_man_id, customer_id, fullname, vars, status, attempts, last_error, export_matched, created_at, updated_at) \
             SELECT 'hist-{m}-' || (n / {churn}), CASE n % 3 WHEN 0 THEN 'add' WHEN 1 THEN 'unsub' ELSE 'edit' END, 1, \
             'h{m:03}-' || {pad} || '@history.example.cn', NULL, n, n, 'H', '[\"\",\"\",\"\",\"\",\"\",\"\",\"\",\"\",\"\",\"\"]', 'done', 1, NULL, (n % 3 = 1), \
             {start} + (n / {churn}) * {quarter_hour}, {start} + (n / {churn}) * {quarter_hour} FROM ({}) AS s",
            self.seq(self.ops)
        );
        let runs = format!(
            "INSERT INTO runs (id, job, started_at, finished_at, status, dry_run, counts, error) \
             SELECT 'hist-{m}-' || n, 'contacts', {start} + n * {quarter_hour}, {start} + n * {quarter_hour} + 5000, 'succeeded', FALSE, '{{}}', NULL FROM ({}) AS s",
            self.seq(self.runs)
        );
        let month_start = chrono::DateTime::from_timestamp_millis(start).unwrap_or_default();
        let lines = format!(
            "INSERT INTO unsub_lines (list_id, email, time, seen_at) \
             SELECT 1, 'h{m:03}-' || {pad} || '@history.example.cn', '{}', {start} + (n / {}) * {quarter_hour} FROM ({}) AS s",
            month_start.format("%Y-%m-%d %H:%M:%S"),
            (churn / 3).max(1),
            self.seq(self.lines)
        );
        [ops, runs, lines]
    }

    /// The numbers 0..n as a query, on either database.
    fn seq(&self, n: i64) -> String {
        if self.postgres {
            format!("SELECT g AS n FROM generate_series(0, {}) AS g", n - 1)
        } else {
            format!(
                "WITH RECURSIVE seq(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM seq WHERE n < {}) SELECT n FROM seq",
                n - 1
            )
        }
    }
}

/// The rows of `table`.
async fn count_rows(db: &sea_orm::DatabaseConnection, table: &str) -> anyhow::Result<i64> {
    use sea_orm::ConnectionTrait;
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            format!("SELECT COUNT(*) AS n FROM {table}"),
        ))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no count"))?;
    Ok(row.try_get::<i64>("", "n")?)
}

async fn history(
    months: i64,
    bin: &std::path::Path,
    config: &std::path::Path,
    url: &str,
    linkmen: i64,
) -> anyhow::Result<()> {
    use sea_orm::ConnectionTrait;
    let first = run_child(&[], bin, config, "contacts");
    anyhow::ensure!(first.ok, "the first sync failed");
    // A copy of the fresh database, so that the reruns on it and on the
    // history can be timed in turns at the end, under the same load on the
    // machine (timing them twenty minutes apart measured the machine).
    let fresh_config = snapshot(config, url).await?;
    let fresh = rerun_wall(bin, config)?;
    let store =
        crm_edm_sync::state::Store::connect(&secrecy::SecretString::from(url.to_string())).await?;
    let db = store.connection();
    let postgres = url.starts_with("postgres");
    let churn = (linkmen / 100).max(3);
    let runs_per_month: i64 = 96 * 30;
    let ops_per_month = churn * runs_per_month;
    let lines_per_month = churn / 3 * runs_per_month;
    let day: i64 = 86_400_000;
    let now = chrono::Utc::now().timestamp_millis();
    let fresh_size = db_size(&store, url).await?;
    println!(
        "history: {months} months of 15-minute runs, {churn} operations a run (1 % churn), {ops_per_month} operations, {runs_per_month} runs and {lines_per_month} export lines a month; retention 90 days; fresh database {:.1} MB, no-change rerun {:.2} s\n",
        fresh_size as f64 / 1e6,
        fresh.as_secs_f64()
    );
    println!(
        "| month | operations kept | runs kept | export lines kept | pruned this month | state DB size |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut sizes = Vec::new();
    for m in 0..months {
        let start = now - (months - m) * 30 * day;
        let shape = Month {
            postgres,
            churn,
            ops: ops_per_month,
            runs: runs_per_month,
            lines: lines_per_month,
        };
        for sql in shape.inserts(m, start) {
            db.execute_unprepared(&sql).await?;
        }
        // The runs of that month pruned with retention_days = 90; at a
        // month's granularity, its last day's cutoff.
        let pruned = store.prune(start + 30 * day - 90 * day).await?;
        let size = db_size(&store, url).await?;
        sizes.push(size);
        println!(
            "| {} | {} | {} | {} | {} | {:.1} MB |",
            m + 1,
            count_rows(db, "operations").await?,
            count_rows(db, "runs").await?,
            count_rows(db, "unsub_lines").await?,
            pruned.total(),
            size as f64 / 1e6
        );
    }
    store.close().await;
    let (fresh, after) = paired_reruns(bin, &fresh_config, config)?;
    std::fs::remove_file(&fresh_config).ok();
    history_verdict(months, fresh, after, &sizes)
}

/// The history's targets: the rerun on the full history within 10 % of
/// the fresh one, and the database no longer growing once the retention
/// window is full.
fn history_verdict(
    months: i64,
    fresh: Duration,
    after: Duration,
    sizes: &[u64],
) -> anyhow::Result<()> {
    let ratio = after.as_secs_f64() / fresh.as_secs_f64();
    // Full once the window (3 months) and one month of pruning are in.
    let full = sizes.get(4).copied().unwrap_or(0);
    let last = sizes.last().copied().unwrap_or(0);
    let growth = last as f64 / full.max(1) as f64;
    println!(
        "\nno-change rerun (median of {PAIRS}, taken in turns): fresh {:.2} s, after {months} months {:.2} s: {ratio:.2} × (target ≤ 1.10)",
        fresh.as_secs_f64(),
        after.as_secs_f64()
    );
    println!(
        "state DB: {:.1} MB at month 5, {:.1} MB at month {months}: {growth:.2} × (target: stops growing, ≤ 1.05)",
        full as f64 / 1e6,
        last as f64 / 1e6
    );
    if ratio <= 1.10 && growth <= 1.05 {
        println!("\ntargets: all met");
        Ok(())
    } else {
        anyhow::bail!("history targets missed")
    }
}
