//! The fixture corpus end to end through the core: every recorded response (JSON and SSE, both
//! providers, cached and reasoning tokens) is metered and priced with the built-in rate card, and
//! must come to the exact cost in its `*.expected.json` (computed independently by
//! `core/fixtures/metering/generate.py`). A model missing from the card must be an explicit
//! `UnknownModel`, never a silent $0.

use std::path::PathBuf;

use tollgate_core::metering::{Api, Meter};
use tollgate_core::pricing::RateCard;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/metering")
}

fn api(name: &str) -> Api {
    match name {
        "chat_completions" => Api::ChatCompletions,
        "completions" => Api::Completions,
        "responses" => Api::Responses,
        "embeddings" => Api::Embeddings,
        "messages" => Api::Messages,
        other => panic!("unknown api `{other}` in a fixture"),
    }
}

#[test]
fn every_fixture_is_metered_and_priced_to_its_exact_cost() {
    let card = RateCard::builtin().expect("built-in card");
    let mut checked = 0;
    for entry in std::fs::read_dir(fixtures()).expect("fixture dir") {
        let path = entry.expect("entry").path();
        if !path.to_string_lossy().ends_with(".expected.json") {
            continue;
        }
        let spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        let name = spec["fixture"].as_str().expect("fixture name");
        let body = std::fs::read(fixtures().join(name)).expect("fixture body");
        let mut meter = Meter::new(
            api(spec["api"].as_str().expect("api")),
            spec["streaming"].as_bool().expect("streaming"),
        );
        meter.feed(&body);
        let metered = meter.finish(spec["input_estimate"].as_u64().expect("input_estimate"));
        let model = metered.model.clone().expect("the fixture reports its model");
        match (card.price(&model, metered.usage), spec["cost_nano_usd"].as_i64()) {
            (Ok(priced), Some(expected)) => {
                assert_eq!(priced.cost.total.nanos(), expected, "{name}: cost of {model}");
                let buckets = priced.cost.input
                    + priced.cost.cached_input
                    + priced.cost.cache_write
                    + priced.cost.output
                    + priced.cost.reasoning
                    + priced.cost.per_call;
                assert_eq!(buckets, priced.cost.total, "{name}: line items add up");
            }
            (Err(unknown), None) => assert_eq!(unknown.model, model, "{name}"),
            (got, expected) => panic!("{name}: priced {got:?}, expected {expected:?}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 10, "every fixture was checked");
}
