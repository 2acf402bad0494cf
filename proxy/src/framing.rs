//! A guard in front of hyper's HTTP/1 parser that makes ambiguous message framing a 400.
//!
//! hyper resolves a request carrying both `Content-Length` and `Transfer-Encoding: chunked` by
//! ignoring the length and closing the connection afterwards (RFC 9112 §6.3), and it merges two
//! equal `Content-Length` lines. Both are safe for hyper itself, but a proxy should refuse such
//! requests outright: the next hop may read them differently (request smuggling). hyper offers no
//! hook for that, so this reader watches the bytes of each HTTP/1 request head before hyper does,
//! and when a head is ambiguous it neutralises the framing headers so that hyper's own checks
//! answer `400 Bad Request` and close the connection (`Transfer-Encoding: chunked` becomes
//! `Transfer-Encoding: xhunked`, an encoding hyper refuses; a repeated `Content-Length` gets a
//! value that differs from the first). The request never reaches the pipeline, so nothing
//! reaches an upstream.
//!
//! To find the next head on a kept-alive connection the guard follows each body's framing
//! (a length, or chunks). HTTP/2 connections (recognised by their preface) pass through
//! untouched: HTTP/2 frames carry their own lengths, and so do the bytes after a `CONNECT`
//! head (the forward proxy's tunnel).
//!
//! The guard also enforces the request-head deadline (`header_read_timeout`), because hyper's
//! own timer neither covers a connection that never sends a byte nor spares an idle kept-alive
//! one.
//!
//! Only what hyper does not do lives here; each part has an end-to-end test in
//! `tests/tests/proxy_framing.rs` that fails without it (checked by disabling the part):
//! - neutralising `Content-Length` with `Transfer-Encoding`:
//!   `content_length_with_chunked_is_refused_and_nothing_is_smuggled`;
//! - neutralising a repeated, equal `Content-Length` (hyper merges it):
//!   `repeated_content_lengths_are_refused_even_when_equal`;
//! - following each body to find the next head on a kept-alive connection:
//!   `smuggling_behind_a_well_framed_request_on_a_kept_alive_connection_is_refused`;
//! - the head deadline: `a_request_head_sent_too_slowly_is_cut_off` (and
//!   `an_idle_kept_alive_connection_outlives_the_head_timeout` for what it spares).
//!
//! Two different `Content-Length`s and oversized heads are hyper's own 400 and 431;
//! `two_different_content_lengths_are_refused` and `request_head_over_the_limit_answers_431`
//! pin that behaviour.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Where the guard is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
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

