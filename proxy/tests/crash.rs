//! The ledger against a real process. `SIGKILL` in the middle of a load of completed requests
//! loses at most the last fsync window and never records a request twice; on restart every
//! checksum verifies, budgets (spent and the reservations left open by the crash) are rebuilt
//! from the ledger, and the audit chain verifies. `SIGTERM` loses nothing.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tollgate_e2e::harness::{nanos, temp_dir};
use tollgate_e2e::mock::MockUpstream;
use tollgate_e2e::process::{command, ConfigFile, Tollgate};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
const TOKEN_ENV: &str = "TOLLGATE_CRASH_TEST_TOKEN";
const TOKEN: &str = "crash-test-token";
const POLICY: &str = "version: crash-1\n\
                      defaults: {llm: allow}\n\
                      budgets:\n\
                      \x20 - {id: cc-month, scope: cost_center, period: monthly, amount: \"1000.00\"}\n\
                      \x20 - {id: fleet, scope: global, period: monthly, amount: \"1000.00\"}\n";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Writes the config and returns its path.
fn write_config(
    dir: &Path,
    data_dir: &Path,
    mock: &MockUpstream,
    fsync: &str,
) -> std::path::PathBuf {
    let extra = format!("ledger: {{fsync_interval: {fsync}}}\n");
    let yaml = ConfigFile {
        upstream: &mock.base_url(),
        data_dir,
        token_env: TOKEN_ENV,
        more_routes: &[],
        extra: &extra,
        policy: POLICY,
    }
    .yaml();
    let path = dir.join("tollgate.yaml");
    std::fs::write(&path, yaml).expect("write config");
    path
}

fn start(config: &Path) -> Tollgate {
    tokio::task::block_in_place(|| Tollgate::run(Path::new(BIN), config, &[(TOKEN_ENV, TOKEN)]))
}

fn exit_code(proxy: &mut Tollgate) -> Option<i32> {
    tokio::task::block_in_place(|| proxy.exit_code())
}

/// One chat completion with `x-request-id: id`, read to its end; its status.
async fn chat(
    client: &HttpClient,
    proxy: std::net::SocketAddr,
    id: &str,
) -> Result<StatusCode, String> {
    let body = json!({"model": "gpt-4o", "max_tokens": 20,
                      "messages": [{"role": "user", "content": "hi"}]});
    let request = hyper::Request::post(format!("http://{proxy}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", id)
        .header("x-agent-id", "crash-agent")
        .header("x-cost-center", "CC-1234")
        .header("x-project-id", "PROJ-ABC123")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(3), async {
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        response.into_body().collect().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(status)
    })
    .await
    .map_err(|_| "timed out".to_string())?;
    response
}

