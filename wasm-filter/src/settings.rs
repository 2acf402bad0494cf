//! The plugin configuration: the engine document the sidecar also reads (`attribution`,
//! `policy`, `pricing`, `autonomy`, `guardrails`, `oversight`) plus a `filter` section for what
//! only the Envoy filter has (fail policy, collector cluster, policy source, label caps, the MCP
//! path and category), compiled once per `on_configure`. `guardrails` checks MCP tool calls here
//! as in the sidecar (hourly rates in Envoy shared data); `autonomy` gates actions by mode, its
//! budgets counted in shared data; of `oversight`, the loop detector, the circuit breakers and
//! error escalation (their state in shared data, per Envoy) and the approval thresholds run
//! here, and the approval timeouts are refused with an error naming the field
//! ([`OVERSIGHT_REFUSED`]), never silently ignored; so is `oversight.escalation` without
//! `filter.collector`, where an operator would re-enable the agents it disables.
//!
//! Decoding uses the core's positioned decoder, so an error anywhere, in either part, is reported
//! with its field path and line. This module never talks to the host.

use tollgate_core::doc::{self, Cx, DocErrors, Field};
use tollgate_core::engine::{Engine, EngineConfig};
use tollgate_core::guardrails::breaker::BreakerConfig;
use tollgate_core::guardrails::escalation::EscalationConfig;
use tollgate_core::guardrails::loops::LoopConfig;
use tollgate_core::lifecycle::Guards;
use tollgate_core::oversight::OversightConfig;
use tollgate_core::policy::Snapshot;

/// Sections of the plugin configuration document.
const SECTIONS: [&str; 8] =
    ["filter", "attribution", "policy", "pricing", "autonomy", "guardrails", "oversight", "store"];

/// Fields of the sidecar's `oversight:` section the filter refuses, naming them, and why: the
/// approvals journal that keeps the timeouts lives in the sidecar (or the collector).
pub const OVERSIGHT_REFUSED: [(&str, &str); 4] = [
    ("use_within", "approvals are kept by the collector's approval service, under its own `oversight.use_within`"),
    ("sweep_interval", "approval timeouts are settled by the collector's approval service"),
    ("approvals.medium_timeout", "approval timeouts are the collector's (its own `oversight.approvals`)"),
    ("approvals.high_timeout", "approval timeouts are the collector's (its own `oversight.approvals`)"),
];

/// What the filter does when it cannot decide (bad configuration, budget store failure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailPolicy {
    /// Answer 503: no request passes unchecked (the default).
    Closed,
    /// Let the request through unmetered, marked `x-tollgate-decision: bypass`.
    Open,
}

impl FailPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FailPolicy::Closed => "closed",
            FailPolicy::Open => "open",
        }
    }
}

/// Where usage events go: an Envoy cluster (not a URL: `dispatch_http_call` addresses clusters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Collector {
    pub cluster: String,
    /// `:authority` of the POST.
    pub authority: String,
    pub path: String,
    /// Events are batched per VM and sent on this period.
    pub flush_ms: u64,
    pub timeout_ms: u64,
    /// Events kept per VM while the collector is slow or down; older ones are dropped (and
    /// counted) beyond this.
    pub max_queued: usize,
    /// How often events the collector refused are offered to it again (they stay in the
    /// outbox: the collector may be fixed, or its clock).
    pub retry_refused_ms: u64,
    /// Extra request headers, e.g. `authorization` for the Tollgate proxy's ingest endpoint:
    /// `headers` as given, plus `authorization: Bearer <token>` from the environment variable
    /// named by `token_env` (read once per configuration; Envoy passes it in with
    /// `vm_config.environment_variables`, Istio with `vmConfig.env`).
    pub headers: Vec<(String, String)>,
}

/// Where newer policies come from: polled with `GET` (and `If-None-Match`) through an Envoy
/// cluster. The document is a policy (the `policy:` section's content, YAML or JSON), as for
/// the sidecar's `policy_source` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyUrl {
    pub cluster: String,
    /// `:authority` of the GET.
    pub authority: String,
    pub path: String,
    /// Poll period (each VM polls on its own timer).
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

