//! Guardrails: is this tool call allowed at all?
//!
//! Every action (tool name) needs a policy: its category, risk level, whether it requires
//! approval, forbidden argument patterns, a maximum cost per call and a rate limit per hour.
//! **An action without a policy is blocked** (`unknown_action`). The checks run in this order,
//! and the first violation wins: unknown action, forbidden pattern (or arguments nested too
//! deeply), cost per call, rate per hour. The rate check comes last because it consumes a unit:
//! a call blocked for another reason does not use up the agent's hourly allowance (the guardrail model
//! counts only allowed calls too). A call that passes is allowed, or needs approval when its
//! policy says `requires_approval`.
//!
//! The eight default policies ship as [`Guardrails::defaults`]; a config may add actions
//! and replace defaults by name. The runaway-agent protections live beside: [`loops`] (the same
//! call repeated), [`breaker`] (an upstream that keeps failing) and [`escalation`] (an agent
//! that keeps erring).
//!
//! This module decides; it never records violations, logs or notifies.

pub mod args;
pub mod breaker;
pub mod counter;
pub mod escalation;
pub mod loops;
pub mod patterns;
pub mod report;

use std::collections::HashMap;

use serde_json::Value;

use crate::autonomy::Effect;
use crate::doc::{self, Cx, DocErrors, Field};
use crate::money::Money;
use crate::time::{Period, UnixMillis};

use counter::{Take, WindowCounters};
use patterns::Patterns;

/// What kind of thing an action does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Read,
    Write,
    Execute,
    Deploy,
    Delete,
    ExternalApi,
    Database,
}

