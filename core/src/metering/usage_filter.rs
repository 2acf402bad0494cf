//! Removes the usage chunk the proxy asked for on the client's behalf.
//!
//! When a client streams OpenAI chat completions (or completions) without
//! `stream_options.include_usage`, the proxy adds it so the response can be metered, and must
//! then hand the client exactly the stream it asked for. [`UsageChunkFilter`] decides which
//! bytes go on: every event passes through byte for byte, in order, except the usage-only chunk
//! (`"choices": []` with a non-null `usage`), which is removed whole, blank-line terminator
//! included. It never rewrites, reorders or re-encodes anything.
//!
//! An event is written once its terminating blank line has arrived, so at most one incomplete
//! event is held back; an SSE client cannot act on an incomplete event anyway. An event larger
//! than the limit cannot be a usage chunk and streams through as it arrives.

use memchr::{memchr2, memmem};
use serde::de::IgnoredAny;
use serde::Deserialize;

use super::Limits;

/// Where the `\n` of a `\r\n` split across two chunks belongs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sink {
    /// To the event still being read.
    Event,
    /// After an event that was written.
    Out,
    /// After the event that was removed.
    Drop,
}

/// A byte transform for one response stream; see the module documentation.
#[derive(Debug)]
pub struct UsageChunkFilter {
    max_event: usize,
    /// Bytes of the current event from earlier chunks, not written yet.
    held: Vec<u8>,
    /// The current event exceeded `max_event` and streams straight through.
    passing: bool,
    /// The current line has bytes, so its end is not a blank line.
    in_line: bool,
    /// The previous chunk ended with `\r`.
    after_cr: Option<Sink>,
    /// Joined `data:` lines of an event being checked.
    scratch: Vec<u8>,
    removed: u64,
}

impl Default for UsageChunkFilter {
    fn default() -> Self {
        UsageChunkFilter::new()
    }
}

impl UsageChunkFilter {
    pub fn new() -> Self {
        UsageChunkFilter::with_max_event(Limits::default().max_event_bytes)
    }

    /// A filter that holds back at most `max_event` bytes.
    pub fn with_max_event(max_event: usize) -> Self {
        UsageChunkFilter {
            max_event,
            held: Vec::new(),
            passing: false,
            in_line: false,
            after_cr: None,
            scratch: Vec::new(),
            removed: 0,
        }
    }

    /// How many usage chunks were removed so far.
    pub fn removed(&self) -> u64 {
        self.removed
    }

    /// Appends to `out` the bytes of `chunk` (and of earlier chunks) that are ready to go on.
    pub fn filter(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut start = 0;
        let mut i = 0;
        if let Some(sink) = self.after_cr.take() {
            if chunk.first() == Some(&b'\n') {
                i = 1;
                match sink {
                    Sink::Event => {}
                    Sink::Out => {
                        out.push(b'\n');
                        start = 1;
                    }
                    Sink::Drop => start = 1,
                }
            }
        }
        while let Some(off) = memchr2(b'\n', b'\r', &chunk[i..]) {
            let end = i + off;
            let mut next = end + 1;
            let split_cr = chunk[end] == b'\r' && next == chunk.len();
            if chunk[end] == b'\r' && chunk.get(next) == Some(&b'\n') {
                next += 1;
            }
            if !self.in_line && end == i {
                let sink = self.complete(&chunk[start..next], end - start, out);
                start = next;
                if split_cr {
                    self.after_cr = Some(sink);
                }
            } else {
                self.in_line = false;
                if split_cr {
                    self.after_cr = Some(Sink::Event);
                }
            }
            i = next;
        }
        if i < chunk.len() {
            self.in_line = true;
        }
        self.hold(&chunk[start..], out);
    }

    /// Writes out what is still held at end of stream: an unterminated last event (removed if
    /// it is the usage chunk).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.held.is_empty() {
            if !self.passing && is_usage_only(&mut self.scratch, &self.held) {
                self.removed += 1;
            } else {
                out.extend_from_slice(&self.held);
            }
        }
        self.held.clear();
        self.passing = false;
        self.in_line = false;
        self.after_cr = None;
    }

    /// Ends the current event with `tail` (its last bytes; `content` of them precede the
    /// terminating blank line) and writes or removes it.
    fn complete(&mut self, tail: &[u8], content: usize, out: &mut Vec<u8>) -> Sink {
        if self.passing {
            self.passing = false;
            out.extend_from_slice(tail);
            return Sink::Out;
        }
        let small = self.held.len() + content <= self.max_event;
        let event: &[u8] = if self.held.is_empty() {
            tail
        } else {
            self.held.extend_from_slice(tail);
            &self.held
        };
        let sink = if small && is_usage_only(&mut self.scratch, event) {
            self.removed += 1;
            Sink::Drop
        } else {
            out.extend_from_slice(event);
            Sink::Out
        };
        self.held.clear();
        sink
    }

    fn hold(&mut self, rest: &[u8], out: &mut Vec<u8>) {
        if rest.is_empty() {
            return;
        }
        if self.passing {
            out.extend_from_slice(rest);
        } else if self.held.len() + rest.len() > self.max_event {
            out.extend_from_slice(&self.held);
            out.extend_from_slice(rest);
            self.held.clear();
            self.passing = true;
        } else {
            self.held.extend_from_slice(rest);
        }
    }
}

/// Whether the raw event `event` is the usage-only chunk; `scratch` joins its `data:` lines.
fn is_usage_only(scratch: &mut Vec<u8>, event: &[u8]) -> bool {
    // Cheap rejections first: with include_usage every other chunk has `"usage":null`.
    if memmem::find(event, b"\"usage\"").is_none()
        || memmem::find(event, b"\"usage\":null").is_some()
    {
        return false;
    }
    scratch.clear();
    let mut lines = 0;
    let mut rest = event;
    while !rest.is_empty() {
        let end = memchr2(b'\n', b'\r', rest).unwrap_or(rest.len());
        let line = &rest[..end];
        if let Some(value) = line.strip_prefix(b"data") {
            if value.is_empty() || value[0] == b':' {
                let value = value.get(1..).unwrap_or(&[]);
                if lines > 0 {
                    scratch.push(b'\n');
                }
                scratch.extend_from_slice(value.strip_prefix(b" ").unwrap_or(value));
                lines += 1;
            }
        }
        rest = &rest[(end + 1).min(rest.len())..];
    }
    #[derive(Deserialize)]
    struct Probe {
        choices: Option<Vec<IgnoredAny>>,
        usage: Option<IgnoredAny>,
    }
    lines > 0
        && serde_json::from_slice::<Probe>(&scratch)
            .is_ok_and(|p| p.usage.is_some() && p.choices.is_some_and(|c| c.is_empty()))
}
