//! The request path, in the order a request lives it:
//!
//! request id → framing checks → route → attribution → body (bounded) → classify → the core's
//! admission phase (`tollgate_core::lifecycle::decide`: decision → worst-case cost → cost cap →
//! rate limits → ledger writable → oversight (approvals, risk, autonomy, runaway guards) →
//! budget reservation) → forward → meter the response → settle → ledger, metrics.
//!
//! Each step either passes the request on or answers with a [`Denial`] in the provider's error
//! shape. Everything after "forward" happens in [`Settler`], the observer of the response body,
//! so that a stream is metered as it passes and settled however it ends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use tollgate_core::attribution::Attribute;
use tollgate_core::budget::Reservation;
use tollgate_core::inspect::{self, RequestInfo};
use tollgate_core::lifecycle;
use tollgate_core::metering::{Api, ContentEncoding, Meter, Provider, UsageChunkFilter};
use tollgate_core::money::Money;
use tollgate_core::policy::{Effect, Facts};
use tollgate_core::pricing::{Cost, PriceSource};
use tollgate_core::record::AuditKind;
use tollgate_core::reservation::{self, Bound};
use tollgate_core::usage::{Usage, UsageSource};

use crate::audit;
use crate::body::{MeteredBody, Observer, StreamEnd};
use crate::clock::now;
use crate::config::{Route, UpstreamKind};
use crate::deny::{self, Class, Denial, Shape};
use crate::ledger::{Entry, ReserveRecord, UsageRecord};
use crate::oversight::{self, Admitted, Oversight};
use crate::state::{Current, Shared};
use crate::traces::CallSpan;
use crate::upstream::{Body, BoxError};

/// How long a reservation is held before the budget gets it back by itself.
const RESERVATION_TTL_MS: u64 = 15 * 60 * 1000;

/// The proxy's request handler.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

impl Proxy {
    pub fn new(shared: Arc<Shared>) -> Self {
        Proxy { shared }
    }
}

