//! The durable usage ledger and the audit chain, written by one writer thread.
//!
//! Requests hand their records to a bounded queue and never wait on the disk. The writer takes
//! whatever is queued, appends it to the current segment of `<data_dir>/ledger/` (one line per
//! record: `<crc32 hex> <link> <json>\n`, each line linked to the one before it by its hash, see
//! [`crate::store::chain`]) and appends the decisions to the segments of the chained audit log
//! (`<data_dir>/audit/`, see [`crate::audit`]). A second thread fsyncs both at most every
//! `fsync_interval` (group commit; `0` makes the writer wait for the sync of each batch before
//! it takes the next). Writes never wait for an fsync: a slow disk (a sync can take hundreds of
//! milliseconds on a busy machine) must not keep records in memory, where a `SIGKILL` loses
//! them. So a `SIGKILL` loses only what was still queued (at most the last fsync window), an OS
//! crash at most one fsync window more, and `SIGTERM` nothing ([`Ledger::flush`] waits for the
//! sync).
//!
//! On open, every segment is scanned, every checksum and every link verified, and the ledger and
//! the audit log compared with the last published head (`head.json`, see [`head`]). Only an
//! unterminated last line of the last segment is a torn write (a crash mid-write): it is cut off
//! with a warning. Anything else that does not verify (a complete line with a bad checksum, a
//! record that does not decode, a broken link, fewer records than the head) is corruption or
//! tampering: the ledger refuses to open, names the segment and line and leaves the file as it
//! is, unless the operator has accepted that record as lost (`ledger.accept_corrupt`). The
//! records of the last 35 days are handed back so that budgets and open reservations can be
//! rebuilt.
//!
//! When a write or a sync fails (disk full, I/O error) the writer truncates the segment back to
//! its last good length, keeps the batch, marks the ledger unhealthy (the proxy then answers 503
//! to new metered requests and `/readyz` fails) and retries every 100 ms; service resumes when
//! the disk does. Nothing queued is dropped and no partial record survives.

use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use crate::audit::{self, Chain};
use anyhow::Context;

use crate::store::chain::{self, Body, Encoding, Key, Linker, Pos, Problem};
use crate::store::{self, continue_segment, segments};
use codec::{decode, to_json};
use head::{Head, Tip};
use sync::{Durability, Syncer};
use tollgate_core::record::compact::Encoder;

/// How far back [`Recovered::records`] reaches: enough for every budget period.
const REPLAY_DAYS: u64 = 35;
/// How long the writer lets records gather after writing a batch: a millisecond, and under load
/// (a batch of at least [`BUSY`] messages) the fsync window, at most 5 ms. Each batch costs a
/// wake-up and a write to each of the two logs, on the CPU the requests use; a `SIGKILL` loses
/// what is still queued, so the wait is never longer than the window the ledger promises
/// (`fsync_interval`), and light traffic is written within the millisecond as before.
const LINGER: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(5));
/// Messages in a batch from which the writer waits the longer [`LINGER`].
const BUSY: usize = 16;
/// Queue capacity (its slots are allocated up front: 16 Ki x 24 bytes); beyond it records wait in
/// detached senders and the ledger reports pressure.
const QUEUE: usize = 16 * 1024;

/// What the writer stores: the typed records of [`tollgate_core::record`].
pub use tollgate_core::record::{Entry, ReserveRecord, Stored, UsageRecord};

enum Msg {
    Entry(Entry),
    Audit(Box<audit::Event>),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Where and how the ledger writes.
#[derive(Clone, Debug)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// Longest time a written record waits for fsync; zero syncs every batch.
    pub fsync_interval: Duration,
    pub segment_bytes: u64,
    /// Fault injection for tests: while set, every write and sync fails like a full disk.
    pub fault: Option<Arc<AtomicBool>>,
    /// Links records by HMAC-SHA256 under this key instead of SHA-256.
    pub hmac_key: Option<Key>,
    /// Corrupt records (`00000003.seg:17`) the operator has accepted as lost: the ledger opens
    /// without them instead of refusing.
    pub accept_corrupt: Vec<String>,
    /// How new records are written (both encodings are always read).
    pub encoding: Encoding,
    /// Sealed segments older than this (settled, and acknowledged when `acknowledge`) are
    /// retired ([`retire`]); `None` keeps everything.
    pub retention: Option<Duration>,
    /// Records are shipped (`chargeback.export`): a segment retires only once the export's
    /// cursor is past it.
    pub acknowledge: bool,
    /// The data volume's size, when smaller than its filesystem (an `emptyDir` limit).
    pub volume_bytes: Option<u64>,
}

