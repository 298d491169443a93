//! Every integration test in one binary (one link instead of one per
//! file): the real binary against the sandbox servers, the deployment
//! files, the architecture's layers. Each module is one subject; its tests
//! are named `MODULE::behaviour` (`cargo test --test it -- daemon::`).

mod common;

mod architecture;
mod audit;
mod cli;
mod compression;
mod contacts;
mod crash;
mod crm_changes;
mod daemon;
mod deploy;
mod edm_auth;
mod explain;
mod faults;
mod integrity;
mod plan_properties;
mod poison;
mod read_only;
mod reader_properties;
mod real_shapes;
mod reconcile;
mod reseller;
mod restore;
mod stdout;
mod tenants;
mod upgrade;
mod writeback;
