//! The admin listener (default 127.0.0.1:9090).
//!
//! Open: `/metrics` (Prometheus text), `/healthz` (the process is up), `/readyz` (serving: not
//! draining, ledger writable). Behind `Authorization: Bearer <token>` (the token comes from the
//! environment variable named by `admin.token_env`; without it the API answers 401):
//! - `GET  /admin/policy`           the active policy version and rule count
//! - `POST /admin/policy/reload`    re-read the policy source now
//! - `GET  /admin/budgets`          every budget's state for the current period
//! - `GET  /admin/usage?period=YYYY-MM[-DD]&group_by=agent|project|cost_center`
//! - `GET  /admin/invoice?period=YYYY-MM&group_by=cost_center|project|agent&format=json|csv|focus`
//! - `GET  /admin/ledger/head`       the ledger's and the audit log's record counts and last hashes
//!   (after flushing what is queued), for `tollgate audit verify --head`
//! - approvals, agents and autonomy metrics: see [`oversight`]
//! - `POST /v1/usage/events`        usage events from the Envoy filter (NDJSON, [`crate::ingest`])
//! - `POST /v1/fleet/leases`        fleet budget leases for Envoy filters ([`crate::fleet::leases`])
//! - `POST /v1/fleet/loops`         the fleet's loop counts for Envoy filters ([`crate::fleet::loops`])
//! - `POST /v1/fleet/approvals[/redeem]` approvals for Envoy filters ([`crate::fleet::approvals`])
//! - `GET /v1/fleet/agents/disabled` the agents the Envoy filters refuse
//! - `POST /v1/fleet/oversight/reports` the Envoy filters' breaker openings and disabled agents
//!   ([`crate::fleet::reports`])
//!
//! The console (`/console`, [`console`]): web pages over the same functions, signed in with the
//! admin token.
//!
//! A failing handler answers 500 with a fixed body and logs the cause; internals never leak.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use tollgate_core::budget::{BudgetStatus, Scope};
use tollgate_core::money::Money;

use crate::clock::now;
use crate::deny::full;
use crate::server::Handler;
use crate::state::Shared;
use crate::upstream::Body;

mod console;
mod oversight;

#[derive(Clone)]
pub struct Admin {
    shared: Arc<Shared>,
    /// The console's sign-in sessions (in memory).
    sessions: Arc<console::Sessions>,
}

impl Admin {
    pub fn new(shared: Arc<Shared>) -> Self {
        Admin { shared, sessions: Arc::default() }
    }
}

/// An admin failure: the status and a fixed message for the caller, the cause for the log.
struct Failure {
    status: StatusCode,
    message: &'static str,
}

impl Handler for Admin {
    async fn handle(&self, req: Request<Incoming>, _peer: SocketAddr) -> Response<Body> {
        let path = req.uri().path().to_string();
        if path == "/console" || path.starts_with("/console/") {
            return console::handle(&self.shared, &self.sessions, req).await;
        }
        match route(&self.shared, req).await {
            Ok(response) => response,
            Err(Failure { status, message }) => {
                if status.is_server_error() {
                    tracing::error!(path = %path, "admin handler failed");
                }
                json_response(status, &json!({ "error": message }))
            }
        }
    }
}

