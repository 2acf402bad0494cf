//! Fleet mode: budgets shared by every proxy through Redis, spent from leases held in memory.
//!
//! Each budget counter (a budget, scope value and period) is one Redis hash. It holds `perm`,
//! the spend the fleet has reported, and one lease per proxy (`l:<proxy>`, with its expiry
//! `e:<proxy>`): money a proxy may reserve from without asking. The budget's committed total is
//! `perm` plus every live lease, and a lease is only ever granted (or grown) by one Lua script
//! that checks that total against the limit, so the fleet together can never commit more than
//! the budget. A request is served from its proxy's lease in memory; it waits for Redis only
//! when the lease cannot cover it ([`Admission::Short`](tollgate_core::lifecycle::Admission)).
//!
//! The same script reports, every `sync_interval`, what the proxy spent since (added to `perm`
//! once: each report carries a sequence number) and how much of its lease is still in use, which
//! renews the lease. Free lease the proxy has not touched for a second goes back; all of it goes
//! back on shutdown. A proxy that dies stops renewing: its lease lapses after `lease_ttl` and the
//! next script run on that budget gives the money back to the fleet. Near the limit, leases
//! shrink to a quarter of what is left and finally to the one request that asks, so the last
//! dollar is spendable exactly.
//!
//! What a lease does not cover: spend a proxy settled but had not reported when it was killed
//! (at most one `sync_interval`) is missing from Redis (it is in the proxy's ledger); and a
//! proxy that could not reach Redis for longer than `lease_ttl` while serving keeps charging its
//! in-flight requests when it comes back, even if that passes the limit (the money was spent).
//!
//! Holds (one per request) and settle markers stay in the proxy's memory: a request settles
//! where it was reserved.
//!
//! The same leases count the autonomy budgets and the guardrails' hourly action limits, and a
//! stream merged in the background the loop detector's calls ([`counts`]). Redis is one server
//! (`url`), a Redis Cluster (`cluster`) or a master behind Redis Sentinel ([`sentinel`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use redis::aio::ConnectionManager;
use tollgate_core::budget::lease::{self, Lease, Shortfall, SyncAnswer, SyncArgs};
use tollgate_core::budget::{AddOutcome, Hold, MemoryStore, Refill, Store, StoreError, Taken};
use tollgate_core::doc::{Cx, Field};
use tollgate_core::time::UnixMillis;

use crate::clock::now;

pub mod approvals;
pub mod counts;
pub mod leases;
pub mod loops;
pub mod oversight;
pub mod reports;
pub mod sentinel;

/// The largest budget the fleet store takes, in nano-USD: Redis scripts compare in doubles,
/// exact up to 2^53 ($9,007,199.25).
pub const MAX_BUDGET_NANOS: i64 = lease::MAX_LIMIT;

/// The `store:` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    pub redis: RedisConfig,
}

/// What a proxy does when Redis cannot be reached and its lease cannot cover a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnStoreError {
    /// Refuse the request (503 `budget_store_unavailable`).
    #[default]
    FailClosed,
    /// Serve up to this many nano-USD per budget counter from this proxy alone, counted into
    /// Redis when it answers again; rate limits fall back to this proxy's own limiter.
    LocalAllowance(i64),
}

/// `store.redis`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db`: one server (`url`), or the seed nodes of a Redis
    /// Cluster (`cluster`). Never logged as written: a URL may carry a password.
    pub nodes: Vec<String>,
    /// Whether `nodes` are a Redis Cluster's.
    pub cluster: bool,
    /// Redis Sentinel (`sentinel.master`): `nodes` are the sentinels, asked for the address of
    /// the master of this name (again after every failed call, so a failover is followed).
    pub sentinel: Option<String>,
    /// Behind Sentinel: how many replicas must hold each write before it counts (`WAIT`), so
    /// that a failover to one of them loses nothing acknowledged; 0 does not wait.
    pub wait_replicas: u32,
    /// Prepended to every key (no braces: keys carry their own hash tags).
    pub key_prefix: String,
    /// Longest wait for one Redis call.
    pub timeout: Duration,
    /// How long a lease lives without being renewed.
    pub lease_ttl: Duration,
    /// How often spend is reported and leases renewed.
    pub sync_interval: Duration,
    /// The lease a proxy asks for, in basis points of the budget (at least the request).
    pub slice_bp: u64,
    /// `store.on_store_error`.
    pub on_error: OnStoreError,
    /// `store.redis.ca_file`: the PEM certificates trusted for `rediss://` instead of the
    /// public roots (a private CA).
    pub ca: Option<Arc<Vec<u8>>>,
}

