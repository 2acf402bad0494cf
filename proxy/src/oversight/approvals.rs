//! The approvals store: every approval in memory, and an append-only journal
//! (`<data_dir>/approvals.jsonl`) so that pending approvals survive a restart.
//!
//! Each change appends the approval's whole new state as one JSON line and syncs it before the
//! change is answered; on start the journal is replayed (the last line of an id wins; a torn
//! last line from a crash is skipped), and rewritten with only what is still live or recently
//! decided (temp file, fsync, rename), so it does not grow forever. The state machine itself is
//! `tollgate_core::approval`; this module stores it. Every method is synchronous and quick apart
//! from the fsync: callers run the mutating ones on the blocking pool.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tollgate_core::approval::{Approval, State, Transition};
use tollgate_core::time::UnixMillis;

use crate::fleet::oversight::SharedOversight;

pub mod error;
pub use error::StoreError;

/// Decided approvals are kept (listed, journalled) this long after their decision.
const RETENTION_MS: u64 = 24 * 3600 * 1000;
/// Most approvals held; past it new ones are refused rather than memory growing.
pub const MAX_APPROVALS: usize = 100_000;

struct Inner {
    map: HashMap<String, Approval>,
    /// `agent\0digest` → the id of the pending approval for it. May hold stale entries (the
    /// approval since decided); a lookup checks, the sweep prunes.
    waiting: HashMap<String, String>,
    journal: File,
}

/// Every approval, journalled; or, in fleet mode, kept in Redis for the whole fleet.
pub struct Approvals {
    inner: Mutex<Inner>,
    path: PathBuf,
    fleet: Option<Arc<SharedOversight>>,
}

/// What opening found.
#[derive(Debug, Default)]
pub struct Replayed {
    pub pending: usize,
    pub total: usize,
    /// Lines that did not parse (a torn tail after a crash).
    pub skipped: usize,
}

