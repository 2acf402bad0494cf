//! The admin port through real sockets: health and readiness, bearer-token auth, usage totals
//! that agree with the ledger, `/metrics` as strict Prometheus text with capped label values,
//! and policy reload from a watched file (a bad document never replaces the good one).

use std::path::Path;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tollgate_e2e::exposition::{self, Exposition};
use tollgate_e2e::harness::{tags, temp_dir, Harness, ALLOW_ALL};
use tollgate_e2e::mock::header;

fn with(mut headers: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    headers
}

fn chat() -> Value {
    json!({"model": "gpt-4o", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]})
}

async fn metrics(h: &Harness) -> Exposition {
    let text = h.metrics().await;
    exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[tokio::test]
async fn health_and_readiness_answer_200_without_a_token() {
    let h = Harness::start(ALLOW_ALL).await;
    let health = h.admin_get("/healthz", false).await;
    assert_eq!((health.status, health.text().as_str()), (StatusCode::OK, "ok\n"));
    let ready = h.admin_get("/readyz", false).await;
    assert_eq!((ready.status, ready.text().as_str()), (StatusCode::OK, "ready\n"));
    let metrics = h.admin_get("/metrics", false).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert_eq!(metrics.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
}

#[tokio::test]
async fn admin_api_needs_the_bearer_token() {
    let h = Harness::start(ALLOW_ALL).await;
    for path in ["/admin/policy", "/admin/budgets", "/admin/usage"] {
        let reply = h.admin_get(path, false).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(reply.json(), json!({"error": "unauthorized"}));
    }
    let reply = h.admin_call(Method::POST, "/admin/policy/reload", false).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = h.admin_get("/admin/policy", true).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["version"], "v1");
}

#[tokio::test]
async fn admin_api_without_a_configured_token_refuses_everyone() {
    let h = Harness::builder().without_token().start().await;
    let reply = h.admin_get("/admin/policy", true).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    // Metrics and health stay open.
    assert_eq!(h.admin_get("/healthz", false).await.status, StatusCode::OK);
}

#[tokio::test]
async fn usage_totals_by_agent_match_the_ledger() {
    let h = Harness::start(ALLOW_ALL).await;
    let calls = [("alpha", "100", "10"), ("alpha", "50", "20"), ("beta", "7", "3")];
    for (agent, input, output) in calls {
        let headers =
            with(tags(agent), &[(header::INPUT_TOKENS, input), (header::OUTPUT_TOKENS, output)]);
        let reply = h.post("/v1/chat/completions", &headers, &chat()).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let ledger = h.ledger_until(3).await;
    let period = &ledger[0]["ts"].as_str().unwrap()[..7];
    let reply = h.admin_get(&format!("/admin/usage?period={period}&group_by=agent"), true).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["period"], period);
    assert_eq!(body["group_by"], "agent");
    // alpha: 150 in, 30 out → 150 × 2.5 + 30 × 10 = 675 µ$; beta: 7 × 2.5 + 3 × 10 = 47.5 µ$.
    assert_eq!(
        body["groups"],
        json!({
            "alpha": {"requests": 2, "input_tokens": 150, "cached_input_tokens": 0,
                      "cache_write_tokens": 0, "output_tokens": 30, "reasoning_tokens": 0,
                      "cost_usd": "0.000675"},
            "beta": {"requests": 1, "input_tokens": 7, "cached_input_tokens": 0,
                     "cache_write_tokens": 0, "output_tokens": 3, "reasoning_tokens": 0,
                     "cost_usd": "0.0000475"},
        })
    );
    // The same numbers, summed from the ledger itself.
    for (agent, nanos) in [("alpha", 675_000), ("beta", 47_500)] {
        let records: Vec<&Value> = ledger.iter().filter(|r| r["agent"] == agent).collect();
        let sum: i64 = records.iter().map(|r| r["cost_nano_usd"].as_i64().unwrap()).sum();
        assert_eq!(sum, nanos, "{agent}");
        let input: u64 = records.iter().map(|r| r["tokens"]["input"].as_u64().unwrap()).sum();
        assert_eq!(Some(input), body["groups"][agent]["input_tokens"].as_u64());
    }
    // Query strings are form-urlencoded: escapes decode to the same answer.
    let escaped = period.replace('-', "%2D");
    let reply = h.admin_get(&format!("/admin/usage?period={escaped}&group_by=%61gent"), true).await;
    assert_eq!(reply.json()["groups"], body["groups"]);
    let bad = h.admin_get("/admin/usage?period=2026-13x&group_by=agent", true).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let bad = h.admin_get(&format!("/admin/usage?period={period}&group_by=model"), true).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.json()["error"], "group_by must be one of agent, project, cost_center");
}

