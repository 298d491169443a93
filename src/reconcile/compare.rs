//! One list compared with the state database, address by address as EDM's
//! pages arrive (pure: no I/O).
//!
//! Every address EDM holds is counted in `members` (a row EDM holds twice
//! is counted twice and judged once). An address is judged by the first
//! rule that fits:
//!
//! 1. `reactivated`: a recipient unsubscribed it from this list, it
//!    bounced hard in any list, it was forgotten (`forget`), or the daemon
//!    unsubscribed it and has not added it since — and EDM holds it active
//!    again. The consent risk;
//!    the daemon never touches such a row.
//! 2. in step: the daemon added or adopted it, records it as present, and
//!    EDM holds the same fullname and vars (white space at either end set
//!    aside, as the contacts job compares them).
//! 3. `changed`: the same, with a fullname or a var that differs from what
//!    the daemon last sent.
//! 4. `foreign`: anything else — the daemon never added or adopted it, or
//!    it recorded it as gone (deleted in EDM) and someone put it back. The
//!    repair (`--once --job contacts --full`) records those as foreign too.
//!
//! After the last page, every member the daemon added or adopted and
//! records as present, that EDM did not show, is `missing`.
//!
//! Addresses with an operation still pending (an interrupted run's) are
//! left out: the next contacts run settles them first.

use std::collections::HashSet;

use serde::Serialize;

use crate::domain::{Email, ListId, MemberKey, MemberState, Members, Origin, Suppressions};
use crate::edm::EdmAddress;

/// How a member drifted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    Missing,
    Changed,
    Reactivated,
    Foreign,
}

impl DriftKind {
    pub const ALL: [DriftKind; 4] = [
        DriftKind::Missing,
        DriftKind::Changed,
        DriftKind::Reactivated,
        DriftKind::Foreign,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::Missing => "missing",
            DriftKind::Changed => "changed",
            DriftKind::Reactivated => "reactivated",
            DriftKind::Foreign => "foreign",
        }
    }
}

impl std::fmt::Display for DriftKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The counts of one list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ListDrift {
    pub list_id: ListId,
    /// The addresses EDM holds.
    pub members: usize,
    pub missing: usize,
    pub changed: usize,
    pub reactivated: usize,
    pub foreign: usize,
}

impl ListDrift {
    pub fn of(&self, kind: DriftKind) -> usize {
        match kind {
            DriftKind::Missing => self.missing,
            DriftKind::Changed => self.changed,
            DriftKind::Reactivated => self.reactivated,
            DriftKind::Foreign => self.foreign,
        }
    }

    fn count(&mut self, kind: DriftKind) {
        match kind {
            DriftKind::Missing => self.missing += 1,
            DriftKind::Changed => self.changed += 1,
            DriftKind::Reactivated => self.reactivated += 1,
            DriftKind::Foreign => self.foreign += 1,
        }
    }
}

/// One drifted (or foreign) member: a line of `--report FILE`. The
/// address is in full (as EDM holds it, for an address that is not a
/// valid mailbox).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drifted {
    pub list_id: ListId,
    pub email: String,
    pub kind: DriftKind,
}

/// One list being compared: feed it EDM's addresses with [`see`], then
/// [`finish`] it.
///
/// [`see`]: ListComparison::see
/// [`finish`]: ListComparison::finish
pub struct ListComparison<'a> {
    list_id: ListId,
    members: &'a Members,
    suppressions: &'a Suppressions,
    /// Addresses of this list with an operation pending.
    in_flight: &'a HashSet<Email>,
    seen: HashSet<Email>,
    counts: ListDrift,
    drifted: Vec<Drifted>,
}

impl<'a> ListComparison<'a> {
    pub fn new(
        list_id: ListId,
        members: &'a Members,
        suppressions: &'a Suppressions,
        in_flight: &'a HashSet<Email>,
    ) -> Self {
        ListComparison {
            list_id,
            members,
            suppressions,
            in_flight,
            seen: HashSet::new(),
            counts: ListDrift {
                list_id,
                ..ListDrift::default()
            },
            drifted: Vec::new(),
        }
    }

