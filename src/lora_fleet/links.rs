//! Which served names each server's LoRA resolver can load, from its sidecar's link reports (`--lora-copy-names versioned`).
//!
//! A sidecar links a catalogue adapter's served name once kubelet brings it the ConfigMap
//! naming it, a minute or more after this EPP read it from the API server. Asked for a
//! name it has no link for, vLLM answers 404: so a copy is asked only of servers whose
//! sidecar reported the name, under the current version's name where linked, else under
//! an older version's that still is.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Routed;
use super::on_demand::Servers;
use super::wire::{LinksReport, Table};

/// A report older than this no longer counts (sidecars send one every 30 s, and at once
/// when what they link changes).
pub const LINKS_STALE: Duration = Duration::from_secs(90);

/// Most names one report may hold (a ConfigMap holds a few thousand adapters at most).
pub const MAX_LINKED: usize = 100_000;

/// The reports this replica holds, per server id (bounded by the pool: only servers the
/// table names are recorded, and servers that left are dropped each tick).
#[derive(Debug, Default)]
pub struct LinkReports {
    by_server: HashMap<String, (Arc<BTreeSet<String>>, Instant)>,
    /// Taken since the last demand post: a follower forwards them to the decider.
    fresh: HashMap<String, Arc<BTreeSet<String>>>,
}

impl LinkReports {
    pub fn record(&mut self, server: &str, linked: Arc<BTreeSet<String>>, now: Instant) {
        self.fresh.insert(server.to_string(), linked.clone());
        self.by_server.insert(server.to_string(), (linked, now));
    }

    /// The reports taken since the last call, to forward.
    pub fn take_fresh(&mut self) -> Vec<LinksReport> {
        self.fresh
            .drain()
            .map(|(server, linked)| LinksReport {
                server,
                linked: linked.iter().cloned().collect(),
            })
            .collect()
    }

    /// `server`'s latest report, unless stale.
    pub fn linked(&self, server: &str, now: Instant) -> Option<&BTreeSet<String>> {
        self.by_server
            .get(server)
            .filter(|(_, at)| now.saturating_duration_since(*at) < LINKS_STALE)
            .map(|(l, _)| &**l)
    }

    /// Forgets servers no longer in the pool.
    pub fn retain(&mut self, in_pool: impl Fn(&str) -> bool) {
        self.by_server.retain(|s, _| in_pool(s));
        self.fresh.retain(|s, _| in_pool(s));
    }
}

/// A server's [`super::wire::ServerPart::copy_names`]: `None` without a report; else the
/// adapters (of `served`: id -> current served name) whose current name it has not
/// linked, each with the older version's name (`before`) if that one is linked, else "".
pub fn copy_names<'a>(
    linked: Option<&BTreeSet<String>>,
    served: &BTreeMap<String, String>,
    before: impl Fn(&str) -> Option<&'a str>,
) -> Option<BTreeMap<String, String>> {
    let linked = linked?;
    Some(
        served
            .iter()
            .filter(|(_, name)| !linked.contains(*name))
            .map(|(id, _)| {
                let older = before(id).filter(|b| linked.contains(*b)).unwrap_or("");
                (id.clone(), older.to_string())
            })
            .collect(),
    )
}

/// Takes out of every reported server's exceptions the adapters none of them links (a hub
/// id, a source `--allowed-source` refuses: no resolver can load them) and returns them,
/// so each server's part lists only what it lags behind the others in, and stays small.
pub fn uncopyable(parts: &mut [&mut Option<BTreeMap<String, String>>]) -> BTreeSet<String> {
    let mut reported = parts.iter().filter_map(|p| p.as_ref());
    let Some(first) = reported.next() else {
        return BTreeSet::new();
    };
    let mut none: BTreeSet<String> = first
        .iter()
        .filter(|(_, n)| n.is_empty())
        .map(|(id, _)| id.clone())
        .collect();
    for p in reported {
        none.retain(|id| p.get(id).is_some_and(String::is_empty));
    }
    for p in parts.iter_mut().filter_map(|p| p.as_mut()) {
        p.retain(|id, _| !none.contains(id));
    }
    none
}

