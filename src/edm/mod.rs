//! The bestedm (EDM) user API: client and XML wire model.

mod client;
pub mod xml;

pub use client::{EdmAccount, EdmAddress, EdmClient, ExportLine, MailList, password_md5};
