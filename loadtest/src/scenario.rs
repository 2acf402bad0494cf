//! Scenario files: which requests a load run sends, in what proportion, and (for SSE) how the
//! mock upstream spaces the events. YAML or JSON, strictly checked with the same decoder as
//! Tollgate's own config, so every error names its field path and line.
//!
//! Decides what one request looks like; never sends anything and never decides the rate.

use bytes::Bytes;
use hyper::header::{HeaderName, HeaderValue};
use hyper::Method;
use tollgate_core::doc::{self, Cx, DocErrors, Field};

/// The placeholder in `body` that `pad_to` replaces with filler text.
pub const PAD: &str = "{{pad}}";
/// Mock upstream header: number of content events in a stream.
const MOCK_EVENTS: &str = "x-mock-events";
/// Mock upstream header: milliseconds between consecutive SSE events.
const MOCK_EVENT_DELAY_MS: &str = "x-mock-event-delay-ms";

/// A parsed scenario file.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub requests: Vec<Template>,
    /// Run settings used when the command line gives none.
    pub defaults: Defaults,
}

/// One kind of request in a scenario.
#[derive(Clone, Debug)]
pub struct Template {
    pub name: String,
    /// Relative frequency in a mix (`weight: 3` is sent three times as often as `weight: 1`).
    pub weight: u32,
    pub method: Method,
    /// Path and query, e.g. `/v1/chat/completions`.
    pub path: String,
    /// Headers as sent, including the `x-mock-*` ones derived from `stream`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    /// The status a successful answer has; anything else counts as an error.
    pub expect_status: u16,
    /// Set for SSE responses: the generator then timestamps every event.
    pub stream: Option<StreamSpec>,
}

/// How the mock upstream streams: `events` content events, `spacing_ms` apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamSpec {
    pub events: u64,
    pub spacing_ms: u64,
}

/// Run settings a scenario may suggest; the command line overrides each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Defaults {
    pub rate: Option<u64>,
    pub duration_ms: Option<u64>,
    pub connections: Option<u64>,
    pub concurrency: Option<u64>,
}

const TOP: [&str; 4] = ["name", "description", "defaults", "requests"];
const DEFAULTS: [&str; 4] = ["rate", "duration", "connections", "concurrency"];
const REQUEST: [&str; 9] =
    ["name", "weight", "method", "path", "headers", "body", "pad_to", "expect_status", "stream"];
const STREAM: [&str; 2] = ["events", "spacing"];

impl Scenario {
    /// Parses a scenario document; every problem is reported with its field path and line.
    pub fn parse(text: &str) -> Result<Scenario, DocErrors> {
        let root = doc::parse(text)?;
        let mut cx = Cx::new();
        let scenario = decode(&mut cx, &Field::root(&root));
        cx.finish(())?;
        // `decode` only returns None after recording an error, so this is never the empty list.
        scenario.ok_or(DocErrors(Vec::new()))
    }

    /// The milliseconds every stream of this scenario lasts at least (the longest template).
    pub fn longest_stream_ms(&self) -> u64 {
        self.requests
            .iter()
            .filter_map(|t| t.stream)
            .map(|s| s.spacing_ms.saturating_mul(s.events + 3))
            .max()
            .unwrap_or(0)
    }
}

fn decode(cx: &mut Cx, root: &Field<'_>) -> Option<Scenario> {
    let mut obj = cx.object(root)?;
    let name = obj.require(cx, "name").and_then(|f| f.non_empty_str(cx)).map(str::to_owned);
    let description =
        obj.get("description").and_then(|f| f.str(cx)).map(str::to_owned).unwrap_or_default();
    let defaults = obj.get("defaults").map(|f| decode_defaults(cx, &f)).unwrap_or_default();
    let mut requests = Vec::new();
    if let Some(list) = obj.require(cx, "requests") {
        let items = list.items(cx);
        if matches!(&list.node.value, doc::Value::Seq(v) if v.is_empty()) {
            list.error(cx, "a scenario needs at least one request");
        }
        requests = items.iter().filter_map(|item| decode_request(cx, item)).collect();
    }
    obj.finish(cx, &TOP);
    Some(Scenario { name: name?, description, requests, defaults })
}

