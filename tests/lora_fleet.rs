//! LoRA fleet end to end through Envoy: the EPP places catalogue adapters by demand, the sidecars load them before traffic goes there and unload them only once drained; EPP and sidecar restarts move nothing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);
const ADAPTERS: usize = 8;

/// The sidecars' ConfigMap: one pinned adapter, one never, the rest on demand.
fn catalogue(port: u16, dir: &Path) -> String {
    let mut s = format!(
        "vLLMLoRAConfig:\n  host: 127.0.0.1\n  port: {port}\n  ensureExist:\n    models:\n    - id: pinned\n      source: {}\n  ensureNotExist:\n    models:\n    - id: a7\n      source: {}\n  onDemand:\n    models:\n",
        adapter(dir, "pinned", 8),
        adapter(dir, "a7", 8)
    );
    for i in 0..ADAPTERS {
        s.push_str(&format!(
            "    - id: a{i}\n      source: {}\n      rank: {}\n",
            adapter(dir, &format!("a{i}"), 8),
            8 * (1 + i % 2)
        ));
    }
    s
}

struct Rig {
    /// `--lora-cold-adapters resolver`, the servers with a LoRA resolver.
    resolver: bool,
    /// `--lora-copy-names versioned`: the servers' resolver folder holds only the links the
    /// sidecars make (`--lora-resolver-dir`).
    versioned: bool,
    dir: tempfile::TempDir,
    sims: Vec<Proc>,
    sidecars: Vec<Option<Proc>>,
    epp: Option<Epp>,
    envoy: Envoy,
    grpc_port: u16,
    metrics_port: u16,
    c: reqwest::Client,
}

impl Rig {
    async fn start() -> Rig {
        Self::start_with(false).await
    }

    async fn start_with(resolver: bool) -> Rig {
        Self::start_rig(resolver, false).await
    }

    async fn start_rig(resolver: bool, versioned: bool) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let adapters = dir.path().join("adapters");
        std::fs::create_dir_all(&adapters).unwrap();
        // Versioned: each server's own folder, holding only its sidecar's links.
        let resolver_dir = |i: usize| {
            if versioned {
                let d = dir.path().join(format!("resolver{i}"));
                std::fs::create_dir_all(&d).unwrap();
                d.to_string_lossy().into_owned()
            } else {
                adapters.to_string_lossy().into_owned()
            }
        };
        let args = vec![
            "--enable-lora",
            "--max-loras",
            "2",
            "--max-cpu-loras",
            "3",
            "--lora-residency-metrics",
            "--lora-unload-frees",
        ];
        let sims: Vec<Proc> = (0..3)
            .map(|i| {
                let d = resolver_dir(i);
                let mut args = args.clone();
                if resolver {
                    args.extend(["--lora-resolver-dir", &d]);
                }
                spawn_sim(&args, dir.path())
            })
            .collect();
        let mut pool = String::from("pool: {name: test-pool}\nendpoints:\n");
        for s in &sims {
            pool.push_str(&format!("- address: {}\n", s.addr));
        }
        std::fs::write(dir.path().join("pool.yaml"), pool).unwrap();
        std::fs::write(
            dir.path().join("catalogue.yaml"),
            catalogue(8000, &adapters),
        )
        .unwrap();
        for (i, s) in sims.iter().enumerate() {
            std::fs::write(
                dir.path().join(format!("sidecar{i}.yaml")),
                catalogue(port_of(&s.addr), &adapters),
            )
            .unwrap();
        }
        let (grpc_port, metrics_port) = (free_port(), free_port());
        let mut rig = Rig {
            resolver,
            versioned,
            sims,
            sidecars: Vec::new(),
            epp: None,
            envoy: Envoy {
                proc: spawn_sim(&[], dir.path()),
                port: 0,
            },
            grpc_port,
            metrics_port,
            c: client(),
            dir,
        };
        rig.start_epp();
        rig.envoy = spawn_envoy_for(rig.epp.as_ref().unwrap(), rig.dir.path()).await;
        for i in 0..rig.sims.len() {
            let p = rig.start_sidecar(i);
            rig.sidecars.push(Some(p));
        }
        rig
    }

    fn start_epp(&mut self) {
        let pool = self.dir.path().join("pool.yaml");
        let cat = self.dir.path().join("catalogue.yaml");
        let (g, m) = (self.grpc_port.to_string(), self.metrics_port.to_string());
        let mut args = vec![
            "--grpc-port",
            &g,
            "--metrics-port",
            &m,
            "--lora-catalog",
            cat.to_str().unwrap(),
            "--lora-placement-interval",
            "250ms",
            "--lora-max-cpu-loras",
            "3",
        ];
        if self.resolver {
            args.extend(["--lora-cold-adapters", "resolver"]);
        }
        if self.versioned {
            args.extend(["--lora-copy-names", "versioned"]);
        }
        self.epp = Some(spawn_epp(&pool, &args, self.dir.path()));
    }

    /// A second EPP following this rig's (`--lora-placement-from`), with `extra` flags.
    fn spawn_follower(&self, extra: &[&str]) -> Epp {
        let pool = self.dir.path().join("pool.yaml");
        let from = format!("http://127.0.0.1:{}/lora/v1/placement", self.metrics_port);
        let mut args = vec![
            "--lora-placement-from",
            &from,
            "--lora-placement-interval",
            "250ms",
        ];
        args.extend_from_slice(extra);
        spawn_epp(&pool, &args, self.dir.path())
    }

    fn start_sidecar(&self, i: usize) -> Proc {
        self.start_sidecar_at(i, &format!("127.0.0.1:{}", self.metrics_port))
    }

    /// Sidecar `i` asking the EPP whose metrics address is `epp`.
    fn start_sidecar_at(&self, i: usize, epp: &str) -> Proc {
        let cfg = self.dir.path().join(format!("sidecar{i}.yaml"));
        let url = format!("http://{epp}/lora/v1/placement");
        let links = self.dir.path().join(format!("resolver{i}"));
        let mut args = vec![
            "--placement-url",
            &url,
            "--placement-server",
            &self.sims[i].addr,
            "--placement-interval",
            "150ms",
        ];
        if self.versioned {
            args.extend(["--lora-resolver-dir", links.to_str().unwrap()]);
        }
        spawn_sidecar(&cfg, &args, self.dir.path())
    }

    /// What the EPP drained and the sidecars did, for a failure's message.
    fn trail(&self) -> String {
        let mut out = String::new();
        let epp = self.epp.as_ref().map(|e| e.proc.logs()).unwrap_or_default();
        for l in epp.lines().filter(|l| l.contains("drained")) {
            out.push_str(&format!("epp: {l}\n"));
        }
        for (i, sc) in self.sidecars.iter().enumerate() {
            let logs = sc.as_ref().map(|p| p.logs()).unwrap_or_default();
            for l in logs
                .lines()
                .filter(|l| l.contains("done") || l.contains("placement"))
            {
                out.push_str(&format!("sidecar {i} ({}): {l}\n", self.sims[i].addr));
            }
        }
        out
    }

    async fn table(&self) -> Option<Value> {
        try_json(
            &self.c,
            &format!("http://127.0.0.1:{}/lora/v1/placement", self.metrics_port),
        )
        .await
    }

    /// Adapter id -> servers (addresses) that list a version of it.
    async fn listed(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (name, addrs) in self.listed_names().await {
            out.entry(id_of(&name)).or_default().extend(addrs);
        }
        out
    }

    /// Served name -> servers (addresses) that list it.
    async fn listed_names(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for s in &self.sims {
            for name in adapter_ids(&self.c, &s.addr).await.unwrap_or_default() {
                out.entry(name).or_default().insert(s.addr.clone());
            }
        }
        out
    }

    /// Requests a server ran for any version of adapter `id`.
    async fn served(&self, sim: &Proc, id: &str) -> u64 {
        sim_requests(&self.c, sim)
            .await
            .iter()
            .filter(|(name, _)| id_of(name) == id)
            .map(|(_, n)| n)
            .sum()
    }

    /// The deciding EPP's `/metrics` page.
    async fn metrics_page(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        self.c.get(url).send().await.unwrap().text().await.unwrap()
    }

    async fn complete(&self, model: &str) -> (u16, String) {
        complete_at(&self.c, self.envoy.port, model).await
    }
}

