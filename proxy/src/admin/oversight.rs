//! The oversight part of the admin API (bearer token, like the rest of `/admin/`):
//!
//! - `GET  /admin/approvals?state=pending|approved|denied|used|expired`  oldest first
//! - `GET  /admin/approvals/{id}`
//! - `POST /admin/approvals/{id}/approve` and `.../deny`, body optional `{"by": "alice",
//!   "note": "..."}`: 200 with the approval, 404 unknown, 409 when it is no longer pending
//! - `GET  /admin/agents/{agent}`          the agent's escalation standing
//! - `POST /admin/agents/{agent}/enable`   re-enable an agent disabled after consecutive errors
//! - `GET  /admin/oversight`               autonomy (auto-approved / total, overall and by
//!   category), the top approval reasons, pending approvals, circuit breakers

use std::sync::Arc;

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};

use tollgate_core::approval::{Approval, State};

use super::{json_response, Failure};
use crate::clock::now;
use crate::oversight::{audit_approval, Counts, StoreError};
use crate::state::Shared;
use crate::upstream::Body;

/// Answers an oversight path, or `None` when `path` is not one.
pub(super) async fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: &str,
    req: Request<Incoming>,
) -> Option<Result<http::Response<Body>, Failure>> {
    let parts: Vec<&str> = path.trim_start_matches("/admin/").split('/').collect();
    Some(match (method, parts.as_slice()) {
        (&Method::GET, ["oversight"]) => Ok(summary(shared)),
        (&Method::GET, ["approvals"]) => list(shared, query).await,
        (&Method::GET, ["approvals", id]) => {
            sweep(shared).await;
            match shared.oversight.approvals.get(id) {
                Some(a) => Ok(json_response(StatusCode::OK, &json!(a))),
                None => Ok(not_found()),
            }
        }
        (&Method::POST, ["approvals", id, verb @ ("approve" | "deny")]) => {
            decide(shared, id, *verb == "approve", req).await
        }
        (&Method::GET, ["agents", agent]) => {
            let standing = shared.oversight.standing(agent);
            Ok(json_response(StatusCode::OK, &json!({"agent": agent, "standing": standing})))
        }
        (&Method::POST, ["agents", agent, "enable"]) => {
            let was_disabled = match enable_agent(shared, agent, "admin").await {
                Ok(was_disabled) => was_disabled,
                Err(e) => {
                    return Some(Ok(json_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &json!({"error": e}),
                    )));
                }
            };
            Ok(json_response(
                StatusCode::OK,
                &json!({"agent": agent, "was_disabled": was_disabled, "enabled": true}),
            ))
        }
        _ => return None,
    })
}

/// Re-enables `agent` (disabled after consecutive errors) and, if it was disabled, records in the
/// audit log that `actor` did. `Err` names what failed: the agent is re-enabled until the next
/// restart but the change could not be written.
pub(super) async fn enable_agent(
    shared: &Arc<Shared>,
    agent: &str,
    actor: &str,
) -> Result<bool, String> {
    let was_disabled = match shared.oversight.reenable(agent).await {
        Ok(was_disabled) => was_disabled,
        Err(e) => {
            tracing::error!(error = %e, "persisting the disabled agents");
            return Err(format!(
                "{agent} is re-enabled until the next restart, but the change could not be \
                 written: {e}"
            ));
        }
    };
    if was_disabled {
        shared.ledger.audit(crate::audit::Event {
            ts: now().to_string(),
            kind: tollgate_core::record::AuditKind::AgentReenabled,
            agent: agent.to_string(),
            effect: tollgate_core::policy::Effect::Allow,
            reason: "operator_reenabled".into(),
            actor: Some(actor.to_string()),
            ..Default::default()
        });
    }
    Ok(was_disabled)
}

fn not_found() -> http::Response<Body> {
    json_response(StatusCode::NOT_FOUND, &json!({"error": "no approval with this id"}))
}

/// Timeouts are applied before anything is shown or decided.
async fn sweep(shared: &Arc<Shared>) {
    let s = shared.clone();
    let _ = tokio::task::spawn_blocking(move || s.oversight.sweep(&s.ledger)).await;
}

/// The approvals in `state` (all without one), oldest first, after applying timeouts: what
/// `GET /admin/approvals` answers and the console shows.
pub(super) async fn approvals(shared: &Arc<Shared>, state: Option<State>) -> Vec<Approval> {
    sweep(shared).await;
    shared.oversight.approvals.list(state)
}

