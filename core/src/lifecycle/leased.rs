//! The counting steps over a leasing store (a fleet's: its counters are leased from a backend,
//! see [`crate::budget::lease`]), shared by the sidecar's Redis store and the Envoy filter's
//! leases through the collector: rate limits, the guardrails' hourly action counts and the
//! autonomy budgets. A lease too small answers short (the lifecycle hands the request back as
//! [`super::Admission::Short`]); a store that cannot count says so and the adapter applies its
//! outage policy.
//!
//! Action counts are leased like rate allowances: one counter per agent and UTC day (and per
//! action and day) for the autonomy budget, one per agent, action and UTC hour for the
//! guardrails, each limited to the configured count. Every counted call is also reported as
//! spent at the holder's next sync, so it stays counted if the holder dies.

use super::{ActionRate, RateLimited};
use crate::autonomy::{self, BudgetLimit, BudgetOutcome};
use crate::budget::lease::COUNT;
use crate::budget::{AddOutcome, Refill, Store, StoreError};
use crate::time::{Period, UnixMillis};

/// Rate limits on a leasing store (a fleet's, whose counters are leased from a backend: see
/// [`crate::budget::lease`]): takes one request and `tokens` tokens from the allowances of
/// `agent` under `clause` in the minute of `now`, counted together by every holder in fixed
/// minute windows. Both or neither are taken. A lease too small answers
/// [`RateLimited::Short`]; a store that cannot count, [`RateLimited::Unavailable`].
pub fn leased_rate(
    store: &impl Store,
    clause: &str,
    agent: &str,
    rpm: Option<u64>,
    tpm: Option<u64>,
    tokens: u64,
    now: UnixMillis,
) -> Result<(), RateLimited> {
    let who = format!("{}:{clause}/{}:{agent}", clause.len(), agent.len());
    let minute = now.0 / 60_000;
    let window_end = UnixMillis((minute + 1) * 60_000);
    let retry_after_secs = window_end.0.saturating_sub(now.0).div_ceil(1000);
    let mut taken: Option<String> = None;
    for (limit, amount, kind) in [(rpm, 1, "rpm"), (tpm, tokens.max(1), "tpm")] {
        let Some(limit) = limit else { continue };
        let key = format!("{}{kind}/{who}/{minute}/committed", crate::budget::lease::RATE);
        let amount = i64::try_from(amount).unwrap_or(i64::MAX);
        let limit_i = i64::try_from(limit).unwrap_or(i64::MAX);
        let refused = match store.add_if_within(&key, amount, limit_i, window_end) {
            Ok(AddOutcome::Applied { .. }) => {
                taken = Some(key);
                continue;
            }
            Ok(AddOutcome::Refused { .. }) if kind == "tpm" => {
                RateLimited::Tokens { limit, retry_after_secs }
            }
            Ok(AddOutcome::Refused { .. }) => RateLimited::Requests { limit, retry_after_secs },
            Err(StoreError::Short(refill)) => RateLimited::Short(refill),
            Err(_) => RateLimited::Unavailable,
        };
        // Only the request allowance can have been taken before the tokens'.
        if let Some(key) = taken {
            let _ = store.add(&key, -1, window_end);
        }
        return Err(refused);
    }
    Ok(())
}

/// Why [`take_counts`] did not count.
#[derive(Debug)]
pub enum CountRefused {
    /// Counter `index` (of those asked) is at its limit: `used` counted this window.
    Full { index: usize, used: u64 },
    /// A lease must be refilled first; nothing was counted.
    Short(Box<Refill>),
    /// The store cannot count (its backend unreachable and the lease used up).
    Unavailable,
}

/// `len:text`, so that no agent or action name can make two counters' bases meet.
fn part(text: &str) -> String {
    format!("{}:{text}", text.len())
}

/// The base of the autonomy budget's daily total of `agent` (day number `day`).
pub fn autonomy_day(agent: &str, day: u64) -> String {
    format!("{COUNT}auto/{}/{day}", part(agent))
}

/// The base of the autonomy budget's daily count of `action` by `agent`.
pub fn autonomy_action(agent: &str, action: &str, day: u64) -> String {
    format!("{COUNT}auto/{}/{}/{day}", part(agent), part(action))
}

/// The base of the guardrails' count of `action` by `agent` in hour number `hour`.
pub fn action_hour(agent: &str, action: &str, hour: u64) -> String {
    format!("{COUNT}hour/{}/{}/{hour}", part(agent), part(action))
}

