//! The 全程云 CRM WebApi: JSON over HTTP, POST form fields, `{"value": …}`.
//!
//! The fields inside Customer and CustomerLinkMan objects are not
//! documented, so objects are kept as JSON maps and read through the
//! configured `crm.fields` keys (docs/decisions.md). Ids may arrive as numbers
//! or numeric strings.

use std::collections::HashSet;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};

use crate::config::{CrmFields, CrmSettings};
use crate::domain::{CustomerId, LinkManId};
use crate::redact::Redactor;
use crate::remote::{Api, ErrorKind, HttpCaller, Idempotence, Pager, RemoteError};

/// A CRM object as the API returned it.
pub type CrmMap = Map<String, Value>;

/// A customer with its id read.
#[derive(Debug, Clone, PartialEq)]
pub struct Customer {
    pub id: CustomerId,
    pub data: CrmMap,
}

/// A link-man with its id read; it belongs to the customer whose
/// `GetLinkManList` returned it.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkMan {
    pub id: LinkManId,
    pub customer_id: CustomerId,
    pub data: CrmMap,
}

/// One customer and the link-men its `GetLinkManList` returned.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomerWithLinkMen {
    pub customer: Customer,
    pub linkmen: Vec<LinkMan>,
}

/// Everything a complete pull read (the mapping's tests build one).
#[cfg(test)]
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CrmSnapshot {
    pub customers: Vec<CustomerWithLinkMen>,
    /// `Customer/GetAllList` pages read.
    pub pages: u32,
}

/// Reads an id that may be a JSON number or a numeric string.
pub fn read_id(value: Option<&Value>) -> Option<i64> {
    match value? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    }
}

/// The CRM client.
#[derive(Clone, Debug)]
pub struct CrmClient {
    http: HttpCaller,
    base_url: String,
    token: SecretString,
    fields: CrmFields,
    page_size: u32,
    concurrency: usize,
    /// Protects against a CRM whose paging never ends.
    max_pages: u32,
}

impl CrmClient {
    /// A client built from the `[crm]` section alone.
    pub fn new(settings: &CrmSettings, redactor: Arc<Redactor>) -> anyhow::Result<Self> {
        let http = HttpCaller::new(Api::Crm, crate::remote::Limits::of_crm(settings), redactor)?;
        Ok(CrmClient {
            http,
            base_url: settings.base_url.as_str().to_string(),
            token: settings.token.clone(),
            fields: settings.fields.clone(),
            page_size: settings.page_size,
            concurrency: settings.concurrency,
            max_pages: settings.max_pages,
        })
    }

    /// Lowers the largest answer read (tests).
    pub fn with_max_body(mut self, bytes: usize) -> Self {
        self.http = self.http.with_max_body(bytes);
        self
    }

    /// Shortens retry delays (tests, demo).
    pub fn with_min_retry_delay(mut self, delay: std::time::Duration) -> Self {
        self.http = self.http.with_min_delay(delay);
        self
    }

    /// Names this instance in every request's `User-Agent`.
    pub fn with_user_agent(mut self, user_agent: &str) -> Self {
        self.http = self.http.with_user_agent(user_agent);
        self
    }

    /// Gives up the waits between attempts when `shutdown` is cancelled.
    pub fn with_shutdown(mut self, shutdown: tokio_util::sync::CancellationToken) -> Self {
        self.http = self.http.with_shutdown(shutdown);
        self
    }

    /// How CRM calls are repeated (`crm.max_retries`); the write-back
    /// drives it around each contact-history record.
    pub fn resend_policy(&self) -> &crate::remote::ResendPolicy {
        self.http.policy()
    }

    fn err(&self, operation: &str, kind: ErrorKind) -> RemoteError {
        RemoteError::new(Api::Crm, operation, kind)
    }

    /// POSTs `params` (plus `token` and `format=json`) to `{Area}/{Name}` and
    /// returns the `value`.
    async fn call(
        &self,
        operation: &str,
        params: &[(&str, String)],
        idempotence: Idempotence,
    ) -> Result<Value, RemoteError> {
        let url = format!(
            "{}/WebApi/Handler/1.0/CRM/{}.ashx",
            self.base_url, operation
        );
        let mut form: Vec<(&str, &str)> =
            vec![("token", self.token.expose_secret()), ("format", "json")];
        form.extend(params.iter().map(|(k, v)| (*k, v.as_str())));
        self.http
            .execute(
                operation,
                idempotence,
                || self.http.client.post(&url).form(&form),
                |body| self.parse_value(operation, body),
            )
            .await
    }

    fn parse_value(&self, operation: &str, body: &[u8]) -> Result<Value, RemoteError> {
        read_value(operation, body, self.http.redactor())
    }

