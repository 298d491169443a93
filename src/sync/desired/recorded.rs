//! The recorded members a pull may want exactly as recorded, by link-man,
//! and which of them it does.

use std::ops::Range;

use crate::domain::{LinkManId, Members, Origin};

/// Recorded members EDM holds that have an owner (the only ones a pull
/// can want as recorded), sorted by link-man, with a bit for each that
/// the pull wants as recorded.
///
/// Built once, before the pull, in two plain `Vec`s (12 bytes a member)
/// rather than kept in the pull's hash map of link-men (16 bytes an entry
/// plus the table's slack, and twice that while it grows): a no-change
/// rerun of a million link-men then holds 12 MB for its link-men, not
/// 36–53 MB. A link-man's entries are found once per link-man of the
/// pull ([`RecordedLinkMen::of`]) and handed to the other methods.
#[derive(Debug, Default)]
pub(super) struct RecordedLinkMen {
    ids: Vec<LinkManId>,
    /// The member's position in [`Members`], beside its link-man.
    at: Vec<u32>,
    wanted: Vec<u64>,
}

impl RecordedLinkMen {
    pub(super) fn new(recorded: &Members) -> Self {
        let mut pairs: Vec<(LinkManId, u32)> = recorded
            .recorded()
            .filter(|(_, m)| m.present && m.origin != Origin::Foreign)
            .filter_map(|(at, m)| Some((m.link_man_id?, at)))
            .collect();
        pairs.sort_unstable();
        let wanted = vec![0; pairs.len().div_ceil(64)];
        let (ids, at) = pairs.into_iter().unzip();
        RecordedLinkMen { ids, at, wanted }
    }

    /// The entries of link-man `id`.
    pub(super) fn of(&self, id: LinkManId) -> Range<usize> {
        let start = self.ids.partition_point(|x| *x < id);
        let end = start + self.ids[start..].partition_point(|x| *x == id);
        start..end
    }

    /// The position of the member of `entry`.
    pub(super) fn position(&self, entry: usize) -> Option<u32> {
        self.at.get(entry).copied()
    }

    fn is_wanted(&self, entry: usize) -> bool {
        self.wanted
            .get(entry / 64)
            .is_some_and(|w| w & (1 << (entry % 64)) != 0)
    }

    /// The position of the member one link-man (its `entries`) is wanted
    /// as, if any.
    pub(super) fn wanted_in(&self, mut entries: Range<usize>) -> Option<u32> {
        entries
            .find(|&e| self.is_wanted(e))
            .and_then(|e| self.position(e))
    }

    /// The link-man of `entries` is now wanted as the member of `entry`,
    /// and as no other.
    pub(super) fn want(&mut self, entries: Range<usize>, entry: usize) {
        self.forget(entries);
        if let Some(w) = self.wanted.get_mut(entry / 64) {
            *w |= 1 << (entry % 64);
        }
    }

    /// The link-man of `entries` is wanted as no recorded member.
    pub(super) fn forget(&mut self, entries: Range<usize>) {
        for e in entries {
            if let Some(w) = self.wanted.get_mut(e / 64) {
                *w &= !(1 << (e % 64));
            }
        }
    }

    /// Every entry the pull does not want as recorded: its link-man and
    /// the member's position.
    pub(super) fn unwanted(&self) -> impl Iterator<Item = (LinkManId, u32)> + '_ {
        (0..self.at.len())
            .filter(|&e| !self.is_wanted(e))
            .filter_map(|e| Some((*self.ids.get(e)?, self.position(e)?)))
    }

    /// The positions of every member wanted as recorded.
    pub(super) fn positions(&self) -> Vec<u32> {
        (0..self.at.len())
            .filter(|&e| self.is_wanted(e))
            .filter_map(|e| self.position(e))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Email, ListId, MemberFields, MemberKey, MemberState};

    fn record(email: &str, lm: i64, present: bool) -> MemberState {
        MemberState {
            key: MemberKey::new(ListId(1), Email::parse(email).unwrap()),
            origin: Origin::Owned,
            present,
            unsubscribed: false,
            link_man_id: Some(LinkManId(lm)),
            customer_id: None,
            edm_id: None,
            fields: MemberFields::named("n"),
        }
    }

    fn position(members: &Members, email: &str) -> u32 {
        let key = MemberKey::new(ListId(1), Email::parse(email).unwrap());
        members.position(&key).unwrap().0
    }

    #[test]
    fn a_linkman_wanted_as_another_of_its_records_is_no_longer_wanted_as_the_first() {
        // Arrange: link-man 7 has two records EDM holds (an unsubscribe
        // that failed left the old address), link-man 8 one EDM no longer
        // holds.
        let members = Members::from_rows(vec![
            record("old@x.cn", 7, true),
            record("new@x.cn", 7, true),
            record("gone@x.cn", 8, false),
        ]);
        let (old, new) = (
            position(&members, "old@x.cn"),
            position(&members, "new@x.cn"),
        );
        let mut index = RecordedLinkMen::new(&members);
        let seven = index.of(LinkManId(7));
        let entry_of = |at: u32| seven.clone().find(|&e| index.position(e) == Some(at));
        let (first, second) = (entry_of(old).unwrap(), entry_of(new).unwrap());

        // Act: 7 is first wanted as its old address, then as its new one.
        index.want(seven.clone(), first);
        index.want(seven.clone(), second);

        // Assert
        assert_eq!(index.wanted_in(seven.clone()), Some(new));
        assert_eq!(index.positions(), vec![new]);
        assert!(index.of(LinkManId(8)).is_empty(), "EDM no longer holds 8's");
        index.forget(seven.clone());
        assert_eq!(index.wanted_in(seven), None);
        assert!(index.positions().is_empty());
    }
}
