use proptest::prelude::*;

use super::*;

fn builtin() -> RateCard {
    RateCard::builtin().unwrap_or_else(|e| panic!("{e}"))
}

fn usd(text: &str) -> Money {
    Money::parse(text).unwrap()
}

fn usage(input: u64, cached_input: u64, cache_write: u64, output: u64, reasoning: u64) -> Usage {
    Usage { input, cached_input, cache_write, output, reasoning }
}

#[test]
fn rates_are_exact_integers() {
    let cases = [
        (Rate::per_million("2.50"), 2_500_000_000),
        (Rate::per_million("0.025"), 25_000_000),
        (Rate::per_million("0.0375"), 37_500_000),
        (Rate::per_million("0.000000001"), 1),
        (Rate::per_token("2.5e-06"), 2_500_000_000),
        (Rate::per_token("7.5e-11"), 75_000),
        (Rate::per_token("3.75e-08"), 37_500_000),
        (Rate::per_token("0.0"), 0),
        (Rate::per_token("1e-15"), 1),
    ];
    for (parsed, nanos) in cases {
        assert_eq!(parsed, Ok(Rate::from_nanos_per_million(nanos)));
    }
    assert_eq!(Rate::per_token("7.5e-11"), Rate::per_million("0.000075"));
    assert!(matches!(Rate::per_token("1e-16"), Err(RateError::TooPrecise { places: 15, .. })));
    assert!(matches!(Rate::per_million("-1"), Err(RateError::Negative(_))));
    assert!(matches!(Rate::per_million(""), Err(RateError::NotDecimal(_))));
    assert!(matches!(Rate::per_million("1e30"), Err(RateError::TooLarge(_))));
    assert_eq!(Rate::per_million("0.0375").unwrap().to_string(), "0.0375");
    assert_eq!(Rate::per_million("10").unwrap().to_string(), "10.00");
}

#[test]
fn builtin_list_prices() {
    let card = builtin();
    // (model, input, cached input, cache write, output) in USD per million tokens, as of the
    // card's date (2026-12-02).
    let cases = [
        ("gpt-6.1-sol", "2", "0.10", "2.50", "10"),
        ("gpt-6.1-terra", "1", "0.05", "1.25", "5"),
        ("gpt-6-sol", "2", "0.20", "2.50", "10"),
        ("gpt-6-luna", "0.10", "0.01", "0.125", "0.50"),
        ("gpt-6-astra", "10", "1", "12.50", "50"),
        ("gpt-5.6", "4", "0.40", "5", "20"),
        ("gpt-5.6-terra", "2", "0.20", "2.50", "12"),
        ("gpt-5.5", "5", "0.50", "5", "30"),
        ("gpt-5.5-pro", "30", "30", "30", "180"),
        ("gpt-5.4", "2.50", "0.25", "2.50", "15"),
        ("gpt-5.4-mini", "0.75", "0.075", "0.75", "4.50"),
        ("gpt-5.4-nano", "0.20", "0.02", "0.20", "1.25"),
        ("gpt-5.3-codex", "1.75", "0.175", "1.75", "14"),
        ("gpt-5.2", "1.75", "0.175", "1.75", "14"),
        ("gpt-5.2-pro", "21", "21", "21", "168"),
        ("gpt-5.1", "1.25", "0.125", "1.25", "10"),
        ("gpt-5", "1.25", "0.125", "1.25", "10"),
        ("gpt-5-mini", "0.25", "0.025", "0.25", "2"),
        ("gpt-5-nano", "0.05", "0.005", "0.05", "0.40"),
        ("gpt-5-pro", "15", "15", "15", "120"),
        ("gpt-4.1", "2", "0.50", "2", "8"),
        ("gpt-4.1-mini", "0.40", "0.10", "0.40", "1.60"),
        ("gpt-4o", "2.50", "1.25", "2.50", "10"),
        ("gpt-4o-2024-05-13", "5", "5", "5", "15"),
        ("gpt-4o-mini", "0.15", "0.075", "0.15", "0.60"),
        ("o3", "2", "0.50", "2", "8"),
        ("o3-pro", "20", "20", "20", "80"),
        ("o4-mini", "1.10", "0.275", "1.10", "4.40"),
        ("o1", "15", "7.50", "15", "60"),
        ("text-embedding-3-small", "0.02", "0.02", "0.02", "0"),
        ("text-embedding-3-large", "0.13", "0.13", "0.13", "0"),
        ("text-embedding-ada-002", "0.10", "0.10", "0.10", "0"),
        ("claude-fable-5-1", "10", "0.25", "12.50", "50"),
        ("claude-mythos-5", "10", "1", "12.50", "50"),
        ("claude-opus-5-5", "4", "0.20", "5", "20"),
        ("claude-opus-5", "5", "0.50", "6.25", "25"),
        ("claude-sonnet-5-5", "2", "0.10", "2.50", "10"),
        ("claude-sonnet-5", "2", "0.20", "2.50", "10"),
        ("claude-haiku-5-5", "0.10", "0.01", "0.125", "0.50"),
        ("claude-opus-4-8", "5", "0.50", "6.25", "25"),
        ("claude-opus-4-7", "5", "0.50", "6.25", "25"),
        ("claude-opus-4-6", "5", "0.50", "6.25", "25"),
        ("claude-opus-4-5", "5", "0.50", "6.25", "25"),
        ("claude-sonnet-4-6", "3", "0.30", "3.75", "15"),
        ("claude-sonnet-4-5", "3", "0.30", "3.75", "15"),
        ("claude-haiku-4-5", "1", "0.10", "1.25", "5"),
        ("claude-opus-4-1", "15", "1.50", "18.75", "75"),
        ("claude-opus-4", "15", "1.50", "18.75", "75"),
        ("claude-sonnet-4", "3", "0.30", "3.75", "15"),
    ];
    for (model, input, cached, write, output) in cases {
        let (rates, source) = card.rates(model).unwrap_or_else(|e| panic!("{e}"));
        let r = |t: &str| Rate::per_million(t).unwrap();
        assert_eq!(
            *rates,
            Rates {
                input: r(input),
                cached_input: r(cached),
                cache_write: r(write),
                output: r(output),
                reasoning: r(output),
                per_call: Money::ZERO,
            },
            "{model}"
        );
        let RateSource::Listed(id) = source else { panic!("{model} not listed") };
        assert_eq!(card.model(id).map(|m| m.name.as_str()), Some(model));
    }
    // Retired long before the card's date: refused rather than priced.
    for retired in ["claude-3-5-sonnet", "claude-3-opus", "claude-3-7-sonnet", "o1-mini"] {
        assert!(card.resolve(retired).is_none(), "{retired}");
    }
}

