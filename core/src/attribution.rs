//! Attribution: who pays for a request, read from its headers and checked before anything else.
//!
//! Decides whether a request's attribution headers (agent, cost center, project, and optional
//! business unit, tier and owner) are present and well-formed, and returns the identity they
//! name. "No exemptions, no bypass": a missing required header, a value that does not match its
//! pattern, or a value that contradicts the identity pinned to this sidecar (an agent cannot
//! bill another agent) is rejected, and the single error lists **every** bad header at once.
//! Error messages echo at most a short, sanitised prefix of a bad value, never the whole value.
//!
//! Patterns are compiled once, at load time, and always match the whole value (a pattern is
//! wrapped as `^(?:pattern)$`, so `[a-z]+` cannot accept `abc!`). Header names compare without
//! regard to ASCII case. On success nothing is allocated: the identity borrows the header
//! values (or the pinned values). This module never strips headers or talks to upstreams; the
//! adapters do, using [`Attribution::header_names`].

mod config;

use std::fmt;

use regex::Regex;

use crate::doc::{self, Cx, DocErrors, Field};

/// The identity fields attribution can fill, each read from one configured header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Attribute {
    Agent,
    CostCenter,
    Project,
    BusinessUnit,
    Tier,
    Owner,
}

impl Attribute {
    pub const ALL: [Attribute; 6] = [
        Attribute::Agent,
        Attribute::CostCenter,
        Attribute::Project,
        Attribute::BusinessUnit,
        Attribute::Tier,
        Attribute::Owner,
    ];
    pub const NAMES: [&'static str; 6] =
        ["agent", "cost_center", "project", "business_unit", "tier", "owner"];

    pub fn parse(text: &str) -> Option<Attribute> {
        let i = Self::NAMES.iter().position(|n| *n == text)?;
        Some(Self::ALL[i])
    }

    pub fn as_str(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The shipped header, pattern and requiredness (see the README's attribution section).
    pub fn default_spec(self) -> (&'static str, &'static str, bool) {
        match self {
            Attribute::Agent => ("x-agent-id", "^[a-z0-9-]+$", true),
            Attribute::CostCenter => ("x-cost-center", "^CC-[0-9]{4}$", true),
            Attribute::Project => ("x-project-id", "^PROJ-[A-Z0-9]{6}$", true),
            Attribute::BusinessUnit => {
                ("x-business-unit", "^(engineering|operations|research|sales)$", false)
            }
            Attribute::Tier => ("x-agent-tier", "^[1-4]$", false),
            Attribute::Owner => {
                ("x-agent-owner", r"^[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}$", false)
            }
        }
    }
}

/// One configured attribution header.
#[derive(Clone, Debug)]
struct Header {
    /// Lower case.
    name: Box<str>,
    pattern: Regex,
    /// The pattern as configured, for error messages.
    pattern_text: Box<str>,
    required: bool,
    pinned: Option<Box<str>>,
}

impl Header {
    fn new(name: &str, pattern: &str, required: bool) -> Result<Header, regex::Error> {
        Ok(Header {
            name: name.to_ascii_lowercase().into(),
            pattern: Regex::new(&format!("^(?:{pattern})$"))?,
            pattern_text: pattern.into(),
            required,
            pinned: None,
        })
    }
}

/// The attribution rules: one header per [`Attribute`], compiled.
#[derive(Clone, Debug)]
pub struct Attribution {
    /// In [`Attribute::ALL`] order.
    headers: [Header; 6],
}

/// Who a request is attributed to; every value borrowed from the request or the configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Identity<'a> {
    pub agent: Option<&'a str>,
    pub cost_center: Option<&'a str>,
    pub project: Option<&'a str>,
    pub business_unit: Option<&'a str>,
    pub tier: Option<&'a str>,
    pub owner: Option<&'a str>,
}

impl<'a> Identity<'a> {
    fn set(&mut self, attribute: Attribute, value: Option<&'a str>) {
        let slot = match attribute {
            Attribute::Agent => &mut self.agent,
            Attribute::CostCenter => &mut self.cost_center,
            Attribute::Project => &mut self.project,
            Attribute::BusinessUnit => &mut self.business_unit,
            Attribute::Tier => &mut self.tier,
            Attribute::Owner => &mut self.owner,
        };
        *slot = value;
    }
}

/// What is wrong with one header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// A required header is absent.
    Missing,
    /// The value does not match the header's pattern (or is not UTF-8).
    Invalid,
    /// The value differs from the identity pinned to this sidecar.
    Contradicts,
    /// The header was sent more than once (only detectable by [`Attribution::check_pairs`]).
    Repeated,
}

/// One bad header.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub header: String,
    pub kind: ProblemKind,
    /// A sanitised prefix of the offending value (at most 16 printable ASCII characters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The pattern the value must match, for `Invalid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header = &self.header;
        match self.kind {
            ProblemKind::Missing => write!(f, "{header} is missing")?,
            ProblemKind::Invalid => write!(f, "{header} is invalid")?,
            ProblemKind::Contradicts => {
                write!(f, "{header} contradicts the identity pinned to this proxy")?
            }
            ProblemKind::Repeated => write!(f, "{header} is sent more than once")?,
        }
        match (&self.value, &self.expected) {
            (Some(v), Some(e)) => write!(f, " (got `{v}`, expected {e})"),
            (Some(v), None) => write!(f, " (got `{v}`)"),
            (None, Some(e)) => write!(f, " (expected {e})"),
            (None, None) => Ok(()),
        }
    }
}

