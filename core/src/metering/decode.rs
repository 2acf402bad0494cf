//! Content-coding of a response body, undone for the meter.
//!
//! Decides what plain bytes a compressed response body (`Content-Encoding: gzip`, `deflate`,
//! `br` or `zstd`) carries, so that the meter reads the provider's usage from them. The adapter
//! still forwards the upstream's compressed bytes to the client untouched: [`Decoder`] works on
//! a copy, push-based like the meter, in any split of the input.
//!
//! Memory stays flat whatever the stream: input is decoded into one fixed [`OUT_BUF`] buffer,
//! handed to the sink and overwritten by the next piece; nothing is accumulated here. The work
//! is bounded by [`DecodeLimits`]: past `max_decoded_bytes` of plain bytes, or past
//! `max_ratio` plain bytes per compressed byte once `ratio_after_bytes` have been decoded, the
//! decoder stops for good and reports why ([`DecodeAbort`]); a decompression bomb therefore
//! costs at most that many bytes of decoding. An encoding it does not know, or a stream that is
//! not valid, stops it the same way. It never panics on any input.
//!
//! What each coding accepts:
//! - `gzip` (and `x-gzip`): RFC 1952, several members in a row, CRC-32 and length checked.
//! - `deflate`: the zlib-wrapped stream of RFC 9110 (Adler-32 checked), or a raw deflate
//!   stream, as some servers send; told apart by the zlib header.
//! - `br`: brotli (RFC 7932), windows up to the standard 16 MiB (no large-window streams).
//! - `zstd`: Zstandard frames (RFC 8878) with a window of at most 8 MiB, the limit RFC 9659 sets
//!   for the `zstd` content-coding; skippable frames are skipped.
//! - `identity` entries are ignored. Several codings stacked (`gzip, br`) are not decoded: the
//!   meter treats that as an unsupported encoding. No provider sends them, and undoing them in
//!   order would only multiply the state a stream holds.
//!
//! Bytes after the end of the last gzip member or brotli stream are ignored, as `gzip -d` does;
//! bytes after a deflate stream make it corrupt (a raw deflate stream can start with almost any
//! byte, so a mislabelled plain body shows only there).

use brotli_decompressor::{BrotliDecompressStream, BrotliResult, BrotliState, StandardAlloc};
use flate2::{Crc, Decompress, FlushDecompress, Status};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
use serde::Serialize;

/// Size of the one buffer plain bytes are decoded into.
pub const OUT_BUF: usize = 16 * 1024;

/// Bounds on the work one response's decoding may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Plain bytes decoded at most (default 64 MiB, eight times the largest JSON body the meter
    /// buffers whole; no model answer comes near).
    pub max_decoded_bytes: u64,
    /// Plain bytes per compressed byte allowed once `ratio_after_bytes` have been decoded
    /// (default 200: JSON and SSE from providers compress 5-50 to 1; a bomb is 1,000 to 1 for
    /// gzip and far more for brotli and zstd).
    pub max_ratio: u64,
    /// Plain bytes decoded before the ratio is checked (default 1 MiB), so that a short,
    /// very repetitive body is not refused.
    pub ratio_after_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits { max_decoded_bytes: 64 << 20, max_ratio: 200, ratio_after_bytes: 1 << 20 }
    }
}

/// Why decoding stopped before the end of the body. The meter then reports its usage as
/// estimated; adapters count these (`reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecodeAbort {
    /// A content-coding the meter does not decode, or several stacked.
    UnsupportedEncoding,
    /// The compressed bytes are not a valid stream of their coding (or fail its checksum).
    Corrupt,
    /// More than [`DecodeLimits::max_decoded_bytes`] plain bytes.
    TooLarge,
    /// More than [`DecodeLimits::max_ratio`] plain bytes per compressed byte.
    Ratio,
}

