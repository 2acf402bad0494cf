//! HTTPS_PROXY / HTTP_PROXY mode end to end: the proxy intercepts `CONNECT`s to the hosts its
//! routes name (api.openai.com, api.anthropic.com — played by a local TLS mock through an
//! upstream address override), terminating TLS with a certificate minted from its own CA and
//! running every request through the same pipeline as reverse mode; other hosts, loopback and
//! metadata addresses are refused.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_e2e::forward::{connect, tls_over, Forward};
use tollgate_e2e::harness::{read_ledger, tags};
use tollgate_e2e::mock::MockUpstream;
use tollgate_e2e::sdk::{self, Checks};

fn chat_request(host: &str, headers: &[(String, String)], stream: bool) -> Request<Full<Bytes>> {
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 20, "stream": stream});
    let mut req = Request::post(format!("https://{host}/v1/chat/completions"))
        .header("host", host)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test");
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    req.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

async fn body_of(response: hyper::Response<hyper::body::Incoming>) -> (u16, Bytes) {
    let status = response.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (status, body)
}

#[tokio::test]
async fn intercepted_connect_serves_http2_and_http1_through_the_pipeline() {
    let f = Forward::start("version: v1\ndefaults: {llm: allow}\n", "").await;

    // HTTP/2 by ALPN, several requests (one streamed) on one intercepted connection.
    let (tcp, head) = connect(f.addr, "api.openai.com:443", "").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let tls = tls_over(tcp, "api.openai.com", &f.ca_cert, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (status, body) = body_of(
        h2.send_request(chat_request("api.openai.com", &tags("fwd-h2"), false)).await.unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body:?}");
    let reply: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(reply["choices"][0]["message"]["content"], "Hello from the mock upstream");
    let (status, body) = body_of(
        h2.send_request(chat_request("api.openai.com", &tags("fwd-h2"), true)).await.unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let events = tollgate_e2e::harness::sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    // Untagged: refused in OpenAI's shape, never forwarded.
    let (status, body) =
        body_of(h2.send_request(chat_request("api.openai.com", &[], false)).await.unwrap()).await;
    assert_eq!(status, 403);
    let reply: Value = serde_json::from_slice(&body).unwrap();
    assert!(reply["error"]["message"].as_str().unwrap().contains("x-agent-id"), "{reply}");

    // HTTP/1.1, with attribution from the CONNECT's proxy credentials only.
    let creds = "Proxy-Authorization: Basic ZndkLWgxOmNvc3RfY2VudGVyPUNDLTEyMzQscHJvamVjdD1QUk9KLUFCQzEyMw==\r\n";
    // = base64("fwd-h1:cost_center=CC-1234,project=PROJ-ABC123")
    let (tcp, head) = connect(f.addr, "api.openai.com:443", creds).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let tls = tls_over(tcp, "api.openai.com", &f.ca_cert, &[b"http/1.1"]).await;
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let (status, body) =
        body_of(h1.send_request(chat_request("api.openai.com", &[], false)).await.unwrap()).await;
    assert_eq!(status, 200, "{body:?}");
    // A request header contradicting the connection's credentials is refused.
    let (status, body) = body_of(
        h1.send_request(chat_request("api.openai.com", &tags("someone-else"), false))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 403);
    assert!(
        String::from_utf8_lossy(&body).contains("contradicts the proxy credentials"),
        "{body:?}"
    );

    // Credentials Tollgate cannot read are refused on the CONNECT, naming the problem.
    let (_, head) =
        connect(f.addr, "api.openai.com:443", "Proxy-Authorization: Basic YTpi\r\n").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(head.contains("x-tollgate-reason: bad_proxy_authorization"), "{head}");

    // Three forwarded; the mock saw real TLS + HTTP/2 from the proxy, no attribution headers
    // and no proxy credentials.
    let seen = f.mock.requests();
    assert_eq!(seen.len(), 3);
    for r in &seen {
        assert_eq!(r.header("host"), Some("api.openai.com"));
        assert_eq!(r.header("authorization"), Some("Bearer sk-test"));
        for h in ["x-agent-id", "x-cost-center", "x-project-id", "proxy-authorization"] {
            assert!(r.header(h).is_none(), "{h} leaked upstream");
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let ledger = loop {
        let ledger = f.ledger().await;
        if ledger.len() >= 3 || std::time::Instant::now() > deadline {
            break ledger;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let agents: Vec<&str> = ledger.iter().map(|r| r["agent"].as_str().unwrap()).collect();
    assert_eq!(agents, ["fwd-h2", "fwd-h2", "fwd-h1"]);
    for r in &ledger {
        assert_eq!(r["route"], "openai");
        assert_eq!(r["usage_source"], "reported", "{r}");
        let (input, output) =
            (r["tokens"]["input"].as_i64().unwrap(), r["tokens"]["output"].as_i64().unwrap());
        assert_eq!(r["cost_nano_usd"].as_i64().unwrap(), input * 2_500 + output * 10_000, "{r}");
    }
    assert_eq!(
        f.running.shared.forward.as_ref().unwrap().ca.cached(),
        1,
        "one certificate, minted once"
    );
}

#[tokio::test]
async fn a_stream_in_flight_on_an_intercepted_connection_finishes_when_the_proxy_stops() {
    let f = Forward::start("version: v1\ndefaults: {llm: allow}\n", "").await;
    let (tcp, head) = connect(f.addr, "api.openai.com:443", "").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let tls = tls_over(tcp, "api.openai.com", &f.ca_cert, &[b"http/1.1"]).await;
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let mut headers = tags("draining");
    headers.push(("x-mock-events".into(), "10".into()));
    headers.push(("x-mock-event-delay-ms".into(), "50".into()));
    let response = h1.send_request(chat_request("api.openai.com", &headers, true)).await.unwrap();
    assert_eq!(response.status(), 200);
    // Stop while ~500 ms of stream are still to come.
    let Forward { running, stop, data_dir, .. } = f;
    let _ = stop.send(());
    let stopped = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(10), running.wait())
            .await
            .expect("drained in time");
        std::time::Instant::now()
    });
    let (_, body) = body_of(response).await;
    let body_end = std::time::Instant::now();
    let events = tollgate_e2e::harness::sse_data(&body);
    let words = events
        .iter()
        .filter(|e| e.contains("\"content\":\"") && !e.contains("\"content\":\"\""))
        .count();
    assert_eq!(words, 10, "every event arrived: {events:?}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    // The proxy waited for the intercepted stream (and flushed its ledger record) before it
    // reported itself stopped.
    let stopped_at = stopped.await.unwrap();
    let margin = Duration::from_millis(100); // the stream had ~450 ms to go
    assert!(
        stopped_at + margin >= body_end,
        "stopped {:?} before the stream ended",
        body_end - stopped_at
    );
    let ledger = read_ledger(&data_dir);
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0]["end"], "complete", "{}", ledger[0]);
}

/// `curl -x` (the real client) for a host no route names and for the metadata address.
#[tokio::test]
async fn curl_through_the_proxy_is_refused_for_other_hosts_and_the_metadata_address() {
    let f = Forward::start("version: v1\ndefaults: {llm: allow}\n", "").await;
    let proxy = format!("http://{}", f.addr);
    let curl = |args: Vec<String>| async move {
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::process::Command::new("curl")
                .args(&args)
                .env_remove("NO_PROXY")
                .env_remove("no_proxy")
                .output(),
        )
        .await
        .expect("curl finished")
        .expect("curl runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> =
            ["-sS", "-v", "--max-time", "10", "-x", proxy.as_str()].map(String::from).to_vec();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    // HTTPS to a host no route names: the CONNECT gets a 403 and curl gives up.
    let (code, _, err) = curl(base(&["https://example.com/"])).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("< HTTP/1.1 403"), "{err}");
    assert!(err.contains("x-tollgate-reason: host_not_allowed"), "{err}");

    // The metadata address, as an absolute-form HTTP request and as a CONNECT tunnel, and
    // IPv4-mapped.
    let (code, body, err) = curl(base(&["http://169.254.169.254/latest/meta-data/"])).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("< HTTP/1.1 403"), "{err}");
    assert!(body.contains("cloud metadata address"), "{body}");
    let (_, _, err) = curl(base(&["-p", "http://169.254.169.254/latest/meta-data/"])).await;
    assert!(err.contains("< HTTP/1.1 403") && err.contains("forbidden_target"), "{err}");
    let (_, _, err) = curl(base(&["-p", "http://[::ffff:169.254.169.254]/"])).await;
    assert!(err.contains("< HTTP/1.1 403") && err.contains("forbidden_target"), "{err}");

    // And through the intercepted host, with Tollgate's CA: a tagged call works.
    let cacert = f.ca_cert.display().to_string();
    let data =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let (code, body, err) = curl(base(&[
        "--cacert",
        &cacert,
        "-H",
        "content-type: application/json",
        "-H",
        "x-agent-id: curl-agent",
        "-H",
        "x-cost-center: CC-1234",
        "-H",
        "x-project-id: PROJ-ABC123",
        "--data",
        &data,
        "https://api.openai.com/v1/chat/completions",
    ]))
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert!(body.contains("Hello from the mock upstream"), "{body}\n{err}");
    assert_eq!(f.mock.request_count(), 1);

    // HTTP_PROXY style (absolute-form, no TLS to the proxy) to a route's host, attributed by
    // proxy credentials: through the pipeline, and on to the real host over TLS.
    let (code, body, err) = curl(base(&[
        "--proxy-user",
        "curl-cred:cost_center=CC-1234,project=PROJ-ABC123",
        "-H",
        "content-type: application/json",
        "--data",
        &data,
        "http://api.openai.com/v1/chat/completions",
    ]))
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert!(body.contains("Hello from the mock upstream"), "{body}\n{err}");
    let seen = f.mock.requests();
    assert_eq!(seen.len(), 2);
    assert!(seen[1].header("proxy-authorization").is_none(), "never forwarded");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let ledger = loop {
        let ledger = f.ledger().await;
        if ledger.len() >= 2 || std::time::Instant::now() > deadline {
            break ledger;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let agents: Vec<&str> = ledger.iter().map(|r| r["agent"].as_str().unwrap()).collect();
    assert_eq!(agents, ["curl-agent", "curl-cred"]);
}

#[tokio::test]
async fn tunnel_mode_passes_other_hosts_but_never_loopback_unless_allowed() {
    // A plain HTTP server on loopback stands in for "some other host".
    let other = MockUpstream::start().await;
    let target = format!("127.0.0.1:{}", other.addr().port());

    let f =
        Forward::start("version: v1\ndefaults: {llm: allow}\n", "  other_hosts: tunnel\n").await;
    let (_, head) = connect(f.addr, &target, "").await;
    assert!(head.starts_with("HTTP/1.1 403") && head.contains("forbidden_target"), "{head}");
    let (_, head) = connect(f.addr, "localhost:9", "").await;
    assert!(head.starts_with("HTTP/1.1 403"), "a name that resolves to loopback too: {head}");
    let (_, head) = connect(f.addr, "169.254.169.254:80", "").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    let f = Forward::start(
        "version: v1\ndefaults: {llm: allow}\n",
        "  other_hosts: tunnel\n  allow_loopback: true\n",
    )
    .await;
    let (mut tcp, head) = connect(f.addr, &target, "").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tcp.write_all(b"GET /__mock/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert!(reply.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&reply));
    // HTTP_PROXY style to the same other host: passed on as is, minus the proxy credentials.
    let mut tcp = TcpStream::connect(f.addr).await.unwrap();
    let head = format!(
        "GET http://{target}/tools/lookup HTTP/1.1\r\nHost: {target}\r\n\
         Proxy-Authorization: Basic YTpi\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert!(reply.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&reply));
    let seen = other.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/tools/lookup");
    assert!(seen[0].header("proxy-authorization").is_none(), "never forwarded");
    // Metadata stays refused even with loopback allowed.
    let (_, head) = connect(f.addr, "169.254.169.254:80", "").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    // Nothing through a tunnel is metered.
    assert!(f.ledger().await.is_empty());
}

#[tokio::test]
async fn official_sdks_work_unmodified_through_https_proxy() {
    let policy = "version: v1\ndefaults: {llm: allow}\n\
                  budgets: [{id: broke, scope: agent, key: sdk-broke, period: daily, amount: \"0.01\"}]\n";
    let f = Forward::start(policy, "").await;
    let proxy = format!("http://{}", f.addr);
    let mut command = sdk::command("forward_proxy.py");
    command
        .arg(f.addr.to_string())
        .env("HTTPS_PROXY", &proxy)
        .env("HTTP_PROXY", &proxy)
        .env("SSL_CERT_FILE", &f.ca_cert);
    for var in [
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
        "https_proxy",
        "http_proxy",
        "OPENAI_BASE_URL",
        "ANTHROPIC_BASE_URL",
        "SSL_CERT_DIR",
    ] {
        command.env_remove(var);
    }
    let checks = Checks::run(command).await;
    let check = |name: &str| checks.get(name);

    let chat = check("openai_chat");
    assert_eq!(chat["content"], "Hello from the mock upstream");
    let stream = check("openai_stream");
    assert_eq!(stream["text"], "Hello from the mock upstream");
    assert_eq!(stream["content_chunks"], 5, "every chunk the mock sent arrived");
    assert_eq!(stream["usage_chunks"], 0, "the usage chunk Tollgate asked for is removed");
    let untagged = check("openai_untagged");
    assert_eq!(untagged["raised"], "PermissionDeniedError");
    assert_eq!(untagged["status"], 403);
    let message = untagged["message"].as_str().unwrap();
    for header in ["x-agent-id", "x-cost-center", "x-project-id"] {
        assert!(message.contains(header), "{message}");
    }
    assert_eq!(check("openai_credentials")["content"], "Hello from the mock upstream");
    let message = check("anthropic_message");
    assert_eq!(message["text"], "Hello from the mock upstream");
    let stream_a = check("anthropic_stream");
    assert_eq!(stream_a["text"], "Hello from the mock upstream");
    assert_eq!(stream_a["deltas"], 5);
    let budget = check("anthropic_budget");
    assert_eq!(budget["status"], 402);
    assert!(budget["message"].as_str().unwrap().contains("broke"), "{budget}");

    // Five calls forwarded and metered exactly (tokens as the SDK saw them, priced from the
    // configured card); the refused ones never reached the upstream; the 402 was not retried.
    assert_eq!(f.mock.request_count(), 5);
    for r in f.mock.requests() {
        assert!(r.header("proxy-authorization").is_none() && r.header("x-agent-id").is_none());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let ledger = loop {
        let ledger = f.ledger().await;
        if ledger.len() >= 5 || std::time::Instant::now() > deadline {
            break ledger;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(ledger.len(), 5, "{ledger:?}");
    let tokens = |r: &Value| {
        (r["tokens"]["input"].as_i64().unwrap(), r["tokens"]["output"].as_i64().unwrap())
    };
    let sdk = |c: &Value, i: &str, o: &str| (c[i].as_i64().unwrap(), c[o].as_i64().unwrap());
    assert_eq!(tokens(&ledger[0]), sdk(chat, "prompt_tokens", "completion_tokens"));
    assert_eq!(tokens(&ledger[3]), sdk(message, "input_tokens", "output_tokens"));
    assert_eq!(tokens(&ledger[4]), sdk(stream_a, "input_tokens", "output_tokens"));
    let agents: Vec<&str> = ledger.iter().map(|r| r["agent"].as_str().unwrap()).collect();
    assert_eq!(agents, ["sdk-agent", "sdk-agent", "sdk-credited", "sdk-agent", "sdk-agent"]);
    for r in &ledger {
        assert_eq!(r["usage_source"], "reported", "{r}");
        let (input, output) = tokens(r);
        let (rate_in, rate_out) =
            if r["provider"] == "anthropic" { (3_000, 15_000) } else { (2_500, 10_000) };
        assert_eq!(
            r["cost_nano_usd"].as_i64().unwrap(),
            input * rate_in + output * rate_out,
            "{r}"
        );
        assert!(output > 0, "{r}");
    }
    let metrics = f.metrics().await;
    let refused = metrics
        .lines()
        .find(|l| l.starts_with("tollgate_requests_total") && l.contains("budget_exceeded"))
        .unwrap_or_else(|| panic!("no budget_exceeded counter:\n{metrics}"));
    assert!(refused.ends_with(" 1"), "one 402, not retried: {refused}");
}

/// HTTPS_PROXY mode: the SDKs' calls answered compressed (gzip as offered, deflate forced) are
/// metered exactly as the same calls answered plain.
#[tokio::test]
async fn compressed_answers_are_metered_exactly_through_https_proxy() {
    let f = Forward::start("version: v1\ndefaults: {llm: allow}\n", "").await;
    let proxy = format!("http://{}", f.addr);
    let mut runs = Vec::new();
    for (agent, coding) in [("plain", "identity"), ("gzip", "offered"), ("deflate", "deflate")] {
        let mut command = sdk::command("compressed.py");
        command
            .arg(agent)
            .arg(coding)
            .env("HTTPS_PROXY", &proxy)
            .env("HTTP_PROXY", &proxy)
            .env("SSL_CERT_FILE", &f.ca_cert);
        for var in ["NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "https_proxy", "http_proxy"] {
            command.env_remove(var);
        }
        for var in ["OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "SSL_CERT_DIR"] {
            command.env_remove(var);
        }
        runs.push(Checks::run(command).await);
    }
    let n = sdk::COMPRESSED_CALLS.len();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let ledger = loop {
        let ledger = f.ledger().await;
        if ledger.len() >= 3 * n || std::time::Instant::now() > deadline {
            break ledger;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let of =
        |agent: &str| -> Vec<&Value> { ledger.iter().filter(|r| r["agent"] == agent).collect() };
    let plain = of("plain");
    sdk::assert_metered_like_plain(&runs[0], &plain, &plain, None, true);
    sdk::assert_metered_like_plain(&runs[1], &of("gzip"), &plain, Some("gzip"), false);
    sdk::assert_metered_like_plain(&runs[2], &of("deflate"), &plain, Some("deflate"), true);
}
