//! Usage events from elsewhere (the Envoy filter in a mesh) into the ledger, so that invoices
//! and the chargeback export cover traffic that never passed through this proxy.
//!
//! `POST /v1/usage/events` on the admin listener (bearer token, like the admin API) takes NDJSON,
//! one usage event per line, as the filter's `collector` sends it. Each line is checked on its
//! own and answered on its own (`results`, one per line, by line number and `event_id`), so a
//! sender accounts for every event rather than for the batch. Every well-formed event is
//! written to the ledger as a `usage` record: one whose cost does not add up is written as
//! implausible rather than refused (see [`UsageEvent::accept`]), because refusing it would lose
//! usage that was incurred. Only a line that cannot be stored safely is refused (not an event,
//! no usable id, outside the deduplication window, not an `allow`), named by line and field,
//! never losing the good ones; the answer is then `422`. Events are
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

use tollgate_core::record::{Entry, Invalid, Stored, UsageEvent, UsageRecord};
use tollgate_core::time::UnixMillis;

use crate::deny::full;
use crate::ledger::Ledger;
use crate::upstream::Body;

/// How long event ids are remembered: the ledger's replay window.
pub use tollgate_core::record::DEDUP_WINDOW_MS;
/// Most errors listed in one answer.
const MAX_ERRORS: usize = 100;
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

/// What became of one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Written to the ledger.
    Accepted,
    /// Already written (resent): not written again.
    Duplicate,
    /// Not written; sending it again as it is cannot help.
    Refused,
    /// Not usage (a sidecar's exported `reserve` record): nothing to write, nothing to resend.
    Ignored,
}

/// The answer for one line.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct LineResult {
    /// 1-based line number in the request body.
    pub line: usize,
    /// The line's `event_id`, when it has a readable one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    pub result: Verdict,
    /// Why it was refused, or why it was written as implausible.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Written with `usage_source: implausible` (its cost did not add up).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub implausible: bool,
}

