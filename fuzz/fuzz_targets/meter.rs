//! The response meter: any bytes, for any API, streamed or not, plain or compressed, split
//! anywhere. It must never panic, and what it reports must stay within what it was fed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_core::metering::{Api, Meter};

const APIS: [Api; 5] =
    [Api::ChatCompletions, Api::Completions, Api::Responses, Api::Embeddings, Api::Messages];
const ENCODINGS: [Option<&str>; 6] =
    [None, Some("gzip"), Some("deflate"), Some("br"), Some("zstd"), Some("gzip, br")];

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else { return };
    let api = APIS[usize::from(control & 7) % APIS.len()];
    let streaming = control & 8 != 0;
    let encoding = ENCODINGS[usize::from(control >> 4) % ENCODINGS.len()];
    // The second byte picks the chunk size: bodies arrive split anywhere.
    let Some((&split, body)) = rest.split_first() else { return };
    let mut meter = Meter::new(api, streaming).with_encoding(encoding);
    for chunk in body.chunks(usize::from(split).max(1)) {
        meter.feed(chunk);
    }
    let metered = meter.finish(body.len() as u64);
    // A report is taken as it is (judged later), but an estimate comes from what was seen.
    if metered.source != tollgate_core::usage::UsageSource::Reported {
        let seen = body.len() as u64 * 200 + 1_000_000;
        assert!(metered.usage.output <= seen, "{metered:?}");
    }
});
