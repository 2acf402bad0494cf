//! Every Tollgate metric, defined once: name, type, label names, help text and which engine
//! emits it. The sidecar builds its Prometheus registry from these definitions
//! (`proxy/src/metrics.rs`) and the Envoy filter builds its stat names from them
//! (`wasm-filter/src/metrics.rs`), so the two cannot drift apart in names or label sets.
//!
//! proxy-wasm metrics carry no labels: the filter encodes them in the stat name
//! ([`stat_name`]: `tollgate_tokens_total;model=gpt-4.1;kind=output;...`) and Envoy's
//! `stats_config.stats_tags` ([`envoy_stats_tags`], one regex per label) turn each
//! `;label=value` segment back into a label, the value verbatim: dots included (Envoy's stat
//! names use `.` as a separator, so dot-delimited encodings lose `gpt-4.1`). The only value a
//! label cannot carry is one containing `;`; [`label_value`] replaces it with `_` in both engines,
//! and the empty value becomes `-`, so both engines print the same value for the same request.
//!
//! Pure data and string building: no I/O, no registry.

use std::borrow::Cow;

/// A Prometheus metric type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    Counter,
    Gauge,
    Histogram,
}

impl Type {
    /// As written in a `# TYPE` line.
    pub fn as_str(self) -> &'static str {
        match self {
            Type::Counter => "counter",
            Type::Gauge => "gauge",
            Type::Histogram => "histogram",
        }
    }
}

/// Which engine can emit a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emitter {
    /// The sidecar and the Envoy filter, with the same labels and values for the same request
    /// (a circuit breaker's `upstream` is what each engine keys its breakers by: the sidecar the
    /// upstream's authority, the filter the Envoy route, else the `:authority`).
    Both,
    /// Only the sidecar: process state (ledger, in-flight requests, latency histograms, pending
    /// approvals and their reasons, budget utilization read at `/admin/budgets`), none of which
    /// the filter has.
    Sidecar,
    /// Only the Envoy filter: its usage-event and oversight-report shipping, plugin
    /// configuration and fail-open counters (the sidecar writes its ledger itself and refuses a bad configuration at load).
    Filter,
}

impl Emitter {
    /// Whether the sidecar emits it.
    pub fn sidecar(self) -> bool {
        matches!(self, Emitter::Both | Emitter::Sidecar)
    }

    /// Whether the Envoy filter emits it.
    pub fn filter(self) -> bool {
        matches!(self, Emitter::Both | Emitter::Filter)
    }
}

/// One metric family.
#[derive(Debug, PartialEq, Eq)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Type,
    /// Label names, in the order values are passed.
    pub labels: &'static [&'static str],
    pub help: &'static str,
    pub emitter: Emitter,
}

const fn counter(
    name: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
    emitter: Emitter,
) -> Metric {
    Metric { name, kind: Type::Counter, labels, help, emitter }
}

const fn gauge(
    name: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
    emitter: Emitter,
) -> Metric {
    Metric { name, kind: Type::Gauge, labels, help, emitter }
}

// Emitted by both engines.

pub const REQUESTS: Metric = counter(
    "tollgate_requests_total",
    &["decision", "reason", "model", "status"],
    "Requests, each counted once when it ends: by decision effect, reason, requested model (`-` \
     when none) and upstream status class (`none`: no upstream answer)",
    Emitter::Both,
);
pub const TOKENS: Metric = counter(
    "tollgate_tokens_total",
    &["model", "kind", "agent", "project", "cost_center"],
    "Metered tokens by model, kind and attribution",
    Emitter::Both,
);
pub const COST: Metric = counter(
    "tollgate_cost_nano_usd_total",
    &["model", "agent", "project", "cost_center"],
    "Metered cost in nano-USD (1e-9 USD)",
    Emitter::Both,
);
pub const BUDGET_WARNINGS: Metric = counter(
    "tollgate_budget_warnings_total",
    &["budget", "threshold"],
    "Budget warning thresholds crossed, by budget and threshold percent (80, 95, 100)",
    Emitter::Both,
);
pub const BUDGET_OVERRUN: Metric = counter(
    "tollgate_budget_overrun_nanousd_total",
    &[],
    "Charged above the reservation, in nano-USD (the upstream reported more than the request's \
     bound; the real cost is charged in full)",
    Emitter::Both,
);
pub const USAGE_IMPLAUSIBLE: Metric = counter(
    "tollgate_usage_implausible_total",
    &[],
    "Usage reports above what the request could use, billed at the reservation",
    Emitter::Both,
);
pub const POLICY_RELOAD_FAILURES: Metric = counter(
    "tollgate_policy_reload_failures_total",
    &[],
    "Policy updates rejected (the last good snapshot kept serving)",
    Emitter::Both,
);
pub const UNLISTED_MODEL_RESPONSES: Metric = counter(
    "tollgate_unlisted_model_responses_total",
    &["price_source"],
    "Responses naming a model the rate card does not price, by what they were charged at \
     instead (requested_model, fallback, reservation)",
    Emitter::Both,
);
pub const METER_DECODE_ABORTED: Metric = counter(
    "tollgate_meter_decode_aborted_total",
    &["reason"],
    "Compressed responses metered as estimated because their body could not be decoded \
     (unsupported_encoding, corrupt, too_large, ratio)",
    Emitter::Both,
);