/// The `filter:` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterSettings {
    pub fail: FailPolicy,
    pub collector: Option<Collector>,
    pub policy_url: Option<PolicyUrl>,
    /// Requests under this path prefix are MCP JSON-RPC tool calls.
    pub mcp_path_prefix: String,
    /// The guardrail action category of those tool calls (the policy's `category` fact), as a
    /// sidecar route's `category:`.
    pub mcp_category: Option<String>,
    /// Keep the attribution headers on the upstream request (default: removed).
    pub forward_attribution: bool,
    /// Ask OpenAI streams for usage on the client's behalf (and remove that chunk again). Costs
    /// the `content-length` of every OpenAI chat/completions request (sent chunked instead),
    /// because the headers go upstream before the body shows whether it streams.
    pub include_usage: bool,
    /// Distinct values per metric label (per VM) before `__other__`.
    pub max_label_values: usize,
    /// How long a reservation is held before it is given back without a settlement.
    pub reservation_ttl_ms: u64,
    /// Timer period for expiring reservations (each VM has its own timer; see
    /// [`Plugin::tick_ms`]).
    pub tick_ms: u64,
    /// Hold the request headers until the decision (`Pause` from the headers hook), so that
    /// nothing reaches the upstream before an allow. Needs Envoy's
    /// `allow_on_headers_stop_iteration: true` on the plugin, without which a paused headers
    /// hook never sees its body; `false` only where the host cannot set it (Istio's
    /// `WasmPlugin`), with Envoy's buffer filter placed after this one to hold the headers.
    pub hold_headers: bool,
    /// Largest request body (bytes): `413 body_too_large` beyond it, from `Content-Length`
    /// before anything is read, as the sidecar's `limits.max_body_bytes` (default 16 MiB).
    pub max_body_bytes: u64,
    /// Longest silence inside a request body the filter waits for: `408 body_timeout` and the
    /// connection closed beyond it, as the sidecar's `limits.body_idle_timeout` (default 30 s;
    /// checked on each VM's timer, so up to one `tick` later).
    pub body_idle_timeout_ms: u64,
}

impl Default for FilterSettings {
    fn default() -> Self {
        FilterSettings {
            fail: FailPolicy::Closed,
            collector: None,
            policy_url: None,
            mcp_path_prefix: "/mcp".into(),
            mcp_category: None,
            forward_attribution: false,
            include_usage: true,
            max_label_values: 1000,
            reservation_ttl_ms: 15 * 60 * 1000,
            tick_ms: 1000,
            hold_headers: true,
            max_body_bytes: 16 * 1024 * 1024,
            body_idle_timeout_ms: 30_000,
        }
    }
}

/// `store: {collector: {...}}`: budgets shared with the fleet through leases the collector
/// grants from its Redis store (the same leases and script as the sidecars').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FleetSettings {
    /// The most one grant holds, in basis points of the budget (`slice_percent`, default 1).
    pub slice_bp: u64,
    /// How often each VM reports spend and renews its leases (`sync_interval`, default 50 ms).
    pub sync_ms: u64,
}

/// The collector's path for lease exchanges.
pub const LEASES_PATH: &str = "/v1/fleet/leases";

/// The collector's paths for raising an approval and using a granted one.
pub const APPROVALS_PATH: &str = "/v1/fleet/approvals";
pub const REDEEM_PATH: &str = "/v1/fleet/approvals/redeem";

/// The collector's path for the agents it lists as disabled (the fleet's, in fleet mode).
pub const DISABLED_PATH: &str = "/v1/fleet/agents/disabled";

/// The collector's path for the fleet's loop counts.
pub const LOOPS_PATH: &str = "/v1/fleet/loops";

/// The collector's path for the filter's breaker openings and disabled agents
/// (`tollgate_core::guardrails::report`).
pub const REPORTS_PATH: &str = "/v1/fleet/oversight/reports";

/// A compiled plugin configuration.
#[derive(Clone, Debug)]
pub struct Plugin {
    pub engine: Engine,
    pub filter: FilterSettings,
    /// Fleet mode: budgets leased through the collector (`None`: this Envoy's shared data).
    pub fleet: Option<FleetSettings>,
    /// The policy in force: the configuration's own until `filter.policy_url` provides a
    /// newer one (see [`Plugin::with_policy`]).
    pub policy: Snapshot,
    /// The oversight guards the lifecycle runs: autonomy modes (with an `autonomy:` section),
    /// the loop detector (`oversight.loops`), the circuit breakers (`oversight.breaker`), the
    /// approval thresholds; `escalation` with `oversight.escalation` (which needs
    /// `filter.collector`) and in fleet mode: the agents the collector lists as disabled are
    /// refused then.
    pub guards: Guards,
    /// `oversight.loops`, whose calls are counted in shared data.
    pub loops: Option<LoopConfig>,
    /// `oversight.breaker`: one breaker per upstream, in shared data.
    pub breaker: Option<BreakerConfig>,
    /// `oversight.escalation`: consecutive errors per agent, in shared data.
    pub escalation: Option<EscalationConfig>,
}

