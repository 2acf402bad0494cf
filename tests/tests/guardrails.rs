//! Guardrails through real sockets: the proxy in front of the mock's MCP server and a REST tool
//! route. Each default pattern blocks its example and its near-miss passes; an unknown tool is
//! blocked; a path outside `allowed_resources` is refused; nothing reaches the mock on a
//! refusal; the refusal is a JSON-RPC error on the MCP route; the audit record names the
//! argument path, the pattern and a short excerpt; the metric counts it by violation.

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tollgate_e2e::harness::{tags, temp_dir};
use tollgate_e2e::mock::MockUpstream;

struct Proxy {
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    data_dir: std::path::PathBuf,
    _running: tollgate::app::Running,
}

async fn start(mock: &MockUpstream) -> Proxy {
    let data_dir = temp_dir("guardrails");
    let upstream = mock.base_url();
    // The default action policies, with their approval flags lifted so that a call that passes
    // reaches the mock, and `read_file` held to /workspace/.
    let yaml = format!(
        "version: 1\n\
         data_dir: {data:?}\n\
         routes:\n\
         \x20 - {{name: mcp, path_prefix: /mcp, kind: mcp, upstream: \"{upstream}\"}}\n\
         \x20 - {{name: shell, path_prefix: /tools/shell, kind: tool, tool: run_command, upstream: \"{upstream}\"}}\n\
         policy:\n\
         \x20 version: guard-1\n\
         \x20 defaults: {{llm: allow, tool: allow, other: deny}}\n\
         guardrails:\n\
         \x20 actions:\n\
         \x20   read_file: {{allowed_resources: [/workspace/]}}\n\
         \x20   write_file: {{requires_approval: false}}\n\
         \x20   run_command: {{requires_approval: false}}\n\
         \x20   database_mutation: {{requires_approval: false}}\n",
        data = data_dir.display().to_string(),
    );
    let config = tollgate::config::Config::from_str(&yaml).expect("config");
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running =
        tollgate::app::start(config, proxy, admin, std::future::pending()).await.expect("start");
    Proxy { addr: running.proxy_addr, admin: running.admin_addr, data_dir, _running: running }
}

struct Answer {
    status: StatusCode,
    body: Value,
    reason: Option<String>,
    request_id: String,
}

async fn send(addr: std::net::SocketAddr, path: &str, body: &Value) -> Answer {
    let mut req =
        Request::post(format!("http://{addr}{path}")).header("content-type", "application/json");
    for (k, v) in tags("guard-bot") {
        req = req.header(k, v);
    }
    let req = req.body(Full::new(bytes::Bytes::from(body.to_string()))).unwrap();
    let response = Client::builder(TokioExecutor::new()).build_http().request(req).await.unwrap();
    let status = response.status();
    let header = |n: &str| response.headers().get(n).map(|v| v.to_str().unwrap().to_string());
    let reason = header("x-tollgate-reason");
    let request_id = header("x-request-id").unwrap_or_default();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        reason,
        request_id,
    }
}

fn call(tool: &str, arguments: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": 11, "method": "tools/call",
           "params": {"name": tool, "arguments": arguments}})
}

