use super::*;
use crate::shared::fake::FakeShared;
use serde_json::json;

const DOC: &str = r#"{
  "filter": {"fail": "closed"},
  "policy": {
    "version": "v9",
    "defaults": {"llm": "allow", "tool": "require_approval", "other": "deny"},
    "rules": [
      {"id": "tier4", "match": {"tier": "4", "model": "gpt-4*"}, "effect": "deny",
       "reason": "model_not_allowed_for_tier", "explanation": "no"},
      {"id": "budgeted", "match": {"agent": "budget-bot"}, "effect": "allow",
       "budgets": [{"id": "b", "scope": "agent", "period": "daily", "amount": "0.02"}]},
      {"id": "limited", "match": {"agent": "rpm-bot"}, "effect": "allow", "limits": {"rpm": 1}},
      {"id": "search", "match": {"tool": "search"}, "effect": "allow"}
    ]
  },
  "pricing": {"models": {}, "tools": {"search": {"per_call": "0.01"}}}
}"#;

const NOW: Now = Now { ms: UnixMillis(1_800_000_000_000), ns: 1_800_000_000_000_000_000 };

fn plugin() -> Plugin {
    Plugin::from_document(DOC).unwrap()
}

fn head(path: &str, id: &str) -> Head {
    Head {
        method: "POST".into(),
        path: path.into(),
        authority: Some("llm.local:8080".into()),
        request_id: Some(id.into()),
        route: None,
    }
}

fn headers(
    agent: &'static str,
    extra: &'static [(&'static str, &'static str)],
) -> impl Fn(&str) -> Option<String> {
    move |name| {
        let base =
            [("x-agent-id", agent), ("x-cost-center", "CC-1234"), ("x-project-id", "PROJ-ABC123")];
        base.iter().chain(extra).find(|(n, _)| *n == name).map(|(_, v)| (*v).to_owned())
    }
}

fn body(v: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn missing_attribution_is_refused_in_the_provider_shape() {
    let p = plugin();
    let none = |_: &str| None;
    let (d, shape, id) = Exchange::start(&p, head("/v1/messages", "r1"), none, NOW).unwrap_err();
    assert_eq!(
        (d.class, d.code.as_str(), shape, id.as_str()),
        (Class::Attribution, "attribution_rejected", Shape::Anthropic, "r1")
    );
    assert!(d.message.contains("x-agent-id"), "{}", d.message);
}

#[test]
fn allowed_call_is_metered_priced_and_settled() {
    let p = plugin();
    let data = FakeShared::default();
    let budgets = Live::new(SharedStore::new(&data));
    let mut ex =
        Exchange::start(&p, head("/v1/chat/completions", "r2"), headers("bot", &[]), NOW).unwrap();
    ex.decide(
        &p,
        &budgets,
        &body(json!({"model": "gpt-4o", "max_tokens": 10, "messages": []})),
        NOW,
    )
    .unwrap();
    let h = ex.response_headers(200);
    assert!(h.contains(&("x-tollgate-clause", "defaults.llm")), "{h:?}");
    assert!(h.contains(&("x-tollgate-policy-version", "v9")));
    let response =
        br#"{"model":"gpt-4o-2024-08-06","usage":{"prompt_tokens":100,"completion_tokens":7}}"#;
    // Split anywhere: the meter sees chunks exactly as Envoy hands them over.
    ex.response_chunk(&response[..13], false);
    ex.response_chunk(&response[13..], true);
    let ev = ex.finish(&p, &budgets, NOW, End::ClientGone).unwrap();
    let usage = Usage { input: 100, output: 7, ..Usage::default() };
    let cost = p.engine.rates().price("gpt-4o-2024-08-06", usage).unwrap().cost.total;
    assert_eq!(
        (ev.tokens, ev.cost.total, ev.end, ev.usage_source),
        (usage, cost, End::Complete, UsageSource::Reported)
    );
    assert_eq!(ev.model.as_deref(), Some("gpt-4o-2024-08-06"));
    assert_eq!(ev.price_source, Some(PriceSource::Listed));
    assert_eq!((ev.agent.as_str(), ev.clause.as_str(), ev.status), ("bot", "defaults.llm", 200));
    assert!(ex.finish(&p, &budgets, NOW, End::ClientGone).is_none(), "settled once");
    // What the filter sends is what the collector takes: the same core type, both ways.
    let mut sent = ev.event.clone();
    sent.event_id = "vm-1".into();
    let line = serde_json::to_string(&sent).unwrap();
    let received: UsageEvent = serde_json::from_str(&line).unwrap();
    assert_eq!(received, sent);
    let record = received.into_record(NOW.ms).expect("the collector accepts it");
    assert_eq!(
        (record.cost_total(), record.end, record.source.as_deref()),
        (cost, End::Complete, Some("envoy"))
    );
}

#[test]
fn an_answer_from_an_unpriced_model_is_charged_at_the_requested_models_price() {
    let p = plugin();
    let data = FakeShared::default();
    let budgets = Live::new(SharedStore::new(&data));
    let mut ex =
        Exchange::start(&p, head("/v1/chat/completions", "r2b"), headers("bot", &[]), NOW).unwrap();
    let request = json!({"model": "gpt-4o", "max_tokens": 10, "messages": []});
    ex.decide(&p, &budgets, &body(request), NOW).unwrap();
    ex.response_headers(200);
    let response = br#"{"model":"mystery-7","usage":{"prompt_tokens":100,"completion_tokens":7}}"#;
    ex.response_chunk(response, true);
    let ev = ex.finish(&p, &budgets, NOW, End::ClientGone).unwrap();
    let usage = Usage { input: 100, output: 7, ..Usage::default() };
    let cost = p.engine.rates().price("gpt-4o", usage).unwrap().cost.total;
    assert!(cost > Money::ZERO);
    assert_eq!(
        (ev.model.as_deref(), ev.cost.total, ev.price_source),
        (Some("mystery-7"), cost, Some(PriceSource::RequestedModel))
    );
    let line = serde_json::to_value(&ev.event).unwrap();
    assert_eq!(line["price_source"], "requested_model", "{line}");
}

#[test]
fn client_gone_mid_stream_is_charged_from_what_was_seen() {
    let p = plugin();
    let data = FakeShared::default();
    let budgets = Live::new(SharedStore::new(&data));
    let mut ex =
        Exchange::start(&p, head("/v1/chat/completions", "r3"), headers("budget-bot", &[]), NOW)
            .unwrap();
    let req = body(
        json!({"model": "gpt-4o", "max_tokens": 100, "stream": true, "messages": [{"role": "user", "content": "hello there"}]}),
    );
    ex.decide(&p, &budgets, &req, NOW).unwrap();
    let _ = ex.response_headers(200);
    ex.response_chunk(
        b"data: {\"choices\":[{\"delta\":{\"content\":\"Hello world\"}}]}\n\n",
        false,
    );
    let ev = ex.finish(&p, &budgets, NOW, End::ClientGone).unwrap();
    assert_eq!((ev.end, ev.usage_source), (End::ClientGone, UsageSource::Estimated));
    assert!(ev.tokens.output > 0 && ev.cost.total.nanos() > 0, "{ev:?}");
    // The reservation was replaced by the actual cost on the shared counter.
    let spec = p.engine.policy().all_budgets().find(|b| b.id == "b").unwrap();
    let status = budgets.shared.status(spec, "budget-bot", NOW.ms).unwrap();
    assert_eq!((status.spent.nanos(), status.reserved.nanos()), (ev.cost.total.nanos(), 0));
}

#[test]
fn budget_refuses_with_402_once_reservations_fill_it() {
    let p = plugin();
    let data = FakeShared::default();
    let budgets = Live::new(SharedStore::new(&data));
    let req = body(json!({"model": "gpt-4o", "max_tokens": 900, "messages": []}));
    let mut outcomes = Vec::new();
    let mut open = Vec::new();
    for i in 0..4 {
        let mut ex = Exchange::start(
            &p,
            head("/v1/chat/completions", &format!("b{i}")),
            headers("budget-bot", &[]),
            NOW,
        )
        .unwrap();
        match ex.decide(&p, &budgets, &req, NOW) {
            Ok(Decided::Admitted) => {
                outcomes.push(200);
                open.push(ex);
            }
            Ok(Decided::Short(_) | Decided::Approval(_)) => panic!("neither short nor asking"),
            Err(d) => {
                assert_eq!(
                    (d.code.as_str(), d.clause.as_deref()),
                    ("budget_exceeded", Some("budgeted"))
                );
                outcomes.push(d.class.status());
            }
        }
    }
    // Worst case ~ $0.0093 each against $0.02: 900 output tokens ($0.009) and at most the
    // body's bytes plus 64 input tokens ($0.0003).
    assert_eq!(outcomes, [200, 200, 402, 402]);
}

#[test]
fn policy_denial_approval_unknown_model_and_rate_limit() {
    let p = plugin();
    let data = FakeShared::default();
    let budgets = Live::new(SharedStore::new(&data));
    let decide = |agent: &'static str,
                  extra: &'static [(&'static str, &'static str)],
                  path: &str,
                  b: serde_json::Value| {
        let mut ex = Exchange::start(&p, head(path, "x"), headers(agent, extra), NOW).unwrap();
        ex.decide(&p, &budgets, &body(b), NOW)
            .err()
            .map(|d| (d.class.status(), d.code, d.clause, d.approval_id))
    };
    assert_eq!(
        decide("a", &[("x-agent-tier", "4")], "/v1/chat/completions", json!({"model": "gpt-4o"})),
        Some((403, "model_not_allowed_for_tier".into(), Some("tier4".into()), None))
    );
    assert_eq!(
        decide("a", &[], "/v1/chat/completions", json!({"model": "gpt-unknown"})),
        Some((403, "unknown_model".into(), Some("defaults.llm".into()), None))
    );
    let call = |tool: &str| json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool}});
    assert_eq!(
        decide("a", &[], "/mcp", call("shell")),
        Some((403, "default_require_approval".into(), Some("defaults.tool".into()), None))
    );
    assert_eq!(decide("a", &[], "/mcp", call("search")), None);
    assert_eq!(
        decide("a", &[], "/internal", json!({})),
        Some((403, "default_deny".into(), Some("defaults.other".into()), None))
    );
    assert_eq!(decide("rpm-bot", &[], "/v1/chat/completions", json!({"model": "gpt-4o"})), None);
    let limited = decide("rpm-bot", &[], "/v1/chat/completions", json!({"model": "gpt-4o"}));
    assert_eq!(limited.map(|l| (l.0, l.1)), Some((429, "rate_limited_requests".into())));
    let mut ex =
        Exchange::start(&p, head("/v1/chat/completions", "m"), headers("a", &[]), NOW).unwrap();
    let d = ex.decide(&p, &budgets, br#"{"model": "gpt-4o", "#, NOW).unwrap_err();
    assert_eq!((d.class.status(), d.code.as_str()), (400, "malformed_body"));
}

