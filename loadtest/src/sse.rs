//! Finds where SSE events end in a response body that arrives in arbitrary pieces, so the
//! generator can timestamp each event as it completes.
//!
//! An event ends at a blank line; `\r` is ignored, so `\n\n` and `\r\n\r\n` both end one.
//! Counts boundaries; never parses or keeps the event text.

/// Push-based event boundary counter; feed it body chunks in order.
#[derive(Clone, Copy, Debug, Default)]
pub struct Boundaries {
    /// The last significant byte seen was a `\n` (a blank line completes an event).
    after_newline: bool,
}

impl Boundaries {
    /// Returns how many events end inside `chunk`.
    pub fn feed(&mut self, chunk: &[u8]) -> u64 {
        let mut ended = 0;
        for &byte in chunk {
            match byte {
                b'\r' => {}
                b'\n' if self.after_newline => {
                    ended += 1;
                    self.after_newline = false;
                }
                b'\n' => self.after_newline = true,
                _ => self.after_newline = false,
            }
        }
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &[u8] =
        b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\nevent: x\ndata: y\n\ndata: [DONE]\n\n";

    #[test]
    fn every_split_of_a_stream_counts_the_same_events() {
        for cut in 0..=STREAM.len() {
            let mut b = Boundaries::default();
            let (head, tail) = STREAM.split_at(cut);
            assert_eq!(b.feed(head) + b.feed(tail), 4, "split at {cut}");
        }
        let mut b = Boundaries::default();
        assert_eq!(STREAM.iter().map(|byte| b.feed(std::slice::from_ref(byte))).sum::<u64>(), 4);
    }

    #[test]
    fn crlf_line_endings_and_single_newlines() {
        let mut b = Boundaries::default();
        assert_eq!(b.feed(b"data: 1\r\n\r\ndata: 2\r\n"), 1);
        assert_eq!(b.feed(b"\r\n"), 1);
        assert_eq!(b.feed(b"event: a\ndata: 3\n"), 0);
    }
}
