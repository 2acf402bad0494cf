//! Upstream TLS: the proxy verifies the upstream's certificate against the webpki roots plus
//! `upstream.extra_ca_file`, negotiates HTTP/2 by ALPN when the upstream offers it, and refuses
//! (502) an upstream whose certificate it cannot verify.

use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::net::TcpListener;
use tollgate_e2e::harness::{config_yaml, read_ledger, tags, temp_dir};
use tollgate_e2e::mock::MockUpstream;

/// Starts the proxy in front of `mock`, trusting `ca_file` if given; returns its address and
/// data directory.
async fn proxy(
    mock: &MockUpstream,
    ca_file: Option<&std::path::Path>,
) -> (std::net::SocketAddr, std::path::PathBuf, tollgate::app::Running) {
    let data_dir = temp_dir("tls");
    let mut yaml = config_yaml(
        &mock.base_url(),
        &data_dir,
        "TOLLGATE_E2E_TLS_UNUSED",
        "version: v1\ndefaults: {llm: allow}\n",
        "",
    );
    if let Some(ca) = ca_file {
        yaml = yaml.replace(
            "stream_idle_timeout: 10s}",
            &format!("stream_idle_timeout: 10s, extra_ca_file: {:?}}}", ca.display().to_string()),
        );
    }
    let config = tollgate::config::Config::from_str(&yaml).expect("config");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running =
        tollgate::app::start(config, listener, admin, std::future::pending()).await.expect("start");
    (running.proxy_addr, data_dir, running)
}

async fn chat(addr: std::net::SocketAddr) -> (StatusCode, serde_json::Value) {
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let mut req = Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json");
    for (k, v) in tags("tls-agent") {
        req = req.header(k, v);
    }
    let req = req.body(Full::new(bytes::Bytes::from(body.to_string()))).unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = client.request(req).await.expect("proxy answers");
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

#[tokio::test]
async fn https_upstream_with_an_extra_ca_is_verified_and_spoken_to_over_http2() {
    let mock = MockUpstream::start_tls().await;
    let ca_file = temp_dir("tls-ca").join("ca.pem");
    std::fs::write(&ca_file, mock.ca_pem().unwrap()).unwrap();
    let (addr, data_dir, _running) = proxy(&mock, Some(&ca_file)).await;

    let (status, body) = chat(addr).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "Hello from the mock upstream");
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, hyper::Version::HTTP_2, "ALPN chose HTTP/2");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let ledger = loop {
        let ledger = read_ledger(&data_dir);
        if !ledger.is_empty() || std::time::Instant::now() > deadline {
            break ledger;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0]["usage_source"], "reported");
}

#[tokio::test]
async fn https_upstream_with_an_untrusted_certificate_is_refused() {
    let mock = MockUpstream::start_tls().await;
    let (addr, _data_dir, _running) = proxy(&mock, None).await;
    let (status, body) = chat(addr).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"]["code"], "upstream_unavailable");
    assert_eq!(mock.request_count(), 0, "no request over an unverified connection");
}