impl DecodeAbort {
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeAbort::UnsupportedEncoding => "unsupported_encoding",
            DecodeAbort::Corrupt => "corrupt",
            DecodeAbort::TooLarge => "too_large",
            DecodeAbort::Ratio => "ratio",
        }
    }

    /// Every reason, for adapters that pre-register one metric series per reason.
    pub const ALL: [DecodeAbort; 4] = [
        DecodeAbort::UnsupportedEncoding,
        DecodeAbort::Corrupt,
        DecodeAbort::TooLarge,
        DecodeAbort::Ratio,
    ];
}

/// A content-coding the decoder knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

/// What a `Content-Encoding` header value asks of the meter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentEncoding {
    /// No coding (absent, empty, or only `identity`): the body is plain.
    Identity,
    Coded(Coding),
    /// A coding not decoded here, or several stacked.
    Unsupported,
}

impl ContentEncoding {
    /// Parses a `Content-Encoding` value (case-insensitive, comma-separated list).
    pub fn parse(value: &str) -> ContentEncoding {
        let mut found = ContentEncoding::Identity;
        for token in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let coding = if token.eq_ignore_ascii_case("identity") {
                continue;
            } else if token.eq_ignore_ascii_case("gzip") || token.eq_ignore_ascii_case("x-gzip") {
                Coding::Gzip
            } else if token.eq_ignore_ascii_case("deflate") {
                Coding::Deflate
            } else if token.eq_ignore_ascii_case("br") {
                Coding::Brotli
            } else if token.eq_ignore_ascii_case("zstd") {
                Coding::Zstd
            } else {
                return ContentEncoding::Unsupported;
            };
            if found != ContentEncoding::Identity {
                return ContentEncoding::Unsupported;
            }
            found = ContentEncoding::Coded(coding);
        }
        found
    }
}

/// Undoes one response's content-coding; see the module documentation.
pub struct Decoder {
    stage: Stage,
    out: Box<[u8]>,
    limits: DecodeLimits,
    compressed: u64,
    decoded: u64,
    aborted: Option<DecodeAbort>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("compressed", &self.compressed)
            .field("decoded", &self.decoded)
            .field("aborted", &self.aborted)
            .finish_non_exhaustive()
    }
}

enum Stage {
    Gzip(Box<Gzip>),
    Deflate(Box<Deflate>),
    Brotli(Box<BrotliState<StandardAlloc, StandardAlloc, StandardAlloc>>),
    Zstd(Box<Zstd>),
    /// The stream ended (or decoding stopped): the rest of the input is ignored.
    Done,
}

/// Progress of one `feed`: how much input a stage used and whether it reached its end.
type StepResult = Result<(), DecodeAbort>;

impl Decoder {
    /// A decoder for `encoding`, or `None` when the body is plain.
    pub fn new(encoding: ContentEncoding, limits: DecodeLimits) -> Option<Decoder> {
        let stage = match encoding {
            ContentEncoding::Identity => return None,
            ContentEncoding::Unsupported => Stage::Done,
            ContentEncoding::Coded(Coding::Gzip) => Stage::Gzip(Box::default()),
            ContentEncoding::Coded(Coding::Deflate) => Stage::Deflate(Box::default()),
            ContentEncoding::Coded(Coding::Brotli) => Stage::Brotli(Box::new(BrotliState::new(
                StandardAlloc::default(),
                StandardAlloc::default(),
                StandardAlloc::default(),
            ))),
            ContentEncoding::Coded(Coding::Zstd) => Stage::Zstd(Box::default()),
        };
        let aborted =
            (encoding == ContentEncoding::Unsupported).then_some(DecodeAbort::UnsupportedEncoding);
        Some(Decoder {
            stage,
            out: vec![0; OUT_BUF].into_boxed_slice(),
            limits,
            compressed: 0,
            decoded: 0,
            aborted,
        })
    }

    /// Why decoding stopped early, if it did.
    pub fn aborted(&self) -> Option<DecodeAbort> {
        self.aborted
    }

    /// Compressed bytes received so far.
    pub fn compressed_bytes(&self) -> u64 {
        self.compressed
    }

    /// Plain bytes handed to the sink so far.
    pub fn decoded_bytes(&self) -> u64 {
        self.decoded
    }

