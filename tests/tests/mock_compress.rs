//! The mock upstream compresses like the providers: a hyper client offers (or the
//! `x-mock-content-encoding` header forces) a coding, and the body is decoded here with the
//! codecs' own decoders (not Tollgate's) and compared with the plain answer. SSE stays a
//! stream: every event can be decoded as soon as its frame arrives.

use std::io::Write;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tollgate_e2e::mock::{compress, header, MockUpstream};

async fn post(
    mock: &MockUpstream,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> Response<Incoming> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::post(format!("{}{path}", mock.base_url()))
        .header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    client.request(request.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await.unwrap()
}

/// The plain bytes of a body in `coding` (`None`: plain), by the codec's reference decoder.
fn decode(coding: Option<&str>, body: &[u8]) -> Vec<u8> {
    coding.map_or_else(|| body.to_vec(), |c| compress::decode(c, body))
}

async fn answer(
    mock: &MockUpstream,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (Option<String>, Vec<u8>) {
    let response = post(mock, path, headers, body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let coding = response.headers().get("content-encoding").map(|v| v.to_str().unwrap().to_owned());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (coding, bytes.to_vec())
}

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}],
           "stream": stream, "stream_options": {"include_usage": stream}})
}

/// Replaces the parts of a mock answer that differ per request (ids, timestamps).
fn stable(plain: &[u8]) -> String {
    blank_ids(std::str::from_utf8(plain).unwrap())
}

/// Blanks `"id":"..."` and `"created":N` values without a regex crate.
fn blank_ids(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(['"']) {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let blank_string = ["\"id\":\"", "\"created\":", "\"created_at\":"]
            .into_iter()
            .find(|k| rest.starts_with(k));
        match blank_string {
            Some(key) => {
                out.push_str(key);
                rest = &rest[key.len()..];
                let end = rest.find([',', '"', '}']).unwrap_or(rest.len());
                rest = &rest[end..];
            }
            None => {
                out.push('"');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[tokio::test]
async fn json_and_sse_are_compressed_with_the_first_offered_coding() {
    let mock = MockUpstream::start().await;
    for (path, body) in [
        ("/v1/chat/completions", chat(false)),
        ("/v1/chat/completions", chat(true)),
        (
            "/v1/messages",
            json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": true,
                                "messages": [{"role": "user", "content": "Hi"}]}),
        ),
        ("/v1/embeddings", json!({"model": "text-embedding-3-small", "input": ["a", "b"]})),
    ] {
        let (none, plain) = answer(&mock, path, &[], &body).await;
        assert_eq!(none, None, "{path}: no Accept-Encoding, no coding");
        for (offer, want) in [
            ("gzip, deflate", "gzip"),
            ("deflate, gzip", "deflate"),
            ("br", "br"),
            ("zstd, gzip", "zstd"),
            ("br;q=0, gzip;q=1.0", "gzip"),
            ("compress, identity;q=0.5, deflate", "deflate"),
        ] {
            let (coding, bytes) = answer(&mock, path, &[("accept-encoding", offer)], &body).await;
            assert_eq!(coding.as_deref(), Some(want), "{path}: {offer}");
            assert_ne!(bytes, plain, "{path}: {offer}: compressed");
            let decoded = decode(Some(want), &bytes);
            assert_eq!(stable(&decoded), stable(&plain), "{path}: {offer}");
        }
        let (coding, _) = answer(&mock, path, &[("accept-encoding", "identity")], &body).await;
        assert_eq!(coding, None, "{path}");
    }
}

#[tokio::test]
async fn a_coding_can_be_forced_that_the_client_did_not_offer() {
    let mock = MockUpstream::start().await;
    let (_, plain) = answer(&mock, "/v1/chat/completions", &[], &chat(false)).await;
    for coding in ["gzip", "deflate", "br", "zstd"] {
        let (got, bytes) = answer(
            &mock,
            "/v1/chat/completions",
            &[(header::CONTENT_ENCODING, coding), ("accept-encoding", "identity")],
            &chat(false),
        )
        .await;
        assert_eq!(got.as_deref(), Some(coding));
        assert_eq!(stable(&decode(Some(coding), &bytes)), stable(&plain), "{coding}");
    }
    // A name the mock cannot produce: the label is sent on the plain body.
    let (got, bytes) = answer(
        &mock,
        "/v1/chat/completions",
        &[(header::CONTENT_ENCODING, "snappy")],
        &chat(false),
    )
    .await;
    assert_eq!(got.as_deref(), Some("snappy"));
    assert_eq!(stable(&bytes), stable(&plain));
    // `identity` forces none, whatever was offered.
    let (got, _) = answer(
        &mock,
        "/v1/chat/completions",
        &[(header::CONTENT_ENCODING, "identity"), ("accept-encoding", "gzip")],
        &chat(false),
    )
    .await;
    assert_eq!(got, None);
}

#[tokio::test]
async fn a_compressed_stream_is_flushed_per_event() {
    let mock = MockUpstream::start().await;
    for coding in ["gzip", "deflate", "br", "zstd"] {
        let response = post(
            &mock,
            "/v1/chat/completions",
            &[("accept-encoding", coding), (header::EVENT_DELAY_MS, "100"), (header::EVENTS, "3")],
            &chat(true),
        )
        .await;
        assert_eq!(response.headers()["content-encoding"], coding);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        let first_at = Instant::now();
        // The first frame alone decodes to the first event, whole.
        let mut decoder = Incremental::new(coding);
        let text = decoder.push(&first);
        assert!(text.starts_with("data: {") && text.ends_with("\n\n"), "{coding}: {text:?}");
        assert_eq!(text.matches("\n\n").count(), 1, "{coding}: one event per frame");
        let mut rest = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                rest.extend_from_slice(&data);
            }
        }
        assert!(first_at.elapsed() >= Duration::from_millis(300), "{coding}: streamed");
        let all = [first.to_vec(), rest].concat();
        let text = String::from_utf8(decode(Some(coding), &all)).unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{coding}: {text}");
    }
}

