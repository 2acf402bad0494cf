//! What one request asks of the mock: the fields read from its JSON body and the `x-mock-*`
//! header overrides that let one mock process serve every scenario.
//!
//! Decides the usage numbers, the number of content events and the timing; never builds a
//! response body.

use std::time::Duration;

use hyper::{HeaderMap, StatusCode};
use serde_json::Value;

/// Output tokens to report (default: the number of content events).
pub const OUTPUT_TOKENS: &str = "x-mock-output-tokens";
/// Input tokens to report (default: `ceil(request body bytes / 4)`).
pub const INPUT_TOKENS: &str = "x-mock-input-tokens";
/// Cached input tokens (OpenAI `cached_tokens`, Anthropic `cache_read_input_tokens`; default 0).
pub const CACHED_TOKENS: &str = "x-mock-cached-tokens";
/// Anthropic `cache_creation_input_tokens` (default 0).
pub const CACHE_WRITE_TOKENS: &str = "x-mock-cache-write-tokens";
/// OpenAI `reasoning_tokens` (default 0).
pub const REASONING_TOKENS: &str = "x-mock-reasoning-tokens";
/// Number of content events, each one short word (default 5).
pub const EVENTS: &str = "x-mock-events";
/// Milliseconds between consecutive SSE events (default 0).
pub const EVENT_DELAY_MS: &str = "x-mock-event-delay-ms";
/// Milliseconds to wait before sending the response head (default 0).
pub const DELAY_MS: &str = "x-mock-delay-ms";
/// Answer with this status; from 400 up, with a provider-shaped error body.
pub const STATUS: &str = "x-mock-status";
/// Streams only: abort the connection after this many SSE events, never finishing the stream.
pub const RESET_AFTER: &str = "x-mock-reset-after";
/// Model to report in the response (default: the request's `model`).
pub const MODEL: &str = "x-mock-model";

/// Content events when `x-mock-events` is absent.
const DEFAULT_EVENTS: usize = 5;
/// Model reported when neither `x-mock-model` nor the request names one.
const DEFAULT_MODEL: &str = "mock-model";
const WORDS: [&str; 8] = ["Hello", " from", " the", " mock", " upstream", ",", " friend", "."];

/// A header override that is present but does not parse.
#[derive(Debug, thiserror::Error)]
#[error("header {name}: expected {expected}, got {value:?}")]
pub struct BadKnob {
    name: &'static str,
    value: String,
    expected: &'static str,
}

/// The `x-mock-*` overrides of one request.
#[derive(Debug, Clone, Default)]
pub struct Knobs {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cached_tokens: u64,
    cache_write_tokens: u64,
    reasoning_tokens: u64,
    events: Option<usize>,
    pub event_delay: Duration,
    pub head_delay: Duration,
    pub status: Option<StatusCode>,
    pub reset_after: Option<usize>,
    model: Option<String>,
    /// The request carries `anthropic-version` (Anthropic's SDK always sends it).
    pub anthropic: bool,
}

impl Knobs {
    /// Reads every override; a present but malformed one is an error, so a typo in a test
    /// fails loudly instead of silently falling back to the default.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, BadKnob> {
        let status = match number(headers, STATUS)? {
            None => None,
            Some(code) => Some(
                u16::try_from(code)
                    .ok()
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .ok_or_else(|| bad(headers, STATUS, "an HTTP status code"))?,
            ),
        };
        Ok(Knobs {
            input_tokens: number(headers, INPUT_TOKENS)?,
            output_tokens: number(headers, OUTPUT_TOKENS)?,
            cached_tokens: number(headers, CACHED_TOKENS)?.unwrap_or(0),
            cache_write_tokens: number(headers, CACHE_WRITE_TOKENS)?.unwrap_or(0),
            reasoning_tokens: number(headers, REASONING_TOKENS)?.unwrap_or(0),
            events: count(headers, EVENTS)?,
            event_delay: Duration::from_millis(number(headers, EVENT_DELAY_MS)?.unwrap_or(0)),
            head_delay: Duration::from_millis(number(headers, DELAY_MS)?.unwrap_or(0)),
            status,
            reset_after: count(headers, RESET_AFTER)?,
            model: text(headers, MODEL)?,
            anthropic: headers.contains_key("anthropic-version"),
        })
    }
}

fn raw<'h>(headers: &'h HeaderMap, name: &'static str) -> Option<&'h [u8]> {
    headers.get(name).map(|v| v.as_bytes())
}

fn bad(headers: &HeaderMap, name: &'static str, expected: &'static str) -> BadKnob {
    let value = raw(headers, name).map(String::from_utf8_lossy).unwrap_or_default().into_owned();
    BadKnob { name, value, expected }
}

