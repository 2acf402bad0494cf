//! The circuit breaker: stop sending calls to an upstream that keeps failing,
//! and try it again carefully.
//!
//! Closed: calls pass; `failure_threshold` consecutive failures open the breaker (a success
//! resets the count). Open: calls fail fast until `open_for_ms` has passed since opening. Then
//! half-open: exactly **one** probe is let through and every other call still fails fast; the
//! probe's success closes the breaker (counts reset), its failure opens it again for another
//! `open_for_ms`. A probe whose outcome is never reported (the client went away) is given up
//! after `open_for_ms`, and the next call becomes the new probe, so a lost probe cannot wedge
//! the breaker half-open forever.
//!
//! A pure state machine: time is passed in, nothing is shared. The sidecar keeps one breaker per
//! upstream (behind its own lock) and reports each admitted call's outcome. The Envoy filter
//! keeps them in shared data, which cannot delete keys: the upstreams are spread over a fixed
//! set of [`SLOTS`] keys by a stable hash ([`Slot::index`]), each one [`Slot`] record holding
//! its upstreams' states, updated with a compare-and-swap; the rules are this module's.
//!
//! The filter's `tollgate_circuit_breaker_state{upstream}` is one Envoy stat per upstream that
//! every VM of the Envoy moves by deltas, never sets. Every change of an upstream's state is one
//! successful compare-and-swap of its slot, and that write says by how much the upstream's gauge
//! moves ([`Changed::gauge`]): the VM that made it adds exactly that, so the stat is the sum of
//! the transitions, which is the state's [`State::gauge`] value, whichever worker made them and
//! across plugin reloads (shared data and stats outlive a VM). Only upstreams the slot lists as
//! gauged have a series (at most [`Slot::GAUGED`] per slot, listed the first time they open and
//! never unlisted), so clients inventing authorities cannot grow the number of series.

use super::escalation::Outcome;
use crate::doc::{Cx, Field};
use crate::time::UnixMillis;

/// Breaker settings. Defaults: 5 failures, 60 s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub open_for_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig { failure_threshold: 5, open_for_ms: 60_000 }
    }
}

impl BreakerConfig {
    /// Decodes `{failure_threshold: 5, open_for: 60s}`, each optional.
    pub fn decode(cx: &mut Cx, field: &Field<'_>) -> BreakerConfig {
        let mut c = BreakerConfig::default();
        let Some(mut obj) = cx.object(field) else { return c };
        if let Some(f) = obj.get("failure_threshold") {
            match f.u64(cx).map(u32::try_from) {
                Some(Ok(n)) if n > 0 => c.failure_threshold = n,
                Some(_) => f.error(cx, "must be a positive integer"),
                None => {}
            }
        }
        if let Some(ms) = obj.get("open_for").and_then(|f| f.duration_ms(cx)) {
            c.open_for_ms = ms;
        }
        obj.finish(cx, &["failure_threshold", "open_for"]);
        c
    }
}

/// The breaker's state, for metrics and explanations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    /// The value of `tollgate_circuit_breaker_state`: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open => 2,
        }
    }
}

/// Whether a call may go to the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a permitted call's outcome must be reported with on_success or on_failure"]
pub enum Admission {
    Permit,
    /// Fail fast (`circuit_open`); try again in `retry_after_ms`.
    Rejected {
        retry_after_ms: u64,
    },
}

