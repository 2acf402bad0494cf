use super::*;
use crate::budget::{Budgets as BudgetEngine, MemoryStore};
use crate::inspect;
use crate::policy::RouteKind;

const NOW: UnixMillis = UnixMillis(1_790_000_000_000);

const DOC: &str = r#"
policy:
  version: v-test
  defaults: {llm: allow, tool: require_approval, other: deny}
  rules:
    - {id: no-shell, match: {tool: shell}, effect: deny, reason: shell_forbidden}
    - {id: reads, match: {category: read}, effect: allow, reason: reads_are_fine}
    - {id: ask, match: {agent: ask-bot}, effect: require_approval, reason: ask_first}
    - {id: capped, match: {agent: capped-bot}, effect: allow, limits: {max_cost_per_request: "0.001", rpm: 5}}
    - {id: limited, match: {agent: limited-bot}, effect: allow, limits: {rpm: 5, tpm: 100000}}
    - {id: broke, match: {agent: broke-bot}, effect: allow,
       budgets: [{id: broke-daily, scope: agent, period: daily, amount: "0.000001"}]}
    - {id: funded, match: {agent: funded-bot}, effect: allow,
       budgets: [{id: funded-daily, scope: agent, period: daily, amount: "100"}]}
autonomy:
  default: AUTO_EXECUTE
  accounts:
    off-bot: {default: DISABLED}
    propose-bot: {default: PROPOSE_ONLY}
    careful-bot: {default: APPROVAL_REQUIRED}
"#;

fn engine() -> Engine {
    Engine::from_document(DOC).expect("the test document compiles")
}

/// A store that answers as told and logs what it was asked, in order.
struct Fake {
    calls: Vec<&'static str>,
    rate: Result<(), RateLimited>,
    recordable: bool,
    standing: Standing,
    repeat: Repeat,
    autonomy: BudgetOutcome,
    breaker: Result<(), BreakerOpen>,
    budgets: BudgetEngine<MemoryStore>,
    action_rate: ActionRate,
    /// How many more times `reserve` answers that the store must refill first.
    short: u32,
    /// Likewise for `take_rate`.
    rate_short: u32,
    /// Continue through the owned (parked) continuations, as the Envoy filter does.
    park: bool,
    /// The hourly action count with this index (0: the first asked) answers that the store
    /// must refill first.
    action_short_on: Option<usize>,
    /// How many more times `consume_autonomy` answers that the store must refill first.
    autonomy_short: u32,
}

impl Default for Fake {
    fn default() -> Self {
        Fake {
            calls: Vec::new(),
            rate: Ok(()),
            recordable: true,
            standing: Standing::Normal { consecutive_errors: 0 },
            repeat: Repeat::Fresh { count: 1 },
            autonomy: BudgetOutcome::Consumed {
                used: 1,
                limit: None,
                action_used: 1,
                action_limit: None,
            },
            breaker: Ok(()),
            budgets: BudgetEngine::new(MemoryStore::default()),
            action_rate: ActionRate::Taken(1),
            short: 0,
            rate_short: 0,
            park: false,
            action_short_on: None,
            autonomy_short: 0,
        }
    }
}

