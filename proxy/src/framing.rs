//! A guard in front of hyper's HTTP/1 parser that makes ambiguous message framing a 400.
//!
//! hyper resolves a request carrying both `Content-Length` and `Transfer-Encoding: chunked` by
//! ignoring the length and closing the connection afterwards (RFC 9112 §6.3), and it merges two
//! equal `Content-Length` lines; a proxy should refuse both outright (request smuggling). The
//! decisions are the core's [`Framer`] (`core/src/framing.rs`, whose docs list the end-to-end
//! test in `tests/tests/proxy_framing.rs` that justifies each part): it holds back each request
//! head until it is complete, neutralises ambiguous framing headers so that hyper's own checks
//! answer `400 Bad Request`, follows each body to find the next head on a kept-alive
//! connection, and lets HTTP/2 and `CONNECT` tunnels pass through. This reader only feeds it the
//! bytes read from the connection and hands on what it allows.
//!
//! The guard also enforces the request-head deadline (`header_read_timeout`), because hyper's
//! own timer neither covers a connection that never sends a byte nor spares an idle kept-alive
//! one: `a_request_head_sent_too_slowly_is_cut_off` (and
//! `an_idle_kept_alive_connection_outlives_the_head_timeout` for what it spares) fail without it.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tollgate_core::framing::{Framer, State};

