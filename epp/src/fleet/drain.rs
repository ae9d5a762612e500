//! Drain before unload: a home the placement dropped stays registered, and out of routing, until nothing runs there for it.

use std::collections::{BTreeMap, BTreeSet};

/// Dropped homes and when they were dropped (placement ticks).
#[derive(Debug, Clone, Default)]
pub struct Drains {
    /// (adapter, server) -> (tick the drain began, tick a home last did not serve).
    since: BTreeMap<(String, String), (u64, u64)>,
}

impl Drains {
    /// After placement: every pair of `before` (what the sidecars were told) missing from
    /// `homes` drains; a pair placed again stops draining. Pairs on servers gone from the
    /// pool are forgotten.
    pub fn update(
        &mut self,
        tick: u64,
        before: &BTreeMap<String, BTreeSet<String>>,
        homes: &BTreeMap<String, BTreeSet<String>>,
    ) {
        for (server, ids) in before {
            for id in ids {
                let placed = homes.get(server).is_some_and(|h| h.contains(id));
                if !placed && homes.contains_key(server) {
                    self.since
                        .entry((id.clone(), server.clone()))
                        .or_insert((tick, tick));
                }
            }
        }
        self.since
            .retain(|(id, server), _| homes.get(server).is_some_and(|h| !h.contains(id)));
    }

    /// Ends the drains that are over: `idle(id, server)` says nothing runs there for it
    /// (the server's running and waiting adapters), `ready(id)` that a home of it serves (or
    /// it has none to wait for). While no home serves, requests still go to where it
    /// drains, so its clock starts again; a drain lasts at least `min_ticks` after a home
    /// serves (so requests routed before, and replicas reading the table, are done with it)
    /// and at most `max_ticks` in all.
    pub fn finish(
        &mut self,
        tick: u64,
        min_ticks: u64,
        max_ticks: u64,
        idle: impl Fn(&str, &str) -> bool,
        ready: impl Fn(&str) -> bool,
    ) -> Vec<(String, String)> {
        let mut done = Vec::new();
        self.since.retain(|(id, server), (since, quiet)| {
            if !ready(id) {
                *quiet = tick;
            }
            let age = tick.saturating_sub(*since);
            let calm = tick.saturating_sub(*quiet);
            let over = age >= max_ticks || (calm >= min_ticks && idle(id, server));
            if over {
                done.push((id.clone(), server.clone()));
            }
            !over
        });
        done
    }

    /// Is this pair draining?
    pub fn is_draining(&self, id: &str, server: &str) -> bool {
        self.since
            .contains_key(&(id.to_string(), server.to_string()))
    }

    /// Draining pairs per server.
    pub fn by_server(&self) -> BTreeMap<&str, BTreeSet<&str>> {
        let mut out: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (id, server) in self.since.keys() {
            out.entry(server.as_str()).or_default().insert(id.as_str());
        }
        out
    }

    pub fn len(&self) -> usize {
        self.since.len()
    }

    pub fn is_empty(&self) -> bool {
        self.since.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sets(pairs: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
        pairs
            .iter()
            .map(|(s, ids)| (s.to_string(), ids.iter().map(|i| i.to_string()).collect()))
            .collect()
    }

    #[test]
    fn a_dropped_home_drains_until_idle_and_its_new_home_serves() {
        let mut d = Drains::default();
        let before = sets(&[("s1", &["a", "b"]), ("s2", &[])]);
        let homes = sets(&[("s1", &["b"]), ("s2", &["a"])]);
        d.update(10, &before, &homes);
        assert!(d.is_draining("a", "s1"));
        assert!(!d.is_draining("b", "s1"));
        // Too young, then busy, then the new home not ready: still draining.
        assert!(d.finish(10, 2, 30, |_, _| true, |_| true).is_empty());
        assert!(d.finish(12, 2, 30, |_, _| false, |_| true).is_empty());
        assert!(d.finish(12, 2, 30, |_, _| true, |_| false).is_empty());
        // The new home serves from tick 13: requests stop going to s1 only then.
        assert!(d.finish(13, 2, 30, |_, _| true, |_| true).is_empty());
        assert_eq!(
            d.finish(14, 2, 30, |_, _| true, |_| true),
            [("a".to_string(), "s1".to_string())]
        );
        assert!(d.is_empty());
    }

    #[test]
    fn a_drain_ends_by_its_deadline_or_when_placed_again_or_its_server_leaves() {
        let mut d = Drains::default();
        let before = sets(&[("s1", &["a", "c"]), ("s2", &["x"])]);
        d.update(0, &before, &sets(&[("s1", &[]), ("s2", &[])]));
        assert_eq!(d.len(), 3);
        d.update(1, &before, &sets(&[("s1", &["c"])]));
        assert!(d.is_draining("a", "s1"));
        assert!(!d.is_draining("c", "s1"), "placed again");
        assert!(!d.is_draining("x", "s2"), "its server left");
        assert_eq!(d.finish(30, 1, 30, |_, _| false, |_| false).len(), 1);
    }
}
