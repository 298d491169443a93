//! What recipients did → ContactHistory records to write. Pure: matching an
//! event's address to the link-man that owns (or last owned) it,
//! aggregating one record per once-only key, and filling the templates.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::config::Templates;
use crate::domain::MemberState;
use crate::domain::{CustomerId, Email, LinkManId, ListId, Members, RecordScope};
use crate::edm::{Campaign, ClickEvent, HardBounce, OpenEvent};
use crate::state::NewRecord;
use crate::stored_enums::RecordKind;
use crate::template::render;

/// A campaign and what its recipients did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CampaignEvents {
    pub campaign: Campaign,
    pub opens: Vec<OpenEvent>,
    pub clicks: Vec<ClickEvent>,
    /// `(failexport type, address)`.
    pub bounces: Vec<(HardBounce, String)>,
}

/// A user unsubscribe: `(list, address, export line time)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Unsubscribe {
    pub list_id: ListId,
    pub address: String,
    pub time: String,
}

/// The link-man a member belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub link_man_id: LinkManId,
    pub customer_id: CustomerId,
    pub name: String,
    pub email: String,
}

/// Members by address, for matching events. Borrows the members: an index
/// entry is one reference (8 bytes) in a `Vec` sorted by address and list,
/// found by binary search, and an [`Owner`] is only built for an address
/// an event names (a tenth of them, say).
#[derive(Debug, Default)]
pub struct MemberIndex<'a> {
    /// The members that have (or had) an owning link-man, sorted by
    /// address, then list id.
    by_email: Vec<&'a MemberState>,
}

impl<'a> MemberIndex<'a> {
    /// Indexes members that have (or had) an owning link-man.
    pub fn new(members: &'a Members) -> Self {
        let mut by_email: Vec<&'a MemberState> = members
            .values()
            .filter(|m| m.link_man_id.is_some() && m.customer_id.is_some())
            .collect();
        by_email.sort_unstable_by(|a, b| {
            (a.key.email.as_str(), a.key.list_id).cmp(&(b.key.email.as_str(), b.key.list_id))
        });
        MemberIndex { by_email }
    }

    /// The members of one address, in list order.
    fn of(&self, email: &str) -> &[&'a MemberState] {
        let from = self
            .by_email
            .partition_point(|m| m.key.email.as_str() < email);
        let rest = self.by_email.get(from..).unwrap_or_default();
        let n = rest
            .iter()
            .take_while(|m| m.key.email.as_str() == email)
            .count();
        rest.get(..n).unwrap_or_default()
    }

    /// The owner of `address` in `list`, else in the lowest-numbered list
    /// where one did.
    pub fn owner(&self, address: &str, list: Option<ListId>) -> Option<Owner> {
        let email = Email::parse(address).ok()?;
        let members = self.of(email.as_str());
        let m = list
            .and_then(|l| members.iter().find(|m| m.key.list_id == l))
            .or_else(|| members.first())?;
        Some(Owner {
            link_man_id: m.link_man_id?,
            customer_id: m.customer_id?,
            name: m.fields.fullname().to_string(),
            email: m.key.email.to_string(),
        })
    }
}

/// Events of unknown addresses, per kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unmatched {
    pub open: usize,
    pub click: usize,
    pub bounce: usize,
    pub unsubscribe: usize,
}

impl Unmatched {
    pub fn total(&self) -> usize {
        self.open + self.click + self.bounce + self.unsubscribe
    }
}

/// Aggregated facts for one record.
#[derive(Debug, Clone, Default)]
struct Facts {
    count: u64,
    first: String,
    last: String,
    links: BTreeSet<String>,
    reason: String,
    time: String,
}

impl Facts {
    fn add(&mut self, count: u64, first: &str, last: &str) {
        self.count += count;
        if !first.is_empty() && (self.first.is_empty() || first < self.first.as_str()) {
            self.first = first.to_string();
        }
        if last > self.last.as_str() {
            self.last = last.to_string();
        }
    }
}

/// A record's once-only key: (kind, scope, link-man).
type RecordKey = (RecordKind, RecordScope, LinkManId);

/// What is known so far for one record.
struct Gathered<'a> {
    owner: Owner,
    facts: Facts,
    campaign: Option<&'a Campaign>,
    list_id: Option<ListId>,
}

