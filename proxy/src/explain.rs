//! `tollgate explain`: the answer the proxy would give a described request, without sending
//! anything anywhere.
//!
//! The request is described by flags (`--header x-agent-id=bot --path /v1/chat/completions
//! --model gpt-4o`) or as JSON (`--json '{"headers":{...},"path":"...","body":{...}}'`, or `-`
//! to read it from stdin; `body_text` gives a raw body instead). It runs the proxy's own steps:
//! route, attribution, classification, then the core's admission phase
//! (`tollgate_core::lifecycle::decide`: policy, worst-case cost, cost cap, rate limits,
//! oversight, budgets) against the given configuration, with a store ([`Assumed`]) that answers
//! from the configuration what it can and lists the live state it had to assume (rate-limit
//! counters, budget spend, escalation standings, breakers, pending approvals, ...). So every
//! refusal that depends only on the configuration and the request is predicted, with the
//! proxy's status and reason; the live checks it could not evaluate are printed.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde::Deserialize;

use tollgate_core::autonomy::{self, BudgetLimit, BudgetOutcome};
use tollgate_core::budget::{
    BudgetError, Budgets as BudgetEngine, MemoryStore, Refill, Reservation,
};
use tollgate_core::guardrails::escalation::Standing;
use tollgate_core::guardrails::loops::Repeat;
use tollgate_core::inspect::{self, RequestInfo};
use tollgate_core::lifecycle::{
    self, ActionRate, Admission, BreakerOpen, Call, Guards, RateLimited, Stores,
};
use tollgate_core::metering::{Api, Provider};
use tollgate_core::money::Money;
use tollgate_core::policy::{Budgets, Facts};
use tollgate_core::refusal::Denial;
use tollgate_core::time::UnixMillis;

