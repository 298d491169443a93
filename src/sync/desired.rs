//! CRM snapshot → desired EDM members (rules 1–4 of docs/sync-rules.md). Pure: no
//! I/O, no clock; what deserves a log line comes back in the result.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

mod recorded;
use recorded::RecordedLinkMen;

use crate::config::{Route, Settings, VarMapping};
#[cfg(test)]
use crate::crm::CrmSnapshot;
use crate::crm::{CrmMap, LinkMan};
use crate::domain::{
    CustomerId, Email, EmailError, LinkManId, ListId, MemberFields, MemberKey, MemberState,
    Members, Origin, VAR_COUNT, WantedAsIs, json_text, mask_address,
};
use crate::stored_enums::UnsubReason;

/// What the mapping needs from the settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MappingRules {
    pub default_list: ListId,
    pub routes: Vec<Route>,
    pub vars: VarMapping,
    pub linkman_name: String,
    pub linkman_email: String,
}

impl MappingRules {
    pub fn from_settings(settings: &Settings) -> Self {
        MappingRules {
            default_list: settings.sync.list_id,
            routes: settings.sync.routes.clone(),
            vars: settings.sync.vars.clone(),
            linkman_name: settings.crm.fields.linkman_name.clone(),
            linkman_email: settings.crm.fields.linkman_email.clone(),
        }
    }
}

/// A member the CRM says EDM should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredMember {
    pub key: MemberKey,
    pub link_man_id: LinkManId,
    pub customer_id: CustomerId,
    pub fields: MemberFields,
}

/// A link-man whose email is not a valid mailbox (logged without the full
/// address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidEmail {
    pub link_man_id: LinkManId,
    pub customer_id: CustomerId,
    /// The address as the CRM gave it, trimmed: kept in the state
    /// database so that `explain` can answer its masked form; never logged.
    pub address: String,
    pub masked: String,
    pub reason: EmailError,
}

/// Link-men sharing one member key; the lowest id owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collision {
    pub key: MemberKey,
    pub owner: LinkManId,
    pub others: Vec<LinkManId>,
}

/// The desired members, one per key, sorted by key: a plain `Vec` (56
/// bytes a member before its texts), not a map, because it is built once,
/// read in order by the planner and looked up by binary search. At a
/// million link-men a map's slack and per-entry overhead cost hundreds of
/// megabytes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DesiredMembers(Vec<DesiredMember>);

impl DesiredMembers {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, key: &MemberKey) -> Option<&DesiredMember> {
        self.0
            .binary_search_by(|m| m.key.cmp(key))
            .ok()
            .and_then(|at| self.0.get(at))
    }

    pub fn contains_key(&self, key: &MemberKey) -> bool {
        self.get(key).is_some()
    }

    /// In key order.
    pub fn iter(&self) -> std::slice::Iter<'_, DesiredMember> {
        self.0.iter()
    }
}

/// Sorts by key; of members sharing a key the lowest link-man id stays.
impl FromIterator<DesiredMember> for DesiredMembers {
    fn from_iter<I: IntoIterator<Item = DesiredMember>>(iter: I) -> Self {
        let mut all: Vec<DesiredMember> = iter.into_iter().collect();
        all.sort_unstable_by(|a, b| (&a.key, a.link_man_id).cmp(&(&b.key, b.link_man_id)));
        all.dedup_by(|later, first| later.key == first.key);
        DesiredMembers(all)
    }
}

impl IntoIterator for DesiredMembers {
    type Item = DesiredMember;
    type IntoIter = std::vec::IntoIter<DesiredMember>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl std::ops::Index<&MemberKey> for DesiredMembers {
    type Output = DesiredMember;
    fn index(&self, key: &MemberKey) -> &DesiredMember {
        self.get(key).expect("a desired member with this key")
    }
}

/// The mapping's result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// The desired members the state DB does not record exactly so.
    pub members: DesiredMembers,
    /// The recorded members the pull wants exactly as they are recorded,
    /// for [`Members::want_as_is`]: desired too, without a copy here.
    pub as_is: WantedAsIs,
    pub invalid: Vec<InvalidEmail>,
    /// Link-men without an email.
    pub without_email: usize,
    pub collisions: Vec<Collision>,
    /// Link-men returned by more than one customer's `GetLinkManList`: kept
    /// with the first (lowest customer id).
    pub repeated_linkmen: Vec<LinkManId>,
    /// Why recorded members this pull no longer wants left.
    pub departures: Departures,
}

/// Why each recorded member the pull no longer wants is not wanted, from
/// what the pull had for its link-man: for the reason an unsubscribe is
/// entered in the consent trail with. Holds only those members (none on a
/// rerun that changed nothing).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Departures(HashMap<MemberKey, UnsubReason>);

impl Departures {
    /// Why `key` is no longer wanted, when the pull said.
    pub fn reason(&self, key: &MemberKey) -> Option<UnsubReason> {
        self.0.get(key).copied()
    }
}

/// Test-only ways in for the planner's tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// Departures with these reasons.
    pub(crate) fn departures(reasons: &[(MemberKey, UnsubReason)]) -> Departures {
        Departures(reasons.iter().cloned().collect())
    }
}