#[test]
fn model_listings_are_free_missing_models_are_400_and_mcp_session_methods_are_tool_requests() {
    let p = plugin();
    let data = FakeShared::default();
    let budgets = Live::new(SharedStore::new(&data));
    // `GET /v1/models` of either provider: decided as llm, $0, nothing reserved, recorded free.
    const ANTHROPIC: &[(&str, &str)] = &[("anthropic-version", "2023-06-01")];
    for (extra, provider, shape) in
        [(&[][..], "openai", Shape::OpenAi), (ANTHROPIC, "anthropic", Shape::Anthropic)]
    {
        let get = Head { method: "GET".into(), ..head("/v1/models?limit=5", "free") };
        let mut ex = Exchange::start(&p, get, headers("lister", extra), NOW).unwrap();
        assert_eq!(ex.shape, shape);
        ex.decide(&p, &budgets, b"", NOW).unwrap();
        assert!(ex.response_headers(200).contains(&("x-tollgate-clause", "defaults.llm")));
        ex.response_chunk(br#"{"object":"list","data":[]}"#, true);
        let ev = ex.finish(&p, &budgets, NOW, End::ClientGone).unwrap();
        assert_eq!(
            (ev.provider.as_str(), ev.cost.total, ev.price_source, ev.agent.as_str()),
            (provider, Money::ZERO, Some(PriceSource::Free), "lister")
        );
    }
    // Any other LLM request without a model: 400 naming what is missing.
    let mut ex =
        Exchange::start(&p, head("/v1/chat/completions", "nm"), headers("a", &[]), NOW).unwrap();
    let d = ex.decide(&p, &budgets, &body(json!({"messages": []})), NOW).unwrap_err();
    assert_eq!((d.class.status(), d.code.as_str()), (400, "missing_model"));
    assert!(d.message.starts_with("POST /v1/chat/completions names no model"), "{}", d.message);
    // MCP initialize / tools/list / notifications: the tool default decides (here
    // require_approval), not the `other` default.
    for rpc in [
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    ] {
        let mut ex = Exchange::start(&p, head("/mcp", "i"), headers("a", &[]), NOW).unwrap();
        let d = ex.decide(&p, &budgets, &body(rpc.clone()), NOW).unwrap_err();
        assert_eq!(
            (d.code.as_str(), d.clause.as_deref()),
            ("default_require_approval", Some("defaults.tool")),
            "{rpc}"
        );
    }
}

/// Shared data that always fails, to exercise the fail policy.
struct Down;
impl SharedData for Down {
    fn get(&self, _: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        Err(StoreError::Unavailable { reason: "down".into() })
    }
    fn set(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<bool, StoreError> {
        Err(StoreError::Unavailable { reason: "down".into() })
    }
}

#[test]
fn store_failure_follows_the_fail_policy() {
    let mut p = plugin();
    let budgets = Live::new(SharedStore::new(Down));
    let req = body(json!({"model": "gpt-4o", "max_tokens": 10}));
    let mut ex =
        Exchange::start(&p, head("/v1/chat/completions", "f1"), headers("budget-bot", &[]), NOW)
            .unwrap();
    let d = ex.decide(&p, &budgets, &req, NOW).unwrap_err();
    assert_eq!((d.class.status(), d.code.as_str()), (503, "budget_store_unavailable"));
    p.filter.fail = FailPolicy::Open;
    let mut ex =
        Exchange::start(&p, head("/v1/chat/completions", "f2"), headers("budget-bot", &[]), NOW)
            .unwrap();
    ex.decide(&p, &budgets, &req, NOW).unwrap();
    let _ = ex.response_headers(200);
    ex.response_chunk(br#"{"usage":{"prompt_tokens":3,"completion_tokens":2}}"#, true);
    let ev = ex.finish(&p, &budgets, NOW, End::ClientGone).unwrap();
    assert_eq!(ev.tokens.output, 2, "still metered without a reservation");
}

#[test]
fn upstream_error_is_not_charged() {
    let p = plugin();
    let data = FakeShared::default();
    let budgets = Live::new(SharedStore::new(&data));
    let mut ex =
        Exchange::start(&p, head("/v1/chat/completions", "e1"), headers("budget-bot", &[]), NOW)
            .unwrap();
    ex.decide(&p, &budgets, &body(json!({"model": "gpt-4o", "max_tokens": 10})), NOW).unwrap();
    let _ = ex.response_headers(500);
    ex.response_chunk(br#"{"error":{"message":"boom"}}"#, true);
    let ev = ex.finish(&p, &budgets, NOW, End::ClientGone).unwrap();
    assert_eq!((ev.cost.total.nanos(), ev.usage_source, ev.status), (0, UsageSource::None, 500));
}

#[test]
fn bypassed_exchange_marks_its_headers_and_emits_no_event() {
    let p = plugin();
    let data = FakeShared::default();
    let budgets = Live::new(SharedStore::new(&data));
    let mut ex = Exchange::bypass(head("/v1/chat/completions", "bp"), NOW);
    assert!(ex.is_bypass());
    let h = ex.response_headers(200);
    assert!(h.contains(&("x-tollgate-decision", "bypass")));
    assert!(ex.finish(&p, &budgets, NOW, End::ClientGone).is_none());
}

#[test]
fn host_and_path_facts_drop_port_and_query() {
    assert_eq!(strip_port("llm.local:8080"), "llm.local");
    assert_eq!(strip_port("[::1]"), "[::1]");
    assert_eq!(path_only("/v1/chat/completions?x=1"), "/v1/chat/completions");
}

#[test]
fn openai_stream_without_include_usage_is_asked_for_it_and_the_chunk_removed_again() {
    let p = plugin();
    let data = FakeShared::default();
    let budgets = Live::new(SharedStore::new(&data));
    let mut ex =
        Exchange::start(&p, head("/v1/chat/completions", "s1"), headers("bot", &[]), NOW).unwrap();
    assert!(ex.may_rewrite_body());
    let request = br#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#;
    ex.decide(&p, &budgets, request, NOW).unwrap();
    let rewritten = ex.usage_rewrite(request).unwrap();
    assert_eq!(
        rewritten,
        br#"{"stream_options":{"include_usage":true},"model":"gpt-4o-mini","stream":true,"messages":[]}"#
    );
    assert!(ex.rewrites_response());
    let _ = ex.response_headers(200);
    let stream = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4}}\n\n",
        "data: [DONE]\n\n"
    );
    // Split inside the usage chunk: the client must still get every other byte, in order.
    let cut = stream.find("completion").unwrap();
    let mut client = Vec::new();
    client.extend_from_slice(ex.response_chunk(&stream.as_bytes()[..cut], false).unwrap());
    client.extend_from_slice(ex.response_chunk(&stream.as_bytes()[cut..], true).unwrap());
    let expected = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
        "data: [DONE]\n\n"
    );
    assert_eq!(String::from_utf8(client).unwrap(), expected);
    let ev = ex.finish(&p, &budgets, NOW, End::ClientGone).unwrap();
    assert_eq!((ev.tokens.input, ev.tokens.output, ev.usage_source), (9, 4, UsageSource::Reported));
}

