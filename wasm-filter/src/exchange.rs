//! One request's life inside the filter, host-agnostic: the same steps, statuses and reasons as
//! the sidecar's pipeline (`proxy/src/pipeline.rs`), in proxy-wasm's hook order.
//!
//! *request headers*: attribution (a bad header is refused before anything is sent upstream) →
//! *request body* (or the headers, for a bodyless request): classify, then the core's admission
//! phase (`tollgate_core::lifecycle::decide`: decide, guardrails, cost cap, rate limits, the
//! oversight guards the configuration turned on, budget reservation, in the sidecar's order), and
//! for an OpenAI stream without `stream_options.include_usage`
//! the body asking for it ([`Exchange::usage_rewrite`]) → *response headers*: decision headers,
//! status → *response body*: every chunk fed to the core's meter as it passes, never held (only
//! the usage chunk the filter asked for is cut out again, which may hold back one incomplete SSE
//! event) → *log*: finish metering, price, settle, usage event and metrics, also when the
//! client went away.
//!
//! The Envoy glue (`envoy.rs`) only moves bytes between the host and this struct, so everything
//! here is tested natively against the fake shared data.

use serde::Serialize;
use tollgate_core::attribution::{Attribution, AttributionError, Identity};
use tollgate_core::autonomy::stats::{self, Verdict};
use tollgate_core::autonomy::{self, BudgetOutcome, DayCounts};
use tollgate_core::budget::{BudgetError, Budgets, Refill, Reservation, StoreError, Warning};
use tollgate_core::endpoints;
use tollgate_core::guardrails::breaker::{self, Admission as BreakerAdmission};
use tollgate_core::guardrails::escalation::{self, Outcome, Standing};
use tollgate_core::guardrails::loops::{Merged, Repeat, Slot};
use tollgate_core::inspect::{self, RequestInfo};
use tollgate_core::lifecycle::{
    self, ActionRate, Admission, BreakerOpen, Call, RateLimited, Stores,
};
use tollgate_core::metering::{
    Api, ContentEncoding, DecodeAbort, Meter, Provider, UsageChunkFilter,
};
use tollgate_core::money::Money;
use tollgate_core::policy::{Effect, Facts, RouteKind};
use tollgate_core::pricing::{Cost, PriceSource};
use tollgate_core::record::{Decision, End, UsageEvent};
use tollgate_core::reservation::{self, Bound, Implausible};
use tollgate_core::risk::history;
use tollgate_core::time::UnixMillis;
use tollgate_core::usage::{Usage, UsageSource};

use crate::lease::LeaseStore;
use crate::reply::{Class, Denial, Shape};
use crate::settings::{FailPolicy, Plugin};
use crate::shared::{SharedData, SharedStore};

/// The filter's live state (per VM): its budget engines, in this Envoy's shared data or (fleet
/// mode, `store: {collector: {}}`) on leases the collector grants from the fleet's store; the
/// agents the collector lists as disabled; and the circuit breakers' gauge moves not yet handed
/// to Envoy.
pub struct Live<D: SharedData> {
    pub shared: Budgets<SharedStore<D>>,
    pub fleet: Budgets<LeaseStore>,
    /// The agents the collector has as disabled, as this VM knows them (with `filter.collector`).
    pub disabled: std::cell::RefCell<DisabledSet>,
    /// Fleet mode: this VM's loop counts, its own calls and the fleet's it read.
    pub loops: std::cell::RefCell<Merged>,
    /// `tollgate_circuit_breaker_state` moves this VM made (upstream, by how much), for the
    /// glue to add to the stats on its next tick (`tollgate_core::guardrails::breaker::Changed`).
    pub breaker_moves: std::cell::RefCell<Vec<(String, i64)>>,
}

impl<D: SharedData> Live<D> {
    pub fn new(shared: SharedStore<D>) -> Live<D> {
        Live {
            shared: Budgets::new(shared),
            fleet: Budgets::new(LeaseStore::default()),
            disabled: Default::default(),
            loops: Default::default(),
            breaker_moves: Default::default(),
        }
    }

    /// The leases (fleet mode).
    pub fn leases(&self) -> &LeaseStore {
        self.fleet.store()
    }

    /// Keeps a gauge move made by a write that succeeded.
    fn moved(&self, upstream: &str, gauge: Option<i64>) {
        if let Some(by) = gauge {
            self.breaker_moves.borrow_mut().push((upstream.to_owned(), by));
        }
    }
}

/// Re-enables `agent` in this Envoy's error escalation (its slot in shared data, for every
/// worker) after it left the collector's disabled set: an operator re-enabled it there. Only a
/// disabling made at or before `seen` (when the latest read that still listed it was sent) is
/// undone: the agent may have been disabled again since, its report not yet at the collector
/// (`tollgate_core::guardrails::escalation::Slot::reenable`). Whether it was re-enabled.
pub fn reenable<D: SharedData>(
    live: &Live<D>,
    agent: &str,
    seen: UnixMillis,
) -> Result<bool, StoreError> {
    let key = format!("{ESCALATION_KEY}{}", escalation::Slot::index(agent));
    let mut done = false;
    let initial = escalation::Slot::default().encode();
    live.shared.store().update_record(&key, &initial, |bytes| {
        done = false;
        let mut slot = escalation::Slot::decode(bytes)?;
        done = slot.reenable(agent, seen);
        done.then(|| slot.encode())
    })?;
    Ok(done)
}

/// The agents the collector has as disabled (`GET /v1/fleet/agents/disabled`), as one VM knows
/// them, with what it takes to re-enable one here safely: an agent leaves the set when an
/// operator re-enables it through the collector, and then this Envoy's escalation must undo
/// the disabling the collector had, not a later one (see [`reenable`]).
#[derive(Debug, Default)]
pub struct DisabledSet {
    agents: std::collections::HashMap<String, Listed>,
}

/// What a VM knows of one agent the collector has as disabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Listed {
    /// A time (unix ms) by which the collector had the agent's current disabling: a read that
    /// listed it was sent then, or the disabling this VM reported (and the collector took)
    /// was made then.
    seen: u64,
    /// Only a read sent after this time can show that it left the set: one sent before the
    /// collector's answer taking this VM's report came may not list it yet.
    from: u64,
}

impl DisabledSet {
    /// Whether the collector has `agent` as disabled.
    pub fn contains(&self, agent: &str) -> bool {
        self.agents.contains_key(agent)
    }

    /// Adds `agent` as a read sent at `seen` lists it.
    pub fn insert(&mut self, agent: &str, seen: u64) {
        self.agents.insert(agent.to_owned(), Listed { seen, from: seen });
    }

    /// A read of the set sent at `sent` answered `listed`. Returns the agents that left it
    /// since (with their `seen`: re-enable them here, [`reenable`]), and whether what this VM
    /// knows changed. An agent this VM's report added stays until a read sent after the
    /// collector took the report.
    pub fn read(&mut self, sent: u64, listed: Vec<String>) -> (Vec<(String, u64)>, bool) {
        let listed: std::collections::HashSet<String> = listed.into_iter().collect();
        let left: Vec<(String, u64)> = self
            .agents
            .iter()
            .filter(|(agent, l)| !listed.contains(*agent) && sent > l.from)
            .map(|(agent, l)| (agent.clone(), l.seen))
            .collect();
        for (agent, _) in &left {
            self.agents.remove(agent);
        }
        let mut changed = !left.is_empty();
        for agent in listed {
            match self.agents.get_mut(&agent) {
                Some(l) => l.seen = l.seen.max(sent),
                None => {
                    changed = true;
                    self.agents.insert(agent, Listed { seen: sent, from: sent });
                }
            }
        }
        (left, changed)
    }

