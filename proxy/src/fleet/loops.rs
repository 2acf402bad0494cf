//! The collector's loop stream for Envoy filters: `POST /v1/fleet/loops`.
//!
//! A filter VM in fleet mode counts identical tool calls as a sidecar does
//! ([`tollgate_core::guardrails::loops::Merged`]): from its own calls and the ones the other
//! holders appended to the fleet's stream. It cannot reach Redis, so every sync interval it
//! sends its new calls here; the collector runs the sidecars' stream script for it (holder
//! `envoy/<name>`) and answers what the others appended since the VM's last read.
//!
//! Request: `{"holder": "<name>", "since": "<stream id or empty>", "window_ms": ..,
//! "calls": ["<digest, 16 hex digits>:<unix ms>", ...]}`. Answer (200):
//! `{"since": "<stream id>", "calls": ["<digest>:<unix ms>:<holder>", ...]}`.

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde_json::{json, Value};
use tollgate_core::guardrails::loops::merged::{parse_sent, Sync, UNSENT_MAX};

use super::FleetStore;

/// The largest request body taken (a VM's calls of one sync interval; more wait for the next).
const MAX_BODY: usize = 1024 * 1024;

/// The longest loop window taken (a day).
const MAX_WINDOW_MS: u64 = 86_400_000;

/// Appends a filter VM's calls to the fleet's loop stream and answers the others'.
pub async fn serve(
    fleet: Option<&FleetStore>,
    req: Request<Incoming>,
) -> Result<Value, (StatusCode, String)> {
    let Some(fleet) = fleet else {
        return Err((
            StatusCode::CONFLICT,
            "this collector has no `store.redis`: the fleet's loop counts need the fleet store"
                .into(),
        ));
    };
    let body = super::read_body(req, MAX_BODY, "a loop sync").await?;
    let sync = parse(&body).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    let holder = format!("envoy/{}", sync.holder);
    match fleet.append_calls(&holder, &sync.since, sync.window_ms, &sync.calls).await {
        Ok((since, calls)) => Ok(json!({"since": since, "calls": calls})),
        Err(e) => Err((StatusCode::SERVICE_UNAVAILABLE, format!("the fleet store: {e}"))),
    }
}

/// The sync, checked: a clear error naming the field for anything the script must not see.
fn parse(body: &[u8]) -> Result<Sync, String> {
    let sync: Sync = serde_json::from_slice(body).map_err(|e| format!("not a loop sync: {e}"))?;
    let h = &sync.holder;
    if h.is_empty() || h.len() > 128 || h.chars().any(char::is_control) {
        return Err("`holder` must be 1 to 128 printable characters".into());
    }
    let id = |c: char| c.is_ascii_digit() || c == '-';
    if sync.since.len() > 64 || !sync.since.chars().all(id) {
        return Err("`since` must be a stream id (digits and `-`) or empty".into());
    }
    if !(1..=MAX_WINDOW_MS).contains(&sync.window_ms) {
        return Err(format!("`window_ms` is {}, outside 1..={MAX_WINDOW_MS}", sync.window_ms));
    }
    if sync.calls.len() > UNSENT_MAX {
        return Err(format!("`calls` has {} calls, at most {UNSENT_MAX}", sync.calls.len()));
    }
    if let Some(i) = sync.calls.iter().position(|c| parse_sent(c).is_none()) {
        return Err(format!("`calls[{i}]` is not `<digest, 16 hex digits>:<unix ms>`"));
    }
    Ok(sync)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_is_checked_field_by_field() {
        let call = format!("{:016x}:1000", 7);
        let ok = json!({"holder": "vm-1", "since": "", "window_ms": 60000, "calls": [call]});
        assert_eq!(parse(ok.to_string().as_bytes()).unwrap().calls.len(), 1);
        for (bad, field) in [
            (json!({"holder": "", "since": "", "window_ms": 1, "calls": []}), "`holder`"),
            (json!({"holder": "h", "since": "1-0; x", "window_ms": 1, "calls": []}), "`since`"),
            (json!({"holder": "h", "since": "", "window_ms": 0, "calls": []}), "`window_ms`"),
            (json!({"holder": "h", "since": "", "window_ms": 1, "calls": ["7:1"]}), "`calls[0]`"),
            (json!({"holder": "h", "since": "", "window_ms": 1, "calls": [], "x": 1}), "unknown"),
        ] {
            let e = parse(bad.to_string().as_bytes()).unwrap_err();
            assert!(e.contains(field), "{e} should name {field}");
        }
    }
}
