//! CRM snapshot → desired EDM members (rules 1–4 of docs/sync-rules.md). Pure: no
//! I/O, no clock; what deserves a log line comes back in the result.

use std::collections::{HashMap, HashSet};

use crate::config::{Route, Settings, VarMapping};
#[cfg(test)]
use crate::crm::CrmSnapshot;
use crate::crm::{CrmMap, LinkMan};
use crate::domain::{
    CustomerId, Email, EmailError, LinkManId, ListId, MemberFields, MemberKey, VAR_COUNT,
    json_text, mask_address,
};

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
    pub members: DesiredMembers,
    pub invalid: Vec<InvalidEmail>,
    /// Link-men without an email.
    pub without_email: usize,
    pub collisions: Vec<Collision>,
    /// Link-men returned by more than one customer's `GetLinkManList`: kept
    /// with the first (lowest customer id).
    pub repeated_linkmen: Vec<LinkManId>,
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
    let mut builder = DesiredBuilder::new(rules.clone());
    for entry in &snapshot.customers {
        builder.add(&entry.customer.data, entry.customer.id, &entry.linkmen);
    }
    builder.finish()
}

/// `by_linkman`'s mark for a link-man that has no candidate.
const NO_CANDIDATE: u32 = u32::MAX;

/// Builds the desired members one customer at a time, in any order, so a
/// pull need not hold the CRM's objects: only the small member records
/// are kept, in one `Vec` of candidates that `finish` sorts by key (the
/// lowest link-man id of a key owns it, the others are collisions).
#[derive(Debug)]
pub struct DesiredBuilder {
    rules: MappingRules,
    /// Every member proposed, in the order met, including those a later
    /// customer took back (`by_linkman` says which are current).
    candidates: Vec<DesiredMember>,
    /// Each link-man's current candidate (its index in `candidates`), or
    /// [`NO_CANDIDATE`]: 16 bytes an entry, a third of the pull's memory
    /// less than with the customer beside it (a candidate knows its own).
    by_linkman: HashMap<LinkManId, u32>,
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

impl DesiredBuilder {
    pub fn new(rules: MappingRules) -> Self {
        DesiredBuilder {
            rules,
            candidates: Vec::new(),
            by_linkman: HashMap::new(),
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
            if let Some(earlier) = self.customer_of(lm.id) {
                self.repeated.push(lm.id);
                if earlier <= customer_id {
                    continue;
                }
                // This customer has the lower id: it wins; the other's
                // candidate is no longer current (by_linkman, below).
                self.invalid.retain(|i| i.link_man_id != lm.id);
            }
            let candidate = match member_of(&self.rules, customer, lm) {
                Ok(Some(member)) => Some(self.propose(member)),
                Ok(None) => {
                    self.without_email += 1;
                    None
                }
                Err(invalid) => {
                    self.invalid.push(invalid);
                    None
                }
            };
            self.remember(lm.id, customer_id, candidate);
        }
    }

    /// The customer link-man `id` was taken from, if any.
    fn customer_of(&self, id: LinkManId) -> Option<CustomerId> {
        match *self.by_linkman.get(&id)? {
            NO_CANDIDATE => self.without_candidate.get(&id).copied(),
            at => self.candidates.get(at as usize).map(|m| m.customer_id),
        }
    }

    /// Records where link-man `id` now stands: taken from `customer`,
    /// with this candidate or none.
    fn remember(&mut self, id: LinkManId, customer: CustomerId, candidate: Option<u32>) {
        match candidate {
            Some(at) => {
                self.by_linkman.insert(id, at);
                self.without_candidate.remove(&id);
            }
            None => {
                self.by_linkman.insert(id, NO_CANDIDATE);
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
    }

    /// Keeps `member` as the state DB has it: its link-man is missing from
    /// this pull but still in the CRM (the CRM changed while it was read),
    /// so it is neither unsubscribed nor changed this run.
    pub fn hold(&mut self, member: DesiredMember) {
        let (id, customer) = (member.link_man_id, member.customer_id);
        let at = self.propose(member);
        self.remember(id, customer, Some(at));
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
        // Only each link-man's current candidate stays.
        let by_linkman = self.by_linkman;
        let mut at: u32 = 0;
        let mut members = self.candidates;
        members.retain(|m| {
            let current = by_linkman.get(&m.link_man_id) == Some(&at);
            at += 1;
            current
        });
        drop(by_linkman);
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
        out
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
}
