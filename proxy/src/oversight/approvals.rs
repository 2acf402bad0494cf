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
use std::sync::{Mutex, PoisonError};

use tollgate_core::approval::{Approval, DecideError, RedeemError, State, Transition};
use tollgate_core::time::UnixMillis;

/// Decided approvals are kept (listed, journalled) this long after their decision.
const RETENTION_MS: u64 = 24 * 3600 * 1000;
/// Most approvals held; past it new ones are refused rather than memory growing.
pub const MAX_APPROVALS: usize = 100_000;

/// Why an approval operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no approval with this id")]
    Unknown,
    #[error(transparent)]
    Decide(#[from] DecideError),
    #[error(transparent)]
    Redeem(#[from] RedeemError),
    #[error("too many approvals are open ({MAX_APPROVALS})")]
    Full,
    #[error("the approvals journal cannot be written: {0}")]
    Io(#[from] std::io::Error),
}

struct Inner {
    map: HashMap<String, Approval>,
    journal: File,
}

/// Every approval, journalled.
pub struct Approvals {
    inner: Mutex<Inner>,
    path: PathBuf,
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
        replayed.total = map.len();
        replayed.pending = map.values().filter(|a| a.state == State::Pending).count();
        Ok((Approvals { inner: Mutex::new(Inner { map, journal }), path }, replayed))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores a new pending approval, or returns the pending one already waiting for the same
    /// agent and action (a retrying agent does not flood operators with copies).
    pub fn create(&self, approval: Approval, now: UnixMillis) -> Result<Approval, StoreError> {
        let mut inner = self.lock();
        let existing = inner.map.values_mut().find(|a| {
            a.agent == approval.agent && a.digest == approval.digest && a.state == State::Pending
        });
        if let Some(a) = existing {
            // A timed-out one is not reused; the tick is journalled by the next sweep.
            if a.clone().tick(now).is_none() {
                return Ok(a.clone());
            }
        }
        if inner.map.len() >= MAX_APPROVALS {
            return Err(StoreError::Full);
        }
        write(&mut inner.journal, &approval)?;
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
        let mut inner = self.lock();
        let Inner { map, journal } = &mut *inner;
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
        let mut inner = self.lock();
        let Inner { map, journal } = &mut *inner;
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
        let mut inner = self.lock();
        let Inner { map, journal } = &mut *inner;
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
        Ok(changed)
    }

    /// One approval (its state as of its last change; call [`Approvals::sweep`] first for
    /// timeouts).
    pub fn get(&self, id: &str) -> Option<Approval> {
        self.lock().map.get(id).cloned()
    }

    /// Every approval in `state` (all when `None`), oldest first.
    pub fn list(&self, state: Option<State>) -> Vec<Approval> {
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
        self.lock().map.values().filter(|a| a.state == State::Pending).count()
    }
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
