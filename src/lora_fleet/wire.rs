//! The placement table as JSON: what the EPP serves at `/lora/v1/placement`, its followers read and each sidecar asks for its own part of.

use std::collections::{BTreeMap, BTreeSet};

use inferlane_epp::fleet::Role;
use serde::{Deserialize, Serialize};

/// The whole table (`GET /lora/v1/placement`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Table {
    /// Placement ticks since the decider started; a follower's copy keeps the decider's.
    pub tick: u64,
    /// Server id (pod name, else address) -> its part.
    pub servers: BTreeMap<String, ServerPart>,
    /// Adapter id -> source, for every adapter placed or draining.
    pub sources: BTreeMap<String, String>,
    /// Smoothed demand (request-equivalents per second) per adapter the decider has seen.
    pub demand: BTreeMap<String, f64>,
    /// Pair moves (a home added or dropped) since the decider started.
    pub moves: u64,
}

/// One server's part.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerPart {
    /// `ip:port` the gateway sends to.
    pub address: String,
    /// Adapter id -> what placement intends it to be there.
    pub homes: BTreeMap<String, Role>,
    /// Dropped homes still registered until nothing runs there for them.
    pub draining: BTreeSet<String>,
}

/// One adapter a sidecar keeps loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    pub id: String,
    pub source: String,
}

/// What one sidecar is told (`GET /lora/v1/placement?server=ID`): keep `adapters` and
/// `draining` loaded; catalogue adapters in neither are to be unloaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerSet {
    pub tick: u64,
    pub server: String,
    pub adapters: Vec<Placed>,
    pub draining: Vec<Placed>,
}

impl Table {
    /// The part for `server` (its id or its address).
    pub fn server_set(&self, server: &str) -> Option<ServerSet> {
        let (id, part) = self
            .servers
            .get_key_value(server)
            .or_else(|| self.servers.iter().find(|(_, p)| p.address == server))?;
        let placed = |ids: &mut dyn Iterator<Item = &String>| -> Vec<Placed> {
            ids.filter_map(|a| {
                self.sources.get(a).map(|s| Placed {
                    id: a.clone(),
                    source: s.clone(),
                })
            })
            .collect()
        };
        Some(ServerSet {
            tick: self.tick,
            server: id.clone(),
            adapters: placed(&mut part.homes.keys()),
            draining: placed(&mut part.draining.iter()),
        })
    }
}