impl Plugin {
    /// Compiles a plugin configuration (JSON, or YAML for tests and humans).
    pub fn from_document(text: &str) -> Result<Plugin, DocErrors> {
        let node = doc::parse(text)?;
        let mut cx = Cx::new();
        let root = Field::root(&node);
        let Some(mut obj) = cx.object(&root) else { return Err(errors(cx)) };
        let filter = match obj.get("filter") {
            Some(f) => decode_filter(&mut cx, &f),
            None => FilterSettings::default(),
        };
        let fleet = obj.get("store").and_then(|f| decode_store(&mut cx, &f, &filter));
        let autonomy = obj.get("autonomy");
        let oversight = decode_oversight(&mut cx, obj.get("oversight"), &filter);
        let guards = Guards {
            autonomy: autonomy.is_some(),
            loops: oversight.loops.is_some(),
            breakers: oversight.breaker.is_some(),
            // Fleet mode: the agents the fleet disabled are refused too.
            escalation: fleet.is_some() || oversight.escalation.is_some(),
            thresholds: oversight.thresholds,
        };
        let engine = EngineConfig {
            attribution: obj.get("attribution"),
            policy: obj.get("policy"),
            pricing: obj.get("pricing"),
            autonomy,
            guardrails: obj.get("guardrails"),
            read_file: None,
        }
        .compile(&mut cx);
        obj.finish(&mut cx, &SECTIONS);
        match engine {
            Some(engine) if !cx.has_errors() => {
                let policy = engine.policy().clone();
                Ok(Plugin {
                    engine,
                    filter,
                    fleet,
                    policy,
                    guards,
                    loops: oversight.loops,
                    breaker: oversight.breaker,
                    escalation: oversight.escalation,
                })
            }
            _ => Err(errors(cx)),
        }
    }

    /// The same plugin deciding with `policy` (a refreshed snapshot).
    pub fn with_policy(&self, policy: Snapshot) -> Plugin {
        Plugin {
            engine: self.engine.clone(),
            filter: self.filter.clone(),
            fleet: self.fleet,
            policy,
            guards: self.guards,
            loops: self.loops,
            breaker: self.breaker,
            escalation: self.escalation,
        }
    }

    /// The tick period: the configured one, shorter if the collector's flush interval or the
    /// policy poll needs it. Every VM (Envoy's main thread and each worker) runs its own timer
    /// and flushes its own outbox on it.
    pub fn tick_ms(&self) -> u64 {
        let flush = self.filter.collector.as_ref().map_or(u64::MAX, |c| c.flush_ms);
        let poll = self.filter.policy_url.as_ref().map_or(u64::MAX, |p| p.interval_ms);
        let sync = self.fleet.map_or(u64::MAX, |f| f.sync_ms);
        self.filter.tick_ms.min(flush).min(poll).min(sync).max(1)
    }
}

/// The fail policy of a configuration that does not compile: read leniently from
/// `filter.fail`, closed when that cannot be read either.
pub fn fail_policy_of(text: &str) -> FailPolicy {
    let fail = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("filter")?.get("fail")?.as_str().map(str::to_owned));
    match fail.as_deref() {
        Some("open") => FailPolicy::Open,
        _ => FailPolicy::Closed,
    }
}

/// The `store:` section: only `collector` (proxy-wasm cannot open a connection to Redis).
fn decode_store(cx: &mut Cx, field: &Field<'_>, filter: &FilterSettings) -> Option<FleetSettings> {
    let mut obj = cx.object(field)?;
    if let Some(f) = obj.get("redis") {
        f.error(
            cx,
            "the Envoy filter cannot reach Redis (proxy-wasm opens no connections of its own); use \
             `store: {collector: {}}`: the filter then leases budgets through the collector, which \
             holds `store.redis`",
        );
    }
    let settings = obj.get("collector").and_then(|f| {
        let mut c = cx.object(&f)?;
        let slice_bp = match c.get("slice_percent") {
            Some(p) => p.u64(cx).and_then(|v| {
                if (1..=100).contains(&v) {
                    Some(v * 100)
                } else {
                    p.error(cx, "expected a percent from 1 to 100");
                    None
                }
            }),
            None => Some(100),
        };
        let sync_ms = match c.get("sync_interval") {
            Some(d) => d.duration_ms(cx).and_then(|ms| {
                if (1..=10_000).contains(&ms) {
                    Some(ms)
                } else {
                    d.error(cx, "expected from 1ms to 10s");
                    None
                }
            }),
            None => Some(50),
        };
        c.finish(cx, &["slice_percent", "sync_interval"]);
        if filter.collector.is_none() {
            f.error(cx, "needs `filter.collector`: leases are exchanged with the collector");
        }
        Some(FleetSettings { slice_bp: slice_bp?, sync_ms: sync_ms? })
    });
    obj.finish(cx, &["collector", "redis"]);
    settings
}

