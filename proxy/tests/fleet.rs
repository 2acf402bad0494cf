//! Fleet mode through real processes and a real Redis (Debian's `redis-server`, started here on a
//! loopback port): several `tollgate` processes share one budget and together never spend more
//! than it, a budget's last dollar is spendable after a proxy holding a lease was killed, and a
//! Redis outage refuses budgeted requests at once (503) until Redis is back.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tollgate_e2e::harness::{read_ledger, temp_dir};
use tollgate_e2e::mock::MockUpstream;
use tollgate_e2e::process::{ConfigFile, Tollgate};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
const TOKEN_ENV: &str = "TOLLGATE_FLEET_TEST_TOKEN";
/// $0.10 in nano-USD: the price of one call of the `echo` tool below.
const DIME: i64 = 100_000_000;

/// A `redis-server` child on a loopback port, with AOF on in its own directory.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    /// Extra `redis-server` arguments.
    args: Vec<String>,
    /// TLS only (`rediss://`): the CA file a client must trust.
    ca_file: Option<PathBuf>,
}

impl Redis {
    fn start() -> Redis {
        Redis::start_with(&[])
    }

    fn start_with(args: &[&str]) -> Redis {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = temp_dir("redis");
        let args = args.iter().map(|a| a.to_string()).collect();
        let mut redis = Redis { child: None, port, dir, args, ca_file: None };
        redis.restart();
        redis
    }

    /// A Redis that speaks TLS only, with a certificate for 127.0.0.1 from a throwaway CA.
    fn start_tls() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = temp_dir("redis-tls");
        let ca = tollgate_e2e::mock::TestCa::new();
        let (cert, key) = ca.server_pem(&["127.0.0.1"]);
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.to_string_lossy().into_owned()
        };
        let (ca_file, cert_file, key_file) =
            (file("ca.pem", &ca.pem()), file("redis.crt", &cert), file("redis.key", &key));
        // The plain port off, TLS on `port`, clients not asked for certificates.
        let args = ["--port", "0", "--tls-port", &port.to_string(), "--tls-cert-file", &cert_file]
            .into_iter()
            .chain(["--tls-key-file", &key_file, "--tls-ca-cert-file", &ca_file])
            .chain(["--tls-auth-clients", "no"])
            .map(str::to_string)
            .collect();
        let mut redis = Redis { child: None, port, dir, args, ca_file: Some(ca_file.into()) };
        redis.restart();
        redis
    }

    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--appendonly", "yes", "--save", "", "--dir"])
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): install Debian's redis-server package \
                     (scripts/test does)"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        let scheme = if self.ca_file.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// A client of this Redis (trusting its CA over TLS).
    fn client(&self) -> redis::Client {
        match &self.ca_file {
            Some(ca) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(ca).unwrap()),
                },
            )
            .unwrap(),
            None => redis::Client::open(self.url()).unwrap(),
        }
    }

    /// `HGETALL` of the budget counter whose key contains `needle`.
    async fn budget_hash(&self, needle: &str) -> Vec<(String, String)> {
        let client = self.client();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        // A Redis just restarted answers `LOADING` until its append-only file is read.
        let deadline = Instant::now() + Duration::from_secs(10);
        let keys: Vec<String> = loop {
            match redis::cmd("KEYS").arg(format!("*{needle}*")).query_async(&mut conn).await {
                Ok(keys) => break keys,
                Err(e)
                    if e.kind()
                        == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading) =>
                {
                    assert!(Instant::now() < deadline, "Redis still loading");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("KEYS: {e}"),
            }
        };
        assert_eq!(keys.len(), 1, "one budget counter for {needle}: {keys:?}");
        redis::cmd("HGETALL").arg(&keys[0]).query_async(&mut conn).await.unwrap()
    }
}

/// Where the proxies find Redis: `url: ...` or `cluster: [...]`.
trait Store {
    fn spec(&self) -> String;
}

impl Store for Redis {
    fn spec(&self) -> String {
        match &self.ca_file {
            Some(ca) => format!("url: \"{}\", ca_file: \"{}\"", self.url(), ca.display()),
            None => format!("url: \"{}\"", self.url()),
        }
    }
}

/// A Redis Cluster of three masters on loopback ports, made with `redis-cli --cluster create`.
struct Cluster {
    nodes: Vec<Redis>,
}

impl Cluster {
    fn start() -> Cluster {
        let nodes: Vec<Redis> =
            (0..3).map(|_| Redis::start_with(&["--cluster-enabled", "yes"])).collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): install Debian's redis-tools"));
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        // Wait until every node agrees the cluster is up.
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in &nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "cluster", "info"])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "the cluster did not come up");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Cluster { nodes }
    }

    /// `HGETALL` of the budget counter whose key contains `needle`, from whichever node has it.
    async fn budget_hash(&self, needle: &str) -> Vec<(String, String)> {
        for n in &self.nodes {
            let client = redis::Client::open(n.url()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let keys: Vec<String> =
                redis::cmd("KEYS").arg(format!("*{needle}*")).query_async(&mut conn).await.unwrap();
            if let Some(key) = keys.first() {
                return redis::cmd("HGETALL").arg(key).query_async(&mut conn).await.unwrap();
            }
        }
        panic!("no node holds a budget counter for {needle}");
    }
}

