//! Behaviour of the budget accounting on [`MemoryStore`]: periods, applicability, all-or-nothing
//! reservations, warnings, idempotency, expiry, concurrency, and model-checked invariants.

use std::sync::{Arc, Barrier};

use super::*;
use crate::money::Money;
use crate::time::{Date, Period, UnixMillis};

const TTL: u64 = 60_000;

fn usd(text: &str) -> Money {
    Money::parse(text).unwrap()
}

/// `y-m-d h:min:s.ms` UTC.
fn at(y: i32, m: u32, d: u32, h: u64, min: u64, s: u64, ms: u64) -> UnixMillis {
    Date { year: y, month: m, day: d }
        .start()
        .saturating_add_ms(h * 3_600_000 + min * 60_000 + s * 1000 + ms)
}

fn noon() -> UnixMillis {
    at(2026, 11, 18, 12, 0, 0, 0)
}

fn spec(id: &str, scope: Scope, key: Option<&str>, period: Period, amount: &str) -> BudgetSpec {
    BudgetSpec { id: id.into(), scope, key: key.map(Into::into), period, amount: usd(amount) }
}

/// The request's scope values as a lookup closure.
fn attr<'a>(pairs: &'a [(Scope, &'a str)]) -> impl Fn(Scope) -> Option<&'a str> + 'a {
    move |scope| pairs.iter().find(|(s, _)| *s == scope).map(|(_, v)| *v)
}

/// A request's scope values.
type Values = &'static [(Scope, &'static str)];

const AGENT_A: Values = &[(Scope::Agent, "a")];

fn engine() -> Budgets<MemoryStore> {
    Budgets::new(MemoryStore::new())
}

fn ids(r: &Reservation) -> Vec<(String, String)> {
    r.budgets().iter().map(|b| (b.budget_id.clone(), b.key.clone())).collect()
}

#[test]
fn periods_roll_over_at_utc_boundaries() {
    use Period::*;
    // (period, first request, second request, second starts a new window)
    let cases = [
        (Hourly, at(2026, 11, 22, 10, 0, 0, 0), at(2026, 11, 22, 10, 59, 59, 999), false),
        (Hourly, at(2026, 11, 22, 10, 59, 59, 999), at(2026, 11, 22, 11, 0, 0, 0), true),
        (Daily, at(2026, 11, 22, 0, 0, 0, 0), at(2026, 11, 22, 23, 59, 59, 999), false),
        (Daily, at(2026, 11, 22, 23, 59, 59, 999), at(2026, 11, 23, 0, 0, 0, 0), true),
        // 2026-11-22 is a Sunday, the 23rd a Monday.
        (Weekly, at(2026, 11, 16, 0, 0, 0, 0), at(2026, 11, 22, 23, 59, 59, 999), false),
        (Weekly, at(2026, 11, 22, 23, 59, 59, 999), at(2026, 11, 23, 0, 0, 0, 0), true),
        // The ISO week spans the new year.
        (Weekly, at(2026, 12, 31, 12, 0, 0, 0), at(2027, 1, 1, 12, 0, 0, 0), false),
        (Monthly, at(2028, 2, 1, 0, 0, 0, 0), at(2028, 2, 29, 23, 59, 59, 999), false),
        (Monthly, at(2028, 2, 29, 23, 59, 59, 999), at(2028, 3, 1, 0, 0, 0, 0), true),
        (Monthly, at(2026, 12, 31, 23, 0, 0, 0), at(2027, 1, 1, 0, 0, 0, 0), true),
    ];
    for (period, first, second, new_window) in cases {
        let b = engine();
        let specs = [spec("b", Scope::Agent, None, period, "1.00")];
        let r = b.reserve(&specs, attr(AGENT_A), usd("1"), "r1", first, TTL).unwrap();
        b.settle(r, usd("1")).unwrap();
        let again = b.reserve(&specs, attr(AGENT_A), usd("1"), "r2", second, TTL);
        assert_eq!(again.is_ok(), new_window, "{period} {first} → {second}: {again:?}");
        let status = b.status(&specs[0], "a", second).unwrap();
        let expected_spent = if new_window { Money::ZERO } else { usd("1") };
        assert_eq!(status.spent, expected_spent, "{period} {first} → {second}");
    }
}

