use super::*;

use tollgate_core::pricing::{Cost, Rates, UnknownModelPolicy};
use tollgate_core::record::{Decision, End, UsageSource};
use tollgate_core::usage::Usage;

use crate::invoice::{self, GroupBy};

/// gpt-4o at $2.50 / $10.00 per million tokens (cache reads $1.25), mini at $0.0375 / $0.15
/// (fractions of a nano-USD per token), o3 at $2.00 / $8.00.
fn card() -> RateCard {
    let mut card = RateCard::new(UnknownModelPolicy::Deny);
    let mut gpt = Rates::new(Rate::per_million("2.50").unwrap(), Rate::per_million("10").unwrap());
    gpt.cached_input = Rate::per_million("1.25").unwrap();
    card.insert_model("gpt-4o", Some("openai"), gpt);
    card.insert_model(
        "mini",
        Some("openai"),
        Rates::new(Rate::per_million("0.0375").unwrap(), Rate::per_million("0.15").unwrap()),
    );
    card.insert_model(
        "o3",
        Some("openai"),
        Rates::new(Rate::per_million("2").unwrap(), Rate::per_million("8").unwrap()),
    );
    card
}

fn record(ts: &str, model: Option<&str>, tokens: Usage, cost: Option<Cost>) -> UsageRecord {
    let total = cost.map_or(Money::from_nanos(100), |c| c.total);
    UsageRecord {
        ts: ts.into(),
        reserved_at_ms: 0,
        request_id: "req".into(),
        reservation_id: "res".into(),
        agent: "bot-1".into(),
        cost_center: "CC-1234".into(),
        project: "PROJ-1".into(),
        business_unit: Some("research".into()),
        route: "openai".into(),
        provider: "openai".into(),
        model: model.map(str::to_string),
        tool: None,
        tokens,
        cost,
        cost_usd: total,
        cost_nano_usd: total.nanos(),
        decision: Decision::Allow,
        reason: "default_allow".into(),
        clause: "defaults.llm".into(),
        policy_version: "v1".into(),
        budgets: Vec::new(),
        status: 200,
        latency_ms: 1,
        usage_source: UsageSource::Reported,
        price_source: None,
        end: End::Complete,
        source: None,
        source_event_id: None,
    }
}

/// A record charged what `card` charges for `tokens` of `model`.
fn priced(ts: &str, model: &str, tokens: Usage) -> UsageRecord {
    let cost = card().price(model, tokens).unwrap().cost;
    record(ts, Some(model), tokens, Some(cost))
}

fn month(text: &str) -> ReportPeriod {
    ReportPeriod::parse(text).unwrap()
}

fn rows_of(csv: &str) -> Vec<BTreeMap<String, String>> {
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    let header: Vec<String> = reader.headers().unwrap().iter().map(str::to_string).collect();
    assert_eq!(header, COLUMNS);
    reader
        .records()
        .map(|r| header.iter().cloned().zip(r.unwrap().iter().map(str::to_string)).collect())
        .collect()
}

#[test]
fn decimals_are_written_exactly_without_trailing_zeros() {
    let d = |value, scale| Decimal { value, scale }.to_string();
    assert_eq!(d(25, 10), "0.0000000025");
    assert_eq!(d(3_000_000_000, 9), "3");
    assert_eq!(d(10_000_000, 9), "0.01");
    assert_eq!(d(0, 15), "0");
    assert_eq!(Decimal::of_rate(Rate::per_million("2.50").unwrap()).to_string(), "0.0000025");
    assert_eq!(Decimal::of_rate(Rate::per_token("7.5e-11").unwrap()).to_string(), "0.000000000075");
}

