//! crm-edm-sync: keeps bestedm (EDM) mailing lists in step with the contact
//! persons of a 全程云 CRM.
//!
//! `main.rs` parses the command line, sets up logging and calls [`app::run`];
//! everything else is library code that tests drive directly.
//!
//! "Rule N" in a comment or a test name is a rule of `docs/sync-rules.md`;
//! the modules' layers are in `docs/architecture.md` (held by
//! `tests/it/architecture.rs`), the remote calls in `docs/remote-apis.md`.

pub mod app;
pub mod check;
pub mod cli;
pub mod config;
pub mod crm;
pub mod daemon;
pub mod demo;
pub mod domain;
pub mod edm;
pub mod explain;
pub mod instance;
pub mod jobs;
pub mod lock;
pub mod metrics;
pub mod once;
pub mod ops_endpoint;
pub mod redact;
pub mod reload;
pub mod remote;
pub mod sandbox;
pub mod schedule;
pub mod state;
pub mod status;
pub mod stored_enums;
pub mod sync;
pub mod telemetry;
pub mod template;
pub mod writeback;
