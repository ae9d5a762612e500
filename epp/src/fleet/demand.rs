//! Per-adapter demand: request-equivalents per second, smoothed (rises fast, falls slowly), discounted by its own counting noise.

use std::collections::BTreeMap;

/// Prompt tokens that weigh as much as one request (a long prompt is more demand).
pub const TOKENS_PER_REQUEST: f64 = 512.0;

/// Smoothed demand per adapter. Two averages per adapter: a fast one (a flash crowd is
/// followed within a tick) and a slow one (a quiet adapter's rate). The demand placement
/// reads is the larger of the slow one and the fast one less twice its Poisson noise: one
/// request in a two-second tick reads as 0.3 req/s on the fast average, and with two hundred
/// adapters at a few hundredths of a request per second each, such spikes reorder the quiet
/// ones every tick (each reorder a load and an unload) though none of them changed.
#[derive(Debug, Clone)]
pub struct Demand {
    rate: BTreeMap<String, f64>,
    slow: BTreeMap<String, f64>,
    /// What placement reads (see above).
    demand: BTreeMap<String, f64>,
    /// Weight of the newest interval when demand rises (a flash crowd is followed at once).
    pub alpha_up: f64,
    /// Weight of the newest interval when demand falls (a lull does not drop homes).
    pub alpha_down: f64,
    /// Weight of the newest interval in the slow average.
    pub alpha_slow: f64,
}

impl Default for Demand {
    fn default() -> Self {
        Self {
            rate: BTreeMap::new(),
            slow: BTreeMap::new(),
            demand: BTreeMap::new(),
            alpha_up: 0.6,
            alpha_down: 0.2,
            alpha_slow: 0.05,
        }
    }
}

/// The fast average's standard deviation for a Poisson rate `r` counted over `dt` seconds
/// (an exponential average of weight `a` keeps `a / (2 - a)` of one interval's variance).
fn noise(r: f64, dt: f64, a: f64) -> f64 {
    (a / (2.0 - a) * r / dt).sqrt()
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
        let mut now: BTreeMap<&str, f64> = BTreeMap::new();
        for (id, requests, tokens) in counts {
            *now.entry(id).or_default() +=
                (requests as f64 + tokens as f64 / TOKENS_PER_REQUEST) / dt;
        }
        for (id, x) in &now {
            if known(id) && *x > 0.0 {
                self.rate.entry(id.to_string()).or_default();
                self.slow.entry(id.to_string()).or_default();
            }
        }
        self.rate.retain(|id, _| known(id));
        self.slow.retain(|id, _| known(id));
        for (id, r) in self.rate.iter_mut() {
            let x = now.get(id.as_str()).copied().unwrap_or(0.0);
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
            let x = now.get(id.as_str()).copied().unwrap_or(0.0);
            *r += self.alpha_slow * (x - *r);
            if *r < 1e-6 {
                *r = 0.0;
            }
        }
        let up = self.alpha_up;
        self.demand = self
            .rate
            .iter()
            .map(|(id, r)| {
                let slow = self.slow.get(id).copied().unwrap_or(0.0);
                (id.clone(), slow.max(r - 2.0 * noise(*r, dt, up)))
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
