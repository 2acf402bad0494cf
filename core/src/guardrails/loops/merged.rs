//! The loop detector of one holder in a fleet (a sidecar, or one Envoy filter VM): it decides
//! from what it knows, its own identical calls in the window and those the other holders made,
//! and never waits for the fleet's store.
//!
//! The holder appends its admitted calls to a stream the fleet shares and reads the others'
//! from it, every sync interval ([`Merged::outgoing`], then [`Merged::read`] or
//! [`Merged::failed`]); the I/O is the adapter's (a Redis stream for a sidecar, the collector for
//! the filter). The bound: a holder admits a call only while its own calls plus the others' it
//! knows of are fewer than `max_repeats`, and it knows every call the others made more than one
//! sync interval (plus one round trip) ago. So the fleet serves at most `max_repeats` identical
//! calls per window plus those the other holders served within the last sync interval, and never
//! more than `max_repeats` per holder, also while the store cannot be reached.
//!
//! On the wire a call is `<digest, 16 hex digits>:<unix ms>`, and a call read back names its
//! holder too: `<digest>:<unix ms>:<holder>`.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::{LoopConfig, Repeat};
use crate::time::UnixMillis;

/// Most calls kept waiting for the store (during an outage); older ones are dropped.
pub const UNSENT_MAX: usize = 100_000;
/// Most times kept per call for the other holders.
const OTHERS_MAX: usize = 1_024;
/// Most entries read from the stream per sync.
pub const READ_MAX: usize = 10_000;

#[derive(Debug, Default)]
struct Entry {
    /// This holder's admitted calls in the window, oldest first.
    own: VecDeque<u64>,
    /// The other holders' calls as last read.
    others: Vec<u64>,
}

impl Entry {
    fn prune(&mut self, now: u64, window_ms: u64) {
        while self.own.front().is_some_and(|&t| now.saturating_sub(t) >= window_ms) {
            self.own.pop_front();
        }
        self.others.retain(|&t| now.saturating_sub(t) < window_ms);
    }

    fn last(&self) -> u64 {
        self.own.back().copied().max(self.others.iter().copied().max()).unwrap_or(0)
    }
}

/// One holder's loop counts (see the module doc).
#[derive(Debug, Default)]
pub struct Merged {
    entries: HashMap<u64, Entry>,
    /// Calls admitted here and not yet sent: (digest, unix ms).
    unsent: VecDeque<(u64, u64)>,
    /// The stream position last read (empty: nothing read yet).
    since: String,
    last_sweep: u64,
    /// The loop window and most calls tracked, as last used.
    window_ms: u64,
    max_keys: usize,
}

/// What one sync sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// This holder's calls since the last sync: (digest, unix ms).
    pub calls: Vec<(u64, u64)>,
    /// The stream position last read.
    pub since: String,
    pub window_ms: u64,
}

impl Outgoing {
    /// The calls in their wire form.
    pub fn wire_calls(&self) -> impl Iterator<Item = String> + '_ {
        self.calls.iter().map(|(d, t)| format!("{d:016x}:{t}"))
    }
}

/// One sync of a holder that reaches the stream through a service (the Envoy filter through the
/// collector's `POST /v1/fleet/loops`): [`Outgoing`] with the holder's name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sync {
    pub holder: String,
    pub since: String,
    pub window_ms: u64,
    /// `<digest>:<unix ms>` each.
    pub calls: Vec<String>,
}

/// The service's answer to a [`Sync`]: the position read up to and the other holders' calls.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Synced {
    pub since: String,
    /// `<digest>:<unix ms>:<holder>` each.
    pub calls: Vec<String>,
}

/// A call as read from the stream: (digest, unix ms), or `None` if it is not one.
pub fn parse_read(entry: &str) -> Option<(u64, u64)> {
    let mut fields = entry.splitn(3, ':');
    let (d, t) = (fields.next()?, fields.next()?);
    Some((u64::from_str_radix(d, 16).ok()?, t.parse().ok()?))
}

/// A call as sent: (digest, unix ms), or `None` if it is not one.
pub fn parse_sent(entry: &str) -> Option<(u64, u64)> {
    let (d, t) = entry.split_once(':')?;
    if d.len() != 16 {
        return None;
    }
    Some((u64::from_str_radix(d, 16).ok()?, t.parse().ok()?))
}

impl Merged {
    /// Counts one call by its digest against the fleet's identical calls in the window (this
    /// holder's and the others' it knows of), unless that makes a loop.
    pub fn observe(&mut self, config: LoopConfig, digest: u64, now: UnixMillis) -> Repeat {
        let now = now.as_millis();
        let LoopConfig { max_repeats, window_ms, max_keys } = config;
        let max_repeats = max_repeats.max(1);
        self.window_ms = window_ms;
        self.max_keys = max_keys;
        if now.saturating_sub(self.last_sweep) >= window_ms {
            self.entries.retain(|_, e| now.saturating_sub(e.last()) < window_ms);
            self.last_sweep = now;
        }
        make_room(&mut self.entries, digest, max_keys);
        let entry = self.entries.entry(digest).or_default();
        entry.prune(now, window_ms);
        let count = u32::try_from(entry.own.len() + entry.others.len()).unwrap_or(u32::MAX);
        if count >= max_repeats {
            let oldest = entry.own.iter().chain(&entry.others).copied().min().unwrap_or(now);
            let retry_after_ms = oldest.saturating_add(window_ms).saturating_sub(now).max(1);
            return Repeat::Loop { count, retry_after_ms };
        }
        entry.own.push_back(now);
        if self.unsent.len() >= UNSENT_MAX {
            self.unsent.pop_front();
        }
        self.unsent.push_back((digest, now));
        Repeat::Fresh { count: count + 1 }
    }

