//! Why a response ended (`finish_reason`, `stop_reason`, a responses API `status`), read only
//! when the adapter asks for it ([`super::Meter::with_finish_reasons`]): a second small parse of
//! the events and bodies that carry it, so a meter that does not ask pays nothing.
//!
//! Where each API says it: chat completions and legacy completions in every choice's
//! `finish_reason` (streamed: on the last chunk of each choice); Anthropic messages in
//! `stop_reason` (streamed: in `message_delta.delta`); the responses API in the response's
//! `incomplete_details.reason` when it is incomplete, else its `status`.

use std::borrow::Cow;

use serde::Deserialize;

/// Most distinct reasons kept for one response.
const MAX_REASONS: usize = 8;

/// Adds `reason` to `out` once (non-empty, at most [`MAX_REASONS`]).
fn keep(out: &mut Vec<String>, reason: Option<Cow<'_, str>>) {
    let Some(reason) = reason else { return };
    if !reason.is_empty() && out.len() < MAX_REASONS && !out.iter().any(|r| *r == *reason) {
        out.push(reason.into_owned());
    }
}

#[derive(Deserialize)]
struct Choices<'a> {
    #[serde(borrow, default)]
    choices: Vec<Choice<'a>>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

/// A chat completions or completions body or stream chunk.
pub(crate) fn choices(data: &[u8], out: &mut Vec<String>) {
    if let Ok(c) = serde_json::from_slice::<Choices<'_>>(data) {
        for choice in c.choices {
            keep(out, choice.finish_reason);
        }
    }
}

#[derive(Deserialize)]
struct Stop<'a> {
    #[serde(borrow)]
    stop_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct MessageDelta<'a> {
    #[serde(borrow)]
    delta: Option<Stop<'a>>,
}

/// An Anthropic messages body.
pub(crate) fn message(data: &[u8], out: &mut Vec<String>) {
    if let Ok(m) = serde_json::from_slice::<Stop<'_>>(data) {
        keep(out, m.stop_reason);
    }
}

/// An Anthropic `message_delta` event.
pub(crate) fn message_delta(data: &[u8], out: &mut Vec<String>) {
    if let Ok(m) = serde_json::from_slice::<MessageDelta<'_>>(data) {
        keep(out, m.delta.and_then(|d| d.stop_reason));
    }
}

#[derive(Deserialize)]
struct Response<'a> {
    #[serde(borrow)]
    status: Option<Cow<'a, str>>,
    #[serde(borrow)]
    incomplete_details: Option<Incomplete<'a>>,
}

#[derive(Deserialize)]
struct Incomplete<'a> {
    #[serde(borrow)]
    reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ResponseEvent<'a> {
    #[serde(borrow)]
    response: Option<Response<'a>>,
}

impl<'a> Response<'a> {
    fn reason(self) -> Option<Cow<'a, str>> {
        self.incomplete_details.and_then(|d| d.reason).or(self.status)
    }
}

/// A responses API body.
pub(crate) fn response(data: &[u8], out: &mut Vec<String>) {
    if let Ok(r) = serde_json::from_slice::<Response<'_>>(data) {
        keep(out, r.reason());
    }
}

/// A terminal responses API event (`response.completed`, `.incomplete`, `.failed`).
pub(crate) fn response_event(data: &[u8], out: &mut Vec<String>) {
    if let Ok(ev) = serde_json::from_slice::<ResponseEvent<'_>>(data) {
        keep(out, ev.response.and_then(Response::reason));
    }
}
