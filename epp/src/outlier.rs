//! Passive health: consecutive 5xx answers take an endpoint out for a growing while (Envoy's outlier detection, per endpoint, lock-free).
//!
//! A model server whose engine died keeps answering: `/metrics` still renders and every
//! generation request gets a 500. Scrapes cannot see that, the responses can. Each endpoint
//! counts consecutive failed answers; at [`OutlierPolicy::consecutive_failures`] it is ejected
//! for `base_ejection x ejections` (capped), as Envoy does, and comes back only when its
//! scraper finds it answering again (a good scrape and a good `/health`). Never all of a pool:
//! at most half of it is ejected at a time and at least one endpoint always stays usable, so
//! a client whose requests make every server fail cannot empty the pool.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// When to eject and for how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierPolicy {
    /// Consecutive 5xx answers (or connect failures) that eject an endpoint.
    pub consecutive_failures: u32,
    /// Out for this long times the number of ejections so far.
    pub base_ejection_ms: u64,
    /// Longest single ejection.
    pub max_ejection_ms: u64,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            base_ejection_ms: 2_000,
            max_ejection_ms: 30_000,
        }
    }
}

impl OutlierPolicy {
    /// How long the `n`th ejection (1-based) lasts.
    pub fn ejection_ms(&self, n: u32) -> u64 {
        self.base_ejection_ms
            .saturating_mul(u64::from(n.max(1)))
            .min(self.max_ejection_ms)
    }
}

/// Whether one more endpoint may be ejected from a pool of `pool` endpoints of which `ejected`
/// already are and `usable` (healthy, not ejected) remain, the candidate among them.
pub fn may_eject(pool: usize, ejected: usize, usable: usize) -> bool {
    (ejected + 1) * 2 <= pool && usable >= 2
}

/// One endpoint's passive health, written by the request path with atomics only.
#[derive(Debug, Default)]
pub struct Outlier {
    consecutive: AtomicU32,
    ejected: AtomicBool,
    /// When the current ejection ends, in the caller's milliseconds.
    until_ms: AtomicU64,
    /// Ejections so far (the backoff multiplier); forgotten after a clean spell.
    ejections: AtomicU32,
}

/// What one answer did to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing changed.
    Keep,
    /// This failure reached the threshold: eject it if the pool allows ([`may_eject`]).
    Eject,
}

impl Outlier {
    /// Out of the pool now.
    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }

    /// A successful answer (anything under 500).
    pub fn success(&self) {
        if self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Relaxed);
        }
    }

    /// A 5xx answer or a failed connection.
    pub fn failure(&self, policy: &OutlierPolicy) -> Verdict {
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= policy.consecutive_failures && !self.is_ejected() {
            Verdict::Eject
        } else {
            Verdict::Keep
        }
    }

    /// Ejects it at `now_ms`; false when another request already did. Returns the ejection's
    /// length on success.
    pub fn eject(&self, policy: &OutlierPolicy, now_ms: u64) -> Option<u64> {
        if self.ejected.swap(true, Ordering::AcqRel) {
            return None;
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let ms = policy.ejection_ms(n);
        self.until_ms
            .store(now_ms.saturating_add(ms), Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
        Some(ms)
    }

    /// Ejected, and its ejection time is over: the scraper may check it and put it back.
    pub fn due_for_check(&self, now_ms: u64) -> bool {
        self.is_ejected() && now_ms >= self.until_ms.load(Ordering::Relaxed)
    }

    /// Back in the pool (its scrape and health check passed). True if it was out.
    pub fn reinstate(&self) -> bool {
        self.consecutive.store(0, Ordering::Relaxed);
        self.ejected.swap(false, Ordering::AcqRel)
    }

    /// Still failing its checks: out for another, longer spell from `now_ms`.
    pub fn extend(&self, policy: &OutlierPolicy, now_ms: u64) {
        let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        self.until_ms.store(
            now_ms.saturating_add(policy.ejection_ms(n)),
            Ordering::Relaxed,
        );
    }

    /// In the pool with no failure for a while: the next ejection starts short again.
    pub fn forgive(&self) {
        if !self.is_ejected() && self.consecutive.load(Ordering::Relaxed) == 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ejects_at_the_threshold_and_successes_reset_the_count() {
        let p = OutlierPolicy::default();
        let o = Outlier::default();
        assert_eq!(o.failure(&p), Verdict::Keep);
        assert_eq!(o.failure(&p), Verdict::Keep);
        o.success();
        assert_eq!(o.failure(&p), Verdict::Keep);
        assert_eq!(o.failure(&p), Verdict::Keep);
        assert_eq!(o.failure(&p), Verdict::Eject);
        assert_eq!(o.eject(&p, 1_000), Some(2_000));
        assert!(o.is_ejected());
        assert_eq!(o.eject(&p, 1_000), None, "ejected once");
        assert!(!o.due_for_check(2_999));
        assert!(o.due_for_check(3_000));
        assert!(o.reinstate());
        assert!(!o.is_ejected());
    }

    #[test]
    fn repeated_ejections_last_longer_until_forgiven() {
        let p = OutlierPolicy::default();
        let o = Outlier::default();
        assert_eq!(o.eject(&p, 0), Some(2_000));
        o.reinstate();
        assert_eq!(o.eject(&p, 0), Some(4_000));
        o.extend(&p, 10_000);
        assert!(!o.due_for_check(15_999));
        assert!(o.due_for_check(16_000));
        o.reinstate();
        o.forgive();
        assert_eq!(o.eject(&p, 0), Some(2_000));
    }

    #[test]
    fn never_all_and_never_more_than_half() {
        assert!(!may_eject(1, 0, 1), "a lone endpoint stays");
        assert!(may_eject(2, 0, 2));
        assert!(!may_eject(2, 1, 1));
        assert!(may_eject(3, 0, 3));
        assert!(!may_eject(3, 1, 2));
        assert!(!may_eject(4, 0, 1), "the last usable one stays");
    }

    proptest! {
        #[test]
        fn ejection_time_grows_and_stays_capped(n in 0u32..1_000, base in 1u64..10_000, cap in 1u64..100_000) {
            let p = OutlierPolicy { consecutive_failures: 3, base_ejection_ms: base, max_ejection_ms: cap };
            prop_assert!(p.ejection_ms(n) <= cap);
            prop_assert!(p.ejection_ms(n + 1) >= p.ejection_ms(n));
        }

        #[test]
        fn at_least_one_usable_endpoint_whatever_fails(pool in 1usize..64, order in proptest::collection::vec(0usize..64, 0..200)) {
            // Endpoints fail in any order; each ejection asks may_eject first.
            let mut out = vec![false; pool];
            for i in order.into_iter().map(|i| i % pool) {
                let ejected = out.iter().filter(|o| **o).count();
                if !out[i] && may_eject(pool, ejected, pool - ejected) {
                    out[i] = true;
                }
            }
            let ejected = out.iter().filter(|o| **o).count();
            prop_assert!(ejected * 2 <= pool);
            prop_assert!(pool - ejected >= 1);
        }
    }
}