/// The admin API's `/admin/budgets`, as (budget id, key) → (spent, reserved) in nano-USD.
async fn budgets(
    client: &HttpClient,
    admin: std::net::SocketAddr,
) -> HashMap<(String, String), (i64, i64)> {
    let request = hyper::Request::get(format!("http://{admin}/admin/budgets"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = client.request(request).await.expect("admin answers");
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.expect("body").to_bytes();
    let v: Value = serde_json::from_slice(&body).expect("json");
    v["budgets"]
        .as_array()
        .expect("budgets array")
        .iter()
        .map(|b| {
            let text = |k: &str| b[k].as_str().unwrap_or_else(|| panic!("{k} in {b}")).to_string();
            ((text("budget_id"), text("key")), (nanos(&text("spent")), nanos(&text("reserved"))))
        })
        .collect()
}

fn audit_verify(data_dir: &Path) -> (Option<i32>, String) {
    let out =
        command(Path::new(BIN), &["audit", "verify", "--data-dir", data_dir.to_str().unwrap()]);
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_load_keeps_every_request_completed_before_the_last_fsync_window_once() {
    let mock = MockUpstream::start().await;
    let dir = temp_dir("crash-kill");
    let data_dir = dir.join("data");
    let config = write_config(&dir, &data_dir, &mock, "5ms");
    let mut proxy = start(&config);
    let addr = proxy.proxy;
    let client = client();

    // 4 clients for ~1 s, each noting when its responses completed; SIGKILL at 0.7 s.
    let start_at = Instant::now();
    let completed: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let mut clients = Vec::new();
    for c in 0..4 {
        let (client, completed) = (client.clone(), completed.clone());
        clients.push(tokio::spawn(async move {
            for n in 0.. {
                if start_at.elapsed() >= Duration::from_secs(1) {
                    break;
                }
                let id = format!("crash-{c}-{n}");
                match chat(&client, addr, &id).await {
                    Ok(StatusCode::OK) => completed.lock().unwrap().push((id, Instant::now())),
                    Ok(status) => return Err(format!("{id}: {status} before the kill")),
                    Err(_) => break, // the proxy is gone
                }
            }
            Ok(())
        }));
    }
    tokio::time::sleep_until((start_at + Duration::from_millis(700)).into()).await;
    let killed_at = Instant::now();
    proxy.signal("KILL");
    for c in clients {
        c.await.expect("client task").expect("every answer before the kill is 200");
    }
    assert_eq!(exit_code(&mut proxy), None, "ended by a signal");
    let completed = std::mem::take(&mut *completed.lock().unwrap());
    let must_survive: Vec<&String> = completed
        .iter()
        .filter(|(_, at)| *at + Duration::from_millis(100) < killed_at)
        .map(|(id, _)| id)
        .collect();
    assert!(must_survive.len() >= 20, "too little load to prove anything: {}", must_survive.len());

    // Before any repair: readable, and a torn audit tail is never called tampering.
    tollgate::ledger::read_all(&data_dir).expect("the ledger reads after SIGKILL");
    let (code, stdout) = audit_verify(&data_dir);
    assert!(matches!(code, Some(0 | 3)), "audit verify after SIGKILL: {code:?} {stdout}");

    let mut proxy = start(&config);
    let records = tollgate::ledger::read_all(&data_dir).expect("every ledger line verifies");
    let usage: Vec<&Value> = records.iter().filter(|r| r["type"] == "usage").collect();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for r in &usage {
        *seen.entry(r["request_id"].as_str().expect("request_id")).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "recorded more than once: {twice:?}");
    let lost: Vec<_> = must_survive.iter().filter(|id| !seen.contains_key(id.as_str())).collect();
    assert!(
        lost.is_empty(),
        "{} of {} requests completed >100 ms before SIGKILL are missing: {lost:?}",
        lost.len(),
        must_survive.len()
    );
    let seqs: HashSet<u64> = records.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(seqs.len(), records.len(), "sequence numbers are unique");

    // Budgets rebuilt: spent = the surviving records' costs; held = reservations the crash left
    // open (a reserve record without its usage record).
    let spent: i64 = usage.iter().map(|r| r["cost_nano_usd"].as_i64().expect("cost")).sum();
    let settled: HashSet<&str> = seen.keys().copied().collect();
    let held: i64 = records
        .iter()
        .filter(|r| r["type"] == "reserve")
        .filter(|r| !settled.contains(r["request_id"].as_str().unwrap_or_default()))
        .map(|r| nanos(r["amount"].as_str().expect("amount")))
        .sum();
    assert!(spent > 0);
    let states = budgets(&client, proxy.admin).await;
    for key in [("fleet", "*"), ("cc-month", "CC-1234")] {
        let state = states.get(&(key.0.to_string(), key.1.to_string()));
        assert_eq!(state, Some(&(spent, held)), "budget {key:?} after restart: {states:?}");
    }

    proxy.signal("TERM");
    assert_eq!(exit_code(&mut proxy), Some(0));
    let (code, stdout) = audit_verify(&data_dir);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains(": OK: "), "{stdout}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_loses_no_completed_request_and_the_chain_verifies() {
    let mock = MockUpstream::start().await;
    let dir = temp_dir("crash-term");
    let data_dir = dir.join("data");
    // A long fsync window: the last records are durable only through the flush on shutdown.
    let config = write_config(&dir, &data_dir, &mock, "10s");
    let mut proxy = start(&config);
    let addr = proxy.proxy;
    let client = client();
    let mut clients = Vec::new();
    for c in 0..4 {
        let client = client.clone();
        clients.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..25 {
                let id = format!("term-{c}-{n}");
                assert_eq!(chat(&client, addr, &id).await, Ok(StatusCode::OK), "{id}");
                ids.push(id);
            }
            ids
        }));
    }
    let mut sent = HashSet::new();
    for c in clients {
        sent.extend(c.await.expect("client task"));
    }
    proxy.signal("TERM");
    assert_eq!(exit_code(&mut proxy), Some(0));

    let records = tollgate::ledger::read_all(&data_dir).expect("ledger");
    let ids: Vec<&str> = records
        .iter()
        .filter(|r| r["type"] == "usage")
        .map(|r| r["request_id"].as_str().expect("request_id"))
        .collect();
    assert_eq!(ids.len(), 100, "one usage record per request");
    assert_eq!(ids.iter().map(|id| id.to_string()).collect::<HashSet<_>>(), sent);
    let (code, stdout) = audit_verify(&data_dir);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains(": OK: 100 records"), "{stdout}");
    let _ = std::fs::remove_dir_all(dir);
}
