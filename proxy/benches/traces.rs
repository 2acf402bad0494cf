//! What a call's span costs on the request path (`cargo bench -p tollgate --bench traces`):
//! off (the default: `Traces::begin` answers `None`), on and sampled (begin under a caller's
//! `traceparent`, name and request attributes, `traceparent` for the upstream, the ledger
//! record's attributes and the end, which queues the span for the batch exporter), and on but
//! not sampled. The exporter points at a closed loopback port: exporting happens on the SDK's
//! own thread and is not what is measured; spans beyond the queue are dropped.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use tollgate::body::StreamEnd;
use tollgate::config::{Config, Sampling};
use tollgate::ledger::UsageRecord;
use tollgate::traces::Traces;
use tollgate_core::inspect;
use tollgate_core::metering::Api;
use tollgate_core::money::Money;
use tollgate_core::policy::Effect;
use tollgate_core::pricing::Cost;
use tollgate_core::record::{End, UsageSource};
use tollgate_core::usage::Usage;

const CONFIG: &str = "version: 1\n\
    routes: [{name: openai, path_prefix: /v1/, kind: openai, upstream: \"https://api.openai.com\"}]\n\
    traces: {enabled: true, endpoint: \"http://127.0.0.1:9/v1/traces\", export_interval: 1s}\n\
    policy: {version: bench-1}\n";

fn record() -> UsageRecord {
    let cost = Cost {
        input: Money::from_nanos(1_250),
        output: Money::from_nanos(50_000),
        total: Money::from_nanos(51_250),
        ..Cost::ZERO
    };
    UsageRecord {
        ts: "2026-11-22T10:00:00.000Z".into(),
        reserved_at_ms: 1_795_341_600_000,
        request_id: "bench-1".into(),
        reservation_id: "res-1".into(),
        agent: "agent-1".into(),
        cost_center: "CC-1234".into(),
        project: "PROJ-ABC123".into(),
        business_unit: None,
        route: "openai".into(),
        provider: "openai".into(),
        model: Some("gpt-4.1-2025-04-14".into()),
        tool: None,
        tokens: Usage { input: 500, cached_input: 100, output: 5, ..Usage::default() },
        cost: Some(cost),
        cost_usd: cost.total,
        cost_nano_usd: cost.total.nanos(),
        decision: Effect::Allow,
        reason: "default_allow".into(),
        clause: "defaults.llm".into(),
        policy_version: "bench-1".into(),
        budgets: Vec::new(),
        status: 200,
        latency_ms: 3,
        usage_source: UsageSource::Reported,
        price_source: Some(tollgate_core::pricing::PriceSource::Listed),
        end: End::Complete,
        source: None,
        source_event_id: None,
    }
}

fn spans(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _entered = runtime.enter();
    let config = Config::from_str(CONFIG).expect("config");
    let route = config.routes[0].clone();
    let body =
        br#"{"model":"gpt-4.1","max_tokens":64,"messages":[{"role":"user","content":"hello"}]}"#;
    let info = inspect::inspect(Some(Api::ChatCompletions), body).expect("inspect");
    let record = record();
    let mut client_headers = HeaderMap::new();
    client_headers.insert(
        "traceparent",
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    let plain_headers = HeaderMap::new();
    let client = tollgate::upstream::client(&Default::default()).expect("client");

    let off = Traces::off();
    c.bench_function("traces off: begin", |b| {
        b.iter(|| black_box(off.begin(black_box(&client_headers))).is_some())
    });

    let on = Traces::start(&config.traces, client).expect("exporter");
    let mut upstream = HeaderMap::new();
    let mut call = |headers: &HeaderMap| {
        let Some(mut span) = on.begin(headers) else { return };
        span.request(&route, Some(Api::ChatCompletions), &info, None, "bench-1");
        span.inject(&mut upstream);
        let reasons = if span.recording() { vec!["stop".to_string()] } else { Vec::new() };
        span.settled(&record, Some("gpt-4.1-2025-04-14"), reasons, true, StreamEnd::Complete, true);
    };
    c.bench_function("traces on, sampled: one call's span", |b| {
        b.iter(|| call(black_box(&client_headers)))
    });
    on.set_sampling(Sampling { ratio: 0.0, parent_based: true });
    c.bench_function("traces on, not sampled: one call's span", |b| {
        b.iter(|| call(black_box(&plain_headers)))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(3));
    targets = spans
}
criterion_main!(benches);