#[test]
fn settlement_lands_in_the_window_of_its_reservation() {
    let b = engine();
    let specs = [spec("daily", Scope::Agent, None, Period::Daily, "10")];
    let before_midnight = at(2026, 11, 22, 23, 59, 59, 0);
    let after_midnight = at(2026, 11, 23, 0, 0, 30, 0);
    let r = b.reserve(&specs, attr(AGENT_A), usd("2"), "r", before_midnight, TTL).unwrap();
    assert_eq!(r.budgets()[0].period_key, "2026-11-22");
    let s = b.settle(r, usd("1.5")).unwrap();
    assert_eq!(s.outcome, SettleOutcome::Settled);
    let old = b.status(&specs[0], "a", before_midnight).unwrap();
    assert_eq!((old.spent, old.reserved), (usd("1.5"), Money::ZERO));
    let new = b.status(&specs[0], "a", after_midnight).unwrap();
    assert_eq!(
        (new.period_key.as_str(), new.spent, new.reserved),
        ("2026-11-23", Money::ZERO, Money::ZERO)
    );
}

#[test]
fn fixed_key_budgets_apply_only_to_their_value_and_per_value_budgets_to_each() {
    let specs = [
        spec("all", Scope::Global, None, Period::Monthly, "1000"),
        spec("cc-1234", Scope::CostCenter, Some("CC-1234"), Period::Monthly, "100"),
        spec("per-agent", Scope::Agent, None, Period::Daily, "10"),
        spec("per-project", Scope::Project, None, Period::Daily, "50"),
        spec("bu-retail", Scope::BusinessUnit, Some("retail"), Period::Weekly, "500"),
    ];
    // (the request's values, the budgets applied as (id, counted value))
    let cases: [(Values, &[(&str, &str)]); 5] = [
        (
            &[
                (Scope::Agent, "a1"),
                (Scope::CostCenter, "CC-1234"),
                (Scope::BusinessUnit, "retail"),
            ],
            &[("all", "*"), ("cc-1234", "CC-1234"), ("per-agent", "a1"), ("bu-retail", "retail")],
        ),
        (
            &[(Scope::Agent, "a2"), (Scope::CostCenter, "CC-9999"), (Scope::Project, "p")],
            &[("all", "*"), ("per-agent", "a2"), ("per-project", "p")],
        ),
        // No values at all: only the global budget applies.
        (&[], &[("all", "*")]),
        // An empty value counts as no value.
        (&[(Scope::Agent, ""), (Scope::Project, "p")], &[("all", "*"), ("per-project", "p")]),
        // A global value from the request is ignored.
        (&[(Scope::Global, "x"), (Scope::BusinessUnit, "RETAIL")], &[("all", "*")]),
    ];
    for (i, (values, expected)) in cases.iter().enumerate() {
        let b = engine();
        let r = b.reserve(&specs, attr(values), usd("1"), "r", noon(), TTL).unwrap();
        let expected: Vec<_> =
            expected.iter().map(|(id, key)| (id.to_string(), key.to_string())).collect();
        assert_eq!(ids(&r), expected, "case {i}");
        assert!(b.release(r).unwrap());
    }
}

#[test]
fn per_value_budgets_are_separate_per_value() {
    let b = engine();
    let specs = [spec("per-agent", Scope::Agent, None, Period::Daily, "1")];
    let a = b.reserve(&specs, attr(&[(Scope::Agent, "a")]), usd("1"), "1", noon(), TTL).unwrap();
    let other = b.reserve(&specs, attr(&[(Scope::Agent, "b")]), usd("1"), "2", noon(), TTL);
    assert!(other.is_ok());
    let again = b.reserve(&specs, attr(&[(Scope::Agent, "a")]), usd("1"), "3", noon(), TTL);
    assert!(matches!(again, Err(BudgetError::Exceeded { ref key, .. }) if key == "a"));
    let _ = (a, other);
}

