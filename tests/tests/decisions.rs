//! The shared decision table (`tests/fixtures/decisions.json`) against the sidecar: every case
//! sent to the proxy on a real port must get the table's status and decision headers. The same
//! table runs through the Envoy filter in `wasm-filter/tests/envoy.rs`.

use hyper::Method;
use tollgate_e2e::decisions::{Outcome, Table};
use tollgate_e2e::harness::{read, Harness};

#[tokio::test]
async fn the_sidecar_decides_the_shared_table_as_expected() {
    let table = Table::load();
    let policy = serde_json::to_string(&table.policy).unwrap();
    let proxy = Harness::builder()
        .policy(&policy)
        .route(
            r#"{name: mcp, path_prefix: /mcp, kind: mcp, category: read, upstream: "{upstream}"}"#,
        )
        .start()
        .await;
    let mut failures = Vec::new();
    for case in &table.cases {
        let mut headers = case.headers.clone();
        headers.push(("x-mock-output-tokens".into(), "1".into()));
        let reply =
            read(proxy.send(Method::POST, &case.path, &headers, case.body.clone()).await).await;
        let got = Outcome::of(reply.status.as_u16(), |n| reply.header(n));
        if got != case.expect {
            failures.push(format!(
                "{}: got {got:?}, want {:?}: {}",
                case.name,
                case.expect,
                reply.text()
            ));
        }
    }
    assert!(table.cases.len() >= 10, "the table has its cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