impl Stores for Fake {
    fn take_rate(
        &mut self,
        _: &str,
        _: &str,
        _: Option<u64>,
        _: Option<u64>,
        _: u64,
        _: UnixMillis,
    ) -> Result<(), RateLimited> {
        self.calls.push("rate");
        if self.rate_short > 0 {
            self.rate_short -= 1;
            return Err(RateLimited::Short(Box::new(crate::budget::Refill {
                key: "rate".into(),
                amount: 1,
                limit: 0,
                expires_at: UnixMillis(0),
            })));
        }
        self.rate.clone()
    }
    fn take_action_rate(&mut self, _: &str, _: &str, _: u32, _: UnixMillis) -> ActionRate {
        let n = self.calls.iter().filter(|c| **c == "action_rate").count();
        self.calls.push("action_rate");
        if self.action_short_on == Some(n) {
            return ActionRate::Short(Box::new(refill("count/hour")));
        }
        self.action_rate.clone()
    }
    fn recordable(&mut self) -> bool {
        self.calls.push("recordable");
        self.recordable
    }
    fn standing(&mut self, _: &str) -> Standing {
        self.calls.push("standing");
        self.standing
    }
    fn observe_call(&mut self, _: u64, _: UnixMillis) -> Repeat {
        self.calls.push("loops");
        self.repeat
    }
    fn consume_autonomy(
        &mut self,
        _: autonomy::Limits,
        _: &str,
        _: &str,
        _: UnixMillis,
    ) -> Result<BudgetOutcome, Box<Refill>> {
        self.calls.push("autonomy_budget");
        if self.autonomy_short > 0 {
            self.autonomy_short -= 1;
            return Err(Box::new(refill("count/auto")));
        }
        Ok(self.autonomy)
    }
    fn history(&mut self, _: &str, _: &str) -> Option<(u64, u64)> {
        self.calls.push("history");
        None
    }
    fn breaker(&mut self, _: UnixMillis) -> Result<(), BreakerOpen> {
        self.calls.push("breaker");
        self.breaker.clone()
    }
    fn reserve(
        &mut self,
        budgets: &Budgets<'_>,
        facts: &Facts<'_>,
        amount: Money,
        now: UnixMillis,
    ) -> Result<Option<Reservation>, BudgetError> {
        self.calls.push("reserve");
        if self.short > 0 {
            self.short -= 1;
            return Err(BudgetError::Store(crate::budget::StoreError::Short(Box::new(
                crate::budget::Refill {
                    key: "lease".into(),
                    amount: amount.nanos(),
                    limit: 0,
                    expires_at: now,
                },
            ))));
        }
        self.budgets
            .reserve(budgets.iter(), |s| scope_value(facts, s), amount, "r-1", now, 60_000)
            .map(Some)
    }
}

fn refill(key: &str) -> Refill {
    Refill { key: key.into(), amount: 1, limit: 1, expires_at: UnixMillis(0) }
}

/// A model call (`gpt-4o`, `max_tokens`) or an MCP tool call (`tool`) by `agent`.
struct Ask {
    agent: &'static str,
    model: Option<&'static str>,
    max_tokens: u64,
    tool: Option<&'static str>,
    category: Option<&'static str>,
}

fn llm(agent: &'static str) -> Ask {
    Ask { agent, model: Some("gpt-4o"), max_tokens: 10, tool: None, category: None }
}

fn tool(agent: &'static str, name: &'static str) -> Ask {
    Ask { agent, model: None, max_tokens: 0, tool: Some(name), category: None }
}

fn run(engine: &Engine, guards: Guards, ask: &Ask, stores: &mut Fake) -> Result<String, Refusal> {
    let body = match ask.tool {
        Some(t) => serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                      "params": {"name": t, "arguments": {"q": 1}}}),
        None => serde_json::json!({"model": ask.model, "max_tokens": ask.max_tokens,
                                   "messages": [{"role": "user", "content": "hi"}]}),
    };
    let body = serde_json::to_vec(&body).unwrap();
    let api = ask.tool.is_none().then_some(Api::ChatCompletions);
    let info = inspect::inspect(api, &body).unwrap();
    let route = if ask.tool.is_some() { RouteKind::Tool } else { RouteKind::Llm };
    let req = Request {
        facts: Facts {
            route,
            agent: Some(ask.agent),
            cost_center: Some("CC-1"),
            model: info.model.as_deref(),
            tool: ask.tool,
            category: ask.category,
            method: Some("POST"),
            path: Some(if ask.tool.is_some() { "/mcp" } else { "/v1/chat/completions" }),
            ..Facts::default()
        },
        call: if ask.tool.is_some() { Call::Other } else { Call::Llm(Some(Provider::OpenAi)) },
        api,
        info: &info,
        body: &body,
        query: None,
        action: ask.tool.unwrap_or("llm"),
        is_tool: ask.tool.is_some(),
        risk: None,
    };
    let rules = Rules { engine, policy: engine.policy(), oversight: guards };
    let outcome = decide(&rules, &req, stores, NOW).map(|a| match a {
        Admission::Admitted(a) => format!(
            "admitted {} {} fast={} reserved={}",
            a.decision.clause,
            a.decision.reason,
            a.oversaw.fast,
            a.reservation.is_some()
        ),
        Admission::Short(short) => {
            let mut refills = 1;
            let mut next = resume(&rules, &req, short, stores);
            loop {
                match next {
                    Ok(Admission::Short(short)) => {
                        refills += 1;
                        next = resume(&rules, &req, short, stores);
                    }
                    Ok(Admission::Admitted(a)) => {
                        break format!(
                            "short {refills} then admitted {} reserved={}",
                            a.decision.clause,
                            a.reservation.is_some()
                        )
                    }
                    Ok(Admission::NeedsApproval(_)) => break "short then asked".to_string(),
                    Err(r) => break format!("short {refills} then refused {}", r.denial.code),
                }
            }
        }
        Admission::NeedsApproval(p) => {
            let digest = p.digest;
            let granted = if stores.park {
                p.park().granted(&rules, &req, stores, NOW)
            } else {
                p.granted(&rules, &req, stores, NOW)
            };
            assert_eq!(digest, req.digest(), "the approval binds to the request's digest");
            format!(
                "approval asked then {}",
                match granted {
                    Ok(Admission::Admitted(a)) =>
                        format!("admitted approved={}", a.oversaw.approved),
                    Ok(_) => "neither admitted nor refused".to_string(),
                    Err(r) => format!("refused {}", r.denial.code),
                }
            )
        }
    });
    outcome
}

