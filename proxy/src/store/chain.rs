//! How the records of the ledger and of the audit log are framed and chained, and the one walk
//! over the segments that every reader shares (`tollgate run` on start, `tollgate invoice`, the
//! admin API, `tollgate audit verify`, the export).
//!
//! A segment is encoded one of two ways ([`Encoding`]); a reader takes both, in any mix:
//!
//! - **Compact** (written by default): the segment starts with [`MAGIC`], then one frame per
//!   record, `<body length varint> <crc32, 4 bytes LE> <mode> <link, 32 bytes> <body>`; the body
//!   is the compact record ([`tollgate_core::record::compact`]).
//! - **JSON lines** (every version before, and `ledger.encoding: json`): `<crc32 hex> <link>
//!   <record>\n`, the link a mode letter and 64 hex digits.
//!
//! In both the checksum covers everything after it, the mode is `s` (SHA-256) or `h`
//! (HMAC-SHA256), and the link is the hash of the previous record's bytes as written (a line
//! without its newline, checksum included; a whole frame): SHA-256, or HMAC-SHA256 under the
//! ledger's key. The first record of a ledger links to [`GENESIS`]; the first record of a segment
//! links to the last record of the segment before it, so the chain runs across segments and
//! encodings. The chain hashes bytes, not fields. Lines written before chaining existed
//! (`<crc32 hex> <json>`) are still read; they are reported as unchained.
//!
//! Only an incomplete last record of the last segment is a torn write (a crash mid-write). Any
//! complete record that does not verify is corruption, reported with its segment and record
//! number (`00000003.seg:17`: the line number of a JSON segment).

use std::fmt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
pub use tollgate_core::record::compact::{Context, MAGIC};

/// The link of the first record.
pub const GENESIS: [u8; 32] = [0; 32];
/// `<crc32 hex> `: the checksum and its space.
const CRC: usize = 9;
/// `<mode><64 hex> `: the link and its space.
const LINK: usize = 66;
/// Longest compact record body accepted (a longer length is damage).
const MAX_BODY: u64 = 1 << 20;
/// Shortest HMAC key accepted, in bytes.
const MIN_KEY: usize = 16;

/// The secret of a keyed chain. Its bytes are never printed.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// Where the key comes from (`ledger: {hmac_key_file: PATH}` or `{hmac_key_env: NAME}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    Env(String),
}

impl KeySource {
    /// Reads the key: the file's (or variable's) bytes without trailing whitespace, at least 16
    /// bytes. Errors name the file or the variable, never the key.
    pub fn load(&self) -> anyhow::Result<Key> {
        let (bytes, from) = match self {
            KeySource::File(path) => {
                let bytes = std::fs::read(path).map_err(|e| {
                    anyhow::anyhow!("reading the ledger HMAC key file {}: {e}", path.display())
                })?;
                (bytes, format!("the ledger HMAC key file {}", path.display()))
            }
            KeySource::Env(name) => {
                let value = std::env::var_os(name).unwrap_or_default();
                (value.into_encoded_bytes(), format!("the ledger HMAC key variable {name}"))
            }
        };
        let len = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
        if len < MIN_KEY {
            anyhow::bail!(
                "{from} holds {len} bytes; a key needs at least {MIN_KEY} (e.g. `openssl rand \
                 -hex 32`)"
            );
        }
        Ok(Key(bytes[..len].to_vec()))
    }
}

/// How a line is linked to the one before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// SHA-256 of the previous line: detects a changed record unless every later link is
    /// recomputed too.
    Sha256,
    /// HMAC-SHA256 of the previous line under the ledger's key: cannot be recomputed without it.
    Hmac,
}

impl Mode {
    fn letter(self) -> u8 {
        match self {
            Mode::Sha256 => b's',
            Mode::Hmac => b'h',
        }
    }
}

/// Computes links: SHA-256, or HMAC-SHA256 when there is a key.
#[derive(Clone)]
pub struct Linker {
    /// Keyed once; cloned per line.
    mac: Option<Hmac<Sha256>>,
}

impl Linker {
    pub fn new(key: Option<&Key>) -> Linker {
        let mac = key.map(|k| {
            <Hmac<Sha256> as Mac>::new_from_slice(&k.0).expect("HMAC takes keys of any length")
        });
        Linker { mac }
    }

    /// The mode of the links this linker writes.
    pub fn mode(&self) -> Mode {
        if self.mac.is_some() {
            Mode::Hmac
        } else {
            Mode::Sha256
        }
    }

    /// The link a record following `line` (without its newline) carries, in this linker's mode.
    pub fn link_after(&self, line: &[u8]) -> [u8; 32] {
        self.link_in(self.mode(), line).unwrap_or(GENESIS)
    }

