//! crm-edm-sync: keeps bestedm (EDM) mailing lists in step with the contact
//! persons of a 全程云 CRM.
//!
//! `main.rs` calls [`app::main`], which parses the command line, sets up
//! logging and runs the command; everything else is library code that
//! tests drive directly. Modules the binary, the bench and the tests do
//! not reach are `pub(crate)`, so that the compiler finds what nothing
//! uses.
//!
//! "Rule N" in a comment or a test name is a rule of `docs/sync-rules.md`;
//! the modules' layers are in `docs/architecture.md` (held by
//! `tests/it/architecture.rs`), the remote calls in `docs/remote-apis.md`.

#![warn(unreachable_pub)]

pub mod app;
pub mod audit;
pub(crate) mod check;
pub(crate) mod cli;
pub mod config;
pub mod crm;
pub(crate) mod daemon;
pub(crate) mod demo;
pub mod domain;
pub mod edm;
pub mod explain;
pub mod forget;
pub(crate) mod ids;
pub(crate) mod instance;
pub mod jobs;
pub mod lock;
pub(crate) mod metrics;
pub mod once;
pub(crate) mod ops_endpoint;
pub mod purge;
pub mod reconcile;
pub(crate) mod redact;
pub(crate) mod reload;
pub mod remote;
pub mod sandbox;
pub(crate) mod schedule;
pub mod scope;
pub mod state;
pub mod status;
pub mod stored_enums;
pub mod sync;
pub(crate) mod telemetry;
pub(crate) mod template;
pub mod topup;
pub mod writeback;
