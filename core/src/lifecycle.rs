//! The admission phase of a request's lifecycle, named once for every adapter (the sidecar and
//! forward proxy, the Envoy filter, `tollgate explain`).
//!
//! [`decide`] takes a classified request ([`Request`]: its policy [`Facts`], what the body said,
//! what the oversight step needs) and runs, in this fixed order, first refusal wins:
//!
//! 1. **policy**: the snapshot's decision; `deny` refuses (`require_approval` goes on, to be
//!    asked at step 7);
//! 2. **worst-case cost**: the request's upper bound in tokens at the model's dearest rates
//!    (`missing_model` 400 for a model call naming no model, `unknown_model` 403 for a model the
//!    rate card does not know); a tool call at its tool rate;
//! 3. **guardrails** (with a `guardrails:` section, for tool actions: each MCP `tools/call`,
//!    or a tool route's call): the action needs a policy (`unknown_action`); its arguments (every
//!    string, at any depth: the JSON body and query parameters of a tool route) must match none
//!    of its forbidden patterns (`forbidden_pattern`), name only resources under its
//!    `allowed_resources` (`resource_not_allowed`) and stay within the bounds
//!    (`arguments_too_deep`, `arguments_too_large`); the worst case must stay under its
//!    `max_cost_per_call` (`cost_limit_exceeded`); then one call of the agent's hourly allowance
//!    for the action is taken (`rate_limit_exceeded`). A policy that `requires_approval` asks a
//!    human at step 7;
//! 4. **cost cap**: the decision's `max_cost_per_request` (`cost_limit_exceeded`);
//! 5. **rate limits**: requests and tokens per minute, per agent under the clause that decided;
//! 6. **recording**: nothing is served unrecorded (`ledger_unavailable` while the ledger cannot
//!    be written);
//! 7. **oversight**: a disabled agent (`agent_disabled`) → autonomy `DISABLED` /
//!    `PROPOSE_ONLY` → the same tool call again and again (`loop_detected`) → does a human have
//!    to approve? (the policy said so, the risk score is medium or high, the agent is under
//!    review, autonomy asks, or `AUTO_EXECUTE` found its budget used up) → the upstream's
//!    circuit breaker (`circuit_open`, last, so that a refusal above never takes the half-open
//!    probe);
//! 8. **budgets**: the worst case reserved against every budget that applies, all or nothing
//!    (`budget_exceeded`).
//!
//! The live state those steps read and change (rate-limit counters, the ledger's health,
//! escalation standings, the loop detector, autonomy budgets, outcome history, breakers,
//! budgets, the guardrails' hourly action counts) is behind the [`Stores`] port: in-process
//! maps in the proxy, Envoy shared data in the filter, leases of the fleet's counters in fleet
//! mode (Redis for the sidecar, through the collector for the filter: [`leased_rate`] and
//! [`crate::budget::lease`]), and for `explain` a store that answers what it can from the
//! configuration and says which live state it had to assume.
//!
//! What waits on I/O stays with the adapter: when a human has to approve, `decide` answers
//! [`Admission::NeedsApproval`]; the adapter redeems a granted approval (and then calls
//! [`Pending::granted`], which runs the breaker and the budgets) or records a new one and
//! refuses. Likewise a budget store that serves a budget from a local share (a fleet lease)
//! and must first fetch more from its backend answers [`Admission::Short`]; the adapter
//! fetches, then calls [`Short::resume`]. An adapter that waits across host callbacks (the Envoy
//! filter asking the collector) parks the continuation first ([`Short::park`],
//! [`Pending::park`]): the parked form owns its state and evaluates the policy's decision again
//! when it goes on. The core reads no clock: `now` is a parameter.
//!
//! The allow path of a request without oversight guards allocates nothing here.

use serde_json::Value;

use crate::autonomy::{self, BudgetOutcome, Mode};
use crate::budget::{BudgetError, Refill, Reservation, Scope, StoreError};
use crate::endpoints::{self, Pricing};
use crate::engine::Engine;
use crate::guardrails::escalation::Standing;
use crate::guardrails::loops::{self, Repeat};
use crate::guardrails::Violation;
use crate::inspect::RequestInfo;
use crate::metering::{Api, Provider};
use crate::money::Money;
use crate::policy::{Budgets, Decision, Effect, Facts, Snapshot};
use crate::pricing::Cost;
use crate::refusal::{Class, Denial};
use crate::reservation::{self, Bound};
use crate::risk::{self, Assessment, Profile, Thresholds};
use crate::time::UnixMillis;

mod leased;
pub use leased::{leased_action_rate, leased_autonomy, leased_rate, take_counts, CountRefused};

/// What the adapter decides with: the compiled configuration and which oversight guards are on.
#[derive(Clone, Copy, Debug)]
pub struct Rules<'a> {
    /// Rates (worst case, tool prices) and autonomy modes.
    pub engine: &'a Engine,
    /// The policy snapshot the request is decided under (the adapter may hot-reload it, so it is
    /// passed apart from the engine).
    pub policy: &'a Snapshot,
    pub oversight: Guards,
}

/// The oversight configuration `decide` needs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Guards {
    /// The configuration has an `autonomy:` section (without one, no action is gated by mode).
    pub autonomy: bool,
    /// The loop detector is on.
    pub loops: bool,
    /// Upstreams have circuit breakers.
    pub breakers: bool,
    /// Consecutive-error escalation is on.
    pub escalation: bool,
    /// Risk bands and approval timeouts.
    pub thresholds: Thresholds,
}

impl Guards {
    /// Whether anything beyond the policy's own effect can gate a request.
    pub fn any(&self) -> bool {
        self.autonomy || self.loops || self.breakers || self.escalation
    }
}