    /// The link in `mode` after `line`; `None` for an HMAC link without a key.
    fn link_in(&self, mode: Mode, line: &[u8]) -> Option<[u8; 32]> {
        match mode {
            Mode::Sha256 => Some(sha256(line)),
            Mode::Hmac => {
                let mut mac = self.mac.clone()?;
                mac.update(line);
                Some(mac.finalize().into_bytes().into())
            }
        }
    }
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

const DIGITS: &[u8; 16] = b"0123456789abcdef";

pub fn hex(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    String::from_utf8(out).unwrap_or_default()
}

fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 15)]);
    }
}

pub fn unhex(text: &[u8]) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

/// Appends one framed line to `out`: `record` writes the record's bytes (returning false when it
/// could not, which leaves `out` as it was). Returns the range of the line without its newline.
pub fn frame(
    out: &mut Vec<u8>,
    mode: Mode,
    link: &[u8; 32],
    record: impl FnOnce(&mut Vec<u8>) -> bool,
) -> Option<std::ops::Range<usize>> {
    let start = out.len();
    out.extend_from_slice(b"00000000 ");
    out.push(mode.letter());
    push_hex(out, link);
    out.push(b' ');
    if !record(out) {
        out.truncate(start);
        return None;
    }
    let crc = crc32fast::hash(&out[start + CRC..]);
    let mut crc_hex = Vec::with_capacity(8);
    push_hex(&mut crc_hex, &crc.to_be_bytes());
    out[start..start + 8].copy_from_slice(&crc_hex);
    let end = out.len();
    out.push(b'\n');
    Some(start..end)
}

/// One stored line, its checksum verified.
#[derive(Debug, PartialEq, Eq)]
pub struct Line<'a> {
    /// `None` for a line written before chaining existed.
    pub link: Option<(Mode, [u8; 32])>,
    pub record: &'a [u8],
}

/// Checks a line's checksum and splits it (without its newline).
pub fn parse(line: &[u8]) -> Result<Line<'_>, &'static str> {
    if line.len() < CRC + 1 || line[CRC - 1] != b' ' {
        return Err("malformed record");
    }
    let crc = std::str::from_utf8(&line[..8]).ok().and_then(|h| u32::from_str_radix(h, 16).ok());
    if crc != Some(crc32fast::hash(&line[CRC..])) {
        return Err("checksum mismatch");
    }
    let rest = &line[CRC..];
    let mode = match rest[0] {
        b's' => Mode::Sha256,
        b'h' => Mode::Hmac,
        // `<crc32 hex> <json>`: written before chaining existed.
        _ => return Ok(Line { link: None, record: rest }),
    };
    match (rest.get(1..LINK - 1).and_then(unhex), rest.get(LINK - 1)) {
        (Some(link), Some(b' ')) => Ok(Line { link: Some((mode, link)), record: &rest[LINK..] }),
        _ => Err("malformed link"),
    }
}

/// A line of a segment: `<segment path>:<line number>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pos {
    pub segment: PathBuf,
    pub line: u64,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.segment.display(), self.line)
    }
}

/// Something wrong with a complete line (never a torn write).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The line does not verify: bad checksum, malformed, or a record that does not decode.
    Corrupt { at: Pos, what: String },
    /// The record at `at` is not the one the next record (`next`) links to: it was changed (its
    /// checksum recomputed), or records between them were removed or reordered.
    Unlinked { at: Pos, next: Pos },
    /// A record without a link after chained ones (chaining never stops once it has started).
    Unchained { at: Pos },
    /// The first record does not start the chain: records (or whole segments) before it were
    /// removed.
    Headless { at: Pos },
    /// The record at `at` cannot be vouched for: the next one (`next`) is linked by SHA-256
    /// after keyed ones (found with the key), so the chain was recomputed without the key.
    Unkeyed { at: Pos, next: Pos },
}

impl Problem {
    /// Where the problem is.
    pub fn at(&self) -> &Pos {
        match self {
            Problem::Corrupt { at, .. }
            | Problem::Unlinked { at, .. }
            | Problem::Unchained { at }
            | Problem::Headless { at }
            | Problem::Unkeyed { at, .. } => at,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Corrupt { at, what } => write!(f, "{at}: {what}"),
            Problem::Unlinked { at, next } => write!(
                f,
                "{at}: the record was changed, or records after it removed or reordered: the next \
                 record ({}:{}) does not link to it",
                next.segment.file_name().unwrap_or_default().to_string_lossy(),
                next.line
            ),
            Problem::Unchained { at } => {
                write!(f, "{at}: the record carries no chain link although earlier records do")
            }
            Problem::Headless { at } => write!(
                f,
                "{at}: the first record does not start the chain: records or segments before it \
                 were removed"
            ),
            Problem::Unkeyed { at, next } => write!(
                f,
                "{at}: the record was changed, or records after it removed or reordered: the next \
                 record ({}:{}) is linked by plain SHA-256 after HMAC-linked ones: the chain was \
                 recomputed without the key",
                next.segment.file_name().unwrap_or_default().to_string_lossy(),
                next.line
            ),
        }
    }
}