impl Store for Cluster {
    fn spec(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(|n| format!("\"{}\"", n.url())).collect();
        format!("cluster: [{}]", urls.join(", "))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn field(hash: &[(String, String)], name: &str) -> i64 {
    hash.iter().find(|(k, _)| k == name).map_or(0, |(_, v)| v.parse().unwrap())
}

fn leases(hash: &[(String, String)]) -> i64 {
    hash.iter().filter(|(k, _)| k.starts_with("l:")).map(|(_, v)| v.parse::<i64>().unwrap()).sum()
}

/// One proxy of the fleet: a monthly $5.00 budget per cost center, the `echo` tool at $0.10.
fn proxy(redis: &impl Store, upstream: &str, store: &str) -> (Tollgate, PathBuf) {
    proxy_shipping(redis, upstream, store, None)
}

/// A proxy that also ships its usage records to the collector at `collector` (its admin
/// listener).
fn proxy_shipping(
    redis: &impl Store,
    upstream: &str,
    store: &str,
    collector: Option<SocketAddr>,
) -> (Tollgate, PathBuf) {
    proxy_with(redis, upstream, store, collector, "")
}

/// A proxy of the fleet with `more` config (oversight, say).
fn proxy_with(
    redis: &impl Store,
    upstream: &str,
    store: &str,
    collector: Option<SocketAddr>,
    more: &str,
) -> (Tollgate, PathBuf) {
    let dir = temp_dir("fleet");
    let config = dir.join("tollgate.yaml");
    let yaml = ConfigFile {
        upstream,
        data_dir: &dir.join("data"),
        token_env: TOKEN_ENV,
        more_routes: &[format!("{{name: mcp, path_prefix: /mcp, kind: mcp, upstream: \"{upstream}\"}}")],
        extra: &format!(
            "pricing:\n  tools:\n    echo: {{per_call: \"0.10\"}}\n    deploy: {{per_call: \"0.10\"}}\n\
             store:\n  redis: {{{}, {store}}}\n{more}{}",
            redis.spec(),
            collector.map_or(String::new(), |c| format!(
                "chargeback:\n  export: {{url: \"http://{c}/v1/usage/events\", interval: 100ms, \
                 token_env: {TOKEN_ENV}}}\n"
            )),
        ),
        policy: "version: fleet\n\
                 defaults: {llm: allow, tool: allow, other: deny}\n\
                 budgets:\n  - {id: cc-monthly, scope: cost_center, period: monthly, amount: \"5.00\"}\n\
                 rules:\n  - {id: ask-deploys, match: {tool: deploy}, effect: require_approval}\n\
                 \x20 - {id: metered, match: {agent: metered-bot}, effect: allow, limits: {rpm: 60}}\n",
    }
    .yaml();
    std::fs::write(&config, yaml).unwrap();
    (Tollgate::run(Path::new(BIN), &config, &[(TOKEN_ENV, "t")]), dir.join("data"))
}

/// A collector: a `tollgate` whose admin listener takes the fleet's usage records (it serves no
/// calls itself).
fn collector(mock: &MockUpstream) -> Tollgate {
    collector_with_extra(mock, "")
}

/// A collector with `extra` configuration (its `store:` section, say).
fn collector_with_extra(mock: &MockUpstream, extra: &str) -> Tollgate {
    let dir = temp_dir("collector");
    let yaml = ConfigFile {
        upstream: &mock.base_url(),
        data_dir: &dir.join("data"),
        token_env: TOKEN_ENV,
        more_routes: &[],
        extra,
        policy: "version: collector\ndefaults: {llm: deny, tool: deny, other: deny}\n",
    }
    .yaml();
    std::fs::write(dir.join("tollgate.yaml"), yaml).unwrap();
    Tollgate::run(Path::new(BIN), &dir.join("tollgate.yaml"), &[(TOKEN_ENV, "t")])
}

/// One `echo` call for cost center `cc`; its status and the refusal code, if any.
async fn call(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<bytes::Bytes>>,
    addr: SocketAddr,
    cc: &str,
) -> (u16, String) {
    let (status, code, _) = call_as(client, addr, cc, "echo", "fleet-agent", &[]).await;
    (status, code)
}

/// One call of `tool` by `agent` with extra headers: status, refusal code, approval id.
async fn call_as(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<bytes::Bytes>>,
    addr: SocketAddr,
    cc: &str,
    tool: &str,
    agent: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Option<String>) {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": tool, "arguments": {"text": "hi"}}});
    let mut req = Request::post(format!("http://{addr}/mcp"))
        .header("content-type", "application/json")
        .header("x-agent-id", agent)
        .header("x-cost-center", cc)
        .header("x-project-id", "PROJ-ABC123");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(bytes::Bytes::from(body.to_string()))).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("an answer within 20 s")
        .expect("a response");
    let status = response.status().as_u16();
    let approval =
        response.headers().get("x-tollgate-approval-id").map(|v| v.to_str().unwrap().to_string());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let code = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| {
            v["error"]["data"]["code"].as_str().or(v["error"]["code"].as_str()).map(str::to_string)
        })
        .unwrap_or_default();
    if status == 503 {
        eprintln!("503: {}", String::from_utf8_lossy(&bytes));
    }
    (status, code, approval)
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<bytes::Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// The usage records of cost center `cc` in a proxy's ledger: (count, nano-USD).
fn spent_in_ledger(data: &Path, cc: &str) -> (usize, i64) {
    let records: Vec<Value> = read_ledger(data)
        .into_iter()
        .filter(|r| r["type"] == "usage" && r["cost_center"] == cc)
        .collect();
    let total = records
        .iter()
        .map(|r| tollgate_e2e::harness::nanos(r["cost"]["total"].as_str().unwrap()))
        .sum();
    (records.len(), total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_proxies_never_spend_more_than_the_budget_together() {
    let mock = MockUpstream::start().await;
    let redis = Redis::start();
    // The collector: a proxy whose admin listener takes the fleet's usage records.
    let collector = collector(&mock);
    let fleet: Vec<(Tollgate, PathBuf)> = (0..3)
        .map(|_| {
            proxy_shipping(
                &redis,
                &mock.base_url(),
                "sync_interval: 20ms, timeout: 2s",
                Some(collector.admin),
            )
        })
        .collect();
    let client = client();
    for round in 0..3 {
        let cc = format!("CC-100{round}");
        let calls: Vec<_> = (0..1000)
            .map(|i| {
                let (client, addr, cc) = (client.clone(), fleet[i % 3].0.proxy, cc.clone());
                tokio::spawn(async move { call(&client, addr, &cc).await })
            })
            .collect();
        let mut served = 0;
        let mut refused = 0;
        for answer in calls {
            match answer.await.unwrap() {
                (200, _) => served += 1,
                (402, code) if code == "budget_exceeded" => refused += 1,
                other => panic!("round {round}: unexpected answer {other:?}"),
            }
        }
        assert_eq!((served, refused), (50, 950), "round {round}: $5.00 at $0.10 a call");
        // Every proxy reports its spend within a sync interval.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let hash = redis.budget_hash(&cc).await;
            if field(&hash, "perm") == 50 * DIME {
                assert!(leases(&hash) >= 0);
                break;
            }
            assert!(Instant::now() < deadline, "round {round}: Redis holds {hash:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Stopped, the proxies give their leases back; their ledgers hold exactly what Redis does.
    let mut dirs = Vec::new();
    for (mut proxy, data) in fleet {
        proxy.signal("TERM");
        assert_eq!(proxy.exit_code(), Some(0), "a clean stop");
        dirs.push(data);
    }
    for round in 0..3 {
        let cc = format!("CC-100{round}");
        let hash = redis.budget_hash(&cc).await;
        assert_eq!(field(&hash, "perm"), 50 * DIME, "round {round}");
        assert_eq!(leases(&hash), 0, "round {round}: every lease given back: {hash:?}");
        let (count, total) = dirs
            .iter()
            .map(|d| spent_in_ledger(d, &cc))
            .fold((0, 0), |(n, t), (dn, dt)| (n + dn, t + dt));
        assert_eq!((count, total), (50, 50 * DIME), "round {round}: the ledgers' usage");
    }
    // One invoice for the fleet: the collector's, from the records every proxy shipped.
    let period = read_ledger(&dirs[0])
        .iter()
        .find_map(|r| r["ts"].as_str().map(|ts| ts[..7].to_string()))
        .expect("a usage record");
    let want: Vec<(String, i64, u64)> =
        (0..3).map(|r| (format!("CC-100{r}"), 50 * DIME, 50)).collect();
    wait_for_invoice(collector.admin, &period, &want, Duration::from_secs(10)).await;
}

/// Waits until the collector's invoice by cost center for `period` is `want` (group, nano-USD,
/// requests), or fails with what it holds.
async fn wait_for_invoice(
    admin: SocketAddr,
    period: &str,
    want: &[(String, i64, u64)],
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let invoice = invoice(admin, period).await;
        let totals: Vec<(String, i64, u64)> = invoice["invoices"]
            .as_array()
            .expect("invoices")
            .iter()
            .map(|inv| {
                let total = tollgate_e2e::harness::nanos(inv["total"].as_str().unwrap());
                (
                    inv["group"].as_str().unwrap().to_string(),
                    total,
                    inv["requests"].as_u64().unwrap(),
                )
            })
            .collect();
        if totals == want {
            return;
        }
        assert!(Instant::now() < deadline, "the collector's invoice: {totals:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The collector's invoice by cost center for `period`, as JSON.
async fn invoice(admin: SocketAddr, period: &str) -> Value {
    let req = Request::get(format!(
        "http://{admin}/admin/invoice?period={period}&group_by=cost_center&format=json"
    ))
    .header("authorization", "Bearer t")
    .body(Full::new(bytes::Bytes::new()))
    .unwrap();
    let response = client().request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_tls_two_proxies_share_the_budget_and_an_untrusted_server_is_refused() {
    let mock = MockUpstream::start().await;
    let redis = Redis::start_tls();
    let fleet: Vec<Tollgate> = (0..2)
        .map(|_| proxy(&redis, &mock.base_url(), "sync_interval: 20ms, timeout: 2s").0)
        .collect();
    let proxies: Vec<SocketAddr> = fleet.iter().map(|p| p.proxy).collect();
    // 100 calls of $0.10 against $5.00, over TLS to Redis (its plain port is off).
    let (served, other) = race(&proxies, "CC-8501", "tls-bot", 100).await;
    assert_eq!(served, 50, "{other:?}");
    let hash = redis.budget_hash("CC-8501").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut hash = hash;
    while field(&hash, "perm") != 50 * DIME {
        assert!(Instant::now() < deadline, "Redis holds {hash:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        hash = redis.budget_hash("CC-8501").await;
    }
    // Without the CA the server's certificate is not trusted: no budget is spent unchecked.
    let untrusting = format!("url: \"{}\"", redis.url());
    let (lone, _) =
        proxy_with(&PlainSpec(untrusting), &mock.base_url(), "timeout: 500ms", None, "");
    let (status, code, _) = call_as(&client(), lone.proxy, "CC-8502", "echo", "tls-bot", &[]).await;
    assert_eq!((status, code.as_str()), (503, "budget_store_unavailable"));
    // A CA file with a plain redis:// URL is a configuration error naming the field.
    let dir = temp_dir("fleet-bad-ca");
    let config = dir.join("tollgate.yaml");
    let yaml = ConfigFile {
        upstream: &mock.base_url(),
        data_dir: &dir.join("data"),
        token_env: TOKEN_ENV,
        more_routes: &[],
        extra: "store:\n  redis: {url: \"redis://127.0.0.1:1/0\", ca_file: /etc/hostname}\n",
        policy: "version: x\ndefaults: {llm: allow, tool: allow, other: deny}\n",
    }
    .yaml();
    std::fs::write(&config, yaml).unwrap();
    let out = Command::new(BIN).arg("check").arg(&config).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("store.redis.ca_file") && text.contains("rediss://"), "{text}");
}

/// A store given by its `store.redis` settings as written.
struct PlainSpec(String);

impl Store for PlainSpec {
    fn spec(&self) -> String {
        self.0.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_proxys_lease_comes_back_after_its_ttl() {
    let mock = MockUpstream::start().await;
    let redis = Redis::start();
    // Big slices: the first proxy takes a quarter of the budget at its first call.
    let store = "lease_ttl: 1s, sync_interval: 50ms, slice_percent: 100";
    let (a, _) = proxy(&redis, &mock.base_url(), store);
    let (b, b_data) = proxy(&redis, &mock.base_url(), store);
    let client = client();
    let cc = "CC-2001";
    assert_eq!(call(&client, a.proxy, cc).await.0, 200);
    // Its spend is reported, its lease (the rest of its slice) still held.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hash = redis.budget_hash(cc).await;
    assert_eq!(field(&hash, "perm"), DIME);
    let held_by_a = leases(&hash);
    assert!(held_by_a > 0, "a holds a lease: {hash:?}");
    a.signal("KILL");
    let killed_at = Instant::now();
    // While a's lease lives, b can spend only what a does not hold.
    let mut before = 0;
    loop {
        let (status, _) = call(&client, b.proxy, cc).await;
        if status != 200 {
            assert_eq!(status, 402);
            break;
        }
        before += 1;
        assert!(before < 50, "b spent the budget while a's lease should still hold part of it");
    }
    assert!(killed_at.elapsed() < Duration::from_secs(1), "b ran out within the ttl");
    let left_to_b = 50 * DIME - DIME - held_by_a;
    assert!(
        (0..DIME).contains(&(left_to_b - i64::from(before) * DIME)),
        "b spent {before} calls of the {left_to_b} nano-USD a did not hold"
    );
    // After the ttl the lease lapses back to the budget: b spends the last dollar exactly.
    tokio::time::sleep(Duration::from_millis(1200).saturating_sub(killed_at.elapsed())).await;
    let mut after = 0;
    while call(&client, b.proxy, cc).await.0 == 200 {
        after += 1;
        assert!(after <= 50, "never more than the budget");
    }
    assert_eq!(1 + before + after, 50, "the whole budget and not a cent more");
    let deadline = Instant::now() + Duration::from_secs(5);
    while field(&redis.budget_hash(cc).await, "perm") != 50 * DIME {
        assert!(Instant::now() < deadline, "b reports its spend");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(b);
    assert_eq!(spent_in_ledger(&b_data, cc).0, 49);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_refuses_budgeted_calls_at_once_and_recovers() {
    let mock = MockUpstream::start().await;
    let mut redis = Redis::start();
    let (p, _) = proxy(&redis, &mock.base_url(), "timeout: 200ms, sync_interval: 20ms");
    let client = client();
    let cc = "CC-3001";
    for _ in 0..3 {
        assert_eq!(call(&client, p.proxy, cc).await.0, 200);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.kill();
    let mut refused = 0;
    for _ in 0..5 {
        let started = Instant::now();
        let (status, code) = call(&client, p.proxy, cc).await;
        // A slice left over may still serve a call; after that, every call is refused fast.
        if status == 200 {
            continue;
        }
        assert_eq!((status, code.as_str()), (503, "budget_store_unavailable"));
        assert!(started.elapsed() < Duration::from_secs(1), "refused within the timeout");
        refused += 1;
    }
    assert!(refused >= 4, "calls are refused while Redis is down");
    assert!(p.metric("tollgate_store_errors_total") >= 1);
    assert_eq!(p.metric("tollgate_store_down"), 1);
    let ready = readyz(p.admin).await;
    assert!(ready.starts_with("ready; warning: the fleet store (Redis)"), "{ready}");
    // Back (with its AOF): the fleet's spend so far is kept, and calls pass again.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(&client, p.proxy, cc).await.0 != 200 {
        assert!(Instant::now() < deadline, "calls pass again once Redis is back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let perm = field(&redis.budget_hash(cc).await, "perm");
        let served = 3 + 5 - refused + 1;
        if perm == i64::from(served) * DIME {
            break;
        }
        assert!(Instant::now() < deadline, "Redis holds {perm}, {served} calls were served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An admin call with the test token: status and JSON body.
async fn admin(method: &str, addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("authorization", "Bearer t")
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let response = client().request(req).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_raised_through_one_proxy_is_granted_through_another_and_used_once() {
    let mock = MockUpstream::start().await;
    let redis = Redis::start();
    let fleet: Vec<Tollgate> =
        (0..3).map(|_| proxy(&redis, &mock.base_url(), "sync_interval: 20ms").0).collect();
    let (a, b, c) = (&fleet[0], &fleet[1], &fleet[2]);
    let client = client();
    let cc = "CC-4001";
    let (status, code, id) = call_as(&client, a.proxy, cc, "deploy", "release-bot", &[]).await;
    assert_eq!((status, code.as_str()), (403, "rule_require_approval"));
    let id = id.expect("an approval id");
    // The same action asked through another proxy waits on the same approval.
    let (_, _, again) = call_as(&client, c.proxy, cc, "deploy", "release-bot", &[]).await;
    assert_eq!(again.as_deref(), Some(id.as_str()), "one approval for the fleet");
    // Every proxy lists it; b's operator grants it.
    let (status, pending) =
        admin("GET", c.admin, "/admin/approvals?state=pending", Value::Null).await;
    assert_eq!(status, 200);
    assert!(pending.to_string().contains(&id), "{pending}");
    let (status, granted) = admin(
        "POST",
        b.admin,
        &format!("/admin/approvals/{id}/approve"),
        json!({"by": "alice", "note": "release window"}),
    )
    .await;
    assert_eq!(status, 200, "{granted}");
    // Used once, through c; a second use through a is refused.
    let header = [("x-tollgate-approval", id.as_str())];
    let used = call_as(&client, c.proxy, cc, "deploy", "release-bot", &header).await;
    assert_eq!(used.0, 200, "{used:?}");
    let twice = call_as(&client, a.proxy, cc, "deploy", "release-bot", &header).await;
    assert_eq!((twice.0, twice.1.as_str()), (403, "approval_used"));
    let (_, one) = admin("GET", a.admin, &format!("/admin/approvals/{id}"), Value::Null).await;
    assert_eq!(one["state"], "used", "{one}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_disabled_through_one_proxy_is_refused_by_all_until_reenabled() {
    let mock = MockUpstream::start().await;
    let redis = Redis::start();
    let oversight =
        "oversight: {sweep_interval: 100ms, escalation: {review_at: 1, disable_at: 1}}\n";
    let fleet: Vec<Tollgate> = (0..3)
        .map(|_| proxy_with(&redis, &mock.base_url(), "sync_interval: 20ms", None, oversight).0)
        .collect();
    let client = client();
    let cc = "CC-5001";
    // The upstream refuses the agent's call as bad: disabled at once (disable_at: 1), through a.
    let failing = [("x-mock-status", "422")];
    let first = call_as(&client, fleet[0].proxy, cc, "echo", "flaky-bot", &failing).await;
    assert_eq!(first.0, 422, "{first:?}");
    // Every proxy refuses it within a sweep.
    let deadline = Instant::now() + Duration::from_secs(5);
    for p in &fleet {
        loop {
            let (status, code, _) = call_as(&client, p.proxy, cc, "echo", "flaky-bot", &[]).await;
            if (status, code.as_str()) == (403, "agent_disabled") {
                break;
            }
            assert_eq!(status, 200, "{code}");
            assert!(
                Instant::now() < deadline,
                "{} did not learn that flaky-bot is disabled",
                p.proxy
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Another agent is not affected.
    assert_eq!(call_as(&client, fleet[1].proxy, cc, "echo", "steady-bot", &[]).await.0, 200);
    // Re-enabled through c: every proxy lets it through again.
    let (status, enabled) =
        admin("POST", fleet[2].admin, "/admin/agents/flaky-bot/enable", Value::Null).await;
    assert_eq!((status, &enabled["was_disabled"]), (200, &json!(true)), "{enabled}");
    let deadline = Instant::now() + Duration::from_secs(5);
    for p in &fleet {
        while call_as(&client, p.proxy, cc, "echo", "flaky-bot", &[]).await.0 != 200 {
            assert!(Instant::now() < deadline, "{} did not learn of the re-enable", p.proxy);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpm_limit_counts_the_whole_fleet() {
    let mock = MockUpstream::start().await;
    let redis = Redis::start();
    let fleet: Vec<Tollgate> =
        (0..3).map(|_| proxy(&redis, &mock.base_url(), "sync_interval: 20ms").0).collect();
    let client = client();
    // One minute window for the whole test: start early in a minute.
    let into_minute =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
            % 60_000;
    if into_minute > 40_000 {
        tokio::time::sleep(Duration::from_millis(60_000 - into_minute as u64 + 100)).await;
    }
    let (mut served, mut limited) = (0, 0);
    for i in 0..180 {
        let p = &fleet[i % 3];
        match call_as(&client, p.proxy, "CC-6001", "lookup", "metered-bot", &[]).await {
            (200, _, _) => served += 1,
            (429, code, _) if code == "rate_limited_requests" => limited += 1,
            other => {
                panic!("call {i}: unexpected {other:?} after {served} served, {limited} limited")
            }
        }
    }
    assert_eq!((served, limited), (60, 120), "60 per minute across the fleet, not 180");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_redis_cluster_three_proxies_never_spend_more_than_the_budget_either() {
    let mock = MockUpstream::start().await;
    let cluster = Cluster::start();
    let fleet: Vec<Tollgate> = (0..3)
        .map(|_| proxy(&cluster, &mock.base_url(), "sync_interval: 20ms, timeout: 2s").0)
        .collect();
    let client = client();
    let cc = "CC-7001";
    let calls: Vec<_> = (0..1000)
        .map(|i| {
            let (client, addr) = (client.clone(), fleet[i % 3].proxy);
            tokio::spawn(async move { call(&client, addr, cc).await })
        })
        .collect();
    let mut served = 0;
    for answer in calls {
        match answer.await.unwrap() {
            (200, _) => served += 1,
            (402, code) if code == "budget_exceeded" => {}
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(served, 50, "$5.00 at $0.10 a call, across the cluster");
    let deadline = Instant::now() + Duration::from_secs(5);
    while field(&cluster.budget_hash(cc).await, "perm") != 50 * DIME {
        assert!(Instant::now() < deadline, "the spend reaches the cluster");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Approvals work on the cluster too: raised through one proxy, used once through another.
    let (_, _, id) = call_as(&client, fleet[0].proxy, cc, "deploy", "release-bot", &[]).await;
    let id = id.expect("an approval id");
    let (status, _) =
        admin("POST", fleet[1].admin, &format!("/admin/approvals/{id}/approve"), json!({})).await;
    assert_eq!(status, 200);
    let header = [("x-tollgate-approval", id.as_str())];
    assert_eq!(
        call_as(&client, fleet[2].proxy, "CC-7002", "deploy", "release-bot", &header).await.0,
        200
    );
    let twice = call_as(&client, fleet[0].proxy, "CC-7002", "deploy", "release-bot", &header).await;
    assert_eq!((twice.0, twice.1.as_str()), (403, "approval_used"));
}

/// `n` concurrent calls for `cc` spread over `proxies`; their (status, code) in any order. Each
/// must answer within 3 s: nothing hangs on Redis.
async fn wave(proxies: [SocketAddr; 2], cc: &'static str, n: usize) -> Vec<(u16, String)> {
    let client = client();
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let (client, addr) = (client.clone(), proxies[i % proxies.len()]);
            tokio::spawn(async move {
                let started = Instant::now();
                let answer = call(&client, addr, cc).await;
                assert!(started.elapsed() < Duration::from_secs(3), "a call hung: {answer:?}");
                answer
            })
        })
        .collect();
    let mut out = Vec::new();
    for c in calls {
        out.push(c.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_mid_load_and_restarted_loses_no_spend_and_never_overspends() {
    let mock = MockUpstream::start().await;
    // Every write on disk before Redis answers: a SIGKILL loses nothing acknowledged.
    let mut redis = Redis::start_with(&["--appendfsync", "always"]);
    let store = "timeout: 300ms, sync_interval: 20ms";
    let (a, a_data) = proxy(&redis, &mock.base_url(), store);
    let (b, b_data) = proxy(&redis, &mock.base_url(), store);
    let proxies = [a.proxy, b.proxy];
    let cc = "CC-8001";
    let count =
        |answers: &[(u16, String)], status: u16| answers.iter().filter(|r| r.0 == status).count();
    let mut served = 0;
    let first = wave(proxies, cc, 20).await;
    served += count(&first, 200);
    assert_eq!(served, 20, "{first:?}");
    // Redis dies mid-load: calls the leases cannot cover are refused at once, none hangs.
    let load = tokio::spawn(wave(proxies, cc, 60));
    tokio::time::sleep(Duration::from_millis(5)).await;
    redis.kill();
    let during = load.await.unwrap();
    for (status, code) in &during {
        assert!(
            *status == 200
                || (*status == 503 && code == "budget_store_unavailable")
                || *status == 402,
            "{status} {code}"
        );
    }
    served += count(&during, 200);
    let refused = count(&during, 503);
    assert!(refused > 0, "some calls needed Redis while it was down: {during:?}");
    assert!(served <= 50);
    // Back with its AOF: the rest of the budget, and not a cent more, is spendable.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    // (A grant Redis applied while its answer timed out is stranded until the proxy's next
    // sync writes its lease again: a refusal meanwhile is allowed, for a moment.)
    while served < 50 {
        let after = wave(proxies, cc, 40).await;
        served += count(&after, 200);
        assert!(served <= 50, "overspent: {served} calls of $0.10 against $5.00");
        assert!(
            Instant::now() < deadline,
            "the budget was not spendable again ({served} served): {:?}",
            redis.budget_hash(cc).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Spent: every further call is refused as over budget.
    assert!(wave(proxies, cc, 10).await.iter().all(|a| a.0 == 402));
    // Counts reconcile: Redis, the two ledgers and the calls served say the same.
    let deadline = Instant::now() + Duration::from_secs(5);
    while field(&redis.budget_hash(cc).await, "perm") != 50 * DIME {
        assert!(Instant::now() < deadline, "Redis: {:?}", redis.budget_hash(cc).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (na, ta) = spent_in_ledger(&a_data, cc);
    let (nb, tb) = spent_in_ledger(&b_data, cc);
    assert_eq!((na + nb, ta + tb), (50, 50 * DIME), "the ledgers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_local_allowance_a_redis_outage_serves_that_much_and_counts_it_once_back() {
    let mock = MockUpstream::start().await;
    let mut redis = Redis::start_with(&["--appendfsync", "always"]);
    let (p, data) =
        proxy_with(&redis, &mock.base_url(), "timeout: 200ms, sync_interval: 20ms", None, "");
    drop(p);
    // The same proxy, with a $0.30 allowance per budget for outages.
    let config = data.parent().unwrap().join("tollgate.yaml");
    let yaml = std::fs::read_to_string(&config).unwrap().replace(
        "store:\n",
        "store:\n  on_store_error: local_allowance\n  local_allowance: \"0.30\"\n",
    );
    std::fs::write(&config, yaml).unwrap();
    let p = Tollgate::run(Path::new(BIN), &config, &[(TOKEN_ENV, "t")]);
    let client = client();
    let cc = "CC-9001";
    for _ in 0..2 {
        assert_eq!(call(&client, p.proxy, cc).await.0, 200);
    }
    tokio::time::sleep(Duration::from_millis(1_200)).await; // the idle lease goes back
    redis.kill();
    let mut during = Vec::new();
    for _ in 0..5 {
        during.push(call(&client, p.proxy, cc).await);
    }
    let served = during.iter().filter(|a| a.0 == 200).count();
    assert_eq!(served, 3, "$0.30 of allowance at $0.10 a call: {during:?}");
    assert!(during[3..].iter().all(|a| a.0 == 503 && a.1 == "budget_store_unavailable"));
    // Back: what was served from the allowance reaches Redis once.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while field(&redis.budget_hash(cc).await, "perm") != 5 * DIME {
        assert!(Instant::now() < deadline, "Redis: {:?}", redis.budget_hash(cc).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(spent_in_ledger(&data, cc), (5, 5 * DIME));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(field(&redis.budget_hash(cc).await, "perm"), 5 * DIME, "counted once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_ends_during_the_shutdown_drain_still_reaches_the_collector() {
    let mock = MockUpstream::start().await;
    let redis = Redis::start();
    let collector = collector(&mock);
    let (mut p, _) =
        proxy_shipping(&redis, &mock.base_url(), "sync_interval: 20ms", Some(collector.admin));
    // A call the upstream answers only after 1.5 s; the proxy is told to stop meanwhile.
    let client = client();
    let addr = p.proxy;
    let slow = tokio::spawn(async move {
        call_as(&client, addr, "CC-9101", "echo", "late-bot", &[("x-mock-delay-ms", "1500")]).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.signal("TERM");
    assert_eq!(slow.await.unwrap().0, 200, "the drain lets it finish");
    assert_eq!(tokio::task::block_in_place(|| p.exit_code()), Some(0));
    let period = {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        tollgate_core::time::UnixMillis(now.as_millis() as u64).to_string()[..7].to_string()
    };
    let invoice = invoice(collector.admin, &period).await;
    let groups = invoice["invoices"].as_array().expect("invoices");
    assert!(
        groups.iter().any(|g| g["group"] == "CC-9101" && g["requests"] == 1),
        "the drained call was shipped before the proxy stopped: {invoice}"
    );
}

/// `/readyz`'s body (it answers 200 with warnings).
async fn readyz(admin: SocketAddr) -> String {
    let req = Request::get(format!("http://{admin}/readyz"))
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = client().request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// The real Envoy running the built filter (shared with the filter's own tests).
#[path = "../../wasm-filter/tests/support/mod.rs"]
mod envoy_support;

/// A collector in the fleet: it takes usage records and grants the Envoy filters' leases from
/// the fleet's Redis.
fn collector_in_fleet(mock: &MockUpstream, redis: &impl Store) -> Tollgate {
    collector_in_fleet_with(mock, redis, "sync_interval: 20ms, timeout: 2s")
}

/// [`collector_in_fleet`] with these `store.redis` settings.
fn collector_in_fleet_with(mock: &MockUpstream, redis: &impl Store, settings: &str) -> Tollgate {
    collector_with_extra(mock, &format!("store:\n  redis: {{{}, {settings}}}\n", redis.spec()))
}

/// Two Envoys running the filter with `plugin`, in front of `mock`, shipping to `collector`; and
/// their listeners.
fn two_envoys(
    plugin: &str,
    mock: &MockUpstream,
    collector: &Tollgate,
) -> (Vec<envoy_support::Envoy>, [SocketAddr; 2]) {
    let envoys: Vec<envoy_support::Envoy> = (0..2)
        .map(|_| envoy_support::Envoy::start(plugin, mock.addr().port(), collector.admin.port()))
        .collect();
    let at = |e: &envoy_support::Envoy| SocketAddr::from(([127, 0, 0, 1], e.port));
    let listeners = [at(&envoys[0]), at(&envoys[1])];
    (envoys, listeners)
}

/// The filter's configuration with the sidecars' policy and prices, in fleet mode.
fn fleet_plugin() -> String {
    fleet_plugin_with(json!({}))
}

/// [`fleet_plugin`] with more sections (`autonomy`, `guardrails`, ...).
fn fleet_plugin_with(more: Value) -> String {
    let mut plugin = json!({
        "filter": {
            "fail": "closed",
            "mcp_path_prefix": "/mcp",
            "collector": {"cluster": "collector", "flush": "100ms",
                          "token_env": "TOLLGATE_COLLECTOR_TOKEN"}
        },
        "store": {"collector": {"sync_interval": "20ms"}},
        "pricing": {"tools": {"echo": {"per_call": "0.10"}, "deploy": {"per_call": "0.10"}}},
        "policy": {
            "version": "fleet",
            "defaults": {"llm": "allow", "tool": "allow", "other": "deny"},
            "budgets": [{"id": "cc-monthly", "scope": "cost_center", "period": "monthly",
                         "amount": "5.00"}],
            "rules": [{"id": "ask-deploys", "match": {"tool": "deploy"},
                       "effect": "require_approval"},
                      {"id": "metered", "match": {"agent": "metered-bot"}, "effect": "allow",
                       "limits": {"rpm": 60}}]
        }
    });
    if let (Some(plugin), Some(more)) = (plugin.as_object_mut(), more.as_object()) {
        plugin.extend(more.clone());
    }
    plugin.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_envoys_and_a_sidecar_never_spend_more_than_the_budget_together() {
    // Envoy reads the collector's token from its own environment.
    std::env::set_var("TOLLGATE_COLLECTOR_TOKEN", "t");
    let mock = MockUpstream::start().await;
    let redis = Redis::start();
    let collector = collector_in_fleet(&mock, &redis);
    let (sidecar, sidecar_data) = proxy_shipping(
        &redis,
        &mock.base_url(),
        "sync_interval: 20ms, timeout: 2s",
        Some(collector.admin),
    );
    let plugin = fleet_plugin();
    let (envoys, [a, b]) = two_envoys(&plugin, &mock, &collector);
    let targets: Vec<SocketAddr> = vec![a, b, sidecar.proxy];
    let client = client();
    for round in 0..3 {
        let cc = format!("CC-200{round}");
        let calls: Vec<_> = (0..1000)
            .map(|i| {
                let (client, addr, cc) = (client.clone(), targets[i % 3], cc.clone());
                tokio::spawn(async move { (i % 3, call(&client, addr, &cc).await) })
            })
            .collect();
        let mut served = [0; 3];
        let mut refused = 0;
        for answer in calls {
            match answer.await.unwrap() {
                (via, (200, _)) => served[via] += 1,
                (_, (402, code)) if code == "budget_exceeded" => refused += 1,
                (via, other) => {
                    let logs: Vec<String> = envoys.iter().map(|e| e.log()).collect();
                    panic!("round {round}: unexpected answer {other:?} through {via}: {logs:?}")
                }
            }
        }
        eprintln!("round {round}: served through Envoy, Envoy, sidecar: {served:?}");
        let total: usize = served.iter().sum();
        assert_eq!((total, refused), (50, 950), "round {round}: served {served:?}");
        assert!(served[0] + served[1] > 0, "round {round}: the Envoys served some: {served:?}");
        // Every holder reports its spend within a sync interval.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let hash = redis.budget_hash(&cc).await;
            if field(&hash, "perm") == 50 * DIME {
                break;
            }
            assert!(Instant::now() < deadline, "round {round}: Redis holds {hash:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The Envoys' VMs hold leases of their own (`envoy/` holders), beside the sidecar's.
        let hash = redis.budget_hash(&cc).await;
        assert!(hash.iter().any(|(f, _)| f.starts_with("q:envoy/vm-")), "{hash:?}");
    }
    // One invoice for the fleet: the filter's usage events and the sidecar's exported records.
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let period =
        tollgate_core::time::UnixMillis(ms.as_millis() as u64).to_string()[..7].to_string();
    assert!(!read_ledger(&sidecar_data).is_empty(), "the sidecar served some too");
    let want: Vec<(String, i64, u64)> =
        (0..3).map(|r| (format!("CC-200{r}"), 50 * DIME, 50)).collect();
    wait_for_invoice(collector.admin, &period, &want, Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_raised_through_an_envoy_is_granted_in_the_fleet_and_used_once() {
    std::env::set_var("TOLLGATE_COLLECTOR_TOKEN", "t");
    let mock = MockUpstream::start().await;
    let redis = Redis::start();
    let collector = collector_in_fleet(&mock, &redis);
    let (sidecar, _) = proxy(&redis, &mock.base_url(), "sync_interval: 20ms");
    let plugin = fleet_plugin();
    let (envoys, [a, b]) = two_envoys(&plugin, &mock, &collector);
    let client = client();
    let cc = "CC-4101";
    let (status, code, id) = call_as(&client, a, cc, "deploy", "release-bot", &[]).await;
    assert_eq!((status, code.as_str()), (403, "rule_require_approval"), "{:?}", envoys[0].log());
    let id = id.expect("an approval id");
    assert!(id.starts_with("apr_") && !id.contains("tg-"), "a real approval: {id}");
    // The same action asked through the other Envoy, or the sidecar, waits on the same one.
    let (_, _, again) = call_as(&client, b, cc, "deploy", "release-bot", &[]).await;
    assert_eq!(again.as_deref(), Some(id.as_str()), "one approval for the fleet");
    let (_, _, again) = call_as(&client, sidecar.proxy, cc, "deploy", "release-bot", &[]).await;
    assert_eq!(again.as_deref(), Some(id.as_str()), "the sidecar finds it too");
    // Used before it is granted: still pending.
    let header = [("x-tollgate-approval", id.as_str())];
    let early = call_as(&client, b, cc, "deploy", "release-bot", &header).await;
    assert_eq!((early.0, early.1.as_str()), (403, "approval_pending"), "{early:?}");
    // The sidecar's operator lists and grants it.
    let (status, pending) =
        admin("GET", sidecar.admin, "/admin/approvals?state=pending", Value::Null).await;
    assert_eq!(status, 200);
    assert!(pending.to_string().contains(&id), "{pending}");
    let (status, granted) = admin(
        "POST",
        sidecar.admin,
        &format!("/admin/approvals/{id}/approve"),
        json!({"by": "alice", "note": "release window"}),
    )
    .await;
    assert_eq!(status, 200, "{granted}");
    // Used once, through the second Envoy; a second use through the sidecar is refused.
    let used = call_as(&client, b, cc, "deploy", "release-bot", &header).await;
    assert_eq!(used.0, 200, "{used:?}: {}", envoys[1].log());
    let twice = call_as(&client, sidecar.proxy, cc, "deploy", "release-bot", &header).await;
    assert_eq!((twice.0, twice.1.as_str()), (403, "approval_used"));
    let thrice = call_as(&client, a, cc, "deploy", "release-bot", &header).await;
    assert_eq!((thrice.0, thrice.1.as_str()), (403, "approval_used"));
    let (_, one) =
        admin("GET", collector.admin, &format!("/admin/approvals/{id}"), Value::Null).await;
    assert_eq!(one["state"], "used", "{one}");
    // An approval the service cannot find is refused, naming it.
    let bogus = [("x-tollgate-approval", "apr_nothere")];
    let unknown = call_as(&client, a, cc, "deploy", "release-bot", &bogus).await;
    assert_eq!((unknown.0, unknown.1.as_str()), (403, "approval_unknown"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_the_fleet_disabled_is_refused_by_the_envoys_until_reenabled() {
    std::env::set_var("TOLLGATE_COLLECTOR_TOKEN", "t");
    let mock = MockUpstream::start().await;
    let redis = Redis::start();
    let collector = collector_in_fleet(&mock, &redis);
    let oversight =
        "oversight: {sweep_interval: 100ms, escalation: {review_at: 1, disable_at: 1}}\n";
    let (sidecar, _) = proxy_with(&redis, &mock.base_url(), "sync_interval: 20ms", None, oversight);
    let envoy =
        envoy_support::Envoy::start(&fleet_plugin(), mock.addr().port(), collector.admin.port());
    let through_envoy = SocketAddr::from(([127, 0, 0, 1], envoy.port));
    let client = client();
    let cc = "CC-5101";
    assert_eq!(call_as(&client, through_envoy, cc, "echo", "flaky-bot", &[]).await.0, 200);
    // The upstream refuses the agent's call through the sidecar: disabled there (disable_at: 1),
    // and so in the fleet's set.
    let failing = [("x-mock-status", "422")];
    let first = call_as(&client, sidecar.proxy, cc, "echo", "flaky-bot", &failing).await;
    assert_eq!(first.0, 422, "{first:?}");
    // The Envoy refuses it within its poll (a second), at the sidecar's step, with its code.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, code, _) = call_as(&client, through_envoy, cc, "echo", "flaky-bot", &[]).await;
        if (status, code.as_str()) == (403, "agent_disabled") {
            break;
        }
        assert_eq!(status, 200, "{code}");
        assert!(Instant::now() < deadline, "the Envoy did not learn that flaky-bot is disabled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Another agent is not affected.
    assert_eq!(call_as(&client, through_envoy, cc, "echo", "steady-bot", &[]).await.0, 200);
    // Re-enabled through the sidecar's admin API: the Envoy lets it through again.
    let (status, enabled) =
        admin("POST", sidecar.admin, "/admin/agents/flaky-bot/enable", Value::Null).await;
    assert_eq!((status, &enabled["was_disabled"]), (200, &json!(true)), "{enabled}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while call_as(&client, through_envoy, cc, "echo", "flaky-bot", &[]).await.0 != 200 {
        assert!(Instant::now() < deadline, "the Envoy did not learn of the re-enable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An agent the filter's own escalation disables in an Envoy is reported to the collector,
/// which adds it to the fleet's set: the sidecar refuses it too. Re-enabled through the
/// sidecar's admin API (the collector has no `oversight.escalation`: the fleet's set is
/// enough), the Envoy lets it through again within its poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_an_envoy_disabled_is_the_fleets_until_reenabled_through_any_proxy() {
    std::env::set_var("TOLLGATE_COLLECTOR_TOKEN", "t");
    let mock = MockUpstream::start().await;
    let redis = Redis::start();
    let collector = collector_in_fleet(&mock, &redis);
    let oversight =
        "oversight: {sweep_interval: 100ms, escalation: {review_at: 1, disable_at: 1}}\n";
    let (sidecar, _) = proxy_with(&redis, &mock.base_url(), "sync_interval: 20ms", None, oversight);
    let plugin = fleet_plugin_with(json!({
        "oversight": {"escalation": {"review_at": 1, "disable_at": 1}}
    }));
    let envoy = envoy_support::Envoy::start(&plugin, mock.addr().port(), collector.admin.port());
    let through_envoy = SocketAddr::from(([127, 0, 0, 1], envoy.port));
    let client = client();
    let cc = "CC-5201";
    // The upstream refuses the agent's call through the Envoy: disabled there (disable_at: 1).
    let failing = [("x-mock-status", "422")];
    let first = call_as(&client, through_envoy, cc, "echo", "sloppy-bot", &failing).await;
    assert_eq!(first.0, 422, "{first:?}");
    let again = call_as(&client, through_envoy, cc, "echo", "sloppy-bot", &[]).await;
    assert_eq!((again.0, again.1.as_str()), (403, "agent_disabled"), "{}", envoy.log());
    // Reported to the collector, in the fleet's set: the sidecar refuses it within its sweep.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, code, _) =
            call_as(&client, sidecar.proxy, cc, "echo", "sloppy-bot", &[]).await;
        if (status, code.as_str()) == (403, "agent_disabled") {
            break;
        }
        assert_eq!(status, 200, "{code}");
        assert!(Instant::now() < deadline, "the sidecar did not learn that sloppy-bot is disabled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, listed) = admin("GET", collector.admin, "/v1/fleet/agents/disabled", Value::Null).await;
    assert_eq!(listed["agents"], json!(["sloppy-bot"]), "{listed}");
    // Every VM of the Envoy reads the set once more (each polls every second).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(call_as(&client, through_envoy, cc, "echo", "steady-bot", &[]).await.0, 200);
    let (status, enabled) =
        admin("POST", sidecar.admin, "/admin/agents/sloppy-bot/enable", Value::Null).await;
    assert_eq!((status, &enabled["was_disabled"]), (200, &json!(true)), "{enabled}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while call_as(&client, through_envoy, cc, "echo", "sloppy-bot", &[]).await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the Envoy did not learn of the re-enable: {}",
            envoy.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(call_as(&client, sidecar.proxy, cc, "echo", "sloppy-bot", &[]).await.0, 200);
    let (_, listed) = admin("GET", collector.admin, "/v1/fleet/agents/disabled", Value::Null).await;
    assert_eq!(listed["agents"], json!([]), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpm_limit_counts_the_envoys_and_the_sidecars_together() {
    std::env::set_var("TOLLGATE_COLLECTOR_TOKEN", "t");
    let mock = MockUpstream::start().await;
    let redis = Redis::start();
    let collector = collector_in_fleet(&mock, &redis);
    let (sidecar, _) = proxy(&redis, &mock.base_url(), "sync_interval: 20ms");
    let plugin = fleet_plugin();
    let (_envoys, [a, b]) = two_envoys(&plugin, &mock, &collector);
    let targets = [a, b, sidecar.proxy];
    let client = client();
    // One minute window for the whole test: start early in a minute.
    let into_minute =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
            % 60_000;
    if into_minute > 40_000 {
        tokio::time::sleep(Duration::from_millis(60_000 - into_minute as u64 + 100)).await;
    }
    let (mut served, mut limited) = ([0; 3], 0);
    for i in 0..180 {
        match call_as(&client, targets[i % 3], "CC-6101", "lookup", "metered-bot", &[]).await {
            (200, _, _) => served[i % 3] += 1,
            (429, code, _) if code == "rate_limited_requests" => limited += 1,
            other => panic!("call {i}: unexpected {other:?} after {served:?} served"),
        }
    }
    let total: usize = served.iter().sum();
    assert_eq!((total, limited), (60, 120), "60 a minute across the fleet: {served:?}");
    assert!(served[0] > 0 && served[1] > 0, "the Envoys served some: {served:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn autonomy_budgets_and_hourly_limits_count_the_envoys_and_the_sidecars_together() {
    std::env::set_var("TOLLGATE_COLLECTOR_TOKEN", "t");
    let mock = MockUpstream::start().await;
    let redis = Redis::start();
    clear_of_window_end(3_600_000, Duration::from_secs(40)).await;
    let collector = collector_in_fleet(&mock, &redis);
    // `echo` may be called 12 times an hour; every agent may act alone 20 times a day.
    let yaml = "guardrails:\n  include_defaults: false\n  actions:\n    echo: {category: read, \
                risk_level: safe, requires_approval: false, rate_limit_per_hour: 12}\n    \
                lookup: {category: read, risk_level: safe, requires_approval: false}\n\
                autonomy:\n  default: AUTO_EXECUTE\n  budgets: {default: {per_day: 20}}\n";
    let (sidecar, _) =
        proxy_with(&redis, &mock.base_url(), "sync_interval: 20ms, timeout: 2s", None, yaml);
    let plugin = fleet_plugin_with(json!({
        "guardrails": {"include_defaults": false, "actions": {
            "echo": {"category": "read", "risk_level": "safe", "requires_approval": false,
                     "rate_limit_per_hour": 12},
            "lookup": {"category": "read", "risk_level": "safe", "requires_approval": false}}},
        "autonomy": {"default": "AUTO_EXECUTE", "budgets": {"default": {"per_day": 20}}}
    }));
    let (_envoys, [a, b]) = two_envoys(&plugin, &mock, &collector);
    let targets = [a, b, sidecar.proxy];
    let client = client();
    // Concurrent calls of one agent through all three, each phase its own agent.
    let wave = |tool: &'static str, agent: &'static str, n: usize| {
        let client = client.clone();
        async move {
            let calls: Vec<_> = (0..n)
                .map(|i| {
                    let (client, addr) = (client.clone(), targets[i % 3]);
                    tokio::spawn(async move {
                        let (status, code, _) =
                            call_as(&client, addr, "CC-8301", tool, agent, &[]).await;
                        (i % 3, status, code)
                    })
                })
                .collect();
            let (mut served, mut other) = ([0; 3], std::collections::BTreeMap::new());
            for c in calls {
                match c.await.unwrap() {
                    (via, 200, _) => served[via] += 1,
                    (_, status, code) => *other.entry((status, code)).or_insert(0) += 1,
                }
            }
            (served, other)
        }
    };
    // A few calls through the Envoys alone, then a race through all three: the fleet's total
    // holds whoever leased first.
    let through_envoys = |tool: &'static str, agent: &'static str, n: usize| {
        let client = client.clone();
        async move {
            for i in 0..n {
                let (status, code, _) =
                    call_as(&client, targets[i % 2], "CC-8301", tool, agent, &[]).await;
                assert_eq!((status, code.as_str()), (200, ""), "{tool} call {i} via an Envoy");
            }
        }
    };
    through_envoys("lookup", "auto-bot", 5).await;
    let (served, other) = wave("lookup", "auto-bot", 150).await;
    let exhausted = other.get(&(403, "autonomy_budget_exhausted".into())).copied().unwrap_or(0);
    assert_eq!(
        (served.iter().sum::<usize>(), exhausted),
        (15, 135),
        "20 autonomous actions a day for the fleet, 5 of them through the Envoys first: \
         {served:?} {other:?}"
    );
    through_envoys("echo", "hourly-bot", 4).await;
    let (served, other) = wave("echo", "hourly-bot", 90).await;
    let limited = other.get(&(429, "rate_limit_exceeded".into())).copied().unwrap_or(0);
    assert_eq!(
        (served.iter().sum::<usize>(), limited),
        (8, 82),
        "12 calls an hour for the fleet, 4 of them through the Envoys first: {served:?} {other:?}"
    );
    // Every holder reports its counted calls within a sync interval; the Envoys' VMs counted
    // on count leases of their own.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let hash = redis.budget_hash("hour/10:hourly-bot").await;
        if field(&hash, "perm") == 12 {
            assert!(hash.iter().any(|(f, _)| f.starts_with("q:envoy/vm-")), "{hash:?}");
            break;
        }
        assert!(Instant::now() < deadline, "every counted call reported: {hash:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_loop_spread_over_envoys_and_a_sidecar_is_caught() {
    std::env::set_var("TOLLGATE_COLLECTOR_TOKEN", "t");
    let mock = MockUpstream::start().await;
    let redis = Redis::start();
    let collector = collector_in_fleet(&mock, &redis);
    let loops = "oversight: {loops: {max_repeats: 3, window: 10m}}\n";
    let (sidecar, _) = proxy_with(&redis, &mock.base_url(), "sync_interval: 20ms", None, loops);
    let plugin =
        fleet_plugin_with(json!({"oversight": {"loops": {"max_repeats": 3, "window": "10m"}}}));
    let (envoys, [a, b]) = two_envoys(&plugin, &mock, &collector);
    let targets = [a, b, sidecar.proxy];
    let client = client();
    // One identical call after another, each through the next proxy (and whichever worker of
    // an Envoy takes it), more than a sync interval apart: the fleet lets exactly
    // `max_repeats` through.
    let answers = calls_in_turn(&client, &targets, "CC-8401", 7).await;
    let logs: Vec<String> = envoys.iter().map(|e| e.log()).collect();
    assert_eq!(
        answers,
        first_three(7),
        "the 4th identical call is a loop, wherever it lands: {logs:?}"
    );
    // A burst faster than the sync interval: at most `max_repeats` per holder (each Envoy
    // worker is one), and after a sync everything is refused everywhere.
    let (served, other) = race(&targets, "CC-8402", "burst-bot", 30).await;
    assert!((3..=15).contains(&served), "served {served}: {other:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (again, _) = race(&targets, "CC-8402", "burst-bot", 9).await;
    assert_eq!(again, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_collector_down_an_envoy_answers_at_once_by_its_fail_policy() {
    std::env::set_var("TOLLGATE_COLLECTOR_TOKEN", "t");
    let mock = MockUpstream::start().await;
    // Nothing listens where the collector should be.
    let nowhere = envoy_support::free_port();
    let client = client();
    for (fail, want) in [("closed", 503), ("open", 200)] {
        let plugin = fleet_plugin().replace(r#""fail":"closed""#, &format!(r#""fail":"{fail}""#));
        assert!(plugin.contains(&format!(r#""fail":"{fail}""#)), "{plugin}");
        let envoy = envoy_support::Envoy::start(&plugin, mock.addr().port(), nowhere);
        let addr = SocketAddr::from(([127, 0, 0, 1], envoy.port));
        for i in 0..5 {
            let started = Instant::now();
            let (status, code) = call(&client, addr, "CC-7001").await;
            let waited = started.elapsed();
            assert_eq!(status, want, "fail {fail}, call {i}: {code}: {}", envoy.log());
            if want == 503 {
                assert_eq!(code, "budget_store_unavailable");
            }
            // One sync interval and a refused connection, never a hang.
            assert!(waited < Duration::from_secs(3), "fail {fail}, call {i}: waited {waited:?}");
        }
        // Counted as the sidecar counts its Redis failures.
        assert!(envoy.wait_metric("tollgate_store_errors_total", 1) >= 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_envoys_leases_come_back_after_their_ttl() {
    std::env::set_var("TOLLGATE_COLLECTOR_TOKEN", "t");
    let mock = MockUpstream::start().await;
    let redis = Redis::start();
    let collector =
        collector_in_fleet_with(&mock, &redis, "sync_interval: 20ms, timeout: 2s, lease_ttl: 2s");
    let (sidecar, _) = proxy(&redis, &mock.base_url(), "sync_interval: 20ms, lease_ttl: 2s");
    // Large grants: the Envoy holds much more than one call's worth.
    let plugin = fleet_plugin().replace(
        r#""store":{"collector":{"sync_interval":"20ms"}}"#,
        r#""store":{"collector":{"slice_percent":50,"sync_interval":"20ms"}}"#,
    );
    assert!(plugin.contains("slice_percent"), "{plugin}");
    let envoy = envoy_support::Envoy::start(&plugin, mock.addr().port(), collector.admin.port());
    let client = client();
    let cc = "CC-7101";
    let through_envoy = SocketAddr::from(([127, 0, 0, 1], envoy.port));
    let mut served = 0;
    for _ in 0..3 {
        assert_eq!(call(&client, through_envoy, cc).await.0, 200);
        served += 1;
    }
    let hash = redis.budget_hash(cc).await;
    let held: i64 = hash
        .iter()
        .filter(|(f, _)| f.starts_with("l:envoy/"))
        .map(|(_, v)| v.parse::<i64>().unwrap())
        .sum();
    assert!(held > 5 * DIME, "the Envoy holds a large lease: {hash:?}");
    // Killed holding it (its spend reported within a sync interval first).
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(envoy);
    // The sidecar gets the rest once the lease lapsed, and never more.
    let deadline = Instant::now() + Duration::from_secs(10);
    while served < 50 {
        match call(&client, sidecar.proxy, cc).await {
            (200, _) => served += 1,
            (402, code) if code == "budget_exceeded" => {
                assert!(Instant::now() < deadline, "the lease never came back: {served} served");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let (status, code) = call(&client, sidecar.proxy, cc).await;
    assert_eq!((status, code.as_str()), (402, "budget_exceeded"), "not a cent more");
}

/// `n` concurrent calls of `echo` by `agent` for `cc`, spread over `proxies`: how many were
/// served, and the other answers (status and code) counted.
async fn race(
    proxies: &[SocketAddr],
    cc: &str,
    agent: &str,
    n: usize,
) -> (usize, std::collections::BTreeMap<(u16, String), usize>) {
    let client = client();
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let (client, addr) = (client.clone(), proxies[i % proxies.len()]);
            let (cc, agent) = (cc.to_string(), agent.to_string());
            tokio::spawn(async move {
                let (status, code, _) = call_as(&client, addr, &cc, "echo", &agent, &[]).await;
                (status, code)
            })
        })
        .collect();
    let (mut served, mut other) = (0, std::collections::BTreeMap::new());
    for c in calls {
        match c.await.unwrap() {
            (200, _) => served += 1,
            answer => *other.entry(answer).or_insert(0) += 1,
        }
    }
    (served, other)
}

/// `n` identical `echo` calls of `loop-bot`, each through the next of `proxies`, 150 ms apart
/// (more than a sync interval): their statuses and refusal codes.
async fn calls_in_turn(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<bytes::Bytes>>,
    proxies: &[SocketAddr],
    cc: &str,
    n: usize,
) -> Vec<(u16, String)> {
    let mut answers = Vec::new();
    for i in 0..n {
        let (status, code, _) =
            call_as(client, proxies[i % proxies.len()], cc, "echo", "loop-bot", &[]).await;
        answers.push((status, code));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    answers
}

/// `n` answers of which the first three pass and the rest are loops (`max_repeats: 3`).
fn first_three(n: usize) -> Vec<(u16, String)> {
    (0..n)
        .map(|i| if i < 3 { (200, String::new()) } else { (403, "loop_detected".to_string()) })
        .collect()
}

/// Waits, if need be, until the current UTC hour has more than `needed` left (a test counting
/// per hour or per day must not straddle a window's end).
async fn clear_of_window_end(window_ms: u64, needed: Duration) {
    let into =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
            as u64
            % window_ms;
    let left = window_ms - into;
    if left < needed.as_millis() as u64 {
        tokio::time::sleep(Duration::from_millis(left + 100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_autonomy_budget_counts_the_whole_fleet() {
    let mock = MockUpstream::start().await;
    let redis = Redis::start();
    clear_of_window_end(86_400_000, Duration::from_secs(30)).await;
    let autonomy = "autonomy:\n  default: AUTO_EXECUTE\n  budgets: {default: {per_day: 20}}\n";
    let fleet: Vec<Tollgate> = (0..3)
        .map(|_| {
            proxy_with(&redis, &mock.base_url(), "sync_interval: 20ms, timeout: 2s", None, autonomy)
                .0
        })
        .collect();
    let proxies: Vec<SocketAddr> = fleet.iter().map(|p| p.proxy).collect();
    let (served, other) = race(&proxies, "CC-8101", "auto-bot", 300).await;
    let exhausted = other.get(&(403, "autonomy_budget_exhausted".into())).copied().unwrap_or(0);
    assert_eq!(
        (served, exhausted),
        (20, 280),
        "20 autonomous actions a day for the fleet, not 20 per proxy: {other:?}"
    );
    // Another agent has its own 20; the first gets none more through any proxy.
    let (served, _) = race(&proxies, "CC-8101", "other-bot", 30).await;
    assert_eq!(served, 20);
    for p in &proxies {
        let (status, code, _) = call_as(&client(), *p, "CC-8101", "echo", "auto-bot", &[]).await;
        assert_eq!((status, code.as_str()), (403, "autonomy_budget_exhausted"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guardrail_hourly_limit_counts_the_whole_fleet() {
    let mock = MockUpstream::start().await;
    let redis = Redis::start();
    clear_of_window_end(3_600_000, Duration::from_secs(30)).await;
    let guardrails = "guardrails:\n  include_defaults: false\n  actions:\n    echo: {category: \
                      read, risk_level: safe, requires_approval: false, rate_limit_per_hour: 12}\n\
                      autonomy:\n  default: AUTO_EXECUTE\n  budgets: {default: {per_day: 1000}}\n";
    let fleet: Vec<Tollgate> = (0..3)
        .map(|_| {
            proxy_with(
                &redis,
                &mock.base_url(),
                "sync_interval: 20ms, timeout: 2s",
                None,
                guardrails,
            )
            .0
        })
        .collect();
    let proxies: Vec<SocketAddr> = fleet.iter().map(|p| p.proxy).collect();
    // (An autonomy budget too: its lease is refilled after the hourly count was taken, and the
    // lifecycle that runs again must not count the call twice.)
    let (served, other) = race(&proxies, "CC-8201", "hourly-bot", 120).await;
    let limited = other.get(&(429, "rate_limit_exceeded".into())).copied().unwrap_or(0);
    assert_eq!(
        (served, limited),
        (12, 108),
        "12 calls an hour for the fleet, not 12 per proxy: {other:?}"
    );
    // An agent calling now and then: far from the limit, its proxy keeps the idle lease (a
    // quarter of the 12), so its next call needs no round trip.
    let sparse = call_as(&client(), proxies[0], "CC-8201", "echo", "sparse-bot", &[]).await;
    assert_eq!(sparse.0, 200);
    // Counted for good: after the idle leases went back, still none more.
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let (served, _) = race(&proxies, "CC-8201", "hourly-bot", 9).await;
    assert_eq!(served, 0);
    let hash = redis.budget_hash("hour/10:sparse-bot").await;
    assert_eq!(
        (field(&hash, "perm"), leases(&hash)),
        (1, 2),
        "its 1 call and the 2 it holds: {hash:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_loop_spread_over_three_proxies_is_caught() {
    let mock = MockUpstream::start().await;
    let redis = Redis::start();
    let loops = "oversight: {loops: {max_repeats: 3, window: 10m}}\n";
    let fleet: Vec<Tollgate> = (0..3)
        .map(|_| proxy_with(&redis, &mock.base_url(), "sync_interval: 20ms", None, loops).0)
        .collect();
    let proxies: Vec<SocketAddr> = fleet.iter().map(|p| p.proxy).collect();
    let client = client();
    // One identical call after another, each through the next proxy, more than a sync interval
    // apart: the fleet lets exactly `max_repeats` through.
    let answers = calls_in_turn(&client, &proxies, "CC-8301", 6).await;
    assert_eq!(
        answers,
        first_three(6),
        "the 4th identical call is a loop, whichever proxy sees it"
    );
    // A burst faster than the sync interval: the documented bound, at most `max_repeats` per
    // proxy (3 × 3), and everything after it is refused by every proxy.
    let (served, other) = race(&proxies, "CC-8302", "burst-bot", 30).await;
    assert!((3..=9).contains(&served), "served {served}: {other:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (again, _) = race(&proxies, "CC-8302", "burst-bot", 6).await;
    assert_eq!(again, 0);
}

/// A master, its two replicas and one sentinel watching them (the master named `fleet`), on
/// loopback ports.
struct SentinelSet {
    /// The first master, then its replicas.
    nodes: Vec<Redis>,
    sentinel: Child,
    port: u16,
}

impl SentinelSet {
    fn start() -> SentinelSet {
        let master = Redis::start();
        let mport = master.port.to_string();
        let mut nodes = vec![master];
        for _ in 0..2 {
            nodes.push(Redis::start_with(&["--replicaof", "127.0.0.1", &mport]));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for r in &nodes[1..] {
            while !cli(r.port, &["INFO", "replication"]).contains("master_link_status:up") {
                assert!(Instant::now() < deadline, "the replica did not sync");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = temp_dir("sentinel");
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor fleet 127.0.0.1 {mport} 1\n\
                 sentinel down-after-milliseconds fleet 1000\n\
                 sentinel failover-timeout fleet 5000\n",
                dir.display(),
            ),
        )
        .unwrap();
        let sentinel = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel");
        let set = SentinelSet { nodes, sentinel, port };
        // The sentinel knows the replicas (it asks the master), so it can fail over.
        for r in &set.nodes[1..] {
            while !cli(port, &["SENTINEL", "replicas", "fleet"]).contains(&r.port.to_string()) {
                assert!(Instant::now() < deadline, "the sentinel did not find the replicas");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        set
    }

    /// The node the sentinel names as the master.
    fn master(&self) -> Option<&Redis> {
        let out = cli(self.port, &["SENTINEL", "get-master-addr-by-name", "fleet"]);
        let port: u16 = out.lines().nth(1).and_then(|l| l.trim().parse().ok())?;
        self.nodes.iter().find(|n| n.port == port)
    }
}

impl Store for SentinelSet {
    fn spec(&self) -> String {
        format!("sentinel: {{master: fleet, nodes: [\"redis://127.0.0.1:{}\"]}}", self.port)
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        let _ = self.sentinel.kill();
        let _ = self.sentinel.wait();
    }
}

/// `redis-cli -p port args…`'s output.
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): install Debian's redis-tools"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn behind_sentinel_the_fleet_follows_a_failover_and_never_overspends() {
    let mock = MockUpstream::start().await;
    let mut set = SentinelSet::start();
    let fleet: Vec<Tollgate> = (0..3)
        .map(|_| proxy(&set, &mock.base_url(), "sync_interval: 20ms, timeout: 1s").0)
        .collect();
    let proxies: Vec<SocketAddr> = fleet.iter().map(|p| p.proxy).collect();
    let cc = "CC-9201";
    let (served, other) = race(&proxies, cc, "fleet-agent", 600).await;
    assert_eq!(served, 50, "$5.00 at $0.10 a call through Sentinel: {other:?}");
    // Reported to the master and replicated.
    let deadline = Instant::now() + Duration::from_secs(5);
    for r in &set.nodes {
        while field(&r.budget_hash(cc).await, "perm") != 50 * DIME {
            assert!(Instant::now() < deadline, "{}: {:?}", r.port, r.budget_hash(cc).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Fail over: a replica becomes the master, the old master a replica.
    let old = &set.nodes[0];
    assert!(cli(set.port, &["SENTINEL", "failover", "fleet"]).contains("OK"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let new_master = loop {
        if let Some(m) = set.master().filter(|m| m.port != old.port) {
            if cli(m.port, &["ROLE"]).starts_with("master") {
                break m;
            }
        }
        assert!(Instant::now() < deadline, "the failover did not happen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The failover ends when the other replica follows the new master.
    for r in set.nodes.iter().filter(|n| n.port != old.port && n.port != new_master.port) {
        let want = format!("master_port:{}", new_master.port);
        loop {
            let info = cli(r.port, &["INFO", "replication"]);
            if info.contains(&want) && info.contains("master_link_status:up") {
                break;
            }
            assert!(Instant::now() < deadline, "the other replica does not follow the new master");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!("failed over");
    // Requests go on through the new master: a new cost center gets its budget, once.
    let client = client();
    let cc2 = "CC-9202";
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut served2 = 0;
    loop {
        let (status, code) = call(&client, proxies[0], cc2).await;
        if status == 200 {
            served2 += 1;
            break;
        }
        assert_eq!((status, code.as_str()), (503, "budget_store_unavailable"));
        assert!(Instant::now() < deadline, "no call served after the failover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // (Until every replica follows the new master, a write may not reach one: refused 503.)
    let deadline = Instant::now() + Duration::from_secs(20);
    while served2 < 50 {
        let (served, other) = race(&proxies, cc2, "fleet-agent", 300).await;
        served2 += served;
        assert!(served2 <= 50, "overspent after the failover: {served2}, {other:?}");
        assert!(
            Instant::now() < deadline,
            "the budget was not spendable after the failover: {other:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("after the failover: {served2} served");
    // The old master is the new one's replica once the sentinel has told it (nothing it took
    // after the failover counted: it had no replica to hold it).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cli(old.port, &["ROLE"]).starts_with("slave") {
        assert!(Instant::now() < deadline, "the old master was not demoted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("the old master is a replica");
    // Both budgets are still spent: not one more call through any proxy.
    for cc in [cc, cc2] {
        let (served, other) = race(&proxies, cc, "fleet-agent", 90).await;
        assert_eq!(served, 0, "{cc}: {other:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while field(&new_master.budget_hash(cc2).await, "perm") != 50 * DIME {
        assert!(Instant::now() < deadline, "{:?}", new_master.budget_hash(cc2).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(field(&new_master.budget_hash(cc).await, "perm"), 50 * DIME);
    // The new master dies: the sentinel promotes the last node, and the fleet follows it
    // (meanwhile calls are refused within the timeout, none hangs).
    let dead = new_master.port;
    set.nodes.iter_mut().find(|n| n.port == dead).unwrap().kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !set
        .master()
        .is_some_and(|m| m.port != dead && cli(m.port, &["ROLE"]).starts_with("master"))
    {
        assert!(Instant::now() < deadline, "no failover after the master died");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("the master died and another took over");
    let cc3 = "CC-9203";
    let (mut served3, started) = (0, Instant::now());
    while served3 < 50 {
        let t = Instant::now();
        let (served, other) = race(&proxies, cc3, "fleet-agent", 100).await;
        assert!(t.elapsed() < Duration::from_secs(5), "calls hung on the dead master");
        served3 += served;
        assert!(served3 <= 50, "overspent after the master died: {served3}, {other:?}");
        assert!(started.elapsed() < Duration::from_secs(30), "not spendable again: {other:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for cc in [cc, cc2, cc3] {
        let (served, other) = race(&proxies, cc, "fleet-agent", 30).await;
        assert_eq!(served, 0, "{cc} after the second failover: {other:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_an_hourly_limit_follows_the_outage_policy_and_nothing_hangs() {
    let mock = MockUpstream::start().await;
    let mut redis = Redis::start();
    clear_of_window_end(3_600_000, Duration::from_secs(30)).await;
    let guardrails = "guardrails:\n  include_defaults: false\n  actions:\n    echo: {category: \
                      read, risk_level: safe, requires_approval: false, rate_limit_per_hour: 12}\n";
    // (Budget leases of a quarter of what is left: the money is not what runs out here.)
    let store = "timeout: 200ms, sync_interval: 20ms, slice_percent: 100";
    let (closed, _) = proxy_with(&redis, &mock.base_url(), store, None, guardrails);
    let (open, data) = proxy_with(&redis, &mock.base_url(), store, None, guardrails);
    drop(open);
    // The second proxy serves from its own counters while Redis is down.
    let config = data.parent().unwrap().join("tollgate.yaml");
    let yaml = std::fs::read_to_string(&config).unwrap().replace(
        "store:\n",
        "store:\n  on_store_error: local_allowance\n  local_allowance: \"5.00\"\n",
    );
    std::fs::write(&config, yaml).unwrap();
    let open = Tollgate::run(Path::new(BIN), &config, &[(TOKEN_ENV, "t")]);
    let client = client();
    // One call each: each proxy holds a lease of a quarter of the 12 (3 calls).
    for p in [closed.proxy, open.proxy] {
        assert_eq!(call_as(&client, p, "CC-9301", "echo", "outage-bot", &[]).await.0, 200);
    }
    redis.kill();
    let timed = |p: SocketAddr| {
        let client = client.clone();
        async move {
            let started = Instant::now();
            let (status, code, _) = call_as(&client, p, "CC-9301", "echo", "outage-bot", &[]).await;
            assert!(started.elapsed() < Duration::from_secs(3), "a call hung on Redis");
            (status, code)
        }
    };
    // fail_closed: what the lease covers (2 more), then 503 at once.
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers.push(timed(closed.proxy).await);
    }
    let served = answers.iter().filter(|a| a.0 == 200).count();
    assert_eq!(served, 2, "{answers:?}");
    assert!(answers[2..].iter().all(|a| *a == (503, "budget_store_unavailable".to_string())));
    // local_allowance: counted on the proxy's own counter against the full 12, then 429.
    let mut answers = Vec::new();
    for _ in 0..16 {
        answers.push(timed(open.proxy).await);
    }
    // (Once a sync has failed, the lease is left alone: up to its 2 first, then the 12.)
    let served = answers.iter().filter(|a| a.0 == 200).count();
    assert!((12..=14).contains(&served), "{answers:?}");
    assert!(answers[served..].iter().all(|a| *a == (429, "rate_limit_exceeded".to_string())));
}