/// The body of a collector endpoint's request, at most `max` bytes (`what`, in the error:
/// "a lease batch").
pub(crate) async fn read_body(
    req: hyper::Request<hyper::body::Incoming>,
    max: usize,
    what: &str,
) -> Result<bytes::Bytes, (hyper::StatusCode, String)> {
    use http_body_util::{BodyExt, Limited};
    match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => {
            Err((hyper::StatusCode::PAYLOAD_TOO_LARGE, format!("{what} is at most {max} bytes")))
        }
    }
}

/// A client for `info` (`rediss://`: TLS, trusting `ca` if given, else the public roots).
pub(crate) fn client(
    info: impl redis::IntoConnectionInfo,
    ca: Option<&Arc<Vec<u8>>>,
) -> redis::RedisResult<redis::Client> {
    let info = info.into_connection_info()?;
    match (ca, matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. })) {
        (Some(pem), true) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates { client_tls: None, root_cert: Some(pem.to_vec()) },
        ),
        _ => redis::Client::open(info),
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("nodes", &self.nodes.iter().map(|u| redact(u)).collect::<Vec<_>>())
            .field("cluster", &self.cluster)
            .field("sentinel", &self.sentinel)
            .field("wait_replicas", &self.wait_replicas)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("lease_ttl", &self.lease_ttl)
            .field("sync_interval", &self.sync_interval)
            .field("slice_bp", &self.slice_bp)
            .field("on_error", &self.on_error)
            .field("ca", &self.ca.as_ref().map(|c| c.len()))
            .finish()
    }
}

