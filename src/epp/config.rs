//! EPP files: the standalone pool file (endpoints + model rules) and the EndpointPickerConfig.

use std::collections::HashMap;

use inferlane_epp::rules::{ModelRule, Objective, RewriteRule, UnknownModelPolicy};
use inferlane_epp::{EngineType, ModelRules, RuleError, SchedulerConfig};
use serde::Deserialize;
use thiserror::Error;

use crate::actors::file_watcher::WatchedConfig;

/// A pool or picker file was rejected.
#[derive(Debug, Error)]
pub enum EppConfigError {
    #[error("{0}")]
    Yaml(String),
    #[error("{field}: {message}; fix: {fix}")]
    Invalid {
        field: String,
        message: String,
        fix: String,
    },
    #[error("model rules: {0}")]
    Rules(#[from] RuleError),
}

fn yaml_error(e: serde_yaml::Error) -> EppConfigError {
    EppConfigError::Yaml(e.to_string())
}

/// One endpoint of the pool in standalone mode.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// `ip:port` of the model server.
    pub address: String,
    #[serde(default)]
    pub engine: EngineType,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PoolMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPoolFile {
    #[serde(default)]
    pool: PoolMeta,
    /// Required: a file without it is empty or cut short (a half-written file), not a pool
    /// that lost all its servers; `endpoints: []` empties the pool on purpose.
    #[serde(default)]
    endpoints: Option<Vec<EndpointSpec>>,
    #[serde(default)]
    models: Vec<ModelRule>,
    #[serde(default)]
    objectives: Vec<Objective>,
    #[serde(default)]
    rewrites: Vec<RewriteRule>,
    #[serde(default)]
    unknown_models: Option<UnknownModelPolicy>,
}

/// The standalone pool file: the pool's endpoints and its model rules.
#[derive(Debug, Clone)]
pub struct PoolFile {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub endpoints: Vec<EndpointSpec>,
    pub rules: ModelRules,
    /// `unknownModels` when the file sets it (otherwise `--unknown-models` applies).
    pub unknown_models: Option<UnknownModelPolicy>,
}

impl PoolFile {
    pub fn parse(text: &str) -> Result<Self, EppConfigError> {
        if text.trim().is_empty() {
            return Err(EppConfigError::Invalid {
                field: "(file)".into(),
                message: "the pool file is empty".into(),
                fix: "write the pool's endpoints; `endpoints: []` empties the pool on purpose"
                    .into(),
            });
        }
        let raw: RawPoolFile = serde_yaml::from_str(text).map_err(yaml_error)?;
        let Some(endpoints) = raw.endpoints else {
            return Err(EppConfigError::Invalid {
                field: "endpoints".into(),
                message: "missing (an empty or truncated file?)".into(),
                fix: "list the pool's endpoints; `endpoints: []` empties the pool on purpose"
                    .into(),
            });
        };
        let mut seen = HashMap::new();
        for (i, e) in endpoints.iter().enumerate() {
            if e.address.parse::<std::net::SocketAddr>().is_err() {
                return Err(EppConfigError::Invalid {
                    field: format!("endpoints[{i}].address"),
                    message: format!("{:?} is not ip:port", e.address),
                    fix: "write the model server as an IP address and port, e.g. 10.0.0.7:8000"
                        .into(),
                });
            }
            if let Some(j) = seen.insert(e.address.clone(), i) {
                return Err(EppConfigError::Invalid {
                    field: format!("endpoints[{i}].address"),
                    message: format!("{} is also endpoints[{j}]", e.address),
                    fix: "list each endpoint once".into(),
                });
            }
        }
        Ok(Self {
            name: raw.pool.name,
            namespace: raw.pool.namespace,
            endpoints,
            rules: ModelRules::new(
                raw.models,
                raw.objectives,
                raw.rewrites,
                raw.unknown_models.unwrap_or_default(),
            )?,
            unknown_models: raw.unknown_models,
        })
    }
}

impl WatchedConfig for PoolFile {
    type Error = EppConfigError;

    fn parse(text: &str, _validate: bool) -> Result<Self, Self::Error> {
        PoolFile::parse(text)
    }

