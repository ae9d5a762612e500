//! Holding at scale through the shipped Envoy config: more held requests than Envoy's default circuit breaker allows, and the gateway still fails none.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(60);
const BASE: &str = "meta-llama/Llama-3.1-8B-Instruct";
/// Above Envoy's default of 1,024 concurrent streams per cluster.
const HELD: usize = 1_100;

/// 1,100 sheddable requests held at once (their band's cap) keep 1,100 ext_proc streams
/// open: with Envoy's default circuit breaker the 1,025th already got a 500. Through the
/// shipped config they are all held; one more sheddable gets the EPP's 429, a critical
/// one is dispatched first, and every held one is served: no 5xx anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_held_than_envoys_default_breaker_and_no_5xx() {
    let dir = tempfile::tempdir().unwrap();
    inferlane::runtime::install_crypto_provider();
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let sim = spawn_sim(
        &["--max-num-seqs", "64", "--time-scale", "0.02"],
        dir.path(),
    );
    let pool = dir.path().join("pool.yaml");
    std::fs::write(
        &pool,
        format!(
            "pool: {{name: test-pool}}\nendpoints:\n- address: {}\nmodels:\n- modelName: chat\n  criticality: Critical\n  targetModels: [{{name: {BASE}}}]\n- modelName: batch\n  criticality: Sheddable\n  targetModels: [{{name: {BASE}}}]\n",
            sim.addr
        ),
    )
    .unwrap();
    let cfg = format!(
        "featureGates: [flowControl]\nsaturationDetector: {{runningRequestsThreshold: 1}}\nflowControl:\n  defaultRequestTTL: 120s\n  priorityBands:\n  - {{priority: -1, maxRequests: {HELD}}}\n"
    );
    let epp = spawn_epp(&pool, &["--config-text", &cfg], dir.path());
    let envoy = spawn_envoy(
        &EnvoyOptions {
            epp_port: port_of(&epp.grpc),
            full_duplex: false,
            fail_open: false,
            extra_filters: "",
        },
        dir.path(),
    )
    .await;
    let url = format!("http://127.0.0.1:{}/v1/completions", envoy.port);
    let send = |model: &'static str, tokens: u32| {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            match c
                .post(url)
                .json(&json!({"model": model, "prompt": "hold", "max_tokens": tokens}))
                .send()
                .await
            {
                Ok(r) => {
                    let s = r.status().as_u16();
                    (s, r.text().await.unwrap_or_default())
                }
                Err(e) => (0, e.to_string()),
            }
        })
    };
    // The one request in flight that saturates the pool (runningRequestsThreshold 1): the
    // server holds it (stalled) until every other request is in place.
    let stall = |on: bool| {
        let c = c.clone();
        let u = format!("http://{}/sim/faults", sim.addr);
        async move {
            let r = c.post(u).json(&json!({"stall": on})).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    stall(true).await;
    let blocker = send("chat", 2);
    let metrics = format!("http://{}/metrics", epp.metrics);
    wait_for("the blocker picked", T, || async {
        let page = try_text(&c, &metrics).await?;
        page.lines()
            .any(|l| l.starts_with("inference_extension_picks_total{") && l.ends_with(" 1"))
            .then_some(())
    })
    .await;
    let held: Vec<_> = (0..HELD).map(|_| send("batch", 2)).collect();
    let held_now = || async {
        let page = try_text(&c, &metrics).await?;
        Some(
            page.lines()
                .filter(|l| l.starts_with("inference_extension_flow_control_queue_size{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>(),
        )
    };
    wait_for("every sheddable request held", T, || async {
        (held_now().await? as usize == HELD).then_some(())
    })
    .await;
    // The band is full: the EPP says so (429), not the gateway (500).
    let (s, body) = send("batch", 2).await.unwrap();
    assert_eq!(s, 429, "{body}");
    assert!(body.contains("priority band -1 is full"), "{body}");
    let critical = send("chat", 2);
    wait_for("the critical request held too", T, || async {
        (held_now().await? as usize == HELD + 1).then_some(())
    })
    .await;
    stall(false).await;
    let (s, body) = blocker.await.unwrap();
    assert_eq!(s, 200, "{body}");
    let (s, body) = critical.await.unwrap();
    assert_eq!(s, 200, "{body}");
    let mut failed = Vec::new();
    for h in held {
        let (s, body) = h.await.unwrap();
        if s != 200 {
            failed.push((s, body));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {HELD} held requests failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
}
