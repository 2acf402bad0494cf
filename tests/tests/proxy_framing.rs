//! Request framing at the socket: ambiguous message lengths (the request-smuggling shapes) are
//! refused before anything is forwarded, and an oversized request head answers 431.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_e2e::harness::{Harness, ALLOW_ALL};

const TAGS: &str = "x-agent-id: raw\r\nx-cost-center: CC-1234\r\nx-project-id: PROJ-ABC123\r\n";
const BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

/// Writes `request` on a new connection and reads until the proxy closes it (at most 5 s).
/// Returns what came back (empty if the connection was closed without an answer).
async fn exchange(h: &Harness, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(h.proxy_addr).await.unwrap();
    // The proxy may answer and close before reading everything; a failed write is fine then.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {
                panic!("connection still open after 5 s: {}", String::from_utf8_lossy(&answer))
            }
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

fn status_of(answer: &str) -> Option<u16> {
    answer.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// How many HTTP responses a raw answer holds.
fn responses_in(answer: &str) -> usize {
    answer.matches("HTTP/1.1 ").count()
}

#[tokio::test]
async fn content_length_with_chunked_is_refused_and_nothing_is_smuggled() {
    // The classic smuggling shape: the proxy and the next hop could disagree on where the body
    // ends. Tollgate refuses it outright (400) and closes, so neither request is forwarded.
    let h = Harness::start(ALLOW_ALL).await;
    let chunk = format!("{:x}\r\n{BODY}\r\n0\r\n\r\n", BODY.len());
    let smuggled = format!(
        "POST /v1/smuggled HTTP/1.1\r\nhost: x\r\n{TAGS}content-type: application/json\r\n\
         content-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    for order in [
        "content-length: 5\r\ntransfer-encoding: chunked",
        "transfer-encoding: chunked\r\ncontent-length: 5",
    ] {
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{TAGS}\
             content-type: application/json\r\n{order}\r\n\r\n{chunk}{smuggled}"
        );
        let answer = exchange(&h, request.as_bytes()).await;
        assert_eq!(status_of(&answer), Some(400), "{order}: {answer}");
        assert_eq!(
            responses_in(&answer),
            1,
            "{order}: one answer, then the connection closes: {answer}"
        );
    }
    assert_eq!(h.mock.request_count(), 0, "{:#?}", h.mock.requests());
}

#[tokio::test]
async fn smuggling_behind_a_well_framed_request_on_a_kept_alive_connection_is_refused() {
    let h = Harness::start(ALLOW_ALL).await;
    let first = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{TAGS}content-type: application/json\r\n\
         content-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    // A body hyper alone would accept (it drops the length and reads the chunks): only the
    // guard, which follows the first body to find this head, refuses it.
    let second = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{TAGS}content-type: application/json\r\n\
         transfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n{:x}\r\n{BODY}\r\n0\r\n\r\n",
        BODY.len()
    );
    let answer = exchange(&h, format!("{first}{second}").as_bytes()).await;
    assert_eq!(status_of(&answer), Some(200), "{answer}");
    assert_eq!(responses_in(&answer), 2, "{answer}");
    assert!(answer.contains("HTTP/1.1 400 "), "{answer}");
    assert_eq!(h.mock.request_count(), 1, "only the well-framed request is forwarded");
}

#[tokio::test]
async fn two_different_content_lengths_are_refused() {
    let h = Harness::start(ALLOW_ALL).await;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{TAGS}\
         content-type: application/json\r\ncontent-length: {}\r\ncontent-length: 5\r\n\r\n{BODY}",
        BODY.len()
    );
    let answer = exchange(&h, request.as_bytes()).await;
    assert_eq!(status_of(&answer), Some(400), "{answer}");
    assert_eq!(h.mock.request_count(), 0);
}

#[tokio::test]
async fn repeated_content_lengths_are_refused_even_when_equal() {
    let h = Harness::start(ALLOW_ALL).await;
    let n = BODY.len();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{TAGS}\
         content-type: application/json\r\ncontent-length: {n}\r\ncontent-length: {n}\r\n\r\n{BODY}"
    );
    let answer = exchange(&h, request.as_bytes()).await;
    assert_eq!(status_of(&answer), Some(400), "{answer}");
    assert_eq!(h.mock.request_count(), 0);
}

#[tokio::test]
async fn well_framed_raw_request_is_forwarded() {
    // The control for the refusals above: the same request with one Content-Length passes.
    let h = Harness::start(ALLOW_ALL).await;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{TAGS}\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let answer = exchange(&h, request.as_bytes()).await;
    assert_eq!(status_of(&answer), Some(200), "{answer}");
    assert_eq!(h.mock.request_count(), 1);
    assert_eq!(h.mock.requests()[0].body.as_ref(), BODY.as_bytes());
}

