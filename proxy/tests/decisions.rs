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
use tollgate_e2e::decisions::{Case, Outcome, Table};
use tollgate_e2e::harness::temp_dir;
use tollgate_e2e::mock::MockUpstream;
use tollgate_e2e::process::{ConfigFile, Tollgate};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// How long a case waits for the outcomes of the sends before it (reported when each ended).
const SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

#[tokio::test]
async fn the_binary_decides_the_shared_table_as_expected() {
    let table = Table::load();
    let mock = MockUpstream::start().await;
    // The upstream of the table's own hosts: another authority, so another circuit breaker.
    let hosts = MockUpstream::start().await;
    let dir = temp_dir("decisions-bin");
    let routes = routes(&table, &mock.base_url(), &hosts.base_url());
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
            let headers = case.with_host(headers);
            let mut request = hyper::Request::post(format!("http://{}{}", proxy.proxy, case.path))
                .header("content-type", "application/json");
            for (name, value) in &headers {
                request = request.header(name.as_str(), value.as_str());
            }
            client.request(request.body(Full::new(Bytes::from(case.body.clone()))).unwrap())
        };
        // A case decided on what earlier sends left: their outcomes (a breaker's failures, an
        // agent's errors) are reported when each has ended, a moment after its answer.
        if case.live.is_some() {
            tokio::time::sleep(SETTLE).await;
        }
        // A repeated case's earlier sends build the live state the last one is decided on.
        tokio::time::sleep(case.wait_for_window()).await;
        for headers in case.earlier_headers("binary") {
            let earlier = send(headers).await.expect("the proxy answers");
            earlier.into_body().collect().await.expect("body");
            tokio::time::sleep(SETTLE).await;
        }
        let response = send(case.sent_headers("binary")).await.expect("the proxy answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.expect("body").to_bytes();
        let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        let got = Outcome::of(status, header);
        if got != case.expect {
            failures.push(format!(
                "{}: got {got:?}, want {:?}: {}",
                case.name,
                case.expect,
                String::from_utf8_lossy(&body)
            ));
        }
        failures.extend(case.check_retry_after(header("retry-after")));
    }
    // What reached the upstream, once everything has been answered.
    let seen: Vec<_> = mock.requests().into_iter().chain(hosts.requests()).collect();
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
    let routes = routes(&table, upstream, "http://127.0.0.1:10");
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
        let mut described = serde_json::json!({
            "method": "POST",
            "path": case.path,
            "headers": headers,
            "body_text": String::from_utf8(case.body.clone()).unwrap(),
        });
        if let Some(host) = &case.host {
            described["host"] = host.clone().into();
        }
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
        // A case decided on what earlier sends left (`live`: the loop detector's calls, the
        // breaker's failures, the agent's errors), which explain cannot know: it must say so
        // (and it predicts the answer to a first send).
        if let Some(live) = &case.live {
            let note = match live.as_str() {
                "loops" => "loop detector".to_owned(),
                "breaker" => format!("the circuit breaker of route {}", route_of(&table, case)),
                "escalation" => format!("escalation standing of agent {}", agent_of(case)),
                "rate_limits" => "rate limits (".to_owned(),
                "guardrail_rate" => format!("guardrail rate of agent {}", agent_of(case)),
                other => panic!("{}: no explain note for live state {other}", case.name),
            };
            let notes = json["not_evaluated"].as_array().cloned().unwrap_or_default();
            if !notes.iter().any(|n| n.as_str().is_some_and(|n| n.starts_with(&note))) {
                failures.push(format!(
                    "{}: explain does not say it cannot know {live} ({note}...): {notes:?}",
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
        // Explain predicts the decision: an allowed request's status is then the upstream's.
        let allowed = case.expect.decision.as_deref() == Some("allow");
        let want = Outcome {
            status: if allowed { 200 } else { case.expect.status },
            ..case.expect.clone()
        };
        let code = if allowed { 0 } else { 3 };
        if got != want || out.status.code() != Some(code) {
            failures.push(format!(
                "{}: explain predicted {got:?} (exit {:?}), the sidecar answers {want:?} (exit {code})",
                case.name,
                out.status.code(),
            ));
        }
    }
    assert!(table.cases.len() >= 10, "the table has its cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The routes besides the default OpenAI one: Anthropic and MCP to `upstream`, and one per host
/// of the table ([`Table::hosts`], chosen by `Host`) to `hosts`, another authority.
fn routes(table: &Table, upstream: &str, hosts: &str) -> Vec<String> {
    let mut routes = vec![
        format!(
            "{{name: anthropic, path_prefix: /v1/messages, kind: anthropic, upstream: \"{upstream}\"}}"
        ),
        format!(
            "{{name: mcp, path_prefix: /mcp, kind: mcp, category: read, upstream: \"{upstream}\"}}"
        ),
    ];
    routes.extend(table.hosts().iter().map(|h| {
        format!(
            "{{name: {}, host: {}, path_prefix: /v1/, kind: openai, upstream: \"{hosts}\"}}",
            h.name, h.host
        )
    }));
    routes
}

/// The route a case goes to, as `tollgate explain` names it in its notes.
fn route_of(table: &Table, case: &Case) -> String {
    let own = table.hosts().into_iter().find(|h| Some(&h.host) == case.host.as_ref());
    match own {
        Some(h) => h.name,
        None if case.path.starts_with("/mcp") => "mcp".into(),
        None if case.path.starts_with("/v1/messages") => "anthropic".into(),
        None => "openai".into(),
    }
}

/// The case's agent (`x-agent-id`).
fn agent_of(case: &Case) -> &str {
    case.headers.iter().find(|(n, _)| n == "x-agent-id").map_or("", |(_, v)| v.as_str())
}

/// The table's policy has a rule on every `match:` field the policy language has, so that each
/// is shown to match alike in every mode (each rule has a case of its own).
#[test]
fn the_table_has_a_rule_on_every_match_field() {
    let table = Table::load();
    let used: std::collections::BTreeSet<&str> = table.policy["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .flat_map(|r| r["match"].as_object().expect("match").keys().map(String::as_str))
        .collect();
    let missing: Vec<&str> = tollgate_core::policy::rule::Dim::ALL
        .iter()
        .map(|(_, key)| *key)
        .filter(|key| !used.contains(key))
        .collect();
    assert!(missing.is_empty(), "no rule of the table matches on {missing:?}");
}
