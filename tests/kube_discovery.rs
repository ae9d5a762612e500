//! EPP Kubernetes discovery against an in-process fake API server speaking real list/watch JSON.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::fake_api::*;
use common::*;
use serde_json::{Value, json};

const PODS: &str = "/v1/pods";
const POOLS: &str = "inference.networking.k8s.io/v1/inferencepools";
const MODELS: &str = "inference.networking.x-k8s.io/v1alpha2/inferencemodels";

fn pool(selector: &str) -> Value {
    json!({"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
           "metadata": {"name": "llama", "namespace": "default"},
           "spec": {"selector": {"matchLabels": {"app": selector}}, "targetPorts": [{"number": 8000}, {"number": 8001}],
                    "endpointPickerRef": {"name": "llama-epp"}}})
}

fn pod(name: &str, app: &str, ip: &str, ready: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default", "labels": {"app": app, "inference.networking.k8s.io/engine-type": "vllm"}},
           "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
}

fn model(name: &str, pool: &str) -> Value {
    json!({"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceModel",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"modelName": name, "criticality": "Standard", "poolRef": {"name": pool}}})
}

/// What the EPP's picker sees (`GET /debug/pool`).
async fn debug_pool(c: &reqwest::Client, epp: &Epp) -> Option<Value> {
    try_json(c, &format!("http://{}/debug/pool", epp.metrics)).await
}

async fn seen(c: &reqwest::Client, epp: &Epp) -> Option<(Vec<String>, Vec<String>)> {
    let v = debug_pool(c, epp).await?;
    let eps = v["endpoints"]
        .as_array()?
        .iter()
        .map(|e| e["address"].as_str().unwrap_or("").to_string())
        .collect();
    let models = v["models"]
        .as_array()?
        .iter()
        .map(|m| m.as_str().unwrap_or("").to_string())
        .collect();
    Some((eps, models))
}

async fn expect(c: &reqwest::Client, epp: &Epp, what: &str, eps: &[&str], models: &[&str]) {
    let want = (
        eps.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        models.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    );
    wait_for(what, Duration::from_secs(20), || {
        let want = want.clone();
        async move { (seen(c, epp).await? == want).then_some(()) }
    })
    .await;
}

/// An EPP on the fake API server; its pages open (`--metrics-endpoint-auth=false`) unless
/// `extra` says otherwise.
fn spawn_kube_epp(dir: &std::path::Path, kc: &str, extra: &[&str]) -> Epp {
    let defaults = [
        "--pool-name",
        "llama",
        "--pool-namespace",
        "default",
        "--metrics-endpoint-auth",
        "false",
    ];
    spawn_epp_with(&with_defaults(&defaults, extra), &[("KUBECONFIG", kc)], dir)
}

