//! Answers in the shapes real servers send, which the vendor documents
//! never show. With the switch on ([`super::Sandbox::real_shapes`], or
//! `CRM_EDM_SYNC_SANDBOX_SHAPES=real` in the environment of whatever
//! starts a sandbox: tests, the demo, the bench), every EDM answer
//! carries, beside what it says:
//!
//! - a UTF-8 BOM before the XML declaration, and CR/LF line ends;
//! - every value padded with CR/LF, spaces and tabs inside its element;
//! - "no date" written `0000-00-00 00:00:00` (`0000-00-00` for a `…_date`),
//!   and a count of 0 written empty;
//! - an unknown element, with an unknown child, at the top of the root and
//!   of every record;
//! - `Content-Type: text/html; charset=utf-8`, and a chunked body without
//!   `Content-Length`;
//!
//! and every CRM object carries unknown fields and `null` for the optional
//! fields it lacks. Lists of exactly one item are the data's to make.

use serde_json::{Value, json};

/// The environment variable that turns the switch on for every sandbox a
/// process starts.
pub const ENV: &str = "CRM_EDM_SYNC_SANDBOX_SHAPES";

/// Whether the environment asks for the real shapes (`real`).
pub fn from_env() -> bool {
    std::env::var(ENV).is_ok_and(|v| v.trim().eq_ignore_ascii_case("real"))
}

/// The content type real servers put on their XML.
pub const CONTENT_TYPE: &str = "text/html; charset=utf-8";

/// Elements that hold a date and time ("no date" is all zeros).
fn is_moment(name: &str) -> bool {
    name.ends_with("_first")
        || name.ends_with("_last")
        || name.ends_with("_end")
        || name.starts_with("time")
        || name == "send_time"
}

/// Elements that hold a count (0 is written empty).
fn is_count(name: &str) -> bool {
    name == "count" || name.ends_with("_total") || name == "click_unique"
}

/// `<name>VALUE</end>` on one line: the leaf's parts.
fn leaf(line: &str) -> Option<(&str, &str, &str)> {
    let rest = line.strip_prefix('<')?;
    let gt = rest.find('>')?;
    let name = &rest[..gt];
    if name.is_empty() || name.starts_with('/') || name.contains([' ', '/', '!', '?']) {
        return None;
    }
    let body = &rest[gt + 1..];
    let close = body.rfind("</")?;
    let end = body[close + 2..].strip_suffix('>')?;
    Some((name, &body[..close], end))
}

/// Rewrites an XML answer as a real server would send it (see the module
/// documentation); anything that is not XML stays as it is.
pub fn edm_body(body: &str) -> String {
    if !body.starts_with("<?xml") {
        return body.to_string();
    }
    let lines: Vec<&str> = body.lines().collect();
    let last = lines
        .iter()
        .rposition(|l| !l.trim().is_empty())
        .unwrap_or(0);
    let mut out = String::with_capacity(body.len() * 2);
    out.push('\u{feff}');
    for (i, line) in lines.iter().enumerate() {
        let text = line.trim_start();
        let indent = &line[..line.len() - text.len()];
        if let Some((name, value, end)) = leaf(text) {
            let value = match value {
                "" if is_moment(name) => "0000-00-00 00:00:00",
                "" if name.ends_with("_date") => "0000-00-00",
                "0" | "<![CDATA[0]]>" if is_count(name) => "",
                v => v,
            };
            out.push_str(&format!(
                "{indent}<{name}>\r\n{indent}\t {value} \r\n{indent}</{end}>\r\n"
            ));
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
        let opens_a_record = text.starts_with('<')
            && text.ends_with('>')
            && !text.starts_with("</")
            && !text.starts_with("<?")
            && !text.contains("</");
        // Not after the last line: the documents end some answers with a
        // start tag meant as the root's end.
        if opens_a_record && i < last {
            out.push_str(&format!(
                "{indent}  <ext_info>\r\n{indent}    <server>\r\n mm-ms 4.2 \r\n</server>\r\n{indent}  </ext_info>\r\n"
            ));
        }
    }
    out
}

/// Adds unknown fields and `null` optional fields to every object of a CRM
/// answer's `value`, as real deployments answer.
pub fn crm_value(mut answer: Value) -> Value {
    fn decorate(object: &mut serde_json::Map<String, Value>) {
        object.insert("CreateTime".into(), json!("2026-01-01 00:00:00"));
        object.insert("ExtData".into(), json!({"source": null, "tags": []}));
        for optional in ["mobile", "remark", "email"] {
            object.entry(optional).or_insert(Value::Null);
        }
    }
    match answer.get_mut("value") {
        Some(Value::Array(items)) => {
            for item in items {
                if let Value::Object(o) = item {
                    decorate(o);
                }
            }
        }
        Some(Value::Object(o)) => decorate(o),
        _ => {}
    }
    if let Value::Object(o) = &mut answer {
        o.insert("ServerTime".into(), json!("2026-01-01 00:00:00"));
    }
    answer
}

/// A chunked response without `Content-Length`.
pub fn chunked(
    status: axum::http::StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
) -> axum::response::Response {
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(1024).map(|c| Ok(c.to_vec())).collect();
    axum::response::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(axum::body::Body::from_stream(futures::stream::iter(pieces)))
        .unwrap_or_else(|_| super::html_response(500))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_in_real_shapes_has_a_bom_padding_zero_dates_and_unknown_elements() {
        // Arrange
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\n<data>\n  <user>\n    <email><![CDATA[a@b.cn]]></email>\n    <open_total>0</open_total>\n    <click_last></click_last>\n  </user>\n<data>\n";

        // Act
        let real = edm_body(body);

        // Assert
        assert!(real.starts_with("\u{feff}<?xml"));
        assert!(real.contains("<email>\r\n    \t <![CDATA[a@b.cn]]> \r\n    </email>"));
        assert!(real.contains("<click_last>\r\n    \t 0000-00-00 00:00:00 \r\n"));
        assert!(real.contains("<open_total>\r\n    \t  \r\n"));
        assert_eq!(real.matches("<ext_info>").count(), 2, "{real}");
        assert!(real.trim_end().ends_with("<data>"), "the quirk stays last");
    }

    #[test]
    fn crm_objects_get_unknown_and_null_fields() {
        let v = crm_value(json!({"value": [{"id": 1, "name": "x", "email": "a@b.cn"}]}));
        let o = &v["value"][0];
        assert_eq!(o["email"], "a@b.cn");
        assert!(o["mobile"].is_null());
        assert!(o.get("ExtData").is_some());
    }
}
