//! Starts and stops the processes of one benchmark run: the vllm-sim fleet, the EPP and Envoy.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::policy::{AdapterSetup, Policy};
use super::workload::{BASE_MODEL, Workload};

/// A process of the run could not be started.
#[derive(Debug, Error)]
pub enum FleetError {
    #[error("{what}: cannot start {bin}: {source}; fix: {fix}")]
    Spawn {
        what: &'static str,
        bin: String,
        source: std::io::Error,
        fix: &'static str,
    },
    #[error("{what} did not become ready within {secs} s (log: {log})")]
    NotReady {
        what: &'static str,
        secs: u64,
        log: String,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Where the binaries are, and how the EPP logs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub sim: PathBuf,
    pub epp: PathBuf,
    pub sidecar: PathBuf,
    pub envoy: PathBuf,
    /// The EPP's `--log-filter` (its log is the run's `epp.log`).
    pub epp_log_filter: String,
    /// The simulators' `--log-filter` (their log is the run's `vllm-sim.log`).
    pub sim_log_filter: String,
    /// Appended to every EPP's arguments (`--epp-arg`).
    pub epp_args: Vec<String>,
}

/// Writes `text` to `dir/name` (creating `dir`) and returns the path.
pub(super) fn write_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf, FleetError> {
    let p = dir.join(name);
    std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&p, text))
        .map_err(|source| FleetError::Write {
            path: p.display().to_string(),
            source,
        })?;
    Ok(p)
}

/// A child process killed when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn new(child: Child, log: PathBuf) -> Self {
        Self { child, log }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the process at once (SIGKILL), as a node failure would.
    pub fn kill_now(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

pub(super) fn spawn(
    what: &'static str,
    bin: &Path,
    args: &[String],
    log: PathBuf,
    fix: &'static str,
    capture_stdout: bool,
) -> Result<Child, FleetError> {
    let err = std::fs::File::create(&log).map_err(|source| FleetError::Write {
        path: log.display().to_string(),
        source,
    })?;
    Command::new(bin)
        .args(args)
        .env("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true")
        .stdin(Stdio::null())
        .stdout(if capture_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| FleetError::Spawn {
            what,
            bin: bin.display().to_string(),
            source,
            fix,
        })
}

/// Reads stdout lines until `want` lines start with `marker`; returns their remainders.
pub(super) async fn read_markers(
    child: &mut Child,
    what: &'static str,
    marker: &str,
    want: usize,
    log: &Path,
) -> Result<Vec<String>, FleetError> {
    let not_ready = || FleetError::NotReady {
        what,
        secs: 30,
        log: log.display().to_string(),
    };
    let out = child.stdout.take().ok_or_else(not_ready)?;
    let mut lines = BufReader::new(out).lines();
    let mut found = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while found.len() < want {
        match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(l))) => {
                if let Some(rest) = l.strip_prefix(marker) {
                    found.push(rest.trim().to_string());
                }
            }
            _ => return Err(not_ready()),
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(found)
}

/// The simulated servers of one run.
#[derive(Debug)]
pub struct SimFleet {
    pub proc: Proc,
    pub addrs: Vec<String>,
    pub adapters_dir: PathBuf,
}

