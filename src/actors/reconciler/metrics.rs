//! Prometheus metrics of the lora-sidecar (upstream's `lora_syncer_adapter_status` and ours).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdapterLabels {
    pub adapter_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdapterOpLabels {
    pub adapter_name: String,
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdapterErrorLabels {
    pub adapter_name: String,
    pub error: String,
}

/// One load, reload or unload call and how it ended (`success`, `failure`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: String,
    pub result: String,
}

fn operation_histogram() -> Histogram {
    Histogram::new([
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// Handles to every sidecar metric; cheap to clone (all `Arc`s inside).
#[derive(Clone, Debug)]
pub struct SidecarMetrics {
    pub registry: Arc<Registry>,
    /// 1 loaded, 0 not loaded (upstream name and meaning).
    pub adapter_status: Family<AdapterLabels, Gauge>,
    pub adapter_failures: Family<AdapterOpLabels, Counter>,
    pub adapter_consecutive_failures: Family<AdapterLabels, Gauge>,
    pub adapter_last_error: Family<AdapterErrorLabels, Gauge>,
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_duration: Histogram,
    /// Load/unload calls and their duration (the count is the calls).
    pub adapter_operation_duration: Family<OperationLabels, Histogram, fn() -> Histogram>,
    pub reconcile_in_progress: Gauge,
    pub config_valid: Gauge,
    pub config_generation: Gauge,
    pub config_errors: Counter,
    pub server_healthy: Gauge,
    pub ready: Gauge,
    /// From a new valid config to the server matching it (the swap-to-loaded latency).
    pub config_sync_duration: Histogram,
    /// 1 while the server matches the config (unlike `ready`, which latches).
    pub in_sync: Gauge,
}

impl SidecarMetrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let m = Self {
            registry: Arc::new(Registry::default()),
            adapter_status: Family::default(),
            adapter_failures: Family::default(),
            adapter_consecutive_failures: Family::default(),
            adapter_last_error: Family::default(),
            reconciles: Family::default(),
            reconcile_duration: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
            adapter_operation_duration: Family::new_with_constructor(operation_histogram),
            reconcile_in_progress: Gauge::default(),
            config_valid: Gauge::default(),
            config_generation: Gauge::default(),
            config_errors: Counter::default(),
            server_healthy: Gauge::default(),
            ready: Gauge::default(),
            config_sync_duration: Histogram::new([
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
            ]),
            in_sync: Gauge::default(),
        };
        r.register(
            "lora_syncer_adapter_status",
            "Adapter status: 1 loaded, 0 not loaded",
            m.adapter_status.clone(),
        );
        r.register(
            "lora_syncer_adapter_failures",
            "Failed load/unload calls per adapter",
            m.adapter_failures.clone(),
        );
        r.register(
            "lora_syncer_adapter_consecutive_failures",
            "Failures since the adapter last succeeded (0 = healthy)",
            m.adapter_consecutive_failures.clone(),
        );
        r.register(
            "lora_syncer_adapter_last_error",
            "Last error per failing adapter (value 1; the label is the operation and HTTP status, the message is in the log and /readyz)",
            m.adapter_last_error.clone(),
        );
        r.register(
            "lora_syncer_reconciles",
            "Reconcile passes by result",
            m.reconciles.clone(),
        );
        r.register(
            "lora_syncer_reconcile_duration_seconds",
            "Duration of reconcile passes",
            m.reconcile_duration.clone(),
        );
        r.register(
            "lora_syncer_adapter_operation_duration_seconds",
            "Load, reload and unload calls to vLLM by result, and how long each took",
            m.adapter_operation_duration.clone(),
        );
        r.register(
            "lora_syncer_reconcile_in_progress",
            "1 while a reconcile runs (never above 1)",
            m.reconcile_in_progress.clone(),
        );
        r.register(
            "lora_syncer_config_valid",
            "1 if the config file on disk is valid, 0 if the last good one is kept in force",
            m.config_valid.clone(),
        );
        r.register(
            "lora_syncer_config_generation",
            "Number of distinct valid configs applied",
            m.config_generation.clone(),
        );
        r.register(
            "lora_syncer_config_errors",
            "Distinct invalid config versions seen",
            m.config_errors.clone(),
        );
        r.register(
            "lora_syncer_server_healthy",
            "1 if vLLM answered /health with 200 on the last reconcile",
            m.server_healthy.clone(),
        );
        r.register(
            "lora_syncer_ready",
            "1 when every ensureExist adapter is loaded",
            m.ready.clone(),
        );
        r.register(
            "lora_syncer_config_sync_duration_seconds",
            "Time from a new valid config to the server matching it (adapters loaded and unloaded)",
            m.config_sync_duration.clone(),
        );
        r.register(
            "lora_syncer_in_sync",
            "1 while the server's adapters match the config",
            m.in_sync.clone(),
        );
        crate::net::metrics_text::register_info(
            &mut r,
            "lora_syncer",
            &[("version", env!("CARGO_PKG_VERSION"))],
        );
        Self {
            registry: Arc::new(r),
            ..m
        }
    }

    /// Text exposition (OpenMetrics).
    pub fn encode(&self) -> String {
        crate::net::metrics_text::encode(&self.registry)
    }
}

impl Default for SidecarMetrics {
    fn default() -> Self {
        Self::new()
    }
}
