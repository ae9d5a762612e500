//! EPP Prometheus metrics with upstream's names (`inference_objective_*`, `inference_pool_*`).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model_name: String,
    pub target_model_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub model_name: String,
    pub target_model_name: String,
    pub error_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub name: String,
    pub model_server_pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

/// A held request's outcome (`outcome`: Dispatched, RejectedCapacity, EvictedTTL,
/// EvictedContextCancelled, as upstream).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowOutcomeLabels {
    pub fairness_id: String,
    pub priority: String,
    pub outcome: String,
    pub inference_pool: String,
    pub model_name: String,
    pub target_model_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowEnqueueLabels {
    pub fairness_id: String,
    pub priority: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowQueueLabels {
    pub fairness_id: String,
    pub priority: String,
    pub inference_pool: String,
    pub model_name: String,
    pub target_model_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InferencePoolLabels {
    pub inference_pool: String,
}

/// Where an adapter request found its adapter on the server it was sent to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    /// `gpu` (running or in a GPU slot), `cpu` (host-memory cache), `cold` (registered
    /// only: read from disk), `unknown` (the server reports no residency).
    pub tier: String,
}

/// Servers by their sidecar's resolver link report.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkStateLabels {
    /// `current` (links every current version), `lagging` (lacks some), `missing` (no
    /// report in 90 s).
    pub state: String,
}

/// One catalogue adapter's homes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdapterHomeLabels {
    pub adapter_name: String,
    /// `desired` (placement's homes) or `serving` (homes that list it).
    pub state: String,
}

type FGauge = Gauge<f64, AtomicU64>;

fn request_duration_histogram() -> Histogram {
    // Upstream's buckets for inference_objective_request_duration_seconds.
    Histogram::new([
        0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
        10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0,
        1200.0, 1800.0, 2700.0, 3600.0,
    ])
}

fn queue_duration_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ])
}

fn cycle_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
    ])
}

fn token_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 4.0, 12))
}

/// Handles to every EPP metric; clones share the series.
#[derive(Clone, Debug)]
pub struct EppMetrics {
    pub registry: Arc<Registry>,
    pub requests: Family<ModelLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub input_tokens: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub output_tokens: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub scheduler_e2e: Histogram,
    pub picks: Family<EndpointLabels, Counter>,
    pool_kv: Family<PoolLabels, FGauge>,
    pool_queue: Family<PoolLabels, FGauge>,
    pool_ready: Family<PoolLabels, Gauge>,
    pod_queue: Family<PodLabels, FGauge>,
    pub flow_queue_duration: Family<FlowOutcomeLabels, Histogram, fn() -> Histogram>,
    pub flow_dispatch_cycle: Histogram,
    pub flow_enqueue_duration: Family<FlowEnqueueLabels, Histogram, fn() -> Histogram>,
    pub flow_queue_size: Family<FlowQueueLabels, Gauge>,
    pub flow_queue_bytes: Family<FlowQueueLabels, Gauge>,
    pub flow_pool_saturation: Family<InferencePoolLabels, FGauge>,
    pub request_duration: Family<ModelLabels, Histogram, fn() -> Histogram>,
    /// Failed `/metrics` scrapes of model servers (all endpoints together).
    pub scrape_errors: Counter,
    /// 1 while the EPP reports ready (pool synced; leader, with leader election).
    pub ready: Gauge,
    /// Generation of the pool snapshot (bumped on every membership or rules change).
    pub pool_generation: Gauge,
    /// The memory budget (`--memory-budget`) and what is charged to it now.
    pub memory_budget: Gauge,
    pub memory_used: Gauge,
    /// LoRA fleet: adapter requests by residency tier, placement moves, drains ended, homes
    /// per catalogue adapter (series bounded by the catalogue).
    pub lora_requests: Family<TierLabels, Counter>,
    pub lora_moves: Counter,
    pub lora_drains: Counter,
    pub lora_copy_unloads: Counter,
    pub lora_copy_unload_failures: Counter,
    pub lora_homes: Family<AdapterHomeLabels, Gauge>,
    pub lora_link_reports: Family<LinkStateLabels, Gauge>,
}

