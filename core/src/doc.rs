//! Config documents (YAML or JSON) with positions, and a decoder that reports every error.
//!
//! `serde` stops at the first error and forgets where it was. Operators editing a policy want
//! the whole list at once, each with the field path and line: `rules[3].match.model (line 14,
//! column 9): expected a string`. So documents are parsed into a [`Node`] tree that keeps the
//! line and column of every value, and decoded by hand with [`Cx`], which collects errors and
//! keeps going. JSON is read by the same YAML 1.2 parser (JSON is its flow subset), so the wasm
//! filter's JSON plugin configuration and the proxy's YAML files share one loader.
//!
//! Scalars keep their source text: `3.00` stays `"3.00"` until [`Field::money`] parses it as an
//! exact decimal, so no price ever passes through `f64`.

use std::collections::HashMap;
use std::fmt;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::money::Money;

/// A value in a config document, with its position (1-based line and column).
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub value: Value,
    pub line: u32,
    pub col: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    /// A scalar's source text; `quoted` scalars are always strings.
    Scalar {
        text: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    /// Keys in document order, each with its own position.
    Map(Vec<(Node, Node)>),
}

/// One problem in a document, located by field path and position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocError {
    /// `rules[3].match.model`; empty for the document root.
    pub path: String,
    pub line: u32,
    pub col: u32,
    pub message: String,
}

impl fmt::Display for DocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() { "(document)" } else { &self.path };
        write!(f, "{path} (line {}, column {}): {}", self.line, self.col, self.message)
    }
}

/// Every error found in a document, in document order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct DocErrors(pub Vec<DocError>);

impl fmt::Display for DocErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} error{} in document", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl DocErrors {
    /// Prefixes each error's path (e.g. with `policy.`) when a document is embedded in another.
    pub fn nested_in(mut self, prefix: &str) -> Self {
        for e in &mut self.0 {
            e.path =
                if e.path.is_empty() { prefix.to_string() } else { format!("{prefix}.{}", e.path) };
        }
        self
    }
}

/// Parses YAML or JSON text into a positioned tree. An empty document is `Null`.
pub fn parse(text: &str) -> Result<Node, DocErrors> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, false) {
        let m = e.marker();
        return Err(DocErrors(vec![DocError {
            path: String::new(),
            line: line_of(m),
            col: m.col() as u32 + 1,
            message: format!("syntax error: {}", e.info()),
        }]));
    }
    if let Some(err) = builder.error {
        return Err(DocErrors(vec![err]));
    }
    Ok(builder.root.unwrap_or(Node { value: Value::Null, line: 1, col: 1 }))
}

fn line_of(m: &Marker) -> u32 {
    // yaml-rust2 counts lines from 1 but reports errors at end of input past the last line.
    m.line().max(1) as u32
}

#[derive(Default)]
struct Builder {
    stack: Vec<(Node, usize)>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    error: Option<DocError>,
}

impl Builder {
    fn push_value(&mut self, node: Node) {
        match self.stack.last_mut() {
            Some((parent, _)) => match &mut parent.value {
                Value::Seq(items) => items.push(node),
                Value::Map(entries) => {
                    // Keys and values arrive alternately; a pending key has a Null placeholder.
                    match entries.last_mut() {
                        Some((_, v)) if v.line == 0 => *v = node,
                        _ => entries.push((node, Node { value: Value::Null, line: 0, col: 0 })),
                    }
                }
                _ => {}
            },
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let (line, col) = (line_of(&mark), mark.col() as u32 + 1);
        match ev {
            Event::Scalar(text, style, anchor, _tag) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                let value =
                    if !quoted && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL") {
                        Value::Null
                    } else {
                        Value::Scalar { text, quoted }
                    };
                let node = Node { value, line, col };
                if anchor > 0 {
                    self.anchors.insert(anchor, node.clone());
                }
                self.push_value(node);
            }
            Event::SequenceStart(anchor, _) => {
                self.stack.push((Node { value: Value::Seq(Vec::new()), line, col }, anchor));
            }
            Event::MappingStart(anchor, _) => {
                self.stack.push((Node { value: Value::Map(Vec::new()), line, col }, anchor));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((node, anchor)) = self.stack.pop() {
                    if anchor > 0 {
                        self.anchors.insert(anchor, node.clone());
                    }
                    self.push_value(node);
                }
            }
            Event::Alias(id) => match self.anchors.get(&id) {
                Some(node) => {
                    let node = node.clone();
                    self.push_value(node);
                }
                None => {
                    self.error.get_or_insert(DocError {
                        path: String::new(),
                        line,
                        col,
                        message: "alias refers to an unknown anchor".into(),
                    });
                }
            },
            _ => {}
        }
    }
}

