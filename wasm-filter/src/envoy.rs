//! The proxy-wasm glue: moves bytes between Envoy and [`Exchange`], and owns the per-VM state
//! (compiled plugin, budget store, metric ids, queued usage events).
//!
//! Rules learned in the real Envoy (`shared/docs/envoy-wasm-notes.md`), each applied here:
//! request headers and response headers always `Continue` (a paused headers hook never sees its
//! body, G2); the request body is buffered (`Pause` until end of stream) because the decision
//! needs the model; the response body is observed chunk by chunk and always `Continue`s, so no
//! byte waits for the meter; our own local reply re-enters the response hooks and is left alone
//! (G1); headers are only set from headers hooks (G3); usage events go out from the root context
//! on a timer, because an HTTP context's own callouts are cancelled when its stream ends; host
//! calls that can fail are made through `hostcalls` and their errors handled, since a panic
//! kills the worker's VM (G4).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, Status};
use tollgate_core::budget::{Budgets, StoreError};
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

/// Envoy counters, defined on first use in this VM (ids are per VM, names shared: G5).
#[derive(Default)]
struct HostCounters {
    ids: HashMap<String, u32>,
}

impl Counters for HostCounters {
    fn add(&mut self, name: &str, n: u64) {
        let id = match self.ids.get(name) {
            Some(id) => *id,
            None => match hostcalls::define_metric(MetricType::Counter, name) {
                Ok(id) => {
                    self.ids.insert(name.to_owned(), id);
                    id
                }
                Err(_) => return,
            },
        };
        let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
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
    in_flight_calls: RefCell<HashMap<u32, usize>>,
}

impl Vm {
    fn count(&self, name: &str, n: u64) {
        self.counters.borrow_mut().add(name, n);
    }

