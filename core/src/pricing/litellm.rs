//! Loader for LiteLLM's `model_prices_and_context_window.json`.
//!
//! The file is one object of model name → entry, with per-token USD prices written as JSON
//! numbers, usually in e-notation (`"input_cost_per_token": 2.5e-06`). Prices are converted
//! from the number's source text exactly, never through `f64`: `2.5e-06` per token is exactly
//! `2.50` per million.
//!
//! Read: `input_cost_per_token`, `output_cost_per_token`, `cache_read_input_token_cost`,
//! `cache_creation_input_token_cost`, `output_cost_per_reasoning_token`, `litellm_provider`,
//! `mode`. Every other field is ignored because the format keeps growing; that includes tiered
//! prices (`*_above_200k_tokens`), 1-hour cache writes and per-image / per-second prices.
//! Skipped: the `sample_spec` documentation entry and entries that are not token-priced (no
//! `input_cost_per_token`, or no `output_cost_per_token` outside `mode: embedding`); those
//! models stay unknown to the card rather than being priced at $0. A malformed price is an
//! error with its path and line. Like Python's `json`, a repeated key keeps its last value.
//!
//! The real file holds float artifacts with more than 15 decimals (`1.0000000000000001e-07`,
//! `1.1428571428571428e-06`). Rejecting them would reject the whole file, so they are rounded
//! up to the next 10⁻¹⁵ USD per token: at most one nano-USD per million tokens more, never less.
//! The resulting card denies unknown models; layer it with [`RateCard::merged_over`].
//! [`RateCard::import_litellm`] also selects providers and names every skipped entry with its
//! reason, for `tollgate pricing import`.

use crate::doc::{self, Cx, DocErrors, Field, Node, Value};

use super::{ModelLimits, Rate, RateCard, RateError, Rates, UnknownModelPolicy};

/// An entry of a LiteLLM price file that was not loaded, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The entry's name (the model).
    pub name: String,
    /// Its line in the file.
    pub line: u32,
    pub reason: &'static str,
}

/// What [`RateCard::import_litellm`] read from a LiteLLM price file.
#[derive(Clone, Debug)]
pub struct LiteLlmImport {
    /// The token-priced entries of the selected providers; unknown models are denied.
    pub card: RateCard,
    /// Entries of the selected providers that are not priced per token, in file order.
    pub skipped: Vec<Skipped>,
    /// How many entries belong to other providers (left out by the filter, not checked).
    pub other_providers: usize,
}

const NOT_PER_TOKEN: &str =
    "no `input_cost_per_token`: not priced per token (per image, second, character or query)";
const NO_OUTPUT_PRICE: &str = "no `output_cost_per_token`, and `mode` is not `embedding`";

impl RateCard {
    /// Loads a card from LiteLLM's price file format (see the module docs).
    pub fn from_litellm(text: &str) -> Result<RateCard, DocErrors> {
        RateCard::import_litellm(text, None).map(|import| import.card)
    }

    /// Loads the entries of a LiteLLM price file whose `litellm_provider` is one of `providers`
    /// (every entry when `None`), and tells which of them were skipped and why. A malformed
    /// price of a selected entry is an error with its path and line.
    pub fn import_litellm(
        text: &str,
        providers: Option<&[&str]>,
    ) -> Result<LiteLlmImport, DocErrors> {
        let doc = doc::parse(text)?;
        let mut cx = Cx::new();
        let mut card = RateCard::new(UnknownModelPolicy::Deny);
        let mut skipped = Vec::new();
        let mut other_providers = 0;
        for (name, entry) in Field::root(&doc).entries(&mut cx) {
            if name == "sample_spec" {
                continue;
            }
            if !matches!(entry.node.value, Value::Map(_)) {
                entry.error(&mut cx, "expected an object of model prices");
                continue;
            }
            let provider = get(&entry, "litellm_provider").and_then(|f| f.node.scalar());
            let provider = provider.filter(|p| !p.is_empty());
            if providers.is_some_and(|list| !provider.is_some_and(|p| list.contains(&p))) {
                other_providers += 1;
                continue;
            }
            let price = |cx: &mut Cx, key: &str| get(&entry, key).and_then(|f| rate(cx, &f));
            let input = price(&mut cx, "input_cost_per_token");
            let output = price(&mut cx, "output_cost_per_token");
            let cache_read = price(&mut cx, "cache_read_input_token_cost");
            let cache_write = price(&mut cx, "cache_creation_input_token_cost");
            let reasoning = price(&mut cx, "output_cost_per_reasoning_token");
            let mode = get(&entry, "mode").and_then(|f| f.node.scalar());
            let skip = |reason| Skipped { name: name.to_string(), line: entry.node.line, reason };
            let has = |key| get(&entry, key).is_some();
            let Some(input) = input else {
                if !has("input_cost_per_token") {
                    skipped.push(skip(NOT_PER_TOKEN));
                }
                continue;
            };
            let output = match (output, mode) {
                (Some(output), _) => output,
                (None, _) if has("output_cost_per_token") => continue,
                (None, Some("embedding")) => Rate::ZERO,
                (None, _) => {
                    skipped.push(skip(NO_OUTPUT_PRICE));
                    continue;
                }
            };
            let mut rates = Rates::new(input, output);
            rates.cached_input = cache_read.unwrap_or(input);
            rates.cache_write = cache_write.unwrap_or(input);
            rates.reasoning = reasoning.unwrap_or(output);
            // Limits are informative there (not every entry has them, some are floats): a value
            // that is not a whole number is left unknown rather than failing the card.
            // `max_tokens` is LiteLLM's legacy field (sometimes the input limit): not read.
            let limit = |key: &str| {
                get(&entry, key).and_then(|f| f.node.scalar()).and_then(|s| s.parse::<u64>().ok())
            };
            let limits = ModelLimits {
                max_output_tokens: limit("max_output_tokens"),
                context_window: limit("max_input_tokens"),
            };
            card.insert_model_with_limits(name, provider, rates, limits);
        }
        cx.finish(LiteLlmImport { card, skipped, other_providers })
    }
}

