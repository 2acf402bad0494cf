//! Alerts against the real `tollgate` process and a webhook receiver on a real socket: the
//! bodies in both formats with a signature the test verifies itself, a retry after a 500, and
//! an alert raised while the receiver is down delivered after a restart, once.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::net::TcpListener;
use tollgate_e2e::harness::{nanos, temp_dir};
use tollgate_e2e::mock::{header, MockUpstream};
use tollgate_e2e::process::{ConfigFile, Tollgate};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
const TOKEN_ENV: &str = "TOLLGATE_ALERTS_TEST_TOKEN";
const KEY_ENV: &str = "TOLLGATE_ALERTS_TEST_KEY";
const KEY: &str = "whsec-test-key-0123456789";

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Got {
    path: String,
    headers: hyper::HeaderMap,
    body: Bytes,
}

impl Got {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// A webhook receiver: records every request and answers the queued statuses, then 200.
struct Receiver {
    got: Arc<Mutex<Vec<Got>>>,
    statuses: Arc<Mutex<VecDeque<u16>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn start(listener: TcpListener, statuses: &[u16]) -> Receiver {
        let got: Arc<Mutex<Vec<Got>>> = Arc::default();
        let statuses = Arc::new(Mutex::new(statuses.iter().copied().collect::<VecDeque<_>>()));
        let (g, s) = (got.clone(), statuses.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (g, s) = (g.clone(), s.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (g, s) = (g.clone(), s.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body =
                                body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            g.lock().unwrap().push(Got {
                                path: parts.uri.path().to_string(),
                                headers: parts.headers,
                                body,
                            });
                            let status = s.lock().unwrap().pop_front().unwrap_or(200);
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(b"ok")))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver { got, statuses, task }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Waits (at most 10 s) until `ready` holds for what was received; returns it.
    async fn until(&self, what: &str, ready: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.got();
            if ready(&got) {
                return got;
            }
            assert!(Instant::now() < deadline, "receiver: no {what}; got {got:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Checks the signature the way a receiver should: HMAC-SHA256 under the shared key over
/// `"<t>." + body`, hex, in `x-tollgate-signature: t=<t>,v1=<hex>`, with a recent `t`.
fn assert_signed(got: &Got) {
    let header = got.header("x-tollgate-signature");
    let (t, v1) = header
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("signature header `{header}`"));
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(&got.body);
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(v1, expected, "signature of {}", String::from_utf8_lossy(&got.body));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let t: u64 = t.parse().expect("t is unix seconds");
    assert!(now.as_secs().abs_diff(t) < 60, "t={t} is now");
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A chat completion for `agent` with extra headers; its status and JSON body.
async fn chat(
    client: &HttpClient,
    proxy: SocketAddr,
    agent: &str,
    model: &str,
    extra: &[(&str, &str)],
) -> (u16, Value) {
    let body = json!({"model": model, "max_tokens": 100,
                      "messages": [{"role": "user", "content": "hi"}]});
    let mut request = hyper::Request::post(format!("http://{proxy}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-agent-id", agent)
        .header("x-cost-center", "CC-1234")
        .header("x-project-id", "PROJ-ABC123");
    for (k, v) in extra {
        request = request.header(*k, *v);
    }
    let request = request.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let response = client.request(request).await.expect("the proxy answers");
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Writes a config with `alerts` (a YAML block) and `extra` sections.
fn config(
    dir: &Path,
    mock: &MockUpstream,
    alerts: &str,
    more: &str,
    policy: &str,
) -> std::path::PathBuf {
    let data_dir = dir.join("data");
    let extra = format!("alerts:\n{alerts}{more}");
    let routes =
        [r#"{name: dead, path_prefix: /dead/, kind: openai, upstream: "http://127.0.0.1:1"}"#
            .to_string()];
    let yaml = ConfigFile {
        upstream: &mock.base_url(),
        data_dir: &data_dir,
        token_env: TOKEN_ENV,
        more_routes: &routes,
        extra: &extra,
        policy,
    }
    .yaml();
    let path = dir.join("tollgate.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn start(config: &Path) -> Tollgate {
    tokio::task::block_in_place(|| {
        Tollgate::run(Path::new(BIN), config, &[(TOKEN_ENV, "t"), (KEY_ENV, KEY)])
    })
}

const APPROVAL_POLICY: &str = "version: alerts-1\n\
    defaults: {llm: allow}\n\
    rules:\n\
    \x20 - {id: gated, match: {model: gpt-4o-mini}, effect: require_approval}\n";

/// Budget and approval alerts reach a JSON and a Slack receiver, signed; a retry of the same
/// pending approval raises nothing new.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn budget_and_approval_alerts_arrive_signed_in_both_formats() {
    let mock = MockUpstream::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = listener.local_addr().unwrap();
    let receiver = Receiver::start(listener, &[]).await;
    let dir = temp_dir("alerts-formats");
    let alerts = format!(
        "  webhooks:\n\
         \x20   - {{url: \"http://{hook}/json\", secret_env: {KEY_ENV}}}\n\
         \x20   - {{url: \"http://{hook}/slack\", format: slack, secret_env: {KEY_ENV}, \
         events: [budget_threshold, approval_pending]}}\n"
    );
    let policy = format!(
        "{APPROVAL_POLICY}budgets:\n\
         \x20 - {{id: agent-daily, scope: agent, period: daily, amount: \"0.01\"}}\n"
    );
    let mut proxy = start(&config(&dir, &mock, &alerts, "", &policy));
    let http = client();

    // ~0.000875 USD a call against 0.01: the 80 % threshold is crossed within a dozen calls.
    let mut ok = 0;
    for _ in 0..16 {
        let (status, _) =
            chat(&http, proxy.proxy, "spender", "gpt-4o", &[(header::OUTPUT_TOKENS, "80")]).await;
        if status != 200 {
            break;
        }
        ok += 1;
    }
    assert!(ok >= 9, "{ok} calls before the budget refused");
    let (status, refused) = chat(&http, proxy.proxy, "asker", "gpt-4o-mini", &[]).await;
    assert_eq!(status, 403, "{refused}");
    let approval_id = refused["error"]["approval_id"]
        .as_str()
        .or_else(|| refused["approval_id"].as_str())
        .unwrap_or_else(|| panic!("an approval id in {refused}"))
        .to_string();
    // The agent retries before anyone decided: the same pending approval, no new alert.
    let (status, _) = chat(&http, proxy.proxy, "asker", "gpt-4o-mini", &[]).await;
    assert_eq!(status, 403);

    let is =
        |g: &Got, path: &str, kind: &str| g.path == path && g.header("x-tollgate-event") == kind;
    let got = receiver
        .until("budget and approval alerts on both receivers", |got| {
            ["/json", "/slack"].iter().all(|p| {
                got.iter().any(|g| is(g, p, "budget_threshold"))
                    && got.iter().any(|g| is(g, p, "approval_pending"))
            })
        })
        .await;
    for g in &got {
        assert_signed(g);
        assert_eq!(g.header("content-type"), "application/json");
        assert!(g.header("x-tollgate-event-id").starts_with("evt_"), "{g:?}");
    }

    // The JSON body: exact decimal strings from nano-USD, ids, and the event id as in the header.
    let budget: Vec<Value> =
        got.iter().filter(|g| is(g, "/json", "budget_threshold")).map(Got::json).collect();
    let first = &budget[0];
    assert_eq!(first["type"], "budget_threshold");
    assert_eq!(
        first["id"],
        got.iter()
            .find(|g| is(g, "/json", "budget_threshold"))
            .unwrap()
            .header("x-tollgate-event-id")
    );
    assert_eq!(
        (&first["budget"], &first["key"], &first["scope"]),
        (&json!("agent-daily"), &json!("spender"), &json!("agent"))
    );
    assert_eq!(first["threshold_percent"], 80);
    assert_eq!(
        (first["limit"].as_str(), first["limit_nano_usd"].as_i64()),
        (Some("0.01"), Some(10_000_000))
    );
    let spent = first["spent"].as_str().expect("spent as a string");
    assert_eq!(nanos(spent), first["spent_nano_usd"].as_i64().unwrap(), "{spent}");
    assert!(nanos(spent) >= 8_000_000, "{spent} is at least 80 % of 0.01");
    assert_eq!(first["agent"], "spender");
    assert!(first["request_id"].as_str().is_some_and(|r| !r.is_empty()));
    assert!(first["time"].as_str().unwrap().ends_with('Z'));

    let approvals: Vec<Value> =
        got.iter().filter(|g| is(g, "/json", "approval_pending")).map(Got::json).collect();
    assert_eq!(approvals.len(), 1, "one alert for one pending approval: {approvals:?}");
    let a = &approvals[0];
    assert_eq!(a["approval_id"], approval_id.as_str());
    assert_eq!(
        (&a["agent"], &a["action"], &a["reason"]),
        (&json!("asker"), &json!("llm"), &json!("rule_require_approval"))
    );
    assert!(a["risk"].as_str().is_some() && a["expires_at"].as_str().is_some(), "{a}");
    assert_eq!(a["on_timeout"], "deny");

    // The Slack body: text (and blocks) naming the same things, the event id in the context.
    let slack: Vec<&Got> = got.iter().filter(|g| is(g, "/slack", "approval_pending")).collect();
    assert_eq!(slack.len(), 1);
    let s = slack[0].json();
    let text = s["text"].as_str().expect("slack text");
    assert!(text.contains(&approval_id) && text.contains("asker"), "{text}");
    assert_eq!(s["blocks"][0]["text"]["text"], text);
    let context = s["blocks"][1]["elements"][0]["text"].as_str().unwrap();
    assert!(context.contains(slack[0].header("x-tollgate-event-id")), "{context}");
    let slack_budget = got.iter().find(|g| is(g, "/slack", "budget_threshold")).unwrap().json();
    let text = slack_budget["text"].as_str().unwrap();
    assert!(
        text.contains("`agent-daily` (spender) crossed 80 %") && text.contains("of $0.01"),
        "{text}"
    );
    // One event, one id on both receivers.
    let json_ids: Vec<&str> =
        got.iter().filter(|g| g.path == "/json").map(|g| g.header("x-tollgate-event-id")).collect();
    let mut unique = json_ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), json_ids.len(), "each event delivered once: {json_ids:?}");
    assert!(got
        .iter()
        .filter(|g| g.path == "/slack")
        .all(|g| json_ids.contains(&g.header("x-tollgate-event-id"))));

    let delivered = got.len() as u64;
    let sent =
        |kind: &str| proxy.metric(&format!("tollgate_alerts_sent_total{{event=\"{kind}\"}}"));
    // A delivery is counted once the proxy has read the receiver's 2xx, a moment after the
    // receiver recorded it: wait for the count (and the outbox to empty) before comparing.
    let deadline = Instant::now() + Duration::from_secs(5);
    while (sent("budget_threshold") + sent("approval_pending") < delivered
        || proxy.metric("tollgate_alerts_pending") > 0)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sent("budget_threshold") + sent("approval_pending"), delivered);
    assert_eq!(proxy.metric("tollgate_alerts_pending"), 0);
    assert_eq!(proxy.metric("tollgate_alerts_failed_total{event=\"approval_pending\"}"), 0);
    proxy.signal("TERM");
    assert_eq!(tokio::task::block_in_place(|| proxy.exit_code()), Some(0));
}

/// The receiver answers 500, then 200: the alert is retried and delivered once, with the same
/// event id both times.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_delivery_is_retried_until_acknowledged_once() {
    let mock = MockUpstream::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = listener.local_addr().unwrap();
    let receiver = Receiver::start(listener, &[500]).await;
    let dir = temp_dir("alerts-retry");
    let alerts = format!(
        "  webhooks:\n\
         \x20   - {{url: \"http://{hook}/hook\", secret_env: {KEY_ENV}}}\n\
         \x20 initial_backoff: 100ms\n"
    );
    let proxy = start(&config(&dir, &mock, &alerts, "", APPROVAL_POLICY));
    let (status, _) = chat(&client(), proxy.proxy, "asker", "gpt-4o-mini", &[]).await;
    assert_eq!(status, 403);
    let got = receiver.until("two attempts", |got| got.len() >= 2).await;
    assert_eq!(got[0].header("x-tollgate-event-id"), got[1].header("x-tollgate-event-id"));
    assert_eq!(got[0].body, got[1].body, "the same event");
    got.iter().for_each(assert_signed);
    assert!(receiver.statuses.lock().unwrap().is_empty(), "the 500 was answered");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(receiver.got().len(), 2, "nothing after the 2xx");
    assert_eq!(proxy.metric("tollgate_alerts_failed_total{event=\"approval_pending\"}"), 1);
    assert_eq!(proxy.metric("tollgate_alerts_sent_total{event=\"approval_pending\"}"), 1);
    assert_eq!(proxy.metric("tollgate_alerts_pending"), 0);
}

/// An alert raised while the receiver is down survives a SIGTERM and is delivered by the next
/// process, once; a delivered alert is not delivered again by a later restart, even after a
/// SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_undelivered_alert_is_delivered_after_a_restart_exactly_once() {
    let mock = MockUpstream::start().await;
    // The receiver's port, closed for now.
    let hook = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let dir = temp_dir("alerts-restart");
    let alerts = format!(
        "  webhooks:\n\
         \x20   - {{url: \"http://{hook}/hook\", secret_env: {KEY_ENV}}}\n\
         \x20 initial_backoff: 100ms\n  max_backoff: 200ms\n"
    );
    let path = config(&dir, &mock, &alerts, "", APPROVAL_POLICY);
    let mut proxy = start(&path);
    let (status, refused) = chat(&client(), proxy.proxy, "asker", "gpt-4o-mini", &[]).await;
    assert_eq!(status, 403, "{refused}");
    proxy.wait_for("alert delivery failed; will retry");
    assert_eq!(proxy.metric("tollgate_alerts_pending"), 1);
    proxy.signal("TERM");
    assert_eq!(tokio::task::block_in_place(|| proxy.exit_code()), Some(0));
    drop(proxy);

    let receiver = Receiver::start(TcpListener::bind(hook).await.unwrap(), &[]).await;
    let proxy = start(&path);
    let got = receiver.until("the alert after the restart", |got| !got.is_empty()).await;
    let event = got[0].json();
    assert_eq!(event["type"], "approval_pending");
    assert_eq!(event["agent"], "asker");
    assert_signed(&got[0]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.metric("tollgate_alerts_pending") != 0 {
        assert!(Instant::now() < deadline, "the outbox empties");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(proxy.metric("tollgate_alerts_sent_total{event=\"approval_pending\"}"), 1);
    // Delivered, acknowledged and marked done: not even a SIGKILL makes a restart send it
    // again. (Killed between the receiver's 2xx and the `done` line, it would be sent again
    // with the same event id: at least once.)
    proxy.signal("KILL");
    let mut proxy = proxy;
    assert_eq!(tokio::task::block_in_place(|| proxy.exit_code()), None);
    drop(proxy);
    let proxy = start(&path);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.got().len(), 1, "exactly once: {:#?}", receiver.got());
    assert_eq!(proxy.metric("tollgate_alerts_pending"), 0);
}

/// Opening a circuit breaker and disabling an agent raise their alerts (a receiver that only
/// wants those gets nothing else).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_opening_breaker_and_a_disabled_agent_raise_alerts() {
    let mock = MockUpstream::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = listener.local_addr().unwrap();
    let receiver = Receiver::start(listener, &[]).await;
    let dir = temp_dir("alerts-guards");
    let alerts = format!(
        "  webhooks:\n\
         \x20   - {{url: \"http://{hook}/hook\", secret_env: {KEY_ENV}, \
         events: [circuit_open, agent_disabled]}}\n"
    );
    let oversight = "oversight:\n  breaker: {failure_threshold: 2, open_for: 60s}\n\
                     \x20 escalation: {review_at: 2, disable_at: 2}\n";
    let proxy = start(&config(&dir, &mock, &alerts, oversight, APPROVAL_POLICY));
    let http = client();
    // Two calls to an upstream that does not answer: its breaker opens.
    for _ in 0..2 {
        let request =
            hyper::Request::post(format!("http://{}/dead/v1/chat/completions", proxy.proxy))
                .header("content-type", "application/json")
                .header("x-agent-id", "prober")
                .header("x-cost-center", "CC-1234")
                .header("x-project-id", "PROJ-ABC123")
                .body(Full::new(Bytes::from(r#"{"model":"gpt-4o","messages":[]}"#)))
                .unwrap();
        let status = http.request(request).await.unwrap().status();
        assert_eq!(status, 502);
    }
    // Two errors of the agent's own making (400s): it is disabled.
    for _ in 0..2 {
        let (status, _) =
            chat(&http, proxy.proxy, "clumsy", "gpt-4o", &[(header::STATUS, "400")]).await;
        assert_eq!(status, 400);
    }
    let got = receiver.until("both alerts", |got| got.len() >= 2).await;
    let kinds: Vec<&str> = got.iter().map(|g| g.header("x-tollgate-event")).collect();
    assert!(kinds.contains(&"circuit_open") && kinds.contains(&"agent_disabled"), "{kinds:?}");
    for g in &got {
        assert_signed(g);
        let e = g.json();
        match e["type"].as_str() {
            Some("circuit_open") => {
                assert_eq!(e["upstream"], "127.0.0.1:1");
                assert_eq!(e["open_for_ms"], 60_000);
            }
            Some("agent_disabled") => {
                assert_eq!((&e["agent"], &e["status"]), (&json!("clumsy"), &json!(400)))
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.got().len(), 2, "one alert each");
}

/// A delivery that keeps failing is dropped after `max_attempts`, logged and counted; one whose
/// receiver left the config is dropped at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deliveries_are_dropped_after_max_attempts_or_when_their_receiver_is_gone() {
    let mock = MockUpstream::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = listener.local_addr().unwrap();
    let receiver = Receiver::start(listener, &[500; 10]).await;
    let dir = temp_dir("alerts-drop");
    let alerts = format!(
        "  webhooks:\n\
         \x20   - {{url: \"http://{hook}/failing\", secret_env: {KEY_ENV}}}\n\
         \x20 initial_backoff: 50ms\n  max_attempts: 3\n"
    );
    let path = config(&dir, &mock, &alerts, "", APPROVAL_POLICY);
    let mut proxy = start(&path);
    let (status, _) = chat(&client(), proxy.proxy, "asker", "gpt-4o-mini", &[]).await;
    assert_eq!(status, 403);
    let dropped =
        proxy.wait_for("alert dropped: not delivered within alerts.max_attempts / max_age");
    assert_eq!(dropped["fields"]["attempts"], 3, "{dropped}");
    assert_eq!(receiver.got().len(), 3);
    assert_eq!(proxy.metric("tollgate_alerts_failed_total{event=\"approval_pending\"}"), 3);
    assert_eq!(proxy.metric("tollgate_alerts_dropped_total{event=\"approval_pending\"}"), 1);
    assert_eq!(proxy.metric("tollgate_alerts_sent_total{event=\"approval_pending\"}"), 0);
    assert_eq!(proxy.metric("tollgate_alerts_pending"), 0);

    // Raised while the receiver's port is closed, then the receiver leaves the config.
    drop(receiver);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _) = chat(&client(), proxy.proxy, "asker-2", "gpt-4o-mini", &[]).await;
    assert_eq!(status, 403);
    proxy.wait_for("alert delivery failed; will retry");
    proxy.signal("TERM");
    assert_eq!(tokio::task::block_in_place(|| proxy.exit_code()), Some(0));
    drop(proxy);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other = listener.local_addr().unwrap();
    let receiver = Receiver::start(listener, &[]).await;
    let alerts =
        format!("  webhooks:\n    - {{url: \"http://{other}/new\", secret_env: {KEY_ENV}}}\n");
    let path = config(&dir, &mock, &alerts, "", APPROVAL_POLICY);
    let proxy = start(&path);
    // (Logged as `alert dropped: its webhook is no longer configured`, before it listens.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.metric("tollgate_alerts_dropped_total{event=\"approval_pending\"}") != 1 {
        assert!(Instant::now() < deadline, "dropped at start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(proxy.metric("tollgate_alerts_pending"), 0);
    assert!(receiver.got().is_empty(), "not sent to another receiver");
}
