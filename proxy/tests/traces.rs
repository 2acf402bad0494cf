//! Traces against a real process and a real OTLP/HTTP receiver: the `tollgate` binary exports
//! one span per proxied call to a collector run here on loopback (the protobuf bodies decoded
//! with the OTLP types), with the GenAI attributes, Tollgate's own, the caller's trace as the
//! parent, and the trace passed on to the (mock) upstream. Off, nothing is sent and no
//! `traceparent` is added.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode, Span};
use prost::Message;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tollgate_e2e::harness::{read_ledger, temp_dir};
use tollgate_e2e::mock::{header, MockUpstream, RecordedRequest};
use tollgate_e2e::process::{command, ConfigFile, Tollgate};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
const TOKEN_ENV: &str = "TOLLGATE_TRACES_TEST_TOKEN";
const POLICY: &str = "version: traces-1\n\
                      defaults: {llm: allow, tool: allow, other: deny}\n\
                      rules:\n\
                      \x20 - {id: no-o1, match: {model: o1}, effect: deny, reason: banned_model}\n";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// What the collector received: each span with its resource's `service.name`.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// An OTLP/HTTP traces receiver on loopback: decodes each `POST /v1/traces` body and answers
/// with an empty success.
async fn collector() -> (SocketAddr, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the collector");
    let addr = listener.local_addr().expect("collector address");
    let received: Received = Arc::default();
    let spans = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let spans = spans.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let spans = spans.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        assert_eq!(
                            req.headers()["content-type"],
                            "application/x-protobuf",
                            "OTLP over HTTP with protobuf bodies"
                        );
                        let body = req.into_body().collect().await.expect("body").to_bytes();
                        let export =
                            ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
                        for resource in export.resource_spans {
                            let service = resource
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|kv| kv.key == "service.name")
                                .and_then(|kv| kv.value.as_ref()?.value.clone())
                                .map(|v| match v {
                                    Any::StringValue(s) => s,
                                    other => format!("{other:?}"),
                                })
                                .unwrap_or_default();
                            for scope in resource.scope_spans {
                                for span in scope.spans {
                                    spans.lock().unwrap().push((service.clone(), span));
                                }
                            }
                        }
                        let answer = ExportTraceServiceResponse::default().encode_to_vec();
                        let response = hyper::Response::builder()
                            .header("content-type", "application/x-protobuf")
                            .body(Full::new(Bytes::from(answer)))
                            .expect("response");
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, received)
}

fn start(dir: &Path, mock: &MockUpstream, extra: &str) -> (Tollgate, std::path::PathBuf) {
    let data_dir = dir.join("data");
    let mcp =
        format!("{{name: tools, path_prefix: /mcp, kind: mcp, upstream: \"{}\"}}", mock.base_url());
    let yaml = ConfigFile {
        upstream: &mock.base_url(),
        data_dir: &data_dir,
        token_env: TOKEN_ENV,
        more_routes: &[mcp],
        extra,
        policy: POLICY,
    }
    .yaml();
    let path = dir.join("tollgate.yaml");
    std::fs::write(&path, yaml).expect("write config");
    let proxy =
        tokio::task::block_in_place(|| Tollgate::run(Path::new(BIN), &path, &[(TOKEN_ENV, "t")]));
    (proxy, data_dir)
}

