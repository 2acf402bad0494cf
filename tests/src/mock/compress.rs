//! Compresses mock responses the way real providers do: the client's `Accept-Encoding` is
//! honoured (the first of `gzip`, `deflate`, `br`, `zstd` it offers without `q=0`, in its
//! order), a JSON body is compressed whole and an SSE stream as a stream, flushed after every
//! event so that each event still reaches the client when it is produced. Error bodies are
//! compressed too, as providers do.
//!
//! `x-mock-content-encoding: <coding>` forces a coding the client did not offer (`identity`
//! forces none; a name the mock does not know is sent as the header with the plain body, like
//! a misconfigured server). `x-mock-bomb: <MiB>` replaces the body with that many MiB of zero
//! bytes, compressed (gzip unless `x-mock-content-encoding: zstd`): a decompression bomb of
//! about 1 KiB per MiB for gzip (members of 1 MiB each, concatenated) and 4 bytes per 128 KiB
//! for zstd (RLE blocks).
//!
//! Decides bytes on the wire only; the provider modules never know about it.

use std::io::Write;

use bytes::Bytes;
use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;
use hyper::header::{HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, VARY};
use hyper::{HeaderMap, Response};

use super::body::MockBody;

/// Forces the response's content-coding (`gzip`, `deflate`, `br`, `zstd`, `identity`, or any
/// other name, sent with the body uncompressed).
pub const CONTENT_ENCODING_KNOB: &str = "x-mock-content-encoding";
/// Replaces the body with this many MiB of zeros, compressed: a decompression bomb.
pub const BOMB: &str = "x-mock-bomb";

/// A coding the mock can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

impl Coding {
    fn parse(name: &str) -> Option<Coding> {
        match name.trim().to_ascii_lowercase().as_str() {
            "gzip" | "x-gzip" => Some(Coding::Gzip),
            "deflate" => Some(Coding::Deflate),
            "br" => Some(Coding::Brotli),
            "zstd" => Some(Coding::Zstd),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
            Coding::Brotli => "br",
            Coding::Zstd => "zstd",
        }
    }
}

/// What the response's body becomes.
enum Plan {
    Plain,
    /// Send this `Content-Encoding` with the plain body (a coding the mock does not produce).
    Label(HeaderValue),
    Coded(Coding),
}

/// The first coding of `Accept-Encoding` the mock produces, in the client's order.
fn negotiate(headers: &HeaderMap) -> Option<Coding> {
    headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter(|item| {
            let mut params = item.split(';').skip(1);
            !params.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            })
        })
        .find_map(|item| Coding::parse(item.split(';').next().unwrap_or("")))
}

fn plan(headers: &HeaderMap) -> Plan {
    match headers.get(CONTENT_ENCODING_KNOB) {
        Some(forced) => match forced.to_str().ok().and_then(Coding::parse) {
            Some(coding) => Plan::Coded(coding),
            None if forced.as_bytes().eq_ignore_ascii_case(b"identity") => Plan::Plain,
            None => Plan::Label(forced.clone()),
        },
        None => negotiate(headers).map_or(Plan::Plain, Plan::Coded),
    }
}

/// The bomb size asked for, in MiB.
pub fn bomb_mib(headers: &HeaderMap) -> Option<u64> {
    headers.get(BOMB)?.to_str().ok()?.trim().parse().ok()
}

/// Applies the request's encoding to `response` (see the module documentation).
pub fn apply(request: &HeaderMap, response: Response<MockBody>) -> Response<MockBody> {
    let plan = plan(request);
    let (mut parts, body) = response.into_parts();
    if let Some(mib) = bomb_mib(request) {
        let coding = match plan {
            Plan::Coded(Coding::Zstd) => Coding::Zstd,
            _ => Coding::Gzip,
        };
        parts.headers.insert(CONTENT_ENCODING, HeaderValue::from_static(coding.name()));
        parts.headers.remove(CONTENT_LENGTH);
        return Response::from_parts(parts, MockBody::chunks(bomb(coding, mib)));
    }
    parts.headers.append(VARY, HeaderValue::from_static("accept-encoding"));
    let body = match plan {
        Plan::Plain => body,
        Plan::Label(value) => {
            parts.headers.insert(CONTENT_ENCODING, value);
            body
        }
        Plan::Coded(coding) => {
            parts.headers.insert(CONTENT_ENCODING, HeaderValue::from_static(coding.name()));
            parts.headers.remove(CONTENT_LENGTH);
            let mut encoder = Encoder::new(coding);
            body.map_frames(move |frame| encoder.frame(frame))
        }
    };
    Response::from_parts(parts, body)
}

/// A streaming compressor: each frame in, its bytes out, flushed (`None`: the last frame,
/// which also ends the compressed stream).
pub struct Encoder {
    inner: Inner,
}

