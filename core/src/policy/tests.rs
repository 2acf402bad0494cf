use proptest::prelude::*;

use super::*;

const EXAMPLE_YAML: &str = include_str!("../../fixtures/policy/example.yaml");
const EXAMPLE_JSON: &str = include_str!("../../fixtures/policy/example.json");

fn example() -> Snapshot {
    Snapshot::from_yaml_str(EXAMPLE_YAML).unwrap_or_else(|e| panic!("{e}"))
}

fn llm<'a>(tier: &'a str, provider: &'a str, model: &'a str) -> Facts<'a> {
    Facts {
        route: RouteKind::Llm,
        agent: Some("a1"),
        tier: Some(tier),
        provider: Some(provider),
        model: Some(model),
        ..Facts::default()
    }
}

fn tool<'a>(unit: &'a str, name: &'a str, category: &'a str) -> Facts<'a> {
    Facts {
        route: RouteKind::Tool,
        business_unit: Some(unit),
        tool: Some(name),
        category: Some(category),
        ..Facts::default()
    }
}

fn other<'a>(host: &'a str, method: &'a str) -> Facts<'a> {
    Facts { route: RouteKind::Other, host: Some(host), method: Some(method), ..Facts::default() }
}

#[test]
fn example_policy_decides_each_request_by_first_match_or_default() {
    let snapshot = example();
    let billing = Facts {
        route: RouteKind::Llm,
        agent: Some("billing-bot"),
        host: Some("API.openai.com"),
        path: Some("/v1/chat/completions"),
        ..Facts::default()
    };
    let cases: Vec<(&str, Facts<'_>, Effect, &str, &str)> = vec![
        (
            "tier 4 on a gpt-4 model",
            llm("4", "openai", "gpt-4o"),
            Effect::Deny,
            "model_not_allowed_for_tier",
            "no-gpt4-for-tier-4",
        ),
        (
            "tier 3 is not covered",
            llm("3", "openai", "gpt-4o"),
            Effect::Allow,
            "default_allow",
            "defaults.llm",
        ),
        (
            "glob does not match gpt-3",
            llm("4", "openai", "gpt-3.5"),
            Effect::Allow,
            "default_allow",
            "defaults.llm",
        ),
        (
            "other provider",
            llm("4", "azure", "gpt-4o"),
            Effect::Allow,
            "default_allow",
            "defaults.llm",
        ),
        (
            "research search tool",
            tool("research", "search_web", "read"),
            Effect::Allow,
            "rule_allow",
            "research-tools",
        ),
        (
            "research fetch_url",
            tool("research", "fetch_url", "read"),
            Effect::Allow,
            "rule_allow",
            "research-tools",
        ),
        (
            "research tool not in list",
            tool("research", "send_mail", "read"),
            Effect::RequireApproval,
            "default_require_approval",
            "defaults.tool",
        ),
        (
            "delete from any unit",
            tool("sales", "rm", "delete"),
            Effect::Deny,
            "destructive_action",
            "no-deletes",
        ),
        (
            "deploy is in the list",
            tool("research", "ship", "deploy"),
            Effect::Deny,
            "destructive_action",
            "no-deletes",
        ),
        (
            "billing bot, host case folded, path prefix",
            billing,
            Effect::Allow,
            "rule_allow",
            "billing-bot-openai",
        ),
        (
            "internal GET",
            other("db.internal.example.com", "get"),
            Effect::Allow,
            "rule_allow",
            "internal-hosts",
        ),
        (
            "internal POST",
            other("db.internal.example.com", "POST"),
            Effect::Deny,
            "default_deny",
            "defaults.other",
        ),
        (
            "unknown host",
            other("evil.example.net", "GET"),
            Effect::Deny,
            "default_deny",
            "defaults.other",
        ),
    ];
    for (name, facts, effect, reason, clause) in cases {
        let d = snapshot.evaluate(&facts);
        assert_eq!((d.effect, d.reason, d.clause), (effect, reason, clause), "{name}");
        assert_eq!(d.policy_version, "2026-11-22.1", "{name}");
        assert_eq!(d, snapshot.evaluate_linear(&facts), "{name}");
    }
}

