//! The LoRA fleet on the EPP's side: demand counters the request path bumps, and the placement table it routes by.

pub mod catalogue;
pub mod links;
pub mod on_demand;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};

pub use on_demand::{Flights, Found, Servers};
pub use wire::Table;

/// A home not listed this long after it was placed no longer counts as loading (its
/// sidecar is away or failing: nothing is holding that engine for it).
pub const LOADING_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Requests and prompt tokens per catalogue adapter since the last placement tick.
#[derive(Debug, Default)]
pub struct Counters {
    by_id: HashMap<String, (AtomicU64, AtomicU64)>,
}

/// Where an adapter's requests may go: (address, served name) pairs.
#[derive(Debug, Clone, Default)]
pub struct Route {
    /// Its homes, with its current version's name.
    pub homes: Vec<(String, String)>,
    /// Where it drains (dropped homes, replaced versions), used only while no home lists
    /// the current version yet.
    pub draining: Vec<(String, String)>,
}

/// One place a request for a catalogue adapter may go, and the name to ask it for there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub address: String,
    pub served: String,
    /// An on-demand copy of ours (made, or to be made, by the server's LoRA resolver for
    /// our requests); not for another replica's copy we borrow (its maker unloads it).
    pub on_demand: bool,
}

/// An adapter's current served name and the one before.
#[derive(Debug, Clone)]
struct Version {
    served: String,
    before: Option<String>,
}

/// A table with its routes by adapter, built once per tick.
#[derive(Debug, Default)]
pub struct Routed {
    pub table: Table,
    /// Per adapter id, its version and the one before (carried from table to table).
    versions: HashMap<String, Version>,
    /// Which name each server's resolver is asked for (`--lora-copy-names versioned`).
    copy: links::CopyNames,
    routes: HashMap<String, Route>,
    /// Per server address, the served names placed there and when each first appeared in a
    /// table here: only a model list read after that shows its sidecar has loaded it (an
    /// older list may show a copy that was being unloaded). Keyed by address so the request
    /// path looks homes up without building keys.
    placed: HashMap<String, Vec<(String, Instant)>>,
    /// Per server address, the demand only it may serve: each adapter's demand shared among
    /// its homes (requests per second).
    captive: HashMap<String, f64>,
}

impl Routed {
    /// Routes of `table`; homes also in `before` keep their placement time.
    pub fn new(table: Table, before: Option<&Routed>) -> Self {
        let now = Instant::now();
        let mut routes: HashMap<String, Route> = HashMap::new();
        let mut placed: HashMap<String, Vec<(String, Instant)>> = HashMap::new();
        for part in table.servers.values() {
            for id in part.homes.keys() {
                let Some(served) = table.served.get(id) else {
                    continue;
                };
                let at = before
                    .and_then(|b| b.placed_at(served, &part.address))
                    .unwrap_or(now);
                placed
                    .entry(part.address.clone())
                    .or_default()
                    .push((served.clone(), at));
                routes
                    .entry(id.clone())
                    .or_default()
                    .homes
                    .push((part.address.clone(), served.clone()));
            }
            for name in &part.draining {
                routes
                    .entry(table.id_of(name).to_string())
                    .or_default()
                    .draining
                    .push((part.address.clone(), name.clone()));
            }
        }
        let mut captive: HashMap<String, f64> = HashMap::new();
        for (id, r) in &routes {
            let d = table.demand.get(id).copied().unwrap_or(0.0);
            if d.is_finite() && d > 0.0 && !r.homes.is_empty() {
                let share = d / r.homes.len() as f64;
                for (a, _) in &r.homes {
                    *captive.entry(a.clone()).or_default() += share;
                }
            }
        }
        let versions = table
            .served
            .iter()
            .map(|(id, served)| {
                let was = before.and_then(|b| b.versions.get(id));
                let v = match was {
                    Some(v) if v.served == *served => v.clone(),
                    _ => Version {
                        served: served.clone(),
                        before: was.map(|v| v.served.clone()),
                    },
                };
                (id.clone(), v)
            })
            .collect();
        let copy = links::CopyNames::new(
            table
                .servers
                .values()
                .map(|p| (p.address.as_str(), &p.copy_names)),
            &table.uncopyable,
        );
        Self {
            table,
            versions,
            copy,
            routes,
            placed,
            captive,
        }
    }

