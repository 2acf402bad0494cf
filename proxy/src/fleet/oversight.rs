//! Fleet mode's oversight state in Redis: approvals (raised through one proxy, decided through
//! another, used once through any) and the disabled agents.
//!
//! Each approval is one JSON value (`<prefix>{approvals}:a:<id>`), changed by the core's state
//! machine (`tollgate_core::approval`) and written back only if it is still the value read (a
//! compare-and-set script), so that two proxies changing one approval at once cannot both win:
//! an approval is used once across the fleet. A sorted set
//! indexes them by creation time, and `…:w:<agent>\0<digest>` points at the pending one for an
//! action (a retrying agent does not raise copies). Every key shares the `{approvals}` hash tag,
//! so each script runs on one node of a Redis Cluster. The disabled agents are one set,
//! `<prefix>{agents}:disabled`.
//!
//! Calls are synchronous, with the store's timeout: the approval flow already runs them on the
//! blocking pool, as it does for the journal of a single proxy.

use std::sync::{Mutex, PoisonError};

use redis::ConnectionLike;
use tollgate_core::approval::{Approval, State, Transition};
use tollgate_core::time::UnixMillis;

use super::RedisConfig;
use crate::oversight::approvals::error::StoreError;

/// Decided approvals are kept this long after their decision (as in a single proxy).
const RETENTION_MS: u64 = 24 * 3600 * 1000;

/// Replaces an approval's value if it is still the one read (compare-and-set).
/// KEYS[1] the approval. ARGV: the value read, the new value. Returns 1 when written.
const CAS: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Stores a new approval if the action's waiting pointer is still what was read.
/// KEYS: waiting pointer, approval, index. ARGV: pointer read ('' for none), id, value, created
/// at. Returns 1 when written.
const CREATE: &str = r#"
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
return 1
"#;

/// A connection to one Redis server or to a Redis Cluster.
enum Conn {
    Single(redis::Connection),
    /// Boxed: the cluster connection is several times the size of the other.
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Conn {
    fn get(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::Single(c) => c,
            Conn::Cluster(c) => c.as_mut(),
        }
    }
}

/// The approvals and disabled agents of the fleet.
pub struct SharedOversight {
    config: RedisConfig,
    conn: Mutex<Option<Conn>>,
    cas: redis::Script,
    create: redis::Script,
}

fn io(e: redis::RedisError) -> StoreError {
    StoreError::Io(std::io::Error::other(format!("redis: {e}")))
}

fn corrupt(key: &str) -> StoreError {
    StoreError::Io(std::io::Error::other(format!("redis holds a malformed approval under `{key}`")))
}

/// How many times a change is tried again after another proxy changed the approval first.
const MAX_RACES: usize = 64;

impl SharedOversight {
    pub fn new(config: &RedisConfig) -> anyhow::Result<SharedOversight> {
        for url in &config.nodes {
            super::client(url.as_str(), config.ca.as_ref())
                .map_err(|e| anyhow::anyhow!("store.redis: `{}`: {e}", super::redact(url)))?;
        }
        Ok(SharedOversight {
            config: config.clone(),
            conn: Mutex::new(None),
            cas: redis::Script::new(CAS),
            create: redis::Script::new(CREATE),
        })
    }

    fn approval_key(&self, id: &str) -> String {
        format!("{}{{approvals}}:a:{id}", self.config.key_prefix)
    }

    fn waiting_key(&self, a: &Approval) -> String {
        format!("{}{{approvals}}:w:{}\u{0}{}", self.config.key_prefix, a.agent, a.digest)
    }

    fn index_key(&self) -> String {
        format!("{}{{approvals}}:index", self.config.key_prefix)
    }

    fn disabled_key(&self) -> String {
        format!("{}{{agents}}:disabled", self.config.key_prefix)
    }

