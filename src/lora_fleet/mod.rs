//! The LoRA fleet on the EPP's side: demand counters the request path bumps, and the placement table it routes by.

pub mod wire;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::{ArcSwap, ArcSwapOption};

pub use wire::Table;

/// Requests and prompt tokens per catalogue adapter since the last placement tick.
#[derive(Debug, Default)]
pub struct Counters {
    by_id: HashMap<String, (AtomicU64, AtomicU64)>,
}

/// Where an adapter's requests may go.
#[derive(Debug, Clone, Default)]
pub struct Route {
    /// Addresses of its homes.
    pub homes: Vec<String>,
    /// Addresses where it drains (used only while no home lists it yet).
    pub draining: Vec<String>,
}

/// A table with its routes by adapter, built once per tick.
#[derive(Debug, Default)]
pub struct Routed {
    pub table: Table,
    routes: HashMap<String, Route>,
}

impl Routed {
    pub fn new(table: Table) -> Self {
        let mut routes: HashMap<String, Route> = HashMap::new();
        for part in table.servers.values() {
            for id in part.homes.keys() {
                routes
                    .entry(id.clone())
                    .or_default()
                    .homes
                    .push(part.address.clone());
            }
            for id in &part.draining {
                routes
                    .entry(id.clone())
                    .or_default()
                    .draining
                    .push(part.address.clone());
            }
        }
        Self { table, routes }
    }

    pub fn route(&self, id: &str) -> Option<&Route> {
        self.routes.get(id)
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

    /// The addresses a request for `id` may go to, of those `listed` says serve it: its
    /// homes that list it, else (a new home still loading) where it drains; `None` when
    /// placement says nothing about it or none of them lists it yet (route as without
    /// placement: to any server that lists it).
    pub fn allowed(&self, id: &str, listed: impl Fn(&str) -> bool) -> Option<Vec<String>> {
        let table = self.table.load();
        let route = table.as_ref()?.route(id)?;
        if self.lazy.load(Ordering::Relaxed) {
            return (!route.homes.is_empty()).then(|| route.homes.clone());
        }
        for set in [&route.homes, &route.draining] {
            let ok: Vec<String> = set.iter().filter(|a| listed(a)).cloned().collect();
            if !ok.is_empty() {
                return Some(ok);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use inferlane_epp::fleet::Role;

    #[test]
    fn routes_prefer_loaded_homes_then_draining_ones() {
        let mut t = Table::default();
        for (s, addr) in [("s1", "10.0.0.1:8000"), ("s2", "10.0.0.2:8000")] {
            t.servers.insert(
                s.into(),
                wire::ServerPart {
                    address: addr.into(),
                    ..Default::default()
                },
            );
        }
        t.servers
            .get_mut("s2")
            .unwrap()
            .homes
            .insert("a".into(), Role::Hot);
        t.servers.get_mut("s1").unwrap().draining.insert("a".into());
        let f = FleetState::default();
        f.table.store(Some(Arc::new(Routed::new(t))));
        // The new home has not loaded it: the old one serves until it has.
        assert_eq!(
            f.allowed("a", |a| a == "10.0.0.1:8000"),
            Some(vec!["10.0.0.1:8000".into()])
        );
        assert_eq!(f.allowed("a", |_| true), Some(vec!["10.0.0.2:8000".into()]));
        assert_eq!(f.allowed("a", |_| false), None);
        assert_eq!(f.allowed("b", |_| true), None);
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
    }
}
