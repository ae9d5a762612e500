//! vllm-sim: a vLLM 0.32-compatible model server simulator for tests, the demo and benchmarks.

pub mod blocks;
pub mod engine;
pub mod engine_actor;
pub mod lora;
pub mod metrics;
pub mod openai;
mod prom_text;
pub mod residency;
pub mod server;
pub mod tiers;
pub mod waited;

use clap::Args;

use engine::EngineParams;
use metrics::LoraInfoStyle;

/// vllm-sim flags. Names follow vLLM's where vLLM has the flag.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Address to bind (vLLM binds all interfaces by default).
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Port to bind; 0 picks a free one (printed on stdout as `VLLM_SIM_LISTENING <addr>`).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Independent simulated servers in this process (ports --port, --port+1, ...; all
    /// ephemeral with --port 0), each printed on its own `VLLM_SIM_LISTENING` line. For fleets
    /// in benchmarks; a real vLLM is one server per process.
    #[arg(long, default_value_t = 1)]
    pub replicas: u16,
    /// Base model path or hub id (reported as the base model's `root`).
    #[arg(long, default_value = "meta-llama/Llama-3.1-8B-Instruct")]
    pub model: String,
    /// Names clients use for the base model (default: --model).
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,
    /// Accept LoRA adapters.
    #[arg(long)]
    pub enable_lora: bool,
    /// Distinct adapters per batch; requests for more wait as `deferred`.
    #[arg(long, default_value_t = 1)]
    pub max_loras: usize,
    /// Highest adapter rank accepted; higher ranks fail to load with 500.
    #[arg(long, default_value_t = 16)]
    pub max_lora_rank: u32,
    /// Adapters kept in host memory (LRU; vLLM's default and minimum: --max-loras). An adapter
    /// in neither tier is read from disk before its request runs.
    #[arg(long)]
    pub max_cpu_loras: Option<usize>,
    /// Disk read of an adapter in neither tier, in milliseconds per unit of its rank (`r` in
    /// its adapter_config.json; 8 when absent). 0 (default): reads cost nothing.
    #[arg(long, default_value_t = 0.0)]
    pub lora_disk_ms_per_rank: f64,
    /// Unload frees the adapter's GPU slot and CPU cache entry, as vLLM's Rust frontend does
    /// (`VLLM_USE_RUST_FRONTEND=1`); otherwise unload only forgets the name (the Python
    /// frontend: the memory stays until evicted).
    #[arg(long, env = "VLLM_USE_RUST_FRONTEND", default_value = "false",
          value_parser = parse_env_bool, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub lora_unload_frees: bool,
    /// Serve vLLM's coming residency metrics: `vllm:lora_adapter_loaded{adapter_name,level}`,
    /// `vllm:num_gpu_loaded_lora_adapters`, `vllm:max_gpu_lora_adapters`,
    /// `vllm:lora_adapter_load_seconds` (open vLLM PRs; off by default as in vLLM 0.32).
    #[arg(long)]
    pub lora_residency_metrics: bool,
    /// vLLM's filesystem LoRA resolver (`VLLM_LORA_RESOLVER_CACHE_DIR` with the
    /// `lora_filesystem_resolver` plugin): a request for an unknown model `m` with an adapter
    /// in `<dir>/m` registers it and reads it from disk on that request (lazy loading).
    #[arg(long, env = "VLLM_LORA_RESOLVER_CACHE_DIR")]
    pub lora_resolver_dir: Option<std::path::PathBuf>,
    /// Adapters loaded at start: `name=path` or JSON `{"name":..,"path":..}`.
    #[arg(long, num_args = 1..)]
    pub lora_modules: Vec<String>,
    /// Most sequences in one batch (`--max-num-seq` too: vLLM's argparse takes prefixes, and
    /// the seeds' manifests spell it so).
    #[arg(long, alias = "max-num-seq", default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Behave as vLLM before in-place reloads: `load_inplace` is ignored and an adapter
    /// already loaded answers 400 "already been loaded" (for testing clients against it).
    #[arg(long)]
    pub ignore_load_inplace: bool,
    /// Accepted for compatibility with vLLM manifests (one simulated GPU).
    #[arg(long, hide = true)]
    pub tensor_parallel_size: Option<u32>,
    /// Accepted for compatibility with vLLM manifests (nothing is compiled).
    #[arg(long, hide = true)]
    pub compilation_config: Option<String>,
    /// Accepted for compatibility with vLLM manifests.
    #[arg(long, hide = true)]
    pub dtype: Option<String>,
    /// Accepted for compatibility with vLLM manifests (the KV cache is --num-gpu-blocks).
    #[arg(long, hide = true)]
    pub gpu_memory_utilization: Option<f64>,
    /// Context length: prompt + max_tokens above it is a 400.
    #[arg(long, default_value_t = 32768)]
    pub max_model_len: u32,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: u32,
    /// KV cache size in blocks.
    #[arg(long, alias = "num-gpu-blocks-override", default_value_t = 2048)]
    pub num_gpu_blocks: u32,
    /// `fcfs` or `priority`: with `priority` the waiting queue is ordered by the request's
    /// `priority` (lower first) and KV pressure preempts the lowest priority first; with
    /// `fcfs` a non-zero `priority` is a 400, as in vLLM.
    #[arg(long, value_enum, default_value_t = SchedulingPolicy::Fcfs)]
    pub scheduling_policy: SchedulingPolicy,
    /// Prefill token budget per engine step.
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: u32,
    /// Report `prompt_tokens_details.cached_tokens` in usage.
    #[arg(long)]
    pub enable_prompt_tokens_details: bool,
    /// Prefill cost per uncached prompt token, in microseconds.
    #[arg(long, default_value_t = 100.0)]
    pub prefill_us_per_token: f64,
    /// Fixed decode step cost, in milliseconds.
    #[arg(long, default_value_t = 8.0)]
    pub decode_base_ms: f64,
    /// Extra decode step cost per running sequence, in milliseconds.
    #[arg(long, default_value_t = 0.15)]
    pub decode_ms_per_seq: f64,
    /// Cost of moving an adapter into a GPU LoRA slot, in milliseconds.
    #[arg(long, default_value_t = 20.0)]
    pub lora_load_ms: f64,
    /// Multiplies every simulated duration (0.1 = ten times faster than the modelled GPU).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Seed for response ids, token text and fault injection.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Completion length when a request sets no max_tokens.
    #[arg(long, default_value_t = 16)]
    pub default_max_tokens: u32,
    /// Wall time one `/v1/load_lora_adapter` call takes (a real vLLM load: ~10 ms to seconds).
    #[arg(long, default_value_t = 10)]
    pub lora_load_latency_ms: u64,
    /// Fraction of generation requests answered with a 500 (fault injection).
    #[arg(long, default_value_t = 0.0)]
    pub failure_rate: f64,
    /// vLLM's API server process count. Above 1, vLLM serves `/metrics` through
    /// prometheus_client's multiprocess collector, whose `name[]` filter matches nothing
    /// (an empty page); the simulator answers the same way (one process either way).
    #[arg(long, default_value_t = 1)]
    pub api_server_count: u32,
    /// How `vllm:lora_requests_info` fills its adapter labels.
    #[arg(long, value_enum, default_value_t = LoraInfoStyle::V032)]
    pub lora_info_style: LoraInfoStyle,
    /// Allow runtime LoRA loading (vLLM reads the env var `VLLM_ALLOW_RUNTIME_LORA_UPDATING`).
    #[arg(long, env = "VLLM_ALLOW_RUNTIME_LORA_UPDATING", default_value = "false",
          value_parser = parse_env_bool, action = clap::ArgAction::Set)]
    pub allow_runtime_lora_updating: bool,
}

