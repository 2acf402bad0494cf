//! Compressed responses: every fixture, compressed with every coding the meter decodes and
//! split anywhere, meters exactly like the plain body; bombs, corrupt streams and unknown
//! codings end estimated with their reason, without panicking.

use std::io::Write;

use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
use flate2::Compression;
use proptest::prelude::*;
use proptest::sample::Index;

use super::decode::{Coding, ContentEncoding, DecodeAbort, DecodeLimits, Decoder, OUT_BUF};
use super::tests::{fixtures, split, whole, Fixture};
use super::*;

/// The codings, as a `Content-Encoding` value and how to produce it. `deflate` twice: zlib
/// wrapped (RFC 9110) and raw (what some servers send).
const CODINGS: [&str; 5] = ["gzip", "deflate", "deflate-raw", "br", "zstd"];

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(body).unwrap();
    e.finish().unwrap()
}

fn compress(coding: &str, body: &[u8]) -> Vec<u8> {
    match coding {
        "gzip" => gzip(body),
        "deflate" => {
            let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
            e.write_all(body).unwrap();
            e.finish().unwrap()
        }
        "deflate-raw" => {
            let mut e = DeflateEncoder::new(Vec::new(), Compression::default());
            e.write_all(body).unwrap();
            e.finish().unwrap()
        }
        "br" => {
            let mut out = Vec::new();
            {
                let mut e = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                e.write_all(body).unwrap();
            }
            out
        }
        "zstd" => {
            ruzstd::encoding::compress_to_vec(body, ruzstd::encoding::CompressionLevel::Fastest)
        }
        other => panic!("no coding {other}"),
    }
}

/// The header value for a coding of [`CODINGS`].
fn header(coding: &str) -> &str {
    coding.strip_suffix("-raw").unwrap_or(coding)
}

fn meter_coded<'a>(
    fx: &Fixture,
    encoding: &str,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Metered {
    let mut m = Meter::new(fx.api, fx.streaming).with_encoding(Some(encoding));
    for c in chunks {
        m.feed(c);
    }
    m.finish(fx.input_estimate)
}

#[test]
fn every_fixture_in_every_coding_meters_like_the_plain_body() {
    for fx in fixtures() {
        for coding in CODINGS {
            let body = compress(coding, &fx.body);
            let got = meter_coded(&fx, header(coding), [body.as_slice()]);
            assert_eq!(got, whole(&fx), "{} as {coding}", fx.name);
            let got = meter_coded(&fx, header(coding), body.chunks(1));
            assert_eq!(got, whole(&fx), "{} as {coding}, byte by byte", fx.name);
        }
    }
}

#[test]
fn identity_and_absent_encodings_are_plain() {
    for value in ["", "identity", " Identity , identity"] {
        assert_eq!(ContentEncoding::parse(value), ContentEncoding::Identity, "{value:?}");
    }
    for fx in fixtures() {
        let got = meter_coded(&fx, "identity", [fx.body.as_slice()]);
        assert_eq!(got, whole(&fx), "{}", fx.name);
    }
}

#[test]
fn encoding_names_are_case_insensitive_and_x_gzip_is_gzip() {
    assert_eq!(ContentEncoding::parse("GZip"), ContentEncoding::Coded(Coding::Gzip));
    assert_eq!(ContentEncoding::parse("x-gzip"), ContentEncoding::Coded(Coding::Gzip));
    assert_eq!(ContentEncoding::parse("BR"), ContentEncoding::Coded(Coding::Brotli));
    assert_eq!(ContentEncoding::parse("identity, zstd"), ContentEncoding::Coded(Coding::Zstd));
    assert_eq!(ContentEncoding::parse("Deflate"), ContentEncoding::Coded(Coding::Deflate));
}

