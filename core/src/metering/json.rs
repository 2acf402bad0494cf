//! Whole (non-streamed) JSON response bodies, buffered up to a cap.
//!
//! Decides the model and usage of a body that is parsed once it has fully arrived. A body up to
//! `cap` bytes is buffered and parsed whole. Beyond the cap the buffer stops growing: only the
//! first [`HEAD`] bytes (where `model` sits in chat, completions, responses and messages bodies)
//! and a rolling window of the last [`TAIL`] bytes (where `usage` sits, also in large embeddings
//! bodies) are looked at, by locating the last `"usage":` key and parsing the object after it.
//! Never changes the bytes, which the caller forwards itself.

use memchr::memmem;
use serde::Deserialize;

use super::estimate::body_text_bytes;
use super::{anthropic, finish, openai, Api, BodyUsage, Tally};
use crate::usage::Usage;

/// Bytes kept from the start of an over-cap body, to find `model`.
const HEAD: usize = 4 * 1024;
/// Bytes kept from the end of an over-cap body, to find `usage`.
const TAIL: usize = 64 * 1024;

#[derive(Debug)]
pub(crate) struct JsonBody {
    cap: usize,
    /// The whole body while under the cap; afterwards the rolling tail.
    buf: Vec<u8>,
    seen: u64,
    overflow: bool,
    head_model: Option<String>,
}

impl JsonBody {
    pub(crate) fn new(cap: usize) -> Self {
        JsonBody { cap, buf: Vec::new(), seen: 0, overflow: false, head_model: None }
    }

    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        self.seen = self.seen.saturating_add(chunk.len() as u64);
        if !self.overflow {
            if self.buf.len() + chunk.len() <= self.cap {
                self.buf.extend_from_slice(chunk);
                return;
            }
            self.overflow = true;
            // The first min(HEAD, cap) bytes of the body, the same however it was split.
            let head_len = HEAD.min(self.cap);
            let mut head = self.buf[..self.buf.len().min(head_len)].to_vec();
            let more = head_len - head.len();
            head.extend_from_slice(&chunk[..more.min(chunk.len())]);
            self.head_model = model_in(&head, false);
            let keep = TAIL.saturating_sub(chunk.len());
            self.buf.drain(..self.buf.len().saturating_sub(keep));
        }
        if chunk.len() >= TAIL {
            self.buf.clear();
            self.buf.extend_from_slice(&chunk[chunk.len() - TAIL..]);
        } else {
            self.buf.extend_from_slice(chunk);
            if self.buf.len() > 2 * TAIL {
                self.buf.drain(..self.buf.len() - TAIL);
            }
        }
    }

    /// Records what the body reported (or the text to estimate from) in `tally`.
    pub(crate) fn finish(mut self, api: Api, tally: &mut Tally) {
        if self.overflow {
            let tail = &self.buf[self.buf.len().saturating_sub(TAIL)..];
            tally.model = self.head_model.take().or_else(|| model_in(tail, true));
            tally.usage = match api {
                Api::ChatCompletions | Api::Completions | Api::Embeddings => {
                    last_usage(tail, openai::chat_usage_at)
                }
                Api::Responses => last_usage(tail, openai::responses_usage_at),
                Api::Messages => last_usage(tail, anthropic::usage_at),
            };
            tally.final_usage = tally.usage.is_some();
            tally.done = tally.final_usage;
            if !tally.final_usage {
                tally.text_bytes = self.unread_text_bytes(api);
            }
            return;
        }
        if let Some(out) = &mut tally.finish_reasons {
            match api {
                Api::ChatCompletions | Api::Completions => finish::choices(&self.buf, out),
                Api::Responses => finish::response(&self.buf, out),
                Api::Messages => finish::message(&self.buf, out),
                Api::Embeddings => {}
            }
        }
        let parsed = match api {
            Api::ChatCompletions | Api::Completions | Api::Embeddings => {
                openai::chat_body(&self.buf)
            }
            Api::Responses => openai::responses_body(&self.buf),
            Api::Messages => anthropic::message_body(&self.buf),
        };
        match parsed {
            Ok(BodyUsage { model, usage }) => {
                tally.model = model;
                tally.done = true;
                tally.final_usage = usage.is_some();
                tally.usage = usage;
                if usage.is_none() {
                    tally.text_bytes =
                        serde_json::from_slice(&self.buf).map_or(0, |v| body_text_bytes(api, &v));
                }
            }
            Err(_) => {
                tally.model = model_in(&self.buf, false);
                tally.text_bytes = self.unread_text_bytes(api);
            }
        }
    }

    /// Heuristic for a body that could not be read (cut off, or over the cap without usage):
    /// all its bytes count as output text. The JSON framing makes this an over-estimate, which
    /// is the safe side for a budget; embeddings have no output and count none.
    fn unread_text_bytes(&self, api: Api) -> u64 {
        if api == Api::Embeddings {
            0
        } else {
            self.seen
        }
    }
}

/// The value after the object key `key` (quotes included) found at `at`, unless that
/// occurrence is escaped, i.e. inside a string (`\"usage\"`).
fn value_at<'h>(hay: &'h [u8], key: &[u8], at: usize) -> Option<&'h [u8]> {
    if at > 0 && hay[at - 1] == b'\\' {
        return None;
    }
    let rest = hay[at + key.len()..].trim_ascii_start().strip_prefix(b":")?;
    Some(rest.trim_ascii_start())
}

/// The usage object after the last `"usage":` key that parses with `parse`.
fn last_usage(hay: &[u8], parse: impl Fn(&[u8]) -> Option<Usage>) -> Option<Usage> {
    const KEY: &[u8] = b"\"usage\"";
    memmem::rfind_iter(hay, KEY).find_map(|at| value_at(hay, KEY, at).and_then(&parse))
}

/// The string after the first (or `last`) `"model":` key.
fn model_in(hay: &[u8], last: bool) -> Option<String> {
    const KEY: &[u8] = b"\"model\"";
    let parse = |at: usize| {
        let mut de = serde_json::Deserializer::from_slice(value_at(hay, KEY, at)?);
        String::deserialize(&mut de).ok()
    };
    if last {
        memmem::rfind_iter(hay, KEY).find_map(parse)
    } else {
        memmem::find_iter(hay, KEY).find_map(parse)
    }
}