impl Node {
    /// The scalar text, if this is a scalar.
    pub fn scalar(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match &self.value {
            Value::Null => "null",
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// The decoding context: collects errors and keeps going.
#[derive(Debug, Default)]
pub struct Cx {
    errors: Vec<DocError>,
}

impl Cx {
    pub fn new() -> Self {
        Cx::default()
    }

    /// Records an error at `node`.
    pub fn error(&mut self, path: &str, node: &Node, message: impl Into<String>) {
        self.errors.push(DocError {
            path: path.to_string(),
            line: node.line,
            col: node.col,
            message: message.into(),
        });
    }

    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// `Ok(value)` if no error was recorded, otherwise all of them in document order.
    pub fn finish<T>(mut self, value: T) -> Result<T, DocErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            self.errors.sort_by_key(|e| (e.line, e.col));
            Err(DocErrors(self.errors))
        }
    }

    /// Opens `node` as an object, or records "expected a mapping".
    pub fn object<'a>(&mut self, field: &Field<'a>) -> Option<Obj<'a>> {
        match &field.node.value {
            Value::Map(entries) => {
                let mut seen: Vec<&str> = Vec::with_capacity(entries.len());
                for (k, _) in entries {
                    let key = k.scalar().unwrap_or("");
                    if seen.contains(&key) {
                        self.error(&field.path, k, format!("duplicate key `{key}`"));
                    }
                    seen.push(key);
                }
                Some(Obj {
                    node: field.node,
                    path: field.path.clone(),
                    used: vec![false; entries.len()],
                })
            }
            _ => {
                self.error(
                    &field.path,
                    field.node,
                    format!("expected a mapping, found {}", field.node.kind()),
                );
                None
            }
        }
    }
}

/// A value being decoded, with its path.
#[derive(Clone, Debug)]
pub struct Field<'a> {
    pub node: &'a Node,
    pub path: String,
}

impl<'a> Field<'a> {
    /// The document root.
    pub fn root(node: &'a Node) -> Self {
        Field { node, path: String::new() }
    }

    fn child(&self, suffix: fmt::Arguments<'_>) -> String {
        if self.path.is_empty() {
            suffix.to_string().trim_start_matches('.').to_string()
        } else {
            format!("{}{}", self.path, suffix)
        }
    }