/// The PEM certificates of `path` (at least one).
fn read_ca(path: &str) -> Result<Vec<u8>, String> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| format!("cannot read `{path}`: {e}"))?;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{path}` is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("`{path}` holds no PEM certificate"));
    }
    Ok(pem)
}

/// The URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

impl StoreConfig {
    pub fn decode(cx: &mut Cx, field: Option<Field<'_>>) -> Option<StoreConfig> {
        let field = field?;
        let mut obj = cx.object(&field)?;
        let redis =
            obj.require(cx, "redis").and_then(|f| {
                let mut r = cx.object(&f)?;
                let redis_url = |cx: &mut Cx, f: &Field<'_>| {
                    let url = f.non_empty_str(cx)?;
                    if !url.starts_with("redis://") && !url.starts_with("rediss://") {
                        f.error(
                            cx,
                            "expected a redis:// URL (rediss:// for TLS), such as \
                             redis://127.0.0.1:6379/0",
                        );
                        return None;
                    }
                    Some(url.to_string())
                };
                let given: Vec<(&str, Field<'_>)> = ["url", "cluster", "sentinel"]
                    .into_iter()
                    .filter_map(|name| r.get(name).map(|f| (name, f)))
                    .collect();
                let mut wait_replicas = Some(0);
                let (nodes, cluster, sentinel) = match given.as_slice() {
                    [("url", f)] => (redis_url(cx, f).map(|u| vec![u]), false, None),
                    [("cluster", f)] => {
                        let nodes: Vec<Option<String>> =
                            f.items(cx).iter().map(|n| redis_url(cx, n)).collect();
                        if nodes.is_empty() {
                            f.error(cx, "name at least one node of the cluster");
                        }
                        (nodes.into_iter().collect::<Option<Vec<_>>>(), true, None)
                    }
                    [("sentinel", f)] => match cx.object(f) {
                        Some(mut s) => {
                            let master = match s.get("master") {
                                Some(m) => m.non_empty_str(cx).map(str::to_string),
                                None => {
                                    f.error(
                                    cx,
                                    "`master` (the name the sentinels monitor the master under) \
                                     is required",
                                );
                                    None
                                }
                            };
                            let nodes = match s.get("nodes") {
                                Some(n) => {
                                    let nodes: Vec<Option<String>> =
                                        n.items(cx).iter().map(|u| redis_url(cx, u)).collect();
                                    if nodes.is_empty() {
                                        n.error(cx, "name at least one sentinel");
                                    }
                                    nodes.into_iter().collect::<Option<Vec<_>>>()
                                }
                                None => {
                                    f.error(
                                        cx,
                                        "`nodes` (the sentinels, such as \
                                     [\"redis://10.0.0.5:26379\"]) is required",
                                    );
                                    None
                                }
                            };
                            wait_replicas = match s.get("wait_for_replicas") {
                                Some(w) => w.u64(cx).and_then(|n| match u32::try_from(n) {
                                    Ok(n) if n <= 16 => Some(n),
                                    _ => {
                                        w.error(cx, "expected a number of replicas from 0 to 16");
                                        None
                                    }
                                }),
                                None => Some(1),
                            };
                            s.finish(cx, &["master", "nodes", "wait_for_replicas"]);
                            (nodes, false, master)
                        }
                        None => (None, false, None),
                    },
                    [] => {
                        f.error(
                            cx,
                            "`url` (one server), `cluster` (the nodes of a Redis Cluster) or \
                         `sentinel` (a master behind Redis Sentinel) is required",
                        );
                        (None, false, None)
                    }
                    [_, (name, second), ..] => {
                        second.error(
                            cx,
                            format!(
                            "`{name}` cannot be given with `{}`: give one of `url` (one server), \
                             `cluster` (its nodes) or `sentinel` (the sentinels and the master's \
                             name)",
                            given[0].0
                        ),
                        );
                        (None, false, None)
                    }
                    [(_, _)] => unreachable!("only the three names are looked up"),
                };
                let nodes = nodes.filter(|n| !n.is_empty());
                let key_prefix = match r.get("key_prefix") {
                    Some(f) => f.str(cx).and_then(|p| {
                        if p.contains(['{', '}']) {
                            f.error(cx, "the key prefix may not contain `{` or `}` (hash tags)");
                            None
                        } else {
                            Some(p.to_string())
                        }
                    }),
                    None => Some("tollgate:".to_string()),
                };
                let ms =
                    |r: &mut tollgate_core::doc::Obj<'_>, cx: &mut Cx, name: &str, default: u64| {
                        match r.get(name) {
                            Some(f) => match f.duration_ms(cx) {
                                Some(0) => {
                                    f.error(cx, "must be more than 0");
                                    default
                                }
                                Some(v) => v,
                                None => default,
                            },
                            None => default,
                        }
                    };
                let timeout = ms(&mut r, cx, "timeout", 250);
                let lease_ttl = ms(&mut r, cx, "lease_ttl", 10_000);
                let sync_interval = ms(&mut r, cx, "sync_interval", 50);
                if sync_interval.saturating_mul(4) > lease_ttl {
                    if let Some(f) = r.get("sync_interval") {
                        f.error(
                        cx,
                        "must be at most a quarter of lease_ttl (leases are renewed at each sync)",
                    );
                    }
                }
                let slice_bp = match r.get("slice_percent") {
                    Some(f) => f.u64(cx).and_then(|p| {
                        if (1..=100).contains(&p) {
                            Some(p * 100)
                        } else {
                            f.error(cx, "expected a percent from 1 to 100");
                            None
                        }
                    }),
                    None => Some(100),
                };
                // A private CA for `rediss://`, read now so that a bad file is a config error.
                let ca = match r.get("ca_file") {
                    None => Some(None),
                    Some(f) => f.non_empty_str(cx).and_then(|path| {
                        let tls = nodes
                            .as_ref()
                            .is_some_and(|n| n.iter().all(|u: &String| u.starts_with("rediss://")));
                        if !tls {
                            f.error(cx, "a CA file is for TLS: the Redis URLs must be rediss://");
                            return None;
                        }
                        match read_ca(path) {
                            Ok(pem) => Some(Some(Arc::new(pem))),
                            Err(e) => {
                                f.error(cx, e);
                                None
                            }
                        }
                    }),
                };
                r.finish(
                    cx,
                    &[
                        "url",
                        "cluster",
                        "sentinel",
                        "key_prefix",
                        "timeout",
                        "lease_ttl",
                        "sync_interval",
                        "slice_percent",
                        "ca_file",
                    ],
                );
                Some(RedisConfig {
                    nodes: nodes?,
                    cluster,
                    sentinel: match given.first() {
                        Some(("sentinel", _)) => Some(sentinel?),
                        _ => None,
                    },
                    wait_replicas: wait_replicas?,
                    key_prefix: key_prefix?,
                    timeout: Duration::from_millis(timeout),
                    lease_ttl: Duration::from_millis(lease_ttl),
                    sync_interval: Duration::from_millis(sync_interval),
                    slice_bp: slice_bp?,
                    on_error: OnStoreError::FailClosed,
                    ca: ca?,
                })
            });
        let allowance = obj.get("local_allowance");
        let on_error = match obj.get("on_store_error") {
            None => Some(OnStoreError::FailClosed),
            Some(f) => match f.str(cx) {
                Some("fail_closed") => Some(OnStoreError::FailClosed),
                Some("local_allowance") => match &allowance {
                    Some(a) => a.money(cx).and_then(|m| {
                        if m.nanos() > 0 {
                            Some(OnStoreError::LocalAllowance(m.nanos()))
                        } else {
                            a.error(cx, "must be more than 0");
                            None
                        }
                    }),
                    None => {
                        f.error(
                            cx,
                            "`local_allowance` needs `store.local_allowance`: the USD each proxy \
                             may spend per budget while Redis cannot be reached",
                        );
                        None
                    }
                },
                Some(other) => {
                    f.error(
                        cx,
                        format!("expected `fail_closed` or `local_allowance`, found `{other}`"),
                    );
                    None
                }
                None => None,
            },
        };
        if let (Some(a), Some(OnStoreError::FailClosed)) = (&allowance, on_error) {
            a.error(cx, "applies only with `on_store_error: local_allowance`");
        }
        obj.finish(cx, &["redis", "on_store_error", "local_allowance"]);
        let mut redis = redis?;
        redis.on_error = on_error?;
        Some(StoreConfig { redis })
    }
}

