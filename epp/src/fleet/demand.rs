//! Per-adapter demand: request-equivalents per second, smoothed (rises fast, falls slowly), discounted by its own counting noise; quiet adapters measured over their last few requests.

use std::collections::{BTreeMap, VecDeque};

/// Prompt tokens that weigh as much as one request (a long prompt is more demand).
pub const TOKENS_PER_REQUEST: f64 = 512.0;

/// Smoothed demand per adapter. Two averages per adapter: a fast one (a flash crowd is
/// followed within a tick) and a slow one (a busy adapter's rate). The demand placement
/// reads is the larger of the slow one and the fast one less twice its Poisson noise: one
/// request in a two-second tick reads as 0.3 req/s on the fast average, and with two hundred
/// adapters at a few hundredths of a request per second each, such spikes reorder the quiet
/// ones every tick (each reorder a load and an unload) though none of them changed.
///
/// Below `quiet_below` the slow average counts a handful of requests at most (its window is
/// about 40 s): one request of an adapter used once in minutes reads as much as an adapter
/// used every half minute that was idle lately, and pushes it out of the cache (measured:
/// half the placement moves on lora-zipf were such adapters, most of them placed again within
/// the minute). There the rate comes from the time back to the adapter's `recent_k`-th most
/// recent request (LRU-K's estimate, `(k - 1) / t`): its window is as long as its last few
/// requests, so it ranks quiet adapters by how often they are used, and decays as one stops
/// being used: an adapter counts as busy only while both measures say so, so one hot before
/// a shift in popularity reads as quiet `(k - 1) / quiet_below` (30) seconds after its last
/// request, where its slow average alone would take minutes.
///
/// With `two_hit`, an adapter asked for once has no demand until it is asked for again (with
/// fewer than `recent_k` requests seen, the rate is that of the requests after the first):
/// one request says nothing of a rate, and counted as one over the seconds a fresh EPP had
/// watched it made every adapter asked for once worth a disk read to cache. Nor do two or
/// three: their rate is counted over `(k - 1) / quiet_below` (30) seconds at least, so a pair
/// a few seconds apart reads as a thirtieth of a request per second, not a tenth. Placement
/// sets it where a new cache entry is a load (cold adapters through the resolver); where every
/// adapter is registered, the request has already read its adapter into its server's cache
/// and caching it there moves nothing.
#[derive(Debug, Clone)]
pub struct Demand {
    rate: BTreeMap<String, f64>,
    slow: BTreeMap<String, f64>,
    /// Each adapter's newest intervals that had requests, newest first, as many as hold its
    /// last `recent_k` requests.
    recent: BTreeMap<String, VecDeque<Interval>>,
    /// Seconds observed so far (the time base of `recent`).
    clock: f64,
    /// What placement reads (see above).
    demand: BTreeMap<String, f64>,
    /// Weight of the newest interval when demand rises (a flash crowd is followed at once).
    pub alpha_up: f64,
    /// Weight of the newest interval when demand falls (a lull does not drop homes).
    pub alpha_down: f64,
    /// Weight of the newest interval in the slow average.
    pub alpha_slow: f64,
    /// Requests per second under which an adapter counts as quiet (see above).
    pub quiet_below: f64,
    /// Requests a quiet adapter's rate is measured over.
    pub recent_k: u64,
    /// An adapter asked for once has no demand (see above).
    pub two_hit: bool,
}

/// One interval's requests of an adapter: it ended at `end` (on [`Demand`]'s clock) and
/// lasted `len` seconds; `weight` in request-equivalents.
#[derive(Debug, Clone, Copy)]
struct Interval {
    end: f64,
    len: f64,
    requests: u64,
    weight: f64,
}

impl Default for Demand {
    fn default() -> Self {
        Self {
            rate: BTreeMap::new(),
            slow: BTreeMap::new(),
            recent: BTreeMap::new(),
            clock: 0.0,
            demand: BTreeMap::new(),
            alpha_up: 0.6,
            alpha_down: 0.2,
            alpha_slow: 0.05,
            quiet_below: 0.1,
            recent_k: 4,
            two_hit: false,
        }
    }
}

/// The fast average's standard deviation for a Poisson rate `r` counted over `dt` seconds
/// (an exponential average of weight `a` keeps `a / (2 - a)` of one interval's variance).
fn noise(r: f64, dt: f64, a: f64) -> f64 {
    (a / (2.0 - a) * r / dt).sqrt()
}