#[test]
fn a_refusal_rolls_back_every_budget_already_reserved() {
    let b = engine();
    let specs = [
        spec("global", Scope::Global, None, Period::Monthly, "100"),
        spec("project", Scope::Project, None, Period::Daily, "100"),
        spec("agent", Scope::Agent, None, Period::Daily, "3"),
        spec("cc", Scope::CostCenter, None, Period::Daily, "100"),
    ];
    let values = [(Scope::Agent, "a"), (Scope::Project, "p"), (Scope::CostCenter, "c")];
    // Spend $1 of the agent's $3 (and of every other budget).
    let r = b.reserve(&specs, attr(&values), usd("1"), "first", noon(), TTL).unwrap();
    b.settle(r, usd("1")).unwrap();

    let refused = b.reserve(&specs, attr(&values), usd("2.5"), "second", noon(), TTL);
    assert_eq!(
        refused,
        Err(BudgetError::Exceeded {
            budget_id: "agent".into(),
            scope: Scope::Agent,
            key: "a".into(),
            period: Period::Daily,
            period_key: "2026-11-18".into(),
            limit: usd("3"),
            spent_and_reserved: usd("1"),
            requested: usd("2.5"),
        })
    );
    for (spec, value) in specs.iter().zip(["*", "p", "a", "c"]) {
        let s = b.status(spec, value, noon()).unwrap();
        assert_eq!((s.spent, s.reserved), (usd("1"), Money::ZERO), "{}", spec.id);
    }
    assert_eq!(b.store().open_holds(), 0);
    // Exactly what is left still fits.
    let fits = b.reserve(&specs, attr(&values), usd("2"), "third", noon(), TTL).unwrap();
    assert_eq!(fits.budgets().len(), 4);
}

#[test]
fn exceeded_names_the_budget_in_its_message() {
    let b = engine();
    let specs = [spec("cc-daily", Scope::CostCenter, Some("CC-1"), Period::Daily, "5")];
    let err = b
        .reserve(&specs, attr(&[(Scope::CostCenter, "CC-1")]), usd("6"), "r", noon(), TTL)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "budget `cc-daily` (cost_center `CC-1`, daily 2026-11-18) has 0.00 of 5.00 USD spent or \
         reserved; 6.00 more does not fit"
    );
}

#[test]
fn warnings_fire_once_at_80_95_and_100_percent() {
    let b = engine();
    let specs = [spec("agent", Scope::Agent, None, Period::Monthly, "100")];
    // (actual of each settlement, thresholds it crosses)
    let steps: [(&str, &[u64]); 8] = [
        ("50", &[]),
        ("29.99", &[]),
        ("0.01", &[8_000]),
        ("10", &[]),
        ("5", &[9_500]),
        ("4.999999999", &[]),
        ("0.000000001", &[10_000]),
        ("1", &[]),
    ];
    for (i, (actual, crossed)) in steps.into_iter().enumerate() {
        let r = b.reserve(&specs, attr(AGENT_A), usd(actual), &format!("r{i}"), noon(), TTL);
        // At 100 % the last reservation is refused; the spend is still recorded with `charge`.
        let s = match r {
            Ok(r) => b.settle(r, usd(actual)).unwrap(),
            Err(_) => {
                b.charge(&specs, attr(AGENT_A), usd(actual), &format!("r{i}"), noon()).unwrap()
            }
        };
        let got: Vec<u64> = s.warnings.iter().map(|w| w.threshold_bp).collect();
        assert_eq!(got, crossed, "step {i}");
    }
    assert_eq!(b.status(&specs[0], "a", noon()).unwrap().spent, usd("101"));
}

#[test]
fn one_settlement_can_cross_every_threshold() {
    let b = engine();
    let specs = [spec("agent", Scope::Agent, None, Period::Daily, "10")];
    let r = b.reserve(&specs, attr(AGENT_A), usd("8"), "r", noon(), TTL).unwrap();
    let s = b.settle(r, usd("12")).unwrap();
    let w = |threshold_bp| Warning {
        budget_id: "agent".into(),
        scope: Scope::Agent,
        key: "a".into(),
        period: Period::Daily,
        period_key: "2026-11-18".into(),
        threshold_bp,
        spent: usd("12"),
        limit: usd("10"),
    };
    assert_eq!(s.warnings, vec![w(8_000), w(9_500), w(10_000)]);
    assert_eq!(s.charged, usd("12"));
}