#[test]
fn bodies_that_need_no_usage_rewrite_are_left_alone() {
    let p = plugin();
    let data = FakeShared::default();
    let budgets = Live::new(SharedStore::new(&data));
    let cases: [(&str, &str, serde_json::Value); 4] = [
        ("/v1/chat/completions", "n1", json!({"model": "gpt-4o", "messages": []})),
        (
            "/v1/chat/completions",
            "n2",
            json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}}),
        ),
        ("/v1/responses", "n3", json!({"model": "gpt-4o", "stream": true, "input": "x"})),
        (
            "/v1/messages",
            "n4",
            json!({"model": "claude-sonnet-4-5", "stream": true, "max_tokens": 5}),
        ),
    ];
    for (path, id, request) in cases {
        let mut ex = Exchange::start(&p, head(path, id), headers("bot", &[]), NOW).unwrap();
        let request = body(request);
        ex.decide(&p, &budgets, &request, NOW).unwrap();
        assert_eq!(ex.usage_rewrite(&request), None, "{path} {id}");
        assert!(!ex.rewrites_response());
        assert_eq!(ex.response_chunk(b"data: {}\n\n", true), None, "{id}: passes untouched");
    }
    let ex = Exchange::start(&p, head("/v1/messages", "n5"), headers("bot", &[]), NOW).unwrap();
    assert!(!ex.may_rewrite_body());
}

/// gpt-4o with its documented limits, a $5.00 budget and a 1,000 tokens/min limit.
const LIMITED: &str = r#"{
  "filter": {"fail": "closed"},
  "policy": {
    "version": "v1",
    "defaults": {"llm": "allow"},
    "rules": [
      {"id": "budgeted", "match": {"agent": "budget-bot"}, "effect": "allow",
       "budgets": [{"id": "b", "scope": "agent", "period": "daily", "amount": "5.00"}]},
      {"id": "tpm", "match": {"agent": "tpm-bot"}, "effect": "allow", "limits": {"tpm": 1000}}
    ]
  },
  "pricing": {"models": {
    "gpt-4o": {"provider": "openai", "input": "2.50", "output": "10.00", "max_output_tokens": 16384, "context_window": 128000}
  }}
}"#;

/// Decides `req` for `budget-bot`, answers `response`, finishes; the event and the budget's
/// (spent, reserved) before and after.
fn run_limited(req: serde_json::Value, response: &[u8]) -> (Finished, i64, (i64, i64)) {
    let p = Plugin::from_document(LIMITED).unwrap();
    let data = FakeShared::default();
    let budgets = Live::new(SharedStore::new(&data));
    let spec = p.engine.policy().all_budgets().find(|b| b.id == "b").unwrap().clone();
    let state = |budgets: &Budgets<_>| {
        let s = budgets.status(&spec, "budget-bot", NOW.ms).unwrap();
        (s.spent.nanos(), s.reserved.nanos())
    };
    let mut ex =
        Exchange::start(&p, head("/v1/chat/completions", "x1"), headers("budget-bot", &[]), NOW)
            .unwrap();
    ex.decide(&p, &budgets, &body(req), NOW).unwrap();
    let (_, reserved) = state(&budgets.shared);
    let _ = ex.response_headers(200);
    ex.response_chunk(response, true);
    let ev = ex.finish(&p, &budgets, NOW, End::ClientGone).unwrap();
    (ev, reserved, state(&budgets.shared))
}

#[test]
fn without_max_tokens_the_model_output_limit_is_reserved() {
    let req = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "write"}]});
    let full = br#"{"model":"gpt-4o","usage":{"prompt_tokens":20,"completion_tokens":16384}}"#;
    let (ev, reserved, (spent, still)) = run_limited(req, full);
    // 16,384 output tokens at $10/M, plus at most the body's bytes and 64 input tokens.
    assert!((163_840_000..164_200_000).contains(&reserved), "{reserved}");
    assert_eq!(
        (ev.usage_source, ev.overrun, ev.implausible),
        (UsageSource::Reported, Money::ZERO, None)
    );
    assert!(ev.cost.total.nanos() <= reserved, "{} > {reserved}", ev.cost.total.nanos());
    assert_eq!((spent, still), (ev.cost.total.nanos(), 0));
}

#[test]
fn implausible_usage_is_billed_at_the_reservation() {
    let req = json!({"model": "gpt-4o", "max_tokens": 100, "messages": []});
    let absurd = br#"{"model":"gpt-4o","usage":{"prompt_tokens":18446744073709551615,"completion_tokens":-1}}"#;
    let (ev, reserved, (spent, still)) = run_limited(req, absurd);
    assert_eq!(ev.usage_source, UsageSource::Implausible);
    assert!(ev.implausible.is_some());
    assert_eq!(ev.cost.total.nanos(), reserved);
    assert_eq!(ev.tokens.output, 100, "recorded as the bound");
    assert!(reserved < 10_000_000, "cents, not billions: {reserved}");
    assert_eq!((spent, still, ev.overrun), (reserved, 0, Money::ZERO));
}

#[test]
fn plausible_usage_above_the_reservation_is_charged_and_reported_as_overrun() {
    let req = json!({"model": "gpt-4o", "max_tokens": 10, "messages": []});
    let more = br#"{"model":"gpt-4o","usage":{"prompt_tokens":0,"completion_tokens":2000}}"#;
    let (ev, reserved, (spent, _)) = run_limited(req, more);
    assert_eq!((ev.usage_source, ev.implausible), (UsageSource::Reported, None));
    assert_eq!((ev.cost.total.nanos(), spent), (20_000_000, 20_000_000));
    assert_eq!(ev.overrun, Money::from_nanos(20_000_000 - reserved));
}

