//! The bestedm (EDM) user API: client and XML wire model.

mod client;
pub mod xml;

pub use client::{
    Campaign, ClickEvent, EdmAccount, EdmAddress, EdmClient, ExportLine, HardBounce, MailList,
    OpenEvent, SendStatus, ServiceInfo, Tracking, basic_credentials, password_md5,
};