fn resume<'p>(
    rules: &Rules<'p>,
    req: &Request<'_>,
    short: Box<Short<'p>>,
    stores: &mut Fake,
) -> Result<Admission<'p>, Refusal> {
    if stores.park {
        short.park().resume(rules, req, stores, NOW)
    } else {
        short.resume(rules, req, stores, NOW)
    }
}

fn all_guards() -> Guards {
    Guards { autonomy: true, loops: true, breakers: true, escalation: true, ..Guards::default() }
}

fn code(r: &Result<String, Refusal>) -> (&str, Option<Step>, Option<u16>) {
    match r {
        Ok(text) => (text.as_str(), None, None),
        Err(r) => (r.denial.code.as_str(), Some(r.step), Some(r.denial.class.status())),
    }
}

#[test]
fn an_allowed_call_without_guards_takes_the_fast_path_and_asks_only_the_ledger() {
    let engine = engine();
    let mut s = Fake::default();
    let r = run(&engine, Guards::default(), &llm("bot"), &mut s);
    assert_eq!(r.unwrap(), "admitted defaults.llm default_allow fast=true reserved=false");
    assert_eq!(s.calls, ["recordable"]);
}

#[test]
fn a_policy_deny_refuses_before_any_store_is_asked() {
    let engine = engine();
    let mut s = Fake::default();
    let r = run(&engine, all_guards(), &tool("bot", "shell"), &mut s);
    assert_eq!(code(&r), ("shell_forbidden", Some(Step::Policy), Some(403)));
    let d = r.unwrap_err().denial;
    assert_eq!(
        (d.clause.as_deref(), d.policy_version.as_deref()),
        (Some("no-shell"), Some("v-test"))
    );
    assert!(s.calls.is_empty(), "{:?}", s.calls);
}

#[test]
fn category_facts_reach_the_policy() {
    let engine = engine();
    let mut s = Fake::default();
    let mut ask = tool("bot", "list_files");
    ask.category = Some("read");
    let r = run(&engine, Guards::default(), &ask, &mut s);
    assert_eq!(r.unwrap(), "admitted reads reads_are_fine fast=true reserved=false");
}

#[test]
fn a_model_call_without_a_model_or_with_an_unknown_one_is_refused_at_pricing() {
    let engine = engine();
    let mut s = Fake::default();
    let mut ask = llm("bot");
    ask.model = None;
    let r = run(&engine, Guards::default(), &ask, &mut s);
    assert_eq!(code(&r), ("missing_model", Some(Step::Pricing), Some(400)));
    ask.model = Some("no-such-model");
    let r = run(&engine, Guards::default(), &ask, &mut s);
    assert_eq!(code(&r), ("unknown_model", Some(Step::Pricing), Some(403)));
    assert_eq!(r.unwrap_err().denial.clause.as_deref(), Some("defaults.llm"));
    assert!(s.calls.is_empty());
}

