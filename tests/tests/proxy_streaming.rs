//! Streaming through the proxy: OpenAI usage is asked for on the client's behalf and removed
//! again, Anthropic's cumulative usage is read right, bytes are not held back, and a stream that
//! ends early (client gone, upstream reset) is still charged from what was streamed.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Response, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_e2e::harness::{sse_data, tags, Harness, ALLOW_ALL};
use tollgate_e2e::mock::header;

fn with(mut headers: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    headers
}

fn stream_chat(include_usage: Option<bool>) -> Value {
    let mut body = json!({
        "model": "gpt-4o",
        "stream": true,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Say hello"}],
    });
    if let Some(include) = include_usage {
        body["stream_options"] = json!({"include_usage": include});
    }
    body
}

/// Reads every data frame of a body, each with the time it arrived (at most 10 s in all).
async fn frames(response: Response<Incoming>) -> (Vec<(Instant, bytes::Bytes)>, Option<String>) {
    let mut body = response.into_body();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, body.frame()).await.expect("stream ended within 10 s") {
            None => return (out, None),
            Some(Err(e)) => return (out, Some(e.to_string())),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    out.push((Instant::now(), data));
                }
            }
        }
    }
}

fn joined(frames: &[(Instant, bytes::Bytes)]) -> Vec<u8> {
    frames.iter().flat_map(|(_, b)| b.iter().copied()).collect()
}

