//! `--tenants N`: many tenants on one PostgreSQL database, served by one
//! or more daemons (the real binary, child processes), each tenant with a
//! sandbox CRM and EDM of its own in this process.
//!
//! It measures the time until every tenant converged (its EDM list holds
//! all its link-men), the requests against the per-tenant lower bound (one
//! tenant's first sync alone, times N), the peak RSS of each instance and
//! per tenant; with `--kill-one`, SIGKILL of one instance once a third of
//! the tenants converged: the time until the tenants converged anyway,
//! addresses added twice, and EDM writes the killed instance made after
//! its death (both must be 0). With `--big N`, tenant 0 has N link-men:
//! the small tenants' first runs must not wait more than one schedule
//! period past their offsets for it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crm_edm_sync::sandbox::{Chaos, Sandbox};
use serde_json::json;

/// What the fleet scenario is told.
pub(crate) struct FleetArgs {
    pub tenants: usize,
    pub linkmen: i64,
    pub latency: Duration,
    pub instances: usize,
    pub kill_one: bool,
    pub big: i64,
    /// `sync.schedule`, e.g. `0 */5 * * * *`.
    pub schedule: String,
    pub max_parallel_jobs: usize,
    pub bin: std::path::PathBuf,
}

/// One tenant's sandbox and size.
struct TenantBox {
    name: String,
    sb: Sandbox,
    linkmen: i64,
}

/// Requests per tenant of a first sync alone: one CRM page of customers
/// per 100 (the page that says how many there are ends the paging), one
/// link-man read per customer; EDM: the account's lists, the export, the
/// list read, the adds in batches of 500.
fn lower_bound(linkmen: i64) -> i64 {
    let pages = (linkmen + 99) / 100;
    let crm = pages + linkmen;
    let edm = 1 + 1 + 1 + (linkmen + 499) / 500;
    crm + edm
}

/// Seeds `n` link-men, one customer each, `{name}-{c}@example.com`.
fn seed(sb: &Sandbox, name: &str, n: i64) {
    sb.edm.create_list(1, "客户");
    for c in 1..=n {
        sb.crm
            .put_customer(c, json!({"name": format!("{name} 公司{c}")}));
        sb.crm.put_linkman(
            c,
            c,
            json!({"name": format!("联系人{c}"), "email": format!("{name}-{c}@example.com")}),
        );
    }
}

/// A child daemon and its peak RSS, sampled.
struct Instance {
    id: String,
    child: std::process::Child,
    hwm_kb: i64,
}

impl Instance {
    fn sample(&mut self) {
        let pid = self.child.id();
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(kb) = text
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<i64>().ok())
        {
            self.hwm_kb = self.hwm_kb.max(kb);
        }
    }
}

/// Runs the scenario and prints its figures; the misses of its targets.
pub(crate) async fn run(args: &FleetArgs) -> anyhow::Result<Vec<String>> {
    let boxes = start_tenants(args).await?;
    let db = super::bench_database("postgres").await?;
    let dir = std::env::temp_dir().join(format!("ces-fleet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("tenants"))?;
    let config = write_configs(&dir, &db, &boxes, args)?;
    println!(
        "\nfleet: {} tenants × {} link-men{}, latency {} ms, {} instance(s), schedule {:?}, max_parallel_jobs {}, PostgreSQL\n",
        args.tenants,
        args.linkmen,
        if args.big > 0 {
            format!(" (tenant 0: {})", args.big)
        } else {
            String::new()
        },
        args.latency.as_millis(),
        args.instances,
        args.schedule,
        args.max_parallel_jobs
    );
    let started = Instant::now();
    let mut instances: Vec<Instance> = (0..args.instances)
        .map(|i| spawn(&args.bin, &config, &format!("bench-{i}")))
        .collect::<anyhow::Result<_>>()?;
    let outcome = watch(&boxes, &mut instances, started, args).await;
    for i in &mut instances {
        let _ = i.child.kill();
        let _ = i.child.wait();
    }
    let misses = report(&boxes, &instances, &outcome, args);
    let _ = std::fs::remove_dir_all(&dir);
    super::drop_bench_database(&db).await;
    Ok(misses)
}

async fn start_tenants(args: &FleetArgs) -> anyhow::Result<Vec<TenantBox>> {
    let mut boxes = Vec::with_capacity(args.tenants);
    for t in 0..args.tenants {
        let name = format!("t{t:04}");
        let sb = Sandbox::start().await?;
        let linkmen = if t == 0 && args.big > 0 {
            args.big
        } else {
            args.linkmen
        };
        seed(&sb, &name, linkmen);
        if !args.latency.is_zero() {
            sb.chaos(
                "*",
                Chaos {
                    p_delay: 1.0,
                    delay: args.latency,
                    ..Default::default()
                },
                1,
            );
        }
        boxes.push(TenantBox { name, sb, linkmen });
    }
    Ok(boxes)
}

fn write_configs(
    dir: &std::path::Path,
    db: &str,
    boxes: &[TenantBox],
    args: &FleetArgs,
) -> anyhow::Result<std::path::PathBuf> {
    for b in boxes {
        let own = b.sb.config_toml("unused");
        let own = own.split("[database]").next().unwrap_or_default();
        std::fs::write(
            dir.join("tenants").join(format!("{}.toml", b.name)),
            format!("{own}\n[sync]\nlist_id = 1\n"),
        )?;
    }
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[tenants]\ndir = {:?}\n[database]\nurl = {db:?}\n[crm]\nconcurrency = 4\n[sync]\nschedule = {:?}\n[writeback]\nschedule = \"0 0 0 1 1 *\"\n[reconcile]\nschedule = \"\"\n[log]\nlevel = \"warn\"\n[http]\nlisten = \"127.0.0.1:0\"\n[daemon]\nlock_poll_secs = 2\nmax_parallel_jobs = {}\n",
            dir.join("tenants").display().to_string(),
            args.schedule,
            args.max_parallel_jobs
        ),
    )?;
    Ok(config)
}

