//! Alerts: webhooks on budget thresholds crossed, new pending approvals, agents disabled by
//! error escalation and circuit breakers opening, delivered from a durable outbox.
//!
//! The request path only hands an [`Event`] to a bounded queue ([`Alerts::raise`]: no disk, no
//! network, never waits). A writer thread appends each batch to the outbox
//! (`<data_dir>/alerts/outbox.jsonl`, see [`outbox`]), one delivery per interested receiver,
//! and syncs it; only then does the event count as raised and go to the delivery task. The
//! delivery task posts each delivery (signed, see [`event::signature`]) and marks it done after
//! a 2xx; a failure is retried with exponential backoff and jitter, until `max_attempts` or
//! `max_age`, after which it is dropped with an error log line and
//! `tollgate_alerts_dropped_total`. On start, every delivery left in the outbox is delivered.
//!
//! So delivery is at least once: a delivery acknowledged just before a crash (its `done` line
//! not yet on disk) is made again after the restart, with the same event id in the body and in
//! `x-tollgate-event-id` for the receiver to deduplicate. Like the ledger's records, a `SIGKILL`
//! loses only events still queued for the writer (the last milliseconds); `SIGTERM` loses none
//! ([`Alerts::flush`] runs at shutdown).

pub mod config;
pub mod event;
pub mod outbox;

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use prometheus::{IntCounterVec, IntGauge};
use tokio::sync::{mpsc as tmpsc, oneshot, watch};
use tokio::time::Instant;

use crate::clock::now;
use crate::upstream::UpstreamClient;
use config::{AlertsConfig, Kind, Webhook};
pub use event::{Detail, Event};
use outbox::{Delivery, Outbox};

/// Events waiting for the writer; past it an event is dropped (logged and counted) rather than
/// the request path waiting.
const QUEUE: usize = 4096;
/// Deliveries posted at once.
const MAX_IN_FLIGHT: usize = 16;

enum Msg {
    Raise(Box<Event>),
    Flush(oneshot::Sender<()>),
}

/// The alert metrics (handles into the registry).
#[derive(Clone)]
pub struct Counters {
    pub sent: IntCounterVec,
    pub failed: IntCounterVec,
    pub dropped: IntCounterVec,
    pub pending: IntGauge,
}

impl Counters {
    fn of(m: &crate::metrics::Metrics) -> Counters {
        Counters {
            sent: m.alerts_sent.clone(),
            failed: m.alerts_failed.clone(),
            dropped: m.alerts_dropped.clone(),
            pending: m.alerts_pending.clone(),
        }
    }
}

/// The handle the request path raises alerts with.
pub struct Alerts {
    tx: Option<SyncSender<Msg>>,
    /// Whether any receiver wants each [`Kind`].
    wanted: [bool; 4],
    dropped: Option<IntCounterVec>,
}

impl Alerts {
    /// No receivers: raising does nothing.
    pub fn disabled() -> Alerts {
        Alerts { tx: None, wanted: [false; 4], dropped: None }
    }

    /// Whether an event of `kind` would go anywhere (to skip building one).
    pub fn wants(&self, kind: Kind) -> bool {
        self.wanted[kind as usize]
    }

    /// Raises an alert: queues it for the outbox writer without waiting.
    pub fn raise(&self, detail: Detail) {
        let kind = detail.kind();
        if !self.wants(kind) {
            return;
        }
        let Some(tx) = &self.tx else { return };
        let at = now();
        let event = Event { id: new_event_id(), time: at.to_string(), time_ms: at.0, detail };
        match tx.try_send(Msg::Raise(Box::new(event))) {
            Ok(()) => {}
            Err(TrySendError::Full(Msg::Raise(e))) => {
                tracing::error!(event_id = %e.id, event = kind.as_str(),
                    "alert dropped: the outbox queue is full");
                if let Some(d) = &self.dropped {
                    d.with_label_values(&[kind.as_str()]).inc();
                }
            }
            Err(_) => tracing::error!(event = kind.as_str(), "alert dropped: the outbox is closed"),
        }
    }

