//! The records Tollgate keeps: one schema for the usage ledger, the collector's usage events,
//! the budget rebuild, invoices and the audit log.
//!
//! A ledger line holds one [`Stored`] entry: `seq`, `event_id` and a record tagged by `type`,
//! either a [`UsageRecord`] (`"usage"`: one metered request, as recorded at its end, also for
//! the usage events a mesh sends) or a [`ReserveRecord`] (`"reserve"`: a budget reservation,
//! recorded when it is made so that it can be rebuilt after a crash). The Envoy filter sends a
//! finished request as a [`UsageEvent`]; the collector checks it ([`UsageEvent::into_record`])
//! and stores it as a usage record.
//!
//! On disk a record is either a JSON line or, in segments written since, the same record in the
//! compact encoding of [`compact`] (a sixth of the bytes); both decode to these types.
//!
//! The field names and values are the JSON the ledger has always held, so every ledger on disk
//! still reads: fields added since the first ledger (`reservation_id`, `price_source`, the cost
//! buckets, `clause`, `policy_version`, `budgets`, `seq`, `event_id`) may be absent, an unknown
//! record `type` reads as [`Entry::Other`] (and is skipped by every reader), and an unknown value
//! of a coded field is an error that names the field (`` `halted` is not an end (expected one
//! of complete, aborted, client_gone, upstream_error, idle_timeout) ``).

use serde::{Deserialize, Serialize};

use crate::money::Money;
use crate::pricing::Cost;
use crate::usage::Usage;

pub use crate::policy::Effect as Decision;
pub use crate::pricing::PriceSource;
pub use crate::usage::UsageSource;
pub use event::{Invalid, UsageEvent, DEDUP_WINDOW_MS, MAX_ID, MAX_SKEW_MS, MAX_VALUE};

pub mod compact;
mod event;

/// How a response ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// The response body reached its end.
    Complete,
    /// The stream ended early, cause unknown (the Envoy filter: client gone or upstream reset).
    Aborted,
    /// The client went away before the end.
    ClientGone,
    /// The upstream connection failed mid-body.
    UpstreamError,
    /// No data arrived within the stream idle timeout.
    IdleTimeout,
}

impl End {
    pub const ALL: [End; 5] =
        [End::Complete, End::Aborted, End::ClientGone, End::UpstreamError, End::IdleTimeout];

    pub fn as_str(self) -> &'static str {
        match self {
            End::Complete => "complete",
            End::Aborted => "aborted",
            End::ClientGone => "client_gone",
            End::UpstreamError => "upstream_error",
            End::IdleTimeout => "idle_timeout",
        }
    }
}

/// What an audit log record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// A request was decided (allowed, denied or held for approval).
    Decision,
    /// An operator approved a held action.
    ApprovalGranted,
    /// An operator denied a held action.
    ApprovalDenied,
    /// Nobody answered in time and the risk band approves.
    ApprovalExpiredApproved,
    /// Nobody answered in time and the risk band denies.
    ApprovalExpiredDenied,
    /// Approved but never used in time.
    ApprovalExpired,
    /// A retry used an approval.
    ApprovalUsed,
    /// An agent in propose-only mode proposed an action (not carried out).
    Proposal,
    /// An agent was disabled (a circuit breaker tripped).
    AgentDisabled,
    /// An operator enabled a disabled agent again.
    AgentReenabled,
}

impl AuditKind {
    pub const ALL: [AuditKind; 10] = [
        AuditKind::Decision,
        AuditKind::ApprovalGranted,
        AuditKind::ApprovalDenied,
        AuditKind::ApprovalExpiredApproved,
        AuditKind::ApprovalExpiredDenied,
        AuditKind::ApprovalExpired,
        AuditKind::ApprovalUsed,
        AuditKind::Proposal,
        AuditKind::AgentDisabled,
        AuditKind::AgentReenabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::Decision => "decision",
            AuditKind::ApprovalGranted => "approval_granted",
            AuditKind::ApprovalDenied => "approval_denied",
            AuditKind::ApprovalExpiredApproved => "approval_expired_approved",
            AuditKind::ApprovalExpiredDenied => "approval_expired_denied",
            AuditKind::ApprovalExpired => "approval_expired",
            AuditKind::ApprovalUsed => "approval_used",
            AuditKind::Proposal => "proposal",
            AuditKind::AgentDisabled => "agent_disabled",
            AuditKind::AgentReenabled => "agent_reenabled",
        }
    }
}

/// Reads a coded field by its name; anything else is an error naming the field and the names
/// it takes.
struct ByName<T: 'static> {
    what: &'static str,
    all: &'static [T],
    name: fn(T) -> &'static str,
}

impl<T: Copy> ByName<T> {
    fn names(&self) -> String {
        self.all.iter().map(|t| (self.name)(*t)).collect::<Vec<_>>().join(", ")
    }
}

impl<'de, T: Copy> serde::de::Visitor<'de> for ByName<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} (one of {})", self.what, self.names())
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        match self.all.iter().copied().find(|t| (self.name)(*t) == v) {
            Some(t) => Ok(t),
            None => Err(E::custom(format!(
                "`{v}` is not {} (expected one of {})",
                self.what,
                self.names()
            ))),
        }
    }
}

