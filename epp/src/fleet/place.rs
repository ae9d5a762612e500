//! Homes per adapter: replicas proportional to demand over the fleet's GPU slots, sticky slot-aware rendezvous homes, hysteresis before scale-down.

use std::collections::{BTreeMap, BTreeSet};

use super::{Catalogue, Homes, Role, Server};
use crate::affinity::{endpoint_key, weight};

/// Placement settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Demand (request-equivalents per second) below which an adapter is idle.
    pub min_demand: f64,
    /// Ticks an adapter's smaller share must last before it loses a home or a role.
    pub scale_down_ticks: u32,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            min_demand: 0.05,
            scale_down_ticks: 3,
        }
    }
}

/// What one adapter gets: a role and a number of homes in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Want {
    role: Role,
    replicas: u32,
}

/// Places adapters tick after tick; keeps what hysteresis needs.
#[derive(Debug, Clone, Default)]
pub struct Placer {
    pub params: Params,
    last: BTreeMap<String, Want>,
    /// Ticks each adapter has wanted less than it holds.
    lower_for: BTreeMap<String, u32>,
}

/// GPU-slot homes for the busiest adapters (`demand` sorted, busiest first): each its share
/// of `total` slots (at least 1, at most `cap`) while slots last; slots left by rounding go
/// to the adapter with the most demand per home. The sum is `min(total, cap * len)`.
fn hot_shares(demand: &[f64], total: u32, cap: u32) -> Vec<u32> {
    let sum: f64 = demand.iter().sum();
    if sum.is_nan() || sum <= 0.0 || cap == 0 {
        return Vec::new();
    }
    let mut r: Vec<u32> = Vec::new();
    let mut used = 0u32;
    for d in demand {
        let want = ((d / sum * total as f64).round() as u32)
            .clamp(1, cap)
            .min(total - used);
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

    /// Starts from what the servers hold (a restarted or new decider): each adapter is taken
    /// to want the homes it has, so nothing moves before its demand has been measured for
    /// `scale_down_ticks`.
    pub fn seed(&mut self, current: &BTreeMap<String, BTreeSet<String>>) {
        let mut count: BTreeMap<&str, u32> = BTreeMap::new();
        for ids in current.values() {
            for id in ids {
                *count.entry(id).or_default() += 1;
            }
        }
        for (id, n) in count {
            let role = if n > 1 { Role::Hot } else { Role::Warm };
            self.last.insert(id.to_string(), Want { role, replicas: n });
        }
    }

    /// This tick's homes. `current` is what each server holds now (last tick's homes and
    /// what it lists): homes stay where they are unless a budget or a smaller share moves
    /// them. Budgets per server: hot homes <= `gpu_slots`; hot and warm homes <=
    /// `cpu_slots` less the pinned adapters; cold homes are registrations and take no slot.
    pub fn place(
        &mut self,
        cat: &Catalogue,
        servers: &[Server],
        demand: &BTreeMap<String, f64>,
        current: &BTreeMap<String, BTreeSet<String>>,
    ) -> Homes {
        let mut homes: Homes = servers
            .iter()
            .map(|s| (s.id.clone(), BTreeMap::new()))
            .collect();
        if servers.is_empty() {
            return homes;
        }
        let wants = self.wants(cat, servers, demand);
        let mut budget = Budget::new(servers, cat.pinned.len() as u32);
        // Hot adapters choose first, then warm, then cold; busiest first within each.
        let mut order: Vec<(&String, Want)> = wants.iter().map(|(id, w)| (id, *w)).collect();
        order.sort_by(|a, b| {
            b.1.role
                .cmp(&a.1.role)
                .then(demand_of(demand, b.0).total_cmp(&demand_of(demand, a.0)))
                .then(a.0.cmp(b.0))
        });
        let mut got: BTreeMap<String, Want> = BTreeMap::new();
        for (id, want) in order {
            let placed = budget.assign(id, want, servers, current);
            for (s, role) in &placed {
                homes
                    .get_mut(&servers[*s].id)
                    .map(|h| h.insert(id.clone(), *role));
            }
            let best = placed.iter().map(|p| p.1).max().unwrap_or(Role::Cold);
            got.insert(
                id.clone(),
                Want {
                    role: best,
                    replicas: placed.len() as u32,
                },
            );
        }
        self.last = got;
        homes
    }

    /// Role and home count per adapter, before budgets: proportional shares of the GPU slots
    /// for the busiest, a cache entry for the next, one registration for the rest; a smaller
    /// want than last tick waits `scale_down_ticks`.
    fn wants(
        &mut self,
        cat: &Catalogue,
        servers: &[Server],
        demand: &BTreeMap<String, f64>,
    ) -> BTreeMap<String, Want> {
        let n = servers.len() as u32;
        let gpu: u32 = servers.iter().map(|s| s.gpu_slots).sum();
        let pinned = cat.pinned.len() as u32;
        let warm_cap: u32 = servers
            .iter()
            .map(|s| s.cpu_slots.max(s.gpu_slots).saturating_sub(pinned))
            .sum();
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
        let shares = hot_shares(
            &ids[..active].iter().map(|a| a.1).collect::<Vec<_>>(),
            gpu,
            n,
        );
        let hot = shares.len();
        let mut warm_left = warm_cap.saturating_sub(shares.iter().sum());
        let mut wants = BTreeMap::new();
        for (i, (id, _, _)) in ids.iter().enumerate() {
            let want = if i < hot {
                Want {
                    role: Role::Hot,
                    replicas: shares[i],
                }
            } else if i < active && warm_left > 0 {
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
            wants.insert(id.to_string(), self.damped(id, want));
        }
        self.lower_for.retain(|id, _| wants.contains_key(id));
        wants
    }

    /// Scale up at once; keep the larger want until a smaller one has lasted long enough.
    fn damped(&mut self, id: &str, want: Want) -> Want {
        let Some(&last) = self.last.get(id) else {
            return want;
        };
        if want >= last {
            self.lower_for.remove(id);
            return want;
        }
        let n = self.lower_for.entry(id.to_string()).or_insert(0);
        *n += 1;
        if *n > self.params.scale_down_ticks {
            self.lower_for.remove(id);
            want
        } else {
            last
        }
    }
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
            warm: servers
                .iter()
                .map(|s| s.cpu_slots.max(s.gpu_slots).saturating_sub(pinned))
                .collect(),
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

    /// `want.replicas` homes for `id`, servers holding it first, then by rendezvous weight;
    /// a home the role's budget cannot take is offered the next role down. Every adapter
    /// gets at least one home (cold takes no slot).
    fn assign(
        &mut self,
        id: &str,
        want: Want,
        servers: &[Server],
        current: &BTreeMap<String, BTreeSet<String>>,
    ) -> Vec<(usize, Role)> {
        let key = endpoint_key(id);
        let mut order: Vec<usize> = (0..servers.len()).collect();
        let holds = |s: usize| current.get(&servers[s].id).is_some_and(|h| h.contains(id));
        order.sort_by_key(|&s| {
            (
                std::cmp::Reverse(holds(s)),
                std::cmp::Reverse(weight(key, servers[s].key)),
            )
        });
        // One home, not hot, already held somewhere: it stays, cached if there is room, else
        // registered only (moving it for a cache entry would cost a load elsewhere).
        if want.role <= Role::Warm
            && want.replicas == 1
            && let Some(&s) = order.first().filter(|&&s| holds(s))
        {
            let role = if self.fits(s, want.role) {
                want.role
            } else {
                Role::Cold
            };
            self.take(s, role);
            return vec![(s, role)];
        }
        let mut placed: Vec<(usize, Role)> = Vec::new();
        let mut role = want.role;
        loop {
            for &s in &order {
                if placed.len() as u32 >= want.replicas {
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
        placed
    }
}

#[cfg(test)]
mod tests;
