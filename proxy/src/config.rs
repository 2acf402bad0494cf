//! The proxy's configuration file: listeners, routes, upstream timeouts, limits, storage, and
//! the core's sections (attribution, policy, pricing, autonomy, guardrails).
//!
//! Parsing keeps I/O apart: [`Config::from_str`] takes text (YAML or JSON) and reports **every**
//! error with its field path and line; `load` reads a file. The embedded default (`default.yaml`)
//! is what `tollgate run` uses without `--config`, and a test proves it loads.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tollgate_core::doc::{self, Cx, DocErrors, Field};
use tollgate_core::engine::{Engine, EngineConfig};

/// The configuration `tollgate run` uses without `--config`.
pub const DEFAULT_YAML: &str = include_str!("default.yaml");

/// Which upstream API a route speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamKind {
    OpenAi,
    Anthropic,
    OpenAiCompatible,
    Mcp,
    Tool,
}

impl UpstreamKind {
    const NAMES: [&'static str; 5] = ["openai", "anthropic", "openai_compatible", "mcp", "tool"];

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "openai" => UpstreamKind::OpenAi,
            "anthropic" => UpstreamKind::Anthropic,
            "openai_compatible" => UpstreamKind::OpenAiCompatible,
            "mcp" => UpstreamKind::Mcp,
            "tool" => UpstreamKind::Tool,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// LLM routes are metered in tokens; tool routes per call.
    pub fn is_llm(self) -> bool {
        matches!(
            self,
            UpstreamKind::OpenAi | UpstreamKind::Anthropic | UpstreamKind::OpenAiCompatible
        )
    }

    /// The provider name used in policy matching and the ledger.
    pub fn provider(self) -> &'static str {
        match self {
            UpstreamKind::OpenAi | UpstreamKind::OpenAiCompatible => "openai",
            UpstreamKind::Anthropic => "anthropic",
            UpstreamKind::Mcp => "mcp",
            UpstreamKind::Tool => "tool",
        }
    }
}

/// One route: requests matching `host` (if set) and `path_prefix` go to `upstream`.
#[derive(Clone, Debug)]
pub struct Route {
    pub name: String,
    pub host: Option<String>,
    pub path_prefix: String,
    pub kind: UpstreamKind,
    /// Scheme and authority of the upstream, plus an optional base path.
    pub upstream: http::Uri,
    /// For `tool` routes: the action name the policy sees (default: the route name).
    pub tool: Option<String>,
    /// For tool routes: the guardrail action category.
    pub category: Option<String>,
    /// Forward the attribution headers to this upstream (default: only to `tool`/`mcp` routes
    /// of your own; never to third-party LLM APIs).
    pub forward_attribution: bool,
    /// The risk dimensions of this route's actions (`risk:`), scored by the oversight step.
    pub risk: Option<tollgate_core::risk::Profile>,
}

impl Route {
    /// This route for a request that came through the forward proxy: the client already names
    /// the upstream's own path, so the upstream's base path (if any) is not prepended.
    pub fn for_forward(&self) -> Route {
        let mut route = self.clone();
        if let Some(authority) = self.upstream.authority() {
            let scheme = self.upstream.scheme_str().unwrap_or("https");
            if let Ok(uri) = format!("{scheme}://{authority}/").parse() {
                route.upstream = uri;
            }
        }
        route
    }

    /// Whether this route's upstream is `host` (ASCII case ignored) on `port` (any if `None`).
    pub fn upstream_is(&self, host: &str, port: Option<u16>) -> bool {
        let default_port = if self.upstream.scheme_str() == Some("https") { 443 } else { 80 };
        self.upstream.host().is_some_and(|h| h.eq_ignore_ascii_case(host))
            && port.is_none_or(|p| self.upstream.port_u16().unwrap_or(default_port) == p)
    }

    /// The tool name and route kind the policy sees: the MCP `tools/call` name or the route's
    /// tool for tool routes; the kind by upstream (`RouteKind::of_upstream`): `llm` for model
    /// routes, `tool` for every request to an MCP or REST tool route (an MCP `initialize` or
    /// `tools/list` too, with no tool name).
    pub fn classify<'a>(
        &'a self,
        info: &'a tollgate_core::inspect::RequestInfo,
    ) -> (Option<&'a str>, tollgate_core::policy::RouteKind) {
        use tollgate_core::policy::RouteKind;
        let tool = match self.kind {
            UpstreamKind::Mcp => info.tool_calls().next().map(|t| t.name.as_str()),
            UpstreamKind::Tool => Some(self.tool.as_deref().unwrap_or(self.name.as_str())),
            _ => None,
        };
        let tool_server = matches!(self.kind, UpstreamKind::Mcp | UpstreamKind::Tool);
        (tool, RouteKind::of_upstream(self.kind.is_llm(), tool_server))
    }
}

/// Timeouts towards upstreams.
#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    /// From sending the request to the response head: long, because LLMs think.
    pub response_timeout: Duration,
    /// Longest silence between two body frames of a response.
    pub stream_idle_timeout: Duration,
    pub extra_ca_file: Option<PathBuf>,
}

/// Request limits against abuse.
#[derive(Clone, Debug)]
pub struct RequestLimits {
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: usize,
    pub header_read_timeout: Duration,
    /// Longest silence between two pieces of a request body (then 408 and close).
    pub body_idle_timeout: Duration,
    /// Connections served at once on the proxy listener; more are answered 503 and closed.
    pub max_connections: usize,
    /// Connections served at once on the admin listener (operators, the scraper and, on a
    /// collector, every sidecar and Envoy worker of the fleet).
    pub max_admin_connections: usize,
    /// Requests being served at once; more are answered 503 `overloaded` with `Retry-After`.
    pub max_requests_in_flight: usize,
}

/// The whole configuration, validated.
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Name of the environment variable holding the admin API bearer token.
    pub admin_token_env: String,
    pub data_dir: PathBuf,
    pub routes: Vec<Route>,
    /// `routes` as the forward proxy uses them ([`Route::for_forward`]), made once.
    forward_routes: Vec<Route>,
    pub upstream: UpstreamSettings,
    pub limits: RequestLimits,
    pub shutdown_drain: Duration,
    pub max_label_values: usize,
    /// Policy source to watch, if the policy is not inline.
    pub policy_source: Option<PolicySource>,
    /// Longest wait of a written ledger record for fsync (0: every batch is synced at once).
    pub ledger_fsync_interval: Duration,
    pub ledger_segment_bytes: u64,
    /// `false` only to measure what the ledger costs: nothing is recorded then.
    pub ledger_enabled: bool,
    /// Where the key of the ledger's keyed chain comes from (`hmac_key_file` / `hmac_key_env`).
    pub ledger_hmac_key: Option<crate::store::chain::KeySource>,
    /// Corrupt ledger records accepted as lost (`00000003.seg:17`): the proxy starts without them.
    pub ledger_accept_corrupt: Vec<String>,
    /// How the ledger and the audit log write new records (`compact` unless `json`).
    pub ledger_encoding: crate::store::chain::Encoding,
    /// How long sealed segments are kept (`ledger.retention`): 7 days when records are shipped
    /// (`chargeback.export`), else unbounded (`None`).
    pub ledger_retention: Option<Duration>,
    /// `/readyz` warns (and logs) while the data volume has less free space (0: never).
    pub ledger_warn_free_bytes: u64,
    /// The data volume's size when smaller than its filesystem (`ledger.volume_bytes`).
    pub ledger_volume_bytes: Option<u64>,
    /// Costs shared by every request of a month (e.g. the proxy fleet), allocated on invoices.
    pub shared_costs: Vec<SharedCost>,
    /// Where ledger records are shipped (at least once), if anywhere.
    pub export: Option<Export>,
    /// HTTP_PROXY / HTTPS_PROXY mode (`forward_proxy:`).
    pub forward: ForwardProxy,
    /// Approvals and the runaway-agent guards (`oversight:`).
    pub oversight: crate::oversight::config::OversightConfig,
    /// Webhook receivers of alerts (`alerts:`).
    pub alerts: crate::alerts::config::AlertsConfig,
    /// Whether an `autonomy:` section gates actions by mode (without one, none is gated).
    pub autonomy_configured: bool,
    /// Where budgets are counted (`store:`): this process (`None`) or Redis, shared by the fleet.
    pub store: Option<crate::fleet::StoreConfig>,
    /// OpenTelemetry traces of proxied calls (`traces:`), off by default.
    pub traces: Traces,
    pub engine: Engine,
    /// The file this config was read from (`None`: the embedded default or a string); the
    /// running proxy watches it and reloads what it can.
    pub source: Option<PathBuf>,
}

