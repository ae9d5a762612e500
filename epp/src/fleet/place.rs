//! Homes per adapter: replicas proportional to demand over the fleet's GPU slots, sticky slot-aware rendezvous homes, hysteresis before scale-down.

use std::collections::{BTreeMap, BTreeSet};

use super::{Catalogue, Homes, Role, Server};
use crate::affinity::{endpoint_key, weight};

/// Placement settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Demand (request-equivalents per second) below which an adapter is idle.
    pub min_demand: f64,
    /// Ticks a new decider keeps every home it found, while it measures demand.
    pub grace_ticks: u32,
    /// Adapters without a cache entry keep one registration (`true`), or none: the servers'
    /// LoRA resolver registers one on a request and the EPP unloads it once its requests
    /// are done (`--lora-cold-adapters resolver`).
    pub cold_homes: bool,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            min_demand: 0.005,
            grace_ticks: 5,
            cold_homes: true,
        }
    }
}

/// What one adapter gets: a role and a number of homes in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Want {
    role: Role,
    replicas: u32,
}

/// Places adapters tick after tick. Placement is a function of demand and what the servers
/// hold; hysteresis comes from the demand itself ([`super::Demand`] rises fast and falls
/// slowly) and from homes staying where they are.
#[derive(Debug, Clone, Default)]
pub struct Placer {
    pub params: Params,
    /// What a new decider found, kept for `grace` more ticks.
    found: Homes,
    grace: u32,
    /// Per server id, adapters it holds as they would be loaded there but not as a home
    /// (an on-demand copy under the current version's name): a new home goes there first,
    /// where it needs no read.
    pub holding: BTreeMap<String, BTreeSet<String>>,
}

/// An adapter cached now keeps its entry against a challenger with less than this many times
/// its demand: Zipf demand measured over a few seconds reorders the quieter adapters every
/// tick, and each swap is a disk read that holds a serving server's engine.
const KEEP_CACHED: f64 = 1.5;

/// Seconds within which a newly cached adapter must save the read its placement costs: an
/// adapter cached now keeps its entry against one whose demand exceeds its own by less than
/// one request per this many seconds (at equal rank). Quiet adapters' demand is a few
/// hundredths of a request per second, and without cold homes every change is a load and
/// an unload.
const PAYBACK_S: f64 = 20.0;

/// How far below the homes it has an adapter's exact share of the GPU slots must fall before
/// it gives one up (rounding alone flips at 0.5: demand noise would add a home one tick and
/// drop it the next, and every added home is a disk read that holds its server's engine).
const STICK: f64 = 0.75;

/// GPU-slot homes for the busiest adapters (`demand` sorted, busiest first; `have`: their
/// hot homes now, 0 past its end): each its share of `total` slots (at least 1, at most
/// `cap`; kept at what it has until its share falls [`STICK`] below it) while slots last;
/// slots left go
/// to the adapter with the most demand per home. The sum is `min(total, cap * len)`.
fn hot_shares(demand: &[f64], have: &[u32], total: u32, cap: u32) -> Vec<u32> {
    let sum: f64 = demand.iter().sum();
    if sum.is_nan() || sum <= 0.0 || cap == 0 {
        return Vec::new();
    }
    let mut r: Vec<u32> = Vec::new();
    let mut used = 0u32;
    for (i, d) in demand.iter().enumerate() {
        let exact = d / sum * total as f64;
        let had = have.get(i).copied().unwrap_or(0);
        // Scale-up at once; scale-down only once the share is STICK below the homes it has.
        let want = if had > 0 && f64::from(had) > exact && f64::from(had) - exact < STICK {
            had
        } else {
            exact.round() as u32
        };
        let want = want.clamp(1, cap).min(total - used);
        if want == 0 {
            break;
        }
        r.push(want);
        used += want;
    }
    while used < total {
        let per_home = |i: usize| demand[i] / r[i] as f64;
        let Some(i) = (0..r.len())
            .filter(|&i| r[i] < cap)
            .max_by(|&a, &b| per_home(a).total_cmp(&per_home(b)).then(b.cmp(&a)))
        else {
            break;
        };
        r[i] += 1;
        used += 1;
    }
    r
}

impl Placer {
    pub fn new(params: Params) -> Self {
        Self {
            params,
            ..Self::default()
        }
    }

    /// Starts from what the servers hold (a restarted or new decider): for `grace_ticks`
    /// each adapter keeps at least the homes it has, so nothing moves before its demand
    /// has been measured.
    pub fn seed(&mut self, current: &Homes) {
        self.found = current.clone();
        self.grace = self.params.grace_ticks;
    }