/// `200 ready`, with a warning (logged at most once a minute) while the data volume has less
/// free space than `ledger.warn_free_bytes`: still serving, but the hard `503` (nothing can be
/// written) is near.
fn ready(shared: &Shared) -> Response<Body> {
    let mut warnings = Vec::new();
    if shared.budgets.store().fleet().is_some_and(|f| f.down()) {
        warnings.push(
            "the fleet store (Redis) did not answer in the last second: budgeted requests the \
             proxy's leases cannot cover are refused (store.on_store_error)"
                .to_string(),
        );
    }
    let warn_below = shared.current().config.ledger_warn_free_bytes;
    let s = shared.ledger.storage();
    if warn_below > 0 && s.free_bytes < warn_below {
        let full_in = match s.hours_until_full {
            h if h.is_finite() => format!("full in {h:.1} h at the last hour's growth"),
            _ => "not growing".to_string(),
        };
        if shared.ledger.warn_low_space_now() {
            tracing::warn!(
                free_bytes = s.free_bytes,
                data_bytes = s.data_bytes,
                warn_free_bytes = warn_below,
                hours_until_full = s.hours_until_full,
                "the data volume is low on space: metered requests get 503 once the ledger cannot \
                 be written (shorten ledger.retention or give the volume more space)"
            );
        }
        warnings.push(format!(
            "{} bytes free on the data volume, below ledger.warn_free_bytes ({}); {full_in}",
            s.free_bytes, warn_below
        ));
    }
    if warnings.is_empty() {
        return text(StatusCode::OK, "ready\n");
    }
    let body: String = warnings.iter().map(|w| format!("; warning: {w}")).collect();
    let mut r = Response::new(full(Bytes::from(format!("ready{body}\n"))));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Failure> {
    let method = req.method().clone();
    match (method, req.uri().path()) {
        (Method::GET, "/metrics") => {
            shared.oversight.observe_into(&shared.metrics);
            shared.metrics.observe_storage(&shared.ledger.storage());
            // The utilisation gauge is computed at scrape time, like the storage gauges.
            let _ = budget_states(shared);
            if let Some(fleet) = shared.budgets.store().fleet() {
                shared.metrics.store_down.set(i64::from(fleet.down()));
                let errors = fleet.errors();
                let seen = shared.metrics.store_errors.get();
                shared.metrics.store_errors.inc_by(errors.saturating_sub(seen));
            }
            let mut r = Response::new(full(Bytes::from(shared.metrics.render())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(r)
        }
        (Method::GET, "/healthz") => Ok(text(StatusCode::OK, "ok\n")),
        (Method::GET, "/readyz") => {
            if shared.draining.load(Ordering::Relaxed) {
                Ok(text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"))
            } else if !shared.ledger.is_healthy() {
                Ok(text(StatusCode::SERVICE_UNAVAILABLE, "ledger not writable\n"))
            } else {
                Ok(ready(shared))
            }
        }
        (Method::POST, "/v1/usage/events") => {
            authorize(shared, &req)?;
            let limit = shared.current().config.limits.max_body_bytes;
            Ok(crate::ingest::handle(&shared.ingest, &shared.ledger, limit, req).await)
        }
        (Method::POST, "/v1/fleet/leases") => {
            authorize(shared, &req)?;
            Ok(match crate::fleet::leases::serve(shared.budgets.store().fleet(), req).await {
                Ok(answer) => json_response(StatusCode::OK, &answer),
                Err((status, error)) => json_response(status, &json!({ "error": error })),
            })
        }
        (Method::POST, "/v1/fleet/loops") => {
            authorize(shared, &req)?;
            Ok(match crate::fleet::loops::serve(shared.budgets.store().fleet(), req).await {
                Ok(answer) => json_response(StatusCode::OK, &answer),
                Err((status, error)) => json_response(status, &json!({ "error": error })),
            })
        }
        (Method::GET, "/v1/fleet/agents/disabled") => {
            authorize(shared, &req)?;
            let s = shared.clone();
            let agents = tokio::task::spawn_blocking(move || s.oversight.fleet_disabled_agents())
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
            Ok(match agents {
                Ok(agents) => json_response(StatusCode::OK, &json!({ "agents": agents })),
                Err(e) => {
                    tracing::warn!(error = %e, "reading the fleet's disabled agents");
                    json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &json!({ "error": "the fleet store cannot be read right now" }),
                    )
                }
            })
        }
        (Method::POST, "/v1/fleet/oversight/reports") => {
            authorize(shared, &req)?;
            Ok(match crate::fleet::reports::serve(shared, req).await {
                Ok(answer) => json_response(StatusCode::OK, &json!(answer)),
                Err((status, error)) => json_response(status, &json!({ "error": error })),
            })
        }
        (Method::POST, "/v1/fleet/approvals") => {
            authorize(shared, &req)?;
            Ok(remote_answer(crate::fleet::approvals::raise(shared, req).await))
        }
        (Method::POST, "/v1/fleet/approvals/redeem") => {
            authorize(shared, &req)?;
            Ok(remote_answer(crate::fleet::approvals::redeem(shared, req).await))
        }
        (method, path) if path.starts_with("/admin/") => {
            authorize(shared, &req)?;
            let query = req.uri().query().unwrap_or("").to_string();
            let path = path.to_string();
            if path.starts_with("/admin/approvals")
                || path.starts_with("/admin/agents/")
                || path == "/admin/oversight"
            {
                return match oversight::route(shared, &method, &path, &query, req).await {
                    Some(result) => result,
                    None => Err(Failure { status: StatusCode::NOT_FOUND, message: "not found" }),
                };
            }
            match (method, path.as_str()) {
                (Method::GET, "/admin/policy") => {
                    let policy = shared.current().policy.clone();
                    Ok(json_response(
                        StatusCode::OK,
                        &json!({
                            "version": policy.version(),
                            "rules": policy.rules().len(),
                            "source": shared.current().config.policy_source.as_ref().map(|s| format!("{s:?}")),
                        }),
                    ))
                }
                (Method::POST, "/admin/policy/reload") => {
                    match crate::reload::reload_now(shared).await {
                        Ok(version) => Ok(json_response(
                            StatusCode::OK,
                            &json!({ "version": version, "reloaded": true }),
                        )),
                        Err(e) => Ok(json_response(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            &json!({
                                "reloaded": false,
                                "error": e.to_string(),
                                "version": shared.current().policy.version(),
                            }),
                        )),
                    }
                }
                (Method::GET, "/admin/budgets") => budgets(shared),
                (Method::GET, "/admin/usage") => usage(shared, &query).await,
                (Method::GET, "/admin/invoice") => invoice(shared, &query).await,
                (Method::GET, "/admin/ledger/head") => {
                    shared.ledger.flush().await;
                    match shared.ledger.head() {
                        Some(head) => Ok(json_response(StatusCode::OK, &json!(head))),
                        None => Err(Failure {
                            status: StatusCode::NOT_FOUND,
                            message: "the ledger is disabled",
                        }),
                    }
                }
                _ => Err(Failure { status: StatusCode::NOT_FOUND, message: "not found" }),
            }
        }
        _ => Err(Failure { status: StatusCode::NOT_FOUND, message: "not found" }),
    }
}

/// An approval service answer as JSON (200), or the request's own error.
fn remote_answer(
    answer: Result<tollgate_core::approval::remote::RemoteAnswer, (StatusCode, String)>,
) -> Response<Body> {
    match answer {
        Ok(a) => json_response(StatusCode::OK, &json!(a)),
        Err((status, error)) => json_response(status, &json!({ "error": error })),
    }
}

fn authorize(shared: &Shared, req: &Request<Incoming>) -> Result<(), Failure> {
    let unauthorized = Failure { status: StatusCode::UNAUTHORIZED, message: "unauthorized" };
    let Some(token) = &shared.admin_token else { return Err(unauthorized) };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(unauthorized)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The state of every budget the active policy declares, for each scope value seen in the
/// ledger's current period (global and fixed-key budgets have one state each), with the policy
/// version: what `GET /admin/budgets` answers and the console shows.
fn budget_states(shared: &Shared) -> Result<(String, Vec<BudgetStatus>), Failure> {
    let policy = shared.current().policy.clone();
    let now = now();
    let values = shared.seen_values();
    let mut out: Vec<BudgetStatus> = Vec::new();
    for spec in policy.all_budgets() {
        let keys: Vec<String> = match (&spec.key, spec.scope) {
            (Some(key), _) => vec![key.clone()],
            (None, Scope::Global) => vec![String::new()],
            (None, scope) => values.get(&scope).cloned().unwrap_or_default().into_iter().collect(),
        };
        for key in keys {
            match shared.budgets.status(spec, &key, now) {
                Ok(status) => {
                    shared
                        .metrics
                        .budget_utilization_bp
                        .with_label_values(&[&spec.id, &status.key])
                        .set(status.utilization_bp as i64);
                    out.push(status);
                }
                Err(e) => {
                    tracing::error!(error = %e, budget = %spec.id, "reading budget state");
                    return Err(Failure {
                        status: StatusCode::INTERNAL_SERVER_ERROR,
                        message: "internal error",
                    });
                }
            }
        }
    }
    Ok((policy.version().to_string(), out))
}

fn budgets(shared: &Shared) -> Result<Response<Body>, Failure> {
    let (version, out) = budget_states(shared)?;
    Ok(json_response(StatusCode::OK, &json!({ "policy_version": version, "budgets": out })))
}

/// Usage totals from the ledger for a period (`2026-11` or `2026-11-22`, default this month),
/// grouped by agent, project or cost center.
async fn usage(shared: &Shared, query: &str) -> Result<Response<Body>, Failure> {
    let mut period = this_month();
    let mut group_by = "cost_center".to_string();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "period" => period = v.into_owned(),
            "group_by" => group_by = v.into_owned(),
            _ => {}
        }
    }
    if let Err(bad) = check_period(&period) {
        return Ok(bad);
    }
    let Some(group) = UsageGroup::parse(&group_by) else {
        return Ok(json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "group_by must be one of agent, project, cost_center"}),
        ));
    };
    let [groups] = usage_totals(shared, &period, [group]).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "period": period, "group_by": group_by, "groups": groups }),
    ))
}

