//! Loop detection ("infinite_loop"): an agent sending the same call with the
//! same arguments over and over is stuck, and each repeat costs money.
//!
//! A call is identified by a deterministic 64-bit digest of (agent, action, arguments): FNV-1a
//! over a canonical walk of the JSON, where object entries are combined order-independently, so
//! `{"a":1,"b":2}` and `{"b":2,"a":1}` are the same call whatever map type serde_json was built
//! with. No random seed is involved: every process, the proxy and the wasm filter alike,
//! computes the same digest.
//!
//! At most `max_repeats` identical calls are allowed in any sliding window of `window_ms`; the
//! next one within the window is blocked with `loop_detected` (with
//! `MAX_RETRIES = 3` the fourth identical call is refused). Blocked calls are not counted, so a
//! looping agent gets at most `max_repeats` calls per window through. A call at exactly
//! `window_ms` after an earlier one no longer sees it. Memory is bounded: entries whose last
//! call left the window are swept once per window, and past `max_keys` the least recently seen
//! key is evicted (losing its history rather than growing without bound).
//!
//! This module tracks and decides; it never tells the agent or a human anything.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use serde_json::Value;

use crate::doc::{Cx, Field};
use crate::time::UnixMillis;

pub mod merged;
pub use merged::Merged;

/// Loop detection settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopConfig {
    /// Identical calls allowed per window (`MAX_RETRIES`, 3 by default).
    pub max_repeats: u32,
    pub window_ms: u64,
    /// Distinct calls tracked at most.
    pub max_keys: usize,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig { max_repeats: 3, window_ms: 10 * 60_000, max_keys: 100_000 }
    }
}

impl LoopConfig {
    /// Decodes `{max_repeats: 3, window: 10m, max_keys: 100000}`, each optional.
    pub fn decode(cx: &mut Cx, field: &Field<'_>) -> LoopConfig {
        let mut c = LoopConfig::default();
        let Some(mut obj) = cx.object(field) else { return c };
        if let Some(f) = obj.get("max_repeats") {
            match f.u64(cx).map(u32::try_from) {
                Some(Ok(n)) if n > 0 => c.max_repeats = n,
                Some(_) => f.error(cx, "must be a positive integer"),
                None => {}
            }
        }
        if let Some(f) = obj.get("window") {
            match f.duration_ms(cx) {
                Some(0) => f.error(cx, "must be longer than zero"),
                Some(ms) => c.window_ms = ms,
                None => {}
            }
        }
        if let Some(f) = obj.get("max_keys") {
            match f.u64(cx).map(usize::try_from) {
                Some(Ok(n)) if n > 0 => c.max_keys = n,
                Some(_) => f.error(cx, "must be a positive integer"),
                None => {}
            }
        }
        obj.finish(cx, &["max_repeats", "window", "max_keys"]);
        c
    }
}

/// Whether a call is a repeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repeat {
    /// Allowed; `count` identical calls in the window, this one included.
    Fresh { count: u32 },
    /// Blocked (`loop_detected`): `count` identical calls already in the window; the oldest
    /// leaves it in `retry_after_ms`.
    Loop { count: u32, retry_after_ms: u64 },
}

impl Repeat {
    pub const REASON: &'static str = "loop_detected";

    pub fn is_loop(&self) -> bool {
        matches!(self, Repeat::Loop { .. })
    }

    /// A human explanation for a blocked call.
    pub fn explanation(&self, action: &str) -> Option<String> {
        match self {
            Repeat::Fresh { .. } => None,
            Repeat::Loop { count, retry_after_ms } => Some(format!(
                "the same `{}` call with the same arguments was made {count} times in the \
                 window: looks like a loop; retry in {}s",
                super::patterns::excerpt(action),
                retry_after_ms.div_ceil(1000)
            )),
        }
    }
}

#[derive(Debug)]
struct Entry {
    // Times of the allowed calls still in the window, oldest first; at most `max_repeats`.
    times: Vec<u64>,
}