/// The lease script: reports spend, sets this proxy's lease to what it still uses (plus what it
/// keeps free), gives lapsed leases back, and grants more if asked and the limit allows.
///
/// KEYS[1] the budget counter's hash. ARGV: proxy id, report sequence (0: none), spent to add,
/// in use, free to keep, least to grant (0: none), slice (the most to grant unless more are
/// waiting), limit, lease ttl ms, key expiry (unix ms), what the requests waiting here need.
/// Grants a quarter of what is left, at most a slice, at least what the waiting requests need,
/// never more than what is left. Returns {lease, granted, committed (perm + live leases), perm,
/// lapsed (0/1)}.
const SCRIPT: &str = r#"
local key = KEYS[1]
local me = ARGV[1]
local seq, spent = tonumber(ARGV[2]), tonumber(ARGV[3])
local inuse, keep = tonumber(ARGV[4]), tonumber(ARGV[5])
local wmin, wmax, limit = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local ttl = tonumber(ARGV[9])
local wneed = tonumber(ARGV[11])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if seq > 0 and spent ~= 0 then
  local last = tonumber(redis.call('HGET', key, 'q:' .. me) or '0')
  if seq > last then
    redis.call('HINCRBY', key, 'perm', spent)
    redis.call('HSET', key, 'q:' .. me, seq)
  end
end
local h = redis.call('HGETALL', key)
local perm, leases, exp = 0, {}, {}
for i = 1, #h, 2 do
  local f, v = h[i], h[i + 1]
  if f == 'perm' then perm = tonumber(v)
  elseif string.sub(f, 1, 2) == 'l:' then leases[string.sub(f, 3)] = tonumber(v)
  elseif string.sub(f, 1, 2) == 'e:' then exp[string.sub(f, 3)] = tonumber(v) end
end
local others, lapsed = 0, 0
for p, amount in pairs(leases) do
  if p == me then
    if (exp[p] or 0) <= now then lapsed = 1 end
  elseif (exp[p] or 0) <= now then
    redis.call('HDEL', key, 'l:' .. p, 'e:' .. p)
  else
    others = others + amount
  end
end
if lapsed == 1 or leases[me] == nil then keep = 0 end
local granted = 0
if wmin > 0 then
  local avail = limit - perm - others - inuse - keep
  if avail >= wmin then
    granted = math.floor(avail / 4)
    if granted > wmax then granted = wmax end
    if granted < wneed then granted = wneed end
    if granted < wmin then granted = wmin end
    if granted > avail then granted = avail end
  end
end
local lease = inuse + keep + granted
if lease > 0 then
  redis.call('HSET', key, 'l:' .. me, lease, 'e:' .. me, now + ttl)
else
  redis.call('HDEL', key, 'l:' .. me, 'e:' .. me)
end
redis.call('PEXPIREAT', key, ARGV[10], 'NX')
redis.call('PEXPIREAT', key, ARGV[10], 'GT')
return {lease, granted, perm + others + lease, perm, lapsed}
"#;

/// After a failed Redis call, how long requests that need Redis are refused at once instead of
/// each waiting for the timeout.
const DOWN_FOR_MS: u64 = 1_000;

#[derive(Debug, Default)]
struct Pool {
    /// An action count (`count/…`), not money.
    counts: bool,
    state: Mutex<Lease>,
    /// Serializes this pool's syncs (a sync writes the lease absolutely).
    io: tokio::sync::Mutex<()>,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lease> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

use lease::{Counter, RATE};

fn counter(key: &str) -> Counter<'_> {
    Counter::of(key)
}

/// A connection to one Redis server (multiplexed, reconnecting), to a Redis Cluster (routed
/// by key slot) or to the master behind Redis Sentinel (looked up again after a failure).
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
    Sentinel(sentinel::SentinelConn),
}