/// The unterminated last line of the last segment: a write cut short by a crash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Torn {
    pub at: Pos,
    /// Where it starts in its segment.
    pub offset: u64,
    pub bytes: u64,
}

/// What a walk over the segments found.
#[derive(Clone, Debug, Default)]
pub struct Walk {
    /// Segment numbers, in order.
    pub segments: Vec<u64>,
    /// Complete lines (good or not).
    pub records: u64,
    /// SHA-256 of the last complete line ([`GENESIS`] when there is none): the head's hash.
    pub last_hash: [u8; 32],
    /// The link the next record carries, in the walking linker's mode.
    pub next_link: [u8; 32],
    /// Records before the first chained one (written before chaining existed).
    pub unchained: u64,
    /// The first chained record.
    pub chained_from: Option<Pos>,
    /// The first record linked by HMAC.
    pub keyed_from: Option<Pos>,
    /// HMAC links that could not be checked (no key).
    pub unchecked: u64,
    /// The newest record's link mode.
    pub last_mode: Option<Mode>,
    pub problems: Vec<Problem>,
    pub torn: Option<Torn>,
    /// Record number (1-based), SHA-256 and position of each record asked for that is present.
    pub hashes_at: Vec<(u64, [u8; 32], Pos)>,
    /// How the last segment is encoded, and (compact) what its records defined.
    pub last_encoding: Option<Encoding>,
    /// Records before the walked segments, retired (counted in `records` by the ledger's
    /// `verify`).
    pub retired: u64,
    pub context: Context,
}

/// How a segment's records are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encoding {
    /// Compact frames ([`tollgate_core::record::compact`]) after [`MAGIC`].
    #[default]
    Compact,
    /// JSON lines (`<crc32 hex> <link> <json>`), as every version before the compact encoding
    /// wrote.
    Json,
}

impl Encoding {
    /// The encoding of a segment that starts with `bytes` (an empty one is compact).
    pub fn of(bytes: &[u8]) -> Encoding {
        let n = bytes.len().min(MAGIC.len());
        match bytes[..n] == MAGIC[..n] {
            true => Encoding::Compact,
            false => Encoding::Json,
        }
    }
}

pub fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:08}.seg"))
}

/// A verified record's bytes, as its segment encodes it.
pub enum Body<'a> {
    /// A JSON line's record.
    Json(&'a [u8]),
    /// A compact record's fields (its new strings already defined in the context).
    Compact(&'a [u8], &'a mut Context),
}

