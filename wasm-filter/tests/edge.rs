//! The filter at the edge, in the real Envoy from the shipped bootstrap (`envoy/envoy.yaml`) and
//! in the same bootstrap with Envoy's buffer filter before or after it: nothing reaches the
//! upstream before an allow, the sidecar's edge refusals (413 from `Content-Length`, `CONNECT`)
//! and header hygiene (proxy and hop-by-hop headers removed), the client's request id kept, how
//! an unfinished response ends, and refused usage events kept in the outbox.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{Collector, Envoy, Relay};
use tollgate_e2e::harness::Harness;
use tollgate_e2e::mock::MockUpstream;

const POLICY: &str = r#"{"version": "edge-1", "defaults": {"llm": "allow", "tool": "deny", "other": "deny"},
  "rules": [{"id": "limited", "match": {"agent": "rpm-bot"}, "effect": "allow", "limits": {"rpm": 1}}]}"#;

/// Smaller than the sidecar's default so that an over-limit body is cheap to send.
const MAX_BODY: usize = 4096;

fn plugin(hold_headers: bool, collector: bool) -> String {
    let collector = if collector {
        r#""collector": {"cluster": "collector", "flush": "100ms", "retry_refused": "300ms"},"#
    } else {
        ""
    };
    format!(
        r#"{{"filter": {{{collector} "fail": "closed", "tick": "100ms",
            "hold_headers": {hold_headers}, "max_body_bytes": {MAX_BODY}}}, "policy": {POLICY}}}"#
    )
}

const BUFFER: &str = "          - name: envoy.filters.http.buffer\n            typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer, max_request_bytes: 17825792}\n";
const WASM_ENTRY: &str = "          - name: envoy.filters.http.wasm\n";
const ROUTER_ENTRY: &str = "          - name: envoy.filters.http.router\n";

/// The filter chains the filter must hold requests in.
#[derive(Clone, Copy, Debug)]
enum Chain {
    /// `envoy/envoy.yaml` as shipped: the filter, then the router.
    Shipped,
    /// Envoy's buffer filter first: the filter gets the head and the whole body at once.
    BufferBefore,
    /// Envoy's buffer filter between the filter and the router.
    BufferAfter,
    /// Where `allow_on_headers_stop_iteration` cannot be set (Istio's `WasmPlugin`):
    /// `hold_headers: false`, and Envoy's buffer filter after the filter holds the headers.
    NoHoldBufferAfter,
}

impl Chain {
    fn edit(self, yaml: &str) -> String {
        assert!(yaml.contains(WASM_ENTRY) && yaml.contains(ROUTER_ENTRY), "{yaml}");
        match self {
            Chain::Shipped => yaml.to_owned(),
            Chain::BufferBefore => yaml.replace(WASM_ENTRY, &format!("{BUFFER}{WASM_ENTRY}")),
            Chain::BufferAfter => yaml.replace(ROUTER_ENTRY, &format!("{BUFFER}{ROUTER_ENTRY}")),
            Chain::NoHoldBufferAfter => {
                yaml.replace(ROUTER_ENTRY, &format!("{BUFFER}{ROUTER_ENTRY}")).replace(
                    "allow_on_headers_stop_iteration: true",
                    "allow_on_headers_stop_iteration: false",
                )
            }
        }
    }