/// How a request is priced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// A model API call of this provider (`None`: the provider is not known from the route).
    Llm(Option<Provider>),
    /// A tool or other call, priced by its tool's rate if it names one.
    Other,
}

/// A classified request, all borrowed.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The policy facts; `method` and `path` (without the query) also select free endpoints.
    pub facts: Facts<'a>,
    pub call: Call,
    /// The model API endpoint, for the token bound.
    pub api: Option<Api>,
    /// What the body said.
    pub info: &'a RequestInfo,
    /// The request body (a tool call's price by size; the arguments of a REST call).
    pub body: &'a [u8],
    /// The query string (without `?`): a tool route's call has its parameters checked too.
    pub query: Option<&'a str>,
    /// The autonomy action type: the tool name, `llm` for model calls, else the route's name.
    pub action: &'a str,
    /// A tool call (the loop detector watches those).
    pub is_tool: bool,
    /// The route's declared risk dimensions (the matched rule's override them).
    pub risk: Option<Profile>,
}

impl Request<'_> {
    fn agent(&self) -> &str {
        self.facts.agent.unwrap_or_default()
    }

    /// The digest approvals and the loop detector bind to: agent, action and arguments (the
    /// first MCP tool call's, else the body as JSON, else the body as text).
    pub fn digest(&self) -> u64 {
        let (agent, name) = (self.agent(), self.action);
        match self.info.tool_calls().next() {
            Some(call) => loops::digest(agent, name, &call.arguments),
            None => match serde_json::from_slice::<Value>(self.body) {
                Ok(args) => loops::digest(agent, name, &args),
                Err(_) => loops::digest(
                    agent,
                    name,
                    &Value::String(String::from_utf8_lossy(self.body).into_owned()),
                ),
            },
        }
    }
}

/// A rate limit that refused, as the store measured it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RateLimited {
    Requests {
        limit: u64,
        retry_after_secs: u64,
    },
    Tokens {
        limit: u64,
        retry_after_secs: u64,
    },
    /// The counters cannot be read (a store that fails open answers `Ok` instead).
    Unavailable,
    /// The store serves the allowance from a local share it must refill first (a fleet lease):
    /// nothing was taken. The lifecycle hands it back as [`Admission::Short`].
    Short(Box<Refill>),
}

/// What taking one call from an (agent, action) hourly allowance found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActionRate {
    /// Taken: the calls this hour, this one included.
    Taken(u32),
    /// The allowance is used up (`used` calls this hour); nothing was taken.
    Full { used: u32, retry_after_ms: u64 },
    /// The counters cannot be read (a store that fails open answers `Taken` instead).
    Unavailable,
    /// The store counts from a local share it must refill first (a fleet lease): nothing was
    /// taken. The lifecycle hands it back as [`Admission::Short`].
    Short(Box<Refill>),
}

/// An open circuit breaker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerOpen {
    /// The upstream, for the message.
    pub upstream: String,
    pub retry_after_ms: u64,
}

/// The live state of the lifecycle: the port each adapter implements over its own stores.
/// A store is made per request, so it knows the request's route, identity and reservation id.
pub trait Stores {
    /// Takes one request and `tokens` tokens from the allowances of `agent` under `clause`.
    /// Called only when the decision sets `rpm` or `tpm`.
    fn take_rate(
        &mut self,
        clause: &str,
        agent: &str,
        rpm: Option<u64>,
        tpm: Option<u64>,
        tokens: u64,
        now: UnixMillis,
    ) -> Result<(), RateLimited>;

    /// Takes one call of `action` by `agent` from its hourly allowance of `limit` calls (the
    /// UTC hour of `now`; a store that can expire keys uses [`crate::guardrails::rate_key`],
    /// one that cannot keeps the hour beside the count in one key per agent and action). Called
    /// only for a guardrail policy with `rate_limit_per_hour`.
    fn take_action_rate(
        &mut self,
        agent: &str,
        action: &str,
        limit: u32,
        now: UnixMillis,
    ) -> ActionRate;

    /// Whether what is served can be recorded right now.
    fn recordable(&mut self) -> bool;

    /// The agent's escalation standing (called only with escalation on).
    fn standing(&mut self, agent: &str) -> Standing;

    /// Counts one tool call by its digest (called only with the loop detector on).
    fn observe_call(&mut self, digest: u64, now: UnixMillis) -> Repeat;

    /// Consumes one autonomy budget unit (called only for `AUTO_EXECUTE` when nothing else
    /// asked for a human). `Err`: the store counts from a local share it must refill first (a
    /// fleet lease); nothing was taken, and the lifecycle hands it back as [`Admission::Short`].
    fn consume_autonomy(
        &mut self,
        limits: autonomy::Limits,
        agent: &str,
        action: &str,
        now: UnixMillis,
    ) -> Result<BudgetOutcome, Box<Refill>>;

    /// (successes, total) of the agent's earlier `action`s, for the risk score.
    fn history(&mut self, agent: &str, action: &str) -> Option<(u64, u64)>;

    /// Asks the route's upstream circuit breaker to let the call through (called only with
    /// breakers on).
    fn breaker(&mut self, now: UnixMillis) -> Result<(), BreakerOpen>;

    /// Reserves `amount` against every budget in `budgets` (never empty) for the request whose
    /// attribution is `facts`. `Ok(None)`: let through without a reservation (a store that
    /// fails open).
    fn reserve(
        &mut self,
        budgets: &Budgets<'_>,
        facts: &Facts<'_>,
        amount: Money,
        now: UnixMillis,
    ) -> Result<Option<Reservation>, BudgetError>;
}

