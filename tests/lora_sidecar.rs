//! lora-sidecar against vllm-sim processes: rollouts, kubelet swaps, bad configs, outages, retries.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(15);

async fn wait_ids(c: &reqwest::Client, addr: &str, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    wait_for(&format!("adapters {want:?} on {addr}"), T, || {
        let c = c.clone();
        let want = want.clone();
        async move { (adapter_ids(&c, addr).await? == want).then_some(()) }
    })
    .await
}

async fn sidecar_metrics(c: &reqwest::Client, sidecar: &Proc) -> String {
    c.get(format!("http://{}/metrics", sidecar.addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn readyz(c: &reqwest::Client, sidecar: &Proc) -> (u16, Value) {
    let r = c
        .get(format!("http://{}/readyz", sidecar.addr))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn sim_stats(c: &reqwest::Client, sim: &Proc) -> Value {
    c.get(format!("http://{}/sim/stats", sim.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn rollout_story_with_readiness() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(&["--enable-lora", "--max-loras", "2"], tmp.path());
    let port = port_of(&sim.addr);
    let fr1 = adapter(tmp.path(), "food-review-1", 8);
    let fr2 = adapter(tmp.path(), "food-review-2", 8);
    let mut dir = KubeletDir::new(&tmp.path().join("config"));
    dir.write(&lora_config(port, &[("food-review-1", &fr1)], &[]));
    let sidecar = spawn_sidecar(&dir.file(), &[], tmp.path());
    let c = client();

    wait_ids(&c, &sim.addr, &["food-review-1"]).await;
    wait_for("readyz 200", T, || {
        let c = c.clone();
        let s = &sidecar;
        async move { (readyz(&c, s).await.0 == 200).then_some(()) }
    })
    .await;

    // Add food-review-2: the pod is not ready until it is loaded.
    dir.write(&lora_config(
        port,
        &[("food-review-1", &fr1), ("food-review-2", &fr2)],
        &[],
    ));
    wait_ids(&c, &sim.addr, &["food-review-1", "food-review-2"]).await;

    // Retire food-review-1.
    dir.write(&lora_config(
        port,
        &[("food-review-2", &fr2)],
        &[("food-review-1", &fr1)],
    ));
    wait_ids(&c, &sim.addr, &["food-review-2"]).await;

    let page = sidecar_metrics(&c, &sidecar).await;
    assert!(
        page.contains("lora_syncer_adapter_status{adapter_name=\"food-review-2\"} 1"),
        "{page}"
    );
    assert!(
        page.contains("lora_syncer_adapter_status{adapter_name=\"food-review-1\"} 0"),
        "{page}"
    );
    assert!(page.contains("lora_syncer_config_generation 3"), "{page}");
    assert!(page.contains("lora_syncer_ready 1"), "{page}");
}

#[tokio::test]
async fn readiness_waits_for_adapters_and_foreign_adapters_are_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(
        &["--enable-lora", "--lora-load-latency-ms", "300"],
        tmp.path(),
    );
    let c = client();
    // Someone else's adapter, loaded before the sidecar starts.
    let foreign = adapter(tmp.path(), "foreign", 8);
    c.post(format!("http://{}/v1/load_lora_adapter", sim.addr))
        .json(&json!({"lora_name": "foreign", "lora_path": foreign}))
        .send()
        .await
        .unwrap();
    let a1 = adapter(tmp.path(), "a1", 8);
    let mut dir = KubeletDir::new(&tmp.path().join("config"));
    dir.write(&lora_config(port_of(&sim.addr), &[("a1", &a1)], &[]));
    let sidecar = spawn_sidecar(&dir.file(), &[], tmp.path());
    // The load takes 300 ms: meanwhile readiness is 503 naming the missing adapter.
    wait_for("readyz 503 naming a1", T, || {
        let c = c.clone();
        let s = &sidecar;
        async move {
            let (code, body) = readyz(&c, s).await;
            assert_ne!(code, 200, "ready before a1 was loaded: {body}");
            (body["missing"] == json!(["a1"])).then_some(())
        }
    })
    .await;
    wait_ids(&c, &sim.addr, &["a1", "foreign"]).await;
    wait_for("ready", T, || {
        let c = c.clone();
        let s = &sidecar;
        async move { (readyz(&c, s).await.0 == 200).then_some(()) }
    })
    .await;
    // Several resyncs later the foreign adapter is still there.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(adapter_ids(&c, &sim.addr).await.unwrap(), ["a1", "foreign"]);
}

#[tokio::test]
async fn kubelet_symlink_swaps_are_never_missed() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(
        &["--enable-lora", "--lora-load-latency-ms", "1"],
        tmp.path(),
    );
    let port = port_of(&sim.addr);
    let a = adapter(tmp.path(), "a", 8);
    let b = adapter(tmp.path(), "b", 8);
    let mut dir = KubeletDir::new(&tmp.path().join("config"));
    dir.write(&lora_config(port, &[("a", &a)], &[("b", &b)]));
    // A slow periodic resync and poll, so only file events can explain quick convergence.
    let sidecar = spawn_sidecar(
        &dir.file(),
        &[
            "--reconcile-trigger",
            "60s",
            "--config-poll-interval",
            "60s",
        ],
        tmp.path(),
    );
    let c = client();
    wait_ids(&c, &sim.addr, &["a"]).await;
    for i in 0..30 {
        if i % 2 == 0 {
            dir.write(&lora_config(port, &[("b", &b)], &[("a", &a)]));
            wait_ids(&c, &sim.addr, &["b"]).await;
        } else {
            dir.write(&lora_config(port, &[("a", &a)], &[("b", &b)]));
            wait_ids(&c, &sim.addr, &["a"]).await;
        }
    }
    let page = sidecar_metrics(&c, &sidecar).await;
    assert!(page.contains("lora_syncer_config_generation 31"), "{page}");
}

#[tokio::test]
async fn invalid_config_keeps_last_good_and_is_logged_once() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(&["--enable-lora", "--max-loras", "2"], tmp.path());
    let port = port_of(&sim.addr);
    let a1 = adapter(tmp.path(), "a1", 8);
    let a2 = adapter(tmp.path(), "a2", 8);
    let mut dir = KubeletDir::new(&tmp.path().join("config"));
    dir.write(&lora_config(port, &[("a1", &a1)], &[]));
    let sidecar = spawn_sidecar(&dir.file(), &["--config-poll-interval", "50ms"], tmp.path());
    let c = client();
    wait_ids(&c, &sim.addr, &["a1"]).await;

    dir.write("vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - id: a2\n      sorce: /x\n");
    wait_for("config_valid 0", T, || {
        let c = c.clone();
        let s = &sidecar;
        async move {
            sidecar_metrics(&c, s)
                .await
                .contains("lora_syncer_config_valid 0")
                .then_some(())
        }
    })
    .await;
    // Many polls later: still the last good config in force, and the error logged once.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(adapter_ids(&c, &sim.addr).await.unwrap(), ["a1"]);
    let logs = sidecar.logs();
    assert_eq!(logs.matches("config rejected").count(), 1, "{logs}");
    assert!(logs.contains("unknown field `sorce`"), "{logs}");
    assert!(logs.contains("line 5"), "error names the line: {logs}");

    dir.write(&lora_config(port, &[("a1", &a1), ("a2", &a2)], &[]));
    wait_ids(&c, &sim.addr, &["a1", "a2"]).await;
    let page = sidecar_metrics(&c, &sidecar).await;
    assert!(page.contains("lora_syncer_config_valid 1"));
    assert!(page.contains("lora_syncer_config_errors_total 1"), "{page}");
}

#[tokio::test]
async fn invalid_first_config_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(&["--enable-lora"], tmp.path());
    let mut dir = KubeletDir::new(&tmp.path().join("config"));
    dir.write("vLLMLoRAConfig:\n  port: 0\n");
    let sidecar = spawn_sidecar(&dir.file(), &[], tmp.path());
    let c = client();
    let (code, _) = readyz(&c, &sidecar).await;
    assert_eq!(code, 503);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = sim_stats(&c, &sim).await;
    assert_eq!(
        stats["admin_calls"], 0,
        "no fallback to a default host/port: {stats}"
    );
    assert!(sidecar.logs().contains("vLLMLoRAConfig.port"));
}

#[tokio::test]
async fn server_down_at_start_then_restart_forgets_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    // A free port (below the ephemeral range: the sidecar's connection attempts to it
    // meanwhile cannot end up connected to themselves), the server started on it later.
    let port = common::free_port();
    let a1 = adapter(tmp.path(), "a1", 8);
    let mut dir = KubeletDir::new(&tmp.path().join("config"));
    dir.write(&lora_config(port, &[("a1", &a1)], &[]));
    let sidecar = spawn_sidecar(&dir.file(), &[], tmp.path());
    let c = client();
    assert_eq!(readyz(&c, &sidecar).await.0, 503);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let port_s = port.to_string();
    let sim = spawn_sim(&["--enable-lora", "--port", &port_s], tmp.path());
    wait_ids(&c, &sim.addr, &["a1"]).await;

    // vLLM restarts and forgets its adapters: the periodic resync restores them.
    let r = c
        .post(format!("http://{}/sim/restart", sim.addr))
        .json(&json!({"downtime_ms": 300}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_ids(&c, &sim.addr, &["a1"]).await;
    let page = sidecar_metrics(&c, &sidecar).await;
    assert!(
        page.contains("lora_syncer_adapter_status{adapter_name=\"a1\"} 1"),
        "{page}"
    );
}

fn gaps(times: &[u64]) -> Vec<i64> {
    times
        .windows(2)
        .map(|w| w[1] as i64 - w[0] as i64)
        .collect()
}

#[tokio::test]
async fn bad_adapters_back_off_while_good_ones_load() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(
        &[
            "--enable-lora",
            "--max-lora-rank",
            "16",
            "--lora-load-latency-ms",
            "1",
        ],
        tmp.path(),
    );
    let good = adapter(tmp.path(), "good", 8);
    let broken = adapter(tmp.path(), "broken", 64);
    let mut dir = KubeletDir::new(&tmp.path().join("config"));
    dir.write(&lora_config(
        port_of(&sim.addr),
        &[
            ("ghost", "/no/such/adapter"),
            ("broken", &broken),
            ("good", &good),
        ],
        &[],
    ));
    let sidecar = spawn_sidecar(&dir.file(), &[], tmp.path());
    let c = client();
    wait_ids(&c, &sim.addr, &["good"]).await;

    // Retries at growing intervals (100 ms doubling, ±20% jitter).
    let attempts = wait_for("four attempts for each bad adapter", T, || {
        let c = c.clone();
        let sim = &sim;
        async move {
            let s = sim_stats(&c, sim).await;
            let get = |n: &str| -> Vec<u64> {
                s["load_attempts"][n]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_u64).collect())
                    .unwrap_or_default()
            };
            let (g, b) = (get("ghost"), get("broken"));
            (g.len() >= 4 && b.len() >= 4).then_some((g, b))
        }
    })
    .await;
    for times in [&attempts.0, &attempts.1] {
        let g = gaps(&times[..4]);
        // A busy machine only lengthens a gap (the next wait starts when an attempt has
        // failed), so it can make two neighbours equal ([199, 199, 371] seen under a
        // parallel test run); 100 -> 400 ms over three steps still shows the doubling.
        assert!(
            g[2] > g[0] && g[2] >= g[1] && g[2] >= 250,
            "retry gaps must grow: {g:?}"
        );
        assert!(g[0] >= 60, "first retry after ~100 ms, got {g:?}");
    }
    assert_eq!(
        sim_stats(&c, &sim).await["load_attempts"]["good"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let page = sidecar_metrics(&c, &sidecar).await;
    assert!(
        page.contains(
            "lora_syncer_adapter_failures_total{adapter_name=\"ghost\",operation=\"load\"}"
        ),
        "{page}"
    );
    // The metric label says which operation failed with which status, never the text (an
    // error text from a server or a source can be anything, and any length).
    assert!(
        page.contains(
            "lora_syncer_adapter_last_error{adapter_name=\"ghost\",error=\"load 404\"} 1"
        ),
        "{page}"
    );
    assert!(
        page.contains(
            "lora_syncer_adapter_last_error{adapter_name=\"broken\",error=\"load 500\"} 1"
        ),
        "{page}"
    );
    assert!(!page.contains("No adapter found"), "{page}");
    // The messages are in /readyz (and the log).
    let (_, body) = readyz(&c, &sidecar).await;
    let failing = body["failing"].to_string();
    assert!(
        failing.contains("No adapter found for /no/such/adapter")
            && failing.contains("LoRA rank 64 is greater than max_lora_rank 16"),
        "{failing}"
    );
    let (code, body) = readyz(&c, &sidecar).await;
    assert_eq!(code, 503);
    assert_eq!(body["missing"], json!(["ghost", "broken"]));
    // Logged when the failure started, not on every retry.
    let logs = sidecar.logs();
    assert_eq!(
        logs.matches("adapter failed; other adapters proceed")
            .count(),
        2,
        "{logs}"
    );

    // Fixing the config resets the adapter's backoff and it loads at once.
    let fixed = adapter(tmp.path(), "broken-fixed", 8);
    dir.write(&lora_config(
        port_of(&sim.addr),
        &[("broken", &fixed), ("good", &good)],
        &[],
    ));
    wait_ids(&c, &sim.addr, &["broken", "good"]).await;
    wait_for("ready after fix", T, || {
        let c = c.clone();
        let s = &sidecar;
        async move { (readyz(&c, s).await.0 == 200).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn burst_of_triggers_never_overlaps_reconciles() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(
        &[
            "--enable-lora",
            "--max-loras",
            "4",
            "--lora-load-latency-ms",
            "40",
        ],
        tmp.path(),
    );
    let port = port_of(&sim.addr);
    let paths: Vec<(String, String)> = (0..6)
        .map(|i| (format!("ad{i}"), adapter(tmp.path(), &format!("ad{i}"), 8)))
        .collect();
    let mut dir = KubeletDir::new(&tmp.path().join("config"));
    let cfg = |n: usize| {
        let items: Vec<(&str, &str)> = paths[..n]
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        lora_config(port, &items, &[])
    };
    dir.write(&cfg(1));
    let sidecar = spawn_sidecar(
        &dir.file(),
        &[
            "--max-concurrent-ops",
            "1",
            "--debounce",
            "1ms",
            "--reconcile-trigger",
            "30ms",
        ],
        tmp.path(),
    );
    let c = client();
    // Poll /sim/stats, not /v1/models: our own admin calls would count as concurrency.
    let wait_count = |n: u64| {
        let c = c.clone();
        let sim = &sim;
        async move {
            wait_for(&format!("{n} adapters"), T, || {
                let c = c.clone();
                async move { (sim_stats(&c, sim).await["adapters"] == n).then_some(()) }
            })
            .await
        }
    };
    wait_count(1).await;
    // A burst: 40 config writes as fast as possible, plus a 30 ms resync timer.
    for i in 0..40 {
        dir.write(&cfg(1 + i % 6));
    }
    dir.write(&cfg(6));
    wait_count(6).await;
    let stats = sim_stats(&c, &sim).await;
    assert_eq!(
        stats["admin_max_in_flight"], 1,
        "one call at a time means passes never overlapped: {stats}"
    );
    let page = sidecar_metrics(&c, &sidecar).await;
    assert!(!page.contains("lora_syncer_reconcile_in_progress 2"));
}

#[tokio::test]
async fn changed_source_is_reloaded_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(&["--enable-lora"], tmp.path());
    let port = port_of(&sim.addr);
    let v1 = adapter(tmp.path(), "v1", 8);
    let v2 = adapter(tmp.path(), "v2", 8);
    let mut dir = KubeletDir::new(&tmp.path().join("config"));
    dir.write(&lora_config(port, &[("a", &v1)], &[]));
    let _sidecar = spawn_sidecar(&dir.file(), &[], tmp.path());
    let c = client();
    wait_ids(&c, &sim.addr, &["a"]).await;
    dir.write(&lora_config(port, &[("a", &v2)], &[]));
    wait_for("root switched to v2", T, || {
        let c = c.clone();
        let sim = &sim;
        let v2 = v2.clone();
        async move { (adapters(&c, &sim.addr).await? == vec![("a".to_string(), v2)]).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_mode_reads_the_config_through_the_api() {
    use common::fake_api::*;
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(&["--enable-lora", "--max-loras", "2"], tmp.path());
    let port = port_of(&sim.addr);
    let a1 = adapter(tmp.path(), "a1", 8);
    let a2 = adapter(tmp.path(), "a2", 8);
    let api = FakeApi::new();
    let addr = start_fake(api.clone()).await;
    let kc = kubeconfig(tmp.path(), &addr);
    let cm = |text: String| configmap("adapters", json!({}), json!({"configmap.yaml": text}));
    api.put(CONFIGMAPS, cm(lora_config(port, &[("a1", &a1)], &[])));
    let _sidecar = spawn_sidecar_with(
        &["--configmap", "default/adapters"],
        &[("KUBECONFIG", kc.as_str())],
        tmp.path(),
    );
    let c = client();
    wait_ids(&c, &sim.addr, &["a1"]).await;
    // An edit through the API applies; an invalid edit keeps the last good config.
    api.put(
        CONFIGMAPS,
        cm(lora_config(port, &[("a1", &a1), ("a2", &a2)], &[])),
    );
    wait_ids(&c, &sim.addr, &["a1", "a2"]).await;
    api.put(CONFIGMAPS, cm("vLLMLoRAConfig: [".into()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(adapter_ids(&c, &sim.addr).await.unwrap(), ["a1", "a2"]);
    api.put(
        CONFIGMAPS,
        cm(lora_config(port, &[("a2", &a2)], &[("a1", &a1)])),
    );
    wait_ids(&c, &sim.addr, &["a2"]).await;
}

/// After a vLLM restart the adapters are back soon after `/health` turns 200, even with a
/// 2 s --health-check-interval (the longest pause between probes, not the only one).
#[tokio::test]
async fn adapters_return_soon_after_a_restarted_server_is_healthy() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(&["--enable-lora"], tmp.path());
    let a1 = adapter(tmp.path(), "a1", 8);
    let mut dir = KubeletDir::new(&tmp.path().join("config"));
    dir.write(&lora_config(port_of(&sim.addr), &[("a1", &a1)], &[]));
    let _sidecar = spawn_sidecar(
        &dir.file(),
        &[
            "--health-check-interval",
            "2s",
            "--health-check-timeout",
            "30s",
        ],
        tmp.path(),
    );
    let c = client();
    wait_ids(&c, &sim.addr, &["a1"]).await;
    let r = c
        .post(format!("http://{}/sim/restart", sim.addr))
        .json(&json!({"downtime_ms": 800}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Wait for health, then for the adapter; the gap is what the probing costs.
    let healthy = wait_for("vLLM healthy again", Duration::from_secs(10), || async {
        let r = c
            .get(format!("http://{}/health", sim.addr))
            .send()
            .await
            .ok()?;
        r.status().is_success().then(std::time::Instant::now)
    })
    .await;
    wait_ids(&c, &sim.addr, &["a1"]).await;
    let gap = healthy.elapsed();
    // Probing every 2 s took 1-2 s here; the backoff from 50 ms takes well under one.
    assert!(
        gap < Duration::from_millis(1000),
        "restored {gap:?} after health"
    );
}

/// A server without in-place reloads answers "already loaded" to `load_inplace` and keeps the
/// old weights: the adapter is reported failing (it is not in sync), and the load is not
/// resent on every pass (per-adapter backoff).
#[tokio::test]
async fn a_server_without_inplace_reload_is_reported_not_believed() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(&["--enable-lora", "--ignore-load-inplace"], tmp.path());
    let port = port_of(&sim.addr);
    let v1 = adapter(tmp.path(), "v1", 8);
    let v2 = adapter(tmp.path(), "v2", 8);
    let mut dir = KubeletDir::new(&tmp.path().join("config"));
    dir.write(&lora_config(port, &[("a", &v1)], &[]));
    // Passes every 200 ms; a failed adapter waits 1 s, then longer.
    let sidecar = spawn_sidecar(&dir.file(), &["--retry-initial-backoff", "1s"], tmp.path());
    let c = client();
    wait_ids(&c, &sim.addr, &["a"]).await;
    dir.write(&lora_config(port, &[("a", &v2)], &[]));
    let page = wait_for("adapter reported failing", T, || async {
        let page = sidecar_metrics(&c, &sidecar).await;
        page.contains("lora_syncer_adapter_consecutive_failures{adapter_name=\"a\"} 1")
            .then_some(page)
    })
    .await;
    // The id is still served (the pod stays ready), but not in sync and the failure shown.
    let (_, ready) = readyz(&c, &sidecar).await;
    assert_eq!(ready["in_sync"], false, "{ready}");
    assert!(
        ready["failing"].to_string().contains("\"a\""),
        "{ready}\n{page}"
    );
    assert!(
        sidecar.logs().contains("does not reload adapters in place"),
        "{}",
        sidecar.logs()
    );
    // The server still serves v1; over 1.5 s of 200 ms passes, at most the backoff's attempts
    // (not one per pass, which would be 7).
    assert_eq!(
        adapters(&c, &sim.addr).await.unwrap(),
        vec![("a".to_string(), v1)]
    );
    let attempts =
        |s: &serde_json::Value| s["load_attempts"]["a"].as_array().map_or(0, |a| a.len());
    let before = attempts(&sim_stats(&c, &sim).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = attempts(&sim_stats(&c, &sim).await);
    assert!(
        after - before <= 2,
        "{before} -> {after} load attempts in 1.5 s"
    );
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Thousands of adapters that keep failing cost a bounded amount of work: a pass is linear
/// in the adapters and retries due together share one pass.
#[tokio::test]
async fn thousands_of_failing_adapters_stay_cheap() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(
        &["--enable-lora", "--lora-load-latency-ms", "0"],
        tmp.path(),
    );
    let port = port_of(&sim.addr);
    let missing: Vec<(String, String)> = (0..3000)
        .map(|i| (format!("ghost-{i}"), format!("/nonexistent/ghost-{i}")))
        .collect();
    let refs: Vec<(&str, &str)> = missing
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let mut dir = KubeletDir::new(&tmp.path().join("config"));
    dir.write(&lora_config(port, &refs, &[]));
    let sidecar = spawn_sidecar(
        &dir.file(),
        &[
            "--retry-initial-backoff",
            "1s",
            "--retry-max-backoff",
            "30s",
            "--max-concurrent-ops",
            "16",
            "--reconcile-trigger",
            "5s",
        ],
        tmp.path(),
    );
    let c = client();
    // Every adapter has been tried and is backing off.
    wait_for("all 3,000 tried", Duration::from_secs(60), || async {
        let s = sim_stats(&c, &sim).await;
        (s["load_attempts"].as_object()?.len() == 3000).then_some(())
    })
    .await;
    let pid = sidecar.child.id();
    let cpu0 = cpu_seconds(pid);
    let t0 = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
    eprintln!("{used:.3} cores with 3,000 failing adapters");
    // Was ~0.7 core (release) with a plan per deferred adapter in every pass.
    assert!(used < 0.35, "{used:.2} cores with 3,000 failing adapters");
}

/// A ConfigMap source is what vLLM fetches: a URL (or a `..` path) is refused by the sidecar
/// and never sent to vLLM, the adapter is reported failing with the reason, and the others
/// load. `--allowed-source` lists what else may be fetched.
#[tokio::test]
async fn sources_outside_the_allowed_ones_never_reach_vllm() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(
        &["--enable-lora", "--lora-load-latency-ms", "1"],
        tmp.path(),
    );
    let good = adapter(tmp.path(), "good", 8);
    let mut dir = KubeletDir::new(&tmp.path().join("config"));
    dir.write(&lora_config(
        port_of(&sim.addr),
        &[
            ("metadata", "http://169.254.169.254/latest/meta-data"),
            ("escape", "/adapters/../../etc/secrets"),
            ("good", &good),
        ],
        &[],
    ));
    let sidecar = spawn_sidecar(&dir.file(), &[], tmp.path());
    let c = client();
    wait_ids(&c, &sim.addr, &["good"]).await;
    let body = wait_for("both refusals reported", T, || async {
        let (_, body) = readyz(&c, &sidecar).await;
        let failing = body["failing"].to_string();
        (failing.contains("metadata") && failing.contains("escape")).then_some(failing)
    })
    .await;
    assert!(body.contains("--allowed-source"), "{body}");
    let stats = sim_stats(&c, &sim).await;
    assert!(stats["load_attempts"]["metadata"].is_null(), "{stats}");
    assert!(stats["load_attempts"]["escape"].is_null(), "{stats}");
}
