//! The fake 全程云 CRM: `/WebApi/Handler/1.0/CRM/{Area}/{Name}.ashx`, GET or
//! POST, `token` checked, `{"value": …}` answers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::{After, Before, Server, Shared, before, finish, lock, params};

/// One `ContactHistory/Add` the CRM received.
#[derive(Debug, Clone, PartialEq)]
pub struct ContactRecord {
    pub customer_id: i64,
    pub link_man_id: i64,
    pub type_id: i64,
    pub route_id: i64,
    pub title: String,
    pub content: String,
}

/// A paging fault of `Customer/GetAllList`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageFault {
    /// Page 1 is empty, as if the CRM had no customer.
    EmptyFirst,
    /// Page k answers 500, always.
    FailOn(u32),
    /// Page k serves page k-1 again.
    Repeat(u32),
}

#[derive(Debug, Default)]
struct CrmData {
    page_fault: Option<PageFault>,
    customers: BTreeMap<i64, Map<String, Value>>,
    /// The customers' ids in ascending order, so that a page is a slice:
    /// a page costs the same at page 5 000 as at page 1 (skipping through
    /// the map made a whole pull quadratic in the CRM's size).
    order: Vec<i64>,
    /// link-man id → (customer id, object)
    linkmen: BTreeMap<i64, (i64, Map<String, Value>)>,
    /// customer id → its link-men's ids (an index for GetLinkManList).
    by_customer: BTreeMap<i64, std::collections::BTreeSet<i64>>,
    history: Vec<ContactRecord>,
    /// Refuse a wrong token with 200 `{"error": …, "code": 401}` instead of
    /// an HTTP 401, as some deployments do.
    auth_error_in_body: bool,
}

/// A change a CRM user makes while the daemon reads: run once, right
/// after the first request of `operation` whose `param` is `value` has
/// been answered.
struct MidPull {
    operation: String,
    param: (String, String),
    change: Box<dyn FnOnce(&CrmHandle) + Send>,
}

/// Seeds, mutates and reads the fake CRM.
#[derive(Clone)]
pub struct CrmHandle {
    data: Arc<Mutex<CrmData>>,
    shared: Arc<Shared>,
    mid_pull: Arc<Mutex<Vec<MidPull>>>,
}

impl std::fmt::Debug for CrmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrmHandle").finish_non_exhaustive()
    }
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