    fn connect(&self) -> redis::RedisResult<Conn> {
        let timeout = self.config.timeout;
        if let Some(master) = &self.config.sentinel {
            let ca = self.config.ca.as_ref();
            return super::sentinel::connect_blocking(&self.config.nodes, master, timeout, ca)
                .map(Conn::Single);
        }
        if self.config.cluster {
            let mut builder = redis::cluster::ClusterClient::builder(self.config.nodes.clone());
            if let Some(pem) = &self.config.ca {
                builder = builder.certs(redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.to_vec()),
                });
            }
            let client = builder.connection_timeout(timeout).response_timeout(timeout).build()?;
            return Ok(Conn::Cluster(Box::new(client.get_connection()?)));
        }
        let client = super::client(self.config.nodes[0].as_str(), self.config.ca.as_ref())?;
        let conn = client.get_connection_with_timeout(timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        Ok(Conn::Single(conn))
    }

    /// Runs `f` on the connection (made on first use, dropped after an error so that the next
    /// call reconnects).
    fn with<T>(
        &self,
        f: impl FnOnce(&mut dyn ConnectionLike) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut slot = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(self.connect().map_err(io)?);
        }
        let Some(conn) = slot.as_mut() else { unreachable!("just connected") };
        let mut result = f(conn.get());
        let want = self.config.wait_replicas;
        if let (Ok(_), true) = (&result, self.config.sentinel.is_some() && want > 0) {
            // As the budgets do: a write counts once enough replicas hold it (see `sentinel`).
            let timeout = (self.config.timeout.as_millis() as u64 / 2).max(1);
            let got: redis::RedisResult<u32> =
                redis::cmd("WAIT").arg(want).arg(timeout).query(conn.get());
            match got {
                Ok(got) if got >= want => {}
                Ok(got) => {
                    result = Err(redis::RedisError::from(std::io::Error::other(format!(
                        "the write reached {got} of the {want} replicas asked for"
                    ))))
                }
                Err(e) => result = Err(e),
            }
        }
        if result.is_err() {
            *slot = None;
        }
        result.map_err(io)
    }

    /// The approval's stored text and value.
    fn read(&self, key: &str) -> Result<Option<(String, Approval)>, StoreError> {
        let text: Option<String> = self.with(|c| redis::cmd("GET").arg(key).query(c))?;
        match text {
            None => Ok(None),
            Some(t) => match serde_json::from_str(&t) {
                Ok(a) => Ok(Some((t, a))),
                Err(_) => Err(corrupt(key)),
            },
        }
    }

    /// Stores a new pending approval, or returns the pending one already waiting for the same
    /// agent and action.
    pub fn create(&self, approval: Approval, now: UnixMillis) -> Result<Approval, StoreError> {
        let waiting = self.waiting_key(&approval);
        let key = self.approval_key(&approval.id);
        let index = self.index_key();
        let json = serde_json::to_string(&approval).map_err(|e| StoreError::Io(e.into()))?;
        for _ in 0..MAX_RACES {
            let pointer: Option<String> =
                self.with(|c| redis::cmd("GET").arg(&waiting).query(c))?;
            if let Some(id) = &pointer {
                if let Ok(Some((_, a))) = self.read(&self.approval_key(id)) {
                    if a.state == State::Pending && a.clone().tick(now).is_none() {
                        return Ok(a);
                    }
                }
            }
            let written: i64 = self.with(|c| {
                self.create
                    .key(&waiting)
                    .key(&key)
                    .key(&index)
                    .arg(pointer.as_deref().unwrap_or(""))
                    .arg(&approval.id)
                    .arg(&json)
                    .arg(approval.created_at_ms)
                    .invoke(c)
            })?;
            if written == 1 {
                return Ok(approval);
            }
        }
        Err(StoreError::Io(std::io::Error::other("approval still contended")))
    }

    /// Applies `change` to approval `id` atomically (compare-and-set, again if another proxy
    /// changed it first); `(next, result)` with the state after it (written only if changed).
    fn change<R>(
        &self,
        id: &str,
        mut change: impl FnMut(&mut Approval) -> R,
    ) -> Result<(Approval, R), StoreError> {
        let key = self.approval_key(id);
        for _ in 0..MAX_RACES {
            let Some((text, a)) = self.read(&key)? else { return Err(StoreError::Unknown) };
            let mut next = a.clone();
            let result = change(&mut next);
            if next == a {
                return Ok((next, result));
            }
            let json = serde_json::to_string(&next).map_err(|e| StoreError::Io(e.into()))?;
            let written: i64 = self.with(|c| self.cas.key(&key).arg(&text).arg(&json).invoke(c))?;
            if written == 1 {
                return Ok((next, result));
            }
        }
        Err(StoreError::Io(std::io::Error::other("approval still contended")))
    }

    /// An operator approves or denies `id`.
    pub fn decide(
        &self,
        id: &str,
        approve: bool,
        by: &str,
        note: Option<&str>,
        now: UnixMillis,
    ) -> Result<(Approval, Transition), StoreError> {
        let (next, result) = self.change(id, |a| {
            a.tick(now);
            a.decide(approve, by, note, now)
        })?;
        Ok((next, result?))
    }

    /// A retry uses `id` (single use across the fleet, same agent, same action digest).
    pub fn redeem(
        &self,
        id: &str,
        agent: &str,
        digest: &str,
        request_id: &str,
        now: UnixMillis,
    ) -> Result<Approval, StoreError> {
        let (next, result) = self.change(id, |a| a.redeem(agent, digest, request_id, now))?;
        result?;
        Ok(next)
    }

    /// Applies timeouts (whichever proxy sweeps first records each) and forgets approvals
    /// decided more than a day ago.
    pub fn sweep(&self, now: UnixMillis) -> Result<Vec<(Approval, Transition)>, StoreError> {
        let index = self.index_key();
        let ids: Vec<String> =
            self.with(|c| redis::cmd("ZRANGE").arg(&index).arg(0).arg(-1).query(c))?;
        let mut changed = Vec::new();
        for id in ids {
            match self.change(&id, |a| a.tick(now)) {
                Ok((a, Some(t))) => changed.push((a, t)),
                Ok((a, None)) => {
                    let decided = a.decided_at_ms.unwrap_or(a.created_at_ms);
                    if a.state.is_final() && decided + RETENTION_MS < now.as_millis() {
                        let (key, waiting) = (self.approval_key(&id), self.waiting_key(&a));
                        self.with(|c| {
                            redis::cmd("ZREM").arg(&index).arg(&id).query::<()>(c)?;
                            redis::cmd("DEL").arg(&key).query::<()>(c)?;
                            // The pointer goes only if it still points here.
                            let pointer: Option<String> =
                                redis::cmd("GET").arg(&waiting).query(c)?;
                            if pointer.as_deref() == Some(id.as_str()) {
                                redis::cmd("DEL").arg(&waiting).query::<()>(c)?;
                            }
                            Ok(())
                        })?;
                    }
                }
                Err(StoreError::Unknown) => {
                    self.with(|c| redis::cmd("ZREM").arg(&index).arg(&id).query::<()>(c))?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(changed)
    }

    /// One approval, `None` if unknown (or Redis cannot be read: logged).
    pub fn get(&self, id: &str) -> Option<Approval> {
        match self.read(&self.approval_key(id)) {
            Ok(found) => found.map(|(_, a)| a),
            Err(e) => {
                tracing::warn!(error = %e, "reading an approval from the fleet store");
                None
            }
        }
    }

    /// Every approval in `state` (all when `None`), oldest first.
    pub fn list(&self, state: Option<State>) -> Vec<Approval> {
        let index = self.index_key();
        let read = self.with(|c| {
            let ids: Vec<String> = redis::cmd("ZRANGE").arg(&index).arg(0).arg(-1).query(c)?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let keys: Vec<String> = ids.iter().map(|id| self.approval_key(id)).collect();
            redis::cmd("MGET").arg(&keys).query::<Vec<Option<String>>>(c)
        });
        match read {
            Ok(values) => {
                let mut out: Vec<Approval> = values
                    .into_iter()
                    .flatten()
                    .filter_map(|t| serde_json::from_str(&t).ok())
                    .filter(|a: &Approval| state.is_none_or(|s| a.state == s))
                    .collect();
                out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
                out
            }
            Err(e) => {
                tracing::warn!(error = %e, "listing approvals from the fleet store");
                Vec::new()
            }
        }
    }

    /// The agents disabled anywhere in the fleet.
    pub fn disabled(&self) -> Result<Vec<String>, StoreError> {
        let key = self.disabled_key();
        self.with(|c| redis::cmd("SMEMBERS").arg(&key).query(c))
    }

    /// Marks `agent` disabled (or enabled) for the whole fleet; whether that changed the set.
    pub fn set_disabled(&self, agent: &str, disabled: bool) -> Result<bool, StoreError> {
        let key = self.disabled_key();
        let op = if disabled { "SADD" } else { "SREM" };
        self.with(|c| redis::cmd(op).arg(&key).arg(agent).query::<u64>(c)).map(|n| n > 0)
    }
}
