//! The fake bestedm user API: `/mm-ms/api/{script}.php?do=…`, username and
//! MD5 password checked in the query string, XML answers shaped like the
//! documents. Adds are naive on purpose — an address added twice is held
//! twice — so a duplicate add shows in the list, not only in the log.
//!
//! Why one file over 600 lines: one handler arm per documented EDM
//! operation, writing XML the way the documents print it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;

use super::{After, Before, Server, Shared, before, finish, lock, params};

/// One address a fake list holds.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxAddress {
    pub id: i64,
    pub address: String,
    pub fullname: String,
    pub vars: [String; 10],
    pub time: String,
}

#[derive(Debug, Default)]
struct FakeList {
    subject: String,
    /// In the order added, which is ascending id order (ids only grow and
    /// removals keep the order): an address is found by id with a binary
    /// search and a page is a slice, so a request costs the same however
    /// many addresses the list holds.
    addrs: Vec<SandboxAddress>,
    /// `(time, email)` lines of `unsubscribe-export`.
    unsubs: Vec<(String, String)>,
}

impl FakeList {
    fn position(&self, id: i64) -> Option<usize> {
        self.addrs.binary_search_by_key(&id, |a| a.id).ok()
    }
}

/// A campaign of the fake EDM, with what its recipients did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SandboxCampaign {
    pub id: i64,
    pub sn: String,
    pub name: String,
    pub list_id: i64,
    /// `YYYY-MM-DD`: the date `task-list` lists it under and its send date.
    pub date: String,
    /// 1 waiting, 2 sending, 3 done, negative: held.
    pub send_status: i32,
    /// 0 off, 1 opens, 2 opens and clicks.
    pub track_status: i32,
    /// `(email, open_total, open_first, open_last)`.
    pub opens: Vec<(String, u64, String, String)>,
    /// `(email, link, click_total, click_first, click_last)`.
    pub clicks: Vec<(String, String, u64, String, String)>,
    /// `(failexport type, email)`.
    pub bounces: Vec<(String, String)>,
}

#[derive(Debug, Default)]
struct EdmData {
    lists: BTreeMap<i64, FakeList>,
    campaigns: BTreeMap<i64, SandboxCampaign>,
    next_id: i64,
    /// A logical clock, one second a tick from 2026-01-01, so that export
    /// lines written in one real second still differ.
    clock: i64,
    /// Addresses (lowercase) whose presence makes an `ml-addr-add`,
    /// `ml-unsub` or `ml-addr-edit` refuse the whole request with
    /// `(code, message)`, applying nothing: a poison record.
    refused: BTreeMap<String, (String, String)>,
    /// `service-info`: (status, expiration date, sends left); `None` is
    /// the default: enabled, 2099-12-31, 1 000 000.
    service: Option<(String, String, i64)>,
    /// The reseller's own sends left to give (`add-count` takes from it);
    /// `None`: ten million.
    reseller_pool: Option<i64>,
    /// Every `add-count` carried out: (customer, count, remark).
    top_ups: Vec<(String, i64, String)>,
}

impl EdmData {
    fn tick(&mut self) -> String {
        self.clock += 1;
        let base = chrono::NaiveDate::from_ymd_opt(2026, 1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .unwrap_or_default();
        (base + chrono::Duration::seconds(self.clock))
            .format("%Y-%m-%d %H:%M:%S")
            .to_string()
    }

    fn push(&mut self, list_id: i64, address: &str, fullname: &str, vars: [String; 10]) -> i64 {
        self.next_id += 1;
        let id = self.next_id;
        let time = self.tick();
        if let Some(list) = self.lists.get_mut(&list_id) {
            list.addrs.push(SandboxAddress {
                id,
                address: address.to_string(),
                fullname: fullname.to_string(),
                vars,
                time,
            });
        }
        id
    }

    /// The address with this id, in whichever list holds it.
    fn find_mut(&mut self, id: i64) -> Option<&mut SandboxAddress> {
        self.lists.values_mut().find_map(|list| {
            let at = list.position(id)?;
            list.addrs.get_mut(at)
        })
    }

    fn delete(&mut self, id: i64) {
        for list in self.lists.values_mut() {
            if let Some(at) = list.position(id) {
                list.addrs.remove(at);
            }
        }
    }

    fn unsubscribe(&mut self, list_id: i64, address: &str) -> bool {
        let time = self.tick();
        let wanted = address.trim().to_lowercase();
        let Some(list) = self.lists.get_mut(&list_id) else {
            return false;
        };
        let before = list.addrs.len();
        list.addrs.retain(|a| a.address.to_lowercase() != wanted);
        list.unsubs.push((time, wanted));
        list.addrs.len() != before
    }
}

/// Seeds, mutates and reads the fake EDM.
#[derive(Clone, Debug)]
pub struct EdmHandle {
    data: Arc<Mutex<EdmData>>,
    shared: Arc<Shared>,
    /// Write text as escaped characters (`&amp;`, `&lt;`) instead of CDATA.
    escaped_text: Arc<std::sync::atomic::AtomicBool>,
    /// Requests whose query string or body carried a `password`.
    with_password: Arc<std::sync::atomic::AtomicUsize>,
    /// gzip answers for clients that accept it.
    compress: Arc<std::sync::atomic::AtomicBool>,
    /// Requests that said they accept gzip.
    gzip_accepted: Arc<std::sync::atomic::AtomicUsize>,
}

impl EdmHandle {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        EdmHandle {
            data: Arc::new(Mutex::new(EdmData::default())),
            shared,
            escaped_text: Arc::default(),
            with_password: Arc::default(),
            compress: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            gzip_accepted: Arc::default(),
        }
    }

