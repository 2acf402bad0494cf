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
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tollgate_core::approval::{self, Approval, RedeemError, State, Transition};
use tollgate_core::autonomy::{self, BudgetOutcome};
use tollgate_core::budget::{BudgetError, Reservation};
use tollgate_core::guardrails::breaker::{Admission, Breaker};
use tollgate_core::guardrails::escalation::{Escalation, Outcome, Standing};
use tollgate_core::guardrails::loops::{LoopDetector, Repeat};
use tollgate_core::guardrails::{Category, RateCounters, Violation};
use tollgate_core::lifecycle::{
    self, ActionRate, BreakerOpen, Guards, Pending, RateLimited, Step, Stores,
};
use tollgate_core::money::Money;
use tollgate_core::policy::{Budgets, Decision, Effect, Facts};
use tollgate_core::record::AuditKind;
use tollgate_core::risk::{self, Assessment, OnTimeout};
use tollgate_core::time::UnixMillis;

use crate::audit;
use crate::clock::now;
use crate::config::Route;
use crate::deny::{Class, Denial};
use crate::metrics::Metrics;
use crate::state::Shared;

pub use approvals::{Approvals, StoreError};
pub use config::OversightConfig;

/// The request header that carries a granted approval's id on a retry.
pub const APPROVAL_HEADER: &str = "x-tollgate-approval";

/// The categories the autonomy metrics are split by: the guardrail action categories, model calls,
/// and tool calls of no known category.
pub const CATEGORIES: [&str; 9] = [
    "read",
    "write",
    "execute",
    "deploy",
    "delete",
    "external_api",
    "database",
    "llm",
    "uncategorized",
];
const LLM: usize = 7;
const UNCATEGORIZED: usize = 8;

/// How an action ended at the oversight step, for the autonomy metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Ran without a human (allowed, auto-executed, or low risk).
    Auto,
    /// Sent to a human (a pending approval was created or is still pending).
    Approval,
    /// Refused.
    Denied,
    /// A retry that used a granted approval (the same action as its approval request, so not
    /// counted again in the total).
    Approved,
}

impl Verdict {
    pub const ALL: [Verdict; 4] =
        [Verdict::Auto, Verdict::Approval, Verdict::Denied, Verdict::Approved];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Auto => "auto",
            Verdict::Approval => "approval_required",
            Verdict::Denied => "denied",
            Verdict::Approved => "human_approved",
        }
    }
}

/// Lock-free counts per category and verdict.
#[derive(Default)]
struct Stats {
    counts: [[AtomicU64; 4]; CATEGORIES.len()],
    /// Approval requests by reason code (codes come from config and code, so few).
    reasons: Mutex<HashMap<String, u64>>,
}

/// A category's counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub auto: u64,
    pub approval_required: u64,
    pub denied: u64,
    pub human_approved: u64,
    /// auto + approval_required + denied.
    pub total: u64,
}

impl Counts {
    /// Autonomy in basis points (auto / total; 10000 = every action ran on its own).
    pub fn autonomy_bp(&self) -> Option<u64> {
        (self.total > 0).then(|| self.auto * 10_000 / self.total)
    }
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
    breaker: Option<usize>,
    /// Outcomes are counted for this (agent, action) and fed to error escalation.
    track: Option<(Box<str>, Box<str>)>,
    /// The risk score, when one was computed (the `x-tollgate-risk` header).
    pub risk: Option<String>,
}

/// The oversight state shared by every request.
pub struct Oversight {
    config: OversightConfig,
    pub approvals: Arc<Approvals>,
    autonomy: bool,
    budget: autonomy::Counters,
    loops: Option<LoopDetector>,
    breakers: Vec<(String, Mutex<Breaker>)>,
    /// Route name → index into `breakers`.
    breaker_index: HashMap<String, usize>,
    escalation: Option<Escalation>,
    /// The disabled agents on disk, so that a restart does not re-enable them.
    disabled: Arc<agents::DisabledAgents>,
    /// (successes, total) per `agent\0action`, for the historical-success risk dimension.
    outcomes: Mutex<HashMap<Box<str>, (u64, u64)>>,
    /// The guardrails' calls per agent and action in the current UTC hour.
    action_rates: RateCounters,
    stats: Stats,
}

