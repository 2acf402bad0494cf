//! What every connection shares: the config and policy in force (swapped whole on reload),
//! the stores behind budgets, rate limits and oversight, the ledger, the metrics and the
//! upstream client. Built by [`crate::app`], read by everything that serves a request.

use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;

use tollgate_core::budget::{Budgets, Scope};
use tollgate_core::policy::Snapshot;

use crate::config::Config;
use crate::ledger::Ledger;
use crate::limits::RateLimits;
use crate::metrics::Metrics;
use crate::upstream::UpstreamClient;

/// The config and the policy in force: one consistent pair, replaced together.
pub struct Current {
    /// The config file as compiled (routes, attribution, prices, limits, ...). Its engine's
    /// own policy is the file's; the one in force is [`Current::policy`].
    pub config: Arc<Config>,
    /// The policy in force: the config file's, or the last good one from `policy_source`.
    pub policy: Arc<Snapshot>,
}

impl Current {
    /// A config with the policy it carries.
    pub fn new(config: Config) -> Current {
        let policy = Arc::new(config.engine.policy().clone());
        Current { config: Arc::new(config), policy }
    }

    /// The engine (attribution, rate card, autonomy, guardrails) of the config in force.
    pub fn engine(&self) -> &tollgate_core::engine::Engine {
        &self.config.engine
    }
}

/// Everything a request needs, shared by all connections.
pub struct Shared {
    /// The config and the policy in force, swapped whole on reload. A request loads it once
    /// ([`Shared::current`]) and is decided, forwarded and priced under what it loaded.
    pub current: ArcSwap<Current>,
    pub client: UpstreamClient,
    /// Plain-HTTP upstreams: connections driven by the request's own task.
    pub h1_pool: std::sync::Arc<crate::upstream::h1::Pool>,
    /// HTTPS_PROXY mode, when `forward_proxy.enabled`.
    pub forward: Option<Arc<crate::forward::intercepted::Forward>>,
    pub metrics: Metrics,
    pub ledger: Ledger,
    /// Usage events from the mesh (`POST /v1/usage/events`) and the ids already written.
    pub ingest: crate::ingest::Ingest,
    /// Budgets, counted in this process or, in fleet mode, through Redis.
    pub budgets: Budgets<crate::fleet::BudgetStore>,
    pub rate_limits: RateLimits,
    pub admin_token: Option<String>,
    pub started: std::time::Instant,
    /// What the reload task last read from the config file and the policy source.
    pub reload_state: tokio::sync::Mutex<SourceState>,
    /// Scope values seen in budgeted requests (bounded), for listing budget states.
    pub seen: dashmap::DashMap<(Scope, String), ()>,
    /// True while draining: `/readyz` fails so load balancers stop sending traffic.
    pub draining: std::sync::atomic::AtomicBool,
    /// Approvals, autonomy budgets and the runaway-agent guards.
    pub oversight: crate::oversight::Oversight,
    /// Webhook alerts (queued to the durable outbox; see [`crate::alerts`]).
    pub alerts: crate::alerts::Alerts,
    /// OpenTelemetry spans of proxied calls (`traces:`), when on.
    pub traces: crate::traces::Traces,
}

/// Most distinct scope values remembered for the admin budget listing.
const MAX_SEEN: usize = 100_000;

impl Shared {
    /// The config and policy in force now.
    pub fn current(&self) -> Arc<Current> {
        self.current.load_full()
    }

    /// Remembers that `value` of `scope` has a budget state (bounded).
    pub fn saw(&self, scope: Scope, value: &str) {
        if self.seen.len() < MAX_SEEN && !self.seen.contains_key(&(scope, value.to_string())) {
            self.seen.insert((scope, value.to_string()), ());
        }
    }

    /// The remembered scope values, by scope.
    pub fn seen_values(
        &self,
    ) -> std::collections::BTreeMap<Scope, std::collections::BTreeSet<String>> {
        let mut out: std::collections::BTreeMap<Scope, std::collections::BTreeSet<String>> =
            Default::default();
        for entry in self.seen.iter() {
            let (scope, value) = entry.key();
            out.entry(*scope).or_default().insert(value.clone());
        }
        out
    }
}

/// What [`crate::reload`] last saw at the config file and the policy source, to skip unchanged
/// documents. Held (locked) for the whole of a reload, so that reloads never interleave.
#[derive(Default)]
pub struct SourceState {
    pub(crate) last_text: Option<Bytes>,
    pub(crate) etag: Option<String>,
    pub(crate) config_text: Option<Bytes>,
}
