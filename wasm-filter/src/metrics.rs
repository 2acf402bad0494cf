//! Envoy metric names for decisions, tokens, cost and filter health, and the per-VM cache of
//! their ids.
//!
//! proxy-wasm metrics have no labels; Envoy turns name segments into Prometheus labels with the
//! bootstrap's `stats_tags` (one regex per label, see `envoy/`). So each series is a name such as
//! `tollgate_tokens_total.kind.output.model.gpt-4o.cost_center.CC-1234.project.PROJ-ABC123.agent.bot`
//! whose values never contain a dot. Label values from requests are capped per VM
//! (`max_label_values`, then `__other__`) so a flood of made-up agent ids cannot grow the stats
//! without bound.
//!
//! A name is built and defined once per VM (metric ids are per VM) and its id cached under the raw
//! label values, so the common request costs one map lookup per metric group and no formatting.
//! The caches are bounded: past [`CACHE_ENTRIES`] they are emptied and refilled. This module
//! never talks to the host; [`Counters`] does.

use std::collections::{BTreeSet, HashMap};

use tollgate_core::money::Money;
use tollgate_core::usage::Usage;

/// The label value used once a label has seen `max_label_values` distinct values.
pub const OTHER: &str = "__other__";

/// Every label the filter emits, in the order they appear in names (for `stats_tags`).
pub const LABELS: [&str; 11] = [
    "decision",
    "reason",
    "kind",
    "model",
    "status",
    "cost_center",
    "project",
    "agent",
    "budget",
    "price_source",
    "pct",
];

/// Cached label combinations per metric group before the cache is emptied.
pub const CACHE_ENTRIES: usize = 4096;

/// Where increments go (the host's counters, or a map in tests).
pub trait Counters {
    /// The id of counter `name`, defining it if needed; `None` if the host refuses.
    fn define(&mut self, name: &str) -> Option<u32>;
    /// Adds `n` to a counter returned by [`Counters::define`].
    fn add(&mut self, id: u32, n: u64);
}

/// Token kinds in name order, then the cost series.
const USAGE_SERIES: [&str; 6] =
    ["input", "cached_input", "cache_write", "output", "reasoning", "cost"];

/// The series of one (model, cost center, project, agent): the label part of their names and
/// the ids defined so far (a series is defined when it first gets a non-zero value).
#[derive(Debug)]
struct UsageIds {
    who: Box<str>,
    ids: [Option<u32>; 6],
}

/// Builds capped, sanitized metric names and caches their ids.
#[derive(Debug)]
pub struct Recorder {
    max: usize,
    seen: [BTreeSet<String>; 4],
    /// `decision \0 reason \0 model \0 status` → id.
    decisions: HashMap<Box<str>, u32>,
    /// `model \0 cost_center \0 project \0 agent` → ids.
    usage: HashMap<Box<str>, UsageIds>,
    /// Reused for cache keys.
    key: String,
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
        Recorder {
            max: max_label_values,
            seen: Default::default(),
            decisions: HashMap::new(),
            usage: HashMap::new(),
            key: String::new(),
        }
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