#[test]
fn max_tokens_of_u64_max_does_not_wrap_under_a_tokens_per_minute_limit() {
    // With the model's limits known (the bound is 16,384 output tokens), and without (the bound
    // saturates at u64::MAX instead of wrapping to a few tokens).
    let unlimited =
        LIMITED.replace(r#", "max_output_tokens": 16384, "context_window": 128000"#, "");
    assert_ne!(unlimited, LIMITED);
    for doc in [LIMITED, unlimited.as_str()] {
        let p = Plugin::from_document(doc).unwrap();
        let data = FakeShared::default();
        let budgets = Live::new(SharedStore::new(&data));
        let mut ex =
            Exchange::start(&p, head("/v1/chat/completions", "t1"), headers("tpm-bot", &[]), NOW)
                .unwrap();
        let req = body(json!({"model": "gpt-4o", "max_tokens": u64::MAX, "messages": []}));
        let d = ex.decide(&p, &budgets, &req, NOW).unwrap_err();
        assert_eq!((d.class.status(), d.code.as_str()), (429, "rate_limited_tokens"));
    }
}

#[test]
fn policy_rules_on_category_match_mcp_calls_of_the_configured_category() {
    let doc = r#"{
      "filter": {"mcp_category": "read"},
      "policy": {"version": "c1", "defaults": {"llm": "allow", "tool": "require_approval"},
                 "rules": [{"id": "reads", "match": {"category": "read"}, "effect": "allow",
                            "reason": "reads_are_fine"}]}
    }"#;
    let data = FakeShared::default();
    let budgets = Live::new(SharedStore::new(&data));
    let call = body(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                           "params": {"name": "list_files", "arguments": {}}}));
    let p = Plugin::from_document(doc).unwrap();
    let mut ex = Exchange::start(&p, head("/mcp", "c1"), headers("bot", &[]), NOW).unwrap();
    ex.decide(&p, &budgets, &call, NOW).unwrap();
    assert_eq!(ex.reason(), Some("reads_are_fine"));
    // Without the category the rule does not hold: the tool default asks for an approval.
    let p = Plugin::from_document(&doc.replace(r#""mcp_category": "read""#, "")).unwrap();
    let mut ex = Exchange::start(&p, head("/mcp", "c2"), headers("bot", &[]), NOW).unwrap();
    let d = ex.decide(&p, &budgets, &call, NOW).unwrap_err();
    assert_eq!((d.code.as_str(), d.approval_id.as_deref()), ("default_require_approval", None));
    assert!(d.message.contains(NO_APPROVALS), "{}", d.message);
}

#[test]
fn the_cost_cap_is_checked_before_an_approval_is_asked_for_as_in_the_sidecar() {
    let doc = r#"{
      "policy": {"version": "o1", "defaults": {"llm": "require_approval"},
                 "limits": {"max_cost_per_request": "0.001"}}
    }"#;
    let p = Plugin::from_document(doc).unwrap();
    let data = FakeShared::default();
    let budgets = Live::new(SharedStore::new(&data));
    let mut ex =
        Exchange::start(&p, head("/v1/chat/completions", "o1"), headers("bot", &[]), NOW).unwrap();
    let big = body(json!({"model": "gpt-4o", "max_tokens": 4000, "messages": []}));
    let d = ex.decide(&p, &budgets, &big, NOW).unwrap_err();
    assert_eq!((d.class.status(), d.code.as_str()), (403, "cost_limit_exceeded"));
    let small = body(json!({"model": "gpt-4o", "max_tokens": 5, "messages": []}));
    let d = ex.decide(&p, &budgets, &small, NOW).unwrap_err();
    assert_eq!((d.class, d.code.as_str()), (Class::ApprovalRequired, "default_require_approval"));
}

#[test]
fn an_attribution_header_sent_twice_is_refused_naming_it() {
    let p = plugin();
    let line = |n: &str, v: &str| (n.to_owned(), v.as_bytes().to_vec());
    let twice = [
        line("x-agent-id", "alice"),
        line("x-agent-id", "mallory"),
        line("x-cost-center", "CC-1234"),
        line("x-project-id", "PROJ-ABC123"),
    ];
    let (d, _, id) =
        Exchange::start_lines(&p, head("/v1/chat/completions", "dup"), &twice, NOW).unwrap_err();
    assert_eq!(
        (d.class, d.code.as_str(), id.as_str()),
        (Class::Attribution, "attribution_rejected", "dup")
    );
    assert!(d.message.contains("x-agent-id"), "{}", d.message);
    // Each once: admitted.
    let once = [&twice[0], &twice[2], &twice[3]].map(Clone::clone);
    assert!(Exchange::start_lines(&p, head("/v1/chat/completions", "ok"), &once, NOW).is_ok());
}

#[test]
fn an_unfinished_response_ends_as_the_sidecar_records_it() {
    assert_eq!(end_of(0x4000), End::ClientGone, "DC: the downstream went away");
    assert_eq!(end_of(0x10), End::UpstreamError, "UR: the upstream reset the stream");
    assert_eq!(end_of(0x40), End::UpstreamError, "UC: the upstream connection ended");
    assert_eq!(end_of(0x4), End::UpstreamError, "UT: the upstream timed out");
    assert_eq!(end_of(0x10000), End::IdleTimeout, "SI: the stream idle timeout");
    assert_eq!(end_of(0x10 | 0x4000), End::ClientGone, "the client left first");
    assert_eq!(end_of(0), End::ClientGone);
}

#[test]
fn the_edge_refusals_are_the_sidecars() {
    let r = too_large(1024).render(Shape::OpenAi, "r1");
    assert_eq!(r.status, 413);
    assert!(String::from_utf8_lossy(&r.body).contains("larger than 1024 bytes"));
    let r = connect_refused(Some("api.openai.com:443")).render(Shape::OpenAi, "r2");
    assert_eq!((r.status, r.header("x-tollgate-reason")), (404, Some("no_route")));
}

#[test]
fn in_fleet_mode_a_request_waits_for_its_lease_and_settles_on_it() {
    use tollgate_core::budget::lease::SyncAnswer;
    let doc = DOC.replace(
        r#""filter": {"fail": "closed"},"#,
        r#""filter": {"fail": "closed", "collector": {"cluster": "c", "path": "/v1/usage/events"}},
           "store": {"collector": {"slice_percent": 50}},"#,
    );
    let p = Plugin::from_document(&doc).unwrap();
    assert_eq!(p.fleet.map(|f| f.slice_bp), Some(5_000));
    let data = FakeShared::default();
    let budgets = Live::new(SharedStore::new(&data));
    let req = body(json!({"model": "gpt-4o", "max_tokens": 10}));
    let mut ex =
        Exchange::start(&p, head("/v1/chat/completions", "l1"), headers("budget-bot", &[]), NOW)
            .unwrap();
    let Ok(Decided::Short(parked)) = ex.decide(&p, &budgets, &req, NOW) else {
        panic!("an empty lease is short")
    };
    let leases = budgets.leases();
    leases.want(&parked.refill);
    let out = leases.due(NOW.ms, 3_000, false, 5_000);
    assert_eq!(out.len(), 1);
    let asked = out[0].args;
    assert_eq!(asked.limit, 20_000_000, "the $0.02 budget, in nano-USD");
    assert_eq!(asked.wmax, 10_000_000, "slice_percent 50");
    // The collector grants what was asked.
    let grant = SyncAnswer {
        lease: asked.want,
        granted: asked.want,
        committed: asked.want,
        perm: 0,
        lapsed: false,
    };
    leases.answered(&out[0].counter, Some(grant), 10_000);
    leases.unwait(&parked.refill);
    assert!(matches!(ex.resume(&p, &budgets, &req, parked, NOW), Ok(Decided::Admitted)));
    // Nothing went into this Envoy's shared budget: the reservation is on the lease.
    let spec = p.engine.policy().all_budgets().find(|b| b.id == "b").unwrap().clone();
    assert_eq!(budgets.shared.status(&spec, "budget-bot", NOW.ms).unwrap().reserved.nanos(), 0);
    let _ = ex.response_headers(200);
    let response = br#"{"model":"gpt-4o","usage":{"prompt_tokens":5,"completion_tokens":2}}"#;
    ex.response_chunk(response, true);
    let ev = ex.finish(&p, &budgets, NOW, End::Complete).unwrap();
    let spent = ev.cost.total.nanos();
    assert!(spent > 0);
    // The next exchange reports the spend and keeps the rest of the lease free.
    let report = leases.due(NOW.ms.saturating_add_ms(10), 3_000, false, 5_000);
    assert_eq!(report.len(), 1);
    assert_eq!(report[0].args.spent, spent);
    assert_eq!(report[0].args.keep, asked.want - spent);
}

