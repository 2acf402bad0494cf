//! Random sequences of reserve / settle / release / expire against a reference model.

use proptest::prelude::*;

use super::*;

#[derive(Clone, Debug)]
enum Op {
    Reserve { agent: usize, cents: i64 },
    Settle { slot: usize, cents: i64 },
    Release { slot: usize },
    Advance { secs: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, 0..700i64).prop_map(|(agent, cents)| Op::Reserve { agent, cents }),
        3 => (0..16usize, 0..900i64).prop_map(|(slot, cents)| Op::Settle { slot, cents }),
        1 => (0..16usize).prop_map(|slot| Op::Release { slot }),
        1 => (1..40u64).prop_map(|secs| Op::Advance { secs }),
    ]
}

fn cents(c: i64) -> Money {
    Money::from_nanos(c * 10_000_000)
}

/// Committed / spent per counter: global, agent 0, agent 1.
#[derive(Default, Debug)]
struct Counters {
    committed: [i64; 3],
    spent: [i64; 3],
}

proptest! {
    #[test]
    fn reservations_never_exceed_and_spend_is_tracked_exactly(ops in prop::collection::vec(op(), 1..80)) {
        let b = engine();
        let specs = [
            spec("global", Scope::Global, None, Period::Daily, "15"),
            spec("agent", Scope::Agent, None, Period::Daily, "10"),
        ];
        let limits = [usd("15").nanos(), usd("10").nanos(), usd("10").nanos()];
        let mut now = noon();
        let mut model = Counters::default();
        let mut overrun = [0i64; 3];
        // Unsettled reservations: (reservation, agent, reserved nanos, not yet expired).
        let mut open: Vec<(Reservation, usize, i64, bool)> = Vec::new();
        let mut seq = 0;
        for op in ops {
            match op {
                Op::Reserve { agent, cents: c } => {
                    seq += 1;
                    let name = ["a0", "a1"][agent];
                    let values = [(Scope::Agent, name)];
                    let amount = cents(c).nanos();
                    let fits = [0, agent + 1].iter().all(|&i| model.committed[i] + amount <= limits[i]);
                    let r = b.reserve(&specs, attr(&values), cents(c), &format!("r{seq}"), now, 20_000);
                    prop_assert_eq!(r.is_ok(), fits, "{:?}", r);
                    if let Ok(r) = r {
                        for i in [0, agent + 1] {
                            model.committed[i] += amount;
                            prop_assert!(model.committed[i] <= limits[i]);
                        }
                        open.push((r, agent, amount, true));
                    }
                }
                Op::Settle { slot, cents: c } if slot < open.len() => {
                    let (r, agent, amount, held) = open.swap_remove(slot);
                    let held_amount = if held { amount } else { 0 };
                    let s = b.settle(r, cents(c)).unwrap();
                    let expected = if held { SettleOutcome::Settled } else { SettleOutcome::SettledAfterExpiry };
                    prop_assert_eq!(s.outcome, expected);
                    for i in [0, agent + 1] {
                        overrun[i] += (cents(c).nanos() - held_amount).max(0);
                        model.committed[i] += cents(c).nanos() - held_amount;
                        model.spent[i] += cents(c).nanos();
                    }
                }
                Op::Release { slot } if slot < open.len() => {
                    let (r, agent, amount, held) = open.swap_remove(slot);
                    prop_assert_eq!(b.release(r).unwrap(), held);
                    if held {
                        for i in [0, agent + 1] { model.committed[i] -= amount; }
                    }
                }
                Op::Advance { secs } => {
                    now = now.saturating_add_ms(secs * 1000);
                    let mut released: Vec<String> =
                        b.expire(now).unwrap().into_iter().map(|h| h.request_id).collect();
                    let mut expected = Vec::new();
                    for (r, agent, amount, held) in open.iter_mut() {
                        if *held && r.expires_at() <= now {
                            *held = false;
                            expected.push(r.request_id().to_owned());
                            for i in [0, *agent + 1] { model.committed[i] -= *amount; }
                        }
                    }
                    released.sort();
                    expected.sort();
                    prop_assert_eq!(released, expected);
                }
                Op::Settle { .. } | Op::Release { .. } => {}
            }
            let statuses = [
                b.status(&specs[0], "", now).unwrap(),
                b.status(&specs[1], "a0", now).unwrap(),
                b.status(&specs[1], "a1", now).unwrap(),
            ];
            for (i, s) in statuses.iter().enumerate() {
                prop_assert_eq!(s.spent.nanos(), model.spent[i], "counter {}", i);
                prop_assert_eq!(s.reserved.nanos(), model.committed[i] - model.spent[i], "counter {}", i);
                // Only settlements above their reservation may carry a budget past its limit.
                prop_assert!(model.committed[i] <= limits[i] + overrun[i], "counter {}", i);
            }
        }
    }

    #[test]
    fn reserve_then_settle_spends_the_same_as_charging_the_actual(
        requests in prop::collection::vec((0..2usize, 0..900i64, 0..900i64), 1..30),
    ) {
        let reserved = engine();
        let charged = engine();
        let specs = [
            spec("global", Scope::Global, None, Period::Daily, "100"),
            spec("agent", Scope::Agent, None, Period::Hourly, "60"),
        ];
        for (i, (agent, estimate, actual)) in requests.into_iter().enumerate() {
            let values = [(Scope::Agent, ["a0", "a1"][agent])];
            let id = format!("r{i}");
            // Nothing is open between requests, so a refusal depends on the spend alone, which
            // the two engines share; a refused request is charged by neither.
            let Ok(r) = reserved.reserve(&specs, attr(&values), cents(estimate), &id, noon(), TTL) else {
                continue;
            };
            let a = reserved.settle(r, cents(actual)).unwrap();
            let b = charged.charge(&specs, attr(&values), cents(actual), &id, noon()).unwrap();
            prop_assert_eq!(a, b);
        }
        for (spec, value) in [(&specs[0], ""), (&specs[1], "a0"), (&specs[1], "a1")] {
            prop_assert_eq!(reserved.status(spec, value, noon()).unwrap(), charged.status(spec, value, noon()).unwrap());
        }
    }
}
