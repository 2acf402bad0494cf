//! Fleet mode in the filter (`store: {collector: {}}`): budgets spent from leases the collector
//! grants from the fleet's Redis store, with the sidecars' lease rules
//! ([`tollgate_core::budget::lease`]).
//!
//! Each VM is one lease holder. Reservations are served from its leases in memory; a request
//! the lease cannot cover waits (paused) while the VM's timer exchanges with the collector, at
//! most one exchange per counter at a time (a lease is written absolutely). The same timer
//! reports settled spend, renews leases and gives idle ones back. A VM that stops renewing
//! (Envoy restarted, the collector unreachable) loses its leases after the collector's
//! `lease_ttl`, and the fleet gets the money back.
//!
//! Holds stay in the VM's memory: a request settles in the VM that reserved it. This module
//! never talks to the host.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use tollgate_core::budget::lease::{Counter, Lease, Shortfall, SyncAnswer, SyncArgs, COUNT, RATE};
use tollgate_core::budget::{AddOutcome, Hold, MemoryStore, Refill, Store, StoreError, Taken};
use tollgate_core::time::UnixMillis;

/// One counter's lease in this VM, and its exchange in flight.
#[derive(Debug, Default)]
struct Entry {
    lease: Lease,
    /// An exchange is on its way (what it sent, and when).
    in_flight: Option<(SyncArgs, UnixMillis)>,
    /// The most a waiting request asked for, and under which limit and expiry (the next
    /// exchange asks for it).
    wanted: Option<(i64, i64, UnixMillis)>,
    /// The last exchange failed: until then, a reservation the lease cannot cover fails at
    /// once (the filter's fail policy applies) instead of waiting.
    down_until: UnixMillis,
}

/// After a failed exchange, how long requests the lease cannot cover fail at once.
pub const DOWN_FOR_MS: u64 = 1_000;

/// The lease TTL assumed until the collector names its own.
const DEFAULT_TTL_MS: u64 = 10_000;

/// The VM's leases (see the module doc).
#[derive(Debug, Default)]
pub struct LeaseStore {
    entries: RefCell<HashMap<String, Entry>>,
    local: MemoryStore,
    seq: Cell<u64>,
    /// The VM's clock as the adapter last read it (the `Store` port takes no clock; a VM is
    /// one thread): leases are checked against it.
    clock: Cell<UnixMillis>,
    /// The collector's lease TTL, from its last answer (0: not known yet).
    ttl_ms: Cell<u64>,
}

/// One exchange to send: the counter's base and what to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub counter: String,
    pub args: SyncArgs,
}

impl LeaseStore {
    /// Sets the clock leases are checked against (the adapter calls it with each request's
    /// time before deciding).
    pub fn set_now(&self, now: UnixMillis) {
        self.clock.set(now);
    }

    /// A request waits for `refill`: the next exchange of its counter asks for it.
    pub fn want(&self, refill: &Refill) {
        let Counter::Committed(base) = Counter::of(&refill.key) else { return };
        self.entry(base, |e| e.lease.waiting = e.lease.waiting.saturating_add(refill.amount));
        self.ask_for(refill);
    }

    /// The next exchange of `refill`'s counter asks for it (also for a request still waiting
    /// after an answer that did not serve it: each waiting request leads to another exchange
    /// until it is served, refused or times out).
    pub fn ask_for(&self, refill: &Refill) {
        let Counter::Committed(base) = Counter::of(&refill.key) else { return };
        if let Some(e) = self.entries.borrow_mut().get_mut(base) {
            let (amount, limit, expires) = e.wanted.unwrap_or((0, 0, UnixMillis(0)));
            e.wanted = Some((
                amount.max(refill.amount),
                limit.max(refill.limit),
                expires.max(refill.expires_at),
            ));
        }
    }