/// What the forward proxy does with a host that is no route's upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtherHosts {
    /// 403 on the `CONNECT` (or the absolute-form request).
    Refuse,
    /// Pass the bytes through unmetered (never to loopback, link-local or metadata addresses
    /// unless `allow_loopback`).
    Tunnel,
}

/// The `forward_proxy:` section: HTTP_PROXY / HTTPS_PROXY mode on the proxy listener.
#[derive(Clone, Debug)]
pub struct ForwardProxy {
    pub enabled: bool,
    /// The CA that signs the certificates minted for intercepted hosts (`tollgate ca init`).
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    pub other_hosts: OtherHosts,
    /// Tunnel to loopback addresses too (off: a client cannot reach the proxy's own host).
    pub allow_loopback: bool,
    /// Upstream host → address to connect to instead of resolving it (tests, private links).
    pub overrides: Vec<UpstreamOverride>,
    /// A tunnel (`other_hosts: tunnel`) with no bytes either way for this long is closed.
    pub tunnel_idle_timeout: Duration,
}

impl Default for ForwardProxy {
    fn default() -> Self {
        ForwardProxy {
            enabled: false,
            ca_cert: None,
            ca_key: None,
            other_hosts: OtherHosts::Refuse,
            allow_loopback: false,
            overrides: Vec::new(),
            tunnel_idle_timeout: Duration::from_secs(300),
        }
    }
}

/// Connect to `addr` for `host` (its certificate is still verified for `host`), trusting
/// `ca_file` besides the usual roots.
#[derive(Clone, Debug)]
pub struct UpstreamOverride {
    /// Lower case.
    pub host: String,
    pub addr: SocketAddr,
    pub ca_file: Option<PathBuf>,
}

/// The `traces:` section: one OpenTelemetry span per proxied call, exported as OTLP over HTTP
/// (protobuf). Everything but the sampling takes effect at start only.
#[derive(Clone, Debug, PartialEq)]
pub struct Traces {
    pub enabled: bool,
    /// The OTLP/HTTP traces URL (`http://127.0.0.1:4318/v1/traces` by default).
    pub endpoint: http::Uri,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// How long one export may take (then that batch is dropped).
    pub export_timeout: Duration,
    /// Longest wait of a finished span before its batch is sent.
    pub export_interval: Duration,
    /// Finished spans held for export at most; more are dropped (counted by the SDK, never
    /// blocking a request).
    pub max_queue: usize,
    /// Which calls are recorded; applies to the next request after a reload.
    pub sampling: Sampling,
}

/// `traces.sample_ratio` and `traces.parent_based`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// The share of new traces recorded, 0 to 1 (by trace id, so every service that samples
    /// by ratio keeps the same traces).
    pub ratio: f64,
    /// A caller's `traceparent` decides instead: its sampled flag is followed.
    pub parent_based: bool,
}

impl Default for Traces {
    fn default() -> Self {
        Traces {
            enabled: false,
            endpoint: http::Uri::from_static("http://127.0.0.1:4318/v1/traces"),
            service_name: "tollgate".into(),
            export_timeout: Duration::from_secs(10),
            export_interval: Duration::from_secs(5),
            max_queue: 2048,
            sampling: Sampling { ratio: 1.0, parent_based: true },
        }
    }
}

/// Shipping ledger records to a collector.
#[derive(Clone, Debug)]
pub struct Export {
    pub url: http::Uri,
    pub batch: usize,
    pub interval: Duration,
    /// The environment variable holding the bearer token sent to the collector (a Tollgate
    /// collector's admin token), if any.
    pub token_env: Option<String>,
}

/// A shared cost to allocate over the period's requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedCost {
    pub name: String,
    pub amount: tollgate_core::money::Money,
}

/// Where policy updates come from.
#[derive(Clone, Debug)]
pub enum PolicySource {
    File { path: PathBuf, poll: Duration },
    Url { url: http::Uri, poll: Duration },
}

const TOP: &[&str] = &[
    "version",
    "listen",
    "admin",
    "data_dir",
    "routes",
    "upstream",
    "limits",
    "shutdown_drain",
    "metrics",
    "policy_source",
    "ledger",
    "chargeback",
    "forward_proxy",
    "attribution",
    "policy",
    "pricing",
    "autonomy",
    "guardrails",
    "oversight",
    "store",
    "alerts",
    "traces",
];

