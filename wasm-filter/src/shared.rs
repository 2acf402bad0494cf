//! Budget and rate-limit counters in Envoy's shared data, so that every worker thread (every VM
//! of one `vm_id`) of one Envoy counts against the same numbers.
//!
//! Shared data is a map of byte strings with a version (`cas`) per key: `get` returns the value
//! and its version, `set` with a version succeeds only if the key still has that version. Every
//! counter update here is a get → compute → CAS loop, which makes each [`Store`] method atomic
//! across workers as the trait requires.
//!
//! One trap: a key that does not exist yet has no version, and a `set` without
//! one is unconditional, so two workers creating the same counter at once could lose one
//! update. Counters are therefore created under a lock key (itself seeded in `on_configure`,
//! before traffic): the creator takes the lock with a CAS, creates the key only if it is still
//! absent, and releases the lock. Creation happens once per counter per period; every other
//! update is a plain CAS on the existing key.
//!
//! Holds (open reservations) and their lapse marks stay in the VM that made them: a request
//! lives in one worker from headers to `on_log`, so nobody else needs them, and shared data has
//! no way to list or drop keys. If a VM dies, its holds are lost and the money they held stays
//! reserved until the budget's period ends (documented in the README). Settling takes the hold,
//! so a settled request leaves nothing behind; each reservation gets an id unique across VMs
//! ([`SharedStore::reservation_id`]: a random per-VM prefix and a sequence, so a client reusing
//! an `x-request-id`, on one worker or several, cannot collide with an earlier request).
//!
//! Set-once markers (the core uses them only when charging without a reservation, which the
//! filter never does) are bounded by count: the newest [`MARKERS_KEPT`] are kept.
//!
//! Counters never expire from shared data (it cannot delete): one small key per budget, scope
//! value and period window stays until Envoy restarts.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, VecDeque};

use tollgate_core::budget::{AddOutcome, Hold, HoldTable, Store, StoreError, Taken};
use tollgate_core::time::UnixMillis;

/// The lock under which counters are created.
pub const CREATE_LOCK_KEY: &str = "tollgate:create-lock";
/// Set-once markers kept per VM (oldest dropped first).
pub const MARKERS_KEPT: usize = 4096;
/// How many times an update retries after losing a CAS race before giving up.
const MAX_ATTEMPTS: u32 = 10_000;

/// Envoy's shared data, as the filter uses it.
pub trait SharedData {
    /// The value and its version, `None` if the key does not exist.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// Sets the value if the key still has version `cas` (any version when `None`). `Ok(false)`
    /// on a version mismatch.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError>;
}

impl<D: SharedData + ?Sized> SharedData for &D {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        (**self).get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        (**self).set(key, value, cas)
    }
}

/// Creates the lock key if it is missing. Call before traffic (from `on_configure`): two VMs
/// seeding at once both write the unlocked value, which is harmless.
pub fn seed(data: &impl SharedData) -> Result<(), StoreError> {
    if data.get(CREATE_LOCK_KEY)?.is_none() {
        data.set(CREATE_LOCK_KEY, b"0", None)?;
    }
    Ok(())
}

/// A budget [`Store`] over shared data (counters) and this VM's memory (holds, markers).
pub struct SharedStore<D> {
    data: D,
    local: RefCell<Local>,
    sequence: Cell<u64>,
    /// Makes this VM's reservation ids unique among every worker's (see
    /// [`SharedStore::with_id_prefix`]).
    id_prefix: u64,
}

#[derive(Default)]
struct Local {
    markers: BTreeSet<String>,
    /// Markers in insertion order, for dropping the oldest.
    marker_order: VecDeque<String>,
    holds: HoldTable,
}

impl<D: SharedData> SharedStore<D> {
    pub fn new(data: D) -> Self {
        SharedStore {
            data,
            local: RefCell::new(Local::default()),
            sequence: Cell::new(0),
            id_prefix: 0,
        }
    }

