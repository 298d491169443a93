//! EDM's XML answers: a tolerant normaliser, then quick-xml serde.
//!
//! Why one file over 600 lines: the normaliser, the wire types it feeds
//! and the tests of every documented quirk belong together; a third of it
//! is those tests.
//!
//! The API documents (docs/remote-apis.md) show quirks that a strict parser rejects:
//! `< fullname >` written with spaces, `</aillist>` closing `<maillist>`,
//! a document ending in `<data>` instead of `</data>`, CDATA, GBK bodies.
//! [`normalize`] turns such a body into well-formed UTF-8 XML without a
//! declaration — spaced tag names tightened, a mismatched end tag taken as
//! the end of the element that is open, elements left open closed at the end
//! — and the wire types below are read from that with `quick_xml::de`.
//! Wire types stay private to the EDM module.

use quick_xml::Reader;
use quick_xml::Writer;
use quick_xml::events::{BytesEnd, BytesText, Event};
use serde::Deserialize;

/// Why an EDM body is not readable XML.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum XmlError {
    #[error("body is empty")]
    Empty,
    #[error("body is not valid {0}")]
    Encoding(String),
    #[error("unknown encoding {0:?} in the XML declaration")]
    UnknownEncoding(String),
    #[error("not XML: {0}")]
    Syntax(String),
    #[error("no root element")]
    NoRoot,
    #[error("unexpected root element <{found}>, expected <{expected}>")]
    UnexpectedRoot { found: String, expected: String },
    #[error("cannot read <{root}>: {detail}")]
    Shape { root: String, detail: String },
}

/// Decodes the body by its BOM or XML declaration (UTF-8 unless declared
/// otherwise, e.g. GBK).
pub fn decode(body: &[u8]) -> Result<String, XmlError> {
    if let Some(rest) = body.strip_prefix(b"\xEF\xBB\xBF") {
        return std::str::from_utf8(rest)
            .map(str::to_owned)
            .map_err(|_| XmlError::Encoding("UTF-8".into()));
    }
    let head = &body[..body.len().min(200)];
    let label = declared_encoding(head);
    match label {
        None => std::str::from_utf8(body)
            .map(str::to_owned)
            .map_err(|_| XmlError::Encoding("UTF-8".into())),
        Some(label) => {
            let encoding = encoding_rs::Encoding::for_label(label.as_bytes())
                .ok_or_else(|| XmlError::UnknownEncoding(label.clone()))?;
            if encoding == encoding_rs::UTF_8 {
                return std::str::from_utf8(body)
                    .map(str::to_owned)
                    .map_err(|_| XmlError::Encoding("UTF-8".into()));
            }
            let (text, _, had_errors) = encoding.decode(body);
            if had_errors {
                return Err(XmlError::Encoding(encoding.name().into()));
            }
            Ok(text.into_owned())
        }
    }
}

fn declared_encoding(head: &[u8]) -> Option<String> {
    let head = String::from_utf8_lossy(head);
    let decl_end = head.find("?>")?;
    let decl = &head[..decl_end];
    if !decl.trim_start().starts_with("<?xml") {
        return None;
    }
    let pos = decl.find("encoding")?;
    let rest = decl[pos + "encoding".len()..]
        .trim_start()
        .strip_prefix('=')?;
    let rest = rest.trim_start();
    let quote = rest.chars().next()?;
    if quote != '"' && quote != '\'' {
        return None;
    }
    let value = &rest[1..];
    let end = value.find(quote)?;
    Some(value[..end].trim().to_string())
}