/// Reads `field` (`customer.X` or `X`) as text (rule 3).
fn field_text(field: &str, customer: &CrmMap, linkman: &CrmMap) -> String {
    match field.strip_prefix("customer.") {
        Some(name) => json_text(customer.get(name)),
        None => json_text(linkman.get(field)),
    }
}

/// The list a link-man goes to: the first route whose field text equals
/// `equals`, else the default list.
fn route(rules: &MappingRules, customer: &CrmMap, linkman: &CrmMap) -> ListId {
    rules
        .routes
        .iter()
        .find(|r| field_text(&r.field, customer, linkman) == r.equals)
        .map(|r| r.list_id)
        .unwrap_or(rules.default_list)
}

fn fields_of(rules: &MappingRules, customer: &CrmMap, linkman: &CrmMap) -> MemberFields {
    let fullname = json_text(linkman.get(&rules.linkman_name));
    let slots = rules.vars.slots();
    let vars: [String; VAR_COUNT] = std::array::from_fn(|i| match slots[i] {
        Some(field) => field_text(field, customer, linkman),
        None => String::new(),
    });
    MemberFields::new(&fullname, &vars)
}

/// Maps every link-man of a whole pull with a valid email to a desired
/// member (the tests' way in; a run feeds [`DesiredBuilder`] as it pulls).
#[cfg(test)]
fn desired_members(snapshot: &CrmSnapshot, rules: &MappingRules) -> Desired {
    desired_over(snapshot, rules, &Members::default())
}

/// [`desired_members`] over recorded members.
#[cfg(test)]
fn desired_over(snapshot: &CrmSnapshot, rules: &MappingRules, recorded: &Members) -> Desired {
    let mut builder = DesiredBuilder::new(rules.clone(), recorded);
    for entry in &snapshot.customers {
        builder.add(&entry.customer.data, entry.customer.id, &entry.linkmen);
    }
    builder.finish()
}

/// Where a link-man of the pull stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Its member is this index in `candidates`.
    Candidate(u32),
    /// Its member is a recorded one, exactly as recorded (this entry of
    /// [`RecordedLinkMen`]): no candidate was made. Kept there, not in
    /// `by_linkman`.
    AsRecorded(usize),
    /// No member: no email, or not a valid one.
    None,
}

/// Builds the desired members one customer at a time, in any order, so a
/// pull need not hold the CRM's objects: only the small member records
/// are kept, in one `Vec` of candidates that `finish` sorts by key (the
/// lowest link-man id of a key owns it, the others are collisions).
///
/// A link-man whose member the state DB records exactly as the pull
/// maps it (same key, owner and texts, present in EDM) makes no
/// candidate: `finish` names the recorded member instead
/// ([`Desired::as_is`]), so a no-change rerun's pull holds a few bytes a
/// link-man rather than a second image of every member.
#[derive(Debug)]
pub struct DesiredBuilder<'m> {
    rules: MappingRules,
    /// What the state DB records, looked at, never changed.
    recorded: &'m Members,
    /// Every member proposed, in the order met, including those a later
    /// customer took back (`by_linkman` says which are current).
    candidates: Vec<DesiredMember>,
    /// Where each link-man not wanted as recorded stands: 16 bytes an
    /// entry, a third of the pull's memory less than with the customer
    /// beside it (a candidate knows its own).
    by_linkman: HashMap<LinkManId, Slot>,
    /// The link-men wanted as recorded.
    as_recorded: RecordedLinkMen,
    /// The customer of each link-man without a candidate (no valid email):
    /// few.
    without_candidate: HashMap<LinkManId, CustomerId>,
    /// The customers added.
    customer_ids: HashSet<CustomerId>,
    invalid: Vec<InvalidEmail>,
    without_email: usize,
    repeated: Vec<LinkManId>,
    pub customers: usize,
    pub linkmen: usize,
}

impl<'m> DesiredBuilder<'m> {
    pub fn new(rules: MappingRules, recorded: &'m Members) -> Self {
        DesiredBuilder {
            rules,
            recorded,
            candidates: Vec::new(),
            by_linkman: HashMap::new(),
            as_recorded: RecordedLinkMen::new(recorded),
            without_candidate: HashMap::new(),
            customer_ids: HashSet::new(),
            invalid: Vec::new(),
            without_email: 0,
            repeated: Vec::new(),
            customers: 0,
            linkmen: 0,
        }
    }

    /// Adds the link-men one customer's `GetLinkManList` returned. A
    /// link-man returned by two customers belongs to the lower customer id.
    pub fn add(&mut self, customer: &CrmMap, customer_id: CustomerId, linkmen: &[LinkMan]) {
        self.customers += 1;
        self.customer_ids.insert(customer_id);
        for lm in linkmen {
            self.linkmen += 1;
            let recorded = self.as_recorded.of(lm.id);
            if let Some(earlier) = self.customer_of(lm.id, recorded.clone()) {
                self.repeated.push(lm.id);
                if earlier <= customer_id {
                    continue;
                }
                // This customer has the lower id: it wins; the other's
                // candidate is no longer current (by_linkman, below).
                self.invalid.retain(|i| i.link_man_id != lm.id);
            }
            let slot = match member_of(&self.rules, customer, lm) {
                Ok(Some(member)) => self.place(member, recorded.clone()),
                Ok(None) => {
                    self.without_email += 1;
                    Slot::None
                }
                Err(invalid) => {
                    self.invalid.push(invalid);
                    Slot::None
                }
            };
            self.remember(lm.id, customer_id, slot, recorded);
        }
    }

