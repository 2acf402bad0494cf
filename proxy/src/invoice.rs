//! Monthly invoices from the usage ledger: line items per group (cost center, project or agent)
//! by model and token kind, tool calls, allocated shared costs, subtotals, budget and remaining.
//!
//! Every amount is exact integer nano-USD. A line item is the sum of the per-record, per-bucket
//! costs the proxy charged (never a re-pricing of summed tokens), so the line items add up to the
//! totals to the last unit, and the totals to the ledger. Shared costs (e.g. the proxy fleet) are
//! split by request count with the largest-remainder method, so the shares add up to the shared
//! cost exactly.

use std::collections::BTreeMap;

use serde::Serialize;

use tollgate_core::money::Money;
use tollgate_core::record::{Stored, UsageRecord};

use crate::store::retired::Group;

/// What to group invoices by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    CostCenter,
    Project,
    Agent,
}

impl GroupBy {
    pub fn parse(text: &str) -> Option<GroupBy> {
        Some(match text {
            "cost_center" => GroupBy::CostCenter,
            "project" => GroupBy::Project,
            "agent" => GroupBy::Agent,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::CostCenter => "cost_center",
            GroupBy::Project => "project",
            GroupBy::Agent => "agent",
        }
    }
}

pub use crate::config::SharedCost;

/// One line of an invoice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Line {
    /// `llm`, `tool` or `shared`.
    pub category: &'static str,
    /// Model, tool or shared-cost name.
    pub item: String,
    /// Token kind for `llm` lines (`input`, `cached_input`, `cache_write`, `output`,
    /// `reasoning`, `per_call`); empty otherwise.
    pub kind: &'static str,
    pub quantity: u64,
    /// `tokens`, `calls` or `requests`.
    pub unit: &'static str,
    pub amount: Money,
}

/// The invoice of one group.
#[derive(Clone, Debug, Serialize)]
pub struct Invoice {
    pub group: String,
    pub requests: u64,
    pub lines: Vec<Line>,
    pub subtotal_llm: Money,
    pub subtotal_tools: Money,
    pub subtotal_shared: Money,
    pub total: Money,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<Money>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<Money>,
}

/// Every group's invoice for a period.
#[derive(Clone, Debug, Serialize)]
pub struct Invoices {
    pub period: String,
    pub group_by: &'static str,
    pub currency: &'static str,
    pub invoices: Vec<Invoice>,
    pub total: Money,
}

#[derive(Default)]
struct Acc {
    requests: u64,
    // (category, item, kind) → (quantity, amount)
    lines: BTreeMap<(u8, String, &'static str), (u64, Money)>,
}

/// Builds the invoices of `period` (`YYYY-MM`, or `YYYY-MM-DD` for a day) from ledger records.
/// `budget_of` gives a group's budget for the period, if it has one.
pub fn build<'a, 'r>(
    records: impl IntoIterator<Item = &'r UsageRecord>,
    period: &str,
    group_by: GroupBy,
    shared: &[SharedCost],
    budget_of: impl Fn(&str) -> Option<Money> + 'a,
) -> Invoices {
    let one = |r: &'r UsageRecord| {
        let per_call = r.cost.is_some_and(|c| !c.per_call.is_zero());
        (r, 1, u64::from(per_call))
    };
    build_weighted(records.into_iter().map(one), period, group_by, shared, budget_of)
}

