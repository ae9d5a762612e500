//! What every route of vllm-sim shares: the server state, its faults and admin counters, and vLLM's error and plain-text answers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use actix::Addr;
use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use rand::rngs::SmallRng;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::sim::SimArgs;
use crate::sim::engine_actor::EngineActor;
use crate::sim::lora::LoraRegistry;
use crate::sim::metrics::SimMetrics;
use crate::sim::openai::ApiError;

/// Faults switched on through the `/sim/faults` API or flags.
#[derive(Debug)]
pub struct Faults {
    pub(super) failure_rate_ppm: AtomicU64,
    pub(super) unhealthy: AtomicBool,
    pub(super) drop_connections: AtomicBool,
    pub(super) stall: watch::Sender<bool>,
}

impl Faults {
    pub(super) fn new(failure_rate: f64) -> Self {
        Self {
            failure_rate_ppm: AtomicU64::new((failure_rate.clamp(0.0, 1.0) * 1e6) as u64),
            unhealthy: AtomicBool::new(false),
            drop_connections: AtomicBool::new(false),
            stall: watch::channel(false).0,
        }
    }

    pub(super) fn snapshot(&self) -> Value {
        json!({
            "failure_rate": self.failure_rate_ppm.load(Ordering::Relaxed) as f64 / 1e6,
            "unhealthy": self.unhealthy.load(Ordering::Relaxed),
            "drop_connections": self.drop_connections.load(Ordering::Relaxed),
            "stall": *self.stall.borrow(),
        })
    }
}

/// Counters of the LoRA admin surface, for tests that check what a client did.
#[derive(Debug, Default)]
pub(super) struct AdminStats {
    pub(super) in_flight: std::sync::atomic::AtomicUsize,
    pub(super) max_in_flight: std::sync::atomic::AtomicUsize,
    pub(super) calls: AtomicU64,
    /// Generation requests accepted, per model name.
    pub(super) requests_by_model: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Unix milliseconds of every load attempt, per adapter name.
    pub(super) load_attempts: Mutex<std::collections::BTreeMap<String, Vec<u64>>>,
    /// `/metrics` answers: whole pages and `name[]`-filtered ones.
    pub(super) metrics_whole: AtomicU64,
    pub(super) metrics_filtered: AtomicU64,
}

pub(super) struct SimState {
    pub(super) args: SimArgs,
    pub(super) admin: AdminStats,
    pub(super) base_names: Vec<String>,
    pub(super) registry: Mutex<LoraRegistry>,
    pub(super) preloaded: Vec<(String, String)>,
    pub(super) engine: Addr<EngineActor>,
    pub(super) metrics: Arc<Mutex<SimMetrics>>,
    pub(super) faults: Faults,
    pub(super) next_id: AtomicU64,
    pub(super) rng: Mutex<SmallRng>,
    pub(super) created: u64,
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

pub(super) fn error_response(e: &ApiError) -> Response {
    (
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json")],
        e.body(),
    )
        .into_response()
}

/// FastAPI's answer for a route that does not exist.
pub(super) fn fastapi_not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"detail":"Not Found"}"#,
    )
        .into_response()
}

/// vLLM answers plain-text successes with no content type.
pub(super) fn plain_text(body: String) -> Response {
    let mut r = Response::new(Body::from(body));
    r.headers_mut().remove(header::CONTENT_TYPE);
    r
}

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("JSON decode error: {e}")))
}

/// A body that fails at once, so hyper aborts the connection mid-response.
pub(super) fn dropped_connection() -> Response {
    let stream = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("simulated connection drop"))
    });
    Response::new(Body::from_stream(stream))
}