impl Proxy {
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves one request. `target` is set for requests that came through the forward proxy
    /// (the `CONNECT`'s host, or the absolute URI's): the route is then the one whose upstream
    /// is that host, and the connection's proxy credentials fill in attribution.
    pub async fn serve(
        &self,
        mut req: Request<Incoming>,
        target: Option<&crate::forward::target::Target>,
    ) -> Response<Body> {
        let shared = &self.shared;
        // The config and policy this request lives under, from its head to its settlement.
        let current = shared.current();
        let config = &current.config;
        // Checked before counting this request: a few requests over the limit can pass when
        // they arrive on several threads at once, never an unbounded number.
        let limit = config.limits.max_requests_in_flight;
        let overloaded = shared.metrics.in_flight.get() >= limit as i64;
        shared.metrics.in_flight.inc();
        let request_id = request_id(req.headers());
        let started = Instant::now();
        let route = match target {
            Some(t) => config.forward_route(&t.host, t.port, req.uri().path()).cloned(),
            None => config.route(host_of(&req), req.uri().path()).cloned(),
        };
        let shape = match route.as_ref().map(|r| r.kind) {
            Some(UpstreamKind::Anthropic) => Shape::Anthropic,
            _ => Shape::OpenAi,
        };
        if overloaded {
            // Shed at once: counted, not audited (an overload must stay cheap to refuse).
            shared.metrics.in_flight.dec();
            shared.metrics.shed.with_label_values(&["requests_in_flight"]).inc();
            shared.metrics.request("deny", "overloaded", None, "none");
            let denial = Denial {
                retry_after_secs: Some(1),
                ..Denial::new(
                    Class::Unavailable,
                    "overloaded",
                    format!("too many requests in flight (limits.max_requests_in_flight: {limit})"),
                )
            };
            return deny::response(&denial, shape, &request_id);
        }
        // `None` unless traces are on (then the span starts here, under the caller's trace).
        let mut span = shared.traces.begin(req.headers());
        let credited = match target {
            Some(t) => t.credentials.apply(req.headers_mut()).map_err(|(name, given, pinned)| {
                crate::forward::target::contradiction(&name, &given, &pinned)
            }),
            None => Ok(()),
        };
        let credited = credited.and_then(|()| strict_head(&req, target.is_some(), &current));
        // Kept for the audit record of a refusal (cloning a header value does not copy it).
        let names = current.engine().attribution();
        let who = [
            names.header_name(Attribute::Agent),
            names.header_name(Attribute::CostCenter),
            names.header_name(Attribute::Project),
        ]
        .map(|name| req.headers().get(name).cloned());
        let route_name = route.as_ref().map(|r| r.name.clone()).unwrap_or_default();
        let mut deciding = Deciding::AtHead;
        let mut model = None;
        let result = match credited {
            Ok(()) => {
                let handled = handle(
                    shared,
                    &current,
                    req,
                    route,
                    &request_id,
                    started,
                    &mut deciding,
                    &mut model,
                    &mut span,
                );
                // Boxed: the request's state (a few KiB) is freed as soon as the response head
                // is returned, instead of staying in hyper's per-connection slot for the whole
                // stream.
                Box::pin(handled).await
            }
            Err(denial) => Err(denial),
        };
        let response = match result {
            Ok(response) => response,
            Err(denial) => {
                // Refused before an upstream was asked (an upstream failure ended the span in
                // the settler already).
                if let Some(span) = span.take() {
                    span.refused(&denial, who.each_ref().map(claimed), &route_name, &request_id);
                }
                // An upstream that could not be reached or timed out: the request was admitted,
                // and the settler counted it already (status `none`).
                if !matches!(denial.class, Class::UpstreamUnavailable | Class::UpstreamTimeout) {
                    let m = &shared.metrics;
                    m.request(denial.class.decision(), &denial.code, model.as_deref(), "none");
                    if let Some(g) = &denial.guardrail {
                        m.guardrail_violations.with_label_values(&[g.reason]).inc();
                    }
                    let since = match deciding {
                        Deciding::AtHead => Some(started),
                        Deciding::Since(t) => Some(t),
                        Deciding::Observed => None,
                    };
                    if let Some(since) = since {
                        let effect = [denial.class.decision()];
                        let seconds = since.elapsed().as_secs_f64();
                        m.decision_seconds.with_label_values(&effect).observe(seconds);
                    }
                    audit_refusal(shared, &request_id, &who, route_name, &denial);
                }
                tracing::info!(
                    request_id = %request_id,
                    status = denial.class.status(),
                    reason = %denial.code,
                    "refused"
                );
                let mut response = deny::response(&denial, shape, &request_id);
                let stalled = denial.class == Class::RequestTimeout;
                if stalled || tollgate_core::head::CODES.contains(&denial.code.as_str()) {
                    let close = HeaderValue::from_static("close");
                    response.headers_mut().insert(header::CONNECTION, close);
                }
                response
            }
        };
        shared.metrics.in_flight.dec();
        response
    }
}

/// Records a refusal in the audit chain, with the attribution the request claimed (sanitised:
/// printable ASCII, at most 64 characters).
pub(crate) fn audit_refusal(
    shared: &Shared,
    request_id: &str,
    who: &[Option<HeaderValue>; 3],
    route: String,
    denial: &Denial,
) {
    let guardrail = denial.guardrail.as_deref();
    shared.ledger.audit(audit::Event {
        ts: now().to_string(),
        kind: AuditKind::Decision,
        request_id: request_id.to_string(),
        agent: claimed(&who[0]),
        cost_center: claimed(&who[1]),
        project: claimed(&who[2]),
        route,
        effect: denial.class.effect(),
        reason: denial.code.clone(),
        clause: denial.clause.clone(),
        policy_version: denial.policy_version.clone(),
        model: None,
        tool: guardrail.map(|g| g.action.clone()),
        approval_id: denial.approval_id.clone(),
        risk: None,
        actor: None,
        argument: guardrail.and_then(|g| g.argument.clone()),
        pattern: guardrail.and_then(|g| g.pattern.clone()),
        excerpt: guardrail.and_then(|g| g.excerpt.clone()),
        note: None,
    });
}