/// Against Kubernetes the metrics and debug pages need a token the API server vouches for
/// (TokenReview) whose identity may get the path (SubjectAccessReview), as upstream's
/// `--metrics-endpoint-auth` (on by default there); `--kubeconfig` is where the EPP finds
/// the API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pages_need_a_token_the_api_server_vouches_for() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::new();
    let addr = start_fake(api.clone()).await;
    let kc = kubeconfig(dir.path(), &addr);
    api.tokens.lock().unwrap().insert(
        "prom-token".into(),
        "system:serviceaccount:monitoring:prometheus".into(),
    );
    api.tokens.lock().unwrap().insert(
        "other-token".into(),
        "system:serviceaccount:default:other".into(),
    );
    api.grants.lock().unwrap().push((
        "system:serviceaccount:monitoring:prometheus".into(),
        "/metrics".into(),
    ));
    let epp = spawn_epp_with(
        &["--pool-name", "llama", "--kubeconfig", kc.as_str()],
        &[],
        dir.path(),
    );
    let c = client();
    let get = |path: &'static str, token: Option<&'static str>| {
        let mut r = c.get(format!("http://{}{path}", epp.metrics));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(get("/metrics", None).await, 401);
    assert_eq!(get("/metrics", Some("forged")).await, 401);
    assert_eq!(get("/metrics", Some("other-token")).await, 403);
    assert_eq!(get("/metrics", Some("prom-token")).await, 200);
    assert_eq!(get("/debug/pool", Some("prom-token")).await, 403);
    assert_eq!(get("/debug/pool", None).await, 401);
    // Verdicts are cached: the granted token is not reviewed again.
    let reviews = api.reviews.load(Ordering::SeqCst);
    for _ in 0..5 {
        assert_eq!(get("/metrics", Some("prom-token")).await, 200);
    }
    assert_eq!(api.reviews.load(Ordering::SeqCst), reviews);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_selector_mode_needs_no_inference_pool() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::new();
    let addr = start_fake(api.clone()).await;
    let kc = kubeconfig(dir.path(), &addr);
    api.put(PODS, pod("a", "vllm", "127.0.0.5", true));
    api.put(PODS, pod("b", "other", "127.0.0.6", true));
    let epp = spawn_kube_epp(
        dir.path(),
        &kc,
        &["--endpoint-selector", "app=vllm", "--target-ports", "9000"],
    );
    let c = client();
    expect(&c, &epp, "pods selected by label", &["127.0.0.5:9000"], &[]).await;
    api.put(PODS, pod("b", "vllm", "127.0.0.6", true));
    expect(
        &c,
        &epp,
        "relabelled pod joins",
        &["127.0.0.5:9000", "127.0.0.6:9000"],
        &[],
    )
    .await;
}

