//! `tollgate approvals list|approve|deny` as a process against a running proxy's admin API:
//! the operator's view of the approval round trip.

use std::process::{Command, Output};

use serde_json::json;
use tollgate_e2e::harness::{tags, Harness};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// Runs `tollgate approvals ARGS --admin URL` with the harness's token, off the async threads
/// (the proxy under test is served by the same runtime).
async fn approvals(h: &Harness, args: &[&str], token: &str) -> Output {
    let mut all: Vec<String> = vec!["approvals".into()];
    all.extend(args.iter().map(|a| a.to_string()));
    all.extend(["--admin".to_string(), h.admin.clone()]);
    let token = token.to_string();
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&all)
            .env_remove("TOLLGATE_CONFIG")
            .env_remove("TOLLGATE_ADMIN_URL")
            .env("TOLLGATE_ADMIN_TOKEN", token)
            .output()
            .expect("run tollgate approvals")
    })
    .await
    .expect("join")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_approve_and_deny_from_the_command_line() {
    let h = Harness::builder()
        .route(r#"{name: deploy, path_prefix: /tools/deploy, kind: tool, tool: deploy, upstream: "{upstream}"}"#)
        .policy("version: v1\ndefaults: {llm: allow, tool: require_approval, other: deny}\n")
        .start()
        .await;
    let args = json!({"service": "api"});
    let first = h.post("/tools/deploy", &tags("bot-a"), &args).await;
    let id = first.header("x-tollgate-approval-id").expect("approval id").to_string();
    let other = h.post("/tools/deploy", &tags("bot-b"), &json!({"service": "db"})).await;
    let other_id = other.header("x-tollgate-approval-id").expect("approval id").to_string();

    let list = approvals(&h, &["list"], &h.token).await;
    assert_eq!(list.status.code(), Some(0), "{}", text(&list.stderr));
    let out = text(&list.stdout);
    assert!(out.contains(&id) && out.contains(&other_id) && out.contains("2 approval(s)"), "{out}");
    assert!(
        out.lines().any(|l| l.contains(&id)
            && l.contains("bot-a")
            && l.contains("deploy")
            && l.contains("pending")),
        "{out}"
    );

    let approve =
        approvals(&h, &["approve", &id, "--by", "alice", "--note", "release 1.2"], &h.token).await;
    assert_eq!(approve.status.code(), Some(0), "{}", text(&approve.stderr));
    assert!(text(&approve.stdout)
        .contains(&format!("{id} approved (agent bot-a, action deploy, by alice)")));
    let deny = approvals(&h, &["deny", &other_id], &h.token).await;
    assert_eq!(deny.status.code(), Some(0), "{}", text(&deny.stderr));

    // No longer pending: 5; unknown: 4; wrong token: 1.
    assert_eq!(approvals(&h, &["deny", &id], &h.token).await.status.code(), Some(5));
    assert_eq!(approvals(&h, &["approve", "apr_nope"], &h.token).await.status.code(), Some(4));
    assert_eq!(approvals(&h, &["list"], "wrong").await.status.code(), Some(1));

    let json_list = approvals(&h, &["list", "--state", "approved", "--json"], &h.token).await;
    let value: serde_json::Value = serde_json::from_slice(&json_list.stdout).expect("json");
    assert_eq!(value["approvals"][0]["id"], id.as_str());
    assert_eq!(value["approvals"][0]["decided_by"], "alice");
    assert_eq!(value["approvals"][0]["note"], "release 1.2");

    // The approval the operator granted lets the agent's retry through, once.
    let mut retry = tags("bot-a");
    retry.push(("x-tollgate-approval".into(), id.clone()));
    assert_eq!(h.post("/tools/deploy", &retry, &args).await.status, 200);
    let mut denied = tags("bot-b");
    denied.push(("x-tollgate-approval".into(), other_id));
    let refused = h.post("/tools/deploy", &denied, &json!({"service": "db"})).await;
    assert_eq!(refused.json()["error"]["code"], "approval_denied");
}
