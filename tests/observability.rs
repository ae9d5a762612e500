//! deploy/observability against a real Prometheus (Debian's, installed by scripts/install-prometheus.sh): rules, alert unit tests, scrape config, and every dashboard query on live data.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const OBS: &str = "deploy/observability";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The project-local Prometheus install (scripts/install-prometheus.sh), installed on demand.
fn prom_bin(name: &str) -> PathBuf {
    let p = root().join(".prometheus/usr/bin").join(name);
    if !p.exists() {
        let st = Command::new(root().join("scripts/install-prometheus.sh"))
            .status()
            .expect("run scripts/install-prometheus.sh");
        assert!(st.success(), "installing Prometheus failed");
    }
    p
}

fn promtool(args: &[&str], cwd: &Path) -> (bool, String) {
    let out = Command::new(prom_bin("promtool"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every (container, port name) pair the manifests declare.
fn manifest_ports() -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for f in [
        "deploy/epp/epp.yaml",
        "deploy/inferencepool/base/epp.yaml",
        "deploy/vllm/vllm-llama3-8b-instruct.yaml",
        "deploy/bbr/bbr.yaml",
    ] {
        let text = std::fs::read_to_string(root().join(f)).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(doc).unwrap();
            let spec = &v["spec"]["template"]["spec"];
            for list in ["containers", "initContainers"] {
                for c in spec[list].as_sequence().into_iter().flatten() {
                    let name = c["name"].as_str().unwrap_or_default().to_string();
                    for p in c["ports"].as_sequence().into_iter().flatten() {
                        if let Some(port) = p["name"].as_str() {
                            pairs.push((name.clone(), port.to_string()));
                        }
                    }
                }
            }
        }
    }
    pairs
}

use serde::Deserialize;

#[test]
fn rules_alert_unit_tests_and_scrape_configs_check_out() {
    let dir = root().join(OBS);
    let (ok, out) = promtool(&["check", "rules", "rules.yaml"], &dir);
    assert!(ok, "{out}");
    let (ok, out) = promtool(&["test", "rules", "rules.test.yaml"], &dir);
    assert!(ok, "{out}");
    // Every alert has a unit test.
    let rules = std::fs::read_to_string(dir.join("rules.yaml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("rules.test.yaml")).unwrap();
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            assert!(
                tests.contains(&format!("alertname: {name}")),
                "no unit test for {name}"
            );
        }
    }

    // The scrape config, with static targets in place of pod discovery (Debian builds
    // Prometheus without it): relabelling, rule files and the rest are checked for real.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = std::fs::read_to_string(dir.join("prometheus.yaml")).unwrap();
    assert!(cfg.contains("kubernetes_sd_configs: [{role: pod}]"));
    // The pod's service account token, as kubelet mounts it (promtool checks it exists).
    let token = tmp.path().join("token");
    std::fs::write(&token, "token").unwrap();
    assert!(cfg.contains("/var/run/secrets/kubernetes.io/serviceaccount/token"));
    let local = cfg
        .replace(
            "kubernetes_sd_configs: [{role: pod}]",
            "static_configs: [{targets: ['127.0.0.1:1']}]",
        )
        .replace(
            "/var/run/secrets/kubernetes.io/serviceaccount/token",
            &token.to_string_lossy(),
        );
    std::fs::write(tmp.path().join("prometheus.yaml"), local).unwrap();
    std::fs::copy(dir.join("rules.yaml"), tmp.path().join("rules.yaml")).unwrap();
    let (ok, out) = promtool(&["check", "config", "prometheus.yaml"], tmp.path());
    assert!(ok, "{out}");

    // What the scrape config and the PodMonitors keep exists in the manifests.
    let ports = manifest_ports();
    let has = |c: &str, p: &str| ports.iter().any(|(a, b)| a == c && b == p);
    let mut kept = 0;
    for line in cfg.lines() {
        if let Some(rx) = line.trim().strip_prefix("regex: ") {
            let (c, p) = rx.split_once(';').unwrap();
            assert!(has(c, p), "no container {c} with port {p} in the manifests");
            kept += 1;
        }
    }
    assert_eq!(kept, 4);
    let pm = std::fs::read_to_string(dir.join("podmonitors.yaml")).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&pm) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        let ep = &v["spec"]["podMetricsEndpoints"][0];
        let port = ep["port"].as_str().unwrap();
        let container = ep["relabelings"][0]["regex"].as_str().unwrap();
        assert!(has(container, port), "PodMonitor {container}/{port}");
    }
}