    /// The served name `address`'s resolver is asked for to make a copy of `id`: its
    /// current version's where its sidecar linked it, else the previous one's where that
    /// is still linked; `None` where neither is ([`links`]).
    pub fn copy_name<'a>(&'a self, id: &'a str, address: &str) -> Option<&'a str> {
        let current = self.table.served.get(id).map_or(id, String::as_str);
        self.copy.at(id, current, address)
    }

    /// The served name of `id`'s previous version, once its source changed.
    pub fn before(&self, id: &str) -> Option<&str> {
        self.versions.get(id)?.before.as_deref()
    }

    /// Keeps the quieter half (at least two) of `addresses` for an on-demand read, by the
    /// demand that must go to each (its homes' demand, each shared among that adapter's
    /// homes): a read holds its server's engine, and requests for an adapter homed only
    /// there cannot go elsewhere meanwhile.
    pub fn quietest(&self, addresses: &mut Vec<&str>) {
        if addresses.len() <= 2 {
            return;
        }
        let captive = |a: &str| self.captive.get(a).copied().unwrap_or(0.0);
        addresses.sort_by(|a, b| captive(a).total_cmp(&captive(b)));
        addresses.truncate(addresses.len().div_ceil(2).max(2));
    }

    /// Whether `address` lists (in a read made after it was placed there) the served name
    /// `served`.
    fn loaded(&self, address: &str, served: &str, view: &impl Servers) -> bool {
        let since = self.placed_at(served, address);
        view.listed(address, served)
            .is_some_and(|read| since.is_none_or(|at| read >= at))
    }

    /// Whether a home placed on `address` within [`LOADING_MAX`] is not loaded yet: its
    /// sidecar is about to read it, or reading it, on the engine's loop.
    fn loading(&self, address: &str, view: &impl Servers, now: Instant) -> bool {
        self.placed.get(address).is_some_and(|names| {
            names.iter().any(|(served, at)| {
                now.saturating_duration_since(*at) < LOADING_MAX
                    && view.listed(address, served).is_none_or(|read| read < *at)
            })
        })
    }

    /// When `address` became a home of served name `served`, if it is one.
    pub fn placed_at(&self, served: &str, address: &str) -> Option<Instant> {
        self.placed
            .get(address)?
            .iter()
            .find(|(s, _)| s == served)
            .map(|(_, at)| *at)
    }

    pub fn route(&self, id: &str) -> Option<&Route> {
        self.routes.get(id)
    }

    /// Adapter `id` has `name` homed or draining on `address`.
    fn holds(&self, id: &str, name: &str, address: &str) -> bool {
        let here = |(a, s): &(String, String)| a == address && s == name;
        self.route(id)
            .is_some_and(|r| r.homes.iter().any(here) || r.draining.iter().any(here))
    }
}

