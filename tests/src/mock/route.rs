//! Turns one HTTP request into one mock response: records it, applies the `x-mock-*`
//! overrides that apply to every route (head delay, status), and dispatches by path.
//!
//! Knows which provider owns which path (to shape errors); never builds a provider body itself.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;

use super::body::{self, MockBody};
use super::call::{Call, Knobs};
use super::{anthropic, compress, openai, tools, Journal, RecordedRequest};

/// Health check path; answered before recording so probes do not pollute the journal.
const HEALTH: &str = "/__mock/health";

/// Shared by every connection of one server.
#[derive(Debug)]
pub struct State {
    journal: Option<Journal>,
    seq: AtomicU64,
}

impl State {
    pub fn new(journal: Option<Journal>) -> State {
        State { journal, seq: AtomicU64::new(0) }
    }
}

/// Which error body shape a path speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    OpenAi,
    Anthropic,
}

impl Dialect {
    fn of(path: &str) -> Dialect {
        if path == "/v1/messages" {
            Dialect::Anthropic
        } else {
            Dialect::OpenAi
        }
    }

    fn error(self, status: StatusCode, message: &str) -> Response<MockBody> {
        match self {
            Dialect::OpenAi => openai::error(status, message),
            Dialect::Anthropic => anthropic::error(status, message),
        }
    }
}

/// The service function of every connection.
pub async fn handle(
    request: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<MockBody>, Infallible> {
    if request.uri().path() == HEALTH {
        return Ok(body::json(StatusCode::OK, &serde_json::json!({"ok": true})));
    }
    let seq = state.seq.fetch_add(1, Ordering::Relaxed) + 1;
    let (parts, incoming) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let dialect = Dialect::of(&path);
    let collected = incoming.collect().await.map(http_body_util::Collected::to_bytes);
    if let Some(journal) = &state.journal {
        journal.record(RecordedRequest {
            method: parts.method.clone(),
            path: path.clone(),
            query: parts.uri.query().map(str::to_owned),
            headers: parts.headers.clone(),
            body: collected.as_ref().cloned().unwrap_or_default(),
            version: parts.version,
            complete: collected.is_ok(),
        });
    }
    let bytes = match collected {
        Ok(bytes) => bytes,
        Err(e) => {
            let message = format!("cannot read request body: {e}");
            return Ok(dialect.error(StatusCode::BAD_REQUEST, &message));
        }
    };
    let mut response = match Knobs::from_headers(&parts.headers) {
        Err(e) => dialect.error(StatusCode::BAD_REQUEST, &e.to_string()),
        Ok(knobs) => {
            if !knobs.head_delay.is_zero() {
                tokio::time::sleep(knobs.head_delay).await;
            }
            match knobs.status {
                Some(status) if status.as_u16() >= 400 => {
                    dialect.error(status, &format!("mock error {} (x-mock-status)", status))
                }
                status => {
                    let mut response = dispatch(&parts.method, &path, seq, bytes, knobs);
                    if let Some(status) = status {
                        *response.status_mut() = status;
                    }
                    response
                }
            }
        }
    };
    if let Ok(id) = HeaderValue::from_str(&format!("mock-{seq}")) {
        response.headers_mut().insert("x-request-id", id);
    }
    Ok(compress::apply(&parts.headers, response))
}

fn dispatch(
    method: &Method,
    path: &str,
    seq: u64,
    bytes: Bytes,
    knobs: Knobs,
) -> Response<MockBody> {
    type Provider = fn(&Call) -> Response<MockBody>;
    // The Anthropic SDK sends `anthropic-version`; the paths it shares with OpenAI answer in
    // its shape then.
    let anthropic = knobs.anthropic;
    let provider: Provider = match (method, path) {
        (&Method::POST, "/v1/chat/completions") => openai::chat,
        (&Method::POST, "/v1/completions") => openai::completions,
        (&Method::POST, "/v1/embeddings") => openai::embeddings,
        (&Method::POST, "/v1/responses") => openai::responses,
        (&Method::POST, "/v1/messages") => anthropic::messages,
        (&Method::POST, "/mcp") => return tools::mcp(&bytes),
        (&Method::GET, "/v1/models") if anthropic => return anthropic::models(),
        (&Method::GET, "/v1/models") => return openai::models(),
        (&Method::GET, models) if models.starts_with("/v1/models/") => {
            let id = &models["/v1/models/".len()..];
            return if anthropic { anthropic::model(id) } else { openai::model(id) };
        }
        (_, tools_path) if tools_path.starts_with("/tools/") => {
            return tools::rest(method, tools_path)
        }
        _ => {
            let message = format!("mock upstream has no route for {method} {path}");
            return openai::error(StatusCode::NOT_FOUND, &message);
        }
    };
    let dialect = Dialect::of(path);
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(request @ Value::Object(_)) => provider(&Call::new(seq, request, bytes.len(), knobs)),
        _ => dialect.error(StatusCode::BAD_REQUEST, "request body is not a JSON object"),
    }
}