    fn holds(self) -> bool {
        !matches!(self, Chain::NoHoldBufferAfter)
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

fn who(request_id: &str) -> Vec<(&str, &str)> {
    vec![
        ("x-agent-id", "edge-bot"),
        ("x-cost-center", "CC-1234"),
        ("x-project-id", "PROJ-ABC123"),
        ("x-request-id", request_id),
    ]
}

/// What reached the upstream with `request_id`: in the mock's journal (a head whose body broke
/// off included) or in the raw bytes the relay in front of it passed on.
fn reached(mock: &MockUpstream, relay: &Relay, request_id: &str) -> Vec<String> {
    let mut found: Vec<String> = mock
        .requests()
        .iter()
        .filter(|r| r.header("x-request-id") == Some(request_id))
        .map(|r| format!("{} {} complete={}", r.method, r.path, r.complete))
        .collect();
    for bytes in relay.sent.lock().unwrap().iter() {
        if String::from_utf8_lossy(bytes).contains(request_id) {
            found.push(format!("raw: {}", String::from_utf8_lossy(bytes)));
        }
    }
    found
}

/// A chunked POST whose body comes in `pieces`, a moment apart (so Envoy sees the head first).
fn chunked(port: u16, path: &str, headers: &[(&str, &str)], pieces: &[&[u8]]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\n"
    );
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    for piece in pieces {
        std::thread::sleep(Duration::from_millis(150));
        let _ = stream.write_all(format!("{:x}\r\n", piece.len()).as_bytes());
        let _ = stream.write_all(piece);
        let _ = stream.write_all(b"\r\n");
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// In every chain: a body refused on its content, or for its size, leaves nothing upstream, not
/// even its head; an allowed one arrives whole, with an exact `content-length` after the usage
/// rewrite, without the proxy and hop-by-hop headers, with the client's request id.
#[test]
fn nothing_reaches_the_upstream_before_an_allow_in_any_chain() {
    let rt = runtime();
    let mock = rt.block_on(MockUpstream::start());
    let relay = Relay::start(mock.addr().port(), 0);
    for chain in [Chain::Shipped, Chain::BufferBefore, Chain::BufferAfter, Chain::NoHoldBufferAfter]
    {
        let envoy = Envoy::start_edited(
            &plugin(chain.holds(), false),
            relay.port,
            support::free_port(),
            support::free_port(),
            |yaml| chain.edit(yaml),
        );

        // A malformed body, sent in pieces after its head: 400, and nothing upstream.
        let bad = format!("edge-bad-{chain:?}");
        let answer = chunked(
            envoy.port,
            "/v1/chat/completions",
            &who(&bad),
            &[b"{\"model\": \"gpt-4o\", ", b"{not json"],
        );
        assert_eq!(status_of(&answer), 400, "{chain:?}: {answer}");
        assert!(answer.contains("malformed_body"), "{chain:?}: {answer}");

        // A body over `max_body_bytes` without a length: the sidecar's 413, nothing upstream.
        let big = format!("edge-big-{chain:?}");
        let piece = vec![b' '; MAX_BODY / 2 + 1];
        let answer = chunked(
            envoy.port,
            "/v1/chat/completions",
            &who(&big),
            &[b"{\"model\": \"gpt-4o\", \"messages\": []", &piece, &piece],
        );
        assert_eq!(status_of(&answer), 413, "{chain:?}: {answer}");
        assert!(answer.contains("body_too_large"), "{chain:?}: {answer}");

        // An allowed stream, with proxy and hop-by-hop headers: the body arrives rewritten to
        // ask for usage, with its exact length; the headers do not.
        let good = format!("edge-ok-{chain:?}");
        let mut headers = who(&good);
        headers.extend([
            ("proxy-authorization", "Basic dXNlcjpwYXNz"),
            ("proxy-authenticate", "Basic realm=x"),
            ("trailer", "x-checksum"),
            ("keep-alive", "timeout=5"),
        ]);
        let body = br#"{"model": "gpt-4o", "max_tokens": 5, "stream": true, "messages": []}"#;
        let answer = chunked(envoy.port, "/v1/chat/completions", &headers, &[body]);
        assert_eq!(status_of(&answer), 200, "{chain:?}: {answer}");
        assert!(
            answer.to_ascii_lowercase().contains(&format!("x-request-id: {good}").to_lowercase()),
            "the client's request id answers: {answer}"
        );

        std::thread::sleep(Duration::from_millis(300));
        for id in [&bad, &big] {
            let found = reached(&mock, &relay, id);
            assert!(found.is_empty(), "{chain:?}: {id} reached the upstream: {found:?}");
        }
        let arrived: Vec<_> = mock
            .requests()
            .into_iter()
            .filter(|r| r.header("x-request-id") == Some(good.as_str()))
            .collect();
        assert_eq!(arrived.len(), 1, "{chain:?}");
        let r = &arrived[0];
        assert!(r.complete);
        for name in ["proxy-authorization", "proxy-authenticate", "trailer", "keep-alive"] {
            assert_eq!(r.header(name), None, "{chain:?}: {name} went upstream");
        }
        assert_eq!(r.json().unwrap()["stream_options"]["include_usage"], true, "{chain:?}");
        assert_eq!(
            r.header("content-length"),
            Some(r.body.len().to_string().as_str()),
            "{chain:?}: the rewritten body's own length"
        );
        let log = envoy.log();
        assert!(!log.contains("panicked"), "{log}");
    }
}

/// The edge refusals answered as the sidecar answers them: a body announced over the limit is
/// refused from its `Content-Length` before any of it is sent, and a `CONNECT` at once, its
/// connection closed; a rate limit says the same `Retry-After` for the same window (both round
/// up); a header spelled with `_` is refused by Envoy.
#[test]
fn edge_refusals_match_the_sidecars() {
    let rt = runtime();
    let sidecar = rt.block_on(
        Harness::builder()
            .policy(POLICY)
            .extra(&format!("limits: {{max_body_bytes: {MAX_BODY}}}\n"))
            .start(),
    );
    let sidecar_port = sidecar.proxy_addr.port();
    let envoy =
        Envoy::start(&plugin(true, false), sidecar.mock.addr().port(), support::free_port());
    let tags = "x-agent-id: edge-bot\r\nx-cost-center: CC-1234\r\nx-project-id: PROJ-ABC123\r\n";
    let early = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n{tags}x-request-id: edge-413\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        MAX_BODY + 1
    );
    let connect = "CONNECT api.openai.com:443 HTTP/1.1\r\nhost: api.openai.com:443\r\nx-request-id: edge-connect\r\n\r\n";
    for (what, raw) in [("early 413", early.as_str()), ("CONNECT", connect)] {
        let from_envoy = support::raw(envoy.port, raw.as_bytes());
        let from_sidecar = support::raw(sidecar_port, raw.as_bytes());
        let json_of = |answer: &str| -> Value {
            let at = answer.find("\r\n\r\n").map_or(answer.len(), |i| i + 4);
            serde_json::from_str(&answer[at..]).unwrap_or(Value::Null)
        };
        assert_eq!(
            status_of(&from_envoy),
            status_of(&from_sidecar),
            "{what}:\n{from_envoy}\n{from_sidecar}"
        );
        assert_eq!(json_of(&from_envoy)["error"], json_of(&from_sidecar)["error"], "{what}");
        let reason = |a: &str| {
            a.lines().find_map(|l| {
                l.to_ascii_lowercase().strip_prefix("x-tollgate-reason: ").map(str::to_owned)
            })
        };
        assert_eq!(reason(&from_envoy), reason(&from_sidecar), "{what}");
        assert!(reason(&from_envoy).is_some(), "{what}: {from_envoy}");
    }
    // One request a minute: the second, right after the first, waits the rest of the minute.
    let limited = "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\nx-agent-id: rpm-bot\r\n\
         x-cost-center: CC-1234\r\nx-project-id: PROJ-ABC123\r\ncontent-type: application/json\r\n\
         content-length: 52\r\nconnection: close\r\n\r\n{\"model\": \"gpt-4o\", \"max_tokens\": 5, \"messages\": []}";
    let retry_after = |port: u16| -> Option<String> {
        let first = support::raw(port, limited.as_bytes());
        assert_eq!(status_of(&first), 200, "{first}");
        let second = support::raw(port, limited.as_bytes());
        assert_eq!(status_of(&second), 429, "{second}");
        second.lines().find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("retry-after: ").map(|v| v.trim().to_owned())
        })
    };
    let (envoy_wait, sidecar_wait) = (retry_after(envoy.port), retry_after(sidecar_port));
    assert_eq!(envoy_wait, sidecar_wait, "the same window, the same Retry-After");
    assert_eq!(envoy_wait.as_deref(), Some("60"), "a minute less a few ms, rounded up");

