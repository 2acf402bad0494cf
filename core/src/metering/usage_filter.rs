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
        if chunk.is_empty() {
            return;
        }
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
        && serde_json::from_slice::<Probe>(scratch)
            .is_ok_and(|p| p.usage.is_some() && p.choices.is_some_and(|c| c.is_empty()))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;

    fn run<'a>(chunks: impl IntoIterator<Item = &'a [u8]>, max: usize) -> (Vec<u8>, u64) {
        let mut f = UsageChunkFilter::with_max_event(max);
        let mut out = Vec::new();
        for c in chunks {
            f.filter(c, &mut out);
        }
        f.finish(&mut out);
        (out, f.removed())
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/fixtures/metering/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(path).expect("fixture")
    }

    #[test]
    fn usage_chunk_of_a_real_stream_is_removed_and_nothing_else() {
        let stream = fixture("openai_chat_stream_usage.sse");
        let text = String::from_utf8(stream.clone()).expect("utf-8");
        let start = text.rfind("data: {\"id\"").expect("usage chunk");
        assert!(text[start..].contains("\"choices\":[],\"usage\":{"));
        let end = start + text[start..].find("\n\n").expect("end") + 2;
        let want = [&stream[..start], &stream[end..]].concat();
        for size in [1, 2, 3, 64, stream.len()] {
            assert_eq!(run(stream.chunks(size), 1 << 20), (want.clone(), 1), "chunks of {size}");
        }
    }

    #[test]
    fn stream_without_usage_chunk_passes_unchanged() {
        let stream = fixture("openai_chat_stream_no_usage.sse");
        assert_eq!(run(stream.chunks(5), 1 << 20), (stream, 0));
    }

    #[test]
    fn chunks_that_are_not_usage_only_are_kept() {
        let cases = [
            "data: {\"choices\":[],\"usage\":null}\n\n",
            "data: {\"choices\": [], \"usage\": null}\n\n",
            "data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"prompt_tokens\":1}}\n\n",
            "data: {\"usage\":{\"prompt_tokens\":1}}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt\n\n",
            ": comment mentioning \"usage\"\n\n",
        ];
        for case in cases {
            assert_eq!(run([case.as_bytes()], 1024), (case.as_bytes().to_vec(), 0), "{case}");
        }
    }

    #[test]
    fn event_larger_than_the_limit_streams_through() {
        let pad = "p".repeat(200);
        let ev = format!(
            "data: {{\"pad\":\"{pad}\",\"choices\":[],\"usage\":{{\"prompt_tokens\":1}}}}\n\n"
        );
        for size in [1, 7, ev.len()] {
            assert_eq!(run(ev.as_bytes().chunks(size), 64), (ev.clone().into_bytes(), 0));
        }
    }

    #[test]
    fn crlf_split_by_an_empty_chunk_stays_with_the_removed_event() {
        let usage = &b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\r\n\r"[..];
        let chunks = [usage, b"", b"\ndata: [DONE]\r\n\r\n"];
        assert_eq!(run(chunks, 1024), (b"data: [DONE]\r\n\r\n".to_vec(), 1));
    }

    #[test]
    fn unterminated_last_event_is_flushed_at_finish() {
        assert_eq!(run([&b"data: [DONE]\n"[..]], 64), (b"data: [DONE]\n".to_vec(), 0));
        let usage = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}";
        assert_eq!(run([&usage[..]], 1024), (Vec::new(), 1));
    }

    const EOLS: [&str; 3] = ["\n", "\r\n", "\r"];

    /// One generated event (its bytes) in a line-ending style; `usage` selects the usage chunk.
    fn event(kind: u8, eol: &str, extra_blank: bool, usage: bool) -> String {
        let lines: Vec<String> = if usage {
            match kind % 2 {
                0 => vec![r#"data: {"id":"c","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3}}"#.into()],
                _ => vec!["id: 7".into(), r#"data: {"choices":[],"#.into(), r#"data:"usage":{"prompt_tokens":9}}"#.into()],
            }
        } else {
            match kind % 5 {
                0 => {
                    vec![r#"data: {"choices":[{"delta":{"content":"héllo"}}],"usage":null}"#.into()]
                }
                1 => vec![
                    "event: x".into(),
                    r#"data: {"choices":"#.into(),
                    r#"data: [],"usage":null}"#.into(),
                ],
                2 => vec![": keep-alive".into()],
                3 => vec!["data: [DONE]".into()],
                _ => vec![r#"data: {"choices":[{"delta":{}}],"usage":{"total_tokens":1}}"#.into()],
            }
        };
        let mut s = String::new();
        for l in lines {
            s.push_str(&l);
            s.push_str(eol);
        }
        s.push_str(eol);
        if extra_blank {
            s.push_str(eol);
        }
        s
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_chunking_removes_exactly_the_usage_chunk(
            events in prop::collection::vec((any::<u8>(), 0usize..3, any::<bool>()), 0..12),
            usage_at in any::<Index>(),
            usage_kind in any::<u8>(),
            usage_eol in 0usize..3,
            cuts in prop::collection::vec(any::<Index>(), 0..30),
        ) {
            let at = usage_at.index(events.len() + 1);
            let mut stream = String::new();
            let mut want = String::new();
            for (i, (kind, eol, blank)) in events.iter().enumerate() {
                if i == at {
                    stream.push_str(&event(usage_kind, EOLS[usage_eol], false, true));
                }
                let e = event(*kind, EOLS[*eol], *blank, false);
                stream.push_str(&e);
                want.push_str(&e);
            }
            if at == events.len() {
                stream.push_str(&event(usage_kind, EOLS[usage_eol], false, true));
            }
            let bytes = stream.as_bytes();
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut prev = 0;
            for p in points.into_iter().chain([bytes.len()]) {
                chunks.push(&bytes[prev..p]);
                prev = p;
            }
            let (out, removed) = run(chunks, 1 << 20);
            prop_assert_eq!(String::from_utf8(out).expect("utf-8"), want);
            prop_assert_eq!(removed, 1);
        }
    }
}