macro_rules! by_name {
    ($ty:ty, $what:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(ByName { what: $what, all: &<$ty>::ALL, name: <$ty>::as_str })
            }
        }
    };
}

by_name!(End, "an end");
by_name!(AuditKind, "an audit kind");
by_name!(UsageSource, "a usage_source");
by_name!(PriceSource, "a price_source");
by_name!(Decision, "a decision");

/// One metered request, as recorded at its end (`"type": "usage"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub ts: String,
    /// When the budget reservation was made (the period the cost lands in).
    #[serde(default)]
    pub reserved_at_ms: u64,
    pub request_id: String,
    /// The budget reservation's own unique id (the caller's request id is not trusted to be
    /// unique). Empty in the oldest records: use [`UsageRecord::reservation_key`].
    #[serde(default)]
    pub reservation_id: String,
    pub agent: String,
    pub cost_center: String,
    pub project: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub business_unit: Option<String>,
    pub route: String,
    pub provider: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    pub tokens: Usage,
    /// Cost by bucket (exact decimal strings); `total` equals `cost_usd`. Always written;
    /// absent only in the oldest records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
    /// Total cost as an exact decimal string in USD.
    pub cost_usd: Money,
    pub cost_nano_usd: i64,
    /// Always `allow`: only admitted requests are metered (refusals are in the audit log).
    pub decision: Decision,
    pub reason: String,
    #[serde(default)]
    pub clause: String,
    #[serde(default)]
    pub policy_version: String,
    /// The budgets the request was reserved against (by id).
    #[serde(default)]
    pub budgets: Vec<String>,
    pub status: u16,
    pub latency_ms: u64,
    pub usage_source: UsageSource,
    /// Where the price came from; absent when nothing was priced (no usage, a tool call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_source: Option<PriceSource>,
    pub end: End,
    /// Who metered it, for a usage event from elsewhere (`envoy`); absent for this proxy's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The sender's event id, for a usage event from elsewhere: a resent event with it is a
    /// duplicate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_event_id: Option<String>,
}

impl UsageRecord {
    /// The key of the budget reservation it settles (the request id in the oldest records).
    pub fn reservation_key(&self) -> &str {
        key(&self.reservation_id, &self.request_id)
    }

    /// The total cost in nano-USD.
    pub fn cost_total(&self) -> Money {
        Money::from_nanos(self.cost_nano_usd)
    }
}

/// A budget reservation, recorded when it is made (`"type": "reserve"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveRecord {
    pub ts: String,
    pub reserved_at_ms: u64,
    pub expires_at_ms: u64,
    pub request_id: String,
    /// Empty in the oldest records: use [`ReserveRecord::reservation_key`].
    #[serde(default)]
    pub reservation_id: String,
    pub agent: String,
    pub cost_center: String,
    pub project: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub business_unit: Option<String>,
    pub amount: Money,
    pub budgets: Vec<String>,
}

impl ReserveRecord {
    /// The key of the reservation (the request id in the oldest records).
    pub fn reservation_key(&self) -> &str {
        key(&self.reservation_id, &self.request_id)
    }
}

fn key<'a>(reservation_id: &'a str, request_id: &'a str) -> &'a str {
    if reservation_id.is_empty() {
        request_id
    } else {
        reservation_id
    }
}

/// One ledger record, tagged by `type`. Boxed: a queued entry stays two words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Entry {
    Usage(Box<UsageRecord>),
    Reserve(Box<ReserveRecord>),
    /// A record of a type this version does not know (never written by it): skipped.
    #[serde(other, skip_serializing)]
    Other,
}

impl Entry {
    /// When its reservation was made; `None` for an unknown record.
    pub fn reserved_at_ms(&self) -> Option<u64> {
        match self {
            Entry::Usage(r) => Some(r.reserved_at_ms),
            Entry::Reserve(r) => Some(r.reserved_at_ms),
            Entry::Other => None,
        }
    }

    /// The usage record, if it is one.
    pub fn usage(&self) -> Option<&UsageRecord> {
        match self {
            Entry::Usage(r) => Some(r),
            _ => None,
        }
    }
}

/// A ledger line's record as stored: its sequence number, its unique event id (`<ledger
/// id>-<seq>`, the key a collector deduplicates by) and the entry. `E` is [`Entry`] when
/// reading and `&Entry` when writing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored<E = Entry> {
    /// 0 in records from before sequence numbers.
    #[serde(default)]
    pub seq: u64,
    /// Empty in records from before event ids.
    #[serde(default)]
    pub event_id: String,
    #[serde(flatten)]
    pub entry: E,
}

impl Stored {
    /// Decodes one ledger record (the JSON after the checksum and link). The error says what
    /// does not fit, naming the field for a coded value.
    pub fn decode(json: &[u8]) -> Result<Stored, serde_json::Error> {
        serde_json::from_slice(json)
    }
}

#[cfg(test)]
mod tests;
