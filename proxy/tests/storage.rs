//! A data directory written by the version before the compact encoding (`fixtures/data-json`: a
//! JSON-lines ledger and the single-file `audit.jsonl`, written by that version's binary for 4
//! allowed requests and 1 refused one) reads with every tool as it is, and the proxy continues it
//! in compact segments: one chain over both, `invoice` and `audit verify` over both, and the new
//! records cost at most 300 bytes per request (ledger and audit log together).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tollgate_e2e::harness::temp_dir;
use tollgate_e2e::mock::MockUpstream;
use tollgate_e2e::process::{command, ConfigFile, Tollgate};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join("data-json")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        match path.is_dir() {
            true => copy_dir(&path, &target),
            false => drop(std::fs::copy(&path, &target).unwrap()),
        }
    }
}

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = command(Path::new(BIN), args);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// The invoice of December 2026 by cost center: (requests, total) of CC-1234.
fn invoice(config: &Path, data: &Path) -> (u64, String) {
    let (code, out) = run(&[
        "invoice",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--period",
        "2026-12",
        "--format",
        "json",
    ]);
    assert_eq!(code, Some(0), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let inv = &v["invoices"][0];
    assert_eq!(inv["group"], "CC-1234", "{v}");
    (inv["requests"].as_u64().unwrap(), inv["total"].as_str().unwrap().to_string())
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_data_directory_reads_as_it_is_and_continues_compact() {
    let dir = temp_dir("storage-json");
    let data = dir.join("data");
    copy_dir(&fixture(), &data);
    let mock = MockUpstream::start().await;
    let yaml = ConfigFile {
        upstream: &mock.base_url(),
        data_dir: &data,
        token_env: "TOLLGATE_STORAGE_TEST_UNSET_TOKEN",
        more_routes: &[],
        extra: "",
        policy: "version: fixture-1\ndefaults: {llm: allow}\nbudgets:\n  - {id: cc, scope: cost_center, period: monthly, amount: \"1000.00\"}\n",
    }
    .yaml();
    let config = dir.join("tollgate.yaml");
    std::fs::write(&config, yaml).unwrap();

    // As written: every reader takes it.
    let (code, out) = run(&["audit", "verify", "--data-dir", data.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("OK: 8 records in 1 segment, chain intact (SHA-256)"), "{out}");
    assert!(out.contains("audit.jsonl: OK: 5 records, chain intact"), "{out}");
    assert!(
        out.contains("OK: the ledger still holds its 8 records and the audit log its 5"),
        "{out}"
    );
    let (requests, total) = invoice(&config, &data);
    assert_eq!(requests, 4);
    let old = tollgate::ledger::read_all(&data).unwrap();
    assert_eq!(old.len(), 8);
    let old_audit = tollgate::audit::read_all(&data).unwrap();
    assert_eq!(old_audit.len(), 5);
    assert_eq!(old_audit[4]["effect"], "deny");

    // The proxy replays it at start and continues in compact segments.
    let mut proxy = tokio::task::block_in_place(|| Tollgate::run(Path::new(BIN), &config, &[]));
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = json!({"model": "gpt-4o", "max_tokens": 5,
                      "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    const NEW: u64 = 20;
    for _ in 0..NEW {
        let request = hyper::Request::post(format!("http://{}/v1/chat/completions", proxy.proxy))
            .header("content-type", "application/json")
            .header("x-agent-id", "bot-1")
            .header("x-cost-center", "CC-1234")
            .header("x-project-id", "PROJ-ABC123")
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
    }
    proxy.signal("TERM");
    assert_eq!(tokio::task::block_in_place(|| proxy.exit_code()), Some(0));

    // The old files are as they were; the new records are in new, compact segments.
    for file in ["ledger/00000001.seg", "audit.jsonl"] {
        assert_eq!(
            std::fs::read(data.join(file)).unwrap(),
            std::fs::read(fixture().join(file)).unwrap(),
            "{file} is never rewritten"
        );
    }
    let ledger_new = data.join("ledger").join("00000002.seg");
    let audit_new = data.join("audit").join("00000001.seg");
    for seg in [&ledger_new, &audit_new] {
        assert!(std::fs::read(seg).unwrap().starts_with(tollgate::store::chain::MAGIC));
    }
    let (code, out) = run(&["audit", "verify", "--data-dir", data.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    let ledger_records = 8 + 2 * NEW;
    assert!(
        out.contains(&format!("OK: {ledger_records} records in 2 segments, chain intact")),
        "{out}"
    );
    assert!(out.contains(&format!("audit: OK: {NEW} records in 1 segment")), "{out}");
    assert!(
        out.contains(&format!(
            "OK: the ledger still holds its {ledger_records} records and the audit log its {}",
            5 + NEW
        )),
        "{out}"
    );
    let all = tollgate::ledger::read_all(&data).unwrap();
    assert_eq!(all[..8], old[..], "the old records read the same");
    assert_eq!(all.len() as u64, ledger_records);
    let seqs: Vec<u64> = all.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=ledger_records).collect::<Vec<_>>(), "one sequence over both");
    assert_eq!(all[9]["type"], "usage");
    assert_eq!(all[9]["cost_center"], "CC-1234");
    let audit = tollgate::audit::read_all(&data).unwrap();
    assert_eq!(audit.len() as u64, 5 + NEW);
    assert_eq!(audit[5]["agent"], "bot-1");
    let (requests, new_total) = invoice(&config, &data);
    assert_eq!(requests, 4 + NEW);
    assert_ne!(new_total, total);

    // What a request costs on disk now: its reservation, its usage record and its audit record.
    let bytes = size(&ledger_new) + size(&audit_new) - 2 * 4;
    let per_request = bytes / NEW;
    eprintln!("{per_request} bytes per request ({bytes} for {NEW} requests)");
    assert!(per_request <= 300, "{per_request} bytes per request ({bytes} for {NEW})");
    let old_per_request =
        (size(&fixture().join("ledger/00000001.seg")) + size(&fixture().join("audit.jsonl"))) / 5;
    assert!(per_request * 4 < old_per_request, "{per_request} vs {old_per_request} as JSON");
    let _ = std::fs::remove_dir_all(dir);
}

/// `promtool check metrics` on `text`: its findings (none when it is clean).
fn promtool(text: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install -y prometheus)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_data_size_and_free_space_and_readyz_warns_when_it_runs_low() {
    let dir = temp_dir("storage-metrics");
    let data = dir.join("data");
    let mock = MockUpstream::start().await;
    let config = |warn: u64| {
        let yaml = ConfigFile {
            upstream: &mock.base_url(),
            data_dir: &data,
            token_env: "TOLLGATE_STORAGE_TEST_UNSET_TOKEN",
            more_routes: &[],
            extra: &format!("ledger: {{warn_free_bytes: {warn}}}\n"),
            policy: "version: m-1\ndefaults: {llm: allow}\n",
        }
        .yaml();
        let path = dir.join(format!("tollgate-{warn}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        path
    };
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let get = |url: String| {
        let client = client.clone();
        async move {
            let request = hyper::Request::get(url).body(Full::new(Bytes::new())).unwrap();
            let response = client.request(request).await.unwrap();
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    // Plenty of room: ready, and the gauges are there (and pass promtool's lint).
    let mut proxy = tokio::task::block_in_place(|| Tollgate::run(Path::new(BIN), &config(1), &[]));
    let (status, body) = get(format!("http://{}/readyz", proxy.admin)).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (_, metrics) = get(format!("http://{}/metrics", proxy.admin)).await;
    let value = |name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap();
        line[name.len() + 1..].parse().unwrap()
    };
    assert!(value("tollgate_data_bytes") > 0.0, "{metrics}");
    assert!(value("tollgate_data_free_bytes") > 0.0, "{metrics}");
    assert_eq!(value("tollgate_data_seconds_until_full"), f64::INFINITY, "no history yet");
    assert!(metrics.contains("# TYPE tollgate_data_seconds_until_full gauge"), "{metrics}");
    assert_eq!(promtool(&metrics).trim(), "", "promtool findings");
    proxy.signal("TERM");
    assert_eq!(tokio::task::block_in_place(|| proxy.exit_code()), Some(0));

    // Below the threshold: still ready (metered requests are still written), with a warning.
    let mut proxy =
        tokio::task::block_in_place(|| Tollgate::run(Path::new(BIN), &config(u64::MAX / 2), &[]));
    let (status, body) = get(format!("http://{}/readyz", proxy.admin)).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with("ready; warning: ") && body.contains("below ledger.warn_free_bytes"),
        "{body}"
    );
    let logged = tokio::task::block_in_place(|| {
        proxy.wait_for(
            "the data volume is low on space: metered requests get 503 once the ledger cannot be \
             written (shorten ledger.retention or give the volume more space)",
        )
    });
    assert!(logged["fields"]["free_bytes"].as_u64().is_some(), "{logged}");
    proxy.signal("TERM");
    assert_eq!(tokio::task::block_in_place(|| proxy.exit_code()), Some(0));
    let _ = std::fs::remove_dir_all(dir);
}

/// Sends `n` chat completions through `proxy`.
async fn chats(proxy: &Tollgate, n: usize) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = json!({"model": "gpt-4o", "max_tokens": 5,
                      "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    for _ in 0..n {
        let request = hyper::Request::post(format!("http://{}/v1/chat/completions", proxy.proxy))
            .header("content-type", "application/json")
            .header("x-agent-id", "bot-1")
            .header("x-cost-center", "CC-1234")
            .header("x-project-id", "PROJ-ABC123")
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_proxy_retires_old_segments_and_verify_invoice_and_heads_still_hold() {
    let dir = temp_dir("storage-retire");
    let data = dir.join("data");
    let mock = MockUpstream::start().await;
    let yaml = ConfigFile {
        upstream: &mock.base_url(),
        data_dir: &data,
        token_env: "TOLLGATE_STORAGE_TEST_UNSET_TOKEN",
        more_routes: &[],
        extra: "ledger: {segment_bytes: 4096, retention: 1s}\n",
        policy: "version: r-1\ndefaults: {llm: allow}\nbudgets:\n  - {id: cc, scope: cost_center, period: monthly, amount: \"1000.00\"}\n",
    }
    .yaml();
    let config = dir.join("tollgate.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut proxy = tokio::task::block_in_place(|| Tollgate::run(Path::new(BIN), &config, &[]));
    // A head kept early (head.json is replaced at most once a second while records are written),
    // inside what will be retired.
    let early = dir.join("early-head.json");
    let head_records = || -> u64 {
        let text = std::fs::read_to_string(data.join("head.json")).unwrap_or_default();
        serde_json::from_str::<Value>(&text)
            .map_or(0, |h| h["ledger"]["records"].as_u64().unwrap_or(0))
    };
    let mut sent = 0;
    while head_records() < 2 {
        assert!(sent < 40, "no head after {sent} requests");
        chats(&proxy, 1).await;
        sent += 1;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    std::fs::copy(data.join("head.json"), &early).unwrap();
    chats(&proxy, 65 - sent).await;
    // Past the retention, a pass retires the sealed segments (one runs every second).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let checkpoint = data.join("ledger").join("retired.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !checkpoint.exists() {
        assert!(std::time::Instant::now() < deadline, "nothing retired after 10 s");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    proxy.signal("TERM");
    assert_eq!(tokio::task::block_in_place(|| proxy.exit_code()), Some(0));
    let kept = tollgate::ledger::read_all(&data).unwrap();
    assert!(kept.len() < 130, "some records retired: {} kept", kept.len());
    assert!(!data.join("ledger").join("00000001.seg").exists());

    let (code, out) = run(&["audit", "verify", "--data-dir", data.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("OK: 130 records in") && out.contains("in retired segments"), "{out}");
    assert!(
        out.contains("the ledger still holds its 130 records and the audit log its 65"),
        "{out}"
    );
    let (code, out) = run(&[
        "audit",
        "verify",
        "--data-dir",
        data.to_str().unwrap(),
        "--head",
        early.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "a head inside the retired records still holds: {out}");
    // The invoice still counts every request (every segment may be retired by now: the month of
    // the retired totals), and the proxy starts again on what is left.
    let month = tollgate::ledger::read_retired(&data).unwrap()[0].day[..7].to_string();
    let out = command(
        Path::new(BIN),
        &["invoice", "--config", config.to_str().unwrap(), "--period", &month, "--format", "json"],
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["invoices"][0]["requests"], 65, "{v}");
    // FOCUS counts the retired records too: its billed total is the invoice's.
    let out = command(
        Path::new(BIN),
        &["invoice", "--config", config.to_str().unwrap(), "--period", &month, "--format", "focus"],
    );
    let csv = String::from_utf8(out.stdout).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().expect("a header").split(',').collect();
    let billed = header.iter().position(|c| *c == "BilledCost").expect("BilledCost");
    let total: i64 = lines
        .map(|l| tollgate_e2e::harness::nanos(l.split(',').nth(billed).expect("a BilledCost cell")))
        .sum();
    let invoiced = tollgate_e2e::harness::nanos(v["invoices"][0]["total"].as_str().unwrap());
    assert!(invoiced > 0);
    assert_eq!(total, invoiced, "FOCUS BilledCost against the invoice: {csv}");
    let mut proxy = tokio::task::block_in_place(|| Tollgate::run(Path::new(BIN), &config, &[]));
    chats(&proxy, 1).await;
    proxy.signal("TERM");
    assert_eq!(tokio::task::block_in_place(|| proxy.exit_code()), Some(0));
    let last = tollgate::ledger::read_all(&data).unwrap().pop().unwrap();
    assert_eq!(last["seq"], 132, "the sequence continues after retired records");
    let _ = std::fs::remove_dir_all(dir);
}
