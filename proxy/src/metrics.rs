//! Prometheus metrics, served as text on the admin port's `/metrics`.
//!
//! Label values that come from requests (agent, project, cost center, model) are capped: the
//! first `max_label_values` distinct values of each label are kept and the rest are reported as
//! `__other__`, so a flood of made-up agent ids cannot explode the series count. Money is
//! exported in integer nano-USD (`*_nano_usd_total`), like the ledger.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The label value used once a label has reached its cap.
pub const OTHER: &str = "__other__";

/// Bounds the distinct values of one label.
#[derive(Debug)]
pub struct LabelCap {
    max: usize,
    seen: Mutex<HashSet<String>>,
}

impl LabelCap {
    pub fn new(max: usize) -> Self {
        LabelCap { max, seen: Mutex::new(HashSet::new()) }
    }

    /// `value` if it is already known or there is room for it, else [`OTHER`].
    pub fn admit<'a>(&self, value: &'a str) -> &'a str {
        let Ok(mut seen) = self.seen.lock() else { return OTHER };
        if seen.contains(value) {
            return value;
        }
        if seen.len() < self.max {
            seen.insert(value.to_string());
            return value;
        }
        OTHER
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub decision_seconds: HistogramVec,
    pub upstream_seconds: HistogramVec,
    pub tokens: IntCounterVec,
    pub cost_nano_usd: IntCounterVec,
    pub budget_utilization_bp: IntGaugeVec,
    pub budget_warnings: IntCounterVec,
    pub budget_overrun_nano_usd: IntCounter,
    pub usage_implausible: IntCounter,
    pub policy_version: IntGaugeVec,
    pub policy_reload_failures: IntCounter,
    pub ledger_errors: IntCounter,
    pub ledger_corrupt_records: IntGauge,
    pub in_flight: IntGauge,
    pub actions: IntCounterVec,
    pub autonomy_bp: IntGaugeVec,
    pub approval_reasons: IntCounterVec,
    pub approvals_pending: IntGauge,
    pub breaker_state: IntGaugeVec,
    pub substitute_prices: IntCounterVec,
    pub agents: LabelCap,
    pub projects: LabelCap,
    pub cost_centers: LabelCap,
    pub models: LabelCap,
    /// Compressed responses the meter could not decode to their end, by reason.
    pub meter_decode_aborted: IntCounterVec,
}

