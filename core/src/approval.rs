//! Human approvals (the automated approval decision): the life of one pending
//! approval, from the `require_approval` answer to its single use.
//!
//! An approval is created *pending*, bound to one agent and one action digest (the action name
//! and its arguments, [`crate::guardrails::loops::digest`]). An operator approves or denies it;
//! if nobody answers before `expires_at_ms` the risk band decides ([`OnTimeout`]): a medium-risk
//! action (30 to below 70) is approved, a high-risk one (70 and above) denied. An approved
//! approval lets exactly **one** retry of the same action by the same agent through, within
//! `use_within_ms` of the approval; after that it is expired. Every change is a [`Transition`]
//! that the caller records (audit log, journal).
//!
//! Pure: time is passed in; this module never stores, journals or notifies.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::risk::OnTimeout;
use crate::time::UnixMillis;

/// Where an approval is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for an operator (or its timeout).
    Pending,
    /// Approved: one retry may use it.
    Approved,
    /// Denied by an operator or by its timeout.
    Denied,
    /// Approved and used by a retry.
    Used,
    /// Approved but not used in time.
    Expired,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Approved => "approved",
            State::Denied => "denied",
            State::Used => "used",
            State::Expired => "expired",
        }
    }

    /// `pending`, `approved`, ... back to a state (admin query strings).
    pub fn parse(text: &str) -> Option<State> {
        [State::Pending, State::Approved, State::Denied, State::Used, State::Expired]
            .into_iter()
            .find(|s| s.as_str() == text)
    }

    /// Nothing can happen to it any more.
    pub fn is_final(self) -> bool {
        matches!(self, State::Denied | State::Used | State::Expired)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who decided, when nobody did.
pub const BY_TIMEOUT: &str = "timeout";

/// One approval. Serialised as is into the proxy's journal and admin API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// `apr_<hex>`, unique and not guessable.
    pub id: String,
    /// The request that asked for it.
    pub request_id: String,
    pub created_at_ms: u64,
    /// When a pending approval times out.
    pub expires_at_ms: u64,
    pub on_timeout: OnTimeout,
    /// How long an approval stays usable once approved.
    pub use_within_ms: u64,
    pub agent: String,
    pub cost_center: String,
    pub project: String,
    pub route: String,
    /// The tool (or `llm`) the approval is for.
    pub action: String,
    /// 16 hex digits: the digest of agent, action and arguments.
    pub digest: String,
    /// The risk score in hundredths of a point (7850 is 78.5).
    pub risk_score: u32,
    /// `low`, `medium` or `high`.
    pub risk_band: String,
    /// The stable code of what asked for the approval (`default_require_approval`, `risk_high`,
    /// `autonomy_budget_exhausted`, `error_escalation`, ...).
    pub reason: String,
    /// Why, for a human: the decision's explanation and the risk breakdown.
    pub explanation: String,
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by_request: Option<String>,
}

/// A change of state, for the audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// An operator approved it.
    Granted,
    /// An operator denied it.
    Denied,
    /// Nobody answered in time: approved (medium risk) or denied (high risk).
    TimedOut(OnTimeout),
    /// Approved but never used in time.
    Lapsed,
    /// A retry used it.
    Used,
}

impl Transition {
    /// The audit event kind.
    pub fn kind(self) -> crate::record::AuditKind {
        use crate::record::AuditKind;
        match self {
            Transition::Granted => AuditKind::ApprovalGranted,
            Transition::Denied => AuditKind::ApprovalDenied,
            Transition::TimedOut(OnTimeout::Approve) => AuditKind::ApprovalExpiredApproved,
            Transition::TimedOut(OnTimeout::Deny) => AuditKind::ApprovalExpiredDenied,
            Transition::Lapsed => AuditKind::ApprovalExpired,
            Transition::Used => AuditKind::ApprovalUsed,
        }
    }
}

/// Why an operator's decision was not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    #[error("the approval is {0}, not pending")]
    NotPending(State),
}

/// Why a retry could not use an approval. [`RedeemError::code`] is stable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RedeemError {
    #[error("the approval is for another agent or another action (same tool, same arguments)")]
    Mismatch,
    #[error("the approval is still waiting for a human")]
    Pending,
    #[error("the approval was denied")]
    Denied,
    #[error("the approval was already used; it lets one retry through")]
    Used,
    #[error("the approval expired before it was used")]
    Expired,
}

impl RedeemError {
    pub fn code(self) -> &'static str {
        match self {
            RedeemError::Mismatch => "approval_mismatch",
            RedeemError::Pending => "approval_pending",
            RedeemError::Denied => "approval_denied",
            RedeemError::Used => "approval_used",
            RedeemError::Expired => "approval_expired",
        }
    }
}

