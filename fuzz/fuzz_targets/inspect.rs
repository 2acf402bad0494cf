//! The request inspector and its `include_usage` rewrite: any body, for any API. Neither may
//! panic; a rewritten body must be JSON, and for a request the inspector reads, the rewrite must
//! read the same with `include_usage` set.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_core::inspect::{inspect, with_include_usage};
use tollgate_core::metering::Api;

const APIS: [Option<Api>; 6] = [
    None,
    Some(Api::ChatCompletions),
    Some(Api::Completions),
    Some(Api::Responses),
    Some(Api::Embeddings),
    Some(Api::Messages),
];

fuzz_target!(|data: &[u8]| {
    let Some((&control, body)) = data.split_first() else { return };
    let api = APIS[usize::from(control) % APIS.len()];
    let _ = inspect(api, body);
    let Some(rewritten) = with_include_usage(body) else { return };
    // JSON syntax, UTF-8 included (numbers are kept as written, so not `Value`, which refuses
    // 1e400).
    let text = std::str::from_utf8(&rewritten).expect("the rewrite is UTF-8");
    serde_json::from_str::<serde::de::IgnoredAny>(text).expect("the rewrite is JSON");
    // The proxy rewrites only a request it could inspect: the rewrite must inspect the same,
    // with include_usage set.
    if let Ok(before) = inspect(Some(Api::ChatCompletions), body) {
        let after = inspect(Some(Api::ChatCompletions), &rewritten).expect("the rewrite inspects");
        assert!(after.include_usage, "the rewrite did not set include_usage");
        assert_eq!(before.model, after.model);
        assert_eq!(before.stream, after.stream);
        assert_eq!(before.max_output_tokens, after.max_output_tokens);
    }
});