/// Fills each server's `copy_names` in `t`, and `t.uncopyable`, from the reports
/// (`previous`: the last table, whose versions give each adapter's one before the current);
/// returns how many servers link every current version, lack some, have no report.
pub fn fill(
    t: &mut Table,
    previous: Option<&Routed>,
    reports: &LinkReports,
    now: Instant,
) -> [(&'static str, i64); 3] {
    let before = |id: &str| {
        let p = previous?;
        let was = p.table.served.get(id)?;
        match t.served.get(id) {
            Some(cur) if cur != was => Some(was.as_str()),
            _ => p.before(id),
        }
    };
    let mut names: Vec<(String, Option<BTreeMap<String, String>>)> = t
        .servers
        .keys()
        .map(|s| {
            (
                s.clone(),
                copy_names(reports.linked(s, now), &t.served, before),
            )
        })
        .collect();
    let mut parts: Vec<&mut Option<BTreeMap<String, String>>> =
        names.iter_mut().map(|(_, c)| c).collect();
    t.uncopyable = uncopyable(&mut parts);
    let mut by_state = [("current", 0), ("lagging", 0), ("missing", 0)];
    for (s, c) in names {
        let i = c.as_ref().map_or(2, |m| usize::from(!m.is_empty()));
        by_state[i].1 += 1;
        if let Some(p) = t.servers.get_mut(&s) {
            p.copy_names = c;
        }
    }
    by_state
}

/// The per-address view of the table's copy names the request path reads.
#[derive(Debug, Default)]
pub struct CopyNames {
    /// Server address -> its exceptions (`None`: no report).
    by_address: HashMap<String, Option<BTreeMap<String, String>>>,
    /// Some sidecar reported: a server without a report gets no copy. Until then (sidecars
    /// from before link reports, or a decider just started) every resolver is asked.
    strict: bool,
    /// Adapters no server's sidecar links.
    uncopyable: BTreeSet<String>,
}

impl CopyNames {
    pub fn new<'a>(
        parts: impl Iterator<Item = (&'a str, &'a Option<BTreeMap<String, String>>)>,
        uncopyable: &BTreeSet<String>,
    ) -> Self {
        let by_address: HashMap<String, Option<BTreeMap<String, String>>> =
            parts.map(|(a, c)| (a.to_string(), c.clone())).collect();
        let strict = by_address.values().any(Option::is_some);
        Self {
            by_address,
            strict,
            uncopyable: uncopyable.clone(),
        }
    }

    /// The name `address`'s resolver is asked for to copy `id` (`current`: its current
    /// served name); `None` where it has no link for any version.
    pub fn at<'a>(&'a self, id: &str, current: &'a str, address: &str) -> Option<&'a str> {
        if self.uncopyable.contains(id) {
            return None;
        }
        match self.by_address.get(address) {
            Some(Some(ex)) => match ex.get(id) {
                None => Some(current),
                Some(n) if n.is_empty() => None,
                Some(n) => Some(n),
            },
            _ if self.strict => None,
            _ => Some(current),
        }
    }
}

/// The servers of a view that `keep` allows (those linking one name).
pub struct Only<'v, V> {
    pub view: &'v V,
    pub keep: &'v dyn Fn(&str) -> bool,
}

