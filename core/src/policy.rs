//! The policy snapshot: a versioned, validated, compiled set of rules, and its evaluation.
//!
//! Decides allow / deny / require-approval for one request from its facts (who is calling,
//! which model, tool or host), and which limits and budgets apply to it. The rules are:
//!
//! - **The first matching rule in document order wins.** A rule matches when every field of its
//!   `match:` holds (and); a field with a list holds when any value does (or); a field naming a
//!   fact the request does not have (no tier header, say) does not hold.
//! - **No silent allow.** When no rule matches, `defaults` decides by route kind; the shipped
//!   defaults are `llm: allow`, `tool: require_approval`, `other: deny`. The decision says so:
//!   its clause is `defaults.<kind>` and its reason `default_<effect>`.
//! - **Limits** are the document's `limits`, overridden field by field by the matched rule's.
//! - **Budgets** that apply are the document's `budgets` plus the matched rule's.
//! - `match: {}` is the explicit catch-all. It is allowed (it is how "everything else" is
//!   written) but must be the last rule: a rule after it could never fire and is an error. A
//!   missing `match` is an error too, so that a catch-all is always written on purpose.
//!
//! Evaluation is pure and deterministic and never allocates: the decision borrows its strings,
//! limits and budgets from the snapshot, and the compiled index ([`index`]) finds the first
//! matching rule without scanning every rule. This module never counts, reserves or reads a
//! clock: rate limits and budgets are enforced by their own modules with the limits it returns.

mod config;
mod decision;
pub mod glob;
mod index;
pub mod rule;
#[cfg(test)]
mod tests;

use std::fmt;

pub use config::budget_from_field;
pub use decision::{Budgets, Decision};
pub use index::IndexStats;

use crate::attribution::Identity;
use crate::budget::BudgetSpec;
use crate::doc::{self, Cx, DocErrors, Field};
use crate::money::Money;
use index::Index;
use rule::{Outcome, Rule};

/// What a decision says to do with the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    Deny,
    RequireApproval,
}