impl CrmHandle {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        CrmHandle {
            data: Arc::new(Mutex::new(CrmData::default())),
            shared,
            mid_pull: Arc::default(),
        }
    }

    /// Changes the CRM once, right after the first `operation` request
    /// with `param` = `value` was answered (`("pageIndex", "1")` of
    /// `Customer/GetAllList`, `("cust_id", "7")` of
    /// `LinkMan/GetLinkManList`): a user editing the CRM while a pull reads
    /// it.
    pub fn after(
        &self,
        operation: &str,
        param: (&str, &str),
        change: impl FnOnce(&CrmHandle) + Send + 'static,
    ) {
        lock(&self.mid_pull).push(MidPull {
            operation: operation.to_string(),
            param: (param.0.to_string(), param.1.to_string()),
            change: Box::new(change),
        });
    }

    /// Runs the changes due after this request (see [`CrmHandle::after`]).
    fn changes_after(&self, operation: &str, p: &BTreeMap<String, String>) {
        let due: Vec<MidPull> = {
            let mut pending = lock(&self.mid_pull);
            let (due, rest) = std::mem::take(&mut *pending)
                .into_iter()
                .partition(|m| m.operation == operation && p.get(&m.param.0) == Some(&m.param.1));
            *pending = rest;
            due
        };
        for m in due {
            (m.change)(self);
        }
    }

    /// Refuse a wrong token with 200 and `{"error": …, "code": 401}` in the
    /// body (`true`) or with an HTTP 401 (`false`, the default).
    pub fn auth_error_in_body(&self, on: bool) {
        self.data.lock().unwrap().auth_error_in_body = on;
    }

    /// Adds or replaces a customer; `fields` is merged with `{"id": id}`.
    pub fn put_customer(&self, id: i64, fields: Value) {
        let mut obj = object(fields);
        obj.insert("id".into(), json!(id));
        let mut d = lock(&self.data);
        if d.customers.insert(id, obj).is_none() {
            // Seeds come in ascending order: the common case is a push.
            match d.order.last() {
                Some(&last) if last > id => {
                    let at = d.order.partition_point(|&c| c < id);
                    d.order.insert(at, id);
                }
                _ => d.order.push(id),
            }
        }
    }

    /// Removes a customer and its link-men.
    pub fn remove_customer(&self, id: i64) {
        let mut d = lock(&self.data);
        if d.customers.remove(&id).is_some()
            && let Ok(at) = d.order.binary_search(&id)
        {
            d.order.remove(at);
        }
        for lm in d.by_customer.remove(&id).unwrap_or_default() {
            d.linkmen.remove(&lm);
        }
    }

    /// Adds or replaces a link-man of `customer_id`; `fields` is merged
    /// with `{"id": id}`.
    pub fn put_linkman(&self, customer_id: i64, id: i64, fields: Value) {
        let mut obj = object(fields);
        obj.insert("id".into(), json!(id));
        let mut d = lock(&self.data);
        if let Some((old, _)) = d.linkmen.insert(id, (customer_id, obj))
            && let Some(set) = d.by_customer.get_mut(&old)
        {
            set.remove(&id);
        }
        d.by_customer.entry(customer_id).or_default().insert(id);
    }

    /// Sets one field of a link-man (`Value::Null` to clear it).
    pub fn set_linkman_field(&self, id: i64, key: &str, value: Value) {
        if let Some((_, obj)) = lock(&self.data).linkmen.get_mut(&id) {
            obj.insert(key.into(), value);
        }
    }

    /// Sets one field of a customer.
    pub fn set_customer_field(&self, id: i64, key: &str, value: Value) {
        if let Some(obj) = lock(&self.data).customers.get_mut(&id) {
            obj.insert(key.into(), value);
        }
    }

    pub fn remove_linkman(&self, id: i64) {
        let mut d = lock(&self.data);
        if let Some((c, _)) = d.linkmen.remove(&id)
            && let Some(set) = d.by_customer.get_mut(&c)
        {
            set.remove(&id);
        }
    }

    pub fn customer_count(&self) -> usize {
        lock(&self.data).customers.len()
    }

    pub fn linkman_count(&self) -> usize {
        lock(&self.data).linkmen.len()
    }

    /// Sets (or clears) a paging fault.
    pub fn page_fault(&self, fault: Option<PageFault>) {
        lock(&self.data).page_fault = fault;
    }

    /// Every `ContactHistory/Add` received.
    pub fn history(&self) -> Vec<ContactRecord> {
        lock(&self.data).history.clone()
    }

    pub(crate) fn router(&self) -> Router {
        Router::new()
            .route(
                "/WebApi/Handler/1.0/CRM/{area}/{file}",
                axum::routing::any(handle),
            )
            .with_state(self.clone())
    }
}

async fn handle(
    State(h): State<CrmHandle>,
    Path((area, file)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let name = file.strip_suffix(".ashx").unwrap_or(&file);
    let operation = format!("{area}/{name}");
    let p = params(query.as_deref(), &body);
    let _in_flight = h.shared.enter(&operation);
    let after = match before(&h.shared, Server::Crm, &operation, &p).await {
        Before::Answered(response) => return response,
        Before::Proceed(after) => after,
    };
    if p.get("token").map(String::as_str) != Some(super::TOKEN) {
        if h.data.lock().unwrap().auth_error_in_body {
            h.shared.record(Server::Crm, &operation, &p, 200, false);
            return axum::Json(json!({"error": "token invalid or expired", "code": 401}))
                .into_response();
        }
        h.shared.record(Server::Crm, &operation, &p, 401, false);
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"message": "token invalid or expired"})),
        )
            .into_response();
    }
    let (status, value) = answer(&h, &operation, &p);
    h.changes_after(&operation, &p);
    let value = if h.shared.real_shapes() {
        super::shapes::crm_value(value)
    } else {
        value
    };
    let after = if status.is_success() {
        after
    } else {
        After::Answer
    };
    finish(
        &h.shared,
        Server::Crm,
        &operation,
        &p,
        after,
        status,
        "application/json; charset=utf-8",
        value.to_string().into_bytes(),
    )
}

fn int(p: &BTreeMap<String, String>, key: &str) -> Option<i64> {
    p.get(key).and_then(|v| v.trim().parse().ok())
}

