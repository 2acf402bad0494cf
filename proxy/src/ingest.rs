//! Usage events from elsewhere (the Envoy filter in a mesh) into the ledger, so that invoices
//! and the chargeback export cover traffic that never passed through this proxy.
//!
//! `POST /v1/usage/events` on the admin listener (bearer token, like the admin API) takes NDJSON,
//! one usage event per line, as the filter's `collector` sends it. Each line is checked on its
//! own: a good line is written to the ledger as a `usage` record, a bad one is reported by line
//! number and field and never loses the good ones (the answer is then `422` with both counts, so
//! the sender learns that a line will never be accepted and does not resend it). Events are
//! idempotent by `event_id`: a sender that resends a batch after a timeout gets the events it
//! already delivered counted as `duplicates`, never billed twice. Event ids are remembered for
//! the ledger's replay window (35 days), rebuilt from the ledger on start; an event older than
//! that is refused rather than risk a second charge.
//!
//! The answer is sent after the records are written and synced: a `200` means durable. While the
//! ledger cannot be written the endpoint answers `503` before taking anything, so the sender
//! keeps its events and retries.
//!
//! The filter priced each event with its own rate card; that cost is taken as reported (the
//! buckets must add up to the total exactly), because the filter's configuration is what the
//! mesh was charged by. Mesh records carry no budget ids: the filter enforces its budgets in
//! Envoy, so a restart does not charge them to this proxy's budgets as well.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::{json, Value};

use tollgate_core::money::Money;
use tollgate_core::pricing::{Cost, PriceSource};
use tollgate_core::time::UnixMillis;
use tollgate_core::usage::Usage;

use crate::app::Shared;
use crate::deny::full;
use crate::ledger::{Entry, MeshUsage, Record};
use crate::upstream::Body;

/// How long event ids are remembered: the ledger's replay window.
pub const DEDUP_WINDOW_MS: u64 = 35 * 86_400_000;
/// Events from further in the future than this are refused (a sender with a broken clock).
const MAX_SKEW_MS: u64 = 86_400_000;
/// Most errors listed in one answer.
const MAX_ERRORS: usize = 100;
/// Longest event id accepted.
const MAX_ID: usize = 128;
/// Longest attribution or label value accepted.
const MAX_VALUE: usize = 256;
/// Longest wait for the records of a batch to be written and synced before answering 503.
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The event ids already written (and when they happened), shared by all requests.
#[derive(Default)]
pub struct Ingest {
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    ids: HashMap<String, u64>,
    /// Prune ids older than the window when this time passes.
    next_prune_ms: u64,
}

/// One rejected line.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct LineError {
    /// 1-based line number in the request body.
    pub line: usize,
    /// The field at fault (`""` when the line is not a JSON object).
    pub field: String,
    pub error: String,
}

/// The outcome of one batch.
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<LineError>,
}

impl Ingest {
    /// Remembers the mesh event ids of the ledger's replayed records.
    pub fn from_records(records: &[Value]) -> Ingest {
        let mut seen = Seen::default();
        for r in records {
            if let Some(id) = r["source_event_id"].as_str() {
                seen.ids.insert(id.to_owned(), r["reserved_at_ms"].as_u64().unwrap_or(0));
            }
        }
        Ingest { seen: Mutex::new(seen) }
    }

    /// Validates every line of `body` and hands the new, valid events to `append` (as ledger
    /// entries), in order. Duplicates (already written, or repeated in this batch) are counted
    /// and skipped.
    pub fn take(&self, body: &[u8], now: UnixMillis, mut append: impl FnMut(Entry)) -> Outcome {
        let mut outcome = Outcome::default();
        let mut valid = Vec::new();
        for (i, line) in body.split(|&b| b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match parse(line, now) {
                Ok(event) => valid.push(event),
                Err((field, error)) => {
                    outcome.rejected += 1;
                    if outcome.errors.len() < MAX_ERRORS {
                        outcome.errors.push(LineError { line: i + 1, field, error });
                    }
                }
            }
        }
        // Check and remember under one lock, so a batch resent while the first is still being
        // written cannot slip in twice.
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.prune(now.0);
        for event in valid {
            if seen.ids.contains_key(&event.source_event_id) {
                outcome.duplicates += 1;
                continue;
            }
            seen.ids.insert(event.source_event_id.clone(), event.record.reserved_at_ms);
            outcome.accepted += 1;
            append(Entry::Mesh(Box::new(event)));
        }
        outcome
    }
}

impl Seen {
    fn prune(&mut self, now_ms: u64) {
        if now_ms < self.next_prune_ms {
            return;
        }
        let oldest = now_ms.saturating_sub(DEDUP_WINDOW_MS);
        self.ids.retain(|_, at| *at >= oldest);
        self.next_prune_ms = now_ms + 3_600_000;
    }
}

