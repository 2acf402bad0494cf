//! The mock upstream on real sockets: a hyper client talks to it on `127.0.0.1:0` and checks
//! each endpoint's wire format, the `x-mock-*` overrides, stream timing and truncation, and
//! what the mock recorded.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tollgate_e2e::mock::{header, serve, MockUpstream};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http1() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn http2() -> HttpClient {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

async fn send(
    client: &HttpClient,
    mock: &MockUpstream,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Incoming> {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("{}{path}", mock.base_url()))
        .header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    client.request(request.body(Full::new(body.into())).unwrap()).await.unwrap()
}

async fn post(
    mock: &MockUpstream,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> Response<Incoming> {
    send(&http1(), mock, Method::POST, path, headers, body.to_string()).await
}

async fn post_json(
    mock: &MockUpstream,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (StatusCode, Value) {
    let response = post(mock, path, headers, body).await;
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

/// One SSE event: its `event:` name if any, and its `data:` payload.
#[derive(Debug)]
struct Event {
    name: Option<String>,
    data: String,
}

impl Event {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap()
    }
}

/// Strict SSE parsing: every event is `[event: NAME\n]data: PAYLOAD\n\n`, nothing else.
fn parse_sse(text: &str) -> Vec<Event> {
    assert!(text.ends_with("\n\n"), "stream does not end with a blank line: {text:?}");
    text.trim_end_matches('\n')
        .split("\n\n")
        .map(|block| {
            let lines: Vec<&str> = block.split('\n').collect();
            match lines.as_slice() {
                [data] => Event { name: None, data: field(data, "data: ") },
                [name, data] => {
                    Event { name: Some(field(name, "event: ")), data: field(data, "data: ") }
                }
                _ => panic!("malformed SSE block {block:?}"),
            }
        })
        .collect()
}

fn field(line: &str, prefix: &str) -> String {
    line.strip_prefix(prefix).unwrap_or_else(|| panic!("{line:?} lacks {prefix:?}")).to_owned()
}

async fn post_sse(
    mock: &MockUpstream,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> Vec<Event> {
    let response = post(mock, path, headers, body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    parse_sse(std::str::from_utf8(&bytes).unwrap())
}

fn chat_request(stream: bool, include_usage: bool) -> Value {
    let mut request = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello"}],
        "stream": stream,
    });
    if include_usage {
        request["stream_options"] = json!({"include_usage": true});
    }
    request
}

const TEXT: &str = "Hello from the mock upstream";

#[tokio::test]
async fn chat_json_reports_the_usage_the_headers_asked_for() {
    let mock = MockUpstream::start().await;
    let headers = [
        (header::INPUT_TOKENS, "100"),
        (header::OUTPUT_TOKENS, "7"),
        (header::CACHED_TOKENS, "40"),
        (header::REASONING_TOKENS, "3"),
    ];
    let (status, body) =
        post_json(&mock, "/v1/chat/completions", &headers, &chat_request(false, false)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["choices"][0]["index"], 0);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], TEXT);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({
            "prompt_tokens": 100,
            "completion_tokens": 7,
            "total_tokens": 107,
            "prompt_tokens_details": {"cached_tokens": 40},
            "completion_tokens_details": {"reasoning_tokens": 3},
        })
    );
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(body["created"].is_u64());
}

