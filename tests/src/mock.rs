//! The mock upstream: one HTTP server on loopback that plays OpenAI, Anthropic, an MCP server
//! and a REST tool server, speaking their real wire formats, steered per request by `x-mock-*`
//! headers (see [`header`]) and recording what it received.
//!
//! Routes:
//! - `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses` (OpenAI)
//! - `POST /v1/messages` (Anthropic)
//! - `GET /v1/models`, `GET /v1/models/{id}` (OpenAI's shape, Anthropic's when the request has
//!   `anthropic-version`)
//! - `POST /mcp` (MCP JSON-RPC), any method on `/tools/...` (REST tools)
//! - `GET /__mock/health` (not recorded)
//!
//! Responses are compressed like the providers' when the client offers it (`Accept-Encoding`),
//! or when `x-mock-content-encoding` forces it; `x-mock-bomb` sends a decompression bomb
//! (see [`compress`]).
//!
//! Usage is deterministic: input tokens = `ceil(body bytes / 4)`, output tokens = number of
//! content events (5 by default, one short word each), unless a header says otherwise.
//!
//! It never meters, prices or checks anything itself: the tests assert on what it recorded.

mod anthropic;
mod body;
mod call;
pub mod compress;
mod openai;
mod route;
mod tools;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use hyper::service::service_fn;
use hyper::{HeaderMap, Method};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Names of the `x-mock-*` request headers that steer the mock; every value is a decimal
/// integer except `x-mock-model` and `x-mock-content-encoding`.
pub mod header {
    pub use super::call::{
        CACHED_TOKENS, CACHE_WRITE_TOKENS, DELAY_MS, EVENTS, EVENT_DELAY_MS, INPUT_TOKENS, MODEL,
        OUTPUT_TOKENS, REASONING_TOKENS, RESET_AFTER, STATUS,
    };
    pub use super::compress::{BOMB, CONTENT_ENCODING_KNOB as CONTENT_ENCODING};
}

/// The model ids `GET /v1/models` lists, per provider shape.
pub mod models {
    pub use super::anthropic::MODELS as ANTHROPIC;
    pub use super::openai::MODELS as OPENAI;
}

/// How long shutdown waits for in-flight responses (slow streams) before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (e.g. out of file descriptors under load) before retrying.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    /// The path without the query.
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// HTTP/1.1 or HTTP/2, as negotiated with the client.
    pub version: hyper::Version,
    /// The whole body arrived. `false`: the head came and the body broke off (a sender that
    /// reset the request after its head): recorded all the same, since the head alone already
    /// reached the upstream.
    pub complete: bool,
}

impl RecordedRequest {
    /// A header's value as text, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// The requests received so far, shared between the server and its owner.
#[derive(Debug, Clone, Default)]
struct Journal(Arc<Mutex<Vec<RecordedRequest>>>);

impl Journal {
    fn record(&self, request: RecordedRequest) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push(request);
    }

    fn snapshot(&self) -> Vec<RecordedRequest> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    fn clear(&self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}

/// A mock upstream serving on `127.0.0.1:<ephemeral>` in the current tokio runtime until it
/// is dropped or [`shut down`](MockUpstream::shutdown). Records every request it receives.
#[derive(Debug)]
pub struct MockUpstream {
    addr: SocketAddr,
    /// The PEM of the CA that issued the mock's certificate, when it serves TLS.
    ca_pem: Option<String>,
    journal: Journal,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

impl MockUpstream {
    /// Binds `127.0.0.1:0` and starts serving.
    ///
    /// # Panics
    /// If loopback cannot be bound: test support has no better answer than failing the test.
    pub async fn start() -> MockUpstream {
        Self::start_with(None).await
    }

    /// Like [`start`](MockUpstream::start), but serving HTTPS (HTTP/1.1 and HTTP/2 by ALPN)
    /// with a certificate for `localhost` and `127.0.0.1` issued by a fresh test CA, whose PEM
    /// [`ca_pem`](MockUpstream::ca_pem) returns.
    pub async fn start_tls() -> MockUpstream {
        let tls = TestCa::new().server();
        Self::start_with(Some(tls)).await
    }

