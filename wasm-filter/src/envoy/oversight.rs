//! The filter's circuit breakers and error escalation, seen from outside: their gauge
//! (`tollgate_circuit_breaker_state{upstream}`), and with `filter.collector` what a sidecar does
//! for its own, through the collector.
//!
//! - **Gauge.** Every change of a breaker's state is one compare-and-swap of its slot in shared
//!   data, which says by how much the upstream's gauge moves
//!   (`tollgate_core::guardrails::breaker::Changed`); the exchange keeps the moves its VM made
//!   ([`crate::exchange::Live::breaker_moves`]) and the root hands them to Envoy on its tick.
//!   The stat, one for every VM, is the sum of the transitions: the state.
//! - **Reports.** Each breaker opening and each agent disabled here is queued in the VM and sent
//!   on the root's tick (`POST /v1/fleet/oversight/reports`, one call at a time), so that the
//!   collector raises the `circuit_open` / `agent_disabled` alert with its `alerts:`, writes the
//!   `agent_disabled` audit record and lists the agent as disabled. A report the collector did
//!   not take goes again on the next tick; the queue is bounded (the oldest beyond it is
//!   dropped, logged and counted in `tollgate_oversight_reports_dropped_total`, as is a report
//!   the collector refuses for good).
//! - **Re-enable.** With escalation (or in fleet mode) each VM reads the collector's disabled
//!   agents every second (`GET /v1/fleet/agents/disabled`) and refuses them. An agent the
//!   collector had (a read listed it, or it took this VM's report of it) and that a later read
//!   no longer lists was re-enabled by an operator through the collector: the VM re-enables it
//!   in this Envoy's escalation slot, but only a disabling the collector had
//!   ([`crate::exchange::DisabledSet`], [`crate::exchange::reenable`]). An agent disabled here
//!   whose report has not reached the collector yet was never listed, so a read that does not
//!   list it changes nothing; one disabled again after the re-enable stays disabled.

use proxy_wasm::types::LogLevel;
use tollgate_core::guardrails::report::{Answer, Report, Reports, Taken};
use tollgate_core::metrics as schema;
use tollgate_core::time::UnixMillis;

use super::{callout_body, collector_call, json_answer, log, Call, Config, Root, Vm};
use crate::exchange::{self, Now};
use crate::settings::{Collector, DISABLED_PATH, REPORTS_PATH};

/// How often each VM reads the collector's disabled agents.
const DISABLED_POLL_MS: u64 = 1_000;

/// Reports a VM keeps while the collector does not take them; beyond, the oldest is dropped.
const MAX_QUEUED: usize = 1_000;

/// Reports sent in one call.
const BATCH: usize = 100;

impl Vm {
    /// Queues a report for the collector.
    pub(super) fn report(&self, report: Report) {
        self.reports.borrow_mut().push_back(report);
        self.bound_reports();
    }

    /// Puts reports the collector did not take back in front of the queue.
    fn requeue_reports(&self, batch: Vec<Report>) {
        let mut reports = self.reports.borrow_mut();
        for report in batch.into_iter().rev() {
            reports.push_front(report);
        }
        drop(reports);
        self.bound_reports();
    }

    /// Drops the oldest reports beyond [`MAX_QUEUED`], logged and counted.
    fn bound_reports(&self) {
        let mut reports = self.reports.borrow_mut();
        let mut dropped = 0;
        while reports.len() > MAX_QUEUED {
            if let Some(report) = reports.pop_front() {
                log(
                    LogLevel::Error,
                    &format!(
                        "tollgate: oversight report dropped, {MAX_QUEUED} wait for the collector \
                         already: {report:?}"
                    ),
                );
            }
            dropped += 1;
        }
        drop(reports);
        if dropped > 0 {
            self.count(schema::OVERSIGHT_REPORTS_DROPPED.name, dropped);
        }
    }

    /// Hands the breakers' gauge moves this VM made to Envoy's stats (on the next flush).
    pub(super) fn flush_breaker_moves(&self) {
        let moves = std::mem::take(&mut *self.budgets.breaker_moves.borrow_mut());
        if moves.is_empty() {
            return;
        }
        let mut counters = self.counters.borrow_mut();
        for (upstream, by) in moves {
            let name = schema::stat_name(&schema::CIRCUIT_BREAKER_STATE, &[&upstream]);
            counters.gauge(&name, by);
        }
    }
}

impl Root {
    /// On each tick, with a collector: sends the queued reports and, when the disabled agents
    /// are refused (escalation, or fleet mode), reads them when due.
    pub(super) fn oversee(&self, t: Now) {
        let plugin = match &*self.vm.config.borrow() {
            Config::Ready(p) => p.clone(),
            _ => return,
        };
        let Some(collector) = plugin.filter.collector.as_ref() else { return };
        self.send_reports(collector);
        if plugin.guards.escalation {
            self.poll_disabled(collector, t);
        }
    }

    /// Sends the oldest queued reports, unless a call is on its way.
    fn send_reports(&self, collector: &Collector) {
        if self.vm.reporting.get() {
            return;
        }
        let batch: Vec<Report> = {
            let mut reports = self.vm.reports.borrow_mut();
            let n = reports.len().min(BATCH);
            reports.drain(..n).collect()
        };
        if batch.is_empty() {
            return;
        }
        let body = Reports { source: self.vm.holder.clone(), reports: batch };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        match collector_call(collector, REPORTS_PATH, Some(("application/json", &bytes))) {
            Ok(token) => {
                self.vm.reporting.set(true);
                self.vm.in_flight_calls.borrow_mut().insert(token, Call::Reports(body.reports));
            }
            Err(status) => {
                self.reports_failed(&format!("cannot call the collector: {status:?}"));
                self.vm.requeue_reports(body.reports);
            }
        }
    }

