//! Folding what EDM showed into the daemon's view of its members: export
//! lines (rule 6), the fate of operations whose answer was lost
//! (rule 9), and whole-list reads (rule 5). Pure functions over
//! plain data; `contacts` does the reading and the writing.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use crate::domain::{Email, ListId, MemberKey, Members};
use crate::domain::{MemberState, Origin};
use crate::edm::{EdmAddress, ExportLine};
use crate::state::{NewSuppression, PendingOperation, SeenLine};
use crate::stored_enums::{OpKind, OpStatus, SuppressionReason, SuppressionSource};

/// What one export read means.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExportFindings {
    pub new_lines: Vec<SeenLine>,
    /// The daemon's own `ml-unsub`s that these lines confirm.
    pub matched_ops: Vec<i64>,
    /// User unsubscribes: suppressions from now on.
    pub suppressions: Vec<NewSuppression>,
    /// Members that left the list.
    pub departed: Vec<MemberState>,
}

/// Classifies the lines of one list's `unsubscribe-export`: a line not seen
/// before is the daemon's own when it matches an `ml-unsub` the daemon sent
/// to that list since it last read the export (`own_unsubs`, oldest
/// first); every other new line is a user unsubscribe.
pub fn classify_export(
    list_id: ListId,
    lines: &[ExportLine],
    seen: &HashSet<(String, String)>,
    seen_through: Option<&str>,
    own_unsubs: &[(i64, String)],
    members: &Members,
) -> ExportFindings {
    let mut out = ExportFindings::default();
    let mut candidates: HashMap<&str, VecDeque<i64>> = HashMap::new();
    for (id, email) in own_unsubs {
        candidates.entry(email.as_str()).or_default().push_back(*id);
    }
    let mut this_read: HashSet<(&str, &str)> = HashSet::new();
    for line in lines {
        let pair = (line.address.clone(), line.time.clone());
        // Lines up to the watermark were seen and pruned (retention).
        let pruned = seen_through.is_some_and(|w| line.time.as_str() <= w);
        if pruned || seen.contains(&pair) || !this_read.insert((&line.address, &line.time)) {
            continue;
        }
        out.new_lines.push(SeenLine {
            list_id,
            email: line.address.clone(),
            time: line.time.clone(),
        });
        match candidates
            .get_mut(line.address.as_str())
            .and_then(VecDeque::pop_front)
        {
            Some(op_id) => out.matched_ops.push(op_id),
            None => out.suppressions.push(NewSuppression {
                list_id: Some(list_id),
                email: line.address.clone(),
                reason: SuppressionReason::UserUnsubscribe,
                source: SuppressionSource::Export {
                    time: line.time.clone(),
                },
            }),
        }
        if let Ok(email) = Email::parse(&line.address) {
            let key = MemberKey::new(list_id, email);
            if let Some(m) = members.get(&key).filter(|m| m.present) {
                out.departed.push(MemberState {
                    present: false,
                    ..m.clone()
                });
            }
        }
    }
    out
}

/// How an operation from an earlier run turned out.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    pub op_id: i64,
    pub status: OpStatus,
    /// The member row it leaves, when it took effect.
    pub member: Option<MemberState>,
}

