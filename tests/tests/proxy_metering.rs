//! Attribution and metering through real sockets: untagged requests are refused in the
//! provider's error shape before reaching the upstream; tagged ones are forwarded without the
//! attribution headers and metered into the ledger with exact tokens and cost.

use hyper::StatusCode;
use serde_json::{json, Value};
use tollgate_e2e::harness::{read, tags, Harness, ALLOW_ALL};
use tollgate_e2e::mock::header;

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 50})
}

fn with(mut headers: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    headers
}

#[tokio::test]
async fn untagged_openai_request_is_refused_in_openai_shape_naming_every_bad_header() {
    let h = Harness::start(ALLOW_ALL).await;

    let reply = h.post("/v1/chat/completions", &[], &chat("gpt-4o")).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("x-tollgate-decision"), Some("deny"));
    assert_eq!(reply.header("x-tollgate-reason"), Some("attribution_rejected"));
    assert_eq!(
        reply.json(),
        json!({"error": {
            "message": "attribution rejected: \
                        x-agent-id is missing (expected ^[a-z0-9-]+$); \
                        x-cost-center is missing (expected ^CC-[0-9]{4}$); \
                        x-project-id is missing (expected ^PROJ-[A-Z0-9]{6}$)",
            "type": "permission_error",
            "param": null,
            "code": "attribution_rejected",
        }})
    );

    // One invalid value, one missing header, one good one: exactly the two bad ones are named.
    let headers = vec![
        ("x-agent-id".to_string(), "billing-bot".to_string()),
        ("x-cost-center".to_string(), "cc-12".to_string()),
    ];
    let reply = h.post("/v1/chat/completions", &headers, &chat("gpt-4o")).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let body = reply.json();
    let message = body["error"]["message"].as_str().unwrap();
    assert_eq!(
        message,
        "attribution rejected: x-cost-center is invalid (got `cc-12`, expected ^CC-[0-9]{4}$); \
         x-project-id is missing (expected ^PROJ-[A-Z0-9]{6}$)"
    );
    assert_eq!(body["error"]["type"], "permission_error");
    assert_eq!(h.mock.request_count(), 0, "a refused request never reaches the upstream");
    assert!(h.ledger().await.is_empty(), "refusals are not usage");
}

#[tokio::test]
async fn untagged_anthropic_request_is_refused_in_anthropic_shape() {
    let h = Harness::start(ALLOW_ALL).await;
    let headers = vec![("x-agent-id".to_string(), "Bad Agent".to_string())];
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 10,
                      "messages": [{"role": "user", "content": "hi"}]});
    let reply = h.post("/v1/messages", &headers, &body).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(
        reply.json(),
        json!({"type": "error", "error": {
            "type": "permission_error",
            "message": "attribution rejected: x-agent-id is invalid (got `Bad Agent`, expected \
                        ^[a-z0-9-]+$); x-cost-center is missing (expected ^CC-[0-9]{4}$); \
                        x-project-id is missing (expected ^PROJ-[A-Z0-9]{6}$)",
            "code": "attribution_rejected",
        }})
    );
    assert_eq!(h.mock.request_count(), 0);
}

#[tokio::test]
async fn tagged_chat_completion_is_metered_exactly_and_attribution_is_not_forwarded() {
    let h = Harness::start(ALLOW_ALL).await;
    let headers = with(
        tags("billing-bot"),
        &[
            (header::INPUT_TOKENS, "1000"),
            (header::CACHED_TOKENS, "400"),
            (header::OUTPUT_TOKENS, "300"),
            (header::REASONING_TOKENS, "100"),
            ("x-request-id", "req-metered-1"),
        ],
    );
    // A 1,200-byte prompt: the 1,000 input tokens the mock reports are believable (a token
    // covers at least one byte of text).
    let body = json!({"model": "gpt-4o", "max_tokens": 50,
                      "messages": [{"role": "user", "content": "hello ".repeat(200)}]});
    let reply = h.post("/v1/chat/completions", &headers, &body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["choices"][0]["message"]["content"], "Hello from the mock upstream");
    assert_eq!(reply.header("x-tollgate-decision"), Some("allow"));
    assert_eq!(reply.header("x-tollgate-reason"), Some("default_allow"));
    assert_eq!(reply.header("x-tollgate-clause"), Some("defaults.llm"));
    assert_eq!(reply.header("x-tollgate-policy-version"), Some("v1"));
    assert_eq!(reply.header("x-request-id"), Some("req-metered-1"));

    // What the upstream saw: no attribution, its own Host, the body untouched.
    let seen = h.mock.requests();
    assert_eq!(seen.len(), 1);
    let upstream = &seen[0];
    assert_eq!(upstream.path, "/v1/chat/completions");
    for name in ["x-agent-id", "x-cost-center", "x-project-id"] {
        assert_eq!(upstream.header(name), None, "{name} leaked to the upstream");
    }
    assert_eq!(upstream.header("host"), Some(h.mock.addr().to_string().as_str()));
    assert_eq!(upstream.json(), Some(body));

    // OpenAI counts overlap: prompt 1000 includes 400 cached; completion 300 includes 100
    // reasoning. gpt-4o: $2.50 input, $1.25 cached, $10.00 output (and reasoning) per million.
    let expected_nanos: i64 = 600 * 2_500 + 400 * 1_250 + 200 * 10_000 + 100 * 10_000;
    assert_eq!(expected_nanos, 5_000_000);
    let ledger = h.ledger_until(1).await;
    assert_eq!(ledger.len(), 1);
    let r = &ledger[0];
    assert_eq!(r["request_id"], "req-metered-1");
    assert_eq!(
        (r["agent"].as_str(), r["cost_center"].as_str(), r["project"].as_str()),
        (Some("billing-bot"), Some("CC-1234"), Some("PROJ-ABC123"))
    );
    assert_eq!(r["route"], "openai");
    assert_eq!(r["provider"], "openai");
    assert_eq!(r["model"], "gpt-4o");
    assert_eq!(
        r["tokens"],
        json!({"input": 600, "cached_input": 400, "cache_write": 0, "output": 200, "reasoning": 100})
    );
    assert_eq!(r["cost_nano_usd"], expected_nanos);
    assert_eq!(r["cost_usd"], "0.005");
    assert_eq!(r["usage_source"], "reported");
    assert_eq!(r["price_source"], "listed");
    assert_eq!(r["decision"], "allow");
    assert_eq!(r["reason"], "default_allow");
    assert_eq!(r["status"], 200);
    assert_eq!(r["end"], "complete");
}