    /// Decodes the next piece of the body, split anywhere, handing plain bytes to `sink`.
    pub fn feed(&mut self, input: &[u8], sink: &mut dyn FnMut(&[u8])) {
        self.compressed = self.compressed.saturating_add(input.len() as u64);
        if self.aborted.is_some() {
            return;
        }
        let mut emit = Emit {
            out: &mut self.out,
            limits: self.limits,
            compressed: self.compressed,
            decoded: &mut self.decoded,
            sink,
        };
        let result = match &mut self.stage {
            Stage::Gzip(gz) => gz.feed(input, &mut emit),
            Stage::Deflate(d) => d.feed(input, &mut emit),
            Stage::Brotli(state) => brotli_feed(state, input, &mut emit),
            Stage::Zstd(z) => z.feed(input, &mut emit),
            Stage::Done => Ok(()),
        };
        if let Err(reason) = result {
            self.aborted = Some(reason);
            self.stage = Stage::Done;
        }
    }

    /// Ends the body: decodes what a stage still holds (a zstd block waiting for more input
    /// cannot be, and is left).
    pub fn finish(&mut self, sink: &mut dyn FnMut(&[u8])) {
        if self.aborted.is_some() {
            return;
        }
        let mut emit = Emit {
            out: &mut self.out,
            limits: self.limits,
            compressed: self.compressed,
            decoded: &mut self.decoded,
            sink,
        };
        let result = match &mut self.stage {
            Stage::Zstd(z) => z.drain(&mut emit),
            _ => Ok(()),
        };
        if let Err(reason) = result {
            self.aborted = Some(reason);
        }
        self.stage = Stage::Done;
    }
}

/// The output side shared by the stages: the buffer, the bounds and the sink.
struct Emit<'a> {
    out: &'a mut [u8],
    limits: DecodeLimits,
    compressed: u64,
    decoded: &'a mut u64,
    sink: &'a mut dyn FnMut(&[u8]),
}

impl Emit<'_> {
    /// Hands `out[..n]` to the sink, unless that passes a bound.
    fn emit(&mut self, n: usize) -> StepResult {
        if n == 0 {
            return Ok(());
        }
        let decoded = self.decoded.saturating_add(n as u64);
        if decoded > self.limits.max_decoded_bytes {
            return Err(DecodeAbort::TooLarge);
        }
        if decoded > self.limits.ratio_after_bytes
            && decoded > self.compressed.saturating_mul(self.limits.max_ratio)
        {
            return Err(DecodeAbort::Ratio);
        }
        *self.decoded = decoded;
        (self.sink)(&self.out[..n]);
        Ok(())
    }
}

/// Runs `inflate` over all of `input`; `Ok(Some(used))` when the deflate stream ended after
/// `used` bytes of it, `Ok(None)` when all of it was used and more is needed. `crc` sees every
/// plain byte.
fn inflate(
    inflate: &mut Decompress,
    input: &[u8],
    emit: &mut Emit<'_>,
    mut crc: Option<&mut Crc>,
) -> Result<Option<usize>, DecodeAbort> {
    let mut pos = 0;
    loop {
        let (in0, out0) = (inflate.total_in(), inflate.total_out());
        let status = inflate
            .decompress(&input[pos..], emit.out, FlushDecompress::None)
            .map_err(|_| DecodeAbort::Corrupt)?;
        let used = (inflate.total_in() - in0) as usize;
        let made = (inflate.total_out() - out0) as usize;
        pos += used;
        if let Some(crc) = crc.as_deref_mut() {
            crc.update(&emit.out[..made]);
        }
        emit.emit(made)?;
        match status {
            Status::StreamEnd => return Ok(Some(pos)),
            _ if used == 0 && made == 0 => return Ok(None),
            _ => {}
        }
    }
}

/// Longest gzip header accepted (its optional name and comment are unbounded otherwise).
const MAX_GZIP_HEADER: usize = 64 * 1024;