    fn objects(&self, operation: &str, value: Value) -> Result<Vec<CrmMap>, RemoteError> {
        read_objects(operation, value)
    }

    /// `Customer/GetAllList`, one page (from 1).
    #[tracing::instrument(skip_all, fields(page))]
    pub async fn customers_page(
        &self,
        page: u32,
        page_size: u32,
    ) -> Result<Vec<CrmMap>, RemoteError> {
        let op = "Customer/GetAllList";
        let value = self
            .call(
                op,
                &[
                    ("pageIndex", page.to_string()),
                    ("pageSize", page_size.to_string()),
                ],
                Idempotence::Idempotent,
            )
            .await?;
        self.objects(op, value)
    }

    /// `LinkMan/GetLinkManList` of one customer.
    #[tracing::instrument(skip_all, fields(customer_id))]
    pub async fn linkmen(&self, customer_id: CustomerId) -> Result<Vec<LinkMan>, RemoteError> {
        let op = "LinkMan/GetLinkManList";
        let value = self
            .call(
                op,
                &[("cust_id", customer_id.to_string())],
                Idempotence::Idempotent,
            )
            .await?;
        self.objects(op, value)?
            .into_iter()
            .enumerate()
            .map(|(i, data)| {
                let id = read_id(data.get(&self.fields.linkman_id)).ok_or_else(|| {
                    self.err(
                        op,
                        ErrorKind::Malformed {
                            detail: format!(
                                "link-man {i} of customer {customer_id}: `{}` is {} (crm.fields.linkman_id)",
                                self.fields.linkman_id,
                                describe(data.get(&self.fields.linkman_id))
                            ),
                            excerpt: String::new(),
                        },
                    )
                })?;
                Ok(LinkMan {
                    id: LinkManId(id),
                    customer_id,
                    data,
                })
            })
            .collect()
    }

    /// `Customer/Get`: one customer by id, `None` when the CRM has no such
    /// customer (see [`record_or_none`]).
    #[tracing::instrument(skip_all, fields(customer_id))]
    pub async fn customer(&self, id: CustomerId) -> Result<Option<CrmMap>, RemoteError> {
        self.one("Customer/Get", id.0).await
    }

    /// `LinkMan/GetLinkMan`: one link-man by id, `None` when the CRM has
    /// no such link-man (see [`record_or_none`]).
    #[tracing::instrument(skip_all, fields(link_man_id))]
    pub async fn linkman(&self, id: LinkManId) -> Result<Option<CrmMap>, RemoteError> {
        self.one("LinkMan/GetLinkMan", id.0).await
    }