impl Category {
    pub const NAMES: [&'static str; 7] =
        ["read", "write", "execute", "deploy", "delete", "external_api", "database"];

    pub fn parse(text: &str) -> Option<Category> {
        Some(match text {
            "read" => Category::Read,
            "write" => Category::Write,
            "execute" => Category::Execute,
            "deploy" => Category::Deploy,
            "delete" => Category::Delete,
            "external_api" => Category::ExternalApi,
            "database" => Category::Database,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Read => "read",
            Category::Write => "write",
            Category::Execute => "execute",
            Category::Deploy => "deploy",
            Category::Delete => "delete",
            Category::ExternalApi => "external_api",
            Category::Database => "database",
        }
    }
}

/// The risk classification of an action (also a violation's severity).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RiskLevel {
    Safe,
    Low,
    Medium,
    High,
    Critical,
}

impl RiskLevel {
    pub const NAMES: [&'static str; 5] = ["safe", "low", "medium", "high", "critical"];

    pub fn parse(text: &str) -> Option<RiskLevel> {
        Some(match text {
            "safe" => RiskLevel::Safe,
            "low" => RiskLevel::Low,
            "medium" => RiskLevel::Medium,
            "high" => RiskLevel::High,
            "critical" => RiskLevel::Critical,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        RiskLevel::NAMES[self as usize]
    }
}

/// The constraints on one action.
#[derive(Clone, Debug, PartialEq)]
pub struct ActionPolicy {
    pub category: Category,
    pub risk_level: RiskLevel,
    pub requires_approval: bool,
    /// Compiled forbidden argument patterns; `None` when there are none.
    pub forbidden: Option<Patterns>,
    pub max_cost_per_call: Option<Money>,
    pub rate_limit_per_hour: Option<u32>,
    /// Path or URL prefixes the arguments that name a resource ([`args::RESOURCE_KEYS`]) must
    /// lie under; empty: any resource.
    pub allowed_resources: Vec<String>,
}

impl ActionPolicy {
    fn new(category: Category, risk_level: RiskLevel, requires_approval: bool) -> Self {
        ActionPolicy {
            category,
            risk_level,
            requires_approval,
            forbidden: None,
            max_cost_per_call: None,
            rate_limit_per_hour: None,
            allowed_resources: Vec::new(),
        }
    }
}

/// Why a call is blocked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// No policy names the action.
    UnknownAction,
    /// A string argument matched a forbidden pattern.
    ForbiddenPattern { path: String, pattern: String, excerpt: String },
    /// The arguments nest deeper than [`patterns::MAX_DEPTH`]; they cannot be fully checked.
    ArgumentsTooDeep { path: String },
    /// The arguments carry more than [`args::MAX_ARGUMENT_BYTES`] of strings.
    ArgumentsTooLarge { max_bytes: usize },
    /// An argument naming a resource lies outside the action's `allowed_resources`.
    ResourceNotAllowed { path: String, excerpt: String },
    /// The call's estimated cost is above the action's maximum per call.
    CostLimitExceeded { estimated: Money, max: Money },
    /// The agent used the action's hourly allowance (`used` of `limit` this UTC hour).
    RateLimitExceeded { used: u32, limit: u32, retry_after_ms: u64 },
}

impl Violation {
    /// The stable reason code.
    pub fn code(&self) -> &'static str {
        match self {
            Violation::UnknownAction => "unknown_action",
            Violation::ForbiddenPattern { .. } => "forbidden_pattern",
            Violation::ArgumentsTooDeep { .. } => "arguments_too_deep",
            Violation::ArgumentsTooLarge { .. } => "arguments_too_large",
            Violation::ResourceNotAllowed { .. } => "resource_not_allowed",
            Violation::CostLimitExceeded { .. } => "cost_limit_exceeded",
            Violation::RateLimitExceeded { .. } => "rate_limit_exceeded",
        }
    }

    /// The severity of the violation.
    pub fn severity(&self) -> RiskLevel {
        match self {
            Violation::ForbiddenPattern { .. } => RiskLevel::Critical,
            _ => RiskLevel::High,
        }
    }

    /// Every reason code, for metrics that are zero until the first violation.
    pub const CODES: [&'static str; 7] = [
        "unknown_action",
        "forbidden_pattern",
        "arguments_too_deep",
        "arguments_too_large",
        "resource_not_allowed",
        "cost_limit_exceeded",
        "rate_limit_exceeded",
    ];

    /// What the audit record and the refusal carry about this violation of `action`.
    pub fn breach(&self, action: &str) -> Breach {
        let (argument, pattern, excerpt) = match self {
            Violation::ForbiddenPattern { path, pattern, excerpt } => {
                (Some(path.clone()), Some(pattern.clone()), Some(excerpt.clone()))
            }
            Violation::ResourceNotAllowed { path, excerpt } => {
                (Some(path.clone()), None, Some(excerpt.clone()))
            }
            Violation::ArgumentsTooDeep { path } => (Some(path.clone()), None, None),
            _ => (None, None, None),
        };
        Breach {
            action: patterns::excerpt(action),
            reason: self.code(),
            argument,
            pattern,
            excerpt,
            rpc_id: None,
        }
    }

    /// A human explanation naming the action (never the whole argument value).
    pub fn explanation(&self, action: &str) -> String {
        let action = patterns::excerpt(action);
        match self {
            Violation::UnknownAction => {
                format!("action `{action}` is not in the approved policy list: blocked for safety")
            }
            Violation::ForbiddenPattern { path, pattern, excerpt } => format!(
                "argument {path} of `{action}` matches forbidden pattern `{pattern}` (at \"{excerpt}\")"
            ),
            Violation::ArgumentsTooDeep { path } => format!(
                "arguments of `{action}` nest deeper than {} levels at {path}: they cannot be checked",
                patterns::MAX_DEPTH
            ),
            Violation::ArgumentsTooLarge { max_bytes } => format!(
                "arguments of `{action}` carry more than {max_bytes} bytes of text: they cannot \
                 be checked"
            ),
            Violation::ResourceNotAllowed { path, excerpt } => format!(
                "argument {path} of `{action}` names a resource outside its allowed resources \
                 (\"{excerpt}\")"
            ),
            Violation::CostLimitExceeded { estimated, max } => format!(
                "estimated cost ${estimated} of `{action}` is above its limit of ${max} per call"
            ),
            Violation::RateLimitExceeded { used, limit, retry_after_ms } => format!(
                "rate limit of `{action}` reached: {used}/{limit} calls this hour; retry in {}s",
                retry_after_ms.div_ceil(1000)
            ),
        }
    }
}

/// A guardrail violation as recorded and answered: the action, the reason code, the argument's
/// JSON path, the pattern, a short excerpt of the offending value (never the whole value), and
/// for an MCP call its JSON-RPC `id` (the refusal is then a JSON-RPC error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Breach {
    pub action: String,
    pub reason: &'static str,
    pub argument: Option<String>,
    pub pattern: Option<String>,
    pub excerpt: Option<String>,
    pub rpc_id: Option<Value>,
}

/// The guardrail verdict on one call.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict<'a> {
    /// The call passed every check. `rate_used` is this hour's count including the call, when
    /// the action has a rate limit.
    Pass {
        policy: &'a ActionPolicy,
        rate_used: Option<u32>,
    },
    Block(Violation),
}