impl Config {
    /// Parses and validates a configuration document.
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str) -> Result<Config, DocErrors> {
        let node = doc::parse(text)?;
        let mut cx = Cx::new();
        let root = Field::root(&node);
        let config = decode(&mut cx, &root);
        match config {
            Some(config) if !cx.has_errors() => cx.finish(config),
            _ => Err(cx.finish(()).err().unwrap_or(DocErrors(Vec::new()))),
        }
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let mut config =
            Config::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Carries over from `running` every setting that takes effect only at start, and returns
    /// the names of those this config changed (they need a restart). What remains new applies
    /// to the next request: routes, attribution, prices, the inline policy, autonomy,
    /// guardrails, body limits, upstream response and stream timeouts, shared costs.
    pub fn keep_restart_only(&mut self, running: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        macro_rules! keep {
            ($name:literal, $($field:tt)+) => {
                if format!("{:?}", self.$($field)+) != format!("{:?}", running.$($field)+) {
                    changed.push($name);
                }
                self.$($field)+ = running.$($field)+.clone();
            };
        }
        keep!("listen", listen);
        keep!("admin.listen", admin_listen);
        keep!("admin.token_env", admin_token_env);
        keep!("data_dir", data_dir);
        keep!("upstream.connect_timeout", upstream.connect_timeout);
        keep!("upstream.extra_ca_file", upstream.extra_ca_file);
        keep!("limits.max_head_bytes", limits.max_head_bytes);
        keep!("limits.max_headers", limits.max_headers);
        keep!("limits.header_read_timeout", limits.header_read_timeout);
        keep!("limits.max_connections", limits.max_connections);
        keep!("limits.max_admin_connections", limits.max_admin_connections);
        keep!("shutdown_drain", shutdown_drain);
        keep!("metrics.max_label_values", max_label_values);
        keep!("policy_source", policy_source);
        keep!("ledger.fsync_interval", ledger_fsync_interval);
        keep!("ledger.segment_bytes", ledger_segment_bytes);
        keep!("ledger.enabled", ledger_enabled);
        keep!("ledger.hmac_key", ledger_hmac_key);
        keep!("ledger.accept_corrupt", ledger_accept_corrupt);
        keep!("ledger.encoding", ledger_encoding);
        keep!("ledger.retention", ledger_retention);
        keep!("ledger.warn_free_bytes", ledger_warn_free_bytes);
        keep!("ledger.volume_bytes", ledger_volume_bytes);
        keep!("export", export);
        keep!("forward_proxy", forward);
        keep!("oversight", oversight);
        keep!("alerts", alerts);
        keep!("autonomy (added or removed)", autonomy_configured);
        keep!("store", store);
        keep!("traces.enabled", traces.enabled);
        keep!("traces.endpoint", traces.endpoint);
        keep!("traces.service_name", traces.service_name);
        keep!("traces.export_timeout", traces.export_timeout);
        keep!("traces.export_interval", traces.export_interval);
        keep!("traces.max_queue", traces.max_queue);
        changed
    }

    /// Pins attribution headers to this sidecar's identity from `TOLLGATE_PIN_<HEADER>`
    /// variables (`TOLLGATE_PIN_X_AGENT_ID=security-agent`, e.g. from the Downward API).
    /// Returns the pinned header names.
    pub fn pin_from_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Vec<String>> {
        let names: Vec<String> =
            self.engine.attribution().header_names().map(str::to_string).collect();
        let mut pinned = Vec::new();
        for (key, value) in vars {
            let Some(suffix) = key.strip_prefix("TOLLGATE_PIN_") else { continue };
            let header = suffix.to_ascii_lowercase().replace('_', "-");
            if !names.contains(&header) {
                anyhow::bail!(
                    "{key}: `{header}` is not an attribution header ({})",
                    names.join(", ")
                );
            }
            self.engine
                .attribution_mut()
                .pin(&header, &value)
                .map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
            pinned.push(header);
        }
        Ok(pinned)
    }

    /// The route for a request that came through the forward proxy to `host` (and `port`, for a
    /// `CONNECT`): among the routes whose upstream is that host, the longest path prefix.
    /// The route comes as [`Route::for_forward`] made it.
    pub fn forward_route(&self, host: &str, port: Option<u16>, path: &str) -> Option<&Route> {
        self.forward_routes
            .iter()
            .filter(|r| r.upstream_is(host, port))
            .filter(|r| path.starts_with(&r.path_prefix))
            .max_by_key(|r| r.path_prefix.len())
    }

    /// Whether a `CONNECT` to `host:port` is intercepted: some route's upstream is that host
    /// and port (normally `https://host`, port 443; the upstream leg then uses the route's own
    /// scheme).
    pub fn intercepts(&self, host: &str, port: u16) -> bool {
        self.routes.iter().any(|r| r.upstream_is(host, Some(port)))
    }

    /// The route for a request, by host (if the route names one) and longest path prefix.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        let host = host.map(|h| h.split(':').next().unwrap_or(h));
        self.routes
            .iter()
            .filter(|r| r.host.as_deref().is_none_or(|rh| Some(rh) == host))
            .filter(|r| path.starts_with(&r.path_prefix))
            .max_by_key(|r| (r.host.is_some(), r.path_prefix.len()))
    }
}

fn decode(cx: &mut Cx, root: &Field<'_>) -> Option<Config> {
    let mut obj = cx.object(root)?;
    if let Some(v) = obj.require(cx, "version") {
        if v.u64(cx).is_some_and(|n| n != 1) {
            v.error(cx, "unsupported config version, expected 1");
        }
    }
    let listen = socket_addr(cx, obj.get("listen"), "127.0.0.1:8080");
    let (admin_listen, admin_token_env) = match obj.get("admin") {
        Some(f) => {
            let mut a = cx.object(&f)?;
            let listen = socket_addr(cx, a.get("listen"), "127.0.0.1:9090");
            let token_env = a
                .get("token_env")
                .and_then(|f| f.non_empty_str(cx).map(str::to_string))
                .unwrap_or_else(|| "TOLLGATE_ADMIN_TOKEN".into());
            a.finish(cx, &["listen", "token_env"]);
            (listen, token_env)
        }
        None => (socket_addr(cx, None, "127.0.0.1:9090"), "TOLLGATE_ADMIN_TOKEN".into()),
    };
    let data_dir = obj
        .get("data_dir")
        .and_then(|f| f.non_empty_str(cx).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("tollgate-data"));
    let routes = obj.require(cx, "routes").map(|f| routes(cx, &f)).unwrap_or_default();
    let upstream = upstream_settings(cx, obj.get("upstream"));
    let shutdown_drain = obj
        .get("shutdown_drain")
        .and_then(|f| f.duration_ms(cx))
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(30));
    let max_label_values = match obj.get("metrics") {
        Some(f) => {
            let mut m = cx.object(&f)?;
            let n = m.get("max_label_values").and_then(|f| f.u64(cx)).unwrap_or(1000);
            m.finish(cx, &["max_label_values"]);
            n as usize
        }
        None => 1000,
    };
    let policy_source = obj.get("policy_source").and_then(|f| policy_source(cx, &f));
    let LedgerSection {
        fsync_interval: ledger_fsync_interval,
        segment_bytes: ledger_segment_bytes,
        enabled: ledger_enabled,
        hmac_key: ledger_hmac_key,
        accept_corrupt: ledger_accept_corrupt,
        encoding: ledger_encoding,
        retention: ledger_retention,
        warn_free_bytes: ledger_warn_free_bytes,
        volume_bytes: ledger_volume_bytes,
    } = ledger(cx, obj.get("ledger"));
    let (shared_costs, export) = chargeback(cx, obj.get("chargeback"));
    let ledger_retention = match ledger_retention {
        Retention::Default if export.is_some() => Some(Duration::from_secs(7 * 86_400)),
        Retention::Default | Retention::Unbounded => None,
        Retention::For(d) => Some(d),
    };
    let forward = obj.get("forward_proxy").map(|f| forward_proxy(cx, &f)).unwrap_or_default();
    let limits = request_limits(cx, obj.get("limits"), forward.enabled);
    let oversight = crate::oversight::config::OversightConfig::decode(cx, obj.get("oversight"));
    let alerts = crate::alerts::config::AlertsConfig::decode(cx, obj.get("alerts"));
    let autonomy_configured = obj.get("autonomy").is_some();
    let store = crate::fleet::StoreConfig::decode(cx, obj.get("store"));
    let traces = obj.get("traces").map(|f| traces(cx, &f)).unwrap_or_default();
    let engine = EngineConfig {
        attribution: obj.get("attribution"),
        policy: obj.get("policy"),
        pricing: obj.get("pricing"),
        autonomy: obj.get("autonomy"),
        guardrails: obj.get("guardrails"),
        read_file: Some(&read_file),
    }
    .compile(cx);
    if let (Some(_), Some(engine), Some(f)) = (&store, &engine, obj.get("store")) {
        for b in engine.policy().all_budgets() {
            if b.amount.nanos() > crate::fleet::MAX_BUDGET_NANOS {
                f.error(
                    cx,
                    format!(
                        "budget `{}` ({} USD) is above what the fleet store counts exactly \
                         ($9,007,199.25 per counter)",
                        b.id, b.amount
                    ),
                );
            }
        }
    }
    obj.finish(cx, TOP);
    Some(Config {
        listen,
        admin_listen,
        admin_token_env,
        data_dir,
        forward_routes: routes.iter().map(Route::for_forward).collect(),
        source: None,
        routes,
        upstream,
        limits,
        shutdown_drain,
        max_label_values,
        policy_source,
        ledger_fsync_interval,
        ledger_segment_bytes,
        ledger_enabled,
        ledger_hmac_key,
        ledger_accept_corrupt,
        ledger_encoding,
        ledger_retention,
        ledger_warn_free_bytes,
        ledger_volume_bytes,
        shared_costs,
        export,
        forward,
        oversight,
        alerts,
        autonomy_configured,
        store,
        traces,
        engine: engine?,
    })
}