#[tokio::test]
async fn default_usage_is_body_bytes_over_four_rounded_up_and_one_token_per_event() {
    let mock = MockUpstream::start().await;
    let request = chat_request(false, false);
    let body_len = request.to_string().len() as u64;
    let (_, body) = post_json(&mock, "/v1/chat/completions", &[], &request).await;
    assert_eq!(body["usage"]["prompt_tokens"], body_len.div_ceil(4));
    assert_eq!(body["usage"]["completion_tokens"], 5);
    let (_, body) =
        post_json(&mock, "/v1/chat/completions", &[(header::EVENTS, "3")], &request).await;
    assert_eq!(body["choices"][0]["message"]["content"], "Hello from the");
    assert_eq!(body["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn chat_stream_without_include_usage_has_no_usage_anywhere() {
    let mock = MockUpstream::start().await;
    let events = post_sse(&mock, "/v1/chat/completions", &[], &chat_request(true, false)).await;
    assert_eq!(events.len(), 1 + 5 + 1 + 1, "role, 5 content, finish, [DONE]");
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(Event::json).collect();
    assert!(events.iter().all(|e| e.name.is_none()));
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert!(chunk.get("usage").is_none(), "unexpected usage in {chunk}");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let text: String = chunks[1..6]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, TEXT);
    assert_eq!(chunks[6]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[6]["choices"][0]["delta"], json!({}));
}

#[tokio::test]
async fn chat_stream_with_include_usage_sends_null_usage_then_a_usage_chunk() {
    let mock = MockUpstream::start().await;
    let headers = [
        (header::INPUT_TOKENS, "12"),
        (header::CACHED_TOKENS, "4"),
        (header::REASONING_TOKENS, "2"),
        (header::EVENTS, "3"),
    ];
    let events = post_sse(&mock, "/v1/chat/completions", &headers, &chat_request(true, true)).await;
    assert_eq!(events.len(), 1 + 3 + 1 + 1 + 1, "role, 3 content, finish, usage, [DONE]");
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(Event::json).collect();
    for chunk in &chunks[..5] {
        assert_eq!(chunk["usage"], Value::Null);
        assert!(chunk.get("usage").is_some(), "include_usage chunks carry usage: null");
    }
    let usage_chunk = &chunks[5];
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"],
        json!({
            "prompt_tokens": 12,
            "completion_tokens": 3,
            "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 2},
        })
    );
}

#[tokio::test]
async fn completions_answer_as_text_completion_in_json_and_stream() {
    let mock = MockUpstream::start().await;
    let request = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Say hello"});
    let headers = [(header::INPUT_TOKENS, "9"), (header::OUTPUT_TOKENS, "6")];
    let (_, body) = post_json(&mock, "/v1/completions", &headers, &request).await;
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], TEXT);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15})
    );

    let mut stream_request = request.clone();
    stream_request["stream"] = json!(true);
    stream_request["stream_options"] = json!({"include_usage": true});
    let events = post_sse(&mock, "/v1/completions", &headers, &stream_request).await;
    assert_eq!(events.len(), 5 + 1 + 1 + 1, "5 text, finish, usage, [DONE]");
    let usage = events[6].json();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["total_tokens"], 15);
    assert_eq!(events[5].json()["choices"][0]["finish_reason"], "stop");
    assert_eq!(events[0].json()["object"], "text_completion");
}

#[tokio::test]
async fn embeddings_return_one_vector_per_input() {
    let mock = MockUpstream::start().await;
    let request = json!({"model": "text-embedding-3-small", "input": ["one", "two"]});
    let (_, body) =
        post_json(&mock, "/v1/embeddings", &[(header::INPUT_TOKENS, "4")], &request).await;
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "text-embedding-3-small");
    assert_eq!(body["usage"], json!({"prompt_tokens": 4, "total_tokens": 4}));
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (index, item) in data.iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], index);
        assert_eq!(item["embedding"].as_array().unwrap().len(), 8);
    }
}

#[tokio::test]
async fn responses_json_reports_usage_with_details() {
    let mock = MockUpstream::start().await;
    let headers = [
        (header::INPUT_TOKENS, "50"),
        (header::CACHED_TOKENS, "20"),
        (header::OUTPUT_TOKENS, "8"),
        (header::REASONING_TOKENS, "5"),
    ];
    let (_, body) =
        post_json(&mock, "/v1/responses", &headers, &json!({"model": "o4-mini", "input": "hi"}))
            .await;
    assert_eq!(body["object"], "response");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(body["output"][0]["content"][0]["text"], TEXT);
    assert_eq!(
        body["usage"],
        json!({
            "input_tokens": 50,
            "input_tokens_details": {"cached_tokens": 20},
            "output_tokens": 8,
            "output_tokens_details": {"reasoning_tokens": 5},
            "total_tokens": 58,
        })
    );
}

