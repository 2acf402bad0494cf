//! Plain-HTTP (`http://`) upstreams over HTTP/1.1 connections driven by the request's own task.
//!
//! hyper-util's pooled client spawns a task per connection, which hands each body chunk to the
//! response's task over a one-slot channel: the response sees one chunk per wake-up, so a burst
//! of SSE events the upstream wrote together still leaves the proxy as one downstream write per
//! event (and two task switches per event). Here the connection future
//! ([`hyper::client::conn::http1::Connection`]) is polled by whoever waits on it: first the
//! pipeline, while it waits for the response head, then the response body itself
//! ([`OwnBody`]), which polls the connection whenever its channel is empty. Every chunk already
//! read from the socket is therefore ready in the same poll, and
//! [`crate::body::MeteredBody`] joins them into one frame (never waiting for a chunk that is
//! not there yet: the connection is polled, not awaited).
//!
//! The [`Pool`] keeps connections whose response ended cleanly, per `host:port`: at most
//! `max_idle_per_host`, each for at most `idle_timeout`; a connection is checked (polled once)
//! before reuse, a request that a reused connection could not even start is retried once on a
//! fresh one (as hyper-util's client does), and a task closes idle connections that the
//! upstream closed or that outlived the timeout. A body dropped before its end (the client went
//! away, the stream idled out) drops its connection, which closes it, as before.
//!
//! `https://` upstreams stay on the shared client (TLS, HTTP/2 by ALPN); there an HTTP/1.1
//! response still hands over one chunk per wake-up (HTTP/2 was not measured).

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tower_service::Service;

use super::{Body, BoxError, Connector};

type Conn = Pin<Box<http1::Connection<TokioIo<tokio::net::TcpStream>, Body>>>;

/// How often idle connections are checked for being closed or too old.
const REAP_EVERY: Duration = Duration::from_secs(5);

/// A connection and its request handle.
struct Pair {
    sender: http1::SendRequest<Body>,
    conn: Conn,
}

impl Pair {
    /// Polls the connection (it reads a close or an error) and asks whether it takes a request
    /// now. Never waits.
    fn ready_now(&mut self, cx: &mut Context<'_>) -> bool {
        // The second round lets a connection that just finished a response become idle.
        for _ in 0..2 {
            if self.conn.as_mut().poll(cx).is_ready() {
                return false;
            }
            match self.sender.poll_ready(cx) {
                Poll::Ready(Ok(())) => return true,
                Poll::Ready(Err(_)) => return false,
                Poll::Pending => {}
            }
        }
        false
    }

    /// Whether the connection is still open, polled without a waker (for idle ones).
    fn open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        !self.sender.is_closed() && self.conn.as_mut().poll(&mut cx).is_pending()
    }
}

struct Idle {
    pair: Pair,
    since: Instant,
}

/// The keep-alive pool. See the module docs.
pub struct Pool {
    connector: Connector,
    idle: Mutex<HashMap<String, Vec<Idle>>>,
    max_idle_per_host: usize,
    idle_timeout: Duration,
}

