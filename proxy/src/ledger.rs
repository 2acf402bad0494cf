//! The durable usage ledger and the audit chain, written by one writer thread.
//!
//! Requests hand their records to a bounded queue and never wait on the disk. The writer takes
//! whatever is queued, appends it to the current segment of `<data_dir>/ledger/` (one line per
//! record: `<crc32 hex> <json>\n`) and appends the decisions to the hash-chained audit log
//! (`<data_dir>/audit.jsonl`, see [`crate::audit`]). A second thread fsyncs both at most every
//! `fsync_interval` (group commit; `0` makes the writer wait for the sync of each batch before
//! it takes the next). Writes never wait for an fsync: a slow disk (a sync can take hundreds of
//! milliseconds on a busy machine) must not keep records in memory, where a `SIGKILL` loses
//! them. So a `SIGKILL` loses only what was still queued (the last few milliseconds), an OS
//! crash at most one fsync window more, and `SIGTERM` nothing ([`Ledger::flush`] waits for the
//! sync).
//!
//! On open, every segment is scanned and every checksum verified: a torn last record (a crash
//! mid-write) is truncated and reported; a bad record anywhere else is corruption and the ledger
//! refuses to open. The records of the last 35 days are handed back so that budgets and open
//! reservations can be rebuilt.
//!
//! When a write or a sync fails (disk full, I/O error) the writer truncates the segment back to
//! its last good length, keeps the batch, marks the ledger unhealthy (the proxy then answers 503
//! to new metered requests and `/readyz` fails) and retries every 100 ms; service resumes when
//! the disk does. Nothing queued is dropped and no partial record survives.

use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use tollgate_core::money::Money;
use tollgate_core::pricing::Cost;
use tollgate_core::usage::Usage;

use crate::audit::{self, Chain};

use sync::{Durability, Syncer};

/// How far back [`Recovered::records`] reaches: enough for every budget period.
const REPLAY_DAYS: u64 = 35;
/// How long the writer lets records gather after writing a batch.
const LINGER: Duration = Duration::from_millis(1);
/// Queue capacity (its slots are allocated up front: 16 Ki x 24 bytes); beyond it records wait in
/// detached senders and the ledger reports pressure.
const QUEUE: usize = 16 * 1024;

/// One metered request, as recorded at its end.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub ts: String,
    /// When the budget reservation was made (the period the cost lands in).
    pub reserved_at_ms: u64,
    pub request_id: String,
    /// The budget reservation's own unique id (the caller's request id is not trusted to be).
    pub reservation_id: String,
    pub agent: String,
    pub cost_center: String,
    pub project: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub business_unit: Option<String>,
    pub route: String,
    pub provider: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    pub tokens: Usage,
    /// Cost by bucket (exact decimal strings); `total` equals `cost_usd`.
    pub cost: Cost,
    /// Total cost as an exact decimal string in USD.
    pub cost_usd: Money,
    pub cost_nano_usd: i64,
    pub decision: &'static str,
    pub reason: String,
    pub clause: String,
    pub policy_version: String,
    /// The budgets the request was reserved against (by id).
    pub budgets: Vec<String>,
    pub status: u16,
    pub latency_ms: u64,
    pub usage_source: &'static str,
    /// Where the price came from (`listed`, `requested_model`, `fallback`, `reservation`,
    /// `free`); absent when nothing was priced (no usage, a tool call).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_source: Option<tollgate_core::pricing::PriceSource>,
    /// How the response ended: `complete`, `client_gone`, `upstream_error`, `idle_timeout`.
    pub end: &'static str,
}

/// A budget reservation, recorded when it is made so that it can be rebuilt after a crash.
#[derive(Clone, Debug, Serialize)]
pub struct Reserve {
    pub ts: String,
    pub reserved_at_ms: u64,
    pub expires_at_ms: u64,
    pub request_id: String,
    pub reservation_id: String,
    pub agent: String,
    pub cost_center: String,
    pub project: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub business_unit: Option<String>,
    pub amount: Money,
    pub budgets: Vec<String>,
}

/// A usage record that arrived as an event from elsewhere (the Envoy filter, see
/// [`crate::ingest`]): stored as a `usage` record plus where it came from and the sender's
/// event id (the key that makes a resent event a duplicate).
#[derive(Clone, Debug, Serialize)]
pub struct MeshUsage {
    #[serde(flatten)]
    pub record: Record,
    /// Who metered it (`envoy`).
    pub source: String,
    pub source_event_id: String,
}

/// What the writer stores.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Entry {
    Usage(Box<Record>),
    Reserve(Box<Reserve>),
    /// Stored as `"type": "usage"`, so invoices, usage totals and the export treat it as one.
    #[serde(rename = "usage")]
    Mesh(Box<MeshUsage>),
}

