//! What a request may use at most, and whether what the upstream reported is believable.
//!
//! Decides, before a request is forwarded, an upper bound on its input and output tokens
//! ([`bound`]), from which the budget reservation, the per-request cost cap and the
//! tokens-per-minute count are computed; and, after the response, whether the reported usage
//! could have come from that request ([`judge`]) and what to bill ([`bill`]). Both the sidecar
//! and the Envoy filter call these, so a request is bounded and judged the same way in both.
//!
//! **Output.** The request's own cap (`max_tokens`, `max_completion_tokens`,
//! `max_output_tokens`, the largest if several), lowered to the model's documented output limit
//! from the rate card ([`ModelLimits::max_output_tokens`]) when the card knows it, because a
//! provider refuses a cap above the model's limit. Without a cap in the request: the model's
//! output limit; without that, its context window ([`ModelLimits::context_window`]); without
//! either, [`UNKNOWN_MAX_OUTPUT_TOKENS`], the largest output limit any current OpenAI or
//! Anthropic model documents. That last case is the one risk left: a model that the card does
//! not describe and that writes more than 128,000 tokens in one response can spend more than
//! was reserved. Give such a model its `max_output_tokens` in the rate card to close it. An
//! embeddings request has no output.
//!
//! **Input.** Every token a provider bills for text covers at least one byte of that text
//! (byte-level BPE), and all text the model reads is in the request body, where JSON keys,
//! quotes and escapes only add bytes; so the body's length bounds its text tokens. Images and
//! files are bounded per item instead of by their base64 bytes (see [`IMAGE_TOKENS`],
//! [`FILE_TOKENS`]); inline audio stays counted by its bytes, which bound it (audio is billed
//! at a few tens of tokens per second, and any codec needs far more bytes per second than
//! that). [`REQUEST_OVERHEAD_TOKENS`] and, when tools are offered, [`TOOLS_OVERHEAD_TOKENS`]
//! cover what the provider adds around the prompt. A
//! request that brings in input from outside its body ([`InputMeasure::open`]) is bounded by
//! the model's context window, or [`OPEN_INPUT_TOKENS`] when the card does not know it. The
//! input bound is never above the context window: a provider refuses a longer prompt.
//!
//! **Judgement.** A report is implausible when it claims more than the request could use:
//! more input than the input bound (for an open request, more than
//! [`OPEN_INPUT_CEILING_TOKENS`]), more output than the model's output limit (or, when the card
//! does not know it, its context window, or else the larger of the request's output bound and
//! [`UNKNOWN_MAX_OUTPUT_TOKENS`]), or, for a request
//! whose input is all in its body, more input and output together than the context window.
//! Implausible usage is billed at the reservation, the request's worst case, and marked
//! [`UsageSource::Implausible`]. Usage above the reservation that is still plausible (an
//! upstream ignoring `max_tokens` within the model's limit, a dearer model answering, a
//! provider-run tool loop reading more than one context window) is billed as reported: the
//! truth goes to the ledger and the budget, and the caller counts the overrun.
//!
//! All arithmetic here saturates at `u64::MAX`; nothing wraps.

use crate::inspect::{InputMeasure, RequestInfo};
use crate::metering::Api;
use crate::money::Money;
use crate::pricing::{Cost, ModelLimits, Rates};
use crate::usage::{Usage, UsageSource};

/// Tokens a provider adds around a prompt that are not in the request's text: the chat
/// template's start-of-reply priming (3 tokens for OpenAI) and markers around the whole prompt.
/// The per-message role markers (about 4 tokens per message) are already covered by the bytes
/// of each message's `role` and `content` keys. Many times the largest of those.
pub const REQUEST_OVERHEAD_TOKENS: u64 = 64;

/// Tokens added when the request offers tools: the system prompt Anthropic adds for tool use
/// (at most 530 tokens, per its tool-use pricing table) and the namespace wrapper OpenAI
/// renders function definitions in. About twice the largest of those.
pub const TOOLS_OVERHEAD_TOKENS: u64 = 1_024;