    /// The field `key` of this mapping, if it is one and has the key (not null), without
    /// recording anything: for a caller that looks at a section before decoding it.
    pub fn peek(&self, key: &str) -> Option<Field<'a>> {
        let Value::Map(entries) = &self.node.value else { return None };
        let (_, node) = entries.iter().find(|(k, _)| k.scalar() == Some(key))?;
        if matches!(node.value, Value::Null) {
            return None;
        }
        Some(Field { node, path: self.child(format_args!(".{key}")) })
    }

    pub fn is_null(&self) -> bool {
        matches!(self.node.value, Value::Null)
    }

    pub fn error(&self, cx: &mut Cx, message: impl Into<String>) {
        cx.error(&self.path, self.node, message);
    }

    /// A string (any scalar; plain `123` is the string "123").
    pub fn str(&self, cx: &mut Cx) -> Option<&'a str> {
        match &self.node.value {
            Value::Scalar { text, .. } => Some(text.as_str()),
            _ => {
                self.error(cx, format!("expected a string, found {}", self.node.kind()));
                None
            }
        }
    }

    /// A non-empty string.
    pub fn non_empty_str(&self, cx: &mut Cx) -> Option<&'a str> {
        let s = self.str(cx)?;
        if s.is_empty() {
            self.error(cx, "must not be empty");
            return None;
        }
        Some(s)
    }

    /// An unsigned integer written without quotes (`600`, also `1_000`).
    pub fn u64(&self, cx: &mut Cx) -> Option<u64> {
        match &self.node.value {
            Value::Scalar { text, quoted: false } => match text.replace('_', "").parse() {
                Ok(n) => Some(n),
                Err(_) => {
                    self.error(cx, format!("expected a non-negative integer, found `{text}`"));
                    None
                }
            },
            _ => {
                self.error(
                    cx,
                    format!("expected a non-negative integer, found {}", self.describe()),
                );
                None
            }
        }
    }

    pub fn bool(&self, cx: &mut Cx) -> Option<bool> {
        match self.node.scalar() {
            Some("true" | "True" | "TRUE") => Some(true),
            Some("false" | "False" | "FALSE") => Some(false),
            _ => {
                self.error(cx, format!("expected true or false, found {}", self.describe()));
                None
            }
        }
    }

    /// An exact USD amount, quoted (`"3.00"`) or not (`3.00`).
    pub fn money(&self, cx: &mut Cx) -> Option<Money> {
        let text = self.node.scalar().filter(|_| !self.is_null());
        let Some(text) = text else {
            self.error(
                cx,
                format!("expected an amount in USD such as \"3.00\", found {}", self.node.kind()),
            );
            return None;
        };
        match Money::parse(text) {
            Ok(m) if m.is_negative() => {
                self.error(cx, format!("amount must not be negative, found `{text}`"));
                None
            }
            Ok(m) => Some(m),
            Err(e) => {
                self.error(cx, e.to_string());
                None
            }
        }
    }

    /// A duration with a unit: `"250ms"`, `"30s"`, `"15m"`, `"2h"`, `"1d"`.
    pub fn duration_ms(&self, cx: &mut Cx) -> Option<u64> {
        let parsed = self.node.scalar().and_then(crate::time::parse_duration_ms);
        if parsed.is_none() {
            self.error(
                cx,
                format!(
                    "expected a duration such as \"30s\", \"15m\" or \"250ms\", found {}",
                    self.describe()
                ),
            );
        }
        parsed
    }

    /// One of a fixed set of words.
    pub fn one_of(&self, cx: &mut Cx, allowed: &[&str]) -> Option<&'a str> {
        let s = self.str(cx)?;
        if allowed.contains(&s) {
            Some(s)
        } else {
            self.error(cx, format!("unknown value `{s}`, expected one of: {}", allowed.join(", ")));
            None
        }
    }

    /// The items of a list, each as a field `path[i]`.
    pub fn items(&self, cx: &mut Cx) -> Vec<Field<'a>> {
        match &self.node.value {
            Value::Seq(items) => items
                .iter()
                .enumerate()
                .map(|(i, node)| Field { node, path: self.child(format_args!("[{i}]")) })
                .collect(),
            _ => {
                self.error(cx, format!("expected a list, found {}", self.node.kind()));
                Vec::new()
            }
        }
    }

    /// A string or a list of strings (`model: gpt-4o` and `model: [gpt-4o, o3]` both work).
    pub fn str_list(&self, cx: &mut Cx) -> Vec<String> {
        match &self.node.value {
            Value::Scalar { text, .. } => vec![text.clone()],
            Value::Seq(_) => {
                self.items(cx).iter().filter_map(|f| f.str(cx).map(str::to_string)).collect()
            }
            _ => {
                self.error(
                    cx,
                    format!("expected a string or a list of strings, found {}", self.node.kind()),
                );
                Vec::new()
            }
        }
    }

    /// The entries of a mapping with free-form keys (e.g. model names), each as `path.key`.
    pub fn entries(&self, cx: &mut Cx) -> Vec<(&'a str, Field<'a>)> {
        match &self.node.value {
            Value::Map(entries) => entries
                .iter()
                .map(|(k, v)| {
                    let key = k.scalar().unwrap_or("");
                    (key, Field { node: v, path: self.child(format_args!(".{key}")) })
                })
                .collect(),
            _ => {
                self.error(cx, format!("expected a mapping, found {}", self.node.kind()));
                Vec::new()
            }
        }
    }

    fn describe(&self) -> String {
        match &self.node.value {
            Value::Scalar { text, .. } => format!("`{text}`"),
            _ => self.node.kind().to_string(),
        }
    }
}

/// A mapping being decoded: fields are taken one by one, and [`Obj::finish`] reports the keys
/// nobody asked for (strict, like serde's `deny_unknown_fields`, but listing them all).
#[derive(Debug)]
pub struct Obj<'a> {
    node: &'a Node,
    path: String,
    used: Vec<bool>,
}