/// Without `--pool-group`, on a cluster serving both InferencePool groups (upstream's v1 CRDs
/// plus the v1alpha2 ones), the named pool is found in whichever group holds it; when both
/// do, v1 wins with a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_found_in_whichever_group_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::new();
    let addr = start_fake(api.clone()).await;
    let kc = kubeconfig(dir.path(), &addr);
    api.put(PODS, pod("a", "vllm", "127.0.0.5", true));
    let epp = spawn_kube_epp(dir.path(), &kc, &[]);
    let c = client();
    wait_for(
        "the missing pool is logged",
        Duration::from_secs(20),
        || async {
            epp.proc
                .logs()
                .contains("no InferencePool of this name yet")
                .then_some(())
        },
    )
    .await;
    let v1alpha2 = json!({"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferencePool",
        "metadata": {"name": "llama", "namespace": "default"},
        "spec": {"selector": {"app": "vllm"}, "targetPortNumber": 8000,
                 "extensionRef": {"name": "llama-epp"}}});
    api.put(
        "inference.networking.x-k8s.io/v1alpha2/inferencepools",
        v1alpha2,
    );
    expect(&c, &epp, "the v1alpha2 pool", &["127.0.0.5:8000"], &[]).await;
    assert!(
        epp.proc
            .logs()
            .contains("group=\"inference.networking.x-k8s.io\" version=\"v1alpha2\""),
        "{}",
        epp.proc.logs()
    );
    // A v1 pool of the same name (ports 8000 and 8001) takes over, with a warning.
    api.put(POOLS, pool("vllm"));
    expect(
        &c,
        &epp,
        "the v1 pool wins",
        &["127.0.0.5:8000", "127.0.0.5:8001"],
        &[],
    )
    .await;
    wait_for("both groups warned", Duration::from_secs(10), || async {
        epp.proc.logs().contains("exists in both").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_follows_pods_pools_and_models_through_outages() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::new();
    let addr = start_fake(api.clone()).await;
    let kc = kubeconfig(dir.path(), &addr);
    api.put(POOLS, pool("llama"));
    api.put(PODS, pod("p1", "llama", "127.0.0.2", false));
    api.put(PODS, pod("other", "deepseek", "127.0.0.9", true));
    let epp = spawn_kube_epp(dir.path(), &kc, &[]);
    let c = client();

    // A pod that is not Ready is not an endpoint; one of another app never is.
    expect(&c, &epp, "empty pool", &[], &[]).await;
    api.put(PODS, pod("p1", "llama", "127.0.0.2", true));
    expect(
        &c,
        &epp,
        "p1 ready: one endpoint per target port",
        &["127.0.0.2:8000", "127.0.0.2:8001"],
        &[],
    )
    .await;
    api.put(PODS, pod("p2", "llama", "127.0.0.3", true));
    api.put(MODELS, model("food-review", "llama"));
    api.put(MODELS, model("not-ours", "deepseek"));
    expect(
        &c,
        &epp,
        "p2 and a model",
        &[
            "127.0.0.2:8000",
            "127.0.0.2:8001",
            "127.0.0.3:8000",
            "127.0.0.3:8001",
        ],
        &["food-review"],
    )
    .await;
    api.put(PODS, pod("p1", "llama", "127.0.0.2", false));
    expect(
        &c,
        &epp,
        "p1 not ready",
        &["127.0.0.3:8000", "127.0.0.3:8001"],
        &["food-review"],
    )
    .await;
    // Prefix placement hashes the pod name and port, which every replica reads alike.
    let names: Vec<String> = debug_pool(&c, &epp).await.unwrap()["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(names, ["p2:8000", "p2:8001"]);

    // Outage: the endpoint set must not be emptied while the API server is away.
    api.set_down(true);
    // The EPP keeps asking (watch restarts, relists) and is refused.
    wait_for(
        "the EPP to be refused by the API server",
        Duration::from_secs(20),
        || async { (api.refused.load(Ordering::SeqCst) >= 4).then_some(()) },
    )
    .await;
    assert_eq!(
        seen(&c, &epp).await.unwrap(),
        (
            vec!["127.0.0.3:8000".to_string(), "127.0.0.3:8001".to_string()],
            vec!["food-review".to_string()]
        ),
        "an outage keeps the last known pool"
    );
    // Changes made while the watch was broken, and history compacted (410 on resume).
    api.set_down(false);
    api.compact();
    api.delete(PODS, "p2");
    api.put(PODS, pod("p3", "llama", "127.0.0.4", true));
    api.delete(MODELS, "food-review");
    expect(
        &c,
        &epp,
        "relist after outage and 410",
        &["127.0.0.4:8000", "127.0.0.4:8001"],
        &[],
    )
    .await;

    // The pool's selector changes: the other app's pod becomes the endpoint.
    api.put(POOLS, pool("deepseek"));
    expect(
        &c,
        &epp,
        "selector change",
        &["127.0.0.9:8000", "127.0.0.9:8001"],
        &[],
    )
    .await;
    // A terminating pod leaves the pool.
    let mut terminating = pod("other", "deepseek", "127.0.0.9", true);
    terminating["metadata"]["deletionTimestamp"] = json!("2026-11-22T00:00:00Z");
    api.put(PODS, terminating);
    expect(&c, &epp, "terminating pod removed", &[], &[]).await;
}

async fn is_leader(c: &reqwest::Client, epp: &Epp) -> Option<bool> {
    let v = debug_pool(c, epp).await?;
    v["leader"].as_bool()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_takeover_when_it_dies() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::new();
    let addr = start_fake(api.clone()).await;
    let kc = kubeconfig(dir.path(), &addr);
    api.put(POOLS, pool("llama"));
    let ha = [
        "--ha-enable-leader-election",
        "--lease-duration",
        "2s",
        "--lease-renew-interval",
        "200ms",
    ];
    let a = spawn_kube_epp(dir.path(), &kc, &ha);
    let b = spawn_kube_epp(dir.path(), &kc, &ha);
    let c = client();
    let (a_leads, _) = wait_for("exactly one leader", Duration::from_secs(20), || async {
        let (x, y) = (is_leader(&c, &a).await?, is_leader(&c, &b).await?);
        (x != y).then_some((x, y))
    })
    .await;
    // It stays that way over several renewals.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (x, y) = (
            is_leader(&c, &a).await.unwrap(),
            is_leader(&c, &b).await.unwrap(),
        );
        assert!(x != y, "two leaders or none: {x} {y}");
    }
    let (dead, survivor) = if a_leads { (a, b) } else { (b, a) };
    drop(dead);
    wait_for(
        "the survivor to take over after the lease expires",
        Duration::from_secs(20),
        || async { is_leader(&c, &survivor).await?.then_some(()) },
    )
    .await;
}

