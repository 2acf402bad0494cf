//! Anthropic's Messages API wire format (`POST /v1/messages`), as a JSON body and as an SSE
//! stream, plus Anthropic's error body.
//!
//! Quirks reproduced on purpose: `message_start` reports the input and cache counts with
//! `output_tokens: 1`; the one `message_delta` near the end carries the **cumulative**
//! `output_tokens` (not an increment); a `ping` follows the first `content_block_start`.

use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use super::body::{self, MockBody};
use super::call::{Call, Usage};

/// `POST /v1/messages`.
pub fn messages(call: &Call) -> Response<MockBody> {
    let id = format!("msg_mock_{}", call.seq);
    if !call.stream {
        return body::json(
            StatusCode::OK,
            &json!({
                "id": id,
                "type": "message",
                "role": "assistant",
                "model": call.model,
                "content": [{"type": "text", "text": call.text()}],
                "stop_reason": "end_turn",
                "stop_sequence": null,
                "usage": usage(&call.usage, call.usage.output),
            }),
        );
    }
    let message = json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": call.model,
        "content": [],
        "stop_reason": null,
        "stop_sequence": null,
        "usage": usage(&call.usage, 1),
    });
    let mut events = Vec::with_capacity(call.events + 6);
    let mut push = |kind: &str, payload: Value| events.push(body::event(kind, &payload));
    push("message_start", json!({"type": "message_start", "message": message}));
    push(
        "content_block_start",
        json!({
            "type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""},
        }),
    );
    push("ping", json!({"type": "ping"}));
    for index in 0..call.events {
        push(
            "content_block_delta",
            json!({
                "type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": Call::word(index)},
            }),
        );
    }
    push("content_block_stop", json!({"type": "content_block_stop", "index": 0}));
    push(
        "message_delta",
        json!({
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": call.usage.output},
        }),
    );
    push("message_stop", json!({"type": "message_stop"}));
    body::sse(events, call.knobs.event_delay, call.knobs.reset_after)
}

/// Anthropic's error body, `{"type": "error", "error": {"type", "message"}}`, with the error
/// type Anthropic uses for that status.
/// Models the mock lists (`GET /v1/models` with `anthropic-version`).
pub const MODELS: [&str; 2] = ["claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001"];

/// `GET /v1/models`: Anthropic's paginated model list.
pub fn models() -> Response<MockBody> {
    let data: Vec<Value> = MODELS.iter().map(|id| model_card(id)).collect();
    body::json(
        StatusCode::OK,
        &json!({"data": data, "has_more": false, "first_id": MODELS[0], "last_id": MODELS[1]}),
    )
}

/// `GET /v1/models/{id}`: one model, or Anthropic's 404.
pub fn model(id: &str) -> Response<MockBody> {
    if MODELS.contains(&id) {
        body::json(StatusCode::OK, &model_card(id))
    } else {
        error(StatusCode::NOT_FOUND, &format!("model: {id}"))
    }
}

fn model_card(id: &str) -> Value {
    json!({"type": "model", "id": id, "display_name": id, "created_at": "2025-09-29T00:00:00Z"})
}

pub fn error(status: StatusCode, message: &str) -> Response<MockBody> {
    let kind = match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    body::json(status, &json!({"type": "error", "error": {"type": kind, "message": message}}))
}

fn usage(usage: &Usage, output: u64) -> Value {
    json!({
        "input_tokens": usage.input,
        "cache_creation_input_tokens": usage.cache_write,
        "cache_read_input_tokens": usage.cached,
        "output_tokens": output,
    })
}
