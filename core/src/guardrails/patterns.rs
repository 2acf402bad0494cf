//! Forbidden argument patterns: compiled once per action, matched against every string value of
//! a tool call's arguments.
//!
//! The arguments are walked recursively (objects and arrays, any depth up to
//! [`MAX_DEPTH`]); object keys, numbers and booleans are not matched, as a guardrail that checks
//! parameter values. A clean walk allocates nothing; a hit reports the JSON path of the offending
//! value (`$.options.paths[2]`) and a short sanitised excerpt of the match, never the whole value
//! (arguments may hold secrets or megabytes).

use std::sync::OnceLock;

use regex::{Regex, RegexSet, RegexSetBuilder};
use serde_json::Value;

/// Deeper arguments are refused: serde_json's own parser stops at 128 levels too.
pub const MAX_DEPTH: usize = 128;

/// The longest excerpt of a match shown in a violation, in characters.
pub const MAX_EXCERPT_CHARS: usize = 40;

const MAX_KEY_CHARS: usize = 64;

/// The forbidden patterns of one action (case-insensitive), checked when configured and
/// compiled for matching on the first scan: the automata of the default patterns take ~1.2 MB,
/// which a deployment that never scans tool arguments should not hold.
#[derive(Clone, Debug)]
pub struct Patterns {
    sources: Vec<String>,
    compiled: OnceLock<Compiled>,
}

#[derive(Clone, Debug)]
struct Compiled {
    set: RegexSet,
    // Individual regexes, used only after the set matched, to locate the match for the excerpt.
    each: Vec<Regex>,
}

impl Compiled {
    fn build<S: AsRef<str>>(sources: &[S]) -> Result<Compiled, regex::Error> {
        let set = RegexSetBuilder::new(sources).case_insensitive(true).build()?;
        let each = sources
            .iter()
            .map(|s| regex::RegexBuilder::new(s.as_ref()).case_insensitive(true).build())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Compiled { set, each })
    }
}

impl PartialEq for Patterns {
    fn eq(&self, other: &Self) -> bool {
        self.sources == other.sources
    }
}

impl Patterns {
    /// Checks that `sources` compile (case-insensitively); the compiled form is dropped and
    /// built again on the first [`Patterns::scan`].
    pub fn compile<S: AsRef<str>>(sources: &[S]) -> Result<Patterns, regex::Error> {
        Compiled::build(sources)?;
        let sources = sources.iter().map(|s| s.as_ref().to_owned()).collect();
        Ok(Patterns { sources, compiled: OnceLock::new() })
    }

    fn compiled(&self) -> &Compiled {
        self.compiled.get_or_init(|| {
            Compiled::build(&self.sources).expect("patterns compiled when they were configured")
        })
    }

    /// The pattern sources, in configuration order.
    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    pub fn len(&self) -> usize {
        self.sources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// The index of the first pattern `text` matches, if any: one pass of the compiled set.
    pub fn first_match(&self, text: &str) -> Option<usize> {
        let c = self.compiled();
        if !c.set.is_match(text) {
            return None;
        }
        c.set.matches(text).iter().next()
    }

    /// The source of pattern `index` and a short excerpt of its match in `text`.
    pub fn describe(&self, index: usize, text: &str) -> (String, String) {
        let excerpt = self
            .compiled()
            .each
            .get(index)
            .and_then(|r| r.find(text))
            .map(|m| excerpt(m.as_str()))
            .unwrap_or_default();
        (self.sources.get(index).cloned().unwrap_or_default(), excerpt)
    }

    /// The first string in `args` that matches a pattern, or arguments nested too deeply.
    pub fn scan(&self, args: &Value) -> Option<Finding> {
        if self.is_empty() {
            return None;
        }
        let hit = self.walk(args, 0)?;
        let mut path = String::from("$");
        for seg in hit.path_rev.iter().rev() {
            match seg {
                Seg::Index(i) => path.push_str(&format!("[{i}]")),
                Seg::Key(k) => push_key(&mut path, k),
            }
        }
        Some(match hit.kind {
            HitKind::Pattern { index, value } => {
                let excerpt = self
                    .compiled()
                    .each
                    .get(index)
                    .and_then(|r| r.find(value))
                    .map(|m| excerpt(m.as_str()))
                    .unwrap_or_default();
                Finding::Pattern {
                    path,
                    pattern: self.sources().get(index).cloned().unwrap_or_default(),
                    excerpt,
                }
            }
            HitKind::TooDeep => Finding::TooDeep { path },
        })
    }

    fn walk<'v>(&self, v: &'v Value, depth: usize) -> Option<Hit<'v>> {
        self.walk_in(self.compiled(), v, depth)
    }

    fn walk_in<'v>(&self, c: &Compiled, v: &'v Value, depth: usize) -> Option<Hit<'v>> {
        if depth > MAX_DEPTH {
            return Some(Hit { kind: HitKind::TooDeep, path_rev: Vec::new() });
        }
        match v {
            Value::String(s) => {
                if !c.set.is_match(s) {
                    return None;
                }
                let index = c.set.matches(s).iter().next().unwrap_or(0);
                Some(Hit { kind: HitKind::Pattern { index, value: s }, path_rev: Vec::new() })
            }
            Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
                let mut hit = self.walk_in(c, item, depth + 1)?;
                hit.path_rev.push(Seg::Index(i));
                Some(hit)
            }),
            Value::Object(map) => map.iter().find_map(|(k, item)| {
                let mut hit = self.walk_in(c, item, depth + 1)?;
                hit.path_rev.push(Seg::Key(k));
                Some(hit)
            }),
            Value::Null | Value::Bool(_) | Value::Number(_) => None,
        }
    }
}