/// An attribution header's value as the request claimed it, sanitised for a refusal's audit
/// record and span: printable ASCII, at most 64 characters.
fn claimed(v: &Option<HeaderValue>) -> String {
    v.as_ref()
        .map(|v| {
            v.as_bytes()
                .iter()
                .take(64)
                .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
                .collect()
        })
        .unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    shared: &Arc<Shared>,
    current: &Arc<Current>,
    req: Request<Incoming>,
    route: Option<Route>,
    request_id: &str,
    started: Instant,
    deciding: &mut Deciding,
    // The requested model, once the body is read: the refusal's `model` label.
    requested_model: &mut Option<String>,
    // The call's span (traces on): named here, handed to the settler once forwarded.
    span: &mut Option<CallSpan>,
) -> Result<Response<Body>, Denial> {
    check_framing(req.headers())?;
    let Some(route) = route else {
        return Err(Denial::new(
            Class::NoRoute,
            "no_route",
            format!("no route for {} {}", host_of(&req).unwrap_or("-"), req.uri().path()),
        ));
    };
    let (parts, body) = req.into_parts();

    // Attribution: every bad header is named at once. Checked over every header line, not
    // `get` (the first value only), so that a header sent twice is refused instead of billing
    // whichever value came first.
    let engine = current.engine();
    let config = &current.config;
    let identity = engine
        .attribution()
        .check_pairs(parts.headers.iter())
        .map_err(|e| Denial::new(Class::Attribution, "attribution_rejected", e.to_string()))?;

    // The body, bounded: answers 413 beyond the limit without reading further.
    let max_body = config.limits.max_body_bytes;
    if content_length(&parts.headers).is_some_and(|n| n > max_body as u64) {
        return Err(too_large(max_body));
    }
    // The phases (reading the body, admission, sending) are boxed: each one's state is
    // allocated while it runs instead of inline in this future, which lives as long as the
    // request waits for its response head and was 8.7 KiB (3.8 KiB now; a thousand streams
    // starting together hold a thousand of them).
    let body = Box::pin(read_body(body, max_body, config.limits.body_idle_timeout)).await?;

    // Classify.
    let api = route.kind.is_llm().then(|| Api::from_path(parts.uri.path())).flatten();
    let json = is_json(&parts.headers) || api.is_some() || route.kind == UpstreamKind::Mcp;
    let info = if json && !body.is_empty() {
        inspect::inspect(api, &body)
            .map_err(|e| Denial::new(Class::BadRequest, "malformed_body", e.to_string()))?
    } else {
        RequestInfo::default()
    };
    requested_model.clone_from(&info.model);
    let (tool, kind) = route.classify(&info);
    if let Some(span) = span.as_mut() {
        span.request(&route, api, &info, tool, request_id);
    }

    // Decide, under the policy loaded once for this request: the core's lifecycle (policy →
    // worst-case cost → cost cap → rate limits → ledger writable → oversight → budgets) over
    // this proxy's live state.
    let decision_started = Instant::now();
    *deciding = Deciding::Since(decision_started);
    let policy = &current.policy;
    let host = host_of_parts(&parts);
    let llm = route.kind.is_llm();
    let call = if llm {
        lifecycle::Call::Llm(Some(if route.kind == UpstreamKind::Anthropic {
            Provider::Anthropic
        } else {
            Provider::OpenAi
        }))
    } else {
        lifecycle::Call::Other
    };
    let action_name = tool.unwrap_or(if llm { "llm" } else { route.name.as_str() });
    let req = lifecycle::Request {
        facts: Facts {
            provider: Some(route.kind.provider()),
            model: info.model.as_deref(),
            tool,
            category: route.category.as_deref(),
            host,
            method: Some(parts.method.as_str()),
            path: Some(parts.uri.path()),
            ..Facts::from_identity(&identity, kind)
        },
        call,
        api,
        info: &info,
        body: &body,
        query: parts.uri.query(),
        action: action_name,
        is_tool: tool.is_some(),
        risk: route.risk,
    };
    let rules = lifecycle::Rules { engine, policy, oversight: shared.oversight.guards() };
    let action = oversight::Action {
        request_id,
        agent: identity.agent.unwrap_or_default(),
        cost_center: identity.cost_center.unwrap_or_default(),
        project: identity.project.unwrap_or_default(),
        route: &route,
        name: action_name,
        category: Oversight::category(&route, tool, engine.guardrails()),
        approval: parts.headers.get(oversight::APPROVAL_HEADER).and_then(|v| v.to_str().ok()),
    };
    let now = now();
    let reservation_id = new_id();
    let mut live = crate::admission::Live::new(shared, &route, &reservation_id, RESERVATION_TTL_MS);
    let (lifecycle::Admitted { decision, priced, reservation, .. }, admitted) =
        Box::pin(crate::admission::admit(shared, &action, &rules, &req, &mut live, now)).await?;
    let input_estimate = info.input_estimate_tokens;
    let (reserved, bound, free) = (priced.reserved, priced.bound, priced.free);
    let worst_case = reserved.total;
    let model = if llm { info.model.clone() } else { None };
    // The decision's time as the reserve and audit records write it (formatted once).
    let ts = now.to_string();
    if let Some(r) = &reservation {
        for b in r.budgets() {
            shared.saw(b.scope, &b.key);
        }
        if !r.budgets().is_empty() {
            shared.ledger.append(Entry::Reserve(Box::new(ReserveRecord {
                ts: ts.clone(),
                reserved_at_ms: now.0,
                expires_at_ms: r.expires_at().0,
                request_id: request_id.to_string(),
                reservation_id: reservation_id.clone(),
                agent: identity.agent.unwrap_or_default().to_string(),
                cost_center: identity.cost_center.unwrap_or_default().to_string(),
                project: identity.project.unwrap_or_default().to_string(),
                business_unit: identity.business_unit.map(str::to_string),
                amount: r.amount(),
                budgets: r.budgets().iter().map(|b| b.budget_id.clone()).collect(),
            })));
        }
    }
    let decided = decision_started.elapsed();
    shared.metrics.decision_seconds.with_label_values(&["allow"]).observe(decided.as_secs_f64());
    *deciding = Deciding::Observed;

    // Forward. OpenAI streams are asked for usage when the client did not ask itself; the
    // extra chunk is removed on the way back.
    let streaming = info.stream;
    let mut upstream_body = body;
    let mut strip_usage = false;
    if streaming
        && !info.include_usage
        && matches!(api, Some(Api::ChatCompletions | Api::Completions))
    {
        if let Some(rewritten) = inspect::with_include_usage(&upstream_body) {
            upstream_body = Bytes::from(rewritten);
            strip_usage = true;
        }
    }
    let record = RecordBase {
        request_id: request_id.to_string(),
        agent: identity.agent.unwrap_or_default().to_string(),
        cost_center: identity.cost_center.unwrap_or_default().to_string(),
        project: identity.project.unwrap_or_default().to_string(),
        business_unit: identity.business_unit.map(str::to_string),
        route: route.name.clone(),
        provider: route.kind.provider(),
        model,
        tool: tool.map(str::to_string),
        reason: decision.reason.to_string(),
        clause: decision.clause.to_string(),
        policy_version: decision.policy_version.to_string(),
        reserved_at_ms: now.0,
        reservation_id: reservation_id.clone(),
        budgets: reservation
            .as_ref()
            .map(|r| r.budgets().iter().map(|b| b.budget_id.clone()).collect())
            .unwrap_or_default(),
    };
    shared.ledger.audit(audit::Event {
        ts,
        kind: AuditKind::Decision,
        request_id: request_id.to_string(),
        agent: record.agent.clone(),
        cost_center: record.cost_center.clone(),
        project: record.project.clone(),
        route: record.route.clone(),
        effect: Effect::Allow,
        reason: record.reason.clone(),
        clause: Some(record.clause.clone()),
        policy_version: Some(record.policy_version.clone()),
        model: record.model.clone(),
        tool: record.tool.clone(),
        risk: admitted.risk.clone(),
        ..Default::default()
    });
    let mut upstream_req = upstream_request(&route, parts, upstream_body, engine, strip_usage)?;
    if let Some(span) = span.as_ref() {
        span.inject(upstream_req.headers_mut());
    }
    let span = span.take();
    // Finish reasons are read only for a span that records them.
    let finish_reasons = span.as_ref().is_some_and(CallSpan::recording);
    let sent = Instant::now();
    let sending = Box::pin(crate::upstream::send(&shared.client, &shared.h1_pool, upstream_req));
    let result = tokio::time::timeout(config.upstream.response_timeout, sending).await;
    let mut settler = Settler {
        shared: shared.clone(),
        current: current.clone(),
        base: record,
        reservation,
        meter: api.map(|api| {
            let meter = Meter::new(api, streaming);
            if finish_reasons {
                meter.with_finish_reasons()
            } else {
                meter
            }
        }),
        filter: strip_usage.then(UsageChunkFilter::new),
        out: Vec::new(),
        input_estimate,
        bound,
        reserved,
        status: 0,
        started,
        route_is_llm: route.kind.is_llm(),
        tool_cost: (!route.kind.is_llm()).then_some(worst_case),
        free,
        answered: false,
        admitted,
        span,
    };
    let response = match result {
        Ok(Ok(response)) => {
            settler.answered = true;
            response
        }
        Ok(Err(e)) => {
            tracing::warn!(request_id, upstream = %route.upstream, error = %e, "upstream request failed");
            settler.status = 502;
            settler.on_end(StreamEnd::UpstreamError);
            return Err(Denial::new(
                Class::UpstreamUnavailable,
                "upstream_unavailable",
                "the upstream could not be reached",
            )
            .with_decision(&settler.base.clause, &settler.base.policy_version));
        }
        Err(_) => {
            settler.status = 504;
            settler.on_end(StreamEnd::UpstreamError);
            return Err(Denial::new(
                Class::UpstreamTimeout,
                "upstream_timeout",
                format!(
                    "the upstream sent no response within {:?}",
                    config.upstream.response_timeout
                ),
            )
            .with_decision(&settler.base.clause, &settler.base.policy_version));
        }
    };
    shared
        .metrics
        .upstream_seconds
        .with_label_values(&[&route.name])
        .observe(sent.elapsed().as_secs_f64());

    let (mut parts, body) = response.into_parts();
    settler.status = parts.status.as_u16();
    settler.content_encoding(&parts.headers);
    strip_hop_by_hop(&mut parts.headers);
    let h = &mut parts.headers;
    deny::put(h, "x-request-id", request_id);
    deny::put(h, "x-tollgate-decision", "allow");
    deny::put(h, "x-tollgate-reason", &settler.base.reason);
    deny::put(h, "x-tollgate-clause", &settler.base.clause);
    deny::put(h, "x-tollgate-policy-version", &settler.base.policy_version);
    if let Some(risk) = &settler.admitted.risk {
        deny::put(h, "x-tollgate-risk", risk);
    }
    if strip_usage {
        h.remove(header::CONTENT_LENGTH);
    }
    let idle = config.upstream.stream_idle_timeout;
    let body = MeteredBody::new(body, settler, idle).map_err(BoxError::from).boxed();
    Ok(Response::from_parts(parts, body))
}