pub const GUARDRAIL_VIOLATIONS: Metric = counter(
    "tollgate_guardrail_violations_total",
    &["reason"],
    "Tool calls the guardrails refused, by violation (unknown_action, forbidden_pattern, \
     resource_not_allowed, arguments_too_deep, arguments_too_large, cost_limit_exceeded, \
     rate_limit_exceeded)",
    Emitter::Both,
);

// The sidecar only.

pub const DECISION_DURATION: Metric = Metric {
    name: "tollgate_decision_duration_seconds",
    kind: Type::Histogram,
    labels: &["decision"],
    help: "Time to decide a request, by effect (allow, deny, require_approval): from the policy \
           step (or the request head, for a refusal before it) to the decision",
    emitter: Emitter::Sidecar,
};
pub const UPSTREAM_DURATION: Metric = Metric {
    name: "tollgate_upstream_duration_seconds",
    kind: Type::Histogram,
    labels: &["route"],
    help: "Time from forwarding to the upstream's response head, by route",
    emitter: Emitter::Sidecar,
};
pub const BUDGET_UTILIZATION: Metric = gauge(
    "tollgate_budget_utilization_basis_points",
    &["budget", "key"],
    "Spent and reserved share of a budget in basis points (10000 = 100%)",
    Emitter::Sidecar,
);
pub const POLICY_INFO: Metric = gauge(
    "tollgate_policy_info",
    &["version"],
    "The active policy version (value 1)",
    Emitter::Sidecar,
);
pub const LEDGER_ERRORS: Metric =
    counter("tollgate_ledger_errors_total", &[], "Usage ledger write failures", Emitter::Sidecar);
pub const LEDGER_CORRUPT_RECORDS: Metric = gauge(
    "tollgate_ledger_corrupt_records",
    &[],
    "Corrupt ledger records the proxy started without (accepted as lost by \
     ledger.accept_corrupt)",
    Emitter::Sidecar,
);
pub const CONFIG_RELOAD_FAILURES: Metric = counter(
    "tollgate_config_reload_failures_total",
    &[],
    "Config file updates rejected (the running config kept serving)",
    Emitter::Sidecar,
);
pub const STORE_ERRORS: Metric = counter(
    "tollgate_store_errors_total",
    &[],
    "Fleet store calls that failed or timed out (Redis; in the Envoy filter, lease exchanges with \
     the collector); budgeted requests that needed one were refused 503",
    Emitter::Both,
);
pub const STORE_DOWN: Metric = gauge(
    "tollgate_store_down",
    &[],
    "1 for a second after a fleet store (Redis) call failed (budgeted requests that need Redis are \
     refused 503 meanwhile), else 0",
    Emitter::Sidecar,
);
pub const DATA_BYTES: Metric = gauge(
    "tollgate_data_bytes",
    &[],
    "Bytes the ledger, the audit log and their checkpoints take in the data directory",
    Emitter::Sidecar,
);
pub const DATA_FREE_BYTES: Metric = gauge(
    "tollgate_data_free_bytes",
    &[],
    "Bytes free for the data directory on its volume",
    Emitter::Sidecar,
);
pub const DATA_SECONDS_UNTIL_FULL: Metric = gauge(
    "tollgate_data_seconds_until_full",
    &[],
    "Projected time until the data volume is full, at the data directory's growth over the last \
     hour (+Inf while it is not growing)",
    Emitter::Sidecar,
);
pub const IN_FLIGHT: Metric =
    gauge("tollgate_in_flight_requests", &[], "Requests being served", Emitter::Sidecar);
