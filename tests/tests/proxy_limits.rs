//! Limits through real sockets: budgets hold under 64 concurrent requests, requests/min and
//! tokens/min limits answer 429 with `Retry-After`, the per-request cost cap and the body size
//! limit refuse before anything reaches the upstream.

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_e2e::harness::{read, tags, Harness};
use tollgate_e2e::mock::header;

fn with(mut headers: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    headers
}

fn chat(max_tokens: u64) -> Value {
    json!({"model": "gpt-4o", "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "count to three"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_spend_more_than_the_budget() {
    // Each request may cost up to 1000 output tokens × $10/M = $0.01 plus a few input tokens,
    // and really costs exactly $0.01 (no input, 1000 output). So 9 fit in $0.10 and a 10th
    // worst case never does, however the 64 requests interleave.
    let policy = "version: budget-1\n\
                  defaults: {llm: allow}\n\
                  budgets:\n\
                  \x20 - {id: agent-daily, scope: agent, period: daily, amount: \"0.10\"}\n";
    let h = std::sync::Arc::new(Harness::start(policy).await);
    let headers = with(
        tags("spender"),
        &[(header::INPUT_TOKENS, "0"), (header::OUTPUT_TOKENS, "1000"), (header::DELAY_MS, "20")],
    );
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let h = h.clone();
        let headers = headers.clone();
        tasks.push(tokio::spawn(async move {
            h.post("/v1/chat/completions", &headers, &chat(1000)).await
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for task in tasks {
        let reply = task.await.unwrap();
        match reply.status {
            StatusCode::OK => ok += 1,
            StatusCode::PAYMENT_REQUIRED => {
                refused += 1;
                let body = reply.json();
                assert_eq!(body["error"]["type"], "insufficient_quota");
                assert_eq!(body["error"]["code"], "budget_exceeded");
                let message = body["error"]["message"].as_str().unwrap();
                assert!(message.starts_with("budget `agent-daily` (daily) would be exceeded"));
                assert_eq!(reply.header("x-tollgate-reason"), Some("budget_exceeded"));
            }
            other => panic!("unexpected {other}: {}", reply.text()),
        }
    }
    assert_eq!((ok, refused), (9, 55));
    assert_eq!(h.mock.request_count(), 9, "refused requests never reach the upstream");

    let ledger = h.ledger_until(9).await;
    assert_eq!(ledger.len(), 9);
    let spent: i64 = ledger.iter().map(|r| r["cost_nano_usd"].as_i64().unwrap()).sum();
    assert_eq!(spent, 9 * 10_000_000);
    assert!(spent <= 100_000_000);

    let status = h.admin_get("/admin/budgets", true).await;
    assert_eq!(status.status, StatusCode::OK);
    let body = status.json();
    assert_eq!(body["policy_version"], "budget-1");
    let budgets = body["budgets"].as_array().unwrap();
    assert_eq!(budgets.len(), 1, "{body}");
    let b = &budgets[0];
    assert_eq!(b["budget_id"], "agent-daily");
    assert_eq!(b["key"], "spender");
    assert_eq!(b["limit"], "0.10");
    assert_eq!(b["spent"], "0.09");
    assert_eq!(b["reserved"], "0.00");
    assert_eq!(b["remaining"], "0.01");
    assert_eq!(b["utilization_bp"], 9000);
}

#[tokio::test]
async fn fourth_request_in_a_minute_is_rate_limited_with_retry_after() {
    let h = Harness::start("version: rl-1\nlimits: {rpm: 3}\n").await;
    for i in 0..3 {
        let reply = h.post("/v1/chat/completions", &tags("chatty"), &chat(10)).await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}: {}", reply.text());
    }
    let reply = h.post("/v1/chat/completions", &tags("chatty"), &chat(10)).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = reply.header("retry-after").expect("Retry-After").parse().unwrap();
    // 3 per minute replenish one every 20 s.
    assert!((1..=20).contains(&retry), "Retry-After {retry}");
    let body = reply.json();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["code"], "rate_limited_requests");
    assert_eq!(reply.header("x-tollgate-policy-version"), Some("rl-1"));
    assert_eq!(h.mock.request_count(), 3);

    // Another agent has its own allowance.
    let reply = h.post("/v1/chat/completions", &tags("quiet"), &chat(10)).await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn tokens_per_minute_count_the_worst_case_tokens() {
    let h = Harness::start("version: tpm-1\nlimits: {tpm: 1000}\n").await;
    let reply = h.post("/v1/chat/completions", &tags("wordy"), &chat(600)).await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = h.post("/v1/chat/completions", &tags("wordy"), &chat(600)).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.json()["error"]["code"], "rate_limited_tokens");
    assert!(reply.header("retry-after").is_some());
    assert_eq!(h.mock.request_count(), 1);
}

#[tokio::test]
async fn request_whose_worst_case_exceeds_the_cost_cap_is_refused() {
    let h = Harness::start("version: cap-1\nlimits: {max_cost_per_request: \"0.001\"}\n").await;
    // 1000 output tokens of gpt-4o may cost $0.01: over the cap.
    let reply = h.post("/v1/chat/completions", &tags("big"), &chat(1000)).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let body = reply.json();
    assert_eq!(body["error"]["type"], "permission_error");
    assert_eq!(body["error"]["code"], "cost_limit_exceeded");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("over the $0.001 per-request limit"), "{message}");
    assert_eq!(h.mock.request_count(), 0);
    // 10 output tokens fit.
    let reply = h.post("/v1/chat/completions", &tags("big"), &chat(10)).await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn body_over_the_limit_is_refused_with_413() {
    let h = Harness::builder().extra("limits: {max_body_bytes: 1024}").start().await;
    let big =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(2000)}]});
    let reply = h.post("/v1/chat/completions", &tags("big"), &big).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    let body = reply.json();
    assert_eq!(body["error"]["code"], "body_too_large");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["message"], "the request body is larger than 1024 bytes");

    // Chunked, without a Content-Length: refused once the limit is passed while reading.
    let mut stream = tokio::net::TcpStream::connect(h.proxy_addr).await.unwrap();
    let payload = big.to_string();
    let mut request = String::from(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\
         x-agent-id: big\r\nx-cost-center: CC-1234\r\nx-project-id: PROJ-ABC123\r\n\r\n",
    );
    for chunk in payload.as_bytes().chunks(500) {
        request.push_str(&format!("{:x}\r\n{}\r\n", chunk.len(), String::from_utf8_lossy(chunk)));
    }
    request.push_str("0\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .expect("answer within 5 s");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413 Payload Too Large\r\n"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");

    // A body right under the limit passes.
    let small = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let response =
        h.send(Method::POST, "/v1/chat/completions", &tags("big"), small.to_string()).await;
    assert_eq!(read(response).await.status, StatusCode::OK);
    assert_eq!(h.mock.request_count(), 1);
}
