//! HTTP/1 request framing, followed byte by byte, with ambiguous heads made unacceptable.
//!
//! hyper resolves a request carrying both `Content-Length` and `Transfer-Encoding: chunked` by
//! ignoring the length and closing the connection afterwards (RFC 9112 §6.3), and it merges two
//! equal `Content-Length` lines. Both are safe for hyper itself, but a proxy should refuse such
//! requests outright: the next hop may read them differently (request smuggling). hyper offers no
//! hook for that, so the proxy's reader (`FramingGuard` in `proxy/src/framing.rs`) passes the
//! bytes of each connection through a [`Framer`] before hyper sees them. The framer holds back
//! each HTTP/1 request head until it is complete, and when a head is ambiguous it neutralises
//! the framing headers so that hyper's own checks answer `400 Bad Request` and close the
//! connection (`Transfer-Encoding: chunked` becomes `Transfer-Encoding: xhunked`, an encoding
//! hyper refuses; a repeated `Content-Length` gets a value that differs from the first). The
//! request never reaches the pipeline, so nothing reaches an upstream.
//!
//! To find the next head on a kept-alive connection the framer follows each body's framing
//! (a length, or chunks). HTTP/2 connections (recognised by their preface) pass through
//! untouched: HTTP/2 frames carry their own lengths, and so do the bytes after a `CONNECT`
//! head (the forward proxy's tunnel).
//!
//! The framer is pure (no I/O, no clock): it is given the bytes read so far and says how many
//! may be handed on. What it decides depends only on the bytes, never on how they were split
//! into reads; the property tests here and the `framing` fuzz target check that.
//!
//! Only what hyper does not do lives here; each part has an end-to-end test in
//! `tests/tests/proxy_framing.rs` that fails without it (checked by disabling the part):
//! - neutralising `Content-Length` with `Transfer-Encoding`:
//!   `content_length_with_chunked_is_refused_and_nothing_is_smuggled`;
//! - neutralising a repeated, equal `Content-Length` (hyper merges it):
//!   `repeated_content_lengths_are_refused_even_when_equal`;
//! - following each body to find the next head on a kept-alive connection:
//!   `smuggling_behind_a_well_framed_request_on_a_kept_alive_connection_is_refused`.
//!
//! Two different `Content-Length`s and oversized heads are hyper's own 400 and 431;
//! `two_different_content_lengths_are_refused` and `request_head_over_the_limit_answers_431`
//! pin that behaviour.

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Longest chunk-size or trailer line followed; a longer one stops the following (hyper refuses
/// such a line too).
const MAX_CHUNK_LINE: usize = 4096;

/// Where the framer is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Collecting a request head (bytes are held back until it is complete).
    Head,
    /// Passing `n` more body bytes.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Passing `n` chunk bytes, then the CRLF after them.
    ChunkData(u64),
    ChunkDataEnd,
    /// Reading trailer lines after the last chunk, until an empty line.
    Trailers,
    /// Not HTTP/1 (HTTP/2), or the stream is no longer followed (a head too large for us, which
    /// hyper rejects itself): pass everything through.
    Passthrough,
}

/// Follows the request framing of one connection. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Framer {
    state: State,
    /// Current line being assembled in the chunked states.
    line: Vec<u8>,
    max_head: usize,
    /// No request head has been completed yet (the HTTP/2 preface may still come).
    first: bool,
}

