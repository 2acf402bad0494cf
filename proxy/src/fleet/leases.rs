//! The collector's lease service for Envoy filters: `POST /v1/fleet/leases`.
//!
//! proxy-wasm cannot speak RESP, so a filter in fleet mode exchanges its leases through the
//! collector, which runs the same lease script on the same Redis keys as the sidecars (see
//! [`FleetStore::exchange`]). A filter VM is one lease holder; its holder name is prefixed with
//! `envoy/` in Redis, so it can never write a sidecar's lease. The filter sends at most one
//! exchange per counter at a time (the lease is written absolutely).
//!
//! Request: `{"holder": "<name>", "syncs": [{"counter": "<base>", "seq": .., "spent": ..,
//! "inuse": .., "keep": .., "want": .., "wmax": .., "limit": .., "expires_at": .., "need": ..}]}`.
//! Answer (200): `{"answers": [{"counter": .., "lease": .., "granted": .., "committed": ..,
//! "perm": .., "lapsed": .., "ttl_ms": ..} | {"counter": .., "error": ".."}]}`, in the order
//! asked (`ttl_ms`: the store's lease TTL; the filter renews at a third of it).

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tollgate_core::budget::lease::{SyncArgs, MAX_LIMIT};

use super::FleetStore;

/// Most exchanges in one request.
pub const MAX_SYNCS: usize = 256;

/// The largest request body taken.
const MAX_BODY: usize = 256 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    holder: String,
    syncs: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    counter: String,
    #[serde(flatten)]
    args: SyncArgs,
}

/// Runs a filter's lease exchanges. `Err((status, message))` for a request that is refused as a
/// whole; an exchange that fails (Redis does not answer) is answered with its error.
pub async fn serve(
    fleet: Option<&FleetStore>,
    req: Request<Incoming>,
) -> Result<Value, (StatusCode, String)> {
    let Some(fleet) = fleet else {
        return Err((
            StatusCode::CONFLICT,
            "this collector has no `store.redis`: fleet leases need the fleet store".into(),
        ));
    };
    let body = super::read_body(req, MAX_BODY, "a lease batch").await?;
    let batch = parse(&body).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    let holder = format!("envoy/{}", batch.holder);
    let ttl_ms = fleet.lease_ttl_ms();
    let mut runs = tokio::task::JoinSet::new();
    for (i, item) in batch.syncs.into_iter().enumerate() {
        let (fleet, holder, ttl_ms) = (fleet.clone(), holder.clone(), ttl_ms);
        runs.spawn(async move {
            let answer = match fleet.exchange(&holder, &item.counter, &item.args).await {
                Ok(a) => json!({
                    "counter": item.counter,
                    "lease": a.lease,
                    "granted": a.granted,
                    "committed": a.committed,
                    "perm": a.perm,
                    "lapsed": a.lapsed,
                    "ttl_ms": ttl_ms,
                }),
                Err(e) => json!({"counter": item.counter, "error": e.to_string()}),
            };
            (i, answer)
        });
    }
    let mut answers = Vec::new();
    while let Some(done) = runs.join_next().await {
        if let Ok(done) = done {
            answers.push(done);
        }
    }
    answers.sort_by_key(|(i, _)| *i);
    Ok(json!({"answers": answers.into_iter().map(|(_, a)| a).collect::<Vec<_>>()}))
}

/// The batch, checked: a clear error naming the field for anything a lease script must not see.
fn parse(body: &Bytes) -> Result<Batch, String> {
    let batch: Batch =
        serde_json::from_slice(body).map_err(|e| format!("not a lease batch: {e}"))?;
    let name_ok =
        |s: &str, max: usize| !s.is_empty() && s.len() <= max && s.chars().all(|c| !c.is_control());
    if !name_ok(&batch.holder, 128) {
        return Err("`holder` must be 1 to 128 printable characters".into());
    }
    if batch.syncs.len() > MAX_SYNCS {
        return Err(format!("`syncs` has {} exchanges, at most {MAX_SYNCS}", batch.syncs.len()));
    }
    for (i, item) in batch.syncs.iter().enumerate() {
        if !name_ok(&item.counter, 512) {
            return Err(format!("`syncs[{i}].counter` must be 1 to 512 printable characters"));
        }
        let a = &item.args;
        for (field, v) in [
            ("spent", a.spent),
            ("inuse", a.inuse),
            ("keep", a.keep),
            ("want", a.want),
            ("wmax", a.wmax),
            ("need", a.need),
            ("limit", a.limit),
        ] {
            if !(0..=MAX_LIMIT).contains(&v) {
                return Err(format!("`syncs[{i}].{field}` is {v}, outside 0..={MAX_LIMIT}"));
            }
        }
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_checked_naming_the_field() {
        let ok = br#"{"holder":"h1","syncs":[{"counter":"2:cc/1:a/2026-12","seq":1,"spent":5,
            "inuse":0,"keep":0,"want":10,"wmax":10,"limit":100,"expires_at":1,"need":10}]}"#;
        let b = parse(&Bytes::from_static(ok)).unwrap();
        assert_eq!(b.syncs[0].args.want, 10);
        let negative = br#"{"holder":"h1","syncs":[{"counter":"c","seq":1,"spent":-5,
            "inuse":0,"keep":0,"want":0,"wmax":0,"limit":100,"expires_at":1,"need":0}]}"#;
        let e = parse(&Bytes::from_static(negative)).err().unwrap();
        assert!(e.contains("syncs[0].spent"), "{e}");
        let huge = format!(
            r#"{{"holder":"h1","syncs":[{{"counter":"c","seq":1,"spent":0,"inuse":0,"keep":0,
            "want":0,"wmax":0,"limit":{},"expires_at":1,"need":0}}]}}"#,
            MAX_LIMIT + 1
        );
        assert!(parse(&Bytes::from(huge)).err().unwrap().contains("syncs[0].limit"));
        let e = parse(&Bytes::from_static(br#"{"holder":"","syncs":[]}"#)).err().unwrap();
        assert!(e.contains("holder"), "{e}");
        assert!(parse(&Bytes::from_static(b"{nope")).is_err());
    }
}