/// The fleet's shared state: the request path reads the table and bumps counters; the
/// placer (or follower) replaces both.
#[derive(Debug, Default)]
pub struct FleetState {
    pub table: ArcSwapOption<Routed>,
    counters: ArcSwap<Counters>,
    /// `--lora-placement-mode lazy`: requests go to an adapter's homes whether they list it
    /// or not (servers with a LoRA resolver load it on the first request; nothing is
    /// loaded ahead).
    pub lazy: std::sync::atomic::AtomicBool,
    /// `--lora-cold-adapters resolver`: adapters without a home are served by the servers'
    /// LoRA resolver, and the copies it makes for our requests are unloaded once done.
    pub resolver: std::sync::atomic::AtomicBool,
    /// `--lora-copy-names versioned`: on-demand copies are asked for under the adapter's
    /// served name (`id@tag`, which the sidecars link into the resolver's folder), so a
    /// copy is the version a home would load: placement adopts it as a home without a
    /// second read, and a dropped home serves on as a copy until idle.
    pub versioned_copies: std::sync::atomic::AtomicBool,
    /// This replica decides placement (it adopts on-demand copies found with no record).
    pub deciding: std::sync::atomic::AtomicBool,
    /// `--lora-max-cpu-loras` as placement reads it (0: unknown): a server with fewer
    /// adapters cached has room for an on-demand read that pushes nothing out.
    pub max_cpu_loras: std::sync::atomic::AtomicU32,
    /// Our requests in flight per (served name, server address): a drain ends only when
    /// none is left, including those still on their way to the server; and the on-demand
    /// copies.
    pub flights: Arc<Mutex<Flights>>,
    /// Sidecars' reports of what their servers' resolvers can load (`POST /lora/v1/links`).
    pub links: Mutex<links::LinkReports>,
    /// `--lora-placement-election`: this replica holds the placement lease and decides.
    pub elected: Arc<std::sync::atomic::AtomicBool>,
    /// `--lora-placement-election`: the deciding replica's `/lora/v1/placement` URL, read
    /// from its lease (`None` while this replica decides or none is known).
    pub decider: Arc<ArcSwapOption<String>>,
    /// While this replica follows: the table it copies, which it asks for a sidecar's set
    /// (a sidecar that reaches a follower, as a Service spreads them, gets the decider's
    /// current set, not a copy up to a tick old).
    pub upstream: ArcSwapOption<Upstream>,
}

/// The deciding replica's `/lora/v1/placement`, and the token its pages may want.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub url: String,
    pub token_file: Option<std::path::PathBuf>,
}

/// One request in flight for a catalogue adapter on a server; counted down when dropped.
pub struct Flight {
    key: Option<(String, String)>,
    flights: Arc<Mutex<Flights>>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            lock(&self.flights).end(&key, Instant::now());
        }
    }
}

