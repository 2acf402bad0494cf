//! Fleet mode's oversight state in Redis: approvals (raised through one proxy, decided through
//! another, used once through any) and the disabled agents.
//!
//! Each approval is one JSON value (`<prefix>{approvals}:a:<id>`), changed by the core's state
//! machine (`tollgate_core::approval`) under `WATCH`/`MULTI`, so that two proxies changing one
//! approval at once cannot both win: an approval is used once across the fleet. A sorted set
//! indexes them by creation time, and `…:w:<agent>\0<digest>` points at the pending one for an
//! action (a retrying agent does not raise copies). Every key shares the `{approvals}` hash tag,
//! so the transactions also work on Redis Cluster. The disabled agents are one set,
//! `<prefix>{agents}:disabled`.
//!
//! Calls are synchronous, with the store's timeout: the approval flow already runs them on the
//! blocking pool, as it does for the journal of a single proxy.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use redis::{Commands, Connection};
use tollgate_core::approval::{Approval, State, Transition};
use tollgate_core::time::UnixMillis;

use super::RedisConfig;
use crate::oversight::approvals::StoreError;

/// Decided approvals are kept this long after their decision (as in a single proxy).
const RETENTION_MS: u64 = 24 * 3600 * 1000;

/// The approvals and disabled agents of the fleet.
pub struct SharedOversight {
    client: redis::Client,
    conn: Mutex<Option<Connection>>,
    prefix: String,
    timeout: Duration,
}

fn io(e: redis::RedisError) -> StoreError {
    StoreError::Io(std::io::Error::other(format!("redis: {e}")))
}

fn corrupt(key: &str) -> StoreError {
    StoreError::Io(std::io::Error::other(format!("redis holds a malformed approval under `{key}`")))
}

impl SharedOversight {
    pub fn new(config: &RedisConfig) -> anyhow::Result<SharedOversight> {
        Ok(SharedOversight {
            client: redis::Client::open(config.url.as_str())
                .map_err(|e| anyhow::anyhow!("store.redis.url: {e}"))?,
            conn: Mutex::new(None),
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
        })
    }

    fn approval_key(&self, id: &str) -> String {
        format!("{}{{approvals}}:a:{id}", self.prefix)
    }

    fn waiting_key(&self, a: &Approval) -> String {
        format!("{}{{approvals}}:w:{}\u{0}{}", self.prefix, a.agent, a.digest)
    }

    fn index_key(&self) -> String {
        format!("{}{{approvals}}:index", self.prefix)
    }

    fn disabled_key(&self) -> String {
        format!("{}{{agents}}:disabled", self.prefix)
    }

