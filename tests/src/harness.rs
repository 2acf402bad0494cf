//! The end-to-end harness: the mock upstream and a real `tollgate` proxy (started with
//! [`tollgate::app::start`] on `127.0.0.1:0`) wired together, an HTTP client for both of the
//! proxy's ports, and a reader for the usage ledger it writes.
//!
//! A test describes the proxy by its policy (and, if needed, extra top-level config sections);
//! the harness fills in the listeners, a fresh data directory, a per-harness admin token and
//! routes that point every provider at the mock. Nothing here uses fixed ports, and every wait
//! is bounded in count and time.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::mock::MockUpstream;

/// The HTTP client the tests use towards the proxy.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// How long [`Harness::ledger_until`] waits for records before giving up.
pub const LEDGER_WAIT: Duration = Duration::from_secs(5);

/// A policy that allows every LLM call with no limits or budgets.
pub const ALLOW_ALL: &str = "version: v1\ndefaults: {llm: allow, tool: allow, other: deny}\n";

/// Attribution headers that pass the default rules, for `agent`.
pub fn tags(agent: &str) -> Vec<(String, String)> {
    vec![
        ("x-agent-id".into(), agent.into()),
        ("x-cost-center".into(), "CC-1234".into()),
        ("x-project-id".into(), "PROJ-ABC123".into()),
    ]
}

/// A fresh directory under the system temp dir, unique in this process and across processes.
pub fn temp_dir(label: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "tollgate-e2e-{label}-{}-{n}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// A response read to its end.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON; panics with the body text if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body))
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// How to start a [`Harness`].
#[derive(Clone, Debug)]
pub struct Builder {
    policy: String,
    extra: String,
    token: bool,
    upstream: Option<String>,
    timeouts: Option<String>,
    data_dir: Option<PathBuf>,
    ledger_fault: Option<Arc<AtomicBool>>,
    routes: Vec<String>,
}

impl Builder {
    /// An extra route, as a YAML flow mapping in which `{upstream}` stands for the upstream's URL
    /// (`{name: deploy, path_prefix: /tools/deploy, kind: tool, upstream: "{upstream}"}`),
    /// placed before the default routes.
    pub fn route(mut self, yaml: &str) -> Self {
        self.routes.push(yaml.to_string());
        self
    }

    /// The `policy:` section, as a YAML document (indented by the builder).
    pub fn policy(mut self, yaml: &str) -> Self {
        self.policy = yaml.to_string();
        self
    }

    /// Extra top-level config sections, as YAML (`limits:`, `metrics:`, `policy_source:`).
    pub fn extra(mut self, yaml: &str) -> Self {
        self.extra.push_str(yaml);
        if !self.extra.ends_with('\n') {
            self.extra.push('\n');
        }
        self
    }

    /// Routes to `url` instead of the mock (e.g. a closed port).
    pub fn upstream(mut self, url: &str) -> Self {
        self.upstream = Some(url.to_string());
        self
    }

    /// The `upstream:` timeouts as a YAML flow mapping.
    pub fn timeouts(mut self, yaml: &str) -> Self {
        self.timeouts = Some(yaml.to_string());
        self
    }

    /// Uses `dir` as the data directory (e.g. a previous harness's, to restart on its ledger).
    /// The caller owns it: it is not removed when the harness is dropped.
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }

    /// Every ledger write and sync fails like a full disk while `fault` is set.
    pub fn ledger_fault(mut self, fault: Arc<AtomicBool>) -> Self {
        self.ledger_fault = Some(fault);
        self
    }

    /// Starts without an admin token in the environment (the admin API then answers 401).
    pub fn without_token(mut self) -> Self {
        self.token = false;
        self
    }

    /// Starts the mock, then the proxy on a config routing every provider to it.
    pub async fn start(self) -> Harness {
        let mock = MockUpstream::start().await;
        let owns_data_dir = self.data_dir.is_none();
        let data_dir = self.data_dir.clone().unwrap_or_else(|| temp_dir("data"));
        let id = NEXT_HARNESS.fetch_add(1, Ordering::Relaxed);
        let token_env = format!("TOLLGATE_E2E_TOKEN_{}_{id}", std::process::id());
        let token = format!("secret-{id}");
        if self.token {
            // A variable name per harness: tests running in parallel never share one.
            std::env::set_var(&token_env, &token);
        }
        let upstream = self.upstream.clone().unwrap_or_else(|| mock.base_url());
        let mut yaml = config_yaml(&upstream, &data_dir, &token_env, &self.policy, &self.extra);
        for route in &self.routes {
            let route = route.replace("{upstream}", &upstream);
            yaml = yaml.replacen("routes:\n", &format!("routes:\n  - {route}\n"), 1);
        }
        if let Some(timeouts) = &self.timeouts {
            yaml = yaml.replace(
                "upstream: {connect_timeout: 2s, response_timeout: 10s, stream_idle_timeout: 10s}",
                &format!("upstream: {timeouts}"),
            );
        }
        let config = tollgate::config::Config::from_str(&yaml)
            .unwrap_or_else(|e| panic!("harness config does not load: {e}\n{yaml}"));
        let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy listener");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin listener");
        let (stop, stopped) = oneshot::channel::<()>();
        let hooks = tollgate::app::Hooks { ledger_fault: self.ledger_fault.clone() };
        let running = tollgate::app::start_with(
            config,
            proxy,
            admin,
            async move {
                let _ = stopped.await;
            },
            hooks,
        )
        .await
        .unwrap_or_else(|e| panic!("starting the proxy: {e:#}"));
        Harness {
            proxy: format!("http://{}", running.proxy_addr),
            admin: format!("http://{}", running.admin_addr),
            proxy_addr: running.proxy_addr,
            token,
            data_dir,
            owns_data_dir,
            client: Client::builder(TokioExecutor::new()).build_http(),
            mock,
            stop: Some(stop),
            running: Some(running),
        }
    }
}

