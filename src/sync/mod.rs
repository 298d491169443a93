//! The contacts job: CRM link-men → EDM lists.
//!
//! `desired` and `plan` are pure; `contacts` runs the pipeline, `apply` sends the plan and
//! `lookup` finds addresses in a list. What both jobs share lives in
//! [`crate::jobs`].

pub mod apply;
pub mod contacts;
pub mod desired;
pub mod lookup;
pub mod plan;
pub mod report;