#[test]
fn builtin_limits() {
    let card = builtin();
    // (model, max output tokens, context window)
    let cases = [
        ("gpt-6.1-sol", 128_000, 1_050_000),
        ("gpt-5.5", 128_000, 1_050_000),
        ("gpt-5.4-mini", 128_000, 400_000),
        ("gpt-5", 128_000, 400_000),
        ("gpt-5-pro", 272_000, 400_000),
        ("gpt-4.1", 32_768, 1_047_576),
        ("gpt-4o", 16_384, 128_000),
        ("gpt-4o-2024-05-13", 4_096, 128_000),
        ("o3", 100_000, 200_000),
        ("text-embedding-3-large", 0, 8_191),
        ("claude-opus-4-8", 128_000, 1_000_000),
        ("claude-sonnet-4-6", 128_000, 1_000_000),
        ("claude-opus-4-5", 64_000, 200_000),
        ("claude-haiku-4-5", 64_000, 200_000),
        ("claude-opus-4-1", 32_000, 200_000),
    ];
    for (model, max_output, context) in cases {
        let want =
            ModelLimits { max_output_tokens: Some(max_output), context_window: Some(context) };
        assert_eq!(card.limits(model), want, "{model}");
    }
}

#[test]
fn every_builtin_model_has_both_limits() {
    let card = builtin();
    for m in card.models() {
        let (Some(max_output), Some(context)) =
            (m.limits.max_output_tokens, m.limits.context_window)
        else {
            panic!("{}: both max_output_tokens and context_window are required", m.name);
        };
        assert!(max_output < context, "{}: {max_output} output tokens in {context}", m.name);
        let embedding = m.name.starts_with("text-embedding-");
        assert_eq!(max_output == 0, embedding, "{}: only embeddings have no output", m.name);
    }
}