/// One call against the times of the allowed identical calls before it (`times`): drops those
/// that left the window, then refuses the call if `max_repeats` are still in it, or records
/// `now`. The decision of [`LoopDetector`] and of every store that keeps the times itself
/// ([`Slot`]). Pure.
pub fn slide(times: &mut Vec<u64>, now: u64, max_repeats: u32, window_ms: u64) -> Repeat {
    times.retain(|&t| now.saturating_sub(t) < window_ms);
    let count = u32::try_from(times.len()).unwrap_or(u32::MAX);
    if count >= max_repeats.max(1) {
        let oldest = times.iter().copied().min().unwrap_or(now);
        let retry_after_ms = oldest.saturating_add(window_ms).saturating_sub(now).max(1);
        return Repeat::Loop { count, retry_after_ms };
    }
    times.push(now);
    Repeat::Fresh { count: count + 1 }
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<u64, Entry>,
    last_sweep: u64,
}

/// The loop detector, shared by every thread (`&self`).
#[derive(Debug)]
pub struct LoopDetector {
    config: LoopConfig,
    state: Mutex<State>,
}

impl LoopDetector {
    pub fn new(config: LoopConfig) -> Self {
        LoopDetector { config, state: Mutex::new(State::default()) }
    }

    pub fn config(&self) -> LoopConfig {
        self.config
    }

    /// Records a call of `action` by `agent` with `args` at `now`, unless it is a loop.
    pub fn observe(&self, agent: &str, action: &str, args: &Value, now: UnixMillis) -> Repeat {
        self.observe_digest(digest(agent, action, args), now)
    }

    /// [`LoopDetector::observe`] for a precomputed [`digest`].
    pub fn observe_digest(&self, key: u64, now: UnixMillis) -> Repeat {
        let now = now.as_millis();
        let LoopConfig { max_repeats, window_ms, max_keys } = self.config;
        let max_repeats = max_repeats.max(1);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now.saturating_sub(state.last_sweep) >= window_ms {
            state
                .entries
                .retain(|_, e| e.times.last().is_some_and(|&t| now.saturating_sub(t) < window_ms));
            state.last_sweep = now;
        }
        if !state.entries.contains_key(&key) && state.entries.len() >= max_keys.max(1) {
            let oldest = state
                .entries
                .iter()
                .min_by_key(|(_, e)| e.times.last().copied().unwrap_or(0))
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                state.entries.remove(&k);
            }
        }
        let entry = state
            .entries
            .entry(key)
            .or_insert_with(|| Entry { times: Vec::with_capacity(max_repeats as usize) });
        slide(&mut entry.times, now, max_repeats, window_ms)
    }

    /// The number of distinct calls tracked.
    pub fn tracked(&self) -> usize {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).entries.len()
    }
}

/// Most keys a store that cannot delete keys spreads the loop detector over (see [`Slot`]).
pub const MAX_SLOTS: usize = 1024;

/// The loop detector's state for a store shared by processes that cannot delete keys (Envoy
/// shared data): the calls are spread over a fixed number of keys ([`Slot::count`], at most
/// [`MAX_SLOTS`]) by digest ([`Slot::index`]), each key one `Slot` holding the tracked calls
/// of its digests. The store reads a slot, [`Slot::observe`]s the call and writes the slot back
/// atomically (a compare-and-swap), so every worker sees every call. Memory stays bounded as
/// [`LoopDetector`]'s does: a call whose times all left the window is dropped from its slot
/// when the slot is next written, and past its share of `max_keys` a slot evicts its least
/// recently seen call. Pure: decoding, deciding and encoding only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    /// (digest, times of its allowed calls still in the window).
    entries: Vec<(u64, Vec<u64>)>,
}

impl Slot {
    /// How many slots `config` spreads its calls over.
    pub fn count(config: &LoopConfig) -> usize {
        config.max_keys.clamp(1, MAX_SLOTS)
    }

    /// The slot of the call `digest`.
    pub fn index(digest: u64, config: &LoopConfig) -> usize {
        (digest % Slot::count(config) as u64) as usize
    }

