//! Holding at scale through the shipped Envoy config: more held requests than Envoy's default circuit breaker allows, thousands of tenants, full queues and a full memory budget, and the gateway fails none.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::task::JoinHandle;

const T: Duration = Duration::from_secs(120);
const BASE: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// A sim whose one running request saturates the pool, an EPP holding the rest, and Envoy
/// from the shipped template in front.
struct Rig {
    _dir: tempfile::TempDir,
    c: reqwest::Client,
    sim: Proc,
    epp: Epp,
    envoy: Envoy,
}

type Answer = JoinHandle<(u16, String)>;

/// The two tests that hold thousands of connections at once take turns: on two cores, side
/// by side, each would measure the other's load as much as its own.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Rig {
    /// `flow` is the picker config's flowControl block; `keep_tenant` leaves the client's
    /// fairness header in (a drain test, not a gateway test).
    async fn start(threshold: u32, flow: &str, epp_flags: &[&str], keep_tenant: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        inferlane::runtime::install_crypto_provider();
        let c = reqwest::Client::builder()
            .timeout(Duration::from_secs(180))
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let sim = spawn_sim(
            &["--max-num-seqs", "256", "--time-scale", "0.02"],
            dir.path(),
        );
        let pool = dir.path().join("pool.yaml");
        std::fs::write(
            &pool,
            format!(
                "pool: {{name: test-pool}}\nendpoints:\n- address: {}\nmodels:\n- modelName: chat\n  criticality: Critical\n  targetModels: [{{name: {BASE}}}]\n- modelName: batch\n  criticality: Sheddable\n  targetModels: [{{name: {BASE}}}]\n",
                sim.addr
            ),
        )
        .unwrap();
        let cfg = format!(
            "featureGates: [flowControl]\nsaturationDetector: {{runningRequestsThreshold: {threshold}}}\nflowControl:\n  defaultRequestTTL: 170s\n{flow}"
        );
        let mut flags = vec!["--config-text", cfg.as_str()];
        flags.extend_from_slice(epp_flags);
        let epp = spawn_epp(&pool, &flags, dir.path());
        let mut cfg = envoy_config(&EnvoyOptions {
            epp_port: port_of(&epp.grpc),
            full_duplex: false,
            fail_open: false,
            extra_filters: "",
        });
        if keep_tenant {
            let strip = "                - remove: x-gateway-inference-fairness-id\n";
            assert!(
                cfg.contains(strip),
                "the template no longer strips the tenant header"
            );
            cfg = cfg.replace(strip, "");
        }
        let envoy = spawn_envoy_config(&cfg, dir.path()).await;
        Self {
            _dir: dir,
            c,
            sim,
            epp,
            envoy,
        }
    }

    /// Sends a completion for `model` (as `tenant`, with `prompt`) in the background.
    fn send(&self, model: &'static str, tenant: Option<String>, prompt: String) -> Answer {
        let (c, url) = (
            self.c.clone(),
            format!("http://127.0.0.1:{}/v1/completions", self.envoy.port),
        );
        tokio::spawn(async move {
            let mut req = c
                .post(url)
                .json(&json!({"model": model, "prompt": prompt, "max_tokens": 2}));
            if let Some(t) = tenant {
                req = req.header("x-gateway-inference-fairness-id", t);
            }
            match req.send().await {
                Ok(r) => {
                    let s = r.status().as_u16();
                    (s, r.text().await.unwrap_or_default())
                }
                Err(e) => (0, e.to_string()),
            }
        })
    }

    async fn stall(&self, on: bool) {
        let u = format!("http://{}/sim/faults", self.sim.addr);
        let r = self
            .c
            .post(u)
            .json(&json!({"stall": on}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    /// The server stalls and `threshold` critical requests fill it (picked, or held once
    /// the scraped running count saturates the pool first): saturated from here on, until
    /// [`Rig::stall`] lets go.
    async fn saturate(&self, threshold: usize) -> Vec<Answer> {
        self.stall(true).await;
        let blockers: Vec<_> = (0..threshold)
            .map(|_| self.send("chat", None, "block".into()))
            .collect();
        let metrics = format!("http://{}/metrics", self.epp.metrics);
        wait_for("the blockers picked", T, || async {
            let page = try_text(&self.c, &metrics).await?;
            let picked: f64 = page
                .lines()
                .filter(|l| l.starts_with("inference_extension_picks_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            let held = self.held().await?;
            (picked >= 1.0 && picked as usize + held == threshold).then_some(())
        })
        .await;
        blockers
    }

    async fn held(&self) -> Option<usize> {
        let page = try_text(&self.c, &format!("http://{}/metrics", self.epp.metrics)).await?;
        Some(
            page.lines()
                .filter(|l| l.starts_with("inference_extension_flow_control_queue_size{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as usize,
        )
    }

    async fn wait_held(&self, what: &str, n: usize) {
        wait_for(what, T, || async {
            (self.held().await? == n).then_some(())
        })
        .await;
    }

    async fn charged(&self) -> Option<u64> {
        let page = try_text(
            &self.c,
            &format!("http://{}/debug/memory", self.epp.metrics),
        )
        .await?;
        let v: serde_json::Value = serde_json::from_str(&page).ok()?;
        v["charged_bytes"].as_u64()
    }
}

/// Waits until one of `held` has its answer (given way to a critical request).
async fn displaced(held: &[Answer]) {
    wait_for("a held request displaced", T, || async {
        held.iter().any(|h| h.is_finished()).then_some(())
    })
    .await;
}

/// Every answer, split into the 200s and the rest.
async fn outcomes(answers: Vec<Answer>) -> (usize, Vec<(u16, String)>) {
    let mut ok = 0;
    let mut other = Vec::new();
    for a in answers {
        match a.await.unwrap() {
            (200, _) => ok += 1,
            (s, body) => other.push((s, body)),
        }
    }
    (ok, other)
}

/// 1,100 sheddable requests held at once (their band's cap) keep 1,100 ext_proc streams
/// open: with Envoy's default circuit breaker the 1,025th already got a 500. Through the
/// shipped config they are all held; one more sheddable gets the EPP's 429, a critical
/// one is dispatched first, and every held one is served: no 5xx anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_held_than_envoys_default_breaker_and_no_5xx() {
    const HELD: usize = 1_100;
    let band = format!("  priorityBands:\n  - {{priority: -1, maxRequests: {HELD}}}\n");
    let rig = Rig::start(1, &band, &[], false).await;
    let blockers = rig.saturate(1).await;
    let held: Vec<_> = (0..HELD)
        .map(|_| rig.send("batch", None, "hold".into()))
        .collect();
    rig.wait_held("every sheddable request held", HELD).await;
    // The band is full: the EPP says so (429), not the gateway (500).
    let (s, body) = rig.send("batch", None, "hold".into()).await.unwrap();
    assert_eq!(s, 429, "{body}");
    assert!(body.contains("priority band -1 is full"), "{body}");
    let critical = rig.send("chat", None, "first".into());
    rig.wait_held("the critical request held too", HELD + 1)
        .await;
    rig.stall(false).await;
    let (ok, failed) = outcomes(blockers.into_iter().chain([critical]).collect()).await;
    assert_eq!((ok, failed), (2, vec![]));
    let (ok, failed) = outcomes(held).await;
    assert!(
        failed.is_empty(),
        "{} of {HELD} held requests failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert_eq!(ok, HELD);
}

/// The queues are full of sheddable work (the pool's maxRequests): a critical request is
/// not refused for it. The heaviest sheddable tenant's newest request gives way (429,
/// saying why), the critical one is dispatched first, and the rest are all served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_request_displaces_held_sheddable_work_from_full_queues() {
    const CAP: usize = 60;
    let rig = Rig::start(1, &format!("  maxRequests: {CAP}\n"), &[], true).await;
    let blockers = rig.saturate(1).await;
    let mut held: Vec<_> = (0..CAP - 10)
        .map(|_| rig.send("batch", Some("heavy".into()), "hold".into()))
        .collect();
    held.extend((0..10).map(|i| rig.send("batch", Some(format!("light-{i}")), "hold".into())));
    rig.wait_held("the queues full", CAP).await;
    let (s, body) = rig.send("batch", None, "more".into()).await.unwrap();
    assert_eq!(s, 429, "a sheddable arrival displaces nobody: {body}");
    assert!(body.contains("flowControl.maxRequests"), "{body}");
    let critical = rig.send("chat", None, "urgent".into());
    displaced(&held).await;
    rig.wait_held("the critical request held in its place", CAP)
        .await;
    rig.stall(false).await;
    let (ok, failed) = outcomes(blockers.into_iter().chain([critical]).collect()).await;
    assert_eq!((ok, failed), (2, vec![]));
    let (ok, failed) = outcomes(held).await;
    assert_eq!(ok, CAP - 1);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, 429, "{:?}", failed[0]);
    assert!(
        failed[0].1.contains("took this one's place"),
        "{:?}",
        failed[0]
    );
}

/// 5,000 tenants with one held request each drain completely (dispatch scanned every flow
/// per release: 1,370 of them still waited after 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_tenants_drain() {
    let _turn = HEAVY.lock().await;
    const TENANTS: usize = 5_000;
    let flow = "  priorityBands:\n  - {priority: -1, fairnessPolicyRef: vtc-fairness-policy}\n";
    let rig = Rig::start(32, flow, &[], true).await;
    let blockers = rig.saturate(32).await;
    let base = rig.held().await.unwrap();
    let held: Vec<_> = (0..TENANTS)
        .map(|i| rig.send("batch", Some(format!("tenant-{i}")), "hold".into()))
        .collect();
    let t0 = std::time::Instant::now();
    rig.wait_held("every tenant's request held", base + TENANTS)
        .await;
    eprintln!("held after {:?}", t0.elapsed());
    rig.stall(false).await;
    let (ok, failed) = outcomes(held).await;
    eprintln!("drained after {:?}", t0.elapsed());
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert_eq!(ok, TENANTS);
    let (_, failed) = outcomes(blockers).await;
    assert!(failed.is_empty(), "{failed:?}");
}

/// A small memory budget: held requests fill their share of it and the next sheddable one
/// gets the EPP's 429 naming the budget; a body larger than what is left is refused the
/// same way; a critical request displaces held work; everything charged comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_memory_budget_is_a_429_and_every_byte_comes_back() {
    let rig = Rig::start(1, "", &["--memory-budget", "4Mi"], false).await;
    let blockers = rig.saturate(1).await;
    let prompt = "x".repeat(100 * 1024);
    let mut held = Vec::new();
    let refused = loop {
        held.push(rig.send("batch", None, prompt.clone()));
        let n = held.len();
        let settled = wait_for("the request held or refused", T, || async {
            if rig.held().await? == n {
                return Some(None);
            }
            let last = held.last()?;
            last.is_finished().then_some(Some(()))
        })
        .await;
        if settled.is_some() {
            break held.pop().unwrap().await.unwrap();
        }
        assert!(n < 100, "4 MiB held {n} requests of 100 KB");
    };
    assert_eq!(refused.0, 429, "{}", refused.1);
    assert!(refused.1.contains("--memory-budget"), "{}", refused.1);
    let n = held.len();
    assert!((8..=16).contains(&n), "{n} held in a 4 MiB budget");
    // A body larger than the room left is refused before it is held (Envoy buffers 1 MiB
    // at most in BUFFERED mode).
    let (s, body) = rig.send("chat", None, "y".repeat(900 << 10)).await.unwrap();
    assert_eq!(s, 429, "{body}");
    assert!(body.contains("memory budget"), "{body}");
    // As large as the refused one: it fits only in a displaced request's place.
    let critical = rig.send("chat", None, prompt.clone());
    displaced(&held).await;
    rig.wait_held("the critical request held in its place", n)
        .await;
    rig.stall(false).await;
    let (ok, failed) = outcomes(blockers.into_iter().chain([critical]).collect()).await;
    assert_eq!((ok, failed), (2, vec![]));
    let (ok, failed) = outcomes(held).await;
    assert_eq!(ok, n - 1, "{failed:?}");
    assert!(
        failed
            .iter()
            .all(|(s, b)| *s == 429 && b.contains("took this one's place")),
        "{failed:?}"
    );
    wait_for("every byte given back", T, || async {
        (rig.charged().await? == 0).then_some(())
    })
    .await;
}

/// Thousands of requests refused at once (their band full): each ended ext_proc stream costs
/// Envoy an outbound RST_STREAM, and with Envoy's default flood guard (1,000 queued control
/// frames) it closed the connection to the EPP, failing every stream on it with a 500. The
/// shipped config sizes the guard: all 429s, no 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_refusals_is_all_429s() {
    let _turn = HEAVY.lock().await;
    const SENT: usize = 8_000;
    const BAND: usize = 100;
    let band = format!("  priorityBands:\n  - {{priority: -1, maxRequests: {BAND}}}\n");
    let rig = Rig::start(1, &band, &[], false).await;
    let blockers = rig.saturate(1).await;
    let sent: Vec<_> = (0..SENT)
        .map(|_| rig.send("batch", None, "hold".into()))
        .collect();
    wait_for("every request answered or held", T, || async {
        let answered = sent.iter().filter(|a| a.is_finished()).count();
        (answered + rig.held().await? >= SENT).then_some(())
    })
    .await;
    rig.stall(false).await;
    let (ok, others) = outcomes(sent).await;
    assert_eq!(ok, BAND);
    let not_429: Vec<_> = others.iter().filter(|(s, _)| *s != 429).collect();
    assert!(
        not_429.is_empty(),
        "{} of {SENT} neither 200 nor 429: {:?}",
        not_429.len(),
        &not_429[..not_429.len().min(3)]
    );
    let (_, failed) = outcomes(blockers).await;
    assert!(failed.is_empty(), "{failed:?}");
}

/// Streams opened past the memory budget that say nothing are ended (RESOURCE_EXHAUSTED)
/// within about a second: idle streams cannot hold memory uncharged. Those within the budget
/// stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_streams_past_the_budget_are_ended() {
    use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    const OPENED: usize = 80;
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool.yaml");
    std::fs::write(&pool, "pool: {name: test-pool}\nendpoints: []\n").unwrap();
    // 1 MiB: room for 51 streams at 20 KiB each.
    let epp = spawn_epp(
        &pool,
        &["--memory-budget", "1Mi", "--secure-serving=false"],
        dir.path(),
    );
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", epp.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut streams = Vec::new();
    for _ in 0..OPENED {
        let mut c = ExternalProcessorClient::new(ch.clone());
        let silent = futures::stream::pending::<ProcessingRequest>();
        streams.push(c.process(silent).await.unwrap().into_inner());
    }
    // The last one opened is past the budget: once it has ended, so have all the others
    // past it (same grace, opened earlier); those within it are still silent.
    let check = |r: Result<Option<_>, tonic::Status>| match r {
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
            assert!(status.message().contains("--memory-budget"), "{status}");
        }
        Ok(m) => panic!("a silent stream got {m:?}"),
    };
    let mut last = streams.pop().unwrap();
    check(
        tokio::time::timeout(Duration::from_secs(10), last.message())
            .await
            .expect("the stream past the budget ended"),
    );
    let (mut ended, mut open) = (1, 0);
    for s in &mut streams {
        match tokio::time::timeout(Duration::from_millis(50), s.message()).await {
            Err(_) => open += 1,
            Ok(r) => {
                check(r);
                ended += 1;
            }
        }
    }
    assert_eq!(open + ended, OPENED);
    assert!((45..=55).contains(&open), "{open} open, {ended} ended");
}