#[test]
fn billing_path_prefix_stops_at_segment_boundary() {
    let snapshot = example();
    let facts = Facts {
        route: RouteKind::Llm,
        agent: Some("billing-bot"),
        host: Some("api.openai.com"),
        path: Some("/v1/chatty"),
        ..Facts::default()
    };
    assert_eq!(snapshot.evaluate(&facts).clause, "defaults.llm");
}

#[test]
fn first_matching_rule_in_document_order_wins_even_when_a_later_one_is_more_specific() {
    let snapshot = Snapshot::from_yaml_str(
        "version: v1\nrules:\n\
         - {id: any-gpt, match: {model: 'gpt-*'}, effect: require_approval}\n\
         - {id: bot-gpt4o, match: {agent: bot, model: gpt-4o}, effect: deny}\n\
         - {id: bot, match: {agent: bot}, effect: allow}\n",
    )
    .unwrap();
    let facts = Facts {
        route: RouteKind::Llm,
        agent: Some("bot"),
        model: Some("gpt-4o"),
        ..Facts::default()
    };
    assert_eq!(snapshot.evaluate(&facts).clause, "any-gpt");
    let facts = Facts { model: Some("claude-3"), ..facts };
    assert_eq!(snapshot.evaluate(&facts).clause, "bot");
}

#[test]
fn shipped_defaults_deny_other_hosts_and_require_approval_for_tools() {
    let snapshot = Snapshot::from_yaml_str("version: v1\n").unwrap();
    let cases = [
        (RouteKind::Llm, Effect::Allow, "default_allow", "defaults.llm"),
        (RouteKind::Tool, Effect::RequireApproval, "default_require_approval", "defaults.tool"),
        (RouteKind::Other, Effect::Deny, "default_deny", "defaults.other"),
    ];
    for (route, effect, reason, clause) in cases {
        let d = snapshot.evaluate(&Facts { route, ..Facts::default() });
        assert_eq!((d.effect, d.reason, d.clause), (effect, reason, clause));
        assert!(d.is_default());
    }
    let d = snapshot.evaluate(&Facts { route: RouteKind::Tool, ..Facts::default() });
    assert_eq!(d.explanation, "no policy rule matched; tool actions require approval by default");
}

#[test]
fn configured_defaults_replace_shipped_ones_per_kind() {
    let snapshot = Snapshot::from_yaml_str("version: v1\ndefaults: {llm: deny}\n").unwrap();
    assert_eq!(snapshot.default_effect(RouteKind::Llm), Effect::Deny);
    assert_eq!(snapshot.default_effect(RouteKind::Tool), Effect::RequireApproval);
    assert_eq!(snapshot.default_effect(RouteKind::Other), Effect::Deny);
}

#[test]
fn rule_limits_override_document_limits_field_by_field() {
    let snapshot = example();
    let d = snapshot.evaluate(&tool("research", "search_web", "read"));
    assert_eq!(
        d.limits,
        Limits {
            rpm: Some(60),
            tpm: Some(200_000),
            max_cost_per_request: Some(Money::parse("0.50").unwrap())
        }
    );
    let d = snapshot.evaluate(&llm("1", "openai", "gpt-4o"));
    assert_eq!(
        d.limits,
        Limits {
            rpm: Some(600),
            tpm: Some(200_000),
            max_cost_per_request: Some(Money::from_usd(1))
        }
    );
}

#[test]
fn applicable_budgets_are_document_budgets_then_rule_budgets() {
    let snapshot = example();
    let ids = |d: Decision<'_>| d.budgets.iter().map(|b| b.id.clone()).collect::<Vec<_>>();
    assert_eq!(
        ids(snapshot.evaluate(&tool("research", "fetch_url", "read"))),
        ["cc-monthly", "research-daily"]
    );
    assert_eq!(ids(snapshot.evaluate(&tool("sales", "x", "read"))), ["cc-monthly"]);
    let all: Vec<&str> = snapshot.all_budgets().map(|b| b.id.as_str()).collect();
    assert_eq!(all, ["cc-monthly", "research-daily"]);
}

