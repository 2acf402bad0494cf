use serde_json::json;

use super::*;

fn info(api: Option<Api>, body: &str) -> RequestInfo {
    inspect(api, body.as_bytes()).expect("inspectable")
}

#[test]
fn openai_chat_request_fields() {
    let body = r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},
        "max_completion_tokens":512,"messages":[{"role":"user","content":"abcdefgh"}]}"#;
    let got = info(Some(Api::ChatCompletions), body);
    assert_eq!(got.model.as_deref(), Some("gpt-4o"));
    assert_eq!(got.max_output_tokens, Some(512));
    assert!(got.stream && got.include_usage);
    // "role" 4 + "user" 4 + "content" 7 + "abcdefgh" 8 = 23 bytes -> 6 tokens.
    assert_eq!(got.input_estimate_tokens, 6);
    assert!(got.rpc.is_empty());
}

#[test]
fn output_cap_is_the_largest_named_field() {
    let cases = [
        (r#"{"max_tokens":100}"#, Some(100)),
        (r#"{"max_output_tokens":300}"#, Some(300)),
        (r#"{"max_tokens":100,"max_completion_tokens":250}"#, Some(250)),
        (r#"{"max_tokens":"100"}"#, None),
        (r#"{"max_tokens":-1}"#, None),
        (r#"{"max_tokens":null}"#, None),
        (r#"{}"#, None),
    ];
    for (body, want) in cases {
        assert_eq!(info(Some(Api::Messages), body).max_output_tokens, want, "{body}");
    }
}

#[test]
fn input_estimate_covers_every_prompt_field() {
    // system 8 + messages (role 4 + user 4 + content 7 + 9) + tools (name 4 + f 1) = 37 -> 10.
    let anthropic = r#"{"model":"claude-sonnet-4-20250514","max_tokens":1024,"system":"be brief",
        "messages":[{"role":"user","content":"123456789"}],"tools":[{"name":"f"}]}"#;
    assert_eq!(info(Some(Api::Messages), anthropic).input_estimate_tokens, 10);
    // Responses: instructions 5 + input 8 = 13 -> 4.
    let responses = r#"{"model":"o4-mini","instructions":"terse","input":"question"}"#;
    assert_eq!(info(Some(Api::Responses), responses).input_estimate_tokens, 4);
    // Token arrays count one token per number.
    let embeddings = r#"{"model":"text-embedding-3-small","input":[[1,2,3],[4,5]]}"#;
    assert_eq!(info(Some(Api::Embeddings), embeddings).input_estimate_tokens, 5);
    let completions = r#"{"model":"gpt-3.5-turbo-instruct","prompt":"Say this is a test"}"#;
    assert_eq!(info(Some(Api::Completions), completions).input_estimate_tokens, 5);
}

#[test]
fn inline_attachments_count_flat_not_by_base64_size() {
    let b64 = "iVBORw0KGgo".repeat(1000);
    let openai = format!(
        r#"{{"messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{b64}"}}}}]}}]}}"#
    );
    let got = info(Some(Api::ChatCompletions), &openai);
    // Keys and short strings: role 4 user 4 content 7 type 4 image_url 9 image_url 9 url 3 = 40.
    assert_eq!(got.input_estimate_tokens, 10 + ATTACHMENT_TOKENS);
    let anthropic = format!(
        r#"{{"messages":[{{"role":"user","content":[{{"type":"image","source":{{"type":"base64","media_type":"image/png","data":"{b64}"}}}}]}}]}}"#
    );
    let got = info(Some(Api::Messages), &anthropic);
    assert_eq!(got.input_estimate_tokens, tokens_from_bytes(63) + ATTACHMENT_TOKENS);
}

#[test]
fn body_without_prompt_fields_estimates_from_its_length_only_for_llm_apis() {
    let body = r#"{"model":"gpt-4o","foo":"bar"}"#;
    assert_eq!(info(Some(Api::ChatCompletions), body).input_estimate_tokens, 8);
    assert_eq!(info(None, body).input_estimate_tokens, 0);
}

#[test]
fn fields_of_unexpected_types_are_absent_not_errors() {
    let body =
        r#"{"model":{"id":7},"stream":"yes","stream_options":"x","max_tokens":1.5,"method":3}"#;
    let got = info(None, body);
    assert_eq!(got, RequestInfo::default());
}

#[test]
fn mcp_tool_call_yields_name_and_arguments() {
    let body = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call",
        "params":{"name":"run_shell","arguments":{"command":"rm -rf /"}}}"#;
    let got = info(None, body);
    let call = RpcCall {
        method: "tools/call".into(),
        id: Some(json!(7)),
        tool: Some(ToolCall { name: "run_shell".into(), arguments: json!({"command":"rm -rf /"}) }),
    };
    assert_eq!(got.rpc, vec![call]);
    assert_eq!(got.tool_calls().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["run_shell"]);
    assert_eq!(got.input_estimate_tokens, 0);
}

#[test]
fn other_rpc_methods_and_notifications_are_listed_without_tool() {
    let got = info(None, r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    let want = RpcCall { method: "notifications/initialized".into(), id: None, tool: None };
    assert_eq!(got.rpc, vec![want]);
    // Without "jsonrpc" a "method" field is just a field.
    assert!(info(None, r#"{"method":"tools/call"}"#).rpc.is_empty());
}

#[test]
fn jsonrpc_batch_lists_every_request_in_order() {
    let body = r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},
        {"jsonrpc":"2.0","id":"b","method":"tools/call","params":{"name":"search","arguments":{"q":"x"}}},
        {"jsonrpc":"2.0","id":2,"result":{}},
        42,
        {"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"fetch"}}]"#;
    let got = info(None, body);
    let methods: Vec<&str> = got.rpc.iter().map(|c| c.method.as_str()).collect();
    assert_eq!(methods, ["tools/list", "tools/call", "tools/call"]);
    let tools: Vec<(&str, &Value)> =
        got.tool_calls().map(|t| (t.name.as_str(), &t.arguments)).collect();
    assert_eq!(tools, [("search", &json!({"q":"x"})), ("fetch", &Value::Null)]);
    assert_eq!(got.rpc[1].id, Some(json!("b")));
}

#[test]
fn tool_call_without_a_name_is_an_error() {
    let cases = [
        (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#, 0),
        (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":5}}"#, 0),
        (
            r#"[{"jsonrpc":"2.0","method":"ping"},{"jsonrpc":"2.0","method":"tools/call","params":[]}]"#,
            1,
        ),
    ];
    for (body, index) in cases {
        assert_eq!(
            inspect(None, body.as_bytes()),
            Err(InspectError::ToolCallWithoutName { index }),
            "{body}"
        );
    }
}

#[test]
fn malformed_json_is_an_error_with_its_position() {
    let cases = [
        ("{\"model\": \"gpt-4o\",\n  \"messages\": [}", 2, 16),
        ("{\"model\"", 1, 8),
        ("[1,]", 1, 4),
        ("nope", 1, 2),
        // Parsers disagree on which duplicate wins, so a duplicate read field is refused.
        ("{\"model\":\"a\",\"model\":\"b\"}", 1, 20),
    ];
    for (body, line, column) in cases {
        let got = inspect(Some(Api::ChatCompletions), body.as_bytes());
        assert_eq!(got, Err(InspectError::Malformed { line, column }), "{body}");
    }
}

#[test]
fn empty_and_scalar_bodies_have_nothing_to_inspect() {
    assert_eq!(info(None, ""), RequestInfo::default());
    assert_eq!(info(None, "  \n"), RequestInfo::default());
    assert_eq!(info(None, "\"text\""), RequestInfo::default());
    assert_eq!(info(Some(Api::Messages), "42").input_estimate_tokens, 1);
}

#[test]
fn include_usage_is_added_in_place() {
    let body = br#"{"model":"gpt-4o", "temperature":0.70, "stream":true,"messages":[]}"#;
    let want = br#"{"stream_options":{"include_usage":true},"model":"gpt-4o", "temperature":0.70, "stream":true,"messages":[]}"#;
    assert_eq!(with_include_usage(body).as_deref(), Some(&want[..]));
    let got = inspect(Some(Api::ChatCompletions), want).expect("valid");
    assert!(got.stream && got.include_usage);
}

#[test]
fn include_usage_false_is_turned_on_keeping_other_options() {
    let body = br#"{"stream":true,"stream_options": {"include_obfuscation":false,"include_usage":false} ,"n":1}"#;
    let want = br#"{"stream":true,"stream_options": {"include_obfuscation":false,"include_usage":true} ,"n":1}"#;
    assert_eq!(with_include_usage(body).as_deref(), Some(&want[..]));
    let null = br#"{"stream":true,"stream_options":null}"#;
    let want = br#"{"stream":true,"stream_options":{"include_usage":true}}"#;
    assert_eq!(with_include_usage(null).as_deref(), Some(&want[..]));
}

#[test]
fn include_usage_rewrite_is_skipped_when_not_needed() {
    let cases: [&[u8]; 8] = [
        br#"{"stream":true,"stream_options":{"include_usage":true}}"#,
        // Not UTF-8 inside a key: not JSON, so not rewritten (found by fuzzing).
        b"{\"stream\": true, \"x\x80\x80\": 1}",
        br#"{"stream":false,"messages":[]}"#,
        br#"{"stream":"true"}"#,
        br#"{"messages":[]}"#,
        br#"[{"stream":true}]"#,
        br#"{"stream":true"#,
        b"",
    ];
    for body in cases {
        assert_eq!(with_include_usage(body), None, "{}", String::from_utf8_lossy(body));
    }
}

#[test]
fn include_usage_rewrite_handles_escapes_and_nesting() {
    let body = br#"{"messages":[{"content":"a \"stream\": } ["}],"str\u0065am":true}"#;
    let got = with_include_usage(body).expect("rewritten");
    let v: Value = serde_json::from_slice(&got).expect("valid JSON");
    assert_eq!(v["stream_options"], json!({"include_usage": true}));
    assert_eq!(v["messages"][0]["content"], "a \"stream\": } [");
    assert_eq!(
        with_include_usage(br#"{"stream":true}"#).as_deref(),
        Some(&br#"{"stream_options":{"include_usage":true},"stream":true}"#[..])
    );
}
