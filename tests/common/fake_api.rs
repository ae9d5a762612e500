//! An in-process fake Kubernetes API server speaking real list/watch JSON, for kube code tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::broadcast;

#[derive(Clone, Debug)]
pub struct Ev {
    rv: u64,
    key: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
pub struct Store {
    rv: u64,
    objects: BTreeMap<(String, String), Value>,
    log: Vec<Ev>,
    /// Watches from before this resourceVersion get 410 Gone.
    compacted: u64,
}

/// A fake API server: objects per resource, resourceVersions, list, watch (replay + live),
/// 410 Gone for compacted versions, and an outage switch.
#[derive(Clone)]
pub struct FakeApi {
    pub store: Arc<Mutex<Store>>,
    pub tx: broadcast::Sender<Ev>,
    pub down: Arc<AtomicBool>,
    /// Requests answered 503 while down.
    pub refused: Arc<std::sync::atomic::AtomicU64>,
    pub down_tx: Arc<tokio::sync::watch::Sender<bool>>,
    /// Resources (`group/version/plural` keys) the server has, as if only their CRDs were
    /// installed: others answer 404 to discovery, list and watch. `None`: every resource.
    pub served: Arc<Mutex<Option<Vec<String>>>>,
    /// Resources answered 403 Forbidden (RBAC missing), with discovery unaffected.
    pub forbidden: Arc<Mutex<Vec<String>>>,
    /// While true, get/create/replace of leases hang (an API server that accepts the call
    /// and never answers); released when set back to false (or after a minute).
    pub hang_leases: Arc<tokio::sync::watch::Sender<bool>>,
    /// TokenReview: bearer token -> user name; SubjectAccessReview: (user, path) allowed.
    pub tokens: Arc<Mutex<std::collections::HashMap<String, String>>>,
    pub grants: Arc<Mutex<Vec<(String, String)>>>,
    /// Reviews answered (TokenReview and SubjectAccessReview).
    pub reviews: Arc<std::sync::atomic::AtomicU64>,
}

pub fn key_of(group: &str, version: &str, plural: &str) -> String {
    format!("{group}/{version}/{plural}")
}

impl FakeApi {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(1024);
        Self {
            tokens: Default::default(),
            grants: Default::default(),
            reviews: Default::default(),
            store: Arc::new(Mutex::new(Store {
                rv: 100,
                ..Default::default()
            })),
            tx,
            down: Arc::new(AtomicBool::new(false)),
            refused: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            down_tx: Arc::new(tokio::sync::watch::channel(false).0),
            served: Arc::new(Mutex::new(None)),
            forbidden: Arc::new(Mutex::new(Vec::new())),
            hang_leases: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// Holds a lease call while [`FakeApi::hang_leases`] is set (bounded: a minute at most).
    async fn maybe_hang(&self, plural: &str) {
        if plural != "leases" {
            return;
        }
        let mut rx = self.hang_leases.subscribe();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            rx.wait_for(|hang| !*hang),
        )
        .await;
    }

    /// The stored object, if any.
    pub fn get(&self, key: &str, name: &str) -> Option<Value> {
        self.store
            .lock()
            .unwrap()
            .objects
            .get(&(key.to_string(), name.to_string()))
            .cloned()
    }

    /// Serve only these resources (keys from [`key_of`]); the rest are 404.
    pub fn serve_only(&self, keys: &[&str]) {
        *self.served.lock().unwrap() = Some(keys.iter().map(|k| k.to_string()).collect());
    }

    /// Answer 403 for this resource, as when the ServiceAccount's role lacks it.
    pub fn forbid(&self, key: &str) {
        self.forbidden.lock().unwrap().push(key.to_string());
    }

    fn served(&self, key: &str) -> bool {
        self.served
            .lock()
            .unwrap()
            .as_ref()
            .is_none_or(|s| s.iter().any(|k| k == key))
    }