/// Reads a file the config names (`pricing.litellm_file`), relative to the working directory
/// like the config's other paths.
fn read_file(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| e.to_string())
}

/// An `http://` or `https://` URL with a host.
fn http_url(cx: &mut Cx, f: &Field<'_>) -> Option<http::Uri> {
    let text = f.str(cx)?;
    match text.parse::<http::Uri>() {
        Ok(uri)
            if matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some() =>
        {
            Some(uri)
        }
        _ => {
            f.error(cx, format!("expected an http:// or https:// URL, found `{text}`"));
            None
        }
    }
}

fn socket_addr(cx: &mut Cx, field: Option<Field<'_>>, default: &str) -> SocketAddr {
    let fallback = default.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
    let Some(field) = field else { return fallback };
    match field.str(cx).map(str::parse::<SocketAddr>) {
        Some(Ok(addr)) => addr,
        Some(Err(_)) => {
            field.error(cx, "expected a socket address such as \"127.0.0.1:8080\"");
            fallback
        }
        None => fallback,
    }
}

fn routes(cx: &mut Cx, field: &Field<'_>) -> Vec<Route> {
    let mut out: Vec<Route> = Vec::new();
    for item in field.items(cx) {
        let Some(mut r) = cx.object(&item) else { continue };
        let kind = r.require(cx, "kind").and_then(|f| f.one_of(cx, &UpstreamKind::NAMES));
        let upstream = r.require(cx, "upstream").and_then(|f| http_url(cx, &f));
        let path_prefix = match r.get("path_prefix") {
            Some(f) => f.str(cx).map(str::to_string).filter(|p| {
                let ok = p.starts_with('/');
                if !ok {
                    f.error(cx, "path_prefix must start with `/`");
                }
                ok
            }),
            None => Some("/".to_string()),
        };
        let host = r.get("host").and_then(|f| f.non_empty_str(cx).map(str::to_ascii_lowercase));
        let name = r.get("name").and_then(|f| f.non_empty_str(cx).map(str::to_string));
        let tool = r.get("tool").and_then(|f| f.non_empty_str(cx).map(str::to_string));
        let category = r.get("category").and_then(|f| f.non_empty_str(cx).map(str::to_string));
        let forward_attribution = r.get("forward_attribution").and_then(|f| f.bool(cx));
        let risk = r.get("risk").map(|f| tollgate_core::risk::Profile::decode(cx, &f));
        r.finish(
            cx,
            &[
                "name",
                "host",
                "path_prefix",
                "kind",
                "upstream",
                "tool",
                "category",
                "forward_attribution",
                "risk",
            ],
        );
        let (Some(kind), Some(upstream), Some(path_prefix)) = (kind, upstream, path_prefix) else {
            continue;
        };
        let kind = UpstreamKind::parse(kind).unwrap_or(UpstreamKind::Tool);
        let name = name.unwrap_or_else(|| format!("{}{}", kind.as_str(), path_prefix));
        if out.iter().any(|o| o.host == host && o.path_prefix == path_prefix) {
            item.error(
                cx,
                format!("duplicate route for host {host:?} and path_prefix `{path_prefix}`"),
            );
        }
        out.push(Route {
            name,
            host,
            path_prefix,
            kind,
            upstream,
            tool,
            category,
            forward_attribution: forward_attribution.unwrap_or(false),
            risk,
        });
    }
    out
}

fn upstream_settings(cx: &mut Cx, field: Option<Field<'_>>) -> UpstreamSettings {
    let mut settings = UpstreamSettings {
        connect_timeout: Duration::from_secs(5),
        response_timeout: Duration::from_secs(120),
        stream_idle_timeout: Duration::from_secs(120),
        extra_ca_file: None,
    };
    let Some(field) = field else { return settings };
    let Some(mut o) = cx.object(&field) else { return settings };
    let ms = |cx: &mut Cx, f: Option<Field<'_>>| {
        f.and_then(|f| f.duration_ms(cx)).map(Duration::from_millis)
    };
    if let Some(d) = ms(cx, o.get("connect_timeout")) {
        settings.connect_timeout = d;
    }
    if let Some(d) = ms(cx, o.get("response_timeout")) {
        settings.response_timeout = d;
    }
    if let Some(d) = ms(cx, o.get("stream_idle_timeout")) {
        settings.stream_idle_timeout = d;
    }
    settings.extra_ca_file =
        o.get("extra_ca_file").and_then(|f| f.non_empty_str(cx).map(PathBuf::from));
    o.finish(cx, &["connect_timeout", "response_timeout", "stream_idle_timeout", "extra_ca_file"]);
    settings
}

/// The `limits` section. Connection and in-flight defaults are sized for a sidecar (one agent's
/// traffic) or, with the forward proxy on, for a shared HTTPS_PROXY (many agents).
fn request_limits(cx: &mut Cx, field: Option<Field<'_>>, shared_proxy: bool) -> RequestLimits {
    let mut limits = RequestLimits {
        max_head_bytes: 64 * 1024,
        max_headers: 100,
        max_body_bytes: 16 * 1024 * 1024,
        header_read_timeout: Duration::from_secs(10),
        body_idle_timeout: Duration::from_secs(30),
        max_connections: if shared_proxy { 16_384 } else { 4_096 },
        max_admin_connections: 1_024,
        max_requests_in_flight: if shared_proxy { 8_192 } else { 2_048 },
    };
    let Some(field) = field else { return limits };
    let Some(mut o) = cx.object(&field) else { return limits };
    if let Some(n) = o.get("max_head_bytes").and_then(|f| f.u64(cx)) {
        limits.max_head_bytes = n as usize;
    }
    if let Some(n) = o.get("max_headers").and_then(|f| f.u64(cx)) {
        limits.max_headers = n as usize;
    }
    if let Some(n) = o.get("max_body_bytes").and_then(|f| f.u64(cx)) {
        limits.max_body_bytes = n as usize;
    }
    if let Some(d) = o.get("header_read_timeout").and_then(|f| f.duration_ms(cx)) {
        limits.header_read_timeout = Duration::from_millis(d);
    }
    if let Some(d) = o.get("body_idle_timeout").and_then(|f| f.duration_ms(cx)) {
        limits.body_idle_timeout = Duration::from_millis(d);
    }
    if let Some(n) = o.get("max_connections").and_then(|f| f.u64(cx)) {
        limits.max_connections = n.clamp(1, u32::MAX as u64) as usize;
    }
    if let Some(n) = o.get("max_admin_connections").and_then(|f| f.u64(cx)) {
        limits.max_admin_connections = n.clamp(1, u32::MAX as u64) as usize;
    }
    if let Some(n) = o.get("max_requests_in_flight").and_then(|f| f.u64(cx)) {
        limits.max_requests_in_flight = n.clamp(1, u32::MAX as u64) as usize;
    }
    o.finish(
        cx,
        &[
            "max_head_bytes",
            "max_headers",
            "max_body_bytes",
            "header_read_timeout",
            "body_idle_timeout",
            "max_connections",
            "max_admin_connections",
            "max_requests_in_flight",
        ],
    );
    limits
}

struct LedgerSection {
    fsync_interval: Duration,
    segment_bytes: u64,
    enabled: bool,
    hmac_key: Option<crate::store::chain::KeySource>,
    accept_corrupt: Vec<String>,
    encoding: crate::store::chain::Encoding,
    retention: Retention,
    warn_free_bytes: u64,
    volume_bytes: Option<u64>,
}

