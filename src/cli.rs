//! The command line (the README, "Command line").

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Keeps bestedm (EDM) mailing lists in step with the contact persons of a
/// 全程云 CRM, and writes campaign activity back to the CRM.
///
/// Without a command and without --once it runs as a daemon: migrate, then
/// schedule both jobs.
#[derive(Debug, Clone, Parser, PartialEq)]
#[command(name = "crm-edm-sync", version, about)]
pub struct Cli {
    /// Config file (default /etc/crm-edm-sync/config.toml, else
    /// config/default.toml).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Only this tenant (a file NAME.toml of tenants.dir; `default`
    /// without it): with --once, status, check, explain, reconcile, audit
    /// and forget.
    #[arg(long, global = true, value_name = "NAME")]
    pub tenant: Option<String>,

    /// Run contacts then writeback once, and exit (0 on success). Next to
    /// an active daemon, the daemon runs it and this prints its outcome.
    #[arg(long)]
    pub once: bool,

    /// With --once: only this job.
    #[arg(long, value_enum, requires = "once")]
    pub job: Option<Job>,

    /// With --once: print the plan (counts and a sample), change nothing.
    #[arg(long, requires = "once")]
    pub dry_run: bool,

    /// With --dry-run: also write every planned operation to FILE as JSON
    /// lines (full addresses; created readable by its owner only).
    #[arg(long, requires = "dry_run", value_name = "FILE")]
    pub plan: Option<PathBuf>,

    /// With --once: apply even past the unsubscribe safety ratio.
    #[arg(long, requires = "once")]
    pub force: bool,

    /// With --once: re-read the EDM lists and repair any drift.
    #[arg(long, requires = "once")]
    pub full: bool,

    /// With --once: send parked operations and records again (those EDM
    /// or the CRM refused in `*.max_attempts` runs).
    #[arg(long, requires = "once")]
    pub retry_parked: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// Parses the command line; a combination clap cannot express is a
    /// usage error too (exit 2), before any database is opened.
    pub fn parse_checked() -> Cli {
        use clap::{CommandFactory, Parser};
        let cli = Cli::parse();
        if let Some(problem) = cli.misuse() {
            Cli::command()
                .error(clap::error::ErrorKind::ArgumentConflict, problem)
                .exit();
        }
        cli
    }

    /// What the command reaches: `status`, `health` and `explain` without
    /// `--live` read the state database (or ask the daemon) and need no API
    /// credentials; everything else calls the APIs.
    pub fn access(&self) -> crate::config::Access {
        use crate::config::Access;
        match &self.command {
            Some(
                Command::Status { .. }
                | Command::Health
                | Command::Audit { .. }
                | Command::Tenant { .. },
            ) => Access::StateOnly,
            Some(Command::Explain { live: false, .. }) => Access::StateOnly,
            _ => Access::Remote,
        }
    }

    /// Flags that make no sense together, in words: `--once` and its
    /// flags next to a command (`status`, `check`, …) would be silently
    /// ignored; only `--config` goes with both.
    pub fn misuse(&self) -> Option<String> {
        if self.plan.is_some() && self.job == Some(Job::Writeback) {
            return Some("--plan writes the contacts job's plan; --job writeback has none".into());
        }
        if let Some(name) = &self.tenant {
            if let Err(why) = name.parse::<crate::config::Tenant>() {
                return Some(format!("--tenant: {why}"));
            }
            let takes_it = match &self.command {
                None => self.once,
                Some(c) => !matches!(c, Command::Health | Command::Demo | Command::Tenant { .. }),
            };
            if !takes_it {
                return Some(match &self.command {
                    None => "--tenant needs --once (the daemon serves every tenant)".into(),
                    Some(c) => format!("--tenant cannot be used with the command `{}`", c.name()),
                });
            }
        }
        let flags = [
            (self.once, "--once"),
            (self.job.is_some(), "--job"),
            (self.dry_run, "--dry-run"),
            (self.plan.is_some(), "--plan"),
            (self.force, "--force"),
            (self.full, "--full"),
            (self.retry_parked, "--retry-parked"),
        ];
        let given: Vec<&str> = flags
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, f)| *f)
            .collect();
        match (&self.command, given.is_empty()) {
            (Some(command), false) => Some(format!(
                "{} cannot be used with the command `{}`",
                given.join(", "),
                command.name()
            )),
            _ => None,
        }
    }
}

/// A job (`--job`): the one the state database records runs of.
pub(crate) use crate::stored_enums::Job;