#[test]
fn in_fleet_mode_an_agent_the_fleet_disabled_is_refused_at_the_sidecars_step() {
    let doc = DOC.replace(
        r#""filter": {"fail": "closed"},"#,
        r#""filter": {"fail": "closed", "collector": {"cluster": "c"}},
           "store": {"collector": {}},"#,
    );
    let p = Plugin::from_document(&doc).unwrap();
    let data = FakeShared::default();
    let live = Live::new(SharedStore::new(&data));
    live.disabled.borrow_mut().insert("flaky-bot", 0);
    let req = body(json!({"model": "gpt-4o", "max_tokens": 10}));
    let start = |agent: &'static str| {
        Exchange::start(&p, head("/v1/chat/completions", "d1"), headers(agent, &[]), NOW).unwrap()
    };
    let d = start("flaky-bot").decide(&p, &live, &req, NOW).unwrap_err();
    assert_eq!((d.class.status(), d.code.as_str()), (403, "agent_disabled"));
    assert!(d.message.contains("until an operator re-enables it"), "{}", d.message);
    assert!(matches!(start("steady-bot").decide(&p, &live, &req, NOW), Ok(Decided::Admitted)));
    // Not in fleet mode: nothing is read from the set.
    let plain = plugin();
    let mut ex =
        Exchange::start(&plain, head("/v1/chat/completions", "d2"), headers("flaky-bot", &[]), NOW)
            .unwrap();
    assert!(matches!(ex.decide(&plain, &live, &req, NOW), Ok(Decided::Admitted)));
}

/// The table's plugin with `autonomy:` and the loop detector (as the sidecar's configuration
/// would have them), and `store: {collector: {}}` when `fleet`.
fn overseen(fleet: bool) -> Plugin {
    let sections = r#""autonomy": {
        "default": "AUTO_EXECUTE",
        "accounts": {
          "off-bot": {"default": "DISABLED"},
          "shy-bot": {"actions": {"search": "PROPOSE_ONLY"}},
          "asks-bot": {"default": "APPROVAL_REQUIRED"}
        },
        "budgets": {"accounts": {"thrifty-bot": {"per_day": 2, "per_action": {"search": 1}}}}
      },
      "oversight": {"loops": {"max_repeats": 2, "window": "10s"}},"#;
    let store = if fleet {
        r#""filter": {"fail": "closed", "collector": {"cluster": "c"}}, "store": {"collector": {}},"#
    } else {
        r#""filter": {"fail": "closed"},"#
    };
    let doc = DOC.replace(r#""filter": {"fail": "closed"},"#, &format!("{store} {sections}"));
    Plugin::from_document(&doc).unwrap()
}

fn mcp(tool: &str, args: serde_json::Value) -> Vec<u8> {
    body(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": tool, "arguments": args}}))
}

/// (status, code, clause, approval id, retry-after) of a refusal; `None` when admitted.
type Answer = Option<(u16, String, Option<String>, Option<String>, Option<u64>)>;

fn answer(decided: Result<Decided, Denial>) -> Answer {
    match decided {
        Ok(Decided::Admitted) => None,
        Ok(other) => panic!("neither admitted nor refused: {other:?}"),
        Err(d) => Some((d.class.status(), d.code, d.clause, d.approval_id, d.retry_after_secs)),
    }
}

#[test]
fn autonomy_disabled_and_propose_only_are_refused_at_the_sidecars_step() {
    let p = overseen(false);
    let data = FakeShared::default();
    let live = Live::new(SharedStore::new(&data));
    let decide = |agent: &'static str, path: &str, b: &[u8]| {
        let mut ex = Exchange::start(&p, head(path, "a1"), headers(agent, &[]), NOW).unwrap();
        answer(ex.decide(&p, &live, b, NOW))
    };
    let chat = body(json!({"model": "gpt-4o", "max_tokens": 10, "messages": []}));
    let off = Some((403, "autonomy_disabled".to_owned(), Some("defaults.llm".into()), None, None));
    assert_eq!(decide("off-bot", "/v1/chat/completions", &chat), off);
    let search = mcp("search", json!({"q": "x"}));
    let proposed =
        Some((403, "autonomy_propose_only".to_owned(), Some("search".into()), None, None));
    assert_eq!(decide("shy-bot", "/mcp", &search), proposed);
    // Only that action: the agent's model calls are AUTO_EXECUTE by the global default.
    assert_eq!(decide("shy-bot", "/v1/chat/completions", &chat), None);
    // The policy's deny comes first, as in the sidecar.
    let denied = decide("off-bot", "/internal", b"{}");
    assert_eq!(denied.map(|d| d.1), Some("default_deny".to_owned()));
    let mut ex = Exchange::start(&p, head("/mcp", "a2"), headers("shy-bot", &[]), NOW).unwrap();
    let d = ex.decide(&p, &live, &search, NOW).unwrap_err();
    assert!(
        d.message.contains("PROPOSE_ONLY by the agent's setting for this action"),
        "{}",
        d.message
    );
    // APPROVAL_REQUIRED without the collector: refused naming no approval.
    let asked = decide("asks-bot", "/v1/chat/completions", &chat);
    assert_eq!(
        asked,
        Some((
            403,
            "autonomy_approval_required".to_owned(),
            Some("defaults.llm".into()),
            None,
            None
        ))
    );
    // Without `autonomy:` nothing is gated by mode.
    let plain = plugin();
    let mut ex =
        Exchange::start(&plain, head("/v1/chat/completions", "a3"), headers("off-bot", &[]), NOW)
            .unwrap();
    assert!(matches!(ex.decide(&plain, &live, &chat, NOW), Ok(Decided::Admitted)));
}

#[test]
fn the_autonomy_budget_is_counted_in_shared_data_for_every_worker_and_day() {
    let p = overseen(false);
    let data = FakeShared::default();
    // Two workers: each its own VM-local store over the same shared data.
    let (one, two) = (Live::new(SharedStore::new(&data)), Live::new(SharedStore::new(&data)));
    let decide = |live: &Live<&FakeShared>, b: &[u8], path: &str, now: Now| {
        let mut ex =
            Exchange::start(&p, head(path, "b1"), headers("thrifty-bot", &[]), now).unwrap();
        answer(ex.decide(&p, live, b, now))
    };
    let search = mcp("search", json!({"q": "1"}));
    let chat = body(json!({"model": "gpt-4o", "max_tokens": 10, "messages": []}));
    assert_eq!(decide(&one, &search, "/mcp", NOW), None);
    let exhausted = |clause: &str| {
        Some((403, "autonomy_budget_exhausted".to_owned(), Some(clause.to_owned()), None, None))
    };
    // One search a day: the other worker sees it used up.
    assert_eq!(decide(&two, &mcp("search", json!({"q": "2"})), "/mcp", NOW), exhausted("search"));
    // Two actions a day in all.
    assert_eq!(decide(&two, &chat, "/v1/chat/completions", NOW), None);
    assert_eq!(decide(&one, &chat, "/v1/chat/completions", NOW), exhausted("defaults.llm"));
    let mut ex =
        Exchange::start(&p, head("/v1/chat/completions", "b2"), headers("thrifty-bot", &[]), NOW)
            .unwrap();
    let d = ex.decide(&p, &one, &chat, NOW).unwrap_err();
    assert!(d.message.contains("(2/2 today)"), "{}", d.message);
    // One key per agent, reused the next day.
    let tomorrow = Now { ms: UnixMillis(NOW.ms.0 + 86_400_000), ns: NOW.ns + 86_400_000_000_000 };
    assert_eq!(decide(&two, &search, "/mcp", tomorrow), None);
    assert!(data.get("tollgate:autonomy:thrifty-bot").unwrap().is_some());
    // Others are not counted against it.
    let mut ex = Exchange::start(&p, head("/mcp", "b3"), headers("free-bot", &[]), NOW).unwrap();
    assert!(matches!(ex.decide(&p, &one, &search, NOW), Ok(Decided::Admitted)));
}

