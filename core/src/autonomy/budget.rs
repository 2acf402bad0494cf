//! The autonomy budget: how many actions an agent may run on its own per UTC day, in
//! total and per action type.
//!
//! A unit is consumed only after a mode resolves to `AUTO_EXECUTE`, with one atomic
//! check-and-increment of both counters (never a read-modify-write), so parallel requests can
//! never run more autonomous actions than the limit. When a limit is reached the caller turns the
//! action into `require_approval` ([`super::gate`] does), never a silent pass or deferral.
//!
//! Limits come from the policy snapshot and the counts from [`Counters`], kept apart so a policy
//! reload keeps the day's counts. With no `budgets:` configured the number of autonomous actions
//! is unlimited (they are still counted). Another store (Envoy shared data, Redis) computes the
//! same counter names with [`budget_keys`].

use std::collections::HashMap;

use crate::doc::{Cx, Field};
use crate::guardrails::counter::{Take, WindowCounters};
use crate::time::{Period, UnixMillis};

const MS_PER_DAY: u64 = 86_400_000;

/// Limits for one account: per day in total and per action type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct AccountLimits {
    per_day: Option<u32>,
    per_action: HashMap<Box<str>, u32>,
}

/// The configured `budgets:`: a default for every account, and per-account overrides. An
/// account's `per_day` replaces the default's; its `per_action` entries replace the default's
/// entries for the same action, and other actions keep the default's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BudgetLimits {
    default: AccountLimits,
    accounts: HashMap<Box<str>, AccountLimits>,
}

/// The limits that apply to one (account, action); `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub per_day: Option<u32>,
    pub per_action: Option<u32>,
}

impl BudgetLimits {
    /// Decodes `{default: {per_day, per_action}, accounts: {<agent>: {per_day, per_action}}}`.
    pub fn decode(cx: &mut Cx, field: &Field<'_>) -> BudgetLimits {
        let mut out = BudgetLimits::default();
        let Some(mut obj) = cx.object(field) else { return out };
        if let Some(f) = obj.get("default") {
            out.default = account_limits(cx, &f);
        }
        if let Some(f) = obj.get("accounts") {
            for (account, f) in f.entries(cx) {
                out.accounts.insert(account.into(), account_limits(cx, &f));
            }
        }
        obj.finish(cx, &["default", "accounts"]);
        out
    }

    /// The effective limits of `account` for `action`. Never allocates.
    pub fn limits(&self, account: &str, action: &str) -> Limits {
        let own = self.accounts.get(account);
        Limits {
            per_day: own.and_then(|a| a.per_day).or(self.default.per_day),
            per_action: own
                .and_then(|a| a.per_action.get(action))
                .or_else(|| self.default.per_action.get(action))
                .copied(),
        }
    }
}

fn account_limits(cx: &mut Cx, field: &Field<'_>) -> AccountLimits {
    let mut out = AccountLimits::default();
    let Some(mut obj) = cx.object(field) else { return out };
    out.per_day = obj.get("per_day").and_then(|f| count(cx, &f));
    if let Some(f) = obj.get("per_action") {
        for (action, f) in f.entries(cx) {
            if let Some(n) = count(cx, &f) {
                out.per_action.insert(action.into(), n);
            }
        }
    }
    obj.finish(cx, &["per_day", "per_action"]);
    out
}

fn count(cx: &mut Cx, field: &Field<'_>) -> Option<u32> {
    let n = field.u64(cx)?;
    match u32::try_from(n) {
        Ok(n) => Some(n),
        Err(_) => {
            field.error(cx, format!("must be at most {}", u32::MAX));
            None
        }
    }
}

/// Which limit stopped an autonomous action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetLimit {
    /// The account's autonomous actions per day.
    PerDay,
    /// The account's autonomous actions of this type per day.
    PerAction,
    /// The store tracks too many accounts today; refused rather than uncounted.
    Capacity,
}

impl BudgetLimit {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            BudgetLimit::PerDay => "the agent's daily autonomy budget",
            BudgetLimit::PerAction => "the agent's daily autonomy budget for this action",
            BudgetLimit::Capacity => "the autonomy budget store's capacity",
        }
    }
}

/// The result of consuming one autonomy budget unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum BudgetOutcome {
    /// One unit consumed; counts include it.
    Consumed { used: u32, limit: Option<u32>, action_used: u32, action_limit: Option<u32> },
    /// Nothing consumed: `limit` is reached (`used` of `max`). The action needs approval.
    Exhausted { limit: BudgetLimit, used: u32, max: u32 },
}

/// The counter names of one (account, action, UTC day) for a shared store, and when they can
/// expire. `account` comes first and `action` last; agent ids contain no `:`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetKeys {
    /// `autonomy:<account>:<YYYY-MM-DD>`.
    pub total: String,
    /// `autonomy:<account>:<YYYY-MM-DD>:<action>`.
    pub action: String,
    /// The end of the day: the counters are useless after it.
    pub expires_at: UnixMillis,
}

/// The pure counter names for a shared store; see [`BudgetKeys`].
pub fn budget_keys(account: &str, action: &str, now: UnixMillis) -> BudgetKeys {
    let day = Period::Daily.key(now);
    BudgetKeys {
        total: format!("autonomy:{account}:{day}"),
        action: format!("autonomy:{account}:{day}:{action}"),
        expires_at: Period::Daily.window(now).end,
    }
}

/// The in-memory autonomy budget counters, shared by every thread (`&self`). Holds only the
/// current UTC day; see [`crate::guardrails::counter`].
#[derive(Debug, Default)]
pub struct Counters {
    inner: WindowCounters,
}

impl Counters {
    /// Counters tracking at most `max_accounts` agents per day.
    pub fn new(max_accounts: usize) -> Self {
        Counters { inner: WindowCounters::new(max_accounts) }
    }

    /// Atomically consumes one unit for `account` doing `action` today (UTC) if neither limit
    /// is reached. Exhausted means the action must go to a human.
    pub fn consume(
        &self,
        limits: Limits,
        account: &str,
        action: &str,
        now: UnixMillis,
    ) -> BudgetOutcome {
        let day = now.as_millis() / MS_PER_DAY;
        match self.inner.take(day, account, action, limits.per_day, limits.per_action) {
            Take::Taken { total, action } => BudgetOutcome::Consumed {
                used: total,
                limit: limits.per_day,
                action_used: action,
                action_limit: limits.per_action,
            },
            Take::TotalFull { used, limit } => {
                BudgetOutcome::Exhausted { limit: BudgetLimit::PerDay, used, max: limit }
            }
            Take::ActionFull { used, limit } => {
                BudgetOutcome::Exhausted { limit: BudgetLimit::PerAction, used, max: limit }
            }
            Take::TooManySubjects { max } => BudgetOutcome::Exhausted {
                limit: BudgetLimit::Capacity,
                used: 0,
                max: u32::try_from(max).unwrap_or(u32::MAX),
            },
        }
    }

    /// Today's (total, action) counts of `account`; zero on another day.
    pub fn used(&self, account: &str, action: &str, now: UnixMillis) -> (u32, u32) {
        self.inner.get(now.as_millis() / MS_PER_DAY, account, action)
    }
}
