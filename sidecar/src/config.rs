//! The `vLLMLoRAConfig` ConfigMap schema: parsing and validation with field, line, column and fix.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where in the file a problem is (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {} column {}", self.line, self.column)
    }
}

/// One validation problem: which field, where, what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub location: Option<Location>,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)?;
        if let Some(l) = self.location {
            write!(f, " (at {l})")?;
        }
        write!(f, "; fix: {}", self.fix)
    }
}

/// Why a config file was rejected. The last good config stays in force.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("invalid YAML: {0}")]
    Syntax(Problem),
    #[error("invalid config: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// Every problem found.
    pub fn problems(&self) -> Vec<&Problem> {
        match self {
            ConfigError::Syntax(p) => vec![p],
            ConfigError::Invalid(ps) => ps.iter().collect(),
        }
    }
}

/// One adapter entry (`{id, source, base-model?}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSpec {
    /// The adapter name clients send as `model`.
    pub id: String,
    /// A local path or hub id, passed to vLLM as `lora_path`.
    pub source: String,
    /// The base model this adapter was trained on (defaults to `defaultBaseModel`).
    #[serde(
        rename = "base-model",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub base_model: Option<String>,
    /// LoRA rank (`r` in its adapter_config.json): what a disk read of it costs, relative to
    /// others; placement keeps costlier adapters cached first. Optional (8 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawList {
    models: Option<Vec<AdapterSpec>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    name: Option<String>,
    host: Option<String>,
    port: Option<u32>,
    default_base_model: Option<String>,
    #[serde(default, deserialize_with = "present")]
    ensure_exist: Option<Option<RawList>>,
    #[serde(default, deserialize_with = "present")]
    ensure_not_exist: Option<Option<RawList>>,
    #[serde(default, deserialize_with = "present")]
    on_demand: Option<Option<RawList>>,
}

/// Tells a key written with no value (`Some(None)`) from a missing key (`None`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(rename = "vLLMLoRAConfig")]
    config: Option<RawConfig>,
}

/// A parsed and validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraConfig {
    pub name: Option<String>,
    pub host: String,
    pub port: u16,
    pub default_base_model: Option<String>,
    /// Adapters that must be loaded (adapters also listed in `ensureNotExist` removed).
    pub ensure_exist: Vec<AdapterSpec>,
    /// Adapters that must be unloaded (adapters also listed in `ensureExist` removed).
    pub ensure_not_exist: Vec<AdapterSpec>,
    /// Ids listed in both lists: neither loaded nor unloaded.
    pub conflicts: Vec<String>,
    /// The catalogue: adapters the EPP may place on servers by demand (`onDemand`). Ids also
    /// in `ensureExist` (already everywhere) or `ensureNotExist` (never, it always wins) are
    /// left out.
    pub on_demand: Vec<AdapterSpec>,
    /// Under placement: which versioned names ([`crate::version`]) of catalogue adapters
    /// stay; any other version the server holds is unloaded. `None` outside placement.
    pub versions: Option<Versions>,
}

/// The versions of catalogue adapters a server keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Versions {
    /// Catalogue ids whose versioned names are managed.
    pub ids: std::collections::BTreeSet<String>,
    /// Served names kept loaded: placed here, or draining (still serving requests).
    pub keep: std::collections::BTreeSet<String>,
    /// `ensureNotExist` ids: every version of them is unloaded.
    pub never: std::collections::BTreeSet<String>,
}

impl LoraConfig {
    /// Base URL of the vLLM server.
    pub fn base_url(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("http://[{}]:{}", self.host, self.port)
        } else {
            format!("http://{}:{}", self.host, self.port)
        }
    }

    /// The base model an adapter expects, if known.
    pub fn base_model_of<'a>(&'a self, spec: &'a AdapterSpec) -> Option<&'a str> {
        spec.base_model
            .as_deref()
            .or(self.default_base_model.as_deref())
    }

    /// Desired sources by id for adapters that must exist.
    pub fn desired(&self) -> BTreeMap<&str, &str> {
        self.ensure_exist
            .iter()
            .map(|a| (a.id.as_str(), a.source.as_str()))
            .collect()
    }
}

/// Default vLLM host and port, as upstream.
pub const DEFAULT_HOST: &str = "localhost";
pub const DEFAULT_PORT: u16 = 8000;

