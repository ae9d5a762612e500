//! HTTP surface of vllm-sim: vLLM's routes and wire formats, plus a `/sim/*` fault-injection API.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::Addr;
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::{Value, json};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::SimArgs;
use super::engine::{Engine, EngineEvent, EngineRequest, block_hashes};
use super::lora::{LoadRequest, LoraRegistry, UnloadRequest};
use super::metrics::{self, MetricsConfig, SimMetrics};
use super::openai::{self, Api, ApiError, ResponseMeta};
use crate::sim::engine_actor::{Abort, EngineActor, Restart, Submit};

/// Errors that stop the simulator from starting.
#[derive(Debug, Error)]
pub enum SimError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    LoraModule(String),
    #[error("--lora-modules {name}: {message} (status {status})")]
    Preload {
        name: String,
        status: u16,
        message: String,
    },
    #[error("server error: {0}")]
    Serve(#[source] std::io::Error),
}

/// Faults switched on through the `/sim/faults` API or flags.
#[derive(Debug)]
pub struct Faults {
    failure_rate_ppm: AtomicU64,
    unhealthy: AtomicBool,
    drop_connections: AtomicBool,
    stall: watch::Sender<bool>,
}

impl Faults {
    fn new(failure_rate: f64) -> Self {
        Self {
            failure_rate_ppm: AtomicU64::new((failure_rate.clamp(0.0, 1.0) * 1e6) as u64),
            unhealthy: AtomicBool::new(false),
            drop_connections: AtomicBool::new(false),
            stall: watch::channel(false).0,
        }
    }

    fn snapshot(&self) -> Value {
        json!({
            "failure_rate": self.failure_rate_ppm.load(Ordering::Relaxed) as f64 / 1e6,
            "unhealthy": self.unhealthy.load(Ordering::Relaxed),
            "drop_connections": self.drop_connections.load(Ordering::Relaxed),
            "stall": *self.stall.borrow(),
        })
    }
}

#[derive(Debug, Deserialize)]
struct FaultUpdate {
    failure_rate: Option<f64>,
    unhealthy: Option<bool>,
    drop_connections: Option<bool>,
    stall: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
struct RestartRequest {
    /// While down, connections are dropped and /health fails.
    #[serde(default)]
    downtime_ms: u64,
}

/// Counters of the LoRA admin surface, for tests that check what a client did.
#[derive(Debug, Default)]
struct AdminStats {
    in_flight: std::sync::atomic::AtomicUsize,
    max_in_flight: std::sync::atomic::AtomicUsize,
    calls: AtomicU64,
    /// Generation requests accepted, per model name.
    requests_by_model: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Unix milliseconds of every load attempt, per adapter name.
    load_attempts: Mutex<std::collections::BTreeMap<String, Vec<u64>>>,
    /// `/metrics` answers: whole pages and `name[]`-filtered ones.
    metrics_whole: AtomicU64,
    metrics_filtered: AtomicU64,
}

struct SimState {
    args: SimArgs,
    admin: AdminStats,
    base_names: Vec<String>,
    registry: Mutex<LoraRegistry>,
    preloaded: Vec<(String, String)>,
    engine: Addr<EngineActor>,
    metrics: Arc<Mutex<SimMetrics>>,
    faults: Faults,
    next_id: AtomicU64,
    rng: Mutex<SmallRng>,
    created: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A running simulator.
#[derive(Debug, Clone)]
pub struct SimHandle {
    pub addr: SocketAddr,
}

/// Binds, starts the engine actor (on the current actix arbiter) and serves until the process
/// ends. Must be called inside an actix `System`.
pub async fn start(args: SimArgs) -> Result<SimHandle, SimError> {
    let addr = format!("{}:{}", args.host, args.port);
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| SimError::Bind { addr, source })?;
    start_on(args, listener).await
}

/// Like [`start`], on an already bound listener.
pub async fn start_on(args: SimArgs, listener: TcpListener) -> Result<SimHandle, SimError> {
    let local = listener.local_addr().map_err(SimError::Serve)?;
    let state = Arc::new(build_state(args)?);
    let app = router(state.clone());
    let listener = FaultyListener {
        inner: listener,
        state,
    };
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "vllm-sim server stopped");
        }
    });
    Ok(SimHandle { addr: local })
}

