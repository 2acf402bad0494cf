//! The usage event: a finished request as a mesh's Envoy filter sends it to the collector
//! (`POST /v1/usage/events`, one JSON object per line), and the collector's checks before it
//! becomes a [`UsageRecord`].

use serde::{Deserialize, Serialize};

use super::{Decision, End, PriceSource, UsageRecord, UsageSource};
use crate::money::Money;
use crate::pricing::Cost;
use crate::time::UnixMillis;
use crate::usage::Usage;

/// How long event ids are remembered by the collector (the ledger's replay window): an older
/// event is refused rather than risk a second charge.
pub const DEDUP_WINDOW_MS: u64 = 35 * 86_400_000;
/// Events from further in the future than this are refused (a sender with a broken clock).
pub const MAX_SKEW_MS: u64 = 86_400_000;
/// Longest event id accepted.
pub const MAX_ID: usize = 128;
/// Longest attribution or label value accepted.
pub const MAX_VALUE: usize = 256;

/// A finished request, as sent. The filter fills every field; a collector also takes events
/// that leave out what is optional here. Unknown fields are ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// Unique per event: a collector deduplicates a resent batch by it.
    #[serde(default)]
    pub event_id: String,
    /// `ts_ms` as text; checked against it when given.
    #[serde(default)]
    pub ts: Option<String>,
    /// The event time in Unix milliseconds (the period the cost lands in).
    pub ts_ms: u64,
    /// The request's id; the event id when absent or empty.
    #[serde(default)]
    pub request_id: String,
    #[serde(default)]
    pub agent: String,
    #[serde(default)]
    pub cost_center: String,
    #[serde(default)]
    pub project: String,
    #[serde(default)]
    pub business_unit: Option<String>,
    /// The route name; `mesh` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default)]
    pub provider: String,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub tool: Option<String>,
    pub tokens: Usage,
    /// By bucket; the buckets add up to `total` exactly.
    pub cost: Cost,
    /// Equals `cost.total` when given.
    #[serde(default)]
    pub cost_usd: Option<Money>,
    /// Equals `cost.total` in nano-USD when given.
    #[serde(default)]
    pub cost_nano_usd: Option<i64>,
    /// Must be `allow`: only admitted requests are billed.
    pub decision: Decision,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub clause: String,
    #[serde(default)]
    pub policy_version: String,
    /// An HTTP status (100-599).
    pub status: u32,
    #[serde(default)]
    pub latency_ms: u64,
    pub usage_source: UsageSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_source: Option<PriceSource>,
    pub end: End,
    /// Who metered it (`envoy`); `mesh` when absent.
    #[serde(default)]
    pub source: Option<String>,
}

/// Why an event is refused: the field at fault (`""` for the whole line) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub error: String,
}

impl Invalid {
    pub fn new(field: &str, error: impl Into<String>) -> Invalid {
        Invalid { field: field.to_owned(), error: error.into() }
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self.field.as_str() {
            "" => f.write_str(&self.error),
            field => write!(f, "{field}: {}", self.error),
        }
    }
}

