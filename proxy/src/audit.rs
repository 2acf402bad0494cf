//! The audit log: every decision as a chained record, so that an edited, removed or reordered
//! record is detected by `tollgate audit verify`.
//!
//! The log is segmented like the ledger and framed and chained by the same code
//! ([`crate::store::chain`]): `<data_dir>/audit/00000001.seg`, `00000002.seg`, … (a new segment
//! once one holds `ledger.segment_bytes`), each record carrying the link of the one before it,
//! the first record of a segment linking to the last record of the segment before, so one chain
//! runs across all segments. Keyed like the ledger (HMAC-SHA256) when the ledger has a key.
//!
//! A log written before segmentation (`<data_dir>/audit.jsonl`, see [`legacy`]) is the start of
//! the chain: it is only read, and the first segmented record links to its last `hash`.
//!
//! Only an unterminated last record of the last segment is a torn write (cut off when the log is
//! opened for writing); anything else that does not verify is refused, because appending to a
//! tampered chain would hide the tampering. Records ([`Event`], encoded as [`event`] says) hold
//! ids, attribution and decision codes, never header values or secrets.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::store::chain::{self, Encoding, Linker, Walk};
use crate::store::{self, retired::Retired};
use event::{decode, encode};
use tollgate_core::record::compact::Encoder;

pub use event::Event;
pub use legacy::{Tampering, Verdict};

pub mod event;
pub mod legacy;

/// The head hash of an empty log.
pub const GENESIS: &str = legacy::GENESIS;

/// `<data_dir>/audit`: the segments.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("audit")
}

/// `<data_dir>/audit.jsonl`: the log as written before segmentation.
pub fn legacy_path(data_dir: &Path) -> PathBuf {
    data_dir.join("audit.jsonl")
}

/// Appends chained records to the segments. Not shared: the ledger's writer thread owns it.
pub struct Chain {
    dir: PathBuf,
    linker: Linker,
    encoding: Encoding,
    encoder: Encoder,
    segment: u64,
    segment_bytes: u64,
    file: std::fs::File,
    /// Length of the current segment up to the last complete write.
    good_len: u64,
    /// The link the next record carries.
    link: [u8; 32],
    records: u64,
    /// SHA-256 of the last record as written, or the legacy log's last `hash`.
    last_hash: [u8; 32],
}

/// What opening found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    pub records: u64,
    /// Bytes of a torn last record removed (a crash mid-write), if any.
    pub truncated_bytes: u64,
}

/// Where the segments that are kept start: after the legacy log's records and the retired
/// segments' (see [`crate::store::retired`]).
struct Start {
    /// Records before the kept segments.
    records: u64,
    legacy_records: u64,
    retired: Option<Retired>,
    /// The link the first kept record carries.
    hash: [u8; 32],
    /// The link after the legacy log.
    legacy_hash: [u8; 32],
}