/// What opening the ledger found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Ledger records of the last 35 days, oldest first.
    pub records: Vec<Stored>,
    pub segments: usize,
    /// Bytes of a torn last record removed from the ledger and the audit log.
    pub truncated_bytes: u64,
    pub audit_records: u64,
    /// Corrupt records left out because `ledger.accept_corrupt` names them.
    pub corrupt_accepted: usize,
}

/// A handle to the writer; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    /// `None` when the ledger is disabled (benchmarks only).
    tx: Option<SyncSender<Msg>>,
    overflow: Overflow,
    /// False while writes fail or the queue is full.
    healthy: Arc<AtomicBool>,
    /// False while syncs fail.
    synced: Arc<AtomicBool>,
    dir: Arc<PathBuf>,
    /// `None` when the ledger is disabled.
    durability: Option<Arc<Durability>>,
    /// The data directory's size and free space.
    storage: Arc<storage::Monitor>,
}

impl Ledger {
    /// Scans and repairs the ledger and the audit log, then starts the writer thread.
    pub fn open(
        settings: Settings,
        on_error: impl Fn() + Send + Sync + 'static,
        now_ms: u64,
    ) -> anyhow::Result<(Ledger, Recovered)> {
        let dir = settings.data_dir.join("ledger");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let id = ledger_id(&dir)?;
        let checkpoint = head::read_checkpoint(&settings.data_dir)?;
        let linker = Linker::new(settings.hmac_key.as_ref());
        let retired = store::retired::read(&settings.data_dir, Some(&linker))?.unwrap_or_default();
        // A retirement cut short by a crash: its files are covered by the checkpoint.
        store::remove_covered(&dir, retired.ledger.through_segment)?;
        let replay_from = now_ms.saturating_sub(REPLAY_DAYS * 86_400_000);
        let scan = scan(
            &dir,
            &linker,
            replay_from,
            checkpoint.as_ref(),
            &settings.accept_corrupt,
            settings.encoding,
            &retired,
        )?;
        let audit_path = audit::dir(&settings.data_dir);
        let (chain, opened) = Chain::open(
            &settings.data_dir,
            linker.clone(),
            settings.segment_bytes,
            settings.encoding,
        )?;
        let (audit_records, audit_hash) = chain.head();
        if let Some(checkpoint) = &checkpoint {
            let at = audit::hash_of_record(&settings.data_dir, checkpoint.audit.records)?;
            head::compare("the audit log", &checkpoint.audit, audit_records, at.as_deref())
                .map_err(|e| refuse_head(&audit_path, &settings.data_dir, &e))?;
        }
        let head = Head {
            ledger: scan.head.clone(),
            audit: Tip { records: audit_records, last_hash: audit_hash },
        };
        head::write_checkpoint(&head::checkpoint_path(&settings.data_dir), &head).with_context(
            || format!("writing {}", head::checkpoint_path(&settings.data_dir).display()),
        )?;
        // The usage of retired days within the replay window, as one record per group, so that
        // budgets are rebuilt with it.
        let mut records: Vec<Stored> = retired
            .groups
            .iter()
            .enumerate()
            .filter(|(_, g)| g.reserved_day_ms + 86_400_000 > replay_from && !g.budgets.is_empty())
            .map(|(i, g)| Stored {
                seq: 0,
                event_id: String::new(),
                entry: Entry::Usage(Box::new(g.as_record(i))),
            })
            .collect();
        records.extend(scan.records);
        let recovered = Recovered {
            records,
            segments: scan.segments,
            truncated_bytes: scan.truncated_bytes + opened.truncated_bytes,
            audit_records: opened.records,
            corrupt_accepted: scan.corrupt_accepted,
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let overflow = Overflow::default();
        let healthy = Arc::new(AtomicBool::new(true));
        let on_error: Arc<dyn Fn() + Send + Sync> = Arc::new(on_error);
        let durability = Arc::new(Durability::new(
            vec![Arc::new(scan.file.try_clone()?), Arc::new(chain.sync_handle()?)],
            head.clone(),
        ));
        let syncer = Syncer {
            checkpoint: head::checkpoint_path(&settings.data_dir),
            durability: durability.clone(),
            interval: settings.fsync_interval,
            fault: settings.fault.clone(),
            ok: Arc::new(AtomicBool::new(true)),
            on_error: on_error.clone(),
        };
        let synced = syncer.ok.clone();
        let ledger_segment = Arc::new(AtomicU64::new(scan.last_segment));
        let audit_segment = Arc::new(AtomicU64::new(chain.segment()));
        if let Some(retention) = settings.retention {
            let retirer = Retirer {
                data_dir: settings.data_dir.clone(),
                linker: linker.clone(),
                retention,
                acknowledge: settings.acknowledge,
                ledger_segment: ledger_segment.clone(),
                audit_segment: audit_segment.clone(),
                alive: Arc::downgrade(&healthy),
            };
            std::thread::Builder::new()
                .name("tollgate-retire".into())
                .spawn(move || retirer.run())
                .context("starting the retention thread")?;
        }
        let syncer = std::thread::Builder::new()
            .name("tollgate-ledger-sync".into())
            .spawn(move || syncer.run())
            .context("starting the ledger sync thread")?;
        let settings_dir = settings.data_dir.clone();
        let volume_bytes = settings.volume_bytes;
        let writer = Writer {
            dir: dir.clone(),
            id,
            segment: scan.last_segment,
            file: scan.file,
            good_len: scan.last_len,
            seq: scan.last_seq,
            event_id: String::new(),
            link: scan.next_link,
            encoder: scan.encoder,
            linker,
            records: scan.head.records,
            head,
            batch_last: None,
            chain,
            settings,
            healthy: healthy.clone(),
            on_error,
            durability: durability.clone(),
            overflow: overflow.clone(),
            ledger_segment,
            audit_segment,
        };
        std::thread::Builder::new()
            .name("tollgate-ledger".into())
            .spawn(move || {
                writer.run(rx);
                let _ = syncer.join();
            })
            .context("starting the ledger writer")?;
        let ledger = Ledger {
            tx: Some(tx),
            overflow,
            healthy,
            synced,
            dir: Arc::new(dir),
            durability: Some(durability),
            storage: Arc::new(storage::Monitor::new(&settings_dir, volume_bytes)),
        };
        Ok((ledger, recovered))
    }

    /// Queues a record. Never blocks: if the queue is full the record waits in a detached
    /// sender (it is not dropped) and the ledger reports itself unhealthy until it drains.
    pub fn append(&self, entry: Entry) {
        self.send(Msg::Entry(entry));
    }

    /// Queues a decision for the audit chain.
    pub fn audit(&self, event: audit::Event) {
        self.send(Msg::Audit(Box::new(event)));
    }

    /// A ledger that records nothing, for measuring what the ledger costs (`ledger: {enabled:
    /// false}`). Never use it in production: requests are then served unrecorded.
    pub fn disabled(data_dir: &Path) -> Ledger {
        Ledger {
            tx: None,
            overflow: Overflow::default(),
            healthy: Arc::new(AtomicBool::new(true)),
            synced: Arc::new(AtomicBool::new(true)),
            dir: Arc::new(data_dir.join("ledger")),
            durability: None,
            storage: Arc::new(storage::Monitor::new(data_dir, None)),
        }
    }

    fn send(&self, msg: Msg) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(msg)) => {
                // The disk is not keeping up: report pressure (new metered requests get 503
                // until the writer catches up) and keep the record.
                self.healthy.store(false, Ordering::Relaxed);
                self.overflow.lock().unwrap_or_else(PoisonError::into_inner).push(msg);
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!("the ledger writer has stopped; record lost");
            }
        }
    }

    /// Waits until everything queued before this call is written and synced.
    pub async fn flush(&self) {
        let Some(tx) = self.tx.clone() else { return };
        let (done, wait) = tokio::sync::oneshot::channel();
        let sent = tokio::task::spawn_blocking(move || tx.send(Msg::Flush(done)).is_ok()).await;
        if matches!(sent, Ok(true)) {
            let _ = wait.await;
        }
    }

    /// False while writes or syncs fail (or the queue is full): metered requests are refused
    /// then.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.synced.load(Ordering::Relaxed)
    }

    /// The data directory's size, free space and when it will be full.
    pub fn storage(&self) -> storage::Reading {
        self.storage.read()
    }

    /// Whether to log a low-space warning now (at most once a minute).
    pub fn warn_low_space_now(&self) -> bool {
        self.storage.warn_now()
    }

    /// The directory of the segments.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The head of what is synced (call [`Ledger::flush`] first for everything queued); `None`
    /// when the ledger is disabled.
    pub fn head(&self) -> Option<Head> {
        self.durability.as_ref().map(|d| d.synced_head())
    }
}

