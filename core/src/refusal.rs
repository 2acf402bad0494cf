//! Refusals: every answer an adapter gives on its own instead of the upstream's, rendered in the
//! caller's provider's error shape with one mapping from class to status, error type and
//! decision headers, shared by the sidecar and the Envoy filter so that an SDK sees the same
//! exception whichever of the two refused it.
//!
//! OpenAI-style routes answer `{"error":{"message","type","param","code"}}`, Anthropic routes
//! `{"type":"error","error":{"type","message"}}`; 403 attribution/policy/approval, 429 rate
//! limits (with `Retry-After`), 402 budgets (SDKs do not retry it). Rendering produces bytes
//! and header pairs; the adapter puts them on the wire.

use serde_json::json;

/// Which error shape to answer in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    OpenAi,
    Anthropic,
}

/// Why an adapter answered instead of the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Missing, invalid or contradicting attribution headers.
    Attribution,
    /// The policy denied the request (or a guardrail, or the cost cap).
    Policy,
    /// The policy requires a human approval first.
    ApprovalRequired,
    /// A requests/min or tokens/min limit.
    RateLimited,
    /// A budget would be exceeded.
    BudgetExhausted,
    /// The request itself is malformed.
    BadRequest,
    /// The request body is larger than allowed.
    TooLarge,
    /// The request body stalled (no bytes for `limits.body_idle_timeout`).
    RequestTimeout,
    /// No route matches the request.
    NoRoute,
    /// The upstream could not be reached or failed.
    UpstreamUnavailable,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The adapter cannot serve or decide right now (draining, ledger or budget store down, bad
    /// configuration under fail-closed).
    Unavailable,
}

impl Class {
    /// The HTTP status of this class.
    pub fn status(self) -> u16 {
        match self {
            Class::Attribution | Class::Policy | Class::ApprovalRequired => 403,
            Class::RateLimited => 429,
            Class::BudgetExhausted => 402,
            Class::BadRequest => 400,
            Class::TooLarge => 413,
            Class::RequestTimeout => 408,
            Class::NoRoute => 404,
            Class::UpstreamUnavailable => 502,
            Class::UpstreamTimeout => 504,
            Class::Unavailable => 503,
        }
    }

    /// The error `type` in the OpenAI shape.
    fn openai_type(self) -> &'static str {
        match self {
            Class::Attribution | Class::Policy | Class::ApprovalRequired => "permission_error",
            Class::RateLimited => "rate_limit_error",
            Class::BudgetExhausted => "insufficient_quota",
            Class::BadRequest | Class::TooLarge | Class::NoRoute => "invalid_request_error",
            Class::RequestTimeout => "invalid_request_error",
            Class::UpstreamUnavailable | Class::UpstreamTimeout | Class::Unavailable => "api_error",
        }
    }

    /// The error `type` in the Anthropic shape.
    fn anthropic_type(self) -> &'static str {
        match self {
            Class::Attribution | Class::Policy | Class::ApprovalRequired => "permission_error",
            Class::RateLimited => "rate_limit_error",
            Class::BudgetExhausted => "billing_error",
            Class::BadRequest | Class::TooLarge => "invalid_request_error",
            Class::NoRoute => "not_found_error",
            Class::RequestTimeout => "timeout_error",
            Class::UpstreamUnavailable | Class::UpstreamTimeout => "api_error",
            Class::Unavailable => "overloaded_error",
        }
    }

    /// The effect recorded in metrics, the ledger and the audit log for this answer (an upstream
    /// failure happens after the request was allowed).
    pub fn decision(self) -> &'static str {
        self.effect().as_str()
    }

    /// [`Class::decision`] as the policy's effect (for the audit log).
    pub fn effect(self) -> crate::policy::Effect {
        use crate::policy::Effect;
        match self {
            Class::ApprovalRequired => Effect::RequireApproval,
            Class::UpstreamUnavailable | Class::UpstreamTimeout => Effect::Allow,
            _ => Effect::Deny,
        }
    }
}