    /// The recorded member of `member`'s link-man (its `recorded`
    /// entries) with `member`'s key, when it is exactly `member` and EDM
    /// holds it; else a new candidate. Found through the link-man, not by
    /// a search among every member's address.
    fn place(&mut self, member: DesiredMember, recorded: Range<usize>) -> Slot {
        let as_recorded = &self.as_recorded;
        let entry = recorded.into_iter().find(|&e| {
            as_recorded
                .position(e)
                .and_then(|at| self.recorded.at(at))
                .is_some_and(|have| have.key == member.key && recorded_as(have, &member))
        });
        match entry {
            Some(entry) => Slot::AsRecorded(entry),
            None => Slot::Candidate(self.propose(member)),
        }
    }

    /// The customer link-man `id` (its `recorded` entries) was taken
    /// from, if any.
    fn customer_of(&self, id: LinkManId, recorded: Range<usize>) -> Option<CustomerId> {
        match self.by_linkman.get(&id) {
            Some(Slot::None) => self.without_candidate.get(&id).copied(),
            Some(Slot::Candidate(at)) => self.candidates.get(*at as usize).map(|m| m.customer_id),
            Some(Slot::AsRecorded(_)) | None => self
                .as_recorded
                .wanted_in(recorded)
                .and_then(|at| self.recorded.at(at))
                .and_then(|m| m.customer_id),
        }
    }

    /// Records where link-man `id` (its `recorded` entries) now stands,
    /// taken from `customer`.
    fn remember(
        &mut self,
        id: LinkManId,
        customer: CustomerId,
        slot: Slot,
        recorded: Range<usize>,
    ) {
        match slot {
            Slot::AsRecorded(entry) => {
                self.as_recorded.want(recorded, entry);
                self.by_linkman.remove(&id);
                self.without_candidate.remove(&id);
            }
            Slot::Candidate(_) => {
                self.as_recorded.forget(recorded);
                self.by_linkman.insert(id, slot);
                self.without_candidate.remove(&id);
            }
            Slot::None => {
                self.as_recorded.forget(recorded);
                self.by_linkman.insert(id, slot);
                self.without_candidate.insert(id, customer);
            }
        }
    }

    /// Whether a customer was added.
    pub fn has_customer(&self, id: CustomerId) -> bool {
        self.customer_ids.contains(&id)
    }

    /// Whether a customer returned this link-man.
    pub fn has_linkman(&self, id: LinkManId) -> bool {
        self.by_linkman.contains_key(&id)
            || self
                .as_recorded
                .wanted_in(self.as_recorded.of(id))
                .is_some()
    }

    /// Keeps `member` as the state DB has it: its link-man is missing from
    /// this pull but still in the CRM (the CRM changed while it was read),
    /// so it is neither unsubscribed nor changed this run.
    pub fn hold(&mut self, member: DesiredMember) {
        let (id, customer) = (member.link_man_id, member.customer_id);
        let at = self.propose(member);
        let recorded = self.as_recorded.of(id);
        self.remember(id, customer, Slot::Candidate(at), recorded);
    }

    /// Adds a candidate; returns its index (a `u32`: four billion
    /// candidates would take 256 GB before their texts).
    fn propose(&mut self, member: DesiredMember) -> u32 {
        self.candidates.push(member);
        (self.candidates.len() - 1) as u32
    }

    pub fn finish(self) -> Desired {
        let mut out = Desired {
            invalid: self.invalid,
            without_email: self.without_email,
            repeated_linkmen: self.repeated,
            ..Default::default()
        };
        out.invalid.sort_by_key(|i| i.link_man_id);
        out.repeated_linkmen.sort_unstable();
        out.repeated_linkmen.dedup();
        out.departures = departures(
            &self.as_recorded,
            &self.by_linkman,
            &self.candidates,
            self.recorded,
        );
        // Only each link-man's current candidate stays.
        let by_linkman = self.by_linkman;
        let mut as_recorded = self.as_recorded.positions();
        drop(self.as_recorded);
        let mut at: u32 = 0;
        let mut members = self.candidates;
        members.retain(|m| {
            let current = by_linkman.get(&m.link_man_id) == Some(&Slot::Candidate(at));
            at += 1;
            current
        });
        drop(by_linkman);
        as_recorded.sort_unstable();
        take_back_shared(&mut members, &mut as_recorded, self.recorded);
        members.sort_unstable_by(|a, b| (&a.key, a.link_man_id).cmp(&(&b.key, b.link_man_id)));
        for group in members.chunk_by(|a, b| a.key == b.key) {
            if let [owner, others @ ..] = group
                && !others.is_empty()
            {
                out.collisions.push(Collision {
                    key: owner.key.clone(),
                    owner: owner.link_man_id,
                    others: others.iter().map(|m| m.link_man_id).collect(),
                });
            }
        }
        members.dedup_by(|later, first| later.key == first.key);
        out.members = DesiredMembers(members);
        out.as_is = WantedAsIs::new(as_recorded, self.recorded.generation());
        out
    }
}

