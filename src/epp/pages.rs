//! The EPP's HTTP pages on the metrics port: `/metrics`, `/debug/pool` and `/debug/memory`, behind `--metrics-endpoint-auth` when it is on; without it `/debug/*` answers loopback clients only.

use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::memory::MemoryBudget;
use crate::pool::metrics::EppMetrics;
use crate::pool::state::Shared;

/// What the metrics page reads besides the registry: readiness and the pool's generation
/// are read when scraped, not pushed on every change.
#[derive(Clone)]
pub struct Pages {
    pub metrics: EppMetrics,
    pub shared: Arc<Shared>,
    pub leader_election: bool,
    pub budget: Arc<MemoryBudget>,
    /// `/debug/*` to any client (auth is on, or `--public-debug-endpoints`).
    pub public_debug: bool,
}

async fn metrics_page(State(p): State<Pages>) -> impl IntoResponse {
    let m = &p.metrics;
    let synced = p
        .shared
        .pool_synced
        .load(std::sync::atomic::Ordering::Acquire);
    let leader = !p.leader_election || p.shared.is_leader.load(std::sync::atomic::Ordering::SeqCst);
    m.ready.set(i64::from(synced && leader));
    m.pool_generation
        .set(i64::try_from(p.shared.snapshot.load().generation).unwrap_or(i64::MAX));
    m.memory_used
        .set(i64::try_from(p.budget.used()).unwrap_or(i64::MAX));
    crate::net::metrics_text::response(m.encode())
}

/// Most adapter names listed per endpoint and kind on `/debug/pool` (a server may report
/// any number).
const DEBUG_ADAPTERS: usize = 64;

/// The adapters `h`'s latest scrape shows running or waiting, those cached (vLLM's
/// residency metrics, GPU or host memory), and those its model list names: what routing by
/// residency and the resolver's copies go by.
fn adapters_seen(h: &crate::pool::state::EndpointHandle) -> [Vec<String>; 3] {
    fn names<'a>(lists: impl IntoIterator<Item = &'a String>) -> Vec<String> {
        let mut v: Vec<String> = lists.into_iter().cloned().collect();
        v.sort_unstable();
        v.dedup();
        v.truncate(DEBUG_ADAPTERS);
        v
    }
    let (running, cached) = h.scraped.load_full().map_or_else(Default::default, |s| {
        let m = &s.metrics;
        (
            names(m.running_adapters.iter().chain(&m.waiting_adapters)),
            names(m.gpu_adapters.iter().chain(&m.cpu_adapters)),
        )
    });
    let listed = h
        .models
        .load_full()
        .map_or_else(Vec::new, |m| names(&m.adapters));
    [running, cached, listed]
}

/// What the picker sees: endpoints (with health) and model names, for operators and tests.
async fn debug_pool(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let snap = shared.snapshot.load();
    let endpoints: Vec<serde_json::Value> = snap
        .endpoints
        .iter()
        .map(|h| {
            let [running, cached, listed] = adapters_seen(h);
            let scraped = h.scraped.load();
            serde_json::json!({"address": h.address, "name": h.identity, "engine": format!("{:?}", h.engine), "healthy": h.is_healthy(),
            "engine_down": h.engine_down.load(std::sync::atomic::Ordering::Relaxed),
            "ejected": h.outlier.is_ejected(), "adapters_sent": h.sent_adapters_len(),
            "stalled": scraped.as_ref().is_some_and(|s| s.stalled()),
            "stall_after_ms": scraped.as_ref().map(|s| s.stall_after.as_millis() as u64),
            "adapters_running": running, "adapters_cached": cached, "adapters_listed": listed})
        })
        .collect();
    // How many prompt prefixes this replica places: replicas that agree hold about as many.
    let prefixes = crate::pool::state::lock_placement(&shared).len();
    let mut models: Vec<&str> = snap.rules.model_names().collect();
    models.sort_unstable();
    let targets: serde_json::Map<String, serde_json::Value> = models
        .iter()
        .map(|m| {
            let t = snap.rules.targets_of(m).unwrap_or_default();
            (
                m.to_string(),
                t.into_iter()
                    .map(|(name, w)| serde_json::json!({"name": name, "weight": w}))
                    .collect(),
            )
        })
        .collect();
    axum::Json(
        serde_json::json!({"generation": snap.generation, "endpoints": endpoints, "models": models,
                           "targets": targets, "active_prefixes": prefixes,
                           "ready": shared.pool_synced.load(std::sync::atomic::Ordering::Acquire),
                           "leader": shared.is_leader.load(std::sync::atomic::Ordering::SeqCst)}),
    )
}

