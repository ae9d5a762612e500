//! The EndpointPickerConfig document as YAML has it (unknown fields refused): `picker.rs` reads its scheduling part, `flow.rs` its flow-control part.

use std::collections::HashMap;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PluginRef {
    pub(super) plugin_ref: String,
    #[serde(default)]
    pub(super) weight: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Profile {
    #[serde(default)]
    #[allow(dead_code)]
    pub(super) name: Option<String>,
    pub(super) plugins: Vec<PluginRef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PluginDef {
    #[serde(rename = "type")]
    pub(super) kind: String,
    #[serde(default)]
    pub(super) name: Option<String>,
    #[serde(default)]
    pub(super) parameters: HashMap<String, serde_yaml::Value>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Saturation {
    pub(super) queue_depth_threshold: Option<f64>,
    pub(super) kv_cache_util_threshold: Option<f64>,
    pub(super) running_requests_threshold: Option<f64>,
    /// Seconds, or a string like `200ms`.
    pub(super) metrics_staleness_threshold: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawPickerConfig {
    #[serde(default)]
    #[allow(dead_code)]
    pub(super) api_version: Option<String>,
    #[serde(default)]
    pub(super) kind: Option<String>,
    #[serde(default)]
    pub(super) plugins: Vec<PluginDef>,
    #[serde(default)]
    pub(super) scheduling_profiles: Vec<Profile>,
    #[serde(default)]
    pub(super) saturation_detector: Saturation,
    #[serde(default)]
    pub(super) fallbacks: Option<usize>,
    /// Route requests for a model no server lists (servers load adapters on first use).
    #[serde(default)]
    pub(super) adapter_load_on_demand: Option<bool>,
    /// The servers run `--scheduling-policy priority`: forward request priorities.
    #[serde(default)]
    pub(super) forward_priority: Option<bool>,
    #[serde(default)]
    pub(super) feature_gates: Vec<String>,
    #[serde(default)]
    pub(super) flow_control: Option<RawFlowControl>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawFlowControl {
    #[serde(default)]
    pub(super) max_bytes: Option<serde_yaml::Value>,
    #[serde(default)]
    pub(super) max_requests: Option<serde_yaml::Value>,
    #[serde(default, rename = "defaultRequestTTL", alias = "defaultRequestTtl")]
    pub(super) default_request_ttl: Option<serde_yaml::Value>,
    #[serde(default)]
    pub(super) default_priority_band: Option<RawBand>,
    #[serde(default)]
    pub(super) priority_bands: Vec<RawBand>,
    /// Only upstream's default (`static-usage-limit-policy`, threshold 1.0) exists here.
    #[serde(default)]
    pub(super) usage_limit_policy_plugin_ref: Option<String>,
    /// Ours: answer sheddable requests 429 at once when saturated instead of queueing them.
    #[serde(default)]
    pub(super) shed_sheddable: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawBand {
    #[serde(default)]
    pub(super) priority: Option<i32>,
    #[serde(default)]
    pub(super) max_bytes: Option<serde_yaml::Value>,
    #[serde(default)]
    pub(super) max_requests: Option<serde_yaml::Value>,
    #[serde(default)]
    pub(super) fairness_policy_ref: Option<String>,
    #[serde(default)]
    pub(super) ordering_policy_ref: Option<String>,
    /// Ours: saturation at which this band stops being dispatched (default: the usage-limit
    /// policy's threshold, 1.0).
    #[serde(default)]
    pub(super) usage_limit: Option<f64>,
    /// Ours: the ceiling for a flow holding more than its share of the band's requests in
    /// flight while other flows have some (default: the band's usageLimit).
    #[serde(default)]
    pub(super) over_share_usage_limit: Option<f64>,
}