pub const SHED: Metric = counter(
    "tollgate_shed_total",
    &["reason"],
    "Work refused at once because a limit was reached: `connections` (limits.max_connections) \
     or `requests_in_flight` (limits.max_requests_in_flight)",
    Emitter::Sidecar,
);
pub const ACTIONS: Metric = counter(
    "tollgate_actions_total",
    &["category", "verdict"],
    "Actions at the oversight step by category and verdict (auto, approval_required, denied, \
     human_approved)",
    Emitter::Both,
);
pub const AUTONOMY: Metric = gauge(
    "tollgate_autonomy_basis_points",
    &["category"],
    "Auto-approved / total actions in basis points (10000 = all ran on their own), by category \
     and `all`",
    Emitter::Both,
);
pub const APPROVALS_REQUESTED: Metric = counter(
    "tollgate_approvals_requested_total",
    &["reason"],
    "Approval requests by reason",
    Emitter::Sidecar,
);
pub const APPROVALS_PENDING: Metric =
    gauge("tollgate_approvals_pending", &[], "Approvals waiting for a human", Emitter::Sidecar);
pub const CIRCUIT_BREAKER_STATE: Metric = gauge(
    "tollgate_circuit_breaker_state",
    &["upstream"],
    "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open",
    Emitter::Both,
);

pub const ALERTS_SENT: Metric = counter(
    "tollgate_alerts_sent_total",
    &["event"],
    "Alert deliveries a webhook receiver acknowledged with a 2xx, by event type \
     (budget_threshold, approval_pending, agent_disabled, circuit_open)",
    Emitter::Sidecar,
);
pub const ALERTS_FAILED: Metric = counter(
    "tollgate_alerts_failed_total",
    &["event"],
    "Alert delivery attempts that failed (no answer, or not a 2xx), by event type; each is \
     retried with backoff until it is delivered or dropped",
    Emitter::Sidecar,
);
pub const ALERTS_DROPPED: Metric = counter(
    "tollgate_alerts_dropped_total",
    &["event"],
    "Alert deliveries given up (alerts.max_attempts or alerts.max_age reached, the receiver no \
     longer configured, or the outbox queue full), by event type",
    Emitter::Sidecar,
);
pub const ALERTS_PENDING: Metric = gauge(
    "tollgate_alerts_pending",
    &[],
    "Alert deliveries in the outbox waiting for a receiver's 2xx",
    Emitter::Sidecar,
);

// The Envoy filter only.

pub const USAGE_EVENTS_SENT: Metric = counter(
    "tollgate_usage_events_sent_total",
    &[],
    "Usage events the collector accepted",
    Emitter::Filter,
);
pub const USAGE_EVENTS_FAILED: Metric = counter(
    "tollgate_usage_events_failed_total",
    &[],
    "Usage events sent without an answer or answered 5xx (sent again)",
    Emitter::Filter,
);
pub const USAGE_EVENTS_REJECTED: Metric = counter(
    "tollgate_usage_events_rejected_total",
    &[],
    "Usage events the collector refused (each refusal of each event; the event stays in the \
     outbox and is offered again)",
    Emitter::Filter,
);
pub const USAGE_EVENTS_HELD: Metric = gauge(
    "tollgate_usage_events_held",
    &[],
    "Usage events the collector refused that wait in the outbox to be offered again (never \
     dropped for being refused)",
    Emitter::Filter,
);
pub const USAGE_EVENTS_DROPPED: Metric = counter(
    "tollgate_usage_events_dropped_total",
    &[],
    "Usage events dropped because the queue was full",
    Emitter::Filter,
);
pub const OVERSIGHT_REPORTS_DROPPED: Metric = counter(
    "tollgate_oversight_reports_dropped_total",
    &[],
    "Breaker openings and agent disablings not reported to the collector: the queue was full, or \
     the collector refused them",
    Emitter::Filter,
);
pub const CONFIG_ERRORS: Metric = counter(
    "tollgate_config_errors_total",
    &[],
    "Plugin configurations rejected (requests then follow filter.fail)",
    Emitter::Filter,
);
pub const POLICY_RELOADS: Metric = counter(
    "tollgate_policy_reloads_total",
    &[],
    "Policies fetched from filter.policy_url and applied",
    Emitter::Filter,
);
pub const FAIL_OPEN: Metric = counter(
    "tollgate_fail_open_total",
    &[],
    "Requests passed through undecided because the filter could not decide (filter.fail: open)",
    Emitter::Filter,
);

