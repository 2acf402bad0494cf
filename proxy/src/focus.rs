//! The usage ledger as a FinOps FOCUS 1.2 cost-and-usage dataset (CSV).
//!
//! One row per charge day (UTC), provider, model or tool, token kind and attribution (cost
//! center, project, agent, business unit), summed from the ledger's usage records. Every amount
//! is exact: costs are the integer nano-USD the proxy charged, unit prices are exact decimals
//! (a per-token price can have more places than a nano-USD: $0.0375 per million tokens is
//! `0.0000000375`), and no value ever
//! passes through floating point.
//!
//! Prices and costs, per row:
//! - `BilledCost` = `EffectiveCost` = the sum of what the proxy charged for the row's requests,
//!   so the rows of a period add up to the ledger (and to the period's invoices without shared
//!   costs) to the nano-USD.
//! - A token row whose every request re-prices, at the rate card's current rate for its model
//!   and token kind, to exactly the amount charged has that rate as `ListUnitPrice` and
//!   `ContractedUnitPrice`, and `ListCost` = `ContractedCost` = rate × tokens, exactly. Each
//!   request's charge is rounded up to the nano-USD, so `BilledCost` can exceed `ListCost` by
//!   less than one nano-USD per request. Requests charged at another rate (the card changed
//!   since, a substitute price) form their own rows, as below.
//! - Any other row (tool calls, per-request prices, token charges at a rate the card no longer
//!   has) is priced at its own average: `ListUnitPrice` = `BilledCost` / `PricingQuantity` when
//!   that is a finite decimal, and `ListCost` = `BilledCost`. When it is not, the row is split in
//!   two rows at whole nano-USD unit prices `u` and `u + 1` (`BilledCost = q₁·u + q₂·(u + 1)`),
//!   so that unit price × quantity is exactly the cost on every row.
//!
//! Null is an empty CSV field. Names that come from requests and start like a spreadsheet
//! formula are written with a leading `'`, as in the invoice CSV (never inside `Tags`, which is
//! JSON and starts with `{`).

use std::collections::BTreeMap;
use std::fmt;

use tollgate_core::money::Money;
use tollgate_core::pricing::{Rate, RateCard};
use tollgate_core::record::{Entry, Stored, UsageRecord};
use tollgate_core::time::{Date, ReportPeriod, ReportPeriodError};

/// The columns, in the order written. Every column FOCUS 1.2 marks Mandatory is here, with the
/// conditional ones that apply to metered AI usage and the recommended `ChargeFrequency`,
/// `ServiceSubcategory` and `AvailabilityZone`.
pub const COLUMNS: [&str; 40] = [
    "AvailabilityZone",
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
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
    "RegionId",
    "RegionName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "ServiceCategory",
    "ServiceName",
    "ServiceSubcategory",
    "SkuId",
    "SkuMeter",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "Tags",
];

/// Who issues the invoice these rows add up to.
pub const INVOICE_ISSUER: &str = "Tollgate";
/// The billing account of requests without a cost center (the column may not be null).
pub const UNATTRIBUTED: &str = "unattributed";

/// An exact non-negative decimal: `value / 10^scale`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decimal {
    pub value: u128,
    pub scale: u32,
}

impl Decimal {
    fn of_money(m: Money) -> Decimal {
        Decimal { value: u128::from(m.nanos().unsigned_abs()), scale: 9 }
    }

    /// A rate in USD per token: nano-USD per million tokens is USD per token × 10¹⁵.
    fn of_rate(r: Rate) -> Decimal {
        Decimal { value: u128::from(r.nanos_per_million()), scale: 15 }
    }

    fn times(self, n: u64) -> Decimal {
        Decimal { value: self.value * u128::from(n), scale: self.scale }
    }
}

impl fmt::Display for Decimal {
    /// Plain decimal notation without trailing zeros: `0.0000000025`, `3`, `0.01`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = 10u128.pow(self.scale);
        let (whole, frac) = (self.value / p, self.value % p);
        if frac == 0 {
            return write!(f, "{whole}");
        }
        let digits = format!("{frac:0width$}", width = self.scale as usize);
        write!(f, "{whole}.{}", digits.trim_end_matches('0'))
    }
}

/// What a row charges for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Item {
    /// A model's tokens of one kind (`input`, `cached_input`, `cache_write`, `output`,
    /// `reasoning`), its per-request price (`per_call`) or, for the oldest records without
    /// cost buckets, a whole request (`total`).
    Model { model: String, kind: &'static str },
    /// Calls of a tool.
    Tool { tool: String },
}