impl EppMetrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let m = Self {
            registry: Arc::new(Registry::default()),
            requests: Family::default(),
            errors: Family::default(),
            input_tokens: Family::new_with_constructor(token_histogram),
            output_tokens: Family::new_with_constructor(token_histogram),
            scheduler_e2e: Histogram::new(exponential_buckets(0.000_01, 2.0, 18)),
            picks: Family::default(),
            pool_kv: Family::default(),
            pool_queue: Family::default(),
            pool_ready: Family::default(),
            pod_queue: Family::default(),
            flow_queue_duration: Family::new_with_constructor(queue_duration_histogram),
            flow_dispatch_cycle: cycle_histogram(),
            flow_enqueue_duration: Family::new_with_constructor(cycle_histogram),
            flow_queue_size: Family::default(),
            flow_queue_bytes: Family::default(),
            flow_pool_saturation: Family::default(),
            request_duration: Family::new_with_constructor(request_duration_histogram),
            scrape_errors: Counter::default(),
            ready: Gauge::default(),
            pool_generation: Gauge::default(),
            memory_budget: Gauge::default(),
            memory_used: Gauge::default(),
            lora_requests: Family::default(),
            lora_moves: Counter::default(),
            lora_drains: Counter::default(),
            lora_copy_unloads: Counter::default(),
            lora_copy_unload_failures: Counter::default(),
            lora_homes: Family::default(),
            lora_link_reports: Family::default(),
        };
        r.register(
            "inference_objective_request",
            "Requests per model and target model",
            m.requests.clone(),
        );
        r.register(
            "inference_objective_request_error",
            "Failed requests per model and error code",
            m.errors.clone(),
        );
        r.register(
            "inference_objective_input_tokens",
            "Prompt tokens per request",
            m.input_tokens.clone(),
        );
        r.register(
            "inference_objective_output_tokens",
            "Completion tokens per request",
            m.output_tokens.clone(),
        );
        r.register(
            "inference_extension_scheduler_e2e_duration_seconds",
            "Time to pick an endpoint for one request",
            m.scheduler_e2e.clone(),
        );
        r.register(
            "inference_extension_picks",
            "Requests sent to each endpoint",
            m.picks.clone(),
        );
        r.register(
            "inference_pool_average_kv_cache_utilization",
            "Mean KV cache usage of ready endpoints",
            m.pool_kv.clone(),
        );
        r.register(
            "inference_pool_average_queue_size",
            "Mean waiting queue of ready endpoints",
            m.pool_queue.clone(),
        );
        r.register(
            "inference_pool_ready_pods",
            "Endpoints answering their metrics",
            m.pool_ready.clone(),
        );
        r.register(
            "inference_pool_per_pod_queue_size",
            "Waiting queue per endpoint",
            m.pod_queue.clone(),
        );
        r.register(
            "inference_extension_flow_control_request_queue_duration_seconds",
            "[ALPHA] Time a request spent in flow control, by outcome",
            m.flow_queue_duration.clone(),
        );
        r.register(
            "inference_extension_flow_control_dispatch_cycle_duration_seconds",
            "[ALPHA] Time of one flow-control dispatch cycle",
            m.flow_dispatch_cycle.clone(),
        );
        r.register(
            "inference_extension_flow_control_request_enqueue_duration_seconds",
            "[ALPHA] Time to queue a request (or refuse it)",
            m.flow_enqueue_duration.clone(),
        );
        r.register(
            "inference_extension_flow_control_queue_size",
            "[ALPHA] Requests held by flow control",
            m.flow_queue_size.clone(),
        );
        r.register(
            "inference_extension_flow_control_queue_bytes",
            "[ALPHA] Bytes of requests held by flow control",
            m.flow_queue_bytes.clone(),
        );
        r.register(
            "inference_extension_flow_control_pool_saturation",
            "[ALPHA] Pool saturation as flow control's dispatcher last saw it (>= 1: held)",
            m.flow_pool_saturation.clone(),
        );
        r.register(
            "inference_objective_request_duration_seconds",
            "End-to-end request latency (request headers to the end of the response)",
            m.request_duration.clone(),
        );
        r.register(
            "inference_extension_model_server_scrape_errors",
            "Failed metrics scrapes of model servers",
            m.scrape_errors.clone(),
        );
        r.register(
            "inference_extension_ready",
            "1 while the EPP reports ready (pool synced, and leader with leader election)",
            m.ready.clone(),
        );
        r.register(
            "inference_extension_pool_generation",
            "Generation of the pool snapshot routing reads (bumped on each change)",
            m.pool_generation.clone(),
        );
        r.register(
            "inferlane_epp_memory_budget_bytes",
            "The process's memory budget (--memory-budget, else 60% of the container's limit)",
            m.memory_budget.clone(),
        );
        r.register(
            "inferlane_epp_memory_charged_bytes",
            "Bytes charged to the memory budget now (open streams, bodies, held requests)",
            m.memory_used.clone(),
        );
        r.register(
            "inferlane_epp_lora_requests",
            "Adapter requests by where the chosen server held the adapter (gpu, cpu, cold, unknown)",
            m.lora_requests.clone(),
        );
        r.register(
            "inferlane_epp_lora_placement_moves",
            "Adapter homes added or dropped by LoRA placement",
            m.lora_moves.clone(),
        );
        r.register(
            "inferlane_epp_lora_drains",
            "Dropped adapter homes whose drain ended (the sidecar then unloads)",
            m.lora_drains.clone(),
        );
        r.register(
            "inferlane_epp_lora_on_demand_unloads",
            "On-demand adapter copies (made by a server's LoRA resolver) unloaded once their requests were done",
            m.lora_copy_unloads.clone(),
        );
        r.register(
            "inferlane_epp_lora_on_demand_unload_failures",
            "Unloads of on-demand adapter copies that failed (tried again)",
            m.lora_copy_unload_failures.clone(),
        );
        r.register(
            "inferlane_epp_lora_link_reports",
            "Servers by their sidecar's resolver link report, on the deciding replica with --lora-copy-names versioned: current, lagging (lacks some current version), missing (none in 90 s: no copies there)",
            m.lora_link_reports.clone(),
        );
        r.register(
            "inferlane_epp_lora_adapter_homes",
            "Homes per catalogue adapter: desired by placement, serving (listing it)",
            m.lora_homes.clone(),
        );
        crate::net::metrics_text::register_info(
            &mut r,
            "inference_extension",
            &[
                (
                    "commit",
                    option_env!("INFERLANE_COMMIT").unwrap_or("unknown"),
                ),
                ("build_ref", env!("CARGO_PKG_VERSION")),
            ],
        );
        Self {
            registry: Arc::new(r),
            ..m
        }
    }

    pub fn set_pool(&self, pool: &str, ready: i64, kv_sum: f64, queue_sum: f64) {
        let l = PoolLabels { name: pool.into() };
        self.pool_ready.get_or_create(&l).set(ready);
        let n = ready.max(1) as f64;
        self.pool_kv.get_or_create(&l).set(kv_sum / n);
        self.pool_queue.get_or_create(&l).set(queue_sum / n);
    }

    pub fn set_pod_queue(&self, pool: &str, pod: &str, q: f64) {
        self.pod_queue
            .get_or_create(&PodLabels {
                name: pool.into(),
                model_server_pod: pod.into(),
            })
            .set(q);
    }

    /// Drops the per-endpoint series of an endpoint that left the pool (so pod churn does not
    /// grow the page for ever).
    pub fn forget_pod(&self, pool: &str, pod: &str) {
        self.pod_queue.remove(&PodLabels {
            name: pool.into(),
            model_server_pod: pod.into(),
        });
        self.picks.remove(&EndpointLabels {
            endpoint: pod.into(),
        });
    }

    pub fn encode(&self) -> String {
        crate::net::metrics_text::encode(&self.registry)
    }
}

impl Default for EppMetrics {
    fn default() -> Self {
        Self::new()
    }
}