    async fn one(&self, op: &str, id: i64) -> Result<Option<CrmMap>, RemoteError> {
        let answer = self
            .call(op, &[("id", id.to_string())], Idempotence::Idempotent)
            .await;
        match answer {
            Ok(value) => record_or_none(op, value),
            Err(e) if matches!(e.kind, ErrorKind::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `ContactHistory/Add`: `{"value": true}` is success, anything else an
    /// error.
    #[tracing::instrument(skip_all, fields(customer_id, link_man_id))]
    pub async fn add_contact_history(
        &self,
        customer_id: CustomerId,
        link_man_id: LinkManId,
        type_id: i64,
        route_id: i64,
        title: &str,
        content: &str,
    ) -> Result<(), RemoteError> {
        let op = "ContactHistory/Add";
        let value = self
            .call(
                op,
                &[
                    ("customer_id", customer_id.to_string()),
                    ("type_id", type_id.to_string()),
                    ("route_id", route_id.to_string()),
                    ("link_man_id", link_man_id.to_string()),
                    ("title", title.to_string()),
                    ("content", content.to_string()),
                ],
                Idempotence::NotIdempotent,
            )
            .await?;
        match value {
            Value::Bool(true) => Ok(()),
            other => Err(self.err(
                op,
                ErrorKind::Rejected {
                    code: "value_false".into(),
                    message: format!("answered {other}"),
                },
            )),
        }
    }

    /// Pages through every customer and fetches each one's link-men, at
    /// most `crm.concurrency` link-man requests in flight, while the next
    /// customer pages are read; any failed call (after retries) fails the
    /// whole pull: an incomplete pull must apply nothing (rule 7). Hands
    /// each customer with its link-men to `sink` as it arrives (in no
    /// particular order) instead of keeping them all: the CRM's JSON for
    /// 100 000 link-men need never be in memory at once. Returns the
    /// number of pages read.
    pub async fn pull_each(
        &self,
        mut sink: impl FnMut(CustomerWithLinkMen),
    ) -> Result<u32, RemoteError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Customer>(self.page_size as usize * 2);
        let page_size = self.page_size;
        let pager = async move {
            let mut seen: HashSet<CustomerId> = HashSet::new();
            let mut pages = Pager::new(Api::Crm, "Customer/GetAllList", "the customers", page_size)
                .fail_after(self.max_pages, "crm.max_pages");
            let mut read = 0;
            while let Some(page) = pages.next_page()? {
                let items = self
                    .customers_page(page, page_size)
                    .await
                    .map_err(|mut e| {
                        e.operation = format!("{} page {page}", e.operation);
                        e
                    })?;
                read = page;
                let n = items.len();
                let mut ids = Vec::with_capacity(n);
                for (i, data) in items.into_iter().enumerate() {
                    let id = read_id(data.get(&self.fields.customer_id)).ok_or_else(|| {
                        self.err(
                            "Customer/GetAllList",
                            ErrorKind::Malformed {
                                detail: format!(
                                    "customer {i} of page {page}: `{}` is {} (crm.fields.customer_id)",
                                    self.fields.customer_id,
                                    describe(data.get(&self.fields.customer_id))
                                ),
                                excerpt: String::new(),
                            },
                        )
                    })?;
                    let id = CustomerId(id);
                    ids.push(id);
                    // A customer that moved to a later page while we paged
                    // is read once.
                    if seen.insert(id) && tx.send(Customer { id, data }).await.is_err() {
                        // The fetcher stopped on an error; it reports it.
                        return Ok(read);
                    }
                }
                pages.accept(n, ids)?;
            }
            Ok(read)
        };
        let fetcher = tokio_stream_from(rx)
            .map(|customer| async move {
                let linkmen = self.linkmen(customer.id).await?;
                Ok::<_, RemoteError>(CustomerWithLinkMen { customer, linkmen })
            })
            .buffer_unordered(self.concurrency)
            .try_for_each(|c| {
                sink(c);
                futures::future::ready(Ok(()))
            });
        let (pages, ()) = futures::try_join!(pager, fetcher)?;
        Ok(pages)
    }
}

/// The `value` of a CRM answer: a body that is not JSON, not an object,
/// or an object without `value` is an error with a redacted excerpt.
pub fn read_value(operation: &str, body: &[u8], redactor: &Redactor) -> Result<Value, RemoteError> {
    let err = |kind| RemoteError::new(Api::Crm, operation, kind);
    let excerpt = || redactor.excerpt(body);
    let parsed: Value = serde_json::from_slice(body).map_err(|e| {
        err(ErrorKind::Malformed {
            detail: format!("not JSON: {e}"),
            excerpt: excerpt(),
        })
    })?;
    match parsed {
        Value::Object(mut map) => match map.remove("value") {
            Some(value) => Ok(value),
            // A refused token answered with 200 and the status in the body.
            None if read_id(map.get("code")).is_some_and(|c| c == 401 || c == 403) => {
                Err(err(ErrorKind::Auth {
                    credential: "crm.token",
                    detail: format!("the answer says {}", excerpt()),
                }))
            }
            None => Err(err(ErrorKind::Rejected {
                code: "no_value".into(),
                message: format!("answer has no \"value\": {}", excerpt()),
            })),
        },
        _ => Err(err(ErrorKind::Malformed {
            detail: "JSON is not an object".into(),
            excerpt: excerpt(),
        })),
    }
}

/// A `value` that must be an array of objects.
pub fn read_objects(operation: &str, value: Value) -> Result<Vec<CrmMap>, RemoteError> {
    let shape = |detail: String| {
        RemoteError::new(
            Api::Crm,
            operation,
            ErrorKind::Malformed {
                detail,
                excerpt: String::new(),
            },
        )
    };
    match value {
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Object(map) => Ok(map),
                other => Err(shape(format!(
                    "item {i} of \"value\" is {} instead of an object",
                    json_kind(&other)
                ))),
            })
            .collect(),
        other => Err(shape(format!(
            "\"value\" is {} instead of an array",
            json_kind(&other)
        ))),
    }
}

/// The answer of a get-by-id call. The CRM's documents do not say how it
/// answers an id it does not have; taken as "no such record": a `value`
/// that is `null`, `false`, an empty object or an empty array (and, in
/// the caller, HTTP 404). An object is the record; anything else is an
/// error.
pub fn record_or_none(operation: &str, value: Value) -> Result<Option<CrmMap>, RemoteError> {
    match value {
        Value::Null | Value::Bool(false) => Ok(None),
        Value::Object(map) if map.is_empty() => Ok(None),
        Value::Array(items) if items.is_empty() => Ok(None),
        Value::Object(map) => Ok(Some(map)),
        other => Err(RemoteError::new(
            Api::Crm,
            operation,
            ErrorKind::Malformed {
                detail: format!("\"value\" is {} instead of an object", json_kind(&other)),
                excerpt: String::new(),
            },
        )),
    }
}