    let from_envoy = support::raw(envoy.port, connect.as_bytes());
    assert_eq!(status_of(&from_envoy), 404, "{from_envoy}");
    assert!(from_envoy.to_ascii_lowercase().contains("connection: close"), "{from_envoy}");
    let underscore = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n{tags}x_cost_center: CC-9\r\n\
         content-length: 2\r\nconnection: close\r\n\r\n{{}}"
    );
    assert_eq!(status_of(&support::raw(envoy.port, underscore.as_bytes())), 400);
    std::thread::sleep(Duration::from_millis(200));
    let upstream: Vec<_> = sidecar
        .mock
        .requests()
        .into_iter()
        .filter(|r| r.header("x-request-id").is_some_and(|id| id.starts_with("edge-")))
        .collect();
    assert!(upstream.is_empty(), "nothing refused was sent upstream: {upstream:?}");
    assert!(!envoy.log().contains("panicked"));
}

/// A response that does not complete is recorded as the sidecar records it: `client_gone` when
/// the client hangs up, `upstream_error` when the upstream resets the stream.
#[test]
fn an_unfinished_response_ends_as_in_the_sidecar() {
    let rt = runtime();
    let mock = rt.block_on(MockUpstream::start());
    let collector = Collector::start();
    let envoy = Envoy::start(&plugin(true, true), mock.addr().port(), collector.port);
    let body = serde_json::to_vec(&json!({"model": "gpt-4o", "max_tokens": 50, "stream": true,
        "messages": [{"role": "user", "content": "Say hello."}]}))
    .unwrap();

    let mut headers = who("edge-gone");
    headers.extend([("x-mock-events", "40"), ("x-mock-event-delay-ms", "100")]);
    let (head, mut reader) =
        support::send(envoy.port, "POST", "/v1/chat/completions", &headers, &body).unwrap();
    assert_eq!(head.status, 200);
    let mut first = [0u8; 64];
    let _ = reader.read(&mut first).unwrap();
    drop(reader);
    let gone = collector.wait_for("edge-gone");
    assert_eq!(gone["end"], "client_gone", "{gone}");

    let mut headers = who("edge-reset");
    headers.push(("x-mock-reset-after", "2"));
    let (head, mut reader) =
        support::send(envoy.port, "POST", "/v1/chat/completions", &headers, &body).unwrap();
    assert_eq!(head.status, 200);
    let _ = support::read_body(&head, &mut reader, |_| {});
    let reset = collector.wait_for("edge-reset");
    assert_eq!(reset["end"], "upstream_error", "{reset}");
    assert!(!envoy.log().contains("panicked"));
}

