//! The EPP's flags: upstream's names where upstream has them, and the upstream spellings mapped onto ours.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::net::serve;
use crate::runtime::{parse_bool, parse_duration};

/// epp flags (upstream-compatible names where upstream has them).
#[derive(Debug, Clone, Args)]
pub struct EppArgs {
    /// ext_proc gRPC port.
    #[arg(long, default_value_t = 9002)]
    pub grpc_port: u16,
    /// gRPC health port (services `liveness`, `readiness`, the ExternalProcessor).
    #[arg(long, default_value_t = 9003)]
    pub grpc_health_port: u16,
    /// Prometheus metrics port.
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    /// Address every server binds.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: String,
    /// The InferencePool this EPP serves (labels metrics).
    #[arg(long, default_value = "default-pool")]
    pub pool_name: String,
    /// Namespace of the InferencePool (and of its pods and models); env NAMESPACE as upstream.
    #[arg(long, env = "NAMESPACE", default_value = "default")]
    pub pool_namespace: String,
    /// EndpointPickerConfig file (scorer weights, saturation thresholds).
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// EndpointPickerConfig given as text instead of a file (wins over --config-file).
    #[arg(long)]
    pub config_text: Option<String>,
    /// API group of the InferencePool: `inference.networking.k8s.io` (v1) or
    /// `inference.networking.x-k8s.io` (v1alpha2). Without it, the group the cluster serves
    /// is discovered at start (v1 preferred) and logged.
    #[arg(long)]
    pub pool_group: Option<String>,
    /// Requests for a model no InferenceModel (or pool file rule) names: `route` them as they
    /// are, or `reject` them with 404. Without it, as the pool's API generation did upstream:
    /// a v1alpha2 pool (the InferenceModel era) rejects, a v1 pool or a pool file routes. A
    /// pool file's `unknownModels` wins over this flag.
    #[arg(long, value_enum)]
    pub unknown_models: Option<UnknownModels>,
    /// Put the client's model name back into responses of rewritten requests (canary
    /// splits, rewrites). Off by default: like vLLM and upstream, a response names the model
    /// that served it (`"model": "food-review-1"`), which is how a canary is told apart.
    #[arg(long, default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub restore_model_name: bool,
    /// Honour the request header `x-gateway-model-name-rewrite` (it replaces the target
    /// model, overriding canary splits and `--unknown-models reject`). Off by default: only
    /// turn it on where the gateway strips the client's copy and sets its own.
    #[arg(long, default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub trust_model_rewrite_header: bool,
    /// Metrics older than this count as stale (saturated, not trusted for picking); overrides
    /// the EndpointPickerConfig's saturationDetector.metricsStalenessThreshold.
    #[arg(long, value_parser = parse_duration)]
    pub metrics_staleness_threshold: Option<Duration>,
    /// How often the pool-level gauges (inference_pool_*) are recomputed.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub refresh_prometheus_metrics_interval: Duration,
    /// Standalone on Kubernetes: select pods by labels (`app=vllm,tier=gpu`) instead of
    /// watching an InferencePool; needs --target-ports.
    #[arg(long)]
    pub endpoint_selector: Option<String>,
    /// Ports of each selected pod that are endpoints (with --endpoint-selector), e.g. `8000,8001`.
    #[arg(long, value_delimiter = ',')]
    pub target_ports: Vec<i32>,
    /// Protect `/metrics` and `/debug/*` with the API server's TokenReview and
    /// SubjectAccessReview (a Bearer token whose identity may `get` the path), as upstream.
    /// Default: on against Kubernetes, off with --pool-file (no API server to ask).
    #[arg(long, value_parser = parse_bool, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub metrics_endpoint_auth: Option<bool>,
    /// Kubeconfig file for the API server (upstream's `--kubeconfig`); without it `KUBECONFIG`,
    /// `~/.kube/config` or the pod's service account.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Standalone mode: YAML file with the pool's endpoints and model rules, watched live.
    /// Without it the EPP watches the InferencePool, its pods and models in Kubernetes.
    #[arg(long, env = "EPP_POOL_FILE")]
    pub pool_file: Option<PathBuf>,
    /// Metrics scrape period per endpoint.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub refresh_metrics_interval: Duration,
    /// Period for re-reading each endpoint's /v1/models (adapter availability).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub refresh_models_interval: Duration,
    /// Timeout of one scrape.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub scrape_timeout: Duration,
    /// A vLLM server with requests running or waiting whose token counters
    /// (`vllm:generation_tokens_total`, `vllm:prompt_tokens_total`) stay unchanged this long
    /// is stalled (reading a LoRA adapter, or stuck): it gets requests only when no other
    /// server can take them (`readHoldWeight`). A server that makes long compute steps
    /// (prefills of thousands of tokens) gets a threshold above its recent ones, learned
    /// from its counters; 0 turns the signal off.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub engine_stall_after: Duration,
    /// OS threads that run the scrape loops (endpoints are spread over them); one thread
    /// scrapes a few hundred endpoints every 50 ms. Scraping off the request path's worker
    /// pool keeps its wake-ups from costing the request path.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub scrape_threads: u16,
    /// Threads serving ext_proc connections (0 = one per core). Each gateway connection and
    /// all its streams are served by one thread (no cross-thread hand-offs per message);
    /// Envoy opens one connection per worker, so a gateway with N workers uses up to N.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=256))]
    pub grpc_threads: u16,
    /// Ask model servers for only the metric families routing reads (`/metrics?name[]=...`,
    /// prometheus_client's filter, which vLLM's `/metrics` honours): a ~2 KB answer instead
    /// of a ~50 KB page, less work for the model server and the EPP. Checked against a whole
    /// page at start and every minute; servers that ignore or break the filter are read whole.
    #[arg(long, default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub metrics_name_filter: bool,
    /// Serve ext_proc over TLS (as upstream, on by default; gateways connect without verifying).
    #[arg(long, default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub secure_serving: bool,
    /// Directory with `tls.crt` and `tls.key` for --secure-serving (re-read when they change);
    /// without it a self-signed certificate is generated at start.
    #[arg(long)]
    pub cert_path: Option<PathBuf>,
    /// Several replicas: only the holder of a coordination.k8s.io Lease reports ready (the
    /// others keep scraping, ready to take over). Without it replicas run active-active.
    #[arg(long)]
    pub ha_enable_leader_election: bool,
    /// Lease duration: a dead leader is replaced after this long.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// How often the lease is renewed or tried.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub lease_renew_interval: Duration,
    /// Most concurrent requests one gateway connection may have open (HTTP/2
    /// MAX_CONCURRENT_STREAMS; the gateway opens another connection past it). Idle gateway
    /// connections are checked with HTTP/2 PINGs every 30 s.
    #[arg(long, default_value_t = serve::DEFAULT_MAX_CONCURRENT_STREAMS, value_parser = clap::value_parser!(u32).range(1..))]
    pub grpc_max_concurrent_streams: u32,
    /// Largest request body accepted (413 above).
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Memory the process may spend on requests (open streams, bodies, held requests;
    /// 429 past it): bytes or a quantity (`512Mi`), or `auto` for 60% of the container's
    /// memory limit (cgroup), else 25% of the machine's.
    #[arg(long, default_value = "auto")]
    pub memory_budget: String,
    /// Serve `/debug/*` to any address. Without it, and without
    /// `--metrics-endpoint-auth`, they answer loopback clients only (403 otherwise): they
    /// list pod names, addresses and canary weights.
    #[arg(long)]
    pub public_debug_endpoints: bool,
    /// LoRA fleet placement: the sidecars' `vLLMLoRAConfig` file (the ConfigMap, mounted;
    /// watched live). Its `onDemand` adapters are placed on servers by demand and served at
    /// `/lora/v1/placement` for the sidecars to load; `ensureExist` ones count as loaded
    /// everywhere, `ensureNotExist` ones are never placed.
    #[arg(long, env = "EPP_LORA_CATALOG")]
    pub lora_catalog: Option<PathBuf>,
    /// How often placement runs.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub lora_placement_interval: Duration,
    /// The servers' `--max-cpu-loras` (host-memory adapter cache); 0: their `--max-loras`,
    /// vLLM's default. vLLM does not report it. Sizes placement's cache budget, and the
    /// cache the EPP guesses from what it sent a server that does not report residency.
    #[arg(long, default_value_t = 0)]
    pub lora_max_cpu_loras: u32,
    /// GPU adapter slots of a server whose metrics do not report `max_lora`.
    #[arg(long, default_value_t = 1)]
    pub lora_default_max_loras: u32,
    /// Follow another replica's placement (its `/lora/v1/placement` URL) instead of deciding:
    /// for active-active replicas, all but one.
    #[arg(long)]
    pub lora_placement_from: Option<String>,
    /// Active-active replicas on Kubernetes: the replicas elect the one that decides on the
    /// Lease `<pool>-epp-lora-placement`; the others follow its table, found on the lease.
    /// A new decider starts from the table it followed: a change of decider moves nothing.
    #[arg(long)]
    pub lora_placement_election: bool,
    /// The URL the other replicas read this one's table at, when it decides
    /// (default `http://$POD_IP:<metrics-port>/lora/v1/placement`).
    #[arg(long, env = "EPP_LORA_PLACEMENT_URL")]
    pub lora_placement_advertise_url: Option<String>,
    /// `load`: the sidecars load each adapter on its homes before requests go there.
    /// `lazy`: requests go to the homes at once and the servers load on first use (vLLM's
    /// LoRA resolver plugins; every move costs a request a disk read).
    #[arg(long, value_enum, default_value_t = PlacementMode::Load)]
    pub lora_placement_mode: PlacementMode,
    /// Adapters placement gives no cache entry: `registered` keeps one registration each
    /// (a sidecar load; vLLM's LRU then keeps what was read last). `resolver`: none; a
    /// request for one goes to a server with a free cache entry, whose LoRA resolver
    /// (`VLLM_PLUGINS=lora_filesystem_resolver`, `VLLM_LORA_RESOLVER_CACHE_DIR` holding
    /// `<id>/`) reads it, and the EPP unloads the copy once its requests are done, so the
    /// adapters placed there stay cached. Needs vLLM's Rust frontend (an unload frees the
    /// entry) and `--lora-placement-mode load`.
    #[arg(long, value_enum, default_value_t = ColdAdapters::Registered)]
    pub lora_cold_adapters: ColdAdapters,
    /// With `--lora-cold-adapters resolver`, the name a request asks a server's resolver
    /// for: `plain`, the adapter's id (the folder `<id>/`); `versioned`, its current served
    /// name `<id>@<tag>`, which each sidecar started with `--lora-resolver-dir` links to the
    /// catalogue's source. A versioned copy is the version a home loads: placement makes a
    /// server holding one a home without reading it again, a dropped home serves on as a
    /// copy until idle, and a changed source is a new name (no same-name reload).
    #[arg(long, value_enum, default_value_t = CopyNames::Plain)]
    pub lora_copy_names: CopyNames,
}

/// `--lora-copy-names`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CopyNames {
    Plain,
    Versioned,
}