    fn decision(&self, decision: &str, reason: &str, model: &str) {
        let mut counters = self.counters.borrow_mut();
        self.recorder.borrow_mut().decision(&mut *counters, decision, reason, model);
    }
}

impl Default for Vm {
    fn default() -> Self {
        Vm {
            config: RefCell::new(Config::Pending),
            budgets: Budgets::new(SharedStore::new(HostShared)),
            counters: RefCell::new(HostCounters::default()),
            recorder: RefCell::new(Recorder::new(1000)),
            events: RefCell::new(VecDeque::new()),
            in_flight_calls: RefCell::new(HashMap::new()),
        }
    }
}

#[derive(Default)]
struct Root {
    vm: Rc<Vm>,
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
        _body: usize,
        _trailers: usize,
    ) {
        let n = self.vm.in_flight_calls.borrow_mut().remove(&token).unwrap_or(0);
        let status = hostcalls::get_map_value(
            proxy_wasm::types::MapType::HttpCallResponseHeaders,
            ":status",
        )
        .ok()
        .flatten();
        let name = match status.as_deref() {
            Some(s) if s.starts_with('2') => "tollgate_usage_events_sent_total",
            _ => "tollgate_usage_events_failed_total",
        };
        self.vm.count(name, n as u64);
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let text = match hostcalls::get_buffer(
            proxy_wasm::types::BufferType::PluginConfiguration,
            0,
            usize::MAX,
        ) {
            Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            _ => String::new(),
        };
        if let Err(e) = shared::seed(&HostShared) {
            log(LogLevel::Warn, &format!("tollgate: cannot seed shared data: {e}"));
        }
        let config = match Plugin::from_document(&text) {
            Ok(plugin) => {
                *self.vm.recorder.borrow_mut() = Recorder::new(plugin.filter.max_label_values);
                let _ = hostcalls::set_tick_period(Duration::from_millis(plugin.filter.tick_ms));
                log(
                    LogLevel::Info,
                    &format!(
                        "tollgate: configured, policy version {}, fail {}",
                        plugin.engine.policy().version(),
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
                self.vm.count("tollgate_config_errors_total", 1);
                Config::Broken(fail)
            }
        };
        *self.vm.config.borrow_mut() = config;
        // Accept the configuration either way: a rejected one would take the whole listener
        // down, while a broken one answers per the configured fail policy and is reported.
        true
    }

    fn on_tick(&mut self) {
        let t = now();
        if let Err(e) = self.vm.budgets.expire(t.ms) {
            log(LogLevel::Warn, &format!("tollgate: expiring reservations: {e}"));
        }
        self.flush_events();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            vm: self.vm.clone(),
            exchange: None,
            local_reply: false,
            decided: false,
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
        let mut events = self.vm.events.borrow_mut();
        if events.is_empty() {
            return;
        }
        let n = events.len();
        let mut body = String::new();
        for e in events.iter() {
            body.push_str(e);
            body.push('\n');
        }
        let call = hostcalls::dispatch_http_call(
            &collector.cluster,
            vec![
                (":method", "POST"),
                (":path", &collector.path),
                (":authority", &collector.authority),
                ("content-type", "application/x-ndjson"),
            ],
            Some(body.as_bytes()),
            vec![],
            Duration::from_millis(collector.timeout_ms),
        );
        match call {
            Ok(token) => {
                events.clear();
                self.vm.in_flight_calls.borrow_mut().insert(token, n);
            }
            Err(status) => {
                log(LogLevel::Warn, &format!("tollgate: collector call failed: {status:?}"));
            }
        }
    }
}

struct Http {
    vm: Rc<Vm>,
    exchange: Option<Exchange>,
    /// Our own reply is passing through the response hooks (G1): leave it alone.
    local_reply: bool,
    decided: bool,
}

impl Context for Http {}

impl Http {
    fn header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(proxy_wasm::types::MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }

    fn reply(&mut self, denial: &Denial, shape: Shape, request_id: &str, model: &str) {
        let reply = denial.render(shape, request_id);
        let headers: Vec<(&str, &str)> =
            reply.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        self.local_reply = true;
        self.vm.decision(denial.class.decision(), &denial.code, model);
        let _ = hostcalls::send_http_response(reply.status, headers, Some(&reply.body));
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
        let result = exchange.decide(plugin, &self.vm.budgets, body, now());
        let action = match result {
            Ok(()) => {
                let model = exchange.model().unwrap_or("-").to_owned();
                let reason = exchange.reason().unwrap_or("-").to_owned();
                self.vm.decision("allow", &reason, &model);
                Action::Continue
            }
            Err(denial) => {
                let model = model_of(body).unwrap_or_else(|| "-".to_owned());
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

/// The model named by a refused request body, for the decision metric.
fn model_of(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("model")?.as_str().map(str::to_owned)
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let head = Head {
            method: self.header(":method").unwrap_or_default(),
            path: self.header(":path").unwrap_or_default(),
            authority: self.header(":authority"),
            request_id: self.header("x-request-id"),
        };
        let t = now();
        let plugin = match self.plugin() {
            Ok(plugin) => plugin,
            Err(FailPolicy::Open) => {
                self.vm.count("tollgate_fail_open_total", 1);
                self.vm.decision("bypass", "fail_open", "-");
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
        match Exchange::start(&plugin, head, |name| self.header(name), t) {
            Ok(exchange) => {
                if !plugin.filter.forward_attribution {
                    for name in plugin.engine.attribution().header_names() {
                        let _ = hostcalls::set_map_value(
                            proxy_wasm::types::MapType::HttpRequestHeaders,
                            name,
                            None,
                        );
                    }
                }
                self.exchange = Some(exchange);
                if end_of_stream {
                    return self.decide(&plugin, &[]);
                }
                // The body decides; headers go on (pausing here would hide the body, G2).
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
        let body =
            hostcalls::get_buffer(proxy_wasm::types::BufferType::HttpRequestBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default();
        self.decide(&plugin, &body)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // A body ending in trailers never had `end_of_stream` on its last chunk.
        if self.local_reply || self.decided {
            return Action::Continue;
        }
        let Ok(plugin) = self.plugin() else { return Action::Continue };
        let body =
            hostcalls::get_buffer(proxy_wasm::types::BufferType::HttpRequestBody, 0, usize::MAX)
                .ok()
                .flatten()
                .unwrap_or_default();
        self.decide(&plugin, &body)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.local_reply {
            return Action::Continue;
        }
        let Some(exchange) = self.exchange.as_mut() else { return Action::Continue };
        let status =
            hostcalls::get_map_value(proxy_wasm::types::MapType::HttpResponseHeaders, ":status")
                .ok()
                .flatten()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
        for (name, value) in exchange.response_headers(status) {
            let _ = hostcalls::set_map_value(
                proxy_wasm::types::MapType::HttpResponseHeaders,
                name,
                Some(&value),
            );
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
        if let Some(exchange) = self.exchange.as_mut() {
            if body_size > 0 {
                if let Ok(Some(chunk)) = hostcalls::get_buffer(
                    proxy_wasm::types::BufferType::HttpResponseBody,
                    0,
                    body_size,
                ) {
                    exchange.response_chunk(&chunk, end_of_stream);
                }
            } else if end_of_stream {
                exchange.response_ended();
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
        let Ok(plugin) = self.plugin() else { return };
        let Some(event) = exchange.finish(&plugin, &self.vm.budgets, now()) else { return };
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
                    cost: event.cost_usd,
                },
            );
            for w in &event.warnings {
                recorder.budget_warning(&mut *counters, &w.budget_id, w.threshold_bp / 100);
            }
        }
        if let Some(collector) = &plugin.filter.collector {
            if let Ok(line) = serde_json::to_string(&event) {
                let mut events = self.vm.events.borrow_mut();
                if events.len() >= collector.max_queued {
                    events.pop_front();
                    drop(events);
                    self.vm.count("tollgate_usage_events_dropped_total", 1);
                    events = self.vm.events.borrow_mut();
                }
                events.push_back(line);
            }
        }
    }
}