impl Verdict<'_> {
    /// `allow`, `require_approval` when the policy requires it, or `deny`.
    pub fn effect(&self) -> Effect {
        match self {
            Verdict::Pass { policy, .. } if policy.requires_approval => Effect::RequireApproval,
            Verdict::Pass { .. } => Effect::Allow,
            Verdict::Block(_) => Effect::Deny,
        }
    }
}

/// The counter name of an (agent, action) rate limit in the UTC hour of `now`, for a shared
/// store: `guardrail:<agent>:<action>:<YYYY-MM-DDTHH>`.
pub fn rate_key(agent: &str, action: &str, now: UnixMillis) -> String {
    format!("guardrail:{agent}:{action}:{}", Period::Hourly.key(now))
}

/// In-memory per-hour counters for the guardrail rate limits, shared by every thread.
#[derive(Debug, Default)]
pub struct RateCounters {
    inner: WindowCounters,
}

impl RateCounters {
    /// Counters tracking at most `max_agents` agents per hour (new agents past it are blocked).
    pub fn new(max_agents: usize) -> Self {
        RateCounters { inner: WindowCounters::new(max_agents) }
    }

    /// Atomically counts one call of `action` by `agent` in the UTC hour of `now`, unless
    /// `limit` is reached.
    pub fn take(
        &self,
        agent: &str,
        action: &str,
        limit: Option<u32>,
        now: UnixMillis,
    ) -> Result<u32, Violation> {
        let window = Period::Hourly.window(now);
        let retry_after_ms = window.end.since(now);
        let hour = now.as_millis() / 3_600_000;
        match self.inner.take(hour, agent, action, None, limit) {
            Take::Taken { action, .. } => Ok(action),
            Take::ActionFull { used, limit } | Take::TotalFull { used, limit } => {
                Err(Violation::RateLimitExceeded { used, limit, retry_after_ms })
            }
            Take::TooManySubjects { .. } => Err(Violation::RateLimitExceeded {
                used: 0,
                limit: limit.unwrap_or(0),
                retry_after_ms,
            }),
        }
    }
}

/// The action policies, by action name.
#[derive(Clone, Debug, PartialEq)]
pub struct Guardrails {
    actions: HashMap<Box<str>, ActionPolicy>,
}

impl Default for Guardrails {
    fn default() -> Self {
        Guardrails::defaults()
    }
}

impl Guardrails {
    /// The default policies.
    pub fn defaults() -> Guardrails {
        use Category as C;
        use RiskLevel as R;
        let mut actions = HashMap::new();
        let mut add = |name: &str, mut p: ActionPolicy, patterns: &[&str], rate: Option<u32>| {
            p.rate_limit_per_hour = rate;
            if !patterns.is_empty() {
                // The defaults are tested to compile; were one not to, the action is left out
                // and so blocked as unknown, never let through unchecked.
                match Patterns::compile(patterns) {
                    Ok(compiled) => p.forbidden = Some(compiled),
                    Err(_) => return,
                }
            }
            actions.insert(name.into(), p);
        };
        add(
            "read_file",
            ActionPolicy::new(C::Read, R::Safe, false),
            &[r"\.env$", r"id_rsa$", r"\.pem$", r"password", r"secret"],
            None,
        );
        add(
            "write_file",
            ActionPolicy::new(C::Write, R::Medium, true),
            &[r"^/etc/", r"^/root/", r"\.git/config$"],
            Some(100),
        );
        add(
            "run_command",
            ActionPolicy::new(C::Execute, R::High, true),
            &[
                r"\brm\s+-(rf|fr)\s+/",
                r"\bdd\s+if=",
                r"\bmkfs\b",
                r"\bshutdown\b",
                r"\breboot\b",
                r"\bkillall\b",
            ],
            Some(50),
        );
        add("database_query", ActionPolicy::new(C::Database, R::Medium, false), &[], Some(1000));
        add(
            "database_mutation",
            ActionPolicy::new(C::Database, R::High, true),
            &[
                r"DROP\s+DATABASE",
                r"DROP\s+TABLE",
                r"\bTRUNCATE\b",
                r"DELETE\s+FROM\s+[^\s;]+\s*(;|\z)",
                r"DELETE\s+FROM\s+[^\s;]+\s+WHERE\s+(1\s*=\s*1|true)\s*(;|\z)",
            ],
            Some(100),
        );
        add("deploy_to_production", ActionPolicy::new(C::Deploy, R::Critical, true), &[], Some(10));
        add("delete_resource", ActionPolicy::new(C::Delete, R::Critical, true), &[], Some(20));
        let mut external = ActionPolicy::new(C::ExternalApi, R::Medium, false);
        external.max_cost_per_call = Some(Money::from_usd(1));
        add("external_api_call", external, &[], Some(500));
        Guardrails { actions }
    }

