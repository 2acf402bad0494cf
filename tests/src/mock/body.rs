//! Response bodies of the mock: a whole buffer, or an SSE stream written one event per body
//! frame as a background task produces it (so a client sees the first byte before the last
//! event exists), optionally cut off with an error to simulate a connection reset.
//!
//! Frames bytes; never decides what the events say.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::Value;
use tokio::sync::mpsc;

/// Minimum pause between the last event and a reset, so hyper flushes that event before the
/// error tears the connection down (it may otherwise drop the still-buffered bytes).
const FLUSH_BEFORE_RESET: Duration = Duration::from_millis(20);

/// The stream was aborted on purpose by `x-mock-reset-after`.
#[derive(Debug, thiserror::Error)]
#[error("mock upstream reset the stream after {after} events")]
pub struct Reset {
    after: usize,
}

/// Body of every mock response.
#[derive(Debug)]
pub struct MockBody {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Events(mpsc::Receiver<Result<Bytes, Reset>>),
}

impl MockBody {
    /// A body with no bytes (and `content-length: 0`).
    pub fn empty() -> MockBody {
        MockBody { kind: Kind::Full(None) }
    }

    /// A body sent as one buffer with a known length.
    pub fn full(bytes: impl Into<Bytes>) -> MockBody {
        MockBody { kind: Kind::Full(Some(bytes.into())) }
    }

    /// Streams `events` one frame each, `delay` apart. With `reset_after: Some(k)` only the
    /// first `k` events are sent (all of them if there are fewer) and the body then ends with an
    /// error, which makes hyper abort the connection (HTTP/1) or reset the stream (HTTP/2)
    /// instead of finishing the message.
    pub fn events(events: Vec<Bytes>, delay: Duration, reset_after: Option<usize>) -> MockBody {
        let (tx, rx) = mpsc::channel(1);
        let keep = reset_after.map_or(events.len(), |k| k.min(events.len()));
        tokio::spawn(async move {
            for (index, event) in events.into_iter().take(keep).enumerate() {
                if index > 0 && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if tx.send(Ok(event)).await.is_err() {
                    return; // the client went away
                }
            }
            if reset_after.is_some() {
                tokio::time::sleep(delay.max(FLUSH_BEFORE_RESET)).await;
                let _ = tx.send(Err(Reset { after: keep })).await;
            }
        });
        MockBody { kind: Kind::Events(rx) }
    }
}

impl MockBody {
    /// A body sent as these frames, one after the other, as fast as the client reads.
    pub fn chunks(chunks: Vec<Bytes>) -> MockBody {
        MockBody::events(chunks, Duration::ZERO, None)
    }

    /// The same body with every frame replaced by `f(Some(frame))`, and `f(None)` sent after
    /// the last one (when not empty): how a streaming compressor sits on a body. A body cut off
    /// by `x-mock-reset-after` stays cut off, without the `f(None)` frame.
    pub fn map_frames(
        self,
        mut f: impl FnMut(Option<Bytes>) -> Bytes + Send + 'static,
    ) -> MockBody {
        match self.kind {
            Kind::Full(None) => self,
            Kind::Full(Some(bytes)) => {
                let mut out = f(Some(bytes)).to_vec();
                out.extend_from_slice(&f(None));
                MockBody::full(out)
            }
            Kind::Events(mut rx) => {
                let (tx, out) = mpsc::channel(1);
                tokio::spawn(async move {
                    while let Some(frame) = rx.recv().await {
                        let mapped = match frame {
                            Ok(bytes) => Ok(f(Some(bytes))),
                            Err(reset) => Err(reset),
                        };
                        let stop = mapped.is_err();
                        if tx.send(mapped).await.is_err() || stop {
                            return;
                        }
                    }
                    let last = f(None);
                    if !last.is_empty() {
                        let _ = tx.send(Ok(last)).await;
                    }
                });
                MockBody { kind: Kind::Events(out) }
            }
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Reset;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Reset>>> {
        match &mut self.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Events(rx) => rx.poll_recv(cx).map(|event| event.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.kind, Kind::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Events(_) => SizeHint::default(),
        }
    }
}

/// One SSE event without an `event:` line (OpenAI chat and completions).
pub fn data(json: &Value) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

/// One SSE event with an `event:` line (Anthropic, OpenAI Responses).
pub fn event(name: &str, json: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {json}\n\n"))
}

/// OpenAI's end-of-stream sentinel.
pub fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// A JSON response with the given status.
pub fn json(status: StatusCode, value: &Value) -> Response<MockBody> {
    let mut response = Response::new(MockBody::full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A `text/event-stream` response that streams `events` (see [`MockBody::events`]).
pub fn sse(events: Vec<Bytes>, delay: Duration, reset_after: Option<usize>) -> Response<MockBody> {
    let mut response = Response::new(MockBody::events(events, delay, reset_after));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
