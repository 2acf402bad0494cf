//! The alerts outbox: `<data_dir>/alerts/outbox.jsonl`, an append-only journal of deliveries.
//!
//! Each raised event is appended as one `{"add": {...}}` line per receiver and synced before it
//! counts as raised; a delivery a receiver acknowledged (2xx), or one given up, is followed by a
//! `{"done": "<delivery id>"}` line (not synced: a lost `done` line only means the delivery is
//! made again after a restart, which at-least-once delivery allows). Opening replays the
//! journal: every `add` without its `done` is still to be delivered. A line that does not parse
//! (a torn tail after a crash, or damage in the middle) is skipped and counted; the lines
//! around it still count. Opening then rewrites the journal with only the pending deliveries
//! (temp file, fsync, rename, fsync the directory), as does a running outbox once `done` lines
//! outnumber the pending ones, so the file stays small.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::event::Event;

const FILE: &str = "outbox.jsonl";
/// `done` lines appended since the last rewrite before one is considered.
const COMPACT_AFTER: usize = 1024;

/// One event for one receiver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// `<event id>.<n>`: unique per receiver.
    pub id: String,
    /// The receiver's key (its URL).
    pub receiver: String,
    pub event: Event,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Add(Box<Delivery>),
    Done(String),
}

/// What opening found.
#[derive(Debug, Default)]
pub struct Opened {
    /// Deliveries still to make, in the order they were raised.
    pub pending: Vec<Delivery>,
    /// Lines that did not parse.
    pub skipped: usize,
}

pub struct Outbox {
    dir: PathBuf,
    file: File,
    /// Pending deliveries by the order they were added, and their ids.
    pending: BTreeMap<u64, Delivery>,
    index: HashMap<String, u64>,
    next: u64,
    done_lines: usize,
}

