//! The proxy-wasm glue: moves bytes between Envoy and [`Exchange`], and owns the per-VM state
//! (compiled plugin and the policy in force, budget store, metric ids and pending increments,
//! queued usage events, policy polling).
//!
//! Rules learned in the real Envoy, each applied here:
//! request headers and response headers always `Continue` (a paused headers hook never sees its
//! body); the request body is buffered (`Pause` until end of stream) because the decision
//! needs the model, and may be replaced there (the usage rewrite), which is why the request's
//! `content-length` is dropped in the headers hook when it may be; the response body is observed
//! chunk by chunk and always `Continue`s, so no byte waits for the meter (only the usage-chunk
//! filter may hold one incomplete SSE event); our own local reply re-enters the response hooks
//! and is left alone; headers are only set from headers hooks; usage events, metric
//! increments and policy polls go out from the root context on the timer, once per VM,
//! because an HTTP context's own callouts are cancelled when its stream ends; host calls that
//! can fail are made through `hostcalls` (or the raw import, for buffer writes) and their errors
//! handled, since a panic kills the worker's VM.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};
use tollgate_core::budget::{Budgets, StoreError};
use tollgate_core::metrics::{self as schema, Metric};
use tollgate_core::money::Money;
use tollgate_core::policy::Snapshot;
use tollgate_core::pricing::PriceSource;
use tollgate_core::refusal::status_class;
use tollgate_core::time::UnixMillis;

