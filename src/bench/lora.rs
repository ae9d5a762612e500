//! route-bench's LoRA fleet runs: the catalogue, the sidecars or the preloaded partition each policy needs, and what the engines counted.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::fleet::{Binaries, Epp, FleetError, Proc, SimFleet, poll, spawn, write_file};
use super::policy::{AdapterSetup, Policy};
use super::workload::Workload;

/// The sidecars' ConfigMap: every adapter of the workload on demand, with its rank (sources
/// are absolute paths: the sidecar refuses relative ones).
pub fn catalogue_yaml(w: &Workload, adapters_dir: &Path, port: u16) -> String {
    let adapters_dir =
        std::path::absolute(adapters_dir).unwrap_or_else(|_| adapters_dir.to_path_buf());
    let mut s =
        format!("vLLMLoRAConfig:\n  host: 127.0.0.1\n  port: {port}\n  onDemand:\n    models:\n");
    for (n, r) in w.adapters().iter().zip(w.adapter_ranks()) {
        s.push_str(&format!(
            "    - id: {n}\n      source: {}\n      rank: {r}\n",
            adapters_dir.join(n).display()
        ));
    }
    s
}

/// The EPP flags of a workload with adapters: the servers' host cache size (what the EPP
/// sent a server names what it holds), and a placing policy's (the decider, or a follower
/// of `follow`).
pub fn epp_args(
    w: &Workload,
    policy: Policy,
    fleet: &SimFleet,
    follow: Option<&str>,
    dir: &Path,
) -> Result<Vec<String>, FleetError> {
    if w.adapters().is_empty() {
        return Ok(Vec::new());
    }
    let cpu = w.fleet.max_cpu_loras.unwrap_or(w.fleet.max_loras);
    let mut a = vec!["--lora-max-cpu-loras".to_string(), cpu.to_string()];
    let lazy = match policy.adapters() {
        AdapterSetup::Sidecars | AdapterSetup::SidecarsAndResolver => false,
        AdapterSetup::Resolver => true,
        _ => return Ok(a),
    };
    match follow {
        Some(url) => a.extend(["--lora-placement-from".to_string(), url.to_string()]),
        None => {
            let cat = write_file(
                dir,
                "catalogue.yaml",
                &catalogue_yaml(w, &fleet.adapters_dir, 8000),
            )?;
            a.extend(["--lora-catalog".to_string(), cat.display().to_string()]);
        }
    }
    if lazy {
        a.extend(["--lora-placement-mode".to_string(), "lazy".to_string()]);
    }
    if policy.adapters() == AdapterSetup::SidecarsAndResolver {
        a.extend(["--lora-cold-adapters".to_string(), "resolver".to_string()]);
    }
    if policy == Policy::LoraPlacedVersioned {
        a.extend(["--lora-copy-names".to_string(), "versioned".to_string()]);
    }
    Ok(a)
}

/// What a run holds besides the fleet and the EPP: the sidecars.
#[derive(Debug, Default)]
pub struct Prepared {
    pub sidecars: Vec<Proc>,
}

/// Gets the adapters where the policy wants them before the run starts: the sidecars
/// (placed), or the partition loaded through vLLM's API; waits until each adapter is on a
/// server.
pub async fn prepare(
    bins: &Binaries,
    w: &Workload,
    policy: Policy,
    fleet: &SimFleet,
    epps: &[Epp],
    dir: &Path,
) -> Result<Prepared, FleetError> {
    let mut out = Prepared::default();
    let epp = epps.first();
    match (policy.adapters(), epp) {
        (AdapterSetup::Sidecars | AdapterSetup::SidecarsAndResolver, Some(_)) => {
            for (i, addr) in fleet.addrs.iter().enumerate() {
                // Spread over the replicas, as a Service would: a follower serves its copy of
                // the table and forwards what the sidecar reports.
                let url = format!("http://{}/lora/v1/placement", epps[i % epps.len()].metrics);
                let port = addr
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(8000);
                let cfg = write_file(
                    dir,
                    &format!("sidecar-{i}.yaml"),
                    &catalogue_yaml(w, &fleet.adapters_dir, port),
                )?;
                let dir_arg = fleet.adapters_dir.display().to_string();
                let links: &[&str] = if policy == Policy::LoraPlacedVersioned {
                    &["--lora-resolver-dir", &dir_arg]
                } else {
                    &[]
                };
                let args: Vec<String> = [
                    "--config",
                    &cfg.display().to_string(),
                    "--metrics-host",
                    "127.0.0.1",
                    "--metrics-port",
                    "0",
                    "--placement-url",
                    &url,
                    "--placement-server",
                    &format!("sim-{i}"),
                    "--placement-interval",
                    "500ms",
                    "--log-filter",
                    "warn",
                ]
                .iter()
                .chain(links)
                .map(|s| s.to_string())
                .collect();
                let log = dir.join(format!("sidecar-{i}.log"));
                let child = spawn(
                    "lora-sidecar",
                    &bins.sidecar,
                    &args,
                    log.clone(),
                    "build it: cargo build --release --bin lora-sidecar",
                    false,
                )?;
                out.sidecars.push(Proc::new(child, log));
            }
        }
        (AdapterSetup::Partition(k), _) => load_partition(w, fleet, k).await,
        _ => return Ok(out),
    }
    let c = reqwest::Client::new();
    // With the resolver, adapters placement gives no home are loaded by requests: wait for
    // those it placed.
    let table = match (policy.adapters(), epp) {
        (AdapterSetup::SidecarsAndResolver, Some(epp)) => {
            Some(format!("http://{}/lora/v1/placement", epp.metrics))
        }
        _ => None,
    };
    poll(Duration::from_secs(180), || {
        let (c, table) = (c.clone(), table.clone());
        async move {
            let want = match table {
                Some(url) => homed(&c, &url).await?,
                None => w.adapters().len(),
            };
            let mut seen = std::collections::BTreeSet::new();
            for a in &fleet.addrs {
                seen.extend(listed(&c, a).await?);
            }
            (seen.len() >= want).then_some(())
        }
    })
    .await
    .ok_or_else(|| FleetError::NotReady {
        what: "every adapter loaded on a server",
        secs: 180,
        log: dir.display().to_string(),
    })?;
    Ok(out)
}

