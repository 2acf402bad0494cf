//! The built filter inside the real Envoy (2 worker threads) in front of the mock upstream,
//! checked through real sockets. Needs `target/envoy-venv/bin/envoy` and the `.wasm` built by
//! `scripts/test`; fails (never skips) with the command to run when either is missing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{Collector, Envoy, PolicyServer, Relay};
use tollgate_core::engine::Engine;
use tollgate_core::inspect;
use tollgate_core::metering::Api;
use tollgate_core::metrics;
use tollgate_core::money::Money;
use tollgate_core::reservation;
use tollgate_core::time::UnixMillis;
use tollgate_core::usage::Usage;
use tollgate_e2e::decisions::{Outcome, Table};
use tollgate_e2e::exposition;
use tollgate_e2e::harness::Harness;
use tollgate_e2e::metering::Corpus;
use tollgate_e2e::mock::{compress, MockUpstream};

const POLICY: &str = r#"{
  "version": "2026-11-22.7",
  "defaults": {"llm": "allow", "tool": "require_approval", "other": "deny"},
  "limits": {"max_cost_per_request": "1.00"},
  "rules": [
    {"id": "no-gpt4-for-tier-4", "match": {"tier": "4", "model": "gpt-4*"}, "effect": "deny",
     "reason": "model_not_allowed_for_tier", "explanation": "Tier 4 agents may not use GPT-4 class models"},
    {"id": "no-opus-for-sales", "match": {"business_unit": "sales", "provider": "anthropic", "model": "claude-opus*"},
     "effect": "require_approval", "reason": "expensive_model"},
    {"id": "budgeted", "match": {"agent": "budget-bot"}, "effect": "allow",
     "budgets": [{"id": "tiny-daily", "scope": "agent", "period": "daily", "amount": "0.05"}]},
    {"id": "capped", "match": {"agent": "capped-bot"}, "effect": "allow",
     "limits": {"max_cost_per_request": "0.001"}},
    {"id": "limited", "match": {"agent": "rpm-bot"}, "effect": "allow", "limits": {"rpm": 2}}
  ]
}"#;