    /// Runs `f` on the connection (made on first use, dropped after an error so that the next
    /// call reconnects).
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut slot = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            let conn = self.client.get_connection_with_timeout(self.timeout).map_err(io)?;
            conn.set_read_timeout(Some(self.timeout)).map_err(io)?;
            conn.set_write_timeout(Some(self.timeout)).map_err(io)?;
            *slot = Some(conn);
        }
        let Some(conn) = slot.as_mut() else { unreachable!("just connected") };
        let result = f(conn);
        if result.is_err() {
            *slot = None;
        }
        result.map_err(io)
    }

    fn read(con: &mut Connection, key: &str) -> redis::RedisResult<Option<Result<Approval, ()>>> {
        let text: Option<String> = con.get(key)?;
        Ok(text.map(|t| serde_json::from_str(&t).map_err(drop)))
    }

    /// Stores a new pending approval, or returns the pending one already waiting for the same
    /// agent and action.
    pub fn create(&self, approval: Approval, now: UnixMillis) -> Result<Approval, StoreError> {
        let waiting = self.waiting_key(&approval);
        let key = self.approval_key(&approval.id);
        let index = self.index_key();
        let json = serde_json::to_string(&approval).map_err(|e| StoreError::Io(e.into()))?;
        self.with(|con| {
            redis::transaction(con, &[waiting.as_str()], |con, pipe| {
                let existing: Option<String> = con.get(&waiting)?;
                if let Some(id) = existing {
                    if let Some(Ok(a)) = Self::read(con, &self.approval_key(&id))? {
                        if a.state == State::Pending && a.clone().tick(now).is_none() {
                            return Ok(Some(a));
                        }
                    }
                }
                pipe.set(&key, &json)
                    .ignore()
                    .set(&waiting, &approval.id)
                    .ignore()
                    .zadd(&index, &approval.id, approval.created_at_ms)
                    .ignore();
                let done: Option<()> = pipe.query(con)?;
                Ok(done.map(|()| approval.clone()))
            })
        })
    }

    /// Applies `change` to approval `id` atomically; `Ok((next, result))` with the state after
    /// it (written only if it changed).
    fn change<R>(
        &self,
        id: &str,
        mut change: impl FnMut(&mut Approval) -> R,
    ) -> Result<(Approval, R), StoreError> {
        let key = self.approval_key(id);
        let outcome = self.with(|con| {
            redis::transaction(con, &[key.as_str()], |con, pipe| {
                let a = match Self::read(con, &key)? {
                    None => return Ok(Some(Err(StoreError::Unknown))),
                    Some(Err(())) => return Ok(Some(Err(corrupt(&key)))),
                    Some(Ok(a)) => a,
                };
                let mut next = a.clone();
                let result = change(&mut next);
                if next == a {
                    return Ok(Some(Ok((next, result))));
                }
                let Ok(json) = serde_json::to_string(&next) else {
                    return Ok(Some(Err(corrupt(&key))));
                };
                pipe.set(&key, json).ignore();
                let done: Option<()> = pipe.query(con)?;
                Ok(done.map(|()| Ok((next, result))))
            })
        })?;
        outcome
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
        let ids: Vec<String> = self.with(|con| con.zrange(&index, 0, -1))?;
        let mut changed = Vec::new();
        for id in ids {
            match self.change(&id, |a| a.tick(now)) {
                Ok((a, Some(t))) => changed.push((a, t)),
                Ok((a, None)) => {
                    let decided = a.decided_at_ms.unwrap_or(a.created_at_ms);
                    if a.state.is_final() && decided + RETENTION_MS < now.as_millis() {
                        let (key, waiting) = (self.approval_key(&id), self.waiting_key(&a));
                        self.with(|con| {
                            redis::pipe()
                                .del(&key)
                                .ignore()
                                .zrem(&index, &id)
                                .ignore()
                                .cmd("DEL")
                                .arg(&waiting)
                                .ignore()
                                .query::<()>(con)
                        })?;
                    }
                }
                Err(StoreError::Unknown) => {
                    self.with(|con| con.zrem::<_, _, ()>(&index, &id))?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(changed)
    }

    /// One approval, `None` if unknown (or Redis cannot be read: logged).
    pub fn get(&self, id: &str) -> Option<Approval> {
        let key = self.approval_key(id);
        match self.with(|con| Self::read(con, &key)) {
            Ok(Some(Ok(a))) => Some(a),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "reading an approval from the fleet store");
                None
            }
        }
    }

    /// Every approval in `state` (all when `None`), oldest first.
    pub fn list(&self, state: Option<State>) -> Vec<Approval> {
        let index = self.index_key();
        let read = self.with(|con| {
            let ids: Vec<String> = con.zrange(&index, 0, -1)?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let keys: Vec<String> = ids.iter().map(|id| self.approval_key(id)).collect();
            let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(con)?;
            Ok(values)
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
        self.with(|con| con.smembers(&key))
    }

    /// Marks `agent` disabled (or enabled) for the whole fleet.
    pub fn set_disabled(&self, agent: &str, disabled: bool) -> Result<(), StoreError> {
        let key = self.disabled_key();
        self.with(|con| {
            if disabled {
                con.sadd::<_, _, ()>(&key, agent)
            } else {
                con.srem::<_, _, ()>(&key, agent)
            }
        })
    }
}
