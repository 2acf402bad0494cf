//! The running proxy: shared state, startup, background tasks and shutdown.
//!
//! `run` binds the proxy and admin listeners and serves until SIGTERM/SIGINT. `App::start` is the
//! same thing with injected listeners and shutdown future, used by the end-to-end tests.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;

use tollgate_core::budget::{Budgets, MemoryStore, Scope};

use crate::config::Config;
use crate::fleet::BudgetStore;
use crate::ledger::{self, Ledger};
use crate::limits::RateLimits;
use crate::metrics::Metrics;
use crate::server::{self, ConnLimits};
use crate::state::{Current, Shared};
use crate::upstream::{self, ClientSettings};

/// Command-line overrides of the config file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
}

/// Handles to a started proxy (tests use the addresses; `run` waits on `done`).
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Waits until both servers have drained and the ledger is flushed.
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

/// Runs until SIGTERM or SIGINT.
pub async fn run(mut config: Config, overrides: Overrides) -> anyhow::Result<()> {
    if let Some(addr) = overrides.listen {
        config.listen = addr;
    }
    if let Some(addr) = overrides.admin_listen {
        config.admin_listen = addr;
    }
    if let Some(dir) = overrides.data_dir {
        config.data_dir = dir;
    }
    let proxy = crate::server::bind(config.listen)
        .with_context(|| format!("binding the proxy listener {}", config.listen))?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener {}", config.admin_listen))?;
    let running = start(config, proxy, admin, shutdown_signal()).await?;
    tracing::info!(proxy = %running.proxy_addr, admin = %running.admin_addr, "tollgate listening");
    running.wait().await;
    tracing::info!("tollgate stopped");
    Ok(())
}

