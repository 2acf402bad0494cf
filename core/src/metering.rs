//! Response metering: how many tokens of each kind a model response used.
//!
//! Decides, from the response bytes of one LLM call, its [`Usage`] in disjoint buckets, the
//! model the upstream says answered, and whether those numbers were reported by the provider or
//! estimated. [`Meter`] is sans-I/O and push-based: the adapter forwards each body chunk to the
//! client untouched and also hands it to [`Meter::feed`], in any split, then calls
//! [`Meter::finish`] at end of stream or when the stream dies. The meter never modifies,
//! delays or holds the bytes, never prices anything (that is the rate card's job) and never
//! fails: a body it cannot read is estimated. The one component here that does change bytes is
//! [`UsageChunkFilter`], which removes the usage chunk the proxy requested on the client's
//! behalf (see [`crate::inspect::with_include_usage`]); the meter must be fed the unfiltered
//! upstream bytes.
//!
//! Memory is bounded per request: one SSE event up to [`Limits::max_event_bytes`] (a larger one
//! is skipped) and a JSON body up to [`Limits::max_body_bytes`] (beyond that, a fixed head and
//! tail window). Per chunk the meter allocates nothing in the steady state: lines are found with
//! `memchr`, only `data:` payloads are parsed, into small borrowed structs that skip the rest.
//!
//! A compressed response (`Content-Encoding: gzip`, `deflate`, `br`, `zstd`) is metered from
//! its plain bytes: the adapter names the encoding ([`Meter::with_encoding`] or
//! [`Meter::set_encoding`]) and still feeds the bytes as they came from the upstream; the meter
//! decodes a copy into a fixed buffer ([`decode`]), within [`DecodeLimits`]. When it cannot
//! (an unknown or stacked encoding, a corrupt stream, or a bound passed), it stops decoding,
//! reports `Estimated` usage and says why in [`Metered::decode_aborted`], so that adapters can
//! count it.

mod anthropic;
mod count;
pub mod decode;
mod estimate;
mod finish;
mod json;
mod openai;
mod sse;
mod usage_filter;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_compressed;

use std::borrow::Cow;

use serde::Serialize;

pub use decode::{ContentEncoding, DecodeAbort, DecodeLimits};
pub use estimate::tokens_from_bytes;
pub use usage_filter::UsageChunkFilter;

use crate::usage::{Usage, UsageSource};
use decode::Decoder;
use json::JsonBody;
use sse::{Event, SseParser};

/// Who serves an [`Api`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    OpenAi,
    Anthropic,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
        }
    }
}

/// A metered LLM endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// OpenAI `/v1/chat/completions`.
    ChatCompletions,
    /// OpenAI legacy `/v1/completions`.
    Completions,
    /// OpenAI `/v1/responses`.
    Responses,
    /// OpenAI `/v1/embeddings`.
    Embeddings,
    /// Anthropic `/v1/messages`.
    Messages,
}

const ROUTES: [(&str, Api); 5] = [
    ("/v1/chat/completions", Api::ChatCompletions),
    ("/v1/completions", Api::Completions),
    ("/v1/responses", Api::Responses),
    ("/v1/embeddings", Api::Embeddings),
    ("/v1/messages", Api::Messages),
];

impl Api {
    /// The endpoint a request path (or full URL) addresses, if metered. The path must end in
    /// `/v1/<endpoint>`, optionally with one trailing `/`; any base-path prefix
    /// (`/openai/v1/chat/completions`), query string and fragment are ignored. Sub-resources
    /// such as `/v1/messages/count_tokens` or `/v1/responses/{id}` are not metered calls.
    pub fn from_path(path: &str) -> Option<Api> {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        let path = path.strip_suffix('/').unwrap_or(path);
        ROUTES.iter().find(|(suffix, _)| path.ends_with(suffix)).map(|&(_, api)| api)
    }

    pub fn provider(self) -> Provider {
        match self {
            Api::Messages => Provider::Anthropic,
            _ => Provider::OpenAi,
        }
    }

    /// The canonical path, e.g. `/v1/chat/completions`.
    pub fn path(self) -> &'static str {
        ROUTES.iter().find(|(_, api)| *api == self).map_or("", |(path, _)| path)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Api::ChatCompletions => "chat_completions",
            Api::Completions => "completions",
            Api::Responses => "responses",
            Api::Embeddings => "embeddings",
            Api::Messages => "messages",
        }
    }
}

/// Memory bounds of one [`Meter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest SSE event (its data, or any one line) that is parsed; larger ones are skipped.
    pub max_event_bytes: usize,
    /// Largest JSON body buffered whole; a larger one is read from its head and tail only.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_event_bytes: 1 << 20, max_body_bytes: 8 << 20 }
    }
}

