//! Autonomy modes: may this agent run this action on its own, only propose it, only
//! run it after a human approves, or not at all?
//!
//! In Tollgate's terms a *tenant* is the cost center, the *account* is the agent and the
//! *action type* is the tool or action name (`llm` for model calls). Accounts are keyed by agent
//! id globally, not per tenant: an agent id is unique in a deployment, and an agent's override
//! follows it whichever cost center it bills. A mode is resolved by precedence, first match wins:
//!
//! 1. account + action, 2. tenant + action, 3. account default, 4. tenant default,
//! 5. global default, and if none is configured, `APPROVAL_REQUIRED`, never a silent
//!    `AUTO_EXECUTE`.
//!
//! [`gate`] turns the mode and, for `AUTO_EXECUTE`, the outcome of the autonomy budget
//! ([`budget`]) into an effect with a stable reason code. An exhausted budget turns the action into
//! `require_approval`: it is routed to a human, never silently deferred or let through.
//!
//! This module decides; it never records the proposal, notifies anyone or executes anything.

pub mod budget;
pub mod stats;

use std::collections::HashMap;
use std::fmt;

use crate::doc::{self, Cx, DocErrors, Field};
use crate::time::UnixMillis;

pub use budget::{
    budget_keys, BudgetKeys, BudgetLimit, BudgetLimits, BudgetOutcome, Counters, DayCounts, Limits,
};

/// How much autonomy an action has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Mode {
    /// The agent may only propose the action; it is recorded, not executed.
    ProposeOnly,
    /// Every execution needs a human approval.
    ApprovalRequired,
    /// The action runs without approval while the autonomy budget lasts.
    AutoExecute,
    /// The action is forbidden.
    Disabled,
}

impl Mode {
    /// The config spellings, in declaration order.
    pub const NAMES: [&'static str; 4] =
        ["PROPOSE_ONLY", "APPROVAL_REQUIRED", "AUTO_EXECUTE", "DISABLED"];

    pub fn parse(text: &str) -> Option<Mode> {
        Some(match text {
            "PROPOSE_ONLY" => Mode::ProposeOnly,
            "APPROVAL_REQUIRED" => Mode::ApprovalRequired,
            "AUTO_EXECUTE" => Mode::AutoExecute,
            "DISABLED" => Mode::Disabled,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::ProposeOnly => "PROPOSE_ONLY",
            Mode::ApprovalRequired => "APPROVAL_REQUIRED",
            Mode::AutoExecute => "AUTO_EXECUTE",
            Mode::Disabled => "DISABLED",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which precedence level produced a mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    AccountAction,
    TenantAction,
    AccountDefault,
    TenantDefault,
    GlobalDefault,
    /// Nothing configured: the built-in `APPROVAL_REQUIRED`.
    Builtin,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::AccountAction => "account_action",
            Level::TenantAction => "tenant_action",
            Level::AccountDefault => "account_default",
            Level::TenantDefault => "tenant_default",
            Level::GlobalDefault => "global_default",
            Level::Builtin => "builtin_default",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Level::AccountAction => "the agent's setting for this action",
            Level::TenantAction => "the cost center's setting for this action",
            Level::AccountDefault => "the agent's default",
            Level::TenantDefault => "the cost center's default",
            Level::GlobalDefault => "the global default",
            Level::Builtin => "the built-in default (nothing configured)",
        }
    }
}

/// A resolved mode and the level it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Resolution {
    pub mode: Mode,
    pub level: Level,
}

/// The modes configured for one tenant or one account.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Overrides {
    default: Option<Mode>,
    actions: HashMap<Box<str>, Mode>,
}

/// The compiled `autonomy:` section: modes by precedence level, and autonomy budget limits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    default: Option<Mode>,
    tenants: HashMap<Box<str>, Overrides>,
    accounts: HashMap<Box<str>, Overrides>,
    budgets: BudgetLimits,
}

impl Policy {
    /// Parses a document whose root holds an `autonomy:` mapping (see the crate's fixtures).
    pub fn from_yaml(text: &str) -> Result<Policy, DocErrors> {
        let node = doc::parse(text)?;
        let mut cx = Cx::new();
        let root = Field::root(&node);
        let mut policy = Policy::default();
        if let Some(mut obj) = cx.object(&root) {
            if let Some(field) = obj.require(&mut cx, "autonomy") {
                policy = Policy::decode(&mut cx, &field);
            }
            obj.finish(&mut cx, &["autonomy"]);
        }
        cx.finish(policy)
    }

