//! Request inspection: what a request body asks for, before it is forwarded.
//!
//! Decides, from one JSON request body, the facts the proxy and the wasm filter need to decide
//! and reserve: the requested model, the output cap, whether it streams (and asks for usage),
//! an input token estimate, and for MCP JSON-RPC bodies each method and `tools/call` tool name
//! with its arguments (for guardrails). It never judges the request, never touches the network
//! and only rejects bodies that are not JSON or that hide a tool call's name.
//!
//! Fields are read leniently: a field of an unexpected type (a REST tool's own `model` object,
//! `"stream": "yes"`) is treated as absent rather than failing the request, since the upstream,
//! not the proxy, owns the schema. Only invalid JSON is an error, because no upstream could read
//! it either and guardrails could not check it.

mod loose;
mod rewrite;

#[cfg(test)]
mod tests;

use std::borrow::Cow;

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::Value;

pub use rewrite::with_include_usage;

use crate::metering::{tokens_from_bytes, Api};
use loose::{Loose, Prompt, Tools};

/// Tokens charged per inline attachment (base64 `data:` URL or `data` / `file_data` field)
/// instead of counting its encoded bytes as text: roughly a large image for current OpenAI and
/// Anthropic models. Documents priced per page may cost more.
pub const ATTACHMENT_TOKENS: u64 = 1_600;

/// What a request body asks for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestInfo {
    /// The requested model, as the client named it.
    pub model: Option<String>,
    /// The output cap: the largest of `max_tokens`, `max_completion_tokens` and
    /// `max_output_tokens` present, so a reservation is never below what may be produced.
    pub max_output_tokens: Option<u64>,
    pub stream: bool,
    /// OpenAI `stream_options.include_usage` is `true`.
    pub include_usage: bool,
    /// Estimated input tokens: `ceil(bytes / 4)` over every key and string value of
    /// `messages`, `input`, `prompt`, `system`, `instructions` and `tools` (numbers, e.g. token
    /// arrays, count one token each), plus [`ATTACHMENT_TOKENS`] per inline attachment. For an
    /// LLM endpoint whose body has none of those fields, `ceil(body bytes / 4)`; otherwise 0.
    pub input_estimate_tokens: u64,
    /// What bounds the input tokens from above, for the reservation
    /// ([`crate::reservation::input_bound`]).
    pub input: InputMeasure,
    /// JSON-RPC requests in the body: one, or several for a batch; empty for other bodies.
    /// Responses and notifications without a `method` are not listed.
    pub rpc: Vec<RpcCall>,
}

impl RequestInfo {
    /// The MCP tool calls in the body, in order.
    pub fn tool_calls(&self) -> impl Iterator<Item = &ToolCall> {
        self.rpc.iter().filter_map(|c| c.tool.as_ref())
    }
}

/// The parts of a request body that bound its input tokens.
///
/// Every token a provider bills for text covers at least one byte of that text, and all text the
/// model reads is in the body (as JSON, with keys, quotes and escapes that only add bytes), so
/// `text_bytes` bounds the text tokens. Images and files are bounded per item instead of per
/// byte. `open` marks input the body does not contain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InputMeasure {
    /// The body's length minus the base64 bytes of the images and files counted below.
    pub text_bytes: u64,
    /// Image content parts (OpenAI `image_url` / `input_image`, Anthropic `image`, `data:image/`
    /// URLs), inline or by URL.
    pub images: u64,
    /// File content parts (OpenAI `file` / `input_file`, Anthropic `document`, other `data:`
    /// URLs), inline or by id or URL.
    pub files: u64,
    /// The request offers tools (`tools` present).
    pub tools: bool,
    /// The request brings in input that is not in its body: a previous response or a
    /// conversation (`previous_response_id`, `conversation`), a stored prompt (`prompt` as an
    /// object), remote MCP servers (`mcp_servers`), web search (`web_search_options`) or a tool
    /// the provider runs itself (web search, file search, code execution, ...), whose results
    /// are billed as input.
    pub open: bool,
}

/// One JSON-RPC request.
#[derive(Clone, Debug, PartialEq)]
pub struct RpcCall {
    pub method: String,
    /// The request id, echoed in a denial; `None` for a notification.
    pub id: Option<Value>,
    /// Set when `method` is `tools/call`.
    pub tool: Option<ToolCall>,
}

/// An MCP `tools/call`.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// `params.arguments` as sent (`Null` when absent).
    pub arguments: Value,
}

/// Why a request body could not be inspected; the proxy answers 400.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InspectError {
    /// Not JSON, or a field inspection reads appears twice at the top level (parsers disagree
    /// on which copy wins, so a guardrail could check one and the upstream act on the other).
    #[error("request body is not valid JSON (line {line}, column {column})")]
    Malformed { line: usize, column: usize },
    #[error("JSON-RPC tools/call has no string params.name (batch index {index})")]
    ToolCallWithoutName { index: usize },
}

impl From<serde_json::Error> for InspectError {
    fn from(e: serde_json::Error) -> Self {
        InspectError::Malformed { line: e.line(), column: e.column() }
    }
}

