//! The proxy-wasm glue: moves bytes between Envoy and [`Exchange`], and owns the per-VM state
//! (compiled plugin and the policy in force, budget store, metric ids and pending increments,
//! the usage-event outbox, requests whose body is awaited, policy polling, the breakers' gauge
//! and the oversight reports and disabled agents exchanged with the collector: `oversight.rs`,
//! and in fleet mode the requests waiting on the collector: `fleet.rs`).
//!
//! Rules learned in the real Envoy, each applied here:
//! the request headers are held (`Pause`) until the decision, which Envoy allows while still
//! running the body hooks only with `allow_on_headers_stop_iteration` (otherwise a paused
//! headers hook never sees its body: `filter.hold_headers: false` then lets them go on, and
//! drops the `content-length` of a body that may be rewritten); the request body is buffered
//! (`Pause` until end of stream) because the decision needs the model, and may be replaced
//! there (the usage rewrite), the held headers' `content-length` set to match; the response
//! headers always `Continue` (a paused response headers hook never sees its body); the response
//! body is observed chunk by chunk and always `Continue`s, so no byte waits for the meter (only
//! the usage-chunk filter may hold one incomplete SSE event); our own local reply re-enters the
//! response hooks and is left alone; response headers are only set from their headers hook;
//! usage events, metric increments, policy polls and the stalled-body timeout run from the root
//! context on its timer, once per VM, because an HTTP context has no timer and its own callouts
//! are cancelled when its stream ends; host calls that can fail are made through `hostcalls` (or
//! the raw import, for buffer writes) and their errors handled, since a panic kills the
//! worker's VM.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

mod fleet;
mod oversight;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};
use tollgate_core::autonomy::stats;
use tollgate_core::budget::StoreError;
use tollgate_core::guardrails::report::Report;
use tollgate_core::head::HOP_BY_HOP;
use tollgate_core::metrics::{self as schema, Metric};
use tollgate_core::money::Money;
use tollgate_core::policy::Snapshot;
use tollgate_core::pricing::PriceSource;
use tollgate_core::refusal::status_class;
use tollgate_core::time::UnixMillis;

use crate::exchange::{self, Decided, Exchange, Head, Live, Now};
use crate::metrics::{Counters, Recorder, UsageLine};
use crate::reply::{Class, Denial, Shape};
use crate::settings::{fail_policy_of, FailPolicy, Plugin};
use crate::shared::{self, SharedData, SharedStore};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root { context_id, vm: Rc::default() })
    });
}}

/// Envoy's shared data through the host calls.
pub struct HostShared;

impl SharedData for HostShared {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(bytes), Some(cas))) => Ok(Some((bytes, cas))),
            Ok((Some(bytes), None)) => Ok(Some((bytes, 0))),
            Ok((None, _)) => Ok(None),
            Err(status) => Err(unavailable(status)),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas.filter(|c| *c != 0)) {
            Ok(()) => Ok(true),
            Err(Status::CasMismatch) => Ok(false),
            Err(status) => Err(unavailable(status)),
        }
    }
}

fn unavailable(status: Status) -> StoreError {
    StoreError::Unavailable { reason: format!("shared data: {status:?}") }
}

/// Envoy counters (ids are per VM, names shared by all VMs). Request-labelled series are cached by
/// [`Recorder`]; the few fixed-name health counters are cached here by name. Increments are
/// summed in the VM and handed to Envoy once per tick ([`HostCounters::flush`]): every host call
/// costs about a microsecond, and a request touches four or more counters.
#[derive(Default)]
struct HostCounters {
    named: HashMap<&'static str, u32>,
    /// Increments not yet given to Envoy, by metric id.
    pending: HashMap<u32, u64>,
    /// Gauge ids by name, and their changes not yet given to Envoy (every VM adds its own
    /// share to the one stat, so a gauge moves by deltas, never by `set`).
    gauges: HashMap<Box<str>, u32>,
    pending_gauges: HashMap<u32, i64>,
}

impl Counters for HostCounters {
    fn define(&mut self, name: &str) -> Option<u32> {
        hostcalls::define_metric(MetricType::Counter, name).ok()
    }

    fn add(&mut self, id: u32, n: u64) {
        let total = self.pending.entry(id).or_default();
        *total = total.saturating_add(n);
    }
}

impl HostCounters {
    fn count(&mut self, name: &'static str, n: u64) {
        let id = match self.named.get(name) {
            Some(id) => *id,
            None => match self.define(name) {
                Some(id) => {
                    self.named.insert(name, id);
                    id
                }
                None => return,
            },
        };
        self.add(id, n);
    }

    /// Moves a gauge by `delta` (defining it, so that it shows, even when `delta` is 0).
    fn gauge(&mut self, name: &str, delta: i64) {
        let id = match self.gauges.get(name) {
            Some(id) => *id,
            None => match hostcalls::define_metric(MetricType::Gauge, name) {
                Ok(id) => {
                    self.gauges.insert(name.into(), id);
                    id
                }
                Err(_) => return,
            },
        };
        *self.pending_gauges.entry(id).or_default() += delta;
    }