/// The `oversight:` section, decoded as the sidecar decodes it, with the fields the filter
/// cannot honour ([`OVERSIGHT_REFUSED`]) refused, each naming itself, and `escalation` refused
/// without `filter.collector`: an agent the filter disables is re-enabled by an operator
/// through the collector, so without one nobody ever could.
fn decode_oversight(
    cx: &mut Cx,
    field: Option<Field<'_>>,
    filter: &FilterSettings,
) -> OversightConfig {
    if let (Some(f), None) = (field.as_ref().and_then(|f| f.peek("escalation")), &filter.collector)
    {
        f.error(
            cx,
            "needs `filter.collector`: an agent this filter disables stays disabled until an \
             operator re-enables it through the collector (`POST /admin/agents/{agent}/enable`), \
             which the filter reports it to; without a collector nobody could ever re-enable it",
        );
    }
    if let Some(f) = &field {
        for (path, why) in OVERSIGHT_REFUSED {
            let found = match path.split_once('.') {
                Some((section, key)) => f.peek(section).and_then(|s| s.peek(key)),
                None => f.peek(path),
            };
            if let Some(refused) = found {
                refused.error(
                    cx,
                    format!(
                        "the Envoy filter cannot honour `oversight.{path}` ({why}); remove it \
                         from the plugin configuration or run the sidecar"
                    ),
                );
            }
        }
    }
    OversightConfig::decode(cx, field)
}

fn errors(cx: Cx) -> DocErrors {
    cx.finish(()).err().unwrap_or(DocErrors(Vec::new()))
}

fn decode_filter(cx: &mut Cx, field: &Field<'_>) -> FilterSettings {
    let mut settings = FilterSettings::default();
    let Some(mut obj) = cx.object(field) else { return settings };
    if let Some(f) = obj.get("fail") {
        settings.fail = match f.one_of(cx, &["closed", "open"]) {
            Some("open") => FailPolicy::Open,
            _ => FailPolicy::Closed,
        };
    }
    if let Some(f) = obj.get("collector") {
        settings.collector = decode_collector(cx, &f);
    }
    if let Some(f) = obj.get("policy_url") {
        settings.policy_url = decode_policy_url(cx, &f);
    }
    if let Some(p) = obj.get("mcp_path_prefix").and_then(|f| f.non_empty_str(cx)) {
        settings.mcp_path_prefix = p.to_owned();
    }
    if let Some(f) = obj.get("mcp_category") {
        let names = tollgate_core::policy::CATEGORIES;
        settings.mcp_category = f.one_of(cx, &names).map(str::to_owned);
    }
    if let Some(b) = obj.get("forward_attribution").and_then(|f| f.bool(cx)) {
        settings.forward_attribution = b;
    }
    if let Some(b) = obj.get("include_usage").and_then(|f| f.bool(cx)) {
        settings.include_usage = b;
    }
    if let Some(n) = obj.get("max_label_values").and_then(|f| f.u64(cx)) {
        settings.max_label_values = usize::try_from(n).unwrap_or(usize::MAX);
    }
    if let Some(ms) = obj.get("reservation_ttl").and_then(|f| f.duration_ms(cx)) {
        settings.reservation_ttl_ms = ms;
    }
    if let Some(b) = obj.get("hold_headers").and_then(|f| f.bool(cx)) {
        settings.hold_headers = b;
    }
    if let Some(f) = obj.get("max_body_bytes") {
        match f.u64(cx) {
            Some(0) => f.error(cx, "must be more than 0"),
            Some(n) => settings.max_body_bytes = n,
            None => {}
        }
    }
    if let Some(f) = obj.get("body_idle_timeout") {
        match f.duration_ms(cx) {
            Some(0) => f.error(cx, "must be longer than 0"),
            Some(ms) => settings.body_idle_timeout_ms = ms,
            None => {}
        }
    }
    if let Some(f) = obj.get("tick") {
        match f.duration_ms(cx) {
            Some(0) => f.error(cx, "must be longer than 0"),
            Some(ms) => settings.tick_ms = ms,
            None => {}
        }
    }
    obj.finish(
        cx,
        &[
            "fail",
            "collector",
            "policy_url",
            "mcp_path_prefix",
            "mcp_category",
            "forward_attribution",
            "include_usage",
            "max_label_values",
            "reservation_ttl",
            "tick",
            "hold_headers",
            "max_body_bytes",
            "body_idle_timeout",
        ],
    );
    settings
}