/// Most (agent, action) pairs whose outcomes are counted.
const MAX_OUTCOME_KEYS: usize = 100_000;

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
            m.autonomy_bp.with_label_values(&["all"]).set(bp as i64);
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
    ) -> std::io::Result<(Oversight, approvals::Replayed)> {
        let (approvals, replayed) = Approvals::open(data_dir, now)?;
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

    /// The metrics category of a request.
    pub fn category(
        route: &Route,
        tool: Option<&str>,
        guardrails: &tollgate_core::guardrails::Guardrails,
    ) -> usize {
        if route.kind.is_llm() {
            return LLM;
        }
        let category = route
            .category
            .as_deref()
            .and_then(Category::parse)
            .or_else(|| tool.and_then(|t| guardrails.policy(t)).map(|p| p.category));
        category.map_or(UNCATEGORIZED, |c| c as usize)
    }

    /// Counts a request refused before the oversight step (the policy denied it).
    pub fn count(&self, category: usize, verdict: Verdict) {
        self.stats.counts[category.min(UNCATEGORIZED)][verdict as usize]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts by category, and overall.
    pub fn counts(&self) -> (Counts, Vec<(&'static str, Counts)>) {
        let mut overall = Counts::default();
        let mut by = Vec::with_capacity(CATEGORIES.len());
        for (i, name) in CATEGORIES.iter().enumerate() {
            let get = |v: Verdict| self.stats.counts[i][v as usize].load(Ordering::Relaxed);
            let c = Counts {
                auto: get(Verdict::Auto),
                approval_required: get(Verdict::Approval),
                denied: get(Verdict::Denied),
                human_approved: get(Verdict::Approved),
                total: get(Verdict::Auto) + get(Verdict::Approval) + get(Verdict::Denied),
            };
            overall.auto += c.auto;
            overall.approval_required += c.approval_required;
            overall.denied += c.denied;
            overall.human_approved += c.human_approved;
            overall.total += c.total;
            by.push((*name, c));
        }
        (overall, by)
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

    /// An operator re-enables a disabled agent; true if it was disabled. Answers once the
    /// change is on disk.
    pub async fn reenable(&self, agent: &str) -> std::io::Result<bool> {
        let Some(e) = &self.escalation else { return Ok(false) };
        if !e.reenable(agent) {
            return Ok(false);
        }
        let (store, snapshot) = (self.disabled.clone(), self.disabled.snapshot(e.disabled()));
        tokio::task::spawn_blocking(move || store.write(snapshot))
            .await
            .map_err(std::io::Error::other)??;
        Ok(true)
    }

    fn history(&self, agent: &str, action: &str) -> Option<(u64, u64)> {
        let key = outcome_key(agent, action);
        let outcomes = self.outcomes.lock().unwrap_or_else(PoisonError::into_inner);
        outcomes.get(key.as_str()).copied().filter(|(_, total)| *total > 0)
    }

    /// Reports how an admitted request ended: the upstream's status (0 when it could not be
    /// reached). Provider errors (5xx, 429, 408, unreachable) feed the upstream's breaker only;
    /// the agent's own errors (other 4xx) feed escalation; any non-2xx counts as a failed
    /// outcome for the action's success history.
    pub fn settle(&self, shared: &Shared, admitted: &Admitted, status: u16) {
        if admitted.breaker.is_none() && admitted.track.is_none() {
            return;
        }
        let now = now();
        if let Some(i) = admitted.breaker {
            let mut b = self.breakers[i].1.lock().unwrap_or_else(PoisonError::into_inner);
            b.on_outcome(Outcome::of_status(status), now);
        }
        let Some((agent, action)) = &admitted.track else { return };
        let ok = (200..300).contains(&status);
        {
            let mut outcomes = self.outcomes.lock().unwrap_or_else(PoisonError::into_inner);
            let key = outcome_key(agent, action);
            if let Some(o) = outcomes.get_mut(key.as_str()) {
                *o = (o.0 + u64::from(ok), o.1 + 1);
            } else if outcomes.len() < MAX_OUTCOME_KEYS {
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
                // Off the request path; a failure is logged (the agent stays disabled in memory).
                let (store, snapshot) =
                    (self.disabled.clone(), self.disabled.snapshot(e.disabled()));
                let write = move || {
                    if let Err(err) = store.write(snapshot) {
                        tracing::error!(error = %err, "persisting the disabled agents");
                    }
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => drop(rt.spawn_blocking(write)),
                    Err(_) => write(),
                }
                shared.ledger.audit(audit::Event {
                    ts: now.to_string(),
                    kind: AuditKind::AgentDisabled,
                    agent: agent.to_string(),
                    effect: Effect::Deny,
                    reason: "agent_disabled".into(),
                    tool: Some(action.to_string()),
                    actor: Some("proxy".into()),
                    ..Default::default()
                });
            }
        }
    }

    /// Applies approval timeouts and records each in the audit log. Run on the blocking pool.
    pub fn sweep(&self, shared: &Shared) {
        match self.approvals.sweep(now()) {
            Ok(changed) => {
                for (a, t) in changed {
                    audit_approval(shared, &a, t, a.decided_by.as_deref());
                }
            }
            Err(e) => tracing::error!(error = %e, "sweeping approvals"),
        }
    }
}

fn upstream_key(route: &Route) -> String {
    route.upstream.authority().map(|a| a.as_str().to_string()).unwrap_or_else(|| route.name.clone())
}

fn outcome_key(agent: &str, action: &str) -> String {
    format!("{agent}\u{0}{action}")
}

/// Records an approval's change in the audit log.
pub fn audit_approval(shared: &Shared, a: &Approval, t: Transition, actor: Option<&str>) {
    let effect = match a.state {
        State::Approved | State::Used => Effect::Allow,
        State::Denied | State::Expired => Effect::Deny,
        State::Pending => Effect::RequireApproval,
    };
    shared.ledger.audit(audit::Event {
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
        ..Default::default()
    });
}

/// The live state of one request's lifecycle (the core's `Stores` port) over the proxy's
/// in-process stores: rate limiters, the ledger's health, the oversight state and the budgets.
pub struct Live<'a> {
    pub shared: &'a Shared,
    pub route: &'a Route,
    /// The id the budget reservation is made under.
    pub reservation_id: &'a str,
    /// How long a reservation is held before the budget gets it back by itself.
    pub reservation_ttl_ms: u64,
    /// The breaker that admitted the call (an index), set when it was asked.
    breaker: Option<usize>,
}

impl<'a> Live<'a> {
    pub fn new(
        shared: &'a Shared,
        route: &'a Route,
        reservation_id: &'a str,
        reservation_ttl_ms: u64,
    ) -> Self {
        Live { shared, route, reservation_id, reservation_ttl_ms, breaker: None }
    }
}

/// A wait in whole seconds for `Retry-After`, rounded up (at least 1), as the Envoy filter does:
/// a client that waits the advertised time is let through.
fn whole_seconds(wait: std::time::Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

impl Stores for Live<'_> {
    fn take_rate(
        &mut self,
        clause: &str,
        agent: &str,
        rpm: Option<u64>,
        tpm: Option<u64>,
        tokens: u64,
        _now: UnixMillis,
    ) -> Result<(), RateLimited> {
        let key = format!("{clause}\u{0}{agent}");
        self.shared.rate_limits.check(&key, rpm, tpm, tokens).map_err(|limited| match limited {
            crate::limits::Limited::Requests { limit, retry_after } => {
                RateLimited::Requests { limit, retry_after_secs: whole_seconds(retry_after) }
            }
            crate::limits::Limited::Tokens { limit, retry_after } => {
                RateLimited::Tokens { limit, retry_after_secs: whole_seconds(retry_after) }
            }
        })
    }

    fn take_action_rate(
        &mut self,
        agent: &str,
        action: &str,
        limit: u32,
        now: UnixMillis,
    ) -> ActionRate {
        match self.shared.oversight.action_rates.take(agent, action, Some(limit), now) {
            Ok(used) => ActionRate::Taken(used),
            Err(Violation::RateLimitExceeded { used, retry_after_ms, .. }) => {
                ActionRate::Full { used, retry_after_ms }
            }
            Err(_) => ActionRate::Unavailable,
        }
    }

    fn recordable(&mut self) -> bool {
        self.shared.ledger.is_healthy()
    }

    fn standing(&mut self, agent: &str) -> Standing {
        self.shared.oversight.standing(agent)
    }

    fn observe_call(&mut self, digest: u64, now: UnixMillis) -> Repeat {
        match &self.shared.oversight.loops {
            Some(detector) => detector.observe_digest(digest, now),
            None => Repeat::Fresh { count: 1 },
        }
    }

    fn consume_autonomy(
        &mut self,
        limits: autonomy::Limits,
        agent: &str,
        action: &str,
        now: UnixMillis,
    ) -> BudgetOutcome {
        self.shared.oversight.budget.consume(limits, agent, action, now)
    }

    fn history(&mut self, agent: &str, action: &str) -> Option<(u64, u64)> {
        self.shared.oversight.history(agent, action)
    }

    fn breaker(&mut self, now: UnixMillis) -> Result<(), BreakerOpen> {
        let o = &self.shared.oversight;
        let Some(i) = o.breaker_index.get(self.route.name.as_str()).copied() else {
            return Ok(());
        };
        self.breaker = Some(i);
        let admission = o.breakers[i].1.lock().unwrap_or_else(PoisonError::into_inner).allow(now);
        match admission {
            Admission::Permit => Ok(()),
            Admission::Rejected { retry_after_ms } => {
                Err(BreakerOpen { upstream: o.breakers[i].0.clone(), retry_after_ms })
            }
        }
    }

    fn reserve(
        &mut self,
        budgets: &Budgets<'_>,
        facts: &Facts<'_>,
        amount: Money,
        now: UnixMillis,
    ) -> Result<Option<Reservation>, BudgetError> {
        let reserved = self.shared.budgets.reserve(
            budgets.iter(),
            |scope| lifecycle::scope_value(facts, scope),
            amount,
            self.reservation_id,
            now,
            self.reservation_ttl_ms,
        );
        if let Err(e) = &reserved {
            if !matches!(e, BudgetError::Exceeded { .. }) {
                tracing::error!(error = %e, "budget store");
            }
        }
        reserved.map(Some)
    }
}

/// Runs the lifecycle's admission phase (`tollgate_core::lifecycle::decide`) and acts on what
/// waits on I/O: a proposal is audited, an approval is redeemed (the lifecycle then goes on) or
/// requested (the request is refused with its id). Counts the oversight verdict for the
/// autonomy metrics. On a pass, also returns what [`Oversight::settle`] needs.
pub async fn admit<'p>(
    shared: &Arc<Shared>,
    action: &Action<'_>,
    rules: &lifecycle::Rules<'p>,
    req: &lifecycle::Request<'_>,
    live: &mut Live<'_>,
    now: UnixMillis,
) -> Result<(lifecycle::Admitted<'p>, Admitted), Denial> {
    let (result, verdict) = match lifecycle::decide(rules, req, live, now) {
        Ok(lifecycle::Admission::Admitted(a)) => (Ok(a), Some(Verdict::Auto)),
        Ok(lifecycle::Admission::NeedsApproval(pending)) => {
            approve(shared, action, *pending, rules, req, live, now).await
        }
        Err(refusal) => {
            if refusal.step == Step::Proposal {
                shared.ledger.audit(audit::Event {
                    ts: now.to_string(),
                    kind: AuditKind::Proposal,
                    request_id: action.request_id.to_string(),
                    agent: action.agent.to_string(),
                    cost_center: action.cost_center.to_string(),
                    project: action.project.to_string(),
                    route: action.route.name.clone(),
                    effect: Effect::Deny,
                    reason: refusal.denial.code.clone(),
                    tool: Some(action.name.to_string()),
                    ..Default::default()
                });
            }
            let verdict = match refusal.step {
                s if s == Step::Policy || s == Step::Guardrail || s.is_oversight() => {
                    Some(Verdict::Denied)
                }
                // Refused after the oversight step let it through on its own.
                s if s.after_oversight() => Some(Verdict::Auto),
                _ => None,
            };
            (Err(*refusal.denial), verdict)
        }
    };
    if let Some(verdict) = verdict {
        shared.oversight.count(action.category, verdict);
    }
    let admitted = result?;
    let o = &admitted.oversaw;
    let settle = Admitted {
        breaker: live.breaker.filter(|_| o.breaker),
        track: o.track.then(|| (action.agent.into(), action.name.into())),
        risk: o.assessment.map(|a| a.score.to_string()),
    };
    Ok((admitted, settle))
}

/// A human has to approve: a retry carrying a granted approval id passes once (and the
/// lifecycle goes on to the breaker and the budgets); otherwise a pending approval is created
/// and its id returned in the refusal.
async fn approve<'p>(
    shared: &Arc<Shared>,
    action: &Action<'_>,
    pending: Pending<'p>,
    rules: &lifecycle::Rules<'p>,
    req: &lifecycle::Request<'_>,
    live: &mut Live<'_>,
    now: UnixMillis,
) -> (Result<lifecycle::Admitted<'p>, Denial>, Option<Verdict>) {
    let digest = approval::digest_hex(pending.digest);
    let decision = pending.decision;
    let refused = |d: Denial| {
        let verdict =
            if d.class == Class::ApprovalRequired { Verdict::Approval } else { Verdict::Denied };
        (Err(d), Some(verdict))
    };
    match action.approval {
        Some(id) => {
            if let Err(d) = redeem(shared, action, id, &digest, now, &decision).await {
                return refused(d);
            }
            match pending.granted(rules, req, live, now) {
                Ok(admitted) => (Ok(admitted), Some(Verdict::Approved)),
                Err(r) if r.step.after_oversight() => (Err(*r.denial), Some(Verdict::Approved)),
                Err(r) => refused(*r.denial),
            }
        }
        None => {
            let a = pending.assessment;
            match request(shared, action, &pending.reason, &pending.why, a, digest, now).await {
                Ok(approval) => {
                    let mut denial = Denial::new(
                        Class::ApprovalRequired,
                        &pending.reason,
                        approval_message(&pending.why, &a, &approval),
                    )
                    .with_decision(decision.clause, decision.policy_version);
                    denial.approval_id = Some(approval.id);
                    refused(denial)
                }
                Err(d) => refused(d),
            }
        }
    }
}

