//! The ids of the things the daemon handles: lists, link-men, customers,
//! campaigns, EDM addresses and runs. Each is its own type, so that one can
//! never be passed where another is expected. They stand below everything
//! (layer 0) so that every module, the stored enums included, can use them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Declares an id newtype over `i64`: serialised, displayed and stored as
/// the bare number, but a list id can never be passed where a link-man id
/// is expected. The state DB keeps the plain integer columns; `state`
/// converts at its boundary.
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
            sea_orm::DeriveValueType,
        )]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        /// The bare number, as logs and `?`-formatted fields always showed it.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

id_type!(
    /// An EDM mailing-list id ("联系人分类 ID"). Always ≥ 1 for lists the
    /// daemon syncs; `0` is EDM's "unfiled" pseudo-list and is never synced.
    ListId
);
id_type!(
    /// A CRM link-man (contact person) id.
    LinkManId
);
id_type!(
    /// A CRM customer id.
    CustomerId
);

id_type!(
    /// An EDM campaign (mass-mailing task) id.
    CampaignId
);
id_type!(
    /// An EDM address id: one member of one list (`ml-addr-list`'s `id`).
    AddressId
);

/// A run's id: a UUID (v4) as text, the key of its row in the state
/// database and a field of every log line the run writes.
#[derive(
    Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sea_orm::DeriveValueType,
)]
#[serde(transparent)]
pub struct RunId(String);

impl RunId {
    /// A fresh id for a run about to start.
    pub fn fresh() -> RunId {
        RunId(uuid::Uuid::new_v4().to_string())
    }

    /// An id as stored or given on the command line.
    pub fn from_stored(text: impl Into<String>) -> RunId {
        RunId(text.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}