#[test]
fn every_builtin_model_resolves_by_name_snapshot_and_provider_prefix() {
    let card = builtin();
    let mut providers = std::collections::BTreeMap::new();
    for m in card.models() {
        let provider = m.provider.as_deref().unwrap_or_else(|| panic!("{}: no provider", m.name));
        *providers.entry(provider).or_insert(0) += 1;
        let name = |n: &str| card.resolve(n).and_then(|id| card.model(id)).map(|m| m.name.clone());
        assert_eq!(name(&m.name).as_deref(), Some(m.name.as_str()));
        assert_eq!(name(&format!("{provider}/{}", m.name)).as_deref(), Some(m.name.as_str()));
        let other = if provider == "openai" { "anthropic" } else { "openai" };
        assert_eq!(name(&format!("{other}/{}", m.name)), None, "{other}/{}", m.name);
        if !m.name.ends_with("-latest") && !m.name.contains("-20") {
            for snapshot in [format!("{}-2026-11-30", m.name), format!("{}-20261130", m.name)] {
                assert_eq!(name(&snapshot).as_deref(), Some(m.name.as_str()), "{snapshot}");
            }
        }
    }
    assert_eq!(providers.keys().copied().collect::<Vec<_>>(), ["anthropic", "openai"]);
    // Snapshot names the providers publish resolve to their base model's prices.
    let snapshots = [
        ("gpt-5-2025-08-07", "gpt-5"),
        ("gpt-5.1-2025-11-13", "gpt-5.1"),
        ("gpt-5.2-2025-12-11", "gpt-5.2"),
        ("gpt-5.2-pro-2025-12-11", "gpt-5.2-pro"),
        ("gpt-5.4-2026-03-05", "gpt-5.4"),
        ("gpt-5.4-mini-2026-03-17", "gpt-5.4-mini"),
        ("gpt-5.4-nano-2026-03-17", "gpt-5.4-nano"),
        ("gpt-5.5-2026-04-23", "gpt-5.5"),
        ("gpt-5.5-pro-2026-04-23", "gpt-5.5-pro"),
        ("gpt-5-pro-2025-10-06", "gpt-5-pro"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-4o-2024-11-20", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("o3-2025-04-16", "o3"),
        ("o3-pro-2025-06-10", "o3-pro"),
        ("claude-opus-4-7-20260416", "claude-opus-4-7"),
        ("claude-opus-4-6-20260205", "claude-opus-4-6"),
        ("claude-opus-4-5-20251101", "claude-opus-4-5"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("anthropic/claude-sonnet-4-6", "claude-sonnet-4-6"),
    ];
    for (snapshot, base) in snapshots {
        let id = card.resolve(snapshot).unwrap_or_else(|| panic!("{snapshot} unknown"));
        assert_eq!(card.model(id).map(|m| m.name.as_str()), Some(base), "{snapshot}");
    }
    // Names that extend a listed one but are other models stay unknown.
    for other in ["gpt-5.4-mini-tts", "claude-sonnet-5-6", "gpt-6-sol-pro", "gpt-5.2-codex-max"] {
        assert!(card.resolve(other).is_none(), "{other}");
    }
}

#[test]
fn model_limits_come_from_the_card_and_resolve_like_prices() {
    let card = RateCard::from_config(
        "version: 1\nmodels:\n  m: {input: \"1\", output: \"2\", max_output_tokens: 16384, context_window: 128000}\n  n: {input: \"1\", output: \"2\"}\n",
    )
    .unwrap();
    let m = ModelLimits { max_output_tokens: Some(16_384), context_window: Some(128_000) };
    assert_eq!(card.limits("m"), m);
    assert_eq!(card.limits("m-2024-08-06"), m, "a dated snapshot has its base model's limits");
    assert_eq!(card.limits("n"), ModelLimits::default());
    assert_eq!(card.limits("unlisted"), ModelLimits::default());
    let over = RateCard::from_config("version: 1\nmodels:\n  x: {input: \"1\", output: \"1\"}\n")
        .unwrap()
        .merged_over(&card);
    assert_eq!(over.limits("m"), m, "merging keeps the base card's limits");
    let errors = RateCard::from_config(
        "version: 1\nmodels:\n  m: {input: \"1\", output: \"2\", max_output_tokens: lots}\n",
    )
    .unwrap_err();
    assert!(errors.to_string().contains("max_output_tokens"), "{errors}");
}

#[test]
fn litellm_limits_are_read_and_odd_values_left_unknown() {
    let card = RateCard::from_litellm(
        r#"{"a": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06,
                  "max_output_tokens": 16384, "max_input_tokens": 128000, "max_tokens": 9},
            "b": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06,
                  "max_output_tokens": 8192.5}}"#,
    )
    .unwrap();
    assert_eq!(
        card.limits("a"),
        ModelLimits { max_output_tokens: Some(16_384), context_window: Some(128_000) }
    );
    assert_eq!(card.limits("b"), ModelLimits::default());
}

