//! EPP Kubernetes discovery against an in-process fake API server speaking real list/watch JSON.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use common::*;
use serde_json::{Value, json};
use tokio::sync::broadcast;

#[derive(Clone, Debug)]
struct Ev {
    rv: u64,
    key: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<(String, String), Value>,
    log: Vec<Ev>,
    /// Watches from before this resourceVersion get 410 Gone.
    compacted: u64,
}

/// A fake API server: objects per resource, resourceVersions, list, watch (replay + live),
/// 410 Gone for compacted versions, and an outage switch.
#[derive(Clone)]
struct FakeApi {
    store: Arc<Mutex<Store>>,
    tx: broadcast::Sender<Ev>,
    down: Arc<AtomicBool>,
    /// Requests answered 503 while down.
    refused: Arc<std::sync::atomic::AtomicU64>,
    down_tx: Arc<tokio::sync::watch::Sender<bool>>,
}

fn key_of(group: &str, version: &str, plural: &str) -> String {
    format!("{group}/{version}/{plural}")
}

impl FakeApi {
    fn new() -> Self {
        let (tx, _) = broadcast::channel(1024);
        Self {
            store: Arc::new(Mutex::new(Store {
                rv: 100,
                ..Default::default()
            })),
            tx,
            down: Arc::new(AtomicBool::new(false)),
            refused: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            down_tx: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    fn put(&self, key: &str, mut object: Value) {
        let mut s = self.store.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let kind = if s
            .objects
            .insert((key.into(), name), object.clone())
            .is_some()
        {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let ev = Ev {
            rv,
            key: key.into(),
            kind,
            object,
        };
        s.log.push(ev.clone());
        let _ = self.tx.send(ev);
    }

    fn delete(&self, key: &str, name: &str) {
        let mut s = self.store.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        if let Some(mut object) = s.objects.remove(&(key.to_string(), name.to_string())) {
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            let ev = Ev {
                rv,
                key: key.into(),
                kind: "DELETED",
                object,
            };
            s.log.push(ev.clone());
            let _ = self.tx.send(ev);
        }
    }

    /// Forget history: every open watch resumes with 410 Gone and has to relist.
    fn compact(&self) {
        let mut s = self.store.lock().unwrap();
        s.compacted = s.rv + 1;
        s.log.clear();
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        self.down_tx.send_replace(down);
    }
}

fn matches_field(object: &Value, q: &BTreeMap<String, String>) -> bool {
    match q
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("metadata.name="))
    {
        Some(n) => object["metadata"]["name"] == n,
        None => true,
    }
}

async fn handle(api: FakeApi, key: String, kind: String, q: BTreeMap<String, String>) -> Response {
    if api.down.load(Ordering::SeqCst) {
        api.refused.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    if !watch {
        let s = api.store.lock().unwrap();
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|((k, _), o)| *k == key && matches_field(o, &q))
            .map(|(_, o)| o.clone())
            .collect();
        let body = json!({"kind": format!("{kind}List"), "apiVersion": "v1", "metadata": {"resourceVersion": s.rv.to_string()}, "items": items});
        return axum::Json(body).into_response();
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (replay, gone, mut rx) = {
        let s = api.store.lock().unwrap();
        let gone = from < s.compacted;
        let replay: Vec<Ev> = s
            .log
            .iter()
            .filter(|e| e.rv > from && e.key == key)
            .cloned()
            .collect();
        (replay, gone, api.tx.subscribe())
    };
    let mut down = api.down_tx.subscribe();
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let line = |v: Value| Ok(Bytes::from(format!("{v}\n")));
    tokio::spawn(async move {
        if gone {
            let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}});
            let _ = tx.send(line(status)).await;
            return;
        }
        for e in replay {
            if matches_field(&e.object, &q)
                && tx
                    .send(line(json!({"type": e.kind, "object": e.object})))
                    .await
                    .is_err()
            {
                return;
            }
        }
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(e) if e.key == key && e.rv > from && matches_field(&e.object, &q) => {
                        if tx.send(line(json!({"type": e.kind, "object": e.object}))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
                _ = down.changed() => {
                    if *down.borrow() {
                        // The API server went away: the connection breaks.
                        let _ = tx.send(Err(std::io::Error::other("api server down"))).await;
                        return;
                    }
                }
            }
        }
    });
    Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(body_rx),
    ))
}

async fn core(
    State(api): State<FakeApi>,
    Path((_ns, plural)): Path<(String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let kind = if plural == "pods" { "Pod" } else { "Unknown" };
    handle(api, key_of("", "v1", &plural), kind.into(), q).await
}

async fn grouped(
    State(api): State<FakeApi>,
    Path((group, version, _ns, plural)): Path<(String, String, String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    handle(api, key_of(&group, &version, &plural), plural.clone(), q).await
}

async fn start_fake(api: FakeApi) -> String {
    let app = Router::new()
        .route("/api/v1/namespaces/{ns}/{plural}", get(core))
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{plural}",
            get(grouped),
        )
        .with_state(api);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    addr
}

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

async fn seen(c: &reqwest::Client, epp: &Epp) -> Option<(Vec<String>, Vec<String>)> {
    let v: Value = c
        .get(format!("http://{}/debug/pool", epp.metrics))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
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

fn kubeconfig(dir: &std::path::Path, addr: &str) -> String {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{addr}\"}}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context: {{cluster: fake, user: u, namespace: default}}\ncurrent-context: c\n"),
    )
    .unwrap();
    path.to_string_lossy().into_owned()
}

fn spawn_kube_epp(dir: &std::path::Path, kc: &str, extra: &[&str]) -> Epp {
    let mut args = vec![
        "--bind-address",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--grpc-health-port",
        "0",
        "--metrics-port",
        "0",
        "--pool-name",
        "llama",
        "--pool-namespace",
        "default",
    ];
    args.extend_from_slice(extra);
    let proc = spawn_with_marker(
        &bin("epp"),
        &args,
        &[("KUBECONFIG", kc)],
        "EPP_LISTENING",
        dir,
    );
    let field = |k: &str| {
        proc.addr
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap()
            .to_string()
    };
    let (grpc, metrics, health) = (field("grpc"), field("metrics"), field("health"));
    Epp {
        proc,
        grpc,
        metrics,
        health,
    }
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
