//! Fleet mode's action counts: the autonomy budgets (actions per agent per UTC day, in total and
//! per action), the guardrails' hourly action limits (`rate_limit_per_hour`) and the loop
//! detector's counts of identical calls, shared by every proxy through Redis.
//!
//! **Autonomy budgets and hourly action limits are leased**, like money budgets and rate limits
//! (see the parent module): each counter (agent and day, agent and action and day, agent and
//! action and hour) is a lease hash in Redis whose limit is the configured count. A proxy counts
//! from its lease in memory and waits for Redis only when the lease is used up (the first call of
//! an agent in a window, then rarely: a lease is a quarter of what is left, and an idle one stays
//! with its proxy while the fleet has committed at most half the limit). Each counted call is
//! also reported as spent at the next sync, so it stays counted when the proxy dies. The fleet
//! never counts more than the limit while Redis answers; the lifecycle cannot wait for I/O at
//! these steps, so it hands the request back short and goes on from that step once the lease is
//! refilled (`tollgate_core::lifecycle::leased_autonomy`, shared with the Envoy filter). When Redis cannot be reached and the lease is used up:
//! `fail_closed` refuses (503 for an hourly limit; an autonomy budget sends the action to a
//! human, as an exhausted budget does); `local_allowance` counts on this proxy's own counters
//! against the full limit, so during an outage the fleet may run up to the number of proxies
//! times the limit (plus what their leases still held).
//!
//! **Loop counts are merged in the background** instead, because most tool calls are distinct
//! and a lease per call digest would put a round trip on nearly every call. Each proxy decides
//! from what it knows: its own identical calls in the window and those the other proxies made.
//! Every `sync_interval` one script appends this proxy's new calls to a Redis stream
//! (`<prefix>{loops}:calls`, trimmed to the loop window) and reads what the others appended since
//! its last read. The bound: a proxy admits a call only while its own calls plus the others'
//! it knows of are fewer than `max_repeats`, and it knows every call the others made more than
//! one sync interval (plus one Redis round trip) ago. So the fleet serves at most `max_repeats`
//! identical calls per window plus those the other proxies served within the last sync interval,
//! and never more than `max_repeats` per proxy (the number of proxies times `max_repeats` in all)
//! even while Redis is down (each proxy then goes on counting what it knows). A loop detector
//! never refuses because of the store.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use tollgate_core::budget::StoreError;
use tollgate_core::guardrails::loops::{LoopConfig, Repeat};
use tollgate_core::time::UnixMillis;

use super::FleetStore;

/// The prefix of the action counters' bases (they cannot meet a budget's or a rate's).
pub use tollgate_core::budget::lease::COUNT;