impl Pool {
    /// A pool dialling with `connector`; starts its reaper task when called inside a runtime.
    pub fn new(
        connector: Connector,
        max_idle_per_host: usize,
        idle_timeout: Duration,
    ) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            connector,
            idle: Mutex::new(HashMap::new()),
            max_idle_per_host,
            idle_timeout,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&pool);
            runtime.spawn(reap(weak));
        }
        pool
    }

    /// Sends `req` (absolute `http://` URI) and returns the response once its head arrived.
    /// The connection is driven by this future until then, and by the body afterwards.
    pub async fn request(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<Response<OwnBody>, BoxError> {
        let uri = req.uri().clone();
        let authority = uri.authority().ok_or("the upstream URI has no host")?;
        let key = match authority.port_u16() {
            Some(_) => authority.as_str().to_ascii_lowercase(),
            None => format!("{}:80", authority.host().to_ascii_lowercase()),
        };
        let origin = uri.path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = origin.parse::<Uri>()?;
        loop {
            let (mut pair, reused) = match self.checkout(&key).await {
                Some(pair) => (pair, true),
                None => (self.connect(&uri).await?, false),
            };
            let sending = pair.sender.try_send_request(req);
            let mut conn = Some(pair.conn);
            match drive(sending, &mut conn).await {
                Ok(response) => {
                    return Ok(response.map(|incoming| OwnBody {
                        incoming,
                        pair: conn.map(|conn| Pair { sender: pair.sender, conn }),
                        pool: Arc::downgrade(self),
                        key,
                        done: false,
                    }));
                }
                Err(mut e) => match e.take_message() {
                    // The reused connection closed before the request went out: a fresh one.
                    Some(again) if reused => req = again,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }

    async fn connect(&self, uri: &Uri) -> Result<Pair, BoxError> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx)).await?;
        let io = connector.call(uri.clone()).await?;
        let (sender, conn) = http1::handshake(io).await?;
        Ok(Pair { sender, conn: Box::pin(conn) })
    }

    /// The most recently used idle connection to `key` that takes a request now.
    async fn checkout(&self, key: &str) -> Option<Pair> {
        loop {
            let mut idle = {
                let mut map = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
                let list = map.get_mut(key)?;
                let idle = list.pop()?;
                if list.is_empty() {
                    map.remove(key);
                }
                idle
            };
            if idle.since.elapsed() >= self.idle_timeout {
                continue;
            }
            if poll_fn(|cx| Poll::Ready(idle.pair.ready_now(cx))).await {
                return Some(idle.pair);
            }
        }
    }

    /// Keeps a connection whose response ended, unless it is closing.
    fn checkin(&self, key: String, mut pair: Pair) {
        if self.max_idle_per_host == 0 || !pair.open() {
            return;
        }
        let mut map = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = map.entry(key).or_default();
        let now = Instant::now();
        list.retain(|i| now.duration_since(i.since) < self.idle_timeout);
        if list.len() >= self.max_idle_per_host {
            list.remove(0);
        }
        list.push(Idle { pair, since: now });
    }

    /// Drops idle connections that are closed or too old.
    fn reap(&self) {
        let now = Instant::now();
        let mut map = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        for list in map.values_mut() {
            list.retain_mut(|i| now.duration_since(i.since) < self.idle_timeout && i.pair.open());
        }
        map.retain(|_, list| !list.is_empty());
    }

    /// Idle connections held (tests).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).values().map(Vec::len).sum()
    }
}

async fn reap(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(REAP_EVERY).await;
        match pool.upgrade() {
            Some(pool) => pool.reap(),
            None => return,
        }
    }
}

/// Polls `future` and the connection together until the future is done. A connection that
/// ends is dropped (its pending request then fails with hyper's error).
async fn drive<F: Future>(future: F, conn: &mut Option<Conn>) -> F::Output {
    let mut future = std::pin::pin!(future);
    poll_fn(|cx| loop {
        if let Poll::Ready(out) = future.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        match conn {
            Some(c) => {
                if c.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                *conn = None;
            }
            None => return Poll::Pending,
        }
    })
    .await
}

/// A response body that drives its own connection. See the module docs.
pub struct OwnBody {
    incoming: Incoming,
    /// `None` once the connection ended (then `incoming` has its end or error).
    pair: Option<Pair>,
    pool: Weak<Pool>,
    key: String,
    /// The body was read to its end: the connection may be reused.
    done: bool,
}

