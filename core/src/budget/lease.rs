//! One proxy's lease of a counter shared by the fleet: the bookkeeping, without the I/O.
//!
//! A fleet-wide counter (a budget, scope value and period; or a rate allowance's window) is
//! kept by a backend (Redis, reached directly by a sidecar or through the collector by the
//! Envoy filter). Each proxy holds a *lease* of it: an amount it may reserve from without
//! asking. [`Lease`] is that proxy's view: what the backend granted, what is reserved from it,
//! what was settled and not yet reported. The adapter runs one exchange with the backend at a
//! time per counter: [`Lease::prepare`] says what to send ([`SyncArgs`]), and
//! [`Lease::applied`] or [`Lease::failed`] takes the answer ([`SyncAnswer`]). The backend's
//! script grants only within the limit, so the fleet together never commits more than it.
//!
//! The same rules serve the sidecar's store and the filter's, so the two spend a fleet budget
//! identically.

use serde::{Deserialize, Serialize};

use super::store::AddOutcome;
use crate::time::UnixMillis;

/// The largest counter limit a fleet backend takes: Redis scripts compare in doubles, exact up
/// to 2^53 (in nano-USD, $9,007,199.25).
pub const MAX_LIMIT: i64 = 1 << 53;

/// How long an untouched free lease stays with the proxy before it goes back.
pub const IDLE_RETURN_MS: u64 = 1_000;

/// How long an exhausted answer from the backend is trusted before asking again.
pub const REFUSED_FOR_MS: u64 = 50;

/// The prefix of the rate-limit allowances' counters (one per clause, agent and window); their
/// base keeps it, so that their backend keys cannot meet a budget's.
pub const RATE: &str = "rate/";

/// The prefix of the action counts' counters (autonomy budgets, the guardrails' hourly counts):
/// leased like rate allowances, each counted call reported as spent.
pub const COUNT: &str = "count/";

/// What a budget engine's counter key is to a leasing store: a committed total (leased), a
/// spend total (reported), or anything else (kept locally).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter<'k> {
    /// The committed total of the counter `base`.
    Committed(&'k str),
    /// The settled spend of the counter `base`.
    Spent(&'k str),
    Other,
}

impl<'k> Counter<'k> {
    pub fn of(key: &'k str) -> Counter<'k> {
        if let Some(base) = key.strip_prefix("budget/").and_then(|k| k.strip_suffix("/committed")) {
            Counter::Committed(base)
        } else if let Some(base) = key.strip_prefix(RATE).and(key.strip_suffix("/committed")) {
            Counter::Committed(base)
        } else if let Some(base) = key.strip_prefix(COUNT).and(key.strip_suffix("/committed")) {
            Counter::Committed(base)
        } else if let Some(base) =
            key.strip_prefix("budget/").and_then(|k| k.strip_suffix("/spent"))
        {
            Counter::Spent(base)
        } else if let Some(base) = key.strip_prefix(COUNT).and(key.strip_suffix("/spent")) {
            Counter::Spent(base)
        } else {
            Counter::Other
        }
    }
}

/// What one exchange sends to the backend for one counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncArgs {
    /// The report's sequence number (0: nothing to report); the backend adds `spent` once per
    /// sequence number, so a report sent again is not counted twice.
    pub seq: u64,
    /// Settled spend to add to the fleet's total.
    pub spent: i64,
    /// Reserved from the lease and not yet reported.
    pub inuse: i64,
    /// Free lease this proxy keeps.
    pub keep: i64,
    /// The least to grant (0: ask for nothing).
    pub want: i64,
    /// The most to grant (unless the waiting requests need more).
    pub wmax: i64,
    pub limit: i64,
    /// The counter's expiry (unix ms).
    pub expires_at: u64,
    /// What the requests waiting here need together.
    pub need: i64,
}

/// The backend's answer to one exchange.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncAnswer {
    /// This proxy's lease now.
    pub lease: i64,
    pub granted: i64,
    /// The fleet's committed total: reported spend plus every live lease.
    pub committed: i64,
    /// The fleet's reported spend.
    pub perm: i64,
    /// This proxy's lease had lapsed before the exchange (it was renewed).
    pub lapsed: bool,
}

/// What [`Lease::try_take`] could not do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shortfall {
    /// The lease cannot cover it: exchange with the backend first.
    Short,
}

