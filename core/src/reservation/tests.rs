use proptest::prelude::*;

use super::*;
use crate::inspect::inspect;
use crate::pricing::Rate;

fn limits(max_output: Option<u64>, window: Option<u64>) -> ModelLimits {
    ModelLimits { max_output_tokens: max_output, context_window: window }
}

const GPT_4O: ModelLimits =
    ModelLimits { max_output_tokens: Some(16_384), context_window: Some(128_000) };

fn chat(body: &str, l: ModelLimits) -> Bound {
    let info = inspect(Some(Api::ChatCompletions), body.as_bytes()).expect("inspectable");
    bound(Some(Api::ChatCompletions), &info, l)
}

#[test]
fn output_is_the_request_cap_lowered_to_the_model_limit() {
    let b = chat(r#"{"model":"gpt-4o","max_tokens":100,"messages":[]}"#, GPT_4O);
    assert_eq!((b.output, b.output_cap), (100, OutputCap::Requested));
    let b = chat(r#"{"model":"gpt-4o","max_completion_tokens":99999,"messages":[]}"#, GPT_4O);
    assert_eq!((b.output, b.output_cap), (16_384, OutputCap::ModelLimit));
    let huge = r#"{"model":"gpt-4o","max_tokens":18446744073709551615,"messages":[]}"#;
    assert_eq!(chat(huge, GPT_4O).output, 16_384);
    // Without a model limit the request's cap stands, however large: the reservation then
    // saturates and no budget or rate limit admits it.
    let b = chat(huge, ModelLimits::default());
    assert_eq!((b.output, b.tokens()), (u64::MAX, u64::MAX));
    // Only a context window known: it caps.
    let b = chat(huge, limits(None, Some(200_000)));
    assert_eq!((b.output, b.output_cap), (200_000, OutputCap::ContextWindow));
}

#[test]
fn without_a_cap_the_output_is_the_model_limit_then_the_window_then_the_assumption() {
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let b = chat(body, GPT_4O);
    assert_eq!((b.output, b.output_cap), (16_384, OutputCap::ModelLimit));
    let b = chat(body, limits(None, Some(8_192)));
    assert_eq!((b.output, b.output_cap), (8_192, OutputCap::ContextWindow));
    let b = chat(body, ModelLimits::default());
    assert_eq!((b.output, b.output_cap), (UNKNOWN_MAX_OUTPUT_TOKENS, OutputCap::Assumed));
    // The old 4,096-token assumption is gone: gpt-4o may answer 16,384.
    assert!(chat(body, GPT_4O).output > 4_096);
}

#[test]
fn embeddings_have_no_output() {
    let body = br#"{"model":"text-embedding-3-small","input":"hello"}"#;
    let info = inspect(Some(Api::Embeddings), body).unwrap();
    let b = bound(Some(Api::Embeddings), &info, ModelLimits::default());
    assert_eq!((b.output, b.output_cap), (0, OutputCap::NoOutput));
}

#[test]
fn text_input_is_bounded_by_the_body_bytes() {
    // 4 bytes per token is the estimate; one byte per token is the bound.
    let text = "x".repeat(10_000);
    let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{text}"}}]}}"#);
    let b = chat(&body, ModelLimits::default());
    assert_eq!(b.input, body.len() as u64 + REQUEST_OVERHEAD_TOKENS);
    let info = inspect(Some(Api::ChatCompletions), body.as_bytes()).unwrap();
    assert!(info.input_estimate_tokens * 3 < b.input, "the estimate is far below the bound");
    // Multi-byte text: still one token per byte at most.
    let cjk = "中".repeat(1000);
    let body = format!(r#"{{"messages":[{{"role":"user","content":"{cjk}"}}]}}"#);
    assert!(chat(&body, ModelLimits::default()).input >= 3000);
    // Never above the context window.
    assert_eq!(
        chat(&format!(r#"{{"messages":"{text}"}}"#), limits(None, Some(5_000))).input,
        5_000
    );
}

#[test]
fn images_and_files_are_bounded_per_item() {
    let b64 = "iVBORw0KGgo".repeat(10_000);
    let openai_image = format!(
        r#"{{"messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{b64}"}}}},
        {{"type":"image_url","image_url":{{"url":"https://example.com/cat.png"}}}}]}}]}}"#
    );
    let info = inspect(Some(Api::ChatCompletions), openai_image.as_bytes()).unwrap();
    assert_eq!(info.input.images, 2);
    assert!(info.input.text_bytes < 400, "the base64 is not text: {}", info.input.text_bytes);
    let b = bound(Some(Api::ChatCompletions), &info, ModelLimits::default());
    assert_eq!(b.input, info.input.text_bytes + 2 * IMAGE_TOKENS + REQUEST_OVERHEAD_TOKENS);
    // Offering tools adds the tool-use overhead.
    let body = r#"{"messages":[],"tools":[{"name":"f","input_schema":{}}]}"#;
    let info = inspect(Some(Api::Messages), body.as_bytes()).unwrap();
    let b = bound(Some(Api::Messages), &info, ModelLimits::default());
    assert_eq!(b.input, body.len() as u64 + REQUEST_OVERHEAD_TOKENS + TOOLS_OVERHEAD_TOKENS);

    let anthropic = format!(
        r#"{{"messages":[{{"role":"user","content":[{{"type":"image","source":{{"type":"base64","media_type":"image/png","data":"{b64}"}}}},
        {{"type":"document","source":{{"type":"base64","media_type":"application/pdf","data":"{b64}"}}}}]}}]}}"#
    );
    let info = inspect(Some(Api::Messages), anthropic.as_bytes()).unwrap();
    assert_eq!((info.input.images, info.input.files), (1, 1));
    assert!(info.input.text_bytes < 400);
    let b = bound(Some(Api::Messages), &info, limits(None, Some(200_000)));
    assert_eq!(b.input, 200_000, "a file is bounded by the window when it is known");

    // An untyped data: URL is an item of its own; inline audio stays counted by its bytes.
    let responses = format!(
        r#"{{"input":[{{"role":"user","content":[{{"type":"input_file","file_data":"data:application/pdf;base64,{b64}"}},
        {{"type":"input_audio","input_audio":{{"data":"{b64}","format":"wav"}}}}]}}]}}"#
    );
    let info = inspect(Some(Api::Responses), responses.as_bytes()).unwrap();
    assert_eq!((info.input.images, info.input.files), (0, 1));
    assert!(info.input.text_bytes >= b64.len() as u64, "audio bytes bound audio tokens");
}