/// A quiet adapter's rate at `now`: `k - 1` requests' worth over the time back to its `k`-th
/// most recent request (a Poisson rate's unbiased estimate from that time), requests taken
/// as spread evenly over their interval. With fewer than `k` requests seen: all of them over
/// the time observed, or with `two_hit` the same as with `k` over all of them (`n - 1`
/// requests' worth back to the oldest, at least `min_span` seconds), so an adapter asked for
/// once has shown no rate: a fresh EPP that counted one request over its first seconds read
/// every adapter asked for once as busy, and placement pushed the fresh fleet's cached
/// adapters out for them (each a disk read holding a serving engine), most never asked for
/// again within the minute (a cache's two-hit admission; docs/benchmarks.md).
fn recent_rate(
    intervals: &VecDeque<Interval>,
    k: u64,
    now: f64,
    two_hit: bool,
    min_span: f64,
) -> f64 {
    let (mut n, mut w) = (0u64, 0.0);
    for t in intervals {
        let need = k.saturating_sub(n);
        if t.requests >= need && t.requests > 0 {
            let share = need as f64 / t.requests as f64;
            let at = t.end - t.len * share;
            return after_first(w + t.weight * share, k, now, at);
        }
        n += t.requests;
        w += t.weight;
    }
    if !two_hit {
        return if now > 0.0 { w / now } else { 0.0 };
    }
    let Some(oldest) = intervals.back().filter(|_| n >= 2) else {
        return 0.0;
    };
    after_first(w, n, now, (oldest.end - oldest.len).min(now - min_span))
}

/// `n` requests weighing `weight` since `at`: the rate of those after the first (`n - 1`
/// requests' worth) over the time back to `at`.
fn after_first(weight: f64, n: u64, now: f64, at: f64) -> f64 {
    weight / n as f64 * (n - 1) as f64 / (now - at).max(1e-3)
}

impl Demand {
    /// Starts from rates measured elsewhere (a replica taking over from the decider it
    /// followed); non-finite and negative rates are dropped.
    pub fn seed(&mut self, rates: &BTreeMap<String, f64>) {
        self.rate = rates
            .iter()
            .filter(|(_, r)| r.is_finite() && **r >= 0.0)
            .map(|(id, r)| (id.clone(), *r))
            .collect();
        self.slow = self.rate.clone();
        let k = self.recent_k.max(2);
        self.recent = self
            .rate
            .iter()
            .filter(|(_, r)| **r > 0.0)
            .map(|(id, r)| {
                let last = Interval {
                    end: self.clock - (k - 1) as f64 / r,
                    len: 0.0,
                    requests: k,
                    weight: k as f64,
                };
                (id.clone(), VecDeque::from([last]))
            })
            .collect();
        self.demand = self.rate.clone();
    }