/// The outcome of one batch.
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: usize,
    /// Of the accepted, those written as implausible.
    #[serde(skip_serializing_if = "is_zero")]
    pub implausible: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<LineError>,
    /// One per non-blank line, in order.
    pub results: Vec<LineResult>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl Ingest {
    /// Remembers the mesh event ids of the ledger's replayed records.
    pub fn from_records(records: &[Stored]) -> Ingest {
        let mut seen = Seen::default();
        for r in records.iter().filter_map(|s| s.entry.usage()) {
            if let Some(id) = &r.source_event_id {
                seen.ids.insert(id.clone(), r.reserved_at_ms);
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
            let event_id = event_id_of(line);
            match parse(line, now) {
                Ok(None) => outcome.results.push(LineResult {
                    line: i + 1,
                    event_id,
                    result: Verdict::Ignored,
                    field: None,
                    error: None,
                    implausible: false,
                }),
                Ok(Some((record, note))) => {
                    if let Some(why) = &note {
                        tracing::warn!(
                            line = i + 1,
                            event_id = ?event_id,
                            why = %why,
                            "usage event with an impossible cost written as implausible"
                        );
                    }
                    let (field, error) = note.map(|n| (n.field, n.error)).unzip();
                    outcome.results.push(LineResult {
                        line: i + 1,
                        event_id,
                        result: Verdict::Accepted,
                        implausible: field.is_some(),
                        field,
                        error,
                    });
                    valid.push((outcome.results.len() - 1, record));
                }
                Err(Invalid { field, error }) => {
                    outcome.rejected += 1;
                    outcome.results.push(LineResult {
                        line: i + 1,
                        event_id,
                        result: Verdict::Refused,
                        field: Some(field.clone()),
                        error: Some(error.clone()),
                        implausible: false,
                    });
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
        for (at, record) in valid {
            let id = record.source_event_id.clone().unwrap_or_default();
            if seen.ids.contains_key(&id) {
                outcome.duplicates += 1;
                outcome.results[at].result = Verdict::Duplicate;
                continue;
            }
            seen.ids.insert(id, record.reserved_at_ms);
            outcome.accepted += 1;
            if outcome.results[at].implausible {
                outcome.implausible += 1;
            }
            append(Entry::Usage(Box::new(record)));
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

/// `POST /v1/usage/events` (already authorized): `200` when every line was taken (new,
/// duplicate or implausible), `422` when some lines were refused (the others are taken); the
/// body answers each line (`results`), `413` over
/// `limits.max_body_bytes`, `503` while the ledger cannot be written (or the records are not
/// synced within 5 s). Answers after the records are written and synced.
pub async fn handle(
    ingest: &Ingest,
    ledger: &Ledger,
    limit: usize,
    req: Request<Incoming>,
) -> Response<Body> {
    if !ledger.is_healthy() {
        let mut r = answer(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "the ledger cannot be written right now; retry later"}),
        );
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
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
    let now = crate::clock::now();
    let outcome = ingest.take(&body, now, |entry| ledger.append(entry));
    // Duplicates wait too: the batch they duplicate may still be on its way to the disk.
    if outcome.accepted + outcome.duplicates > 0
        && tokio::time::timeout(FLUSH_WAIT, ledger.flush()).await.is_err()
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

/// One event line → the usage record to store, or the field at fault: the line is read as the
/// core's [`UsageEvent`] (a value of the wrong type, a missing field or an unknown code is named
/// by its path, such as `tokens.output`), then checked by [`UsageEvent::into_record`].
///
/// A line with a `type` is a record a sidecar exported from its ledger (`chargeback.export`):
/// a `usage` record is taken as it is (its `event_id` becomes `source_event_id`, `source` is
/// `sidecar` unless it came from further away), a `reserve` record is ignored (`Ok(None)`).
#[allow(clippy::type_complexity)]
fn parse(line: &[u8], now: UnixMillis) -> Result<Option<(UsageRecord, Option<Invalid>)>, Invalid> {
    if line.trim_ascii_start().first() != Some(&b'{') {
        // A struct would also read from an array: refuse anything but an object first.
        return Err(match serde_json::from_slice::<serde::de::IgnoredAny>(line) {
            Ok(_) => Invalid::new("", "not a JSON object"),
            Err(e) => Invalid::new("", format!("not JSON: {e}")),
        });
    }
    match record_type(line).as_deref() {
        None => {}
        Some("usage") => return exported(line).map(|r| Some((r, None))),
        Some("reserve") => return Ok(None),
        Some(other) => {
            return Err(Invalid::new("type", format!("`{other}` records are not usage")));
        }
    }
    let mut de = serde_json::Deserializer::from_slice(line);
    let event: UsageEvent = serde_path_to_error::deserialize(&mut de).map_err(read_error)?;
    de.end().map_err(|e| Invalid::new("", format!("not JSON: {e}")))?;
    event.accept(now).map(Some)
}

/// The `type` of an exported ledger record, `None` for a mesh usage event.
fn record_type(line: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Kind {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    serde_json::from_slice::<Kind>(line).ok()?.kind
}

/// A sidecar's exported `usage` record, as its ledger wrote it (its `event_id` beside it).
fn exported(line: &[u8]) -> Result<UsageRecord, Invalid> {
    let event_id = event_id_of(line).unwrap_or_default();
    let mut de = serde_json::Deserializer::from_slice(line);
    let mut record: UsageRecord = serde_path_to_error::deserialize(&mut de).map_err(read_error)?;
    if event_id.is_empty() || event_id.len() > 128 {
        return Err(Invalid::new("event_id", "required: a non-empty string of at most 128 bytes"));
    }
    if record.cost_usd != record.cost_total() {
        return Err(Invalid::new("cost_usd", "does not match cost_nano_usd"));
    }
    record.source.get_or_insert_with(|| "sidecar".into());
    record.source_event_id = Some(event_id);
    Ok(record)
}

/// The `event_id` of a line, if it is an object with a string one (for the per-line answer).
fn event_id_of(line: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id {
        event_id: Option<String>,
    }
    serde_json::from_slice::<Id>(line).ok()?.event_id.filter(|id| !id.is_empty())
}

/// A line that does not read as an event: the field at fault (its path, `""` for the line).
fn read_error(e: serde_path_to_error::Error<serde_json::Error>) -> Invalid {
    let path = e.path().to_string();
    let path = if path == "." { String::new() } else { path };
    let inner = e.into_inner();
    if inner.is_syntax() || inner.is_eof() {
        return Invalid::new("", format!("not JSON: {inner}"));
    }
    // serde_json appends the position; the line number is reported apart.
    let message = inner.to_string();
    let message = match message.rfind(" at line ") {
        Some(at) => &message[..at],
        None => message.as_str(),
    };
    if let Some(missing) = message.strip_prefix("missing field `").and_then(|m| m.strip_suffix('`'))
    {
        let field = if path.is_empty() { missing.to_owned() } else { format!("{path}.{missing}") };
        return Invalid::new(&field, UsageEvent::required(&field));
    }
    if path.is_empty() {
        return Invalid::new("", format!("not a JSON object ({message})"));
    }
    Invalid::new(&path, message)
}

#[cfg(test)]
mod tests;
