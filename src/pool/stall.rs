//! An engine that makes no step while requests run or wait there: reading a LoRA adapter from disk (vLLM reads between steps, holding every request), or stuck.

use std::time::{Duration, Instant};

use inferlane_epp::EndpointMetrics;

use super::state::Scraped;

/// The fixed threshold the first test judges by: at 50 ms scrapes, the third busy scrape
/// with an unchanged progress count.
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

impl Scraped {
    /// Busy without a step for its threshold, as of this scrape.
    pub fn stalled(&self) -> bool {
        stalled(self.stalled_since, self.at, self.stall_after)
    }
}

/// Long steps remembered per server, and for how long: a change of workload (longer prompts
/// gone) stops raising its threshold within two minutes.
const KEEP_GAPS: usize = 32;
const KEEP_FOR: Duration = Duration::from_secs(120);
/// Long steps seen before the threshold follows them: one odd gap does not switch the signal
/// off for a server.
const LEARN_AFTER: usize = 3;
/// Spells no longer than two floors, this many within this window: the server's ordinary
/// steps (decode steps of a large model) outlast a scrape interval. Reads last longer, and
/// come fewer.
const ROUTINE_COUNT: usize = 5;
const ROUTINE_WINDOW: Duration = Duration::from_secs(2);
/// Fewer computed tokens a second than this is no engine step (an adapter read, a stuck
/// engine): a prefill chunk computes thousands a second on any GPU that serves a model.
const MIN_STEP_RATE: f64 = 1000.0;

/// A busy spell without a step that has ended.
#[derive(Debug, Clone, Copy)]
struct Gap {
    at: Instant,
    /// How long the scrapes saw it without a step (what [`stalled`] compares).
    len: Duration,
    /// Tokens computed (prompt tokens not found in the prefix cache, and generated ones) per
    /// second over the spell and the scrape that ended it.
    rate: f64,
}

/// What one endpoint's scrapes have shown of its engine's steps, which its stall threshold
/// rises above: its long compute steps (a prefill of thousands of prompt tokens), told from
/// reads and stuck spells by the tokens computed when the spell ends (a read ends with the
/// prompts queued behind it after hundreds of milliseconds; a long step with as many tokens
/// as the engine computes in that time), and its ordinary steps where they often outlast a
/// scrape.
#[derive(Debug, Default)]
pub struct Steps {
    gaps: std::collections::VecDeque<Gap>,
    /// Prompt tokens served from the prefix cache as of the last scrape before the current
    /// progress count: vLLM counts a step's cache hits when it schedules the step, its
    /// prompt tokens when the prefill ends.
    cached_before: f64,
}

impl Steps {
    /// Learns from a scrape at `at` (`m`) after `prev`: a spell without a step that ends here
    /// is remembered with its rate.
    pub fn observe(&mut self, prev: Option<&Scraped>, m: &EndpointMetrics, at: Instant) {
        let Some(p) = prev else { return };
        let (Some(now), Some(then)) = (m.progress, p.metrics.progress) else {
            return;
        };
        if now == then {
            return;
        }
        let cached = m.cached.unwrap_or(0.0);
        let served =
            cached - std::mem::replace(&mut self.cached_before, p.metrics.cached.unwrap_or(0.0));
        let Some(since) = p.stalled_since.filter(|s| *s <= p.at && *s < at) else {
            return;
        };
        let rate = (now - then - served).max(0.0) / at.duration_since(since).as_secs_f64();
        let len = p.at.duration_since(since);
        tracing::trace!(
            len_ms = len.as_millis() as u64,
            tokens_per_s = rate as u64,
            "a spell without an engine step ended"
        );
        if self.gaps.len() == KEEP_GAPS {
            self.gaps.pop_front();
        }
        self.gaps.push_back(Gap { at, len, rate });
    }

    /// How long this server may be busy without a step before it counts as stalled, as of
    /// `at`: `floor` (0: never), or above its ordinary steps where they often outlast a
    /// scrape, or one floor above the longest of its recent compute steps where it has made
    /// several longer than half a floor more (shorter ones end by the next scrape).
    pub fn threshold(&mut self, floor: Duration, at: Instant) -> Duration {
        while self
            .gaps
            .front()
            .is_some_and(|g| at.saturating_duration_since(g.at) > KEEP_FOR)
        {
            self.gaps.pop_front();
        }
        if floor.is_zero() {
            return floor;
        }
        floor
            .max(self.routine(floor, at))
            .max(self.long_steps(floor))
    }