/// Decides pending operations of one list from what the list holds now
/// (`found`: the addresses of those operations that EDM holds). An add
/// that EDM holds took effect; an unsubscribe whose address EDM no longer
/// holds took effect; anything else is superseded and the next plan
/// decides again. Edits are idempotent and always superseded.
pub fn resolve_pending(
    ops: &[PendingOperation],
    found: &HashMap<Email, EdmAddress>,
    members: &Members,
) -> Vec<Resolution> {
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        let Ok(email) = Email::parse(&op.email) else {
            out.push(Resolution {
                op_id: op.id,
                status: OpStatus::Superseded,
                member: None,
            });
            continue;
        };
        let key = MemberKey::new(op.list_id, email.clone());
        let held = found.get(&email);
        let resolution = match (op.kind, held) {
            (OpKind::Add, Some(addr)) => Resolution {
                op_id: op.id,
                status: OpStatus::Done,
                member: Some(MemberState {
                    key,
                    origin: Origin::Owned,
                    present: true,
                    unsubscribed: false,
                    link_man_id: op.link_man_id,
                    customer_id: op.customer_id,
                    edm_id: Some(addr.id),
                    fields: addr.fields.clone(),
                }),
            },
            (OpKind::Unsub, None) => Resolution {
                op_id: op.id,
                status: OpStatus::Done,
                member: members.get(&key).map(|m| MemberState {
                    present: false,
                    unsubscribed: true,
                    ..m.clone()
                }),
            },
            // An add EDM does not hold, an unsubscribe whose address is
            // still there: they did not take effect. Edits are idempotent:
            // the next plan sends them again if they are still wanted.
            (OpKind::Add, None) | (OpKind::Unsub, Some(_)) | (OpKind::Edit, _) => Resolution {
                op_id: op.id,
                status: OpStatus::Superseded,
                member: None,
            },
        };
        out.push(resolution);
    }
    out
}

/// What a whole-list read changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListReadFindings {
    /// Member rows to write (new foreign rows, ids learnt, drift).
    pub members: Vec<MemberState>,
    /// Addresses EDM holds more than once.
    pub duplicates: usize,
    /// Members the state DB thought present that EDM does not hold.
    pub missing: usize,
    /// Members whose EDM fields differed from the state DB's.
    pub drifted: usize,
}

/// The member row for an address EDM holds (`addr`), from what the state
/// DB knew of it (`known`): present, with EDM's id and fields. An unknown
/// address is foreign; one the daemon had removed is back because someone
/// else put it there, so it is foreign too — not the daemon's to remove
/// again.
pub fn held_by_edm(key: MemberKey, addr: &EdmAddress, known: Option<&MemberState>) -> MemberState {
    match known {
        None => MemberState {
            key,
            origin: Origin::Foreign,
            present: true,
            unsubscribed: false,
            link_man_id: None,
            customer_id: None,
            edm_id: Some(addr.id),
            fields: addr.fields.clone(),
        },
        Some(m) => MemberState {
            origin: if !m.present && m.origin == Origin::Owned {
                Origin::Foreign
            } else {
                m.origin
            },
            present: true,
            edm_id: Some(addr.id),
            fields: addr.fields.clone(),
            ..m.clone()
        },
    }
}