/// A refusal, before rendering.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub class: Class,
    /// Stable machine-readable code (`attribution_rejected`, `budget_exceeded`, ...).
    pub code: String,
    pub message: String,
    pub clause: Option<String>,
    pub policy_version: Option<String>,
    pub retry_after_secs: Option<u64>,
    pub approval_id: Option<String>,
    /// What a guardrail found, when one refused the call (for the audit log and the metric).
    /// Boxed: rare, and the struct stays small.
    pub guardrail: Option<Box<crate::guardrails::Breach>>,
}

/// The JSON-RPC error code of a tool call a guardrail refused (in the range JSON-RPC leaves to
/// servers).
pub const JSON_RPC_REFUSED: i64 = -32001;

/// A rendered reply: status, headers and body, for the adapter to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

impl Denial {
    pub fn new(class: Class, code: impl Into<String>, message: impl Into<String>) -> Self {
        Denial {
            class,
            code: code.into(),
            message: message.into(),
            clause: None,
            policy_version: None,
            retry_after_secs: None,
            approval_id: None,
            guardrail: None,
        }
    }

    /// The refusal a policy decision calls for, or `None` when it allows the request.
    /// `request_id` names the approval (`apr_<request_id>`) when a human must approve.
    pub fn for_decision(decision: &crate::policy::Decision<'_>, request_id: &str) -> Option<Self> {
        use crate::policy::Effect;
        let (class, fallback) = match decision.effect {
            Effect::Allow => return None,
            Effect::Deny => (Class::Policy, "denied by policy"),
            Effect::RequireApproval => {
                (Class::ApprovalRequired, "this action requires a human approval")
            }
        };
        let message = if decision.explanation.is_empty() { fallback } else { decision.explanation };
        let mut denial = Denial::new(class, decision.reason, message)
            .with_decision(decision.clause, decision.policy_version);
        if class == Class::ApprovalRequired {
            denial.approval_id = Some(format!("apr_{request_id}"));
        }
        Some(denial)
    }

    pub fn with_decision(mut self, clause: &str, policy_version: &str) -> Self {
        self.clause = Some(clause.to_owned());
        self.policy_version = Some(policy_version.to_owned());
        self
    }

    /// The reply in `shape`, with the decision headers and the request id. A guardrail refusal
    /// of an MCP call answers in the JSON-RPC error shape instead (the tool call's `id`, code
    /// -32001, the reason and the argument in `data`), whatever `shape` says.
    pub fn render(&self, shape: Shape, request_id: &str) -> Reply {
        let rpc = self.guardrail.as_deref().and_then(|g| g.rpc_id.as_ref().map(|id| (g, id)));
        let body = match (rpc, shape) {
            (Some((g, id)), _) => {
                let mut data = json!({
                    "type": self.class.openai_type(),
                    "code": self.code,
                    "action": g.action,
                    "request_id": request_id,
                });
                if let Some(argument) = &g.argument {
                    data["argument"] = argument.clone().into();
                }
                if let Some(pattern) = &g.pattern {
                    data["pattern"] = pattern.clone().into();
                }
                json!({
                    "jsonrpc": "2.0",
                    "id": id,
                    "error": {"code": JSON_RPC_REFUSED, "message": self.message, "data": data},
                })
            }
            (None, Shape::OpenAi) => {
                let mut error = json!({
                    "message": self.message,
                    "type": self.class.openai_type(),
                    "param": null,
                    "code": self.code,
                });
                if let Some(id) = &self.approval_id {
                    error["approval_id"] = id.clone().into();
                }
                json!({ "error": error })
            }
            (None, Shape::Anthropic) => {
                let mut error = json!({
                    "type": self.class.anthropic_type(),
                    "message": self.message,
                    "code": self.code,
                });
                if let Some(id) = &self.approval_id {
                    error["approval_id"] = id.clone().into();
                }
                json!({ "type": "error", "error": error })
            }
        };
        let mut headers = vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            ("x-request-id".to_owned(), request_id.to_owned()),
            ("x-tollgate-decision".to_owned(), self.class.decision().to_owned()),
            ("x-tollgate-reason".to_owned(), self.code.clone()),
        ];
        let mut put = |name: &str, value: &Option<String>| {
            if let Some(v) = value {
                headers.push((name.to_owned(), v.clone()));
            }
        };
        put("x-tollgate-clause", &self.clause);
        put("x-tollgate-policy-version", &self.policy_version);
        put("x-tollgate-approval-id", &self.approval_id);
        if let Some(secs) = self.retry_after_secs {
            headers.push(("retry-after".to_owned(), secs.max(1).to_string()));
        }
        // Header values must be printable; a value that is not is dropped rather than failing
        // the reply (the host or hyper would refuse it).
        headers.retain(|(_, v)| v.bytes().all(|b| b == b'\t' || (b' '..0x7f).contains(&b)));
        Reply {
            status: self.class.status(),
            headers,
            body: serde_json::to_vec(&body).unwrap_or_default(),
        }
    }
}

