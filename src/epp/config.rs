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
    /// Stable identity for prefix placement (a pod name); the address when absent. Every
    /// replica must see the same name for the same server.
    #[serde(default)]
    pub name: Option<String>,
}

impl EndpointSpec {
    /// What rendezvous affinity hashes: the name, else the address.
    pub fn identity(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.address)
    }
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
        let mut identities = HashMap::new();
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
            if let Some(n) = &e.name
                && (n.trim().is_empty() || n.len() > 253)
            {
                return Err(EppConfigError::Invalid {
                    field: format!("endpoints[{i}].name"),
                    message: format!("{} characters", n.len()),
                    fix: "name the server in 1-253 characters (its pod name), or leave name out"
                        .into(),
                });
            }
            // Two servers with one identity would share every rendezvous weight.
            if let Some(j) = identities.insert(e.identity(), i) {
                return Err(EppConfigError::Invalid {
                    field: format!("endpoints[{i}].name"),
                    message: format!("{:?} also names endpoints[{j}]", e.identity()),
                    fix: "give each endpoint its own name".into(),
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
    #[serde(default)]
    feature_gates: Vec<String>,
    #[serde(default)]
    flow_control: Option<RawFlowControl>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFlowControl {
    #[serde(default)]
    max_bytes: Option<serde_yaml::Value>,
    #[serde(default)]
    max_requests: Option<serde_yaml::Value>,
    #[serde(default, rename = "defaultRequestTTL", alias = "defaultRequestTtl")]
    default_request_ttl: Option<serde_yaml::Value>,
    #[serde(default)]
    default_priority_band: Option<RawBand>,
    #[serde(default)]
    priority_bands: Vec<RawBand>,
    /// Only upstream's default (`static-usage-limit-policy`, threshold 1.0) exists here.
    #[serde(default)]
    usage_limit_policy_plugin_ref: Option<String>,
    /// Ours: answer sheddable requests 429 at once when saturated instead of queueing them.
    #[serde(default)]
    shed_sheddable: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawBand {
    #[serde(default)]
    priority: Option<i32>,
    #[serde(default)]
    max_bytes: Option<serde_yaml::Value>,
    #[serde(default)]
    max_requests: Option<serde_yaml::Value>,
    #[serde(default)]
    fairness_policy_ref: Option<String>,
    #[serde(default)]
    ordering_policy_ref: Option<String>,
    /// Ours: saturation at which this band stops being dispatched (default: the usage-limit
    /// policy's threshold, 1.0).
    #[serde(default)]
    usage_limit: Option<f64>,
    /// Ours: the ceiling for a flow holding more than its share of the band's requests in
    /// flight while other flows have some (default: the band's usageLimit).
    #[serde(default)]
    over_share_usage_limit: Option<f64>,
}

/// Feature gate that turns flow control on (upstream's name).
pub const FLOW_CONTROL_GATE: &str = "flowControl";
/// A band's byte cap when unset or 0 (upstream's).
pub const BAND_MAX_BYTES_DEFAULT: u64 = 1_000_000_000;
/// A band's request cap when unset or 0 (llm-d-router's; upstream's v1.5 is unlimited).
pub const BAND_MAX_REQUESTS_DEFAULT: u64 = 5000;
/// How long a request may be held when `defaultRequestTTL` is unset (llm-d-router's).
pub const DEFAULT_REQUEST_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// VTC's default charge per prompt and per output token (the VTC paper's 1 and 2).
pub const VTC_WEIGHTS_DEFAULT: (f64, f64) = (1.0, 2.0);

/// A Kubernetes quantity (`1Gi`, `500M`, `2000`) as a count.
fn quantity(v: &serde_yaml::Value, field: &str) -> Result<u64, EppConfigError> {
    let bad = || EppConfigError::Invalid {
        field: field.into(),
        message: format!("{v:?} is not a non-negative quantity"),
        fix: "write a whole number or a quantity such as 512Mi or 1G".into(),
    };
    match v {
        serde_yaml::Value::Number(n) => n.as_u64().ok_or_else(bad),
        serde_yaml::Value::String(s) => {
            let s = s.trim();
            let split = s
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(s.len());
            let (num, suffix) = s.split_at(split);
            let mult: f64 = match suffix {
                "" => 1.0,
                "k" => 1e3,
                "M" => 1e6,
                "G" => 1e9,
                "T" => 1e12,
                "Ki" => 1024.0,
                "Mi" => 1024.0 * 1024.0,
                "Gi" => 1024.0 * 1024.0 * 1024.0,
                "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
                _ => return Err(bad()),
            };
            let n: f64 = num.parse().map_err(|_| bad())?;
            let total = n * mult;
            if total.is_finite() && total >= 0.0 && total < u64::MAX as f64 {
                Ok(total as u64)
            } else {
                Err(bad())
            }
        }
        _ => Err(bad()),
    }
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

/// Flow control's settings from an `EndpointPickerConfig`: `None` unless the `flowControl`
/// feature gate is on (upstream ignores the block without it, and so do we, with a warning).
pub fn parse_flow_control(
    text: &str,
) -> Result<Option<super::flow_control::FlowSettings>, EppConfigError> {
    use inferlane_epp::flow::{BandConfig, Fairness, FlowConfig, Ordering};
    let raw: RawPickerConfig = serde_yaml::from_str(text).map_err(yaml_error)?;
    if !raw.feature_gates.iter().any(|g| g == FLOW_CONTROL_GATE) {
        if raw.flow_control.is_some() {
            tracing::warn!(
                "flowControl is set but the flowControl feature gate is not: flow control stays off (add `featureGates: [flowControl]`)"
            );
        }
        return Ok(None);
    }
    for (i, g) in raw.feature_gates.iter().enumerate() {
        if g != FLOW_CONTROL_GATE {
            return Err(EppConfigError::Invalid {
                field: format!("featureGates[{i}]"),
                message: format!("unknown feature gate {g:?}"),
                fix: format!("the gates known here: {FLOW_CONTROL_GATE}"),
            });
        }
    }
    let fc = raw.flow_control.unwrap_or_default();
    let plugin_types: HashMap<String, &PluginDef> = raw
        .plugins
        .iter()
        .map(|p| (p.name.clone().unwrap_or_else(|| p.kind.clone()), p))
        .collect();
    let kind_of = |r: &str| -> String {
        plugin_types
            .get(r)
            .map_or_else(|| r.to_string(), |p| p.kind.clone())
    };
    let mut weights = VTC_WEIGHTS_DEFAULT;
    for p in raw
        .plugins
        .iter()
        .filter(|p| p.kind == "vtc-fairness-policy")
    {
        for (k, v) in &p.parameters {
            let n = v.as_f64().filter(|n| n.is_finite() && *n >= 0.0);
            match (k.as_str(), n) {
                ("inputTokenWeight", Some(n)) => weights.0 = n,
                ("outputTokenWeight", Some(n)) => weights.1 = n,
                _ => {
                    return Err(EppConfigError::Invalid {
                        field: format!("plugins[vtc-fairness-policy].parameters.{k}"),
                        message: "unknown parameter or not a non-negative number".into(),
                        fix: "use inputTokenWeight and outputTokenWeight (charge per token)".into(),
                    });
                }
            }
        }
    }
    let mut usage_threshold = 1.0;
    if let Some(r) = &fc.usage_limit_policy_plugin_ref {
        if kind_of(r) != "static-usage-limit-policy" {
            return Err(EppConfigError::Invalid {
                field: "flowControl.usageLimitPolicyPluginRef".into(),
                message: format!("unknown usage-limit policy {r:?}"),
                fix: "leave it unset or use static-usage-limit-policy (dispatch below its threshold, 1.0 by default)".into(),
            });
        }
        if let Some(p) = plugin_types.get(r.as_str()) {
            for (k, v) in &p.parameters {
                match (k.as_str(), v.as_f64()) {
                    ("threshold", Some(t)) if t > 0.0 && t.is_finite() => usage_threshold = t,
                    _ => {
                        return Err(EppConfigError::Invalid {
                            field: format!("plugins[{r}].parameters.{k}"),
                            message: "unknown parameter or not a positive number".into(),
                            fix: "use threshold (saturation below which requests are dispatched)"
                                .into(),
                        });
                    }
                }
            }
        }
    }
    let band = |b: &RawBand, field: &str| -> Result<BandConfig, EppConfigError> {
        let fairness = match b.fairness_policy_ref.as_deref().map(kind_of).as_deref() {
            None | Some("global-strict-fairness-policy") | Some("global-strict") => {
                Fairness::GlobalStrict
            }
            Some("round-robin-fairness-policy") | Some("round-robin") => Fairness::RoundRobin,
            Some("vtc-fairness-policy") | Some("vtc") => Fairness::Vtc,
            Some(other) => {
                return Err(EppConfigError::Invalid {
                    field: format!("{field}.fairnessPolicyRef"),
                    message: format!("unknown fairness policy {other:?}"),
                    fix: "use global-strict-fairness-policy, round-robin-fairness-policy or vtc-fairness-policy (or a plugin of one of those types)".into(),
                });
            }
        };
        let ordering = match b.ordering_policy_ref.as_deref().map(kind_of).as_deref() {
            None | Some("fcfs-ordering-policy") | Some("fcfs") => Ordering::Fcfs,
            Some("edf-ordering-policy") | Some("edf") => Ordering::Edf,
            Some(other) => {
                return Err(EppConfigError::Invalid {
                    field: format!("{field}.orderingPolicyRef"),
                    message: format!("unknown ordering policy {other:?}"),
                    fix: "use fcfs-ordering-policy or edf-ordering-policy".into(),
                });
            }
        };
        let max_bytes = match &b.max_bytes {
            Some(v) => quantity(v, &format!("{field}.maxBytes"))?,
            None => 0,
        };
        let max_requests = match &b.max_requests {
            Some(v) => quantity(v, &format!("{field}.maxRequests"))?,
            None => 0,
        };
        let usage_limit = match b.usage_limit {
            None => usage_threshold,
            Some(u) if u > 0.0 && u.is_finite() => u,
            Some(u) => {
                return Err(EppConfigError::Invalid {
                    field: format!("{field}.usageLimit"),
                    message: format!("{u} must be a positive number"),
                    fix: "use the saturation at which this band waits (e.g. 0.98 keeps about one batch slot in 64 free for higher bands)".into(),
                });
            }
        };
        let over_share_usage_limit = match b.over_share_usage_limit {
            None => usage_limit,
            Some(u) if u > 0.0 && u <= usage_limit => u,
            Some(u) => {
                return Err(EppConfigError::Invalid {
                    field: format!("{field}.overShareUsageLimit"),
                    message: format!("{u} must be positive and at most the band's usageLimit ({usage_limit})"),
                    fix: "use a little under usageLimit, e.g. 0.98: a tenant over its share leaves about one batch slot in 64 for the others".into(),
                });
            }
        };
        Ok(BandConfig {
            usage_limit,
            over_share_usage_limit,
            priority: b.priority.unwrap_or(0),
            max_bytes: if max_bytes == 0 {
                BAND_MAX_BYTES_DEFAULT
            } else {
                max_bytes
            },
            max_requests: usize::try_from(if max_requests == 0 {
                BAND_MAX_REQUESTS_DEFAULT
            } else {
                max_requests
            })
            .unwrap_or(usize::MAX),
            fairness,
            ordering,
        })
    };
    let default_band = band(
        &fc.default_priority_band.clone().unwrap_or_default(),
        "flowControl.defaultPriorityBand",
    )?;
    let mut bands: Vec<BandConfig> = Vec::new();
    for (i, b) in fc.priority_bands.iter().enumerate() {
        let field = format!("flowControl.priorityBands[{i}]");
        let Some(p) = b.priority else {
            return Err(EppConfigError::Invalid {
                field: format!("{field}.priority"),
                message: "missing".into(),
                fix: "give each band the priority it serves (higher is served first)".into(),
            });
        };
        if bands.iter().any(|x| x.priority == p) {
            return Err(EppConfigError::Invalid {
                field: format!("{field}.priority"),
                message: format!("priority {p} has two bands"),
                fix: "give each priority one band".into(),
            });
        }
        bands.push(band(b, &field)?);
    }
    let cap = |v: &Option<serde_yaml::Value>, field: &str| -> Result<u64, EppConfigError> {
        Ok(match v {
            Some(v) => quantity(v, field)?,
            None => 0,
        })
    };
    let max_bytes = cap(&fc.max_bytes, "flowControl.maxBytes")?;
    let max_requests = cap(&fc.max_requests, "flowControl.maxRequests")?;
    let default_ttl = match &fc.default_request_ttl {
        None => Some(DEFAULT_REQUEST_TTL),
        Some(v) => {
            let s = seconds(v)
                .filter(|s| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| EppConfigError::Invalid {
                    field: "flowControl.defaultRequestTTL".into(),
                    message: format!("{v:?} is not a duration"),
                    fix: "write a duration such as 30s (0 holds until the client goes away)".into(),
                })?;
            (s > 0.0).then(|| std::time::Duration::from_secs_f64(s))
        }
    };
    Ok(Some(super::flow_control::FlowSettings {
        queues: FlowConfig {
            max_bytes: if max_bytes == 0 { u64::MAX } else { max_bytes },
            max_requests: if max_requests == 0 {
                usize::MAX
            } else {
                usize::try_from(max_requests).unwrap_or(usize::MAX)
            },
            bands,
            default_band,
            vtc_input_weight: weights.0,
            vtc_output_weight: weights.1,
        },
        default_ttl,
        shed_sheddable: fc.shed_sheddable.unwrap_or(false),
    }))
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
                    ("rendezvousBlocks", Some(n)) if n >= 0.0 => cfg.rendezvous_blocks = n as usize,
                    ("loadBoundFactor", Some(n)) if n >= 1.0 && n.is_finite() => {
                        cfg.affinity_load_factor = n
                    }
                    ("balanceFactor", Some(n)) if (n == 0.0 || n >= 1.0) && n.is_finite() => {
                        cfg.prefix_balance_factor = n
                    }
                    _ => {
                        return Err(EppConfigError::Invalid {
                            field: format!("plugins[prefix-cache-scorer].parameters.{k}"),
                            message: "unknown parameter or not a number".into(),
                            fix: "use blockSize (tokens), maxPrefixBlocksToMatch, indexCapacity, rendezvousBlocks (0 = off), loadBoundFactor (>= 1) or balanceFactor (>= 1, 0 = off)"
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
    fn prefix_affinity_parameters() {
        let c = parse_picker_config(
            "plugins:\n- type: prefix-cache-scorer\n  parameters: {rendezvousBlocks: 4, loadBoundFactor: 2, balanceFactor: 0}\n",
        )
        .unwrap();
        assert_eq!(
            (
                c.rendezvous_blocks,
                c.affinity_load_factor,
                c.prefix_balance_factor
            ),
            (4, 2.0, 0.0)
        );
        let e = parse_picker_config(
            "plugins:\n- type: prefix-cache-scorer\n  parameters: {balanceFactor: 0.5}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("parameters.balanceFactor") && e.contains("balanceFactor (>= 1, 0 = off)"),
            "{e}"
        );
    }

    #[test]
    fn flow_control_needs_its_gate_and_names_bad_fields() {
        use inferlane_epp::flow::{Fairness, Ordering};
        // Without the gate the block is ignored, as upstream.
        assert_eq!(
            parse_flow_control("flowControl: {maxRequests: 10}\n").unwrap(),
            None
        );
        let s = parse_flow_control(
            "featureGates: [flowControl]\nplugins:\n- type: vtc-fairness-policy\n  name: fair\n  parameters: {inputTokenWeight: 0.5, outputTokenWeight: 3}\nflowControl:\n  maxBytes: 1Gi\n  maxRequests: 2k\n  defaultRequestTTL: 30s\n  defaultPriorityBand: {fairnessPolicyRef: round-robin-fairness-policy}\n  priorityBands:\n  - {priority: 1, maxRequests: 100, fairnessPolicyRef: fair, orderingPolicyRef: edf-ordering-policy}\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.queues.max_bytes, 1 << 30);
        assert_eq!(s.queues.max_requests, 2000);
        assert_eq!(s.default_ttl, Some(std::time::Duration::from_secs(30)));
        assert_eq!(s.queues.default_band.fairness, Fairness::RoundRobin);
        assert_eq!(s.queues.default_band.max_requests, 5000);
        assert_eq!(s.queues.default_band.max_bytes, 1_000_000_000);
        let b = &s.queues.bands[0];
        assert_eq!(
            (b.priority, b.max_requests, b.fairness, b.ordering),
            (1, 100, Fairness::Vtc, Ordering::Edf)
        );
        assert_eq!(
            (s.queues.vtc_input_weight, s.queues.vtc_output_weight),
            (0.5, 3.0)
        );
        assert_eq!(b.usage_limit, 1.0);
        let u = parse_flow_control(
            "featureGates: [flowControl]\nplugins:\n- {type: static-usage-limit-policy, name: lim, parameters: {threshold: 0.9}}\nflowControl:\n  usageLimitPolicyPluginRef: lim\n  priorityBands:\n  - {priority: -1, usageLimit: 0.8}\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(u.queues.default_band.usage_limit, 0.9);
        assert_eq!(u.queues.bands[0].usage_limit, 0.8);
        // Defaults: unlimited pool caps, 60 s TTL, global-strict + FCFS; TTL 0 = none.
        let d = parse_flow_control("featureGates: [flowControl]\n")
            .unwrap()
            .unwrap();
        assert_eq!(d.default_ttl, Some(DEFAULT_REQUEST_TTL));
        assert_eq!(d.queues.default_band.fairness, Fairness::GlobalStrict);
        assert_eq!(d.queues.max_requests, usize::MAX);
        let none = parse_flow_control(
            "featureGates: [flowControl]\nflowControl: {defaultRequestTTL: 0}\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(none.default_ttl, None);
        for (text, field) in [
            (
                "featureGates: [flowControl]\nflowControl: {maxBytes: lots}\n",
                "flowControl.maxBytes",
            ),
            (
                "featureGates: [flowControl]\nflowControl: {priorityBands: [{maxRequests: 1}]}\n",
                "flowControl.priorityBands[0].priority",
            ),
            (
                "featureGates: [flowControl]\nflowControl: {priorityBands: [{priority: 1}, {priority: 1}]}\n",
                "flowControl.priorityBands[1].priority",
            ),
            (
                "featureGates: [flowControl]\nflowControl: {priorityBands: [{priority: 1, fairnessPolicyRef: fifo}]}\n",
                "flowControl.priorityBands[0].fairnessPolicyRef",
            ),
            (
                "featureGates: [flowControl]\nflowControl: {defaultPriorityBand: {orderingPolicyRef: lifo}}\n",
                "flowControl.defaultPriorityBand.orderingPolicyRef",
            ),
            (
                "featureGates: [flowControl]\nflowControl: {defaultRequestTTL: soon}\n",
                "flowControl.defaultRequestTTL",
            ),
            (
                "featureGates: [flowControl, warpDrive]\n",
                "featureGates[1]",
            ),
            (
                "featureGates: [flowControl]\nflowControl: {priorityBands: [{priority: 1, usageLimit: -1}]}\n",
                "flowControl.priorityBands[0].usageLimit",
            ),
        ] {
            let e = parse_flow_control(text).unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
        let e = parse_flow_control("featureGates: [flowControl]\nflowControl: {maxReqs: 1}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("maxReqs"), "{e}");
        // The scheduler half of the same file still parses.
        assert!(
            parse_picker_config("featureGates: [flowControl]\nflowControl: {maxRequests: 3}\n")
                .is_ok()
        );
    }

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
        assert_eq!(p.endpoints[0].identity(), "127.0.0.1:8000");
        let named = PoolFile::parse(
            "endpoints:\n- address: 127.0.0.1:8000\n  name: vllm-0\n- address: 127.0.0.1:8001\n",
        )
        .unwrap();
        assert_eq!(named.endpoints[0].identity(), "vllm-0");
        for (text, want) in [
            (
                "endpoints:\n- {address: 127.0.0.1:8000, name: a}\n- {address: 127.0.0.1:8001, name: a}\n",
                "endpoints[1].name",
            ),
            (
                "endpoints:\n- {address: 127.0.0.1:8000}\n- {address: 127.0.0.1:8001, name: 127.0.0.1:8000}\n",
                "endpoints[1].name",
            ),
            (
                "endpoints:\n- {address: 127.0.0.1:8000, name: ' '}\n",
                "endpoints[0].name",
            ),
        ] {
            let e = PoolFile::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
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