/// Tightens tags written with spaces inside the brackets, `< name >` and
/// `</ name >`, to `<name>` and `</name>`. Only a complete tag of that form
/// is touched; CDATA sections and comments are copied as they are.
fn tighten_spaced_tags(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied_to = 0;
    while i < bytes.len() {
        if bytes[i] != b'<' {
            i += 1;
            continue;
        }
        if text[i..].starts_with("<![CDATA[") {
            i = text[i..]
                .find("]]>")
                .map(|p| i + p + 3)
                .unwrap_or(bytes.len());
            continue;
        }
        if text[i..].starts_with("<!--") {
            i = text[i..]
                .find("-->")
                .map(|p| i + p + 3)
                .unwrap_or(bytes.len());
            continue;
        }
        // Look for `<` ws* `/`? ws* NAME ws* `>` with at least one ws
        // before the name.
        let mut j = i + 1;
        let skip_ws = |mut k: usize| {
            while k < bytes.len() && (bytes[k] as char).is_ascii_whitespace() {
                k += 1;
            }
            k
        };
        let after_lt = skip_ws(j);
        let mut spaced = after_lt > j;
        j = after_lt;
        let closing = j < bytes.len() && bytes[j] == b'/';
        if closing {
            j += 1;
            let after_slash = skip_ws(j);
            spaced |= after_slash > j;
            j = after_slash;
        }
        let name_start = j;
        while j < bytes.len() && !b" \t\r\n<>/=\"'".contains(&bytes[j]) {
            j += 1;
        }
        let name_end = j;
        let k = skip_ws(j);
        if spaced && name_end > name_start && k < bytes.len() && bytes[k] == b'>' {
            out.push_str(&text[copied_to..i]);
            out.push('<');
            if closing {
                out.push('/');
            }
            out.push_str(&text[name_start..name_end]);
            out.push('>');
            i = k + 1;
            copied_to = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&text[copied_to..]);
    out
}

/// Makes an EDM body well-formed: decoded, spaced tags tightened, end tags
/// matched to the open elements, open elements closed at the end. Returns
/// the document (no declaration) and the name of its root element.
pub fn normalize(body: &[u8]) -> Result<(String, String), XmlError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(XmlError::Empty);
    }
    let text = tighten_spaced_tags(&decode(body)?);
    let mut reader = Reader::from_str(&text);
    reader.config_mut().check_end_names = false;
    // Not `trim_text`: it would also eat the spaces around entity
    // references inside a value. Whitespace-only text between elements is
    // dropped by the normaliser instead.
    let mut n = Normalizer::new(text.len());
    loop {
        let event = reader
            .read_event()
            .map_err(|e| XmlError::Syntax(format!("at byte {}: {e}", reader.error_position())))?;
        if n.on_event(event)?.is_break() {
            break;
        }
    }
    n.finish()
}

/// The state of [`normalize`] between two events.
struct Normalizer {
    writer: Writer<Vec<u8>>,
    /// The elements open, outermost first.
    stack: Vec<String>,
    root: Option<String>,
    /// A start tag is written only when the next event shows it was one:
    /// the documents end with `<data>` where `</data>` was meant.
    held: Option<quick_xml::events::BytesStart<'static>>,
    /// A value's text arrives in pieces (`x &amp; y` is text "x ",
    /// `&amp;`, text " y"), collected here and written when the value
    /// ends, trimmed at both ends: real servers pad values with spaces,
    /// tabs and CR/LF (`<fullname>\r\n  王小明 \r\n</fullname>`).
    /// Whitespace inside a value stays; whitespace-only text between
    /// elements is layout and goes.
    run: Vec<Event<'static>>,
    /// Whether `run` holds a value's start.
    in_run: bool,
}

type Flow = std::ops::ControlFlow<()>;

fn write_err(e: std::io::Error) -> XmlError {
    XmlError::Syntax(e.to_string())
}

impl Normalizer {
    fn new(capacity: usize) -> Normalizer {
        Normalizer {
            writer: Writer::new(Vec::with_capacity(capacity)),
            stack: Vec::new(),
            root: None,
            held: None,
            run: Vec::new(),
            in_run: false,
        }
    }