/// An event the collector refuses stays in the outbox (`tollgate_usage_events_held`), is
/// logged with why and counted per event, and reaches the collector once it takes it.
#[test]
fn a_refused_usage_event_stays_in_the_outbox_until_taken() {
    let rt = runtime();
    let mock = rt.block_on(MockUpstream::start());
    let collector = Collector::refusing(1);
    let envoy = Envoy::start(&plugin(true, true), mock.addr().port(), collector.port);
    let body = br#"{"model": "gpt-4o", "max_tokens": 5, "messages": []}"#;
    let r = envoy.request("POST", "/v1/chat/completions", &who("edge-held"), body);
    assert_eq!(r.status, 200);
    assert_eq!(envoy.wait_metric("tollgate_usage_events_rejected_total", 1), 1);
    let event = collector.wait_for("edge-held");
    assert_eq!(event["request_id"], "edge-held");
    let offered = collector.offered.lock().unwrap().len();
    assert_eq!(offered, 2, "refused once, then taken");
    let deadline = Instant::now() + Duration::from_secs(10);
    while envoy.metric("tollgate_usage_events_held") != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(envoy.metric("tollgate_usage_events_held"), 0, "released once taken");
    assert_eq!(envoy.wait_metric("tollgate_usage_events_sent_total", 1), 1);
    let log = envoy.log();
    assert!(
        log.contains("refused usage event") && log.contains("ts_ms: more than a day in the future"),
        "the log names why: {log}"
    );
    assert!(!log.contains("panicked"));
}