static NEXT_HARNESS: AtomicU64 = AtomicU64::new(0);

/// The whole config document the harness runs.
pub fn config_yaml(
    upstream: &str,
    data_dir: &Path,
    token_env: &str,
    policy: &str,
    extra: &str,
) -> String {
    let policy: String = policy.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "version: 1\n\
         listen: 127.0.0.1:0\n\
         admin: {{listen: 127.0.0.1:0, token_env: {token_env}}}\n\
         data_dir: {data}\n\
         shutdown_drain: 3s\n\
         routes:\n\
         \x20 - {{name: anthropic, path_prefix: /v1/messages, kind: anthropic, upstream: \"{upstream}\"}}\n\
         \x20 - {{name: openai, path_prefix: /v1/, kind: openai, upstream: \"{upstream}\"}}\n\
         upstream: {{connect_timeout: 2s, response_timeout: 10s, stream_idle_timeout: 10s}}\n\
         {extra}\
         policy:\n{policy}",
        data = serde_json::to_string(&data_dir.display().to_string()).unwrap_or_default(),
    )
}

/// A running mock + proxy pair; stops both when dropped.
pub struct Harness {
    /// `http://127.0.0.1:<proxy port>`.
    pub proxy: String,
    /// `http://127.0.0.1:<admin port>`.
    pub admin: String,
    pub proxy_addr: std::net::SocketAddr,
    /// The admin bearer token (set in the environment variable the config names).
    pub token: String,
    pub data_dir: PathBuf,
    /// Whether the data directory is removed on drop (not when the builder was given one).
    owns_data_dir: bool,
    pub client: HttpClient,
    pub mock: MockUpstream,
    stop: Option<oneshot::Sender<()>>,
    running: Option<tollgate::app::Running>,
}

impl Harness {
    /// A builder with [`ALLOW_ALL`] as the policy.
    pub fn builder() -> Builder {
        Builder {
            policy: ALLOW_ALL.to_string(),
            extra: String::new(),
            token: true,
            upstream: None,
            timeouts: None,
            data_dir: None,
            ledger_fault: None,
            routes: Vec::new(),
        }
    }

    /// Mock + proxy with the given policy.
    pub async fn start(policy: &str) -> Harness {
        Harness::builder().policy(policy).start().await
    }

    /// The proxy's shared state (for flushing the ledger).
    pub fn shared(&self) -> &std::sync::Arc<tollgate::state::Shared> {
        &self.running.as_ref().expect("running until stopped").shared
    }

