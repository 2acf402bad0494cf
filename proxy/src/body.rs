//! `MeteredBody`: the upstream response body on its way to the client, watched frame by frame.
//!
//! Every data frame is shown to an [`Observer`] (the stream meter) and passed on at once: nothing
//! waits for more data, so the first SSE byte reaches the client before the upstream finishes.
//! Frames that are *already* there when one is read (a burst of events that arrived together)
//! go out as one frame of at most [`COALESCE_MAX`] bytes, so a burst costs one chunk and one
//! write instead of one per event; an event is never held back waiting for the next. The
//! observer may replace a frame (to drop the usage chunk Tollgate asked for on the client's
//! behalf). The observer's `on_end` runs exactly once: at end of stream, on an upstream error, when
//! the stream sat idle too long, or when the body is dropped early because the client went away,
//! so every request is settled.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
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

/// Most bytes of ready frames joined into one frame.
pub const COALESCE_MAX: usize = 16 * 1024;

/// The wrapped body. See the module docs. The inner body and the timer are boxed, which keeps
/// `MeteredBody` `Unpin` and the poll logic plain.
pub struct MeteredBody<B, O: Observer> {
    inner: Pin<Box<B>>,
    observer: Option<O>,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    /// What ended the body while joined data was still to be sent: sent after that data.
    after: Option<After>,
}

/// The end of a body, held back until the data joined before it has gone out.
enum After {
    End,
    Frame(Frame<Bytes>),
    Error(BodyError),
}

/// Data frames being joined: the first is kept as it is (no copy when it stays alone).
#[derive(Default)]
struct Joined {
    first: Option<Bytes>,
    more: Option<BytesMut>,
}

impl Joined {
    fn len(&self) -> usize {
        match (&self.first, &self.more) {
            (_, Some(more)) => more.len(),
            (Some(first), None) => first.len(),
            (None, None) => 0,
        }
    }

    fn push(&mut self, data: Bytes) {
        match (&self.first, &mut self.more) {
            (None, _) => self.first = Some(data),
            (Some(_), Some(more)) => more.extend_from_slice(&data),
            (Some(first), None) => {
                let mut more = BytesMut::with_capacity((first.len() + data.len()).max(4096));
                more.extend_from_slice(first);
                more.extend_from_slice(&data);
                self.more = Some(more);
            }
        }
    }

    fn take(self) -> Option<Bytes> {
        match (self.first, self.more) {
            (_, Some(more)) => Some(more.freeze()),
            (first, None) => first,
        }
    }
}