/// vLLM's `--scheduling-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchedulingPolicy {
    Fcfs,
    Priority,
}

fn parse_env_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        other => Err(format!("expected true/false, got {other:?}")),
    }
}

impl SimArgs {
    /// Names the base model answers to.
    pub fn base_names(&self) -> Vec<String> {
        if self.served_model_name.is_empty() {
            vec![self.model.clone()]
        } else {
            self.served_model_name.clone()
        }
    }

    /// Engine parameters with every cost converted to seconds and scaled by `--time-scale`.
    pub fn engine_params(&self) -> EngineParams {
        let s = self.time_scale.max(0.0);
        EngineParams {
            max_num_seqs: self.max_num_seqs.max(1),
            max_loras: self.max_loras.max(1),
            block_size: self.block_size.max(1),
            num_gpu_blocks: self.num_gpu_blocks.max(1),
            max_num_batched_tokens: self.max_num_batched_tokens.max(1),
            prefill_per_token: self.prefill_us_per_token * 1e-6 * s,
            decode_base: self.decode_base_ms * 1e-3 * s,
            decode_per_seq: self.decode_ms_per_seq * 1e-3 * s,
            lora_load: self.lora_load_ms * 1e-3 * s,
            max_cpu_loras: self
                .max_cpu_loras
                .unwrap_or(self.max_loras)
                .max(self.max_loras.max(1)),
            lora_disk_per_rank: self.lora_disk_ms_per_rank.max(0.0) * 1e-3 * s,
            lora_unload_frees: self.lora_unload_frees,
            priority_scheduling: self.scheduling_policy == SchedulingPolicy::Priority,
        }
    }
}

/// Parses one `--lora-modules` entry.
pub fn parse_lora_module(s: &str) -> Result<(String, String), String> {
    if s.trim_start().starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(s).map_err(|e| format!("--lora-modules {s:?}: {e}"))?;
        let name = v["name"].as_str();
        let path = v["path"].as_str();
        return match (name, path) {
            (Some(n), Some(p)) => Ok((n.to_string(), p.to_string())),
            _ => Err(format!(
                "--lora-modules {s:?}: JSON form needs \"name\" and \"path\""
            )),
        };
    }
    match s.split_once('=') {
        Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok((n.to_string(), p.to_string())),
        _ => Err(format!(
            "--lora-modules {s:?}: expected name=path or {{\"name\":..,\"path\":..}}"
        )),
    }
}
