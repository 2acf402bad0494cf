//! The ledger's sync thread: group commit of whatever the writer has written.
//!
//! The writer counts the batches it writes ([`Durability::wrote`]); this thread fsyncs the
//! current segment and the audit log at most every `fsync_interval` (at once when a flush is
//! waiting or the writer has stopped) and answers the flushes whose batches are then durable.
//! It never writes; while a sync fails it marks itself not ok and retries every 100 ms.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What the writer has written and what the sync thread has made durable, by batch count.
pub(super) struct Durability {
    state: Mutex<SyncState>,
    changed: Condvar,
}

struct SyncState {
    /// Batches written so far.
    written: u64,
    /// Batches known to be on stable storage.
    synced: u64,
    /// The current segment and the audit log.
    files: Vec<Arc<std::fs::File>>,
    /// Flushes waiting for a batch count to be synced.
    waiters: Vec<(u64, tokio::sync::oneshot::Sender<()>)>,
    /// The writer has stopped: sync what is left, then end.
    closing: bool,
}

impl Durability {
    /// Nothing written yet; `files` are the current segment and the audit log.
    pub(super) fn new(files: Vec<Arc<std::fs::File>>) -> Durability {
        Durability {
            state: Mutex::new(SyncState {
                written: 0,
                synced: 0,
                files,
                waiters: Vec::new(),
                closing: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a written batch; returns the count.
    pub(super) fn wrote(&self) -> u64 {
        let mut state = self.lock();
        state.written += 1;
        self.changed.notify_all();
        state.written
    }

    /// Answers `waiters` once everything written so far is synced.
    pub(super) fn notify_when_synced(
        &self,
        waiters: impl Iterator<Item = tokio::sync::oneshot::Sender<()>>,
    ) {
        let mut state = self.lock();
        let target = state.written;
        for done in waiters {
            if state.synced >= target {
                let _ = done.send(());
            } else {
                state.waiters.push((target, done));
            }
        }
        self.changed.notify_all();
    }

    /// Blocks until batch `written` is synced.
    pub(super) fn wait_synced(&self, written: u64) {
        let mut state = self.lock();
        while state.synced < written {
            state = self.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The writer moved to a new segment (the old one is synced).
    pub(super) fn set_segment(&self, file: std::fs::File) {
        self.lock().files[0] = Arc::new(file);
    }

    pub(super) fn close(&self) {
        self.lock().closing = true;
        self.changed.notify_all();
    }
}

/// The sync thread: group commit of whatever the writer has written.
pub(super) struct Syncer {
    pub(super) durability: Arc<Durability>,
    pub(super) interval: Duration,
    pub(super) fault: Option<Arc<AtomicBool>>,
    /// False while syncs fail.
    pub(super) ok: Arc<AtomicBool>,
    pub(super) on_error: Arc<dyn Fn() + Send + Sync>,
}

impl Syncer {
    pub(super) fn run(self) {
        let d = &self.durability;
        let mut last_sync: Option<Instant> = None;
        loop {
            let (target, files) = {
                let mut state = d.lock();
                // Wait for something to sync, then for the group-commit deadline unless a
                // flush (or the end) is waiting.
                while state.written == state.synced {
                    if state.closing {
                        return;
                    }
                    state = d.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
                }
                loop {
                    let due = last_sync.map(|t| self.interval.saturating_sub(t.elapsed()));
                    match due {
                        Some(wait)
                            if !wait.is_zero() && state.waiters.is_empty() && !state.closing =>
                        {
                            state = d
                                .changed
                                .wait_timeout(state, wait)
                                .unwrap_or_else(PoisonError::into_inner)
                                .0;
                        }
                        _ => break,
                    }
                }
                (state.written, state.files.clone())
            };
            last_sync = Some(Instant::now());
            self.sync_until_ok(&files);
            let mut state = d.lock();
            state.synced = target;
            let waiters = std::mem::take(&mut state.waiters);
            for (at, done) in waiters {
                if at <= target {
                    let _ = done.send(());
                } else {
                    state.waiters.push((at, done));
                }
            }
            d.changed.notify_all();
        }
    }

    fn sync_until_ok(&self, files: &[Arc<std::fs::File>]) {
        let mut failures = 0u64;
        loop {
            let injected = match &self.fault {
                Some(f) if f.load(Ordering::Relaxed) => {
                    Err(io::Error::other("injected sync failure (no space left on device)"))
                }
                _ => Ok(()),
            };
            let result = injected.and_then(|()| files.iter().try_for_each(|f| f.sync_data()));
            match result {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(failures, "ledger syncs succeed again");
                    }
                    self.ok.store(true, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    failures += 1;
                    self.ok.store(false, Ordering::Relaxed);
                    if failures == 1 {
                        (self.on_error)();
                        tracing::error!(error = %e, "syncing the ledger failed; retrying");
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}
