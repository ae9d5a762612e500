//! The EPP's configuration formats, one file each: the standalone pool file, the EndpointPickerConfig's scheduling part, and its flow-control part.

mod document;
pub mod flow;
pub mod picker;
pub mod pool_file;

use thiserror::Error;

pub use flow::{FlowSettings, parse_flow_control};
pub use picker::parse_picker_config;
pub use pool_file::{EndpointSpec, PoolFile};

/// A pool or picker file was rejected: a YAML error, or a field with what is wrong and the fix.
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
    Rules(#[from] inferlane_epp::RuleError),
}

pub(crate) fn yaml_error(e: serde_yaml::Error) -> EppConfigError {
    EppConfigError::Yaml(e.to_string())
}

/// A Kubernetes quantity (`1Gi`, `500M`, `2000`) as a count.
pub(crate) fn quantity(v: &serde_yaml::Value, field: &str) -> Result<u64, EppConfigError> {
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

pub(crate) fn seconds(v: &serde_yaml::Value) -> Option<f64> {
    match v {
        serde_yaml::Value::Number(n) => n.as_f64(),
        serde_yaml::Value::String(s) => crate::runtime::parse_duration(s)
            .ok()
            .map(|d| d.as_secs_f64()),
        _ => None,
    }
}
