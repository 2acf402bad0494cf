//! Golden fixtures (`core/fixtures/metering/`, each with its `*.expected.json`), chunking
//! invariance, and the provider quirks one by one.

use std::path::PathBuf;

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::Value;

use super::*;

pub(super) struct Fixture {
    pub(super) name: String,
    pub(super) api: Api,
    pub(super) streaming: bool,
    pub(super) input_estimate: u64,
    pub(super) body: Vec<u8>,
    expected: Value,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/metering")
}

fn api_named(name: &str) -> Api {
    let all =
        [Api::ChatCompletions, Api::Completions, Api::Responses, Api::Embeddings, Api::Messages];
    all.into_iter().find(|a| a.as_str() == name).expect("known api")
}

pub(super) fn fixtures() -> Vec<Fixture> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir()).expect("fixture dir") {
        let path = entry.expect("entry").path();
        if !path.to_string_lossy().ends_with(".expected.json") {
            continue;
        }
        let spec: Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        let name = spec["fixture"].as_str().expect("fixture").to_owned();
        out.push(Fixture {
            body: std::fs::read(dir().join(&name)).expect("fixture body"),
            api: api_named(spec["api"].as_str().expect("api")),
            streaming: spec["streaming"].as_bool().expect("streaming"),
            input_estimate: spec["input_estimate"].as_u64().expect("input_estimate"),
            expected: spec["metered"].clone(),
            name,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(out.len(), 10, "every fixture has its expected file");
    out
}

fn meter<'a>(fx: &Fixture, limits: Limits, chunks: impl IntoIterator<Item = &'a [u8]>) -> Metered {
    let mut m = Meter::with_limits(fx.api, fx.streaming, limits);
    for c in chunks {
        m.feed(c);
    }
    m.finish(fx.input_estimate)
}

pub(super) fn whole(fx: &Fixture) -> Metered {
    meter(fx, Limits::default(), [fx.body.as_slice()])
}

/// Splits `body` at the (sorted, deduplicated) positions chosen by `cuts`.
pub(super) fn split<'a>(body: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(body.len() + 1)).collect();
    at.sort_unstable();
    let mut out = Vec::new();
    let mut prev = 0;
    for a in at.into_iter().chain([body.len()]) {
        out.push(&body[prev..a]);
        prev = a;
    }
    out
}

fn with_line_ending(body: &[u8], eol: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        if i > 0 {
            out.extend_from_slice(eol);
        }
        out.extend_from_slice(line);
    }
    out
}

#[test]
fn fixtures_meter_to_their_expected_usage() {
    for fx in fixtures() {
        let got = serde_json::to_value(whole(&fx)).expect("serialize");
        assert_eq!(got, fx.expected, "{}", fx.name);
    }
}

#[test]
fn one_byte_chunks_meter_the_same_as_whole_bodies() {
    for fx in fixtures() {
        let got = meter(&fx, Limits::default(), fx.body.chunks(1));
        assert_eq!(got, whole(&fx), "{}", fx.name);
    }
}

#[test]
fn crlf_and_cr_line_endings_meter_the_same() {
    for fx in fixtures().into_iter().filter(|f| f.name.ends_with(".sse")) {
        for eol in [&b"\r\n"[..], b"\r"] {
            let body = with_line_ending(&fx.body, eol);
            let got = meter(&fx, Limits::default(), body.chunks(7));
            assert_eq!(got, whole(&fx), "{} with {eol:?}", fx.name);
        }
    }
}