/// Walks every record of every segment in `dir` (`segments`, in order), checking checksums and
/// links; `record` is called with each verified record (and its position), and an error it returns
/// makes the record corrupt. Problems are collected, not fatal: the chain goes on over the bytes
/// as written, so one changed record is one problem. `hashes_at` asks for the hashes of those
/// record numbers (for comparing with heads).
pub fn walk(
    dir: &Path,
    segments: &[u64],
    linker: &Linker,
    hashes_at: &[u64],
    record: impl FnMut(Body<'_>, &Pos) -> Result<(), String>,
) -> std::io::Result<Walk> {
    walk_from(dir, segments, linker, hashes_at, GENESIS, record)
}

/// [`walk`] over a chain whose first record links to `start` instead of [`GENESIS`] (the audit
/// log after the single-file log it continues).
pub fn walk_from(
    dir: &Path,
    segments: &[u64],
    linker: &Linker,
    hashes_at: &[u64],
    start: [u8; 32],
    mut record: impl FnMut(Body<'_>, &Pos) -> Result<(), String>,
) -> std::io::Result<Walk> {
    let mut walk = Walk {
        segments: segments.to_vec(),
        last_hash: GENESIS,
        next_link: start,
        ..Walk::default()
    };
    // The previous complete record, as written (kept across segments).
    let mut prev: Vec<u8> = Vec::new();
    let mut prev_pos: Option<Pos> = None;
    let mut prev_corrupt = false;
    let last = segments.last().copied();
    for &n in segments {
        let path = segment_path(dir, n);
        let bytes = std::fs::read(&path)?;
        let is_last = Some(n) == last;
        let encoding = Encoding::of(&bytes);
        let mut offset = match encoding {
            Encoding::Compact => MAGIC.len().min(bytes.len()),
            Encoding::Json => 0,
        };
        let mut ctx = Context::default();
        let mut line_no = 0u64;
        if encoding == Encoding::Compact && bytes.len() < MAGIC.len() && !bytes.is_empty() {
            // The segment's first bytes, cut short by a crash.
            let pos = Pos { segment: path.clone(), line: 1 };
            match is_last {
                true => walk.torn = Some(Torn { at: pos, offset: 0, bytes: bytes.len() as u64 }),
                false => walk.problems.push(Problem::Corrupt {
                    at: pos,
                    what: "incomplete record in a sealed segment".into(),
                }),
            }
        }
        while offset < bytes.len() {
            line_no += 1;
            let pos = Pos { segment: path.clone(), line: line_no };
            let next = match encoding {
                Encoding::Json => next_line(&bytes[offset..]),
                Encoding::Compact => next_frame(&bytes[offset..]),
            };
            let (len, parsed) = match next {
                Next::Incomplete if is_last => {
                    let bytes = (bytes.len() - offset) as u64;
                    walk.torn = Some(Torn { at: pos, offset: offset as u64, bytes });
                    break;
                }
                Next::Incomplete => {
                    let what = "incomplete record in a sealed segment".to_string();
                    walk.problems.push(Problem::Corrupt { at: pos, what });
                    break;
                }
                Next::Unreadable(what) => {
                    walk.records += 1;
                    let what = format!("{what} (the rest of the segment cannot be read)");
                    walk.problems.push(Problem::Corrupt { at: pos, what });
                    break;
                }
                Next::Record { len, stored, parsed } => (len, (stored, parsed)),
            };
            let (stored, parsed) = parsed;
            let line = &bytes[offset..offset + stored];
            walk.records += 1;
            let problems_before = walk.problems.len();
            match parsed {
                Err(what) => {
                    walk.problems.push(Problem::Corrupt { at: pos.clone(), what: what.into() })
                }
                Ok(parsed) => {
                    match parsed.link {
                        None if walk.chained_from.is_some() => {
                            walk.problems.push(Problem::Unchained { at: pos.clone() })
                        }
                        None => walk.unchained += 1,
                        Some((mode, link)) => {
                            walk.chained_from.get_or_insert_with(|| pos.clone());
                            if mode == Mode::Hmac {
                                walk.keyed_from.get_or_insert_with(|| pos.clone());
                            }
                            if let (Mode::Sha256, Some(_), Some(_), Some(at)) =
                                (mode, &linker.mac, &walk.keyed_from, &prev_pos)
                            {
                                let next = pos.clone();
                                walk.problems.push(Problem::Unkeyed { at: at.clone(), next });
                            }
                            walk.last_mode = Some(mode);
                            let expected = match &prev_pos {
                                None => Some(start),
                                Some(_) => linker.link_in(mode, &prev),
                            };
                            match expected {
                                None => walk.unchecked += 1,
                                Some(expected) if expected == link => {}
                                // A corrupt record's successor does not link to it either: one
                                // problem, not two.
                                Some(_) if prev_corrupt => {}
                                Some(_) => walk.problems.push(match &prev_pos {
                                    Some(at) => {
                                        Problem::Unlinked { at: at.clone(), next: pos.clone() }
                                    }
                                    None => Problem::Headless { at: pos.clone() },
                                }),
                            }
                        }
                    }
                    let body = match encoding {
                        Encoding::Json => Ok(Body::Json(parsed.record)),
                        Encoding::Compact => match ctx.define(parsed.record) {
                            Ok(fields) => Ok(Body::Compact(fields, &mut ctx)),
                            Err(e) => Err(format!("the record does not decode: {e}")),
                        },
                    };
                    if let Err(what) = body.and_then(|body| record(body, &pos)) {
                        walk.problems.push(Problem::Corrupt { at: pos.clone(), what });
                    }
                }
            }
            if hashes_at.contains(&walk.records) {
                walk.hashes_at.push((walk.records, sha256(line), pos.clone()));
            }
            prev_corrupt = walk.problems[problems_before..]
                .iter()
                .any(|p| matches!(p, Problem::Corrupt { .. }));
            prev.clear();
            prev.extend_from_slice(line);
            prev_pos = Some(pos);
            offset += len;
        }
        if is_last {
            walk.last_encoding = Some(encoding);
            walk.context = ctx;
        }
    }
    if prev_pos.is_some() {
        walk.last_hash = sha256(&prev);
        walk.next_link = linker.link_after(&prev);
    }
    Ok(walk)
}

/// The next record of a segment.
pub enum Next<'a> {
    /// A complete record: the bytes it takes (with its newline, for a line), the bytes of it
    /// that are chained (without the newline), and its parts if its checksum holds.
    Record { len: usize, stored: usize, parsed: Result<Line<'a>, &'static str> },
    /// The record goes past the end of the bytes (a torn write in the last segment).
    Incomplete,
    /// Its length cannot be read: nothing after it can be.
    Unreadable(&'static str),
}

/// The next JSON line of `bytes`.
pub fn next_line(bytes: &[u8]) -> Next<'_> {
    match bytes.iter().position(|&b| b == b'\n') {
        Some(end) => Next::Record { len: end + 1, stored: end, parsed: parse(&bytes[..end]) },
        None => Next::Incomplete,
    }
}

/// The next compact frame of `bytes`: `<length varint> <crc32 LE> <mode> <link> <body>`, the
/// checksum covering everything after it.
pub fn next_frame(bytes: &[u8]) -> Next<'_> {
    let Some((body_len, head)) = tollgate_core::record::compact::get_varint(bytes) else {
        return match bytes.len() < 10 {
            true => Next::Incomplete,
            false => Next::Unreadable("malformed record length"),
        };
    };
    if body_len > MAX_BODY {
        return Next::Unreadable("malformed record length");
    }
    let len = head + 4 + 33 + body_len as usize;
    if bytes.len() < len {
        return Next::Incomplete;
    }
    let crc = u32::from_le_bytes([bytes[head], bytes[head + 1], bytes[head + 2], bytes[head + 3]]);
    let rest = &bytes[head + 4..len];
    let parsed = if crc != crc32fast::hash(rest) {
        Err("checksum mismatch")
    } else {
        let mode = match rest[0] {
            b's' => Ok(Mode::Sha256),
            b'h' => Ok(Mode::Hmac),
            _ => Err("malformed link"),
        };
        mode.map(|mode| {
            let mut link = [0u8; 32];
            link.copy_from_slice(&rest[1..33]);
            Line { link: Some((mode, link)), record: &rest[33..] }
        })
    };
    Next::Record { len, stored: len, parsed }
}