/// An upstream that answers with a model the rate card does not price is never billed $0: the
/// requested model's price applies, else the card's fallback; the ledger says which, and the
/// metrics count it.
#[tokio::test]
async fn a_response_naming_an_unpriced_model_is_charged_never_free() {
    let tokens = [(header::INPUT_TOKENS, "1000"), (header::OUTPUT_TOKENS, "300")];
    let h = Harness::start(ALLOW_ALL).await;
    let renamed = with(tags("router-bot"), &[tokens[0], tokens[1], (header::MODEL, "mystery-7")]);
    // A prompt long enough to hold the 1,000 input tokens the mock reports (a report above
    // what the request could use would be billed at the reservation instead).
    let prompt = "Route this to whichever model is cheapest today. ".repeat(25);
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "max_tokens": 400,
            "messages": [{"role": "user", "content": prompt}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "stream": true, "max_tokens": 400,
            "messages": [{"role": "user", "content": prompt}]}),
        ),
    ] {
        let reply = h.post(path, &renamed, &body).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    // gpt-4o: 1000 × $2.50 + 300 × $10.00 per million.
    for r in h.ledger_until(2).await {
        assert_eq!(r["model"], "mystery-7", "the model that answered is recorded");
        assert_eq!(r["price_source"], "requested_model", "{r}");
        assert_eq!(r["cost_nano_usd"], 2_500_000 + 3_000_000, "{r}");
    }
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(
            "tollgate_unlisted_model_responses_total{price_source=\"requested_model\"} 2"
        ),
        "{metrics}"
    );
    h.stop().await;

    // Neither the answer's model nor the request's is listed: the card's fallback price.
    let h = Harness::builder()
        .extra("pricing: {unknown_model: {fallback: {input: \"10.00\", output: \"30.00\"}}}")
        .start()
        .await;
    let body = json!({"model": "in-house-llm", "max_tokens": 400,
        "messages": [{"role": "user", "content": prompt}]});
    let reply = h.post("/v1/chat/completions", &renamed, &body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let r = &h.ledger_until(1).await[0];
    assert_eq!(
        (r["model"].as_str(), r["price_source"].as_str()),
        (Some("mystery-7"), Some("fallback"))
    );
    assert_eq!(r["cost_nano_usd"], 10_000_000 + 9_000_000, "{r}");
    assert!(h
        .metrics()
        .await
        .contains("tollgate_unlisted_model_responses_total{price_source=\"fallback\"} 1"));
}

#[tokio::test]
async fn upstream_error_status_is_passed_through_and_not_charged() {
    let h = Harness::start(ALLOW_ALL).await;
    let headers = with(tags("bot"), &[(header::STATUS, "429")]);
    let reply = h.post("/v1/chat/completions", &headers, &chat("gpt-4o")).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.json()["error"]["code"], "rate_limit_exceeded");
    let ledger = h.ledger_until(1).await;
    assert_eq!(ledger[0]["status"], 429);
    assert_eq!(ledger[0]["cost_nano_usd"], 0);
    assert_eq!(ledger[0]["usage_source"], "none");
}

