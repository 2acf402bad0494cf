//! Server-sent events framing, push-based and bounded.
//!
//! Decides where events begin and end and what their `event:` name and `data:` payload are,
//! following the WHATWG event-stream rules: lines end with `\r\n`, `\n` or a lone `\r` (a `\r\n`
//! split across two chunks is still one line end), a leading UTF-8 BOM is dropped, lines
//! starting with `:` are comments, one space after the field colon is dropped, several `data:`
//! lines join with `\n`, and a blank line dispatches the event. It never interprets payloads and
//! never allocates per chunk: its buffers are reused, and a line that lies inside one chunk is
//! read in place.
//!
//! Memory is bounded by `max_event`: an event whose data (or any one of its lines) would exceed
//! it is skipped whole, and its bytes are not kept.

use memchr::{memchr, memchr2};

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Event names longer than this are kept truncated: no name the meters look at is that long.
const MAX_NAME: usize = 64;

/// One dispatched event. `name` is empty when the event had no `event:` line (type `message`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Event<'a> {
    pub name: &'a [u8],
    pub data: &'a [u8],
}

/// Splits a byte stream into events; see the module documentation.
#[derive(Debug)]
pub(crate) struct SseParser {
    max_event: usize,
    /// The unterminated line carried over from the previous chunk.
    line: Vec<u8>,
    /// The carried line already exceeded `max_event`; its remaining bytes are dropped.
    line_overflow: bool,
    data: Vec<u8>,
    name: Vec<u8>,
    /// The current event is too large and is dropped at its blank line.
    skip_event: bool,
    /// The previous chunk ended with `\r`, so a `\n` starting this one ends no further line.
    after_cr: bool,
    /// A line has been seen, so a BOM is no longer stripped.
    started: bool,
}

impl SseParser {
    pub(crate) fn new(max_event: usize) -> Self {
        SseParser {
            max_event,
            line: Vec::new(),
            line_overflow: false,
            data: Vec::new(),
            name: Vec::new(),
            skip_event: false,
            after_cr: false,
            started: false,
        }
    }

    /// Consumes `chunk`, calling `on_event` for every event it completes.
    pub(crate) fn feed(&mut self, mut chunk: &[u8], on_event: &mut impl FnMut(Event<'_>)) {
        if chunk.is_empty() {
            return;
        }
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while let Some(end) = memchr2(b'\n', b'\r', chunk) {
            let term = match (chunk[end], chunk.get(end + 1)) {
                (b'\r', Some(b'\n')) => 2,
                (b'\r', None) => {
                    self.after_cr = true;
                    1
                }
                _ => 1,
            };
            if self.line.is_empty() && !self.line_overflow {
                self.line_done(&chunk[..end], on_event);
            } else {
                self.carry(&chunk[..end]);
                let line = std::mem::take(&mut self.line);
                if self.line_overflow {
                    self.line_overflow = false;
                    self.started = true;
                    self.skip_event = true;
                } else {
                    self.line_done(&line, on_event);
                }
                self.line = line;
                self.line.clear();
            }
            chunk = &chunk[end + term..];
        }
        self.carry(chunk);
    }

    /// Ends the stream. Unlike a browser, an unterminated last event is still dispatched: the
    /// upstream did send those bytes, and a payload cut short simply fails to parse downstream.
    pub(crate) fn finish(&mut self, on_event: &mut impl FnMut(Event<'_>)) {
        if self.line_overflow {
            self.skip_event = true;
        } else if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, on_event);
        }
        self.dispatch(on_event);
    }

    fn carry(&mut self, part: &[u8]) {
        if part.is_empty() || self.line_overflow {
            return;
        }
        if self.line.len() + part.len() > self.max_event {
            self.line.clear();
            self.line_overflow = true;
        } else {
            self.line.extend_from_slice(part);
        }
    }

    fn line_done(&mut self, line: &[u8], on_event: &mut impl FnMut(Event<'_>)) {
        let line = if self.started {
            line
        } else {
            self.started = true;
            line.strip_prefix(BOM).unwrap_or(line)
        };
        if line.is_empty() {
            return self.dispatch(on_event);
        }
        if line.len() > self.max_event {
            self.skip_event = true;
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match field {
            b"data" if !self.skip_event => {
                if self.data.len() + value.len() + 1 > self.max_event {
                    self.skip_event = true;
                    self.data.clear();
                } else {
                    self.data.extend_from_slice(value);
                    self.data.push(b'\n');
                }
            }
            b"event" => {
                self.name.clear();
                self.name.extend_from_slice(&value[..value.len().min(MAX_NAME)]);
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(Event<'_>)) {
        if !self.skip_event && !self.data.is_empty() {
            self.data.pop();
            on_event(Event { name: &self.name, data: &self.data });
        }
        self.skip_event = false;
        self.data.clear();
        self.name.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]], max: usize) -> Vec<(String, String)> {
        let mut p = SseParser::new(max);
        let mut out = Vec::new();
        let mut push = |e: Event<'_>| {
            out.push((
                String::from_utf8_lossy(e.name).into_owned(),
                String::from_utf8_lossy(e.data).into_owned(),
            ))
        };
        for c in chunks {
            p.feed(c, &mut push);
        }
        p.finish(&mut push);
        out
    }

    fn ev(name: &str, data: &str) -> (String, String) {
        (name.to_owned(), data.to_owned())
    }

    #[test]
    fn every_line_ending_style_frames_the_same_events() {
        for stream in [
            &b"event: a\ndata: 1\n\ndata: 2\n\n"[..],
            b"event: a\r\ndata: 1\r\n\r\ndata: 2\r\n\r\n",
            b"event: a\rdata: 1\r\rdata: 2\r\r",
        ] {
            assert_eq!(events(&[stream], 1024), vec![ev("a", "1"), ev("", "2")]);
        }
    }

    #[test]
    fn crlf_split_between_chunks_is_one_line_end() {
        let got = events(&[b"data: 1\r", b"", b"\n\r", b"", b"\ndata: 2\r\n\r\n"], 1024);
        assert_eq!(got, vec![ev("", "1"), ev("", "2")]);
    }

    #[test]
    fn multi_line_data_comments_and_bom() {
        let got = events(&[b"\xEF\xBB", b"\xBF: hi\ndata:a\ndata:  b\nid: 7\n\n"], 1024);
        assert_eq!(got, vec![ev("", "a\n b")]);
    }

    #[test]
    fn blank_lines_without_data_dispatch_nothing() {
        let got = events(&[b"\n\nevent: ping\n\n: keepalive\n\n"], 1024);
        assert!(got.is_empty());
    }

    #[test]
    fn oversized_event_is_skipped_and_the_next_one_survives() {
        let big = format!("data: {}\n\ndata: ok\n\n", "x".repeat(100));
        let whole = events(&[big.as_bytes()], 32);
        assert_eq!(whole, vec![ev("", "ok")]);
        let bytes: Vec<&[u8]> = big.as_bytes().chunks(1).collect();
        assert_eq!(events(&bytes, 32), whole);
        let lines = "data: 0123456789\ndata: 0123456789\ndata: 0123456789\n\ndata: ok\n\n";
        assert_eq!(events(&[lines.as_bytes()], 32), vec![ev("", "ok")]);
    }

    #[test]
    fn unterminated_last_event_is_dispatched_at_finish() {
        assert_eq!(events(&[b"data: a\n\ndata: b"], 64), vec![ev("", "a"), ev("", "b")]);
        assert_eq!(events(&[b"data: c\n"], 64), vec![ev("", "c")]);
    }
}