impl HttpBody for OwnBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let mut drove = false;
        loop {
            match Pin::new(&mut this.incoming).poll_frame(cx) {
                Poll::Ready(None) => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Ok(frame))) => {
                    this.done = this.incoming.is_end_stream();
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.pair = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Pending if drove => return Poll::Pending,
                Poll::Pending => {}
            }
            // Nothing in the channel: let the connection decode what it has read, or read.
            drove = true;
            let Some(pair) = this.pair.as_mut() else { return Poll::Pending };
            if pair.conn.as_mut().poll(cx).is_ready() {
                // The connection ended; the body has its end or its error now.
                this.pair = None;
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

impl Drop for OwnBody {
    fn drop(&mut self) {
        let done = self.done || self.incoming.is_end_stream();
        if let (true, Some(pair), Some(pool)) = (done, self.pair.take(), self.pool.upgrade()) {
            pool.checkin(std::mem::take(&mut self.key), pair);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::upstream::ClientSettings;

    fn pool() -> Arc<Pool> {
        let settings = ClientSettings::default();
        Pool::new(super::super::connector(&settings), 4, Duration::from_secs(30))
    }

    fn get(addr: std::net::SocketAddr) -> Request<Body> {
        let mut req = Request::new(crate::deny::full(Bytes::new()));
        *req.uri_mut() = format!("http://{addr}/x").parse().unwrap();
        req.headers_mut().insert(http::header::HOST, addr.to_string().parse().unwrap());
        req
    }

    /// Reads one request head; `false` when the connection closed instead.
    async fn read_head(stream: &mut TcpStream) -> bool {
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut buf = [0u8; 1024];
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        true
    }

    /// An upstream answering every request on a connection with `answer`, then (when
    /// `close_after` is set) closing it after that many; counts connections.
    async fn upstream(
        answer: &'static [u8],
        close_after: Option<usize>,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut served = 0;
                    while read_head(&mut stream).await {
                        stream.write_all(answer).await.unwrap();
                        served += 1;
                        if close_after == Some(served) {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn body_of(pool: &Arc<Pool>, addr: std::net::SocketAddr) -> Bytes {
        let response = pool.request(get(addr)).await.unwrap();
        response.into_body().collect().await.unwrap().to_bytes()
    }

    const LENGTH: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    const CHUNKED: &[u8] =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n3\r\n!!!\r\n0\r\n\r\n";

    #[tokio::test]
    async fn a_connection_is_reused_after_a_complete_response() {
        for (answer, body) in [(LENGTH, &b"ok"[..]), (CHUNKED, &b"ok!!!"[..])] {
            let (addr, accepted) = upstream(answer, None).await;
            let pool = pool();
            for _ in 0..3 {
                assert_eq!(body_of(&pool, addr).await, body);
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 1, "{}", String::from_utf8_lossy(answer));
            assert_eq!(pool.idle_count(), 1);
        }
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_not_reused() {
        let (addr, accepted) = upstream(LENGTH, Some(1)).await;
        let pool = pool();
        assert_eq!(body_of(&pool, addr).await, "ok");
        // Let the close arrive, then ask again: a fresh connection answers.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(body_of(&pool, addr).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            assert!(read_head(&mut stream).await);
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n")
                .await
                .unwrap();
            // The proxy hangs up: the read sees the end of the connection.
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
                .await
                .expect("closed within 5 s")
                .unwrap();
        });
        let pool = pool();
        let mut body = pool.request(get(addr)).await.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "ok");
        drop(body);
        server.await.unwrap();
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn chunks_read_together_are_ready_together() {
        // Three chunks in one write: after the first frame, the next two are ready without
        // waiting (the body polls its connection), which is what lets them be joined.
        let (addr, _) = upstream(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n1\r\nb\r\n1\r\nc\r\n0\r\n\r\n",
            None,
        )
        .await;
        let pool = pool();
        let mut body = pool.request(get(addr)).await.unwrap().into_body();
        let mut cx = Context::from_waker(Waker::noop());
        let mut ready = Vec::new();
        // Give the bytes time to arrive, then poll without ever waiting.
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Poll::Ready(Some(frame)) = Pin::new(&mut body).poll_frame(&mut cx) {
            ready.push(frame.unwrap().into_data().unwrap());
        }
        assert_eq!(ready, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_an_error() {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        assert!(pool().request(get(closed)).await.is_err());
    }
}
