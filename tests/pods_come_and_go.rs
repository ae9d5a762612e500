//! Pods that come and go under load, in Kubernetes mode through Envoy: a rolling restart fails nothing, a dead engine costs a handful.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::fake_api::*;
use common::*;
use serde_json::{Value, json};

const PODS: &str = "/v1/pods";
const POOLS: &str = "inference.networking.k8s.io/v1/inferencepools";
const T: Duration = Duration::from_secs(30);

/// A pod of the pool; `terminating` sets the deletionTimestamp kubelet's shutdown starts with.
fn pod(name: &str, ip: &str, terminating: bool) -> Value {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"app": "vllm", "inference.networking.k8s.io/engine-type": "vllm"}},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}});
    if terminating {
        p["metadata"]["deletionTimestamp"] = json!("2026-12-06T00:00:00Z");
    }
    p
}

/// A port free on every address below (the pool's one targetPort).
fn free_port(ips: &[String]) -> u16 {
    for _ in 0..50 {
        let l = std::net::TcpListener::bind((ips[0].as_str(), 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        if ips[1..]
            .iter()
            .all(|ip| std::net::TcpListener::bind((ip.as_str(), port)).is_ok())
        {
            return port;
        }
    }
    panic!("no common free port");
}

struct Cluster {
    api: FakeApi,
    epp: Epp,
    envoy: Envoy,
    sims: Vec<Proc>,
    ips: Vec<String>,
    port: u16,
    dir: tempfile::TempDir,
    c: reqwest::Client,
}

impl Cluster {
    async fn start(n: usize, base: u8) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let c = client();
        let ips: Vec<String> = (0..n)
            .map(|i| format!("127.0.0.{}", base as usize + i))
            .collect();
        let port = free_port(&ips);
        let sims = ips.iter().map(|ip| sim(ip, port, dir.path())).collect();
        let api = FakeApi::new();
        let addr = start_fake(api.clone()).await;
        let kc = kubeconfig(dir.path(), &addr);
        api.put(POOLS, json!({"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": "llama", "namespace": "default"},
            "spec": {"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": port}],
                     "endpointPickerRef": {"name": "llama-epp"}}}));
        for (i, ip) in ips.iter().enumerate() {
            api.put(PODS, pod(&format!("vllm-{i}"), ip, false));
        }
        let epp = spawn_epp_with(
            &[
                "--pool-name",
                "llama",
                "--pool-namespace",
                "default",
                "--metrics-endpoint-auth=false",
            ],
            &[("KUBECONFIG", kc.as_str())],
            dir.path(),
        );
        let envoy = spawn_envoy_for(&epp, dir.path()).await;
        let cl = Cluster {
            api,
            epp,
            envoy,
            sims,
            ips,
            port,
            dir,
            c,
        };
        let all: Vec<String> = cl.ips.iter().map(|ip| format!("{ip}:{port}")).collect();
        cl.wait_pool("every pod routed", &all).await;
        cl
    }

    /// Usable endpoints as the EPP's picker sees them.
    async fn usable(&self) -> Option<Vec<String>> {
        let v = try_json(&self.c, &format!("http://{}/debug/pool", self.epp.metrics)).await?;
        Some(
            v["endpoints"]
                .as_array()?
                .iter()
                .filter(|e| e["healthy"] == true)
                .map(|e| e["address"].as_str().unwrap_or("").to_string())
                .collect(),
        )
    }

    async fn wait_pool(&self, what: &str, want: &[String]) {
        wait_for(what, T, || async {
            let mut got = self.usable().await?;
            got.sort();
            (got == want).then_some(())
        })
        .await;
    }

    /// Load until `stop`: `concurrency` clients sending short completions back to back.
    fn load(
        &self,
        concurrency: usize,
        stop: Arc<AtomicBool>,
    ) -> Vec<tokio::task::JoinHandle<Vec<(u16, String)>>> {
        let url = format!("http://127.0.0.1:{}/v1/completions", self.envoy.port);
        (0..concurrency)
            .map(|w| {
                let (c, url, stop) = (self.c.clone(), url.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    let mut i = 0;
                    // Bounded: a stuck test ends on its own.
                    while !stop.load(Ordering::Relaxed) && i < 20_000 {
                        i += 1;
                        let body = json!({"model": "meta-llama/Llama-3.1-8B-Instruct",
                                          "prompt": format!("w{w} r{i}"), "max_tokens": 4});
                        let r = match c.post(&url).json(&body).send().await {
                            Ok(r) => {
                                let s = r.status().as_u16();
                                (s, r.text().await.unwrap_or_default())
                            }
                            Err(e) => (0, format!("{e:?}")),
                        };
                        out.push(r);
                    }
                    out
                })
            })
            .collect()
    }

    async fn idle(&self, i: usize) -> Option<()> {
        let page = try_text(&self.c, &format!("http://{}/metrics", self.sims[i].addr)).await?;
        // Every running and waiting series (one per engine) reads 0.
        let busy = page
            .lines()
            .filter(|l| {
                l.starts_with("vllm:num_requests_running{")
                    || l.starts_with("vllm:num_requests_waiting{")
            })
            .any(|l| !l.ends_with(" 0.0"));
        (!busy).then_some(())
    }
}

