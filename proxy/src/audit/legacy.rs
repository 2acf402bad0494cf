//! The audit log as versions before segmentation wrote it: one file, `<data_dir>/audit.jsonl`,
//! one JSON record per line carrying its `seq`, the `hash` of the record before it (`prev`) and
//! its own `hash` (SHA-256 of the record's JSON without `hash`). It is only read now: its records
//! are the start of the audit chain, and the first record of the segmented log links to its last
//! `hash`. Changing a value breaks that record's hash; recomputing the hash breaks the next
//! record's `prev`; removing or reordering records breaks the sequence.

use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::event::Event;

/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A record as stored: the event plus its place in the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Record {
    pub(super) seq: u64,
    pub(super) prev: String,
    #[serde(flatten)]
    pub(super) event: Event,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(super) hash: String,
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

/// Serialises `event` as record `seq` after `prev` into `out` (one line); returns its hash. Only
/// tests and fixtures write this format now.
pub fn append_to(seq: u64, prev: &str, event: Event, out: &mut Vec<u8>) -> String {
    let mut record = Record { seq, prev: prev.to_string(), event, hash: String::new() };
    record.hash = hash_of(&record);
    let _ = serde_json::to_writer(&mut *out, &record);
    out.push(b'\n');
    record.hash
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
    use crate::audit::tests::event;
    use std::path::PathBuf;
    use tollgate_core::policy::Effect;

    fn write_log(path: &Path, n: u64) {
        let mut batch = Vec::new();
        let mut prev = GENESIS.to_string();
        for i in 1..=n {
            prev = append_to(i, &prev, event(i), &mut batch);
        }
        std::fs::write(path, batch).expect("write");
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
    fn an_intact_log_verifies() {
        let path = temp("intact");
        write_log(&path, 5);
        assert!(matches!(verify(&path).unwrap(), Verdict::Ok { records: 5, .. }));
        assert_eq!(hash_of_record(&path, 5).unwrap().map(|h| h.len()), Some(64));
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
    fn a_torn_tail_is_not_tampering() {
        let path = temp("torn");
        write_log(&path, 4);
        let intact = std::fs::metadata(&path).unwrap().len();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"{\"seq\":5,\"prev\":\"ab");
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(verify(&path).unwrap(), Verdict::TornTail { records: 4, line: 5, .. }));
        assert!(matches!(
            verify(&path).unwrap(),
            Verdict::TornTail { valid_bytes, .. } if valid_bytes == intact
        ));
    }
}