impl Admission {
    pub const REASON: &'static str = "circuit_open";
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inner {
    Closed { failures: u32 },
    Open { until: u64 },
    HalfOpen { probe_started: u64 },
}

/// One upstream's circuit breaker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Breaker {
    config: BreakerConfig,
    inner: Inner,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Breaker { config, inner: Inner::Closed { failures: 0 } }
    }

    pub fn state(&self) -> State {
        match self.inner {
            Inner::Closed { .. } => State::Closed,
            Inner::Open { .. } => State::Open,
            Inner::HalfOpen { .. } => State::HalfOpen,
        }
    }

    /// Consecutive failures counted while closed.
    pub fn failures(&self) -> u32 {
        match self.inner {
            Inner::Closed { failures } => failures,
            _ => 0,
        }
    }

    /// Admits a call at `now`, moving from open to half-open when the time has come.
    pub fn allow(&mut self, now: UnixMillis) -> Admission {
        let now = now.as_millis();
        match self.inner {
            Inner::Closed { .. } => Admission::Permit,
            Inner::Open { until } if now < until => {
                Admission::Rejected { retry_after_ms: until - now }
            }
            Inner::Open { .. } => {
                self.inner = Inner::HalfOpen { probe_started: now };
                Admission::Permit
            }
            Inner::HalfOpen { probe_started } => {
                let given_up_at = probe_started.saturating_add(self.config.open_for_ms);
                if now < given_up_at {
                    Admission::Rejected { retry_after_ms: given_up_at - now }
                } else {
                    self.inner = Inner::HalfOpen { probe_started: now };
                    Admission::Permit
                }
            }
        }
    }

    /// Reports an admitted call's success: closed stays closed with the count reset, a probe's
    /// success closes the breaker. A late success while open changes nothing.
    pub fn on_success(&mut self, _now: UnixMillis) {
        match self.inner {
            Inner::Closed { .. } | Inner::HalfOpen { .. } => {
                self.inner = Inner::Closed { failures: 0 };
            }
            Inner::Open { .. } => {}
        }
    }

    /// Reports an admitted call's failure: counts towards opening while closed, reopens from
    /// half-open. A late failure while open does not extend the open period. Returns whether
    /// this failure opened the breaker (from closed or half-open): the moment to alert on.
    pub fn on_failure(&mut self, now: UnixMillis) -> bool {
        let until = now.as_millis().saturating_add(self.config.open_for_ms);
        match self.inner {
            Inner::Closed { failures } => {
                let failures = failures.saturating_add(1);
                let opens = failures >= self.config.failure_threshold.max(1);
                self.inner = if opens { Inner::Open { until } } else { Inner::Closed { failures } };
                opens
            }
            Inner::HalfOpen { .. } => {
                self.inner = Inner::Open { until };
                true
            }
            Inner::Open { .. } => false,
        }
    }

    /// Reports an admitted call's result: a provider error (5xx, 429, 408, no answer; see
    /// [`Outcome::of_status`]) is a failure, anything else (a 4xx that is the caller's doing
    /// included: the upstream answered) a success. Returns whether it opened the breaker
    /// ([`Breaker::on_failure`]).
    pub fn on_outcome(&mut self, outcome: Outcome, now: UnixMillis) -> bool {
        match outcome {
            Outcome::ProviderError => self.on_failure(now),
            Outcome::Success | Outcome::AgentError => {
                self.on_success(now);
                false
            }
        }
    }

    /// How long an opening keeps the breaker open (`open_for`).
    pub fn open_for_ms(&self) -> u64 {
        self.config.open_for_ms
    }

    /// Closes the breaker by hand (an operator's reset).
    pub fn reset(&mut self) {
        self.inner = Inner::Closed { failures: 0 };
    }
}

/// How many shared-data keys the Envoy filter spreads its upstreams' breakers over.
pub const SLOTS: usize = 64;

/// One shared-data record of breakers: the upstreams whose name hashes to it, each with its
/// state, and the upstreams that have a gauge. Pure: decoding, the [`Breaker`] rules and
/// encoding only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    entries: Vec<(String, Inner)>,
    /// The upstreams with a `tollgate_circuit_breaker_state` series, in the order they first
    /// left closed; never shrinks, at most [`Slot::GAUGED`].
    gauged: Vec<String>,
}

/// What an operation did to a slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// The record changed: write it (with a compare-and-swap).
    pub write: bool,
    /// Once that write succeeded, the upstream's `tollgate_circuit_breaker_state` series moves by
    /// this much (never `Some(0)`); `None`: its state did not change, or it has no series.
    pub gauge: Option<i64>,
}

impl Slot {
    /// Upstreams one slot keeps at most; an upstream beyond that has no breaker (its calls
    /// pass), as the number of keys shared data holds must stay bounded.
    pub const CAPACITY: usize = 16;

    /// Upstreams of one slot with a gauge at most ([`SLOTS`] times this series in all); one
    /// beyond that opens and closes as the others, without a series.
    pub const GAUGED: usize = 4;

    /// The slot of `upstream` (FNV-1a, stable across builds and workers).
    pub fn index(upstream: &str) -> usize {
        (crate::risk::history::fnv1a(upstream) % SLOTS as u64) as usize
    }

    fn breaker(&self, upstream: &str, config: BreakerConfig) -> Option<Breaker> {
        let (_, inner) = self.entries.iter().find(|(u, _)| u == upstream)?;
        Some(Breaker { config, inner: *inner })
    }

