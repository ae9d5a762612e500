//! Criterion benches of the request-path pieces: metrics parsing, body parsing, prefix matching, picking.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use inferlane_epp::request::{self, ApiKind};
use inferlane_epp::scheduler::{Candidate, ModelPresence, PickInput};
use inferlane_epp::{EndpointMetrics, EngineType, PrefixIndex, SchedulerConfig, pick};

const PAGE: &str = include_str!("../../tests/data/vllm-0.32-metrics-sample.txt");

fn metrics_parse(c: &mut Criterion) {
    c.bench_function("parse real vLLM 0.32 page (608 lines)", |b| {
        b.iter(|| inferlane_epp::metrics::parse(EngineType::Vllm, black_box(PAGE)).unwrap())
    });
}

fn chat_body(prompt_chars: usize) -> Vec<u8> {
    let prompt: String = "You are a helpful assistant. "
        .chars()
        .cycle()
        .take(prompt_chars)
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "model": "food-review-1",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 100,
    }))
    .unwrap()
}

fn body_and_prefix(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    for size in [1_000usize, 400_000] {
        let body = chat_body(size);
        g.bench_with_input(BenchmarkId::new("parse_body", size), &body, |b, body| {
            b.iter(|| request::parse_body(ApiKind::ChatCompletions, black_box(body)).unwrap())
        });
        let parsed = request::parse_body(ApiKind::ChatCompletions, &body).unwrap();
        g.bench_with_input(
            BenchmarkId::new("prefix_blocks", size),
            &parsed.prompt,
            |b, p| b.iter(|| request::prefix_blocks("food-review-1", black_box(p), 64, 8192)),
        );
        // An index where 100 endpoints each served a different 400 KB prompt, plus this one.
        let mut idx = PrefixIndex::new(200_000);
        for e in 0..100u32 {
            let other = format!("{e} {}", parsed.prompt);
            idx.insert(
                &request::prefix_blocks("food-review-1", &other, 64, 8192)[..1000.min(size / 64)],
                e,
            );
        }
        let blocks = request::prefix_blocks("food-review-1", &parsed.prompt, 64, 8192);
        idx.insert(&blocks, 7);
        g.bench_with_input(
            BenchmarkId::new("prefix_match", size),
            &blocks,
            |b, blocks| b.iter(|| idx.match_lengths(black_box(blocks))),
        );
    }
    g.finish();
}

fn picking(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    for n in [10usize, 100, 1000] {
        let metrics: Vec<EndpointMetrics> = (0..n)
            .map(|i| EndpointMetrics {
                waiting: (i % 7) as f64,
                running: (i % 5) as f64,
                kv_usage: (i % 10) as f64 / 10.0,
                max_lora: Some(4),
                running_adapters: vec![format!("a{}", i % 20), "food-review-1".into()],
                ..Default::default()
            })
            .collect();
        let cands: Vec<Candidate<'_>> = metrics
            .iter()
            .enumerate()
            .map(|(i, m)| Candidate {
                id: i as u32,
                metrics: Some(m),
                metrics_age: 0.01,
                healthy: true,
                has_model: ModelPresence::Yes,
                dispatched_since_scrape: (i % 3) as u64,
                in_flight: 0,
                in_flight_at_scrape: 0,
                key: i as u64,
                reading: false,
                reading_target: false,
                cached: None,
            })
            .collect();
        let prefix: HashMap<u32, usize> = (0..n as u32).step_by(3).map(|i| (i, 5)).collect();
        // Upstream's queue threshold: the fleet above is busy but not saturated, so the pick
        // runs whole (with ours, 1, a sheddable request is shed before any scoring).
        let cfg = SchedulerConfig {
            queue_depth_threshold: 5.0,
            ..SchedulerConfig::default()
        };
        g.bench_with_input(BenchmarkId::from_parameter(n), &cands, |b, cands| {
            b.iter(|| {
                let input = PickInput {
                    target: "food-review-1",
                    is_adapter: true,
                    sheddable: true,
                    prefix_matches: &prefix,
                    total_blocks: 10,
                    tie_break: 42,
                    admitted: false,
                    affinity_key: Some(7),
                    affinity_home: None,
                };
                pick(&cfg, black_box(cands), &input).unwrap()
            })
        });
    }
    g.finish();
}

/// The placement lookup each prompt with a prefix key makes (under one short lock), with the
/// typical 50 active prefixes and with the table full; a full rebuild (at most once a
/// second, when the prefix set changed, above 1,024 prefixes); a new prefix below that.
fn placement(c: &mut Criterion) {
    use inferlane_epp::affinity::{Placement, assign, endpoint_key};
    let eps: Vec<u64> = (0..8)
        .map(|i| endpoint_key(&format!("10.0.0.{i}:8000")))
        .collect();
    let mut g = c.benchmark_group("placement lookup (8 endpoints, active prefixes)");
    for n in [50u64, 16_384] {
        let mut p = Placement::new(120.0, 16_384, 1.25);
        for k in 0..n {
            p.place(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), &eps, 0.0);
        }
        p.place(1, &eps, 2.0);
        let mut k = 0u64;
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                k = (k + 1) % n;
                p.place(black_box(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)), &eps, 2.5)
            })
        });
    }
    g.finish();
    let keys: Vec<u64> = (0..16_384u64)
        .map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    c.bench_function("placement rebuild (16,384 prefixes, 8 endpoints)", |b| {
        b.iter(|| assign(black_box(&keys), &eps, 1.25))
    });
    // A timed rebuild of a full table through the keeper's cycle: take (under the lock),
    // compute (outside it), apply (under it). The lock is held for this minus the rebuild.
    let mut p = Placement::new(1e9, 16_384, 1.25);
    p.set_background(true);
    for &k in &keys {
        p.place(k, &eps, 0.0);
    }
    let mut now = 1.0;
    c.bench_function(
        "placement keeper cycle (16,384 prefixes: take + rebuild + apply)",
        |b| {
            b.iter(|| {
                now += 1.0;
                p.place(black_box(now as u64), &eps, now);
                if let Some(job) = p.take_due(now) {
                    p.apply(job.run());
                }
            })
        },
    );
    // A new prefix while about 1,000 are active: the worst case of the exact answer at once
    // (a full table drops its oldest eighth, so this cycles between 897 and 1,024 keys).
    let mut p = Placement::new(1e9, inferlane_epp::affinity::IMMEDIATE_KEYS, 1.25);
    let mut k = 0u64;
    c.bench_function("placement new prefix (~1,000 active, exact rebuild)", |b| {
        b.iter(|| {
            k += 1;
            p.place(
                black_box(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                &eps,
                k as f64,
            )
        })
    });
}

criterion_group!(benches, metrics_parse, body_and_prefix, picking, placement);
criterion_main!(benches);