fn approval_message(why: &str, a: &Assessment, approval: &Approval) -> String {
    let then = match approval.on_timeout {
        OnTimeout::Approve => "approved",
        OnTimeout::Deny => "denied",
    };
    format!(
        "{why}. {}. Approval {} is pending; if nobody answers by {} it is {then}. Retry with \
         header {APPROVAL_HEADER}: {} once it is granted.",
        a.explanation(),
        approval.id,
        UnixMillis(approval.expires_at_ms),
        approval.id
    )
}

/// Creates (or finds the same pending) approval and audits the request.
async fn request(
    shared: &Arc<Shared>,
    action: &Action<'_>,
    reason: &str,
    why: &str,
    a: Assessment,
    digest: String,
    now: UnixMillis,
) -> Result<Approval, Denial> {
    let o = &shared.oversight;
    let (on_timeout, timeout_ms) = match (a.on_timeout, a.timeout_ms) {
        (Some(on), Some(ms)) => (on, ms),
        // A low score that still needs a human (the policy or autonomy asked): at most as
        // risky as medium, so it is approved if nobody objects in the medium timeout.
        _ => (OnTimeout::Approve, o.config.thresholds.medium_timeout_ms),
    };
    let approval = Approval {
        id: new_approval_id(),
        request_id: action.request_id.to_string(),
        created_at_ms: now.as_millis(),
        expires_at_ms: now.as_millis().saturating_add(timeout_ms),
        on_timeout,
        use_within_ms: o.config.use_within.as_millis() as u64,
        agent: action.agent.to_string(),
        cost_center: action.cost_center.to_string(),
        project: action.project.to_string(),
        route: action.route.name.clone(),
        action: action.name.to_string(),
        digest,
        risk_score: a.score.hundredths(),
        risk_band: a.band.as_str().to_string(),
        reason: reason.to_string(),
        explanation: format!("{why}; {}", a.explanation()),
        state: State::Pending,
        decided_by: None,
        decided_at_ms: None,
        note: None,
        used_by_request: None,
    };
    let created = o.approvals.blocking(move |store| store.create(approval, now)).await;
    match created {
        Ok(approval) => {
            let mut reasons = o.stats.reasons.lock().unwrap_or_else(PoisonError::into_inner);
            if reasons.len() < 1000 || reasons.contains_key(reason) {
                *reasons.entry(reason.to_string()).or_default() += 1;
            }
            Ok(approval)
        }
        Err(e) => {
            tracing::error!(error = %e, "creating an approval");
            Err(Denial::new(
                Class::Unavailable,
                "approvals_unavailable",
                "the approval cannot be recorded right now; retry shortly",
            ))
        }
    }
}