#[test]
fn an_average_price_is_exact_or_split_in_two_whole_nano_prices() {
    // 10 nano-USD over 4 tokens: 2.5 nano-USD each.
    assert_eq!(
        average_price(4, Money::from_nanos(10)),
        vec![(4, Money::from_nanos(10), Decimal { value: 25, scale: 10 })]
    );
    // 10 over 3 is 3.33…: 2 at 3 and 1 at 4.
    let parts = average_price(3, Money::from_nanos(10));
    assert_eq!(
        parts,
        vec![
            (2, Money::from_nanos(6), Decimal { value: 3, scale: 9 }),
            (1, Money::from_nanos(4), Decimal { value: 4, scale: 9 }),
        ]
    );
    for q in 1..200u64 {
        for nanos in [0i64, 1, 7, 999, 1_000_003, 123_456_789_012] {
            let parts = average_price(q, Money::from_nanos(nanos));
            let billed: Money = parts.iter().map(|p| p.1).sum();
            let quantity: u64 = parts.iter().map(|p| p.0).sum();
            assert_eq!((billed.nanos(), quantity), (nanos, q), "{nanos} over {q}");
            for (quantity, billed, price) in parts {
                let billed = Decimal::of_money(billed).rescaled(price.scale);
                assert_eq!(price.times(quantity), billed, "{nanos} over {q}");
            }
        }
    }
}

impl Decimal {
    fn rescaled(self, scale: u32) -> Decimal {
        assert!(scale >= self.scale);
        Decimal { value: self.value * 10u128.pow(scale - self.scale), scale }
    }
}

#[test]
fn token_rows_carry_the_card_rate_and_rows_charged_otherwise_their_average() {
    let input = |n| Usage { input: n, ..Usage::default() };
    let mut records = vec![
        // $0.0375 per million: 1000 × 37.5 = 37,500 nano-USD; 3 × 37.5 = 112.5, charged 113.
        priced("2026-11-03T10:00:00.000Z", "mini", input(1000)),
        priced("2026-11-03T11:00:00.000Z", "mini", input(3)),
    ];
    // Charged at another rate ($0.05/M) than the card's: a row of its own, at its average.
    let mut other = priced("2026-11-03T12:00:00.000Z", "mini", input(1000));
    let cost = Money::from_nanos(50_000);
    other.cost = Some(Cost::from_buckets(
        cost,
        Money::ZERO,
        Money::ZERO,
        Money::ZERO,
        Money::ZERO,
        Money::ZERO,
    ));
    other.cost_nano_usd = cost.nanos();
    records.push(other);
    let rows = build(&records, month("2026-11"), &card());
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let at_card = rows.iter().find(|r| r.unit_price.to_string() == "0.0000000375");
    let at_card = at_card.unwrap_or_else(|| panic!("{rows:#?}"));
    assert_eq!((at_card.quantity, at_card.billed.nanos()), (1003, 37_613));
    assert_eq!(at_card.list_cost.to_string(), "0.0000376125");
    assert_eq!(at_card.unit, "Tokens");
    let average = rows.iter().find(|r| r.unit_price.to_string() == "0.00000005");
    let average = average.unwrap_or_else(|| panic!("{rows:#?}"));
    assert_eq!((average.quantity, average.billed.nanos()), (1000, 50_000));
    assert_eq!(average.list_cost.to_string(), "0.00005");
}

/// Synthetic records over a month: several days, models, kinds, tools, attributions.
fn many(i: u64) -> UsageRecord {
    let models = ["gpt-4o", "mini", "o3", "unlisted-model"];
    let model = models[(i % 4) as usize];
    let tokens = Usage {
        input: i % 1000,
        cached_input: i % 7,
        cache_write: 0,
        output: i % 300,
        reasoning: i % 5,
    };
    let ts = format!("2026-11-{:02}T{:02}:00:00.000Z", 1 + i % 30, i % 24);
    let mut r = if model == "unlisted-model" {
        // Priced by something the card does not have: a per-request price on top.
        let cost = Cost::from_buckets(
            Money::from_nanos((i % 1000 * 3) as i64),
            Money::ZERO,
            Money::ZERO,
            Money::from_nanos((i % 300 * 11) as i64),
            Money::ZERO,
            Money::from_nanos(1_000 + (i % 13) as i64),
        );
        record(&ts, Some(model), tokens, Some(cost))
    } else {
        priced(&ts, model, tokens)
    };
    if i % 17 == 0 {
        r.tool = Some(format!("tool-{}", i % 3));
        r.route = "search".into();
        r.provider = "tool".into();
        r.cost = None;
        r.cost_nano_usd = 10_000_000 + (i % 7) as i64;
    }
    if i % 23 == 0 {
        // The oldest records: no buckets.
        r.cost = None;
    }
    r.cost_center = format!("CC-{}", i % 4);
    r.agent = if i % 9 == 0 { String::new() } else { format!("agent-{}", i % 5) };
    r.business_unit = (i % 2 == 0).then(|| "research".to_string());
    r
}

