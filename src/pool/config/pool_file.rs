//! The standalone pool file (`--pool-file`): the pool's endpoints and its model rules, validated naming the field.

use std::collections::HashMap;

use inferlane_epp::rules::{ModelRule, Objective, RewriteRule, UnknownModelPolicy};
use inferlane_epp::{EngineType, ModelRules};
use serde::Deserialize;

use super::{EppConfigError, yaml_error};

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
}
