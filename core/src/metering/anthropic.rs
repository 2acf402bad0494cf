//! Anthropic usage: the messages API.
//!
//! Decides which numbers in a messages response are its usage and maps them onto [`Usage`].
//! Anthropic's buckets are already disjoint: `input_tokens` *excludes* `cache_read_input_tokens`
//! and `cache_creation_input_tokens`, so the three map one-to-one onto `input`, `cached_input`
//! and `cache_write`. The `cache_creation` object (`ephemeral_5m_input_tokens`,
//! `ephemeral_1h_input_tokens`) only splits `cache_creation_input_tokens` by lifetime and is not
//! added again. Extended thinking is billed as output and not reported separately, so it lands
//! in `output` (never in `reasoning`), whether reported or estimated.

use std::borrow::Cow;

use serde::Deserialize;

use super::count::Count;
use super::estimate::TextLen;
use super::{BodyUsage, Tally};
use crate::usage::Usage;

/// A messages `usage` object. Every field is optional: stream events carry subsets.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct MessageUsage {
    #[serde(default)]
    input_tokens: Count,
    #[serde(default)]
    output_tokens: Count,
    #[serde(default)]
    cache_creation_input_tokens: Count,
    #[serde(default)]
    cache_read_input_tokens: Count,
}

impl MessageUsage {
    pub(crate) fn usage(&self) -> Usage {
        Usage {
            input: self.input_tokens.get(),
            cached_input: self.cache_read_input_tokens.get(),
            cache_write: self.cache_creation_input_tokens.get(),
            output: self.output_tokens.get(),
            reasoning: 0,
        }
    }

    /// Folds a cumulative report into `into`, keeping the largest value of each field. Counts
    /// within one message only grow, so for a well-formed stream this is the latest value; a
    /// field repeated as `null` or `0` in a later event does not erase what was reported.
    fn merge_into(&self, into: &mut Usage) {
        let keep = |slot: &mut u64, v: Count| *slot = (*slot).max(v.get());
        keep(&mut into.input, self.input_tokens);
        keep(&mut into.cached_input, self.cache_read_input_tokens);
        keep(&mut into.cache_write, self.cache_creation_input_tokens);
        keep(&mut into.output, self.output_tokens);
    }
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    usage: Option<MessageUsage>,
}

/// Model and usage of a whole messages body.
pub(crate) fn message_body(body: &[u8]) -> serde_json::Result<BodyUsage> {
    let b: Body<'_> = serde_json::from_slice(body)?;
    Ok(BodyUsage { model: b.model.map(Cow::into_owned), usage: b.usage.map(|u| u.usage()) })
}

#[derive(Deserialize)]
struct StreamEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    /// `message_start` only.
    #[serde(borrow)]
    message: Option<Body<'a>>,
    /// `message_delta` only.
    usage: Option<MessageUsage>,
    /// `content_block_delta` (text, thinking or tool input) and `message_delta` (stop reason).
    delta: Option<BlockDelta>,
}

#[derive(Deserialize)]
struct BlockDelta {
    #[serde(default)]
    text: TextLen,
    #[serde(default)]
    thinking: TextLen,
    #[serde(default)]
    partial_json: TextLen,
}

/// One event of a messages stream.
///
/// Quirk: usage is cumulative, not incremental. `message_start` carries `message.usage` with the
/// input and cache counts and a provisional `output_tokens` (often 1); each `message_delta`
/// carries `usage.output_tokens` as the running total for the whole message (newer API versions
/// also repeat the input and cache fields there). The meter keeps the latest (largest) value of
/// each field and never adds deltas: `1`, then `15`, then `47` meter 47 output tokens, not 63.
/// Usage counts as reported once a `message_delta` has carried it; before that the input
/// numbers from `message_start` are exact but the output is still an estimate. `ping`,
/// `content_block_start`, `content_block_stop` and `error` carry no usage; `message_stop` ends
/// the stream.
pub(crate) fn message_event(name: &[u8], data: &[u8], tally: &mut Tally) {
    let Ok(ev) = serde_json::from_slice::<StreamEvent<'_>>(data) else { return };
    let kind = match &ev.kind {
        Some(k) => k.as_ref(),
        None => std::str::from_utf8(name).unwrap_or(""),
    };
    match kind {
        "message_start" => {
            if let Some(m) = ev.message {
                tally.see_model(m.model);
                if let Some(u) = m.usage {
                    u.merge_into(tally.usage.get_or_insert_with(Usage::default));
                }
            }
        }
        "message_delta" => {
            if let Some(u) = ev.usage {
                u.merge_into(tally.usage.get_or_insert_with(Usage::default));
                tally.final_usage = true;
            }
        }
        "content_block_delta" => {
            if let Some(d) = ev.delta {
                let bytes = d.text.0.saturating_add(d.thinking.0).saturating_add(d.partial_json.0);
                tally.text_bytes = tally.text_bytes.saturating_add(bytes);
            }
        }
        "message_stop" => tally.done = true,
        _ => {}
    }
}

/// The usage object at the start of `bytes` (trailing bytes ignored), for bodies too large to
/// buffer whole.
pub(crate) fn usage_at(bytes: &[u8]) -> Option<Usage> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    MessageUsage::deserialize(&mut de).ok().map(|u| u.usage())
}