impl<B, O: Observer> MeteredBody<B, O> {
    pub fn new(inner: B, observer: O, idle: Duration) -> Self {
        MeteredBody {
            inner: Box::pin(inner),
            observer: Some(observer),
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            after: None,
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
        match this.after.take() {
            Some(After::End) => return Poll::Ready(None),
            Some(After::Frame(frame)) => return Poll::Ready(Some(Ok(frame))),
            Some(After::Error(e)) => return Poll::Ready(Some(Err(e))),
            None => {}
        }
        let mut joined = Joined::default();
        loop {
            let polled = this.inner.as_mut().poll_frame(cx);
            let frame = match polled {
                Poll::Pending if joined.len() > 0 => break,
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
                    this.after = Some(After::End);
                    break;
                }
                Poll::Ready(Some(Err(e))) => {
                    this.end(StreamEnd::UpstreamError);
                    this.after = Some(After::Error(BodyError::Upstream(e)));
                    break;
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            this.timer.as_mut().reset(Instant::now() + this.idle);
            match frame.into_data() {
                Ok(data) => match this.observer.as_mut().and_then(|o| o.on_data(&data)) {
                    Some(replaced) if replaced.is_empty() => {}
                    Some(replaced) => joined.push(replaced),
                    None => joined.push(data),
                },
                Err(frame) => {
                    this.after = Some(After::Frame(frame));
                    break;
                }
            }
            // hyper stops polling a body whose length is known once it has all of it, so the
            // end is noticed here rather than by a final `None`.
            if this.inner.is_end_stream() {
                this.end(StreamEnd::Complete);
                break;
            }
            if joined.len() >= COALESCE_MAX {
                break;
            }
        }
        match joined.take() {
            Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            None => match this.after.take() {
                Some(After::End) | None => Poll::Ready(None),
                Some(After::Frame(frame)) => Poll::Ready(Some(Ok(frame))),
                Some(After::Error(e)) => Poll::Ready(Some(Err(e))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.after.is_none() && self.inner.is_end_stream()
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use http_body_util::BodyExt;

    use super::*;

    /// What a scripted upstream body does on each poll.
    enum Step {
        Data(&'static str),
        Big(usize),
        Trailers,
        /// Not ready now (it wakes the task at once, as a socket that becomes readable would).
        Pending,
    }

    struct Script(VecDeque<Step>);

    impl Body for Script {
        type Data = Bytes;
        type Error = hyper::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
            match self.0.pop_front() {
                None => Poll::Ready(None),
                Some(Step::Data(s)) => {
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(s.as_bytes())))))
                }
                Some(Step::Big(n)) => {
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; n])))))
                }
                Some(Step::Trailers) => {
                    Poll::Ready(Some(Ok(Frame::trailers(http::HeaderMap::new()))))
                }
                Some(Step::Pending) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            }
        }
    }

    #[derive(Default)]
    struct Seen {
        chunks: Vec<Bytes>,
        ends: Vec<StreamEnd>,
    }

    /// Records what it sees; drops chunks that read `drop`.
    struct Recorder(std::sync::Arc<std::sync::Mutex<Seen>>);

    impl Observer for Recorder {
        fn on_data(&mut self, chunk: &Bytes) -> Option<Bytes> {
            self.0.lock().unwrap().chunks.push(chunk.clone());
            (chunk.as_ref() == b"drop").then(Bytes::new)
        }
        fn on_end(&mut self, end: StreamEnd) {
            self.0.lock().unwrap().ends.push(end);
        }
    }

    /// The frames the client gets (data as text, trailers as `<trailers>`) and what the
    /// observer saw.
    async fn run(steps: Vec<Step>) -> (Vec<String>, Vec<usize>, Seen) {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
        let mut body =
            MeteredBody::new(Script(steps.into()), Recorder(seen.clone()), Duration::from_secs(5));
        let mut frames = Vec::new();
        let mut sizes = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(data) => {
                    sizes.push(data.len());
                    frames.push(String::from_utf8_lossy(&data[..data.len().min(16)]).into_owned());
                }
                Err(_) => frames.push("<trailers>".into()),
            }
        }
        drop(body);
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        (frames, sizes, seen)
    }

    #[tokio::test]
    async fn frames_that_arrived_together_go_out_as_one_and_none_waits_for_the_next() {
        use Step::*;
        let (frames, _, seen) =
            run(vec![Data("a"), Data("b"), Data("c"), Pending, Data("d"), Pending, Data("e")])
                .await;
        assert_eq!(frames, ["abc", "d", "e"]);
        // The meter still sees every event on its own, and the end once.
        assert_eq!(seen.chunks, ["a", "b", "c", "d", "e"]);
        assert_eq!(seen.ends, [StreamEnd::Complete]);
    }

    #[tokio::test]
    async fn a_burst_is_cut_at_the_bound() {
        use Step::*;
        let (_, sizes, _) = run(vec![Big(10_000), Big(10_000), Big(10_000), Data("z")]).await;
        assert_eq!(sizes, [20_000, 10_001], "a frame closes once it holds COALESCE_MAX or more");
        const { assert!(20_000 >= COALESCE_MAX && 10_000 < COALESCE_MAX) };
    }

    #[tokio::test]
    async fn trailers_and_the_end_come_after_the_joined_data() {
        use Step::*;
        let (frames, _, seen) = run(vec![Data("a"), Data("b"), Trailers]).await;
        assert_eq!(frames, ["ab", "<trailers>"]);
        assert_eq!(seen.ends, [StreamEnd::Complete]);
    }

    #[tokio::test]
    async fn dropped_chunks_are_left_out_of_the_joined_frame() {
        use Step::*;
        let (frames, _, seen) =
            run(vec![Data("a"), Data("drop"), Data("b"), Pending, Data("drop")]).await;
        assert_eq!(frames, ["ab"]);
        assert_eq!(seen.ends, [StreamEnd::Complete]);
    }
}
