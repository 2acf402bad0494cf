//! Accepting connections: one hyper HTTP/1.1 or HTTP/2 connection per socket (told from its first
//! bytes), with limits against abuse and graceful shutdown.
//!
//! `serve` takes an already bound listener and a shutdown future (mini-redis style) so that tests
//! bind `127.0.0.1:0` and stop the server when they want. On shutdown it stops accepting, lets
//! in-flight requests finish for up to `drain`, then drops the rest.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::framing::FramingGuard;
use crate::upstream::{Body, BoxError};

/// Binds `addr` with the longest accept queue the kernel allows (`net.core.somaxconn` caps the
/// request), as Envoy does: a burst of connections, such as a thousand agents starting at once,
/// waits in the queue instead of overflowing it and retrying a second later (tokio's default
/// queue is 1,024).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(65_535)
}

/// Connection-level limits.
#[derive(Clone, Debug)]
pub struct ConnLimits {
    /// Largest request head (request line + headers) in bytes; larger → 431 from hyper.
    pub max_head_bytes: usize,
    /// Most header fields in one request.
    pub max_headers: usize,
    /// Time allowed to receive a complete request head (slowloris guard).
    pub header_read_timeout: Duration,
    /// How long in-flight requests may run after shutdown begins.
    pub drain: Duration,
    /// Connections served at once; beyond, a new connection gets [`OVERLOADED`] and is closed.
    pub max_connections: usize,
    /// Counts connections shed at `max_connections`.
    pub shed: Option<prometheus::IntCounter>,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_head_bytes: 64 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            drain: Duration::from_secs(30),
            max_connections: 4096,
            shed: None,
        }
    }
}

/// Something that answers requests; implemented by the proxy and the admin API.
pub trait Handler: Clone + Send + Sync + 'static {
    fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<Body>> + Send;
}

/// The HTTP/1.1 and HTTP/2 connection builders with `limits`, shared by the listener and the
/// connections the forward proxy intercepts. A connection is handed to one of them, picked from
/// its first bytes ([`FramingGuard::starts_http2`]), instead of to hyper-util's `auto`
/// connection, which reads those bytes itself and costs every HTTP/1 connection a read buffer
/// twice the size.
pub struct Builders {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

impl Builders {
    pub fn new(limits: &ConnLimits) -> Builders {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            // The head deadline is enforced by `FramingGuard`, which (unlike hyper's timer)
            // also covers a connection that never sends a byte and spares idle kept-alive
            // connections.
            .header_read_timeout(None)
            .max_buf_size(limits.max_head_bytes.max(8192))
            .max_headers(limits.max_headers)
            .keep_alive(true);
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new()).max_header_list_size(limits.max_head_bytes as u32);
        Builders { http1, http2 }
    }

    /// Serves `guard`'s connection with `service` to its end: HTTP/2 or HTTP/1 (with upgrades,
    /// for `CONNECT`), told from the first bytes, shut down gracefully once `stopping` turns
    /// true (a connection that sends nothing before that is dropped).
    pub async fn serve<IO, S>(
        &self,
        mut guard: FramingGuard<IO>,
        service: S,
        mut stopping: watch::Receiver<bool>,
    ) -> Result<(), BoxError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::HttpService<Incoming, ResBody = Body>,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let http2 = tokio::select! {
            http2 = guard.starts_http2() => http2?,
            _ = stopping.wait_for(|stop| *stop) => return Ok(()),
        };
        let io = TokioIo::new(guard);
        if http2 {
            until_drained(self.http2.serve_connection(io, service), stopping).await?;
        } else {
            until_drained(self.http1.serve_connection(io, service).with_upgrades(), stopping)
                .await?;
        }
        Ok(())
    }
}

/// A connection that can be asked to finish what it has in flight and close.
trait Graceful: Future<Output = hyper::Result<()>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl<I, S, B, E> Graceful for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self);
    }
}

