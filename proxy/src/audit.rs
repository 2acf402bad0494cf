//! The audit log: every decision as a hash-chained JSON line, so that an edited, removed or
//! reordered record is detected by `tollgate audit verify`.
//!
//! Each record carries its sequence number, the hash of the record before it (`prev`) and its
//! own `hash` = SHA-256 of the record's JSON without the `hash` field. Changing any value breaks
//! that record's hash; recomputing the hash breaks the next record's `prev`; removing or
//! reordering records breaks the sequence. A last line cut short by a crash (no newline, does not
//! parse) is a *torn tail*, reported apart from tampering, and truncated when the log is opened
//! for writing again. Records hold ids, attribution and decision codes, never header values or
//! secrets.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tollgate_core::policy::Effect;
use tollgate_core::record::AuditKind;

/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened, as recorded. Everything but `seq`, `prev` and `hash` is filled by the caller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub ts: String,
    /// `decision`, `approval_granted`, `approval_denied`, `approval_expired_approved`,
    /// `approval_expired_denied`, `approval_expired`, `approval_used`, `proposal`,
    /// `agent_disabled`, `agent_reenabled`.
    pub kind: AuditKind,
    pub request_id: String,
    pub agent: String,
    pub cost_center: String,
    pub project: String,
    pub route: String,
    /// `allow`, `deny` or `require_approval`.
    pub effect: Effect,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clause: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// The approval a record is about (oversight events and approval-required decisions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    /// The risk score, when one was computed (`78.5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<String>,
    /// Who acted: an operator's name, `timeout`, or `proxy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// A guardrail refusal: the JSON path of the argument at fault (`$.cmd`, `$query.q`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argument: Option<String>,
    /// A guardrail refusal: the forbidden pattern that matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// A guardrail refusal: a short excerpt of the offending value (never the whole value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excerpt: Option<String>,
}

/// A decision by default (denied): callers set the kind and effect they record.
impl Default for Event {
    fn default() -> Self {
        Event {
            ts: String::new(),
            kind: AuditKind::Decision,
            request_id: String::new(),
            agent: String::new(),
            cost_center: String::new(),
            project: String::new(),
            route: String::new(),
            effect: Effect::Deny,
            reason: String::new(),
            clause: None,
            policy_version: None,
            model: None,
            tool: None,
            approval_id: None,
            risk: None,
            actor: None,
            argument: None,
            pattern: None,
            excerpt: None,
        }
    }
}

/// A record as stored: the event plus its place in the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    seq: u64,
    prev: String,
    #[serde(flatten)]
    event: Event,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    hash: String,
}