use crate::config::{Config, UpstreamKind};

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// Configuration file (the embedded default when omitted).
    #[arg(long, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,
    /// A request header, `name=value` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    #[arg(long, default_value = "POST")]
    method: String,
    #[arg(long, default_value = "/v1/chat/completions")]
    path: String,
    #[arg(long)]
    host: Option<String>,
    /// Shortcut for a body `{"model": MODEL}`.
    #[arg(long)]
    model: Option<String>,
    /// Shortcut for `max_tokens` in the body.
    #[arg(long)]
    max_tokens: Option<u64>,
    /// The whole request as JSON: {"method","path","host","headers":{..},"body":{..}}; `-` reads
    /// stdin.
    #[arg(long)]
    json: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    output_json: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Described {
    method: Option<String>,
    path: Option<String>,
    host: Option<String>,
    /// A header's value, or a list of values for a header sent on several lines.
    #[serde(default)]
    headers: std::collections::BTreeMap<String, HeaderValues>,
    body: Option<serde_json::Value>,
    /// The body as raw text (e.g. one that is not JSON), in place of `body`.
    body_text: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum HeaderValues {
    One(String),
    Lines(Vec<String>),
}

pub fn run(args: ExplainArgs) -> ExitCode {
    match explain(args) {
        Ok((text, allowed)) => {
            println!("{text}");
            if allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            }
        }
        Err(e) => {
            eprintln!("tollgate explain: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Returns the rendered explanation and whether the request would be allowed.
fn explain(args: ExplainArgs) -> anyhow::Result<(String, bool)> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::from_str(crate::config::DEFAULT_YAML)?,
    };
    let d = match args.json.as_deref() {
        Some("-") => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            serde_json::from_str::<Described>(&text)?
        }
        Some(text) => serde_json::from_str::<Described>(text)?,
        None => Described::default(),
    };
    // Every header line, in order: the JSON's, then the flags' (a flag replaces the JSON's
    // lines of its name; the same flag given twice is a header sent twice).
    let mut header_lines: Vec<(String, String)> = Vec::new();
    for (name, values) in &d.headers {
        let name = name.to_ascii_lowercase();
        match values {
            HeaderValues::One(v) => header_lines.push((name, v.clone())),
            HeaderValues::Lines(vs) => {
                header_lines.extend(vs.iter().map(|v| (name.clone(), v.clone())));
            }
        }
    }
    let mut flagged: Vec<String> = Vec::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once('=')
            .or_else(|| h.split_once(':'))
            .ok_or_else(|| anyhow::anyhow!("--header `{h}` is not name=value"))?;
        let name = name.trim().to_ascii_lowercase();
        if !flagged.contains(&name) {
            header_lines.retain(|(n, _)| *n != name);
            flagged.push(name.clone());
        }
        header_lines.push((name, value.trim().to_string()));
    }
    let method = d.method.clone().unwrap_or(args.method.clone());
    let path = d.path.clone().unwrap_or(args.path.clone());
    let host = d.host.clone().or(args.host.clone());
    let body_bytes = match &d.body_text {
        Some(text) => {
            if args.model.is_some() || args.max_tokens.is_some() {
                anyhow::bail!("--model and --max-tokens cannot change a `body_text`");
            }
            text.clone().into_bytes()
        }
        None => {
            let mut body = d.body.clone().unwrap_or_else(|| serde_json::json!({}));
            if let Some(model) = &args.model {
                body["model"] = model.clone().into();
            }
            if let Some(n) = args.max_tokens {
                body["max_tokens"] = n.into();
            }
            serde_json::to_vec(&body)?
        }
    };
    // The first value of each header, for the lookups that read one.
    let mut headers: std::collections::BTreeMap<String, String> = Default::default();
    for (name, value) in &header_lines {
        headers.entry(name.clone()).or_insert_with(|| value.clone());
    }

    let mut out = serde_json::Map::new();
    let mut lines = Vec::new();
    let Some(route) = config.route(host.as_deref(), &path) else {
        let denial = Denial::new(
            tollgate_core::refusal::Class::NoRoute,
            "no_route",
            format!("no route for {} {path}", host.as_deref().unwrap_or("-")),
        );
        lines.push(format!("route:          none for {path} (the proxy answers 404 no_route)"));
        outcome(&mut lines, &mut out, Err(&denial));
        return Ok((render(&args, lines, out), false));
    };
    lines.push(format!(
        "route:          {} ({} → {})",
        route.name,
        route.kind.as_str(),
        route.upstream
    ));
    out.insert("route".into(), route.name.clone().into());

    // Over every line, as the proxy checks: a header sent twice is refused.
    let pairs = header_lines.iter().map(|(n, v)| (n.as_str(), v.as_str()));
    let identity = match config.engine.attribution().check_pairs(pairs) {
        Ok(identity) => identity,
        Err(e) => {
            lines.push(format!("attribution:    REJECTED (403): {e}"));
            out.insert("attribution".into(), serde_json::to_value(&e)?);
            let denial = Denial::new(
                tollgate_core::refusal::Class::Attribution,
                "attribution_rejected",
                e.to_string(),
            );
            outcome(&mut lines, &mut out, Err(&denial));
            return Ok((render(&args, lines, out), false));
        }
    };
    lines.push(format!(
        "attribution:    agent={} cost_center={} project={}",
        identity.agent.unwrap_or("-"),
        identity.cost_center.unwrap_or("-"),
        identity.project.unwrap_or("-")
    ));
    // Classify as the proxy does: the body is inspected when it is JSON (a model or MCP route,
    // or a JSON content type) and not empty.
    let api = route.kind.is_llm().then(|| Api::from_path(&path)).flatten();
    let json = headers.get("content-type").is_some_and(|v| v.starts_with("application/json"))
        || api.is_some()
        || route.kind == UpstreamKind::Mcp;
    let info = if json && !body_bytes.is_empty() {
        match inspect::inspect(api, &body_bytes) {
            Ok(info) => info,
            Err(e) => {
                let denial = Denial::new(
                    tollgate_core::refusal::Class::BadRequest,
                    "malformed_body",
                    e.to_string(),
                );
                outcome(&mut lines, &mut out, Err(&denial));
                return Ok((render(&args, lines, out), false));
            }
        }
    } else {
        RequestInfo::default()
    };
    let (tool, kind) = route.classify(&info);
    let llm = route.kind.is_llm();
    let host = host.as_deref().map(|h| {
        h.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(h, |(h, _)| h)
    });
    let req = lifecycle::Request {
        facts: Facts {
            provider: Some(route.kind.provider()),
            model: info.model.as_deref(),
            tool,
            category: route.category.as_deref(),
            host,
            method: Some(&method),
            path: Some(path.split(['?', '#']).next().unwrap_or(&path)),
            ..Facts::from_identity(&identity, kind)
        },
        call: if llm {
            Call::Llm(Some(if route.kind == UpstreamKind::Anthropic {
                Provider::Anthropic
            } else {
                Provider::OpenAi
            }))
        } else {
            Call::Other
        },
        api,
        info: &info,
        body: &body_bytes,
        query: path.split_once('?').map(|(_, q)| q.split('#').next().unwrap_or(q)),
        action: tool.unwrap_or(if llm { "llm" } else { route.name.as_str() }),
        is_tool: tool.is_some(),
        risk: route.risk,
    };
    let policy = config.engine.policy();
    let o = &config.oversight;
    let rules = lifecycle::Rules {
        engine: &config.engine,
        policy,
        oversight: Guards {
            autonomy: config.autonomy_configured,
            loops: o.loops.is_some(),
            breakers: o.breaker.is_some() && !config.routes.is_empty(),
            escalation: o.escalation.is_some(),
            thresholds: o.thresholds,
        },
    };
    let decision = policy.evaluate(&req.facts);
    // The policy's own effect; the proxy's answer is the `outcome` line below.
    let text = decision.to_string();
    lines.push(text.trim_end().replacen("effect:         ", "policy effect:  ", 1));
    out.insert("decision".into(), serde_json::to_value(decision)?);
    match lifecycle::price(&config.engine, &req) {
        Ok(priced) if priced.free => {
            let provider = match req.call {
                Call::Llm(provider) => provider,
                Call::Other => None,
            };
            let path = req.facts.path.unwrap_or_default();
            let endpoint = tollgate_core::endpoints::free_endpoint(provider, &method, path);
            lines.push(format!("worst case:     $0 ({} is free)", endpoint.unwrap_or(path)));
            out.insert("worst_case_usd".into(), "0".into());
        }
        Ok(priced) => {
            let total = priced.worst_case();
            let text = match priced.bound {
                Some(b) => format!(
                    "worst case:     ${total} ({} input tokens at most, {} output tokens max)",
                    b.input, b.output
                ),
                None => format!("worst case:     ${total}"),
            };
            lines.push(text);
            out.insert("worst_case_usd".into(), total.to_string().into());
        }
        Err(d) => lines.push(format!(
            "worst case:     {} (the proxy answers {} {})",
            d.message,
            d.class.status(),
            d.code
        )),
    }
    let mut assumed = Assumed::new(route);
    let now = crate::clock::now();
    let approval = headers.get(crate::oversight::APPROVAL_HEADER);
    let result = match lifecycle::decide(&rules, &req, &mut assumed, now) {
        Ok(Admission::Admitted(_)) => Ok(()),
        // `explain` counts budgets in memory, which is never short.
        Ok(Admission::Short(_)) => Ok(()),
        Ok(Admission::NeedsApproval(pending)) => {
            let d = pending.decision;
            match approval {
                Some(id) => {
                    assumed.note(format!(
                        "approval {id}: whether it is granted for this request (assumed granted)"
                    ));
                    pending
                        .granted(&rules, &req, &mut assumed, now)
                        .map(drop)
                        .map_err(|r| *r.denial)
                }
                None => {
                    assumed.note(
                        "a granted approval sent as x-tollgate-approval would let the request on"
                            .into(),
                    );
                    Err(Denial::new(
                        tollgate_core::refusal::Class::ApprovalRequired,
                        pending.reason,
                        pending.why,
                    )
                    .with_decision(d.clause, d.policy_version))
                }
            }
        }
        Err(refusal) => Err(*refusal.denial),
    };
    let allowed = result.is_ok();
    outcome(&mut lines, &mut out, result.as_ref().map(|_| &decision));
    if !assumed.notes.is_empty() {
        lines.push("not evaluated (live state, assumed):".into());
        for note in &assumed.notes {
            lines.push(format!("  - {note}"));
        }
    }
    out.insert("not_evaluated".into(), assumed.notes.clone().into());
    Ok((render(&args, lines, out), allowed))
}