/// How far a request's decision got, so that `decision_duration_seconds` is observed once for
/// it, whatever its effect.
#[derive(Clone, Copy)]
enum Deciding {
    /// Not at the policy step yet: a refusal now was decided from the request head.
    AtHead,
    /// The policy step started then.
    Since(Instant),
    /// Allowed, and observed as such.
    Observed,
}

/// The part of a ledger record known before the response.
struct RecordBase {
    request_id: String,
    agent: String,
    cost_center: String,
    project: String,
    business_unit: Option<String>,
    route: String,
    provider: &'static str,
    model: Option<String>,
    tool: Option<String>,
    reason: String,
    clause: String,
    policy_version: String,
    reserved_at_ms: u64,
    reservation_id: String,
    budgets: Vec<String>,
}

/// Meters the response as it passes and settles the request when it ends.
struct Settler {
    shared: Arc<Shared>,
    /// The config the request was admitted under: its rate card prices the answer.
    current: Arc<Current>,
    base: RecordBase,
    reservation: Option<Reservation>,
    meter: Option<Meter>,
    filter: Option<UsageChunkFilter>,
    out: Vec<u8>,
    input_estimate: u64,
    /// The request's upper bound (LLM routes), to judge the reported usage by.
    bound: Option<Bound>,
    /// The worst case reserved: what an implausible report, or a response nothing on the rate
    /// card prices, is charged.
    reserved: Cost,
    status: u16,
    started: Instant,
    route_is_llm: bool,
    tool_cost: Option<Money>,
    /// A free endpoint (a model listing): recorded at $0 with `price_source: free`.
    free: bool,
    /// The upstream answered (`status` is its own, not the proxy's 502/504).
    answered: bool,
    /// What the oversight step needs to hear about the outcome.
    admitted: Admitted,
    /// The call's span, ended with the ledger record (traces on).
    span: Option<CallSpan>,
}

