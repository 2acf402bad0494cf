//! The rate card config format (YAML or JSON) and the embedded default card.
//!
//! ```yaml
//! version: 1
//! unknown_model: deny            # or: {fallback: {input: "10.00", output: "30.00"}}
//! models:
//!   gpt-4o: {provider: openai, input: "2.50", cached_input: "1.25", output: "10.00"}
//!   claude-sonnet-4-5: {provider: anthropic, input: "3.00", cached_input: "0.30",
//!                       cache_write: "3.75", output: "15.00"}
//! tools:
//!   web_search: {per_call: "0.01"}
//!   blob_fetch: {per_gb: "0.12", per_call: "0.0001"}
//! ```
//!
//! Model prices are USD per million tokens. `input` and `output` are required (write `"0"` for
//! a free bucket, such as an embedding model's output); `cached_input` and `cache_write`
//! default to `input`, `reasoning` to `output`, `per_call` to zero. A tool needs `per_call`,
//! `per_gb` (USD per 10⁹ bytes) or both. This module only decodes; it reads no files.

use crate::doc::{self, Cx, DocErrors, Field, Obj};
use crate::money::Money;

use super::{ModelLimits, Rate, RateCard, Rates, ToolRates, UnknownModelPolicy};

/// The default card shipped with Tollgate: list prices of current OpenAI and Anthropic models.
pub const BUILTIN: &str = include_str!("defaults.yaml");

const CARD_FIELDS: &[&str] = &["version", "unknown_model", "models", "tools"];
const MODEL_FIELDS: &[&str] = &[
    "provider",
    "input",
    "cached_input",
    "cache_write",
    "output",
    "reasoning",
    "per_call",
    "max_output_tokens",
    "context_window",
];
const RATE_FIELDS: &[&str] =
    &["input", "cached_input", "cache_write", "output", "reasoning", "per_call"];
const TOOL_FIELDS: &[&str] = &["per_call", "per_gb"];

impl RateCard {
    /// Parses a rate card document; `version: 1` is required. Reports every error at once.
    pub fn from_config(text: &str) -> Result<RateCard, DocErrors> {
        let doc = doc::parse(text)?;
        let mut cx = Cx::new();
        let card = decode(&mut cx, &Field::root(&doc), true);
        cx.finish(card)
    }

    /// Decodes a rate card embedded in a larger document (e.g. a policy's `pricing:` section),
    /// where `version` is optional. Errors are recorded in `cx` with their full paths.
    pub fn decode(cx: &mut Cx, field: &Field<'_>) -> RateCard {
        decode(cx, field, false)
    }

    /// The embedded default card ([`BUILTIN`]). It is parsed by a test, so this only fails if
    /// the binary was built from a broken tree.
    pub fn builtin() -> Result<RateCard, DocErrors> {
        RateCard::from_config(BUILTIN)
    }
}

fn decode(cx: &mut Cx, field: &Field<'_>, version_required: bool) -> RateCard {
    let mut card = RateCard::default();
    let Some(mut obj) = cx.object(field) else {
        return card;
    };
    let version = if version_required { obj.require(cx, "version") } else { obj.get("version") };
    if let Some(v) = version {
        match v.u64(cx) {
            Some(1) | None => {}
            Some(n) => v.error(cx, format!("unsupported version {n}, expected 1")),
        }
    }
    if let Some(f) = obj.get("unknown_model") {
        if let Some(policy) = unknown_model(cx, &f) {
            card.unknown_model = policy;
        }
    }
    // A standalone card must list its models; a section merged over the built-in card may only
    // add tools or change the unknown-model outcome.
    let models = if version_required { obj.require(cx, "models") } else { obj.get("models") };
    if let Some(models) = models {
        // Opened as an object first to report duplicate model names.
        if cx.object(&models).is_some() {
            for (name, f) in models.entries(cx) {
                if name.is_empty() {
                    f.error(cx, "model name must not be empty");
                }
                let Some(mut m) = cx.object(&f) else { continue };
                let provider = m.get("provider").and_then(|p| p.non_empty_str(cx));
                let rates = rates(cx, &mut m);
                let limits = ModelLimits {
                    max_output_tokens: m.get("max_output_tokens").and_then(|f| f.u64(cx)),
                    context_window: m.get("context_window").and_then(|f| f.u64(cx)),
                };
                m.finish(cx, MODEL_FIELDS);
                if let Some(rates) = rates {
                    card.insert_model_with_limits(name, provider, rates, limits);
                }
            }
        }
    }
    if let Some(tools) = obj.get("tools") {
        if cx.object(&tools).is_some() {
            for (name, f) in tools.entries(cx) {
                if let Some(rates) = tool(cx, &f) {
                    card.insert_tool(name, rates);
                }
            }
        }
    }
    obj.finish(cx, CARD_FIELDS);
    card
}

