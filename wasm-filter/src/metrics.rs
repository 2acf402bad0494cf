//! Envoy metric names for decisions, tokens, cost and filter health.
//!
//! proxy-wasm metrics have no labels; Envoy turns name segments into Prometheus labels with the
//! bootstrap's `stats_tags` (one regex per label, see `envoy/`). So each series is a name such as
//! `tollgate_tokens_total.kind.output.model.gpt-4o.cost_center.CC-1234.project.PROJ-ABC123.agent.bot`
//! whose values never contain a dot. Label values from requests are capped per VM
//! (`max_label_values`, then `__other__`) so a flood of made-up agent ids cannot grow the stats
//! without bound. This module only builds names; the host defines and increments them.

use std::collections::BTreeSet;

use tollgate_core::money::Money;
use tollgate_core::usage::Usage;

/// The label value used once a label has seen `max_label_values` distinct values.
pub const OTHER: &str = "__other__";

/// Every label the filter emits, in the order they appear in names (for `stats_tags`).
pub const LABELS: [&str; 9] =
    ["decision", "reason", "kind", "model", "cost_center", "project", "agent", "budget", "pct"];

/// Where increments go (the host's counters, or a map in tests).
pub trait Counters {
    fn add(&mut self, name: &str, n: u64);
}

/// Builds capped, sanitized metric names.
#[derive(Debug)]
pub struct Recorder {
    max: usize,
    seen: [BTreeSet<String>; 4],
}

/// Which capped label a value belongs to.
#[derive(Clone, Copy)]
enum Capped {
    Model = 0,
    Agent = 1,
    Project = 2,
    CostCenter = 3,
}

/// What one finished request contributes to the usage metrics.
pub struct UsageLine<'a> {
    pub model: &'a str,
    pub agent: &'a str,
    pub project: &'a str,
    pub cost_center: &'a str,
    pub usage: Usage,
    pub cost: Money,
}

impl Recorder {
    pub fn new(max_label_values: usize) -> Self {
        Recorder { max: max_label_values, seen: Default::default() }
    }

    fn admit(&mut self, label: Capped, value: &str) -> String {
        let value = sanitize(value);
        let seen = &mut self.seen[label as usize];
        if seen.contains(&value) {
            return value;
        }
        if seen.len() >= self.max {
            return OTHER.to_owned();
        }
        seen.insert(value.clone());
        value
    }

    /// One decision: `tollgate_requests_total{decision,reason,model}`.
    pub fn decision(&mut self, c: &mut impl Counters, decision: &str, reason: &str, model: &str) {
        let model = self.admit(Capped::Model, model);
        let name = format!(
            "tollgate_requests_total.decision.{}.reason.{}.model.{model}",
            sanitize(decision),
            sanitize(reason)
        );
        c.add(&name, 1);
    }

    /// Tokens by kind and cost of one finished request.
    pub fn usage(&mut self, c: &mut impl Counters, line: &UsageLine<'_>) {
        let model = self.admit(Capped::Model, line.model);
        let cc = self.admit(Capped::CostCenter, line.cost_center);
        let project = self.admit(Capped::Project, line.project);
        let agent = self.admit(Capped::Agent, line.agent);
        let who = format!("model.{model}.cost_center.{cc}.project.{project}.agent.{agent}");
        let u = line.usage;
        for (kind, n) in [
            ("input", u.input),
            ("cached_input", u.cached_input),
            ("cache_write", u.cache_write),
            ("output", u.output),
            ("reasoning", u.reasoning),
        ] {
            if n > 0 {
                c.add(&format!("tollgate_tokens_total.kind.{kind}.{who}"), n);
            }
        }
        let nanos = u64::try_from(line.cost.nanos()).unwrap_or(0);
        if nanos > 0 {
            c.add(&format!("tollgate_cost_nano_usd_total.{who}"), nanos);
        }
    }

    /// A budget crossed a warning threshold (80, 95 or 100 %).
    pub fn budget_warning(&mut self, c: &mut impl Counters, budget: &str, percent: u64) {
        c.add(
            &format!("tollgate_budget_warnings_total.budget.{}.pct.{percent}", sanitize(budget)),
            1,
        );
    }
}

/// Keeps `[A-Za-z0-9_-]`, maps everything else (the dot above all) to `_`; empty becomes `-`.
pub fn sanitize(value: &str) -> String {
    if value.is_empty() {
        return "-".to_owned();
    }
    value
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Map(BTreeMap<String, u64>);
    impl Counters for Map {
        fn add(&mut self, name: &str, n: u64) {
            *self.0.entry(name.to_owned()).or_default() += n;
        }
    }

    #[test]
    fn values_are_sanitized_and_dotless() {
        assert_eq!(sanitize("gpt-4.1-mini"), "gpt-4_1-mini");
        assert_eq!(sanitize("a b/c"), "a_b_c");
        assert_eq!(sanitize(""), "-");
    }

    #[test]
    fn usage_names_carry_every_label_and_skip_zero_buckets() {
        let mut r = Recorder::new(10);
        let mut m = Map::default();
        let usage = Usage { input: 10, output: 5, ..Usage::default() };
        r.usage(
            &mut m,
            &UsageLine {
                model: "gpt-4o",
                agent: "bot",
                project: "PROJ-ABC123",
                cost_center: "CC-1234",
                usage,
                cost: Money::from_nanos(75_000),
            },
        );
        let who = "model.gpt-4o.cost_center.CC-1234.project.PROJ-ABC123.agent.bot";
        let expected: BTreeMap<String, u64> = [
            (format!("tollgate_tokens_total.kind.input.{who}"), 10),
            (format!("tollgate_tokens_total.kind.output.{who}"), 5),
            (format!("tollgate_cost_nano_usd_total.{who}"), 75_000),
        ]
        .into_iter()
        .collect();
        assert_eq!(m.0, expected);
    }

    #[test]
    fn label_values_beyond_the_cap_become_other() {
        let mut r = Recorder::new(2);
        let mut m = Map::default();
        for model in ["a", "b", "c", "a"] {
            r.decision(&mut m, "allow", "default_allow", model);
        }
        let names: Vec<_> = m.0.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(
            names,
            [
                ("tollgate_requests_total.decision.allow.reason.default_allow.model.__other__", 1),
                ("tollgate_requests_total.decision.allow.reason.default_allow.model.a", 2),
                ("tollgate_requests_total.decision.allow.reason.default_allow.model.b", 1),
            ]
        );
    }
}
