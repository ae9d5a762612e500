//! Workload files for the routing-quality benchmark and the seeded request plans they generate.

use std::path::Path;

use rand::rngs::SmallRng;
use rand_distr::{Distribution, LogNormal};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::policy::{Policy, all_policies};

/// A workload file could not be used.
#[derive(Debug, Error)]
pub enum WorkloadError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{field}: {message}; fix: {fix}")]
    Invalid {
        field: String,
        message: String,
        fix: String,
    },
}

fn invalid(field: &str, message: impl Into<String>, fix: &str) -> WorkloadError {
    WorkloadError::Invalid {
        field: field.into(),
        message: message.into(),
        fix: fix.into(),
    }
}

/// The simulated fleet; every policy runs on a fresh fleet with these settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    #[serde(default = "default_servers")]
    pub servers: usize,
    pub max_num_seqs: usize,
    #[serde(default = "one")]
    pub max_loras: usize,
    /// vLLM's `--max-cpu-loras` (host-memory adapter cache); default: `max_loras`.
    #[serde(default)]
    pub max_cpu_loras: Option<usize>,
    #[serde(default = "default_blocks")]
    pub num_gpu_blocks: u32,
    /// Multiplies every simulated duration (2 = a GPU half as fast), to fit the machine.
    #[serde(default = "unit")]
    pub time_scale: f64,
    /// Further vllm-sim flags, the same for every policy.
    #[serde(default)]
    pub extra_args: Vec<String>,
}

fn default_servers() -> usize {
    8
}
fn one() -> usize {
    1
}
fn default_blocks() -> u32 {
    2048
}
fn unit() -> f64 {
    1.0
}

/// A token-length distribution: log-normal around `median`, clamped to `[min, max]`
/// (`sigma: 0` gives a fixed length).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lengths {
    pub median: f64,
    #[serde(default)]
    pub sigma: f64,
    #[serde(default = "one_u32")]
    pub min: u32,
    #[serde(default = "max_len")]
    pub max: u32,
}

fn one_u32() -> u32 {
    1
}
fn max_len() -> u32 {
    8192
}

impl Lengths {
    fn validate(&self, field: &str) -> Result<(), WorkloadError> {
        if !(self.median >= 1.0 && self.sigma >= 0.0 && self.min >= 1 && self.min <= self.max) {
            return Err(invalid(
                field,
                format!("{self:?} is not a length distribution"),
                "use median >= 1, sigma >= 0 and 1 <= min <= max",
            ));
        }
        Ok(())
    }

    pub(super) fn sample(&self, rng: &mut SmallRng) -> u32 {
        let v = if self.sigma > 0.0 {
            LogNormal::new(self.median.ln(), self.sigma)
                .expect("validated")
                .sample(rng)
        } else {
            self.median
        };
        (v.round() as u32).clamp(self.min, self.max)
    }
}

/// One traffic class of a mixed-criticality workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Class {
    /// Label of the class in the results (default: its criticality).
    #[serde(default)]
    pub name: Option<String>,
    /// Sent as `x-gateway-inference-fairness-id` (the tenant, for flow control's fairness).
    #[serde(default)]
    pub fairness_id: Option<String>,
    /// The model name clients send; the pool maps it to the base model with this criticality.
    pub model: String,
    /// `Critical`, `Standard` or `Sheddable`.
    pub criticality: String,
    /// Relative share of arrivals.
    pub share: f64,
    pub prompt: Lengths,
    pub output: Lengths,
}

fn default_ranks() -> Vec<u32> {
    vec![8]
}

/// From `at_s` on, `share` of the requests go to one adapter that was among the least
/// popular.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlashCrowd {
    pub at_s: f64,
    pub share: f64,
}

/// What the clients send.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "kebab-case")]
pub enum Traffic {
    /// Requests for `adapters` LoRA adapters with Zipf popularity (completions API).
    MultiLora {
        adapters: usize,
        zipf_exponent: f64,
        prompt: Lengths,
        output: Lengths,
        /// LoRA ranks, adapter `i` gets `ranks[i % len]` (its disk read grows with it).
        #[serde(default = "default_ranks")]
        ranks: Vec<u32>,
        /// A cold adapter suddenly takes a share of the traffic.
        #[serde(default)]
        flash_crowd: Option<FlashCrowd>,
        /// Popularity rotates: every this many seconds a new seeded permutation maps
        /// popularity ranks to adapters.
        #[serde(default)]
        rotate_every_s: Option<f64>,
    },
    /// Tenants with long shared system prompts and multi-turn conversations (chat API).
    PrefixHeavy {
        tenants: usize,
        system_prompt_tokens: u32,
        conversations_per_tenant: usize,
        turns: u32,
        user: Lengths,
        /// Length of the assistant turns written into the history.
        assistant: Lengths,
        output: Lengths,
    },
    /// Several classes with their own criticality (completions API).
    Classes { classes: Vec<Class> },
    /// One class with ShareGPT-like prompt/output lengths (chat API).
    Sharegpt { prompt: Lengths, output: Lengths },
}

