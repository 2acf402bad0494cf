//! The proxy's edge at the socket, through the real binary: strict request heads are a 400 and a
//! closed connection, a stalled request body is a 408 and a closed connection, connections and
//! requests beyond their limits are shed at once with a 503 and `Retry-After` (and counted), and
//! a slow-POST flood leaves memory bounded.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use tollgate_e2e::harness::temp_dir;
use tollgate_e2e::mock::MockUpstream;
use tollgate_e2e::process::{ConfigFile, Tollgate};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
const TOKEN_ENV: &str = "TOLLGATE_LIMITS_TEST_TOKEN";
const TOKEN: &str = "limits-test-token";
const TAGS: &str = "x-agent-id: raw\r\nx-cost-center: CC-1234\r\nx-project-id: PROJ-ABC123\r\n";
const BODY: &str =
    r#"{"model":"gpt-4o","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;

fn start(upstream: &str, limits: &str) -> Tollgate {
    let dir = temp_dir("limits");
    let config = dir.join("tollgate.yaml");
    let yaml = ConfigFile {
        upstream,
        data_dir: &dir.join("data"),
        token_env: TOKEN_ENV,
        more_routes: &[],
        extra: &format!("limits: {limits}\n"),
        policy: "version: limits\ndefaults: {llm: allow, tool: allow, other: deny}\n",
    }
    .yaml();
    std::fs::write(&config, yaml).unwrap();
    Tollgate::run(Path::new(BIN), &config, &[(TOKEN_ENV, TOKEN)])
}

/// A request head announcing the whole body, followed by only `sent` bytes of it.
fn stalled_post(addr: SocketAddr, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{TAGS}content-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        BODY.len()
    );
    // A shed connection may be answered and closed before the head is written: a failed write
    // is fine, the answer is read later.
    let _ = s.write_all(head.as_bytes()).and_then(|()| s.write_all(&BODY.as_bytes()[..sent]));
    s
}

/// Reads until the peer closes (at most `within`); `None` if it is still open then.
fn read_to_close(s: &mut TcpStream, within: Duration) -> Option<String> {
    s.set_read_timeout(Some(within)).unwrap();
    let mut answer = Vec::new();
    match s.read_to_end(&mut answer) {
        Ok(_) => Some(String::from_utf8_lossy(&answer).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            Some(String::from_utf8_lossy(&answer).into_owned())
        }
        Err(_) => None,
    }
}