impl Outbox {
    /// Opens (creating) the outbox in `dir`, replays and compacts it.
    pub fn open(dir: &Path) -> io::Result<(Outbox, Opened)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE);
        let mut pending = BTreeMap::new();
        let mut index = HashMap::new();
        let mut next = 0u64;
        let mut skipped = 0;
        match File::open(&path) {
            Ok(file) => {
                for line in BufReader::new(file).split(b'\n') {
                    let line = line?;
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    match serde_json::from_slice::<Line>(&line) {
                        Ok(Line::Add(d)) => {
                            if let Some(old) = index.insert(d.id.clone(), next) {
                                pending.remove(&old);
                            }
                            pending.insert(next, *d);
                            next += 1;
                        }
                        Ok(Line::Done(id)) => {
                            if let Some(seq) = index.remove(&id) {
                                pending.remove(&seq);
                            }
                        }
                        Err(_) => skipped += 1,
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = rewrite(dir, pending.values())?;
        let outbox = Outbox { dir: dir.to_path_buf(), file, pending, index, next, done_lines: 0 };
        let opened = Opened { pending: outbox.pending.values().cloned().collect(), skipped };
        Ok((outbox, opened))
    }

    /// Appends `deliveries` and syncs them: once this returns, they survive a crash.
    pub fn append(&mut self, deliveries: &[Delivery]) -> io::Result<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(512 * deliveries.len());
        for d in deliveries {
            line(&mut buf, &Line::Add(Box::new(d.clone())))?;
        }
        self.file.write_all(&buf)?;
        self.file.sync_data()?;
        for d in deliveries {
            self.index.insert(d.id.clone(), self.next);
            self.pending.insert(self.next, d.clone());
            self.next += 1;
        }
        Ok(())
    }

    /// Marks a delivery made (or given up). Unknown ids are ignored.
    pub fn done(&mut self, id: &str) -> io::Result<()> {
        let Some(seq) = self.index.remove(id) else { return Ok(()) };
        self.pending.remove(&seq);
        let mut buf = Vec::with_capacity(64);
        line(&mut buf, &Line::Done(id.to_string()))?;
        self.file.write_all(&buf)?;
        self.done_lines += 1;
        if self.done_lines >= COMPACT_AFTER && self.done_lines > self.pending.len() {
            self.file = rewrite(&self.dir, self.pending.values())?;
            self.done_lines = 0;
        }
        Ok(())
    }

    /// Deliveries still to make.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

fn line(buf: &mut Vec<u8>, line: &Line) -> io::Result<()> {
    serde_json::to_writer(&mut *buf, line)?;
    buf.push(b'\n');
    Ok(())
}

/// Replaces the journal with `pending` and returns it opened for appending.
fn rewrite<'a>(dir: &Path, pending: impl Iterator<Item = &'a Delivery>) -> io::Result<File> {
    let path = dir.join(FILE);
    let tmp = dir.join("outbox.jsonl.tmp");
    {
        let mut out = io::BufWriter::new(File::create(&tmp)?);
        let mut buf = Vec::new();
        for d in pending {
            buf.clear();
            line(&mut buf, &Line::Add(Box::new(d.clone())))?;
            out.write_all(&buf)?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()?;
    OpenOptions::new().append(true).open(&path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::event::{CircuitOpen, Detail};

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tollgate-outbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn delivery(id: &str) -> Delivery {
        Delivery {
            id: id.into(),
            receiver: "http://127.0.0.1:9/hook".into(),
            event: Event {
                id: id.split('.').next().unwrap().into(),
                time: "2026-12-03T12:00:00.000Z".into(),
                time_ms: 1,
                detail: Detail::CircuitOpen(CircuitOpen {
                    upstream: "api:443".into(),
                    open_for_ms: 60_000,
                    retry_at: "2026-12-03T12:01:00.000Z".into(),
                }),
            },
        }
    }

    fn ids(ds: &[Delivery]) -> Vec<&str> {
        ds.iter().map(|d| d.id.as_str()).collect()
    }

    #[test]
    fn pending_deliveries_survive_reopening_and_done_ones_do_not() {
        let d = dir("reopen");
        let (mut outbox, opened) = Outbox::open(&d).unwrap();
        assert!(opened.pending.is_empty());
        outbox.append(&[delivery("evt_a.0"), delivery("evt_a.1")]).unwrap();
        outbox.append(&[delivery("evt_b.0")]).unwrap();
        outbox.done("evt_a.0").unwrap();
        outbox.done("evt_unknown.0").unwrap();
        assert_eq!(outbox.pending(), 2);
        drop(outbox);
        let (outbox, opened) = Outbox::open(&d).unwrap();
        assert_eq!(ids(&opened.pending), ["evt_a.1", "evt_b.0"]);
        assert_eq!(opened.pending[1], delivery("evt_b.0"), "read back whole");
        assert_eq!((opened.skipped, outbox.pending()), (0, 2));
        // Compacted on open: the done line and its add are gone.
        let text = std::fs::read_to_string(d.join(FILE)).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_corrupt_line_loses_only_itself() {
        let d = dir("corrupt");
        let (mut outbox, _) = Outbox::open(&d).unwrap();
        outbox.append(&[delivery("evt_a.0")]).unwrap();
        drop(outbox);
        // Damage in the middle, then a good line, then a torn tail from a crash mid-write.
        let good = String::from_utf8(std::fs::read(d.join(FILE)).unwrap()).unwrap();
        let mut b = String::new();
        b.push_str(&good);
        b.push_str("{\"add\": {\"id\": 12}}\n\u{0}\u{0}garbage\n");
        b.push_str(&good.replace("evt_a.0", "evt_c.0"));
        b.push_str(&good.replace("evt_a.0", "evt_d.0")[..40]);
        std::fs::write(d.join(FILE), b).unwrap();
        let (mut outbox, opened) = Outbox::open(&d).unwrap();
        assert_eq!(ids(&opened.pending), ["evt_a.0", "evt_c.0"]);
        assert_eq!(opened.skipped, 3);
        // The torn tail was cut by the rewrite: a new line is not glued to it.
        outbox.append(&[delivery("evt_e.0")]).unwrap();
        drop(outbox);
        let (_, opened) = Outbox::open(&d).unwrap();
        assert_eq!(ids(&opened.pending), ["evt_a.0", "evt_c.0", "evt_e.0"]);
        assert_eq!(opened.skipped, 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_journal_is_rewritten_once_done_lines_pile_up() {
        let d = dir("compact");
        let (mut outbox, _) = Outbox::open(&d).unwrap();
        let keep = delivery("evt_keep.0");
        outbox.append(std::slice::from_ref(&keep)).unwrap();
        let many: Vec<Delivery> =
            (0..COMPACT_AFTER).map(|i| delivery(&format!("evt_{i}.0"))).collect();
        outbox.append(&many).unwrap();
        for d in &many {
            outbox.done(&d.id).unwrap();
        }
        let text = std::fs::read_to_string(d.join(FILE)).unwrap();
        assert!(text.lines().count() < 4, "compacted: {} lines", text.lines().count());
        drop(outbox);
        let (_, opened) = Outbox::open(&d).unwrap();
        assert_eq!(opened.pending, vec![keep]);
        let _ = std::fs::remove_dir_all(&d);
    }
}