#[test]
fn request_costs_are_exact_per_bucket() {
    let card = builtin();
    // (model, usage, input, cached, cache write, output, reasoning, total), USD.
    let cases = [
        (
            "gpt-4o",
            usage(1_000, 500, 0, 200, 0),
            "0.0025",
            "0.000625",
            "0",
            "0.002",
            "0",
            "0.005125",
        ),
        (
            "gpt-4o-2024-08-06",
            Usage::from_openai(1_500, 500, 200, 0),
            "0.0025",
            "0.000625",
            "0",
            "0.002",
            "0",
            "0.005125",
        ),
        (
            "claude-sonnet-4-5-20250929",
            usage(2_000, 50_000, 10_000, 800, 0),
            "0.006",
            "0.015",
            "0.0375",
            "0.012",
            "0",
            "0.0705",
        ),
        ("o3", usage(1_000, 0, 0, 300, 1_200), "0.002", "0", "0", "0.0024", "0.0096", "0.014"),
        (
            "o1",
            Usage::from_openai(10_000, 8_000, 5_000, 4_000),
            "0.03",
            "0.06",
            "0",
            "0.06",
            "0.24",
            "0.39",
        ),
        (
            "claude-opus-4-1",
            usage(1, 1, 1, 1, 1),
            "0.000015",
            "0.0000015",
            "0.00001875",
            "0.000075",
            "0.000075",
            "0.00018525",
        ),
        (
            "gpt-5-nano",
            usage(3, 1, 0, 1, 0),
            "0.00000015",
            "0.000000005",
            "0",
            "0.0000004",
            "0",
            "0.000000555",
        ),
        (
            "text-embedding-3-small",
            usage(1_000_000, 0, 0, 0, 0),
            "0.02",
            "0",
            "0",
            "0",
            "0",
            "0.02",
        ),
        ("gpt-4o-mini", Usage::default(), "0", "0", "0", "0", "0", "0"),
    ];
    for (model, u, input, cached, write, output, reasoning, total) in cases {
        let priced = card.price(model, u).unwrap();
        let want = Cost {
            input: usd(input),
            cached_input: usd(cached),
            cache_write: usd(write),
            output: usd(output),
            reasoning: usd(reasoning),
            per_call: Money::ZERO,
            total: usd(total),
        };
        assert_eq!(priced.cost, want, "{model}");
        assert!(matches!(priced.source, RateSource::Listed(_)), "{model}");
    }
}

#[test]
fn each_bucket_rounds_up_to_the_next_nano_usd() {
    // 7.5e-11 USD per token is 0.075 nano-USD per token.
    let tiny = Rate::per_token("7.5e-11").unwrap();
    let cases = [(0, 0), (1, 1), (13, 1), (14, 2), (1_000, 75), (1_001, 76)];
    for (tokens, nanos) in cases {
        assert_eq!(tiny.cost(tokens), Money::from_nanos(nanos), "{tokens}");
    }
    let cost = Rates::new(tiny, tiny).price(usage(1, 1, 1, 1, 1));
    assert_eq!((cost.input, cost.total), (Money::from_nanos(1), Money::from_nanos(5)));
}

#[test]
fn per_call_price_is_added_once_per_request() {
    let card = RateCard::from_config(
        "version: 1\nmodels:\n  search-llm: {input: 1, output: 2, per_call: \"0.005\"}\n",
    )
    .unwrap();
    let cost = card.price("search-llm", usage(1_000, 0, 0, 1_000, 0)).unwrap().cost;
    assert_eq!(cost.per_call, usd("0.005"));
    assert_eq!(cost.total, usd("0.008"));
    assert_eq!(card.worst_case("search-llm", 0, 0).unwrap().cost.total, usd("0.005"));
}

#[test]
fn unknown_model_is_denied_by_default() {
    let card = builtin();
    let err = card.price("mystery-model", usage(10, 0, 0, 10, 0)).unwrap_err();
    assert_eq!(err, UnknownModel { model: "mystery-model".into() });
    assert_eq!(err.to_string(), "no price for model `mystery-model` in the rate card");
    assert_eq!(card.worst_case("mystery-model", 10, 10).unwrap_err().model, "mystery-model");
}