#[test]
fn in_fleet_mode_the_autonomy_budget_is_leased_and_an_exhausted_one_asks_the_collector() {
    use tollgate_core::budget::lease::SyncAnswer;
    let p = overseen(true);
    let data = FakeShared::default();
    let live = Live::new(SharedStore::new(&data));
    let search = mcp("search", json!({"q": "1"}));
    let leases = live.leases();
    // The collector answers each exchange: `grant` more (0: the fleet's count is at its limit).
    let collector = |grant: i64, committed: i64| {
        for out in leases.due(NOW.ms, 3_000, false, 100) {
            let a = SyncAnswer { lease: grant, granted: grant, committed, perm: 0, lapsed: false };
            leases.answered(&out.counter, Some(a), 10_000);
        }
    };
    let mut ex = Exchange::start(&p, head("/mcp", "c1"), headers("thrifty-bot", &[]), NOW).unwrap();
    // Nothing of the agent's day is leased yet: the request waits at the autonomy budget.
    let Ok(Decided::Short(parked)) = ex.decide(&p, &live, &search, NOW) else {
        panic!("an empty count lease is short")
    };
    assert!(parked.refill.key.starts_with("count/auto/11:thrifty-bot/"), "{:?}", parked.refill);
    leases.want(&parked.refill);
    collector(1, 1);
    leases.unwait(&parked.refill);
    // The daily total is leased; the search's own count (1 a day) is asked for next.
    let Ok(Decided::Short(parked)) = ex.resume(&p, &live, &search, parked, NOW) else {
        panic!("the per-action count is leased separately")
    };
    leases.want(&parked.refill);
    collector(1, 1);
    leases.unwait(&parked.refill);
    assert!(matches!(ex.resume(&p, &live, &search, parked, NOW), Ok(Decided::Admitted)));
    // Nothing went into this Envoy's shared data: the counts are the fleet's.
    assert!(data.get("tollgate:autonomy:thrifty-bot").unwrap().is_none());
    // The second search of the day: the fleet counted one already, the collector grants none.
    let mut ex = Exchange::start(&p, head("/mcp", "c2"), headers("thrifty-bot", &[]), NOW).unwrap();
    let decided = match ex.decide(&p, &live, &search, NOW) {
        Ok(Decided::Short(parked)) => {
            leases.want(&parked.refill);
            collector(0, 1);
            leases.unwait(&parked.refill);
            ex.resume(&p, &live, &search, parked, NOW)
        }
        other => other,
    };
    match decided {
        Ok(Decided::Approval(ask)) => {
            assert_eq!(ask.pending.reason, "autonomy_budget_exhausted");
            assert!(matches!(&ask.call, AskCall::Raise(r) if r.action == "search"), "{ask:?}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_same_tool_call_again_and_again_is_a_loop_for_every_worker() {
    let p = overseen(false);
    let data = FakeShared::default();
    let (one, two) = (Live::new(SharedStore::new(&data)), Live::new(SharedStore::new(&data)));
    let decide = |live: &Live<&FakeShared>, agent: &'static str, b: &[u8], now: Now| {
        let mut ex = Exchange::start(&p, head("/mcp", "l1"), headers(agent, &[]), now).unwrap();
        answer(ex.decide(&p, live, b, now))
    };
    let same = mcp("search", json!({"q": "again", "n": 1}));
    // The same arguments in another order are the same call.
    let reordered = body(json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"arguments": {"n": 1, "q": "again"}, "name": "search"}}));
    let later = |ms: u64| Now { ms: UnixMillis(NOW.ms.0 + ms), ns: NOW.ns + ms * 1_000_000 };
    assert_eq!(decide(&one, "loop-bot", &same, NOW), None);
    assert_eq!(decide(&two, "loop-bot", &reordered, later(1000)), None);
    let looped = decide(&one, "loop-bot", &same, later(4000));
    assert_eq!(
        looped,
        Some((403, "loop_detected".to_owned(), Some("search".into()), None, Some(6)))
    );
    // Other agents and other arguments are other calls; a call that left the window is gone.
    assert_eq!(decide(&two, "other-bot", &same, later(4000)), None);
    assert_eq!(decide(&two, "loop-bot", &mcp("search", json!({"q": "new"})), later(4000)), None);
    assert_eq!(decide(&two, "loop-bot", &same, later(10_000)), None);
    // Model calls are not watched.
    let chat = body(json!({"model": "gpt-4o", "max_tokens": 10, "messages": []}));
    for _ in 0..3 {
        let mut ex =
            Exchange::start(&p, head("/v1/chat/completions", "l2"), headers("loop-bot", &[]), NOW)
                .unwrap();
        assert!(matches!(ex.decide(&p, &one, &chat, NOW), Ok(Decided::Admitted)));
    }
    // The detector's state lives in a bounded set of slots.
    let slot = Slot::index(
        lifecycle_digest("loop-bot", "search", json!({"q": "again", "n": 1})),
        &p.loops.unwrap(),
    );
    assert!(data.get(&format!("{LOOPS_KEY}{slot}")).unwrap().is_some());
}

fn lifecycle_digest(agent: &str, action: &str, args: serde_json::Value) -> u64 {
    tollgate_core::guardrails::loops::digest(agent, action, &args)
}

#[test]
fn an_unreadable_autonomy_budget_follows_the_fail_policy() {
    let mut p = overseen(false);
    let live = Live::new(SharedStore::new(Down));
    let search = mcp("search", json!({"q": "1"}));
    let mut ex = Exchange::start(&p, head("/mcp", "u1"), headers("thrifty-bot", &[]), NOW).unwrap();
    let d = ex.decide(&p, &live, &search, NOW).unwrap_err();
    assert_eq!((d.class.status(), d.code.as_str()), (403, "autonomy_budget_exhausted"));
    assert!(d.message.contains("capacity"), "{}", d.message);
    p.filter.fail = FailPolicy::Open;
    let mut ex = Exchange::start(&p, head("/mcp", "u2"), headers("thrifty-bot", &[]), NOW).unwrap();
    assert!(matches!(ex.decide(&p, &live, &search, NOW), Ok(Decided::Admitted)));
}

#[test]
fn each_decided_request_has_the_sidecars_verdict_once() {
    let p = plugin();
    let data = FakeShared::default();
    let budgets = Live::new(SharedStore::new(&data));
    let verdict = |agent: &'static str,
                   extra: &'static [(&'static str, &'static str)],
                   path: &str,
                   b: &[u8]| {
        let mut ex = Exchange::start(&p, head(path, "v"), headers(agent, extra), NOW).unwrap();
        let _ = ex.decide(&p, &budgets, b, NOW);
        let taken = ex.take_verdict().map(|(c, v)| (stats::CATEGORIES[c], v));
        assert_eq!(ex.take_verdict(), None, "taken once");
        taken
    };
    let chat = body(json!({"model": "gpt-4o", "max_tokens": 5}));
    let call = |tool: &str| {
        body(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool}}))
    };
    assert_eq!(verdict("a", &[], "/v1/chat/completions", &chat), Some(("llm", Verdict::Auto)));
    assert_eq!(
        verdict("a", &[("x-agent-tier", "4")], "/v1/chat/completions", &chat),
        Some(("llm", Verdict::Denied))
    );
    // Asked for a human (no approval service here: refused, as the sidecar's pending approval).
    assert_eq!(
        verdict("a", &[], "/mcp", &call("shell")),
        Some(("uncategorized", Verdict::Approval))
    );
    assert_eq!(verdict("a", &[], "/mcp", &call("search")), Some(("uncategorized", Verdict::Auto)));
    // Refused before the oversight step had a say: not counted.
    let unknown = body(json!({"model": "gpt-unknown"}));
    assert_eq!(verdict("a", &[], "/v1/chat/completions", &unknown), None);
    assert_eq!(verdict("a", &[], "/v1/chat/completions", b"{"), None);
    // Refused by its budget after the oversight step let it through: auto.
    let big = body(json!({"model": "gpt-4o", "max_tokens": 16000}));
    assert_eq!(
        verdict("budget-bot", &[], "/v1/chat/completions", &big),
        Some(("llm", Verdict::Auto))
    );
}

