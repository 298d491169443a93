//! The write-back template grammar and its renderer, in one place: a
//! template is text with `{name}` placeholders drawn from [`PLACEHOLDERS`];
//! configuration rejects any other name, and rendering fills them in one
//! pass. A leaf of the crate.

use std::collections::BTreeMap;

/// The placeholders a write-back template may use.
pub(crate) const PLACEHOLDERS: [&str; 12] = [
    "name",
    "email",
    "campaign",
    "sn",
    "campaign_id",
    "list",
    "count",
    "first",
    "last",
    "links",
    "reason",
    "time",
];

/// The `{placeholder}` names a template uses.
pub(crate) fn placeholders(template: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end) => {
                out.push(&after[..end]);
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    out
}

/// The first placeholder a template uses that is not one of
/// [`PLACEHOLDERS`].
pub(crate) fn unknown_placeholder(template: &str) -> Option<&str> {
    placeholders(template)
        .into_iter()
        .find(|p| !PLACEHOLDERS.contains(p))
}

/// Fills `{placeholder}`s in one pass over the template: a value is never
/// read again, so a campaign name, link or CRM name that itself contains
/// `{name}` is written as it is. Unknown placeholders are left as they
/// are (config validation rejects them).
pub(crate) fn render(template: &str, values: &BTreeMap<&str, String>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}').and_then(|close| {
            let name = &after[..close];
            values.get(name).map(|v| (v, close))
        }) {
            Some((value, close)) => {
                out.push_str(value);
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_fills_known_placeholders() {
        let values: BTreeMap<&str, String> = [("name", "张三".to_string())].into();
        assert_eq!(render("{name} opened {name}", &values), "张三 opened 张三");
    }

    #[test]
    fn render_substitutes_once_so_values_containing_placeholders_are_kept_as_written() {
        // Arrange: a campaign name and a link that look like placeholders.
        let values: BTreeMap<&str, String> = [
            ("campaign", "Sale {name} {links}".to_string()),
            ("name", "张三".to_string()),
            ("links", "https://a.cn/?q={campaign}".to_string()),
        ]
        .into();

        // Act
        let out = render("{name}: {campaign} / {links} / {unknown} {", &values);

        // Assert
        assert_eq!(
            out,
            "张三: Sale {name} {links} / https://a.cn/?q={campaign} / {unknown} {"
        );
    }

    #[test]
    fn only_the_known_placeholders_pass() {
        assert_eq!(unknown_placeholder("{name} {email} {links}"), None);
        assert_eq!(unknown_placeholder("{name} {nmae}"), Some("nmae"));
        assert_eq!(placeholders("a {b} c {d"), vec!["b"]);
    }
}
