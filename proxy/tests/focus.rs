//! The FOCUS export of a ledger the running proxy wrote, through the admin API
//! (`/admin/invoice?format=focus`) and `tollgate invoice --format focus`: every column FOCUS 1.2
//! marks Mandatory, each value of its type (decimals, ISO 8601 UTC date/times, a JSON object of
//! tags) and among its allowed values, charge periods inside the billing period, unit price ×
//! quantity equal to the cost, and BilledCost adding up to the ledger and the invoice to the
//! nano-USD.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tollgate_e2e::harness::{nanos, temp_dir};
use tollgate_e2e::mock::{header, MockUpstream};
use tollgate_e2e::process::{command, ConfigFile, Tollgate};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
const TOKEN_ENV: &str = "TOLLGATE_FOCUS_TEST_TOKEN";
const TOKEN: &str = "focus-test-token";
const POLICY: &str = "version: focus-1\ndefaults: {llm: allow, tool: allow}\n";
/// `tiny-model` costs fractions of a nano-USD per token: 37.5 nano-USD per input token.
const EXTRA: &str =
    "pricing: {models: {tiny-model: {provider: openai, input: \"0.0375\", output: \"0.15\"}}, \
                     tools: {web_search: {per_call: \"0.01\"}}}\n";

/// The columns FOCUS 1.2 marks Mandatory (specification/columns/*.md, "Feature level").
const MANDATORY: [&str; 21] = [
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "ContractedCost",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "ServiceCategory",
    "ServiceName",
];
/// Columns that may not be null in a usage row that is not a correction.
const NOT_NULL: [&str; 25] = [
    "BilledCost",
    "BillingAccountId",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "ListUnitPrice",
    "PricingCategory",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "ServiceCategory",
    "ServiceName",
    "SkuPriceId",
];
const DECIMALS: [&str; 8] = [
    "BilledCost",
    "EffectiveCost",
    "ListCost",
    "ListUnitPrice",
    "ContractedCost",
    "ContractedUnitPrice",
    "ConsumedQuantity",
    "PricingQuantity",
];
const DATETIMES: [&str; 4] =
    ["BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd"];
/// Allowed values (FOCUS 1.2).
const CHARGE_CATEGORIES: [&str; 5] = ["Usage", "Purchase", "Tax", "Credit", "Adjustment"];
const CHARGE_FREQUENCIES: [&str; 3] = ["One-Time", "Recurring", "Usage-Based"];
const PRICING_CATEGORIES: [&str; 4] = ["Standard", "Dynamic", "Committed", "Other"];
const SERVICE_CATEGORIES: [&str; 19] = [
    "AI and Machine Learning",
    "Analytics",
    "Business Applications",
    "Compute",
    "Databases",
    "Developer Tools",
    "Multicloud",
    "Identity",
    "Integration",
    "Internet of Things",
    "Management and Governance",
    "Media",
    "Migration",
    "Mobile",
    "Networking",
    "Security",
    "Storage",
    "Web",
    "Other",
];
/// The AI and Machine Learning subcategories.
const AI_SUBCATEGORIES: [&str; 6] = [
    "AI Platforms",
    "Bots",
    "Generative AI",
    "Machine Learning",
    "Natural Language Processing",
    "Other (AI and Machine Learning)",
];

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// An exact decimal as `value / 10^scale`: `Numeric Format` without a sign or exponent (what
/// this export writes), or `None`.
fn decimal(text: &str) -> Option<(u128, u32)> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || (text.contains('.') && !digits(fraction)) || fraction.len() > 30 {
        return None;
    }
    Some((format!("{whole}{fraction}").parse().ok()?, fraction.len() as u32))
}

/// `value` at 30 decimal places.
fn at30((value, scale): (u128, u32)) -> u128 {
    value * 10u128.pow(30 - scale)
}

/// `YYYY-MM-DDTHH:mm:ssZ` (ISO 8601 extended, UTC) with a valid date and time.
fn is_datetime(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if b.len() != 20
        || !(digits(0..4) && digits(5..7) && digits(8..10))
        || !(digits(11..13) && digits(14..16) && digits(17..19))
        || (b[4], b[7], b[10], b[13], b[16], b[19]) != (b'-', b'-', b'T', b':', b':', b'Z')
    {
        return false;
    }
    let n = |r: std::ops::Range<usize>| text[r].parse::<u32>().unwrap();
    let (month, day) = (n(5..7), n(8..10));
    tollgate_core::time::Date::parse(&text[..10]).is_some()
        && (1..=12).contains(&month)
        && day >= 1
        && n(11..13) < 24
        && n(14..16) < 60
        && n(17..19) < 60
}