/// `POST /v1/usage/events` (already authorized): `200` when every line was taken (new or
/// duplicate), `422` when some lines were refused (the others are taken), `413` over
/// `limits.max_body_bytes`, `503` while the ledger cannot be written (or the records are not
/// synced within 5 s). Answers after the records are written and synced.
pub async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    if !shared.ledger.is_healthy() {
        let mut r = answer(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "the ledger cannot be written right now; retry later"}),
        );
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    let limit = shared.config.limits.max_body_bytes;
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                &json!({"error": format!("the batch is over {limit} bytes (limits.max_body_bytes); send smaller batches")}),
            )
        }
        Err(_) => {
            return answer(StatusCode::BAD_REQUEST, &json!({"error": "the request body broke off"}))
        }
    };
    let now = crate::pipeline::now();
    let outcome = shared.ingest.take(&body, now, |entry| shared.ledger.append(entry));
    // Duplicates wait too: the batch they duplicate may still be on its way to the disk.
    if outcome.accepted + outcome.duplicates > 0
        && tokio::time::timeout(FLUSH_WAIT, shared.ledger.flush()).await.is_err()
    {
        // Queued, not yet durable (the disk stopped taking writes): the sender keeps its events
        // and sends them again; they are duplicates then, answered once they are written.
        let mut r = answer(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "the ledger cannot be written right now; retry later"}),
        );
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    if outcome.rejected > 0 {
        tracing::warn!(
            accepted = outcome.accepted,
            rejected = outcome.rejected,
            first = ?outcome.errors.first(),
            "usage events refused"
        );
    }
    let status =
        if outcome.rejected > 0 { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::OK };
    answer(status, &serde_json::to_value(&outcome).unwrap_or_default())
}

fn answer(status: StatusCode, value: &Value) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(serde_json::to_vec(value).unwrap_or_default())));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

type Invalid = (String, String);

fn invalid(field: &str, error: impl Into<String>) -> Invalid {
    (field.to_owned(), error.into())
}

/// One event line → a ledger entry, or the field at fault.
fn parse(line: &[u8], now: UnixMillis) -> Result<MeshUsage, Invalid> {
    let v: Value =
        serde_json::from_slice(line).map_err(|e| invalid("", format!("not JSON: {e}")))?;
    if !v.is_object() {
        return Err(invalid("", "not a JSON object"));
    }
    let id = text(&v, "event_id", MAX_ID)?;
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid("event_id", "must be printable ASCII without spaces"));
    }
    let ts_ms = v["ts_ms"]
        .as_u64()
        .ok_or_else(|| invalid("ts_ms", "required: the event time in Unix milliseconds"))?;
    if ts_ms < now.0.saturating_sub(DEDUP_WINDOW_MS) {
        return Err(invalid("ts_ms", "older than the 35-day deduplication window"));
    }
    if ts_ms > now.0.saturating_add(MAX_SKEW_MS) {
        return Err(invalid("ts_ms", "more than a day in the future"));
    }
    let ts = UnixMillis(ts_ms).to_string();
    if let Some(given) = v.get("ts") {
        if given.as_str() != Some(ts.as_str()) {
            return Err(invalid("ts", format!("does not match ts_ms ({ts})")));
        }
    }
    let tokens = tokens(&v["tokens"])?;
    let cost = cost(&v)?;
    let status = v["status"]
        .as_u64()
        .and_then(|s| u16::try_from(s).ok())
        .filter(|s| (100..=599).contains(s))
        .ok_or_else(|| invalid("status", "required: an HTTP status (100-599)"))?;
    if v["decision"] != "allow" {
        return Err(invalid("decision", "must be `allow` (only admitted requests are billed)"));
    }
    let usage_source =
        one_of(&v, "usage_source", &["reported", "estimated", "implausible", "none"])?;
    let price_source = match v.get("price_source") {
        None | Some(Value::Null) => None,
        Some(p) => Some(p.as_str().and_then(PriceSource::parse).ok_or_else(|| {
            invalid(
                "price_source",
                "must be one of listed, requested_model, fallback, reservation, free",
            )
        })?),
    };
    let end = one_of(
        &v,
        "end",
        &["complete", "aborted", "client_gone", "upstream_error", "idle_timeout"],
    )?;
    let record = Record {
        ts,
        reserved_at_ms: ts_ms,
        request_id: optional(&v, "request_id")?.unwrap_or_else(|| id.clone()),
        reservation_id: id.clone(),
        agent: text(&v, "agent", MAX_VALUE)?,
        cost_center: text(&v, "cost_center", MAX_VALUE)?,
        project: text(&v, "project", MAX_VALUE)?,
        business_unit: optional(&v, "business_unit")?,
        route: optional(&v, "route")?.unwrap_or_else(|| "mesh".to_owned()),
        provider: text(&v, "provider", MAX_VALUE)?,
        model: optional(&v, "model")?,
        tool: optional(&v, "tool")?,
        tokens,
        cost_usd: cost.total,
        cost_nano_usd: cost.total.nanos(),
        cost,
        decision: "allow",
        reason: text(&v, "reason", MAX_VALUE)?,
        clause: text(&v, "clause", MAX_VALUE)?,
        policy_version: text(&v, "policy_version", MAX_VALUE)?,
        budgets: Vec::new(),
        status,
        latency_ms: v["latency_ms"].as_u64().unwrap_or(0),
        usage_source,
        price_source,
        end,
    };
    let source = optional(&v, "source")?.unwrap_or_else(|| "mesh".to_owned());
    Ok(MeshUsage { record, source, source_event_id: id })
}

