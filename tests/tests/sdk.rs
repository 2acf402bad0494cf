//! The official OpenAI and Anthropic Python SDKs (installed by `scripts/test` into
//! `target/py`) use Tollgate by setting their base URL and the attribution headers: calls and
//! streams succeed and are metered, an untagged call raises the SDK's permission error naming
//! the missing headers, and an exhausted budget raises a non-retried error.

use tollgate_e2e::harness::Harness;
use tollgate_e2e::mock;
use tollgate_e2e::sdk::{self, Checks};

#[tokio::test]
async fn official_sdks_work_through_the_reverse_proxy() {
    let policy = "version: v1\ndefaults: {llm: allow}\n\
                  budgets: [{id: broke, scope: agent, key: sdk-broke, period: daily, amount: \"0.01\"}]\n";
    let h = Harness::builder().policy(policy).start().await;
    let mut command = sdk::command("reverse_proxy.py");
    command.arg(&h.proxy);
    let checks = Checks::run(command).await;
    let check = |name: &str| checks.get(name);

    assert_eq!(check("openai_chat")["content"], "Hello from the mock upstream");
    let stream = check("openai_stream");
    assert_eq!(stream["text"], "Hello from the mock upstream");
    assert_eq!(stream["usage_chunks"], 0, "the usage chunk Tollgate asked for is removed");

    let untagged = check("openai_untagged");
    assert_eq!(untagged["raised"], "PermissionDeniedError");
    assert_eq!(untagged["status"], 403);
    let message = untagged["message"].as_str().unwrap();
    for header in ["x-agent-id", "x-cost-center", "x-project-id"] {
        assert!(message.contains(header), "{message}");
    }

    assert_eq!(check("anthropic_message")["text"], "Hello from the mock upstream");
    assert_eq!(check("anthropic_stream")["text"], "Hello from the mock upstream");

    let budget = check("anthropic_budget");
    assert_eq!(budget["status"], 402);
    assert!(budget["message"].as_str().unwrap().contains("broke"), "{budget}");

    // Four calls forwarded and metered; the refused ones never reached the upstream, and the
    // 402 was not retried by the SDK (max_retries=2).
    assert_eq!(h.mock.request_count(), 4);
    let ledger = h.ledger_until(4).await;
    assert_eq!(ledger.len(), 4);
    for record in &ledger {
        assert_eq!(record["usage_source"], "reported", "{record}");
        assert!(record["cost_nano_usd"].as_i64().unwrap() > 0, "{record}");
        assert_eq!(record["agent"], "sdk-agent");
    }
    let metrics = h.metrics().await;
    let refused = metrics
        .lines()
        .find(|l| l.starts_with("tollgate_requests_total") && l.contains("budget_exceeded"))
        .unwrap_or_else(|| panic!("no budget_exceeded counter:\n{metrics}"));
    assert!(refused.ends_with(" 1"), "one 402, not retried: {refused}");
}

/// Listing and reading models is free at the providers: both SDKs' `models.list()` and
/// `models.retrieve()` pass through the sidecar, attributed and recorded at $0; an untagged
/// listing is still refused.
#[tokio::test]
async fn official_sdks_list_models_through_the_reverse_proxy_at_no_cost() {
    let h = Harness::builder().policy("version: v1\ndefaults: {llm: allow}\n").start().await;
    let mut command = sdk::command("models.py");
    command.arg(&h.proxy);
    let checks = Checks::run(command).await;
    let check = |name: &str| checks.get(name);

    let ids = |name: &str| check(name)["ids"].clone();
    assert_eq!(ids("openai_models"), serde_json::json!(mock::models::OPENAI));
    assert_eq!(check("openai_model")["id"], "gpt-4o-mini");
    assert_eq!(ids("anthropic_models"), serde_json::json!(mock::models::ANTHROPIC));
    assert_eq!(check("anthropic_model")["id"], "claude-haiku-4-5-20251001");
    for name in ["openai_untagged", "anthropic_untagged"] {
        let untagged = check(name);
        assert_eq!(untagged["raised"], "PermissionDeniedError", "{untagged}");
        assert_eq!(untagged["status"], 403);
        assert!(untagged["message"].as_str().unwrap().contains("x-agent-id"), "{untagged}");
    }

    // Four listings forwarded and recorded, attributed, at $0; the untagged ones never left.
    assert_eq!(h.mock.request_count(), 4);
    let ledger = h.ledger_until(4).await;
    assert_eq!(ledger.len(), 4);
    for record in &ledger {
        assert_eq!(record["agent"], "sdk-lister", "{record}");
        assert_eq!(record["status"], 200, "{record}");
        assert_eq!(record["cost_nano_usd"], 0, "{record}");
        assert_eq!(record["price_source"], "free", "{record}");
    }
}

/// The SDKs offer gzip and deflate; the mock answers compressed (gzip when offered; deflate
/// forced), JSON and SSE: every call is metered exactly as the same call answered plain.
#[tokio::test]
async fn compressed_answers_are_metered_exactly_through_the_reverse_proxy() {
    let h = Harness::builder().start().await;
    let mut runs = Vec::new();
    for (agent, coding) in [("plain", "identity"), ("gzip", "offered"), ("deflate", "deflate")] {
        let mut command = sdk::command("compressed.py");
        command.arg(agent).arg(coding).arg(&h.proxy);
        runs.push((agent, Checks::run(command).await));
    }
    let n = sdk::COMPRESSED_CALLS.len();
    let ledger = h.ledger_until(3 * n).await;
    let of = |agent: &str| -> Vec<&serde_json::Value> {
        ledger.iter().filter(|r| r["agent"] == agent).collect()
    };
    let plain = of("plain");
    for record in &plain {
        assert!(record["cost_nano_usd"].as_i64().unwrap() > 0, "{record}");
    }
    sdk::assert_metered_like_plain(&runs[0].1, &plain, &plain, None, true);
    sdk::assert_metered_like_plain(&runs[1].1, &of("gzip"), &plain, Some("gzip"), false);
    sdk::assert_metered_like_plain(&runs[2].1, &of("deflate"), &plain, Some("deflate"), true);
    // The SDK's own Accept-Encoding went upstream, except where the usage chunk is removed.
    let offered: Vec<_> = h
        .mock
        .requests()
        .iter()
        .filter_map(|r| r.header("accept-encoding").map(str::to_owned))
        .collect();
    assert!(offered.iter().any(|a| a.contains("gzip")), "{offered:?}");
    assert_eq!(offered.iter().filter(|a| *a == "identity").count(), 3, "{offered:?}");
    let metrics = h.metrics().await;
    assert!(
        metrics.lines().any(|l| l == "tollgate_meter_decode_aborted_total{reason=\"corrupt\"} 0"),
        "{metrics}"
    );
}