/// A `Stream` over an mpsc receiver.
fn tokio_stream_from<T>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn describe(v: Option<&Value>) -> String {
    match v {
        None => "missing".into(),
        Some(Value::String(s)) => format!(
            "the non-numeric string {:?}",
            s.chars().take(40).collect::<String>()
        ),
        Some(Value::Number(n)) => format!("the non-integer number {n}"),
        Some(other) => json_kind(other).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_are_read_from_numbers_and_numeric_strings() {
        assert_eq!(read_id(Some(&json!(42))), Some(42));
        assert_eq!(read_id(Some(&json!("42"))), Some(42));
        assert_eq!(read_id(Some(&json!(" 7 "))), Some(7));
        assert_eq!(read_id(Some(&json!(4.5))), None);
        assert_eq!(read_id(Some(&json!("abc"))), None);
        assert_eq!(read_id(Some(&json!(null))), None);
        assert_eq!(read_id(None), None);
    }

    fn client() -> CrmClient {
        let settings = crate::config::Settings::from_toml(
            "[crm]\nbase_url = \"http://crm.test\"\ntoken = \"s3cret-token\"\n[edm]\nusername = \"u\"\npassword = \"p\"\n",
        )
        .unwrap();
        let redactor = Arc::new(Redactor::new(["s3cret-token".to_string()]));
        CrmClient::new(&settings.crm, redactor).unwrap()
    }

    #[test]
    fn value_is_taken_from_the_answer() {
        let c = client();
        assert_eq!(
            c.parse_value("op", br#"{"value": [1, 2]}"#).unwrap(),
            json!([1, 2])
        );
        assert_eq!(
            c.parse_value("op", br#"{"value": null}"#).unwrap(),
            json!(null)
        );
    }

    #[test]
    fn html_page_is_a_retriable_malformed_answer_with_an_excerpt() {
        let err = client()
            .parse_value(
                "Customer/GetAllList",
                b"<html><body>502 Bad Gateway</body></html>",
            )
            .unwrap_err();
        assert!(err.is_retriable());
        assert!(
            matches!(&err.kind, ErrorKind::Malformed { excerpt, .. } if excerpt.contains("502 Bad Gateway"))
        );
        assert!(err.to_string().contains("Customer/GetAllList"));
    }

    #[test]
    fn object_without_value_is_a_permanent_error_with_a_redacted_excerpt() {
        let err = client()
            .parse_value("op", br#"{"error": "token s3cret-token expired"}"#)
            .unwrap_err();
        assert!(!err.is_retriable());
        let text = err.to_string();
        assert!(text.contains("no \"value\""), "{text}");
        assert!(
            text.contains("[REDACTED]") && !text.contains("s3cret-token"),
            "{text}"
        );
    }

    #[test]
    fn an_auth_error_in_a_200_body_names_crm_token() {
        for body in [
            &br#"{"error": "token s3cret-token invalid", "code": 401}"#[..],
            br#"{"error": "forbidden", "code": "403"}"#,
        ] {
            let err = client().parse_value("op", body).unwrap_err();
            assert!(
                matches!(
                    err.kind,
                    ErrorKind::Auth {
                        credential: "crm.token",
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(!err.is_retriable());
            let text = err.to_string();
            assert!(text.contains("crm.token"), "{text}");
            assert!(!text.contains("s3cret-token"), "{text}");
        }
    }

    #[test]
    fn truncated_json_and_non_objects_are_malformed() {
        let c = client();
        assert!(matches!(
            c.parse_value("op", br#"{"value": [1, "#).unwrap_err().kind,
            ErrorKind::Malformed { .. }
        ));
        assert!(matches!(
            c.parse_value("op", b"[1, 2]").unwrap_err().kind,
            ErrorKind::Malformed { .. }
        ));
        assert!(matches!(
            c.parse_value("op", b"").unwrap_err().kind,
            ErrorKind::Malformed { .. }
        ));
    }

    #[test]
    fn value_must_be_an_array_of_objects_for_lists() {
        let c = client();
        assert!(c.objects("op", json!(null)).is_err());
        assert!(c.objects("op", json!({"a": 1})).is_err());
        let err = c.objects("op", json!([{"id": 1}, 5])).unwrap_err();
        assert!(err.to_string().contains("item 1"), "{err}");
        assert_eq!(c.objects("op", json!([])).unwrap().len(), 0);
    }

    #[test]
    fn describe_names_what_was_found() {
        assert_eq!(describe(None), "missing");
        assert_eq!(describe(Some(&json!(1.5))), "the non-integer number 1.5");
        assert_eq!(describe(Some(&json!("x"))), "the non-numeric string \"x\"");
    }
}
