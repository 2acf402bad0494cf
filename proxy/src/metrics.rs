//! Prometheus metrics, served as text on the admin port's `/metrics`. Names, types, labels and
//! help texts come from [`tollgate_core::metrics`], which the Envoy filter uses too.
//!
//! Label values that come from requests (agent, project, cost center, model) are capped: the
//! first `max_label_values` distinct values of each label are kept and the rest are reported as
//! `__other__`, so a flood of made-up agent ids cannot explode the series count. Money is
//! exported in integer nano-USD (`*_nano_usd_total`), like the ledger.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Mutex;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tollgate_core::metrics::{self as schema, Metric};

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

    /// `value` as a label value ([`schema::label_value`]) if it is already known or there is
    /// room for it, else [`OTHER`].
    pub fn admit<'a>(&self, value: &'a str) -> Cow<'a, str> {
        let value = schema::label_value(value);
        let Ok(mut seen) = self.seen.lock() else { return Cow::Borrowed(OTHER) };
        if seen.contains(value.as_ref()) {
            return value;
        }
        if seen.len() < self.max {
            seen.insert(value.to_string());
            return value;
        }
        Cow::Borrowed(OTHER)
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
    pub config_reload_failures: IntCounter,
    /// Fleet mode only (`store.redis`).
    pub store_errors: IntCounter,
    pub store_down: IntGauge,
    pub ledger_errors: IntCounter,
    pub ledger_corrupt_records: IntGauge,
    pub data_bytes: IntGauge,
    pub data_free_bytes: IntGauge,
    pub data_seconds_until_full: prometheus::Gauge,
    pub in_flight: IntGauge,
    /// `tollgate_shed_total` by reason (`connections`, `requests_in_flight`).
    pub shed: IntCounterVec,
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
    /// Tool calls the guardrails refused, by violation.
    pub guardrail_violations: IntCounterVec,
}

impl Metrics {
    pub fn new(max_label_values: usize) -> Self {
        let registry = Registry::new();
        let register = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).expect("metric names are unique");
        };
        let counter = |m: &Metric| {
            let c = IntCounter::new(m.name, m.help).expect("static metric definition");
            register(Box::new(c.clone()));
            c
        };
        let counters = |m: &Metric| {
            let c = IntCounterVec::new(Opts::new(m.name, m.help), m.labels)
                .expect("static metric definition");
            register(Box::new(c.clone()));
            c
        };
        let gauge = |m: &Metric| {
            let g = IntGauge::new(m.name, m.help).expect("static metric definition");
            register(Box::new(g.clone()));
            g
        };
        let gauges = |m: &Metric| {
            let g = IntGaugeVec::new(Opts::new(m.name, m.help), m.labels)
                .expect("static metric definition");
            register(Box::new(g.clone()));
            g
        };
        let histograms = |m: &Metric, buckets: Vec<f64>| {
            let h =
                HistogramVec::new(HistogramOpts::new(m.name, m.help).buckets(buckets), m.labels)
                    .expect("static metric definition");
            register(Box::new(h.clone()));
            h
        };
        let meter_decode_aborted = counters(&schema::METER_DECODE_ABORTED);
        for reason in tollgate_core::metering::DecodeAbort::ALL {
            meter_decode_aborted.with_label_values(&[reason.as_str()]);
        }
        let guardrail_violations = counters(&schema::GUARDRAIL_VIOLATIONS);
        for reason in tollgate_core::guardrails::Violation::CODES {
            guardrail_violations.with_label_values(&[reason]);
        }
        let shed = counters(&schema::SHED);
        for reason in ["connections", "requests_in_flight"] {
            shed.with_label_values(&[reason]);
        }
        Metrics {
            shed,
            requests: counters(&schema::REQUESTS),
            decision_seconds: histograms(
                &schema::DECISION_DURATION,
                vec![1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2],
            ),
            upstream_seconds: histograms(
                &schema::UPSTREAM_DURATION,
                vec![0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0],
            ),
            tokens: counters(&schema::TOKENS),
            cost_nano_usd: counters(&schema::COST),
            budget_utilization_bp: gauges(&schema::BUDGET_UTILIZATION),
            budget_warnings: counters(&schema::BUDGET_WARNINGS),
            budget_overrun_nano_usd: counter(&schema::BUDGET_OVERRUN),
            usage_implausible: counter(&schema::USAGE_IMPLAUSIBLE),
            policy_version: gauges(&schema::POLICY_INFO),
            policy_reload_failures: counter(&schema::POLICY_RELOAD_FAILURES),
            config_reload_failures: counter(&schema::CONFIG_RELOAD_FAILURES),
            store_errors: counter(&schema::STORE_ERRORS),
            store_down: gauge(&schema::STORE_DOWN),
            ledger_errors: counter(&schema::LEDGER_ERRORS),
            ledger_corrupt_records: gauge(&schema::LEDGER_CORRUPT_RECORDS),
            data_bytes: gauge(&schema::DATA_BYTES),
            data_free_bytes: gauge(&schema::DATA_FREE_BYTES),
            data_seconds_until_full: {
                let m = &schema::DATA_SECONDS_UNTIL_FULL;
                let g = prometheus::Gauge::new(m.name, m.help).expect("static metric definition");
                register(Box::new(g.clone()));
                g.set(f64::INFINITY);
                g
            },
            in_flight: gauge(&schema::IN_FLIGHT),
            actions: counters(&schema::ACTIONS),
            autonomy_bp: gauges(&schema::AUTONOMY),
            approval_reasons: counters(&schema::APPROVALS_REQUESTED),
            approvals_pending: gauge(&schema::APPROVALS_PENDING),
            breaker_state: gauges(&schema::CIRCUIT_BREAKER_STATE),
            substitute_prices: counters(&schema::UNLISTED_MODEL_RESPONSES),
            agents: LabelCap::new(max_label_values),
            projects: LabelCap::new(max_label_values),
            cost_centers: LabelCap::new(max_label_values),
            models: LabelCap::new(max_label_values),
            meter_decode_aborted,
            guardrail_violations,
            registry,
        }
    }

    /// Counts one request in `tollgate_requests_total`, once, when it ends (`model` is the
    /// requested one, capped like every request-borne label; `status` from
    /// [`tollgate_core::refusal::status_class`]).
    pub fn request(&self, decision: &str, reason: &str, model: Option<&str>, status: &str) {
        let model = self.models.admit(model.unwrap_or(schema::NONE));
        let reason = schema::label_value(reason);
        self.requests.with_label_values(&[decision, &*reason, &*model, status]).inc();
    }

    /// A budget crossed a warning threshold (`threshold_percent`: 80, 95 or 100).
    pub fn budget_warning(&self, budget: &str, threshold_percent: u64) {
        let budget = schema::label_value(budget);
        let threshold = threshold_percent.to_string();
        self.budget_warnings.with_label_values(&[&*budget, &threshold]).inc();
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

    /// The data directory's size, the free space and the projection.
    pub fn observe_storage(&self, s: &crate::ledger::storage::Reading) {
        self.data_bytes.set(i64::try_from(s.data_bytes).unwrap_or(i64::MAX));
        self.data_free_bytes.set(i64::try_from(s.free_bytes).unwrap_or(i64::MAX));
        self.data_seconds_until_full.set(s.hours_until_full * 3600.0);
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