/// Adapters with a home in the EPP's placement table (`None` before its first table).
async fn homed(c: &reqwest::Client, url: &str) -> Option<usize> {
    let t: crate::lora_fleet::Table = c.get(url).send().await.ok()?.json().await.ok()?;
    let ids: std::collections::BTreeSet<&String> =
        t.servers.values().flat_map(|p| p.homes.keys()).collect();
    (!ids.is_empty()).then_some(ids.len())
}

async fn listed(c: &reqwest::Client, addr: &str) -> Option<Vec<String>> {
    let v: serde_json::Value = c
        .get(format!("http://{addr}/v1/models"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(
        v["data"]
            .as_array()?
            .iter()
            .filter(|m| !m["parent"].is_null())
            .filter_map(|m| m["id"].as_str().map(str::to_string))
            .collect(),
    )
}

/// Each adapter on its `k` rendezvous servers (by the pool's endpoint names), 32 loads at
/// a time.
async fn load_partition(w: &Workload, fleet: &SimFleet, k: usize) {
    use futures::StreamExt;
    use inferlane_epp::affinity::{endpoint_key, order};
    let keys: Vec<u64> = (0..fleet.addrs.len())
        .map(|i| endpoint_key(&format!("sim-{i}")))
        .collect();
    let c = reqwest::Client::new();
    let mut jobs = Vec::new();
    for n in w.adapters() {
        for s in order(endpoint_key(&n), &keys).into_iter().take(k) {
            jobs.push((fleet.addrs[s].clone(), n.clone()));
        }
    }
    futures::stream::iter(jobs)
        .for_each_concurrent(32, |(addr, n)| {
            let c = c.clone();
            let path = fleet.adapters_dir.join(&n).display().to_string();
            async move {
                let r = c
                    .post(format!("http://{addr}/v1/load_lora_adapter"))
                    .json(&serde_json::json!({"lora_name": n, "lora_path": path}))
                    .send()
                    .await;
                if let Err(e) = r {
                    tracing::warn!(adapter = %n, server = %addr, error = %e, "partition load failed");
                }
            }
        })
        .await;
}

/// What the engines counted in one run (disk reads on the request path, CPU-to-GPU copies)
/// and the placement moves the EPP made.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineCounts {
    pub disk_loads: u64,
    pub swaps: u64,
    pub moves: u64,
}

/// Sums the servers' counts; `None` for a workload without adapters.
pub async fn collect(w: &Workload, fleet: &SimFleet, epp: Option<&str>) -> Option<EngineCounts> {
    if w.adapters().is_empty() {
        return None;
    }
    let c = reqwest::Client::new();
    let mut n = EngineCounts::default();
    for a in &fleet.addrs {
        let Ok(r) = c.get(format!("http://{a}/sim/stats")).send().await else {
            continue;
        };
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        n.disk_loads += v["lora_disk_loads"].as_u64().unwrap_or(0);
        n.swaps += v["lora_swaps"].as_u64().unwrap_or(0);
    }
    if let Some(e) = epp
        && let Ok(r) = c.get(format!("http://{e}/metrics")).send().await
    {
        let page = r.text().await.unwrap_or_default();
        n.moves = page
            .lines()
            .find_map(|l| l.strip_prefix("inferlane_epp_lora_placement_moves_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
    }
    Some(n)
}