fn model_at(name: &str, model_name: &str, target: &str, created: &str) -> Value {
    json!({"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceModel",
           "metadata": {"name": name, "namespace": "default", "creationTimestamp": created},
           "spec": {"modelName": model_name, "poolRef": {"name": "llama"},
                    "targetModels": [{"name": target}]}})
}

async fn targets(c: &reqwest::Client, epp: &Epp, model: &str) -> Option<Vec<String>> {
    let v = debug_pool(c, epp).await?;
    Some(
        v["targets"][model]
            .as_array()?
            .iter()
            .map(|t| t["name"].as_str().unwrap_or("").to_string())
            .collect(),
    )
}

/// Any namespace user can create an InferenceModel: a newer one claiming a taken modelName
/// (or a broken one) is ignored and logged, the oldest keeps the name, every other rule stays
/// in force, also after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_models_oldest_wins_and_the_rest_stay() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::new();
    let addr = start_fake(api.clone()).await;
    let kc = kubeconfig(dir.path(), &addr);
    api.put(POOLS, pool("llama"));
    api.put(
        MODELS,
        model_at(
            "food-review",
            "food-review",
            "food-review-1",
            "2026-01-01T00:00:00Z",
        ),
    );
    api.put(
        MODELS,
        model_at(
            "hijack",
            "food-review",
            "evil-adapter",
            "2026-06-01T00:00:00Z",
        ),
    );
    api.put(
        MODELS,
        model_at("chat", "chat", "chat-1", "2026-06-02T00:00:00Z"),
    );
    let mut bad = model_at("typo", "typo", "t-1", "2026-06-03T00:00:00Z");
    bad["spec"]["criticality"] = json!("critical");
    api.put(MODELS, bad);
    let c = client();
    for round in 0..2 {
        let epp = spawn_kube_epp(dir.path(), &kc, &[]);
        let got = wait_for("rules", Duration::from_secs(20), || async {
            let fr = targets(&c, &epp, "food-review").await?;
            let chat = targets(&c, &epp, "chat").await?;
            Some((fr, chat))
        })
        .await;
        assert_eq!(got.0, ["food-review-1"], "round {round}");
        assert_eq!(got.1, ["chat-1"], "round {round}");
        let v = debug_pool(&c, &epp).await.unwrap();
        assert!(v["targets"].get("typo").is_none(), "{v}");
        let logs = wait_for("conflict logged", Duration::from_secs(10), || async {
            let l = epp.proc.logs();
            (l.contains("hijack") && l.contains("already claimed") && l.contains("typo"))
                .then_some(l)
        })
        .await;
        // Once each, not on every later event.
        assert_eq!(logs.matches("already claimed").count(), 1, "{logs}");
    }
    // The ignored objects say why in their status (the EPP's Accepted condition).
    let cond = |name: &str| {
        api.get(MODELS, name)
            .map(|o| o["status"]["conditions"][0].clone())
            .unwrap_or(Value::Null)
    };
    let epp = spawn_kube_epp(dir.path(), &kc, &[]);
    wait_for("status written", Duration::from_secs(10), || async {
        (cond("hijack")["reason"] == "ModelNameInUse").then_some(())
    })
    .await;
    assert_eq!(cond("hijack")["status"], "False");
    assert!(
        cond("hijack")["message"]
            .as_str()
            .unwrap()
            .contains("food-review")
    );
    assert_eq!(cond("typo")["reason"], "Invalid");
    assert_eq!(
        cond("food-review"),
        Value::Null,
        "accepted objects are left alone"
    );
    // The older one goes: the newer one takes the name over and its condition turns True.
    api.delete(MODELS, "food-review");
    wait_for("hijack in force", Duration::from_secs(20), || async {
        (targets(&c, &epp, "food-review").await? == ["evil-adapter"]).then_some(())
    })
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cond("hijack")["status"] != "True" {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not cleared: {}\n{}",
            cond("hijack"),
            epp.proc.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const LEASES: &str = "coordination.k8s.io/v1/leases";

/// The API server accepts the lease calls and never answers: the leader steps down within
/// its renew deadline (before the lease expires for the others), and leads again once the
/// API answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_lease_call_makes_the_leader_step_down_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::new();
    let addr = start_fake(api.clone()).await;
    let kc = kubeconfig(dir.path(), &addr);
    api.put(POOLS, pool("llama"));
    let epp = spawn_kube_epp(
        dir.path(),
        &kc,
        &[
            "--ha-enable-leader-election",
            "--lease-duration",
            "6s",
            "--lease-renew-interval",
            "250ms",
        ],
    );
    let c = client();
    wait_for("leader", Duration::from_secs(20), || async {
        is_leader(&c, &epp).await?.then_some(())
    })
    .await;
    api.hang_leases.send_replace(true);
    let hung = std::time::Instant::now();
    wait_for("stepped down", Duration::from_secs(10), || async {
        (!is_leader(&c, &epp).await?).then_some(())
    })
    .await;
    // Renew deadline 4 s (two thirds of 6 s): down before the lease could expire elsewhere.
    assert!(
        hung.elapsed() < Duration::from_secs(6),
        "{:?}",
        hung.elapsed()
    );
    api.hang_leases.send_replace(false);
    wait_for("leader again", Duration::from_secs(20), || async {
        is_leader(&c, &epp).await?.then_some(())
    })
    .await;
}