/// Every metric, each once.
pub const ALL: [&Metric; 42] = [
    &REQUESTS,
    &TOKENS,
    &COST,
    &BUDGET_WARNINGS,
    &BUDGET_OVERRUN,
    &USAGE_IMPLAUSIBLE,
    &POLICY_RELOAD_FAILURES,
    &UNLISTED_MODEL_RESPONSES,
    &METER_DECODE_ABORTED,
    &GUARDRAIL_VIOLATIONS,
    &DECISION_DURATION,
    &UPSTREAM_DURATION,
    &BUDGET_UTILIZATION,
    &POLICY_INFO,
    &LEDGER_ERRORS,
    &LEDGER_CORRUPT_RECORDS,
    &DATA_BYTES,
    &DATA_FREE_BYTES,
    &DATA_SECONDS_UNTIL_FULL,
    &IN_FLIGHT,
    &SHED,
    &CONFIG_RELOAD_FAILURES,
    &STORE_ERRORS,
    &STORE_DOWN,
    &ACTIONS,
    &AUTONOMY,
    &APPROVALS_REQUESTED,
    &APPROVALS_PENDING,
    &CIRCUIT_BREAKER_STATE,
    &ALERTS_SENT,
    &ALERTS_FAILED,
    &ALERTS_DROPPED,
    &ALERTS_PENDING,
    &USAGE_EVENTS_SENT,
    &USAGE_EVENTS_FAILED,
    &USAGE_EVENTS_REJECTED,
    &USAGE_EVENTS_HELD,
    &USAGE_EVENTS_DROPPED,
    &OVERSIGHT_REPORTS_DROPPED,
    &CONFIG_ERRORS,
    &POLICY_RELOADS,
    &FAIL_OPEN,
];

/// The metric named `name`.
pub fn by_name(name: &str) -> Option<&'static Metric> {
    ALL.iter().copied().find(|m| m.name == name)
}

/// The `kind` label values of [`TOKENS`], in the order both engines count them.
pub const TOKEN_KINDS: [&str; 5] = ["input", "cached_input", "cache_write", "output", "reasoning"];

/// The label value of an absent or empty value (no model, a listing request).
pub const NONE: &str = "-";

/// A label value as both engines print it: `-` for the empty value, `;` (the filter's segment
/// separator) replaced with `_`; everything else verbatim.
pub fn label_value(value: &str) -> Cow<'_, str> {
    if value.is_empty() {
        Cow::Borrowed(NONE)
    } else if value.contains(';') {
        Cow::Owned(value.replace(';', "_"))
    } else {
        Cow::Borrowed(value)
    }
}

/// The Envoy stat name of one series of `metric`: its name, then `;label=value` per label in
/// the metric's order (`values` in the same order, passed through [`label_value`]). Envoy's
/// [`envoy_stats_tags`] turn the segments back into labels.
pub fn stat_name(metric: &Metric, values: &[&str]) -> String {
    debug_assert_eq!(metric.labels.len(), values.len(), "{}", metric.name);
    let mut name = String::with_capacity(metric.name.len() + 16 * values.len());
    name.push_str(metric.name);
    for (label, value) in metric.labels.iter().zip(values) {
        name.push(';');
        name.push_str(label);
        name.push('=');
        name.push_str(&label_value(value));
    }
    name
}

/// The prefix Envoy gives the metrics a proxy-wasm module defines.
pub const ENVOY_NAMESPACE: &str = "wasmcustom";

/// Every label name of the metrics the filter emits, each once, in first-use order.
pub fn filter_labels() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for m in ALL.iter().filter(|m| m.emitter.filter()) {
        for label in m.labels {
            if !out.contains(label) {
                out.push(label);
            }
        }
    }
    out
}

/// Envoy's `stats_config.stats_tags` for the filter's metrics: (tag name, regex) per label.
/// Envoy searches each stat name with each regex, takes the second capture group as the label
/// value and removes the first from the name, so that `wasmcustom.tollgate_requests_total;...`
/// leaves `tollgate_requests_total` (Envoy's Prometheus output drops the `wasmcustom.` prefix).
/// A value has no `;` ([`label_value`]), so `;label=` only ever matches at a segment's start.
pub fn envoy_stats_tags() -> Vec<(&'static str, String)> {
    filter_labels()
        .into_iter()
        .map(|label| (label, format!(r"^{ENVOY_NAMESPACE}\.tollgate_.*?(;{label}=([^;]*))")))
        .collect()
}

#[cfg(test)]
mod tests;