/// The budget scope values of a request's attribution.
pub fn scope_value<'a>(facts: &Facts<'a>, scope: Scope) -> Option<&'a str> {
    match scope {
        Scope::Agent => facts.agent,
        Scope::Project => facts.project,
        Scope::CostCenter => facts.cost_center,
        Scope::BusinessUnit => facts.business_unit,
        Scope::Global => None,
    }
}

/// The step of the lifecycle that refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The policy denied it.
    Policy,
    /// A model call naming no model, or a model the rate card does not know.
    Pricing,
    /// A guardrail: an unknown action, a forbidden argument, a resource not allowed, the
    /// action's cost per call or hourly rate.
    Guardrail,
    /// Over the per-request cost cap.
    CostCap,
    RateLimit,
    /// Usage cannot be recorded right now.
    Recording,
    /// The agent is disabled (error escalation).
    Disabled,
    /// Autonomy `DISABLED`.
    AutonomyDisabled,
    /// Autonomy `PROPOSE_ONLY`: the adapter records the proposal.
    Proposal,
    Loop,
    Breaker,
    Budget,
}

impl Step {
    /// Refused by the oversight step itself (after its fast path).
    pub fn is_oversight(self) -> bool {
        matches!(
            self,
            Step::Disabled | Step::AutonomyDisabled | Step::Proposal | Step::Loop | Step::Breaker
        )
    }

    /// Refused after the oversight step let the request through.
    pub fn after_oversight(self) -> bool {
        self == Step::Budget
    }
}

/// A refusal and the step that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub step: Step,
    /// Boxed: a refusal is rare, and the `Ok` path stays small.
    pub denial: Box<Denial>,
}

/// What the decision priced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Priced {
    /// The worst case: what is reserved, and what an implausible report is billed.
    pub reserved: Cost,
    /// The request's token bound (priced model calls).
    pub bound: Option<Bound>,
    /// A free endpoint (a model listing): $0, nothing reserved.
    pub free: bool,
}

impl Priced {
    pub fn worst_case(&self) -> Money {
        self.reserved.total
    }
}

/// What the oversight step made of an admitted request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Oversaw {
    /// Passed through the route's breaker (its outcome must be reported).
    pub breaker: bool,
    /// The outcome is to be counted for the (agent, action) and fed to escalation.
    pub track: bool,
    /// The risk score, when one was computed.
    pub assessment: Option<Assessment>,
    /// A granted approval was used.
    pub approved: bool,
    /// Nothing but the policy's allow applied (the oversight fast path).
    pub fast: bool,
}

/// An admitted request.
#[derive(Debug)]
pub struct Admitted<'p> {
    pub decision: Decision<'p>,
    pub priced: Priced,
    pub oversaw: Oversaw,
    pub reservation: Option<Reservation>,
}

/// A request a human has to approve first.
#[derive(Debug)]
pub struct Pending<'p> {
    pub decision: Decision<'p>,
    pub priced: Priced,
    /// Why: a reason code and a human explanation.
    pub reason: String,
    pub why: String,
    /// The action's risk (scored with the default profile when nothing declared one); it goes
    /// on the response of a retry that uses a granted approval.
    pub assessment: Assessment,
    /// The digest the approval binds to ([`Request::digest`]).
    pub digest: u64,
}

/// What [`decide`] let through.
// Not boxed: `Admitted` is the allow path, which must not allocate.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Admission<'p> {
    Admitted(Admitted<'p>),
    /// Boxed: the approval path is rare, and the allow path stays small.
    NeedsApproval(Box<Pending<'p>>),
    /// A store counts from a local share it must first refill from its backend (a fleet
    /// store's lease) before a step can count: the adapter fetches [`Short::refill`], then
    /// calls [`Short::resume`], which goes on from that step. What the steps before it counted
    /// stays counted, and is not counted again.
    Short(Box<Short<'p>>),
}

/// A request waiting for a store to refill a local share (see [`Admission::Short`]): at a
/// guardrail's hourly action count, at the rate limits, at the autonomy budget or at the
/// budgets.
#[derive(Debug)]
pub struct Short<'p> {
    /// What the store needs from its backend.
    pub refill: Refill,
    at: Resume<'p>,
}

#[derive(Debug)]
enum Resume<'p> {
    /// At the guardrails (step 3): the tool calls before call `from` passed and were counted;
    /// `ask` is what they asked for.
    Guard {
        from: usize,
        ask: Option<(String, String)>,
    },
    Rate {
        decision: Decision<'p>,
        priced: Priced,
        guard_ask: Option<(String, String)>,
    },
    /// At the autonomy budget (oversight step 4): everything before it ran.
    Autonomy {
        decision: Decision<'p>,
        priced: Priced,
        asked: Asked,
    },
    /// Everything but the reservation is done.
    Budget(Admitted<'p>),
}

impl<'p> Short<'p> {
    /// Goes on from the step that was short, after the adapter refilled the store. May be short
    /// again (a concurrent request took the refill first). From the guardrails or the rate
    /// limits it runs every later step, and may ask for an approval; from the autonomy budget,
    /// the rest of the oversight and the budgets; from the budgets it only reserves.
    pub fn resume(
        self,
        rules: &Rules<'p>,
        req: &Request<'_>,
        stores: &mut impl Stores,
        now: UnixMillis,
    ) -> Result<Admission<'p>, Refusal> {
        match self.at {
            Resume::Guard { from, ask } => decide_from(rules, req, stores, now, from, ask),
            Resume::Rate { decision, priced, guard_ask } => {
                from_rate_limits(rules, req, stores, decision, priced, guard_ask, now)
            }
            Resume::Autonomy { decision, priced, asked } => {
                let overseen = conclude(rules, req, stores, &decision, priced, asked, None, now);
                after_oversight(rules, req, stores, decision, priced, overseen, now)
            }
            Resume::Budget(Admitted { decision, priced, oversaw, .. }) => {
                let reserved = reserve(&decision, req, stores, priced.worst_case(), now)?;
                Ok(admission(decision, priced, oversaw, reserved))
            }
        }
    }
}