#[test]
fn actual_above_the_reservation_is_recorded_and_stops_further_reservations() {
    let b = engine();
    let specs = [spec("agent", Scope::Agent, None, Period::Daily, "10")];
    let r = b.reserve(&specs, attr(AGENT_A), usd("8"), "r", noon(), TTL).unwrap();
    b.settle(r, usd("12")).unwrap();
    let s = b.status(&specs[0], "a", noon()).unwrap();
    assert_eq!(
        (s.spent, s.reserved, s.remaining, s.utilization_bp),
        (usd("12"), Money::ZERO, Money::ZERO, 12_000)
    );
    for amount in ["0.01", "0"] {
        let again = b.reserve(&specs, attr(AGENT_A), usd(amount), amount, noon(), TTL);
        assert!(
            matches!(again, Err(BudgetError::Exceeded { spent_and_reserved, .. }) if spent_and_reserved == usd("12"))
        );
    }
}

#[test]
fn settle_is_idempotent_by_request_id() {
    let b = engine();
    let specs = [spec("agent", Scope::Agent, None, Period::Daily, "10")];
    let r = b.reserve(&specs, attr(AGENT_A), usd("4"), "req-1", noon(), TTL).unwrap();
    let copy = r.clone();
    let first = b.settle(r, usd("3")).unwrap();
    assert_eq!((first.outcome, first.charged), (SettleOutcome::Settled, usd("3")));
    let second = b.settle(copy.clone(), usd("3")).unwrap();
    assert_eq!(
        second,
        Settlement { outcome: SettleOutcome::Duplicate, charged: Money::ZERO, warnings: vec![] }
    );
    assert!(!b.release(copy).unwrap());
    let s = b.status(&specs[0], "a", noon()).unwrap();
    assert_eq!((s.spent, s.reserved), (usd("3"), Money::ZERO));
    // Settling leaves nothing per request behind: idempotency is the hold being taken once.
    assert_eq!((b.store().len(), b.store().open_holds(), b.store().lapse_marks()), (2, 0, 0));
}

#[test]
fn charge_is_idempotent_by_request_id() {
    let b = engine();
    let specs = [spec("agent", Scope::Agent, None, Period::Daily, "10")];
    let first = b.charge(&specs, attr(AGENT_A), usd("3"), "req-1", noon()).unwrap();
    assert_eq!(first.outcome, SettleOutcome::Settled);
    let again = b.charge(&specs, attr(AGENT_A), usd("3"), "req-1", noon()).unwrap();
    assert_eq!(again.outcome, SettleOutcome::Duplicate);
    assert_eq!(b.status(&specs[0], "a", noon()).unwrap().spent, usd("3"));
}

#[test]
fn a_lapsed_reservation_settles_once_and_its_mark_is_pruned() {
    let b = engine();
    let specs = [spec("agent", Scope::Agent, None, Period::Daily, "10")];
    let t0 = noon();
    let r = b.reserve(&specs, attr(AGENT_A), usd("4"), "slow", t0, 1_000).unwrap();
    let copy = r.clone();
    b.expire(t0.saturating_add_ms(1_000)).unwrap();
    assert_eq!(b.store().lapse_marks(), 1);
    let late = b.settle(r, usd("2")).unwrap();
    assert_eq!(late.outcome, SettleOutcome::SettledAfterExpiry);
    assert_eq!(b.settle(copy, usd("2")).unwrap().outcome, SettleOutcome::Duplicate);
    assert_eq!(b.status(&specs[0], "a", t0).unwrap().spent, usd("2"));

    let never = b.reserve(&specs, attr(AGENT_A), usd("1"), "never", t0, 1_000).unwrap();
    b.expire(t0.saturating_add_ms(1_000)).unwrap();
    assert_eq!(b.store().lapse_marks(), 1);
    b.expire(t0.saturating_add_ms(1_000 + LAPSE_RETENTION_MS)).unwrap();
    assert_eq!(b.store().lapse_marks(), 0, "pruned after its retention");
    let too_late = b.settle(never, usd("1"));
    assert_eq!(too_late.unwrap().outcome, SettleOutcome::Duplicate);
}

#[test]
fn release_gives_everything_back_and_ends_the_reservation() {
    let b = engine();
    let specs = [
        spec("agent", Scope::Agent, None, Period::Daily, "10"),
        spec("global", Scope::Global, None, Period::Daily, "10"),
    ];
    let r = b.reserve(&specs, attr(AGENT_A), usd("7"), "req", noon(), TTL).unwrap();
    let copy = r.clone();
    assert_eq!(b.status(&specs[1], "", noon()).unwrap().reserved, usd("7"));
    assert!(b.release(r).unwrap());
    for spec in &specs {
        let s = b.status(spec, "a", noon()).unwrap();
        assert_eq!((s.spent, s.reserved, s.remaining), (Money::ZERO, Money::ZERO, usd("10")));
    }
    assert_eq!(b.settle(copy, usd("7")).unwrap().outcome, SettleOutcome::Duplicate);
    assert_eq!(b.store().open_holds(), 0);
}

