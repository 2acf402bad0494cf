//! Human oversight on the request path (seeds 000, 001, 002): approvals, risk scores, autonomy
//! modes and budgets, and the runaway-agent guards (loops, circuit breakers, error escalation).
//!
//! The order of the checks is the core's (`tollgate_core::lifecycle::decide`, which the pipeline
//! runs through [`admit`]); this module is its live state ([`Live`], the lifecycle's `Stores`
//! port), the approvals it waits on, and [`Oversight::settle`], called once when the response
//! ends. The oversight step answers with a pass or one [`Denial`], in this order, first refusal
//! wins:
//!
//! 1. a disabled agent (error escalation) → deny `agent_disabled`;
//! 2. autonomy `DISABLED` / `PROPOSE_ONLY` → deny (a proposal is recorded);
//! 3. the same tool call with the same arguments too often → deny `loop_detected`;
//! 4. does a human have to approve? The policy said `require_approval`, or the declared risk
//!    scores 30 or more, or the agent is under review (error escalation), or autonomy says
//!    `APPROVAL_REQUIRED`, or `AUTO_EXECUTE` finds its autonomy budget used up (one unit is
//!    consumed atomically only when nothing else asked for a human). Then a retry carrying a
//!    granted approval id (`x-tollgate-approval`) passes once; otherwise a pending approval is
//!    created and its id returned in the provider-shaped 403;
//! 5. the upstream's circuit breaker is open → fast 503 `circuit_open`.
//!
//! The decisions are the core's (`lifecycle`, `autonomy`, `risk`, `approval`,
//! `guardrails::{loops, breaker, escalation}`); this module holds their state, reads the clock,
//! writes the approvals journal and the audit records, and counts what the autonomy metrics
//! report. Without `autonomy:` or `oversight:` guards, an allowed request with no declared risk
//! passes the oversight step on the lifecycle's fast path, with one atomic increment here.

pub mod agents;
pub mod approvals;
pub mod config;

use std::collections::HashMap;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tollgate_core::approval::{Approval, State, Transition};
use tollgate_core::autonomy::{self};
use tollgate_core::guardrails::breaker::Breaker;
use tollgate_core::guardrails::escalation::{Escalation, Outcome, Standing};
use tollgate_core::guardrails::loops::LoopDetector;
use tollgate_core::guardrails::RateCounters;
use tollgate_core::lifecycle::Guards;
use tollgate_core::policy::Effect;
use tollgate_core::record::AuditKind;
use tollgate_core::risk::{self, history};
use tollgate_core::time::UnixMillis;

use crate::audit;
use crate::clock::now;
use crate::config::Route;
use crate::fleet::oversight::SharedOversight;
use crate::ledger::Ledger;
use crate::metrics::Metrics;

pub use approvals::{Approvals, StoreError};
pub use config::OversightConfig;

/// The request header that carries a granted approval's id on a retry.
pub const APPROVAL_HEADER: &str = "x-tollgate-approval";

use tollgate_core::autonomy::stats::UNCATEGORIZED;
pub use tollgate_core::autonomy::stats::{Counts, Verdict, CATEGORIES};

/// Lock-free counts per category and verdict.
#[derive(Default)]
pub(crate) struct Stats {
    counts: [[AtomicU64; 4]; CATEGORIES.len()],
    /// Approval requests by reason code (codes come from config and code, so few).
    pub(crate) reasons: Mutex<HashMap<String, u64>>,
}

/// A request as the approvals and the audit records name it.
pub struct Action<'a> {
    pub request_id: &'a str,
    pub agent: &'a str,
    pub cost_center: &'a str,
    pub project: &'a str,
    pub route: &'a Route,
    /// The tool name, or `llm` for model calls (the autonomy action type).
    pub name: &'a str,
    /// An index into [`CATEGORIES`].
    pub category: usize,
    /// The `x-tollgate-approval` header.
    pub approval: Option<&'a str>,
}

/// What a passed request carries to [`Oversight::settle`].
#[derive(Debug, Default)]
pub struct Admitted {
    /// The breaker that admitted the call (an index), whose outcome must be reported.
    pub(crate) breaker: Option<usize>,
    /// Outcomes are counted for this (agent, action) and fed to error escalation.
    pub(crate) track: Option<(Box<str>, Box<str>)>,
    /// The risk score, when one was computed (the `x-tollgate-risk` header).
    pub risk: Option<String>,
}