#[test]
fn rows_add_up_to_the_ledger_and_the_invoice_to_the_nano_usd_and_prices_times_quantities_match() {
    let mut records: Vec<UsageRecord> = (0..20_000).map(many).collect();
    // A record of another month is not in November's rows.
    records.push(priced(
        "2026-12-01T00:00:00.000Z",
        "gpt-4o",
        Usage { input: 5, ..Usage::default() },
    ));
    let november: Money =
        records.iter().filter(|r| r.ts.starts_with("2026-11")).map(UsageRecord::cost_total).sum();
    let rows = build(&records, month("2026-11"), &card());
    let billed: Money = rows.iter().map(|r| r.billed).sum();
    assert_eq!(billed, november);
    let invoices = invoice::build(&records, "2026-11", GroupBy::Agent, &[], |_| None);
    assert_eq!(billed, invoices.total);
    // Per day too.
    let day = build(&records, month("2026-11-07"), &card());
    let day_ledger: Money = records
        .iter()
        .filter(|r| r.ts.starts_with("2026-11-07"))
        .map(UsageRecord::cost_total)
        .sum();
    assert_eq!(day.iter().map(|r| r.billed).sum::<Money>(), day_ledger);
    assert!(day.iter().all(|r| r.day == Date { year: 2026, month: 11, day: 7 }));

    let mut rated = 0;
    for r in &rows {
        let list = r.list_cost;
        let product = r.unit_price.times(r.quantity);
        assert_eq!(product.rescaled(15), list.rescaled(15), "price × quantity = list cost: {r:?}");
        let billed = Decimal::of_money(r.billed).rescaled(list.scale);
        if list.scale == 15 {
            // At the card's rate: charged per request rounded up, under 1 nano-USD each.
            rated += 1;
            assert!(billed.value >= list.value, "{r:?}");
            assert!(billed.value - list.value < u128::from(r.quantity) * 1_000_000, "{r:?}");
        } else {
            assert_eq!(billed, list, "{r:?}");
        }
    }
    assert!(rated > 100, "most token rows are at the card's rate: {rated}");
    assert!(rows.iter().any(|r| matches!(r.item, Item::Tool { .. })));
    assert!(rows.iter().any(|r| matches!(&r.item, Item::Model { kind: "total", .. })));
    assert!(rows.iter().any(|r| matches!(&r.item, Item::Model { kind: "per_call", .. })));
}

