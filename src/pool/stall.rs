//! An engine that makes no step while requests run or wait there: reading a LoRA adapter from disk (vLLM reads between steps, holding every request), or stuck.

use std::time::{Duration, Instant};

use inferlane_epp::EndpointMetrics;

use super::state::Scraped;

/// A threshold for servers whose engine steps take tens of milliseconds (an adapter's read
/// takes hundreds): at the default 50 ms scrapes, the third busy scrape with an unchanged
/// progress count. Not the default: a long prefill step (thousands of prompt tokens in one
/// chunk) would count too.
#[cfg(test)]
const STALL_AFTER: Duration = Duration::from_millis(100);

fn busy(m: &EndpointMetrics) -> bool {
    m.running + m.waiting > 0.0
}

/// Since when a server scraped at `at` (`m`) after `prev` has been busy without a step: the
/// earliest of the busy scrapes in a row that showed its progress count where it is now.
/// `None` while it makes progress, is idle or reports no progress count.
pub fn stall_start(prev: Option<&Scraped>, m: &EndpointMetrics, at: Instant) -> Option<Instant> {
    let p = prev?;
    let progress = m.progress?;
    let same = p.metrics.progress == Some(progress);
    (same && busy(m) && busy(&p.metrics) && p.at <= at).then(|| p.stalled_since.unwrap_or(p.at))
}

/// A server busy without a step since `since` (as of a scrape at `at`) for `after` (0: never
/// judged): a request sent there waits for whatever holds it (another replica's read, a
/// sidecar's load), as one sent to a server we know reads does.
pub fn stalled(since: Option<Instant>, at: Instant, after: Duration) -> bool {
    !after.is_zero() && since.is_some_and(|t| at.saturating_duration_since(t) >= after)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(prev: Option<&Scraped>, at: Instant, running: f64, progress: Option<f64>) -> Scraped {
        let metrics = EndpointMetrics {
            running,
            progress,
            ..EndpointMetrics::default()
        };
        let since = stall_start(prev, &metrics, at);
        Scraped {
            stalled_since: since,
            stalled: stalled(since, at, STALL_AFTER),
            metrics,
            at,
            in_flight: 0,
        }
    }

    #[test]
    fn busy_scrapes_without_a_step_are_a_stall_once_long_enough() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let a = scrape(None, ms(0), 2.0, Some(10.0));
        let b = scrape(Some(&a), ms(50), 2.0, Some(10.0));
        assert_eq!(b.stalled_since, Some(ms(0)));
        assert!(!b.stalled, "50 ms is a long step, not a stall");
        let c = scrape(Some(&b), ms(100), 2.0, Some(10.0));
        assert!(c.stalled);
        // A step: over at once.
        let d = scrape(Some(&c), ms(150), 2.0, Some(14.0));
        assert!(d.stalled_since.is_none() && !d.stalled);
        // Idle is no stall, nor is the first busy scrape after it.
        let e = scrape(Some(&d), ms(200), 0.0, Some(14.0));
        let f = scrape(Some(&e), ms(400), 1.0, Some(14.0));
        assert!(!e.stalled && f.stalled_since.is_none());
        let g = scrape(Some(&f), ms(500), 1.0, Some(14.0));
        assert!(g.stalled, "busy 100 ms with no step");
        // No progress count (another engine): never.
        let h = scrape(Some(&g), ms(600), 1.0, None);
        let i = scrape(Some(&h), ms(900), 1.0, None);
        assert!(!h.stalled && !i.stalled);
        // Turned off.
        assert!(!stalled(g.stalled_since, g.at, Duration::ZERO));
    }
}