    /// One address EDM holds in the list.
    pub fn see(&mut self, addr: &EdmAddress) {
        self.counts.members += 1;
        let Some(email) = &addr.email else {
            // Not a valid mailbox: the daemon never sends one.
            self.note(addr.raw_address.clone(), DriftKind::Foreign);
            return;
        };
        if !self.seen.insert(email.clone()) || self.in_flight.contains(email) {
            return;
        }
        let key = MemberKey::new(self.list_id, email.clone());
        let suppressed = self.suppressions.user.contains(&key)
            || self.suppressions.bounced.contains(&key.email)
            || self.suppressions.forgotten.contains(key.email.as_str());
        if let Some(kind) = judge_held(self.members.get(&key), suppressed, addr) {
            self.note(email.as_str().to_string(), kind);
        }
    }

    /// The list's counts and its drifted members, `missing` ones last.
    pub fn finish(mut self) -> (ListDrift, Vec<Drifted>) {
        let list_id = self.list_id;
        let missing: Vec<String> = self
            .members
            .values()
            .filter(|m| m.key.list_id == list_id && kept_by_the_daemon(m))
            .filter(|m| !self.seen.contains(&m.key.email) && !self.in_flight.contains(&m.key.email))
            .map(|m| m.key.email.as_str().to_string())
            .collect();
        for email in missing {
            self.note(email, DriftKind::Missing);
        }
        (self.counts, self.drifted)
    }

    fn note(&mut self, email: String, kind: DriftKind) {
        self.counts.count(kind);
        self.drifted.push(Drifted {
            list_id: self.list_id,
            email,
            kind,
        });
    }
}

/// The daemon added or adopted it and believes EDM holds it.
fn kept_by_the_daemon(m: &MemberState) -> bool {
    m.present && !m.unsubscribed && m.origin != Origin::Foreign
}

