//! vllm-sim against the vLLM 0.32 wire contract and the latency model's observable properties.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const BASE: &str = "meta-llama/Llama-3.1-8B-Instruct";

async fn post(
    c: &reqwest::Client,
    addr: &str,
    path: &str,
    body: Value,
) -> (u16, Option<String>, String) {
    let r = c
        .post(format!("http://{addr}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    (status, ct, r.text().await.unwrap())
}

async fn get_text(c: &reqwest::Client, addr: &str, path: &str) -> (u16, String) {
    let r = c.get(format!("http://{addr}{path}")).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn err(message: &str, kind: &str, code: u16) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

#[tokio::test]
async fn lora_admin_wire_contract_matches_vllm() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(
        &["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8"],
        tmp.path(),
    );
    let c = client();
    let a = &sim.addr;
    let a1 = adapter(tmp.path(), "a1", 8);
    let a2 = adapter(tmp.path(), "a2", 8);
    let a1b = adapter(tmp.path(), "a1-v2", 8);
    let big = adapter(tmp.path(), "big", 64);

    let (s, body) = get_text(&c, a, "/health").await;
    assert_eq!((s, body.as_str()), (200, ""));
    let (s, body) = get_text(&c, a, "/version").await;
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"version": "0.32.0"})
    );

    for (name, path) in [("a1", &a1), ("a2", &a2)] {
        let (s, ct, body) = post(
            &c,
            a,
            "/v1/load_lora_adapter",
            json!({"lora_name": name, "lora_path": path}),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(ct, None, "success is plain text with no content-type");
        assert_eq!(
            body,
            format!("Success: LoRA adapter '{name}' added successfully.")
        );
    }
    let (s, ct, body) = post(
        &c,
        a,
        "/v1/load_lora_adapter",
        json!({"lora_name": "a1", "lora_path": "/any"}),
    )
    .await;
    assert_eq!((s, ct.as_deref()), (400, Some("application/json")));
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        err(
            "The lora adapter 'a1' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True.",
            "InvalidUserInput",
            400
        )
    );
    let (s, _, body) = post(
        &c,
        a,
        "/v1/load_lora_adapter",
        json!({"lora_name": "ghost", "lora_path": "/no/such"}),
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        err(
            "Loading lora ghost failed: No adapter found for /no/such",
            "NotFoundError",
            404
        )
    );
    let (s, _, body) = post(
        &c,
        a,
        "/v1/load_lora_adapter",
        json!({"lora_name": "big", "lora_path": big}),
    )
    .await;
    assert_eq!(s, 500);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "InternalServerError");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Call to add_lora method failed: Worker failed with error '")
    );
    let (s, _, body) = post(&c, a, "/v1/load_lora_adapter", json!({"lora_name": "x"})).await;
    assert_eq!(s, 400, "{body}");
    let r = c
        .post(format!("http://{a}/v1/load_lora_adapter"))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let (s, _, _) = post(
        &c,
        a,
        "/v1/load_lora_adapter",
        json!({"lora_name": BASE, "lora_path": a1}),
    )
    .await;
    assert_eq!(s, 400, "an adapter may not take the base model's name");

    // In-place reload swaps the path.
    let (s, _, _) = post(
        &c,
        a,
        "/v1/load_lora_adapter",
        json!({"lora_name": "a1", "lora_path": a1b, "load_inplace": true}),
    )
    .await;
    assert_eq!(s, 200);

    let (_, body) = get_text(&c, a, "/v1/models").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    let ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [BASE, "a1", "a2"],
        "base first, adapters in load order"
    );
    assert_eq!(data[0]["parent"], Value::Null);
    assert_eq!(data[0]["root"], BASE);
    assert_eq!(data[0]["owned_by"], "vllm");
    assert!(data[0]["max_model_len"].is_u64());
    assert_eq!(data[1]["parent"], BASE);
    assert_eq!(data[1]["root"], a1b.as_str());
    assert_eq!(data[1]["max_model_len"], Value::Null);
    assert_eq!(data[1]["object"], "model");
    assert!(data[1]["permission"].is_array());

    let (s, ct, body) = post(&c, a, "/v1/unload_lora_adapter", json!({"lora_name": "a2"})).await;
    assert_eq!(
        (s, ct, body.as_str()),
        (
            200,
            None,
            "Success: LoRA adapter 'a2' removed successfully."
        )
    );
    let (s, _, body) = post(&c, a, "/v1/unload_lora_adapter", json!({"lora_name": "a2"})).await;
    assert_eq!(s, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        err(
            "The lora adapter 'a2' cannot be found.",
            "NotFoundError",
            404
        )
    );
}