#[test]
fn expiry_gives_back_unsettled_reservations_and_a_late_settle_still_charges() {
    let b = engine();
    let specs = [spec("agent", Scope::Agent, None, Period::Daily, "10")];
    let t0 = noon();
    let forgotten = b.reserve(&specs, attr(AGENT_A), usd("6"), "slow", t0, 30_000).unwrap();
    assert!(b.reserve(&specs, attr(AGENT_A), usd("6"), "next", t0, TTL).is_err());

    assert_eq!(b.expire(t0.saturating_add_ms(29_999)).unwrap(), vec![]);
    let released = b.expire(t0.saturating_add_ms(30_000)).unwrap();
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].request_id, "slow");
    assert_eq!(released[0].entries[0].amount, usd("6").nanos());
    assert_eq!(b.status(&specs[0], "a", t0).unwrap().reserved, Money::ZERO);

    let next = b.reserve(&specs, attr(AGENT_A), usd("3"), "next", t0, TTL).unwrap();
    let late = b.settle(forgotten, usd("2")).unwrap();
    assert_eq!((late.outcome, late.charged), (SettleOutcome::SettledAfterExpiry, usd("2")));
    let s = b.status(&specs[0], "a", t0).unwrap();
    assert_eq!((s.spent, s.reserved), (usd("2"), usd("3")));
    assert_eq!(b.settle(next, usd("3")).unwrap().outcome, SettleOutcome::Settled);
    assert_eq!(b.status(&specs[0], "a", t0).unwrap().spent, usd("5"));
}

#[test]
fn a_request_id_holds_one_reservation_at_a_time() {
    let b = engine();
    let specs = [spec("agent", Scope::Agent, None, Period::Daily, "10")];
    let r = b.reserve(&specs, attr(AGENT_A), usd("2"), "same", noon(), TTL).unwrap();
    let dup = b.reserve(&specs, attr(AGENT_A), usd("3"), "same", noon(), TTL);
    assert_eq!(dup, Err(BudgetError::DuplicateRequest { request_id: "same".into() }));
    assert_eq!(b.status(&specs[0], "a", noon()).unwrap().reserved, usd("2"));
    b.settle(r, usd("2")).unwrap();
}

#[test]
fn no_applicable_budget_stores_nothing() {
    let b = engine();
    let specs = [spec("p", Scope::Project, None, Period::Daily, "1")];
    let r = b.reserve(&specs, attr(AGENT_A), usd("5"), "r", noon(), TTL).unwrap();
    assert!(r.budgets().is_empty());
    let s = b.settle(r, usd("5")).unwrap();
    assert_eq!((s.outcome, s.warnings.len()), (SettleOutcome::Settled, 0));
    assert!(b.store().is_empty());
    assert_eq!(b.store().open_holds(), 0);
}

#[test]
fn status_reports_the_current_window() {
    let b = engine();
    let specs = [spec("cc", Scope::CostCenter, Some("CC-1"), Period::Monthly, "200")];
    let values = [(Scope::CostCenter, "CC-1")];
    let r = b.reserve(&specs, attr(&values), usd("30"), "1", noon(), TTL).unwrap();
    b.settle(r, usd("150.5")).unwrap();
    let _open = b.reserve(&specs, attr(&values), usd("20"), "2", noon(), TTL).unwrap();
    // The value is ignored for a fixed-key budget.
    let s = b.status(&specs[0], "ignored", noon()).unwrap();
    assert_eq!(
        s,
        BudgetStatus {
            budget_id: "cc".into(),
            scope: Scope::CostCenter,
            key: "CC-1".into(),
            period: Period::Monthly,
            period_key: "2026-11".into(),
            window_start: at(2026, 11, 1, 0, 0, 0, 0),
            window_end: at(2026, 12, 1, 0, 0, 0, 0),
            limit: usd("200"),
            spent: usd("150.5"),
            reserved: usd("20"),
            remaining: usd("29.5"),
            utilization_bp: 7_525,
        }
    );
    assert_eq!(
        serde_json::to_string(&s).unwrap(),
        r#"{"budget_id":"cc","scope":"cost_center","key":"CC-1","period":"monthly","period_key":"2026-11","window_start":"2026-11-01T00:00:00.000Z","window_end":"2026-12-01T00:00:00.000Z","limit":"200.00","spent":"150.50","reserved":"20.00","remaining":"29.50","utilization_bp":7525}"#
    );
}