    pub fn put(&self, key: &str, mut object: Value) {
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

    pub fn delete(&self, key: &str, name: &str) {
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
    pub fn compact(&self) {
        let mut s = self.store.lock().unwrap();
        s.compacted = s.rv + 1;
        s.log.clear();
    }

    pub fn set_down(&self, down: bool) {
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
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let (replay, gone, mut rx, now_rv) = {
        let s = api.store.lock().unwrap();
        let gone = from < s.compacted;
        let replay: Vec<Ev> = s
            .log
            .iter()
            .filter(|e| e.rv > from && e.key == key)
            .cloned()
            .collect();
        (replay, gone, api.tx.subscribe(), s.rv)
    };
    // A BOOKMARK carries only a resourceVersion: progress without an object change.
    let bookmark = move |rv: u64| json!({"type": "BOOKMARK", "object": {"kind": kind.clone(), "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}}});
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
        if bookmarks && tx.send(line(bookmark(now_rv))).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(e) if e.key == key && e.rv > from && matches_field(&e.object, &q) => {
                        if tx.send(line(json!({"type": e.kind, "object": e.object}))).await.is_err() {
                            return;
                        }
                    }
                    // Progress elsewhere in the store: tell bookmark-aware watchers.
                    Ok(e) if bookmarks => {
                        if tx.send(line(bookmark(e.rv))).await.is_err() {
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
    let kind = match plural.as_str() {
        "pods" => "Pod",
        "configmaps" => "ConfigMap",
        _ => "Unknown",
    };
    let key = key_of("", "v1", &plural);
    if api.forbidden.lock().unwrap().contains(&key) {
        return status(
            403,
            "Forbidden",
            &format!(
                "{plural} is forbidden: User \"system:serviceaccount:default:default\" cannot list resource \"{plural}\" in API group \"\" in the namespace \"default\""
            ),
        );
    }
    handle(api, key, kind.into(), q).await
}

async fn grouped(
    State(api): State<FakeApi>,
    Path((group, version, _ns, plural)): Path<(String, String, String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let key = key_of(&group, &version, &plural);
    if !api.served(&key) {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    if api.forbidden.lock().unwrap().contains(&key) {
        return status(
            403,
            "Forbidden",
            &format!(
                "{plural}.{group} is forbidden: User \"system:serviceaccount:default:default\" cannot list resource \"{plural}\" in API group \"{group}\" in the namespace \"default\""
            ),
        );
    }
    handle(api, key, plural.clone(), q).await
}

/// The resources an API group version has (kubectl's and kube's discovery).
const KNOWN: &[(&str, &str, &str, &str)] = &[
    (
        "inference.networking.k8s.io",
        "v1",
        "inferencepools",
        "InferencePool",
    ),
    (
        "inference.networking.x-k8s.io",
        "v1alpha2",
        "inferencepools",
        "InferencePool",
    ),
    (
        "inference.networking.x-k8s.io",
        "v1alpha2",
        "inferencemodels",
        "InferenceModel",
    ),
    (
        "inference.networking.x-k8s.io",
        "v1alpha2",
        "inferenceobjectives",
        "InferenceObjective",
    ),
    (
        "inference.networking.x-k8s.io",
        "v1alpha2",
        "inferencemodelrewrites",
        "InferenceModelRewrite",
    ),
    ("coordination.k8s.io", "v1", "leases", "Lease"),
];

async fn discovery(
    State(api): State<FakeApi>,
    Path((group, version)): Path<(String, String)>,
) -> Response {
    let resources: Vec<Value> = KNOWN
        .iter()
        .filter(|(g, v, p, _)| *g == group && *v == version && api.served(&key_of(g, v, p)))
        .map(|(_, _, plural, kind)| {
            json!({"name": plural, "singularName": "", "namespaced": true, "kind": kind,
                   "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]})
        })
        .collect();
    if resources.is_empty() {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    axum::Json(json!({"kind": "APIResourceList", "apiVersion": "v1",
                      "groupVersion": format!("{group}/{version}"), "resources": resources}))
    .into_response()
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        axum::Json(
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                          "message": message, "reason": reason, "code": code}),
        ),
    )
        .into_response()
}

async fn get_one(
    State(api): State<FakeApi>,
    Path((group, version, _ns, plural, name)): Path<(String, String, String, String, String)>,
) -> Response {
    api.maybe_hang(&plural).await;
    if api.down.load(Ordering::SeqCst) {
        return status(503, "ServiceUnavailable", "down");
    }
    let s = api.store.lock().unwrap();
    match s
        .objects
        .get(&(key_of(&group, &version, &plural), name.clone()))
    {
        Some(o) => axum::Json(o.clone()).into_response(),
        None => status(404, "NotFound", &format!("{plural} {name:?} not found")),
    }
}

async fn create(
    State(api): State<FakeApi>,
    Path((group, version, _ns, plural)): Path<(String, String, String, String)>,
    axum::Json(obj): axum::Json<Value>,
) -> Response {
    api.maybe_hang(&plural).await;
    let key = key_of(&group, &version, &plural);
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if api
        .store
        .lock()
        .unwrap()
        .objects
        .contains_key(&(key.clone(), name.clone()))
    {
        return status(
            409,
            "AlreadyExists",
            &format!("{plural} {name:?} already exists"),
        );
    }
    api.put(&key, obj);
    let s = api.store.lock().unwrap();
    (
        StatusCode::CREATED,
        axum::Json(s.objects[&(key, name)].clone()),
    )
        .into_response()
}

async fn replace(
    State(api): State<FakeApi>,
    Path((group, version, _ns, plural, name)): Path<(String, String, String, String, String)>,
    axum::Json(obj): axum::Json<Value>,
) -> Response {
    api.maybe_hang(&plural).await;
    let key = key_of(&group, &version, &plural);
    {
        let s = api.store.lock().unwrap();
        let current = s
            .objects
            .get(&(key.clone(), name.clone()))
            .map(|o| o["metadata"]["resourceVersion"].clone());
        if current != Some(obj["metadata"]["resourceVersion"].clone()) {
            return status(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version and try again",
            );
        }
    }
    api.put(&key, obj);
    let s = api.store.lock().unwrap();
    axum::Json(s.objects[&(key, name)].clone()).into_response()
}

/// `PATCH .../{name}/status` with a JSON merge patch of `status` (what kube's
/// `patch_status` with `Patch::Merge` sends).
async fn patch_status(
    State(api): State<FakeApi>,
    Path((group, version, _ns, plural, name)): Path<(String, String, String, String, String)>,
    axum::Json(patch): axum::Json<Value>,
) -> Response {
    let key = key_of(&group, &version, &plural);
    let current = api
        .store
        .lock()
        .unwrap()
        .objects
        .get(&(key.clone(), name.clone()))
        .cloned();
    let Some(mut obj) = current else {
        return status(404, "NotFound", &format!("{plural} {name:?} not found"));
    };
    obj["status"] = patch["status"].clone();
    api.put(&key, obj);
    let s = api.store.lock().unwrap();
    axum::Json(s.objects[&(key, name)].clone()).into_response()
}

/// `POST /apis/authentication.k8s.io/v1/tokenreviews` and
/// `/apis/authorization.k8s.io/v1/subjectaccessreviews`, from `tokens` and `grants`.
async fn review(
    State(api): State<FakeApi>,
    Path((group, _version, plural)): Path<(String, String, String)>,
    axum::Json(mut body): axum::Json<Value>,
) -> Response {
    api.reviews.fetch_add(1, Ordering::SeqCst);
    match (group.as_str(), plural.as_str()) {
        ("authentication.k8s.io", "tokenreviews") => {
            let token = body["spec"]["token"].as_str().unwrap_or("").to_string();
            let user = api.tokens.lock().unwrap().get(&token).cloned();
            body["status"] = match user {
                Some(u) => {
                    json!({"authenticated": true, "user": {"username": u, "groups": ["system:authenticated"]}})
                }
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
        }
        ("authorization.k8s.io", "subjectaccessreviews") => {
            let user = body["spec"]["user"].as_str().unwrap_or("").to_string();
            let path = body["spec"]["nonResourceAttributes"]["path"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let allowed = api.grants.lock().unwrap().contains(&(user, path));
            body["status"] = json!({"allowed": allowed});
        }
        _ => return status(404, "NotFound", "no such review"),
    }
    (axum::http::StatusCode::CREATED, axum::Json(body)).into_response()
}

pub async fn start_fake(api: FakeApi) -> String {
    let app = Router::new()
        .route(
            "/apis/{group}/{version}/{plural}",
            axum::routing::post(review),
        )
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}/status",
            axum::routing::patch(patch_status),
        )
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}",
            get(get_one).put(replace),
        )
        .route("/api/v1/namespaces/{ns}/{plural}", get(core))
        .route("/apis/{group}/{version}", get(discovery))
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{plural}",
            get(grouped).post(create),
        )
        .with_state(api);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    addr
}

/// A kubeconfig file pointing at the fake server; returns its path.
pub fn kubeconfig(dir: &std::path::Path, addr: &str) -> String {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{addr}\"}}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context: {{cluster: fake, user: u, namespace: default}}\ncurrent-context: c\n"),
    )
    .unwrap();
    path.to_string_lossy().into_owned()
}

/// Resource key of ConfigMaps.
pub const CONFIGMAPS: &str = "/v1/configmaps";

/// A ConfigMap object.
pub fn configmap(name: &str, labels: Value, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "namespace": "default", "labels": labels}, "data": data})
}
