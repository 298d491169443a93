//! The contacts job: CRM link-men → EDM lists.
//!
//! `desired` and `plan` are pure; `contacts` runs the pipeline, `apply` sends the plan
//! (adds and unsubscribes in batches, bisected when EDM refuses one; parked operations held
//! back), `edits` sends its edits, and `lookup` finds addresses in a list. What both jobs share lives in
//! [`crate::jobs`].

pub mod apply;
pub mod behind;
pub mod contacts;
pub mod desired;
mod edits;
pub mod lookup;
pub mod plan;
pub mod report;
pub mod vanished;
