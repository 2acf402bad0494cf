//! Every answer Tollgate gives on its own, in the caller's provider's error shape.
//!
//! One error type, one mapping to status and body: `Denial` carries the class (status), a stable
//! code, a human message, and the decision headers. OpenAI-style routes answer
//! `{"error":{"message","type","param","code"}}`, Anthropic routes
//! `{"type":"error","error":{"type","message"}}`, so that the official SDKs raise a readable
//! exception of the right class (403 → PermissionDenied, 429 → RateLimit, 402 → not retried).

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::upstream::Body;

/// Which error shape to answer in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    OpenAi,
    Anthropic,
}

/// Why Tollgate answered instead of the upstream.
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
    /// No route matches the request.
    NoRoute,
    /// The upstream could not be reached or failed.
    UpstreamUnavailable,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// Tollgate cannot serve right now (e.g. draining).
    Unavailable,
}

impl Class {
    pub fn status(self) -> StatusCode {
        match self {
            Class::Attribution | Class::Policy | Class::ApprovalRequired => StatusCode::FORBIDDEN,
            Class::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Class::BudgetExhausted => StatusCode::PAYMENT_REQUIRED,
            Class::BadRequest => StatusCode::BAD_REQUEST,
            Class::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Class::NoRoute => StatusCode::NOT_FOUND,
            Class::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Class::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Class::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The error `type` in the OpenAI shape.
    fn openai_type(self) -> &'static str {
        match self {
            Class::Attribution | Class::Policy | Class::ApprovalRequired => "permission_error",
            Class::RateLimited => "rate_limit_error",
            Class::BudgetExhausted => "insufficient_quota",
            Class::BadRequest | Class::TooLarge | Class::NoRoute => "invalid_request_error",
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
            Class::UpstreamUnavailable | Class::UpstreamTimeout => "api_error",
            Class::Unavailable => "overloaded_error",
        }
    }

    /// The effect recorded in metrics and the ledger for this answer.
    pub fn decision(self) -> &'static str {
        match self {
            Class::ApprovalRequired => "require_approval",
            Class::UpstreamUnavailable | Class::UpstreamTimeout => "allow",
            _ => "deny",
        }
    }
}

/// A refusal, ready to be rendered.
#[derive(Clone, Debug)]
pub struct Denial {
    pub class: Class,
    /// Stable machine-readable code (`missing_attribution`, `budget_exceeded`, ...).
    pub code: String,
    pub message: String,
    pub clause: Option<String>,
    pub policy_version: Option<String>,
    pub retry_after_secs: Option<u64>,
    pub approval_id: Option<String>,
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
        }
    }

    pub fn with_decision(mut self, clause: &str, policy_version: &str) -> Self {
        self.clause = Some(clause.to_string());
        self.policy_version = Some(policy_version.to_string());
        self
    }

    /// The response, in `shape`, with the decision headers and the request id.
    pub fn into_response(self, shape: Shape, request_id: &str) -> Response<Body> {
        let body = match shape {
            Shape::OpenAi => {
                let mut error = serde_json::json!({
                    "message": self.message,
                    "type": self.class.openai_type(),
                    "param": null,
                    "code": self.code,
                });
                if let Some(id) = &self.approval_id {
                    error["approval_id"] = id.clone().into();
                }
                serde_json::json!({ "error": error })
            }
            Shape::Anthropic => {
                let mut error = serde_json::json!({
                    "type": self.class.anthropic_type(),
                    "message": self.message,
                    "code": self.code,
                });
                if let Some(id) = &self.approval_id {
                    error["approval_id"] = id.clone().into();
                }
                serde_json::json!({ "type": "error", "error": error })
            }
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = Response::new(full(Bytes::from(bytes)));
        *response.status_mut() = self.class.status();
        let h = response.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        put(h, "x-request-id", request_id);
        put(h, "x-tollgate-decision", self.class.decision());
        put(h, "x-tollgate-reason", &self.code);
        if let Some(clause) = &self.clause {
            put(h, "x-tollgate-clause", clause);
        }
        if let Some(version) = &self.policy_version {
            put(h, "x-tollgate-policy-version", version);
        }
        if let Some(id) = &self.approval_id {
            put(h, "x-tollgate-approval-id", id);
        }
        if let Some(secs) = self.retry_after_secs {
            h.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

/// Sets a header if the value is a valid header value (config-derived strings always are; a
/// value that is not is left out rather than failing the response).
pub fn put(headers: &mut http::HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// A complete body from bytes.
pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}