#[test]
fn unknown_model_with_fallback_is_priced_and_marked() {
    let card = RateCard::from_config(
        "version: 1\nunknown_model: {fallback: {input: \"10.00\", output: \"30.00\"}}\n\
         models:\n  gpt-4o: {input: \"2.50\", output: \"10.00\"}\n",
    )
    .unwrap();
    let priced = card.price("mystery-model", usage(1_000, 1_000, 0, 1_000, 1_000)).unwrap();
    assert_eq!(priced.source, RateSource::Fallback);
    assert_eq!(priced.cost.total, usd("0.08"));
    let listed = card.price("gpt-4o", usage(1_000, 0, 0, 0, 0)).unwrap();
    assert!(matches!(listed.source, RateSource::Listed(_)));
    let reserve = card.worst_case("mystery-model", 1_000, 1_000).unwrap();
    assert_eq!((reserve.cost.total, reserve.source), (usd("0.04"), RateSource::Fallback));
}

#[test]
fn worst_case_uses_the_dearest_input_and_output_rates() {
    let card = builtin();
    // Input at the cache-write rate (3.75 > 3.00): the provider may cache any of it.
    let priced = card.worst_case("claude-sonnet-4-5-20250929", 10_000, 4_096).unwrap();
    assert_eq!(
        priced.cost,
        Cost::from_buckets(
            usd("0.0375"),
            Money::ZERO,
            Money::ZERO,
            usd("0.06144"),
            Money::ZERO,
            Money::ZERO
        )
    );
    let mut card = RateCard::new(UnknownModelPolicy::Deny);
    let mut rates = Rates::new(Rate::per_million("1").unwrap(), Rate::per_million("2").unwrap());
    rates.reasoning = Rate::per_million("5").unwrap();
    card.insert_model("thinker", None, rates);
    let reserve = card.worst_case("thinker", 1_000_000, 1_000_000).unwrap().cost;
    assert_eq!((reserve.input, reserve.output, reserve.total), (usd("1"), usd("5"), usd("6")));
    // Whatever the split of the output, the actual cost never exceeds the reservation.
    let actual = card.price("thinker", usage(1_000_000, 0, 0, 400_000, 600_000)).unwrap().cost;
    assert!(actual.total <= reserve.total);
}

#[test]
fn tools_are_priced_per_call_and_per_gb() {
    let card = RateCard::from_config(
        "version: 1\nmodels: {}\ntools:\n  web_search: {per_call: \"0.01\"}\n  \
         blob_fetch: {per_gb: \"0.12\", per_call: \"0.0001\"}\n",
    )
    .unwrap();
    let cases = [
        ("web_search", 3, 5_000_000_000, "0.03", "0", "0.03"),
        ("blob_fetch", 2, 2_500_000_000, "0.0002", "0.30", "0.3002"),
        ("blob_fetch", 1, 1, "0.0001", "0.000000001", "0.000100001"),
        ("blob_fetch", 0, 0, "0", "0", "0"),
    ];
    for (tool, calls, bytes, per_call, transfer, total) in cases {
        let cost = card.price_tool(tool, calls, bytes).unwrap();
        assert_eq!(
            cost,
            ToolCost { calls: usd(per_call), transfer: usd(transfer), total: usd(total) },
            "{tool} {calls} {bytes}"
        );
    }
    let err = card.price_tool("web_fetch", 1, 0).unwrap_err();
    assert_eq!(err, UnknownTool { tool: "web_fetch".into() });
}

#[test]
fn huge_counts_saturate_instead_of_wrapping() {
    let rate = Rate::per_million("75").unwrap();
    assert_eq!(rate.cost(u64::MAX), Money::MAX);
    let cost = Rates::new(rate, rate).price(usage(u64::MAX, u64::MAX, 0, u64::MAX, 0));
    assert_eq!(cost.total, Money::MAX);
}

