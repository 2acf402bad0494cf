//! The shared decision table (`tests/fixtures/decisions.json`) against the sidecar and against
//! HTTPS_PROXY mode: every case sent to the proxy on a real port must get the table's status and
//! decision headers, leave the table's usage record in the ledger (or none) and change exactly
//! the table's metric series by the table's amounts. The same table runs through the Envoy
//! filter in `wasm-filter/tests/envoy.rs`.

use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::Value;
use tollgate_e2e::decisions::{Case, Outcome, Table};
use tollgate_e2e::exposition::{self, Exposition};
use tollgate_e2e::forward::Forward;
use tollgate_e2e::harness::{read, Harness, Reply};

/// How long a case's record and metrics may take to show after its answer.
const SETTLE: Duration = Duration::from_secs(5);

/// The proxy a table runs against.
enum Target {
    Sidecar(Box<Harness>),
    HttpsProxy(Box<Forward>),
}

impl Target {
    fn mode(&self) -> &'static str {
        match self {
            Target::Sidecar(_) => "sidecar",
            Target::HttpsProxy(_) => "https_proxy",
        }
    }

    async fn send(&self, case: &Case) -> Reply {
        self.send_with(case, &case.sent_headers(self.mode())).await
    }

    async fn send_with(&self, case: &Case, headers: &[(String, String)]) -> Reply {
        let headers = headers.to_vec();
        match self {
            Target::Sidecar(proxy) => {
                read(proxy.send(Method::POST, &case.path, &headers, case.body.clone()).await).await
            }
            Target::HttpsProxy(f) => {
                let host = if case.path.starts_with("/v1/messages") {
                    "api.anthropic.com"
                } else {
                    "api.openai.com"
                };
                f.send(host, Method::POST, &case.path, &headers, case.body.clone())
                    .await
                    .unwrap_or_else(|e| panic!("{}: {e}", case.name))
            }
        }
    }

    async fn metrics(&self) -> Exposition {
        let text = match self {
            Target::Sidecar(proxy) => proxy.metrics().await,
            Target::HttpsProxy(f) => f.metrics().await,
        };
        exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn upstream(&self) -> Vec<tollgate_e2e::mock::RecordedRequest> {
        match self {
            Target::Sidecar(proxy) => proxy.mock.requests(),
            Target::HttpsProxy(f) => f.mock.requests(),
        }
    }

    async fn ledger(&self) -> Vec<Value> {
        match self {
            Target::Sidecar(proxy) => proxy.ledger().await,
            Target::HttpsProxy(f) => f.ledger().await,
        }
    }
}

/// The case's usage record, metric changes since `before` and what reached the upstream,
/// against the table's.
async fn check(table: &Table, case: &Case, target: &Target, before: &Exposition) -> Vec<String> {
    let mode = target.mode();
    let after = target.metrics().await;
    let mut found = case.check_ledger(mode, &target.ledger().await);
    found.extend(case.check_metrics(table, mode, before, &after));
    found.extend(
        table.check_derived(mode, &after).into_iter().map(|f| format!("{}: {f}", case.name)),
    );
    found.extend(case.check_upstream(mode, &target.upstream(), &[]));
    found
}

/// Waits until two scrapes a moment apart are the same (what earlier sends counted is in).
async fn settle(table: &Table, target: &Target) {
    let compared = table.compared(target.mode());
    let scrape = || async {
        let e = target.metrics().await;
        e.samples.into_iter().filter(|s| compared.contains(&s.name.as_str())).collect::<Vec<_>>()
    };
    let deadline = Instant::now() + SETTLE;
    let mut last = scrape().await;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = scrape().await;
        if now == last || Instant::now() > deadline {
            return;
        }
        last = now;
    }
}

/// Sends every case and checks its answer, its usage record and its metric changes; returns
/// one line per difference.
async fn run(table: &Table, target: &Target) -> Vec<String> {
    let mode = target.mode();
    let mut failures = Vec::new();
    for case in &table.cases {
        // A repeated case's earlier sends, and then a scrape that no longer changes: what they
        // counted is not the last send's.
        for headers in case.earlier_headers(mode) {
            target.send_with(case, &headers).await;
        }
        if case.repeat > 1 {
            settle(table, target).await;
        }
        let before = target.metrics().await;
        let reply = target.send(case).await;
        let got = Outcome::of(reply.status.as_u16(), |n| reply.header(n));
        if got != case.expect {
            failures.push(format!(
                "{}: got {got:?}, want {:?}: {}",
                case.name,
                case.expect,
                reply.text()
            ));
        }
        let id = case.request_id(mode);
        if reply.header("x-request-id") != Some(id.as_str()) {
            failures.push(format!(
                "{}: answered with x-request-id {:?}, want {id}",
                case.name,
                reply.header("x-request-id")
            ));
        }
        // The record and the counters follow the answer: wait until they match or time is up,
        // and until they still match a moment later (nothing left for the next case).
        let deadline = Instant::now() + SETTLE;
        let found = loop {
            let mut found = check(table, case, target, &before).await;
            if found.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                found = check(table, case, target, &before).await;
            }
            if found.is_empty() || Instant::now() > deadline {
                break found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        failures.extend(found);
    }
    // A record that came late is still one too many (or wrong).
    let records = target.ledger().await;
    for case in &table.cases {
        failures.extend(
            case.check_ledger(mode, &records).into_iter().map(|f| format!("at the end: {f}")),
        );
    }
    assert!(table.cases.len() >= 10, "the table has its cases");
    failures
}

#[tokio::test]
async fn the_sidecar_decides_the_shared_table_as_expected() {
    let table = Table::load();
    let policy = serde_json::to_string(&table.policy).unwrap();
    let proxy = Harness::builder()
        .policy(&policy)
        .extra(&table.sections_yaml())
        .route(
            r#"{name: mcp, path_prefix: /mcp, kind: mcp, category: read, upstream: "{upstream}"}"#,
        )
        .start()
        .await;
    let failures = run(&table, &Target::Sidecar(Box::new(proxy))).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn https_proxy_mode_decides_the_shared_table_as_expected() {
    let table = Table::load();
    let policy = serde_json::to_string(&table.policy).unwrap();
    let mcp = r#"{name: mcp, path_prefix: /mcp, kind: mcp, category: read, upstream: "https://api.openai.com"}"#;
    let f = Forward::start_with_routes(&policy, "", &table.sections_yaml(), &[mcp]).await;
    let failures = run(&table, &Target::HttpsProxy(Box::new(f))).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
