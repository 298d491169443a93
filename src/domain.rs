//! Domain types shared by the engine, the state DB and the clients.
//!
//! Everything here was validated once, at the edge ("parse, don't
//! validate"): an [`Email`] is always a normalised, valid mailbox in the sense
//! of rule 2, and [`MemberFields`] never contain a character
//! that would corrupt the EDM `ml_addr` line format (rule 3).

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::ids::{AddressId, CampaignId, CustomerId, LinkManId, ListId, RunId};

/// What a write-back record is about, the middle of its once-only key
/// (kind, scope, link-man): a campaign (opens, clicks, bounces) or a list
/// (a recipient's unsubscribe). Stored as the text `campaign:N` or
/// `list:N`, and read back from it at the state database's edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, sea_orm::DeriveValueType)]
#[sea_orm(value_type = "String")]
pub enum RecordScope {
    Campaign(CampaignId),
    List(ListId),
}

impl fmt::Display for RecordScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordScope::Campaign(id) => write!(f, "campaign:{id}"),
            RecordScope::List(id) => write!(f, "list:{id}"),
        }
    }
}

/// As its stored text (`"campaign:5"`), in JSON output too.
impl Serialize for RecordScope {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A stored scope that is neither `campaign:N` nor `list:N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a record scope (campaign:N or list:N): {0:?}")]
pub struct BadScope(String);

impl std::str::FromStr for RecordScope {
    type Err = BadScope;

    fn from_str(text: &str) -> Result<Self, BadScope> {
        let bad = || BadScope(text.to_string());
        let (kind, id) = text.split_once(':').ok_or_else(bad)?;
        let id: i64 = id.parse().map_err(|_| bad())?;
        match kind {
            "campaign" => Ok(RecordScope::Campaign(CampaignId(id))),
            "list" => Ok(RecordScope::List(ListId(id))),
            _ => Err(bad()),
        }
    }
}

/// Maximum length of a whole address (rule 2).
pub const MAX_EMAIL_LEN: usize = 254;
/// Maximum length of the local part (rule 2).
pub const MAX_LOCAL_LEN: usize = 64;
/// Number of EDM custom variables (`var1`…`var10`).
pub const VAR_COUNT: usize = 10;

/// Why a CRM email value was not accepted as a mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EmailError {
    #[error("empty address")]
    Empty,
    #[error("address longer than 254 characters")]
    TooLong,
    #[error("no single '@' separating local part and domain")]
    NoAt,
    #[error("local part longer than 64 characters")]
    LocalTooLong,
    #[error("local part is not a dot-atom of allowed ASCII characters")]
    BadLocal,
    #[error("domain is not two or more labels of letters, digits and inner hyphens")]
    BadDomain,
}

/// A normalised (trimmed, lowercased) and valid mailbox address. A boxed
/// `str` (16 bytes, not a `String`'s 24): a run holds two of them per
/// member of a million-member list.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Email(Box<str>);

impl Email {
    /// Normalises a CRM value (trim, ASCII lowercase) and validates it.
    ///
    /// Lowercasing is ASCII-only, so rule 2 holds on the CRM text as
    /// given: a non-ASCII letter whose Unicode lowercase is ASCII (the
    /// Kelvin sign `K`, say) stays non-ASCII and makes the address
    /// invalid instead of turning it into another, all-ASCII address.
    pub fn parse(raw: &str) -> Result<Self, EmailError> {
        let normalised = raw.trim().to_ascii_lowercase();
        validate_mailbox(&normalised)?;
        Ok(Email(normalised.into_boxed_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A form safe for info-level logs: first character of the local part
    /// and the domain, e.g. `z***@example.com`.
    pub fn masked(&self) -> String {
        mask_address(&self.0)
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Email {
    type Error = EmailError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Email::parse(&value)
    }
}

impl From<Email> for String {
    fn from(value: Email) -> Self {
        value.0.into_string()
    }
}

/// Masks any text that may be an address so that logs never carry it whole:
/// keeps the first character before `@` and everything after the last `@`.
pub fn mask_address(raw: &str) -> String {
    let raw = raw.trim();
    match raw.rsplit_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => {
            let first: String = raw.chars().take(1).collect();
            format!("{first}*** (no @)")
        }
    }
}

fn is_atext(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~-".contains(&c)
}

/// Rule 2: `local@domain`, at most 254 characters; `local` a dot-atom
/// (at most 64 characters); `domain` two or more labels of ASCII letters,
/// digits and inner hyphens.
fn validate_mailbox(addr: &str) -> Result<(), EmailError> {
    if addr.is_empty() {
        return Err(EmailError::Empty);
    }
    if addr.len() > MAX_EMAIL_LEN {
        return Err(EmailError::TooLong);
    }
    let (local, domain) = addr.split_once('@').ok_or(EmailError::NoAt)?;
    if domain.contains('@') {
        return Err(EmailError::NoAt);
    }
    if local.len() > MAX_LOCAL_LEN {
        return Err(EmailError::LocalTooLong);
    }
    let local_ok = !local.is_empty()
        && local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.bytes().all(is_atext));
    if !local_ok {
        return Err(EmailError::BadLocal);
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !domain_ok {
        return Err(EmailError::BadDomain);
    }
    Ok(())
}

/// Replaces each `;`, tab, CR or LF by one space (rule 3), and each
/// NUL too: PostgreSQL cannot store NUL in text and EDM's PHP would cut the
/// value there. Nothing else changes. Applied to fullname and every var
/// before anything is compared or sent, so the `ml_addr` line format stays
/// intact.
pub fn sanitize_field(value: &str) -> String {
    value
        .chars()
        .map(|c| if breaks_a_line(c) { ' ' } else { c })
        .collect()
}

/// A character [`sanitize_field`] replaces.
fn breaks_a_line(c: char) -> bool {
    matches!(c, ';' | '\t' | '\r' | '\n' | '\0')
}

/// The text form of a CRM scalar (rule 3): strings as they are, numbers
/// in decimal as JSON writes them, `true`/`false`, and `""` for null or
/// absent. Arrays and objects become their JSON text.
pub fn json_text(value: Option<&serde_json::Value>) -> String {
    match value {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// The member data the daemon keeps in step: fullname and `var1`…`var10`.
///
/// Held as one string, the eleven values joined by `\0`, because the daemon
/// keeps one of these per member two or three times over (desired, state,
/// plan): eleven `String`s were 264 bytes before any text, this is 16. `\0`
/// cannot occur in a value: [`sanitize_field`] replaces it, XML 1.0 cannot
/// carry it and PostgreSQL text cannot store it; [`MemberFields::raw`]
/// replaces it too, so the encoding is total.
#[derive(Clone, PartialEq, Eq)]
pub struct MemberFields {
    joined: Box<str>,
}

const SEP: char = '\0';

impl MemberFields {
    /// Builds fields from raw CRM texts, sanitising each one (rule 3:
    /// separators become spaces, nothing else changes).
    pub fn new<S: AsRef<str>>(fullname: &str, vars: &[S; VAR_COUNT]) -> Self {
        Self::join(
            std::iter::once(fullname).chain(vars.iter().map(AsRef::as_ref)),
            breaks_a_line,
        )
    }

    /// Whether every value equals `other`'s once white space at either end
    /// is set aside. EDM's answers pad values (and are read trimmed, see
    /// `edm::xml`), while the daemon sends CRM values as they are: compared
    /// this way a CRM name with a leading or trailing space never looks
    /// drifted, and a `--full` rerun over padded answers edits nothing.
    pub fn same_values(&self, other: &MemberFields) -> bool {
        self.values()
            .map(str::trim)
            .eq(other.values().map(str::trim))
    }

    /// The names of the values that differ from `other`'s (`fullname`,
    /// `var1`…`var10`), white space at either end set aside.
    pub fn changed_from(&self, other: &MemberFields) -> Vec<String> {
        self.values()
            .zip(other.values())
            .enumerate()
            .filter(|(_, (a, b))| a.trim() != b.trim())
            .map(|(i, _)| match i {
                0 => "fullname".to_string(),
                i => format!("var{i}"),
            })
            .collect()
    }

    /// A fullname and empty variables.
    pub fn named(fullname: &str) -> Self {
        Self::new::<&str>(fullname, &[""; VAR_COUNT])
    }

    /// Fields as another system holds them (EDM, the state DB): kept as
    /// they are, so a difference from the CRM's is seen, except `\0`.
    pub fn raw<S: AsRef<str>>(fullname: &str, vars: &[S; VAR_COUNT]) -> Self {
        Self::join(
            std::iter::once(fullname).chain(vars.iter().map(AsRef::as_ref)),
            |c| c == SEP,
        )
    }

    fn join<'a>(values: impl Iterator<Item = &'a str>, replaced: impl Fn(char) -> bool) -> Self {
        let mut joined = String::new();
        for (i, value) in values.enumerate() {
            if i > 0 {
                joined.push(SEP);
            }
            joined.extend(value.chars().map(|c| if replaced(c) { ' ' } else { c }));
        }
        MemberFields {
            joined: joined.into_boxed_str(),
        }
    }

    pub fn fullname(&self) -> &str {
        self.values().next().unwrap_or("")
    }

    /// `var1`…`var10`, always [`VAR_COUNT`] of them.
    pub fn vars(&self) -> impl Iterator<Item = &str> {
        self.values().skip(1)
    }

    /// `var{i + 1}`.
    pub fn var(&self, i: usize) -> &str {
        self.vars().nth(i).unwrap_or("")
    }

    /// A copy with `var{i + 1}` set to `value` (sanitised).
    pub fn with_var(&self, i: usize, value: &str) -> Self {
        let mut vars: [String; VAR_COUNT] = Default::default();
        for (slot, v) in vars.iter_mut().zip(self.vars()) {
            *slot = v.to_string();
        }
        vars[i] = value.to_string();
        Self::new(self.fullname(), &vars)
    }

    fn values(&self) -> std::str::Split<'_, char> {
        self.joined.split(SEP)
    }

    /// One `ml_addr` line: `email;fullname;var1;…;var10;`.
    pub fn ml_addr_line(&self, email: &Email) -> String {
        let mut line = String::with_capacity(email.as_str().len() + self.joined.len() + 2);
        line.push_str(email.as_str());
        line.push(';');
        line.extend(self.joined.chars().map(|c| if c == SEP { ';' } else { c }));
        line.push(';');
        line
    }
}

impl Default for MemberFields {
    fn default() -> Self {
        Self::named("")
    }
}

impl fmt::Debug for MemberFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemberFields")
            .field("fullname", &self.fullname())
            .field("vars", &self.vars().collect::<Vec<_>>())
            .finish()
    }
}

/// The key of an EDM member (rule 1).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MemberKey {
    pub list_id: ListId,
    pub email: Email,
}

impl MemberKey {
    pub fn new(list_id: ListId, email: Email) -> Self {
        MemberKey { list_id, email }
    }
}

impl fmt::Display for MemberKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "list {} {}", self.list_id, self.email.masked())
    }
}

/// How a member came to be in the state DB.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, sea_orm::EnumIter, sea_orm::DeriveActiveEnum, Serialize,
)]
#[serde(rename_all = "snake_case")]
#[sea_orm(
    rs_type = "String",
    db_type = "String(sea_orm::sea_query::StringLen::None)"
)]
pub enum Origin {
    /// The daemon added it: it may unsubscribe it.
    #[sea_orm(string_value = "owned")]
    Owned,
    /// It was in the list and is a desired member: kept in step, never
    /// unsubscribed.
    #[sea_orm(string_value = "adopted")]
    Adopted,
    /// It was in the list and matches no desired member: left alone.
    #[sea_orm(string_value = "foreign")]
    Foreign,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Owned => "owned",
            Origin::Adopted => "adopted",
            Origin::Foreign => "foreign",
        }
    }
}

/// One member as the state DB knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberState {
    pub key: MemberKey,
    pub origin: Origin,
    /// EDM holds it now (as far as the daemon knows).
    pub present: bool,
    /// The daemon's `ml-unsub` of it took effect and the daemon has not
    /// added it since: EDM holding it again is a consent risk (the drift
    /// report's `reactivated`), not a member to take back.
    pub unsubscribed: bool,
    pub link_man_id: Option<LinkManId>,
    pub customer_id: Option<CustomerId>,
    pub edm_id: Option<crate::domain::AddressId>,
    /// What EDM holds.
    pub fields: MemberFields,
}

impl MemberState {
    /// The member once the daemon's `ml-unsub` of it took effect: EDM no
    /// longer holds it (nor its id), and it is marked as the daemon's
    /// unsubscribe.
    pub fn unsubscribed_by_the_daemon(&self) -> MemberState {
        MemberState {
            present: false,
            unsubscribed: true,
            edm_id: None,
            ..self.clone()
        }
    }
}

/// What the state DB knows the lists hold, by key.
///
/// Not a `HashMap`: at a million members a hash table's slack (it doubles
/// past 87.5 % full, to two million slots) and the key stored beside a
/// value that holds it already cost hundreds of megabytes. The members a
/// run loads sit in one `Vec` sorted by key (found by binary search);
/// those a run learns or adds go into a small map beside it, merged into
/// the `Vec` whenever the map reaches an eighth of it, so neither part
/// carries a large table.
///
/// A contacts run also marks here which members its pull wants exactly as
/// recorded ([`Members::want_as_is`]), so that the pull need not keep a
/// copy of them: see [`WantedAsIs`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Members {
    sorted: Vec<MemberState>,
    later: std::collections::HashMap<MemberKey, MemberState>,
    /// One bit per member of `sorted`: wanted as recorded. Empty until a
    /// pull marks some.
    as_is: Vec<u64>,
    /// Members that were wanted as recorded and have since been replaced
    /// (the read phase learnt something about them): the pull's wish for
    /// them is their record as it was, handed back by
    /// [`Members::take_reopened`].
    reopened: Vec<MemberState>,
    /// Changes whenever a member moves in `sorted`: positions handed out
    /// by [`Members::position`] are only good while it stays the same.
    generation: u64,
}

/// Which recorded members a pull wants exactly as they are recorded (the
/// same owner and the same texts, EDM holding them): positions in the
/// members' sorted part, good for the generation they were taken in.
///
/// A no-change rerun's pull would otherwise hold a second image of every
/// member (a candidate with its own copy of the address and the fields):
/// 150 MB at a million link-men. With this, it holds one bit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WantedAsIs {
    positions: Vec<u32>,
    generation: u64,
}

impl WantedAsIs {
    pub fn new(mut positions: Vec<u32>, generation: u64) -> Self {
        positions.sort_unstable();
        positions.dedup();
        WantedAsIs {
            positions,
            generation,
        }
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
}

/// [`Members::want_as_is`] was handed positions taken before the members
/// changed: a defect of the caller, reported instead of marking the
/// wrong members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the members changed between the pull and its marking of unchanged members (generation {taken} vs {now})"
)]
pub struct StalePositions {
    pub taken: u64,
    pub now: u64,
}

impl Members {
    /// Members read from the state DB, in any order, sorted in place (an
    /// unstable sort: a stable one would take a buffer half the size of
    /// the rows, 50 MB at a million). Two rows with one key cannot come
    /// from the state DB (its key is unique and every address is written
    /// normalised); should they, the one EDM holds is kept, and that is
    /// logged.
    pub fn from_rows(mut rows: Vec<MemberState>) -> Self {
        rows.sort_unstable_by(|a, b| (&a.key, !a.present).cmp(&(&b.key, !b.present)));
        rows.dedup_by(|later, first| {
            let same = later.key == first.key;
            if same {
                tracing::warn!(
                    list_id = first.key.list_id.0,
                    address = %first.key.email.masked(),
                    "two member rows with one address; the one EDM holds is kept"
                );
            }
            same
        });
        Members {
            sorted: rows,
            ..Default::default()
        }
    }

    fn search(&self, key: &MemberKey) -> Result<usize, usize> {
        self.sorted.binary_search_by(|m| m.key.cmp(key))
    }

    /// Where `key`'s member sits, for a [`WantedAsIs`], and the member.
    /// `None` when it is not recorded or was learnt during this run.
    pub fn position(&self, key: &MemberKey) -> Option<(u32, &MemberState)> {
        let at = self.search(key).ok()?;
        Some((u32::try_from(at).ok()?, self.sorted.get(at)?))
    }

    /// The members read from the state DB, with their positions.
    pub fn recorded(&self) -> impl Iterator<Item = (u32, &MemberState)> {
        (0u32..).zip(self.sorted.iter())
    }

    /// The member at a position [`Members::position`] gave.
    pub fn at(&self, position: u32) -> Option<&MemberState> {
        self.sorted.get(position as usize)
    }

    /// What positions handed out now are good for.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Marks the members a pull wants as recorded.
    pub fn want_as_is(&mut self, wanted: WantedAsIs) -> Result<(), StalePositions> {
        if wanted.generation != self.generation {
            return Err(StalePositions {
                taken: wanted.generation,
                now: self.generation,
            });
        }
        self.as_is = vec![0; self.sorted.len().div_ceil(64)];
        for at in wanted.positions {
            self.set_as_is(at as usize, true);
        }
        Ok(())
    }

    fn is_as_is(&self, at: usize) -> bool {
        self.as_is
            .get(at / 64)
            .is_some_and(|word| word & (1 << (at % 64)) != 0)
    }

    fn set_as_is(&mut self, at: usize, on: bool) {
        if let Some(word) = self.as_is.get_mut(at / 64) {
            if on {
                *word |= 1 << (at % 64);
            } else {
                *word &= !(1 << (at % 64));
            }
        }
    }

    /// Whether this run's pull wants `key`'s member exactly as recorded.
    pub fn wanted_as_is(&self, key: &MemberKey) -> bool {
        self.search(key).is_ok_and(|at| self.is_as_is(at))
    }

    /// How many members the pull wants exactly as recorded.
    pub fn wanted_as_is_count(&self) -> usize {
        self.as_is.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Every member with whether the pull wants it as recorded, in no
    /// particular order.
    pub fn values_as_is(&self) -> impl Iterator<Item = (&MemberState, bool)> {
        let sorted = self
            .sorted
            .iter()
            .enumerate()
            .map(|(at, m)| (m, self.is_as_is(at)));
        sorted.chain(self.later.values().map(|m| (m, false)))
    }

    /// The records of members that were wanted as recorded and have been
    /// replaced since: the pull's wish for each is that record.
    pub fn take_reopened(&mut self) -> Vec<MemberState> {
        std::mem::take(&mut self.reopened)
    }

    pub fn get(&self, key: &MemberKey) -> Option<&MemberState> {
        match self.search(key) {
            Ok(at) => self.sorted.get(at),
            Err(_) => self.later.get(key),
        }
    }

    pub fn contains_key(&self, key: &MemberKey) -> bool {
        self.get(key).is_some()
    }

    /// Puts `member` under `key` (its own key); returns what was there.
    ///
    /// Replacing a member the pull wanted as recorded reopens it: its old
    /// record goes to [`Members::take_reopened`], so the plan compares
    /// what the pull wanted with what is now known, as if the pull had
    /// kept its own copy.
    pub fn insert(&mut self, key: MemberKey, member: MemberState) -> Option<MemberState> {
        if let Ok(at) = self.search(&key)
            && let Some(slot) = self.sorted.get_mut(at)
        {
            let old = std::mem::replace(slot, member);
            if self.is_as_is(at) {
                self.set_as_is(at, false);
                self.reopened.push(old.clone());
            }
            return Some(old);
        }
        let old = self.later.insert(key, member);
        if self.later.len() > (self.sorted.len() / 8).max(4096) {
            self.merge();
        }
        old
    }

    /// Moves the map's members into the sorted `Vec`, in place and in
    /// linear time: the `Vec` grows by exactly their number (no doubling
    /// slack), and the two sorted runs are merged from the back, so no
    /// buffer the size of the `Vec` is needed (a stable sort would take
    /// half of it again: 50 MB at a million members).
    fn merge(&mut self) {
        let mut learnt: Vec<MemberState> = self.later.drain().map(|(_, m)| m).collect();
        self.later.shrink_to_fit();
        learnt.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        let Some(filler) = learnt.first().cloned() else {
            return;
        };
        let old = self.sorted.len();
        self.generation += 1;
        self.sorted.reserve_exact(learnt.len());
        self.sorted.resize(old + learnt.len(), filler);
        if !self.as_is.is_empty() {
            self.as_is.resize(self.sorted.len().div_ceil(64), 0);
        }
        // Slots past `i` and up to `k` hold fillers; past `k`, the result.
        let (mut i, mut j) = (old, learnt.len());
        while j > 0 {
            let k = i + j - 1;
            let take_old =
                i > 0 && self.sorted.get(i - 1).map(|m| &m.key) > learnt.get(j - 1).map(|m| &m.key);
            if take_old {
                self.sorted.swap(i - 1, k);
                let as_is = self.is_as_is(i - 1);
                self.set_as_is(k, as_is);
                i -= 1;
            } else {
                if let (Some(slot), Some(m)) = (self.sorted.get_mut(k), learnt.get_mut(j - 1)) {
                    std::mem::swap(slot, m);
                }
                self.set_as_is(k, false);
                j -= 1;
            }
        }
    }

    /// How many members of `list_id` EDM holds, as far as is known.
    pub fn present_in(&self, list_id: ListId) -> usize {
        self.values()
            .filter(|m| m.key.list_id == list_id && m.present)
            .count()
    }

    pub fn len(&self) -> usize {
        self.sorted.len() + self.later.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every member, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &MemberState> {
        self.sorted.iter().chain(self.later.values())
    }

    /// Every member with its key, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&MemberKey, &MemberState)> {
        self.values().map(|m| (&m.key, m))
    }
}

impl std::ops::Index<&MemberKey> for Members {
    type Output = MemberState;
    fn index(&self, key: &MemberKey) -> &MemberState {
        self.get(key).expect("a member with this key")
    }
}

impl FromIterator<(MemberKey, MemberState)> for Members {
    fn from_iter<I: IntoIterator<Item = (MemberKey, MemberState)>>(iter: I) -> Self {
        Members::from_rows(iter.into_iter().map(|(_, m)| m).collect())
    }
}

/// The suppressions in force.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Suppressions {
    /// User unsubscribes: no operation of any kind for these keys.
    pub user: HashSet<MemberKey>,
    /// Hard bounces: in every list, never added or edited; unsubscribed
    /// where owned.
    pub bounced: HashSet<Email>,
    /// Addresses `forget` took out: never added again.
    pub forgotten: Forgotten,
}

/// How a forgotten address is stored: this prefix, then the hex of its
/// HMAC-SHA-256 under the database's own key. Not a valid address, so no
/// code that reads addresses mistakes it for one.
pub const FORGOTTEN_PREFIX: &str = "forgotten:";

/// The addresses `forget` replaced by their keyed hash, and the key: an
/// address is recognised without being stored.
#[derive(Clone, Default, PartialEq)]
pub struct Forgotten {
    key: Vec<u8>,
    hashes: HashSet<String>,
}

impl Forgotten {
    pub fn new(key: Vec<u8>, hashes: HashSet<String>) -> Self {
        Forgotten { key, hashes }
    }

    /// What `email` (normalised) is stored as once forgotten.
    pub fn hash(&self, email: &str) -> String {
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key)
            .expect("HMAC takes a key of any length");
        mac.update(email.as_bytes());
        format!(
            "{FORGOTTEN_PREFIX}{}",
            hex::encode(mac.finalize().into_bytes())
        )
    }

    /// Whether `email` was forgotten (no hashing when none was).
    pub fn contains(&self, email: &str) -> bool {
        !self.hashes.is_empty() && self.hashes.contains(&self.hash(email))
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }
}

impl fmt::Debug for Forgotten {
    /// Never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forgotten")
            .field("addresses", &self.hashes.len())
            .finish()
    }
}

impl Suppressions {
    /// Whether `key` may get no add or edit (a user unsubscribe, or a
    /// hard bounce in any list).
    pub fn blocks_writes(&self, key: &MemberKey) -> bool {
        self.user.contains(key) || self.bounced.contains(&key.email)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(list: i64, email: &str, name: &str) -> MemberState {
        MemberState {
            key: MemberKey::new(ListId(list), Email::parse(email).unwrap()),
            origin: Origin::Owned,
            present: true,
            unsubscribed: false,
            link_man_id: None,
            customer_id: None,
            edm_id: None,
            fields: MemberFields::named(name),
        }
    }

    #[test]
    fn members_are_found_and_replaced_by_key_across_the_merge_of_those_learnt_later() {
        // Arrange: 3 members loaded (one key twice: the present row stays),
        // then 10 000 learnt one by one, enough to be merged into the
        // sorted part at least once, and one loaded member replaced.
        let mut gone = member(2, "b@x.cn", "B gone");
        gone.present = false;
        let mut members = Members::from_rows(vec![
            member(2, "b@x.cn", "B"),
            member(1, "z@x.cn", "Z"),
            gone,
            member(1, "a@x.cn", "A"),
        ]);
        for k in 0..10_000 {
            let m = member(1 + k % 2, &format!("n{k}@x.cn"), "N");
            assert!(members.insert(m.key.clone(), m).is_none());
        }
        let renamed = member(1, "z@x.cn", "Z2");
        let replaced = members.insert(renamed.key.clone(), renamed);
        let learnt_again = member(2, "n9999@x.cn", "N2");
        let replaced_learnt = members.insert(learnt_again.key.clone(), learnt_again);

        // Act
        let key = |list, email| MemberKey::new(ListId(list), Email::parse(email).unwrap());
        let found = |list, email| members.get(&key(list, email)).map(|m| m.fields.fullname());

        // Assert
        assert_eq!(members.len(), 3 + 10_000);
        assert_eq!(members.values().count(), members.len());
        assert_eq!(found(2, "b@x.cn"), Some("B"));
        assert_eq!(found(1, "a@x.cn"), Some("A"));
        assert_eq!(found(1, "z@x.cn"), Some("Z2"));
        assert_eq!(replaced.unwrap().fields.fullname(), "Z");
        assert_eq!(replaced_learnt.unwrap().fields.fullname(), "N");
        assert_eq!(found(2, "n9999@x.cn"), Some("N2"));
        assert_eq!(found(1, "n0@x.cn"), Some("N"));
        assert_eq!(found(2, "n0@x.cn"), None, "n0 was learnt in list 1 only");
        assert!(members.later.len() < 4097, "the learnt were merged");
        assert!(
            members.sorted.windows(2).all(|w| w[0].key < w[1].key),
            "the merged part is sorted, each key once"
        );
        assert!(members.sorted.len() > 4096);
    }

    /// Members a..e loaded, and the positions of `wanted` among them.
    fn five_with_wanted(wanted: &[&str]) -> (Members, WantedAsIs) {
        let members = Members::from_rows(
            ["e", "a", "c", "b", "d"]
                .iter()
                .map(|n| member(1, &format!("{n}@x.cn"), n))
                .collect(),
        );
        let positions = wanted
            .iter()
            .map(|n| {
                let key = MemberKey::new(ListId(1), Email::parse(&format!("{n}@x.cn")).unwrap());
                members.position(&key).unwrap().0
            })
            .collect();
        let generation = members.generation();
        (members, WantedAsIs::new(positions, generation))
    }

    fn key1(n: &str) -> MemberKey {
        MemberKey::new(ListId(1), Email::parse(&format!("{n}@x.cn")).unwrap())
    }

    #[test]
    fn replacing_a_member_wanted_as_recorded_hands_its_record_back() {
        // Arrange: b and d are wanted as recorded.
        let (mut members, wanted) = five_with_wanted(&["b", "d"]);
        members.want_as_is(wanted).unwrap();

        // Act: the read phase learns that b left EDM, and that c (not
        // wanted as recorded) was renamed.
        let mut gone = member(1, "b@x.cn", "b");
        gone.present = false;
        members.insert(gone.key.clone(), gone);
        members.insert(key1("c"), member(1, "c@x.cn", "C"));

        // Assert: b's record as the pull saw it comes back, once; d stays
        // wanted as recorded.
        let reopened = members.take_reopened();
        assert_eq!(reopened, vec![member(1, "b@x.cn", "b")]);
        assert!(members.take_reopened().is_empty());
        assert!(!members.wanted_as_is(&key1("b")));
        assert!(members.wanted_as_is(&key1("d")));
        assert!(!members.wanted_as_is(&key1("c")));
        assert_eq!(members.wanted_as_is_count(), 1);
    }

    #[test]
    fn members_wanted_as_recorded_stay_marked_through_a_merge_of_those_learnt_later() {
        // Arrange: a and e are wanted as recorded.
        let (mut members, wanted) = five_with_wanted(&["a", "e"]);
        members.want_as_is(wanted).unwrap();

        // Act: 5 000 addresses learnt, sorting before, between and after
        // them, so the merge moves every loaded member.
        for k in 0..5_000 {
            let m = member(1, &format!("{}{k}@x.cn", ["0", "b", "f"][k % 3]), "N");
            members.insert(m.key.clone(), m);
        }

        // Assert: merged, and the marks moved with their members only.
        assert!(members.later.len() < 4097, "the learnt were merged");
        assert!(members.generation() > 0);
        assert!(members.wanted_as_is(&key1("a")));
        assert!(members.wanted_as_is(&key1("e")));
        assert_eq!(members.wanted_as_is_count(), 2);
        let marked: Vec<&str> = members
            .values_as_is()
            .filter(|(_, as_is)| *as_is)
            .map(|(m, _)| m.fields.fullname())
            .collect();
        assert_eq!(marked.len(), 2);
        assert!(marked.contains(&"a") && marked.contains(&"e"));
    }

    #[test]
    fn positions_taken_before_the_members_moved_are_refused() {
        // Arrange: positions taken, then enough learnt to merge.
        let (mut members, wanted) = five_with_wanted(&["a"]);
        for k in 0..5_000 {
            let m = member(1, &format!("0{k}@x.cn"), "N");
            members.insert(m.key.clone(), m);
        }

        // Act
        let refused = members.want_as_is(wanted);

        // Assert: nothing is marked on the wrong member.
        assert!(refused.is_err());
        assert_eq!(members.wanted_as_is_count(), 0);
    }

    #[test]
    fn a_record_scope_is_stored_as_campaign_or_list_and_read_back() {
        for scope in [
            RecordScope::Campaign(CampaignId(5)),
            RecordScope::List(ListId(12)),
        ] {
            assert_eq!(scope.to_string().parse::<RecordScope>(), Ok(scope));
        }
        assert_eq!(
            RecordScope::Campaign(CampaignId(5)).to_string(),
            "campaign:5"
        );
        for bad in ["campaign", "campaign:x", "task:5", "", "list:"] {
            assert!(bad.parse::<RecordScope>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn email_is_trimmed_and_lowercased() {
        let email = Email::parse("  Zhang.San@Example.COM ").unwrap();
        assert_eq!(email.as_str(), "zhang.san@example.com");
    }

    #[test]
    fn a_non_ascii_letter_whose_lowercase_is_ascii_makes_the_address_invalid() {
        // U+212A KELVIN SIGN lowercases (Unicode) to ASCII `k`; U+0130
        // LATIN CAPITAL LETTER I WITH DOT ABOVE to `i` + a combining dot.
        for raw in [
            "\u{212A}ing@example.com",
            "user@\u{212A}.example.com",
            "\u{130}@example.com",
        ] {
            // Act
            let parsed = Email::parse(raw);

            // Assert
            assert!(parsed.is_err(), "{raw:?} was accepted as {parsed:?}");
        }
        assert_eq!(
            Email::parse("  KING@Example.COM ").unwrap().as_str(),
            "king@example.com"
        );
    }

    #[test]
    fn valid_and_invalid_mailboxes_follow_rule_2() {
        let cases: &[(&str, bool)] = &[
            ("a@b.cn", true),
            ("first.last@example.com", true),
            ("x!#$%&'*+/=?^_`{|}~-@example.com", true),
            ("user@sub-domain.example.co", true),
            ("1@2.3", true),
            ("", false),
            ("plain", false),
            ("@example.com", false),
            ("user@", false),
            ("user@localhost", false),
            ("a@@b.com", false),
            ("a@b@c.com", false),
            (".a@b.com", false),
            ("a.@b.com", false),
            ("a..b@c.com", false),
            ("\"quoted\"@example.com", false),
            ("a b@c.com", false),
            ("a;b@c.com", false),
            ("a,b@c.com", false),
            ("a@b.com;c@d.com", false),
            ("张三@example.com", false),
            ("a@例子.cn", false),
            ("a@-b.com", false),
            ("a@b-.com", false),
            ("a@b..com", false),
            ("a@.b.com", false),
            ("a@b.com.", false),
            ("a@b_c.com", false),
            ("a(comment)@b.com", false),
            ("a@[127.0.0.1]", false),
            ("o'brien@example.ie", true),
            ("user+tag@example.com", true),
            ("_@example.com", true),
            ("a@b.c-d.e", true),
            ("a@123.45", true),
            ("a\u{0}b@example.com", false),
            ("a@b.com\u{0}", false),
            ("a\tb@example.com", false),
            ("a\nb@example.com", false),
            ("a@b\n.com", false),
            ("<a@b.com>", false),
            ("Name <a@b.com>", false),
            ("a@b.com,c@d.com", false),
            ("a@ b.com", false),
            ("\"a b\"@example.com", false),
            ("a\\b@example.com", false),
            ("a\"b@example.com", false),
            ("ｆｕｌｌ@example.com", false),
            ("a@exämple.com", false),
            ("a@xn--exmple-cua.com", true),
            ("a@b.com.cn", true),
            ("@", false),
            ("a@.", false),
            (".@b.com", false),
        ];
        for (raw, ok) in cases {
            assert_eq!(Email::parse(raw).is_ok(), *ok, "{raw:?}");
        }
    }

    #[test]
    fn length_limits_are_64_local_and_254_total() {
        let local64 = "a".repeat(64);
        assert!(Email::parse(&format!("{local64}@b.cn")).is_ok());
        assert_eq!(
            Email::parse(&format!("{local64}a@b.cn")),
            Err(EmailError::LocalTooLong)
        );
        let label = "d".repeat(60);
        let long_domain = format!("{label}.{label}.{label}.{label}.cn"); // 247 chars
        let at_limit = format!("{}@{long_domain}", "a".repeat(254 - 1 - long_domain.len()));
        assert_eq!(at_limit.len(), 254);
        assert!(Email::parse(&at_limit).is_ok());
        assert_eq!(
            Email::parse(&format!("a{at_limit}")),
            Err(EmailError::TooLong)
        );
    }

    #[test]
    fn sanitize_replaces_separators_and_nothing_else() {
        assert_eq!(sanitize_field("a;b\tc\rd\ne"), "a b c d e");
        assert_eq!(sanitize_field("张三, <x> & \"y\""), "张三, <x> & \"y\"");
        assert_eq!(sanitize_field("\r\n"), "  ");
        assert_eq!(sanitize_field("a\0b"), "a b");
    }

    #[test]
    fn json_text_writes_scalars_as_json_does() {
        use serde_json::json;
        assert_eq!(json_text(Some(&json!("x"))), "x");
        assert_eq!(json_text(Some(&json!(42))), "42");
        assert_eq!(json_text(Some(&json!(2.5))), "2.5");
        assert_eq!(json_text(Some(&json!(true))), "true");
        assert_eq!(json_text(Some(&json!(null))), "");
        assert_eq!(json_text(None), "");
    }

    #[test]
    fn ml_addr_line_has_twelve_semicolon_terminated_fields() {
        let email = Email::parse("a@b.cn").unwrap();
        let mut vars: [String; VAR_COUNT] = Default::default();
        vars[0] = "v;1".into();
        let fields = MemberFields::new("张 三;", &vars);
        assert_eq!(fields.ml_addr_line(&email), "a@b.cn;张 三 ;v 1;;;;;;;;;;");
        assert_eq!(fields.ml_addr_line(&email).matches(';').count(), 12);
    }

    #[test]
    fn fields_read_back_as_they_were_built() {
        // Arrange
        let vars: [String; VAR_COUNT] = std::array::from_fn(|i| format!("v{i}"));

        // Act
        let fields = MemberFields::new("张三", &vars);

        // Assert
        assert_eq!(fields.fullname(), "张三");
        assert_eq!(fields.vars().collect::<Vec<_>>(), vars);
        assert_eq!(fields.var(9), "v9");
        assert_eq!(MemberFields::default().vars().count(), VAR_COUNT);
        assert_eq!(MemberFields::named("x").var(0), "");
    }

    #[test]
    fn raw_fields_keep_separators_that_new_fields_sanitise() {
        let vars: [&str; VAR_COUNT] = ["a;b", "c\nd", "", "", "", "", "", "", "", "e\0f"];
        let raw = MemberFields::raw("n;m", &vars);
        assert_eq!(raw.fullname(), "n;m");
        assert_eq!(raw.var(0), "a;b");
        assert_eq!(raw.var(1), "c\nd");
        assert_eq!(raw.var(9), "e f", "NUL is the one character not kept");
        let clean = MemberFields::new("n;m", &vars);
        assert_eq!(clean.fullname(), "n m");
        assert_eq!(clean.var(0), "a b");
        assert_ne!(
            raw, clean,
            "a raw EDM value differs from the CRM's sanitised one"
        );
    }

    /// EDM's padded answers are read trimmed; the CRM's values are sent as
    /// they are: the two are the same values when only white space at
    /// either end differs.
    #[test]
    fn fields_that_differ_only_in_outer_white_space_are_the_same_values() {
        let vars: [&str; VAR_COUNT] = [" 北京 ", "\ta", "", "", "", "", "", "", "", "x  y"];
        let sent = MemberFields::new("  王小明\r\n", &vars);
        let read = MemberFields::raw("王小明", &["北京", "a", "", "", "", "", "", "", "", "x  y"]);
        assert_eq!(sent.fullname(), "  王小明  ", "sent as the CRM has it");
        assert!(sent.same_values(&read) && read.same_values(&sent));
        let inner = MemberFields::raw("王小明", &["北京", "a", "", "", "", "", "", "", "", "x y"]);
        assert!(!sent.same_values(&inner), "inner spaces count");
    }

    #[test]
    fn with_var_replaces_one_variable() {
        let fields = MemberFields::named("a").with_var(VAR_COUNT - 1, "z;");
        assert_eq!(fields.fullname(), "a");
        assert_eq!(fields.var(VAR_COUNT - 1), "z ");
        assert_eq!(fields.var(0), "");
    }

    #[test]
    fn masked_address_hides_the_local_part() {
        let email = Email::parse("secret.person@example.com").unwrap();
        assert_eq!(email.masked(), "s***@example.com");
        assert!(!email.masked().contains("secret"));
    }
}