impl<'a> Obj<'a> {
    fn entries(&self) -> &'a [(Node, Node)] {
        match &self.node.value {
            Value::Map(entries) => entries,
            _ => &[],
        }
    }

    /// The field `key`, if present and not null.
    pub fn get(&mut self, key: &str) -> Option<Field<'a>> {
        let entries = self.entries();
        let i = entries.iter().position(|(k, _)| k.scalar() == Some(key))?;
        self.used[i] = true;
        let node = &entries[i].1;
        if matches!(node.value, Value::Null) {
            return None;
        }
        let path =
            if self.path.is_empty() { key.to_string() } else { format!("{}.{key}", self.path) };
        Some(Field { node, path })
    }

    /// The field `key`, or an error naming it as missing.
    pub fn require(&mut self, cx: &mut Cx, key: &str) -> Option<Field<'a>> {
        let field = self.get(key);
        if field.is_none() {
            cx.error(&self.path, self.node, format!("missing required field `{key}`"));
        }
        field
    }

    /// Whether the mapping has `key` at all.
    pub fn has(&self, key: &str) -> bool {
        self.entries().iter().any(|(k, _)| k.scalar() == Some(key))
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn node(&self) -> &'a Node {
        self.node
    }

    /// Reports every key that was not read, naming the ones that are allowed.
    pub fn finish(self, cx: &mut Cx, allowed: &[&str]) {
        for (i, (k, _)) in self.entries().iter().enumerate() {
            if !self.used[i] {
                let key = k.scalar().unwrap_or("?");
                let path = if self.path.is_empty() {
                    key.to_string()
                } else {
                    format!("{}.{key}", self.path)
                };
                cx.error(
                    &path,
                    k,
                    format!("unknown field `{key}`, expected one of: {}", allowed.join(", ")),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_positions_are_one_based() {
        let doc = parse("a: 1\nb:\n  - x\n  - y\n").unwrap();
        let Value::Map(entries) = &doc.value else { panic!("not a map") };
        assert_eq!(entries[0].0.scalar(), Some("a"));
        assert_eq!((entries[0].1.line, entries[0].1.col), (1, 4));
        let Value::Seq(items) = &entries[1].1.value else { panic!("not a seq") };
        assert_eq!((items[1].line, items[1].col), (4, 5));
    }

    #[test]
    fn json_parses_with_the_same_loader() {
        let doc = parse("{\n  \"a\": \"3.00\",\n  \"b\": [1, 2]\n}").unwrap();
        let Value::Map(entries) = &doc.value else { panic!("not a map") };
        assert_eq!(entries[0].1.value, Value::Scalar { text: "3.00".into(), quoted: true });
        assert_eq!(entries[1].1.line, 3);
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = parse("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert!(err.0[0].line >= 2, "{err}");
        assert!(err.to_string().contains("syntax error"), "{err}");
    }

    #[test]
    fn decoder_reports_every_error_with_path_and_line() {
        let text = "name: x\nlimit: -3\nrate: abc\nitems:\n  - {n: 1}\n  - {n: two}\nextra: 1\n";
        let doc = parse(text).unwrap();
        let mut cx = Cx::new();
        let root = Field::root(&doc);
        let mut obj = cx.object(&root).unwrap();
        let _ = obj.require(&mut cx, "name").and_then(|f| f.str(&mut cx));
        let _ = obj.get("limit").and_then(|f| f.u64(&mut cx));
        let _ = obj.get("rate").and_then(|f| f.money(&mut cx));
        for item in obj.get("items").map(|f| f.items(&mut cx)).unwrap_or_default() {
            let mut o = cx.object(&item).unwrap();
            let _ = o.require(&mut cx, "n").and_then(|f| f.u64(&mut cx));
            o.finish(&mut cx, &["n"]);
        }
        let _ = obj.require(&mut cx, "missing");
        obj.finish(&mut cx, &["name", "limit", "rate", "items"]);
        let errors = cx.finish(()).unwrap_err().0;
        let got: Vec<(String, u32)> = errors.iter().map(|e| (e.path.clone(), e.line)).collect();
        assert_eq!(
            got,
            vec![
                (String::new(), 1),
                ("limit".into(), 2),
                ("rate".into(), 3),
                ("items[1].n".into(), 6),
                ("extra".into(), 7),
            ]
        );
        assert!(errors[0].message.contains("missing required field `missing`"));
        assert!(errors[4].message.contains("unknown field `extra`"));
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let doc = parse("a: 1\na: 2\n").unwrap();
        let mut cx = Cx::new();
        let _ = cx.object(&Field::root(&doc));
        let errors = cx.finish(()).unwrap_err().0;
        assert_eq!(errors[0].line, 2);
    }

    #[test]
    fn anchors_and_aliases_resolve() {
        let doc = parse("base: &b {x: 1}\nother: *b\n").unwrap();
        let Value::Map(entries) = &doc.value else { panic!("not a map") };
        assert_eq!(entries[0].1.value, entries[1].1.value);
    }
}