#[derive(Serialize)]
struct Stored<'a> {
    seq: u64,
    event_id: String,
    #[serde(flatten)]
    entry: &'a Entry,
}

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
}

/// What opening the ledger found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Ledger records of the last 35 days, oldest first.
    pub records: Vec<serde_json::Value>,
    pub segments: usize,
    /// Bytes of a torn last record removed from the ledger and the audit log.
    pub truncated_bytes: u64,
    pub audit_records: u64,
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
        let scan = scan(&dir, now_ms.saturating_sub(REPLAY_DAYS * 86_400_000))?;
        let (chain, opened) = Chain::open(&settings.data_dir.join("audit.jsonl"))?;
        let recovered = Recovered {
            records: scan.records,
            segments: scan.segments,
            truncated_bytes: scan.truncated_bytes + opened.truncated_bytes,
            audit_records: opened.records,
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let overflow = Overflow::default();
        let healthy = Arc::new(AtomicBool::new(true));
        let on_error: Arc<dyn Fn() + Send + Sync> = Arc::new(on_error);
        let durability = Arc::new(Durability::new(vec![
            Arc::new(scan.file.try_clone()?),
            Arc::new(chain.sync_handle()?),
        ]));
        let syncer = Syncer {
            durability: durability.clone(),
            interval: settings.fsync_interval,
            fault: settings.fault.clone(),
            ok: Arc::new(AtomicBool::new(true)),
            on_error: on_error.clone(),
        };
        let synced = syncer.ok.clone();
        let syncer = std::thread::Builder::new()
            .name("tollgate-ledger-sync".into())
            .spawn(move || syncer.run())
            .context("starting the ledger sync thread")?;
        let writer = Writer {
            dir: dir.clone(),
            id,
            segment: scan.last_segment,
            file: scan.file,
            good_len: scan.last_len,
            seq: scan.last_seq,
            chain,
            settings,
            healthy: healthy.clone(),
            on_error,
            durability,
            overflow: overflow.clone(),
        };
        std::thread::Builder::new()
            .name("tollgate-ledger".into())
            .spawn(move || {
                writer.run(rx);
                let _ = syncer.join();
            })
            .context("starting the ledger writer")?;
        Ok((Ledger { tx: Some(tx), overflow, healthy, synced, dir: Arc::new(dir) }, recovered))
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

    /// The directory of the segments.
    pub fn dir(&self) -> &Path {
        &self.dir
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
    records: Vec<serde_json::Value>,
    segments: usize,
    truncated_bytes: u64,
    last_segment: u64,
    last_len: u64,
    last_seq: u64,
    file: std::fs::File,
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:08}.seg"))
}

/// The segment numbers in `dir`, in order.
pub fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name.strip_suffix(".seg").and_then(|n| n.parse().ok()) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The JSON of one stored line (`<crc32 hex> <json>`, without the newline), if its checksum
/// holds.
pub fn verified_json(line: &[u8]) -> Option<&[u8]> {
    parse_line(line).ok()
}

/// The JSON of one stored line (`<crc32 hex> <json>`), if its checksum holds.
fn parse_line(line: &[u8]) -> Result<&[u8], &'static str> {
    if line.len() < 10 || line[8] != b' ' {
        return Err("malformed record");
    }
    let crc = std::str::from_utf8(&line[..8]).ok().and_then(|h| u32::from_str_radix(h, 16).ok());
    let json = &line[9..];
    match crc {
        Some(crc) if crc == crc32fast::hash(json) => Ok(json),
        _ => Err("checksum mismatch"),
    }
}

fn scan(dir: &Path, replay_from_ms: u64) -> anyhow::Result<Scan> {
    let numbers = segments(dir)?;
    let mut records = Vec::new();
    let mut truncated_bytes = 0;
    let mut last_seq = 0;
    let last = numbers.last().copied().unwrap_or(1);
    for &n in &numbers {
        let path = segment_path(dir, n);
        let mut bytes = Vec::new();
        std::fs::File::open(&path)?.read_to_end(&mut bytes)?;
        let mut offset = 0usize;
        let mut line_no = 0;
        while offset < bytes.len() {
            line_no += 1;
            let end = bytes[offset..].iter().position(|&b| b == b'\n').map(|i| offset + i);
            let verified = end.map(|e| parse_line(&bytes[offset..e]));
            match verified {
                Some(Ok(json)) => {
                    let value: serde_json::Value = serde_json::from_slice(json)
                        .with_context(|| format!("{} line {line_no}: not JSON", path.display()))?;
                    last_seq = value["seq"].as_u64().unwrap_or(last_seq);
                    if value["reserved_at_ms"].as_u64().unwrap_or(u64::MAX) >= replay_from_ms {
                        records.push(value);
                    }
                    offset = end.unwrap_or(bytes.len()) + 1;
                }
                // The last record of the last segment, cut short by a crash: a torn tail.
                _ if n == last && is_tail(&bytes, end) => {
                    truncated_bytes = (bytes.len() - offset) as u64;
                    let file = std::fs::OpenOptions::new().write(true).open(&path)?;
                    file.set_len(offset as u64)?;
                    file.sync_all()?;
                    tracing::warn!(
                        segment = %path.display(),
                        line = line_no,
                        bytes = truncated_bytes,
                        "ledger: truncated a torn last record (crash during a write)"
                    );
                    break;
                }
                Some(Err(problem)) => anyhow::bail!(
                    "{} line {line_no}: {problem}: the ledger is corrupt (this is not a torn \
                     tail from a crash); refusing to start — inspect and move the segment aside",
                    path.display()
                ),
                None => anyhow::bail!(
                    "{} line {line_no}: incomplete record in a sealed segment; refusing to start",
                    path.display()
                ),
            }
        }
    }
    let path = segment_path(dir, last);
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    let last_len = file.metadata()?.len();
    Ok(Scan {
        records,
        segments: numbers.len().max(1),
        truncated_bytes,
        last_segment: last,
        last_len,
        last_seq,
        file,
    })
}