#[tokio::test]
async fn runtime_updates_need_the_env_switch_and_lora_modules_preload() {
    let tmp = tempfile::tempdir().unwrap();
    let a1 = adapter(tmp.path(), "a1", 8);
    let module = format!("food-review-1={a1}");
    let sim = spawn_with_marker(
        &bin("vllm-sim"),
        &[
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--enable-lora",
            "--lora-modules",
            &module,
        ],
        &[("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "false")],
        "VLLM_SIM_LISTENING",
        tmp.path(),
    );
    let c = client();
    let (s, _, body) = post(
        &c,
        &sim.addr,
        "/v1/load_lora_adapter",
        json!({"lora_name": "x", "lora_path": a1}),
    )
    .await;
    assert_eq!((s, body.as_str()), (404, r#"{"detail":"Not Found"}"#));
    let (_, body) = get_text(&c, &sim.addr, "/v1/models").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"][1]["id"], "food-review-1");
    assert_eq!(v["data"][1]["root"], a1.as_str());
}

#[tokio::test]
async fn completions_and_chat_non_streaming_and_streaming() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(&["--time-scale", "0.05"], tmp.path());
    let c = client();
    let a = &sim.addr;

    let (s, ct, body) = post(
        &c,
        a,
        "/v1/completions",
        json!({"model": BASE, "prompt": "Hello there", "max_tokens": 5}),
    )
    .await;
    assert_eq!((s, ct.as_deref()), (200, Some("application/json")));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], BASE);
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["total_tokens"], 8);

    let (s, _, body) = post(
        &c,
        a,
        "/v1/chat/completions",
        json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    )
    .await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["usage"]["completion_tokens"], 2);

    let (s, _, body) = post(
        &c,
        a,
        "/v1/completions",
        json!({"model": "nope", "prompt": "x"}),
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"error": {"message": "The model `nope` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}})
    );

    // Streaming chat with usage.
    let r = c
        .post(format!("http://{a}/v1/chat/completions"))
        .json(
            &json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                      "stream": true, "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let text = r.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|s| !s.is_empty()).collect();
    assert!(events.iter().all(|e| e.starts_with("data: ")), "{text}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e["data: ".len()..]).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    let content: Vec<&Value> = chunks[1..chunks.len() - 1].iter().collect();
    assert_eq!(content.len(), 4, "one chunk per token");
    assert_eq!(
        content.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 4);

    // Streaming completions without usage: no usage chunk.
    let r = c
        .post(format!("http://{a}/v1/completions"))
        .json(&json!({"model": BASE, "prompt": "x", "max_tokens": 3, "stream": true}))
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert_eq!(text.matches("data: ").count(), 4, "{text}");
    assert!(!text.contains("\"usage\""));
}

fn newest_lora_series(page: &str) -> Option<(String, f64)> {
    page.lines()
        .filter(|l| l.starts_with("vllm:lora_requests_info{"))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            Some((series.to_string(), v.parse::<f64>().ok()?))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

#[tokio::test]
async fn adapters_beyond_slots_are_deferred_and_lora_info_tracks_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    // Slow decode so requests stay in flight long enough to observe.
    let sim = spawn_sim(
        &[
            "--enable-lora",
            "--max-loras",
            "1",
            "--decode-base-ms",
            "20",
            "--time-scale",
            "1",
        ],
        tmp.path(),
    );
    let c = client();
    let a = sim.addr.clone();
    for n in ["a1", "a2"] {
        let p = adapter(tmp.path(), n, 8);
        let (s, _, _) = post(
            &c,
            &a,
            "/v1/load_lora_adapter",
            json!({"lora_name": n, "lora_path": p}),
        )
        .await;
        assert_eq!(s, 200);
    }
    let mut reqs = Vec::new();
    for n in ["a1", "a2"] {
        let c = c.clone();
        let a = a.clone();
        reqs.push(tokio::spawn(async move {
            post(
                &c,
                &a,
                "/v1/completions",
                json!({"model": n, "prompt": "p", "max_tokens": 40}),
            )
            .await
            .0
        }));
    }
    let model = format!("{{engine=\"0\",model_name=\"{BASE}\"");
    wait_for(
        "one deferred request and the newest lora series listing both adapters",
        Duration::from_secs(10),
        || {
            let c = c.clone();
            let a = a.clone();
            let model = model.clone();
            async move {
                let (_, page) = get_text(&c, &a, "/metrics").await;
                let deferred = metric(
                    &page,
                    &format!("vllm:num_requests_waiting_by_reason{model},reason=\"deferred\"}}"),
                )?;
                let running = metric(&page, &format!("vllm:num_requests_running{model}}}"))?;
                let (newest, _) = newest_lora_series(&page)?;
                (deferred == 1.0
                    && running == 1.0
                    && newest.contains("running_lora_adapters=\"a1,a2\"")
                    && newest.contains("max_lora=\"1\""))
                .then_some(())
            }
        },
    )
    .await;
    for r in reqs {
        assert_eq!(r.await.unwrap(), 200);
    }
    let (_, page) = get_text(&c, &a, "/metrics").await;
    let (newest, _) = newest_lora_series(&page).unwrap();
    assert!(
        newest.contains("running_lora_adapters=\"\""),
        "idle server's newest series is empty: {newest}"
    );
    assert!(
        page.lines()
            .filter(|l| l.starts_with("vllm:lora_requests_info{"))
            .count()
            >= 2,
        "old series are never removed"
    );
}

#[tokio::test]
async fn repeated_prompt_hits_prefix_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(
        &["--enable-prompt-tokens-details", "--time-scale", "0.05"],
        tmp.path(),
    );
    let c = client();
    let prompt = "You are a helpful assistant for a ski resort. ".repeat(40);
    let body = json!({"model": BASE, "prompt": prompt, "max_tokens": 2});
    let (_, _, first) = post(&c, &sim.addr, "/v1/completions", body.clone()).await;
    let (_, _, second) = post(&c, &sim.addr, "/v1/completions", body).await;
    let first: Value = serde_json::from_str(&first).unwrap();
    let second: Value = serde_json::from_str(&second).unwrap();
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= 400, "cached {cached}");
    let (_, page) = get_text(&c, &sim.addr, "/metrics").await;
    let hits = metric(
        &page,
        &format!("vllm:prefix_cache_hits_total{{engine=\"0\",model_name=\"{BASE}\"}}"),
    )
    .unwrap();
    assert_eq!(hits as u64, cached);
}