impl Short<'_> {
    /// This continuation without borrows, for an adapter that waits for the refill across
    /// callbacks (the Envoy filter's call to the collector). The policy's decision is evaluated
    /// again on [`Parked::resume`]: it is pure, so the same snapshot and facts give the same
    /// decision.
    pub fn park(self) -> Parked {
        let at = match self.at {
            Resume::Guard { from, ask } => ParkedAt::Guard { from, ask },
            Resume::Rate { priced, guard_ask, .. } => ParkedAt::Rate { priced, guard_ask },
            Resume::Autonomy { priced, asked, .. } => ParkedAt::Autonomy { priced, asked },
            Resume::Budget(Admitted { priced, oversaw, .. }) => {
                ParkedAt::Budget { priced, oversaw }
            }
        };
        Parked { refill: self.refill, at }
    }
}

/// A [`Short`] that owns its state (see [`Short::park`]).
#[derive(Debug)]
pub struct Parked {
    /// What the store needs from its backend.
    pub refill: Refill,
    at: ParkedAt,
}

#[derive(Debug)]
enum ParkedAt {
    Guard { from: usize, ask: Option<(String, String)> },
    Rate { priced: Priced, guard_ask: Option<(String, String)> },
    Autonomy { priced: Priced, asked: Asked },
    Budget { priced: Priced, oversaw: Oversaw },
}

impl Parked {
    /// [`Short::resume`] for a parked continuation: `rules` and `req` must be the ones it was
    /// decided under.
    pub fn resume<'p>(
        self,
        rules: &Rules<'p>,
        req: &Request<'_>,
        stores: &mut impl Stores,
        now: UnixMillis,
    ) -> Result<Admission<'p>, Refusal> {
        let decision = || rules.policy.evaluate(&req.facts);
        let at = match self.at {
            ParkedAt::Guard { from, ask } => Resume::Guard { from, ask },
            ParkedAt::Rate { priced, guard_ask } => {
                Resume::Rate { decision: decision(), priced, guard_ask }
            }
            ParkedAt::Autonomy { priced, asked } => {
                Resume::Autonomy { decision: decision(), priced, asked }
            }
            ParkedAt::Budget { priced, oversaw } => Resume::Budget(Admitted {
                decision: decision(),
                priced,
                oversaw,
                reservation: None,
            }),
        };
        Short { refill: self.refill, at }.resume(rules, req, stores, now)
    }
}

impl Pending<'_> {
    /// This request without borrows, for an adapter that asks its approval store across
    /// callbacks; [`ParkedPending::granted`] evaluates the policy's decision again.
    pub fn park(self) -> ParkedPending {
        ParkedPending {
            priced: self.priced,
            reason: self.reason,
            why: self.why,
            assessment: self.assessment,
            digest: self.digest,
        }
    }
}

/// A [`Pending`] that owns its state (see [`Pending::park`]).
#[derive(Debug)]
pub struct ParkedPending {
    pub priced: Priced,
    pub reason: String,
    pub why: String,
    pub assessment: Assessment,
    pub digest: u64,
}

impl ParkedPending {
    /// [`Pending::granted`] for a parked request: `rules` and `req` must be the ones it was
    /// decided under.
    pub fn granted<'p>(
        self,
        rules: &Rules<'p>,
        req: &Request<'_>,
        stores: &mut impl Stores,
        now: UnixMillis,
    ) -> Result<Admission<'p>, Refusal> {
        let pending = Pending {
            decision: rules.policy.evaluate(&req.facts),
            priced: self.priced,
            reason: self.reason,
            why: self.why,
            assessment: self.assessment,
            digest: self.digest,
        };
        pending.granted(rules, req, stores, now)
    }
}

/// The last step's outcome: a reservation (none when no budget applies), or a store that must
/// refill first.
enum Reserved {
    Done(Option<Reservation>),
    Short(Refill),
}

/// The admission of a request that passed every step before the budgets.
fn admission<'p>(
    decision: Decision<'p>,
    priced: Priced,
    oversaw: Oversaw,
    reserved: Reserved,
) -> Admission<'p> {
    match reserved {
        Reserved::Done(reservation) => {
            Admission::Admitted(Admitted { decision, priced, oversaw, reservation })
        }
        Reserved::Short(refill) => Admission::Short(Box::new(Short {
            refill,
            at: Resume::Budget(Admitted { decision, priced, oversaw, reservation: None }),
        })),
    }
}

/// The admission phase of one request; see the module doc for the order.
pub fn decide<'p>(
    rules: &Rules<'p>,
    req: &Request<'_>,
    stores: &mut impl Stores,
    now: UnixMillis,
) -> Result<Admission<'p>, Refusal> {
    decide_from(rules, req, stores, now, 0, None)
}

