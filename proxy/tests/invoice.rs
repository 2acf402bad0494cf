//! Invoices from a ledger the running proxy wrote, through the admin API (JSON) and the
//! `tollgate invoice` command (CSV): per cost center, line items by model and token kind plus
//! tool calls and the shared cost, adding up exactly to each group's total; totals equal to the
//! ledger's costs plus the shared cost split by request count to the last nano-dollar; budget
//! and remaining for the group that has a monthly budget.

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
const TOKEN_ENV: &str = "TOLLGATE_INVOICE_TEST_TOKEN";
const TOKEN: &str = "invoice-test-token";
const POLICY: &str = "version: invoice-1\n\
                      defaults: {llm: allow, tool: allow}\n\
                      budgets:\n\
                      \x20 - {id: eng, scope: cost_center, key: CC-1000, period: monthly, amount: \"100.00\"}\n";
const EXTRA: &str = "pricing: {models: {}, tools: {web_search: {per_call: \"0.01\"}}}\n\
                     chargeback: {shared_costs: [{name: proxy-fleet, monthly: \"10.00\"}]}\n";

type HttpClient = Client<HttpConnector, Full<Bytes>>;
/// `x-mock-*` headers steering the mock's usage.
type Steer<'a> = Vec<(&'a str, &'a str)>;