/// The kind of an address EDM holds, given what the state DB records of
/// it; `None`: in step.
fn judge_held(
    known: Option<&MemberState>,
    suppressed: bool,
    addr: &EdmAddress,
) -> Option<DriftKind> {
    if suppressed || known.is_some_and(|m| m.unsubscribed) {
        return Some(DriftKind::Reactivated);
    }
    match known {
        Some(m) if kept_by_the_daemon(m) => {
            (!m.fields.same_values(&addr.fields)).then_some(DriftKind::Changed)
        }
        _ => Some(DriftKind::Foreign),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AddressId, CustomerId, LinkManId, MemberFields};

    const LIST: ListId = ListId(1);

    fn email(s: &str) -> Email {
        Email::parse(s).unwrap()
    }

    fn member(addr: &str, origin: Origin, present: bool, unsubscribed: bool) -> MemberState {
        MemberState {
            key: MemberKey::new(LIST, email(addr)),
            origin,
            present,
            unsubscribed,
            link_man_id: Some(LinkManId(7)),
            customer_id: Some(CustomerId(3)),
            edm_id: None,
            fields: MemberFields::named("Name"),
        }
    }

    fn held(id: i64, addr: &str, name: &str) -> EdmAddress {
        EdmAddress {
            id: AddressId(id),
            list_id: LIST,
            raw_address: addr.to_string(),
            email: Email::parse(addr).ok(),
            fields: MemberFields::named(name),
        }
    }

    fn compare(
        members: Vec<MemberState>,
        suppressions: &Suppressions,
        in_flight: &HashSet<Email>,
        edm: &[EdmAddress],
    ) -> (ListDrift, Vec<(String, DriftKind)>) {
        let members = Members::from_rows(members);
        let mut c = ListComparison::new(LIST, &members, suppressions, in_flight);
        for a in edm {
            c.see(a);
        }
        let (counts, rows) = c.finish();
        (
            counts,
            rows.into_iter().map(|d| (d.email, d.kind)).collect(),
        )
    }

    #[test]
    fn each_address_gets_the_first_kind_that_fits() {
        // Arrange: one member of each situation.
        let members = vec![
            member("same@x.cn", Origin::Owned, true, false),
            member("renamed@x.cn", Origin::Adopted, true, false),
            member("gone@x.cn", Origin::Owned, true, false),
            member("unsubbed@x.cn", Origin::Owned, false, true),
            member("back-after-delete@x.cn", Origin::Owned, false, false),
            member("theirs@x.cn", Origin::Foreign, true, false),
            member("adopted-gone@x.cn", Origin::Adopted, true, false),
        ];
        let mut suppressions = Suppressions::default();
        suppressions
            .user
            .insert(MemberKey::new(LIST, email("optout@x.cn")));
        suppressions.bounced.insert(email("bounced@x.cn"));
        let edm = [
            held(1, "same@x.cn", " Name "),
            held(2, "renamed@x.cn", "Other"),
            held(3, "unsubbed@x.cn", "Name"),
            held(4, "back-after-delete@x.cn", "Name"),
            held(5, "theirs@x.cn", "Them"),
            held(6, "stranger@x.cn", "S"),
            held(7, "optout@x.cn", "O"),
            held(8, "bounced@x.cn", "B"),
            held(9, "not an address", ""),
        ];

        // Act
        let (counts, rows) = compare(members, &suppressions, &HashSet::new(), &edm);

        // Assert
        let kinds: Vec<(&str, DriftKind)> = rows.iter().map(|(e, k)| (e.as_str(), *k)).collect();
        assert_eq!(
            kinds,
            vec![
                ("renamed@x.cn", DriftKind::Changed),
                ("unsubbed@x.cn", DriftKind::Reactivated),
                ("back-after-delete@x.cn", DriftKind::Foreign),
                ("theirs@x.cn", DriftKind::Foreign),
                ("stranger@x.cn", DriftKind::Foreign),
                ("optout@x.cn", DriftKind::Reactivated),
                ("bounced@x.cn", DriftKind::Reactivated),
                ("not an address", DriftKind::Foreign),
                ("adopted-gone@x.cn", DriftKind::Missing),
                ("gone@x.cn", DriftKind::Missing),
            ]
        );
        assert_eq!(
            counts,
            ListDrift {
                list_id: LIST,
                members: 9,
                missing: 2,
                changed: 1,
                reactivated: 3,
                foreign: 4,
            }
        );
    }

    #[test]
    fn a_row_edm_holds_twice_is_counted_twice_and_judged_once() {
        let edm = [held(1, "dup@x.cn", "D"), held(2, "DUP@x.cn", "D")];

        let (counts, rows) = compare(vec![], &Suppressions::default(), &HashSet::new(), &edm);

        assert_eq!(counts.members, 2);
        assert_eq!(rows, vec![("dup@x.cn".to_string(), DriftKind::Foreign)]);
    }

    #[test]
    fn addresses_with_an_operation_pending_are_left_to_the_next_contacts_run() {
        // Arrange: a pending unsubscribe took effect (EDM no longer holds
        // it), a pending add did too (EDM holds it, no member row yet).
        let members = vec![member("leaving@x.cn", Origin::Owned, true, false)];
        let in_flight: HashSet<Email> = [email("leaving@x.cn"), email("coming@x.cn")].into();
        let edm = [held(1, "coming@x.cn", "C")];

        // Act
        let (counts, rows) = compare(members, &Suppressions::default(), &in_flight, &edm);

        // Assert
        assert_eq!(counts.members, 1);
        assert!(rows.is_empty(), "{rows:?}");
    }

    #[test]
    fn members_of_other_lists_are_neither_seen_nor_missing() {
        let mut other = member("elsewhere@x.cn", Origin::Owned, true, false);
        other.key.list_id = ListId(2);

        let (counts, rows) = compare(vec![other], &Suppressions::default(), &HashSet::new(), &[]);

        assert_eq!(
            counts,
            ListDrift {
                list_id: LIST,
                ..ListDrift::default()
            }
        );
        assert!(rows.is_empty());
    }
}