    /// Above its ordinary steps where those often outlast a scrape (a decode step computes
    /// one token per request, too few to be told from a read by its rate): twice the longest
    /// of them, so no one such step counts.
    fn routine(&self, floor: Duration, at: Instant) -> Duration {
        let recent = self.gaps.iter().filter(|g| {
            at.saturating_duration_since(g.at) <= ROUTINE_WINDOW && g.len <= floor.saturating_mul(2)
        });
        let (count, longest) = count_longest(recent);
        if count < ROUTINE_COUNT {
            return Duration::ZERO;
        }
        longest.saturating_mul(2) + Duration::from_millis(1)
    }

    /// Above its recent long compute steps, where it has made several.
    fn long_steps(&self, floor: Duration) -> Duration {
        // A step computes at about the engine's best rate; a read that ends with the prompts
        // queued behind it computes them in a short step after hundreds of milliseconds.
        let best = self.gaps.iter().map(|g| g.rate).fold(0.0, f64::max);
        if best < MIN_STEP_RATE {
            return Duration::ZERO;
        }
        let long = self
            .gaps
            .iter()
            .filter(|g| g.rate >= best / 2.0 && g.rate >= MIN_STEP_RATE)
            .filter(|g| g.len >= floor + floor / 2);
        let (count, longest) = count_longest(long);
        if count < LEARN_AFTER {
            return Duration::ZERO;
        }
        // Scrapes see a step's length to within one interval: a step as long as the longest
        // may be seen one floor longer.
        longest + floor
    }
}

