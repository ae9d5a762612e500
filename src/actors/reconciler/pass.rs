//! One reconcile pass against vLLM: wait for health, list the adapters once, apply the plan with bounded concurrency, confirm in-place reloads.

use std::time::Duration;

use futures::StreamExt;
use inferlane_sidecar::models::parse_models;
use inferlane_sidecar::{
    Actual, AdapterOp, LoraConfig, Outcome, classify_load, classify_unload, plan,
};
use serde_json::json;
use thiserror::Error;

/// Reconciler settings (flags).
#[derive(Debug, Clone)]
pub struct ReconcilerOptions {
    pub health_check_timeout: Duration,
    pub health_check_interval: Duration,
    pub resync_interval: Duration,
    pub http_timeout: Duration,
    pub max_concurrent_ops: usize,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Which adapter sources may be handed to vLLM (`--allowed-source`).
    pub allowed_sources: inferlane_sidecar::SourcePolicy,
}

/// Why a reconcile pass could not finish.
#[derive(Debug, Error)]
pub enum ReconcileError {
    #[error("vLLM at {url} not healthy after {waited:?}: {last}")]
    NotHealthy {
        url: String,
        waited: Duration,
        last: String,
    },
    #[error("listing adapters at {url}: {message}")]
    List { url: String, message: String },
}

/// Result of one pass, computed off the actor and applied back on it.
pub(super) struct PassReport {
    pub(super) results: Vec<(AdapterOp, Outcome)>,
    /// Seconds each of `results` took (same order).
    pub(super) durations: Vec<f64>,
    pub(super) actual_after: Actual,
    pub(super) deferred: Vec<String>,
}

/// One pass: wait for health, list once, apply the plan with bounded concurrency, confirm
/// in-place reloads.
pub(super) async fn run_pass(
    client: &reqwest::Client,
    opts: &ReconcilerOptions,
    config: &LoraConfig,
    deferred: Vec<String>,
) -> Result<PassReport, ReconcileError> {
    let base = config.base_url();
    wait_healthy(client, opts, &base).await?;
    let actual = list_models(client, &base).await?;
    // One plan and set lookups: with thousands of backed-off adapters a pass stays linear
    // (a plan per deferred adapter made it quadratic: ~0.7 core at 3,000 failing adapters).
    let planned = plan(config, &actual);
    let waiting: std::collections::HashSet<&str> = deferred.iter().map(String::as_str).collect();
    let still_planned: std::collections::HashSet<&str> =
        planned.iter().map(AdapterOp::id).collect();
    let deferred: Vec<String> = deferred
        .iter()
        .filter(|d| still_planned.contains(d.as_str()))
        .cloned()
        .collect();
    let ops: Vec<AdapterOp> = planned
        .into_iter()
        .filter(|op| !waiting.contains(op.id()))
        .collect();
    if ops.is_empty() {
        tracing::debug!(adapters = actual.adapters.len(), "in sync");
        return Ok(PassReport {
            results: Vec::new(),
            durations: Vec::new(),
            actual_after: actual,
            deferred,
        });
    }
    let timed: Vec<((AdapterOp, Outcome), f64)> =
        futures::stream::iter(ops.into_iter().map(|op| {
            let client = client.clone();
            let base = base.clone();
            async move {
                // A source vLLM must not be asked to fetch never reaches it.
                if let AdapterOp::Load { source, .. } = &op
                    && let Err(e) = opts.allowed_sources.check(source)
                {
                    let outcome = Outcome::AdapterFailed {
                        status: 403,
                        message: e.to_string(),
                    };
                    return ((op, outcome), 0.0);
                }
                let started = std::time::Instant::now();
                let outcome = execute(&client, &base, &op).await;
                ((op, outcome), started.elapsed().as_secs_f64())
            }
        }))
        .buffer_unordered(opts.max_concurrent_ops.max(1))
        .collect()
        .await;
    let (results, durations): (Vec<(AdapterOp, Outcome)>, Vec<f64>) = timed.into_iter().unzip();
    let mut actual_after = actual.clone();
    let mut results = results;
    for (op, outcome) in &results {
        if matches!(outcome, Outcome::Done | Outcome::AlreadySo) {
            actual_after = inferlane_sidecar::plan::apply(&actual_after, std::slice::from_ref(op));
        }
    }
    // An in-place reload is only trusted once the server reports the new root: a server
    // without in-place reloads (vLLM before `load_inplace`) answers "already loaded" and
    // keeps serving the old weights.
    let inplace_answered = |o: &Outcome| matches!(o, Outcome::Done | Outcome::AlreadySo);
    let reloaded = results
        .iter()
        .any(|(op, o)| matches!(op, AdapterOp::Load { inplace: true, .. }) && inplace_answered(o));
    if reloaded {
        let confirmed = list_models(client, &base).await?;
        for (op, outcome) in results.iter_mut() {
            if let AdapterOp::Load {
                id,
                source,
                inplace: true,
            } = op
                && inplace_answered(outcome)
            {
                let root = confirmed
                    .adapters
                    .get(id.as_str())
                    .cloned()
                    .unwrap_or_default();
                if root != *source {
                    let message = if *outcome == Outcome::AlreadySo {
                        format!(
                            "the server does not reload adapters in place (vLLM before load_inplace?): it still serves {root:?}, not {source:?}; move the adapter to ensureNotExist and back, or give it a new id"
                        )
                    } else {
                        format!(
                            "reloaded in place but the server reports root {root:?}, not {source:?}"
                        )
                    };
                    *outcome = Outcome::AdapterFailed {
                        status: 200,
                        message,
                    };
                }
            }
        }
        actual_after = confirmed;
    }
    Ok(PassReport {
        results,
        durations,
        actual_after,
        deferred,
    })
}