fn hash_of(record: &Record) -> String {
    let mut unhashed = record.clone();
    unhashed.hash.clear();
    let bytes = serde_json::to_vec(&unhashed).unwrap_or_default();
    hex(&Sha256::digest(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Appends chained records to one file. Not shared: the proxy's audit writer task owns it.
pub struct Chain {
    file: std::fs::File,
    path: PathBuf,
    /// Length of the file up to the last complete write.
    good_len: u64,
    next_seq: u64,
    prev: String,
}

/// What opening found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    pub records: u64,
    /// Bytes of a torn last record removed (a crash mid-write), if any.
    pub truncated_bytes: u64,
}

impl Chain {
    /// Opens (creating) the log, verifies it, truncates a torn tail, and continues the chain.
    /// A log that fails verification for any other reason is refused: appending to a tampered
    /// chain would hide the tampering.
    pub fn open(path: &Path) -> anyhow::Result<(Chain, Opened)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let report = verify(path)?;
        let (records, last_hash, valid_len) = match &report {
            Verdict::Ok { records, last_hash, bytes } => (*records, last_hash.clone(), *bytes),
            Verdict::TornTail { records, last_hash, valid_bytes, .. } => {
                (*records, last_hash.clone(), *valid_bytes)
            }
            Verdict::Tampered { .. } => anyhow::bail!(
                "audit log {} failed verification: {report}; refusing to append",
                path.display()
            ),
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)?;
        let len = file.metadata()?.len();
        let truncated_bytes = len.saturating_sub(valid_len);
        if truncated_bytes > 0 {
            file.set_len(valid_len)?;
            file.sync_all()?;
        }
        let mut file = file;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::End(0))?;
        let chain = Chain {
            file,
            path: path.to_path_buf(),
            good_len: valid_len,
            next_seq: records + 1,
            prev: last_hash,
        };
        Ok((chain, Opened { records, truncated_bytes }))
    }

    /// Serialises `event` as the next record into `out` (one line) and advances the chain.
    /// The caller writes `out` with [`Chain::write`], batching several records per write.
    pub fn append_to(&mut self, event: Event, out: &mut Vec<u8>) {
        let record =
            Record { seq: self.next_seq, prev: self.prev.clone(), event, hash: String::new() };
        // Serialised once: the hash covers the record without `hash` (which is last and empty,
        // so skipped), and the line is that same JSON with `"hash"` appended — exactly what
        // serialising the hashed record gives, which is what `verify` recomputes.
        let start = out.len();
        if serde_json::to_writer(&mut *out, &record).is_err() || out.last() != Some(&b'}') {
            out.truncate(start);
            return;
        }
        let hash = hex(&Sha256::digest(&out[start..]));
        out.pop();
        out.extend_from_slice(b",\"hash\":\"");
        out.extend_from_slice(hash.as_bytes());
        out.extend_from_slice(b"\"}\n");
        self.next_seq += 1;
        self.prev = hash;
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

    /// A second handle to the log's file, for syncing from another thread.
    pub fn sync_handle(&self) -> std::io::Result<std::fs::File> {
        self.file.try_clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records in the log and the hash of the last one ([`GENESIS`] when empty): its head.
    pub fn head(&self) -> (u64, String) {
        (self.next_seq - 1, self.prev.clone())
    }
}

/// The `hash` of record number `n` (1-based, counting lines) of the log at `path`, if it has that
/// many complete records; for comparing with a published head. `None` for `n == 0`.
pub fn hash_of_record(path: &Path, n: u64) -> std::io::Result<Option<String>> {
    if n == 0 {
        return Ok(None);
    }
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut reader = std::io::BufReader::new(file);
    let mut line = Vec::new();
    for _ in 0..n {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 || !line.ends_with(b"\n") {
            return Ok(None);
        }
    }
    Ok(serde_json::from_slice::<Record>(&line).ok().map(|r| r.hash))
}

/// The outcome of verifying a log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every record is intact and in order.
    Ok { records: u64, last_hash: String, bytes: u64 },
    /// Intact up to a last record that was cut short (a crash while writing, not tampering).
    TornTail { records: u64, last_hash: String, valid_bytes: u64, line: u64 },
    /// The first sign of tampering.
    Tampered { line: u64, problem: Tampering },
}

/// How the chain was broken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tampering {
    /// Record `seq`'s content was changed.
    Edited { seq: u64 },
    /// Records `from..=to` are missing at this point (removed, or moved later).
    Removed { from: u64, to: u64 },
    /// Record `seq` appears where `expected` should be: records were reordered or duplicated.
    OutOfOrder { seq: u64, expected: u64 },
    /// A line in the middle of the log is not a record.
    Corrupt,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Ok { records, .. } => write!(f, "OK: {records} records, chain intact"),
            Verdict::TornTail { records, line, .. } => write!(
                f,
                "OK up to record {records}; line {line} is a torn tail (a write cut short by a \
                 crash, not tampering)"
            ),
            Verdict::Tampered { line, problem } => {
                write!(f, "TAMPERED at line {line}: ")?;
                match problem {
                    Tampering::Edited { seq } => write!(f, "record {seq} was edited"),
                    Tampering::Removed { from, to } if from == to => {
                        write!(f, "record {from} is missing here (removed or moved)")
                    }
                    Tampering::Removed { from, to } => {
                        write!(f, "records {from}..={to} are missing here (removed or moved)")
                    }
                    Tampering::OutOfOrder { seq, expected } => write!(
                        f,
                        "record {seq} appears where record {expected} belongs (reordered or duplicated)"
                    ),
                    Tampering::Corrupt => write!(f, "the line is not an audit record"),
                }
            }
        }
    }
}