    fn on_event(&mut self, event: Event<'_>) -> Result<Flow, XmlError> {
        let insignificant = match &event {
            Event::Eof | Event::Comment(_) | Event::PI(_) => true,
            Event::Text(t) => t.trim().is_empty(),
            _ => false,
        };
        if !insignificant && let Some(start) = self.held.take() {
            self.writer
                .write_event(Event::Start(start))
                .map_err(write_err)?;
        }
        if !matches!(
            &event,
            Event::Text(_) | Event::GeneralRef(_) | Event::CData(_)
        ) {
            self.in_run = false;
            write_trimmed(&mut self.writer, &mut self.run).map_err(write_err)?;
        }
        match event {
            Event::Eof => Ok(Flow::Break(())),
            Event::Decl(_) | Event::PI(_) | Event::DocType(_) | Event::Comment(_) => {
                Ok(Flow::Continue(()))
            }
            Event::Start(start) => Ok(self.on_start(start.into_owned())),
            Event::Empty(empty) => {
                if self.stack.is_empty() {
                    if self.root.is_some() {
                        return Ok(Flow::Break(())); // junk after the root
                    }
                    self.root = Some(empty.name().as_ref().to_string());
                }
                self.writer
                    .write_event(Event::Empty(empty))
                    .map_err(write_err)?;
                Ok(Flow::Continue(()))
            }
            Event::End(end) => self.on_end(end.name().as_ref().to_string()),
            Event::Text(t) => {
                // Leading whitespace of a value, or layout: dropped.
                if !self.stack.is_empty() && (self.in_run || !t.trim().is_empty()) {
                    self.run.push(Event::Text(t.into_owned()));
                    self.in_run = true;
                }
                Ok(Flow::Continue(()))
            }
            Event::CData(c) => {
                if !self.stack.is_empty() {
                    // Re-emit as escaped text: the reader below then sees
                    // one kind of text only.
                    let content = (*c).to_string();
                    self.run
                        .push(Event::Text(BytesText::new(&content).into_owned()));
                    self.in_run = true;
                }
                Ok(Flow::Continue(()))
            }
            Event::GeneralRef(r) => {
                if !self.stack.is_empty() {
                    self.run.push(entity(r.into_owned()));
                    self.in_run = true;
                }
                Ok(Flow::Continue(()))
            }
        }
    }

    fn on_start(&mut self, start: quick_xml::events::BytesStart<'static>) -> Flow {
        let name = start.name().as_ref().to_string();
        if self.stack.is_empty() {
            if self.root.is_some() {
                return Flow::Break(()); // junk after the root element
            }
            self.root = Some(name.clone());
        }
        self.stack.push(name);
        self.held = Some(start);
        Flow::Continue(())
    }

    fn on_end(&mut self, name: String) -> Result<Flow, XmlError> {
        match self.stack.iter().rposition(|open| *open == name) {
            // Close everything opened inside it, then it.
            Some(pos) => self.close_down_to(pos)?,
            // `</aillist>`: a misspelt end closes the element that is open.
            None => {
                if let Some(open) = self.stack.pop() {
                    self.writer
                        .write_event(Event::End(BytesEnd::new(open)))
                        .map_err(write_err)?;
                }
            }
        }
        // Anything after the root is ignored.
        Ok(if self.stack.is_empty() && self.root.is_some() {
            Flow::Break(())
        } else {
            Flow::Continue(())
        })
    }

