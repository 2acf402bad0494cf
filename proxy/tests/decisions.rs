//! The shared decision table (`tests/fixtures/decisions.json`) against the `tollgate` binary
//! itself (`tollgate run` as a process, in front of the mock upstream): every case must get the
//! table's status and decision headers. The same table runs in-process in
//! `tests/tests/decisions.rs` and through the Envoy filter in `wasm-filter/tests/envoy.rs`.

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
        format!("{{name: mcp, path_prefix: /mcp, kind: mcp, upstream: \"{}\"}}", mock.base_url()),
    ];
    let yaml = ConfigFile {
        upstream: &mock.base_url(),
        data_dir: &dir.join("data"),
        token_env: "TOLLGATE_DECISIONS_TEST_TOKEN",
        more_routes: &routes,
        extra: "",
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
        let mut request = hyper::Request::post(format!("http://{}{}", proxy.proxy, case.path))
            .header("content-type", "application/json")
            .header("x-mock-output-tokens", "1");
        for (name, value) in &case.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let response = client
            .request(request.body(Full::new(Bytes::from(case.body.clone()))).unwrap())
            .await
            .expect("the proxy answers");
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
    assert!(table.cases.len() >= 10, "the table has its cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}
