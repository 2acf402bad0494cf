//! Chargeback through real sockets, in process: a full disk (injected below the ledger writer)
//! gives 503s and no corrupt or missing record; budgets come back from the ledger after a
//! restart; the usage export ships every record to a collector at least once, resumes from its
//! cursor after a restart without re-sending, and survives a collector's errors.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tollgate_e2e::harness::{nanos, read_entries, tags, temp_dir, Harness, Reply};

fn chat() -> Value {
    json!({"model": "gpt-4o", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]})
}

/// A chat completion with `x-request-id: id` and the attribution of `tags("charged")` in
/// cost center `cc`.
async fn send(h: &Harness, id: &str, cc: &str) -> Reply {
    let mut headers = tags("charged");
    headers.retain(|(k, _)| k != "x-cost-center");
    headers.push(("x-cost-center".into(), cc.into()));
    headers.push(("x-request-id".into(), id.into()));
    h.post("/v1/chat/completions", &headers, &chat()).await
}

/// Polls `/readyz` every 10 ms (at most 3 s) until it answers `status`.
async fn ready_becomes(h: &Harness, status: StatusCode) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let reply = h.admin_get("/readyz", false).await;
        if reply.status == status {
            return reply;
        }
        assert!(Instant::now() < deadline, "/readyz still {} after 3 s", reply.status);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn usage_ids(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .filter(|r| r["type"] == "usage")
        .map(|r| r["request_id"].as_str().expect("request_id").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_metered_requests_with_503_until_it_recovers_and_corrupts_nothing() {
    let fault = Arc::new(AtomicBool::new(false));
    let policy = "version: disk-1\n\
                  defaults: {llm: allow}\n\
                  budgets: [{id: cc, scope: cost_center, period: monthly, amount: \"100.00\"}]\n";
    let dir = temp_dir("full-disk");
    let h =
        Harness::builder().policy(policy).ledger_fault(fault.clone()).data_dir(&dir).start().await;
    assert_eq!(send(&h, "before", "CC-1111").await.status, StatusCode::OK);
    assert_eq!(usage_ids(&h.ledger().await), ["before"]);

    // The disk fills: the next request is already on its way and is served; writing its
    // records fails, and readiness turns false.
    fault.store(true, Ordering::Relaxed);
    assert_eq!(send(&h, "during-served", "CC-1111").await.status, StatusCode::OK);
    let not_ready = ready_becomes(&h, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(not_ready.text(), "ledger not writable\n");

    // Then metered requests are refused before the upstream sees them.
    let upstream_before = h.mock.request_count();
    let refused = send(&h, "during-refused", "CC-1111").await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{}", refused.text());
    assert_eq!(refused.json()["error"]["code"], "ledger_unavailable");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(h.mock.request_count(), upstream_before, "the upstream saw nothing");
    assert!(h.metrics().await.contains("tollgate_ledger_errors_total 1\n"));

    // The disk recovers: ready again, requests pass.
    fault.store(false, Ordering::Relaxed);
    ready_becomes(&h, StatusCode::OK).await;
    assert_eq!(send(&h, "after", "CC-1111").await.status, StatusCode::OK);

    // Every record that was served is there once, in order, every checksum holds, no partial
    // line was left behind, and the budget charged all three.
    h.ledger().await;
    let entries = read_entries(&h.data_dir);
    assert_eq!(usage_ids(&entries), ["before", "during-served", "after"]);
    let reserved: Vec<&str> = entries
        .iter()
        .filter(|r| r["type"] == "reserve")
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(reserved, ["before", "during-served", "after"]);
    let walk = tollgate::ledger::verify(&h.data_dir, None, &[]).unwrap();
    assert!(walk.torn.is_none() && walk.problems.is_empty(), "{walk:?}");
    assert_eq!(walk.records, entries.len() as u64);
    let seqs: Vec<u64> = entries.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=entries.len() as u64).collect::<Vec<_>>());
    let spent: i64 = entries
        .iter()
        .filter(|r| r["type"] == "usage")
        .map(|r| r["cost_nano_usd"].as_i64().unwrap())
        .sum();
    let budgets = h.admin_get("/admin/budgets", true).await.json();
    assert_eq!(nanos(budgets["budgets"][0]["spent"].as_str().unwrap()), spent, "{budgets}");

    // The audit chain holds all four decisions (the refusal too) and verifies.
    let data_dir = h.data_dir.clone();
    h.stop().await;
    let report = tollgate::audit::verify(&data_dir, None, &[]).unwrap();
    assert!(report.walk.problems.is_empty(), "{:?}", report.walk.problems);
    assert_eq!(report.records(), 4);
    let _ = std::fs::remove_dir_all(dir);
}

/// (budget id, key) → (spent, reserved) from `/admin/budgets`.
async fn budget_states(h: &Harness) -> BTreeMap<(String, String), (String, String)> {
    let reply = h.admin_get("/admin/budgets", true).await;
    assert_eq!(reply.status, StatusCode::OK);
    reply.json()["budgets"]
        .as_array()
        .expect("budgets")
        .iter()
        .map(|b| {
            let s = |k: &str| b[k].as_str().unwrap_or_else(|| panic!("{k} in {b}")).to_string();
            ((s("budget_id"), s("key")), (s("spent"), s("reserved")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_are_rebuilt_from_the_ledger_after_a_restart() {
    let dir = temp_dir("rebuild");
    let policy = "version: rebuild-1\n\
                  defaults: {llm: allow}\n\
                  budgets:\n\
                  \x20 - {id: per-cc, scope: cost_center, period: monthly, amount: \"50.00\"}\n\
                  \x20 - {id: cc-a, scope: cost_center, key: CC-1000, period: daily, amount: \"5.00\"}\n\
                  \x20 - {id: all, scope: global, period: monthly, amount: \"500.00\"}\n";
    let h = Harness::builder().policy(policy).data_dir(&dir).start().await;
    for (i, cc) in ["CC-1000", "CC-2000", "CC-1000"].iter().enumerate() {
        assert_eq!(send(&h, &format!("spend-{i}"), cc).await.status, StatusCode::OK);
    }
    let before = budget_states(&h).await;
    let entries = h.ledger().await;
    h.stop().await;
    let cost = |cc: &str| -> i64 {
        entries
            .iter()
            .filter(|r| r["type"] == "usage" && (cc.is_empty() || r["cost_center"] == cc))
            .map(|r| r["cost_nano_usd"].as_i64().unwrap())
            .sum()
    };
    let expected: BTreeMap<(String, String), (i64, i64)> = [
        (("all", "*"), cost("")),
        (("cc-a", "CC-1000"), cost("CC-1000")),
        (("per-cc", "CC-1000"), cost("CC-1000")),
        (("per-cc", "CC-2000"), cost("CC-2000")),
    ]
    .into_iter()
    .map(|((id, key), spent)| ((id.to_string(), key.to_string()), (spent, 0)))
    .collect();
    let as_nanos = |states: &BTreeMap<(String, String), (String, String)>| {
        states
            .iter()
            .map(|(k, (spent, reserved))| (k.clone(), (nanos(spent), nanos(reserved))))
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(as_nanos(&before), expected);

    let h = Harness::builder().policy(policy).data_dir(&dir).start().await;
    assert_eq!(budget_states(&h).await, before, "the same spent after a restart");
    // And the rebuilt state is the one enforced: the next request adds to it.
    assert_eq!(send(&h, "spend-3", "CC-2000").await.status, StatusCode::OK);
    let entries = h.ledger().await;
    let last = entries.iter().rfind(|r| r["type"] == "usage").unwrap();
    let after = as_nanos(&budget_states(&h).await);
    let key = ("per-cc".to_string(), "CC-2000".to_string());
    assert_eq!(after[&key].0, expected[&key].0 + last["cost_nano_usd"].as_i64().unwrap());
    h.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A collector of NDJSON posts on loopback that answers 500 to its first `fail_first` posts
/// (discarding them) and 200 after, keeping the accepted lines.
struct Collector {
    addr: SocketAddr,
    accepted: Arc<Mutex<Vec<Value>>>,
    posts: Arc<AtomicUsize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Collector {
    async fn start(fail_first: usize) -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted: Arc<Mutex<Vec<Value>>> = Arc::default();
        let posts = Arc::new(AtomicUsize::new(0));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let (kept, count) = (accepted.clone(), posts.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    _ = &mut stopped => break,
                };
                let (kept, count) = (kept.clone(), count.clone());
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (kept, count) = (kept.clone(), count.clone());
                    async move {
                        let ndjson = req.collect().await?.to_bytes();
                        let n = count.fetch_add(1, Ordering::SeqCst);
                        let status = if n < fail_first {
                            StatusCode::INTERNAL_SERVER_ERROR
                        } else {
                            let mut kept = kept.lock().unwrap();
                            for line in ndjson.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                                kept.push(serde_json::from_slice(line).expect("NDJSON line"));
                            }
                            StatusCode::OK
                        };
                        let mut response = Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = status;
                        Ok::<_, hyper::Error>(response)
                    }
                });
                tokio::spawn(
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned(),
                );
            }
        });
        Collector { addr, accepted, posts, _stop: stop }
    }

    fn events(&self) -> Vec<Value> {
        self.accepted.lock().unwrap().clone()
    }

    /// Polls (every 10 ms, at most 5 s) until `n` events have been accepted.
    async fn until(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let events = self.events();
            if events.len() >= n {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "collector has {} events, expected {n}",
                events.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn export_config(collector: &Collector) -> String {
    format!(
        "chargeback: {{export: {{url: \"http://{}/ingest\", batch: 4, interval: 20ms}}}}\n",
        collector.addr
    )
}

async fn start_exporting(dir: &Path, collector: &Collector) -> Harness {
    Harness::builder().extra(&export_config(collector)).data_dir(dir).start().await
}

fn ids<'a>(events: &'a [Value], field: &str) -> Vec<&'a str> {
    events.iter().map(|e| e[field].as_str().unwrap_or_else(|| panic!("{field} in {e}"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_ships_every_record_once_and_resumes_after_a_restart_without_resending() {
    let collector = Collector::start(0).await;
    let dir = temp_dir("export");
    let h = start_exporting(&dir, &collector).await;
    let first: Vec<String> = (0..6).map(|i| format!("first-{i}")).collect();
    for id in &first {
        assert_eq!(send(&h, id, "CC-1111").await.status, StatusCode::OK);
    }
    let events = collector.until(6).await;
    assert!(events.iter().all(|e| e["type"] == "usage"), "{events:#?}");
    assert_eq!(ids(&events, "request_id"), first, "in ledger order");
    let event_ids: HashSet<&str> = ids(&events, "event_id").into_iter().collect();
    assert_eq!(event_ids.len(), 6, "unique event ids");
    h.stop().await;

    let h = start_exporting(&dir, &collector).await;
    let second: Vec<String> = (0..5).map(|i| format!("second-{i}")).collect();
    for id in &second {
        assert_eq!(send(&h, id, "CC-1111").await.status, StatusCode::OK);
    }
    collector.until(11).await;
    // Several export intervals more: nothing already acknowledged comes again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events = collector.events();
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    assert_eq!(ids(&events, "request_id"), all);
    let event_ids: HashSet<&str> = ids(&events, "event_id").into_iter().collect();
    assert_eq!(event_ids.len(), 11, "unique event ids across the restart");
    let ledger: HashSet<String> =
        read_entries(&dir).iter().map(|r| r["event_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ledger, event_ids.iter().map(|s| s.to_string()).collect());
    h.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_retries_a_failing_collector_until_everything_is_accepted() {
    let collector = Collector::start(2).await;
    let dir = temp_dir("export-retry");
    let h = start_exporting(&dir, &collector).await;
    let sent: Vec<String> = (0..5).map(|i| format!("retry-{i}")).collect();
    for id in &sent {
        assert_eq!(send(&h, id, "CC-1111").await.status, StatusCode::OK);
    }
    let events = collector.until(5).await;
    assert!(collector.posts.load(Ordering::SeqCst) >= 3, "two refused posts, then accepted");
    let got: HashSet<&str> = ids(&events, "request_id").into_iter().collect();
    assert_eq!(got, sent.iter().map(String::as_str).collect::<HashSet<_>>());
    let ledger: HashSet<String> =
        read_entries(&dir).iter().map(|r| r["event_id"].as_str().unwrap().to_string()).collect();
    let shipped: HashSet<String> =
        ids(&events, "event_id").into_iter().map(str::to_string).collect();
    assert_eq!(shipped, ledger, "every ledger record, at least once");
    h.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