/// Why each recorded member the pull does not want as recorded is gone,
/// from what the pull had for its link-man: nothing (deleted), no valid
/// email, or a member with another address or in another list. A member
/// its link-man still wants under the same key is not gone.
fn departures(
    as_recorded: &RecordedLinkMen,
    by_linkman: &HashMap<LinkManId, Slot>,
    candidates: &[DesiredMember],
    recorded: &Members,
) -> Departures {
    let mut out = HashMap::new();
    for (id, at) in as_recorded.unwanted() {
        let Some(gone) = recorded.at(at) else {
            continue;
        };
        let now = match by_linkman.get(&id) {
            Some(Slot::Candidate(i)) => candidates.get(*i as usize).map(|c| &c.key),
            Some(Slot::None) => {
                out.insert(gone.key.clone(), UnsubReason::EmailLost);
                continue;
            }
            Some(Slot::AsRecorded(_)) | None => as_recorded
                .wanted_in(as_recorded.of(id))
                .and_then(|p| recorded.at(p))
                .map(|m| &m.key),
        };
        let reason = match now {
            None => UnsubReason::LinkmanDeleted,
            Some(key) if *key == gone.key => continue,
            Some(key) if key.email != gone.key.email => UnsubReason::EmailChanged,
            Some(_) => UnsubReason::Rerouted,
        };
        out.insert(gone.key.clone(), reason);
    }
    Departures(out)
}

/// Whether the state DB records `want` exactly (owner and texts, byte for
/// byte) and EDM holds it: the plan would then do nothing for it. Texts
/// equal only once trimmed are not enough: such a member stays a
/// candidate, so that an edit the read phase makes necessary sends the
/// CRM's own texts.
fn recorded_as(have: &MemberState, want: &DesiredMember) -> bool {
    have.present
        && have.origin != Origin::Foreign
        && have.link_man_id == Some(want.link_man_id)
        && have.customer_id == Some(want.customer_id)
        && have.fields == want.fields
}

/// The desired member a recorded member stands for.
pub(crate) fn desired_as_recorded(have: &MemberState) -> Option<DesiredMember> {
    Some(DesiredMember {
        key: have.key.clone(),
        link_man_id: have.link_man_id?,
        customer_id: have.customer_id?,
        fields: have.fields.clone(),
    })
}

/// A candidate that shares its key with a member wanted as recorded (a
/// link-man with a lower id took the address later in the pull, say):
/// that member becomes a candidate again, so the lowest id owns the key
/// and the others are collisions, as if no member had been recorded.
fn take_back_shared(
    candidates: &mut Vec<DesiredMember>,
    as_recorded: &mut Vec<u32>,
    recorded: &Members,
) {
    if as_recorded.is_empty() {
        return;
    }
    let mut shared: Vec<u32> = candidates
        .iter()
        .filter_map(|m| recorded.position(&m.key))
        .map(|(at, _)| at)
        .filter(|at| as_recorded.binary_search(at).is_ok())
        .collect();
    if shared.is_empty() {
        return;
    }
    shared.sort_unstable();
    shared.dedup();
    as_recorded.retain(|at| shared.binary_search(at).is_err());
    candidates.extend(
        shared
            .iter()
            .filter_map(|&at| recorded.at(at))
            .filter_map(desired_as_recorded),
    );
}

impl DesiredMembers {
    /// Drops the members whose address was forgotten; how many.
    pub fn drop_forgotten(&mut self, forgotten: &crate::domain::Forgotten) -> usize {
        if forgotten.is_empty() {
            return 0;
        }
        let before = self.0.len();
        self.0.retain(|m| !forgotten.contains(m.key.email.as_str()));
        before - self.0.len()
    }

    /// Takes back into the desired members those `members` reopened (the
    /// read phase replaced a member the pull wanted as recorded): each is
    /// wanted as it was recorded when the pull saw it.
    pub fn take_reopened(&mut self, members: &mut Members) {
        let reopened = members.take_reopened();
        if reopened.is_empty() {
            return;
        }
        self.0
            .extend(reopened.iter().filter_map(desired_as_recorded));
        self.0
            .sort_unstable_by(|a, b| (&a.key, a.link_man_id).cmp(&(&b.key, b.link_man_id)));
        self.0.dedup_by(|later, first| later.key == first.key);
    }
}