#[test]
fn json_bodies_over_the_cap_still_find_usage_and_model() {
    for fx in fixtures().into_iter().filter(|f| f.name.ends_with(".json")) {
        let limits = Limits { max_body_bytes: 64, ..Limits::default() };
        assert_eq!(meter(&fx, limits, fx.body.chunks(5)), whole(&fx), "{}", fx.name);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_chunking_meters_like_the_whole_body(cuts in prop::collection::vec(any::<Index>(), 0..40)) {
        for fx in fixtures() {
            let got = meter(&fx, Limits::default(), split(&fx.body, &cuts));
            prop_assert_eq!(got, whole(&fx), "{}", &fx.name);
        }
    }

    #[test]
    fn any_chunking_of_crlf_and_cr_streams_meters_the_same(
        cuts in prop::collection::vec(any::<Index>(), 0..40),
    ) {
        for fx in fixtures().into_iter().filter(|f| f.name.ends_with(".sse")) {
            for eol in [&b"\r\n"[..], b"\r"] {
                let body = with_line_ending(&fx.body, eol);
                let got = meter(&fx, Limits::default(), split(&body, &cuts));
                prop_assert_eq!(got, whole(&fx), "{} with {:?}", &fx.name, eol);
            }
        }
    }

    #[test]
    fn any_chunking_over_the_body_cap_meters_the_same(
        cuts in prop::collection::vec(any::<Index>(), 0..40),
        cap in 1usize..700,
    ) {
        let limits = Limits { max_body_bytes: cap, ..Limits::default() };
        for fx in fixtures().into_iter().filter(|f| f.name.ends_with(".json")) {
            let reference = meter(&fx, limits, [fx.body.as_slice()]);
            prop_assert_eq!(meter(&fx, limits, split(&fx.body, &cuts)), reference, "{}", &fx.name);
        }
    }
}

fn meter_str(api: Api, streaming: bool, body: &str, input_estimate: u64) -> Metered {
    let mut m = Meter::new(api, streaming);
    m.feed(body.as_bytes());
    m.finish(input_estimate)
}

#[test]
fn anthropic_cumulative_output_is_the_latest_not_the_sum() {
    let fx = fixtures().into_iter().find(|f| f.name == "anthropic_stream.sse").expect("fixture");
    let got = whole(&fx);
    assert_eq!(got.usage.output, 47);
    assert_ne!(got.usage.output, 1 + 15 + 47);
    assert_ne!(got.usage.output, 15 + 47);
}

#[test]
fn anthropic_delta_repeating_input_as_zero_keeps_message_start_input() {
    let body = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-opus-4-1\",\"usage\":{\"input_tokens\":900,\"cache_read_input_tokens\":100,\"output_tokens\":1}}}\n\n\
                event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"input_tokens\":0,\"cache_read_input_tokens\":null,\"output_tokens\":30}}\n\n";
    let got = meter_str(Api::Messages, true, body, 5);
    assert_eq!(got.usage, Usage { input: 900, cached_input: 100, output: 30, ..Usage::default() });
    assert_eq!((got.source, got.complete), (UsageSource::Reported, false));
}

#[test]
fn repeated_openai_usage_chunks_are_not_summed() {
    let usage = r#"data: {"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":4}}"#;
    let body = format!("{usage}\n\n{usage}\n\ndata: [DONE]\n\n");
    let got = meter_str(Api::ChatCompletions, true, &body, 0);
    assert_eq!(got.usage, Usage { input: 10, output: 4, ..Usage::default() });
}

#[test]
fn responses_incomplete_and_failed_carry_usage() {
    for kind in ["response.incomplete", "response.failed"] {
        let body = format!(
            "event: {kind}\ndata: {{\"type\":\"{kind}\",\"response\":{{\"model\":\"gpt-5\",\"usage\":\
             {{\"input_tokens\":50,\"input_tokens_details\":{{\"cached_tokens\":20}},\
             \"output_tokens\":30,\"output_tokens_details\":{{\"reasoning_tokens\":25}}}}}}}}\n\n"
        );
        let got = meter_str(Api::Responses, true, &body, 0);
        let want = Usage { input: 30, cached_input: 20, output: 5, reasoning: 25, cache_write: 0 };
        assert_eq!(got.usage, want, "{kind}");
        assert_eq!((got.source, got.complete), (UsageSource::Reported, true), "{kind}");
    }
}

#[test]
fn responses_text_done_and_audio_deltas_are_not_counted_as_text() {
    let body = "data: {\"type\":\"response.output_text.delta\",\"delta\":\"abcdefgh\"}\n\n\
                data: {\"type\":\"response.output_text.done\",\"text\":\"abcdefgh\"}\n\n\
                data: {\"type\":\"response.audio.delta\",\"delta\":\"UklGRiQAAABXQVZFZm10IBAAAAABAAEA\"}\n\n";
    let got = meter_str(Api::Responses, true, body, 7);
    assert_eq!(got.usage, Usage { input: 7, output: 2, ..Usage::default() });
    assert_eq!(got.source, UsageSource::Estimated);
}

#[test]
fn streaming_request_answered_with_a_json_error_is_read_as_json() {
    let body = "\n {\"error\":{\"message\":\"Rate limit reached\",\"type\":\"rate_limit_error\"}}";
    let got = meter_str(Api::ChatCompletions, true, body, 12);
    assert_eq!(got.usage, Usage { input: 12, ..Usage::default() });
    assert_eq!((got.source, got.complete), (UsageSource::Estimated, true));
    let ok = "{\"model\":\"gpt-4o\",\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}";
    let got = meter_str(Api::ChatCompletions, true, ok, 12);
    assert_eq!((got.usage.input, got.usage.output, got.source), (3, 2, UsageSource::Reported));
}

#[test]
fn cut_off_json_body_is_estimated_from_its_bytes() {
    let body = r#"{"id":"chatcmpl-1","model":"gpt-4o","choices":[{"message":{"content":"Hel"#;
    let got = meter_str(Api::ChatCompletions, false, body, 40);
    let out = (body.len() as u64).div_ceil(4);
    assert_eq!(got.usage, Usage { input: 40, output: out, ..Usage::default() });
    assert_eq!(got.model.as_deref(), Some("gpt-4o"));
    assert!(!got.complete);
    let emb = r#"{"object":"list","data":[{"embedding":[0.1,0.2"#;
    assert_eq!(
        meter_str(Api::Embeddings, false, emb, 9).usage,
        Usage { input: 9, ..Usage::default() }
    );
}

#[test]
fn json_body_without_usage_is_estimated_from_its_text() {
    let body = r#"{"model":"llama-3","choices":[{"message":{"role":"assistant","content":"twelve bytes"}}]}"#;
    let got = meter_str(Api::ChatCompletions, false, body, 8);
    assert_eq!(got.usage, Usage { input: 8, output: 3, ..Usage::default() });
    assert_eq!((got.source, got.complete), (UsageSource::Estimated, true));
}

#[test]
fn oversized_event_is_skipped_but_later_usage_is_read() {
    let big = format!(
        "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
        "x".repeat(300)
    );
    let usage =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6}}\n\n";
    let limits = Limits { max_event_bytes: 128, ..Limits::default() };
    let mut m = Meter::with_limits(Api::ChatCompletions, true, limits);
    m.feed(big.as_bytes());
    m.feed(usage.as_bytes());
    let got = m.finish(0);
    assert_eq!(got.usage, Usage { input: 5, output: 6, ..Usage::default() });
}