/// The ledger's stable identity, the prefix of every event id (`<id>-<seq>`).
fn ledger_id(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("ID");
    if let Ok(id) = std::fs::read_to_string(&path) {
        return Ok(id.trim().to_string());
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let id = format!("{:016x}", (nanos as u64) ^ (u64::from(std::process::id()) << 40));
    std::fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

struct Scan {
    records: Vec<Stored>,
    segments: usize,
    truncated_bytes: u64,
    corrupt_accepted: usize,
    last_segment: u64,
    last_len: u64,
    last_seq: u64,
    /// The link of the next record.
    next_link: [u8; 32],
    head: Tip,
    file: std::fs::File,
    encoder: Encoder,
}

/// `00000003.seg:17`: how `ledger.accept_corrupt` names a record.
fn short(pos: &Pos) -> String {
    format!("{}:{}", pos.segment.file_name().unwrap_or_default().to_string_lossy(), pos.line)
}

fn scan(
    dir: &Path,
    linker: &Linker,
    replay_from_ms: u64,
    checkpoint: Option<&Head>,
    accept: &[String],
    encoding: Encoding,
    checkpoint_retired: &store::retired::Checkpoint,
) -> anyhow::Result<Scan> {
    let retired = &checkpoint_retired.ledger;
    let numbers = kept(dir, retired)?;
    let mut records = Vec::new();
    // Where each replayed record is, when some may have to be left out.
    let mut positions = Vec::new();
    let mut last_seq = 0;
    let hash_at: Vec<u64> = checkpoint
        .map(|h| h.ledger.records)
        .filter(|&n| n > retired.records)
        .map(|n| n - retired.records)
        .into_iter()
        .collect();
    let walk =
        chain::walk_from(dir, &numbers, linker, &hash_at, retired.start(), |record, pos| {
            let stored = decode(record)?;
            if stored.seq != 0 {
                last_seq = stored.seq;
            }
            if stored.entry.reserved_at_ms().unwrap_or(u64::MAX) >= replay_from_ms {
                records.push(stored);
                if !accept.is_empty() {
                    positions.push(short(pos));
                }
            }
            Ok(())
        })?;
    let (accepted, refused): (Vec<&Problem>, Vec<&Problem>) =
        walk.problems.iter().partition(|p| accept.contains(&short(p.at())));
    if let Some(problem) = refused.first() {
        anyhow::bail!(
            "{problem}: the ledger is corrupt or was tampered with (a complete record that does \
             not verify is not a write torn by a crash); refusing to start, the file is left as \
             it is{more}. Find out what changed it (`tollgate audit verify` reports the whole \
             ledger), then restore the segment from a backup, or accept the record as lost with \
             `ledger: {{accept_corrupt: [\"{at}\"]}}` (its cost is then missing from the budgets) \
             and start again",
            at = short(problem.at()),
            more = match refused.len() {
                1 => String::new(),
                n => format!(" ({} more problems after it)", n - 1),
            },
        );
    }
    for problem in &accepted {
        tracing::error!(
            problem = %problem,
            "ledger: a corrupt record, accepted as lost by ledger.accept_corrupt: left out of the \
             budgets; the segment is left as it is"
        );
    }
    let lost: std::collections::HashSet<String> = accepted.iter().map(|p| short(p.at())).collect();
    if !lost.is_empty() {
        let mut keep = positions.iter().map(|p| !lost.contains(p));
        records.retain(|_| keep.next().unwrap_or(true));
    }
    if walk.last_mode == Some(chain::Mode::Hmac) && linker.mode() == chain::Mode::Sha256 {
        tracing::warn!(
            "ledger: its records are linked by HMAC but no key is configured (ledger.hmac_key_file \
             or hmac_key_env): new records are linked by plain SHA-256, and `tollgate audit verify` \
             with the key will report them"
        );
    }
    let records_total = retired.records + walk.records;
    if let Some(checkpoint) = checkpoint {
        // A record accepted as lost cannot hash to what the head says: that is the corruption
        // already accepted, not a rewrite. A retired record is vouched for by the retirement
        // checkpoint.
        let at = match checkpoint.ledger.records <= retired.records {
            true => Some(checkpoint.ledger.last_hash.clone())
                .filter(|_| checkpoint.ledger.records < retired.records)
                .or(Some(retired.last_hash.clone())),
            false => {
                walk.hashes_at.first().map(|(_, hash, pos)| match lost.contains(&short(pos)) {
                    true => checkpoint.ledger.last_hash.clone(),
                    false => chain::hex(hash),
                })
            }
        };
        head::compare("the ledger", &checkpoint.ledger, records_total, at.as_deref())
            .map_err(|e| refuse_head(dir, dir.parent().unwrap_or(dir), &e))?;
    }
    let last = numbers.last().copied().unwrap_or(retired.through_segment + 1);
    let mut truncated_bytes = 0;
    if let Some(torn) = &walk.torn {
        // The last record of the last segment, cut short by a crash: a torn tail.
        truncated_bytes = torn.bytes;
        let file = std::fs::OpenOptions::new().write(true).open(&torn.at.segment)?;
        file.set_len(torn.offset)?;
        file.sync_all()?;
        tracing::warn!(
            segment = %torn.at.segment.display(),
            line = torn.at.line,
            bytes = torn.bytes,
            "ledger: truncated a torn last record (an unterminated line: a crash during a write)"
        );
    }
    let (last, file, last_len, encoder) = continue_segment(dir, last, encoding, walk.context)?;
    Ok(Scan {
        records,
        segments: numbers.len().max(1),
        truncated_bytes,
        corrupt_accepted: accepted.len(),
        last_segment: last,
        last_len,
        last_seq: last_seq.max(checkpoint_retired.last_seq),
        next_link: walk.next_link,
        head: Tip {
            records: records_total,
            last_hash: match walk.records {
                0 => retired.last_hash.clone(),
                _ => chain::hex(&walk.last_hash),
            },
        },
        file,
        encoder,
    })
}

/// The segments of `dir` after the retired ones.
fn kept(dir: &Path, retired: &store::retired::Retired) -> io::Result<Vec<u64>> {
    Ok(segments(dir)?.into_iter().filter(|&n| n > retired.through_segment).collect())
}

/// The error for a ledger or audit log that no longer holds what its published head says.
fn refuse_head(what: &Path, data_dir: &Path, problem: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: {problem} (compared with {}); refusing to start, nothing is changed. If the data \
         was restored from a backup on purpose, move head.json aside and start again",
        what.display(),
        head::checkpoint_path(data_dir).display()
    )
}

struct Writer {
    dir: PathBuf,
    id: String,
    segment: u64,
    file: std::fs::File,
    good_len: u64,
    seq: u64,
    /// The current record's event id (`<id>-<seq>`), its buffer kept between records.
    event_id: String,
    /// The link the next record carries.
    link: [u8; 32],
    linker: Linker,
    /// The current segment's strings (compact encoding).
    encoder: Encoder,
    /// Records in the ledger (lines), and the head as of the last batch written.
    records: u64,
    head: Head,
    /// The last ledger line of the batch being gathered.
    batch_last: Option<std::ops::Range<usize>>,
    chain: Chain,
    settings: Settings,
    healthy: Arc<AtomicBool>,
    on_error: Arc<dyn Fn() + Send + Sync>,
    durability: Arc<Durability>,
    overflow: Overflow,
    /// The segments being written, for the retention thread (which never retires them).
    ledger_segment: Arc<AtomicU64>,
    audit_segment: Arc<AtomicU64>,
}

/// The retention thread: a pass over the sealed segments every so often ([`retire::run`]).
struct Retirer {
    data_dir: PathBuf,
    linker: Linker,
    retention: Duration,
    acknowledge: bool,
    ledger_segment: Arc<AtomicU64>,
    audit_segment: Arc<AtomicU64>,
    /// Gone once the ledger is dropped: the thread ends.
    alive: std::sync::Weak<AtomicBool>,
}

impl Retirer {
    fn run(self) {
        // Often enough that a short retention keeps the disk flat, never more than once a second.
        let every = (self.retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            std::thread::sleep(every);
            if self.alive.upgrade().is_none() {
                return;
            }
            let policy = retire::Policy {
                retention_ms: self.retention.as_millis() as u64,
                now_ms: crate::clock::now().0,
                ledger_current: self.ledger_segment.load(Ordering::Relaxed),
                audit_current: self.audit_segment.load(Ordering::Relaxed),
                acknowledged: self.acknowledge.then(|| cursor::load_cursor(&self.data_dir)),
            };
            match retire::run(&self.data_dir, &self.linker, &policy) {
                Ok(o) if o.ledger_segments + o.audit_segments > 0 => tracing::info!(
                    ledger_segments = o.ledger_segments,
                    audit_segments = o.audit_segments,
                    bytes = o.bytes,
                    "retired segments past the retention"
                ),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %format!("{e:#}"), "retiring ledger segments"),
            }
        }
    }
}