    /// Logs that reports did not reach the collector, once until they do again.
    fn reports_failed(&self, why: &str) {
        if !self.vm.reports_failing.replace(true) {
            log(
                LogLevel::Warn,
                &format!(
                    "tollgate: oversight reports (breakers opened, agents disabled) do not reach \
                     the collector, offered again on every tick: {why}"
                ),
            );
        }
    }

    /// The collector's answer to a batch of reports: each taken, refused for good (dropped,
    /// logged and counted) or to be offered again.
    pub(super) fn reports_answered(&self, batch: Vec<Report>, status: Option<&str>, size: usize) {
        self.vm.reporting.set(false);
        let body = callout_body(size);
        let answer = json_answer::<Answer>(status, &body);
        let Some(answer) = answer else {
            self.reports_failed(&format!(
                "the collector answered {}: {}",
                status.unwrap_or("nothing"),
                String::from_utf8_lossy(&body[..body.len().min(256)])
            ));
            self.vm.requeue_reports(batch);
            return;
        };
        if self.vm.reports_failing.replace(false) {
            log(LogLevel::Info, "tollgate: oversight reports reach the collector again");
        }
        let (mut again, mut refused) = (Vec::new(), 0);
        let now_ms = super::now().ms.0;
        for (i, report) in batch.into_iter().enumerate() {
            match answer.results.get(i) {
                Some(Taken::Accepted) => {
                    if let Report::AgentDisabled { agent, at_ms, .. } = &report {
                        // The collector has it: a read from now on that does not list it
                        // means an operator re-enabled it.
                        self.vm.budgets.disabled.borrow_mut().reported(agent, *at_ms, now_ms);
                    }
                }
                Some(Taken::Refused { error }) => {
                    refused += 1;
                    log(
                        LogLevel::Error,
                        &format!("tollgate: the collector refused {report:?}: {error}"),
                    );
                }
                Some(Taken::Unavailable { .. }) | None => again.push(report),
            }
        }
        if refused > 0 {
            self.vm.count(schema::OVERSIGHT_REPORTS_DROPPED.name, refused);
        }
        if !again.is_empty() {
            self.vm.requeue_reports(again);
        }
    }

    /// Reads the collector's disabled agents, every [`DISABLED_POLL_MS`].
    fn poll_disabled(&self, collector: &Collector, t: Now) {
        let poll = &self.vm.disabled_poll;
        if poll.in_flight.get() || t.ms.0 < poll.next_ms.get() {
            return;
        }
        poll.next_ms.set(t.ms.0.saturating_add(DISABLED_POLL_MS));
        if let Ok(token) = collector_call(collector, DISABLED_PATH, None) {
            poll.in_flight.set(true);
            self.vm.in_flight_calls.borrow_mut().insert(token, Call::Disabled(t.ms.0));
        }
    }

    /// The collector's disabled agents, read by a call sent at `sent_ms`: taken whole (on a
    /// failure the last list stays); an agent no longer listed is re-enabled here.
    pub(super) fn disabled_answered(&self, sent_ms: u64, status: Option<&str>, size: usize) {
        #[derive(serde::Deserialize)]
        struct Agents {
            agents: Vec<String>,
        }
        self.vm.disabled_poll.in_flight.set(false);
        let body = callout_body(size);
        let list = match json_answer::<Agents>(status, &body) {
            Some(list) => list.agents,
            _ => {
                log(
                    LogLevel::Warn,
                    &format!(
                        "tollgate: the collector answered {} for the disabled agents; keeping the \
                         last list",
                        status.unwrap_or("nothing")
                    ),
                );
                return;
            }
        };
        let left = {
            let mut disabled = self.vm.budgets.disabled.borrow_mut();
            let (left, changed) = disabled.read(sent_ms, list);
            if changed {
                log(
                    LogLevel::Info,
                    &format!(
                        "tollgate: the collector's disabled agents are now {:?}",
                        disabled.names()
                    ),
                );
            }
            left
        };
        let retry = std::mem::take(&mut *self.vm.reenable_retry.borrow_mut());
        for (agent, seen) in retry.into_iter().chain(left) {
            self.reenable(agent, seen);
        }
    }

    /// An operator re-enabled `agent` through the collector, which had it by `seen`: re-enabled
    /// in this Envoy's escalation (a disabling no later than that), and its reports still
    /// queued here about a disabling no later than that are dropped.
    fn reenable(&self, agent: String, seen: u64) {
        self.vm.reports.borrow_mut().retain(|r| {
            !matches!(r, Report::AgentDisabled { agent: a, at_ms, .. } if *a == agent && *at_ms <= seen)
        });
        match exchange::reenable(&self.vm.budgets, &agent, UnixMillis(seen)) {
            Ok(true) => log(
                LogLevel::Info,
                &format!(
                    "tollgate: agent {agent:?} re-enabled in this Envoy: an operator re-enabled it \
                     through the collector"
                ),
            ),
            Ok(false) => {}
            Err(e) => {
                log(
                    LogLevel::Warn,
                    &format!("tollgate: cannot re-enable agent {agent:?} yet, trying again: {e}"),
                );
                self.vm.reenable_retry.borrow_mut().push((agent, seen));
            }
        }
    }
}