/// Verifies the whole log at `path` (a missing file is an empty, intact log).
pub fn verify(path: &Path) -> std::io::Result<Verdict> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Verdict::Ok { records: 0, last_hash: GENESIS.into(), bytes: 0 })
        }
        Err(e) => return Err(e),
    };
    let mut reader = std::io::BufReader::new(file);
    let mut line = Vec::new();
    let mut expected_seq = 1u64;
    let mut prev = GENESIS.to_string();
    let mut offset = 0u64;
    let mut line_no = 0u64;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(Verdict::Ok { records: expected_seq - 1, last_hash: prev, bytes: offset });
        }
        line_no += 1;
        let complete = line.ends_with(b"\n");
        let record = match serde_json::from_slice::<Record>(&line) {
            Ok(record) if complete => record,
            Ok(_) | Err(_) if !complete => {
                return Ok(Verdict::TornTail {
                    records: expected_seq - 1,
                    last_hash: prev,
                    valid_bytes: offset,
                    line: line_no,
                })
            }
            _ => return Ok(Verdict::Tampered { line: line_no, problem: Tampering::Corrupt }),
        };
        let problem = if record.seq > expected_seq {
            Some(Tampering::Removed { from: expected_seq, to: record.seq - 1 })
        } else if record.seq < expected_seq {
            Some(Tampering::OutOfOrder { seq: record.seq, expected: expected_seq })
        } else if hash_of(&record) != record.hash {
            Some(Tampering::Edited { seq: record.seq })
        } else if record.prev != prev {
            // This record is intact, so the one before it was changed (and re-hashed).
            Some(Tampering::Edited { seq: record.seq.saturating_sub(1) })
        } else {
            None
        };
        if let Some(problem) = problem {
            return Ok(Verdict::Tampered { line: line_no, problem });
        }
        prev = record.hash;
        expected_seq += 1;
        offset += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: u64) -> Event {
        Event {
            ts: format!("2026-11-22T10:00:{:02}.000Z", i % 60),
            kind: AuditKind::Decision,
            request_id: format!("req-{i}"),
            agent: "bot".into(),
            cost_center: "CC-1234".into(),
            project: "PROJ-ABC123".into(),
            route: "openai".into(),
            effect: if i % 3 == 0 { Effect::Deny } else { Effect::Allow },
            reason: "default_allow".into(),
            clause: Some("defaults.llm".into()),
            policy_version: Some("v1".into()),
            model: Some("gpt-4o".into()),
            tool: None,
            ..Default::default()
        }
    }

    fn write_log(path: &Path, n: u64) {
        let (mut chain, opened) = Chain::open(path).expect("open");
        assert_eq!(opened.records, 0);
        let mut batch = Vec::new();
        for i in 1..=n {
            chain.append_to(event(i), &mut batch);
        }
        chain.write(&batch, true).expect("write");
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path).expect("read").lines().map(str::to_string).collect()
    }

    fn rewrite(path: &Path, lines: &[String]) {
        std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>())
            .expect("write");
    }

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tollgate-audit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir.join("audit.jsonl")
    }

    #[test]
    fn an_intact_chain_verifies_and_continues_after_reopening() {
        let path = temp("intact");
        write_log(&path, 5);
        assert!(matches!(verify(&path).unwrap(), Verdict::Ok { records: 5, .. }));
        let (mut chain, opened) = Chain::open(&path).expect("reopen");
        assert_eq!(opened, Opened { records: 5, truncated_bytes: 0 });
        let mut batch = Vec::new();
        chain.append_to(event(6), &mut batch);
        chain.write(&batch, true).unwrap();
        assert!(matches!(verify(&path).unwrap(), Verdict::Ok { records: 6, .. }));
    }

    #[test]
    fn an_edited_value_is_detected_at_its_record() {
        let path = temp("edited");
        write_log(&path, 5);
        let mut l = lines(&path);
        l[2] = l[2].replace("\"agent\":\"bot\"", "\"agent\":\"other-bot\"");
        rewrite(&path, &l);
        assert_eq!(
            verify(&path).unwrap(),
            Verdict::Tampered { line: 3, problem: Tampering::Edited { seq: 3 } }
        );
    }

    #[test]
    fn an_edit_with_a_recomputed_hash_is_caught_by_the_next_record() {
        let path = temp("rehashed");
        write_log(&path, 5);
        let mut l = lines(&path);
        let mut record: Record = serde_json::from_str(&l[1]).unwrap();
        record.event.effect = Effect::Allow;
        record.event.reason = "forged".into();
        record.hash = hash_of(&record);
        l[1] = serde_json::to_string(&record).unwrap();
        rewrite(&path, &l);
        assert_eq!(
            verify(&path).unwrap(),
            Verdict::Tampered { line: 3, problem: Tampering::Edited { seq: 2 } }
        );
    }

    #[test]
    fn removed_and_reordered_records_are_detected() {
        let path = temp("removed");
        write_log(&path, 6);
        let mut l = lines(&path);
        l.remove(3);
        rewrite(&path, &l);
        assert_eq!(
            verify(&path).unwrap(),
            Verdict::Tampered { line: 4, problem: Tampering::Removed { from: 4, to: 4 } }
        );

        let path = temp("reordered");
        write_log(&path, 6);
        let mut l = lines(&path);
        l.swap(1, 2);
        rewrite(&path, &l);
        assert_eq!(
            verify(&path).unwrap(),
            Verdict::Tampered { line: 2, problem: Tampering::Removed { from: 2, to: 2 } }
        );

        let path = temp("tail-removed-then-duplicated");
        write_log(&path, 3);
        let mut l = lines(&path);
        let first = l[0].clone();
        l.push(first);
        rewrite(&path, &l);
        assert_eq!(
            verify(&path).unwrap(),
            Verdict::Tampered { line: 4, problem: Tampering::OutOfOrder { seq: 1, expected: 4 } }
        );
    }

    #[test]
    fn a_torn_tail_is_not_tampering_and_is_truncated_on_open() {
        let path = temp("torn");
        write_log(&path, 4);
        let intact = std::fs::metadata(&path).unwrap().len();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"{\"seq\":5,\"prev\":\"ab");
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(verify(&path).unwrap(), Verdict::TornTail { records: 4, line: 5, .. }));
        let (_, opened) = Chain::open(&path).expect("open repairs the tail");
        assert_eq!(opened, Opened { records: 4, truncated_bytes: bytes.len() as u64 - intact });
        assert!(matches!(verify(&path).unwrap(), Verdict::Ok { records: 4, .. }));
    }

    #[test]
    fn a_tampered_log_is_not_appended_to() {
        let path = temp("refuse");
        write_log(&path, 3);
        let mut l = lines(&path);
        l[0] = l[0].replace("\"agent\":\"bot\"", "\"agent\":\"bob\"");
        rewrite(&path, &l);
        let err = Chain::open(&path).err().expect("refused");
        assert!(err.to_string().contains("TAMPERED"), "{err}");
    }
}