impl<V: Servers> Servers for Only<'_, V> {
    fn listed(&self, address: &str, name: &str) -> Option<Instant> {
        self.view.listed(address, name)
    }
    fn read_at(&self, address: &str) -> Option<Instant> {
        self.view.read_at(address)
    }
    fn addresses(&self) -> impl Iterator<Item = &str> + Clone {
        let keep = self.keep;
        self.view.addresses().filter(move |a| keep(a))
    }
    fn room(&self, address: &str) -> bool {
        self.view.room(address)
    }
    fn resident(&self, address: &str, name: &str) -> bool {
        self.view.resident(address, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn copy_names_list_only_what_a_server_lacks_and_the_older_name_it_has() {
        let served: BTreeMap<String, String> = [("a", "a@new"), ("b", "b@1"), ("c", "c@1")]
            .into_iter()
            .map(|(i, n)| (i.to_string(), n.to_string()))
            .collect();
        let before = |id: &str| (id == "a").then_some("a@old");
        assert_eq!(copy_names(None, &served, before), None, "no report");
        // Steady: everything linked, nothing listed.
        let all = set(&["a@new", "b@1", "c@1"]);
        assert_eq!(
            copy_names(Some(&all), &served, before),
            Some(BTreeMap::new())
        );
        // A lagging sidecar: the old version of a, no c at all (new to the catalogue).
        let lag = set(&["a@old", "b@1"]);
        let ex = copy_names(Some(&lag), &served, before).unwrap();
        assert_eq!(ex.get("a").map(String::as_str), Some("a@old"));
        assert_eq!(ex.get("c").map(String::as_str), Some(""));
        assert_eq!(ex.len(), 2);
        let names = CopyNames::new(
            [
                ("s1:1", &Some(ex)),
                ("s2:1", &Some(BTreeMap::new())),
                ("s3:1", &None),
            ]
            .into_iter(),
            &BTreeSet::new(),
        );
        assert_eq!(names.at("a", "a@new", "s1:1"), Some("a@old"));
        assert_eq!(
            names.at("c", "c@1", "s1:1"),
            None,
            "never a name it cannot load"
        );
        assert_eq!(names.at("c", "c@1", "s2:1"), Some("c@1"));
        assert_eq!(
            names.at("b", "b@1", "s3:1"),
            None,
            "no report, once others report"
        );
        assert_eq!(names.at("b", "b@1", "s9:1"), None, "not in the table");
        // Nobody reports (older sidecars, a decider just started): every resolver is asked.
        let legacy = CopyNames::new([("s3:1", &None)].into_iter(), &BTreeSet::new());
        assert_eq!(legacy.at("b", "b@1", "s3:1"), Some("b@1"));
    }

    #[test]
    fn adapters_no_server_links_leave_the_servers_parts() {
        let ex = |pairs: &[(&str, &str)]| -> Option<BTreeMap<String, String>> {
            Some(
                pairs
                    .iter()
                    .map(|(i, n)| (i.to_string(), n.to_string()))
                    .collect(),
            )
        };
        // hub is linked nowhere; new only on s2; a's old version on s1.
        let (mut s1, mut s2, mut s3) = (
            ex(&[("hub", ""), ("new", ""), ("a", "a@old")]),
            ex(&[("hub", "")]),
            None,
        );
        let none = uncopyable(&mut [&mut s1, &mut s2, &mut s3]);
        assert_eq!(none, set(&["hub"]));
        assert_eq!(s1, ex(&[("new", ""), ("a", "a@old")]));
        assert_eq!(s2, ex(&[]));
        assert_eq!(s3, None);
        let names = CopyNames::new([("s2:1", &s2)].into_iter(), &none);
        assert_eq!(names.at("hub", "hub@1", "s2:1"), None);
        assert_eq!(names.at("new", "new@1", "s2:1"), Some("new@1"));
        // Nobody reported: nothing to take out.
        assert!(uncopyable(&mut [&mut None]).is_empty());
    }

    #[test]
    fn reports_go_stale_are_forwarded_once_and_leave_with_their_server() {
        let t0 = Instant::now();
        let mut r = LinkReports::default();
        r.record("s1", Arc::new(set(&["a@1"])), t0);
        assert_eq!(r.linked("s1", t0), Some(&set(&["a@1"])));
        assert_eq!(r.linked("s1", t0 + LINKS_STALE), None, "stale");
        let fresh = r.take_fresh();
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh[0].linked, vec!["a@1".to_string()]);
        assert!(r.take_fresh().is_empty(), "forwarded once");
        r.retain(|s| s != "s1");
        assert_eq!(r.linked("s1", t0), None);
    }
}