/// `ledger.retention`: a duration, `unbounded`, or (absent) by role.
enum Retention {
    Default,
    Unbounded,
    For(Duration),
}

fn ledger(cx: &mut Cx, field: Option<Field<'_>>) -> LedgerSection {
    use crate::store::chain::KeySource;
    let mut out = LedgerSection {
        fsync_interval: Duration::from_millis(5),
        segment_bytes: 64 * 1024 * 1024,
        enabled: true,
        hmac_key: None,
        accept_corrupt: Vec::new(),
        encoding: crate::store::chain::Encoding::Compact,
        retention: Retention::Default,
        warn_free_bytes: 256 * 1024 * 1024,
        volume_bytes: None,
    };
    let Some(field) = field else { return out };
    let Some(mut o) = cx.object(&field) else { return out };
    if let Some(ms) = o.get("fsync_interval").and_then(|f| f.duration_ms(cx)) {
        out.fsync_interval = Duration::from_millis(ms);
    }
    if let Some(f) = o.get("segment_bytes") {
        match f.u64(cx) {
            Some(n) if n >= 4096 => out.segment_bytes = n,
            Some(_) => f.error(cx, "segment_bytes must be at least 4096"),
            None => {}
        }
    }
    if let Some(enabled) = o.get("enabled").and_then(|f| f.bool(cx)) {
        out.enabled = enabled;
    }
    if let Some(f) = o.get("retention") {
        if f.node.scalar() == Some("unbounded") {
            out.retention = Retention::Unbounded;
        } else if let Some(ms) = f.duration_ms(cx) {
            match ms {
                0 => f.error(cx, "retention must be a duration over 0 or `unbounded`"),
                ms => out.retention = Retention::For(Duration::from_millis(ms)),
            }
        }
    }
    if let Some(n) = o.get("warn_free_bytes").and_then(|f| f.u64(cx)) {
        out.warn_free_bytes = n;
    }
    out.volume_bytes = o.get("volume_bytes").and_then(|f| f.u64(cx));
    if let Some(f) = o.get("encoding") {
        if let Some(name) = f.one_of(cx, &["compact", "json"]) {
            out.encoding = match name {
                "json" => crate::store::chain::Encoding::Json,
                _ => crate::store::chain::Encoding::Compact,
            };
        }
    }
    let file = o.get("hmac_key_file");
    let env = o.get("hmac_key_env");
    out.hmac_key = match (file, env) {
        (Some(f), Some(_)) => {
            f.error(cx, "give hmac_key_file or hmac_key_env, not both");
            None
        }
        (Some(f), None) => f.non_empty_str(cx).map(|p| KeySource::File(p.into())),
        (None, Some(f)) => f.non_empty_str(cx).map(|n| KeySource::Env(n.into())),
        (None, None) => None,
    };
    if let Some(f) = o.get("accept_corrupt") {
        for item in f.items(cx) {
            let Some(text) = item.non_empty_str(cx) else { continue };
            let valid = text.split_once(".seg:").is_some_and(|(n, line)| {
                n.len() == 8
                    && n.bytes().all(|b| b.is_ascii_digit())
                    && line.parse::<u64>().is_ok_and(|l| l > 0)
            });
            if valid {
                out.accept_corrupt.push(text.to_string());
            } else {
                item.error(cx, "must name a ledger line as `00000003.seg:17`");
            }
        }
    }
    o.finish(
        cx,
        &[
            "fsync_interval",
            "segment_bytes",
            "enabled",
            "hmac_key_file",
            "hmac_key_env",
            "accept_corrupt",
            "encoding",
            "retention",
            "warn_free_bytes",
            "volume_bytes",
        ],
    );
    out
}

fn chargeback(cx: &mut Cx, field: Option<Field<'_>>) -> (Vec<SharedCost>, Option<Export>) {
    let Some(field) = field else { return (Vec::new(), None) };
    let Some(mut o) = cx.object(&field) else { return (Vec::new(), None) };
    let mut shared = Vec::new();
    for item in o.get("shared_costs").map(|f| f.items(cx)).unwrap_or_default() {
        let Some(mut c) = cx.object(&item) else { continue };
        let name = c.require(cx, "name").and_then(|f| f.non_empty_str(cx).map(str::to_string));
        let amount = c.require(cx, "monthly").and_then(|f| f.money(cx));
        c.finish(cx, &["name", "monthly"]);
        if let (Some(name), Some(amount)) = (name, amount) {
            shared.push(SharedCost { name, amount });
        }
    }
    let export = o.get("export").and_then(|f| {
        let mut e = cx.object(&f)?;
        let url = e.require(cx, "url").and_then(|f| http_url(cx, &f));
        let batch =
            e.get("batch").and_then(|f| f.u64(cx)).unwrap_or(500).clamp(1, 100_000) as usize;
        let interval = e
            .get("interval")
            .and_then(|f| f.duration_ms(cx))
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(1));
        let token_env = e.get("token_env").and_then(|f| f.non_empty_str(cx).map(str::to_string));
        e.finish(cx, &["url", "batch", "interval", "token_env"]);
        Some(Export { url: url?, batch, interval, token_env })
    });
    o.finish(cx, &["shared_costs", "export"]);
    (shared, export)
}

fn traces(cx: &mut Cx, field: &Field<'_>) -> Traces {
    let mut out = Traces::default();
    let Some(mut o) = cx.object(field) else { return out };
    if let Some(enabled) = o.get("enabled").and_then(|f| f.bool(cx)) {
        out.enabled = enabled;
    }
    if let Some(url) = o.get("endpoint").and_then(|f| http_url(cx, &f)) {
        out.endpoint = url;
    }
    if let Some(name) = o.get("service_name").and_then(|f| f.non_empty_str(cx)) {
        out.service_name = name.to_string();
    }
    if let Some(ms) = o.get("export_timeout").and_then(|f| f.duration_ms(cx)) {
        out.export_timeout = Duration::from_millis(ms.max(1));
    }
    if let Some(ms) = o.get("export_interval").and_then(|f| f.duration_ms(cx)) {
        out.export_interval = Duration::from_millis(ms.max(1));
    }
    if let Some(n) = o.get("max_queue").and_then(|f| f.u64(cx)) {
        out.max_queue = n.clamp(1, 1 << 20) as usize;
    }
    if let Some(f) = o.get("sample_ratio") {
        // A probability, not money: the SDK's ratio sampler takes it as a float.
        match f.node.scalar().map(str::parse::<f64>) {
            Some(Ok(r)) if (0.0..=1.0).contains(&r) => out.sampling.ratio = r,
            _ => f.error(cx, "sample_ratio must be a number from 0 to 1"),
        }
    }
    if let Some(b) = o.get("parent_based").and_then(|f| f.bool(cx)) {
        out.sampling.parent_based = b;
    }
    o.finish(
        cx,
        &[
            "enabled",
            "endpoint",
            "service_name",
            "export_timeout",
            "export_interval",
            "max_queue",
            "sample_ratio",
            "parent_based",
        ],
    );
    out
}