/// [`decide`], with the guardrails going on from tool call `from` (the calls before it passed
/// and were counted, asking for `ask`).
fn decide_from<'p>(
    rules: &Rules<'p>,
    req: &Request<'_>,
    stores: &mut impl Stores,
    now: UnixMillis,
    from: usize,
    ask: Option<(String, String)>,
) -> Result<Admission<'p>, Refusal> {
    // 1. Policy.
    let decision = rules.policy.evaluate(&req.facts);
    if decision.effect == Effect::Deny {
        let denial = Denial::for_decision(&decision, "")
            .unwrap_or_else(|| Denial::new(Class::Policy, decision.reason, decision.explanation));
        return Err(Refusal { step: Step::Policy, denial: Box::new(denial) });
    }
    let refuse = |step: Step, denial: Denial| Refusal {
        step,
        denial: Box::new(denial.with_decision(decision.clause, decision.policy_version)),
    };

    // 2. The worst case.
    let priced = price(rules.engine, req).map_err(|d| refuse(Step::Pricing, *d))?;
    let worst_case = priced.worst_case();

    // 3. Guardrails on tool actions.
    let mut guard_ask = ask;
    if let (true, Some(g)) = (req.is_tool, rules.engine.enforced_guardrails()) {
        let check = Check { g, agent: req.facts.agent.unwrap_or("-"), worst_case, now };
        guard_ask = match guard(&check, req, stores, from, guard_ask) {
            Ok(ask) => ask,
            Err(Guarded::Refused(d)) => return Err(refuse(Step::Guardrail, *d)),
            Err(Guarded::Short { refill, from, ask }) => {
                return Ok(Admission::Short(Box::new(Short {
                    refill: *refill,
                    at: Resume::Guard { from, ask },
                })));
            }
        };
    }

    // 4. The per-request cost cap.
    if let Some(cap) = decision.limits.max_cost_per_request {
        if worst_case > cap {
            return Err(refuse(
                Step::CostCap,
                Denial::new(
                    Class::Policy,
                    "cost_limit_exceeded",
                    format!(
                        "the request may cost up to ${worst_case}, over the ${cap} per-request \
                         limit (lower max_tokens or ask for a higher limit)"
                    ),
                ),
            ));
        }
    }

    from_rate_limits(rules, req, stores, decision, priced, guard_ask, now)
}

/// Steps 5 to 8: from the rate limits on.
fn from_rate_limits<'p>(
    rules: &Rules<'p>,
    req: &Request<'_>,
    stores: &mut impl Stores,
    decision: Decision<'p>,
    priced: Priced,
    guard_ask: Option<(String, String)>,
    now: UnixMillis,
) -> Result<Admission<'p>, Refusal> {
    let worst_case = priced.worst_case();
    let refuse = |step: Step, denial: Denial| Refusal {
        step,
        denial: Box::new(denial.with_decision(decision.clause, decision.policy_version)),
    };

    // 5. Rate limits, per agent under the clause that decided.
    let limits = decision.limits;
    if limits.rpm.is_some() || limits.tpm.is_some() {
        let tokens = priced.bound.as_ref().map_or(0, Bound::tokens);
        let agent = req.facts.agent.unwrap_or("-");
        match stores.take_rate(decision.clause, agent, limits.rpm, limits.tpm, tokens, now) {
            Ok(()) => {}
            Err(RateLimited::Short(refill)) => {
                return Ok(Admission::Short(Box::new(Short {
                    refill: *refill,
                    at: Resume::Rate { decision, priced, guard_ask },
                })));
            }
            // A store that cannot count is not the decision's doing: no clause, as for budgets.
            Err(RateLimited::Unavailable) => {
                let denial = rate_denial(RateLimited::Unavailable);
                return Err(Refusal { step: Step::RateLimit, denial: Box::new(denial) });
            }
            Err(limited) => return Err(refuse(Step::RateLimit, rate_denial(limited))),
        }
    }

    // 6. Nothing is served unrecorded.
    if !stores.recordable() {
        let mut denial = Denial::new(
            Class::Unavailable,
            "ledger_unavailable",
            "usage cannot be recorded right now (the ledger is not writable); retry shortly",
        );
        denial.retry_after_secs = Some(1);
        return Err(refuse(Step::Recording, denial));
    }

    // 7. Oversight.
    let profile = match (decision.risk, req.risk) {
        (Some(rule), Some(route)) => Some(rule.over(route)),
        (rule, route) => rule.or(route),
    };
    let guards = rules.oversight;
    if decision.effect == Effect::Allow && profile.is_none() && !guards.any() && guard_ask.is_none()
    {
        let oversaw = Oversaw { fast: true, ..Oversaw::default() };
        let reserved = reserve(&decision, req, stores, worst_case, now)?;
        return Ok(admission(decision, priced, oversaw, reserved));
    }
    let overseen = oversee(rules, req, stores, &decision, priced, profile, guard_ask, now)?;
    after_oversight(rules, req, stores, decision, priced, overseen, now)
}

/// Steps 7 (the breaker) and 8, after oversight steps 1–4 said what they make of the request.
fn after_oversight<'p>(
    rules: &Rules<'p>,
    req: &Request<'_>,
    stores: &mut impl Stores,
    decision: Decision<'p>,
    priced: Priced,
    overseen: Overseen<'p>,
    now: UnixMillis,
) -> Result<Admission<'p>, Refusal> {
    match overseen {
        Overseen::Ask(pending) => Ok(Admission::NeedsApproval(pending)),
        Overseen::Short(refill, asked) => Ok(Admission::Short(Box::new(Short {
            refill: *refill,
            at: Resume::Autonomy { decision, priced, asked },
        }))),
        Overseen::Pass(assessment) => {
            let oversaw = finish_oversight(&rules.oversight, stores, assessment, false, now)
                .map_err(|d| Refusal {
                    step: Step::Breaker,
                    denial: Box::new((*d).with_decision(decision.clause, decision.policy_version)),
                })?;
            let reserved = reserve(&decision, req, stores, priced.worst_case(), now)?;
            Ok(admission(decision, priced, oversaw, reserved))
        }
    }
}