fn whole_post(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{TAGS}content-type: application/json\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    s.write_all(request.as_bytes()).unwrap();
    read_to_close(&mut s, Duration::from_secs(5)).expect("an answer and a close")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_is_answered_408_and_closed() {
    let mock = MockUpstream::start().await;
    let proxy = tokio::task::block_in_place(|| {
        start(&mock.base_url(), "{body_idle_timeout: 300ms, header_read_timeout: 10s}")
    });
    let started = Instant::now();
    let answer = tokio::task::block_in_place(|| {
        let mut s = stalled_post(proxy.proxy, 10);
        read_to_close(&mut s, Duration::from_secs(5))
    })
    .expect("the proxy answers and closes a stalled body");
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("\"body_timeout\""), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_shed_with_a_503() {
    let mock = MockUpstream::start().await;
    let proxy = tokio::task::block_in_place(|| {
        start(&mock.base_url(), "{max_connections: 8, body_idle_timeout: 30s}")
    });
    tokio::task::block_in_place(|| {
        let held: Vec<TcpStream> = (0..8).map(|_| stalled_post(proxy.proxy, 1)).collect();
        std::thread::sleep(Duration::from_millis(200));
        for _ in 0..3 {
            let answer = whole_post(proxy.proxy);
            assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
            assert!(answer.contains("retry-after: 1"), "{answer}");
            assert!(answer.contains("\"overloaded\""), "{answer}");
        }
        assert_eq!(proxy.metric("tollgate_shed_total{reason=\"connections\"}"), 3);
        // Room again once the held connections go.
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let answer = whole_post(proxy.proxy);
            if answer.starts_with("HTTP/1.1 200 ") {
                break;
            }
            assert!(Instant::now() < deadline, "still refused: {answer}");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_in_flight_limit_are_shed_with_a_503() {
    let mock = MockUpstream::start().await;
    let proxy = tokio::task::block_in_place(|| {
        start(&mock.base_url(), "{max_requests_in_flight: 4, body_idle_timeout: 30s}")
    });
    tokio::task::block_in_place(|| {
        let held: Vec<TcpStream> = (0..4).map(|_| stalled_post(proxy.proxy, 1)).collect();
        std::thread::sleep(Duration::from_millis(200));
        let answer = whole_post(proxy.proxy);
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(answer.contains("retry-after: 1"), "{answer}");
        assert!(answer.contains("\"overloaded\""), "{answer}");
        assert!(answer.contains("max_requests_in_flight"), "{answer}");
        assert_eq!(proxy.metric("tollgate_shed_total{reason=\"requests_in_flight\"}"), 1);
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !whole_post(proxy.proxy).starts_with("HTTP/1.1 200 ") {
            assert!(Instant::now() < deadline, "still shed after the held requests went");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    assert_eq!(mock.request_count(), 1);
}

/// 1,500 slow POSTs at once against a proxy that serves 300: the rest are shed, the served ones
/// end at the body timeout, and the proxy's resident memory stays within a bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_post_flood_is_shed_and_memory_stays_bounded() {
    let mock = MockUpstream::start().await;
    let proxy = tokio::task::block_in_place(|| {
        start(&mock.base_url(), "{max_connections: 300, body_idle_timeout: 2s}")
    });
    let before = proxy.rss_kib();
    let (shed, peak) = tokio::task::block_in_place(|| {
        let mut flood = Vec::with_capacity(1500);
        let mut peak = before;
        for i in 0..1500 {
            flood.push(stalled_post(proxy.proxy, 1));
            if i % 100 == 0 {
                peak = peak.max(proxy.rss_kib());
            }
        }
        peak = peak.max(proxy.rss_kib());
        // Every connection is answered: 503 at once beyond the limit, 408 at the body timeout.
        let mut shed = 0;
        for s in &mut flood {
            let answer = read_to_close(s, Duration::from_secs(10)).expect("answered and closed");
            if answer.starts_with("HTTP/1.1 503 ") {
                shed += 1;
            } else {
                assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
            }
        }
        (shed, peak.max(proxy.rss_kib()))
    });
    assert!(shed >= 1200, "{shed} of 1,500 shed");
    assert_eq!(proxy.metric("tollgate_shed_total{reason=\"connections\"}"), shed);
    let grown_mib = (peak.saturating_sub(before)) / 1024;
    eprintln!("slow-POST flood: {shed} of 1,500 shed, RSS {before} KiB → peak {peak} KiB");
    assert!(grown_mib < 48, "RSS grew {grown_mib} MiB ({before} KiB → {peak} KiB)");
    assert_eq!(mock.request_count(), 0);
}

/// The strict-head refusals, byte for byte through the binary: each is a 400 naming the
/// problem, nothing reaches the upstream, and the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_heads_are_refused_by_the_binary() {
    let mock = MockUpstream::start().await;
    let proxy = tokio::task::block_in_place(|| start(&mock.base_url(), "{}"));
    let post = "POST /v1/chat/completions HTTP/1.1";
    let chunked = format!("{:x}\r\n{BODY}\r\n0\r\n\r\n", BODY.len());
    let cases = [
        (post, "".to_owned(), "missing_host"),
        (post, "host: a\r\nhost: b\r\n".to_owned(), "duplicate_host"),
        (post, "host: user:pw@x\r\n".to_owned(), "host_userinfo"),
        (post, "host: x\r\nx_cost_center: CC-0001\r\n".to_owned(), "underscore_header"),
        (post, "host: x\r\nconnection: x-cost-center\r\n".to_owned(), "connection_nominates_header"),
        ("POST http://evil.example/v1/chat/completions HTTP/1.1", "host: x\r\n".to_owned(), "absolute_form"),
        (post, format!("host: x\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n{chunked}"), "ambiguous_framing"),
    ];
    tokio::task::block_in_place(|| {
        for (line, extra, code) in cases {
            let mut s = TcpStream::connect(proxy.proxy).unwrap();
            let request = if code == "ambiguous_framing" {
                format!("{line}\r\n{TAGS}content-type: application/json\r\n{extra}")
            } else {
                format!(
                    "{line}\r\n{TAGS}content-type: application/json\r\n{extra}content-length: {}\r\n\r\n{BODY}",
                    BODY.len()
                )
            };
            let _ = s.write_all(request.as_bytes());
            let answer = read_to_close(&mut s, Duration::from_secs(5))
                .unwrap_or_else(|| panic!("{code}: the connection stayed open"));
            assert!(answer.starts_with("HTTP/1.1 400 "), "{code}: {answer}");
            assert!(answer.contains(&format!("\"{code}\"")), "{code}: {answer}");
        }
    });
    assert_eq!(mock.request_count(), 0);
}