/// The budget store of a proxy in fleet mode (see the module doc).
#[derive(Clone)]
pub struct FleetStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    /// This process's id in lease fields: unique per start.
    id: String,
    local: MemoryStore,
    pools: DashMap<String, Arc<Pool>>,
    conn: tokio::sync::OnceCell<Conn>,
    script: redis::Script,
    loops: counts::Loops,
    loop_script: redis::Script,
    seq: AtomicU64,
    /// Until when (unix ms) Redis is taken as down after a failed call.
    down_until: AtomicU64,
    errors: AtomicU64,
}

impl std::fmt::Debug for FleetStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetStore").field("id", &self.inner.id).finish_non_exhaustive()
    }
}

/// Why Redis could not be used.
fn unavailable(reason: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable { reason: reason.to_string() }
}

impl FleetStore {
    /// A store over `config`; it connects on first use (and reconnects by itself).
    pub fn new(config: RedisConfig) -> anyhow::Result<FleetStore> {
        for url in &config.nodes {
            client(url.as_str(), config.ca.as_ref())
                .map_err(|e| anyhow::anyhow!("store.redis: `{}`: {e}", redact(url)))?;
        }
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "tollgate".into());
        let nonce = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            now().0,
        );
        let id = format!("{host}-{}-{:08x}", std::process::id(), nonce as u32);
        Ok(FleetStore {
            inner: Arc::new(Inner {
                config,
                id,
                local: MemoryStore::new(),
                pools: DashMap::new(),
                conn: tokio::sync::OnceCell::new(),
                script: redis::Script::new(SCRIPT),
                loops: counts::Loops::default(),
                loop_script: redis::Script::new(counts::LOOP_SCRIPT),
                seq: AtomicU64::new(0),
                down_until: AtomicU64::new(0),
                errors: AtomicU64::new(0),
            }),
        })
    }

    /// This process's id in the lease fields.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Failed Redis calls since start.
    pub fn errors(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    /// Whether the last Redis call failed less than a second ago.
    pub fn down(&self) -> bool {
        self.inner.down_until.load(Ordering::Relaxed) > now().0
    }

    fn pool(&self, base: &str) -> Arc<Pool> {
        if let Some(p) = self.inner.pools.get(base) {
            return p.clone();
        }
        let counts = base.starts_with(counts::COUNT);
        self.inner
            .pools
            .entry(base.to_string())
            .or_insert_with(|| Arc::new(Pool { counts, ..Pool::default() }))
            .clone()
    }

    fn key(&self, base: &str) -> String {
        format!("{}{{{base}}}", self.inner.config.key_prefix)
    }

    /// Gets more lease for `refill` from Redis. `Ok` when the pool can now cover it or Redis
    /// said the budget is exhausted (the retried reservation is then refused with the fleet's
    /// total); `Err` when Redis cannot be reached.
    pub async fn refill(&self, refill: &Refill) -> Result<(), StoreError> {
        let Counter::Committed(base) = counter(&refill.key) else {
            return Ok(());
        };
        let pool = self.pool(base);
        if self.down() {
            return self.borrow(&pool, refill.amount, "redis did not answer a moment ago");
        }
        pool.lock().waiting += refill.amount;
        let result = async {
            let _io = pool.io.lock().await;
            // Queued behind a call that failed: fail at once too, never one timeout each.
            if self.down() {
                return self.borrow(&pool, refill.amount, "redis did not answer a moment ago");
            }
            if pool.lock().covers(refill.amount, now()) {
                return Ok(());
            }
            match self
                .sync_locked(base, &pool, refill.amount, refill.limit, refill.expires_at, false)
                .await
            {
                Err(StoreError::Unavailable { reason }) => {
                    self.borrow(&pool, refill.amount, &reason)
                }
                other => other,
            }
        }
        .await;
        pool.lock().waiting -= refill.amount;
        result
    }

    /// Redis cannot be reached: with a local allowance left for this budget, adds `amount` to
    /// the lease (it is reserved at once by the request that asked); otherwise `Unavailable`.
    fn borrow(&self, pool: &Pool, amount: i64, reason: &str) -> Result<(), StoreError> {
        let OnStoreError::LocalAllowance(allowance) = self.inner.config.on_error else {
            return Err(unavailable(reason));
        };
        if pool.counts {
            // The allowance is money: counts fall back to this proxy's own counters instead.
            return Err(unavailable(reason));
        }
        let mut st = pool.lock();
        if !st.borrow(amount, allowance, now()) {
            return Err(unavailable(format!("{reason}, and the local allowance is spent")));
        }
        tracing::warn!(
            amount,
            borrowed = st.borrowed,
            allowance,
            "serving from the local allowance while Redis cannot be reached"
        );
        Ok(())
    }

    /// How long a lease lives without renewal.
    pub fn lease_ttl_ms(&self) -> u64 {
        self.inner.config.lease_ttl.as_millis() as u64
    }

    /// Whether rate limits should fall back to this proxy's own limiter (Redis cannot be
    /// reached and the outage policy is a local allowance).
    pub fn rates_local(&self) -> bool {
        self.local_fallback() && self.down()
    }

    /// Whether the outage policy is a local allowance (rate limits and action counts then fall
    /// back to this proxy's own counters).
    pub fn local_fallback(&self) -> bool {
        matches!(self.inner.config.on_error, OnStoreError::LocalAllowance(_))
    }

    /// One run of the script for `base`, under the pool's io lock.
    async fn sync_locked(
        &self,
        base: &str,
        pool: &Pool,
        want: i64,
        limit: i64,
        expires_at: UnixMillis,
        give_back: bool,
    ) -> Result<(), StoreError> {
        let cfg = &self.inner.config;
        let started = now();
        let args = pool.lock().prepare(
            want,
            limit,
            expires_at,
            give_back,
            cfg.slice_bp,
            base.starts_with(RATE) || base.starts_with(counts::COUNT),
            started,
            || self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1,
        );
        let answer = self.exchange(&self.inner.id, base, &args).await;
        let mut st = pool.lock();
        match answer {
            Ok(answer) => {
                if answer.lapsed {
                    tracing::warn!(budget = base, "fleet lease had lapsed (Redis unreachable for longer than lease_ttl?); renewed for the requests in flight");
                }
                st.applied(&args, answer, started, now(), cfg.lease_ttl.as_millis() as u64);
                Ok(())
            }
            Err(e) => {
                st.failed();
                Err(e)
            }
        }
    }

    /// Runs the lease script once for `holder` (this proxy, or an Envoy filter through the
    /// collector) on the counter `base`. A failure marks Redis down for a moment.
    pub async fn exchange(
        &self,
        holder: &str,
        base: &str,
        args: &SyncArgs,
    ) -> Result<SyncAnswer, StoreError> {
        let cfg = &self.inner.config;
        if args.limit > MAX_BUDGET_NANOS {
            return Err(unavailable(format!(
                "a limit of {} is above what the fleet store counts exactly ({MAX_BUDGET_NANOS})",
                args.limit
            )));
        }
        let mut invocation = self.inner.script.prepare_invoke();
        invocation
            .key(self.key(base))
            .arg(holder)
            .arg(args.seq)
            .arg(args.spent)
            .arg(args.inuse)
            .arg(args.keep)
            .arg(args.want)
            .arg(args.wmax)
            .arg(args.limit)
            .arg(cfg.lease_ttl.as_millis() as u64)
            .arg(args.expires_at)
            .arg(args.need);
        // One timeout over connecting and calling (and, behind Sentinel, the replicas' wait):
        // an exchange never waits longer.
        let answer: Result<(i64, i64, i64, i64, i64), StoreError> = self.invoke(&invocation).await;
        match answer {
            Ok((lease, granted, committed, perm, lapsed)) => {
                self.inner.down_until.store(0, Ordering::Relaxed);
                Ok(SyncAnswer { lease, granted, committed, perm, lapsed: lapsed == 1 })
            }
            Err(e) => {
                self.inner.errors.fetch_add(1, Ordering::Relaxed);
                self.inner.down_until.store(now().0 + DOWN_FOR_MS, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Runs a script, with one timeout over connecting and calling: no call waits longer.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let timeout = self.inner.config.timeout;
        let via = AtomicU64::new(0);
        let call = async {
            match self.connection().await? {
                Conn::Single(c) => invocation.invoke_async(&mut c.clone()).await,
                Conn::Cluster(c) => invocation.invoke_async(&mut c.clone()).await,
                Conn::Sentinel(s) => {
                    let (n, mut c) = s.get().await.map_err(unavailable)?;
                    via.store(n, Ordering::Relaxed);
                    let answer = invocation.invoke_async(&mut c).await.map_err(unavailable)?;
                    let want = self.inner.config.wait_replicas;
                    if want > 0 {
                        // Held by enough replicas, or not counted: a master that lost its
                        // replicas (deposed by a failover) cannot take writes that would vanish.
                        let got: u32 = redis::cmd("WAIT")
                            .arg(want)
                            .arg((timeout.as_millis() as u64 / 2).max(1))
                            .query_async(&mut c)
                            .await
                            .map_err(unavailable)?;
                        if got < want {
                            return Err(unavailable(format!(
                                "the write reached {got} of the {want} replicas asked for"
                            )));
                        }
                    }
                    return Ok(answer);
                }
            }
            .map_err(unavailable)
        };
        let answer = match tokio::time::timeout(timeout, call).await {
            Ok(answer) => answer,
            Err(_) => Err(unavailable(format!("no answer within {timeout:?}"))),
        };
        if let (Err(_), Some(Conn::Sentinel(s))) = (&answer, self.inner.conn.get()) {
            // The master may have moved: look it up again next time.
            s.failed(via.load(Ordering::Relaxed));
        }
        answer
    }

    async fn connection(&self) -> Result<&Conn, StoreError> {
        let cfg = &self.inner.config;
        let failed = |e: redis::RedisError| {
            unavailable(format!("connecting to {}: {e}", redact(&cfg.nodes[0])))
        };
        self.inner
            .conn
            .get_or_try_init(|| async {
                if let Some(master) = &cfg.sentinel {
                    return Ok(Conn::Sentinel(sentinel::SentinelConn::new(
                        cfg.nodes.clone(),
                        master.clone(),
                        cfg.timeout,
                        cfg.ca.clone(),
                    )));
                }
                if cfg.cluster {
                    let mut builder = redis::cluster::ClusterClient::builder(cfg.nodes.clone());
                    if let Some(pem) = &cfg.ca {
                        builder = builder.certs(redis::TlsCertificates {
                            client_tls: None,
                            root_cert: Some(pem.to_vec()),
                        });
                    }
                    let client = builder
                        .connection_timeout(cfg.timeout)
                        .response_timeout(cfg.timeout)
                        .retries(1)
                        .build()
                        .map_err(failed)?;
                    return client.get_async_connection().await.map(Conn::Cluster).map_err(failed);
                }
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(cfg.timeout))
                    .set_response_timeout(Some(cfg.timeout))
                    .set_number_of_retries(1);
                let client = client(cfg.nodes[0].as_str(), cfg.ca.as_ref()).map_err(failed)?;
                client
                    .get_connection_manager_with_config(config)
                    .await
                    .map(Conn::Single)
                    .map_err(failed)
            })
            .await
    }

    /// Reports spend, renews leases and gives idle ones back, once. Returns the Redis calls that
    /// failed.
    pub async fn sync_all(&self, give_back: bool) -> usize {
        let t = now();
        let renew_after = self.inner.config.lease_ttl.as_millis() as u64 / 3;
        let due: Vec<(String, Arc<Pool>, bool)> = self
            .inner
            .pools
            .iter()
            .filter_map(|e| {
                let st = e.value().lock();
                // An action count's lease stays while the fleet has committed at most half the
                // limit (nobody is short of it then): an agent calling now and then is still
                // counted without a round trip. Money and rate leases go back when idle.
                let plenty = e.value().counts && st.fleet_committed.saturating_mul(2) <= st.limit;
                let back = st.sync_due(t, renew_after, give_back, plenty)?;
                Some((e.key().clone(), e.value().clone(), back))
            })
            .collect();
        let mut failed = 0;
        for chunk in due.chunks(64) {
            let mut runs = tokio::task::JoinSet::new();
            for (base, pool, back) in chunk.iter().cloned() {
                let store = self.clone();
                runs.spawn(async move {
                    let _io = pool.io.lock().await;
                    store.sync_locked(&base, &pool, 0, 0, UnixMillis(0), back).await
                });
            }
            while let Some(r) = runs.join_next().await {
                if let Ok(Err(e)) = r {
                    failed += 1;
                    tracing::warn!(error = %e, "fleet store sync");
                }
            }
        }
        failed
    }

    /// Syncs every `sync_interval` until `stop`; then reports what is left and gives every
    /// lease back.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.inner.config.sync_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
            self.sync_all(false).await;
            if let Err(e) = self.sync_loops().await {
                tracing::warn!(error = %e, "fleet store: loop counts");
            }
        }
        self.shutdown().await;
    }

    /// Reports what is left and gives every free lease back (bounded in time by the timeout).
    pub async fn shutdown(&self) {
        let _ = self.sync_loops().await;
        for _ in 0..3 {
            if self.sync_all(true).await == 0 {
                break;
            }
        }
    }

    /// The budget's committed total and spend as this proxy sees them (for the admin listing).
    fn estimate(&self, base: &str, spent: bool) -> i64 {
        let Some(pool) = self.inner.pools.get(base).map(|p| p.clone()) else { return 0 };
        let st = pool.lock();
        if spent {
            st.spent()
        } else {
            st.committed()
        }
    }
}