impl<'p> Pending<'p> {
    /// Goes on after the adapter redeemed a granted approval for this request: the breaker,
    /// then the budgets. Answers [`Admission::Admitted`] or [`Admission::Short`], never
    /// another approval.
    pub fn granted(
        self,
        rules: &Rules<'p>,
        req: &Request<'_>,
        stores: &mut impl Stores,
        now: UnixMillis,
    ) -> Result<Admission<'p>, Refusal> {
        let decision = self.decision;
        let assessment = Some(self.assessment);
        let oversaw =
            finish_oversight(&rules.oversight, stores, assessment, true, now).map_err(|d| {
                Refusal {
                    step: Step::Breaker,
                    denial: Box::new((*d).with_decision(decision.clause, decision.policy_version)),
                }
            })?;
        let reserved = reserve(&decision, req, stores, self.priced.worst_case(), now)?;
        Ok(admission(decision, self.priced, oversaw, reserved))
    }
}

/// The request's worst case: a model call at the model's dearest rates over its token bound, a
/// tool call at its tool's rate.
pub fn price(engine: &Engine, req: &Request<'_>) -> Result<Priced, Box<Denial>> {
    let rates = engine.rates();
    match req.call {
        Call::Llm(provider) => {
            let method = req.facts.method.unwrap_or_default();
            let path = req.facts.path.unwrap_or_default();
            let pricing = endpoints::llm_pricing(provider, method, path, req.info.model.as_deref())
                .map_err(|e| Denial::new(Class::BadRequest, "missing_model", e.to_string()))
                .map_err(Box::new)?;
            match pricing {
                Pricing::Free(_) => Ok(Priced { reserved: Cost::ZERO, bound: None, free: true }),
                Pricing::Model(name) => {
                    let b = reservation::bound(req.api, req.info, rates.limits(name));
                    let priced = rates
                        .worst_case(name, b.input, b.output)
                        .map_err(|e| Denial::new(Class::Policy, "unknown_model", e.to_string()))
                        .map_err(Box::new)?;
                    Ok(Priced { reserved: priced.cost, bound: Some(b), free: false })
                }
            }
        }
        Call::Other => {
            let cost = req
                .facts
                .tool
                .and_then(|t| rates.price_tool(t, 1, req.body.len() as u64).ok())
                .map_or(Money::ZERO, |c| c.total);
            let reserved = Cost { per_call: cost, total: cost, ..Cost::ZERO };
            Ok(Priced { reserved, bound: None, free: false })
        }
    }
}

/// The reason code when a guardrail policy asks for a human.
pub const GUARDRAIL_APPROVAL: &str = "guardrail_requires_approval";

/// What step 3 checks every tool call with.
struct Check<'a> {
    g: &'a crate::guardrails::Guardrails,
    agent: &'a str,
    worst_case: Money,
    now: UnixMillis,
}

/// Why step 3 stopped short of an answer.
enum Guarded {
    Refused(Box<Denial>),
    /// The hourly count of tool call `from` must be refilled first (the calls before it passed
    /// and were counted, asking for `ask`).
    Short {
        refill: Box<Refill>,
        from: usize,
        ask: Option<(String, String)>,
    },
}

/// Step 3: every tool call of the request against the guardrails, from call `from` on (the
/// ones before it passed and asked for `ask`). `Ok(Some(..))`: a policy requires approval
/// (reason, explanation).
fn guard(
    check: &Check<'_>,
    req: &Request<'_>,
    stores: &mut impl Stores,
    from: usize,
    mut ask: Option<(String, String)>,
) -> Result<Option<(String, String)>, Guarded> {
    use crate::guardrails::args::{query_object, Part};
    let short = |refill, from, ask| Guarded::Short { refill, from, ask };
    if !req.info.rpc.is_empty() {
        for (i, call) in req.info.rpc.iter().enumerate().skip(from) {
            let Some(tool) = &call.tool else { continue };
            let id = call.id.clone().unwrap_or(Value::Null);
            let parts = [Part { root: "$", value: &tool.arguments }];
            match check_call(check, stores, &tool.name, &parts, Some(&id), &mut ask) {
                Ok(()) => {}
                Err(Checked::Refused(d)) => return Err(Guarded::Refused(d)),
                Err(Checked::Short(refill)) => return Err(short(refill, i, ask)),
            }
        }
    } else if from == 0 {
        let body = if req.body.is_empty() {
            None
        } else {
            Some(match serde_json::from_slice::<Value>(req.body) {
                Ok(v) => v,
                Err(_) => Value::String(String::from_utf8_lossy(req.body).into_owned()),
            })
        };
        let query = req.query.filter(|q| !q.is_empty()).map(query_object);
        let mut parts = Vec::with_capacity(2);
        if let Some(v) = &body {
            parts.push(Part { root: "$", value: v });
        }
        if let Some(v) = &query {
            parts.push(Part { root: "$query", value: v });
        }
        match check_call(check, stores, req.action, &parts, None, &mut ask) {
            Ok(()) => {}
            Err(Checked::Refused(d)) => return Err(Guarded::Refused(d)),
            Err(Checked::Short(refill)) => return Err(short(refill, 0, ask)),
        }
    }
    Ok(ask)
}

enum Checked {
    Refused(Box<Denial>),
    Short(Box<Refill>),
}

