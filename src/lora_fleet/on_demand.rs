//! Our requests in flight per adapter and server, and the copies a LoRA resolver made of cold adapters for them: where requests may use one, and when one is done and may be unloaded.
//!
//! With `--lora-cold-adapters resolver` an adapter placement gives no cache entry has no home:
//! a request for it goes to a server that does not list it, whose LoRA resolver registers it
//! and reads it from disk into the host-memory cache (a free entry, placement keeps some).
//! Left there, vLLM's LRU would push a placed adapter out at the next such read (whose own
//! next request then reads from disk: one read becomes two). So once the copy's requests are
//! done the EPP unloads it, which frees the entry on vLLM's Rust frontend.
//!
//! A copy is unloaded by the replica that made it (or the decider, which adopts copies it
//! finds with no record), only after a grace with nothing in flight, ours or on its server,
//! and its server is not asked to resolve the adapter again until a model list read after
//! the unload no longer lists it. Our own copies are used only while [`Copy::Live`];
//! another replica's copy, which its server reports cached or running, is borrowed: used
//! as it is, its unloading left to its maker.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Where one copy (adapter on a server) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copy {
    /// Requests may use it; `idle_since` is when the last one ended (`None` while any runs).
    Live { idle_since: Option<Instant> },
    /// Chosen for unloading at `since`: no request is sent there; unloaded after a grace if
    /// none began.
    Unloading { since: Instant },
    /// Unloaded at `at`.
    Unloaded { at: Instant },
}

/// Requests in flight per (served name, server address), and the copies by (adapter id,
/// server address) (an on-demand copy is served under its id). Both maps are bounded by the
/// catalogue times the pool: only catalogue adapters are counted.
#[derive(Debug, Default)]
pub struct Flights {
    pub counts: HashMap<(String, String), u32>,
    pub copies: HashMap<(String, String), Copy>,
}

/// How long a copy waits with nothing in flight before it is unloaded, and the grace
/// between choosing it and unloading it (a request routed just before it was chosen has
/// begun by then).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub linger: Duration,
    pub grace: Duration,
    /// An unloaded copy's record is forgotten after this, listed or not.
    pub forget: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            linger: Duration::from_millis(500),
            grace: Duration::from_millis(200),
            forget: Duration::from_secs(30),
        }
    }
}

/// Which copies [`Flights::targets`] found for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Live copies of ours: the request keeps them live.
    Ours,
    /// Copies another replica made (we have no record; their servers report them cached
    /// or running): the request uses them without taking them over.
    Borrowed,
    /// None: the servers whose resolver may make one for this request.
    New,
}

/// What the servers report, as routing by placement needs it.
pub trait Servers {
    /// When the model list of `address` that lists `name` was read; `None` if it does not.
    fn listed(&self, address: &str, name: &str) -> Option<Instant>;
    /// When `address`'s model list was last read.
    fn read_at(&self, address: &str) -> Option<Instant>;
    /// The servers this request may go to.
    fn addresses(&self) -> impl Iterator<Item = &str> + Clone;
    /// `address` has a free host-memory cache entry (a read there pushes nothing out).
    fn room(&self, _address: &str) -> bool {
        true
    }
    /// `address`'s latest scrape shows `name` cached (vLLM's residency metrics) or running
    /// or waiting there.
    fn resident(&self, _address: &str, _name: &str) -> bool {
        false
    }
}

impl Flights {
    /// One more request for `served` on `address`; for an on-demand copy (`copy`: the
    /// adapter's id) the copy is live from now.
    pub fn begin(&mut self, served: &str, address: &str, copy: bool) -> (String, String) {
        let key = (served.to_string(), address.to_string());
        *self.counts.entry(key.clone()).or_default() += 1;
        if copy {
            self.copies
                .insert(key.clone(), Copy::Live { idle_since: None });
        }
        key
    }