fn forward_proxy(cx: &mut Cx, field: &Field<'_>) -> ForwardProxy {
    let mut out = ForwardProxy::default();
    let Some(mut o) = cx.object(field) else { return out };
    out.enabled = o.get("enabled").and_then(|f| f.bool(cx)).unwrap_or(false);
    out.ca_cert = o.get("ca_cert").and_then(|f| f.non_empty_str(cx).map(PathBuf::from));
    out.ca_key = o.get("ca_key").and_then(|f| f.non_empty_str(cx).map(PathBuf::from));
    if let Some(f) = o.get("other_hosts") {
        out.other_hosts = match f.one_of(cx, &["refuse", "tunnel"]) {
            Some("tunnel") => OtherHosts::Tunnel,
            _ => OtherHosts::Refuse,
        };
    }
    out.allow_loopback = o.get("allow_loopback").and_then(|f| f.bool(cx)).unwrap_or(false);
    if let Some(f) = o.get("tunnel_idle_timeout") {
        match f.duration_ms(cx) {
            Some(0) => f.error(cx, "must be longer than 0"),
            Some(ms) => out.tunnel_idle_timeout = Duration::from_millis(ms),
            None => {}
        }
    }
    if let Some(f) = o.get("upstream_overrides") {
        for (host, item) in f.entries(cx) {
            let Some(mut e) = cx.object(&item) else { continue };
            let addr = e.require(cx, "addr").map(|f| socket_addr(cx, Some(f), "127.0.0.1:0"));
            let ca_file = e.get("ca_file").and_then(|f| f.non_empty_str(cx).map(PathBuf::from));
            e.finish(cx, &["addr", "ca_file"]);
            if host.is_empty() || host.contains([':', '/', ' ']) {
                item.error(cx, format!("`{host}` is not a host name"));
                continue;
            }
            if let Some(addr) = addr {
                out.overrides.push(UpstreamOverride {
                    host: host.to_ascii_lowercase(),
                    addr,
                    ca_file,
                });
            }
        }
    }
    let node = o.node();
    let path = o.path().to_string();
    o.finish(
        cx,
        &[
            "enabled",
            "ca_cert",
            "ca_key",
            "other_hosts",
            "allow_loopback",
            "tunnel_idle_timeout",
            "upstream_overrides",
        ],
    );
    if out.enabled && (out.ca_cert.is_none() || out.ca_key.is_none()) {
        cx.error(
            &path,
            node,
            "forward_proxy needs `ca_cert` and `ca_key` when enabled (create them with `tollgate ca init --dir DIR`)",
        );
    }
    out
}