    /// Waits until every alert raised before the call is in the outbox on disk.
    pub async fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = oneshot::channel();
        let tx = tx.clone();
        // `send` blocks while the queue is full: off the runtime's threads.
        let sent = tokio::task::spawn_blocking(move || tx.send(Msg::Flush(done)).is_ok()).await;
        if matches!(sent, Ok(true)) {
            let _ = wait.await;
        }
    }
}

/// A receiver with its signing key.
struct Target {
    hook: Webhook,
    secret: Vec<u8>,
}

/// The delivery task, to spawn with [`Delivering::run`].
pub struct Delivering {
    receivers: Arc<Vec<Target>>,
    config: AlertsConfig,
    outbox: Arc<Mutex<Outbox>>,
    initial: Vec<Delivery>,
    rx: tmpsc::UnboundedReceiver<Vec<Delivery>>,
    counters: Counters,
}

/// Opens the outbox under `data_dir` and starts its writer thread. Returns the handle, and the
/// delivery task to spawn (`None` without receivers). Fails when a receiver's `secret_env` is
/// unset or empty, or the outbox cannot be opened.
pub fn open(
    config: &AlertsConfig,
    data_dir: &Path,
    metrics: &crate::metrics::Metrics,
) -> anyhow::Result<(Alerts, Option<Delivering>)> {
    if !config.enabled() {
        return Ok((Alerts::disabled(), None));
    }
    let mut receivers = Vec::new();
    for hook in &config.webhooks {
        let secret = std::env::var(&hook.secret_env).ok().filter(|s| !s.is_empty());
        let secret = secret.with_context(|| {
            format!(
                "alerts webhook {}: the signing key variable {} is unset or empty",
                hook.host(),
                hook.secret_env
            )
        })?;
        receivers.push(Target { hook: hook.clone(), secret: secret.into_bytes() });
    }
    let dir = data_dir.join("alerts");
    let (outbox, opened) = Outbox::open(&dir)
        .with_context(|| format!("opening the alerts outbox in {}", dir.display()))?;
    if opened.skipped > 0 {
        tracing::warn!(lines = opened.skipped, "alerts outbox: skipped unreadable lines");
    }
    tracing::info!(pending = opened.pending.len(), "alerts outbox opened");
    let counters = Counters::of(metrics);
    for kind in Kind::ALL {
        for c in [&counters.sent, &counters.failed, &counters.dropped] {
            c.with_label_values(&[kind.as_str()]);
        }
    }
    counters.pending.set(opened.pending.len() as i64);
    let outbox = Arc::new(Mutex::new(outbox));
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let (to_deliver, deliveries) = tmpsc::unbounded_channel();
    let routing: Vec<(String, Vec<Kind>)> =
        config.webhooks.iter().map(|w| (w.key(), w.events.clone())).collect();
    {
        let (outbox, counters) = (outbox.clone(), counters.clone());
        std::thread::Builder::new()
            .name("tollgate-alerts".into())
            .spawn(move || write_loop(rx, &outbox, &routing, &to_deliver, &counters))
            .context("starting the alerts writer")?;
    }
    let mut wanted = [false; 4];
    for w in &config.webhooks {
        for k in &w.events {
            wanted[*k as usize] = true;
        }
    }
    let alerts = Alerts { tx: Some(tx), wanted, dropped: Some(counters.dropped.clone()) };
    let delivering = Delivering {
        receivers: Arc::new(receivers),
        config: config.clone(),
        outbox,
        initial: opened.pending,
        rx: deliveries,
        counters,
    };
    Ok((alerts, Some(delivering)))
}