    /// Writes the end of every open element from the innermost down to
    /// the one at `pos`, included.
    fn close_down_to(&mut self, pos: usize) -> Result<(), XmlError> {
        while self.stack.len() > pos {
            let open = self.stack.pop().unwrap_or_default();
            self.writer
                .write_event(Event::End(BytesEnd::new(open)))
                .map_err(write_err)?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(String, String), XmlError> {
        // The documented quirk: a last start tag, with nothing after it,
        // that repeats an open ancestor's name was meant as that
        // ancestor's end.
        if self.held.take().is_some() {
            let name = self.stack.pop().unwrap_or_default();
            match self.stack.iter().rposition(|open| *open == name) {
                Some(pos) => self.close_down_to(pos)?,
                None => self.stack.push(name),
            }
        }
        // Anything else still open means the body was cut short.
        if let Some(open) = self.stack.last() {
            return Err(XmlError::Syntax(format!(
                "the body ends inside <{open}>: cut short"
            )));
        }
        let root = self.root.ok_or(XmlError::NoRoot)?;
        let out = String::from_utf8(self.writer.into_inner())
            .map_err(|e| XmlError::Syntax(e.to_string()))?;
        Ok((out, root))
    }
}

/// An entity reference inside a value: XML's own and numeric ones stay;
/// `&nbsp;` (an ill-made server's HTML) becomes the character; any other
/// becomes its own text.
fn entity(r: quick_xml::events::BytesRef<'static>) -> Event<'static> {
    let name = (*r).to_string();
    let replacement = match name.as_str() {
        "amp" | "lt" | "gt" | "quot" | "apos" => None,
        _ if name.starts_with('#') => None,
        "nbsp" => Some("\u{a0}".to_string()),
        other => Some(format!("&{other};")),
    };
    match replacement {
        None => Event::GeneralRef(r),
        Some(text) => Event::Text(BytesText::new(&text).into_owned()),
    }
}

/// Writes the pieces of one value, its whitespace trimmed at both ends
/// (whitespace-only pieces at the end dropped), and empties `run`.
fn write_trimmed(
    writer: &mut Writer<Vec<u8>>,
    run: &mut Vec<Event<'static>>,
) -> std::io::Result<()> {
    let blank = |e: &Event<'_>| matches!(e, Event::Text(t) if t[..].trim().is_empty());
    while run.last().is_some_and(blank) {
        run.pop();
    }
    let trim = |e: &mut Event<'static>, f: fn(&str) -> &str| {
        if let Event::Text(t) = e {
            let text = f(&t[..]).to_string();
            *t = BytesText::from_escaped(text);
        }
    };
    if let Some(last) = run.last_mut() {
        trim(last, str::trim_end);
    }
    if let Some(first) = run.first_mut() {
        trim(first, str::trim_start);
    }
    for piece in run.drain(..) {
        writer.write_event(piece)?;
    }
    Ok(())
}

/// Reads a normalised document as `T`, checking the root element's name.
pub fn read<T: for<'de> Deserialize<'de>>(
    doc: &str,
    root: &str,
    expected_root: &str,
) -> Result<T, XmlError> {
    if root != expected_root {
        return Err(XmlError::UnexpectedRoot {
            found: root.into(),
            expected: expected_root.into(),
        });
    }
    quick_xml::de::from_str(doc).map_err(|e| XmlError::Shape {
        root: root.into(),
        detail: e.to_string(),
    })
}

/// `<result><status/><data/>[<id/>]</result>`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ResultXml {
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub data: String,
    #[serde(default)]
    pub id: Option<String>,
}

/// `<customer>…</customer>` of `customer-info`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct CustomerXml {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub username: String,
}

/// `<service>…</service>` of `account.php?do=service-info`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ServiceXml {
    #[serde(default)]
    pub service_status: String,
    #[serde(default)]
    pub expiration_date: String,
    #[serde(default)]
    pub qty_available: String,
}

/// `<maillist><item>…</item>…</maillist>` of `maillist-list`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct MailListsXml {
    #[serde(default)]
    pub item: Vec<MailListXml>,
}

/// One list: an `<item>` of `maillist-list`, or the `<maillist>` of
/// `maillist-detail`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct MailListXml {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub subject: String,
    /// Spelt with U+012B in the documents and, we assume, on the wire.
    #[serde(rename = "descrīption", alias = "description", default)]
    pub description: String,
    #[serde(default)]
    pub count: String,
    #[serde(default)]
    pub status: String,
}

/// `<data><addr>…</addr>…</data>` of `ml-addr-list`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct AddrListXml {
    #[serde(default)]
    pub addr: Vec<AddrXml>,
}