    /// The collector took, answering at `now`, this VM's report that `agent` was disabled at
    /// `at`: from now on a read that does not list it means an operator re-enabled it, even if
    /// no read listed it before.
    pub fn reported(&mut self, agent: &str, at: u64, now: u64) {
        let l = self.agents.entry(agent.to_owned()).or_insert(Listed { seen: at, from: now });
        l.seen = l.seen.max(at);
        l.from = l.from.max(now);
    }

    /// The agents, sorted (for the log).
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.agents.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

/// What the admission phase answered, short of a refusal.
#[derive(Debug)]
pub enum Decided {
    /// Admitted: the request goes on.
    Admitted,
    /// The fleet lease cannot cover the reservation: the request waits for the collector's
    /// grant of [`Parked::refill`], then [`Exchange::resume`]s.
    Short(Box<lifecycle::Parked>),
    /// A human has to approve (fleet mode): the collector raises the approval, or uses the
    /// granted one this retry names, then the request [`Exchange::granted`] or is refused.
    Approval(Box<Ask>),
}

/// A request waiting on the collector's approval service.
#[derive(Debug)]
pub struct Ask {
    pub pending: lifecycle::ParkedPending,
    /// What to send: a new approval, or the granted one this retry carries.
    pub call: AskCall,
    /// The decision's clause and policy version, for the refusal.
    pub clause: String,
    pub policy_version: String,
}

#[derive(Debug)]
pub enum AskCall {
    Raise(tollgate_core::approval::remote::Raise),
    Redeem(tollgate_core::approval::remote::Redeem),
}

impl Ask {
    /// The refusal for the collector's answer to a raise or a failed redeem.
    pub fn refusal(&self, answer: &tollgate_core::approval::remote::RemoteAnswer) -> Denial {
        let d = match (&self.call, answer.ok) {
            (AskCall::Raise(_), true) => {
                let mut d = Denial::new(
                    Class::ApprovalRequired,
                    self.pending.reason.as_str(),
                    answer.message.clone(),
                );
                d.approval_id = answer.id.clone();
                d
            }
            _ => answer.denial(),
        };
        if d.class == Class::Unavailable {
            d
        } else {
            d.with_decision(&self.clause, &self.policy_version)
        }
    }
}

/// Where the admission phase starts.
enum From {
    Decide,
    Resume(lifecycle::Parked),
    Granted(lifecycle::ParkedPending),
}

/// The request line facts the filter reads from pseudo-headers.
#[derive(Clone, Debug, Default)]
pub struct Head {
    pub method: String,
    /// `:path`, query included.
    pub path: String,
    /// `:authority`, port included.
    pub authority: Option<String>,
    pub request_id: Option<String>,
    /// The name of the Envoy route the request matched (`xds.route_name`), if it has one: the
    /// sidecar's route name. It names the action of a request that is neither a model call nor
    /// an MCP tool call (the sidecar names it after its route; `other` without one) and is the
    /// usage event's `route`.
    pub route: Option<String>,
}

/// Who pays, owned (the host hands out owned header values).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Who {
    pub agent: Option<String>,
    pub cost_center: Option<String>,
    pub project: Option<String>,
    pub business_unit: Option<String>,
    pub tier: Option<String>,
}

impl Who {
    fn of(identity: Identity<'_>) -> Who {
        let own = |v: Option<&str>| v.map(str::to_owned);
        Who {
            agent: own(identity.agent),
            cost_center: own(identity.cost_center),
            project: own(identity.project),
            business_unit: own(identity.business_unit),
            tier: own(identity.tier),
        }
    }
}

/// Wall-clock time, read by the glue.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub ms: UnixMillis,
    pub ns: u64,
}

/// What an admitted request carries until it is settled.
#[derive(Debug)]
struct Admitted {
    reason: String,
    clause: String,
    policy_version: String,
    reservation: Option<Reservation>,
    meter: Option<Meter>,
    /// An OpenAI stream whose client did not ask for usage.
    wants_usage: bool,
    /// Set when the filter asked for usage on the client's behalf: removes that chunk again.
    usage_filter: Option<UsageChunkFilter>,
    input_estimate: u64,
    /// The request's upper bound (LLM calls), to judge the reported usage by.
    bound: Option<Bound>,
    /// The worst case reserved: what an implausible report, or a response nothing on the rate
    /// card prices, is charged.
    reserved: Cost,
    model: Option<String>,
    tool: Option<String>,
    tool_cost: Option<Money>,
    /// The reservation is on the fleet's leases.
    fleet: bool,
    /// The action whose outcome counts in the agent's success history (the lifecycle tracks
    /// it: `Oversaw::track`), recorded when the exchange ends.
    track: Option<String>,
    /// The risk score, when one was computed (the `x-tollgate-risk` header, as the sidecar's).
    risk: Option<String>,
    /// Passed through the upstream's circuit breaker: its outcome is reported when the exchange
    /// ends (`Oversaw::breaker`).
    breaker: bool,
}

/// What a filter without the collector's approval service says when a human has to approve.
pub const NO_APPROVALS: &str = "this Envoy filter has no approval service to ask (configure \
    `store: {collector: {}}` so that approvals are raised with the collector)";

/// The shared data key prefix of the autonomy budget's records (one per agent).
pub const AUTONOMY_KEY: &str = "tollgate:autonomy:";

/// The shared data key of the autonomy ratio's counts (`tollgate_core::autonomy::stats::Tally`).
pub const ACTIONS_KEY: &str = "tollgate:actions";

/// The shared data key prefix of the success history's slots
/// (`tollgate_core::risk::history::Slot`).
pub const HISTORY_KEY: &str = "tollgate:history:";

/// The shared data key prefix of the circuit breakers' slots
/// (`tollgate_core::guardrails::breaker::Slot`).
pub const BREAKER_KEY: &str = "tollgate:breaker:";

/// The shared data key prefix of error escalation's slots
/// (`tollgate_core::guardrails::escalation::Slot`).
pub const ESCALATION_KEY: &str = "tollgate:escalation:";

/// The shared data key prefix of the loop detector's slots.
pub const LOOPS_KEY: &str = "tollgate:loops:";

/// The request header that carries a granted approval's id on a retry (as in the sidecar).
pub const APPROVAL_HEADER: &str = "x-tollgate-approval";

/// One request in flight.
#[derive(Debug)]
pub struct Exchange {
    pub request_id: String,
    pub shape: Shape,
    who: Who,
    /// The granted approval this retry names (`x-tollgate-approval`).
    approval: Option<String>,
    /// Refused as a proposal (autonomy `PROPOSE_ONLY`): the action proposed.
    proposed: Option<String>,
    head: Head,
    api: Option<Api>,
    mcp: bool,
    /// A free LLM endpoint (a model listing) and its provider: decided as `llm`, recorded at $0.
    free: Option<Provider>,
    admitted: Option<Admitted>,
    /// Let through without a decision (fail-open).
    bypass: bool,
    status: u32,
    response_done: bool,
    started: UnixMillis,
    /// Response bytes to send on in place of a chunk, when the usage filter is on.
    out: Vec<u8>,
    /// The autonomy metrics' category of the request (`tollgate_core::autonomy::stats`).
    category: usize,
    /// The oversight step's verdict, once the admission phase ended, until the glue counts it.
    verdict: Option<Verdict>,
    /// A retry that used a granted approval.
    granted: bool,
}

