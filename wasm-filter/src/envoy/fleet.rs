//! Fleet mode's glue (`store: {collector: {}}`, see [`crate::lease`]): requests that wait for a
//! lease, and the root timer's exchanges with the collector.
//!
//! A stream's own callouts die with the stream, so every lease exchange is made by the root
//! context on its timer (at most one `store.collector.sync_interval` after a request began to
//! wait). When an answer lets a waiting request go on (or refuses it), the root acts in that
//! request's context, as the stalled-body timeout does: it resumes the decision there, then
//! resumes the request or answers it. The request's context takes its state back on its next
//! hook ([`Http::reclaim`]).

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType};
use tollgate_core::approval::remote::RemoteAnswer;
use tollgate_core::budget::lease::SyncAnswer;
use tollgate_core::lifecycle::Parked;
use tollgate_core::metrics as schema;

use super::{
    callout_body, collector_call, json_answer, log, model_of, now, set_buffer, Call, Config, Http,
    Root, Vm,
};
use crate::exchange::{Ask, AskCall, Decided, Exchange, Now};
use crate::lease::Outgoing;
use crate::reply::{Class, Denial};
use crate::settings::{Plugin, APPROVALS_PATH, LEASES_PATH, LOOPS_PATH, REDEEM_PATH};

/// A request whose stream is paused while the collector is asked, kept by the VM.
pub(super) struct Paused {
    pub exchange: Exchange,
    /// The request body (the decision reads it again on resuming).
    pub body: Vec<u8>,
    pub plugin: Rc<Plugin>,
    pub may_rewrite: bool,
    pub held: bool,
    pub since_ms: u64,
}

/// A request waiting for a lease.
pub(super) struct Waiter {
    pub paused: Paused,
    pub parked: Box<Parked>,
}

/// A request waiting for the collector's approval service (one call each).
pub(super) struct Asking {
    pub paused: Paused,
    pub ask: Box<Ask>,
    /// The call is on its way.
    pub sent: bool,
}

/// A request the root woke: its state, for its context to take back.
pub(super) struct Woken {
    pub exchange: Option<Exchange>,
    /// The root answered it with a refusal.
    pub refused: bool,
}

/// The state of a VM's periodic call to the collector (the disabled agents' poll, the loop
/// stream's sync): when it is next due, and whether one is on its way.
#[derive(Default)]
pub(super) struct Periodic {
    pub next_ms: std::cell::Cell<u64>,
    pub in_flight: std::cell::Cell<bool>,
}

/// Most exchanges in one call to the collector (its own limit).
const MAX_SYNCS: usize = 256;

impl Http {
    fn paused(&self, exchange: Exchange, plugin: &Rc<Plugin>, body: &[u8]) -> Paused {
        Paused {
            exchange,
            body: body.to_vec(),
            plugin: plugin.clone(),
            may_rewrite: self.may_rewrite,
            held: self.held,
            since_ms: now().ms.0,
        }
    }

    /// Parks this request until its lease is refilled: the root's timer asks the collector.
    pub(super) fn wait_for_lease(
        &mut self,
        exchange: Exchange,
        parked: Box<Parked>,
        plugin: &Rc<Plugin>,
        body: &[u8],
    ) {
        self.vm.budgets.leases().want(&parked.refill);
        let waiter = Waiter { paused: self.paused(exchange, plugin, body), parked };
        self.vm.waiting.borrow_mut().insert(self.context_id, waiter);
    }

    /// Parks this request until the collector raised its approval (then it is refused with the
    /// approval's id) or used the granted one it names (then it goes on).
    pub(super) fn ask_approval(
        &mut self,
        exchange: Exchange,
        ask: Box<Ask>,
        plugin: &Rc<Plugin>,
        body: &[u8],
    ) {
        let asking = Asking { paused: self.paused(exchange, plugin, body), ask, sent: false };
        self.vm.asking.borrow_mut().insert(self.context_id, asking);
    }

