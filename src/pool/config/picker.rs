//! The EndpointPickerConfig's scheduling part (`--config-file`): plugins, weights, profiles and the saturation detector, validated naming the field.

use std::collections::HashMap;

use inferlane_epp::SchedulerConfig;

use super::document::RawPickerConfig;
use super::{EppConfigError, seconds, yaml_error};

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
                    ("readHoldWeight", Some(n)) if n >= 0.0 && n.is_finite() => {
                        cfg.read_hold_weight = n
                    }
                    _ => {
                        return Err(EppConfigError::Invalid {
                            field: format!("plugins[lora-affinity-scorer].parameters.{k}"),
                            message: "unknown parameter or not a non-negative number".into(),
                            fix: "use affinityQueueThreshold (queue depth; 0 turns the affinity filter off) or readHoldWeight (taken off the score of a server reading an adapter from disk; 0 = off)".into(),
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
        assert_eq!(
            r.read_hold_weight,
            SchedulerConfig::default().read_hold_weight
        );
        let r = parse_picker_config(
            "plugins:\n- type: lora-affinity-scorer\n  parameters: {readHoldWeight: 0}\n",
        )
        .unwrap();
        assert_eq!(r.read_hold_weight, 0.0);
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
