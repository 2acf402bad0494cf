//! A realistic large policy and request mix shared by the decision benchmarks.
//!
//! 10,000 rules over 1,000 agents: per-agent rules (agent + tool, agent + model), per-tool
//! rules, per-project model allow-lists, per-cost-center approvals on writes, model-glob rules
//! keyed by tier, and about a hundred residual rules (globs and hosts only) that every request
//! of their route kind has to look at. Requests carry the six attribution headers (plus a few
//! unrelated ones), and about 2 % of them are badly attributed. Deterministic: a fixed LCG.

#![allow(dead_code)]

use std::fmt::Write;

use tollgate_core::attribution::Attribution;
use tollgate_core::policy::{Decision, Facts, RouteKind, Snapshot};

pub const AGENTS: usize = 1_000;
pub const RULES: usize = 10_000;

const TOOLS: [&str; 12] = [
    "search_web",
    "search_docs",
    "fetch_url",
    "send_email",
    "create_ticket",
    "run_sql",
    "deploy_service",
    "delete_branch",
    "read_file",
    "write_file",
    "call_api",
    "exec_shell",
];
const CATEGORIES: [&str; 12] = [
    "read",
    "read",
    "read",
    "external_api",
    "write",
    "database",
    "deploy",
    "delete",
    "read",
    "write",
    "external_api",
    "execute",
];
const MODELS: [(&str, &str); 6] = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("openai", "o3"),
    ("anthropic", "claude-sonnet-4-5"),
    ("anthropic", "claude-haiku-4-5"),
    ("openai", "gpt-4.1"),
];
const UNITS: [&str; 4] = ["engineering", "operations", "research", "sales"];

/// A deterministic 64-bit LCG (Knuth's MMIX constants).
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Lcg(seed)
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

fn agent(i: usize) -> String {
    format!("agent-{i:04}")
}
fn cost_center(i: usize) -> String {
    format!("CC-{:04}", i % 50)
}
fn project(i: usize) -> String {
    format!("PROJ-P{:05}", i % 200)
}

/// The policy document as YAML (one flow mapping per rule).
pub fn policy_yaml() -> String {
    let mut rng = Lcg::new(7);
    let mut rules: Vec<String> = Vec::with_capacity(RULES);
    // About a hundred residual rules first: every request of their route meets them.
    for k in 0..40 {
        rules.push(format!("match: {{model: \"ft:*-corp-{k}\", route: llm}}, effect: deny"));
    }
    for k in 0..40 {
        rules.push(format!("match: {{host: \"*.svc{k}.internal\", route: other}}, effect: allow"));
    }
    for k in 0..20 {
        rules.push(format!("match: {{tool: \"admin_{k}_*\", route: tool}}, effect: deny"));
    }
    // Tier rules on model globs (indexed by tier).
    for glob in ["gpt-4*", "o*"] {
        rules.push(format!(
            "match: {{tier: \"4\", model: \"{glob}\", route: llm}}, effect: deny, \
             reason: model_not_allowed_for_tier"
        ));
    }
    // Per-cost-center approval for writes.
    for c in 0..50 {
        rules.push(format!(
            "match: {{cost_center: CC-{c:04}, category: [write, database]}}, \
             effect: require_approval"
        ));
    }
    // Per-project model allow-lists.
    for p in 0..200 {
        let (_, model) = MODELS[p % MODELS.len()];
        rules.push(format!(
            "match: {{project: PROJ-P{p:05}, model: {model}}}, effect: allow, \
             limits: {{tpm: 100000}}"
        ));
    }
    // Per-tool rules by business unit.
    for (t, tool) in TOOLS.iter().enumerate() {
        for unit in UNITS {
            let effect = if t % 3 == 0 { "allow" } else { "require_approval" };
            rules.push(format!("match: {{tool: {tool}, business_unit: {unit}}}, effect: {effect}"));
        }
    }
    // Per-agent rules fill the rest.
    let mut i = 0;
    while rules.len() < RULES {
        let a = agent(i % AGENTS);
        let tool = TOOLS[rng.below(TOOLS.len())];
        rules.push(match (i / AGENTS) % 4 {
            0 => format!(
                "match: {{agent: {a}, tool: {tool}}}, effect: allow, limits: {{rpm: 30}}, \
                 budgets: [{{id: b{i}, scope: agent, period: daily, amount: \"20.00\"}}]"
            ),
            1 => format!(
                "match: {{agent: {a}, model: \"claude-*\", route: llm}}, effect: allow, \
                 limits: {{max_cost_per_request: \"0.25\"}}"
            ),
            2 => format!(
                "match: {{agent: {a}, route: other, host: api.partner{i}.com}}, effect: allow"
            ),
            _ => format!("match: {{agent: {a}, tool: {tool}, category: delete}}, effect: deny"),
        });
        i += 1;
    }
    let mut y = String::from(
        "version: bench-1\n\
         defaults: {llm: allow, tool: require_approval, other: deny}\n\
         limits: {rpm: 600, tpm: 200000, max_cost_per_request: \"1.00\"}\n\
         budgets:\n  - {id: cc-monthly, scope: cost_center, period: monthly, amount: \"5000.00\"}\n\
         rules:\n",
    );
    for (n, body) in rules.iter().enumerate() {
        let _ = writeln!(y, "  - {{id: r{n}, {body}}}");
    }
    y
}

