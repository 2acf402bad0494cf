//! The oversight step of one request over this proxy's state: the core lifecycle's `Stores` port
//! ([`Live`]: rate limiters, the ledger's health, the oversight state, the budgets) and the
//! approval flow around the core's decision ([`admit`]). The state itself is [`crate::oversight`].

use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, PoisonError};

use tollgate_core::approval::{self, remote, Approval, RedeemError, State, Transition};
use tollgate_core::autonomy::{self, BudgetLimit, BudgetOutcome};
use tollgate_core::budget::{BudgetError, Refill, Reservation};
use tollgate_core::guardrails::breaker::Admission;
use tollgate_core::guardrails::escalation::Standing;
use tollgate_core::guardrails::loops::Repeat;
use tollgate_core::guardrails::Violation;
use tollgate_core::lifecycle::{self, ActionRate, BreakerOpen, Pending, RateLimited, Step, Stores};
use tollgate_core::money::Money;
use tollgate_core::policy::{Budgets, Decision, Effect, Facts};
use tollgate_core::record::AuditKind;
use tollgate_core::risk::{Assessment, OnTimeout};
use tollgate_core::time::UnixMillis;

use crate::audit;
use crate::clock::now;
use crate::config::Route;
use crate::deny::{Class, Denial};
use crate::fleet::counts;

use crate::oversight::{audit_approval, Action, Admitted, StoreError, Verdict, APPROVAL_HEADER};
use crate::state::Shared;

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
    /// Fleet mode: refilling an action count's lease failed (Redis cannot be reached): the
    /// step counts as its outage policy says (see [`crate::fleet::counts`]).
    store_failed: bool,
}

impl<'a> Live<'a> {
    pub fn new(
        shared: &'a Shared,
        route: &'a Route,
        reservation_id: &'a str,
        reservation_ttl_ms: u64,
    ) -> Self {
        Live {
            shared,
            route,
            reservation_id,
            reservation_ttl_ms,
            breaker: None,
            store_failed: false,
        }
    }

    /// The fleet store for the action counts, unless they are counted here: Redis down and
    /// `on_store_error: local_allowance` (or a refill just failed under it).
    fn fleet_counts(&self) -> Option<&'a crate::fleet::FleetStore> {
        let fleet = self.shared.budgets.store().fleet()?;
        let local = fleet.local_fallback();
        (!(local && (self.store_failed || fleet.down()))).then_some(fleet)
    }
}