    /// Distinct calls one slot tracks at most.
    fn capacity(config: &LoopConfig) -> usize {
        config.max_keys.max(1).div_ceil(Slot::count(config))
    }

    /// Decodes a stored slot (empty bytes: an empty slot). `None`: not a slot.
    pub fn decode(bytes: &[u8]) -> Option<Slot> {
        crate::slot::decode(bytes, |r| {
            let entries = r.list(|r| Some((r.u64()?, r.list(crate::slot::Reader::u64)?)))?;
            Some(Slot { entries })
        })
    }

    /// The bytes [`Slot::decode`] reads.
    pub fn encode(&self) -> Vec<u8> {
        let times: usize = self.entries.iter().map(|(_, t)| t.len()).sum();
        let mut w = crate::slot::Writer::with_capacity(4 + self.entries.len() * 12 + times * 8);
        w.count(self.entries.len());
        for (digest, times) in &self.entries {
            w.u64(*digest);
            w.count(times.len());
            for t in times {
                w.u64(*t);
            }
        }
        w.into_bytes()
    }

    /// Records the call `digest` at `now` unless it is a loop ([`slide`]), dropping the calls
    /// that left the window and, past the slot's capacity, the least recently seen one.
    pub fn observe(&mut self, digest: u64, now: UnixMillis, config: &LoopConfig) -> Repeat {
        let now = now.as_millis();
        let window_ms = config.window_ms;
        self.entries.retain(|(d, times)| {
            *d == digest || times.iter().any(|&t| now.saturating_sub(t) < window_ms)
        });
        let i = match self.entries.iter().position(|(d, _)| *d == digest) {
            Some(i) => i,
            None => {
                if self.entries.len() >= Slot::capacity(config) {
                    let last_seen = |(_, times): &(u64, Vec<u64>)| times.iter().max().copied();
                    let oldest =
                        (0..self.entries.len()).min_by_key(|&i| last_seen(&self.entries[i]));
                    if let Some(oldest) = oldest {
                        self.entries.swap_remove(oldest);
                    }
                }
                self.entries.push((digest, Vec::new()));
                self.entries.len() - 1
            }
        };
        slide(&mut self.entries[i].1, now, config.max_repeats, window_ms)
    }

    /// The number of distinct calls tracked.
    pub fn tracked(&self) -> usize {
        self.entries.len()
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const MAX_DIGEST_DEPTH: usize = 128;

struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(FNV_OFFSET)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }

    // Length-prefixed so that ("ab","c") and ("a","bc") differ.
    fn str(&mut self, s: &str) {
        self.bytes(&(s.len() as u64).to_le_bytes());
        self.bytes(s.as_bytes());
    }
}

/// The stable digest of a call: agent, action and canonicalised arguments. Allocation-free.
pub fn digest(agent: &str, action: &str, args: &Value) -> u64 {
    let mut h = Fnv::new();
    h.str(agent);
    h.str(action);
    h.bytes(&value_digest(args, 0).to_le_bytes());
    h.0
}

fn value_digest(v: &Value, depth: usize) -> u64 {
    let mut h = Fnv::new();
    if depth > MAX_DIGEST_DEPTH {
        h.bytes(b"~");
        return h.0;
    }
    match v {
        Value::Null => h.bytes(b"n"),
        Value::Bool(b) => h.bytes(if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                h.bytes(b"u");
                h.bytes(&u.to_le_bytes());
            } else if let Some(i) = n.as_i64() {
                h.bytes(b"i");
                h.bytes(&i.to_le_bytes());
            } else {
                h.bytes(b"d");
                h.bytes(&n.as_f64().unwrap_or(0.0).to_bits().to_le_bytes());
            }
        }
        Value::String(s) => {
            h.bytes(b"s");
            h.str(s);
        }
        Value::Array(items) => {
            h.bytes(b"a");
            h.bytes(&(items.len() as u64).to_le_bytes());
            for item in items {
                h.bytes(&value_digest(item, depth + 1).to_le_bytes());
            }
        }
        Value::Object(map) => {
            // Entries are hashed one by one and summed: the sum does not depend on the order in
            // which the map yields them (sorted, or insertion order with `preserve_order`).
            let mut sum = 0u64;
            for (k, item) in map {
                let mut e = Fnv::new();
                e.str(k);
                e.bytes(&value_digest(item, depth + 1).to_le_bytes());
                sum = sum.wrapping_add(mix(e.0));
            }
            h.bytes(b"o");
            h.bytes(&(map.len() as u64).to_le_bytes());
            h.bytes(&sum.to_le_bytes());
        }
    }
    h.0
}