impl Approvals {
    /// Opens (creating) the journal in `dir`, replays it and compacts it.
    pub fn open(dir: &Path, now: UnixMillis) -> std::io::Result<(Approvals, Replayed)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("approvals.jsonl");
        let mut map: HashMap<String, Approval> = HashMap::new();
        let mut replayed = Replayed::default();
        if let Ok(file) = File::open(&path) {
            for line in BufReader::new(file).lines() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Approval>(&line) {
                    Ok(a) => {
                        map.insert(a.id.clone(), a);
                    }
                    Err(_) => replayed.skipped += 1,
                }
            }
        }
        map.retain(|_, a| !expired_from_memory(a, now.as_millis()));
        // Compact: the live state only, written aside and renamed over the old journal.
        let tmp = dir.join("approvals.jsonl.tmp");
        {
            let mut out = File::create(&tmp)?;
            let mut ids: Vec<&String> = map.keys().collect();
            ids.sort_unstable();
            for id in ids {
                out.write_all(&line_of(&map[id]))?;
            }
            out.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        let journal = OpenOptions::new().append(true).open(&path)?;
        let waiting = map
            .values()
            .filter(|a| a.state == State::Pending)
            .map(|a| (waiting_key(a), a.id.clone()))
            .collect();
        replayed.total = map.len();
        replayed.pending = map.values().filter(|a| a.state == State::Pending).count();
        let inner = Mutex::new(Inner { map, waiting, journal });
        Ok((Approvals { inner, path, fleet: None }, replayed))
    }

    /// Keeps every approval in the fleet store instead (the journal is then not used).
    pub fn shared(mut self, fleet: Arc<SharedOversight>) -> Approvals {
        self.fleet = Some(fleet);
        self
    }

    /// Whether approvals live in the fleet store.
    pub fn is_shared(&self) -> bool {
        self.fleet.is_some()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `op` on the blocking pool (a change fsyncs the journal), off the request's thread.
    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        op: impl FnOnce(&Approvals) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || op(&store))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores a new pending approval, or returns the pending one already waiting for the same
    /// agent and action (a retrying agent does not flood operators with copies).
    pub fn create(&self, approval: Approval, now: UnixMillis) -> Result<Approval, StoreError> {
        if let Some(fleet) = &self.fleet {
            return fleet.create(approval, now);
        }
        let mut inner = self.lock();
        let key = waiting_key(&approval);
        let existing = inner.waiting.get(&key).and_then(|id| inner.map.get(id));
        if let Some(a) = existing.filter(|a| a.state == State::Pending && waiting_key(a) == key) {
            // A timed-out one is not reused; the tick is journalled by the next sweep.
            if a.clone().tick(now).is_none() {
                return Ok(a.clone());
            }
        }
        if inner.map.len() >= MAX_APPROVALS {
            return Err(StoreError::Full);
        }
        write(&mut inner.journal, &approval)?;
        inner.waiting.insert(key, approval.id.clone());
        inner.map.insert(approval.id.clone(), approval.clone());
        Ok(approval)
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
        if let Some(fleet) = &self.fleet {
            return fleet.decide(id, approve, by, note, now);
        }
        let mut inner = self.lock();
        let Inner { map, journal, .. } = &mut *inner;
        let a = map.get_mut(id).ok_or(StoreError::Unknown)?;
        let mut next = a.clone();
        let timed_out = next.tick(now);
        let result = next.decide(approve, by, note, now);
        if result.is_ok() || timed_out.is_some() {
            write(journal, &next)?;
            *a = next.clone();
        }
        Ok((next, result?))
    }

    /// A retry uses `id` (single use, same agent, same action digest).
    pub fn redeem(
        &self,
        id: &str,
        agent: &str,
        digest: &str,
        request_id: &str,
        now: UnixMillis,
    ) -> Result<Approval, StoreError> {
        if let Some(fleet) = &self.fleet {
            return fleet.redeem(id, agent, digest, request_id, now);
        }
        let mut inner = self.lock();
        let Inner { map, journal, .. } = &mut *inner;
        let a = map.get_mut(id).ok_or(StoreError::Unknown)?;
        let mut next = a.clone();
        let result = next.redeem(agent, digest, request_id, now);
        if next != *a {
            // Journalled before it counts: an approval used in memory but not on disk could be
            // used again after a restart.
            write(journal, &next)?;
            *a = next.clone();
        }
        result?;
        Ok(next)
    }

    /// Applies timeouts; returns what changed. Old decided approvals leave memory.
    pub fn sweep(&self, now: UnixMillis) -> Result<Vec<(Approval, Transition)>, StoreError> {
        if let Some(fleet) = &self.fleet {
            return fleet.sweep(now);
        }
        let mut inner = self.lock();
        let Inner { map, journal, waiting } = &mut *inner;
        let mut changed = Vec::new();
        for a in map.values_mut() {
            if a.state.is_final() {
                continue;
            }
            let mut next = a.clone();
            if let Some(t) = next.tick(now) {
                write(journal, &next)?;
                *a = next.clone();
                changed.push((next, t));
            }
        }
        map.retain(|_, a| !expired_from_memory(a, now.as_millis()));
        waiting.retain(|_, id| map.get(id).is_some_and(|a| a.state == State::Pending));
        Ok(changed)
    }

    /// One approval (its state as of its last change; call [`Approvals::sweep`] first for
    /// timeouts).
    pub fn get(&self, id: &str) -> Option<Approval> {
        if let Some(fleet) = &self.fleet {
            return fleet.get(id);
        }
        self.lock().map.get(id).cloned()
    }

    /// Every approval in `state` (all when `None`), oldest first.
    pub fn list(&self, state: Option<State>) -> Vec<Approval> {
        if let Some(fleet) = &self.fleet {
            return fleet.list(state);
        }
        let mut out: Vec<Approval> = self
            .lock()
            .map
            .values()
            .filter(|a| state.is_none_or(|s| a.state == s))
            .cloned()
            .collect();
        out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        out
    }

    pub fn pending(&self) -> usize {
        if let Some(fleet) = &self.fleet {
            return fleet.list(Some(State::Pending)).len();
        }
        self.lock().map.values().filter(|a| a.state == State::Pending).count()
    }
}

fn waiting_key(a: &Approval) -> String {
    format!("{}\u{0}{}", a.agent, a.digest)
}

fn expired_from_memory(a: &Approval, now: u64) -> bool {
    a.state.is_final()
        && now.saturating_sub(a.decided_at_ms.unwrap_or(a.created_at_ms)) > RETENTION_MS
}