/// The concatenated `delta.content` of chat chunks.
fn text_of(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn openai_stream_without_include_usage_is_metered_and_the_client_gets_its_own_stream() {
    let h = Harness::start(ALLOW_ALL).await;
    let headers =
        with(tags("streamer"), &[(header::INPUT_TOKENS, "20"), (header::OUTPUT_TOKENS, "5")]);
    let body = stream_chat(None);
    let response = h.send(Method::POST, "/v1/chat/completions", &headers, body.to_string()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let (frames, error) = frames(response).await;
    assert_eq!(error, None);
    let events = sse_data(&joined(&frames));

    // role chunk, five words, finish chunk, [DONE]; no usage-only chunk.
    assert_eq!(events.len(), 8, "{events:#?}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(events.iter().all(|e| !e.contains("\"choices\":[]")), "{events:#?}");
    assert_eq!(text_of(&events), "Hello from the mock upstream");
    let finish: Value = serde_json::from_str(&events[6]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");

    // The upstream was asked for usage; nothing else in the body changed.
    let seen = h.mock.requests();
    assert_eq!(seen.len(), 1);
    let mut expected = body.clone();
    expected["stream_options"] = json!({"include_usage": true});
    assert_eq!(seen[0].json(), Some(expected));
    assert_eq!(
        seen[0].header("content-length").map(str::to_string),
        Some(seen[0].body.len().to_string())
    );

    let ledger = h.ledger_until(1).await;
    let r = &ledger[0];
    assert_eq!(r["usage_source"], "reported");
    assert_eq!(
        r["tokens"],
        json!({"input": 20, "cached_input": 0, "cache_write": 0, "output": 5, "reasoning": 0})
    );
    assert_eq!(r["cost_nano_usd"], 20 * 2_500 + 5 * 10_000);
    assert_eq!(r["end"], "complete");
}

#[tokio::test]
async fn openai_stream_with_include_usage_keeps_the_usage_chunk_for_the_client() {
    let h = Harness::start(ALLOW_ALL).await;
    let headers =
        with(tags("streamer"), &[(header::INPUT_TOKENS, "20"), (header::OUTPUT_TOKENS, "7")]);
    let body = stream_chat(Some(true));
    let response = h.send(Method::POST, "/v1/chat/completions", &headers, body.to_string()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let (frames, error) = frames(response).await;
    assert_eq!(error, None);
    let events = sse_data(&joined(&frames));
    assert_eq!(events.len(), 9, "{events:#?}");
    let usage: Value = serde_json::from_str(&events[7]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], 20);
    assert_eq!(usage["usage"]["completion_tokens"], 7);
    assert_eq!(h.mock.requests()[0].json(), Some(body));

    let ledger = h.ledger_until(1).await;
    assert_eq!(ledger[0]["usage_source"], "reported");
    assert_eq!(ledger[0]["tokens"]["output"], 7);
}

#[tokio::test]
async fn anthropic_stream_is_charged_the_final_cumulative_output() {
    let h = Harness::start(ALLOW_ALL).await;
    let headers = with(
        tags("claude-user"),
        &[
            (header::INPUT_TOKENS, "50"),
            (header::CACHED_TOKENS, "10"),
            (header::CACHE_WRITE_TOKENS, "20"),
            (header::OUTPUT_TOKENS, "42"),
            (header::EVENTS, "3"),
        ],
    );
    let body = json!({
        "model": "claude-sonnet-4-5", "stream": true, "max_tokens": 100,
        "messages": [{"role": "user", "content": "hi"}],
    });
    let response = h.send(Method::POST, "/v1/messages", &headers, body.to_string()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let (frames, error) = frames(response).await;
    assert_eq!(error, None);
    let text = String::from_utf8(joined(&frames)).unwrap();
    // message_start says output_tokens 1; the one message_delta says 42 (cumulative).
    assert!(text.contains("\"output_tokens\":1"), "{text}");
    assert!(text.contains("\"usage\":{\"output_tokens\":42}"), "{text}");
    assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    // The body reached the upstream unchanged (no usage rewrite for Anthropic).
    assert_eq!(h.mock.requests()[0].json(), Some(body));

    let ledger = h.ledger_until(1).await;
    let r = &ledger[0];
    assert_eq!(r["provider"], "anthropic");
    assert_eq!(r["route"], "anthropic");
    assert_eq!(r["usage_source"], "reported");
    assert_eq!(
        r["tokens"],
        json!({"input": 50, "cached_input": 10, "cache_write": 20, "output": 42, "reasoning": 0})
    );
    // claude-sonnet-4-5: $3.00 input, $0.30 cache read, $3.75 cache write, $15.00 output.
    assert_eq!(r["cost_nano_usd"], 50 * 3_000 + 10 * 300 + 20 * 3_750 + 42 * 15_000);
}

#[tokio::test]
async fn first_sse_byte_reaches_the_client_before_the_upstream_finishes() {
    let h = Harness::start(ALLOW_ALL).await;
    // 3 words: role, 3 words, finish, usage, [DONE] = 7 events, 6 gaps of 100 ms.
    let headers = with(tags("streamer"), &[(header::EVENTS, "3"), (header::EVENT_DELAY_MS, "100")]);
    let started = Instant::now();
    let response =
        h.send(Method::POST, "/v1/chat/completions", &headers, stream_chat(None).to_string()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let (frames, error) = frames(response).await;
    let done = Instant::now();
    assert_eq!(error, None);
    let first = frames.first().expect("at least one frame").0;
    let to_first = first - started;
    let total = done - started;
    assert!(total >= Duration::from_millis(600), "total {total:?}");
    // The first chunk arrives with the first event, not with the last: at least 4 gaps early.
    assert!(to_first + Duration::from_millis(400) < total, "first {to_first:?}, total {total:?}");
    // And the chunks arrive spread out, not in one burst at the end.
    assert!(frames.len() >= 5, "{} frames", frames.len());
    let events = sse_data(&joined(&frames));
    assert_eq!(events.len(), 6, "{events:#?}");
}

/// Sends one raw HTTP/1.1 request and returns the connection.
async fn raw_request(
    h: &Harness,
    path: &str,
    headers: &[(String, String)],
    body: &str,
) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(h.proxy_addr).await.unwrap();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        h.proxy_addr,
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    stream
}

#[tokio::test]
async fn client_disconnect_mid_stream_is_still_charged_as_estimated() {
    let policy = "version: gone-1\n\
                  budgets:\n\
                  \x20 - {id: agent-daily, scope: agent, period: daily, amount: \"5.00\"}\n";
    let h = Harness::start(policy).await;
    let headers = with(tags("quitter"), &[(header::EVENTS, "40"), (header::EVENT_DELAY_MS, "25")]);
    let mut stream =
        raw_request(&h, "/v1/chat/completions", &headers, &stream_chat(None).to_string()).await;
    // Read until the first SSE event has arrived, then hang up.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !seen.windows(6).any(|w| w == b"data: ") {
        let mut buf = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, stream.read(&mut buf))
            .await
            .expect("first event in 5 s")
            .unwrap();
        assert!(n > 0, "connection closed before the first event");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200 OK"));
    drop(stream);

    let ledger = h.ledger_until(1).await;
    let r = &ledger[0];
    assert_eq!(r["end"], "client_gone");
    assert_eq!(r["usage_source"], "estimated");
    assert_eq!(r["status"], 200);
    assert!(r["tokens"]["input"].as_u64().unwrap() > 0, "{r}");
    assert!(r["cost_nano_usd"].as_i64().unwrap() > 0, "{r}");
    // The stream was cut well before its 40 words.
    assert!(r["tokens"]["output"].as_u64().unwrap() < 40, "{r}");

    // The budget was settled at the charged cost: nothing stays reserved.
    let budgets = h.admin_get("/admin/budgets", true).await.json();
    let b = &budgets["budgets"][0];
    assert_eq!(b["key"], "quitter");
    assert_eq!(b["reserved"], "0.00", "{budgets}");
    assert_eq!(b["spent"], r["cost_usd"], "{budgets}");
}

#[tokio::test]
async fn upstream_reset_mid_stream_is_charged_as_estimated_upstream_error() {
    let h = Harness::start(ALLOW_ALL).await;
    let headers = with(tags("unlucky"), &[(header::EVENTS, "10"), (header::RESET_AFTER, "4")]);
    let response =
        h.send(Method::POST, "/v1/chat/completions", &headers, stream_chat(None).to_string()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let (frames, error) = frames(response).await;
    assert!(error.is_some(), "the client must see the stream fail, not end cleanly");
    let events = sse_data(&joined(&frames));
    // role chunk + 3 words made it before the reset; no [DONE].
    assert_eq!(events.len(), 4, "{events:#?}");
    assert_eq!(text_of(&events), "Hello from the");

    let ledger = h.ledger_until(1).await;
    let r = &ledger[0];
    assert_eq!(r["end"], "upstream_error");
    assert_eq!(r["usage_source"], "estimated");
    assert!(r["tokens"]["input"].as_u64().unwrap() > 0, "{r}");
    // "Hello from the" is 14 bytes of text: at least a few tokens of output.
    assert!(r["tokens"]["output"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["cost_nano_usd"].as_i64().unwrap() > 0, "{r}");
}

/// An OpenAI chat stream of `words` content events (plus role, finish, usage and `[DONE]`),
/// each event as one HTTP/1.1 chunk.
fn chat_stream_chunks(words: usize) -> Vec<Vec<u8>> {
    let chunk = |choices: Value, usage: Value| {
        json!({"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1,
               "model": "gpt-4o", "choices": choices, "usage": usage})
    };
    let mut events = vec![chunk(
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
        Value::Null,
    )
    .to_string()];
    for i in 0..words {
        events.push(
            chunk(
                json!([{"index": 0, "delta": {"content": format!("w{i} ")}, "finish_reason": null}]),
                Value::Null,
            )
            .to_string(),
        );
    }
    events.push(
        chunk(json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]), Value::Null).to_string(),
    );
    events.push(
        chunk(
            json!([]),
            json!({"prompt_tokens": 7, "completion_tokens": words, "total_tokens": 7 + words}),
        )
        .to_string(),
    );
    events.push("[DONE]".to_string());
    events
        .into_iter()
        .map(|e| {
            let event = format!("data: {e}\n\n");
            format!("{:x}\r\n{event}\r\n", event.len()).into_bytes()
        })
        .collect()
}

const SSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

/// Reads one HTTP/1.1 request (head and `content-length` body) from `stream`.
async fn read_request(stream: &mut tokio::net::TcpStream) {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + length {
                return;
            }
        }
        let mut buf = [0u8; 8192];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, stream.read(&mut buf))
            .await
            .expect("request within 5 s")
            .unwrap();
        assert!(n > 0, "the proxy closed before sending its whole request");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Reads from `stream` until `done` says the bytes so far are enough (at most 5 s).