fn decode_defaults(cx: &mut Cx, field: &Field<'_>) -> Defaults {
    let Some(mut obj) = cx.object(field) else { return Defaults::default() };
    let defaults = Defaults {
        rate: obj.get("rate").and_then(|f| positive(cx, &f)),
        duration_ms: obj.get("duration").and_then(|f| f.duration_ms(cx)),
        connections: obj.get("connections").and_then(|f| positive(cx, &f)),
        concurrency: obj.get("concurrency").and_then(|f| positive(cx, &f)),
    };
    obj.finish(cx, &DEFAULTS);
    defaults
}

fn positive(cx: &mut Cx, field: &Field<'_>) -> Option<u64> {
    match field.u64(cx)? {
        0 => {
            field.error(cx, "must be at least 1");
            None
        }
        n => Some(n),
    }
}

fn decode_request(cx: &mut Cx, field: &Field<'_>) -> Option<Template> {
    let mut obj = cx.object(field)?;
    let name = obj.require(cx, "name").and_then(|f| f.non_empty_str(cx)).map(str::to_owned);
    let weight = match obj.get("weight") {
        None => Some(1),
        Some(f) => positive(cx, &f).and_then(|w| match u32::try_from(w) {
            Ok(w) => Some(w),
            Err(_) => {
                f.error(cx, "must be at most 4294967295");
                None
            }
        }),
    };
    let method = match obj.get("method") {
        None => Some(Method::POST),
        Some(f) => f.non_empty_str(cx).and_then(|m| match Method::from_bytes(m.as_bytes()) {
            Ok(method) => Some(method),
            Err(_) => {
                f.error(cx, format!("`{m}` is not an HTTP method"));
                None
            }
        }),
    };
    let path = obj.require(cx, "path").and_then(|f| {
        let p = f.non_empty_str(cx)?;
        if !p.starts_with('/') {
            f.error(cx, format!("must start with `/`, found `{p}`"));
            return None;
        }
        Some(p.to_owned())
    });
    let stream = obj.get("stream").and_then(|f| decode_stream(cx, &f));
    let mut headers = obj.get("headers").map(|f| decode_headers(cx, &f)).unwrap_or_default();
    if let Some(spec) = stream {
        for (name, value) in [(MOCK_EVENTS, spec.events), (MOCK_EVENT_DELAY_MS, spec.spacing_ms)] {
            headers.push((HeaderName::from_static(name), HeaderValue::from(value)));
        }
    }
    let body = obj.get("body").and_then(|f| f.str(cx).map(|b| (f.clone(), b.to_owned())));
    let body = match (body, obj.get("pad_to")) {
        (None, None) => Some(String::new()),
        (Some((_, text)), None) => Some(text),
        (None, Some(pad)) => {
            pad.error(cx, format!("needs a `body` containing `{PAD}`"));
            None
        }
        (Some((body_field, text)), Some(pad)) => pad_body(cx, &body_field, &pad, text),
    };
    let expect_status = match obj.get("expect_status") {
        None => Some(200),
        Some(f) => f.u64(cx).and_then(|s| match u16::try_from(s) {
            Ok(s @ 100..=599) => Some(s),
            _ => {
                f.error(cx, format!("expected an HTTP status (100-599), found {s}"));
                None
            }
        }),
    };
    obj.finish(cx, &REQUEST);
    Some(Template {
        name: name?,
        weight: weight?,
        method: method?,
        path: path?,
        headers,
        body: Bytes::from(body?),
        expect_status: expect_status?,
        stream,
    })
}

fn pad_body(cx: &mut Cx, body: &Field<'_>, pad: &Field<'_>, text: String) -> Option<String> {
    let target = usize::try_from(pad.u64(cx)?).unwrap_or(usize::MAX);
    if !text.contains(PAD) {
        body.error(cx, format!("`pad_to` is set but the body has no `{PAD}` placeholder"));
        return None;
    }
    let bare = text.len() - PAD.len();
    if target < bare {
        pad.error(cx, format!("{target} is shorter than the body without padding ({bare} bytes)"));
        return None;
    }
    Some(text.replacen(PAD, &filler(target - bare), 1))
}

/// Filler text of exactly `len` bytes: words, so that it is plausible prompt text and JSON-safe.
pub fn filler(len: usize) -> String {
    const WORDS: &str = "the quick brown fox jumps over the lazy dog ";
    WORDS.chars().cycle().take(len).collect()
}

fn decode_headers(cx: &mut Cx, field: &Field<'_>) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = Vec::new();
    for (key, value) in field.entries(cx) {
        let Ok(name) = HeaderName::from_bytes(key.as_bytes()) else {
            value.error(cx, format!("`{key}` is not a valid header name"));
            continue;
        };
        let Some(text) = value.str(cx) else { continue };
        match HeaderValue::from_str(text) {
            Ok(v) => headers.push((name, v)),
            Err(_) => value.error(cx, "not a valid header value"),
        }
    }
    headers
}