#[test]
fn merging_keeps_base_entries_and_takes_the_overlay_policy() {
    let base = builtin();
    let overlay = RateCard::from_config(
        "version: 1\nunknown_model: {fallback: {input: 1, output: 1}}\nmodels:\n  \
         gpt-4o: {input: 5, output: 20}\n  my-model: {input: 1, output: 1}\ntools:\n  \
         t: {per_call: 1}\n",
    )
    .unwrap();
    let merged = overlay.merged_over(&base);
    assert_eq!(merged.models().len(), base.models().len() + 1);
    assert_eq!(merged.rates("gpt-4o").unwrap().0.input, Rate::per_million("5").unwrap());
    assert_eq!(merged.rates("o3").unwrap().0, base.rates("o3").unwrap().0);
    assert!(merged.resolve("my-model").is_some());
    assert!(matches!(merged.unknown_model(), UnknownModelPolicy::Fallback(_)));
    assert_eq!(merged.tools().count(), 1);
}

fn any_usage() -> impl Strategy<Value = Usage> {
    let n = || 0u64..50_000_000;
    (n(), n(), n(), n(), n()).prop_map(|(a, b, c, d, e)| usage(a, b, c, d, e))
}

fn any_rates() -> impl Strategy<Value = Rates> {
    let r = || (0u64..200_000_000_000).prop_map(Rate::from_nanos_per_million);
    (r(), r(), r(), r(), r(), 0i64..10_000_000).prop_map(|(a, b, c, d, e, p)| Rates {
        input: a,
        cached_input: b,
        cache_write: c,
        output: d,
        reasoning: e,
        per_call: Money::from_nanos(p),
    })
}

proptest! {
    #[test]
    fn total_is_the_sum_of_the_buckets(rates in any_rates(), u in any_usage()) {
        let c = rates.price(u);
        let sum = c.input + c.cached_input + c.cache_write + c.output + c.reasoning + c.per_call;
        prop_assert_eq!(c.total, sum);
    }

    #[test]
    fn cost_is_monotonic_in_tokens(
        rates in any_rates(),
        u in any_usage(),
        extra in any_usage(),
    ) {
        let small = rates.price(u);
        let big = rates.price(u + extra);
        prop_assert!(small.input <= big.input);
        prop_assert!(small.cached_input <= big.cached_input);
        prop_assert!(small.cache_write <= big.cache_write);
        prop_assert!(small.output <= big.output);
        prop_assert!(small.reasoning <= big.reasoning);
        prop_assert!(small.total <= big.total);
    }

    #[test]
    fn pricing_a_usage_equals_pricing_each_bucket(rates in any_rates(), u in any_usage()) {
        let whole = rates.price(u);
        let parts = [
            usage(u.input, 0, 0, 0, 0),
            usage(0, u.cached_input, 0, 0, 0),
            usage(0, 0, u.cache_write, 0, 0),
            usage(0, 0, 0, u.output, 0),
            usage(0, 0, 0, 0, u.reasoning),
        ];
        let mut summed = Cost::ZERO;
        for part in parts {
            summed += rates.price(part);
        }
        // The per-call price belongs to the request, once.
        let per_call_extra = rates.per_call.saturating_mul(4);
        prop_assert_eq!(summed.total - per_call_extra, whole.total);
        prop_assert_eq!(
            (summed.input, summed.cached_input, summed.cache_write, summed.output, summed.reasoning),
            (whole.input, whole.cached_input, whole.cache_write, whole.output, whole.reasoning)
        );
    }

    #[test]
    fn reservation_covers_any_split_of_the_tokens(
        rates in any_rates(),
        input in 0u64..10_000_000,
        output in 0u64..10_000_000,
        cached_share in 0u64..=100,
        write_share in 0u64..=100,
        reasoning_share in 0u64..=100,
    ) {
        let cached = input * cached_share / 100;
        let written = (input - cached) * write_share / 100;
        let reasoning = output * reasoning_share / 100;
        let u = usage(input - cached - written, cached, written, output - reasoning, reasoning);
        let actual = rates.price(u);
        let reserved = rates.worst_case(input, output);
        // Five rounded-up buckets against two: at most 3 nano-USD apart.
        prop_assert!(actual.total <= reserved.total + Money::from_nanos(3));
    }

    #[test]
    fn per_million_and_per_token_texts_agree(nanos in 0u64..1_000_000_000_000) {
        let per_million = format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000);
        let per_token = format!("{}e-15", nanos);
        prop_assert_eq!(Rate::per_million(&per_million), Ok(Rate::from_nanos_per_million(nanos)));
        prop_assert_eq!(Rate::per_token(&per_token), Ok(Rate::from_nanos_per_million(nanos)));
    }
}
