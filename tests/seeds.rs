//! The source documents' own manifests, container args and requests (tests/data/seeds/) run against our binaries.

mod common;

use std::time::Duration;

use common::fake_api::*;
use common::*;
use serde_json::{Value, json};
use tonic_health::pb::health_check_response::ServingStatus;

/// A fixture from tests/data/seeds/.
fn seed(name: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/seeds")
            .join(name),
    )
    .unwrap()
}

/// The YAML documents of a fixture, as JSON objects (as `kubectl apply` sends them).
fn docs(name: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(&seed(name))
        .filter_map(|d| Option::<Value>::deserialize(d).unwrap())
        .collect()
}

fn doc(name: &str, kind: &str) -> Value {
    docs(name)
        .into_iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("{name} has no {kind}"))
}

/// The `configmap.yaml` key of an adapters ConfigMap fixture (what kubelet writes to the mount).
fn configmap_file(name: &str) -> String {
    doc(name, "ConfigMap")["data"]["configmap.yaml"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `kubectl apply` of a namespaced fixture object into the fake API server.
fn apply(api: &FakeApi, mut obj: Value) {
    let (group, version) = match obj["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (
            String::new(),
            obj["apiVersion"].as_str().unwrap().to_string(),
        ),
    };
    let plural = format!("{}s", obj["kind"].as_str().unwrap().to_lowercase());
    obj["metadata"]["namespace"] = json!("default");
    api.put(&key_of(&group, &version, &plural), obj);
}

async fn health(addr: &str, service: &str) -> Option<i32> {
    grpc_health(addr, service).await
}

/// The `model` field of a completion from the gateway, with its status.
async fn complete(c: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = c.post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text })),
    )
}