#[tokio::test]
async fn responses_stream_names_each_event_and_reports_usage_on_completion() {
    let mock = MockUpstream::start().await;
    let headers = [(header::INPUT_TOKENS, "30"), (header::EVENTS, "2")];
    let request = json!({"model": "o4-mini", "input": "hi", "stream": true});
    let events = post_sse(&mock, "/v1/responses", &headers, &request).await;
    let names: Vec<&str> = events.iter().map(|e| e.name.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (sequence, event) in events.iter().enumerate() {
        let payload = event.json();
        assert_eq!(payload["type"], event.name.as_deref().unwrap());
        assert_eq!(payload["sequence_number"], sequence);
    }
    assert_eq!(events[0].json()["response"]["usage"], Value::Null);
    assert_eq!(events[4].json()["delta"], "Hello");
    let completed = events[9].json();
    assert_eq!(completed["response"]["status"], "completed");
    assert_eq!(completed["response"]["usage"]["input_tokens"], 30);
    assert_eq!(completed["response"]["usage"]["output_tokens"], 2);
    assert_eq!(completed["response"]["usage"]["total_tokens"], 32);
}

fn anthropic_request(stream: bool) -> Value {
    json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Say hello"}],
        "stream": stream,
    })
}

#[tokio::test]
async fn anthropic_message_json_reports_cache_fields() {
    let mock = MockUpstream::start().await;
    let headers = [
        (header::INPUT_TOKENS, "25"),
        (header::CACHED_TOKENS, "100"),
        (header::CACHE_WRITE_TOKENS, "30"),
        (header::OUTPUT_TOKENS, "9"),
    ];
    let (status, body) =
        post_json(&mock, "/v1/messages", &headers, &anthropic_request(false)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["type"], "message");
    assert_eq!(body["role"], "assistant");
    assert_eq!(body["model"], "claude-sonnet-4-5");
    assert_eq!(body["content"], json!([{"type": "text", "text": TEXT}]));
    assert_eq!(body["stop_reason"], "end_turn");
    assert_eq!(
        body["usage"],
        json!({
            "input_tokens": 25,
            "output_tokens": 9,
            "cache_creation_input_tokens": 30,
            "cache_read_input_tokens": 100,
        })
    );
}