/// One tool call against its guardrail policy, then one call of its hourly allowance.
fn check_call(
    check: &Check<'_>,
    stores: &mut impl Stores,
    action: &str,
    parts: &[crate::guardrails::args::Part<'_>],
    rpc_id: Option<&Value>,
    ask: &mut Option<(String, String)>,
) -> Result<(), Checked> {
    let violation = match check.g.check_parts(action, parts, check.worst_case) {
        Ok(policy) => {
            let taken = match policy.rate_limit_per_hour {
                Some(limit) => {
                    match stores.take_action_rate(check.agent, action, limit, check.now) {
                        ActionRate::Taken(_) => Ok(()),
                        ActionRate::Full { used, retry_after_ms } => {
                            Err(Violation::RateLimitExceeded { used, limit, retry_after_ms })
                        }
                        ActionRate::Short(refill) => return Err(Checked::Short(refill)),
                        ActionRate::Unavailable => {
                            return Err(Checked::Refused(Box::new(Denial::new(
                                Class::Unavailable,
                                "budget_store_unavailable",
                                "the guardrails' hourly action counts cannot be read right now",
                            ))))
                        }
                    }
                }
                None => Ok(()),
            };
            match taken {
                Ok(()) => {
                    if policy.requires_approval && ask.is_none() {
                        *ask = Some((
                            GUARDRAIL_APPROVAL.to_string(),
                            format!(
                                "the guardrails require a human approval for `{}` ({}, {} risk)",
                                crate::guardrails::patterns::excerpt(action),
                                policy.category.as_str(),
                                policy.risk_level.as_str()
                            ),
                        ));
                    }
                    return Ok(());
                }
                Err(v) => v,
            }
        }
        Err(v) => v,
    };
    let class = match violation {
        Violation::RateLimitExceeded { .. } => Class::RateLimited,
        _ => Class::Policy,
    };
    let mut denial = Denial::new(class, violation.code(), violation.explanation(action));
    if let Violation::RateLimitExceeded { retry_after_ms, .. } = violation {
        denial.retry_after_secs = Some(retry_after_ms.div_ceil(1000).max(1));
    }
    let mut breach = violation.breach(action);
    breach.rpc_id = rpc_id.cloned();
    denial.guardrail = Some(Box::new(breach));
    Err(Checked::Refused(Box::new(denial)))
}

fn rate_denial(limited: RateLimited) -> Denial {
    let (what, code, limit, secs) = match limited {
        RateLimited::Requests { limit, retry_after_secs } => {
            ("requests", "rate_limited_requests", limit, retry_after_secs)
        }
        RateLimited::Tokens { limit, retry_after_secs } => {
            ("tokens", "rate_limited_tokens", limit, retry_after_secs)
        }
        RateLimited::Unavailable | RateLimited::Short(_) => {
            return Denial::new(
                Class::Unavailable,
                "budget_store_unavailable",
                "budgets cannot be checked right now",
            )
        }
    };
    let secs = secs.max(1);
    let mut denial = Denial::new(
        Class::RateLimited,
        code,
        format!("more than {limit} {what} per minute; retry in {secs} s"),
    );
    denial.retry_after_secs = Some(secs);
    denial
}

enum Overseen<'p> {
    /// No human needed; the risk score if one was computed.
    Pass(Option<Assessment>),
    Ask(Box<Pending<'p>>),
    /// The autonomy budget's count must be refilled first.
    Short(Box<Refill>, Asked),
}

/// What oversight steps 1–3 found, for the autonomy budget and the approval question.
#[derive(Clone, Copy, Debug)]
struct Asked {
    resolution: Option<autonomy::Resolution>,
    profile: Option<Profile>,
    assessment: Option<Assessment>,
    /// The request's digest, when the loop detector computed it.
    digest: Option<u64>,
}

/// Oversight steps 1–4 (disabled, autonomy mode, loops, approval). `guard_ask`: a guardrail
/// policy asks for a human.
#[allow(clippy::too_many_arguments)]
fn oversee<'p, S: Stores>(
    rules: &Rules<'p>,
    req: &Request<'_>,
    stores: &mut S,
    decision: &Decision<'p>,
    priced: Priced,
    profile: Option<Profile>,
    guard_ask: Option<(String, String)>,
    now: UnixMillis,
) -> Result<Overseen<'p>, Refusal> {
    let guards = rules.oversight;
    let refuse = |step: Step, denial: Denial| Refusal {
        step,
        denial: Box::new(denial.with_decision(decision.clause, decision.policy_version)),
    };
    let agent = req.agent();
    let action = req.action;

    // 1. A disabled agent stays out until an operator re-enables it.
    let standing = if guards.escalation {
        stores.standing(agent)
    } else {
        Standing::Normal { consecutive_errors: 0 }
    };
    if let (Standing::Disabled { .. }, Some(reason), Some(why)) =
        (standing, standing.reason(), standing.explanation())
    {
        return Err(refuse(Step::Disabled, Denial::new(Class::Policy, reason, why)));
    }

    // 2. Autonomy modes that forbid execution.
    let cost_center = req.facts.cost_center.unwrap_or_default();
    let resolution =
        guards.autonomy.then(|| rules.engine.autonomy().resolve(cost_center, agent, action));
    if let Some(r) = resolution.filter(|r| matches!(r.mode, Mode::Disabled | Mode::ProposeOnly)) {
        let gate = autonomy::gate(r, None);
        let step =
            if r.mode == Mode::ProposeOnly { Step::Proposal } else { Step::AutonomyDisabled };
        return Err(refuse(
            step,
            Denial::new(Class::Policy, gate.reason.code(), gate.explanation()),
        ));
    }

    // 3. The same call again and again. The digest (which may parse the body) is computed only
    // for tool calls under the loop detector and for approvals.
    let mut digest = None;
    if guards.loops && req.is_tool {
        let d = *digest.get_or_insert_with(|| req.digest());
        let repeat = stores.observe_call(d, now);
        if let Repeat::Loop { retry_after_ms, .. } = repeat {
            let why = repeat.explanation(action).unwrap_or_default();
            let mut denial = Denial::new(Class::Policy, Repeat::REASON, why);
            denial.retry_after_secs = Some(retry_after_ms.div_ceil(1000));
            return Err(refuse(Step::Loop, denial));
        }
    }

    // 4. Does a human have to approve?
    let assessment = profile.map(|p| assess(rules, req, stores, priced, p));
    let mut ask: Option<(String, String)> = None;
    if decision.effect == Effect::RequireApproval {
        ask = Some((decision.reason.to_string(), decision.explanation.to_string()));
    }
    if ask.is_none() {
        ask = guard_ask;
    }
    if let (None, Some(a)) = (&ask, &assessment) {
        if a.band != risk::Band::Low {
            ask = Some((a.band.reason().to_string(), "the action's risk needs a human".into()));
        }
    }
    if let (None, Standing::Review { .. }) = (&ask, standing) {
        let reason = standing.reason().unwrap_or("error_escalation");
        ask = Some((reason.to_string(), standing.explanation().unwrap_or_default()));
    }
    let asked = Asked { resolution, profile, assessment, digest };
    Ok(conclude(rules, req, stores, decision, priced, asked, ask, now))
}

