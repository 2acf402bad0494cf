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
use tollgate_e2e::mock::{MockUpstream, RecordedRequest};

/// How long a case's record and metrics may take to show after its answer.
const SETTLE: Duration = Duration::from_secs(5);

/// The proxy a table runs against.
enum Target {
    /// The sidecar, and the mock that plays the upstream of the table's own hosts
    /// ([`Table::hosts`]): another authority, so another circuit breaker.
    Sidecar(Box<Harness>, MockUpstream),
    /// HTTPS_PROXY mode, its mock playing the table's hosts too.
    HttpsProxy(Box<Forward>),
}

impl Target {
    fn mode(&self) -> &'static str {
        match self {
            Target::Sidecar(..) => "sidecar",
            Target::HttpsProxy(_) => "https_proxy",
        }
    }

    async fn send(&self, case: &Case) -> Reply {
        self.send_with(case, &case.sent_headers(self.mode())).await
    }

    async fn send_with(&self, case: &Case, headers: &[(String, String)]) -> Reply {
        let headers = headers.to_vec();
        match self {
            Target::Sidecar(proxy, _) => {
                let headers = case.with_host(headers);
                read(proxy.send(Method::POST, &case.path, &headers, case.body.clone()).await).await
            }
            Target::HttpsProxy(f) => {
                let host = match &case.host {
                    Some(host) => host.as_str(),
                    None if case.path.starts_with("/v1/messages") => "api.anthropic.com",
                    None => "api.openai.com",
                };
                f.send(host, Method::POST, &case.path, &headers, case.body.clone())
                    .await
                    .unwrap_or_else(|e| panic!("{}: {e}", case.name))
            }
        }
    }

    async fn metrics(&self) -> Exposition {
        let text = match self {
            Target::Sidecar(proxy, _) => proxy.metrics().await,
            Target::HttpsProxy(f) => f.metrics().await,
        };
        exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn upstream(&self) -> Vec<RecordedRequest> {
        match self {
            Target::Sidecar(proxy, hosts) => {
                proxy.mock.requests().into_iter().chain(hosts.requests()).collect()
            }
            Target::HttpsProxy(f) => f.mock.requests(),
        }
    }

    async fn ledger(&self) -> Vec<Value> {
        match self {
            Target::Sidecar(proxy, _) => proxy.ledger().await,
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
        // A repeated case's earlier sends, each followed by scrapes that no longer change: its
        // outcome (a breaker's failure, an agent's error) is reported when it ends, before it is
        // counted, and what they counted is not the last send's.
        tokio::time::sleep(case.wait_for_window()).await;
        for headers in case.earlier_headers(mode) {
            target.send_with(case, &headers).await;
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
        failures.extend(case.check_retry_after(reply.header("retry-after")));
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
    // The table's own hosts: a route each (by `Host`) to a second mock, another authority.
    let hosts = MockUpstream::start().await;
    let mut builder = Harness::builder().policy(&policy).extra(&table.sections_yaml()).route(
        r#"{name: mcp, path_prefix: /mcp, kind: mcp, category: read, upstream: "{upstream}"}"#,
    );
    for h in table.hosts() {
        builder = builder.route(&format!(
            "{{name: {}, host: {}, path_prefix: /v1/, kind: openai, upstream: \"{}\"}}",
            h.name,
            h.host,
            hosts.base_url()
        ));
    }
    let proxy = builder.start().await;
    let failures = run(&table, &Target::Sidecar(Box::new(proxy), hosts)).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn https_proxy_mode_decides_the_shared_table_as_expected() {
    let table = Table::load();
    let policy = serde_json::to_string(&table.policy).unwrap();
    let mcp = r#"{name: mcp, path_prefix: /mcp, kind: mcp, category: read, upstream: "https://api.openai.com"}"#;
    // The table's own hosts: a route each to `https://<host>`, which the mock plays too (its
    // `host:` keeps it apart from the OpenAI route for a request that names no host).
    let hosts = table.hosts();
    let own: Vec<String> = hosts
        .iter()
        .map(|h| {
            format!(
                "{{name: {}, host: {}, path_prefix: /v1/, kind: openai, upstream: \"https://{}\"}}",
                h.name, h.host, h.host
            )
        })
        .collect();
    let routes: Vec<&str> = std::iter::once(mcp).chain(own.iter().map(String::as_str)).collect();
    let names: Vec<&str> = hosts.iter().map(|h| h.host.as_str()).collect();
    let f = Forward::start_for_hosts(&policy, "", &table.sections_yaml(), &routes, &names).await;
    let failures = run(&table, &Target::HttpsProxy(Box::new(f))).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