impl Settler {
    /// Tells the meter how the response body is compressed. A compressed body cannot have the
    /// usage chunk removed (that would mean re-compressing it): it goes to the client as the
    /// upstream sent it, usage chunk included.
    fn content_encoding(&mut self, headers: &HeaderMap) {
        let mut values = headers.get_all(header::CONTENT_ENCODING).iter();
        let Some(first) = values.next() else { return };
        let mut value = String::from_utf8_lossy(first.as_bytes()).into_owned();
        for more in values {
            value.push(',');
            value.push_str(&String::from_utf8_lossy(more.as_bytes()));
        }
        if ContentEncoding::parse(&value) == ContentEncoding::Identity {
            return;
        }
        if let Some(meter) = &mut self.meter {
            meter.set_encoding(&value);
        }
        self.filter = None;
    }
}

impl Observer for Settler {
    fn on_data(&mut self, chunk: &Bytes) -> Option<Bytes> {
        if let Some(meter) = &mut self.meter {
            meter.feed(chunk);
        }
        let filter = self.filter.as_mut()?;
        self.out.clear();
        filter.filter(chunk, &mut self.out);
        Some(Bytes::copy_from_slice(&self.out))
    }

    fn rewrites(&self) -> bool {
        self.filter.is_some()
    }

    fn on_end(&mut self, end: StreamEnd) {
        let shared = &self.shared;
        shared.oversight.settle(&shared.ledger, &shared.alerts, &self.admitted, self.status);
        let ok = (200..300).contains(&self.status);
        let mut finish_reasons = Vec::new();
        let (usage, source, reported_model) = match self.meter.take() {
            Some(meter) if ok => {
                let metered = meter.finish(self.input_estimate);
                if let Some(reason) = metered.decode_aborted {
                    shared.metrics.meter_decode_aborted.with_label_values(&[reason.as_str()]).inc();
                    tracing::warn!(request_id = %self.base.request_id, reason = reason.as_str(),
                        "the compressed response could not be decoded for metering; usage estimated");
                }
                finish_reasons = metered.finish_reasons;
                (metered.usage, metered.source, metered.model)
            }
            // No answer (502/504 of our own) or the upstream refused the request: providers do
            // not charge for either.
            _ => (Usage::default(), UsageSource::None, None),
        };
        let mut price_source = self.free.then_some(PriceSource::Free);
        let requested = self.base.model.as_deref();
        let price = |usage: Usage| {
            if usage.is_empty() || self.free {
                return Cost::ZERO;
            }
            let priced = self.current.engine().rates().price_response(
                reported_model.as_deref(),
                requested,
                usage,
                self.reserved,
            );
            if priced.source.is_substitute() {
                crate::metrics::substitute_price(
                    &shared.metrics,
                    &self.base.request_id,
                    reported_model.as_deref(),
                    requested,
                    priced,
                );
            }
            price_source = Some(priced.source);
            priced.cost
        };
        let (usage, source, cost) = match &self.bound {
            Some(bound) if self.route_is_llm => {
                let billed = reservation::bill(usage, source, bound, self.reserved, price);
                if let Some(why) = billed.implausible {
                    price_source = Some(PriceSource::Reservation);
                    shared.metrics.usage_implausible.inc();
                    tracing::warn!(
                        request_id = %self.base.request_id,
                        model = reported_model.as_deref().or(requested).unwrap_or("-"),
                        reported = ?usage,
                        billed = %billed.cost.total,
                        "implausible usage report, billed at the reservation: {why}"
                    );
                }
                (billed.usage, billed.source, billed.cost)
            }
            _ => (usage, source, Cost::ZERO),
        };
        let cost = if self.route_is_llm {
            cost
        } else if ok {
            let per_call = self.tool_cost.unwrap_or(Money::ZERO);
            Cost { per_call, total: per_call, ..Cost::ZERO }
        } else {
            Cost::ZERO
        };
        // The model the upstream named, for the span (copied only when there is one).
        let response_model = self.span.as_ref().and(reported_model.clone());
        let model = reported_model.or_else(|| self.base.model.clone());
        let breakdown = cost;
        let cost = breakdown.total;
        let now = now();
        if let Some(reservation) = self.reservation.take() {
            let over = reservation::overrun(reservation.amount(), cost);
            if over > Money::ZERO {
                let counter = &shared.metrics.budget_overrun_nano_usd;
                crate::metrics::Metrics::add_saturating(counter, over.nanos().unsigned_abs());
                tracing::warn!(
                    request_id = %self.base.request_id,
                    reserved = %reservation.amount(),
                    charged = %cost,
                    over = %over,
                    "the upstream reported more than was reserved; charged in full"
                );
            }
            match shared.budgets.settle(reservation, cost) {
                Ok(settlement) => {
                    for w in &settlement.warnings {
                        shared.metrics.budget_warning(&w.budget_id, w.threshold_bp / 100);
                        if shared.alerts.wants(crate::alerts::config::Kind::BudgetThreshold) {
                            shared.alerts.raise(crate::alerts::budget_threshold(
                                w,
                                &self.base.request_id,
                                &self.base.agent,
                            ));
                        }
                        tracing::warn!(
                            budget = %w.budget_id,
                            key = %w.key,
                            threshold_percent = w.threshold_bp / 100,
                            spent = %w.spent,
                            limit = %w.limit,
                            "budget threshold crossed"
                        );
                    }
                }
                Err(e) => tracing::error!(error = %e, "settling a budget reservation"),
            }
        }
        let m = &shared.metrics;
        let model_label = m.models.admit(model.as_deref().unwrap_or("-"));
        let agent = m.agents.admit(&self.base.agent);
        let project = m.projects.admit(&self.base.project);
        let cc = m.cost_centers.admit(&self.base.cost_center);
        for (kind, n) in [
            ("input", usage.input),
            ("cached_input", usage.cached_input),
            ("cache_write", usage.cache_write),
            ("output", usage.output),
            ("reasoning", usage.reasoning),
        ] {
            if n > 0 {
                let labels = [&*model_label, kind, &agent, &project, &cc];
                let counter = m.tokens.with_label_values(&labels);
                crate::metrics::Metrics::add_saturating(&counter, n);
            }
        }
        if cost.nanos() > 0 {
            let counter = m.cost_nano_usd.with_label_values(&[&model_label, &agent, &project, &cc]);
            crate::metrics::Metrics::add_saturating(&counter, cost.nanos().unsigned_abs());
        }
        let status = tollgate_core::refusal::status_class(self.answered.then_some(self.status));
        m.request("allow", &self.base.reason, self.base.model.as_deref(), status);
        let base = &self.base;
        let record = UsageRecord {
            ts: now.to_string(),
            reserved_at_ms: base.reserved_at_ms,
            request_id: base.request_id.clone(),
            reservation_id: base.reservation_id.clone(),
            agent: base.agent.clone(),
            cost_center: base.cost_center.clone(),
            project: base.project.clone(),
            business_unit: base.business_unit.clone(),
            route: base.route.clone(),
            provider: base.provider.to_string(),
            model,
            tool: base.tool.clone(),
            tokens: usage,
            cost: Some(breakdown),
            cost_usd: cost,
            cost_nano_usd: cost.nanos(),
            decision: Effect::Allow,
            reason: base.reason.clone(),
            clause: base.clause.clone(),
            policy_version: base.policy_version.clone(),
            budgets: base.budgets.clone(),
            status: self.status,
            latency_ms: self.started.elapsed().as_millis() as u64,
            usage_source: source,
            price_source,
            end: end.into(),
            source: None,
            source_event_id: None,
        };
        if let Some(span) = self.span.take() {
            let (answered, llm) = (self.answered, self.route_is_llm);
            span.settled(&record, response_model.as_deref(), finish_reasons, answered, end, llm);
        }
        shared.ledger.append(Entry::Usage(Box::new(record)));
    }
}

