//! A ledger that shows tampering, against the real binary: a complete last line with a bad
//! checksum is corruption (kept, and named by `run`, `invoice` and `audit verify` alike), unlike
//! an unterminated one (a torn write); a cost rewritten with its checksum recomputed breaks the
//! chain, also across segments; with an HMAC key even a recomputed chain is found; records cut
//! from the end are found against a published head; a missing or empty data directory is an
//! error; a ledger from before chaining still invoices.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tollgate_e2e::harness::temp_dir;
use tollgate_e2e::mock::MockUpstream;
use tollgate_e2e::process::{command, ConfigFile, Tollgate};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
const TOKEN_ENV: &str = "TOLLGATE_TAMPER_TEST_TOKEN";
const TOKEN: &str = "tamper-test-token";
const KEY: &str = "a-ledger-key-of-more-than-16-bytes";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A data directory the proxy wrote.
struct Written {
    dir: PathBuf,
    data: PathBuf,
    config: PathBuf,
    /// `GET /admin/ledger/head` before the proxy stopped.
    head: Value,
    _mock: MockUpstream,
}

/// Runs the proxy with `extra` config, sends `requests` chats (each writes a `reserve` and a
/// `usage` record and one audit record, flushed before the next), reads the head from the admin
/// API, stops it.
async fn write(label: &str, extra: &str, requests: usize) -> Written {
    let mock = MockUpstream::start().await;
    let dir = temp_dir(label);
    let data = dir.join("data");
    let key_file = dir.join("ledger.key");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let extra = extra.replace("KEY_FILE", &key_file.display().to_string());
    // These tests edit records as text: the ledger writes JSON lines (the compact encoding's
    // own tamper tests are in the ledger's unit tests).
    let extra = match extra.contains("ledger: {") {
        true => extra.replace("ledger: {", "ledger: {encoding: json, "),
        false => format!("ledger: {{encoding: json}}\n{extra}"),
    };
    let yaml = ConfigFile {
        upstream: &mock.base_url(),
        data_dir: &data,
        token_env: TOKEN_ENV,
        more_routes: &[],
        extra: &extra,
        policy: "version: tamper-1\n\
                 defaults: {llm: allow}\n\
                 budgets:\n\
                 \x20 - {id: cc, scope: cost_center, period: monthly, amount: \"1000.00\"}\n",
    }
    .yaml();
    let config = dir.join("tollgate.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut proxy = start(&config);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    for _ in 0..requests {
        chat(&client, &proxy).await;
        // Flushed after each request, so that no batch (and no segment) grows past its share
        // however slow the disk's syncs are.
        admin_head(&client, proxy.admin).await;
    }
    // The usage record is written when the proxy has seen the response end, which can be just
    // after the client has.
    let mut head = admin_head(&client, proxy.admin).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while head["ledger"]["records"] != 2 * requests as u64 {
        assert!(std::time::Instant::now() < deadline, "records missing after 5 s: {head}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        head = admin_head(&client, proxy.admin).await;
    }
    proxy.signal("TERM");
    assert_eq!(tokio::task::block_in_place(|| proxy.exit_code()), Some(0));
    Written { dir, data, config, head, _mock: mock }
}

/// One chat completion through `proxy`, read to its end.
async fn chat(client: &HttpClient, proxy: &Tollgate) {
    let body = json!({"model": "gpt-4o", "max_tokens": 5,
                      "messages": [{"role": "user", "content": "hi"}]});
    let request = hyper::Request::post(format!("http://{}/v1/chat/completions", proxy.proxy))
        .header("content-type", "application/json")
        .header("x-agent-id", "tampered")
        .header("x-cost-center", "CC-1234")
        .header("x-project-id", "PROJ-ABC123")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
}

async fn admin_get(client: &HttpClient, url: String) -> (u16, Bytes) {
    let request = hyper::Request::get(url)
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status().as_u16();
    (status, response.into_body().collect().await.unwrap().to_bytes())
}

fn start(config: &Path) -> Tollgate {
    tokio::task::block_in_place(|| Tollgate::run(Path::new(BIN), config, &[(TOKEN_ENV, TOKEN)]))
}

async fn admin_head(client: &HttpClient, admin: std::net::SocketAddr) -> Value {
    let (status, body) = admin_get(client, format!("http://{admin}/admin/ledger/head")).await;
    assert_eq!(status, 200);
    serde_json::from_slice(&body).unwrap()
}

fn segment(data: &Path, n: u64) -> PathBuf {
    data.join("ledger").join(format!("{n:08}.seg"))
}

/// The lines of a file that ends with a newline, without their newlines.
fn lines(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    if bytes.is_empty() {
        return Vec::new();
    }
    assert_eq!(bytes.last(), Some(&b'\n'), "{} ends with a newline", path.display());
    bytes[..bytes.len() - 1].split(|&b| b == b'\n').map(<[u8]>::to_vec).collect()
}

fn write_lines(path: &Path, lines: &[Vec<u8>]) {
    let mut bytes = Vec::new();
    for line in lines {
        bytes.extend_from_slice(line);
        bytes.push(b'\n');
    }
    std::fs::write(path, bytes).unwrap();
}

fn text(line: &[u8]) -> &str {
    std::str::from_utf8(line).unwrap()
}

/// `<crc32 hex> <rest>` with the checksum recomputed, as an attacker would.
fn with_crc(rest: &str) -> Vec<u8> {
    format!("{:08x} {rest}", crc32fast::hash(rest.as_bytes())).into_bytes()
}

/// A chained line's `(link letter, json)`.
fn split(line: &[u8]) -> (char, String) {
    let line = text(line);
    (line.as_bytes()[9] as char, line[75..].to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Re-links every line from `from` on (0-based) with SHA-256 (`s`), checksums recomputed: a
/// complete forgery for someone without the key.
fn relink(lines: &mut [Vec<u8>], from: usize) {
    for i in from..lines.len() {
        let link = if i == 0 { [0u8; 32].to_vec() } else { Sha256::digest(&lines[i - 1]).to_vec() };
        let (_, json) = split(&lines[i]);
        lines[i] = with_crc(&format!("s{} {json}", hex(&link)));
    }
}

/// The `n`th (0-based) usage line of a segment.
fn usage_line(lines: &[Vec<u8>], n: usize) -> usize {
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| text(l).contains("\"type\":\"usage\""))
        .nth(n)
        .map(|(i, _)| i)
        .expect("a usage line")
}

/// The line with its cost cut to one nano-dollar (the checksum not yet recomputed).
fn cheaper(line: &[u8]) -> String {
    let line = text(line);
    let json: Value = serde_json::from_str(&line[75..]).unwrap();
    let cost = json["cost_nano_usd"].as_i64().unwrap();
    assert!(cost > 1);
    line.replace(&format!("\"cost_nano_usd\":{cost}"), "\"cost_nano_usd\":1")
}

/// `tollgate audit verify` with `args` on `data`: exit code, stdout, stderr.
fn verify(data: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["audit", "verify", "--data-dir", data.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = command(Path::new(BIN), &all);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The month of the ledger's first record.
fn month(data: &Path) -> String {
    let records = tollgate::ledger::read_all(data).unwrap();
    records[0]["ts"].as_str().unwrap()[..7].to_string()
}

/// `tollgate invoice` for `period` on `data`: exit code, stdout, stderr.
fn invoice(data: &Path, period: &str) -> (Option<i32>, String, String) {
    let out = command(
        Path::new(BIN),
        &["invoice", "--period", period, "--data-dir", data.to_str().unwrap()],
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tollgate run` that is expected to refuse to start: exit code and stderr.
fn refused_run(config: &Path) -> (Option<i32>, String) {
    let out = std::process::Command::new(BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .env_remove("TOLLGATE_CONFIG")
        .env(TOKEN_ENV, TOKEN)
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_last_line_with_a_bad_checksum_is_kept_and_named_by_run_invoice_and_verify() {
    let w = write("tamper-badcrc", "", 3).await;
    let period = month(&w.data);
    let seg = segment(&w.data, 1);
    let mut l = lines(&seg);
    assert_eq!(l.len(), 6, "a reserve and a usage record per request");
    let (code, out, _) = verify(&w.data, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(": OK: 6 records in 1 segment, chain intact (SHA-256)"), "{out}");

    // The last line, complete, one byte changed: corruption, not a torn write.
    let last = l.len() - 1;
    let changed = text(&l[last]).replace("\"end\":\"complete\"", "\"end\":\"completE\"");
    assert_ne!(changed.as_bytes(), &l[last][..]);
    l[last] = changed.into_bytes();
    write_lines(&seg, &l);
    let corrupt = std::fs::read(&seg).unwrap();
    let at = format!("{}:6: checksum mismatch", seg.display());

    let (code, stderr) = refused_run(&w.config);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&at), "{stderr}");
    assert!(stderr.contains("accept_corrupt: [\"00000001.seg:6\"]"), "{stderr}");
    assert_eq!(std::fs::read(&seg).unwrap(), corrupt, "run leaves the segment as it is");

    let (code, _, stderr) = invoice(&w.data, &period);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&at), "{stderr}");

    let (code, out, _) = verify(&w.data, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("CORRUPT at {at}")), "{out}");
    assert_eq!(std::fs::read(&seg).unwrap(), corrupt, "nothing rewrote the segment");

    // Accepted as lost: the proxy starts without it, says so, and appends after it.
    let config = std::fs::read_to_string(&w.config).unwrap();
    let accepting = w.dir.join("accepting.yaml");
    std::fs::write(
        &accepting,
        config.replace("ledger: {", "ledger: {accept_corrupt: [\"00000001.seg:6\"], "),
    )
    .unwrap();
    let mut proxy = start(&accepting);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let (_, metrics) = admin_get(&client, format!("http://{}/metrics", proxy.admin)).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(metrics.contains("tollgate_ledger_corrupt_records 1"), "{metrics}");
    proxy.signal("TERM");
    assert_eq!(tokio::task::block_in_place(|| proxy.exit_code()), Some(0));
    assert!(std::fs::read(&seg).unwrap().starts_with(&corrupt), "kept as it was");
    let (code, out, _) = verify(&w.data, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("CORRUPT at {at}")), "{out}");

    // An unterminated last line is a torn write: reported as such, cut when the proxy starts.
    let torn = w.dir.join("torn");
    std::fs::create_dir_all(torn.join("ledger")).unwrap();
    let intact = lines(&segment(&w.data, 1));
    let mut bytes = Vec::new();
    for line in &intact[..5] {
        bytes.extend_from_slice(line);
        bytes.push(b'\n');
    }
    bytes.extend_from_slice(&intact[5][..40]);
    std::fs::write(segment(&torn, 1), &bytes).unwrap();
    std::fs::create_dir_all(torn.join("audit")).unwrap();
    let audit = w.data.join("audit").join("00000001.seg");
    std::fs::copy(&audit, torn.join("audit").join("00000001.seg")).unwrap();
    let (code, out, _) = verify(&torn, &[]);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains(&format!("{}:6 is a torn tail", segment(&torn, 1).display())), "{out}");
    let _ = std::fs::remove_dir_all(&w.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_rewritten_with_its_checksum_recomputed_breaks_the_chain() {
    let w = write("tamper-rewrite", "", 3).await;
    let period = month(&w.data);
    let seg = segment(&w.data, 1);
    let mut l = lines(&seg);
    let at = usage_line(&l, 0);
    let forged = cheaper(&l[at]);
    l[at] = with_crc(&forged[9..]);
    write_lines(&seg, &l);

    let expected = format!(
        "TAMPERED at {}:{}: the record was changed, or records after it removed or reordered: \
         the next record (00000001.seg:{}) does not link to it",
        seg.display(),
        at + 1,
        at + 2
    );
    let (code, out, _) = verify(&w.data, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&expected), "{out}");
    let (code, _, stderr) = invoice(&w.data, &period);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("{}:{}: the record was changed", seg.display(), at + 1)));
    let (code, stderr) = refused_run(&w.config);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("{}:{}: the record was changed", seg.display(), at + 1)));

    // Recomputing every later link too passes the chain check (there is no key) but not the
    // head published before: the record at the head's count no longer hashes to its hash.
    relink(&mut l, at + 1);
    write_lines(&seg, &l);
    std::fs::remove_file(w.data.join("head.json")).unwrap();
    let (code, out, _) = verify(&w.data, &[]);
    assert_eq!(code, Some(0), "an unkeyed chain can be recomputed: {out}");
    let head = w.head.to_string();
    let (code, out, _) = verify(&w.data, &["--head", &head]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("the ledger's record 6 does not hash to the head's"), "{out}");
    let _ = std::fs::remove_dir_all(&w.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_runs_across_segments() {
    // About seven records to a segment (a segment is closed after the batch that fills it).
    let w = write("tamper-segments", "ledger: {segment_bytes: 4096}\n", 16).await;
    let (code, out, _) = verify(&w.data, &[]);
    assert_eq!(code, Some(0), "{out}");
    let segments = tollgate::store::segments(&w.data.join("ledger")).unwrap();
    assert!(segments.len() >= 3, "{segments:?}");
    let sizes: Vec<usize> = segments.iter().map(|&n| lines(&segment(&w.data, n)).len()).collect();
    assert!(sizes.len() >= 3 && sizes[2] > 0, "three segments with records: {sizes:?}");
    assert!(out.contains(&format!("in {} segments, chain intact", segments.len())), "{out}");

    // The last record of segment 1 rewritten (checksum recomputed): the first record of
    // segment 2 no longer links to it.
    let first = segment(&w.data, 1);
    let original = std::fs::read(&first).unwrap();
    let mut l = lines(&first);
    let last = l.len() - 1;
    let forged = text(&l[last]).replace("\"agent\":\"tampered\"", "\"agent\":\"someone\"");
    l[last] = with_crc(&forged[9..]);
    write_lines(&first, &l);
    let (code, out, _) = verify(&w.data, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "TAMPERED at {}:{}: the record was changed, or records after it removed or \
             reordered: the next record (00000002.seg:1) does not link to it",
            first.display(),
            last + 1
        )),
        "{out}"
    );
    std::fs::write(&first, original).unwrap();

    // A whole segment removed from the middle, and then the first one.
    let second = segment(&w.data, 2);
    let saved = std::fs::read(&second).unwrap();
    std::fs::remove_file(&second).unwrap();
    let (code, out, _) = verify(&w.data, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("the next record (00000003.seg:1) does not link to it"), "{out}");
    std::fs::write(&second, saved).unwrap();
    std::fs::remove_file(&first).unwrap();
    let (code, out, _) = verify(&w.data, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "TAMPERED at {}:1: the first record does not start the chain",
            second.display()
        )),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&w.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_hmac_key_a_rewrite_is_found_even_with_the_chain_recomputed() {
    let w = write("tamper-hmac", "ledger: {hmac_key_file: \"KEY_FILE\"}\n", 3).await;
    let key_file = w.dir.join("ledger.key");
    let key_args = ["--hmac-key-file", key_file.to_str().unwrap()];
    let seg = segment(&w.data, 1);
    let mut l = lines(&seg);
    assert!(l.iter().all(|line| split(line).0 == 'h'), "every link is keyed");
    let (code, out, _) = verify(&w.data, &key_args);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("chain intact (HMAC-SHA256)"), "{out}");
    // The key from the config, as the proxy has it.
    let (code, out, _) = {
        let out =
            command(Path::new(BIN), &["audit", "verify", "--config", w.config.to_str().unwrap()]);
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), ())
    };
    assert_eq!(code, Some(0), "{out}");
    // Without the key the links cannot be checked, and verify does not pretend they were.
    let (code, out, _) = verify(&w.data, &[]);
    assert_eq!(code, Some(4), "{out}");
    assert!(out.contains("keyed links NOT checked"), "{out}");
    assert!(!out.contains(KEY) && !std::fs::read_to_string(&seg).unwrap().contains(KEY));

    // A cost cut, its checksum and every later link recomputed with SHA-256.
    let at = usage_line(&l, 0);
    let forged = cheaper(&l[at]);
    l[at] = with_crc(&forged[9..]);
    relink(&mut l, at + 1);
    write_lines(&seg, &l);
    let (code, out, _) = verify(&w.data, &key_args);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "TAMPERED at {}:{}: the record was changed, or records after it removed or \
             reordered: the next record (00000001.seg:{}) is linked by plain SHA-256 after \
             HMAC-linked ones: the chain was recomputed without the key",
            seg.display(),
            at + 1,
            at + 2
        )),
        "{out}"
    );

    // ... or with HMAC links under a guessed key: the first of them does not verify.
    let mut l = lines(&seg);
    for i in at + 1..l.len() {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(b"a-guessed-key-0123456789").unwrap();
        mac.update(&l[i - 1]);
        let (_, json) = split(&l[i]);
        l[i] = with_crc(&format!("h{} {json}", hex(&mac.finalize().into_bytes())));
    }
    write_lines(&seg, &l);
    let (code, out, _) = verify(&w.data, &key_args);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("TAMPERED at {}:{}: the record was changed", seg.display(), at + 1)),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&w.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_cut_from_the_end_are_found_against_the_head() {
    let w = write("tamper-head", "", 3).await;
    // The checkpoint the proxy left equals what its admin API published.
    let checkpoint: Value =
        serde_json::from_str(&std::fs::read_to_string(w.data.join("head.json")).unwrap()).unwrap();
    assert_eq!(checkpoint, w.head);
    assert_eq!(w.head["ledger"]["records"], 6);
    assert_eq!(w.head["audit"]["records"], 3);
    let kept = w.dir.join("kept-head.json");
    std::fs::write(&kept, w.head.to_string()).unwrap();

    // The last request's two ledger records and its audit record removed, the checkpoint too.
    let seg = segment(&w.data, 1);
    let l = lines(&seg);
    write_lines(&seg, &l[..4]);
    let audit = w.data.join("audit").join("00000001.seg");
    let a = lines(&audit);
    write_lines(&audit, &a[..2]);
    let checkpoint_text = std::fs::read(w.data.join("head.json")).unwrap();
    std::fs::remove_file(w.data.join("head.json")).unwrap();
    let (code, out, _) = verify(&w.data, &[]);
    assert_eq!(code, Some(0), "what is left is intact: {out}");
    for head in [kept.to_str().unwrap(), &w.head.to_string()] {
        let (code, out, _) = verify(&w.data, &["--head", head]);
        assert_eq!(code, Some(1), "{out}");
        assert!(
            out.contains(
                "the ledger holds 4 records but the head says 6: records were removed from its end"
            ),
            "{out}"
        );
        assert!(out.contains("the audit log holds 2 records but the head says 3"), "{out}");
    }
    // With the checkpoint left in place, verify and run find it without being told.
    std::fs::write(w.data.join("head.json"), checkpoint_text).unwrap();
    let (code, out, _) = verify(&w.data, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("head.json: TAMPERED: the ledger holds 4 records"), "{out}");
    let (code, stderr) = refused_run(&w.config);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("the ledger holds 4 records but the head says 6"), "{stderr}");

    // A live proxy's head by URL: its own data verifies against it.
    std::fs::remove_dir_all(&w.data).unwrap();
    let proxy = start(&w.config);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    chat(&client, &proxy).await;
    let url = format!("http://{}/admin/ledger/head", proxy.admin);
    let out = std::process::Command::new(BIN)
        .args(["audit", "verify", "--config", w.config.to_str().unwrap(), "--head", &url])
        .env_remove("TOLLGATE_CONFIG")
        .env(TOKEN_ENV, TOKEN)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("head {url}: OK")), "{stdout}");
    drop(proxy);
    let _ = std::fs::remove_dir_all(&w.dir);
}

#[test]
fn a_missing_or_empty_data_directory_is_an_error() {
    let dir = temp_dir("tamper-missing");
    let missing = dir.join("no-such-dir");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    for data in [&missing, &empty] {
        let (code, out, stderr) = verify(data, &[]);
        assert_eq!(code, Some(2), "{out}{stderr}");
        assert!(stderr.contains(&data.display().to_string()), "{stderr}");
        assert!(!out.contains("OK"), "{out}");
        let (code, out, stderr) = invoice(data, "2026-12");
        assert_eq!(code, Some(1), "{out}{stderr}");
        assert!(stderr.contains(&data.display().to_string()), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_from_before_chaining_still_invoices_and_verify_says_where_the_chain_starts() {
    let w = write("tamper-unchained", "", 2).await;
    let period = month(&w.data);
    // The same records as an older version wrote them: `<crc32 hex> <json>`.
    let seg = segment(&w.data, 1);
    let old: Vec<Vec<u8>> = lines(&seg).iter().map(|l| with_crc(&split(l).1)).collect();
    write_lines(&seg, &old);
    std::fs::remove_file(w.data.join("head.json")).unwrap();
    let (code, out, stderr) = invoice(&w.data, &period);
    assert_eq!(code, Some(0), "{stderr}");
    let invoices: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(invoices["invoices"][0]["requests"], 2, "{out}");
    let (code, out, _) = verify(&w.data, &[]);
    assert_eq!(code, Some(4), "{out}");
    assert!(out.contains("unchained before the end: 4 records"), "{out}");

    // The proxy continues the ledger with chained records, linked to the last old one.
    let mut proxy = start(&w.config);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    chat(&client, &proxy).await;
    proxy.signal("TERM");
    assert_eq!(tokio::task::block_in_place(|| proxy.exit_code()), Some(0));
    let (code, out, _) = verify(&w.data, &[]);
    assert_eq!(code, Some(4), "{out}");
    assert!(
        out.contains(&format!(
            "OK: 6 records in 1 segment, chain intact (SHA-256); unchained before {}:5: 4 records",
            seg.display()
        )),
        "{out}"
    );
    let (code, out, stderr) = invoice(&w.data, &period);
    assert_eq!(code, Some(0), "{stderr}");
    let invoices: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(invoices["invoices"][0]["requests"], 3, "{out}");
    let _ = std::fs::remove_dir_all(&w.dir);
}