fn plugin(fail: &str, collector: bool) -> String {
    let collector = if collector {
        // The flush interval sets each VM's timer (metrics are handed over on it too).
        r#""collector": {"cluster": "collector", "flush": "100ms"},"#
    } else {
        ""
    };
    format!(r#"{{"filter": {{{collector} "fail": "{fail}"}}, "policy": {POLICY}}}"#)
}

const WHO: [(&str, &str); 3] =
    [("x-agent-id", "bot-1"), ("x-cost-center", "CC-1234"), ("x-project-id", "PROJ-ABC123")];

fn who(agent: &str) -> Vec<(&str, &str)> {
    vec![("x-agent-id", agent), ("x-cost-center", "CC-1234"), ("x-project-id", "PROJ-ABC123")]
}

fn chat(model: &str, max_tokens: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({"model": model, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Say hello."}]}))
    .unwrap()
}

/// A chat request with a 1,650-byte prompt: room for the input counts the mock is told to
/// report (up to 1,234 tokens), which would otherwise be more than the request could use and
/// billed as implausible.
fn padded_chat(model: &str, max_tokens: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({"model": model, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Say hello. ".repeat(150)}]}))
    .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

/// One Envoy for the main scenarios; each step uses its own agent so their budgets and limits
/// do not interfere.
#[test]
fn filter_in_real_envoy() {
    let rt = runtime();
    let mock = rt.block_on(MockUpstream::start());
    let collector = Collector::start();
    let envoy = Envoy::start(&plugin("closed", true), mock.addr().port(), collector.port);

    untagged_request_is_refused_naming_the_header(&envoy, &mock);
    allowed_request_is_metered_in_stats_and_events(&envoy, &mock, &collector);
    budget_is_not_overspent_by_concurrent_requests(&envoy);
    sse_chunks_are_not_held_back(&envoy, &collector);
    openai_stream_is_asked_for_usage_the_client_never_sees(&envoy, &mock, &collector);
    compressed_answers_are_metered_exactly(&envoy, &collector);
    rate_limit_answers_429_with_retry_after(&envoy);
    upstream_statuses_and_free_listings_are_counted_once(&envoy, &mock);
    absurd_usage_is_billed_at_the_reservation(&envoy, &collector);
    let log = envoy.log();
    assert!(!log.contains("panicked"), "the filter panicked:\n{log}");
}

fn untagged_request_is_refused_naming_the_header(envoy: &Envoy, mock: &MockUpstream) {
    let before = mock.request_count();
    let r = envoy.request(
        "POST",
        "/v1/chat/completions",
        &[("x-cost-center", "CC-1234"), ("x-project-id", "PROJ-ABC123")],
        &chat("gpt-4o", 10),
    );
    assert_eq!(r.status, 403);
    let body = r.json();
    assert_eq!(body["error"]["code"], "attribution_rejected");
    assert_eq!(body["error"]["type"], "permission_error");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("x-agent-id"), "{message}");
    assert!(!message.contains("x-cost-center"), "only the bad header is named: {message}");
    assert_eq!(r.header("x-tollgate-decision"), Some("deny"));
    assert_eq!(r.header("x-tollgate-reason"), Some("attribution_rejected"));
    // Anthropic route: Anthropic's error shape.
    let r = envoy.request("POST", "/v1/messages", &[], b"{}");
    assert_eq!((r.status, r.json()["type"].as_str()), (403, Some("error")));
    assert_eq!(mock.request_count(), before, "refused requests never reach the upstream");
}

/// A caller's W3C trace context.
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn allowed_request_is_metered_in_stats_and_events(
    envoy: &Envoy,
    mock: &MockUpstream,
    collector: &Collector,
) {
    let mut headers = WHO.to_vec();
    headers.extend([
        ("x-request-id", "req-allowed-1"),
        ("x-mock-input-tokens", "1234"),
        ("x-mock-output-tokens", "56"),
        ("x-mock-cached-tokens", "200"),
        ("traceparent", TRACEPARENT),
        ("tracestate", "vendor=abc"),
    ]);
    let r = envoy.request("POST", "/v1/chat/completions", &headers, &padded_chat("gpt-4o", 100));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-tollgate-decision"), Some("allow"));
    assert_eq!(r.header("x-tollgate-reason"), Some("default_allow"));
    assert_eq!(r.header("x-tollgate-clause"), Some("defaults.llm"));
    assert_eq!(r.header("x-tollgate-policy-version"), Some("2026-11-22.7"));
    let upstream = mock.requests().into_iter().last().unwrap();
    assert_eq!(upstream.header("x-agent-id"), None, "attribution headers are not forwarded");
    // The filter cannot make spans; it leaves the caller's trace context as it came (the
    // shipped bootstrap runs no tracer of Envoy's own that would replace it).
    assert_eq!(upstream.header("traceparent"), Some(TRACEPARENT));
    assert_eq!(upstream.header("tracestate"), Some("vendor=abc"));

    let usage = Usage { input: 1034, cached_input: 200, output: 56, ..Usage::default() };
    let engine = Engine::from_document(&format!(r#"{{"policy": {POLICY}}}"#)).unwrap();
    let cost = engine.rates().price("gpt-4o", usage).unwrap().cost.total;

    let event = collector.wait_for("req-allowed-1");
    assert_eq!(
        event["tokens"],
        json!({"input": 1034, "cached_input": 200, "cache_write": 0, "output": 56, "reasoning": 0})
    );
    assert_eq!(event["cost_nano_usd"], cost.nanos());
    assert_eq!(event["cost_usd"], cost.to_string());
    assert_eq!(event["agent"], "bot-1");
    assert_eq!(event["usage_source"], "reported");
    assert_eq!(event["end"], "complete");
    assert_eq!(event["source"], "envoy");

    let who = r#"agent="bot-1",project="PROJ-ABC123",cost_center="CC-1234""#;
    let stats = envoy.prometheus();
    for (kind, n) in [("input", 1034), ("cached_input", 200), ("output", 56)] {
        let series = format!("tollgate_tokens_total{{model=\"gpt-4o\",kind=\"{kind}\",{who}}}");
        assert_eq!(support::metric(&stats, &series), n, "{series} in\n{stats}");
    }
    let series = format!("tollgate_cost_nano_usd_total{{model=\"gpt-4o\",{who}}}");
    assert_eq!(support::metric(&stats, &series), cost.nanos() as u64, "{series}");
    let series = r#"tollgate_requests_total{decision="allow",reason="default_allow",model="gpt-4o",status="2xx"}"#;
    assert!(support::metric(&stats, series) >= 1, "{series} in\n{stats}");
    assert!(envoy.wait_metric("tollgate_usage_events_sent_total", 1) >= 1);
}

/// An upstream 429 is counted as an allow with `status="4xx"`, not a plain allow; the model
/// list is free (decided as llm, recorded at $0); each request is counted once.
fn upstream_statuses_and_free_listings_are_counted_once(envoy: &Envoy, mock: &MockUpstream) {
    let mut headers = who("status-bot");
    headers.push(("x-mock-status", "429"));
    let r = envoy.request("POST", "/v1/chat/completions", &headers, &chat("gpt-4o-mini", 10));
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    let limited = r#"tollgate_requests_total{decision="allow",reason="default_allow",model="gpt-4o-mini",status="4xx"}"#;
    assert_eq!(envoy.wait_metric(limited, 1), 1, "{}", envoy.prometheus());

    let before = mock.request_count();
    let r = envoy.request("GET", "/v1/models", &who("status-bot"), b"");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-tollgate-clause"), Some("defaults.llm"));
    assert_eq!(r.json()["object"], "list");
    assert_eq!(mock.request_count(), before + 1);
    let listed = r#"tollgate_requests_total{decision="allow",reason="default_allow",model="-",status="2xx"}"#;
    assert_eq!(envoy.wait_metric(listed, 1), 1, "{}", envoy.prometheus());
    let stats = envoy.prometheus();
    assert!(
        !stats.lines().any(|l| l.starts_with("tollgate_requests_total{") && !l.contains("status=")),
        "every request series has its status:\n{stats}"
    );
}

fn absurd_usage_is_billed_at_the_reservation(envoy: &Envoy, collector: &Collector) {
    // The upstream claims u64::MAX tokens each way: billed at the request's bound (its prompt's
    // bytes plus overhead in, max_tokens out), marked implausible, counted and logged.
    let body = chat("gpt-4o", 100);
    let absurd = u64::MAX.to_string();
    let mut h = who("liar-bot");
    h.extend([
        ("x-request-id", "req-absurd-1"),
        ("x-mock-input-tokens", absurd.as_str()),
        ("x-mock-output-tokens", absurd.as_str()),
    ]);
    let r = envoy.request("POST", "/v1/chat/completions", &h, &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let engine = Engine::from_document(&format!(r#"{{"policy": {POLICY}}}"#)).unwrap();
    let info = inspect::inspect(Some(Api::ChatCompletions), &body).unwrap();
    let bound =
        reservation::bound(Some(Api::ChatCompletions), &info, engine.rates().limits("gpt-4o"));
    let worst = engine.rates().worst_case("gpt-4o", bound.input, bound.output).unwrap();
    let event = collector.wait_for("req-absurd-1");
    assert_eq!(event["usage_source"], "implausible", "{event}");
    assert_eq!(event["cost_nano_usd"], worst.cost.total.nanos(), "{event}");
    assert_eq!(event["tokens"]["output"], 100, "{event}");
    assert!(envoy.wait_metric("tollgate_usage_implausible_total", 1) >= 1);
    assert!(envoy.log().contains("implausible usage report"), "logged");
}

fn budget_is_not_overspent_by_concurrent_requests(envoy: &Envoy) {
    // Every request reserves its worst case and the slow upstream keeps them all in flight, so
    // exactly floor(budget / worst case) fit, whichever worker takes them.
    let body = chat("gpt-4o", 1000);
    let engine = Engine::from_document(&format!(r#"{{"policy": {POLICY}}}"#)).unwrap();
    let info = inspect::inspect(Some(Api::ChatCompletions), &body).unwrap();
    let bound =
        reservation::bound(Some(Api::ChatCompletions), &info, engine.rates().limits("gpt-4o"));
    let worst = engine.rates().worst_case("gpt-4o", bound.input, bound.output).unwrap();
    let budget = Money::parse("0.05").unwrap();
    let fit = budget.nanos() / worst.cost.total.nanos();
    assert!((2..10).contains(&fit), "test setup: {fit} requests fit");
    let n = 16;
    let port = envoy.port;
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut h = who("budget-bot");
                h.push(("x-mock-delay-ms", "700"));
                support::request(port, "POST", "/v1/chat/completions", &h, &body)
            })
        })
        .collect();
    let replies: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = replies.iter().filter(|r| r.status == 200).count() as i64;
    let refused: Vec<_> = replies.iter().filter(|r| r.status == 402).collect();
    assert_eq!(ok, fit, "statuses: {:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    assert_eq!(refused.len() as i64, n - fit);
    let body = refused[0].json();
    assert_eq!(body["error"]["code"], "budget_exceeded");
    assert_eq!(body["error"]["type"], "insufficient_quota");
    assert_eq!(refused[0].header("x-tollgate-clause"), Some("budgeted"));
}

fn sse_chunks_are_not_held_back(envoy: &Envoy, collector: &Collector) {
    let body = serde_json::to_vec(&json!({"model": "gpt-4o-mini", "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Stream please."}]}))
    .unwrap();
    let mut h = WHO.to_vec();
    h.extend([
        ("x-request-id", "req-sse-1"),
        ("x-mock-events", "6"),
        ("x-mock-event-delay-ms", "250"),
    ]);
    let started = Instant::now();
    let (head, mut reader) =
        support::send(envoy.port, "POST", "/v1/chat/completions", &h, &body).unwrap();
    assert_eq!(head.status, 200);
    let mut first = None;
    let all = support::read_body(&head, &mut reader, |_| {
        first.get_or_insert(started.elapsed());
    })
    .unwrap();
    let total = started.elapsed();
    let first = first.unwrap();
    assert!(total >= Duration::from_millis(1250), "the stream took {total:?}");
    assert!(
        first + Duration::from_millis(750) < total,
        "first chunk after {first:?} of {total:?}: the stream was held back"
    );
    assert!(String::from_utf8_lossy(&all).contains("data: [DONE]"));
    let event = collector.wait_for("req-sse-1");
    assert_eq!(event["tokens"]["output"], 6, "{event}");
    assert_eq!(event["usage_source"], "reported");
    assert_eq!(event["model"], "gpt-4o-mini");
}

fn openai_stream_is_asked_for_usage_the_client_never_sees(
    envoy: &Envoy,
    mock: &MockUpstream,
    collector: &Collector,
) {
    let request =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
    let mut h = WHO.to_vec();
    h.extend([("x-request-id", "req-sse-usage"), ("x-mock-events", "5")]);
    let r = envoy.request("POST", "/v1/chat/completions", &h, request.as_bytes());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let upstream = mock.requests().into_iter().last().unwrap();
    assert_eq!(
        std::str::from_utf8(&upstream.body).unwrap(),
        r#"{"stream_options":{"include_usage":true},"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#,
        "the upstream is asked for usage, the rest of the body byte for byte"
    );
    assert_eq!(r.header("content-length"), None);
    let client = String::from_utf8(r.body).unwrap();
    let events: Vec<&str> = client.split("\n\n").filter(|e| !e.trim().is_empty()).collect();
    assert!(events.iter().all(|e| e.starts_with("data: ")), "{client}");
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{client}");
    assert!(!client.contains("prompt_tokens"), "the usage chunk is removed:\n{client}");
    assert!(!client.contains(r#""choices":[]"#), "{client}");
    let content: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(&e[6..]).unwrap()).collect();
    assert!(content.iter().all(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty())));
    let event = collector.wait_for("req-sse-usage");
    assert_eq!(event["usage_source"], "reported", "{event}");
    assert_eq!(event["tokens"]["output"], 5, "{event}");
    assert!(event["tokens"]["input"].as_u64().unwrap() > 0, "{event}");
}

/// gzip and br answers (JSON and SSE) reach the client compressed and are metered from their
/// plain bytes: the same tokens and nano-USD as the plain answer. A coding the meter does not
/// know is estimated and counted.
fn compressed_answers_are_metered_exactly(envoy: &Envoy, collector: &Collector) {
    let stream = serde_json::to_vec(&json!({"model": "claude-sonnet-4-5", "max_tokens": 50,
        "stream": true, "messages": [{"role": "user", "content": "Say hello."}]}))
    .unwrap();
    for (i, (path, body)) in
        [("/v1/chat/completions", chat("gpt-4o", 50)), ("/v1/messages", stream)].iter().enumerate()
    {
        let mut plain: Option<(Value, Value)> = None;
        for coding in ["identity", "gzip", "br"] {
            let id = format!("req-coded-{i}-{coding}");
            let mut h = WHO.to_vec();
            h.extend([("x-request-id", id.as_str()), ("accept-encoding", coding)]);
            let r = envoy.request("POST", path, &h, body);
            assert_eq!(r.status, 200, "{path} {coding}");
            if coding != "identity" {
                assert_eq!(r.header("content-encoding"), Some(coding), "{path}");
                let text = String::from_utf8(compress::decode(coding, &r.body)).unwrap();
                assert!(text.contains("Hello"), "{path} {coding}: {text}");
            }
            let event = collector.wait_for(&id);
            assert_eq!(event["usage_source"], "reported", "{path} {coding}: {event}");
            assert!(event["cost_nano_usd"].as_i64().unwrap() > 0, "{event}");
            let got = (event["tokens"].clone(), event["cost_nano_usd"].clone());
            match &plain {
                None => plain = Some(got),
                Some(want) => assert_eq!(&got, want, "{path} {coding}"),
            }
        }
    }
    let mut h = WHO.to_vec();
    h.extend([("x-request-id", "req-coded-odd"), ("x-mock-content-encoding", "snappy")]);
    let r = envoy.request("POST", "/v1/chat/completions", &h, &chat("gpt-4o", 50));
    assert_eq!(r.status, 200);
    let event = collector.wait_for("req-coded-odd");
    assert_eq!(event["usage_source"], "estimated", "{event}");
    let series = r#"tollgate_meter_decode_aborted_total{reason="unsupported_encoding"}"#;
    assert_eq!(envoy.wait_metric(series, 1), 1, "{}", envoy.prometheus());
}

fn rate_limit_answers_429_with_retry_after(envoy: &Envoy) {
    let statuses: Vec<_> = (0..3)
        .map(|_| envoy.request("POST", "/v1/chat/completions", &who("rpm-bot"), &chat("gpt-4o", 5)))
        .collect();
    assert_eq!(statuses.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 200, 429]);
    let limited = &statuses[2];
    assert_eq!(limited.json()["error"]["code"], "rate_limited_requests");
    let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "retry-after {retry}");
}

/// The shared decision table (`tests/fixtures/decisions.json`) through the filter in Envoy:
/// every case must get the table's status and decision headers, leave the table's usage record
/// (the filter's event, in the ledger of a Tollgate proxy acting as its collector) and change
/// exactly the table's metric series in `/stats/prometheus`, as the sidecar and HTTPS_PROXY mode
/// must in `tests/tests/decisions.rs`. A case's own `host` is a virtual host with a named route
/// to the same upstream, so that its circuit breaker is its own.
#[test]
fn the_filter_decides_the_shared_table_as_the_sidecar_does() {
    const MODE: &str = "envoy";
    let table = Table::load();
    // The families the table compares are the shared definitions': `all` exactly those both
    // engines emit, each mode's own only that engine's.
    let mut both: Vec<&str> = metrics::ALL
        .iter()
        .filter(|m| m.emitter == metrics::Emitter::Both)
        .map(|m| m.name)
        .collect();
    both.sort_unstable();
    // A gauge that follows from a counter is checked against it instead (`metrics_derived`).
    let mut all: Vec<&str> =
        table.compared["all"].iter().chain(table.derived.keys()).map(String::as_str).collect();
    all.sort_unstable();
    assert_eq!(all, both, "metrics_compared.all and metrics_derived are every metric both emit");
    for (mode, emitter) in [
        ("sidecar", metrics::Emitter::Sidecar),
        ("https_proxy", metrics::Emitter::Sidecar),
        ("envoy", metrics::Emitter::Filter),
    ] {
        for name in table.compared.get(mode).into_iter().flatten() {
            let family = ["_count", "_sum", "_bucket"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| metrics::by_name(f).is_some()))
                .unwrap_or(name);
            let m = metrics::by_name(family).unwrap_or_else(|| panic!("{name} is not defined"));
            assert_eq!(m.emitter, emitter, "metrics_compared.{mode}: {name}");
        }
    }

    let rt = runtime();
    let proxy = rt.block_on(Harness::builder().start());
    let admin_port: u16 = proxy.admin.rsplit(':').next().unwrap().parse().unwrap();
    // The MCP route's category, as the sidecar's route has it (`category: read`).
    let plugin = json!({
        "filter": {"fail": "closed", "mcp_category": "read",
            "collector": {"cluster": "collector", "path": "/v1/usage/events", "timeout": "2s",
                "flush": "100ms",
                "headers": {"authorization": format!("Bearer {}", proxy.token)}}},
        "policy": table.policy,
        "pricing": table.pricing,
        "guardrails": table.guardrails,
        "autonomy": table.autonomy,
        "oversight": table.oversight,
    })
    .to_string();
    // A relay in front of the mock records every byte that reaches the upstream, a head
    // whose body never came included.
    let relay = Relay::start(proxy.mock.addr().port(), 0);
    // The table's own hosts: a virtual host each with a named route (the filter's breaker is
    // then the route's), to the same upstream.
    let hosts = table.hosts();
    let own_hosts = |yaml: &str| {
        let (at, indent) = yaml
            .lines()
            .find_map(|l| l.strip_suffix("virtual_hosts:").filter(|i| i.trim().is_empty()))
            .map(|indent| (format!("{indent}virtual_hosts:\n"), indent.to_owned()))
            .expect("the shipped bootstrap's virtual hosts");
        let added: String = hosts
            .iter()
            .map(|h| {
                format!(
                    "{indent}- name: {name}\n{indent}  domains: [\"{host}\"]\n{indent}  routes:\n\
                     {indent}  - name: {name}\n{indent}    match: {{prefix: \"/\"}}\n\
                     {indent}    route: {{cluster: upstream, timeout: 0s}}\n",
                    name = h.name,
                    host = h.host
                )
            })
            .collect();
        yaml.replacen(&at, &format!("{at}{added}"), 1)
    };
    let envoy =
        Envoy::start_edited(&plugin, relay.port, admin_port, support::free_port(), own_hosts);
    let scrape = || {
        let text = support::tollgate_families(&envoy.prometheus());
        exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    };
    let mesh = || -> Vec<Value> {
        rt.block_on(proxy.ledger()).into_iter().filter(|r| r["source"] == "envoy").collect()
    };
    let mut failures = Vec::new();
    let compared = table.compared(MODE);
    let tollgate_series = || -> Vec<exposition::Sample> {
        scrape().samples.into_iter().filter(|s| compared.contains(&s.name.as_str())).collect()
    };
    for case in &table.cases {
        // A repeated case's earlier sends, each followed by scrapes until two a few ticks apart
        // are the same: its outcome (a breaker's failure, an agent's error) is reported in its
        // log phase, where it is counted, and what they counted is not the last send's.
        std::thread::sleep(case.wait_for_window());
        for sent in case.earlier_headers(MODE) {
            let sent = case.with_host(sent);
            let headers: Vec<(&str, &str)> =
                sent.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            envoy.request("POST", &case.path, &headers, &case.body);
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut last = tollgate_series();
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let now = tollgate_series();
                if now == last || Instant::now() > deadline {
                    break;
                }
                last = now;
            }
        }
        let before = scrape();
        let sent = case.with_host(case.sent_headers(MODE));
        let headers: Vec<(&str, &str)> =
            sent.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let r = envoy.request("POST", &case.path, &headers, &case.body);
        let got = Outcome::of(r.status, |n| r.header(n));
        if got != case.expect {
            failures.push(format!(
                "{}: got {got:?}, want {:?}: {}",
                case.name,
                case.expect,
                String::from_utf8_lossy(&r.body)
            ));
        }
        failures.extend(case.check_retry_after(r.header("retry-after")));
        let id = case.request_id(MODE);
        if r.header("x-request-id") != Some(id.as_str()) {
            failures.push(format!(
                "{}: answered with x-request-id {:?}, want {id}",
                case.name,
                r.header("x-request-id")
            ));
        }
        // Envoy hands the counters over on its tick and the event reaches the collector on
        // the next flush: wait until both match or time is up, and until they still match
        // after another tick (so that nothing the case changes is left for the next one).
        let deadline = Instant::now() + Duration::from_secs(10);
        let check = || {
            let mut found = case.check_ledger(MODE, &mesh());
            let after = scrape();
            found.extend(case.check_metrics(&table, MODE, &before, &after));
            found.extend(
                table
                    .check_derived(MODE, &after)
                    .into_iter()
                    .map(|f| format!("{}: {f}", case.name)),
            );
            let raw = relay.sent.lock().unwrap().clone();
            found.extend(case.check_upstream(MODE, &proxy.mock.requests(), &raw));
            found
        };
        let found = loop {
            let mut found = check();
            if found.is_empty() {
                std::thread::sleep(Duration::from_millis(250));
                found = check();
            }
            if found.is_empty() || Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        failures.extend(found);
    }
    // A record that came late is still one too many (or wrong).
    let records = mesh();
    for case in &table.cases {
        let late = case.check_ledger(MODE, &records);
        failures.extend(late.into_iter().map(|f| format!("at the end: {f}")));
    }
    assert!(table.cases.len() >= 10, "the table has its cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(!envoy.log().contains("panicked"));
}

/// The Tollgate proxy as the mesh's usage collector: the filter posts its events to the proxy's
/// `POST /v1/usage/events` (bearer token from `collector.headers`), the proxy writes them to its
/// ledger, and its invoice shows the tokens and cost of the requests that went through Envoy.
/// The first answer is lost on the way back (a relay swallows it), so the filter sends that
/// batch again: it is billed once. Replaying a batch by hand is billed once too.
#[test]
fn usage_events_reach_the_tollgate_proxy_ledger_and_invoice_once() {
    let rt = runtime();
    let proxy = rt.block_on(Harness::builder().start());
    let admin_port: u16 = proxy.admin.rsplit(':').next().unwrap().parse().unwrap();
    let relay = Relay::start(admin_port, 1);
    let plugin = format!(
        r#"{{"filter": {{"collector": {{"cluster": "collector", "flush": "100ms",
            "path": "/v1/usage/events", "timeout": "2s",
            "headers": {{"authorization": "Bearer {}"}}}}}}, "policy": {POLICY}}}"#,
        proxy.token
    );
    let envoy = Envoy::start(&plugin, proxy.mock.addr().port(), relay.port);

    let engine = Engine::from_document(&format!(r#"{{"policy": {POLICY}}}"#)).unwrap();
    let mut expected = Money::ZERO;
    let sent = [("mesh-1", 1200, 300, 40), ("mesh-2", 800, 0, 25), ("mesh-3", 50, 0, 7)];
    for (id, input, cached, output) in sent {
        let (input, cached, output) = (input.to_string(), cached.to_string(), output.to_string());
        let mut h = who("mesh-bot");
        h.extend([
            ("x-request-id", id),
            ("x-mock-input-tokens", input.as_str()),
            ("x-mock-cached-tokens", cached.as_str()),
            ("x-mock-output-tokens", output.as_str()),
        ]);
        let r = envoy.request("POST", "/v1/chat/completions", &h, &padded_chat("gpt-4o", 100));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let usage = Usage {
            input: input.parse::<u64>().unwrap() - cached.parse::<u64>().unwrap(),
            cached_input: cached.parse().unwrap(),
            output: output.parse().unwrap(),
            ..Usage::default()
        };
        expected += engine.rates().price("gpt-4o", usage).unwrap().cost.total;
    }

    let mesh_records = || -> Vec<Value> {
        rt.block_on(proxy.ledger()).into_iter().filter(|r| r["source"] == "envoy").collect()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while mesh_records().len() < sent.len() || envoy.metric("tollgate_usage_events_sent_total") < 3
    {
        assert!(Instant::now() < deadline, "events missing: {:?}", mesh_records());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(relay.dropped.load(std::sync::atomic::Ordering::SeqCst) >= 1, "an answer was lost");
    assert!(envoy.metric("tollgate_usage_events_failed_total") >= 1, "and the batch was resent");
    let records = mesh_records();
    let mut ids: Vec<&str> = records.iter().map(|r| r["request_id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["mesh-1", "mesh-2", "mesh-3"], "each request billed once: {records:?}");
    let mesh1 = records.iter().find(|r| r["request_id"] == "mesh-1").unwrap();
    assert_eq!(
        mesh1["tokens"],
        json!({"input": 900, "cached_input": 300, "cache_write": 0, "output": 40, "reasoning": 0})
    );
    assert_eq!(
        (mesh1["agent"].as_str(), mesh1["type"].as_str()),
        (Some("mesh-bot"), Some("usage"))
    );

    // The proxy's invoice for the agent: exactly what the filter metered, to the nano-dollar.
    let period = &UnixMillis(now_ms()).to_string()[..7];
    let invoice = |rt: &tokio::runtime::Runtime| {
        let path = format!("/admin/invoice?period={period}&group_by=agent&format=json");
        let reply = rt.block_on(proxy.admin_get(&path, true));
        assert_eq!(reply.status, 200, "{}", reply.text());
        let all = reply.json();
        all["invoices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["group"] == "mesh-bot")
            .cloned()
            .unwrap()
    };
    let before = invoice(&rt);
    assert_eq!(before["requests"], 3);
    assert_eq!(Money::parse(before["total"].as_str().unwrap()).unwrap(), expected, "{before}");
    let line = |inv: &Value, kind: &str| {
        inv["lines"].as_array().unwrap().iter().find(|l| l["kind"] == kind).unwrap()["quantity"]
            .clone()
    };
    assert_eq!(
        (line(&before, "input"), line(&before, "cached_input"), line(&before, "output")),
        (json!(1200 - 300 + 800 + 50), json!(300), json!(40 + 25 + 7))
    );

    // A batch sent again by hand, as the filter would after a timeout: all duplicates.
    let batch = relay.sent.lock().unwrap()[0].clone();
    let at = batch.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let body = &batch[at..];
    let auth = format!("Bearer {}", proxy.token);
    let r =
        support::request(admin_port, "POST", "/v1/usage/events", &[("authorization", &auth)], body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let answer = r.json();
    assert_eq!(answer["accepted"], 0, "{answer}");
    assert!(answer["duplicates"].as_u64().unwrap() >= 1, "{answer}");
    assert_eq!(invoice(&rt)["total"], before["total"], "a resent batch is not billed twice");
    assert_eq!(mesh_records().len(), 3);
    let r = support::request(admin_port, "POST", "/v1/usage/events", &[], body);
    assert_eq!(r.status, 401, "the endpoint needs the admin token");
    assert!(!envoy.log().contains("panicked"));
}

/// The metering corpus (`tests/fixtures/metering.json`) through Envoy with the filter, the
/// Tollgate proxy collecting its usage events: each case's record in the proxy's ledger must be
/// the corpus's, as the sidecar's and HTTPS_PROXY mode's must (`tests/tests/metering_corpus.rs`).
#[test]
fn the_filter_meters_the_corpus_as_the_sidecar_does() {
    let corpus = Corpus::load("envoy");
    let rt = runtime();
    let proxy = rt.block_on(Harness::builder().start());
    let admin_port: u16 = proxy.admin.rsplit(':').next().unwrap().parse().unwrap();
    let plugin = json!({
        "filter": {"collector": {"cluster": "collector", "flush": "100ms",
            "path": "/v1/usage/events", "timeout": "2s",
            "headers": {"authorization": format!("Bearer {}", proxy.token)}}},
        "policy": {"version": "corpus", "defaults": {"llm": "allow"}},
        "pricing": corpus.pricing,
    })
    .to_string();
    let envoy = Envoy::start(&plugin, proxy.mock.addr().port(), admin_port);
    let mut statuses = Vec::new();
    for case in &corpus.cases {
        let headers: Vec<(&str, &str)> =
            case.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let (head, mut reader) =
            support::send(envoy.port, "POST", &case.path, &headers, &case.body).unwrap();
        let read = support::read_body(&head, &mut reader, |_| {});
        assert!(read.is_ok() || case.cut, "{}: {read:?}", case.name);
        statuses.push(head.status);
    }
    let mesh = || -> Vec<Value> {
        rt.block_on(proxy.ledger()).into_iter().filter(|r| r["source"] == "envoy").collect()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while mesh().len() < corpus.cases.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let failures = corpus.check(&statuses, &mesh());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(!envoy.log().contains("panicked"));
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A configuration that does not compile is reported (log and metric) and each request follows
/// the configured fail policy: closed → 503 in the provider's shape, open → passed through.
#[test]
fn bad_plugin_configuration_follows_the_fail_policy() {
    let rt = runtime();
    let mock = rt.block_on(MockUpstream::start());
    let bad = |fail: &str| {
        format!(
            r#"{{"filter": {{"fail": "{fail}"}}, "policy": {{"version": "v1", "defaults": {{"llm": "perhaps"}}}},
                "oversight": {{"loops": {{}}, "use_within": "1h"}}}}"#
        )
    };
    let closed = Envoy::start(&bad("closed"), mock.addr().port(), support::free_port());
    let open = Envoy::start(&bad("open"), mock.addr().port(), support::free_port());
    for envoy in [&closed, &open] {
        let log = envoy.log();
        assert!(
            log.contains("invalid plugin configuration") && log.contains("policy.defaults.llm"),
            "the error and its path are logged:\n{log}"
        );
        // An oversight guard the filter cannot run is refused naming it, never ignored.
        assert!(log.contains("cannot honour `oversight.use_within`"), "{log}");
        assert!(envoy.metric("tollgate_config_errors_total") >= 1);
    }
    let r = closed.request("POST", "/v1/chat/completions", &WHO, &chat("gpt-4o", 5));
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "filter_misconfigured");
    let before = mock.request_count();
    let r = open.request("POST", "/v1/chat/completions", &WHO, &chat("gpt-4o", 5));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-tollgate-decision"), Some("bypass"));
    assert_eq!(mock.request_count(), before + 1);
    assert_eq!(open.wait_metric("tollgate_fail_open_total", 1), 1, "flushed on the next tick");
}

/// `filter.policy_url`: every VM polls the policy source on its own timer with `If-None-Match`;
/// a good document replaces the policy in force, a bad one is reported and the last good one
/// keeps deciding.
#[test]
fn policy_refresh_from_a_url_keeps_the_last_good_snapshot() {
    const V1: &str = "version: v1\ndefaults: {llm: allow, tool: deny, other: deny}\n";
    const V2: &str = "version: v2\ndefaults: {llm: allow, tool: deny, other: deny}\nrules:\n\
        - {id: retire-gpt-4o, match: {model: gpt-4o}, effect: deny, reason: model_retired}\n";
    const V3: &str = "version: v3\ndefaults: {llm: perhaps}\n";
    let rt = runtime();
    let mock = rt.block_on(MockUpstream::start());
    let server = PolicyServer::start("\"v1\"", V1);
    let plugin = format!(
        r#"{{"filter": {{"tick": "100ms", "policy_url": {{"cluster": "policy",
            "authority": "policy.local", "path": "/policy.yaml", "interval": "200ms"}}}},
           "policy": {POLICY}}}"#
    );
    let envoy = Envoy::start_with(&plugin, mock.addr().port(), support::free_port(), server.port);
    // Connections are spread over both workers: several requests in a row must agree.
    let all_decide = |version: &str, status: u16| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut in_a_row = 0;
        while in_a_row < 8 {
            let r = envoy.request("POST", "/v1/chat/completions", &WHO, &chat("gpt-4o", 5));
            let got = (r.status, r.header("x-tollgate-policy-version").map(str::to_owned));
            if got == (status, Some(version.to_owned())) {
                in_a_row += 1;
            } else {
                in_a_row = 0;
                assert!(Instant::now() < deadline, "still {got:?}, want {version} {status}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    all_decide("v1", 200);
    server.serve("\"v2\"", V2);
    all_decide("v2", 403);
    let r = envoy.request("POST", "/v1/chat/completions", &WHO, &chat("gpt-4o", 5));
    assert_eq!(r.header("x-tollgate-reason"), Some("model_retired"));
    assert!(
        envoy.wait_metric("tollgate_policy_reloads_total", 4) >= 4,
        "v1 and v2 in both workers"
    );

    server.serve("\"v3\"", V3);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.served("\"v3\"") < 3 || envoy.metric("tollgate_policy_reload_failures_total") < 3 {
        assert!(Instant::now() < deadline, "v3 was not fetched by every VM: {:?}", server.log);
        std::thread::sleep(Duration::from_millis(50));
    }
    all_decide("v2", 403);
    let log = envoy.log();
    assert!(log.contains("keeping version v2") && log.contains("defaults.llm"), "{log}");
    // Each VM sends the ETag it last saw; an unchanged document is not sent again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.log.lock().unwrap().iter().any(|(_, status, _)| *status == 304) {
        assert!(Instant::now() < deadline, "no revalidation: {:?}", server.log);
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = server.log.lock().unwrap().clone();
    assert!(seen.iter().any(|(sent, _, _)| sent.as_deref() == Some("\"v1\"")), "{seen:?}");
    assert!(seen.iter().any(|(sent, status, etag)| *status == 304 && sent.as_ref() == Some(etag)));
    assert!(seen
        .iter()
        .all(|(sent, status, etag)| (*status == 304) == (sent.as_ref() == Some(etag))));
    assert!(!log.contains("panicked"), "the filter panicked:\n{log}");
}

/// The sidecar's `/metrics` and Envoy's `/stats/prometheus` after the same requests (the model
/// `gpt-4.1` among them): every metric both engines emit ([`metrics::Emitter::Both`]) has the
/// same series in both, same names, label names and values (verbatim: `model="gpt-4.1"`, not
/// `gpt-4_1`) and counts; each engine's Tollgate families are the ones the shared definitions
/// give it; and `promtool check metrics` accepts both scrapes (Envoy prints no `# HELP` for any
/// stat, its own included, so that one finding is allowed on Envoy's side only).
#[test]
fn the_filter_exports_the_sidecars_metrics() {
    let policy = json!({
        "version": "parity-1",
        "defaults": {"llm": "allow", "tool": "allow", "other": "deny"},
        "rules": [
            {"id": "no-o1", "match": {"model": "o1"}, "effect": "deny", "reason": "banned_model"},
            {"id": "budgeted", "match": {"agent": "budget-bot"}, "effect": "allow",
             "budgets": [{"id": "agent.daily", "scope": "agent", "period": "daily", "amount": "0.01"}]}
        ]
    });
    let rt = runtime();
    let sidecar = rt.block_on(Harness::builder().policy(&policy.to_string()).start());
    let plugin = json!({"filter": {"fail": "closed", "tick": "100ms"}, "policy": policy});
    let envoy = Envoy::start(&plugin.to_string(), sidecar.mock.addr().port(), support::free_port());

    let tokens = |input: &'static str, output: &'static str| {
        vec![("x-mock-input-tokens", input), ("x-mock-output-tokens", output)]
    };
    let with = |mut a: Vec<(&'static str, &'static str)>, b: Vec<(&'static str, &'static str)>| {
        a.extend(b);
        a
    };
    let who = |agent: &'static str| {
        vec![("x-agent-id", agent), ("x-cost-center", "CC-1234"), ("x-project-id", "PROJ-ABC123")]
    };
    type Sent = (&'static str, &'static str, Vec<(&'static str, &'static str)>, Vec<u8>, u16);
    let sent: Vec<Sent> = vec![
        (
            "POST",
            "/v1/chat/completions",
            with(who("metered-bot"), tokens("1000", "40")),
            padded_chat("gpt-4.1", 100),
            200,
        ),
        (
            "POST",
            "/v1/chat/completions",
            with(who("metered-bot"), tokens("1200", "60")),
            padded_chat("gpt-4.1", 100),
            200,
        ),
        (
            "POST",
            "/v1/chat/completions",
            with(who("parity-bot"), vec![("x-mock-status", "429")]),
            chat("gpt-4.1", 10),
            429,
        ),
        (
            "POST",
            "/v1/chat/completions",
            vec![("x-cost-center", "CC-1234")],
            chat("gpt-4.1", 10),
            403,
        ),
        ("POST", "/v1/chat/completions", who("parity-bot"), chat("o1", 10), 403),
        ("POST", "/v1/chat/completions", who("parity-bot"), chat("my-finetune", 10), 403),
        (
            "POST",
            "/v1/chat/completions",
            with(who("budget-bot"), tokens("5", "1000")),
            chat("gpt-4.1", 1000),
            200,
        ),
        ("GET", "/v1/models", who("parity-bot"), Vec::new(), 200),
        // Answered by a model the rate card does not list; usage beyond the request's bound;
        // a body in an encoding the meter cannot decode.
        (
            "POST",
            "/v1/chat/completions",
            with(with(who("parity-bot"), tokens("5", "5")), vec![("x-mock-model", "mystery-7")]),
            chat("gpt-4.1", 10),
            200,
        ),
        (
            "POST",
            "/v1/chat/completions",
            with(who("parity-bot"), tokens("5", "100000000")),
            chat("gpt-4.1", 10),
            200,
        ),
        (
            "POST",
            "/v1/chat/completions",
            with(who("parity-bot"), vec![("x-mock-content-encoding", "snappy")]),
            chat("gpt-4.1", 10),
            200,
        ),
        // Malformed (`model` twice): no model, in both.
        (
            "POST",
            "/v1/chat/completions",
            who("parity-bot"),
            br#"{"model": "gpt-4.1", "model": "o1", "messages": []}"#.to_vec(),
            400,
        ),
    ];
    for (method, path, headers, body, status) in &sent {
        let r = envoy.request(method, path, headers, body);
        assert_eq!(r.status, *status, "Envoy {path}: {}", String::from_utf8_lossy(&r.body));
        let owned: Vec<(String, String)> =
            headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        let method = method.parse().unwrap();
        let reply = rt.block_on(async {
            let response = sidecar.send(method, path, &owned, body.clone()).await;
            tollgate_e2e::harness::read(response).await
        });
        assert_eq!(reply.status.as_u16(), *status, "sidecar {path}: {}", reply.text());
    }

    // Envoy hands increments over on its tick: wait until every request is counted.
    let requests = |text: &str| -> f64 {
        exposition::parse(text).unwrap().series(metrics::REQUESTS.name).map(|s| s.value).sum()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while requests(&envoy.prometheus()) < sent.len() as f64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    let envoy_text = support::tollgate_families(&envoy.prometheus());
    let sidecar_text = rt.block_on(sidecar.metrics());
    let on_envoy = exposition::parse(&envoy_text).unwrap_or_else(|e| panic!("{e}\n{envoy_text}"));
    let on_sidecar = exposition::parse(&sidecar_text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(requests(&envoy_text), sent.len() as f64, "{envoy_text}");
    assert_eq!(requests(&sidecar_text), sent.len() as f64, "{sidecar_text}");

    // The same series, labels and counts for every metric both emit (a series at 0 is one the
    // sidecar declares up front: not a difference).
    type Series = BTreeMap<(String, Vec<(String, String)>), f64>;
    let series = |e: &exposition::Exposition, m: &metrics::Metric| -> Series {
        e.series(m.name)
            .filter(|s| s.value != 0.0)
            .map(|s| {
                let labels: Vec<_> = s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                ((s.name.clone(), labels), s.value)
            })
            .collect()
    };
    let mut differences = Vec::new();
    for m in metrics::ALL.iter().filter(|m| m.emitter == metrics::Emitter::Both) {
        let (a, b) = (series(&on_sidecar, m), series(&on_envoy, m));
        if a != b {
            differences.push(format!("{}:\n  sidecar {a:?}\n  envoy   {b:?}", m.name));
        }
        for ((_, labels), _) in a.iter().chain(&b) {
            let names: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
            let mut expected = m.labels.to_vec();
            expected.sort_unstable();
            assert_eq!(names, expected, "{} carries exactly its labels", m.name);
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));

    // What the requests above must have produced, in both.
    let model = |m: &str| ("model", m.to_owned());
    let has = |e: &exposition::Exposition, name: &str, labels: &[(&str, String)]| {
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        e.value(name, &labels).unwrap_or(0.0)
    };
    for (engine, e) in [("sidecar", &on_sidecar), ("envoy", &on_envoy)] {
        let allowed =
            [("decision", "allow".to_owned()), model("gpt-4.1"), ("status", "2xx".into())];
        assert_eq!(has(e, "tollgate_requests_total", &allowed), 6.0, "{engine}");
        let limited = [model("gpt-4.1"), ("status", "4xx".into())];
        assert_eq!(has(e, "tollgate_requests_total", &limited), 1.0, "{engine}");
        let banned = [("reason", "banned_model".to_owned()), model("o1")];
        assert_eq!(has(e, "tollgate_requests_total", &banned), 1.0, "{engine}");
        let unknown = [("reason", "unknown_model".to_owned()), model("my-finetune")];
        assert_eq!(has(e, "tollgate_requests_total", &unknown), 1.0, "{engine}");
        let untagged = [("reason", "attribution_rejected".to_owned()), model("-")];
        assert_eq!(has(e, "tollgate_requests_total", &untagged), 1.0, "{engine}");
        let unlisted = [("price_source", "requested_model".to_owned())];
        assert_eq!(has(e, "tollgate_unlisted_model_responses_total", &unlisted), 1.0, "{engine}");
        assert_eq!(has(e, "tollgate_usage_implausible_total", &[]), 1.0, "{engine}");
        let aborted = [("reason", "unsupported_encoding".to_owned())];
        assert_eq!(has(e, "tollgate_meter_decode_aborted_total", &aborted), 1.0, "{engine}");
        let malformed = [("reason", "malformed_body".to_owned()), model("-")];
        assert_eq!(has(e, "tollgate_requests_total", &malformed), 1.0, "{engine}");
        let listed = [model("-"), ("status", "2xx".into())];
        assert_eq!(has(e, "tollgate_requests_total", &listed), 1.0, "{engine}");
        let output = [model("gpt-4.1"), ("kind", "output".into()), ("agent", "metered-bot".into())];
        assert_eq!(has(e, "tollgate_tokens_total", &output), 100.0, "{engine}");
        assert!(has(e, "tollgate_cost_nano_usd_total", &[model("gpt-4.1")]) > 0.0, "{engine}");
        let warned = [("budget", "agent.daily".to_owned()), ("threshold", "80".into())];
        assert_eq!(has(e, "tollgate_budget_warnings_total", &warned), 1.0, "{engine}");
        let text = if engine == "envoy" { &envoy_text } else { &sidecar_text };
        assert!(!text.contains("gpt-4_1"), "{engine} mangled the model name:\n{text}");
    }

    // Each engine's Tollgate families are the shared definitions' (a family shows once it has
    // a series: Envoy's once the filter defined one, the sidecar's labelled ones once used).
    for (engine, e, emits) in [
        ("Envoy", &on_envoy, metrics::Emitter::filter as fn(metrics::Emitter) -> bool),
        ("the sidecar", &on_sidecar, metrics::Emitter::sidecar),
    ] {
        for (family, kind) in e.types.iter().filter(|(f, _)| f.starts_with("tollgate_")) {
            let m = metrics::by_name(family).unwrap_or_else(|| panic!("{family} is not defined"));
            assert!(emits(m.emitter), "{engine} exports {family}, defined as {:?}", m.emitter);
            assert_eq!(kind, m.kind.as_str(), "{engine}: {family}");
        }
    }

    // promtool: the sidecar's whole scrape passes; Envoy's Tollgate families pass but for the
    // HELP text Envoy never prints.
    let (ok, findings) = support::promtool(&sidecar_text);
    assert!(ok && findings.is_empty(), "promtool on the sidecar's /metrics: {findings:#?}");
    let (_, findings) = support::promtool(&envoy_text);
    let unexpected: Vec<&String> = findings
        .iter()
        .filter(|f| {
            let help = f.strip_suffix(" no help text").and_then(metrics::by_name);
            help.is_none()
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "promtool on Envoy's /stats/prometheus: {unexpected:#?}\n{envoy_text}"
    );
    // It did read them: one such finding per family.
    assert_eq!(findings.len(), on_envoy.types.len(), "{findings:#?}");
    assert!(on_envoy.types.len() >= 7, "{envoy_text}");
    assert!(!envoy.log().contains("panicked"));
}

/// The oversight sections both run: autonomy modes per agent and action with an autonomy
/// budget, and the loop detector.
const OVERSEEN_POLICY: &str = r#"{"version": "2026-12-03.oversight",
  "defaults": {"llm": "allow", "tool": "allow", "other": "deny"}}"#;
const AUTONOMY: &str = r#"{"default": "AUTO_EXECUTE",
  "accounts": {"off-bot": {"default": "DISABLED"},
               "shy-bot": {"actions": {"search_web": "PROPOSE_ONLY"}},
               "quiet-bot": {"actions": {"mcp": "DISABLED"}}},
  "budgets": {"accounts": {"thrifty-bot": {"per_day": 1}}}}"#;
const OVERSIGHT: &str = r#"{"loops": {"max_repeats": 2, "window": "60s"}}"#;

/// What an answer is compared by: status, error code and the decision headers.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    code: Option<String>,
    headers: Vec<(&'static str, Option<String>)>,
}

const COMPARED: [&str; 4] =
    ["x-tollgate-decision", "x-tollgate-reason", "x-tollgate-clause", "x-tollgate-policy-version"];

/// Autonomy `DISABLED` (for an agent, and for an action named after the route: an MCP request
/// that calls no tool) and `PROPOSE_ONLY`, an autonomy budget used up and a tool call looping get
/// the sidecar's answers from the filter in Envoy for the same configuration: the same status,
/// error code and decision headers, and `retry-after` for the loop (to the second: the two are
/// asked a moment apart). Where the sidecar records an approval (the budget used up), the filter
/// without the collector's approval service refuses alike but names no approval.
#[test]
fn oversight_in_envoy_answers_as_the_sidecar_does() {
    let rt = runtime();
    let sections = format!("autonomy: {AUTONOMY}\noversight: {OVERSIGHT}\n");
    let sidecar = rt.block_on(
        Harness::builder()
            .policy(OVERSEEN_POLICY)
            .extra(&sections)
            .route(r#"{name: mcp, path_prefix: /mcp, kind: mcp, upstream: "{upstream}"}"#)
            .start(),
    );
    let collector = Collector::start();
    let plugin = format!(
        r#"{{"filter": {{"fail": "closed"}}, "policy": {OVERSEEN_POLICY},
            "autonomy": {AUTONOMY}, "oversight": {OVERSIGHT}}}"#
    );
    // Envoy's route carries the sidecar route's name (`xds.route_name`): the action of an MCP
    // request that calls no tool (`tools/list`) is `mcp` in both.
    let named = |yaml: &str| {
        let route = r#"- match: {prefix: "/"}"#;
        assert!(yaml.contains(route), "the shipped bootstrap's route");
        yaml.replace(route, &format!("- name: mcp\n{}match: {{prefix: \"/\"}}", " ".repeat(16)))
    };
    let (upstream, policy) = (sidecar.mock.addr().port(), support::free_port());
    let envoy = Envoy::start_edited(&plugin, upstream, collector.port, policy, named);
    let tool = |name: &str, args: Value| {
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": name, "arguments": args}})
    };
    let chat = json!({"model": "gpt-4o", "max_tokens": 5, "messages": []});
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let steps: Vec<(&str, &str, &str, Value)> = vec![
        ("autonomy DISABLED", "off-bot", "/v1/chat/completions", chat.clone()),
        ("PROPOSE_ONLY", "shy-bot", "/mcp", tool("search_web", json!({"q": "x"}))),
        ("another action of that agent", "shy-bot", "/v1/chat/completions", chat.clone()),
        ("the day's one autonomous action", "thrifty-bot", "/v1/chat/completions", chat.clone()),
        ("its autonomy budget used up", "thrifty-bot", "/v1/chat/completions", chat.clone()),
        ("a tool call", "loop-bot", "/mcp", tool("search_web", json!({"q": "same"}))),
        ("the same again", "loop-bot", "/mcp", tool("search_web", json!({"q": "same"}))),
        ("a third time: a loop", "loop-bot", "/mcp", tool("search_web", json!({"q": "same"}))),
        ("other arguments", "loop-bot", "/mcp", tool("search_web", json!({"q": "other"}))),
        ("a route the agent may not use", "quiet-bot", "/mcp", list.clone()),
        ("a model call of that agent", "quiet-bot", "/v1/chat/completions", chat.clone()),
    ];
    let mut answers = Vec::new();
    for (name, agent, path, body) in &steps {
        let tags = who(agent);
        let owned: Vec<(String, String)> =
            tags.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
        let s = rt.block_on(sidecar.post(path, &owned, body));
        let e = envoy.request("POST", path, &tags, &serde_json::to_vec(body).unwrap());
        let code = |v: Value| v["error"]["code"].as_str().map(str::to_owned);
        let sidecar_answer = Answer {
            status: s.status.as_u16(),
            code: (s.status.as_u16() != 200).then(|| code(s.json())).flatten(),
            headers: COMPARED.iter().map(|h| (*h, s.header(h).map(str::to_owned))).collect(),
        };
        let envoy_answer = Answer {
            status: e.status,
            code: (e.status != 200).then(|| code(e.json())).flatten(),
            headers: COMPARED.iter().map(|h| (*h, e.header(h).map(str::to_owned))).collect(),
        };
        assert_eq!(envoy_answer, sidecar_answer, "{name}: {}", String::from_utf8_lossy(&e.body));
        let retry = |v: Option<&str>| v.map(|v| v.parse::<u64>().unwrap());
        let (rs, re) = (retry(s.header("retry-after")), retry(e.header("retry-after")));
        assert!(
            rs.is_some() == re.is_some() && rs.unwrap_or(0).abs_diff(re.unwrap_or(0)) <= 1,
            "{name}: retry-after {rs:?} in the sidecar, {re:?} in Envoy"
        );
        answers.push((
            sidecar_answer.status,
            sidecar_answer.code,
            s.header("x-tollgate-approval-id").is_some(),
            e.header("x-tollgate-approval-id").is_some(),
            rs,
        ));
    }
    // What both answered, pinned.
    let codes: Vec<(u16, Option<&str>)> =
        answers.iter().map(|(status, code, ..)| (*status, code.as_deref())).collect();
    assert_eq!(
        codes,
        [
            (403, Some("autonomy_disabled")),
            (403, Some("autonomy_propose_only")),
            (200, None),
            (200, None),
            (403, Some("autonomy_budget_exhausted")),
            (200, None),
            (200, None),
            (403, Some("loop_detected")),
            (200, None),
            (403, Some("autonomy_disabled")),
            (200, None),
        ]
    );
    // The sidecar recorded an approval for the budget used up; the filter names none.
    assert_eq!((answers[4].2, answers[4].3), (true, false));
    // The proposal is recorded: the filter keeps no audit log, so as one line in Envoy's.
    let log = envoy.log();
    let proposal = log
        .lines()
        .find_map(|l| l.split_once("tollgate: proposal ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no proposal line: {log}"));
    let proposal: Value = serde_json::from_str(proposal.trim()).unwrap();
    assert_eq!(
        (&proposal["agent"], &proposal["tool"], &proposal["reason"]),
        (&json!("shy-bot"), &json!("search_web"), &json!("autonomy_propose_only"))
    );
    assert!(answers[7].4.is_some_and(|s| (59..=60).contains(&s)), "{:?}", answers[7].4);
    assert!(!envoy.log().contains("panicked"));
}

/// Two rules on the same tool declare every risk dimension but `historical_success`, which both
/// engines observe from the agent's earlier calls of it: `tier 1` scores 9 plus the history's
/// (1, 5 or 9 points: low, medium, high) and always runs on its own; `tier 2` scores 27 plus it,
/// so only a good history (over 95 % successes) keeps it under 30, the threshold where a human
/// has to approve.
const HISTORY_POLICY: &str = r#"{"version": "2026-12-03.history",
  "defaults": {"llm": "allow", "tool": "allow", "other": "deny"},
  "rules": [
    {"id": "watched", "match": {"tool": "search_web", "tier": "1"}, "effect": "allow",
     "risk": {"blast_radius": "low", "reversibility": "automatic_rollback",
              "data_sensitivity": "public", "cost_impact": "low"}},
    {"id": "wider", "match": {"tool": "search_web", "tier": "2"}, "effect": "allow",
     "risk": {"blast_radius": "medium", "reversibility": "automatic_rollback",
              "data_sensitivity": "public", "cost_impact": "medium"}}]}"#;

/// The success history of an agent's earlier calls (the `historical_success` risk dimension)
/// grades a risk profile alike in the sidecar and in the filter in Envoy, whose two workers
/// share it through shared data: after the same calls, with the same upstream answers (a 5xx is a
/// failure), the same score (`x-tollgate-risk`), band and answer.
#[test]
fn risk_history_in_envoy_grades_as_the_sidecar_does() {
    let rt = runtime();
    let sidecar = rt.block_on(
        Harness::builder()
            .policy(HISTORY_POLICY)
            .route(r#"{name: mcp, path_prefix: /mcp, kind: mcp, upstream: "{upstream}"}"#)
            .start(),
    );
    let collector = Collector::start();
    let plugin = format!(r#"{{"filter": {{"fail": "closed"}}, "policy": {HISTORY_POLICY}}}"#);
    let envoy = Envoy::start(&plugin, sidecar.mock.addr().port(), collector.port);
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "search_web", "arguments": {"q": "x"}}});
    // (agent, tier, the upstream's status)
    let mut steps: Vec<(&str, &str, &str)> = vec![
        ("new-bot", "2", "200"),  // never done: high, 36, a human approves
        ("good-bot", "1", "200"), // never done: 18
        ("good-bot", "1", "200"), // 1 of 1: low, 10
        ("good-bot", "2", "200"), // 2 of 2: low, 28, on its own
        ("bad-bot", "1", "500"),  // never done: 18
        ("bad-bot", "2", "200"),  // 0 of 1: high, 36, a human approves
    ];
    // 5 of 6 (83 %): medium, 14 and 32.
    steps.extend(std::iter::repeat_n(("fair-bot", "1", "200"), 5));
    steps.extend([("fair-bot", "1", "503"), ("fair-bot", "1", "200"), ("fair-bot", "2", "200")]);
    let mut answers = Vec::new();
    for (i, (agent, tier, status)) in steps.iter().enumerate() {
        let mut tags = who(agent);
        tags.extend([("x-agent-tier", *tier), ("x-mock-status", *status)]);
        let owned: Vec<(String, String)> =
            tags.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
        let s = rt.block_on(sidecar.post("/mcp", &owned, &call));
        let e = envoy.request("POST", "/mcp", &tags, &serde_json::to_vec(&call).unwrap());
        let answer = |status: u16, header: &dyn Fn(&str) -> Option<String>| {
            let mut h: Vec<(&str, Option<String>)> =
                COMPARED.iter().map(|name| (*name, header(name))).collect();
            h.push(("x-tollgate-risk", header("x-tollgate-risk")));
            (status, h)
        };
        let sidecar_answer = answer(s.status.as_u16(), &|n| s.header(n).map(str::to_owned));
        let envoy_answer = answer(e.status, &|n| e.header(n).map(str::to_owned));
        assert_eq!(
            envoy_answer,
            sidecar_answer,
            "step {i} ({agent}, tier {tier}): {}",
            String::from_utf8_lossy(&e.body)
        );
        let code = (s.status.as_u16() == 403).then(|| s.json()["error"]["code"].clone());
        let risk = s.header("x-tollgate-risk").map(str::to_owned);
        answers.push((s.status.as_u16(), risk, code));
        // The outcome is counted when the exchange has ended (Envoy: its log phase).
        std::thread::sleep(Duration::from_millis(100));
    }
    let risk = |score: &str| Some(score.to_owned());
    let approve = |band: &str| Some(json!(format!("risk_{band}")));
    let pinned: Vec<(u16, Option<String>, Option<Value>)> = vec![
        (403, None, approve("medium")),
        (200, risk("18"), None),
        (200, risk("10"), None),
        (200, risk("28"), None),
        (500, risk("18"), None),
        (403, None, approve("medium")),
        (200, risk("18"), None),
        (200, risk("10"), None),
        (200, risk("10"), None),
        (200, risk("10"), None),
        (200, risk("10"), None),
        (503, risk("10"), None),
        (200, risk("14"), None),
        (403, None, approve("medium")),
    ];
    assert_eq!(answers, pinned);
    assert!(!envoy.log().contains("panicked"));
}