/// Uses a granted approval for this retry, or says why not.
async fn redeem(
    shared: &Arc<Shared>,
    action: &Action<'_>,
    id: &str,
    digest: &str,
    now: UnixMillis,
    decision: &Decision<'_>,
) -> Result<(), Denial> {
    let (id_owned, agent, digest_owned, request_id) = (
        id.to_string(),
        action.agent.to_string(),
        digest.to_string(),
        action.request_id.to_string(),
    );
    let redeemed = shared
        .oversight
        .approvals
        .blocking(move |store| store.redeem(&id_owned, &agent, &digest_owned, &request_id, now))
        .await;
    let with_decision = |d: Denial| d.with_decision(decision.clause, decision.policy_version);
    match redeemed {
        Ok(approval) => {
            audit_approval(shared, &approval, Transition::Used, Some(action.agent));
            Ok(())
        }
        Err(StoreError::Redeem(RedeemError::Pending)) => {
            let mut denial = with_decision(Denial::new(
                Class::ApprovalRequired,
                RedeemError::Pending.code(),
                format!("approval {id} is still waiting for a human"),
            ));
            denial.approval_id = Some(id.to_string());
            Err(denial)
        }
        Err(StoreError::Redeem(e)) => Err(with_decision(Denial::new(
            Class::Policy,
            e.code(),
            format!("approval {} cannot be used: {e}", short(id)),
        ))),
        Err(StoreError::Unknown) => Err(with_decision(Denial::new(
            Class::Policy,
            "approval_unknown",
            format!("there is no approval {}", short(id)),
        ))),
        Err(e) => {
            tracing::error!(error = %e, "using an approval");
            Err(Denial::new(
                Class::Unavailable,
                "approvals_unavailable",
                "the approval cannot be checked right now; retry shortly",
            ))
        }
    }
}

/// A caller-supplied id, cut and made printable for messages.
fn short(id: &str) -> String {
    id.chars().take(64).map(|c| if c.is_ascii_graphic() { c } else { '?' }).collect()
}

/// `apr_` and 128 random bits (from the standard library's per-process random hasher keys).
fn new_approval_id() -> String {
    let word = || {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(now().as_millis());
        h.finish()
    };
    format!("apr_{:016x}{:016x}", word(), word())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn retry_after_rounds_up_like_the_filter() {
        let secs = |ms| super::whole_seconds(Duration::from_millis(ms));
        assert_eq!(
            [secs(0), secs(1), secs(999), secs(1000), secs(1001), secs(59_100)],
            [1, 1, 1, 1, 2, 60]
        );
    }
}