/// The dashboard's expressions, with Grafana's interval variable filled in.
fn dashboard_exprs() -> Vec<(String, String)> {
    let d: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join(OBS).join("grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m");
            out.push((p["title"].as_str().unwrap().to_string(), expr));
        }
    }
    out
}

struct Prometheus {
    _proc: Proc,
    url: String,
}

async fn spawn_prometheus(dir: &Path, targets: &[(&str, &str)]) -> Prometheus {
    let mut cfg = String::from(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\nrule_files: [rules.yaml]\nscrape_configs:\n",
    );
    for (job, addr) in targets {
        cfg.push_str(&format!(
            "- job_name: {job}\n  static_configs: [{{targets: ['{addr}']}}]\n"
        ));
    }
    std::fs::write(dir.join("prometheus.yaml"), cfg).unwrap();
    std::fs::copy(root().join(OBS).join("rules.yaml"), dir.join("rules.yaml")).unwrap();
    let port = free_port();
    let log = dir.join("prometheus.log");
    let child = Command::new(prom_bin("prometheus"))
        .args([
            "--config.file",
            dir.join("prometheus.yaml").to_str().unwrap(),
            "--storage.tsdb.path",
            dir.join("data").to_str().unwrap(),
            "--web.listen-address",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn prometheus");
    let url = format!("http://127.0.0.1:{port}");
    let c = client();
    wait_for("prometheus ready", Duration::from_secs(30), || {
        let c = c.clone();
        let url = url.clone();
        async move {
            let r = c.get(format!("{url}/-/ready")).send().await.ok()?;
            r.status().is_success().then_some(())
        }
    })
    .await;
    Prometheus {
        _proc: Proc {
            child,
            addr: url.clone(),
            stderr_log: log,
            group: false,
        },
        url,
    }
}

async fn query(c: &reqwest::Client, prom: &Prometheus, expr: &str) -> Option<Vec<Value>> {
    let url =
        reqwest::Url::parse_with_params(&format!("{}/api/v1/query", prom.url), &[("query", expr)])
            .unwrap();
    let v: Value = c.get(url).send().await.ok()?.json().await.ok()?;
    assert_eq!(v["status"], "success", "{expr}: {v}");
    v["data"]["result"].as_array().cloned()
}

/// A sample that is a number (histogram_quantile over nothing gives NaN: no data).
fn has_number(result: &[Value]) -> bool {
    result.iter().any(|s| {
        s["value"][1]
            .as_str()
            .and_then(|x| x.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

#[tokio::test]
async fn a_real_prometheus_scrapes_every_component_and_every_dashboard_query_has_data() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    // One slow single-slot server: three concurrent clients keep flow control holding.
    let sim = spawn_sim(
        &[
            "--enable-lora",
            "--max-loras",
            "2",
            "--max-num-seqs",
            "1",
            "--decode-base-ms",
            "5",
        ],
        dir.path(),
    );
    let mut kd = KubeletDir::new(&dir.path().join("cm"));
    let a1 = adapter(dir.path(), "tenant-a", 8);
    let port = port_of(&sim.addr);
    kd.write(&lora_config(port, &[("tenant-a", &a1)], &[]));
    let sidecar = spawn_sidecar(&kd.file(), &[], dir.path());
    let pool = dir.path().join("pool.yaml");
    std::fs::write(
        &pool,
        format!(
            "pool: {{name: obs-pool}}\nendpoints:\n- address: {}\nmodels:\n- modelName: chat\n  criticality: Standard\n  targetModels:\n  - {{name: meta-llama/Llama-3.1-8B-Instruct, weight: 90}}\n  - {{name: tenant-a, weight: 10}}\n",
            sim.addr
        ),
    )
    .unwrap();
    // LoRA placement on, with one catalogue adapter (placed, never loaded: no sidecar
    // follows) for the LoRA fleet row.
    let catalogue = dir.path().join("catalogue.yaml");
    std::fs::write(
        &catalogue,
        format!(
            "vLLMLoRAConfig:\n  onDemand:\n    models:\n    - id: tenant-c\n      source: {}\n",
            adapter(dir.path(), "tenant-c", 8)
        ),
    )
    .unwrap();
    let epp = spawn_epp(
        &pool,
        &[
            "--config-text",
            "featureGates: [flowControl]\nsaturationDetector: {runningRequestsThreshold: 1}\n",
            "--lora-catalog",
            catalogue.to_str().unwrap(),
            "--lora-placement-interval",
            "300ms",
        ],
        dir.path(),
    );
    let mapping = dir.path().join("bbr.yaml");
    std::fs::write(
        &mapping,
        "baseModels:\n- baseModel: meta-llama/Llama-3.1-8B-Instruct\n  adapters: [tenant-a]\n",
    )
    .unwrap();
    let (bbr, _grpc) = spawn_bbr(&mapping, dir.path());
    let bbr_metrics = bbr.field("metrics");
    let envoy = spawn_envoy_for(&epp, dir.path()).await;
    let prom = spawn_prometheus(
        dir.path(),
        &[
            ("inferlane-epp", &epp.metrics),
            ("lora-sidecar", &sidecar.addr),
            ("bbr", &bbr_metrics),
        ],
    )
    .await;
    // The sidecar's config changes while Prometheus watches (a swap-to-loaded sample).
    wait_for("tenant-a loaded", Duration::from_secs(20), || async {
        let ids = adapter_ids(&c, &sim.addr).await?;
        (ids == ["tenant-a"]).then_some(())
    })
    .await;
    // Only once Prometheus has the sidecar's histogram, so the next sample is an increase.
    wait_for(
        "prometheus to scrape the sidecar",
        Duration::from_secs(20),
        || async {
            let r = query(&c, &prom, "lora_syncer_config_sync_duration_seconds_count").await?;
            has_number(&r).then_some(())
        },
    )
    .await;
    let a2 = adapter(dir.path(), "tenant-b", 8);
    kd.write(&lora_config(
        port,
        &[("tenant-a", &a1), ("tenant-b", &a2)],
        &[],
    ));

    // Traffic until every expression has data (bounded by the deadline).
    let url = format!("http://127.0.0.1:{}/v1/completions", envoy.port);
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 25, "{} expressions", exprs.len());
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut missing: Vec<String> = exprs.iter().map(|(_, e)| e.clone()).collect();
    let mut round = 0u32;
    while !missing.is_empty() && std::time::Instant::now() < deadline {
        round += 1;
        let mut sent = Vec::new();
        for i in 0..3 {
            let c = c.clone();
            let url = url.clone();
            sent.push(tokio::spawn(async move {
                c.post(&url)
                    .header(
                        "x-gateway-inference-fairness-id",
                        format!("tenant-{}", i % 2),
                    )
                    .json(&json!({"model": "chat", "prompt": "hello", "max_tokens": 8}))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            }));
        }
        // Unknown models: 404s for the error panels.
        let r = c
            .post(&url)
            .json(&json!({"model": format!("nope-{round}"), "prompt": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        for s in sent {
            assert_eq!(s.await.unwrap().unwrap(), 200);
        }
        let mut still = Vec::new();
        for e in &missing {
            match query(&c, &prom, e).await {
                Some(r) if has_number(&r) => {}
                _ => still.push(e.clone()),
            }
        }
        missing = still;
    }
    assert!(
        missing.is_empty(),
        "dashboard queries without data after {round} rounds: {missing:#?}"
    );
    // Alerts evaluate (the rule files loaded) and none of the outage alerts is firing.
    let v = try_json(&c, &format!("{}/api/v1/rules", prom.url))
        .await
        .unwrap();
    let groups = v["data"]["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{v}");
    for g in groups {
        for r in g["rules"].as_array().unwrap() {
            assert_eq!(r["health"], "ok", "{r}");
            if ["InferlaneEPPDown", "InferlanePoolNoReadyEndpoints"]
                .contains(&r["name"].as_str().unwrap_or_default())
            {
                assert_eq!(r["state"], "inactive", "{r}");
            }
        }
    }
}
