//! The shared decision table (`tests/fixtures/decisions.json`) against the `tollgate` binary
//! itself (`tollgate run` as a process, in front of the mock upstream): every case must get the
//! table's status and decision headers. The same table runs in-process in
//! `tests/tests/decisions.rs` (the sidecar and HTTPS_PROXY mode, where each case's usage record
//! and metric changes are checked too) and through the Envoy filter in
//! `wasm-filter/tests/envoy.rs`.
//! `tollgate explain` must predict each case's answer from the same configuration.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_e2e::decisions::{Outcome, Table};
use tollgate_e2e::harness::temp_dir;
use tollgate_e2e::mock::MockUpstream;
use tollgate_e2e::process::{ConfigFile, Tollgate};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

#[tokio::test]
async fn the_binary_decides_the_shared_table_as_expected() {
    let table = Table::load();
    let mock = MockUpstream::start().await;
    let dir = temp_dir("decisions-bin");
    let routes = [
        format!(
            "{{name: anthropic, path_prefix: /v1/messages, kind: anthropic, upstream: \"{}\"}}",
            mock.base_url()
        ),
        format!(
            "{{name: mcp, path_prefix: /mcp, kind: mcp, category: read, upstream: \"{}\"}}",
            mock.base_url()
        ),
    ];
    let yaml = ConfigFile {
        upstream: &mock.base_url(),
        data_dir: &dir.join("data"),
        token_env: "TOLLGATE_DECISIONS_TEST_TOKEN",
        more_routes: &routes,
        extra: &table.sections_yaml(),
        policy: &serde_json::to_string(&table.policy).unwrap(),
    }
    .yaml();
    let config = dir.join("tollgate.yaml");
    std::fs::write(&config, yaml).unwrap();
    let proxy = tokio::task::spawn_blocking(move || Tollgate::run(Path::new(BIN), &config, &[]))
        .await
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut failures = Vec::new();
    for case in &table.cases {
        let send = |headers: Vec<(String, String)>| {
            let mut request = hyper::Request::post(format!("http://{}{}", proxy.proxy, case.path))
                .header("content-type", "application/json");
            for (name, value) in &headers {
                request = request.header(name.as_str(), value.as_str());
            }
            client.request(request.body(Full::new(Bytes::from(case.body.clone()))).unwrap())
        };
        // A repeated case's earlier sends build the live state the last one is decided on.
        for headers in case.earlier_headers("binary") {
            let earlier = send(headers).await.expect("the proxy answers");
            earlier.into_body().collect().await.expect("body");
        }
        let response = send(case.sent_headers("binary")).await.expect("the proxy answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.expect("body").to_bytes();
        let got = Outcome::of(status, |n| headers.get(n).and_then(|v| v.to_str().ok()));
        if got != case.expect {
            failures.push(format!(
                "{}: got {got:?}, want {:?}: {}",
                case.name,
                case.expect,
                String::from_utf8_lossy(&body)
            ));
        }
    }
    // What reached the upstream, once everything has been answered.
    let seen = mock.requests();
    for case in &table.cases {
        failures.extend(case.check_upstream("binary", &seen, &[]));
    }
    assert!(table.cases.len() >= 10, "the table has its cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tollgate explain`, given the binary's configuration, predicts every case of the table: the
/// same status, effect, reason, clause and policy version the sidecar answers, and exit code 0
/// exactly for the allowed ones.
#[test]
fn explain_predicts_the_shared_table() {
    let table = Table::load();
    let dir = temp_dir("decisions-explain");
    let upstream = "http://127.0.0.1:9";
    let routes = [
        format!(
            "{{name: anthropic, path_prefix: /v1/messages, kind: anthropic, upstream: \"{upstream}\"}}"
        ),
        format!(
            "{{name: mcp, path_prefix: /mcp, kind: mcp, category: read, upstream: \"{upstream}\"}}"
        ),
    ];
    let yaml = ConfigFile {
        upstream,
        data_dir: &dir.join("data"),
        token_env: "TOLLGATE_DECISIONS_TEST_TOKEN",
        more_routes: &routes,
        extra: &table.sections_yaml(),
        policy: &serde_json::to_string(&table.policy).unwrap(),
    }
    .yaml();
    let config = dir.join("tollgate.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut failures = Vec::new();
    for case in &table.cases {
        // A header on several lines becomes a list, which explain reads as several lines.
        let mut headers: serde_json::Map<String, serde_json::Value> = serde_json::Map::new();
        for (k, v) in &case.headers {
            match headers.get_mut(k) {
                None => {
                    headers.insert(k.clone(), v.clone().into());
                }
                Some(serde_json::Value::Array(lines)) => lines.push(v.clone().into()),
                Some(first) => *first = serde_json::json!([first.clone(), v]),
            }
        }
        headers.insert("content-type".into(), "application/json".into());
        let described = serde_json::json!({
            "method": "POST",
            "path": case.path,
            "headers": headers,
            "body_text": String::from_utf8(case.body.clone()).unwrap(),
        });
        let out = std::process::Command::new(BIN)
            .args(["explain", "--output-json", "--config"])
            .arg(&config)
            .args(["--json", &described.to_string()])
            .output()
            .expect("run tollgate explain");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&stdout) else {
            failures.push(format!(
                "{}: not JSON ({:?}): {stdout}{}",
                case.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
            continue;
        };
        // A repeated case is decided on what the earlier sends left in the loop detector, which
        // explain cannot know: it must say so (and it predicts the first send's answer).
        if case.repeat > 1 {
            let notes = json["not_evaluated"].as_array().cloned().unwrap_or_default();
            if !notes.iter().any(|n| n.as_str().is_some_and(|n| n.starts_with("loop detector"))) {
                failures.push(format!(
                    "{}: explain does not say it cannot know the loop detector's earlier calls: \
                     {notes:?}",
                    case.name
                ));
            }
            continue;
        }
        let o = &json["outcome"];
        let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
        let got = Outcome {
            status: o["status"].as_u64().and_then(|s| u16::try_from(s).ok()).unwrap_or(0),
            decision: text(&o["effect"]),
            reason: text(&o["reason"]),
            clause: text(&o["clause"]),
            policy_version: text(&o["policy_version"]),
        };
        let code = if case.expect.status == 200 { 0 } else { 3 };
        if got != case.expect || out.status.code() != Some(code) {
            failures.push(format!(
                "{}: explain predicted {got:?} (exit {:?}), the sidecar answers {:?} (exit {code})",
                case.name,
                out.status.code(),
                case.expect
            ));
        }
    }
    assert!(table.cases.len() >= 10, "the table has its cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let _ = std::fs::remove_dir_all(&dir);
}
