//! The metering corpus (`tests/fixtures/metering.json`) through the sidecar and through
//! HTTPS_PROXY mode: every case's ledger record must match the corpus to the token and the
//! nano-USD. The same corpus runs through Envoy with the filter in `wasm-filter/tests/envoy.rs`.

use hyper::Method;
use tollgate_e2e::forward::Forward;
use tollgate_e2e::harness::{try_read, Harness, Reply};
use tollgate_e2e::metering::{Case, Corpus};

const POLICY: &str = "version: corpus\ndefaults: {llm: allow}\n";

/// The client's status; `head` is the status of the response head, for a case whose upstream
/// cut the stream (the body read may then fail, which only such a case may).
fn status_of(case: &Case, head: u16, reply: Result<Reply, String>) -> u16 {
    match reply {
        Ok(reply) => reply.status.as_u16(),
        Err(_) if case.cut => head,
        Err(e) => panic!("{}: {e}", case.name),
    }
}

#[tokio::test]
async fn the_sidecar_meters_the_corpus_exactly() {
    let corpus = Corpus::load("sidecar");
    let proxy = Harness::builder().policy(POLICY).extra(&corpus.pricing_yaml()).start().await;
    let mut statuses = Vec::new();
    for case in &corpus.cases {
        let response = proxy.send(Method::POST, &case.path, &case.headers, case.body.clone()).await;
        let head = response.status().as_u16();
        statuses.push(status_of(case, head, try_read(response).await));
    }
    let records = proxy.ledger_until(corpus.cases.len()).await;
    let failures = corpus.check(&statuses, &records);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn https_proxy_mode_meters_the_corpus_exactly() {
    let corpus = Corpus::load("https-proxy");
    let f = Forward::start_with(POLICY, "", &corpus.pricing_yaml()).await;
    let mut statuses = Vec::new();
    for case in &corpus.cases {
        let host = if case.path.starts_with("/v1/messages") {
            "api.anthropic.com"
        } else {
            "api.openai.com"
        };
        let reply = f.send(host, Method::POST, &case.path, &case.headers, case.body.clone()).await;
        // A cut stream's head was 200 (the cut comes after the first events).
        statuses.push(status_of(case, 200, reply));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let records = loop {
        let records = f.ledger().await;
        if records.len() >= corpus.cases.len() || std::time::Instant::now() > deadline {
            break records;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let failures = corpus.check(&statuses, &records);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