#[test]
fn the_cost_cap_comes_before_the_rate_limits() {
    let engine = engine();
    let mut s = Fake::default();
    let mut ask = llm("capped-bot");
    ask.max_tokens = 4000;
    let r = run(&engine, Guards::default(), &ask, &mut s);
    assert_eq!(code(&r), ("cost_limit_exceeded", Some(Step::CostCap), Some(403)));
    assert!(s.calls.is_empty(), "the rate limits were not charged: {:?}", s.calls);
    ask.max_tokens = 10;
    let r = run(&engine, Guards::default(), &ask, &mut s);
    assert_eq!(r.unwrap(), "admitted capped rule_allow fast=true reserved=false");
    assert_eq!(s.calls, ["rate", "recordable"]);
}

#[test]
fn rate_limits_refuse_before_the_ledger_check_with_a_retry_after() {
    let engine = engine();
    let mut s = Fake {
        rate: Err(RateLimited::Tokens { limit: 100, retry_after_secs: 0 }),
        ..Fake::default()
    };
    let r = run(&engine, all_guards(), &llm("limited-bot"), &mut s);
    assert_eq!(code(&r), ("rate_limited_tokens", Some(Step::RateLimit), Some(429)));
    let d = r.unwrap_err().denial;
    assert_eq!(d.retry_after_secs, Some(1));
    assert_eq!(d.message, "more than 100 tokens per minute; retry in 1 s");
    assert_eq!(d.clause.as_deref(), Some("limited"));
    assert_eq!(s.calls, ["rate"]);
    // A store that cannot count: no clause (not the decision's doing).
    let mut s = Fake { rate: Err(RateLimited::Unavailable), ..Fake::default() };
    let r = run(&engine, all_guards(), &llm("limited-bot"), &mut s);
    assert_eq!(code(&r), ("budget_store_unavailable", Some(Step::RateLimit), Some(503)));
    assert_eq!(r.unwrap_err().denial.clause, None);
}

#[test]
fn an_unwritable_ledger_refuses_before_oversight() {
    let engine = engine();
    let mut s = Fake { recordable: false, ..Fake::default() };
    let r = run(&engine, all_guards(), &tool("bot", "search"), &mut s);
    assert_eq!(code(&r), ("ledger_unavailable", Some(Step::Recording), Some(503)));
    assert_eq!(s.calls, ["recordable"]);
}

#[test]
fn a_disabled_agent_is_refused_before_its_autonomy_mode_is_looked_at() {
    let engine = engine();
    let mut s = Fake { standing: Standing::Disabled { consecutive_errors: 5 }, ..Fake::default() };
    // `off-bot` is DISABLED by autonomy too: the standing wins.
    let r = run(&engine, all_guards(), &llm("off-bot"), &mut s);
    assert_eq!(code(&r), ("agent_disabled", Some(Step::Disabled), Some(403)));
    assert_eq!(s.calls, ["recordable", "standing"]);
}

#[test]
fn autonomy_disabled_and_propose_only_refuse_before_the_loop_detector() {
    let engine = engine();
    for (agent, reason, step) in [
        ("off-bot", "autonomy_disabled", Step::AutonomyDisabled),
        ("propose-bot", "autonomy_propose_only", Step::Proposal),
    ] {
        let mut s =
            Fake { repeat: Repeat::Loop { count: 3, retry_after_ms: 1 }, ..Fake::default() };
        let r = run(&engine, all_guards(), &tool(agent, "search"), &mut s);
        assert_eq!(code(&r), (reason, Some(step), Some(403)), "{agent}");
        assert_eq!(s.calls, ["recordable", "standing"]);
    }
}

#[test]
fn a_loop_is_refused_before_an_approval_is_asked_for() {
    let engine = engine();
    let mut s = Fake { repeat: Repeat::Loop { count: 3, retry_after_ms: 1500 }, ..Fake::default() };
    // The tool default is require_approval: the loop still comes first.
    let r = run(&engine, all_guards(), &tool("bot", "fetch_url"), &mut s);
    assert_eq!(code(&r), ("loop_detected", Some(Step::Loop), Some(403)));
    assert_eq!(r.unwrap_err().denial.retry_after_secs, Some(2));
    assert_eq!(s.calls, ["recordable", "standing", "loops"]);
    // Model calls are not watched.
    let mut s = Fake { repeat: Repeat::Loop { count: 3, retry_after_ms: 1500 }, ..Fake::default() };
    let r = run(&engine, all_guards(), &llm("bot"), &mut s);
    assert!(r.is_ok());
    assert!(!s.calls.contains(&"loops"));
}