/// Counts one call on each of `counters` (base, limit) on a leasing store, all or none, until
/// `window_end`. `Ok` holds each counter's count this window as this holder sees it (the
/// fleet's committed total: what every holder counted or holds leased).
pub fn take_counts(
    store: &impl Store,
    counters: &[(String, u64)],
    window_end: UnixMillis,
) -> Result<Vec<u64>, CountRefused> {
    let mut taken: Vec<u64> = Vec::with_capacity(counters.len());
    let mut refused = None;
    for (i, (base, limit)) in counters.iter().enumerate() {
        let key = format!("{base}/committed");
        let limit_i = i64::try_from(*limit).unwrap_or(i64::MAX);
        match store.add_if_within(&key, 1, limit_i, window_end) {
            Ok(AddOutcome::Applied { total }) => taken.push(total.max(1) as u64),
            Ok(AddOutcome::Refused { current }) => {
                let used = (current.max(0) as u64).min(*limit);
                refused = Some(CountRefused::Full { index: i, used });
                break;
            }
            Err(StoreError::Short(refill)) => {
                refused = Some(CountRefused::Short(refill));
                break;
            }
            Err(_) => {
                refused = Some(CountRefused::Unavailable);
                break;
            }
        }
    }
    if let Some(refused) = refused {
        for (base, _) in &counters[..taken.len()] {
            let _ = store.add(&format!("{base}/committed"), -1, window_end);
        }
        return Err(refused);
    }
    // Counted for good: reported as spent at the next sync (it then leaves the lease).
    for (base, _) in counters {
        let _ = store.add(&format!("{base}/spent"), 1, window_end);
    }
    Ok(taken)
}

fn small(n: u64) -> u32 {
    n.min(u64::from(u32::MAX)) as u32
}

/// The guardrails' hourly allowance of `action` by `agent` on a leasing store (see
/// [`super::Stores::take_action_rate`]).
pub fn leased_action_rate(
    store: &impl Store,
    agent: &str,
    action: &str,
    limit: u32,
    now: UnixMillis,
) -> ActionRate {
    let window = Period::Hourly.window(now);
    let base = action_hour(agent, action, now.as_millis() / 3_600_000);
    match take_counts(store, &[(base, u64::from(limit))], window.end) {
        Ok(used) => ActionRate::Taken(small(used[0])),
        Err(CountRefused::Full { used, .. }) => {
            ActionRate::Full { used: small(used), retry_after_ms: window.end.since(now) }
        }
        Err(CountRefused::Short(refill)) => ActionRate::Short(refill),
        Err(CountRefused::Unavailable) => ActionRate::Unavailable,
    }
}

/// One unit of `agent`'s autonomy budget for `action` on a leasing store (see
/// [`super::Stores::consume_autonomy`]): both limits checked and both counts taken at once.
/// `Ok(None)`: the store cannot count; the adapter applies its outage policy.
pub fn leased_autonomy(
    store: &impl Store,
    limits: autonomy::Limits,
    agent: &str,
    action: &str,
    now: UnixMillis,
) -> Result<Option<BudgetOutcome>, Box<Refill>> {
    let day = now.as_millis() / 86_400_000;
    let mut counters = Vec::with_capacity(2);
    if let Some(n) = limits.per_day {
        counters.push((autonomy_day(agent, day), u64::from(n)));
    }
    if let Some(n) = limits.per_action {
        counters.push((autonomy_action(agent, action, day), u64::from(n)));
    }
    let end = Period::Daily.window(now).end;
    match take_counts(store, &counters, end) {
        Ok(used) => {
            let mut used = used.into_iter();
            Ok(Some(BudgetOutcome::Consumed {
                used: limits.per_day.map_or(0, |_| small(used.next().unwrap_or(0))),
                limit: limits.per_day,
                action_used: limits.per_action.map_or(0, |_| small(used.next().unwrap_or(0))),
                action_limit: limits.per_action,
            }))
        }
        Err(CountRefused::Full { index, used }) => {
            let (limit, max) = match (index, limits.per_day) {
                (0, Some(n)) => (BudgetLimit::PerDay, n),
                _ => (BudgetLimit::PerAction, limits.per_action.unwrap_or(0)),
            };
            Ok(Some(BudgetOutcome::Exhausted { limit, used: small(used), max }))
        }
        Err(CountRefused::Short(refill)) => Err(refill),
        Err(CountRefused::Unavailable) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_bases_cannot_meet() {
        assert_ne!(action_hour("a/1:b", "c", 1), action_hour("a", "1:b/c", 1));
        assert_ne!(autonomy_day("a", 1), autonomy_action("a", "", 1));
        use crate::budget::lease::Counter;
        let committed = format!("{}/committed", action_hour("a", "b", 7));
        assert!(matches!(Counter::of(&committed), Counter::Committed(_)));
        let spent = format!("{}/spent", autonomy_day("a", 7));
        assert!(matches!(Counter::of(&spent), Counter::Spent(_)));
    }

    #[test]
    fn counts_are_taken_all_or_none() {
        let store = crate::budget::MemoryStore::default();
        let end = UnixMillis(86_400_000);
        let two = [("count/x".to_string(), 5), ("count/y".to_string(), 1)];
        assert_eq!(take_counts(&store, &two, end).unwrap(), vec![1, 1]);
        let refused = take_counts(&store, &two, end);
        assert!(matches!(refused, Err(CountRefused::Full { index: 1, used: 1 })), "{refused:?}");
        assert_eq!(store.get("count/x/committed").unwrap(), 1, "the first count was given back");
        assert_eq!(store.get("count/x/spent").unwrap(), 1, "only the counted call is spent");
    }
}