/// Whether the bad line starting at `end`'s line is the last thing in the segment.
fn is_tail(bytes: &[u8], end: Option<usize>) -> bool {
    match end {
        None => true,
        Some(e) => e + 1 >= bytes.len(),
    }
}

struct Writer {
    dir: PathBuf,
    id: String,
    segment: u64,
    file: std::fs::File,
    good_len: u64,
    seq: u64,
    chain: Chain,
    settings: Settings,
    healthy: Arc<AtomicBool>,
    on_error: Arc<dyn Fn() + Send + Sync>,
    durability: Arc<Durability>,
    overflow: Overflow,
}

/// Messages that found the queue full: kept here (never dropped, never a thread each) and
/// taken by the writer with the next batch.
type Overflow = Arc<std::sync::Mutex<Vec<Msg>>>;

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        let mut batch: Vec<u8> = Vec::with_capacity(256 * 1024);
        let mut audit_batch: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut waiters = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            while let Some(msg) = next {
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
                batch.clear();
                audit_batch.clear();
                let written = self.durability.wrote();
                if self.settings.fsync_interval.is_zero() {
                    self.durability.wait_synced(written);
                }
            }
            self.durability.notify_when_synced(waiters.drain(..));
            // Under load, let records gather for a moment: one wake-up per millisecond instead
            // of one per record (context switches were the largest cost in the load test's
            // profile). A SIGKILL can lose at most this much more.
            std::thread::sleep(LINGER);
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
                let stored = Stored {
                    seq: self.seq,
                    event_id: format!("{}-{}", self.id, self.seq),
                    entry: &entry,
                };
                match serde_json::to_vec(&stored) {
                    Ok(json) => {
                        batch.extend_from_slice(
                            format!("{:08x} ", crc32fast::hash(&json)).as_bytes(),
                        );
                        batch.extend_from_slice(&json);
                        batch.push(b'\n');
                    }
                    Err(e) => tracing::error!(error = %e, "serializing a ledger record"),
                }
            }
            Msg::Audit(event) => self.chain.append_to(*event, audit_batch),
            Msg::Flush(done) => waiters.push(done),
        }
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
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&self.dir, next))
        {
            Ok(file) => {
                match file.try_clone() {
                    Ok(handle) => self.durability.set_segment(handle),
                    // The syncer keeps syncing the old (already synced) segment; stay on it.
                    Err(e) => {
                        tracing::error!(error = %e, "opening a new ledger segment");
                        return;
                    }
                }
                self.file = file;
                self.segment = next;
                self.good_len = 0;
            }
            Err(e) => tracing::error!(error = %e, "opening a new ledger segment"),
        }
    }
}

/// Every record of the ledger in `data_dir`, verified, oldest first (for invoices, the usage
/// API and tests). A torn last record is skipped; corruption elsewhere is an error.
pub fn read_all(data_dir: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let dir = data_dir.join("ledger");
    let mut out = Vec::new();
    let numbers = match segments(&dir) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    let last = numbers.last().copied();
    for n in numbers {
        let path = segment_path(&dir, n);
        let bytes = std::fs::read(&path)?;
        let mut lines = bytes.split(|&b| b == b'\n').peekable();
        let mut line_no = 0;
        while let Some(line) = lines.next() {
            line_no += 1;
            let is_last = lines.peek().is_none();
            if line.is_empty() && is_last {
                break;
            }
            match parse_line(line) {
                Ok(json) => out.push(serde_json::from_slice(json)?),
                Err(_) if is_last && Some(n) == last => break,
                Err(problem) => anyhow::bail!("{} line {line_no}: {problem}", path.display()),
            }
        }
    }
    Ok(out)
}

mod sync;
#[cfg(test)]
mod tests;
