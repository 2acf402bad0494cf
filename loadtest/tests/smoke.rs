//! Short, bounded end-to-end runs of the generator on real loopback sockets: against the mock
//! upstream directly, and through Tollgate started in process with the config `compare`
//! generates, for every scenario file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::TcpListener;
use tollgate_e2e::mock::MockUpstream;
use tollgate_loadtest::load::{self, Mode, Plan};
use tollgate_loadtest::scenario::Scenario;
use tollgate_loadtest::stats::{ErrorKind, Summary};
use tollgate_loadtest::target::tollgate_config;

/// Every scenario that can run at a low rate (not the 1,000-stream one).
const ALL: [&str; 7] = [
    "chat.yaml",
    "chat-gzip.yaml",
    "tools.yaml",
    "mix.yaml",
    "sse.yaml",
    "sse-burst.yaml",
    "sse-gzip.yaml",
];
/// Requests each scenario sends in `assert_every_request_passes` (40/s for 500 ms).
const PER_SCENARIO: u64 = 20;

fn scenario_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

fn scenario(name: &str) -> Scenario {
    let path = scenario_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    Scenario::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn plan(mode: Mode, duration_ms: u64) -> Plan {
    Plan {
        mode,
        duration: Duration::from_millis(duration_ms),
        max_requests: 100_000,
        request_timeout: Duration::from_secs(5),
        grace: Duration::from_secs(1),
    }
}

/// Starts the proxy in process on the generated `yaml`; send on the channel to stop it.
async fn start_tollgate(yaml: &str) -> (tollgate::app::Running, tokio::sync::oneshot::Sender<()>) {
    let config = tollgate::config::Config::from_str(yaml).unwrap_or_else(|e| panic!("{e}"));
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tollgate::app::start(config, proxy, admin, async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    (running, stop)
}

/// Runs each scenario in `files` against `base` (40 req/s for 500 ms over `connections`) and
/// asserts that all 20 requests of each passed.
async fn assert_every_request_passes(
    client: &load::HttpClient,
    base: &str,
    files: &[&str],
    connections: usize,
    what: &str,
) {
    for file in files {
        let outcome = load::run(
            client,
            base,
            &scenario(file),
            &plan(Mode::Open { rate: 40, connections }, 500),
        )
        .await
        .unwrap();
        let r = &outcome.recorder;
        assert_eq!((r.ok, r.errors_text().as_str()), (PER_SCENARIO, "0"), "{file} {what}");
    }
}

#[test]
fn every_scenario_file_parses() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(scenario_dir()).unwrap() {
        let file = entry.unwrap().file_name().into_string().unwrap();
        let s = scenario(&file);
        assert!(!s.requests.is_empty(), "{file}");
        names.push(s.name);
    }
    names.sort();
    let expected =
        ["chat", "chat-gzip", "mix", "sse", "sse-1000", "sse-burst", "sse-gzip", "tools"];
    assert_eq!(names, expected);
    assert_eq!(scenario("chat.yaml").requests[0].body.len(), 1024);
}

#[tokio::test]
async fn open_loop_sends_exactly_the_schedule_at_its_rate() {
    let mock = MockUpstream::start().await;
    let outcome = load::run(
        &load::client(load::Connections::Reused),
        &mock.base_url(),
        &scenario("chat.yaml"),
        &plan(Mode::Open { rate: 200, connections: 4 }, 1000),
    )
    .await
    .unwrap();
    let r = &outcome.recorder;
    assert_eq!((r.ok, r.error_count()), (200, 0), "{}", r.errors_text());
    assert_eq!((r.latency.len(), r.send_lag.len()), (200, 200));
    assert_eq!(mock.request_count(), 200);
    // The last request is due at 995 ms; the run cannot end before it nor long after.
    assert!(outcome.elapsed >= Duration::from_millis(995), "{:?}", outcome.elapsed);
    assert!(outcome.elapsed < Duration::from_secs(3), "{:?}", outcome.elapsed);
    assert!((180.0..=202.0).contains(&outcome.rps()), "{}", outcome.rps());
}

#[tokio::test]
async fn closed_loop_streams_count_every_event_and_gap() {
    let mock = MockUpstream::start().await;
    let sse = Scenario::parse(
        "name: s\nrequests:\n  - name: s\n    path: /v1/chat/completions\n    body: '{\"model\":\"m\",\"stream\":true,\"stream_options\":{\"include_usage\":true}}'\n    stream: {events: 3, spacing: 20ms}\n",
    )
    .unwrap();
    let outcome = load::run(
        &load::client(load::Connections::Reused),
        &mock.base_url(),
        &sse,
        &plan(Mode::Closed { concurrency: 4 }, 300),
    )
    .await
    .unwrap();
    let r = &outcome.recorder;
    assert!(r.ok >= 4, "{}", r.ok);
    assert_eq!(r.error_count(), 0, "{}", r.errors_text());
    // role + 3 content + finish + usage + [DONE] = 7 events, 6 gaps per stream.
    assert_eq!(r.events, r.ok * 7);
    assert_eq!(r.event_lateness.len(), r.ok * 6);
    let lateness = Summary::of(&r.event_lateness).unwrap();
    assert!(lateness.p50 < 5_000_000, "{lateness:?}");
    // Closed loop: streams of ~120 ms back to back over 300 ms, 4 at a time.
    let latency = Summary::of(&r.latency).unwrap();
    assert!(latency.p50 >= 120_000_000, "{latency:?}");
}

#[tokio::test]
async fn unexpected_status_counts_as_an_error_by_code() {
    let mock = MockUpstream::start().await;
    let failing = Scenario::parse(
        "name: f\nrequests:\n  - {name: f, path: /v1/chat/completions, headers: {x-mock-status: '503'}, body: '{}'}\n",
    )
    .unwrap();
    let outcome = load::run(
        &load::client(load::Connections::Reused),
        &mock.base_url(),
        &failing,
        &plan(Mode::Open { rate: 100, connections: 2 }, 200),
    )
    .await
    .unwrap();
    let r = &outcome.recorder;
    assert_eq!(r.ok, 0);
    assert_eq!(r.errors.get(&ErrorKind::Status(503)), Some(&20));
    assert_eq!(r.errors_text(), "status 503: 20");
}

#[tokio::test]
async fn refused_connections_are_counted_not_fatal() {
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let outcome = load::run(
        &load::client(load::Connections::Reused),
        &format!("http://127.0.0.1:{port}"),
        &scenario("chat.yaml"),
        &plan(Mode::Open { rate: 50, connections: 2 }, 200),
    )
    .await
    .unwrap();
    assert_eq!(outcome.recorder.errors.get(&ErrorKind::Connect), Some(&10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_passes_through_tollgate_with_the_generated_config() {
    let mock = MockUpstream::start().await;
    let data_dir = std::env::temp_dir().join(format!("tollgate-load-smoke-{}", std::process::id()));
    let (running, stop) = start_tollgate(&tollgate_config(0, 0, mock.addr(), &data_dir)).await;
    let base = format!("http://{}", running.proxy_addr);
    let client = load::client(load::Connections::Reused);
    assert_every_request_passes(&client, &base, &ALL, 8, "reverse").await;
    let _ = stop.send(());
    running.wait().await;
    let ledger = tollgate::ledger::read_all(&data_dir).unwrap();
    let usage: Vec<_> = ledger.iter().filter(|r| r["type"] == "usage").collect();
    assert_eq!(usage.len() as u64, ALL.len() as u64 * PER_SCENARIO);
    // Compressed answers are decoded and metered, never billed at an estimate.
    let estimated: Vec<_> = usage
        .iter()
        .filter(|r| r["provider"] != "mcp" && r["usage_source"] != "reported")
        .collect();
    assert!(estimated.is_empty(), "{estimated:?}");
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// The `tollgate-https-proxy` target's path: the same generated config plus `forward_proxy`,
/// the generator CONNECTing through the proxy to `https://<mock>` (intercepted, TLS from a CA
/// made for the run), with reused and with fresh connections. Everything is metered as in
/// reverse mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_mode_passes_every_request_through_the_pipeline() {
    let mock = MockUpstream::start().await;
    let dir = std::env::temp_dir().join(format!("tollgate-load-https-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (cert, key) = tollgate::ca::init(&dir.join("ca"), false).unwrap();
    let data_dir = dir.join("data");
    let mut config = tollgate_config(0, 0, mock.addr(), &data_dir);
    config.push_str(&format!(
        "forward_proxy: {{enabled: true, ca_cert: {}, ca_key: {}}}\n",
        cert.display(),
        key.display()
    ));
    let (running, stop) = start_tollgate(&config).await;
    let via = format!("http://{}", running.proxy_addr);
    let base = format!("https://{}", mock.addr());
    for connections in [load::Connections::Reused, load::Connections::Fresh] {
        let client = load::proxied_client(&via, &cert, connections).unwrap();
        let what = format!("{connections:?}");
        assert_every_request_passes(&client, &base, &["chat.yaml", "sse.yaml"], 4, &what).await;
    }
    let _ = stop.send(());
    running.wait().await;
    let ledger = tollgate::ledger::read_all(&data_dir).unwrap();
    assert_eq!(ledger.iter().filter(|r| r["type"] == "usage").count(), 80);
    assert_eq!(mock.request_count(), 80);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `envoy-tollgate` as `compare` starts it: the real Envoy (from `scripts/install-envoy`) with
/// the built filter (`scripts/test` builds it) and the same policy as Tollgate; every scenario
/// passes, so the target measures allowed, metered traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_passes_through_envoy_with_the_tollgate_filter() {
    use tollgate_loadtest::target::{launch, Kind, Paths};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let work_dir = std::env::temp_dir().join(format!("tollgate-load-envoy-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir).unwrap();
    let paths = Paths {
        bin_dir: target.join("release"),
        envoy: target.join("envoy-venv/bin/envoy"),
        wasm: target.join("wasm32-wasip1/wasm/tollgate_wasm.wasm"),
        baseline_bin_dir: None,
        baseline_wasm: None,
        workspace: root,
        work_dir: work_dir.clone(),
    };
    let mock = MockUpstream::start().await;
    let envoy = tokio::task::spawn_blocking(move || {
        launch(Kind::EnvoyTollgate, &paths, mock.addr(), 0).map(|r| (r, mock))
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("envoy-tollgate did not start: {e}"));
    let (running, _mock) = envoy;
    let client = load::client(load::Connections::Reused);
    assert_every_request_passes(&client, &running.base_url, &ALL, 8, "envoy-tollgate").await;
    drop(running);
    let _ = std::fs::remove_dir_all(&work_dir);
}
