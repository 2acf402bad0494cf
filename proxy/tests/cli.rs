//! The `tollgate` binary as a process: `check` reports every error with its path and line,
//! `explain` prints the decision, and `run` serves, then on SIGTERM finishes the stream in
//! flight, flushes the ledger and exits 0.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tollgate_e2e::harness::{read_ledger, sse_data, temp_dir};
use tollgate_e2e::mock::{header, MockUpstream};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

fn tollgate(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env_remove("TOLLGATE_CONFIG").output().expect("run tollgate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_reports_every_error_with_its_path_and_line_and_exits_1() {
    let dir = temp_dir("check");
    let file = dir.join("bad.yaml");
    std::fs::write(
        &file,
        "version: 1\n\
         listen: not-an-address\n\
         routes:\n\
         \x20 - {kind: openai, upstream: \"ftp://x\"}\n\
         policy:\n\
         \x20 version: p1\n\
         \x20 defaults: {llm: maybe}\n\
         bogus: 1\n",
    )
    .unwrap();
    let out = tollgate(&["check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines[0], format!("{}: 4 errors in document", file.display()));
    assert_eq!(
        lines[1..].iter().map(|l| l.split(':').next().unwrap().trim()).collect::<Vec<_>>(),
        vec![
            "listen (line 2, column 9)",
            "routes[0].upstream (line 4, column 30)",
            "policy.defaults.llm (line 7, column 19)",
            "bogus (line 8, column 1)",
        ],
        "{stderr}"
    );
    assert!(lines[3].contains("unknown value `maybe`"), "{stderr}");
    assert!(lines[4].contains("unknown field `bogus`"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ca_init_creates_a_private_ca_prints_how_to_trust_it_and_never_overwrites() {
    let dir = temp_dir("ca").join("ca");
    let d = dir.to_str().unwrap();
    let out = tollgate(&["ca", "init", "--dir", d]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    for needle in
        ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "HTTPS_PROXY", "ca.pem"]
    {
        assert!(printed.contains(needle), "{needle} missing from:\n{printed}");
    }
    let key = std::fs::read_to_string(dir.join("ca-key.pem")).unwrap();
    assert!(key.contains("PRIVATE KEY"));
    assert!(!printed.contains(key.lines().nth(1).unwrap()), "the key is never printed");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("ca-key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // A second init keeps the CA the clients already trust.
    let again = tollgate(&["ca", "init", "--dir", d]);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again.stderr).contains("--force"), "{}", text(&again.stderr));
    assert_eq!(std::fs::read_to_string(dir.join("ca-key.pem")).unwrap(), key);
    let forced = tollgate(&["ca", "init", "--force", "--dir", d]);
    assert!(forced.status.success());
    assert_ne!(std::fs::read_to_string(dir.join("ca-key.pem")).unwrap(), key);
}

#[test]
fn invoice_refuses_a_period_that_is_not_a_month_or_a_day_and_exits_2() {
    for (period, why) in [
        ("2026-13", "the month must be 01 to 12"),
        ("2026-00", "the month must be 01 to 12"),
        ("2026-1", "wrong length"),
        ("abc", "wrong length"),
        ("2026-02-30", "no such day in that month"),
    ] {
        let out = tollgate(&["invoice", "--period", period]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{period}: {stderr}");
        assert!(
            stderr.contains(&format!("--period: `{period}` is not a period: {why}")),
            "{period}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{period}: no invoice printed");
    }
}

#[test]
fn check_accepts_the_embedded_default() {
    let out = tollgate(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "OK: 2 route(s), policy version default-1, 0 rule(s)\n");
}

#[test]
fn explain_prints_the_decision_and_worst_case() {
    let out = tollgate(&[
        "explain",
        "-H",
        "x-agent-id=a",
        "-H",
        "x-cost-center=CC-1234",
        "-H",
        "x-project-id=PROJ-ABC123",
        "--model",
        "gpt-4o",
        "--max-tokens",
        "100",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for line in [
        "route:          openai (openai → https://api.openai.com/)",
        "attribution:    agent=a cost_center=CC-1234 project=PROJ-ABC123",
        "policy effect:  allow",
        "reason:         default_allow",
        "clause:         defaults.llm",
        "policy_version: default-1",
    ] {
        assert!(stdout.lines().any(|l| l == line), "missing {line:?} in\n{stdout}");
    }
    // 100 output tokens × $10/M = $0.001, plus the input estimate at $2.50/M.
    let worst = stdout.lines().find(|l| l.starts_with("worst case:")).expect("worst case line");
    assert!(worst.contains("100 output tokens max"), "{worst}");
    assert!(stdout.lines().any(|l| l == "outcome:        allow"), "{stdout}");
    // The rate limits are live state: named as not evaluated.
    assert!(stdout.contains("not evaluated (live state, assumed):"), "{stdout}");
    assert!(stdout.contains("rate limits (rpm=600 tpm=2000000) for agent a"), "{stdout}");

    // Like the proxy: the model list is free, a priced request without a model is a 400.
    let tags =
        ["-H", "x-agent-id=a", "-H", "x-cost-center=CC-1234", "-H", "x-project-id=PROJ-ABC123"];
    let out =
        tollgate(&[&["explain", "--method", "GET", "--path", "/v1/models"][..], &tags].concat());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("worst case:     $0 (GET /v1/models is free)"), "{stdout}");
    let out = tollgate(&[&["explain"][..], &tags].concat());
    assert_eq!(out.status.code(), Some(3));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("POST /v1/chat/completions names no model")
            && stdout.contains("outcome:        deny (400 missing_model) by defaults.llm"),
        "{stdout}"
    );
    // A model the rate card does not know: refused as the proxy refuses it, not allowed.
    let out = tollgate(&[&["explain", "--model", "no-such-model"][..], &tags].concat());
    assert_eq!(out.status.code(), Some(3));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("outcome:        deny (403 unknown_model) by defaults.llm"),
        "{stdout}"
    );
    assert!(!stdout.contains("outcome:        allow"), "{stdout}");

    // Untagged: refused, exit 3, naming the bad headers.
    let out = tollgate(&["explain", "-H", "x-agent-id=a"]);
    assert_eq!(out.status.code(), Some(3));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(
            "attribution:    REJECTED (403): attribution rejected: x-cost-center is missing"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("x-project-id is missing"), "{stdout}");
}

/// The `tollgate run` child; killed if the test fails before it exits.
struct Proxy {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Proxy {
    fn start(config: &Path) -> Proxy {
        let mut child = Command::new(BIN)
            .args(["run", "--log-json", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tollgate run");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proxy { child, lines }
    }

    /// The next log line whose message is `message` (at most 10 s), as JSON.
    fn wait_for(&self, message: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no `{message}` log line within 10 s"));
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["fields"]["message"] == message {
                    return v;
                }
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits (at most 10 s) for the process to exit.
    fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "tollgate did not exit within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn config(mock: &str, data_dir: &Path) -> String {
    format!(
        "version: 1\n\
         listen: 127.0.0.1:0\n\
         admin: {{listen: 127.0.0.1:0, token_env: TOLLGATE_CLI_TEST_UNSET_TOKEN}}\n\
         data_dir: {}\n\
         shutdown_drain: 10s\n\
         routes:\n\
         \x20 - {{name: openai, path_prefix: /v1/, kind: openai, upstream: \"{mock}\"}}\n\
         policy:\n\
         \x20 version: cli-1\n",
        serde_json::to_string(&data_dir.display().to_string()).unwrap()
    )
}

fn request(proxy: &str, body: &Value, extra: &[(&str, &str)]) -> hyper::Request<Full<Bytes>> {
    let mut req = hyper::Request::post(format!("http://{proxy}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-agent-id", "cli-agent")
        .header("x-cost-center", "CC-1234")
        .header("x-project-id", "PROJ-ABC123");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    req.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_and_on_sigterm_finishes_the_stream_in_flight_then_exits_0() {
    let mock = MockUpstream::start().await;
    let dir = temp_dir("run");
    let data_dir: PathBuf = dir.join("data");
    let config_file = dir.join("tollgate.yaml");
    std::fs::write(&config_file, config(&mock.base_url(), &data_dir)).unwrap();
    let mut proxy = Proxy::start(&config_file);
    let listening = proxy.wait_for("tollgate listening");
    let addr = listening["fields"]["proxy"].as_str().expect("proxy address").to_string();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();

    let chat = json!({"model": "gpt-4o", "max_tokens": 50,
                      "messages": [{"role": "user", "content": "hi"}]});
    let response = client.request(request(&addr, &chat, &[])).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers().get("x-tollgate-policy-version").and_then(|v| v.to_str().ok()),
        Some("cli-1")
    );
    response.into_body().collect().await.unwrap();

    // A stream of 10 words 60 ms apart (≈ 0.7 s); SIGTERM after its first chunk.
    let mut stream_body = chat.clone();
    stream_body["stream"] = json!(true);
    let response = client
        .request(request(
            &addr,
            &stream_body,
            &[(header::EVENTS, "10"), (header::EVENT_DELAY_MS, "60")],
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first chunk within 5 s")
        .expect("a first chunk")
        .expect("no error");
    let mut received = first.into_data().unwrap().to_vec();
    proxy.signal("TERM");
    proxy.wait_for("shutting down: draining in-flight requests");
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Some(frame) = tokio::time::timeout(deadline - Instant::now(), body.frame())
        .await
        .expect("stream finished within 10 s")
    {
        received.extend_from_slice(
            &frame.expect("the stream is not cut by the shutdown").into_data().unwrap_or_default(),
        );
    }
    let events = sse_data(&received);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:#?}");
    assert_eq!(events.len(), 13, "role + 10 words + finish + [DONE]: {events:#?}");

    let code = tokio::task::spawn_blocking(move || {
        let code = proxy.exit_code();
        drop(proxy);
        code
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0));

    let ledger = read_ledger(&data_dir);
    assert_eq!(ledger.len(), 2, "{ledger:#?}");
    let streamed = &ledger[1];
    assert_eq!(streamed["end"], "complete");
    assert_eq!(streamed["usage_source"], "reported");
    assert_eq!(streamed["tokens"]["output"], 10);
    assert_eq!(streamed["agent"], "cli-agent");
    let _ = std::fs::remove_dir_all(dir);
}