/// A wait in whole seconds for `Retry-After`, rounded up (at least 1), as the Envoy filter does:
/// a client that waits the advertised time is let through.
pub(crate) fn whole_seconds(wait: std::time::Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

impl Live<'_> {
    /// The guardrails' hourly count of this proxy alone.
    fn local_action_rate(
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
}

impl Stores for Live<'_> {
    fn take_rate(
        &mut self,
        clause: &str,
        agent: &str,
        rpm: Option<u64>,
        tpm: Option<u64>,
        tokens: u64,
        now: UnixMillis,
    ) -> Result<(), RateLimited> {
        if let Some(fleet) = self.shared.budgets.store().fleet().filter(|f| !f.rates_local()) {
            return lifecycle::leased_rate(fleet, clause, agent, rpm, tpm, tokens, now);
        }
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
        match self.fleet_counts() {
            Some(fleet) => match lifecycle::leased_action_rate(fleet, agent, action, limit, now) {
                // Refilling failed a moment ago (`fail_closed`): 503.
                ActionRate::Short(_) if self.store_failed => ActionRate::Unavailable,
                taken => taken,
            },
            None => self.local_action_rate(agent, action, limit, now),
        }
    }

    fn recordable(&mut self) -> bool {
        self.shared.ledger.is_healthy()
    }

    fn standing(&mut self, agent: &str) -> Standing {
        self.shared.oversight.standing(agent)
    }

    fn observe_call(&mut self, digest: u64, now: UnixMillis) -> Repeat {
        match (&self.shared.oversight.loops, self.shared.budgets.store().fleet()) {
            (Some(detector), Some(fleet)) => fleet.observe_call(detector.config(), digest, now),
            (Some(detector), None) => detector.observe_digest(digest, now),
            (None, _) => Repeat::Fresh { count: 1 },
        }
    }

    fn consume_autonomy(
        &mut self,
        limits: autonomy::Limits,
        agent: &str,
        action: &str,
        now: UnixMillis,
    ) -> Result<BudgetOutcome, Box<Refill>> {
        let limited = limits.per_day.is_some() || limits.per_action.is_some();
        let Some(fleet) = self.fleet_counts().filter(|_| limited) else {
            return Ok(self.shared.oversight.budget.consume(limits, agent, action, now));
        };
        match lifecycle::leased_autonomy(fleet, limits, agent, action, now) {
            Ok(Some(outcome)) => Ok(outcome),
            Err(refill) if !self.store_failed => Err(refill),
            // Redis cannot be reached (`fail_closed`): a human decides, as when the budget is
            // used up.
            _ => Ok(BudgetOutcome::Exhausted { limit: BudgetLimit::Capacity, used: 0, max: 0 }),
        }
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
            // A fleet lease to refill is the normal way to more budget, not an error.
            let normal = matches!(
                e,
                BudgetError::Exceeded { .. }
                    | BudgetError::Store(tollgate_core::budget::StoreError::Short(_))
            );
            if !normal {
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
    let decided =
        refilled(shared, lifecycle::decide(rules, req, live, now), rules, req, live, now).await;
    let (result, verdict) = match decided {
        Ok(lifecycle::Admission::Admitted(a)) => (Ok(a), Some(Verdict::Auto)),
        Ok(lifecycle::Admission::Short(_)) => unreachable!("refilled answers no Short"),
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
            let verdict = Verdict::of_refusal(refusal.step);
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

/// How many times a request waits for the fleet store to refill before it is refused (each
/// wait ends with enough for it, unless a concurrent request of this proxy took it first).
const MAX_REFILLS: usize = 32;

/// Waits for the budget store while the lifecycle is short of a fleet lease, then lets it go on.
/// Never answers [`lifecycle::Admission::Short`]: when Redis cannot be reached the request is
/// refused 503 (`on_store_error: fail_closed`).
async fn refilled<'p>(
    shared: &Shared,
    mut decided: Result<lifecycle::Admission<'p>, lifecycle::Refusal>,
    rules: &lifecycle::Rules<'p>,
    req: &lifecycle::Request<'_>,
    live: &mut Live<'_>,
    now: UnixMillis,
) -> Result<lifecycle::Admission<'p>, lifecycle::Refusal> {
    let unavailable = |why: String| {
        let mut denial = Denial::new(
            Class::Unavailable,
            "budget_store_unavailable",
            format!("budgets cannot be checked right now: {why}; retry shortly"),
        );
        denial.retry_after_secs = Some(1);
        lifecycle::Refusal { step: Step::Budget, denial: Box::new(denial) }
    };
    for _ in 0..MAX_REFILLS {
        let short = match decided {
            Ok(lifecycle::Admission::Short(short)) => short,
            other => return other,
        };
        let Some(fleet) = shared.budgets.store().fleet() else {
            return Err(unavailable("the budget store asked for a refill it cannot get".into()));
        };
        if let Err(e) = fleet.refill(&short.refill).await {
            tracing::warn!(error = %e, "fleet budget store");
            if !short.refill.key.starts_with(counts::COUNT) {
                return Err(unavailable("the fleet store (Redis) does not answer".into()));
            }
            // An action count: the step runs again and counts as the outage policy says.
            live.store_failed = true;
        }
        decided = short.resume(rules, req, live, now);
    }
    match decided {
        Ok(lifecycle::Admission::Short(_)) => {
            Err(unavailable("the fleet lease ran dry again and again".into()))
        }
        other => other,
    }
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
        let verdict = Verdict::of_asked(d.class);
        (Err(d), Some(verdict))
    };
    match action.approval {
        Some(id) => {
            if let Err(d) = redeem(shared, action, id, &digest, now, &decision).await {
                return refused(d);
            }
            match refilled(shared, pending.granted(rules, req, live, now), rules, req, live, now)
                .await
            {
                Ok(lifecycle::Admission::Admitted(admitted)) => {
                    (Ok(admitted), Some(Verdict::Approved))
                }
                Ok(_) => unreachable!("a granted approval is admitted or refused"),
                Err(r) => {
                    let verdict = Verdict::of_granted_refusal(r.step, r.denial.class);
                    (Err(*r.denial), Some(verdict))
                }
            }
        }
        None => {
            let a = pending.assessment;
            match request(shared, action, &pending.reason, &pending.why, a, digest, now).await {
                Ok(approval) => {
                    let mut denial = Denial::new(
                        Class::ApprovalRequired,
                        &pending.reason,
                        approval_message(&pending.why, &a.explanation(), &approval),
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

pub(crate) fn approval_message(why: &str, risk: &str, approval: &Approval) -> String {
    let then = match approval.on_timeout {
        OnTimeout::Approve => "approved",
        OnTimeout::Deny => "denied",
    };
    format!(
        "{why}. {risk}. Approval {} is pending; if nobody answers by {} it is {then}. Retry with \
         header {APPROVAL_HEADER}: {} once it is granted.",
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
    let asked = remote::Raise {
        request_id: action.request_id.to_string(),
        agent: action.agent.to_string(),
        cost_center: action.cost_center.to_string(),
        project: action.project.to_string(),
        route: action.route.name.clone(),
        action: action.name.to_string(),
        digest,
        reason: reason.to_string(),
        why: why.to_string(),
        risk: a.explanation(),
        risk_score: a.score.hundredths(),
        risk_band: a.band.as_str().to_string(),
        on_timeout: a.on_timeout,
        timeout_ms: a.timeout_ms,
    };
    raise(shared, asked, now).await
}

/// Creates (or finds the same pending) approval for a request a human has to approve: this
/// proxy's, or one an Envoy filter sent the collector.
pub(crate) async fn raise(
    shared: &Arc<Shared>,
    r: remote::Raise,
    now: UnixMillis,
) -> Result<Approval, Denial> {
    let o = &shared.oversight;
    // The timeouts are this proxy's `oversight.approvals` (the collector's, for a raise from an
    // Envoy filter, which refuses them in its own configuration): a high-risk action is denied
    // at `high_timeout`; a medium one, or a low score that still needs a human (the policy or
    // autonomy asked: at most as risky as medium), approved at `medium_timeout`.
    let thresholds = o.config.thresholds;
    let (on_timeout, timeout_ms) = match r.on_timeout {
        Some(OnTimeout::Deny) => (OnTimeout::Deny, thresholds.high_timeout_ms),
        Some(OnTimeout::Approve) | None => (OnTimeout::Approve, thresholds.medium_timeout_ms),
    };
    let reason = r.reason;
    let approval = Approval {
        id: new_approval_id(),
        request_id: r.request_id,
        created_at_ms: now.as_millis(),
        expires_at_ms: now.as_millis().saturating_add(timeout_ms),
        on_timeout,
        use_within_ms: o.config.use_within.as_millis() as u64,
        agent: r.agent,
        cost_center: r.cost_center,
        project: r.project,
        route: r.route,
        action: r.action,
        digest: r.digest,
        risk_score: r.risk_score,
        risk_band: r.risk_band,
        reason: reason.clone(),
        explanation: format!("{}; {}", r.why, r.risk),
        state: State::Pending,
        decided_by: None,
        decided_at_ms: None,
        note: None,
        used_by_request: None,
    };
    let id = approval.id.clone();
    let created = o.approvals.blocking(move |store| store.create(approval, now)).await;
    match created {
        Ok(approval) => {
            // A new approval (not the one already pending for the same agent and action).
            if approval.id == id {
                shared.alerts.raise(crate::alerts::approval_pending(&approval));
            }
            let mut reasons = o.stats.reasons.lock().unwrap_or_else(PoisonError::into_inner);
            if reasons.len() < 1000 || reasons.contains_key(&reason) {
                *reasons.entry(reason).or_default() += 1;
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
    let used = use_granted(shared, id, action.agent, digest, action.request_id, now).await;
    used.map(|_| ()).map_err(|d| {
        if d.class == Class::Unavailable {
            d
        } else {
            d.with_decision(decision.clause, decision.policy_version)
        }
    })
}

/// Uses the granted approval `id` for a retry by `agent` of the action with `digest` (this
/// proxy's, or an Envoy filter's through the collector), auditing it; or the refusal to give.
pub(crate) async fn use_granted(
    shared: &Arc<Shared>,
    id: &str,
    agent: &str,
    digest: &str,
    request_id: &str,
    now: UnixMillis,
) -> Result<Approval, Denial> {
    let (id_owned, agent_owned, digest_owned, request_id) =
        (id.to_string(), agent.to_string(), digest.to_string(), request_id.to_string());
    let redeemed = shared
        .oversight
        .approvals
        .blocking(move |store| {
            store.redeem(&id_owned, &agent_owned, &digest_owned, &request_id, now)
        })
        .await;
    match redeemed {
        Ok(approval) => {
            audit_approval(&shared.ledger, &approval, Transition::Used, Some(agent));
            Ok(approval)
        }
        Err(StoreError::Redeem(RedeemError::Pending)) => {
            let mut denial = Denial::new(
                Class::ApprovalRequired,
                RedeemError::Pending.code(),
                format!("approval {id} is still waiting for a human"),
            );
            denial.approval_id = Some(id.to_string());
            Err(denial)
        }
        Err(StoreError::Redeem(e)) => Err(Denial::new(
            Class::Policy,
            e.code(),
            format!("approval {} cannot be used: {e}", short(id)),
        )),
        Err(StoreError::Unknown) => Err(Denial::new(
            Class::Policy,
            "approval_unknown",
            format!("there is no approval {}", short(id)),
        )),
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
