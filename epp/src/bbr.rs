//! Body-based routing: which base model (and so which InferencePool) serves a model name.

use std::collections::BTreeMap;

use serde::Deserialize;
use thiserror::Error;

/// One base model and the adapters served on top of it (a `bbr-managed` ConfigMap's data).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BaseModelEntry {
    pub base_model: String,
    #[serde(default)]
    pub adapters: Vec<String>,
    /// Where the entry came from (ConfigMap name), for error messages.
    #[serde(skip)]
    pub source: String,
}

/// Mapping problems; never resolved silently.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BbrError {
    #[error(
        "model {model:?} is claimed by base model {first:?} ({first_source}) and by {second:?} ({second_source}); names must be unique across pools"
    )]
    Conflict {
        model: String,
        first: String,
        first_source: String,
        second: String,
        second_source: String,
    },
    #[error("{source_name}: baseModel is empty")]
    EmptyBase { source_name: String },
    #[error("invalid mapping file: {0}")]
    Yaml(String),
}

/// Model name -> base model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BaseModelMap {
    map: BTreeMap<String, (String, String)>,
}

impl BaseModelMap {
    /// Builds the map; a base model maps to itself.
    pub fn new(entries: &[BaseModelEntry]) -> Result<Self, BbrError> {
        let mut map: BTreeMap<String, (String, String)> = BTreeMap::new();
        for e in entries {
            if e.base_model.trim().is_empty() {
                return Err(BbrError::EmptyBase {
                    source_name: e.source.clone(),
                });
            }
            for name in std::iter::once(&e.base_model).chain(e.adapters.iter()) {
                match map.get(name) {
                    Some((base, _)) if *base == e.base_model => {}
                    Some((base, src)) => {
                        return Err(BbrError::Conflict {
                            model: name.clone(),
                            first: base.clone(),
                            first_source: src.clone(),
                            second: e.base_model.clone(),
                            second_source: e.source.clone(),
                        });
                    }
                    None => {
                        map.insert(name.clone(), (e.base_model.clone(), e.source.clone()));
                    }
                }
            }
        }
        Ok(Self { map })
    }

    /// The base model serving `model`, if known.
    pub fn base_of(&self, model: &str) -> Option<&str> {
        self.map.get(model).map(|(b, _)| b.as_str())
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigMapDoc {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    metadata: Option<ConfigMapMeta>,
    #[serde(default)]
    data: Option<BTreeMap<String, String>>,
    // Standalone form.
    #[serde(default)]
    base_models: Option<Vec<BaseModelEntry>>,
}

#[derive(Debug, Deserialize)]
struct ConfigMapMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// The label that marks a ConfigMap as a BBR mapping.
pub const BBR_LABEL: &str = "inference.networking.k8s.io/bbr-managed";

/// Parses either a standalone file (`baseModels: [{baseModel, adapters}]`) or a multi-document
/// stream of ConfigMaps labelled `bbr-managed: "true"` (`data.baseModel`, `data.adapters` as a
/// YAML list); unlabelled ConfigMaps are ignored, as in Kubernetes mode.
pub fn parse_mapping(text: &str) -> Result<Vec<BaseModelEntry>, BbrError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let d = ConfigMapDoc::deserialize(doc).map_err(|e| BbrError::Yaml(e.to_string()))?;
        if let Some(list) = d.base_models {
            out.extend(list.into_iter().enumerate().map(|(j, mut e)| {
                e.source = format!("baseModels[{j}]");
                e
            }));
            continue;
        }
        if d.kind.as_deref() != Some("ConfigMap") {
            continue;
        }
        let meta = d.metadata.unwrap_or(ConfigMapMeta {
            name: None,
            labels: BTreeMap::new(),
        });
        if meta.labels.get(BBR_LABEL).map(String::as_str) != Some("true") {
            continue;
        }
        let name = meta.name.unwrap_or_else(|| format!("document {i}"));
        let data = d.data.unwrap_or_default();
        let base = data.get("baseModel").cloned().unwrap_or_default();
        let adapters: Vec<String> = match data.get("adapters") {
            Some(a) => serde_yaml::from_str::<Option<Vec<String>>>(a)
                .map_err(|e| BbrError::Yaml(format!("ConfigMap {name}: data.adapters: {e}")))?
                .unwrap_or_default(),
            None => Vec::new(),
        };
        out.push(BaseModelEntry {
            base_model: base,
            adapters,
            source: format!("ConfigMap {name}"),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CMS: &str = r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: llama
  labels: {inference.networking.k8s.io/bbr-managed: "true"}
data:
  baseModel: meta-llama/Llama-3.1-8B-Instruct
  adapters: |
    - food-review-1
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: deepseek
  labels: {inference.networking.k8s.io/bbr-managed: "true"}
data:
  baseModel: deepseek/vllm-deepseek-r1
  adapters: |
    - ski-resorts
    - movie-critique
---
apiVersion: v1
kind: ConfigMap
metadata: {name: unrelated}
data: {baseModel: x}
"#;

    #[test]
    fn configmaps_map_adapters_and_bases() {
        let m = BaseModelMap::new(&parse_mapping(CMS).unwrap()).unwrap();
        assert_eq!(
            m.base_of("food-review-1"),
            Some("meta-llama/Llama-3.1-8B-Instruct")
        );
        assert_eq!(
            m.base_of("meta-llama/Llama-3.1-8B-Instruct"),
            Some("meta-llama/Llama-3.1-8B-Instruct")
        );
        assert_eq!(
            m.base_of("movie-critique"),
            Some("deepseek/vllm-deepseek-r1")
        );
        assert_eq!(m.base_of("x"), None, "unlabelled ConfigMaps are ignored");
        assert_eq!(m.len(), 5);
    }

    #[test]
    fn a_name_claimed_twice_is_an_error_naming_both() {
        let text = "baseModels:\n- baseModel: a\n  adapters: [shared]\n- baseModel: b\n  adapters: [shared]\n";
        let e = BaseModelMap::new(&parse_mapping(text).unwrap()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("\"shared\"") && msg.contains("\"a\"") && msg.contains("\"b\""),
            "{msg}"
        );
    }
}