#[test]
fn json_and_yaml_documents_compile_to_the_same_decisions() {
    let (yaml, json) = (example(), Snapshot::from_yaml_str(EXAMPLE_JSON).unwrap());
    let unlined =
        |s: &Snapshot| s.rules().iter().cloned().map(|r| Rule { line: 0, ..r }).collect::<Vec<_>>();
    assert_eq!(unlined(&yaml), unlined(&json));
    for facts in [llm("4", "openai", "gpt-4-turbo"), tool("research", "search_x", "read")] {
        assert_eq!(yaml.evaluate(&facts), json.evaluate(&facts));
    }
}

#[test]
fn decision_renders_as_text_and_json() {
    let snapshot = example();
    let d = snapshot.evaluate(&tool("research", "search_web", "read"));
    assert_eq!(
        d.to_string(),
        "effect:         allow\n\
         reason:         rule_allow\n\
         clause:         research-tools\n\
         policy_version: 2026-11-22.1\n\
         explanation:    allowed by policy rule `research-tools`\n\
         limits:         rpm=60 tpm=200000 max_cost_per_request=0.50\n\
         budgets:        cc-monthly (cost_center monthly 5000.00), research-daily (project daily 50.00)"
    );
    let json = serde_json::to_value(snapshot.evaluate(&llm("4", "openai", "gpt-4o"))).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "effect": "deny",
            "reason": "model_not_allowed_for_tier",
            "clause": "no-gpt4-for-tier-4",
            "policy_version": "2026-11-22.1",
            "explanation": "Tier 4 agents may not use GPT-4 class models",
            "limits": {"rpm": 600, "tpm": 200000, "max_cost_per_request": "1.00"},
            "budgets": [{"id": "cc-monthly", "scope": "cost_center", "key": null,
                         "period": "monthly", "amount": "5000.00"}]
        })
    );
}

fn errors(text: &str) -> Vec<(String, u32, String)> {
    let err = Snapshot::from_yaml_str(text).expect_err("document should be rejected");
    err.0.into_iter().map(|e| (e.path, e.line, e.message)).collect()
}

