//! LoRA fleet placement (pure): adapter demand, homes per server within both adapter tiers, drains before unloads.
//!
//! The EPP decides which servers hold which catalogue adapters; the sidecars load what it
//! decides. Everything here is a function of its inputs (plus the small state kept between
//! ticks for hysteresis and drains), so replicas given the same inputs agree.

pub mod demand;
pub mod drain;
pub mod place;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub use demand::Demand;
pub use drain::Drains;
pub use place::{Params, Placer};

/// Rank assumed for an adapter whose catalogue entry gives none (vLLM's common default).
pub const DEFAULT_RANK: u32 = 8;

/// One adapter the EPP may place (`onDemand` in the ConfigMap).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub id: String,
    pub source: String,
    pub rank: u32,
    /// The name servers serve it under: one per version of its source, so new weights
    /// never replace old ones under a name requests are using.
    pub served: String,
}

/// The catalogue: what may be placed, what is already everywhere, what never is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalogue {
    /// By id.
    pub on_demand: BTreeMap<String, Entry>,
    /// `ensureExist`: loaded on every server by the sidecars; it takes a CPU-cache entry on
    /// each.
    pub pinned: BTreeSet<String>,
    /// `ensureNotExist`: never placed, whatever else says.
    pub never: BTreeSet<String>,
}

impl Catalogue {
    /// The adapters placement decides about (`never` always wins).
    pub fn placeable(&self) -> impl Iterator<Item = &Entry> {
        self.on_demand
            .values()
            .filter(|e| !self.never.contains(&e.id) && !self.pinned.contains(&e.id))
    }
}

/// One model server as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// What the sidecar asks with and homes are named by (pod name, else address).
    pub id: String,
    /// Rendezvous key of `id`.
    pub key: u64,
    /// Adapters one batch can hold (`--max-loras`).
    pub gpu_slots: u32,
    /// Adapters its host-memory cache holds (`--max-cpu-loras`).
    pub cpu_slots: u32,
}

/// What placement intends an adapter to be on a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Registered only: its one home while idle; a request reads it from disk.
    Cold,
    /// Kept in the host-memory cache (one of the server's `cpu_slots`).
    Warm,
    /// Given a GPU slot's worth of the server's traffic (one of its `gpu_slots`).
    Hot,
}

/// Homes per server: adapter id -> role.
pub type Homes = BTreeMap<String, BTreeMap<String, Role>>;