async fn wait_healthy(
    client: &reqwest::Client,
    opts: &ReconcilerOptions,
    base: &str,
) -> Result<(), ReconcileError> {
    let url = format!("{base}/health");
    let start = tokio::time::Instant::now();
    let mut logged = false;
    // Probe soon and often: a restarted vLLM gets its adapters back within ~200 ms of turning
    // healthy (at most 5 probes a second while it is down: /health is trivial for it), and
    // --health-check-interval stays the longest pause between probes (upstream's meaning).
    let cap = HEALTH_MAX_PROBE_GAP.min(opts.health_check_interval);
    let mut pause = HEALTH_FIRST_PROBE.min(cap);
    loop {
        let last = match client.get(&url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => format!("status {}", r.status()),
            Err(e) => format!("{e}"),
        };
        if start.elapsed() + pause > opts.health_check_timeout {
            return Err(ReconcileError::NotHealthy {
                url,
                waited: start.elapsed(),
                last,
            });
        }
        if !logged {
            tracing::info!(%url, error = %last, "waiting for vLLM to become healthy");
            logged = true;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(cap);
    }
}

/// Most adapters retried in one pass (those due the longest go first).
pub(super) const RETRIES_PER_PASS: usize = 32;

/// Shortest time between two retry-triggered passes (or --retry-initial-backoff if shorter).
pub(super) const RETRY_PASS_MIN_GAP: Duration = Duration::from_millis(500);

/// The first pause between health probes, doubling up to [`HEALTH_MAX_PROBE_GAP`] (or
/// --health-check-interval when shorter).
const HEALTH_FIRST_PROBE: Duration = Duration::from_millis(50);
const HEALTH_MAX_PROBE_GAP: Duration = Duration::from_millis(200);

async fn list_models(client: &reqwest::Client, base: &str) -> Result<Actual, ReconcileError> {
    let url = format!("{base}/v1/models");
    let err = |message: String| ReconcileError::List {
        url: url.clone(),
        message,
    };
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| err(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(err(format!("status {}", resp.status())));
    }
    let body = resp.bytes().await.map_err(|e| err(e.to_string()))?;
    parse_models(&body).map_err(|e| err(e.to_string()))
}

async fn execute(client: &reqwest::Client, base: &str, op: &AdapterOp) -> Outcome {
    let (path, body) = match op {
        AdapterOp::Load {
            id,
            source,
            inplace,
        } => (
            "/v1/load_lora_adapter",
            json!({"lora_name": id, "lora_path": source, "load_inplace": inplace}),
        ),
        AdapterOp::Unload { id } => ("/v1/unload_lora_adapter", json!({"lora_name": id})),
    };
    let res = client
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await;
    let (status, text) = match res {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(e) => {
            return Outcome::ServerUnavailable {
                status: 0,
                message: format!("request failed: {e}"),
            };
        }
    };
    match op {
        AdapterOp::Load { .. } => classify_load(status, &text),
        AdapterOp::Unload { .. } => classify_unload(status, &text),
    }
}
