//! Pricing: what a request or a tool call costs, according to a rate card.
//!
//! A [`RateCard`] holds, per model, prices per million tokens for each [`Usage`] bucket plus an
//! optional per-call price, and per-call / per-GB prices for tools. It decides the cost of a
//! metered request ([`RateCard::price`]), the amount to reserve before sending one
//! ([`RateCard::worst_case`]) and the cost of a tool call ([`RateCard::price_tool`]). It never
//! decides whether a request may proceed (budgets and policy do that) and it never guesses: an
//! unknown model or tool is an error value for the caller, or, when the card says so, a cost at
//! an explicit fallback rate marked [`RateSource::Fallback`]. Never a silent $0.
//!
//! Rates are integers: nano-USD per million tokens, which is USD per token × 10¹⁵, so that
//! `$0.0375/M` and LiteLLM's `7.5e-11` per token are both exact. Each bucket is rounded up to the
//! next nano-USD on its own ("never undercharge") and the total is the sum of the buckets, so
//! invoice line items by token kind always add up to the total.
//!
//! Cards come from YAML/JSON config ([`RateCard::from_config`]), from LiteLLM's
//! `model_prices_and_context_window.json` ([`RateCard::from_litellm`]) or the embedded default
//! card ([`RateCard::builtin`]), and are layered with [`RateCard::merged_over`]; a config's
//! `pricing:` section layers its own models over the LiteLLM file its `litellm_file` names over
//! the built-in card ([`RateCard::decode_section`]; the adapter reads the file). A card is written
//! back as YAML with [`RateCard::to_config`]. Everything is indexed at load time; pricing a
//! request does not allocate.

mod config;
mod litellm;
mod lookup;
mod response;
#[cfg(test)]
mod tests;

use std::fmt;
use std::ops::{Add, AddAssign};

use serde::Serialize;

use crate::money::{parse_scaled, Money, MoneyError};
use crate::usage::Usage;

pub use config::{ReadFile, BUILTIN};
pub use litellm::{LiteLlmImport, Skipped};
pub use response::{PriceSource, ResponsePrice};

const TOKENS_PER_MILLION: u64 = 1_000_000;
/// Bytes per GB for per-GB tool prices (decimal gigabytes, as cloud providers bill).
pub const BYTES_PER_GB: u64 = 1_000_000_000;

/// A price per million tokens, stored as nano-USD per million tokens (= USD per token × 10¹⁵).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(u64);

/// Why a price text is not a valid rate.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("`{0}` is not a decimal number (expected e.g. \"2.50\")")]
    NotDecimal(String),
    #[error("`{text}` is more precise than {places} decimal places")]
    TooPrecise { text: String, places: u32 },
    #[error("`{0}` is too large")]
    TooLarge(String),
    #[error("price must not be negative, found `{0}`")]
    Negative(String),
}

impl Rate {
    /// Free.
    pub const ZERO: Rate = Rate(0);

    /// A rate from nano-USD per million tokens (= USD per token × 10¹⁵).
    pub const fn from_nanos_per_million(nanos: u64) -> Self {
        Rate(nanos)
    }

    /// The rate in nano-USD per million tokens.
    pub const fn nanos_per_million(self) -> u64 {
        self.0
    }

    /// Parses USD per million tokens: `"2.50"`, `"0.0375"` (at most 9 decimals).
    pub fn per_million(text: &str) -> Result<Rate, RateError> {
        Rate::parse(text, 9)
    }

    /// Parses USD per token as LiteLLM writes it: `"2.5e-06"`, `"7.5e-11"` (exact, never via
    /// `f64`; at most 15 decimals).
    pub fn per_token(text: &str) -> Result<Rate, RateError> {
        Rate::parse(text, 15)
    }

    fn parse(text: &str, places: u32) -> Result<Rate, RateError> {
        match parse_scaled(text, places) {
            Ok(n) if n < 0 => Err(RateError::Negative(text.to_string())),
            Ok(n) => Ok(Rate(n.unsigned_abs())),
            Err(MoneyError::TooPrecise(_)) => {
                Err(RateError::TooPrecise { text: text.to_string(), places })
            }
            Err(MoneyError::TooLarge(_)) => Err(RateError::TooLarge(text.to_string())),
            Err(MoneyError::Empty | MoneyError::NotDecimal(_)) => {
                Err(RateError::NotDecimal(text.to_string()))
            }
        }
    }