#[test]
fn expire_prunes_counters_of_past_periods() {
    let b = engine();
    let specs = [spec("hourly", Scope::Agent, None, Period::Hourly, "1")];
    let start = at(2026, 11, 1, 0, 0, 0, 0);
    for hour in 0..100u64 {
        let now = start.saturating_add_ms(hour * 3_600_000);
        let r = b.reserve(&specs, attr(AGENT_A), usd("1"), &format!("r{hour}"), now, TTL).unwrap();
        b.settle(r, usd("1")).unwrap();
    }
    assert_eq!(b.store().len(), 200);
    b.expire(start.saturating_add_ms(100 * 3_600_000)).unwrap();
    // Windows 76..=99 are within retention (window end + 24 h): two counters each. Settling
    // leaves no per-request key behind.
    assert_eq!(b.store().len(), 48);
    b.expire(start.saturating_add_ms(200 * 3_600_000)).unwrap();
    assert!(b.store().is_empty());
}

/// A store that fails calls on keys containing `poison`: only `add` if `adds_only`, else all.
struct Flaky<'a> {
    inner: &'a MemoryStore,
    poison: &'a str,
    adds_only: bool,
}

impl Flaky<'_> {
    fn check(&self, key: &str) -> Result<(), StoreError> {
        match self.adds_only {
            true => Ok(()),
            false => self.check_add(key),
        }
    }

    fn check_add(&self, key: &str) -> Result<(), StoreError> {
        match key.contains(self.poison) {
            true => Err(StoreError::Unavailable { reason: "test".into() }),
            false => Ok(()),
        }
    }
}

impl Store for Flaky<'_> {
    fn get(&self, key: &str) -> Result<i64, StoreError> {
        self.check(key)?;
        self.inner.get(key)
    }
    fn add(&self, key: &str, delta: i64, expires_at: UnixMillis) -> Result<i64, StoreError> {
        self.check_add(key)?;
        self.inner.add(key, delta, expires_at)
    }
    fn add_if_within(
        &self,
        key: &str,
        delta: i64,
        limit: i64,
        expires_at: UnixMillis,
    ) -> Result<AddOutcome, StoreError> {
        self.check(key)?;
        self.inner.add_if_within(key, delta, limit, expires_at)
    }
    fn insert_if_absent(&self, key: &str, expires_at: UnixMillis) -> Result<bool, StoreError> {
        self.check(key)?;
        self.inner.insert_if_absent(key, expires_at)
    }
    fn put_hold(&self, hold: &Hold) -> Result<bool, StoreError> {
        self.check(&hold.request_id)?;
        self.inner.put_hold(hold)
    }
    fn take_hold(&self, request_id: &str) -> Result<Taken, StoreError> {
        self.check(request_id)?;
        self.inner.take_hold(request_id)
    }
    fn take_expired_holds(
        &self,
        now: UnixMillis,
        max: usize,
        lapse_until: UnixMillis,
    ) -> Result<Vec<Hold>, StoreError> {
        self.inner.take_expired_holds(now, max, lapse_until)
    }
    fn prune(&self, now: UnixMillis) -> Result<usize, StoreError> {
        self.inner.prune(now)
    }
}

#[test]
fn a_store_error_mid_reservation_rolls_back_and_reports_it() {
    let memory = MemoryStore::new();
    let b = Budgets::new(Flaky { inner: &memory, poison: "broken", adds_only: false });
    let specs = [
        spec("fine", Scope::Global, None, Period::Daily, "10"),
        spec("broken", Scope::Agent, None, Period::Daily, "10"),
    ];
    let err = b.reserve(&specs, attr(AGENT_A), usd("4"), "r", noon(), TTL).unwrap_err();
    assert!(matches!(err, BudgetError::Store(StoreError::Unavailable { .. })));
    let clean = Budgets::new(&memory);
    assert_eq!(clean.status(&specs[0], "", noon()).unwrap().reserved, Money::ZERO);
    assert_eq!(memory.open_holds(), 0);
}