    /// Hands the summed increments to Envoy.
    fn flush(&mut self) {
        for (id, n) in self.pending.drain() {
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
        for (id, delta) in self.pending_gauges.drain() {
            if delta != 0 {
                let _ = hostcalls::increment_metric(id, delta);
            }
        }
    }
}

/// The configuration state of one plugin instance.
enum Config {
    /// `on_configure` has not run yet.
    Pending,
    Ready(Rc<Plugin>),
    /// The configuration did not compile: every request follows this policy.
    Broken(FailPolicy),
}

/// Per-VM state shared by the root context and its HTTP contexts.
struct Vm {
    config: RefCell<Config>,
    budgets: Live<HostShared>,
    /// Fleet mode: requests waiting for a lease, by HTTP context id.
    waiting: RefCell<HashMap<u32, fleet::Waiter>>,
    /// Requests the root woke, until their context takes its state back.
    woken: RefCell<HashMap<u32, fleet::Woken>>,
    /// Fleet mode: requests waiting on the collector's approval service, by HTTP context id.
    asking: RefCell<HashMap<u32, fleet::Asking>>,
    /// With a collector: the poll of its disabled agents (`oversight.rs`).
    disabled_poll: fleet::Periodic,
    /// Agents an operator re-enabled through the collector whose slot could not be updated yet,
    /// with when the collector last listed them.
    reenable_retry: RefCell<Vec<(String, u64)>>,
    /// Breaker openings and agents disabled here, for the collector, oldest first.
    reports: RefCell<VecDeque<tollgate_core::guardrails::report::Report>>,
    /// A batch of reports is on its way (one at a time per VM).
    reporting: Cell<bool>,
    /// The last batch of reports did not reach the collector (logged once).
    reports_failing: Cell<bool>,
    /// Fleet mode: the sync of the loop stream.
    loop_sync: fleet::Periodic,
    /// This VM's name as a fleet lease holder.
    holder: String,
    counters: RefCell<HostCounters>,
    recorder: RefCell<Recorder>,
    /// The verdicts counted since the last tick, for the autonomy ratio ([`Vm::flush_tally`]).
    tally: RefCell<stats::Tally>,
    /// The outbox: usage events not yet taken by the collector, oldest first.
    events: RefCell<VecDeque<Queued>>,
    /// Events the collector refused: kept (never dropped for being refused), offered again
    /// every `filter.collector.retry_refused`, counted in `tollgate_usage_events_held`.
    held: RefCell<VecDeque<Held>>,
    /// A batch of usage events is on its way (one at a time per VM).
    sending: Cell<bool>,
    /// When this VM next sends its outbox (`filter.collector.flush`; each VM has its own timer).
    next_flush_ms: Cell<u64>,
    /// When the held events are next offered again.
    next_held_ms: Cell<u64>,
    /// Requests whose body is awaited, by HTTP context id.
    awaited: RefCell<HashMap<u32, Rc<Awaited>>>,
    in_flight_calls: RefCell<HashMap<u32, Call>>,
    poll: RefCell<PolicyPoll>,
    /// Usage event ids: a random per-VM prefix and a sequence number.
    event_prefix: u64,
    event_seq: Cell<u64>,
}

/// Most usage events in one POST.
const MAX_BATCH: usize = 1000;

/// One usage event in the outbox: its id (how the collector's answer names it) and its line.
#[derive(Clone)]
struct Queued {
    id: String,
    line: String,
}

/// An event the collector refused, and why.
struct Held {
    event: Queued,
    why: String,
}

/// A batch on its way: new events (put back if the collector did not answer) and the ids of
/// held events offered again.
struct Batch {
    fresh: Vec<Queued>,
    retried: Vec<String>,
}

/// What the collector said about one event of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    /// Taken (new or a duplicate of one taken before).
    Taken,
    /// Refused, and why.
    Refused(String),
    /// No answer for it: send it again.
    Unanswered,
}

/// What an outgoing `dispatch_http_call` was for.
enum Call {
    Events(Batch),
    /// A policy poll.
    Policy,
    /// Lease exchanges, for these counters.
    Leases(Vec<String>),
    /// An approval question, for this HTTP context.
    Approval(u32),
    /// The collector's disabled agents, asked for at this time (unix ms).
    Disabled(u64),
    /// Oversight reports (put back if the collector did not take them).
    Reports(Vec<tollgate_core::guardrails::report::Report>),
    /// The loop stream: this VM's calls that were sent (put back if the collector did not
    /// answer).
    Loops(tollgate_core::guardrails::loops::merged::Outgoing),
}

/// This VM's policy polling state (timers and snapshots are per VM).
#[derive(Default)]
struct PolicyPoll {
    /// Not before this time (ms).
    next_ms: u64,
    in_flight: bool,
    etag: Option<String>,
    /// The last document fetched, good or bad: an unchanged one is not parsed (or reported)
    /// again.
    last_body: Option<Vec<u8>>,
}

impl Vm {
    fn count(&self, name: &'static str, n: u64) {
        self.counters.borrow_mut().count(name, n);
    }

    /// A usage event id unique across VMs and restarts: a collector deduplicates by it when a
    /// batch is sent again after a timeout.
    fn next_event_id(&self) -> String {
        let n = self.event_seq.get() + 1;
        self.event_seq.set(n);
        format!("{:016x}-{n}", self.event_prefix)
    }

    /// Puts the lines of a batch the collector did not take back in front of the queue
    /// (bounded: the oldest beyond `max_queued` are dropped and counted).
    fn requeue(&self, lines: Vec<Queued>, max_queued: usize) {
        let mut events = self.events.borrow_mut();
        for line in lines.into_iter().rev() {
            events.push_front(line);
        }
        let mut dropped = 0;
        while events.len() > max_queued {
            events.pop_front();
            dropped += 1;
        }
        drop(events);
        if dropped > 0 {
            self.count(schema::USAGE_EVENTS_DROPPED.name, dropped);
        }
    }

    /// Keeps an event the collector refused (bounded by `max_queued` like the outbox: beyond
    /// it the oldest held event is dropped and counted), with a log line naming why.
    fn hold(&self, event: Queued, why: String, max_queued: usize, retry_ms: u64) {
        log(
            LogLevel::Warn,
            &format!(
                "tollgate: the collector refused usage event {}: {why}; kept in the outbox and \
                 offered again: {}",
                event.id, event.line
            ),
        );
        let mut held = self.held.borrow_mut();
        if held.is_empty() {
            self.next_held_ms.set(now().ms.0.saturating_add(retry_ms));
        }
        held.push_back(Held { event, why });
        let mut dropped = 0i64;
        while held.len() > max_queued.max(1) {
            held.pop_front();
            dropped += 1;
        }
        drop(held);
        let mut counters = self.counters.borrow_mut();
        counters.gauge(schema::USAGE_EVENTS_HELD.name, 1 - dropped);
        if dropped > 0 {
            counters.count(schema::USAGE_EVENTS_DROPPED.name, dropped.unsigned_abs());
        }
    }

    /// Accounts for a batch's answer, event by event.
    fn settle_batch(
        &self,
        batch: Batch,
        verdict: impl Fn(&str) -> Verdict,
        (max_queued, retry_ms): (usize, u64),
    ) {
        let (mut sent, mut refused, mut failed) = (0u64, 0u64, 0u64);
        let mut again = Vec::new();
        for event in batch.fresh {
            match verdict(&event.id) {
                Verdict::Taken => sent += 1,
                Verdict::Refused(why) => {
                    refused += 1;
                    self.hold(event, why, max_queued, retry_ms);
                }
                Verdict::Unanswered => {
                    failed += 1;
                    again.push(event);
                }
            }
        }
        let mut released = 0i64;
        for id in batch.retried {
            match verdict(&id) {
                Verdict::Taken => {
                    sent += 1;
                    let mut held = self.held.borrow_mut();
                    let before = held.len();
                    held.retain(|h| h.event.id != id);
                    released += i64::try_from(before - held.len()).unwrap_or(0);
                }
                Verdict::Refused(why) => {
                    refused += 1;
                    if let Some(h) = self.held.borrow_mut().iter_mut().find(|h| h.event.id == id) {
                        h.why = why;
                    }
                }
                Verdict::Unanswered => failed += 1,
            }
        }
        if !again.is_empty() {
            self.requeue(again, max_queued);
        }
        let mut counters = self.counters.borrow_mut();
        for (metric, n) in [
            (&schema::USAGE_EVENTS_SENT, sent),
            (&schema::USAGE_EVENTS_REJECTED, refused),
            (&schema::USAGE_EVENTS_FAILED, failed),
        ] {
            if n > 0 {
                counters.count(metric.name, n);
            }
        }
        if released > 0 {
            counters.gauge(schema::USAGE_EVENTS_HELD.name, -released);
        }
    }