/// Messages that found the queue full: kept here (never dropped, never a thread each) and
/// taken by the writer with the next batch.
type Overflow = Arc<std::sync::Mutex<Vec<Msg>>>;

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        let mut batch: Vec<u8> = Vec::with_capacity(256 * 1024);
        let mut audit_batch: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut waiters = Vec::new();
        let window = self.settings.fsync_interval.clamp(LINGER.0, LINGER.1);
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(msg) = next {
                taken += 1;
                self.take(msg, &mut batch, &mut audit_batch, &mut waiters);
                next = if batch.len() < 1 << 20 { rx.try_recv().ok() } else { None };
            }
            let overflow =
                std::mem::take(&mut *self.overflow.lock().unwrap_or_else(PoisonError::into_inner));
            for msg in overflow {
                self.take(msg, &mut batch, &mut audit_batch, &mut waiters);
            }
            if !batch.is_empty() || !audit_batch.is_empty() {
                self.write_until_ok(&batch, &audit_batch);
                self.advance_head(&batch);
                batch.clear();
                audit_batch.clear();
                let written = self.durability.wrote(&self.head);
                if self.settings.fsync_interval.is_zero() {
                    self.durability.wait_synced(written);
                }
            }
            self.durability.notify_when_synced(waiters.drain(..));
            // Under load, let records gather for a moment: one wake-up per fsync window instead
            // of one per record (context switches were the largest cost in the load test's
            // profile). A SIGKILL can lose at most this much more.
            std::thread::sleep(if taken >= BUSY { window } else { LINGER.0 });
        }
        self.durability.close();
    }

    fn take(
        &mut self,
        msg: Msg,
        batch: &mut Vec<u8>,
        audit_batch: &mut Vec<u8>,
        waiters: &mut Vec<tokio::sync::oneshot::Sender<()>>,
    ) {
        match msg {
            Msg::Entry(entry) => {
                self.seq += 1;
                use std::fmt::Write as _;
                // The event id's buffer is reused from record to record.
                let mut event_id = std::mem::take(&mut self.event_id);
                event_id.clear();
                let _ = write!(event_id, "{}-{}", self.id, self.seq);
                let stored: Stored<&Entry> = Stored { seq: self.seq, event_id, entry: &entry };
                let mut error = None;
                let mode = self.linker.mode();
                let line = match self.settings.encoding {
                    Encoding::Compact => chain::frame_compact(batch, mode, &self.link, |out| {
                        self.encoder.stored(&stored, out)
                    }),
                    Encoding::Json => chain::frame(batch, mode, &self.link, |out| {
                        serde_json::to_writer(&mut *out, &stored)
                            .map_err(|e| error = Some(e))
                            .is_ok()
                    }),
                };
                self.event_id = stored.event_id;
                match line {
                    Some(line) => {
                        // The chain advances here, on the writer thread, never on a request's.
                        self.link = self.linker.link_after(&batch[line.clone()]);
                        self.records += 1;
                        self.batch_last = Some(line);
                    }
                    None => tracing::error!(error = ?error, "serializing a ledger record"),
                }
            }
            Msg::Audit(event) => self.chain.append_to(*event, audit_batch),
            Msg::Flush(done) => waiters.push(done),
        }
    }

    /// The head after `batch` (written): the ledger's count and the hash of its last line, and
    /// the audit log's.
    fn advance_head(&mut self, batch: &[u8]) {
        if let Some(line) = self.batch_last.take() {
            let hash = match self.linker.mode() {
                chain::Mode::Sha256 => self.link,
                chain::Mode::Hmac => chain::sha256(&batch[line]),
            };
            self.head.ledger = Tip { records: self.records, last_hash: chain::hex(&hash) };
        }
        let (records, last_hash) = self.chain.head();
        self.head.audit = Tip { records, last_hash };
    }

    fn faulty(&self) -> io::Result<()> {
        match &self.settings.fault {
            Some(f) if f.load(Ordering::Relaxed) => {
                Err(io::Error::other("injected write failure (no space left on device)"))
            }
            _ => Ok(()),
        }
    }

    /// Writes the batch, retrying every 100 ms while it fails; never leaves a partial record
    /// and never writes a record twice.
    fn write_until_ok(&mut self, batch: &[u8], audit_batch: &[u8]) {
        let mut failures = 0u64;
        let (mut ledger_done, mut audit_done) = (batch.is_empty(), audit_batch.is_empty());
        loop {
            let mut result = self.faulty();
            if result.is_ok() && !ledger_done {
                result = self.file.write_all(batch);
                if result.is_ok() {
                    ledger_done = true;
                    self.good_len += batch.len() as u64;
                }
            }
            if result.is_ok() && !audit_done {
                result = self.chain.write(audit_batch, false);
                audit_done = result.is_ok();
            }
            match result {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(failures, "ledger writes succeed again");
                    }
                    self.healthy.store(true, Ordering::Relaxed);
                    if self.good_len >= self.settings.segment_bytes {
                        self.rotate();
                    }
                    if let Some(handle) = self.chain.rotate_if_full() {
                        self.durability.set_file(1, handle);
                        self.audit_segment.store(self.chain.segment(), Ordering::Relaxed);
                    }
                    return;
                }
                Err(e) => {
                    failures += 1;
                    self.healthy.store(false, Ordering::Relaxed);
                    if failures == 1 {
                        (self.on_error)();
                        tracing::error!(
                            error = %e,
                            "writing the ledger failed; refusing metered requests until it works"
                        );
                    }
                    // Remove whatever part of the batch reached the files.
                    if !ledger_done {
                        let _ = self.file.set_len(self.good_len);
                        let _ = self.file.seek(io::SeekFrom::End(0));
                    }
                    if !audit_done {
                        let _ = self.chain.rewind();
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn rotate(&mut self) {
        if self.file.sync_data().is_err() {
            return; // try again after the next batch
        }
        let next = self.segment + 1;
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(chain::segment_path(&self.dir, next))
            .and_then(|mut file| {
                if self.settings.encoding == Encoding::Compact {
                    file.write_all(chain::MAGIC)?;
                }
                Ok(file)
            });
        match opened {
            Ok(file) => {
                match file.try_clone() {
                    Ok(handle) => self.durability.set_file(0, handle),
                    // The syncer keeps syncing the old (already synced) segment; stay on it.
                    Err(e) => {
                        tracing::error!(error = %e, "opening a new ledger segment");
                        return;
                    }
                }
                self.file = file;
                self.segment = next;
                self.ledger_segment.store(next, Ordering::Relaxed);
                self.good_len = match self.settings.encoding {
                    Encoding::Compact => chain::MAGIC.len() as u64,
                    Encoding::Json => 0,
                };
                self.encoder.reset();
            }
            Err(e) => tracing::error!(error = %e, "opening a new ledger segment"),
        }
    }
}

/// Every record of the ledger in `data_dir`, verified and typed, oldest first (for invoices
/// and the usage API): checksums and unkeyed links (keyed links need the key: `tollgate audit
/// verify` checks them). An unterminated last line (a torn write, or one being written) is
/// skipped; any other line that does not verify or does not decode is an error naming its
/// segment and line.
pub fn read_records(data_dir: &Path) -> anyhow::Result<Vec<Stored>> {
    read_with(data_dir, decode)
}

/// [`read_records`] as JSON (for tests and tools): a JSON line's fields as written, a compact
/// record as the JSON line it stands for; each record is decoded typed as well, so both read the
/// same ledgers.
pub fn read_all(data_dir: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    read_with(data_dir, |body| match body {
        Body::Json(json) => {
            decode(Body::Json(json))?;
            serde_json::from_slice(json).map_err(|e| format!("the record does not decode: {e}"))
        }
        compact => to_json(&decode(compact)?),
    })
}

fn read_with<T>(
    data_dir: &Path,
    mut decode: impl FnMut(Body<'_>) -> Result<T, String>,
) -> anyhow::Result<Vec<T>> {
    let dir = data_dir.join("ledger");
    let mut out = Vec::new();
    let retired = store::retired::read(data_dir, None)?.unwrap_or_default().ledger;
    let numbers = match kept(&dir, &retired) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    let walk =
        chain::walk_from(&dir, &numbers, &Linker::new(None), &[], retired.start(), |record, _| {
            out.push(decode(record)?);
            Ok(())
        })?;
    if let Some(problem) = walk.problems.first() {
        anyhow::bail!(
            "{problem}: the ledger is corrupt or was tampered with (`tollgate audit verify` \
             reports it whole)"
        );
    }
    Ok(out)
}

/// The usage totals of retired segments (for invoices and usage over retired days).
pub fn read_retired(data_dir: &Path) -> anyhow::Result<Vec<store::retired::Group>> {
    Ok(store::retired::read(data_dir, None)?.map(|c| c.groups).unwrap_or_default())
}

/// Verifies the whole ledger in `data_dir` (checksums, records, links; keyed links with `key`)
/// after the retired segments, counting their records; `hashes_at` asks for the hashes of those
/// records (to compare with heads; the last retired one's is the checkpoint's).
pub fn verify(data_dir: &Path, key: Option<&Key>, hashes_at: &[u64]) -> io::Result<chain::Walk> {
    let dir = data_dir.join("ledger");
    let retired = store::retired::read(data_dir, None)
        .map_err(|e| io::Error::other(format!("{e:#}")))?
        .unwrap_or_default()
        .ledger;
    let numbers = kept(&dir, &retired)?;
    let at: Vec<u64> =
        hashes_at.iter().filter(|&&n| n > retired.records).map(|n| n - retired.records).collect();
    let mut walk =
        chain::walk_from(&dir, &numbers, &Linker::new(key), &at, retired.start(), |record, _| {
            decode(record).map(drop)
        })?;
    walk.records += retired.records;
    for (n, _, _) in &mut walk.hashes_at {
        *n += retired.records;
    }
    if retired.records > 0 && hashes_at.contains(&retired.records) {
        let at = Pos { segment: store::retired::path(data_dir), line: 0 };
        let hash = chain::unhex(retired.last_hash.as_bytes()).unwrap_or_default();
        walk.hashes_at.push((retired.records, hash, at));
    }
    if walk.records == retired.records {
        walk.last_hash = chain::unhex(retired.last_hash.as_bytes()).unwrap_or_default();
    }
    walk.retired = retired.records;
    Ok(walk)
}

/// Fails unless `data_dir` holds a ledger (a directory with `ledger/*.seg`): a wrong path must not
/// read as an empty ledger.
pub fn require_data(data_dir: &Path) -> anyhow::Result<()> {
    let dir = data_dir.join("ledger");
    if !data_dir.is_dir() {
        anyhow::bail!("{}: no such directory (the proxy's data_dir)", data_dir.display());
    }
    match segments(&dir) {
        Ok(numbers) if !numbers.is_empty() => Ok(()),
        Ok(_) => anyhow::bail!(
            "{}: no ledger segments (*.seg) here: not a Tollgate data_dir, or its ledger was removed",
            dir.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => anyhow::bail!(
            "{}: no ledger here ({} is missing): not a Tollgate data_dir, or its ledger was removed",
            data_dir.display(),
            dir.display()
        ),
        Err(e) => anyhow::bail!("reading {}: {e}", dir.display()),
    }
}

pub mod codec;
pub mod cursor;
pub mod head;
pub mod retire;
pub mod storage;
mod sync;
#[cfg(test)]
mod tests;
