//! The success history behind the `historical_success` risk dimension: (successes, total) of an
//! agent's earlier admitted actions of one kind, counted when each exchange ends. One rule for
//! both engines: an outcome counts for a tracked request (`lifecycle::Oversaw::track`) once its
//! exchange ends, a success being a 2xx answer from the upstream ([`succeeded`]); at most
//! [`MAX_KEYS`] (agent, action) pairs are counted, and a pair beyond that is not counted.
//!
//! The sidecar keeps the counts in a map; the Envoy filter in shared data, which cannot delete
//! keys, so the pairs are spread over a fixed set of [`SLOTS`] keys by a stable hash
//! ([`Slot::index`]), each one [`Slot`] record updated with a compare-and-swap. Pure: decoding,
//! counting and encoding only.

/// Most (agent, action) pairs whose outcomes are counted.
pub const MAX_KEYS: usize = 100_000;

/// How many shared-data keys the filter spreads the pairs over.
pub const SLOTS: usize = 1024;

/// Whether an exchange that ended with the upstream's `status` (0: no answer) succeeded.
pub fn succeeded(status: u16) -> bool {
    (200..300).contains(&status)
}

/// The key one (agent, action) pair is counted under.
pub fn key(agent: &str, action: &str) -> String {
    format!("{agent}\u{0}{action}")
}

/// FNV-1a of `s`: a hash stable across builds and workers, for spreading records over a fixed
/// set of shared-data keys.
pub fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// One shared-data record of the history: the pairs whose [`key`] hashes to it, each with its
/// (successes, total).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    entries: Vec<(String, u64, u64)>,
}

impl Slot {
    /// The slot of a pair's [`key`] (FNV-1a, stable across builds and workers).
    pub fn index(key: &str) -> usize {
        (fnv1a(key) % SLOTS as u64) as usize
    }

    /// Pairs one slot counts at most: its share of [`MAX_KEYS`].
    pub const CAPACITY: usize = MAX_KEYS.div_ceil(SLOTS);

    /// (successes, total) of `key`, if it has a counted outcome.
    pub fn get(&self, key: &str) -> Option<(u64, u64)> {
        self.entries
            .iter()
            .find(|(k, ..)| k == key)
            .map(|(_, s, t)| (*s, *t))
            .filter(|(_, total)| *total > 0)
    }

    /// Counts one outcome of `key`; false when the slot is full and `key` is not in it (not
    /// counted, as the sidecar past [`MAX_KEYS`]).
    pub fn record(&mut self, key: &str, success: bool) -> bool {
        if let Some(e) = self.entries.iter_mut().find(|(k, ..)| k == key) {
            e.1 = e.1.saturating_add(u64::from(success));
            e.2 = e.2.saturating_add(1);
            return true;
        }
        if self.entries.len() >= Slot::CAPACITY {
            return false;
        }
        self.entries.push((key.to_owned(), u64::from(success), 1));
        true
    }

    /// Decodes a stored slot (empty bytes: an empty slot). `None`: not a slot.
    pub fn decode(bytes: &[u8]) -> Option<Slot> {
        crate::slot::decode(bytes, |r| {
            let entries = r.list(|r| Some((r.str()?.to_owned(), r.u64()?, r.u64()?)))?;
            Some(Slot { entries })
        })
    }

    /// The bytes [`Slot::decode`] reads.
    pub fn encode(&self) -> Vec<u8> {
        let keys: usize = self.entries.iter().map(|(k, ..)| k.len()).sum();
        let mut w = crate::slot::Writer::with_capacity(4 + self.entries.len() * 20 + keys);
        w.count(self.entries.len());
        for (key, successes, total) in &self.entries {
            w.str(key);
            w.u64(*successes);
            w.u64(*total);
        }
        w.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_is_a_2xx_answer() {
        assert_eq!(
            [0, 199, 200, 204, 299, 300, 404, 500].map(succeeded),
            [false, false, true, true, true, false, false, false]
        );
    }

    #[test]
    fn a_slot_counts_outcomes_per_pair_through_its_bytes() {
        let mut slot = Slot::default();
        let (a, b) = (key("bot", "deploy"), key("bot", "llm"));
        assert_eq!(slot.get(&a), None);
        for ok in [true, true, false] {
            assert!(slot.record(&a, ok));
            slot = Slot::decode(&slot.encode()).unwrap();
        }
        assert!(slot.record(&b, true));
        let slot = Slot::decode(&slot.encode()).unwrap();
        assert_eq!((slot.get(&a), slot.get(&b)), (Some((2, 3)), Some((1, 1))));
        assert_eq!(Slot::decode(b""), Some(Slot::default()));
        assert_eq!(Slot::decode(&[1, 0, 0, 0, 9]), None);
        let mut bytes = slot.encode();
        bytes.push(0);
        assert_eq!(Slot::decode(&bytes), None, "trailing bytes");
    }

    #[test]
    fn a_full_slot_counts_no_new_pair() {
        let mut slot = Slot::default();
        for i in 0..Slot::CAPACITY {
            assert!(slot.record(&key(&format!("agent-{i}"), "x"), true));
        }
        assert!(!slot.record(&key("one-too-many", "x"), true));
        assert_eq!(slot.get(&key("one-too-many", "x")), None);
        assert!(slot.record(&key("agent-0", "x"), false), "a counted pair goes on");
        assert_eq!(slot.get(&key("agent-0", "x")), Some((1, 2)));
    }

    #[test]
    fn keys_spread_over_every_slot_stably() {
        assert_eq!(Slot::index(&key("bot", "llm")), Slot::index(&key("bot", "llm")));
        let used: std::collections::BTreeSet<usize> =
            (0..10_000).map(|i| Slot::index(&key(&format!("agent-{i}"), "llm"))).collect();
        assert!(used.len() > SLOTS * 9 / 10, "{} of {SLOTS} slots used", used.len());
        assert!(used.iter().all(|i| *i < SLOTS));
    }
}
