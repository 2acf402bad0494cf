//! Requests-per-minute and tokens-per-minute limits, with governor's GCRA.
//!
//! A limit comes from the decision (the matched rule's limits over the policy's defaults) and is
//! counted per agent and clause: every agent has its own allowance under each rule. One keyed
//! limiter exists per distinct quota value, created on first use; their state lives in
//! governor's sharded maps, so checking is lock-free on the hot path.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

type Keyed = RateLimiter<String, DashMapStateStore<String>, DefaultClock>;

/// Why a request was limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limited {
    Requests { limit: u64, retry_after: Duration },
    Tokens { limit: u64, retry_after: Duration },
}

#[derive(Default)]
pub struct RateLimits {
    rpm: DashMap<u32, Arc<Keyed>>,
    tpm: DashMap<u32, Arc<Keyed>>,
}

impl RateLimits {
    /// Takes one request and `tokens` tokens from the allowances of `key`, if both have room.
    pub fn check(
        &self,
        key: &str,
        rpm: Option<u64>,
        tpm: Option<u64>,
        tokens: u64,
    ) -> Result<(), Limited> {
        if let Some(limit) = rpm.and_then(nonzero) {
            let limiter = limiter(&self.rpm, limit);
            if let Err(not_until) = limiter.check_key(&key.to_string()) {
                let retry_after = not_until.wait_time_from(DefaultClock::default().now());
                return Err(Limited::Requests { limit: u64::from(limit.get()), retry_after });
            }
        }
        if let Some(limit) = tpm.and_then(nonzero) {
            let limiter = limiter(&self.tpm, limit);
            let n = NonZeroU32::new(tokens.clamp(1, u64::from(u32::MAX)) as u32)
                .unwrap_or(NonZeroU32::MIN);
            match limiter.check_key_n(&key.to_string(), n) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    let retry_after = not_until.wait_time_from(DefaultClock::default().now());
                    return Err(Limited::Tokens { limit: u64::from(limit.get()), retry_after });
                }
                // More tokens than a whole minute allows: waiting will not help.
                Err(_) => {
                    return Err(Limited::Tokens {
                        limit: u64::from(limit.get()),
                        retry_after: Duration::from_secs(60),
                    })
                }
            }
        }
        Ok(())
    }

    /// Forgets keys whose allowance is full again, bounding memory.
    pub fn prune(&self) {
        for l in self.rpm.iter() {
            l.retain_recent();
        }
        for l in self.tpm.iter() {
            l.retain_recent();
        }
    }
}

fn nonzero(n: u64) -> Option<NonZeroU32> {
    NonZeroU32::new(n.min(u64::from(u32::MAX)) as u32)
}

fn limiter(map: &DashMap<u32, Arc<Keyed>>, per_minute: NonZeroU32) -> Arc<Keyed> {
    if let Some(l) = map.get(&per_minute.get()) {
        return l.clone();
    }
    map.entry(per_minute.get())
        .or_insert_with(|| Arc::new(RateLimiter::dashmap(Quota::per_minute(per_minute))))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_per_minute_allow_the_burst_then_refuse() {
        let limits = RateLimits::default();
        for _ in 0..3 {
            assert_eq!(limits.check("a", Some(3), None, 0), Ok(()));
        }
        assert!(matches!(
            limits.check("a", Some(3), None, 0),
            Err(Limited::Requests { limit: 3, .. })
        ));
        // Another key has its own allowance.
        assert_eq!(limits.check("b", Some(3), None, 0), Ok(()));
    }

    #[test]
    fn tokens_per_minute_count_tokens() {
        let limits = RateLimits::default();
        assert_eq!(limits.check("a", None, Some(1000), 600), Ok(()));
        assert!(matches!(limits.check("a", None, Some(1000), 600), Err(Limited::Tokens { .. })));
        assert!(matches!(limits.check("b", None, Some(1000), 5000), Err(Limited::Tokens { .. })));
    }
}