/// The current month, `2026-11`: the default report period.
fn this_month() -> String {
    now().to_string()[..7].to_string()
}

/// What usage totals are grouped by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UsageGroup {
    Agent,
    Project,
    CostCenter,
}

impl UsageGroup {
    fn parse(text: &str) -> Option<UsageGroup> {
        match text {
            "agent" => Some(UsageGroup::Agent),
            "project" => Some(UsageGroup::Project),
            "cost_center" => Some(UsageGroup::CostCenter),
            _ => None,
        }
    }
}

/// One group's usage totals for a period.
#[derive(Clone, Debug, Default, serde::Serialize)]
struct Totals {
    requests: u64,
    input_tokens: u64,
    cached_input_tokens: u64,
    cache_write_tokens: u64,
    output_tokens: u64,
    reasoning_tokens: u64,
    cost_usd: Money,
}

/// Usage totals in `period` (checked by [`check_period`]) from one read of the ledger (retired
/// days by their totals, then the records kept), grouped each way of `groups`: what
/// `GET /admin/usage` answers and the console shows.
async fn usage_totals<const N: usize>(
    shared: &Shared,
    period: &str,
    groups: [UsageGroup; N],
) -> Result<[BTreeMap<String, Totals>; N], Failure> {
    let (records, retired) = read_ledger(shared).await?;
    let mut out: [BTreeMap<String, Totals>; N] = std::array::from_fn(|_| BTreeMap::new());
    let totals: Vec<(tollgate_core::record::UsageRecord, u64)> =
        retired.iter().enumerate().map(|(i, g)| (g.as_record(i), g.requests)).collect();
    let kept = records.iter().filter_map(|s| s.entry.usage()).map(|r| (r, 1));
    for (r, requests) in totals.iter().map(|(r, n)| (r, *n)).chain(kept) {
        if !r.ts.starts_with(period) {
            continue;
        }
        for (group, into) in groups.iter().zip(out.iter_mut()) {
            let key = match group {
                UsageGroup::Agent => &r.agent,
                UsageGroup::Project => &r.project,
                UsageGroup::CostCenter => &r.cost_center,
            };
            let t = into.entry(key.clone()).or_default();
            t.requests += requests;
            t.input_tokens += r.tokens.input;
            t.cached_input_tokens += r.tokens.cached_input;
            t.cache_write_tokens += r.tokens.cache_write;
            t.output_tokens += r.tokens.output;
            t.reasoning_tokens += r.tokens.reasoning;
            t.cost_usd += r.cost_total();
        }
    }
    Ok(out)
}