/// The top-level fields of a request object that inspection reads; everything else is skipped
/// unread.
#[derive(Default, Deserialize)]
#[serde(default)]
struct Request<'a> {
    #[serde(borrow)]
    model: Loose<Cow<'a, str>>,
    max_tokens: Loose<u64>,
    max_completion_tokens: Loose<u64>,
    max_output_tokens: Loose<u64>,
    stream: Loose<bool>,
    stream_options: Option<Value>,
    messages: Prompt,
    input: Prompt,
    prompt: Prompt,
    system: Prompt,
    instructions: Prompt,
    tools: Tools,
    previous_response_id: Option<IgnoredAny>,
    conversation: Option<IgnoredAny>,
    mcp_servers: Option<IgnoredAny>,
    web_search_options: Option<IgnoredAny>,
    #[serde(borrow)]
    jsonrpc: Loose<Cow<'a, str>>,
    method: Loose<String>,
    id: Option<Value>,
    params: Option<Value>,
}

/// Inspects a request body for `api` (`None`: not a known LLM endpoint, e.g. an MCP server or
/// a REST tool). Call it for JSON bodies only; an empty body yields the defaults.
pub fn inspect(api: Option<Api>, body: &[u8]) -> Result<RequestInfo, InspectError> {
    // Used when no prompt field is found.
    let whole_body = match api {
        Some(_) => tokens_from_bytes(body.len() as u64),
        None => 0,
    };
    // The input measure matters for LLM endpoints only.
    let body_bytes = if api.is_some() { body.len() as u64 } else { 0 };
    let unparsed = InputMeasure { text_bytes: body_bytes, ..InputMeasure::default() };
    match body.trim_ascii_start().first() {
        None => Ok(RequestInfo::default()),
        Some(b'{') => {
            let r: Request<'_> = serde_json::from_slice(body)?;
            let prompt =
                [&r.messages, &r.input, &r.prompt, &r.system, &r.instructions, &r.tools.prompt];
            let present = prompt.iter().any(|p| p.present);
            let sum =
                |f: fn(&Prompt) -> u64| prompt.iter().map(|p| f(p)).fold(0u64, u64::saturating_add);
            let estimate = if present {
                let attachments = sum(|p| p.attachments);
                tokens_from_bytes(sum(|p| p.bytes))
                    .saturating_add(attachments.saturating_mul(ATTACHMENT_TOKENS))
            } else {
                whole_body
            };
            let measured = InputMeasure {
                text_bytes: body_bytes.saturating_sub(sum(|p| p.item_bytes)),
                images: sum(|p| p.images),
                files: sum(|p| p.files),
                tools: r.tools.prompt.present,
                open: r.tools.server_side
                    || r.web_search_options.is_some()
                    || r.prompt.is_map
                    || r.previous_response_id.is_some()
                    || r.conversation.is_some()
                    || r.mcp_servers.is_some(),
            };
            let input = if api.is_some() { measured } else { InputMeasure::default() };
            let caps = [r.max_tokens.0, r.max_completion_tokens.0, r.max_output_tokens.0];
            let mut rpc = Vec::new();
            if let (Some(_), Some(method)) = (r.jsonrpc.0, r.method.0) {
                rpc.push(rpc_call(method, r.id, r.params, 0)?);
            }
            Ok(RequestInfo {
                model: r.model.0.map(Cow::into_owned),
                max_output_tokens: caps.into_iter().flatten().max(),
                stream: r.stream.0.unwrap_or(false),
                include_usage: r
                    .stream_options
                    .as_ref()
                    .and_then(|o| o.get("include_usage"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                input_estimate_tokens: estimate,
                input,
                rpc,
            })
        }
        Some(b'[') => {
            let items: Vec<Value> = serde_json::from_slice(body)?;
            let mut rpc = Vec::new();
            for (index, item) in items.into_iter().enumerate() {
                let Value::Object(mut m) = item else { continue };
                let method = match m.remove("method") {
                    Some(Value::String(method)) if m.contains_key("jsonrpc") => method,
                    _ => continue,
                };
                rpc.push(rpc_call(method, m.remove("id"), m.remove("params"), index)?);
            }
            Ok(RequestInfo {
                input_estimate_tokens: whole_body,
                input: unparsed,
                rpc,
                ..RequestInfo::default()
            })
        }
        Some(_) => {
            serde_json::from_slice::<IgnoredAny>(body)?;
            Ok(RequestInfo {
                input_estimate_tokens: whole_body,
                input: unparsed,
                ..RequestInfo::default()
            })
        }
    }
}

fn rpc_call(
    method: String,
    id: Option<Value>,
    params: Option<Value>,
    index: usize,
) -> Result<RpcCall, InspectError> {
    let id = id.filter(|id| !id.is_null());
    if method != "tools/call" {
        return Ok(RpcCall { method, id, tool: None });
    }
    // A tools/call whose name guardrails cannot read must not pass unchecked.
    let Some(Value::Object(mut params)) = params else {
        return Err(InspectError::ToolCallWithoutName { index });
    };
    let Some(Value::String(name)) = params.remove("name") else {
        return Err(InspectError::ToolCallWithoutName { index });
    };
    let arguments = params.remove("arguments").unwrap_or(Value::Null);
    Ok(RpcCall { method, id, tool: Some(ToolCall { name, arguments }) })
}