fn answer(h: &CrmHandle, operation: &str, p: &BTreeMap<String, String>) -> (StatusCode, Value) {
    let mut d = lock(&h.data);
    match operation {
        "Customer/GetAllList" => customers_page(&d, p),
        "Customer/Get" => match int(p, "id").and_then(|id| d.customers.get(&id)) {
            Some(c) => (StatusCode::OK, json!({ "value": c })),
            None => (StatusCode::OK, json!({ "value": null })),
        },
        "LinkMan/GetLinkManList" => {
            let ids = int(p, "cust_id")
                .and_then(|c| d.by_customer.get(&c))
                .cloned()
                .unwrap_or_default();
            let items: Vec<Value> = ids
                .iter()
                .filter_map(|id| d.linkmen.get(id))
                .map(|(_, l)| Value::Object(l.clone()))
                .collect();
            (StatusCode::OK, json!({ "value": items }))
        }
        "LinkMan/GetLinkMan" => match int(p, "id").and_then(|id| d.linkmen.get(&id)) {
            Some((_, l)) => (StatusCode::OK, json!({ "value": l })),
            None => (StatusCode::OK, json!({ "value": null })),
        },
        "ContactHistory/Add" => add_contact_history(&mut d, p),
        "BaseType/GetBaseType" => (
            StatusCode::OK,
            json!({ "value": [
                {"id": 1, "name": "销售联系"}, {"id": 2, "name": "客户关怀"}, {"id": 3, "name": "售后回访"}
            ]}),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            json!({ "message": format!("no such handler {operation}") }),
        ),
    }
}

/// `Customer/GetAllList`: a page of customers, or the page fault armed.
fn customers_page(d: &CrmData, p: &BTreeMap<String, String>) -> (StatusCode, Value) {
    let mut page = int(p, "pageIndex").unwrap_or(1).max(1) as usize;
    let size = int(p, "pageSize").unwrap_or(10).clamp(1, 100) as usize;
    match d.page_fault {
        Some(PageFault::EmptyFirst) if page == 1 => {
            return (StatusCode::OK, json!({ "value": [] }));
        }
        Some(PageFault::FailOn(k)) if page == k as usize => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({ "message": "internal error" }),
            );
        }
        Some(PageFault::Repeat(k)) if page == k as usize && page > 1 => page -= 1,
        _ => {}
    }
    let from = ((page - 1) * size).min(d.order.len());
    let to = (from + size).min(d.order.len());
    let items: Vec<Value> = d.order[from..to]
        .iter()
        .filter_map(|id| d.customers.get(id))
        .map(|c| Value::Object(c.clone()))
        .collect();
    (StatusCode::OK, json!({ "value": items }))
}

/// `ContactHistory/Add`: recorded when every field is there and the
/// customer exists; `value:false` otherwise.
fn add_contact_history(d: &mut CrmData, p: &BTreeMap<String, String>) -> (StatusCode, Value) {
    let fields = (
        int(p, "customer_id"),
        int(p, "link_man_id"),
        int(p, "type_id"),
        int(p, "route_id"),
        p.get("title"),
        p.get("content"),
    );
    match fields {
        (
            Some(customer_id),
            Some(link_man_id),
            Some(type_id),
            Some(route_id),
            Some(title),
            Some(content),
        ) if d.customers.contains_key(&customer_id) => {
            d.history.push(ContactRecord {
                customer_id,
                link_man_id,
                type_id,
                route_id,
                title: title.clone(),
                content: content.clone(),
            });
            (StatusCode::OK, json!({ "value": true }))
        }
        _ => (StatusCode::OK, json!({ "value": false })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(h: &CrmHandle, index: usize, size: usize) -> Vec<i64> {
        let p: BTreeMap<String, String> = [
            ("pageIndex".to_string(), index.to_string()),
            ("pageSize".to_string(), size.to_string()),
        ]
        .into();
        let (_, body) = answer(h, "Customer/GetAllList", &p);
        body["value"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_i64().unwrap())
            .collect()
    }

    #[test]
    fn customer_pages_follow_id_order_through_inserts_out_of_order_and_removals() {
        // Arrange: ids put in a scrambled order, one replaced, two removed.
        let h = CrmHandle::new(Arc::default());
        for id in [5, 1, 9, 3, 7, 2, 8] {
            h.put_customer(id, json!({"name": format!("c{id}")}));
        }
        h.put_customer(3, json!({"name": "again"}));
        h.remove_customer(7);
        h.remove_customer(4); // not there: nothing changes

        // Act
        let pages: Vec<Vec<i64>> = (1..=4).map(|k| page(&h, k, 2)).collect();

        // Assert: ascending ids, each once, a short page, then nothing.
        assert_eq!(pages, vec![vec![1, 2], vec![3, 5], vec![8, 9], vec![]]);
        assert_eq!(h.customer_count(), 6);
    }
}
