//! The proxy in HTTPS_PROXY mode in front of a TLS mock that plays api.openai.com and
//! api.anthropic.com (through upstream address overrides), and a client that reaches it the way
//! an agent's HTTP library does: `CONNECT`, then TLS trusting Tollgate's CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{read_ledger, temp_dir, Reply};
use crate::mock::MockUpstream;

/// The hosts the routes name (both played by the one TLS mock).
pub const HOSTS: [&str; 2] = ["api.openai.com", "api.anthropic.com"];

/// The `pricing:` section [`Forward::start`] runs with.
pub const PRICING: &str = "pricing:\n\
    \x20 models:\n\
    \x20   gpt-4o: {provider: openai, input: \"2.50\", output: \"10.00\"}\n\
    \x20   claude-sonnet-4-5: {provider: anthropic, input: \"3.00\", output: \"15.00\"}\n";

/// The proxy in HTTPS_PROXY mode in front of a TLS mock that plays both providers.
pub struct Forward {
    pub running: tollgate::app::Running,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    /// Tollgate's CA certificate (PEM file), what clients trust.
    pub ca_cert: PathBuf,
    pub mock: MockUpstream,
    pub stop: tokio::sync::oneshot::Sender<()>,
}

impl Forward {
    /// Starts with `policy` (a YAML document), extra `forward_proxy:` keys (indented YAML lines)
    /// and the [`PRICING`] card.
    pub async fn start(policy: &str, forward_extra: &str) -> Forward {
        Forward::start_with(policy, forward_extra, PRICING).await
    }

    /// [`Forward::start`] with another top-level `pricing:` section (YAML).
    pub async fn start_with(policy: &str, forward_extra: &str, pricing: &str) -> Forward {
        Forward::start_with_routes(policy, forward_extra, pricing, &[]).await
    }

    /// [`Forward::start_with`] with more routes (YAML flow mappings) before the two providers';
    /// their upstream must be one of [`HOSTS`] (`https://api.openai.com`), which the mock plays.
    pub async fn start_with_routes(
        policy: &str,
        forward_extra: &str,
        pricing: &str,
        more_routes: &[&str],
    ) -> Forward {
        Forward::start_for_hosts(policy, forward_extra, pricing, more_routes, &[]).await
    }

    /// [`Forward::start_with_routes`] with the mock playing `more_hosts` too (an upstream of
    /// its own for a route of `more_routes`, `https://<host>`: a circuit breaker of its own).
    pub async fn start_for_hosts(
        policy: &str,
        forward_extra: &str,
        pricing: &str,
        more_routes: &[&str],
        more_hosts: &[&str],
    ) -> Forward {
        let hosts: Vec<&str> = HOSTS.iter().chain(more_hosts).copied().collect();
        let mock = MockUpstream::start_tls_for(&hosts).await;
        let dir = temp_dir("fwd");
        let mock_ca = dir.join("mock-ca.pem");
        std::fs::write(&mock_ca, mock.ca_pem().expect("a TLS mock has a CA")).unwrap();
        let (ca_cert, ca_key) = tollgate::ca::init(&dir.join("ca"), false).expect("ca init");
        let data_dir = dir.join("data");
        let q = |p: &Path| serde_json::to_string(&p.display().to_string()).unwrap();
        let overrides: String = hosts
            .iter()
            .map(|h| format!("    {h}: {{addr: \"{}\", ca_file: {}}}\n", mock.addr(), q(&mock_ca)))
            .collect();
        let policy: String = policy.lines().map(|l| format!("  {l}\n")).collect();
        let more_routes: String = more_routes.iter().map(|r| format!("  - {r}\n")).collect();
        let mut pricing = pricing.to_string();
        if !pricing.ends_with('\n') {
            pricing.push('\n');
        }
        let yaml = format!(
            "version: 1\nlisten: 127.0.0.1:0\n\
             admin: {{listen: 127.0.0.1:0, token_env: TOLLGATE_E2E_FWD_UNUSED}}\n\
             data_dir: {data}\n\
             routes:\n{more_routes}\
             \x20 - {{name: anthropic, path_prefix: /v1/messages, kind: anthropic, upstream: \"https://api.anthropic.com\"}}\n\
             \x20 - {{name: openai, path_prefix: /v1/, kind: openai, upstream: \"https://api.openai.com\"}}\n\
             upstream: {{connect_timeout: 2s, response_timeout: 10s, stream_idle_timeout: 10s}}\n\
             forward_proxy:\n\
             \x20 enabled: true\n\
             \x20 ca_cert: {cert}\n\
             \x20 ca_key: {key}\n\
             {forward_extra}\
             \x20 upstream_overrides:\n{overrides}\
             {pricing}\
             policy:\n{policy}",
            data = q(&data_dir),
            cert = q(&ca_cert),
            key = q(&ca_key),
        );
        let config = tollgate::config::Config::from_str(&yaml)
            .unwrap_or_else(|e| panic!("config does not load: {e}\n{yaml}"));
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tollgate::app::start(config, proxy, admin, async move {
            let _ = stopped.await;
        })
        .await
        .expect("start");
        Forward {
            addr: running.proxy_addr,
            admin: running.admin_addr,
            running,
            data_dir,
            ca_cert,
            mock,
            stop,
        }
    }

    /// Every usage record so far (after flushing what is queued).
    pub async fn ledger(&self) -> Vec<Value> {
        self.running.shared.ledger.flush().await;
        read_ledger(&self.data_dir)
    }

    /// The admin listener's `/metrics`.
    pub async fn metrics(&self) -> String {
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build_http::<Full<Bytes>>();
        let uri = format!("http://{}/metrics", self.admin);
        let response = client.get(uri.parse().unwrap()).await.unwrap();
        String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec())
            .unwrap()
    }

    /// One request to `https://{host}{path}` the way an HTTPS_PROXY client sends it: a new
    /// `CONNECT`, TLS trusting Tollgate's CA, HTTP/1.1; read to its end (at most 10 s). A body
    /// that fails or stalls (an upstream that cut its stream) is an error.
    pub async fn send(
        &self,
        host: &str,
        method: Method,
        path: &str,
        headers: &[(String, String)],
        body: impl Into<Bytes>,
    ) -> Result<Reply, String> {
        let (tcp, head) = connect(self.addr, &format!("{host}:443"), "").await;
        assert!(head.starts_with("HTTP/1.1 200"), "CONNECT {host}: {head}");
        let tls = tls_over(tcp, host, &self.ca_cert, &[b"http/1.1"]).await;
        let (mut h1, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("handshake");
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(format!("https://{host}{path}"))
            .header("host", host)
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req.body(Full::new(body.into())).expect("valid request");
        let response = tokio::time::timeout(Duration::from_secs(10), h1.send_request(req))
            .await
            .expect("answered within 10 s")
            .expect("answered");
        crate::harness::try_read(response).await
    }
}

/// Sends `CONNECT host:port` and returns the connection and the response head.
pub async fn connect(proxy: SocketAddr, authority: &str, extra: &str) -> (TcpStream, String) {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    let head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut byte))
            .await
            .expect("CONNECT answered within 5 s")
            .unwrap();
        assert!(n == 1 && got.len() < 16384, "CONNECT response cut short: {got:?}");
        got.push(byte[0]);
    }
    (tcp, String::from_utf8_lossy(&got).into_owned())
}

/// A TLS client over an accepted `CONNECT`, trusting only `ca_pem`, offering `alpn`.
pub async fn tls_over(
    tcp: TcpStream,
    host: &str,
    ca_pem: &Path,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS to the proxy")
}
