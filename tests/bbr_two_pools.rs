//! Two InferencePools behind one Envoy: bbr names the base model, each pool's EPP picks inside it.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const LLAMA: &str = "meta-llama/Llama-3.1-8B-Instruct";
const DEEPSEEK: &str = "deepseek/vllm-deepseek-r1";

const MAPPING: &str = r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: llama-models
  labels: {inference.networking.k8s.io/bbr-managed: "true"}
data:
  baseModel: meta-llama/Llama-3.1-8B-Instruct
  adapters: |
    - food-review-1
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: deepseek-models
  labels: {inference.networking.k8s.io/bbr-managed: "true"}
data:
  baseModel: deepseek/vllm-deepseek-r1
  adapters: |
    - ski-resorts
    - movie-critique
"#;

#[tokio::test]
async fn every_request_lands_in_the_right_pool() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = client();
    let flags = ["--enable-lora", "--max-loras", "2", "--time-scale", "0.1"];
    let llama: Vec<Proc> = (0..2).map(|_| spawn_sim(&flags, d)).collect();
    let mut ds_flags = flags.to_vec();
    ds_flags.extend_from_slice(&["--model", DEEPSEEK]);
    let deepseek: Vec<Proc> = (0..2).map(|_| spawn_sim(&ds_flags, d)).collect();
    let fr = adapter(d, "food-review-1", 8);
    for s in &llama {
        load_adapter(&c, s, "food-review-1", &fr).await;
    }
    for name in ["ski-resorts", "movie-critique"] {
        let p = adapter(d, name, 8);
        for s in &deepseek {
            load_adapter(&c, s, name, &p).await;
        }
    }
    let pool = |sims: &[Proc], name: &str| {
        let mut y = format!("pool: {{name: {name}}}\nendpoints:\n");
        for s in sims {
            y.push_str(&format!("- address: {}\n", s.addr));
        }
        let f = d.join(format!("{name}.yaml"));
        std::fs::write(&f, y).unwrap();
        f
    };
    let epp_a = spawn_epp(&pool(&llama, "llama"), &["--pool-name", "llama"], d);
    let epp_b = spawn_epp(
        &pool(&deepseek, "deepseek"),
        &["--pool-name", "deepseek"],
        d,
    );
    let mapping = d.join("bbr.yaml");
    std::fs::write(&mapping, MAPPING).unwrap();
    let (_bbr, bbr_grpc) = spawn_bbr(&mapping, d);
    let cfg = deploy_file("envoy/envoy-bbr-two-pools.yaml.tmpl")
        .replace("${LISTEN_PORT}", "0")
        .replace("${BBR_PORT}", &port_of(&bbr_grpc).to_string())
        .replace("${EPP_A_PORT}", &port_of(&epp_a.grpc).to_string())
        .replace("${EPP_B_PORT}", &port_of(&epp_b.grpc).to_string())
        .replace("${BASE_A}", LLAMA)
        .replace("${BASE_B}", DEEPSEEK);
    let envoy = spawn_envoy_config(&cfg, d).await;
    let url = format!("http://127.0.0.1:{}/v1/completions", envoy.port);

    // Both EPPs know their servers' models before traffic.
    for (epp, n) in [(&epp_a, "llama"), (&epp_b, "deepseek")] {
        wait_for("pool ready", Duration::from_secs(20), || async {
            let page = try_text(&c, &format!("http://{}/metrics", epp.metrics)).await?;
            (metric(&page, &format!("inference_pool_ready_pods{{name=\"{n}\"}}"))? == 2.0)
                .then_some(())
        })
        .await;
    }
    // Seed 000's "Try it out" requests, verbatim (tests/data/seeds/000-requests.json), twice.
    let requests: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data/seeds/000-requests.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let rounds = 2;
    let mut want_llama = std::collections::BTreeMap::<String, u64>::new();
    let mut want_ds = std::collections::BTreeMap::<String, u64>::new();
    for round in 0..rounds {
        for r in &requests {
            let url = format!(
                "http://127.0.0.1:{}{}",
                envoy.port,
                r["path"].as_str().unwrap()
            );
            let model = r["body"]["model"].as_str().unwrap().to_string();
            let resp = c.post(&url).json(&r["body"]).send().await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap();
            assert_eq!(
                status, 200,
                "seed 000 line {} ({model}), round {round}: {body}",
                r["seed_line"]
            );
            let served: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(served["model"], model.as_str(), "{body}");
            let want = if r["pool"] == "llama" {
                &mut want_llama
            } else {
                &mut want_ds
            };
            *want.entry(model).or_default() += 1;
        }
    }
    let mut llama_counts = std::collections::BTreeMap::new();
    for s in &llama {
        for (k, v) in sim_requests(&c, s).await {
            *llama_counts.entry(k).or_insert(0) += v;
        }
    }
    let mut ds_counts = std::collections::BTreeMap::new();
    for s in &deepseek {
        for (k, v) in sim_requests(&c, s).await {
            *ds_counts.entry(k).or_insert(0) += v;
        }
    }
    assert_eq!(llama_counts, want_llama);
    assert_eq!(ds_counts, want_ds);
    assert_eq!(want_ds.values().sum::<u64>(), 12, "{want_ds:?}");
    // A model no pool serves, and a client trying to pick the pool itself.
    let r = c
        .post(&url)
        .json(&json!({"model": "nobody", "prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .post(&url)
        .header("x-gateway-base-model-name", DEEPSEEK)
        .json(&json!({"model": "food-review-1", "prompt": "x", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let llama_total: u64 = sim_total(&c, &llama[0]).await + sim_total(&c, &llama[1]).await;
    assert_eq!(
        llama_total,
        want_llama.values().sum::<u64>() + 1,
        "the client's header is replaced by bbr's"
    );
}

#[test]
fn conflicting_mapping_is_rejected_naming_both_base_models() {
    let dir = tempfile::tempdir().unwrap();
    let mapping = dir.path().join("bbr.yaml");
    std::fs::write(
        &mapping,
        "baseModels:\n- baseModel: a\n  adapters: [shared]\n- baseModel: b\n  adapters: [shared]\n",
    )
    .unwrap();
    let (bbr, _) = spawn_bbr(&mapping, dir.path());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let logs = bbr.logs();
        if logs.contains("config rejected") {
            assert!(
                logs.contains("\\\"shared\\\"") || logs.contains("\"shared\""),
                "{logs}"
            );
            assert!(
                logs.contains("base model \\\"a\\\"") || logs.contains("base model \"a\""),
                "{logs}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no rejection logged: {logs}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_mode_watches_labelled_configmaps() {
    use common::fake_api::*;
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::new();
    let addr = start_fake(api.clone()).await;
    let kc = kubeconfig(dir.path(), &addr);
    let label = json!({"inference.networking.k8s.io/bbr-managed": "true"});
    api.put(
        CONFIGMAPS,
        configmap(
            "llama",
            label.clone(),
            json!({"baseModel": LLAMA, "adapters": "- food-review-1\n"}),
        ),
    );
    api.put(
        CONFIGMAPS,
        configmap("unlabelled", json!({}), json!({"baseModel": "ignored"})),
    );
    let (bbr, _) = spawn_bbr_with(
        &["--namespace", "default"],
        &[("KUBECONFIG", kc.as_str())],
        dir.path(),
    );
    let applied = |n: usize| {
        let bbr = &bbr;
        async move {
            wait_for("mapping applied", Duration::from_secs(20), || async {
                (bbr.logs().matches("config applied").count() >= n).then_some(())
            })
            .await
        }
    };
    applied(1).await;
    assert!(
        bbr.logs().contains("2 model names mapped"),
        "{}",
        bbr.logs()
    );
    api.put(
        CONFIGMAPS,
        configmap(
            "deepseek",
            label,
            json!({"baseModel": DEEPSEEK, "adapters": "- ski-resorts\n- movie-critique\n"}),
        ),
    );
    applied(2).await;
    assert!(
        bbr.logs().contains("5 model names mapped"),
        "{}",
        bbr.logs()
    );
}

/// Without RBAC on ConfigMaps (403), bbr says so once, not on every retry, and picks the
/// mapping up once the grant arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_mode_without_rbac_warns_once_then_recovers() {
    use common::fake_api::*;
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::new();
    let addr = start_fake(api.clone()).await;
    let kc = kubeconfig(dir.path(), &addr);
    api.forbid(CONFIGMAPS);
    api.put(
        CONFIGMAPS,
        configmap(
            "llama",
            json!({"inference.networking.k8s.io/bbr-managed": "true"}),
            json!({"baseModel": LLAMA, "adapters": "- food-review-1\n"}),
        ),
    );
    let (bbr, _) = spawn_bbr_with(
        &["--namespace", "default"],
        &[("KUBECONFIG", kc.as_str())],
        dir.path(),
    );
    // The watcher retries with backoff (~1 s, 2 s, ...): a few retries in 4 s.
    let first = wait_for("403 logged", Duration::from_secs(10), || async {
        bbr.logs()
            .contains("ConfigMap watch failing")
            .then(std::time::Instant::now)
    })
    .await;
    while first.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logs = bbr.logs();
    assert_eq!(logs.matches("ConfigMap watch failing").count(), 1, "{logs}");
    assert!(logs.contains("403") || logs.contains("forbidden"), "{logs}");
    api.forbidden.lock().unwrap().clear();
    wait_for(
        "mapping applied after the grant",
        Duration::from_secs(30),
        || async {
            let l = bbr.logs();
            (l.contains("ConfigMap watch recovered") && l.contains("config applied")).then_some(())
        },
    )
    .await;
}