/// The catalogue id a served name is a version of.
fn id_of(name: &str) -> String {
    inferlane_sidecar::version::id_of(name)
        .unwrap_or(name)
        .to_string()
}

/// Homes per adapter in a placement table: adapter -> server ids.
fn homes(t: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (server, part) in t["servers"].as_object().unwrap() {
        for id in part["homes"].as_object().unwrap().keys() {
            out.entry(id.clone()).or_default().insert(server.clone());
        }
    }
    out
}

/// Request loops through the rig's Envoy: their stop flag, successes and failures.
#[derive(Default)]
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    /// Sends requests for `models` (round robin) from `workers` more clients until stopped;
    /// counts failures and keeps each failure's text.
    fn start(&mut self, rig: &Arc<Rig>, models: Vec<String>, workers: usize) {
        for w in 0..workers {
            let (rig, models, stop, ok, failed) = (
                rig.clone(),
                models.clone(),
                self.stop.clone(),
                self.ok.clone(),
                self.failed.clone(),
            );
            self.tasks.push(tokio::spawn(async move {
                // Bounded: at most 20,000 requests per worker.
                for i in w..w + 20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let m = &models[i % models.len()];
                    let (code, body) = rig.complete(m).await;
                    if code == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let t = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap()
                            .as_secs_f64();
                        failed
                            .lock()
                            .unwrap()
                            .push(format!("{t:.3} {m}: {code} {body}"));
                    }
                }
            }));
        }
    }

    /// Stops every client and waits for them (what they counted is kept).
    async fn pause(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.tasks.drain(..) {
            h.await.unwrap();
        }
        self.stop.store(false, Ordering::Relaxed);
    }

    /// Stops every client, waits for them and asserts none of their requests failed; how
    /// many succeeded.
    async fn stop_and_check(mut self, rig: &Rig) -> u64 {
        self.pause().await;
        let failures = self.failed.lock().unwrap().clone();
        let done = self.ok.load(Ordering::Relaxed);
        assert!(
            failures.is_empty(),
            "{} failed of {}: {:?}\nEPP and sidecars:\n{}",
            failures.len(),
            done,
            &failures[..failures.len().min(5)],
            rig.trail()
        );
        done
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adapters_are_placed_by_demand_loaded_before_routing_and_drained_before_unloading() {
    let rig = Arc::new(Rig::start().await);
    // Every catalogue adapter gets a home and is loaded there; a7 (ensureNotExist) nowhere;
    // the pinned one everywhere.
    let listed = wait_for("every catalogue adapter loaded on its home", T, || {
        let rig = rig.clone();
        async move {
            let l = rig.listed().await;
            let t = rig.table().await?;
            let h = homes(&t);
            let all = (0..ADAPTERS).filter(|i| *i != 7).all(|i| {
                let id = format!("a{i}");
                h.get(&id).is_some_and(|s| !s.is_empty())
                    && l.get(&id).is_some_and(|s| !s.is_empty())
            });
            if !(all && l.get("pinned").map(BTreeSet::len) == Some(3)) {
                return None;
            }
            // The EPP has read the lists too (it re-reads them every 200 ms).
            let page = try_text(
                &rig.c,
                &format!("http://127.0.0.1:{}/metrics", rig.metrics_port),
            )
            .await?;
            let serving = (0..ADAPTERS).filter(|i| *i != 7).all(|i| {
                let series = format!(
                    "inferlane_epp_lora_adapter_homes{{adapter_name=\"a{i}\",state=\"serving\"}}"
                );
                metric(&page, &series) == Some(1.0)
            });
            serving.then_some(l)
        }
    })
    .await;
    assert!(
        !listed.contains_key("a7"),
        "ensureNotExist is never placed: {listed:?}"
    );
    // Through the gateway, /v1/models is the pool's union in OpenAI's format.
    let r = rig
        .c
        .get(format!("http://127.0.0.1:{}/v1/models", rig.envoy.port))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "list");
    let ids: BTreeSet<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for i in 0..7 {
        assert!(ids.contains(format!("a{i}").as_str()), "{v}");
    }
    assert!(ids.contains("pinned") && ids.contains("meta-llama/Llama-3.1-8B-Instruct"));
    assert!(!ids.contains("a7"), "{v}");
    let a0 = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "a0")
        .unwrap();
    assert_eq!(a0["parent"], "meta-llama/Llama-3.1-8B-Instruct");
    let t0 = rig.table().await.unwrap();
    assert!(
        homes(&t0).values().all(|s| s.len() == 1),
        "idle adapters keep one home: {t0}"
    );

    // Demand on a0: it spreads to every server; each new home loads before it is routed to
    // (a request sent to a server without the adapter would be a 404).
    let mut traffic = Traffic::default();
    traffic.start(&rig, vec!["a0".into()], 4);
    wait_for("a0 loaded on all three servers", T, || {
        let rig = rig.clone();
        async move {
            let t = rig.table().await?;
            (homes(&t).get("a0").map(BTreeSet::len) == Some(3)
                && rig.listed().await.get("a0").map(BTreeSet::len) == Some(3))
            .then_some(())
        }
    })
    .await;
    let served_a0 = wait_for("every server serves a0", T, || {
        let rig = rig.clone();
        async move {
            let mut n = 0;
            for s in &rig.sims {
                if rig.served(s, "a0").await > 0 {
                    n += 1;
                }
            }
            (n == 3).then_some(n)
        }
    })
    .await;
    assert_eq!(served_a0, 3);
    traffic.pause().await;

    // Demand moves to a1..a5 while a trickle of a0 goes on: a0 shrinks back to one home,
    // its other homes drain and are unloaded, and no request fails throughout.
    let busy: Vec<String> = (1..=5).map(|i| format!("a{i}")).collect();
    traffic.start(&rig, busy, 5);
    traffic.start(&rig, vec!["a0".into()], 1);
    wait_for("a0 back on one server, the others unloaded", T, || {
        let rig = rig.clone();
        async move {
            let t = rig.table().await?;
            let h = homes(&t);
            (h.get("a0").map(BTreeSet::len) == Some(1)
                && rig.listed().await.get("a0").map(BTreeSet::len) == Some(1))
            .then_some(())
        }
    })
    .await;
    let drained = metric(
        &try_text(
            &rig.c,
            &format!("http://127.0.0.1:{}/metrics", rig.metrics_port),
        )
        .await
        .unwrap(),
        "inferlane_epp_lora_drains_total",
    )
    .unwrap_or(0.0);
    assert!(drained >= 2.0, "a0's two dropped homes drained: {drained}");
    let done = traffic.stop_and_check(&rig).await;
    assert!(done > 50);
    let page = try_text(
        &rig.c,
        &format!("http://127.0.0.1:{}/metrics", rig.metrics_port),
    )
    .await
    .unwrap();
    assert!(
        page.contains("inferlane_epp_lora_requests_total{tier=\"gpu\"}"),
        "requests by residency tier"
    );
    assert!(
        page.contains("inferlane_epp_lora_adapter_homes{adapter_name=\"a0\",state=\"desired\"} 1"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_epp_restart_and_a_sidecar_restart_move_nothing() {
    let mut rig = Rig::start().await;
    // Spread a1 so the table holds more than one home per adapter.
    let deadline = tokio::time::Instant::now() + T;
    // Steady: a1 on every server, every home loaded, nothing draining or loaded elsewhere.
    let before = loop {
        assert!(tokio::time::Instant::now() < deadline, "a1 never spread");
        let (code, _) = rig.complete("a1").await;
        assert!(matches!(code, 200 | 404 | 503), "{code}");
        if let Some(t) = rig.table().await {
            let h = homes(&t);
            let mut l = rig.listed().await;
            l.retain(|id, _| id.starts_with('a'));
            let draining = t["servers"]
                .as_object()
                .unwrap()
                .values()
                .any(|p| !p["draining"].as_array().unwrap().is_empty());
            if h.get("a1").map(BTreeSet::len) == Some(3) && !draining && h == l {
                break h;
            }
        }
    };
    let listed_before = rig.listed().await;
    // The EPP goes away: the sidecars keep their sets.
    rig.epp = None;
    tokio::time::sleep(Duration::from_millis(800)).await; // several sidecar polls (150 ms) fail meanwhile
    assert_eq!(
        rig.listed().await,
        listed_before,
        "sidecars kept their adapters while the EPP was away"
    );
    rig.start_epp();
    let t = wait_for("the restarted EPP's first table", T, || {
        let rig = &rig;
        async move { rig.table().await }
    })
    .await;
    assert_eq!(
        homes(&t),
        before,
        "a restarted EPP finds the homes where they are"
    );
    assert_eq!(t["moves"], 0, "{t}");
    // A sidecar restart: it asks for its set and finds it loaded: no load at all. (Without
    // traffic a1's extra homes may meanwhile drain and go: unloads are placement's.)
    let loads_before = sim_stats(&rig.c, &rig.sims[0]).await["load_attempts"].clone();
    rig.sidecars[0] = None;
    let sc = rig.start_sidecar(0);
    let ready = format!("http://{}/readyz", sc.addr);
    wait_for("the restarted sidecar ready", T, || {
        let (c, u) = (rig.c.clone(), ready.clone());
        async move {
            c.get(&u)
                .send()
                .await
                .ok()
                .filter(|r| r.status() == 200)
                .map(|_| ())
        }
    })
    .await;
    rig.sidecars[0] = Some(sc);
    tokio::time::sleep(Duration::from_millis(500)).await; // a few reconcile passes (200 ms)
    assert_eq!(
        sim_stats(&rig.c, &rig.sims[0]).await["load_attempts"],
        loads_before,
        "the restarted sidecar reloaded nothing"
    );
}

/// A follower replica (`--lora-placement-from`) routes by the decider's table: the same
/// homes, and its requests go only where the decider placed them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_replica_routes_by_the_deciders_table() {
    let rig = Rig::start().await;
    let follower = rig.spawn_follower(&[]);
    let envoy = spawn_envoy_for(&follower, rig.dir.path()).await;
    let mine = format!("http://{}/lora/v1/placement", follower.metrics);
    let table = wait_for("the follower to copy a complete table", T, || {
        let (c, mine, rig) = (rig.c.clone(), mine.clone(), &rig);
        async move {
            let theirs = rig.table().await?;
            let ours = try_json(&c, &mine).await?;
            let complete = homes(&theirs).len() == ADAPTERS - 1;
            (complete && homes(&ours) == homes(&theirs) && ours["tick"] == theirs["tick"])
                .then_some(ours)
        }
    })
    .await;
    // Wait until every home has loaded, then requests through the follower go only there.
    let h = homes(&table);
    wait_for("every home loaded", T, || {
        let (rig, h) = (&rig, h.clone());
        async move {
            let l = rig.listed().await;
            h.iter()
                .all(|(id, s)| l.get(id).is_some_and(|ls| s.is_subset(ls)))
                .then_some(())
        }
    })
    .await;
    let before: Vec<_> = {
        let mut v = Vec::new();
        for s in &rig.sims {
            v.push(rig.served(s, "a3").await);
        }
        v
    };
    for _ in 0..10 {
        let r = rig
            .c
            .post(format!("http://127.0.0.1:{}/v1/completions", envoy.port))
            .json(&json!({"model": "a3", "prompt": "hi", "max_tokens": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // The decider saw none of these requests: it learns of them from the follower.
    wait_for("the follower's demand at the decider", T, || async {
        let t = rig.table().await?;
        (t["demand"]["a3"].as_f64()? > 0.0).then_some(())
    })
    .await;
    for (i, s) in rig.sims.iter().enumerate() {
        let n = rig.served(s, "a3").await - before[i];
        if !h["a3"].contains(&s.addr) {
            assert_eq!(n, 0, "{} is not a home of a3 but served {n}", s.addr);
        }
    }
}

/// A new source for a catalogue adapter is a new version: loaded under a new served name
/// beside the old one, switched to once a server lists it, the old one drained and then
/// unloaded; no same-name reload, no failed request, and responses name the adapter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_source_swaps_versions_without_a_failed_request() {
    use inferlane_sidecar::version::served_name;
    let rig = Arc::new(Rig::start().await);
    let adapters = rig.dir.path().join("adapters");
    let old_src = adapter(&adapters, "a2", 8);
    let (old, new) = (
        served_name("a2", &old_src),
        served_name("a2", &adapter(&adapters, "a2-v2", 8)),
    );
    wait_for("a1 and a2's first version loaded and routed to", T, || {
        let rig = rig.clone();
        async move {
            (rig.complete("a2").await.0 == 200 && rig.complete("a1").await.0 == 200).then_some(())
        }
    })
    .await;
    let (_, body) = rig.complete("a2").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["model"], "a2",
        "responses name the adapter, not its version: {body}"
    );
    let mut traffic = Traffic::default();
    traffic.start(&rig, vec!["a2".into(), "a1".into()], 3);
    // The new source reaches the EPP first, the sidecars later (kubelet syncs each pod's
    // mount on its own): the old version serves until a server lists the new one.
    let swap = |text: String| text.replace(&format!("{old_src}\n"), &format!("{old_src}-v2\n"));
    let cat = rig.dir.path().join("catalogue.yaml");
    std::fs::write(&cat, swap(std::fs::read_to_string(&cat).unwrap())).unwrap();
    wait_for("the EPP to take the new version", T, || {
        let (rig, new) = (rig.clone(), new.clone());
        async move { (rig.table().await?["served"]["a2"] == new.as_str()).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await; // requests keep going to the old version meanwhile
    for i in 0..rig.sims.len() {
        let f = rig.dir.path().join(format!("sidecar{i}.yaml"));
        std::fs::write(&f, swap(std::fs::read_to_string(&f).unwrap())).unwrap();
    }
    wait_for("the new version served and the old one unloaded", T, || {
        let (rig, old, new) = (rig.clone(), old.clone(), new.clone());
        async move {
            let l = rig.listed_names().await;
            (l.contains_key(&new) && !l.contains_key(&old)).then_some(())
        }
    })
    .await;
    // Requests now run on the new version.
    let mut on_new = 0;
    for s in &rig.sims {
        on_new += sim_requests(&rig.c, s)
            .await
            .get(&new)
            .copied()
            .unwrap_or(0);
    }
    traffic.stop_and_check(&rig).await;
    assert!(on_new > 0, "the new version served requests");
    // No reload in place: every load of a2 was of a new name.
    for s in &rig.sims {
        let st = sim_stats(&rig.c, s).await;
        let loads = st["load_attempts"][&old].as_array().map_or(0, Vec::len);
        assert!(loads <= 1, "{old} loaded {loads} times on {}: {st}", s.addr);
    }
}

/// `--lora-cold-adapters resolver`: an adapter placement leaves without a home is served
/// through a server's LoRA resolver (no 404, no failed request), under its plain id, and
/// the EPP unloads the copy once its requests are done; the sidecars leave copies alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cold_adapters_go_through_the_resolver_and_their_copies_are_unloaded() {
    let rig = Arc::new(Rig::start_with(true).await);
    let cold = homeless(&rig).await;
    let (code, body) = rig.complete(&cold).await;
    assert_eq!(code, 200, "{body}");
    let mut ran = 0;
    for sim in &rig.sims {
        ran += rig.served(sim, &cold).await;
    }
    assert_eq!(ran, 1, "one server ran it, read through its resolver");
    let unloads = format!("http://127.0.0.1:{}/metrics", rig.metrics_port);
    let unloaded = || {
        let (rig, url, cold) = (rig.clone(), unloads.clone(), cold.clone());
        async move {
            let page = rig.c.get(&url).send().await.ok()?.text().await.ok()?;
            let n = metric(&page, "inferlane_epp_lora_on_demand_unloads_total")?;
            let listed = rig.listed_names().await;
            (n >= 1.0 && !listed.contains_key(&cold)).then_some(n)
        }
    };
    let first = wait_for("the EPP to unload the copy once done", T, unloaded).await;
    // Asked for once, it has no demand (in the resolver mode an adapter is admitted on its
    // second request), so placement gives it no home.
    let t = rig.table().await.expect("the placement table");
    assert!(
        t["demand"].get(&cold).is_none(),
        "one request of {cold} counts as demand: {}",
        t["demand"]
    );
    assert!(
        !homes(&t).contains_key(&cold),
        "{cold} placed after one request"
    );
    // A follower replica serves it too (the decider's table names every catalogue adapter);
    // its copy is adopted and unloaded by the decider.
    let follower = rig.spawn_follower(&["--lora-cold-adapters", "resolver"]);
    let envoy = spawn_envoy_for(&follower, rig.dir.path()).await;
    let mine = format!("http://{}/lora/v1/placement", follower.metrics);
    let homeless = follower_homeless(&rig, &mine).await;
    let (code, body) = complete_at(&rig.c, envoy.port, &homeless).await;
    assert_eq!(code, 200, "{body}");
    // Busy now: requests keep working while placement gives it a home and the copies
    // drain and go.
    let mut traffic = Traffic::default();
    traffic.start(&rig, vec![cold.clone()], 2);
    tokio::time::sleep(Duration::from_secs(2)).await; // traffic runs a while: several ticks (250 ms)
    let done = traffic.stop_and_check(&rig).await;
    assert!(done > 10, "{done} requests in 2 s");
    wait_for("every copy of it unloaded", T, || {
        let rig = rig.clone();
        let cold = cold.clone();
        async move { (!rig.listed_names().await.contains_key(&cold)).then_some(()) }
    })
    .await;
    let page = rig.metrics_page().await;
    assert!(metric(&page, "inferlane_epp_lora_on_demand_unloads_total").unwrap() >= first);
    assert_eq!(
        metric(&page, "inferlane_epp_lora_on_demand_unload_failures_total"),
        Some(0.0)
    );
}

/// `--lora-copy-names versioned`: the sidecars link each catalogue adapter's served name
/// to its source in the servers' resolver folder (which holds nothing else); an adapter
/// without a home is read through it under that name, the version a home would load, and
/// its copy unloaded once done; gaining a home under traffic fails no request, and no
/// sidecar reads a version again that a server holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versioned_copies_are_linked_and_served_under_the_versions_name() {
    let rig = Arc::new(Rig::start_rig(true, true).await);
    // a0..a6: a7 is ensureNotExist, never linked.
    let linked = wait_for(
        "the sidecars to link every catalogue adapter",
        T,
        || async {
            let all: Vec<BTreeSet<String>> = (0..rig.sims.len())
                .map(|i| links_in(&rig.dir.path().join(format!("resolver{i}"))))
                .collect();
            let first = all[0].clone();
            (first.len() == ADAPTERS - 1 && all.iter().all(|l| *l == first)).then_some(first)
        },
    )
    .await;
    assert!(
        linked.iter().all(|n| id_of(n) != *n && id_of(n) != "a7"),
        "{linked:?}"
    );
    let cold = homeless(&rig).await;
    let t = rig.table().await.expect("the placement table");
    let served = t["served"][cold.as_str()].as_str().unwrap().to_string();
    assert!(linked.contains(&served), "{served} not in {linked:?}");
    let (code, body) = rig.complete(&cold).await;
    assert_eq!(code, 200, "{body}");
    let mut ran = 0;
    for sim in &rig.sims {
        let by_name = sim_requests(&rig.c, sim).await;
        assert!(!by_name.contains_key(&cold), "asked under its plain id");
        ran += by_name.get(&served).copied().unwrap_or(0);
    }
    assert_eq!(
        ran, 1,
        "one server ran {served}, read through its resolver's link"
    );
    wait_for("the EPP to unload the copy once done", T, || {
        let (rig, served) = (rig.clone(), served.clone());
        async move { (!rig.listed_names().await.contains_key(&served)).then_some(()) }
    })
    .await;
    // Busy now: it gains a home while requests keep working.
    let mut traffic = Traffic::default();
    traffic.start(&rig, vec![cold.clone()], 2);
    wait_for("a home for the busy adapter", T, || {
        let (rig, cold) = (rig.clone(), cold.clone());
        async move {
            let t = rig.table().await?;
            homes(&t).contains_key(&cold).then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await; // traffic runs on over the new home a while
    let done = traffic.stop_and_check(&rig).await;
    assert!(done > 5, "{done} requests");
    for s in &rig.sims {
        let st = sim_stats(&rig.c, s).await;
        let loads = st["load_attempts"][&served].as_array().map_or(0, Vec::len);
        assert!(
            loads <= 1,
            "{served} loaded {loads} times on {}: {st}",
            s.addr
        );
    }
    let page = rig.metrics_page().await;
    assert_eq!(
        metric(&page, "inferlane_epp_lora_on_demand_unload_failures_total"),
        Some(0.0)
    );
    new_adapter_is_asked_only_of_servers_that_linked_it(&rig).await;
}

/// A sidecar that reaches only a follower replica (as a Service may send it) still has its
/// link report in the decider's table: the follower forwards it with its demand. Shown
/// after a decider restart, which starts with no report at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn link_reports_reach_the_decider_through_a_follower() {
    let mut rig = Rig::start_rig(true, true).await;
    let sims = rig.sims.len();
    let reported = move |t: &Value| {
        let parts = t["servers"].as_object()?;
        (parts.len() == sims && parts.values().all(|p| p["copy_names"] == json!({}))).then_some(())
    };
    wait_for("every sidecar's report in the table", T, || async {
        reported(&rig.table().await?)
    })
    .await;
    let follower = rig.spawn_follower(&[
        "--lora-cold-adapters",
        "resolver",
        "--lora-copy-names",
        "versioned",
    ]);
    rig.sidecars[2] = None;
    rig.sidecars[2] = Some(rig.start_sidecar_at(2, &follower.metrics));
    rig.epp = None;
    rig.start_epp();
    // The restarted decider knows no report until the sidecars send theirs again.
    wait_for("the restarted decider's table", T, || async {
        let t = rig.table().await?;
        (t["tick"].as_u64()? < 20).then_some(())
    })
    .await;
    wait_for(
        "every report, sidecar 2's through the follower",
        T,
        || async { reported(&rig.table().await?) },
    )
    .await;
    drop(follower);
}

/// A follower copies the decider's table once a tick (here every 5 s); a sidecar that
/// reaches it (as a Service spreads them) is answered from the decider's current table, so
/// it loads a new home when the decider places it, not up to a tick later.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_answers_a_sidecar_from_the_deciders_current_table() {
    let rig = Rig::start().await;
    let pool = rig.dir.path().join("pool.yaml");
    let from = format!("http://127.0.0.1:{}/lora/v1/placement", rig.metrics_port);
    let args = [
        "--lora-placement-from",
        &from,
        "--lora-placement-interval",
        "5s",
    ];
    let follower = spawn_epp(&pool, &args, rig.dir.path());
    let server = rig.sims[0].addr.clone();
    let theirs = format!("{from}?server={server}");
    let mine = format!("http://{}/lora/v1/placement", follower.metrics);
    let ours = format!("{mine}?server={server}");
    let tick = |v: &Value| v["tick"].as_u64();
    wait_for("the follower's first copy", T, || async {
        tick(&try_json(&rig.c, &mine).await?)
    })
    .await;
    let mut copy_lagged = false;
    for _ in 0..12 {
        let before = tick(&try_json(&rig.c, &theirs).await.unwrap()).unwrap();
        let set = tick(&try_json(&rig.c, &ours).await.unwrap()).unwrap();
        let after = tick(&try_json(&rig.c, &theirs).await.unwrap()).unwrap();
        assert!(
            (before..=after).contains(&set),
            "{before} <= {set} <= {after}"
        );
        let copy = tick(&try_json(&rig.c, &mine).await.unwrap()).unwrap();
        copy_lagged |= copy + 2 < before;
        tokio::time::sleep(Duration::from_millis(250)).await; // sampling over 3 s
    }
    assert!(copy_lagged, "the copy never lagged: the test shows nothing");
    // The decider gone: the follower answers from its copy.
    drop(rig);
    let set = wait_for("the follower's own answer", T, || async {
        try_json(&reqwest::Client::new(), &ours).await
    })
    .await;
    assert_eq!(set["server"], server.as_str());
}

/// The served names a resolver folder holds as links.
fn links_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_symlink()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// A new catalogue adapter the EPP knows before two of the three sidecars (their
/// ConfigMaps lag, as kubelet's volumes do): its copies are asked only of the server whose
/// sidecar reported linking it, where the others' resolvers would answer 404.
async fn new_adapter_is_asked_only_of_servers_that_linked_it(rig: &Arc<Rig>) {
    let adapters = rig.dir.path().join("adapters");
    let extra = format!(
        "    - id: a8\n      source: {}\n      rank: 8\n",
        adapter(&adapters, "a8", 8)
    );
    let one = &rig.sims[1].addr;
    let cfg1 = rig.dir.path().join("sidecar1.yaml");
    let body = std::fs::read_to_string(&cfg1).unwrap() + &extra;
    std::fs::write(&cfg1, body).unwrap();
    let cat = rig.dir.path().join("catalogue.yaml");
    let body = std::fs::read_to_string(&cat).unwrap() + &extra;
    std::fs::write(&cat, body).unwrap();
    let served = wait_for("the table to show who linked a8", T, || async {
        let t = rig.table().await?;
        let served = t["served"]["a8"].as_str()?.to_string();
        let lacks = |p: &Value| p["copy_names"]["a8"] == "";
        let parts = t["servers"].as_object()?;
        let ok = parts
            .values()
            .all(|p| lacks(p) == (p["address"] != one.as_str()));
        ok.then_some(served)
    })
    .await;
    let page = rig.metrics_page().await;
    let servers = |state: &str| {
        metric(
            &page,
            &format!("inferlane_epp_lora_link_reports{{state=\"{state}\"}}"),
        )
    };
    assert_eq!(
        (servers("current"), servers("lagging")),
        (Some(1.0), Some(2.0)),
        "{page}"
    );
    assert_eq!(servers("missing"), Some(0.0));
    assert!(links_in(&rig.dir.path().join("resolver1")).contains(&served));
    assert!(!links_in(&rig.dir.path().join("resolver0")).contains(&served));
    for _ in 0..4 {
        let (code, body) = rig.complete("a8").await;
        assert_eq!(code, 200, "{body}");
    }
    let t = rig.table().await.expect("the placement table");
    for sim in &rig.sims {
        let ran = sim_requests(&rig.c, sim)
            .await
            .get(&served)
            .copied()
            .unwrap_or(0);
        let homed = t["servers"]
            .as_object()
            .unwrap()
            .values()
            .any(|p| p["address"] == sim.addr.as_str() && p["homes"].get("a8").is_some());
        assert!(
            ran == 0 || sim.addr == *one || homed,
            "{} ran {served} {ran} times without a link or a home",
            sim.addr
        );
    }
}

/// One short completion for `model` through the Envoy on `port`: status and body (0 and
/// the error when it could not be sent).
async fn complete_at(c: &reqwest::Client, port: u16, model: &str) -> (u16, String) {
    let r = c
        .post(format!("http://127.0.0.1:{port}/v1/completions"))
        .json(&json!({"model": model, "prompt": "hello there", "max_tokens": 2}))
        .send()
        .await;
    match r {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// A fresh resolver rig fills the cache (6 entries, 7 adapters): the adapter left without a
/// home.
async fn homeless(rig: &Rig) -> String {
    wait_for("a table leaving one adapter without a home", T, || async {
        let t = rig.table().await?;
        let h = homes(&t);
        let cold = (0..ADAPTERS - 1)
            .map(|i| format!("a{i}"))
            .find(|id| !h.contains_key(id))?;
        (h.len() == ADAPTERS - 2 && t["resolver"] == true).then_some(cold)
    })
    .await
}

/// An adapter without a home in the table of the follower whose placement page is `page`.
async fn follower_homeless(rig: &Rig, page: &str) -> String {
    wait_for(
        "the follower's table naming an adapter without a home",
        T,
        || async {
            let t = try_json(&rig.c, page).await?;
            let h = homes(&t);
            (0..ADAPTERS - 1)
                .map(|i| format!("a{i}"))
                .find(|id| !h.contains_key(id) && t["served"][id.as_str()].is_string())
        },
    )
    .await
}

/// The servers where, as the EPP serving `debug_port` sees them, `id` is in the endpoint's
/// `field` list on `/debug/pool` (`adapters_running`, `adapters_listed`).
async fn seen_at(
    c: &reqwest::Client,
    debug_port: u16,
    field: &str,
    id: &str,
) -> Option<Vec<String>> {
    let pool = try_json(c, &format!("http://127.0.0.1:{debug_port}/debug/pool")).await?;
    let on: Vec<String> = pool["endpoints"]
        .as_array()?
        .iter()
        .filter(|e| {
            e[field]
                .as_array()
                .is_some_and(|l| l.iter().any(|a| a == id))
        })
        .filter_map(|e| e["address"].as_str().map(str::to_string))
        .collect();
    Some(on)
}

/// With several replicas, a follower's requests for an adapter without a home go to the
/// copy another replica's request made there (its server reports it running) rather than
/// having a second server read it: one read, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_borrows_another_replicas_copy_instead_of_reading_its_own() {
    let rig = Arc::new(Rig::start_with(true).await);
    homeless(&rig).await;
    let follower = rig.spawn_follower(&["--lora-cold-adapters", "resolver"]);
    let envoy = spawn_envoy_for(&follower, rig.dir.path()).await;
    let page = format!("http://{}/lora/v1/placement", follower.metrics);
    let cold = follower_homeless(&rig, &page).await;
    // The placed adapters stay busier than it, so placement gives it no home meanwhile.
    let table = rig.table().await.unwrap();
    let placed: Vec<String> = homes(&table).into_keys().collect();
    let mut traffic = Traffic::default();
    traffic.start(&rig, placed.clone(), 4);
    wait_for(
        "the placed adapters' demand well above what it gets",
        T,
        || async {
            let t = rig.table().await?;
            let d = |id: &String| t["demand"][id.as_str()].as_f64().unwrap_or(0.0);
            // A few requests of it read as far less (placement discounts a quiet adapter's
            // counting noise), and a challenger needs 1.5x an incumbent's demand.
            placed.iter().all(|id| d(id) >= 3.0).then_some(())
        },
    )
    .await;
    // A long request through the decider makes a copy and keeps it running (2,000 tokens
    // at 8 ms each: 16 s).
    let long = {
        let (c, url, cold) = (
            rig.c.clone(),
            format!("http://127.0.0.1:{}/v1/completions", rig.envoy.port),
            cold.clone(),
        );
        tokio::spawn(async move {
            let body = json!({"model": cold, "prompt": "hi", "max_tokens": 2000});
            c.post(url).json(&body).send().await.map(|r| r.status())
        })
    };
    let metrics_port = |e: &Epp| port_of(&e.metrics);
    let decider_port = rig.metrics_port;
    let copy = wait_for("the decider's copy running on one server", T, || async {
        let on = seen_at(&rig.c, decider_port, "adapters_running", &cold).await?;
        (on.len() == 1).then(|| on[0].clone())
    })
    .await;
    let follower_port = metrics_port(&follower);
    // Listed there too: a server that lists an adapter we made no copy of is not asked to
    // resolve it (it would not), so without borrowing the follower would read it elsewhere.
    wait_for(
        "the follower to see it running and listed there",
        T,
        || async {
            let running = seen_at(&rig.c, follower_port, "adapters_running", &cold).await?;
            let listed = seen_at(&rig.c, follower_port, "adapters_listed", &cold).await?;
            (running == [copy.clone()] && listed == [copy.clone()]).then_some(())
        },
    )
    .await;
    for _ in 0..3 {
        let (code, body) = complete_at(&rig.c, envoy.port, &cold).await;
        assert_eq!(code, 200, "{body}");
    }
    let mut ran = BTreeMap::new();
    for sim in &rig.sims {
        ran.insert(sim.addr.clone(), rig.served(sim, &cold).await);
    }
    traffic.stop_and_check(&rig).await;
    long.abort();
    let elsewhere: u64 = ran
        .iter()
        .filter(|(a, _)| **a != copy)
        .map(|(_, n)| n)
        .sum();
    let table = try_json(&rig.c, &page).await;
    assert_eq!(
        elsewhere,
        0,
        "the follower's requests went to the copy on {copy}, not to new ones: {ran:?}; {cold} in the follower's table: homes {:?}",
        table.as_ref().map(|t| homes(t).get(&cold).cloned())
    );
    assert!(ran[&copy] >= 3, "{ran:?}");
}