    /// Decodes the value of an `autonomy:` key, recording every error in `cx`.
    pub fn decode(cx: &mut Cx, field: &Field<'_>) -> Policy {
        let mut policy = Policy::default();
        let Some(mut obj) = cx.object(field) else { return policy };
        policy.default = obj.get("default").and_then(|f| mode(cx, &f));
        if let Some(f) = obj.get("tenants") {
            policy.tenants = overrides_by_key(cx, &f);
        }
        if let Some(f) = obj.get("accounts") {
            policy.accounts = overrides_by_key(cx, &f);
        }
        if let Some(f) = obj.get("budgets") {
            policy.budgets = BudgetLimits::decode(cx, &f);
        }
        obj.finish(cx, &["default", "tenants", "accounts", "budgets"]);
        policy
    }

    /// The mode for `action` by `account` (agent id) billed to `tenant` (cost center), by the
    /// five-level precedence. Never allocates.
    pub fn resolve(&self, tenant: &str, account: &str, action: &str) -> Resolution {
        let account = self.accounts.get(account);
        let tenant = self.tenants.get(tenant);
        let found = [
            (account.and_then(|a| a.actions.get(action).copied()), Level::AccountAction),
            (tenant.and_then(|t| t.actions.get(action).copied()), Level::TenantAction),
            (account.and_then(|a| a.default), Level::AccountDefault),
            (tenant.and_then(|t| t.default), Level::TenantDefault),
            (self.default, Level::GlobalDefault),
        ];
        found
            .into_iter()
            .find_map(|(mode, level)| mode.map(|mode| Resolution { mode, level }))
            .unwrap_or(Resolution { mode: Mode::ApprovalRequired, level: Level::Builtin })
    }

    /// The autonomy budget limits that apply to `account` doing `action`.
    pub fn limits(&self, account: &str, action: &str) -> Limits {
        self.budgets.limits(account, action)
    }

    /// Resolves the mode, consumes one unit of the autonomy budget if it is `AUTO_EXECUTE`, and
    /// returns the gate. The budget is consumed only for `AUTO_EXECUTE`, as the autonomy model defines it.
    pub fn decide(
        &self,
        counters: &Counters,
        tenant: &str,
        account: &str,
        action: &str,
        now: UnixMillis,
    ) -> Gate {
        let resolution = self.resolve(tenant, account, action);
        let budget = (resolution.mode == Mode::AutoExecute)
            .then(|| counters.consume(self.limits(account, action), account, action, now));
        gate(resolution, budget)
    }
}

fn mode(cx: &mut Cx, field: &Field<'_>) -> Option<Mode> {
    field.one_of(cx, &Mode::NAMES).and_then(Mode::parse)
}

fn overrides_by_key(cx: &mut Cx, field: &Field<'_>) -> HashMap<Box<str>, Overrides> {
    let mut out = HashMap::new();
    for (key, entry) in field.entries(cx) {
        let Some(mut obj) = cx.object(&entry) else { continue };
        let mut o = Overrides {
            default: obj.get("default").and_then(|f| mode(cx, &f)),
            ..Default::default()
        };
        if let Some(actions) = obj.get("actions") {
            for (action, f) in actions.entries(cx) {
                if let Some(m) = mode(cx, &f) {
                    o.actions.insert(action.into(), m);
                }
            }
        }
        obj.finish(cx, &["default", "actions"]);
        out.insert(key.into(), o);
    }
    out
}

/// What the gate lets happen. Mirrors the decision effects `allow`, `require_approval`, `deny`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    RequireApproval,
    Deny,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::RequireApproval => "require_approval",
            Effect::Deny => "deny",
        }
    }
}

/// Why the gate decided as it did; [`Reason::code`] is stable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// `DISABLED` → deny.
    AutonomyDisabled,
    /// `PROPOSE_ONLY` → deny; the proposal is recorded by the caller.
    AutonomyProposeOnly,
    /// `APPROVAL_REQUIRED` → require approval.
    AutonomyApprovalRequired,
    /// `AUTO_EXECUTE` and a budget unit was consumed → allow.
    AutonomyAutoExecute,
    /// `AUTO_EXECUTE` but the autonomy budget is exhausted → require approval.
    AutonomyBudgetExhausted,
    /// `AUTO_EXECUTE` but the caller did not consume a budget unit → require approval.
    AutonomyBudgetNotConsumed,
}