fn decode_collector(cx: &mut Cx, field: &Field<'_>) -> Option<Collector> {
    let mut obj = cx.object(field)?;
    let cluster = obj.require(cx, "cluster").and_then(|f| f.non_empty_str(cx));
    let authority = obj.get("authority").and_then(|f| f.non_empty_str(cx));
    let path = obj.get("path").and_then(|f| f.non_empty_str(cx));
    let flush_ms = match obj.get("flush") {
        Some(f) => match f.duration_ms(cx) {
            Some(0) => {
                f.error(cx, "must be longer than 0");
                None
            }
            ms => ms,
        },
        None => None,
    };
    let timeout_ms = obj.get("timeout").and_then(|f| f.duration_ms(cx));
    let max_queued = obj.get("max_queued").and_then(|f| f.u64(cx));
    let retry_refused_ms = obj.get("retry_refused").and_then(|f| f.duration_ms(cx));
    let mut headers = Vec::new();
    if let Some(f) = obj.get("headers") {
        {
            for (name, value) in f.entries(cx) {
                let valid = !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                match value.non_empty_str(cx) {
                    Some(v) if valid => headers.push((name.to_ascii_lowercase(), v.to_owned())),
                    Some(_) => value.error(cx, "not a valid header name"),
                    None => {}
                }
            }
        }
    }
    if let Some(f) = obj.get("token_env") {
        if let Some(var) = f.non_empty_str(cx) {
            match std::env::var(var) {
                Ok(token) if !token.is_empty() => {
                    headers.push(("authorization".to_owned(), format!("Bearer {token}")));
                }
                _ => f.error(cx, format!("the environment variable `{var}` is not set")),
            }
        }
    }
    obj.finish(
        cx,
        &[
            "cluster",
            "authority",
            "path",
            "flush",
            "timeout",
            "max_queued",
            "retry_refused",
            "headers",
            "token_env",
        ],
    );
    let cluster = cluster?.to_owned();
    Some(Collector {
        headers,
        authority: authority.unwrap_or(&cluster).to_owned(),
        cluster,
        path: path.unwrap_or("/v1/usage/events").to_owned(),
        flush_ms: flush_ms.unwrap_or(1000),
        timeout_ms: timeout_ms.unwrap_or(5000),
        max_queued: max_queued.map_or(10_000, |n| usize::try_from(n).unwrap_or(usize::MAX)),
        retry_refused_ms: retry_refused_ms.unwrap_or(60_000).max(1),
    })
}