    /// Sets the detector's configuration before the first call, so that this holder reads the
    /// others' calls from the start (otherwise it learns the window with its first call, and
    /// decides that one without news from the fleet).
    pub fn configure(&mut self, config: LoopConfig) {
        self.window_ms = config.window_ms;
        self.max_keys = config.max_keys;
    }

    /// What the next sync sends (this holder's new calls, taken), or `None` before the first
    /// call (the window is not known yet).
    pub fn outgoing(&mut self) -> Option<Outgoing> {
        if self.window_ms == 0 {
            return None;
        }
        Some(Outgoing {
            calls: std::mem::take(&mut self.unsent).into(),
            since: self.since.clone(),
            window_ms: self.window_ms,
        })
    }

    /// The sync of `sent` failed: its calls go again with the next one, in front of newer ones.
    pub fn failed(&mut self, sent: Outgoing) {
        let newer = std::mem::take(&mut self.unsent);
        self.unsent = sent.calls.into();
        self.unsent.extend(newer);
        let excess = self.unsent.len().saturating_sub(UNSENT_MAX);
        self.unsent.drain(..excess);
    }

    /// The stream's answer: the position read up to (`""`: unchanged) and the others' calls
    /// since the last read (`<digest>:<unix ms>:<holder>`); calls already out of the window
    /// are left out.
    pub fn read<'e>(&mut self, last: &str, others: impl IntoIterator<Item = &'e str>, now: u64) {
        if !last.is_empty() {
            self.since = last.to_owned();
        }
        let (window_ms, max_keys) = (self.window_ms, self.max_keys);
        for (d, t) in others.into_iter().filter_map(parse_read) {
            if now.saturating_sub(t) >= window_ms {
                continue;
            }
            make_room(&mut self.entries, d, max_keys);
            let e = self.entries.entry(d).or_default();
            if e.others.len() >= OTHERS_MAX {
                e.others.remove(0);
            }
            e.others.push(t);
        }
    }

    /// Calls waiting to be sent.
    pub fn unsent(&self) -> usize {
        self.unsent.len()
    }
}

/// Evicts the least recently seen call when `entries` is full and `key` is new.
fn make_room(entries: &mut HashMap<u64, Entry>, key: u64, max_keys: usize) {
    if !entries.contains_key(&key) && entries.len() >= max_keys.max(1) {
        if let Some(k) = entries.iter().min_by_key(|(_, e)| e.last()).map(|(k, _)| *k) {
            entries.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_counts_this_holders_calls_and_the_others_it_knows_of() {
        let mut m = Merged::default();
        let config = LoopConfig { max_repeats: 3, window_ms: 60_000, max_keys: 10 };
        let t = UnixMillis(1_000_000);
        assert_eq!(m.outgoing(), None, "nothing to sync before the window is known");
        m.configure(config);
        let first = m.outgoing().unwrap();
        assert!(first.calls.is_empty() && first.since.is_empty(), "reads the whole window");
        assert_eq!(m.observe(config, 7, t), Repeat::Fresh { count: 1 });
        // Two identical calls another holder made, as read from the stream.
        let read = [format!("{:016x}:999000:b", 7), format!("{:016x}:999500:b", 7)];
        m.read("1-0", read.iter().map(String::as_str), 1_000_000);
        assert_eq!(
            m.observe(config, 7, t),
            Repeat::Loop { count: 3, retry_after_ms: 59_000 },
            "the fleet's fourth identical call"
        );
        // Another call is its own; the others' calls leave with the window.
        assert_eq!(m.observe(config, 8, t), Repeat::Fresh { count: 1 });
        let later = UnixMillis(999_000 + 60_000);
        assert_eq!(m.observe(config, 7, later), Repeat::Fresh { count: 3 });
        // Without news from the others, at most `max_repeats` here: the per-holder bound.
        assert!(m.observe(config, 7, later).is_loop());
        let out = m.outgoing().unwrap();
        assert_eq!((out.calls.len(), out.since.as_str(), out.window_ms), (3, "1-0", 60_000));
        assert_eq!(out.wire_calls().next().unwrap(), format!("{:016x}:1000000", 7));
        assert_eq!(parse_sent(&out.wire_calls().next().unwrap()), Some((7, 1_000_000)));
    }

    #[test]
    fn a_failed_sync_sends_its_calls_again_first() {
        let mut m = Merged::default();
        let config = LoopConfig { max_repeats: 9, window_ms: 60_000, max_keys: 10 };
        m.observe(config, 1, UnixMillis(10));
        let sent = m.outgoing().unwrap();
        m.observe(config, 2, UnixMillis(20));
        m.failed(sent);
        assert_eq!(m.outgoing().unwrap().calls, vec![(1, 10), (2, 20)]);
    }

    #[test]
    fn what_is_read_is_checked() {
        assert_eq!(parse_read("zz:1:h"), None);
        assert_eq!(parse_read(&format!("{:016x}:5:envoy/vm-1:x", 3)), Some((3, 5)));
        assert_eq!(parse_sent("03:5"), None, "a digest is 16 hex digits");
        assert_eq!(parse_sent(&format!("{:016x}:x", 3)), None);
    }
}