/// The facts of the record for `(kind, scope, owner)`, created empty on
/// first use.
fn gather<'m, 'a>(
    acc: &'m mut BTreeMap<RecordKey, Gathered<'a>>,
    kind: RecordKind,
    scope: RecordScope,
    owner: Owner,
    campaign: Option<&'a Campaign>,
    list_id: Option<ListId>,
) -> &'m mut Facts {
    &mut acc
        .entry((kind, scope, owner.link_man_id))
        .or_insert_with(|| Gathered {
            owner,
            facts: Facts::default(),
            campaign,
            list_id,
        })
        .facts
}

/// Links listed in a click record at the most.
const MAX_LINKS: usize = 10;

/// Turns the events into one record per once-only key: (campaign,
/// link-man) for opens, clicks and bounces; (list, link-man) for
/// unsubscribes. Events of addresses no synced member has are counted as
/// unmatched.
pub fn records(
    campaigns: &[CampaignEvents],
    unsubscribes: &[Unsubscribe],
    index: &MemberIndex,
    templates: &Templates,
    list_names: &HashMap<ListId, String>,
) -> (Vec<NewRecord>, Unmatched) {
    let mut unmatched = Unmatched::default();
    let mut acc: BTreeMap<RecordKey, Gathered> = BTreeMap::new();
    for ce in campaigns {
        gather_campaign(&mut acc, ce, index, &mut unmatched);
    }
    for u in unsubscribes {
        match index.owner(&u.address, Some(u.list_id)) {
            Some(owner) => {
                let facts = gather(
                    &mut acc,
                    RecordKind::Unsubscribe,
                    RecordScope::List(u.list_id),
                    owner,
                    None,
                    Some(u.list_id),
                );
                facts.count += 1;
                if facts.time.is_empty() || u.time < facts.time {
                    facts.time = u.time.clone();
                }
            }
            None => unmatched.unsubscribe += 1,
        }
    }
    let out = acc
        .into_iter()
        .map(|(key, gathered)| render_record(key, gathered, templates, list_names))
        .collect();
    (out, unmatched)
}

/// One campaign's opens, clicks and hard bounces, gathered by owner.
fn gather_campaign<'a>(
    acc: &mut BTreeMap<RecordKey, Gathered<'a>>,
    ce: &'a CampaignEvents,
    index: &MemberIndex,
    unmatched: &mut Unmatched,
) {
    let c = &ce.campaign;
    let scope = RecordScope::Campaign(c.id);
    for o in &ce.opens {
        match index.owner(&o.address, c.list_id) {
            Some(owner) => gather(acc, RecordKind::Open, scope, owner, Some(c), c.list_id)
                .add(o.total, &o.first, &o.last),
            None => unmatched.open += 1,
        }
    }
    for k in &ce.clicks {
        match index.owner(&k.address, c.list_id) {
            Some(owner) => {
                let facts = gather(acc, RecordKind::Click, scope, owner, Some(c), c.list_id);
                facts.add(k.total, &k.first, &k.last);
                if !k.link.is_empty() {
                    facts.links.insert(k.link.clone());
                }
            }
            None => unmatched.click += 1,
        }
    }
    for (bounce_kind, address) in &ce.bounces {
        match index.owner(address, c.list_id) {
            Some(owner) => {
                let facts = gather(acc, RecordKind::Bounce, scope, owner, Some(c), c.list_id);
                facts.count += 1;
                if facts.reason.is_empty() {
                    facts.reason = bounce_kind.reason().to_string();
                }
            }
            None => unmatched.bounce += 1,
        }
    }
}