/// The rest of oversight step 4: unless something already asked for a human (`ask`),
/// `AUTO_EXECUTE` consumes its autonomy budget; then the request passes, or a human is asked.
#[allow(clippy::too_many_arguments)]
fn conclude<'p, S: Stores>(
    rules: &Rules<'p>,
    req: &Request<'_>,
    stores: &mut S,
    decision: &Decision<'p>,
    priced: Priced,
    asked: Asked,
    mut ask: Option<(String, String)>,
    now: UnixMillis,
) -> Overseen<'p> {
    let (agent, action) = (req.agent(), req.action);
    if let (None, Some(r)) = (&ask, asked.resolution) {
        let gate = match r.mode {
            Mode::AutoExecute => {
                let limits = rules.engine.autonomy().limits(agent, action);
                match stores.consume_autonomy(limits, agent, action, now) {
                    Ok(outcome) => autonomy::gate(r, Some(outcome)),
                    Err(refill) => return Overseen::Short(refill, asked),
                }
            }
            _ => autonomy::gate(r, None),
        };
        if gate.effect != autonomy::Effect::Allow {
            ask = Some((gate.reason.code().to_string(), gate.explanation()));
        }
    }
    let Some((reason, why)) = ask else { return Overseen::Pass(asked.assessment) };
    let assessment = match asked.assessment {
        Some(a) => a,
        None => assess(rules, req, stores, priced, asked.profile.unwrap_or_default()),
    };
    let digest = asked.digest.unwrap_or_else(|| req.digest());
    Overseen::Ask(Box::new(Pending {
        decision: *decision,
        priced,
        reason,
        why,
        assessment,
        digest,
    }))
}

/// The action's risk under `profile`, with the agent's history of it.
fn assess(
    rules: &Rules<'_>,
    req: &Request<'_>,
    stores: &mut impl Stores,
    priced: Priced,
    profile: Profile,
) -> Assessment {
    let history = stores.history(req.agent(), req.action);
    let factors = profile.factors(Some(priced.worst_case()), history);
    risk::assess(&factors, &rules.oversight.thresholds)
}

/// Oversight step 5, the upstream's breaker, and what the adapter reports when it ends.
fn finish_oversight(
    guards: &Guards,
    stores: &mut impl Stores,
    assessment: Option<Assessment>,
    approved: bool,
    now: UnixMillis,
) -> Result<Oversaw, Box<Denial>> {
    let breaker = guards.breakers;
    if breaker {
        if let Err(open) = stores.breaker(now) {
            let secs = open.retry_after_ms.div_ceil(1000);
            let mut denial = Denial::new(
                Class::Unavailable,
                crate::guardrails::breaker::Admission::REASON,
                format!(
                    "the upstream {} keeps failing: its circuit breaker is open; retry in {secs}s",
                    open.upstream
                ),
            );
            denial.retry_after_secs = Some(secs);
            return Err(Box::new(denial));
        }
    }
    let track = guards.escalation || assessment.is_some() || approved;
    Ok(Oversaw { breaker, track, assessment, approved, fast: false })
}

/// Step 8: the worst case reserved against every budget that applies, all or nothing.
fn reserve(
    decision: &Decision<'_>,
    req: &Request<'_>,
    stores: &mut impl Stores,
    worst_case: Money,
    now: UnixMillis,
) -> Result<Reserved, Refusal> {
    if decision.budgets.is_empty() {
        return Ok(Reserved::Done(None));
    }
    let refuse = |denial: Denial| Refusal {
        step: Step::Budget,
        denial: Box::new(denial.with_decision(decision.clause, decision.policy_version)),
    };
    match stores.reserve(&decision.budgets, &req.facts, worst_case, now) {
        Ok(r) => Ok(Reserved::Done(r)),
        Err(BudgetError::Store(StoreError::Short(refill))) => Ok(Reserved::Short(*refill)),
        Err(BudgetError::Exceeded { budget_id, limit, spent_and_reserved, period, .. }) => {
            Err(refuse(Denial::new(
                Class::BudgetExhausted,
                "budget_exceeded",
                format!(
                    "budget `{budget_id}` ({period}) would be exceeded: ${spent_and_reserved} of \
                     ${limit} spent or reserved, this request may cost up to ${worst_case}"
                ),
            )))
        }
        // The proxy refuses these without the decision's clause (a store failure is not the
        // decision's doing).
        Err(_) => Err(Refusal {
            step: Step::Budget,
            denial: Box::new(Denial::new(
                Class::Unavailable,
                "budget_store_unavailable",
                "budgets cannot be checked right now",
            )),
        }),
    }
}

#[cfg(test)]
mod tests;