/// Prints the proxy's answer: allow, or the refusal with its status and reason.
fn outcome(
    lines: &mut Vec<String>,
    out: &mut serde_json::Map<String, serde_json::Value>,
    result: Result<&tollgate_core::policy::Decision<'_>, &Denial>,
) {
    let value = match result {
        Ok(d) => {
            lines.push("outcome:        allow".into());
            serde_json::json!({
                "effect": "allow",
                "status": 200,
                "reason": d.reason,
                "clause": d.clause,
                "policy_version": d.policy_version,
            })
        }
        Err(d) => {
            lines.push(format!(
                "outcome:        {} ({} {}){}: {}",
                d.class.decision(),
                d.class.status(),
                d.code,
                d.clause.as_deref().map(|c| format!(" by {c}")).unwrap_or_default(),
                d.message
            ));
            let mut value = serde_json::json!({
                "effect": d.class.decision(),
                "status": d.class.status(),
                "reason": d.code,
                "clause": d.clause,
                "policy_version": d.policy_version,
                "message": d.message,
            });
            if let Some(g) = &d.guardrail {
                lines.push(format!(
                    "guardrail:      {} on `{}`{}{}{}",
                    g.reason,
                    g.action,
                    g.argument.as_deref().map(|a| format!(", argument {a}")).unwrap_or_default(),
                    g.pattern.as_deref().map(|p| format!(", pattern `{p}`")).unwrap_or_default(),
                    g.excerpt.as_deref().map(|e| format!(", at \"{e}\"")).unwrap_or_default(),
                ));
                value["guardrail"] = serde_json::json!({
                    "reason": g.reason,
                    "action": g.action,
                    "argument": g.argument,
                    "pattern": g.pattern,
                    "excerpt": g.excerpt,
                });
            }
            value
        }
    };
    out.insert("outcome".into(), value);
}