/// Finds the first position of `key: value` (value optionally quoted) after `after_line`.
fn locate(text: &str, key: &str, value: Option<&str>, nth: usize) -> Option<Location> {
    let mut seen = 0;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start().trim_start_matches("- ");
        let Some(rest) = trimmed.strip_prefix(key) else {
            continue;
        };
        let Some(rest) = rest.trim_start().strip_prefix(':') else {
            continue;
        };
        let v = rest.trim().trim_matches(|c| c == '"' || c == '\'');
        if value.is_none_or(|want| want == v) {
            seen += 1;
            if seen == nth {
                let column = line.find(key).map(|c| c + 1).unwrap_or(1);
                return Some(Location {
                    line: i + 1,
                    column,
                });
            }
        }
    }
    None
}

fn syntax_problem(e: &serde_yaml::Error) -> Problem {
    let msg = e.to_string();
    // serde_yaml prefixes the path (`vLLMLoRAConfig.ensureExist.models[1]: ...`).
    let (field, message) = match msg.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') => (path.to_string(), rest.to_string()),
        _ => ("(file)".to_string(), msg.clone()),
    };
    let message = match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message,
    };
    let fix = if message.starts_with("unknown field") {
        "remove the key or fix its spelling (keys are case-sensitive)".to_string()
    } else if message.starts_with("missing field") {
        "add the missing field; every adapter needs `id` and `source`".to_string()
    } else if field.ends_with(".port") {
        "use a port number between 1 and 65535".to_string()
    } else if message.contains("invalid type") {
        "give the field a value of the expected type".to_string()
    } else {
        "fix the YAML syntax (indentation, quotes, `key: value` pairs)".to_string()
    };
    Problem {
        field,
        location: e.location().map(|l| Location {
            line: l.line(),
            column: l.column(),
        }),
        message,
        fix,
    }
}