/// Where an instance's log goes: `CES_BENCH_LOG_DIR/<id>.log` when that
/// is set (to see why a fleet misbehaves), nowhere otherwise.
fn log_of(id: &str) -> anyhow::Result<std::process::Stdio> {
    Ok(match std::env::var_os("CES_BENCH_LOG_DIR") {
        Some(dir) => {
            std::fs::File::create(std::path::Path::new(&dir).join(format!("{id}.log")))?.into()
        }
        None => std::process::Stdio::null(),
    })
}

fn spawn(bin: &std::path::Path, config: &std::path::Path, id: &str) -> anyhow::Result<Instance> {
    let child = std::process::Command::new(bin)
        .arg("--config")
        .arg(config)
        .env("CRM_EDM_SYNC__DAEMON__INSTANCE_ID", id)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(log_of(id)?)
        .spawn()?;
    Ok(Instance {
        id: id.to_string(),
        child,
        hwm_kb: 0,
    })
}

/// What the watch saw.
#[derive(Default)]
struct Outcome {
    /// When each tenant converged, from the start.
    converged: BTreeMap<String, Duration>,
    /// Each tenant's requests until it converged (the gauges'
    /// `service-info` reads left out: they are not sync work).
    requests: BTreeMap<String, usize>,
    /// The killed instance and when.
    killed: Option<(String, Duration)>,
    /// Each tenant's EDM writes by the killed instance at its death.
    writes_at_kill: BTreeMap<String, usize>,
    all_in: Option<Duration>,
}