impl UsageEvent {
    /// What a collector says about a required field that is missing.
    pub fn required(field: &str) -> &'static str {
        match field {
            "ts_ms" => "required: the event time in Unix milliseconds",
            "tokens" => "required: an object of token counts",
            "cost" => "required: the cost by bucket (decimal USD strings)",
            "cost.total" => "required: a decimal USD string such as \"0.0125\"",
            "status" => "required: an HTTP status (100-599)",
            "decision" => "required: `allow` (only admitted requests are billed)",
            "usage_source" => "required: one of reported, estimated, implausible, none",
            "end" => {
                "required: one of complete, aborted, client_gone, upstream_error, idle_timeout"
            }
            _ => "required",
        }
    }

    /// [`UsageEvent::accept`] without the note on an implausible cost.
    pub fn into_record(self, now: UnixMillis) -> Result<UsageRecord, Invalid> {
        self.accept(now).map(|(record, _)| record)
    }

    /// Checks the event as received at `now` and makes it the usage record to store. `Err` is
    /// an event that cannot be stored safely: not an event (bad id), outside the deduplication
    /// window (it could be billed twice), or not a billed request (`decision` other than
    /// `allow`). Everything else well-formed is stored, because refusing it would lose usage
    /// that was incurred:
    /// - the cost is taken as reported (the sender's rate card is what its traffic was charged
    ///   by) when its buckets add up;
    /// - a cost that does not add up (a negative bucket, buckets that miss the total, a
    ///   `cost_usd` or `cost_nano_usd` that contradicts it: an overflowing price, a bug) is
    ///   stored as implausible (`usage_source: implausible`) at the largest amount the event
    ///   claims, a negative one counting as zero, without buckets; the second value names why;
    /// - attribution left empty is stored empty, as the sidecar records an attribute a request
    ///   did not carry, and status `0` means no response head arrived.
    ///
    /// A mesh record carries no budget ids (the sender enforces its own budgets).
    pub fn accept(self, now: UnixMillis) -> Result<(UsageRecord, Option<Invalid>), Invalid> {
        let id = text("event_id", self.event_id, MAX_ID)?;
        if id.is_empty() {
            return Err(Invalid::new("event_id", "required: a non-empty string"));
        }
        if !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Invalid::new("event_id", "must be printable ASCII without spaces"));
        }
        if self.ts_ms < now.0.saturating_sub(DEDUP_WINDOW_MS) {
            return Err(Invalid::new("ts_ms", "older than the 35-day deduplication window"));
        }
        if self.ts_ms > now.0.saturating_add(MAX_SKEW_MS) {
            return Err(Invalid::new("ts_ms", "more than a day in the future"));
        }
        let ts = UnixMillis(self.ts_ms).to_string();
        if let Some(given) = &self.ts {
            if *given != ts {
                return Err(Invalid::new("ts", format!("does not match ts_ms ({ts})")));
            }
        }
        let status = u16::try_from(self.status)
            .ok()
            .filter(|s| *s == 0 || (100..=599).contains(s))
            .ok_or_else(|| {
                Invalid::new("status", "an HTTP status (100-599), or 0 for no response")
            })?;
        if self.decision != Decision::Allow {
            return Err(Invalid::new(
                "decision",
                "must be `allow` (only admitted requests are billed)",
            ));
        }
        let (cost, total, usage_source, implausible) =
            match check_cost(&self.cost, self.cost_usd, self.cost_nano_usd) {
                Ok(()) => (Some(self.cost), self.cost.total, self.usage_source, None),
                Err(why) => {
                    let claimed = claimed_total(&self.cost, self.cost_usd, self.cost_nano_usd);
                    (None, claimed, UsageSource::Implausible, Some(why))
                }
            };
        let record = UsageRecord {
            ts,
            reserved_at_ms: self.ts_ms,
            request_id: optional("request_id", Some(self.request_id).filter(|r| !r.is_empty()))?
                .unwrap_or_else(|| id.clone()),
            reservation_id: id.clone(),
            agent: text("agent", self.agent, MAX_VALUE)?,
            cost_center: text("cost_center", self.cost_center, MAX_VALUE)?,
            project: text("project", self.project, MAX_VALUE)?,
            business_unit: optional("business_unit", self.business_unit)?,
            route: optional("route", self.route)?.unwrap_or_else(|| "mesh".to_owned()),
            provider: text("provider", self.provider, MAX_VALUE)?,
            model: optional("model", self.model)?,
            tool: optional("tool", self.tool)?,
            tokens: self.tokens,
            cost_usd: total,
            cost_nano_usd: total.nanos(),
            cost,
            decision: Decision::Allow,
            reason: text("reason", self.reason, MAX_VALUE)?,
            clause: text("clause", self.clause, MAX_VALUE)?,
            policy_version: text("policy_version", self.policy_version, MAX_VALUE)?,
            budgets: Vec::new(),
            status,
            latency_ms: self.latency_ms,
            usage_source,
            price_source: self.price_source,
            end: self.end,
            source: Some(optional("source", self.source)?.unwrap_or_else(|| "mesh".to_owned())),
            source_event_id: Some(id),
        };
        Ok((record, implausible))
    }
}

/// The largest amount an event with an inconsistent cost claims (its total, the sum of its
/// buckets, `cost_usd`, `cost_nano_usd`), negative amounts counting as zero: an implausible
/// cost is never billed below what the sender said, and never credited.
fn claimed_total(cost: &Cost, usd: Option<Money>, nanos: Option<i64>) -> Money {
    let buckets = [
        cost.input,
        cost.cached_input,
        cost.cache_write,
        cost.output,
        cost.reasoning,
        cost.per_call,
    ];
    let sum = buckets.iter().fold(Money::ZERO, |sum, m| sum + (*m).max(Money::ZERO));
    [Some(cost.total), Some(sum), usd, nanos.map(Money::from_nanos)]
        .into_iter()
        .flatten()
        .fold(Money::ZERO, Money::max)
}

/// A string of at most `max` bytes (empty when the request did not carry it).
fn text(field: &str, value: String, max: usize) -> Result<String, Invalid> {
    match value.len() {
        n if n > max => Err(Invalid::new(field, format!("longer than {max} bytes"))),
        _ => Ok(value),
    }
}

/// An optional string of at most [`MAX_VALUE`] bytes.
fn optional(field: &str, value: Option<String>) -> Result<Option<String>, Invalid> {
    match value {
        Some(s) if s.len() > MAX_VALUE => {
            Err(Invalid::new(field, format!("longer than {MAX_VALUE} bytes")))
        }
        value => Ok(value),
    }
}

/// No bucket negative, the buckets adding up to `total`, which equals `cost_usd` and
/// `cost_nano_usd` when those are given.
fn check_cost(cost: &Cost, usd: Option<Money>, nanos: Option<i64>) -> Result<(), Invalid> {
    let buckets = [
        ("cost.input", cost.input),
        ("cost.cached_input", cost.cached_input),
        ("cost.cache_write", cost.cache_write),
        ("cost.output", cost.output),
        ("cost.reasoning", cost.reasoning),
        ("cost.per_call", cost.per_call),
        ("cost.total", cost.total),
    ];
    if let Some((field, _)) = buckets.iter().find(|(_, m)| m.is_negative()) {
        return Err(Invalid::new(field, "must not be negative"));
    }
    let sum: i128 = buckets[..6].iter().map(|(_, m)| i128::from(m.nanos())).sum();
    if sum != i128::from(cost.total.nanos()) {
        return Err(Invalid::new(
            "cost.total",
            format!("{} is not the sum of the buckets ({sum} nano-USD)", cost.total),
        ));
    }
    if usd.is_some_and(|usd| usd != cost.total) {
        return Err(Invalid::new(
            "cost_usd",
            format!("does not equal cost.total ({})", cost.total),
        ));
    }
    if nanos.is_some_and(|n| n != cost.total.nanos()) {
        return Err(Invalid::new(
            "cost_nano_usd",
            format!("does not equal cost.total ({} nano-USD)", cost.total.nanos()),
        ));
    }
    Ok(())
}
