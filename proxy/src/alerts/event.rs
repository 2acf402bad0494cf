//! An alert event, its two body formats (generic JSON and Slack) and the delivery signature.
//!
//! Money is carried as exact decimal USD strings made from the core's nano-USD integers
//! (`Money`'s `Display`: `"8.10"`, `"0.000375"`), with the integers beside them; never a float.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::config::{Format, Kind};

/// The header carrying the event id (the same in every attempt and for every receiver), for
/// receivers to deduplicate: delivery is at least once.
pub const EVENT_ID_HEADER: &str = "x-tollgate-event-id";
/// The header carrying the event type.
pub const EVENT_TYPE_HEADER: &str = "x-tollgate-event";
/// The header carrying the signature: `t=<unix seconds>,v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "x-tollgate-signature";

/// One alert: what happened, when, and its unique id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `evt_` and 128 random bits; the idempotency key.
    pub id: String,
    /// When it was raised, RFC 3339 UTC with milliseconds.
    pub time: String,
    pub time_ms: u64,
    #[serde(flatten)]
    pub detail: Detail,
}

/// What happened (`type` in the JSON body).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Detail {
    BudgetThreshold(BudgetThreshold),
    ApprovalPending(ApprovalPending),
    AgentDisabled(AgentDisabled),
    CircuitOpen(CircuitOpen),
}

impl Detail {
    pub fn kind(&self) -> Kind {
        match self {
            Detail::BudgetThreshold(_) => Kind::BudgetThreshold,
            Detail::ApprovalPending(_) => Kind::ApprovalPending,
            Detail::AgentDisabled(_) => Kind::AgentDisabled,
            Detail::CircuitOpen(_) => Kind::CircuitOpen,
        }
    }
}

/// A budget's spend crossed 80, 95 or 100 % of its limit (the core's `budget::Warning`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetThreshold {
    pub budget: String,
    /// `agent`, `project`, `cost_center`, `business_unit` or `global`.
    pub scope: String,
    /// The scope value the budget counts (the agent id, the cost center, ...; empty: global).
    pub key: String,
    pub period: String,
    /// The budget window (`2026-12-03`, `2026-12`, ...).
    pub period_key: String,
    pub threshold_percent: u64,
    /// Spent in the window after the request that crossed, decimal USD.
    pub spent: String,
    pub limit: String,
    pub spent_nano_usd: i64,
    pub limit_nano_usd: i64,
    /// The request whose settlement crossed the threshold, and its agent.
    pub request_id: String,
    pub agent: String,
}

/// A new approval waits for a human.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalPending {
    pub approval_id: String,
    pub request_id: String,
    pub agent: String,
    pub cost_center: String,
    pub project: String,
    pub route: String,
    /// The tool name, or `llm`.
    pub action: String,
    /// The risk score (0.00 to 100.00) and band.
    pub risk: String,
    pub risk_band: String,
    pub reason: String,
    pub explanation: String,
    pub expires_at: String,
    /// What happens if nobody decides by `expires_at`: `approve` or `deny`.
    pub on_timeout: String,
}

/// Error escalation disabled an agent (an operator re-enables it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentDisabled {
    pub agent: String,
    /// The action whose error disabled it, and the status it ended with (0: no answer).
    pub action: String,
    pub status: u16,
}

/// An upstream's circuit breaker opened: calls to it fail fast.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CircuitOpen {
    /// The upstream's authority (`host:port`).
    pub upstream: String,
    pub open_for_ms: u64,
    /// When the next probe is let through.
    pub retry_at: String,
}