/// The lifecycle's live state as far as a configuration can tell: limits and budgets are judged
/// as if nothing had been counted or spent yet (so a request over a whole minute's tokens or a
/// whole budget is still refused), everything else is assumed to pass, and each assumption is
/// noted.
struct Assumed {
    notes: Vec<String>,
    budgets: BudgetEngine<MemoryStore>,
    /// The route's name and its upstream's authority (whose breaker the route's calls share).
    route: (String, String),
}

impl Assumed {
    fn new(route: &crate::config::Route) -> Self {
        let authority = route.upstream.authority().map_or_else(String::new, |a| a.to_string());
        Assumed {
            notes: Vec::new(),
            budgets: BudgetEngine::new(MemoryStore::default()),
            route: (route.name.clone(), authority),
        }
    }

    fn note(&mut self, text: String) {
        self.notes.push(text);
    }
}

impl Stores for Assumed {
    fn take_rate(
        &mut self,
        clause: &str,
        agent: &str,
        rpm: Option<u64>,
        tpm: Option<u64>,
        tokens: u64,
        _now: UnixMillis,
    ) -> Result<(), RateLimited> {
        // More tokens than a whole minute allows is refused whatever was counted before.
        if let Some(limit) = tpm.filter(|&l| l > 0 && tokens > l) {
            return Err(RateLimited::Tokens { limit, retry_after_secs: 60 });
        }
        let limits = tollgate_core::policy::Limits { rpm, tpm, max_cost_per_request: None };
        self.note(format!(
            "rate limits ({limits}) for agent {agent} under {clause}: what the last minute used \
             (this request takes 1 request and {tokens} tokens)"
        ));
        Ok(())
    }

    fn take_action_rate(
        &mut self,
        agent: &str,
        action: &str,
        limit: u32,
        _now: UnixMillis,
    ) -> ActionRate {
        if limit == 0 {
            return ActionRate::Full { used: 0, retry_after_ms: 3_600_000 };
        }
        self.note(format!(
            "guardrail rate of agent {agent} for {action}: calls this hour, of {limit} (assumed \
             none)"
        ));
        ActionRate::Taken(1)
    }

    fn recordable(&mut self) -> bool {
        self.note("the ledger is writable (assumed)".into());
        true
    }

    fn standing(&mut self, agent: &str) -> Standing {
        self.note(format!("escalation standing of agent {agent} (assumed normal)"));
        Standing::Normal { consecutive_errors: 0 }
    }

    fn observe_call(&mut self, _digest: u64, _now: UnixMillis) -> Repeat {
        self.note("loop detector: identical calls already made (assumed none)".into());
        Repeat::Fresh { count: 1 }
    }

    fn consume_autonomy(
        &mut self,
        limits: autonomy::Limits,
        agent: &str,
        action: &str,
        _now: UnixMillis,
    ) -> Result<BudgetOutcome, Box<Refill>> {
        // A budget of none is used up whatever was used before.
        let none =
            [(limits.per_day, BudgetLimit::PerDay), (limits.per_action, BudgetLimit::PerAction)];
        if let Some((_, limit)) = none.into_iter().find(|(max, _)| *max == Some(0)) {
            return Ok(BudgetOutcome::Exhausted { limit, used: 0, max: 0 });
        }
        self.note(format!(
            "autonomy budget of agent {agent} for {action}: units used today (assumed none)"
        ));
        Ok(BudgetOutcome::Consumed { used: 1, limit: None, action_used: 1, action_limit: None })
    }

    fn history(&mut self, agent: &str, action: &str) -> Option<(u64, u64)> {
        let note = format!("success history of agent {agent} for {action} (risk scored without)");
        if !self.notes.contains(&note) {
            self.note(note);
        }
        None
    }

    fn breaker(&mut self, _now: UnixMillis) -> Result<(), BreakerOpen> {
        let (route, upstream) = &self.route;
        self.note(format!(
            "the circuit breaker of route {route}, upstream {upstream} (assumed closed)"
        ));
        Ok(())
    }

    fn reserve(
        &mut self,
        budgets: &Budgets<'_>,
        facts: &Facts<'_>,
        amount: Money,
        now: UnixMillis,
    ) -> Result<Option<Reservation>, BudgetError> {
        let ids: Vec<&str> = budgets.iter().map(|b| b.id.as_str()).collect();
        self.note(format!("spend so far in budget(s) {} (assumed $0)", ids.join(", ")));
        self.budgets
            .reserve(
                budgets.iter(),
                |s| lifecycle::scope_value(facts, s),
                amount,
                "explain",
                now,
                60_000,
            )
            .map(Some)
    }
}

fn render(
    args: &ExplainArgs,
    lines: Vec<String>,
    out: serde_json::Map<String, serde_json::Value>,
) -> String {
    if args.output_json {
        serde_json::to_string_pretty(&out).unwrap_or_default()
    } else {
        lines.join("\n")
    }
}