    fn set_key(&mut self, parts: &[&str]) {
        self.key.clear();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                self.key.push('\0');
            }
            self.key.push_str(p);
        }
    }

    /// One request, counted once when it ends:
    /// `tollgate_requests_total{decision,reason,model,status}`, `status` the upstream's class
    /// (`2xx`, `4xx`, ...) or `none` ([`tollgate_core::refusal::status_class`]).
    pub fn decision(
        &mut self,
        c: &mut impl Counters,
        decision: &str,
        reason: &str,
        model: &str,
        status: &'static str,
    ) {
        self.set_key(&[decision, reason, model, status]);
        if let Some(id) = self.decisions.get(self.key.as_str()) {
            c.add(*id, 1);
            return;
        }
        let model = self.admit(Capped::Model, model);
        let name = format!(
            "tollgate_requests_total.decision.{}.reason.{}.model.{model}.status.{status}",
            sanitize(decision),
            sanitize(reason)
        );
        let Some(id) = c.define(&name) else { return };
        if self.decisions.len() >= CACHE_ENTRIES {
            self.decisions.clear();
        }
        self.decisions.insert(self.key.as_str().into(), id);
        c.add(id, 1);
    }

    /// Tokens by kind and cost of one finished request.
    pub fn usage(&mut self, c: &mut impl Counters, line: &UsageLine<'_>) {
        self.set_key(&[line.model, line.cost_center, line.project, line.agent]);
        if !self.usage.contains_key(self.key.as_str()) {
            let model = self.admit(Capped::Model, line.model);
            let cc = self.admit(Capped::CostCenter, line.cost_center);
            let project = self.admit(Capped::Project, line.project);
            let agent = self.admit(Capped::Agent, line.agent);
            let who = format!("model.{model}.cost_center.{cc}.project.{project}.agent.{agent}");
            if self.usage.len() >= CACHE_ENTRIES {
                self.usage.clear();
            }
            self.usage
                .insert(self.key.as_str().into(), UsageIds { who: who.into(), ids: [None; 6] });
        }
        let Some(entry) = self.usage.get_mut(self.key.as_str()) else { return };
        let u = line.usage;
        let nanos = u64::try_from(line.cost.nanos()).unwrap_or(0);
        let values = [u.input, u.cached_input, u.cache_write, u.output, u.reasoning, nanos];
        for (slot, n) in values.into_iter().enumerate() {
            if n == 0 {
                continue;
            }
            let id = match entry.ids[slot] {
                Some(id) => id,
                None => {
                    let name = match USAGE_SERIES[slot] {
                        "cost" => format!("tollgate_cost_nano_usd_total.{}", entry.who),
                        kind => format!("tollgate_tokens_total.kind.{kind}.{}", entry.who),
                    };
                    let Some(id) = c.define(&name) else { continue };
                    entry.ids[slot] = Some(id);
                    id
                }
            };
            c.add(id, n);
        }
    }

    /// A budget crossed a warning threshold (80, 95 or 100 %). Rare: defined on each use.
    pub fn budget_warning(&mut self, c: &mut impl Counters, budget: &str, percent: u64) {
        let name =
            format!("tollgate_budget_warnings_total.budget.{}.pct.{percent}", sanitize(budget));
        if let Some(id) = c.define(&name) {
            c.add(id, 1);
        }
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

    /// Counters by name; `names[id]` is the name defined under `id`.
    #[derive(Default)]
    struct Map(BTreeMap<String, u64>, Vec<String>);
    impl Counters for Map {
        fn define(&mut self, name: &str) -> Option<u32> {
            self.1.push(name.to_owned());
            Some(self.1.len() as u32 - 1)
        }
        fn add(&mut self, id: u32, n: u64) {
            *self.0.entry(self.1[id as usize].clone()).or_default() += n;
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
            r.decision(&mut m, "allow", "default_allow", model, "2xx");
        }
        let names: Vec<_> = m.0.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(
            names,
            [
                ("tollgate_requests_total.decision.allow.reason.default_allow.model.__other__.status.2xx", 1),
                ("tollgate_requests_total.decision.allow.reason.default_allow.model.a.status.2xx", 2),
                ("tollgate_requests_total.decision.allow.reason.default_allow.model.b.status.2xx", 1),
            ]
        );
    }

    #[test]
    fn each_series_is_defined_once_and_its_id_reused() {
        let mut r = Recorder::new(10);
        let mut m = Map::default();
        let line = |agent| UsageLine {
            model: "gpt-4o",
            agent,
            project: "P",
            cost_center: "C",
            usage: Usage { input: 3, output: 2, ..Usage::default() },
            cost: Money::from_nanos(7),
        };
        for agent in ["a", "b", "a", "a"] {
            r.decision(&mut m, "allow", "default_allow", "gpt-4o", "2xx");
            r.usage(&mut m, &line(agent));
        }
        assert_eq!(m.1.len(), 1 + 3 * 2, "one decision series, three usage series per agent");
        let who = "model.gpt-4o.cost_center.C.project.P.agent.a";
        assert_eq!(m.0[&format!("tollgate_tokens_total.kind.input.{who}")], 9);
        assert_eq!(m.0[&format!("tollgate_cost_nano_usd_total.{who}")], 21);
        assert_eq!(
            m.0["tollgate_requests_total.decision.allow.reason.default_allow.model.gpt-4o.status.2xx"],
            4
        );
    }

    #[test]
    fn the_id_cache_is_bounded_and_refills_with_the_same_names() {
        let mut r = Recorder::new(1);
        let mut m = Map::default();
        for i in 0..CACHE_ENTRIES + 10 {
            r.decision(&mut m, "allow", "x", &format!("model-{i}"), "none");
        }
        assert!(r.decisions.len() <= CACHE_ENTRIES);
        let names: BTreeSet<&String> = m.0.keys().collect();
        assert_eq!(names.len(), 2, "only model-0 and __other__ exist: {names:?}");
        assert_eq!(m.0.values().sum::<u64>(), CACHE_ENTRIES as u64 + 10);
    }
}