/// The memory budget: its size and what is charged to it.
async fn debug_memory(State(budget): State<Arc<MemoryBudget>>) -> impl IntoResponse {
    axum::Json(
        serde_json::json!({"budget_bytes": budget.limit(), "charged_bytes": budget.used(),
                                  "stream_cost": crate::memory::STREAM_COST, "held_cost": crate::memory::HELD_COST,
                                  "held_share": crate::memory::HELD_SHARE}),
    )
}

/// `?server=` on `/lora/v1/placement`.
#[derive(serde::Deserialize)]
struct ServerQuery {
    server: Option<String>,
}

/// Marks a request one replica made to another for a sidecar's set: answered from that
/// replica's own table, never passed on again (two followers misconfigured to follow each
/// other make no loop).
const PROXIED: &str = "x-inferlane-placement-proxied";

/// The placement table, or one server's part of it (what its sidecar loads). 503 until a
/// table exists, 404 for a server it does not name. A follower answers a server's part
/// from the decider's current table when it can reach it, else from its copy.
async fn placement(
    State(shared): State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
    axum::extract::Query(q): axum::extract::Query<ServerQuery>,
) -> axum::response::Response {
    if let (Some(up), Some(server)) = (shared.fleet.upstream.load_full(), &q.server)
        && !headers.contains_key(PROXIED)
        && let Some(set) = upstream_set(&up, server).await
    {
        return axum::Json(set).into_response();
    }
    let table = shared.fleet.table.load_full();
    let Some(routed) = table else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no placement yet: the EPP places adapters once --lora-catalog is read and every server's model list is known\n",
        )
            .into_response();
    };
    match q.server {
        None => axum::Json(&routed.table).into_response(),
        Some(s) => match routed.table.server_set(&s) {
            Some(set) => axum::Json(set).into_response(),
            None => (
                StatusCode::NOT_FOUND,
                format!("server {:?} is not in the placement table (give its pod name or ip:port; an unhealthy server is left out)\n", crate::pool::labels::for_log(&s)),
            )
                .into_response(),
        },
    }
}

/// `server`'s set from the replica this one follows (`None` if it cannot be had within a
/// second: the caller answers from its copy).
async fn upstream_set(
    up: &crate::lora_fleet::Upstream,
    server: &str,
) -> Option<crate::lora_fleet::wire::ServerSet> {
    static CLIENT: std::sync::LazyLock<reqwest::Client> = std::sync::LazyLock::new(|| {
        reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(1))
            .build()
            .unwrap_or_default()
    });
    let mut url = reqwest::Url::parse(&up.url).ok()?;
    url.query_pairs_mut().append_pair("server", server);
    let req = CLIENT.get(url).header(PROXIED, "1");
    let r = crate::net::bearer::send_ok(req, up.token_file.clone())
        .await
        .map_err(|e| tracing::debug!(error = %e, "sidecar's set not read from the decider; answering from this replica's copy"))
        .ok()?;
    crate::net::capped::json_capped(r, crate::lora_fleet::wire::MAX_SET_BYTES)
        .await
        .ok()
}

/// Largest demand post read (a count per catalogue adapter).
const MAX_DEMAND_POST: usize = 1 << 20;

/// A follower's demand: added to this replica's counts (catalogue adapters only; others are
/// dropped, so the counters never grow from what is posted).
async fn demand(
    State(shared): State<Arc<Shared>>,
    axum::Json(post): axum::Json<crate::lora_fleet::wire::DemandPost>,
) -> StatusCode {
    for c in &post.counts {
        shared.fleet.add(&c.id, c.requests, c.tokens);
    }
    super::link_reports::forwarded(&shared, post.links);
    StatusCode::NO_CONTENT
}

/// `/debug/*` without auth: loopback clients only (a port-forward or the pod itself).
async fn loopback_only(
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    req: Request,
    next: Next,
) -> axum::response::Response {
    if peer.ip().is_loopback() {
        return next.run(req).await;
    }
    (
        StatusCode::FORBIDDEN,
        "this path answers loopback clients only; use kubectl port-forward, or turn on --metrics-endpoint-auth (or --public-debug-endpoints for /debug/*)\n",
    )
        .into_response()
}