#[test]
fn input_from_outside_the_body_is_bounded_by_the_window() {
    for body in [
        r#"{"input":"more","previous_response_id":"resp_1"}"#,
        r#"{"input":"more","conversation":"conv_1"}"#,
        r#"{"prompt":{"id":"pmpt_1"}}"#,
        r#"{"input":"q","tools":[{"type":"web_search"}]}"#,
        r#"{"messages":[],"tools":[{"type":"web_search_20250305","name":"web_search"}]}"#,
        r#"{"messages":[],"mcp_servers":[{"type":"url","url":"https://x"}]}"#,
        r#"{"messages":[],"web_search_options":{}}"#,
    ] {
        let info = inspect(Some(Api::Responses), body.as_bytes()).unwrap();
        assert!(info.input.open, "{body}");
        let b = bound(Some(Api::Responses), &info, GPT_4O);
        assert_eq!(b.input, 128_000, "{body}");
        let b = bound(Some(Api::Responses), &info, ModelLimits::default());
        assert_eq!(b.input, OPEN_INPUT_TOKENS, "{body}");
    }
    for body in [
        r#"{"messages":[],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]}"#,
        r#"{"messages":[],"tools":[{"name":"f","input_schema":{"type":"object"}}]}"#,
        r#"{"messages":[],"tools":[{"type":"bash_20250124","name":"bash"}]}"#,
        r#"{"prompt":"legacy completion"}"#,
    ] {
        let info = inspect(Some(Api::ChatCompletions), body.as_bytes()).unwrap();
        assert!(!info.input.open, "{body}");
    }
}

fn bounded(input: u64, output: u64, l: ModelLimits) -> Bound {
    Bound { input, output, output_cap: OutputCap::Requested, open: false, limits: l }
}

#[test]
fn judge_believes_what_the_request_could_use() {
    let b = bounded(2_000, 16_384, GPT_4O);
    let ok = Usage {
        input: 1_500,
        cached_input: 500,
        output: 16_000,
        reasoning: 384,
        ..Usage::default()
    };
    assert_eq!(judge(&ok, &b), Ok(()));
    // Over max_tokens but within the model's limit: the upstream ignored the cap; believable.
    let b = bounded(2_000, 100, GPT_4O);
    assert_eq!(judge(&Usage { output: 5_000, ..Usage::default() }, &b), Ok(()));
}

#[test]
fn judge_refuses_what_no_request_could_use() {
    let b = bounded(2_000, 100, GPT_4O);
    let cases = [
        (
            Usage { input: 2_001, ..Usage::default() },
            Implausible::Input { reported: 2_001, most: 2_000 },
        ),
        (
            Usage { cached_input: u64::MAX, ..Usage::default() },
            Implausible::Input { reported: u64::MAX, most: 2_000 },
        ),
        (
            Usage { reasoning: 16_385, ..Usage::default() },
            Implausible::Output { reported: 16_385, most: 16_384 },
        ),
        (
            Usage { output: u64::MAX, reasoning: u64::MAX, ..Usage::default() },
            Implausible::Output { reported: u64::MAX, most: 16_384 },
        ),
    ];
    for (usage, want) in cases {
        assert_eq!(judge(&usage, &b), Err(want), "{usage:?}");
    }
    let b = bounded(120_000, 16_384, GPT_4O);
    let usage = Usage { input: 119_000, output: 16_000, ..Usage::default() };
    assert_eq!(
        judge(&usage, &b),
        Err(Implausible::ContextWindow { reported: 135_000, window: 128_000 })
    );
    // Unknown limits: more than max_tokens is believable up to the largest output of any
    // current model, not beyond.
    let b = bounded(2_000, 100, ModelLimits::default());
    assert_eq!(judge(&Usage { output: 101, ..Usage::default() }, &b), Ok(()));
    let too_much = Usage { output: UNKNOWN_MAX_OUTPUT_TOKENS + 1, ..Usage::default() };
    assert!(matches!(judge(&too_much, &b), Err(Implausible::Output { .. })));
    // Open input may pass one window (tool loops) but not the ceiling.
    let b = Bound { open: true, ..bounded(128_000, 100, GPT_4O) };
    assert_eq!(judge(&Usage { input: 500_000, ..Usage::default() }, &b), Ok(()));
    assert!(judge(&Usage { input: OPEN_INPUT_CEILING_TOKENS + 1, ..Usage::default() }, &b).is_err());
}