    /// No policies at all: every action is unknown and blocked.
    pub fn empty() -> Guardrails {
        Guardrails { actions: HashMap::new() }
    }

    /// Parses a document whose root holds a `guardrails:` mapping.
    pub fn from_yaml(text: &str) -> Result<Guardrails, DocErrors> {
        let node = doc::parse(text)?;
        let mut cx = Cx::new();
        let mut out = Guardrails::defaults();
        if let Some(mut obj) = cx.object(&Field::root(&node)) {
            if let Some(field) = obj.require(&mut cx, "guardrails") {
                out = Guardrails::decode(&mut cx, &field);
            }
            obj.finish(&mut cx, &["guardrails"]);
        }
        cx.finish(out)
    }

    /// Decodes `{include_defaults: true, actions: {<name>: {category, risk_level,
    /// requires_approval, forbidden_patterns, max_cost_per_call, rate_limit_per_hour}}}`.
    /// Configured actions replace defaults of the same name. `requires_approval` defaults to
    /// true: an action is only trusted to run unattended when the config says so.
    pub fn decode(cx: &mut Cx, field: &Field<'_>) -> Guardrails {
        let mut out = Guardrails::defaults();
        let Some(mut obj) = cx.object(field) else { return out };
        if obj.get("include_defaults").and_then(|f| f.bool(cx)) == Some(false) {
            out.actions.clear();
        }
        if let Some(actions) = obj.get("actions") {
            let defaults = Guardrails::defaults();
            for (name, f) in actions.entries(cx) {
                if let Some(p) = decode_action(cx, &f, defaults.policy(name)) {
                    out.actions.insert(name.into(), p);
                }
            }
        }
        obj.finish(cx, &["include_defaults", "actions"]);
        out
    }

    /// The policy of `action`, if any. Never allocates.
    pub fn policy(&self, action: &str) -> Option<&ActionPolicy> {
        self.actions.get(action)
    }

    /// The configured action names, sorted.
    pub fn action_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.actions.keys().map(|k| &**k).collect();
        names.sort_unstable();
        names
    }

    /// The stateless checks: known action, forbidden patterns, cost per call.
    pub fn check(
        &self,
        action: &str,
        args: &Value,
        estimated_cost: Money,
    ) -> Result<&ActionPolicy, Violation> {
        self.check_parts(action, &[args::Part { root: "$", value: args }], estimated_cost)
    }

    /// [`Guardrails::check`] over several argument parts (a tool route's JSON body at `$` and
    /// its query parameters at `$query`), walked once with one size budget.
    pub fn check_parts(
        &self,
        action: &str,
        parts: &[args::Part<'_>],
        estimated_cost: Money,
    ) -> Result<&ActionPolicy, Violation> {
        let policy = self.policy(action).ok_or(Violation::UnknownAction)?;
        if let Some(v) = args::check(policy, parts) {
            return Err(v);
        }
        if let Some(max) = policy.max_cost_per_call {
            if estimated_cost > max {
                return Err(Violation::CostLimitExceeded { estimated: estimated_cost, max });
            }
        }
        Ok(policy)
    }

    /// Every check, then one unit of the hourly rate limit (consumed only if the rest passed).
    /// Allocation-free on the common path once the agent and action have been seen this hour.
    pub fn evaluate(
        &self,
        counters: &RateCounters,
        agent: &str,
        action: &str,
        args: &Value,
        estimated_cost: Money,
        now: UnixMillis,
    ) -> Verdict<'_> {
        let policy = match self.check(action, args, estimated_cost) {
            Ok(policy) => policy,
            Err(v) => return Verdict::Block(v),
        };
        let Some(limit) = policy.rate_limit_per_hour else {
            return Verdict::Pass { policy, rate_used: None };
        };
        match counters.take(agent, action, Some(limit), now) {
            Ok(used) => Verdict::Pass { policy, rate_used: Some(used) },
            Err(v) => Verdict::Block(v),
        }
    }
}