/// A finished request: its usage event (the collector's wire format, one JSON object per line:
/// [`tollgate_core::record::UsageEvent`], which the collector reads back) and what to count.
#[derive(Debug)]
pub struct Finished {
    pub event: UsageEvent,
    pub warnings: Vec<Warning>,
    /// Charged above the reservation (`tollgate_budget_overrun_nanousd_total`).
    pub overrun: Money,
    /// Why the reported usage was not believed (`tollgate_usage_implausible_total`).
    pub implausible: Option<Implausible>,
    /// The compressed body could not be decoded for metering (counted by the glue).
    pub decode_aborted: Option<DecodeAbort>,
    /// This outcome opened the upstream's circuit breaker (the upstream, for the log).
    pub breaker_opened: Option<String>,
    /// This outcome disabled the agent (error escalation): its standing and the action whose
    /// error did it, for the log and the collector.
    pub agent_disabled: Option<(Standing, String)>,
}

impl std::ops::Deref for Finished {
    type Target = UsageEvent;
    fn deref(&self) -> &UsageEvent {
        &self.event
    }
}

impl std::ops::DerefMut for Finished {
    fn deref_mut(&mut self) -> &mut UsageEvent {
        &mut self.event
    }
}

impl Exchange {
    /// [`Exchange::start`] over the request's header lines as the host hands them out (every
    /// line, repeats included): an attribution header sent twice is refused naming it, as the
    /// sidecar does, instead of billing whichever value came first. A value that is not UTF-8
    /// reads as absent.
    pub fn start_lines(
        plugin: &Plugin,
        head: Head,
        lines: &[(String, Vec<u8>)],
        now: Now,
    ) -> Result<Exchange, (Denial, Shape, String)> {
        let header = |name: &str| {
            lines
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| String::from_utf8(v.clone()).ok())
        };
        let identify = |attribution: &Attribution| {
            let pairs = lines.iter().map(|(n, v)| (n.as_bytes(), v.as_slice()));
            attribution.check_pairs(pairs).map(Who::of)
        };
        Exchange::begin(plugin, head, header, now, identify)
    }

    /// Checks attribution from the request headers. `header` returns a request header's value
    /// by lower-case name. `Err` is the refusal to send as a local reply.
    pub fn start(
        plugin: &Plugin,
        head: Head,
        header: impl Fn(&str) -> Option<String>,
        now: Now,
    ) -> Result<Exchange, (Denial, Shape, String)> {
        let identify = |attribution: &Attribution| {
            let values: Vec<(String, String)> = attribution
                .header_names()
                .filter_map(|name| header(name).map(|v| (name.to_owned(), v)))
                .collect();
            attribution
                .check(|name| values.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str()))
                .map(Who::of)
        };
        Exchange::begin(plugin, head, &header, now, identify)
    }

    /// The request's start, with attribution checked by `identify`.
    fn begin(
        plugin: &Plugin,
        head: Head,
        header: impl Fn(&str) -> Option<String>,
        now: Now,
        identify: impl FnOnce(&Attribution) -> Result<Who, AttributionError>,
    ) -> Result<Exchange, (Denial, Shape, String)> {
        let api = Api::from_path(&head.path);
        // `GET /v1/models` is the same path on both providers: Anthropic's clients send
        // `anthropic-version`.
        let anthropic = header("anthropic-version").is_some();
        let free = endpoints::free_endpoint(
            anthropic.then_some(Provider::Anthropic),
            &head.method,
            &head.path,
        )
        .map(|name| {
            if anthropic || name.contains("count_tokens") {
                Provider::Anthropic
            } else {
                Provider::OpenAi
            }
        });
        let shape = match (api, free) {
            (Some(Api::Messages), _) | (_, Some(Provider::Anthropic)) => Shape::Anthropic,
            _ => Shape::OpenAi,
        };
        let request_id = head.request_id.clone().unwrap_or_else(|| format!("tg-{}", now.ns));
        let who = match identify(plugin.engine.attribution()) {
            Ok(who) => who,
            Err(e) => {
                let d = Denial::new(Class::Attribution, "attribution_rejected", e.to_string());
                return Err((d, shape, request_id));
            }
        };
        let mcp = api.is_none()
            && free.is_none()
            && path_only(&head.path).starts_with(&plugin.filter.mcp_path_prefix);
        Ok(Exchange {
            request_id,
            shape,
            who,
            head,
            api,
            mcp,
            free,
            admitted: None,
            approval: header(APPROVAL_HEADER).filter(|v| !v.is_empty()),
            proposed: None,
            bypass: false,
            status: 0,
            response_done: false,
            started: now.ms,
            out: Vec::new(),
            category: stats::UNCATEGORIZED,
            verdict: None,
            granted: false,
        })
    }

    /// Whether this request may be an OpenAI stream whose body the filter would rewrite to ask
    /// for usage: decided from the request line alone, because the request headers (and their
    /// `content-length`) go upstream before the body is seen.
    pub fn may_rewrite_body(&self) -> bool {
        self.head.method.eq_ignore_ascii_case("POST")
            && matches!(self.api, Some(Api::ChatCompletions | Api::Completions))
    }

    /// For an admitted OpenAI stream without `stream_options.include_usage`: the request body
    /// asking for it (the rest of the body byte for byte). From then on the response's usage
    /// chunk is removed again, so the client gets exactly the stream it asked for and the
    /// request is metered from the provider's `reported` usage. `None`: send the body as is.
    pub fn usage_rewrite(&mut self, body: &[u8]) -> Option<Vec<u8>> {
        let admitted = self.admitted.as_mut().filter(|a| a.wants_usage)?;
        let rewritten = inspect::with_include_usage(body)?;
        admitted.usage_filter = Some(UsageChunkFilter::new());
        Some(rewritten)
    }

    /// Whether the response body is being rewritten (its `content-length` no longer holds).
    pub fn rewrites_response(&self) -> bool {
        self.admitted.as_ref().is_some_and(|a| a.usage_filter.is_some())
    }

    /// An exchange let through without checks (fail-open on a broken configuration).
    pub fn bypass(head: Head, now: Now) -> Exchange {
        Exchange {
            request_id: head.request_id.clone().unwrap_or_else(|| format!("tg-{}", now.ns)),
            shape: Shape::OpenAi,
            who: Who::default(),
            api: None,
            mcp: false,
            free: None,
            head,
            admitted: None,
            approval: None,
            proposed: None,
            bypass: true,
            status: 0,
            response_done: false,
            started: now.ms,
            out: Vec::new(),
            category: stats::UNCATEGORIZED,
            verdict: None,
            granted: false,
        }
    }

    pub fn is_bypass(&self) -> bool {
        self.bypass
    }

    /// Decides on the whole request body (empty for a bodyless request) and reserves budget,
    /// with the core's lifecycle (`tollgate_core::lifecycle::decide`, the sidecar's order) over
    /// this VM's shared data. `Err` is the refusal. A store failure follows the plugin's fail
    /// policy.
    pub fn decide<D: SharedData>(
        &mut self,
        plugin: &Plugin,
        budgets: &Live<D>,
        body: &[u8],
        now: Now,
    ) -> Result<Decided, Denial> {
        self.admit(plugin, budgets, body, now, From::Decide)
    }

    /// Goes on with a request whose approval the collector let it use ([`Decided::Approval`]):
    /// the breaker and the budgets, with the same body.
    pub fn granted<D: SharedData>(
        &mut self,
        plugin: &Plugin,
        budgets: &Live<D>,
        body: &[u8],
        pending: lifecycle::ParkedPending,
        now: Now,
    ) -> Result<Decided, Denial> {
        self.admit(plugin, budgets, body, now, From::Granted(pending))
    }

    /// Goes on with a request that waited for a fleet lease ([`Decided::Short`]), with the
    /// same body, after the collector answered.
    pub fn resume<D: SharedData>(
        &mut self,
        plugin: &Plugin,
        budgets: &Live<D>,
        body: &[u8],
        parked: Box<lifecycle::Parked>,
        now: Now,
    ) -> Result<Decided, Denial> {
        self.admit(plugin, budgets, body, now, From::Resume(*parked))
    }

    fn admit<D: SharedData>(
        &mut self,
        plugin: &Plugin,
        budgets: &Live<D>,
        body: &[u8],
        now: Now,
        from: From,
    ) -> Result<Decided, Denial> {
        let llm = self.api.is_some() || self.free.is_some();
        let info = if (llm || self.mcp) && !body.is_empty() {
            inspect::inspect(self.api, body)
                .map_err(|e| Denial::new(Class::BadRequest, "malformed_body", e.to_string()))?
        } else {
            RequestInfo::default()
        };
        let tool = if self.mcp { info.tool_calls().next().map(|t| t.name.as_str()) } else { None };
        let kind = RouteKind::of_upstream(llm, self.mcp);
        let declared = if self.mcp { plugin.filter.mcp_category.as_deref() } else { None };
        self.category = stats::category(llm, declared, tool, plugin.engine.guardrails());
        if matches!(from, From::Granted(_)) {
            self.granted = true;
        }
        let provider = self.api.map(Api::provider).or(self.free);
        let who = &self.who;
        let req = lifecycle::Request {
            facts: Facts {
                route: kind,
                agent: who.agent.as_deref(),
                tier: who.tier.as_deref(),
                cost_center: who.cost_center.as_deref(),
                project: who.project.as_deref(),
                business_unit: who.business_unit.as_deref(),
                provider: match (provider, self.mcp) {
                    (Some(p), _) => Some(p.as_str()),
                    (None, true) => Some("mcp"),
                    (None, false) => None,
                },
                model: info.model.as_deref(),
                tool,
                category: if self.mcp { plugin.filter.mcp_category.as_deref() } else { None },
                host: self.head.authority.as_deref().map(strip_port),
                method: Some(self.head.method.as_str()),
                path: Some(path_only(&self.head.path)),
            },
            call: if llm { Call::Llm(provider) } else { Call::Other },
            api: self.api,
            info: &info,
            body,
            query: self.head.path.split_once('?').map(|(_, q)| q.split('#').next().unwrap_or(q)),
            action: match (tool, llm) {
                (Some(tool), _) => tool,
                (None, true) => "llm",
                (None, false) => self.head.route.as_deref().unwrap_or("other"),
            },
            is_tool: tool.is_some(),
            risk: None,
        };
        // The oversight guards the configuration turned on (autonomy modes and budgets, the loop
        // detector, the approval thresholds; see `Plugin::guards`), and in fleet mode the agents
        // the fleet disabled, at the same steps as the sidecar.
        let rules = lifecycle::Rules {
            engine: &plugin.engine,
            policy: &plugin.policy,
            oversight: plugin.guards,
        };
        let mut stores = Shared {
            plugin,
            budgets,
            request_id: &self.request_id,
            now_ns: now.ns,
            upstream: upstream_of(&self.head),
        };
        budgets.leases().set_now(now.ms);
        let decided = match from {
            From::Decide => lifecycle::decide(&rules, &req, &mut stores, now.ms),
            From::Resume(parked) => parked.resume(&rules, &req, &mut stores, now.ms),
            From::Granted(pending) => pending.granted(&rules, &req, &mut stores, now.ms),
        };
        let admitted = match decided {
            Ok(Admission::Admitted(a)) => {
                self.verdict = Some(if self.granted { Verdict::Approved } else { Verdict::Auto });
                a
            }
            // Nothing here records approvals: the policy's own ask names `apr_<request id>`,
            // as before; a risk-based one answers with the reason.
            // Only fleet leases are ever short (Envoy's shared data answers at once).
            Ok(Admission::Short(short)) => return Ok(Decided::Short(Box::new(short.park()))),
            // Fleet mode: approvals are the collector's (and the fleet's).
            Ok(Admission::NeedsApproval(p)) if plugin.fleet.is_some() => {
                let (clause, policy_version) =
                    (p.decision.clause.to_owned(), p.decision.policy_version.to_owned());
                let pending = p.park();
                let digest = tollgate_core::approval::digest_hex(pending.digest);
                let s = |v: &Option<String>| v.clone().unwrap_or_default();
                let call = match &self.approval {
                    Some(id) => AskCall::Redeem(tollgate_core::approval::remote::Redeem {
                        id: id.clone(),
                        agent: s(&self.who.agent),
                        digest,
                        request_id: self.request_id.clone(),
                    }),
                    None => {
                        let a = &pending.assessment;
                        AskCall::Raise(tollgate_core::approval::remote::Raise {
                            request_id: self.request_id.clone(),
                            agent: s(&self.who.agent),
                            cost_center: s(&self.who.cost_center),
                            project: s(&self.who.project),
                            route: self
                                .head
                                .route
                                .clone()
                                .unwrap_or_else(|| kind.as_str().to_owned()),
                            action: req.action.to_owned(),
                            digest,
                            reason: pending.reason.clone(),
                            why: pending.why.clone(),
                            risk: a.explanation(),
                            risk_score: a.score.hundredths(),
                            risk_band: a.band.as_str().to_owned(),
                            on_timeout: a.on_timeout,
                            timeout_ms: a.timeout_ms,
                        })
                    }
                };
                return Ok(Decided::Approval(Box::new(Ask {
                    pending,
                    call,
                    clause,
                    policy_version,
                })));
            }
            // Without the collector there is nowhere to keep an approval: refused as the sidecar
            // would ask, but naming no approval (there is none to wait for or retry with).
            Ok(Admission::NeedsApproval(p)) => {
                let mut d = Denial::for_decision(&p.decision, &self.request_id)
                    .filter(|_| p.decision.effect == Effect::RequireApproval)
                    .unwrap_or_else(|| {
                        Denial::new(Class::ApprovalRequired, p.reason, p.why)
                            .with_decision(p.decision.clause, p.decision.policy_version)
                    });
                d.approval_id = None;
                d.message = format!("{}; {NO_APPROVALS}", d.message);
                self.verdict = Some(Verdict::of_asked(d.class));
                return Err(d);
            }
            Err(refusal) => {
                if refusal.step == lifecycle::Step::Proposal {
                    self.proposed = Some(req.action.to_owned());
                }
                self.verdict = if self.granted {
                    Some(Verdict::of_granted_refusal(refusal.step, refusal.denial.class))
                } else {
                    Verdict::of_refusal(refusal.step)
                };
                return Err(*refusal.denial);
            }
        };
        let decision = admitted.decision;
        let priced = admitted.priced;
        self.admitted = Some(Admitted {
            reason: decision.reason.to_owned(),
            clause: decision.clause.to_owned(),
            policy_version: decision.policy_version.to_owned(),
            reservation: admitted.reservation,
            meter: self.api.map(|api| Meter::new(api, info.stream)),
            wants_usage: info.stream
                && !info.include_usage
                && matches!(self.api, Some(Api::ChatCompletions | Api::Completions)),
            usage_filter: None,
            input_estimate: info.input_estimate_tokens,
            bound: priced.bound,
            reserved: priced.reserved,
            model: info.model.clone(),
            tool: tool.map(str::to_owned),
            tool_cost: (!llm).then_some(priced.worst_case()),
            fleet: plugin.fleet.is_some(),
            track: admitted.oversaw.track.then(|| req.action.to_owned()),
            risk: admitted.oversaw.assessment.map(|a| a.score.to_string()),
            breaker: admitted.oversaw.breaker,
        });
        Ok(Decided::Admitted)
    }
}