fn member_of(
    rules: &MappingRules,
    customer: &CrmMap,
    lm: &LinkMan,
) -> Result<Option<DesiredMember>, InvalidEmail> {
    let raw = json_text(lm.data.get(&rules.linkman_email));
    if raw.trim().is_empty() {
        return Ok(None);
    }
    let email = Email::parse(&raw).map_err(|reason| InvalidEmail {
        link_man_id: lm.id,
        customer_id: lm.customer_id,
        address: raw.trim().to_string(),
        masked: mask_address(&raw),
        reason,
    })?;
    let list_id = route(rules, customer, &lm.data);
    Ok(Some(DesiredMember {
        key: MemberKey::new(list_id, email),
        link_man_id: lm.id,
        customer_id: lm.customer_id,
        fields: fields_of(rules, customer, &lm.data),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crm::{Customer, CustomerWithLinkMen};
    use crate::domain::{CustomerId, LinkManId, ListId};
    use serde_json::{Value, json};

    mod as_is;

    fn map(v: Value) -> CrmMap {
        v.as_object().unwrap().clone()
    }

    fn rules() -> MappingRules {
        MappingRules {
            default_list: ListId(1),
            routes: vec![Route {
                field: "customer.type_id".into(),
                equals: "2".into(),
                list_id: ListId(2),
            }],
            vars: VarMapping {
                var1: Some("customer.name".into()),
                var2: Some("mobile".into()),
                ..Default::default()
            },
            linkman_name: "name".into(),
            linkman_email: "email".into(),
        }
    }

    fn snapshot(customers: Vec<(Value, Vec<Value>)>) -> CrmSnapshot {
        CrmSnapshot {
            customers: customers
                .into_iter()
                .map(|(c, lms)| {
                    let c = map(c);
                    let id = crate::crm::read_id(c.get("id")).unwrap();
                    CustomerWithLinkMen {
                        customer: Customer {
                            id: CustomerId(id),
                            data: c,
                        },
                        linkmen: lms
                            .into_iter()
                            .map(|l| {
                                let l = map(l);
                                LinkMan {
                                    id: LinkManId(crate::crm::read_id(l.get("id")).unwrap()),
                                    customer_id: CustomerId(id),
                                    data: l,
                                }
                            })
                            .collect(),
                    }
                })
                .collect(),
            pages: 1,
        }
    }

    fn key(list: ListId, email: &str) -> MemberKey {
        MemberKey::new(list, Email::parse(email).unwrap())
    }

    #[test]
    fn key_is_trimmed_lowercased_email_in_routed_list() {
        let snap = snapshot(vec![
            (
                json!({"id": 1, "name": "甲公司", "type_id": 1}),
                vec![json!({"id": 10, "name": "张三", "email": " Zhang@Example.CN "})],
            ),
            (
                json!({"id": 2, "name": "乙公司", "type_id": "2"}),
                vec![
                    json!({"id": 20, "name": "李四", "email": "li@example.cn", "mobile": 13800138000u64}),
                ],
            ),
        ]);
        let d = desired_members(&snap, &rules());
        let zhang = &d.members[&key(ListId(1), "zhang@example.cn")];
        assert_eq!(zhang.link_man_id, LinkManId(10));
        assert_eq!(zhang.fields.var(0), "甲公司");
        let li = &d.members[&key(ListId(2), "li@example.cn")];
        assert_eq!(li.customer_id, CustomerId(2));
        assert_eq!(li.fields.fullname(), "李四");
        assert_eq!(li.fields.var(1), "13800138000");
        assert_eq!(li.fields.var(2), "");
    }

    #[test]
    fn route_compares_text_form_so_number_and_string_both_match() {
        let snap = snapshot(vec![
            (
                json!({"id": 1, "type_id": 2}),
                vec![json!({"id": 10, "email": "a@x.cn"})],
            ),
            (
                json!({"id": 2, "type_id": "2"}),
                vec![json!({"id": 20, "email": "b@x.cn"})],
            ),
            (
                json!({"id": 3, "type_id": 2.0}),
                vec![json!({"id": 30, "email": "c@x.cn"})],
            ),
        ]);
        let d = desired_members(&snap, &rules());
        assert!(d.members.contains_key(&key(ListId(2), "a@x.cn")));
        assert!(d.members.contains_key(&key(ListId(2), "b@x.cn")));
        // 2.0 is written "2.0" by JSON, which is not "2".
        assert!(d.members.contains_key(&key(ListId(1), "c@x.cn")));
    }

    #[test]
    fn first_matching_route_wins_and_linkman_fields_can_route() {
        let mut r = rules();
        r.routes.push(Route {
            field: "dept".into(),
            equals: "sales".into(),
            list_id: ListId(3),
        });
        r.routes.insert(
            0,
            Route {
                field: "dept".into(),
                equals: "sales".into(),
                list_id: ListId(4),
            },
        );
        let snap = snapshot(vec![(
            json!({"id": 1, "type_id": 2}),
            vec![json!({"id": 10, "email": "a@x.cn", "dept": "sales"})],
        )]);
        let d = desired_members(&snap, &r);
        assert!(d.members.contains_key(&key(ListId(4), "a@x.cn")));
    }

    #[test]
    fn duplicate_emails_in_one_list_are_owned_by_lowest_linkman_id() {
        let snap = snapshot(vec![
            (
                json!({"id": 1}),
                vec![json!({"id": 30, "name": "C", "email": "same@x.cn"})],
            ),
            (
                json!({"id": 2}),
                vec![
                    json!({"id": 12, "name": "A", "email": "SAME@x.cn"}),
                    json!({"id": 25, "name": "B", "email": "same@x.cn "}),
                ],
            ),
        ]);
        let d = desired_members(&snap, &rules());
        assert_eq!(d.members.len(), 1);
        let m = &d.members[&key(ListId(1), "same@x.cn")];
        assert_eq!(m.link_man_id, LinkManId(12));
        assert_eq!(m.fields.fullname(), "A");
        assert_eq!(d.collisions.len(), 1);
        assert_eq!(d.collisions[0].others, vec![LinkManId(25), LinkManId(30)]);
    }

    #[test]
    fn same_email_in_two_lists_is_two_members() {
        let snap = snapshot(vec![
            (
                json!({"id": 1, "type_id": 1}),
                vec![json!({"id": 10, "email": "s@x.cn"})],
            ),
            (
                json!({"id": 2, "type_id": 2}),
                vec![json!({"id": 20, "email": "s@x.cn"})],
            ),
        ]);
        let d = desired_members(&snap, &rules());
        assert_eq!(d.members.len(), 2);
        assert!(d.collisions.is_empty());
    }

    #[test]
    fn invalid_and_missing_emails_are_counted_not_mapped() {
        let snap = snapshot(vec![(
            json!({"id": 1}),
            vec![
                json!({"id": 10, "email": "not-an-address"}),
                json!({"id": 11, "email": "a;b@x.cn"}),
                json!({"id": 12, "email": "张@x.cn"}),
                json!({"id": 13, "email": null}),
                json!({"id": 14}),
                json!({"id": 15, "email": "  "}),
                json!({"id": 16, "email": "ok@x.cn"}),
            ],
        )]);
        let d = desired_members(&snap, &rules());
        assert_eq!(d.members.len(), 1);
        assert_eq!(d.invalid.len(), 3);
        assert_eq!(d.without_email, 3);
        assert!(
            d.invalid
                .iter()
                .all(|i| !i.masked.contains("not-an-address"))
        );
    }

    #[test]
    fn field_separators_in_names_and_vars_become_spaces() {
        let snap = snapshot(vec![(
            json!({"id": 1, "name": "A;B\tC"}),
            vec![json!({"id": 10, "name": "王\n五;", "email": "w@x.cn", "mobile": "1\r2"})],
        )]);
        let d = desired_members(&snap, &rules());
        let m = &d.members[&key(ListId(1), "w@x.cn")];
        assert_eq!(m.fields.fullname(), "王 五 ");
        assert_eq!(m.fields.var(0), "A B C");
        assert_eq!(m.fields.var(1), "1 2");
    }

    #[test]
    fn a_linkman_returned_by_two_customers_is_mapped_as_the_lower_customer_has_it_email_or_not() {
        // Arrange: customer 2 is read first. Link-man 7 has no email there
        // and a valid one under customer 1; link-man 8 a valid one there
        // and an invalid one under customer 1; link-man 9 valid under
        // customer 1 and invalid under customer 2.
        let snap = snapshot(vec![
            (
                json!({"id": 2, "type_id": 1}),
                vec![
                    json!({"id": 7, "email": ""}),
                    json!({"id": 8, "email": "eight@x.cn"}),
                    json!({"id": 9, "email": "not an address"}),
                ],
            ),
            (
                json!({"id": 1, "type_id": 1}),
                vec![
                    json!({"id": 7, "email": "seven@x.cn"}),
                    json!({"id": 8, "email": "not an address either"}),
                    json!({"id": 9, "email": "nine@x.cn"}),
                ],
            ),
        ]);

        // Act
        let d = desired_members(&snap, &rules());

        // Assert: customer 1's version of each, whatever customer 2 had.
        let owners: Vec<(String, i64, i64)> = d
            .members
            .iter()
            .map(|m| (m.key.email.to_string(), m.link_man_id.0, m.customer_id.0))
            .collect();
        assert_eq!(
            owners,
            vec![
                ("nine@x.cn".to_string(), 9, 1),
                ("seven@x.cn".to_string(), 7, 1),
            ]
        );
        let invalid: Vec<(i64, i64)> = d
            .invalid
            .iter()
            .map(|i| (i.link_man_id.0, i.customer_id.0))
            .collect();
        assert_eq!(invalid, vec![(8, 1)]);
        assert_eq!(
            d.repeated_linkmen,
            vec![LinkManId(7), LinkManId(8), LinkManId(9)]
        );
    }

    #[test]
    fn a_linkman_returned_by_two_customers_belongs_to_the_first() {
        let snap = snapshot(vec![
            (
                json!({"id": 2, "type_id": 2}),
                vec![json!({"id": 10, "email": "a@x.cn"})],
            ),
            (
                json!({"id": 1, "type_id": 1}),
                vec![json!({"id": 10, "email": "a@x.cn"})],
            ),
        ]);
        let d = desired_members(&snap, &rules());
        assert_eq!(d.members.len(), 1);
        assert_eq!(
            d.members[&key(ListId(1), "a@x.cn")].customer_id,
            CustomerId(1)
        );
        assert_eq!(d.repeated_linkmen, vec![LinkManId(10)]);
    }

    #[test]
    fn a_leader_taken_back_by_a_lower_customer_hands_its_key_to_the_next_lowest() {
        // Arrange: customer 2 is read first; link-man 10 leads same@x.cn
        // over 20 and 30. Customer 1 then returns link-man 10 with another
        // address.
        let snap = snapshot(vec![
            (
                json!({"id": 2, "type_id": 1}),
                vec![
                    json!({"id": 30, "email": "same@x.cn"}),
                    json!({"id": 10, "name": "ten", "email": "same@x.cn"}),
                    json!({"id": 20, "name": "twenty", "email": "same@x.cn"}),
                ],
            ),
            (
                json!({"id": 1, "type_id": 1}),
                vec![json!({"id": 10, "name": "ten", "email": "b@x.cn"})],
            ),
        ]);

        // Act
        let d = desired_members(&snap, &rules());

        // Assert
        assert_eq!(
            d.members[&key(ListId(1), "b@x.cn")].link_man_id,
            LinkManId(10)
        );
        let same = &d.members[&key(ListId(1), "same@x.cn")];
        assert_eq!(same.link_man_id, LinkManId(20));
        assert_eq!(same.fields.fullname(), "twenty");
        assert_eq!(d.collisions.len(), 1);
        assert_eq!(d.collisions[0].owner, LinkManId(20));
        assert_eq!(d.collisions[0].others, vec![LinkManId(30)]);
    }

    /// What the state DB records after every desired member was added:
    /// present, owned, the same owner and texts.
    fn recorded_from(d: &Desired) -> Members {
        Members::from_rows(
            d.members
                .iter()
                .map(|m| MemberState {
                    key: m.key.clone(),
                    origin: Origin::Owned,
                    present: true,
                    unsubscribed: false,
                    link_man_id: Some(m.link_man_id),
                    customer_id: Some(m.customer_id),
                    edm_id: None,
                    fields: m.fields.clone(),
                })
                .collect(),
        )
    }

    /// `recorded` with `change` made to the member at `k`.
    fn with_record(
        recorded: &Members,
        k: &MemberKey,
        change: impl Fn(&mut MemberState),
    ) -> Members {
        let rows = recorded
            .values()
            .cloned()
            .map(|mut m| {
                if &m.key == k {
                    change(&mut m);
                }
                m
            })
            .collect();
        Members::from_rows(rows)
    }

    /// `fields` with another full name.
    fn renamed(fields: &MemberFields, name: &str) -> MemberFields {
        let vars: Vec<String> = fields.vars().map(String::from).collect();
        MemberFields::new(name, &vars.try_into().unwrap())
    }

    fn three_linkmen() -> CrmSnapshot {
        snapshot(vec![
            (
                json!({"id": 1, "type_id": 1, "name": "Acme"}),
                vec![
                    json!({"id": 10, "name": "ten", "email": "a@x.cn"}),
                    json!({"id": 11, "name": "eleven", "email": "b@x.cn"}),
                ],
            ),
            (
                json!({"id": 2, "type_id": 2, "name": "Beta"}),
                vec![json!({"id": 20, "name": "twenty", "email": "c@x.cn"})],
            ),
        ])
    }

    #[test]
    fn each_recorded_member_the_pull_no_longer_wants_is_given_the_reason_its_link_man_left() {
        // Arrange: five link-men recorded after a sync; then one is
        // deleted, one has another email, one no valid email, one is routed
        // to the other list, and one is renamed (still wanted).
        let before = snapshot(vec![
            (
                json!({"id": 1, "type_id": 1, "name": "Acme"}),
                vec![
                    json!({"id": 10, "name": "ten", "email": "gone@x.cn"}),
                    json!({"id": 11, "name": "eleven", "email": "old@x.cn"}),
                    json!({"id": 12, "name": "twelve", "email": "lost@x.cn"}),
                    json!({"id": 14, "name": "fourteen", "email": "same@x.cn"}),
                ],
            ),
            (
                json!({"id": 2, "type_id": 1, "name": "Beta"}),
                vec![json!({"id": 13, "name": "thirteen", "email": "moved@x.cn"})],
            ),
        ]);
        let recorded = recorded_from(&desired_members(&before, &rules()));
        let after = snapshot(vec![
            (
                json!({"id": 1, "type_id": 1, "name": "Acme"}),
                vec![
                    json!({"id": 11, "name": "eleven", "email": "new@x.cn"}),
                    json!({"id": 12, "name": "twelve", "email": "not an address"}),
                    json!({"id": 14, "name": "renamed", "email": "same@x.cn"}),
                ],
            ),
            (
                json!({"id": 2, "type_id": 2, "name": "Beta"}),
                vec![json!({"id": 13, "name": "thirteen", "email": "moved@x.cn"})],
            ),
        ]);

        // Act
        let d = desired_over(&after, &rules(), &recorded);

        // Assert
        let reason = |list, email| d.departures.reason(&key(ListId(list), email));
        assert_eq!(reason(1, "gone@x.cn"), Some(UnsubReason::LinkmanDeleted));
        assert_eq!(reason(1, "old@x.cn"), Some(UnsubReason::EmailChanged));
        assert_eq!(reason(1, "lost@x.cn"), Some(UnsubReason::EmailLost));
        assert_eq!(reason(1, "moved@x.cn"), Some(UnsubReason::Rerouted));
        assert_eq!(reason(1, "same@x.cn"), None);
    }

    #[test]
    fn a_rerun_that_changed_nothing_holds_no_departure() {
        let snap = three_linkmen();
        let recorded = recorded_from(&desired_members(&snap, &rules()));

        let d = desired_over(&snap, &rules(), &recorded);

        assert_eq!(d.departures, Departures::default());
    }

    #[test]
    fn a_linkman_mapped_exactly_as_recorded_makes_no_candidate() {
        // Arrange: the state DB records what the pull maps, as after a sync.
        let snap = three_linkmen();
        let recorded = recorded_from(&desired_members(&snap, &rules()));

        // Act
        let d = desired_over(&snap, &rules(), &recorded);

        // Assert: nothing is copied; all three are named as recorded.
        assert!(d.members.is_empty());
        assert_eq!(d.as_is.len(), 3);
        let mut members = recorded.clone();
        members.want_as_is(d.as_is).unwrap();
        assert!(members.wanted_as_is(&key(ListId(1), "a@x.cn")));
        assert!(members.wanted_as_is(&key(ListId(2), "c@x.cn")));
        assert_eq!(members.wanted_as_is_count(), 3);
    }

    #[test]
    fn a_member_recorded_otherwise_than_the_pull_maps_it_stays_a_candidate() {
        // Arrange: each of the three recorded members differs from the
        // pull in one way: a name padded with a space, another customer,
        // gone from EDM.
        let snap = three_linkmen();
        let exact = recorded_from(&desired_members(&snap, &rules()));
        let padded = with_record(&exact, &key(ListId(1), "a@x.cn"), |m| {
            m.fields = renamed(&m.fields, "ten ");
        });
        let moved = with_record(&padded, &key(ListId(1), "b@x.cn"), |m| {
            m.customer_id = Some(CustomerId(9));
        });
        let recorded = with_record(&moved, &key(ListId(2), "c@x.cn"), |m| m.present = false);

        // Act
        let d = desired_over(&snap, &rules(), &recorded);

        // Assert
        assert_eq!(d.members.len(), 3);
        assert!(d.as_is.is_empty());
    }

    #[test]
    fn a_lower_linkman_taking_a_recorded_address_later_in_the_pull_owns_it() {
        // Arrange: the state DB records same@x.cn as link-man 20's. This
        // pull returns 20 first (exactly as recorded), then, in another
        // customer, link-man 10 with the same address.
        let before = snapshot(vec![(
            json!({"id": 1, "type_id": 1}),
            vec![json!({"id": 20, "name": "twenty", "email": "same@x.cn"})],
        )]);
        let recorded = recorded_from(&desired_members(&before, &rules()));
        let snap = snapshot(vec![
            (
                json!({"id": 1, "type_id": 1}),
                vec![json!({"id": 20, "name": "twenty", "email": "same@x.cn"})],
            ),
            (
                json!({"id": 2, "type_id": 1}),
                vec![json!({"id": 10, "name": "ten", "email": "same@x.cn"})],
            ),
        ]);

        // Act
        let d = desired_over(&snap, &rules(), &recorded);

        // Assert: as without a record, 10 owns the key and 20 collides.
        assert!(d.as_is.is_empty());
        let same = &d.members[&key(ListId(1), "same@x.cn")];
        assert_eq!(same.link_man_id, LinkManId(10));
        assert_eq!(same.fields.fullname(), "ten");
        assert_eq!(d.collisions.len(), 1);
        assert_eq!(d.collisions[0].owner, LinkManId(10));
        assert_eq!(d.collisions[0].others, vec![LinkManId(20)]);
        assert_eq!(d, desired_members(&snap, &rules()));
    }

    #[test]
    fn a_recorded_linkman_a_lower_customer_returns_later_moves_to_that_customer() {
        // Arrange: link-man 10 is recorded under customer 2. The pull
        // reads customer 2 first (10 as recorded), then customer 1, which
        // returns 10 as well.
        let before = snapshot(vec![(
            json!({"id": 2, "type_id": 1}),
            vec![json!({"id": 10, "name": "ten", "email": "a@x.cn"})],
        )]);
        let recorded = recorded_from(&desired_members(&before, &rules()));
        let snap = snapshot(vec![
            (
                json!({"id": 2, "type_id": 1}),
                vec![json!({"id": 10, "name": "ten", "email": "a@x.cn"})],
            ),
            (
                json!({"id": 1, "type_id": 1}),
                vec![json!({"id": 10, "name": "ten", "email": "a@x.cn"})],
            ),
        ]);

        // Act
        let d = desired_over(&snap, &rules(), &recorded);

        // Assert: the lower customer has it; nothing is wanted as recorded.
        assert!(d.as_is.is_empty());
        assert_eq!(
            d.members[&key(ListId(1), "a@x.cn")].customer_id,
            CustomerId(1)
        );
        assert_eq!(d.repeated_linkmen, vec![LinkManId(10)]);
    }
}