/// The request to the upstream: its URL, the headers minus hop-by-hop ones, attribution
/// headers only when configured, and `Host` set to the upstream.
fn upstream_request(
    route: &Route,
    parts: http::request::Parts,
    body: Bytes,
    engine: &tollgate_core::engine::Engine,
    body_rewritten: bool,
) -> Result<Request<Body>, Denial> {
    let base = &route.upstream;
    let base_path = base.path().trim_end_matches('/');
    let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let uri = Uri::builder()
        .scheme(base.scheme_str().unwrap_or("https"))
        .authority(base.authority().map(|a| a.as_str()).unwrap_or_default())
        .path_and_query(format!("{base_path}{path_and_query}"))
        .build()
        .map_err(|_| Denial::new(Class::BadRequest, "bad_path", "the request path is not valid"))?;
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    headers.remove("x-tollgate-approval");
    if !route.forward_attribution {
        for name in engine.attribution().header_names() {
            headers.remove(name);
        }
    }
    if body_rewritten {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        // The usage chunk is to be removed from the answer, which needs it uncompressed.
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    }
    if let Some(authority) = base.authority() {
        if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
            headers.insert(header::HOST, v);
        }
    }
    let mut req = Request::new(deny::full(body));
    *req.method_mut() = parts.method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Ok(req)
}