/// `--lora-cold-adapters`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColdAdapters {
    Registered,
    Resolver,
}

/// `--lora-placement-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlacementMode {
    Load,
    Lazy,
}

/// `--unknown-models`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UnknownModels {
    Route,
    Reject,
}

impl From<UnknownModels> for inferlane_epp::rules::UnknownModelPolicy {
    fn from(u: UnknownModels) -> Self {
        match u {
            UnknownModels::Route => Self::Route,
            UnknownModels::Reject => Self::Reject,
        }
    }
}

/// Upstream EPP flags spelled differently from ours, or accepted without effect (the reason
/// is logged at start). Flags we share are matched in either spelling without an entry here.
pub const UPSTREAM_FLAGS: &[(&str, crate::flags::Upstream)] = {
    use crate::flags::Upstream::{Ignored, Rename};
    &[
        (
            "enable-pprof",
            Ignored {
                takes_value: false,
                why: "no pprof handlers (the Rust EPP has no Go runtime)",
            },
        ),
        (
            "health-checking",
            Ignored {
                takes_value: false,
                why: "the gRPC health service always runs",
            },
        ),
        (
            "tracing",
            Ignored {
                takes_value: false,
                why: "no OpenTelemetry export; logs carry x-request-id",
            },
        ),
        (
            "enable-cert-reload",
            Ignored {
                takes_value: false,
                why: "--cert-path is always re-read when it changes",
            },
        ),
        (
            "total-queued-requests-metric",
            Ignored {
                takes_value: true,
                why: "metric names follow each pod's inference.networking.k8s.io/engine-type label",
            },
        ),
        (
            "kv-cache-usage-percentage-metric",
            Ignored {
                takes_value: true,
                why: "metric names follow each pod's inference.networking.k8s.io/engine-type label",
            },
        ),
        (
            "lora-info-metric",
            Ignored {
                takes_value: true,
                why: "metric names follow each pod's inference.networking.k8s.io/engine-type label",
            },
        ),
        (
            "cache-info-metric",
            Ignored {
                takes_value: true,
                why: "metric names follow each pod's inference.networking.k8s.io/engine-type label",
            },
        ),
        (
            "model-server-metrics-port",
            Ignored {
                takes_value: true,
                why: "metrics are read from each endpoint's target port",
            },
        ),
        (
            "model-server-metrics-path",
            Ignored {
                takes_value: true,
                why: "metrics are read from /metrics",
            },
        ),
        (
            "model-server-metrics-scheme",
            Ignored {
                takes_value: true,
                why: "metrics are read over http",
            },
        ),
        (
            "model-server-metrics-https-insecure-skip-verify",
            Ignored {
                takes_value: false,
                why: "metrics are read over http",
            },
        ),
        (
            "target-endpoint-key",
            Ignored {
                takes_value: true,
                why: "the destination header is x-gateway-destination-endpoint",
            },
        ),
        (
            "destination-endpoint-hint-key",
            Ignored {
                takes_value: true,
                why: "the destination header is x-gateway-destination-endpoint",
            },
        ),
        (
            "destination-endpoint-hint-metadata-namespace",
            Ignored {
                takes_value: true,
                why: "the metadata namespace is envoy.lb",
            },
        ),
        ("endpoint-target-ports", Rename("target-ports")),
    ]
};