/// A workload file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub seed: u64,
    pub fleet: Fleet,
    /// Seconds of arrivals per run.
    pub duration_s: f64,
    /// Leading seconds excluded from the statistics (caches fill, queues form).
    #[serde(default)]
    pub warmup_s: f64,
    /// Offered loads, requests per second.
    pub rates: Vec<f64>,
    /// The rate the TTFT distribution plot shows (default: the highest).
    #[serde(default)]
    pub headline_rate: Option<f64>,
    #[serde(default = "all_policies")]
    pub policies: Vec<Policy>,
    /// The servers run vLLM's `--scheduling-policy priority` and every EPP profile forwards
    /// request priorities (`forwardPriority`); round-robin sends none (FCFS among equals).
    #[serde(default)]
    pub priority_scheduling: bool,
    /// EndpointPickerConfig YAML added to every EPP profile's file (deployment facts such as
    /// the servers' batch size; the same for every EPP policy).
    #[serde(default)]
    pub epp_config_extra: String,
    /// `flowControl.priorityBands` (a YAML flow list) for the flow-control policies.
    #[serde(default)]
    pub flow_priority_bands: String,
    /// `overShareUsageLimit` of the flow-control policies' default band.
    #[serde(default)]
    pub flow_over_share_usage_limit: Option<f64>,
    pub traffic: Traffic,
}

/// The base model every simulated server serves.
pub const BASE_MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

