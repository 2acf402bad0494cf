//! The compact record encoding (segment format 2): the same records as the JSON lines, in about
//! a sixth of the bytes.
//!
//! A compact segment starts with [`MAGIC`]; each record body (framed, checksummed and chained by
//! the ledger, which never looks inside) is
//!
//! ```text
//! <new strings: count, then each as length + UTF-8> <tag> <fields>
//! ```
//!
//! Integers are LEB128 varints (signed ones zigzag first). A string field is a reference to a
//! string defined earlier in the same segment (attribution, routes, models, reasons and budget
//! ids repeat on nearly every record, so each is written once per segment) or, once a segment
//! has [`MAX_STRINGS`] strings, written out. An id (`tg-18c2f0a1-3e1-2a`, `req-17`) is its
//! interned prefix and the number its hex suffix spells, when it spells one exactly. Timestamps
//! are milliseconds relative to the record before (`ts` to its own `reserved_at_ms`), and are
//! written out when the text is not exactly what [`UnixMillis`]' display gives. Money stays an
//! exact integer of nano-USD. The strings and the time base are per segment ([`Context`]): a
//! reader decodes a segment from its start, as every reader of the ledger does.
//!
//! Decoding gives back exactly the record that was encoded (`encode → decode` is the identity,
//! checked for every field by the tests), so JSON written from a decoded record is the JSON the
//! proxy would have written.

use std::collections::HashMap;

use super::{Decision, End, Entry, PriceSource, ReserveRecord, Stored, UsageRecord, UsageSource};
use crate::money::Money;
use crate::pricing::Cost;
use crate::time::{Date, UnixMillis};
use crate::usage::Usage;

/// The first bytes of a compact segment (`0xff` never starts a JSON line).
pub const MAGIC: &[u8; 4] = b"\xffTG2";
/// Most strings a segment interns; later new strings are written out in full.
pub const MAX_STRINGS: usize = 16 * 1024;

const TAG_USAGE: u8 = 1;
const TAG_RESERVE: u8 = 2;

/// Why a compact record does not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the record ends early")]
    Short,
    #[error("a malformed {0}")]
    Malformed(&'static str),
    #[error("string {0} is not defined in this segment")]
    Undefined(u64),
    #[error("`{value}` is not {what}")]
    Code { what: &'static str, value: u64 },
}

/// What a segment has defined so far: its strings and the time base.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Context {
    strings: Vec<String>,
    base_ms: u64,
}

impl Context {
    /// Reads the strings a record defines; returns the rest of the record.
    pub fn define<'a>(&mut self, body: &'a [u8]) -> Result<&'a [u8], Error> {
        let mut r = Cursor { bytes: body, at: 0 };
        let n = r.varint()?;
        for _ in 0..n {
            let s = r.text()?;
            self.strings.push(s.to_owned());
        }
        Ok(&body[r.at..])
    }

    /// Strings defined so far.
    pub fn strings(&self) -> usize {
        self.strings.len()
    }
}

/// The writing side of a segment: the [`Context`] plus an index of its strings.
#[derive(Debug, Default)]
pub struct Encoder {
    ctx: Context,
    /// Where each string of `ctx` is (a hash map: looked up for every string field of every
    /// record on the ledger's writer thread).
    index: HashMap<String, u64>,
    /// The buffers of the record being encoded, kept between records.
    scratch: (Vec<u8>, Vec<u8>),
}

impl Encoder {
    /// Continues a segment whose records gave `ctx`.
    pub fn continuing(ctx: Context) -> Encoder {
        let index = ctx.strings.iter().enumerate().map(|(i, s)| (s.clone(), i as u64)).collect();
        Encoder { ctx, index, scratch: Default::default() }
    }

    /// A new segment: nothing defined.
    pub fn reset(&mut self) {
        *self = Encoder::default();
    }