#[test]
fn every_error_in_a_document_is_reported_with_path_and_line() {
    let text = "\
defaults: {tool: maybe}
limits: {rpm: 0, max_cost_per_request: \"1.x\"}
budgets:
  - {id: b1, scope: galaxy, period: daily, amount: \"10\"}
rules:
  - id: r1
    match: {model: \"gpt-[4\", route: llm}
    effect: allow
  - id: r1
    match: {category: teleport}
    effect: deny
  - id: r3
    match: {tool: [], route: lan}
    effect: permit
    budgets: [{id: b1, scope: global, key: x, period: daily, amount: \"-1\"}]
  - id: r4
    effect: allow
    colour: red
";
    let got = errors(text);
    let summary: Vec<(&str, u32)> = got.iter().map(|(p, l, _)| (p.as_str(), *l)).collect();
    assert_eq!(
        summary,
        vec![
            ("", 1),
            ("defaults.tool", 1),
            ("limits.rpm", 2),
            ("limits.max_cost_per_request", 2),
            ("budgets[0].scope", 4),
            ("rules[0].match.model", 7),
            ("rules[1].id", 9),
            ("rules[1].match.category", 10),
            ("rules[2].match.tool", 13),
            ("rules[2].match.route", 13),
            ("rules[2].effect", 14),
            ("rules[2].budgets[0].id", 15),
            ("rules[2].budgets[0].key", 15),
            ("rules[2].budgets[0].amount", 15),
            ("rules[3]", 16),
            ("rules[3].colour", 18),
        ],
        "{got:#?}"
    );
    let message = |path: &str| &got.iter().find(|(p, _, _)| p == path).unwrap().2;
    assert!(message("").contains("missing required field `version`"));
    assert!(message("rules[0].match.model").contains("invalid glob `gpt-[4`"));
    assert!(message("rules[1].id").contains("duplicate rule id `r1` (first defined on line 6)"));
    assert!(message("rules[1].match.category").contains("unknown category `teleport`"));
    assert!(message("rules[2].match.tool").contains("empty list matches nothing"));
    assert!(message("rules[2].match.route").contains("unknown value `lan`"));
    assert!(message("rules[2].budgets[0].id").contains("duplicate budget id `b1`"));
    assert!(message("rules[2].budgets[0].amount").contains("must not be negative"));
    assert!(message("rules[3]").contains("missing required field `match`"));
    assert!(message("rules[3].colour").contains("unknown field `colour`"));
}

#[test]
fn rule_after_a_catch_all_is_unreachable() {
    let got = errors(
        "version: v1\nrules:\n  - {id: all, match: {}, effect: deny}\n  - {id: late, match: {agent: a}, effect: allow}\n",
    );
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].0.as_str(), got[0].1), ("rules[1]", 4));
    assert!(got[0].2.contains("unreachable: rule `all` (line 3)"), "{}", got[0].2);
}

#[test]
fn catch_all_as_last_rule_replaces_the_defaults() {
    let snapshot = Snapshot::from_yaml_str(
        "version: v1\nrules:\n  - {id: a, match: {agent: a}, effect: allow}\n  - {id: rest, match: {}, effect: deny}\n",
    )
    .unwrap();
    assert_eq!(
        snapshot.evaluate(&Facts { route: RouteKind::Llm, ..Facts::default() }).clause,
        "rest"
    );
    assert_eq!(snapshot.index_stats(), IndexStats { indexed: 1, residual: 1, dimensions: 1 });
}

#[test]
fn invalid_reason_codes_and_paths_are_rejected() {
    let got = errors(
        "version: v1\nrules:\n  - {id: a, match: {path: v1/chat}, effect: deny, reason: Not-Snake}\n",
    );
    let paths: Vec<&str> = got.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(paths, ["rules[0].match.path", "rules[0].reason"]);
}

/// Small alphabets so that random rules and random requests often meet.
const AGENTS: [&str; 3] = ["a1", "a2", "a-3"];
const MODELS: [&str; 5] = ["gpt-4o", "gpt-4*", "claude-3", "*-mini", "o[13]"];
const TOOLS: [&str; 4] = ["t1", "t2", "t*", "fetch"];
const HOSTS: [&str; 3] = ["api.openai.com", "*.openai.com", "API.OPENAI.COM"];
const PATHS: [&str; 3] = ["/v1", "/v1/chat*", "/v2"];

fn pick(options: &'static [&'static str]) -> impl Strategy<Value = Vec<&'static str>> {
    prop::sample::subsequence(options, 1..=2.min(options.len()))
}

fn any_rule() -> impl Strategy<Value = serde_json::Value> {
    let fields = (
        prop::option::weighted(0.4, pick(&AGENTS)),
        prop::option::weighted(0.3, pick(&["1", "2", "4"])),
        prop::option::weighted(0.3, pick(&["CC-0001", "CC-0002"])),
        prop::option::weighted(0.4, pick(&MODELS)),
        prop::option::weighted(0.4, pick(&TOOLS)),
        prop::option::weighted(0.3, pick(&["read", "write", "delete"])),
        prop::option::weighted(0.2, pick(&HOSTS)),
        prop::option::weighted(0.2, pick(&PATHS)),
        prop::option::weighted(0.3, pick(&RouteKind::NAMES)),
        prop::option::weighted(0.2, pick(&["openai", "anthropic"])),
    );
    (fields, prop::sample::select(Effect::NAMES.to_vec())).prop_map(|(f, effect)| {
        let mut m = serde_json::Map::new();
        let mut put = |key: &str, v: Option<Vec<&str>>| {
            if let Some(v) = v {
                m.insert(key.into(), serde_json::json!(v));
            }
        };
        put("agent", f.0);
        put("tier", f.1);
        put("cost_center", f.2);
        put("model", f.3);
        put("tool", f.4);
        put("category", f.5);
        put("host", f.6);
        put("path", f.7);
        put("route", f.8);
        put("provider", f.9);
        if m.is_empty() {
            m.insert("agent".into(), serde_json::json!("a1"));
        }
        serde_json::json!({"match": m, "effect": effect})
    })
}

