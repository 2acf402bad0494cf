//! Envoy stats for decisions, tokens, cost and filter health, and the per-VM cache of their ids.
//!
//! Names, label sets and help texts are [`tollgate_core::metrics`]'s, the sidecar's too.
//! proxy-wasm metrics have no labels: each series is a stat name such as
//! `tollgate_tokens_total;model=gpt-4.1;kind=output;agent=bot;project=P;cost_center=C`
//! ([`schema::stat_name`]) and the bootstrap's `stats_tags` ([`schema::envoy_stats_tags`], see
//! `envoy/envoy.yaml`) turn each `;label=value` segment into a Prometheus label, the value
//! verbatim (`model="gpt-4.1"`). Label values from requests are capped per VM
//! (`max_label_values`, then `__other__`) so a flood of made-up agent ids cannot grow the stats
//! without bound.
//!
//! A name is built and defined once per VM (metric ids are per VM) and its id cached under the raw
//! label values, so the common request costs one map lookup per metric group and no formatting.
//! The caches are bounded: past [`CACHE_ENTRIES`] they are emptied and refilled. This module
//! never talks to the host; [`Counters`] does.

use std::collections::{BTreeSet, HashMap};

use tollgate_core::metrics::{self as schema, Metric};
use tollgate_core::money::Money;
use tollgate_core::usage::Usage;

/// The label value used once a label has seen `max_label_values` distinct values.
pub const OTHER: &str = "__other__";

/// Cached label combinations per metric group before the cache is emptied.
pub const CACHE_ENTRIES: usize = 4096;

/// Where increments go (the host's counters, or a map in tests).
pub trait Counters {
    /// The id of counter `name`, defining it if needed; `None` if the host refuses.
    fn define(&mut self, name: &str) -> Option<u32>;
    /// Adds `n` to a counter returned by [`Counters::define`].
    fn add(&mut self, id: u32, n: u64);
}

/// The series of one (model, agent, project, cost center): its capped label values and the
/// ids defined so far, one per token kind ([`schema::TOKEN_KINDS`]) then the cost (a series is
/// defined when it first gets a non-zero value).
#[derive(Debug)]
struct UsageIds {
    /// model, agent, project, cost center.
    who: [String; 4],
    ids: [Option<u32>; 6],
}

/// Builds capped metric names ([`schema::stat_name`]) and caches their ids.
#[derive(Debug)]
pub struct Recorder {
    max: usize,
    seen: [BTreeSet<String>; 4],
    /// `decision \0 reason \0 model \0 status` → id.
    decisions: HashMap<Box<str>, u32>,
    /// `model \0 agent \0 project \0 cost_center` → ids.
    usage: HashMap<Box<str>, UsageIds>,
    /// Stat name → id, for the rarer labelled series ([`Recorder::count`]).
    named: HashMap<Box<str>, u32>,
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
            named: HashMap::new(),
            key: String::new(),
        }
    }

    fn admit(&mut self, label: Capped, value: &str) -> String {
        let value = schema::label_value(value).into_owned();
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

    /// One request, counted once when it ends ([`schema::REQUESTS`]), `status` the upstream's class
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
        let name = schema::stat_name(&schema::REQUESTS, &[decision, reason, &model, status]);
        let Some(id) = c.define(&name) else { return };
        if self.decisions.len() >= CACHE_ENTRIES {
            self.decisions.clear();
        }
        self.decisions.insert(self.key.as_str().into(), id);
        c.add(id, 1);
    }

    /// Tokens by kind and cost of one finished request.
    pub fn usage(&mut self, c: &mut impl Counters, line: &UsageLine<'_>) {
        self.set_key(&[line.model, line.agent, line.project, line.cost_center]);
        if !self.usage.contains_key(self.key.as_str()) {
            let who = [
                self.admit(Capped::Model, line.model),
                self.admit(Capped::Agent, line.agent),
                self.admit(Capped::Project, line.project),
                self.admit(Capped::CostCenter, line.cost_center),
            ];
            if self.usage.len() >= CACHE_ENTRIES {
                self.usage.clear();
            }
            self.usage.insert(self.key.as_str().into(), UsageIds { who, ids: [None; 6] });
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
                    let [model, agent, project, cc] = &entry.who;
                    let name = match schema::TOKEN_KINDS.get(slot) {
                        Some(kind) => {
                            schema::stat_name(&schema::TOKENS, &[model, kind, agent, project, cc])
                        }
                        None => schema::stat_name(&schema::COST, &[model, agent, project, cc]),
                    };
                    let Some(id) = c.define(&name) else { continue };
                    entry.ids[slot] = Some(id);
                    id
                }
            };
            c.add(id, n);
        }
    }

    /// A budget crossed a warning threshold (80, 95 or 100 %).
    pub fn budget_warning(&mut self, c: &mut impl Counters, budget: &str, percent: u64) {
        let threshold = percent.to_string();
        self.count(c, &schema::BUDGET_WARNINGS, &[budget, &threshold], 1);
    }

    /// Adds `n` to the series of `metric` with label `values` (in the metric's label order,
    /// not capped: for labels from the policy or fixed vocabularies).
    pub fn count(&mut self, c: &mut impl Counters, metric: &Metric, values: &[&str], n: u64) {
        let name = schema::stat_name(metric, values);
        let id = match self.named.get(name.as_str()) {
            Some(id) => *id,
            None => {
                let Some(id) = c.define(&name) else { return };
                if self.named.len() >= CACHE_ENTRIES {
                    self.named.clear();
                }
                self.named.insert(name.into(), id);
                id
            }
        };
        c.add(id, n);
    }
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
    fn values_are_kept_verbatim_dots_included() {
        let mut r = Recorder::new(10);
        let mut m = Map::default();
        r.decision(&mut m, "deny", "model_not_allowed", "gpt-4.1-mini", "none");
        r.decision(&mut m, "allow", "default_allow", "", "2xx");
        r.budget_warning(&mut m, "team.daily", 95);
        let names: Vec<&str> = m.0.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "tollgate_budget_warnings_total;budget=team.daily;threshold=95",
                "tollgate_requests_total;decision=allow;reason=default_allow;model=-;status=2xx",
                "tollgate_requests_total;decision=deny;reason=model_not_allowed;model=gpt-4.1-mini;status=none",
            ]
        );
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
        let who = "agent=bot;project=PROJ-ABC123;cost_center=CC-1234";
        let expected: BTreeMap<String, u64> = [
            (format!("tollgate_tokens_total;model=gpt-4o;kind=input;{who}"), 10),
            (format!("tollgate_tokens_total;model=gpt-4o;kind=output;{who}"), 5),
            (format!("tollgate_cost_nano_usd_total;model=gpt-4o;{who}"), 75_000),
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
                ("tollgate_requests_total;decision=allow;reason=default_allow;model=__other__;status=2xx", 1),
                ("tollgate_requests_total;decision=allow;reason=default_allow;model=a;status=2xx", 2),
                ("tollgate_requests_total;decision=allow;reason=default_allow;model=b;status=2xx", 1),
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
        let who = "agent=a;project=P;cost_center=C";
        assert_eq!(m.0[&format!("tollgate_tokens_total;model=gpt-4o;kind=input;{who}")], 9);
        assert_eq!(m.0[&format!("tollgate_cost_nano_usd_total;model=gpt-4o;{who}")], 21);
        assert_eq!(
            m.0["tollgate_requests_total;decision=allow;reason=default_allow;model=gpt-4o;status=2xx"],
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