fn line_of(a: &Approval) -> Vec<u8> {
    let mut line = serde_json::to_vec(a).unwrap_or_default();
    line.push(b'\n');
    line
}

fn write(journal: &mut File, a: &Approval) -> std::io::Result<()> {
    journal.write_all(&line_of(a))?;
    journal.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::approval::RedeemError;
    use tollgate_core::risk::OnTimeout;

    fn approval(id: &str, agent: &str, digest: &str) -> Approval {
        Approval {
            id: id.into(),
            request_id: format!("req-{id}"),
            created_at_ms: 1_000,
            expires_at_ms: 10_000,
            on_timeout: OnTimeout::Deny,
            use_within_ms: 5_000,
            agent: agent.into(),
            cost_center: "CC-1234".into(),
            project: "PROJ-ABC123".into(),
            route: "tools".into(),
            action: "deploy".into(),
            digest: digest.into(),
            risk_score: 9000,
            risk_band: "high".into(),
            reason: "risk_high".into(),
            explanation: String::new(),
            state: State::Pending,
            decided_by: None,
            decided_at_ms: None,
            note: None,
            used_by_request: None,
        }
    }

    fn dir(label: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("tollgate-approvals-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_journal_replays_every_change_and_skips_a_torn_tail() {
        let d = dir("replay");
        let (store, replayed) = Approvals::open(&d, UnixMillis(1_000)).unwrap();
        assert_eq!(replayed.total, 0);
        store.create(approval("apr_a", "bot", "d1"), UnixMillis(1_000)).unwrap();
        store.create(approval("apr_b", "bot", "d2"), UnixMillis(1_000)).unwrap();
        // The same agent and action while pending: the existing approval, no copy.
        let dup = store.create(approval("apr_c", "bot", "d1"), UnixMillis(1_500)).unwrap();
        assert_eq!(dup.id, "apr_a");
        store.decide("apr_b", true, "alice", None, UnixMillis(2_000)).unwrap();
        store.redeem("apr_b", "bot", "d2", "req-retry", UnixMillis(2_500)).unwrap();
        drop(store);
        // A crash mid-write leaves half a line.
        let path = d.join("approvals.jsonl");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"id\":\"apr_x\",\"sta").unwrap();
        drop(f);

        let (store, replayed) = Approvals::open(&d, UnixMillis(3_000)).unwrap();
        assert_eq!((replayed.total, replayed.pending, replayed.skipped), (2, 1, 1));
        assert_eq!(store.get("apr_a").unwrap().state, State::Pending);
        assert_eq!(store.get("apr_b").unwrap().state, State::Used, "used stays used");
        assert!(matches!(
            store.redeem("apr_b", "bot", "d2", "again", UnixMillis(3_000)),
            Err(StoreError::Redeem(RedeemError::Used))
        ));
        // Compacted: one line per approval.
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
        // The pending one times out (high risk: denied) in a sweep, journalled.
        let changed = store.sweep(UnixMillis(10_000)).unwrap();
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].1, Transition::TimedOut(OnTimeout::Deny));
        assert_eq!(store.list(Some(State::Denied)).len(), 1);
        drop(store);
        let (store, _) = Approvals::open(&d, UnixMillis(11_000)).unwrap();
        assert_eq!(store.get("apr_a").unwrap().state, State::Denied);
        assert!(matches!(
            store.decide("apr_zz", true, "a", None, UnixMillis(11_000)),
            Err(StoreError::Unknown)
        ));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn decided_approvals_leave_memory_after_a_day() {
        let d = dir("retention");
        let (store, _) = Approvals::open(&d, UnixMillis(1_000)).unwrap();
        store.create(approval("apr_a", "bot", "d1"), UnixMillis(1_000)).unwrap();
        store.decide("apr_a", false, "bob", None, UnixMillis(2_000)).unwrap();
        store.sweep(UnixMillis(2_000 + RETENTION_MS)).unwrap();
        assert!(store.get("apr_a").is_some());
        store.sweep(UnixMillis(2_001 + RETENTION_MS)).unwrap();
        assert!(store.get("apr_a").is_none());
        let _ = std::fs::remove_dir_all(&d);
    }
}
