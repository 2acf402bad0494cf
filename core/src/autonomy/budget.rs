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
use crate::guardrails::counter::{room, Take, WindowCounters};
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
        outcome(self.inner.take(day, account, action, limits.per_day, limits.per_action), limits)
    }

    /// Today's (total, action) counts of `account`; zero on another day.
    pub fn used(&self, account: &str, action: &str, now: UnixMillis) -> (u32, u32) {
        self.inner.get(now.as_millis() / MS_PER_DAY, account, action)
    }
}

/// The budget outcome of a window counter's answer.
fn outcome(take: Take, limits: Limits) -> BudgetOutcome {
    match take {
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

/// Action types one agent's [`DayCounts`] holds at most in a day; a new one beyond is refused
/// as over the store's capacity (it goes to a human), never let through uncounted.
pub const MAX_ACTIONS_PER_DAY: usize = 1024;

/// One agent's autonomy budget counts for one UTC day in one record, for a store that updates
/// a key atomically but cannot delete it (Envoy shared data, with a compare-and-swap): the day,
/// the total and the count per action type, so both limits are checked and both counts taken
/// in one write, as [`Counters`] does under its lock. A call on a later day starts the counts
/// again (the key is reused day after day); a call whose clock is behind the record's day
/// counts against the record's day. Pure: decoding, deciding and encoding only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DayCounts {
    day: u64,
    total: u32,
    actions: Vec<(String, u32)>,
}

impl DayCounts {
    /// Consumes one unit for `action` at `now` if neither limit is reached (the rule of
    /// [`Counters::consume`]).
    pub fn consume(&mut self, limits: Limits, action: &str, now: UnixMillis) -> BudgetOutcome {
        let day = now.as_millis() / MS_PER_DAY;
        if day > self.day {
            *self = DayCounts { day, ..DayCounts::default() };
        }
        let i = self.actions.iter().position(|(a, _)| a == action);
        let used = i.map_or(0, |i| self.actions[i].1);
        let take = match room(self.total, used, limits.per_day, limits.per_action) {
            Err(full) => full,
            Ok(()) if i.is_none() && self.actions.len() >= MAX_ACTIONS_PER_DAY => {
                Take::TooManySubjects { max: MAX_ACTIONS_PER_DAY }
            }
            Ok(()) => {
                self.total = self.total.saturating_add(1);
                let n = match i {
                    Some(i) => &mut self.actions[i].1,
                    None => {
                        self.actions.push((action.to_owned(), 0));
                        &mut self.actions.last_mut().expect("just pushed").1
                    }
                };
                *n = n.saturating_add(1);
                Take::Taken { total: self.total, action: *n }
            }
        };
        outcome(take, limits)
    }

    /// Decodes a stored record (empty bytes: nothing counted yet). `None`: not a record.
    pub fn decode(bytes: &[u8]) -> Option<DayCounts> {
        if bytes.is_empty() {
            return Some(DayCounts::default());
        }
        let mut rest = bytes;
        let mut take = |n: usize| -> Option<&[u8]> {
            let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
            rest = tail;
            Some(head)
        };
        let day = u64::from_le_bytes(take(8)?.try_into().ok()?);
        let total = u32::from_le_bytes(take(4)?.try_into().ok()?);
        let n = u32::from_le_bytes(take(4)?.try_into().ok()?);
        let mut actions = Vec::with_capacity((n as usize).min(MAX_ACTIONS_PER_DAY));
        for _ in 0..n {
            let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
            let name = std::str::from_utf8(take(len)?).ok()?.to_owned();
            let count = u32::from_le_bytes(take(4)?.try_into().ok()?);
            actions.push((name, count));
        }
        rest.is_empty().then_some(DayCounts { day, total, actions })
    }

    /// The bytes [`DayCounts::decode`] reads.
    pub fn encode(&self) -> Vec<u8> {
        let names: usize = self.actions.iter().map(|(a, _)| a.len() + 8).sum();
        let mut out = Vec::with_capacity(16 + names);
        out.extend_from_slice(&self.day.to_le_bytes());
        out.extend_from_slice(&self.total.to_le_bytes());
        out.extend_from_slice(&(self.actions.len() as u32).to_le_bytes());
        for (action, count) in &self.actions {
            out.extend_from_slice(&(action.len() as u32).to_le_bytes());
            out.extend_from_slice(action.as_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        out
    }
}