#[test]
fn the_success_history_of_earlier_calls_grades_the_risk() {
    let doc = r#"{"filter": {"fail": "closed"},
      "policy": {"version": "h1", "defaults": {"llm": "allow", "tool": "allow", "other": "deny"},
        "rules": [{"id": "watched", "match": {"tool": "search"}, "effect": "allow",
          "risk": {"blast_radius": "low", "reversibility": "automatic_rollback",
                   "data_sensitivity": "public", "cost_impact": "low"}}]}}"#;
    let p = Plugin::from_document(doc).unwrap();
    let data = FakeShared::default();
    let budgets = Live::new(SharedStore::new(&data));
    let call = body(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "search"}}));
    // One call with the upstream's `status`; the score it was admitted with.
    let run = |agent: &'static str, status: u32| {
        let mut ex = Exchange::start(&p, head("/mcp", "h"), headers(agent, &[]), NOW).unwrap();
        ex.decide(&p, &budgets, &call, NOW).unwrap();
        let risk = ex
            .response_headers(status)
            .iter()
            .find(|(n, _)| *n == "x-tollgate-risk")
            .map(|(_, v)| (*v).to_owned());
        ex.response_ended();
        ex.finish(&p, &budgets, NOW, End::Complete).unwrap();
        risk
    };
    // Never done: high (9 points of 18); 1 of 1 succeeded: low (1 point); then 1 of 2: high.
    assert_eq!(run("h-bot", 200).as_deref(), Some("18"));
    assert_eq!(run("h-bot", 500).as_deref(), Some("10"));
    assert_eq!(run("h-bot", 200).as_deref(), Some("18"));
    // Per agent: another agent's history is its own.
    assert_eq!(run("other-bot", 200).as_deref(), Some("18"));
    let key = history::key("h-bot", "search");
    let slot = format!("{HISTORY_KEY}{}", history::Slot::index(&key));
    let (bytes, _) = data.get(&slot).unwrap().unwrap();
    assert_eq!(history::Slot::decode(&bytes).unwrap().get(&key), Some((2, 3)));
}

#[test]
fn a_named_envoy_route_names_the_action_of_requests_without_a_tool_as_the_sidecar_does() {
    let doc = r#"{"filter": {"fail": "closed"},
      "policy": {"version": "r1", "defaults": {"llm": "allow", "tool": "allow", "other": "deny"}},
      "autonomy": {"default": "AUTO_EXECUTE",
        "accounts": {"quiet-bot": {"actions": {"mcp": "DISABLED"}}}}}"#;
    let p = Plugin::from_document(doc).unwrap();
    let data = FakeShared::default();
    let budgets = Live::new(SharedStore::new(&data));
    let list = body(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}));
    let send = |route: Option<&str>| {
        let h = Head { route: route.map(str::to_owned), ..head("/mcp", "r") };
        let mut ex = Exchange::start(&p, h, headers("quiet-bot", &[]), NOW).unwrap();
        let decided = ex.decide(&p, &budgets, &list, NOW).map(drop).map_err(|d| d.code);
        ex.response_headers(200);
        ex.response_ended();
        (decided, ex.finish(&p, &budgets, NOW, End::Complete).and_then(|f| f.event.route))
    };
    // The sidecar's action for an MCP session method is its route's name, `mcp` here.
    assert_eq!(send(Some("mcp")), (Err("autonomy_disabled".to_owned()), None));
    // Another route's name, or none (`other`), is another action.
    assert_eq!(send(Some("tools")), (Ok(()), Some("tools".to_owned())));
    assert_eq!(send(None), (Ok(()), None));
}

/// The table's plugin with `oversight.breaker` and `oversight.escalation`.
fn guarded() -> Plugin {
    let doc = DOC.replace(
        r#""filter": {"fail": "closed"},"#,
        r#""filter": {"fail": "closed", "collector": {"cluster": "c"}}, "oversight": {
            "breaker": {"failure_threshold": 2, "open_for": "10s"},
            "escalation": {"review_at": 2, "disable_at": 3}},"#,
    );
    Plugin::from_document(&doc).unwrap()
}

/// One model call by `agent` through Envoy route `route` (`None`: by authority) at `now`, the
/// upstream answering `status`; the refusal, if any.
fn call_through<D: SharedData>(
    p: &Plugin,
    live: &Live<D>,
    agent: &'static str,
    route: Option<&str>,
    status: u32,
    now: Now,
) -> Answer {
    let mut h = head("/v1/chat/completions", "b");
    h.route = route.map(str::to_owned);
    let mut ex = Exchange::start(p, h, headers(agent, &[]), now).unwrap();
    let chat = body(json!({"model": "gpt-4o", "max_tokens": 10, "messages": []}));
    let decided = answer(ex.decide(p, live, &chat, now));
    if decided.is_none() {
        ex.response_headers(status);
        ex.response_ended();
        ex.finish(p, live, now, End::Complete).unwrap();
    }
    decided
}

fn at(ms: u64) -> Now {
    Now { ms: UnixMillis(NOW.ms.0 + ms), ns: NOW.ns + ms * 1_000_000 }
}