    /// Starts a record; [`Fields::finish`] appends it (its new strings first) to `out`.
    pub fn record(&mut self) -> Fields<'_> {
        let (mut defs, mut out) = std::mem::take(&mut self.scratch);
        defs.clear();
        out.clear();
        Fields { enc: self, defs, new: 0, out }
    }

    /// Appends the body of a ledger record to `out`; false (and nothing appended) for a record
    /// of an unknown type, which is never written.
    pub fn stored(&mut self, stored: &Stored<&Entry>, out: &mut Vec<u8>) -> bool {
        match stored.entry {
            Entry::Usage(r) => {
                let mut f = self.record();
                f.byte(TAG_USAGE);
                f.usage(stored, r);
                f.finish(out);
                true
            }
            Entry::Reserve(r) => {
                let mut f = self.record();
                f.byte(TAG_RESERVE);
                f.reserve(stored, r);
                f.finish(out);
                true
            }
            Entry::Other => false,
        }
    }
}

/// One record being encoded.
pub struct Fields<'a> {
    enc: &'a mut Encoder,
    defs: Vec<u8>,
    new: u64,
    out: Vec<u8>,
}

impl Fields<'_> {
    /// Appends the record: its new strings, then its fields.
    pub fn finish(self, out: &mut Vec<u8>) {
        put_varint(out, self.new);
        out.extend_from_slice(&self.defs);
        out.extend_from_slice(&self.out);
        self.enc.scratch = (self.defs, self.out);
    }

    pub fn byte(&mut self, b: u8) {
        self.out.push(b);
    }

    pub fn varint(&mut self, v: u64) {
        put_varint(&mut self.out, v);
    }

    pub fn signed(&mut self, v: i64) {
        put_varint(&mut self.out, zigzag(v));
    }

    pub fn money(&mut self, m: Money) {
        self.signed(m.nanos());
    }

    /// The index of `s` in the segment, defining it when it is new (while there is room).
    fn intern(&mut self, s: &str) -> Option<u64> {
        if let Some(&i) = self.enc.index.get(s) {
            return Some(i);
        }
        if self.enc.ctx.strings.len() >= MAX_STRINGS {
            return None;
        }
        let i = self.enc.ctx.strings.len() as u64;
        self.enc.ctx.strings.push(s.to_owned());
        self.enc.index.insert(s.to_owned(), i);
        put_text(&mut self.defs, s);
        self.new += 1;
        Some(i)
    }

    /// A string: `index * 2 + 1`, or `length * 2` and the bytes.
    pub fn str(&mut self, s: &str) {
        match self.intern(s) {
            Some(i) => self.varint(i * 2 + 1),
            None => {
                self.varint(s.len() as u64 * 2);
                self.out.extend_from_slice(s.as_bytes());
            }
        }
    }

    /// An optional string: `0` for none, else the string's encoding plus one.
    pub fn opt_str(&mut self, s: Option<&str>) {
        match s {
            None => self.varint(0),
            Some(s) => match self.intern(s) {
                Some(i) => self.varint(i * 2 + 2),
                None => {
                    self.varint(s.len() as u64 * 2 + 1);
                    self.out.extend_from_slice(s.as_bytes());
                }
            },
        }
    }

    /// An id: its interned prefix and the number its hex suffix spells (`prefix * 2 + 1`,
    /// then the number), or the string written out (`length * 2`, then the bytes).
    pub fn id(&mut self, id: &str) {
        if let Some((prefix, n)) = split_id(id) {
            if let Some(i) = self.intern(prefix) {
                self.varint(i * 2 + 1);
                self.varint(n);
                return;
            }
        }
        self.varint(id.len() as u64 * 2);
        self.out.extend_from_slice(id.as_bytes());
    }

    /// An optional id: `0` for none, else a flag-free id after a `1`.
    pub fn opt_id(&mut self, id: Option<&str>) {
        match id {
            None => self.byte(0),
            Some(id) => {
                self.byte(1);
                self.id(id);
            }
        }
    }

    /// A timestamp relative to `base`: `(zigzag delta) * 2 + 1`, or the text written out when it
    /// is not in the canonical form.
    pub fn ts(&mut self, ts: &str, base: u64) {
        match parse_ts(ts) {
            Some(ms) => self.varint(zigzag(ms.wrapping_sub(base) as i64) * 2 + 1),
            None => {
                self.varint(ts.len() as u64 * 2);
                self.out.extend_from_slice(ts.as_bytes());
            }
        }
    }

    /// A timestamp relative to the segment's time base, which it becomes (when it is in the
    /// canonical form; else written out).
    pub fn ts_chained(&mut self, ts: &str) {
        let base = self.enc.ctx.base_ms;
        self.ts(ts, base);
        if let Some(ms) = parse_ts(ts) {
            self.enc.ctx.base_ms = ms;
        }
    }

    /// A time in milliseconds relative to the segment's base, which it becomes.
    pub fn time(&mut self, ms: u64) {
        let base = self.enc.ctx.base_ms;
        self.signed(ms.wrapping_sub(base) as i64);
        self.enc.ctx.base_ms = ms;
    }

    fn strs(&mut self, all: &[String]) {
        self.varint(all.len() as u64);
        for s in all {
            self.str(s);
        }
    }

    fn event_id(&mut self, event_id: &str, seq: u64) {
        match event_id.strip_suffix(&format!("-{seq}")) {
            _ if event_id.is_empty() => self.byte(0),
            Some(prefix) if !prefix.is_empty() => {
                self.byte(1);
                self.str(prefix);
            }
            _ => {
                self.byte(2);
                self.str(event_id);
            }
        }
    }

    fn usage(&mut self, stored: &Stored<&Entry>, r: &UsageRecord) {
        let same_id = r.reservation_id == r.request_id;
        let nanos_differ = r.cost_nano_usd != r.cost_usd.nanos();
        let flags = u64::from(same_id)
            | u64::from(r.cost.is_some()) << 1
            | u64::from(nanos_differ) << 2
            | u64::from(r.price_source.is_some()) << 3;
        self.varint(flags);
        self.varint(stored.seq);
        self.event_id(&stored.event_id, stored.seq);
        self.time(r.reserved_at_ms);
        self.ts(&r.ts, r.reserved_at_ms);
        self.id(&r.request_id);
        if !same_id {
            self.id(&r.reservation_id);
        }
        self.str(&r.agent);
        self.str(&r.cost_center);
        self.str(&r.project);
        self.opt_str(r.business_unit.as_deref());
        self.str(&r.route);
        self.str(&r.provider);
        self.opt_str(r.model.as_deref());
        self.opt_str(r.tool.as_deref());
        let t = r.tokens;
        for n in [t.input, t.cached_input, t.cache_write, t.output, t.reasoning] {
            self.varint(n);
        }
        if let Some(c) = r.cost {
            for m in [c.input, c.cached_input, c.cache_write, c.output, c.reasoning, c.per_call] {
                self.money(m);
            }
            // The total by its difference from the buckets' sum: 0 when it is their sum.
            self.signed(c.total.nanos().wrapping_sub(bucket_sum(&c)));
        }
        self.money(r.cost_usd);
        if nanos_differ {
            self.signed(r.cost_nano_usd);
        }
        self.byte(code(&Decision::ALL, r.decision));
        self.str(&r.reason);
        self.str(&r.clause);
        self.str(&r.policy_version);
        self.strs(&r.budgets);
        self.varint(u64::from(r.status));
        self.varint(r.latency_ms);
        self.byte(code(&UsageSource::ALL, r.usage_source));
        if let Some(p) = r.price_source {
            self.byte(code(&PriceSource::ALL, p));
        }
        self.byte(code(&End::ALL, r.end));
        self.opt_str(r.source.as_deref());
        self.opt_id(r.source_event_id.as_deref());
    }

    fn reserve(&mut self, stored: &Stored<&Entry>, r: &ReserveRecord) {
        let same_id = r.reservation_id == r.request_id;
        self.varint(u64::from(same_id));
        self.varint(stored.seq);
        self.event_id(&stored.event_id, stored.seq);
        self.time(r.reserved_at_ms);
        self.ts(&r.ts, r.reserved_at_ms);
        self.signed(r.expires_at_ms.wrapping_sub(r.reserved_at_ms) as i64);
        self.id(&r.request_id);
        if !same_id {
            self.id(&r.reservation_id);
        }
        self.str(&r.agent);
        self.str(&r.cost_center);
        self.str(&r.project);
        self.opt_str(r.business_unit.as_deref());
        self.money(r.amount);
        self.strs(&r.budgets);
    }
}