    /// The cost of `tokens` at this rate, rounded up to the next nano-USD.
    #[inline]
    pub fn cost(self, tokens: u64) -> Money {
        let nanos = match tokens.checked_mul(self.0) {
            Some(product) => u128::from(product.div_ceil(TOKENS_PER_MILLION)),
            None => (u128::from(tokens) * u128::from(self.0)).div_ceil(TOKENS_PER_MILLION.into()),
        };
        Money::from_nanos(i64::try_from(nanos).unwrap_or(i64::MAX))
    }
}

impl fmt::Display for Rate {
    /// USD per million tokens, as written in config: `2.50`, `0.0375`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Money::from_nanos(i64::try_from(self.0).unwrap_or(i64::MAX)).fmt(f)
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The prices of one model, one per [`Usage`] bucket, plus a flat price per request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Rates {
    pub input: Rate,
    /// Cache reads.
    pub cached_input: Rate,
    /// Cache creation (Anthropic).
    pub cache_write: Rate,
    pub output: Rate,
    pub reasoning: Rate,
    pub per_call: Money,
}

impl Rates {
    /// Rates given only input and output prices: cache reads and writes cost the full input
    /// rate and reasoning tokens the output rate, which is what a provider without those
    /// features charges, and never less than that.
    pub fn new(input: Rate, output: Rate) -> Self {
        Rates {
            input,
            cached_input: input,
            cache_write: input,
            output,
            reasoning: output,
            per_call: Money::ZERO,
        }
    }

    /// The cost of one request with this usage, bucket by bucket.
    #[inline]
    pub fn price(&self, usage: Usage) -> Cost {
        Cost::from_buckets(
            self.input.cost(usage.input),
            self.cached_input.cost(usage.cached_input),
            self.cache_write.cost(usage.cache_write),
            self.output.cost(usage.output),
            self.reasoning.cost(usage.reasoning),
            self.per_call,
        )
    }

    /// The most one request can cost, to reserve before sending it: every input token at the
    /// full input rate, or at the cache-write rate where that is dearer (Anthropic charges
    /// 1.25× input for cache writes, and the proxy cannot know beforehand which tokens the
    /// provider will cache), and every possible output token at the higher of the output and
    /// reasoning rates; reported in the `input` and `output` buckets. Because the actual cost
    /// rounds up up to five buckets and this two, the actual cost can exceed it by at most
    /// 3 nano-USD.
    #[inline]
    pub fn worst_case(&self, input_tokens: u64, max_output_tokens: u64) -> Cost {
        let input_rate = self.input.max(self.cached_input).max(self.cache_write);
        let output_rate = self.output.max(self.reasoning);
        Cost::from_buckets(
            input_rate.cost(input_tokens),
            Money::ZERO,
            Money::ZERO,
            output_rate.cost(max_output_tokens),
            Money::ZERO,
            self.per_call,
        )
    }
}

/// The cost of one request by token kind; `total` is exactly the sum of the other fields.
/// Read back, a missing bucket is zero; `total` is required.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
pub struct Cost {
    #[serde(default)]
    pub input: Money,
    #[serde(default)]
    pub cached_input: Money,
    #[serde(default)]
    pub cache_write: Money,
    #[serde(default)]
    pub output: Money,
    #[serde(default)]
    pub reasoning: Money,
    #[serde(default)]
    pub per_call: Money,
    pub total: Money,
}

impl Cost {
    /// Nothing in any bucket.
    pub const ZERO: Cost = Cost {
        input: Money::ZERO,
        cached_input: Money::ZERO,
        cache_write: Money::ZERO,
        output: Money::ZERO,
        reasoning: Money::ZERO,
        per_call: Money::ZERO,
        total: Money::ZERO,
    };