/// A month or day that does not exist is refused by `/admin/usage` and `/admin/invoice` alike,
/// with a 400 naming the parameter (it used to pass the shape check and report nothing).
#[tokio::test]
async fn usage_and_invoice_refuse_impossible_periods_naming_the_parameter() {
    let h = Harness::start(ALLOW_ALL).await;
    for period in ["2026-13", "2026-00", "2026-1", "abc", "2026-02-30", "2026-11-00"] {
        for path in [
            format!("/admin/usage?period={period}&group_by=agent"),
            format!("/admin/invoice?period={period}&group_by=agent&format=json"),
        ] {
            let bad = h.admin_get(&path, true).await;
            assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{path}: {}", bad.text());
            let body = bad.json();
            assert_eq!(body["parameter"], "period", "{path}: {body}");
            let message = body["error"].as_str().unwrap_or_default();
            assert!(message.starts_with(&format!("period: `{period}` is not a period")), "{body}");
        }
    }
    for path in ["/admin/usage?period=2026-12", "/admin/invoice?period=2024-02-29"] {
        assert_eq!(h.admin_get(path, true).await.status, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn metrics_are_valid_exposition_with_capped_attribution_labels() {
    let h = Harness::builder().extra("metrics: {max_label_values: 3}").start().await;
    for i in 0..10 {
        let headers = with(
            tags(&format!("agent-{i}")),
            &[(header::INPUT_TOKENS, "10"), (header::OUTPUT_TOKENS, "5")],
        );
        let reply = h.post("/v1/chat/completions", &headers, &chat()).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let refused = h.post("/v1/chat/completions", &[], &chat()).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let ledger = h.ledger_until(10).await;

    let m = metrics(&h).await;
    for (family, kind) in [
        ("tollgate_requests_total", "counter"),
        ("tollgate_tokens_total", "counter"),
        ("tollgate_cost_nano_usd_total", "counter"),
        ("tollgate_policy_info", "gauge"),
        ("tollgate_policy_reload_failures_total", "counter"),
        ("tollgate_decision_duration_seconds", "histogram"),
        ("tollgate_in_flight_requests", "gauge"),
    ] {
        assert_eq!(m.types.get(family).map(String::as_str), Some(kind), "{family}");
    }
    assert_eq!(m.value("tollgate_policy_info", &[("version", "v1")]), Some(1.0));
    assert_eq!(m.series("tollgate_policy_info").count(), 1);
    assert_eq!(m.value("tollgate_requests_total", &[("decision", "allow")]), Some(10.0));
    assert_eq!(
        m.value(
            "tollgate_requests_total",
            &[("decision", "deny"), ("reason", "attribution_rejected")]
        ),
        Some(1.0)
    );
    assert_eq!(m.value("tollgate_tokens_total", &[("kind", "input")]), Some(100.0));
    assert_eq!(m.value("tollgate_tokens_total", &[("kind", "output")]), Some(50.0));
    let ledger_cost: i64 = ledger.iter().map(|r| r["cost_nano_usd"].as_i64().unwrap()).sum();
    assert_eq!(ledger_cost, 10 * (10 * 2_500 + 5 * 10_000));
    assert_eq!(m.value("tollgate_cost_nano_usd_total", &[]), Some(ledger_cost as f64));
    assert_eq!(m.value("tollgate_in_flight_requests", &[]), Some(0.0));

    // Ten agents, three label values kept: the rest fold into __other__.
    for family in ["tollgate_tokens_total", "tollgate_cost_nano_usd_total"] {
        let agents: std::collections::BTreeSet<&str> =
            m.series(family).map(|s| s.labels["agent"].as_str()).collect();
        assert_eq!(
            agents.into_iter().collect::<Vec<_>>(),
            vec!["__other__", "agent-0", "agent-1", "agent-2"],
            "{family}"
        );
    }
    assert_eq!(
        m.value("tollgate_tokens_total", &[("agent", "__other__"), ("kind", "output")]),
        Some(35.0)
    );
}

/// Every request is counted once in `tollgate_requests_total`, whatever path it took: with the
/// model it asked for (also when refused after its body was read; `-` when refused before, or
/// without a model), the upstream's status class (429 and 500 are not plain allows), `none` when
/// no upstream answered; and every effect is timed.
#[tokio::test]
async fn each_request_is_counted_once_with_its_model_and_upstream_status() {
    let policy = "version: v1\ndefaults: {llm: allow, tool: allow, other: deny}\nrules:\n\
                  \x20 - {id: gated, match: {model: gpt-4o-mini}, effect: require_approval}\n\
                  \x20 - {id: banned, match: {model: o1}, effect: deny, reason: banned_model}\n";
    let dead = r#"{name: dead, path_prefix: /dead/, kind: openai, upstream: "http://127.0.0.1:1"}"#;
    let h = Harness::builder().route(dead).policy(policy).start().await;
    let model = |m: &str| json!({"model": m, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]});
    let sent = [
        ("/v1/chat/completions", with(tags("a"), &[]), model("gpt-4o"), 200),
        ("/v1/chat/completions", with(tags("a"), &[(header::STATUS, "429")]), model("gpt-4o"), 429),
        ("/v1/chat/completions", with(tags("a"), &[(header::STATUS, "500")]), model("gpt-4o"), 500),
        ("/dead/v1/chat/completions", with(tags("a"), &[]), model("gpt-4o"), 502),
        ("/v1/chat/completions", Vec::new(), model("gpt-4o"), 403),
        ("/v1/chat/completions", with(tags("a"), &[]), model("o1"), 403),
        ("/v1/chat/completions", with(tags("a"), &[]), model("gpt-4o-mini"), 403),
        ("/nowhere", with(tags("a"), &[]), json!({}), 404),
    ];
    for (path, headers, body, status) in &sent {
        let reply = h.post(path, headers, body).await;
        assert_eq!(reply.status.as_u16(), *status, "{path}: {}", reply.text());
    }
    h.ledger_until(4).await;
    let m = metrics(&h).await;
    let total: f64 = m.series("tollgate_requests_total").map(|s| s.value).sum();
    assert_eq!(total, sent.len() as f64, "each request once");
    let count = |decision: &str, reason: &str, model: &str, status: &str| {
        let labels =
            [("decision", decision), ("reason", reason), ("model", model), ("status", status)];
        m.value("tollgate_requests_total", &labels)
    };
    assert_eq!(count("allow", "default_allow", "gpt-4o", "2xx"), Some(1.0));
    assert_eq!(count("allow", "default_allow", "gpt-4o", "4xx"), Some(1.0));
    assert_eq!(count("allow", "default_allow", "gpt-4o", "5xx"), Some(1.0));
    assert_eq!(count("allow", "default_allow", "gpt-4o", "none"), Some(1.0), "the 502, once");
    assert_eq!(count("deny", "attribution_rejected", "-", "none"), Some(1.0), "before the body");
    assert_eq!(count("deny", "banned_model", "o1", "none"), Some(1.0));
    assert_eq!(
        m.value(
            "tollgate_requests_total",
            &[("decision", "require_approval"), ("model", "gpt-4o-mini")]
        ),
        Some(1.0)
    );
    assert_eq!(count("deny", "no_route", "-", "none"), Some(1.0));
    assert_eq!(m.value("tollgate_requests_total", &[("model", "-")]), Some(2.0));
    assert!(m.series("tollgate_requests_total").all(|s| !s.labels.contains_key("route")));
    // Timed for every effect: four admitted, three refused after the policy step or at the
    // head, one held for approval.
    let timed =
        |effect: &str| m.value("tollgate_decision_duration_seconds_count", &[("decision", effect)]);
    assert_eq!(timed("allow"), Some(4.0));
    assert_eq!(timed("deny"), Some(3.0));
    assert_eq!(timed("require_approval"), Some(1.0));
}

/// Replaces a file atomically, so a poll never reads half of it.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Polls `check` every 20 ms for at most 5 s; panics with `what` if it never holds.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check().await {
        assert!(Instant::now() < deadline, "not within 5 s: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn policy_version(h: &Harness) -> String {
    let reply = h.admin_get("/admin/policy", true).await;
    assert_eq!(reply.status, StatusCode::OK);
    reply.json()["version"].as_str().unwrap().to_string()
}

async fn reload_failures(h: &Harness) -> f64 {
    metrics(h).await.value("tollgate_policy_reload_failures_total", &[]).unwrap()
}

#[tokio::test]
async fn policy_file_reloads_and_a_bad_document_keeps_the_last_good_one() {
    let dir = temp_dir("policy");
    let file = dir.join("policy.yaml");
    write_atomically(&file, ALLOW_ALL);
    let source = format!(
        "policy_source: {{file: {}, poll: 100ms}}",
        serde_json::to_string(&file.display().to_string()).unwrap()
    );
    let h = Harness::builder().extra(&source).start().await;
    assert_eq!(policy_version(&h).await, "v1");

    write_atomically(&file, "version: v2\ndefaults: {llm: allow}\nlimits: {rpm: 1000}\n");
    eventually("policy v2 is active", || async { policy_version(&h).await == "v2" }).await;
    let m = metrics(&h).await;
    assert_eq!(m.value("tollgate_policy_info", &[("version", "v2")]), Some(1.0));
    assert_eq!(m.series("tollgate_policy_info").count(), 1, "only the active version is 1");
    assert_eq!(reload_failures(&h).await, 0.0);
    let reply = h.post("/v1/chat/completions", &tags("reader"), &chat()).await;
    assert_eq!(reply.header("x-tollgate-policy-version"), Some("v2"));

    write_atomically(&file, "version: v3\ndefaults: {llm: maybe}\n");
    eventually("the bad document is counted", || async { reload_failures(&h).await == 1.0 }).await;
    assert_eq!(policy_version(&h).await, "v2");
    let reply = h.post("/v1/chat/completions", &tags("reader"), &chat()).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-tollgate-policy-version"), Some("v2"));

    let reply = h.admin_call(Method::POST, "/admin/policy/reload", true).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    let body = reply.json();
    assert_eq!(body["reloaded"], false);
    assert_eq!(body["version"], "v2");
    let error = body["error"].as_str().unwrap();
    assert!(error.starts_with("the new policy is invalid, keeping version v2: "), "{error}");
    assert!(error.contains("defaults.llm"), "{error}");
    assert!(error.contains("maybe"), "{error}");
    assert_eq!(reload_failures(&h).await, 2.0);

    // A forced reload of a good document applies at once.
    write_atomically(&file, "version: v4\n");
    let reply = h.admin_call(Method::POST, "/admin/policy/reload", true).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json(), json!({"version": "v4", "reloaded": true}));
    assert_eq!(policy_version(&h).await, "v4");
    let _ = std::fs::remove_dir_all(&dir);
}