async fn list(shared: &Arc<Shared>, query: &str) -> Result<http::Response<Body>, Failure> {
    let mut state = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k == "state" {
            match State::parse(&v) {
                Some(s) => state = Some(s),
                None => {
                    return Ok(json_response(
                        StatusCode::BAD_REQUEST,
                        &json!({"error": "state must be one of pending, approved, denied, used, expired"}),
                    ))
                }
            }
        }
    }
    let approvals = approvals(shared, state).await;
    Ok(json_response(StatusCode::OK, &json!({"approvals": approvals})))
}

/// Why an operator's decision was not applied.
pub(super) enum Undecided {
    /// No approval has this id.
    Unknown,
    /// It is no longer pending (the reason, for the operator).
    NotPending(String),
    /// The journal could not be written (logged).
    Failed,
}

/// Approves or denies a pending approval as `by` (at most 128 characters kept) with an
/// optional `note` (at most 1024), and records it in the audit log: what
/// `POST /admin/approvals/{id}/approve|deny` and the console's buttons do.
pub(super) async fn decide_approval(
    shared: &Arc<Shared>,
    id: &str,
    approve: bool,
    by: &str,
    note: Option<&str>,
) -> Result<Approval, Undecided> {
    let by = by.chars().take(128).collect::<String>();
    let note = note.map(|n| n.chars().take(1024).collect::<String>());
    let id_owned = id.to_string();
    let result = shared
        .oversight
        .approvals
        .blocking(move |store| store.decide(&id_owned, approve, &by, note.as_deref(), now()))
        .await;
    match result {
        Ok((approval, transition)) => {
            audit_approval(&shared.ledger, &approval, transition, approval.decided_by.as_deref());
            Ok(approval)
        }
        Err(StoreError::Unknown) => Err(Undecided::Unknown),
        Err(StoreError::Decide(e)) => Err(Undecided::NotPending(e.to_string())),
        Err(e) => {
            tracing::error!(error = %e, "deciding an approval");
            Err(Undecided::Failed)
        }
    }
}

async fn decide(
    shared: &Arc<Shared>,
    id: &str,
    approve: bool,
    req: Request<Incoming>,
) -> Result<http::Response<Body>, Failure> {
    let bad = |message: &str| json_response(StatusCode::BAD_REQUEST, &json!({"error": message}));
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(bad("the body must be a JSON object of at most 64 KiB")),
    };
    let input: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v @ Value::Object(_)) => v,
            _ => return Ok(bad("the body must be a JSON object such as {\"by\": \"alice\"}")),
        }
    };
    let by = input["by"].as_str().unwrap_or("admin");
    match decide_approval(shared, id, approve, by, input["note"].as_str()).await {
        Ok(approval) => Ok(json_response(StatusCode::OK, &json!(approval))),
        Err(Undecided::Unknown) => Ok(not_found()),
        Err(Undecided::NotPending(e)) => Ok(json_response(
            StatusCode::CONFLICT,
            &json!({"error": e, "approval": shared.oversight.approvals.get(id)}),
        )),
        Err(Undecided::Failed) => {
            Err(Failure { status: StatusCode::INTERNAL_SERVER_ERROR, message: "internal error" })
        }
    }
}

/// Autonomy overall and by category (only categories with actions): what
/// `GET /admin/oversight` answers and the console shows.
pub(super) fn autonomy(shared: &Shared) -> (Counts, Vec<(&'static str, Counts)>) {
    let (overall, by) = shared.oversight.counts();
    (overall, by.into_iter().filter(|(_, c)| c.total + c.human_approved > 0).collect())
}

fn summary(shared: &Shared) -> http::Response<Body> {
    let o = &shared.oversight;
    let (overall, by) = autonomy(shared);
    let rate =
        |c: &Counts| c.autonomy_bp().map(|bp| format!("{}.{:02}", bp / 10_000, bp % 10_000 / 100));
    let categories: serde_json::Map<String, Value> = by
        .iter()
        .map(|(name, c)| ((*name).to_string(), json!({"counts": c, "autonomy": rate(c)})))
        .collect();
    let reasons: Vec<Value> = o
        .top_reasons(10)
        .into_iter()
        .map(|(reason, count)| json!({"reason": reason, "count": count}))
        .collect();
    let breakers: Vec<Value> = o
        .breakers()
        .into_iter()
        .map(|(upstream, state, failures)| {
            json!({"upstream": upstream, "state": state, "consecutive_failures": failures})
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "autonomy": {"overall": {"counts": overall, "autonomy": rate(&overall)}, "by_category": categories},
            "top_approval_reasons": reasons,
            "pending_approvals": o.approvals.pending(),
            "breakers": breakers,
        }),
    )
}