/// [`build`] over records that each stand for `requests` requests, `per_call` of them with a
/// per-call price (the totals of retired segments, [`Group`]).
fn build_weighted<'a, 'r>(
    records: impl IntoIterator<Item = (&'r UsageRecord, u64, u64)>,
    period: &str,
    group_by: GroupBy,
    shared: &[SharedCost],
    budget_of: impl Fn(&str) -> Option<Money> + 'a,
) -> Invoices {
    let mut groups: BTreeMap<String, Acc> = BTreeMap::new();
    for (r, requests, per_call) in records {
        if !r.ts.starts_with(period) {
            continue;
        }
        let group = match group_by {
            GroupBy::CostCenter => r.cost_center.clone(),
            GroupBy::Project => r.project.clone(),
            GroupBy::Agent => r.agent.clone(),
        };
        let acc = groups.entry(group).or_default();
        acc.requests += requests;
        let mut add = |category: u8, item: &str, kind: &'static str, qty: u64, amount: Money| {
            if qty == 0 && amount.is_zero() {
                return;
            }
            let e = acc.lines.entry((category, item.to_string(), kind)).or_insert((0, Money::ZERO));
            e.0 += qty;
            e.1 += amount;
        };
        match (&r.tool, &r.model, r.cost) {
            (Some(tool), _, _) => add(1, tool, "", requests, r.cost_total()),
            (None, model, Some(c)) => {
                let model = model.as_deref().unwrap_or("unknown");
                let t = r.tokens;
                add(0, model, "input", t.input, c.input);
                add(0, model, "cached_input", t.cached_input, c.cached_input);
                add(0, model, "cache_write", t.cache_write, c.cache_write);
                add(0, model, "output", t.output, c.output);
                add(0, model, "reasoning", t.reasoning, c.reasoning);
                add(0, model, "per_call", per_call, c.per_call);
            }
            // A record without its buckets (older ledgers): one line for the whole request.
            (None, model, None) => {
                add(0, model.as_deref().unwrap_or("unknown"), "total", requests, r.cost_total())
            }
        }
    }

    // Shared costs, apportioned by request count with the largest remainder.
    let counts: Vec<(String, u64)> = groups.iter().map(|(g, a)| (g.clone(), a.requests)).collect();
    for cost in shared {
        for (group, share) in apportion(cost.amount, &counts) {
            if let Some(acc) = groups.get_mut(&group) {
                let requests = acc.requests;
                acc.lines.insert((2, cost.name.clone(), ""), (requests, share));
            }
        }
    }

    let mut invoices = Vec::with_capacity(groups.len());
    let mut grand = Money::ZERO;
    for (group, acc) in groups {
        let mut inv = Invoice {
            budget: budget_of(&group),
            group,
            requests: acc.requests,
            lines: Vec::with_capacity(acc.lines.len()),
            subtotal_llm: Money::ZERO,
            subtotal_tools: Money::ZERO,
            subtotal_shared: Money::ZERO,
            total: Money::ZERO,
            remaining: None,
        };
        for ((category, item, kind), (quantity, amount)) in acc.lines {
            let (category, unit) = match category {
                0 => {
                    inv.subtotal_llm += amount;
                    (
                        "llm",
                        if kind == "per_call" || kind == "total" { "requests" } else { "tokens" },
                    )
                }
                1 => {
                    inv.subtotal_tools += amount;
                    ("tool", "calls")
                }
                _ => {
                    inv.subtotal_shared += amount;
                    ("shared", "requests")
                }
            };
            inv.lines.push(Line { category, item, kind, quantity, unit, amount });
        }
        inv.total = inv.subtotal_llm + inv.subtotal_tools + inv.subtotal_shared;
        inv.remaining = inv.budget.map(|b| b - inv.total);
        grand += inv.total;
        invoices.push(inv);
    }
    Invoices {
        period: period.to_string(),
        group_by: group_by.as_str(),
        currency: "USD",
        invoices,
        total: grand,
    }
}

/// Splits `amount` over groups in proportion to their counts, exactly: floor shares first, then
/// one nano-USD each to the largest remainders (ties by group order).
pub fn apportion(amount: Money, counts: &[(String, u64)]) -> Vec<(String, Money)> {
    let total: u128 = counts.iter().map(|(_, c)| u128::from(*c)).sum();
    if total == 0 || amount.nanos() <= 0 {
        return counts.iter().map(|(g, _)| (g.clone(), Money::ZERO)).collect();
    }
    let a = amount.nanos() as u128;
    let mut shares: Vec<(usize, u128, u128)> = counts
        .iter()
        .enumerate()
        .map(|(i, (_, c))| {
            let exact = a * u128::from(*c);
            (i, exact / total, exact % total)
        })
        .collect();
    let given: u128 = shares.iter().map(|s| s.1).sum();
    let mut left = a - given;
    let mut order: Vec<usize> = (0..shares.len()).collect();
    order.sort_by(|&x, &y| shares[y].2.cmp(&shares[x].2).then(x.cmp(&y)));
    for i in order {
        if left == 0 {
            break;
        }
        shares[i].1 += 1;
        left -= 1;
    }
    shares
        .into_iter()
        .map(|(i, share, _)| (counts[i].0.clone(), Money::from_nanos(share as i64)))
        .collect()
}