    /// Like [`start_tls`](MockUpstream::start_tls), with a certificate for `names` instead
    /// (e.g. `api.openai.com`, to play the real provider behind an upstream address override).
    pub async fn start_tls_for(names: &[&str]) -> MockUpstream {
        let tls = TestCa::new().server_for(names);
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<(tokio_rustls::TlsAcceptor, String)>) -> MockUpstream {
        // The proxy's bind: a long accept queue, so that a burst of a thousand connections (the
        // load test's streams) is not dropped and retried a second later.
        let listener = tollgate::server::bind((std::net::Ipv4Addr::LOCALHOST, 0).into())
            .unwrap_or_else(|e| panic!("mock upstream: cannot bind 127.0.0.1:0: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("mock upstream: no local address: {e}"));
        let journal = Journal::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let (acceptor, ca_pem) = match tls {
            Some((acceptor, pem)) => (Some(acceptor), Some(pem)),
            None => (None, None),
        };
        let server = tokio::spawn(run(listener, Some(journal.clone()), acceptor, async move {
            // A dropped sender counts as a stop too: the owner is gone.
            let _ = stopped.await;
        }));
        MockUpstream { addr, ca_pem, journal, stop: Some(stop), server: Some(server) }
    }

    /// The CA certificate (PEM) to trust when the mock serves TLS.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// The bound socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>` (or `https://localhost:<port>` with TLS), without a trailing
    /// slash.
    pub fn base_url(&self) -> String {
        match self.ca_pem {
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://{}", self.addr),
        }
    }

    /// Every request received so far, oldest first (health checks excluded).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.journal.snapshot()
    }

    /// How many requests were received so far (health checks excluded).
    pub fn request_count(&self) -> usize {
        self.journal.len()
    }

    /// Forgets the requests received so far.
    pub fn clear_requests(&self) {
        self.journal.clear();
    }

    /// Stops accepting, lets in-flight responses finish (up to a few seconds) and returns
    /// once the server is gone.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves the mock on `listener` until `shutdown` completes, then lets in-flight responses
/// finish (up to a few seconds). HTTP/1.1 and HTTP/2 (prior knowledge) on the same port.
/// Records nothing, so a long load test does not grow memory; use [`MockUpstream`] to
/// inspect requests.
pub async fn serve(listener: TcpListener, shutdown: impl Future<Output = ()>) {
    run(listener, None, None, shutdown).await;
}

async fn run(
    listener: TcpListener,
    journal: Option<Journal>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let state = Arc::new(route::State::new(journal));
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let service = service_fn(move |request| route::handle(request, state.clone()));
                match &tls {
                    None => {
                        let connection = builder.serve_connection(TokioIo::new(stream), service);
                        let connection = graceful.watch(connection.into_owned());
                        tokio::spawn(async move {
                            // A client hanging up mid-stream is routine here, not worth reporting.
                            let _ = connection.await;
                        });
                    }
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        let builder = builder.clone();
                        let watcher = graceful.watcher();
                        tokio::spawn(async move {
                            let Ok(stream) = acceptor.accept(stream).await else { return };
                            let connection = builder.serve_connection(TokioIo::new(stream), service);
                            let _ = watcher.watch(connection.into_owned()).await;
                        });
                    }
                }
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {}
    }
}

/// A throwaway certificate authority for TLS tests: the mock's server certificate, and the
/// PEM a client (or the proxy's `upstream.extra_ca_file`) must trust.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// # Panics
    /// If key generation fails: test support has no better answer.
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "Tollgate test CA");
        params.key_usages =
            vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let key = rcgen::KeyPair::generate().expect("CA key");
        TestCa { issuer: rcgen::CertifiedIssuer::self_signed(params, key).expect("CA certificate") }
    }

    /// The CA certificate as PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A TLS acceptor for `localhost` / `127.0.0.1` (ALPN h2 and http/1.1), and the CA PEM.
    pub fn server(&self) -> (tokio_rustls::TlsAcceptor, String) {
        self.server_for(&["localhost", "127.0.0.1"])
    }

    /// A server certificate for `names` signed by this CA, and its private key (PEM both), for
    /// a server that reads them from files (Redis, say).
    pub fn server_pem(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).expect("server params");
        let key = rcgen::KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &self.issuer).expect("server certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// A TLS acceptor for `names` (ALPN h2 and http/1.1), and the CA PEM.
    pub fn server_for(&self, names: &[&str]) -> (tokio_rustls::TlsAcceptor, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).expect("server params");
        let key = rcgen::KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &self.issuer).expect("server certificate");
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key_der)
            .expect("server TLS config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        (tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)), self.pem())
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}
