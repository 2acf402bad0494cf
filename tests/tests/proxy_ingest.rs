//! `POST /v1/usage/events` on the admin port: usage events from the Envoy filter into the
//! ledger, each line checked and answered on its own (an impossible cost written as
//! implausible, never refused), idempotent by event id (also across a restart), and refused
//! with 503 while the ledger cannot be written.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use serde_json::{json, Value};
use tollgate_e2e::harness::{read, tags, temp_dir, Harness, Reply};

/// A usage event as the filter sends it (`wasm-filter/src/exchange.rs`, `UsageEvent`).
fn event(id: &str, agent: &str) -> Value {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    json!({
        "event_id": id, "ts_ms": now.as_millis() as u64, "request_id": format!("req-{id}"),
        "agent": agent, "cost_center": "CC-1234", "project": "PROJ-ABC123",
        "provider": "openai", "model": "gpt-4o",
        "tokens": {"input": 1000, "cached_input": 0, "cache_write": 0, "output": 100, "reasoning": 0},
        "cost": {"input": "0.0025", "output": "0.001", "total": "0.0035"},
        "cost_usd": "0.0035", "cost_nano_usd": 3_500_000,
        "decision": "allow", "reason": "default_allow", "clause": "defaults.llm", "policy_version": "v1",
        "status": 200, "latency_ms": 40, "usage_source": "reported", "end": "complete", "source": "envoy"
    })
}

fn ndjson(events: &[Value]) -> String {
    events.iter().map(|e| format!("{e}\n")).collect()
}

async fn post(h: &Harness, body: String, auth: bool) -> Reply {
    let mut request = Request::post(format!("{}/v1/usage/events", h.admin))
        .header("content-type", "application/x-ndjson");
    if auth {
        request = request.header("authorization", format!("Bearer {}", h.token));
    }
    let request = request.body(Full::new(Bytes::from(body))).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(15), h.client.request(request))
        .await
        .expect("answered within 15 s")
        .expect("answered");
    read(response).await
}

/// The counts of an answer (its per-line `results` aside).
fn counts(answer: &Value) -> Value {
    json!({"accepted": answer["accepted"], "duplicates": answer["duplicates"],
        "rejected": answer["rejected"]})
}

fn mesh(records: &[Value]) -> Vec<&str> {
    records
        .iter()
        .filter(|r| r["source"] == "envoy")
        .map(|r| r["source_event_id"].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_checked_line_by_line_written_once_and_need_the_token() {
    let h = Harness::builder().extra("limits: {max_body_bytes: 4096}").start().await;
    let mut bad = event("e-2", "mesh-bot");
    bad["cost"]["total"] = json!("0.0036");
    let body = format!(
        "{}{{oops\n{}",
        ndjson(&[event("e-1", "mesh-bot"), bad]),
        ndjson(&[event("e-3", "mesh-bot")])
    );

    assert_eq!(post(&h, body.clone(), false).await.status, StatusCode::UNAUTHORIZED);
    assert!(mesh(&h.ledger().await).is_empty(), "nothing taken without the token");

    let r = post(&h, body.clone(), true).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text());
    let answer = r.json();
    assert_eq!(counts(&answer), json!({"accepted": 3, "duplicates": 0, "rejected": 1}));
    assert_eq!(answer["implausible"], 1, "{answer}");
    let errors: Vec<(u64, &str)> = answer["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["line"].as_u64().unwrap(), e["field"].as_str().unwrap()))
        .collect();
    assert_eq!(errors, [(3, "")], "only the line that is not an event");
    let results: Vec<(&str, &str)> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["event_id"].as_str().unwrap_or("-"), r["result"].as_str().unwrap()))
        .collect();
    assert_eq!(
        results,
        [("e-1", "accepted"), ("e-2", "accepted"), ("-", "refused"), ("e-3", "accepted")]
    );
    assert_eq!(mesh(&h.ledger().await), ["e-1", "e-2", "e-3"], "every event is kept");
    let e2 = h.ledger().await.into_iter().find(|r| r["source_event_id"] == "e-2").unwrap();
    assert_eq!(
        (e2["usage_source"].as_str(), e2["cost_nano_usd"].as_i64()),
        (Some("implausible"), Some(3_600_000)),
        "an impossible cost is written as implausible, at the most it claims"
    );

    // Sent again (a lost answer): nothing new, nothing billed twice.
    let again = post(&h, ndjson(&[event("e-1", "mesh-bot"), event("e-3", "mesh-bot")]), true).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(counts(&again.json()), json!({"accepted": 0, "duplicates": 2, "rejected": 0}));
    let records = h.ledger().await;
    assert_eq!(mesh(&records), ["e-1", "e-2", "e-3"]);
    let e1 = records.iter().find(|r| r["source_event_id"] == "e-1").unwrap();
    assert_eq!(
        (e1["type"].as_str(), e1["cost_nano_usd"].as_i64()),
        (Some("usage"), Some(3_500_000))
    );
    assert_eq!(e1["budgets"], json!([]));

    // The usage API counts them like the proxy's own requests.
    let usage = h.admin_get("/admin/usage?group_by=agent", true).await.json();
    assert_eq!(usage["groups"]["mesh-bot"]["requests"], 3, "{usage}");
    assert_eq!(usage["groups"]["mesh-bot"]["cost_usd"], "0.0106");

    let big = ndjson(&vec![event("e-9", "mesh-bot"); 20]);
    assert_eq!(post(&h, big, true).await.status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_still_knows_the_event_ids_it_wrote() {
    let dir = temp_dir("ingest-restart");
    let h = Harness::builder().data_dir(&dir).start().await;
    assert_eq!(post(&h, ndjson(&[event("r-1", "mesh-bot")]), true).await.status, StatusCode::OK);
    h.stop().await;
    let h = Harness::builder().data_dir(&dir).start().await;
    let r = post(&h, ndjson(&[event("r-1", "mesh-bot"), event("r-2", "mesh-bot")]), true).await;
    assert_eq!(counts(&r.json()), json!({"accepted": 1, "duplicates": 1, "rejected": 0}));
    assert_eq!(mesh(&h.ledger().await), ["r-1", "r-2"]);
    h.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_with_503_while_the_ledger_cannot_be_written() {
    let fault = Arc::new(AtomicBool::new(false));
    let h = Harness::builder().ledger_fault(fault.clone()).start().await;
    // The disk fills; a proxied request's record cannot be written and the ledger turns
    // unhealthy.
    fault.store(true, Ordering::Relaxed);
    let served = h
        .post("/v1/chat/completions", &tags("bot"), &json!({"model": "gpt-4o", "messages": []}))
        .await;
    assert_eq!(served.status, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.admin_get("/readyz", false).await.status == StatusCode::OK {
        assert!(Instant::now() < deadline, "the ledger did not turn unhealthy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = post(&h, ndjson(&[event("d-1", "mesh-bot")]), true).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));

    // The disk recovers: the same batch is taken then (it was not remembered when refused).
    fault.store(false, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.admin_get("/readyz", false).await.status != StatusCode::OK {
        assert!(Instant::now() < deadline, "the ledger did not recover");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = post(&h, ndjson(&[event("d-1", "mesh-bot")]), true).await;
    assert_eq!(counts(&r.json()), json!({"accepted": 1, "duplicates": 0, "rejected": 0}));
    assert_eq!(mesh(&h.ledger().await), ["d-1"]);
}