    /// What a new decider found `id` to have on the servers still here: several homes were
    /// hot; one keeps the role it had (a listed adapter is at least cached: what the
    /// servers list comes in as warm).
    fn found(&self, id: &str, servers: &[Server]) -> Option<Want> {
        let roles = servers
            .iter()
            .filter_map(|s| self.found.get(&s.id).and_then(|h| h.get(id)).copied());
        let n = roles.clone().count() as u32;
        let role = roles.max()?;
        Some(match n {
            1 => Want { role, replicas: 1 },
            _ => Want {
                role: Role::Hot,
                replicas: n,
            },
        })
    }

    /// This tick's homes. `current` is what each server holds now and in which role (last
    /// tick's homes): homes stay where they are, in their role, unless a budget or a
    /// smaller share moves them. Budgets per server: hot homes <=
    /// `gpu_slots`; hot and warm homes <= `cpu_slots` less the pinned adapters; cold homes
    /// are registrations and take no slot.
    pub fn place(
        &mut self,
        cat: &Catalogue,
        servers: &[Server],
        demand: &BTreeMap<String, f64>,
        current: &Homes,
    ) -> Homes {
        let mut homes: Homes = servers
            .iter()
            .map(|s| (s.id.clone(), BTreeMap::new()))
            .collect();
        if servers.is_empty() {
            return homes;
        }
        // Nothing measured yet (a fresh fleet): idle adapters may take new cache entries.
        let fresh = !cat
            .placeable()
            .any(|e| demand_of(demand, &e.id) >= self.params.min_demand);
        let wants = self.wants(cat, servers, demand, current, fresh);
        self.grace = self.grace.saturating_sub(1);
        if self.grace == 0 {
            self.found.clear();
        }
        let mut budget = Budget::new(servers, cat.pinned.len() as u32);
        // Busiest first within a role.
        let mut order: Vec<(&String, Want)> = wants.iter().map(|(id, w)| (id, *w)).collect();
        order.sort_by(|a, b| {
            b.1.role
                .cmp(&a.1.role)
                .then(demand_of(demand, b.0).total_cmp(&demand_of(demand, a.0)))
                .then(a.0.cmp(b.0))
        });
        // Role by role, hot first: every adapter of the role keeps the homes it has, then
        // takes new ones; a busier adapter taking a new home never pushes a quieter one of
        // its role out of a home it has.
        let roles: &[Role] = if self.params.cold_homes {
            &[Role::Hot, Role::Warm, Role::Cold]
        } else {
            &[Role::Hot, Role::Warm]
        };
        for &role in roles {
            let mine: Vec<usize> = (0..order.len())
                .filter(|&i| order[i].1.role == role)
                .collect();
            let mut placed: Vec<Vec<(usize, Role)>> = mine
                .iter()
                .map(|&i| budget.keep(order[i].0, order[i].1, servers, current))
                .collect();
            for (&i, p) in mine.iter().zip(placed.iter_mut()) {
                let held = |s: usize| {
                    self.holding
                        .get(&servers[s].id)
                        .is_some_and(|h| h.contains(order[i].0))
                };
                budget.add(order[i].0, order[i].1, servers, p, fresh, held);
            }
            for (&i, p) in mine.iter().zip(placed) {
                // Without cold homes, a home the budget left no cache entry for goes: the
                // resolver serves the adapter where a request lands.
                let kept = p
                    .into_iter()
                    .filter(|&(_, r)| self.params.cold_homes || r > Role::Cold);
                for (s, r) in kept {
                    if let Some(h) = homes.get_mut(&servers[s].id) {
                        h.insert(order[i].0.clone(), r);
                    }
                }
            }
        }
        homes
    }