/// What a response used, as [`Meter::finish`] reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Metered {
    pub usage: Usage,
    /// `Reported` when the provider's own final usage was read, otherwise `Estimated`.
    pub source: UsageSource,
    /// The model the upstream says answered (may differ from the requested alias, e.g. a dated
    /// snapshot).
    pub model: Option<String>,
    /// The response reached its protocol end: `data: [DONE]`, `message_stop`, a terminal
    /// `response.*` event, or a whole JSON body that parsed. `false` means it was cut off.
    pub complete: bool,
    /// The body was compressed and could not be decoded to its end (then `source` is
    /// `Estimated`). `None` for a plain body or one decoded whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_aborted: Option<DecodeAbort>,
    /// Why the response ended, as the provider said (`stop`, `length`, `end_turn`, ...), once
    /// each, in order; only when asked for ([`Meter::with_finish_reasons`]), else empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub finish_reasons: Vec<String>,
}

/// Model and usage read from a whole JSON body.
pub(crate) struct BodyUsage {
    pub model: Option<String>,
    pub usage: Option<Usage>,
}

/// What the provider modules have observed so far in one response.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub model: Option<String>,
    /// Usage reported so far (possibly provisional, see `final_usage`).
    pub usage: Option<Usage>,
    /// `usage` is the provider's final count for the response.
    pub final_usage: bool,
    /// Decoded UTF-8 bytes of output text seen, for the estimate.
    pub text_bytes: u64,
    pub done: bool,
    /// The finish reasons seen, when the adapter asked for them (`None`: not read at all).
    pub finish_reasons: Option<Vec<String>>,
}

impl Tally {
    /// Keeps the latest non-empty model name, allocating only when it changes.
    fn see_model(&mut self, model: Option<Cow<'_, str>>) {
        if let Some(m) = model {
            if !m.is_empty() && self.model.as_deref() != Some(&*m) {
                self.model = Some(m.into_owned());
            }
        }
    }

    fn into_metered(self, input_estimate: u64) -> Metered {
        let (usage, source) = match self.usage {
            Some(u) if self.final_usage => (u, UsageSource::Reported),
            // Input counts already reported (Anthropic's `message_start`) are exact; only the
            // output is missing, and it is at least what was reported so far.
            Some(u) => (
                Usage { output: u.output.max(tokens_from_bytes(self.text_bytes)), ..u },
                UsageSource::Estimated,
            ),
            None => (
                Usage {
                    input: input_estimate,
                    output: tokens_from_bytes(self.text_bytes),
                    ..Usage::default()
                },
                UsageSource::Estimated,
            ),
        };
        Metered {
            usage,
            source,
            model: self.model,
            complete: self.done,
            decode_aborted: None,
            finish_reasons: self.finish_reasons.unwrap_or_default(),
        }
    }
}

/// Leading whitespace tolerated before a streamed body is classified as SSE or JSON.
const SNIFF_LIMIT: usize = 1024;

#[derive(Debug)]
enum Body {
    /// A streamed response whose first non-whitespace byte has not arrived: an upstream may
    /// answer a streaming request with a JSON body (an error, or a server that ignores
    /// `stream`), which starts with `{` where SSE never does. Holds the whitespace seen.
    Sniff(Vec<u8>),
    Sse(SseParser),
    Json(JsonBody),
}

/// Meters one response; see the module documentation.
#[derive(Debug)]
pub struct Meter {
    api: Api,
    limits: Limits,
    body: Body,
    tally: Tally,
    /// Undoes the response's content-coding, when it has one.
    decoder: Option<Box<Decoder>>,
    decode_limits: DecodeLimits,
}

impl Meter {
    /// A meter for a response of `api`; `streaming` when the request asked for a stream.
    pub fn new(api: Api, streaming: bool) -> Self {
        Meter::with_limits(api, streaming, Limits::default())
    }

    pub fn with_limits(api: Api, streaming: bool, limits: Limits) -> Self {
        let body = if streaming {
            Body::Sniff(Vec::new())
        } else {
            Body::Json(JsonBody::new(limits.max_body_bytes))
        };
        Meter {
            api,
            limits,
            body,
            tally: Tally::default(),
            decoder: None,
            decode_limits: DecodeLimits::default(),
        }
    }

    /// The meter for a body sent with this `Content-Encoding` header value (`None` or
    /// `identity`: plain). See [`Meter::set_encoding`].
    pub fn with_encoding(mut self, content_encoding: Option<&str>) -> Self {
        if let Some(value) = content_encoding {
            self.set_encoding(value);
        }
        self
    }