fn decode_policy_url(cx: &mut Cx, field: &Field<'_>) -> Option<PolicyUrl> {
    let mut obj = cx.object(field)?;
    let cluster = obj.require(cx, "cluster").and_then(|f| f.non_empty_str(cx));
    let authority = obj.get("authority").and_then(|f| f.non_empty_str(cx));
    let path = obj.require(cx, "path").and_then(|f| f.non_empty_str(cx));
    let interval_ms = match obj.get("interval") {
        Some(f) => match f.duration_ms(cx) {
            Some(0) => {
                f.error(cx, "must be longer than 0");
                None
            }
            ms => ms,
        },
        None => Some(30_000),
    };
    let timeout_ms = obj.get("timeout").and_then(|f| f.duration_ms(cx));
    obj.finish(cx, &["cluster", "authority", "path", "interval", "timeout"]);
    let cluster = cluster?.to_owned();
    Some(PolicyUrl {
        authority: authority.unwrap_or(&cluster).to_owned(),
        cluster,
        path: path?.to_owned(),
        interval_ms: interval_ms?,
        timeout_ms: timeout_ms.unwrap_or(5000),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#""policy": {"version": "v1", "defaults": {"llm": "allow"}}"#;

    #[test]
    fn an_engine_document_alone_uses_the_default_filter_settings() {
        let plugin = Plugin::from_document(&format!("{{{POLICY}}}")).unwrap();
        assert_eq!(plugin.filter, FilterSettings::default());
        assert_eq!(plugin.engine.policy().version(), "v1");
    }

    #[test]
    fn filter_settings_are_decoded() {
        let text = format!(
            r#"{{"filter": {{"fail": "open", "mcp_path_prefix": "/tools/mcp",
                "forward_attribution": true, "max_label_values": 5, "include_usage": false, "reservation_ttl": "2m",
                "tick": "250ms",
                "collector": {{"cluster": "tollgate", "path": "/usage", "flush": "2s"}}}},
                {POLICY}}}"#
        );
        let f = Plugin::from_document(&text).unwrap().filter;
        assert_eq!(f.fail, FailPolicy::Open);
        assert_eq!(f.mcp_path_prefix, "/tools/mcp");
        assert!(f.forward_attribution);
        assert!(!f.include_usage);
        assert_eq!(f.max_label_values, 5);
        assert_eq!(f.reservation_ttl_ms, 120_000);
        assert_eq!(f.tick_ms, 250);
        let c = f.collector.unwrap();
        assert_eq!(
            c,
            Collector {
                cluster: "tollgate".into(),
                authority: "tollgate".into(),
                path: "/usage".into(),
                flush_ms: 2000,
                timeout_ms: 5000,
                max_queued: 10_000,
                retry_refused_ms: 60_000,
                headers: Vec::new(),
            }
        );
    }

    #[test]
    fn the_flush_interval_sets_the_tick_and_the_edge_settings_are_read() {
        let text = format!(
            r#"{{"filter": {{"tick": "5s", "hold_headers": false, "max_body_bytes": 1024,
                "body_idle_timeout": "2s",
                "collector": {{"cluster": "c", "flush": "300ms"}}}}, {POLICY}}}"#
        );
        let plugin = Plugin::from_document(&text).unwrap();
        assert_eq!(plugin.tick_ms(), 300, "each VM ticks at least as often as it flushes");
        assert!(!plugin.filter.hold_headers);
        assert_eq!(plugin.filter.max_body_bytes, 1024);
        assert_eq!(plugin.filter.body_idle_timeout_ms, 2000);
        let defaults = FilterSettings::default();
        assert!(defaults.hold_headers, "nothing goes upstream before an allow by default");
        assert_eq!(
            defaults.max_body_bytes,
            16 * 1024 * 1024,
            "the sidecar's limits.max_body_bytes"
        );
        let text = format!(
            r#"{{"filter": {{"max_body_bytes": 0, "collector": {{"cluster": "c", "flush": "0s"}}}},
                {POLICY}}}"#
        );
        let errors = Plugin::from_document(&text).unwrap_err().0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["filter.max_body_bytes", "filter.collector.flush"]);
    }

    #[test]
    fn collector_headers_and_a_token_from_the_environment() {
        std::env::set_var("TOLLGATE_WASM_TEST_TOKEN", "s3cret");
        let text = format!(
            r#"{{"filter": {{"collector": {{"cluster": "tollgate", "headers": {{"X-Tenant": "a"}},
                "token_env": "TOLLGATE_WASM_TEST_TOKEN"}}}}, {POLICY}}}"#
        );
        let c = Plugin::from_document(&text).unwrap().filter.collector.unwrap();
        assert_eq!(
            c.headers,
            [
                ("x-tenant".to_owned(), "a".to_owned()),
                ("authorization".to_owned(), "Bearer s3cret".to_owned())
            ]
        );
        let text = format!(
            r#"{{"filter": {{"collector": {{"cluster": "c", "headers": {{"bad name": "a"}},
                "token_env": "TOLLGATE_WASM_TEST_UNSET"}}}}, {POLICY}}}"#
        );
        let errors = Plugin::from_document(&text).unwrap_err().0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["filter.collector.headers.bad name", "filter.collector.token_env"]);
        assert!(errors[1].message.contains("TOLLGATE_WASM_TEST_UNSET"), "{errors:?}");
    }

    #[test]
    fn policy_url_is_decoded_with_defaults_and_shortens_the_tick() {
        let text = format!(
            r#"{{"filter": {{"policy_url": {{"cluster": "policy", "path": "/p.yaml"}}}}, {POLICY}}}"#
        );
        let plugin = Plugin::from_document(&text).unwrap();
        let expected = PolicyUrl {
            cluster: "policy".into(),
            authority: "policy".into(),
            path: "/p.yaml".into(),
            interval_ms: 30_000,
            timeout_ms: 5000,
        };
        assert_eq!(plugin.filter.policy_url, Some(expected));
        assert_eq!(plugin.tick_ms(), 1000);
        let text = format!(
            r#"{{"filter": {{"tick": "5s", "policy_url": {{"cluster": "c", "authority": "a",
                "path": "/p", "interval": "200ms", "timeout": "1s"}}}}, {POLICY}}}"#
        );
        let plugin = Plugin::from_document(&text).unwrap();
        assert_eq!(plugin.tick_ms(), 200);
        assert_eq!(plugin.filter.policy_url.unwrap().authority, "a");
        let text = format!(
            r#"{{"filter": {{"policy_url": {{"path": "/p", "interval": "0s", "x": 1}}}}, {POLICY}}}"#
        );
        let errors = Plugin::from_document(&text).unwrap_err().0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["filter.policy_url", "filter.policy_url.interval", "filter.policy_url.x"]
        );
        assert!(errors[0].message.contains("`cluster`"), "{errors:?}");
    }

    #[test]
    fn a_refreshed_policy_replaces_only_the_policy() {
        let plugin = Plugin::from_document(&format!("{{{POLICY}}}")).unwrap();
        let v2 = Snapshot::from_yaml_str("version: v2\ndefaults: {llm: deny}\n").unwrap();
        let refreshed = plugin.with_policy(v2);
        assert_eq!(refreshed.policy.version(), "v2");
        assert_eq!(plugin.policy.version(), "v1");
        assert_eq!(refreshed.filter, plugin.filter);
    }

    #[test]
    fn errors_in_the_filter_and_the_engine_are_reported_together_with_paths() {
        let text = "filter:\n  fail: sometimes\n  collector: {}\n  bogus: 1\npolicy:\n  version: v1\n  defaults: {llm: perhaps}\nextra: 2\n";
        let errors = Plugin::from_document(text).unwrap_err().0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for expected in
            ["filter.fail", "filter.collector", "filter.bogus", "policy.defaults.llm", "extra"]
        {
            assert!(paths.iter().any(|p| p.starts_with(expected)), "{expected}: {errors:?}");
        }
        assert_eq!(errors.iter().find(|e| e.path == "filter.fail").map(|e| e.line), Some(2));
    }

    #[test]
    fn autonomy_and_the_loop_detector_are_honoured_and_guardrails_too() {
        let doc = r#"{"policy": {"version": "v", "defaults": {"llm": "allow"}},
                      "autonomy": {"default": "AUTO_EXECUTE",
                                   "accounts": {"off": {"default": "DISABLED"}}},
                      "oversight": {"loops": {"max_repeats": 2, "window": "1m"},
                                    "approvals": {"medium_from": 20, "high_from": 60}},
                      "guardrails": {"actions": {"read_file": {"allowed_resources": ["/w/"]}}}}"#;
        let plugin = Plugin::from_document(doc).expect("honoured");
        assert!(plugin.guards.autonomy && plugin.guards.loops, "{:?}", plugin.guards);
        assert!(!plugin.guards.breakers && !plugin.guards.escalation);
        assert!(plugin.breaker.is_none() && plugin.escalation.is_none());
        assert_eq!(plugin.guards.thresholds.medium_from.hundredths(), 2000);
        assert_eq!(plugin.loops.map(|l| (l.max_repeats, l.window_ms)), Some((2, 60_000)));
        let off = plugin.engine.autonomy().resolve("", "off", "llm");
        assert_eq!(off.mode, tollgate_core::autonomy::Mode::Disabled);
        let g = plugin.engine.enforced_guardrails().expect("enforced");
        assert_eq!(
            g.policy("read_file").map(|p| p.allowed_resources.clone()),
            Some(vec!["/w/".to_string()])
        );
        // The refreshed policy keeps them.
        let again = plugin.with_policy(plugin.policy.clone());
        assert_eq!(again.loops, plugin.loops);
        // Without the sections, nothing is gated.
        let plain = Plugin::from_document(&format!("{{{POLICY}}}")).unwrap();
        assert!(!plain.guards.any() && plain.loops.is_none());
    }

    #[test]
    fn breakers_and_escalation_are_honoured() {
        let doc = "filter: {collector: {cluster: c}}\n\
                   policy: {version: v, defaults: {llm: allow}}\noversight:\n  \
                   breaker: {failure_threshold: 3, open_for: 30s}\n  \
                   escalation: {review_at: 2, disable_at: 4}\n";
        let plugin = Plugin::from_document(doc).expect("honoured");
        assert!(plugin.guards.breakers && plugin.guards.escalation, "{:?}", plugin.guards);
        assert_eq!(
            plugin.breaker,
            Some(BreakerConfig { failure_threshold: 3, open_for_ms: 30_000 })
        );
        assert_eq!(plugin.escalation, Some(EscalationConfig { review_at: 2, disable_at: 4 }));
        let again = plugin.with_policy(plugin.policy.clone());
        assert_eq!((again.breaker, again.escalation), (plugin.breaker, plugin.escalation));
        // Their own errors are reported with their paths.
        let bad = "filter: {collector: {cluster: c}}\n\
                   policy: {version: v, defaults: {llm: allow}}\noversight:\n  \
                   breaker: {failure_threshold: 0}\n  escalation: {review_at: 5, disable_at: 2}\n";
        let errors = Plugin::from_document(bad).expect_err("refused").0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["oversight.breaker.failure_threshold", "oversight.escalation"]);
    }

    #[test]
    fn escalation_needs_the_collector_and_breakers_do_not() {
        let doc = "policy: {version: v, defaults: {llm: allow}}\noversight:\n  \
                   breaker: {failure_threshold: 3}\n  \
                   escalation: {review_at: 2, disable_at: 4}\n";
        let errors = Plugin::from_document(doc).expect_err("refused").0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = &errors[0];
        assert_eq!((e.path.as_str(), e.line), ("oversight.escalation", 4), "{e:?}");
        assert!(e.message.contains("needs `filter.collector`"), "{}", e.message);
        assert!(e.message.contains("POST /admin/agents/{agent}/enable"), "{}", e.message);
        // Breakers alone need no operator, so no collector.
        let breakers = "policy: {version: v, defaults: {llm: allow}}\noversight:\n  \
                        breaker: {failure_threshold: 3}\n";
        let plugin = Plugin::from_document(breakers).expect("breakers alone load");
        assert!(plugin.guards.breakers && !plugin.guards.escalation, "{:?}", plugin.guards);
        // A collector alone runs no escalation (no request is tracked for it).
        let plugin = Plugin::from_document(
            "filter: {collector: {cluster: c}}\npolicy: {version: v, defaults: {llm: allow}}",
        )
        .expect("loads");
        assert!(!plugin.guards.escalation && plugin.escalation.is_none(), "{:?}", plugin.guards);
    }

    #[test]
    fn oversight_fields_the_filter_cannot_run_are_refused_naming_each() {
        let doc = "policy: {version: v, defaults: {llm: allow}}\noversight:\n  loops: {}\n  \
                   use_within: 1h\n  sweep_interval: 1s\n  approvals: {medium_from: 10, \
                   medium_timeout: 1m, high_timeout: 2m}\n  bogus: 1\n";
        let errors = Plugin::from_document(doc).expect_err("refused").0;
        let mut paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(
            paths,
            [
                "oversight.approvals.high_timeout",
                "oversight.approvals.medium_timeout",
                "oversight.bogus",
                "oversight.sweep_interval",
                "oversight.use_within",
            ],
            "{errors:?}"
        );
        let within = errors.iter().find(|e| e.path == "oversight.use_within").unwrap();
        assert!(within.message.contains("cannot honour `oversight.use_within`"), "{within:?}");
        assert_eq!(within.line, 4);
    }

    #[test]
    fn a_litellm_file_is_refused_naming_the_field() {
        let text = "policy:\n  version: v1\npricing:\n  litellm_file: /etc/prices.json\n";
        let errors = Plugin::from_document(text).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!((errors[0].path.as_str(), errors[0].line), ("pricing.litellm_file", 4));
        assert!(errors[0].message.contains("reads no files"), "{}", errors[0].message);
    }

    #[test]
    fn the_fail_policy_of_a_broken_configuration_is_read_leniently() {
        assert_eq!(
            fail_policy_of(r#"{"filter": {"fail": "open"}, "policy": 3}"#),
            FailPolicy::Open
        );
        assert_eq!(fail_policy_of(r#"{"filter": {"fail": "closed"}}"#), FailPolicy::Closed);
        assert_eq!(fail_policy_of("not json"), FailPolicy::Closed);
        assert_eq!(fail_policy_of(r#"{"policy": {}}"#), FailPolicy::Closed);
    }
}
