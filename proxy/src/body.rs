//! `MeteredBody`: the upstream response body on its way to the client, watched frame by frame.
//!
//! Every data frame is shown to an [`Observer`] (the stream meter) and passed on at once: nothing
//! is buffered, so the first SSE byte reaches the client before the upstream finishes. The
//! observer may replace a frame (to drop the usage chunk Tollgate asked for on the client's
//! behalf). The observer's `on_end` runs exactly once: at end of stream, on an upstream error, when
//! the stream sat idle too long, or when the body is dropped early because the client went away,
//! so every request is settled.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// How a response body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The upstream finished the body.
    Complete,
    /// The upstream connection failed mid-body.
    UpstreamError,
    /// No frame arrived within the stream idle timeout.
    IdleTimeout,
    /// The body was dropped before its end: the client disconnected.
    ClientGone,
}

impl StreamEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamEnd::Complete => "complete",
            StreamEnd::UpstreamError => "upstream_error",
            StreamEnd::IdleTimeout => "idle_timeout",
            StreamEnd::ClientGone => "client_gone",
        }
    }
}

impl From<StreamEnd> for tollgate_core::record::End {
    fn from(end: StreamEnd) -> Self {
        use tollgate_core::record::End;
        match end {
            StreamEnd::Complete => End::Complete,
            StreamEnd::UpstreamError => End::UpstreamError,
            StreamEnd::IdleTimeout => End::IdleTimeout,
            StreamEnd::ClientGone => End::ClientGone,
        }
    }
}

/// Watches a response body.
pub trait Observer: Send + Unpin + 'static {
    /// Sees a data frame; returns `Some(bytes)` to send those instead (possibly empty).
    fn on_data(&mut self, chunk: &Bytes) -> Option<Bytes>;
    /// Whether `on_data` may replace frames (then the body length is no longer known upfront).
    fn rewrites(&self) -> bool {
        false
    }
    /// Called once when the body ends, however it ends.
    fn on_end(&mut self, end: StreamEnd);
}

/// Error of a metered body: the upstream's, or an idle timeout.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("upstream body: {0}")]
    Upstream(#[from] hyper::Error),
    #[error("upstream stream idle for more than {0:?}")]
    Idle(Duration),
}

/// The wrapped body. See the module docs. The inner body and the timer are boxed, which keeps
/// `MeteredBody` `Unpin` and the poll logic plain.
pub struct MeteredBody<B, O: Observer> {
    inner: Pin<Box<B>>,
    observer: Option<O>,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

impl<B, O: Observer> MeteredBody<B, O> {
    pub fn new(inner: B, observer: O, idle: Duration) -> Self {
        MeteredBody {
            inner: Box::pin(inner),
            observer: Some(observer),
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn end(&mut self, end: StreamEnd) {
        if let Some(mut observer) = self.observer.take() {
            observer.on_end(end);
        }
    }
}

impl<B, O> Body for MeteredBody<B, O>
where
    B: Body<Data = Bytes, Error = hyper::Error>,
    O: Observer,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            let polled = this.inner.as_mut().poll_frame(cx);
            let frame = match polled {
                Poll::Pending => {
                    if this.observer.is_some() {
                        ready!(this.timer.as_mut().poll(cx));
                        this.end(StreamEnd::IdleTimeout);
                        return Poll::Ready(Some(Err(BodyError::Idle(this.idle))));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    this.end(StreamEnd::Complete);
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => {
                    this.end(StreamEnd::UpstreamError);
                    return Poll::Ready(Some(Err(BodyError::Upstream(e))));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            this.timer.as_mut().reset(Instant::now() + this.idle);
            let frame = match frame.into_data() {
                Ok(data) => match this.observer.as_mut().and_then(|o| o.on_data(&data)) {
                    Some(replaced) if replaced.is_empty() => continue,
                    Some(replaced) => Frame::data(replaced),
                    None => Frame::data(data),
                },
                Err(frame) => frame,
            };
            // hyper stops polling a body whose length is known once it has all of it, so the
            // end is noticed here rather than by a final `None`.
            if this.inner.is_end_stream() {
                this.end(StreamEnd::Complete);
            }
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        if !self.observer.as_ref().is_some_and(Observer::rewrites) {
            return inner;
        }
        // The observer may drop bytes, so only the upper bound survives.
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper);
        }
        hint
    }
}

impl<B, O: Observer> Drop for MeteredBody<B, O> {
    fn drop(&mut self) {
        self.end(StreamEnd::ClientGone);
    }
}