/// The `period` query parameter, checked by the core's one parser: `Err` is the 400 naming it.
fn check_period(period: &str) -> Result<(), Response<Body>> {
    match tollgate_core::time::ReportPeriod::parse(period) {
        Ok(_) => Ok(()),
        Err(e) => Err(json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": format!("period: {e}"), "parameter": "period"}),
        )),
    }
}

/// Every ledger record kept and the totals of the retired ones, after flushing what is queued
/// (read off the async threads).
async fn read_ledger(
    shared: &Shared,
) -> Result<(Vec<crate::ledger::Stored>, Vec<crate::store::retired::Group>), Failure> {
    shared.ledger.flush().await;
    let dir = shared.current().config.data_dir.clone();
    let read = move || -> anyhow::Result<_> {
        Ok((crate::ledger::read_records(&dir)?, crate::ledger::read_retired(&dir)?))
    };
    match tokio::task::spawn_blocking(read).await {
        Ok(Ok(records)) => Ok(records),
        Ok(Err(e)) => {
            tracing::error!(error = %format!("{e:#}"), "reading the ledger");
            Err(Failure { status: StatusCode::INTERNAL_SERVER_ERROR, message: "internal error" })
        }
        Err(e) => {
            tracing::error!(error = %e, "reading the ledger");
            Err(Failure { status: StatusCode::INTERNAL_SERVER_ERROR, message: "internal error" })
        }
    }
}

