//! Tool calls: MCP `tools/call` bodies and REST tool routes are classified by tool name, decided
//! by the policy (the shipped default for tools is require_approval), priced per call from the
//! rate card and metered into the ledger.

use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tollgate_e2e::harness::{read_ledger, tags, temp_dir};
use tollgate_e2e::mock::MockUpstream;

struct Proxy {
    addr: std::net::SocketAddr,
    data_dir: std::path::PathBuf,
    _running: tollgate::app::Running,
}

async fn start(mock: &MockUpstream) -> Proxy {
    let data_dir = temp_dir("tools");
    let upstream = mock.base_url();
    let yaml = format!(
        "version: 1\n\
         data_dir: {data:?}\n\
         routes:\n\
         \x20 - {{name: mcp, path_prefix: /mcp, kind: mcp, upstream: \"{upstream}\"}}\n\
         \x20 - {{name: search, path_prefix: /tools/search, kind: tool, tool: web_search, category: read, upstream: \"{upstream}\"}}\n\
         pricing:\n\
         \x20 tools:\n\
         \x20   echo: {{per_call: \"0.002\"}}\n\
         \x20   web_search: {{per_call: \"0.01\"}}\n\
         policy:\n\
         \x20 version: tools-1\n\
         \x20 defaults: {{llm: allow, tool: require_approval, other: deny}}\n\
         \x20 rules:\n\
         \x20   - {{id: safe-tools, match: {{route: tool, tool: [echo, web_search]}}, effect: allow}}\n\
         \x20   - {{id: no-deletes, match: {{tool: \"delete_*\"}}, effect: deny, reason: destructive_tool}}\n",
        data = data_dir.display().to_string(),
    );
    let config = tollgate::config::Config::from_str(&yaml).expect("config");
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running =
        tollgate::app::start(config, proxy, admin, std::future::pending()).await.expect("start");
    Proxy { addr: running.proxy_addr, data_dir, _running: running }
}

async fn post(
    addr: std::net::SocketAddr,
    path: &str,
    body: Value,
) -> (StatusCode, Value, Option<String>) {
    let mut req =
        Request::post(format!("http://{addr}{path}")).header("content-type", "application/json");
    for (k, v) in tags("tool-agent") {
        req = req.header(k, v);
    }
    let req = req.body(Full::new(bytes::Bytes::from(body.to_string()))).unwrap();
    let response = Client::builder(TokioExecutor::new()).build_http().request(req).await.unwrap();
    let status = response.status();
    let approval =
        response.headers().get("x-tollgate-approval-id").map(|v| v.to_str().unwrap().to_string());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null), approval)
}

fn call(tool: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": tool, "arguments": {"text": "hi"}}})
}

#[tokio::test]
async fn mcp_tool_calls_are_decided_by_tool_name_and_priced_per_call() {
    let mock = MockUpstream::start().await;
    let p = start(&mock).await;

    let (status, body, _) = post(p.addr, "/mcp", call("echo")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["result"]["content"][0]["text"], "ok");

    let (status, body, _) = post(p.addr, "/mcp", call("delete_records")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "destructive_tool");

    // Not listed by any rule: the shipped default for tools asks a human.
    let (status, body, approval) = post(p.addr, "/mcp", call("send_email")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "default_require_approval");
    let approval = approval.expect("an approval id header");
    assert_eq!(body["error"]["approval_id"], approval.as_str());

    let (status, body, _) = post(p.addr, "/tools/search", json!({"q": "rust"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    assert_eq!(mock.request_count(), 2, "refused calls never reach the tool server");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let ledger = loop {
        let ledger = read_ledger(&p.data_dir);
        if ledger.len() >= 2 || std::time::Instant::now() > deadline {
            break ledger;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let by_tool = |t: &str| {
        ledger.iter().find(|r| r["tool"] == t).unwrap_or_else(|| panic!("{t}: {ledger:?}"))
    };
    assert_eq!(by_tool("echo")["cost_nano_usd"], 2_000_000);
    assert_eq!(by_tool("echo")["route"], "mcp");
    assert_eq!(by_tool("web_search")["cost_nano_usd"], 10_000_000);
    assert_eq!(by_tool("web_search")["cost"]["per_call"], "0.01");
}

#[tokio::test]
async fn a_tools_call_without_a_name_is_a_bad_request() {
    let mock = MockUpstream::start().await;
    let p = start(&mock).await;
    let (status, body, _) = post(
        p.addr,
        "/mcp",
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "malformed_body");
    assert_eq!(mock.request_count(), 0);
}
