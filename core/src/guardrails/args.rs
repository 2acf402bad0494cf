//! One walk over a tool call's arguments for everything an action policy checks in them: the
//! forbidden patterns (every string value, at any depth), the allowed resources (the string
//! values of arguments that name a resource), and the bounds (depth and total size; arguments
//! over a bound are refused, never skipped).
//!
//! The walk borrows and allocates nothing until it finds something; the finding's JSON path
//! (`$.options.paths[2]`, or `$query.cmd` for a query parameter) is built only then.

use serde_json::Value;

use super::patterns::{self, push_key, MAX_DEPTH};
use super::{ActionPolicy, Violation};

/// The most bytes of argument strings (values and keys) one call may carry: a call over it is
/// refused (`arguments_too_large`), because its arguments would not all be checked in time.
pub const MAX_ARGUMENT_BYTES: usize = 256 * 1024;

/// The argument names (object keys, ASCII case ignored) whose string values name a resource
/// and are checked against `allowed_resources`; an array under such a key has each of its
/// strings checked.
pub const RESOURCE_KEYS: [&str; 16] = [
    "path",
    "paths",
    "file",
    "files",
    "file_path",
    "filepath",
    "filename",
    "dir",
    "directory",
    "url",
    "urls",
    "uri",
    "resource",
    "target",
    "destination",
    "location",
];

/// One set of arguments to walk: its value and the name of its root in paths (`$`, `$query`).
pub struct Part<'v> {
    pub root: &'static str,
    pub value: &'v Value,
}

/// The first violation in `parts` under `policy`, in walk order, if any. `bytes` is the budget
/// already used (several parts share it).
pub fn check(policy: &ActionPolicy, parts: &[Part<'_>]) -> Option<Violation> {
    let patterns = policy.forbidden.as_ref().filter(|p| !p.is_empty());
    let resources = &policy.allowed_resources[..];
    let mut walk = Walk { patterns, resources, bytes: 0 };
    for part in parts {
        if let Some(hit) = walk.value(part.value, 0, false) {
            return Some(hit.into_violation(part.root, patterns));
        }
    }
    None
}

/// Whether `value` lies under one of `prefixes`: it starts with the prefix at a boundary (the
/// prefix ends with `/`, or the value ends or goes on with `/`, `?` or `#` right after it),
/// and it has no `..` segment (in plain or percent-encoded form) that could climb out.
pub fn allowed(value: &str, prefixes: &[String]) -> bool {
    if value.split(['/', '\\']).any(|seg| seg == "..") {
        return false;
    }
    let lower_has = |needle: &str| {
        value.as_bytes().windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
    };
    if lower_has("%2e%2e") || lower_has("%2e.") || lower_has(".%2e") {
        return false;
    }
    prefixes.iter().any(|p| {
        value.starts_with(p.as_str())
            && (p.ends_with('/')
                || value.len() == p.len()
                || matches!(value.as_bytes()[p.len()], b'/' | b'?' | b'#'))
    })
}

struct Walk<'p> {
    patterns: Option<&'p patterns::Patterns>,
    resources: &'p [String],
    bytes: usize,
}

enum Kind<'v> {
    Pattern { index: usize, value: &'v str },
    Resource { value: &'v str },
    TooDeep,
    TooLarge,
}

enum Seg<'v> {
    Index(usize),
    Key(&'v str),
}

struct Hit<'v> {
    kind: Kind<'v>,
    path_rev: Vec<Seg<'v>>,
}

impl Hit<'_> {
    fn into_violation(self, root: &str, patterns: Option<&patterns::Patterns>) -> Violation {
        let mut path = String::from(root);
        for seg in self.path_rev.iter().rev() {
            match seg {
                Seg::Index(i) => {
                    path.push('[');
                    path.push_str(&i.to_string());
                    path.push(']');
                }
                Seg::Key(k) => push_key(&mut path, k),
            }
        }
        match self.kind {
            Kind::Pattern { index, value } => {
                let (pattern, excerpt) =
                    patterns.map(|p| p.describe(index, value)).unwrap_or_default();
                Violation::ForbiddenPattern { path, pattern, excerpt }
            }
            Kind::Resource { value } => {
                Violation::ResourceNotAllowed { path, excerpt: patterns::excerpt(value) }
            }
            Kind::TooDeep => Violation::ArgumentsTooDeep { path },
            Kind::TooLarge => Violation::ArgumentsTooLarge { max_bytes: MAX_ARGUMENT_BYTES },
        }
    }
}