/// The lifecycle's live state in the filter: rate limits and budgets in Envoy shared data
/// (shared by every worker); a store failure follows the plugin's fail policy.
struct Shared<'a, D: SharedData> {
    plugin: &'a Plugin,
    budgets: &'a Live<D>,
    request_id: &'a str,
    now_ns: u64,
    /// The upstream whose circuit breaker guards the request ([`upstream_of`]).
    upstream: &'a str,
}

impl<D: SharedData> Shared<'_, D> {
    fn fail_closed(&self) -> bool {
        self.plugin.filter.fail == FailPolicy::Closed
    }
}

impl<D: SharedData> Stores for Shared<'_, D> {
    fn take_rate(
        &mut self,
        clause: &str,
        agent: &str,
        rpm: Option<u64>,
        tpm: Option<u64>,
        tokens: u64,
        now: UnixMillis,
    ) -> Result<(), RateLimited> {
        if self.plugin.fleet.is_some() {
            // The fleet's allowances, leased as the sidecars lease them.
            let store = self.budgets.fleet.store();
            return match lifecycle::leased_rate(store, clause, agent, rpm, tpm, tokens, now) {
                Err(RateLimited::Unavailable) if !self.fail_closed() => Ok(()),
                other => other,
            };
        }
        let store = self.budgets.shared.store();
        for (what, limit, cost) in [("requests", rpm, 1), ("tokens", tpm, tokens)] {
            let Some(limit) = limit else { continue };
            let key = format!("tollgate:rl:{what}:{limit}:{clause}\u{0}{agent}");
            match store.take_rate(&key, limit, cost.max(1), self.now_ns) {
                Ok(Ok(())) => {}
                Ok(Err(retry_ms)) => {
                    let retry_after_secs = retry_ms.div_ceil(1000).max(1);
                    return Err(if what == "requests" {
                        RateLimited::Requests { limit, retry_after_secs }
                    } else {
                        RateLimited::Tokens { limit, retry_after_secs }
                    });
                }
                Err(_) if self.fail_closed() => return Err(RateLimited::Unavailable),
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// One shared counter per agent and action holding the current UTC hour and its count,
    /// taken with a compare-and-swap so every worker counts against the same allowance.
    fn take_action_rate(
        &mut self,
        agent: &str,
        action: &str,
        limit: u32,
        now: UnixMillis,
    ) -> ActionRate {
        if self.plugin.fleet.is_some() {
            // The fleet's hourly counts, leased as the sidecars lease them.
            let store = self.budgets.fleet.store();
            return match lifecycle::leased_action_rate(store, agent, action, limit, now) {
                ActionRate::Unavailable if !self.fail_closed() => ActionRate::Taken(0),
                taken => taken,
            };
        }
        let window = tollgate_core::time::Period::Hourly.window(now);
        let retry_after_ms = window.end.since(now);
        // One key per agent and action, reused hour after hour (shared data cannot delete).
        let key = format!("guardrail:{agent}\u{0}{action}");
        let hour = u32::try_from(now.0 / 3_600_000).unwrap_or(u32::MAX);
        match self.budgets.shared.store().take_in_window(&key, hour, limit) {
            Ok(Ok(used)) => ActionRate::Taken(used),
            Ok(Err(used)) => ActionRate::Full { used, retry_after_ms },
            Err(_) if self.fail_closed() => ActionRate::Unavailable,
            Err(_) => ActionRate::Taken(0),
        }
    }

    /// Usage events are queued in the VM and sent on: nothing to refuse for.
    fn recordable(&mut self) -> bool {
        true
    }

    /// Error escalation (`oversight.escalation`): the agent's standing from its slot in shared
    /// data, which [`Exchange::finish`] updates with every worker's outcomes (per Envoy). Fleet
    /// mode: an agent the fleet disabled (through any proxy) is refused here too. A slot that
    /// cannot be read counts as normal (escalation is a safeguard; budgets and rate limits
    /// still follow the fail policy).
    fn standing(&mut self, agent: &str) -> Standing {
        if self.budgets.disabled.borrow().contains(agent) {
            return Standing::Disabled { consecutive_errors: 0 };
        }
        let normal = Standing::Normal { consecutive_errors: 0 };
        let Some(config) = &self.plugin.escalation else { return normal };
        let key = format!("{ESCALATION_KEY}{}", escalation::Slot::index(agent));
        match self.budgets.shared.store().data().get(&key) {
            Ok(Some((bytes, _))) => {
                escalation::Slot::decode(&bytes).map_or(normal, |s| s.standing(agent, config))
            }
            _ => normal,
        }
    }

    /// The loop detector over shared data: the calls spread over a fixed set of keys by
    /// digest (shared data cannot delete keys), each slot updated with a compare-and-swap so
    /// every worker sees every call (`tollgate_core::guardrails::loops::Slot`). A slot that
    /// cannot be read lets the call through (the detector is a safeguard against runaway
    /// agents; budgets and rate limits still follow the fail policy). In fleet mode the VM
    /// counts as a sidecar does: its own calls and those the fleet's stream says the other
    /// holders made, synced through the collector by the root's timer.
    fn observe_call(&mut self, digest: u64, now: UnixMillis) -> Repeat {
        let Some(config) = self.plugin.loops else { return Repeat::Fresh { count: 1 } };
        if self.plugin.fleet.is_some() {
            // The fleet's calls as this VM knows them (see `Merged`); never waits.
            return self.budgets.loops.borrow_mut().observe(config, digest, now);
        }
        let key = format!("{LOOPS_KEY}{}", Slot::index(digest, &config));
        let mut repeat = Repeat::Fresh { count: 1 };
        let initial = Slot::default().encode();
        let updated = self.budgets.shared.store().update_record(&key, &initial, |bytes| {
            let mut slot = Slot::decode(bytes)?;
            repeat = slot.observe(digest, now, &config);
            Some(slot.encode())
        });
        match updated {
            Ok(()) => repeat,
            Err(_) => Repeat::Fresh { count: 1 },
        }
    }

    /// The autonomy budget over shared data: one key per agent holding the UTC day, the total
    /// and the count per action (`tollgate_core::autonomy::DayCounts`), reused day after day and
    /// updated with a compare-and-swap, so both limits are checked and both counts taken at once
    /// for every worker. A record that cannot be read follows the fail policy: closed counts as
    /// used up (a human approves), open as consumed.
    fn consume_autonomy(
        &mut self,
        limits: autonomy::Limits,
        agent: &str,
        action: &str,
        now: UnixMillis,
    ) -> Result<BudgetOutcome, Box<Refill>> {
        let unread =
            BudgetOutcome::Exhausted { limit: autonomy::BudgetLimit::Capacity, used: 0, max: 0 };
        let open =
            BudgetOutcome::Consumed { used: 0, limit: None, action_used: 0, action_limit: None };
        let limited = limits.per_day.is_some() || limits.per_action.is_some();
        if self.plugin.fleet.is_some() && limited {
            // The fleet's autonomy budgets, leased as the sidecars lease them.
            let store = self.budgets.fleet.store();
            return match lifecycle::leased_autonomy(store, limits, agent, action, now)? {
                Some(outcome) => Ok(outcome),
                None if self.fail_closed() => Ok(unread),
                None => Ok(open),
            };
        }
        let key = format!("{AUTONOMY_KEY}{agent}");
        let mut outcome = unread;
        let initial = DayCounts::default().encode();
        let updated = self.budgets.shared.store().update_record(&key, &initial, |bytes| {
            let mut day = DayCounts::decode(bytes)?;
            outcome = day.consume(limits, action, now);
            matches!(outcome, BudgetOutcome::Consumed { .. }).then(|| day.encode())
        });
        match updated {
            Ok(()) => Ok(outcome),
            Err(_) if self.fail_closed() => Ok(unread),
            Err(_) => Ok(open),
        }
    }

    /// The agent's success history for the action from shared data (every worker's outcomes,
    /// [`Exchange::finish`] records them); none when its slot cannot be read.
    fn history(&mut self, agent: &str, action: &str) -> Option<(u64, u64)> {
        let key = history::key(agent, action);
        let slot = format!("{HISTORY_KEY}{}", history::Slot::index(&key));
        let (bytes, _) = self.budgets.shared.store().data().get(&slot).ok()??;
        history::Slot::decode(&bytes)?.get(&key)
    }

    /// The upstream's circuit breaker over shared data (`oversight.breaker`): the upstreams
    /// spread over a fixed set of keys by name (shared data cannot delete keys), each slot
    /// updated with a compare-and-swap so that every worker of this Envoy sees every outcome
    /// and exactly one half-open probe goes through
    /// (`tollgate_core::guardrails::breaker::Slot`). A slot that cannot be updated lets the call
    /// through (the breaker is a safeguard; budgets and rate limits follow the fail policy).
    fn breaker(&mut self, now: UnixMillis) -> Result<(), BreakerOpen> {
        let Some(config) = self.plugin.breaker else { return Ok(()) };
        let key = format!("{BREAKER_KEY}{}", breaker::Slot::index(self.upstream));
        let mut admission = BreakerAdmission::Permit;
        let initial = breaker::Slot::default().encode();
        let mut changed = breaker::Changed::default();
        let updated = self.budgets.shared.store().update_record(&key, &initial, |bytes| {
            changed = breaker::Changed::default();
            let mut slot = breaker::Slot::decode(bytes)?;
            (admission, changed) = slot.allow(self.upstream, config, now);
            changed.write.then(|| slot.encode())
        });
        if updated.is_ok() {
            self.budgets.moved(self.upstream, changed.gauge);
        }
        match (updated, admission) {
            (Ok(()), BreakerAdmission::Rejected { retry_after_ms }) => {
                Err(BreakerOpen { upstream: self.upstream.to_owned(), retry_after_ms })
            }
            _ => Ok(()),
        }
    }

    fn reserve(
        &mut self,
        budgets: &tollgate_core::policy::Budgets<'_>,
        facts: &Facts<'_>,
        amount: Money,
        now: UnixMillis,
    ) -> Result<Option<Reservation>, BudgetError> {
        let ttl = self.plugin.filter.reservation_ttl_ms;
        let id = self.budgets.shared.store().reservation_id(self.request_id);
        let values = |scope| lifecycle::scope_value(facts, scope);
        let reserved = if self.plugin.fleet.is_some() {
            self.budgets.fleet.reserve(budgets.iter(), values, amount, &id, now, ttl)
        } else {
            self.budgets.shared.reserve(budgets.iter(), values, amount, &id, now, ttl)
        };
        match reserved {
            Ok(r) => Ok(Some(r)),
            Err(e @ BudgetError::Exceeded { .. }) => Err(e),
            // The lease must be refilled first: the request waits for the collector.
            Err(e @ BudgetError::Store(StoreError::Short(_))) => Err(e),
            Err(e) if self.fail_closed() => Err(e),
            Err(_) => Ok(None),
        }
    }
}

impl Exchange {
    /// Headers to add to the upstream's response (the decision), and records its status.
    /// Borrowed: the glue copies them into the host's map without allocating here.
    pub fn response_headers(&mut self, status: u32) -> Vec<(&'static str, &str)> {
        self.status = status;
        let mut headers = Vec::with_capacity(6);
        headers.push(("x-request-id", self.request_id.as_str()));
        match &self.admitted {
            Some(a) => {
                headers.push(("x-tollgate-decision", "allow"));
                headers.push(("x-tollgate-reason", a.reason.as_str()));
                headers.push(("x-tollgate-clause", a.clause.as_str()));
                headers.push(("x-tollgate-policy-version", a.policy_version.as_str()));
                if let Some(risk) = &a.risk {
                    headers.push(("x-tollgate-risk", risk.as_str()));
                }
            }
            None => {
                headers.push(("x-tollgate-decision", "bypass"));
                headers.push(("x-tollgate-reason", "fail_open"));
            }
        }
        headers
    }

    /// Observes one response body chunk. `None`: the chunk flows on untouched (the common
    /// case); `Some(bytes)`: send `bytes` in its place (the usage filter is on, see
    /// [`Exchange::usage_rewrite`]; at the end of the stream they include what was held back).
    pub fn response_chunk(&mut self, chunk: &[u8], end_of_stream: bool) -> Option<&[u8]> {
        if end_of_stream {
            self.response_done = true;
        }
        let admitted = self.admitted.as_mut()?;
        if let Some(meter) = admitted.meter.as_mut() {
            // The meter sees the provider's bytes, usage chunk included.
            meter.feed(chunk);
        }
        let filter = admitted.usage_filter.as_mut()?;
        self.out.clear();
        filter.filter(chunk, &mut self.out);
        if end_of_stream {
            filter.finish(&mut self.out);
        }
        Some(&self.out)
    }

    /// The response's `Content-Encoding` (its value, the lines joined with `,`), before its
    /// body: the meter decodes a copy of what it is shown. A compressed body cannot have the
    /// usage chunk removed (that would mean re-compressing it), so it then goes on as the
    /// upstream sent it, usage chunk included.
    pub fn response_encoding(&mut self, value: &str) {
        if ContentEncoding::parse(value) == ContentEncoding::Identity {
            return;
        }
        let Some(admitted) = self.admitted.as_mut() else { return };
        if let Some(meter) = admitted.meter.as_mut() {
            meter.set_encoding(value);
        }
        admitted.usage_filter = None;
    }

    /// Marks the response complete when it had no body.
    pub fn response_ended(&mut self) {
        self.response_done = true;
    }

    /// Finishes metering, prices the request and settles its reservation. `broken` is how the
    /// response ended if it did not complete (the glue reads it from Envoy's response flags,
    /// [`end_of`]). `None` for a request that was never admitted (refused, or bypassed).
    pub fn finish<D: SharedData>(
        &mut self,
        plugin: &Plugin,
        budgets: &Live<D>,
        now: Now,
        broken: End,
    ) -> Option<Finished> {
        let a = self.admitted.take()?;
        let end = if self.response_done { End::Complete } else { broken };
        let ok = (200..300).contains(&self.status);
        if let Some(action) = &a.track {
            self.record_outcome(budgets, action);
        }
        let outcome = Outcome::of_status(u16::try_from(self.status).unwrap_or(0));
        let breaker_opened = match plugin.breaker.filter(|_| a.breaker) {
            Some(config) => self.report_to_breaker(budgets, config, outcome, now.ms),
            None => None,
        };
        let agent_disabled = match (&plugin.escalation, &a.track) {
            (Some(config), Some(action)) => self
                .report_to_escalation(budgets, config, outcome, now.ms)
                .map(|standing| (standing, action.clone())),
            _ => None,
        };
        let mut decode_aborted = None;
        let (usage, source, reported_model) = match a.meter {
            Some(meter) if ok || end != End::Complete => {
                let m = meter.finish(a.input_estimate);
                decode_aborted = m.decode_aborted;
                (m.usage, m.source, m.model)
            }
            _ => (Usage::default(), UsageSource::None, None),
        };
        let mut price_source = self.free.map(|_| PriceSource::Free);
        let free = self.free.is_some();
        let requested = a.model.as_deref();
        let price = |usage: Usage| {
            if free || usage.is_empty() {
                return Cost::ZERO;
            }
            let priced = plugin.engine.rates().price_response(
                reported_model.as_deref(),
                requested,
                usage,
                a.reserved,
            );
            price_source = Some(priced.source);
            priced.cost
        };
        let (usage, source, cost, implausible) = match &a.bound {
            Some(bound) => {
                let billed = reservation::bill(usage, source, bound, a.reserved, price);
                if billed.implausible.is_some() {
                    price_source = Some(PriceSource::Reservation);
                }
                (billed.usage, billed.source, billed.cost, billed.implausible)
            }
            None => {
                let total = if ok { a.tool_cost.unwrap_or(Money::ZERO) } else { Money::ZERO };
                (usage, source, Cost { per_call: total, total, ..Cost::ZERO }, None)
            }
        };
        let model = reported_model.or(a.model);
        let (warnings, overrun) = match a.reservation {
            Some(r) => {
                let overrun = reservation::overrun(r.amount(), cost.total);
                let settled = if a.fleet {
                    budgets.fleet.settle(r, cost.total)
                } else {
                    budgets.shared.settle(r, cost.total)
                };
                let warnings = settled.map(|s| s.warnings).unwrap_or_default();
                (warnings, overrun)
            }
            None => (Vec::new(), Money::ZERO),
        };
        let who = &self.who;
        let s = |v: &Option<String>| v.clone().unwrap_or_default();
        let event = UsageEvent {
            event_id: String::new(),
            ts: Some(now.ms.to_string()),
            ts_ms: now.ms.0,
            request_id: self.request_id.clone(),
            agent: s(&who.agent),
            cost_center: s(&who.cost_center),
            project: s(&who.project),
            business_unit: who.business_unit.clone(),
            route: self.head.route.clone(),
            provider: match (self.api.map(Api::provider).or(self.free), self.mcp) {
                (Some(p), _) => p.as_str(),
                (None, true) => "mcp",
                (None, false) => "other",
            }
            .to_owned(),
            model,
            tool: a.tool,
            tokens: usage,
            cost_usd: Some(cost.total),
            cost_nano_usd: Some(cost.total.nanos()),
            cost,
            decision: Decision::Allow,
            reason: a.reason,
            clause: a.clause,
            policy_version: a.policy_version,
            status: self.status,
            latency_ms: now.ms.since(self.started),
            usage_source: source,
            price_source,
            end,
            source: Some("envoy".to_owned()),
        };
        Some(Finished {
            event,
            warnings,
            overrun,
            implausible,
            decode_aborted,
            breaker_opened,
            agent_disabled,
        })
    }

    /// The oversight step's verdict and the request's category for the autonomy metrics
    /// (`tollgate_actions_total`, `tollgate_autonomy_basis_points`), once: `None` before the
    /// admission phase ended, after it was taken, and for a request refused before the oversight
    /// step had a say (the sidecar's rule, `tollgate_core::autonomy::stats::Verdict`).
    pub fn take_verdict(&mut self) -> Option<(usize, Verdict)> {
        self.verdict.take().map(|v| (self.category, v))
    }

    /// The collector answered a request a human has to approve with the refusal of `class` (an
    /// approval is pending, or the one this retry names cannot be used).
    pub fn asked(&mut self, class: Class) {
        self.verdict = Some(Verdict::of_asked(class));
    }

    /// A request that waited for a fleet lease was refused for it (as after the oversight step,
    /// the sidecar's budget step).
    pub fn gave_up_waiting(&mut self) {
        self.verdict = Some(if self.granted { Verdict::Approved } else { Verdict::Auto });
    }

    /// Counts how the exchange ended in the agent's success history for `action`, as the
    /// sidecar does when its response ends (`tollgate_core::risk::history`: a 2xx from the
    /// upstream is a success), in the pair's shared-data slot with a compare-and-swap. A slot
    /// that cannot be updated loses the outcome (the history only grades a risk dimension).
    fn record_outcome<D: SharedData>(&self, budgets: &Live<D>, action: &str) {
        let key = history::key(self.who.agent.as_deref().unwrap_or_default(), action);
        let slot = format!("{HISTORY_KEY}{}", history::Slot::index(&key));
        let success = history::succeeded(u16::try_from(self.status).unwrap_or(0));
        let initial = history::Slot::default().encode();
        let _ = budgets.shared.store().update_record(&slot, &initial, |bytes| {
            let mut s = history::Slot::decode(bytes)?;
            s.record(&key, success).then(|| s.encode())
        });
    }

    /// Reports an admitted call's outcome to its upstream's breaker in shared data, as the
    /// sidecar does when its response ends (`Breaker::on_outcome`: a provider error, 5xx, 429,
    /// 408 or no answer, is a failure). Returns the upstream when this outcome opened it. A slot
    /// that cannot be updated loses the outcome. A change of the breaker's state moves its gauge
    /// ([`Live::breaker_moves`]).
    fn report_to_breaker<D: SharedData>(
        &self,
        budgets: &Live<D>,
        config: tollgate_core::guardrails::breaker::BreakerConfig,
        outcome: Outcome,
        now: UnixMillis,
    ) -> Option<String> {
        let upstream = upstream_of(&self.head);
        let key = format!("{BREAKER_KEY}{}", breaker::Slot::index(upstream));
        let (mut opened, mut changed) = (false, breaker::Changed::default());
        let initial = breaker::Slot::default().encode();
        let updated = budgets.shared.store().update_record(&key, &initial, |bytes| {
            (opened, changed) = (false, breaker::Changed::default());
            let mut slot = breaker::Slot::decode(bytes)?;
            (opened, changed) = slot.on_outcome(upstream, config, outcome, now);
            changed.write.then(|| slot.encode())
        });
        if updated.is_ok() {
            budgets.moved(upstream, changed.gauge);
        }
        (updated.is_ok() && opened).then(|| upstream.to_owned())
    }

    /// Reports a tracked call's outcome to error escalation in shared data, as the sidecar
    /// does (`Escalation::on_outcome`: the agent's own errors, a 4xx other than 408 and 429,
    /// count; a success resets the count; a provider error changes nothing). Returns the new
    /// standing when this outcome disabled the agent. A slot that cannot be updated loses the
    /// outcome.
    fn report_to_escalation<D: SharedData>(
        &self,
        budgets: &Live<D>,
        config: &tollgate_core::guardrails::escalation::EscalationConfig,
        outcome: Outcome,
        now: UnixMillis,
    ) -> Option<Standing> {
        if outcome == Outcome::ProviderError {
            return None;
        }
        let agent = self.who.agent.as_deref().unwrap_or_default();
        let key = format!("{ESCALATION_KEY}{}", escalation::Slot::index(agent));
        let (mut before, mut after) = (None, None);
        let initial = escalation::Slot::default().encode();
        let updated = budgets.shared.store().update_record(&key, &initial, |bytes| {
            let mut slot = escalation::Slot::decode(bytes)?;
            before = Some(slot.standing(agent, config));
            let (standing, changed) = slot.on_outcome(agent, config, outcome, now);
            after = Some(standing);
            changed.then(|| slot.encode())
        });
        let disabled = |s: &Option<Standing>| matches!(s, Some(Standing::Disabled { .. }));
        (updated.is_ok() && disabled(&after) && !disabled(&before)).then_some(after).flatten()
    }

    /// The requested model, once decided (for the decision metric).
    pub fn model(&self) -> Option<&str> {
        self.admitted.as_ref().and_then(|a| a.model.as_deref())
    }

    /// The upstream's status, once its response head arrived.
    pub fn upstream_status(&self) -> Option<u16> {
        u16::try_from(self.status).ok().filter(|s| *s != 0)
    }

    /// The reason of the allow decision, once decided.
    pub fn reason(&self) -> Option<&str> {
        self.admitted.as_ref().map(|a| a.reason.as_str())
    }

    /// A request refused as a proposal (autonomy `PROPOSE_ONLY`), as the record the filter
    /// writes to Envoy's log in place of the sidecar's audit record: request, attribution and
    /// the action proposed (the arguments stay out of the log).
    pub fn proposal(&self, reason: &str) -> Option<serde_json::Value> {
        let action = self.proposed.as_deref()?;
        Some(serde_json::json!({
            "kind": "proposal",
            "request_id": self.request_id,
            "agent": self.who.agent,
            "cost_center": self.who.cost_center,
            "project": self.who.project,
            "tool": action,
            "reason": reason,
        }))
    }
}

/// How a response that did not complete ended, from Envoy's response flags (the
/// `response.flags` property, a bit set): `idle_timeout` for the stream idle timeout (`SI`),
/// `client_gone` for the downstream going away (`DC`), `upstream_error` for an upstream reset,
/// failure, timeout or protocol error (`UR`, `UF`, `UC`, `UT`, `UMSDR`, `UPE`, `LR`), as the
/// sidecar records them. A stream that ended early with no flag set is the client's doing (the
/// upstream's failures are flagged).
pub fn end_of(flags: u64) -> End {
    const UPSTREAM_REQUEST_TIMEOUT: u64 = 0x4;
    const LOCAL_RESET: u64 = 0x8;
    const UPSTREAM_REMOTE_RESET: u64 = 0x10;
    const UPSTREAM_CONNECTION_FAILURE: u64 = 0x20;
    const UPSTREAM_CONNECTION_TERMINATION: u64 = 0x40;
    const DOWNSTREAM_CONNECTION_TERMINATION: u64 = 0x4000;
    const STREAM_IDLE_TIMEOUT: u64 = 0x10000;
    const UPSTREAM_MAX_STREAM_DURATION: u64 = 0x80000;
    const UPSTREAM_PROTOCOL_ERROR: u64 = 0x80_0000;
    const UPSTREAM: u64 = UPSTREAM_REQUEST_TIMEOUT
        | LOCAL_RESET
        | UPSTREAM_REMOTE_RESET
        | UPSTREAM_CONNECTION_FAILURE
        | UPSTREAM_CONNECTION_TERMINATION
        | UPSTREAM_MAX_STREAM_DURATION
        | UPSTREAM_PROTOCOL_ERROR;
    if flags & STREAM_IDLE_TIMEOUT != 0 {
        End::IdleTimeout
    } else if flags & DOWNSTREAM_CONNECTION_TERMINATION != 0 {
        End::ClientGone
    } else if flags & UPSTREAM != 0 {
        End::UpstreamError
    } else {
        End::ClientGone
    }
}

/// The sidecar's `413 body_too_large`.
pub fn too_large(max: u64) -> Denial {
    Denial::new(
        Class::TooLarge,
        "body_too_large",
        format!("the request body is larger than {max} bytes"),
    )
}

/// The sidecar's `408 body_timeout`: the request body was silent for longer than `idle_ms`.
pub fn body_stalled(idle_ms: u64) -> Denial {
    Denial::new(
        Class::RequestTimeout,
        "body_timeout",
        format!("the request body stalled: nothing for {idle_ms} ms (filter.body_idle_timeout)"),
    )
}

/// The sidecar's answer to a `CONNECT` when it is not a forward proxy (neither is the filter):
/// no route serves it (`404 no_route`); the connection is closed after it.
pub fn connect_refused(authority: Option<&str>) -> Denial {
    Denial::new(
        Class::NoRoute,
        "no_route",
        format!("no route for {} ", authority.map_or("-", strip_port)),
    )
}

/// The upstream a request's circuit breaker is kept for: the Envoy route it matched
/// (`xds.route_name`, when the route has a name), else the `:authority` it was sent to (port
/// included), else `-`. The filter runs before Envoy's router picks a cluster, so the route is
/// what names the upstream (a route sends to one cluster); the sidecar keys its breakers by the
/// upstream's authority, shared by the routes to it, which the filter cannot see.
pub fn upstream_of(head: &Head) -> &str {
    match (head.route.as_deref(), head.authority.as_deref()) {
        (Some(route), _) if !route.is_empty() => route,
        (_, Some(authority)) if !authority.is_empty() => authority,
        _ => "-",
    }
}

fn path_only(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or(path)
}

/// `host:port` → `host` (the sidecar matches policy `host` without the port).
fn strip_port(host: &str) -> &str {
    host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    })
}

#[cfg(test)]
mod tests;