#[test]
fn a_failed_rollback_is_given_back_at_expiry() {
    let memory = MemoryStore::new();
    let specs = [
        spec("broken", Scope::Global, None, Period::Daily, "10"),
        spec("full", Scope::Agent, None, Period::Daily, "1"),
    ];
    let healthy = Budgets::new(&memory);
    let fill = healthy.reserve(&specs[1..], attr(AGENT_A), usd("1"), "fill", noon(), TTL).unwrap();
    // "broken" accepts the reservation, "full" refuses, and giving "broken" back fails.
    let flaky = Budgets::new(Flaky { inner: &memory, poison: "/6:broken/", adds_only: true });
    let err = flaky.reserve(&specs, attr(AGENT_A), usd("3"), "r", noon(), 5_000);
    assert!(matches!(err, Err(BudgetError::Exceeded { ref budget_id, .. }) if budget_id == "full"));
    assert_eq!(healthy.status(&specs[0], "", noon()).unwrap().reserved, usd("3"));

    let released = healthy.expire(noon().saturating_add_ms(5_000)).unwrap();
    assert_eq!(released.iter().map(|h| h.request_id.as_str()).collect::<Vec<_>>(), ["r"]);
    assert_eq!(healthy.status(&specs[0], "", noon()).unwrap().reserved, Money::ZERO);
    assert!(healthy.release(fill).unwrap());
}

#[test]
fn sixty_four_threads_cannot_overspend_ten_dollars() {
    let b = Arc::new(engine());
    let specs = Arc::new([spec("team", Scope::Project, None, Period::Daily, "10")]);
    let barrier = Arc::new(Barrier::new(64));
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let (b, specs, barrier) = (b.clone(), specs.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let values = [(Scope::Project, "p")];
                let r =
                    b.reserve(&specs[..], attr(&values), usd("1"), &format!("r{i}"), noon(), TTL);
                // Every reservation is attempted before any is settled (settling below the
                // estimate frees budget for later requests).
                barrier.wait();
                match r {
                    Ok(r) => {
                        // Actual costs at or below the estimate: 0.50 .. 1.00.
                        let actual = usd("0.5") + Money::from_nanos(i * 7_812_500);
                        b.settle(r, actual).map(|s| s.outcome == SettleOutcome::Settled)
                    }
                    Err(BudgetError::Exceeded { .. }) => Ok(false),
                    Err(e) => panic!("{e}"),
                }
            })
        })
        .collect();
    let succeeded = handles.into_iter().map(|h| h.join().unwrap().unwrap());
    assert_eq!(succeeded.filter(|ok| *ok).count(), 10);
    let s = b.status(&specs[0], "p", noon()).unwrap();
    assert!(s.spent <= s.limit && s.spent >= usd("5"), "{s:?}");
    assert_eq!(s.reserved, Money::ZERO);
    assert_eq!(b.store().open_holds(), 0);
}

#[test]
fn concurrent_reservations_on_overlapping_budgets_stay_all_or_nothing() {
    let b = Arc::new(engine());
    let specs = Arc::new([
        spec("global", Scope::Global, None, Period::Daily, "10"),
        spec("agent", Scope::Agent, None, Period::Daily, "4"),
    ]);
    let agents = ["a0", "a1", "a2", "a3"];
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let (b, specs) = (b.clone(), specs.clone());
            std::thread::spawn(move || {
                let values = [(Scope::Agent, agents[i % 4])];
                let r =
                    b.reserve(&specs[..], attr(&values), usd("1"), &format!("r{i}"), noon(), TTL);
                r.ok().map(|r| r.budgets()[1].key.clone())
            })
        })
        .collect();
    let winners: Vec<String> = handles.into_iter().filter_map(|h| h.join().unwrap()).collect();
    assert_eq!(winners.len(), 10);
    assert_eq!(b.status(&specs[0], "", noon()).unwrap().reserved, usd("10"));
    for agent in agents {
        let won = winners.iter().filter(|w| *w == agent).count() as i64;
        assert!(won <= 4);
        assert_eq!(b.status(&specs[1], agent, noon()).unwrap().reserved, Money::from_usd(won));
    }
}

mod model;