/// The pages' router; `auth` in front of all of them when given. Served with
/// `ConnectInfo<SocketAddr>` (the debug pages check the peer).
pub fn router(p: Pages, auth: Option<Arc<crate::net::metrics_auth::MetricsAuth>>) -> Router {
    let mut debug = Router::new()
        .route("/debug/pool", get(debug_pool))
        .route("/debug/placement", get(placement))
        .with_state(p.shared.clone())
        .merge(
            Router::new()
                .route("/debug/memory", get(debug_memory))
                .with_state(p.budget.clone()),
        );
    if !p.public_debug {
        debug = debug.layer(axum::middleware::from_fn(loopback_only));
    }
    // The sidecars read their part from other pods: behind auth when it is on, like /metrics.
    // Followers post their demand: it moves adapters, so without auth only from loopback.
    let mut demand_post = Router::new()
        .route("/lora/v1/demand", axum::routing::post(demand))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_DEMAND_POST))
        .with_state(p.shared.clone());
    if auth.is_none() {
        demand_post = demand_post.layer(axum::middleware::from_fn(loopback_only));
    }
    // Sidecars report their links from their own pods (checked without auth).
    let links_post = Router::new()
        .route(
            "/lora/v1/links",
            axum::routing::post(super::link_reports::links),
        )
        .layer(axum::extract::DefaultBodyLimit::max(
            super::link_reports::MAX_LINKS_POST,
        ))
        .with_state(super::link_reports::LinksState {
            shared: p.shared.clone(),
            peer_must_match: auth.is_none(),
        });
    let lora = Router::new()
        .route("/lora/v1/placement", get(placement))
        .with_state(p.shared.clone())
        .merge(demand_post)
        .merge(links_post);
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .with_state(p)
        .merge(lora)
        .merge(debug);
    match auth {
        Some(auth) => app.layer(axum::middleware::from_fn_with_state(
            auth,
            crate::net::metrics_auth::layer,
        )),
        None => app,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::extract::connect_info::MockConnectInfo;
    use tower::ServiceExt;

    async fn status(public_debug: bool, peer: &str, path: &str) -> StatusCode {
        let pages = Pages {
            metrics: EppMetrics::new(),
            shared: Arc::new(Shared::new(Default::default())),
            leader_election: false,
            budget: MemoryBudget::new(64 << 20),
            public_debug,
        };
        let peer: std::net::SocketAddr = peer.parse().unwrap();
        let app = router(pages, None).layer(MockConnectInfo(peer));
        let req = axum::http::Request::get(path).body(Body::empty()).unwrap();
        app.oneshot(req).await.unwrap().status()
    }

    /// A link report larger than any ConfigMap's names is refused before it is read.
    #[tokio::test]
    async fn an_oversized_link_report_is_refused() {
        let pages = Pages {
            metrics: EppMetrics::new(),
            shared: Arc::new(Shared::new(Default::default())),
            leader_election: false,
            budget: MemoryBudget::new(64 << 20),
            public_debug: false,
        };
        let peer: std::net::SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let app = router(pages, None).layer(MockConnectInfo(peer));
        let names = vec!["a@00000001"; 150_000];
        let body = serde_json::json!({"server": "s", "linked": names}).to_string();
        assert!(body.len() > super::super::link_reports::MAX_LINKS_POST);
        let req = axum::http::Request::post("/lora/v1/links")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        let code = app.oneshot(req).await.unwrap().status();
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    }

    /// Without auth the debug pages (pod names, addresses, weights) answer loopback only;
    /// /metrics answers everyone (Prometheus scrapes it from another pod).
    #[tokio::test]
    async fn debug_pages_answer_loopback_only_unless_made_public() {
        for path in ["/debug/pool", "/debug/memory"] {
            assert_eq!(status(false, "127.0.0.1:5000", path).await, StatusCode::OK);
            assert_eq!(status(false, "[::1]:5000", path).await, StatusCode::OK);
            assert_eq!(
                status(false, "10.1.2.3:5000", path).await,
                StatusCode::FORBIDDEN
            );
            assert_eq!(status(true, "10.1.2.3:5000", path).await, StatusCode::OK);
        }
        assert_eq!(
            status(false, "10.1.2.3:5000", "/metrics").await,
            StatusCode::OK
        );
    }
}
