//! Test support: the real Envoy from `target/envoy-venv` with the built `.wasm`, rendered from
//! `envoy/envoy.yaml` by `envoy/run.sh --render`, a raw HTTP/1.1 client and a usage-event
//! collector, all on 127.0.0.1. Nothing is built here: `scripts/test` builds the module and
//! installs Envoy first, and a missing one fails the test with the command to run.

// Shared by several test crates (`envoy.rs`, `edge.rs`), each using part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

pub fn wasm_path() -> PathBuf {
    let path = target_dir().join("wasm32-wasip1/wasm/tollgate_wasm.wasm");
    assert!(
        path.is_file(),
        "the filter module {} is missing: build it with \
         `cargo build -p tollgate-wasm --target wasm32-wasip1 --profile wasm` (scripts/test does)",
        path.display()
    );
    path
}

pub fn envoy_path() -> PathBuf {
    let path = std::env::var_os("TOLLGATE_ENVOY")
        .map_or_else(|| root().join("target/envoy-venv/bin/envoy"), PathBuf::from);
    assert!(
        path.is_file(),
        "Envoy is missing at {}: install it with `scripts/install-envoy` (scripts/test does)",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    child: Child,
    pub port: u16,
    pub admin: u16,
    pub dir: PathBuf,
}

impl Envoy {
    /// Renders the bootstrap with `plugin` (JSON text) and starts Envoy with 2 workers.
    pub fn start(plugin: &str, upstream: u16, collector: u16) -> Envoy {
        Envoy::start_with(plugin, upstream, collector, free_port())
    }

    /// [`Envoy::start`] with the `policy` cluster pointing at `policy`.
    pub fn start_with(plugin: &str, upstream: u16, collector: u16, policy: u16) -> Envoy {
        Envoy::start_edited(plugin, upstream, collector, policy, |yaml| yaml.to_owned())
    }

    /// [`Envoy::start_with`] on the shipped bootstrap as `edit` changes it (another filter
    /// chain, say).
    pub fn start_edited(
        plugin: &str,
        upstream: u16,
        collector: u16,
        policy: u16,
        edit: impl Fn(&str) -> String,
    ) -> Envoy {
        let (port, admin) = (free_port(), free_port());
        let dir =
            std::env::temp_dir().join(format!("tollgate-envoy-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("plugin.json"), plugin).unwrap();
        let rendered = Command::new(root().join("envoy/run.sh"))
            .arg("--render")
            .arg(dir.join("plugin.json"))
            .env("LISTEN_PORT", port.to_string())
            .env("ADMIN_PORT", admin.to_string())
            .env("UPSTREAM_PORT", upstream.to_string())
            .env("COLLECTOR_PORT", collector.to_string())
            .env("POLICY_PORT", policy.to_string())
            .env("WASM", wasm_path())
            .output()
            .unwrap();
        assert!(rendered.status.success(), "{}", String::from_utf8_lossy(&rendered.stderr));
        let rendered = edit(&String::from_utf8(rendered.stdout).unwrap());
        std::fs::write(dir.join("envoy.yaml"), rendered).unwrap();
        let log = std::fs::File::create(dir.join("envoy.log")).unwrap();
        let child = Command::new(envoy_path())
            .args(["-c", "envoy.yaml", "--concurrency", "2", "--disable-hot-restart"])
            .args(["-l", "warning", "--component-log-level", "wasm:info"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut envoy = Envoy { child, port, admin, dir };
        envoy.wait_ready();
        envoy
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("Envoy exited with {status}:\n{}", self.log());
            }
            if let Ok(r) = try_request(self.admin, "GET", "/ready", &[], b"") {
                if r.status == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("Envoy not ready within 30 s:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        request(self.port, method, path, headers, body)
    }

    /// `/stats/prometheus`.
    pub fn prometheus(&self) -> String {
        String::from_utf8(request(self.admin, "GET", "/stats/prometheus", &[], b"").body).unwrap()
    }

    /// Polls a series until it reaches `at_least` (10 s at most) and returns its value.
    pub fn wait_metric(&self, series: &str, at_least: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.metric(series);
            if v >= at_least || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The value of one Prometheus series (exact name with labels as Envoy prints them), or 0.
    pub fn metric(&self, series: &str) -> u64 {
        metric(&self.prometheus(), series)
    }
}

pub fn metric(text: &str, series: &str) -> u64 {
    // Envoy prints a series without labels as `name{} value`.
    let series = if series.contains('{') { series.to_owned() } else { format!("{series}{{}}") };
    let series = series.as_str();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    try_request(port, method, path, headers, body).unwrap()
}

fn try_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let (head, mut reader) = send(port, method, path, headers, body)?;
    let body = read_body(&head, &mut reader, |_| {})?;
    Ok(Response { body, ..head })
}

/// Sends `raw` bytes as they are on a new connection and returns everything answered until the
/// connection closes (or 10 s pass).
pub fn raw(port: u16, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(raw).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// Sends a request and reads the response head; the body is left in the reader. The `host` is
/// `localhost` unless `headers` name one.
pub fn send(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(Response, BufReader<TcpStream>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        req.push_str("host: localhost\r\n");
    }
    req.push_str("connection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    stream.write_all(body)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    Ok((Response { status, headers, body: Vec::new() }, reader))
}

/// Reads a body (chunked or not), calling `on_data` with each piece as it arrives.
pub fn read_body(
    head: &Response,
    reader: &mut BufReader<TcpStream>,
    mut on_data: impl FnMut(&[u8]),
) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if head.header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk)?;
            chunk.truncate(n);
            if n == 0 {
                break;
            }
            on_data(&chunk);
            body.extend_from_slice(&chunk);
        }
    } else if let Some(n) = head.header("content-length").and_then(|v| v.parse().ok()) {
        body.resize(n, 0);
        reader.read_exact(&mut body)?;
        on_data(&body);
    } else {
        reader.read_to_end(&mut body)?;
        on_data(&body);
    }
    Ok(body)
}

/// A usage-event collector: accepts POSTs of NDJSON and keeps every line it takes, answering
/// each line by its `event_id` as the Tollgate collector does. It lists no agent as disabled
/// (`GET /v1/fleet/agents/disabled`) and takes every oversight report, keeping them.
pub struct Collector {
    pub port: u16,
    pub events: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Every line offered, taken or not.
    pub offered: Arc<Mutex<Vec<serde_json::Value>>>,
    /// When each batch arrived, with the event ids in it.
    pub batches: Arc<Mutex<Vec<Batch>>>,
    /// The oversight reports taken (`POST /v1/fleet/oversight/reports`).
    pub reports: Arc<Mutex<Vec<serde_json::Value>>>,
}

/// When a batch of usage events arrived, and the event ids in it.
pub type Batch = (Instant, Vec<String>);

impl Collector {
    pub fn start() -> Collector {
        Collector::refusing(0)
    }

    /// A collector that refuses every event of its first `batches` batches (`422`, each line
    /// `refused` naming a field), then takes everything.
    pub fn refusing(batches: usize) -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let events = Arc::new(Mutex::new(Vec::new()));
        let offered = Arc::new(Mutex::new(Vec::new()));
        let refuse = Arc::new(std::sync::atomic::AtomicUsize::new(batches));
        let batches = Arc::new(Mutex::new(Vec::new()));
        let reports = Arc::new(Mutex::new(Vec::new()));
        let (sink, seen, log, taken) =
            (events.clone(), offered.clone(), batches.clone(), reports.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (sink, seen, refuse, log, taken) =
                    (sink.clone(), seen.clone(), refuse.clone(), log.clone(), taken.clone());
                std::thread::spawn(move || {
                    serve_collector(stream, &sink, &seen, &refuse, &log, &taken)
                });
            }
        });
        Collector { port, events, offered, batches, reports }
    }

    /// Waits until an event with `request_id` arrived and returns it.
    pub fn wait_for(&self, request_id: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found =
                self.events.lock().unwrap().iter().find(|e| e["request_id"] == request_id).cloned();
            if let Some(e) = found {
                return e;
            }
            assert!(Instant::now() < deadline, "no usage event for {request_id} within 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn serve_collector(
    stream: TcpStream,
    sink: &Mutex<Vec<serde_json::Value>>,
    seen: &Mutex<Vec<serde_json::Value>>,
    refuse: &std::sync::atomic::AtomicUsize,
    batches: &Mutex<Vec<Batch>>,
    reports: &Mutex<Vec<serde_json::Value>>,
) {
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split(' ').nth(1).unwrap_or("").to_owned();
        let mut head = Response { status: 0, headers: Vec::new(), body: Vec::new() };
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((n, v)) = l.split_once(':') {
                head.headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let Ok(body) = read_body(&head, &mut reader, |_| {}) else { return };
        let other = match path.as_str() {
            "/v1/fleet/agents/disabled" => Some(serde_json::json!({"agents": []})),
            "/v1/fleet/oversight/reports" => {
                let taken: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let batch = taken["reports"].as_array().cloned().unwrap_or_default();
                let results: Vec<_> =
                    batch.iter().map(|_| serde_json::json!({"result": "accepted"})).collect();
                reports.lock().unwrap().extend(batch);
                Some(serde_json::json!({"results": results}))
            }
            _ => None,
        };
        if let Some(answer) = other {
            let answer = answer.to_string();
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                answer.len()
            );
            if writer.write_all(reply.as_bytes()).is_err() {
                return;
            }
            continue;
        }
        use std::sync::atomic::Ordering;
        let refused =
            refuse.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        let mut results = Vec::new();
        let mut ids = Vec::new();
        for l in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(l) {
                seen.lock().unwrap().push(v.clone());
                let id = v["event_id"].clone();
                ids.push(id.as_str().unwrap_or_default().to_owned());
                if refused {
                    results.push(serde_json::json!({"event_id": id, "result": "refused",
                        "field": "ts_ms", "error": "more than a day in the future"}));
                } else {
                    sink.lock().unwrap().push(v);
                    results.push(serde_json::json!({"event_id": id, "result": "accepted"}));
                }
            }
        }
        batches.lock().unwrap().push((Instant::now(), ids));
        let answer = serde_json::json!({"results": results}).to_string();
        let status = if refused { "422 Unprocessable Entity" } else { "200 OK" };
        let reply = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// One request to the policy source: the `If-None-Match` it sent, the status answered and the
/// ETag of the document being served then.
pub type PolicyFetch = (Option<String>, u16, String);

/// A policy source: serves one document with an ETag, answers `304` to a matching
/// `If-None-Match`, and records what it answered.
pub struct PolicyServer {
    pub port: u16,
    /// (ETag, document) being served.
    current: Arc<Mutex<(String, String)>>,
    pub log: Arc<Mutex<Vec<PolicyFetch>>>,
}

impl PolicyServer {
    pub fn start(etag: &str, document: &str) -> PolicyServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let current = Arc::new(Mutex::new((etag.to_owned(), document.to_owned())));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (doc, seen) = (current.clone(), log.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (doc, seen) = (doc.clone(), seen.clone());
                std::thread::spawn(move || serve_policy(stream, &doc, &seen));
            }
        });
        PolicyServer { port, current, log }
    }

    /// Serves `document` under `etag` from now on.
    pub fn serve(&self, etag: &str, document: &str) {
        *self.current.lock().unwrap() = (etag.to_owned(), document.to_owned());
    }

    /// How many times the document with `etag` was sent in full.
    pub fn served(&self, etag: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|(_, s, e)| *s == 200 && e == etag).count()
    }
}