/// Appends one compact frame to `out` (see [`next_frame`]): `record` writes the body (returning
/// false when it could not, which leaves `out` as it was). Returns the range of the frame, all
/// of which is chained.
pub fn frame_compact(
    out: &mut Vec<u8>,
    mode: Mode,
    link: &[u8; 32],
    record: impl FnOnce(&mut Vec<u8>) -> bool,
) -> Option<std::ops::Range<usize>> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(mode.letter());
    out.extend_from_slice(link);
    let body = out.len();
    if !record(out) {
        out.truncate(start);
        return None;
    }
    let body_len = (out.len() - body) as u64;
    let crc = crc32fast::hash(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    let mut head = Vec::with_capacity(3);
    tollgate_core::record::compact::put_varint(&mut head, body_len);
    out.splice(start..start, head);
    Some(start..out.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_framed_line_parses_back_and_any_change_fails_its_checksum() {
        let mut out = Vec::new();
        let link = sha256(b"before");
        let range = frame(&mut out, Mode::Sha256, &link, |o| {
            o.extend_from_slice(b"{\"a\":1}");
            true
        })
        .unwrap();
        assert_eq!(out.last(), Some(&b'\n'));
        let line = &out[range];
        assert_eq!(
            parse(line),
            Ok(Line { link: Some((Mode::Sha256, link)), record: b"{\"a\":1}" })
        );
        let mut changed = line.to_vec();
        *changed.last_mut().unwrap() = b']';
        assert_eq!(parse(&changed), Err("checksum mismatch"));
        // A line from before chaining.
        let json = b"{\"seq\":1}";
        let old = format!("{:08x} {}", crc32fast::hash(json), std::str::from_utf8(json).unwrap());
        assert_eq!(parse(old.as_bytes()), Ok(Line { link: None, record: json }));
    }

    #[test]
    fn keyed_links_differ_from_plain_ones_and_need_the_key() {
        let key = Key(b"0123456789abcdef0123".to_vec());
        let keyed = Linker::new(Some(&key));
        let plain = Linker::new(None);
        assert_eq!(keyed.mode(), Mode::Hmac);
        assert_ne!(keyed.link_after(b"x"), plain.link_after(b"x"));
        assert_eq!(plain.link_in(Mode::Hmac, b"x"), None);
        assert!(!format!("{key:?}").contains("0123"));
    }
}