    /// A waiting request of `refill` no longer waits (resumed, or gone).
    pub fn unwait(&self, refill: &Refill) {
        let Counter::Committed(base) = Counter::of(&refill.key) else { return };
        if let Some(e) = self.entries.borrow_mut().get_mut(base) {
            e.lease.waiting = (e.lease.waiting - refill.amount).max(0);
        }
    }

    /// The exchanges due now (each counter with none in flight that has requests waiting,
    /// spend to report, a lease to renew or give back), marked in flight. `give_back`: return
    /// every free lease (the VM is stopping).
    pub fn due(
        &self,
        now: UnixMillis,
        renew_after_ms: u64,
        give_back: bool,
        slice_bp: u64,
    ) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let mut entries = self.entries.borrow_mut();
        for (base, e) in entries.iter_mut() {
            if e.in_flight.is_some() {
                continue;
            }
            let wanted = e.wanted.take();
            // An action count's lease stays while the fleet has counted at most half its limit
            // (a count is one call: giving it back and asking again would cost a round trip per
            // call), as the sidecars keep theirs.
            let counts = base.starts_with(COUNT);
            let plenty = counts && e.lease.fleet_committed.saturating_mul(2) <= e.lease.limit;
            let back = match (wanted, e.lease.sync_due(now, renew_after_ms, give_back, plenty)) {
                (Some(_), _) => false,
                (None, Some(back)) => back,
                (None, None) => continue,
            };
            let (want, limit, expires) = wanted.unwrap_or((0, 0, UnixMillis(0)));
            let seq = &self.seq;
            let whole = counts || base.starts_with(RATE);
            let args = e.lease.prepare(want, limit, expires, back, slice_bp, whole, now, || {
                seq.set(seq.get() + 1);
                seq.get()
            });
            e.in_flight = Some((args, now));
            out.push(Outgoing { counter: base.clone(), args });
        }
        out
    }

    /// Takes the collector's answer to the exchange of `counter` (`None`: it failed or was not
    /// answered). `ttl_ms` is the collector's lease TTL.
    pub fn answered(&self, counter: &str, answer: Option<SyncAnswer>, ttl_ms: u64) {
        let mut entries = self.entries.borrow_mut();
        let Some(e) = entries.get_mut(counter) else { return };
        let Some((sent, started)) = e.in_flight.take() else { return };
        match answer {
            Some(a) => {
                self.ttl_ms.set(ttl_ms);
                e.lease.applied(&sent, a, started, self.clock.get(), ttl_ms);
                e.down_until = UnixMillis(0);
            }
            None => {
                e.lease.failed();
                e.down_until = self.clock.get().saturating_add_ms(DOWN_FOR_MS);
                // The requests still waiting ask again on the next exchange.
                if sent.want > 0 && e.lease.waiting > 0 {
                    e.wanted = Some((sent.want, sent.limit, UnixMillis(sent.expires_at)));
                }
            }
        }
    }

    /// Whether the lease of `refill`'s counter can cover it now.
    pub fn covers(&self, refill: &Refill, now: UnixMillis) -> bool {
        let Counter::Committed(base) = Counter::of(&refill.key) else { return true };
        self.entries.borrow().get(base).is_some_and(|e| e.lease.covers(refill.amount, now))
    }

    /// Whether the collector recently said `refill`'s counter is exhausted (the retried
    /// reservation is then refused with the fleet's total, without waiting again).
    pub fn refused(&self, refill: &Refill, now: UnixMillis) -> bool {
        let Counter::Committed(base) = Counter::of(&refill.key) else { return false };
        self.entries
            .borrow()
            .get(base)
            .and_then(|e| e.lease.refused)
            .is_some_and(|(until, _)| until > now)
    }

    /// The collector's lease TTL (a default until it answered once).
    pub fn ttl_ms(&self) -> u64 {
        match self.ttl_ms.get() {
            0 => DEFAULT_TTL_MS,
            ttl => ttl,
        }
    }

    /// Whether the last exchange of `refill`'s counter failed a moment ago.
    pub fn down(&self, refill: &Refill, now: UnixMillis) -> bool {
        let Counter::Committed(base) = Counter::of(&refill.key) else { return false };
        self.entries.borrow().get(base).is_some_and(|e| e.down_until > now)
    }

    /// Whether an exchange of `refill`'s counter is on its way.
    pub fn in_flight(&self, refill: &Refill) -> bool {
        let Counter::Committed(base) = Counter::of(&refill.key) else { return false };
        self.entries.borrow().get(base).is_some_and(|e| e.in_flight.is_some())
    }

    /// Runs `f` on the entry of `base`, made if absent (the key is copied only then).
    fn entry<R>(&self, base: &str, f: impl FnOnce(&mut Entry) -> R) -> R {
        let mut entries = self.entries.borrow_mut();
        if let Some(e) = entries.get_mut(base) {
            return f(e);
        }
        f(entries.entry(base.to_owned()).or_default())
    }

    fn with<R>(&self, base: &str, f: impl FnOnce(&mut Lease) -> R) -> R {
        self.entry(base, |e| f(&mut e.lease))
    }
}

