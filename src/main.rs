//! The binary: the allocator, then the library's `app::main` (the command
//! line, settings, logging, the command).

use std::process::ExitCode;

/// mimalloc instead of glibc malloc: a sync allocates and frees many small
/// strings; glibc kept about three times the live data resident (see
/// BENCHMARKS.md).
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    crm_edm_sync::app::main()
}
