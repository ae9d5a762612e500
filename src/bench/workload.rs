//! Workload files for the routing-quality benchmark and the seeded request plans they generate.

use std::collections::HashMap;
use std::path::Path;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, LogNormal, Zipf};
use serde::{Deserialize, Serialize};
use serde_json::json;
use thiserror::Error;

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

/// A routing policy under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Envoy alone: a STATIC cluster with ROUND_ROBIN, no EPP.
    RoundRobin,
    /// The EPP with the random picker (filters and shedding still apply).
    Random,
    /// The EPP with only the queue scorer.
    LeastQueue,
    /// The EPP with its default profile.
    Default,
    /// The default profile without rendezvous prefix affinity (each replica's own prefix
    /// index only, as before replicas were made to agree).
    DefaultLocalPrefix,
    /// The default profile with flow control on (global-strict fairness, FCFS): requests are
    /// held in the EPP while every server's batch is full (`runningRequestsThreshold` = the
    /// fleet's `max_num_seqs`).
    FlowControl,
    /// Flow control with round-robin fairness between `x-gateway-inference-fairness-id`s.
    FlowRoundRobin,
    /// Flow control with VTC (token-fair) fairness.
    FlowVtc,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::Random => "random",
            Policy::LeastQueue => "least-queue",
            Policy::Default => "default",
            Policy::DefaultLocalPrefix => "default-local-prefix",
            Policy::FlowControl => "flow-control",
            Policy::FlowRoundRobin => "flow-round-robin",
            Policy::FlowVtc => "flow-vtc",
        }
    }

    /// Every policy, by name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Policy::RoundRobin,
            Policy::Random,
            Policy::LeastQueue,
            Policy::Default,
            Policy::DefaultLocalPrefix,
            Policy::FlowControl,
            Policy::FlowRoundRobin,
            Policy::FlowVtc,
        ]
        .into_iter()
        .find(|p| p.name() == s)
    }

    /// The flow-control part of the policy's file, if it holds requests.
    fn flow_control(
        self,
        max_num_seqs: usize,
        extra: &str,
        bands: &str,
        over_share: Option<f64>,
    ) -> Option<String> {
        let fairness = match self {
            Policy::FlowControl => "global-strict-fairness-policy",
            Policy::FlowRoundRobin => "round-robin-fairness-policy",
            Policy::FlowVtc => "vtc-fairness-policy",
            _ => return None,
        };
        let over = over_share
            .map(|u| format!(", overShareUsageLimit: {u}"))
            .unwrap_or_default();
        let mut cfg = format!(
            "featureGates: [flowControl]\nflowControl:\n  defaultPriorityBand: {{fairnessPolicyRef: {fairness}{over}}}\n"
        );
        if !bands.trim().is_empty() {
            cfg.push_str(&format!("  priorityBands: {}\n", bands.trim()));
        }
        if !extra.contains("saturationDetector") {
            cfg.push_str(&format!(
                "saturationDetector: {{runningRequestsThreshold: {max_num_seqs}}}\n"
            ));
        }
        Some(cfg)
    }

    /// The EndpointPickerConfig the EPP runs with (`None`: no EPP, or built-in defaults).
    pub fn picker_config(
        self,
        forward_priority: bool,
        extra: &str,
        max_num_seqs: usize,
        flow_bands: &str,
        over_share: Option<f64>,
    ) -> Option<String> {
        if self == Policy::RoundRobin {
            return None;
        }
        let mut cfg = self
            .profile()
            .unwrap_or("kind: EndpointPickerConfig\n")
            .to_string();
        if forward_priority {
            cfg.push_str("forwardPriority: true\n");
        }
        let flow = self.flow_control(max_num_seqs, extra, flow_bands, over_share);
        if let Some(f) = &flow {
            cfg.push_str(f);
        }
        cfg.push_str(extra.trim_end());
        cfg.push('\n');
        (self.profile().is_some() || forward_priority || flow.is_some() || !extra.trim().is_empty())
            .then_some(cfg)
    }

    fn profile(self) -> Option<&'static str> {
        match self {
            Policy::RoundRobin
            | Policy::Default
            | Policy::FlowControl
            | Policy::FlowRoundRobin
            | Policy::FlowVtc => None,
            Policy::Random => Some(
                "kind: EndpointPickerConfig\nplugins:\n- type: random-picker\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: random-picker\n",
            ),
            Policy::DefaultLocalPrefix => Some(
                "kind: EndpointPickerConfig\nplugins:\n- type: prefix-cache-scorer\n  parameters: {rendezvousBlocks: 0}\n",
            ),
            Policy::LeastQueue => Some(
                "kind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n- type: max-score-picker\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n    weight: 1\n  - pluginRef: max-score-picker\n",
            ),
        }
    }
}