use crate::exchange::{Exchange, Head, Now};
use crate::metrics::{Counters, Recorder, UsageLine};
use crate::reply::{Class, Denial, Shape};
use crate::settings::{fail_policy_of, FailPolicy, Plugin};
use crate::shared::{self, SharedData, SharedStore};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
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

    /// Hands the summed increments to Envoy.
    fn flush(&mut self) {
        for (id, n) in self.pending.drain() {
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
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
    budgets: Budgets<SharedStore<HostShared>>,
    counters: RefCell<HostCounters>,
    recorder: RefCell<Recorder>,
    events: RefCell<VecDeque<String>>,
    /// A batch of usage events is on its way (one at a time per VM).
    sending: Cell<bool>,
    in_flight_calls: RefCell<HashMap<u32, Call>>,
    poll: RefCell<PolicyPoll>,
    /// Usage event ids: a random per-VM prefix and a sequence number.
    event_prefix: u64,
    event_seq: Cell<u64>,
}

/// Most usage events in one POST.
const MAX_BATCH: usize = 1000;

/// What an outgoing `dispatch_http_call` was for.
enum Call {
    /// A batch of usage events (the lines, to put back if the collector did not take them).
    Events(Vec<String>),
    /// A policy poll.
    Policy,
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
    fn requeue(&self, lines: Vec<String>, max_queued: usize) {
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

    /// Adds one to the series of `metric` with label `values` (policy or fixed vocabularies).
    fn count_labelled(&self, metric: &Metric, values: &[&str]) {
        let mut counters = self.counters.borrow_mut();
        self.recorder.borrow_mut().count(&mut *counters, metric, values, 1);
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
            budgets: Budgets::new(SharedStore::new(HostShared).with_id_prefix(prefix)),
            counters: RefCell::new(HostCounters::default()),
            recorder: RefCell::new(Recorder::new(1000)),
            events: RefCell::new(VecDeque::new()),
            sending: Cell::new(false),
            in_flight_calls: RefCell::new(HashMap::new()),
            poll: RefCell::new(PolicyPoll::default()),
            event_prefix: prefix,
            event_seq: Cell::new(0),
        }
    }
}

#[derive(Default)]
struct Root {
    vm: Rc<Vm>,
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
            Some(Call::Events(lines)) => {
                self.vm.sending.set(false);
                let n = lines.len() as u64;
                match status.as_deref() {
                    Some(s) if s.starts_with('2') => {
                        self.vm.count(schema::USAGE_EVENTS_SENT.name, n);
                    }
                    // Refused for good (bad lines, or a bad token): sending again cannot help.
                    // The collector took the good lines of a 422.
                    Some(s) if s.starts_with('4') => {
                        self.vm.count(schema::USAGE_EVENTS_REJECTED.name, n);
                        log(
                            LogLevel::Warn,
                            &format!("tollgate: the collector refused {n} usage events with {s}"),
                        );
                    }
                    // No answer (timeout, reset) or a 5xx: sent again on a later tick. The
                    // collector may have taken them already; it deduplicates by event id.
                    _ => {
                        self.vm.count(schema::USAGE_EVENTS_FAILED.name, n);
                        let max = match &*self.vm.config.borrow() {
                            Config::Ready(p) => p.filter.collector.as_ref().map(|c| c.max_queued),
                            _ => None,
                        };
                        self.vm.requeue(lines, max.unwrap_or(0));
                    }
                }
            }
            Some(Call::Policy) => {
                self.vm.poll.borrow_mut().in_flight = false;
                self.policy_response(status.as_deref(), body_size);
            }
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
        self.vm.counters.borrow_mut().flush();
        let t = now();
        if let Err(e) = self.vm.budgets.expire(t.ms) {
            log(LogLevel::Warn, &format!("tollgate: expiring reservations: {e}"));
        }
        self.flush_events();
        self.poll_policy(t.ms.0);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            vm: self.vm.clone(),
            exchange: None,
            local_reply: false,
            decided: false,
            may_rewrite: false,
            arrived: Now { ms: UnixMillis(0), ns: 0 },
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Root {
    /// Sends the queued usage events as one NDJSON POST to the collector cluster.
    fn flush_events(&mut self) {
        let plugin = match &*self.vm.config.borrow() {
            Config::Ready(p) => p.clone(),
            _ => return,
        };
        let Some(collector) = &plugin.filter.collector else { return };
        if self.vm.sending.get() {
            return;
        }
        let mut events = self.vm.events.borrow_mut();
        if events.is_empty() {
            return;
        }
        let n = events.len().min(MAX_BATCH);
        let mut body = String::new();
        for e in events.iter().take(n) {
            body.push_str(e);
            body.push('\n');
        }
        let mut headers = vec![
            (":method", "POST"),
            (":path", collector.path.as_str()),
            (":authority", collector.authority.as_str()),
            ("content-type", "application/x-ndjson"),
        ];
        headers.extend(collector.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        let call = hostcalls::dispatch_http_call(
            &collector.cluster,
            headers,
            Some(body.as_bytes()),
            vec![],
            Duration::from_millis(collector.timeout_ms),
        );
        match call {
            Ok(token) => {
                let lines: Vec<String> = events.drain(..n).collect();
                self.vm.sending.set(true);
                self.vm.in_flight_calls.borrow_mut().insert(token, Call::Events(lines));
            }
            Err(status) => {
                log(LogLevel::Warn, &format!("tollgate: collector call failed: {status:?}"));
            }
        }
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
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
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
    vm: Rc<Vm>,
    exchange: Option<Exchange>,
    /// Our own reply is passing through the response hooks: leave it alone.
    local_reply: bool,
    decided: bool,
    /// The request's `content-length` was removed so that its body may be rewritten.
    may_rewrite: bool,
    /// When the request headers arrived: the time its decision is made at (one clock read
    /// fewer per request; the body follows within the request's own upload time).
    arrived: Now,
}

impl Context for Http {}

impl Http {
    fn reply(&mut self, denial: &Denial, shape: Shape, request_id: &str, model: &str) {
        let reply = denial.render(shape, request_id);
        let headers: Vec<(&str, &str)> =
            reply.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        self.local_reply = true;
        self.vm.decision(denial.class.decision(), &denial.code, model, "none");
        let _ = hostcalls::send_http_response(u32::from(reply.status), headers, Some(&reply.body));
    }

    fn plugin(&self) -> Result<Rc<Plugin>, FailPolicy> {
        match &*self.vm.config.borrow() {
            Config::Ready(p) => Ok(p.clone()),
            Config::Broken(fail) => Err(*fail),
            Config::Pending => Err(FailPolicy::Closed),
        }
    }

    /// Decides on the complete request body; replies on a refusal.
    fn decide(&mut self, plugin: &Plugin, body: &[u8]) -> Action {
        self.decided = true;
        let Some(mut exchange) = self.exchange.take() else { return Action::Continue };
        let result = exchange.decide(plugin, &self.vm.budgets, body, self.arrived);
        let action = match result {
            // Counted when it ends (`on_log`), with the upstream's status.
            Ok(()) => Action::Continue,
            Err(denial) => {
                // As the sidecar: no model for a body that could not be inspected (a duplicated
                // `model` is one, and which copy is the model is the question).
                let model = (denial.code != "malformed_body")
                    .then(|| model_of(body))
                    .flatten()
                    .unwrap_or_else(|| schema::NONE.to_owned());
                let (shape, id) = (exchange.shape, exchange.request_id.clone());
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
    /// Asks an admitted OpenAI stream for usage (see [`Exchange::usage_rewrite`]).
    fn rewrite_body(&mut self, body: &[u8], body_size: usize) {
        if !self.may_rewrite || self.local_reply {
            return;
        }
        let Some(exchange) = self.exchange.as_mut() else { return };
        if let Some(rewritten) = exchange.usage_rewrite(body) {
            if !set_buffer(BufferType::HttpRequestBody, 0, body_size, &rewritten) {
                log(LogLevel::Warn, "tollgate: cannot rewrite the request body for usage");
            }
        }
    }
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
        match Exchange::start_lines(&plugin, head, &headers, t) {
            Ok(exchange) => {
                // Headers go upstream before the body is seen (a body hook cannot change them):
                // a body that may be rewritten loses its length now.
                let rewrite =
                    plugin.filter.include_usage && !end_of_stream && exchange.may_rewrite_body();
                let attribution = plugin.engine.attribution();
                let dropped = |name: &str| {
                    (!plugin.filter.forward_attribution
                        && attribution.header_names().any(|a| name.eq_ignore_ascii_case(a)))
                        || (rewrite && name.eq_ignore_ascii_case("content-length"))
                };
                for (name, _) in headers.iter().filter(|(n, _)| dropped(n)) {
                    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
                }
                self.may_rewrite = rewrite;
                self.arrived = t;
                self.exchange = Some(exchange);
                if end_of_stream {
                    return self.decide(&plugin, &[]);
                }
                // The body decides; headers go on (pausing here would hide the body).
                Action::Continue
            }
            Err((denial, shape, id)) => {
                self.reply(&denial, shape, &id, "-");
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.local_reply || self.decided {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let Ok(plugin) = self.plugin() else { return Action::Continue };
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let action = self.decide(&plugin, &body);
        self.rewrite_body(&body, body_size);
        action
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
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
        if let Some(exchange) = self.exchange.as_mut() {
            exchange.response_ended();
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let Some(mut exchange) = self.exchange.take() else { return };
        // Each request counted once: refusals when refused, the rest here, with the upstream's
        // status class.
        let status = status_class(exchange.upstream_status());
        if exchange.is_bypass() {
            self.vm.decision("bypass", "fail_open", "-", status);
        } else if let Some(reason) = exchange.reason() {
            self.vm.decision("allow", reason, exchange.model().unwrap_or("-"), status);
        }
        let Ok(plugin) = self.plugin() else { return };
        let Some(mut event) = exchange.finish(&plugin, &self.vm.budgets, now()) else { return };
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
                let mut events = self.vm.events.borrow_mut();
                if events.len() >= collector.max_queued {
                    events.pop_front();
                    drop(events);
                    self.vm.count(schema::USAGE_EVENTS_DROPPED.name, 1);
                    events = self.vm.events.borrow_mut();
                }
                events.push_back(line);
            }
        }
    }
}