fn decode_stream(cx: &mut Cx, field: &Field<'_>) -> Option<StreamSpec> {
    let mut obj = cx.object(field)?;
    let events = obj.require(cx, "events").and_then(|f| positive(cx, &f));
    let spacing_ms = obj.require(cx, "spacing").and_then(|f| f.duration_ms(cx));
    obj.finish(cx, &STREAM);
    Some(StreamSpec { events: events?, spacing_ms: spacing_ms? })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match Scenario::parse(text) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn full_request_parses_with_padding_and_stream_headers() {
        let s = Scenario::parse(
            "name: sse\ndefaults: {rate: 50, duration: 2s, concurrency: 100}\nrequests:\n  - name: chat\n    path: /v1/chat/completions\n    headers: {x-agent-id: bot}\n    body: '{\"p\":\"{{pad}}\"}'\n    pad_to: 64\n    stream: {events: 20, spacing: 10ms}\n",
        )
        .unwrap();
        assert_eq!(s.name, "sse");
        assert_eq!(
            s.defaults,
            Defaults {
                rate: Some(50),
                duration_ms: Some(2000),
                connections: None,
                concurrency: Some(100)
            }
        );
        let t = &s.requests[0];
        assert_eq!((t.weight, &t.method, t.expect_status), (1, &Method::POST, 200));
        assert_eq!(t.body.len(), 64);
        assert!(t.body.starts_with(b"{\"p\":\"the quick"));
        let names: Vec<&str> = t.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x-agent-id", "x-mock-events", "x-mock-event-delay-ms"]);
        assert_eq!(t.headers[2].1, "10");
        assert_eq!(t.stream, Some(StreamSpec { events: 20, spacing_ms: 10 }));
        assert_eq!(s.longest_stream_ms(), 230);
    }

    #[test]
    fn every_error_names_its_field_and_line() {
        let got = errors(
            "name: x\nrequests:\n  - name: a\n    path: v1\n    weight: 0\n    stream: {events: 3}\n    colour: red\n  - path: /x\n    method: 'G T'\n    expect_status: 700\n",
        );
        assert_eq!(
            got,
            [
                "requests[0].path (line 4, column 11): must start with `/`, found `v1`",
                "requests[0].weight (line 5, column 13): must be at least 1",
                "requests[0].stream (line 6, column 13): missing required field `spacing`",
                "requests[0].colour (line 7, column 5): unknown field `colour`, expected one of: name, weight, method, path, headers, body, pad_to, expect_status, stream",
                "requests[1] (line 8, column 9): missing required field `name`",
                "requests[1].method (line 9, column 13): `G T` is not an HTTP method",
                "requests[1].expect_status (line 10, column 20): expected an HTTP status (100-599), found 700",
            ]
        );
    }

    #[test]
    fn padding_errors_name_pad_to_or_body() {
        let short =
            errors("name: x\nrequests:\n  - {name: a, path: /a, body: 'abc{{pad}}', pad_to: 2}\n");
        assert_eq!(
            short,
            ["requests[0].pad_to (line 3, column 53): 2 is shorter than the body without padding (3 bytes)"]
        );
        let missing =
            errors("name: x\nrequests:\n  - {name: a, path: /a, body: 'abc', pad_to: 10}\n");
        assert_eq!(
            missing,
            ["requests[0].body (line 3, column 31): `pad_to` is set but the body has no `{{pad}}` placeholder"]
        );
    }

    #[test]
    fn missing_top_level_fields_and_bad_defaults_are_reported() {
        let got = errors("defaults: {rate: 0, duration: soon}\nextra: 1\n");
        assert_eq!(
            got,
            [
                "(document) (line 1, column 9): missing required field `name`",
                "(document) (line 1, column 9): missing required field `requests`",
                "defaults.rate (line 1, column 18): must be at least 1",
                "defaults.duration (line 1, column 31): expected a duration such as \"30s\", \"15m\" or \"250ms\", found `soon`",
                "extra (line 2, column 1): unknown field `extra`, expected one of: name, description, defaults, requests",
            ]
        );
    }

    #[test]
    fn filler_has_the_exact_length() {
        for len in [0, 1, 43, 44, 45, 1000] {
            assert_eq!(filler(len).len(), len);
        }
    }
}