    /// How many requests carried a `password` parameter (query or body):
    /// none should with `edm.auth = "basic"`.
    pub fn requests_with_a_password(&self) -> usize {
        self.with_password.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// From now on, answers carry text escaped with entity references, as
    /// the seed document's examples do, rather than in CDATA sections (docs/remote-apis.md
    /// allows both).
    pub fn escape_text(&self, on: bool) {
        self.escaped_text
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// From now on, any add, unsubscribe or edit request carrying
    /// `address` is refused whole with the error `code` and `message`
    /// (nothing in it is applied), as EDM refuses a batch without saying
    /// which line it objects to.
    pub fn refuse_address(&self, address: &str, code: &str, message: &str) {
        lock(&self.data).refused.insert(
            address.to_lowercase(),
            (code.to_string(), message.to_string()),
        );
    }

    /// Takes back [`refuse_address`](Self::refuse_address).
    pub fn accept_address(&self, address: &str) {
        lock(&self.data).refused.remove(&address.to_lowercase());
    }

    /// Creates an empty list.
    /// What `service-info` answers: `service_status`, `expiration_date`
    /// (`YYYY-MM-DD`) and `qty_available`.
    pub fn set_service(&self, status: &str, expiration_date: &str, qty_available: i64) {
        lock(&self.data).service = Some((
            status.to_string(),
            expiration_date.to_string(),
            qty_available,
        ));
    }

    /// The reseller's own sends left to give: an `add-count` of more is
    /// refused `understock`.
    pub fn set_reseller_pool(&self, sends: i64) {
        lock(&self.data).reseller_pool = Some(sends);
    }

    /// Every `add-count` carried out: (customer, count, remark).
    pub fn top_ups(&self) -> Vec<(String, i64, String)> {
        lock(&self.data).top_ups.clone()
    }

    pub fn create_list(&self, id: i64, subject: &str) {
        lock(&self.data).lists.insert(
            id,
            FakeList {
                subject: subject.to_string(),
                ..Default::default()
            },
        );
    }

    /// Puts an address into a list as if someone else had added it.
    pub fn add_existing(&self, list_id: i64, address: &str, fullname: &str) -> i64 {
        lock(&self.data).push(list_id, address, fullname, Default::default())
    }

    /// A recipient unsubscribes through EDM (a link in a mail): the address
    /// leaves the list and an export line is written.
    pub fn user_unsubscribe(&self, list_id: i64, address: &str) {
        lock(&self.data).unsubscribe(list_id, address);
    }

    /// Removes an address by id, as someone using EDM's web UI would.
    pub fn delete_address(&self, id: i64) {
        lock(&self.data).delete(id);
    }

    /// Changes an address's fullname behind the daemon's back.
    pub fn rename_address(&self, id: i64, fullname: &str) {
        if let Some(a) = lock(&self.data).find_mut(id) {
            a.fullname = fullname.to_string();
        }
    }

    /// Changes an address's `var{i}` (1–10) behind the daemon's back, as
    /// an edit in EDM's web UI would.
    pub fn set_var(&self, id: i64, i: usize, value: &str) {
        if let Some(a) = lock(&self.data).find_mut(id)
            && let Some(slot) = a.vars.get_mut(i.wrapping_sub(1))
        {
            *slot = value.to_string();
        }
    }

    /// Puts an address back into a list it left (an unsubscribe, a
    /// deletion), as someone re-adding it in EDM's web UI would: active
    /// again, with a new id. The export keeps its old line.
    pub fn reactivate(&self, list_id: i64, address: &str, fullname: &str) -> i64 {
        lock(&self.data).push(list_id, address, fullname, Default::default())
    }

    /// Adds or replaces a campaign.
    pub fn put_campaign(&self, campaign: SandboxCampaign) {
        lock(&self.data).campaigns.insert(campaign.id, campaign);
    }

    /// Every address a list holds, in the order added.
    pub fn addresses(&self, list_id: i64) -> Vec<SandboxAddress> {
        lock(&self.data)
            .lists
            .get(&list_id)
            .map(|l| l.addrs.clone())
            .unwrap_or_default()
    }

    /// The lowercased addresses a list holds, sorted (duplicates kept).
    pub fn emails(&self, list_id: i64) -> Vec<String> {
        let mut v: Vec<String> = self
            .addresses(list_id)
            .into_iter()
            .map(|a| a.address.to_lowercase())
            .collect();
        v.sort();
        v
    }

    /// The export lines of a list.
    pub fn export_lines(&self, list_id: i64) -> Vec<(String, String)> {
        lock(&self.data)
            .lists
            .get(&list_id)
            .map(|l| l.unsubs.clone())
            .unwrap_or_default()
    }

    /// Answers are gzip-compressed for a client that accepts it
    /// (`Accept-Encoding: gzip`) while [`EdmHandle::compress_answers`] is
    /// on (the default).
    pub(crate) fn router(&self) -> Router {
        let compress = self.compress.clone();
        let when = move |_: axum::http::StatusCode,
                         _: axum::http::Version,
                         _: &axum::http::HeaderMap,
                         _: &axum::http::Extensions| {
            compress.load(std::sync::atomic::Ordering::SeqCst)
        };
        Router::new()
            .route("/mm-ms/api/{script}", axum::routing::any(handle_api))
            .route("/mm-ms/apinew/{script}", axum::routing::any(handle_apinew))
            .with_state(self.clone())
            .layer(tower_http::compression::CompressionLayer::new().compress_when(when))
    }

    /// How many requests said they accept gzip answers.
    pub fn requests_accepting_gzip(&self) -> usize {
        self.gzip_accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn note_encoding(&self, headers: &axum::http::HeaderMap) {
        let gzip = headers
            .get_all("accept-encoding")
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.contains("gzip")));
        if gzip {
            self.gzip_accepted
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Whether answers are compressed for clients that accept gzip.
    pub fn compress_answers(&self, on: bool) {
        self.compress.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Writes XML the way the documents print it: declaration, a blank line,
/// indented elements, text in CDATA.
struct Xml(String);

impl Xml {
    fn new() -> Self {
        Xml("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\n".to_string())
    }
    fn open(&mut self, depth: usize, name: &str) {
        let _ = writeln!(self.0, "{}<{name}>", "  ".repeat(depth));
    }
    fn close(&mut self, depth: usize, name: &str) {
        let _ = writeln!(self.0, "{}</{name}>", "  ".repeat(depth));
    }
    fn leaf(&mut self, depth: usize, name: &str, value: &str) {
        self.leaf_closed_by(depth, name, value, name);
    }
    fn leaf_closed_by(&mut self, depth: usize, name: &str, value: &str, end: &str) {
        let indent = "  ".repeat(depth);
        if value.is_empty() {
            let _ = writeln!(self.0, "{indent}<{name}></{end}>");
        } else {
            // `]]>` cannot stand inside CDATA; split it as XML requires.
            let safe = value.replace("]]>", "]]]]><![CDATA[>");
            let _ = writeln!(self.0, "{indent}<{name}><![CDATA[{safe}]]></{end}>");
        }
    }
}

fn result(status: &str, data: &str, id: Option<i64>) -> String {
    let mut x = Xml::new();
    x.open(0, "result");
    x.leaf(1, "status", status);
    x.leaf(1, "data", data);
    if let Some(id) = id {
        x.leaf(1, "id", &id.to_string());
    }
    x.close(0, "result");
    x.0
}

/// `/mm-ms/api/`: the credentials in the query (`username`, `password` as
/// MD5), as the documents say.
async fn handle_api(
    State(h): State<EdmHandle>,
    Path(script): Path<String>,
    RawQuery(query): RawQuery,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    h.note_encoding(&headers);
    let q = params(query.as_deref(), &[]);
    // `service.php` is the reseller API: the reseller's own account.
    let (user, password) = if script == "service.php" {
        (super::RESELLER_USER, super::RESELLER_PASSWORD)
    } else {
        (super::EDM_USER, super::EDM_PASSWORD)
    };
    let authorized = q.get("username").map(String::as_str) == Some(user)
        && q.get("password").map(String::as_str)
            == Some(crate::edm::password_md5(password).as_str());
    handle(h, script, query, body, authorized).await
}

/// `/mm-ms/apinew/`: HTTP Basic auth with the plain password, as the
/// public clients call it; credentials in the query are not accepted here.
async fn handle_apinew(
    State(h): State<EdmHandle>,
    Path(script): Path<String>,
    RawQuery(query): RawQuery,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    h.note_encoding(&headers);
    let expected = format!(
        "Basic {}",
        crate::edm::basic_credentials(super::EDM_USER, super::EDM_PASSWORD)
    );
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == expected);
    handle(h, script, query, body, authorized).await
}

async fn handle(
    h: EdmHandle,
    script: String,
    query: Option<String>,
    body: Bytes,
    authorized: bool,
) -> Response {
    let p = params(query.as_deref(), &body);
    if p.contains_key("password") {
        h.with_password
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    // username, password and do are read from the query string only.
    let q = params(query.as_deref(), &[]);
    // failexport.php takes no `do`; it is named by its script.
    let operation = match script.as_str() {
        "failexport.php" => "failexport".to_string(),
        _ => q.get("do").cloned().unwrap_or_default(),
    };
    let _in_flight = h.shared.enter(&operation);
    let after = match before(&h.shared, Server::Edm, &operation, &p).await {
        Before::Answered(response) => return response,
        Before::Proceed(after) => after,
    };
    let body = if !authorized {
        result("user_auth_error", "用户名或密码错误", None)
    } else {
        answer(&h, &script, &operation, &p)
    };
    let body = if h.escaped_text.load(std::sync::atomic::Ordering::SeqCst) {
        cdata_to_escaped(&body)
    } else {
        body
    };
    let plain = matches!(operation.as_str(), "unsubscribe-export" | "failexport");
    let content_type = if plain && !body.starts_with("<?xml") {
        "text/plain; charset=utf-8"
    } else {
        "text/xml; charset=utf-8"
    };
    if h.shared.real_shapes() {
        let body = super::shapes::edm_body(&body).into_bytes();
        let content_type = super::shapes::CONTENT_TYPE;
        if matches!(after, After::Answer) {
            h.shared.record(Server::Edm, &operation, &p, 200, true);
            return super::shapes::chunked(axum::http::StatusCode::OK, content_type, body);
        }
        let ok = axum::http::StatusCode::OK;
        return finish(
            &h.shared,
            Server::Edm,
            &operation,
            &p,
            after,
            ok,
            content_type,
            body,
        );
    }
    finish(
        &h.shared,
        Server::Edm,
        &operation,
        &p,
        after,
        axum::http::StatusCode::OK,
        content_type,
        body.into_bytes(),
    )
}

/// Rewrites every CDATA section as escaped text.
fn cdata_to_escaped(body: &str) -> String {
    const OPEN: &str = "<![CDATA[";
    let mut out = String::with_capacity(body.len());
    let mut rest = body;
    while let Some(start) = rest.find(OPEN) {
        out.push_str(&rest[..start]);
        let inner = &rest[start + OPEN.len()..];
        let end = inner.find("]]>").unwrap_or(inner.len());
        for c in inner[..end].chars() {
            match c {
                '&' => out.push_str("&amp;"),
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                c => out.push(c),
            }
        }
        rest = inner.get(end + 3..).unwrap_or("");
    }
    out.push_str(rest);
    out
}

fn int(p: &BTreeMap<String, String>, key: &str) -> Option<i64> {
    p.get(key).and_then(|v| v.trim().parse().ok())
}

fn vars_from(p: &BTreeMap<String, String>) -> [String; 10] {
    std::array::from_fn(|i| p.get(&format!("var{}", i + 1)).cloned().unwrap_or_default())
}

fn answer(h: &EdmHandle, script: &str, operation: &str, p: &BTreeMap<String, String>) -> String {
    let mut d = lock(&h.data);
    let list_id = int(p, "list_id");
    match (script, operation) {
        ("account.php", "customer-info") => answer_customer_info(),
        ("account.php", "service-info") => answer_service_info(&mut d),
        ("service.php", _) if p.get("customer").map(String::as_str) != Some(super::EDM_USER) => {
            result("customer_not_exist", "不存在此客户", None)
        }
        ("service.php", "service-info") => answer_service_info(&mut d),
        ("service.php", "add-count") => answer_add_count(&mut d, p),
        ("service.php", "set-service") => answer_set_service(&mut d, p),
        ("mloperate.php", "maillist-list") => answer_maillist_list(&mut d),
        ("mloperate.php", "maillist-detail") => answer_maillist_detail(&mut d, p),
        ("mloperate.php", "ml-addr-list") => answer_ml_addr_list(&mut d, p, list_id),
        ("mloperate.php", "ml-addr-add") => answer_ml_addr_add(&mut d, p, list_id),
        ("mloperate.php", "ml-addr-edit") => answer_ml_addr_edit(&mut d, p),
        ("mloperate.php", "ml-addr-del") => answer_ml_addr_del(&mut d, p),
        ("mloperate.php", "ml-unsub") => answer_ml_unsub(&mut d, p, list_id),
        ("mloperate.php", "unsubscribe-export") => answer_unsubscribe_export(&mut d, p),
        ("task.php", "task-list") => answer_task_list(&mut d, p),
        ("track.php", "open-detail") => answer_open_detail(&mut d, p),
        ("track.php", "click-detail") => answer_click_detail(&mut d, p),
        ("failexport.php", _) => answer_failexport(&mut d, p),
        _ => result("unknown_operation", &format!("未知操作 {operation}"), None),
    }
}

/// The answer for a list id EDM does not have.
fn no_list() -> String {
    result("list_not_exist", "联系人分类不存在", None)
}

/// `account.php?do=customer-info`.
fn answer_customer_info() -> String {
    let mut x = Xml::new();
    x.open(0, "customer");
    x.leaf(1, "id", "1001");
    x.leaf(1, "username", super::EDM_USER);
    x.leaf(1, "company", "演示公司");
    x.close(0, "customer");
    x.0
}

/// `account.php?do=service-info`.
fn answer_service_info(d: &mut EdmData) -> String {
    let (status, expires, qty) = d
        .service
        .clone()
        .unwrap_or_else(|| ("enabled".to_string(), "2099-12-31".to_string(), 1_000_000));
    let mut x = Xml::new();
    x.open(0, "service");
    x.leaf(1, "id", "1001");
    x.leaf(1, "service_status", &status);
    x.leaf(1, "service_type", "包月");
    x.leaf(1, "send_type", "1");
    x.leaf(1, "beginning_date", "2026-01-01");
    x.leaf(1, "expiration_date", &expires);
    x.leaf(1, "qty_available", &qty.to_string());
    x.close(0, "service");
    x.0
}

/// `service.php?do=add-count`: sends from the reseller's pool to the
/// customer's account.
fn answer_add_count(d: &mut EdmData, p: &BTreeMap<String, String>) -> String {
    let Some(count) = int(p, "count").filter(|c| *c > 0) else {
        return result("add_count_error", "群发量无效", None);
    };
    let pool = d.reseller_pool.unwrap_or(10_000_000);
    if count > pool {
        return result("understock", "您剩余的群发量不足以此次操作", None);
    }
    d.reseller_pool = Some(pool - count);
    let (status, expires, qty) = d
        .service
        .clone()
        .unwrap_or_else(|| ("enabled".to_string(), "2099-12-31".to_string(), 1_000_000));
    d.service = Some((status, expires, qty + count));
    let remark = p.get("remark").cloned().unwrap_or_default();
    d.top_ups.push((super::EDM_USER.to_string(), count, remark));
    result("success", "添加群发量成功", None)
}

/// `service.php?do=set-service`: `disabled` 1 or 0.
fn answer_set_service(d: &mut EdmData, p: &BTreeMap<String, String>) -> String {
    let (_, expires, qty) = d
        .service
        .clone()
        .unwrap_or_else(|| ("enabled".to_string(), "2099-12-31".to_string(), 1_000_000));
    let status = if int(p, "disabled") == Some(1) {
        "disabled"
    } else {
        "enabled"
    };
    d.service = Some((status.to_string(), expires, qty));
    result("success", "设置群发服务成功", None)
}

/// `mloperate.php?do=maillist-list`.
fn answer_maillist_list(d: &mut EdmData) -> String {
    let mut x = Xml::new();
    x.open(0, "maillist");
    for (id, list) in &d.lists {
        x.open(1, "item");
        x.leaf(2, "id", &id.to_string());
        x.leaf(2, "subject", &list.subject);
        x.leaf(2, "descrīption", "");
        x.leaf(2, "count", &list.addrs.len().to_string());
        x.leaf(2, "status", "enabled");
        x.close(1, "item");
    }
    x.close(0, "maillist");
    x.0
}

/// `mloperate.php?do=maillist-detail`.
fn answer_maillist_detail(d: &mut EdmData, p: &BTreeMap<String, String>) -> String {
    match int(p, "id").and_then(|id| d.lists.get(&id).map(|l| (id, l))) {
        Some((id, list)) => {
            let mut x = Xml::new();
            x.open(0, "maillist");
            x.leaf(1, "id", &id.to_string());
            x.leaf(1, "subject", &list.subject);
            x.leaf(1, "descrīption", "");
            x.leaf(1, "count", &list.addrs.len().to_string());
            x.leaf(1, "status", "enabled");
            // As documented: closed by `</aillist>`.
            x.close(0, "aillist");
            x.0
        }
        None => no_list(),
    }
}

/// `mloperate.php?do=ml-addr-list`.
fn answer_ml_addr_list(
    d: &mut EdmData,
    p: &BTreeMap<String, String>,
    list_id: Option<i64>,
) -> String {
    let Some(list) = list_id.and_then(|id| d.lists.get(&id)) else {
        return no_list();
    };
    let page = int(p, "page").map(|page| {
        let limit = int(p, "limit").unwrap_or(50).max(1) as usize;
        ((page.max(1) as usize - 1) * limit, limit)
    });
    let page: Vec<&SandboxAddress> = match (p.get("keyword"), page) {
        // A keyword is a substring search, a scan as in EDM's own database.
        (Some(keyword), _) => {
            let k = keyword.to_lowercase();
            let matching = list.addrs.iter().filter(|a| {
                a.address.to_lowercase().contains(&k) || a.fullname.to_lowercase().contains(&k)
            });
            match page {
                Some((from, limit)) => matching.skip(from).take(limit).collect(),
                None => matching.collect(),
            }
        }
        (None, Some((from, limit))) => {
            let from = from.min(list.addrs.len());
            let to = (from + limit).min(list.addrs.len());
            list.addrs[from..to].iter().collect()
        }
        (None, None) => list.addrs.iter().collect(),
    };
    let mut x = Xml::new();
    x.open(0, "data");
    for a in page {
        x.open(1, "addr");
        x.leaf(2, "id", &a.id.to_string());
        x.leaf(2, "list_id", &list_id.unwrap_or_default().to_string());
        x.leaf(2, "address", &a.address);
        // As documented: `</ fullname >`.
        x.leaf_closed_by(2, "fullname", &a.fullname, " fullname ");
        x.leaf(2, "time", &a.time);
        for (i, v) in a.vars.iter().enumerate() {
            x.leaf(2, &format!("var{}", i + 1), v);
        }
        x.close(1, "addr");
    }
    x.close(0, "data");
    x.0
}

/// `mloperate.php?do=ml-addr-add`.
fn answer_ml_addr_add(
    d: &mut EdmData,
    p: &BTreeMap<String, String>,
    list_id: Option<i64>,
) -> String {
    let Some(list_id) = list_id.filter(|id| d.lists.contains_key(id)) else {
        return no_list();
    };
    if let Some(lines) = p.get("ml_addr") {
        let separator = p
            .get("separate")
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or("\n");
        let poison = lines.split(separator).find_map(|line| {
            let address = line.split(';').next().unwrap_or_default().trim();
            d.refused.get(&address.to_lowercase())
        });
        if let Some((code, message)) = poison {
            return result(code, message, None);
        }
        let mut added = 0;
        for line in lines.split(separator) {
            let parts: Vec<&str> = line.split(';').collect();
            let address = parts.first().map(|s| s.trim()).unwrap_or_default();
            if !address.contains('@') {
                continue;
            }
            let fullname = parts.get(1).copied().unwrap_or_default();
            let vars: [String; 10] = std::array::from_fn(|i| {
                parts.get(i + 2).map(|s| s.to_string()).unwrap_or_default()
            });
            d.push(list_id, address, fullname, vars);
            added += 1;
        }
        result("success", &format!("成功添加 {added} 个地址"), None)
    } else if let Some(address) = p.get("address").filter(|a| a.contains('@')) {
        let fullname = p.get("fullname").cloned().unwrap_or_default();
        let id = d.push(list_id, address, &fullname, vars_from(p));
        let with_id = p.get("return_id").map(String::as_str) == Some("1");
        result("success", "添加成功", with_id.then_some(id))
    } else {
        result("add_address_error", "地址为空", None)
    }
}

/// `mloperate.php?do=ml-addr-edit`.
fn answer_ml_addr_edit(d: &mut EdmData, p: &BTreeMap<String, String>) -> String {
    let Some(id) = int(p, "id") else {
        return result("update_address_error", "缺少地址id", None);
    };
    if let Some((code, message)) = p
        .get("address")
        .and_then(|a| d.refused.get(&a.to_lowercase()))
    {
        return result(code, message, None);
    }
    let vars = vars_from(p);
    let Some(a) = d.find_mut(id) else {
        return result("address_not_exist", "地址不存在", None);
    };
    if let Some(address) = p.get("address") {
        a.address = address.clone();
    }
    if let Some(fullname) = p.get("fullname") {
        a.fullname = fullname.clone();
    }
    a.vars = vars;
    result("success", "修改成功", None)
}

/// `mloperate.php?do=ml-addr-del`.
fn answer_ml_addr_del(d: &mut EdmData, p: &BTreeMap<String, String>) -> String {
    if let Some(id) = int(p, "id") {
        d.delete(id);
    }
    result("success", "删除成功", None)
}

/// `mloperate.php?do=ml-unsub`.
fn answer_ml_unsub(d: &mut EdmData, p: &BTreeMap<String, String>, list_id: Option<i64>) -> String {
    let Some(list_id) = list_id.filter(|id| d.lists.contains_key(id)) else {
        return no_list();
    };
    let raw = p.get("address").cloned().unwrap_or_default();
    let addresses: Vec<&str> = raw
        .split([',', '\n'])
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    if let Some((code, message)) = addresses
        .iter()
        .find_map(|a| d.refused.get(&a.to_lowercase()))
    {
        return result(code, message, None);
    }
    // One pass over the list for the whole batch.
    let gone: std::collections::HashSet<String> =
        addresses.iter().map(|a| a.to_lowercase()).collect();
    let time = d.tick();
    if let Some(list) = d.lists.get_mut(&list_id) {
        list.addrs
            .retain(|a| !gone.contains(&a.address.to_lowercase()));
        for address in &addresses {
            list.unsubs.push((time.clone(), address.to_lowercase()));
        }
    }
    result("success", &format!("退订 {} 个地址", addresses.len()), None)
}

/// `mloperate.php?do=unsubscribe-export`.
fn answer_unsubscribe_export(d: &mut EdmData, p: &BTreeMap<String, String>) -> String {
    let Some(list) = int(p, "id").and_then(|id| d.lists.get(&id)) else {
        return no_list();
    };
    list.unsubs
        .iter()
        .map(|(t, e)| format!("{t}\t{e}\n"))
        .collect()
}

/// `task.php?do=task-list`.
fn answer_task_list(d: &mut EdmData, p: &BTreeMap<String, String>) -> String {
    let date = p.get("date").cloned();
    let status = p
        .get("send_status")
        .cloned()
        .unwrap_or_else(|| "all".into());
    let matching: Vec<&SandboxCampaign> = d
        .campaigns
        .values()
        .filter(|c| date.as_ref().is_none_or(|dt| &c.date == dt))
        .filter(|c| status == "all" || status == c.send_status.to_string())
        .filter(|c| int(p, "id").is_none_or(|id| id == c.id))
        .collect();
    let page: Vec<&SandboxCampaign> = match (int(p, "page"), int(p, "limit")) {
        (None, None) => matching,
        (page, limit) => {
            let limit = limit.unwrap_or(30).max(1) as usize;
            let page = page.unwrap_or(1).max(1) as usize;
            matching
                .into_iter()
                .skip((page - 1) * limit)
                .take(limit)
                .collect()
        }
    };
    let mut x = Xml::new();
    x.open(0, "task_list");
    for c in page {
        x.open(1, "task");
        x.leaf(2, "id", &c.id.to_string());
        x.leaf(2, "sn", &c.sn);
        x.leaf(2, "acct_type", "domain");
        x.leaf(2, "tpl_id", "1");
        x.leaf(2, "tpl_name", &c.name);
        x.leaf(2, "list_id", &c.list_id.to_string());
        x.leaf(
            2,
            "list_name",
            d.lists
                .get(&c.list_id)
                .map(|l| l.subject.as_str())
                .unwrap_or(""),
        );
        x.leaf(2, "send_time", &format!("{} 09:00", c.date));
        x.leaf(2, "time_start", &format!("{} 09:00:05", c.date));
        x.leaf(2, "send_status", &c.send_status.to_string());
        x.leaf(2, "track_status", &c.track_status.to_string());
        x.close(1, "task");
    }
    x.close(0, "task_list");
    x.0
}

/// `track.php?do=open-detail`.
fn answer_open_detail(d: &mut EdmData, p: &BTreeMap<String, String>) -> String {
    let Some(c) = int(p, "id").and_then(|id| d.campaigns.get(&id)) else {
        return result("task_not_exist", "任务不存在", None);
    };
    let mut x = Xml::new();
    x.open(0, "data");
    for (i, (email, total, first, last)) in c.opens.iter().enumerate() {
        x.open(1, "user");
        x.leaf(2, "email_id", &(i + 1).to_string());
        x.leaf(2, "email", email);
        x.leaf(2, "browser", "Chrome");
        x.leaf(2, "os", "Windows");
        x.leaf(2, "ip_first", "203.0.113.7");
        x.leaf(2, "ip_last", "203.0.113.7");
        x.leaf(2, "open_total", &total.to_string());
        x.leaf(2, "click_total", "0");
        x.leaf(2, "open_first", first);
        x.leaf(2, "open_last", last);
        x.leaf(2, "click_first", "");
        x.leaf(2, "click_last", "");
        x.close(1, "user");
    }
    // As documented: the document ends with `<data>`.
    x.open(0, "data");
    x.0
}

/// `track.php?do=click-detail`.
fn answer_click_detail(d: &mut EdmData, p: &BTreeMap<String, String>) -> String {
    let Some(c) = int(p, "id").and_then(|id| d.campaigns.get(&id)) else {
        return result("task_not_exist", "任务不存在", None);
    };
    let mut x = Xml::new();
    x.open(0, "data");
    for (i, (email, link, total, first, last)) in c.clicks.iter().enumerate() {
        x.open(1, "click");
        x.leaf(2, "click_id", &(i + 1).to_string());
        x.leaf(2, "email", email);
        x.leaf(2, "link", link);
        x.leaf(2, "click_unique", "1");
        x.leaf(2, "click_total", &total.to_string());
        x.leaf(2, "click_first", first);
        x.leaf(2, "click_last", last);
        x.close(1, "click");
    }
    x.open(0, "data");
    x.0
}

/// `failexport.php`.
fn answer_failexport(d: &mut EdmData, p: &BTreeMap<String, String>) -> String {
    let kind = p.get("type").cloned().unwrap_or_default();
    let kind = match kind.as_str() {
        "1" => "not_exist",
        "2" => "over_quota",
        "3" => "user_reject",
        "8" => "invalid_addr",
        "9" => "format_error",
        other => other,
    }
    .to_string();
    let date = p.get("date").cloned().unwrap_or_default();
    let task = int(p, "task_id");
    d.campaigns
        .values()
        .filter(|c| c.date == date && task.is_none_or(|t| t == c.id))
        .flat_map(|c| c.bounces.iter())
        .filter(|(t, _)| *t == kind)
        .map(|(_, e)| format!("{e}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(h: &EdmHandle, operation: &str, p: &[(&str, &str)]) -> String {
        let p: BTreeMap<String, String> = p
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        answer(h, "mloperate.php", operation, &p)
    }

    fn addresses_in(xml: &str) -> Vec<String> {
        xml.split("<address>")
            .skip(1)
            .map(|s| {
                let s = s.split("</address>").next().unwrap();
                s.trim_start_matches("<![CDATA[")
                    .trim_end_matches("]]>")
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn list_pages_edits_and_deletes_find_addresses_by_id_after_removals() {
        // Arrange: five addresses in list 1, one in list 2; the second of
        // list 1 deleted, the fourth unsubscribed.
        let h = EdmHandle::new(Arc::default());
        h.create_list(1, "one");
        h.create_list(2, "two");
        let ids: Vec<i64> = (1..=5)
            .map(|k| h.add_existing(1, &format!("a{k}@x.cn"), ""))
            .collect();
        let other = h.add_existing(2, "b@x.cn", "");
        h.delete_address(ids[1]);
        h.user_unsubscribe(1, "a4@x.cn");

        // Act: page through list 1 two at a time; edit the last address of
        // list 1 and the one of list 2 by id; delete the first by id.
        let pages: Vec<Vec<String>> = ["1", "2", "3"]
            .iter()
            .map(|p| {
                addresses_in(&ask(
                    &h,
                    "ml-addr-list",
                    &[("list_id", "1"), ("page", p), ("limit", "2")],
                ))
            })
            .collect();
        let last = ids[4].to_string();
        let edited = ask(&h, "ml-addr-edit", &[("id", &last), ("fullname", "五")]);
        let other_id = other.to_string();
        ask(&h, "ml-addr-edit", &[("id", &other_id), ("fullname", "乙")]);
        let gone = ask(&h, "ml-addr-edit", &[("id", &ids[1].to_string())]);
        ask(&h, "ml-addr-del", &[("id", &ids[0].to_string())]);

        // Assert
        assert_eq!(
            pages,
            vec![
                vec!["a1@x.cn".to_string(), "a3@x.cn".to_string()],
                vec!["a5@x.cn".to_string()],
                Vec::<String>::new(),
            ]
        );
        assert!(edited.contains("success"), "{edited}");
        assert!(gone.contains("address_not_exist"), "{gone}");
        let list1 = h.addresses(1);
        assert_eq!(
            list1.iter().map(|a| a.address.as_str()).collect::<Vec<_>>(),
            vec!["a3@x.cn", "a5@x.cn"]
        );
        assert_eq!(list1[1].fullname, "五");
        assert_eq!(h.addresses(2)[0].fullname, "乙");
    }
}