#[test]
fn an_approval_is_asked_before_the_breaker_which_comes_before_the_budgets() {
    let engine = engine();
    let open = BreakerOpen { upstream: "up:1".into(), retry_after_ms: 2000 };
    // The policy asks: the breaker is not consulted until the approval is granted.
    let mut s = Fake { breaker: Err(open.clone()), ..Fake::default() };
    let r = run(&engine, all_guards(), &llm("ask-bot"), &mut s);
    assert_eq!(r.unwrap(), "approval asked then refused circuit_open");
    assert_eq!(s.calls, ["recordable", "standing", "history", "breaker"]);
    // Without an approval to ask for, an open breaker refuses, and no budget is reserved.
    let mut s = Fake { breaker: Err(open), ..Fake::default() };
    let r = run(&engine, all_guards(), &llm("funded-bot"), &mut s);
    assert_eq!(code(&r), ("circuit_open", Some(Step::Breaker), Some(503)));
    assert_eq!(r.as_ref().unwrap_err().denial.retry_after_secs, Some(2));
    assert_eq!(s.calls, ["recordable", "standing", "autonomy_budget", "breaker"]);
}

#[test]
fn a_granted_approval_goes_on_to_the_breaker_and_the_budgets() {
    let engine = engine();
    let mut s = Fake::default();
    let r = run(&engine, all_guards(), &llm("careful-bot"), &mut s);
    assert_eq!(r.unwrap(), "approval asked then admitted approved=true");
    // APPROVAL_REQUIRED asks without consuming an autonomy budget unit.
    assert_eq!(s.calls, ["recordable", "standing", "history", "breaker"]);
}

#[test]
fn an_exhausted_autonomy_budget_asks_a_human_and_one_consumed_lets_through() {
    let engine = engine();
    let mut s = Fake {
        autonomy: BudgetOutcome::Exhausted {
            limit: autonomy::BudgetLimit::PerDay,
            used: 3,
            max: 3,
        },
        ..Fake::default()
    };
    let r = run(&engine, all_guards(), &llm("bot"), &mut s);
    assert!(r.unwrap().starts_with("approval asked"));
    let mut s = Fake::default();
    let r = run(&engine, all_guards(), &llm("bot"), &mut s);
    assert_eq!(r.unwrap(), "admitted defaults.llm default_allow fast=false reserved=false");
    // The policy asking spends no autonomy unit.
    let mut s = Fake::default();
    let _ = run(&engine, all_guards(), &llm("ask-bot"), &mut s);
    assert!(!s.calls.contains(&"autonomy_budget"));
}

#[test]
fn budgets_are_reserved_last_and_refuse_with_402() {
    let engine = engine();
    let mut s = Fake::default();
    let r = run(&engine, Guards::default(), &llm("broke-bot"), &mut s);
    assert_eq!(code(&r), ("budget_exceeded", Some(Step::Budget), Some(402)));
    assert_eq!(r.unwrap_err().denial.clause.as_deref(), Some("broke"));
    assert_eq!(s.calls, ["recordable", "reserve"]);
    let mut s = Fake::default();
    let r = run(&engine, all_guards(), &llm("funded-bot"), &mut s);
    assert_eq!(r.unwrap(), "admitted funded rule_allow fast=false reserved=true");
    assert_eq!(s.calls, ["recordable", "standing", "autonomy_budget", "breaker", "reserve"]);
}

const GUARDED: &str = r#"
policy:
  version: v-guard
  defaults: {llm: allow, tool: allow, other: deny}
  rules:
    - {id: no-shell, match: {tool: shell}, effect: deny, reason: shell_forbidden}
guardrails:
  actions:
    read_file: {allowed_resources: [/workspace/]}
    run_command: {requires_approval: false}
"#;

