//! The LoRA placer: every tick turns demand and what the servers hold into homes per server (or copies the decider's table), and publishes the table routing reads.

mod follow;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix::prelude::*;
use inferlane_epp::fleet::{Catalogue, Demand, Drains, Homes, Placer, Role, Server};
use inferlane_sidecar::LoraConfig;

use crate::actors::messages::ConfigChanged;
use crate::lora_fleet::Routed;
use crate::lora_fleet::catalogue::{catalogue, catalogue_id};
use crate::lora_fleet::wire::{ServerPart, Table};
use crate::pool::metrics::{AdapterHomeLabels, EppMetrics, LinkStateLabels};
use crate::pool::state::{EndpointHandle, Shared};

/// Largest placement table a follower reads (a thousand servers with a hundred homes each
/// is about 4 MiB).
const MAX_TABLE_BYTES: usize = 32 << 20;

/// Placer settings.
#[derive(Debug, Clone)]
pub struct PlacerOptions {
    pub interval: Duration,
    /// GPU slots of a server whose metrics do not say (`max_lora` in `lora_requests_info`).
    pub default_max_loras: u32,
    /// Host-memory cache entries per server (vLLM's `--max-cpu-loras`; 0: its GPU slots,
    /// vLLM's default).
    pub max_cpu_loras: u32,
    /// Copy the table from this decider instead of deciding (`/lora/v1/placement`).
    pub follow: Option<String>,
    /// Decide only while leader (with leader election).
    pub leader_election: bool,
    /// `--lora-placement-election`: decide while holding the placement lease, else follow
    /// the holder (its URL from the lease).
    pub election: bool,
    /// A bearer token sent with follower fetches (re-read on every fetch: kubelet rotates
    /// projected tokens), for a decider checking tokens.
    pub token_file: Option<std::path::PathBuf>,
    /// A drain lasts at least this many ticks (followers stop routing first) and at most
    /// `max_drain` (a stuck request does not pin an adapter).
    pub min_drain_ticks: u64,
    pub max_drain: Duration,
    pub params: inferlane_epp::fleet::Params,
}

/// The placer actor.
pub struct LoraPlacer {
    shared: Arc<Shared>,
    metrics: EppMetrics,
    opts: PlacerOptions,
    catalogue: Option<Catalogue>,
    placer: Placer,
    demand: Demand,
    drains: Drains,
    tick: u64,
    moves: u64,
    seeded: bool,
    last_tick: Instant,
    /// What the sidecars were told: server id -> homes and draining adapters.
    told: BTreeMap<String, BTreeSet<String>>,
    /// The homes of the last table, with their roles.
    homes: Homes,
    client: reqwest::Client,
    fetching: bool,
    /// Copying another replica's table (a decider taking over starts from it).
    following: bool,
    /// A demand post to the decider is on its way.
    posting: bool,
}

