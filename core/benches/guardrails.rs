//! What the guardrails add to the admission of a typical MCP `tools/call` with 1 KiB of
//! arguments (`run_command`, the six default patterns, nested strings).
//!
//! First prints a latency distribution (N = 200,000 timed calls each, sorted, p50 / p99 /
//! p99.9): the guardrail check alone (`Guardrails::check_parts` plus the hourly rate), and the
//! whole `lifecycle::decide` with and without a `guardrails:` section, whose p99 difference is
//! the added p99. Then criterion's own measurement of the same three. The target is an added
//! p99 of at most 5 µs.
//!
//! Run: `cargo bench -p tollgate-core --bench guardrails`.

use std::hint::black_box;
use std::time::Instant;

use criterion::Criterion;
use serde_json::{json, Value};
use tollgate_core::autonomy::{self, BudgetOutcome};
use tollgate_core::budget::{BudgetError, Refill, Reservation};
use tollgate_core::engine::Engine;
use tollgate_core::guardrails::args::Part;
use tollgate_core::guardrails::escalation::Standing;
use tollgate_core::guardrails::loops::Repeat;
use tollgate_core::guardrails::{RateCounters, Violation};
use tollgate_core::inspect::{self, RequestInfo};
use tollgate_core::lifecycle::{
    self, ActionRate, Admission, BreakerOpen, Call, Guards, RateLimited, Request, Rules, Stores,
};
use tollgate_core::money::Money;
use tollgate_core::policy::{Budgets, Facts, RouteKind};
use tollgate_core::time::UnixMillis;

const N: usize = 200_000;
const NOW: UnixMillis = UnixMillis(1_790_000_000_000);

const POLICY: &str = r#"
policy:
  version: bench
  defaults: {llm: allow, tool: allow, other: deny}
"#;

const GUARDRAILS: &str = r#"
guardrails:
  actions:
    run_command: {requires_approval: false, rate_limit_per_hour: 4294967295}
"#;

/// A `tools/call` of `run_command` whose body is about 1 KiB: a command, a working directory,
/// an environment and a list of files, none forbidden.
fn call() -> Vec<u8> {
    let files: Vec<String> =
        (0..12).map(|i| format!("/workspace/app/src/module_{i:02}/handler.rs")).collect();
    let body = json!({
        "jsonrpc": "2.0", "id": 42, "method": "tools/call",
        "params": {"name": "run_command", "arguments": {
            "command": "cargo test --workspace --locked -- --nocapture --test-threads 4",
            "cwd": "/workspace/app",
            "env": {"RUST_LOG": "info,tollgate=debug", "CARGO_TERM_COLOR": "never",
                    "PATH": "/usr/local/bin:/usr/bin:/bin"},
            "files": files,
            "description": "Run the whole test suite after the refactoring of the request \
                            handlers so that regressions show before the review; keep output.",
            "timeout_seconds": 600,
        }}
    });
    serde_json::to_vec(&body).expect("serialises")
}

struct Live {
    rates: RateCounters,
}

impl Stores for Live {
    fn take_action_rate(
        &mut self,
        agent: &str,
        action: &str,
        limit: u32,
        now: UnixMillis,
    ) -> ActionRate {
        match self.rates.take(agent, action, Some(limit), now) {
            Ok(n) => ActionRate::Taken(n),
            Err(Violation::RateLimitExceeded { used, retry_after_ms, .. }) => {
                ActionRate::Full { used, retry_after_ms }
            }
            Err(_) => ActionRate::Unavailable,
        }
    }
    fn take_rate(
        &mut self,
        _: &str,
        _: &str,
        _: Option<u64>,
        _: Option<u64>,
        _: u64,
        _: UnixMillis,
    ) -> Result<(), RateLimited> {
        Ok(())
    }
    fn recordable(&mut self) -> bool {
        true
    }
    fn standing(&mut self, _: &str) -> Standing {
        Standing::Normal { consecutive_errors: 0 }
    }
    fn observe_call(&mut self, _: u64, _: UnixMillis) -> Repeat {
        Repeat::Fresh { count: 1 }
    }
    fn consume_autonomy(
        &mut self,
        _: autonomy::Limits,
        _: &str,
        _: &str,
        _: UnixMillis,
    ) -> Result<BudgetOutcome, Box<Refill>> {
        Ok(BudgetOutcome::Consumed { used: 1, limit: None, action_used: 1, action_limit: None })
    }
    fn history(&mut self, _: &str, _: &str) -> Option<(u64, u64)> {
        None
    }
    fn breaker(&mut self, _: UnixMillis) -> Result<(), BreakerOpen> {
        Ok(())
    }
    fn reserve(
        &mut self,
        _: &Budgets<'_>,
        _: &Facts<'_>,
        _: Money,
        _: UnixMillis,
    ) -> Result<Option<Reservation>, BudgetError> {
        Ok(None)
    }
}

