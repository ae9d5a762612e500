//! Per-adapter demand: request-equivalents per second, smoothed (rises fast, falls slowly).

use std::collections::BTreeMap;

/// Prompt tokens that weigh as much as one request (a long prompt is more demand).
pub const TOKENS_PER_REQUEST: f64 = 512.0;

/// Smoothed demand per adapter.
#[derive(Debug, Clone)]
pub struct Demand {
    rate: BTreeMap<String, f64>,
    /// Weight of the newest interval when demand rises (a flash crowd is followed at once).
    pub alpha_up: f64,
    /// Weight of the newest interval when demand falls (a lull does not drop homes).
    pub alpha_down: f64,
}

impl Default for Demand {
    fn default() -> Self {
        Self {
            rate: BTreeMap::new(),
            alpha_up: 0.6,
            alpha_down: 0.2,
        }
    }
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
        self.rate.retain(|id, _| known(id));
        for (id, r) in self.rate.iter_mut() {
            let x = now.remove(id.as_str()).unwrap_or(0.0);
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
        for (id, x) in now {
            if known(id) && x > 0.0 {
                self.rate.insert(id.to_string(), self.alpha_up * x);
            }
        }
    }

    /// Demand of one adapter.
    pub fn of(&self, id: &str) -> f64 {
        self.rate.get(id).copied().unwrap_or(0.0)
    }

    /// Every adapter with demand.
    pub fn rates(&self) -> &BTreeMap<String, f64> {
        &self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rises_fast_falls_slowly_and_forgets_unknown_names() {
        let mut d = Demand::default();
        d.observe([("a", 10, 0), ("zz", 5, 0)], 1.0, |id| id == "a");
        assert!((d.of("a") - 6.0).abs() < 1e-9);
        assert_eq!(d.of("zz"), 0.0);
        d.observe([("a", 10, 0)], 1.0, |_| true);
        assert!((d.of("a") - 8.4).abs() < 1e-9);
        d.observe([], 1.0, |_| true);
        assert!((d.of("a") - 6.72).abs() < 1e-9, "falls by a fifth");
        d.observe([("a", 0, 1024)], 2.0, |_| true);
        assert!(
            d.of("a") < 6.72,
            "1024 tokens in 2 s are 1 request-equivalent per second"
        );
        d.observe([], 0.0, |_| true);
        assert!(d.of("a") > 0.0, "a zero interval changes nothing");
        d.observe([], 1.0, |_| false);
        assert!(
            d.rates().is_empty(),
            "adapters leaving the catalogue are forgotten"
        );
    }
}
