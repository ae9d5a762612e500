//! The routing policies route-bench compares: Envoy alone, the EPP in its profiles, flow control's fairness policies.

use serde::{Deserialize, Serialize};

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
    /// LoRA baseline (i): every adapter registered on every server (`--lora-modules`), the
    /// default profile's LoRA affinity.
    LoraEverywhere,
    /// LoRA baseline (ii): a static hash partition, each adapter loaded on its 2 rendezvous
    /// servers before the run.
    #[serde(rename = "lora-hash-2")]
    LoraHash2,
    /// LoRA baseline (iii): demand-proportional homes, loaded lazily by the servers on the
    /// first request (vLLM's filesystem LoRA resolver; `--lora-placement-mode lazy`), the
    /// Dynamo approach.
    LoraLazy,
    /// Ours: demand-proportional homes the sidecars load before requests go there.
    LoraPlaced,
    /// Ours with `--lora-cold-adapters resolver`: adapters without a cache entry are read
    /// by the servers' LoRA resolver where a request lands, and unloaded once done.
    LoraPlacedResolver,
    /// As `LoraPlacedResolver` with `--lora-copy-names versioned`: copies are asked for
    /// under the served name the sidecars link into the resolver's folder, so a new home
    /// takes over a copy without a read.
    LoraPlacedVersioned,
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
            Policy::LoraEverywhere => "lora-everywhere",
            Policy::LoraHash2 => "lora-hash-2",
            Policy::LoraLazy => "lora-lazy",
            Policy::LoraPlaced => "lora-placed",
            Policy::LoraPlacedResolver => "lora-placed-resolver",
            Policy::LoraPlacedVersioned => "lora-placed-versioned",
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
            Policy::LoraEverywhere,
            Policy::LoraHash2,
            Policy::LoraLazy,
            Policy::LoraPlaced,
            Policy::LoraPlacedResolver,
            Policy::LoraPlacedVersioned,
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
            | Policy::FlowVtc
            | Policy::LoraEverywhere
            | Policy::LoraHash2
            | Policy::LoraLazy
            | Policy::LoraPlaced
            | Policy::LoraPlacedResolver
            | Policy::LoraPlacedVersioned => None,
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

impl Policy {
    /// How the fleet's servers get their adapters under this policy.
    pub fn adapters(self) -> AdapterSetup {
        match self {
            Policy::LoraHash2 => AdapterSetup::Partition(2),
            Policy::LoraLazy => AdapterSetup::Resolver,
            Policy::LoraPlaced => AdapterSetup::Sidecars,
            Policy::LoraPlacedResolver | Policy::LoraPlacedVersioned => {
                AdapterSetup::SidecarsAndResolver
            }
            _ => AdapterSetup::Everywhere,
        }
    }
}

/// Where the adapters come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterSetup {
    /// `--lora-modules`: all of them on every server.
    Everywhere,
    /// Each on this many rendezvous servers, loaded before the run.
    Partition(usize),
    /// None ahead; a server loads an adapter from the shared folder on its first request.
    Resolver,
    /// The EPP places them and the sidecars load them.
    Sidecars,
    /// As `Sidecars`, and the servers' LoRA resolver reads the adapters placement leaves
    /// without a home.
    SidecarsAndResolver,
}

pub(super) fn all_policies() -> Vec<Policy> {
    vec![
        Policy::RoundRobin,
        Policy::Random,
        Policy::LeastQueue,
        Policy::Default,
    ]
}
