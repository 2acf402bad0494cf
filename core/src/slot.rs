//! The byte layout of the small records the Envoy filter keeps in shared data (the loop
//! detector's, the risk history's, the breakers' and escalation's slots): a count, then the
//! entries, in little-endian integers and length-prefixed UTF-8 strings. One reader and one
//! writer, so that every record is checked the same way: a record that ends early, holds bad
//! UTF-8 or has bytes left over is not a record (`None`).

/// Reads a record front to back.
pub struct Reader<'b> {
    rest: &'b [u8],
}

impl<'b> Reader<'b> {
    pub fn new(bytes: &'b [u8]) -> Reader<'b> {
        Reader { rest: bytes }
    }

    fn take(&mut self, n: usize) -> Option<&'b [u8]> {
        let (head, tail) = (self.rest.get(..n)?, self.rest.get(n..)?);
        self.rest = tail;
        Some(head)
    }

    pub fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }

    /// A string written by [`Writer::str`].
    pub fn str(&mut self) -> Option<&'b str> {
        let len = self.u32()? as usize;
        std::str::from_utf8(self.take(len)?).ok()
    }

    /// A count, then that many entries, each read by `entry` (written by [`Writer::count`] and
    /// the entries). The count is not trusted for the allocation: a bad one runs out of bytes.
    pub fn list<T>(&mut self, mut entry: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        let n = self.u32()? as usize;
        let mut items = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            items.push(entry(self)?);
        }
        Some(items)
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// `value`, if nothing is left over.
    pub fn end<T>(self, value: T) -> Option<T> {
        self.rest.is_empty().then_some(value)
    }
}

/// Decodes a whole record with `read`: empty bytes are the empty record (`T::default()`, what
/// shared data holds before the first write); `None` when `read` fails or leaves bytes over.
pub fn decode<T: Default>(
    bytes: &[u8],
    read: impl FnOnce(&mut Reader<'_>) -> Option<T>,
) -> Option<T> {
    if bytes.is_empty() {
        return Some(T::default());
    }
    let mut r = Reader::new(bytes);
    let value = read(&mut r)?;
    r.end(value)
}

/// Writes a record for [`Reader`].
pub struct Writer(Vec<u8>);

impl Writer {
    pub fn with_capacity(n: usize) -> Writer {
        Writer(Vec::with_capacity(n))
    }

    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// A count of entries (saturating: a slot is bounded far below).
    pub fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }

    pub fn str(&mut self, s: &str) {
        self.count(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_written_reads_back_and_a_short_or_long_record_does_not() {
        let mut w = Writer::with_capacity(32);
        w.count(1);
        w.str("agent-é");
        w.u64(7);
        w.u8(1);
        let bytes = w.into_bytes();
        let read = |b: &[u8]| {
            let mut r = Reader::new(b);
            let n = r.u32()?;
            let s = r.str()?.to_owned();
            let (v, t) = (r.u64()?, r.u8()?);
            r.end((n, s, v, t))
        };
        assert_eq!(read(&bytes), Some((1, "agent-é".to_owned(), 7, 1)));
        assert_eq!(read(&bytes[..bytes.len() - 1]), None, "ends early");
        assert_eq!(read(&[bytes.as_slice(), &[0]].concat()), None, "bytes left over");
        let mut bad = bytes.clone();
        bad[4 + 4 + 6] = 0xff;
        assert_eq!(read(&bad), None, "not UTF-8");
    }
}