/// The audit record of `request_id`, once the ledger thread wrote it.
async fn audit_of(p: &Proxy, request_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let records = tollgate::audit::read_all(&p.data_dir).unwrap_or_default();
        let found = records.into_iter().find(|r| r["request_id"] == request_id);
        if let Some(r) = found {
            return r;
        }
        assert!(Instant::now() < deadline, "no audit record for {request_id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metric(p: &Proxy, reason: &str) -> u64 {
    let url = format!("http://{}/metrics", p.admin);
    let response = Client::builder(TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>()
        .get(url.parse().unwrap())
        .await
        .unwrap();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&text);
    let series = format!("tollgate_guardrail_violations_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().expect("a count"))
}

#[tokio::test]
async fn each_default_pattern_blocks_its_example_and_its_near_miss_passes() {
    let mock = MockUpstream::start().await;
    let p = start(&mock).await;
    // (tool, arguments, the argument path a refusal names; None: the call passes)
    let cases = [
        ("read_file", json!({"path": "/workspace/app/.env"}), Some("$.path")),
        ("read_file", json!({"path": "/workspace/app/.env.example"}), None),
        ("read_file", json!({"path": "/workspace/keys/id_rsa"}), Some("$.path")),
        ("read_file", json!({"path": "/workspace/keys/id_rsa.pub"}), None),
        ("read_file", json!({"path": "/workspace/tls/server.pem"}), Some("$.path")),
        ("read_file", json!({"path": "/workspace/tls/server.pem.md"}), None),
        ("read_file", json!({"path": "/workspace/password.txt"}), Some("$.path")),
        ("read_file", json!({"path": "/workspace/passport.txt"}), None),
        ("read_file", json!({"path": "/workspace/secret/plan.md"}), Some("$.path")),
        ("read_file", json!({"path": "/workspace/secure/plan.md"}), None),
        ("write_file", json!({"path": "/etc/hosts", "content": "x"}), Some("$.path")),
        ("write_file", json!({"path": "/srv/etc/hosts", "content": "x"}), None),
        ("write_file", json!({"path": "/root/.profile", "content": "x"}), Some("$.path")),
        ("write_file", json!({"path": "/home/root/.profile", "content": "x"}), None),
        ("write_file", json!({"path": "/repo/.git/config", "content": "x"}), Some("$.path")),
        ("write_file", json!({"path": "/repo/.git/config.orig", "content": "x"}), None),
        ("run_command", json!({"cmd": "rm -rf /"}), Some("$.cmd")),
        ("run_command", json!({"cmd": "rm -rf ./build"}), None),
        (
            "run_command",
            json!({"argv": ["sh", "-c", "dd if=/dev/zero of=/dev/sda"]}),
            Some("$.argv[2]"),
        ),
        ("run_command", json!({"argv": ["git", "add", "if=1"]}), None),
        ("run_command", json!({"cmd": "mkfs.ext4 /dev/sdb1"}), Some("$.cmd")),
        ("run_command", json!({"cmd": "ls ./mkfs_logs"}), None),
        ("run_command", json!({"opts": {"then": "sudo shutdown -h now"}}), Some("$.opts.then")),
        ("run_command", json!({"opts": {"then": "cat shutdown_notes.txt"}}), None),
        ("run_command", json!({"cmd": "reboot"}), Some("$.cmd")),
        ("run_command", json!({"cmd": "grep reboots /var/log/syslog"}), None),
        ("run_command", json!({"cmd": "killall node"}), Some("$.cmd")),
        ("run_command", json!({"cmd": "pkill -f myserver"}), None),
        ("database_mutation", json!({"sql": "DROP DATABASE prod"}), Some("$.sql")),
        ("database_mutation", json!({"sql": "DROP INDEX idx_users"}), None),
        ("database_mutation", json!({"sql": "drop table users"}), Some("$.sql")),
        ("database_mutation", json!({"sql": "CREATE TABLE drops (id int)"}), None),
        ("database_mutation", json!({"sql": "TRUNCATE orders"}), Some("$.sql")),
        (
            "database_mutation",
            json!({"sql": "UPDATE orders SET truncated = true WHERE id = 3"}),
            None,
        ),
        ("database_mutation", json!({"sql": "DELETE FROM sessions"}), Some("$.sql")),
        ("database_mutation", json!({"sql": "DELETE FROM sessions WHERE 1=1"}), Some("$.sql")),
        (
            "database_mutation",
            json!({"sql": "DELETE FROM sessions WHERE expires_at < now()"}),
            None,
        ),
    ];
    for (tool, arguments, refused_at) in cases {
        mock.clear_requests();
        let a = send(p.addr, "/mcp", &call(tool, arguments.clone())).await;
        match refused_at {
            Some(path) => {
                assert_eq!(a.status, StatusCode::FORBIDDEN, "{tool} {arguments}: {}", a.body);
                assert_eq!(a.reason.as_deref(), Some("forbidden_pattern"), "{tool} {arguments}");
                assert_eq!(a.body["jsonrpc"], "2.0", "{}", a.body);
                assert_eq!(a.body["id"], 11);
                assert_eq!(a.body["error"]["code"], -32001);
                assert_eq!(a.body["error"]["data"]["code"], "forbidden_pattern");
                assert_eq!(a.body["error"]["data"]["argument"], path, "{tool} {arguments}");
                assert_eq!(mock.request_count(), 0, "{tool} {arguments} reached the tool");
            }
            None => {
                assert_eq!(a.status, StatusCode::OK, "{tool} {arguments}: {}", a.body);
                assert_eq!(a.body["result"]["content"][0]["text"], "ok");
                assert_eq!(mock.request_count(), 1, "{tool} {arguments}");
            }
        }
    }
}

#[tokio::test]
async fn refusals_are_audited_with_the_argument_path_and_counted_by_violation() {
    let mock = MockUpstream::start().await;
    let p = start(&mock).await;
    let before = metric(&p, "forbidden_pattern").await;
    let long_tail = "A".repeat(5000);
    let args = json!({"steps": [{"run": "echo hi"}, {"run": format!("rm -rf / {long_tail}")}]});
    let a = send(p.addr, "/mcp", &call("run_command", args)).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let record = audit_of(&p, &a.request_id).await;
    assert_eq!(record["effect"], "deny");
    assert_eq!(record["reason"], "forbidden_pattern");
    assert_eq!(record["tool"], "run_command");
    assert_eq!(record["argument"], "$.steps[1].run");
    assert_eq!(record["pattern"], r"\brm\s+-(rf|fr)\s+/");
    assert_eq!(record["excerpt"], "rm -rf /", "the excerpt is the match, not the value");
    assert!(!record.to_string().contains(&long_tail), "the whole value is never recorded");
    assert_eq!(metric(&p, "forbidden_pattern").await, before + 1);

    // An unknown tool.
    let before = metric(&p, "unknown_action").await;
    let a = send(p.addr, "/mcp", &call("launch_rocket", json!({"when": "now"}))).await;
    assert_eq!((a.status, a.reason.as_deref()), (StatusCode::FORBIDDEN, Some("unknown_action")));
    assert_eq!(a.body["error"]["data"]["code"], "unknown_action");
    assert_eq!(audit_of(&p, &a.request_id).await["tool"], "launch_rocket");
    assert_eq!(metric(&p, "unknown_action").await, before + 1);

    // A path outside allowed_resources, and one that climbs out of it.
    for path in ["/etc/passwd", "/workspace/../etc/passwd", "/workspace-old/notes.md"] {
        let a = send(p.addr, "/mcp", &call("read_file", json!({"path": path}))).await;
        assert_eq!(
            (a.status, a.reason.as_deref()),
            (StatusCode::FORBIDDEN, Some("resource_not_allowed")),
            "{path}"
        );
        let record = audit_of(&p, &a.request_id).await;
        assert_eq!(record["argument"], "$.path");
        assert_eq!(record["excerpt"], path);
    }
    assert_eq!(metric(&p, "resource_not_allowed").await, 3);
    assert_eq!(mock.request_count(), 0, "nothing reached the mock");
}

#[tokio::test]
async fn a_tool_route_has_its_json_body_and_query_string_checked() {
    let mock = MockUpstream::start().await;
    let p = start(&mock).await;
    let a = send(p.addr, "/tools/shell", &json!({"cmd": "killall -9 postgres"})).await;
    assert_eq!((a.status, a.reason.as_deref()), (StatusCode::FORBIDDEN, Some("forbidden_pattern")));
    // Not an MCP route: the error is in the provider shape.
    assert_eq!(a.body["error"]["code"], "forbidden_pattern", "{}", a.body);
    assert_eq!(audit_of(&p, &a.request_id).await["argument"], "$.cmd");
    let a = send(p.addr, "/tools/shell?after=rm%20-rf%20%2F", &json!({"cmd": "ls"})).await;
    assert_eq!((a.status, a.reason.as_deref()), (StatusCode::FORBIDDEN, Some("forbidden_pattern")));
    assert_eq!(audit_of(&p, &a.request_id).await["argument"], "$query.after");
    assert_eq!(mock.request_count(), 0);
    let a = send(p.addr, "/tools/shell?dir=build", &json!({"cmd": "rm -rf ./build"})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(mock.request_count(), 1);
}