/// The last non-null value of `key` in the entry.
fn get<'a>(entry: &Field<'a>, key: &str) -> Option<Field<'a>> {
    let Value::Map(entries) = &entry.node.value else { return None };
    let (_, node): &(Node, Node) = entries.iter().rev().find(|(k, _)| k.scalar() == Some(key))?;
    if matches!(node.value, Value::Null) {
        return None;
    }
    Some(Field { node, path: format!("{}.{key}", entry.path) })
}

/// A per-token price: a JSON number (or a numeric string), converted exactly.
fn rate(cx: &mut Cx, field: &Field<'_>) -> Option<Rate> {
    let Some(text) = field.node.scalar() else {
        field.error(cx, "expected a price in USD per token, such as 2.5e-06");
        return None;
    };
    match per_token_rounded_up(text) {
        Ok(rate) => Some(rate),
        Err(e) => {
            field.error(cx, e.to_string());
            None
        }
    }
}

/// [`Rate::per_token`], but digits beyond 15 decimals round the rate up instead of failing.
fn per_token_rounded_up(text: &str) -> Result<Rate, RateError> {
    match Rate::per_token(text) {
        Err(RateError::TooPrecise { .. }) => {}
        other => return other,
    }
    // `per_token` validated the syntax before it checked precision, so this is a well-formed
    // decimal; only the sign is left to check.
    let t = text.trim().trim_start_matches('+');
    if t.starts_with('-') {
        return Err(RateError::Negative(text.to_string()));
    }
    let (mantissa, exponent) = match t.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().map_err(|_| RateError::NotDecimal(text.into()))?),
        None => (t, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int_part}{frac_part}");
    // Digits past the 15th decimal place: how many to drop from the right.
    let drop = frac_part.len() as i64 - exponent - 15;
    let keep = usize::try_from(digits.len() as i64 - drop).unwrap_or(0).min(digits.len());
    let (kept, dropped) = digits.split_at(keep);
    let mut value: u128 = if kept.is_empty() {
        0
    } else {
        kept.parse().map_err(|_| RateError::TooLarge(text.to_string()))?
    };
    if dropped.bytes().any(|b| b != b'0') {
        value += 1;
    }
    u64::try_from(value)
        .ok()
        .filter(|&v| i64::try_from(v).is_ok())
        .map(Rate::from_nanos_per_million)
        .ok_or_else(|| RateError::TooLarge(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Money;
    use crate::usage::Usage;

    const FIXTURE: &str =
        include_str!("../../fixtures/pricing/model_prices_and_context_window.json");

    fn fixture() -> RateCard {
        RateCard::from_litellm(FIXTURE).unwrap_or_else(|e| panic!("{e}"))
    }

    fn per_million(text: &str) -> Rate {
        Rate::per_million(text).unwrap()
    }

    #[test]
    fn fixture_loads_token_priced_entries_only() {
        let card = fixture();
        let names: Vec<&str> = card.models().iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "gpt-4o",
                "gpt-4o-mini",
                "gpt-5-nano",
                "gpt-4.1-nano",
                "o3",
                "o4-mini",
                "azure/gpt-4o",
                "text-embedding-3-small",
                "claude-sonnet-4-5-20250929",
                "claude-3-5-haiku-20241022",
                "gemini/gemini-2.5-flash-preview-04-17",
            ]
        );
        assert_eq!(card.unknown_model(), UnknownModelPolicy::Deny);
        for skipped in ["sample_spec", "standard/1024-x-1024/dall-e-3", "whisper-1"] {
            assert_eq!(card.resolve(skipped), None, "{skipped}");
        }
    }

    #[test]
    fn per_token_prices_convert_exactly_to_per_million() {
        let card = fixture();
        let rates = |name: &str| card.rates(name).map(|(r, _)| *r).unwrap();
        let cases = [
            // (model, input, cached, cache write, output, reasoning)
            ("gpt-4o", "2.50", "1.25", "2.50", "10.00", "10.00"),
            ("gpt-4o-mini", "0.15", "0.075", "0.15", "0.60", "0.60"),
            ("gpt-5-nano", "0.05", "0.005", "0.05", "0.40", "0.40"),
            ("gpt-4.1-nano", "0.10", "0.025", "0.10", "0.40", "0.40"),
            ("o4-mini", "1.10", "0.275", "1.10", "4.40", "4.40"),
            ("text-embedding-3-small", "0.02", "0.02", "0.02", "0", "0"),
            ("claude-sonnet-4-5-20250929", "3.00", "0.30", "3.75", "15.00", "15.00"),
            ("claude-3-5-haiku-20241022", "0.80", "0.08", "1.00", "4.00", "4.00"),
            ("o3", "2.00", "0.50", "2.00", "8.00", "8.00"),
            ("gemini/gemini-2.5-flash-preview-04-17", "0.15", "0.0375", "0.15", "0.60", "3.50"),
        ];
        for (name, input, cached, write, output, reasoning) in cases {
            let got = rates(name);
            assert_eq!(got.input, per_million(input), "{name} input");
            assert_eq!(got.cached_input, per_million(cached), "{name} cached");
            assert_eq!(got.cache_write, per_million(write), "{name} cache write");
            assert_eq!(got.output, per_million(output), "{name} output");
            assert_eq!(got.reasoning, per_million(reasoning), "{name} reasoning");
            assert_eq!(got.per_call, Money::ZERO);
        }
        assert_eq!(card.models()[6].provider.as_deref(), Some("azure"));
    }

    #[test]
    fn litellm_card_prices_like_a_yaml_card() {
        let card = fixture();
        let usage = Usage { input: 1000, cached_input: 500, output: 200, ..Usage::default() };
        let priced = card.price("gpt-4o-2024-08-06", usage).unwrap();
        assert_eq!(priced.cost.total, Money::parse("0.005125").unwrap());
    }

    #[test]
    fn later_card_wins_per_model_when_merged() {
        let base = RateCard::builtin().unwrap();
        let user = RateCard::from_litellm(
            r#"{"gpt-4o": {"input_cost_per_token": 2e-06, "output_cost_per_token": 8e-06,
                "litellm_provider": "openai", "mode": "chat"}}"#,
        )
        .unwrap();
        let merged = user.merged_over(&base);
        assert_eq!(merged.models().len(), base.models().len());
        let gpt4o = merged.rates("gpt-4o").map(|(r, _)| *r).unwrap();
        assert_eq!((gpt4o.input, gpt4o.cached_input), (per_million("2"), per_million("2")));
        let o3 = merged.rates("o3").map(|(r, _)| *r).unwrap();
        assert_eq!(o3, base.rates("o3").map(|(r, _)| *r).unwrap());
        let merged_fixture = fixture().merged_over(&base);
        assert_eq!(merged_fixture.models().len(), base.models().len() + 4);
    }

    #[test]
    fn malformed_prices_are_reported_with_path_and_line() {
        let text = r#"{
  "sample_spec": {"input_cost_per_token": "not checked", "max_tokens": "LEGACY parameter"},
  "good": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06},
  "bad-input": {"input_cost_per_token": "1e-06x", "output_cost_per_token": 2e-06},
  "bad-output": {"input_cost_per_token": 1e-06,
                 "output_cost_per_token": -2e-06},
  "negative-precise": {"input_cost_per_token": -1.0000000000000001e-07, "output_cost_per_token": 0},
  "nested": {"input_cost_per_token": {"value": 1}, "output_cost_per_token": 0},
  "not-an-object": 3,
  "future": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06,
             "some_new_field": {"a": [1, 2]}, "input_cost_per_token_above_200k_tokens": 2e-06}
}"#;
        let errors = RateCard::from_litellm(text).unwrap_err().0;
        let got: Vec<(&str, u32)> = errors.iter().map(|e| (e.path.as_str(), e.line)).collect();
        assert_eq!(
            got,
            vec![
                ("bad-input.input_cost_per_token", 4),
                ("bad-output.output_cost_per_token", 6),
                ("negative-precise.input_cost_per_token", 7),
                ("nested.input_cost_per_token", 8),
                ("not-an-object", 9),
            ],
            "{errors:#?}"
        );
        assert!(errors[1].message.contains("negative"), "{}", errors[1].message);
        assert!(errors[2].message.contains("negative"), "{}", errors[2].message);
    }

    #[test]
    fn float_artifacts_round_up_to_the_next_femto_usd() {
        let cases = [
            ("1.0000000000000001e-07", 100_000_001),
            ("9.499999999999999e-07", 950_000_000),
            ("1.1428571428571428e-06", 1_142_857_143),
            ("2.857142857142857e-07", 285_714_286),
            ("1e-16", 1),
            ("0.0000000000000000", 0),
            ("1.5e-400", 1),
            ("2.5e-06", 2_500_000_000),
        ];
        for (text, nanos) in cases {
            assert_eq!(
                per_token_rounded_up(text),
                Ok(Rate::from_nanos_per_million(nanos)),
                "{text}"
            );
        }
        assert!(matches!(per_token_rounded_up("-1e-16"), Err(RateError::Negative(_))));
        assert!(matches!(per_token_rounded_up("1e-16x"), Err(RateError::NotDecimal(_))));
        assert!(matches!(per_token_rounded_up("1e30"), Err(RateError::TooLarge(_))));
    }

    #[test]
    fn import_selects_providers_and_names_what_it_skips() {
        let all = RateCard::import_litellm(FIXTURE, None).unwrap();
        assert_eq!(all.card.models().len(), 11);
        assert_eq!(all.other_providers, 0);
        let skipped: Vec<(&str, u32, &str)> =
            all.skipped.iter().map(|s| (s.name.as_str(), s.line, s.reason)).collect();
        assert_eq!(
            skipped,
            vec![
                ("standard/1024-x-1024/dall-e-3", 142, NOT_PER_TOKEN),
                ("whisper-1", 148, NOT_PER_TOKEN)
            ]
        );
        let openai = RateCard::import_litellm(FIXTURE, Some(&["openai"])).unwrap();
        let names: Vec<&str> = openai.card.models().iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "gpt-4o",
                "gpt-4o-mini",
                "gpt-5-nano",
                "gpt-4.1-nano",
                "o3",
                "o4-mini",
                "text-embedding-3-small"
            ]
        );
        assert_eq!(openai.skipped.len(), 2);
        // azure, anthropic twice, gemini.
        assert_eq!(openai.other_providers, 4);
        let both = RateCard::import_litellm(FIXTURE, Some(&["openai", "anthropic"])).unwrap();
        assert_eq!(both.card.models().len(), 9);
        let none = RateCard::import_litellm(FIXTURE, Some(&["openia"])).unwrap();
        assert_eq!((none.card.models().len(), none.other_providers), (0, 13));
        // A chat entry without an output price is skipped with its reason, not priced at $0.
        let text = "{\n\"m\": {\"input_cost_per_token\": 1e-06, \"mode\": \"chat\"}}";
        let import = RateCard::import_litellm(text, None).unwrap();
        assert!(import.card.models().is_empty());
        assert_eq!(
            import.skipped,
            vec![Skipped { name: "m".into(), line: 2, reason: NO_OUTPUT_PRICE }]
        );
    }

    #[test]
    fn an_imported_card_written_as_yaml_reads_back_the_same() {
        let card = fixture();
        let yaml = card.to_config();
        let back = RateCard::from_config(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(back.models(), card.models());
        assert!(yaml.contains(
            "\"gpt-4o\": {provider: \"openai\", input: \"2.50\", cached_input: \"1.25\", \
             output: \"10.00\", max_output_tokens: 16384, context_window: 128000}"
        ));
        assert!(yaml.contains(
            "\"text-embedding-3-small\": {provider: \"openai\", input: \"0.02\", output: \"0.00\", \
             context_window: 8191}"
        ));
    }

    #[test]
    fn repeated_keys_keep_the_last_value() {
        let text = r#"{"m": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06,
                             "input_cost_per_token": 3e-06},
                       "m": {"input_cost_per_token": 5e-06, "output_cost_per_token": 1e-06}}"#;
        let card = RateCard::from_litellm(text).unwrap();
        assert_eq!(card.models().len(), 1);
        assert_eq!(card.models()[0].rates.input, per_million("5"));
    }
}