    /// Takes back what the root left for this request when it woke it; forgets a wait the
    /// client gave up on.
    pub(super) fn reclaim(&mut self) {
        if let Some(woken) = self.vm.woken.borrow_mut().remove(&self.context_id) {
            self.exchange = woken.exchange;
            if woken.refused {
                self.local_reply = true;
            }
        }
    }

    /// The stream ends: a request still waiting stops waiting.
    pub(super) fn forget_wait(&mut self) {
        if let Some(w) = self.vm.waiting.borrow_mut().remove(&self.context_id) {
            self.vm.budgets.leases().unwait(&w.parked.refill);
        }
        self.vm.asking.borrow_mut().remove(&self.context_id);
    }
}

impl Root {
    /// Sends the exchanges due (waiting requests, spend to report, leases to renew or give
    /// back) to the collector, and wakes requests that waited too long.
    pub(super) fn sync_leases(&self, t: Now) {
        let plugin = match &*self.vm.config.borrow() {
            Config::Ready(p) => p.clone(),
            _ => return,
        };
        let (Some(fleet), Some(collector)) = (plugin.fleet, plugin.filter.collector.as_ref())
        else {
            return;
        };
        self.wake_ready(t, collector.timeout_ms.saturating_mul(2).max(1_000));
        let leases = self.vm.budgets.leases();
        let due = leases.due(t.ms, leases.ttl_ms() / 3, false, fleet.slice_bp);
        for chunk in due.chunks(MAX_SYNCS) {
            self.send_exchanges(&plugin, chunk.to_vec());
        }
        self.send_asks(&plugin);
        self.sync_loops(&plugin, fleet.sync_ms, t);
    }

    /// Sends this VM's new tool calls to the fleet's loop stream and reads the others' (see
    /// `tollgate_core::guardrails::loops::Merged`), every `sync_interval` as a sidecar does.
    fn sync_loops(&self, plugin: &Plugin, sync_ms: u64, t: Now) {
        let (Some(collector), Some(config)) = (plugin.filter.collector.as_ref(), plugin.loops)
        else {
            return;
        };
        let sync = &self.vm.loop_sync;
        if sync.in_flight.get() || t.ms.0 < sync.next_ms.get() {
            return;
        }
        let mut loops = self.vm.budgets.loops.borrow_mut();
        loops.configure(config);
        let Some(out) = loops.outgoing() else { return };
        drop(loops);
        sync.next_ms.set(t.ms.0.saturating_add(sync_ms));
        let body = tollgate_core::guardrails::loops::merged::Sync {
            holder: self.vm.holder.clone(),
            since: out.since.clone(),
            window_ms: out.window_ms,
            calls: out.wire_calls().collect(),
        };
        let body = serde_json::to_vec(&body).unwrap_or_default();
        match collector_call(collector, LOOPS_PATH, Some(("application/json", &body))) {
            Ok(token) => {
                sync.in_flight.set(true);
                self.vm.in_flight_calls.borrow_mut().insert(token, Call::Loops(out));
            }
            Err(_) => {
                self.vm.budgets.loops.borrow_mut().failed(out);
                self.vm.count(schema::STORE_ERRORS.name, 1);
            }
        }
    }

    /// The collector's answer to a loop sync: the others' calls are merged; without one, this
    /// VM's calls go again with the next sync.
    pub(super) fn loops_answered(
        &self,
        sent: tollgate_core::guardrails::loops::merged::Outgoing,
        status: Option<&str>,
        body_size: usize,
    ) {
        self.vm.loop_sync.in_flight.set(false);
        let body = callout_body(body_size);
        let answer = json_answer::<tollgate_core::guardrails::loops::merged::Synced>(status, &body);
        let mut loops = self.vm.budgets.loops.borrow_mut();
        match answer {
            Some(synced) => {
                loops.read(&synced.since, synced.calls.iter().map(String::as_str), now().ms.0)
            }
            _ => {
                log(
                    LogLevel::Warn,
                    &format!(
                        "tollgate: the collector answered {} to a loop sync: {}",
                        status.unwrap_or("nothing"),
                        String::from_utf8_lossy(&body[..body.len().min(256)])
                    ),
                );
                loops.failed(sent);
                drop(loops);
                self.vm.count(schema::STORE_ERRORS.name, 1);
            }
        }
    }