#[derive(Debug, Clone, Subcommand, PartialEq)]
pub enum Command {
    /// Last runs, pending and failed operations, suppressions.
    Status {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Why an address is (not) in each list: the state database's member
    /// rows, suppressions, operations, refusals and contact history.
    Explain {
        /// The address (printed in full: you typed it).
        #[arg(required_unless_present = "linkman")]
        email: Option<String>,
        /// Explain the addresses of this link-man's members instead.
        #[arg(long, value_name = "ID")]
        linkman: Option<i64>,
        /// Also ask the CRM and EDM, and print where they disagree with the
        /// state database (changes nothing).
        #[arg(long)]
        live: bool,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Compare every synced list with the state database and report the
    /// drift: missing, changed, reactivated and foreign members. Writes
    /// nothing to EDM; exit 0 when the report is made.
    Reconcile {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
        /// Also write every drifted or foreign member to FILE as JSON
        /// lines (full addresses; created readable by its owner only).
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
    },
    /// An address's consent trail, oldest first (a masked form from the
    /// logs is accepted), or with --since every entry of a range of days.
    Audit {
        /// The address.
        #[arg(required_unless_present = "since", conflicts_with = "since")]
        email: Option<String>,
        /// With EMAIL: print JSON (an array) for scripts.
        #[arg(long, conflicts_with = "since")]
        json: bool,
        /// Every entry from this day on (YYYY-MM-DD, UTC, inclusive).
        #[arg(long, value_name = "DATE")]
        since: Option<String>,
        /// With --since: up to this day (inclusive).
        #[arg(long, value_name = "DATE", requires = "since")]
        until: Option<String>,
        /// With --since: `jsonl` (the default) or `csv`.
        #[arg(long, value_enum, requires = "since")]
        format: Option<AuditFormat>,
    },
    /// Unsubscribe an address where the daemon added it, then keep it only
    /// as a keyed hash: it is never added again.
    Forget {
        /// The address.
        email: String,
        /// Say what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also unsubscribe it where the daemon adopted it.
        #[arg(long)]
        include_adopted: bool,
    },
    /// Validate the config, reach both APIs and the database.
    Check,
    /// Tenants' state: `tenant purge NAME` deletes a removed tenant's.
    Tenant {
        #[command(subcommand)]
        action: TenantAction,
    },
    /// Ask the running daemon's /healthz (on http.listen): exit 0 healthy,
    /// 1 not. Writes nothing; for container health checks.
    Health,
    /// Start the built-in sandbox CRM and EDM on loopback, sync into a
    /// temporary SQLite database, and print what happened.
    Demo,
}

impl Command {
    /// The command's name on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Status { .. } => "status",
            Command::Explain { .. } => "explain",
            Command::Reconcile { .. } => "reconcile",
            Command::Audit { .. } => "audit",
            Command::Forget { .. } => "forget",
            Command::Tenant { .. } => "tenant purge",
            Command::Check => "check",
            Command::Health => "health",
            Command::Demo => "demo",
        }
    }
}

/// How `audit --since` writes the entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AuditFormat {
    /// One JSON object a line.
    #[default]
    Jsonl,
    /// A header row, then a row an entry.
    Csv,
}

/// Exit code of a failed or refused run.
/// What `tenant` does.
#[derive(Debug, Clone, Subcommand, PartialEq)]
pub enum TenantAction {
    /// Delete every row the state database holds for NAME (its schema on
    /// PostgreSQL, its file on SQLite); refused while NAME has a tenant
    /// file or an instance holds it.
    Purge { name: String },
}

pub const EXIT_FAILED: u8 = 1;
/// Exit code of bad configuration.
pub const EXIT_CONFIG: u8 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_with_flags_parses() {
        let cli = Cli::try_parse_from([
            "crm-edm-sync",
            "--config",
            "c.toml",
            "--once",
            "--job",
            "contacts",
            "--dry-run",
            "--force",
            "--full",
            "--retry-parked",
            "--plan",
            "plan.jsonl",
        ])
        .unwrap();
        assert_eq!(cli.plan, Some(PathBuf::from("plan.jsonl")));
        assert!(cli.once && cli.dry_run && cli.force && cli.full && cli.retry_parked);
        assert_eq!(cli.job, Some(Job::Contacts));
        assert_eq!(cli.config, Some(PathBuf::from("c.toml")));
        assert_eq!(cli.command, None);
    }

    #[test]
    fn subcommands_parse_with_global_config() {
        let cli = Cli::try_parse_from(["crm-edm-sync", "status", "--config", "x.toml"]).unwrap();
        assert_eq!(cli.command, Some(Command::Status { json: false }));
        assert_eq!(cli.config, Some(PathBuf::from("x.toml")));
        let cli = Cli::try_parse_from(["crm-edm-sync", "status", "--json"]).unwrap();
        assert_eq!(cli.command, Some(Command::Status { json: true }));
        assert_eq!(
            Cli::try_parse_from(["crm-edm-sync", "demo"])
                .unwrap()
                .command,
            Some(Command::Demo)
        );
    }

    #[test]
    fn explain_takes_an_address_or_a_linkman() {
        let cli = Cli::try_parse_from(["crm-edm-sync", "explain", "a@x.cn", "--live"]).unwrap();
        assert_eq!(
            cli.command,
            Some(Command::Explain {
                email: Some("a@x.cn".into()),
                linkman: None,
                live: true,
                json: false
            })
        );
        let cli =
            Cli::try_parse_from(["crm-edm-sync", "explain", "--linkman", "7", "--json"]).unwrap();
        assert_eq!(
            cli.command,
            Some(Command::Explain {
                email: None,
                linkman: Some(7),
                live: false,
                json: true
            })
        );
        assert!(Cli::try_parse_from(["crm-edm-sync", "explain"]).is_err());
    }

    #[test]
    fn run_flags_need_once() {
        assert!(Cli::try_parse_from(["crm-edm-sync", "--dry-run"]).is_err());
        assert!(Cli::try_parse_from(["crm-edm-sync", "--once", "--plan", "p.jsonl"]).is_err());
        assert!(Cli::try_parse_from(["crm-edm-sync", "--job", "writeback"]).is_err());
        assert!(Cli::try_parse_from(["crm-edm-sync", "--once", "--job", "other"]).is_err());
    }
}