impl LoraPlacer {
    pub fn new(shared: Arc<Shared>, metrics: EppMetrics, opts: PlacerOptions) -> Self {
        // Without cold homes a new cache entry is a load: admit on the second request.
        let mut demand = Demand::default();
        demand.two_hit = !opts.params.cold_homes;
        Self {
            placer: Placer::new(opts.params.clone()),
            shared,
            metrics,
            opts,
            catalogue: None,
            demand,
            drains: Drains::default(),
            tick: 0,
            moves: 0,
            seeded: false,
            last_tick: Instant::now(),
            told: BTreeMap::new(),
            homes: Homes::new(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
            fetching: false,
            following: false,
            posting: false,
        }
    }

    fn deciding(&self) -> bool {
        if self.opts.election {
            return self.shared.fleet.elected.load(Ordering::SeqCst);
        }
        self.opts.follow.is_none()
            && (!self.opts.leader_election || self.shared.is_leader.load(Ordering::SeqCst))
    }

    /// The table to copy, while this replica follows.
    fn follow_url(&self) -> Option<String> {
        if !self.opts.election {
            return self.opts.follow.clone();
        }
        if self.deciding() {
            return None;
        }
        self.shared.fleet.decider.load_full().map(|u| u.to_string())
    }

    /// Becoming the decider after following: the followed table is where everything is
    /// (homes, drains, demand, tick), so the first decision moves nothing.
    fn adopt_followed_table(&mut self) {
        let Some(routed) = self.shared.fleet.table.load_full() else {
            return;
        };
        let t = &routed.table;
        self.tick = t.tick;
        self.moves = t.moves;
        self.homes = t
            .servers
            .iter()
            .map(|(s, p)| (s.clone(), p.homes.clone()))
            .collect();
        self.told = t
            .servers
            .iter()
            .map(|(s, p)| (s.clone(), t.kept(p)))
            .collect();
        self.demand.seed(&t.demand);
        self.seeded = false;
        tracing::info!(
            tick = t.tick,
            "deciding LoRA placement, from the table followed so far"
        );
    }

    /// The servers placement may use: healthy, with their model lists read. `None` until
    /// every healthy endpoint's list has been read (a decider that placed before knowing
    /// what the servers hold would move what it need not).
    fn servers(&self) -> Option<Vec<(Server, Arc<EndpointHandle>)>> {
        let snap = self.shared.snapshot.load();
        let mut out = Vec::new();
        for h in snap.endpoints.iter().filter(|h| h.is_healthy()) {
            h.models.load().as_ref()?;
            let gpu = h
                .scraped
                .load()
                .as_ref()
                .and_then(|s| s.metrics.max_lora)
                .unwrap_or(self.opts.default_max_loras)
                .max(1);
            out.push((
                Server {
                    id: h.identity.clone(),
                    key: h.key,
                    gpu_slots: gpu,
                    cpu_slots: if self.opts.max_cpu_loras == 0 {
                        gpu
                    } else {
                        self.opts.max_cpu_loras
                    },
                },
                h.clone(),
            ));
        }
        (!out.is_empty()).then_some(out)
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let counts = self.shared.fleet.take_counts();
        let dt = self.last_tick.elapsed().as_secs_f64();
        self.last_tick = Instant::now();
        let deciding = self.deciding();
        self.shared
            .fleet
            .deciding
            .store(deciding, Ordering::Relaxed);
        let follow = self.follow_url();
        let upstream = follow.clone().map(|url| crate::lora_fleet::Upstream {
            url,
            token_file: self.opts.token_file.clone(),
        });
        if self.shared.fleet.upstream.load().as_deref() != upstream.as_ref() {
            self.shared.fleet.upstream.store(upstream.map(Arc::new));
        }
        if let Some(url) = follow {
            self.following = true;
            if let Some(routed) = self.shared.fleet.table.load_full() {
                let mut links = crate::lora_fleet::lock_links(&self.shared.fleet.links);
                links.retain(|id| routed.table.servers.contains_key(id));
            }
            self.post_demand(&url, counts, ctx);
            self.follow(url, ctx);
            return;
        }
        if self.following && deciding {
            self.following = false;
            self.adopt_followed_table();
        }
        let Some(cat) = &self.catalogue else { return };
        self.demand.observe(
            counts.iter().map(|(id, r, t)| (id.as_str(), *r, *t)),
            dt,
            |id| cat.on_demand.contains_key(id),
        );
        if !deciding {
            return;
        }
        let Some(servers) = self.servers() else {
            return;
        };
        let span =
            tracing::debug_span!("lora_placement", tick = self.tick, servers = servers.len());
        let _entered = span.enter();
        self.decide(&servers);
    }

    fn decide(&mut self, servers: &[(Server, Arc<EndpointHandle>)]) {
        let Some(cat) = self.catalogue.clone() else {
            return;
        };
        self.tick += 1;
        // What each server holds, and in which role: its homes as last placed (drains are
        // on their way out); a server this decider has told nothing yet (it just started,
        // or the server joined), the catalogue adapters it lists, so a restarted decider
        // finds the homes where they are. Never both: an adapter whose drain ended is still
        // listed until its sidecar unloads it, and taking it for a home then would send
        // requests to a server about to drop it.
        // A server told nothing yet was told, as far as drains go, every version it lists:
        // what this decider does not keep there drains before its sidecar unloads it.
        let mut current = Homes::new();
        let mut told = self.told.clone();
        {
            // Reports are for this decider's tables; a server that left is forgotten.
            let mut links = crate::lora_fleet::lock_links(&self.shared.fleet.links);
            links.take_fresh();
            links.retain(|id| servers.iter().any(|(s, _)| s.id == id));
        }
        let copies = self.shared.fleet.resolver.load(Ordering::Relaxed);
        for (s, h) in servers {
            let held = match (self.told.contains_key(&s.id), self.homes.get(&s.id)) {
                (true, homes) => homes.cloned().unwrap_or_default(),
                (false, _) => {
                    let models = h.models.load_full();
                    let listed: Vec<(String, String)> =
                        models.as_ref().map_or_else(Vec::new, |m| {
                            m.adapters
                                .iter()
                                .filter_map(|a| {
                                    catalogue_id(&cat, a).map(|id| (id.to_string(), a.clone()))
                                })
                                // A resolver's on-demand copy (its plain id) is no home.
                                .filter(|(id, a)| !(copies && id == a))
                                .collect()
                        });
                    told.insert(
                        s.id.clone(),
                        listed.iter().map(|(_, a)| a.clone()).collect(),
                    );
                    listed.into_iter().map(|(id, _)| (id, Role::Warm)).collect()
                }
            };
            current.insert(s.id.clone(), held);
        }
        if !self.seeded {
            self.placer.seed(&current);
            self.seeded = true;
        }
        self.placer.holding = self.holding(&cat, servers);
        let plain: Vec<Server> = servers.iter().map(|(s, _)| s.clone()).collect();
        let homes = self
            .placer
            .place(&cat, &plain, self.demand.rates(), &current);
        let served = |id: &str| cat.on_demand.get(id).map(|e| e.served.clone());
        // Served names per server: a new version is a new name, so the old one drains.
        let sets: BTreeMap<String, BTreeSet<String>> = homes
            .iter()
            .map(|(s, m)| (s.clone(), m.keys().filter_map(|id| served(id)).collect()))
            .collect();
        self.drains.update(self.tick, &told, &sets);
        let by_id: BTreeMap<&str, &Arc<EndpointHandle>> =
            servers.iter().map(|(s, h)| (s.id.as_str(), h)).collect();
        let lists = |id: &str, server: &str| {
            by_id
                .get(server)
                .and_then(|h| h.models.load_full())
                .is_some_and(|m| m.adapters.contains(id))
        };
        let fleet = &self.shared.fleet;
        let idle = |id: &str, server: &str| {
            by_id.get(server).is_none_or(|h| {
                fleet.in_flight(id, &h.address) == 0
                    && h.scraped.load().as_ref().is_none_or(|s| {
                        !s.metrics.running_adapters.iter().any(|a| a == id)
                            && !s.metrics.waiting_adapters.iter().any(|a| a == id)
                    })
            })
        };
        // A home serves once a model list read after it became a home lists the adapter
        // (a home new this tick does not yet).
        let previous = self.shared.fleet.table.load_full();
        let serves = |id: &str, server: &str| {
            let Some(h) = by_id.get(server) else {
                return false;
            };
            let since = previous.as_ref().and_then(|r| r.placed_at(id, &h.address));
            h.models.load().as_ref().is_some_and(|m| {
                m.adapters.contains(id) && since.is_some_and(|s| m.read_at.is_some_and(|r| r >= s))
            })
        };
        // A drain ends once a home serves the adapter's current version (or it has none).
        let ready = |name: &str| {
            let Some(cur) = catalogue_id(&cat, name).and_then(served) else {
                return true;
            };
            let mut homes = sets.iter().filter(|(_, n)| n.contains(&cur)).peekable();
            homes.peek().is_none() || homes.any(|(s, _)| serves(&cur, s))
        };
        let max_ticks = (self.opts.max_drain.as_secs_f64()
            / self.opts.interval.as_secs_f64().max(0.001))
        .ceil() as u64;
        let ended = self.drains.finish(
            self.tick,
            self.opts.min_drain_ticks,
            max_ticks.max(1),
            idle,
            ready,
        );
        self.metrics.lora_drains.inc_by(ended.len() as u64);
        for (id, server) in &ended {
            tracing::info!(adapter = %id, %server, tick = self.tick, "drained; its sidecar unloads it");
        }
        let table = self.table(&cat, servers, &homes, previous.as_deref());
        self.count_moves(&table, &sets);
        self.publish_homes(&cat, &table, &lists);
        self.homes = homes;
        self.told = table
            .servers
            .iter()
            .map(|(s, p)| (s.clone(), table.kept(p)))
            .collect();
        self.shared.fleet.table.store(Some(Arc::new(Routed::new(
            table,
            self.shared.fleet.table.load().as_deref(),
        ))));
    }

    /// With `--lora-copy-names versioned`, the catalogue adapters each server lists under
    /// their current served name (a home, or an on-demand copy a new home may take over).
    fn holding(
        &self,
        cat: &Catalogue,
        servers: &[(Server, Arc<EndpointHandle>)],
    ) -> BTreeMap<String, BTreeSet<String>> {
        if !self.shared.fleet.versioned_copies.load(Ordering::Relaxed) {
            return BTreeMap::new();
        }
        servers
            .iter()
            .map(|(s, h)| {
                let models = h.models.load_full();
                let ids = cat
                    .on_demand
                    .values()
                    .filter(|e| {
                        models
                            .as_ref()
                            .is_some_and(|m| m.adapters.contains(&e.served))
                    })
                    .map(|e| e.id.clone())
                    .collect();
                (s.id.clone(), ids)
            })
            .collect()
    }

    fn table(
        &self,
        cat: &Catalogue,
        servers: &[(Server, Arc<EndpointHandle>)],
        homes: &inferlane_epp::fleet::Homes,
        previous: Option<&Routed>,
    ) -> Table {
        let draining = self.drains.by_server();
        let mut t = Table {
            tick: self.tick,
            demand: self.demand.rates().clone(),
            moves: self.moves,
            resolver: self.shared.fleet.resolver.load(Ordering::Relaxed),
            versioned_copies: self.shared.fleet.versioned_copies.load(Ordering::Relaxed),
            ..Table::default()
        };
        for (s, h) in servers {
            let part = ServerPart {
                address: h.address.clone(),
                homes: homes.get(&s.id).cloned().unwrap_or_default(),
                draining: draining
                    .get(s.id.as_str())
                    .map(|ids| ids.iter().map(|i| i.to_string()).collect())
                    .unwrap_or_default(),
                copy_names: None,
            };
            for id in part.homes.keys() {
                if let Some(e) = cat.on_demand.get(id) {
                    t.served.insert(id.clone(), e.served.clone());
                    t.sources.insert(e.served.clone(), e.source.clone());
                }
            }
            // A replaced version's source is no longer in the catalogue: the last table's.
            for name in &part.draining {
                if let Some(src) = previous.and_then(|p| p.table.sources.get(name)) {
                    t.sources.insert(name.clone(), src.clone());
                }
            }
            t.servers.insert(s.id.clone(), part);
        }
        // Adapters without a home are served by resolvers: followers count and route them
        // by the table's names too.
        if t.resolver {
            for e in cat.placeable() {
                t.served.insert(e.id.clone(), e.served.clone());
            }
        }
        if t.versioned_copies {
            self.copy_names(&mut t, previous);
        }
        t
    }

    /// Each server's names its resolver lacks, by its sidecar's link report.
    fn copy_names(&self, t: &mut Table, previous: Option<&Routed>) {
        let links = crate::lora_fleet::lock_links(&self.shared.fleet.links);
        let by_state = crate::lora_fleet::links::fill(t, previous, &links, Instant::now());
        drop(links);
        for (state, n) in by_state {
            let labels = LinkStateLabels {
                state: state.into(),
            };
            self.metrics.lora_link_reports.get_or_create(&labels).set(n);
        }
    }

    fn count_moves(&mut self, table: &Table, sets: &BTreeMap<String, BTreeSet<String>>) {
        let mut moved = 0u64;
        let none = BTreeSet::new();
        let demand = |served: &str| {
            let id = inferlane_sidecar::version::id_of(served).unwrap_or(served);
            self.demand.of(id)
        };
        for (s, p) in &table.servers {
            let before = self.told.get(s);
            let now: BTreeSet<&String> = sets.get(s).unwrap_or(&none).iter().collect();
            for id in now
                .iter()
                .filter(|id| before.is_none_or(|b| !b.contains(**id)))
            {
                moved += 1;
                tracing::debug!(adapter = %id, server = %s, demand = demand(id), "home added");
            }
            for id in before.into_iter().flatten() {
                if !now.contains(id) && !p.draining.contains(id) {
                    moved += 1;
                    tracing::debug!(adapter = %id, server = %s, demand = demand(id), "home dropped");
                }
            }
        }
        if self.tick > 1 {
            self.moves += moved;
            self.metrics.lora_moves.inc_by(moved);
        }
    }

    fn publish_homes(&self, cat: &Catalogue, table: &Table, lists: &dyn Fn(&str, &str) -> bool) {
        for id in cat.on_demand.keys() {
            let homes: Vec<&String> = table
                .servers
                .iter()
                .filter(|(_, p)| p.homes.contains_key(id))
                .map(|(s, _)| s)
                .collect();
            let name = table.served.get(id).map_or(id.as_str(), String::as_str);
            let serving = homes.iter().filter(|s| lists(name, s)).count();
            for (state, n) in [("desired", homes.len()), ("serving", serving)] {
                self.metrics
                    .lora_homes
                    .get_or_create(&AdapterHomeLabels {
                        adapter_name: id.clone(),
                        state: state.into(),
                    })
                    .set(n as i64);
            }
        }
    }
}

impl Actor for LoraPlacer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.opts.interval, |a, ctx| a.tick(ctx));
    }
}

impl Handler<ConfigChanged<LoraConfig>> for LoraPlacer {
    type Result = ();

    fn handle(&mut self, msg: ConfigChanged<LoraConfig>, _: &mut Context<Self>) {
        let cat = catalogue(&msg.config, !self.shared.fleet.lazy.load(Ordering::Relaxed));
        // Series of adapters that left the catalogue go with them.
        if let Some(old) = &self.catalogue {
            for id in old
                .on_demand
                .keys()
                .filter(|id| !cat.on_demand.contains_key(*id))
            {
                for state in ["desired", "serving"] {
                    self.metrics.lora_homes.remove(&AdapterHomeLabels {
                        adapter_name: id.clone(),
                        state: state.into(),
                    });
                }
            }
        }
        self.shared.fleet.count_only(cat.on_demand.keys().cloned());
        tracing::info!(
            on_demand = cat.on_demand.len(),
            pinned = cat.pinned.len(),
            never = cat.never.len(),
            "LoRA catalogue"
        );
        self.catalogue = Some(cat);
    }
}
