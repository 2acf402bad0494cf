//! Ledger throughput: how many usage records per second the writer makes durable.
//!
//! `cargo bench -p tollgate --bench ledger` appends 200,000 realistic usage records (each with
//! its audit decision) as fast as the caller can queue them, with the default group commit
//! (fsync every 5 ms), and times until `flush` confirms all of them synced. Prints records/s and
//! bytes/s; the data goes to a temporary directory that is removed afterwards.

use std::time::Instant;

use tollgate::audit;
use tollgate::ledger::{Entry, Ledger, Settings, UsageRecord as Record};
use tollgate_core::money::Money;
use tollgate_core::policy::Effect;
use tollgate_core::pricing::Cost;
use tollgate_core::record::{AuditKind, End, UsageSource};
use tollgate_core::usage::Usage;

const RECORDS: usize = 200_000;

fn record(i: usize) -> Record {
    let cost = Cost {
        input: Money::from_nanos(1_250),
        output: Money::from_nanos(50_000),
        total: Money::from_nanos(51_250),
        ..Cost::ZERO
    };
    Record {
        ts: "2026-11-22T10:00:00.000Z".into(),
        reserved_at_ms: 1_795_341_600_000,
        request_id: format!("bench-{i}"),
        reservation_id: format!("res-{i}"),
        agent: format!("agent-{}", i % 100),
        cost_center: "CC-1234".into(),
        project: "PROJ-ABC123".into(),
        business_unit: Some("engineering".into()),
        route: "openai".into(),
        provider: "openai".into(),
        model: Some("gpt-4o".into()),
        tool: None,
        tokens: Usage { input: 500, output: 5, ..Usage::default() },
        cost: Some(cost),
        cost_usd: cost.total,
        cost_nano_usd: cost.total.nanos(),
        decision: Effect::Allow,
        reason: "default_allow".into(),
        clause: "defaults.llm".into(),
        policy_version: "bench-1".into(),
        budgets: vec!["cc-monthly".into()],
        status: 200,
        latency_ms: 3,
        usage_source: UsageSource::Reported,
        price_source: Some(tollgate_core::pricing::PriceSource::Listed),
        end: End::Complete,
        source: None,
        source_event_id: None,
    }
}

fn main() {
    let dir = std::env::temp_dir().join(format!("tollgate-ledger-bench-{}", std::process::id()));
    let settings = Settings {
        data_dir: dir.clone(),
        fsync_interval: std::time::Duration::from_millis(5),
        segment_bytes: 64 * 1024 * 1024,
        fault: None,
        // TOLLGATE_BENCH_HMAC=1: links records by HMAC-SHA256 instead of SHA-256.
        hmac_key: std::env::var_os("TOLLGATE_BENCH_HMAC").map(|_| {
            tollgate::store::chain::KeySource::Env("TOLLGATE_BENCH_HMAC_KEY".into())
                .load()
                .unwrap_or_else(|_| panic!("set TOLLGATE_BENCH_HMAC_KEY (16+ bytes)"))
        }),
        accept_corrupt: Vec::new(),
        encoding: tollgate::store::chain::Encoding::Compact,
        retention: None,
        acknowledge: false,
        volume_bytes: None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let (ledger, _) = Ledger::open(settings, || {}, 1_795_341_600_000).expect("open");
        let records: Vec<Record> = (0..RECORDS).map(record).collect();
        let started = Instant::now();
        for (i, r) in records.into_iter().enumerate() {
            ledger.audit(audit::Event {
                ts: r.ts.clone(),
                kind: AuditKind::Decision,
                request_id: r.request_id.clone(),
                agent: r.agent.clone(),
                effect: Effect::Allow,
                reason: "default_allow".into(),
                ..audit::Event::default()
            });
            ledger.append(Entry::Usage(Box::new(r)));
            if i % 4096 == 0 {
                tokio::task::yield_now().await;
            }
        }
        ledger.flush().await;
        let elapsed = started.elapsed();
        let bytes: u64 = std::fs::read_dir(dir.join("ledger"))
            .unwrap()
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum();
        println!(
            "ledger: {RECORDS} usage records + {RECORDS} audit records durable in {:.2} s: \
             {:.0} records/s, {:.1} MB/s of ledger (fsync every 5 ms)",
            elapsed.as_secs_f64(),
            RECORDS as f64 / elapsed.as_secs_f64(),
            bytes as f64 / 1e6 / elapsed.as_secs_f64()
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
}