/// Decodes a compressed stream piece by piece, the way an SSE client does.
enum Incremental {
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    Deflate(flate2::write::ZlibDecoder<Vec<u8>>),
    Brotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
    Zstd,
}

impl Incremental {
    fn new(coding: &str) -> Incremental {
        match coding {
            "gzip" => Incremental::Gzip(flate2::write::GzDecoder::new(Vec::new())),
            "deflate" => Incremental::Deflate(flate2::write::ZlibDecoder::new(Vec::new())),
            "br" => {
                Incremental::Brotli(Box::new(brotli::DecompressorWriter::new(Vec::new(), 4096)))
            }
            _ => Incremental::Zstd,
        }
    }

    fn push(&mut self, bytes: &[u8]) -> String {
        let out = match self {
            Incremental::Gzip(d) => {
                d.write_all(bytes).unwrap();
                d.flush().unwrap();
                std::mem::take(d.get_mut())
            }
            Incremental::Deflate(d) => {
                d.write_all(bytes).unwrap();
                d.flush().unwrap();
                std::mem::take(d.get_mut())
            }
            Incremental::Brotli(d) => {
                d.write_all(bytes).unwrap();
                d.flush().unwrap();
                std::mem::take(d.get_mut())
            }
            // One zstd frame per event.
            Incremental::Zstd => decode(Some("zstd"), bytes),
        };
        String::from_utf8(out).unwrap()
    }
}

#[tokio::test]
async fn a_compressed_stream_cut_off_stays_cut_off() {
    let mock = MockUpstream::start().await;
    let response = post(
        &mock,
        "/v1/chat/completions",
        &[("accept-encoding", "gzip"), (header::RESET_AFTER, "2")],
        &chat(true),
    )
    .await;
    let mut body = response.into_body();
    let mut failed = false;
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "the client sees the truncation as an error");
}

#[tokio::test]
async fn a_bomb_is_small_on_the_wire_and_large_decoded() {
    let mock = MockUpstream::start().await;
    for (forced, want, max_wire) in [(None, "gzip", 16 << 10), (Some("zstd"), "zstd", 1 << 10)] {
        let mut headers = vec![(header::BOMB, "8")];
        if let Some(coding) = forced {
            headers.push((header::CONTENT_ENCODING, coding));
        }
        let (coding, bytes) = answer(&mock, "/v1/chat/completions", &headers, &chat(false)).await;
        assert_eq!(coding.as_deref(), Some(want));
        assert!(bytes.len() < max_wire, "{want}: {} bytes on the wire", bytes.len());
        let decoded = decode(Some(want), &bytes);
        assert_eq!(decoded.len(), 8 << 20, "{want}");
        assert!(decoded.iter().all(|&b| b == 0), "{want}");
    }
}