/// Decodes one action's policy. An action named like a default (`base`) keeps the default's
/// value of every field it does not set; any other action must set `category` and
/// `risk_level`.
fn decode_action(
    cx: &mut Cx,
    field: &Field<'_>,
    base: Option<&ActionPolicy>,
) -> Option<ActionPolicy> {
    let mut obj = cx.object(field)?;
    let mut field_or_base = |cx: &mut Cx, name: &str, has_base: bool| {
        if has_base {
            obj.get(name)
        } else {
            obj.require(cx, name)
        }
    };
    let category = field_or_base(cx, "category", base.is_some())
        .and_then(|f| f.one_of(cx, &Category::NAMES))
        .and_then(Category::parse)
        .or(base.map(|b| b.category));
    let risk_level = field_or_base(cx, "risk_level", base.is_some())
        .and_then(|f| f.one_of(cx, &RiskLevel::NAMES))
        .and_then(RiskLevel::parse)
        .or(base.map(|b| b.risk_level));
    let requires_approval = obj
        .get("requires_approval")
        .and_then(|f| f.bool(cx))
        .unwrap_or(base.is_none_or(|b| b.requires_approval));
    let mut forbidden = base.and_then(|b| b.forbidden.clone());
    let mut ok = true;
    if let Some(f) = obj.get("forbidden_patterns") {
        forbidden = None;
        let items = f.items(cx);
        let mut sources = Vec::with_capacity(items.len());
        for item in &items {
            let Some(s) = item.str(cx) else {
                ok = false;
                continue;
            };
            // Compile each alone first so an error names the pattern that is wrong.
            if let Err(e) = Patterns::compile(&[s]) {
                item.error(cx, format!("invalid pattern: {}", one_line(&e.to_string())));
                ok = false;
            }
            sources.push(s);
        }
        if ok && !sources.is_empty() {
            match Patterns::compile(&sources) {
                Ok(p) => forbidden = Some(p),
                Err(e) => {
                    f.error(
                        cx,
                        format!("patterns do not compile together: {}", one_line(&e.to_string())),
                    );
                    ok = false;
                }
            }
        }
    }
    let max_cost_per_call = match obj.get("max_cost_per_call") {
        Some(f) => f.money(cx),
        None => base.and_then(|b| b.max_cost_per_call),
    };
    let rate_limit_per_hour = match obj.get("rate_limit_per_hour") {
        Some(f) => f.u64(cx).and_then(|n| {
            let n = u32::try_from(n).ok();
            if n.is_none() {
                f.error(cx, format!("must be at most {}", u32::MAX));
            }
            n
        }),
        None => base.and_then(|b| b.rate_limit_per_hour),
    };
    let allowed_resources = match obj.get("allowed_resources") {
        Some(f) => {
            let mut out = Vec::new();
            for item in f.items(cx) {
                match item.str(cx) {
                    Some("") => {
                        item.error(cx, "an empty prefix would allow every resource");
                        ok = false;
                    }
                    Some(s) => out.push(s.to_owned()),
                    None => ok = false,
                }
            }
            out
        }
        None => base.map(|b| b.allowed_resources.clone()).unwrap_or_default(),
    };
    obj.finish(
        cx,
        &[
            "category",
            "risk_level",
            "requires_approval",
            "forbidden_patterns",
            "max_cost_per_call",
            "rate_limit_per_hour",
            "allowed_resources",
        ],
    );
    let (category, risk_level) = (category?, risk_level?);
    ok.then_some(ActionPolicy {
        category,
        risk_level,
        requires_approval,
        forbidden,
        max_cost_per_call,
        rate_limit_per_hour,
        allowed_resources,
    })
}

fn one_line(text: &str) -> String {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests;