#[tokio::test]
async fn attribution_header_sent_twice_is_refused() {
    // Two agent ids on one request: billing either one would be a guess, so neither is.
    let h = Harness::start(ALLOW_ALL).await;
    let mut headers = tags("first-agent");
    headers.push(("x-agent-id".to_string(), "second-agent".to_string()));
    let reply = h.post("/v1/chat/completions", &headers, &chat("gpt-4o")).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["error"]["code"], "attribution_rejected");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("x-agent-id is sent more than once"), "{message}");
    assert_eq!(h.mock.request_count(), 0);
}

#[tokio::test]
async fn unreachable_upstream_answers_502_and_charges_nothing() {
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let policy = "version: v1\ndefaults: {llm: allow}\n\
                  budgets: [{id: day, scope: agent, period: daily, amount: \"1.00\"}]\n";
    let h = Harness::builder().policy(policy).upstream(&format!("http://{closed}")).start().await;
    let reply = h.post("/v1/chat/completions", &tags("lost"), &chat("gpt-4o")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
    assert_eq!(reply.header("x-tollgate-clause"), Some("defaults.llm"));
    let ledger = h.ledger_until(1).await;
    assert_eq!(ledger[0]["status"], 502);
    assert_eq!(ledger[0]["cost_nano_usd"], 0);
    assert_eq!(ledger[0]["usage_source"], "none");
    let budgets = h.admin_get("/admin/budgets", true).await.json();
    assert_eq!(budgets["budgets"][0]["spent"], "0.00", "{budgets}");
    assert_eq!(
        budgets["budgets"][0]["reserved"], "0.00",
        "the reservation was released: {budgets}"
    );
}

#[tokio::test]
async fn upstream_without_a_response_head_in_time_answers_504_and_charges_nothing() {
    let h = Harness::builder()
        .timeouts("{connect_timeout: 1s, response_timeout: 200ms, stream_idle_timeout: 5s}")
        .start()
        .await;
    let slow = with(tags("patient"), &[(header::DELAY_MS, "2000")]);
    let reply = h.post("/v1/chat/completions", &slow, &chat("gpt-4o")).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "upstream_timeout");
    let ledger = h.ledger_until(1).await;
    assert_eq!(ledger[0]["status"], 504);
    assert_eq!(ledger[0]["cost_nano_usd"], 0);
}

#[tokio::test]
async fn a_reused_request_id_cannot_skip_billing() {
    // Budget reservations are keyed by the proxy's own ids: a caller that sends the same
    // x-request-id twice is charged twice.
    let policy = "version: v1\ndefaults: {llm: allow}\n\
                  budgets: [{id: day, scope: agent, period: daily, amount: \"10.00\"}]\n";
    let h = Harness::builder().policy(policy).start().await;
    let headers = with(tags("reuser"), &[("x-request-id", "same-id")]);
    for _ in 0..2 {
        let reply = h.post("/v1/chat/completions", &headers, &chat("gpt-4o")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let ledger = h.ledger_until(2).await;
    let total: i64 = ledger.iter().map(|r| r["cost_nano_usd"].as_i64().unwrap()).sum();
    assert!(total > 0);
    assert_ne!(ledger[0]["reservation_id"], ledger[1]["reservation_id"]);
    let budgets = h.admin_get("/admin/budgets", true).await.json();
    let spent = tollgate_e2e::harness::nanos(budgets["budgets"][0]["spent"].as_str().unwrap());
    assert_eq!(spent, total, "both requests are in the budget: {budgets}");
}

/// A request to an LLM route that is not a free endpoint and names no model is a clear 400
/// `missing_model` (it used to be "no price for model ``"), never forwarded.
#[tokio::test]
async fn a_priced_request_without_a_model_is_a_bad_request_naming_what_is_missing() {
    let h = Harness::start(ALLOW_ALL).await;
    let no_model = json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 5});
    let reply = h.post("/v1/chat/completions", &tags("bot"), &no_model).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    let error = &reply.json()["error"];
    assert_eq!(error["code"], "missing_model");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("POST /v1/chat/completions names no model: send the `model` field"),
        "{message}"
    );
    let bot = tags("bot");
    let get = |path: &'static str| {
        let response = h.send(hyper::Method::GET, path, &bot, bytes::Bytes::new());
        async move { read(response.await).await }
    };
    let files = get("/v1/files").await;
    assert_eq!(files.status, StatusCode::BAD_REQUEST, "{}", files.text());
    assert_eq!(files.json()["error"]["code"], "missing_model");
    // The model list is free: it passes, and is recorded at $0.
    let models = get("/v1/models").await;
    assert_eq!(models.status, StatusCode::OK, "{}", models.text());
    assert_eq!(h.mock.request_count(), 1, "only the free listing was forwarded");
    let r = &h.ledger_until(1).await[0];
    assert_eq!((r["cost_nano_usd"].as_i64(), r["price_source"].as_str()), (Some(0), Some("free")));
}
