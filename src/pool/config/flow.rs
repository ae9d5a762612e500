//! The EndpointPickerConfig's flow-control part (`featureGates: [flowControl]`, `flowControl:`): bands, caps, fairness and ordering, validated naming the field.

use std::collections::HashMap;
use std::time::Duration;

use inferlane_epp::flow::FlowConfig;

use super::document::{PluginDef, RawBand, RawPickerConfig};
use super::{EppConfigError, quantity, seconds, yaml_error};

/// Flow control's settings (from `flowControl` of the EndpointPickerConfig).
#[derive(Debug, Clone, PartialEq)]
pub struct FlowSettings {
    pub queues: FlowConfig,
    /// How long a request may wait; `None` waits until the client goes away.
    pub default_ttl: Option<Duration>,
    /// Sheddable requests (negative priority) are answered 429 at once when the pool is
    /// saturated instead of being queued (upstream queues them with the gate on).
    pub shed_sheddable: bool,
}

/// Feature gate that turns flow control on (upstream's name).
pub const FLOW_CONTROL_GATE: &str = "flowControl";
/// A band's byte cap when unset or 0 (upstream's).
pub const BAND_MAX_BYTES_DEFAULT: u64 = 1_000_000_000;
/// A band's request cap when unset or 0 (llm-d-router's; upstream's v1.5 is unlimited).
pub const BAND_MAX_REQUESTS_DEFAULT: u64 = 5000;
/// All bands' held requests together when `flowControl.maxRequests` is unset or 0 (ours;
/// upstream leaves it unlimited): below the shipped gateway's ext_proc circuit breaker
/// (32,768 streams, deploy/envoy/), so held requests meet the EPP's 429, never the gateway's
/// overflow, with room left for the requests in flight.
pub const POOL_MAX_REQUESTS_DEFAULT: u64 = 10_000;
/// How long a request may be held when `defaultRequestTTL` is unset (llm-d-router's).
pub const DEFAULT_REQUEST_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// VTC's default charge per prompt and per output token (the VTC paper's 1 and 2).
pub const VTC_WEIGHTS_DEFAULT: (f64, f64) = (1.0, 2.0);

/// Flow control's settings from an `EndpointPickerConfig`: `None` unless the `flowControl`
/// feature gate is on (upstream ignores the block without it, and so do we, with a warning).
pub fn parse_flow_control(text: &str) -> Result<Option<FlowSettings>, EppConfigError> {
    use inferlane_epp::flow::{BandConfig, Fairness, FlowConfig, Ordering};
    let raw: RawPickerConfig = serde_yaml::from_str(text).map_err(yaml_error)?;
    // Every gate is checked, on or not: a misspelt one (`flowControll`) would otherwise
    // leave the feature off without a word.
    for (i, g) in raw.feature_gates.iter().enumerate() {
        if g != FLOW_CONTROL_GATE {
            return Err(EppConfigError::Invalid {
                field: format!("featureGates[{i}]"),
                message: format!("unknown feature gate {g:?}"),
                fix: format!("the gates known here: {FLOW_CONTROL_GATE}"),
            });
        }
    }
    if !raw.feature_gates.iter().any(|g| g == FLOW_CONTROL_GATE) {
        if raw.flow_control.is_some() {
            tracing::warn!(
                "flowControl is set but the flowControl feature gate is not: flow control stays off (add `featureGates: [flowControl]`)"
            );
        }
        return Ok(None);
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
    Ok(Some(FlowSettings {
        queues: FlowConfig {
            max_bytes: if max_bytes == 0 { u64::MAX } else { max_bytes },
            max_requests: usize::try_from(if max_requests == 0 {
                POOL_MAX_REQUESTS_DEFAULT
            } else {
                max_requests
            })
            .unwrap_or(usize::MAX),
            bands,
            default_band,
            vtc_input_weight: weights.0,
            vtc_output_weight: weights.1,
        },
        default_ttl,
        shed_sheddable: fc.shed_sheddable.unwrap_or(false),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::config::parse_picker_config;

    #[test]
    fn an_unknown_gate_is_refused_naming_it() {
        let e = parse_flow_control("featureGates: [flowControll]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("featureGates[0]") && e.contains("flowControll"),
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
        // Defaults: 10,000 held in all (upstream: unlimited), 60 s TTL, global-strict + FCFS; TTL 0 = none.
        let d = parse_flow_control("featureGates: [flowControl]\n")
            .unwrap()
            .unwrap();
        assert_eq!(d.default_ttl, Some(DEFAULT_REQUEST_TTL));
        assert_eq!(d.queues.default_band.fairness, Fairness::GlobalStrict);
        assert_eq!(d.queues.max_requests, POOL_MAX_REQUESTS_DEFAULT as usize);
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
}
