//! Asking OpenAI for streamed usage on the client's behalf.
//!
//! Decides whether a streaming chat completions (or completions) request lacks
//! `stream_options.include_usage` and, if so, produces the same body asking for it. The body is
//! edited in place at the byte level: every other member keeps its bytes, order and number
//! formatting (a parse-and-reserialize round trip would reorder keys and could reformat
//! numbers). The response then carries a usage chunk that
//! [`UsageChunkFilter`](crate::metering::UsageChunkFilter) removes again.

use std::ops::Range;

use memchr::memchr2;
use serde::de::IgnoredAny;
use serde_json::Value;

const INCLUDE_USAGE: &[u8] = br#"{"include_usage":true}"#;

/// The request rewritten to set `stream_options.include_usage: true`, or `None` when there is
/// nothing to do: not a JSON object, `stream` is not `true`, or usage is already included.
/// Other `stream_options` members (e.g. `include_obfuscation`) are kept.
pub fn with_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    // Skipping strings does not check their UTF-8, so the text is checked first: a body that
    // is not JSON is never rewritten into something that looks like it (found by fuzzing).
    let text = std::str::from_utf8(body).ok()?;
    serde_json::from_str::<IgnoredAny>(text).ok()?;
    let (open, members) = members(body)?;
    let value = |m: &Member| &body[m.value.clone()];
    let streams = members.iter().rev().find(|m| m.is(body, "stream")).map(value);
    if streams != Some(b"true") {
        return None;
    }
    let options: Vec<&Member> = members.iter().filter(|m| m.is(body, "stream_options")).collect();
    let mut out = Vec::with_capacity(body.len() + 40);
    let Some(last) = options.last() else {
        out.extend_from_slice(&body[..open + 1]);
        out.extend_from_slice(br#""stream_options":"#);
        out.extend_from_slice(INCLUDE_USAGE);
        if !members.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(&body[open + 1..]);
        return Some(out);
    };
    let current: Value = serde_json::from_slice(value(last)).ok()?;
    if current.get("include_usage") == Some(&Value::Bool(true)) {
        return None;
    }
    let mut at = 0;
    for m in options {
        out.extend_from_slice(&body[at..m.value.start]);
        match serde_json::from_slice::<Value>(value(m)) {
            Ok(Value::Object(mut opts)) => {
                opts.insert("include_usage".into(), Value::Bool(true));
                out.extend_from_slice(&serde_json::to_vec(&opts).ok()?);
            }
            _ => out.extend_from_slice(INCLUDE_USAGE),
        }
        at = m.value.end;
    }
    out.extend_from_slice(&body[at..]);
    Some(out)
}

/// One top-level member: the byte ranges of its key (with quotes) and of its value.
struct Member {
    key: Range<usize>,
    value: Range<usize>,
}

impl Member {
    fn is(&self, body: &[u8], name: &str) -> bool {
        let raw = &body[self.key.clone()];
        if raw.contains(&b'\\') {
            serde_json::from_slice::<String>(raw).is_ok_and(|k| k == name)
        } else {
            raw.len() == name.len() + 2 && &raw[1..raw.len() - 1] == name.as_bytes()
        }
    }
}

/// The position of the opening `{` and the members of a JSON object already known to be valid
/// JSON; `None` for any other value.
fn members(body: &[u8]) -> Option<(usize, Vec<Member>)> {
    let open = skip_ws(body, 0);
    if body.get(open) != Some(&b'{') {
        return None;
    }
    let mut out = Vec::new();
    let mut i = open + 1;
    loop {
        i = skip_ws(body, i);
        match body.get(i)? {
            b'}' => return Some((open, out)),
            b',' => i = skip_ws(body, i + 1),
            _ => {}
        }
        let key = i..string_end(body, i)?;
        i = skip_ws(body, key.end);
        if body.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_ws(body, i + 1);
        let value = start..value_end(body, start)?;
        i = value.end;
        out.push(Member { key, value });
    }
}

fn skip_ws(body: &[u8], mut i: usize) -> usize {
    while body.get(i).is_some_and(|b| b.is_ascii_whitespace()) {
        i += 1;
    }
    i
}

/// The index after the string starting at `i`.
fn string_end(body: &[u8], i: usize) -> Option<usize> {
    if body.get(i) != Some(&b'"') {
        return None;
    }
    let mut j = i + 1;
    loop {
        j += memchr2(b'"', b'\\', body.get(j..)?)?;
        if body[j] == b'"' {
            return Some(j + 1);
        }
        j += 2;
    }
}

/// The index after the value starting at `i`.
fn value_end(body: &[u8], i: usize) -> Option<usize> {
    match body.get(i)? {
        b'"' => string_end(body, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match body.get(j)? {
                    b'"' => {
                        j = string_end(body, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while body
                .get(j)
                .is_some_and(|b| !matches!(b, b',' | b'}' | b']') && !b.is_ascii_whitespace())
            {
                j += 1;
            }
            Some(j)
        }
    }
}
