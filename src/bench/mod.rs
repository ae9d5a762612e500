//! route-bench: the routing-quality benchmark (vllm-sim fleet, EPP, Envoy, open-loop load).

pub mod driver;
pub mod fleet;
pub mod floor;
pub mod lora;
pub mod lora_report;
pub mod plan;
pub mod policy;
pub mod report;
pub mod stats;
pub mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use thiserror::Error;
use tracing::Instrument;

use fleet::{Binaries, FleetError};
use policy::Policy;
use report::{ReportError, RunSummary};
use workload::{Workload, WorkloadError};

/// route-bench flags.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Workload files (see bench/workloads/).
    #[arg(required = true)]
    pub workloads: Vec<PathBuf>,
    /// Directory for results (requests.csv, summary.json/.csv/.md, SVG plots).
    #[arg(long, default_value = "target/route-bench")]
    pub out: PathBuf,
    /// Envoy binary.
    #[arg(long, default_value = ".venv/bin/envoy")]
    pub envoy: PathBuf,
    /// Directory holding the vllm-sim and epp binaries (default: next to this binary).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Override the workloads' rates (comma-separated req/s).
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    /// Override the workloads' policies (comma-separated).
    #[arg(long, value_delimiter = ',', value_parser = parse_policy)]
    pub policies: Vec<Policy>,
    /// Override the run length in seconds (the warm-up shrinks to a tenth of it).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Override the fleet size.
    #[arg(long)]
    pub servers: Option<usize>,
    /// Longest a single request may take before it counts as an error, in seconds.
    #[arg(long, default_value_t = 120)]
    pub request_timeout: u64,
    /// EPP processes per run, all behind one Envoy whose ext_proc cluster lists them (Envoy
    /// balances streams across them); policies are reported as `<policy>-x<N>`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub epp_replicas: u16,
    /// The EPP's log filter (each run's `epp.log`), e.g.
    /// `warn,inferlane::actors::lora_placer=debug` for every placement move.
    #[arg(long, default_value = "warn")]
    pub epp_log_filter: String,
    /// The simulators' log filter (each run's `vllm-sim.log`), e.g.
    /// `warn,vllm_sim::ttft=debug` for where each request's time to first token went
    /// (`scripts/ttft-causes.py` sums it).
    #[arg(long, default_value = "warn")]
    pub sim_log_filter: String,
    /// One more argument for every EPP, after the policy's own (repeat it; e.g.
    /// `--epp-arg=--lora-placement-interval --epp-arg=1s`): an A/B of one flag.
    #[arg(long = "epp-arg", allow_hyphen_values = true)]
    pub epp_args: Vec<String>,
    /// Kill (SIGKILL) the first EPP replica this many seconds into each run.
    #[arg(long)]
    pub kill_replica_at: Option<f64>,
    /// With several replicas, every sidecar asks the first (deciding) one instead of sidecar
    /// `i` asking replica `i mod N` as a Service would spread them.
    #[arg(long)]
    pub sidecars_ask_decider: bool,
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    Policy::parse(s).ok_or_else(|| {
        format!("unknown policy {s:?}: use round-robin, random, least-queue, default, default-local-prefix, flow-control, flow-round-robin, flow-vtc, lora-everywhere, lora-hash-2, lora-lazy, lora-placed, lora-placed-resolver or lora-placed-versioned")
    })
}

/// The benchmark failed.
#[derive(Debug, Error)]
pub enum BenchError {
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn binaries(args: &BenchArgs) -> Binaries {
    let dir = args.bin_dir.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("."))
    });
    Binaries {
        sim: dir.join("vllm-sim"),
        epp: dir.join("epp"),
        sidecar: dir.join("lora-sidecar"),
        envoy: args.envoy.clone(),
        epp_log_filter: args.epp_log_filter.clone(),
        sim_log_filter: args.sim_log_filter.clone(),
        epp_args: args.epp_args.clone(),
    }
}

fn apply_overrides(mut w: Workload, args: &BenchArgs) -> Workload {
    if !args.rates.is_empty() {
        w.rates = args.rates.clone();
        w.headline_rate = None;
    }
    if !args.policies.is_empty() {
        w.policies = args.policies.clone();
    }
    if let Some(d) = args.duration {
        w.duration_s = d;
        w.warmup_s = d / 10.0;
    }
    if let Some(s) = args.servers {
        w.fleet.servers = s.max(1);
    }
    w
}