impl Framer {
    /// A framer for a new connection whose request heads may be up to `max_head` bytes long
    /// (longer ones are hyper's 431; the framer stops following the connection then).
    pub fn new(max_head: usize) -> Framer {
        Framer { state: State::Head, line: Vec::new(), max_head, first: true }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Whether no request head has been completed on this connection yet.
    pub fn before_first_head(&self) -> bool {
        self.first
    }

    /// Inside a body or chunk of known length: how many more bytes may pass without being
    /// examined one by one (the caller may read that many straight into its reader's buffer;
    /// it must still pass them to [`Framer::examine`], which then only counts them).
    pub fn body_left(&self) -> Option<u64> {
        match self.state {
            State::Body(n) | State::ChunkData(n) => Some(n),
            _ => None,
        }
    }

    /// Examines `pending[*ready..]`, advancing `*ready` over the bytes that may be handed on; a
    /// head that is ambiguous is rewritten in place first. Bytes past `*ready` are held: the
    /// caller passes them again, with whatever it reads next appended. Between calls the caller
    /// may remove a prefix of `pending[..*ready]` (what it handed on) if it lowers `*ready` by
    /// as much. `*ready` never decreases and never exceeds `pending.len()`.
    pub fn examine(&mut self, pending: &mut [u8], ready: &mut usize) {
        debug_assert!(*ready <= pending.len());
        while *ready < pending.len() {
            let rest = &pending[*ready..];
            match self.state {
                State::Passthrough => {
                    *ready = pending.len();
                }
                State::Head => {
                    if self.first {
                        let n = rest.len().min(H2_PREFACE.len());
                        if rest[..n] == H2_PREFACE[..n] {
                            if n < H2_PREFACE.len() {
                                return; // need more bytes to tell
                            }
                            self.state = State::Passthrough;
                            continue;
                        }
                    }
                    // Only the first `max_head` bytes are looked at, so that whether a head is
                    // followed depends on the bytes and not on how they were split into reads.
                    let window = &rest[..rest.len().min(self.max_head)];
                    // Tolerate the empty lines RFC 9112 §2.2 allows before a request line (they
                    // count towards the limit, as they do in hyper's buffer).
                    let skip = window.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
                    let head_start = *ready + skip;
                    let Some(end) = find(&window[skip..], b"\r\n\r\n") else {
                        if window.len() < self.max_head {
                            return; // wait for the rest of the head
                        }
                        // Too large for us (and for hyper, which answers 431): hand it on now.
                        self.state = State::Passthrough;
                        continue;
                    };
                    self.first = false;
                    let head_end = head_start + end + 4;
                    let head = &mut pending[head_start..head_end];
                    // After a CONNECT the connection carries a tunnel (TLS, usually), not HTTP/1
                    // heads; a refused CONNECT closes the connection.
                    let connect = head.starts_with(b"CONNECT ");
                    self.state = match neutralise(head) {
                        _ if connect => State::Passthrough,
                        Framing::Length(0) | Framing::None => State::Head,
                        Framing::Length(n) => State::Body(n),
                        Framing::Chunked => State::ChunkSize,
                        Framing::Refused => State::Passthrough,
                    };
                    *ready = head_end;
                }
                State::Body(n) => {
                    let take = (rest.len() as u64).min(n);
                    *ready += take as usize;
                    self.state = if take == n { State::Head } else { State::Body(n - take) };
                }
                State::ChunkData(n) => {
                    let take = (rest.len() as u64).min(n);
                    *ready += take as usize;
                    self.state =
                        if take == n { State::ChunkDataEnd } else { State::ChunkData(n - take) };
                }
                State::ChunkSize | State::ChunkDataEnd | State::Trailers => {
                    let b = rest[0];
                    *ready += 1;
                    self.line.push(b);
                    if self.line.len() > MAX_CHUNK_LINE {
                        // Not a chunk line hyper would accept either; stop following.
                        self.state = State::Passthrough;
                        continue;
                    }
                    if b != b'\n' {
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    let text =
                        line.strip_suffix(b"\r\n").or(line.strip_suffix(b"\n")).unwrap_or(&line);
                    self.state = match self.state {
                        State::ChunkDataEnd => State::ChunkSize,
                        State::Trailers if text.is_empty() => State::Head,
                        State::Trailers => State::Trailers,
                        _ => {
                            let size = text.split(|&c| c == b';').next().unwrap_or(b"");
                            match std::str::from_utf8(size)
                                .ok()
                                .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                            {
                                Some(0) => State::Trailers,
                                Some(n) => State::ChunkData(n),
                                None => State::Passthrough,
                            }
                        }
                    };
                }
            }
        }
    }
}

enum Framing {
    None,
    Length(u64),
    Chunked,
    /// The head was made unacceptable to hyper; what follows is not followed.
    Refused,
}

/// Reads a request head's framing headers; rewrites them in place when they are ambiguous.
fn neutralise(head: &mut [u8]) -> Framing {
    let mut lengths: Vec<(usize, usize)> = Vec::new(); // value ranges
    let mut chunked: Option<(usize, usize)> = None;
    let mut te = false;
    let mut pos = match find(head, b"\r\n") {
        Some(i) => i + 2,
        None => return Framing::None,
    };
    while pos < head.len() {
        let Some(len) = find(&head[pos..], b"\r\n") else { break };
        let line = &head[pos..pos + len];
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            let name = &line[..colon];
            let vstart = pos + colon + 1;
            let vend = pos + len;
            if name.eq_ignore_ascii_case(b"content-length") {
                lengths.push((vstart, vend));
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                te = true;
                let v = &head[vstart..vend];
                if let Some(i) = find_ci(v, b"chunked") {
                    chunked = Some((vstart + i, vstart + i + 7));
                }
            }
        }
        pos += len + 2;
    }
    if te && !lengths.is_empty() {
        match chunked {
            // hyper refuses a transfer coding other than chunked with 400.
            Some((s, _)) => head[s] = b'x',
            None => return Framing::Refused, // hyper already answers 400
        }
        return Framing::Refused;
    }
    if lengths.len() > 1 {
        // Make the repeated value differ from the first (hyper answers 400 for that).
        let (s, e) = lengths[1];
        if let Some(i) = head[s..e].iter().position(u8::is_ascii_digit) {
            let d = &mut head[s + i];
            *d = if *d == b'9' { b'8' } else { b'9' };
        }
        return Framing::Refused;
    }
    if let Some(&(s, e)) = lengths.first() {
        // A list in one field (`Content-Length: 3, 3`): made invalid, which hyper refuses.
        if let Some(i) = head[s..e].iter().position(|&b| b == b',') {
            head[s + i] = b'x';
            return Framing::Refused;
        }
    }
    if te {
        return if chunked.is_some() { Framing::Chunked } else { Framing::Refused };
    }
    match lengths.first() {
        Some(&(s, e)) => {
            match std::str::from_utf8(&head[s..e]).ok().and_then(|v| v.trim().parse().ok()) {
                Some(n) => Framing::Length(n),
                None => Framing::Refused, // hyper answers 400 for an invalid length
            }
        }
        None => Framing::None,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn find_ci(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w.eq_ignore_ascii_case(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` through a framer in pieces of `step` bytes, the way the proxy's reader does
    /// (handing on what is ready, holding the rest), and returns what was handed on, what is
    /// still held, and the framer.
    fn feed(input: &[u8], step: usize, max_head: usize) -> (Vec<u8>, Vec<u8>, Framer) {
        let mut framer = Framer::new(max_head);
        let mut pending = Vec::new();
        let mut out = Vec::new();
        for piece in input.chunks(step.max(1)) {
            pending.extend_from_slice(piece);
            let mut ready = 0;
            framer.examine(&mut pending, &mut ready);
            out.extend(pending.drain(..ready));
        }
        (out, pending, framer)
    }

    /// What comes out, checked to be the same for every split.
    fn through(input: &[u8]) -> Vec<u8> {
        let (whole, held, framer) = feed(input, input.len(), 64 * 1024);
        for step in [1, 2, 3, 5, 7, 16, 100] {
            let split = feed(input, step, 64 * 1024);
            assert_eq!((&split.0, &split.1, &split.2), (&whole, &held, &framer), "step {step}");
        }
        assert!(held.is_empty(), "held back: {:?}", String::from_utf8_lossy(&held));
        whole
    }

    const KEEPALIVE: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nworld\r\n0\r\nX-T: 1\r\n\r\n\
GET /c HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn well_framed_requests_pass_unchanged_and_the_next_head_is_awaited() {
        assert_eq!(through(KEEPALIVE), KEEPALIVE);
        let (_, _, framer) = feed(KEEPALIVE, 3, 1024);
        assert_eq!(framer.state(), State::Head);
        assert!(!framer.before_first_head());
    }

    #[test]
    fn an_incomplete_head_is_held_back() {
        let (out, held, framer) = feed(b"POST /a HTTP/1.1\r\nHost: x\r\n", 4, 1024);
        assert!(out.is_empty());
        assert_eq!(held, b"POST /a HTTP/1.1\r\nHost: x\r\n");
        assert_eq!(framer.state(), State::Head);
        assert!(framer.before_first_head());
    }

    #[test]
    fn bodies_and_chunks_are_followed() {
        let head = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc";
        let (_, _, framer) = feed(head, 5, 1024);
        assert_eq!(framer.state(), State::Body(7));
        assert_eq!(framer.body_left(), Some(7));
        let chunked = b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabcd";
        let (_, _, framer) = feed(chunked, 5, 1024);
        assert_eq!(framer.state(), State::ChunkData(12));
        let trailers = b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n";
        assert_eq!(feed(trailers, 5, 1024).2.state(), State::Trailers);
    }

    #[test]
    fn length_and_chunked_together_become_an_encoding_hyper_refuses() {
        let input = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let text = String::from_utf8(through(input)).unwrap();
        assert!(text.contains("Transfer-Encoding: xhunked"), "{text}");
        assert!(text.contains("Content-Length: 4"), "{text}");
        assert_eq!(feed(input, 1, 1024).2.state(), State::Passthrough);
    }

    #[test]
    fn a_smuggled_second_head_behind_a_well_framed_one_is_neutralised() {
        let input = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi\
POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n";
        let out = String::from_utf8(through(input)).unwrap();
        assert!(
            out.starts_with("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"),
            "{out}"
        );
        assert!(out.contains("Transfer-Encoding: xhunked"), "{out}");
    }

    #[test]
    fn repeated_content_lengths_are_made_to_differ() {
        let input =
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc";
        let out = String::from_utf8(through(input)).unwrap();
        assert!(out.contains("Content-Length: 3\r\nContent-Length: 9\r\n"), "{out}");
        let nines =
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\nContent-Length: 9\r\n\r\nabc";
        let out = String::from_utf8(through(nines)).unwrap();
        assert!(out.contains("Content-Length: 9\r\nContent-Length: 8\r\n"), "{out}");
    }

    #[test]
    fn a_list_in_one_content_length_is_made_invalid() {
        let input = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc";
        let out = String::from_utf8(through(input)).unwrap();
        assert!(out.contains("Content-Length: 3x 3\r\n"), "{out}");
    }

    #[test]
    fn http2_passes_through() {
        let input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        assert_eq!(through(input), input);
        assert_eq!(feed(input, 1, 1024).2.state(), State::Passthrough);
        // A prefix of the preface is held until it can be told apart.
        let (out, held, _) = feed(b"PRI * HTTP", 3, 1024);
        assert!(out.is_empty());
        assert_eq!(held, b"PRI * HTTP");
    }

    #[test]
    fn bytes_after_a_connect_head_pass_through_untouched() {
        // A TLS ClientHello has no CRLFCRLF; held back as a "head" it would stall the tunnel.
        let input = b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
        assert_eq!(through(input), input);
    }

    #[test]
    fn a_head_over_the_limit_is_not_followed_however_it_arrives() {
        // 38 bytes against a limit of 30. Found by the split property test: the limit was only
        // checked while the head was incomplete, so a head that came in one read was followed
        // and the same head in two reads was not; and a head found too large was held back
        // until the next read instead of being handed on.
        let input = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPOST";
        for step in [1, 10, 20, input.len()] {
            let (out, held, framer) = feed(input, step, 30);
            assert_eq!((out.as_slice(), held.len()), (&input[..], 0), "step {step}");
            assert_eq!(framer.state(), State::Passthrough, "step {step}");
        }
        // Up to the limit it is followed, also in one read.
        let (out, held, framer) = feed(input, input.len(), 38);
        assert_eq!((out.len(), held.as_slice()), (41, &b"POST"[..]));
        assert_eq!(framer.state(), State::Head);
    }

    #[test]
    fn empty_lines_before_a_head_count_towards_the_limit() {
        // Without a limit on them, a client could make the framer hold any number of bytes.
        let input = b"\r\n".repeat(40);
        let (out, held, framer) = feed(&input, 7, 64);
        assert_eq!((out.len(), held.len()), (80, 0));
        assert_eq!(framer.state(), State::Passthrough);
        let (out, held, _) = feed(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n", 1, 64);
        assert_eq!((out.len(), held.len()), (22, 0));
    }

    mod split {
        use super::*;
        use proptest::prelude::*;

        /// Streams built from pieces that exercise every state: heads with each framing, bodies,
        /// chunk lines, trailers, the preface, CONNECT, and noise.
        fn piece() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                Just(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n".to_vec()),
                Just(b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()),
                Just(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
                Just(
                    b"POST /c HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\n".to_vec()
                ),
                Just(
                    b"POST /d HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
                        .to_vec()
                ),
                Just(b"CONNECT h:443 HTTP/1.1\r\n\r\n".to_vec()),
                Just(b"PRI * HTTP/2.0\r\n".to_vec()),
                Just(b"5;e=1\r\n".to_vec()),
                Just(b"0\r\n".to_vec()),
                Just(b"X-T: 1\r\n".to_vec()),
                Just(b"\r\n".to_vec()),
                proptest::collection::vec(any::<u8>(), 0..12),
                proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'\r'), Just(b'\n')], 0..12),
            ]
        }

        fn stream() -> impl Strategy<Value = Vec<u8>> {
            proptest::collection::vec(piece(), 0..12).prop_map(|p| p.concat())
        }

        /// Feeds `input` in reads of the given sizes (cycled), handing on at most `handout`
        /// ready bytes after each read.
        fn feed_split(
            input: &[u8],
            max_head: usize,
            sizes: &[usize],
            handout: usize,
        ) -> (Vec<u8>, Vec<u8>, Framer) {
            let mut framer = Framer::new(max_head);
            let (mut pending, mut ready, mut out, mut at) = (Vec::new(), 0, Vec::new(), 0);
            for &size in sizes.iter().cycle() {
                if at == input.len() {
                    break;
                }
                let size = size.clamp(1, input.len() - at);
                pending.extend_from_slice(&input[at..at + size]);
                at += size;
                let before = ready;
                framer.examine(&mut pending, &mut ready);
                assert!(before <= ready && ready <= pending.len());
                let n = ready.min(handout);
                out.extend(pending.drain(..n));
                ready -= n;
            }
            out.extend(pending.drain(..ready));
            (out, pending, framer)
        }

        proptest! {
            #[test]
            fn the_split_changes_nothing(
                input in stream(),
                max_head in 0usize..200,
                sizes in proptest::collection::vec(1usize..40, 1..6),
                handout in 1usize..50,
            ) {
                let whole = feed(&input, input.len(), max_head);
                prop_assert_eq!(whole.0.len() + whole.1.len(), input.len());
                prop_assert_eq!(&whole.1[..], &input[whole.0.len()..]);
                let split = feed_split(&input, max_head, &sizes, handout);
                prop_assert_eq!(&split, &whole);
                prop_assert_eq!(&feed(&input, 1, max_head), &whole);
            }
        }
    }
}