impl Workload {
    pub fn load(path: &Path) -> Result<Self, WorkloadError> {
        let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            WorkloadError::Parse { message, .. } => WorkloadError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Self, WorkloadError> {
        let w: Workload = serde_yaml::from_str(text).map_err(|e| WorkloadError::Parse {
            path: "workload".into(),
            message: e.to_string(),
        })?;
        w.validate()?;
        Ok(w)
    }

    fn validate(&self) -> Result<(), WorkloadError> {
        if self.fleet.servers == 0 || self.fleet.max_num_seqs == 0 {
            return Err(invalid(
                "fleet",
                "servers and max_num_seqs must be positive",
                "set fleet.servers and fleet.max_num_seqs to at least 1",
            ));
        }
        if !(self.duration_s > 0.0 && self.warmup_s >= 0.0 && self.warmup_s < self.duration_s) {
            return Err(invalid(
                "duration_s",
                "needs duration_s > warmup_s >= 0",
                "make the run longer than its warm-up",
            ));
        }
        if self.rates.is_empty() || self.rates.iter().any(|r| !(*r > 0.0 && r.is_finite())) {
            return Err(invalid(
                "rates",
                format!("{:?}", self.rates),
                "list one or more positive request rates",
            ));
        }
        if self.policies.is_empty() {
            return Err(invalid(
                "policies",
                "empty",
                "list round-robin, random, least-queue and/or default",
            ));
        }
        match &self.traffic {
            Traffic::MultiLora {
                adapters,
                zipf_exponent,
                prompt,
                output,
                ranks,
                flash_crowd,
                rotate_every_s,
            } => {
                if *adapters == 0 || zipf_exponent.is_nan() || *zipf_exponent < 0.0 {
                    return Err(invalid(
                        "traffic.adapters",
                        "needs adapters >= 1 and zipf_exponent >= 0",
                        "set both",
                    ));
                }
                if ranks.is_empty() || ranks.iter().any(|r| *r == 0 || *r > 512) {
                    return Err(invalid(
                        "traffic.ranks",
                        format!("{ranks:?}"),
                        "list LoRA ranks between 1 and 512",
                    ));
                }
                if let Some(f) = flash_crowd
                    && !(f.at_s >= 0.0 && f.share > 0.0 && f.share < 1.0)
                {
                    return Err(invalid(
                        "traffic.flash_crowd",
                        format!("{f:?}"),
                        "use at_s >= 0 and 0 < share < 1",
                    ));
                }
                if rotate_every_s.is_some_and(|r| r.is_nan() || r <= 0.0) {
                    return Err(invalid(
                        "traffic.rotate_every_s",
                        format!("{rotate_every_s:?}"),
                        "use a positive period, or leave it out",
                    ));
                }
                prompt.validate("traffic.prompt")?;
                output.validate("traffic.output")?;
            }
            Traffic::PrefixHeavy {
                tenants,
                conversations_per_tenant,
                turns,
                user,
                assistant,
                output,
                ..
            } => {
                if *tenants == 0 || *conversations_per_tenant == 0 || *turns == 0 {
                    return Err(invalid(
                        "traffic",
                        "tenants, conversations_per_tenant and turns must be positive",
                        "set each to at least 1",
                    ));
                }
                user.validate("traffic.user")?;
                assistant.validate("traffic.assistant")?;
                output.validate("traffic.output")?;
            }
            Traffic::Classes { classes } => {
                if classes.is_empty() {
                    return Err(invalid(
                        "traffic.classes",
                        "empty",
                        "list one class or more",
                    ));
                }
                for (i, c) in classes.iter().enumerate() {
                    if !["Critical", "Standard", "Sheddable"].contains(&c.criticality.as_str()) {
                        return Err(invalid(
                            &format!("traffic.classes[{i}].criticality"),
                            format!("{:?}", c.criticality),
                            "use Critical, Standard or Sheddable",
                        ));
                    }
                    if c.share.is_nan() || c.share <= 0.0 {
                        return Err(invalid(
                            &format!("traffic.classes[{i}].share"),
                            format!("{}", c.share),
                            "use a positive share",
                        ));
                    }
                    c.prompt.validate(&format!("traffic.classes[{i}].prompt"))?;
                    c.output.validate(&format!("traffic.classes[{i}].output"))?;
                }
            }
            Traffic::Sharegpt { prompt, output } => {
                prompt.validate("traffic.prompt")?;
                output.validate("traffic.output")?;
            }
        }
        Ok(())
    }

    /// Adapter names registered on every server.
    pub fn adapters(&self) -> Vec<String> {
        match &self.traffic {
            Traffic::MultiLora { adapters, .. } => {
                let width = adapters.to_string().len().max(2);
                (1..=*adapters)
                    .map(|i| format!("adapter-{i:0width$}"))
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    /// Each adapter's LoRA rank (same order as [`Workload::adapters`]).
    pub fn adapter_ranks(&self) -> Vec<u32> {
        match &self.traffic {
            Traffic::MultiLora {
                adapters, ranks, ..
            } => (0..*adapters).map(|i| ranks[i % ranks.len()]).collect(),
            _ => Vec::new(),
        }
    }

    /// Extra model names the servers answer to (so the round-robin baseline, which rewrites
    /// nothing, still reaches a served model).
    pub fn class_models(&self) -> Vec<(String, String)> {
        match &self.traffic {
            Traffic::Classes { classes } => {
                // Classes may share a model (tenants of one model): each model once.
                let mut out: Vec<(String, String)> = Vec::new();
                for c in classes {
                    if !out.iter().any(|(m, _)| *m == c.model) {
                        out.push((c.model.clone(), c.criticality.clone()));
                    }
                }
                out
            }
            _ => Vec::new(),
        }
    }

    /// The rate the TTFT distribution plot shows.
    pub fn headline(&self) -> f64 {
        self.headline_rate
            .unwrap_or_else(|| self.rates.iter().copied().fold(0.0, f64::max))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bench::plan::plan;

    pub(crate) const LORA: &str = "name: t\nseed: 7\nfleet: {servers: 2, max_num_seqs: 4, max_loras: 2}\nduration_s: 20\nwarmup_s: 2\nrates: [10]\ntraffic:\n  kind: multi-lora\n  adapters: 20\n  zipf_exponent: 1.1\n  prompt: {median: 100, sigma: 0.5}\n  output: {median: 20}\n";

    #[test]
    fn shipped_workload_files_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/workloads");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "yaml") {
                let w = Workload::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(!plan(&w, w.rates[0]).is_empty(), "{}", path.display());
                assert!(
                    w.rates.contains(&w.headline()),
                    "{}: headline_rate is one of rates",
                    path.display()
                );
                n += 1;
            }
        }
        assert!(n >= 6, "found {n} workload files");
    }

    #[test]
    fn bad_files_name_the_field() {
        let e = Workload::parse(&LORA.replace("rates: [10]", "rates: []")).unwrap_err();
        assert!(e.to_string().starts_with("rates:"), "{e}");
        let e = Workload::parse(&LORA.replace("median: 20", "median: 0")).unwrap_err();
        assert!(e.to_string().starts_with("traffic.output"), "{e}");
        let e = Workload::parse(&LORA.replace("seed: 7", "sed: 7")).unwrap_err();
        assert!(e.to_string().contains("unknown field `sed`"), "{e}");
    }
}