#[tokio::test]
async fn anthropic_stream_reports_cumulative_output_in_message_delta() {
    let mock = MockUpstream::start().await;
    let headers = [
        (header::INPUT_TOKENS, "25"),
        (header::CACHED_TOKENS, "100"),
        (header::CACHE_WRITE_TOKENS, "30"),
        (header::OUTPUT_TOKENS, "15"),
        (header::EVENTS, "3"),
    ];
    let events = post_sse(&mock, "/v1/messages", &headers, &anthropic_request(true)).await;
    let names: Vec<&str> = events.iter().map(|e| e.name.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    for event in &events {
        assert_eq!(event.json()["type"], event.name.as_deref().unwrap());
    }
    assert_eq!(
        events[0].json()["message"]["usage"],
        json!({
            "input_tokens": 25,
            "output_tokens": 1,
            "cache_creation_input_tokens": 30,
            "cache_read_input_tokens": 100,
        })
    );
    let text: String = events[3..6]
        .iter()
        .map(|e| e.json()["delta"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "Hello from the");
    let delta = events[7].json();
    assert_eq!(delta["usage"], json!({"output_tokens": 15}));
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
}

#[tokio::test]
async fn model_header_overrides_the_reported_model() {
    let mock = MockUpstream::start().await;
    let (_, body) = post_json(
        &mock,
        "/v1/messages",
        &[(header::MODEL, "claude-haiku-4-5")],
        &anthropic_request(false),
    )
    .await;
    assert_eq!(body["model"], "claude-haiku-4-5");
}

#[tokio::test]
async fn status_header_answers_with_the_provider_error_shape() {
    let mock = MockUpstream::start().await;
    let (status, body) = post_json(
        &mock,
        "/v1/chat/completions",
        &[(header::STATUS, "429")],
        &chat_request(true, true),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(body["error"]["message"].is_string());

    let (status, body) =
        post_json(&mock, "/v1/messages", &[(header::STATUS, "529")], &anthropic_request(false))
            .await;
    assert_eq!(status.as_u16(), 529);
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "overloaded_error");
    assert!(body["error"]["message"].is_string());
}

#[tokio::test]
async fn event_delay_lets_the_client_see_the_first_event_before_the_stream_ends() {
    let mock = MockUpstream::start().await;
    let delay = Duration::from_millis(100);
    let response = post(
        &mock,
        "/v1/chat/completions",
        &[(header::EVENT_DELAY_MS, "100"), (header::EVENTS, "4")],
        &chat_request(true, false),
    )
    .await;
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let first_at = Instant::now();
    let first = parse_sse(std::str::from_utf8(&first).unwrap());
    assert_eq!(first.len(), 1, "each event is its own frame");
    assert_eq!(first[0].json()["choices"][0]["delta"]["role"], "assistant");
    let mut frames = 1;
    while let Some(frame) = body.frame().await {
        if frame.unwrap().is_data() {
            frames += 1;
        }
    }
    let events = 1 + 4 + 1 + 1;
    assert_eq!(frames, events);
    // The remaining events are each at least `delay` apart, so the end comes that much later.
    assert!(first_at.elapsed() >= delay * (events - 1));
}

#[tokio::test]
async fn head_delay_holds_back_the_response_head() {
    let mock = MockUpstream::start().await;
    let started = Instant::now();
    let response = post(
        &mock,
        "/v1/chat/completions",
        &[(header::DELAY_MS, "150")],
        &chat_request(false, false),
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(response.status(), StatusCode::OK);
}

/// Reads frames until the body ends or fails; returns the bytes and whether it failed.
async fn read_until_error(response: Response<Incoming>) -> (String, bool) {
    let mut body = response.into_body();
    let mut received = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => received.extend_from_slice(frame.data_ref().map_or(&[][..], |d| d)),
            Err(_) => return (String::from_utf8(received).unwrap(), true),
        }
    }
    (String::from_utf8(received).unwrap(), false)
}

#[tokio::test]
async fn reset_after_truncates_the_stream_with_an_error_over_http1() {
    let mock = MockUpstream::start().await;
    let response = post(
        &mock,
        "/v1/chat/completions",
        &[(header::RESET_AFTER, "3")],
        &chat_request(true, true),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let (received, failed) = read_until_error(response).await;
    assert!(failed, "the client must see the truncation as an error");
    let events = parse_sse(&received);
    assert_eq!(events.len(), 3);
    assert!(!received.contains("[DONE]"));
    assert!(!received.contains("\"choices\":[]"), "no usage chunk");
}

#[tokio::test]
async fn reset_after_truncates_the_stream_with_an_error_over_http2() {
    let mock = MockUpstream::start().await;
    let request = anthropic_request(true).to_string();
    let response =
        send(&http2(), &mock, Method::POST, "/v1/messages", &[(header::RESET_AFTER, "4")], request)
            .await;
    assert_eq!(response.version(), hyper::Version::HTTP_2);
    let (received, failed) = read_until_error(response).await;
    assert!(failed, "the client must see the truncation as an error");
    let names: Vec<String> = parse_sse(&received).into_iter().filter_map(|e| e.name).collect();
    assert_eq!(names, ["message_start", "content_block_start", "ping", "content_block_delta"]);
}

#[tokio::test]
async fn mcp_answers_json_rpc_with_the_callers_id() {
    let mock = MockUpstream::start().await;
    let call = json!({
        "jsonrpc": "2.0", "id": 42, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "hi"}},
    });
    let (status, body) = post_json(&mock, "/mcp", &[], &call).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"jsonrpc": "2.0", "id": 42, "result": {"content": [{"type": "text", "text": "ok"}]}})
    );

    let list = json!({"jsonrpc": "2.0", "id": "a", "method": "tools/list"});
    let (_, body) = post_json(&mock, "/mcp", &[], &list).await;
    assert_eq!(body["id"], "a");
    let names: Vec<&str> = body["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["echo", "delete_records"]);

    let unknown = json!({"jsonrpc": "2.0", "id": 7, "method": "resources/list"});
    let (_, body) = post_json(&mock, "/mcp", &[], &unknown).await;
    assert_eq!(body["error"]["code"], -32601);

    let notification = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let response = post(&mock, "/mcp", &[], &notification).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn model_lists_answer_in_the_shape_of_the_provider_asking() {
    let mock = MockUpstream::start().await;
    let get = |path: &'static str, headers: &'static [(&'static str, &'static str)]| {
        let mock = &mock;
        async move {
            let response = send(&http1(), mock, Method::GET, path, headers, Bytes::new()).await;
            let status = response.status();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice::<Value>(&bytes).unwrap())
        }
    };
    let (status, openai) = get("/v1/models", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(openai["object"], "list");
    assert_eq!(
        openai["data"][0],
        json!({"id": "gpt-4o", "object": "model", "created": 1_700_000_000, "owned_by": "system"})
    );
    let (status, one) = get("/v1/models/gpt-4o-mini", &[]).await;
    assert_eq!((status, one["id"].as_str()), (StatusCode::OK, Some("gpt-4o-mini")));
    let (status, missing) = get("/v1/models/nope", &[]).await;
    assert_eq!(
        (status, missing["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("model_not_found"))
    );

    const ANTHROPIC: &[(&str, &str)] = &[("anthropic-version", "2023-06-01")];
    let (status, anthropic) = get("/v1/models", ANTHROPIC).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(anthropic["has_more"], false);
    assert_eq!(anthropic["data"][0]["type"], "model");
    assert_eq!(anthropic["first_id"], anthropic["data"][0]["id"]);
    let (status, one) = get("/v1/models/claude-haiku-4-5-20251001", ANTHROPIC).await;
    assert_eq!((status, one["type"].as_str()), (StatusCode::OK, Some("model")));
    let (status, missing) = get("/v1/models/nope", ANTHROPIC).await;
    assert_eq!((status, missing["type"].as_str()), (StatusCode::NOT_FOUND, Some("error")));
}

#[tokio::test]
async fn rest_tools_echo_method_and_path() {
    let mock = MockUpstream::start().await;
    let response =
        send(&http1(), &mock, Method::DELETE, "/tools/db/records?id=3", &[], Bytes::new()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body, json!({"ok": true, "method": "DELETE", "path": "/tools/db/records"}));
}

#[tokio::test]
async fn requests_are_recorded_with_method_path_headers_and_body() {
    let mock = MockUpstream::start().await;
    assert_eq!(mock.request_count(), 0);
    let health = send(&http1(), &mock, Method::GET, "/__mock/health", &[], Bytes::new()).await;
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(mock.request_count(), 0, "health checks are not recorded");

    let request = chat_request(true, true);
    let _ = post(&mock, "/v1/chat/completions?trace=1", &[("x-agent-id", "agent-7")], &request)
        .await
        .into_body()
        .collect()
        .await
        .unwrap();
    let _ =
        post_json(&mock, "/mcp", &[], &json!({"jsonrpc": "2.0", "id": 1, "method": "ping"})).await;

    assert_eq!(mock.request_count(), 2);
    let recorded = mock.requests();
    assert_eq!(recorded[0].method, Method::POST);
    assert_eq!(recorded[0].path, "/v1/chat/completions");
    assert_eq!(recorded[0].query.as_deref(), Some("trace=1"));
    assert_eq!(recorded[0].header("x-agent-id"), Some("agent-7"));
    assert_eq!(recorded[0].json().unwrap()["stream_options"]["include_usage"], true);
    assert_eq!(recorded[0].body, request.to_string());
    assert_eq!(recorded[1].path, "/mcp");
    mock.clear_requests();
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test]
async fn malformed_requests_get_provider_shaped_client_errors() {
    let mock = MockUpstream::start().await;
    let (status, body) = post_json(
        &mock,
        "/v1/chat/completions",
        &[(header::OUTPUT_TOKENS, "lots")],
        &chat_request(false, false),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"].as_str().unwrap().contains(header::OUTPUT_TOKENS));

    let response =
        send(&http1(), &mock, Method::POST, "/v1/messages", &[], Bytes::from("not json")).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let (status, _) = post_json(&mock, "/v2/unknown", &[], &json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn shutdown_stops_accepting_connections() {
    let mock = MockUpstream::start().await;
    let addr = mock.addr();
    mock.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn serve_runs_on_an_injected_listener_until_its_shutdown_future_completes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, async move {
        let _ = stopped.await;
    }));
    let response = http1()
        .request(
            Request::get(format!("http://{addr}/__mock/health"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn binary_prints_its_address_and_serves() {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mock-upstream"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .unwrap()
    .unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap();
    let request = Request::post(format!("http://{addr}/v1/chat/completions"))
        .header(header::OUTPUT_TOKENS, "2")
        .body(Full::new(Bytes::from(chat_request(false, false).to_string())))
        .unwrap();
    let response = http1().request(request).await.unwrap();
    let body: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 2);
    child.kill().await.unwrap();
}