/// How many spells, and the longest.
fn count_longest<'a>(gaps: impl Iterator<Item = &'a Gap>) -> (usize, Duration) {
    gaps.fold((0, Duration::ZERO), |(n, l), g| (n + 1, l.max(g.len)))
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
            stall_after: STALL_AFTER,
            metrics,
            at,
            in_flight: 0,
        }
    }

    /// A busy server scraped every 50 ms, as the scrape loop does with its threshold.
    struct Server {
        ms: u64,
        t0: Instant,
        progress: f64,
        cached: f64,
        last: Option<Scraped>,
        steps: Steps,
    }

    const FLOOR: Duration = Duration::from_millis(50);

    impl Server {
        fn new() -> Self {
            let mut s = Server {
                ms: 0,
                t0: Instant::now(),
                progress: 0.0,
                cached: 0.0,
                last: None,
                steps: Steps::default(),
            };
            s.scrape();
            s
        }

        /// One scrape; whether it found the server stalled.
        fn scrape(&mut self) -> bool {
            let at = self.t0 + Duration::from_millis(self.ms);
            let metrics = EndpointMetrics {
                running: 2.0,
                progress: Some(self.progress),
                cached: Some(self.cached),
                ..EndpointMetrics::default()
            };
            let prev = self.last.as_ref();
            self.steps.observe(prev, &metrics, at);
            let since = stall_start(prev, &metrics, at);
            let stall_after = self.steps.threshold(FLOOR, at);
            let s = Scraped {
                stalled_since: since,
                stall_after,
                metrics,
                at,
                in_flight: 0,
            };
            let verdict = s.stalled();
            self.last = Some(s);
            self.ms += 50;
            verdict
        }

        /// `len_ms` without a step, then `tokens` counted (`cached` of them from the prefix
        /// cache, counted when scheduled): whether any scrape found it stalled.
        fn spell(&mut self, len_ms: u64, tokens: f64, cached: f64) -> bool {
            self.cached += cached;
            let mut any = false;
            for _ in 0..len_ms / 50 {
                any |= self.scrape();
            }
            self.progress += tokens;
            any |= self.scrape();
            self.stepping(3);
            any
        }

        /// Short steps: progress at each of `n` scrapes.
        fn stepping(&mut self, n: usize) {
            for _ in 0..n {
                self.progress += 8.0;
                self.scrape();
            }
        }

        fn threshold(&mut self) -> Duration {
            let at = self.t0 + Duration::from_millis(self.ms);
            self.steps.threshold(FLOOR, at)
        }
    }

    #[test]
    fn long_prefill_steps_raise_the_threshold_reads_do_not() {
        let mut s = Server::new();
        // Until it has made a few, a long prefill step counts as a stall.
        assert!(s.spell(300, 3000.0, 0.0));
        assert!(s.spell(300, 3000.0, 0.0));
        assert_eq!(s.threshold(), FLOOR);
        assert!(s.spell(300, 3000.0, 0.0));
        let learned = s.threshold();
        assert!(learned > Duration::from_millis(250), "{learned:?}");
        assert!(!s.spell(300, 2800.0, 0.0), "a step like those before");
        // A read (an adapter's prompt after 500 ms) is still a stall, and teaches nothing.
        assert!(s.spell(500, 200.0, 0.0));
        // A long spell whose prompt the prefix cache served computed nothing: no step.
        assert!(s.spell(500, 3000.0, 3000.0));
        // Nor does a read that ends with a long prompt, slower than the usual steps.
        assert!(s.spell(500, 1500.0, 0.0));
        assert_eq!(s.threshold(), learned);
        // Two minutes on, those steps are forgotten.
        s.ms += 121_000;
        assert_eq!(s.threshold(), FLOOR);
    }

    #[test]
    fn ordinary_steps_that_outlast_a_scrape_raise_the_threshold_reads_still_count() {
        let mut s = Server::new();
        // Decode steps of 60-90 ms (16 tokens each): spells of one scrape interval, at first
        // seen stalled for that scrape.
        assert!(s.spell(50, 16.0, 0.0));
        for _ in 0..4 {
            s.spell(50, 16.0, 0.0);
        }
        assert_eq!(s.threshold(), Duration::from_millis(101));
        assert!(!s.spell(50, 16.0, 0.0), "an ordinary step");
        assert!(s.spell(400, 16.0, 0.0), "a read");
        // Two seconds of steps within a scrape each: back at the floor.
        s.stepping(41);
        assert_eq!(s.threshold(), FLOOR);
    }

    #[test]
    fn reads_and_short_steps_leave_the_floor() {
        let mut s = Server::new();
        for _ in 0..10 {
            // Steps of 60-90 ms: seen stalled for one scrape at most, and not learned.
            s.spell(50, 600.0, 0.0);
            assert!(s.spell(400, 200.0, 0.0));
            // Reads that end with the prompts queued behind them (a few thousand tokens a
            // second, more of them than long steps): still reads.
            assert!(s.spell(300, 800.0, 0.0));
            assert!(s.spell(600, 1200.0, 0.0));
        }
        assert_eq!(s.threshold(), FLOOR);
        // Off stays off.
        let at = s.t0 + Duration::from_millis(s.ms);
        assert_eq!(s.steps.threshold(Duration::ZERO, at), Duration::ZERO);
    }

    #[test]
    fn busy_scrapes_without_a_step_are_a_stall_once_long_enough() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let a = scrape(None, ms(0), 2.0, Some(10.0));
        let b = scrape(Some(&a), ms(50), 2.0, Some(10.0));
        assert_eq!(b.stalled_since, Some(ms(0)));
        assert!(!b.stalled(), "50 ms is a long step, not a stall");
        let c = scrape(Some(&b), ms(100), 2.0, Some(10.0));
        assert!(c.stalled());
        // A step: over at once.
        let d = scrape(Some(&c), ms(150), 2.0, Some(14.0));
        assert!(d.stalled_since.is_none() && !d.stalled());
        // Idle is no stall, nor is the first busy scrape after it.
        let e = scrape(Some(&d), ms(200), 0.0, Some(14.0));
        let f = scrape(Some(&e), ms(400), 1.0, Some(14.0));
        assert!(!e.stalled() && f.stalled_since.is_none());
        let g = scrape(Some(&f), ms(500), 1.0, Some(14.0));
        assert!(g.stalled(), "busy 100 ms with no step");
        // No progress count (another engine): never.
        let h = scrape(Some(&g), ms(600), 1.0, None);
        let i = scrape(Some(&h), ms(900), 1.0, None);
        assert!(!h.stalled() && !i.stalled());
        // Turned off.
        assert!(!stalled(g.stalled_since, g.at, Duration::ZERO));
    }
}