    /// Sends each new approval question to the collector.
    fn send_asks(&self, plugin: &Plugin) {
        let Some(collector) = plugin.filter.collector.as_ref() else { return };
        let fresh: Vec<(u32, &'static str, String)> = self
            .vm
            .asking
            .borrow_mut()
            .iter_mut()
            .filter(|(_, a)| !a.sent)
            .map(|(id, a)| {
                a.sent = true;
                let (path, body) = match &a.ask.call {
                    AskCall::Raise(r) => (APPROVALS_PATH, serde_json::to_string(r)),
                    AskCall::Redeem(r) => (REDEEM_PATH, serde_json::to_string(r)),
                };
                (*id, path, body.unwrap_or_default())
            })
            .collect();
        for (id, path, body) in fresh {
            let call = collector_call(collector, path, Some(("application/json", body.as_bytes())));
            match call {
                Ok(token) => {
                    self.vm.in_flight_calls.borrow_mut().insert(token, Call::Approval(id));
                }
                Err(status) => {
                    log(LogLevel::Warn, &format!("tollgate: approval call failed: {status:?}"));
                    self.approval_answered(id, None, 0);
                }
            }
        }
    }

    /// The collector's answer about one request's approval (`status` `None`: no answer).
    pub(super) fn approval_answered(&self, id: u32, status: Option<&str>, body_size: usize) {
        let Some(asking) = self.vm.asking.borrow_mut().remove(&id) else { return };
        let body = status.map(|_| callout_body(body_size)).unwrap_or_default();
        let answer = json_answer::<RemoteAnswer>(status, &body);
        let answer = answer.unwrap_or_else(|| {
            log(
                LogLevel::Warn,
                &format!(
                    "tollgate: the collector answered {} to an approval question: {}",
                    status.unwrap_or("nothing"),
                    String::from_utf8_lossy(&body[..body.len().min(512)])
                ),
            );
            RemoteAnswer {
                ok: false,
                id: None,
                class: Some("unavailable".into()),
                code: Some("approvals_unavailable".into()),
                message: "the approval service (the collector) cannot be reached right now; \
                          retry shortly"
                    .into(),
            }
        });
        let Asking { paused, ask, .. } = asking;
        let t = now();
        if hostcalls::set_effective_context(id).is_ok() {
            let result = match (&ask.call, answer.ok) {
                (AskCall::Redeem(_), true) => {
                    let mut paused = paused;
                    let Ask { pending, .. } = *ask;
                    let result = paused.exchange.granted(
                        &paused.plugin,
                        &self.vm.budgets,
                        &paused.body,
                        pending,
                        t,
                    );
                    self.go_on(id, paused, result);
                    let _ = hostcalls::set_effective_context(self.context_id);
                    return;
                }
                _ => ask.refusal(&answer),
            };
            let mut paused = paused;
            paused.exchange.asked(result.class);
            self.refuse(id, paused, &result);
        }
        let _ = hostcalls::set_effective_context(self.context_id);
    }

    fn send_exchanges(&self, plugin: &Plugin, batch: Vec<Outgoing>) {
        let Some(collector) = plugin.filter.collector.as_ref() else { return };
        let syncs: Vec<serde_json::Value> = batch
            .iter()
            .map(|o| {
                let mut v = serde_json::to_value(o.args).unwrap_or_default();
                v["counter"] = serde_json::Value::from(o.counter.as_str());
                v
            })
            .collect();
        let body = serde_json::json!({"holder": self.vm.holder, "syncs": syncs}).to_string();
        let call =
            collector_call(collector, LEASES_PATH, Some(("application/json", body.as_bytes())));
        let counters: Vec<String> = batch.into_iter().map(|o| o.counter).collect();
        match call {
            Ok(token) => {
                self.vm.in_flight_calls.borrow_mut().insert(token, Call::Leases(counters));
            }
            Err(status) => {
                log(LogLevel::Warn, &format!("tollgate: lease exchange call failed: {status:?}"));
                let leases = self.vm.budgets.leases();
                for c in &counters {
                    leases.answered(c, None, leases.ttl_ms());
                }
                self.vm.count(schema::STORE_ERRORS.name, 1);
            }
        }
    }

    /// The collector's answer to a lease exchange: each counter's answer taken, then the
    /// requests waiting for them woken.
    pub(super) fn leases_answered(
        &self,
        counters: Vec<String>,
        status: Option<&str>,
        body_size: usize,
    ) {
        #[derive(serde::Deserialize)]
        struct Answers {
            answers: Vec<Answer>,
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            counter: String,
            #[serde(flatten)]
            answer: Option<SyncAnswer>,
            ttl_ms: Option<u64>,
            error: Option<String>,
        }
        let body = callout_body(body_size);
        let parsed = json_answer::<Answers>(status, &body);
        let leases = self.vm.budgets.leases();
        let t = now();
        leases.set_now(t.ms);
        let mut failed = 0u64;
        match parsed {
            Some(answers) => {
                for counter in &counters {
                    let found = answers.answers.iter().find(|a| &a.counter == counter);
                    let ttl = found.and_then(|a| a.ttl_ms).unwrap_or(leases.ttl_ms());
                    match found {
                        Some(Answer { answer: Some(a), error: None, .. }) => {
                            leases.answered(counter, Some(*a), ttl)
                        }
                        other => {
                            failed += 1;
                            let why = other
                                .and_then(|a| a.error.clone())
                                .unwrap_or_else(|| "no answer for it".into());
                            log(
                                LogLevel::Warn,
                                &format!("tollgate: lease exchange for {counter} failed: {why}"),
                            );
                            leases.answered(counter, None, ttl);
                        }
                    }
                }
            }
            None => {
                failed = counters.len() as u64;
                log(
                    LogLevel::Warn,
                    &format!(
                        "tollgate: the collector answered {} to a lease exchange of {} \
                         counters: {}",
                        status.unwrap_or("nothing"),
                        counters.len(),
                        String::from_utf8_lossy(&body[..body.len().min(512)])
                    ),
                );
                for counter in &counters {
                    leases.answered(counter, None, leases.ttl_ms());
                }
            }
        }
        if failed > 0 {
            self.vm.count(schema::STORE_ERRORS.name, failed);
        }
        self.wake_ready(t, u64::MAX);
    }

    /// Wakes each waiting request whose lease can now cover it, whose counter the collector
    /// said is exhausted or could not serve, or that waited longer than `max_wait_ms`.
    fn wake_ready(&self, t: Now, max_wait_ms: u64) {
        let leases = self.vm.budgets.leases();
        let ready: Vec<u32> = self
            .vm
            .waiting
            .borrow()
            .iter()
            .filter(|(_, w)| {
                let r = &w.parked.refill;
                leases.covers(r, t.ms)
                    || leases.refused(r, t.ms)
                    || leases.down(r, t.ms)
                    || t.ms.0.saturating_sub(w.paused.since_ms) > max_wait_ms
            })
            .map(|(id, _)| *id)
            .collect();
        if ready.is_empty() {
            for w in self.vm.waiting.borrow().values() {
                leases.ask_for(&w.parked.refill);
            }
            return;
        }
        for id in ready {
            let Some(w) = self.vm.waiting.borrow_mut().remove(&id) else { continue };
            leases.unwait(&w.parked.refill);
            self.wake(id, w, t, max_wait_ms);
        }
        let _ = hostcalls::set_effective_context(self.context_id);
        // Whoever still waits is asked for again: every answer serves, refuses or asks anew.
        for w in self.vm.waiting.borrow().values() {
            leases.ask_for(&w.parked.refill);
        }
    }

    /// Resumes one waiting request's decision in its own context, then lets it go on or answers
    /// it.
    fn wake(&self, id: u32, w: Waiter, t: Now, max_wait_ms: u64) {
        if hostcalls::set_effective_context(id).is_err() {
            return;
        }
        let Waiter { mut paused, parked } = w;
        let waited_too_long = t.ms.0.saturating_sub(paused.since_ms) > max_wait_ms;
        let result = if waited_too_long {
            paused.exchange.gave_up_waiting();
            Err(unavailable())
        } else {
            paused.exchange.resume(&paused.plugin, &self.vm.budgets, &paused.body, parked, t)
        };
        self.go_on(id, paused, result);
    }

    /// Acts on a paused request's resumed decision, in its context: lets it go on (with the usage
    /// rewrite), parks it again, or answers it.
    fn go_on(&self, id: u32, mut paused: Paused, result: Result<Decided, Denial>) {
        self.vm.count_verdict(&mut paused.exchange);
        match result {
            Ok(Decided::Admitted) => {
                let Paused { mut exchange, body, may_rewrite, held, .. } = paused;
                if may_rewrite {
                    if let Some(rewritten) = exchange.usage_rewrite(&body) {
                        if set_buffer(BufferType::HttpRequestBody, 0, body.len(), &rewritten) {
                            if held {
                                let length = rewritten.len().to_string();
                                let _ = hostcalls::set_map_value(
                                    MapType::HttpRequestHeaders,
                                    "content-length",
                                    Some(&length),
                                );
                            }
                        } else {
                            log(
                                LogLevel::Warn,
                                "tollgate: cannot rewrite the request body for usage",
                            );
                        }
                    }
                }
                self.vm
                    .woken
                    .borrow_mut()
                    .insert(id, Woken { exchange: Some(exchange), refused: false });
                let _ = hostcalls::resume_http_request();
            }
            Ok(Decided::Short(parked)) => {
                // Another request of this VM took the grant first: wait for the next one.
                self.vm.budgets.leases().want(&parked.refill);
                self.vm.waiting.borrow_mut().insert(id, Waiter { paused, parked });
            }
            Ok(Decided::Approval(ask)) => {
                // Only a fresh decision asks, never one resumed from the budgets.
                let asking = Asking { paused, ask, sent: false };
                self.vm.asking.borrow_mut().insert(id, asking);
            }
            Err(denial) => self.refuse(id, paused, &denial),
        }
    }

    /// Answers a paused request with `denial`, in its context (which is the effective one).
    fn refuse(&self, id: u32, paused: Paused, denial: &Denial) {
        let Paused { mut exchange, body, .. } = paused;
        self.vm.count_verdict(&mut exchange);
        if let Some(record) = exchange.proposal(&denial.code) {
            log(LogLevel::Info, &format!("tollgate: proposal {record}"));
        }
        self.vm.woken.borrow_mut().insert(id, Woken { exchange: None, refused: true });
        let model = model_of(&body).unwrap_or_else(|| schema::NONE.to_owned());
        self.vm.send_refusal(denial, exchange.shape, &exchange.request_id, &model, &[]);
    }
}

/// A request that waited for its lease longer than the collector could take to answer.
fn unavailable() -> Denial {
    let mut d = Denial::new(
        Class::Unavailable,
        "budget_store_unavailable",
        "budgets cannot be checked right now: the collector did not grant a lease in time; retry \
         shortly",
    );
    d.retry_after_secs = Some(1);
    d
}

impl Vm {
    /// This VM's name as a lease holder.
    pub(super) fn holder_name(prefix: u64) -> String {
        format!("vm-{prefix:016x}")
    }
}