    /// A request ended: a copy with nothing left in flight starts its linger.
    pub fn end(&mut self, key: &(String, String), now: Instant) {
        let Some(n) = self.counts.get_mut(key) else {
            return;
        };
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.counts.remove(key);
            if let Some(c @ Copy::Live { .. }) = self.copies.get_mut(key) {
                *c = Copy::Live {
                    idle_since: Some(now),
                };
            }
        }
    }

    /// Servers (of `addresses`) that may serve on-demand adapter `id`: those holding a live
    /// copy of ours; else those holding another replica's (no record here, reported
    /// `resident`: a read saved, since the model lists that show copies are read seldom);
    /// else those a resolver may load it on (no copy of ours there, none listed, or ours
    /// unloaded and a later model list shows it gone), those with a free cache entry
    /// (`room`) first, narrowed by `narrow` (a new copy's read holds its server's engine).
    /// Empty when none may.
    pub fn targets<'a>(
        &self,
        id: &str,
        servers: &'a impl Servers,
        narrow: impl FnOnce(&mut Vec<&'a str>),
    ) -> (Found, Vec<&'a str>) {
        // This adapter's copies, by address (a handful: the request path builds no keys).
        let mine: HashMap<&str, Copy> = self
            .copies
            .iter()
            .filter(|((i, _), _)| i == id)
            .map(|((_, a), c)| (a.as_str(), *c))
            .collect();
        let copy = |a: &str| mine.get(a).copied();
        let addresses = servers.addresses();
        let live: Vec<&str> = addresses
            .clone()
            .filter(|a| matches!(copy(a), Some(Copy::Live { .. })))
            .collect();
        if !live.is_empty() {
            return (Found::Ours, live);
        }
        let theirs: Vec<&str> = addresses
            .clone()
            .filter(|a| copy(a).is_none() && servers.resident(a, id))
            .collect();
        if !theirs.is_empty() {
            return (Found::Borrowed, theirs);
        }
        let free = |a: &&str| match copy(a) {
            None => servers.listed(a, id).is_none(),
            Some(Copy::Unloaded { at }) => {
                servers.listed(a, id).is_none() && servers.read_at(a).is_some_and(|r| r > at)
            }
            Some(_) => false,
        };
        let open: Vec<&str> = addresses.filter(free).collect();
        let roomy: Vec<&str> = open.iter().copied().filter(|a| servers.room(a)).collect();
        let mut fresh = if roomy.is_empty() { open } else { roomy };
        narrow(&mut fresh);
        (Found::New, fresh)
    }

    /// One tick of the copies' lives: a live copy idle past the linger, and not running or
    /// waiting on its server (`busy`: another replica's request may be), is chosen; one
    /// chosen a grace ago with nothing in flight, ours or on its server, is returned to be
    /// unloaded (one busy again lives on); unloaded copies are forgotten once their server's
    /// list no longer shows them (or after `forget`); copies no longer `ours` (`(address,
    /// name)`: its server left the pool, or placement made the copy a home, whose sidecar
    /// keeps it) are forgotten.
    pub fn due(
        &mut self,
        now: Instant,
        t: Timing,
        servers: &impl Servers,
        ours: impl Fn(&str, &str) -> bool,
        busy: impl Fn(&str, &str) -> bool,
    ) -> Vec<(String, String)> {
        let counts = &self.counts;
        let mut out = Vec::new();
        self.copies.retain(|key, c| {
            let (id, addr) = (key.0.as_str(), key.1.as_str());
            if !ours(addr, id) {
                return false;
            }
            let idle = !counts.contains_key(key);
            match *c {
                Copy::Live {
                    idle_since: Some(at),
                } if idle && now.duration_since(at) >= t.linger && !busy(addr, id) => {
                    *c = Copy::Unloading { since: now };
                }
                // Another replica's request that began during the grace shows on the server.
                Copy::Unloading { .. } if idle && busy(addr, id) => {
                    *c = Copy::Live {
                        idle_since: Some(now),
                    };
                }
                Copy::Unloading { since } if idle && now.duration_since(since) >= t.grace => {
                    out.push(key.clone());
                }
                Copy::Unloading { .. } if !idle => {
                    *c = Copy::Live { idle_since: None };
                }
                Copy::Unloaded { at } => {
                    let gone = servers.listed(addr, id).is_none()
                        && servers.read_at(addr).is_some_and(|r| r > at);
                    return !gone && now.duration_since(at) < t.forget;
                }
                _ => {}
            }
            true
        });
        out
    }

    /// The server answered an unload of the copy (or said it has none).
    pub fn unloaded(&mut self, key: &(String, String), now: Instant) {
        if let Some(c @ Copy::Unloading { .. }) = self.copies.get_mut(key) {
            *c = Copy::Unloaded { at: now };
        }
    }

    /// An unload failed: the copy lives on and is tried again after its linger.
    pub fn unload_failed(&mut self, key: &(String, String), now: Instant) {
        if let Some(c @ Copy::Unloading { .. }) = self.copies.get_mut(key) {
            *c = Copy::Live {
                idle_since: Some(now),
            };
        }
    }

    /// A copy a server lists that we have no record of (made before a restart): adopted as
    /// idle, so it is unloaded once nothing runs it.
    pub fn adopt(&mut self, id: &str, address: &str, now: Instant) {
        self.copies
            .entry((id.to_string(), address.to_string()))
            .or_insert(Copy::Live {
                idle_since: Some(now),
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        listed: HashMap<String, Vec<String>>,
        read: Option<Instant>,
        addrs: Vec<&'static str>,
        roomy: Vec<&'static str>,
        resident: Vec<(&'static str, &'static str)>,
    }

    impl Servers for Fake {
        fn addresses(&self) -> impl Iterator<Item = &str> + Clone {
            self.addrs.iter().copied()
        }
        fn room(&self, address: &str) -> bool {
            self.roomy.contains(&address)
        }
        fn resident(&self, address: &str, name: &str) -> bool {
            self.resident
                .iter()
                .any(|&(a, n)| a == address && n == name)
        }
        fn listed(&self, address: &str, name: &str) -> Option<Instant> {
            self.listed
                .get(address)
                .is_some_and(|l| l.iter().any(|n| n == name))
                .then_some(self.read?)
        }
        fn read_at(&self, _: &str) -> Option<Instant> {
            self.read
        }
    }

    const T: Timing = Timing {
        linger: Duration::from_millis(500),
        grace: Duration::from_millis(200),
        forget: Duration::from_secs(30),
    };

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn a_copy_is_used_while_live_unloaded_once_idle_and_resolved_again_once_gone() {
        let t0 = Instant::now();
        let (s1, s2) = ("10.0.0.1:8000", "10.0.0.2:8000");
        let mut f = Flights::default();
        let mut view = Fake {
            read: Some(t0),
            addrs: vec![s1, s2],
            roomy: vec![s2],
            ..Fake::default()
        };
        // Nobody has it: any server, those with a free cache entry first.
        assert_eq!(f.targets("x", &view, |_| {}).1, vec![s2]);
        view.roomy.clear();
        assert_eq!(f.targets("x", &view, |_| {}).1, vec![s1, s2]);
        // A new copy's servers are narrowed (placement keeps the quieter ones).
        assert_eq!(f.targets("x", &view, |v| v.truncate(1)).1, vec![s1]);
        let key = f.begin("x", s2, true);
        view.listed.insert(s2.into(), vec!["x".into()]);
        // The live copy takes its requests, whatever the narrowing would keep.
        assert_eq!(f.targets("x", &view, |_| {}).1, vec![s2]);
        assert_eq!(f.targets("x", &view, |v| v.clear()).1, vec![s2]);
        f.end(&key, ms(t0, 100));
        let never_busy = |_: &str, _: &str| false;
        assert!(
            f.due(ms(t0, 300), T, &view, |_, _| true, never_busy)
                .is_empty(),
            "lingers"
        );
        assert!(
            f.due(ms(t0, 700), T, &view, |_, _| true, never_busy)
                .is_empty(),
            "chosen"
        );
        // Chosen: no request goes to it; another server resolves it.
        assert_eq!(f.targets("x", &view, |_| {}).1, vec![s1]);
        assert_eq!(
            f.due(ms(t0, 950), T, &view, |_, _| true, never_busy),
            vec![key.clone()]
        );
        f.unloaded(&key, ms(t0, 960));
        // A list read before the unload still shows it: s2 is not asked again yet.
        view.addrs = vec![s2];
        assert_eq!(f.targets("x", &view, |_| {}).1, Vec::<&str>::new());
        view.listed.clear();
        assert_eq!(
            f.targets("x", &view, |_| {}).1,
            Vec::<&str>::new(),
            "read before the unload"
        );
        view.read = Some(ms(t0, 1000));
        assert_eq!(f.targets("x", &view, |_| {}).1, vec![s2]);
        f.due(ms(t0, 1100), T, &view, |_, _| true, never_busy);
        assert!(f.copies.is_empty(), "forgotten once gone");
    }

    #[test]
    fn a_copy_in_use_is_never_unloaded() {
        let t0 = Instant::now();
        let s1 = "10.0.0.1:8000";
        let view = Fake {
            read: Some(t0),
            ..Fake::default()
        };
        let mut f = Flights::default();
        let a = f.begin("x", s1, true);
        let b = f.begin("x", s1, true);
        f.end(&a, ms(t0, 10));
        assert!(
            f.due(ms(t0, 5000), T, &view, |_, _| true, |_, _| false)
                .is_empty()
        );
        f.end(&b, ms(t0, 5000));
        // Another replica's request runs there: the server reports it running.
        assert!(
            f.due(ms(t0, 6000), T, &view, |_, _| true, |_, _| true)
                .is_empty()
        );
        assert!(matches!(f.copies[&b], Copy::Live { .. }));
        // Chosen, then a request begins during the grace: it lives on.
        f.due(ms(t0, 6000), T, &view, |_, _| true, |_, _| false);
        let c = f.begin("x", s1, true);
        assert!(
            f.due(ms(t0, 6300), T, &view, |_, _| true, |_, _| false)
                .is_empty()
        );
        f.end(&c, ms(t0, 6300));
        // Chosen, then another replica's request shows on the server during the grace: it
        // lives on, and lingers again once that is done.
        f.due(ms(t0, 6900), T, &view, |_, _| true, |_, _| false);
        assert!(matches!(f.copies[&c], Copy::Unloading { .. }));
        assert!(
            f.due(ms(t0, 7000), T, &view, |_, _| true, |_, _| true)
                .is_empty()
        );
        assert!(matches!(f.copies[&c], Copy::Live { .. }));
        // A failed unload is tried again after the linger; a server gone is forgotten.
        f.due(ms(t0, 7600), T, &view, |_, _| true, |_, _| false);
        let due = f.due(ms(t0, 7900), T, &view, |_, _| true, |_, _| false);
        assert_eq!(due, vec![c.clone()]);
        f.unload_failed(&c, ms(t0, 7900));
        assert!(matches!(f.copies[&c], Copy::Live { .. }));
        f.due(ms(t0, 8000), T, &view, |_, _| false, |_, _| false);
        assert!(f.copies.is_empty());
    }

    #[test]
    fn another_replicas_copy_is_borrowed_but_not_taken_over() {
        let t0 = Instant::now();
        let (s1, s2, s3) = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000");
        let mut f = Flights::default();
        let mut view = Fake {
            read: Some(t0),
            addrs: vec![s1, s2, s3],
            resident: vec![(s2, "x"), (s3, "y")],
            ..Fake::default()
        };
        // Another replica's copy on s2 (the list that would show it not read yet): used,
        // whatever the narrowing for a new copy would keep.
        assert_eq!(
            f.targets("x", &view, |v| v.truncate(1)),
            (Found::Borrowed, vec![s2])
        );
        let key = f.begin("x", s2, false);
        assert!(f.copies.is_empty(), "its maker unloads it");
        f.end(&key, ms(t0, 10));
        assert!(
            f.due(ms(t0, 5000), T, &view, |_, _| true, |_, _| false)
                .is_empty()
        );
        // A copy of ours comes first; one of ours being unloaded is not borrowed back.
        let ours = f.begin("x", s1, true);
        assert_eq!(f.targets("x", &view, |_| {}), (Found::Ours, vec![s1]));
        f.end(&ours, ms(t0, 5000));
        f.due(ms(t0, 5600), T, &view, |_, _| true, |_, _| false);
        view.resident = vec![(s1, "x")];
        assert_eq!(f.targets("x", &view, |_| {}), (Found::New, vec![s2, s3]));
        // Gone from the server's report: nothing to borrow.
        view.resident.clear();
        assert_eq!(
            f.targets("y", &view, |_| {}),
            (Found::New, vec![s1, s2, s3])
        );
    }
}