    /// A cost from its line items; the total is their sum.
    pub fn from_buckets(
        input: Money,
        cached_input: Money,
        cache_write: Money,
        output: Money,
        reasoning: Money,
        per_call: Money,
    ) -> Self {
        let total = input + cached_input + cache_write + output + reasoning + per_call;
        Cost { input, cached_input, cache_write, output, reasoning, per_call, total }
    }
}

impl Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost::from_buckets(
            self.input + o.input,
            self.cached_input + o.cached_input,
            self.cache_write + o.cache_write,
            self.output + o.output,
            self.reasoning + o.reasoning,
            self.per_call + o.per_call,
        )
    }
}

impl AddAssign for Cost {
    fn add_assign(&mut self, o: Cost) {
        *self = *self + o;
    }
}

/// A model's position in its [`RateCard`]; valid only for the card that returned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ModelId(u32);

/// A priced model as listed in a card.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Model {
    pub name: String,
    /// `openai`, `anthropic`, ...: a `provider/` prefix on a request's model name must match it.
    pub provider: Option<String>,
    pub rates: Rates,
    pub limits: ModelLimits,
}

/// What one request to a model can use at most, as the provider documents it. Unknown limits are
/// `None`; they bound reservations and tell plausible usage reports from absurd ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ModelLimits {
    /// The most output tokens (reasoning included) one response can have.
    pub max_output_tokens: Option<u64>,
    /// The most tokens, input and output together, one request can span.
    pub context_window: Option<u64>,
}

/// Which rates a cost was computed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RateSource {
    /// The rates listed for this model (matched exactly, by provider prefix or by snapshot).
    Listed(ModelId),
    /// The card's fallback rates for models it does not list.
    Fallback,
}

/// A cost and the rates it was computed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Priced {
    pub cost: Cost,
    pub source: RateSource,
}

/// The card neither lists the model nor has a fallback for it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no price for model `{model}` in the rate card")]
pub struct UnknownModel {
    pub model: String,
}

/// The card has no price for the tool.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no price for tool `{tool}` in the rate card")]
pub struct UnknownTool {
    pub tool: String,
}

/// What pricing a model the card does not list results in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownModelPolicy {
    /// [`UnknownModel`]; the caller decides (typically: deny the request).
    #[default]
    Deny,
    /// Price at these rates, marked [`RateSource::Fallback`].
    Fallback(Rates),
}

/// Prices of a tool (or tool action) call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ToolRates {
    pub per_call: Money,
    /// Per 10⁹ bytes transferred.
    pub per_gb: Money,
}

impl ToolRates {
    /// The cost of `calls` calls moving `bytes` bytes, the transfer rounded up to the nano-USD.
    pub fn price(&self, calls: u64, bytes: u64) -> ToolCost {
        let calls = self.per_call.saturating_mul(calls);
        let per_gb = u128::from(self.per_gb.nanos().unsigned_abs());
        let transfer = Money::from_scaled_ceil(u128::from(bytes) * per_gb, BYTES_PER_GB.into());
        ToolCost { calls, transfer, total: calls + transfer }
    }
}

/// The cost of tool calls: `total = calls + transfer`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ToolCost {
    pub calls: Money,
    pub transfer: Money,
    pub total: Money,
}

/// Prices for models and tools, indexed for allocation-free lookup.
#[derive(Clone, Debug, Default)]
pub struct RateCard {
    models: Vec<Model>,
    model_index: lookup::Index,
    tools: Vec<(String, ToolRates)>,
    tool_index: lookup::Index,
    unknown_model: UnknownModelPolicy,
}

impl RateCard {
    /// An empty card.
    pub fn new(unknown_model: UnknownModelPolicy) -> Self {
        RateCard { unknown_model, ..RateCard::default() }
    }

    /// Adds a model, replacing one of the same name.
    pub fn insert_model(&mut self, name: &str, provider: Option<&str>, rates: Rates) {
        self.insert_model_with_limits(name, provider, rates, ModelLimits::default());
    }

    /// Adds a model with its documented limits, replacing one of the same name.
    pub fn insert_model_with_limits(
        &mut self,
        name: &str,
        provider: Option<&str>,
        rates: Rates,
        limits: ModelLimits,
    ) {
        let model =
            Model { name: name.to_string(), provider: provider.map(str::to_string), rates, limits };
        match self.model_index.get(name) {
            Some(&i) => self.models[i as usize] = model,
            None => {
                let i = lookup::next_id(self.models.len());
                self.model_index.insert(name.into(), i);
                self.models.push(model);
            }
        }
    }