fn policy_source(cx: &mut Cx, field: &Field<'_>) -> Option<PolicySource> {
    let mut o = cx.object(field)?;
    let poll = o
        .get("poll")
        .and_then(|f| f.duration_ms(cx))
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(5));
    let file = o.get("file").and_then(|f| f.non_empty_str(cx).map(PathBuf::from));
    let url = o.get("url").and_then(|f| {
        let text = f.str(cx)?;
        match text.parse::<http::Uri>() {
            Ok(uri) if uri.scheme_str() == Some("http") && uri.authority().is_some() => Some(uri),
            _ => {
                f.error(cx, format!("expected an http:// URL, found `{text}`"));
                None
            }
        }
    });
    let node = o.node();
    let path = o.path().to_string();
    o.finish(cx, &["file", "url", "poll"]);
    match (file, url) {
        (Some(path), None) => Some(PolicySource::File { path, poll }),
        (None, Some(url)) => Some(PolicySource::Url { url, poll }),
        _ => {
            cx.error(&path, node, "policy_source needs exactly one of `file` or `url`");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_loads() {
        let config = Config::from_str(DEFAULT_YAML).expect("default config");
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.admin_listen, "127.0.0.1:9090".parse().unwrap());
        let openai = config.route(None, "/v1/chat/completions").expect("openai route");
        assert_eq!(openai.kind, UpstreamKind::OpenAi);
        assert_eq!(openai.upstream.to_string(), "https://api.openai.com/");
        let anthropic = config.route(None, "/v1/messages").expect("anthropic route");
        assert_eq!(anthropic.kind, UpstreamKind::Anthropic);
        assert!(config.route(None, "/other").is_none());
        assert!(config.engine.rates().resolve("claude-sonnet-4-5").is_some());
    }

    #[test]
    fn limits_default_for_a_sidecar_or_a_shared_forward_proxy() {
        let base = "version: 1\nroutes: []\npolicy: {version: v1}\n";
        let sidecar = Config::from_str(base).expect("valid");
        let l = &sidecar.limits;
        assert_eq!((l.max_connections, l.max_requests_in_flight), (4_096, 2_048));
        assert_eq!(l.max_admin_connections, 1_024);
        assert_eq!(l.body_idle_timeout, Duration::from_secs(30));
        assert_eq!(sidecar.upstream.stream_idle_timeout, Duration::from_secs(120));
        let shared =
            format!("{base}forward_proxy: {{enabled: true, ca_cert: c.pem, ca_key: k.pem}}\n");
        let shared = Config::from_str(&shared).expect("valid");
        let l = &shared.limits;
        assert_eq!((l.max_connections, l.max_requests_in_flight), (16_384, 8_192));
        let set = format!("{base}limits: {{max_connections: 10, max_requests_in_flight: 0}}\n");
        let l = Config::from_str(&set).expect("valid").limits;
        assert_eq!((l.max_connections, l.max_requests_in_flight), (10, 1));
    }

    #[test]
    fn the_fleet_store_section_has_defaults_and_names_its_errors() {
        let base = "version: 1\nroutes: []\npolicy: {version: v1}\n";
        let store = |yaml: &str| Config::from_str(&format!("{base}{yaml}"));
        let r = store("store: {redis: {url: \"redis://:pw@127.0.0.1:6379/0\"}}\n")
            .expect("valid")
            .store
            .expect("a store")
            .redis;
        assert_eq!(r.key_prefix, "tollgate:");
        assert_eq!((r.timeout, r.lease_ttl), (Duration::from_millis(250), Duration::from_secs(10)));
        assert_eq!((r.sync_interval, r.slice_bp), (Duration::from_millis(50), 100));
        assert!(!format!("{r:?}").contains("pw"), "the password stays out of logs: {r:?}");
        let error = |yaml: &str| {
            let errors = store(yaml).err().expect("refused").0;
            (errors[0].path.clone(), errors[0].message.clone())
        };
        assert_eq!(error("store: {redis: {url: \"http://x\"}}\n").0, "store.redis.url");
        assert_eq!(
            error("store: {redis: {url: \"redis://x\", sync_interval: 5s}}\n").0,
            "store.redis.sync_interval"
        );
        assert_eq!(
            error("store: {redis: {url: \"redis://x\"}, on_store_error: local_allowance}\n").0,
            "store.on_store_error"
        );
        assert_eq!(
            error("store: {redis: {url: \"redis://x\"}, local_allowance: \"1\"}\n").0,
            "store.local_allowance",
            "an allowance without its policy"
        );
        let allowed = store(
            "store: {redis: {url: \"redis://x\"}, on_store_error: local_allowance, \
             local_allowance: \"2.50\"}\n",
        )
        .expect("valid");
        assert_eq!(
            allowed.store.unwrap().redis.on_error,
            crate::fleet::OnStoreError::LocalAllowance(2_500_000_000)
        );
        // Sentinel: the master's name and the sentinels; one of url, cluster, sentinel.
        let r = store(
            "store: {redis: {sentinel: {master: m1, nodes: [\"redis://10.0.0.5:26379\", \
             \"redis://10.0.0.6:26379\"]}}}\n",
        )
        .expect("valid")
        .store
        .expect("a store")
        .redis;
        assert_eq!((r.sentinel.as_deref(), r.nodes.len(), r.cluster), (Some("m1"), 2, false));
        assert_eq!(r.wait_replicas, 1, "each write held by a replica by default");
        let r = store(
            "store: {redis: {sentinel: {master: m1, nodes: [\"redis://s:26379\"], \
             wait_for_replicas: 0}}}\n",
        )
        .expect("valid");
        assert_eq!(r.store.unwrap().redis.wait_replicas, 0);
        let (path, message) = error(
            "store: {redis: {url: \"redis://x\", sentinel: {master: m, nodes: [\"redis://s\"]}}}\n",
        );
        assert_eq!(path, "store.redis.sentinel");
        assert!(message.contains("`sentinel` cannot be given with `url`"), "{message}");
        assert_eq!(
            error("store: {redis: {sentinel: {nodes: [\"redis://s\"]}}}\n").0,
            "store.redis.sentinel"
        );
        assert_eq!(
            error("store: {redis: {sentinel: {master: m, nodes: [\"http://s\"]}}}\n").0,
            "store.redis.sentinel.nodes[0]"
        );
        assert_eq!(
            error("store: {redis: {sentinel: {master: m, nodes: []}}}\n").0,
            "store.redis.sentinel.nodes"
        );
        assert_eq!(
            error("store: {redis: {sentinel: {master: m, nodes: [\"redis://s\"], wait_for_replicas: 99}}}\n").0,
            "store.redis.sentinel.wait_for_replicas"
        );
        assert_eq!(error("store: {redis: {key_prefix: x}}\n").0, "store.redis");
        let big = "version: 1\nroutes: []\nstore: {redis: {url: \"redis://x\"}}\npolicy:\n  \
                   version: v1\n  budgets: [{id: huge, scope: global, period: monthly, \
                   amount: \"10000000\"}]\n";
        let errors = Config::from_str(big).err().expect("refused").0;
        assert_eq!(errors[0].path, "store");
        assert!(errors[0].message.contains("huge"), "{}", errors[0].message);
    }

    #[test]
    fn retention_is_a_week_for_a_sidecar_that_ships_and_unbounded_otherwise() {
        let base = "version: 1\nroutes: []\npolicy: {version: v1}\n";
        let ships = "chargeback: {export: {url: \"http://collector:8000/ingest\"}}\n";
        let retention =
            |extra: &str| Config::from_str(&format!("{base}{extra}")).unwrap().ledger_retention;
        assert_eq!(retention(""), None);
        assert_eq!(retention(ships), Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(retention(&format!("{ships}ledger: {{retention: unbounded}}\n")), None);
        assert_eq!(retention("ledger: {retention: 36h}\n"), Some(Duration::from_secs(36 * 3600)));
        let errors =
            Config::from_str(&format!("{base}ledger: {{retention: 0s}}\n")).err().unwrap().0;
        assert_eq!(errors[0].path, "ledger.retention");
    }

    #[test]
    fn routes_prefer_host_then_longest_prefix() {
        let text = "version: 1\nroutes:\n\
            - {name: a, path_prefix: /v1/, kind: openai, upstream: \"http://a\"}\n\
            - {name: b, path_prefix: /v1/messages, kind: anthropic, upstream: \"http://b\"}\n\
            - {name: c, host: llm.internal, path_prefix: /v1/, kind: openai_compatible, upstream: \"http://c\"}\n\
            policy: {version: v1}\n";
        let config = Config::from_str(text).expect("valid");
        let name = |host, path| config.route(host, path).map(|r| r.name.as_str());
        assert_eq!(name(None, "/v1/chat/completions"), Some("a"));
        assert_eq!(name(None, "/v1/messages"), Some("b"));
        assert_eq!(name(Some("llm.internal:8080"), "/v1/messages"), Some("c"));
    }

    #[test]
    fn every_error_names_its_field_and_line() {
        let text = "version: 1\nlisten: nope\nroutes:\n  - {kind: openia, upstream: \"ftp://x\"}\n\
                    upstream: {connect_timeout: 5}\npolicy_source: {}\npolicy: {version: v1}\n";
        let errors = Config::from_str(text).err().expect("invalid").0;
        let got: Vec<(&str, u32)> = errors.iter().map(|e| (e.path.as_str(), e.line)).collect();
        assert_eq!(
            got,
            vec![
                ("listen", 2),
                ("routes[0].kind", 4),
                ("routes[0].upstream", 4),
                ("upstream.connect_timeout", 5),
                ("policy_source", 6),
            ]
        );
    }

    #[test]
    fn the_ledger_key_and_accepted_corrupt_lines_are_checked() {
        let base = "version: 1\nroutes: []\npolicy: {version: v1}\n";
        let config = Config::from_str(&format!(
            "{base}ledger: {{hmac_key_env: LEDGER_KEY, accept_corrupt: [\"00000003.seg:17\"]}}\n"
        ))
        .expect("valid");
        assert_eq!(
            config.ledger_hmac_key,
            Some(crate::store::chain::KeySource::Env("LEDGER_KEY".into()))
        );
        assert_eq!(config.ledger_accept_corrupt, ["00000003.seg:17"]);
        let text = format!(
            "{base}ledger: {{hmac_key_env: K, hmac_key_file: /k, accept_corrupt: [\"3:17\"]}}\n"
        );
        let errors = Config::from_str(&text).err().expect("invalid").0;
        let got: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(got, ["ledger.hmac_key_file", "ledger.accept_corrupt[0]"], "{errors:?}");
    }

    #[test]
    fn forward_proxy_errors_name_their_field_and_line() {
        let text =
            "version: 1\nroutes: []\nforward_proxy:\n  enabled: true\n  other_hosts: maybe\n\
                    \x20 upstream_overrides:\n    api.openai.com: {addr: nope}\n  bogus: 1\n\
                    policy: {version: v1}\n";
        let errors = Config::from_str(text).err().expect("invalid").0;
        let got: Vec<(&str, u32)> = errors.iter().map(|e| (e.path.as_str(), e.line)).collect();
        assert_eq!(
            got,
            vec![
                ("forward_proxy", 4),
                ("forward_proxy.other_hosts", 5),
                ("forward_proxy.upstream_overrides.api.openai.com.addr", 7),
                ("forward_proxy.bogus", 8),
            ]
        );
        assert!(errors[0].message.contains("tollgate ca init"), "{}", errors[3].message);
    }

    #[test]
    fn forward_routes_are_found_by_upstream_host_and_port() {
        let text = "version: 1\nroutes:\n\
            - {name: anthropic, path_prefix: /v1/messages, kind: anthropic, upstream: \"https://api.anthropic.com\"}\n\
            - {name: openai, path_prefix: /v1/, kind: openai, upstream: \"https://api.openai.com/base\"}\n\
            - {name: vllm, host: vllm, path_prefix: /v1/, kind: openai_compatible, upstream: \"http://vllm:8000\"}\n\
            forward_proxy: {enabled: false, upstream_overrides: {API.openai.com: {addr: \"127.0.0.1:9\"}}}\n\
            policy: {version: v1}\n";
        let config = Config::from_str(text).expect("valid");
        let name =
            |host, port, path| config.forward_route(host, port, path).map(|r| r.name.as_str());
        assert_eq!(name("api.openai.com", Some(443), "/v1/messages"), Some("openai"));
        assert_eq!(name("api.anthropic.com", Some(443), "/v1/messages"), Some("anthropic"));
        assert_eq!(name("api.anthropic.com", Some(443), "/v1/chat/completions"), None);
        assert_eq!(name("API.OpenAI.com", None, "/v1/x"), Some("openai"));
        assert_eq!(name("vllm", Some(8000), "/v1/x"), Some("vllm"));
        assert!(config.intercepts("api.openai.com", 443));
        assert!(!config.intercepts("api.openai.com", 8443));
        assert!(!config.intercepts("example.com", 443));
        let forward = config.forward_route("api.openai.com", None, "/v1/x").unwrap();
        assert_eq!(forward.upstream.to_string(), "https://api.openai.com/", "no base path");
        assert_eq!(config.forward.overrides[0].host, "api.openai.com");
    }

    #[test]
    fn identity_is_pinned_from_the_environment() {
        let mut config = Config::from_str(DEFAULT_YAML).expect("default config");
        let pinned = config
            .pin_from_env([("TOLLGATE_PIN_X_AGENT_ID".to_string(), "security-agent".to_string())])
            .expect("pin");
        assert_eq!(pinned, ["x-agent-id"]);
        let err = config
            .pin_from_env([("TOLLGATE_PIN_X_NOPE".to_string(), "a".to_string())])
            .expect_err("unknown header");
        assert!(err.to_string().contains("x-nope"), "{err}");
        let err = config
            .pin_from_env([("TOLLGATE_PIN_X_COST_CENTER".to_string(), "cc-1".to_string())])
            .expect_err("invalid value");
        assert!(err.to_string().contains("TOLLGATE_PIN_X_COST_CENTER"), "{err}");
    }

    #[test]
    fn alerts_webhooks_are_checked_and_default_to_every_event() {
        use crate::alerts::config::{Format, Kind};
        let base = "version: 1\nroutes: []\npolicy: {version: v1}\n";
        let ok = format!(
            "{base}alerts:\n  webhooks:\n\
             \x20   - {{url: \"http://127.0.0.1:9/a\", secret_env: K}}\n\
             \x20   - {{url: \"https://hooks.example.com/b\", format: slack, secret_env: K, \
             events: [approval_pending, circuit_open]}}\n\
             \x20 initial_backoff: 50ms\n  max_attempts: 3\n"
        );
        let config = Config::from_str(&ok).expect("valid");
        let a = &config.alerts;
        assert_eq!(a.webhooks.len(), 2);
        assert_eq!((a.webhooks[0].format, a.webhooks[0].events.len()), (Format::Json, 4));
        assert_eq!(a.webhooks[1].format, Format::Slack);
        assert_eq!(a.webhooks[1].events, [Kind::ApprovalPending, Kind::CircuitOpen]);
        assert_eq!((a.initial_backoff, a.max_attempts), (Duration::from_millis(50), 3));
        assert!(!Config::from_str(base).unwrap().alerts.enabled(), "off without the section");
        let bad = format!(
            "{base}alerts:\n  webhooks:\n\
             \x20   - {{url: \"ftp://x\", format: xml, events: [budget_threshold, nope], extra: 1}}\n\
             \x20   - {{url: \"http://a/\", secret_env: K}}\n\
             \x20   - {{url: \"http://a/\", secret_env: K}}\n\
             \x20 max_attempts: 0\n  bogus: 1\n"
        );
        let errors = Config::from_str(&bad).err().expect("invalid").0;
        assert!(errors[0].message.contains("secret_env"), "{}", errors[0].message);
        let got: Vec<(&str, u32)> = errors.iter().map(|e| (e.path.as_str(), e.line)).collect();
        assert_eq!(
            got,
            vec![
                ("alerts.webhooks[0]", 6),
                ("alerts.webhooks[0].url", 6),
                ("alerts.webhooks[0].format", 6),
                ("alerts.webhooks[0].events[1]", 6),
                ("alerts.webhooks[0].extra", 6),
                ("alerts.webhooks[2]", 8),
                ("alerts.max_attempts", 9),
                ("alerts.bogus", 10),
            ],
            "{errors:?}"
        );
        // A restart-only section: a reload keeps the running receivers and says so.
        let mut reloaded = Config::from_str(base).unwrap();
        assert_eq!(reloaded.keep_restart_only(&config), ["alerts"]);
        assert_eq!(reloaded.alerts, config.alerts);
    }

    #[test]
    fn oversight_and_route_risk_errors_name_their_field_and_line() {
        let text = "version: 1\nroutes:\n\
            - {name: t, path_prefix: /t, kind: tool, upstream: \"http://t\", risk: {reversibility: maybe}}\n\
            oversight:\n\
            \x20 approvals: {medium_timeout: soon}\n\
            \x20 loops: {max_repeats: 0}\n\
            \x20 sweep_interval: 0s\n\
            \x20 bogus: 1\n\
            policy: {version: v1}\n";
        let errors = Config::from_str(text).err().expect("invalid").0;
        let got: Vec<(&str, u32)> = errors.iter().map(|e| (e.path.as_str(), e.line)).collect();
        assert_eq!(
            got,
            vec![
                ("routes[0].risk.reversibility", 3),
                ("oversight.approvals.medium_timeout", 5),
                ("oversight.loops.max_repeats", 6),
                ("oversight.sweep_interval", 7),
                ("oversight.bogus", 8),
            ]
        );
        let ok = "version: 1\nroutes: []\noversight: {breaker: {}, escalation: {review_at: 2}}\n\
                  policy: {version: v1}\n";
        let config = Config::from_str(ok).expect("valid");
        assert_eq!(config.oversight.breaker, Some(Default::default()));
        assert_eq!(config.oversight.escalation.map(|e| e.review_at), Some(2));
        assert!(config.oversight.loops.is_none() && !config.autonomy_configured);
    }

    #[test]
    fn traces_are_off_by_default_and_errors_name_their_field_and_line() {
        let off = Config::from_str("version: 1\nroutes: []\npolicy: {version: v1}\n").unwrap();
        assert_eq!(off.traces, Traces::default());
        assert!(!off.traces.enabled);
        assert_eq!(off.traces.endpoint.to_string(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(off.traces.sampling, Sampling { ratio: 1.0, parent_based: true });
        let on = "version: 1\nroutes: []\n\
                  traces: {enabled: true, endpoint: \"https://otel.example:4318/v1/traces\", \
                  sample_ratio: 0.25, parent_based: false, service_name: gw, export_timeout: 2s}\n\
                  policy: {version: v1}\n";
        let t = Config::from_str(on).expect("valid").traces;
        assert!(t.enabled);
        assert_eq!(t.endpoint.to_string(), "https://otel.example:4318/v1/traces");
        assert_eq!(t.sampling, Sampling { ratio: 0.25, parent_based: false });
        assert_eq!((t.service_name.as_str(), t.export_timeout), ("gw", Duration::from_secs(2)));
        let text = "version: 1\nroutes: []\ntraces:\n  endpoint: \"udp://x\"\n\
                    \x20 sample_ratio: 1.5\n  enabled: yes please\n  bogus: 1\npolicy: {version: v1}\n";
        let errors = Config::from_str(text).err().expect("invalid").0;
        let got: Vec<(&str, u32)> = errors.iter().map(|e| (e.path.as_str(), e.line)).collect();
        assert_eq!(
            got,
            vec![
                ("traces.endpoint", 4),
                ("traces.sample_ratio", 5),
                ("traces.enabled", 6),
                ("traces.bogus", 7),
            ]
        );
    }

    #[test]
    fn the_traces_exporter_needs_a_restart_and_the_sampling_does_not() {
        let text = |endpoint: &str, ratio: &str| {
            format!(
                "version: 1\nroutes: []\ntraces: {{enabled: true, endpoint: \"{endpoint}\", \
                 sample_ratio: {ratio}}}\npolicy: {{version: v1}}\n"
            )
        };
        let running = Config::from_str(&text("http://a:4318/v1/traces", "1")).unwrap();
        let mut next = Config::from_str(&text("http://b:4318/v1/traces", "0.5")).unwrap();
        assert_eq!(next.keep_restart_only(&running), vec!["traces.endpoint"]);
        assert_eq!(next.traces.endpoint, running.traces.endpoint, "kept until a restart");
        assert_eq!(next.traces.sampling.ratio, 0.5, "applies to the next request");
    }
}