/// One FOCUS row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub day: Date,
    /// `provider` of a model's records, the route of a tool's.
    pub provider: String,
    pub item: Item,
    pub cost_center: String,
    pub project: String,
    pub agent: String,
    pub business_unit: Option<String>,
    /// Consumed and priced quantity.
    pub quantity: u64,
    /// `Tokens` or `Requests`.
    pub unit: &'static str,
    pub billed: Money,
    pub unit_price: Decimal,
    pub list_cost: Decimal,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    day: Date,
    provider: String,
    item: Item,
    cost_center: String,
    project: String,
    agent: String,
    business_unit: Option<String>,
    /// The card's rate, for tokens charged at exactly that rate.
    rate: Option<Rate>,
}

/// The rows of `period` from ledger records; `rates` is the rate card the token prices are
/// checked against.
pub fn build<'r>(
    records: impl IntoIterator<Item = &'r UsageRecord>,
    period: ReportPeriod,
    rates: &RateCard,
) -> Vec<Row> {
    build_weighted(records.into_iter().map(weight_one), period, rates)
}

/// One request's record, as [`build_weighted`] counts it.
fn weight_one(r: &UsageRecord) -> (&UsageRecord, u64, u64) {
    let per_call = r.cost.is_some_and(|c| !c.per_call.is_zero());
    (r, 1, u64::from(per_call))
}

/// [`build`] over records that may each stand for several requests (`requests`, of which
/// `per_call` paid a per-call price): the totals of retired ledger segments.
pub fn build_weighted<'r>(
    records: impl IntoIterator<Item = (&'r UsageRecord, u64, u64)>,
    period: ReportPeriod,
    rates: &RateCard,
) -> Vec<Row> {
    let prefix = period.to_string();
    let first_day = match period {
        ReportPeriod::Month { year, month } => Date { year, month, day: 1 },
        ReportPeriod::Day(d) => d,
    };
    // (quantity, billed)
    let mut acc: BTreeMap<Key, (u64, Money)> = BTreeMap::new();
    for (r, requests, per_call_requests) in records {
        if !r.ts.starts_with(&prefix) {
            continue;
        }
        // A timestamp inside the period always starts with its date; keep the charge in the
        // period even if one did not.
        let day = r.ts.get(..10).and_then(Date::parse).unwrap_or(first_day);
        let key = |provider: &str, item: Item, rate: Option<Rate>| Key {
            day,
            provider: provider.to_string(),
            item,
            cost_center: r.cost_center.clone(),
            project: r.project.clone(),
            agent: r.agent.clone(),
            business_unit: r.business_unit.clone(),
            rate,
        };
        let mut add = |k: Key, qty: u64, amount: Money| {
            if qty == 0 && amount.is_zero() {
                return;
            }
            let e = acc.entry(k).or_insert((0, Money::ZERO));
            e.0 += qty;
            e.1 += amount;
        };
        let model = r.model.as_deref().unwrap_or("unknown");
        match (&r.tool, r.cost) {
            (Some(tool), _) => {
                let item = Item::Tool { tool: tool.clone() };
                add(key(&r.route, item, None), requests, r.cost_total())
            }
            (None, Some(c)) => {
                let card = rates.rates(model).ok().map(|(rates, _)| *rates);
                let t = r.tokens;
                let buckets = [
                    ("input", t.input, c.input, card.map(|c| c.input)),
                    ("cached_input", t.cached_input, c.cached_input, card.map(|c| c.cached_input)),
                    ("cache_write", t.cache_write, c.cache_write, card.map(|c| c.cache_write)),
                    ("output", t.output, c.output, card.map(|c| c.output)),
                    ("reasoning", t.reasoning, c.reasoning, card.map(|c| c.reasoning)),
                ];
                for (kind, tokens, cost, rate) in buckets {
                    // The card's rate, if it is the one this request was charged at.
                    let rate = rate.filter(|rate| rate.cost(tokens) == cost);
                    let item = Item::Model { model: model.to_string(), kind };
                    add(key(&r.provider, item, rate), tokens, cost);
                }
                let item = Item::Model { model: model.to_string(), kind: "per_call" };
                let paid = if c.per_call.is_zero() { 0 } else { per_call_requests };
                add(key(&r.provider, item, None), paid, c.per_call);
            }
            (None, None) => {
                let item = Item::Model { model: model.to_string(), kind: "total" };
                add(key(&r.provider, item, None), requests, r.cost_total());
            }
        }
    }

    let mut rows = Vec::with_capacity(acc.len());
    for (k, (quantity, billed)) in acc {
        // Tokens for a model's tokens; requests otherwise, and for a charge without a
        // measured quantity (priced as one request).
        let unit = match &k.item {
            Item::Model { kind, .. } if quantity > 0 && !matches!(*kind, "per_call" | "total") => {
                "Tokens"
            }
            _ => "Requests",
        };
        let row = |quantity: u64, billed: Money, unit_price: Decimal, list_cost: Decimal| Row {
            day: k.day,
            provider: k.provider.clone(),
            item: k.item.clone(),
            cost_center: k.cost_center.clone(),
            project: k.project.clone(),
            agent: k.agent.clone(),
            business_unit: k.business_unit.clone(),
            quantity,
            unit,
            billed,
            unit_price,
            list_cost,
        };
        if let Some(rate) = k.rate {
            let price = Decimal::of_rate(rate);
            rows.push(row(quantity, billed, price, price.times(quantity)));
            continue;
        }
        for (quantity, billed, unit_price) in average_price(quantity, billed) {
            rows.push(row(quantity, billed, unit_price, Decimal::of_money(billed)));
        }
    }
    rows
}