impl Store for LeaseStore {
    fn get(&self, key: &str) -> Result<i64, StoreError> {
        match Counter::of(key) {
            Counter::Committed(base) => Ok(self.with(base, |l| l.committed())),
            Counter::Spent(base) => Ok(self.with(base, |l| l.spent())),
            Counter::Other => self.local.get(key),
        }
    }

    fn add(&self, key: &str, delta: i64, expires_at: UnixMillis) -> Result<i64, StoreError> {
        match Counter::of(key) {
            Counter::Committed(base) => Ok(self.with(base, |l| l.add_used(delta, expires_at))),
            Counter::Spent(base) => Ok(self.with(base, |l| l.add_spent(delta))),
            Counter::Other => self.local.add(key, delta, expires_at),
        }
    }

    fn add_if_within(
        &self,
        key: &str,
        delta: i64,
        limit: i64,
        expires_at: UnixMillis,
    ) -> Result<AddOutcome, StoreError> {
        let Counter::Committed(base) = Counter::of(key) else {
            return self.local.add_if_within(key, delta, limit, expires_at);
        };
        let now = self.clock.get();
        self.entry(base, |e| match e.lease.try_take(delta, limit, expires_at, now) {
            Ok(outcome) => Ok(outcome),
            Err(Shortfall::Short) if e.down_until > now => Err(StoreError::Unavailable {
                reason: "the collector did not answer the last lease exchange".into(),
            }),
            Err(Shortfall::Short) => Err(StoreError::Short(Box::new(Refill {
                key: key.to_owned(),
                amount: delta,
                limit,
                expires_at,
            }))),
        })
    }

    fn insert_if_absent(&self, key: &str, expires_at: UnixMillis) -> Result<bool, StoreError> {
        self.local.insert_if_absent(key, expires_at)
    }

    fn put_hold(&self, hold: &Hold) -> Result<bool, StoreError> {
        self.local.put_hold(hold)
    }

    fn take_hold(&self, request_id: &str) -> Result<Taken, StoreError> {
        self.local.take_hold(request_id)
    }

    fn take_expired_holds(
        &self,
        now: UnixMillis,
        max: usize,
        lapse_until: UnixMillis,
    ) -> Result<Vec<Hold>, StoreError> {
        self.local.take_expired_holds(now, max, lapse_until)
    }