/// The I/O wrapper. See the module docs.
pub struct FramingGuard<IO> {
    io: IO,
    state: State,
    /// Bytes read from `io` not yet handed to the reader.
    pending: Vec<u8>,
    /// How many of `pending` are examined and may be handed out.
    ready: usize,
    /// Current line being assembled in the chunked states.
    line: Vec<u8>,
    max_head: usize,
    first: bool,
    /// Time allowed to receive a whole request head: from the connection's start for the first
    /// one, from its first byte for later ones (an idle kept-alive connection may wait).
    head_timeout: std::time::Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<IO> FramingGuard<IO> {
    pub fn new(io: IO, max_head: usize, head_timeout: std::time::Duration) -> Self {
        FramingGuard {
            io,
            state: State::Head,
            pending: Vec::new(),
            ready: 0,
            line: Vec::new(),
            max_head,
            first: true,
            head_timeout,
            deadline: Some(Box::pin(tokio::time::sleep(head_timeout))),
        }
    }

    /// Arms the head deadline while a head is being received, disarms it otherwise.
    fn update_deadline(&mut self) {
        let receiving_head = self.state == State::Head && self.ready < self.pending.len();
        if self.state != State::Head || (!self.first && !receiving_head) {
            self.deadline = None;
        } else if self.deadline.is_none() {
            self.deadline = Some(Box::pin(tokio::time::sleep(self.head_timeout)));
        }
    }

    /// Examines `pending[ready..]`, advancing `ready` over bytes that may be handed out.
    fn examine(&mut self) {
        while self.ready < self.pending.len() {
            let rest = &self.pending[self.ready..];
            match self.state {
                State::Passthrough => {
                    self.ready = self.pending.len();
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
                    // Tolerate the empty lines RFC 9112 §2.2 allows before a request line.
                    let skip = rest.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
                    let head_start = self.ready + skip;
                    let Some(end) = find(&self.pending[head_start..], b"\r\n\r\n") else {
                        if self.pending.len() - head_start > self.max_head {
                            self.state = State::Passthrough;
                        }
                        return;
                    };
                    self.first = false;
                    let head_end = head_start + end + 4;
                    let head = &mut self.pending[head_start..head_end];
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
                    self.ready = head_end;
                }
                State::Body(n) => {
                    let take = (rest.len() as u64).min(n);
                    self.ready += take as usize;
                    self.state = if take == n { State::Head } else { State::Body(n - take) };
                }
                State::ChunkData(n) => {
                    let take = (rest.len() as u64).min(n);
                    self.ready += take as usize;
                    self.state =
                        if take == n { State::ChunkDataEnd } else { State::ChunkData(n - take) };
                }
                State::ChunkSize | State::ChunkDataEnd | State::Trailers => {
                    let b = rest[0];
                    self.ready += 1;
                    self.line.push(b);
                    if self.line.len() > 4096 {
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

impl<IO: AsyncRead + Unpin> AsyncRead for FramingGuard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready > 0 {
                let n = this.ready.min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.drain(..n);
                if this.pending.is_empty() {
                    // A connection that streams a long response holds no head buffer.
                    this.pending = Vec::new();
                }
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            if this.pending.is_empty() {
                match this.state {
                    State::Passthrough => return Pin::new(&mut this.io).poll_read(cx, buf),
                    // Inside a body of known length: read straight into the caller's buffer,
                    // never past the body's end, so no copy is made.
                    State::Body(n) | State::ChunkData(n) => {
                        let limit = (buf.remaining() as u64).min(n) as usize;
                        let mut sub = ReadBuf::new(buf.initialize_unfilled_to(limit));
                        ready!(Pin::new(&mut this.io).poll_read(cx, &mut sub))?;
                        let got = sub.filled().len();
                        if got == 0 {
                            return Poll::Ready(Ok(()));
                        }
                        buf.advance(got);
                        let left = n - got as u64;
                        this.state = match this.state {
                            State::Body(_) if left == 0 => State::Head,
                            State::Body(_) => State::Body(left),
                            _ if left == 0 => State::ChunkDataEnd,
                            _ => State::ChunkData(left),
                        };
                        return Poll::Ready(Ok(()));
                    }
                    _ => {}
                }
            }
            // Uninitialised: zeroing 8 KiB on every read was 10 % of the proxy's instructions.
            let mut chunk = [MaybeUninit::<u8>::uninit(); 8192];
            let mut rb = ReadBuf::uninit(&mut chunk);
            match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let filled = rb.filled();
                    if filled.is_empty() {
                        // EOF: hand over whatever is held (an incomplete head; hyper reports it).
                        this.ready = this.pending.len();
                        if this.ready == 0 {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    this.pending.extend_from_slice(filled);
                    this.examine();
                    this.update_deadline();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if let Some(deadline) = &mut this.deadline {
                        if deadline.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "request head not received in time",
                            )));
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FramingGuard<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Feeds `input` through the guard in pieces of `step` bytes and returns what comes out.
    async fn through(input: &[u8], step: usize) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(64);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in input.chunks(step) {
                client.write_all(piece).await.unwrap();
            }
        });
        let mut guard = FramingGuard::new(server, 64 * 1024, std::time::Duration::from_secs(10));
        let mut out = Vec::new();
        let reader = async {
            let mut buf = [0u8; 7];
            loop {
                let n = guard.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), reader).await;
        writer.await.unwrap();
        out
    }

    const KEEPALIVE: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nworld\r\n0\r\nX-T: 1\r\n\r\n\
GET /c HTTP/1.1\r\nHost: x\r\n\r\n";

    #[tokio::test]
    async fn well_framed_requests_pass_unchanged_in_any_split() {
        for step in [1, 2, 3, 7, 16, 1000] {
            assert_eq!(through(KEEPALIVE, step).await, KEEPALIVE, "step {step}");
        }
    }

    #[tokio::test]
    async fn length_and_chunked_together_become_an_encoding_hyper_refuses() {
        let input = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        for step in [1, 5, 1000] {
            let out = through(input, step).await;
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("Transfer-Encoding: xhunked"), "{text}");
            assert!(text.contains("Content-Length: 4"), "{text}");
        }
    }

    #[tokio::test]
    async fn a_smuggled_second_head_behind_an_ambiguous_one_is_neutralised_too() {
        // The first request is well framed; the ambiguity hides in the second one.
        let input = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi\
POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n";
        let out = String::from_utf8(through(input, 3).await).unwrap();
        assert!(
            out.starts_with("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"),
            "{out}"
        );
        assert!(out.contains("Transfer-Encoding: xhunked"), "{out}");
    }

    #[tokio::test]
    async fn repeated_content_lengths_are_made_to_differ() {
        let input =
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc";
        let out = String::from_utf8(through(input, 4).await).unwrap();
        assert!(out.contains("Content-Length: 3\r\nContent-Length: 9\r\n"), "{out}");
    }

    #[tokio::test]
    async fn http2_passes_through() {
        let input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        assert_eq!(through(input, 3).await, input);
    }

    #[tokio::test]
    async fn bytes_after_a_connect_head_pass_through_untouched() {
        // A TLS ClientHello has no CRLFCRLF; held back as a "head" it would stall the tunnel.
        let input = b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
        for step in [1, 4, 1000] {
            assert_eq!(through(input, step).await, input, "step {step}");
        }
    }
}