    /// Folds one interval of `dt_s` seconds: (requests, prompt tokens) per adapter. Adapters
    /// not in `known` are dropped (the map stays as large as the catalogue).
    pub fn observe<'a>(
        &mut self,
        counts: impl IntoIterator<Item = (&'a str, u64, u64)>,
        dt_s: f64,
        known: impl Fn(&str) -> bool,
    ) {
        let dt = if dt_s.is_finite() && dt_s > 0.0 {
            dt_s
        } else {
            return;
        };
        self.clock += dt;
        let k = self.recent_k.max(2);
        // Requests and request-equivalents per adapter this interval.
        let mut seen: BTreeMap<&str, (u64, f64)> = BTreeMap::new();
        for (id, requests, tokens) in counts {
            let e = seen.entry(id).or_default();
            e.0 = e.0.saturating_add(requests);
            e.1 += requests as f64 + tokens as f64 / TOKENS_PER_REQUEST;
        }
        let now = |id: &str| seen.get(id).map_or(0.0, |(_, w)| w / dt);
        for (&id, &(requests, weight)) in &seen {
            if !known(id) {
                continue;
            }
            if weight > 0.0 {
                self.rate.entry(id.to_string()).or_default();
                self.slow.entry(id.to_string()).or_default();
            }
            if requests == 0 {
                continue;
            }
            let q = self.recent.entry(id.to_string()).or_default();
            q.push_front(Interval {
                end: self.clock,
                len: dt,
                requests,
                weight,
            });
            // Keep only the intervals holding the last k requests.
            let mut n = 0u64;
            let keep = q
                .iter()
                .position(|t| {
                    n = n.saturating_add(t.requests);
                    n >= k
                })
                .map_or(q.len(), |i| i + 1);
            q.truncate(keep);
        }
        self.rate.retain(|id, _| known(id));
        self.slow.retain(|id, _| known(id));
        self.recent.retain(|id, _| known(id));
        for (id, r) in self.rate.iter_mut() {
            let x = now(id);
            let a = if x > *r {
                self.alpha_up
            } else {
                self.alpha_down
            };
            *r += a * (x - *r);
            if *r < 1e-6 {
                *r = 0.0;
            }
        }
        for (id, r) in self.slow.iter_mut() {
            let x = now(id);
            *r += self.alpha_slow * (x - *r);
            if *r < 1e-6 {
                *r = 0.0;
            }
        }
        let (up, quiet_below, clock, two_hit) =
            (self.alpha_up, self.quiet_below, self.clock, self.two_hit);
        // With two_hit, fewer than k requests read as at most (n - 1) / (k - 1) of the quiet
        // rate: two requests a few seconds apart say little of an adapter's rate, and read as
        // one request's worth over those seconds, an adapter used once in minutes took a
        // cache entry (a load holding a serving engine) from one used every minute.
        let min_span = if quiet_below > 0.0 {
            (k - 1) as f64 / quiet_below
        } else {
            0.0
        };
        self.demand = self
            .rate
            .iter()
            .map(|(id, r)| {
                let slow = self.slow.get(id).copied().unwrap_or(0.0);
                let recent = self
                    .recent
                    .get(id)
                    .map_or(0.0, |q| recent_rate(q, k, clock, two_hit, min_span));
                // Busy by both measures, or quiet: one that stopped is quiet within
                // (k - 1) / quiet_below seconds, not once its slow average has decayed.
                let steady = if slow >= quiet_below && recent >= quiet_below {
                    slow
                } else {
                    recent.min(quiet_below)
                };
                (id.clone(), steady.max(r - 2.0 * noise(*r, dt, up)))
            })
            .filter(|(_, d)| *d > 0.0)
            .collect();
    }

    /// Demand of one adapter.
    pub fn of(&self, id: &str) -> f64 {
        self.demand.get(id).copied().unwrap_or(0.0)
    }