fn text(headers: &HeaderMap, name: &'static str) -> Result<Option<String>, BadKnob> {
    match raw(headers, name) {
        None => Ok(None),
        Some(bytes) => std::str::from_utf8(bytes)
            .map(|s| Some(s.trim().to_owned()))
            .map_err(|_| bad(headers, name, "UTF-8 text")),
    }
}

fn number(headers: &HeaderMap, name: &'static str) -> Result<Option<u64>, BadKnob> {
    match text(headers, name)? {
        None => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| bad(headers, name, "a non-negative integer")),
    }
}

fn count(headers: &HeaderMap, name: &'static str) -> Result<Option<usize>, BadKnob> {
    match number(headers, name)? {
        None => Ok(None),
        Some(n) => usize::try_from(n).map(Some).map_err(|_| bad(headers, name, "a count")),
    }
}

/// Token counts to report, each verbatim in the provider's own field: the mock does not
/// reconcile them (OpenAI's `prompt_tokens` includes `cached_tokens`, Anthropic's
/// `input_tokens` excludes the cache fields; a test sends the numbers its provider would).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cached: u64,
    pub cache_write: u64,
    pub reasoning: u64,
}

/// One parsed request to a model endpoint, ready for a provider module to answer.
#[derive(Debug, Clone)]
pub struct Call {
    /// Per-server sequence number, used to make response ids unique.
    pub seq: u64,
    pub model: String,
    /// The request said `"stream": true`.
    pub stream: bool,
    /// The request said `"stream_options": {"include_usage": true}` (OpenAI).
    pub include_usage: bool,
    /// Number of content events (stream) or words (JSON body).
    pub events: usize,
    pub usage: Usage,
    pub knobs: Knobs,
    /// The request body as JSON.
    pub request: Value,
}

impl Call {
    /// Combines the request body with the overrides; `body_len` drives the default input count.
    pub fn new(seq: u64, request: Value, body_len: usize, knobs: Knobs) -> Call {
        let events = knobs.events.unwrap_or(DEFAULT_EVENTS);
        let usage = Usage {
            input: knobs.input_tokens.unwrap_or_else(|| (body_len as u64).div_ceil(4)),
            output: knobs.output_tokens.unwrap_or(events as u64),
            cached: knobs.cached_tokens,
            cache_write: knobs.cache_write_tokens,
            reasoning: knobs.reasoning_tokens,
        };
        let model = knobs
            .model
            .clone()
            .or_else(|| request.get("model").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| DEFAULT_MODEL.to_owned());
        let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
        let include_usage = request
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true);
        Call { seq, model, stream, include_usage, events, usage, knobs, request }
    }

    /// The word carried by content event `index`.
    pub fn word(index: usize) -> &'static str {
        WORDS[index % WORDS.len()]
    }

    /// The whole answer: every content event's word, concatenated.
    pub fn text(&self) -> String {
        (0..self.events).map(Call::word).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;
    use serde_json::json;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn defaults_derive_usage_from_body_length_and_event_count() {
        let knobs = Knobs::from_headers(&HeaderMap::new()).unwrap();
        let call = Call::new(1, json!({"model": "gpt-4o"}), 9, knobs);
        assert_eq!(
            call.usage,
            Usage { input: 3, output: 5, cached: 0, cache_write: 0, reasoning: 0 }
        );
        assert_eq!(call.model, "gpt-4o");
        assert_eq!(call.text(), "Hello from the mock upstream");
        assert!(!call.stream && !call.include_usage);
    }

    #[test]
    fn headers_override_every_number_and_the_model() {
        let knobs = Knobs::from_headers(&headers(&[
            (INPUT_TOKENS, "100"),
            (OUTPUT_TOKENS, "7"),
            (CACHED_TOKENS, "40"),
            (CACHE_WRITE_TOKENS, "11"),
            (REASONING_TOKENS, "3"),
            (EVENTS, "2"),
            (MODEL, "other"),
        ]))
        .unwrap();
        let call = Call::new(1, json!({"model": "gpt-4o", "stream": true}), 9, knobs);
        assert_eq!(
            call.usage,
            Usage { input: 100, output: 7, cached: 40, cache_write: 11, reasoning: 3 }
        );
        assert_eq!((call.events, call.model.as_str(), call.stream), (2, "other", true));
    }

    #[test]
    fn malformed_override_is_an_error_naming_the_header() {
        for (name, value) in [(OUTPUT_TOKENS, "-1"), (STATUS, "42"), (EVENTS, "many")] {
            let err = Knobs::from_headers(&headers(&[(name, value)])).unwrap_err();
            assert_eq!(err.name, name);
            assert_eq!(err.value, value);
        }
    }
}