/// Redis stream of the fleet's tool calls for the loop detector: appends this proxy's calls and
/// reads the others' since the last read.
///
/// KEYS[1] the stream. ARGV: this proxy's id, the last id read ('' the first time), the window
/// in ms, the most entries to read, then one `<digest hex>:<unix ms>` per new call. Returns
/// {last id read, entries...}, each entry `<digest hex>:<unix ms>:<proxy id>`.
pub(super) const LOOP_SCRIPT: &str = r#"
local key = KEYS[1]
local me, since = ARGV[1], ARGV[2]
local window, max = tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local oldest = now - window
if oldest < 0 then oldest = 0 end
if since == '' then since = tostring(oldest) .. '-0' else since = '(' .. since end
local out = {''}
local last = ''
local r = redis.call('XRANGE', key, since, '+', 'COUNT', max)
for _, e in ipairs(r) do
  last = e[1]
  local v = e[2][2]
  if string.sub(v, -(#me + 1)) ~= ':' .. me then table.insert(out, v) end
end
for i = 5, #ARGV do
  local id = redis.call('XADD', key, 'MINID', '~', oldest, '*', 'c', ARGV[i] .. ':' .. me)
  if #r < max then last = id end
end
if last == '' and ARGV[2] ~= '' then last = ARGV[2] end
out[1] = last
redis.call('PEXPIRE', key, window * 2)
return out
"#;

/// Most entries read from the stream per sync.
const LOOP_READ_MAX: usize = 10_000;
/// Most calls kept waiting for Redis (during an outage); older ones are dropped.
const LOOP_UNSENT_MAX: usize = 100_000;
/// Most times kept per call for the other proxies.
const LOOP_OTHERS_MAX: usize = 1_024;

#[derive(Debug, Default)]
struct LoopEntry {
    /// This proxy's admitted calls in the window, oldest first.
    own: VecDeque<u64>,
    /// The other proxies' calls as last read.
    others: Vec<u64>,
}

impl LoopEntry {
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

#[derive(Debug, Default)]
struct LoopState {
    entries: HashMap<u64, LoopEntry>,
    /// Calls admitted here and not yet appended to the stream: (digest, unix ms).
    unsent: VecDeque<(u64, u64)>,
    /// The last stream id read.
    since: String,
    last_sweep: u64,
    /// The loop window and most calls tracked, as last used.
    window_ms: u64,
    max_keys: usize,
}

/// The loop detector's counts in fleet mode (see the module doc).
#[derive(Debug, Default)]
pub(super) struct Loops {
    state: Mutex<LoopState>,
    /// Serializes syncs.
    io: tokio::sync::Mutex<()>,
}

impl Loops {
    fn lock(&self) -> std::sync::MutexGuard<'_, LoopState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Evicts the least recently seen call when `entries` is full and `key` is new.
fn make_room(entries: &mut HashMap<u64, LoopEntry>, key: u64, max_keys: usize) {
    if !entries.contains_key(&key) && entries.len() >= max_keys.max(1) {
        if let Some(k) = entries.iter().min_by_key(|(_, e)| e.last()).map(|(k, _)| *k) {
            entries.remove(&k);
        }
    }
}

impl FleetStore {
    /// Counts one tool call by its digest against the fleet's identical calls in the window
    /// (this proxy's and the others' it knows of), unless that makes a loop. Never waits.
    pub fn observe_call(&self, config: LoopConfig, digest: u64, now: UnixMillis) -> Repeat {
        let now = now.as_millis();
        let LoopConfig { max_repeats, window_ms, max_keys } = config;
        let max_repeats = max_repeats.max(1);
        let mut st = self.inner.loops.lock();
        st.window_ms = window_ms;
        st.max_keys = max_keys;
        if now.saturating_sub(st.last_sweep) >= window_ms {
            st.entries.retain(|_, e| now.saturating_sub(e.last()) < window_ms);
            st.last_sweep = now;
        }
        make_room(&mut st.entries, digest, max_keys);
        let entry = st.entries.entry(digest).or_default();
        entry.prune(now, window_ms);
        let count = u32::try_from(entry.own.len() + entry.others.len()).unwrap_or(u32::MAX);
        if count >= max_repeats {
            let oldest = entry.own.iter().chain(&entry.others).copied().min().unwrap_or(now);
            let retry_after_ms = oldest.saturating_add(window_ms).saturating_sub(now).max(1);
            return Repeat::Loop { count, retry_after_ms };
        }
        entry.own.push_back(now);
        if st.unsent.len() >= LOOP_UNSENT_MAX {
            st.unsent.pop_front();
        }
        st.unsent.push_back((digest, now));
        Repeat::Fresh { count: count + 1 }
    }

    /// Appends this proxy's new calls to the fleet's stream and reads the others' (one script
    /// run). Does nothing before the first call. `Err` when Redis did not answer (the calls are
    /// sent with the next sync).
    pub async fn sync_loops(&self) -> Result<(), StoreError> {
        let loops = &self.inner.loops;
        let _io = loops.io.lock().await;
        let (unsent, since, window_ms, max_keys) = {
            let mut st = loops.lock();
            if st.window_ms == 0 {
                return Ok(());
            }
            (std::mem::take(&mut st.unsent), st.since.clone(), st.window_ms, st.max_keys)
        };
        let mut invocation = self.inner.loop_script.prepare_invoke();
        invocation
            .key(format!("{}{{loops}}:calls", self.inner.config.key_prefix))
            .arg(&self.inner.id)
            .arg(&since)
            .arg(window_ms)
            .arg(LOOP_READ_MAX);
        for (digest, t) in &unsent {
            invocation.arg(format!("{digest:016x}:{t}"));
        }
        let answer: Result<Vec<String>, StoreError> = self.invoke(&invocation).await;
        let mut st = loops.lock();
        match answer {
            Ok(answer) => {
                let mut answer = answer.into_iter();
                if let Some(last) = answer.next().filter(|l| !l.is_empty()) {
                    st.since = last;
                }
                let now = crate::clock::now().as_millis();
                for entry in answer {
                    let mut fields = entry.splitn(3, ':');
                    let (Some(d), Some(t)) = (fields.next(), fields.next()) else { continue };
                    let (Ok(d), Ok(t)) = (u64::from_str_radix(d, 16), t.parse::<u64>()) else {
                        continue;
                    };
                    if now.saturating_sub(t) >= window_ms {
                        continue;
                    }
                    make_room(&mut st.entries, d, max_keys);
                    let e = st.entries.entry(d).or_default();
                    if e.others.len() >= LOOP_OTHERS_MAX {
                        e.others.remove(0);
                    }
                    e.others.push(t);
                }
                Ok(())
            }
            Err(e) => {
                self.inner.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Sent again next time, in front of the newer ones.
                let newer = std::mem::take(&mut st.unsent);
                st.unsent = unsent;
                st.unsent.extend(newer);
                let excess = st.unsent.len().saturating_sub(LOOP_UNSENT_MAX);
                st.unsent.drain(..excess);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> FleetStore {
        FleetStore::new(super::super::RedisConfig {
            nodes: vec!["redis://127.0.0.1:1".into()],
            cluster: false,
            sentinel: None,
            wait_replicas: 0,
            key_prefix: "t:".into(),
            timeout: std::time::Duration::from_millis(50),
            lease_ttl: std::time::Duration::from_secs(10),
            sync_interval: std::time::Duration::from_millis(50),
            slice_bp: 100,
            on_error: super::super::OnStoreError::FailClosed,
        })
        .unwrap()
    }

    #[test]
    fn a_loop_counts_this_proxys_calls_and_the_others_it_knows_of() {
        let fleet = store();
        let config = LoopConfig { max_repeats: 3, window_ms: 60_000, max_keys: 10 };
        let t = UnixMillis(1_000_000);
        assert_eq!(fleet.observe_call(config, 7, t), Repeat::Fresh { count: 1 });
        // Two identical calls another proxy made, as read from the stream.
        fleet.inner.loops.lock().entries.get_mut(&7).unwrap().others.extend([999_000, 999_500]);
        assert_eq!(
            fleet.observe_call(config, 7, t),
            Repeat::Loop { count: 3, retry_after_ms: 59_000 },
            "the fleet's fourth identical call"
        );
        // Another call is its own; the others' calls leave with the window.
        assert_eq!(fleet.observe_call(config, 8, t), Repeat::Fresh { count: 1 });
        let later = UnixMillis(999_000 + 60_000);
        assert_eq!(fleet.observe_call(config, 7, later), Repeat::Fresh { count: 3 });
        // Without news from the others, at most `max_repeats` here: the per-proxy bound.
        assert!(fleet.observe_call(config, 7, later).is_loop());
        assert_eq!(fleet.inner.loops.lock().unsent.len(), 3, "the calls let through, to send");
    }
}
