//! Open-loop load: sends a plan's requests at their scheduled times and records what came back.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use tokio::time::Instant;

use super::plan::Planned;

/// What happened to one request.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub idx: usize,
    pub class: String,
    pub model: String,
    /// Scheduled send time, seconds after the run started.
    pub at: f64,
    /// How late the request actually left (the load generator falling behind shows here).
    pub lag: f64,
    /// HTTP status; 0 for a transport error or timeout.
    pub status: u16,
    /// Seconds from sending to the first streamed event (the first token).
    pub ttft: Option<f64>,
    /// Seconds from sending to the end of the stream.
    pub e2e: Option<f64>,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    /// The model server that served it (Envoy's `x-bench-upstream`).
    pub upstream: String,
    pub error: String,
    /// [`Planned::group`].
    pub group: String,
}

/// Reads `usage` from the last SSE event that carries one.
fn usage(stream: &[u8]) -> (u64, u64, u64) {
    let text = String::from_utf8_lossy(stream);
    for line in text.lines().rev() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if !data.contains("\"usage\"") {
            continue;
        }
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(data) {
            let u = &v["usage"];
            if u.is_object() {
                return (
                    u["prompt_tokens"].as_u64().unwrap_or(0),
                    u["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .unwrap_or(0),
                    u["completion_tokens"].as_u64().unwrap_or(0),
                );
            }
        }
    }
    (0, 0, 0)
}

async fn send_one(
    client: reqwest::Client,
    base: Arc<str>,
    idx: usize,
    p: Planned,
    start: Instant,
    timeout: Duration,
) -> Outcome {
    let scheduled = start + Duration::from_secs_f64(p.at);
    tokio::time::sleep_until(scheduled).await;
    let sent = Instant::now();
    let mut o = Outcome {
        idx,
        class: p.class,
        model: p.model,
        at: p.at,
        lag: sent.duration_since(scheduled).as_secs_f64(),
        status: 0,
        ttft: None,
        e2e: None,
        prompt_tokens: 0,
        cached_tokens: 0,
        completion_tokens: 0,
        upstream: String::new(),
        error: String::new(),
        group: p.group,
    };
    let work = async {
        let mut req = client
            .post(format!("{base}{}", p.path))
            .header("content-type", "application/json");
        if let Some(id) = &p.fairness_id {
            req = req.header("x-gateway-inference-fairness-id", id);
        }
        let resp = req
            .body(p.body)
            .send()
            .await
            .map_err(|e| format!("send: {e}"))?;
        o.status = resp.status().as_u16();
        o.upstream = resp
            .headers()
            .get("x-bench-upstream")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let ok = resp.status().is_success();
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("body: {e}"))?;
            if o.ttft.is_none() && ok && !chunk.is_empty() {
                o.ttft = Some(sent.elapsed().as_secs_f64());
            }
            body.extend_from_slice(&chunk);
        }
        if ok {
            o.e2e = Some(sent.elapsed().as_secs_f64());
            (o.prompt_tokens, o.cached_tokens, o.completion_tokens) = usage(&body);
        } else {
            let msg = String::from_utf8_lossy(&body);
            o.error = msg.chars().take(200).collect();
        }
        Ok::<(), String>(())
    };
    let failed = match tokio::time::timeout(timeout, work).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some(format!("timed out after {} s", timeout.as_secs())),
    };
    if let Some(e) = failed {
        // A broken or late answer counts as a transport failure, whatever arrived first.
        o.status = 0;
        o.ttft = None;
        o.e2e = None;
        o.error = e;
    }
    o
}

/// Sends every planned request to `base` (e.g. `http://127.0.0.1:10000`) at its time, each
/// bounded by `timeout`; returns the outcomes in plan order.
pub async fn run(plan: Vec<Planned>, base: &str, timeout: Duration) -> Vec<Outcome> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .build()
        .expect("a plain HTTP client builds");
    let base: Arc<str> = Arc::from(base);
    // Start slightly in the future so the first arrivals are not already late.
    let start = Instant::now() + Duration::from_millis(100);
    let tasks: Vec<_> = plan
        .into_iter()
        .enumerate()
        .map(|(i, p)| tokio::spawn(send_one(client.clone(), base.clone(), i, p, start, timeout)))
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(o) = t.await {
            out.push(o);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_comes_from_the_last_usage_event() {
        let s = b"data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":3,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\ndata: [DONE]\n\n";
        assert_eq!(usage(s), (10, 8, 3));
        assert_eq!(usage(b"data: [DONE]\n\n"), (0, 0, 0));
    }
}