fn request<'a>(info: &'a RequestInfo, body: &'a [u8]) -> Request<'a> {
    Request {
        facts: Facts {
            route: RouteKind::Tool,
            agent: Some("bench-bot"),
            provider: Some("mcp"),
            tool: Some("run_command"),
            method: Some("POST"),
            path: Some("/mcp"),
            ..Facts::default()
        },
        call: Call::Other,
        api: None,
        info,
        body,
        query: None,
        action: "run_command",
        is_tool: true,
        risk: None,
    }
}

fn decide(engine: &Engine, req: &Request<'_>, live: &mut Live) {
    let rules = Rules { engine, policy: engine.policy(), oversight: Guards::default() };
    match lifecycle::decide(&rules, req, live, NOW) {
        Ok(Admission::Admitted(a)) => {
            black_box(a);
        }
        other => panic!("the bench call must be admitted: {other:?}"),
    }
}

fn check(engine: &Engine, args: &Value, live: &mut Live) {
    let g = engine.enforced_guardrails().expect("guardrails on");
    let policy = g.check_parts("run_command", &[Part { root: "$", value: args }], Money::ZERO);
    let policy = policy.expect("the bench call passes");
    let limit = policy.rate_limit_per_hour.unwrap_or(u32::MAX);
    black_box(live.take_action_rate("bench-bot", "run_command", limit, NOW));
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn distribution(n: usize, mut f: impl FnMut()) -> (u64, u64, u64) {
    for _ in 0..1000 {
        f();
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    (percentile(&samples, 0.5), percentile(&samples, 0.99), percentile(&samples, 0.999))
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this with fewer calls.
    let quick = std::env::args().all(|a| a != "--bench");
    let n = if quick { 2_000 } else { N };
    let guarded = Engine::from_document(&format!("{POLICY}{GUARDRAILS}")).expect("compiles");
    let plain = Engine::from_document(POLICY).expect("compiles");
    let body = call();
    let info = inspect::inspect(None, &body).expect("an MCP call");
    let args = info.tool_calls().next().expect("a tool call").arguments.clone();
    let req = request(&info, &body);
    let mut live = Live { rates: RateCounters::default() };
    println!("a tools/call of run_command: {} bytes of body", body.len());

    let (c50, c99, c999) = distribution(n, || check(&guarded, &args, &mut live));
    let (g50, g99, g999) = distribution(n, || decide(&guarded, &req, &mut live));
    let (p50, p99, p999) = distribution(n, || decide(&plain, &req, &mut live));
    println!("guardrail check alone:        p50 {c50} ns  p99 {c99} ns  p99.9 {c999} ns");
    println!("decide with guardrails:       p50 {g50} ns  p99 {g99} ns  p99.9 {g999} ns");
    println!("decide without guardrails:    p50 {p50} ns  p99 {p99} ns  p99.9 {p999} ns");
    let added = g99.saturating_sub(p99);
    println!("added p99: {added} ns (difference of the decide p99s; target 5000 ns)");
    if !quick && added.max(c99) > 5_000 {
        eprintln!("FAIL: the guardrails add more than 5 µs at p99");
        std::process::exit(1);
    }

    let mut c = Criterion::default().configure_from_args();
    if quick {
        c = c
            .sample_size(10)
            .warm_up_time(std::time::Duration::from_millis(50))
            .measurement_time(std::time::Duration::from_millis(100));
    }
    c.bench_function("guardrails/check 1KiB tools/call", |b| {
        b.iter(|| check(&guarded, &args, &mut live))
    });
    c.bench_function("guardrails/decide with guardrails", |b| {
        b.iter(|| decide(&guarded, &req, &mut live))
    });
    c.bench_function("guardrails/decide without guardrails", |b| {
        b.iter(|| decide(&plain, &req, &mut live))
    });
    c.final_summary();
}
