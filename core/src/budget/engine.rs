//! The budget accounting: reserve before forwarding, settle at the actual cost after the
//! response, release what was not used, and give back reservations nobody settled.
//!
//! Each applicable budget has two counters per period window, both in nano-USD: *committed*
//! (spent + reserved, the one the limit is checked against, with [`Store::add_if_within`]) and
//! *spent*. A reservation adds the worst-case cost to every applicable committed counter, all or
//! nothing; a settlement adds `actual − reserved` to committed and `actual` to spent. Because
//! the limit check is one atomic step on one counter, N concurrent requests can never reserve
//! more than a budget. Settling may push a budget past its limit only by what the provider
//! actually charged above the estimate: that money was spent, so it is recorded, never dropped,
//! and the budget then refuses every further reservation until its period ends.
//!
//! This module decides which budgets apply and whether they have room; it never prices a
//! request (the caller passes the amount), never reads a clock (`now` is a parameter) and never
//! runs anything in the background: the owner calls [`Budgets::expire`] periodically.

use super::store::{AddOutcome, Hold, HoldEntry, Store, StoreError, Taken};
use super::{BudgetSpec, Scope};
use crate::money::Money;
use crate::time::{Period, UnixMillis, Window};

/// Utilisation thresholds in basis points (80 %, 95 %, 100 % of the limit) at which a
/// settlement reports a [`Warning`]. At 100 % the budget also refuses further reservations.
pub const WARNING_THRESHOLDS_BP: [u64; 3] = [8_000, 9_500, 10_000];

/// How long counters outlive their window: long enough for a late settlement to find them,
/// short enough for memory to be reclaimed.
pub const RETENTION_MS: u64 = 24 * 3_600_000;

/// How long a replay marker ([`Budgets::charge`]) is kept: charges without a reservation come
/// from replaying a ledger at start, and a duplicate can only come from the same replay.
pub const MARKER_RETENTION_MS: u64 = 10 * 60_000;

/// How long a lapsed reservation stays settleable after its expiry: a request that outlives
/// its reservation by up to this long is still charged (once) when it finishes. Only lapsed
/// reservations leave a mark, so this costs memory in proportion to lapses, not requests.
pub const LAPSE_RETENTION_MS: u64 = RETENTION_MS;

/// The scope value a [`Scope::Global`] budget without a fixed key is counted and reported under.
pub const GLOBAL_VALUE: &str = "*";

/// How many expired holds [`Budgets::expire`] takes from the store per call to it.
const EXPIRE_BATCH: usize = 256;

/// The budget accounting over a [`Store`].
#[derive(Debug, Default)]
pub struct Budgets<S> {
    store: S,
}

/// Budget held for one request between [`Budgets::reserve`] and [`Budgets::settle`] (or
/// [`Budgets::release`]).
///
/// It records the period window each budget was reserved in, so the settlement lands in that
/// same window even when the period rolls over while the response streams: a request that
/// started at 23:59:59 is paid from the day it started. Cloning is allowed (an adapter may keep
/// a copy to settle from a drop guard); settling is idempotent by request id, so a clone can
/// never charge twice.
#[must_use = "a reservation holds budget until it is settled or released"]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    request_id: String,
    amount: Money,
    expires_at: UnixMillis,
    budgets: Vec<ReservedBudget>,
}

/// One budget a [`Reservation`] holds money on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservedBudget {
    pub budget_id: String,
    pub scope: Scope,
    /// The scope value counted (the agent id, say; [`GLOBAL_VALUE`] for a global budget).
    pub key: String,
    pub period: Period,
    /// The period window at reservation time, e.g. `2026-11-22`.
    pub period_key: String,
    pub window: Window,
    pub limit: Money,
    committed_key: String,
    spent_key: String,
    retain_until: UnixMillis,
}