/// Seed 001, followed as a user would: the vLLM Deployment's args on the simulator, the
/// lora-syncer sidecar reading its mounted ConfigMap through three versions, the v0.2.0 CRDs
/// only (InferencePool and InferenceModel v1alpha2), the EPP started with the seed's
/// container args and env, its gRPC probes, and the seed's curl through a real Envoy: the
/// response's `model` names the adapter, the 90/10 canary splits, the cut-over sends all to
/// food-review-2 and food-review-1 is unloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_001_getting_started_and_canary_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = client();

    // The adapter source is a hub id; vLLM finds it in the hub cache (offline here).
    let hub = d.join("hub");
    let snapshot = hub.join("models--Kawon--llama3.1-food-finetune_v14_r8/snapshots/0001");
    inferlane::sim::lora::write_fake_adapter(&snapshot, 8).unwrap();

    // vLLM: the seed's args (01-gpu-deployment.yaml); port 8000 as the pool's
    // targetPortNumber says. Only the host and the time scale are ours.
    let hub_s = hub.to_string_lossy().into_owned();
    let sim = spawn_with_marker(
        &bin("vllm-sim"),
        &[
            "--model",
            "meta-llama/Llama-3.1-8B-Instruct",
            "--tensor-parallel-size",
            "1",
            "--port",
            "8000",
            "--max-num-seq",
            "1024",
            "--compilation-config",
            "3",
            "--enable-lora",
            "--max-loras",
            "2",
            "--max-lora-rank",
            "8",
            "--max-cpu-loras",
            "12",
            "--host",
            "127.0.0.1",
            "--time-scale",
            "0.02",
        ],
        &[
            ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true"),
            ("HF_HUB_CACHE", hub_s.as_str()),
        ],
        "VLLM_SIM_LISTENING",
        d,
    );
    assert_eq!(sim.addr, "127.0.0.1:8000");

    // The lora-adapter-syncer: env DYNAMIC_LORA_ROLLOUT_CONFIG, no args (only a free metrics
    // port, since tests run side by side).
    let mut mount = KubeletDir::new(&d.join("config"));
    mount.write(&configmap_file("001-adapters-v1.yaml"));
    let cfg = mount.file().to_string_lossy().into_owned();
    let _sidecar = spawn_with_marker(
        &bin("lora-sidecar"),
        &["--metrics-port", "0", "--metrics-host", "127.0.0.1"],
        &[("DYNAMIC_LORA_ROLLOUT_CONFIG", cfg.as_str())],
        "LORA_SIDECAR_LISTENING",
        d,
    );
    let listed = |want: Vec<&'static str>| {
        let c = c.clone();
        let addr = sim.addr.clone();
        async move {
            wait_for(
                &format!("vLLM lists {want:?}"),
                Duration::from_secs(30),
                || async { (adapter_ids(&c, &addr).await? == want).then_some(()) },
            )
            .await
        }
    };
    listed(vec!["food-review-1"]).await;

    // The cluster has the v0.2.0 CRDs the seed installs, and upstream's v1 InferencePool
    // beside them (what any install from v1.0 on, or `kubectl apply -k deploy/`, adds): the
    // seed's v1alpha2 pool must still be found.
    let api = FakeApi::new();
    api.serve_only(&[
        &key_of("inference.networking.k8s.io", "v1", "inferencepools"),
        &key_of(
            "inference.networking.x-k8s.io",
            "v1alpha2",
            "inferencepools",
        ),
        &key_of(
            "inference.networking.x-k8s.io",
            "v1alpha2",
            "inferencemodels",
        ),
    ]);
    let addr = start_fake(api.clone()).await;
    let kc = kubeconfig(d, &addr);

    // The EPP: the Deployment's args and env verbatim, then free ports for the test.
    let dep = doc("001-inferencepool-resources.yaml", "Deployment");
    let container = &dep["spec"]["template"]["spec"]["containers"][0];
    let mut args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(args[0], "-poolName");
    args.extend(LOOPBACK_GRPC.map(String::from));
    let mut env: Vec<(String, String)> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    env.push(("KUBECONFIG".into(), kc.clone()));
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let epp = spawn_epp_with(&args_ref, &env_ref, d);
    // --zap-encoder json: every log line is a JSON object (stderr may lag the stdout line).
    let first = wait_for("a log line", Duration::from_secs(10), || async {
        epp.proc.logs().lines().next().map(str::to_string)
    })
    .await;
    assert!(
        serde_json::from_str::<Value>(&first).is_ok(),
        "not JSON: {first}"
    );

    // The probes ask for service `inference-extension`: not ready before the pool exists.
    let probe =
        dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["service"]
            .as_str()
            .unwrap()
            .to_string();
    assert_eq!(probe, "inference-extension");
    wait_for("health answers", Duration::from_secs(10), || async {
        health(&epp.health, &probe).await
    })
    .await;
    assert_eq!(
        health(&epp.health, &probe).await,
        Some(ServingStatus::NotServing as i32)
    );

    // kubectl apply of the seed's objects; the vLLM pod is Ready at 127.0.0.1.
    apply(
        &api,
        doc("001-inferencepool-resources.yaml", "InferencePool"),
    );
    apply(&api, doc("001-inferencemodel.yaml", "InferenceModel"));
    api.put(
        "/v1/pods",
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "vllm-llama3-8b-instruct-545c578498-47wt6", "namespace": "default",
                            "labels": {"app": "vllm-llama3-8b-instruct"}},
               "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    wait_for("probe passes", Duration::from_secs(20), || async {
        (health(&epp.health, &probe).await? == ServingStatus::Serving as i32).then_some(())
    })
    .await;
    assert!(
        epp.proc
            .logs()
            .contains("\"group\":\"inference.networking.x-k8s.io\""),
        "{}",
        epp.proc.logs()
    );

    // The gateway (Envoy standing in for kgateway), streaming as USE_STREAMING=true asks.
    let envoy = spawn_envoy(
        &EnvoyOptions {
            epp_port: port_of(&epp.grpc),
            full_duplex: true,
            fail_open: false,
            extra_filters: "",
        },
        d,
    )
    .await;
    let url = format!("http://127.0.0.1:{}/v1/completions", envoy.port);
    let body: Value = serde_json::from_str(&seed("001-request.json")).unwrap();
    // A readiness poll: a refused connection (the gateway still starting) is retried too.
    let (status, r) = wait_for("first answer", Duration::from_secs(20), || async {
        let r = c.post(&url).json(&body).send().await.ok()?;
        let s = r.status().as_u16();
        let v: Value = serde_json::from_str(&r.text().await.ok()?).ok()?;
        (s == 200).then_some((s, v))
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(r["model"], "food-review-1", "{r}");
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["usage"]["completion_tokens"], 100);

    // Adapter v2 on the server, then the 90/10 canary.
    mount.write(&configmap_file("001-adapters-v2.yaml"));
    listed(vec!["food-review-1", "food-review-2"]).await;
    apply(
        &api,
        doc("001-inferencemodel-canary.yaml", "InferenceModel"),
    );
    wait_for("canary in force", Duration::from_secs(20), || async {
        let (_, r) = complete(&c, &url, &body).await;
        (r["model"] == "food-review-2").then_some(())
    })
    .await;
    let mut counts = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..10 {
        let batch = futures::future::join_all((0..30).map(|_| complete(&c, &url, &body))).await;
        for (s, r) in batch {
            assert_eq!(s, 200, "{r}");
            *counts
                .entry(r["model"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
    }
    let canary = counts.get("food-review-2").copied().unwrap_or(0);
    assert_eq!(counts.values().sum::<u32>(), 300, "{counts:?}");
    // 10 % of 300 is 30 (sd 5.2); 4 sd either side.
    assert!((9..=51).contains(&canary), "{counts:?}");

    // Cut-over: 100 % food-review-2, and food-review-1 unloaded from the server.
    apply(
        &api,
        doc("001-inferencemodel-cutover.yaml", "InferenceModel"),
    );
    mount.write(&configmap_file("001-adapters-v3.yaml"));
    listed(vec!["food-review-2"]).await;
    wait_for("cut-over in force", Duration::from_secs(20), || async {
        let batch = futures::future::join_all((0..10).map(|_| complete(&c, &url, &body))).await;
        batch
            .iter()
            .all(|(s, r)| *s == 200 && r["model"] == "food-review-2")
            .then_some(())
    })
    .await;
    let batch = futures::future::join_all((0..50).map(|_| complete(&c, &url, &body))).await;
    for (s, r) in &batch {
        assert_eq!((*s, &r["model"]), (200, &json!("food-review-2")), "{r}");
    }

    // "No matching model name returns an error": a model no InferenceModel names is a 404 in
    // the v1alpha2 API generation, as upstream v0.2.0 answers it, even where a server has it
    // (a bare adapter name would otherwise bypass the canary split).
    for model in [
        "food-review-3",
        "food-review-2",
        "meta-llama/Llama-3.1-8B-Instruct",
    ] {
        let (s, r) = complete(&c, &url, &json!({"model": model, "prompt": "x"})).await;
        assert_eq!(s, 404, "{model}: {r}");
        assert!(
            r.to_string().contains(model) && r.to_string().contains("does not exist"),
            "{r}"
        );
    }

    // The seed's ClusterRole has no InferenceObjectives / InferenceModelRewrites and v0.2.0
    // has no such CRDs: each watch says so once, not once per retry.
    let logs = epp.proc.logs();
    let warnings = logs.matches("Kubernetes watch failing").count();
    assert!((1..=2).contains(&warnings), "{warnings} warnings:\n{logs}");
}

/// Every binary starts with upstream's flag spellings (both generations, one or two dashes,
/// `=value` or a separate value), says which accepted flags it ignores, and refuses an
/// unknown flag naming it.
#[tokio::test]
async fn upstream_flag_spellings_start_every_binary() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = d.join("pool.yaml");
    std::fs::write(&pool, "pool: {name: p}\nendpoints: []\n").unwrap();
    let pool_s = pool.to_string_lossy().into_owned();
    let epp = spawn_with_marker(
        &bin("epp"),
        &[
            "-poolName=p",
            "-poolNamespace",
            "default",
            "--pool-file",
            &pool_s,
            "-grpcPort",
            "0",
            "-grpcHealthPort=0",
            "-metricsPort",
            "0",
            "-refreshMetricsInterval=50ms",
            "-refreshPrometheusMetricsInterval",
            "1s",
            "-secureServing=false",
            "-enablePprof",
            "-totalQueuedRequestsMetric",
            "vllm:num_requests_waiting",
            "--zap-log-level=info",
            "--zap-devel",
            "--metrics-endpoint-auth=false",
        ],
        &[],
        "EPP_LISTENING",
        d,
    );
    let logs = wait_for("ignored flags logged", Duration::from_secs(10), || async {
        let l = epp.logs();
        l.contains("totalQueuedRequestsMetric").then_some(l)
    })
    .await;
    assert!(logs.contains("-enablePprof accepted and ignored"), "{logs}");
    let bbr_map = d.join("bbr.yaml");
    std::fs::write(&bbr_map, "baseModels: []\n").unwrap();
    let map_s = bbr_map.to_string_lossy().into_owned();
    // The body-based-routing chart's args (`--streaming --log-level error`) and the auth flag.
    let bbr = spawn_with_marker(
        &bin("bbr"),
        &[
            "-grpcPort=0",
            "-grpcHealthPort",
            "0",
            "-metricsPort=0",
            "--streaming",
            "--log-level",
            "error",
            "--metrics-endpoint-auth",
            "false",
            "--mapping-file",
            &map_s,
            "--bind-address",
            "127.0.0.1",
        ],
        &[],
        "BBR_LISTENING",
        d,
    );
    // Upstream's bbr is serving for any service name: GKE's gRPC health check sends none,
    // probes written for the EPP send theirs.
    let bbr_health = bbr.field("health");
    for name in [
        "",
        "envoy.service.ext_proc.v3.ExternalProcessor",
        "inference-extension",
        "liveness",
    ] {
        assert_eq!(
            health(&bbr_health, name).await,
            Some(ServingStatus::Serving as i32),
            "bbr health {name:?}"
        );
    }
    // A --cert-path that is missing or empty: a clear exit naming the flag, not a panic.
    let empty = d.join("no-certs");
    std::fs::create_dir_all(&empty).unwrap();
    let empty_s = empty.to_string_lossy().into_owned();
    for (b, dir) in [
        ("epp", "/nonexistent/certs"),
        ("epp", empty_s.as_str()),
        ("bbr", "/nonexistent/certs"),
    ] {
        let out = std::process::Command::new(bin(b))
            .env("RUST_BACKTRACE", "0")
            .args([
                "--cert-path",
                dir,
                "--grpc-port",
                "0",
                "--grpc-health-port",
                "0",
            ])
            .args(["--metrics-port", "0", "--bind-address", "127.0.0.1"])
            .args(if b == "epp" {
                ["--pool-file", pool_s.as_str()]
            } else {
                ["--mapping-file", map_s.as_str()]
            })
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{b} --cert-path {dir}: {err}");
        assert!(
            err.contains(&format!("--cert-path {dir}")) && !err.contains("panic"),
            "{b}: {err}"
        );
    }
    let cfg = d.join("lora.yaml");
    std::fs::write(
        &cfg,
        "vLLMLoRAConfig:\n  port: 1\n  ensureExist:\n    models: []\n",
    )
    .unwrap();
    let cfg_s = cfg.to_string_lossy().into_owned();
    let _sidecar = spawn_with_marker(
        &bin("lora-sidecar"),
        &[
            "--config",
            &cfg_s,
            "--health-check-timeout=300",
            "--health-check-interval",
            "2",
            "--reconcile-trigger",
            "5",
            "--config-validation",
            "--metrics-port",
            "0",
            "-v",
            "4",
        ],
        &[],
        "LORA_SIDECAR_LISTENING",
        d,
    );
    for (b, flag) in [
        ("epp", "-poolNme"),
        ("bbr", "--grpcPrt=1"),
        ("lora-sidecar", "-bogus"),
    ] {
        let out = std::process::Command::new(bin(b))
            .arg(flag)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{b} {flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        let name = flag.trim_start_matches('-').split('=').next().unwrap();
        assert!(err.contains(&format!("--{name}")), "{b}: {err}");
    }
}
