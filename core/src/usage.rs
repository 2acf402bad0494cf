//! Token usage in disjoint buckets, as priced by the rate card.
//!
//! Providers report overlapping numbers: OpenAI's `prompt_tokens` includes
//! `prompt_tokens_details.cached_tokens` and its `completion_tokens` include
//! `completion_tokens_details.reasoning_tokens`, while Anthropic's `input_tokens` excludes
//! `cache_read_input_tokens` and `cache_creation_input_tokens`. The meters normalise both into
//! the buckets below, which never overlap, so that pricing is a plain sum and nothing is counted
//! twice.

use serde::{Deserialize, Serialize};

/// Tokens of one request in disjoint buckets (an absent bucket reads as 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Input tokens billed at the full input rate (not read from or written to a cache).
    pub input: u64,
    /// Input tokens read from the provider's prompt cache.
    pub cached_input: u64,
    /// Input tokens written to the provider's prompt cache (Anthropic cache creation).
    pub cache_write: u64,
    /// Output tokens, excluding reasoning tokens.
    pub output: u64,
    /// Reasoning ("thinking") output tokens.
    pub reasoning: u64,
}

impl Usage {
    /// All input tokens, cached or not.
    pub fn total_input(&self) -> u64 {
        self.input.saturating_add(self.cached_input).saturating_add(self.cache_write)
    }

    /// All output tokens, reasoning included.
    pub fn total_output(&self) -> u64 {
        self.output.saturating_add(self.reasoning)
    }

    /// All tokens. Every sum here saturates at `u64::MAX` instead of wrapping, so an absurd
    /// report stays absurd (see [`crate::reservation::judge`]) rather than becoming small.
    pub fn total(&self) -> u64 {
        self.total_input().saturating_add(self.total_output())
    }

    pub fn is_empty(&self) -> bool {
        self.total() == 0
    }

    /// Builds the buckets from OpenAI's overlapping counts. Inconsistent reports (more cached
    /// than prompt tokens) are clamped rather than underflowing.
    pub fn from_openai(prompt: u64, cached: u64, completion: u64, reasoning: u64) -> Self {
        let cached = cached.min(prompt);
        let reasoning = reasoning.min(completion);
        Usage {
            input: prompt - cached,
            cached_input: cached,
            cache_write: 0,
            output: completion - reasoning,
            reasoning,
        }
    }
}

/// Saturating, bucket by bucket.
impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, o: Usage) -> Usage {
        Usage {
            input: self.input.saturating_add(o.input),
            cached_input: self.cached_input.saturating_add(o.cached_input),
            cache_write: self.cache_write.saturating_add(o.cache_write),
            output: self.output.saturating_add(o.output),
            reasoning: self.reasoning.saturating_add(o.reasoning),
        }
    }
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, o: Usage) {
        *self = *self + o;
    }
}

/// Where a request's usage numbers came from (read by name, see [`crate::record`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// The provider reported usage in the response.
    Reported,
    /// The provider never reported usage (client gone, upstream reset, non-LLM body); the
    /// numbers are an estimate from the bytes seen.
    #[default]
    Estimated,
    /// Nothing to meter in tokens (a tool call priced per call or per byte).
    None,
    /// The provider reported more than the request could have used (more input than the
    /// request carried, more output than the model or the request allows, more than the
    /// context window, or a count that is not a number): the report is not trusted and the
    /// request is billed at its reservation, the worst case (see [`crate::reservation`]).
    Implausible,
}

impl UsageSource {
    pub const ALL: [UsageSource; 4] = [
        UsageSource::Reported,
        UsageSource::Estimated,
        UsageSource::None,
        UsageSource::Implausible,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Reported => "reported",
            UsageSource::Estimated => "estimated",
            UsageSource::None => "none",
            UsageSource::Implausible => "implausible",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_counts_become_disjoint_buckets() {
        let u = Usage::from_openai(1000, 400, 300, 120);
        assert_eq!(
            u,
            Usage { input: 600, cached_input: 400, cache_write: 0, output: 180, reasoning: 120 }
        );
        assert_eq!(u.total_input(), 1000);
        assert_eq!(u.total_output(), 300);
    }

    #[test]
    fn sums_saturate_instead_of_wrapping() {
        let max = Usage { input: u64::MAX, output: u64::MAX, ..Usage::default() };
        assert_eq!(max.total(), u64::MAX);
        let one = Usage { input: 1, cached_input: 1, cache_write: 1, output: 1, reasoning: 1 };
        let sum = max + one;
        assert_eq!((sum.input, sum.cached_input, sum.output), (u64::MAX, 1, u64::MAX));
        let mut acc = Usage::default();
        acc += max;
        acc += max;
        assert_eq!(acc.total_input(), u64::MAX);
    }

    #[test]
    fn inconsistent_openai_counts_clamp() {
        let u = Usage::from_openai(10, 50, 5, 9);
        assert_eq!(u.total_input(), 10);
        assert_eq!(u.total_output(), 5);
    }
}