/// `billed` over `quantity` at its average unit price, exactly: one part when `billed /
/// quantity` is a finite decimal, else two parts at whole nano-USD prices `u` and `u + 1`.
fn average_price(quantity: u64, billed: Money) -> Vec<(u64, Money, Decimal)> {
    let nanos = u128::from(billed.nanos().max(0).unsigned_abs());
    if quantity == 0 {
        // Nothing measured but something charged (a substitute price): one unit at the cost.
        return vec![(1, billed, Decimal::of_money(billed))];
    }
    let q = u128::from(quantity);
    // billed / q is finite iff q / gcd has no prime factor but 2 and 5: at most 64 places then.
    for extra in 0..=64u32 {
        let Some(scaled) = 10u128.checked_pow(extra).and_then(|p| nanos.checked_mul(p)) else {
            break;
        };
        if scaled % q == 0 {
            return vec![(quantity, billed, Decimal { value: scaled / q, scale: 9 + extra })];
        }
    }
    let (u, rem) = (nanos / q, (nanos % q) as u64);
    let at = |n: u128| Decimal { value: n, scale: 9 };
    let money = |n: u128, k: u64| Money::from_nanos((n * u128::from(k)) as i64);
    vec![(quantity - rem, money(u, quantity - rem), at(u)), (rem, money(u + 1, rem), at(u + 1))]
}

/// The FOCUS CSV of `period` (`YYYY-MM` or `YYYY-MM-DD`) from ledger records and the totals of
/// retired segments (as the invoice counts them). A retired total keeps no provider or route:
/// its rows name the provider `unknown`.
pub fn from_ledger(
    records: &[Stored],
    retired: &[crate::store::retired::Group],
    period: &str,
    rates: &RateCard,
) -> Result<String, ReportPeriodError> {
    let period = ReportPeriod::parse(period)?;
    let totals: Vec<(UsageRecord, u64, u64)> = retired
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let mut r = g.as_record(i);
            for unknown in [&mut r.provider, &mut r.route] {
                if unknown.is_empty() {
                    *unknown = "unknown".into();
                }
            }
            (r, g.requests, g.per_call_requests)
        })
        .collect();
    let usage = records.iter().filter_map(|r| match &r.entry {
        Entry::Usage(r) => Some(&**r),
        _ => None,
    });
    let items = totals.iter().map(|(r, n, p)| (r, *n, *p)).chain(usage.map(weight_one));
    Ok(to_csv(&build_weighted(items, period, rates), period))
}

/// `YYYY-MM-DDT00:00:00Z`.
fn midnight(d: Date) -> String {
    format!("{d}T00:00:00Z")
}

fn next_month(year: i32, month: u32) -> Date {
    if month == 12 {
        Date { year: year + 1, month: 1, day: 1 }
    } else {
        Date { year, month: month + 1, day: 1 }
    }
}