async fn get(client: &HttpClient, url: String) -> (u16, Option<String>, Bytes) {
    let request = hyper::Request::get(url)
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.expect("admin answers");
    let status = response.status().as_u16();
    let content_type =
        response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
    (status, content_type, response.into_body().collect().await.unwrap().to_bytes())
}

/// Checks one FOCUS CSV; returns its rows by column name.
fn check_focus(csv: &str, period: &str) -> Vec<BTreeMap<String, String>> {
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    let header: Vec<String> = reader.headers().unwrap().iter().map(str::to_string).collect();
    for column in MANDATORY {
        assert!(header.iter().any(|h| h == column), "mandatory column {column} missing");
    }
    let rows: Vec<BTreeMap<String, String>> = reader
        .records()
        .map(|r| header.iter().cloned().zip(r.unwrap().iter().map(str::to_string)).collect())
        .collect();
    assert!(!rows.is_empty(), "{csv}");
    let (year, month): (i32, u32) = (period[..4].parse().unwrap(), period[5..7].parse().unwrap());
    let next = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
    for row in &rows {
        for column in NOT_NULL {
            assert!(!row[column].is_empty(), "{column} is null: {row:?}");
        }
        for column in DECIMALS {
            assert!(decimal(&row[column]).is_some(), "{column} = {:?} is a decimal", row[column]);
        }
        for column in DATETIMES {
            assert!(is_datetime(&row[column]), "{column} = {:?}", row[column]);
        }
        assert!(CHARGE_CATEGORIES.contains(&&*row["ChargeCategory"]), "{row:?}");
        assert_eq!(row["ChargeCategory"], "Usage");
        assert_eq!(row["ChargeClass"], "", "no corrections: ChargeClass is null");
        assert!(CHARGE_FREQUENCIES.contains(&&*row["ChargeFrequency"]), "{row:?}");
        assert!(PRICING_CATEGORIES.contains(&&*row["PricingCategory"]), "{row:?}");
        assert!(SERVICE_CATEGORIES.contains(&&*row["ServiceCategory"]), "{row:?}");
        assert_eq!(row["ServiceCategory"], "AI and Machine Learning");
        assert!(AI_SUBCATEGORIES.contains(&&*row["ServiceSubcategory"]), "{row:?}");
        assert_eq!(row["BillingCurrency"], "USD");
        assert!(["Tokens", "Requests"].contains(&&*row["PricingUnit"]), "{row:?}");
        assert_eq!(row["ConsumedUnit"], row["PricingUnit"]);
        assert_eq!(row["ConsumedQuantity"], row["PricingQuantity"]);
        for column in ["RegionId", "RegionName", "AvailabilityZone"] {
            assert_eq!(row[column], "", "{column} is null");
        }
        // ResourceType is null exactly when ResourceId is.
        assert_eq!(row["ResourceId"].is_empty(), row["ResourceType"].is_empty(), "{row:?}");
        // The billing period is the month; the charge period one day inside it.
        assert_eq!(row["BillingPeriodStart"], format!("{period}-01T00:00:00Z"));
        assert_eq!(row["BillingPeriodEnd"], format!("{:04}-{:02}-01T00:00:00Z", next.0, next.1));
        let (start, end) = (&row["ChargePeriodStart"], &row["ChargePeriodEnd"]);
        assert!(row["BillingPeriodStart"] <= *start && start < end, "{row:?}");
        assert!(*end <= row["BillingPeriodEnd"], "{row:?}");
        assert_eq!(&start[10..], "T00:00:00Z");
        let day = tollgate_core::time::Date::parse(&start[..10]).unwrap();
        let after = tollgate_core::time::Date::from_days(day.to_days() + 1);
        assert_eq!(*end, format!("{after}T00:00:00Z"), "one day");
        // Tags: a JSON object of strings or nulls with the attribution keys.
        let tags: Value = serde_json::from_str(&row["Tags"]).expect("Tags is JSON");
        let tags = tags.as_object().expect("Tags is an object");
        for key in ["cost_center", "project", "agent", "business_unit"] {
            let v = tags.get(key).unwrap_or_else(|| panic!("tag {key} in {tags:?}"));
            assert!(v.is_string() || v.is_null(), "{key}: {v}");
        }
        // Unit price × quantity = cost, exactly (no corrections here).
        let quantity = decimal(&row["PricingQuantity"]).unwrap();
        assert_eq!(quantity.1, 0, "whole quantities");
        for (price, cost) in
            [("ListUnitPrice", "ListCost"), ("ContractedUnitPrice", "ContractedCost")]
        {
            let price = decimal(&row[price]).unwrap();
            assert_eq!(at30(price) * quantity.0, at30(decimal(&row[cost]).unwrap()), "{row:?}");
        }
        assert_eq!(row["EffectiveCost"], row["BilledCost"]);
        // BilledCost is what was charged: at least the list cost, rounded up per request to the
        // nano-USD.
        let (billed, list) = (nanos(&row["BilledCost"]), at30(decimal(&row["ListCost"]).unwrap()));
        let billed30 = u128::try_from(billed).unwrap() * 10u128.pow(21);
        assert!(billed30 >= list && billed30 - list < quantity.0 * 10u128.pow(21), "{row:?}");
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_focus_export_has_the_mandatory_columns_and_adds_up_to_the_ledger_to_the_nano_usd() {
    let mock = MockUpstream::start().await;
    let dir = temp_dir("focus");
    let data_dir = dir.join("data");
    let search = format!(
        "{{name: search, path_prefix: /tools/search, kind: tool, upstream: \"{}\", tool: web_search}}",
        mock.base_url()
    );
    let yaml = ConfigFile {
        upstream: &mock.base_url(),
        data_dir: &data_dir,
        token_env: TOKEN_ENV,
        more_routes: &[search],
        extra: EXTRA,
        policy: POLICY,
    }
    .yaml();
    let config = dir.join("tollgate.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut proxy = tokio::task::block_in_place(|| {
        Tollgate::run(Path::new(BIN), &config, &[(TOKEN_ENV, TOKEN)])
    });
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let chat = |model: &str| json!({"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "hi ".repeat(500)}]});
    let llm = format!("http://{}/v1/chat/completions", proxy.proxy);
    let tool = format!("http://{}/tools/search", proxy.proxy);
    // (url, cost center, agent, business unit, body, steering)
    type Call<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, Value, Vec<(&'a str, &'a str)>);
    let calls: Vec<Call> = vec![
        (
            &llm,
            "CC-1000",
            "bot-a",
            Some("research"),
            chat("gpt-4o"),
            vec![(header::INPUT_TOKENS, "1200"), (header::CACHED_TOKENS, "1000")],
        ),
        // 333 × 37.5 = 12,487.5 nano-USD, charged 12,488, twice: one row at the card's price.
        (
            &llm,
            "CC-1000",
            "bot-a",
            Some("research"),
            chat("tiny-model"),
            vec![(header::INPUT_TOKENS, "333"), (header::OUTPUT_TOKENS, "7")],
        ),
        (
            &llm,
            "CC-1000",
            "bot-a",
            Some("research"),
            chat("tiny-model"),
            vec![(header::INPUT_TOKENS, "333"), (header::OUTPUT_TOKENS, "7")],
        ),
        (
            &llm,
            "CC-2000",
            "bot-b",
            None,
            chat("o3"),
            vec![(header::OUTPUT_TOKENS, "40"), (header::REASONING_TOKENS, "30")],
        ),
        (&tool, "CC-2000", "bot-b", None, json!({"q": "x"}), vec![]),
    ];
    for (url, cc, agent, unit, body, steer) in &calls {
        let mut request = hyper::Request::post(url.to_string())
            .header("content-type", "application/json")
            .header("x-agent-id", *agent)
            .header("x-cost-center", *cc)
            .header("x-project-id", "PROJ-ABC123");
        if let Some(unit) = unit {
            request = request.header("x-business-unit", *unit);
        }
        for (k, v) in steer {
            request = request.header(*k, *v);
        }
        let response = client
            .request(request.body(Full::new(Bytes::from(body.to_string()))).unwrap())
            .await
            .expect("proxy answers");
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }

    // Every usage record is on disk (fsync window 5 ms).
    let usage = || {
        tollgate::ledger::read_all(&data_dir)
            .expect("ledger")
            .into_iter()
            .filter(|r| r["type"] == "usage")
            .collect::<Vec<Value>>()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let records = loop {
        let records = usage();
        if records.len() == calls.len() {
            break records;
        }
        assert!(std::time::Instant::now() < deadline, "ledger: {records:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    let ledger_total: i64 = records.iter().map(|r| r["cost_nano_usd"].as_i64().unwrap()).sum();
    let period = records[0]["ts"].as_str().unwrap()[..7].to_string();
    assert!(ledger_total > 10_000_000, "the tool call alone costs 0.01");

    let admin = format!("http://{}/admin/invoice?period={period}", proxy.admin);
    let (status, content_type, body) = get(&client, format!("{admin}&format=focus")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(content_type.as_deref(), Some("text/csv; charset=utf-8"));
    let from_admin = String::from_utf8(body.to_vec()).unwrap();
    let (status, _, body) = get(&client, format!("{admin}&format=json")).await;
    assert_eq!(status, 200);
    let invoice: Value = serde_json::from_slice(&body).unwrap();
    let (status, _, _) = get(&client, format!("{admin}&format=focus-ish")).await;
    assert_eq!(status, 400, "an unknown format is refused");

    proxy.signal("TERM");
    assert_eq!(tokio::task::block_in_place(|| proxy.exit_code()), Some(0));
    let out = command(
        Path::new(BIN),
        &[
            "invoice",
            "--period",
            &period,
            "--format",
            "focus",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let from_cli = String::from_utf8(out.stdout).unwrap();
    assert_eq!(from_cli, from_admin, "the command and the admin API write the same rows");

    let rows = check_focus(&from_cli, &period);
    let billed: i64 = rows.iter().map(|r| nanos(&r["BilledCost"])).sum();
    assert_eq!(billed, ledger_total, "BilledCost adds up to the ledger:\n{from_cli}");
    assert_eq!(billed, nanos(invoice["total"].as_str().unwrap()), "and to the invoice");

    // Per attribution too: the rows of a cost center add up to its records.
    let mut by_cc: BTreeMap<String, i64> = BTreeMap::new();
    for r in &records {
        *by_cc.entry(r["cost_center"].as_str().unwrap().to_string()).or_default() +=
            r["cost_nano_usd"].as_i64().unwrap();
    }
    let mut rows_by_cc: BTreeMap<String, i64> = BTreeMap::new();
    for r in &rows {
        *rows_by_cc.entry(r["BillingAccountId"].clone()).or_default() += nanos(&r["BilledCost"]);
    }
    assert_eq!(rows_by_cc, by_cc);

    // The two tiny-model requests: one input row at the card's price, 37.5 nano-USD a token,
    // charged 2 × 12,488 against a list cost of 666 × 37.5 = 24,975.
    let tiny = rows.iter().find(|r| r["SkuId"] == "openai/tiny-model/input").expect("tiny input");
    let expected = [
        ("ListUnitPrice", "0.0000000375"),
        ("ContractedUnitPrice", "0.0000000375"),
        ("PricingQuantity", "666"),
        ("PricingUnit", "Tokens"),
        ("ListCost", "0.000024975"),
        ("BilledCost", "0.000024976"),
        ("SkuPriceId", "openai/tiny-model/input@0.0000000375"),
        ("BillingAccountId", "CC-1000"),
        ("SubAccountId", "PROJ-ABC123"),
        ("ResourceId", "bot-a"),
        ("ResourceType", "Agent"),
        ("ProviderName", "openai"),
    ];
    for (column, value) in expected {
        assert_eq!(tiny[column], value, "{column}: {tiny:?}");
    }
    let tags: Value = serde_json::from_str(&tiny["Tags"]).unwrap();
    assert_eq!(
        tags,
        json!({"cost_center": "CC-1000", "project": "PROJ-ABC123", "agent": "bot-a", "business_unit": "research"})
    );
    let search = rows.iter().find(|r| r["ServiceName"] == "web_search").expect("the tool row");
    assert_eq!(
        (&*search["BilledCost"], &*search["PricingQuantity"], &*search["PricingUnit"]),
        ("0.01", "1", "Requests")
    );
    let tags: Value = serde_json::from_str(&search["Tags"]).unwrap();
    assert_eq!(tags["business_unit"], Value::Null);
    for (sku, meter) in [
        ("openai/gpt-4o/cached_input", "Cached Input Tokens"),
        ("openai/o3/reasoning", "Reasoning Tokens"),
    ] {
        let row = rows.iter().find(|r| r["SkuId"] == sku).unwrap_or_else(|| panic!("{sku}"));
        assert_eq!(row["SkuMeter"], meter);
    }

    // One day: its rows, in the month's billing period, add up to that day's records.
    let day = records[0]["ts"].as_str().unwrap()[..10].to_string();
    let out = command(
        Path::new(BIN),
        &["invoice", "--period", &day, "--format", "focus", "--config", config.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = String::from_utf8(out.stdout).unwrap();
    let day_rows = check_focus(&csv, &period);
    assert!(day_rows.iter().all(|r| r["ChargePeriodStart"] == format!("{day}T00:00:00Z")));
    let day_total: i64 = records
        .iter()
        .filter(|r| r["ts"].as_str().unwrap().starts_with(&day))
        .map(|r| r["cost_nano_usd"].as_i64().unwrap())
        .sum();
    assert_eq!(day_rows.iter().map(|r| nanos(&r["BilledCost"])).sum::<i64>(), day_total);
    let _ = std::fs::remove_dir_all(dir);
}