/// One address of a list.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct AddrXml {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub list_id: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub fullname: String,
    #[serde(default)]
    pub time: String,
    #[serde(default)]
    pub var1: String,
    #[serde(default)]
    pub var2: String,
    #[serde(default)]
    pub var3: String,
    #[serde(default)]
    pub var4: String,
    #[serde(default)]
    pub var5: String,
    #[serde(default)]
    pub var6: String,
    #[serde(default)]
    pub var7: String,
    #[serde(default)]
    pub var8: String,
    #[serde(default)]
    pub var9: String,
    #[serde(default)]
    pub var10: String,
}

impl AddrXml {
    pub fn vars(&self) -> [String; 10] {
        [
            self.var1.clone(),
            self.var2.clone(),
            self.var3.clone(),
            self.var4.clone(),
            self.var5.clone(),
            self.var6.clone(),
            self.var7.clone(),
            self.var8.clone(),
            self.var9.clone(),
            self.var10.clone(),
        ]
    }
}

/// `<task_list><task>…</task>…</task_list>` of `task-list`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TaskListXml {
    #[serde(default)]
    pub task: Vec<TaskXml>,
}

/// One campaign ("群发任务").
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct TaskXml {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub sn: String,
    #[serde(default)]
    pub tpl_name: String,
    #[serde(default)]
    pub list_id: String,
    #[serde(default)]
    pub list_name: String,
    #[serde(default)]
    pub send_time: String,
    #[serde(default)]
    pub time_start: String,
    #[serde(default)]
    pub send_status: String,
    #[serde(default)]
    pub track_status: String,
}

/// `<data><user>…</user>…</data>` of `open-detail`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct OpenDetailXml {
    #[serde(default)]
    pub user: Vec<OpenXml>,
}

/// One recipient's opens of a campaign.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct OpenXml {
    #[serde(default)]
    pub email: String,
    #[serde(default)]
    pub open_total: String,
    #[serde(default)]
    pub open_first: String,
    #[serde(default)]
    pub open_last: String,
    #[serde(default)]
    pub click_total: String,
}

/// `<data><click>…</click>…</data>` of `click-detail`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ClickDetailXml {
    #[serde(default)]
    pub click: Vec<ClickXml>,
}

/// One recipient's clicks on one link of a campaign.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct ClickXml {
    #[serde(default)]
    pub email: String,
    #[serde(default)]
    pub link: String,
    #[serde(default)]
    pub click_total: String,
    #[serde(default)]
    pub click_first: String,
    #[serde(default)]
    pub click_last: String,
}

