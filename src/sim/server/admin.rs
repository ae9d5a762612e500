//! The routes around generation: runtime LoRA loads and unloads, and the `/sim/*` fault injection, restart and stats (not part of vLLM's API).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::sim::engine_actor::{AdapterLoaded, AdapterReading, AdapterUnloaded, Restart};
use crate::sim::lora::{LoadRequest, UnloadRequest};

#[derive(Debug, Deserialize)]
pub(super) struct FaultUpdate {
    pub(super) failure_rate: Option<f64>,
    pub(super) unhealthy: Option<bool>,
    pub(super) drop_connections: Option<bool>,
    pub(super) stall: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RestartRequest {
    /// While down, connections are dropped and /health fails.
    #[serde(default)]
    pub(super) downtime_ms: u64,
}

/// Counts concurrent calls to the admin routes (health, models, load, unload).
pub(super) async fn admin_layer(
    State(state): State<Arc<SimState>>,
    req: Request,
    next: Next,
) -> Response {
    let a = &state.admin;
    let now = a.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    a.max_in_flight.fetch_max(now, Ordering::SeqCst);
    a.calls.fetch_add(1, Ordering::Relaxed);
    let resp = next.run(req).await;
    a.in_flight.fetch_sub(1, Ordering::SeqCst);
    resp
}

pub(super) async fn stats(State(state): State<Arc<SimState>>) -> Json<Value> {
    let a = &state.admin;
    let (disk_loads, swaps) = state.metrics.lock().expect("metrics lock").lora_counts();
    Json(json!({
        "admin_calls": a.calls.load(Ordering::Relaxed),
        "admin_max_in_flight": a.max_in_flight.load(Ordering::SeqCst),
        "load_attempts": *a.load_attempts.lock().expect("stats lock"),
        "requests_by_model": *a.requests_by_model.lock().expect("stats lock"),
        "adapters": state.registry.lock().expect("registry lock").adapters().len(),
        "lora_disk_loads": disk_loads,
        "lora_swaps": swaps,
        "metrics_whole": a.metrics_whole.load(Ordering::Relaxed),
        "metrics_filtered": a.metrics_filtered.load(Ordering::Relaxed),
    }))
}

pub(super) async fn faults_layer(
    State(state): State<Arc<SimState>>,
    req: Request,
    next: Next,
) -> Response {
    if state.faults.drop_connections.load(Ordering::Relaxed) {
        return dropped_connection();
    }
    let mut stall = state.faults.stall.subscribe();
    // Hold the request while stalled; the sender lives as long as the state.
    let _ = stall.wait_for(|s| !*s).await;
    next.run(req).await
}

/// Accepts connections, dropping them at once while `drop_connections` is on.
pub(super) struct FaultyListener {
    pub(super) inner: TcpListener,
    pub(super) state: Arc<SimState>,
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

pub(super) async fn load_adapter(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
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
    // A load reads the adapter from disk: at least the rank-scaled read the engine would pay.
    let read_ms = state.args.lora_disk_ms_per_rank.max(0.0)
        * f64::from(adapter_rank(&req).unwrap_or(8))
        * state.args.time_scale.max(0.0);
    // The read queues behind the engine's other reads: the answer comes when it is done.
    let read_ms = if read_ms > 0.0 {
        let secs = read_ms / 1000.0;
        let until = state.engine.send(AdapterReading { secs }).await;
        until.unwrap_or(secs) * 1000.0
    } else {
        0.0
    };
    let wait_ms = (state.args.lora_load_latency_ms as f64).max(read_ms);
    if wait_ms > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(wait_ms / 1000.0)).await;
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
            let rank = state
                .registry
                .lock()
                .expect("registry lock")
                .get(&name)
                .and_then(|a| a.rank);
            // Answered once the engine has it: a metrics read after the answer shows it.
            let _ = state.engine.send(AdapterLoaded { name, rank }).await;
            plain_text(msg)
        }
        Err(e) => error_response(&e),
    }
}

/// The rank in the adapter's `adapter_config.json`, when it can be read.
fn adapter_rank(req: &LoadRequest) -> Option<u32> {
    let path = std::path::Path::new(req.lora_path.as_deref()?).join("adapter_config.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v.get("r")?.as_u64().and_then(|r| u32::try_from(r).ok())
}

pub(super) async fn unload_adapter(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    if !state.args.allow_runtime_lora_updating {
        return fastapi_not_found();
    }
    let req: UnloadRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    let name = req.lora_name.clone().unwrap_or_default();
    let res = state.registry.lock().expect("registry lock").unload(req);
    match res {
        Ok(msg) => {
            let _ = state.engine.send(AdapterUnloaded { name }).await;
            plain_text(msg)
        }
        Err(e) => error_response(&e),
    }
}

pub(super) async fn get_faults(State(state): State<Arc<SimState>>) -> Json<Value> {
    Json(state.faults.snapshot())
}

pub(super) async fn set_faults(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
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
pub(super) async fn restart(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
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

use super::state::*;
