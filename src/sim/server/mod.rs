//! HTTP surface of vllm-sim: vLLM's routes and wire formats, plus a `/sim/*` fault-injection API.

mod admin;
mod generate;
mod state;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde_json::{Value, json};
use thiserror::Error;
use tokio::net::TcpListener;

use crate::sim::SimArgs;
use crate::sim::engine::Engine;
use crate::sim::engine_actor::EngineActor;
use crate::sim::lora::{LoadRequest, LoraRegistry};
use crate::sim::metrics::{self, MetricsConfig, SimMetrics};
use admin::*;
use generate::*;
use state::*;

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
    #[error("--max-cpu-loras ({cpu}) must be >= --max-loras ({gpu}), as vLLM requires")]
    CpuLoras { cpu: usize, gpu: usize },
    #[error("--lora-modules {name}: {message} (status {status})")]
    Preload {
        name: String,
        status: u16,
        message: String,
    },
    #[error("server error: {0}")]
    Serve(#[source] std::io::Error),
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
    if let Some(cpu) = args.max_cpu_loras
        && cpu < args.max_loras
    {
        return Err(SimError::CpuLoras {
            cpu,
            gpu: args.max_loras,
        });
    }
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
        residency_metrics: args.lora_residency_metrics,
        start_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64(),
    };
    let metrics = Arc::new(Mutex::new(SimMetrics::new(metrics_cfg.clone())));
    let mut engine = Engine::new(params);
    for a in registry.adapters() {
        engine.adapter_loaded(&a.name, a.rank);
    }
    let engine = actix::Actor::start(EngineActor::new(
        engine,
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