fn serve_policy(
    stream: TcpStream,
    current: &Mutex<(String, String)>,
    log: &Mutex<Vec<PolicyFetch>>,
) {
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut if_none_match = None;
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((n, v)) = l.split_once(':') {
                if n.trim().eq_ignore_ascii_case("if-none-match") {
                    if_none_match = Some(v.trim().to_owned());
                }
            }
        }
        let (etag, document) = current.lock().unwrap().clone();
        let reply = if if_none_match.as_deref() == Some(etag.as_str()) {
            log.lock().unwrap().push((if_none_match, 304, etag.clone()));
            format!("HTTP/1.1 304 Not Modified\r\netag: {etag}\r\ncontent-length: 0\r\n\r\n")
        } else {
            log.lock().unwrap().push((if_none_match, 200, etag.clone()));
            format!(
                "HTTP/1.1 200 OK\r\netag: {etag}\r\ncontent-type: application/yaml\r\n\
                 content-length: {}\r\n\r\n{document}",
                document.len()
            )
        };
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// A TCP relay to `target` that records each request's bytes and, on its first `drop_first`
/// connections, swallows the target's answer and closes instead: the sender sees a reset after
/// the target has done the work (a lost response, as after a timeout).
pub struct Relay {
    pub port: u16,
    /// Bytes sent by the client, per connection.
    pub sent: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Responses swallowed so far.
    pub dropped: Arc<std::sync::atomic::AtomicUsize>,
}