/// `filter.collector.flush` is the interval at which each VM sends its outbox, on its own timer:
/// with a 100 ms tick and a 1 s flush, no VM (told apart by the event id's prefix) sends two
/// batches less than a flush apart, however many requests end in between.
#[test]
fn each_vm_sends_its_outbox_every_flush_interval() {
    let rt = runtime();
    let mock = rt.block_on(MockUpstream::start());
    let collector = Collector::start();
    let plugin = format!(
        r#"{{"filter": {{"collector": {{"cluster": "collector", "flush": "1s"}}, "tick": "100ms"}},
            "policy": {POLICY}}}"#
    );
    let envoy = Envoy::start(&plugin, mock.addr().port(), collector.port);
    let body = br#"{"model": "gpt-4o", "max_tokens": 5, "messages": []}"#;
    let sent = 12;
    for i in 0..sent {
        let r =
            envoy.request("POST", "/v1/chat/completions", &who(&format!("edge-flush-{i}")), body);
        assert_eq!(r.status, 200);
        std::thread::sleep(Duration::from_millis(250));
    }
    for i in 0..sent {
        collector.wait_for(&format!("edge-flush-{i}"));
    }
    let batches = collector.batches.lock().unwrap().clone();
    let mut by_vm: std::collections::BTreeMap<String, Vec<Instant>> = Default::default();
    for (at, ids) in &batches {
        let vm = ids[0].split('-').next().unwrap().to_owned();
        assert!(ids.iter().all(|id| id.starts_with(&vm)), "one VM per batch: {ids:?}");
        by_vm.entry(vm).or_default().push(*at);
    }
    assert!(batches.len() < sent, "events were batched: {batches:?}");
    for (vm, times) in &by_vm {
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(gap >= Duration::from_millis(900), "VM {vm} sent twice within {gap:?}");
        }
    }
    assert!(!envoy.log().contains("panicked"));
}

/// A request body that stalls is answered `408 body_timeout` and its connection closed after
/// `filter.body_idle_timeout`, as the sidecar does after `limits.body_idle_timeout` (Envoy's own
/// stream idle timeout, 120 s, would wait much longer); nothing reaches the upstream.
#[test]
fn a_stalled_body_is_answered_as_in_the_sidecar() {
    let rt = runtime();
    let sidecar = rt.block_on(
        Harness::builder().policy(POLICY).extra("limits: {body_idle_timeout: 1s}\n").start(),
    );
    let plugin = format!(
        r#"{{"filter": {{"tick": "100ms", "body_idle_timeout": "1s"}}, "policy": {POLICY}}}"#
    );
    let envoy = Envoy::start(&plugin, sidecar.mock.addr().port(), support::free_port());
    let stall = |port: u16| -> (String, Duration) {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n\
                    x-agent-id: edge-bot\r\nx-cost-center: CC-1234\r\nx-project-id: PROJ-ABC123\r\n\
                    x-request-id: edge-stalled\r\ncontent-type: application/json\r\n\
                    content-length: 100\r\n\r\n{\"model\": \"gpt-4o\", ";
        stream.write_all(head.as_bytes()).unwrap();
        let started = Instant::now();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        (String::from_utf8_lossy(&answer).into_owned(), started.elapsed())
    };
    let (from_envoy, waited) = stall(envoy.port);
    let (from_sidecar, _) = stall(sidecar.proxy_addr.port());
    assert_eq!(status_of(&from_envoy), 408, "{from_envoy}");
    assert_eq!(status_of(&from_sidecar), 408, "{from_sidecar}");
    for answer in [&from_envoy, &from_sidecar] {
        assert!(answer.contains("body_timeout"), "{answer}");
        assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    }
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(5), "{waited:?}");
    std::thread::sleep(Duration::from_millis(200));
    let reached: Vec<_> = sidecar
        .mock
        .requests()
        .into_iter()
        .filter(|r| r.header("x-request-id") == Some("edge-stalled"))
        .collect();
    assert!(reached.is_empty(), "{reached:?}");
    assert!(!envoy.log().contains("panicked"));
}