/// Input tokens one image can cost. Providers downscale images before tokenizing them, so the
/// cost of one image is capped whatever its size: Anthropic's largest (1.15 megapixels) is
/// about 1,600 tokens; OpenAI's tile models cost at most 85 + 170 × 8 tiles = 1,445 (detail
/// high) and its patch models at most 1,536 patches × 2.46 (the largest multiplier, gpt-4.1-nano
/// and gpt-5-nano) = 3,779. More than twice the largest.
pub const IMAGE_TOKENS: u64 = 8_192;

/// Input tokens one file (a PDF document) can cost: both providers accept at most 100 pages per
/// request, and bill each page's extracted text (at most about 3,000 tokens for a dense page)
/// plus the page as an image (at most [`IMAGE_TOKENS`]). 100 × (3,000 + 8,192), rounded up.
/// Lowered to the context window when the card knows it.
pub const FILE_TOKENS: u64 = 1_120_000;

/// Input tokens of a request that brings in input from outside its body, when the card does not
/// know the model's context window: above the largest context window of any current OpenAI or
/// Anthropic model (about 1,050,000 tokens for gpt-4.1 and Claude's 1M-context models).
pub const OPEN_INPUT_TOKENS: u64 = 2_000_000;

/// Output tokens reserved when neither the request nor the rate card bounds the output: the
/// largest documented output limit of any current OpenAI or Anthropic model (gpt-5: 128,000).
pub const UNKNOWN_MAX_OUTPUT_TOKENS: u64 = 128_000;

/// The most input tokens a plausible report may claim for a request with input from outside its
/// body: a provider-run tool loop bills the context once per step, so more than one context
/// window is possible, but not 50 windows of the largest current model.
pub const OPEN_INPUT_CEILING_TOKENS: u64 = 100_000_000;

/// Where a [`Bound`]'s output figure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutputCap {
    /// The request's `max_tokens` (or equivalent).
    Requested,
    /// The model's `max_output_tokens` in the rate card.
    ModelLimit,
    /// The model's context window in the rate card.
    ContextWindow,
    /// [`UNKNOWN_MAX_OUTPUT_TOKENS`]: nothing else bounds it.
    Assumed,
    /// The endpoint produces no output tokens (embeddings).
    NoOutput,
}

/// The most tokens one request can use, as reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Bound {
    pub input: u64,
    pub output: u64,
    pub output_cap: OutputCap,
    /// The input is not all in the request body ([`InputMeasure::open`]).
    pub open: bool,
    /// The requested model's limits from the rate card, for [`judge`].
    pub limits: ModelLimits,
}

impl Bound {
    /// Input and output together, for tokens-per-minute limits.
    pub fn tokens(&self) -> u64 {
        self.input.saturating_add(self.output)
    }

    /// The cost of the bound at `rates`: the amount to reserve ([`Rates::worst_case`]).
    pub fn worst_case(&self, rates: &Rates) -> Cost {
        rates.worst_case(self.input, self.output)
    }

    /// The bound as usage, in the `input` and `output` buckets (what an implausible report is
    /// recorded as).
    pub fn as_usage(&self) -> Usage {
        Usage { input: self.input, output: self.output, ..Usage::default() }
    }
}

/// The upper bound of the input tokens of a request measured as `m`; see the module docs.
pub fn input_bound(m: &InputMeasure, limits: ModelLimits) -> u64 {
    if m.open {
        return limits.context_window.unwrap_or(OPEN_INPUT_TOKENS);
    }
    let n = m
        .text_bytes
        .saturating_add(m.images.saturating_mul(IMAGE_TOKENS))
        .saturating_add(m.files.saturating_mul(FILE_TOKENS))
        .saturating_add(REQUEST_OVERHEAD_TOKENS)
        .saturating_add(if m.tools { TOOLS_OVERHEAD_TOKENS } else { 0 });
    limits.context_window.map_or(n, |window| n.min(window))
}