/// The vllm-sim flags every policy's fleet runs with (the latency model is the same for all).
pub fn sim_args(
    w: &Workload,
    servers: usize,
    adapters_dir: &Path,
    setup: AdapterSetup,
    log_filter: &str,
) -> Vec<String> {
    let f = &w.fleet;
    let mut a: Vec<String> = [
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--log-filter",
        log_filter,
        "--model",
        BASE_MODEL,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut push = |k: &str, v: String| {
        a.push(k.into());
        a.push(v);
    };
    push("--replicas", servers.to_string());
    push("--max-num-seqs", f.max_num_seqs.to_string());
    push("--max-loras", f.max_loras.to_string());
    if let Some(c) = f.max_cpu_loras {
        push("--max-cpu-loras", c.to_string());
    }
    push("--num-gpu-blocks", f.num_gpu_blocks.to_string());
    push("--time-scale", f.time_scale.to_string());
    push("--seed", w.seed.to_string());
    a.push("--enable-prompt-tokens-details".into());
    if w.priority_scheduling {
        a.push("--scheduling-policy".into());
        a.push("priority".into());
    }
    let classes = w.class_models();
    if !classes.is_empty() {
        a.push("--served-model-name".into());
        a.push(BASE_MODEL.into());
        a.extend(classes.into_iter().map(|(m, _)| m));
    }
    let adapters = w.adapters();
    if !adapters.is_empty() {
        a.push("--enable-lora".into());
        match setup {
            AdapterSetup::Everywhere => {
                a.push("--lora-modules".into());
                a.extend(
                    adapters
                        .iter()
                        .map(|n| format!("{n}={}", adapters_dir.join(n).display())),
                );
            }
            AdapterSetup::Resolver | AdapterSetup::SidecarsAndResolver => {
                a.push("--lora-resolver-dir".into());
                a.push(adapters_dir.display().to_string());
            }
            AdapterSetup::Partition(_) | AdapterSetup::Sidecars => {}
        }
    }
    a.extend(f.extra_args.iter().cloned());
    a
}

pub async fn start_fleet(
    bins: &Binaries,
    w: &Workload,
    servers: usize,
    dir: &Path,
    setup: AdapterSetup,
) -> Result<SimFleet, FleetError> {
    // Adapter directories as vLLM expects them (config + weights file), shared by the fleet.
    let adapters_dir = dir.join("adapters");
    for (n, r) in w.adapters().iter().zip(w.adapter_ranks()) {
        let d = adapters_dir.join(n);
        let config = format!(
            r#"{{"r": {r}, "lora_alpha": {}, "peft_type": "LORA"}}"#,
            2 * r
        );
        for (f, text) in [
            ("adapter_config.json", config.as_str()),
            ("adapter_model.safetensors", ""),
        ] {
            write_file(&d, f, text)?;
        }
    }
    let log = dir.join("vllm-sim.log");
    let mut child = spawn(
        "vllm-sim fleet",
        &bins.sim,
        &sim_args(w, servers, &adapters_dir, setup, &bins.sim_log_filter),
        log.clone(),
        "build it: cargo build --release --bin vllm-sim",
        true,
    )?;
    let addrs = read_markers(
        &mut child,
        "vllm-sim fleet",
        "VLLM_SIM_LISTENING",
        servers,
        &log,
    )
    .await?;
    Ok(SimFleet {
        proc: Proc { child, log },
        addrs,
        adapters_dir,
    })
}

/// The standalone pool file for the EPP: the fleet plus the workload's model rules.
pub fn pool_file(w: &Workload, addrs: &[String]) -> String {
    let mut s = format!("pool: {{name: {}}}\nendpoints:\n", w.name);
    // Named, so prefix placement (which hashes the name) is the same in every run whatever
    // ports the fleet got: runs with 1 and N EPP replicas then compare like for like.
    for (i, a) in addrs.iter().enumerate() {
        s.push_str(&format!("- address: {a}\n  name: sim-{i}\n"));
    }
    let classes = w.class_models();
    if !classes.is_empty() {
        s.push_str("models:\n");
        for (m, c) in classes {
            s.push_str(&format!("- modelName: {m}\n  criticality: {c}\n"));
        }
    }
    s
}

/// A running EPP.
#[derive(Debug)]
pub struct Epp {
    pub proc: Proc,
    pub grpc_port: u16,
    pub metrics: String,
}

pub async fn start_epp(
    bins: &Binaries,
    w: &Workload,
    policy: Policy,
    fleet: &SimFleet,
    extra: Vec<String>,
    dir: &Path,
) -> Result<Epp, FleetError> {
    let addrs = &fleet.addrs;
    let pool = write_file(dir, "pool.yaml", &pool_file(w, addrs))?;
    let mut args: Vec<String> = [
        "--bind-address",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--grpc-health-port",
        "0",
        "--metrics-port",
        "0",
        "--log-filter",
        &bins.epp_log_filter,
        "--pool-name",
        &w.name,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push("--pool-file".into());
    args.push(pool.display().to_string());
    if let Some(cfg) = policy.picker_config(
        w.priority_scheduling,
        &w.epp_config_extra,
        w.fleet.max_num_seqs,
        &w.flow_priority_bands,
        w.flow_over_share_usage_limit,
    ) {
        let p = write_file(dir, "picker.yaml", &cfg)?;
        args.push("--config-file".into());
        args.push(p.display().to_string());
    }
    // LoRA placement's flags (bench/lora.rs), for the policies that place.
    args.extend(extra);
    args.extend(bins.epp_args.iter().cloned());
    let log = dir.join("epp.log");
    let mut child = spawn(
        "EPP",
        &bins.epp,
        &args,
        log.clone(),
        "build it: cargo build --release --bin epp",
        true,
    )?;
    let line = read_markers(&mut child, "EPP", "EPP_LISTENING", 1, &log).await?;
    let field = |k: &str| -> Option<String> {
        line[0]
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")).map(str::to_string))
    };
    let not_ready = || FleetError::NotReady {
        what: "EPP",
        secs: 30,
        log: log.display().to_string(),
    };
    let grpc_port = field("grpc")
        .and_then(|g| g.rsplit(':').next().and_then(|p| p.parse().ok()))
        .ok_or_else(not_ready)?;
    let metrics = field("metrics").ok_or_else(not_ready)?;
    let epp = Epp {
        proc: Proc { child, log },
        grpc_port,
        metrics,
    };
    // Ready when every endpoint has been scraped.
    let want = addrs.len() as f64;
    let ok = poll(Duration::from_secs(30), || async {
        let text = reqwest::get(format!("http://{}/metrics", epp.metrics))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find(|l| l.starts_with("inference_pool_ready_pods"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .filter(|n| *n >= want)
    })
    .await;
    ok.ok_or_else(|| FleetError::NotReady {
        what: "EPP (all endpoints scraped)",
        secs: 30,
        log: epp.proc.log.display().to_string(),
    })?;
    Ok(epp)
}

/// Polls `f` every 50 ms until it yields a value or `within` passes.
pub async fn poll<T, F, Fut>(within: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const EPP_TEMPLATE: &str = include_str!("../../deploy/envoy/envoy-epp.yaml.tmpl");
const RR_TEMPLATE: &str = include_str!("../../deploy/envoy/envoy-round-robin.yaml.tmpl");
const VHOST: &str = "            - name: inference\n              domains: [\"*\"]\n";

/// Envoy's bootstrap for a policy: the EPP gateway (BUFFERED, fail-closed) or, for
/// round-robin, a STATIC cluster of the fleet. Both report the upstream they used in
/// `x-bench-upstream` so the harness can measure the load spread.
/// With several EPP ports (replicas), the ext_proc cluster lists them all and Envoy balances
/// the streams across them.
pub fn envoy_config(epp_ports: &[u16], addrs: &[String]) -> String {
    let cfg = match epp_ports.split_first() {
        Some((port, more)) => {
            let mut cfg = EPP_TEMPLATE
                .replace("${LISTEN_PORT}", "0")
                .replace("${EPP_PORT}", &port.to_string())
                .replace("${BODY_MODE}", "BUFFERED")
                .replace("${TRAILER_MODE}", "SKIP")
                .replace("${FAILURE_MODE_ALLOW}", "false");
            let one = format!(
                "        - endpoint:\n            address:\n              socket_address: {{ address: 127.0.0.1, port_value: {port} }}\n"
            );
            let all: String = epp_ports
                .iter()
                .map(|p| {
                    one.replace(
                        &format!("port_value: {port} "),
                        &format!("port_value: {p} "),
                    )
                })
                .collect();
            if !more.is_empty() {
                cfg = cfg.replacen(&one, &all, 1);
            }
            cfg
        }
        None => {
            let mut eps = String::new();
            for a in addrs {
                let (host, port) = a.rsplit_once(':').unwrap_or((a, "80"));
                eps.push_str(&format!(
                    "        - endpoint:\n            address:\n              socket_address: {{ address: {host}, port_value: {port} }}\n"
                ));
            }
            RR_TEMPLATE
                .replace("${LISTEN_PORT}", "0")
                .replace("${ENDPOINTS}\n", &eps)
        }
    };
    // The benchmark's own load generator stands in for an authenticated identity: its
    // gateway keeps the tenant header the shipped config strips from clients.
    let cfg = cfg.replace(
        "                - remove: x-gateway-inference-fairness-id\n",
        "",
    );
    cfg.replacen(
        VHOST,
        &format!("{VHOST}              response_headers_to_add:\n              - header: {{ key: x-bench-upstream, value: \"%UPSTREAM_HOST%\" }}\n"),
        1,
    )
}

/// A running Envoy.
#[derive(Debug)]
pub struct Envoy {
    pub proc: Proc,
    pub port: u16,
    /// Its admin address (host:port).
    pub admin: String,
}

impl Envoy {
    /// Saves the admin `/clusters` and the ext_proc cluster's stats into `dir` (how Envoy saw
    /// the EPP replicas: health flags, ejections, connect failures); best effort.
    pub async fn save_epp_cluster_state(&self, dir: &Path) {
        for (path, file) in [
            ("clusters", "envoy-clusters.txt"),
            ("stats?filter=%5Ecluster%5C.epp%5C.", "envoy-epp-stats.txt"),
        ] {
            let url = format!("http://{}/{path}", self.admin);
            if let Ok(r) = reqwest::get(&url).await
                && let Ok(text) = r.text().await
            {
                let _ = std::fs::write(dir.join(file), text);
            }
        }
    }
}

pub async fn start_envoy(bins: &Binaries, config: &str, dir: &Path) -> Result<Envoy, FleetError> {
    let cfg = write_file(dir, "envoy.yaml", config)?;
    let admin = dir.join("envoy.admin");
    let log = dir.join("envoy.log");
    let args: Vec<String> = vec![
        "-c".into(),
        cfg.display().to_string(),
        "--use-dynamic-base-id".into(),
        "--concurrency".into(),
        "1".into(),
        "-l".into(),
        "warning".into(),
        "--admin-address-path".into(),
        admin.display().to_string(),
    ];
    let child = spawn(
        "Envoy",
        &bins.envoy,
        &args,
        log.clone(),
        "install it: scripts/install-envoy.sh (or pass --envoy PATH)",
        false,
    )?;
    let (port, admin_addr) = poll(Duration::from_secs(30), || async {
        let a = std::fs::read_to_string(&admin).ok()?;
        let v: serde_json::Value =
            reqwest::get(format!("http://{}/listeners?format=json", a.trim()))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
        v["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
            .as_u64()
            .map(|p| (p as u16, a.trim().to_string()))
    })
    .await
    .ok_or_else(|| FleetError::NotReady {
        what: "Envoy",
        secs: 30,
        log: log.display().to_string(),
    })?;
    Ok(Envoy {
        proc: Proc { child, log },
        port,
        admin: admin_addr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_configs_carry_the_upstream_header() {
        let addrs = vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let rr = envoy_config(&[], &addrs);
        assert!(rr.contains("lb_policy: ROUND_ROBIN"));
        assert!(rr.contains("port_value: 2 }"));
        assert!(rr.contains("x-bench-upstream"));
        let epp = envoy_config(&[9], &addrs);
        assert!(epp.contains("port_value: 9 }"));
        let three = envoy_config(&[9, 10, 11], &addrs);
        for p in [9, 10, 11] {
            assert_eq!(
                three.matches(&format!("port_value: {p} }}")).count(),
                1,
                "{three}"
            );
        }
        assert!(epp.contains("x-bench-upstream"));
        assert!(!epp.contains("${"), "every placeholder filled");
        assert!(!rr.contains("${"), "every placeholder filled");
    }
}