    /// Adds a tool, replacing one of the same name.
    pub fn insert_tool(&mut self, name: &str, rates: ToolRates) {
        match self.tool_index.get(name) {
            Some(&i) => self.tools[i as usize].1 = rates,
            None => {
                let i = lookup::next_id(self.tools.len());
                self.tool_index.insert(name.into(), i);
                self.tools.push((name.to_string(), rates));
            }
        }
    }

    /// Sets what pricing an unlisted model results in.
    pub fn set_unknown_model(&mut self, policy: UnknownModelPolicy) {
        self.unknown_model = policy;
    }

    /// What pricing an unlisted model results in.
    pub fn unknown_model(&self) -> UnknownModelPolicy {
        self.unknown_model
    }

    /// This card layered over `base`: every model and tool of `base`, replaced by this card's
    /// entry of the same name where there is one; the unknown-model policy is this card's.
    pub fn merged_over(&self, base: &RateCard) -> RateCard {
        let mut merged = base.clone();
        for m in &self.models {
            merged.insert_model_with_limits(&m.name, m.provider.as_deref(), m.rates, m.limits);
        }
        for (name, rates) in &self.tools {
            merged.insert_tool(name, *rates);
        }
        merged.unknown_model = self.unknown_model;
        merged
    }

    /// The models in the order they were added.
    pub fn models(&self) -> &[Model] {
        &self.models
    }

    /// The model `id` refers to ([`RateCard::resolve`] gives ids).
    pub fn model(&self, id: ModelId) -> Option<&Model> {
        self.models.get(id.0 as usize)
    }

    /// The tools and their prices, in the order they were added.
    pub fn tools(&self) -> impl Iterator<Item = (&str, &ToolRates)> {
        self.tools.iter().map(|(name, rates)| (name.as_str(), rates))
    }

    /// The rates to price `model` with: its listed rates or the fallback.
    pub fn rates(&self, model: &str) -> Result<(&Rates, RateSource), UnknownModel> {
        if let Some(id) = self.resolve(model) {
            if let Some(m) = self.models.get(id.0 as usize) {
                return Ok((&m.rates, RateSource::Listed(id)));
            }
        }
        match &self.unknown_model {
            UnknownModelPolicy::Fallback(rates) => Ok((rates, RateSource::Fallback)),
            UnknownModelPolicy::Deny => Err(UnknownModel { model: model.to_string() }),
        }
    }

    /// The documented limits of `model` (resolved like [`RateCard::rates`]); all `None` for a
    /// model the card does not list.
    pub fn limits(&self, model: &str) -> ModelLimits {
        self.resolve(model)
            .and_then(|id| self.models.get(id.0 as usize))
            .map(|m| m.limits)
            .unwrap_or_default()
    }

    /// The cost of one request to `model` with `usage`.
    pub fn price(&self, model: &str, usage: Usage) -> Result<Priced, UnknownModel> {
        let (rates, source) = self.rates(model)?;
        Ok(Priced { cost: rates.price(usage), source })
    }

    /// The amount to reserve before a request: see [`Rates::worst_case`].
    pub fn worst_case(
        &self,
        model: &str,
        input_tokens_estimate: u64,
        max_output_tokens: u64,
    ) -> Result<Priced, UnknownModel> {
        let (rates, source) = self.rates(model)?;
        Ok(Priced { cost: rates.worst_case(input_tokens_estimate, max_output_tokens), source })
    }

    /// The prices of tool `name` (exact name).
    pub fn tool(&self, name: &str) -> Option<&ToolRates> {
        let &i = self.tool_index.get(name)?;
        self.tools.get(i as usize).map(|(_, rates)| rates)
    }

    /// The cost of `calls` calls to tool `name` transferring `bytes` bytes.
    pub fn price_tool(&self, name: &str, calls: u64, bytes: u64) -> Result<ToolCost, UnknownTool> {
        match self.tool(name) {
            Some(rates) => Ok(rates.price(calls, bytes)),
            None => Err(UnknownTool { tool: name.to_string() }),
        }
    }
}