/// Parses an id that may be written as a number or a numeric string.
pub fn parse_id(raw: &str) -> Option<i64> {
    raw.trim().parse::<i64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: for<'de> Deserialize<'de>>(body: &str, expected_root: &str) -> T {
        let (doc, root) = normalize(body.as_bytes()).expect("normalize");
        read(&doc, &root, expected_root).expect("read")
    }

    /// The `result` shape as the documents print it: declaration, blank
    /// lines between elements.
    #[test]
    fn result_with_blank_lines_is_read() {
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\n<result>\n\n\n<status>success</status>\n\n\n<data>添加成功</data>\n\n</result>\n";
        let r: ResultXml = parse(body, "result");
        assert_eq!(r.status, "success");
        assert_eq!(r.data, "添加成功");
        assert_eq!(r.id, None);
    }

    #[test]
    fn result_with_cdata_and_id_is_read() {
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<result><status><![CDATA[success]]></status><data><![CDATA[ok <b>&</b>]]></data><id>77</id></result>";
        let r: ResultXml = parse(body, "result");
        assert_eq!(r.status, "success");
        assert_eq!(r.data, "ok <b>&</b>");
        assert_eq!(r.id.as_deref().and_then(parse_id), Some(77));
    }

    #[test]
    fn error_result_carries_its_code() {
        let r: ResultXml = parse(
            "<result><status>add_maillist_error</status><data>错误</data></result>",
            "result",
        );
        assert_eq!(r.status, "add_maillist_error");
    }

    /// maillist-list as documented, with the `descrīption` spelling.
    #[test]
    fn maillist_list_with_non_ascii_description_tag_is_read() {
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\n<maillist>\n\n\n<item>\n\n\n\n<id>1</id>\n\n\n\n<subject>客户</subject>\n\n\n\n<descrīption>CRM 同步</descrīption>\n\n\n\n<count>2</count>\n\n\n\n<status>enabled</status>\n\n\n</item>\n<item><id>2</id><subject>VIP</subject><descrīption></descrīption><count>0</count><status>disabled</status></item>\n\n</maillist>";
        let lists: MailListsXml = parse(body, "maillist");
        assert_eq!(lists.item.len(), 2);
        assert_eq!(lists.item[0].description, "CRM 同步");
        assert_eq!(lists.item[0].subject, "客户");
        assert_eq!(lists.item[1].description, "");
        assert_eq!(lists.item[1].status, "disabled");
    }

    #[test]
    fn empty_maillist_is_an_empty_vec() {
        let lists: MailListsXml = parse("<maillist></maillist>", "maillist");
        assert!(lists.item.is_empty());
        let lists: MailListsXml = parse("<maillist/>", "maillist");
        assert!(lists.item.is_empty());
    }

    /// maillist-detail as documented: closed by `</aillist>`.
    #[test]
    fn maillist_detail_closed_by_misspelt_end_tag_is_read() {
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\n<maillist>\n\n<id>3</id>\n\n<subject>分类</subject>\n\n<descrīption>说明</descrīption>\n\n<count>5</count>\n\n<status>enabled</status>\n\n</aillist>";
        let list: MailListXml = parse(body, "maillist");
        assert_eq!(list.id, "3");
        assert_eq!(list.count, "5");
    }

    /// ml-addr-list as documented: `</ fullname >` with spaces, indentation,
    /// empty vars, ids as numbers.
    #[test]
    fn addr_list_with_spaced_tag_and_empty_values_is_read() {
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\n<data>\n\n\n<addr>\n\n    <id>11</id>\n\n\n  <list_id>1</list_id>\n\n\n  <address>a@b.cn</address>\n\n\n  <fullname>张三</ fullname >\n\n\n  <time>2024-01-01 10:00:00</time>\n\n  <var1>北京</var1>\n\n\n  <var2></var2>\n  <var3/>\n  </addr>\n\n<addr><id> 12 </id><list_id>1</list_id><address>c@d.cn</address>< fullname >李四</ fullname ><var10>x</var10></addr>\n\n</data>";
        let list: AddrListXml = parse(body, "data");
        assert_eq!(list.addr.len(), 2);
        assert_eq!(list.addr[0].fullname, "张三");
        assert_eq!(list.addr[0].var1, "北京");
        assert_eq!(list.addr[0].var2, "");
        assert_eq!(list.addr[0].var3, "");
        assert_eq!(parse_id(&list.addr[1].id), Some(12));
        assert_eq!(list.addr[1].fullname, "李四");
        assert_eq!(list.addr[1].vars()[9], "x");
    }

    #[test]
    fn empty_addr_list_is_an_empty_vec() {
        let list: AddrListXml = parse("<?xml version=\"1.0\"?>\n<data>\n</data>\n", "data");
        assert!(list.addr.is_empty());
    }

    /// The open/click detail examples end with `<data>` instead of `</data>`.
    #[test]
    fn document_ending_in_its_root_start_tag_is_closed() {
        let body = "<data>\n<addr><id>1</id><address>a@b.cn</address></addr>\n<data>";
        let list: AddrListXml = parse(body, "data");
        assert_eq!(list.addr.len(), 1);
        let body = "<data>\n<addr><id>1</id></addr>\n<data>\n";
        let list: AddrListXml = parse(body, "data");
        assert_eq!(list.addr.len(), 1);
    }

    /// A truncated body must not pass for a complete one.
    #[test]
    fn body_cut_short_is_an_error_not_a_closed_document() {
        for body in [
            "<result><status>succ",
            "<result><status>success</status><data>ok",
            "<data><addr><id>1</id>",
            "<data><addr><id>1</id></addr>",
            "<data><addr>",
        ] {
            let err = normalize(body.as_bytes()).unwrap_err();
            assert!(
                matches!(err, XmlError::Syntax(ref m) if m.contains("cut short")),
                "{body}: {err:?}"
            );
        }
    }

    /// task-list as documented, with fields the daemon does not use.
    #[test]
    fn task_list_is_read() {
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<task_list>\n<task>\n<id>31</id>\n<sn>20261120-31</sn>\n<acct_type>domain</acct_type>\n<tpl_id>5</tpl_id>\n<tpl_name><![CDATA[双十一促销]]></tpl_name>\n<list_id>1</list_id>\n<list_name>客户</list_name>\n<send_time>2026-11-20 10:00</send_time>\n<time_start>2026-11-20 10:00:05</time_start>\n<send_status>3</send_status>\n<track_status>2</track_status>\n</task>\n<task><id>32</id><send_status>1</send_status><track_status></track_status></task>\n</task_list>";
        let tasks: TaskListXml = parse(body, "task_list");
        assert_eq!(tasks.task.len(), 2);
        assert_eq!(tasks.task[0].tpl_name, "双十一促销");
        assert_eq!(tasks.task[0].track_status, "2");
        assert_eq!(tasks.task[1].track_status, "");
    }

    /// open-detail as documented: it ends with `<data>` instead of `</data>`.
    #[test]
    fn open_detail_with_unclosed_data_is_read() {
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<data>\n<user>\n<email_id>9</email_id>\n<email>a@x.cn</email>\n<browser>Chrome</browser>\n<os>Windows</os>\n<ip_first>1.2.3.4</ip_first>\n<ip_last>1.2.3.4</ip_last>\n<open_total>3</open_total>\n<click_total>1</click_total>\n<open_first>2026-11-20 11:00:00</open_first>\n<open_last>2026-11-21 09:00:00</open_last>\n<click_first></click_first>\n<click_last></click_last>\n</user>\n<user><email>b@x.cn</email><open_total>1</open_total></user>\n<data>";
        let opens: OpenDetailXml = parse(body, "data");
        assert_eq!(opens.user.len(), 2);
        assert_eq!(opens.user[0].open_total, "3");
        assert_eq!(opens.user[0].open_last, "2026-11-21 09:00:00");
        assert_eq!(opens.user[1].email, "b@x.cn");
    }

    /// click-detail as documented, also ending with `<data>`.
    #[test]
    fn click_detail_with_unclosed_data_is_read() {
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<data>\n<click>\n<click_id>1</click_id>\n<email>a@x.cn</email>\n<link><![CDATA[https://shop.example.cn/?a=1&b=2]]></link>\n<click_unique>1</click_unique>\n<click_total>2</click_total>\n<click_first>2026-11-20 11:05:00</click_first>\n<click_last>2026-11-20 11:06:00</click_last>\n</click>\n<data>";
        let clicks: ClickDetailXml = parse(body, "data");
        assert_eq!(clicks.click.len(), 1);
        assert_eq!(clicks.click[0].link, "https://shop.example.cn/?a=1&b=2");
        assert_eq!(clicks.click[0].click_total, "2");
    }

    #[test]
    fn unknown_elements_are_ignored() {
        let body =
            "<result><status>success</status><extra><x>1</x></extra><data>ok</data></result>";
        let r: ResultXml = parse(body, "result");
        assert_eq!(r.data, "ok");
    }

    #[test]
    fn gbk_declared_body_is_decoded() {
        let (bytes, _, _) = encoding_rs::GBK.encode(
            "<?xml version=\"1.0\" encoding=\"GBK\"?><result><status>success</status><data>成功</data></result>",
        );
        let (doc, root) = normalize(&bytes).unwrap();
        let r: ResultXml = read(&doc, &root, "result").unwrap();
        assert_eq!(r.data, "成功");
    }

    #[test]
    fn invalid_utf8_is_an_encoding_error() {
        let err = normalize(b"<result>\xff\xfe</result>").unwrap_err();
        assert_eq!(err, XmlError::Encoding("UTF-8".into()));
    }

    #[test]
    fn html_error_page_is_not_mistaken_for_an_answer() {
        let body = "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>oops</body></html>";
        let (doc, root) = normalize(body.as_bytes()).unwrap();
        let err = read::<ResultXml>(&doc, &root, "result").unwrap_err();
        assert!(matches!(err, XmlError::UnexpectedRoot { .. }), "{err:?}");
    }

    /// Whitespace between two entity references, or between one and the
    /// end of the value, is part of the value; whitespace between elements
    /// is layout.
    #[test]
    fn spaces_between_entity_references_are_kept() {
        // Arrange
        let body = "<data>\n  <addr>\n    <id>1</id>\n    <address>a@b.cn</address>\n    <fullname>x &amp; &lt;y&gt;</fullname>\n    <var1>&amp; &amp;  &gt;</var1>\n    <var2> &lt;a&gt; &amp; b </var2>\n    <var3>&amp;&#32;&lt;</var3>\n  </addr>\n</data>";

        // Act
        let list: AddrListXml = parse(body, "data");

        // Assert
        assert_eq!(list.addr.len(), 1);
        assert_eq!(list.addr[0].fullname, "x & <y>");
        assert_eq!(list.addr[0].var1, "& &  >");
        assert_eq!(list.addr[0].var2, "<a> & b");
        assert_eq!(list.addr[0].var3, "& <");
    }

    /// Real servers pad values with spaces, tabs and CR/LF inside the
    /// elements: every value reads trimmed, inner spaces kept.
    #[test]
    fn values_padded_with_white_space_read_trimmed() {
        // Arrange
        let body = "<data>\r\n<addr>\r\n\t<id>\r\n 11 \r\n</id>\r\n\t<address> a@b.cn </address>\r\n\t<fullname>\r\n  王小明 \r\n</fullname>\r\n\t<var1>\t北京 朝阳\t</var1>\r\n\t<var2> &amp; x &amp; </var2>\r\n\t<var3><![CDATA[ 上海 ]]></var3>\r\n\t<var4> \r\n </var4>\r\n</addr>\r\n</data>";
        let result =
            "<result>\r\n<status>\r\n success\r\n </status>\r\n<data> 添加成功 </data></result>";

        // Act
        let list: AddrListXml = parse(body, "data");
        let r: ResultXml = parse(result, "result");

        // Assert
        let a = &list.addr[0];
        assert_eq!(
            (a.id.as_str(), a.address.as_str(), a.fullname.as_str()),
            ("11", "a@b.cn", "王小明")
        );
        assert_eq!(a.var1, "北京 朝阳");
        assert_eq!(a.var2, "& x &");
        assert_eq!(a.var3, "上海");
        assert_eq!(a.var4, "");
        assert_eq!(
            (r.status.as_str(), r.data.as_str()),
            ("success", "添加成功")
        );
    }

    #[test]
    fn empty_and_non_xml_bodies_are_errors() {
        assert_eq!(normalize(b"  \n").unwrap_err(), XmlError::Empty);
        assert_eq!(normalize(b"just text").unwrap_err(), XmlError::NoRoot);
        assert!(normalize(b"<result><status>success</sta").is_err());
    }

    #[test]
    fn nbsp_entity_does_not_break_the_reader() {
        let r: ResultXml = parse(
            "<result><status>success</status><data>a&nbsp;b &amp; c</data></result>",
            "result",
        );
        assert_eq!(r.data, "a\u{a0}b & c");
    }

    #[test]
    fn text_with_a_lone_less_than_is_left_for_the_reader_to_reject() {
        // `< b` is not a whole tag, so it is not tightened into one.
        assert_eq!(tighten_spaced_tags("<x>a < b</x>"), "<x>a < b</x>");
        assert_eq!(tighten_spaced_tags("< x >1</ x >"), "<x>1</x>");
        assert_eq!(
            tighten_spaced_tags("<![CDATA[< y >]]>"),
            "<![CDATA[< y >]]>"
        );
    }
}