/// Folds a whole read of `list_id` into the members: every address EDM
/// holds is recorded (desired ones are adopted by the planner; the others
/// stay foreign and are left alone), ids and EDM-side field changes are
/// learnt, and members EDM no longer holds are marked absent so the
/// planner adds them again.
pub fn reconcile_list(
    list_id: ListId,
    addresses: &[EdmAddress],
    members: &Members,
) -> ListReadFindings {
    let mut out = ListReadFindings::default();
    let mut held: BTreeMap<Email, &EdmAddress> = BTreeMap::new();
    for addr in addresses {
        let Some(email) = &addr.email else { continue };
        match held.get(email) {
            Some(existing) => {
                out.duplicates += 1;
                if addr.id < existing.id {
                    held.insert(email.clone(), addr);
                }
            }
            None => {
                held.insert(email.clone(), addr);
            }
        }
    }
    for (email, addr) in &held {
        let key = MemberKey::new(list_id, email.clone());
        let known = members.get(&key);
        if let Some(m) = known
            && m.present
            && !m.fields.same_values(&addr.fields)
        {
            out.drifted += 1;
        }
        let row = held_by_edm(key, addr, known);
        if known == Some(&row) {
            continue;
        }
        out.members.push(row);
    }
    for m in members.values() {
        if m.key.list_id == list_id && m.present && !held.contains_key(&m.key.email) {
            out.missing += 1;
            out.members.push(MemberState {
                present: false,
                edm_id: None,
                ..m.clone()
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MemberFields;
    use crate::domain::{AddressId, CustomerId, LinkManId, ListId};

    fn email(s: &str) -> Email {
        Email::parse(s).unwrap()
    }

    fn member(list: ListId, addr: &str, origin: Origin, present: bool) -> (MemberKey, MemberState) {
        let key = MemberKey::new(list, email(addr));
        (
            key.clone(),
            MemberState {
                key,
                origin,
                present,
                unsubscribed: false,
                link_man_id: Some(LinkManId(1)),
                customer_id: Some(CustomerId(2)),
                edm_id: None,
                fields: MemberFields::named("N"),
            },
        )
    }

    fn line(time: &str, addr: &str) -> ExportLine {
        ExportLine {
            time: time.into(),
            address: addr.into(),
        }
    }

    fn addr(id: i64, list: ListId, a: &str, name: &str) -> EdmAddress {
        EdmAddress {
            id: AddressId(id),
            list_id: list,
            raw_address: a.into(),
            email: Email::parse(a).ok(),
            fields: MemberFields::named(name),
        }
    }

    #[test]
    fn own_unsubscribe_line_is_matched_and_not_a_suppression() {
        let members: Members = [member(ListId(1), "a@x.cn", Origin::Owned, false)]
            .into_iter()
            .collect();
        let f = classify_export(
            ListId(1),
            &[line("2026-01-01 10:00:00", "a@x.cn")],
            &HashSet::new(),
            None,
            &[(7, "a@x.cn".into())],
            &members,
        );
        assert_eq!(f.matched_ops, vec![7]);
        assert!(f.suppressions.is_empty());
        assert_eq!(f.new_lines.len(), 1);
    }

    #[test]
    fn unmatched_new_line_is_a_user_unsubscribe_and_the_member_departs() {
        let members: Members = [member(ListId(1), "a@x.cn", Origin::Owned, true)]
            .into_iter()
            .collect();
        let f = classify_export(
            ListId(1),
            &[line("t1", "a@x.cn")],
            &HashSet::new(),
            None,
            &[],
            &members,
        );
        assert_eq!(f.suppressions.len(), 1);
        assert_eq!(f.suppressions[0].reason, SuppressionReason::UserUnsubscribe);
        assert_eq!(f.departed.len(), 1);
        assert!(!f.departed[0].present);
    }

    #[test]
    fn seen_lines_are_ignored_and_each_own_unsub_matches_once() {
        let seen: HashSet<(String, String)> = [("a@x.cn".to_string(), "t1".to_string())].into();
        let f = classify_export(
            ListId(1),
            &[
                line("t1", "a@x.cn"),
                line("t2", "a@x.cn"),
                line("t3", "a@x.cn"),
                line("t3", "a@x.cn"),
            ],
            &seen,
            None,
            &[(9, "a@x.cn".into())],
            &Members::default(),
        );
        assert_eq!(f.new_lines.len(), 2);
        assert_eq!(f.matched_ops, vec![9]);
        assert_eq!(f.suppressions.len(), 1);
        assert_eq!(
            f.suppressions[0].source,
            SuppressionSource::Export { time: "t3".into() }
        );
    }

    fn op(id: i64, kind: OpKind, list: ListId, e: &str) -> PendingOperation {
        PendingOperation {
            reason: None,
            id,
            kind,
            list_id: list,
            email: e.into(),
            link_man_id: Some(LinkManId(5)),
            customer_id: Some(CustomerId(6)),
        }
    }

    #[test]
    fn lines_up_to_the_pruned_watermark_count_as_seen_and_later_ones_are_new() {
        // Arrange: lines through 2026-03-01 were pruned; no row remains.
        let members: Members = [member(ListId(1), "a@x.cn", Origin::Owned, true)]
            .into_iter()
            .collect();

        // Act
        let f = classify_export(
            ListId(1),
            &[
                line("2026-02-28 09:00:00", "a@x.cn"),
                line("2026-03-01 23:59:59", "b@x.cn"),
                line("2026-03-02 00:00:01", "c@x.cn"),
            ],
            &HashSet::new(),
            Some("2026-03-01 23:59:59"),
            &[],
            &members,
        );

        // Assert: only the line after the watermark is a (new) user
        // unsubscribe; a, long gone, is not taken out of the list again.
        let new: Vec<&str> = f.new_lines.iter().map(|l| l.email.as_str()).collect();
        assert_eq!(new, ["c@x.cn"]);
        assert_eq!(f.suppressions.len(), 1);
        assert!(f.departed.is_empty());
    }

    #[test]
    fn lost_add_found_in_the_list_is_done_and_owned() {
        let found: HashMap<_, _> = [(email("a@x.cn"), addr(44, ListId(1), "a@x.cn", "A"))].into();
        let r = resolve_pending(
            &[
                op(1, OpKind::Add, ListId(1), "a@x.cn"),
                op(2, OpKind::Add, ListId(1), "b@x.cn"),
            ],
            &found,
            &Members::default(),
        );
        assert_eq!(r[0].status, OpStatus::Done);
        let m = r[0].member.as_ref().unwrap();
        assert_eq!(
            (m.origin, m.present, m.edm_id, m.link_man_id),
            (Origin::Owned, true, Some(AddressId(44)), Some(LinkManId(5)))
        );
        assert_eq!(r[1].status, OpStatus::Superseded);
        assert!(r[1].member.is_none());
    }

    #[test]
    fn lost_unsub_is_done_only_when_the_address_is_gone() {
        let members: Members = [
            member(ListId(1), "a@x.cn", Origin::Owned, true),
            member(ListId(1), "b@x.cn", Origin::Owned, true),
        ]
        .into_iter()
        .collect();
        let found: HashMap<_, _> = [(email("b@x.cn"), addr(2, ListId(1), "b@x.cn", "N"))].into();
        let r = resolve_pending(
            &[
                op(1, OpKind::Unsub, ListId(1), "a@x.cn"),
                op(2, OpKind::Unsub, ListId(1), "b@x.cn"),
            ],
            &found,
            &members,
        );
        assert_eq!(r[0].status, OpStatus::Done);
        assert!(!r[0].member.as_ref().unwrap().present);
        assert_eq!(r[1].status, OpStatus::Superseded);
    }

    #[test]
    fn pending_edit_is_superseded() {
        let r = resolve_pending(
            &[op(1, OpKind::Edit, ListId(1), "a@x.cn")],
            &HashMap::new(),
            &Members::default(),
        );
        assert_eq!(r[0].status, OpStatus::Superseded);
    }

    #[test]
    fn list_read_records_foreign_addresses_learns_ids_and_drift() {
        let members: Members = [
            member(ListId(1), "mine@x.cn", Origin::Owned, true),
            member(ListId(1), "gone@x.cn", Origin::Owned, true),
            member(ListId(1), "back@x.cn", Origin::Owned, false),
        ]
        .into_iter()
        .collect();
        let read = [
            addr(10, ListId(1), "mine@x.cn", "Changed in EDM"),
            addr(11, ListId(1), "other@x.cn", "O"),
            addr(12, ListId(1), "back@x.cn", "N"),
            addr(9, ListId(1), "other@x.cn", "O"),
            addr(13, ListId(1), "not an address", ""),
        ];
        let f = reconcile_list(ListId(1), &read, &members);
        let by_email: HashMap<String, &MemberState> = f
            .members
            .iter()
            .map(|m| (m.key.email.to_string(), m))
            .collect();
        assert_eq!(by_email["mine@x.cn"].edm_id, Some(AddressId(10)));
        assert_eq!(by_email["mine@x.cn"].fields.fullname(), "Changed in EDM");
        assert_eq!(by_email["other@x.cn"].origin, Origin::Foreign);
        assert_eq!(by_email["other@x.cn"].edm_id, Some(AddressId(9)));
        assert_eq!(by_email["back@x.cn"].origin, Origin::Foreign);
        assert!(by_email["back@x.cn"].present);
        assert!(!by_email["gone@x.cn"].present);
        assert_eq!((f.duplicates, f.missing, f.drifted), (1, 1, 1));
    }
}