impl Event {
    /// The body for a receiver of `format`.
    pub fn body(&self, format: Format) -> Vec<u8> {
        match format {
            Format::Json => serde_json::to_vec(self).unwrap_or_default(),
            Format::Slack => {
                let text = self.summary();
                let context = format!("event `{}` · {}", self.id, self.time);
                let body = serde_json::json!({
                    "text": text,
                    "blocks": [
                        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
                        {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
                    ],
                });
                serde_json::to_vec(&body).unwrap_or_default()
            }
        }
    }

    /// One line for a human.
    pub fn summary(&self) -> String {
        match &self.detail {
            Detail::BudgetThreshold(b) => {
                let key = if b.key.is_empty() { String::new() } else { format!(" ({})", b.key) };
                format!(
                    ":warning: Tollgate budget `{}`{key} crossed {} %: spent ${} of ${} \
                     ({} {})",
                    b.budget, b.threshold_percent, b.spent, b.limit, b.period, b.period_key
                )
            }
            Detail::ApprovalPending(a) => format!(
                ":raising_hand: Tollgate approval `{}` is pending: agent `{}` wants `{}` on \
                 route `{}` (risk {}, {}; {}). Decide by {} or it is {}.",
                a.approval_id,
                a.agent,
                a.action,
                a.route,
                a.risk,
                a.risk_band,
                a.reason,
                a.expires_at,
                if a.on_timeout == "approve" { "approved" } else { "denied" }
            ),
            Detail::AgentDisabled(d) => format!(
                ":no_entry: Tollgate disabled agent `{}` after consecutive errors (last: `{}`, \
                 status {}). Re-enable it with POST /admin/agents/{}/enable.",
                d.agent, d.action, d.status, d.agent
            ),
            Detail::CircuitOpen(c) => format!(
                ":rotating_light: Tollgate opened the circuit breaker of upstream `{}`: calls \
                 fail fast until {}.",
                c.upstream, c.retry_at
            ),
        }
    }
}

/// `t=<unix_secs>,v1=<hex>`: HMAC-SHA256 under `secret` over `"<unix_secs>." + body`.
pub fn signature(secret: &[u8], unix_secs: u64, body: &[u8]) -> String {
    format!("t={unix_secs},v1={}", hex(&mac(secret, unix_secs, body)))
}

fn mac(secret: &[u8], unix_secs: u64, body: &[u8]) -> Vec<u8> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(unix_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Checks a signature header the way a receiver does (constant-time comparison of the MAC):
/// the test suite and the documentation's example use the same rule.
pub fn verify(secret: &[u8], header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<u64>().ok(),
            Some(("v1", v)) => v1 = Some(v),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else { return false };
    let Some(expected) = unhex(v1) else { return false };
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| text.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event {
            id: "evt_1".into(),
            time: "2026-12-03T12:00:00.000Z".into(),
            time_ms: 1_796_299_200_000,
            detail: Detail::BudgetThreshold(BudgetThreshold {
                budget: "team.daily".into(),
                scope: "agent".into(),
                key: "bot-1".into(),
                period: "daily".into(),
                period_key: "2026-12-03".into(),
                threshold_percent: 80,
                spent: "8.000000001".into(),
                limit: "10.00".into(),
                spent_nano_usd: 8_000_000_001,
                limit_nano_usd: 10_000_000_000,
                request_id: "req-1".into(),
                agent: "bot-1".into(),
            }),
        }
    }

    #[test]
    fn the_json_body_is_flat_with_its_type_and_reads_back() {
        let e = event();
        let body: serde_json::Value = serde_json::from_slice(&e.body(Format::Json)).unwrap();
        assert_eq!(body["type"], "budget_threshold");
        assert_eq!(body["id"], "evt_1");
        assert_eq!(body["spent"], "8.000000001");
        assert_eq!(body["threshold_percent"], 80);
        let back: Event = serde_json::from_value(body).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn the_slack_body_has_text_and_the_event_id() {
        let body: serde_json::Value = serde_json::from_slice(&event().body(Format::Slack)).unwrap();
        let text = body["text"].as_str().unwrap();
        assert!(text.contains("`team.daily` (bot-1) crossed 80 %"), "{text}");
        assert!(text.contains("$8.000000001 of $10.00"), "{text}");
        assert!(body["blocks"][1]["elements"][0]["text"].as_str().unwrap().contains("evt_1"));
    }

    #[test]
    fn signatures_verify_only_for_the_same_key_time_and_body() {
        let header = signature(b"Jefe", 0, b"what do ya want for nothing?");
        assert!(header.starts_with("t=0,v1="));
        assert!(verify(b"Jefe", &header, b"what do ya want for nothing?"));
        assert!(!verify(b"jefe", &header, b"what do ya want for nothing?"));
        assert!(!verify(b"Jefe", &header, b"what do ya want for nothing!"));
        let moved = header.replacen("t=0", "t=1", 1);
        assert!(!verify(b"Jefe", &moved, b"what do ya want for nothing?"));
        assert!(!verify(b"Jefe", "v1=zz", b""));
        // HMAC-SHA256("key", "1.body"), computed independently with Python's hmac module.
        assert_eq!(
            signature(b"key", 1, b"body"),
            "t=1,v1=91b5374b153842ad05b2c4eab9349b8321b14703165bd3fb8b034dfb8be98ae5"
        );
    }
}