fn is_resource_key(key: &str) -> bool {
    RESOURCE_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key))
}

impl<'p> Walk<'p> {
    fn take(&mut self, n: usize) -> bool {
        self.bytes = self.bytes.saturating_add(n);
        self.bytes <= MAX_ARGUMENT_BYTES
    }

    fn value<'v>(&mut self, v: &'v Value, depth: usize, resource: bool) -> Option<Hit<'v>> {
        if depth > MAX_DEPTH {
            return Some(Hit { kind: Kind::TooDeep, path_rev: Vec::new() });
        }
        let hit = |kind| Some(Hit { kind, path_rev: Vec::new() });
        match v {
            Value::String(s) => {
                if !self.take(s.len()) {
                    return hit(Kind::TooLarge);
                }
                if let Some(index) = self.patterns.and_then(|p| p.first_match(s)) {
                    return hit(Kind::Pattern { index, value: s });
                }
                if resource && !self.resources.is_empty() && !allowed(s, self.resources) {
                    return hit(Kind::Resource { value: s });
                }
                None
            }
            Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
                let mut hit = self.value(item, depth + 1, resource)?;
                hit.path_rev.push(Seg::Index(i));
                Some(hit)
            }),
            Value::Object(map) => map.iter().find_map(|(k, item)| {
                if !self.take(k.len()) {
                    return Some(Hit { kind: Kind::TooLarge, path_rev: Vec::new() });
                }
                let mut hit = self.value(item, depth + 1, is_resource_key(k))?;
                hit.path_rev.push(Seg::Key(k));
                Some(hit)
            }),
            Value::Null | Value::Bool(_) | Value::Number(_) => None,
        }
    }
}

/// The query string's parameters as a JSON object of strings (a parameter given more than once
/// keeps every value, as an array), percent-decoded (`+` as a space), so that they are walked
/// like a JSON body. Undecodable bytes are kept as U+FFFD: a pattern still sees the rest.
pub fn query_object(query: &str) -> Value {
    let mut map = serde_json::Map::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (decode(k), decode(v));
        match map.get_mut(&k) {
            Some(Value::Array(items)) => items.push(Value::String(v)),
            Some(first) => {
                let first = first.take();
                map.insert(k, Value::Array(vec![first, Value::String(v)]));
            }
            None => {
                map.insert(k, Value::String(v));
            }
        }
    }
    Value::Object(map)
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let hex = |c: u8| (c as char).to_digit(16);
        match b {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b),
            },
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_match_at_a_boundary_and_never_climb_out() {
        let p = vec!["/workspace".to_string(), "https://api.example.com/v1/".to_string()];
        for ok in ["/workspace", "/workspace/a.txt", "https://api.example.com/v1/x?q=1"] {
            assert!(allowed(ok, &p), "{ok}");
        }
        for bad in [
            "/workspace-evil/a",
            "/workspace/../etc/passwd",
            "/workspace/%2e%2e/etc",
            "/etc/passwd",
            "https://api.example.com/v2/x",
            "notes.txt",
        ] {
            assert!(!allowed(bad, &p), "{bad}");
        }
    }

    #[test]
    fn query_strings_decode_into_an_object() {
        let v = query_object("cmd=rm+-rf+%2F&x=1&x=2&flag");
        assert_eq!(v, serde_json::json!({"cmd": "rm -rf /", "x": ["1", "2"], "flag": ""}));
        assert_eq!(query_object("a=%zz%4"), serde_json::json!({"a": "%zz%4"}));
    }
}