impl Store for FleetStore {
    fn get(&self, key: &str) -> Result<i64, StoreError> {
        match counter(key) {
            Counter::Committed(base) => Ok(self.estimate(base, false)),
            Counter::Spent(base) => Ok(self.estimate(base, true)),
            Counter::Other => self.inner.local.get(key),
        }
    }

    fn add(&self, key: &str, delta: i64, expires_at: UnixMillis) -> Result<i64, StoreError> {
        match counter(key) {
            Counter::Committed(base) => {
                let pool = self.pool(base);
                let total = pool.lock().add_used(delta, expires_at);
                Ok(total)
            }
            Counter::Spent(base) => {
                let pool = self.pool(base);
                let total = pool.lock().add_spent(delta);
                Ok(total)
            }
            Counter::Other => self.inner.local.add(key, delta, expires_at),
        }
    }

    fn add_if_within(
        &self,
        key: &str,
        delta: i64,
        limit: i64,
        expires_at: UnixMillis,
    ) -> Result<AddOutcome, StoreError> {
        let Counter::Committed(base) = counter(key) else {
            return self.inner.local.add_if_within(key, delta, limit, expires_at);
        };
        let pool = self.pool(base);
        let taken = pool.lock().try_take(delta, limit, expires_at, now());
        taken.map_err(|Shortfall::Short| {
            StoreError::Short(Box::new(Refill {
                key: key.to_string(),
                amount: delta,
                limit,
                expires_at,
            }))
        })
    }