fn all_policies() -> Vec<Policy> {
    vec![
        Policy::RoundRobin,
        Policy::Random,
        Policy::LeastQueue,
        Policy::Default,
    ]
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

    fn sample(&self, rng: &mut SmallRng) -> u32 {
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
            } => {
                if *adapters == 0 || zipf_exponent.is_nan() || *zipf_exponent < 0.0 {
                    return Err(invalid(
                        "traffic.adapters",
                        "needs adapters >= 1 and zipf_exponent >= 0",
                        "set both",
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
                (1..=*adapters).map(|i| format!("adapter-{i:02}")).collect()
            }
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

/// One request of a plan.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Seconds after the run starts.
    pub at: f64,
    /// `/v1/completions` or `/v1/chat/completions`.
    pub path: &'static str,
    /// Traffic class (criticality for mixed workloads, else `all`).
    pub class: String,
    pub model: String,
    pub body: String,
    pub max_tokens: u32,
    /// `x-gateway-inference-fairness-id` to send, if any.
    pub fairness_id: Option<String>,
    /// The prompt family it belongs to (a prefix-heavy tenant), for per-group analysis of
    /// requests.csv; empty elsewhere.
    pub group: String,
}

/// Text of `tokens` simulated tokens (vllm-sim counts 4 characters as one token).
fn words(rng: &mut SmallRng, tokens: u32) -> String {
    let mut s = String::with_capacity(tokens as usize * 4);
    for _ in 0..tokens {
        for _ in 0..3 {
            s.push(rng.random_range(b'a'..=b'z') as char);
        }
        s.push(' ');
    }
    s
}

fn completion(model: &str, prompt: String, max_tokens: u32) -> String {
    json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string()
}

fn chat(model: &str, messages: serde_json::Value, max_tokens: u32) -> String {
    json!({
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string()
}

/// Generates the requests of one run at `rate` requests per second: Poisson arrivals over
/// `duration_s`, contents drawn from the workload with its seed (the same for every policy).
pub fn plan(w: &Workload, rate: f64) -> Vec<Planned> {
    let mut rng = SmallRng::seed_from_u64(w.seed ^ rate.to_bits());
    let gaps = Exp::new(rate).expect("validated rate");
    let mut times = Vec::new();
    let mut t = gaps.sample(&mut rng);
    // Bounded: never more than twice the expected count.
    let cap = (rate * w.duration_s * 2.0).ceil() as usize + 1;
    while t < w.duration_s && times.len() < cap {
        times.push(t);
        t += gaps.sample(&mut rng);
    }
    match &w.traffic {
        Traffic::MultiLora {
            adapters,
            zipf_exponent,
            prompt,
            output,
        } => {
            let names = w.adapters();
            let zipf = Zipf::new(*adapters as f64, *zipf_exponent).expect("validated");
            times
                .into_iter()
                .map(|at| {
                    let a = &names[(zipf.sample(&mut rng) as usize).clamp(1, *adapters) - 1];
                    let p = prompt.sample(&mut rng);
                    let o = output.sample(&mut rng);
                    Planned {
                        at,
                        path: "/v1/completions",
                        class: "all".into(),
                        model: a.clone(),
                        body: completion(a, words(&mut rng, p), o),
                        max_tokens: o,
                        fairness_id: None,
                        group: String::new(),
                    }
                })
                .collect()
        }
        Traffic::PrefixHeavy {
            tenants,
            system_prompt_tokens,
            conversations_per_tenant,
            turns,
            user,
            assistant,
            output,
        } => {
            let mut prng = SmallRng::seed_from_u64(w.seed);
            let systems: Vec<String> = (0..*tenants)
                .map(|t| {
                    format!(
                        "You are the assistant of tenant {t}. {}",
                        words(&mut prng, *system_prompt_tokens)
                    )
                })
                .collect();
            // (tenant, conversation) -> history so far.
            let mut convs: HashMap<(usize, usize), Vec<serde_json::Value>> = HashMap::new();
            // The first arrivals visit every tenant once (in a seeded order), so a warm-up
            // long enough for `tenants` arrivals leaves no first-seen tenant in the figures.
            let mut first: Vec<usize> = (0..*tenants).collect();
            first.shuffle(&mut rng);
            times
                .into_iter()
                .enumerate()
                .map(|(n, at)| {
                    let t = first
                        .get(n)
                        .copied()
                        .unwrap_or_else(|| rng.random_range(0..*tenants));
                    let c = rng.random_range(0..*conversations_per_tenant);
                    let hist = convs.entry((t, c)).or_default();
                    if hist.len() as u32 > 2 * (turns - 1) {
                        hist.clear();
                    }
                    if !hist.is_empty() {
                        let a = assistant.sample(&mut rng);
                        hist.push(json!({"role": "assistant", "content": words(&mut rng, a)}));
                    }
                    let u = user.sample(&mut rng);
                    hist.push(json!({"role": "user", "content": words(&mut rng, u)}));
                    let mut messages = vec![json!({"role": "system", "content": systems[t]})];
                    messages.extend(hist.iter().cloned());
                    let o = output.sample(&mut rng);
                    Planned {
                        at,
                        path: "/v1/chat/completions",
                        class: "all".into(),
                        model: BASE_MODEL.into(),
                        body: chat(BASE_MODEL, serde_json::Value::Array(messages), o),
                        max_tokens: o,
                        fairness_id: None,
                        group: format!("tenant-{t}"),
                    }
                })
                .collect()
        }
        Traffic::Classes { classes } => {
            let total: f64 = classes.iter().map(|c| c.share).sum();
            times
                .into_iter()
                .map(|at| {
                    let mut x = rng.random::<f64>() * total;
                    let mut pick = &classes[classes.len() - 1];
                    for c in classes {
                        if x < c.share {
                            pick = c;
                            break;
                        }
                        x -= c.share;
                    }
                    let p = pick.prompt.sample(&mut rng);
                    let o = pick.output.sample(&mut rng);
                    Planned {
                        at,
                        path: "/v1/completions",
                        class: pick
                            .name
                            .clone()
                            .unwrap_or_else(|| pick.criticality.clone()),
                        model: pick.model.clone(),
                        body: completion(&pick.model, words(&mut rng, p), o),
                        max_tokens: o,
                        fairness_id: pick.fairness_id.clone(),
                        group: String::new(),
                    }
                })
                .collect()
        }
        Traffic::Sharegpt { prompt, output } => times
            .into_iter()
            .map(|at| {
                let p = prompt.sample(&mut rng);
                let o = output.sample(&mut rng);
                Planned {
                    at,
                    path: "/v1/chat/completions",
                    class: "all".into(),
                    model: BASE_MODEL.into(),
                    body: chat(
                        BASE_MODEL,
                        json!([{"role": "user", "content": words(&mut rng, p)}]),
                        o,
                    ),
                    max_tokens: o,
                    fairness_id: None,
                    group: String::new(),
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LORA: &str = "name: t\nseed: 7\nfleet: {servers: 2, max_num_seqs: 4, max_loras: 2}\nduration_s: 20\nwarmup_s: 2\nrates: [10]\ntraffic:\n  kind: multi-lora\n  adapters: 20\n  zipf_exponent: 1.1\n  prompt: {median: 100, sigma: 0.5}\n  output: {median: 20}\n";

    #[test]
    fn plans_are_seeded_poisson_and_zipf() {
        let w = Workload::parse(LORA).unwrap();
        let a = plan(&w, 10.0);
        let b = plan(&w, 10.0);
        assert_eq!(a.len(), b.len());
        assert!(
            a.iter()
                .zip(&b)
                .all(|(x, y)| x.body == y.body && x.at == y.at)
        );
        // ~200 arrivals expected; Poisson sd ~14.
        assert!((140..260).contains(&a.len()), "{}", a.len());
        assert!(a.windows(2).all(|p| p[0].at <= p[1].at));
        let top = a.iter().filter(|p| p.model == "adapter-01").count();
        let last = a.iter().filter(|p| p.model == "adapter-20").count();
        assert!(top > 4 * last.max(1), "zipf: top {top}, last {last}");
        assert!(a.iter().all(|p| p.max_tokens == 20));
        let v: serde_json::Value = serde_json::from_str(&a[0].body).unwrap();
        assert_eq!(v["stream"], true);
    }

    #[test]
    fn prefix_heavy_conversations_share_their_tenant_prompt() {
        let w = Workload::parse("name: p\nseed: 1\nfleet: {max_num_seqs: 4}\nduration_s: 10\nrates: [20]\ntraffic:\n  kind: prefix-heavy\n  tenants: 3\n  system_prompt_tokens: 50\n  conversations_per_tenant: 2\n  turns: 3\n  user: {median: 10}\n  assistant: {median: 10}\n  output: {median: 5}\n").unwrap();
        let p = plan(&w, 20.0);
        let sys = |b: &str| -> String {
            let v: serde_json::Value = serde_json::from_str(b).unwrap();
            v["messages"][0]["content"].as_str().unwrap().to_string()
        };
        let distinct: std::collections::HashSet<String> = p.iter().map(|x| sys(&x.body)).collect();
        assert_eq!(distinct.len(), 3);
        let firsts: std::collections::HashSet<String> =
            p[..3].iter().map(|x| sys(&x.body)).collect();
        assert_eq!(firsts.len(), 3, "the first arrivals visit every tenant");
        let longest = p
            .iter()
            .map(|x| {
                let v: serde_json::Value = serde_json::from_str(&x.body).unwrap();
                v["messages"].as_array().unwrap().len()
            })
            .max()
            .unwrap();
        assert_eq!(
            longest,
            1 + 2 * 3 - 1,
            "system + 3 user + 2 assistant turns"
        );
    }

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
