//! Compiled rules: what a rule matches on and what it decides.
//!
//! A rule is a conjunction of conditions, one per request fact it names; each condition is a
//! disjunction of patterns (`tool: [search_*, fetch_url]`). A condition on a fact the request
//! does not have (no `x-agent-tier` header, say) does not match. This module only answers
//! "does this rule match these facts"; choosing among rules is the index's and the snapshot's.

use super::glob::Glob;
use super::{Effect, Facts, Limits, RouteKind};
use crate::budget::BudgetSpec;

/// A request fact a rule can match on (every `match:` field except `route`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    Agent,
    Tier,
    CostCenter,
    Project,
    BusinessUnit,
    Provider,
    Model,
    Tool,
    Category,
    Host,
    Method,
    Path,
}

impl Dim {
    /// Every dimension with its `match:` key, in document-key order.
    pub const ALL: [(Dim, &'static str); 12] = [
        (Dim::Agent, "agent"),
        (Dim::Tier, "tier"),
        (Dim::CostCenter, "cost_center"),
        (Dim::Project, "project"),
        (Dim::BusinessUnit, "business_unit"),
        (Dim::Provider, "provider"),
        (Dim::Model, "model"),
        (Dim::Tool, "tool"),
        (Dim::Category, "category"),
        (Dim::Host, "host"),
        (Dim::Method, "method"),
        (Dim::Path, "path"),
    ];

    /// The `match:` key of this dimension.
    pub fn key(self) -> &'static str {
        Dim::ALL.iter().find(|(d, _)| *d == self).map_or("?", |(_, k)| k)
    }

    /// Host names and HTTP methods compare without regard to ASCII case.
    pub fn folds_case(self) -> bool {
        matches!(self, Dim::Host | Dim::Method)
    }

    /// The request's value for this dimension.
    pub fn of<'a>(self, facts: &Facts<'a>) -> Option<&'a str> {
        match self {
            Dim::Agent => facts.agent,
            Dim::Tier => facts.tier,
            Dim::CostCenter => facts.cost_center,
            Dim::Project => facts.project,
            Dim::BusinessUnit => facts.business_unit,
            Dim::Provider => facts.provider,
            Dim::Model => facts.model,
            Dim::Tool => facts.tool,
            Dim::Category => facts.category,
            Dim::Host => facts.host,
            Dim::Method => facts.method,
            Dim::Path => facts.path,
        }
    }
}

/// One accepted value of a condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Compared exactly (ASCII case folded for hosts and methods); indexable.
    Exact(Box<str>),
    Glob(Glob),
    /// A path without wildcards: matches itself and everything below it (`/v1` matches
    /// `/v1/chat/completions` but not `/v1beta`).
    PathPrefix(Box<str>),
}

impl Pattern {
    fn matches(&self, value: &str, fold_case: bool) -> bool {
        match self {
            Pattern::Exact(e) if fold_case => e.eq_ignore_ascii_case(value),
            Pattern::Exact(e) => **e == *value,
            Pattern::Glob(g) => g.matches_with(value, fold_case),
            Pattern::PathPrefix(p) => match value.strip_prefix(&**p) {
                Some(rest) => p.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?']),
                None => false,
            },
        }
    }

    /// The value as written in the policy.
    pub fn as_str(&self) -> &str {
        match self {
            Pattern::Exact(s) | Pattern::PathPrefix(s) => s,
            Pattern::Glob(g) => g.as_str(),
        }
    }
}

/// `dim` must match one of `any_of`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub dim: Dim,
    pub any_of: Vec<Pattern>,
}

impl Condition {
    pub(crate) fn matches(&self, facts: &Facts<'_>) -> bool {
        let Some(value) = self.dim.of(facts) else { return false };
        let fold = self.dim.folds_case();
        self.any_of.iter().any(|p| p.matches(value, fold))
    }

    /// The exact values, if every pattern is exact (the condition can then be indexed).
    pub(crate) fn exact_values(&self) -> Option<Vec<&str>> {
        self.any_of
            .iter()
            .map(|p| match p {
                Pattern::Exact(e) => Some(&**e),
                _ => None,
            })
            .collect()
    }
}

/// A set of route kinds as a bit mask.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteSet(u8);

impl RouteSet {
    pub const ALL: RouteSet = RouteSet(0b111);

    pub fn with(self, kind: RouteKind) -> RouteSet {
        RouteSet(self.0 | kind.bit())
    }

    pub fn contains(self, kind: RouteKind) -> bool {
        self.0 & kind.bit() != 0
    }
}

/// What a rule (or a default) decides, with every string precomputed at load time so that a
/// decision only borrows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub effect: Effect,
    /// Stable code: the rule's `reason`, or `rule_<effect>` / `default_<effect>`.
    pub reason: String,
    /// The rule id, or `defaults.<route kind>`.
    pub clause: String,
    pub explanation: String,
    /// The risk dimensions the rule declares (`risk:`), if any.
    pub risk: Option<crate::risk::Profile>,
}

/// One compiled rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub(crate) conditions: Vec<Condition>,
    pub(crate) routes: RouteSet,
    pub(crate) outcome: Outcome,
    /// The document defaults overridden field by field by the rule's own `limits`.
    pub(crate) limits: Limits,
    pub(crate) budgets: Vec<BudgetSpec>,
    pub(crate) line: u32,
}

impl Rule {
    /// Whether every condition holds for `facts`.
    pub fn matches(&self, facts: &Facts<'_>) -> bool {
        self.routes.contains(facts.route) && self.conditions.iter().all(|c| c.matches(facts))
    }

    pub fn id(&self) -> &str {
        &self.outcome.clause
    }

    pub fn effect(&self) -> Effect {
        self.outcome.effect
    }

    /// The line of the rule in its document, for `tollgate explain`.
    pub fn line(&self) -> u32 {
        self.line
    }

    pub fn conditions(&self) -> &[Condition] {
        &self.conditions
    }

    /// Whether the rule matches every request (`match: {}`).
    pub fn is_catch_all(&self) -> bool {
        self.conditions.is_empty() && self.routes == RouteSet::ALL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_prefix_respects_segment_boundaries() {
        let p = Pattern::PathPrefix("/v1/chat".into());
        let cases = [
            ("/v1/chat", true),
            ("/v1/chat/completions", true),
            ("/v1/chat?x=1", true),
            ("/v1/chatty", false),
            ("/v1", false),
        ];
        for (path, expected) in cases {
            assert_eq!(p.matches(path, false), expected, "{path}");
        }
        assert!(Pattern::PathPrefix("/v1/".into()).matches("/v1/x", false));
    }

    #[test]
    fn exact_folds_case_only_for_hosts_and_methods() {
        let c = Condition { dim: Dim::Host, any_of: vec![Pattern::Exact("api.openai.com".into())] };
        let facts = Facts { host: Some("API.OpenAI.com"), ..Facts::default() };
        assert!(c.matches(&facts));
        let c = Condition { dim: Dim::Agent, any_of: vec![Pattern::Exact("bot".into())] };
        assert!(!c.matches(&Facts { agent: Some("BOT"), ..Facts::default() }));
        assert!(!c.matches(&Facts::default()), "an absent fact never matches");
    }
}