/// One counter's lease in one proxy.
#[derive(Clone, Debug, Default)]
pub struct Lease {
    /// What the backend holds for this proxy (as of the last exchange).
    pub lease: i64,
    /// Reserved from the lease: in-flight reservations plus settled spend not yet confirmed.
    pub used: i64,
    /// Settled spend not yet sent.
    pub unflushed: i64,
    /// Spend sent and not yet confirmed: (sequence, amount).
    pub pending: Option<(u64, i64)>,
    /// An exchange is giving the free lease back: nothing is reserved from it meanwhile.
    pub returning: bool,
    /// What the requests waiting for a refill need together.
    pub waiting: i64,
    /// Spent from a local allowance since the backend last answered; it is in `lease` and
    /// `used` like any reservation, and reaches the backend with the next report.
    pub borrowed: i64,
    pub limit: i64,
    pub expires_at: UnixMillis,
    /// The fleet's committed total and reported spend at the last exchange.
    pub fleet_committed: i64,
    pub fleet_spent: i64,
    /// The lease may be reserved from until then (renewed by each exchange).
    pub usable_until: UnixMillis,
    pub last_use: UnixMillis,
    pub last_sync: UnixMillis,
    /// The backend said the counter is exhausted (until, committed total then).
    pub refused: Option<(UnixMillis, i64)>,
    /// The last exchange failed: it may have been applied without this proxy learning of it
    /// (a grant it never saw), so the next one writes the lease again.
    pub resync: bool,
}

impl Lease {
    pub fn free(&self) -> i64 {
        self.lease - self.used
    }

    /// The fleet's committed total as this proxy sees it.
    pub fn committed(&self) -> i64 {
        self.fleet_committed - self.free().max(0)
    }

    /// The fleet's reported spend plus this proxy's unreported spend.
    pub fn spent(&self) -> i64 {
        self.fleet_spent + self.pending.map_or(0, |(_, s)| s) + self.unflushed
    }

    /// Whether the lease can cover `amount` now, without an exchange.
    pub fn covers(&self, amount: i64, now: UnixMillis) -> bool {
        !self.returning && self.usable_until > now && self.free() >= amount
    }

    /// Reserves `delta` under `limit` from the lease: `Ok` with the outcome (refused while the
    /// backend recently said the counter is exhausted), or [`Shortfall::Short`] when the lease
    /// cannot cover it (nothing changed).
    pub fn try_take(
        &mut self,
        delta: i64,
        limit: i64,
        expires_at: UnixMillis,
        now: UnixMillis,
    ) -> Result<AddOutcome, Shortfall> {
        self.limit = limit;
        self.expires_at = self.expires_at.max(expires_at);
        // Nothing to take (a free call): nothing to lease either.
        if delta <= 0 || self.covers(delta, now) {
            self.used += delta;
            self.last_use = now;
            return Ok(AddOutcome::Applied { total: self.committed() });
        }
        if let Some((until, current)) = self.refused {
            if until > now {
                return Ok(AddOutcome::Refused { current });
            }
        }
        Err(Shortfall::Short)
    }

    /// Adds `delta` to what is reserved (a release is negative); returns the committed total.
    pub fn add_used(&mut self, delta: i64, expires_at: UnixMillis) -> i64 {
        self.used = self.used.saturating_add(delta);
        self.expires_at = self.expires_at.max(expires_at);
        self.committed()
    }

    /// Adds settled spend to report; returns the spend as this proxy sees it.
    pub fn add_spent(&mut self, delta: i64) -> i64 {
        self.unflushed = self.unflushed.saturating_add(delta);
        self.spent()
    }

    /// Whether a background exchange is due (`Some(give_back)`): spend to report, a failed
    /// exchange to repeat, a lease to renew (every `renew_after_ms`), an idle free lease to give
    /// back (unless `keep_idle`), or everything to give back (`give_back`, on shutdown).
    pub fn sync_due(
        &self,
        now: UnixMillis,
        renew_after_ms: u64,
        give_back: bool,
        keep_idle: bool,
    ) -> Option<bool> {
        let idle = self.free() > 0
            && !keep_idle
            && now.0.saturating_sub(self.last_use.0) >= IDLE_RETURN_MS;
        let due = self.unflushed != 0
            || self.resync
            || self.pending.is_some()
            || self.free() < 0
            || (self.lease > 0 && now.0.saturating_sub(self.last_sync.0) >= renew_after_ms)
            || idle
            || (give_back && self.lease > 0);
        due.then_some(give_back || idle)
    }