    fn put(&mut self, upstream: &str, b: &Breaker) -> bool {
        if let Some(e) = self.entries.iter_mut().find(|(u, _)| u == upstream) {
            e.1 = b.inner;
            return true;
        }
        if self.entries.len() >= Slot::CAPACITY {
            return false;
        }
        self.entries.push((upstream.to_owned(), b.inner));
        true
    }

    /// The state of `upstream`'s breaker and its consecutive failures (closed with none when
    /// the slot does not hold it).
    pub fn state(&self, upstream: &str) -> (State, u32) {
        let b = self.breaker(upstream, BreakerConfig::default());
        b.map_or((State::Closed, 0), |b| (b.state(), b.failures()))
    }

    /// The upstreams with a gauge, in the order they were first gauged.
    pub fn gauged(&self) -> &[String] {
        &self.gauged
    }

    /// The gauge move of `upstream` going from state value `before` to `after`, listing it
    /// as gauged when it first leaves closed and the slot has room: the series of an unlisted
    /// upstream is 0 (never moved), so the first move brings it to `after`.
    fn gauge(&mut self, upstream: &str, before: i64, after: i64) -> Option<i64> {
        if before == after {
            return None;
        }
        if self.gauged.iter().any(|u| u == upstream) {
            return Some(after - before);
        }
        if after == 0 || self.gauged.len() >= Slot::GAUGED {
            return None;
        }
        self.gauged.push(upstream.to_owned());
        Some(after)
    }

    /// [`Breaker::allow`] for `upstream`, and what it changed (open → half-open when the time
    /// has come).
    pub fn allow(
        &mut self,
        upstream: &str,
        config: BreakerConfig,
        now: UnixMillis,
    ) -> (Admission, Changed) {
        let Some(mut b) = self.breaker(upstream, config) else {
            // A closed breaker is stored only once a failure counts.
            return (Admission::Permit, Changed::default());
        };
        let (before, was) = (b.inner, b.state().gauge());
        let admission = b.allow(now);
        if b.inner == before {
            return (admission, Changed::default());
        }
        self.put(upstream, &b);
        let gauge = self.gauge(upstream, was, b.state().gauge());
        (admission, Changed { write: true, gauge })
    }

    /// [`Breaker::on_outcome`] for `upstream`: whether it opened the breaker, and what it
    /// changed. A closed breaker without failures is dropped from the slot, so the slot holds
    /// only the upstreams that are failing (its gauge, if it has one, stays listed, at 0).
    pub fn on_outcome(
        &mut self,
        upstream: &str,
        config: BreakerConfig,
        outcome: Outcome,
        now: UnixMillis,
    ) -> (bool, Changed) {
        let stored = self.breaker(upstream, config);
        let mut b = stored.clone().unwrap_or_else(|| Breaker::new(config));
        let opened = b.on_outcome(outcome, now);
        if stored.as_ref() == Some(&b) {
            return (opened, Changed::default());
        }
        let was = stored.as_ref().map_or(0, |s| s.state().gauge());
        if b.inner == (Inner::Closed { failures: 0 }) {
            self.entries.retain(|(u, _)| u != upstream);
            let gauge = self.gauge(upstream, was, 0);
            return (opened, Changed { write: stored.is_some(), gauge });
        }
        if !self.put(upstream, &b) {
            // Full: this upstream has no breaker, so nothing opened.
            return (false, Changed::default());
        }
        let gauge = self.gauge(upstream, was, b.state().gauge());
        (opened, Changed { write: true, gauge })
    }

    /// Decodes a stored slot (empty bytes: an empty slot). `None`: not a slot.
    pub fn decode(bytes: &[u8]) -> Option<Slot> {
        crate::slot::decode(bytes, |r| {
            let entries = r.list(|r| {
                let upstream = r.str()?.to_owned();
                let inner = match (r.u8()?, r.u64()?) {
                    (0, failures) => Inner::Closed { failures: u32::try_from(failures).ok()? },
                    (1, until) => Inner::Open { until },
                    (2, probe_started) => Inner::HalfOpen { probe_started },
                    _ => return None,
                };
                Some((upstream, inner))
            })?;
            // The gauged upstreams follow, when there are any (a slot written before gauges
            // has none).
            let gauged =
                if r.is_empty() { Vec::new() } else { r.list(|r| r.str().map(str::to_owned))? };
            Some(Slot { entries, gauged })
        })
    }

