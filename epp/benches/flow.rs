//! Flow control's queues: draining 5,000 held requests costs the same under one fairness id or 5,000 (dispatch is O(log n) in held requests and flows).

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use inferlane_epp::flow::{BandConfig, Fairness, FlowConfig, FlowQueues, Item, Ordering};
use std::hint::black_box;

fn queues(fairness: Fairness) -> FlowQueues {
    let band = BandConfig {
        priority: 0,
        max_bytes: u64::MAX,
        max_requests: usize::MAX,
        fairness,
        ordering: Ordering::Fcfs,
        usage_limit: 1.0,
        over_share_usage_limit: 1.0,
    };
    FlowQueues::new(FlowConfig {
        max_bytes: u64::MAX,
        max_requests: usize::MAX,
        bands: vec![],
        default_band: band,
        vtc_input_weight: 1.0,
        vtc_output_weight: 2.0,
    })
}

/// Queue `n` items spread over `flows` fairness ids, then release them all.
fn fill_and_drain(fairness: Fairness, n: u64, flows: u64) -> usize {
    let mut q = queues(fairness);
    for i in 0..n {
        q.enqueue(Item {
            id: i,
            flow: format!("tenant-{}", i % flows),
            priority: 0,
            bytes: 100,
            prompt_tokens: 10.0,
            arrival_ms: i,
            deadline_ms: i + 60_000,
        })
        .unwrap();
    }
    let mut drained = 0;
    while q.pop().is_some() {
        drained += 1;
    }
    drained
}

fn drain(c: &mut Criterion) {
    let mut g = c.benchmark_group("flow drain 5,000 held");
    g.sample_size(20);
    for (name, fairness) in [
        ("round-robin", Fairness::RoundRobin),
        ("global-strict", Fairness::GlobalStrict),
        ("vtc", Fairness::Vtc),
    ] {
        for flows in [1u64, 5_000] {
            g.bench_function(BenchmarkId::new(name, format!("{flows} ids")), |b| {
                b.iter(|| fill_and_drain(black_box(fairness), 5_000, flows))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, drain);
criterion_main!(benches);