#[tokio::test]
async fn fault_injection_and_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(&["--enable-lora", "--time-scale", "0.05"], tmp.path());
    let c = client();
    let a = &sim.addr;
    let p = adapter(tmp.path(), "a1", 8);
    post(
        &c,
        a,
        "/v1/load_lora_adapter",
        json!({"lora_name": "a1", "lora_path": p}),
    )
    .await;

    post(&c, a, "/sim/faults", json!({"unhealthy": true})).await;
    assert_eq!(get_text(&c, a, "/health").await.0, 503);
    post(
        &c,
        a,
        "/sim/faults",
        json!({"unhealthy": false, "failure_rate": 1.0}),
    )
    .await;
    let (s, _, body) = post(
        &c,
        a,
        "/v1/completions",
        json!({"model": BASE, "prompt": "x"}),
    )
    .await;
    assert_eq!(s, 500, "{body}");
    post(
        &c,
        a,
        "/sim/faults",
        json!({"failure_rate": 0.0, "drop_connections": true}),
    )
    .await;
    let fresh = client();
    let r = fresh.get(format!("http://{a}/health")).send().await;
    assert!(r.is_err(), "connection should be dropped: {r:?}");
    post(&c, a, "/sim/faults", json!({"drop_connections": false})).await;

    let (s, _, _) = post(&c, a, "/sim/restart", json!({})).await;
    assert_eq!(s, 200);
    let (_, body) = get_text(&c, a, "/v1/models").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["data"].as_array().unwrap().len(),
        1,
        "restart forgets runtime adapters: {body}"
    );
    let (s, _, _) = post(
        &c,
        a,
        "/v1/completions",
        json!({"model": "a1", "prompt": "x"}),
    )
    .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn priority_needs_priority_scheduling_as_in_vllm() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let body = json!({"model": BASE, "prompt": "hi", "max_tokens": 2, "priority": 1});
    let fcfs = spawn_sim(&[], dir.path());
    let (status, _, text) = post(&c, &fcfs.addr, "/v1/completions", body.clone()).await;
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("Got priority 1 but Priority scheduling is not enabled."),
        "{text}"
    );
    let (status, _, _) = post(
        &c,
        &fcfs.addr,
        "/v1/completions",
        json!({"model": BASE, "prompt": "hi", "max_tokens": 2, "priority": 0}),
    )
    .await;
    assert_eq!(status, 200, "priority 0 is always accepted");
    let prio = spawn_sim(&["--scheduling-policy", "priority"], dir.path());
    let (status, _, text) = post(&c, &prio.addr, "/v1/completions", body).await;
    assert_eq!(status, 200, "{text}");
}

