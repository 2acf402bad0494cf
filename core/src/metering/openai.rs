//! OpenAI usage: chat completions, legacy completions, embeddings and responses.
//!
//! Decides which numbers in an OpenAI response are its usage and maps them onto the disjoint
//! [`Usage`] buckets with [`Usage::from_openai`]: OpenAI's `prompt_tokens` / `input_tokens`
//! *include* the cached tokens and its `completion_tokens` / `output_tokens` *include* the
//! reasoning tokens, so the details are subtracted, never added. Never sums two usage reports of
//! one response: each report is the total for the request, and a later one replaces an earlier.

use std::borrow::Cow;

use serde::Deserialize;

use super::count::Count;
use super::estimate::{SeqText, TextBytes, TextLen};
use super::{BodyUsage, Tally};
use crate::usage::Usage;

/// `usage` of chat completions, completions and embeddings. Embeddings report only
/// `prompt_tokens` (and `total_tokens`, equal to it), so they meter as input only.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ChatUsage {
    #[serde(default)]
    prompt_tokens: Count,
    #[serde(default)]
    completion_tokens: Count,
    prompt_tokens_details: Option<InputDetails>,
    completion_tokens_details: Option<OutputDetails>,
}

/// `usage` of the responses API: the same overlaps under other names.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ResponsesUsage {
    #[serde(default)]
    input_tokens: Count,
    #[serde(default)]
    output_tokens: Count,
    input_tokens_details: Option<InputDetails>,
    output_tokens_details: Option<OutputDetails>,
}

#[derive(Debug, Default, Deserialize)]
struct InputDetails {
    #[serde(default)]
    cached_tokens: Count,
}

#[derive(Debug, Default, Deserialize)]
struct OutputDetails {
    #[serde(default)]
    reasoning_tokens: Count,
}

impl ChatUsage {
    pub(crate) fn usage(&self) -> Usage {
        Usage::from_openai(
            self.prompt_tokens.get(),
            self.prompt_tokens_details.as_ref().map_or(0, |d| d.cached_tokens.get()),
            self.completion_tokens.get(),
            self.completion_tokens_details.as_ref().map_or(0, |d| d.reasoning_tokens.get()),
        )
    }
}

impl ResponsesUsage {
    pub(crate) fn usage(&self) -> Usage {
        Usage::from_openai(
            self.input_tokens.get(),
            self.input_tokens_details.as_ref().map_or(0, |d| d.cached_tokens.get()),
            self.output_tokens.get(),
            self.output_tokens_details.as_ref().map_or(0, |d| d.reasoning_tokens.get()),
        )
    }
}

#[derive(Deserialize)]
struct Body<'a, U> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    usage: Option<U>,
}

/// Model and usage of a whole chat completions, completions or embeddings body.
pub(crate) fn chat_body(body: &[u8]) -> serde_json::Result<BodyUsage> {
    let b: Body<'_, ChatUsage> = serde_json::from_slice(body)?;
    Ok(BodyUsage { model: b.model.map(Cow::into_owned), usage: b.usage.map(|u| u.usage()) })
}

/// Model and usage of a whole responses API body.
pub(crate) fn responses_body(body: &[u8]) -> serde_json::Result<BodyUsage> {
    let b: Body<'_, ResponsesUsage> = serde_json::from_slice(body)?;
    Ok(BodyUsage { model: b.model.map(Cow::into_owned), usage: b.usage.map(|u| u.usage()) })
}

/// One streamed `chat.completion.chunk` (or `text_completion` chunk), reduced to what the
/// meter needs; everything else is skipped unread.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    choices: SeqText<ChunkChoice>,
    usage: Option<ChatUsage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    delta: Option<Delta>,
    /// Legacy completions stream `choices[].text` instead of a delta.
    #[serde(default)]
    text: TextLen,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: TextLen,
    #[serde(default)]
    refusal: TextLen,
    #[serde(default)]
    tool_calls: SeqText<ToolCallDelta>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: TextLen,
    #[serde(default)]
    arguments: TextLen,
}

impl TextBytes for ChunkChoice {
    fn text_bytes(&self) -> u64 {
        self.text.0 + self.delta.as_ref().map_or(0, Delta::text_bytes)
    }
}

impl TextBytes for Delta {
    fn text_bytes(&self) -> u64 {
        self.content.0 + self.refusal.0 + self.tool_calls.0
    }
}

impl TextBytes for ToolCallDelta {
    fn text_bytes(&self) -> u64 {
        self.function.as_ref().map_or(0, |f| f.name.0 + f.arguments.0)
    }
}

/// One event of a chat completions or completions stream.
///
/// Quirk: the usage chunk exists only when the request set `stream_options.include_usage`. It
/// comes last, just before `data: [DONE]`, with `"choices": []`; every other chunk then carries
/// `"usage": null`. Without it the stream has no usage at all and the meter estimates. Some
/// compatible servers put usage on the last content chunk instead, which is read the same way.
pub(crate) fn chat_event(data: &[u8], tally: &mut Tally) {
    if data.trim_ascii() == b"[DONE]" {
        tally.done = true;
        return;
    }
    let Ok(chunk) = serde_json::from_slice::<Chunk<'_>>(data) else { return };
    tally.see_model(chunk.model);
    tally.text_bytes = tally.text_bytes.saturating_add(chunk.choices.0);
    if let Some(u) = chunk.usage {
        tally.usage = Some(u.usage());
        tally.final_usage = true;
    }
}

#[derive(Deserialize)]
struct ResponsesEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    delta: TextLen,
    #[serde(borrow)]
    response: Option<ResponseObject<'a>>,
}

#[derive(Deserialize)]
struct ResponseObject<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    usage: Option<ResponsesUsage>,
}

/// One event of a responses API stream.
///
/// Quirk: events are typed both by the SSE `event:` line and by the payload's `type`; the
/// payload wins. Usage arrives once, in the terminal event's `response.usage`: normally
/// `response.completed`, but `response.incomplete` (e.g. `max_output_tokens` reached) and
/// `response.failed` carry it too. Text arrives in `*.delta` events (output text, refusals,
/// function-call arguments, reasoning summaries); `response.audio.delta` carries base64 audio,
/// not text, and is not counted. There is no `[DONE]`.
pub(crate) fn responses_event(name: &[u8], data: &[u8], tally: &mut Tally) {
    let Ok(ev) = serde_json::from_slice::<ResponsesEvent<'_>>(data) else { return };
    let kind = match &ev.kind {
        Some(k) => k.as_ref(),
        None => std::str::from_utf8(name).unwrap_or(""),
    };
    let terminal = matches!(kind, "response.completed" | "response.incomplete" | "response.failed");
    if kind.ends_with(".delta") && kind != "response.audio.delta" {
        tally.text_bytes = tally.text_bytes.saturating_add(ev.delta.0);
    }
    if let Some(r) = ev.response {
        tally.see_model(r.model);
        if terminal {
            if let Some(u) = r.usage {
                tally.usage = Some(u.usage());
                tally.final_usage = true;
            }
        }
    }
    if terminal {
        tally.done = true;
    }
}

/// The usage object at the start of `bytes` (trailing bytes ignored), for bodies too large to
/// buffer whole.
pub(crate) fn chat_usage_at(bytes: &[u8]) -> Option<Usage> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    ChatUsage::deserialize(&mut de).ok().map(|u| u.usage())
}

/// Like [`chat_usage_at`] for the responses API.
pub(crate) fn responses_usage_at(bytes: &[u8]) -> Option<Usage> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    ResponsesUsage::deserialize(&mut de).ok().map(|u| u.usage())
}
