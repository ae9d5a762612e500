//! The placement table as JSON: what the EPP serves at `/lora/v1/placement`, its followers read and each sidecar asks for its own part of.

use std::collections::{BTreeMap, BTreeSet};

use inferlane_epp::fleet::Role;
use serde::{Deserialize, Serialize};

/// Largest set a sidecar's part is read at (its server's homes, a few hundred entries at
/// most): by the sidecar, and by a follower asking the decider for it.
pub const MAX_SET_BYTES: usize = 4 << 20;

/// The whole table (`GET /lora/v1/placement`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Table {
    /// Placement ticks since the decider started; a follower's copy keeps the decider's.
    pub tick: u64,
    /// Server id (pod name, else address) -> its part.
    pub servers: BTreeMap<String, ServerPart>,
    /// Served name -> source, for every version placed or draining (when known).
    pub sources: BTreeMap<String, String>,
    /// Adapter id -> the name its current version is served under (`id@tag`; the id itself
    /// when versions are off).
    #[serde(default)]
    pub served: BTreeMap<String, String>,
    /// Smoothed demand (request-equivalents per second) per adapter the decider has seen.
    pub demand: BTreeMap<String, f64>,
    /// Pair moves (a home added or dropped) since the decider started.
    pub moves: u64,
    /// `--lora-cold-adapters resolver`: servers' LoRA resolvers hold on-demand copies under
    /// plain ids, which the EPP unloads (sidecars leave them alone).
    #[serde(default)]
    pub resolver: bool,
    /// `--lora-copy-names versioned`: on-demand copies are served under the current
    /// version's name, which sidecars then leave loaded where it is no home (the EPP
    /// unloads it once idle).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub versioned_copies: bool,
    /// Versioned copies: catalogue adapters no reporting sidecar links (a hub id, a source
    /// `--allowed-source` refuses), left out of every server's `copy_names`: no resolver is
    /// asked for them.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub uncopyable: BTreeSet<String>,
}

/// One server's part.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerPart {
    /// `ip:port` the gateway sends to.
    pub address: String,
    /// Adapter id -> what placement intends it to be there.
    pub homes: BTreeMap<String, Role>,
    /// Served names of dropped homes and replaced versions, still registered until
    /// nothing runs there for them.
    pub draining: BTreeSet<String>,
    /// `--lora-copy-names versioned`: `None` while its sidecar has not reported the links
    /// in its resolver folder (no copy is asked of that resolver once any sidecar has);
    /// else the adapters whose current served name it has not linked, each with the name
    /// it has linked (an older version's), or empty for none. Empty in a steady pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_names: Option<BTreeMap<String, String>>,
}

/// A follower's demand since its last post (`POST /lora/v1/demand` to the decider): the
/// decider places from every replica's traffic, not only its own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DemandPost {
    pub counts: Vec<DemandCount>,
    /// Sidecars' link reports this follower took since its last post.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinksReport>,
}

/// What a sidecar's server can load on demand (`POST /lora/v1/links`,
/// `--lora-copy-names versioned`): the served names its sidecar links in the resolver
/// folder for the catalogue it has read. The EPP asks a resolver for a copy only under a
/// name its sidecar reported, so a server whose ConfigMap lags gets no request it cannot
/// serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinksReport {
    /// The server's id in the pool (pod name, else `ip:port`).
    pub server: String,
    pub linked: Vec<String>,
}

/// Requests and prompt tokens for one catalogue adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemandCount {
    pub id: String,
    pub requests: u64,
    pub tokens: u64,
}

/// One adapter a sidecar keeps loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    /// The catalogue id.
    pub id: String,
    /// The served name to load and keep (its version); older sidecars read `id`.
    #[serde(default)]
    pub name: String,
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
    /// Copies under a catalogue adapter's plain id are the EPP's on-demand copies: leave
    /// them (`--lora-cold-adapters resolver`).
    #[serde(default)]
    pub resolver: bool,
    /// Copies are served under the current version's name too: leave it loaded where it
    /// is no home (`--lora-copy-names versioned`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub versioned_copies: bool,
    /// The table shows this server's link report (a sidecar re-sends one it does not).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub links_reported: bool,
}

impl Table {
    /// The catalogue id a served name is a version of.
    pub fn id_of<'a>(&'a self, name: &'a str) -> &'a str {
        if self.served.contains_key(name) {
            return name;
        }
        inferlane_sidecar::version::id_of(name).unwrap_or(name)
    }

    /// The name clients know `name` by: the catalogue id of a placed version, else itself.
    pub fn shown<'a>(&'a self, name: &'a str) -> &'a str {
        let id = self.id_of(name);
        if self.served.contains_key(id) {
            id
        } else {
            name
        }
    }

    /// The served names `part`'s server keeps loaded: its homes' current versions and the
    /// names draining there.
    pub fn kept(&self, part: &ServerPart) -> BTreeSet<String> {
        part.homes
            .keys()
            .filter_map(|id| self.served.get(id).cloned())
            .chain(part.draining.iter().cloned())
            .collect()
    }

    /// The id and part of `server` (its id or its address).
    pub fn part(&self, server: &str) -> Option<(&String, &ServerPart)> {
        self.servers
            .get_key_value(server)
            .or_else(|| self.servers.iter().find(|(_, p)| p.address == server))
    }

    /// The part for `server` (its id or its address).
    pub fn server_set(&self, server: &str) -> Option<ServerSet> {
        let (id, part) = self.part(server)?;
        let placed = |name: &str| Placed {
            id: self.id_of(name).to_string(),
            name: name.to_string(),
            source: self.sources.get(name).cloned().unwrap_or_default(),
        };
        Some(ServerSet {
            tick: self.tick,
            server: id.clone(),
            adapters: part
                .homes
                .keys()
                .filter_map(|a| self.served.get(a))
                .map(|n| placed(n))
                .collect(),
            draining: part.draining.iter().map(|n| placed(n)).collect(),
            resolver: self.resolver,
            versioned_copies: self.versioned_copies,
            links_reported: part.copy_names.is_some(),
        })
    }
}