/// One prepared request: its headers and its non-identity facts.
pub struct Request {
    pub headers: Vec<(String, String)>,
    pub route: RouteKind,
    pub provider: Option<&'static str>,
    pub model: Option<&'static str>,
    pub tool: Option<&'static str>,
    pub category: Option<&'static str>,
    pub host: Option<String>,
}

/// `count` requests: about half LLM calls, a third tool calls, the rest other hosts; 2 % with
/// a bad or missing attribution header.
pub fn requests(count: usize) -> Vec<Request> {
    let mut rng = Lcg::new(11);
    (0..count)
        .map(|_| {
            let i = rng.below(AGENTS);
            let mut headers = vec![
                ("Host".to_string(), "api.openai.com".to_string()),
                ("content-type".into(), "application/json".into()),
                ("x-agent-id".into(), agent(i)),
                ("x-cost-center".into(), cost_center(i)),
                ("x-project-id".into(), project(i)),
                ("x-business-unit".into(), UNITS[i % 4].into()),
                ("x-agent-tier".into(), format!("{}", 1 + i % 4)),
                ("x-agent-owner".into(), format!("owner{}@example.com", i % 97)),
            ];
            if rng.below(50) == 0 {
                headers[3].1 = "CC-12".into();
                headers.remove(4);
            }
            let kind = rng.below(100);
            let mut r = Request {
                headers,
                route: RouteKind::Llm,
                provider: None,
                model: None,
                tool: None,
                category: None,
                host: None,
            };
            if kind < 50 {
                let (provider, model) = MODELS[rng.below(MODELS.len())];
                r.provider = Some(provider);
                r.model = Some(model);
            } else if kind < 85 {
                let t = rng.below(TOOLS.len());
                r.route = RouteKind::Tool;
                r.tool = Some(TOOLS[t]);
                r.category = Some(CATEGORIES[t]);
            } else {
                r.route = RouteKind::Other;
                let host = match rng.below(3) {
                    0 => format!("api.partner{}.com", rng.below(RULES)),
                    1 => format!("db.svc{}.internal", rng.below(60)),
                    _ => "unknown.example.net".to_string(),
                };
                r.host = Some(host);
            }
            r
        })
        .collect()
}

/// Attribution then evaluation, as an adapter does per request; `None` when attribution
/// rejects the request.
pub fn decide<'s>(
    attribution: &'s Attribution,
    snapshot: &'s Snapshot,
    r: &'s Request,
) -> Option<Decision<'s>> {
    let identity =
        attribution.check_pairs(r.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()))).ok()?;
    let facts = Facts {
        provider: r.provider,
        model: r.model,
        tool: r.tool,
        category: r.category,
        host: r.host.as_deref(),
        ..Facts::from_identity(&identity, r.route)
    };
    Some(snapshot.evaluate(&facts))
}