    /// Role and home count per adapter: proportional shares of the GPU slots for the
    /// busiest, a cache entry for the next, one registration for the rest (at least what a
    /// new decider found, during its grace).
    fn wants(
        &self,
        cat: &Catalogue,
        servers: &[Server],
        demand: &BTreeMap<String, f64>,
        current: &Homes,
        fresh: bool,
    ) -> BTreeMap<String, Want> {
        let n = servers.len() as u32;
        let pinned = cat.pinned.len() as u32;
        // A hot home takes a cache entry too: a server has no more of them than of either.
        // Hot homes share half of them: a request for a warm adapter needs a free slot to
        // run, and every extra home of a busy adapter is a cache entry a quieter one lacks
        // (its requests then read from disk).
        let gpu: u32 = servers
            .iter()
            .map(|s| s.gpu_slots.min(cache_room(s, pinned)))
            .sum::<u32>()
            .div_ceil(2);
        let warm_cap: u32 = servers.iter().map(|s| cache_room(s, pinned)).sum();
        let mut ids: Vec<(&str, f64, u32)> = cat
            .placeable()
            .map(|e| (e.id.as_str(), demand_of(demand, &e.id), e.rank))
            .collect();
        // Busiest first; between equals the costlier read (higher rank) keeps the cache.
        ids.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(b.0)));
        let active = ids
            .iter()
            .take_while(|a| a.1 >= self.params.min_demand)
            .count();
        // A hot adapter's homes now (those the GPU budget turned into cache entries count).
        let hot_now = |id: &str| {
            let roles = current.values().filter_map(|h| h.get(id));
            if roles.clone().any(|r| *r == Role::Hot) {
                roles.count() as u32
            } else {
                0
            }
        };
        let shares = hot_shares(
            &ids[..active].iter().map(|a| a.1).collect::<Vec<_>>(),
            &ids[..active]
                .iter()
                .map(|a| hot_now(a.0))
                .collect::<Vec<_>>(),
            gpu,
            n,
        );
        let hot = shares.len();
        let mut warm_left = warm_cap.saturating_sub(shares.iter().sum());
        // Adapters cached now on a server still here.
        let cached: BTreeSet<&str> = servers
            .iter()
            .filter_map(|s| current.get(&s.id))
            .flat_map(|h| h.iter())
            .filter(|(_, r)| **r >= Role::Warm)
            .map(|(id, _)| id.as_str())
            .collect();
        let cached_now = |id: &str| cached.contains(id);
        // After the hot ones, the cache goes to the adapters whose disk reads would cost the
        // most engine time: demand times read cost, which grows with rank (each read holds
        // its server's engine for every request there, so a rank-32 adapter's request costs
        // what four of a rank-8 one do), with a head start for those cached now.
        // Taking an entry costs the newcomer's read: it must save that within PAYBACK_S,
        // besides being KEEP_CACHED times as busy.
        let worth = |a: &(&str, f64, u32)| {
            let cost = f64::from(a.2.max(1));
            if cached_now(a.0) {
                a.1 * cost * KEEP_CACHED + cost / PAYBACK_S
            } else {
                a.1 * cost
            }
        };
        ids[hot..active].sort_by(|a, b| {
            worth(b)
                .total_cmp(&worth(a))
                .then(b.2.cmp(&a.2))
                .then(a.0.cmp(b.0))
        });
        // Cache room no busy adapter wants stays with the idle adapters that have it (an
        // entry emptied saves nothing; a new one would cost a read), and on a fresh fleet
        // goes to the costliest reads.
        ids[active..].sort_by(|a, b| {
            cached_now(b.0)
                .cmp(&cached_now(a.0))
                .then(b.2.cmp(&a.2))
                .then(a.0.cmp(b.0))
        });
        let mut wants = BTreeMap::new();
        for (i, (id, _, _)) in ids.iter().enumerate() {
            let want = if i < hot {
                Want {
                    role: Role::Hot,
                    replicas: shares[i],
                }
            } else if warm_left > 0 && (i < active || fresh || cached_now(id)) {
                warm_left -= 1;
                Want {
                    role: Role::Warm,
                    replicas: 1,
                }
            } else {
                Want {
                    role: Role::Cold,
                    replicas: 1,
                }
            };
            let found = self.found(id, servers).unwrap_or(want);
            wants.insert(id.to_string(), want.max(found));
        }
        wants
    }
}

/// Cache entries placement may give out on a server: its cache less the pinned adapters and
/// an eighth left free, so requests for registered-only adapters pass through its LRU
/// without pushing out the adapters placed there.
fn cache_room(s: &Server, pinned: u32) -> u32 {
    let cache = s.cpu_slots.max(s.gpu_slots);
    cache.saturating_sub(pinned).saturating_sub(cache / 8)
}

fn demand_of(demand: &BTreeMap<String, f64>, id: &str) -> f64 {
    demand
        .get(id)
        .copied()
        .filter(|d| d.is_finite())
        .unwrap_or(0.0)
}

/// Slots left per server.
struct Budget {
    hot: Vec<u32>,
    warm: Vec<u32>,
}