/// Invoices from ledger records (the `usage` ones), with each group's monthly budget from the
/// policy: a monthly budget of the grouped scope, for that key or for every key. Shared costs
/// are monthly and appear on monthly invoices only (not on a day's).
pub fn from_ledger(
    records: &[Stored],
    retired: &[Group],
    period: &str,
    group_by: GroupBy,
    shared: &[SharedCost],
    policy: &tollgate_core::policy::Snapshot,
) -> Invoices {
    use tollgate_core::budget::Scope;
    use tollgate_core::time::Period;
    let scope = match group_by {
        GroupBy::CostCenter => Scope::CostCenter,
        GroupBy::Project => Scope::Project,
        GroupBy::Agent => Scope::Agent,
    };
    fn one(r: &Stored) -> Option<(&UsageRecord, u64, u64)> {
        let r = r.entry.usage()?;
        Some((r, 1, u64::from(r.cost.is_some_and(|c| !c.per_call.is_zero()))))
    }
    let totals: Vec<(UsageRecord, u64, u64)> = retired
        .iter()
        .enumerate()
        .map(|(i, g)| (g.as_record(i), g.requests, g.per_call_requests))
        .collect();
    let usage = totals
        .iter()
        .map(|(r, requests, per_call)| (r, *requests, *per_call))
        .chain(records.iter().filter_map(one));
    // Shared costs are monthly amounts: they are allocated on monthly invoices only.
    let shared = if period.len() == 7 { shared } else { &[] };
    build_weighted(usage, period, group_by, shared, |group| {
        let monthly =
            || policy.all_budgets().filter(|b| b.scope == scope && b.period == Period::Monthly);
        monthly()
            .find(|b| b.key.as_deref() == Some(group))
            .or_else(|| monthly().find(|b| b.key.is_none()))
            .map(|b| b.amount)
    })
}

/// The invoices as CSV (RFC 4180, written by the `csv` crate): one row per line item, then a
/// `total` row per group, and `budget` and `remaining` rows for a group with a monthly budget.
///
/// Names come from requests (a tool's name, an attribution header): one that starts like a
/// spreadsheet formula (`=`, `+`, `-`, `@`, tab, CR) is written with a leading `'`, so that opening
/// the file in a spreadsheet shows the name instead of running it.
pub fn to_csv(invoices: &Invoices) -> String {
    let mut out = csv::Writer::from_writer(Vec::new());
    let (period, by) = (invoices.period.as_str(), invoices.group_by);
    let header = ["period", "group_by", "group", "category", "item", "kind", "quantity", "unit"];
    // Writing to a Vec cannot fail; the rows have the header's width.
    let mut row = |fields: [&str; 9]| out.write_record(fields).expect("CSV into memory");
    row([
        header[0],
        header[1],
        header[2],
        header[3],
        header[4],
        header[5],
        header[6],
        header[7],
        "amount_usd",
    ]);
    for inv in &invoices.invoices {
        let group = inert(&inv.group);
        for l in &inv.lines {
            let (quantity, amount) = (l.quantity.to_string(), l.amount.to_string());
            let item = inert(&l.item);
            row([period, by, &group, l.category, &item, l.kind, &quantity, l.unit, &amount]);
        }
        let (requests, total) = (inv.requests.to_string(), inv.total.to_string());
        row([period, by, &group, "total", "", "", &requests, "requests", &total]);
        if let (Some(budget), Some(remaining)) = (inv.budget, inv.remaining) {
            row([period, by, &group, "budget", "", "", "", "", &budget.to_string()]);
            row([period, by, &group, "remaining", "", "", "", "", &remaining.to_string()]);
        }
    }
    let bytes = out.into_inner().expect("CSV into memory");
    String::from_utf8(bytes).expect("CSV of UTF-8 strings is UTF-8")
}