/// What the sidecar and the filter in Envoy answered to one step of [`guarded_steps`]: status,
/// error code and `retry-after`.
type Guarded = (u16, Option<String>, Option<u64>);

/// Runs `steps` (agent, the upstream's status) as model calls through a sidecar and the filter
/// in Envoy, both with `oversight` as their `oversight:` section, checks that they answer alike
/// (status, error code, decision headers, `retry-after` to the second) and returns the
/// answers, Envoy's log and the oversight reports its collector (a stand-in that lists no agent
/// as disabled) took.
fn guarded_steps(oversight: &str, steps: &[(&str, &str)]) -> (Vec<Guarded>, String, Vec<Value>) {
    let rt = runtime();
    let sidecar = rt.block_on(
        Harness::builder()
            .policy(OVERSEEN_POLICY)
            .extra(&format!("oversight: {oversight}\n"))
            .start(),
    );
    let collector = Collector::start();
    let plugin = format!(
        r#"{{"filter": {{"fail": "closed", "collector": {{"cluster": "collector", "flush": "100ms"}}}},
            "policy": {OVERSEEN_POLICY}, "oversight": {oversight}}}"#
    );
    let envoy = Envoy::start(&plugin, sidecar.mock.addr().port(), collector.port);
    let chat = json!({"model": "gpt-4o", "max_tokens": 5, "messages": []});
    let mut answers = Vec::new();
    for (i, (agent, status)) in steps.iter().enumerate() {
        let mut tags = who(agent);
        tags.push(("x-mock-status", *status));
        let owned: Vec<(String, String)> =
            tags.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
        let s = rt.block_on(sidecar.post("/v1/chat/completions", &owned, &chat));
        let e = envoy.request(
            "POST",
            "/v1/chat/completions",
            &tags,
            &serde_json::to_vec(&chat).unwrap(),
        );
        let code = |status: u16, v: Value| {
            (status == 403 || status == 503)
                .then(|| v["error"]["code"].as_str().map(str::to_owned))
                .flatten()
        };
        let sidecar_answer = Answer {
            status: s.status.as_u16(),
            code: code(s.status.as_u16(), s.json()),
            headers: COMPARED.iter().map(|h| (*h, s.header(h).map(str::to_owned))).collect(),
        };
        let envoy_answer = Answer {
            status: e.status,
            code: code(e.status, e.json()),
            headers: COMPARED.iter().map(|h| (*h, e.header(h).map(str::to_owned))).collect(),
        };
        assert_eq!(
            envoy_answer,
            sidecar_answer,
            "step {i} ({agent}, {status}): {}",
            String::from_utf8_lossy(&e.body)
        );
        let retry = |v: Option<&str>| v.map(|v| v.parse::<u64>().unwrap());
        let (rs, re) = (retry(s.header("retry-after")), retry(e.header("retry-after")));
        assert!(
            rs.is_some() == re.is_some() && rs.unwrap_or(0).abs_diff(re.unwrap_or(0)) <= 1,
            "step {i}: retry-after {rs:?} in the sidecar, {re:?} in Envoy"
        );
        answers.push((sidecar_answer.status, sidecar_answer.code, rs));
        // Outcomes are reported when the exchange has ended (Envoy: its log phase).
        std::thread::sleep(Duration::from_millis(100));
    }
    // Reports go on the VM's next tick.
    std::thread::sleep(Duration::from_millis(300));
    let log = envoy.log();
    assert!(!log.contains("panicked"), "{log}");
    let reports = collector.reports.lock().unwrap().clone();
    (answers, log, reports)
}