/// Polls every tenant's list until all converged (or 30 minutes pass),
/// killing one instance once a third converged with `--kill-one`.
async fn watch(
    boxes: &[TenantBox],
    instances: &mut [Instance],
    started: Instant,
    args: &FleetArgs,
) -> Outcome {
    let mut out = Outcome::default();
    while started.elapsed() < Duration::from_secs(1800) {
        for i in instances.iter_mut() {
            i.sample();
        }
        for b in boxes {
            if !out.converged.contains_key(&b.name)
                && b.sb.edm.addresses(1).len() as i64 >= b.linkmen
            {
                out.converged.insert(b.name.clone(), started.elapsed());
                let sync_work =
                    b.sb.requests()
                        .iter()
                        .filter(|r| r.operation != "service-info")
                        .count();
                out.requests.insert(b.name.clone(), sync_work);
            }
        }
        if args.kill_one
            && out.killed.is_none()
            && out.converged.len() * 3 >= boxes.len()
            && let Some(victim) = instances.get_mut(1)
        {
            let _ = victim.child.kill();
            let _ = victim.child.wait();
            out.killed = Some((victim.id.clone(), started.elapsed()));
            for b in boxes {
                out.writes_at_kill
                    .insert(b.name.clone(), writes_by(&b.sb, &victim.id));
            }
        }
        if out.converged.len() == boxes.len() {
            out.all_in = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    out
}

/// EDM writes (adds, unsubscribes, edits) sent by the instance `id`.
fn writes_by(sb: &Sandbox, id: &str) -> usize {
    sb.requests()
        .iter()
        .filter(|r| r.user_agent.contains(&format!("({id})")))
        .filter(|r| {
            matches!(
                r.operation.as_str(),
                "ml-addr-add" | "ml-unsub" | "ml-addr-edit"
            )
        })
        .count()
}

/// Addresses added more than once, over every tenant.
fn duplicate_adds(boxes: &[TenantBox]) -> usize {
    let mut twice = 0;
    for b in boxes {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for r in
            b.sb.requests()
                .into_iter()
                .filter(|r| r.operation == "ml-addr-add" && r.applied)
        {
            for line in r
                .params
                .get("ml_addr")
                .map(String::as_str)
                .unwrap_or("")
                .lines()
            {
                *seen
                    .entry(line.split(';').next().unwrap_or("").to_string())
                    .or_insert(0) += 1;
            }
        }
        twice += seen.values().filter(|n| **n > 1).count();
    }
    twice
}

/// Prints the figures; returns the targets missed.
fn report(
    boxes: &[TenantBox],
    instances: &[Instance],
    out: &Outcome,
    args: &FleetArgs,
) -> Vec<String> {
    let mut misses = Vec::new();
    let requests: usize = out.requests.values().sum();
    let bound: i64 = boxes
        .iter()
        .filter(|b| out.requests.contains_key(&b.name))
        .map(|b| lower_bound(b.linkmen))
        .sum();
    let ratio = requests as f64 / bound.max(1) as f64;
    match out.all_in {
        Some(t) => println!("every tenant converged after {:.1} s", t.as_secs_f64()),
        None => misses.push(format!(
            "only {} of {} tenants converged within 30 minutes",
            out.converged.len(),
            boxes.len()
        )),
    }
    println!(
        "requests until each tenant converged {requests}, the sum of their lower bounds {bound}: {ratio:.3} ×"
    );
    if ratio > 1.02 {
        misses.push(format!(
            "requests {ratio:.3} × the lower bound (target ≤ 1.02)"
        ));
    }
    for i in instances {
        println!(
            "instance {}: peak RSS {:.1} MB, {:.2} MB per tenant served",
            i.id,
            i.hwm_kb as f64 / 1024.0,
            i.hwm_kb as f64 / 1024.0 / (boxes.len() as f64 / instances.len() as f64)
        );
    }
    if let Some((victim, at)) = &out.killed {
        let last = out.converged.values().max().copied().unwrap_or_default();
        println!(
            "killed {victim} at {:.1} s with {} tenants converged; the rest converged {:.1} s later",
            at.as_secs_f64(),
            out.converged.values().filter(|t| *t <= at).count(),
            (last.saturating_sub(*at)).as_secs_f64()
        );
        let after: usize = boxes
            .iter()
            .map(|b| writes_by(&b.sb, victim).saturating_sub(out.writes_at_kill[&b.name]))
            .sum();
        println!("EDM writes by the killed instance after its death: {after}");
        if after > 0 {
            misses.push(format!("{after} writes after fencing"));
        }
    }
    let twice = duplicate_adds(boxes);
    println!("addresses added twice: {twice}");
    if twice > 0 {
        misses.push(format!("{twice} duplicate adds"));
    }
    if args.big > 0 {
        misses.extend(small_ones_waited(boxes, out, args));
    }
    misses
}

/// With `--big`: how late the small tenants converged; the last must be in
/// by two schedule periods (one to reach its offset, one of delay).
fn small_ones_waited(boxes: &[TenantBox], out: &Outcome, args: &FleetArgs) -> Vec<String> {
    let period = period_of(&args.schedule);
    let small_last = boxes
        .iter()
        .skip(1)
        .filter_map(|b| out.converged.get(&b.name))
        .max()
        .copied()
        .unwrap_or_default();
    println!(
        "with a tenant of {} link-men: the last small tenant converged after {:.1} s (schedule period {:.0} s)",
        args.big,
        small_last.as_secs_f64(),
        period.as_secs_f64()
    );
    if small_last > period * 2 {
        vec![format!(
            "the small tenants waited past one period for the big one ({:.1} s > 2 × {:.0} s)",
            small_last.as_secs_f64(),
            period.as_secs_f64()
        )]
    } else {
        Vec::new()
    }
}

/// The schedule's period: the gap between its next two ticks.
fn period_of(schedule: &str) -> Duration {
    let cron = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .build()
        .parse(schedule);
    let Ok(cron) = cron else {
        return Duration::from_secs(60);
    };
    let now = chrono::Utc::now();
    let first = cron.find_next_occurrence(&now, false).ok();
    let second = first.and_then(|f| cron.find_next_occurrence(&f, false).ok());
    match (first, second) {
        (Some(a), Some(b)) => (b - a).to_std().unwrap_or(Duration::from_secs(60)),
        _ => Duration::from_secs(60),
    }
}