/// The upper bound of a request to `api` (an LLM endpoint) described by `info`, for a model
/// with `limits`; see the module docs.
pub fn bound(api: Option<Api>, info: &RequestInfo, limits: ModelLimits) -> Bound {
    let input = input_bound(&info.input, limits);
    let (output, output_cap) = if api == Some(Api::Embeddings) {
        (0, OutputCap::NoOutput)
    } else {
        match (info.max_output_tokens, limits.max_output_tokens, limits.context_window) {
            (Some(asked), Some(limit), _) if asked > limit => (limit, OutputCap::ModelLimit),
            (Some(asked), _, Some(window)) if asked > window => (window, OutputCap::ContextWindow),
            (Some(asked), _, _) => (asked, OutputCap::Requested),
            (None, Some(limit), _) => (limit, OutputCap::ModelLimit),
            (None, None, Some(window)) => (window, OutputCap::ContextWindow),
            (None, None, None) => (UNKNOWN_MAX_OUTPUT_TOKENS, OutputCap::Assumed),
        }
    };
    Bound { input, output, output_cap, open: info.input.open, limits }
}

/// Why a usage report cannot be true.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Implausible {
    #[error("{reported} input tokens reported, the request can use at most {most}")]
    Input { reported: u64, most: u64 },
    #[error("{reported} output tokens reported, the request can produce at most {most}")]
    Output { reported: u64, most: u64 },
    #[error("{reported} tokens reported in all, over the model's context window of {window}")]
    ContextWindow { reported: u64, window: u64 },
}

/// Whether `usage` could have come from a request bounded by `bound`; see the module docs.
pub fn judge(usage: &Usage, bound: &Bound) -> Result<(), Implausible> {
    let input = usage.total_input();
    let most = if bound.open { bound.input.max(OPEN_INPUT_CEILING_TOKENS) } else { bound.input };
    if input > most {
        return Err(Implausible::Input { reported: input, most });
    }
    let output = usage.total_output();
    let most = match (bound.limits.max_output_tokens, bound.limits.context_window) {
        (Some(limit), _) => limit,
        (None, Some(window)) => window,
        (None, None) => bound.output.max(UNKNOWN_MAX_OUTPUT_TOKENS),
    };
    if output > most {
        return Err(Implausible::Output { reported: output, most });
    }
    if let (false, Some(window)) = (bound.open, bound.limits.context_window) {
        let total = usage.total();
        if total > window {
            return Err(Implausible::ContextWindow { reported: total, window });
        }
    }
    Ok(())
}

/// What a request is billed, from its metered usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bill {
    /// The usage to record: as metered, or the bound when the report was implausible.
    pub usage: Usage,
    pub source: UsageSource,
    pub cost: Cost,
    /// Set when the report was not believed (the caller logs and counts it).
    pub implausible: Option<Implausible>,
}

/// Bills metered `usage` of a request bounded by `bound` whose reservation was `reserved`:
/// `price` prices believable usage; an implausible report is billed `reserved` and recorded as
/// the bound, marked [`UsageSource::Implausible`]. An estimate (a stream cut short, a body that
/// could not be decoded) is not a report to believe or not: each bucket is capped at the bound,
/// so it is never billed above the reservation, and it stays [`UsageSource::Estimated`]. Usage
/// from [`UsageSource::None`] (nothing was metered) is never judged.
pub fn bill(
    usage: Usage,
    source: UsageSource,
    bound: &Bound,
    reserved: Cost,
    price: impl FnOnce(Usage) -> Cost,
) -> Bill {
    if source == UsageSource::Estimated {
        if judge(&usage, bound).is_err() {
            let capped = Usage {
                input: usage.input.min(bound.input),
                output: usage.output.min(bound.output),
                cached_input: usage.cached_input.min(bound.input),
                cache_write: usage.cache_write.min(bound.input),
                reasoning: usage.reasoning.min(bound.output),
            };
            let cost = price(capped);
            let cost = if cost.total > reserved.total { reserved } else { cost };
            return Bill { usage: capped, source, cost, implausible: None };
        }
    } else if source != UsageSource::None {
        if let Err(why) = judge(&usage, bound) {
            return Bill {
                usage: bound.as_usage(),
                source: UsageSource::Implausible,
                cost: reserved,
                implausible: Some(why),
            };
        }
    }
    Bill { usage, source, cost: price(usage), implausible: None }
}

/// How much `charged` exceeds what was `reserved` (zero when it does not).
pub fn overrun(reserved: Money, charged: Money) -> Money {
    (charged - reserved).max(Money::ZERO)
}

#[cfg(test)]
mod tests;
