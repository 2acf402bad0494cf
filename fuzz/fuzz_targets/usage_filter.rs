//! The filter that removes the usage chunk Tollgate asked an OpenAI stream for: any bytes, split
//! anywhere. It must never panic, never invent bytes, and pass through a stream without a
//! usage chunk unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_core::metering::UsageChunkFilter;

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else { return };
    let mut filter = UsageChunkFilter::with_max_event(4096);
    let mut out = Vec::new();
    for chunk in body.chunks(usize::from(split).max(1)) {
        filter.filter(chunk, &mut out);
    }
    filter.finish(&mut out);
    assert!(out.len() <= body.len(), "the filter added bytes");
    if filter.removed() == 0 {
        assert_eq!(out, body, "nothing removed, yet the stream changed");
    }
});