    /// Adds one to the series of `metric` with label `values` (policy or fixed vocabularies).
    fn count_labelled(&self, metric: &Metric, values: &[&str]) {
        let mut counters = self.counters.borrow_mut();
        self.recorder.borrow_mut().count(&mut *counters, metric, values, 1);
    }

    /// Counts the oversight step's verdict on a request, if it had one and it was not counted
    /// yet: in `tollgate_actions_total`, and in this VM's batch for the autonomy ratio
    /// ([`Vm::flush_tally`]).
    fn count_verdict(&self, exchange: &mut Exchange) {
        let Some((category, verdict)) = exchange.take_verdict() else { return };
        let name = stats::CATEGORIES[category.min(stats::UNCATEGORIZED)];
        self.count_labelled(&schema::ACTIONS, &[name, verdict.as_str()]);
        self.tally.borrow_mut().count(category, verdict);
    }

    /// Adds this VM's batch of verdicts to the counts every worker keeps in shared data
    /// ([`stats::Tally`], one record updated with a compare-and-swap: one host round trip per
    /// tick, not per request) and moves `tollgate_autonomy_basis_points` of each category it
    /// counted in, and of `all`, by exactly the change it made to the ratio: the gauges are the
    /// sum of every worker's moves, so they show the ratio of Envoy's counts, as the sidecar's
    /// show its own. A record that cannot be updated keeps the batch for the next tick (one that
    /// is not a tally drops it).
    fn flush_tally(&self) {
        if self.tally.borrow().is_empty() {
            return;
        }
        let batch = self.tally.borrow().clone();
        let mut moves = Vec::new();
        let initial = stats::Tally::default().encode();
        let updated =
            self.budgets.shared.store().update_record(exchange::ACTIONS_KEY, &initial, |bytes| {
                let mut tally = stats::Tally::decode(bytes)?;
                moves = tally.merge(&batch);
                Some(tally.encode())
            });
        if updated.is_err() {
            return;
        }
        *self.tally.borrow_mut() = stats::Tally::default();
        let mut counters = self.counters.borrow_mut();
        for m in moves {
            counters.gauge(&schema::stat_name(&schema::AUTONOMY, &[m.category]), m.delta);
        }
    }

    /// Answers the effective context's request with `denial` in the provider's `shape` (plus
    /// `extra` headers) and counts it in `tollgate_requests_total`.
    fn send_refusal(
        &self,
        denial: &Denial,
        shape: Shape,
        request_id: &str,
        model: &str,
        extra: &[(&str, &str)],
    ) {
        let reply = denial.render(shape, request_id);
        let mut headers: Vec<(&str, &str)> =
            reply.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        headers.extend_from_slice(extra);
        self.decision(denial.class.decision(), &denial.code, model, "none");
        let _ = hostcalls::send_http_response(u32::from(reply.status), headers, Some(&reply.body));
    }

    /// Counts one request in `tollgate_requests_total`, once, when it ends.
    fn decision(&self, decision: &str, reason: &str, model: &str, status: &'static str) {
        let mut counters = self.counters.borrow_mut();
        self.recorder.borrow_mut().decision(&mut *counters, decision, reason, model, status);
    }
}

impl Default for Vm {
    fn default() -> Self {
        let prefix = random_u64();
        Vm {
            config: RefCell::new(Config::Pending),
            budgets: Live::new(SharedStore::new(HostShared).with_id_prefix(prefix)),
            waiting: RefCell::new(HashMap::new()),
            woken: RefCell::new(HashMap::new()),
            asking: RefCell::new(HashMap::new()),
            disabled_poll: fleet::Periodic::default(),
            reenable_retry: RefCell::new(Vec::new()),
            reports: RefCell::new(VecDeque::new()),
            reporting: Cell::new(false),
            reports_failing: Cell::new(false),
            loop_sync: fleet::Periodic::default(),
            holder: Vm::holder_name(prefix),
            counters: RefCell::new(HostCounters::default()),
            recorder: RefCell::new(Recorder::new(1000)),
            tally: RefCell::new(stats::Tally::default()),
            events: RefCell::new(VecDeque::new()),
            held: RefCell::new(VecDeque::new()),
            sending: Cell::new(false),
            next_flush_ms: Cell::new(0),
            next_held_ms: Cell::new(0),
            awaited: RefCell::new(HashMap::new()),
            in_flight_calls: RefCell::new(HashMap::new()),
            poll: RefCell::new(PolicyPoll::default()),
            event_prefix: prefix,
            event_seq: Cell::new(0),
        }
    }
}

struct Root {
    context_id: u32,
    vm: Rc<Vm>,
}

/// A request whose body the filter is waiting for: when a piece of it last came, and whether the
/// root's timer refused it for stalling (`filter.body_idle_timeout`).
struct Awaited {
    last_ms: Cell<u64>,
    timed_out: Cell<bool>,
    /// A body hook has run for it.
    body_seen: Cell<bool>,
    /// Its headers are held (the headers hook paused).
    held: bool,
    shape: Shape,
    request_id: String,
}

#[link(wasm_import_module = "env")]
extern "C" {
    // The SDK's own import, declared again: `hostcalls::set_buffer` panics on any status other
    // than `Ok`, which would kill the VM.
    fn proxy_set_buffer_bytes(
        buffer_type: BufferType,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> Status;
}

/// Replaces `size` bytes at `start` of a buffer with `value`; `false` if the host refused.
fn set_buffer(buffer_type: BufferType, start: usize, size: usize, value: &[u8]) -> bool {
    // SAFETY: the pointer and length describe `value`, which outlives the call; the host copies.
    let status =
        unsafe { proxy_set_buffer_bytes(buffer_type, start, size, value.as_ptr(), value.len()) };
    status == Status::Ok
}

/// 64 random bits (std's hasher keys come from WASI `random_get`), mixed with the clock.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now().ns);
    h.finish()
}