/// The rows as CSV (RFC 4180, written by the `csv` crate) with the [`COLUMNS`] header.
/// The billing period is the calendar month (UTC) of `period`.
pub fn to_csv(rows: &[Row], period: ReportPeriod) -> String {
    let (year, month) = match period {
        ReportPeriod::Month { year, month } => (year, month),
        ReportPeriod::Day(d) => (d.year, d.month),
    };
    let billing_start = midnight(Date { year, month, day: 1 });
    let billing_end = midnight(next_month(year, month));
    let mut out = csv::Writer::from_writer(Vec::new());
    out.write_record(COLUMNS).expect("CSV into memory");
    for r in rows {
        let charge_start = midnight(r.day);
        let charge_end = midnight(Date::from_days(r.day.to_days() + 1));
        let account = if r.cost_center.is_empty() { UNATTRIBUTED } else { &r.cost_center };
        let none_if_empty = |s: &str| if s.is_empty() { String::new() } else { inert(s) };
        let (sku, meter, description, service, subcategory) = match &r.item {
            Item::Model { model, kind } => {
                let meter = match *kind {
                    "input" => "Input Tokens",
                    "cached_input" => "Cached Input Tokens",
                    "cache_write" => "Cache Write Tokens",
                    "output" => "Output Tokens",
                    "reasoning" => "Reasoning Tokens",
                    "per_call" => "Per-Request Price",
                    _ => "Requests",
                };
                (
                    format!("{}/{model}/{kind}", r.provider),
                    meter,
                    format!("{model}: {} ({})", meter.to_lowercase(), r.provider),
                    r.provider.clone(),
                    "Generative AI",
                )
            }
            Item::Tool { tool } => (
                format!("{}/tool/{tool}", r.provider),
                "Tool Calls",
                format!("{tool}: tool calls ({})", r.provider),
                tool.clone(),
                "Other (AI and Machine Learning)",
            ),
        };
        let sku_price = format!("{sku}@{}", r.unit_price);
        let tag = |s: &str| {
            if s.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::Value::from(s)
            }
        };
        let tags = serde_json::json!({
            "cost_center": tag(&r.cost_center),
            "project": tag(&r.project),
            "agent": tag(&r.agent),
            "business_unit": tag(r.business_unit.as_deref().unwrap_or_default()),
        });
        let (billed, quantity) = (r.billed.to_string(), r.quantity.to_string());
        let (price, list_cost) = (r.unit_price.to_string(), r.list_cost.to_string());
        let (agent, resource_type) =
            if r.agent.is_empty() { (String::new(), "") } else { (inert(&r.agent), "Agent") };
        let fields: [&str; 40] = [
            "",                         // AvailabilityZone
            &billed,                    // BilledCost
            &inert(account),            // BillingAccountId
            &inert(account),            // BillingAccountName
            "USD",                      // BillingCurrency
            &billing_end,               // BillingPeriodEnd
            &billing_start,             // BillingPeriodStart
            "Usage",                    // ChargeCategory
            "",                         // ChargeClass
            &inert(&description),       // ChargeDescription
            "Usage-Based",              // ChargeFrequency
            &charge_end,                // ChargePeriodEnd
            &charge_start,              // ChargePeriodStart
            &quantity,                  // ConsumedQuantity
            r.unit,                     // ConsumedUnit
            &list_cost,                 // ContractedCost
            &price,                     // ContractedUnitPrice
            &billed,                    // EffectiveCost
            INVOICE_ISSUER,             // InvoiceIssuerName
            &list_cost,                 // ListCost
            &price,                     // ListUnitPrice
            "Standard",                 // PricingCategory
            &quantity,                  // PricingQuantity
            r.unit,                     // PricingUnit
            &inert(&r.provider),        // ProviderName
            &inert(&r.provider),        // PublisherName
            "",                         // RegionId
            "",                         // RegionName
            &agent,                     // ResourceId
            &agent,                     // ResourceName
            resource_type,              // ResourceType
            "AI and Machine Learning",  // ServiceCategory
            &inert(&service),           // ServiceName
            subcategory,                // ServiceSubcategory
            &inert(&sku),               // SkuId
            meter,                      // SkuMeter
            &inert(&sku_price),         // SkuPriceId
            &none_if_empty(&r.project), // SubAccountId
            &none_if_empty(&r.project), // SubAccountName
            &tags.to_string(),          // Tags
        ];
        out.write_record(fields).expect("CSV into memory");
    }
    let bytes = out.into_inner().expect("CSV into memory");
    String::from_utf8(bytes).expect("CSV of UTF-8 strings is UTF-8")
}

/// `name`, or `'name` if a spreadsheet would read it as a formula.
fn inert(name: &str) -> String {
    if name.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{name}")
    } else {
        name.to_string()
    }
}

#[cfg(test)]
mod tests;