/// The core's strict-head rules (`tollgate_core::head`) on an HTTP/1 request: a 400 naming what
/// is wrong, before anything is read from the head.
fn strict_head<B>(req: &Request<B>, forward: bool, current: &Current) -> Result<(), Denial> {
    let line = tollgate_core::head::RequestLine {
        http1: matches!(req.version(), http::Version::HTTP_10 | http::Version::HTTP_11),
        absolute_form: req.uri().scheme().is_some(),
        forward,
    };
    let headers = req.headers().iter().map(|(n, v)| (n.as_str(), v.as_bytes()));
    tollgate_core::head::check(line, headers, current.engine().attribution())
        .map_err(|e| Denial::new(Class::BadRequest, e.code(), e.to_string()))
}

/// Refuses ambiguous message framing (request smuggling): both `Content-Length` and
/// `Transfer-Encoding`, or several `Content-Length` headers.
///
/// Defence in depth only: hyper's HTTP/1 parser already answers 400 to differing
/// `Content-Length`s, folds equal ones into one, and for `Content-Length` with chunked
/// `Transfer-Encoding` drops the length, decodes the chunks and closes the connection after the
/// response (RFC 9112 §6.3), so such requests reach this check already normalised (the
/// end-to-end tests in `tests/tests/proxy_framing.rs` pin that behaviour).
fn check_framing(headers: &HeaderMap) -> Result<(), Denial> {
    let lengths = headers.get_all(header::CONTENT_LENGTH).iter().count();
    let has_te = headers.contains_key(header::TRANSFER_ENCODING);
    if lengths > 1 || (lengths == 1 && has_te) {
        return Err(Denial::new(
            Class::BadRequest,
            "ambiguous_framing",
            "the request has both Content-Length and Transfer-Encoding, or several Content-Length headers",
        ));
    }
    Ok(())
}