/// A call to the collector's admin listener (usage events, and in fleet mode leases, approvals
/// and the disabled agents): `POST` with `body` (its content type and bytes), else `GET`, with
/// the collector's headers (its token), bounded by `collector.timeout`.
fn collector_call(
    collector: &crate::settings::Collector,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> Result<u32, Status> {
    let mut headers = vec![
        (":method", if body.is_some() { "POST" } else { "GET" }),
        (":path", path),
        (":authority", collector.authority.as_str()),
    ];
    if let Some((content_type, _)) = body {
        headers.push(("content-type", content_type));
    }
    headers.extend(collector.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    hostcalls::dispatch_http_call(
        &collector.cluster,
        headers,
        body.map(|(_, b)| b),
        vec![],
        Duration::from_millis(collector.timeout_ms),
    )
}

/// The body of the answer to an HTTP callout (`size` bytes, as Envoy reported it; empty when
/// the host has none).
fn callout_body(size: usize) -> Vec<u8> {
    hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// A collector's JSON answer: `body` read as `T` when the status is 200, else `None`.
fn json_answer<T: serde::de::DeserializeOwned>(status: Option<&str>, body: &[u8]) -> Option<T> {
    match status {
        Some("200") => serde_json::from_slice(body).ok(),
        _ => None,
    }
}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

fn now() -> Now {
    let since = hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or(Duration::ZERO);
    Now {
        ms: UnixMillis(u64::try_from(since.as_millis()).unwrap_or(u64::MAX)),
        ns: u64::try_from(since.as_nanos()).unwrap_or(u64::MAX),
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let call = self.vm.in_flight_calls.borrow_mut().remove(&token);
        let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| String::from_utf8(s).ok());
        match call {
            Some(Call::Events(batch)) => {
                self.vm.sending.set(false);
                let limits = match &*self.vm.config.borrow() {
                    Config::Ready(p) => p
                        .filter
                        .collector
                        .as_ref()
                        .map_or((0, 60_000), |c| (c.max_queued, c.retry_refused_ms)),
                    _ => (0, 60_000),
                };
                let body = match status.as_deref() {
                    Some(s) if s.starts_with('2') || s.starts_with('4') => callout_body(body_size),
                    _ => Vec::new(),
                };
                let answers = verdicts(status.as_deref(), &body);
                if let Some(s) = status.as_deref().filter(|s| !s.starts_with('2')) {
                    log(
                        LogLevel::Warn,
                        &format!(
                            "tollgate: the collector answered {s} to {} usage events: {}",
                            batch.fresh.len() + batch.retried.len(),
                            String::from_utf8_lossy(&body[..body.len().min(512)])
                        ),
                    );
                }
                self.vm.settle_batch(batch, answers, limits);
            }
            Some(Call::Policy) => {
                self.vm.poll.borrow_mut().in_flight = false;
                self.policy_response(status.as_deref(), body_size);
            }
            Some(Call::Leases(counters)) => {
                self.leases_answered(counters, status.as_deref(), body_size);
            }
            Some(Call::Approval(id)) => {
                self.approval_answered(id, status.as_deref(), body_size);
            }
            Some(Call::Disabled(sent_ms)) => {
                self.disabled_answered(sent_ms, status.as_deref(), body_size)
            }
            Some(Call::Reports(batch)) => {
                self.reports_answered(batch, status.as_deref(), body_size)
            }
            Some(Call::Loops(sent)) => self.loops_answered(sent, status.as_deref(), body_size),
            None => {}
        }
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let text = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            _ => String::new(),
        };
        if let Err(e) = shared::seed(&HostShared) {
            log(LogLevel::Warn, &format!("tollgate: cannot seed shared data: {e}"));
        }
        let config = match Plugin::from_document(&text) {
            Ok(plugin) => {
                *self.vm.recorder.borrow_mut() = Recorder::new(plugin.filter.max_label_values);
                *self.vm.poll.borrow_mut() = PolicyPoll::default();
                let _ = hostcalls::set_tick_period(Duration::from_millis(plugin.tick_ms()));
                log(
                    LogLevel::Info,
                    &format!(
                        "tollgate: configured, policy version {}, fail {}",
                        plugin.policy.version(),
                        plugin.filter.fail.as_str()
                    ),
                );
                Config::Ready(Rc::new(plugin))
            }
            Err(errors) => {
                let fail = fail_policy_of(&text);
                log(
                    LogLevel::Error,
                    &format!(
                        "tollgate: invalid plugin configuration, failing {}: {errors}",
                        fail.as_str()
                    ),
                );
                self.vm.count(schema::CONFIG_ERRORS.name, 1);
                self.vm.counters.borrow_mut().flush();
                // The timer still flushes the counters of the requests that follow `fail`.
                let _ = hostcalls::set_tick_period(Duration::from_millis(1000));
                Config::Broken(fail)
            }
        };
        *self.vm.config.borrow_mut() = config;
        // Accept the configuration either way: a rejected one would take the whole listener
        // down, while a broken one answers per the configured fail policy and is reported.
        true
    }

    fn on_tick(&mut self) {
        self.vm.flush_tally();
        self.vm.flush_breaker_moves();
        self.vm.counters.borrow_mut().flush();
        let t = now();
        if let Err(e) = self.vm.budgets.shared.expire(t.ms) {
            log(LogLevel::Warn, &format!("tollgate: expiring reservations: {e}"));
        }
        if let Err(e) = self.vm.budgets.fleet.expire(t.ms) {
            log(LogLevel::Warn, &format!("tollgate: expiring fleet reservations: {e}"));
        }
        self.sync_leases(t);
        self.oversee(t);
        self.flush_events(t.ms.0);
        self.poll_policy(t.ms.0);
        self.refuse_stalled(t.ms.0);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            context_id,
            awaited: None,
            vm: self.vm.clone(),
            exchange: None,
            local_reply: false,
            decided: false,
            may_rewrite: false,
            held: false,
            arrived: Now { ms: UnixMillis(0), ns: 0 },
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Root {
    /// Answers `408 body_timeout` (and closes the connection), as the sidecar does, to every
    /// request whose body has been silent for longer than `filter.body_idle_timeout`. A stream
    /// has no timer of its own in proxy-wasm: the root's timer answers in the stream's context,
    /// then makes its own context the effective one again (a callout made from a stream's
    /// context would die with the stream).
    fn refuse_stalled(&self, now_ms: u64) {
        let timeout = match &*self.vm.config.borrow() {
            Config::Ready(p) => p.filter.body_idle_timeout_ms,
            _ => return,
        };
        let stalled: Vec<(u32, Rc<Awaited>)> = self
            .vm
            .awaited
            .borrow()
            .iter()
            .filter(|(_, a)| now_ms.saturating_sub(a.last_ms.get()) > timeout)
            .map(|(id, a)| (*id, a.clone()))
            .collect();
        if stalled.is_empty() {
            return;
        }
        let denial = exchange::body_stalled(timeout);
        for (id, awaited) in stalled {
            self.vm.awaited.borrow_mut().remove(&id);
            awaited.timed_out.set(true);
            if awaited.held && !awaited.body_seen.get() {
                // Either the client never sent its body, or Envoy never ran the body hooks of a
                // request whose headers the filter holds: what a missing
                // `allow_on_headers_stop_iteration` does to every request with a body.
                log(
                    LogLevel::Warn,
                    &format!(
                        "tollgate: request {}: no request body seen within {timeout} ms while \
                         its headers were held; if every request with a body ends so, the Wasm \
                         plugin lacks `allow_on_headers_stop_iteration: true` (or set \
                         `filter.hold_headers: false` and put Envoy's buffer filter after this one)",
                        awaited.request_id
                    ),
                );
            }
            if hostcalls::set_effective_context(id).is_err() {
                continue;
            }
            let close = [("connection", "close")];
            self.vm.send_refusal(&denial, awaited.shape, &awaited.request_id, "-", &close);
        }
        let _ = hostcalls::set_effective_context(self.context_id);
    }

    /// Sends the outbox as one NDJSON POST to the collector cluster when this VM's flush is due
    /// (`filter.collector.flush`), with the held events when their retry is due.
    fn flush_events(&mut self, now_ms: u64) {
        let plugin = match &*self.vm.config.borrow() {
            Config::Ready(p) => p.clone(),
            _ => return,
        };
        let Some(collector) = &plugin.filter.collector else { return };
        if self.vm.sending.get() || now_ms < self.vm.next_flush_ms.get() {
            return;
        }
        self.vm.next_flush_ms.set(now_ms.saturating_add(collector.flush_ms));
        let retry_held = now_ms >= self.vm.next_held_ms.get() && !self.vm.held.borrow().is_empty();
        let mut events = self.vm.events.borrow_mut();
        if events.is_empty() && !retry_held {
            return;
        }
        let n = events.len().min(MAX_BATCH);
        let mut body = String::new();
        for e in events.iter().take(n) {
            body.push_str(&e.line);
            body.push('\n');
        }
        let mut retried = Vec::new();
        if retry_held {
            self.vm.next_held_ms.set(now_ms.saturating_add(collector.retry_refused_ms));
            for h in self.vm.held.borrow().iter().take(MAX_BATCH.saturating_sub(n)) {
                body.push_str(&h.event.line);
                body.push('\n');
                retried.push(h.event.id.clone());
            }
        }
        if body.is_empty() {
            return;
        }
        let call = collector_call(
            collector,
            &collector.path,
            Some(("application/x-ndjson", body.as_bytes())),
        );
        match call {
            Ok(token) => {
                let fresh: Vec<Queued> = events.drain(..n).collect();
                self.vm.sending.set(true);
                let batch = Batch { fresh, retried };
                self.vm.in_flight_calls.borrow_mut().insert(token, Call::Events(batch));
            }
            Err(status) => {
                log(LogLevel::Warn, &format!("tollgate: collector call failed: {status:?}"));
            }
        }
    }
}

/// The collector's answer to a batch, per event id. The Tollgate collector answers each line
/// (`results`: `event_id` and `result`: `accepted`, `duplicate` or `refused`, with `field` and
/// `error`); any other `2xx` took everything; a `4xx` without results refused everything
/// (a bad token, a batch too large), naming the status; no answer or a `5xx`: send again. An
/// event the answer does not mention is sent again (the collector deduplicates by id).
fn verdicts(status: Option<&str>, body: &[u8]) -> impl Fn(&str) -> Verdict {
    #[derive(serde::Deserialize)]
    struct Answer {
        results: Vec<LineResult>,
    }
    #[derive(serde::Deserialize)]
    struct LineResult {
        event_id: Option<String>,
        result: String,
        field: Option<String>,
        error: Option<String>,
    }
    let per_event: Option<HashMap<String, Verdict>> =
        serde_json::from_slice::<Answer>(body).ok().map(|a| {
            a.results
                .into_iter()
                .filter_map(|r| {
                    let verdict = match r.result.as_str() {
                        "accepted" | "duplicate" => Verdict::Taken,
                        "refused" => Verdict::Refused(match (r.field.as_deref(), r.error) {
                            (Some(f), Some(e)) if !f.is_empty() => format!("{f}: {e}"),
                            (_, Some(e)) => e,
                            _ => "refused".to_owned(),
                        }),
                        _ => Verdict::Unanswered,
                    };
                    Some((r.event_id?, verdict))
                })
                .collect()
        });
    let status = status.unwrap_or("").to_owned();
    let excerpt = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    move |id: &str| match (&per_event, status.as_bytes().first()) {
        (Some(map), Some(b'2' | b'4')) => map.get(id).cloned().unwrap_or(Verdict::Unanswered),
        (None, Some(b'2')) => Verdict::Taken,
        (None, Some(b'4')) => {
            Verdict::Refused(format!("the batch was answered {status}: {excerpt}"))
        }
        _ => Verdict::Unanswered,
    }
}

impl Root {
    /// Asks the policy source for a newer document when this VM's poll is due.
    fn poll_policy(&mut self, now_ms: u64) {
        let plugin = match &*self.vm.config.borrow() {
            Config::Ready(p) => p.clone(),
            _ => return,
        };
        let Some(source) = &plugin.filter.policy_url else { return };
        let mut poll = self.vm.poll.borrow_mut();
        if poll.in_flight || now_ms < poll.next_ms {
            return;
        }
        poll.next_ms = now_ms.saturating_add(source.interval_ms);
        let mut headers = vec![
            (":method", "GET"),
            (":path", source.path.as_str()),
            (":authority", source.authority.as_str()),
        ];
        if let Some(etag) = &poll.etag {
            headers.push(("if-none-match", etag.as_str()));
        }
        let call = hostcalls::dispatch_http_call(
            &source.cluster,
            headers,
            None,
            vec![],
            Duration::from_millis(source.timeout_ms),
        );
        match call {
            Ok(token) => {
                poll.in_flight = true;
                self.vm.in_flight_calls.borrow_mut().insert(token, Call::Policy);
            }
            Err(status) => {
                drop(poll);
                self.policy_failed(&format!("cannot call cluster {}: {status:?}", source.cluster));
            }
        }
    }

    /// Applies a fetched policy document; a bad one keeps the snapshot in force.
    fn policy_response(&mut self, status: Option<&str>, body_size: usize) {
        let plugin = match &*self.vm.config.borrow() {
            Config::Ready(p) => p.clone(),
            _ => return,
        };
        match status {
            Some("304") => return,
            Some(s) if s.starts_with('2') => {}
            // No status: the call failed (timeout, reset, no healthy host).
            other => {
                let status = other.unwrap_or("no response");
                return self.policy_failed(&format!("policy source answered {status}"));
            }
        }
        let etag = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, "etag")
            .ok()
            .flatten()
            .and_then(|v| String::from_utf8(v).ok());
        let body = callout_body(body_size);
        {
            let mut poll = self.vm.poll.borrow_mut();
            poll.etag = etag;
            if poll.last_body.as_deref() == Some(body.as_slice()) {
                return;
            }
            poll.last_body = Some(body.clone());
        }
        let parsed = std::str::from_utf8(&body)
            .map_err(|_| "the document is not UTF-8 text".to_owned())
            .and_then(|text| Snapshot::from_yaml_str(text).map_err(|e| e.to_string()));
        match parsed {
            Ok(policy) => {
                let version = policy.version().to_owned();
                *self.vm.config.borrow_mut() = Config::Ready(Rc::new(plugin.with_policy(policy)));
                self.vm.count(schema::POLICY_RELOADS.name, 1);
                log(LogLevel::Info, &format!("tollgate: policy updated to version {version}"));
            }
            Err(errors) => self.policy_failed(&format!(
                "the new policy is invalid, keeping version {}: {errors}",
                plugin.policy.version()
            )),
        }
    }

    fn policy_failed(&self, why: &str) {
        self.vm.count(schema::POLICY_RELOAD_FAILURES.name, 1);
        log(LogLevel::Warn, &format!("tollgate: policy update rejected: {why}"));
    }
}

struct Http {
    context_id: u32,
    /// Set while the body is awaited (see [`Root::refuse_stalled`]).
    awaited: Option<Rc<Awaited>>,
    vm: Rc<Vm>,
    exchange: Option<Exchange>,
    /// Our own reply is passing through the response hooks: leave it alone.
    local_reply: bool,
    decided: bool,
    /// The request's body may be rewritten (the usage rewrite).
    may_rewrite: bool,
    /// The request headers are held (the headers hook paused) until the decision: its
    /// `content-length` is set again when the body is rewritten.
    held: bool,
    /// When the request headers arrived: the time its decision is made at (one clock read
    /// fewer per request; the body follows within the request's own upload time).
    arrived: Now,
}

impl Context for Http {}

impl Http {
    /// Starts waiting for the body (see [`Root::refuse_stalled`]).
    fn await_body(&mut self, shape: Shape, request_id: &str, now_ms: u64) {
        let awaited = Rc::new(Awaited {
            last_ms: Cell::new(now_ms),
            timed_out: Cell::new(false),
            body_seen: Cell::new(false),
            held: self.held,
            shape,
            request_id: request_id.to_owned(),
        });
        self.vm.awaited.borrow_mut().insert(self.context_id, awaited.clone());
        self.awaited = Some(awaited);
    }

    /// The body is complete, refused or gone: no longer waited for.
    fn stop_awaiting(&mut self) {
        if self.awaited.take().is_some() {
            self.vm.awaited.borrow_mut().remove(&self.context_id);
        }
    }

    /// The root's timer answered this request for its stalled body.
    fn timed_out(&self) -> bool {
        self.awaited.as_ref().is_some_and(|a| a.timed_out.get())
    }

    fn reply(&mut self, denial: &Denial, shape: Shape, request_id: &str, model: &str) {
        self.reply_with(denial, shape, request_id, model, &[]);
    }

    fn reply_with(
        &mut self,
        denial: &Denial,
        shape: Shape,
        request_id: &str,
        model: &str,
        extra: &[(&str, &str)],
    ) {
        self.local_reply = true;
        self.vm.send_refusal(denial, shape, request_id, model, extra);
    }

    fn plugin(&self) -> Result<Rc<Plugin>, FailPolicy> {
        match &*self.vm.config.borrow() {
            Config::Ready(p) => Ok(p.clone()),
            Config::Broken(fail) => Err(*fail),
            Config::Pending => Err(FailPolicy::Closed),
        }
    }

    /// Decides on the complete request body; replies on a refusal; parks a request its fleet
    /// lease cannot cover yet.
    fn decide(&mut self, plugin: &Rc<Plugin>, body: &[u8]) -> Action {
        self.decided = true;
        self.stop_awaiting();
        let Some(mut exchange) = self.exchange.take() else { return Action::Continue };
        let result = exchange.decide(plugin, &self.vm.budgets, body, self.arrived);
        self.vm.count_verdict(&mut exchange);
        let action = match result {
            // Counted when it ends (`on_log`), with the upstream's status.
            Ok(Decided::Admitted) => Action::Continue,
            Ok(Decided::Short(parked)) => {
                self.wait_for_lease(exchange, parked, plugin, body);
                return Action::Pause;
            }
            Ok(Decided::Approval(ask)) => {
                self.ask_approval(exchange, ask, plugin, body);
                return Action::Pause;
            }
            Err(denial) => {
                // As the sidecar: no model for a body that could not be inspected (a duplicated
                // `model` is one, and which copy is the model is the question).
                let model = (denial.code != "malformed_body")
                    .then(|| model_of(body))
                    .flatten()
                    .unwrap_or_else(|| schema::NONE.to_owned());
                let (shape, id) = (exchange.shape, exchange.request_id.clone());
                if let Some(g) = &denial.guardrail {
                    self.vm.count_labelled(&schema::GUARDRAIL_VIOLATIONS, &[g.reason]);
                    log(LogLevel::Warn, &guardrail_line(&id, g));
                }
                if let Some(record) = exchange.proposal(&denial.code) {
                    log(LogLevel::Info, &format!("tollgate: proposal {record}"));
                }
                self.reply(&denial, shape, &id, &model);
                Action::Pause
            }
        };
        if !self.local_reply {
            self.exchange = Some(exchange);
        }
        action
    }
}

impl Http {
    /// Asks an admitted OpenAI stream for usage (see [`Exchange::usage_rewrite`]). With the
    /// headers held, their `content-length` is set to the new body's; otherwise it was removed
    /// when they went on.
    fn rewrite_body(&mut self, body: &[u8], body_size: usize) {
        if !self.may_rewrite || self.local_reply {
            return;
        }
        let Some(exchange) = self.exchange.as_mut() else { return };
        if let Some(rewritten) = exchange.usage_rewrite(body) {
            if !set_buffer(BufferType::HttpRequestBody, 0, body_size, &rewritten) {
                log(LogLevel::Warn, "tollgate: cannot rewrite the request body for usage");
                return;
            }
            if self.held {
                let length = rewritten.len().to_string();
                let _ = hostcalls::set_map_value(
                    MapType::HttpRequestHeaders,
                    "content-length",
                    Some(&length),
                );
            }
        }
    }

    /// The body so far is over `filter.max_body_bytes`: the sidecar's 413.
    fn too_large(&mut self, plugin: &Plugin) -> Action {
        let (shape, id) = match &self.exchange {
            Some(e) => (e.shape, e.request_id.clone()),
            None => (Shape::OpenAi, String::new()),
        };
        self.decided = true;
        self.exchange = None;
        self.stop_awaiting();
        self.reply(&exchange::too_large(plugin.filter.max_body_bytes), shape, &id, "-");
        Action::Pause
    }
}

/// The log line of a guardrail refusal (the filter keeps no audit log of its own): request,
/// action, reason, argument path, pattern and a short excerpt, as JSON.
fn guardrail_line(request_id: &str, g: &tollgate_core::guardrails::Breach) -> String {
    let record = serde_json::json!({
        "request_id": request_id,
        "tool": g.action,
        "reason": g.reason,
        "argument": g.argument,
        "pattern": g.pattern,
        "excerpt": g.excerpt,
    });
    format!("tollgate: guardrail refusal {record}")
}

/// The model named by a refused request body, for the decision metric.
fn model_of(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("model")?.as_str().map(str::to_owned)
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // One host call for the whole map instead of one per header read. As bytes: the SDK's
        // `String` variants panic on a header value that is not UTF-8 (names are tokens); such
        // a value reads as absent here.
        let headers = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| String::from_utf8(v.clone()).ok())
        };
        let head = Head {
            method: header(":method").unwrap_or_default(),
            path: header(":path").unwrap_or_default(),
            authority: header(":authority"),
            request_id: header("x-request-id"),
            route: hostcalls::get_property(vec!["xds", "route_name"])
                .ok()
                .flatten()
                .and_then(|name| String::from_utf8(name).ok())
                .filter(|name| !name.is_empty()),
        };
        let t = now();
        let plugin = match self.plugin() {
            Ok(plugin) => plugin,
            Err(FailPolicy::Open) => {
                self.vm.count(schema::FAIL_OPEN.name, 1);
                self.exchange = Some(Exchange::bypass(head, t));
                self.decided = true;
                return Action::Continue;
            }
            Err(FailPolicy::Closed) => {
                let denial = Denial::new(
                    Class::Unavailable,
                    "filter_misconfigured",
                    "the tollgate filter has no valid configuration",
                );
                let id = head.request_id.clone().unwrap_or_default();
                self.reply(&denial, Shape::OpenAi, &id, "-");
                return Action::Pause;
            }
        };
        if head.method.eq_ignore_ascii_case("CONNECT") {
            // Neither the sidecar without its forward proxy nor the filter serves a tunnel:
            // refused at once (never held open waiting for a body), the connection closed.
            let id = head.request_id.clone().unwrap_or_default();
            let denial = exchange::connect_refused(head.authority.as_deref());
            self.reply_with(&denial, Shape::OpenAi, &id, "-", &[("connection", "close")]);
            return Action::Pause;
        }
        match Exchange::start_lines(&plugin, head, &headers, t) {
            Ok(exchange) => {
                // As the sidecar: attribution first, then a body announced over the limit is
                // refused before any of it is read.
                let length = header("content-length").and_then(|v| v.trim().parse::<u64>().ok());
                if length.is_some_and(|n| n > plugin.filter.max_body_bytes) {
                    self.exchange = Some(exchange);
                    return self.too_large(&plugin);
                }
                let hold = plugin.filter.hold_headers && !end_of_stream;
                let rewrite =
                    plugin.filter.include_usage && !end_of_stream && exchange.may_rewrite_body();
                let attribution = plugin.engine.attribution();
                // What `Connection` names goes too (Envoy usually removed `Connection` itself).
                let nominated: Vec<String> = headers
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
                    .flat_map(|(_, v)| {
                        String::from_utf8_lossy(v)
                            .split(',')
                            .map(|n| n.trim().to_ascii_lowercase())
                            .collect::<Vec<_>>()
                    })
                    .collect();
                let dropped = |name: &str| {
                    (!plugin.filter.forward_attribution
                        && attribution.header_names().any(|a| name.eq_ignore_ascii_case(a)))
                        // The sidecar's hop-by-hop and proxy headers; Envoy's codec owns the
                        // framing (`transfer-encoding`) and the connection itself.
                        || (HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
                            && !name.eq_ignore_ascii_case("transfer-encoding")
                            && !name.eq_ignore_ascii_case("connection"))
                        || nominated.iter().any(|n| name.eq_ignore_ascii_case(n))
                        // Headers that go on before the body is seen cannot follow its rewrite.
                        || (rewrite && !hold && name.eq_ignore_ascii_case("content-length"))
                };
                for (name, _) in headers.iter().filter(|(n, _)| dropped(n)) {
                    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
                }
                self.may_rewrite = rewrite;
                self.held = hold;
                self.arrived = t;
                if end_of_stream {
                    self.exchange = Some(exchange);
                    return self.decide(&plugin, &[]);
                }
                self.await_body(exchange.shape, &exchange.request_id, t.ms.0);
                self.exchange = Some(exchange);
                if hold {
                    // Nothing goes upstream before the decision: Envoy holds these headers
                    // while the body hooks see the body (`allow_on_headers_stop_iteration`),
                    // and sends both on when the body hook continues.
                    Action::Pause
                } else {
                    // The body decides; the headers go on to the next filter (Envoy's buffer
                    // filter holds them there).
                    Action::Continue
                }
            }
            Err((denial, shape, id)) => {
                self.reply(&denial, shape, &id, "-");
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.timed_out() {
            self.local_reply = true;
        }
        if self.local_reply || self.decided {
            return Action::Continue;
        }
        if let Some(awaited) = &self.awaited {
            awaited.last_ms.set(now().ms.0);
            awaited.body_seen.set(true);
        }
        let Ok(plugin) = self.plugin() else { return Action::Continue };
        // A body without (or beyond) its announced length: refused once it passes the limit.
        if body_size as u64 > plugin.filter.max_body_bytes {
            return self.too_large(&plugin);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let action = self.decide(&plugin, &body);
        self.rewrite_body(&body, body_size);
        action
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.timed_out() {
            self.local_reply = true;
        }
        // A body ending in trailers never had `end_of_stream` on its last chunk.
        if self.local_reply || self.decided {
            return Action::Continue;
        }
        let Ok(plugin) = self.plugin() else { return Action::Continue };
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let action = self.decide(&plugin, &body);
        self.rewrite_body(&body, body.len());
        action
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.reclaim();
        if self.timed_out() {
            self.local_reply = true;
        }
        if self.local_reply {
            return Action::Continue;
        }
        let Some(exchange) = self.exchange.as_mut() else { return Action::Continue };
        let status = hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse().ok())
            .unwrap_or(0);
        if let Ok(Some(encoding)) =
            hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, "content-encoding")
        {
            exchange.response_encoding(&String::from_utf8_lossy(&encoding));
        }
        if exchange.rewrites_response() {
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, "content-length", None);
        }
        for (name, value) in exchange.response_headers(status) {
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
        }
        if end_of_stream {
            exchange.response_ended();
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.reclaim();
        if self.timed_out() {
            self.local_reply = true;
        }
        if self.local_reply {
            return Action::Continue;
        }
        let Some(exchange) = self.exchange.as_mut() else { return Action::Continue };
        let chunk = if body_size > 0 {
            hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        if let Some(out) = exchange.response_chunk(&chunk, end_of_stream) {
            if out != chunk.as_slice()
                && !set_buffer(BufferType::HttpResponseBody, 0, body_size, out)
            {
                log(LogLevel::Warn, "tollgate: cannot rewrite a response chunk");
            }
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        self.reclaim();
        if let Some(exchange) = self.exchange.as_mut() {
            exchange.response_ended();
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // A client gone while its body or its lease was awaited leaves nothing waiting.
        self.reclaim();
        self.forget_wait();
        let timed_out = self.timed_out();
        self.stop_awaiting();
        let Some(mut exchange) = self.exchange.take() else { return };
        if timed_out {
            return;
        }
        // Each request counted once: refusals when refused, the rest here, with the upstream's
        // status class.
        let status = status_class(exchange.upstream_status());
        if exchange.is_bypass() {
            self.vm.decision("bypass", "fail_open", "-", status);
        } else if let Some(reason) = exchange.reason() {
            self.vm.decision("allow", reason, exchange.model().unwrap_or("-"), status);
        }
        let Ok(plugin) = self.plugin() else { return };
        // How a response that did not complete ended, from Envoy's response flags.
        let flags = hostcalls::get_property(vec!["response", "flags"])
            .ok()
            .flatten()
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(0, u64::from_le_bytes);
        let broken = exchange::end_of(flags);
        let Some(mut event) = exchange.finish(&plugin, &self.vm.budgets, now(), broken) else {
            return;
        };
        // Logged, and with a collector reported to it: it raises the alert a sidecar raises
        // for its own, and lists the agent as disabled (`oversight.rs`).
        let reporting = plugin.filter.collector.is_some();
        if let Some(upstream) = &event.breaker_opened {
            let open_for_ms = plugin.breaker.map_or(0, |b| b.open_for_ms);
            log(
                LogLevel::Warn,
                &format!(
                    "tollgate: circuit breaker opened for upstream {upstream:?} for {open_for_ms} \
                     ms (request {})",
                    event.request_id
                ),
            );
            if reporting {
                let (upstream, at_ms) = (upstream.clone(), event.ts_ms);
                self.vm.report(Report::CircuitOpen { upstream, open_for_ms, at_ms });
            }
        }
        if let Some((standing, action)) = &event.agent_disabled {
            log(
                LogLevel::Warn,
                &format!(
                    "tollgate: agent {:?} disabled in this Envoy (status {}): {}",
                    event.agent,
                    event.status,
                    standing.explanation().unwrap_or_default()
                ),
            );
            if reporting {
                self.vm.report(Report::AgentDisabled {
                    agent: event.agent.clone(),
                    action: action.clone(),
                    status: u16::try_from(event.status).unwrap_or(0),
                    at_ms: event.ts_ms,
                });
            }
        }
        // A response priced by something other than its own listing; an implausible report is
        // billed at the reservation without being priced at all (counted on its own below), as
        // in the sidecar.
        let substitute = event.price_source.filter(|s| s.is_substitute());
        if let Some(source) = substitute.filter(|_| event.implausible.is_none()) {
            let level = match source {
                PriceSource::RequestedModel | PriceSource::Fallback => LogLevel::Warn,
                _ => LogLevel::Error,
            };
            self.vm.count_labelled(&schema::UNLISTED_MODEL_RESPONSES, &[source.as_str()]);
            log(
                level,
                &format!(
                    "tollgate: request {} answered by model {:?}, not on the rate card: charged \
                     {} at price_source {}",
                    event.request_id,
                    event.model.as_deref().unwrap_or("-"),
                    event.cost.total,
                    source.as_str()
                ),
            );
        }
        {
            let mut counters = self.vm.counters.borrow_mut();
            let mut recorder = self.vm.recorder.borrow_mut();
            recorder.usage(
                &mut *counters,
                &UsageLine {
                    model: event.model.as_deref().unwrap_or("-"),
                    agent: &event.agent,
                    project: &event.project,
                    cost_center: &event.cost_center,
                    usage: event.tokens,
                    cost: event.cost.total,
                },
            );
            for w in &event.warnings {
                recorder.budget_warning(&mut *counters, &w.budget_id, w.threshold_bp / 100);
            }
        }
        if let Some(why) = &event.implausible {
            self.vm.count(schema::USAGE_IMPLAUSIBLE.name, 1);
            let message = format!(
                "tollgate: request {}: implausible usage report, billed at the reservation \
                 (${}): {why}",
                event.request_id, event.cost.total
            );
            log(LogLevel::Warn, &message);
        }
        if event.overrun > Money::ZERO {
            let over = event.overrun;
            self.vm.count(schema::BUDGET_OVERRUN.name, over.nanos().unsigned_abs());
            let message = format!(
                "tollgate: request {}: the upstream reported more than was reserved; charged \
                 ${} in full, ${over} over the reservation",
                event.request_id, event.cost.total
            );
            log(LogLevel::Warn, &message);
        }
        if let Some(reason) = event.decode_aborted {
            self.vm.count_labelled(&schema::METER_DECODE_ABORTED, &[reason.as_str()]);
        }
        if let Some(collector) = &plugin.filter.collector {
            event.event_id = self.vm.next_event_id();
            if let Ok(line) = serde_json::to_string(&event.event) {
                let queued = Queued { id: event.event_id.clone(), line };
                let mut events = self.vm.events.borrow_mut();
                let full = events.len() >= collector.max_queued;
                if full {
                    events.pop_front();
                }
                events.push_back(queued);
                drop(events);
                if full {
                    self.vm.count(schema::USAGE_EVENTS_DROPPED.name, 1);
                }
            }
        }
    }
}