impl Effect {
    pub const NAMES: [&'static str; 3] = ["allow", "deny", "require_approval"];
    pub const ALL: [Effect; 3] = [Effect::Allow, Effect::Deny, Effect::RequireApproval];

    pub fn parse(text: &str) -> Option<Effect> {
        Some(match text {
            "allow" => Effect::Allow,
            "deny" => Effect::Deny,
            "require_approval" => Effect::RequireApproval,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
            Effect::RequireApproval => "require_approval",
        }
    }
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of upstream a request goes to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    /// A model API (OpenAI, Anthropic, OpenAI-compatible).
    Llm,
    /// A tool API (MCP server, REST tool).
    Tool,
    /// Anything else, e.g. an unknown host reached through the forward proxy.
    #[default]
    Other,
}

impl RouteKind {
    pub const ALL: [RouteKind; 3] = [RouteKind::Llm, RouteKind::Tool, RouteKind::Other];
    pub const NAMES: [&'static str; 3] = ["llm", "tool", "other"];

    pub fn parse(text: &str) -> Option<RouteKind> {
        Some(match text {
            "llm" => RouteKind::Llm,
            "tool" => RouteKind::Tool,
            "other" => RouteKind::Other,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        Self::NAMES[self.index()]
    }

    /// The kind a request is decided as, by the upstream it goes to, never by its body: a
    /// model API is `llm`; every request to an MCP server or a REST tool is `tool` (MCP
    /// `initialize`, `tools/list`, `ping` and notifications too, decided by the tool default
    /// or a rule without `tool:`; only a `tools/call` names a tool action); anything else,
    /// e.g. an unknown host, is `other`.
    pub fn of_upstream(llm: bool, tool_server: bool) -> RouteKind {
        if llm {
            RouteKind::Llm
        } else if tool_server {
            RouteKind::Tool
        } else {
            RouteKind::Other
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            RouteKind::Llm => 0,
            RouteKind::Tool => 1,
            RouteKind::Other => 2,
        }
    }

    pub(crate) fn bit(self) -> u8 {
        1 << self.index()
    }
}

/// Tool action categories (as the guardrails name them); `category:` values must be one of these.
pub const CATEGORIES: [&str; 7] =
    ["read", "write", "execute", "deploy", "delete", "external_api", "database"];

/// Per-request limits; `None` means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    /// Requests per minute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens per minute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cost_per_request: Option<Money>,
}

impl Limits {
    /// These limits, with each unset field taken from `fallback`.
    pub fn or(self, fallback: Limits) -> Limits {
        Limits {
            rpm: self.rpm.or(fallback.rpm),
            tpm: self.tpm.or(fallback.tpm),
            max_cost_per_request: self.max_cost_per_request.or(fallback.max_cost_per_request),
        }
    }
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if let Some(rpm) = self.rpm {
            write!(f, "rpm={rpm}")?;
            sep = " ";
        }
        if let Some(tpm) = self.tpm {
            write!(f, "{sep}tpm={tpm}")?;
            sep = " ";
        }
        if let Some(cost) = self.max_cost_per_request {
            write!(f, "{sep}max_cost_per_request={cost}")?;
            sep = " ";
        }
        if sep.is_empty() {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// What is known about a request when it is decided, all borrowed from the request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Facts<'a> {
    pub route: RouteKind,
    pub agent: Option<&'a str>,
    pub tier: Option<&'a str>,
    pub cost_center: Option<&'a str>,
    pub project: Option<&'a str>,
    pub business_unit: Option<&'a str>,
    pub provider: Option<&'a str>,
    pub model: Option<&'a str>,
    /// The tool action name.
    pub tool: Option<&'a str>,
    /// One of [`CATEGORIES`].
    pub category: Option<&'a str>,
    /// Host name without port.
    pub host: Option<&'a str>,
    pub method: Option<&'a str>,
    /// Request path (a query string, if left on, is ignored by prefix matches).
    pub path: Option<&'a str>,
}

impl<'a> Facts<'a> {
    /// Facts carrying an attributed identity; the caller fills in the rest.
    pub fn from_identity(identity: &Identity<'a>, route: RouteKind) -> Facts<'a> {
        Facts {
            route,
            agent: identity.agent,
            tier: identity.tier,
            cost_center: identity.cost_center,
            project: identity.project,
            business_unit: identity.business_unit,
            ..Facts::default()
        }
    }
}

/// A compiled policy: immutable, cheap to share behind an `Arc`, evaluated per request.
#[derive(Clone, Debug)]
pub struct Snapshot {
    version: String,
    /// By [`RouteKind::index`].
    defaults: [Outcome; 3],
    limits: Limits,
    budgets: Vec<BudgetSpec>,
    rules: Vec<Rule>,
    index: Index,
}

impl Snapshot {
    /// Decodes a policy document (the mapping with `version`, `defaults`, `limits`, `budgets`,
    /// `rules`) from a field of a larger document, recording every error in `cx`.
    pub fn from_field(cx: &mut Cx, field: &Field<'_>) -> Option<Snapshot> {
        config::decode(cx, field)
    }

    /// Parses and compiles a policy document in YAML or JSON; every error at once.
    pub fn from_yaml_str(text: &str) -> Result<Snapshot, DocErrors> {
        let node = doc::parse(text)?;
        let mut cx = Cx::new();
        let snapshot = Snapshot::from_field(&mut cx, &Field::root(&node));
        match snapshot {
            Some(s) => cx.finish(s),
            None => Err(cx.finish(()).err().unwrap_or_else(|| DocErrors(Vec::new()))),
        }
    }

    /// Decides one request: the first matching rule, else the default for its route kind.
    pub fn evaluate(&self, facts: &Facts<'_>) -> Decision<'_> {
        match self.index.first_match(&self.rules, facts) {
            Some(n) => self.rule_decision(n),
            None => self.default_decision(facts.route),
        }
    }

    /// The reference evaluation: a linear scan in document order. Same result as
    /// [`Snapshot::evaluate`], in time proportional to the number of rules; for tests,
    /// benchmarks and `tollgate explain`.
    pub fn evaluate_linear(&self, facts: &Facts<'_>) -> Decision<'_> {
        match self.rules.iter().position(|r| r.matches(facts)) {
            Some(n) => self.rule_decision(n),
            None => self.default_decision(facts.route),
        }
    }

    fn rule_decision(&self, n: usize) -> Decision<'_> {
        let Some(rule) = self.rules.get(n) else {
            return self.default_decision(RouteKind::Other);
        };
        Decision::new(
            &rule.outcome,
            &self.version,
            rule.limits,
            Budgets::new(&self.budgets, &rule.budgets),
        )
    }

    fn default_decision(&self, route: RouteKind) -> Decision<'_> {
        Decision::new(
            &self.defaults[route.index()],
            &self.version,
            self.limits,
            Budgets::new(&self.budgets, &[]),
        )
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// The rules in document order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The default effect for requests of `route` that match no rule.
    pub fn default_effect(&self, route: RouteKind) -> Effect {
        self.defaults[route.index()].effect
    }

    /// The document-level limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Every budget in the document (document-level first, then each rule's, in order).
    pub fn all_budgets(&self) -> impl Iterator<Item = &BudgetSpec> {
        self.budgets.iter().chain(self.rules.iter().flat_map(|r| r.budgets.iter()))
    }

    /// How the rules were filed in the index.
    pub fn index_stats(&self) -> IndexStats {
        self.index.stats()
    }

    fn compile(
        version: String,
        defaults: [Outcome; 3],
        limits: Limits,
        budgets: Vec<BudgetSpec>,
        rules: Vec<Rule>,
    ) -> Snapshot {
        let index = Index::build(&rules);
        Snapshot { version, defaults, limits, budgets, rules, index }
    }
}