    fn prune(&self, now: UnixMillis) -> Result<usize, StoreError> {
        self.entries.borrow_mut().retain(|_, e| {
            e.in_flight.is_some()
                || e.lease.lease > 0
                || e.lease.expires_at > now
                || e.lease.expires_at.0 == 0
        });
        self.local.prune(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refill(amount: i64) -> Refill {
        Refill {
            key: "budget/2:cc/1:a/2026-12/committed".into(),
            amount,
            limit: 1_000,
            expires_at: UnixMillis(9_000_000),
        }
    }

    #[test]
    fn a_short_request_is_asked_for_once_and_a_grant_covers_it() {
        let s = LeaseStore::default();
        s.set_now(UnixMillis(1_000));
        let key = "budget/2:cc/1:a/2026-12/committed";
        let short = s.add_if_within(key, 100, 1_000, UnixMillis(9_000_000));
        let Err(StoreError::Short(r)) = short else { panic!("{short:?}") };
        s.want(&r);
        s.want(&r);
        let out = s.due(UnixMillis(1_000), 3_000, false, 100);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].counter.as_str(), out[0].args.want, out[0].args.need),
            ("2:cc/1:a/2026-12", 100, 200)
        );
        assert!(s.in_flight(&r));
        assert!(
            s.due(UnixMillis(1_010), 3_000, false, 100).is_empty(),
            "one in flight per counter"
        );
        let answer =
            SyncAnswer { lease: 250, granted: 250, committed: 250, perm: 0, lapsed: false };
        s.answered("2:cc/1:a/2026-12", Some(answer), 10_000);
        s.unwait(&r);
        s.unwait(&r);
        assert!(s.covers(&r, UnixMillis(1_020)));
        assert_eq!(
            s.add_if_within(key, 100, 1_000, UnixMillis(9_000_000)).unwrap(),
            AddOutcome::Applied { total: 100 }
        );
    }

    #[test]
    fn a_failed_exchange_asks_again_for_those_still_waiting() {
        let s = LeaseStore::default();
        let r = refill(100);
        s.want(&r);
        let out = s.due(UnixMillis(0), 3_000, false, 100);
        assert_eq!(out.len(), 1);
        s.answered(&out[0].counter, None, 10_000);
        let again = s.due(UnixMillis(10), 3_000, false, 100);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].args.want, 100);
        // Meanwhile a new reservation the lease cannot cover fails at once.
        s.set_now(UnixMillis(20));
        assert!(s.down(&r, UnixMillis(20)));
        let key = "budget/2:cc/1:a/2026-12/committed";
        assert!(matches!(
            s.add_if_within(key, 100, 1_000, UnixMillis(9_000_000)),
            Err(StoreError::Unavailable { .. })
        ));
    }

    #[test]
    fn spend_is_reported_and_an_exhausted_answer_refuses() {
        let s = LeaseStore::default();
        s.set_now(UnixMillis(0));
        let key = "budget/2:cc/1:a/2026-12/committed";
        let r = refill(100);
        s.want(&r);
        let out = s.due(UnixMillis(0), 3_000, false, 100);
        s.answered(
            &out[0].counter,
            Some(SyncAnswer { lease: 100, granted: 100, committed: 100, perm: 0, lapsed: false }),
            10_000,
        );
        s.unwait(&r);
        s.add_if_within(key, 100, 1_000, UnixMillis(9_000_000)).unwrap();
        s.add(key, -40, UnixMillis(9_000_000)).unwrap();
        s.add("budget/2:cc/1:a/2026-12/spent", 60, UnixMillis(9_000_000)).unwrap();
        let report = s.due(UnixMillis(5), 3_000, false, 100);
        assert_eq!((report[0].args.spent, report[0].args.inuse), (60, 0));
        s.answered(
            &report[0].counter,
            Some(SyncAnswer { lease: 40, granted: 0, committed: 1_000, perm: 960, lapsed: false }),
            10_000,
        );
        // Asked for more and refused: the next reservation over the free lease is refused.
        s.want(&refill(500));
        let ask = s.due(UnixMillis(6), 3_000, false, 100);
        s.answered(
            &ask[0].counter,
            Some(SyncAnswer { lease: 40, granted: 0, committed: 1_000, perm: 960, lapsed: false }),
            10_000,
        );
        s.set_now(UnixMillis(7));
        assert!(s.refused(&refill(500), UnixMillis(7)));
        assert_eq!(
            s.add_if_within(key, 500, 1_000, UnixMillis(9_000_000)).unwrap(),
            AddOutcome::Refused { current: 1_000 }
        );
    }
}
