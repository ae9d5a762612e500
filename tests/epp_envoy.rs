//! End to end through a real Envoy: client -> Envoy -> ext_proc (epp) -> the chosen vllm-sim.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const BASE: &str = "meta-llama/Llama-3.1-8B-Instruct";
const T: Duration = Duration::from_secs(20);

struct Fleet {
    sims: Vec<Proc>,
    epp: Epp,
    envoy: Envoy,
    dir: tempfile::TempDir,
    c: reqwest::Client,
}

struct FleetOptions<'a> {
    sims: usize,
    sim_flags: &'a [&'a str],
    /// Adapters to load per sim index.
    adapters: &'a [(&'a str, &'a [usize])],
    models_yaml: &'a str,
    full_duplex: bool,
    fail_open: bool,
    /// Index of the only sim the gateway's subset hint allows.
    subset: Option<usize>,
    epp_flags: &'a [&'a str],
}

impl Default for FleetOptions<'_> {
    fn default() -> Self {
        Self {
            sims: 2,
            sim_flags: &["--enable-lora", "--max-loras", "2", "--time-scale", "0.1"],
            adapters: &[],
            models_yaml: "",
            full_duplex: false,
            fail_open: false,
            subset: None,
            epp_flags: &[],
        }
    }
}

fn pool_yaml(sims: &[Proc], models: &str) -> String {
    let mut s = String::from("pool: {name: test-pool}\nendpoints:\n");
    for p in sims {
        s.push_str(&format!("- address: {}\n", p.addr));
    }
    s.push_str(models);
    s
}

impl Fleet {
    async fn start(o: FleetOptions<'_>) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let c = client();
        let sims: Vec<Proc> = (0..o.sims)
            .map(|_| spawn_sim(o.sim_flags, dir.path()))
            .collect();
        for (name, on) in o.adapters {
            let path = adapter(dir.path(), name, 8);
            for &i in *on {
                load_adapter(&c, &sims[i], name, &path).await;
            }
        }
        let pool_file = dir.path().join("pool.yaml");
        std::fs::write(&pool_file, pool_yaml(&sims, o.models_yaml)).unwrap();
        let epp = spawn_epp(&pool_file, o.epp_flags, dir.path());
        // The gateway names allowed endpoints in envoy.lb.subset_hint; a set_metadata filter
        // plays that gateway.
        let filter = o.subset.map(|i| format!(
            "          - name: envoy.filters.http.set_metadata\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config\n              metadata:\n              - metadata_namespace: envoy.lb.subset_hint\n                value:\n                  x-gateway-destination-endpoint-subset: [\"{}\"]\n",
            sims[i].addr
        ));
        let envoy = spawn_envoy(
            &EnvoyOptions {
                epp_port: port_of(&epp.grpc),
                full_duplex: o.full_duplex,
                fail_open: o.fail_open,
                extra_filters: filter.as_deref().unwrap_or(""),
            },
            dir.path(),
        )
        .await;
        let f = Fleet {
            sims,
            epp,
            envoy,
            dir,
            c,
        };
        let n = f.sims.len();
        let fr = &f;
        wait_for("the EPP to see every endpoint", T, || async move {
            let page = fr.epp_metrics().await;
            (metric(&page, "inference_pool_ready_pods{name=\"test-pool\"}")? as usize == n)
                .then_some(())
        })
        .await;
        f
    }

