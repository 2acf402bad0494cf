//! [`MemoryStore`]: the in-process budget store, the embedded default.
//!
//! Keys are spread over a fixed number of shards, each behind its own `std::sync::Mutex`, so
//! requests for different budgets rarely wait on each other; every [`Store`] method locks exactly
//! one shard (or, for the expiry sweep and pruning, one shard at a time), which makes each method
//! linearizable as the trait requires. Maps are `BTreeMap`s: deterministic, no hasher seed to
//! draw (the core takes no randomness) and no hash flooding from request-supplied scope values.
//!
//! Nothing here reads a clock or runs in the background: memory is reclaimed when the owner
//! calls [`Store::prune`] (the engine's `expire` does), which drops the counters of past periods.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::holds::HoldTable;
use super::store::{AddOutcome, Hold, Store, StoreError, Taken};
use crate::time::UnixMillis;

const SHARDS: usize = 16;

/// A thread-safe in-process [`Store`].
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
}

#[derive(Debug, Default)]
struct Shard {
    /// Counters and markers (a marker is a slot whose value is never read).
    slots: BTreeMap<String, Slot>,
    holds: HoldTable,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    value: i64,
    expires_at: UnixMillis,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore { shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect() }
    }

    /// How many counters and markers are stored (for tests and metrics).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).slots.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many reservations are open.
    pub fn open_holds(&self) -> usize {
        self.shards.iter().map(|s| lock(s).holds.open()).sum()
    }

    /// How many lapse marks are kept.
    pub fn lapse_marks(&self) -> usize {
        self.shards.iter().map(|s| lock(s).holds.lapse_marks()).sum()
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        lock(&self.shards[shard_index(key)])
    }
}

/// Locks a shard. A poisoned lock (a panic while it was held) is taken over: no critical
/// section here leaves a shard half-updated, and the Envoy filter must not panic in turn.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// FNV-1a: cheap, deterministic, good enough to spread keys over a handful of shards.
fn shard_index(key: &str) -> usize {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h as usize % SHARDS
}

impl Shard {
    /// Sets the counter `key` (0 if absent) to `f(current)` and returns the new value; extends
    /// its expiry. Allocates only when the key is new.
    fn update(&mut self, key: &str, expires_at: UnixMillis, f: impl FnOnce(i64) -> i64) -> i64 {
        match self.slots.get_mut(key) {
            Some(slot) => {
                slot.value = f(slot.value);
                slot.expires_at = slot.expires_at.max(expires_at);
                slot.value
            }
            None => {
                let value = f(0);
                self.slots.insert(key.to_owned(), Slot { value, expires_at });
                value
            }
        }
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &str) -> Result<i64, StoreError> {
        Ok(self.shard(key).slots.get(key).map_or(0, |s| s.value))
    }

    fn add(&self, key: &str, delta: i64, expires_at: UnixMillis) -> Result<i64, StoreError> {
        Ok(self.shard(key).update(key, expires_at, |v| v.saturating_add(delta)))
    }

    fn add_if_within(
        &self,
        key: &str,
        delta: i64,
        limit: i64,
        expires_at: UnixMillis,
    ) -> Result<AddOutcome, StoreError> {
        let mut shard = self.shard(key);
        let current = shard.slots.get(key).map_or(0, |s| s.value);
        let total = current.saturating_add(delta);
        if total > limit {
            return Ok(AddOutcome::Refused { current });
        }
        shard.update(key, expires_at, |_| total);
        Ok(AddOutcome::Applied { total })
    }

    fn insert_if_absent(&self, key: &str, expires_at: UnixMillis) -> Result<bool, StoreError> {
        let mut shard = self.shard(key);
        if shard.slots.contains_key(key) {
            return Ok(false);
        }
        shard.slots.insert(key.to_owned(), Slot { value: 1, expires_at });
        Ok(true)
    }

    fn put_hold(&self, hold: &Hold) -> Result<bool, StoreError> {
        Ok(self.shard(&hold.request_id).holds.put(hold))
    }

    fn take_hold(&self, request_id: &str) -> Result<Taken, StoreError> {
        Ok(self.shard(request_id).holds.take(request_id))
    }

    fn take_expired_holds(
        &self,
        now: UnixMillis,
        max: usize,
        lapse_until: UnixMillis,
    ) -> Result<Vec<Hold>, StoreError> {
        let mut taken = Vec::new();
        for shard in self.shards.iter() {
            lock(shard).holds.take_expired(now, max, lapse_until, &mut taken);
        }
        taken.sort_by_key(|h| h.expires_at);
        Ok(taken)
    }