    fn insert_if_absent(&self, key: &str, expires_at: UnixMillis) -> Result<bool, StoreError> {
        self.inner.local.insert_if_absent(key, expires_at)
    }

    fn put_hold(&self, hold: &Hold) -> Result<bool, StoreError> {
        self.inner.local.put_hold(hold)
    }

    fn take_hold(&self, request_id: &str) -> Result<Taken, StoreError> {
        self.inner.local.take_hold(request_id)
    }

    fn take_expired_holds(
        &self,
        now: UnixMillis,
        max: usize,
        lapse_until: UnixMillis,
    ) -> Result<Vec<Hold>, StoreError> {
        self.inner.local.take_expired_holds(now, max, lapse_until)
    }

    fn prune(&self, now: UnixMillis) -> Result<usize, StoreError> {
        // Past its counter's expiry nothing can settle on a pool any more (a rate window has
        // ended, a budget's retention is over), and Redis drops the key then too.
        self.inner.pools.retain(|_, p| {
            let st = p.lock();
            st.expires_at > now || st.expires_at.0 == 0
        });
        self.inner.local.prune(now)
    }
}

/// The proxy's budget store: in memory (one process), or shared by the fleet through Redis.
#[derive(Debug)]
pub enum BudgetStore {
    Local(MemoryStore),
    Fleet(FleetStore),
}