#[tokio::test]
async fn request_head_over_the_limit_answers_431() {
    let h = Harness::builder().extra("limits: {max_head_bytes: 8192}").start().await;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{TAGS}x-padding: {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
        "a".repeat(20_000),
        BODY.len()
    );
    let answer = exchange(&h, request.as_bytes()).await;
    assert_eq!(status_of(&answer), Some(431), "{answer}");
    assert_eq!(h.mock.request_count(), 0);
}

#[tokio::test]
async fn a_request_head_sent_too_slowly_is_cut_off() {
    // Slowloris: half a request head, then silence. The proxy must not hold the connection.
    let h = Harness::builder().extra("limits: {header_read_timeout: 300ms}").start().await;
    let mut stream = tokio::net::TcpStream::connect(h.proxy_addr).await.unwrap();
    stream.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 1024];
    let mut answer = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection was still open after 5 s"),
        }
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(250), "closed too early: {waited:?}");
    assert!(waited < Duration::from_secs(3), "closed too late: {waited:?}");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(h.mock.request_count(), 0);
}

#[tokio::test]
async fn an_idle_kept_alive_connection_outlives_the_head_timeout() {
    let h = Harness::builder().extra("limits: {header_read_timeout: 300ms}").start().await;
    let mut stream = tokio::net::TcpStream::connect(h.proxy_addr).await.unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{TAGS}\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let mut buf = vec![0u8; 64 * 1024];
    for round in 0..2 {
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        while !answer.contains("\"usage\"") {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("an answer within 5 s")
                .unwrap();
            assert!(n > 0, "round {round}: connection closed: {answer}");
            answer.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert_eq!(status_of(&answer), Some(200), "round {round}: {answer}");
        // Idle longer than the head timeout before the next request.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert_eq!(h.mock.request_count(), 2);
}

#[tokio::test]
async fn a_connect_without_the_forward_proxy_is_refused_and_the_connection_closed() {
    // The framing guard stops following a connection after a CONNECT head (a tunnel follows);
    // without the forward proxy the CONNECT is refused, so the connection must end there and
    // an ambiguous request behind it is never read.
    let h = Harness::start(ALLOW_ALL).await;
    let smuggled = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{TAGS}content-type: application/json\r\n\
         content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    let request = format!(
        "CONNECT api.openai.com:443 HTTP/1.1\r\nhost: api.openai.com:443\r\n\r\n{smuggled}"
    );
    let answer = exchange(&h, request.as_bytes()).await;
    assert_eq!(responses_in(&answer), 1, "{answer}");
    assert_ne!(status_of(&answer), Some(200), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    assert_eq!(h.mock.request_count(), 0);
}

/// Sends one request (`connection: close`) with `extra` head lines and returns the answer.
async fn with_head(h: &Harness, request_line: &str, extra: &str) -> String {
    let request = format!(
        "{request_line}\r\n{TAGS}content-type: application/json\r\nconnection: close\r\n{extra}\
         content-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    exchange(h, request.as_bytes()).await
}

#[tokio::test]
async fn strict_heads_refuse_what_a_next_hop_could_read_differently() {
    let h = Harness::start(ALLOW_ALL).await;
    let post = "POST /v1/chat/completions HTTP/1.1";
    let cases = [
        (post, "", "missing_host"),
        (post, "host: a\r\nhost: b\r\n", "duplicate_host"),
        (post, "host: user:pw@x\r\n", "host_userinfo"),
        (post, "host: x\r\nx_cost_center: CC-0001\r\n", "underscore_header"),
        (post, "host: x\r\nconnection: x-cost-center\r\n", "connection_nominates_header"),
        (post, "host: x\r\nconnection: authorization\r\n", "connection_nominates_header"),
        ("POST http://evil.example/v1/chat/completions HTTP/1.1", "host: x\r\n", "absolute_form"),
    ];
    for (line, extra, code) in cases {
        let answer = with_head(&h, line, extra).await;
        assert_eq!(status_of(&answer), Some(400), "{code}: {answer}");
        assert!(answer.contains(&format!("\"{code}\"")), "{code}: {answer}");
    }
    // The underscore spelling is named in the message.
    let answer = with_head(&h, post, "host: x\r\nx_cost_center: CC-0001\r\n").await;
    assert!(answer.contains("x_cost_center"), "{answer}");
    assert_eq!(h.mock.request_count(), 0, "{:#?}", h.mock.requests());

    // The same head, well formed, is forwarded.
    let answer = with_head(&h, post, "host: x\r\n").await;
    assert_eq!(status_of(&answer), Some(200), "{answer}");
}

#[tokio::test]
async fn two_transfer_encoding_lines_are_refused() {
    let h = Harness::start(ALLOW_ALL).await;
    let chunk = format!("{:x}\r\n{BODY}\r\n0\r\n\r\n", BODY.len());
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{TAGS}content-type: application/json\r\n\
         transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n{chunk}"
    );
    let answer = exchange(&h, request.as_bytes()).await;
    assert_eq!(status_of(&answer), Some(400), "{answer}");
    assert_eq!(h.mock.request_count(), 0);
}