    fn summary(&self) -> String {
        format!(
            "pool {} with {} endpoints, {} model rules",
            self.name.as_deref().unwrap_or("(unnamed)"),
            self.endpoints.len(),
            self.rules.model_names().count()
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PluginRef {
    plugin_ref: String,
    #[serde(default)]
    weight: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
    plugins: Vec<PluginRef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PluginDef {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    parameters: HashMap<String, serde_yaml::Value>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Saturation {
    queue_depth_threshold: Option<f64>,
    kv_cache_util_threshold: Option<f64>,
    running_requests_threshold: Option<f64>,
    /// Seconds, or a string like `200ms`.
    metrics_staleness_threshold: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPickerConfig {
    #[serde(default)]
    #[allow(dead_code)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    plugins: Vec<PluginDef>,
    #[serde(default)]
    scheduling_profiles: Vec<Profile>,
    #[serde(default)]
    saturation_detector: Saturation,
    #[serde(default)]
    fallbacks: Option<usize>,
    /// Route requests for a model no server lists (servers load adapters on first use).
    #[serde(default)]
    adapter_load_on_demand: Option<bool>,
    /// The servers run `--scheduling-policy priority`: forward request priorities.
    #[serde(default)]
    forward_priority: Option<bool>,
}

fn seconds(v: &serde_yaml::Value) -> Option<f64> {
    match v {
        serde_yaml::Value::Number(n) => n.as_f64(),
        serde_yaml::Value::String(s) => crate::runtime::parse_duration(s)
            .ok()
            .map(|d| d.as_secs_f64()),
        _ => None,
    }
}

/// Parses an `EndpointPickerConfig`-style file into scheduler settings. Missing parts keep
/// upstream's defaults (queue 2, kv-cache 2, prefix-cache 3).
pub fn parse_picker_config(text: &str) -> Result<SchedulerConfig, EppConfigError> {
    let raw: RawPickerConfig = serde_yaml::from_str(text).map_err(yaml_error)?;
    if let Some(k) = &raw.kind
        && k != "EndpointPickerConfig"
    {
        return Err(EppConfigError::Invalid {
            field: "kind".into(),
            message: format!("{k:?}"),
            fix: "use kind: EndpointPickerConfig".into(),
        });
    }
    let mut cfg = SchedulerConfig::default();
    // A plugin name (or its type) -> type.
    let mut types: HashMap<String, String> = HashMap::new();
    for p in &raw.plugins {
        types.insert(
            p.name.clone().unwrap_or_else(|| p.kind.clone()),
            p.kind.clone(),
        );
        if p.kind == "lora-affinity-scorer" {
            for (k, v) in &p.parameters {
                match (k.as_str(), v.as_f64()) {
                    ("affinityQueueThreshold", Some(n)) if n >= 0.0 => {
                        cfg.lora_affinity_queue_threshold = n
                    }
                    _ => {
                        return Err(EppConfigError::Invalid {
                            field: format!("plugins[lora-affinity-scorer].parameters.{k}"),
                            message: "unknown parameter or not a non-negative number".into(),
                            fix: "use affinityQueueThreshold (queue depth; 0 turns the affinity filter off)".into(),
                        });
                    }
                }
            }
        }
        if p.kind == "prefix-cache-scorer" {
            for (k, v) in &p.parameters {
                let n = v.as_f64().or_else(|| v.as_u64().map(|x| x as f64));
                match (k.as_str(), n) {
                    ("blockSize", Some(n)) => cfg.prefix_block_chars = (n as usize) * 4,
                    ("maxPrefixBlocksToMatch", Some(n)) => cfg.prefix_max_blocks = n as usize,
                    ("indexCapacity", Some(n)) | ("lruCapacity", Some(n)) => {
                        cfg.prefix_index_capacity = n as usize
                    }
                    _ => {
                        return Err(EppConfigError::Invalid {
                            field: format!("plugins[prefix-cache-scorer].parameters.{k}"),
                            message: "unknown parameter or not a number".into(),
                            fix: "use blockSize (tokens), maxPrefixBlocksToMatch or indexCapacity"
                                .into(),
                        });
                    }
                }
            }
        }
    }
    if let Some(profile) = raw.scheduling_profiles.first() {
        cfg.queue_weight = 0.0;
        cfg.kv_cache_weight = 0.0;
        cfg.prefix_cache_weight = 0.0;
        cfg.lora_affinity_weight = 0.0;
        cfg.active_request_weight = 0.0;
        for (i, p) in profile.plugins.iter().enumerate() {
            let kind = types
                .get(&p.plugin_ref)
                .cloned()
                .unwrap_or_else(|| p.plugin_ref.clone());
            let w = p.weight.unwrap_or(1.0);
            match kind.as_str() {
                "queue-scorer" => cfg.queue_weight = w,
                "kv-cache-utilization-scorer" | "kv-cache-scorer" => cfg.kv_cache_weight = w,
                "prefix-cache-scorer" => cfg.prefix_cache_weight = w,
                "lora-affinity-scorer" => cfg.lora_affinity_weight = w,
                "active-request-scorer" => cfg.active_request_weight = w,
                "random-picker" => cfg.picker = inferlane_epp::scheduler::PickerKind::Random,
                "max-score-picker" => cfg.picker = inferlane_epp::scheduler::PickerKind::MaxScore,
                "single-profile-handler" => {}
                other => {
                    return Err(EppConfigError::Invalid {
                        field: format!("schedulingProfiles[0].plugins[{i}].pluginRef"),
                        message: format!("unknown plugin {other:?}"),
                        fix: "use queue-scorer, kv-cache-utilization-scorer, prefix-cache-scorer, lora-affinity-scorer, active-request-scorer, max-score-picker or random-picker".into(),
                    });
                }
            }
        }
    }
    let s = &raw.saturation_detector;
    if let Some(q) = s.queue_depth_threshold {
        cfg.queue_depth_threshold = q;
    }
    if let Some(k) = s.kv_cache_util_threshold {
        cfg.kv_cache_util_threshold = k;
    }
    if let Some(r) = s.running_requests_threshold {
        if !(r.is_finite() && r >= 0.0) {
            return Err(EppConfigError::Invalid {
                field: "saturationDetector.runningRequestsThreshold".into(),
                message: format!("{r} must be a non-negative number"),
                fix: "use a little under the servers' --max-num-seqs, or 0 to turn it off".into(),
            });
        }
        cfg.running_requests_threshold = r;
    }
    if let Some(v) = &s.metrics_staleness_threshold {
        cfg.metrics_staleness_threshold = seconds(v).ok_or_else(|| EppConfigError::Invalid {
            field: "saturationDetector.metricsStalenessThreshold".into(),
            message: format!("{v:?} is not a duration"),
            fix: "write seconds (0.2) or a duration (200ms)".into(),
        })?;
    }
    if let Some(f) = raw.fallbacks {
        cfg.fallbacks = f;
    }
    if let Some(d) = raw.adapter_load_on_demand {
        cfg.adapter_load_on_demand = d;
    }
    if let Some(f) = raw.forward_priority {
        cfg.forward_priority = f;
    }
    for (field, v) in [
        (
            "saturationDetector.queueDepthThreshold",
            cfg.queue_depth_threshold,
        ),
        (
            "saturationDetector.kvCacheUtilThreshold",
            cfg.kv_cache_util_threshold,
        ),
    ] {
        if v <= 0.0 || !v.is_finite() {
            return Err(EppConfigError::Invalid {
                field: field.into(),
                message: format!("{v} must be positive"),
                fix: "use a positive number".into(),
            });
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_file() {
        let p = PoolFile::parse(
            "pool: {name: p}\nendpoints:\n- address: 127.0.0.1:8000\n- address: 127.0.0.1:8001\n  engine: sglang\nmodels:\n- modelName: food-review\n  criticality: Standard\n  targetModels:\n  - {name: food-review-1, weight: 90}\n  - {name: food-review-2, weight: 10}\n",
        )
        .unwrap();
        assert_eq!(p.endpoints.len(), 2);
        assert_eq!(p.endpoints[1].engine, EngineType::Sglang);
        assert_eq!(
            p.rules
                .resolve("food-review", None, None, 0.95)
                .unwrap()
                .target,
            "food-review-2"
        );
        let e = PoolFile::parse("endpoints:\n- address: nope\n").unwrap_err();
        assert!(e.to_string().contains("endpoints[0].address"), "{e}");
        let e = PoolFile::parse("endpoints:\n- adress: 1.2.3.4:5\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `adress`"), "{e}");
        // Empty, or cut before its endpoints: refused (the last good file stays in force);
        // an explicit empty list is a pool with no servers.
        for text in ["", "\n  \n", "pool: {name: p}\nmodels: []\n"] {
            let e = PoolFile::parse(text).unwrap_err().to_string();
            assert!(e.contains("endpoints: []"), "{text:?}: {e}");
        }
        assert!(
            PoolFile::parse("endpoints: []\n")
                .unwrap()
                .endpoints
                .is_empty()
        );
    }

    #[test]
    fn picker_config() {
        let c = parse_picker_config(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n- type: prefix-cache-scorer\n  parameters: {blockSize: 32}\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n    weight: 1\n  - pluginRef: prefix-cache-scorer\n    weight: 5\nsaturationDetector:\n  metricsStalenessThreshold: 500ms\nadapterLoadOnDemand: true\n",
        )
        .unwrap();
        assert_eq!(
            (c.queue_weight, c.prefix_cache_weight, c.kv_cache_weight),
            (1.0, 5.0, 0.0)
        );
        assert_eq!(c.prefix_block_chars, 128);
        assert!(c.adapter_load_on_demand);
        assert!((c.metrics_staleness_threshold - 0.5).abs() < 1e-9);
        let e = parse_picker_config("schedulingProfiles:\n- plugins:\n  - pluginRef: magic\n")
            .unwrap_err();
        assert!(e.to_string().contains("unknown plugin"), "{e}");
        assert_eq!(
            parse_picker_config("{}").unwrap(),
            SchedulerConfig::default()
        );
        let r = parse_picker_config("plugins:\n- type: lora-affinity-scorer\n  parameters: {affinityQueueThreshold: 4}\nschedulingProfiles:\n- plugins:\n  - pluginRef: random-picker\n").unwrap();
        assert_eq!(r.picker, inferlane_epp::scheduler::PickerKind::Random);
        assert_eq!(r.lora_affinity_queue_threshold, 4.0);
        let e = parse_picker_config(
            "plugins:\n- type: lora-affinity-scorer\n  parameters: {affinityQueueThreshold: -1}\n",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("plugins[lora-affinity-scorer].parameters.affinityQueueThreshold"),
            "{e}"
        );
    }
}