    /// Names the response's `Content-Encoding` (the header's value as sent, e.g. `gzip` or
    /// `gzip, br`), before the first [`Meter::feed`]. The meter then decodes what it is fed;
    /// the adapter keeps forwarding the upstream's bytes unchanged.
    pub fn set_encoding(&mut self, content_encoding: &str) {
        let encoding = ContentEncoding::parse(content_encoding);
        self.decoder = Decoder::new(encoding, self.decode_limits).map(Box::new);
    }

    /// Changes the decoding bounds (before [`Meter::set_encoding`]).
    pub fn with_decode_limits(mut self, limits: DecodeLimits) -> Self {
        self.decode_limits = limits;
        self
    }

    /// Also reads why the response ended ([`Metered::finish_reasons`]): a second small parse
    /// of the events and bodies that say it, for adapters that report it (traces).
    pub fn with_finish_reasons(mut self) -> Self {
        self.tally.finish_reasons = Some(Vec::new());
        self
    }

    pub fn api(&self) -> Api {
        self.api
    }

    /// Observes the next chunk of the response body, split anywhere, as the upstream sent it
    /// (compressed when it was).
    pub fn feed(&mut self, chunk: &[u8]) {
        match self.decoder.take() {
            None => self.feed_plain(chunk),
            Some(mut decoder) => {
                decoder.feed(chunk, &mut |plain| self.feed_plain(plain));
                self.decoder = Some(decoder);
            }
        }
    }

    fn feed_plain(&mut self, chunk: &[u8]) {
        let api = self.api;
        match &mut self.body {
            Body::Sse(sse) => sse.feed(chunk, &mut |ev| on_event(api, ev, &mut self.tally)),
            Body::Json(json) => json.feed(chunk),
            Body::Sniff(ws) => {
                let Some(at) = chunk.iter().position(|b| !b.is_ascii_whitespace()) else {
                    ws.extend_from_slice(chunk);
                    if ws.len() >= SNIFF_LIMIT {
                        let ws = std::mem::take(ws);
                        self.start_sse(&ws, &[]);
                    }
                    return;
                };
                if ws.len() + at < SNIFF_LIMIT && chunk[at] == b'{' {
                    let mut json = JsonBody::new(self.limits.max_body_bytes);
                    json.feed(&chunk[at..]);
                    self.body = Body::Json(json);
                } else {
                    let ws = std::mem::take(ws);
                    self.start_sse(&ws, chunk);
                }
            }
        }
    }

    fn start_sse(&mut self, first: &[u8], second: &[u8]) {
        let api = self.api;
        let mut sse = SseParser::new(self.limits.max_event_bytes);
        sse.feed(first, &mut |ev| on_event(api, ev, &mut self.tally));
        sse.feed(second, &mut |ev| on_event(api, ev, &mut self.tally));
        self.body = Body::Sse(sse);
    }

    /// Ends metering, at end of stream or when the stream was cut off. `input_estimate` (from
    /// request inspection) is the input count used when the response reported none.
    pub fn finish(mut self, input_estimate: u64) -> Metered {
        let mut aborted = None;
        if let Some(mut decoder) = self.decoder.take() {
            decoder.finish(&mut |plain| self.feed_plain(plain));
            aborted = decoder.aborted().map(|reason| (reason, decoder.compressed_bytes()));
        }
        let Meter { api, mut tally, body, .. } = self;
        match body {
            Body::Sse(mut sse) => sse.finish(&mut |ev| on_event(api, ev, &mut tally)),
            Body::Json(json) => json.finish(api, &mut tally),
            Body::Sniff(_) => {}
        }
        let Some((reason, compressed)) = aborted else {
            return tally.into_metered(input_estimate);
        };
        // What was decoded is not the whole answer: any usage read is not final, and every
        // byte received counts as output text if that is more than the text decoded (an
        // over-estimate, the safe side for a budget).
        tally.final_usage = false;
        tally.done = false;
        if api != Api::Embeddings {
            tally.text_bytes = tally.text_bytes.max(compressed);
        }
        Metered { decode_aborted: Some(reason), ..tally.into_metered(input_estimate) }
    }
}

fn on_event(api: Api, ev: Event<'_>, tally: &mut Tally) {
    if let Some(out) = &mut tally.finish_reasons {
        match api {
            Api::ChatCompletions | Api::Completions => finish::choices(ev.data, out),
            Api::Responses => finish::response_event(ev.data, out),
            Api::Messages => finish::message_delta(ev.data, out),
            Api::Embeddings => {}
        }
    }
    match api {
        Api::ChatCompletions | Api::Completions | Api::Embeddings => {
            openai::chat_event(ev.data, tally)
        }
        Api::Responses => openai::responses_event(ev.name, ev.data, tally),
        Api::Messages => anthropic::message_event(ev.name, ev.data, tally),
    }
}