async fn call(
    client: &HttpClient,
    url: String,
    cc: &str,
    steer: &[(&str, &str)],
    body: &Value,
) -> (u16, Bytes) {
    let mut request = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header("x-agent-id", "invoiced")
        .header("x-cost-center", cc)
        .header("x-project-id", "PROJ-ABC123");
    for (k, v) in steer {
        request = request.header(*k, *v);
    }
    let response =
        client.request(request.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await;
    let response = response.expect("proxy answers");
    let status = response.status().as_u16();
    (status, response.into_body().collect().await.expect("body").to_bytes())
}

/// Per group: the sum of `cost_nano_usd` and the number of usage records.
fn ledger_by_cost_center(data_dir: &Path) -> BTreeMap<String, (i64, u64)> {
    let mut out: BTreeMap<String, (i64, u64)> = BTreeMap::new();
    for r in tollgate::ledger::read_all(data_dir).expect("ledger") {
        if r["type"] == "usage" {
            let e = out.entry(r["cost_center"].as_str().unwrap().to_string()).or_default();
            e.0 += r["cost_nano_usd"].as_i64().unwrap();
            e.1 += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoices_add_up_to_the_ledger_and_the_shared_cost_exactly_in_json_and_csv() {
    let mock = MockUpstream::start().await;
    let dir = temp_dir("invoice");
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
    // A 1,500-byte prompt: room for the 1,200 input tokens the mock reports below (a report of
    // more input than the request carries would be billed as implausible).
    let chat = |model: &str| json!({"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "hi ".repeat(500)}]});
    let llm = format!("http://{}/v1/chat/completions", proxy.proxy);
    // CC-1000: three chats (cached input, reasoning, two models) and one tool call; CC-2000:
    // three chats.
    let calls: [(&str, &str, Steer); 6] = [
        (
            "CC-1000",
            "gpt-4o",
            vec![(header::INPUT_TOKENS, "1200"), (header::CACHED_TOKENS, "1000")],
        ),
        ("CC-1000", "o3", vec![(header::OUTPUT_TOKENS, "40"), (header::REASONING_TOKENS, "30")]),
        (
            "CC-1000",
            "gpt-4o-mini",
            vec![(header::INPUT_TOKENS, "333"), (header::OUTPUT_TOKENS, "7")],
        ),
        ("CC-2000", "gpt-4o", vec![(header::INPUT_TOKENS, "17")]),
        ("CC-2000", "gpt-4o", vec![(header::OUTPUT_TOKENS, "3")]),
        ("CC-2000", "gpt-4o-mini", vec![]),
    ];
    for (cc, model, steer) in &calls {
        let (status, body) = call(&client, llm.clone(), cc, steer, &chat(model)).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    let tool = format!("http://{}/tools/search", proxy.proxy);
    let (status, body) = call(&client, tool, "CC-1000", &[], &json!({"q": "x"})).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    // Every record is written before the admin API reads the ledger (fsync window 5 ms).
    let ledger = {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let l = ledger_by_cost_center(&data_dir);
            if l.values().map(|v| v.1).sum::<u64>() == 7 {
                break l;
            }
            assert!(std::time::Instant::now() < deadline, "ledger: {l:?}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    let records = tollgate::ledger::read_all(&data_dir).unwrap();
    let period = records[0]["ts"].as_str().unwrap()[..7].to_string();

    // 10.00 shared over 4 + 3 requests: 5.714285714|28 and 4.285714285|71; the one nano-dollar
    // left goes to the larger remainder.
    let shared = BTreeMap::from([("CC-1000", 5_714_285_714i64), ("CC-2000", 4_285_714_286)]);
    assert_eq!(shared.values().sum::<i64>(), 10_000_000_000);

    let request = hyper::Request::get(format!(
        "http://{}/admin/invoice?period={period}&group_by=cost_center&format=json",
        proxy.admin
    ))
    .header("authorization", format!("Bearer {TOKEN}"))
    .body(Full::new(Bytes::new()))
    .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let json: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let invoices = json["invoices"].as_array().expect("invoices");
    assert_eq!(invoices.len(), 2, "{json:#}");
    let mut grand = 0;
    for inv in invoices {
        let group = inv["group"].as_str().unwrap();
        let (cost, requests) = ledger[group];
        let money = |v: &Value| nanos(v.as_str().unwrap_or_else(|| panic!("amount: {v}")));
        let lines = inv["lines"].as_array().unwrap();
        let sum = |category: &str| -> i64 {
            lines.iter().filter(|l| l["category"] == category).map(|l| money(&l["amount"])).sum()
        };
        let total = money(&inv["total"]);
        assert_eq!(lines.iter().map(|l| money(&l["amount"])).sum::<i64>(), total, "{group}");
        assert_eq!(sum("llm"), money(&inv["subtotal_llm"]), "{group}");
        assert_eq!(sum("tool"), money(&inv["subtotal_tools"]), "{group}");
        assert_eq!(sum("shared"), shared[group], "{group}");
        assert_eq!(sum("llm") + sum("tool"), cost, "{group}: the ledger's costs");
        assert_eq!(total, cost + shared[group], "{group}");
        assert_eq!(inv["requests"], requests);
        grand += total;
        if group == "CC-1000" {
            let tool = lines.iter().find(|l| l["category"] == "tool").expect("a tool line");
            assert_eq!(
                (&tool["item"], &tool["quantity"], &tool["unit"], money(&tool["amount"])),
                (&json!("web_search"), &json!(1), &json!("calls"), 10_000_000)
            );
            let kinds: Vec<(&str, &str)> = lines
                .iter()
                .filter(|l| l["category"] == "llm")
                .map(|l| (l["item"].as_str().unwrap(), l["kind"].as_str().unwrap()))
                .collect();
            for expected in
                [("gpt-4o", "cached_input"), ("o3", "reasoning"), ("gpt-4o-mini", "input")]
            {
                assert!(kinds.contains(&expected), "{expected:?} in {kinds:?}");
            }
            assert_eq!(money(&inv["budget"]), 100_000_000_000);
            assert_eq!(money(&inv["remaining"]), 100_000_000_000 - total);
        } else {
            assert!(inv.get("budget").is_none() && inv.get("remaining").is_none(), "{inv}");
        }
    }
    assert_eq!(nanos(json["total"].as_str().unwrap()), grand);

    proxy.signal("TERM");
    assert_eq!(tokio::task::block_in_place(|| proxy.exit_code()), Some(0));

    // The same invoices from the command line, as CSV.
    let out = command(
        Path::new(BIN),
        &[
            "invoice",
            "--period",
            &period,
            "--group-by",
            "cost_center",
            "--format",
            "csv",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = String::from_utf8(out.stdout).unwrap();
    let mut rows = csv.lines();
    assert_eq!(
        rows.next(),
        Some("period,group_by,group,category,item,kind,quantity,unit,amount_usd")
    );
    let mut items: BTreeMap<String, i64> = BTreeMap::new();
    let mut totals: BTreeMap<String, i64> = BTreeMap::new();
    let mut budget_rows: BTreeMap<(String, String), i64> = BTreeMap::new();
    for row in rows {
        let cells: Vec<&str> = row.split(',').collect();
        assert_eq!(cells.len(), 9, "{row}");
        assert_eq!((cells[0], cells[1]), (period.as_str(), "cost_center"), "{row}");
        let (group, amount) = (cells[2].to_string(), nanos(cells[8]));
        match cells[3] {
            "total" => assert!(totals.insert(group, amount).is_none(), "{row}"),
            "budget" | "remaining" => {
                budget_rows.insert((group, cells[3].to_string()), amount);
            }
            _ => *items.entry(group).or_default() += amount,
        }
    }
    assert_eq!(items, totals, "line items add up to each total:\n{csv}");
    for inv in invoices {
        let group = inv["group"].as_str().unwrap();
        assert_eq!(totals[group], nanos(inv["total"].as_str().unwrap()), "CSV = JSON\n{csv}");
    }
    let total_1000 = totals["CC-1000"];
    assert_eq!(
        budget_rows,
        BTreeMap::from([
            (("CC-1000".into(), "budget".into()), 100_000_000_000),
            (("CC-1000".into(), "remaining".into()), 100_000_000_000 - total_1000),
        ]),
        "budget and remaining of the group with a monthly budget:\n{csv}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
