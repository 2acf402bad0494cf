//! When each request of an open-loop run is due, and which scenario request it is.
//!
//! Request `i` of a run at `rate` requests per second is due `floor(i * 1e9 / rate)` ns after
//! the start, whatever happened to the requests before it: the generator measures latency from
//! this time, so a stalled target cannot hide its stall by slowing the generator down
//! (coordinated omission). Pure integer arithmetic; never sleeps or reads a clock.

use std::time::Duration;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// A constant-rate schedule of a bounded number of requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    rate: u64,
    total: u64,
}

impl Schedule {
    /// `rate` requests per second for `duration`, at most `max_requests` in all. A zero rate
    /// schedules nothing.
    pub fn new(rate: u64, duration: Duration, max_requests: u64) -> Schedule {
        let wanted = duration.as_nanos().saturating_mul(u128::from(rate)) / NANOS_PER_SEC;
        let total = u64::try_from(wanted).unwrap_or(u64::MAX).min(max_requests);
        Schedule { rate, total: if rate == 0 { 0 } else { total } }
    }

    /// How many requests the schedule holds.
    pub fn len(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// When request `i` is due, counted from the start of the run.
    pub fn due(&self, i: u64) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let nanos = u128::from(i) * NANOS_PER_SEC / u128::from(self.rate);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// How many requests are due at `elapsed` after the start (those with `due(i) <= elapsed`),
    /// never more than the schedule holds.
    pub fn due_by(&self, elapsed: Duration) -> u64 {
        // due(i) <= e  ⇔  floor(i·1e9/r) <= e  ⇔  i·1e9 < (e+1)·r  ⇔  i < ceil((e+1)·r / 1e9)
        let numerator = (elapsed.as_nanos() + 1).saturating_mul(u128::from(self.rate));
        let count = numerator.div_ceil(NANOS_PER_SEC);
        u64::try_from(count).unwrap_or(u64::MAX).min(self.total)
    }
}

/// A smooth weighted round-robin order over templates: `weights = [3, 1]` gives
/// `[0, 0, 1, 0]`, so a mix is spread evenly instead of sent in blocks. Request `i` of a run
/// uses template `cycle[i % cycle.len()]`. Empty when every weight is zero.
pub fn mix_cycle(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut cycle = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += i64::from(w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        cycle.push(best);
    }
    cycle
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times_are_evenly_spaced_from_zero() {
        let s = Schedule::new(3000, Duration::from_secs(2), u64::MAX);
        assert_eq!(s.len(), 6000);
        assert_eq!(s.due(0), Duration::ZERO);
        assert_eq!(s.due(1), Duration::from_nanos(333_333));
        assert_eq!(s.due(3), Duration::from_millis(1));
        assert_eq!(s.due(2999), Duration::from_nanos(999_666_666));
        assert_eq!(s.due(3000), Duration::from_secs(1));
    }

    #[test]
    fn count_and_rate_bounds_cap_the_schedule() {
        assert_eq!(Schedule::new(3000, Duration::from_secs(10), 500).len(), 500);
        assert_eq!(Schedule::new(7, Duration::from_millis(500), u64::MAX).len(), 3);
        assert!(Schedule::new(0, Duration::from_secs(10), 100).is_empty());
        assert!(Schedule::new(100, Duration::ZERO, 100).is_empty());
    }

    #[test]
    fn due_by_counts_exactly_the_requests_already_due() {
        for rate in [1, 7, 1000, 3000, 48_000] {
            let s = Schedule::new(rate, Duration::from_secs(1), u64::MAX);
            for elapsed_ns in (0..1_100_000_000u64).step_by(9_999_991).chain([333_332, 333_333]) {
                let elapsed = Duration::from_nanos(elapsed_ns);
                let brute = (0..s.len()).filter(|&i| s.due(i) <= elapsed).count() as u64;
                assert_eq!(s.due_by(elapsed), brute, "rate {rate} at {elapsed_ns} ns");
            }
        }
    }

    #[test]
    fn mix_cycle_spreads_templates_by_weight() {
        assert_eq!(mix_cycle(&[3, 1]), [0, 0, 1, 0]);
        assert_eq!(mix_cycle(&[1, 1, 1]), [0, 1, 2]);
        assert_eq!(mix_cycle(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(mix_cycle(&[2]), [0, 0]);
        assert!(mix_cycle(&[]).is_empty());
        let cycle = mix_cycle(&[6, 3, 1]);
        let counts: Vec<usize> =
            (0..3).map(|t| cycle.iter().filter(|&&c| c == t).count()).collect();
        assert_eq!(counts, [6, 3, 1]);
    }
}