#[test]
fn empty_stream_is_estimated_input_only() {
    let got = Meter::new(Api::Messages, true).finish(77);
    let want = Metered {
        usage: Usage { input: 77, ..Usage::default() },
        source: UsageSource::Estimated,
        model: None,
        complete: false,
        decode_aborted: None,
        finish_reasons: Vec::new(),
    };
    assert_eq!(got, want);
}

#[test]
fn paths_classify_to_endpoints() {
    let cases = [
        ("/v1/chat/completions", Some(Api::ChatCompletions)),
        ("/openai/v1/chat/completions?api-version=2025-04-01", Some(Api::ChatCompletions)),
        ("https://api.openai.com/v1/chat/completions/", Some(Api::ChatCompletions)),
        ("/v1/completions", Some(Api::Completions)),
        ("/v1/responses", Some(Api::Responses)),
        ("/v1/embeddings#x", Some(Api::Embeddings)),
        ("/anthropic/v1/messages?beta=true", Some(Api::Messages)),
        ("/v1/messages/count_tokens", None),
        ("/v1/responses/resp_123", None),
        ("/v1/models", None),
        ("/chat/completions", None),
        ("/v2/messages", None),
        ("", None),
    ];
    for (path, want) in cases {
        assert_eq!(Api::from_path(path), want, "{path}");
    }
    assert_eq!(Api::Messages.provider(), Provider::Anthropic);
    assert_eq!(Api::Responses.provider(), Provider::OpenAi);
    assert_eq!(Api::Embeddings.path(), "/v1/embeddings");
}

/// Usage field values an upstream could send: any integer, negative, floats, huge exponents,
/// strings, other JSON types.
fn count_literal() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        Just(u64::MAX.to_string()),
        Just("18446744073709551616".to_string()),
        Just("99999999999999999999999999999".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("JSON has no NaN or inf", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
        Just("1e308".to_string()),
        Just("1e400".to_string()),
        Just("-1e400".to_string()),
        Just("0.5".to_string()),
        "[a-z0-9 .-]{0,12}".prop_map(|s| format!("\"{s}\"")),
        Just("null".to_string()),
        Just("true".to_string()),
        Just("[1,2]".to_string()),
        Just("{\"n\":1}".to_string()),
    ]
}