/// An SSE stream compressed the way a server streams it: one flush per event, each flush sent
/// as its own chunk, so that the client sees every event when it is produced.
fn gzip_flushed_per_event(body: &[u8]) -> Vec<Vec<u8>> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    let mut chunks = Vec::new();
    for event in body.split_inclusive(|&b| b == b'\n') {
        e.write_all(event).unwrap();
        e.flush().unwrap();
        chunks.push(std::mem::take(e.get_mut()));
    }
    chunks.push(e.finish().unwrap());
    chunks
}

#[test]
fn a_stream_flushed_per_event_is_metered_as_each_flush_arrives() {
    for fx in fixtures().into_iter().filter(|f| f.name.ends_with(".sse")) {
        let chunks = gzip_flushed_per_event(&fx.body);
        let mut m = Meter::new(fx.api, true).with_encoding(Some("gzip"));
        let mut decoded = Vec::new();
        let mut d = Decoder::new(ContentEncoding::parse("gzip"), DecodeLimits::default()).unwrap();
        for c in &chunks {
            m.feed(c);
            // Each flush decodes to exactly the events written before it.
            let before = decoded.len();
            d.feed(c, &mut |p| decoded.extend_from_slice(p));
            assert!(decoded.len() > before || c.len() < 32, "{}: a flush decodes at once", fx.name);
        }
        assert_eq!(decoded, fx.body, "{}", fx.name);
        assert_eq!(m.finish(fx.input_estimate), whole(&fx), "{}", fx.name);
    }
}

#[test]
fn several_gzip_members_and_header_fields_decode() {
    let fx = fixtures().into_iter().find(|f| f.name == "openai_chat_stream_usage.sse").unwrap();
    let (a, b) = fx.body.split_at(fx.body.len() / 2);
    let mut body = gzip(a);
    // A member with FEXTRA, FNAME, FCOMMENT and FHCRC set.
    let member = gzip(b);
    let mut header = vec![0x1f, 0x8b, 8, 2 | 4 | 8 | 16, 0, 0, 0, 0, 0, 255];
    header.extend_from_slice(&[3, 0, b'a', b'b', b'c']);
    header.extend_from_slice(b"name.sse\0a comment\0");
    header.extend_from_slice(&[0xaa, 0xbb]);
    body.extend_from_slice(&header);
    body.extend_from_slice(&member[10..]);
    for size in [1, 3, 10, 4096] {
        assert_eq!(meter_coded(&fx, "gzip", body.chunks(size)), whole(&fx), "chunks of {size}");
    }
}

#[test]
fn zstd_checksums_skippable_frames_and_several_frames_decode() {
    let fx = fixtures().into_iter().find(|f| f.name == "anthropic_stream.sse").unwrap();
    let (a, b) = fx.body.split_at(fx.body.len() / 3);
    let mut body = vec![0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3];
    body.extend(compress("zstd", a));
    body.extend(compress("zstd", b));
    for size in [1, 2, 5, 64, 100_000] {
        assert_eq!(meter_coded(&fx, "zstd", body.chunks(size)), whole(&fx), "chunks of {size}");
    }
}

/// `n` zero bytes, compressed with `coding`, built without holding the plain bytes.
fn zeros(coding: &str, n: usize) -> Vec<u8> {
    let block = vec![0u8; 1 << 20];
    match coding {
        "gzip" => {
            let mut e = GzEncoder::new(Vec::new(), Compression::best());
            for _ in 0..n >> 20 {
                e.write_all(&block).unwrap();
            }
            e.finish().unwrap()
        }
        "br" => {
            let mut out = Vec::new();
            {
                let mut e = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                for _ in 0..n >> 20 {
                    e.write_all(&block).unwrap();
                }
            }
            out
        }
        _ => compress(coding, &vec![0u8; n]),
    }
}

