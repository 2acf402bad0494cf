//! The collector's approval service for Envoy filters: `POST /v1/fleet/approvals` raises an
//! approval (or finds the same one pending) and `POST /v1/fleet/approvals/redeem` uses a granted
//! one, with the same store, state machine, audit records and alerts as a sidecar's own
//! approvals ([`crate::admission::raise`], [`crate::admission::use_granted`]). With
//! `store.redis` the approvals are the fleet's: raised through an Envoy, listed and granted
//! through any proxy's admin API or console, used once.
//!
//! Bodies and answers are [`tollgate_core::approval::remote`]'s types, as JSON.

use std::sync::Arc;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use tollgate_core::approval::remote::{Raise, Redeem, RemoteAnswer};

use crate::clock::now;
use crate::state::Shared;

/// The largest request body taken.
const MAX_BODY: usize = 64 * 1024;

/// Reads the body as `T`, or the error to answer (400 naming what is wrong).
async fn body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, (StatusCode, String)> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| (StatusCode::PAYLOAD_TOO_LARGE, format!("at most {MAX_BODY} bytes")))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))
}

fn bounded(field: &str, value: &str, max: usize) -> Result<(), (StatusCode, String)> {
    if value.len() > max || value.chars().any(char::is_control) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("`{field}` must be at most {max} printable characters"),
        ));
    }
    Ok(())
}

/// `POST /v1/fleet/approvals`: the approval's id and the message for the caller (`ok`), or why
/// none could be recorded.
pub async fn raise(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
) -> Result<RemoteAnswer, (StatusCode, String)> {
    let r: Raise = body(req).await?;
    for (field, value, max) in [
        ("request_id", &r.request_id, 256),
        ("agent", &r.agent, 256),
        ("cost_center", &r.cost_center, 256),
        ("project", &r.project, 256),
        ("route", &r.route, 256),
        ("action", &r.action, 256),
        ("digest", &r.digest, 64),
        ("reason", &r.reason, 128),
        ("why", &r.why, 4096),
        ("risk", &r.risk, 4096),
        ("risk_band", &r.risk_band, 16),
    ] {
        bounded(field, value, max)?;
    }
    let (why, risk) = (r.why.clone(), r.risk.clone());
    Ok(match crate::admission::raise(shared, r, now()).await {
        Ok(approval) => RemoteAnswer {
            ok: true,
            message: crate::admission::approval_message(&why, &risk, &approval),
            id: Some(approval.id),
            class: None,
            code: None,
        },
        Err(d) => RemoteAnswer::from_denial(&d),
    })
}

/// `POST /v1/fleet/approvals/redeem`: `ok` when the approval was used for this retry, or the
/// refusal to give.
pub async fn redeem(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
) -> Result<RemoteAnswer, (StatusCode, String)> {
    let r: Redeem = body(req).await?;
    for (field, value, max) in [
        ("id", &r.id, 256),
        ("agent", &r.agent, 256),
        ("digest", &r.digest, 64),
        ("request_id", &r.request_id, 256),
    ] {
        bounded(field, value, max)?;
    }
    let used =
        crate::admission::use_granted(shared, &r.id, &r.agent, &r.digest, &r.request_id, now())
            .await;
    Ok(match used {
        Ok(approval) => RemoteAnswer {
            ok: true,
            id: Some(approval.id),
            class: None,
            code: None,
            message: "approval used".into(),
        },
        Err(d) => RemoteAnswer::from_denial(&d),
    })
}