#[test]
fn an_upstream_that_keeps_failing_opens_its_breaker_for_every_worker() {
    let p = guarded();
    let data = FakeShared::default();
    // Two workers: one shared data.
    let (one, two) = (Live::new(SharedStore::new(&data)), Live::new(SharedStore::new(&data)));
    assert_eq!(call_through(&p, &one, "a", Some("openai"), 503, at(0)), None);
    // A success in between resets the count, as in the sidecar.
    assert_eq!(call_through(&p, &two, "a", Some("openai"), 200, at(1)), None);
    assert_eq!(call_through(&p, &two, "a", Some("openai"), 500, at(2)), None);
    // A 4xx is the caller's doing: the upstream answered.
    assert_eq!(call_through(&p, &one, "a", Some("openai"), 404, at(3)), None);
    assert_eq!(call_through(&p, &one, "a", Some("openai"), 502, at(4)), None);
    let mut ex =
        Exchange::start(&p, head("/v1/chat/completions", "o"), headers("a", &[]), at(5)).unwrap();
    ex.head.route = Some("openai".into());
    let chat = body(json!({"model": "gpt-4o", "max_tokens": 10, "messages": []}));
    ex.decide(&p, &one, &chat, at(5)).unwrap();
    ex.response_headers(429);
    ex.response_ended();
    let finished = ex.finish(&p, &one, at(5), End::Complete).unwrap();
    assert_eq!(finished.breaker_opened.as_deref(), Some("openai"), "the opening is reported");
    // Open: both workers fail fast, 503 `circuit_open`, retry after the rest of `open_for`.
    let open =
        |retry| Some((503, "circuit_open".to_owned(), Some("defaults.llm".into()), None, retry));
    assert_eq!(call_through(&p, &two, "b", Some("openai"), 200, at(6)), open(Some(10)));
    assert_eq!(call_through(&p, &one, "b", Some("openai"), 200, at(9_005)), open(Some(1)));
    // Another upstream (route) is not affected, nor one reached by authority.
    assert_eq!(call_through(&p, &one, "b", Some("anthropic"), 200, at(10)), None);
    assert_eq!(call_through(&p, &one, "b", None, 200, at(10)), None);
    // Half-open after `open_for`: one probe, every other call still fails fast.
    let mut probe =
        Exchange::start(&p, head("/v1/chat/completions", "p"), headers("a", &[]), at(10_005))
            .unwrap();
    probe.head.route = Some("openai".into());
    assert!(matches!(probe.decide(&p, &two, &chat, at(10_005)), Ok(Decided::Admitted)));
    assert_eq!(call_through(&p, &one, "b", Some("openai"), 200, at(10_006)), open(Some(10)));
    // The probe succeeds: closed again.
    probe.response_headers(200);
    probe.response_ended();
    assert_eq!(probe.finish(&p, &two, at(10_007), End::Complete).unwrap().breaker_opened, None);
    assert_eq!(call_through(&p, &one, "b", Some("openai"), 200, at(10_008)), None);
    let key = format!("{BREAKER_KEY}{}", breaker::Slot::index("openai"));
    let (bytes, _) = data.get(&key).unwrap().unwrap();
    let slot = breaker::Slot::decode(&bytes).unwrap();
    assert_eq!(slot.state("openai"), (breaker::State::Closed, 0));
    assert_eq!(slot.gauged(), ["openai"], "its gauge stays, at 0");
    // Each worker moved the gauge by the changes it made: open (+2) by the one whose outcome
    // opened it, half-open (-1) and closed (-1) by the probe's; the sum is the state.
    let moves = |live: &Live<&FakeShared>| live.breaker_moves.borrow().clone();
    assert_eq!(moves(&one), [("openai".to_owned(), 2)]);
    assert_eq!(moves(&two), [("openai".to_owned(), -1), ("openai".to_owned(), -1)]);
    // Without `oversight.breaker` nothing is kept.
    let plain = plugin();
    let data = FakeShared::default();
    let live = Live::new(SharedStore::new(&data));
    for i in 0..5 {
        assert_eq!(call_through(&plain, &live, "a", Some("openai"), 503, at(i)), None);
    }
    assert_eq!(data.get(&key).unwrap(), None);
}

#[test]
fn an_agent_whose_calls_keep_failing_is_reviewed_then_disabled() {
    let p = guarded();
    let data = FakeShared::default();
    let (one, two) = (Live::new(SharedStore::new(&data)), Live::new(SharedStore::new(&data)));
    // Provider errors are the breaker's business: they never escalate (other routes, so that
    // the breaker stays closed).
    for (i, route) in ["r1", "r2", "r3"].into_iter().enumerate() {
        assert_eq!(call_through(&p, &one, "e-bot", Some(route), 503, at(i as u64)), None);
    }
    // Two of the agent's own errors in a row (any worker): a human reviews its actions, and
    // this filter has no approval service.
    assert_eq!(call_through(&p, &one, "e-bot", None, 400, at(10)), None);
    assert_eq!(call_through(&p, &two, "e-bot", None, 422, at(11)), None);
    let review = call_through(&p, &one, "e-bot", None, 200, at(12)).unwrap();
    assert_eq!((review.0, review.1.as_str()), (403, "error_escalation"));
    assert_eq!(call_through(&p, &two, "other-bot", None, 200, at(12)), None);
    // Disabled at once when `disable_at` is `review_at`: reported by the exchange whose
    // outcome disabled it, refused by every worker after it, a success changes nothing.
    let doc = DOC.replace(
        r#""filter": {"fail": "closed"},"#,
        r#""filter": {"fail": "closed", "collector": {"cluster": "c"}}, "oversight": {
            "escalation": {"review_at": 2, "disable_at": 2}},"#,
    );
    let p = Plugin::from_document(&doc).unwrap();
    let disabled_by = |status: u32, now: Now| {
        let mut ex =
            Exchange::start(&p, head("/v1/chat/completions", "d"), headers("d-bot", &[]), now)
                .unwrap();
        let chat = body(json!({"model": "gpt-4o", "max_tokens": 10, "messages": []}));
        ex.decide(&p, &one, &chat, now).unwrap();
        ex.response_headers(status);
        ex.response_ended();
        ex.finish(&p, &one, now, End::Complete).unwrap().agent_disabled
    };
    assert_eq!(disabled_by(401, at(20)), None);
    let disabled = Standing::Disabled { consecutive_errors: 2 };
    assert_eq!(disabled_by(403, at(21)), Some((disabled, "llm".to_owned())));
    for live in [&one, &two] {
        let disabled = call_through(&p, live, "d-bot", None, 200, at(22)).unwrap();
        assert_eq!((disabled.0, disabled.1.as_str()), (403, "agent_disabled"));
    }
    assert_eq!(call_through(&p, &two, "other-bot", None, 200, at(22)), None);
    // An operator re-enables it through the collector: a read sent before it was disabled
    // (its report was not at the collector yet) undoes nothing, one sent after does, for every
    // worker.
    let disabled_at = at(21).ms;
    assert!(!reenable(&two, "d-bot", UnixMillis(disabled_at.0 - 1)).unwrap());
    assert!(call_through(&p, &one, "d-bot", None, 200, at(23)).is_some());
    assert!(reenable(&two, "d-bot", disabled_at).unwrap());
    assert!(!reenable(&two, "d-bot", disabled_at).unwrap(), "once");
    for live in [&one, &two] {
        assert_eq!(call_through(&p, live, "d-bot", None, 200, at(24)), None);
    }
    // Disabled again later: a read from before that new disabling does not undo it.
    assert_eq!(disabled_by(400, at(30)), None);
    assert!(disabled_by(400, at(31)).is_some());
    assert!(!reenable(&one, "d-bot", at(25).ms).unwrap());
    assert!(call_through(&p, &two, "d-bot", None, 200, at(32)).is_some());
}

/// What a VM knows of the collector's disabled agents: an agent leaves only by a read that could
/// have listed it, and what it leaves with is when the collector had it by (what may be
/// re-enabled here).
#[test]
fn an_agent_leaves_the_collectors_set_only_by_a_read_that_could_list_it() {
    let mut set = DisabledSet::default();
    let none: Vec<(String, u64)> = Vec::new();
    // Disabled here at 100, its report on its way: a read that does not list it is no
    // re-enable.
    assert_eq!(set.read(150, vec![]), (none.clone(), false));
    // Listed by the reads sent at 200 and 300.
    assert_eq!(set.read(200, vec!["a".into()]), (none.clone(), true));
    assert!(set.contains("a") && !set.contains("b"));
    assert_eq!(set.read(300, vec!["a".into()]), (none.clone(), false));
    // Gone from the read sent at 400: what the collector had by 300 is re-enabled.
    assert_eq!(set.read(400, vec![]), (vec![("a".to_owned(), 300)], true));
    assert!(!set.contains("a"));
    // The collector took this VM's report (disabled at 500) at 520, before a read listed it:
    // a read sent before that may not list it yet, one sent after means an operator's re-enable.
    set.reported("b", 500, 520);
    assert!(set.contains("b"));
    assert_eq!(set.read(510, vec!["c".into()]), (none.clone(), true));
    assert_eq!(set.names(), ["b", "c"]);
    assert_eq!(set.read(530, vec!["c".into()]), (vec![("b".to_owned(), 500)], true));
    assert_eq!(set.names(), ["c"]);
}

#[test]
fn the_breakers_upstream_is_the_named_route_else_the_authority() {
    let mut h = head("/v1/chat/completions", "u");
    assert_eq!(upstream_of(&h), "llm.local:8080");
    h.route = Some(String::new());
    assert_eq!(upstream_of(&h), "llm.local:8080", "an unnamed route");
    h.route = Some("openai".into());
    assert_eq!(upstream_of(&h), "openai");
    h.route = None;
    h.authority = None;
    assert_eq!(upstream_of(&h), "-");
}