fn sim(ip: &str, port: u16, dir: &std::path::Path) -> Proc {
    let port = port.to_string();
    spawn_sim(&["--host", ip, "--port", &port, "--time-scale", "0.1"], dir)
}

async fn collect(load: Vec<tokio::task::JoinHandle<Vec<(u16, String)>>>) -> Vec<(u16, String)> {
    let mut all = Vec::new();
    for h in load {
        all.extend(h.await.unwrap());
    }
    all
}

/// Each server in turn: marked terminating (the pod's deletionTimestamp), drained as the
/// preStop sleep lets it, stopped, replaced by a new pod at the same address. With the
/// shipped pattern no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_no_request() {
    let mut cl = Cluster::start(3, 21).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = cl.load(4, stop.clone());
    wait_for("load on every server", T, || async {
        for s in &cl.sims {
            (sim_total(&cl.c, s).await >= 20).then_some(())?;
        }
        Some(())
    })
    .await;
    for i in 0..cl.sims.len() {
        let ip = cl.ips[i].clone();
        let others: Vec<String> = (0..cl.ips.len())
            .filter(|j| *j != i)
            .map(|j| format!("{}:{}", cl.ips[j], cl.port))
            .collect();
        // Terminating: the EPP drops it at once, before the server stops answering.
        cl.api.put(PODS, pod(&format!("vllm-{i}"), &ip, true));
        cl.wait_pool("the terminating pod dropped", &others).await;
        // preStop: the server finishes what it has (two idle readings in a row).
        for _ in 0..2 {
            wait_for("the draining server idle", T, || cl.idle(i)).await;
        }
        let old = &mut cl.sims[i].child;
        let _ = old.kill();
        let _ = old.wait();
        cl.sims[i] = sim(&ip, cl.port, cl.dir.path());
        cl.api.delete(PODS, &format!("vllm-{i}"));
        cl.api.put(PODS, pod(&format!("vllm-{i}-new"), &ip, false));
        let mut all: Vec<String> = cl
            .ips
            .iter()
            .map(|ip| format!("{ip}:{}", cl.port))
            .collect();
        all.sort();
        cl.wait_pool("the new pod routed", &all).await;
        // Some traffic on the full pool before the next one goes.
        wait_for("the new pod served", T, || async {
            (sim_total(&cl.c, &cl.sims[i]).await >= 40).then_some(())
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let all = collect(load).await;
    let failed: Vec<_> = all.iter().filter(|(s, _)| *s != 200).collect();
    eprintln!(
        "rolling restart: {} requests, {} failed",
        all.len(),
        failed.len()
    );
    assert!(all.len() >= 100, "only {} requests", all.len());
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}\nEnvoy: {}",
        failed.len(),
        all.len(),
        &failed[..failed.len().min(5)],
        cl.envoy.proc.logs()
    );
}

/// A server whose engine dies under load (`/health` 503, every request 500, `/metrics` still
/// answering, as vLLM after an engine crash) costs a handful of requests, and none once it is
/// out; it comes back when it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_engine_under_load_costs_a_handful_then_nothing() {
    let cl = Cluster::start(2, 31).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = cl.load(4, stop.clone());
    wait_for("traffic on both", T, || async {
        (sim_total(&cl.c, &cl.sims[0]).await > 5 && sim_total(&cl.c, &cl.sims[1]).await > 5)
            .then_some(())
    })
    .await;
    let r =
        cl.c.post(format!("http://{}/sim/faults", cl.sims[0].addr))
            .json(&json!({"failure_rate": 1.0, "unhealthy": true}))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 200);
    let other = vec![format!("{}:{}", cl.ips[1], cl.port)];
    cl.wait_pool("the dead server out", &other).await;
    let dead_total = sim_total(&cl.c, &cl.sims[0]).await;
    // A while of load with it out: nothing more reaches it.
    let before = cl.usable().await;
    wait_for("more traffic on the live server", T, || async {
        (sim_total(&cl.c, &cl.sims[1]).await > dead_total + 100).then_some(())
    })
    .await;
    assert_eq!(cl.usable().await, before);
    assert_eq!(sim_total(&cl.c, &cl.sims[0]).await, dead_total);
    stop.store(true, Ordering::Relaxed);
    let all = collect(load).await;
    let failed = all.iter().filter(|(s, _)| *s != 200).count();
    eprintln!("dead engine: {} requests, {failed} failed", all.len());
    assert!(failed <= 8, "{failed} of {} failed", all.len());
    assert!(
        all.iter()
            .filter(|(s, _)| *s != 200)
            .all(|(s, _)| *s == 500)
    );
    // Recovered: back in.
    let r =
        cl.c.post(format!("http://{}/sim/faults", cl.sims[0].addr))
            .json(&json!({"failure_rate": 0.0, "unhealthy": false}))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 200);
    let mut all: Vec<String> = cl
        .ips
        .iter()
        .map(|ip| format!("{ip}:{}", cl.port))
        .collect();
    all.sort();
    cl.wait_pool("the recovered server back", &all).await;
}