/// Why a reservation was not made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    /// The request's worst-case cost does not fit in this budget; no budget was charged.
    #[error(
        "budget `{budget_id}` ({} `{key}`, {period} {period_key}) has {spent_and_reserved} of \
         {limit} USD spent or reserved; {requested} more does not fit",
        .scope.as_str()
    )]
    Exceeded {
        budget_id: String,
        scope: Scope,
        key: String,
        period: Period,
        period_key: String,
        limit: Money,
        spent_and_reserved: Money,
        requested: Money,
    },
    /// The request id already holds a reservation; request ids must be unique.
    #[error("request `{request_id}` already holds a budget reservation")]
    DuplicateRequest { request_id: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a settlement did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settlement {
    pub outcome: SettleOutcome,
    /// The cost added to the spend of every applicable budget (zero for a duplicate).
    pub charged: Money,
    /// Thresholds this settlement carried a budget across, in budget order then threshold
    /// order. Each crossing is reported by exactly one settlement.
    pub warnings: Vec<Warning>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SettleOutcome {
    /// The reserved amount was replaced by the actual cost.
    Settled,
    /// The reservation had already expired and been given back; the actual cost was charged in
    /// full (it was still spent).
    SettledAfterExpiry,
    /// This request id was already settled or released: nothing changed.
    Duplicate,
}

/// A budget crossed a utilisation threshold.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Warning {
    pub budget_id: String,
    pub scope: Scope,
    pub key: String,
    pub period: Period,
    pub period_key: String,
    /// 8000, 9500 or 10000 (see [`WARNING_THRESHOLDS_BP`]).
    pub threshold_bp: u64,
    pub spent: Money,
    pub limit: Money,
}

/// A budget's state in the current window, for the admin API and metrics.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BudgetStatus {
    pub budget_id: String,
    pub scope: Scope,
    pub key: String,
    pub period: Period,
    pub period_key: String,
    #[serde(serialize_with = "rfc3339")]
    pub window_start: UnixMillis,
    #[serde(serialize_with = "rfc3339")]
    pub window_end: UnixMillis,
    pub limit: Money,
    pub spent: Money,
    /// Held by open reservations.
    pub reserved: Money,
    /// `limit − spent − reserved`, never below zero.
    pub remaining: Money,
    /// `spent / limit` in basis points, rounded down (may pass 10 000 after an overrun).
    pub utilization_bp: u64,
}

fn rfc3339<S: serde::Serializer>(t: &UnixMillis, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(t)
}

impl Reservation {
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The worst-case cost reserved on each budget.
    pub fn amount(&self) -> Money {
        self.amount
    }

    /// When the reservation lapses and [`Budgets::expire`] may give it back.
    pub fn expires_at(&self) -> UnixMillis {
        self.expires_at
    }

    /// The budgets held, in spec order. Empty when no budget applied.
    pub fn budgets(&self) -> &[ReservedBudget] {
        &self.budgets
    }
}

