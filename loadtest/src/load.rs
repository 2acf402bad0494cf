//! The load generator: sends a scenario's requests to one endpoint, open loop (a constant
//! rate, latency from each request's scheduled time) or closed loop (C workers back to back,
//! for saturation throughput), and records what came back.
//!
//! Open loop: a pacer thread releases request `i` at its [`Schedule`] time (an OS thread, since
//! tokio's timer only has millisecond resolution); `connections` workers share a pooled hyper
//! client and take released requests in order. A request that waits for a free connection or
//! a slow target is charged the wait, so a stall shows in the tail instead of silently lowering
//! the rate. Every run is bounded: at most `max_requests`, and nothing is sent after
//! `duration + grace`; each request gives up after `request_timeout`.
//!
//! Measures; never starts, stops or inspects the target process.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

use crate::scenario::{Scenario, Template};
use crate::schedule::{mix_cycle, Schedule};
use crate::sse::Boundaries;
use crate::stats::{ErrorKind, Recorder};

/// The generator's HTTP client: pooled, HTTP/1.1, `TCP_NODELAY`; either straight to the target,
/// or through an HTTP proxy's `CONNECT` with TLS to the target inside (HTTPS_PROXY mode).
// One per target, cloned once per run: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum HttpClient {
    Plain(Client<HttpConnector, Full<Bytes>>),
    Proxied(Client<HttpsConnector<Tunnel<HttpConnector>>, Full<Bytes>>),
}

impl HttpClient {
    async fn request(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        match self {
            HttpClient::Plain(client) => client.request(request).await,
            HttpClient::Proxied(client) => client.request(request).await,
        }
    }
}

/// How the generator's client treats connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Connections {
    /// Kept alive and reused (the usual client).
    #[default]
    Reused,
    /// A new connection for every request (TCP, and the proxy's CONNECT + TLS handshake in
    /// HTTPS_PROXY mode): what a connection costs.
    Fresh,
}

fn pooled<C>(connector: C, connections: Connections) -> Client<C, Full<Bytes>>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let idle = if connections == Connections::Fresh { 0 } else { usize::MAX };
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(idle)
        .build(connector)
}

/// A client straight to the target that keeps every connection it opened (one per concurrent
/// request), or opens one per request.
pub fn client(connections: Connections) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    HttpClient::Plain(pooled(connector, connections))
}

/// A client through the HTTP proxy at `proxy` (`http://host:port`): `CONNECT` to the target,
/// then TLS trusting only the CA certificates in `ca_file` (PEM).
pub fn proxied_client(
    proxy: &str,
    ca_file: &std::path::Path,
    connections: Connections,
) -> anyhow::Result<HttpClient> {
    use anyhow::Context;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("reading {}", ca_file.display()))?
    {
        roots.add(cert?)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    let tunnel = Tunnel::new(proxy.parse().context("proxy URL")?, http);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(tunnel);
    Ok(HttpClient::Proxied(pooled(https, connections)))
}

/// How load is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `rate` requests per second over at most `connections` connections.
    Open { rate: u64, connections: usize },
    /// `concurrency` workers, each sending its next request when the last one finished.
    Closed { concurrency: usize },
}

/// One bounded run.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub mode: Mode,
    pub duration: Duration,
    pub max_requests: u64,
    pub request_timeout: Duration,
    /// How long after `duration` requests may still be started (a late backlog); anything still
    /// scheduled after that is counted as unsent.
    pub grace: Duration,
}

/// What one run produced.
#[derive(Debug, Default)]
pub struct Outcome {
    pub recorder: Recorder,
    /// From the start to the last completed request.
    pub elapsed: Duration,
}

impl Outcome {
    /// Completed requests (successes and errors, not unsent) per second.
    pub fn rps(&self) -> f64 {
        let unsent = self.recorder.errors.get(&ErrorKind::Unsent).copied().unwrap_or(0);
        let done = self.recorder.ok + self.recorder.error_count() - unsent;
        if self.elapsed.is_zero() {
            return 0.0;
        }
        done as f64 / self.elapsed.as_secs_f64()
    }
}