/// `name`, or `'name` if a spreadsheet would read it as a formula.
fn inert(name: &str) -> std::borrow::Cow<'_, str> {
    if name.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{name}").into()
    } else {
        name.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tollgate_core::pricing::Cost;
    use tollgate_core::record::{Decision, End, UsageSource};
    use tollgate_core::usage::Usage;

    /// A usage record with what an invoice reads.
    fn record(ts: &str, cost_center: &str, cost: Option<Cost>, total: Money) -> UsageRecord {
        UsageRecord {
            ts: ts.into(),
            reserved_at_ms: 0,
            request_id: "req".into(),
            reservation_id: "res".into(),
            agent: String::new(),
            cost_center: cost_center.into(),
            project: String::new(),
            business_unit: None,
            route: "openai".into(),
            provider: "openai".into(),
            model: None,
            tool: None,
            tokens: Usage::default(),
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

    fn usage(i: u64) -> UsageRecord {
        let n = |k: u64| Money::from_nanos(((i * 7919 + k * 104_729) % 1_000_003) as i64);
        let cost = Cost::from_buckets(
            n(1),
            n(2),
            if i % 5 == 0 { n(3) } else { Money::ZERO },
            n(4),
            if i % 3 == 0 { n(5) } else { Money::ZERO },
            Money::ZERO,
        );
        let tool = (i % 11 == 0).then(|| format!("tool-{}", i % 4));
        let total = if tool.is_some() { Money::from_nanos(10_000_000) } else { cost.total };
        let mut r = record(
            &format!("2026-11-{:02}T10:00:00.000Z", 1 + i % 28),
            &format!("CC-{:04}", 1000 + i % 13),
            Some(cost),
            total,
        );
        r.agent = format!("agent-{}", i % 37);
        r.project = format!("PROJ-{:06}", i % 17);
        r.model = Some(["gpt-4o", "claude-sonnet-4-5", "o3"][(i % 3) as usize].into());
        r.tool = tool;
        r.tokens = Usage {
            input: i % 1000,
            cached_input: i % 500,
            cache_write: 1,
            output: i % 300,
            reasoning: i % 3,
        };
        r
    }

    #[test]
    fn line_items_add_up_to_the_totals_exactly_over_100000_records() {
        let records: Vec<UsageRecord> = (0..100_000).map(usage).collect();
        let ledger_total: Money = records.iter().map(UsageRecord::cost_total).sum();
        let shared = [
            SharedCost {
                name: "proxy fleet".into(),
                amount: Money::parse("1234.567890123").unwrap(),
            },
            SharedCost { name: "observability".into(), amount: Money::parse("99.99").unwrap() },
        ];
        for group_by in [GroupBy::CostCenter, GroupBy::Project, GroupBy::Agent] {
            let inv = build(&records, "2026-11", group_by, &shared, |_| None);
            let mut lines_sum = Money::ZERO;
            let mut shared_sum = Money::ZERO;
            let mut requests = 0;
            for i in &inv.invoices {
                let sum: Money = i.lines.iter().map(|l| l.amount).sum();
                assert_eq!(sum, i.total, "{}: lines add up to the total", i.group);
                assert_eq!(i.subtotal_llm + i.subtotal_tools + i.subtotal_shared, i.total);
                lines_sum += sum;
                shared_sum += i.subtotal_shared;
                requests += i.requests;
            }
            assert_eq!(requests, 100_000);
            assert_eq!(lines_sum, inv.total);
            assert_eq!(
                shared_sum,
                shared[0].amount + shared[1].amount,
                "shared costs fully allocated"
            );
            assert_eq!(
                inv.total,
                ledger_total + shared_sum,
                "invoices equal the ledger plus shared costs"
            );
        }
    }

    #[test]
    fn shares_follow_request_counts_and_sum_exactly() {
        let counts = vec![("a".to_string(), 1), ("b".to_string(), 1), ("c".to_string(), 1)];
        let shares = apportion(Money::from_nanos(100), &counts);
        let got: Vec<i64> = shares.iter().map(|(_, m)| m.nanos()).collect();
        assert_eq!(got, vec![34, 33, 33]);
        let counts = vec![("a".to_string(), 3), ("b".to_string(), 1)];
        let shares = apportion(Money::from_usd(12), &counts);
        assert_eq!(shares[0].1, Money::from_usd(9));
        assert_eq!(shares[1].1, Money::from_usd(3));
        assert!(apportion(Money::from_usd(1), &[("a".into(), 0)]).iter().all(|(_, m)| m.is_zero()));
    }

    #[test]
    fn an_invoice_shows_budget_remaining_and_csv_rows() {
        let mut first = record(
            "2026-11-03T00:00:00Z",
            "CC-1234",
            Some(Cost::from_buckets(
                Money::parse("0.0025").unwrap(),
                Money::ZERO,
                Money::ZERO,
                Money::parse("0.002").unwrap(),
                Money::ZERO,
                Money::ZERO,
            )),
            Money::from_nanos(4_500_000),
        );
        first.model = Some("gpt-4o".into());
        first.tokens = Usage { input: 1000, output: 200, ..Usage::default() };
        let records =
            vec![first, record("2026-10-31T23:59:59Z", "CC-1234", None, Money::from_nanos(1))];
        let inv = build(&records, "2026-11", GroupBy::CostCenter, &[], |g| {
            (g == "CC-1234").then(|| Money::from_usd(5000))
        });
        assert_eq!(inv.invoices.len(), 1);
        let i = &inv.invoices[0];
        assert_eq!(i.total, Money::parse("0.0045").unwrap());
        assert_eq!(i.remaining, Some(Money::parse("4999.9955").unwrap()));
        let csv = to_csv(&inv);
        assert_eq!(
            csv,
            "period,group_by,group,category,item,kind,quantity,unit,amount_usd\n\
             2026-11,cost_center,CC-1234,llm,gpt-4o,input,1000,tokens,0.0025\n\
             2026-11,cost_center,CC-1234,llm,gpt-4o,output,200,tokens,0.002\n\
             2026-11,cost_center,CC-1234,total,,,1,requests,0.0045\n\
             2026-11,cost_center,CC-1234,budget,,,,,5000.00\n\
             2026-11,cost_center,CC-1234,remaining,,,,,4999.9955\n"
        );
    }

    #[test]
    fn csv_quotes_separators_and_defuses_formulas() {
        let line = |item: &str| Line {
            category: "tool",
            item: item.to_owned(),
            kind: "",
            quantity: 1,
            unit: "calls",
            amount: Money::ZERO,
        };
        let inv = Invoices {
            period: "2026-11".to_owned(),
            group_by: "agent",
            currency: "USD",
            invoices: vec![Invoice {
                group: "=HYPERLINK(\"http://x\")".to_owned(),
                requests: 3,
                lines: vec![line("a,b"), line("say \"hi\"\nbye"), line("@SUM(A1)")],
                subtotal_llm: Money::ZERO,
                subtotal_tools: Money::ZERO,
                subtotal_shared: Money::ZERO,
                total: Money::ZERO,
                budget: None,
                remaining: None,
            }],
            total: Money::ZERO,
        };
        let csv = to_csv(&inv);
        let mut rows = csv::Reader::from_reader(csv.as_bytes());
        let rows: Vec<csv::StringRecord> = rows.records().map(|r| r.unwrap()).collect();
        assert_eq!(&rows[0][2], "'=HYPERLINK(\"http://x\")");
        assert_eq!(&rows[0][4], "a,b");
        assert_eq!(&rows[1][4], "say \"hi\"\nbye");
        assert_eq!(&rows[2][4], "'@SUM(A1)");
        assert_eq!(&rows[3][3], "total");
    }

    #[test]
    fn records_read_from_the_ledger_invoice_by_bucket_or_as_one_line_without_buckets() {
        let lines = [
            r#"{"seq":1,"event_id":"x-1","type":"reserve","ts":"2026-11-03T00:00:00.000Z","reserved_at_ms":1,"expires_at_ms":2,"request_id":"r","reservation_id":"r","agent":"a","cost_center":"CC-1","project":"p","amount":"9.00","budgets":[]}"#,
            r#"{"seq":2,"event_id":"x-2","type":"usage","ts":"2026-11-03T00:00:00.000Z","reserved_at_ms":1,"request_id":"r","reservation_id":"r","agent":"a","cost_center":"CC-1","project":"p","route":"openai","provider":"openai","model":"gpt-4o","tokens":{"input":10,"cached_input":0,"cache_write":0,"output":2,"reasoning":0},"cost":{"input":"0.25","cached_input":"0.00","cache_write":"0.00","output":"0.50","reasoning":"0.00","per_call":"0.00","total":"0.75"},"cost_usd":"0.75","cost_nano_usd":750000000,"decision":"allow","reason":"default_allow","clause":"defaults.llm","policy_version":"v1","budgets":[],"status":200,"latency_ms":1,"usage_source":"reported","end":"complete"}"#,
            r#"{"type":"usage","ts":"2026-11-04T00:00:00.000Z","reserved_at_ms":1,"request_id":"old","agent":"a","cost_center":"CC-1","project":"p","route":"openai","provider":"openai","model":"gpt-4o","tokens":{"input":1,"cached_input":0,"cache_write":0,"output":1,"reasoning":0},"cost_usd":"0.10","cost_nano_usd":100000000,"decision":"allow","reason":"default_allow","status":200,"latency_ms":1,"usage_source":"reported","end":"client_gone"}"#,
            r#"{"seq":4,"event_id":"x-4","type":"marker"}"#,
        ];
        let stored: Vec<Stored> =
            lines.iter().map(|l| Stored::decode(l.as_bytes()).unwrap()).collect();
        let usage = stored.iter().filter_map(|s| s.entry.usage());
        let inv = build(usage, "2026-11", GroupBy::CostCenter, &[], |_| None);
        let i = &inv.invoices[0];
        assert_eq!((i.requests, i.total), (2, Money::parse("0.85").unwrap()));
        let got: Vec<(&str, u64, Money)> =
            i.lines.iter().map(|l| (l.kind, l.quantity, l.amount)).collect();
        assert_eq!(
            got,
            [
                ("input", 10, Money::parse("0.25").unwrap()),
                ("output", 2, Money::parse("0.50").unwrap()),
                ("total", 1, Money::parse("0.10").unwrap()),
            ]
        );
    }
}
