//! Rendezvous (highest-random-weight) affinity bounded by load: every EPP replica maps a prompt prefix to the same endpoint with no communication.
//!
//! Each (key, endpoint) pair gets a pseudo-random weight; a key's endpoints in weight order
//! are the same on every replica that sees the same endpoint set, whatever order it lists
//! them in, and an endpoint leaving moves only the keys it was first for. The preferred
//! endpoint is the first in that order whose load is within `factor x mean + 1`, so a hot
//! prefix spills to its next endpoint instead of piling onto one server.
//!
//! Hashing alone leaves some endpoints with far more prefixes than others (50 prompts over 8
//! servers: 10 or 11 on the fullest), more than a server's prefix cache holds. [`Placement`]
//! bounds that without communication: every replica sees every active prefix (Envoy spreads
//! each tenant's requests over all replicas), and the assignment is a pure function of the
//! set of active prefixes and endpoints, so replicas that see the same sets agree.

/// A stable 64-bit key for an endpoint address (FNV-1a): the same on every replica.
pub fn endpoint_key(address: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in address.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The rendezvous weight of `endpoint` for `key`.
pub fn weight(key: u64, endpoint: u64) -> u64 {
    splitmix(key ^ splitmix(endpoint))
}

/// Indices of `endpoints` in rendezvous order for `key`, highest weight first (ties, which
/// need a 64-bit collision, by endpoint key).
pub fn order(key: u64, endpoints: &[u64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..endpoints.len()).collect();
    idx.sort_unstable_by(|&a, &b| {
        weight(key, endpoints[b])
            .cmp(&weight(key, endpoints[a]))
            .then(endpoints[a].cmp(&endpoints[b]))
    });
    idx
}

/// The preferred endpoint for `key`: the first in rendezvous order whose load is at most
/// `factor x mean load + 1`. `None` only when there are no endpoints.
pub fn preferred(key: u64, endpoints: &[u64], loads: &[f64], factor: f64) -> Option<usize> {
    preferred_where(key, endpoints, loads, factor, |_| true)
}

/// [`preferred`], skipping endpoints `admissible` rejects (the scheduler rejects a home that
/// is over the bound, to name where its prefix goes instead); when every endpoint is rejected
/// or over the bound, the first in rendezvous order.
pub fn preferred_where(
    key: u64,
    endpoints: &[u64],
    loads: &[f64],
    factor: f64,
    admissible: impl Fn(usize) -> bool,
) -> Option<usize> {
    if endpoints.is_empty() {
        return None;
    }
    let n = endpoints.len().min(loads.len());
    let bound = load_bound(&loads[..n], factor);
    let ord = order(key, &endpoints[..n]);
    ord.iter()
        .copied()
        .find(|&i| finite(loads[i]) <= bound && admissible(i))
        .or_else(|| ord.first().copied())
}

/// A load as the bound reads it: NaN, infinite and negative loads count as 0.
pub fn finite(x: f64) -> f64 {
    if x.is_finite() { x.max(0.0) } else { 0.0 }
}

/// `factor x mean load + 1`: the most load a preferred endpoint may carry.
pub fn load_bound(loads: &[f64], factor: f64) -> f64 {
    let mean = loads.iter().map(|&x| finite(x)).sum::<f64>() / loads.len().max(1) as f64;
    factor.max(1.0) * mean + 1.0
}

/// Keys in ascending order each take the first endpoint in their rendezvous order that
/// holds fewer than `ceil(factor x keys / endpoints)` keys (consistent hashing with bounded
/// loads, over the key set): a pure function of the two sets. Returns, per key, an index
/// into `endpoints`.
pub fn assign(keys: &[u64], endpoints: &[u64], factor: f64) -> Vec<(u64, usize)> {
    if endpoints.is_empty() {
        return Vec::new();
    }
    let mut sorted: Vec<u64> = keys.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let cap = capacity(sorted.len(), endpoints.len(), factor);
    let mut count = vec![0usize; endpoints.len()];
    sorted
        .into_iter()
        .map(|k| {
            let i = first_below(k, endpoints, |i| count[i] < cap);
            count[i] += 1;
            (k, i)
        })
        .collect()
}

/// The first endpoint in `key`'s rendezvous order that `ok` accepts, else the first one.
/// Most keys take their first choice, so that is found without sorting (a rebuild of 16,384
/// keys: 1.75 ms against 4.9 ms sorting every key's order). `endpoints` must not be empty.
fn first_below(key: u64, endpoints: &[u64], ok: impl Fn(usize) -> bool) -> usize {
    let best = (0..endpoints.len())
        .max_by(|&a, &b| {
            weight(key, endpoints[a])
                .cmp(&weight(key, endpoints[b]))
                .then(endpoints[b].cmp(&endpoints[a]))
        })
        .unwrap_or(0);
    if ok(best) {
        return best;
    }
    order(key, endpoints)
        .into_iter()
        .find(|&i| ok(i))
        .unwrap_or(best)
}

fn capacity(keys: usize, endpoints: usize, factor: f64) -> usize {
    let f = if factor.is_finite() {
        factor.max(1.0)
    } else {
        1.0
    };
    ((f * keys as f64 / endpoints.max(1) as f64).ceil() as usize).max(1)
}

/// Up to this many active prefixes, a new prefix recomputes the whole assignment at once
/// (about 0.1 ms at this size), so every answer is exactly [`assign`] of what this replica
/// has seen: with 3 replicas that cut prefix-heavy's splits (a tenant on two servers) four
/// times against rebuilding once a second. A rebuild happens only for a prefix new within
/// the window, so whatever clients send this costs at most `IMMEDIATE_KEYS` rebuilds (86 µs
/// each at ~1,000 keys, ~90 ms in all) per window; past the line rebuilds are timed.
pub const IMMEDIATE_KEYS: usize = 1024;

/// The prefixes seen in the last `window` seconds (at most `max_keys`) and their endpoints
/// by [`assign`]. The whole assignment is recomputed when the endpoint set changes, when a
/// new prefix arrives while at most [`IMMEDIATE_KEYS`] are active, and otherwise at most
/// once per `rebuild_every` seconds after the key set changed (a new prefix meanwhile takes
/// the first endpoint in its order below the cap), so replicas converge on the same answer.
/// With [`Placement::set_background`] the timed rebuilds are left to a caller that takes
/// them out ([`Placement::take_due`]), computes them outside any lock and puts them back
/// ([`Placement::apply`]).
#[derive(Debug)]
pub struct Placement {
    window: f64,
    max_keys: usize,
    factor: f64,
    rebuild_every: f64,
    /// Key -> (last seen, endpoint key).
    keys: std::collections::HashMap<u64, (f64, u64)>,
    /// Endpoint key -> prefixes placed on it.
    count: std::collections::HashMap<u64, usize>,
    endpoints: Vec<u64>,
    /// The endpoint list as last passed to [`Self::place`].
    last_input: Vec<u64>,
    dirty: bool,
    built_at: f64,
    background: bool,
}

/// A timed rebuild taken out of the placement: the inputs of [`assign`].
#[derive(Debug)]
pub struct Pending {
    keys: Vec<u64>,
    endpoints: Vec<u64>,
    factor: f64,
}

/// A computed [`Pending`], for [`Placement::apply`].
#[derive(Debug)]
pub struct Rebuilt {
    homes: Vec<(u64, u64)>,
    endpoints: Vec<u64>,
    factor: f64,
}

impl Pending {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The assignment (1.3 ms for 16,384 prefixes), on whatever thread holds no lock.
    pub fn run(self) -> Rebuilt {
        let homes = assign(&self.keys, &self.endpoints, self.factor)
            .into_iter()
            .map(|(k, i)| (k, self.endpoints[i]))
            .collect();
        Rebuilt {
            homes,
            endpoints: self.endpoints,
            factor: self.factor,
        }
    }
}

impl Placement {
    pub fn new(window: f64, max_keys: usize, factor: f64) -> Self {
        Self {
            window,
            max_keys: max_keys.max(1),
            factor,
            rebuild_every: 1.0,
            keys: std::collections::HashMap::new(),
            count: std::collections::HashMap::new(),
            endpoints: Vec::new(),
            last_input: Vec::new(),
            dirty: false,
            built_at: f64::NEG_INFINITY,
            background: false,
        }
    }

    /// Leaves timed rebuilds to [`Self::take_due`] and [`Self::apply`]: the request path then
    /// rebuilds only below [`IMMEDIATE_KEYS`] and when the endpoints or the factor change.
    pub fn set_background(&mut self, on: bool) {
        self.background = on;
    }

    /// The timed rebuild, if one is due: its inputs, to compute outside the lock. Idle
    /// prefixes are dropped here.
    pub fn take_due(&mut self, now: f64) -> Option<Pending> {
        if !self.dirty
            || !now.is_finite()
            || now - self.built_at < self.rebuild_every
            || self.endpoints.is_empty()
        {
            return None;
        }
        let (job, expired) = self.take(now);
        // Prefixes placed before the answers come back are capped by these counts.
        if expired {
            self.recount();
        }
        Some(job)
    }

    /// Drops idle prefixes and hands out the assignment's inputs; whether any prefix left.
    fn take(&mut self, now: f64) -> (Pending, bool) {
        let expired = self.expire(now, false);
        self.dirty = false;
        self.built_at = now;
        let job = Pending {
            keys: self.keys.keys().copied().collect(),
            endpoints: self.endpoints.clone(),
            factor: self.factor,
        };
        (job, expired)
    }

    /// Puts a computed rebuild in force. Prefixes that arrived meanwhile keep their interim
    /// endpoint until the next one; a rebuild for other endpoints or another factor (both
    /// rebuild inline when they change) is dropped.
    pub fn apply(&mut self, r: Rebuilt) {
        if r.endpoints != self.endpoints || r.factor != self.factor {
            self.dirty = true;
            return;
        }
        for (k, ep) in r.homes {
            if let Some(e) = self.keys.get_mut(&k) {
                e.1 = ep;
            }
        }
        self.recount();
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Changes the balance factor (a configuration reload); the next call rebuilds.
    pub fn set_factor(&mut self, factor: f64) {
        if factor != self.factor {
            self.factor = factor;
            self.dirty = true;
            self.built_at = f64::NEG_INFINITY;
        }
    }

    /// The endpoint (its key) for prefix `key` among `endpoints` at time `now` (seconds on
    /// any monotonic clock); records the prefix as active. `None` only without endpoints.
    pub fn place(&mut self, key: u64, endpoints: &[u64], now: f64) -> Option<u64> {
        if endpoints.is_empty() {
            return None;
        }
        if !now.is_finite() {
            return None;
        }
        // Callers pass the same list on almost every call: compare it as given before
        // sorting a copy.
        if endpoints != self.last_input.as_slice() {
            self.last_input.clear();
            self.last_input.extend_from_slice(endpoints);
            let mut eps = endpoints.to_vec();
            eps.sort_unstable();
            eps.dedup();
            if eps != self.endpoints {
                self.endpoints = eps;
                self.dirty = true;
                self.built_at = f64::NEG_INFINITY;
            }
        }
        if let Some(e) = self.keys.get_mut(&key) {
            e.0 = now;
        } else {
            if self.keys.len() >= self.max_keys && self.expire(now, true) {
                self.recount();
            }
            let cap = capacity(self.keys.len() + 1, self.endpoints.len(), self.factor);
            let i = first_below(key, &self.endpoints, |i| {
                self.count.get(&self.endpoints[i]).copied().unwrap_or(0) < cap
            });
            let ep = self.endpoints[i];
            self.keys.insert(key, (now, ep));
            *self.count.entry(ep).or_insert(0) += 1;
            self.dirty = true;
        }
        // Endpoint and factor changes reset `built_at`: rebuilt here, so no answer names an
        // endpoint that left.
        let timed = !self.background || self.built_at == f64::NEG_INFINITY;
        if self.dirty
            && (self.keys.len() <= IMMEDIATE_KEYS
                || (timed && now - self.built_at >= self.rebuild_every))
        {
            self.rebuild(now);
        }
        self.keys.get(&key).map(|&(_, ep)| ep)
    }

    /// Drops prefixes idle longer than the window (and, when `full`, the oldest until there
    /// is room for one more); whether any left (the counts are then stale).
    fn expire(&mut self, now: f64, full: bool) -> bool {
        let before = self.keys.len();
        self.keys.retain(|_, (seen, _)| now - *seen <= self.window);
        if full && self.keys.len() >= self.max_keys {
            let mut seen: Vec<f64> = self.keys.values().map(|&(t, _)| t).collect();
            // An eighth at a time, so a full table costs one scan per many new prefixes.
            let cut = (self.keys.len() + 1 - self.max_keys)
                .max(self.max_keys / 8)
                .min(self.keys.len());
            seen.select_nth_unstable_by(cut - 1, f64::total_cmp);
            let oldest = seen[cut - 1];
            let mut left = cut;
            self.keys.retain(|_, (t, _)| {
                if left > 0 && *t <= oldest {
                    left -= 1;
                    false
                } else {
                    true
                }
            });
        }
        let changed = self.keys.len() != before;
        self.dirty |= changed;
        changed
    }

    fn recount(&mut self) {
        self.count.clear();
        for &(_, ep) in self.keys.values() {
            *self.count.entry(ep).or_insert(0) += 1;
        }
    }

    /// The timed rebuild's steps, inline: `apply` recounts.
    fn rebuild(&mut self, now: f64) {
        let (job, _) = self.take(now);
        self.apply(job.run());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(n: usize) -> Vec<u64> {
        (0..n)
            .map(|i| endpoint_key(&format!("10.0.0.{i}:8000")))
            .collect()
    }

    proptest! {
        /// Every replica agrees whatever order it lists the endpoints in.
        #[test]
        fn stable_under_endpoint_order(key: u64, n in 1usize..12, rot in 0usize..12, loads in prop::collection::vec(0.0f64..20.0, 12)) {
            let eps = keys(n);
            let mut shuffled: Vec<(u64, f64)> = eps.iter().copied().zip(loads.iter().copied()).collect();
            shuffled.rotate_left(rot % n);
            shuffled.reverse();
            let (k2, l2): (Vec<u64>, Vec<f64>) = shuffled.into_iter().unzip();
            let a = preferred(key, &eps, &loads[..n], 1.25).map(|i| eps[i]);
            let b = preferred(key, &k2, &l2, 1.25).map(|i| k2[i]);
            prop_assert_eq!(a, b);
        }

        /// An endpoint leaving moves only the keys it was first for.
        #[test]
        fn minimal_movement_when_an_endpoint_leaves(n in 2usize..12, gone in 0usize..12, keys_in in prop::collection::vec(any::<u64>(), 1..200)) {
            let eps = keys(n);
            let gone = gone % n;
            let rest: Vec<u64> = eps.iter().copied().enumerate().filter(|&(i, _)| i != gone).map(|(_, e)| e).collect();
            for k in keys_in {
                let before = eps[order(k, &eps)[0]];
                let after = rest[order(k, &rest)[0]];
                if before != eps[gone] {
                    prop_assert_eq!(before, after);
                }
            }
        }

        /// The preferred endpoint's load is within the bound whenever any endpoint's is, and
        /// it is the highest-weight one that is.
        #[test]
        fn load_bound_respected(key: u64, loads in prop::collection::vec(0.0f64..50.0, 1..12), factor in 1.0f64..3.0) {
            let eps = keys(loads.len());
            let mean = loads.iter().sum::<f64>() / loads.len() as f64;
            let bound = factor * mean + 1.0;
            let p = preferred(key, &eps, &loads, factor).unwrap();
            prop_assert!(loads[p] <= bound);
            for &i in &order(key, &eps) {
                if i == p { break; }
                prop_assert!(loads[i] > bound);
            }
        }
    }

    #[test]
    fn keys_spread_over_endpoints() {
        let eps = keys(8);
        let mut count = [0usize; 8];
        for k in 0..8000u64 {
            count[order(splitmix(k), &eps)[0]] += 1;
        }
        // Each endpoint is first for about 1/8 of the keys.
        for c in count {
            assert!((800..1200).contains(&c), "{count:?}");
        }
        assert_eq!(preferred(1, &[], &[], 1.25), None);
        // NaN or infinite loads never win nor panic.
        assert!(preferred(1, &eps, &[f64::NAN; 8], 1.25).is_some());
        // A rejected endpoint passes the key to the next; all rejected: the first.
        let first = order(7, &eps)[0];
        let second = order(7, &eps)[1];
        assert_eq!(
            preferred_where(7, &eps, &[0.0; 8], 1.25, |i| i != first),
            Some(second)
        );
        assert_eq!(
            preferred_where(7, &eps, &[0.0; 8], 1.25, |_| false),
            Some(first)
        );
    }

    proptest! {
        /// The assignment is a function of the sets: any order of keys or endpoints gives
        /// the same endpoint per key, and no endpoint holds more than the cap.
        #[test]
        fn assignment_is_order_free_and_bounded(keys_in in prop::collection::vec(any::<u64>(), 1..300), n in 1usize..12, rot in 0usize..12, factor in 1.0f64..2.0) {
            let eps = keys(n);
            let a: std::collections::HashMap<u64, u64> = assign(&keys_in, &eps, factor).into_iter().map(|(k, i)| (k, eps[i])).collect();
            let mut eps2 = eps.clone();
            eps2.rotate_left(rot % n);
            eps2.reverse();
            let mut keys2 = keys_in.clone();
            keys2.reverse();
            let b: std::collections::HashMap<u64, u64> = assign(&keys2, &eps2, factor).into_iter().map(|(k, i)| (k, eps2[i])).collect();
            prop_assert_eq!(&a, &b);
            let distinct = a.len();
            let cap = (factor * distinct as f64 / n as f64).ceil() as usize;
            let mut per: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
            for e in a.values() { *per.entry(*e).or_insert(0) += 1; }
            prop_assert!(per.values().all(|&c| c <= cap.max(1)));
        }

        /// The unsorted first-choice search agrees with the full rendezvous order.
        #[test]
        fn first_choice_matches_the_order(key: u64, n in 1usize..12, skip in 0usize..12) {
            let eps = keys(n);
            let ord = order(key, &eps);
            prop_assert_eq!(first_below(key, &eps, |_| true), ord[0]);
            let skipped = ord[skip % n];
            let want = ord.iter().copied().find(|&i| i != skipped).unwrap_or(ord[0]);
            prop_assert_eq!(first_below(key, &eps, |i| i != skipped), want);
        }

        /// Two replicas that see the same prefixes in different orders and at different
        /// times agree once both have rebuilt.
        #[test]
        fn replicas_converge(keys_in in prop::collection::vec(any::<u64>(), 1..200), n in 1usize..10) {
            let eps = keys(n);
            let mut a = Placement::new(60.0, 10_000, 1.25);
            let mut b = Placement::new(60.0, 10_000, 1.25);
            for (t, k) in keys_in.iter().enumerate() {
                a.place(*k, &eps, t as f64 * 0.01);
            }
            for (t, k) in keys_in.iter().rev().enumerate() {
                b.place(*k, &eps, t as f64 * 0.013);
            }
            let later = 5.0;
            for k in &keys_in {
                prop_assert_eq!(a.place(*k, &eps, later), b.place(*k, &eps, later));
            }
        }
    }

    /// Below [`IMMEDIATE_KEYS`] every answer is exactly [`assign`] of the prefixes seen so
    /// far, with no wait for a timed rebuild.
    #[test]
    fn small_sets_answer_the_assignment_at_once() {
        let eps = keys(8);
        let mut p = Placement::new(60.0, 10_000, 1.25);
        let mut seen = Vec::new();
        for t in 0..300u64 {
            let k = splitmix(t % 120);
            if !seen.contains(&k) {
                seen.push(k);
            }
            let got = p.place(k, &eps, 0.0).unwrap();
            let want = assign(&seen, &eps, 1.25)
                .into_iter()
                .find(|&(key, _)| key == k)
                .map(|(_, i)| eps[i]);
            assert_eq!(Some(got), want, "request {t}");
        }
    }

    /// Prefix-heavy traffic (50 tenants, 8 servers, 24 req/s, the first 50 requests one per
    /// tenant) spread round-robin over 3 replicas: after a 10 s warm-up, the replicas send
    /// a tenant somewhere other than the full-knowledge assignment for under 1 % of
    /// requests over 40 layouts (0.87 %; rebuilding once a second instead: 1.3 %). What is
    /// left comes from tenants a replica has not yet seen.
    #[test]
    fn three_replicas_agree_after_warm_up() {
        let (tenants, rate, total, warm) = (50u64, 24.0, 960usize, 240usize);
        let mut off = 0usize;
        let mut measured = 0usize;
        for layout in 0..40u64 {
            let mut s = splitmix(layout * 7919 + 13);
            let mut rnd = || {
                s = splitmix(s);
                s
            };
            let ks: Vec<u64> = (0..tenants).map(|_| rnd()).collect();
            let eps: Vec<u64> = (0..8).map(|_| rnd()).collect();
            let mut seq: Vec<usize> = (0..tenants as usize).collect();
            for i in (1..seq.len()).rev() {
                seq.swap(i, (rnd() % (i as u64 + 1)) as usize);
            }
            while seq.len() < total {
                seq.push((rnd() % tenants) as usize);
            }
            let full: std::collections::HashMap<u64, u64> = assign(&ks, &eps, 1.25)
                .into_iter()
                .map(|(k, i)| (k, eps[i]))
                .collect();
            let mut replicas: Vec<Placement> = (0..3)
                .map(|_| Placement::new(120.0, 16_384, 1.25))
                .collect();
            for (n, &t) in seq.iter().enumerate() {
                let home = replicas[n % 3].place(ks[t], &eps, n as f64 / rate).unwrap();
                if n >= warm {
                    measured += 1;
                    off += usize::from(home != full[&ks[t]]);
                }
            }
        }
        assert!(
            off * 100 < measured,
            "{off} of {measured} off the assignment"
        );
    }

    /// In background mode a large set is not rebuilt by requests; a taken, computed and
    /// applied rebuild answers exactly the assignment, and one for a changed endpoint set is
    /// dropped.
    #[test]
    fn background_rebuilds_leave_the_request_path() {
        let eps = keys(8);
        let n = IMMEDIATE_KEYS as u64 + 500;
        let all: Vec<u64> = (0..n).map(splitmix).collect();
        let mut p = Placement::new(600.0, 100_000, 1.0);
        p.set_background(true);
        for (i, &k) in all.iter().enumerate() {
            p.place(k, &eps, i as f64 * 0.001);
        }
        let want: std::collections::HashMap<u64, u64> = assign(&all, &eps, 1.0)
            .into_iter()
            .map(|(k, i)| (k, eps[i]))
            .collect();
        let off = |p: &mut Placement, now: f64| {
            all.iter()
                .filter(|&&k| p.place(k, &eps, now) != Some(want[&k]))
                .count()
        };
        // Factor 1 (at most ceil(keys / endpoints) each) makes the interim answers differ.
        // Long after the last new prefix, requests alone never rebuilt past the line.
        assert!(off(&mut p, 100.0) > 0);
        let mut p2 = Placement::new(600.0, 100_000, 1.0);
        p2.set_background(true);
        for (i, &k) in all.iter().enumerate() {
            p2.place(k, &eps, i as f64 * 0.001);
        }
        let job = p2.take_due(10.0).expect("a rebuild is due");
        assert_eq!(job.len(), all.len());
        assert!(p2.take_due(10.5).is_none(), "one rebuild at a time");
        p2.apply(job.run());
        assert_eq!(off(&mut p2, 11.0), 0);
        // Computed for 8 endpoints, applied after one left (rebuilt inline meanwhile).
        let job = {
            p2.place(u64::MAX, &eps, 20.0);
            p2.take_due(20.0).expect("due")
        };
        p2.place(1, &eps[1..], 20.1);
        let before: Vec<Option<u64>> = all.iter().map(|&k| p2.place(k, &eps[1..], 20.2)).collect();
        p2.apply(job.run());
        let after: Vec<Option<u64>> = all.iter().map(|&k| p2.place(k, &eps[1..], 20.3)).collect();
        assert_eq!(before, after);
        assert!(after.iter().all(|e| e.is_some_and(|e| e != eps[0])));
    }

    #[test]
    fn placement_balances_where_hashing_alone_does_not() {
        let eps = keys(8);
        let tenants: Vec<u64> = (0..50u64).map(splitmix).collect();
        let mut hashed = [0usize; 8];
        for &t in &tenants {
            hashed[order(t, &eps)[0]] += 1;
        }
        let mut p = Placement::new(60.0, 1000, 1.25);
        for &t in &tenants {
            p.place(t, &eps, 0.0);
        }
        let mut placed = std::collections::HashMap::new();
        for &t in &tenants {
            *placed
                .entry(p.place(t, &eps, 2.0).unwrap())
                .or_insert(0usize) += 1;
        }
        // ceil(1.25 x 50 / 8) = 8 per server at most.
        assert!(placed.values().all(|&c| c <= 8), "{placed:?}");
        assert!(*hashed.iter().max().unwrap() > 8, "{hashed:?}");
    }

    #[test]
    fn placement_memory_is_bounded_and_idle_prefixes_leave() {
        let eps = keys(4);
        let mut p = Placement::new(10.0, 100, 1.25);
        for k in 0..10_000u64 {
            p.place(k, &eps, k as f64 * 0.001);
        }
        assert!(p.len() <= 100);
        // An hour later the old prefixes are gone at the next rebuild.
        p.place(u64::MAX, &eps, 3600.0);
        assert_eq!(p.len(), 1);
        assert_eq!(p.place(1, &[], 3601.0), None);
    }

    #[test]
    fn an_endpoint_leaving_moves_few_prefixes() {
        let eps = keys(8);
        let tenants: Vec<u64> = (0..400u64).map(splitmix).collect();
        let before: Vec<(u64, u64)> = assign(&tenants, &eps, 1.25)
            .into_iter()
            .map(|(k, i)| (k, eps[i]))
            .collect();
        let rest = &eps[1..];
        let after: std::collections::HashMap<u64, u64> = assign(&tenants, rest, 1.25)
            .into_iter()
            .map(|(k, i)| (k, rest[i]))
            .collect();
        let moved = before
            .iter()
            .filter(|(k, e)| *e != eps[0] && after[k] != *e)
            .count();
        let on_gone = before.iter().filter(|(_, e)| *e == eps[0]).count();
        // The gone endpoint's prefixes must move; of the others only a minority does.
        assert!(
            moved < 400 / 4,
            "moved {moved}, on the gone endpoint {on_gone}"
        );
    }
}