/// Headers that describe one connection, not the message, or carry proxy credentials
/// (`tollgate_core::head::HOP_BY_HOP`, which the Envoy filter removes too), plus the ones that
/// `Connection` names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in tollgate_core::head::HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Reads a request body of at most `max` bytes, allowing at most `idle` between two of its
/// pieces: a body that stalls is a 408 (and the connection is closed), never a request held open.
async fn read_body(body: Incoming, max: usize, idle: Duration) -> Result<Bytes, Denial> {
    let mut body = Limited::new(body, max);
    // A body in one piece (the usual case) is kept as it came, without a copy.
    let mut first = Bytes::new();
    let mut more = bytes::BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(Denial::new(
                    Class::RequestTimeout,
                    "body_timeout",
                    format!(
                        "the request body stalled: nothing for {} ms (limits.body_idle_timeout)",
                        idle.as_millis()
                    ),
                ))
            }
            Ok(None) if more.is_empty() => return Ok(first),
            Ok(None) => return Ok(more.freeze()),
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => {
                return Err(if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                    too_large(max)
                } else {
                    Denial::new(
                        Class::BadRequest,
                        "body_read_failed",
                        "the request body could not be read",
                    )
                })
            }
        };
        let Ok(chunk) = frame.into_data() else { continue };
        if first.is_empty() && more.is_empty() {
            first = chunk;
        } else {
            if more.is_empty() {
                more.extend_from_slice(&first);
            }
            more.extend_from_slice(&chunk);
        }
    }
}

fn too_large(max: usize) -> Denial {
    Denial::new(
        Class::TooLarge,
        "body_too_large",
        format!("the request body is larger than {max} bytes"),
    )
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

fn host_of<B>(req: &Request<B>) -> Option<&str> {
    req.uri().host().or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

fn host_of_parts(parts: &http::request::Parts) -> Option<&str> {
    let host = parts.uri.host().or_else(|| parts.headers.get(header::HOST)?.to_str().ok())?;
    Some(host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    }))
}

/// The caller's `x-request-id` if it is short and printable, else a new one. It correlates
/// logs, the ledger and the audit log; it is never trusted as unique.
fn request_id(headers: &HeaderMap) -> String {
    if let Some(id) = headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
        if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) {
            return id.to_string();
        }
    }
    new_id()
}

/// An id unique to this process run (start time, pid, counter). Budget reservations are keyed
/// by it, never by the caller's `x-request-id`: a caller reusing one must not make its later
/// requests look like duplicate settlements (which are not charged).
pub(crate) fn new_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static BOOT: std::sync::OnceLock<(u64, u32)> = std::sync::OnceLock::new();
    let (boot, pid) = *BOOT.get_or_init(|| (now().0, std::process::id()));
    format!("tg-{boot:x}-{pid:x}-{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}