    /// Sends a request to the proxy and returns the response head with its body unread.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(String, String)],
        body: impl Into<Bytes>,
    ) -> Response<Incoming> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.proxy))
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = request.body(Full::new(body.into())).expect("valid request");
        tokio::time::timeout(Duration::from_secs(10), self.client.request(request))
            .await
            .expect("proxy answered within 10 s")
            .expect("proxy answered")
    }

    /// POSTs `body` as JSON to the proxy and reads the whole response.
    pub async fn post(&self, path: &str, headers: &[(String, String)], body: &Value) -> Reply {
        let response = self.send(Method::POST, path, headers, body.to_string()).await;
        read(response).await
    }

    /// GETs an admin path, with the bearer token when `auth`.
    pub async fn admin_get(&self, path: &str, auth: bool) -> Reply {
        self.admin_call(Method::GET, path, auth).await
    }

    /// Calls an admin path with an empty body.
    pub async fn admin_call(&self, method: Method, path: &str, auth: bool) -> Reply {
        let mut request = Request::builder().method(method).uri(format!("{}{path}", self.admin));
        if auth {
            request = request.header("authorization", format!("Bearer {}", self.token));
        }
        let request = request.body(Full::new(Bytes::new())).expect("valid request");
        let response = tokio::time::timeout(Duration::from_secs(10), self.client.request(request))
            .await
            .expect("admin answered within 10 s")
            .expect("admin answered");
        read(response).await
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let reply = self.admin_get("/metrics", false).await;
        assert_eq!(reply.status, StatusCode::OK);
        reply.text()
    }

    /// Every audit record written so far, as JSON (after flushing what is queued).
    pub async fn audit(&self) -> Vec<Value> {
        self.shared().ledger.flush().await;
        tollgate::audit::read_all(&self.data_dir).unwrap_or_else(|e| {
            panic!("reading the audit log in {}: {e:#}", self.data_dir.display())
        })
    }

    /// Every ledger record written so far (after flushing what is queued).
    pub async fn ledger(&self) -> Vec<Value> {
        self.shared().ledger.flush().await;
        read_ledger(&self.data_dir)
    }

    /// Polls the ledger (every 10 ms, at most [`LEDGER_WAIT`]) until it holds at least `n`
    /// records; returns them, or panics naming how many arrived.
    pub async fn ledger_until(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + LEDGER_WAIT;
        loop {
            let records = self.ledger().await;
            if records.len() >= n {
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "ledger has {} record(s) after {LEDGER_WAIT:?}, expected {n}",
                records.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the proxy and waits until it has drained and flushed the ledger.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(running) = self.running.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), running.wait()).await;
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if self.owns_data_dir {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// Reads a response to its end (at most 10 s).
pub async fn read(response: Response<Incoming>) -> Reply {
    try_read(response).await.unwrap_or_else(|e| panic!("{e}"))
}

/// [`read`], with a failed or slow body as an error (an upstream that cut its stream).
pub async fn try_read(response: Response<Incoming>) -> Result<Reply, String> {
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .map_err(|_| "body not read within 10 s".to_string())?
        .map_err(|e| format!("body read: {e}"))?
        .to_bytes();
    Ok(Reply { status: parts.status, headers: parts.headers, body })
}

/// Parses a ledger file: one JSON object per line (a missing file is an empty ledger).
pub fn read_ledger(data_dir: &Path) -> Vec<Value> {
    read_entries(data_dir).into_iter().filter(|r| r["type"] == "usage").collect()
}

/// Every ledger entry (usage and reserve records), checksums verified.
pub fn read_entries(data_dir: &Path) -> Vec<Value> {
    tollgate::ledger::read_all(data_dir)
        .unwrap_or_else(|e| panic!("reading the ledger in {}: {e:#}", data_dir.display()))
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> =
                event.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim).collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// An exact decimal USD amount (`"12.345678901"`, `"-0.5"`) in nano-USD, parsed here rather
/// than by the proxy's own `Money` so that a bug there cannot hide.
///
/// # Panics
/// If `decimal` is not a plain decimal with at most 9 fractional digits.
pub fn nanos(decimal: &str) -> i64 {
    let (negative, digits) = match decimal.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, decimal),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    assert!(
        !whole.is_empty()
            && fraction.len() <= 9
            && whole.bytes().chain(fraction.bytes()).all(|b| b.is_ascii_digit()),
        "not a decimal amount: {decimal:?}"
    );
    let whole: i64 = whole.parse().unwrap_or_else(|_| panic!("amount too large: {decimal:?}"));
    let fraction: i64 = format!("{fraction:0<9}").parse().unwrap_or(0);
    let n = whole * 1_000_000_000 + fraction;
    if negative {
        -n
    } else {
        n
    }
}
