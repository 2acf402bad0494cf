//! The request framing the proxy follows before hyper (`tollgate_core::framing`): any bytes,
//! split anywhere, handed on in any amounts. It must never panic; what it hands on only grows
//! and never exceeds what it was given; it is the input except inside the values of framing
//! headers it neutralised; and how the bytes were split changes nothing (what comes out, what
//! is held back, the framer's state).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_core::framing::Framer;

struct Run {
    out: Vec<u8>,
    held: Vec<u8>,
    framer: Framer,
}

/// Feeds `input` in reads of the given sizes (cycled), handing on at most `handout` ready bytes
/// after each read (0: all of them), the way the proxy's reader does, including its reads
/// straight into the caller's buffer inside a body of known length.
fn run(input: &[u8], max_head: usize, sizes: &[usize], handout: usize) -> Run {
    let mut framer = Framer::new(max_head);
    let mut pending = Vec::new();
    let mut ready = 0;
    let mut out = Vec::new();
    let mut at = 0;
    let mut sizes = sizes.iter().cycle();
    while at < input.len() {
        let size = sizes.next().copied().unwrap_or(usize::MAX).clamp(1, input.len() - at);
        if pending.is_empty() {
            if let Some(left) = framer.body_left() {
                let take = size.min(usize::try_from(left).unwrap_or(usize::MAX));
                let mut direct = input[at..at + take].to_vec();
                let mut passed = 0;
                framer.examine(&mut direct, &mut passed);
                assert_eq!(passed, take, "a body byte was held back");
                out.extend_from_slice(&direct);
                at += take;
                continue;
            }
        }
        pending.extend_from_slice(&input[at..at + size]);
        at += size;
        let before = ready;
        framer.examine(&mut pending, &mut ready);
        assert!(ready >= before, "ready moved back from {before} to {ready}");
        assert!(ready <= pending.len(), "ready {ready} beyond the {} bytes", pending.len());
        let n = if handout == 0 { ready } else { ready.min(handout) };
        out.extend(pending.drain(..n));
        ready -= n;
    }
    out.extend(pending.drain(..ready));
    Run { out, held: pending, framer }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether `out[i]` lies in the value of a `Content-Length` or `Transfer-Encoding` line.
fn in_framing_value(out: &[u8], i: usize) -> bool {
    let start = out[..i].windows(2).rposition(|w| w == b"\r\n").map_or(0, |p| p + 2);
    let end = find(&out[start..], b"\r\n").map_or(out.len(), |p| start + p);
    let line = &out[start..end];
    let Some(colon) = line.iter().position(|&b| b == b':') else { return false };
    let name = &line[..colon];
    (name.eq_ignore_ascii_case(b"content-length")
        || name.eq_ignore_ascii_case(b"transfer-encoding"))
        && i > start + colon
}

fuzz_target!(|data: &[u8]| {
    // Control bytes: the head limit, how much is handed on per read, and the read sizes.
    let [limit, handout, count, rest @ ..] = data else { return };
    let max_head = usize::from(*limit) * 8;
    let count = usize::from(*count % 8).min(rest.len());
    let (sizes, input) = rest.split_at(count);
    let sizes: Vec<usize> = sizes.iter().map(|&s| usize::from(s)).collect();

    let whole = run(input, max_head, &[input.len()], 0);
    assert_eq!(whole.out.len() + whole.held.len(), input.len(), "bytes added or lost");
    assert_eq!(whole.held, input[whole.out.len()..], "held bytes were changed");
    for (i, (&o, &b)) in whole.out.iter().zip(input).enumerate() {
        if o != b {
            assert!(in_framing_value(&whole.out, i), "byte {i} changed outside a framing value");
            assert!(b"x89".contains(&o), "byte {i} became {o:#x}");
        }
    }

    let split = run(input, max_head, &sizes, usize::from(*handout));
    assert_eq!(split.out, whole.out, "the split changed what was handed on");
    assert_eq!(split.held, whole.held, "the split changed what is held back");
    assert_eq!(split.framer, whole.framer, "the split changed the state");
    let bytewise = run(input, max_head, &[1], 1);
    assert_eq!(bytewise.out, whole.out, "byte-by-byte reads changed what was handed on");
    assert_eq!(bytewise.framer, whole.framer, "byte-by-byte reads changed the state");
});