/// Circuit breakers and error escalation run in the filter, over Envoy's shared data (both
/// workers see every outcome), with the sidecar's rules. The shared decision table
/// (`the_filter_decides_the_shared_table_as_the_sidecar_does`) holds every mode to the same
/// answers, usage records and metrics for a breaker opening (503 `circuit_open` with
/// `retry-after`), a success resetting its count, an agent's own errors putting it under review
/// and provider errors never escalating. What the table cannot hold: an agent disabled
/// (`agent_disabled`: it takes `disable_at` = `review_at`, as an agent under review gets no
/// further without a granted approval, and the table's review case needs them apart), a 529
/// (Anthropic's overloaded) counted as a provider error, and the filter's `warn` lines for
/// both, which stand in for the sidecar's alerts.
#[test]
fn breakers_and_escalation_in_envoy_answer_as_the_sidecar_does() {
    let code = |c: &str| Some(c.to_owned());
    let oversight = r#"{"breaker": {"failure_threshold": 2, "open_for": "60s"},
                        "escalation": {"review_at": 2, "disable_at": 2}}"#;
    let (answers, log, reports) = guarded_steps(
        oversight,
        &[
            ("bad-bot", "404"),
            ("bad-bot", "401"),
            ("bad-bot", "200"), // disabled (disable_at reached with no review in between)
            ("good-bot", "200"), // another agent is not
            ("flaky-bot", "503"), // provider errors: the breaker's, never escalation's
            ("flaky-bot", "529"), // opens the breaker
            ("flaky-bot", "200"), // fails fast: not disabled, but the upstream's breaker is open
        ],
    );
    let codes: Vec<(u16, Option<String>)> =
        answers.iter().map(|(s, c, _)| (*s, c.clone())).collect();
    assert_eq!(
        codes,
        [
            (404, None),
            (401, None),
            (403, code("agent_disabled")),
            (200, None),
            (503, None),
            (529, None),
            (503, code("circuit_open")),
        ]
    );
    assert!(answers[6].2.is_some_and(|s| (59..=60).contains(&s)), "{:?}", answers[6].2);
    assert!(log.contains("tollgate: circuit breaker opened for upstream"), "{log}");
    // The opening and the disabling are reported to the collector, once each.
    let opened: Vec<&Value> = reports.iter().filter(|r| r["kind"] == "circuit_open").collect();
    assert_eq!(opened.len(), 1, "{reports:?}");
    assert_eq!(
        (&opened[0]["upstream"], &opened[0]["open_for_ms"]),
        (&json!("localhost"), &json!(60_000))
    );
    assert!(log.contains(r#"tollgate: agent "bad-bot" disabled in this Envoy"#), "{log}");
    assert_eq!(reports.len(), 2, "{reports:?}");
    let r = reports.iter().find(|r| r["kind"] == "agent_disabled").expect("agent_disabled");
    assert_eq!(
        (&r["kind"], &r["agent"], &r["action"], &r["status"]),
        (&json!("agent_disabled"), &json!("bad-bot"), &json!("llm"), &json!(401))
    );
}

/// The value of `tollgate_circuit_breaker_state{upstream}` in an Envoy scrape, if it has the
/// series.
fn breaker_state(text: &str, upstream: &str) -> Option<f64> {
    let text = support::tollgate_families(text);
    let e = exposition::parse(&text).unwrap_or_else(|err| panic!("{err}\n{text}"));
    e.value("tollgate_circuit_breaker_state", &[("upstream", upstream)])
}

/// The filter's breakers and escalation through a real Tollgate collector, as a sidecar's own:
/// the breaker's state is `tollgate_circuit_breaker_state{upstream}` (2 open, then 0 once the
/// probe succeeded; the scrape still passes `promtool`), its opening raises the collector's
/// `circuit_open` alert; an agent the filter disables is in the collector's disabled set, with
/// its audit record (actor the Envoy VM) and `agent_disabled` alert, and an operator's
/// re-enable on the collector lets it through the Envoy again within a poll. A bad report is a
/// 400 naming its field.
#[test]
fn breakers_and_escalation_reach_the_collectors_alerts_audit_and_re_enable() {
    const KEY_ENV: &str = "TOLLGATE_ENVOY_ALERTS_KEY";
    std::env::set_var(KEY_ENV, "whsec-envoy-test");
    let rt = runtime();
    // The webhook receiver: takes every POST, keeping its JSON body.
    let hook = Collector::start();
    let alerts = format!(
        "alerts:\n  webhooks:\n    - {{url: \"http://127.0.0.1:{}/hook\", secret_env: {KEY_ENV}, \
         events: [circuit_open, agent_disabled]}}\n  initial_backoff: 50ms\n",
        hook.port
    );
    let collector = rt.block_on(
        Harness::builder()
            .policy(OVERSEEN_POLICY)
            .extra(&format!("oversight: {{escalation: {{review_at: 9, disable_at: 9}}}}\n{alerts}"))
            .start(),
    );
    let admin_port: u16 = collector.admin.rsplit(':').next().unwrap().parse().unwrap();
    let plugin = json!({
        "filter": {"fail": "closed", "tick": "100ms",
            "collector": {"cluster": "collector", "flush": "100ms",
                "headers": {"authorization": format!("Bearer {}", collector.token)}}},
        "policy": serde_json::from_str::<Value>(OVERSEEN_POLICY).unwrap(),
        "oversight": {"breaker": {"failure_threshold": 2, "open_for": "2s"},
                      "escalation": {"review_at": 2, "disable_at": 2}}
    });
    let envoy = Envoy::start(&plugin.to_string(), collector.mock.addr().port(), admin_port);
    let chat =
        serde_json::to_vec(&json!({"model": "gpt-4o", "max_tokens": 5, "messages": []})).unwrap();
    let call = |agent: &str, status: &str| {
        let mut tags = who(agent);
        tags.push(("x-mock-status", status));
        envoy.request("POST", "/v1/chat/completions", &tags, &chat)
    };
    let wait = |what: &str, mut done: Box<dyn FnMut() -> bool + '_>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what} within 10 s\n{}", envoy.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let alert = |kind: &str| -> Option<Value> {
        hook.events.lock().unwrap().iter().find(|e| e["type"] == kind).cloned()
    };

    // The upstream fails twice (the route is unnamed: the breaker is the authority's): open.
    for _ in 0..2 {
        assert_eq!(call("prober", "503").status, 503);
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused = call("prober", "200");
    assert_eq!(
        (refused.status, refused.json()["error"]["code"].clone()),
        (503, json!("circuit_open"))
    );
    wait(
        "the breaker's gauge at 2",
        Box::new(|| breaker_state(&envoy.prometheus(), "localhost") == Some(2.0)),
    );
    wait("the circuit_open alert", Box::new(|| alert("circuit_open").is_some()));
    let opened = alert("circuit_open").unwrap();
    assert_eq!((&opened["upstream"], &opened["open_for_ms"]), (&json!("localhost"), &json!(2000)));
    // promtool reads the filter's families, the breaker's included (Envoy prints no HELP).
    let text = envoy.prometheus();
    let families = support::tollgate_families(&text);
    assert!(
        families.contains("tollgate_circuit_breaker_state{upstream=\"localhost\"} 2"),
        "{families}"
    );
    let (_, findings) = support::promtool(&families);
    let unexpected: Vec<&String> = findings
        .iter()
        .filter(|f| f.strip_suffix(" no help text").and_then(metrics::by_name).is_none())
        .collect();
    assert!(unexpected.is_empty(), "promtool: {unexpected:#?}\n{families}");
    // After `open_for` the probe succeeds: closed, the gauge back at 0.
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(call("prober", "200").status, 200);
    wait(
        "the breaker's gauge at 0",
        Box::new(|| breaker_state(&envoy.prometheus(), "localhost") == Some(0.0)),
    );

    // Two errors of the agent's own: disabled in this Envoy, then at the collector.
    for status in ["400", "404"] {
        assert_eq!(call("clumsy-bot", status).status.to_string(), status);
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused = call("clumsy-bot", "200");
    assert_eq!(
        (refused.status, refused.json()["error"]["code"].clone()),
        (403, json!("agent_disabled"))
    );
    let bearer = format!("Bearer {}", collector.token);
    let admin = |method: &str, path: &str| {
        support::request(admin_port, method, path, &[("authorization", bearer.as_str())], b"")
    };
    let disabled = || admin("GET", "/v1/fleet/agents/disabled").json();
    wait(
        "clumsy-bot in the collector's disabled set",
        Box::new(|| disabled()["agents"] == json!(["clumsy-bot"])),
    );
    // The audit record follows the set (written after it, through the ledger's writer).
    let find = || {
        let audit = rt.block_on(collector.audit());
        let record = audit
            .iter()
            .find(|r| r["kind"] == "agent_disabled" && r["agent"] == "clumsy-bot")
            .cloned();
        (record, audit)
    };
    wait("the agent_disabled audit record", Box::new(|| find().0.is_some()));
    let (record, audit) = find();
    let record = record.unwrap_or_else(|| panic!("no agent_disabled audit record: {audit:#?}"));
    assert!(record["actor"].as_str().unwrap().starts_with("envoy/vm-"), "{record}");
    assert_eq!(record["tool"], "llm", "{record}");
    wait("the agent_disabled alert", Box::new(|| alert("agent_disabled").is_some()));
    let a = alert("agent_disabled").unwrap();
    assert_eq!(
        (&a["agent"], &a["action"], &a["status"]),
        (&json!("clumsy-bot"), &json!("llm"), &json!(404))
    );
    // Still refused here: nothing re-enabled it.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(call("clumsy-bot", "200").status, 403);

    // An operator re-enables it on the collector: through the Envoy again within a poll, on
    // every worker.
    let enabled = admin("POST", "/admin/agents/clumsy-bot/enable");
    assert_eq!(
        enabled.json()["was_disabled"],
        json!(true),
        "{}",
        String::from_utf8_lossy(&enabled.body)
    );
    wait("clumsy-bot let through again", Box::new(|| call("clumsy-bot", "200").status == 200));
    std::thread::sleep(Duration::from_millis(1200));
    for _ in 0..6 {
        assert_eq!(call("clumsy-bot", "200").status, 200);
    }
    assert!(
        envoy.log().contains(r#"agent "clumsy-bot" re-enabled in this Envoy"#),
        "{}",
        envoy.log()
    );
    // One alert each, however many VMs and ticks.
    assert_eq!(hook.events.lock().unwrap().len(), 2, "{:?}", hook.events.lock().unwrap());

    // A bad report names its field.
    let bad = support::request(
        admin_port,
        "POST",
        "/v1/fleet/oversight/reports",
        &[("authorization", bearer.as_str()), ("content-type", "application/json")],
        br#"{"source": "vm-x", "reports": [{"kind": "agent_disabled", "agent": "", "action": "llm", "status": 400, "at_ms": 1}]}"#,
    );
    assert_eq!(bad.status, 400, "{}", String::from_utf8_lossy(&bad.body));
    assert!(
        bad.json()["error"].as_str().unwrap().contains("`reports[0].agent`"),
        "{}",
        String::from_utf8_lossy(&bad.body)
    );
    let unauthorized =
        support::request(admin_port, "POST", "/v1/fleet/oversight/reports", &[], b"{}");
    assert_eq!(unauthorized.status, 401);
    assert!(!envoy.log().contains("panicked"));
}