/// Why a request's attribution was rejected: every bad header, in configuration order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize)]
pub struct AttributionError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for AttributionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("attribution rejected: ")?;
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Why an identity could not be pinned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    #[error("`{header}` is not a configured attribution header")]
    UnknownHeader { header: String },
    #[error("pinned value `{value}` for {header} does not match {pattern}")]
    Invalid { header: String, value: String, pattern: String },
}

/// What a request carried for one header.
#[derive(Clone, Copy)]
enum Found<'a> {
    Absent,
    Once(&'a [u8]),
    Repeated,
}

impl Default for Attribution {
    /// The shipped headers and patterns, nothing pinned.
    fn default() -> Self {
        let headers = Attribute::ALL.map(|a| {
            let (name, pattern, required) = a.default_spec();
            // The shipped patterns are constants; the unit tests compile every one of them.
            Header::new(name, pattern, required).expect("shipped attribution pattern compiles")
        });
        Attribution { headers }
    }
}

impl Attribution {
    /// Decodes an `attribution:` section (`{headers: [...], pinned: {...}}`) from a field of a
    /// larger document, recording every error in `cx`.
    pub fn from_field(cx: &mut Cx, field: &Field<'_>) -> Option<Attribution> {
        config::decode(cx, field)
    }

    /// Parses an attribution section given as a whole YAML or JSON document.
    pub fn from_yaml_str(text: &str) -> Result<Attribution, DocErrors> {
        let node = doc::parse(text)?;
        let mut cx = Cx::new();
        let attribution = Attribution::from_field(&mut cx, &Field::root(&node));
        match attribution {
            Some(a) => cx.finish(a),
            None => Err(cx.finish(()).err().unwrap_or_else(|| DocErrors(Vec::new()))),
        }
    }

    /// Pins `header` to `value` (a sidecar's own identity, e.g. from the Downward API): a
    /// request without the header gets `value`, a request with another value is rejected.
    pub fn pin(&mut self, header: &str, value: &str) -> Result<(), PinError> {
        let Some(h) = self.headers.iter_mut().find(|h| h.name.eq_ignore_ascii_case(header)) else {
            return Err(PinError::UnknownHeader { header: header.to_string() });
        };
        if !h.pattern.is_match(value) {
            return Err(PinError::Invalid {
                header: h.name.to_string(),
                value: sanitise(value.as_bytes()),
                pattern: h.pattern_text.to_string(),
            });
        }
        h.pinned = Some(value.into());
        Ok(())
    }

    /// The configured header names (lower case), e.g. to strip them before a third-party
    /// upstream.
    pub fn header_names(&self) -> impl Iterator<Item = &str> {
        self.headers.iter().map(|h| &*h.name)
    }

