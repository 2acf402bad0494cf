//! The official OpenAI and Anthropic Python SDKs (installed by `scripts/test` into
//! `target/py`) use Tollgate by setting their base URL and the attribution headers: calls and
//! streams succeed and are metered, an untagged call raises the SDK's permission error naming
//! the missing headers, and an exhausted budget raises a non-retried error.

use std::path::PathBuf;
use std::process::Stdio;

use serde_json::Value;
use tollgate_e2e::harness::Harness;

fn python() -> PathBuf {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/py/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run ./scripts/test, which installs the openai and anthropic SDKs there",
        python.display()
    );
    python
}

#[tokio::test]
async fn official_sdks_work_through_the_reverse_proxy() {
    let policy = "version: v1\ndefaults: {llm: allow}\n\
                  budgets: [{id: broke, scope: agent, key: sdk-broke, period: daily, amount: \"0.01\"}]\n";
    let h = Harness::builder().policy(policy).start().await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sdk/reverse_proxy.py");
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::process::Command::new(python())
            .arg(&script)
            .arg(&h.proxy)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output(),
    )
    .await
    .expect("the SDK script finished within 60 s")
    .expect("the SDK script ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK script failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let checks: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let check = |name: &str| -> &Value {
        checks.iter().find(|c| c["check"] == name).unwrap_or_else(|| panic!("no {name}: {stdout}"))
    };

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