#[tokio::test]
async fn metrics_name_filter_as_prometheus_client() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(&["--time-scale", "0"], tmp.path());
    let c = client();
    let (status, page) = get_text(
        &c,
        &sim.addr,
        "/metrics?name%5B%5D=vllm%3Anum_requests_waiting&name[]=vllm:kv_cache_usage_perc",
    )
    .await;
    assert_eq!(status, 200);
    let names: Vec<&str> = page
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split('{').next().unwrap())
        .collect();
    assert_eq!(
        names,
        ["vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"],
        "{page}"
    );
    assert_eq!(page.lines().filter(|l| l.starts_with("# TYPE")).count(), 2);
    // Multiprocess mode (more than one API server): the filter matches nothing, the whole
    // page is still served without it.
    let multi = spawn_sim(
        &["--time-scale", "0", "--api-server-count", "2"],
        tmp.path(),
    );
    let (status, page) =
        get_text(&c, &multi.addr, "/metrics?name[]=vllm:num_requests_waiting").await;
    assert_eq!((status, page.as_str()), (200, ""));
    let (_, whole) = get_text(&c, &multi.addr, "/metrics").await;
    assert!(whole.lines().count() > 500);
}

/// vLLM's adapter tiers: GPU slots (--max-loras) within a CPU cache (--max-cpu-loras), both
/// LRU; a load pre-reads into the CPU tier, a request brings its adapter into a slot (an
/// activation from the CPU tier, a disk read by rank first when in neither); unload forgets
/// the name and keeps the memory (Python frontend) or frees it (Rust frontend). Residency is
/// on vLLM's coming metric names behind --lora-residency-metrics.
#[tokio::test]
async fn adapter_tiers_gpu_within_cpu_and_unload_by_frontend() {
    let dir = tempfile::tempdir().unwrap();
    inferlane::runtime::install_crypto_provider();
    let c = reqwest::Client::new();
    let paths: Vec<String> = [("a", 8), ("b", 16), ("c", 8)]
        .iter()
        .map(|(n, r)| adapter(dir.path(), n, *r))
        .collect();
    for (frees, flag) in [(false, "false"), (true, "true")] {
        let sim = spawn_sim(
            &[
                "--enable-lora",
                "--max-loras",
                "1",
                "--max-cpu-loras",
                "2",
                "--lora-disk-ms-per-rank",
                "1",
                "--lora-residency-metrics",
                "--lora-unload-frees",
                flag,
                "--time-scale",
                "0.01",
            ],
            dir.path(),
        );
        let level = |page: &str, name: &str| -> Option<String> {
            let prefix = format!("vllm:lora_adapter_loaded{{adapter_name=\"{name}\",level=\"");
            page.lines()
                .find_map(|l| Some(l.strip_prefix(&prefix)?.split('"').next()?.to_string()))
        };
        for (name, path) in ["a", "b"].iter().zip(&paths) {
            let (s, _, body) = post(
                &c,
                &sim.addr,
                "/v1/load_lora_adapter",
                json!({"lora_name": name, "lora_path": path}),
            )
            .await;
            assert_eq!(s, 200, "{body}");
        }
        let page = || async { get_text(&c, &sim.addr, "/metrics").await.1 };
        let p = page().await;
        assert_eq!(level(&p, "a").as_deref(), Some("cpu"), "{p}");
        assert_eq!(level(&p, "b").as_deref(), Some("cpu"));
        assert_eq!(metric(&p, "vllm:max_gpu_lora_adapters"), Some(1.0));
        let complete = |model: &'static str| {
            let c = c.clone();
            let addr = sim.addr.clone();
            async move {
                let (s, _, body) = post(
                    &c,
                    &addr,
                    "/v1/completions",
                    json!({"model": model, "prompt": "x", "max_tokens": 1}),
                )
                .await;
                assert_eq!(s, 200, "{body}");
            }
        };
        complete("a").await;
        let p = page().await;
        assert_eq!(level(&p, "a").as_deref(), Some("gpu"), "{p}");
        assert_eq!(metric(&p, "vllm:num_gpu_loaded_lora_adapters"), Some(1.0));
        complete("b").await;
        let p = page().await;
        assert_eq!(level(&p, "b").as_deref(), Some("gpu"));
        assert_eq!(
            level(&p, "a").as_deref(),
            Some("cpu"),
            "a lost its slot, kept its cache"
        );
        // Two activations so far, no disk read.
        assert_eq!(
            metric(&p, "vllm:lora_adapter_load_seconds_count"),
            Some(2.0)
        );
        // A third adapter pushes the least recent (a) out of the CPU cache: a disk read later.
        let (s, _, body) = post(
            &c,
            &sim.addr,
            "/v1/load_lora_adapter",
            json!({"lora_name": "c", "lora_path": paths[2]}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let p = page().await;
        assert_eq!(level(&p, "a"), None, "{p}");
        let (s, _, body) = post(
            &c,
            &sim.addr,
            "/v1/unload_lora_adapter",
            json!({"lora_name": "b"}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let p = page().await;
        if frees {
            assert_eq!(level(&p, "b"), None, "the Rust frontend frees it: {p}");
        } else {
            assert_eq!(
                level(&p, "b").as_deref(),
                Some("gpu"),
                "the Python frontend keeps it: {p}"
            );
        }
    }
}