/// One policy at one rate on a fresh fleet.
#[allow(clippy::too_many_arguments)]
async fn run_one(
    bins: &Binaries,
    w: &Workload,
    policy: Policy,
    plan: Vec<plan::Planned>,
    dir: &Path,
    timeout: Duration,
    replicas: u16,
    kill_at: Option<f64>,
    ask_decider: bool,
) -> Result<(Vec<driver::Outcome>, Option<lora::EngineCounts>), BenchError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let fleet = fleet::start_fleet(bins, w, w.fleet.servers, dir, policy.adapters()).await?;
    let mut epps: Vec<fleet::Epp> = Vec::new();
    if policy != Policy::RoundRobin {
        for r in 0..replicas {
            let d = if replicas == 1 {
                dir.to_path_buf()
            } else {
                dir.join(format!("epp{r}"))
            };
            std::fs::create_dir_all(&d).map_err(io(&d))?;
            // One replica decides LoRA placement; the others follow its table.
            let follow = epps
                .first()
                .map(|e| format!("http://{}/lora/v1/placement", e.metrics));
            let extra = lora::epp_args(w, policy, &fleet, follow.as_deref(), &d)?;
            epps.push(fleet::start_epp(bins, w, policy, &fleet, extra, &d).await?);
        }
    }
    let asked = if ask_decider {
        &epps[..epps.len().min(1)]
    } else {
        &epps[..]
    };
    let lora = lora::prepare(bins, w, policy, &fleet, asked, dir).await?;
    let ports: Vec<u16> = epps.iter().map(|e| e.grpc_port).collect();
    let cfg = fleet::envoy_config(&ports, &fleet.addrs);
    let envoy = fleet::start_envoy(bins, &cfg, dir).await?;
    let base = format!("http://127.0.0.1:{}", envoy.port);
    let epps = std::sync::Arc::new(std::sync::Mutex::new(epps));
    let killer = kill_at.map(|at| {
        let epps = epps.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(at)).await;
            if let Some(e) = epps.lock().expect("epps").first_mut() {
                tracing::info!(at, "killing EPP replica 0");
                e.proc.kill_now();
            }
        })
    });
    let outcomes = driver::run(plan, &base, timeout).await;
    if let Some(k) = killer {
        k.abort();
    }
    let first = epps
        .lock()
        .expect("epps")
        .first()
        .map(|e| e.metrics.clone());
    let counts = lora::collect(w, &fleet, first.as_deref()).await;
    drop(lora);
    if replicas > 1 {
        envoy.save_epp_cluster_state(dir).await;
    }
    drop(envoy);
    drop(epps);
    drop(fleet);
    Ok((outcomes, counts))
}

/// Runs every workload and writes the results under `args.out`. Returns the summaries.
pub async fn run(args: BenchArgs) -> Result<Vec<RunSummary>, BenchError> {
    let bins = binaries(&args);
    std::fs::create_dir_all(&args.out).map_err(io(&args.out))?;
    let csv_path = args.out.join("requests.csv");
    let mut csv = format!("{}\n", report::REQUESTS_HEADER);
    let mut all: Vec<RunSummary> = Vec::new();
    let mut md = String::from("## Routing-quality benchmark results\n\n");
    let timeout = Duration::from_secs(args.request_timeout);
    for path in &args.workloads {
        let w = apply_overrides(Workload::load(path)?, &args);
        let mut runs = Vec::new();
        let mut ttfts: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for &rate in &w.rates {
            let plan = plan::plan(&w, rate);
            for &policy in &w.policies {
                let name = if args.epp_replicas > 1 && policy != Policy::RoundRobin {
                    format!("{}-x{}", policy.name(), args.epp_replicas)
                } else {
                    policy.name().to_string()
                };
                let name = name.as_str();
                let span = tracing::info_span!("run", workload = %w.name, policy = name, rate, requests = plan.len());
                let dir = args.out.join(&w.name).join(format!("{name}-{rate}"));
                let (outcomes, counts) = run_one(
                    &bins,
                    &w,
                    policy,
                    plan.clone(),
                    &dir,
                    timeout,
                    args.epp_replicas,
                    args.kill_replica_at,
                    args.sidecars_ask_decider,
                )
                .instrument(span.clone())
                .await?;
                let mut s = report::summarize(&w, name, rate, &outcomes);
                s.lora = counts.map(|c| lora_report::summarize(&w, &outcomes, c));
                span.in_scope(|| {
                    tracing::info!(
                        ok = s.ok,
                        shed = s.shed,
                        errors = s.errors,
                        ttft_p90_ms = s.ttft_p90.map(|x| x * 1e3),
                        tokens_per_s = s.output_tokens_per_s,
                        prefix_hit = s.prefix_hit_rate,
                        "run done"
                    )
                });
                if rate == w.headline() {
                    let mut t: Vec<f64> = outcomes
                        .iter()
                        .filter(|o| o.at >= w.warmup_s && o.status == 200)
                        .filter_map(|o| o.ttft)
                        .collect();
                    t.sort_by(f64::total_cmp);
                    ttfts.insert(name.into(), t);
                }
                csv.push_str(&report::requests_csv(&w.name, name, rate, &outcomes));
                std::fs::write(&csv_path, &csv).map_err(io(&csv_path))?;
                runs.push(s.clone());
                all.push(s);
                let partial = format!("{md}{}", report::markdown(&w, &runs));
                report::write_summaries(&args.out, &all, &partial)?;
            }
        }
        let plots = report::plots(&args.out, &w, &runs, &ttfts)?;
        md.push_str(&report::markdown(&w, &runs));
        md.push_str(&format!(
            "\nCommand: `route-bench {}` (seed {}); plots: {}\n\n",
            path.display(),
            w.seed,
            plots.join(", ")
        ));
        report::write_summaries(&args.out, &all, &md)?;
    }
    Ok(all)
}