/// Sends `body` to `path` with the attribution headers and `more`; the status and whole body.
async fn send(
    client: &HttpClient,
    proxy: SocketAddr,
    path: &str,
    body: Value,
    more: &[(&str, &str)],
) -> (u16, String) {
    let mut request = hyper::Request::post(format!("http://{proxy}{path}"))
        .header("content-type", "application/json")
        .header("x-agent-id", "trace-agent")
        .header("x-cost-center", "CC-1234")
        .header("x-project-id", "PROJ-ABC123");
    for (k, v) in more {
        request = request.header(*k, *v);
    }
    let request = request.body(Full::new(Bytes::from(body.to_string()))).expect("request");
    let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
        .await
        .expect("answered in time")
        .expect("response");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Sends `request` as bytes on a new connection to `to` and reads the answer to its end.
async fn raw(to: SocketAddr, request: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(to).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

/// Waits (at most 10 s) until `n` spans arrived.
async fn spans(received: &Received, n: usize) -> Vec<(String, Span)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = received.lock().unwrap().clone();
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Any> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn text(span: &Span, key: &str) -> String {
    match attr(span, key) {
        Some(Any::StringValue(s)) => s.clone(),
        other => panic!("{key}: expected a string, found {other:?} on `{}`", span.name),
    }
}

fn int(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Some(Any::IntValue(n)) => *n,
        other => panic!("{key}: expected an int, found {other:?} on `{}`", span.name),
    }
}

fn strings(span: &Span, key: &str) -> Vec<String> {
    match attr(span, key) {
        Some(Any::ArrayValue(a)) => a
            .values
            .iter()
            .map(|v| match &v.value {
                Some(Any::StringValue(s)) => s.clone(),
                other => panic!("{key}: a non-string item {other:?}"),
            })
            .collect(),
        other => panic!("{key}: expected an array, found {other:?} on `{}`", span.name),
    }
}

fn span_by_request<'a>(spans: &'a [(String, Span)], id: &str) -> &'a Span {
    spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| matches!(attr(s, "tollgate.request_id"), Some(Any::StringValue(v)) if v == id))
        .unwrap_or_else(|| {
            let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
            panic!("no span for request {id}; got {names:?}")
        })
}

fn upstream_request<'a>(mock: &'a [RecordedRequest], id: &str) -> &'a RecordedRequest {
    mock.iter()
        .find(|r| r.header("x-request-id") == Some(id))
        .unwrap_or_else(|| panic!("the upstream never saw request {id}"))
}