fn unknown_model(cx: &mut Cx, field: &Field<'_>) -> Option<UnknownModelPolicy> {
    const EXPECTED: &str = "expected `deny` or `{fallback: {input: \"10.00\", output: \"30.00\"}}`";
    if let Some(text) = field.node.scalar() {
        if text == "deny" {
            return Some(UnknownModelPolicy::Deny);
        }
        field.error(cx, format!("unknown value `{text}`, {EXPECTED}"));
        return None;
    }
    if !matches!(field.node.value, doc::Value::Map(_)) {
        field.error(cx, EXPECTED);
        return None;
    }
    let mut obj = cx.object(field)?;
    let policy = obj.require(cx, "fallback").and_then(|f| {
        let mut rates_obj = cx.object(&f)?;
        let rates = rates(cx, &mut rates_obj);
        rates_obj.finish(cx, RATE_FIELDS);
        rates
    });
    obj.finish(cx, &["fallback"]);
    policy.map(UnknownModelPolicy::Fallback)
}

/// The price fields of a model or of the fallback; `None` if any is missing or invalid.
fn rates(cx: &mut Cx, obj: &mut Obj<'_>) -> Option<Rates> {
    let input = obj.require(cx, "input").and_then(|f| rate(cx, &f));
    let output = obj.require(cx, "output").and_then(|f| rate(cx, &f));
    let mut ok = true;
    let mut optional = |cx: &mut Cx, obj: &mut Obj<'_>, key: &str| match obj.get(key) {
        Some(f) => {
            let r = rate(cx, &f);
            ok &= r.is_some();
            r
        }
        None => None,
    };
    let cached_input = optional(cx, obj, "cached_input");
    let cache_write = optional(cx, obj, "cache_write");
    let reasoning = optional(cx, obj, "reasoning");
    let per_call = match obj.get("per_call") {
        Some(f) => f.money(cx),
        None => Some(Money::ZERO),
    };
    let (input, output, per_call) = (input?, output?, per_call?);
    if !ok {
        return None;
    }
    let mut rates = Rates::new(input, output);
    rates.cached_input = cached_input.unwrap_or(input);
    rates.cache_write = cache_write.unwrap_or(input);
    rates.reasoning = reasoning.unwrap_or(output);
    rates.per_call = per_call;
    Some(rates)
}

/// A USD-per-million-tokens price, quoted or not.
fn rate(cx: &mut Cx, field: &Field<'_>) -> Option<Rate> {
    let Some(text) = field.node.scalar() else {
        field.error(cx, "expected a price in USD per million tokens, such as \"2.50\"");
        return None;
    };
    match Rate::per_million(text) {
        Ok(rate) => Some(rate),
        Err(e) => {
            field.error(cx, e.to_string());
            None
        }
    }
}