/// A template with its URI built once.
struct Prepared {
    method: hyper::Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    expect_status: u16,
    spacing_ns: Option<u64>,
}

impl Prepared {
    fn new(base: &str, t: &Template) -> anyhow::Result<Prepared> {
        let uri: Uri = format!("{}{}", base.trim_end_matches('/'), t.path).parse()?;
        let mut headers = HeaderMap::new();
        for (name, value) in &t.headers {
            headers.append(name.clone(), value.clone());
        }
        Ok(Prepared {
            method: t.method.clone(),
            uri,
            headers,
            body: t.body.clone(),
            expect_status: t.expect_status,
            spacing_ns: t.stream.map(|s| s.spacing_ms.saturating_mul(1_000_000)),
        })
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }
}

struct Shared {
    client: HttpClient,
    templates: Vec<Prepared>,
    cycle: Vec<usize>,
    next: AtomicU64,
    recorder: Mutex<Recorder>,
    start: Instant,
    /// Nanoseconds from `start` to the latest completion.
    last_done: AtomicU64,
    request_timeout: Duration,
}

impl Shared {
    fn record(&self, f: impl FnOnce(&mut Recorder)) {
        f(&mut self.recorder.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn template(&self, i: u64) -> &Prepared {
        let slot = (i % self.cycle.len() as u64) as usize;
        &self.templates[self.cycle[slot]]
    }

    /// Sends request `i` and records its outcome, with latency counted from `since`.
    async fn execute(&self, i: u64, since: Instant) {
        let template = self.template(i);
        let result =
            tokio::time::timeout(self.request_timeout, exchange(&self.client, template)).await;
        let done = Instant::now();
        let elapsed = u64::try_from(done.duration_since(self.start).as_nanos()).unwrap_or(u64::MAX);
        self.last_done.fetch_max(elapsed, Ordering::Relaxed);
        match result {
            Err(_) => self.record(|r| r.error(ErrorKind::Timeout)),
            Ok(Err((kind, _))) => self.record(|r| r.error(kind)),
            Ok(Ok(gaps)) => {
                let latency = nanos(done.saturating_duration_since(since));
                self.record(|r| {
                    r.success(latency);
                    if let Some(spacing) = template.spacing_ns {
                        r.events += gaps.len() as u64 + 1;
                        for gap in gaps {
                            r.event_gap(gap, spacing);
                        }
                    }
                });
            }
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One request and its whole response body. For streams, returns the gaps between consecutive
/// events (the first event has none).
async fn exchange(client: &HttpClient, t: &Prepared) -> Result<Vec<u64>, (ErrorKind, String)> {
    let response = client.request(t.request()).await.map_err(|e| {
        let kind = if e.is_connect() { ErrorKind::Connect } else { ErrorKind::Request };
        (kind, e.to_string())
    })?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut boundaries = Boundaries::default();
    let mut last_event: Option<Instant> = None;
    let mut gaps = Vec::new();
    // Read to the end even on an unexpected status, so the connection can be reused.
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| (ErrorKind::Body, e.to_string()))?;
        let (Some(data), Some(_)) = (frame.data_ref(), t.spacing_ns) else { continue };
        let ended = boundaries.feed(data);
        if ended == 0 {
            continue;
        }
        let now = Instant::now();
        for _ in 0..ended {
            if let Some(previous) = last_event {
                gaps.push(nanos(now.saturating_duration_since(previous)));
            }
            last_event = Some(now);
        }
    }
    if status != t.expect_status {
        return Err((ErrorKind::Status(status), format!("status {status}")));
    }
    Ok(gaps)
}

/// Runs `plan` against `base` (`http://host:port`) with `scenario`'s requests.
pub async fn run(
    client: &HttpClient,
    base: &str,
    scenario: &Scenario,
    plan: &Plan,
) -> anyhow::Result<Outcome> {
    let templates =
        scenario.requests.iter().map(|t| Prepared::new(base, t)).collect::<Result<Vec<_>, _>>()?;
    let cycle = mix_cycle(&scenario.requests.iter().map(|t| t.weight).collect::<Vec<_>>());
    anyhow::ensure!(!cycle.is_empty(), "scenario {} has no requests", scenario.name);
    // Workers get a moment to start before the first request is due.
    let start = Instant::now() + Duration::from_millis(5);
    let shared = Arc::new(Shared {
        client: client.clone(),
        templates,
        cycle,
        next: AtomicU64::new(0),
        recorder: Mutex::new(Recorder::default()),
        start,
        last_done: AtomicU64::new(0),
        request_timeout: plan.request_timeout,
    });
    match plan.mode {
        Mode::Open { rate, connections } => open_loop(&shared, plan, rate, connections).await?,
        Mode::Closed { concurrency } => closed_loop(&shared, plan, concurrency).await?,
    }
    let elapsed = Duration::from_nanos(shared.last_done.load(Ordering::Relaxed));
    let recorder =
        std::mem::take(&mut *shared.recorder.lock().unwrap_or_else(PoisonError::into_inner));
    Ok(Outcome { recorder, elapsed })
}

async fn open_loop(
    shared: &Arc<Shared>,
    plan: &Plan,
    rate: u64,
    connections: usize,
) -> anyhow::Result<()> {
    let schedule = Schedule::new(rate, plan.duration, plan.max_requests);
    let connections = connections.max(1);
    let released = Arc::new(Semaphore::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let pacer = {
        let (released, stop, start) = (released.clone(), stop.clone(), shared.start);
        std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || pace(schedule, start, &released, &stop, connections))?
    };
    let deadline = shared.start + plan.duration + plan.grace;
    let mut workers = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (shared, released) = (shared.clone(), released.clone());
        workers.push(tokio::spawn(async move {
            loop {
                match released.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => return,
                }
                let i = shared.next.fetch_add(1, Ordering::Relaxed);
                if i >= schedule.len() {
                    return;
                }
                let due = shared.start + schedule.due(i);
                let now = Instant::now();
                if now > deadline {
                    shared.record(|r| r.error(ErrorKind::Unsent));
                    continue;
                }
                shared.record(|r| r.send_lag(nanos(now.saturating_duration_since(due))));
                shared.execute(i, due).await;
            }
        }));
    }
    for worker in workers {
        worker.await?;
    }
    stop.store(true, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || pacer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the pacer thread panicked"))?;
    Ok(())
}

/// Releases each request when it is due; then one stop token per worker.
fn pace(
    schedule: Schedule,
    start: Instant,
    released: &Semaphore,
    stop: &AtomicBool,
    workers: usize,
) {
    let mut sent = 0u64;
    while sent < schedule.len() && !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let due = schedule.due_by(now.saturating_duration_since(start));
        if now >= start && due > sent {
            released.add_permits(usize::try_from(due - sent).unwrap_or(usize::MAX));
            sent = due;
            continue;
        }
        let next = start + schedule.due(sent);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    released.add_permits(workers);
}

async fn closed_loop(shared: &Arc<Shared>, plan: &Plan, concurrency: usize) -> anyhow::Result<()> {
    let end = shared.start + plan.duration;
    let max = plan.max_requests;
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency.max(1) {
        let shared = shared.clone();
        workers.push(tokio::spawn(async move {
            tokio::time::sleep_until(shared.start.into()).await;
            loop {
                let now = Instant::now();
                if now >= end {
                    return;
                }
                let i = shared.next.fetch_add(1, Ordering::Relaxed);
                if i >= max {
                    return;
                }
                shared.execute(i, now).await;
            }
        }));
    }
    for worker in workers {
        worker.await?;
    }
    Ok(())
}
