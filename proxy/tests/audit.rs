//! `tollgate audit verify` on an audit log the proxy wrote (`audit/*.seg`): the untouched log exits
//! 0; an edited, deleted or swapped record exits 1 naming it; a partial last line (a crash
//! mid-write) exits 3 and says it is not tampering; and the proxy refuses to append to a tampered
//! log. (The ledger next to it: `ledger_tamper.rs`.)

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tollgate_e2e::harness::temp_dir;
use tollgate_e2e::mock::MockUpstream;
use tollgate_e2e::process::{command, ConfigFile, Tollgate};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// Runs the proxy on `data_dir`, sends 4 allowed requests and 1 refused one (no attribution),
/// stops it with SIGTERM; returns the config file.
async fn write_log(dir: &Path, data_dir: &Path) -> PathBuf {
    let mock = MockUpstream::start().await;
    let yaml = ConfigFile {
        upstream: &mock.base_url(),
        data_dir,
        token_env: "TOLLGATE_AUDIT_TEST_UNSET_TOKEN",
        more_routes: &[],
        // The test edits the audit records as text.
        extra: "ledger: {encoding: json}\n",
        policy: "version: audit-1\ndefaults: {llm: allow}\n",
    }
    .yaml();
    let config = dir.join("tollgate.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut proxy = tokio::task::block_in_place(|| Tollgate::run(Path::new(BIN), &config, &[]));
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = json!({"model": "gpt-4o", "max_tokens": 5,
                      "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    for i in 0..5 {
        let mut request =
            hyper::Request::post(format!("http://{}/v1/chat/completions", proxy.proxy))
                .header("content-type", "application/json")
                .header("x-request-id", format!("audit-{i}"));
        if i != 3 {
            request = request
                .header("x-agent-id", "audited")
                .header("x-cost-center", "CC-1234")
                .header("x-project-id", "PROJ-ABC123");
        }
        let response = client.request(request.body(Full::new(Bytes::from(body.clone()))).unwrap());
        let response = response.await.unwrap();
        assert_eq!(response.status(), if i == 3 { 403 } else { 200 });
        response.into_body().collect().await.unwrap();
    }
    proxy.signal("TERM");
    assert_eq!(tokio::task::block_in_place(|| proxy.exit_code()), Some(0));
    config
}

/// `audit verify` on a copy of the data with the audit segment's lines replaced by `lines`
/// (joined with newlines, plus `tail`): exit code, stdout.
fn verify(dir: &Path, name: &str, lines: &[String], tail: &str) -> (Option<i32>, String) {
    let data = dir.join(name);
    for sub in ["ledger", "audit"] {
        std::fs::create_dir_all(data.join(sub)).unwrap();
        for entry in std::fs::read_dir(dir.join("data").join(sub)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, data.join(sub).join(path.file_name().unwrap())).unwrap();
        }
    }
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect::<String>() + tail;
    std::fs::write(data.join("audit").join("00000001.seg"), text).unwrap();
    let out = command(Path::new(BIN), &["audit", "verify", "--data-dir", data.to_str().unwrap()]);
    (out.status.code(), String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}

/// `line` (`<crc32> <link> <json>`) with its checksum recomputed.
fn with_crc(line: &str) -> String {
    let rest = &line[9..];
    format!("{:08x} {rest}", crc32fast::hash(rest.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_tells_intact_tampered_and_torn_logs_apart() {
    let dir = temp_dir("audit");
    let data_dir = dir.join("data");
    let config = write_log(&dir, &data_dir).await;
    let segment = data_dir.join("audit").join("00000001.seg");
    let log = std::fs::read_to_string(&segment).unwrap();
    let lines: Vec<String> = log.lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 5, "one record per decision:\n{log}");
    assert!(lines[3].contains("\"effect\":\"deny\""), "{}", lines[3]);
    assert!(!log.contains("Bearer") && !log.contains("authorization"), "no secrets: {log}");
    let seg = |name: &str, line: usize| {
        format!("{}:{line}", dir.join(name).join("audit").join("00000001.seg").display())
    };

    let (code, out) = verify(&dir, "intact", &lines, "");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.ends_with("audit: OK: 5 records in 1 segment, chain intact (SHA-256)"), "{out}");

    // A value changed in record 3 (its checksum no longer holds).
    let mut edited = lines.clone();
    assert!(edited[2].contains("\"agent\":\"audited\""));
    edited[2] = edited[2].replace("\"agent\":\"audited\"", "\"agent\":\"someone-else\"");
    let (code, out) = verify(&dir, "edited", &edited, "");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("CORRUPT at {}: checksum mismatch", seg("edited", 3))), "{out}");

    // The same with the checksum recomputed: record 4 no longer links to it.
    let mut rehashed = edited.clone();
    rehashed[2] = with_crc(&edited[2]);
    let (code, out) = verify(&dir, "rehashed", &rehashed, "");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "TAMPERED at {}: the record was changed, or records after it removed or reordered: \
             the next record (00000001.seg:4) does not link to it",
            seg("rehashed", 3)
        )),
        "{out}"
    );

    // Record 2 deleted.
    let mut deleted = lines.clone();
    deleted.remove(1);
    let (code, out) = verify(&dir, "deleted", &deleted, "");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("TAMPERED at {}:", seg("deleted", 1))), "{out}");

    // Records 4 and 5 swapped.
    let mut swapped = lines.clone();
    swapped.swap(3, 4);
    let (code, out) = verify(&dir, "swapped", &swapped, "");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("TAMPERED at {}:", seg("swapped", 3))), "{out}");

    // A crash mid-write: the intact records, then a partial line.
    let (code, out) = verify(&dir, "torn", &lines, &lines[4][..40]);
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains(&format!(
            "{} is a torn tail (40 bytes without a newline: a write cut short by a crash, not \
             tampering)",
            seg("torn", 6)
        )),
        "{out}"
    );

    // The proxy refuses to start on (and so to append to) a tampered log.
    std::fs::write(&segment, rehashed.iter().map(|l| format!("{l}\n")).collect::<String>())
        .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("failed verification") && stderr.contains("00000001.seg:3"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