/// An MCP call of `name` with `arguments` (or a tool route's call with `body` and `query` when
/// `mcp` is false) under the guarded engine.
fn guarded(
    name: &str,
    args: serde_json::Value,
    query: Option<&str>,
    mcp: bool,
    stores: &mut Fake,
) -> Result<String, Refusal> {
    let engine = Engine::from_document(GUARDED).expect("compiles");
    let body = if mcp {
        serde_json::json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                           "params": {"name": name, "arguments": args}})
    } else {
        args
    };
    let body = serde_json::to_vec(&body).unwrap();
    let info = if mcp { inspect::inspect(None, &body).unwrap() } else { Default::default() };
    let req = Request {
        facts: Facts {
            route: RouteKind::Tool,
            agent: Some("bot"),
            tool: Some(name),
            method: Some("POST"),
            path: Some("/mcp"),
            ..Facts::default()
        },
        call: Call::Other,
        api: None,
        info: &info,
        body: &body,
        query,
        action: name,
        is_tool: true,
        risk: None,
    };
    let rules = Rules { engine: &engine, policy: engine.policy(), oversight: Guards::default() };
    decide(&rules, &req, stores, NOW).map(|a| match a {
        Admission::Admitted(a) => format!("admitted fast={}", a.oversaw.fast),
        Admission::NeedsApproval(p) => format!("asked {}", p.reason),
        Admission::Short(s) => format!("short {}", s.refill.key),
    })
}

fn breach(r: &Result<String, Refusal>) -> (String, Option<String>, Option<String>, Option<u16>) {
    match r {
        Ok(s) => (s.clone(), None, None, None),
        Err(r) => {
            assert_eq!(r.step, Step::Guardrail, "{r:?}");
            let g = r.denial.guardrail.as_deref().expect("a guardrail refusal names its breach");
            (
                r.denial.code.clone(),
                g.argument.clone(),
                g.pattern.clone(),
                Some(r.denial.class.status()),
            )
        }
    }
}

#[test]
fn guardrails_refuse_forbidden_arguments_unknown_actions_and_outside_resources() {
    use serde_json::json;
    let cases = [
        ("run_command", json!({"cmd": "rm -rf /"}), "forbidden_pattern", Some("$.cmd")),
        (
            "run_command",
            json!({"opts": {"argv": ["x", "sudo mkfs.ext4 /dev/sda"]}}),
            "forbidden_pattern",
            Some("$.opts.argv[1]"),
        ),
        ("run_command", json!({"cmd": "rm -rf ./build"}), "admitted fast=true", None),
        (
            "database_mutation",
            json!({"sql": "DROP TABLE users"}),
            "asked guardrail_requires_approval",
            None,
        ),
        ("read_file", json!({"path": "/etc/passwd"}), "resource_not_allowed", Some("$.path")),
        (
            "read_file",
            json!({"path": "/workspace/../etc/x"}),
            "resource_not_allowed",
            Some("$.path"),
        ),
        ("read_file", json!({"path": "/workspace/app/.env"}), "forbidden_pattern", Some("$.path")),
        ("read_file", json!({"path": "/workspace/notes.txt"}), "admitted fast=true", None),
        ("launch_rocket", json!({}), "unknown_action", None),
    ];
    for (name, args, want, path) in cases {
        let mut stores = Fake::default();
        let got = breach(&guarded(name, args.clone(), None, true, &mut stores));
        if want.starts_with("admitted") || want.starts_with("asked") {
            // database_mutation's DROP TABLE is refused; its approval flag shows on a clean call.
            if name == "database_mutation" {
                assert_eq!(got.0, "forbidden_pattern", "{args}");
                let mut stores = Fake::default();
                let clean = guarded(
                    name,
                    json!({"sql": "UPDATE t SET a = 1 WHERE id = 2"}),
                    None,
                    true,
                    &mut stores,
                );
                assert_eq!(clean.unwrap(), want);
                continue;
            }
            assert_eq!(got.0, want, "{name} {args}");
            continue;
        }
        assert_eq!(
            (got.0.as_str(), got.1.as_deref(), got.3),
            (want, path, Some(403)),
            "{name} {args}"
        );
        assert!(!stores.calls.contains(&"reserve"), "nothing reserved on a refusal");
    }
}

#[test]
fn a_guardrail_refusal_of_an_mcp_call_answers_in_json_rpc() {
    let mut stores = Fake::default();
    let refusal = guarded(
        "run_command",
        serde_json::json!({"cmd": "shutdown -h now"}),
        None,
        true,
        &mut stores,
    )
    .unwrap_err();
    let reply = refusal.denial.render(crate::refusal::Shape::OpenAi, "req-1");
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(reply.status, 403);
    assert_eq!(body["jsonrpc"], "2.0");
    assert_eq!(body["id"], 7);
    assert_eq!(body["error"]["code"], crate::refusal::JSON_RPC_REFUSED);
    assert_eq!(body["error"]["data"]["code"], "forbidden_pattern");
    assert_eq!(body["error"]["data"]["argument"], "$.cmd");
    assert_eq!(reply.header("x-tollgate-reason"), Some("forbidden_pattern"));
}