    fn prune(&self, now: UnixMillis) -> Result<usize, StoreError> {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let before = shard.slots.len();
            shard.slots.retain(|_, slot| slot.expires_at > now);
            dropped += before - shard.slots.len() + shard.holds.prune(now);
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::budget::store::HoldEntry;

    const T: UnixMillis = UnixMillis(1_000);

    fn hold(id: &str, expires_at: u64) -> Hold {
        Hold {
            request_id: id.into(),
            expires_at: UnixMillis(expires_at),
            entries: vec![HoldEntry { key: "c".into(), amount: 5 }],
        }
    }

    #[test]
    fn add_if_within_applies_up_to_the_limit_inclusive() {
        let s = MemoryStore::new();
        let cases = [
            (4, AddOutcome::Applied { total: 4 }),
            (6, AddOutcome::Applied { total: 10 }),
            (1, AddOutcome::Refused { current: 10 }),
            (-3, AddOutcome::Applied { total: 7 }),
            (4, AddOutcome::Refused { current: 7 }),
            (3, AddOutcome::Applied { total: 10 }),
        ];
        for (delta, expected) in cases {
            assert_eq!(s.add_if_within("k", delta, 10, T), Ok(expected), "delta {delta}");
        }
        assert_eq!(s.get("k"), Ok(10));
        assert_eq!(s.get("missing"), Ok(0));
    }

    #[test]
    fn refused_add_creates_no_counter() {
        let s = MemoryStore::new();
        assert_eq!(s.add_if_within("k", 11, 10, T), Ok(AddOutcome::Refused { current: 0 }));
        assert!(s.is_empty());
    }

    #[test]
    fn add_goes_negative_and_saturates() {
        let s = MemoryStore::new();
        assert_eq!(s.add("k", -5, T), Ok(-5));
        assert_eq!(s.add("k", i64::MAX, T), Ok(i64::MAX - 5));
        assert_eq!(s.add("k", i64::MAX, T), Ok(i64::MAX));
    }

    #[test]
    fn markers_are_set_once() {
        let s = MemoryStore::new();
        assert_eq!(s.insert_if_absent("m", T), Ok(true));
        assert_eq!(s.insert_if_absent("m", T), Ok(false));
        assert_eq!(s.insert_if_absent("n", T), Ok(true));
    }

    #[test]
    fn prune_drops_only_expired_keys_and_keeps_the_latest_expiry() {
        let s = MemoryStore::new();
        s.add("old", 1, UnixMillis(100)).unwrap();
        s.add("extended", 1, UnixMillis(100)).unwrap();
        s.add("extended", 1, UnixMillis(300)).unwrap();
        s.add("extended", 1, UnixMillis(50)).unwrap();
        s.insert_if_absent("marker", UnixMillis(200)).unwrap();
        assert_eq!(s.prune(UnixMillis(99)), Ok(0));
        assert_eq!(s.prune(UnixMillis(100)), Ok(1));
        assert_eq!(s.get("old"), Ok(0));
        assert_eq!(s.prune(UnixMillis(250)), Ok(1));
        assert_eq!(s.get("extended"), Ok(3));
        assert_eq!(s.prune(UnixMillis(300)), Ok(1));
        assert!(s.is_empty());
    }

    #[test]
    fn holds_are_taken_once_and_expire_in_order() {
        let s = MemoryStore::new();
        for (id, at) in [("a", 30), ("b", 10), ("c", 20), ("d", 40)] {
            assert_eq!(s.put_hold(&hold(id, at)), Ok(true));
        }
        assert_eq!(s.put_hold(&hold("a", 99)), Ok(false));
        assert_eq!(s.take_hold("c"), Ok(Taken::Open(hold("c", 20))));
        assert_eq!(s.take_hold("c"), Ok(Taken::Absent));
        let expired = s.take_expired_holds(UnixMillis(30), 10, UnixMillis(500)).unwrap();
        let ids: Vec<_> = expired.iter().map(|h| h.request_id.as_str()).collect();
        assert_eq!(ids, ["b", "a"]);
        assert_eq!(s.take_hold("a"), Ok(Taken::Lapsed), "a lapsed hold leaves a mark");
        assert_eq!(s.take_hold("a"), Ok(Taken::Absent), "seen once");
        assert_eq!(s.open_holds(), 1);
        assert_eq!(s.take_expired_holds(UnixMillis(100), 0, UnixMillis(500)), Ok(vec![]));
        let d = s.take_expired_holds(UnixMillis(100), 10, UnixMillis(500));
        assert_eq!(d, Ok(vec![hold("d", 40)]));
        assert_eq!(s.lapse_marks(), 2, "b and d");
        assert_eq!(s.put_hold(&hold("d", 600)), Ok(true), "a put hold replaces the mark");
        assert_eq!(s.lapse_marks(), 1);
        assert_eq!(s.prune(UnixMillis(499)), Ok(0));
        assert_eq!(s.prune(UnixMillis(500)), Ok(1));
        assert_eq!(s.take_hold("b"), Ok(Taken::Absent), "its mark was pruned");
        assert_eq!(s.take_hold("d"), Ok(Taken::Open(hold("d", 600))));
    }

    #[test]
    fn a_settled_request_leaves_nothing_behind() {
        let s = MemoryStore::new();
        for i in 0..1_000 {
            let id = format!("r{i}");
            s.put_hold(&hold(&id, 10)).unwrap();
            assert!(matches!(s.take_hold(&id), Ok(Taken::Open(_))));
        }
        assert_eq!((s.open_holds(), s.lapse_marks(), s.len()), (0, 0, 0));
    }

    #[test]
    fn keys_spread_over_shards() {
        let used: BTreeSet<usize> = (0..200).map(|i| shard_index(&format!("k{i}"))).collect();
        assert_eq!(used.len(), SHARDS);
    }
}