/// The HTTP/2 client connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The I/O wrapper. See the module docs.
pub struct FramingGuard<IO> {
    io: IO,
    framer: Framer,
    /// Bytes read from `io` not yet handed to the reader.
    pending: Vec<u8>,
    /// How many of `pending` are examined and may be handed out.
    ready: usize,
    /// Time allowed to receive a whole request head: from the connection's start for the first
    /// one, from its first byte for later ones (an idle kept-alive connection may wait).
    head_timeout: std::time::Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<IO> FramingGuard<IO> {
    pub fn new(io: IO, max_head: usize, head_timeout: std::time::Duration) -> Self {
        FramingGuard {
            io,
            // hyper's read buffer is never below 8 KiB (`max_buf_size` in server.rs), so it may
            // accept a head up to that size: the framer must follow every head hyper can accept.
            framer: Framer::new(max_head.max(8192)),
            pending: Vec::new(),
            ready: 0,
            head_timeout,
            deadline: Some(Box::pin(tokio::time::sleep(head_timeout))),
        }
    }

    /// Arms the head deadline while a head is being received, disarms it otherwise.
    /// Reads the connection's first bytes, without handing any on, until they tell whether it
    /// speaks HTTP/2 (the client connection preface, RFC 9113 §3.4) or HTTP/1, so that the
    /// server hands the connection to the matching hyper connection at once. hyper-util's `auto`
    /// connection tells them apart by reading the first 24 bytes itself and replaying them as a
    /// read of their own, after which hyper's 8 KiB read buffer, holding those 24 bytes, doubles
    /// to 16 KiB for the rest of the head: 8 KiB more for every connection. The head deadline
    /// applies as to any read; the end of the stream counts as HTTP/1 (hyper then reads what
    /// there is, and the end).
    pub async fn starts_http2(&mut self) -> io::Result<bool>
    where
        IO: AsyncRead + Unpin,
    {
        loop {
            let n = self.pending.len().min(H2_PREFACE.len());
            if self.pending[..n] != H2_PREFACE[..n] {
                return Ok(false);
            }
            if n == H2_PREFACE.len() {
                return Ok(true);
            }
            if std::future::poll_fn(|cx| self.poll_fill(cx)).await? == 0 {
                return Ok(false);
            }
        }
    }

    /// Reads what the connection has (at most 8 KiB) into `pending` and examines it; the number
    /// of bytes read, 0 at the end of the stream. Fails once the head deadline has passed.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>>
    where
        IO: AsyncRead + Unpin,
    {
        // Uninitialised: zeroing 8 KiB on every read was 10 % of the proxy's instructions.
        let mut chunk = [MaybeUninit::<u8>::uninit(); 8192];
        let mut rb = ReadBuf::uninit(&mut chunk);
        match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let filled = rb.filled();
                if !filled.is_empty() {
                    self.pending.extend_from_slice(filled);
                    self.framer.examine(&mut self.pending, &mut self.ready);
                    self.update_deadline();
                }
                Poll::Ready(Ok(filled.len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if let Some(deadline) = &mut self.deadline {
                    if deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "request head not received in time",
                        )));
                    }
                }
                Poll::Pending
            }
        }
    }

    fn update_deadline(&mut self) {
        let in_head = self.framer.state() == State::Head;
        let receiving_head = in_head && self.ready < self.pending.len();
        if !in_head || (!self.framer.before_first_head() && !receiving_head) {
            self.deadline = None;
        } else if self.deadline.is_none() {
            self.deadline = Some(Box::pin(tokio::time::sleep(self.head_timeout)));
        }
    }
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
                if this.framer.state() == State::Passthrough {
                    return Pin::new(&mut this.io).poll_read(cx, buf);
                }
                // Inside a body of known length: read straight into the caller's buffer, never
                // past the body's end, so no copy is made (the framer only counts those bytes).
                if let Some(n) = this.framer.body_left() {
                    let limit = (buf.remaining() as u64).min(n) as usize;
                    let mut sub = ReadBuf::new(buf.initialize_unfilled_to(limit));
                    ready!(Pin::new(&mut this.io).poll_read(cx, &mut sub))?;
                    let got = sub.filled().len();
                    if got == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    let mut passed = 0;
                    this.framer.examine(sub.filled_mut(), &mut passed);
                    debug_assert_eq!(passed, got);
                    buf.advance(got);
                    return Poll::Ready(Ok(()));
                }
            }
            if ready!(this.poll_fill(cx))? == 0 {
                // EOF: hand over whatever is held (an incomplete head; hyper reports it).
                this.ready = this.pending.len();
                if this.ready == 0 {
                    return Poll::Ready(Ok(()));
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
    async fn bytes_after_a_connect_head_pass_through_untouched() {
        // A TLS ClientHello has no CRLFCRLF; held back as a "head" it would stall the tunnel.
        let input = b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
        for step in [1, 4, 1000] {
            assert_eq!(through(input, step).await, input, "step {step}");
        }
    }

    /// What `starts_http2` says for `input` written in pieces of `step` bytes (then closed), and
    /// everything the guard hands on afterwards.
    async fn sniff(input: &[u8], step: usize) -> (bool, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(64);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in input.chunks(step) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut guard = FramingGuard::new(server, 64 * 1024, std::time::Duration::from_secs(10));
        let http2 = guard.starts_http2().await.unwrap();
        writer.await.unwrap();
        let mut out = Vec::new();
        guard.read_to_end(&mut out).await.unwrap();
        (http2, out)
    }

    #[tokio::test]
    async fn the_first_bytes_tell_http2_from_http1_and_are_all_handed_on() {
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        let h1 = b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi";
        // A request line that starts like the preface, and one shorter than it.
        let almost = b"PRI * HTTP/1.1\r\nHost: x\r\n\r\n";
        let short = b"GET / HTTP/1.1\r\n\r\n";
        for step in [1, 5, 23, 1000] {
            assert_eq!(sniff(h2, step).await, (true, h2.to_vec()), "h2, step {step}");
            assert_eq!(sniff(h1, step).await, (false, h1.to_vec()), "h1, step {step}");
            assert_eq!(sniff(almost, step).await, (false, almost.to_vec()), "step {step}");
            assert_eq!(sniff(short, step).await, (false, short.to_vec()), "step {step}");
        }
        // The connection closes inside the preface: HTTP/1, and the bytes still reach hyper.
        assert_eq!(sniff(&h2[..10], 3).await, (false, h2[..10].to_vec()));
        assert_eq!(sniff(b"", 1).await, (false, Vec::new()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_is_cut_off_while_sniffing_too() {
        let (_client, server) = tokio::io::duplex(64);
        let mut guard = FramingGuard::new(server, 64 * 1024, std::time::Duration::from_secs(10));
        let err = guard.starts_http2().await.expect_err("the head deadline applies");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