/// The oversight state shared by every request.
pub struct Oversight {
    pub(crate) config: OversightConfig,
    pub approvals: Arc<Approvals>,
    autonomy: bool,
    pub(crate) budget: autonomy::Counters,
    pub(crate) loops: Option<LoopDetector>,
    pub(crate) breakers: Vec<(String, Mutex<Breaker>)>,
    /// Route name → index into `breakers`.
    pub(crate) breaker_index: HashMap<String, usize>,
    escalation: Option<Escalation>,
    /// The disabled agents on disk, so that a restart does not re-enable them.
    disabled: Arc<agents::DisabledAgents>,
    /// (successes, total) per `agent\0action`, for the historical-success risk dimension.
    outcomes: Mutex<HashMap<Box<str>, (u64, u64)>>,
    /// The guardrails' calls per agent and action in the current UTC hour.
    pub(crate) action_rates: RateCounters,
    pub(crate) stats: Stats,
    /// Fleet mode: approvals and disabled agents shared through Redis.
    fleet: Option<Arc<SharedOversight>>,
    /// The fleet's disabled agents as last read (to tell a re-enable elsewhere from a disable
    /// here that is still on its way to Redis).
    fleet_disabled: Mutex<std::collections::HashSet<String>>,
}

impl Oversight {
    /// Copies the oversight step's counts into the registry (at scrape time: the request path
    /// only bumps atomics).
    pub fn observe_into(&self, m: &Metrics) {
        let o = self;
        fn catch_up(c: &prometheus::IntCounter, value: u64) {
            let have = c.get();
            if value > have {
                c.inc_by(value - have);
            }
        }
        let (overall, by) = o.counts();
        for (category, counts) in &by {
            for (verdict, n) in [
                ("auto", counts.auto),
                ("approval_required", counts.approval_required),
                ("denied", counts.denied),
                ("human_approved", counts.human_approved),
            ] {
                if n > 0 {
                    catch_up(&m.actions.with_label_values(&[category, verdict]), n);
                }
            }
            if let Some(bp) = counts.autonomy_bp() {
                m.autonomy_bp.with_label_values(&[category]).set(bp as i64);
            }
        }
        if let Some(bp) = overall.autonomy_bp() {
            m.autonomy_bp.with_label_values(&[tollgate_core::autonomy::stats::ALL]).set(bp as i64);
        }
        for (reason, n) in o.top_reasons(usize::MAX) {
            catch_up(&m.approval_reasons.with_label_values(&[&reason]), n);
        }
        m.approvals_pending.set(o.approvals.pending() as i64);
        for (upstream, state, _) in o.breakers() {
            let v = match state {
                "closed" => 0,
                "half_open" => 1,
                _ => 2,
            };
            m.breaker_state.with_label_values(&[&upstream]).set(v);
        }
    }

    /// The state for `routes`, with approvals replayed from `data_dir`. `autonomy` is whether
    /// the config has an `autonomy:` section (without one, no action is gated by mode).
    pub fn open(
        config: OversightConfig,
        autonomy: bool,
        routes: &[Route],
        data_dir: &std::path::Path,
        now: UnixMillis,
        fleet: Option<Arc<SharedOversight>>,
    ) -> std::io::Result<(Oversight, approvals::Replayed)> {
        let (approvals, replayed) = Approvals::open(data_dir, now)?;
        let approvals = match &fleet {
            Some(f) => approvals.shared(f.clone()),
            None => approvals,
        };
        let (disabled, disabled_agents) = agents::DisabledAgents::open(data_dir)?;
        let escalation = config.escalation.map(Escalation::new);
        match &escalation {
            Some(e) => disabled_agents.iter().for_each(|agent| e.restore_disabled(agent)),
            None if !disabled_agents.is_empty() => tracing::warn!(
                agents = disabled_agents.len(),
                "agents disabled earlier are not disabled now: oversight.escalation is off"
            ),
            None => {}
        }
        // One breaker per upstream, found by route name (routes to one upstream share it).
        let mut breakers: Vec<(String, Mutex<Breaker>)> = Vec::new();
        let mut breaker_index = HashMap::new();
        if let Some(bc) = config.breaker {
            for route in routes {
                let key = upstream_key(route);
                let i = match breakers.iter().position(|(k, _)| *k == key) {
                    Some(i) => i,
                    None => {
                        breakers.push((key, Mutex::new(Breaker::new(bc))));
                        breakers.len() - 1
                    }
                };
                breaker_index.insert(route.name.clone(), i);
            }
        }
        let oversight = Oversight {
            loops: config.loops.map(LoopDetector::new),
            escalation,
            disabled: Arc::new(disabled),
            config,
            approvals: Arc::new(approvals),
            autonomy,
            budget: autonomy::Counters::default(),
            breakers,
            breaker_index,
            outcomes: Mutex::new(HashMap::new()),
            action_rates: RateCounters::default(),
            stats: Stats::default(),
            fleet,
            fleet_disabled: Mutex::new(Default::default()),
        };
        Ok((oversight, replayed))
    }

