//! The XML and JSON readers on any input: a value or an error, never a
//! panic. Inputs are arbitrary bytes and text, and documented answers with
//! random cuts, insertions and byte flips.

use crm_edm_sync::edm::xml::{self, AddrListXml, MailListsXml, ResultXml, TaskListXml};
use proptest::prelude::*;

const FIXTURES: [&str; 4] = [
    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\n<data>\n<addr>\n  <id>11</id>\n  <list_id>1</list_id>\n  <address>a@b.cn</address>\n  <fullname>张三</ fullname >\n  <var1><![CDATA[x;y]]></var1>\n</addr>\n</data>\n",
    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<maillist><item><id>1</id><subject>客户</subject><descrīption>d</descrīption><count>2</count><status>enabled</status></item></maillist>",
    "<result><status>success</status><data><![CDATA[ok]]></data><id>7</id></result>",
    "<task_list><task><id>3</id><sn>s</sn><tpl_name>t</tpl_name><list_id>1</list_id><send_status>3</send_status><track_status>2</track_status></task></task_list>",
];

/// Reads `body` every way the client might; the result does not matter,
/// only that it returns.
fn read_all_ways(body: &[u8]) {
    if let Ok((doc, root)) = xml::normalize(body) {
        let _ = xml::read::<ResultXml>(&doc, &root, "result");
        let _ = xml::read::<AddrListXml>(&doc, &root, "data");
        let _ = xml::read::<MailListsXml>(&doc, &root, "maillist");
        let _ = xml::read::<TaskListXml>(&doc, &root, "task_list");
    }
    let _ = xml::decode(body);
}

fn mutate(
    base: &str,
    cut: usize,
    insert_at: usize,
    insert: &str,
    flip_at: usize,
    flip: u8,
) -> Vec<u8> {
    let mut bytes = base.as_bytes().to_vec();
    let at = insert_at % (bytes.len() + 1);
    bytes.splice(at..at, insert.bytes());
    if !bytes.is_empty() {
        let i = flip_at % bytes.len();
        bytes[i] ^= flip;
    }
    bytes.truncate(cut % (bytes.len() + 1));
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn xml_reader_never_panics_on_arbitrary_bytes(body in proptest::collection::vec(any::<u8>(), 0..600)) {
        read_all_ways(&body);
    }

    #[test]
    fn xml_reader_never_panics_on_markup_like_text(body in "[<>/a-z ?=\\\"!\\[\\]CDATA&;#0-9\u{012b}\n]{0,300}") {
        read_all_ways(body.as_bytes());
    }

    #[test]
    fn xml_reader_never_panics_on_damaged_documented_answers(
        which in 0usize..FIXTURES.len(),
        cut in any::<usize>(),
        insert_at in any::<usize>(),
        insert in "[<>/a-z&;\\]\\]]{0,12}",
        flip_at in any::<usize>(),
        flip in any::<u8>(),
    ) {
        read_all_ways(&mutate(FIXTURES[which], cut, insert_at, &insert, flip_at, flip));
    }

    #[test]
    fn json_reader_never_panics(body in proptest::collection::vec(any::<u8>(), 0..400), text in "[\\[\\]{}\":,a-z0-9. -]{0,200}") {
        let redactor = crm_edm_sync::remote::Redactor::default();
        let wrapped = format!("{{\"value\": {text}}}");
        for input in [&body[..], text.as_bytes(), wrapped.as_bytes()] {
            if let Ok(value) = crm_edm_sync::crm::read_value("op", input, &redactor) {
                let _ = crm_edm_sync::crm::read_objects("op", value);
            }
        }
    }
}