// The 64-bit finaliser of MurmurHash3: spreads each entry's bits before they are summed.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn detector(max_repeats: u32, window_ms: u64) -> LoopDetector {
        LoopDetector::new(LoopConfig { max_repeats, window_ms, max_keys: 1000 })
    }

    #[test]
    fn digest_is_stable_and_ignores_key_order() {
        let a = json!({"cmd": "ls", "opts": {"x": 1, "y": [1, 2]}});
        let b: Value = serde_json::from_str(r#"{"opts":{"y":[1,2],"x":1},"cmd":"ls"}"#).unwrap();
        assert_eq!(digest("ag", "run", &a), digest("ag", "run", &b));
        // Pinned: the same on every platform and in every process.
        assert_eq!(digest("ag", "run", &json!({})), digest("ag", "run", &json!({})));
        let distinct = [
            digest("ag", "run", &a),
            digest("ag2", "run", &a),
            digest("ag", "run2", &a),
            digest("ag", "run", &json!({"cmd": "ls", "opts": {"x": 1, "y": [2, 1]}})),
            digest("ag", "run", &json!({"cmd": "ls", "opts": {"x": 1.0, "y": [1, 2]}})),
            digest("ag", "run", &json!({"cmd": "ls"})),
            digest("a", "grun", &a),
            digest("ag", "run", &json!(["ls"])),
            digest("ag", "run", &json!("ls")),
        ];
        for i in 0..distinct.len() {
            for j in i + 1..distinct.len() {
                assert_ne!(distinct[i], distinct[j], "{i} vs {j}");
            }
        }
    }

    #[test]
    fn digest_has_a_known_value() {
        // FNV-1a is fully specified: pin one value so a change to the canonical form is noticed.
        let mut h = Fnv::new();
        h.bytes(b"a");
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn the_call_after_max_repeats_in_the_window_is_a_loop() {
        let d = detector(3, 1000);
        let args = json!({"command": "echo test"});
        let at = |ms: u64| UnixMillis(10_000 + ms);
        let cases = [
            (0, Repeat::Fresh { count: 1 }),
            (100, Repeat::Fresh { count: 2 }),
            (200, Repeat::Fresh { count: 3 }),
            (300, Repeat::Loop { count: 3, retry_after_ms: 700 }),
            (999, Repeat::Loop { count: 3, retry_after_ms: 1 }),
            // Exactly one window after the first call: it has left the window.
            (1000, Repeat::Fresh { count: 3 }),
            (1001, Repeat::Loop { count: 3, retry_after_ms: 99 }),
            (1100, Repeat::Fresh { count: 3 }),
            // Quiet for a whole window: back to one.
            (3000, Repeat::Fresh { count: 1 }),
        ];
        for (ms, want) in cases {
            assert_eq!(d.observe("a", "run_command", &args, at(ms)), want, "at +{ms}ms");
        }
        // Other agents, actions and arguments are separate.
        assert_eq!(d.observe("b", "run_command", &args, at(3000)), Repeat::Fresh { count: 1 });
        let other = json!({"command": "echo other"});
        assert_eq!(d.observe("a", "run_command", &other, at(3000)), Repeat::Fresh { count: 1 });
        assert_eq!(Repeat::Loop { count: 3, retry_after_ms: 1500 }.explanation("x").as_deref(),
            Some("the same `x` call with the same arguments was made 3 times in the window: looks like a loop; retry in 2s"));
    }

    #[test]
    fn memory_is_bounded_by_sweeps_and_the_key_cap() {
        let d = LoopDetector::new(LoopConfig { max_repeats: 2, window_ms: 1000, max_keys: 10 });
        for i in 0..50u64 {
            d.observe_digest(i, UnixMillis(i));
        }
        assert_eq!(d.tracked(), 10);
        // The most recent keys survived the cap; the oldest were evicted.
        assert_eq!(d.observe_digest(49, UnixMillis(60)), Repeat::Fresh { count: 2 });
        d.observe_digest(1000, UnixMillis(5000));
        assert_eq!(d.tracked(), 1);
    }

    #[test]
    fn config_decodes_with_errors_located() {
        let node = crate::doc::parse("{max_repeats: 0, window: 30s, extra: 1}").unwrap();
        let mut cx = Cx::new();
        let c = LoopConfig::decode(&mut cx, &Field::root(&node));
        assert_eq!(c.window_ms, 30_000);
        let errors = cx.finish(()).unwrap_err().0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, vec!["max_repeats", "extra"]);
    }

    #[test]
    fn a_slot_decides_as_the_detector_does_and_survives_its_bytes() {
        let config = LoopConfig { max_repeats: 3, window_ms: 1000, max_keys: 1000 };
        let d = LoopDetector::new(config);
        let mut slot = Slot::default();
        for ms in [0, 100, 200, 300, 999, 1000, 1001, 1100, 3000, 3001, 3002, 3003] {
            let now = UnixMillis(10_000 + ms);
            // Through the stored bytes each time, as a shared store keeps it.
            let mut stored = Slot::decode(&slot.encode()).unwrap();
            assert_eq!(stored.observe(7, now, &config), d.observe_digest(7, now), "at +{ms}ms");
            slot = stored;
        }
        assert_eq!(Slot::decode(b""), Some(Slot::default()), "a new key is an empty slot");
        assert_eq!(Slot::decode(b"abc"), None);
        let mut bytes = slot.encode();
        bytes.push(0);
        assert_eq!(Slot::decode(&bytes), None, "trailing bytes are not a slot");
    }

    #[test]
    fn slots_are_bounded_by_their_share_of_max_keys() {
        let config = LoopConfig { max_repeats: 2, window_ms: 1000, max_keys: 2048 };
        assert_eq!(Slot::count(&config), MAX_SLOTS);
        assert_eq!(Slot::index(MAX_SLOTS as u64 + 5, &config), 5);
        let mut slot = Slot::default();
        for i in 0..10u64 {
            slot.observe(i * MAX_SLOTS as u64, UnixMillis(i), &config);
        }
        assert_eq!(slot.tracked(), 2, "2048 keys over 1024 slots: two calls a slot");
        // The most recent call survived; the least recently seen were evicted.
        assert_eq!(
            slot.observe(9 * MAX_SLOTS as u64, UnixMillis(20), &config),
            Repeat::Fresh { count: 2 }
        );
        assert_eq!(slot.observe(0, UnixMillis(21), &config), Repeat::Fresh { count: 1 });
        // Calls that left the window are dropped when the slot is next written.
        slot.observe(1, UnixMillis(5000), &config);
        assert_eq!(slot.tracked(), 1);
        let small = LoopConfig { max_keys: 3, ..config };
        assert_eq!((Slot::count(&small), Slot::index(7, &small)), (3, 1));
    }

    proptest! {
        #[test]
        fn no_window_ever_holds_more_than_max_repeats_allowed_calls(
            gaps in proptest::collection::vec(0u64..400, 1..60),
            max_repeats in 1u32..5,
        ) {
            let window = 1000;
            let d = detector(max_repeats, window);
            let mut now = 0;
            let mut allowed = Vec::new();
            for gap in gaps {
                now += gap;
                if !d.observe_digest(7, UnixMillis(now)).is_loop() {
                    allowed.push(now);
                }
            }
            for (i, &t) in allowed.iter().enumerate() {
                let in_window = allowed[i..].iter().take_while(|&&u| u - t < window).count();
                prop_assert!(in_window <= max_repeats as usize);
            }
        }
    }
}