impl Approval {
    /// Applies the clock: a pending approval past its timeout is approved or denied by its
    /// risk band; an approved one past its use window expires. `None` when nothing changed.
    pub fn tick(&mut self, now: UnixMillis) -> Option<Transition> {
        let now = now.as_millis();
        match self.state {
            State::Pending if now >= self.expires_at_ms => {
                self.state = match self.on_timeout {
                    OnTimeout::Approve => State::Approved,
                    OnTimeout::Deny => State::Denied,
                };
                self.decided_by = Some(BY_TIMEOUT.to_string());
                // Decided at the deadline, not when the sweep noticed: the use window starts
                // there too.
                self.decided_at_ms = Some(self.expires_at_ms);
                Some(Transition::TimedOut(self.on_timeout))
            }
            State::Approved if now >= self.usable_until_ms() => {
                self.state = State::Expired;
                Some(Transition::Lapsed)
            }
            _ => None,
        }
    }

    /// Until when an approved approval can be used.
    pub fn usable_until_ms(&self) -> u64 {
        self.decided_at_ms.unwrap_or(self.created_at_ms).saturating_add(self.use_within_ms)
    }

    /// An operator's answer. Only a pending approval (after [`Approval::tick`]) can be decided.
    pub fn decide(
        &mut self,
        approve: bool,
        by: &str,
        note: Option<&str>,
        now: UnixMillis,
    ) -> Result<Transition, DecideError> {
        self.tick(now);
        if self.state != State::Pending {
            return Err(DecideError::NotPending(self.state));
        }
        self.state = if approve { State::Approved } else { State::Denied };
        self.decided_by = Some(by.to_string());
        self.decided_at_ms = Some(now.as_millis());
        self.note = note.map(str::to_string);
        Ok(if approve { Transition::Granted } else { Transition::Denied })
    }

    /// A retry by `agent` of the action with `digest` uses the approval: allowed once, by the
    /// same agent, for the same action, while approved. The binding is checked first, so
    /// another agent learns nothing about the approval's state.
    pub fn redeem(
        &mut self,
        agent: &str,
        digest: &str,
        request_id: &str,
        now: UnixMillis,
    ) -> Result<Transition, RedeemError> {
        if self.agent != agent || self.digest != digest {
            return Err(RedeemError::Mismatch);
        }
        self.tick(now);
        match self.state {
            State::Pending => Err(RedeemError::Pending),
            State::Denied => Err(RedeemError::Denied),
            State::Used => Err(RedeemError::Used),
            State::Expired => Err(RedeemError::Expired),
            State::Approved => {
                self.state = State::Used;
                self.used_by_request = Some(request_id.to_string());
                Ok(Transition::Used)
            }
        }
    }
}

/// The digest an approval is bound to, as 16 hex digits.
pub fn digest_hex(digest: u64) -> String {
    format!("{digest:016x}")
}

/// The collector's approval service for adapters that cannot hold approvals themselves (the
/// Envoy filter): `POST /v1/fleet/approvals` raises one ([`remote::Raise`]) and
/// `POST /v1/fleet/approvals/redeem` uses a granted one ([`remote::Redeem`]); both are answered
/// with [`remote::RemoteAnswer`].
pub mod remote {
    use serde::{Deserialize, Serialize};

    use crate::refusal::{Class, Denial};
    use crate::risk::OnTimeout;