fn tool(cx: &mut Cx, field: &Field<'_>) -> Option<ToolRates> {
    let mut obj = cx.object(field)?;
    let per_call = obj.get("per_call").map(|f| f.money(cx));
    let per_gb = obj.get("per_gb").map(|f| f.money(cx));
    obj.finish(cx, TOOL_FIELDS);
    if per_call.is_none() && per_gb.is_none() {
        field.error(cx, "a tool needs `per_call`, `per_gb` or both");
        return None;
    }
    Some(ToolRates {
        per_call: per_call.unwrap_or(Some(Money::ZERO))?,
        per_gb: per_gb.unwrap_or(Some(Money::ZERO))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::DocError;

    fn errors(text: &str) -> Vec<(String, u32, String)> {
        let errors = RateCard::from_config(text).expect_err("config should be rejected").0;
        errors
            .into_iter()
            .map(|DocError { path, line, message, .. }| (path, line, message))
            .collect()
    }

    #[test]
    fn builtin_card_loads_with_deny_for_unknown_models() {
        let card = RateCard::builtin().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(card.unknown_model(), UnknownModelPolicy::Deny);
        assert!(card.models().len() >= 26, "{}", card.models().len());
        assert!(card.models().iter().all(|m| m.provider.is_some()), "every entry names a provider");
    }

    #[test]
    fn example_config_loads() {
        let text = r#"
version: 1
unknown_model: {fallback: {input: "10.00", output: "30.00"}}
models:
  gpt-4o: {provider: openai, input: "2.50", cached_input: "1.25", output: "10.00"}
  claude-sonnet-4-5: {provider: anthropic, input: "3.00", cached_input: "0.30", cache_write: "3.75", output: "15.00"}
  priced-per-call: {input: 1, output: 2, reasoning: "2.5", per_call: "0.002"}
tools:
  web_search: {per_call: "0.01"}
  blob_fetch: {per_gb: "0.12", per_call: "0.0001"}
"#;
        let card = RateCard::from_config(text).unwrap_or_else(|e| panic!("{e}"));
        let r = |s: &str| Rate::per_million(s).unwrap();
        let fallback = Rates::new(r("10"), r("30"));
        assert_eq!(card.unknown_model(), UnknownModelPolicy::Fallback(fallback));
        let m = &card.models()[0];
        assert_eq!((m.name.as_str(), m.provider.as_deref()), ("gpt-4o", Some("openai")));
        assert_eq!(
            m.rates,
            Rates {
                input: r("2.5"),
                cached_input: r("1.25"),
                cache_write: r("2.5"),
                output: r("10"),
                reasoning: r("10"),
                per_call: Money::ZERO,
            }
        );
        let m = &card.models()[2];
        assert_eq!(m.provider, None);
        assert_eq!(m.rates.reasoning, r("2.5"));
        assert_eq!(m.rates.per_call, Money::parse("0.002").unwrap());
        assert_eq!(
            card.tool("blob_fetch"),
            Some(&ToolRates {
                per_call: Money::parse("0.0001").unwrap(),
                per_gb: Money::parse("0.12").unwrap()
            })
        );
        assert_eq!(card.tool("web_search").map(|t| t.per_gb), Some(Money::ZERO));
    }

    #[test]
    fn json_config_loads_with_the_same_decoder() {
        let text = r#"{"version": 1, "models": {"m": {"input": "0.025", "output": "0.0375"}}}"#;
        let card = RateCard::from_config(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(card.models()[0].rates.input.nanos_per_million(), 25_000_000);
        assert_eq!(card.models()[0].rates.output.nanos_per_million(), 37_500_000);
        assert_eq!(card.unknown_model(), UnknownModelPolicy::Deny);
    }

    #[test]
    fn every_bad_field_is_reported_with_path_and_line() {
        let text = "\
version: 2
unknown_model: allow
models:
  gpt-4o: {input: abc, output: \"10.00\"}
  no-output: {input: \"1.00\"}
  typo: {input: 1, output: 2, cahced_input: 1}
  negative: {input: \"-1\", output: 2}
  precise: {input: \"0.0000000001\", output: 2}
  listy: {input: [1], output: 2, per_call: x}
  no-output: {input: 1, output: 1}
tools:
  web_search: {}
  blob: {per_gb: cheap}
extra: true
";
        let got = errors(text);
        let paths: Vec<(&str, u32)> = got.iter().map(|(p, l, _)| (p.as_str(), *l)).collect();
        assert_eq!(
            paths,
            vec![
                ("version", 1),
                ("unknown_model", 2),
                ("models.gpt-4o.input", 4),
                ("models.no-output", 5),
                ("models.typo.cahced_input", 6),
                ("models.negative.input", 7),
                ("models.precise.input", 8),
                ("models.listy.input", 9),
                ("models.listy.per_call", 9),
                ("models", 10),
                ("tools.web_search", 12),
                ("tools.blob.per_gb", 13),
                ("extra", 14),
            ],
            "{got:#?}"
        );
        let message = |path: &str| {
            got.iter().find(|(p, _, _)| p == path).map(|(_, _, m)| m.as_str()).unwrap_or("")
        };
        assert!(message("version").contains("unsupported version 2"));
        assert!(message("unknown_model").contains("`allow`"));
        assert!(message("models.no-output").contains("missing required field `output`"));
        assert!(message("models.typo.cahced_input").contains("unknown field `cahced_input`"));
        assert!(message("models.negative.input").contains("negative"));
        assert!(message("models.precise.input").contains("9 decimal places"));
        assert!(message("models").contains("duplicate key `no-output`"));
        assert!(message("tools.web_search").contains("`per_call`, `per_gb`"));
    }

    #[test]
    fn version_and_models_are_required_at_top_level() {
        let got = errors("unknown_model: deny\n");
        let messages: Vec<&str> = got.iter().map(|(_, _, m)| m.as_str()).collect();
        assert_eq!(
            messages,
            vec!["missing required field `version`", "missing required field `models`"]
        );
    }

    #[test]
    fn fallback_needs_its_prices() {
        let got = errors("version: 1\nunknown_model:\n  fallback: {input: \"1\"}\nmodels: {}\n");
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].0.as_str(), got[0].1), ("unknown_model.fallback", 3));
        assert!(got[0].2.contains("`output`"));
        let got = errors("version: 1\nunknown_model: [deny]\nmodels: {}\n");
        assert_eq!((got[0].0.as_str(), got[0].1), ("unknown_model", 2));
    }

    #[test]
    fn embedded_section_decodes_without_version() {
        let text = "pricing:\n  models:\n    m: {input: 1, output: oops}\n";
        let doc = doc::parse(text).unwrap();
        let mut cx = Cx::new();
        let root = Field::root(&doc);
        let mut obj = cx.object(&root).unwrap();
        let section = obj.require(&mut cx, "pricing").unwrap();
        let _ = RateCard::decode(&mut cx, &section);
        obj.finish(&mut cx, &["pricing"]);
        let errors = cx.finish(()).unwrap_err().0;
        assert_eq!(errors.len(), 1);
        assert_eq!((errors[0].path.as_str(), errors[0].line), ("pricing.models.m.output", 3));
    }
}