#[test]
fn a_bomb_stops_after_the_ratio_bound_and_ends_estimated() {
    for coding in ["gzip", "br", "zstd"] {
        let bomb = zeros(coding, 8 << 20);
        assert!(bomb.len() < 16 << 10, "{coding}: {} bytes", bomb.len());
        let mut d = Decoder::new(ContentEncoding::parse(coding), DecodeLimits::default()).unwrap();
        let mut largest = 0;
        // Chunks of 1 KiB allow 200 KiB each by ratio: the 1 MiB floor is what trips first.
        for c in bomb.chunks(1 << 10) {
            d.feed(c, &mut |p| largest = largest.max(p.len()));
        }
        assert_eq!(d.aborted(), Some(DecodeAbort::Ratio), "{coding}");
        // It stopped at the first piece past the ratio floor, decoding nothing more.
        assert!(d.decoded_bytes() <= (1 << 20) + OUT_BUF as u64, "{coding}: {}", d.decoded_bytes());
        assert!(largest <= OUT_BUF, "{coding}: pieces come from the fixed buffer");

        let mut m = Meter::new(Api::ChatCompletions, true).with_encoding(Some(coding));
        for c in bomb.chunks(16 << 10) {
            m.feed(c);
        }
        let got = m.finish(10);
        assert_eq!(got.source, UsageSource::Estimated, "{coding}");
        assert_eq!(got.decode_aborted, Some(DecodeAbort::Ratio), "{coding}");
        assert_eq!(got.usage.input, 10, "{coding}");
        assert_eq!(got.usage.output, tokens_from_bytes(bomb.len() as u64), "{coding}");
    }
}

#[test]
fn the_decoded_size_bound_ends_estimated() {
    let fx = fixtures().into_iter().find(|f| f.name == "openai_chat_stream_usage.sse").unwrap();
    let body = compress("gzip", &fx.body);
    let limits = DecodeLimits { max_decoded_bytes: 100, ..DecodeLimits::default() };
    let mut m = Meter::new(fx.api, true).with_decode_limits(limits).with_encoding(Some("gzip"));
    m.feed(&body);
    let got = m.finish(fx.input_estimate);
    assert_eq!(got.source, UsageSource::Estimated);
    assert_eq!(got.decode_aborted, Some(DecodeAbort::TooLarge));
    // The bound itself is exact: a body of exactly the limit decodes.
    let limits =
        DecodeLimits { max_decoded_bytes: fx.body.len() as u64, ..DecodeLimits::default() };
    let mut m = Meter::new(fx.api, true).with_decode_limits(limits).with_encoding(Some("gzip"));
    m.feed(&body);
    assert_eq!(m.finish(fx.input_estimate), whole(&fx));
}

#[test]
fn a_huge_zstd_window_is_refused_before_any_allocation() {
    // Frame header: magic, FHD without single segment, window descriptor 2^31.
    let frame = [0x28, 0xb5, 0x2f, 0xfd, 0x00, (31 - 10) << 3, 0x01, 0x00, 0x00];
    let mut d = Decoder::new(ContentEncoding::parse("zstd"), DecodeLimits::default()).unwrap();
    d.feed(&frame, &mut |_| {});
    assert_eq!(d.aborted(), Some(DecodeAbort::TooLarge));
}

#[test]
fn unknown_and_stacked_encodings_end_estimated_and_say_so() {
    let fx = fixtures().into_iter().find(|f| f.name == "openai_chat.json").unwrap();
    for value in ["compress", "gzip, br", "br,gzip", "snappy"] {
        let got = meter_coded(&fx, value, [fx.body.as_slice()]);
        assert_eq!(got.source, UsageSource::Estimated, "{value}");
        assert_eq!(got.decode_aborted, Some(DecodeAbort::UnsupportedEncoding), "{value}");
        // Every byte received counted as output: the safe side for a budget.
        assert_eq!(got.usage.output, tokens_from_bytes(fx.body.len() as u64), "{value}");
        assert_eq!(got.usage.input, fx.input_estimate, "{value}");
    }
}

