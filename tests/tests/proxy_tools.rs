//! Tool calls: MCP `tools/call` bodies and REST tool routes are classified by tool name, decided
//! by the policy (the shipped default for tools is require_approval), priced per call from the
//! rate card and metered into the ledger.

use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tollgate_e2e::harness::{read_ledger, tags, temp_dir, Harness};
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

/// MCP's session methods are tool route requests, not requests to "other hosts": `initialize`,
/// `tools/list`, `ping` and notifications are decided by the tool default (here `allow`), pass
/// attributed and are recorded at $0; only `tools/call` names a tool action.
#[tokio::test]
async fn mcp_session_methods_pass_under_the_tool_default() {
    let route = r#"{name: mcp, path_prefix: /mcp, kind: mcp, upstream: "{upstream}"}"#;
    let policy = "version: v1\ndefaults: {llm: allow, tool: allow, other: deny}\n\
                  rules:\n  - {id: no-deletes, match: {tool: \"delete_*\"}, effect: deny, reason: destructive_tool}\n";
    let h = Harness::builder().route(route).policy(policy).start().await;
    let rpc = |method: &str, id: Option<u32>| {
        let mut body = json!({"jsonrpc": "2.0", "method": method, "params": {}});
        if let Some(id) = id {
            body["id"] = json!(id);
        }
        body
    };
    let initialize = h.post("/mcp", &tags("mcp-agent"), &rpc("initialize", Some(1))).await;
    assert_eq!(initialize.status, StatusCode::OK, "{}", initialize.text());
    assert_eq!(initialize.header("x-tollgate-clause"), Some("defaults.tool"));
    assert_eq!(initialize.json()["result"]["serverInfo"]["name"], "mock-upstream");
    let notified =
        h.post("/mcp", &tags("mcp-agent"), &rpc("notifications/initialized", None)).await;
    assert_eq!(notified.status, StatusCode::ACCEPTED, "{}", notified.text());
    let listed = h.post("/mcp", &tags("mcp-agent"), &rpc("tools/list", Some(2))).await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.text());
    assert_eq!(listed.json()["result"]["tools"][0]["name"], "echo");
    let ping = h.post("/mcp", &tags("mcp-agent"), &rpc("ping", Some(3))).await;
    assert_eq!(ping.status, StatusCode::OK, "{}", ping.text());
    // A tools/call is still the tool action, decided by its name.
    let call = json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
                      "params": {"name": "delete_records", "arguments": {}}});
    let denied = h.post("/mcp", &tags("mcp-agent"), &call).await;
    assert_eq!(denied.header("x-tollgate-reason"), Some("destructive_tool"), "{}", denied.text());
    // Attribution still applies.
    let untagged = h.post("/mcp", &[], &rpc("tools/list", Some(5))).await;
    assert_eq!(untagged.status, StatusCode::FORBIDDEN);
    assert_eq!(h.mock.request_count(), 4);
    let ledger = h.ledger_until(4).await;
    for record in &ledger {
        assert_eq!(
            (record["agent"].as_str(), record["route"].as_str()),
            (Some("mcp-agent"), Some("mcp"))
        );
        assert_eq!(record["cost_nano_usd"], 0, "{record}");
        assert_eq!(record["clause"], "defaults.tool", "{record}");
    }

    // Under the shipped tool default (require_approval) they wait for a human like any tool
    // request, instead of being denied as traffic to other hosts.
    let h = Harness::builder()
        .route(route)
        .policy("version: v1\ndefaults: {llm: allow, tool: require_approval, other: deny}\n")
        .start()
        .await;
    let held = h.post("/mcp", &tags("mcp-agent"), &rpc("initialize", Some(1))).await;
    assert_eq!(
        held.header("x-tollgate-reason"),
        Some("default_require_approval"),
        "{}",
        held.text()
    );
    assert!(!held.text().contains("other hosts"), "{}", held.text());
}