#[test]
fn the_csv_has_every_column_nulls_as_empty_fields_and_tags_as_json() {
    let mut tool = record("2026-12-31T23:59:59.999Z", None, Usage::default(), None);
    tool.tool = Some("web_search".into());
    tool.route = "search".into();
    tool.provider = "tool".into();
    tool.agent = String::new();
    tool.cost_center = String::new();
    tool.business_unit = None;
    tool.cost_nano_usd = 10_000_000;
    let records = vec![
        priced(
            "2026-12-31T10:00:00.000Z",
            "gpt-4o",
            Usage { input: 1000, cached_input: 200, output: 50, ..Usage::default() },
        ),
        tool,
    ];
    let period = month("2026-12");
    let csv = to_csv(&build(&records, period, &card()), period);
    let rows = rows_of(&csv);
    assert_eq!(rows.len(), 4, "{csv}");
    let input = rows.iter().find(|r| r["SkuId"] == "openai/gpt-4o/input").unwrap();
    let expected = [
        ("BilledCost", "0.0025"),
        ("EffectiveCost", "0.0025"),
        ("ListCost", "0.0025"),
        ("ListUnitPrice", "0.0000025"),
        ("ContractedCost", "0.0025"),
        ("ContractedUnitPrice", "0.0000025"),
        ("BillingCurrency", "USD"),
        ("BillingPeriodStart", "2026-12-01T00:00:00Z"),
        ("BillingPeriodEnd", "2027-01-01T00:00:00Z"),
        ("ChargePeriodStart", "2026-12-31T00:00:00Z"),
        ("ChargePeriodEnd", "2027-01-01T00:00:00Z"),
        ("ChargeCategory", "Usage"),
        ("ChargeClass", ""),
        ("ChargeFrequency", "Usage-Based"),
        ("ChargeDescription", "gpt-4o: input tokens (openai)"),
        ("ConsumedQuantity", "1000"),
        ("ConsumedUnit", "Tokens"),
        ("PricingQuantity", "1000"),
        ("PricingUnit", "Tokens"),
        ("PricingCategory", "Standard"),
        ("ServiceCategory", "AI and Machine Learning"),
        ("ServiceSubcategory", "Generative AI"),
        ("ServiceName", "openai"),
        ("ProviderName", "openai"),
        ("PublisherName", "openai"),
        ("InvoiceIssuerName", "Tollgate"),
        ("BillingAccountId", "CC-1234"),
        ("BillingAccountName", "CC-1234"),
        ("SubAccountId", "PROJ-1"),
        ("SubAccountName", "PROJ-1"),
        ("ResourceId", "bot-1"),
        ("ResourceName", "bot-1"),
        ("ResourceType", "Agent"),
        ("SkuMeter", "Input Tokens"),
        ("SkuPriceId", "openai/gpt-4o/input@0.0000025"),
        ("RegionId", ""),
        ("RegionName", ""),
        ("AvailabilityZone", ""),
    ];
    for (column, value) in expected {
        assert_eq!(input[column], value, "{column}");
    }
    let tags: serde_json::Value = serde_json::from_str(&input["Tags"]).unwrap();
    assert_eq!(
        tags,
        serde_json::json!({"cost_center": "CC-1234", "project": "PROJ-1", "agent": "bot-1", "business_unit": "research"})
    );
    let cached = rows.iter().find(|r| r["SkuId"] == "openai/gpt-4o/cached_input").unwrap();
    assert_eq!((&*cached["ListUnitPrice"], &*cached["BilledCost"]), ("0.00000125", "0.00025"));

    let tool = rows.iter().find(|r| r["SkuId"] == "search/tool/web_search").unwrap();
    let expected = [
        ("BilledCost", "0.01"),
        ("ListCost", "0.01"),
        ("ListUnitPrice", "0.01"),
        ("ConsumedUnit", "Requests"),
        ("PricingQuantity", "1"),
        ("ProviderName", "search"),
        ("ServiceName", "web_search"),
        ("ServiceSubcategory", "Other (AI and Machine Learning)"),
        ("BillingAccountId", UNATTRIBUTED),
        ("ResourceId", ""),
        ("ResourceType", ""),
    ];
    for (column, value) in expected {
        assert_eq!(tool[column], value, "{column}");
    }
    let tags: serde_json::Value = serde_json::from_str(&tool["Tags"]).unwrap();
    assert_eq!(
        tags,
        serde_json::json!({"cost_center": null, "project": "PROJ-1", "agent": null, "business_unit": null})
    );
}

#[test]
fn names_that_look_like_formulas_are_defused_outside_the_json_tags() {
    let mut r =
        priced("2026-11-03T10:00:00.000Z", "gpt-4o", Usage { input: 10, ..Usage::default() });
    r.agent = "=HYPERLINK(\"http://x\")".into();
    r.cost_center = "@SUM(A1)".into();
    let period = month("2026-11");
    let rows = rows_of(&to_csv(&build([&r], period, &card()), period));
    assert_eq!(rows[0]["ResourceId"], "'=HYPERLINK(\"http://x\")");
    assert_eq!(rows[0]["BillingAccountId"], "'@SUM(A1)");
    let tags: serde_json::Value = serde_json::from_str(&rows[0]["Tags"]).unwrap();
    assert_eq!(tags["agent"], "=HYPERLINK(\"http://x\")");
}

#[test]
fn from_ledger_refuses_a_bad_period() {
    assert!(from_ledger(&[], &[], "2026-13", &card()).is_err());
    let csv = from_ledger(&[], &[], "2026-11-30", &card()).unwrap();
    assert_eq!(csv.lines().count(), 1, "a header only");
}