/// The `status` label of `tollgate_requests_total` in both adapters: the class of the
/// upstream's answer (`1xx` … `5xx`), or `none` when no upstream answered (the adapter refused
/// the request itself, or the upstream could not be reached or timed out).
pub fn status_class(upstream_status: Option<u16>) -> &'static str {
    match upstream_status {
        Some(100..=199) => "1xx",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        _ => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn every_class_has_its_documented_status_and_effect() {
        let cases = [
            (Class::Attribution, 403, "deny"),
            (Class::Policy, 403, "deny"),
            (Class::ApprovalRequired, 403, "require_approval"),
            (Class::RateLimited, 429, "deny"),
            (Class::BudgetExhausted, 402, "deny"),
            (Class::BadRequest, 400, "deny"),
            (Class::TooLarge, 413, "deny"),
            (Class::RequestTimeout, 408, "deny"),
            (Class::NoRoute, 404, "deny"),
            (Class::UpstreamUnavailable, 502, "allow"),
            (Class::UpstreamTimeout, 504, "allow"),
            (Class::Unavailable, 503, "deny"),
        ];
        for (class, status, decision) in cases {
            assert_eq!((class.status(), class.decision()), (status, decision), "{class:?}");
        }
    }

    #[test]
    fn openai_shape_carries_type_code_and_headers() {
        let mut d = Denial::new(Class::RateLimited, "rate_limited_requests", "slow down")
            .with_decision("rule-1", "v7");
        d.retry_after_secs = Some(0);
        let reply = d.render(Shape::OpenAi, "req-1");
        assert_eq!(reply.status, 429);
        let body: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(
            body,
            json!({"error": {"message": "slow down", "type": "rate_limit_error", "param": null,
                              "code": "rate_limited_requests"}})
        );
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert_eq!(reply.header("x-tollgate-clause"), Some("rule-1"));
        assert_eq!(reply.header("x-tollgate-policy-version"), Some("v7"));
        assert_eq!(reply.header("x-request-id"), Some("req-1"));
    }

    #[test]
    fn anthropic_shape_and_approval_id() {
        let mut d = Denial::new(Class::ApprovalRequired, "default_require_approval", "ask");
        d.approval_id = Some("apr_x".into());
        let reply = d.render(Shape::Anthropic, "x");
        let body: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "permission_error");
        assert_eq!(body["error"]["approval_id"], "apr_x");
        assert_eq!(reply.header("x-tollgate-decision"), Some("require_approval"));
        assert_eq!(reply.header("x-tollgate-approval-id"), Some("apr_x"));
        let budget = Denial::new(Class::BudgetExhausted, "budget_exceeded", "no")
            .render(Shape::Anthropic, "bad\nid");
        let body: Value = serde_json::from_slice(&budget.body).unwrap();
        assert_eq!(body["error"]["type"], "billing_error");
        assert_eq!(budget.header("x-request-id"), None, "unprintable value dropped");
    }

    #[test]
    fn status_classes_for_the_requests_metric() {
        let got: Vec<&str> = [
            None,
            Some(0),
            Some(101),
            Some(200),
            Some(204),
            Some(304),
            Some(429),
            Some(500),
            Some(529),
            Some(600),
        ]
        .into_iter()
        .map(status_class)
        .collect();
        assert_eq!(got, ["none", "none", "1xx", "2xx", "2xx", "3xx", "4xx", "5xx", "5xx", "none"]);
    }
}