/// Starts the proxy and admin servers on the given listeners; they stop when `shutdown`
/// resolves.
pub async fn start(
    config: Config,
    proxy: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Running> {
    start_with(config, proxy, admin, shutdown, Hooks::default()).await
}

/// Test hooks: failures injected below the proxy's own code.
#[derive(Clone, Debug, Default)]
pub struct Hooks {
    /// While set, every ledger write and sync fails like a full disk.
    pub ledger_fault: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// [`start`] with [`Hooks`].
pub async fn start_with(
    config: Config,
    proxy: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    hooks: Hooks,
) -> anyhow::Result<Running> {
    let (client, h1_pool) = upstream::clients(&ClientSettings {
        connect_timeout: config.upstream.connect_timeout,
        extra_ca_file: config.upstream.extra_ca_file.clone(),
        overrides: config
            .forward
            .overrides
            .iter()
            .map(|o| (o.host.clone(), o.addr, o.ca_file.clone()))
            .collect(),
        ..ClientSettings::default()
    })?;
    let conn_limits = ConnLimits {
        max_head_bytes: config.limits.max_head_bytes,
        max_headers: config.limits.max_headers,
        header_read_timeout: config.limits.header_read_timeout,
        drain: config.shutdown_drain,
        max_connections: config.limits.max_connections,
        shed: None,
    };
    let admin_connections = config.limits.max_admin_connections;
    let forward = match (&config.forward, &config.forward.ca_cert, &config.forward.ca_key) {
        (f, Some(cert), Some(key)) if f.enabled => {
            let ca = crate::ca::Ca::load(cert, key)?;
            tracing::info!(ca = %cert.display(), other_hosts = ?f.other_hosts, "forward proxy (HTTP_PROXY / HTTPS_PROXY) enabled");
            Some(Arc::new(crate::forward::Forward::new(ca, conn_limits.clone())))
        }
        _ => None,
    };
    let metrics = Metrics::new(config.max_label_values);
    let ledger_errors = metrics.ledger_errors.clone();
    let settings = ledger::Settings {
        data_dir: config.data_dir.clone(),
        fsync_interval: config.ledger_fsync_interval,
        segment_bytes: config.ledger_segment_bytes,
        fault: hooks.ledger_fault.clone(),
        hmac_key: match &config.ledger_hmac_key {
            Some(source) => Some(source.load()?),
            None => None,
        },
        accept_corrupt: config.ledger_accept_corrupt.clone(),
        encoding: config.ledger_encoding,
        retention: config.ledger_retention,
        acknowledge: config.export.is_some(),
        volume_bytes: config.ledger_volume_bytes,
    };
    let now = crate::clock::now();
    let (ledger, recovered) = if config.ledger_enabled {
        Ledger::open(settings, move || ledger_errors.inc(), now.0)
            .with_context(|| format!("opening the ledger in {}", config.data_dir.display()))?
    } else {
        tracing::warn!("the ledger is DISABLED (ledger.enabled: false): requests are not recorded");
        (Ledger::disabled(&config.data_dir), ledger::Recovered::default())
    };
    if recovered.truncated_bytes > 0 {
        tracing::warn!(bytes = recovered.truncated_bytes, "repaired a torn tail left by a crash");
    }
    metrics.ledger_corrupt_records.set(recovered.corrupt_accepted as i64);
    if recovered.corrupt_accepted > 0 {
        tracing::error!(
            records = recovered.corrupt_accepted,
            "STARTED WITHOUT CORRUPT LEDGER RECORDS (ledger.accept_corrupt): their costs are \
             missing from the budgets; `tollgate audit verify` names them"
        );
    }
    let (budgets, rebuilt) = match &config.store {
        None => {
            let budgets = Budgets::new(BudgetStore::Local(MemoryStore::new()));
            let rebuilt =
                rebuild_budgets(&budgets, config.engine.policy(), &recovered.records, now);
            (budgets, rebuilt)
        }
        // Redis keeps the fleet's budgets across restarts: replaying this proxy's ledger into
        // them would count its spend twice.
        Some(store) => {
            let fleet = crate::fleet::FleetStore::new(store.redis.clone())?;
            tracing::info!(
                redis = %crate::fleet::redact(&store.redis.nodes[0]),
                cluster = store.redis.cluster,
                sentinel = store.redis.sentinel.as_deref().unwrap_or("-"),
                id = fleet.id(),
                "budgets shared by the fleet through Redis (fleet mode)"
            );
            (Budgets::new(BudgetStore::Fleet(fleet)), Rebuilt::default())
        }
    };
    tracing::info!(
        segments = recovered.segments,
        replayed = recovered.records.len(),
        settled = rebuilt.settled,
        reopened = rebuilt.reopened,
        audit_records = recovered.audit_records,
        "ledger opened"
    );
    let ingest = crate::ingest::Ingest::from_records(&recovered.records);
    let admin_token = std::env::var(&config.admin_token_env).ok().filter(|t| !t.is_empty());
    if admin_token.is_none() {
        tracing::warn!(
            env = %config.admin_token_env,
            "no admin token set: the admin API answers 401 (metrics and health stay open)"
        );
    }
    let (oversight, approvals) = crate::oversight::Oversight::open(
        config.oversight.clone(),
        config.autonomy_configured,
        &config.routes,
        &config.data_dir,
        now,
        match &config.store {
            Some(store) => {
                Some(Arc::new(crate::fleet::oversight::SharedOversight::new(&store.redis)?))
            }
            None => None,
        },
    )
    .with_context(|| format!("opening the approvals journal in {}", config.data_dir.display()))?;
    tracing::info!(
        pending = approvals.pending,
        total = approvals.total,
        skipped = approvals.skipped,
        "approvals replayed"
    );
    let (alerts, delivering) = crate::alerts::open(&config.alerts, &config.data_dir, &metrics)?;
    metrics.set_policy_version(config.engine.policy().version());
    let traces = crate::traces::Traces::start(&config.traces, client.clone())
        .context("starting the traces exporter (traces:)")?;
    let shared = Arc::new(Shared {
        current: ArcSwap::from_pointee(Current::new(config)),
        client,
        h1_pool,
        forward,
        metrics,
        ledger,
        ingest,
        budgets,
        rate_limits: RateLimits::default(),
        admin_token,
        started: std::time::Instant::now(),
        draining: std::sync::atomic::AtomicBool::new(false),
        reload_state: Default::default(),
        seen: Default::default(),
        oversight,
        alerts,
        traces,
    });
    for (scope, value) in &rebuilt.keys {
        shared.saw(*scope, value);
    }

    let proxy_addr = proxy.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let proxy_task = tokio::spawn(server::serve(
        proxy,
        crate::pipeline::Proxy::new(shared.clone()),
        ConnLimits {
            shed: Some(shared.metrics.shed.with_label_values(&["connections"])),
            ..conn_limits.clone()
        },
        stopped(stop_rx.clone()),
    ));
    let admin_task = tokio::spawn(server::serve(
        admin,
        crate::admin::Admin::new(shared.clone()),
        // The admin API: operators and the scraper, and on a collector the whole fleet (each
        // sidecar's export, each Envoy worker's usage events, leases and approvals).
        ConnLimits {
            drain: Duration::from_secs(1),
            max_connections: admin_connections,
            ..conn_limits
        },
        stopped(stop_rx.clone()),
    ));
    // The export ships what the drain adds too: it stops after the ledger's last flush.
    let (export_stop, export_stop_rx) = watch::channel(false);
    let export = shared.current().config.export.clone().map(|export| {
        tokio::spawn(crate::export::run(
            shared.client.clone(),
            shared.current().config.data_dir.clone(),
            export,
            export_stop_rx,
        ))
    });
    let delivering =
        delivering.map(|d| tokio::spawn(d.run(shared.client.clone(), stop_rx.clone())));
    let sweeper = tokio::spawn(sweep_approvals(shared.clone(), stop_rx.clone()));
    let background = tokio::spawn(crate::reload::background(shared.clone(), stop_rx));
    // The fleet store reports spend until the last request has settled, then gives its leases
    // back: it stops after the listeners have drained.
    let (fleet_stop, fleet_stop_rx) = watch::channel(false);
    let fleet = shared.budgets.store().fleet().cloned().map(|f| {
        if let Some(detector) = &shared.oversight.loops {
            f.configure_loops(detector.config());
        }
        tokio::spawn(f.run(fleet_stop_rx))
    });

    let done = {
        let shared = shared.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down: draining in-flight requests");
            shared.draining.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = stop_tx.send(true);
            // Intercepted HTTPS_PROXY connections drain alongside the listener's own.
            let intercepted = async {
                if let Some(forward) = &shared.forward {
                    forward.drain(shared.current().config.shutdown_drain).await;
                }
            };
            let _ = tokio::join!(proxy_task, intercepted);
            let _ = fleet_stop.send(true);
            if let Some(fleet) = fleet {
                let _ = fleet.await;
            }
            let _ = admin_task.await;
            let _ = background.await;
            let _ = sweeper.await;
            if let Some(delivering) = delivering {
                let _ = delivering.await;
            }
            // Alerts raised while draining are on disk, delivered after the next start.
            shared.alerts.flush().await;
            shared.ledger.flush().await;
            let _ = export_stop.send(true);
            if let Some(export) = export {
                let _ = export.await;
            }
            shared.traces.shutdown(Duration::from_secs(5)).await;
        })
    };
    Ok(Running { proxy_addr, admin_addr, shared, done })
}