    pub fn config(&self) -> &OversightConfig {
        &self.config
    }

    /// The guards the lifecycle's oversight step runs.
    pub fn guards(&self) -> Guards {
        Guards {
            autonomy: self.autonomy,
            loops: self.loops.is_some(),
            breakers: !self.breakers.is_empty(),
            escalation: self.escalation.is_some(),
            thresholds: self.config.thresholds,
        }
    }

    /// The metrics category of a request (the core's rule, the Envoy filter's too).
    pub fn category(
        route: &Route,
        tool: Option<&str>,
        guardrails: &tollgate_core::guardrails::Guardrails,
    ) -> usize {
        tollgate_core::autonomy::stats::category(
            route.kind.is_llm(),
            route.category.as_deref(),
            tool,
            guardrails,
        )
    }

    /// Counts a request refused before the oversight step (the policy denied it).
    pub fn count(&self, category: usize, verdict: Verdict) {
        self.stats.counts[category.min(UNCATEGORIZED)][verdict as usize]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts by category, and overall.
    pub fn counts(&self) -> (Counts, Vec<(&'static str, Counts)>) {
        let by: Vec<(&'static str, Counts)> = CATEGORIES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let get = |v: Verdict| self.stats.counts[i][v as usize].load(Ordering::Relaxed);
                let c = Counts {
                    auto: get(Verdict::Auto),
                    approval_required: get(Verdict::Approval),
                    denied: get(Verdict::Denied),
                    human_approved: get(Verdict::Approved),
                    total: get(Verdict::Auto) + get(Verdict::Approval) + get(Verdict::Denied),
                };
                (*name, c)
            })
            .collect();
        let all: Vec<Counts> = by.iter().map(|(_, c)| *c).collect();
        (tollgate_core::autonomy::stats::overall(&all), by)
    }

    /// Approval requests by reason, most frequent first.
    pub fn top_reasons(&self, n: usize) -> Vec<(String, u64)> {
        let reasons = self.stats.reasons.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<(String, u64)> = reasons.iter().map(|(r, c)| (r.clone(), *c)).collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out.truncate(n);
        out
    }

    /// Every breaker's upstream, state and consecutive failures.
    pub fn breakers(&self) -> Vec<(String, &'static str, u32)> {
        use tollgate_core::guardrails::breaker::State as B;
        self.breakers
            .iter()
            .map(|(key, b)| {
                let b = b.lock().unwrap_or_else(PoisonError::into_inner);
                let state = match b.state() {
                    B::Closed => "closed",
                    B::Open => "open",
                    B::HalfOpen => "half_open",
                };
                (key.clone(), state, b.failures())
            })
            .collect()
    }

    /// An agent's escalation standing (always normal without `oversight.escalation`).
    pub fn standing(&self, agent: &str) -> Standing {
        match &self.escalation {
            Some(e) => e.standing(agent),
            None => Standing::Normal { consecutive_errors: 0 },
        }
    }

    /// The agents disabled after consecutive errors, sorted (none without
    /// `oversight.escalation`).
    pub fn disabled_agents(&self) -> Vec<String> {
        self.escalation.as_ref().map(Escalation::disabled).unwrap_or_default()
    }

    /// The agents disabled in the whole fleet (the fleet's set in Redis), or this proxy's own
    /// without a fleet store: what the Envoy filters refuse (`GET /v1/fleet/agents/disabled`).
    /// Run on the blocking pool.
    pub fn fleet_disabled_agents(&self) -> std::io::Result<Vec<String>> {
        match &self.fleet {
            Some(fleet) => {
                let mut agents = fleet.disabled().map_err(std::io::Error::other)?;
                agents.sort();
                Ok(agents)
            }
            None => Ok(self.disabled_agents()),
        }
    }

    /// An operator re-enables a disabled agent; true if it was disabled here or in the fleet's
    /// set (fleet mode: removed from it whether or not this proxy had already learnt of it,
    /// and also without `oversight.escalation`, so that the Envoy filters that report to this
    /// collector let it through again). Answers once the change is on disk.
    pub async fn reenable(&self, agent: &str) -> std::io::Result<bool> {
        let here = self.escalation.as_ref().is_some_and(|e| e.reenable(agent));
        if !here && self.fleet.is_none() {
            return Ok(false);
        }
        let snapshot = match (&self.escalation, here) {
            (Some(e), true) => Some(self.disabled.snapshot(e.disabled())),
            _ => None,
        };
        let (store, fleet) = (self.disabled.clone(), self.fleet.clone());
        let agent = agent.to_string();
        let in_fleet = tokio::task::spawn_blocking(move || {
            let removed = match fleet {
                Some(fleet) => fleet.set_disabled(&agent, false).map_err(std::io::Error::other)?,
                None => false,
            };
            if let Some(snapshot) = snapshot {
                store.write(snapshot)?;
            }
            Ok::<bool, std::io::Error>(removed)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(here || in_fleet)
    }

    /// An Envoy filter reporting to this collector opened its breaker of `upstream` at `at`
    /// (`POST /v1/fleet/oversight/reports`): the `circuit_open` alert a sidecar raises for its
    /// own.
    pub fn reported_circuit_open(
        &self,
        alerts: &crate::alerts::Alerts,
        source: &str,
        upstream: &str,
        open_for_ms: u64,
        at: UnixMillis,
    ) {
        tracing::warn!(upstream = %upstream, source = %source, "circuit breaker opened in an Envoy");
        circuit_opened(alerts, upstream, open_for_ms, at);
    }

    /// An Envoy filter reporting to this collector disabled `agent` (the action whose error did
    /// it, and its status): added to the disabled set this collector serves
    /// (`GET /v1/fleet/agents/disabled`): the fleet's in Redis with `store.redis`, else this
    /// proxy's own escalation's (kept on disk), where an operator re-enables it. When that
    /// added it (a report sent again, or an agent already disabled, adds nothing), the
    /// `agent_disabled` alert and audit record follow, as for a sidecar's own, the actor being
    /// `source` (the Envoy VM).
    pub async fn reported_disabled(
        &self,
        ledger: &Ledger,
        alerts: &crate::alerts::Alerts,
        source: &str,
        (agent, action, status): (&str, &str, u16),
    ) -> Reported {
        let added = match (&self.fleet, &self.escalation) {
            (Some(fleet), _) => {
                let (fleet, name) = (fleet.clone(), agent.to_string());
                match tokio::task::spawn_blocking(move || fleet.set_disabled(&name, true)).await {
                    Ok(Ok(added)) => added,
                    Ok(Err(e)) => return Reported::Unavailable(format!("the fleet store: {e}")),
                    Err(e) => return Reported::Unavailable(e.to_string()),
                }
            }
            (None, Some(e)) => {
                if matches!(e.standing(agent), Standing::Disabled { .. }) {
                    false
                } else {
                    e.restore_disabled(agent);
                    let (store, snapshot) =
                        (self.disabled.clone(), self.disabled.snapshot(e.disabled()));
                    let written = tokio::task::spawn_blocking(move || store.write(snapshot)).await;
                    if let Err(err) = written.map_err(std::io::Error::other).and_then(|r| r) {
                        tracing::error!(error = %err, "persisting the disabled agents");
                    }
                    true
                }
            }
            (None, None) => {
                return Reported::Refused(
                    "this collector keeps no disabled agents (it has neither \
                     `oversight.escalation` nor `store.redis`), so nobody could re-enable one \
                     here: give the collector `oversight.escalation`"
                        .into(),
                )
            }
        };
        if added {
            tracing::warn!(agent = %agent, source = %source, "agent disabled by an Envoy");
            agent_disabled(ledger, alerts, (agent, action, status), source, now());
        }
        Reported::Taken
    }

    pub(crate) fn history(&self, agent: &str, action: &str) -> Option<(u64, u64)> {
        let key = history::key(agent, action);
        let outcomes = self.outcomes.lock().unwrap_or_else(PoisonError::into_inner);
        outcomes.get(key.as_str()).copied().filter(|(_, total)| *total > 0)
    }

    /// Reports how an admitted request ended: the upstream's status (0 when it could not be
    /// reached). Provider errors (5xx, 429, 408, unreachable) feed the upstream's breaker only;
    /// the agent's own errors (other 4xx) feed escalation; any non-2xx counts as a failed
    /// outcome for the action's success history.
    /// Raises an alert when the outcome opens the breaker or disables the agent.
    pub fn settle(
        &self,
        ledger: &Ledger,
        alerts: &crate::alerts::Alerts,
        admitted: &Admitted,
        status: u16,
    ) {
        if admitted.breaker.is_none() && admitted.track.is_none() {
            return;
        }
        let now = now();
        if let Some(i) = admitted.breaker {
            let (key, breaker) = &self.breakers[i];
            let mut b = breaker.lock().unwrap_or_else(PoisonError::into_inner);
            if b.on_outcome(Outcome::of_status(status), now) {
                let open_for_ms = b.open_for_ms();
                drop(b);
                tracing::warn!(upstream = %key, "circuit breaker opened");
                circuit_opened(alerts, key, open_for_ms, now);
            }
        }
        let Some((agent, action)) = &admitted.track else { return };
        let ok = history::succeeded(status);
        {
            let mut outcomes = self.outcomes.lock().unwrap_or_else(PoisonError::into_inner);
            let key = history::key(agent, action);
            if let Some(o) = outcomes.get_mut(key.as_str()) {
                *o = (o.0 + u64::from(ok), o.1 + 1);
            } else if outcomes.len() < history::MAX_KEYS {
                outcomes.insert(key.into_boxed_str(), (u64::from(ok), 1));
            }
        }
        if let Some(e) = &self.escalation {
            let before = e.standing(agent);
            let after = e.on_outcome(agent, Outcome::of_status(status));
            if matches!(after, Standing::Disabled { .. })
                && !matches!(before, Standing::Disabled { .. })
            {
                tracing::warn!(agent = %agent, "agent disabled after consecutive errors");
                agent_disabled(ledger, alerts, (agent, action, status), "proxy", now);
                // Off the request path; a failure is logged (the agent stays disabled in memory).
                let (store, snapshot) =
                    (self.disabled.clone(), self.disabled.snapshot(e.disabled()));
                let (fleet, disabled) = (self.fleet.clone(), agent.to_string());
                let write = move || {
                    if let Some(fleet) = fleet {
                        if let Err(err) = fleet.set_disabled(&disabled, true) {
                            tracing::error!(error = %err, "disabling the agent in the fleet store");
                        }
                    }
                    if let Err(err) = store.write(snapshot) {
                        tracing::error!(error = %err, "persisting the disabled agents");
                    }
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => drop(rt.spawn_blocking(write)),
                    Err(_) => write(),
                }
            }
        }
    }

    /// Fleet mode: takes in the agents disabled or re-enabled through other proxies. Run on the
    /// blocking pool.
    pub fn sync_disabled(&self) {
        let (Some(fleet), Some(e)) = (&self.fleet, &self.escalation) else { return };
        let now_disabled: std::collections::HashSet<String> = match fleet.disabled() {
            Ok(agents) => agents.into_iter().collect(),
            Err(err) => {
                tracing::warn!(error = %err, "reading the fleet's disabled agents");
                return;
            }
        };
        let mut before = self.fleet_disabled.lock().unwrap_or_else(PoisonError::into_inner);
        for agent in &now_disabled {
            if !matches!(e.standing(agent), Standing::Disabled { .. }) {
                tracing::warn!(agent = %agent, "agent disabled by another proxy of the fleet");
                e.restore_disabled(agent);
            }
        }
        // Gone from the fleet's set since the last read: an operator re-enabled it elsewhere.
        for agent in before.difference(&now_disabled) {
            if e.reenable(agent) {
                tracing::info!(agent = %agent, "agent re-enabled through another proxy of the fleet");
            }
        }
        *before = now_disabled;
    }

    /// Applies approval timeouts and records each in the audit log. Run on the blocking pool.
    pub fn sweep(&self, ledger: &Ledger) {
        match self.approvals.sweep(now()) {
            Ok(changed) => {
                for (a, t) in changed {
                    audit_approval(ledger, &a, t, a.decided_by.as_deref());
                }
            }
            Err(e) => tracing::error!(error = %e, "sweeping approvals"),
        }
    }
}

/// What became of an Envoy filter's report that it disabled an agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Reported {
    /// In the disabled set (now, or already).
    Taken,
    /// It can never be taken here (why).
    Refused(String),
    /// Not now: the fleet store did not answer (why).
    Unavailable(String),
}

fn upstream_key(route: &Route) -> String {
    route.upstream.authority().map(|a| a.as_str().to_string()).unwrap_or_else(|| route.name.clone())
}

/// Records an approval's change in the audit log.
pub fn audit_approval(ledger: &Ledger, a: &Approval, t: Transition, actor: Option<&str>) {
    let effect = match a.state {
        State::Approved | State::Used => Effect::Allow,
        State::Denied | State::Expired => Effect::Deny,
        State::Pending => Effect::RequireApproval,
    };
    ledger.audit(audit::Event {
        ts: now().to_string(),
        kind: t.kind(),
        request_id: a.used_by_request.clone().unwrap_or_else(|| a.request_id.clone()),
        agent: a.agent.clone(),
        cost_center: a.cost_center.clone(),
        project: a.project.clone(),
        route: a.route.clone(),
        effect,
        reason: a.reason.clone(),
        tool: Some(a.action.clone()),
        approval_id: Some(a.id.clone()),
        risk: Some(risk::Score(a.risk_score).to_string()),
        actor: actor.map(str::to_string),
        // The operator's note, on the operator's decision only.
        note: matches!(t, Transition::Granted | Transition::Denied)
            .then(|| a.note.clone())
            .flatten(),
        ..Default::default()
    });
}

/// A circuit breaker opened (this proxy's, or an Envoy's it collects for): the `circuit_open`
/// alert, with the time its probe is let through.
fn circuit_opened(
    alerts: &crate::alerts::Alerts,
    upstream: &str,
    open_for_ms: u64,
    at: UnixMillis,
) {
    alerts.raise(crate::alerts::Detail::CircuitOpen(crate::alerts::event::CircuitOpen {
        upstream: upstream.to_string(),
        open_for_ms,
        retry_at: UnixMillis(at.0.saturating_add(open_for_ms)).to_string(),
    }));
}

/// Error escalation disabled `agent` (the action whose error did it, and its status): the
/// `agent_disabled` alert and audit record, `actor` being who disabled it (`proxy`, or the
/// Envoy VM that reported it).
fn agent_disabled(
    ledger: &Ledger,
    alerts: &crate::alerts::Alerts,
    (agent, action, status): (&str, &str, u16),
    actor: &str,
    at: UnixMillis,
) {
    alerts.raise(crate::alerts::Detail::AgentDisabled(crate::alerts::event::AgentDisabled {
        agent: agent.to_string(),
        action: action.to_string(),
        status,
    }));
    ledger.audit(audit::Event {
        ts: at.to_string(),
        kind: AuditKind::AgentDisabled,
        agent: agent.to_string(),
        effect: Effect::Deny,
        reason: "agent_disabled".into(),
        tool: Some(action.to_string()),
        actor: Some(actor.to_string()),
        ..Default::default()
    });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn retry_after_rounds_up_like_the_filter() {
        let secs = |ms| crate::admission::whole_seconds(Duration::from_millis(ms));
        assert_eq!(
            [secs(0), secs(1), secs(999), secs(1000), secs(1001), secs(59_100)],
            [1, 1, 1, 1, 2, 60]
        );
    }
}