/// `GET /admin/invoice?period=2026-11&group_by=cost_center&format=csv|json|focus` (`focus`:
/// FinOps FOCUS cost-and-usage rows as CSV, see [`crate::focus`]).
async fn invoice(shared: &Shared, query: &str) -> Result<Response<Body>, Failure> {
    let mut period = this_month();
    let mut group_by = "cost_center".to_string();
    let mut format = "json".to_string();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "period" => period = v.into_owned(),
            "group_by" => group_by = v.into_owned(),
            "format" => format = v.into_owned(),
            _ => {}
        }
    }
    let Some(group) = crate::invoice::GroupBy::parse(&group_by) else {
        return Ok(json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "group_by must be one of cost_center, project, agent"}),
        ));
    };
    if let Err(bad) = check_period(&period) {
        return Ok(bad);
    }
    if !matches!(format.as_str(), "csv" | "json" | "focus") {
        return Ok(json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "format must be csv, json or focus"}),
        ));
    }
    let (records, retired) = read_ledger(shared).await?;
    if format == "focus" {
        let current = shared.current();
        let Ok(csv) =
            crate::focus::from_ledger(&records, &retired, &period, current.config.engine.rates())
        else {
            return Err(Failure { status: StatusCode::BAD_REQUEST, message: "bad period" });
        };
        let mut r = Response::new(full(Bytes::from(csv)));
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
        return Ok(r);
    }
    let policy = shared.current().policy.clone();
    let invoices = crate::invoice::from_ledger(
        &records,
        &retired,
        &period,
        group,
        &shared.current().config.shared_costs,
        &policy,
    );
    if format == "csv" {
        let mut r = Response::new(full(Bytes::from(crate::invoice::to_csv(&invoices))));
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
        return Ok(r);
    }
    Ok(json_response(StatusCode::OK, &serde_json::to_value(&invoices).unwrap_or_default()))
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(serde_json::to_vec(value).unwrap_or_default())));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