    async fn epp_metrics(&self) -> String {
        self.c
            .get(format!("http://{}/metrics", self.epp.metrics))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.envoy.port)
    }

    async fn complete(&self, body: Value) -> (u16, String) {
        let r = self
            .c
            .post(self.url("/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.text().await.unwrap())
    }

    /// `n` one-token base-model requests in turn (prompts `{tag}{i}`), each answered 200.
    async fn complete_all_ok(&self, n: usize, tag: &str) {
        for i in 0..n {
            let (s, body) = self
                .complete(json!({"model": BASE, "prompt": format!("{tag}{i}"), "max_tokens": 1}))
                .await;
            assert_eq!(s, 200, "request {i}: {body}");
        }
    }

    async fn totals(&self) -> Vec<u64> {
        let mut v = Vec::new();
        for s in &self.sims {
            v.push(sim_total(&self.c, s).await);
        }
        v
    }
}

#[tokio::test]
async fn routes_through_envoy_and_rejects_bad_bodies() {
    let f = Fleet::start(FleetOptions::default()).await;
    for i in 0..20 {
        let (s, body) = f
            .complete(json!({"model": BASE, "prompt": format!("hello {i}"), "max_tokens": 2}))
            .await;
        assert_eq!(s, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["model"], BASE);
    }
    let totals = f.totals().await;
    assert_eq!(totals.iter().sum::<u64>(), 20, "{totals:?}");
    // vLLM's admin routes are refused at the gateway (403), before the EPP or a server sees
    // them: a client could otherwise swap an adapter's weights.
    for path in ["/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/sleep"] {
        let r = f
            .c
            .post(f.url(path))
            .json(&json!({"lora_name": "food-review-1", "lora_path": "/tmp/evil", "model": BASE}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
        assert!(
            r.text()
                .await
                .unwrap()
                .contains("not served through the gateway")
        );
    }
    for s in &f.sims {
        let stats = sim_stats(&f.c, s).await;
        assert!(stats["load_attempts"]["food-review-1"].is_null(), "{stats}");
    }
    // Upstream's EPP marks the responses it saw.
    let r =
        f.c.post(f.url("/v1/completions"))
            .json(&json!({"model": BASE, "prompt": "marked", "max_tokens": 1}))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("x-went-into-resp-headers")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );

    let r =
        f.c.post(f.url("/v1/completions"))
            .body("{not json")
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{v}"
    );
    let r =
        f.c.post(f.url("/v1/completions"))
            .header("x-request-id", "trace-me-400")
            .json(&json!({"prompt": "x"}))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 400);
    let body = r.text().await.unwrap();
    assert!(body.contains("no \\\"model\\\" field"), "{body}");
    // The rejection is logged with the request's id, so a client's report can be found.
    wait_for("the rejection logged with its request id", T, || async {
        let logs = f.epp.proc.logs();
        logs.lines()
            .any(|l| l.contains("request rejected") && l.contains("trace-me-400"))
            .then_some(())
    })
    .await;
    // No body at all: picked on the headers message.
    let r = f.c.get(f.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // A model no rule names and no server has: the EPP's own 404, naming it.
    let (s, body) = f
        .complete(json!({"model": "nobody-has-this", "prompt": "x"}))
        .await;
    assert_eq!(s, 404, "{body}");
    assert!(
        body.contains("nobody-has-this") && body.contains("does not exist"),
        "{body}"
    );
    let page = f.epp_metrics().await;
    assert!(
        page.lines().any(|l| l == format!("inference_objective_request_total{{model_name=\"{BASE}\",target_model_name=\"{BASE}\"}} 21")),
        "{page}"
    );
}

const SPLIT: &str = "models:\n- modelName: food-review\n  criticality: Critical\n  targetModels:\n  - {name: food-review-1, weight: 90}\n  - {name: food-review-2, weight: 10}\n";

#[tokio::test]
async fn weighted_split_and_adapter_availability_full_duplex() {
    let f = Fleet::start(FleetOptions {
        sims: 3,
        adapters: &[("food-review-1", &[0, 1, 2]), ("food-review-2", &[0])],
        models_yaml: SPLIT,
        full_duplex: true,
        ..Default::default()
    })
    .await;
    let n = 200;
    let mut answered = std::collections::BTreeMap::<String, u64>::new();
    for i in 0..n {
        // A client trying to pick the adapter itself changes nothing: the gateway strips the
        // header and the EPP does not read it unless told to trust it.
        let r = f
            .c
            .post(f.url("/v1/completions"))
            .header("x-gateway-model-name-rewrite", "food-review-2")
            .json(
                &json!({"model": "food-review", "prompt": format!("review {i}"), "max_tokens": 1}),
            )
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert_eq!(s, 200, "request {i}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        // As vLLM and upstream: the response names the adapter that served it.
        *answered
            .entry(v["model"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let mut fr1 = 0;
    let mut fr2_by_sim = Vec::new();
    for s in &f.sims {
        let r = sim_requests(&f.c, s).await;
        fr1 += r.get("food-review-1").copied().unwrap_or(0);
        fr2_by_sim.push(r.get("food-review-2").copied().unwrap_or(0));
    }
    let fr2: u64 = fr2_by_sim.iter().sum();
    assert_eq!(fr1 + fr2, n);
    assert_eq!(
        answered,
        [
            ("food-review-1".to_string(), fr1),
            ("food-review-2".to_string(), fr2)
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect(),
        "each response names the adapter its server ran"
    );
    // Binomial(200, 0.9): mean 180, sd 4.2; accept +-3.5 sd.
    assert!((165..=195).contains(&fr1), "food-review-1 got {fr1} of {n}");
    assert_eq!(
        fr2_by_sim[1] + fr2_by_sim[2],
        0,
        "food-review-2 only where it is loaded: {fr2_by_sim:?}"
    );
}

/// `--restore-model-name`: the client's name comes back in JSON and in every SSE chunk,
/// and the stream is otherwise intact (both body modes).
#[tokio::test]
async fn restore_model_name_is_opt_in() {
    for full_duplex in [false, true] {
        let f = Fleet::start(FleetOptions {
            adapters: &[("food-review-1", &[0, 1]), ("food-review-2", &[0, 1])],
            models_yaml: SPLIT,
            full_duplex,
            epp_flags: &["--restore-model-name"],
            ..Default::default()
        })
        .await;
        let (s, body) = f
            .complete(json!({"model": "food-review", "prompt": "中文 review", "max_tokens": 3}))
            .await;
        assert_eq!(s, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["model"], "food-review", "{body}");
        let r = f
            .c
            .post(f.url("/v1/chat/completions"))
            .json(&json!({"model": "food-review", "messages": [{"role": "user", "content": "中文"}],
                          "max_tokens": 20, "stream": true, "stream_options": {"include_usage": true}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        let events: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
        for e in &events[..events.len() - 1] {
            let v: Value = serde_json::from_str(e).unwrap_or_else(|_| panic!("{e}"));
            assert_eq!(v["model"], "food-review", "{e}");
        }
        assert!(events.len() >= 20, "{text}");
    }
}

#[tokio::test]
async fn sse_streams_through_with_usage_counted_and_body_limit() {
    let f = Fleet::start(FleetOptions {
        epp_flags: &["--max-body-bytes", "4000"],
        ..Default::default()
    })
    .await;
    let (s, body) = f
        .complete(json!({"model": BASE, "prompt": "x".repeat(5000), "max_tokens": 1}))
        .await;
    assert_eq!(s, 413, "{body}");
    assert!(body.contains("--max-body-bytes"), "{body}");
    let r = f
        .c
        .post(f.url("/v1/chat/completions"))
        .json(
            &json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                      "stream": true, "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let text = r.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(
        text.matches("data: ").count(),
        8,
        "role + 5 tokens + usage + DONE: {text}"
    );
    wait_for("usage in EPP metrics", T, || async {
        let page = f.epp_metrics().await;
        let key = format!("inference_objective_output_tokens_sum{{model_name=\"{BASE}\",target_model_name=\"{BASE}\"}}");
        (metric(&page, &key)? == 5.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn dead_server_is_taken_out_and_put_back() {
    let mut f = Fleet::start(FleetOptions::default()).await;
    let dead_addr = f.sims[1].addr.clone();
    let dead = f.sims.remove(1);
    drop(dead); // killed
    // Two scrape intervals (2 x 50 ms) and some slack for a loaded machine.
    tokio::time::sleep(Duration::from_millis(250)).await;
    f.complete_all_ok(20, "p").await; // after the kill
    assert_eq!(sim_total(&f.c, &f.sims[0]).await, 20);
    // The server comes back on the same address and gets traffic again.
    let port = port_of(&dead_addr).to_string();
    let back = spawn_sim(
        &["--enable-lora", "--time-scale", "0.1", "--port", &port],
        f.dir.path(),
    );
    wait_for("the recovered server to receive requests", T, || async {
        let (s, _) = f
            .complete(json!({"model": BASE, "prompt": "again", "max_tokens": 1}))
            .await;
        assert_eq!(s, 200);
        (sim_total(&f.c, &back).await > 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn spoofed_destination_is_never_honoured_and_failure_modes() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let secret = spawn_sim(&["--time-scale", "0.1"], dir.path());
    for fail_open in [false, true] {
        let f = Fleet::start(FleetOptions {
            sims: 1,
            fail_open,
            ..Default::default()
        })
        .await;
        let r =
            f.c.post(f.url("/v1/completions"))
                .header("x-gateway-destination-endpoint", &secret.addr)
                .json(&json!({"model": BASE, "prompt": "x", "max_tokens": 1}))
                .send()
                .await
                .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(sim_total(&f.c, &f.sims[0]).await, 1);
        // EPP down.
        let Fleet { epp, .. } = &f;
        let mut child = std::process::Command::new("kill")
            .arg(epp.proc.child.id().to_string())
            .spawn()
            .unwrap();
        child.wait().unwrap();
        // The signal is asynchronous: wait until the EPP has exited (a zombie until reaped), or
        // a request could still be picked by the dying process on Envoy's open connection.
        let stat = format!("/proc/{}/stat", epp.proc.child.id());
        wait_for("EPP exited", Duration::from_secs(10), || {
            let gone = std::fs::read_to_string(&stat)
                .map(|t| {
                    t.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(true);
            async move { gone.then_some(()) }
        })
        .await;
        let r =
            f.c.post(f.url("/v1/completions"))
                .header("x-gateway-destination-endpoint", &secret.addr)
                .json(&json!({"model": BASE, "prompt": "x", "max_tokens": 1}))
                .send()
                .await
                .unwrap();
        let s = r.status().as_u16();
        if fail_open {
            // Fail-open with ORIGINAL_DST and no (stripped) header: 503, never the client's pick.
            assert_eq!(s, 503);
        } else {
            assert!(s >= 500, "fail-closed answers an error, got {s}");
            assert_ne!(s, 200);
        }
    }
    assert_eq!(
        sim_total(&c, &secret).await,
        0,
        "the spoofed endpoint never got a request"
    );
}

#[tokio::test]
async fn subset_hint_is_honoured() {
    let f = Fleet::start(FleetOptions {
        sims: 3,
        subset: Some(1),
        ..Default::default()
    })
    .await;
    f.complete_all_ok(15, "s").await;
    assert_eq!(
        f.totals().await,
        [0, 15, 0],
        "every request went to the allowed endpoint"
    );
}

#[tokio::test]
async fn sheddable_requests_get_429_when_saturated_and_critical_are_served() {
    let f = Fleet::start(FleetOptions {
        sims: 2,
        sim_flags: &["--max-num-seqs", "1", "--decode-base-ms", "20"],
        models_yaml: "models:\n- modelName: batch\n  criticality: Sheddable\n  targetModels: [{name: meta-llama/Llama-3.1-8B-Instruct}]\n",
        ..Default::default()
    })
    .await;
    // Fill both servers' queues directly (7 each, threshold 5).
    let mut load = Vec::new();
    for s in &f.sims {
        for _ in 0..7 {
            let c = f.c.clone();
            let url = format!("http://{}/v1/completions", s.addr);
            load.push(tokio::spawn(async move {
                c.post(url)
                    .json(&json!({"model": BASE, "prompt": "fill", "max_tokens": 60}))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            }));
        }
    }
    // The servers report the queues before we ask the EPP anything.
    for s in &f.sims {
        wait_for("a full queue", T, || async {
            let page = try_text(&f.c, &format!("http://{}/metrics", s.addr)).await?;
            let key = format!("vllm:num_requests_waiting{{engine=\"0\",model_name=\"{BASE}\"}}");
            (metric(&page, &key)? >= 5.0).then_some(())
        })
        .await;
    }
    wait_for("a sheddable request to be shed", T, || async {
        // A probe the EPP routes (its view still lagging a scrape) would queue for seconds:
        // give up on it quickly and ask again.
        let r =
            f.c.post(f.url("/v1/completions"))
                .timeout(Duration::from_millis(500))
                .json(&json!({"model": "batch", "prompt": "x", "max_tokens": 1}))
                .send()
                .await
                .ok()?;
        let s = r.status().as_u16();
        let body = r.text().await.ok()?;
        if s == 429 {
            assert!(body.contains("saturated"), "{body}");
            return Some(());
        }
        None
    })
    .await;
    // Critical work is still routed (it queues behind the load).
    let (s, body) = f
        .complete(json!({"model": BASE, "prompt": "critical", "max_tokens": 1}))
        .await;
    assert_eq!(s, 200, "{body}");
    let page = f.epp_metrics().await;
    // Counted under the model the client asked for, like upstream.
    assert!(
        page.contains(&format!(
            "inference_objective_request_error_total{{model_name=\"batch\",target_model_name=\"{BASE}\",error_code=\"429\"}}"
        )),
        "{page}"
    );
    for l in load {
        assert_eq!(l.await.unwrap().unwrap(), 200);
    }
}

#[tokio::test]
async fn live_adapter_rollout_never_404s() {
    let f = Fleet::start(FleetOptions {
        sims: 3,
        adapters: &[("fr-new", &[0])],
        ..Default::default()
    })
    .await;
    let path = adapter(f.dir.path(), "fr-new-weights", 8);
    let mut statuses = Vec::new();
    for i in 0..60 {
        if i == 20 {
            load_adapter(&f.c, &f.sims[1], "fr-new", &path).await;
        }
        if i == 35 {
            load_adapter(&f.c, &f.sims[2], "fr-new", &path).await;
        }
        let (s, _) = f
            .complete(json!({"model": "fr-new", "prompt": format!("r{i}"), "max_tokens": 1}))
            .await;
        statuses.push(s);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let first = sim_requests(&f.c, &f.sims[0]).await;
    assert!(first.get("fr-new").copied().unwrap_or(0) >= 20);
    // Once the EPP has re-read their model lists, the others take traffic too when sim 0 is
    // busy (a burst passes the LoRA affinity threshold; one request at a time may rightly
    // stay with the server already running the adapter); every request still succeeds.
    let fr = &f;
    wait_for(
        "the newly loaded servers to get traffic",
        T,
        || async move {
            let burst = futures::future::join_all((0..8).map(|i| {
                fr.complete(
                    json!({"model": "fr-new", "prompt": format!("later {i}"), "max_tokens": 20}),
                )
            }))
            .await;
            for (s, body) in burst {
                assert_eq!(s, 200, "{body}");
            }
            let later = sim_total(&fr.c, &fr.sims[1]).await + sim_total(&fr.c, &fr.sims[2]).await;
            (later > 0).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn forward_priority_writes_vllm_priorities_into_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("picker.yaml");
    std::fs::write(&cfg, "kind: EndpointPickerConfig\nforwardPriority: true\n").unwrap();
    let cfg = cfg.to_string_lossy().into_owned();
    let models = "models:\n- modelName: chat-critical\n  criticality: Critical\n  targetModels: [{name: meta-llama/Llama-3.1-8B-Instruct}]\n- modelName: chat-standard\n  criticality: Standard\n  targetModels: [{name: meta-llama/Llama-3.1-8B-Instruct}]\n";
    let ask = |f: &Fleet, model: &str| {
        f.c.post(f.url("/v1/completions"))
            .json(&json!({"model": model, "prompt": "x", "max_tokens": 1}))
            .send()
    };
    // An FCFS server rejects any non-zero priority: the 400 proves the EPP sent one, and
    // Standard (priority 0) is left without the field.
    let fcfs = Fleet::start(FleetOptions {
        sims: 1,
        sim_flags: &["--time-scale", "0.1"],
        models_yaml: models,
        epp_flags: &["--config-file", &cfg],
        ..Default::default()
    })
    .await;
    let r = ask(&fcfs, "chat-critical").await.unwrap();
    assert_eq!(r.status(), 400);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("Got priority -1 but Priority scheduling is not enabled."),
        "{body}"
    );
    assert_eq!(ask(&fcfs, "chat-standard").await.unwrap().status(), 200);
    // The server's own error status, read from the response headers, is counted per model.
    let fr = &fcfs;
    wait_for("the server's 400 counted", T, || async move {
        let page = fr.epp_metrics().await;
        (metric(
            &page,
            "inference_objective_request_error_total{model_name=\"chat-critical\",target_model_name=\"meta-llama/Llama-3.1-8B-Instruct\",error_code=\"400\"}",
        )? == 1.0)
            .then_some(())
    })
    .await;
    drop(fcfs);
    let prio = Fleet::start(FleetOptions {
        sims: 1,
        sim_flags: &["--time-scale", "0.1", "--scheduling-policy", "priority"],
        models_yaml: models,
        epp_flags: &["--config-file", &cfg],
        ..Default::default()
    })
    .await;
    let r = ask(&prio, "chat-critical").await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// `/sim/stats` counts of whole and `name[]`-filtered metrics pages a sim served.
async fn metrics_pages(c: &reqwest::Client, sim: &Proc) -> (u64, u64) {
    let v = sim_stats(c, sim).await;
    (
        v["metrics_whole"].as_u64().unwrap(),
        v["metrics_filtered"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn metrics_name_filter_used_where_honoured_whole_page_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let one = ["--max-num-seqs", "1"];
    // Index 0 honours `name[]`; index 1 runs like vLLM with several API servers, where the
    // filter matches nothing.
    let sims = [
        spawn_sim(&one, dir.path()),
        spawn_sim(
            &[&one[..], &["--api-server-count", "2"]].concat(),
            dir.path(),
        ),
    ];
    let pool_file = dir.path().join("pool.yaml");
    std::fs::write(&pool_file, pool_yaml(&sims, "")).unwrap();
    let epp = spawn_epp(&pool_file, &[], dir.path());
    // Queue 2 requests behind one running on sim 0, 4 on sim 1: the pool's average queue
    // is 3 only if both ways of reading a server give its real queue.
    let mut running = Vec::new();
    for (sim, n) in [(&sims[0], 3), (&sims[1], 5)] {
        for i in 0..n {
            let (c, url) = (c.clone(), format!("http://{}/v1/completions", sim.addr));
            running.push(tokio::spawn(async move {
                let body = json!({"model": BASE, "prompt": format!("p{i}"), "max_tokens": 5000});
                let _ = c.post(url).json(&body).send().await;
            }));
        }
    }
    wait_for("the EPP to read both queues", T, || async {
        let page = try_text(&c, &format!("http://{}/metrics", epp.metrics)).await?;
        (metric(
            &page,
            "inference_pool_average_queue_size{name=\"test-pool\"}",
        )? == 3.0)
            .then_some(())
    })
    .await;
    let (whole0, filtered0) = metrics_pages(&c, &sims[0]).await;
    let (whole1, filtered1) = metrics_pages(&c, &sims[1]).await;
    // One whole page to learn the families, then filtered scrapes (the next whole-page check
    // is a minute away).
    assert_eq!(whole0, 1, "sim 0: {whole0} whole, {filtered0} filtered");
    assert!(
        filtered0 >= 1,
        "sim 0: {whole0} whole, {filtered0} filtered"
    );
    // One filtered try, found empty, then whole pages for ten minutes.
    assert_eq!(filtered1, 1, "sim 1: {whole1} whole, {filtered1} filtered");
    assert!(whole1 >= 2, "sim 1: {whole1} whole, {filtered1} filtered");
    for r in running {
        r.abort();
    }
}

/// `--unknown-models reject`: a model no rule names is a 404 even when a server has it; a
/// pool file's own `unknownModels: route` wins over the flag.
#[tokio::test]
async fn unknown_models_flag_and_pool_file_setting() {
    let named =
        "models:\n- modelName: chat\n  targetModels: [{name: meta-llama/Llama-3.1-8B-Instruct}]\n";
    let f = Fleet::start(FleetOptions {
        sims: 1,
        models_yaml: named,
        epp_flags: &["--unknown-models", "reject"],
        ..Default::default()
    })
    .await;
    let (s, body) = f
        .complete(json!({"model": BASE, "prompt": "x", "max_tokens": 1}))
        .await;
    assert_eq!(s, 404, "{body}");
    let (s, body) = f
        .complete(json!({"model": "chat", "prompt": "x", "max_tokens": 1}))
        .await;
    assert_eq!(s, 200, "{body}");
    let routed = format!("{named}unknownModels: route\n");
    let f = Fleet::start(FleetOptions {
        sims: 1,
        models_yaml: &routed,
        epp_flags: &["--unknown-models", "reject"],
        ..Default::default()
    })
    .await;
    let (s, body) = f
        .complete(json!({"model": BASE, "prompt": "x", "max_tokens": 1}))
        .await;
    assert_eq!(s, 200, "{body}");
}

/// A memory field of `/proc/<pid>/status` (`VmHWM` peak, `VmRSS` now), in bytes.
fn proc_memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

fn peak_rss(pid: u32) -> u64 {
    proc_memory(pid, "VmHWM")
}

fn rss(pid: u32) -> u64 {
    proc_memory(pid, "VmRSS")
}

/// A 30 MiB body for a model with a canary split is rewritten in place: the EPP's RSS grows
/// by under 3x the body at its peak (a parsed tree of it took 1.18 GB), in both body modes.
#[tokio::test]
async fn huge_rewritten_body_costs_about_one_copy() {
    let f = Fleet::start(FleetOptions {
        sims: 1,
        adapters: &[("food-review-1", &[0]), ("food-review-2", &[0])],
        models_yaml: SPLIT,
        full_duplex: true,
        ..Default::default()
    })
    .await;
    let pid = f.epp.proc.child.id();
    let size = 30 * 1024 * 1024;
    // Long strings with escapes in the prompt: the costly case for a tree.
    let unit = "the soup was \\\"cold\\\" \\u4e2d ";
    let prompt = unit.repeat(size / unit.len());
    let body = format!("{{\"model\":\"food-review\",\"max_tokens\":1,\"prompt\":\"{prompt}\"}}");
    assert!(body.len() >= size);
    let before = peak_rss(pid);
    let r =
        f.c.post(f.url("/v1/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
    // The simulator refuses a prompt that long (400, context length): the EPP's work is done.
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(!text.contains("epp_"), "{text}");
    let peak = peak_rss(pid);
    eprintln!("peak RSS {} MiB, before {} MiB", peak >> 20, before >> 20);
    // Growth over the process's own size (a debug build idles at ~30 MiB, and jemalloc
    // rounds a 30 MiB buffer up to its 32 MiB size class).
    assert!(
        peak - before < 3 * size as u64,
        "peak RSS {} MiB (before: {} MiB) for a {} MiB body",
        peak >> 20,
        before >> 20,
        size >> 20
    );
    // The request did reach the server, rewritten to an adapter it has (an unknown model
    // would be a 404): the server's own context-length refusal.
    assert!(text.contains("context length"), "{text}");
}

/// Clients choose model names: 10,000 random ones and 1 MiB ones mint no metric series, do
/// not grow memory and do not reach the logs whole.
#[tokio::test]
async fn client_chosen_model_names_mint_no_series() {
    let f = Fleet::start(FleetOptions {
        sims: 1,
        full_duplex: true,
        ..Default::default()
    })
    .await;
    let pid = f.epp.proc.child.id();
    // Warm up: the known model's series exist, allocators have settled.
    for _ in 0..50 {
        let (s, _) = f
            .complete(json!({"model": BASE, "prompt": "x", "max_tokens": 1}))
            .await;
        assert_eq!(s, 200);
        let _ = f
            .complete(json!({"model": "warm-up-name", "prompt": "x"}))
            .await;
    }
    let series = |page: &str| page.lines().filter(|l| !l.starts_with('#')).count();
    let page0 = f.epp_metrics().await;
    let (rss0, log0) = (rss(pid), f.epp.proc.logs().len());
    let names: Vec<String> = (0..10_000)
        .map(|i| format!("m-{i}-{:x}", rand::random::<u64>()))
        .collect();
    for chunk in names.chunks(50) {
        let answers = futures::future::join_all(
            chunk
                .iter()
                .map(|m| f.complete(json!({"model": m, "prompt": "x", "max_tokens": 1}))),
        )
        .await;
        for (s, body) in answers {
            assert_eq!(s, 404, "{body}");
        }
    }
    let huge = "x".repeat(1024 * 1024);
    for i in 0..40 {
        let (s, body) = f
            .complete(json!({"model": format!("{huge}{i}"), "prompt": "x"}))
            .await;
        assert_eq!(s, 400, "{}", &body[..body.len().min(300)]);
        assert!(body.len() < 4096, "the answer does not echo the name");
    }
    let page = f.epp_metrics().await;
    assert!(
        series(&page) <= series(&page0) + 4,
        "{} series before, {} after:\n{page}",
        series(&page0),
        series(&page)
    );
    assert!(!page.contains("m-9999-"), "{page}");
    assert!(page.contains("model_name=\"other\""), "{page}");
    let grown = rss(pid).saturating_sub(rss0);
    eprintln!(
        "series {} -> {}, RSS {} -> {} KiB, page {} -> {} bytes",
        series(&page0),
        series(&page),
        rss0 >> 10,
        rss(pid) >> 10,
        page0.len(),
        page.len()
    );
    assert!(grown < 16 << 20, "RSS grew {} MiB", grown >> 20);
    // One line per rejection at most, each bounded: no 1 MiB name in the logs.
    let logged = f.epp.proc.logs().len() - log0;
    assert!(logged < 10_040 * 600, "{logged} bytes of logs");
}

/// Requests without a body (GET, an empty POST, odd methods) are picked on their headers in
/// both body modes: the server answers them, never a 500 from a protocol error (full duplex
/// used to answer a body phase Envoy never opened).
#[tokio::test]
async fn bodyless_requests_in_both_body_modes() {
    for full_duplex in [false, true] {
        let f = Fleet::start(FleetOptions {
            sims: 1,
            full_duplex,
            ..Default::default()
        })
        .await;
        let r = f.c.get(f.url("/v1/models")).send().await.unwrap();
        assert_eq!(r.status(), 200, "GET /v1/models, full duplex {full_duplex}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["data"][0]["id"], BASE);
        for method in ["POST", "DELETE", "OPTIONS", "PATCH"] {
            let r =
                f.c.request(method.parse().unwrap(), f.url("/v1/completions"))
                    .send()
                    .await
                    .unwrap();
            let s = r.status().as_u16();
            let body = r.text().await.unwrap();
            assert!(
                (400..500).contains(&s),
                "{method} without a body, full duplex {full_duplex}: {s} {body}"
            );
        }
        let r = f.c.get(f.url("/health")).send().await.unwrap();
        assert_eq!(r.status(), 200, "full duplex {full_duplex}");
        assert_eq!(sim_total(&f.c, &f.sims[0]).await, 0);
    }
}

async fn stall(c: &reqwest::Client, sim: &Proc, on: bool) {
    let r = c
        .post(format!("http://{}/sim/faults", sim.addr))
        .json(&json!({"stall": on}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Scrapes time out across the whole fleet (the EPP or the network is slow): nobody is
/// evicted, so critical work is still routed rather than answered 503; one server stuck while
/// the rest answer is taken out after three timed-out scrapes.
#[tokio::test]
async fn a_slow_fleet_is_not_evicted_a_stuck_server_is() {
    let f = Fleet::start(FleetOptions {
        sims: 3,
        epp_flags: &["--scrape-timeout", "100ms"],
        ..Default::default()
    })
    .await;
    for s in &f.sims {
        stall(&f.c, s, true).await;
    }
    // Well past three timeouts of every endpoint.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let req = f.complete(json!({"model": BASE, "prompt": "critical", "max_tokens": 1}));
    let lift = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for s in &f.sims {
            stall(&f.c, s, false).await;
        }
    };
    let ((s, body), ()) = tokio::join!(req, lift);
    assert_eq!(s, 200, "routed while the fleet was slow: {body}");
    // One stuck server among answering ones is taken out: requests go to the other two.
    wait_for("all scraped again", T, || async {
        let page = f.epp_metrics().await;
        (metric(&page, "inference_pool_ready_pods{name=\"test-pool\"}")? == 3.0).then_some(())
    })
    .await;
    stall(&f.c, &f.sims[0], true).await;
    let stuck_before = sim_total(&f.c, &f.sims[0]).await;
    let stuck = f.sims[0].addr.clone();
    wait_for("the stuck server taken out", T, || async {
        let v = try_json(&f.c, &format!("http://{}/debug/pool", f.epp.metrics)).await?;
        v["endpoints"]
            .as_array()?
            .iter()
            .any(|e| e["address"] == stuck.as_str() && e["healthy"] == false)
            .then_some(())
    })
    .await;
    for i in 0..10 {
        let (s, body) = tokio::time::timeout(
            Duration::from_secs(5),
            f.complete(json!({"model": BASE, "prompt": format!("p{i}"), "max_tokens": 1})),
        )
        .await
        .expect("a request was sent to the stuck server");
        assert_eq!(s, 200, "{body}");
    }
    stall(&f.c, &f.sims[0], false).await;
    assert_eq!(sim_total(&f.c, &f.sims[0]).await, stuck_before);
}

async fn faults(c: &reqwest::Client, sim: &Proc, faults: Value) {
    let r = c
        .post(format!("http://{}/sim/faults", sim.addr))
        .json(&faults)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Sends `n` requests, `concurrency` at a time; the statuses in the order they were sent.
async fn statuses(f: &Fleet, n: usize, concurrency: usize) -> Vec<u16> {
    use futures::StreamExt;
    futures::stream::iter(0..n)
        .map(|i| async move {
            f.complete(json!({"model": BASE, "prompt": format!("q{i}"), "max_tokens": 2}))
                .await
                .0
        })
        .buffered(concurrency)
        .collect()
        .await
}

/// A server whose engine died keeps answering `/metrics` while every request gets a 500
/// (what vLLM does): passive health takes it out after a few failed answers, its `/health`
/// keeps it out, and it comes back when it recovers. One whose `/health` still says fine is
/// taken out by its answers alone.
#[tokio::test]
async fn a_server_whose_engine_dies_is_taken_out_by_its_answers() {
    let f = Fleet::start(FleetOptions {
        sims: 3,
        ..Default::default()
    })
    .await;
    let ready = || async {
        let page = f.epp_metrics().await;
        metric(&page, "inference_pool_ready_pods{name=\"test-pool\"}")
    };
    assert_eq!(statuses(&f, 12, 3).await, vec![200; 12]);
    // Answers only: /health stays good, so this is the outlier detector's doing.
    faults(&f.c, &f.sims[0], json!({"failure_rate": 1.0})).await;
    let first = statuses(&f, 60, 4).await;
    let failed = first.iter().filter(|s| **s != 200).count();
    eprintln!(
        "engine died (file mode): {failed} of {} failed",
        first.len()
    );
    assert!((1..=6).contains(&failed), "{failed} failed: {first:?}");
    assert!(first[30..].iter().all(|s| *s == 200), "{first:?}");
    let pool = || async {
        let v = try_json(&f.c, &format!("http://{}/debug/pool", f.epp.metrics))
            .await
            .unwrap();
        v["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == f.sims[0].addr.as_str())
            .unwrap()
            .clone()
    };
    // Out for its first ejection (2 s): the sequence above took well under that.
    let out = pool().await;
    assert_eq!(
        (&out["ejected"], &out["healthy"]),
        (&json!(true), &json!(false)),
        "{out}"
    );
    // The engine is dead: /health 503 keeps it out past its ejection time.
    faults(
        &f.c,
        &f.sims[0],
        json!({"failure_rate": 1.0, "unhealthy": true}),
    )
    .await;
    let dead_before = sim_total(&f.c, &f.sims[0]).await;
    for _ in 0..3 {
        assert_eq!(statuses(&f, 20, 4).await, vec![200; 20]);
    }
    // Its /health is read on the scrape's schedule: wait for it rather than assume the
    // requests above outlasted a scrape (a loaded machine answered them faster than one).
    let dead = wait_for("the dead engine's /health seen", T, || async {
        let e = pool().await;
        (e["engine_down"] == json!(true)).then_some(e)
    })
    .await;
    assert_eq!(dead["healthy"], json!(false), "{dead}");
    // Recovery: a good /health and scrape put it back.
    faults(
        &f.c,
        &f.sims[0],
        json!({"failure_rate": 0.0, "unhealthy": false}),
    )
    .await;
    wait_for("the recovered server back in the pool", T, || async {
        (ready().await? == 3.0).then_some(())
    })
    .await;
    wait_for("traffic on the recovered server", T, || async {
        assert_eq!(statuses(&f, 12, 3).await, vec![200; 12]);
        (sim_total(&f.c, &f.sims[0]).await > dead_before).then_some(())
    })
    .await;
    let logs = f.epp.proc.logs();
    assert!(logs.contains("answers with server errors"), "{logs}");
}

/// Sum of a metric family's series whose line contains every `parts` (0 when none).
fn metric_sum(page: &str, name: &str, parts: &[&str]) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && parts.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const HELD: &str = "inference_extension_flow_control_queue_size{";

impl Fleet {
    async fn held(&self) -> f64 {
        metric_sum(&self.epp_metrics().await, HELD, &[])
    }

    async fn wait_held(&self, n: f64) {
        wait_for(&format!("{n} requests held by flow control"), T, || async {
            (self.held().await == n).then_some(())
        })
        .await;
    }

    /// A request that keeps the only batch slot busy for about `tokens` x 20 ms.
    fn blocker(&self, tokens: u32) -> tokio::task::JoinHandle<u16> {
        let c = self.c.clone();
        let url = self.url("/v1/completions");
        tokio::spawn(async move {
            c.post(url)
                .json(&json!({"model": BASE, "prompt": "blocker", "max_tokens": tokens}))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        })
    }
}

const FLOW_MODELS: &str = "models:\n- modelName: chat-critical\n  criticality: Critical\n  targetModels: [{name: meta-llama/Llama-3.1-8B-Instruct}]\n- modelName: batch\n  criticality: Sheddable\n  targetModels: [{name: meta-llama/Llama-3.1-8B-Instruct}]\n";

/// With the pool saturated, requests are held in the EPP, not shed and not piled on the
/// server: a critical request queued after sheddable ones is dispatched first, caps answer
/// 429, and every held request is accounted for in the metrics.
#[tokio::test]
async fn flow_control_holds_requests_and_dispatches_critical_first() {
    let cfg = "featureGates: [flowControl]\nsaturationDetector: {runningRequestsThreshold: 1}\nflowControl:\n  maxRequests: 4\n  defaultRequestTTL: 60s\n";
    let f = Fleet::start(FleetOptions {
        sims: 1,
        sim_flags: &["--max-num-seqs", "1", "--decode-base-ms", "20"],
        models_yaml: FLOW_MODELS,
        epp_flags: &["--config-text", cfg],
        ..Default::default()
    })
    .await;
    let blocker = f.blocker(40);
    wait_for("the blocker to run", T, || async {
        (sim_total(&f.c, &f.sims[0]).await == 1).then_some(())
    })
    .await;
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let send = |model: &'static str, tag: String| {
        let c = f.c.clone();
        let url = f.url("/v1/completions");
        let order = order.clone();
        tokio::spawn(async move {
            let r = c
                .post(url)
                .json(&json!({"model": model, "prompt": tag, "max_tokens": 2}))
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            order.lock().unwrap().push(tag);
            s
        })
    };
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(send("batch", format!("sheddable-{i}")));
        f.wait_held(f64::from(i + 1)).await;
    }
    held.push(send("chat-critical", "critical".into()));
    f.wait_held(4.0).await;
    // Nothing reached the server while the batch slot was busy.
    assert_eq!(sim_total(&f.c, &f.sims[0]).await, 1);
    // The queues hold 4 (flowControl.maxRequests): the next one is refused at once.
    let (s, body) = f
        .complete(json!({"model": "batch", "prompt": "over", "max_tokens": 1}))
        .await;
    assert_eq!(s, 429, "{body}");
    assert!(body.contains("maxRequests"), "{body}");
    assert_eq!(blocker.await.unwrap(), 200);
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(order[0], "critical", "completion order: {order:?}");
    assert_eq!(sim_total(&f.c, &f.sims[0]).await, 5);
    let page = f.epp_metrics().await;
    let d = "inference_extension_flow_control_request_queue_duration_seconds_count{";
    assert_eq!(
        metric_sum(&page, d, &["outcome=\"Dispatched\"", "priority=\"-1\""]),
        3.0,
        "{page}"
    );
    assert_eq!(
        metric_sum(&page, d, &["outcome=\"Dispatched\"", "priority=\"1\""]),
        1.0
    );
    assert_eq!(metric_sum(&page, d, &["outcome=\"RejectedCapacity\""]), 1.0);
    assert_eq!(metric_sum(&page, HELD, &[]), 0.0);
    assert!(
        page.contains(
            "inference_extension_flow_control_pool_saturation{inference_pool=\"test-pool\"}"
        ),
        "{page}"
    );
}

/// Held requests in full-duplex mode: one past its TTL gets 503 with a JSON error; one whose
/// client goes away (a body-less GET here) leaves the queue at once and never reaches a
/// server; `/v1/models` is answered by the EPP even while the pool is saturated.
#[tokio::test]
async fn flow_control_ttl_gives_503_and_a_cancelled_request_never_runs() {
    let cfg = "featureGates: [flowControl]\nsaturationDetector: {runningRequestsThreshold: 1}\nflowControl:\n  defaultRequestTTL: 400ms\n";
    let f = Fleet::start(FleetOptions {
        sims: 1,
        sim_flags: &["--max-num-seqs", "1", "--decode-base-ms", "20"],
        models_yaml: FLOW_MODELS,
        epp_flags: &["--config-text", cfg],
        full_duplex: true,
        ..Default::default()
    })
    .await;
    let blocker = f.blocker(100);
    wait_for("the blocker to run", T, || async {
        (sim_total(&f.c, &f.sims[0]).await == 1).then_some(())
    })
    .await;
    let (s, body) = f
        .complete(json!({"model": "chat-critical", "prompt": "late", "max_tokens": 1}))
        .await;
    assert_eq!(s, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("defaultRequestTTL"),
        "{body}"
    );
    // The model list needs no server: answered at once even now.
    let r =
        f.c.get(f.url("/v1/models"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 200);
    // Clients that give up while held: their requests leave the queue at once.
    let gone =
        f.c.post(f.url("/v1/completions"))
            .json(&json!({"model": "chat-critical", "prompt": "gone", "max_tokens": 1}))
            .timeout(Duration::from_millis(150))
            .send()
            .await;
    assert!(gone.is_err(), "{gone:?}");
    f.wait_held(0.0).await;
    let gone =
        f.c.get(f.url("/version"))
            .timeout(Duration::from_millis(150))
            .send()
            .await;
    assert!(gone.is_err(), "{gone:?}");
    f.wait_held(0.0).await;
    let page = f.epp_metrics().await;
    let d = "inference_extension_flow_control_request_queue_duration_seconds_count{";
    assert_eq!(
        metric_sum(&page, d, &["outcome=\"EvictedContextCancelled\""]),
        2.0,
        "{page}"
    );
    assert_eq!(metric_sum(&page, d, &["outcome=\"EvictedTTL\""]), 1.0);
    assert_eq!(blocker.await.unwrap(), 200);
    // The next request runs; the cancelled one never did (the server saw the blocker and it).
    let (s, body) = f
        .complete(json!({"model": "batch", "prompt": "next", "max_tokens": 1}))
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(sim_total(&f.c, &f.sims[0]).await, 2);
    let r = f.c.get(f.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// Two EPP replicas behind one Envoy (its ext_proc cluster lists both; Envoy balances the
/// streams): requests sharing a prompt prefix land on the same model server whichever
/// replica picks them (rendezvous affinity, no shared state), and both replicas answer.
#[tokio::test]
async fn two_replicas_send_one_prefix_to_one_server() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let sims: Vec<Proc> = (0..4)
        .map(|_| spawn_sim(&["--time-scale", "0.1"], dir.path()))
        .collect();
    let pool_file = dir.path().join("pool.yaml");
    std::fs::write(&pool_file, pool_yaml(&sims, "")).unwrap();
    let epps = [
        spawn_epp(&pool_file, &[], dir.path()),
        spawn_epp(&pool_file, &[], dir.path()),
    ];
    for e in &epps {
        wait_for("a replica to see every endpoint", T, || async {
            let page = try_text(&c, &format!("http://{}/metrics", e.metrics)).await?;
            (metric(&page, "inference_pool_ready_pods{name=\"test-pool\"}")? == 4.0).then_some(())
        })
        .await;
    }
    // route-bench's gateway: the shipped template with every replica in the ext_proc cluster.
    let cfg = inferlane::bench::fleet::envoy_config(
        &[port_of(&epps[0].grpc), port_of(&epps[1].grpc)],
        &[],
    );
    let envoy = spawn_envoy_config(&cfg, dir.path()).await;
    let url = format!("http://127.0.0.1:{}/v1/completions", envoy.port);
    let one_server_per_tenant = |round: &'static str| {
        let (c, sims, url) = (&c, &sims, &url);
        async move {
            for tenant in ["alpha", "bravo", "charlie"] {
                let mut before = Vec::new();
                for s in sims {
                    before.push(sim_total(c, s).await);
                }
                let system = format!("You are the assistant of tenant {tenant}. ").repeat(40);
                for i in 0..12 {
                    let r = c
                        .post(url)
                        .json(&json!({"model": BASE, "prompt": format!("{system} question {i}"), "max_tokens": 1}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                }
                let mut got = Vec::new();
                for (s, b) in sims.iter().zip(&before) {
                    got.push(sim_total(c, s).await - b);
                }
                assert_eq!(
                    got.iter().filter(|&&n| n > 0).count(),
                    1,
                    "{round}: tenant {tenant}'s requests were spread: {got:?}"
                );
            }
        }
    };
    one_server_per_tenant("addresses").await;
    // Both replicas place the same three prefixes.
    for e in &epps {
        let v = try_json(&c, &format!("http://{}/debug/pool", e.metrics))
            .await
            .unwrap();
        assert_eq!(v["active_prefixes"], 3, "{v}");
    }
    // Naming the servers live (placement then hashes the names) replaces the endpoints on
    // both replicas, and they still agree.
    let named: String = pool_yaml(&sims, "")
        .lines()
        .enumerate()
        .map(|(i, l)| match l.strip_prefix("- address: ") {
            Some(a) => format!("- {{address: {a}, name: vllm-{i}}}\n"),
            None => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&pool_file, named).unwrap();
    for e in &epps {
        wait_for("a replica to take the names", T, || async {
            let v = try_json(&c, &format!("http://{}/debug/pool", e.metrics)).await?;
            let eps = v["endpoints"].as_array()?;
            (eps.len() == 4
                && eps
                    .iter()
                    .all(|e| e["name"].as_str().is_some_and(|n| n.starts_with("vllm-"))))
            .then_some(())
        })
        .await;
        wait_for("a replica to see every renamed endpoint", T, || async {
            let page = try_text(&c, &format!("http://{}/metrics", e.metrics)).await?;
            (metric(&page, "inference_pool_ready_pods{name=\"test-pool\"}")? == 4.0).then_some(())
        })
        .await;
    }
    one_server_per_tenant("names").await;
    // Both replicas picked (Envoy spread the streams over them).
    for e in &epps {
        let page = try_text(&c, &format!("http://{}/metrics", e.metrics))
            .await
            .unwrap();
        let picks: f64 = page
            .lines()
            .filter(|l| l.starts_with("inference_extension_picks_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(picks >= 3.0, "a replica picked {picks} times:\n{page}");
    }
}

/// Servers that report no residency (vLLM 0.32): the EPP replays the adapters it sends each
/// server through an LRU of `--lora-max-cpu-loras` and keeps each adapter where it was read,
/// so alternating requests for two adapters on one-entry caches read each once, not on
/// every switch; a server back from a dead engine (it may have restarted with an empty
/// cache) starts with no guess.
#[tokio::test]
async fn residency_guessed_from_what_was_sent_and_forgotten_on_recovery() {
    let f = Fleet::start(FleetOptions {
        sims: 3,
        sim_flags: &[
            "--enable-lora",
            "--max-loras",
            "1",
            "--max-cpu-loras",
            "1",
            "--lora-disk-ms-per-rank",
            "1",
            "--time-scale",
            "0.1",
        ],
        adapters: &[("a", &[0, 1, 2]), ("b", &[0, 1, 2])],
        epp_flags: &["--lora-max-cpu-loras", "1"],
        ..Default::default()
    })
    .await;
    let disk_loads = || async {
        let mut n = 0;
        for s in &f.sims {
            n += sim_stats(&f.c, s).await["lora_disk_loads"]
                .as_u64()
                .unwrap();
        }
        n
    };
    let before = disk_loads().await;
    for i in 0..30 {
        let model = if i % 2 == 0 { "a" } else { "b" };
        let (s, body) = f
            .complete(json!({"model": model, "prompt": format!("r{i}"), "max_tokens": 1}))
            .await;
        assert_eq!(s, 200, "{body}");
    }
    let reads = disk_loads().await - before;
    // One read each at most, plus one where the EPP's list scrape lagged its first picks.
    assert!(
        reads <= 4,
        "{reads} disk reads for 30 requests of two adapters"
    );
    let pool = || async {
        try_json(&f.c, &format!("http://{}/debug/pool", f.epp.metrics))
            .await
            .unwrap()["endpoints"]
            .as_array()
            .unwrap()
            .clone()
    };
    let guessed = pool().await;
    let i = (0..3)
        .find(|&i| {
            let e = guessed
                .iter()
                .find(|e| e["address"] == f.sims[i].addr.as_str());
            e.is_some_and(|e| e["adapters_sent"].as_u64() > Some(0))
        })
        .expect("a server with adapters sent");
    let sent = |i: usize| {
        let pool = &pool;
        let addr = f.sims[i].addr.clone();
        async move {
            let all = pool().await;
            let e = all.iter().find(|e| e["address"] == addr.as_str()).unwrap();
            (
                e["engine_down"].as_bool().unwrap(),
                e["adapters_sent"].as_u64().unwrap(),
            )
        }
    };
    faults(&f.c, &f.sims[i], json!({"unhealthy": true})).await;
    wait_for("the dead engine taken out", T, || async {
        sent(i).await.0.then_some(())
    })
    .await;
    faults(&f.c, &f.sims[i], json!({"unhealthy": false})).await;
    let after = wait_for("the engine back in the pool", T, || async {
        let (down, n) = sent(i).await;
        (!down).then_some(n)
    })
    .await;
    assert_eq!(
        after, 0,
        "the guess of a server that may have restarted is cleared"
    );
}

/// The stall signal is on by default, and a server whose prefill steps are long learns, from
/// its own token counters, a threshold above them: its long prompts stop counting as stalls
/// after a few, while an adapter read (a spell that computes little) still counts.
#[tokio::test]
async fn a_servers_long_prefill_steps_raise_its_stall_threshold_and_reads_still_count() {
    // 3,000 prompt tokens prefill in 600 ms.
    let f = stall_fleet(&["--prefill-us-per-token", "200"]).await;
    let post = |path, body| post_to_sim(&f, path, body);
    // Busy throughout: a long decode (2,000 tokens at 8 ms) the prefills join.
    let busy = post(
        "/v1/completions",
        json!({"model": BASE, "prompt": "busy", "max_tokens": 2000}),
    );
    // A prompt of `tokens` (4 characters each, a prefix of its own) while watching /debug/pool:
    // whether the server was ever seen stalled, and its threshold after.
    let prefill = |tokens: usize, tag: usize| {
        let prompt = format!("{tag:04}{}", "abcd".repeat(tokens - 1));
        let req = post(
            "/v1/completions",
            json!({"model": BASE, "prompt": prompt, "max_tokens": 1}),
        );
        watch_stall(&f, &f.sims[0].addr, req)
    };
    let threshold = || async { stall_of(&f, &f.sims[0].addr).await.and_then(|(_, ms)| ms) };
    assert_eq!(wait_for("a scrape", T, threshold).await, 50, "the default");
    assert!(
        prefill(3000, 0).await,
        "a 600 ms step counts as a stall until the server has made a few"
    );
    for tag in 1..4 {
        prefill(3000, tag).await;
    }
    wait_for(
        "a threshold above the steps learned, the last step over",
        T,
        || async {
            let (stalled, ms) = stall_of(&f, &f.sims[0].addr).await?;
            (!stalled && ms? > 500).then_some(())
        },
    )
    .await;
    assert!(
        !prefill(1500, 4).await,
        "a 300 ms step, shorter than those learned, is no stall"
    );
    // An adapter read holds the engine for longer than any step, computing nothing.
    let path = adapter(f.dir.path(), "slow", 16);
    let load = post(
        "/v1/load_lora_adapter",
        json!({"lora_name": "slow", "lora_path": path}),
    );
    assert!(
        watch_stall(&f, &f.sims[0].addr, load).await,
        "a read counts as a stall"
    );
    busy.abort();
}

/// A server whose every decode step outlasts a scrape interval (a large model) is not judged
/// stalled while it decodes, once it has made a few such steps; a read there still is.
#[tokio::test]
async fn a_server_whose_steps_outlast_a_scrape_is_not_judged_stalled_while_it_decodes() {
    // Every decode step takes 80 ms (scrapes come every 50).
    let f = stall_fleet(&["--decode-base-ms", "80"]).await;
    let sim = f.sims[0].addr.clone();
    let post = |path, body| post_to_sim(&f, path, body);
    // 16 s of decoding.
    let busy = post(
        "/v1/completions",
        json!({"model": BASE, "prompt": "busy", "max_tokens": 200}),
    );
    wait_for("a threshold above its steps", T, || async {
        stall_of(&f, &sim)
            .await
            .and_then(|(_, ms)| ms)
            .filter(|&ms| ms > 100)
    })
    .await;
    // Two seconds more of its steps: never seen stalled.
    let decode = post(
        "/v1/completions",
        json!({"model": BASE, "prompt": "more", "max_tokens": 25}),
    );
    assert!(!watch_stall(&f, &sim, decode).await, "an ordinary step");
    let path = adapter(f.dir.path(), "slow", 16);
    let load = post(
        "/v1/load_lora_adapter",
        json!({"lora_name": "slow", "lora_path": path}),
    );
    assert!(
        watch_stall(&f, &sim, load).await,
        "a read counts as a stall"
    );
    busy.abort();
}

/// One simulator (with `flags`) whose rank-16 adapter reads hold its engine 3.2 s, behind the
/// EPP at its default stall settings.
async fn stall_fleet(flags: &[&str]) -> Fleet {
    let mut sim_flags = vec![
        "--enable-lora",
        "--max-loras",
        "2",
        "--lora-disk-ms-per-rank",
        "200",
    ];
    sim_flags.extend_from_slice(flags);
    Fleet::start(FleetOptions {
        sims: 1,
        sim_flags: &sim_flags,
        ..Default::default()
    })
    .await
}

/// Posts `body` to the fleet's first simulator, past the EPP.
fn post_to_sim(
    f: &Fleet,
    path: &str,
    body: Value,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::StatusCode>> {
    let (c, url) = (f.c.clone(), format!("http://{}{path}", f.sims[0].addr));
    tokio::spawn(async move { c.post(url).json(&body).send().await.map(|r| r.status()) })
}

/// What `/debug/pool` says of `addr`: stalled, and its stall threshold (ms).
async fn stall_of(f: &Fleet, addr: &str) -> Option<(bool, Option<u64>)> {
    let v = try_json(&f.c, &format!("http://{}/debug/pool", f.epp.metrics)).await?;
    let e = v["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["address"] == addr)?
        .clone();
    Some((e["stalled"].as_bool()?, e["stall_after_ms"].as_u64()))
}

/// Polls `/debug/pool` for `addr` until `req` ends (answered 200): whether it was ever seen
/// stalled meanwhile.
async fn watch_stall(
    f: &Fleet,
    addr: &str,
    req: tokio::task::JoinHandle<reqwest::Result<reqwest::StatusCode>>,
) -> bool {
    let mut seen = false;
    let deadline = tokio::time::Instant::now() + T;
    while !req.is_finished() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "request still running after {T:?}"
        );
        seen |= stall_of(f, addr).await.is_some_and(|(s, _)| s);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(req.await.unwrap().unwrap(), 200);
    seen
}

/// A server whose engine makes no step while requests run there (here a LoRA read someone
/// else started: another replica's request, a sidecar's load) gets no request that another
/// server can take, from the scrapes alone; it gets requests again once it steps.
#[tokio::test]
async fn a_server_whose_engine_stalls_is_avoided_until_it_steps_again() {
    let f = Fleet::start(FleetOptions {
        sims: 2,
        // A rank-16 adapter's read holds the engine 3.2 s.
        sim_flags: &[
            "--enable-lora",
            "--max-loras",
            "2",
            "--lora-disk-ms-per-rank",
            "200",
        ],
        // Far above a step of the other, busy server even on a loaded machine.
        epp_flags: &["--engine-stall-after", "300ms"],
        ..Default::default()
    })
    .await;
    // Both busy with a long request (2,000 tokens at 8 ms), sent past the EPP.
    let long: Vec<_> = f
        .sims
        .iter()
        .map(|s| {
            let (c, url) = (f.c.clone(), format!("http://{}/v1/completions", s.addr));
            tokio::spawn(async move {
                let body = json!({"model": BASE, "prompt": "long", "max_tokens": 2000});
                c.post(url).json(&body).send().await.map(|r| r.status())
            })
        })
        .collect();
    let path = adapter(f.dir.path(), "slow", 16);
    let stalled_on = |addr: String| {
        let (c, page) = (f.c.clone(), format!("http://{}/debug/pool", f.epp.metrics));
        async move {
            let v = try_json(&c, &page).await?;
            let e = v["endpoints"]
                .as_array()?
                .iter()
                .find(|e| e["address"] == addr.as_str())?
                .clone();
            e["stalled"].as_bool()
        }
    };
    let (a, b) = (f.sims[0].addr.clone(), f.sims[1].addr.clone());
    wait_for("both busy and stepping", T, || async {
        let busy = f.totals().await.iter().all(|&n| n >= 1);
        let stepping = stalled_on(a.clone()).await == Some(false);
        (busy && stepping).then_some(())
    })
    .await;
    let before = sim_total(&f.c, &f.sims[0]).await;
    let load = {
        let (c, url) = (f.c.clone(), format!("http://{a}/v1/load_lora_adapter"));
        tokio::spawn(async move {
            let body = json!({"lora_name": "slow", "lora_path": path});
            c.post(url).json(&body).send().await.map(|r| r.status())
        })
    };
    wait_for("the EPP to see the first server stall", T, || async {
        stalled_on(a.clone()).await.filter(|&s| s)
    })
    .await;
    f.complete_all_ok(6, "p").await;
    assert_eq!(
        sim_total(&f.c, &f.sims[0]).await,
        before,
        "a request went to {a} while its engine was held"
    );
    assert_eq!(stalled_on(b.clone()).await, Some(false));
    assert_eq!(load.await.unwrap().unwrap(), 200);
    wait_for("the stall seen to end", T, || async {
        stalled_on(a.clone()).await.filter(|&s| !s)
    })
    .await;
    for h in long {
        h.abort();
    }
}