fn bucket_sum(c: &Cost) -> i64 {
    [c.input, c.cached_input, c.cache_write, c.output, c.reasoning, c.per_call]
        .iter()
        .fold(0i64, |sum, m| sum.wrapping_add(m.nanos()))
}

/// The position of `value` in `all` (a coded field's number).
pub fn code<T: PartialEq>(all: &[T], value: T) -> u8 {
    all.iter().position(|v| *v == value).unwrap_or(0) as u8
}

/// Reads the fields of one record (after [`Context::define`]).
pub struct Reader<'a> {
    ctx: &'a mut Context,
    cur: Cursor<'a>,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Result<u8, Error> {
        let b = *self.bytes.get(self.at).ok_or(Error::Short)?;
        self.at += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, Error> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Error::Malformed("number"))
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], Error> {
        let n = usize::try_from(n).map_err(|_| Error::Short)?;
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or(Error::Short)?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn text(&mut self) -> Result<&'a str, Error> {
        let n = self.varint()?;
        std::str::from_utf8(self.take(n)?).map_err(|_| Error::Malformed("string"))
    }
}

impl<'a> Reader<'a> {
    pub fn new(ctx: &'a mut Context, fields: &'a [u8]) -> Reader<'a> {
        Reader { ctx, cur: Cursor { bytes: fields, at: 0 } }
    }

    /// Fails unless every byte was read.
    pub fn end(&self) -> Result<(), Error> {
        match self.cur.at == self.cur.bytes.len() {
            true => Ok(()),
            false => Err(Error::Malformed("record (bytes left over)")),
        }
    }

    pub fn byte(&mut self) -> Result<u8, Error> {
        self.cur.byte()
    }

    pub fn varint(&mut self) -> Result<u64, Error> {
        self.cur.varint()
    }

    pub fn signed(&mut self) -> Result<i64, Error> {
        Ok(unzigzag(self.varint()?))
    }

    pub fn money(&mut self) -> Result<Money, Error> {
        Ok(Money::from_nanos(self.signed()?))
    }

    fn string(&self, i: u64) -> Result<String, Error> {
        let s = usize::try_from(i).ok().and_then(|i| self.ctx.strings.get(i));
        s.cloned().ok_or(Error::Undefined(i))
    }

    fn raw(&mut self, len: u64) -> Result<String, Error> {
        let bytes = self.cur.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Error::Malformed("string"))
    }

    pub fn str(&mut self) -> Result<String, Error> {
        let v = self.varint()?;
        match v & 1 {
            1 => self.string(v / 2),
            _ => self.raw(v / 2),
        }
    }

    pub fn opt_str(&mut self) -> Result<Option<String>, Error> {
        let v = self.varint()?;
        match v {
            0 => Ok(None),
            v if v & 1 == 0 => self.string(v / 2 - 1).map(Some),
            v => self.raw(v / 2).map(Some),
        }
    }

    pub fn id(&mut self) -> Result<String, Error> {
        let v = self.varint()?;
        match v & 1 {
            1 => {
                let prefix = self.string(v / 2)?;
                let n = self.varint()?;
                Ok(format!("{prefix}-{n:x}"))
            }
            _ => self.raw(v / 2),
        }
    }

    pub fn opt_id(&mut self) -> Result<Option<String>, Error> {
        match self.byte()? {
            0 => Ok(None),
            1 => self.id().map(Some),
            _ => Err(Error::Malformed("optional id")),
        }
    }

    pub fn ts(&mut self, base: u64) -> Result<String, Error> {
        let v = self.varint()?;
        match v & 1 {
            1 => Ok(UnixMillis(base.wrapping_add(unzigzag(v / 2) as u64)).to_string()),
            _ => self.raw(v / 2),
        }
    }

    /// See [`Fields::ts_chained`].
    pub fn ts_chained(&mut self) -> Result<String, Error> {
        let v = self.varint()?;
        match v & 1 {
            1 => {
                let ms = self.ctx.base_ms.wrapping_add(unzigzag(v / 2) as u64);
                self.ctx.base_ms = ms;
                Ok(UnixMillis(ms).to_string())
            }
            _ => self.raw(v / 2),
        }
    }

    pub fn time(&mut self) -> Result<u64, Error> {
        let ms = self.ctx.base_ms.wrapping_add(self.signed()? as u64);
        self.ctx.base_ms = ms;
        Ok(ms)
    }

    fn strs(&mut self) -> Result<Vec<String>, Error> {
        let n = self.varint()?;
        if n > self.cur.bytes.len() as u64 {
            return Err(Error::Malformed("list"));
        }
        (0..n).map(|_| self.str()).collect()
    }

    /// A coded field by its number in `all`.
    pub fn code<T: Copy>(&mut self, all: &[T], what: &'static str) -> Result<T, Error> {
        let b = self.byte()?;
        all.get(usize::from(b)).copied().ok_or(Error::Code { what, value: u64::from(b) })
    }

    fn event_id(&mut self, seq: u64) -> Result<String, Error> {
        match self.byte()? {
            0 => Ok(String::new()),
            1 => Ok(format!("{}-{seq}", self.str()?)),
            2 => self.str(),
            _ => Err(Error::Malformed("event id")),
        }
    }

    /// One ledger record; an unknown tag reads as [`Entry::Other`].
    pub fn stored(mut self) -> Result<Stored, Error> {
        let tag = self.byte()?;
        let stored = match tag {
            TAG_USAGE => self.usage()?,
            TAG_RESERVE => self.reserve()?,
            _ => return Ok(Stored { seq: 0, event_id: String::new(), entry: Entry::Other }),
        };
        self.end()?;
        Ok(stored)
    }

    fn usage(&mut self) -> Result<Stored, Error> {
        let flags = self.varint()?;
        let seq = self.varint()?;
        let event_id = self.event_id(seq)?;
        let reserved_at_ms = self.time()?;
        let ts = self.ts(reserved_at_ms)?;
        let request_id = self.id()?;
        let reservation_id = match flags & 1 {
            1 => request_id.clone(),
            _ => self.id()?,
        };
        let agent = self.str()?;
        let cost_center = self.str()?;
        let project = self.str()?;
        let business_unit = self.opt_str()?;
        let route = self.str()?;
        let provider = self.str()?;
        let model = self.opt_str()?;
        let tool = self.opt_str()?;
        let tokens = Usage {
            input: self.varint()?,
            cached_input: self.varint()?,
            cache_write: self.varint()?,
            output: self.varint()?,
            reasoning: self.varint()?,
        };
        let cost = match flags & 2 {
            0 => None,
            _ => {
                let mut c = Cost {
                    input: self.money()?,
                    cached_input: self.money()?,
                    cache_write: self.money()?,
                    output: self.money()?,
                    reasoning: self.money()?,
                    per_call: self.money()?,
                    total: Money::ZERO,
                };
                c.total = Money::from_nanos(bucket_sum(&c).wrapping_add(self.signed()?));
                Some(c)
            }
        };
        let cost_usd = self.money()?;
        let cost_nano_usd = match flags & 4 {
            0 => cost_usd.nanos(),
            _ => self.signed()?,
        };
        let decision = self.code(&Decision::ALL, "a decision")?;
        let reason = self.str()?;
        let clause = self.str()?;
        let policy_version = self.str()?;
        let budgets = self.strs()?;
        let status = u16::try_from(self.varint()?).map_err(|_| Error::Malformed("status"))?;
        let latency_ms = self.varint()?;
        let usage_source = self.code(&UsageSource::ALL, "a usage_source")?;
        let price_source = match flags & 8 {
            0 => None,
            _ => Some(self.code(&PriceSource::ALL, "a price_source")?),
        };
        let end = self.code(&End::ALL, "an end")?;
        let source = self.opt_str()?;
        let source_event_id = self.opt_id()?;
        let record = UsageRecord {
            ts,
            reserved_at_ms,
            request_id,
            reservation_id,
            agent,
            cost_center,
            project,
            business_unit,
            route,
            provider,
            model,
            tool,
            tokens,
            cost,
            cost_usd,
            cost_nano_usd,
            decision,
            reason,
            clause,
            policy_version,
            budgets,
            status,
            latency_ms,
            usage_source,
            price_source,
            end,
            source,
            source_event_id,
        };
        Ok(Stored { seq, event_id, entry: Entry::Usage(Box::new(record)) })
    }

    fn reserve(&mut self) -> Result<Stored, Error> {
        let flags = self.varint()?;
        let seq = self.varint()?;
        let event_id = self.event_id(seq)?;
        let reserved_at_ms = self.time()?;
        let ts = self.ts(reserved_at_ms)?;
        let expires_at_ms = reserved_at_ms.wrapping_add(self.signed()? as u64);
        let request_id = self.id()?;
        let reservation_id = match flags & 1 {
            1 => request_id.clone(),
            _ => self.id()?,
        };
        let record = ReserveRecord {
            ts,
            reserved_at_ms,
            expires_at_ms,
            request_id,
            reservation_id,
            agent: self.str()?,
            cost_center: self.str()?,
            project: self.str()?,
            business_unit: self.opt_str()?,
            amount: self.money()?,
            budgets: self.strs()?,
        };
        Ok(Stored { seq, event_id, entry: Entry::Reserve(Box::new(record)) })
    }
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A varint at the start of `bytes` and its length; `None` when `bytes` ends inside it (or it
/// is longer than a `u64` takes).
pub fn get_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut c = Cursor { bytes, at: 0 };
    c.varint().ok().map(|v| (v, c.at))
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// `prefix-<hex>` where the hex digits are exactly what formatting the number gives back.
fn split_id(id: &str) -> Option<(&str, u64)> {
    let (prefix, hex) = id.rsplit_once('-')?;
    let canonical = !hex.is_empty()
        && hex.len() <= 16
        && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && (hex == "0" || !hex.starts_with('0'));
    if !canonical {
        return None;
    }
    u64::from_str_radix(hex, 16).ok().map(|n| (prefix, n))
}

/// Milliseconds of an RFC 3339 timestamp in exactly the form [`UnixMillis`] displays.
pub fn parse_ts(ts: &str) -> Option<u64> {
    let b = ts.as_bytes();
    if b.len() != 24 || &b[10..11] != b"T" || &b[23..] != b"Z" {
        return None;
    }
    let date = Date::parse(ts.get(..10)?)?;
    let num = |r: std::ops::Range<usize>| ts.get(r)?.parse::<u64>().ok();
    let (h, m, s, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    let days = u64::try_from(date.to_days()).ok()?;
    let at = days * 86_400_000 + h * 3_600_000 + m * 60_000 + s * 1000 + ms;
    (UnixMillis(at).to_string() == ts).then_some(at)
}

#[cfg(test)]
mod tests;