impl<S: Store> Budgets<S> {
    pub fn new(store: S) -> Self {
        Budgets { store }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Reserves `amount` (the request's worst-case cost; negative counts as zero) against every
    /// spec that applies to the request, all or nothing, held until `now + ttl_ms`.
    ///
    /// Which specs apply: a [`Scope::Global`] spec always applies, counted under its `key` or
    /// [`GLOBAL_VALUE`] (`values(Scope::Global)` is ignored). Any other spec applies when
    /// `values(spec.scope)` gives a non-empty value for the request and, if the spec has a fixed
    /// `key`, that value equals it; with `key: None` each distinct value has its own budget. A
    /// request without a value for a scope (no project, say) is not counted by that scope's
    /// budgets; attribution decides whether such a request may proceed at all.
    ///
    /// If a budget refuses, the budgets already reserved are given back and
    /// [`BudgetError::Exceeded`] names the refusing one. When nothing applies, the reservation
    /// is empty and nothing is stored.
    pub fn reserve<'s, 'v>(
        &self,
        specs: impl IntoIterator<Item = &'s BudgetSpec>,
        values: impl Fn(Scope) -> Option<&'v str>,
        amount: Money,
        request_id: &str,
        now: UnixMillis,
        ttl_ms: u64,
    ) -> Result<Reservation, BudgetError> {
        let amount = amount.max(Money::ZERO);
        let expires_at = now.saturating_add_ms(ttl_ms);
        let mut budgets = Vec::new();
        for spec in specs {
            let Some(value) = applicable_value(spec, values(spec.scope)) else { continue };
            let budget = ReservedBudget::new(spec, value, now, expires_at);
            let outcome = self.store.add_if_within(
                &budget.committed_key,
                amount.nanos(),
                spec.amount.nanos(),
                budget.retain_until,
            );
            match outcome {
                Ok(AddOutcome::Applied { .. }) => budgets.push(budget),
                Ok(AddOutcome::Refused { current }) => {
                    self.roll_back(request_id, &budgets, amount, expires_at);
                    return Err(BudgetError::Exceeded {
                        budget_id: budget.budget_id,
                        scope: budget.scope,
                        key: budget.key,
                        period: budget.period,
                        period_key: budget.period_key,
                        limit: budget.limit,
                        spent_and_reserved: Money::from_nanos(current),
                        requested: amount,
                    });
                }
                Err(err) => {
                    self.roll_back(request_id, &budgets, amount, expires_at);
                    return Err(err.into());
                }
            }
        }
        if !budgets.is_empty() {
            let hold = Hold {
                request_id: request_id.to_owned(),
                expires_at,
                entries: budgets
                    .iter()
                    .map(|b| HoldEntry { key: b.committed_key.clone(), amount: amount.nanos() })
                    .collect(),
            };
            match self.store.put_hold(&hold) {
                Ok(true) => {}
                Ok(false) => {
                    // The existing hold belongs to the other reservation: give back ours only.
                    self.roll_back(request_id, &budgets, amount, expires_at);
                    return Err(BudgetError::DuplicateRequest { request_id: request_id.into() });
                }
                Err(err) => {
                    self.roll_back(request_id, &budgets, amount, expires_at);
                    return Err(err.into());
                }
            }
        }
        Ok(Reservation { request_id: request_id.to_owned(), amount, expires_at, budgets })
    }

    /// Replaces the reservation by the `actual` cost (negative counts as zero) on every budget
    /// it holds, and reports the warning thresholds this crossed.
    ///
    /// `actual` may exceed the reserved amount (the provider reported more output than the
    /// estimate allowed for): the real cost is recorded in full. If the reservation had already
    /// expired, the actual cost is still charged ([`SettleOutcome::SettledAfterExpiry`]) if the
    /// settlement comes within [`LAPSE_RETENTION_MS`] of the expiry sweep that gave it back.
    /// Idempotent by request id: a second settlement (or one after [`Budgets::release`])
    /// changes nothing and returns [`SettleOutcome::Duplicate`].
    ///
    /// On a store error the settlement may be partly applied and must not be retried (a retry
    /// would report a duplicate): the request's own ledger record still carries its cost, and
    /// a hold not yet taken comes back at expiry. A store error never charges twice.
    pub fn settle(
        &self,
        reservation: Reservation,
        actual: Money,
    ) -> Result<Settlement, StoreError> {
        let actual = actual.max(Money::ZERO);
        let Reservation { request_id, budgets, .. } = reservation;
        if budgets.is_empty() {
            return Ok(Settlement {
                outcome: SettleOutcome::Settled,
                charged: actual,
                warnings: vec![],
            });
        }
        // Taking the hold is the idempotency step: exactly one settlement (or release) obtains
        // it, or the lapse mark the expiry sweep left in its place; a repeat finds neither.
        let (hold, outcome) = match self.store.take_hold(&request_id)? {
            Taken::Open(hold) => (Some(hold), SettleOutcome::Settled),
            Taken::Lapsed => (None, SettleOutcome::SettledAfterExpiry),
            Taken::Absent => return Ok(Settlement::duplicate()),
        };
        let mut warnings = Vec::new();
        for budget in &budgets {
            let held = hold
                .as_ref()
                .and_then(|h| h.entries.iter().find(|e| e.key == budget.committed_key))
                .map_or(0, |e| e.amount);
            budget.charge(&self.store, actual, held, &mut warnings)?;
        }
        Ok(Settlement { outcome, charged: actual, warnings })
    }

    /// Gives the whole reservation back (the request was not forwarded). Returns `true` if it
    /// was still held; `false` if it had expired or the request was already settled or
    /// released. A later settlement of the same request id is a duplicate.
    pub fn release(&self, reservation: Reservation) -> Result<bool, StoreError> {
        if reservation.budgets.is_empty() {
            return Ok(false);
        }
        match self.store.take_hold(&reservation.request_id)? {
            Taken::Open(hold) => {
                self.give_back(&hold)?;
                Ok(true)
            }
            Taken::Lapsed | Taken::Absent => Ok(false),
        }
    }

    /// Records `actual` against every applicable budget without a reservation (metering only,
    /// or replaying a ledger), idempotent by request id like [`Budgets::settle`]. Never refuses:
    /// the money was already spent. Budgets apply as in [`Budgets::reserve`], in the window of
    /// `now`.
    pub fn charge<'s, 'v>(
        &self,
        specs: impl IntoIterator<Item = &'s BudgetSpec>,
        values: impl Fn(Scope) -> Option<&'v str>,
        actual: Money,
        request_id: &str,
        now: UnixMillis,
    ) -> Result<Settlement, StoreError> {
        let actual = actual.max(Money::ZERO);
        let mut marked = false;
        let mut warnings = Vec::new();
        for spec in specs {
            let Some(value) = applicable_value(spec, values(spec.scope)) else { continue };
            if !marked {
                let until = now.saturating_add_ms(MARKER_RETENTION_MS);
                if !self.store.insert_if_absent(&marker_key(request_id), until)? {
                    return Ok(Settlement::duplicate());
                }
                marked = true;
            }
            ReservedBudget::new(spec, value, now, now).charge(
                &self.store,
                actual,
                0,
                &mut warnings,
            )?;
        }
        Ok(Settlement { outcome: SettleOutcome::Settled, charged: actual, warnings })
    }

    /// Gives back every reservation whose expiry is at or before `now` (requests that crashed
    /// or were never settled), then drops counters and markers past their retention. Returns
    /// the holds given back. Call it periodically (a timer in the proxy, `on_tick` in Envoy).
    pub fn expire(&self, now: UnixMillis) -> Result<Vec<Hold>, StoreError> {
        let mut released = Vec::new();
        loop {
            let lapse_until = now.saturating_add_ms(LAPSE_RETENTION_MS);
            let batch = self.store.take_expired_holds(now, EXPIRE_BATCH, lapse_until)?;
            let full = batch.len() >= EXPIRE_BATCH;
            let mut batch = batch.into_iter();
            while let Some(hold) = batch.next() {
                if let Err(err) = self.give_back(&hold) {
                    // Keep the holds not yet returned so that the next sweep retries them.
                    for rest in batch {
                        let _ = self.store.put_hold(&rest);
                    }
                    return Err(err);
                }
                released.push(hold);
            }
            if !full {
                break;
            }
        }
        self.store.prune(now)?;
        Ok(released)
    }

    /// The state of `spec` for scope value `value` in the window containing `now`. `value` is
    /// ignored for a global budget and for a spec with a fixed key.
    pub fn status(
        &self,
        spec: &BudgetSpec,
        value: &str,
        now: UnixMillis,
    ) -> Result<BudgetStatus, StoreError> {
        let value = match (&spec.key, spec.scope) {
            (Some(key), _) => key.as_str(),
            (None, Scope::Global) => GLOBAL_VALUE,
            (None, _) => value,
        };
        let budget = ReservedBudget::new(spec, value, now, now);
        let committed = Money::from_nanos(self.store.get(&budget.committed_key)?);
        let spent = Money::from_nanos(self.store.get(&budget.spent_key)?);
        // The two counters are read at different instants; a settlement in between can make
        // their difference briefly negative.
        let reserved = (committed - spent).max(Money::ZERO);
        Ok(BudgetStatus {
            budget_id: budget.budget_id,
            scope: budget.scope,
            key: budget.key,
            period: budget.period,
            period_key: budget.period_key,
            window_start: budget.window.start,
            window_end: budget.window.end,
            limit: budget.limit,
            spent,
            reserved,
            remaining: (budget.limit - spent - reserved).max(Money::ZERO),
            utilization_bp: spent.basis_points_of(budget.limit),
        })
    }

    /// Gives back the amounts of `reserved` after a refusal. A counter that cannot be corrected
    /// now is recorded as a hold so that expiry corrects it later.
    fn roll_back(
        &self,
        request_id: &str,
        reserved: &[ReservedBudget],
        amount: Money,
        expires_at: UnixMillis,
    ) {
        let mut stuck = Vec::new();
        for budget in reserved {
            if self.store.add(&budget.committed_key, -amount.nanos(), UnixMillis(0)).is_err() {
                stuck.push(HoldEntry { key: budget.committed_key.clone(), amount: amount.nanos() });
            }
        }
        if !stuck.is_empty() {
            // Best effort: the store just failed, and the caller gets the refusal either way.
            let _ = self.store.put_hold(&Hold {
                request_id: request_id.to_owned(),
                expires_at,
                entries: stuck,
            });
        }
    }

    /// Subtracts a taken hold's amounts; on failure puts back the part not yet returned.
    fn give_back(&self, hold: &Hold) -> Result<(), StoreError> {
        for (i, entry) in hold.entries.iter().enumerate() {
            if let Err(err) = self.store.add(&entry.key, -entry.amount, UnixMillis(0)) {
                let rest = Hold { entries: hold.entries[i..].to_vec(), ..hold.clone() };
                let _ = self.store.put_hold(&rest);
                return Err(err);
            }
        }
        Ok(())
    }
}

impl Settlement {
    fn duplicate() -> Self {
        Settlement { outcome: SettleOutcome::Duplicate, charged: Money::ZERO, warnings: vec![] }
    }
}

impl ReservedBudget {
    /// The budget `spec` for scope value `value` in the window containing `now`, its counters
    /// kept until `hold_until` (the reservation's expiry) plus retention, if that is later than
    /// the window's end.
    fn new(spec: &BudgetSpec, value: &str, now: UnixMillis, hold_until: UnixMillis) -> Self {
        let period_key = spec.period.key(now);
        let window = spec.period.window(now);
        let base = counter_base(&spec.id, value, &period_key);
        ReservedBudget {
            budget_id: spec.id.clone(),
            scope: spec.scope,
            key: value.to_owned(),
            period: spec.period,
            window,
            limit: spec.amount,
            committed_key: format!("{base}/committed"),
            spent_key: format!("{base}/spent"),
            period_key,
            retain_until: window.end.max(hold_until).saturating_add_ms(RETENTION_MS),
        }
    }

    /// Moves `held` nano-USD of reservation to `actual` spend and collects the thresholds the
    /// spend crossed.
    fn charge(
        &self,
        store: &impl Store,
        actual: Money,
        held: i64,
        warnings: &mut Vec<Warning>,
    ) -> Result<(), StoreError> {
        let delta = actual.nanos().saturating_sub(held);
        if delta != 0 {
            store.add(&self.committed_key, delta, self.retain_until)?;
        }
        if actual.is_zero() {
            return Ok(());
        }
        // The spent counter's atomic add orders concurrent settlements: the one whose add
        // carries the total across a threshold is the only one that sees the crossing.
        let after =
            Money::from_nanos(store.add(&self.spent_key, actual.nanos(), self.retain_until)?);
        let before = after - actual;
        let (from, to) = (before.basis_points_of(self.limit), after.basis_points_of(self.limit));
        for threshold_bp in WARNING_THRESHOLDS_BP {
            if from < threshold_bp && threshold_bp <= to {
                warnings.push(Warning {
                    budget_id: self.budget_id.clone(),
                    scope: self.scope,
                    key: self.key.clone(),
                    period: self.period,
                    period_key: self.period_key.clone(),
                    threshold_bp,
                    spent: after,
                    limit: self.limit,
                });
            }
        }
        Ok(())
    }
}

/// The scope value `spec` counts this request under, if the spec applies to it.
/// `value` is the request's value for `spec.scope`; it is ignored for a global spec.
fn applicable_value<'a>(spec: &'a BudgetSpec, value: Option<&'a str>) -> Option<&'a str> {
    if spec.scope == Scope::Global {
        return Some(spec.key.as_deref().unwrap_or(GLOBAL_VALUE));
    }
    let value = value.filter(|v| !v.is_empty())?;
    match &spec.key {
        Some(key) if key != value => None,
        _ => Some(value),
    }
}

/// The counter key prefix of one budget, scope value and window. Ids and values are
/// length-prefixed, so no request-supplied value can make two budgets share a counter.
fn counter_base(budget_id: &str, value: &str, period_key: &str) -> String {
    format!("budget/{}:{budget_id}/{}:{value}/{period_key}", budget_id.len(), value.len())
}

fn marker_key(request_id: &str) -> String {
    format!("budget-settled/{request_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_keys_cannot_collide_through_separators() {
        let a = counter_base("team", "a/5:x", "2026-11");
        let b = counter_base("team/5:a", "x", "2026-11");
        assert_ne!(a, b);
        assert_eq!(
            counter_base("daily", "agent-7", "2026-11-22"),
            "budget/5:daily/7:agent-7/2026-11-22"
        );
    }
}