/// A required, non-empty string of at most `max` bytes.
fn text(v: &Value, field: &str, max: usize) -> Result<String, Invalid> {
    match v.get(field).and_then(Value::as_str) {
        Some(s) if !s.is_empty() && s.len() <= max => Ok(s.to_owned()),
        Some(s) if !s.is_empty() => Err(invalid(field, format!("longer than {max} bytes"))),
        _ => Err(invalid(field, "required: a non-empty string")),
    }
}

/// An optional string (absent or `null` → `None`).
fn optional(v: &Value, field: &str) -> Result<Option<String>, Invalid> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_VALUE => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(invalid(field, format!("longer than {MAX_VALUE} bytes"))),
        Some(_) => Err(invalid(field, "must be a string")),
    }
}

fn one_of(v: &Value, field: &str, allowed: &[&'static str]) -> Result<&'static str, Invalid> {
    let given = v.get(field).and_then(Value::as_str);
    allowed
        .iter()
        .find(|a| Some(**a) == given)
        .copied()
        .ok_or_else(|| invalid(field, format!("must be one of: {}", allowed.join(", "))))
}

fn tokens(v: &Value) -> Result<Usage, Invalid> {
    if !v.is_object() {
        return Err(invalid("tokens", "required: an object of token counts"));
    }
    let n = |kind: &str| match v.get(kind) {
        None | Some(Value::Null) => Ok(0),
        Some(n) => n
            .as_u64()
            .ok_or_else(|| invalid(&format!("tokens.{kind}"), "must be a non-negative integer")),
    };
    Ok(Usage {
        input: n("input")?,
        cached_input: n("cached_input")?,
        cache_write: n("cache_write")?,
        output: n("output")?,
        reasoning: n("reasoning")?,
    })
}

/// The cost buckets, which must add up to `total`, which must equal `cost_usd` and
/// `cost_nano_usd` when those are given.
fn cost(v: &Value) -> Result<Cost, Invalid> {
    let c = &v["cost"];
    if !c.is_object() {
        return Err(invalid("cost", "required: the cost by bucket (decimal USD strings)"));
    }
    let money = |bucket: &str| -> Result<Money, Invalid> {
        let field = format!("cost.{bucket}");
        let amount = match c.get(bucket) {
            None | Some(Value::Null) if bucket != "total" => return Ok(Money::ZERO),
            Some(Value::String(s)) => {
                Money::parse(s).map_err(|e| invalid(&field, format!("not an amount: {e}")))?
            }
            _ => return Err(invalid(&field, "required: a decimal USD string such as \"0.0125\"")),
        };
        if amount.is_negative() {
            return Err(invalid(&field, "must not be negative"));
        }
        Ok(amount)
    };
    let cost = Cost {
        input: money("input")?,
        cached_input: money("cached_input")?,
        cache_write: money("cache_write")?,
        output: money("output")?,
        reasoning: money("reasoning")?,
        per_call: money("per_call")?,
        total: money("total")?,
    };
    let sum: i128 = [
        cost.input,
        cost.cached_input,
        cost.cache_write,
        cost.output,
        cost.reasoning,
        cost.per_call,
    ]
    .iter()
    .map(|m| i128::from(m.nanos()))
    .sum();
    if sum != i128::from(cost.total.nanos()) {
        return Err(invalid(
            "cost.total",
            format!("{} is not the sum of the buckets ({sum} nano-USD)", cost.total),
        ));
    }
    if let Some(usd) = v.get("cost_usd") {
        let given = usd.as_str().and_then(|s| Money::parse(s).ok());
        if given != Some(cost.total) {
            return Err(invalid("cost_usd", format!("does not equal cost.total ({})", cost.total)));
        }
    }
    if let Some(nanos) = v.get("cost_nano_usd") {
        if nanos.as_i64() != Some(cost.total.nanos()) {
            return Err(invalid(
                "cost_nano_usd",
                format!("does not equal cost.total ({} nano-USD)", cost.total.nanos()),
            ));
        }
    }
    Ok(cost)
}

#[cfg(test)]
mod tests;