/// `traceparent` split into (trace id, parent id, flags).
fn traceparent(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent `{value}`");
    assert_eq!(parts[0], "00", "version of `{value}`");
    (parts[1].to_string(), parts[2].to_string(), parts[3].to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn ledger_record<'a>(ledger: &'a [Value], id: &str) -> &'a Value {
    ledger
        .iter()
        .find(|r| r["request_id"] == id)
        .unwrap_or_else(|| panic!("no ledger record for {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_proxied_call_is_one_span_with_the_gen_ai_and_tollgate_attributes() {
    let (collector, received) = collector().await;
    let mock = MockUpstream::start().await;
    let dir = temp_dir("traces-on");
    // HTTPS_PROXY mode on too: its requests go through the same pipeline, and get spans too.
    let ca = dir.join("ca");
    let made = command(Path::new(BIN), &["ca", "init", "--dir", ca.to_str().unwrap()]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let extra = format!(
        "traces:\n\
         \x20 enabled: true\n\
         \x20 endpoint: \"http://{collector}/v1/traces\"\n\
         \x20 service_name: tollgate-under-test\n\
         \x20 export_interval: 100ms\n\
         forward_proxy: {{enabled: true, ca_cert: {cert:?}, ca_key: {key:?}}}\n",
        cert = ca.join("ca.pem").display().to_string(),
        key = ca.join("ca-key.pem").display().to_string(),
    );
    let (mut proxy, data_dir) = start(&dir, &mock, &extra);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let parent = format!("00-{TRACE_ID}-{PARENT_ID}-01");

    // 1. A chat completion under the caller's trace, with cached and reasoning tokens.
    let chat = json!({"model": "gpt-4.1", "max_tokens": 64,
                      "messages": [{"role": "user", "content": "hello there"}]});
    let (status, body) = send(
        &client,
        proxy.proxy,
        "/v1/chat/completions",
        chat.clone(),
        &[
            ("x-request-id", "chat-1"),
            ("traceparent", &parent),
            ("tracestate", "vendor=abc"),
            (header::INPUT_TOKENS, "120"),
            (header::CACHED_TOKENS, "100"),
            (header::OUTPUT_TOKENS, "40"),
            (header::REASONING_TOKENS, "15"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // 2. A streamed one without a traceparent: the proxy starts the trace.
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let (status, body) = send(
        &client,
        proxy.proxy,
        "/v1/chat/completions",
        streamed,
        &[("x-request-id", "stream-1"), (header::EVENTS, "7")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("[DONE]"), "{body}");

    // 3. A refusal, under the caller's trace.
    let denied = json!({"model": "o1", "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = send(
        &client,
        proxy.proxy,
        "/v1/chat/completions",
        denied,
        &[("x-request-id", "deny-1"), ("traceparent", &parent)],
    )
    .await;
    assert_eq!(status, 403, "{body}");

    // 4. The upstream fails.
    let (status, _) = send(
        &client,
        proxy.proxy,
        "/v1/chat/completions",
        chat,
        &[("x-request-id", "fail-1"), (header::STATUS, "503")],
    )
    .await;
    assert_eq!(status, 503);

    // 5. An MCP tool call.
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "echo", "arguments": {"text": "hi"}}});
    let (status, body) =
        send(&client, proxy.proxy, "/mcp", call, &[("x-request-id", "tool-1")]).await;
    assert_eq!(status, 200, "{body}");

    // 6. Through the forward proxy: an absolute-form request to the upstream's own URL.
    let body =
        json!({"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let head = format!(
        "POST http://{mock}/v1/chat/completions HTTP/1.1\r\nhost: {mock}\r\n\
         content-type: application/json\r\ncontent-length: {len}\r\n\
         x-agent-id: trace-agent\r\nx-cost-center: CC-1234\r\nx-project-id: PROJ-ABC123\r\n\
         x-request-id: forward-1\r\ntraceparent: {parent}\r\nconnection: close\r\n\r\n",
        mock = mock.addr(),
        len = body.len(),
    );
    let answer = raw(proxy.proxy, format!("{head}{body}")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let got = spans(&received, 6).await;
    assert_eq!(
        got.len(),
        6,
        "one span per call: {:?}",
        got.iter().map(|s| &s.1.name).collect::<Vec<_>>()
    );
    assert!(got.iter().all(|(service, _)| service == "tollgate-under-test"));
    // Stopped cleanly: its ledger is on disk.
    proxy.signal("TERM");
    assert_eq!(tokio::task::block_in_place(|| proxy.exit_code()), Some(0));
    let ledger = read_ledger(&data_dir);
    let upstream = mock.requests();

    // 1: every attribute, the caller's trace as parent, the trace passed on.
    let span = span_by_request(&got, "chat-1");
    assert_eq!(span.name, "chat gpt-4.1");
    assert_eq!(span.kind, SpanKind::Client as i32);
    assert_eq!(hex(&span.trace_id), TRACE_ID);
    assert_eq!(hex(&span.parent_span_id), PARENT_ID);
    assert_eq!(span.trace_state, "vendor=abc");
    assert_eq!(text(span, "gen_ai.operation.name"), "chat");
    assert_eq!(text(span, "gen_ai.provider.name"), "openai");
    assert_eq!(text(span, "gen_ai.request.model"), "gpt-4.1");
    assert_eq!(text(span, "gen_ai.response.model"), "gpt-4.1");
    assert_eq!(int(span, "gen_ai.request.max_tokens"), 64);
    assert_eq!(strings(span, "gen_ai.response.finish_reasons"), ["stop"]);
    // OpenAI's counts already include the cached and reasoning tokens, as the conventions want.
    assert_eq!(int(span, "gen_ai.usage.input_tokens"), 120);
    assert_eq!(int(span, "gen_ai.usage.output_tokens"), 40);
    assert_eq!(int(span, "gen_ai.usage.cache_read.input_tokens"), 100);
    assert_eq!(int(span, "gen_ai.usage.reasoning.output_tokens"), 15);
    assert!(attr(span, "gen_ai.usage.cache_creation.input_tokens").is_none(), "0 is left out");
    assert_eq!(text(span, "server.address"), "127.0.0.1");
    assert_eq!(int(span, "server.port"), i64::from(mock.addr().port()));
    assert_eq!(int(span, "http.response.status_code"), 200);
    assert_eq!(text(span, "tollgate.decision"), "allow");
    assert_eq!(text(span, "tollgate.reason"), "default_allow");
    assert_eq!(text(span, "tollgate.clause"), "defaults.llm");
    assert_eq!(text(span, "tollgate.policy_version"), "traces-1");
    assert_eq!(text(span, "tollgate.agent"), "trace-agent");
    assert_eq!(text(span, "tollgate.cost_center"), "CC-1234");
    assert_eq!(text(span, "tollgate.project"), "PROJ-ABC123");
    assert_eq!(text(span, "tollgate.usage_source"), "reported");
    assert_eq!(text(span, "tollgate.end"), "complete");
    let record = ledger_record(&ledger, "chat-1");
    assert_eq!(int(span, "tollgate.cost_nano_usd"), record["cost_nano_usd"].as_i64().unwrap());
    assert!(int(span, "tollgate.cost_nano_usd") > 0, "a priced call");
    let usd =
        record["cost_usd"].as_str().map(str::to_string).unwrap_or(record["cost_usd"].to_string());
    assert_eq!(text(span, "tollgate.cost_usd"), usd, "the ledger's exact decimal");
    assert!(span.status.as_ref().is_none_or(|s| s.code != StatusCode::Error as i32));
    let sent = upstream_request(&upstream, "chat-1");
    let (trace, parent_id, flags) =
        traceparent(sent.header("traceparent").expect("traceparent upstream"));
    assert_eq!(trace, TRACE_ID, "the upstream continues the caller's trace");
    assert_eq!(parent_id, hex(&span.span_id), "under the proxy's span");
    assert_eq!(flags, "01");
    assert_eq!(sent.header("tracestate"), Some("vendor=abc"));

    // 2: a root span whose trace the upstream continues; streamed usage and finish reason.
    let span = span_by_request(&got, "stream-1");
    assert_eq!(span.name, "chat gpt-4.1");
    assert!(span.parent_span_id.is_empty(), "no caller trace: a root span");
    assert_eq!(strings(span, "gen_ai.response.finish_reasons"), ["stop"]);
    assert_eq!(int(span, "gen_ai.usage.output_tokens"), 7);
    let record = ledger_record(&ledger, "stream-1");
    assert_eq!(int(span, "gen_ai.usage.input_tokens"), record["tokens"]["input"].as_i64().unwrap());
    assert_eq!(int(span, "tollgate.cost_nano_usd"), record["cost_nano_usd"].as_i64().unwrap());
    let sent = upstream_request(&upstream, "stream-1");
    let (trace, parent_id, _) =
        traceparent(sent.header("traceparent").expect("traceparent upstream"));
    assert_eq!(trace, hex(&span.trace_id));
    assert_eq!(parent_id, hex(&span.span_id));
    assert_eq!(sent.header("tracestate"), None);

    // 3: the refusal's span, under the caller's trace; nothing went upstream.
    let span = span_by_request(&got, "deny-1");
    assert_eq!(span.name, "chat o1");
    assert_eq!(hex(&span.trace_id), TRACE_ID);
    assert_eq!(hex(&span.parent_span_id), PARENT_ID);
    assert_eq!(text(span, "gen_ai.request.model"), "o1");
    assert_eq!(text(span, "tollgate.decision"), "deny");
    assert_eq!(text(span, "tollgate.reason"), "banned_model");
    assert_eq!(text(span, "tollgate.clause"), "no-o1");
    assert_eq!(text(span, "tollgate.policy_version"), "traces-1");
    assert_eq!(text(span, "tollgate.agent"), "trace-agent");
    assert_eq!(text(span, "tollgate.cost_usd"), "0.00");
    assert_eq!(int(span, "http.response.status_code"), 403);
    assert!(attr(span, "error.type").is_none(), "a policy refusal is no error");
    assert!(upstream.iter().all(|r| r.header("x-request-id") != Some("deny-1")));

    // 4: an upstream 5xx is an error.
    let span = span_by_request(&got, "fail-1");
    assert_eq!(span.status.as_ref().map(|s| s.code), Some(StatusCode::Error as i32));
    assert_eq!(text(span, "error.type"), "503");
    assert_eq!(int(span, "http.response.status_code"), 503);

    // 5: a tool call is `execute_tool`.
    let span = span_by_request(&got, "tool-1");
    assert_eq!(span.name, "execute_tool echo");
    assert_eq!(text(span, "gen_ai.operation.name"), "execute_tool");
    assert_eq!(text(span, "gen_ai.tool.name"), "echo");
    assert_eq!(text(span, "mcp.method.name"), "tools/call");
    assert!(attr(span, "gen_ai.usage.input_tokens").is_none());

    // 6: HTTPS_PROXY mode's call, under the caller's trace, passed on.
    let span = span_by_request(&got, "forward-1");
    assert_eq!(span.name, "chat gpt-4.1");
    assert_eq!(hex(&span.parent_span_id), PARENT_ID);
    assert_eq!(text(span, "tollgate.decision"), "allow");
    assert!(int(span, "gen_ai.usage.input_tokens") > 0);
    let sent = upstream_request(&upstream, "forward-1");
    let (trace, parent_id, _) = traceparent(sent.header("traceparent").expect("traceparent"));
    assert_eq!((trace.as_str(), parent_id), (TRACE_ID, hex(&span.span_id)));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_off_send_nothing_and_add_no_traceparent() {
    let (collector, received) = collector().await;
    let mock = MockUpstream::start().await;
    let dir = temp_dir("traces-off");
    // The section is there, pointing at the collector, but off (the default).
    let extra =
        format!("traces: {{endpoint: \"http://{collector}/v1/traces\", export_interval: 50ms}}\n");
    let (mut proxy, _) = start(&dir, &mock, &extra);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let chat = json!({"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]});
    let (status, _) = send(
        &client,
        proxy.proxy,
        "/v1/chat/completions",
        chat.clone(),
        &[("x-request-id", "plain")],
    )
    .await;
    assert_eq!(status, 200);
    let parent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let (status, _) = send(
        &client,
        proxy.proxy,
        "/v1/chat/completions",
        chat,
        &[("x-request-id", "traced"), ("traceparent", &parent)],
    )
    .await;
    assert_eq!(status, 200);
    let denied = json!({"model": "o1", "messages": [{"role": "user", "content": "hi"}]});
    let (status, _) = send(&client, proxy.proxy, "/v1/chat/completions", denied, &[]).await;
    assert_eq!(status, 403);
    // Stopped cleanly (the exporter would flush now if there were one), then a wait longer
    // than the export interval.
    proxy.signal("TERM");
    assert_eq!(tokio::task::block_in_place(|| proxy.exit_code()), Some(0));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(received.lock().unwrap().is_empty(), "traces off export nothing");
    let upstream = mock.requests();
    assert_eq!(upstream_request(&upstream, "plain").header("traceparent"), None);
    assert_eq!(
        upstream_request(&upstream, "traced").header("traceparent"),
        Some(parent.as_str()),
        "a caller's traceparent passes untouched"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_cannot_be_reached_is_logged_and_calls_still_pass() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = closed.local_addr().expect("address");
    drop(closed);
    let mock = MockUpstream::start().await;
    let dir = temp_dir("traces-down");
    let extra = format!(
        "traces: {{enabled: true, endpoint: \"http://{endpoint}/v1/traces\", export_interval: 50ms}}\n"
    );
    let (proxy, _) = start(&dir, &mock, &extra);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let chat = json!({"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]});
    for i in 0..3 {
        let id = format!("down-{i}");
        let (status, body) = send(
            &client,
            proxy.proxy,
            "/v1/chat/completions",
            chat.clone(),
            &[("x-request-id", &id)],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line = tokio::task::block_in_place(|| {
        proxy.wait_for("exporting traces failed; spans are dropped while it does")
    });
    assert!(line["fields"]["error"].is_string(), "{line}");
    let _ = std::fs::remove_dir_all(dir);
}