impl Reason {
    pub fn code(self) -> &'static str {
        match self {
            Reason::AutonomyDisabled => "autonomy_disabled",
            Reason::AutonomyProposeOnly => "autonomy_propose_only",
            Reason::AutonomyApprovalRequired => "autonomy_approval_required",
            Reason::AutonomyAutoExecute => "autonomy_auto_execute",
            Reason::AutonomyBudgetExhausted => "autonomy_budget_exhausted",
            Reason::AutonomyBudgetNotConsumed => "autonomy_budget_not_consumed",
        }
    }
}

/// The autonomy gate's verdict. The explanation is built on demand so the allow path does not
/// allocate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gate {
    pub effect: Effect,
    pub reason: Reason,
    pub resolution: Resolution,
    /// The budget outcome, present when the mode was `AUTO_EXECUTE` and a unit was requested.
    pub budget: Option<BudgetOutcome>,
}

impl Gate {
    /// A human explanation: the mode, where it was configured and, for the budget, the count.
    pub fn explanation(&self) -> String {
        let Resolution { mode, level } = self.resolution;
        let origin = level.describe();
        match self.reason {
            Reason::AutonomyDisabled => {
                format!("the action is {mode} by {origin}; it may not run")
            }
            Reason::AutonomyProposeOnly => {
                format!("the action is {mode} by {origin}: proposal recorded, not executed")
            }
            Reason::AutonomyApprovalRequired => {
                format!("the action is {mode} by {origin}: a human must approve it")
            }
            Reason::AutonomyAutoExecute => match self.budget {
                Some(BudgetOutcome::Consumed { used, limit: Some(limit), .. }) => format!(
                    "the action is {mode} by {origin}; autonomy budget {used}/{limit} today"
                ),
                _ => format!("the action is {mode} by {origin}"),
            },
            Reason::AutonomyBudgetExhausted => match self.budget {
                Some(BudgetOutcome::Exhausted { limit, used, max }) => format!(
                    "the action is {mode} by {origin}, but {} is used up ({used}/{max} today): \
                     a human must approve it",
                    limit.describe()
                ),
                _ => {
                    format!("the action is {mode} by {origin}, but the autonomy budget is used up")
                }
            },
            Reason::AutonomyBudgetNotConsumed => format!(
                "the action is {mode} by {origin}, but no autonomy budget unit was consumed: \
                 a human must approve it"
            ),
        }
    }
}

/// Combines a resolved mode and, for `AUTO_EXECUTE`, the budget outcome into the effect:
/// `DISABLED` → deny, `PROPOSE_ONLY` → deny (proposal recorded), `APPROVAL_REQUIRED` → require
/// approval, `AUTO_EXECUTE` → allow if a budget unit was consumed, otherwise require approval.
/// Pure; the budget outcome of a non-`AUTO_EXECUTE` mode is ignored.
pub fn gate(resolution: Resolution, budget: Option<BudgetOutcome>) -> Gate {
    let (effect, reason) = match (resolution.mode, budget) {
        (Mode::Disabled, _) => (Effect::Deny, Reason::AutonomyDisabled),
        (Mode::ProposeOnly, _) => (Effect::Deny, Reason::AutonomyProposeOnly),
        (Mode::ApprovalRequired, _) => (Effect::RequireApproval, Reason::AutonomyApprovalRequired),
        (Mode::AutoExecute, Some(BudgetOutcome::Consumed { .. })) => {
            (Effect::Allow, Reason::AutonomyAutoExecute)
        }
        (Mode::AutoExecute, Some(BudgetOutcome::Exhausted { .. })) => {
            (Effect::RequireApproval, Reason::AutonomyBudgetExhausted)
        }
        (Mode::AutoExecute, None) => (Effect::RequireApproval, Reason::AutonomyBudgetNotConsumed),
    };
    let budget = if resolution.mode == Mode::AutoExecute { budget } else { None };
    Gate { effect, reason, resolution, budget }
}

#[cfg(test)]
mod tests;