/// Every usage parser (whole bodies, streams, the over-cap tail reader) fed `v` in each field.
fn usage_bodies(v: &[String; 4]) -> Vec<(Api, bool, String)> {
    let [a, b, c, d] = v;
    let chat = format!(
        r#""usage":{{"prompt_tokens":{a},"completion_tokens":{b},"prompt_tokens_details":{{"cached_tokens":{c}}},"completion_tokens_details":{{"reasoning_tokens":{d}}}}}"#
    );
    let responses = format!(
        r#""usage":{{"input_tokens":{a},"output_tokens":{b},"input_tokens_details":{{"cached_tokens":{c}}},"output_tokens_details":{{"reasoning_tokens":{d}}}}}"#
    );
    let messages = format!(
        r#""usage":{{"input_tokens":{a},"output_tokens":{b},"cache_read_input_tokens":{c},"cache_creation_input_tokens":{d}}}"#
    );
    vec![
        (Api::ChatCompletions, false, format!(r#"{{"model":"m","choices":[],{chat}}}"#)),
        (Api::Embeddings, false, format!(r#"{{"model":"m","data":[],{chat}}}"#)),
        (
            Api::ChatCompletions,
            true,
            format!("data: {{\"choices\":[],{chat}}}\n\ndata: [DONE]\n\n"),
        ),
        (Api::Responses, false, format!(r#"{{"model":"m","output":[],{responses}}}"#)),
        (
            Api::Responses,
            true,
            format!(
                "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"model\":\"m\",{responses}}}}}\n\n"
            ),
        ),
        (Api::Messages, false, format!(r#"{{"model":"m","content":[],{messages}}}"#)),
        (
            Api::Messages,
            true,
            format!(
                "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"model\":\"m\",{messages}}}}}\n\n\
                 event: message_delta\ndata: {{\"type\":\"message_delta\",{messages}}}\n\n\
                 event: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n"
            ),
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// No value in a usage field panics a parser or wraps a sum: every total is at least each of
    /// its parts, and an integer count is read exactly.
    #[test]
    fn usage_parsers_take_any_number_without_panic_or_wrap(
        v in [count_literal(), count_literal(), count_literal(), count_literal()],
        cap in prop_oneof![Just(8usize << 20), 16usize..200],
    ) {
        for (api, streaming, body) in usage_bodies(&v) {
            let limits = Limits { max_body_bytes: cap, ..Limits::default() };
            let mut m = Meter::with_limits(api, streaming, limits);
            m.feed(body.as_bytes());
            let u = m.finish(7).usage;
            prop_assert!(u.total_input() >= u.input.max(u.cached_input).max(u.cache_write));
            prop_assert!(u.total_output() >= u.output.max(u.reasoning));
            prop_assert!(u.total() >= u.total_input().max(u.total_output()));
            if let Ok(n) = v[0].parse::<u64>() {
                // Only a number the JSON parser itself rejects (1e400) falls back to an estimate.
                if v.iter().all(|x| !x.contains("e400")) {
                    prop_assert_eq!(u.total_input().max(n), u.total_input(), "{}", body);
                }
            }
        }
    }
}

#[test]
fn nonsense_counts_read_as_absurd_not_as_zero() {
    for bad in ["-5", "\"many\"", "true", "{}", "1e300", "18446744073709551615"] {
        let v = ["10".to_string(), bad.to_string(), "0".to_string(), "0".to_string()];
        for (api, streaming, body) in usage_bodies(&v) {
            if api == Api::Embeddings {
                continue;
            }
            let mut m = Meter::new(api, streaming);
            m.feed(body.as_bytes());
            let got = m.finish(0);
            assert_eq!(got.source, UsageSource::Reported, "{body}");
            assert_eq!(got.usage.total_output(), u64::MAX, "{bad} in {body}");
            assert_eq!(got.usage.total(), u64::MAX, "{body}");
        }
    }
}

#[test]
fn finish_reasons_are_read_only_when_asked_for() {
    let chat_stream = "data: {\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":null}]}\n\n\
        data: {\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"},{\"index\":1,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
        data: {\"model\":\"m\",\"choices\":[{\"index\":2,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
        data: [DONE]\n\n";
    let anthropic_stream = "event: message_delta\n\
        data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":3}}\n\n";
    let cases: [(Api, bool, &str, &[&str]); 5] = [
        (Api::ChatCompletions, true, chat_stream, &["length", "stop"]),
        (
            Api::ChatCompletions,
            false,
            r#"{"model":"m","choices":[{"index":0,"message":{},"finish_reason":"tool_calls"}]}"#,
            &["tool_calls"],
        ),
        (Api::Messages, true, anthropic_stream, &["end_turn"]),
        (
            Api::Messages,
            false,
            r#"{"model":"c","stop_reason":"max_tokens","usage":{}}"#,
            &["max_tokens"],
        ),
        (
            Api::Responses,
            false,
            r#"{"model":"m","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"}}"#,
            &["max_output_tokens"],
        ),
    ];
    for (api, streaming, body, want) in cases {
        let mut asked = Meter::new(api, streaming).with_finish_reasons();
        asked.feed(body.as_bytes());
        assert_eq!(asked.finish(0).finish_reasons, want, "{api:?} {body}");
        let mut plain = Meter::new(api, streaming);
        plain.feed(body.as_bytes());
        assert!(plain.finish(0).finish_reasons.is_empty(), "{api:?}: read without asking");
    }
}
