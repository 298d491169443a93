//! The binary: parse the command line, load settings, set up logging, and
//! hand over to the library.

use std::process::ExitCode;

/// mimalloc instead of glibc malloc: a sync allocates and frees many small
/// strings; glibc kept about three times the live data resident (see
/// BENCHMARKS.md).
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use crm_edm_sync::app::{self, EXIT_CONFIG};
use crm_edm_sync::cli::{Cli, Command};
use crm_edm_sync::config::{LogFormat, Settings};
use crm_edm_sync::telemetry;

fn main() -> ExitCode {
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
            match crm_edm_sync::demo::run().await {
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
    runtime.block_on(app::run(cli, settings))
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