/// Parses and validates a config file. With `validate` off (upstream's
/// `--config-validation=false`) only structural errors reject the file.
pub fn parse(text: &str, validate: bool) -> Result<LoraConfig, ConfigError> {
    let raw: RawFile =
        serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax(syntax_problem(&e)))?;
    let Some(raw) = raw.config else {
        return Err(ConfigError::Invalid(vec![Problem {
            field: "vLLMLoRAConfig".into(),
            location: locate(text, "vLLMLoRAConfig", None, 1),
            message: "missing or empty".into(),
            fix: "put the adapters under a top-level `vLLMLoRAConfig:` key".into(),
        }]));
    };
    let mut problems = Vec::new();
    let port = match raw.port {
        None => DEFAULT_PORT,
        Some(p) if (1..=65535).contains(&p) => p as u16,
        Some(p) => {
            problems.push(Problem {
                field: "vLLMLoRAConfig.port".into(),
                location: locate(text, "port", None, 1),
                message: format!("{p} is not a valid port"),
                fix: "use a port number between 1 and 65535 (vLLM's default is 8000)".into(),
            });
            DEFAULT_PORT
        }
    };
    let host = match raw.host {
        None => DEFAULT_HOST.to_string(),
        Some(h) if h.trim().is_empty() || h.contains('/') || h.contains(' ') => {
            problems.push(Problem {
                field: "vLLMLoRAConfig.host".into(),
                location: locate(text, "host", None, 1),
                message: format!("{h:?} is not a host name or IP address"),
                fix: "give a bare host (e.g. `localhost`), without scheme, port or path".into(),
            });
            DEFAULT_HOST.to_string()
        }
        Some(h) => h,
    };
    let mut lists = Vec::new();
    for (key, list) in [
        ("ensureExist", raw.ensure_exist),
        ("ensureNotExist", raw.ensure_not_exist),
        ("onDemand", raw.on_demand),
    ] {
        let models = match list {
            None => Vec::new(),
            Some(None) | Some(Some(RawList { models: None })) => {
                problems.push(Problem {
                    field: format!("vLLMLoRAConfig.{key}"),
                    location: locate(text, key, None, 1),
                    message: "is present but has no `models` list".into(),
                    fix: format!("add `models:` with `- id: ..., source: ...` entries, or write `models: []`, or remove `{key}`"),
                });
                Vec::new()
            }
            Some(Some(RawList { models: Some(m) })) => m,
        };
        if validate {
            let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
            for (i, m) in models.iter().enumerate() {
                let field = format!("vLLMLoRAConfig.{key}.models[{i}]");
                if m.id.trim().is_empty() {
                    problems.push(Problem {
                        field: format!("{field}.id"),
                        location: locate(text, "id", Some(""), 1),
                        message: "is empty".into(),
                        fix: "give the adapter name clients send as `model`".into(),
                    });
                }
                if m.source.trim().is_empty() {
                    problems.push(Problem {
                        field: format!("{field}.source"),
                        location: locate(text, "source", Some(""), 1),
                        message: "is empty".into(),
                        fix: "give the adapter's local path or hub id".into(),
                    });
                }
                if m.rank == Some(0) {
                    problems.push(Problem {
                        field: format!("{field}.rank"),
                        location: locate(text, "rank", Some("0"), 1),
                        message: "is 0".into(),
                        fix: "give the adapter's LoRA rank (`r` in its adapter_config.json), or leave `rank` out".into(),
                    });
                }
                let n = seen.entry(m.id.as_str()).or_insert(0);
                *n += 1;
                if *n == 2 {
                    problems.push(Problem {
                        field: format!("{field}.id"),
                        location: locate(text, "id", Some(&m.id), 2),
                        message: format!("duplicate id {:?} in {key}", m.id),
                        fix: "list each adapter once; to change its source edit the first entry"
                            .into(),
                    });
                }
            }
        }
        lists.push(models);
    }
    if !problems.is_empty() {
        return Err(ConfigError::Invalid(problems));
    }
    let on_demand = lists.pop().unwrap_or_default();
    let ensure_not_exist = lists.pop().unwrap_or_default();
    let ensure_exist = lists.pop().unwrap_or_default();
    let conflicts: Vec<String> = ensure_exist
        .iter()
        .filter(|a| ensure_not_exist.iter().any(|b| b.id == a.id))
        .map(|a| a.id.clone())
        .collect();
    let keep = |v: Vec<AdapterSpec>| -> Vec<AdapterSpec> {
        let mut out: Vec<AdapterSpec> = Vec::with_capacity(v.len());
        for a in v {
            // Without validation, a duplicate keeps its first entry.
            if !conflicts.contains(&a.id) && !out.iter().any(|b| b.id == a.id) {
                out.push(a);
            }
        }
        out
    };
    Ok(LoraConfig {
        name: raw.name,
        host,
        port,
        default_base_model: raw.default_base_model,
        on_demand: on_demand_kept(on_demand, &ensure_exist, &ensure_not_exist),
        ensure_not_exist: keep(ensure_not_exist),
        ensure_exist: keep(ensure_exist),
        conflicts,
        versions: None,
    })
}