/// Settles timed-out approvals every `oversight.sweep_interval` until shutdown (lookups apply
/// timeouts too, so this only bounds how late the audit log learns of one).
async fn sweep_approvals(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(shared.current().config.oversight.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let s = shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            s.oversight.sweep(&s.ledger);
            s.oversight.sync_disabled();
        })
        .await;
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// The value of a budget scope in a record's attribution.
fn scope_value<'a>(
    agent: &'a str,
    project: &'a str,
    cost_center: &'a str,
    business_unit: Option<&'a str>,
    scope: Scope,
) -> Option<&'a str> {
    match scope {
        Scope::Agent => Some(agent),
        Scope::Project => Some(project),
        Scope::CostCenter => Some(cost_center),
        Scope::BusinessUnit => business_unit,
        Scope::Global => None,
    }
}

/// What [`rebuild_budgets`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rebuilt {
    pub settled: usize,
    pub reopened: usize,
    /// The scope values with a per-value budget state (for the admin budget listing, which
    /// otherwise only knows the values seen since start).
    pub keys: std::collections::BTreeSet<(Scope, String)>,
}

/// Replays the ledger's recent records into fresh budgets: every settled request is charged in
/// the window it was reserved in; reservations that were open when the process stopped (their
/// requests died with it, but may have cost money upstream) are held again until they expire.
/// Budgets are looked up by id in the current policy; ids it no longer has are skipped.
pub fn rebuild_budgets(
    budgets: &Budgets<BudgetStore>,
    policy: &tollgate_core::policy::Snapshot,
    records: &[crate::ledger::Stored],
    now: tollgate_core::time::UnixMillis,
) -> Rebuilt {
    use crate::ledger::{Entry, ReserveRecord};
    use tollgate_core::time::UnixMillis;
    let specs = |ids: &[String]| -> Vec<tollgate_core::budget::BudgetSpec> {
        policy.all_budgets().filter(|b| ids.contains(&b.id)).cloned().collect()
    };
    let mut open: std::collections::HashMap<&str, &ReserveRecord> = Default::default();
    let mut rebuilt = Rebuilt::default();
    for stored in records {
        // Reservations are keyed by their own unique id; old records only had the request id.
        match &stored.entry {
            Entry::Reserve(r) => {
                open.insert(r.reservation_key(), r);
            }
            Entry::Usage(r) => {
                let id = r.reservation_key();
                open.remove(id);
                let specs = specs(&r.budgets);
                if specs.is_empty() {
                    continue;
                }
                let values = |scope: Scope| {
                    scope_value(
                        &r.agent,
                        &r.project,
                        &r.cost_center,
                        r.business_unit.as_deref(),
                        scope,
                    )
                };
                let at = UnixMillis(r.reserved_at_ms);
                if budgets.charge(specs.iter(), values, r.cost_total(), id, at).is_ok() {
                    rebuilt.settled += 1;
                    note_keys(&mut rebuilt.keys, &specs, values);
                }
            }
            Entry::Other => {}
        }
    }
    for (id, r) in open {
        let expires = r.expires_at_ms;
        if expires <= now.0 {
            continue;
        }
        let specs = specs(&r.budgets);
        let values = |scope: Scope| {
            scope_value(&r.agent, &r.project, &r.cost_center, r.business_unit.as_deref(), scope)
        };
        let at = UnixMillis(r.reserved_at_ms);
        // Held again, in the window it was made in, until its original expiry.
        if let Ok(reservation) =
            budgets.reserve(specs.iter(), values, r.amount, id, at, expires.saturating_sub(at.0))
        {
            // The hold stays in the store until `expire` gives it back.
            drop(reservation);
            rebuilt.reopened += 1;
            note_keys(&mut rebuilt.keys, &specs, values);
        }
    }
    rebuilt
}

/// Adds the scope value of every per-value (keyless, non-global) budget in `specs`.
fn note_keys<'a>(
    keys: &mut std::collections::BTreeSet<(Scope, String)>,
    specs: &[tollgate_core::budget::BudgetSpec],
    values: impl Fn(Scope) -> Option<&'a str>,
) {
    for spec in specs.iter().filter(|s| s.key.is_none() && s.scope != Scope::Global) {
        if let Some(value) = values(spec.scope) {
            keys.insert((spec.scope, value.to_string()));
        }
    }
}