    /// What the next exchange sends: the report (taking a new sequence number from `next_seq`
    /// when there is unreported spend and none is pending), what is in use and kept, and, when
    /// `want` > 0, a request for at least `want` more (at most `slice_bp` / 10,000 of the
    /// limit, or all of it for a rate allowance). `give_back` returns the free lease.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        &mut self,
        want: i64,
        limit: i64,
        expires_at: UnixMillis,
        give_back: bool,
        slice_bp: u64,
        rate: bool,
        now: UnixMillis,
        next_seq: impl FnOnce() -> u64,
    ) -> SyncArgs {
        if self.pending.is_none() && self.unflushed != 0 {
            self.pending = Some((next_seq(), self.unflushed));
            self.unflushed = 0;
        }
        let (seq, spent) = self.pending.unwrap_or((0, 0));
        self.limit = self.limit.max(limit);
        self.expires_at = self.expires_at.max(expires_at);
        let inuse = self.used - spent;
        let keep = if give_back || self.usable_until <= now { 0 } else { self.free().max(0) };
        self.returning = give_back;
        // The free lease kept counts towards what the waiting requests need.
        let want = if want > 0 { (want - keep).max(1) } else { 0 };
        let need = if want > 0 { (self.waiting - keep).max(want) } else { 0 };
        let limit = self.limit;
        // A rate allowance is spent by the request that takes it and comes back unused only
        // when idle: a lease of a quarter of what is left serves a burst without a round trip.
        let wmax = if want > 0 && rate {
            limit
        } else if want > 0 {
            let slice = u128::from(limit.max(0) as u64) * u128::from(slice_bp) / 10_000;
            want.max(i64::try_from(slice).unwrap_or(i64::MAX))
        } else {
            0
        };
        SyncArgs {
            seq,
            spent,
            inuse: inuse.max(0),
            keep,
            want: want.max(0),
            wmax,
            limit,
            expires_at: self.expires_at.0,
            need,
        }
    }

    /// Takes the backend's answer to the exchange `sent` began at `started`, received at
    /// `received`; the lease is usable for three quarters of `ttl_ms` from `started`, and an
    /// exhausted answer is trusted for [`REFUSED_FOR_MS`] from `received` (however long the
    /// answer took, the requests waiting for it see it).
    pub fn applied(
        &mut self,
        sent: &SyncArgs,
        answer: SyncAnswer,
        started: UnixMillis,
        received: UnixMillis,
        ttl_ms: u64,
    ) {
        self.returning = false;
        if sent.seq != 0 && self.pending.is_some_and(|(s, _)| s == sent.seq) {
            self.pending = None;
            self.used -= sent.spent;
        }
        self.lease = answer.lease;
        // What was borrowed is in `used`, so in this report's `inuse`: the backend has it now.
        self.borrowed = 0;
        self.resync = false;
        self.fleet_committed = answer.committed;
        self.fleet_spent = answer.perm;
        self.last_sync = started;
        self.usable_until = started.saturating_add_ms(ttl_ms.saturating_mul(3) / 4);
        self.refused = (sent.want > 0 && answer.granted == 0)
            .then(|| (received.max(started).saturating_add_ms(REFUSED_FOR_MS), answer.committed));
    }

    /// The exchange got no answer: it may have been applied, so the next one writes again.
    pub fn failed(&mut self) {
        self.returning = false;
        self.resync = true;
    }

    /// The backend cannot be reached: serves `amount` from a local allowance of `allowance` for
    /// this outage if it is not spent (the request that asked reserves it at once). Past its
    /// usable time the free lease may have gone to others: only the allowance is then this
    /// proxy's own.
    pub fn borrow(&mut self, amount: i64, allowance: i64, now: UnixMillis) -> bool {
        if self.borrowed.saturating_add(amount) > allowance {
            return false;
        }
        if self.usable_until <= now {
            self.lease = self.used.max(0);
            self.usable_until = now.saturating_add_ms(1_000);
        }
        self.borrowed += amount;
        self.lease += amount;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: u64 = 10_000;

    fn granted(l: &mut Lease, want: i64, limit: i64, now: u64, answer: SyncAnswer) -> SyncArgs {
        let args =
            l.prepare(want, limit, UnixMillis(99_000), false, 100, false, UnixMillis(now), || 1);
        l.applied(&args, answer, UnixMillis(now), UnixMillis(now), TTL);
        args
    }

    #[test]
    fn a_short_lease_asks_and_a_grant_covers() {
        let mut l = Lease::default();
        let t = UnixMillis(1_000);
        assert_eq!(l.try_take(5, 100, UnixMillis(99_000), t), Err(Shortfall::Short));
        let args = granted(
            &mut l,
            5,
            100,
            1_000,
            SyncAnswer { lease: 25, granted: 25, committed: 25, perm: 0, lapsed: false },
        );
        assert_eq!((args.want, args.wmax, args.need, args.limit), (5, 5, 5, 100));
        assert_eq!(l.try_take(5, 100, UnixMillis(99_000), t), Ok(AddOutcome::Applied { total: 5 }));
        assert_eq!(l.free(), 20);
        // Past three quarters of the ttl the lease is not used without renewing it.
        assert_eq!(
            l.try_take(5, 100, UnixMillis(99_000), UnixMillis(8_500)),
            Err(Shortfall::Short)
        );
    }

    #[test]
    fn spend_is_reported_once_and_leaves_the_lease() {
        let mut l = Lease::default();
        granted(
            &mut l,
            10,
            100,
            0,
            SyncAnswer { lease: 10, granted: 10, committed: 10, ..Default::default() },
        );
        l.try_take(10, 100, UnixMillis(99_000), UnixMillis(1)).unwrap();
        // Settled at 7: 3 released, 7 spent.
        l.add_used(-3, UnixMillis(99_000));
        l.add_spent(7);
        assert_eq!(l.sync_due(UnixMillis(2), 3_000, false, false), Some(false));
        let args = l.prepare(0, 100, UnixMillis(0), false, 100, false, UnixMillis(2), || 4);
        // The 3 released stay as free lease, kept.
        assert_eq!((args.seq, args.spent, args.inuse, args.keep, args.want), (4, 7, 0, 3, 0));
        // Not answered: sent again with the same sequence number.
        l.failed();
        let again = l.prepare(0, 100, UnixMillis(0), false, 100, false, UnixMillis(3), || 5);
        assert_eq!((again.seq, again.spent), (4, 7));
        l.applied(
            &again,
            SyncAnswer { lease: 3, committed: 10, perm: 7, ..Default::default() },
            UnixMillis(3),
            UnixMillis(3),
            TTL,
        );
        assert_eq!((l.used, l.lease, l.spent(), l.pending), (0, 3, 7, None));
        assert_eq!(l.sync_due(UnixMillis(4), 3_000, false, false), None);
    }

    #[test]
    fn an_exhausted_answer_that_took_long_still_refuses_for_a_moment_after_it_came() {
        let mut l = Lease::default();
        let args = l.prepare(10, 100, UnixMillis(0), false, 100, false, UnixMillis(0), || 1);
        let refused = SyncAnswer { lease: 0, granted: 0, committed: 100, perm: 100, lapsed: false };
        // Sent at 0, answered at 400 (a slow backend).
        l.applied(&args, refused, UnixMillis(0), UnixMillis(400), TTL);
        assert_eq!(
            l.try_take(10, 100, UnixMillis(0), UnixMillis(420)),
            Ok(AddOutcome::Refused { current: 100 })
        );
    }

    #[test]
    fn an_exhausted_answer_refuses_for_a_moment() {
        let mut l = Lease::default();
        granted(
            &mut l,
            10,
            100,
            0,
            SyncAnswer { lease: 0, granted: 0, committed: 95, perm: 95, lapsed: false },
        );
        assert_eq!(
            l.try_take(10, 100, UnixMillis(99_000), UnixMillis(10)),
            Ok(AddOutcome::Refused { current: 95 })
        );
        assert_eq!(
            l.try_take(10, 100, UnixMillis(99_000), UnixMillis(REFUSED_FOR_MS)),
            Err(Shortfall::Short)
        );
    }

    #[test]
    fn the_slice_bounds_a_grant_and_a_rate_takes_what_is_left() {
        let budget = Lease::default().prepare(
            1,
            1_000_000,
            UnixMillis(0),
            false,
            100,
            false,
            UnixMillis(0),
            || 1,
        );
        assert_eq!(budget.wmax, 10_000, "1 % of the limit");
        let rate =
            Lease::default().prepare(1, 60, UnixMillis(0), false, 100, true, UnixMillis(0), || 1);
        assert_eq!(rate.wmax, 60);
    }

    #[test]
    fn a_local_allowance_is_bounded() {
        let mut l = Lease::default();
        assert!(l.borrow(30, 50, UnixMillis(0)));
        assert!(!l.borrow(30, 50, UnixMillis(0)), "30 + 30 > 50");
        assert!(l.borrow(20, 50, UnixMillis(0)));
        assert_eq!(l.lease, 50);
    }
}