#[test]
fn tool_routes_have_their_body_and_query_checked() {
    use serde_json::json;
    let mut stores = Fake::default();
    let r =
        guarded("run_command", json!({"cmd": "ls"}), Some("then=rm+-rf+%2F"), false, &mut stores);
    assert_eq!(breach(&r).1.as_deref(), Some("$query.then"));
    let r = guarded("run_command", json!({"cmd": "ls"}), Some("dir=build"), false, &mut stores);
    assert_eq!(r.unwrap(), "admitted fast=true");
    // No JSON-RPC on a tool route: the error is in the provider shape.
    let r = guarded("run_command", json!({"cmd": "killall -9 node"}), None, false, &mut stores);
    let reply = r.unwrap_err().denial.render(crate::refusal::Shape::OpenAi, "q");
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(body["error"]["code"], "forbidden_pattern");
}

#[test]
fn the_hourly_rate_is_taken_through_the_store_after_every_other_check() {
    use serde_json::json;
    let mut stores = Fake::default();
    let _ = guarded("run_command", json!({"cmd": "reboot"}), None, true, &mut stores);
    assert!(!stores.calls.contains(&"action_rate"), "a refused call takes no unit");
    let mut stores = Fake {
        action_rate: ActionRate::Full { used: 50, retry_after_ms: 1500 },
        ..Fake::default()
    };
    let r = guarded("run_command", json!({"cmd": "ls"}), None, true, &mut stores).unwrap_err();
    assert_eq!(
        (r.denial.code.as_str(), r.denial.class.status(), r.denial.retry_after_secs),
        ("rate_limit_exceeded", 429, Some(2))
    );
    let mut stores = Fake { action_rate: ActionRate::Unavailable, ..Fake::default() };
    let r = guarded("run_command", json!({"cmd": "ls"}), None, true, &mut stores).unwrap_err();
    assert_eq!(r.denial.class.status(), 503);
}

#[test]
fn arguments_over_the_bounds_are_refused_not_skipped() {
    use serde_json::json;
    let mut stores = Fake::default();
    let big = "a".repeat(crate::guardrails::args::MAX_ARGUMENT_BYTES + 1);
    let r = guarded("run_command", json!({"cmd": big}), None, false, &mut stores);
    assert_eq!(breach(&r).0, "arguments_too_large");
    let mut deep = json!("x");
    for _ in 0..(crate::guardrails::patterns::MAX_DEPTH + 2) {
        deep = json!({"a": deep});
    }
    let body = serde_json::to_vec(&deep).unwrap();
    // serde_json stops at 128 levels; the walk refuses what it does get past the bound.
    if serde_json::from_slice::<serde_json::Value>(&body).is_ok() {
        let r = guarded("run_command", deep, None, false, &mut stores);
        assert_eq!(breach(&r).0, "arguments_too_deep");
    }
}

#[test]
fn without_a_guardrails_section_nothing_is_checked() {
    let mut stores = Fake::default();
    let r = run(&engine(), Guards::default(), &tool("bot", "launch_rocket"), &mut stores);
    assert!(r.is_ok(), "{r:?}");
    assert!(!stores.calls.contains(&"action_rate"));
}

#[test]
fn a_store_short_of_its_lease_hands_the_wait_back_and_resumes_at_the_budgets_only() {
    let engine = engine();
    let mut s = Fake { short: 2, ..Fake::default() };
    let r = run(&engine, all_guards(), &llm("funded-bot"), &mut s);
    assert_eq!(r.unwrap(), "short 2 then admitted funded reserved=true");
    // The oversight steps ran once; only the budgets were asked again.
    assert_eq!(s.calls.iter().filter(|c| **c == "reserve").count(), 3);
    assert_eq!(s.calls.iter().filter(|c| **c == "recordable").count(), 1);
    assert_eq!(s.calls.iter().filter(|c| **c == "breaker").count(), 1);
}