fn build_state(args: SimArgs) -> Result<SimState, SimError> {
    let base_names = args.base_names();
    let mut registry = LoraRegistry::new(args.max_lora_rank);
    registry.ignore_load_inplace = args.ignore_load_inplace;
    let mut preloaded = Vec::new();
    for m in &args.lora_modules {
        let (name, path) = super::parse_lora_module(m).map_err(SimError::LoraModule)?;
        registry
            .load(
                LoadRequest {
                    lora_name: Some(name.clone()),
                    lora_path: Some(path.clone()),
                    load_inplace: false,
                },
                &base_names,
                unix_now(),
            )
            .map_err(|e| SimError::Preload {
                name: name.clone(),
                status: e.status,
                message: e.message,
            })?;
        preloaded.push((name, path));
    }
    let params = args.engine_params();
    let metrics_cfg = MetricsConfig {
        model_name: base_names[0].clone(),
        block_size: params.block_size,
        num_gpu_blocks: params.num_gpu_blocks,
        max_loras: params.max_loras,
        enable_lora: args.enable_lora,
        start_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64(),
    };
    let metrics = Arc::new(Mutex::new(SimMetrics::new(metrics_cfg.clone())));
    let engine = actix::Actor::start(EngineActor::new(
        Engine::new(params),
        metrics.clone(),
        metrics_cfg,
        args.lora_info_style,
    ));
    Ok(SimState {
        admin: AdminStats::default(),
        faults: Faults::new(args.failure_rate),
        rng: Mutex::new(SmallRng::seed_from_u64(args.seed)),
        base_names,
        registry: Mutex::new(registry),
        preloaded,
        engine,
        metrics,
        next_id: AtomicU64::new(1),
        created: unix_now(),
        args,
    })
}

fn router(state: Arc<SimState>) -> Router {
    let admin = Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .layer(middleware::from_fn_with_state(state.clone(), admin_layer));
    let api = Router::new()
        .merge(admin)
        .route("/version", get(version))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/metrics", get(metrics_page))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), faults_layer))
        // vLLM (uvicorn) sets no body limit; axum's default of 2 MB would answer 413 where
        // vLLM answers a context-length 400.
        .layer(axum::extract::DefaultBodyLimit::max(256 * 1024 * 1024));
    Router::new()
        .route("/sim/faults", get(get_faults).post(set_faults))
        .route("/sim/restart", post(restart))
        .route("/sim/stats", get(stats))
        .merge(api)
        .with_state(state)
}

/// Counts concurrent calls to the admin routes (health, models, load, unload).
async fn admin_layer(State(state): State<Arc<SimState>>, req: Request, next: Next) -> Response {
    let a = &state.admin;
    let now = a.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    a.max_in_flight.fetch_max(now, Ordering::SeqCst);
    a.calls.fetch_add(1, Ordering::Relaxed);
    let resp = next.run(req).await;
    a.in_flight.fetch_sub(1, Ordering::SeqCst);
    resp
}

async fn stats(State(state): State<Arc<SimState>>) -> Json<Value> {
    let a = &state.admin;
    Json(json!({
        "admin_calls": a.calls.load(Ordering::Relaxed),
        "admin_max_in_flight": a.max_in_flight.load(Ordering::SeqCst),
        "load_attempts": *a.load_attempts.lock().expect("stats lock"),
        "requests_by_model": *a.requests_by_model.lock().expect("stats lock"),
        "adapters": state.registry.lock().expect("registry lock").adapters().len(),
        "metrics_whole": a.metrics_whole.load(Ordering::Relaxed),
        "metrics_filtered": a.metrics_filtered.load(Ordering::Relaxed),
    }))
}

/// A body that fails at once, so hyper aborts the connection mid-response.
fn dropped_connection() -> Response {
    let stream = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("simulated connection drop"))
    });
    Response::new(Body::from_stream(stream))
}

async fn faults_layer(State(state): State<Arc<SimState>>, req: Request, next: Next) -> Response {
    if state.faults.drop_connections.load(Ordering::Relaxed) {
        return dropped_connection();
    }
    let mut stall = state.faults.stall.subscribe();
    // Hold the request while stalled; the sender lives as long as the state.
    let _ = stall.wait_for(|s| !*s).await;
    next.run(req).await
}

/// Accepts connections, dropping them at once while `drop_connections` is on.
struct FaultyListener {
    inner: TcpListener,
    state: Arc<SimState>,
}

impl axum::serve::Listener for FaultyListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            if !self.state.faults.drop_connections.load(Ordering::Relaxed) {
                return (io, addr);
            }
            drop(io);
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn error_response(e: &ApiError) -> Response {
    (
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json")],
        e.body(),
    )
        .into_response()
}

