//! OpenAI's wire formats: chat completions, legacy completions, embeddings and the Responses
//! API, as JSON bodies and as SSE streams, plus OpenAI's error body.
//!
//! Quirks reproduced on purpose: chat and completions streams end with `data: [DONE]`; the
//! usage chunk (with `"choices": []`) is sent only when the request asked for
//! `stream_options.include_usage`, and then every earlier chunk carries `"usage": null`. The
//! Responses stream has `event:` lines, no `[DONE]`, and reports usage only in
//! `response.completed`.

use bytes::Bytes;
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use super::body::{self, MockBody};
use super::call::{Call, Usage};

/// `created` timestamp of every response: fixed, so bodies are reproducible.
const CREATED: u64 = 1_700_000_000;
/// Dimensions of the mock embedding vectors.
const EMBEDDING_DIMENSIONS: usize = 8;

/// `POST /v1/chat/completions`.
pub fn chat(call: &Call) -> Response<MockBody> {
    let id = format!("chatcmpl-mock-{}", call.seq);
    if !call.stream {
        let message = json!({"role": "assistant", "content": call.text(), "refusal": null});
        return body::json(
            StatusCode::OK,
            &json!({
                "id": id,
                "object": "chat.completion",
                "created": CREATED,
                "model": call.model,
                "choices": [
                    {"index": 0, "message": message, "logprobs": null, "finish_reason": "stop"}
                ],
                "usage": chat_usage(&call.usage),
            }),
        );
    }
    let chunk = |delta: Value, finish_reason: Value| {
        let choice = json!({
            "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason,
        });
        stream_chunk(call, &id, "chat.completion.chunk", choice)
    };
    let mut events = Vec::with_capacity(call.events + 4);
    events.push(chunk(json!({"role": "assistant", "content": ""}), Value::Null));
    for index in 0..call.events {
        events.push(chunk(json!({"content": Call::word(index)}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    finish_stream(call, &id, "chat.completion.chunk", chat_usage(&call.usage), events)
}

/// `POST /v1/completions` (legacy text completions).
pub fn completions(call: &Call) -> Response<MockBody> {
    let id = format!("cmpl-mock-{}", call.seq);
    let usage = json!({
        "prompt_tokens": call.usage.input,
        "completion_tokens": call.usage.output,
        "total_tokens": call.usage.input.saturating_add(call.usage.output),
    });
    if !call.stream {
        return body::json(
            StatusCode::OK,
            &json!({
                "id": id,
                "object": "text_completion",
                "created": CREATED,
                "model": call.model,
                "choices": [
                    {"text": call.text(), "index": 0, "logprobs": null, "finish_reason": "stop"}
                ],
                "usage": usage,
            }),
        );
    }
    let chunk = |text: &str, finish_reason: Value| {
        let choice =
            json!({"text": text, "index": 0, "logprobs": null, "finish_reason": finish_reason});
        stream_chunk(call, &id, "text_completion", choice)
    };
    let mut events = Vec::with_capacity(call.events + 3);
    for index in 0..call.events {
        events.push(chunk(Call::word(index), Value::Null));
    }
    events.push(chunk("", json!("stop")));
    finish_stream(call, &id, "text_completion", usage, events)
}

/// `POST /v1/embeddings`: one vector per input string (a string `input` is one input).
pub fn embeddings(call: &Call) -> Response<MockBody> {
    let inputs = match call.request.get("input") {
        Some(Value::Array(items)) if items.iter().all(|i| i.is_string() || i.is_array()) => {
            items.len()
        }
        _ => 1,
    };
    let data: Vec<Value> = (0..inputs)
        .map(|index| {
            let vector: Vec<f64> = (0..EMBEDDING_DIMENSIONS)
                .map(|d| ((index + d) % EMBEDDING_DIMENSIONS) as f64 / 8.0)
                .collect();
            json!({"object": "embedding", "index": index, "embedding": vector})
        })
        .collect();
    body::json(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": data,
            "model": call.model,
            "usage": {"prompt_tokens": call.usage.input, "total_tokens": call.usage.input},
        }),
    )
}

/// `POST /v1/responses`.
pub fn responses(call: &Call) -> Response<MockBody> {
    let response_id = format!("resp_mock_{}", call.seq);
    let item_id = format!("msg_mock_{}", call.seq);
    let text = call.text();
    let part = json!({"type": "output_text", "text": text, "annotations": []});
    let item = json!({
        "type": "message", "id": item_id, "status": "completed", "role": "assistant",
        "content": [part],
    });
    let response = |status: &str, output: Value, usage: Value| {
        json!({
            "id": response_id,
            "object": "response",
            "created_at": CREATED,
            "status": status,
            "model": call.model,
            "output": output,
            "usage": usage,
        })
    };
    let completed = response("completed", json!([item]), responses_usage(&call.usage));
    if !call.stream {
        return body::json(StatusCode::OK, &completed);
    }
    let in_progress = response("in_progress", json!([]), Value::Null);
    let mut kinds_and_bodies: Vec<(&str, Value)> = vec![
        ("response.created", json!({"response": in_progress})),
        ("response.in_progress", json!({"response": in_progress})),
        (
            "response.output_item.added",
            json!({"output_index": 0, "item": {
                "type": "message", "id": item_id, "status": "in_progress", "role": "assistant",
                "content": [],
            }}),
        ),
        (
            "response.content_part.added",
            json!({
                "item_id": item_id, "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []},
            }),
        ),
    ];
    for index in 0..call.events {
        kinds_and_bodies.push((
            "response.output_text.delta",
            json!({
                "item_id": item_id, "output_index": 0, "content_index": 0,
                "delta": Call::word(index),
            }),
        ));
    }
    kinds_and_bodies.extend([
        (
            "response.output_text.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": text}),
        ),
        (
            "response.content_part.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part}),
        ),
        ("response.output_item.done", json!({"output_index": 0, "item": item})),
        ("response.completed", json!({"response": completed})),
    ]);
    let events = kinds_and_bodies
        .into_iter()
        .enumerate()
        .map(|(sequence, (kind, mut payload))| {
            if let Some(fields) = payload.as_object_mut() {
                fields.insert("type".into(), json!(kind));
                fields.insert("sequence_number".into(), json!(sequence));
            }
            body::event(kind, &payload)
        })
        .collect();
    body::sse(events, call.knobs.event_delay, call.knobs.reset_after)
}

/// OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`, with the type and
/// code OpenAI uses for that status.
/// Models the mock lists (`GET /v1/models`), in both providers' shapes.
pub const MODELS: [&str; 3] = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"];

/// `GET /v1/models`: OpenAI's model list.
pub fn models() -> Response<MockBody> {
    let data: Vec<Value> = MODELS.iter().map(|id| model_card(id)).collect();
    body::json(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`: one model, or OpenAI's 404.
pub fn model(id: &str) -> Response<MockBody> {
    if MODELS.contains(&id) {
        body::json(StatusCode::OK, &model_card(id))
    } else {
        error(StatusCode::NOT_FOUND, &format!("The model '{id}' does not exist"))
    }
}

fn model_card(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": CREATED, "owned_by": "system"})
}

pub fn error(status: StatusCode, message: &str) -> Response<MockBody> {
    let (kind, code) = match status.as_u16() {
        401 => ("invalid_request_error", json!("invalid_api_key")),
        403 => ("invalid_request_error", json!("unsupported_country_region_territory")),
        404 => ("invalid_request_error", json!("model_not_found")),
        429 => ("requests", json!("rate_limit_exceeded")),
        500..=599 => ("server_error", Value::Null),
        _ => ("invalid_request_error", Value::Null),
    };
    body::json(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    )
}

fn chat_usage(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.input,
        "completion_tokens": usage.output,
        "total_tokens": usage.input.saturating_add(usage.output),
        "prompt_tokens_details": {"cached_tokens": usage.cached},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning},
    })
}

fn responses_usage(usage: &Usage) -> Value {
    json!({
        "input_tokens": usage.input,
        "input_tokens_details": {"cached_tokens": usage.cached},
        "output_tokens": usage.output,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning},
        "total_tokens": usage.input.saturating_add(usage.output),
    })
}

/// One `data:` chunk of a chat or completions stream; with include_usage it carries
/// `"usage": null` as OpenAI's do.
fn stream_chunk(call: &Call, id: &str, object: &str, choice: Value) -> Bytes {
    let mut chunk = json!({
        "id": id, "object": object, "created": CREATED, "model": call.model, "choices": [choice],
    });
    if call.include_usage {
        if let Some(fields) = chunk.as_object_mut() {
            fields.insert("usage".into(), Value::Null);
        }
    }
    body::data(&chunk)
}

/// Appends the usage chunk (only with include_usage) and `[DONE]`, and starts streaming.
fn finish_stream(
    call: &Call,
    id: &str,
    object: &str,
    usage: Value,
    mut events: Vec<Bytes>,
) -> Response<MockBody> {
    if call.include_usage {
        events.push(body::data(&json!({
            "id": id, "object": object, "created": CREATED, "model": call.model,
            "choices": [], "usage": usage,
        })));
    }
    events.push(body::done());
    body::sse(events, call.knobs.event_delay, call.knobs.reset_after)
}