impl BudgetStore {
    pub fn fleet(&self) -> Option<&FleetStore> {
        match self {
            BudgetStore::Fleet(f) => Some(f),
            BudgetStore::Local(_) => None,
        }
    }
}

macro_rules! both {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            BudgetStore::Local($s) => $e,
            BudgetStore::Fleet($s) => $e,
        }
    };
}

impl Store for BudgetStore {
    fn get(&self, key: &str) -> Result<i64, StoreError> {
        both!(self, s => s.get(key))
    }
    fn add(&self, key: &str, delta: i64, expires_at: UnixMillis) -> Result<i64, StoreError> {
        both!(self, s => s.add(key, delta, expires_at))
    }
    fn add_if_within(
        &self,
        key: &str,
        delta: i64,
        limit: i64,
        expires_at: UnixMillis,
    ) -> Result<AddOutcome, StoreError> {
        both!(self, s => s.add_if_within(key, delta, limit, expires_at))
    }
    fn insert_if_absent(&self, key: &str, expires_at: UnixMillis) -> Result<bool, StoreError> {
        both!(self, s => s.insert_if_absent(key, expires_at))
    }
    fn put_hold(&self, hold: &Hold) -> Result<bool, StoreError> {
        both!(self, s => s.put_hold(hold))
    }
    fn take_hold(&self, request_id: &str) -> Result<Taken, StoreError> {
        both!(self, s => s.take_hold(request_id))
    }
    fn take_expired_holds(
        &self,
        now: UnixMillis,
        max: usize,
        lapse_until: UnixMillis,
    ) -> Result<Vec<Hold>, StoreError> {
        both!(self, s => s.take_expired_holds(now, max, lapse_until))
    }
    fn prune(&self, now: UnixMillis) -> Result<usize, StoreError> {
        both!(self, s => s.prune(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_recognised_by_their_engine_keys() {
        assert!(matches!(
            counter("budget/2:cc/3:eng/2026-12/committed"),
            Counter::Committed("2:cc/3:eng/2026-12")
        ));
        assert!(matches!(counter("budget/2:cc/3:eng/2026-12/spent"), Counter::Spent(_)));
        assert!(matches!(counter("budget-settled/r1"), Counter::Other));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://user:secret@10.0.0.1:6379/0"), "redis://***@10.0.0.1:6379/0");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