/// FastAPI's answer for a route that does not exist.
fn fastapi_not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"detail":"Not Found"}"#,
    )
        .into_response()
}

/// vLLM answers plain-text successes with no content type.
fn plain_text(body: String) -> Response {
    let mut r = Response::new(Body::from(body));
    r.headers_mut().remove(header::CONTENT_TYPE);
    r
}

async fn not_found() -> Response {
    fastapi_not_found()
}

async fn health(State(state): State<Arc<SimState>>) -> Response {
    if state.faults.unhealthy.load(Ordering::Relaxed) {
        StatusCode::SERVICE_UNAVAILABLE.into_response()
    } else {
        StatusCode::OK.into_response()
    }
}

async fn version() -> Json<Value> {
    Json(json!({"version": "0.32.0"}))
}

fn permission(created: u64, salt: u64) -> Value {
    json!([{
        "id": format!("modelperm-{:032x}", u128::from(salt).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)),
        "object": "model_permission", "created": created, "allow_create_engine": false,
        "allow_sampling": true, "allow_logprobs": true, "allow_search_indices": false,
        "allow_view": true, "allow_fine_tuning": false, "organization": "*", "group": null,
        "is_blocking": false,
    }])
}

async fn models(State(state): State<Arc<SimState>>) -> Json<Value> {
    let mut data = Vec::new();
    for (i, name) in state.base_names.iter().enumerate() {
        data.push(json!({
            "id": name, "object": "model", "created": state.created, "owned_by": "vllm",
            "root": state.args.model, "parent": null, "max_model_len": state.args.max_model_len,
            "permission": permission(state.created, i as u64),
        }));
    }
    let registry = state.registry.lock().expect("registry lock");
    for a in registry.adapters() {
        data.push(json!({
            "id": a.name, "object": "model", "created": a.created, "owned_by": "vllm",
            "root": a.path, "parent": state.base_names[0], "max_model_len": null,
            "permission": permission(a.created, 1000 + a.int_id),
        }));
    }
    Json(json!({"object": "list", "data": data}))
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("JSON decode error: {e}")))
}

async fn load_adapter(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    if !state.args.allow_runtime_lora_updating {
        return fastapi_not_found();
    }
    let req: LoadRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    let name = req.lora_name.clone().unwrap_or_default();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    state
        .admin
        .load_attempts
        .lock()
        .expect("stats lock")
        .entry(name.clone())
        .or_default()
        .push(now_ms);
    if state.args.lora_load_latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(state.args.lora_load_latency_ms)).await;
    }
    let res =
        state
            .registry
            .lock()
            .expect("registry lock")
            .load(req, &state.base_names, unix_now());
    match res {
        Ok(msg) => {
            tracing::info!(adapter = %name, "loaded LoRA adapter");
            plain_text(msg)
        }
        Err(e) => error_response(&e),
    }
}

async fn unload_adapter(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    if !state.args.allow_runtime_lora_updating {
        return fastapi_not_found();
    }
    let req: UnloadRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    let res = state.registry.lock().expect("registry lock").unload(req);
    match res {
        Ok(msg) => plain_text(msg),
        Err(e) => error_response(&e),
    }
}

/// `/metrics`, honouring prometheus_client's `name[]` filter as vLLM does.
async fn metrics_page(
    State(state): State<Arc<SimState>>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let names: Vec<String> = params
        .into_iter()
        .filter(|(k, _)| k == "name[]")
        .map(|(_, v)| v)
        .collect();
    let counter = match names.is_empty() {
        true => &state.admin.metrics_whole,
        false => &state.admin.metrics_filtered,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let filter = match (names.is_empty(), state.args.api_server_count > 1) {
        (true, _) => None,
        // The multiprocess collector registers no names, so a filtered scrape finds nothing.
        (false, true) => Some(&[][..]),
        (false, false) => Some(&names[..]),
    };
    let page = state
        .metrics
        .lock()
        .expect("metrics lock")
        .render_filtered(filter);
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], page).into_response()
}

async fn completions(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    generate(state, Api::Completions, body).await
}

async fn chat(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    generate(state, Api::Chat, body).await
}

/// Sends `Abort` when a request is dropped before it finished (client disconnected).
struct AbortGuard {
    engine: Addr<EngineActor>,
    id: u64,
    done: bool,
}