const LEASES: &str = "coordination.k8s.io/v1/leases";

/// Active-active replicas elect the one that decides LoRA placement on a Lease; the other
/// reads the decider's URL there and copies its table; when the decider dies the other takes
/// over from the table it followed (its ticks and moves go on, no home moves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_elect_a_placement_decider_and_a_takeover_moves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let ips: Vec<String> = (0..2).map(|i| format!("127.0.0.{}", 70 + i)).collect();
    let port = free_port(&ips);
    let p = port.to_string();
    let _sims: Vec<Proc> = ips
        .iter()
        .map(|ip| {
            spawn_sim(
                &[
                    "--host",
                    ip,
                    "--port",
                    &p,
                    "--enable-lora",
                    "--max-loras",
                    "2",
                ],
                dir.path(),
            )
        })
        .collect();
    let api = FakeApi::new();
    let addr = start_fake(api.clone()).await;
    let kc = kubeconfig(dir.path(), &addr);
    api.put(
        POOLS,
        json!({"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": {"name": "llama", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": port}],
                 "endpointPickerRef": {"name": "llama-epp"}}}),
    );
    for (i, ip) in ips.iter().enumerate() {
        api.put(PODS, pod(&format!("vllm-{i}"), ip, false));
    }
    let adapters = dir.path().join("adapters");
    let mut cat = String::from("vLLMLoRAConfig:\n  port: 8000\n  onDemand:\n    models:\n");
    for i in 0..4 {
        let src = adapter(&adapters, &format!("a{i}"), 8);
        cat.push_str(&format!("    - id: a{i}\n      source: {src}\n"));
    }
    let cat_path = dir.path().join("catalogue.yaml");
    std::fs::write(&cat_path, cat).unwrap();
    let replica = |name: &str| {
        spawn_epp_with(
            &[
                "--pool-name",
                "llama",
                "--pool-namespace",
                "default",
                "--metrics-endpoint-auth=false",
                "--lora-catalog",
                cat_path.to_str().unwrap(),
                "--lora-placement-election",
                "--lora-placement-interval",
                "250ms",
                "--lease-duration",
                "2s",
                "--lease-renew-interval",
                "200ms",
            ],
            &[
                ("KUBECONFIG", kc.as_str()),
                ("POD_IP", "127.0.0.1"),
                ("POD_NAME", name),
            ],
            dir.path(),
        )
    };
    let mut replicas = [Some(replica("epp-a")), Some(replica("epp-b"))];
    let addrs: Vec<String> = replicas
        .iter()
        .map(|r| r.as_ref().unwrap().metrics.clone())
        .collect();
    let table = |i: usize| {
        let url = format!("http://{}/lora/v1/placement", addrs[i]);
        let c = c.clone();
        async move { try_json(&c, &url).await }
    };
    let decider_url = || {
        api.get(LEASES, "llama-epp-lora-placement").and_then(|l| {
            l["metadata"]["annotations"]["inferlane.dev/lora-placement-url"]
                .as_str()
                .map(str::to_string)
        })
    };
    // One decides (its URL on the lease); the other's table is a copy of its table.
    let (d, before) = wait_for("a decider and a follower with its table", T, || async {
        let url = decider_url()?;
        let d = addrs.iter().position(|a| url.contains(a.as_str()))?;
        let (theirs, ours) = (table(d).await?, table(1 - d).await?);
        let homed = theirs["servers"]
            .as_object()?
            .values()
            .map(|p| p["homes"].as_object().map_or(0, |h| h.len()))
            .sum::<usize>();
        (homed >= 4 && theirs["tick"].as_u64()? > 2 && ours == theirs).then_some((d, theirs))
    })
    .await;
    replicas[d] = None;
    let s = 1 - d;
    let after = wait_for(
        "the survivor to decide from the table it followed",
        T,
        || async {
            let url = decider_url()?;
            let mine = table(s).await?;
            (url.contains(addrs[s].as_str())
                && mine["tick"].as_u64()? > before["tick"].as_u64()? + 2)
                .then_some(mine)
        },
    )
    .await;
    assert_eq!(after["servers"], before["servers"], "no home moved");
    assert_eq!(after["moves"], before["moves"], "{after}");
}