    /// Every adapter with demand.
    pub fn rates(&self) -> &BTreeMap<String, f64> {
        &self.demand
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rises_fast_falls_slowly_and_forgets_unknown_names() {
        let mut d = Demand::default();
        d.observe([("a", 10, 0), ("zz", 5, 0)], 1.0, |id| id == "a");
        let first = d.of("a");
        assert!(
            first > 2.0 && first < 6.0,
            "a burst counts at once, less its noise: {first}"
        );
        assert_eq!(d.of("zz"), 0.0);
        d.observe([("a", 10, 0)], 1.0, |_| true);
        let second = d.of("a");
        assert!(second > first + 1.0, "{second}");
        d.observe([], 1.0, |_| true);
        let third = d.of("a");
        assert!(
            third < second && third > 0.6 * second,
            "falls slowly: {third}"
        );
        let mut quiet = d.clone();
        quiet.observe([], 2.0, |_| true);
        d.observe([("a", 0, 1024)], 2.0, |_| true);
        assert!(
            d.of("a") > quiet.of("a"),
            "1024 tokens in 2 s are 1 request-equivalent per second"
        );
        let before = d.of("a");
        d.observe([], 0.0, |_| true);
        assert_eq!(d.of("a"), before, "a zero interval changes nothing");
        d.observe([], 1.0, |_| false);
        assert!(
            d.rates().is_empty(),
            "adapters leaving the catalogue are forgotten"
        );
    }

    #[test]
    fn a_quiet_adapter_is_measured_over_its_last_requests() {
        // "steady" gets a request every 30 s and has been idle for 40 s; "rare" got one ten
        // minutes ago and one now. A 40-s average ranks "rare" first (its one request is
        // recent); the time back to the fourth most recent request ranks them as used.
        let mut d = Demand::default();
        for t in 0..320 {
            let mut counts = Vec::new();
            if t % 15 == 0 && t < 300 {
                counts.push(("steady", 1, 0));
            }
            if t == 0 || t == 319 {
                counts.push(("rare", 1, 0));
            }
            d.observe(counts, 2.0, |_| true);
        }
        let (steady, rare) = (d.of("steady"), d.of("rare"));
        assert!(steady > 2.0 * rare, "steady {steady}, rare {rare}");
        assert!(
            steady > 0.015 && steady < 0.035,
            "about 3 requests in 130 s: {steady}"
        );
        // The slow average alone had it the other way round.
        let (s_steady, s_rare) = (d.slow["steady"], d.slow["rare"]);
        assert!(s_rare > s_steady, "{s_rare} {s_steady}");
    }

    #[test]
    fn a_busy_adapter_that_stops_reads_as_quiet_within_half_a_minute() {
        let mut d = Demand::default();
        for _ in 0..30 {
            d.observe([("hot", 10, 0), ("other", 1, 0)], 2.0, |_| true);
        }
        assert!(d.of("hot") > 3.0, "{}", d.of("hot"));
        let mut ticks = 0;
        while d.of("hot") >= d.quiet_below && ticks < 100 {
            d.observe([("other", 1, 0)], 2.0, |_| true);
            ticks += 1;
        }
        assert!(ticks <= 16, "quiet after {ticks} ticks of 2 s");
        assert!(
            d.slow["hot"] > 1.0,
            "the slow average alone still says busy"
        );
        // Requests come back: busy again at once (the fast average).
        d.observe([("hot", 10, 0)], 2.0, |_| true);
        assert!(d.of("hot") > 1.0, "{}", d.of("hot"));
    }

    #[test]
    fn seeded_rates_carry_over_for_quiet_adapters_too() {
        let mut d = Demand::default();
        d.seed(&[("a".to_string(), 0.05), ("b".to_string(), 2.0)].into());
        d.observe([], 2.0, |_| true);
        let a = d.of("a");
        assert!(a > 0.04 && a < 0.05, "{a}");
        assert!(d.of("b") > 1.5, "{}", d.of("b"));
    }

    #[test]
    fn with_two_hit_an_adapter_asked_for_once_has_no_demand_until_asked_again() {
        let mut d = Demand {
            two_hit: true,
            ..Demand::default()
        };
        let mut counted = Demand::default();
        counted.observe([("once", 1, 0)], 2.0, |_| true);
        assert!(counted.of("once") > 0.0, "without it one request counts");
        d.observe([("once", 1, 0), ("twice", 1, 0)], 2.0, |_| true);
        for _ in 0..4 {
            d.observe([], 2.0, |_| true);
        }
        assert_eq!(d.of("once"), 0.0, "one request in the first seconds");
        assert_eq!(d.of("twice"), 0.0);
        d.observe([("twice", 1, 0)], 2.0, |_| true);
        let twice = d.of("twice");
        // One request's worth over 30 s (12 s back to the first are too few to say more).
        assert!((twice - 1.0 / 30.0).abs() < 1e-9, "{twice}");
        assert_eq!(d.of("once"), 0.0);
        // A third request: two requests' worth; the rate over the time back to the first
        // once that is longer.
        for _ in 0..19 {
            d.observe([], 2.0, |_| true);
        }
        d.observe([("twice", 1, 0)], 2.0, |_| true);
        let thrice = d.of("twice");
        assert!((thrice - 2.0 / 52.0).abs() < 0.002, "{thrice}");
    }

    #[test]
    fn single_requests_of_quiet_adapters_do_not_reorder_them() {
        // "b" gets a request every 5 ticks of 2 s (0.1 req/s), "a" every 10 (0.05): a fast
        // average alone ranks "a" first in each tick it gets its request.
        let mut d = Demand::default();
        let mut b_first = 0;
        for t in 0..300 {
            let mut counts = Vec::new();
            if t % 5 == 0 {
                counts.push(("b", 1, 0));
            }
            if t % 10 == 3 {
                counts.push(("a", 1, 0));
            }
            d.observe(counts, 2.0, |_| true);
            if t >= 100 && d.of("b") > d.of("a") {
                b_first += 1;
            }
        }
        assert!(b_first >= 190, "b ranked first in {b_first} of 200 ticks");
        assert!(d.of("a") < 0.1 && d.of("a") > 0.02, "{}", d.of("a"));
    }
}