impl Relay {
    pub fn start(target: u16, drop_first: usize) -> Relay {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let dropped = Arc::new(AtomicUsize::new(0));
        let (log, swallowed) = (sent.clone(), dropped.clone());
        std::thread::spawn(move || {
            for (n, client) in listener.incoming().flatten().enumerate() {
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                let drop_answer = n < drop_first;
                let index = {
                    let mut log = log.lock().unwrap();
                    log.push(Vec::new());
                    log.len() - 1
                };
                let (mut c_read, mut u_write) =
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                let log = log.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = c_read.read(&mut buf) {
                        if n == 0 || u_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        log.lock().unwrap()[index].extend_from_slice(&buf[..n]);
                    }
                    let _ = u_write.shutdown(std::net::Shutdown::Write);
                });
                let swallowed = swallowed.clone();
                std::thread::spawn(move || {
                    let (mut u_read, mut c_write) = (upstream, client);
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = u_read.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if drop_answer {
                            swallowed.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        if c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c_write.shutdown(std::net::Shutdown::Both);
                    let _ = u_read.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Relay { port, sent, dropped }
    }
}

/// What `promtool check metrics` finds in an exposition (read on stdin): whether it accepted the
/// text, and its findings, one per line. A missing `promtool` fails with the command to install
/// it (`scripts/test` does); it never skips.
pub fn promtool(exposition: &str) -> (bool, Vec<String>) {
    let path =
        std::env::var_os("TOLLGATE_PROMTOOL").map_or_else(|| "promtool".into(), PathBuf::from);
    let child = Command::new(&path)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = child.unwrap_or_else(|e| {
        panic!(
            "promtool ({}) cannot run ({e}): install it with `apt-get install -y prometheus` \
             (scripts/test does)",
            path.display()
        )
    });
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(exposition.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let findings = text.lines().filter(|l| !l.trim().is_empty()).map(str::to_owned).collect();
    (out.status.success(), findings)
}

/// The lines of a Prometheus exposition that belong to the families named `tollgate_*`.
pub fn tollgate_families(exposition: &str) -> String {
    exposition
        .lines()
        .filter(|l| {
            let l = l.strip_prefix("# TYPE ").or_else(|| l.strip_prefix("# HELP ")).unwrap_or(l);
            l.starts_with("tollgate_")
        })
        .map(|l| format!("{l}\n"))
        .collect()
}
