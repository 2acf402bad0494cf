//! Relaying a tunnel (`other_hosts: tunnel`): bytes both ways until either side closes, or until
//! nothing has moved either way for the idle timeout, so that an abandoned tunnel does not hold
//! two sockets forever.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Copies between `client` and `upstream` until one closes or both are idle for `idle`.
pub async fn relay<C, U>(client: C, upstream: U, idle: Duration)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Active { io: client, start, last: last.clone() };
    let mut upstream = Active { io: upstream, start, last: last.clone() };
    let watchdog = async {
        loop {
            let since_start = Duration::from_millis(last.load(Ordering::Relaxed));
            let deadline = start + since_start + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "tunnel ended with an error");
            }
        }
        () = watchdog => tracing::debug!(?idle, "tunnel closed after being idle"),
    }
}

/// An I/O object that notes when bytes last moved through it.
struct Active<T> {
    io: T,
    start: Instant,
    /// Milliseconds from `start` to the last transfer, shared by both sides of the tunnel.
    last: Arc<AtomicU64>,
}

impl<T> Active<T> {
    fn touch(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn traffic_keeps_a_tunnel_open_and_silence_closes_it() {
        let (mut client, client_side) = duplex(1024);
        let (upstream_side, mut upstream) = duplex(1024);
        let relay = tokio::spawn(relay(client_side, upstream_side, Duration::from_secs(10)));
        // Traffic every 6 s for 30 s: open throughout, though that is 3x the idle timeout.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            upstream.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
        }
        assert!(!relay.is_finished());
        // Then silence: closed once 10 s pass without a byte, and the client sees the end.
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(relay.is_finished());
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
    }
}
