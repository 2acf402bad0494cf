//! The ledger's sync thread: group commit of whatever the writer has written.
//!
//! The writer counts the batches it writes ([`Durability::wrote`]); this thread fsyncs the
//! current segment and the audit log at most every `fsync_interval` (at once when a flush is
//! waiting or the writer has stopped) and answers the flushes whose batches are then durable.
//! It never writes the ledger; while a sync fails it marks itself not ok and retries every 100 ms.
//! After a sync it publishes the head of what is now durable, and replaces the checkpoint
//! (`head.json`) when a flush is waiting, when the writer stops, or when the last one is a second
//! old.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::head::{self, Head};

/// Longest age of the checkpoint while records are being written.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

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
    /// Batches the checkpoint file covers.
    checkpointed: u64,
    /// The head after the last batch written, and after the last one synced.
    head_written: Head,
    head_synced: Head,
}

impl Durability {
    /// Nothing written yet; `files` are the current segment and the audit log, `head` what they
    /// hold.
    pub(super) fn new(files: Vec<Arc<std::fs::File>>, head: Head) -> Durability {
        Durability {
            state: Mutex::new(SyncState {
                written: 0,
                synced: 0,
                checkpointed: 0,
                files,
                waiters: Vec::new(),
                closing: false,
                head_written: head.clone(),
                head_synced: head,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a written batch, after which the files hold `head`; returns the count.
    ///
    /// Wakes the sync thread only when it may be waiting for something to sync (everything
    /// written before was synced): while a sync is due it sleeps until the due time, and waking
    /// it for every batch (a thousand times a second under load, on the CPU the requests use)
    /// only had it compute that time again.
    pub(super) fn wrote(&self, head: &Head) -> u64 {
        let mut state = self.lock();
        state.written += 1;
        state.head_written.clone_from(head);
        if state.written == state.synced + 1 {
            self.changed.notify_all();
        }
        state.written
    }

    /// Answers `waiters` once everything written so far is synced (nothing to do, and no lock
    /// taken, when there are none).
    pub(super) fn notify_when_synced(
        &self,
        waiters: impl ExactSizeIterator<Item = tokio::sync::oneshot::Sender<()>>,
    ) {
        if waiters.len() == 0 {
            return;
        }
        let mut state = self.lock();
        let target = state.written;
        for done in waiters {
            if state.checkpointed >= target {
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

    /// The writer moved to a new segment of the ledger (`0`) or the audit log (`1`); the old one
    /// is synced.
    pub(super) fn set_file(&self, which: usize, file: std::fs::File) {
        self.lock().files[which] = Arc::new(file);
    }

    /// The head of what is synced.
    pub(super) fn synced_head(&self) -> Head {
        self.lock().head_synced.clone()
    }

    pub(super) fn close(&self) {
        self.lock().closing = true;
        self.changed.notify_all();
    }
}

/// The sync thread: group commit of whatever the writer has written.
pub(super) struct Syncer {
    pub(super) durability: Arc<Durability>,
    /// `<data_dir>/head.json`.
    pub(super) checkpoint: PathBuf,
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
        let mut last_checkpoint = Instant::now();
        loop {
            let (target, files, head) = {
                let mut state = d.lock();
                // Wait for something to sync (or a flush whose batches are synced but not yet
                // in the checkpoint), then for the group-commit deadline unless a flush (or the
                // end) is waiting.
                loop {
                    let unpublished = state.checkpointed < state.synced;
                    if state.written > state.synced
                        || !state.waiters.is_empty()
                        || (state.closing && unpublished)
                    {
                        break;
                    }
                    if state.closing {
                        return;
                    }
                    state = d.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
                }
                while state.written > state.synced {
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
                let files = (state.written > state.synced).then(|| state.files.clone());
                (state.written, files, state.head_written.clone())
            };
            if let Some(files) = files {
                last_sync = Some(Instant::now());
                self.sync_until_ok(&files);
            }
            let (answer, closing) = {
                let mut state = d.lock();
                state.synced = target;
                state.head_synced.clone_from(&head);
                let (answer, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut state.waiters)
                    .into_iter()
                    .partition(|(at, _)| *at <= target);
                state.waiters = wait;
                d.changed.notify_all();
                (answer, state.closing)
            };
            // The checkpoint never claims more than is durable (it follows the sync), and a
            // flush returns only once it is written.
            if !answer.is_empty() || closing || last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                if let Err(e) = head::write_checkpoint(&self.checkpoint, &head) {
                    tracing::error!(
                        error = %e,
                        path = %self.checkpoint.display(),
                        "writing the ledger head checkpoint"
                    );
                }
                last_checkpoint = Instant::now();
                d.lock().checkpointed = target;
            }
            for (_, done) in answer {
                let _ = done.send(());
            }
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