/// The record of one key: its template filled with what was gathered.
fn render_record(
    (kind, scope, link_man_id): RecordKey,
    gathered: Gathered,
    templates: &Templates,
    list_names: &HashMap<ListId, String>,
) -> NewRecord {
    let Gathered {
        owner,
        facts,
        campaign,
        list_id,
    } = gathered;
    let list = list_id
        .map(|l| {
            list_names
                .get(&l)
                .cloned()
                .unwrap_or_else(|| format!("#{l}"))
        })
        .unwrap_or_default();
    let mut links: Vec<String> = facts.links.iter().take(MAX_LINKS).cloned().collect();
    if facts.links.len() > MAX_LINKS {
        links.push(format!("…（共 {} 个）", facts.links.len()));
    }
    let values: BTreeMap<&str, String> = [
        ("name", owner.name.clone()),
        ("email", owner.email.clone()),
        (
            "campaign",
            campaign.map(|c| c.name.clone()).unwrap_or_default(),
        ),
        ("sn", campaign.map(|c| c.sn.clone()).unwrap_or_default()),
        (
            "campaign_id",
            campaign.map(|c| c.id.to_string()).unwrap_or_default(),
        ),
        ("list", list),
        ("count", facts.count.to_string()),
        ("first", facts.first.clone()),
        ("last", facts.last.clone()),
        ("links", links.join("、")),
        ("reason", facts.reason.clone()),
        ("time", facts.time.clone()),
    ]
    .into_iter()
    .collect();
    let (title, content) = match kind {
        RecordKind::Open => (&templates.open_title, &templates.open_content),
        RecordKind::Click => (&templates.click_title, &templates.click_content),
        RecordKind::Bounce => (&templates.bounce_title, &templates.bounce_content),
        RecordKind::Unsubscribe => (&templates.unsubscribe_title, &templates.unsubscribe_content),
    };
    NewRecord {
        kind,
        scope,
        link_man_id,
        customer_id: owner.customer_id,
        email: owner.email.clone(),
        title: render(title, &values),
        content: render(content, &values),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use crate::domain::Origin;
    use crate::domain::{CampaignId, CustomerId, LinkManId, ListId};
    use crate::domain::{MemberFields, MemberKey};

    fn templates() -> Templates {
        Settings::from_toml("[crm]\nbase_url = \"http://c.test\"\ntoken = \"t\"\n[edm]\nusername = \"u\"\npassword = \"p\"\n")
            .unwrap()
            .writeback
            .templates
    }

    fn member(
        list: ListId,
        email: &str,
        lm: LinkManId,
        present: bool,
        origin: Origin,
    ) -> (MemberKey, MemberState) {
        let key = MemberKey::new(list, Email::parse(email).unwrap());
        (
            key.clone(),
            MemberState {
                key,
                origin,
                present,
                unsubscribed: false,
                link_man_id: Some(lm),
                customer_id: Some(CustomerId(lm.0 * 100)),
                edm_id: None,
                fields: MemberFields::named(&format!("人{lm}")),
            },
        )
    }

    fn campaign(id: i64, list: ListId) -> Campaign {
        Campaign {
            id: CampaignId(id),
            sn: format!("SN{id}"),
            name: format!("活动{id}"),
            list_id: Some(list),
            send_date: "2026-11-20".into(),
            send_status: crate::edm::SendStatus::Done,
            tracking: crate::edm::Tracking::OpensAndClicks,
        }
    }

    fn open(addr: &str, total: u64, first: &str, last: &str) -> OpenEvent {
        OpenEvent {
            address: addr.into(),
            total,
            first: first.into(),
            last: last.into(),
        }
    }

    fn click(addr: &str, link: &str, total: u64) -> ClickEvent {
        ClickEvent {
            address: addr.into(),
            link: link.into(),
            total,
            first: "2026-11-20 10:00:00".into(),
            last: "2026-11-20 11:00:00".into(),
        }
    }

    #[test]
    fn event_maps_to_owner_in_the_campaigns_list_else_the_lowest_list() {
        let members: Members = [
            member(ListId(1), "a@x.cn", LinkManId(10), true, Origin::Owned),
            member(ListId(2), "a@x.cn", LinkManId(20), true, Origin::Owned),
            member(ListId(3), "b@x.cn", LinkManId(30), false, Origin::Owned),
            member(ListId(2), "b@x.cn", LinkManId(40), true, Origin::Adopted),
        ]
        .into_iter()
        .collect();
        let index = MemberIndex::new(&members);
        assert_eq!(
            index.owner("A@x.cn", Some(ListId(2))).unwrap().link_man_id,
            LinkManId(20)
        );
        assert_eq!(
            index.owner("a@x.cn", Some(ListId(9))).unwrap().link_man_id,
            LinkManId(10)
        );
        // A member the daemon removed still names its last owner.
        assert_eq!(
            index.owner("b@x.cn", Some(ListId(3))).unwrap().link_man_id,
            LinkManId(30)
        );
        assert_eq!(
            index.owner("b@x.cn", None).unwrap().link_man_id,
            LinkManId(40)
        );
        assert!(index.owner("nobody@x.cn", Some(ListId(1))).is_none());
        assert!(index.owner("not an address", Some(ListId(1))).is_none());
    }

    #[test]
    fn one_record_per_campaign_linkman_and_kind_with_aggregated_facts() {
        let members: Members = [member(
            ListId(1),
            "a@x.cn",
            LinkManId(10),
            true,
            Origin::Owned,
        )]
        .into_iter()
        .collect();
        let events = vec![CampaignEvents {
            campaign: campaign(5, ListId(1)),
            opens: vec![
                open("a@x.cn", 2, "2026-11-20 09:00:00", "2026-11-20 12:00:00"),
                open("A@X.CN", 1, "2026-11-19 08:00:00", "2026-11-20 10:00:00"),
                open("ghost@x.cn", 1, "", ""),
            ],
            clicks: vec![
                click("a@x.cn", "https://a.cn/1", 2),
                click("a@x.cn", "https://a.cn/2", 1),
                click("a@x.cn", "https://a.cn/1", 1),
            ],
            bounces: vec![],
        }];
        let (records, unmatched) = records(
            &events,
            &[],
            &MemberIndex::new(&members),
            &templates(),
            &HashMap::new(),
        );
        assert_eq!(records.len(), 2);
        assert_eq!(
            unmatched,
            Unmatched {
                open: 1,
                ..Default::default()
            }
        );
        let o = records.iter().find(|r| r.kind == RecordKind::Open).unwrap();
        assert_eq!(
            (o.scope, o.link_man_id, o.customer_id),
            (
                RecordScope::Campaign(CampaignId(5)),
                LinkManId(10),
                CustomerId(1000)
            )
        );
        assert!(o.title.contains("活动5"), "{}", o.title);
        assert!(o.content.contains("3 次"), "{}", o.content);
        assert!(
            o.content.contains("首次 2026-11-19 08:00:00"),
            "{}",
            o.content
        );
        assert!(
            o.content.contains("最近 2026-11-20 12:00:00"),
            "{}",
            o.content
        );
        let c = records
            .iter()
            .find(|r| r.kind == RecordKind::Click)
            .unwrap();
        assert!(c.content.contains("4 次"), "{}", c.content);
        assert!(
            c.content.contains("https://a.cn/1、https://a.cn/2"),
            "{}",
            c.content
        );
    }

    #[test]
    fn bounces_and_unsubscribes_have_their_own_keys_and_reasons() {
        let members: Members = [member(
            ListId(1),
            "a@x.cn",
            LinkManId(10),
            false,
            Origin::Owned,
        )]
        .into_iter()
        .collect();
        let events = vec![CampaignEvents {
            campaign: campaign(5, ListId(1)),
            bounces: vec![
                (HardBounce::NotExist, "a@x.cn".into()),
                (HardBounce::UserReject, "ghost@x.cn".into()),
            ],
            ..Default::default()
        }];
        let unsubs = vec![
            Unsubscribe {
                list_id: ListId(1),
                address: "a@x.cn".into(),
                time: "2026-11-21 08:00:00".into(),
            },
            Unsubscribe {
                list_id: ListId(1),
                address: "ghost@x.cn".into(),
                time: "t".into(),
            },
        ];
        let names: HashMap<ListId, String> = [(ListId(1), "客户".to_string())].into();
        let (records, unmatched) = records(
            &events,
            &unsubs,
            &MemberIndex::new(&members),
            &templates(),
            &names,
        );
        assert_eq!((unmatched.bounce, unmatched.unsubscribe), (1, 1));
        let b = records
            .iter()
            .find(|r| r.kind == RecordKind::Bounce)
            .unwrap();
        assert!(b.content.contains("邮箱不存在"), "{}", b.content);
        let u = records
            .iter()
            .find(|r| r.kind == RecordKind::Unsubscribe)
            .unwrap();
        assert_eq!(u.scope, RecordScope::List(ListId(1)));
        assert!(u.title.contains("客户"), "{}", u.title);
        assert!(u.content.contains("2026-11-21 08:00:00"), "{}", u.content);
    }

    #[test]
    fn many_links_are_cut_to_ten_with_a_total() {
        let members: Members = [member(
            ListId(1),
            "a@x.cn",
            LinkManId(10),
            true,
            Origin::Owned,
        )]
        .into_iter()
        .collect();
        let events = vec![CampaignEvents {
            campaign: campaign(5, ListId(1)),
            clicks: (0..15)
                .map(|i| click("a@x.cn", &format!("https://a.cn/{i:02}"), 1))
                .collect(),
            ..Default::default()
        }];
        let (records, _) = records(
            &events,
            &[],
            &MemberIndex::new(&members),
            &templates(),
            &HashMap::new(),
        );
        assert!(
            records[0].content.contains("共 15 个"),
            "{}",
            records[0].content
        );
        assert!(!records[0].content.contains("https://a.cn/14"));
    }
}