fn rates() -> Rates {
    Rates::new(Rate::per_million("2.50").unwrap(), Rate::per_million("10.00").unwrap())
}

#[test]
fn implausible_usage_is_billed_at_the_reservation() {
    let b = bounded(2_000, 16_384, GPT_4O);
    let reserved = b.worst_case(&rates());
    let absurd = Usage { input: 10, output: u64::MAX, ..Usage::default() };
    let billed = bill(absurd, UsageSource::Reported, &b, reserved, |u| rates().price(u));
    assert_eq!(billed.source, UsageSource::Implausible);
    assert_eq!(billed.cost, reserved);
    assert_eq!(billed.usage, Usage { input: 2_000, output: 16_384, ..Usage::default() });
    assert!(billed.implausible.is_some());
    // $0.005 + $0.16384: the worst case, not $9.2 billion.
    assert_eq!(billed.cost.total, Money::from_nanos(168_840_000));

    // An estimate (a stream cut after message_start, a body that could not be decoded) is
    // capped at the bound: never billed above the reservation, still marked estimated.
    let billed = bill(absurd, UsageSource::Estimated, &b, reserved, |u| rates().price(u));
    assert_eq!(billed.source, UsageSource::Estimated);
    assert!(billed.cost.total <= reserved.total);
    assert_eq!(billed.usage.output, 16_384);
    assert_eq!(billed.implausible, None);

    let fine = Usage { input: 1_000, output: 1_000, ..Usage::default() };
    let billed = bill(fine, UsageSource::Reported, &b, reserved, |u| rates().price(u));
    assert_eq!((billed.source, billed.implausible), (UsageSource::Reported, None));
    assert_eq!(billed.cost, rates().price(fine));
    // Nothing metered: never judged.
    let billed = bill(Usage::default(), UsageSource::None, &b, reserved, |_| Cost::ZERO);
    assert_eq!(billed.cost, Cost::ZERO);
}

#[test]
fn overrun_is_the_excess_only() {
    assert_eq!(overrun(Money::from_nanos(100), Money::from_nanos(250)), Money::from_nanos(150));
    assert_eq!(overrun(Money::from_nanos(100), Money::from_nanos(50)), Money::ZERO);
    assert_eq!(overrun(Money::MAX, Money::MAX), Money::ZERO);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Plausible usage never costs more than the reservation (up to the 3 nano-USD of rounding
    /// of the five buckets, see `Rates::worst_case`), whatever the numbers.
    #[test]
    fn plausible_usage_fits_the_reservation(
        input in any::<u64>(), output in any::<u64>(),
        max_out in proptest::option::of(any::<u64>()), window in proptest::option::of(any::<u64>()),
        usage in any::<[u64; 5]>(),
        ri in 0u64..1_000_000_000_000, ro in 0u64..1_000_000_000_000,
    ) {
        let b = bounded(input, output, limits(max_out, window));
        let b = Bound { output: b.output.min(max_out.unwrap_or(u64::MAX)), ..b };
        let rates = Rates::new(Rate::from_nanos_per_million(ri), Rate::from_nanos_per_million(ro));
        let u = Usage { input: usage[0], cached_input: usage[1], cache_write: usage[2], output: usage[3], reasoning: usage[4] };
        let reserved = b.worst_case(&rates);
        let billed = bill(u, UsageSource::Reported, &b, reserved, |u| rates.price(u));
        if billed.implausible.is_none() && u.total_output() <= b.output {
            prop_assert!(billed.cost.total <= reserved.total + Money::from_nanos(3),
                "{u:?} cost {} > reserved {}", billed.cost.total, reserved.total);
        }
        prop_assert!(billed.cost.total >= Money::ZERO);
        prop_assert!(reserved.total >= Money::ZERO);
    }

    /// A bound never wraps: more of anything never gives a smaller bound.
    #[test]
    fn bounds_are_monotonic(
        text in any::<u64>(), images in any::<u64>(), files in any::<u64>(), extra in any::<u64>(),
    ) {
        let m = InputMeasure { text_bytes: text, images, files, tools: false, open: false };
        let more = InputMeasure { text_bytes: text.saturating_add(extra), ..m };
        let l = ModelLimits::default();
        prop_assert!(input_bound(&more, l) >= input_bound(&m, l));
        prop_assert!(input_bound(&m, l) >= text);
        let b = bounded(input_bound(&m, l), u64::MAX, l);
        prop_assert_eq!(b.tokens(), u64::MAX);
    }
}