    /// The store with `prefix` in its reservation ids: a random number per VM, so that two
    /// workers (each its own VM, with its own sequence) never make the same id for a request id
    /// they both see (a caller's `x-request-id`, a retry).
    pub fn with_id_prefix(mut self, prefix: u64) -> Self {
        self.id_prefix = prefix;
        self
    }

    /// The budget reservation id of a request: its id, this VM's prefix and a sequence number
    /// unique in this VM.
    pub fn reservation_id(&self, request_id: &str) -> String {
        let n = self.sequence.get().wrapping_add(1);
        self.sequence.set(n);
        format!("{request_id}#{:016x}-{n}", self.id_prefix)
    }

    pub fn data(&self) -> &D {
        &self.data
    }

    /// Applies `f` to the counter (0 when absent) until a CAS succeeds; `f` returns the new
    /// value, or `None` to leave the counter alone. Returns `(before, after)`.
    fn update(
        &self,
        key: &str,
        mut f: impl FnMut(i64) -> Option<i64>,
    ) -> Result<(i64, Option<i64>), StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            let Some((bytes, cas)) = self.data.get(key)? else {
                let current = 0;
                let Some(next) = f(current) else { return Ok((current, None)) };
                self.create(key)?;
                // Created at 0 (or by someone else meanwhile): apply with a CAS next round.
                let _ = next;
                continue;
            };
            let current = decode(key, &bytes)?;
            let Some(next) = f(current) else { return Ok((current, None)) };
            if self.data.set(key, &next.to_le_bytes(), Some(cas))? {
                return Ok((current, Some(next)));
            }
        }
        Err(StoreError::Contended { key: key.to_owned(), attempts: MAX_ATTEMPTS })
    }

    /// Applies `f` to the record in `key` (`initial` when absent: never empty, which the host
    /// may hand back as no value) until a CAS succeeds; `f` returns the new record, or `None` to
    /// leave it alone. For records that are not one counter (the autonomy budget's day, the
    /// loop detector's slots): each holds everything one decision reads and writes, so one CAS
    /// makes the decision atomic across workers.
    pub fn update_record(
        &self,
        key: &str,
        initial: &[u8],
        mut f: impl FnMut(&[u8]) -> Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            let Some((bytes, cas)) = self.data.get(key)? else {
                if f(initial).is_none() {
                    return Ok(());
                }
                // Created (or by someone else meanwhile): apply with a CAS next round.
                self.create_with(key, initial)?;
                continue;
            };
            let Some(next) = f(&bytes) else { return Ok(()) };
            if self.data.set(key, &next, Some(cas))? {
                return Ok(());
            }
        }
        Err(StoreError::Contended { key: key.to_owned(), attempts: MAX_ATTEMPTS })
    }

    /// Creates `key` at 0 unless it exists, under the creation lock.
    fn create(&self, key: &str) -> Result<(), StoreError> {
        self.create_with(key, &0i64.to_le_bytes())
    }

    /// Creates `key` holding `initial` unless it exists, under the creation lock.
    fn create_with(&self, key: &str, initial: &[u8]) -> Result<(), StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            match self.data.get(CREATE_LOCK_KEY)? {
                None => {
                    seed(&self.data)?;
                }
                Some((held, _)) if held.as_slice() != b"0" => {}
                Some((_, cas)) => {
                    if !self.data.set(CREATE_LOCK_KEY, b"1", Some(cas))? {
                        continue;
                    }
                    let created = match self.data.get(key) {
                        Ok(None) => self.data.set(key, initial, None).map(|_| ()),
                        Ok(Some(_)) => Ok(()),
                        Err(e) => Err(e),
                    };
                    self.data.set(CREATE_LOCK_KEY, b"0", None)?;
                    return created;
                }
            }
        }
        Err(StoreError::Contended { key: CREATE_LOCK_KEY.to_owned(), attempts: MAX_ATTEMPTS })
    }

    /// One fixed-window counter in one key: the window's number in the high 32 bits, the count
    /// in the low 32. A call in a newer window starts the count again, so the key is reused
    /// window after window instead of one key per window piling up in shared data (which
    /// cannot delete). `Ok(used)` after taking one, `Err(used)` when `limit` is reached.
    pub fn take_in_window(
        &self,
        key: &str,
        window: u32,
        limit: u32,
    ) -> Result<Result<u32, u32>, StoreError> {
        let mut used = 0u32;
        let (_, applied) = self.update(key, |packed| {
            let (stored_window, count) = ((packed >> 32) as u32, packed as u32);
            // A worker whose clock is behind counts against the newer window.
            let current = window.max(stored_window);
            used = if stored_window == current { count } else { 0 };
            (used < limit).then(|| (i64::from(current) << 32) | i64::from(used + 1))
        })?;
        Ok(match applied {
            Some(_) => Ok(used + 1),
            None => Err(used),
        })
    }

    /// A GCRA rate limit over shared data: `cost` units against `per_minute`, with a burst of
    /// one minute's allowance (the sidecar's governor quota). `Err(retry_after_ms)` when
    /// refused; a cost above the whole allowance is refused with a minute.
    pub fn take_rate(
        &self,
        key: &str,
        per_minute: u64,
        cost: u64,
        now_ns: u64,
    ) -> Result<Result<(), u64>, StoreError> {
        const MINUTE_NS: u64 = 60_000_000_000;
        if per_minute == 0 {
            return Ok(Ok(()));
        }
        if cost > per_minute {
            return Ok(Err(60_000));
        }
        let interval = MINUTE_NS / per_minute;
        let burst = interval.saturating_mul(per_minute);
        let now = i64::try_from(now_ns).unwrap_or(i64::MAX);
        let mut refused_for = 0u64;
        let (_, applied) = self.update(key, |tat| {
            let start = tat.max(now);
            let next = start.saturating_add(i64::try_from(interval * cost).unwrap_or(i64::MAX));
            let ahead = u64::try_from(next.saturating_sub(now)).unwrap_or(0);
            if ahead > burst {
                refused_for = ahead - burst;
                None
            } else {
                Some(next)
            }
        })?;
        Ok(match applied {
            Some(_) => Ok(()),
            None => Err(refused_for.div_ceil(1_000_000).max(1)),
        })
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<i64, StoreError> {
    let array: [u8; 8] =
        bytes.try_into().map_err(|_| StoreError::Corrupt { key: key.to_owned() })?;
    Ok(i64::from_le_bytes(array))
}

impl<D: SharedData> Store for SharedStore<D> {
    fn get(&self, key: &str) -> Result<i64, StoreError> {
        match self.data.get(key)? {
            Some((bytes, _)) => decode(key, &bytes),
            None => Ok(0),
        }
    }

    fn add(&self, key: &str, delta: i64, _expires_at: UnixMillis) -> Result<i64, StoreError> {
        let (before, after) = self.update(key, |v| Some(v.saturating_add(delta)))?;
        Ok(after.unwrap_or(before))
    }

    fn add_if_within(
        &self,
        key: &str,
        delta: i64,
        limit: i64,
        _expires_at: UnixMillis,
    ) -> Result<AddOutcome, StoreError> {
        let (current, applied) = self.update(key, |v| {
            let total = v.saturating_add(delta);
            (total <= limit).then_some(total)
        })?;
        Ok(match applied {
            Some(total) => AddOutcome::Applied { total },
            None => AddOutcome::Refused { current },
        })
    }

    fn insert_if_absent(&self, key: &str, _expires_at: UnixMillis) -> Result<bool, StoreError> {
        let mut local = self.local.borrow_mut();
        if !local.markers.insert(key.to_owned()) {
            return Ok(false);
        }
        local.marker_order.push_back(key.to_owned());
        if local.marker_order.len() > MARKERS_KEPT {
            if let Some(oldest) = local.marker_order.pop_front() {
                local.markers.remove(&oldest);
            }
        }
        Ok(true)
    }

    fn put_hold(&self, hold: &Hold) -> Result<bool, StoreError> {
        Ok(self.local.borrow_mut().holds.put(hold))
    }

    fn take_hold(&self, request_id: &str) -> Result<Taken, StoreError> {
        Ok(self.local.borrow_mut().holds.take(request_id))
    }

    fn take_expired_holds(
        &self,
        now: UnixMillis,
        max: usize,
        lapse_until: UnixMillis,
    ) -> Result<Vec<Hold>, StoreError> {
        let mut taken = Vec::new();
        self.local.borrow_mut().holds.take_expired(now, max, lapse_until, &mut taken);
        Ok(taken)
    }

    fn prune(&self, now: UnixMillis) -> Result<usize, StoreError> {
        // Markers are bounded by count (see the module documentation), not by time; lapse marks
        // by time.
        Ok(self.local.borrow_mut().holds.prune(now))
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! An in-memory shared data with Envoy's semantics, for tests.
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct FakeShared {
        map: Mutex<HashMap<String, (Vec<u8>, u32)>>,
        next_cas: Mutex<u32>,
        /// When set, the next `set` with a version fails with a mismatch (another worker won).
        pub lose_next_race: Mutex<u32>,
    }

    impl SharedData for FakeShared {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            Ok(self.map.lock().unwrap().get(key).cloned())
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
            let mut map = self.map.lock().unwrap();
            if cas.is_some() {
                let mut lose = self.lose_next_race.lock().unwrap();
                if *lose > 0 {
                    *lose -= 1;
                    return Ok(false);
                }
            }
            if let (Some(cas), Some((_, current))) = (cas, map.get(key)) {
                if cas != *current {
                    return Ok(false);
                }
            }
            let mut next = self.next_cas.lock().unwrap();
            *next += 1;
            map.insert(key.to_owned(), (value.to_vec(), *next));
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeShared;
    use super::*;
    use std::sync::Arc;
    use tollgate_core::budget::HoldEntry;

    const T: UnixMillis = UnixMillis(1_000);

    #[test]
    fn add_if_within_applies_up_to_the_limit_inclusive() {
        let data = FakeShared::default();
        seed(&data).unwrap();
        let s = SharedStore::new(&data);
        let cases = [
            (4, AddOutcome::Applied { total: 4 }),
            (6, AddOutcome::Applied { total: 10 }),
            (1, AddOutcome::Refused { current: 10 }),
            (-3, AddOutcome::Applied { total: 7 }),
            (4, AddOutcome::Refused { current: 7 }),
        ];
        for (delta, expected) in cases {
            assert_eq!(s.add_if_within("k", delta, 10, T), Ok(expected), "delta {delta}");
        }
        assert_eq!(s.get("k"), Ok(7));
        assert_eq!(s.get("missing"), Ok(0));
        assert_eq!(s.add_if_within("new", 11, 10, T), Ok(AddOutcome::Refused { current: 0 }));
        assert_eq!(data.get("new").unwrap(), None, "a refused add creates nothing");
    }

    #[test]
    fn a_lost_cas_race_is_retried() {
        let data = FakeShared::default();
        let s = SharedStore::new(&data);
        assert_eq!(s.add("k", 5, T), Ok(5));
        *data.lose_next_race.lock().unwrap() = 3;
        assert_eq!(s.add("k", 2, T), Ok(7));
        assert_eq!(*data.lose_next_race.lock().unwrap(), 0);
    }

    #[test]
    fn a_counter_that_keeps_losing_reports_contention() {
        let data = FakeShared::default();
        let s = SharedStore::new(&data);
        assert_eq!(s.add("k", 1, T), Ok(1));
        *data.lose_next_race.lock().unwrap() = u32::MAX;
        assert!(matches!(s.add("k", 1, T), Err(StoreError::Contended { attempts: 10_000, .. })));
    }

    #[test]
    fn a_malformed_value_is_reported_as_corrupt() {
        let data = FakeShared::default();
        data.set("k", b"abc", None).unwrap();
        let s = SharedStore::new(&data);
        assert_eq!(s.get("k"), Err(StoreError::Corrupt { key: "k".into() }));
        assert!(s.add("k", 1, T).is_err());
    }

    #[test]
    fn the_creation_lock_is_released_after_creating() {
        let data = FakeShared::default();
        let s = SharedStore::new(&data);
        for key in ["a", "b", "c"] {
            assert_eq!(s.add(key, 1, T), Ok(1));
        }
        assert_eq!(data.get(CREATE_LOCK_KEY).unwrap().map(|(v, _)| v), Some(b"0".to_vec()));
    }

    #[test]
    fn concurrent_workers_never_pass_the_limit_nor_lose_updates() {
        // Four "workers", each with its own VM-local store over one shared data, racing on keys
        // that do not exist yet (the trap in the module docs).
        let data = Arc::new(FakeShared::default());
        seed(&*data).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let data = data.clone();
                std::thread::spawn(move || {
                    let s = SharedStore::new(&*data);
                    let mut applied = 0;
                    for i in 0..500 {
                        s.add(&format!("fresh-{}", i % 50), 1, T).unwrap();
                        if let AddOutcome::Applied { .. } =
                            s.add_if_within("limited", 3, 1_000, T).unwrap()
                        {
                            applied += 1;
                        }
                    }
                    applied
                })
            })
            .collect();
        let applied: i64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let s = SharedStore::new(&*data);
        assert_eq!(applied, 333);
        assert_eq!(s.get("limited"), Ok(999));
        let total: i64 = (0..50).map(|i| s.get(&format!("fresh-{i}")).unwrap()).sum();
        assert_eq!(total, 2000, "every increment counted");
    }

    #[test]
    fn concurrent_workers_take_a_record_budget_exactly_once_each() {
        use tollgate_core::autonomy::{BudgetOutcome, DayCounts, Limits};
        // Four workers racing on one agent's autonomy record, which no one created yet.
        let data = Arc::new(FakeShared::default());
        seed(&*data).unwrap();
        let limits = Limits { per_day: Some(150), per_action: Some(100) };
        let threads: Vec<_> = (0..4)
            .map(|w| {
                let data = data.clone();
                std::thread::spawn(move || {
                    let s = SharedStore::new(&*data);
                    let mut consumed = 0;
                    for i in 0..60 {
                        let action = if (i + w) % 2 == 0 { "deploy" } else { "read" };
                        let mut outcome = None;
                        let initial = DayCounts::default().encode();
                        s.update_record("agent", &initial, |bytes| {
                            let mut day = DayCounts::decode(bytes)?;
                            let o = day.consume(limits, action, T);
                            outcome = Some(o);
                            matches!(o, BudgetOutcome::Consumed { .. }).then(|| day.encode())
                        })
                        .unwrap();
                        if matches!(outcome, Some(BudgetOutcome::Consumed { .. })) {
                            consumed += 1;
                        }
                    }
                    consumed
                })
            })
            .collect();
        let consumed: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(consumed, 150, "exactly the daily limit, never more, none lost");
        let (bytes, _) = data.get("agent").unwrap().unwrap();
        let mut day = DayCounts::decode(&bytes).unwrap();
        let after = day.consume(Limits::default(), "read", T);
        assert!(matches!(after, BudgetOutcome::Consumed { used: 151, .. }), "{after:?}");
    }

    #[test]
    fn holds_and_markers_are_local_and_taken_once() {
        let data = FakeShared::default();
        let s = SharedStore::new(&data);
        let hold = |id: &str, at: u64| Hold {
            request_id: id.into(),
            expires_at: UnixMillis(at),
            entries: vec![HoldEntry { key: "c".into(), amount: 5 }],
        };
        assert_eq!(s.put_hold(&hold("a", 30)), Ok(true));
        assert_eq!(s.put_hold(&hold("b", 10)), Ok(true));
        assert_eq!(s.put_hold(&hold("a", 99)), Ok(false));
        let lapse_until = UnixMillis(100);
        assert_eq!(s.take_expired_holds(UnixMillis(20), 10, lapse_until), Ok(vec![hold("b", 10)]));
        assert_eq!(s.take_hold("a"), Ok(Taken::Open(hold("a", 30))));
        assert_eq!(s.take_hold("a"), Ok(Taken::Absent));
        assert_eq!(s.prune(UnixMillis(99)), Ok(0));
        assert_eq!(s.take_hold("b"), Ok(Taken::Lapsed), "the sweep left a lapse mark");
        assert_eq!(s.take_hold("b"), Ok(Taken::Absent), "seen once");
        assert_eq!(s.insert_if_absent("m", UnixMillis(50)), Ok(true));
        assert_eq!(s.insert_if_absent("m", UnixMillis(50)), Ok(false));
    }

    #[test]
    fn markers_are_bounded_by_count_keeping_the_newest() {
        let data = FakeShared::default();
        let s = SharedStore::new(&data);
        for i in 0..MARKERS_KEPT + 5 {
            assert_eq!(s.insert_if_absent(&format!("m{i}"), UnixMillis(1)), Ok(true));
        }
        assert_eq!(s.local.borrow().markers.len(), MARKERS_KEPT);
        let newest = format!("m{}", MARKERS_KEPT + 4);
        assert_eq!(s.insert_if_absent(&newest, UnixMillis(1)), Ok(false), "newest kept");
        assert_eq!(s.insert_if_absent("m0", UnixMillis(1)), Ok(true), "oldest dropped");
    }

    #[test]
    fn a_window_counter_reuses_its_key_and_starts_again_in_the_next_window() {
        let data = FakeShared::default();
        let s = SharedStore::new(&data);
        assert_eq!(s.take_in_window("g", 7, 2), Ok(Ok(1)));
        assert_eq!(s.take_in_window("g", 7, 2), Ok(Ok(2)));
        assert_eq!(s.take_in_window("g", 7, 2), Ok(Err(2)));
        assert_eq!(s.take_in_window("g", 8, 2), Ok(Ok(1)), "a new window");
        assert_eq!(s.take_in_window("g", 7, 2), Ok(Ok(2)), "a late clock counts in the newer one");
        assert_eq!(s.take_in_window("g", 8, 2), Ok(Err(2)));
    }

    #[test]
    fn reservation_ids_are_unique_per_store_even_for_a_reused_request_id() {
        let data = FakeShared::default();
        let s = SharedStore::new(&data).with_id_prefix(0xab);
        assert_eq!(s.reservation_id("req"), "req#00000000000000ab-1");
        assert_eq!(s.reservation_id("req"), "req#00000000000000ab-2");
        // Another worker (its own VM, its own sequence) sees the same request id: its own
        // prefix keeps the two reservations apart in the shared budget.
        let other = SharedStore::new(&data).with_id_prefix(0xcd);
        assert_ne!(other.reservation_id("req"), "req#00000000000000ab-1");
    }

    #[test]
    fn rate_limit_allows_the_burst_then_refuses_until_refilled() {
        let data = FakeShared::default();
        let s = SharedStore::new(&data);
        let sec = 1_000_000_000u64;
        let t0 = 1_000 * sec;
        for _ in 0..3 {
            assert_eq!(s.take_rate("r", 3, 1, t0), Ok(Ok(())));
        }
        assert_eq!(s.take_rate("r", 3, 1, t0), Ok(Err(20_000)), "one cell per 20 s");
        assert_eq!(s.take_rate("r", 3, 1, t0 + 20 * sec), Ok(Ok(())));
        assert_eq!(s.take_rate("other", 3, 1, t0), Ok(Ok(())));
        assert_eq!(s.take_rate("t", 1000, 600, t0), Ok(Ok(())));
        assert!(matches!(s.take_rate("t", 1000, 600, t0), Ok(Err(_))));
        assert_eq!(s.take_rate("t", 1000, 5000, t0), Ok(Err(60_000)));
    }
}