impl AbortGuard {
    /// The request ended on its own; nothing to abort.
    fn disarm(&mut self) {
        self.done = true;
    }
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.done {
            self.engine.do_send(Abort { id: self.id });
        }
    }
}

async fn generate(state: Arc<SimState>, api: Api, body: Bytes) -> Response {
    let req = match openai::parse_request(api, &body) {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    let model = req
        .model
        .clone()
        .unwrap_or_else(|| state.base_names[0].clone());
    let adapter = if state.base_names.contains(&model) {
        None
    } else if state
        .registry
        .lock()
        .expect("registry lock")
        .get(&model)
        .is_some()
    {
        Some(model.clone())
    } else {
        return error_response(&ApiError::model_not_found(&model));
    };
    let fail_ppm = state.faults.failure_rate_ppm.load(Ordering::Relaxed);
    if fail_ppm > 0 && state.rng.lock().expect("rng").random_range(0..1_000_000) < fail_ppm {
        return error_response(&ApiError::internal(
            "Simulated failure (vllm-sim --failure-rate).",
        ));
    }
    if req.priority != 0 && state.args.scheduling_policy != super::SchedulingPolicy::Priority {
        return error_response(&ApiError::bad_request(format!(
            "Got priority {} but Priority scheduling is not enabled.",
            req.priority
        )));
    }
    let prompt_tokens = openai::count_tokens(&req.prompt);
    let max_tokens = req.max_tokens.unwrap_or(state.args.default_max_tokens);
    if u64::from(prompt_tokens) + u64::from(max_tokens) > u64::from(state.args.max_model_len) {
        return error_response(&ApiError::bad_request(format!(
            "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the messages, {} in the completion). Please reduce the length of the messages or completion.",
            state.args.max_model_len,
            u64::from(prompt_tokens) + u64::from(max_tokens),
            prompt_tokens,
            max_tokens
        )));
    }
    *state
        .admin
        .requests_by_model
        .lock()
        .expect("stats lock")
        .entry(model.clone())
        .or_default() += 1;
    let kv_tokens = u64::from(state.args.num_gpu_blocks) * u64::from(state.args.block_size);
    if u64::from(prompt_tokens) + u64::from(max_tokens) > kv_tokens {
        // It could never be scheduled; a real vLLM refuses to start with such a max_model_len.
        return error_response(&ApiError::bad_request(format!(
            "The request needs {} tokens of KV cache but the server has {kv_tokens} (--num-gpu-blocks x --block-size).",
            u64::from(prompt_tokens) + u64::from(max_tokens)
        )));
    }
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let seed = state.args.seed.wrapping_mul(1_000_003).wrapping_add(id);
    let block_chars = (state.args.block_size.max(1) * 4) as usize;
    let prompt_blocks = block_hashes(
        adapter.as_deref().unwrap_or(&state.base_names[0]),
        &req.prompt,
        block_chars,
    );
    let engine_req = EngineRequest {
        id,
        adapter,
        prompt_tokens,
        prompt_blocks,
        max_tokens,
        arrival: 0.0,
        priority: req.priority,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    state.engine.do_send(Submit {
        req: engine_req,
        events: tx,
    });
    let mut guard = AbortGuard {
        engine: state.engine.clone(),
        id,
        done: false,
    };
    let prefix = match api {
        Api::Completions => "cmpl",
        Api::Chat => "chatcmpl",
    };
    let meta = ResponseMeta {
        id: format!(
            "{prefix}-{:016x}{:016x}",
            seed,
            id.wrapping_mul(0x2545_f491_4f6c_dd1d)
        ),
        created: unix_now(),
        model,
    };
    let details = state.args.enable_prompt_tokens_details;

    if !req.stream {
        let mut text = String::new();
        let mut generated = 0u32;
        let mut cached = 0u32;
        while let Some(ev) = rx.recv().await {
            match ev {
                EngineEvent::FirstToken { cached_tokens, .. } => {
                    cached = cached_tokens;
                    text.push_str(&openai::token_text(seed, generated));
                    generated += 1;
                }
                EngineEvent::Token { .. } => {
                    text.push_str(&openai::token_text(seed, generated));
                    generated += 1;
                }
                EngineEvent::Finished { .. } => {
                    guard.disarm();
                    let usage = openai::usage(prompt_tokens, generated, details.then_some(cached));
                    return Json(openai::full_response(api, &meta, &text, usage)).into_response();
                }
            }
        }
        // The engine restarted under us: a real vLLM process would have died mid-request.
        guard.disarm();
        return dropped_connection();
    }

    let (out_tx, out_rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let include_usage = req.include_usage;
    tokio::spawn(async move {
        let sse = |v: Value| Ok(Bytes::from(format!("data: {v}\n\n")));
        let mut generated = 0u32;
        let mut cached = 0u32;
        let mut pending: Option<String> = None;
        while let Some(ev) = rx.recv().await {
            let (token, finished) = match ev {
                EngineEvent::FirstToken { cached_tokens, .. } => {
                    cached = cached_tokens;
                    if api == Api::Chat
                        && out_tx
                            .send(sse(openai::stream_chunk(api, &meta, "", true, false)))
                            .await
                            .is_err()
                    {
                        return;
                    }
                    (Some(openai::token_text(seed, 0)), false)
                }
                EngineEvent::Token { .. } => (Some(openai::token_text(seed, generated)), false),
                EngineEvent::Finished { .. } => (None, true),
            };
            if let Some(t) = token {
                generated += 1;
                // Hold one token back so the last one can carry finish_reason, as vLLM does.
                if let Some(prev) = pending.replace(t)
                    && out_tx
                        .send(sse(openai::stream_chunk(api, &meta, &prev, false, false)))
                        .await
                        .is_err()
                {
                    return;
                }
            }
            if finished {
                guard.disarm();
                let last = pending.take().unwrap_or_default();
                let mut chunks = vec![openai::stream_chunk(api, &meta, &last, false, true)];
                if include_usage {
                    let usage = openai::usage(prompt_tokens, generated, details.then_some(cached));
                    chunks.push(openai::usage_chunk(api, &meta, usage));
                }
                for c in chunks {
                    if out_tx.send(sse(c)).await.is_err() {
                        return;
                    }
                }
                let _ = out_tx
                    .send(Ok(Bytes::from_static(b"data: [DONE]\n\n")))
                    .await;
                return;
            }
        }
        guard.disarm();
        let _ = out_tx
            .send(Err(std::io::Error::other("engine restarted")))
            .await;
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .body(Body::from_stream(ReceiverStream::new(out_rx)))
        .expect("static response parts")
}

async fn get_faults(State(state): State<Arc<SimState>>) -> Json<Value> {
    Json(state.faults.snapshot())
}

async fn set_faults(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let upd: FaultUpdate = match parse_json(&body) {
        Ok(u) => u,
        Err(e) => return error_response(&e),
    };
    let f = &state.faults;
    if let Some(r) = upd.failure_rate {
        f.failure_rate_ppm
            .store((r.clamp(0.0, 1.0) * 1e6) as u64, Ordering::Relaxed);
    }
    if let Some(u) = upd.unhealthy {
        f.unhealthy.store(u, Ordering::Relaxed);
    }
    if let Some(d) = upd.drop_connections {
        f.drop_connections.store(d, Ordering::Relaxed);
    }
    if let Some(s) = upd.stall {
        f.stall.send_replace(s);
    }
    tracing::info!(faults = %f.snapshot(), "fault injection updated");
    Json(f.snapshot()).into_response()
}

/// Simulates a process restart: adapters loaded at runtime are forgotten (those from
/// `--lora-modules` come back, as they would at a real start), queues and metrics reset.
async fn restart(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let req: RestartRequest = if body.is_empty() {
        RestartRequest::default()
    } else {
        match parse_json(&body) {
            Ok(r) => r,
            Err(e) => return error_response(&e),
        }
    };
    {
        let mut reg = state.registry.lock().expect("registry lock");
        reg.clear();
        for (name, path) in &state.preloaded {
            let _ = reg.load(
                LoadRequest {
                    lora_name: Some(name.clone()),
                    lora_path: Some(path.clone()),
                    load_inplace: false,
                },
                &state.base_names,
                unix_now(),
            );
        }
    }
    state.engine.do_send(Restart);
    if req.downtime_ms > 0 {
        state.faults.drop_connections.store(true, Ordering::Relaxed);
        let st = state.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(req.downtime_ms)).await;
            st.faults.drop_connections.store(false, Ordering::Relaxed);
        });
    }
    tracing::warn!(
        downtime_ms = req.downtime_ms,
        "simulated restart: runtime adapters forgotten"
    );
    Json(json!({"restarted": true, "downtime_ms": req.downtime_ms})).into_response()
}