#[derive(Default)]
enum GzPart {
    #[default]
    Header,
    Body,
    Trailer,
    /// After a member: another one may follow.
    Between,
    /// Trailing bytes that are no gzip member: ignored.
    Ignore,
}

struct Gzip {
    part: GzPart,
    /// The header, or the trailer, collected so far.
    held: Vec<u8>,
    inflate: Decompress,
    crc: Crc,
}

impl Default for Gzip {
    fn default() -> Self {
        Gzip {
            part: GzPart::Header,
            held: Vec::new(),
            inflate: Decompress::new(false),
            crc: Crc::new(),
        }
    }
}

impl Gzip {
    fn feed(&mut self, mut input: &[u8], emit: &mut Emit<'_>) -> StepResult {
        while !input.is_empty() {
            match self.part {
                GzPart::Between => {
                    if input[0] == 0x1f {
                        self.inflate.reset(false);
                        self.crc.reset();
                        self.held.clear();
                        self.part = GzPart::Header;
                    } else {
                        self.part = GzPart::Ignore;
                    }
                }
                GzPart::Ignore => return Ok(()),
                GzPart::Header => {
                    let before = self.held.len();
                    let take = input.len().min(MAX_GZIP_HEADER + 1 - before);
                    self.held.extend_from_slice(&input[..take]);
                    match gzip_header_len(&self.held)? {
                        Some(len) => {
                            input = &input[len - before..];
                            self.held.clear();
                            self.part = GzPart::Body;
                        }
                        None if self.held.len() > MAX_GZIP_HEADER => {
                            return Err(DecodeAbort::Corrupt)
                        }
                        None => return Ok(()),
                    }
                }
                GzPart::Body => {
                    match inflate(&mut self.inflate, input, emit, Some(&mut self.crc))? {
                        Some(used) => {
                            input = &input[used..];
                            self.part = GzPart::Trailer;
                        }
                        None => return Ok(()),
                    }
                }
                GzPart::Trailer => {
                    let take = input.len().min(8 - self.held.len());
                    self.held.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.held.len() == 8 {
                        let crc = u32::from_le_bytes([
                            self.held[0],
                            self.held[1],
                            self.held[2],
                            self.held[3],
                        ]);
                        let size = u32::from_le_bytes([
                            self.held[4],
                            self.held[5],
                            self.held[6],
                            self.held[7],
                        ]);
                        if crc != self.crc.sum() || size != self.crc.amount() {
                            return Err(DecodeAbort::Corrupt);
                        }
                        self.part = GzPart::Between;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The length of the gzip member header at the start of `h`; `None` until it is all there.
fn gzip_header_len(h: &[u8]) -> Result<Option<usize>, DecodeAbort> {
    const FHCRC: u8 = 2;
    const FEXTRA: u8 = 4;
    const FNAME: u8 = 8;
    const FCOMMENT: u8 = 16;
    let magic_ok = h.first().is_none_or(|&b| b == 0x1f)
        && h.get(1).is_none_or(|&b| b == 0x8b)
        && h.get(2).is_none_or(|&b| b == 8);
    if !magic_ok {
        return Err(DecodeAbort::Corrupt);
    }
    if h.len() < 10 {
        return Ok(None);
    }
    let flags = h[3];
    if flags & 0xe0 != 0 {
        return Err(DecodeAbort::Corrupt);
    }
    let mut at = 10;
    if flags & FEXTRA != 0 {
        let Some(xlen) = h.get(at..at + 2) else { return Ok(None) };
        at += 2 + usize::from(u16::from_le_bytes([xlen[0], xlen[1]]));
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            let Some(rest) = h.get(at..) else { return Ok(None) };
            let Some(nul) = memchr::memchr(0, rest) else { return Ok(None) };
            at += nul + 1;
        }
    }
    if flags & FHCRC != 0 {
        at += 2;
    }
    Ok((h.len() >= at).then_some(at))
}

#[derive(Default)]
struct Deflate {
    /// `None` until the first two bytes told a zlib stream from a raw one.
    inflate: Option<Decompress>,
    first: Option<u8>,
    /// The stream ended: any byte after it means the body was not deflate (a raw deflate
    /// stream can start with almost any byte, so this is how a mislabelled body shows).
    done: bool,
}

impl Deflate {
    fn feed(&mut self, input: &[u8], emit: &mut Emit<'_>) -> StepResult {
        if input.is_empty() {
            return Ok(());
        }
        if self.done {
            return Err(DecodeAbort::Corrupt);
        }
        let inflater = match &mut self.inflate {
            Some(i) => i,
            None => {
                let (b0, b1) = match self.first {
                    None if input.len() == 1 => {
                        self.first = Some(input[0]);
                        return Ok(());
                    }
                    None => (input[0], input[1]),
                    Some(b0) => (b0, input[0]),
                };
                // RFC 1950: CM 8, CINFO <= 7, and the header is a multiple of 31.
                let zlib = b0 & 0x0f == 8
                    && b0 >> 4 <= 7
                    && (u16::from(b0) << 8 | u16::from(b1)) % 31 == 0;
                let mut i = Decompress::new(zlib);
                if let Some(b0) = self.first.take() {
                    // The held first byte goes in before the rest.
                    if inflate(&mut i, &[b0], emit, None)?.is_some() {
                        // Ended within one byte, and `input` follows it.
                        return Err(DecodeAbort::Corrupt);
                    }
                }
                self.inflate.insert(i)
            }
        };
        if let Some(used) = inflate(inflater, input, emit, None)? {
            self.done = true;
            if used < input.len() {
                return Err(DecodeAbort::Corrupt);
            }
        }
        Ok(())
    }
}

fn brotli_feed(
    state: &mut BrotliState<StandardAlloc, StandardAlloc, StandardAlloc>,
    input: &[u8],
    emit: &mut Emit<'_>,
) -> StepResult {
    let mut available_in = input.len();
    let mut input_offset = 0;
    let mut total_out = 0;
    loop {
        let mut available_out = emit.out.len();
        let mut output_offset = 0;
        let result = BrotliDecompressStream(
            &mut available_in,
            &mut input_offset,
            input,
            &mut available_out,
            &mut output_offset,
            emit.out,
            &mut total_out,
            state,
        );
        emit.emit(output_offset)?;
        match result {
            BrotliResult::NeedsMoreOutput => {}
            BrotliResult::NeedsMoreInput | BrotliResult::ResultSuccess => return Ok(()),
            BrotliResult::ResultFailure => return Err(DecodeAbort::Corrupt),
        }
    }
}

/// Largest zstd window accepted (RFC 9659 §3).
const ZSTD_MAX_WINDOW: u64 = 8 << 20;
/// Largest zstd block: 128 KiB of content plus its 3-byte header.
const ZSTD_MAX_BLOCK: usize = (128 << 10) + 3;

/// Zstandard, decoded one whole block at a time: the input is held until the block it is part
/// of has arrived (at most [`ZSTD_MAX_BLOCK`] bytes), and each block is decoded by itself, so a
/// block that expands (an RLE block is 1 byte for up to 128 KiB) is drained into the output
/// buffer before the next one is read.
#[derive(Default)]
struct Zstd {
    frames: FrameDecoder,
    /// Compressed bytes not decoded yet.
    held: Vec<u8>,
    /// A frame is open (its header was read).
    in_frame: bool,
    /// The open frame ends in a 4-byte checksum.
    checksum: bool,
    /// Bytes of a skippable frame still to skip.
    skip: u64,
}

impl Zstd {
    fn feed(&mut self, input: &[u8], emit: &mut Emit<'_>) -> StepResult {
        let mut input = input;
        // Skippable frame content need not be held.
        if self.skip > 0 && self.held.is_empty() {
            let n = input.len().min(usize::try_from(self.skip).unwrap_or(usize::MAX));
            self.skip -= n as u64;
            input = &input[n..];
        }
        self.held.extend_from_slice(input);
        let mut at = 0;
        let result = self.step_all(&mut at, emit);
        self.held.drain(..at);
        result
    }

    /// Decodes every whole frame header and block in `held[at..]`, advancing `at`.
    fn step_all(&mut self, at: &mut usize, emit: &mut Emit<'_>) -> StepResult {
        loop {
            let rest = &self.held[*at..];
            if self.skip > 0 {
                let n = rest.len().min(usize::try_from(self.skip).unwrap_or(usize::MAX));
                self.skip -= n as u64;
                *at += n;
                if self.skip > 0 {
                    return Ok(());
                }
                continue;
            }
            if !self.in_frame {
                if rest.len() < 4 {
                    return Ok(());
                }
                let magic = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                if magic & 0xffff_fff0 == 0x184d_2a50 {
                    let Some(size) = rest.get(4..8) else { return Ok(()) };
                    self.skip = u64::from(u32::from_le_bytes([size[0], size[1], size[2], size[3]]));
                    *at += 8;
                    continue;
                }
                if magic != 0xfd2f_b528 {
                    return Err(DecodeAbort::Corrupt);
                }
                let Some(&fhd) = rest.get(4) else { return Ok(()) };
                let single_segment = fhd & 0x20 != 0;
                let fcs_len = match fhd >> 6 {
                    0 => usize::from(single_segment),
                    1 => 2,
                    2 => 4,
                    _ => 8,
                };
                let did_len = [0, 1, 2, 4][usize::from(fhd & 3)];
                let header_len = 5 + usize::from(!single_segment) + did_len + fcs_len;
                let Some(header) = rest.get(..header_len) else { return Ok(()) };
                let window = if single_segment {
                    let fcs = &header[header_len - fcs_len..];
                    let mut v = [0u8; 8];
                    v[..fcs_len].copy_from_slice(fcs);
                    let v = u64::from_le_bytes(v);
                    if fcs_len == 2 {
                        v + 256
                    } else {
                        v
                    }
                } else {
                    let wd = header[5];
                    let base = 1u64 << (10 + (wd >> 3));
                    base + (base / 8) * u64::from(wd & 7)
                };
                if window > ZSTD_MAX_WINDOW {
                    return Err(DecodeAbort::TooLarge);
                }
                self.frames.reset(header).map_err(|_| DecodeAbort::Corrupt)?;
                self.checksum = fhd & 4 != 0;
                self.in_frame = true;
                *at += header_len;
                continue;
            }
            if self.frames.is_finished() {
                self.drain(emit)?;
                if self.checksum
                    && self.frames.get_checksum_from_data() != self.frames.get_calculated_checksum()
                {
                    return Err(DecodeAbort::Corrupt);
                }
                self.in_frame = false;
                continue;
            }
            // The next block: a 3-byte header, then its content (1 byte for an RLE block).
            let Some(h) = rest.get(..3) else { return Ok(()) };
            let h = u32::from(h[0]) | u32::from(h[1]) << 8 | u32::from(h[2]) << 16;
            let last = h & 1 != 0;
            let size = (h >> 3) as usize;
            let content = match (h >> 1) & 3 {
                1 => 1,
                3 => return Err(DecodeAbort::Corrupt),
                _ => size,
            };
            let block_len = 3 + content + if last && self.checksum { 4 } else { 0 };
            if block_len > ZSTD_MAX_BLOCK + 4 {
                return Err(DecodeAbort::Corrupt);
            }
            let Some(mut block) = rest.get(..block_len) else { return Ok(()) };
            self.frames
                .decode_blocks(&mut block, BlockDecodingStrategy::UptoBlocks(1))
                .map_err(|_| DecodeAbort::Corrupt)?;
            *at += block_len;
            self.drain(emit)?;
        }
    }

    /// Hands on every decoded byte the frame no longer needs as its window (all of them once
    /// the frame is finished).
    fn drain(&mut self, emit: &mut Emit<'_>) -> StepResult {
        use std::io::Read;
        loop {
            let n = self.frames.read(emit.out).map_err(|_| DecodeAbort::Corrupt)?;
            if n == 0 {
                return Ok(());
            }
            emit.emit(n)?;
        }
    }
}