fn maybe(options: &'static [&'static str]) -> impl Strategy<Value = Option<&'static str>> {
    prop::option::weighted(0.8, prop::sample::select(options))
}

fn any_facts() -> impl Strategy<Value = Facts<'static>> {
    (
        (
            maybe(&["a1", "a2", "a-3", "zz"]),
            maybe(&["1", "2", "4"]),
            maybe(&["CC-0001", "CC-0002"]),
        ),
        (
            maybe(&["gpt-4o", "gpt-4", "claude-3", "o1-mini", "o3"]),
            maybe(&["t1", "t2", "t9", "fetch"]),
        ),
        (maybe(&["read", "write", "delete"]), maybe(&["api.openai.com", "x.OpenAI.com"])),
        (
            maybe(&["/v1", "/v1/chat/x", "/v2/a", "/v10"]),
            prop::sample::select(RouteKind::ALL.to_vec()),
        ),
        maybe(&["openai", "anthropic"]),
    )
        .prop_map(
            |((agent, tier, cc), (model, tool), (category, host), (path, route), provider)| Facts {
                route,
                agent,
                tier,
                cost_center: cc,
                model,
                tool,
                category,
                host,
                path,
                provider,
                ..Facts::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn index_finds_the_same_rule_as_a_linear_scan(
        rules in prop::collection::vec(any_rule(), 0..40),
        catch_all in prop::option::of(prop::sample::select(Effect::NAMES.to_vec())),
        requests in prop::collection::vec(any_facts(), 1..40),
    ) {
        let mut rules: Vec<serde_json::Value> = rules
            .into_iter()
            .enumerate()
            .map(|(i, mut r)| { r["id"] = serde_json::json!(format!("r{i}")); r })
            .collect();
        if let Some(effect) = catch_all {
            rules.push(serde_json::json!({"id": "rest", "match": {}, "effect": effect}));
        }
        let text = serde_json::json!({"version": "p", "rules": rules}).to_string();
        let snapshot = Snapshot::from_yaml_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for facts in &requests {
            prop_assert_eq!(snapshot.evaluate(facts), snapshot.evaluate_linear(facts), "{:?}", facts);
        }
    }
}

#[test]
fn a_rule_declares_the_risk_of_what_it_matches() {
    use crate::risk::{Grade, Profile};
    let snapshot = Snapshot::from_yaml_str(
        "version: v1\nrules:\n\
         - {id: deploys, match: {tool: deploy}, effect: allow, risk: {blast_radius: high, reversibility: manual_rollback}}\n\
         - {id: reads, match: {tool: read}, effect: allow}\n",
    )
    .unwrap();
    let facts = |tool| Facts { route: RouteKind::Tool, tool: Some(tool), ..Facts::default() };
    let declared = snapshot.evaluate(&facts("deploy")).risk.expect("declared");
    assert_eq!(
        declared,
        Profile {
            blast_radius: Some(Grade::High),
            reversibility: Some(Grade::Medium),
            ..Profile::default()
        }
    );
    assert_eq!(snapshot.evaluate(&facts("read")).risk, None);
    assert_eq!(snapshot.evaluate(&facts("other")).risk, None, "defaults declare nothing");
    let got = errors(
        "version: v1\nrules:\n- {id: a, match: {tool: x}, effect: allow, risk: {blast_radius: huge}}\n",
    );
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].0.as_str(), got[0].1), ("rules[0].risk.blast_radius", 3));
}