async fn read_until(
    stream: &mut tokio::net::TcpStream,
    got: &mut Vec<u8>,
    done: impl Fn(&[u8]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done(got) {
        let mut buf = [0u8; 65536];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!("not there within 5 s; so far: {}", String::from_utf8_lossy(got))
            })
            .unwrap();
        assert!(n > 0, "connection closed early: {}", String::from_utf8_lossy(got));
        got.extend_from_slice(&buf[..n]);
    }
}

/// The chunks of a complete chunked HTTP/1.1 response: each chunk's data, in order.
fn response_chunks(response: &[u8]) -> Vec<Vec<u8>> {
    let start = response.windows(4).position(|w| w == b"\r\n\r\n").expect("a head") + 4;
    let head = String::from_utf8_lossy(&response[..start]).to_ascii_lowercase();
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut rest = &response[start..];
    let mut chunks = Vec::new();
    loop {
        let line = rest.windows(2).position(|w| w == b"\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..line]).unwrap(), 16).unwrap();
        rest = &rest[line + 2..];
        if size == 0 {
            return chunks;
        }
        chunks.push(rest[..size].to_vec());
        rest = &rest[size + 2..];
    }
}

/// How many whole SSE events (each ends with a blank line) the raw bytes hold.
fn complete_events(got: &[u8]) -> usize {
    got.windows(2).filter(|w| w == b"\n\n").count()
}

fn ends_chunked(got: &[u8]) -> bool {
    got.ends_with(b"\r\n0\r\n\r\n")
}

/// The upstream writes all 24 events of a stream at once (an answer it had ready): the proxy
/// reads them together and writes them on together, as one chunk, instead of one write per
/// event. Fails when each event leaves on its own (hyper's pooled client hands the response
/// one chunk per wake-up, so the proxy never sees two ready at once).
#[tokio::test]
async fn events_the_upstream_wrote_together_reach_the_client_in_one_write() {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", upstream.local_addr().unwrap());
    let events = chat_stream_chunks(20);
    let all: Vec<u8> = events.concat();
    let server = tokio::spawn(async move {
        let (mut stream, _) = upstream.accept().await.unwrap();
        read_request(&mut stream).await;
        let mut burst = SSE_HEAD.to_vec();
        burst.extend_from_slice(&all);
        burst.extend_from_slice(b"0\r\n\r\n");
        stream.write_all(&burst).await.unwrap();
        // Keep the connection open until the test is done with it.
        let _ = stream.read(&mut [0u8; 1]).await;
    });
    let h = Harness::builder().upstream(&url).start().await;
    let mut client = raw_request(
        &h,
        "/v1/chat/completions",
        &tags("burst"),
        &stream_chat(Some(true)).to_string(),
    )
    .await;
    let mut got = Vec::new();
    read_until(&mut client, &mut got, ends_chunked).await;
    let chunks = response_chunks(&got);
    let body: Vec<u8> = chunks.concat();
    let expected: Vec<String> = sse_data(
        &events
            .iter()
            .flat_map(|c| {
                let start = c.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
                c[start..c.len() - 2].to_vec()
            })
            .collect::<Vec<u8>>(),
    );
    assert_eq!(sse_data(&body), expected, "every event arrives, in order");
    assert!(
        chunks.len() <= 2,
        "{} events written together reached the client in {} chunks (writes)",
        expected.len(),
        chunks.len()
    );
    // The meter still read every event: the usage chunk's numbers are charged.
    let ledger = h.ledger_until(1).await;
    assert_eq!(ledger[0]["usage_source"], "reported", "{}", ledger[0]);
    assert_eq!(ledger[0]["tokens"]["output"], 20, "{}", ledger[0]);
    assert_eq!(ledger[0]["end"], "complete", "{}", ledger[0]);
    drop(client);
    server.abort();
}

/// An event the upstream wrote alone reaches the client while the upstream still holds the
/// next one back: the upstream sends event N+1 only once the client has received event N, so
/// a proxy that waited for more before writing would stall here.
#[tokio::test]
async fn a_paced_event_is_never_held_back_for_the_next() {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", upstream.local_addr().unwrap());
    let events = chat_stream_chunks(3);
    let count = events.len();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::channel::<usize>(count);
    let server = tokio::spawn(async move {
        let (mut stream, _) = upstream.accept().await.unwrap();
        read_request(&mut stream).await;
        stream.write_all(SSE_HEAD).await.unwrap();
        for (i, event) in events.iter().enumerate() {
            stream.write_all(event).await.unwrap();
            // Wait (bounded) until the client has this event before sending the next.
            let seen = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv()).await;
            assert_eq!(seen.ok().flatten(), Some(i), "event {i} did not reach the client");
        }
        stream.write_all(b"0\r\n\r\n").await.unwrap();
    });
    let h = Harness::builder().upstream(&url).start().await;
    let mut client = raw_request(
        &h,
        "/v1/chat/completions",
        &tags("paced"),
        &stream_chat(Some(true)).to_string(),
    )
    .await;
    let mut got = Vec::new();
    for i in 0..count {
        read_until(&mut client, &mut got, |g| complete_events(g) > i).await;
        seen_tx.send(i).await.unwrap();
    }
    read_until(&mut client, &mut got, ends_chunked).await;
    assert_eq!(sse_data(&response_chunks(&got).concat()).len(), count);
    server.await.expect("the upstream saw every event delivered");
    let ledger = h.ledger_until(1).await;
    assert_eq!(ledger[0]["end"], "complete", "{}", ledger[0]);
}