/// What [`Patterns::scan`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// `pattern` matched the string at `path`; `excerpt` is the sanitised, capped match.
    Pattern { path: String, pattern: String, excerpt: String },
    /// The arguments nest deeper than [`MAX_DEPTH`] at `path`.
    TooDeep { path: String },
}

struct Hit<'v> {
    kind: HitKind<'v>,
    path_rev: Vec<Seg<'v>>,
}

enum HitKind<'v> {
    Pattern { index: usize, value: &'v str },
    TooDeep,
}

enum Seg<'v> {
    Index(usize),
    Key(&'v str),
}

pub(crate) fn push_key(path: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key.len() <= MAX_KEY_CHARS
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        path.push('.');
        path.push_str(key);
    } else {
        path.push_str("[\"");
        path.push_str(&sanitise(key, MAX_KEY_CHARS).replace('"', "\\\""));
        path.push_str("\"]");
    }
}

/// `text` capped at [`MAX_EXCERPT_CHARS`] characters, control characters replaced by `?`.
pub fn excerpt(text: &str) -> String {
    sanitise(text, MAX_EXCERPT_CHARS)
}

fn sanitise(text: &str, max_chars: usize) -> String {
    let mut out: String =
        text.chars().take(max_chars).map(|c| if c.is_control() { '?' } else { c }).collect();
    if text.chars().nth(max_chars).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(sources: &[&str]) -> Patterns {
        Patterns::compile(sources).unwrap()
    }

    #[test]
    fn finds_strings_at_any_depth_with_their_path() {
        let pats = p(&[r"DROP\s+TABLE", r"mkfs"]);
        let cases = [
            (json!({"sql": "select 1"}), None),
            (json!({"sql": "drop  table users"}), Some(("$.sql", r"DROP\s+TABLE", "drop  table"))),
            (json!({"a": {"b": [1, "ok", "sudo MKFS.ext4"]}}), Some(("$.a.b[2]", "mkfs", "MKFS"))),
            (json!(["x", {"odd key": "mkfs"}]), Some(("$[1][\"odd key\"]", "mkfs", "mkfs"))),
            (json!("mkfs"), Some(("$", "mkfs", "mkfs"))),
            (json!({"mkfs": 1, "n": null, "b": true}), None),
        ];
        for (args, want) in cases {
            let got = pats.scan(&args);
            let want = want.map(|(path, pattern, excerpt)| Finding::Pattern {
                path: path.into(),
                pattern: pattern.into(),
                excerpt: excerpt.into(),
            });
            assert_eq!(got, want, "{args}");
        }
    }

    #[test]
    fn excerpts_are_capped_and_sanitised() {
        let pats = p(&[r"secret.*"]);
        let long = format!("secret\t{}", "x".repeat(10_000));
        let Some(Finding::Pattern { excerpt, .. }) = pats.scan(&json!({ "k": long })) else {
            panic!("no finding");
        };
        assert_eq!(excerpt.chars().count(), MAX_EXCERPT_CHARS + 1);
        assert!(excerpt.starts_with("secret?xxx") && excerpt.ends_with('…'), "{excerpt}");
    }

    #[test]
    fn too_deep_arguments_are_reported() {
        let mut v = json!("leaf");
        for _ in 0..(MAX_DEPTH + 5) {
            v = json!([v]);
        }
        assert!(matches!(p(&["nothing"]).scan(&v), Some(Finding::TooDeep { .. })));
        assert_eq!(p(&[]).scan(&v), None);
    }

    #[test]
    fn bad_patterns_do_not_compile() {
        assert!(Patterns::compile(&["(unclosed"]).is_err());
    }
}
