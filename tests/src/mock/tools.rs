//! The tool side: an MCP server speaking JSON-RPC over HTTP at `POST /mcp`, and a REST tool
//! server that answers anything under `/tools/`.
//!
//! Answers every call with success; never runs a tool.

use bytes::Bytes;
use hyper::{Method, Response, StatusCode};
use serde_json::{json, Value};

use super::body::{self, MockBody};

/// MCP protocol revision reported by `initialize` when the client names none.
const PROTOCOL_VERSION: &str = "2025-06-18";

/// `POST /mcp`: `initialize`, `ping`, `tools/list` and `tools/call` (always `"ok"`); a
/// notification (no `id`) gets `202 Accepted`; other methods get JSON-RPC `-32601`.
pub fn mcp(request: &Bytes) -> Response<MockBody> {
    let Ok(request) = serde_json::from_slice::<Value>(request) else {
        return rpc_error(StatusCode::BAD_REQUEST, Value::Null, -32700, "Parse error");
    };
    let Some(id) = request.get("id").cloned() else {
        let mut accepted = Response::new(MockBody::empty());
        *accepted.status_mut() = StatusCode::ACCEPTED;
        return accepted;
    };
    let result = match request.get("method").and_then(Value::as_str) {
        Some("initialize") => {
            let version = request
                .pointer("/params/protocolVersion")
                .and_then(Value::as_str)
                .unwrap_or(PROTOCOL_VERSION);
            json!({
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {"name": "mock-upstream", "version": env!("CARGO_PKG_VERSION")},
            })
        }
        Some("ping") => json!({}),
        Some("tools/list") => json!({"tools": [
            {
                "name": "echo",
                "description": "Returns its text argument.",
                "inputSchema": {
                    "type": "object",
                    "properties": {"text": {"type": "string"}},
                    "required": ["text"],
                },
            },
            {
                "name": "delete_records",
                "description": "Deletes records (a destructive tool for guardrail tests).",
                "inputSchema": {
                    "type": "object",
                    "properties": {"table": {"type": "string"}, "count": {"type": "integer"}},
                },
            },
        ]}),
        Some("tools/call") => json!({"content": [{"type": "text", "text": "ok"}]}),
        _ => return rpc_error(StatusCode::OK, id, -32601, "Method not found"),
    };
    body::json(StatusCode::OK, &json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

/// Any method on `/tools/...`: `200 {"ok": true, "method", "path"}`.
pub fn rest(method: &Method, path: &str) -> Response<MockBody> {
    body::json(StatusCode::OK, &json!({"ok": true, "method": method.as_str(), "path": path}))
}

fn rpc_error(status: StatusCode, id: Value, code: i64, message: &str) -> Response<MockBody> {
    body::json(
        status,
        &json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}),
    )
}