    /// A request a human has to approve, as the lifecycle found it.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Raise {
        pub request_id: String,
        pub agent: String,
        pub cost_center: String,
        pub project: String,
        pub route: String,
        /// The tool name, or `llm`.
        pub action: String,
        /// The request's digest ([`super::digest_hex`]): the retry must match it.
        pub digest: String,
        /// Why: a reason code and a human explanation.
        pub reason: String,
        pub why: String,
        /// The risk assessment's explanation, score (hundredths) and band.
        pub risk: String,
        pub risk_score: u32,
        pub risk_band: String,
        /// What happens when nobody answers in time (the band's: a high-risk action is denied,
        /// anything else approved); `None` is approved. The timeout itself is the collector's
        /// (its `oversight.approvals`), not `timeout_ms`, which is informational.
        pub on_timeout: Option<OnTimeout>,
        pub timeout_ms: Option<u64>,
    }

    /// A retry carrying a granted approval's id.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Redeem {
        pub id: String,
        pub agent: String,
        pub digest: String,
        pub request_id: String,
    }

    /// What the collector answered: `ok` with the approval's id (raised or used), or the
    /// refusal to give (class, code and message; the adapter adds its decision's clause).
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct RemoteAnswer {
        pub ok: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub id: Option<String>,
        /// `approval_required`, `policy` or `unavailable` when not `ok`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub class: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub code: Option<String>,
        pub message: String,
    }

    impl RemoteAnswer {
        pub fn from_denial(d: &Denial) -> RemoteAnswer {
            let class = match d.class {
                Class::ApprovalRequired => "approval_required",
                Class::Unavailable => "unavailable",
                _ => "policy",
            };
            RemoteAnswer {
                ok: false,
                id: d.approval_id.clone(),
                class: Some(class.into()),
                code: Some(d.code.clone()),
                message: d.message.clone(),
            }
        }

        /// The refusal this answer stands for (`ok` answers of a raise are refusals too: the
        /// request waits for its approval).
        pub fn denial(&self) -> Denial {
            let class = match self.class.as_deref() {
                Some("unavailable") => Class::Unavailable,
                Some("policy") => Class::Policy,
                _ => Class::ApprovalRequired,
            };
            let code = self.code.as_deref().unwrap_or("approval_required");
            let mut d = Denial::new(class, code, self.message.clone());
            d.approval_id = self.id.clone();
            if class == Class::Unavailable {
                d.retry_after_secs = Some(1);
            }
            d
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(on_timeout: OnTimeout) -> Approval {
        Approval {
            id: "apr_1".into(),
            request_id: "r1".into(),
            created_at_ms: 1_000,
            expires_at_ms: 61_000,
            on_timeout,
            use_within_ms: 10_000,
            agent: "bot".into(),
            cost_center: "CC-1234".into(),
            project: "PROJ-ABC123".into(),
            route: "tools".into(),
            action: "deploy".into(),
            digest: digest_hex(42),
            risk_score: 5000,
            risk_band: "medium".into(),
            reason: "risk_medium".into(),
            explanation: String::new(),
            state: State::Pending,
            decided_by: None,
            decided_at_ms: None,
            note: None,
            used_by_request: None,
        }
    }

    const D: &str = "000000000000002a";

    #[test]
    fn an_approved_approval_lets_one_retry_through() {
        let mut a = pending(OnTimeout::Deny);
        assert_eq!(a.redeem("bot", D, "r2", UnixMillis(2_000)), Err(RedeemError::Pending));
        assert_eq!(a.decide(true, "alice", None, UnixMillis(3_000)), Ok(Transition::Granted));
        assert_eq!(a.redeem("bot", D, "r3", UnixMillis(4_000)), Ok(Transition::Used));
        assert_eq!(a.used_by_request.as_deref(), Some("r3"));
        assert_eq!(a.redeem("bot", D, "r4", UnixMillis(4_001)), Err(RedeemError::Used));
    }

    #[test]
    fn another_agent_or_action_cannot_use_it() {
        let mut a = pending(OnTimeout::Deny);
        a.decide(true, "alice", None, UnixMillis(3_000)).unwrap();
        assert_eq!(a.redeem("eve", D, "r", UnixMillis(4_000)), Err(RedeemError::Mismatch));
        let other = digest_hex(43);
        assert_eq!(a.redeem("bot", &other, "r", UnixMillis(4_000)), Err(RedeemError::Mismatch));
        assert_eq!(a.state, State::Approved, "a mismatch does not use it up");
    }

    #[test]
    fn timeouts_follow_the_risk_band() {
        let mut medium = pending(OnTimeout::Approve);
        assert_eq!(medium.tick(UnixMillis(60_999)), None);
        assert_eq!(medium.tick(UnixMillis(61_000)), Some(Transition::TimedOut(OnTimeout::Approve)));
        assert_eq!(medium.state, State::Approved);
        assert_eq!(medium.decided_by.as_deref(), Some(BY_TIMEOUT));
        assert_eq!(medium.redeem("bot", D, "r", UnixMillis(62_000)), Ok(Transition::Used));

        let mut high = pending(OnTimeout::Deny);
        assert_eq!(high.redeem("bot", D, "r", UnixMillis(61_000)), Err(RedeemError::Denied));
        assert_eq!(high.state, State::Denied);
        assert_eq!(
            high.decide(true, "alice", None, UnixMillis(61_001)),
            Err(DecideError::NotPending(State::Denied)),
            "a timed-out approval cannot be approved any more"
        );
    }

    #[test]
    fn an_unused_approval_lapses_after_its_use_window() {
        let mut a = pending(OnTimeout::Deny);
        a.decide(true, "alice", Some("ok"), UnixMillis(3_000)).unwrap();
        assert_eq!(a.tick(UnixMillis(12_999)), None);
        assert_eq!(a.tick(UnixMillis(13_000)), Some(Transition::Lapsed));
        assert_eq!(a.redeem("bot", D, "r", UnixMillis(13_001)), Err(RedeemError::Expired));
    }

    #[test]
    fn only_a_pending_approval_can_be_decided() {
        let mut a = pending(OnTimeout::Deny);
        assert_eq!(a.decide(false, "bob", None, UnixMillis(2_000)), Ok(Transition::Denied));
        assert_eq!(
            a.decide(true, "alice", None, UnixMillis(2_001)),
            Err(DecideError::NotPending(State::Denied))
        );
        assert_eq!(a.redeem("bot", D, "r", UnixMillis(2_002)), Err(RedeemError::Denied));
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for s in [State::Pending, State::Approved, State::Denied, State::Used, State::Expired] {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        assert_eq!(State::parse("nope"), None);
    }
}
