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
//! refilled (`tollgate_core::lifecycle::leased_autonomy`, shared with the Envoy filter). When
//! Redis cannot be reached and the lease is used up:
//! `fail_closed` refuses (503 for an hourly limit; an autonomy budget sends the action to a
//! human, as an exhausted budget does); `local_allowance` counts on this proxy's own counters
//! against the full limit, so during an outage the fleet may run up to the number of proxies
//! times the limit (plus what their leases still held).
//!
//! **Loop counts are merged in the background** instead, because most tool calls are distinct
//! and a lease per call digest would put a round trip on nearly every call. Each proxy decides
//! from what it knows (the core's rules, [`Merged`], which the Envoy filter shares through the
//! collector's `POST /v1/fleet/loops`): its own identical calls in the window and those the other
//! proxies made.
//! Every `sync_interval` one script appends this proxy's new calls to a Redis stream
//! (`<prefix>{loops}:calls`, trimmed to the loop window) and reads what the others appended since
//! its last read. The bound: a proxy admits a call only while its own calls plus the others'
//! it knows of are fewer than `max_repeats`, and it knows every call the others made more than
//! one sync interval (plus one Redis round trip) ago. So the fleet serves at most `max_repeats`
//! identical calls per window plus those the other proxies served within the last sync interval,
//! and never more than `max_repeats` per proxy (the number of proxies times `max_repeats` in all)
//! even while Redis is down (each proxy then goes on counting what it knows). A loop detector
//! never refuses because of the store.

use std::sync::{Mutex, PoisonError};

use tollgate_core::budget::StoreError;
use tollgate_core::guardrails::loops::merged::READ_MAX;
use tollgate_core::guardrails::loops::{LoopConfig, Merged, Repeat};
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

/// The loop detector's counts in fleet mode (see the module doc): the core's rules
/// ([`Merged`]), behind a lock.
#[derive(Debug, Default)]
pub(super) struct Loops {
    state: Mutex<Merged>,
    /// Serializes syncs.
    io: tokio::sync::Mutex<()>,
}

impl Loops {
    fn lock(&self) -> std::sync::MutexGuard<'_, Merged> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl FleetStore {
    /// Sets the loop detector's configuration, so that this proxy reads the others' calls from
    /// its start (see [`Merged::configure`]).
    pub fn configure_loops(&self, config: LoopConfig) {
        self.inner.loops.lock().configure(config);
    }

    /// Counts one tool call by its digest against the fleet's identical calls in the window
    /// (this proxy's and the others' it knows of), unless that makes a loop. Never waits.
    pub fn observe_call(&self, config: LoopConfig, digest: u64, now: UnixMillis) -> Repeat {
        self.inner.loops.lock().observe(config, digest, now)
    }

    /// Appends this proxy's new calls to the fleet's stream and reads the others' (one script
    /// run). Does nothing before the first call. `Err` when Redis did not answer (the calls are
    /// sent with the next sync).
    pub async fn sync_loops(&self) -> Result<(), StoreError> {
        let loops = &self.inner.loops;
        let _io = loops.io.lock().await;
        let Some(out) = loops.lock().outgoing() else { return Ok(()) };
        let calls: Vec<String> = out.wire_calls().collect();
        let answer = self.append_calls(&self.inner.id, &out.since, out.window_ms, &calls).await;
        let mut st = loops.lock();
        match answer {
            Ok((last, others)) => {
                let now = crate::clock::now().as_millis();
                st.read(&last, others.iter().map(String::as_str), now);
                Ok(())
            }
            Err(e) => {
                self.inner.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                st.failed(out);
                Err(e)
            }
        }
    }

    /// One run of the loop stream's script for `holder`: appends `calls` (`<digest>:<unix ms>`)
    /// and reads what the other holders appended after `since` (`""`: the whole window).
    /// Answers the position read up to and the others' calls (`<digest>:<unix ms>:<holder>`).
    pub async fn append_calls(
        &self,
        holder: &str,
        since: &str,
        window_ms: u64,
        calls: &[String],
    ) -> Result<(String, Vec<String>), StoreError> {
        let mut invocation = self.inner.loop_script.prepare_invoke();
        invocation
            .key(format!("{}{{loops}}:calls", self.inner.config.key_prefix))
            .arg(holder)
            .arg(since)
            .arg(window_ms)
            .arg(READ_MAX);
        for call in calls {
            invocation.arg(call);
        }
        let answer: Vec<String> = self.invoke(&invocation).await?;
        let mut answer = answer.into_iter();
        let last = answer.next().unwrap_or_default();
        Ok((last, answer.collect()))
    }
}
