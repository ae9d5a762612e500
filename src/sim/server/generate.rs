//! The generation routes (`/v1/completions`, `/v1/chat/completions`): a request parsed, queued on the engine, answered as JSON or SSE.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use actix::Addr;
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::sim::blocks::block_hashes;
use crate::sim::engine::{EngineEvent, EngineRequest};
use crate::sim::engine_actor::{Abort, EngineActor, Submit};
use crate::sim::openai::{self, Api, ApiError, ResponseMeta};

pub(super) async fn completions(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    generate(state, Api::Completions, body).await
}

pub(super) async fn chat(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    generate(state, Api::Chat, body).await
}

/// Sends `Abort` when a request is dropped before it finished (client disconnected).
pub(super) struct AbortGuard {
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

/// vLLM's filesystem LoRA resolver: registers `<dir>/<model>` when it holds an adapter; the
/// engine reads it from disk when the request runs.
fn resolve(state: &SimState, model: &str) -> bool {
    let Some(dir) = &state.args.lora_resolver_dir else {
        return false;
    };
    // A name is one path component: no `..`, no separators.
    if model.is_empty() || model.contains('/') || model.contains('\\') || model.starts_with('.') {
        return false;
    }
    let path = dir.join(model);
    if !path.join("adapter_config.json").is_file() {
        return false;
    }
    let req = crate::sim::lora::LoadRequest {
        lora_name: Some(model.to_string()),
        lora_path: Some(path.to_string_lossy().into_owned()),
        load_inplace: false,
    };
    let mut reg = state.registry.lock().expect("registry lock");
    if reg.load(req, &state.base_names, unix_now()).is_err() {
        return reg.get(model).is_some();
    }
    let rank = reg.get(model).and_then(|a| a.rank);
    state
        .engine
        .do_send(crate::sim::engine_actor::AdapterRegistered {
            name: model.to_string(),
            rank,
        });
    true
}

pub(super) async fn generate(state: Arc<SimState>, api: Api, body: Bytes) -> Response {
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
        || resolve(&state, &model)
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
    if req.priority != 0 && state.args.scheduling_policy != crate::sim::SchedulingPolicy::Priority {
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

use super::state::*;