/// The catalogue less what the fixed lists decide: pinned adapters are already everywhere,
/// and `ensureNotExist` always wins; a duplicate keeps its first entry.
fn on_demand_kept(
    list: Vec<AdapterSpec>,
    pinned: &[AdapterSpec],
    never: &[AdapterSpec],
) -> Vec<AdapterSpec> {
    let mut out: Vec<AdapterSpec> = Vec::with_capacity(list.len());
    for a in list {
        let decided = pinned.iter().chain(never).any(|b| b.id == a.id);
        if !decided && !out.iter().any(|b| b.id == a.id) {
            out.push(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"vLLMLoRAConfig:
  name: vllm-llama3.1-8b-instruct
  port: 8000
  defaultBaseModel: meta-llama/Llama-3.1-8B-Instruct
  ensureExist:
    models:
    - id: food-review-1
      source: Kawon/llama3.1-food-finetune_v14_r8
  ensureNotExist:
    models:
    - id: old
      source: some/old
"#;

    #[test]
    fn parses_the_seed_config() {
        let c = parse(SEED, true).unwrap();
        assert_eq!(c.host, "localhost");
        assert_eq!(c.port, 8000);
        assert_eq!(c.ensure_exist.len(), 1);
        assert_eq!(c.ensure_exist[0].id, "food-review-1");
        assert_eq!(
            c.base_model_of(&c.ensure_exist[0]),
            Some("meta-llama/Llama-3.1-8B-Instruct")
        );
        assert_eq!(c.ensure_not_exist[0].id, "old");
        assert_eq!(c.base_url(), "http://localhost:8000");
    }

    fn single_problem(text: &str) -> Problem {
        let e = parse(text, true).unwrap_err();
        let ps = e.problems();
        assert_eq!(ps.len(), 1, "{e}");
        ps[0].clone()
    }

    #[test]
    fn unknown_key_names_field_line_and_fix() {
        let p = single_problem(
            "vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - id: a\n      sorce: b\n",
        );
        assert_eq!(p.field, "vLLMLoRAConfig.ensureExist.models[0]");
        assert!(p.message.contains("unknown field `sorce`"), "{p}");
        assert_eq!(p.location.map(|l| l.line), Some(5));
        assert!(p.fix.contains("spelling"));
    }

    #[test]
    fn missing_source() {
        let p = single_problem("vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - id: a\n");
        assert!(p.message.contains("missing field `source`"), "{p}");
        assert_eq!(p.location.map(|l| l.line), Some(4));
    }

    #[test]
    fn duplicate_id_points_at_second_entry() {
        let p = single_problem(
            "vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - id: a\n      source: x\n    - id: a\n      source: y\n",
        );
        assert_eq!(p.field, "vLLMLoRAConfig.ensureExist.models[1].id");
        assert_eq!(p.location, Some(Location { line: 6, column: 7 }));
        assert!(p.message.contains("duplicate"));
    }

    #[test]
    fn empty_list_and_bad_port() {
        let p = single_problem("vLLMLoRAConfig:\n  ensureExist:\n");
        assert_eq!(p.field, "vLLMLoRAConfig.ensureExist");
        assert_eq!(p.location.map(|l| l.line), Some(2));
        let p = single_problem("vLLMLoRAConfig:\n  port: 0\n");
        assert_eq!(p.field, "vLLMLoRAConfig.port");
        assert_eq!(p.location.map(|l| l.line), Some(2));
        let p = single_problem("vLLMLoRAConfig:\n  port: 99999\n");
        assert!(p.fix.contains("65535"));
        assert!(parse("vLLMLoRAConfig:\n  ensureExist:\n    models: []\n", true).is_ok());
    }

    #[test]
    fn syntax_error_and_missing_top_key() {
        assert!(matches!(
            parse("vLLMLoRAConfig: [", true),
            Err(ConfigError::Syntax(_))
        ));
        let p = single_problem("vLLMLoRAConfig:\n");
        assert_eq!(p.field, "vLLMLoRAConfig");
        assert!(matches!(
            parse("other: 1\n", true),
            Err(ConfigError::Syntax(_))
        ));
    }

    #[test]
    fn adapter_in_both_lists_is_skipped_and_reported() {
        let c = parse(
            "vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - id: a\n      source: x\n    - id: b\n      source: y\n  ensureNotExist:\n    models:\n    - id: a\n      source: x\n",
            true,
        )
        .unwrap();
        assert_eq!(c.conflicts, ["a"]);
        assert_eq!(
            c.ensure_exist
                .iter()
                .map(|a| a.id.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
        assert!(c.ensure_not_exist.is_empty());
    }

    #[test]
    fn the_catalogue_is_a_compatible_extension() {
        let text = format!(
            "{SEED}  onDemand:\n    models:\n    - id: fr\n      source: /a/fr\n      rank: 16\n    - id: old\n      source: x\n    - id: food-review-1\n      source: y\n"
        );
        let c = parse(&text, true).unwrap();
        // ensureNotExist always wins; a pinned adapter is already everywhere.
        assert_eq!(c.on_demand.len(), 1);
        assert_eq!(c.on_demand[0].id, "fr");
        assert_eq!(c.on_demand[0].rank, Some(16));
        assert!(parse(SEED, true).unwrap().on_demand.is_empty());
        let p = single_problem(
            "vLLMLoRAConfig:\n  onDemand:\n    models:\n    - id: a\n      source: x\n      rank: 0\n",
        );
        assert_eq!(p.field, "vLLMLoRAConfig.onDemand.models[0].rank");
        assert_eq!(p.location.map(|l| l.line), Some(6));
    }

    #[test]
    fn validation_off_accepts_duplicates_keeping_the_first() {
        let text = "vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - id: a\n      source: x\n    - id: a\n      source: y\n";
        assert!(parse(text, true).is_err());
        let c = parse(text, false).unwrap();
        assert_eq!(c.ensure_exist.len(), 1);
        assert_eq!(c.ensure_exist[0].source, "x");
    }
}