#[test]
fn corrupt_streams_end_estimated_as_corrupt() {
    let fx = fixtures().into_iter().find(|f| f.name == "anthropic_messages.json").unwrap();
    for coding in CODINGS {
        // The plain body sent with a coding it does not have. (`{` also starts a valid raw
        // deflate block: that one decodes to garbage and ends before the input does.)
        let got = meter_coded(&fx, header(coding), [fx.body.as_slice()]);
        assert_eq!(got.decode_aborted, Some(DecodeAbort::Corrupt), "{coding}");
        assert_eq!(got.source, UsageSource::Estimated, "{coding}");
    }
    // A bit flipped in the gzip body fails its CRC (or the inflate); the trailer too.
    let body = gzip(&fx.body);
    for at in [body.len() / 2, body.len() - 6, body.len() - 2] {
        let mut bad = body.clone();
        bad[at] ^= 0x10;
        let got = meter_coded(&fx, "gzip", [bad.as_slice()]);
        assert_eq!(got.decode_aborted, Some(DecodeAbort::Corrupt), "flip at {at}");
        assert_eq!(got.source, UsageSource::Estimated, "flip at {at}");
    }
}

#[test]
fn a_compressed_body_cut_off_is_metered_like_the_plain_body_cut_off() {
    let fx = fixtures().into_iter().find(|f| f.name == "anthropic_stream.sse").unwrap();
    let body = gzip_flushed_per_event(&fx.body);
    let cut = body.len() / 2;
    let plain_cut: Vec<u8> = {
        let mut d = Decoder::new(ContentEncoding::parse("gzip"), DecodeLimits::default()).unwrap();
        let mut out = Vec::new();
        for c in &body[..cut] {
            d.feed(c, &mut |p| out.extend_from_slice(p));
        }
        out
    };
    let mut m = Meter::new(fx.api, true).with_encoding(Some("gzip"));
    for c in &body[..cut] {
        m.feed(c);
    }
    let mut plain = Meter::new(fx.api, true);
    plain.feed(&plain_cut);
    let got = m.finish(fx.input_estimate);
    assert_eq!(got, plain.finish(fx.input_estimate));
    assert_eq!(got.decode_aborted, None);
    assert!(!got.complete);
}

type Coded = (Fixture, Metered, Vec<(&'static str, Vec<u8>)>);

/// Every fixture, its plain metering and its body in every coding, computed once.
fn compressed_fixtures() -> &'static [Coded] {
    static ALL: std::sync::OnceLock<Vec<Coded>> = std::sync::OnceLock::new();
    ALL.get_or_init(|| {
        fixtures()
            .into_iter()
            .map(|fx| {
                let coded = CODINGS.iter().map(|&c| (c, compress(c, &fx.body))).collect();
                let plain = whole(&fx);
                (fx, plain, coded)
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_chunking_of_any_coding_meters_like_the_plain_body(
        cuts in prop::collection::vec(any::<Index>(), 0..40),
    ) {
        for (fx, plain, coded) in compressed_fixtures() {
            for (coding, body) in coded {
                let got = meter_coded(fx, header(coding), split(body, &cuts));
                prop_assert_eq!(&got, plain, "{} as {}", &fx.name, coding);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        cuts in prop::collection::vec(any::<Index>(), 0..8),
        prefix in 0usize..4,
    ) {
        // Start some inputs with a valid magic so that the decoders get past their headers.
        let magics: [&[u8]; 4] = [b"", &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255], &[0x78, 0x9c], &[0x28, 0xb5, 0x2f, 0xfd]];
        let mut input = magics[prefix].to_vec();
        input.extend_from_slice(&bytes);
        for value in ["gzip", "deflate", "br", "zstd"] {
            let limits = DecodeLimits { max_decoded_bytes: 1 << 20, ..DecodeLimits::default() };
            let mut d = Decoder::new(ContentEncoding::parse(value), limits).unwrap();
            for c in split(&input, &cuts) {
                d.feed(c, &mut |p| assert!(p.len() <= OUT_BUF));
            }
            d.finish(&mut |_| {});
            prop_assert!(d.decoded_bytes() <= 1 << 20);
            let mut m = Meter::new(Api::Messages, true).with_encoding(Some(value));
            m.feed(&input);
            let _ = m.finish(1);
        }
    }
}