    /// The bytes [`Slot::decode`] reads.
    pub fn encode(&self) -> Vec<u8> {
        let size = 4 + self.entries.len() * 40 + 4 + self.gauged.len() * 32;
        let mut w = crate::slot::Writer::with_capacity(size);
        w.count(self.entries.len());
        for (upstream, inner) in &self.entries {
            w.str(upstream);
            let (tag, value) = match *inner {
                Inner::Closed { failures } => (0u8, u64::from(failures)),
                Inner::Open { until } => (1, until),
                Inner::HalfOpen { probe_started } => (2, probe_started),
            };
            w.u8(tag);
            w.u64(value);
        }
        if !self.gauged.is_empty() {
            w.count(self.gauged.len());
            for upstream in &self.gauged {
                w.str(upstream);
            }
        }
        w.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn t(ms: u64) -> UnixMillis {
        UnixMillis(ms)
    }

    #[test]
    fn provider_errors_open_it_and_the_callers_errors_do_not() {
        let mut b = Breaker::new(BreakerConfig { failure_threshold: 3, open_for_ms: 1000 });
        let mut opened = Vec::new();
        for (i, status) in [429u16, 529, 0].into_iter().enumerate() {
            assert_eq!(b.allow(t(i as u64)), Admission::Permit);
            opened.push(b.on_outcome(Outcome::of_status(status), t(i as u64)));
        }
        assert_eq!(b.state(), State::Open);
        assert_eq!(opened, [false, false, true], "only the failure that opens it says so");
        assert!(!b.on_failure(t(3)), "a late failure while open is no new opening");
        // The half-open probe's failure opens it again: a second opening.
        assert_eq!(b.allow(t(1002)), Admission::Permit);
        assert!(b.on_outcome(Outcome::of_status(503), t(1002)));
        let mut b = Breaker::new(BreakerConfig { failure_threshold: 3, open_for_ms: 1000 });
        for (i, status) in [500u16, 503, 400, 404, 422, 401].into_iter().enumerate() {
            b.on_outcome(Outcome::of_status(status), t(i as u64));
        }
        assert_eq!((b.state(), b.failures()), (State::Closed, 0));
    }

    #[test]
    fn full_cycle_closed_open_half_open_closed() {
        let mut b = Breaker::new(BreakerConfig { failure_threshold: 3, open_for_ms: 1000 });
        for i in 0..2 {
            assert_eq!(b.allow(t(i)), Admission::Permit);
            b.on_failure(t(i));
        }
        // A success in between resets the consecutive count.
        assert_eq!(b.allow(t(2)), Admission::Permit);
        b.on_success(t(2));
        assert_eq!(b.failures(), 0);
        for i in 3..6 {
            assert_eq!(b.allow(t(i)), Admission::Permit);
            b.on_failure(t(i));
        }
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.allow(t(5)), Admission::Rejected { retry_after_ms: 1000 });
        assert_eq!(b.allow(t(1004)), Admission::Rejected { retry_after_ms: 1 });
        // Time is up: one probe, the rest still fail fast.
        assert_eq!(b.allow(t(1005)), Admission::Permit);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.allow(t(1006)), Admission::Rejected { retry_after_ms: 999 });
        // The probe fails: open again for a full period.
        b.on_failure(t(1100));
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.allow(t(2099)), Admission::Rejected { retry_after_ms: 1 });
        assert_eq!(b.allow(t(2100)), Admission::Permit);
        // The probe succeeds: closed, counts reset.
        b.on_success(t(2150));
        assert_eq!((b.state(), b.failures()), (State::Closed, 0));
        assert_eq!(b.allow(t(2151)), Admission::Permit);
        b.on_failure(t(2151));
        assert_eq!((b.state(), b.failures()), (State::Closed, 1));
    }

    #[test]
    fn a_lost_probe_is_replaced_after_the_open_period() {
        let mut b = Breaker::new(BreakerConfig { failure_threshold: 1, open_for_ms: 100 });
        let _ = b.allow(t(0));
        b.on_failure(t(0));
        assert_eq!(b.allow(t(100)), Admission::Permit);
        assert_eq!(b.allow(t(199)), Admission::Rejected { retry_after_ms: 1 });
        assert_eq!(b.allow(t(200)), Admission::Permit);
        assert_eq!(b.state(), State::HalfOpen);
    }

    #[test]
    fn late_reports_while_open_change_nothing() {
        let mut b = Breaker::new(BreakerConfig { failure_threshold: 1, open_for_ms: 100 });
        let _ = b.allow(t(0));
        b.on_failure(t(0));
        b.on_failure(t(50));
        b.on_success(t(60));
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.allow(t(99)), Admission::Rejected { retry_after_ms: 1 });
        b.reset();
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn config_defaults_follow_the_seed_and_decode() {
        assert_eq!(
            BreakerConfig::default(),
            BreakerConfig { failure_threshold: 5, open_for_ms: 60_000 }
        );
        let node = crate::doc::parse("{failure_threshold: 3, open_for: 30s}").unwrap();
        let mut cx = Cx::new();
        let c = BreakerConfig::decode(&mut cx, &Field::root(&node));
        cx.finish(()).unwrap();
        assert_eq!(c, BreakerConfig { failure_threshold: 3, open_for_ms: 30_000 });
    }

    /// A change that writes the record and moves the gauge by `by`.
    fn moved(by: i64) -> Changed {
        Changed { write: true, gauge: Some(by) }
    }

    /// A change that writes the record without moving a gauge.
    const WRITTEN: Changed = Changed { write: true, gauge: None };

    #[test]
    fn a_slot_runs_the_breaker_rules_through_its_bytes() {
        let config = BreakerConfig { failure_threshold: 2, open_for_ms: 1000 };
        let through = |s: &Slot| Slot::decode(&s.encode()).unwrap();
        let none = Changed::default();
        let mut slot = Slot::default();
        assert_eq!(slot.allow("api", config, t(0)), (Admission::Permit, none));
        // A success of a breaker that is not stored stores nothing.
        assert_eq!(slot.on_outcome("api", config, Outcome::Success, t(0)), (false, none));
        assert_eq!(slot, Slot::default());
        assert_eq!(slot.on_outcome("api", config, Outcome::ProviderError, t(1)), (false, WRITTEN));
        slot = through(&slot);
        assert_eq!(slot.state("api"), (State::Closed, 1));
        // Opening lists the upstream's gauge and moves it to 2.
        assert_eq!(slot.on_outcome("api", config, Outcome::ProviderError, t(2)), (true, moved(2)));
        slot = through(&slot);
        assert_eq!(slot.state("api"), (State::Open, 0));
        assert_eq!(slot.gauged(), ["api"]);
        assert_eq!(slot.state("other"), (State::Closed, 0));
        assert_eq!(
            slot.allow("api", config, t(500)),
            (Admission::Rejected { retry_after_ms: 502 }, none)
        );
        assert_eq!(slot.allow("other", config, t(500)), (Admission::Permit, none));
        // The probe, once: the rest fail fast.
        assert_eq!(slot.allow("api", config, t(1002)), (Admission::Permit, moved(-1)));
        slot = through(&slot);
        assert_eq!(slot.state("api"), (State::HalfOpen, 0));
        assert!(matches!(slot.allow("api", config, t(1003)).0, Admission::Rejected { .. }));
        // Its success closes it, and a closed breaker leaves the slot; its gauge stays, at 0.
        assert_eq!(
            slot.on_outcome("api", config, Outcome::AgentError, t(1004)),
            (false, moved(-1))
        );
        slot = through(&slot);
        assert_eq!(slot.state("api"), (State::Closed, 0));
        assert_eq!(slot.gauged(), ["api"]);
        assert_eq!(Slot::decode(b""), Some(Slot::default()));
        assert_eq!(Slot::decode(&[1, 0, 0, 0, 9]), None);
        let mut bytes = {
            let mut s = Slot::default();
            let _ = s.on_outcome("api", config, Outcome::ProviderError, t(1));
            s.encode()
        };
        // A slot written before gauges (entries only) reads as one without gauges.
        assert!(Slot::decode(&bytes).unwrap().gauged().is_empty());
        bytes.push(0);
        assert_eq!(Slot::decode(&bytes), None, "trailing bytes");
    }

    #[test]
    fn a_full_slot_keeps_no_new_upstream_and_slots_are_stable() {
        let config = BreakerConfig { failure_threshold: 1, open_for_ms: 1000 };
        let mut slot = Slot::default();
        for i in 0..Slot::CAPACITY {
            let (opened, changed) =
                slot.on_outcome(&format!("u{i}"), config, Outcome::ProviderError, t(0));
            assert!(opened && changed.write);
            // Only the first few have a gauge.
            assert_eq!(changed.gauge, (i < Slot::GAUGED).then_some(2), "u{i}");
        }
        assert_eq!(slot.gauged().len(), Slot::GAUGED);
        let none = Changed::default();
        assert_eq!(slot.on_outcome("late", config, Outcome::ProviderError, t(0)), (false, none));
        assert_eq!(slot.allow("late", config, t(1)), (Admission::Permit, none));
        assert!(matches!(slot.allow("u0", config, t(1)).0, Admission::Rejected { .. }));
        assert_eq!(Slot::index("api.openai.com:443"), Slot::index("api.openai.com:443"));
        assert!((0..1000).all(|i| Slot::index(&format!("u{i}")) < SLOTS));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Allow(u64),
        Success,
        Failure,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![(0u64..80).prop_map(Op::Allow), Just(Op::Success), Just(Op::Failure)]
    }

    /// One operation on a slot of a few upstreams: an admission, or an outcome.
    #[derive(Clone, Debug)]
    enum SlotOp {
        Allow(usize, u64),
        Outcome(usize, u16),
    }

    fn slot_op() -> impl Strategy<Value = SlotOp> {
        prop_oneof![
            (0usize..7, 0u64..80).prop_map(|(u, dt)| SlotOp::Allow(u, dt)),
            (0usize..7, prop_oneof![Just(200u16), Just(404), Just(503), Just(0)])
                .prop_map(|(u, s)| SlotOp::Outcome(u, s)),
        ]
    }

    proptest! {
        /// Whatever happens, in whatever order, through the slot's bytes: each upstream's gauge
        /// (the sum of the moves the writes reported) is its state's value if it is gauged, and
        /// 0 otherwise; the gauged list never shrinks nor passes `GAUGED`.
        #[test]
        fn the_sum_of_the_gauge_moves_is_the_state(
            ops in proptest::collection::vec(slot_op(), 1..300),
        ) {
            let config = BreakerConfig { failure_threshold: 2, open_for_ms: 100 };
            let upstreams: Vec<String> = (0..7).map(|i| format!("u{i}")).collect();
            let mut bytes = Slot::default().encode();
            let mut gauges = vec![0i64; upstreams.len()];
            let mut now = 0;
            let mut listed = 0;
            for op in ops {
                let mut slot = Slot::decode(&bytes).unwrap();
                let (u, changed) = match op {
                    SlotOp::Allow(u, dt) => {
                        now += dt;
                        (u, slot.allow(&upstreams[u], config, t(now)).1)
                    }
                    SlotOp::Outcome(u, status) => {
                        let outcome = Outcome::of_status(status);
                        (u, slot.on_outcome(&upstreams[u], config, outcome, t(now)).1)
                    }
                };
                prop_assert!(changed.gauge != Some(0));
                prop_assert!(changed.write || changed.gauge.is_none());
                if changed.write {
                    bytes = slot.encode();
                }
                gauges[u] += changed.gauge.unwrap_or(0);
                let slot = Slot::decode(&bytes).unwrap();
                prop_assert!(slot.gauged().len() >= listed && slot.gauged().len() <= Slot::GAUGED);
                listed = slot.gauged().len();
                for (i, name) in upstreams.iter().enumerate() {
                    let want = if slot.gauged().contains(name) { slot.state(name).0.gauge() } else { 0 };
                    prop_assert_eq!(gauges[i], want, "{}", name);
                }
            }
        }

        #[test]
        fn half_open_never_lets_two_probes_through(ops in proptest::collection::vec(op(), 1..200)) {
            let open_for = 100;
            let mut b = Breaker::new(BreakerConfig { failure_threshold: 2, open_for_ms: open_for });
            let mut now = 0;
            // The time of the probe in flight, if any.
            let mut probe: Option<u64> = None;
            for op in ops {
                match op {
                    Op::Allow(dt) => {
                        now += dt;
                        let before = b.state();
                        let admitted = b.allow(t(now)) == Admission::Permit;
                        if admitted && before != State::Closed {
                            if let Some(p) = probe {
                                prop_assert!(now - p >= open_for, "second probe at {now}, first at {p}");
                            }
                            probe = Some(now);
                        }
                        if before == State::Open && b.state() == State::Open {
                            prop_assert!(!admitted);
                        }
                    }
                    Op::Success => {
                        b.on_success(t(now));
                        probe = None;
                    }
                    Op::Failure => {
                        b.on_failure(t(now));
                        probe = None;
                    }
                }
            }
        }
    }
}