impl Start {
    /// The kept segments of `dir` (after the retired ones).
    fn kept(&self, dir: &Path) -> std::io::Result<Vec<u64>> {
        let through = self.retired.as_ref().map_or(0, |r| r.through_segment);
        match store::segments(dir) {
            Ok(n) => Ok(n.into_iter().filter(|&n| n > through).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }
}

/// The link after the legacy log (its last `hash`), or [`chain::GENESIS`].
pub(crate) fn legacy_start(data_dir: &Path) -> std::io::Result<[u8; 32]> {
    Ok(start(data_dir)?.1.legacy_hash)
}

/// Verifies the legacy log, if there is one, and reads the retirement checkpoint: where the
/// kept segments start.
fn start(data_dir: &Path) -> std::io::Result<(Option<Verdict>, Start)> {
    let path = legacy_path(data_dir);
    let verdict = match path.exists() {
        true => Some(legacy::verify(&path)?),
        false => None,
    };
    let (legacy_records, hash) = match &verdict {
        Some(
            Verdict::Ok { records, last_hash, .. } | Verdict::TornTail { records, last_hash, .. },
        ) => (*records, chain::unhex(last_hash.as_bytes()).unwrap_or_default()),
        _ => (0, chain::GENESIS),
    };
    let retired = store::retired::read(data_dir, None)
        .map_err(|e| std::io::Error::other(format!("{e:#}")))?
        .map(|c| c.audit)
        .filter(|r| r.records > 0);
    let start = match &retired {
        Some(r) => Start {
            records: legacy_records + r.records,
            legacy_records,
            hash: r.start(),
            legacy_hash: hash,
            retired,
        },
        None => Start { records: legacy_records, legacy_records, hash, legacy_hash: hash, retired },
    };
    Ok((verdict, start))
}

impl Chain {
    /// Opens (creating) the log in `data_dir`, verifies it, truncates a torn tail, and
    /// continues the chain. A log that fails verification for any other reason is refused.
    pub fn open(
        data_dir: &Path,
        linker: Linker,
        segment_bytes: u64,
        encoding: Encoding,
    ) -> anyhow::Result<(Chain, Opened)> {
        let dir = dir(data_dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (legacy, start) = start(data_dir)?;
        let legacy_path = legacy_path(data_dir);
        match &legacy {
            Some(v @ Verdict::Tampered { .. }) => anyhow::bail!(
                "audit log {} failed verification: {v}; refusing to append",
                legacy_path.display()
            ),
            Some(v @ Verdict::TornTail { .. }) => anyhow::bail!(
                "audit log {} failed verification: {v}; it is no longer written, so a torn \
                 line there is not a crash of this version; refusing to append",
                legacy_path.display()
            ),
            _ => {}
        }
        if let Some(r) = &start.retired {
            store::remove_covered(&dir, r.through_segment)?;
        }
        let numbers = start.kept(&dir)?;
        let walk =
            chain::walk_from(&dir, &numbers, &linker, &[], start.hash, |r, _| decode(r).map(drop))?;
        if let Some(problem) = walk.problems.first() {
            anyhow::bail!(
                "audit log {} failed verification: {problem}; refusing to append (`tollgate audit \
                 verify` reports the whole log)",
                dir.display()
            );
        }
        let first = start.retired.as_ref().map_or(1, |r| r.through_segment + 1);
        let last = numbers.last().copied().unwrap_or(first);
        let mut truncated_bytes = 0;
        if let Some(torn) = &walk.torn {
            truncated_bytes = torn.bytes;
            let file = std::fs::OpenOptions::new().write(true).open(&torn.at.segment)?;
            file.set_len(torn.offset)?;
            file.sync_all()?;
        }
        let (segment, file, good_len, encoder) =
            store::continue_segment(&dir, last, encoding, walk.context)?;
        let records = start.records + walk.records;
        let last_hash = if walk.records > 0 { walk.last_hash } else { start.hash };
        let chain = Chain {
            dir,
            linker,
            encoding,
            encoder,
            segment,
            segment_bytes,
            file,
            good_len,
            link: walk.next_link,
            records,
            last_hash,
        };
        Ok((chain, Opened { records, truncated_bytes }))
    }

    /// Serialises `event` as the next record into `out` and advances the chain. The caller
    /// writes `out` with [`Chain::write`], batching several records per write.
    pub fn append_to(&mut self, event: Event, out: &mut Vec<u8>) {
        let mode = self.linker.mode();
        let line = match self.encoding {
            Encoding::Compact => chain::frame_compact(out, mode, &self.link, |out| {
                encode(&mut self.encoder, &event, out)
            }),
            Encoding::Json => chain::frame(out, mode, &self.link, |out| {
                serde_json::to_writer(&mut *out, &event).is_ok()
            }),
        };
        if let Some(line) = line {
            let line = &out[line];
            self.link = self.linker.link_after(line);
            self.last_hash = match mode {
                chain::Mode::Sha256 => self.link,
                chain::Mode::Hmac => chain::sha256(line),
            };
            self.records += 1;
        }
    }

    /// Writes a batch of serialised records; `sync` also flushes them to stable storage.
    pub fn write(&mut self, batch: &[u8], sync: bool) -> std::io::Result<()> {
        self.file.write_all(batch)?;
        self.good_len += batch.len() as u64;
        if sync {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Cuts off whatever a failed [`Chain::write`] left behind, so that the same batch can be
    /// written again.
    pub fn rewind(&mut self) -> std::io::Result<()> {
        use std::io::Seek;
        self.file.set_len(self.good_len)?;
        self.file.seek(std::io::SeekFrom::End(0))?;
        Ok(())
    }

    /// Starts the next segment once the current one is full (after syncing it, since the sync
    /// thread then syncs only the new one); returns a handle to the new segment for that thread.
    pub fn rotate_if_full(&mut self) -> Option<std::fs::File> {
        if self.good_len < self.segment_bytes || self.file.sync_data().is_err() {
            return None;
        }
        let next = self.segment + 1;
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(chain::segment_path(&self.dir, next))
            .and_then(|mut file| {
                if self.encoding == Encoding::Compact {
                    file.write_all(chain::MAGIC)?;
                }
                Ok((file.try_clone()?, file))
            });
        match opened {
            Ok((handle, file)) => {
                self.file = file;
                self.segment = next;
                self.good_len = match self.encoding {
                    Encoding::Compact => chain::MAGIC.len() as u64,
                    Encoding::Json => 0,
                };
                self.encoder.reset();
                Some(handle)
            }
            Err(e) => {
                tracing::error!(error = %e, "opening a new audit segment");
                None
            }
        }
    }

    /// The segment being written.
    pub fn segment(&self) -> u64 {
        self.segment
    }

    /// A second handle to the current segment, for syncing from another thread.
    pub fn sync_handle(&self) -> std::io::Result<std::fs::File> {
        self.file.try_clone()
    }

    /// Records in the log and the hash of the last one ([`GENESIS`] when empty): its head.
    pub fn head(&self) -> (u64, String) {
        (self.records, chain::hex(&self.last_hash))
    }
}

/// What verifying the whole log found: the legacy file's verdict, if there is one, and the
/// walk over the segments.
#[derive(Debug)]
pub struct Report {
    pub legacy: Option<Verdict>,
    pub walk: Walk,
    /// Records in the legacy file (intact ones).
    pub legacy_records: u64,
    /// Records in retired segments (by the retirement checkpoint).
    pub retired_records: u64,
}

impl Report {
    /// Every record of the log: legacy, retired and in the kept segments.
    pub fn records(&self) -> u64 {
        self.legacy_records + self.retired_records + self.walk.records
    }
}

/// Verifies the whole log in `data_dir` (keyed links with `key`); `hashes_at` asks for the
/// hashes of those record numbers that lie in the segments (counting the legacy records).
pub fn verify(
    data_dir: &Path,
    key: Option<&chain::Key>,
    hashes_at: &[u64],
) -> std::io::Result<Report> {
    let (legacy, start) = start(data_dir)?;
    let dir = dir(data_dir);
    let numbers = start.kept(&dir)?;
    let at: Vec<u64> =
        hashes_at.iter().filter(|&&n| n > start.records).map(|n| n - start.records).collect();
    let mut walk = chain::walk_from(&dir, &numbers, &Linker::new(key), &at, start.hash, |r, _| {
        decode(r).map(drop)
    })?;
    for (n, _, _) in &mut walk.hashes_at {
        *n += start.records;
    }
    Ok(Report {
        legacy,
        walk,
        legacy_records: start.legacy_records,
        retired_records: start.records - start.legacy_records,
    })
}

/// Whether `data_dir` holds an audit log (either layout).
pub fn exists(data_dir: &Path) -> bool {
    legacy_path(data_dir).exists() || dir(data_dir).is_dir()
}

/// The hash of record number `n` (1-based) of the log in `data_dir`, if it has that many
/// complete records: the legacy record's `hash`, or the SHA-256 of the segmented record as
/// written. For comparing with a published head; `None` for `n == 0`.
pub fn hash_of_record(data_dir: &Path, n: u64) -> std::io::Result<Option<String>> {
    if n == 0 {
        return Ok(None);
    }
    let path = legacy_path(data_dir);
    let legacy = if path.exists() {
        legacy::verify(&path)?
    } else {
        legacy::Verdict::Ok { records: 0, last_hash: GENESIS.into(), bytes: 0 }
    };
    let legacy_records = match legacy {
        Verdict::Ok { records, .. } | Verdict::TornTail { records, .. } => records,
        Verdict::Tampered { .. } => 0,
    };
    if n <= legacy_records {
        return legacy::hash_of_record(&path, n);
    }
    let (_, start) = start(data_dir)?;
    if n <= start.records {
        // Retired: only the last retired record's hash is kept.
        return Ok(start.retired.filter(|_| n == start.records).map(|r| r.last_hash));
    }
    let report = verify(data_dir, None, &[n])?;
    Ok(report.walk.hashes_at.first().map(|(_, hash, _)| chain::hex(hash)))
}

/// Every record of the log in `data_dir` as JSON, oldest first (for tests and tools); checked
/// like [`verify`] does without a key. An unterminated last record is skipped; any other problem
/// is an error naming where it is.
pub fn read_all(data_dir: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    let path = legacy_path(data_dir);
    if path.exists() {
        let text = std::fs::read_to_string(&path)?;
        for line in text.lines() {
            let mut value: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}: not an audit record", path.display()))?;
            if let Some(o) = value.as_object_mut() {
                o.remove("prev");
                o.remove("hash");
            }
            out.push(value);
        }
    }
    let (_, start) = start(data_dir)?;
    let dir = dir(data_dir);
    let numbers = start.kept(&dir)?;
    let mut seq = start.records;
    let walk = chain::walk_from(&dir, &numbers, &Linker::new(None), &[], start.hash, |r, _| {
        let event = decode(r)?;
        seq += 1;
        let mut value = serde_json::to_value(&event).map_err(|e| e.to_string())?;
        if let Some(o) = value.as_object_mut() {
            o.insert("seq".into(), seq.into());
        }
        out.push(value);
        Ok(())
    })?;
    if let Some(problem) = walk.problems.first() {
        anyhow::bail!("{problem}: the audit log is corrupt or was tampered with");
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