/// The flights, whatever a panicking holder left (counts stay usable).
pub fn lock(m: &Mutex<Flights>) -> std::sync::MutexGuard<'_, Flights> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The link reports, whatever a panicking holder left.
pub fn lock_links(m: &Mutex<links::LinkReports>) -> std::sync::MutexGuard<'_, links::LinkReports> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FleetState {
    /// Counts one request for `id` if it is a catalogue adapter (others are not counted: the
    /// map never grows from what clients send).
    pub fn count(&self, id: &str, prompt_tokens: u64) {
        if let Some((r, t)) = self.counters.load().by_id.get(id) {
            r.fetch_add(1, Ordering::Relaxed);
            t.fetch_add(prompt_tokens, Ordering::Relaxed);
        }
    }

    /// Adds another replica's counts for `id` (catalogue adapters only, like [`Self::count`]).
    pub fn add(&self, id: &str, requests: u64, prompt_tokens: u64) {
        if let Some((r, t)) = self.counters.load().by_id.get(id) {
            r.fetch_add(requests, Ordering::Relaxed);
            t.fetch_add(prompt_tokens, Ordering::Relaxed);
        }
    }

    /// A request for catalogue adapter `id`, sent to `address` as `served` (the map's keys
    /// are bounded by the catalogue's versions in the table and the pool).
    /// `on_demand`: it goes to a copy the server's resolver holds or will make.
    pub fn begin(&self, id: &str, served: &str, address: &str, on_demand: bool) -> Option<Flight> {
        if !self.counters.load().by_id.contains_key(id) {
            return None;
        }
        let key = lock(&self.flights).begin(served, address, on_demand);
        Some(Flight {
            key: Some(key),
            flights: self.flights.clone(),
        })
    }

    /// Our requests for served name `served` in flight on `address`.
    pub fn in_flight(&self, served: &str, address: &str) -> u32 {
        lock(&self.flights)
            .counts
            .get(&(served.to_string(), address.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Sets which adapters are counted (the catalogue changed); counts so far are kept.
    pub fn count_only(&self, ids: impl IntoIterator<Item = String>) {
        let old = self.counters.load();
        let by_id = ids
            .into_iter()
            .map(|id| {
                let (r, t) = old.by_id.get(&id).map_or((0, 0), |(r, t)| {
                    (r.load(Ordering::Relaxed), t.load(Ordering::Relaxed))
                });
                (id, (AtomicU64::new(r), AtomicU64::new(t)))
            })
            .collect();
        self.counters.store(Arc::new(Counters { by_id }));
    }

    /// [`Self::count_only`], unless `ids` are already the ones counted.
    pub fn count_only_if_changed<'a>(&self, ids: impl Iterator<Item = &'a String> + Clone) {
        let counted = self.counters.load();
        let same = ids.clone().count() == counted.by_id.len()
            && ids.clone().all(|id| counted.by_id.contains_key(id));
        if !same {
            self.count_only(ids.cloned());
        }
    }

    /// Takes the counts since the last call: (id, requests, prompt tokens).
    pub fn take_counts(&self) -> Vec<(String, u64, u64)> {
        self.counters
            .load()
            .by_id
            .iter()
            .map(|(id, (r, t))| {
                (
                    id.clone(),
                    r.swap(0, Ordering::Relaxed),
                    t.swap(0, Ordering::Relaxed),
                )
            })
            .filter(|(_, r, t)| *r > 0 || *t > 0)
            .collect()
    }

    /// `name`, listed on `address`, is an on-demand copy: resolver mode, a catalogue
    /// adapter under its plain id or (`--lora-copy-names versioned`) its current or
    /// previous version's served name (what copies are asked for, [`Routed::copy_name`]),
    /// which the table neither homes nor drains there.
    pub fn adoptable(&self, name: &str, address: &str) -> bool {
        if !self.resolver.load(Ordering::Relaxed) {
            return false;
        }
        let table = self.table.load();
        let Some(routed) = table.as_ref() else {
            return false;
        };
        let id = routed.table.id_of(name);
        if !self.counters.load().by_id.contains_key(id) {
            return false;
        }
        let copy_name = name == id
            || (self.versioned_copies.load(Ordering::Relaxed)
                && (routed.table.served.get(id).is_some_and(|s| s == name)
                    || routed.before(id) == Some(name)));
        copy_name && !routed.holds(id, name, address)
    }

    /// The placement table homes `name` (a served name of adapter `id`) on `address`, or
    /// drains it there: the sidecar's, not an on-demand copy.
    pub fn homed(&self, name: &str, address: &str) -> bool {
        let table = self.table.load();
        table.as_ref().is_some_and(|routed| {
            let id = routed.table.id_of(name);
            routed.holds(id, name, address)
        })
    }

    /// `id` is a catalogue adapter placement knows: with homes (perhaps still loading), or
    /// counted (one no server can load yet, as a new adapter no sidecar has linked: the
    /// pool serves it soon, so it is unavailable, not unknown).
    pub fn knows(&self, id: &str) -> bool {
        self.table
            .load()
            .as_ref()
            .is_some_and(|r| r.route(id).is_some())
            || self.counters.load().by_id.contains_key(id)
    }

    /// Where a request for `id` may go, and under which name: its homes whose model list,
    /// read after they became homes, lists its current version, else (a new home still
    /// loading, a new version not loaded yet) where it drains and the server still lists
    /// it, else homes whose older list shows it, else (`--lora-cold-adapters resolver`, an
    /// adapter without a home) its on-demand copies or servers whose resolver may make one;
    /// `None` when placement says nothing about it or none of them lists it (route as
    /// without placement: to any server that lists it).
    pub fn allowed(&self, id: &str, view: &impl Servers) -> Option<Vec<Target>> {
        let table = self.table.load();
        let routed = table.as_ref()?;
        let placed = routed.route(id).and_then(|r| self.placed(routed, r, view));
        if placed.is_some() || !self.resolver.load(Ordering::Relaxed) {
            return placed;
        }
        if !self.counters.load().by_id.contains_key(id) {
            return None;
        }
        if !self.versioned_copies.load(Ordering::Relaxed) {
            return self.copies(routed, id, view);
        }
        // Versioned: each server is asked for a name its sidecar linked, the current
        // version's first (a lagging ConfigMap may link only an older one, or none).
        let mut names: Vec<&str> = Vec::new();
        for a in view.addresses() {
            if let Some(n) = routed.copy_name(id, a)
                && !names.contains(&n)
            {
                names.push(n);
            }
        }
        let current = routed.table.served.get(id).map(String::as_str);
        names.sort_by_key(|n| Some(*n) != current);
        names.into_iter().find_map(|name| {
            let keep = |a: &str| routed.copy_name(id, a) == Some(name);
            self.copies(routed, name, &links::Only { view, keep: &keep })
        })
    }

    /// On-demand copies under `name` on `view`'s servers, or servers to make one on.
    fn copies(&self, routed: &Routed, name: &str, view: &impl Servers) -> Option<Vec<Target>> {
        let (found, targets) = lock(&self.flights).targets(name, view, |a| routed.quietest(a));
        let copy = |a: &str| Target {
            on_demand: found != Found::Borrowed,
            ..target(a, name)
        };
        (!targets.is_empty()).then(|| targets.into_iter().map(copy).collect())
    }

    /// Whether the sidecar of `address` is loading an adapter placed there (never in lazy
    /// placement: there homes load on their first request).
    pub fn loading(&self, address: &str, view: &impl Servers) -> bool {
        let table = self.table.load();
        table.as_ref().is_some_and(|routed| {
            !self.lazy.load(Ordering::Relaxed) && routed.loading(address, view, Instant::now())
        })
    }

    /// [`Self::allowed`] by the table's route.
    fn placed(&self, routed: &Routed, route: &Route, view: &impl Servers) -> Option<Vec<Target>> {
        let pair = |(a, s): &(String, String)| target(a, s);
        if self.lazy.load(Ordering::Relaxed) {
            return (!route.homes.is_empty()).then(|| route.homes.iter().map(pair).collect());
        }
        let now = Instant::now();
        let homes: Vec<&(String, String)> = route
            .homes
            .iter()
            .filter(|(a, s)| routed.loaded(a, s, view))
            .collect();
        if !homes.is_empty() {
            // A server loading another adapter holds its engine for the read (every request
            // there waits it out): while another home is not loading, requests go there.
            let settled: Vec<Target> = homes
                .iter()
                .filter(|(a, _)| homes.len() > 1 && !routed.loading(a, view, now))
                .map(|h| pair(h))
                .collect();
            if !settled.is_empty() {
                return Some(settled);
            }
            return Some(homes.into_iter().map(pair).collect());
        }
        let listing = |(a, s): &&(String, String)| view.listed(a, s).is_some();
        let draining: Vec<Target> = route.draining.iter().filter(listing).map(pair).collect();
        if !draining.is_empty() {
            return Some(draining);
        }
        // Nothing known to be loaded since placed (a follower's or restarted decider's
        // first table): homes that list it at all, as routing without placement would.
        let listed_homes: Vec<Target> = route.homes.iter().filter(listing).map(pair).collect();
        (!listed_homes.is_empty()).then_some(listed_homes)
    }
}

fn target(address: &str, served: &str) -> Target {
    Target {
        address: address.to_string(),
        served: served.to_string(),
        on_demand: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use inferlane_epp::fleet::Role;

    /// A view of the servers from a listing function (no addresses: no on-demand copies).
    struct View<F>(F);

    impl<F: Fn(&str, &str) -> Option<Instant>> Servers for View<F> {
        fn listed(&self, address: &str, name: &str) -> Option<Instant> {
            (self.0)(address, name)
        }
        fn read_at(&self, _: &str) -> Option<Instant> {
            None
        }
        fn addresses(&self) -> impl Iterator<Item = &str> + Clone {
            std::iter::empty()
        }
    }

    #[test]
    fn routes_prefer_loaded_homes_then_draining_ones() {
        let (s1, s2) = ("10.0.0.1:8000", "10.0.0.2:8000");
        let (v1, v2) = ("a@00000001", "a@00000002");
        let mut t = Table::default();
        for (s, addr) in [("s1", s1), ("s2", s2)] {
            t.servers.insert(
                s.into(),
                wire::ServerPart {
                    address: addr.into(),
                    ..Default::default()
                },
            );
        }
        t.served.insert("a".into(), v2.into());
        t.servers
            .get_mut("s2")
            .unwrap()
            .homes
            .insert("a".into(), Role::Hot);
        // s1 was a home of the old version; s2 holds the old version too (a swap in place).
        t.servers.get_mut("s1").unwrap().draining.insert(v1.into());
        t.servers.get_mut("s2").unwrap().draining.insert(v1.into());
        let f = FleetState::default();
        let before = Instant::now();
        f.table.store(Some(Arc::new(Routed::new(t, None))));
        let after = Instant::now();
        let all = |at: Instant| move |_: &str, _: &str| Some(at);
        let old_only = |at: Instant| move |_: &str, n: &str| (n == v1).then_some(at);
        // The new version is not loaded anywhere: the old one serves, under its own name.
        assert_eq!(
            f.allowed("a", &View(old_only(after))),
            Some(vec![target(s1, v1), target(s2, v1)])
        );
        assert_eq!(
            f.allowed("a", &View(all(after))),
            Some(vec![target(s2, v2)])
        );
        // A list read before it became a home says nothing about it (an unload may have
        // raced it): the drained copies serve until a newer read.
        assert_eq!(
            f.allowed("a", &View(all(before))),
            Some(vec![target(s1, v1), target(s2, v1)])
        );
        assert_eq!(f.allowed("a", &View(|_: &str, _: &str| None)), None);
        assert_eq!(f.allowed("b", &View(all(after))), None);
        // A sidecar asks for its part: the version to load, and the one to keep meanwhile.
        let set = f
            .table
            .load()
            .as_ref()
            .unwrap()
            .table
            .server_set("s2")
            .unwrap();
        assert_eq!(set.adapters[0].name, v2);
        assert_eq!(set.adapters[0].id, "a");
        assert_eq!(set.draining[0].name, v1);
        assert_eq!(set.draining[0].id, "a");
        let routed = f.table.load_full().unwrap();
        let kept = routed.table.kept(&routed.table.servers["s2"]);
        assert_eq!(kept, [v1, v2].map(String::from).into());
    }

    #[test]
    fn requests_avoid_a_home_whose_server_is_loading_another_adapter() {
        let (s1, s2) = ("10.0.0.1:8000", "10.0.0.2:8000");
        let mut t = Table::default();
        for (s, addr) in [("s1", s1), ("s2", s2)] {
            let mut part = wire::ServerPart {
                address: addr.into(),
                ..Default::default()
            };
            part.homes.insert("a".into(), Role::Hot);
            t.servers.insert(s.into(), part);
        }
        t.servers
            .get_mut("s2")
            .unwrap()
            .homes
            .insert("b".into(), Role::Warm);
        t.served.insert("a".into(), "a".into());
        t.served.insert("b".into(), "b".into());
        let f = FleetState::default();
        f.table.store(Some(Arc::new(Routed::new(t, None))));
        let now = Instant::now();
        let without_b = move |_: &str, n: &str| (n == "a").then_some(now);
        assert_eq!(
            f.allowed("a", &View(without_b)),
            Some(vec![target(s1, "a")])
        );
        let all = move |_: &str, _: &str| Some(now);
        assert_eq!(
            f.allowed("a", &View(all)),
            Some(vec![target(s1, "a"), target(s2, "a")])
        );
        // Its only home is loading: it still serves there.
        let only_s2 = move |addr: &str, n: &str| (addr == s2 && n == "a").then_some(now);
        assert_eq!(f.allowed("a", &View(only_s2)), Some(vec![target(s2, "a")]));
        // Every request sees s2 reading while b is not listed there (not in lazy placement,
        // where homes load on their first request).
        assert!(f.loading(s2, &View(without_b)) && !f.loading(s1, &View(without_b)));
        assert!(!f.loading(s2, &View(all)));
        f.lazy.store(true, Ordering::Relaxed);
        assert!(!f.loading(s2, &View(without_b)));
    }

    #[test]
    fn on_demand_reads_go_to_the_servers_with_the_least_demand_only_they_may_serve() {
        let addrs = [
            "10.0.0.1:8000",
            "10.0.0.2:8000",
            "10.0.0.3:8000",
            "10.0.0.4:8000",
        ];
        let mut t = Table::default();
        for (i, addr) in addrs.iter().enumerate() {
            t.servers.insert(
                format!("s{i}"),
                wire::ServerPart {
                    address: addr.to_string(),
                    ..Default::default()
                },
            );
        }
        let mut home = |server: &str, id: &str| {
            let part = t.servers.get_mut(server).unwrap();
            part.homes.insert(id.into(), Role::Warm);
        };
        // "a" (4 req/s) has one home, s0; "b" (2 req/s) two, s1 and s2; s3 has none.
        home("s0", "a");
        home("s1", "b");
        home("s2", "b");
        for (id, d) in [("a", 4.0), ("b", 2.0)] {
            t.demand.insert(id.into(), d);
            t.served.insert(id.into(), id.into());
        }
        let routed = Routed::new(t, None);
        let mut all = addrs.to_vec();
        routed.quietest(&mut all);
        assert_eq!(all, vec![addrs[3], addrs[1]]);
        // Two or fewer are left as they are.
        let mut two = vec![addrs[0], addrs[1]];
        routed.quietest(&mut two);
        assert_eq!(two, vec![addrs[0], addrs[1]]);
    }

    /// Servers that list nothing, all with room for a copy.
    struct Open(Vec<&'static str>);

    impl Servers for Open {
        fn listed(&self, _: &str, _: &str) -> Option<Instant> {
            None
        }
        fn read_at(&self, _: &str) -> Option<Instant> {
            None
        }
        fn addresses(&self) -> impl Iterator<Item = &str> + Clone {
            self.0.iter().copied()
        }
    }

    #[test]
    fn versioned_copies_go_by_served_name_and_only_a_name_no_home_holds_is_a_copy() {
        let (s1, s2) = ("10.0.0.1:8000", "10.0.0.2:8000");
        let (old, cur) = ("a@00000001", "a@00000002");
        let table = |home_on_s2: bool| {
            let mut t = Table {
                resolver: true,
                ..Table::default()
            };
            for (s, addr) in [("s1", s1), ("s2", s2)] {
                let mut part = wire::ServerPart {
                    address: addr.into(),
                    ..Default::default()
                };
                if home_on_s2 && s == "s2" {
                    part.homes.insert("a".into(), Role::Warm);
                }
                t.servers.insert(s.into(), part);
            }
            t.served.insert("a".into(), cur.into());
            Arc::new(Routed::new(t, None))
        };
        let f = FleetState::default();
        f.resolver.store(true, Ordering::Relaxed);
        f.count_only(["a".to_string()]);
        f.table.store(Some(table(false)));
        let view = Open(vec![s1, s2]);
        let copy = |a: &str, name: &str| Target {
            on_demand: true,
            ..target(a, name)
        };
        // Plain copies by default; the served name with versioned copies.
        assert_eq!(
            f.allowed("a", &view),
            Some(vec![copy(s1, "a"), copy(s2, "a")])
        );
        assert!(f.adoptable("a", s1) && !f.adoptable(cur, s1));
        f.versioned_copies.store(true, Ordering::Relaxed);
        assert_eq!(
            f.allowed("a", &view),
            Some(vec![copy(s1, cur), copy(s2, cur)])
        );
        // The current version where no home holds it is a copy (a dropped home too); an
        // older version is its sidecar's to unload; a plain copy left from before, ours.
        assert!(f.adoptable(cur, s1) && f.adoptable(cur, s2));
        assert!(!f.adoptable(old, s1));
        assert!(f.adoptable("a", s1));
        assert!(!f.adoptable("made-up@00000002", s1));
        // Placement made s2 a home: its name there is the sidecar's, never unloaded as a copy.
        f.table.store(Some(table(true)));
        assert!(f.homed(cur, s2) && !f.homed(cur, s1));
        assert!(!f.adoptable(cur, s2) && f.adoptable(cur, s1));
    }

    #[test]
    fn copies_are_asked_only_under_a_name_the_servers_sidecar_reported_linked() {
        let (s1, s2, s3) = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000");
        let (old, cur) = ("a@00000001", "a@00000002");
        let served = |name: &str| {
            let mut t = Table {
                resolver: true,
                versioned_copies: true,
                ..Table::default()
            };
            t.served.insert("a".into(), name.into());
            t
        };
        let first = Routed::new(served(old), None);
        assert_eq!(first.before("a"), None);
        // The source changed: s1's ConfigMap lags (only the old version is linked there),
        // s2 links the new one, s3 links neither.
        let mut t = served(cur);
        let exceptions: [(&str, &str, Option<&str>); 3] = [
            ("s1", s1, Some(old)),
            ("s2", s2, None),
            ("s3", s3, Some("")),
        ];
        for (id, addr, ex) in exceptions {
            let part = wire::ServerPart {
                address: addr.into(),
                copy_names: Some(
                    ex.map(|n| ("a".to_string(), n.to_string()))
                        .into_iter()
                        .collect(),
                ),
                ..Default::default()
            };
            t.servers.insert(id.into(), part);
        }
        let changed = Routed::new(t.clone(), Some(&first));
        assert_eq!(changed.before("a"), Some(old));
        assert_eq!(changed.copy_name("a", s1), Some(old));
        assert_eq!(changed.copy_name("a", s2), Some(cur));
        assert_eq!(changed.copy_name("a", s3), None);
        // Remembered from table to table.
        assert_eq!(Routed::new(t, Some(&changed)).before("a"), Some(old));
        let f = FleetState::default();
        f.resolver.store(true, Ordering::Relaxed);
        f.versioned_copies.store(true, Ordering::Relaxed);
        f.count_only(["a".to_string()]);
        f.table.store(Some(Arc::new(changed)));
        let copy = |a: &str, name: &str| Target {
            on_demand: true,
            ..target(a, name)
        };
        // The current version where it is linked; else the old one where that is; never a
        // server that links neither.
        assert_eq!(
            f.allowed("a", &Open(vec![s1, s2, s3])),
            Some(vec![copy(s2, cur)])
        );
        assert_eq!(
            f.allowed("a", &Open(vec![s1, s3])),
            Some(vec![copy(s1, old)])
        );
        assert_eq!(f.allowed("a", &Open(vec![s3])), None);
        assert!(f.knows("a") && !f.knows("zz"), "unavailable, not unknown");
        // The old name is a copy too (ours to unload once idle).
        assert!(f.adoptable(old, s1) && f.adoptable(cur, s2));
    }

    #[test]
    fn only_catalogue_adapters_are_counted() {
        let f = FleetState::default();
        f.count("a", 10);
        f.count_only(["a".to_string()]);
        f.count("a", 10);
        f.count("a", 5);
        f.count("client-made-up", 1);
        assert_eq!(f.take_counts(), vec![("a".to_string(), 2, 15)]);
        assert!(f.take_counts().is_empty());
        let one = f.begin("a", "a@1", "s1", false);
        let two = f.begin("a", "a@1", "s1", false);
        assert!(f.begin("client-made-up", "a@1", "s1", false).is_none());
        assert_eq!(f.in_flight("a@1", "s1"), 2);
        drop(one);
        assert_eq!(f.in_flight("a@1", "s1"), 1);
        drop(two);
        assert_eq!(f.in_flight("a@1", "s1"), 0);
    }
}
