//! Criterion benchmark of the per-request decision: attribution check + policy evaluation on a
//! snapshot of 10,000 rules and 1,000 agents (see `support/workload.rs`).
//!
//! Run: `cargo bench -p tollgate-core --bench decide`.

#[path = "support/workload.rs"]
mod workload;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use tollgate_core::attribution::Attribution;
use tollgate_core::policy::{Facts, Snapshot};

fn decide(c: &mut Criterion) {
    let text = workload::policy_yaml();
    let snapshot = Snapshot::from_yaml_str(&text).unwrap_or_else(|e| panic!("{e}"));
    let attribution = Attribution::default();
    let requests = workload::requests(4096);

    let mut group = c.benchmark_group("decide");
    group.measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));

    let mut i = 0;
    group.bench_function("attribution+evaluate/10k-rules", |b| {
        b.iter(|| {
            i = (i + 1) % requests.len();
            black_box(workload::decide(&attribution, &snapshot, &requests[i]))
        })
    });

    let mut i = 0;
    group.bench_function("attribution/6-headers", |b| {
        b.iter(|| {
            i = (i + 1) % requests.len();
            let r = &requests[i];
            black_box(
                attribution.check_pairs(r.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
            )
            .is_ok()
        })
    });

    let facts: Vec<Facts<'_>> = requests
        .iter()
        .filter_map(|r| {
            let identity = attribution
                .check_pairs(r.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .ok()?;
            Some(Facts {
                provider: r.provider,
                model: r.model,
                tool: r.tool,
                category: r.category,
                host: r.host.as_deref(),
                ..Facts::from_identity(&identity, r.route)
            })
        })
        .collect();
    let mut i = 0;
    group.bench_function("evaluate/10k-rules", |b| {
        b.iter(|| {
            i = (i + 1) % facts.len();
            black_box(snapshot.evaluate(&facts[i]))
        })
    });
    let mut i = 0;
    group.bench_function("evaluate_linear/10k-rules", |b| {
        b.iter(|| {
            i = (i + 1) % facts.len();
            black_box(snapshot.evaluate_linear(&facts[i]))
        })
    });
    group.finish();

    let mut group = c.benchmark_group("compile");
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    group.bench_function("parse+validate+index/10k-rules", |b| {
        b.iter_batched(
            || text.clone(),
            |t| Snapshot::from_yaml_str(&t).map(|s| s.rules().len()),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);