enum Inner {
    Gzip(GzEncoder<Vec<u8>>),
    Deflate(ZlibEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    /// zstd: one frame per event (a zstd body may be several frames in a row).
    Zstd,
    Done,
}

impl Encoder {
    pub fn new(coding: Coding) -> Encoder {
        let inner = match coding {
            Coding::Gzip => Inner::Gzip(GzEncoder::new(Vec::new(), Compression::default())),
            Coding::Deflate => Inner::Deflate(ZlibEncoder::new(Vec::new(), Compression::default())),
            Coding::Brotli => {
                Inner::Brotli(Box::new(brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22)))
            }
            Coding::Zstd => Inner::Zstd,
        };
        Encoder { inner }
    }

    /// The compressed bytes for `frame` (flushed, so the peer can decode them at once), or
    /// for the end of the body.
    pub fn frame(&mut self, frame: Option<Bytes>) -> Bytes {
        fn step<W: Write>(w: &mut W, frame: &[u8]) {
            w.write_all(frame).expect("compressing into memory");
            w.flush().expect("compressing into memory");
        }
        match (&mut self.inner, frame) {
            (Inner::Gzip(e), Some(f)) => {
                step(e, &f);
                Bytes::from(std::mem::take(e.get_mut()))
            }
            (Inner::Deflate(e), Some(f)) => {
                step(e, &f);
                Bytes::from(std::mem::take(e.get_mut()))
            }
            (Inner::Brotli(e), Some(f)) => {
                step(&mut **e, &f);
                Bytes::from(std::mem::take(e.get_mut()))
            }
            (Inner::Zstd, Some(f)) => Bytes::from(ruzstd::encoding::compress_to_vec(
                &f[..],
                ruzstd::encoding::CompressionLevel::Fastest,
            )),
            (inner, None) => match std::mem::replace(inner, Inner::Done) {
                Inner::Gzip(e) => Bytes::from(e.finish().expect("compressing into memory")),
                Inner::Deflate(e) => Bytes::from(e.finish().expect("compressing into memory")),
                Inner::Brotli(e) => Bytes::from(e.into_inner()),
                Inner::Zstd | Inner::Done => Bytes::new(),
            },
            (Inner::Done, Some(_)) => Bytes::new(),
        }
    }
}

/// Compresses `plain` whole with `coding`.
pub fn compress(coding: Coding, plain: &[u8]) -> Vec<u8> {
    let mut e = Encoder::new(coding);
    let mut out = e.frame(Some(Bytes::copy_from_slice(plain))).to_vec();
    out.extend_from_slice(&e.frame(None));
    out
}

/// `mib` MiB of zeros, compressed, in frames of at most 64 KiB.
fn bomb(coding: Coding, mib: u64) -> Vec<Bytes> {
    let mut body = Vec::new();
    match coding {
        Coding::Zstd => {
            // One frame, window 8 MiB, then RLE blocks of 128 KiB of zeros, the last one marked.
            body.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd, 0x00, (23 - 10) << 3]);
            let blocks = mib.saturating_mul(8).max(1);
            for i in 0..blocks {
                let last = u32::from(i + 1 == blocks);
                let header = last | (1 << 1) | ((128 << 10) << 3);
                body.extend_from_slice(&header.to_le_bytes()[..3]);
                body.push(0);
            }
        }
        _ => {
            let member = compress(Coding::Gzip, &vec![0u8; 1 << 20]);
            for _ in 0..mib.max(1) {
                body.extend_from_slice(&member);
            }
        }
    }
    body.chunks(64 << 10).map(Bytes::copy_from_slice).collect()
}

/// The plain bytes of a body sent with `Content-Encoding: coding`, decoded by the codec's
/// reference decoder (flate2, brotli, ruzstd), for tests to check what a client received.
///
/// # Panics
/// On a coding it does not know or a body that does not decode.
pub fn decode(coding: &str, body: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    match Coding::parse(coding) {
        Some(Coding::Gzip) => {
            flate2::read::MultiGzDecoder::new(body).read_to_end(&mut out).expect("gzip body");
        }
        Some(Coding::Deflate) => {
            flate2::read::ZlibDecoder::new(body).read_to_end(&mut out).expect("deflate body");
        }
        Some(Coding::Brotli) => {
            brotli::Decompressor::new(body, 4096).read_to_end(&mut out).expect("br body");
        }
        Some(Coding::Zstd) => {
            let mut input = body;
            while !input.is_empty() {
                let mut frame =
                    ruzstd::decoding::StreamingDecoder::new(&mut input).expect("zstd frame");
                frame.read_to_end(&mut out).expect("zstd body");
            }
        }
        None => panic!("no decoder for {coding:?}"),
    }
    out
}