#[test]
fn a_rate_limit_short_of_its_lease_resumes_from_the_rate_limits_without_running_the_guardrails_again(
) {
    let engine = engine();
    let mut s = Fake { rate_short: 1, ..Fake::default() };
    let r = run(&engine, all_guards(), &llm("limited-bot"), &mut s);
    assert_eq!(r.unwrap(), "short 1 then admitted limited reserved=false");
    // Taken once more after the refill; every later step ran once.
    let count = |name: &str| s.calls.iter().filter(|c| **c == name).count();
    assert_eq!((count("rate"), count("recordable"), count("breaker")), (2, 1, 1), "{:?}", s.calls);
}

#[test]
fn parked_continuations_resume_exactly_as_borrowed_ones() {
    let engine = engine();
    for (fake, ask) in [
        (Fake { short: 2, ..Fake::default() }, llm("funded-bot")),
        (Fake { rate_short: 1, ..Fake::default() }, llm("limited-bot")),
        (Fake::default(), llm("careful-bot")),
    ] {
        let mut borrowed = fake_like(&fake);
        let mut parked = Fake { park: true, ..fake_like(&fake) };
        let a = run(&engine, all_guards(), &ask, &mut borrowed);
        let b = run(&engine, all_guards(), &ask, &mut parked);
        assert_eq!(a.as_ref().map_err(|r| &r.denial.code), b.as_ref().map_err(|r| &r.denial.code));
        assert_eq!(borrowed.calls, parked.calls);
        assert!(a.is_ok_and(|t| t.contains("admitted")), "the case reaches the end");
    }
}

fn fake_like(f: &Fake) -> Fake {
    Fake {
        short: f.short,
        rate_short: f.rate_short,
        autonomy_short: f.autonomy_short,
        action_short_on: f.action_short_on,
        ..Fake::default()
    }
}

#[test]
fn an_autonomy_budget_short_of_its_lease_resumes_there_without_counting_the_rate_again() {
    let engine = engine();
    for park in [false, true] {
        let mut s = Fake { autonomy_short: 1, park, ..Fake::default() };
        let r = run(&engine, all_guards(), &llm("limited-bot"), &mut s);
        assert_eq!(r.unwrap(), "short 1 then admitted limited reserved=false");
        let count = |name: &str| s.calls.iter().filter(|c| **c == name).count();
        assert_eq!(
            (count("rate"), count("recordable"), count("autonomy_budget"), count("breaker")),
            (1, 1, 2, 1),
            "{:?}",
            s.calls
        );
    }
}

#[test]
fn an_hourly_action_count_short_of_its_lease_resumes_at_that_tool_call() {
    let engine = Engine::from_document(&format!(
        "{GUARDED}    count_me: {{category: read, risk_level: low, rate_limit_per_hour: 5, requires_approval: true}}\n"
    ))
    .expect("compiles");
    // A JSON-RPC batch of three calls; the second one's count must be refilled first.
    let call = |id: u32, name: &str| {
        serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                           "params": {"name": name, "arguments": {"q": id}}})
    };
    let body = serde_json::json!([call(1, "count_me"), call(2, "count_me"), call(3, "count_me")]);
    let body = serde_json::to_vec(&body).unwrap();
    let info = inspect::inspect(None, &body).unwrap();
    assert_eq!(info.rpc.len(), 3);
    let req = Request {
        facts: Facts {
            route: RouteKind::Tool,
            agent: Some("bot"),
            tool: Some("count_me"),
            method: Some("POST"),
            path: Some("/mcp"),
            ..Facts::default()
        },
        call: Call::Other,
        api: None,
        info: &info,
        body: &body,
        query: None,
        action: "count_me",
        is_tool: true,
        risk: None,
    };
    let rules = Rules { engine: &engine, policy: engine.policy(), oversight: Guards::default() };
    for park in [false, true] {
        let mut s = Fake { action_short_on: Some(1), park, ..Fake::default() };
        let Ok(Admission::Short(short)) = decide(&rules, &req, &mut s, NOW) else {
            panic!("short at the second call: {:?}", s.calls)
        };
        assert_eq!(short.refill.key, "count/hour");
        let again = resume(&rules, &req, short, &mut s);
        let Ok(Admission::NeedsApproval(p)) = again else { panic!("{again:?}") };
        // The first call's ask survived the wait; each call was counted once.
        assert_eq!(p.reason, GUARDRAIL_APPROVAL);
        let counted = s.calls.iter().filter(|c| **c == "action_rate").count();
        assert_eq!(counted, 4, "three calls, the second asked twice: {:?}", s.calls);
    }
}