/// Absurd usage reaches the collector's invoice: a request whose upstream claims 2^64-1 tokens
/// each way is billed at its bound by the filter and its event taken by the Tollgate collector;
/// an event whose cost does not add up (as an overflowing price would make it) is taken too,
/// marked implausible at the most it claims, never refused. Both are on the agent's invoice.
#[test]
fn absurd_usage_reaches_the_collectors_invoice() {
    use tollgate_core::engine::Engine;
    use tollgate_core::metering::Api;
    use tollgate_core::money::Money;
    use tollgate_core::{inspect, reservation};

    let rt = runtime();
    let proxy = rt.block_on(Harness::builder().start());
    let admin_port: u16 = proxy.admin.rsplit(':').next().unwrap().parse().unwrap();
    let plugin = json!({
        "filter": {"collector": {"cluster": "collector", "flush": "100ms",
            "headers": {"authorization": format!("Bearer {}", proxy.token)}}},
        "policy": serde_json::from_str::<Value>(POLICY).unwrap(),
    })
    .to_string();
    let envoy = Envoy::start(&plugin, proxy.mock.addr().port(), admin_port);

    let body = br#"{"model": "gpt-4o", "max_tokens": 100, "messages": []}"#;
    let absurd = u64::MAX.to_string();
    let mut headers = vec![
        ("x-agent-id", "absurd-bot"),
        ("x-cost-center", "CC-1234"),
        ("x-project-id", "PROJ-ABC123"),
        ("x-request-id", "edge-absurd"),
    ];
    headers.extend([("x-mock-input-tokens", absurd.as_str()), ("x-mock-output-tokens", &absurd)]);
    let r = envoy.request("POST", "/v1/chat/completions", &headers, body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let engine = Engine::from_document(&format!(r#"{{"policy": {POLICY}}}"#)).unwrap();
    let info = inspect::inspect(Some(Api::ChatCompletions), body).unwrap();
    let bound =
        reservation::bound(Some(Api::ChatCompletions), &info, engine.rates().limits("gpt-4o"));
    let worst = engine.rates().worst_case("gpt-4o", bound.input, bound.output).unwrap().cost.total;

    // An event as a broken sender would send it: buckets that miss the total.
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
            as u64;
    let event = json!({
        "event_id": "edge-direct-1", "ts_ms": now, "request_id": "edge-direct",
        "agent": "absurd-bot", "cost_center": "CC-1234", "project": "PROJ-ABC123",
        "provider": "openai", "model": "gpt-4o",
        "tokens": {"input": 10, "output": 10},
        "cost": {"input": "0.001", "output": "0.002", "total": "0.001"},
        "decision": "allow", "status": 200, "usage_source": "reported", "end": "complete"
    });
    let auth = format!("Bearer {}", proxy.token);
    let answer = support::request(
        admin_port,
        "POST",
        "/v1/usage/events",
        &[("authorization", &auth)],
        format!("{event}\n").as_bytes(),
    );
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    let answer = answer.json();
    assert_eq!(answer["results"][0]["result"], "accepted", "{answer}");
    assert_eq!(answer["results"][0]["implausible"], true, "{answer}");

    let deadline = Instant::now() + Duration::from_secs(15);
    let records = loop {
        let records: Vec<Value> = rt
            .block_on(proxy.ledger())
            .into_iter()
            .filter(|r| r["agent"] == "absurd-bot")
            .collect();
        if records.len() == 2 || Instant::now() > deadline {
            break records;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(records.len(), 2, "{records:?}");
    for r in &records {
        assert_eq!(r["usage_source"], "implausible", "{r}");
    }
    let from_envoy = records.iter().find(|r| r["request_id"] == "edge-absurd").unwrap();
    assert_eq!(from_envoy["cost_nano_usd"], worst.nanos(), "billed at the bound: {from_envoy}");

    let period = &tollgate_core::time::UnixMillis(now).to_string()[..7];
    let path = format!("/admin/invoice?period={period}&group_by=agent&format=json");
    let reply = rt.block_on(proxy.admin_get(&path, true));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let all = reply.json();
    let invoice =
        all["invoices"].as_array().unwrap().iter().find(|i| i["group"] == "absurd-bot").unwrap();
    assert_eq!(invoice["requests"], 2, "{invoice}");
    let total = Money::parse(invoice["total"].as_str().unwrap()).unwrap();
    assert_eq!(total, worst + Money::parse("0.003").unwrap(), "{invoice}");
    assert!(!envoy.log().contains("panicked"));
}