/// A live holder whose clock runs an hour behind renews its lease every 300 ms: its
/// renewTime looks ancient, but the record keeps changing, so the lease is never stolen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_does_not_steal_a_live_lease() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::new();
    let addr = start_fake(api.clone()).await;
    let kc = kubeconfig(dir.path(), &addr);
    api.put(POOLS, pool("llama"));
    let skewed = |i: u64| {
        let t = std::time::SystemTime::now() - Duration::from_secs(3600)
            + Duration::from_millis(300 * i);
        let secs = t
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let ts = k8s_openapi::jiff::Timestamp::from_microsecond((secs * 1e6) as i64).unwrap();
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "llama-epp-leader", "namespace": "default"},
               "spec": {"holderIdentity": "other-replica", "leaseDurationSeconds": 2,
                        "renewTime": ts.to_string(), "acquireTime": ts.to_string(), "leaseTransitions": 0}})
    };
    api.put(LEASES, skewed(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let renewer = {
        let (api, stop) = (api.clone(), stop.clone());
        tokio::spawn(async move {
            for i in 1..200 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                api.put(LEASES, skewed(i));
            }
        })
    };
    let epp = spawn_kube_epp(
        dir.path(),
        &kc,
        &[
            "--ha-enable-leader-election",
            "--lease-duration",
            "2s",
            "--lease-renew-interval",
            "200ms",
        ],
    );
    let c = client();
    // Well past a lease duration of observation: still a follower.
    wait_for("EPP up", Duration::from_secs(20), || async {
        is_leader(&c, &epp).await
    })
    .await;
    for _ in 0..25 {
        assert_eq!(is_leader(&c, &epp).await, Some(false), "stole a live lease");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The holder stops renewing: after a lease duration unchanged, the EPP takes over.
    stop.store(true, Ordering::SeqCst);
    renewer.await.unwrap();
    wait_for(
        "takeover of the dead holder's lease",
        Duration::from_secs(20),
        || async { is_leader(&c, &epp).await?.then_some(()) },
    )
    .await;
}