/// The writer thread: takes what is queued, appends it to the outbox (synced), then hands it
/// to the delivery task. Ends when every [`Alerts`] handle is gone.
fn write_loop(
    rx: Receiver<Msg>,
    outbox: &Mutex<Outbox>,
    routing: &[(String, Vec<Kind>)],
    to_deliver: &tmpsc::UnboundedSender<Vec<Delivery>>,
    counters: &Counters,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
            if batch.len() >= 256 {
                break;
            }
        }
        let mut deliveries = Vec::new();
        let mut flushes = Vec::new();
        for msg in batch {
            match msg {
                Msg::Raise(event) => {
                    let kind = event.detail.kind();
                    for (n, (key, events)) in routing.iter().enumerate() {
                        if events.contains(&kind) {
                            deliveries.push(Delivery {
                                id: format!("{}.{n}", event.id),
                                receiver: key.clone(),
                                event: (*event).clone(),
                            });
                        }
                    }
                }
                Msg::Flush(done) => flushes.push(done),
            }
        }
        if !deliveries.is_empty() {
            let written = outbox.lock().unwrap_or_else(PoisonError::into_inner).append(&deliveries);
            if let Err(e) = written {
                // Still delivered while the process runs; a restart before then loses them.
                tracing::error!(error = %e, deliveries = deliveries.len(),
                    "alerts outbox: cannot write; delivering from memory only");
            }
            counters.pending.add(deliveries.len() as i64);
            let _ = to_deliver.send(deliveries);
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

/// A delivery's place in the schedule.
struct Slot {
    delivery: Delivery,
    receiver: usize,
    attempts: u32,
    next_at: Instant,
    in_flight: bool,
}

impl Delivering {
    /// Delivers until `stop` turns true. Deliveries still in the outbox then are made after the
    /// next start.
    pub async fn run(mut self, client: UpstreamClient, mut stop: watch::Receiver<bool>) {
        let mut slots: HashMap<String, Slot> = HashMap::new();
        let initial = std::mem::take(&mut self.initial);
        self.schedule(&mut slots, initial).await;
        let mut attempts = tokio::task::JoinSet::new();
        loop {
            let now_at = Instant::now();
            let mut next_due: Option<Instant> = None;
            let mut in_flight = slots.values().filter(|s| s.in_flight).count();
            for (id, slot) in slots.iter_mut().filter(|(_, s)| !s.in_flight) {
                if slot.next_at <= now_at && in_flight < MAX_IN_FLIGHT {
                    slot.in_flight = true;
                    in_flight += 1;
                    let receiver = &self.receivers[slot.receiver];
                    let post = post(
                        client.clone(),
                        &receiver.hook,
                        &receiver.secret,
                        &slot.delivery.event,
                        self.config.timeout,
                    );
                    let id = id.clone();
                    attempts.spawn(async move { (id, post.await) });
                } else if slot.next_at > now_at {
                    next_due = Some(next_due.map_or(slot.next_at, |d| d.min(slot.next_at)));
                }
                // Due but over MAX_IN_FLIGHT: taken when an attempt ends (which wakes the loop).
            }
            let sleep = async {
                match next_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            // Decided first, acted on after: the stop signal's guard must not live across
            // the awaits below.
            enum Wake {
                Batch(Vec<Delivery>),
                Done(String, Result<(), String>),
                Tick,
                Stop,
            }
            let wake = tokio::select! {
                Some(batch) = self.rx.recv() => Wake::Batch(batch),
                Some(done) = attempts.join_next(), if !attempts.is_empty() => match done {
                    Ok((id, result)) => Wake::Done(id, result),
                    Err(_) => Wake::Tick,
                },
                () = sleep => Wake::Tick,
                _ = stop.wait_for(|s| *s) => Wake::Stop,
            };
            match wake {
                Wake::Batch(batch) => self.schedule(&mut slots, batch).await,
                Wake::Done(id, result) => self.settle(&mut slots, &id, result).await,
                Wake::Tick => {}
                Wake::Stop => break,
            }
        }
    }

    /// Adds deliveries to the schedule, due now; those for a receiver no longer configured are
    /// dropped.
    async fn schedule(&self, slots: &mut HashMap<String, Slot>, deliveries: Vec<Delivery>) {
        for d in deliveries {
            match self.receivers.iter().position(|r| r.hook.key() == d.receiver) {
                Some(receiver) => {
                    let slot = Slot {
                        delivery: d,
                        receiver,
                        attempts: 0,
                        next_at: Instant::now(),
                        in_flight: false,
                    };
                    slots.insert(slot.delivery.id.clone(), slot);
                }
                None => {
                    tracing::error!(event_id = %d.event.id, event = d.event.detail.kind().as_str(),
                        "alert dropped: its webhook is no longer configured");
                    self.finish(&d, &self.counters.dropped).await;
                }
            }
        }
    }

    /// Books an attempt's result.
    async fn settle(
        &self,
        slots: &mut HashMap<String, Slot>,
        id: &str,
        result: Result<(), String>,
    ) {
        let Some(slot) = slots.get_mut(id) else { return };
        slot.in_flight = false;
        let kind = slot.delivery.event.detail.kind();
        let host = self.receivers[slot.receiver].hook.host();
        match result {
            Ok(()) => {
                let slot = slots.remove(id).expect("present");
                tracing::info!(event_id = %slot.delivery.event.id, event = kind.as_str(),
                    receiver = %host, attempts = slot.attempts + 1, "alert delivered");
                self.finish(&slot.delivery, &self.counters.sent).await;
            }
            Err(error) => {
                self.counters.failed.with_label_values(&[kind.as_str()]).inc();
                slot.attempts += 1;
                let age_ms = now().0.saturating_sub(slot.delivery.event.time_ms);
                let too_old = u128::from(age_ms) >= self.config.max_age.as_millis();
                if slot.attempts >= self.config.max_attempts || too_old {
                    let slot = slots.remove(id).expect("present");
                    tracing::error!(event_id = %slot.delivery.event.id, event = kind.as_str(),
                        receiver = %host, attempts = slot.attempts, error = %error,
                        "alert dropped: not delivered within alerts.max_attempts / max_age");
                    self.finish(&slot.delivery, &self.counters.dropped).await;
                } else {
                    let wait = backoff(&self.config, slot.attempts, random_u64());
                    tracing::warn!(event_id = %slot.delivery.event.id, event = kind.as_str(),
                        receiver = %host, attempts = slot.attempts, error = %error,
                        retry_in_ms = wait.as_millis() as u64, "alert delivery failed; will retry");
                    slot.next_at = Instant::now() + wait;
                }
            }
        }
    }

    /// Marks a delivery done in the outbox, then counts it under `counter` (so that a pending
    /// gauge at 0 means the `done` lines are written).
    async fn finish(&self, d: &Delivery, counter: &IntCounterVec) {
        let (outbox, id) = (self.outbox.clone(), d.id.clone());
        let marked = tokio::task::spawn_blocking(move || {
            outbox.lock().unwrap_or_else(PoisonError::into_inner).done(&id)
        })
        .await;
        if let Ok(Err(e)) = marked {
            tracing::error!(error = %e, "alerts outbox: marking a delivery done");
        }
        counter.with_label_values(&[d.event.detail.kind().as_str()]).inc();
        self.counters.pending.dec();
    }
}

/// The wait before retry number `attempts` (1 after the first failure): `initial_backoff`
/// doubled per failure up to `max_backoff`, of which a random half is taken off (jitter, so
/// receivers coming back are not hit by every proxy at once).
pub fn backoff(config: &AlertsConfig, attempts: u32, random: u64) -> Duration {
    let initial = config.initial_backoff.as_millis() as u64;
    let max = config.max_backoff.as_millis() as u64;
    let full = initial.saturating_mul(1u64 << attempts.saturating_sub(1).min(40)).min(max);
    let half = full / 2;
    Duration::from_millis(full - half + random % (half + 1))
}

/// Posts `event` to a receiver; `Ok` on a 2xx.
fn post(
    client: UpstreamClient,
    hook: &Webhook,
    secret: &[u8],
    event: &Event,
    timeout: Duration,
) -> impl std::future::Future<Output = Result<(), String>> + Send + 'static {
    let body = event.body(hook.format);
    let unix = now().0 / 1000;
    let request = http::Request::post(hook.url.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "tollgate-alerts")
        .header(event::EVENT_ID_HEADER, event.id.as_str())
        .header(event::EVENT_TYPE_HEADER, event.detail.kind().as_str())
        .header(event::SIGNATURE_HEADER, event::signature(secret, unix, &body))
        .body(crate::deny::full(Bytes::from(body)));
    async move {
        let request = request.map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(timeout, client.request(request))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", response.status()))
        }
    }
}

fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now().0);
    h.finish()
}

/// `evt_` and 128 random bits.
fn new_event_id() -> String {
    format!("evt_{:016x}{:016x}", random_u64(), random_u64())
}

/// The alert for a budget warning from the core's settlement.
pub fn budget_threshold(
    w: &tollgate_core::budget::Warning,
    request_id: &str,
    agent: &str,
) -> Detail {
    let text = |v: serde_json::Result<serde_json::Value>| {
        v.ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
    };
    Detail::BudgetThreshold(event::BudgetThreshold {
        budget: w.budget_id.clone(),
        scope: text(serde_json::to_value(w.scope)),
        key: w.key.clone(),
        period: text(serde_json::to_value(w.period)),
        period_key: w.period_key.clone(),
        threshold_percent: w.threshold_bp / 100,
        spent: w.spent.to_string(),
        limit: w.limit.to_string(),
        spent_nano_usd: w.spent.nanos(),
        limit_nano_usd: w.limit.nanos(),
        request_id: request_id.to_string(),
        agent: agent.to_string(),
    })
}

/// The alert for a new pending approval.
pub fn approval_pending(a: &tollgate_core::approval::Approval) -> Detail {
    use tollgate_core::risk::OnTimeout;
    Detail::ApprovalPending(event::ApprovalPending {
        approval_id: a.id.clone(),
        request_id: a.request_id.clone(),
        agent: a.agent.clone(),
        cost_center: a.cost_center.clone(),
        project: a.project.clone(),
        route: a.route.clone(),
        action: a.action.clone(),
        risk: tollgate_core::risk::Score(a.risk_score).to_string(),
        risk_band: a.risk_band.clone(),
        reason: a.reason.clone(),
        explanation: a.explanation.clone(),
        expires_at: tollgate_core::time::UnixMillis(a.expires_at_ms).to_string(),
        on_timeout: match a.on_timeout {
            OnTimeout::Approve => "approve",
            OnTimeout::Deny => "deny",
        }
        .to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_at_most_half_taken_off() {
        let config = AlertsConfig {
            initial_backoff: Duration::from_millis(1000),
            max_backoff: Duration::from_millis(8000),
            ..AlertsConfig::default()
        };
        let at = |n, r| backoff(&config, n, r).as_millis();
        assert_eq!(
            [at(1, 0), at(2, 0), at(3, 0), at(4, 0), at(5, 0)],
            [500, 1000, 2000, 4000, 4000]
        );
        assert_eq!([at(1, 500), at(3, 2000), at(9, 4000), at(60, 4000)], [1000, 4000, 8000, 8000]);
        for r in [1, 77, 12_345, u64::MAX] {
            let ms = at(3, r);
            assert!((2000..=4000).contains(&ms), "{ms}");
        }
    }

    #[test]
    fn money_is_exact_decimal_from_nanos() {
        use tollgate_core::budget::{Scope, Warning};
        use tollgate_core::money::Money;
        use tollgate_core::time::Period;
        let w = Warning {
            budget_id: "team".into(),
            scope: Scope::Agent,
            key: "bot".into(),
            period: Period::Daily,
            period_key: "2026-12-03".into(),
            threshold_bp: 9500,
            spent: Money::from_nanos(9_500_000_001),
            limit: Money::from_nanos(10_000_000_000),
        };
        let Detail::BudgetThreshold(b) = budget_threshold(&w, "req-1", "bot") else {
            panic!("budget alert")
        };
        assert_eq!((b.spent.as_str(), b.limit.as_str()), ("9.500000001", "10.00"));
        assert_eq!((b.scope.as_str(), b.period.as_str()), ("agent", "daily"));
        assert_eq!((b.threshold_percent, b.spent_nano_usd), (95, 9_500_000_001));
    }
}