impl Metrics {
    pub fn new(max_label_values: usize) -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tollgate_requests_total",
                "Requests, each counted once when it ends: by decision effect, reason, route \
                 (`-` when none matched) and upstream status class (`none`: no upstream answer)",
            ),
            &["decision", "reason", "route", "status"],
        )
        .expect("static metric definition");
        let decision_seconds = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_decision_duration_seconds",
                "Time to decide a request, by effect (allow, deny, require_approval): from the \
                 policy step (or the request head, for a refusal before it) to the decision",
            )
            .buckets(vec![1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2]),
            &["decision"],
        )
        .expect("static metric definition");
        let upstream_seconds = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_upstream_duration_seconds",
                "Time from forwarding to the upstream's response head",
            )
            .buckets(vec![0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0]),
            &["route"],
        )
        .expect("static metric definition");
        let tokens = IntCounterVec::new(
            Opts::new("tollgate_tokens_total", "Metered tokens by model, kind and attribution"),
            &["model", "kind", "agent", "project", "cost_center"],
        )
        .expect("static metric definition");
        let cost_nano_usd = IntCounterVec::new(
            Opts::new("tollgate_cost_nano_usd_total", "Metered cost in nano-USD (1e-9 USD)"),
            &["model", "agent", "project", "cost_center"],
        )
        .expect("static metric definition");
        let budget_utilization_bp = IntGaugeVec::new(
            Opts::new(
                "tollgate_budget_utilization_basis_points",
                "Spent and reserved share of a budget in basis points (10000 = 100%)",
            ),
            &["budget", "key"],
        )
        .expect("static metric definition");
        let budget_warnings = IntCounterVec::new(
            Opts::new("tollgate_budget_warnings_total", "Budget thresholds crossed (80, 95, 100)"),
            &["budget", "threshold"],
        )
        .expect("static metric definition");
        let budget_overrun_nano_usd = IntCounter::new(
            "tollgate_budget_overrun_nanousd_total",
            "Charged above the reservation, in nano-USD (the upstream reported more than the \
             request's bound; the real cost is charged in full)",
        )
        .expect("static metric definition");
        let usage_implausible = IntCounter::new(
            "tollgate_usage_implausible_total",
            "Usage reports above what the request could use, billed at the reservation",
        )
        .expect("static metric definition");
        let policy_version = IntGaugeVec::new(
            Opts::new("tollgate_policy_info", "The active policy version (value 1)"),
            &["version"],
        )
        .expect("static metric definition");
        let policy_reload_failures = IntCounter::new(
            "tollgate_policy_reload_failures_total",
            "Policy updates rejected (the last good snapshot kept serving)",
        )
        .expect("static metric definition");
        let ledger_errors =
            IntCounter::new("tollgate_ledger_errors_total", "Usage ledger write failures")
                .expect("static metric definition");
        let ledger_corrupt_records = IntGauge::new(
            "tollgate_ledger_corrupt_records",
            "Corrupt ledger records the proxy started without (accepted as lost by \
             ledger.accept_corrupt)",
        )
        .expect("static metric definition");
        let in_flight = IntGauge::new("tollgate_in_flight_requests", "Requests being served")
            .expect("static metric definition");
        let actions = IntCounterVec::new(
            Opts::new(
                "tollgate_actions_total",
                "Actions at the oversight step by category and verdict (auto, approval_required, \
                 denied, human_approved)",
            ),
            &["category", "verdict"],
        )
        .expect("static metric definition");
        let autonomy_bp = IntGaugeVec::new(
            Opts::new(
                "tollgate_autonomy_basis_points",
                "Auto-approved / total actions in basis points (10000 = all ran on their own), \
                 by category and `all`",
            ),
            &["category"],
        )
        .expect("static metric definition");
        let approval_reasons = IntCounterVec::new(
            Opts::new("tollgate_approvals_requested_total", "Approval requests by reason"),
            &["reason"],
        )
        .expect("static metric definition");
        let approvals_pending =
            IntGauge::new("tollgate_approvals_pending", "Approvals waiting for a human")
                .expect("static metric definition");
        let breaker_state = IntGaugeVec::new(
            Opts::new(
                "tollgate_circuit_breaker_state",
                "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open",
            ),
            &["upstream"],
        )
        .expect("static metric definition");
        let substitute_prices = IntCounterVec::new(
            Opts::new(
                "tollgate_unlisted_model_responses_total",
                "Responses naming a model the rate card does not price, by what they were charged \
                 at instead (requested_model, fallback, reservation)",
            ),
            &["price_source"],
        )
        .expect("static metric definition");
        for c in [
            Box::new(substitute_prices.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(actions.clone()),
            Box::new(autonomy_bp.clone()),
            Box::new(approval_reasons.clone()),
            Box::new(approvals_pending.clone()),
            Box::new(breaker_state.clone()),
            Box::new(requests.clone()),
            Box::new(decision_seconds.clone()),
            Box::new(upstream_seconds.clone()),
            Box::new(tokens.clone()),
            Box::new(cost_nano_usd.clone()),
            Box::new(budget_utilization_bp.clone()),
            Box::new(budget_warnings.clone()),
            Box::new(budget_overrun_nano_usd.clone()),
            Box::new(usage_implausible.clone()),
            Box::new(policy_version.clone()),
            Box::new(policy_reload_failures.clone()),
            Box::new(ledger_errors.clone()),
            Box::new(ledger_corrupt_records.clone()),
            Box::new(in_flight.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        let meter_decode_aborted = IntCounterVec::new(
            Opts::new(
                "tollgate_meter_decode_aborted_total",
                "Compressed responses metered as estimated because their body could not be \
                 decoded (unsupported_encoding, corrupt, too_large, ratio)",
            ),
            &["reason"],
        )
        .expect("static metric definition");
        for reason in tollgate_core::metering::DecodeAbort::ALL {
            meter_decode_aborted.with_label_values(&[reason.as_str()]);
        }
        registry.register(Box::new(meter_decode_aborted.clone())).expect("metric names are unique");
        Metrics {
            registry,
            requests,
            decision_seconds,
            upstream_seconds,
            tokens,
            cost_nano_usd,
            budget_utilization_bp,
            budget_warnings,
            budget_overrun_nano_usd,
            usage_implausible,
            policy_version,
            policy_reload_failures,
            ledger_errors,
            ledger_corrupt_records,
            in_flight,
            actions,
            autonomy_bp,
            approval_reasons,
            approvals_pending,
            breaker_state,
            substitute_prices,
            agents: LabelCap::new(max_label_values),
            projects: LabelCap::new(max_label_values),
            cost_centers: LabelCap::new(max_label_values),
            models: LabelCap::new(max_label_values),
            meter_decode_aborted,
        }
    }

    /// Adds `n` to a counter, stopping at `u64::MAX` instead of wrapping (prometheus' counters
    /// wrap), so that an absurd count can never make a total small again.
    pub fn add_saturating(c: &IntCounter, n: u64) {
        c.inc_by(n.min(u64::MAX - c.get()));
    }

    /// Marks `version` as the active policy (and only it).
    pub fn set_policy_version(&self, version: &str) {
        self.policy_version.reset();
        self.policy_version.with_label_values(&[version]).set(1);
    }

    /// Copies the oversight step's counts into the registry (at scrape time: the request path
    /// only bumps atomics).
    pub fn observe_oversight(&self, o: &crate::oversight::Oversight) {
        fn catch_up(c: &IntCounter, value: u64) {
            let have = c.get();
            if value > have {
                c.inc_by(value - have);
            }
        }
        let (overall, by) = o.counts();
        for (category, counts) in &by {
            for (verdict, n) in [
                ("auto", counts.auto),
                ("approval_required", counts.approval_required),
                ("denied", counts.denied),
                ("human_approved", counts.human_approved),
            ] {
                if n > 0 {
                    catch_up(&self.actions.with_label_values(&[category, verdict]), n);
                }
            }
            if let Some(bp) = counts.autonomy_bp() {
                self.autonomy_bp.with_label_values(&[category]).set(bp as i64);
            }
        }
        if let Some(bp) = overall.autonomy_bp() {
            self.autonomy_bp.with_label_values(&["all"]).set(bp as i64);
        }
        for (reason, n) in o.top_reasons(usize::MAX) {
            catch_up(&self.approval_reasons.with_label_values(&[&reason]), n);
        }
        self.approvals_pending.set(o.approvals.pending() as i64);
        for (upstream, state, _) in o.breakers() {
            let v = match state {
                "closed" => 0,
                "half_open" => 1,
                _ => 2,
            };
            self.breaker_state.with_label_values(&[&upstream]).set(v);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }
}

/// A response priced by something other than its own model's listing: counted, and logged as a
/// warning, or as an error when only the reservation could price it.
pub fn substitute_price(
    metrics: &Metrics,
    request_id: &str,
    answered: Option<&str>,
    requested: Option<&str>,
    priced: tollgate_core::pricing::ResponsePrice,
) {
    use tollgate_core::pricing::PriceSource;
    let source = priced.source.as_str();
    metrics.substitute_prices.with_label_values(&[source]).inc();
    let (answered, requested) = (answered.unwrap_or("-"), requested.unwrap_or("-"));
    let cost = priced.cost.total;
    if priced.source == PriceSource::Reservation {
        tracing::error!(
            request_id, answered, requested, price_source = source, cost = %cost,
            "no price on the rate card for the answered or the requested model and no fallback: \
             charged the reserved worst case"
        );
    } else {
        tracing::warn!(
            request_id, answered, requested, price_source = source, cost = %cost,
            "the response names a model the rate card does not price"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_cap_folds_new_values_into_other() {
        let cap = LabelCap::new(2);
        assert_eq!(cap.admit("a"), "a");
        assert_eq!(cap.admit("b"), "b");
        assert_eq!(cap.admit("c"), OTHER);
        assert_eq!(cap.admit("a"), "a");
    }
}
