//! The mock upstream: one HTTP server on loopback that plays OpenAI, Anthropic, an MCP server
//! and a REST tool server, speaking their real wire formats, steered per request by `x-mock-*`
//! headers (see [`header`]) and recording what it received.
//!
//! Routes:
//! - `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses` (OpenAI)
//! - `POST /v1/messages` (Anthropic)
//! - `POST /mcp` (MCP JSON-RPC), any method on `/tools/...` (REST tools)
//! - `GET /__mock/health` (not recorded)
//!
//! Usage is deterministic: input tokens = `ceil(body bytes / 4)`, output tokens = number of
//! content events (5 by default, one short word each), unless a header says otherwise.
//!
//! It never meters, prices or checks anything itself: the tests assert on what it recorded.

mod anthropic;
mod body;
mod call;
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
/// integer except `x-mock-model`.
pub mod header {
    pub use super::call::{
        CACHED_TOKENS, CACHE_WRITE_TOKENS, DELAY_MS, EVENTS, EVENT_DELAY_MS, INPUT_TOKENS, MODEL,
        OUTPUT_TOKENS, REASONING_TOKENS, RESET_AFTER, STATUS,
    };
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
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap_or_else(|e| panic!("mock upstream: cannot bind 127.0.0.1:0: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("mock upstream: no local address: {e}"));
        let journal = Journal::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(run(listener, Some(journal.clone()), async move {
            // A dropped sender counts as a stop too: the owner is gone.
            let _ = stopped.await;
        }));
        MockUpstream { addr, journal, stop: Some(stop), server: Some(server) }
    }

    /// The bound socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
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
    run(listener, None, shutdown).await;
}

async fn run(listener: TcpListener, journal: Option<Journal>, shutdown: impl Future<Output = ()>) {
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
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    // A client hanging up mid-stream is routine here, not worth reporting.
                    let _ = connection.await;
                });
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
