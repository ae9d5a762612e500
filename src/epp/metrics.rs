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

type FGauge = Gauge<f64, AtomicU64>;

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
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for EppMetrics {
    fn default() -> Self {
        Self::new()
    }
}