    /// The header configured for `attribute` (lower case).
    pub fn header_name(&self, attribute: Attribute) -> &str {
        &self.headers[attribute as usize].name
    }

    /// Checks a request's headers, reading each configured header through `lookup`, which is
    /// called with the lower-case header name and must itself ignore case (as `http::HeaderMap`
    /// does). Values may be `str`, `[u8]` or anything that is `AsRef<[u8]>`.
    pub fn check<'a, V, F>(&'a self, mut lookup: F) -> Result<Identity<'a>, AttributionError>
    where
        V: AsRef<[u8]> + ?Sized + 'a,
        F: FnMut(&str) -> Option<&'a V>,
    {
        let found = self.headers.each_ref().map(|h| match lookup(&h.name) {
            Some(v) => Found::Once(v.as_ref()),
            None => Found::Absent,
        });
        self.verify(found)
    }

    /// Checks a request's headers given as `(name, value)` pairs, matching names without
    /// regard to ASCII case; a configured header that occurs twice is a problem of its own.
    pub fn check_pairs<'a, K, V, I>(&'a self, pairs: I) -> Result<Identity<'a>, AttributionError>
    where
        K: AsRef<[u8]>,
        V: AsRef<[u8]> + ?Sized + 'a,
        I: IntoIterator<Item = (K, &'a V)>,
    {
        let mut found = [Found::Absent; 6];
        for (name, value) in pairs {
            let name = name.as_ref();
            let hit =
                self.headers.iter().position(|h| h.name.as_bytes().eq_ignore_ascii_case(name));
            if let Some(i) = hit {
                found[i] = match found[i] {
                    Found::Absent => Found::Once(value.as_ref()),
                    _ => Found::Repeated,
                };
            }
        }
        self.verify(found)
    }

    fn verify<'a>(&'a self, found: [Found<'a>; 6]) -> Result<Identity<'a>, AttributionError> {
        let mut identity = Identity::default();
        // Stays unallocated unless a problem is found.
        let mut problems = Vec::new();
        for ((h, attribute), found) in self.headers.iter().zip(Attribute::ALL).zip(found) {
            let problem = |kind, value: Option<&[u8]>, expected: Option<&str>| Problem {
                header: h.name.to_string(),
                kind,
                value: value.map(sanitise),
                expected: expected.map(str::to_string),
            };
            let value = match (found, h.pinned.as_deref()) {
                (Found::Repeated, _) => {
                    problems.push(problem(ProblemKind::Repeated, None, None));
                    None
                }
                (Found::Absent, Some(pinned)) => Some(pinned),
                (Found::Absent, None) => {
                    if h.required {
                        problems.push(problem(ProblemKind::Missing, None, Some(&h.pattern_text)));
                    }
                    None
                }
                (Found::Once(v), Some(pinned)) if v == pinned.as_bytes() => Some(pinned),
                (Found::Once(v), Some(_)) => {
                    problems.push(problem(ProblemKind::Contradicts, Some(v), None));
                    None
                }
                (Found::Once(v), None) => match std::str::from_utf8(v) {
                    Ok(s) if h.pattern.is_match(s) => Some(s),
                    _ => {
                        problems.push(problem(
                            ProblemKind::Invalid,
                            Some(v),
                            Some(&h.pattern_text),
                        ));
                        None
                    }
                },
            };
            identity.set(attribute, value);
        }
        if problems.is_empty() {
            Ok(identity)
        } else {
            Err(AttributionError { problems })
        }
    }
}

/// At most 16 bytes of `value`, printable ASCII kept and everything else as `?`, with `...`
/// when cut: enough to recognise a typo, too little to leak a secret pasted into a header.
fn sanitise(value: &[u8]) -> String {
    const MAX: usize = 16;
    let mut out: String = value
        .iter()
        .take(MAX)
        .map(|&b| if (0x20..0x7f).contains(&b) && b != b'`' { b as char } else { '?' })
        .collect();
    if value.len() > MAX {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests;