/// Runs `conn` to its end, shutting it down gracefully once `stopping` turns true (what
/// hyper-util's `GracefulShutdown` does; holding `stopping` until the end is what the drain
/// waits for).
async fn until_drained<C: Graceful>(
    conn: C,
    mut stopping: watch::Receiver<bool>,
) -> hyper::Result<()> {
    tokio::pin!(conn);
    tokio::select! {
        ended = conn.as_mut() => return ended,
        _ = stopping.wait_for(|stop| *stop) => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// The answer to a connection beyond `max_connections`, written before anything is read (the
/// OpenAI error shape, which the Anthropic SDKs also read as a retryable 503).
pub const OVERLOADED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
x-tollgate-decision: deny\r\n\
x-tollgate-reason: overloaded\r\n\
connection: close\r\n\
content-length: 121\r\n\r\n\
{\"error\":{\"code\":\"overloaded\",\"message\":\"too many connections (limits.max_connections)\",\"param\":null,\"type\":\"api_error\"}}";

/// Answers a connection beyond the limit and closes it, spending at most a second on it.
async fn shed(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let write = async {
        stream.write_all(OVERLOADED).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// Serves `handler` on `listener` until `shutdown` resolves, then drains.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: H,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) {
    let builders = Arc::new(Builders::new(&limits));
    let (stop, stopping) = watch::channel(false);
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    if let Some(shed) = &limits.shed {
                        shed.inc();
                    }
                    tokio::spawn(shed(stream));
                    continue;
                };
                let handler = handler.clone();
                let service = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler.handle(req, peer).await) }
                });
                let guard = FramingGuard::new(stream, limits.max_head_bytes, limits.header_read_timeout);
                let (builders, stopping) = (builders.clone(), stopping.clone());
                tokio::spawn(async move {
                    if let Err(e) = builders.serve(guard, service, stopping).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    // Every connection ends gracefully (a kept-alive HTTP/1 connection after its response in
    // flight, HTTP/2 with GOAWAY); the drain ends once every task has dropped its receiver.
    let _ = stop.send(true);
    drop(stopping);
    tokio::select! {
        () = stop.closed() => {}
        () = tokio::time::sleep(limits.drain) => {
            tracing::warn!(drain = ?limits.drain, "in-flight requests did not finish in time");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// Answers with the request's HTTP version.
    #[derive(Clone)]
    struct Version;

    impl Handler for Version {
        async fn handle(&self, req: Request<Incoming>, _peer: SocketAddr) -> Response<Body> {
            Response::new(crate::deny::full(format!("{:?}", req.version()).into()))
        }
    }

    /// The listener tells HTTP/2 (prior knowledge: the preface first) from HTTP/1.1 by the first
    /// bytes and serves both, several requests per connection; shutting down lets the open
    /// connections go.
    #[tokio::test]
    async fn the_listener_serves_http1_and_http2_prior_knowledge() {
        use hyper::client::conn::{http1, http2};
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Version, ConnLimits::default(), async {
            let _ = stopped.await;
        }));
        let text = |r: Response<Incoming>| async move {
            String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
        };
        let get =
            || Request::get("http://x/").body(crate::deny::full(bytes::Bytes::new())).unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut h1, conn) = http1::handshake(TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut h2, conn) =
            http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        for _ in 0..2 {
            assert_eq!(text(h1.send_request(get()).await.unwrap()).await, "HTTP/1.1");
            assert_eq!(text(h2.send_request(get()).await.unwrap()).await, "HTTP/2.0");
        }
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the idle connections end with the shutdown")
            .unwrap();
    }

    /// 1,500 clients connect at once while nothing accepts: every handshake completes, because
    /// the accept queue is longer than tokio's default of 1,024 (where the rest would wait for
    /// a SYN retransmission, a second or more later).
    #[tokio::test]
    async fn a_burst_longer_than_the_default_accept_queue_completes_its_handshakes() {
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        assert!(somaxconn >= 1500, "net.core.somaxconn is {somaxconn}: this test needs 1,500");
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let connect_all = async {
            let mut streams = Vec::with_capacity(1500);
            for _ in 0..1500 {
                streams.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
            }
            streams
        };
        let streams = tokio::time::timeout(Duration::from_millis(900), connect_all)
            .await
            .expect("every handshake completes before a SYN retransmission");
        assert_eq!(streams.len(), 1500);
        drop(listener);
    }
}