impl Budget {
    fn new(servers: &[Server], pinned: u32) -> Self {
        Self {
            hot: servers.iter().map(|s| s.gpu_slots).collect(),
            warm: servers.iter().map(|s| cache_room(s, pinned)).collect(),
        }
    }

    fn fits(&self, s: usize, role: Role) -> bool {
        match role {
            Role::Hot => self.hot[s] > 0 && self.warm[s] > 0,
            Role::Warm => self.warm[s] > 0,
            Role::Cold => true,
        }
    }

    fn take(&mut self, s: usize, role: Role) {
        if role == Role::Hot {
            self.hot[s] -= 1;
        }
        if role >= Role::Warm {
            self.warm[s] -= 1;
        }
    }

    /// The homes `id` keeps where it has them (its best roles first, then rendezvous
    /// weight), as many as it wants, each in its old role or the wanted one if lower.
    /// Staying beats moving: a hot home without a GPU slot left stays cached, a single home
    /// without a cache entry stays registered.
    fn keep(
        &mut self,
        id: &str,
        want: Want,
        servers: &[Server],
        current: &Homes,
    ) -> Vec<(usize, Role)> {
        let key = endpoint_key(id);
        let prev = |s: usize| current.get(&servers[s].id).and_then(|h| h.get(id)).copied();
        let mut holders: Vec<(usize, Role)> = (0..servers.len())
            .filter_map(|s| prev(s).map(|r| (s, r)))
            .collect();
        holders.sort_by_key(|&(s, r)| {
            (
                std::cmp::Reverse(r),
                std::cmp::Reverse(weight(key, servers[s].key)),
            )
        });
        let mut placed = Vec::new();
        for (s, was) in holders {
            if placed.len() as u32 >= want.replicas {
                break;
            }
            let role = was.min(want.role);
            let role = if self.fits(s, role) {
                role
            } else if role == Role::Hot && self.fits(s, Role::Warm) {
                Role::Warm
            } else if want.role <= Role::Warm && want.replicas == 1 && placed.is_empty() {
                Role::Cold
            } else {
                continue;
            };
            self.take(s, role);
            placed.push((s, role));
        }
        placed
    }

    /// Kept homes move up to the wanted role where the budget allows, then new homes up to
    /// `want.replicas`, servers that hold the adapter already (`held`) first, then by
    /// rendezvous weight; a home the role's budget cannot take is offered the next role
    /// down. Every adapter ends with at least one home (one cold home, which takes no slot).
    fn add(
        &mut self,
        id: &str,
        want: Want,
        servers: &[Server],
        placed: &mut Vec<(usize, Role)>,
        fresh: bool,
        held: impl Fn(usize) -> bool,
    ) {
        for p in placed.iter_mut() {
            if p.1 < want.role {
                self.release(p.0, p.1);
                let role = if self.fits(p.0, want.role) {
                    want.role
                } else {
                    p.1
                };
                self.take(p.0, role);
                p.1 = role;
            }
        }
        // On a fresh fleet a registration kept where no cache entry is left gives way to a
        // server with one (the first placement fills the cache). Later it stays: a move is
        // a load and an unload, and measured, letting every busy adapter move so churned
        // the cache (190 moves in lora-zipf against 23, with more reads on the request path).
        if fresh
            && want.role >= Role::Warm
            && (0..servers.len())
                .any(|s| !placed.iter().any(|p| p.0 == s) && self.fits(s, Role::Warm))
        {
            placed.retain(|p| p.1 != Role::Cold);
        }
        let key = endpoint_key(id);
        let mut order: Vec<usize> = (0..servers.len()).collect();
        order.sort_by_key(|&s| std::cmp::Reverse((held(s), weight(key, servers[s].key))));
        let mut role = want.role;
        loop {
            let room = if role == Role::Cold { 1 } else { want.replicas };
            for &s in &order {
                if placed.len() as u32 >= room {
                    break;
                }
                if !placed.iter().any(|p| p.0 == s) && self.fits(s, role) {
                    self.take(s, role);
                    placed.push((s, role));
                }
            }
            let done = placed.len() as u32 >= want.replicas;
            // Hot homes that found no GPU budget may still be cached; nothing goes homeless.
            role = match role {
                _ if done => break,
                Role::Hot => Role::Warm,
                Role::Warm if placed.is_empty() => Role::Cold,
                _ => break,
            };
        }
    }

    fn release(&mut self, s: usize, role: Role) {
        if role == Role::Hot {
            self.hot[s] += 1;
        }
        if role >= Role::Warm {
            self.warm[s] += 1;
        }
    }
}

#[cfg(test)]
mod tests;
