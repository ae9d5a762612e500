//! One actor per endpoint: owns the endpoint's scrape loop (`/metrics` often, `/v1/models` less often).
//!
//! The loop itself runs as one long-lived task on a scrape thread (a single-threaded tokio
//! runtime of its own), next to its kept-alive connection, and writes results straight into
//! the endpoint's handle: a scrape costs no actor message and no cross-thread hop, and the
//! 2,000 wake-ups a second of 100 endpoints at 50 ms never park or unpark the request path's
//! worker pool. The actor owns the task's lifetime.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use inferlane_epp::metrics::{FamilySet, MetricsError, Page, parse_page};
use inferlane_sidecar::models::parse_models;
use tokio::task::JoinHandle;

use crate::net::scrape_http::{ScrapeClient, ScrapeError};
use crate::pool::stall::{Steps, stall_start};
use crate::pool::state::{EndpointHandle, Scraped, ServedModels, adapter_key, clock_ms};
use inferlane_epp::outlier::OutlierPolicy;

/// Scrape settings.
#[derive(Debug, Clone)]
pub struct ScrapeOptions {
    pub metrics_interval: Duration,
    pub models_interval: Duration,
    pub timeout: Duration,
    /// Ask for the families routing reads only (`name[]` filter), checked against whole pages.
    pub name_filter: bool,
    /// Where the scrape loops run.
    pub threads: Arc<ScrapeThreads>,
    /// How many endpoints' scrapes are timing out, fleet-wide.
    pub fleet: Arc<FleetScrapes>,
    /// Busy without an engine step this long counts as stalled (0: never); a server's own
    /// long compute steps raise its threshold (pool/stall.rs).
    pub stall_after: Duration,
}

/// Fleet-wide scrape health, shared by the scrape loops: a scrape that times out where most
/// of the fleet answers means that endpoint is stuck; when most of the fleet times out at
/// once, the EPP or the network is slow, and evicting every endpoint would turn a slowdown
/// into 503s for all (stale metrics already count an endpoint saturated instead).
#[derive(Debug, Default)]
pub struct FleetScrapes {
    loops: std::sync::atomic::AtomicUsize,
    timing_out: std::sync::atomic::AtomicUsize,
    /// Failed scrapes, for the EPP's metrics page.
    errors: prometheus_client::metrics::counter::Counter,
}

impl FleetScrapes {
    /// Fleet state that counts failed scrapes into `errors`.
    pub fn counting_errors(errors: prometheus_client::metrics::counter::Counter) -> Self {
        Self {
            errors,
            ..Default::default()
        }
    }

    /// Whether an endpoint timing out may be evicted: at most half the fleet times out (one
    /// of two is evicted; a lone server, or most of a fleet, is kept).
    fn may_evict_slow(&self) -> bool {
        self.timing_out.load(Ordering::Relaxed) * 2 <= self.loops.load(Ordering::Relaxed)
    }
}

/// Consecutive timed-out scrapes before an endpoint is taken out (while at most half the
/// fleet times out).
const EVICT_AFTER_TIMEOUTS: u32 = 3;

/// Dedicated OS threads, each running a single-threaded tokio runtime, that host the scrape
/// loops. Dropping the last reference stops them (their loops are dropped with them).
#[derive(Debug)]
pub struct ScrapeThreads {
    handles: Vec<tokio::runtime::Handle>,
    next: AtomicUsize,
    _stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl ScrapeThreads {
    /// Starts `n` (at least one) scrape threads.
    pub fn start(n: usize) -> std::io::Result<Self> {
        let mut handles = Vec::new();
        let mut stops = Vec::new();
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            stops.push(stop);
            std::thread::Builder::new()
                .name(format!("scrape-{i}"))
                .spawn(move || {
                    // Either a send or the sender's drop ends the thread.
                    let _ = rt.block_on(stopped);
                })?;
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
            _stop: stops,
        })
    }

    /// The runtime for the next scrape loop (round-robin over the threads).
    fn next(&self) -> &tokio::runtime::Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.handles[i % self.handles.len()]
    }
}

/// Why a scrape gave nothing usable.
#[derive(Debug, thiserror::Error)]
enum Fetch {
    #[error(transparent)]
    Http(ScrapeError),
    #[error(transparent)]
    Parse(MetricsError),
}

/// Command: stop scraping (the endpoint left the pool).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopScraping;

/// Owns one endpoint's scrape loop.
pub struct Scraper {
    handle: Arc<EndpointHandle>,
    opts: ScrapeOptions,
    task: Option<JoinHandle<()>>,
}

impl Scraper {
    pub fn new(handle: Arc<EndpointHandle>, opts: ScrapeOptions) -> Self {
        Self {
            handle,
            opts,
            task: None,
        }
    }
}

/// One GET of `path`, parsed with the endpoint's engine mapping.
async fn fetch(
    client: &mut ScrapeClient,
    path: &str,
    handle: &EndpointHandle,
    opts: &ScrapeOptions,
) -> Result<Page, Fetch> {
    let body = client.get(path, opts.timeout).await.map_err(Fetch::Http)?;
    parse_page(handle.engine, body).map_err(Fetch::Parse)
}

/// How often a filtered scrape is checked against a whole page.
const FILTER_CHECK_EVERY: Duration = Duration::from_secs(60);
/// How long an endpoint whose server broke the filter is read whole before trying again.
const FILTER_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Whether an endpoint is scraped with the `name[]` filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NameFilter {
    /// Turned off by flag.
    Disabled,
    /// Whole pages until one parses: it says which families the server has.
    Probe,
    /// Filtered scrapes must carry every family the last whole page had.
    On {
        expect: FamilySet,
        check_at: Instant,
    },
    /// The server ignored or broke the filter: whole pages until `retry_at`.
    Off { retry_at: Instant },
}

/// The scrape loop of one endpoint.
struct ScrapeLoop {
    handle: Arc<EndpointHandle>,
    opts: ScrapeOptions,
    metrics: ScrapeClient,
    models: ScrapeClient,
    last_models: Option<Instant>,
    failures: u32,
    /// Consecutive scrapes that timed out (counted in `opts.fleet` while above zero).
    timeouts: u32,
    filter: NameFilter,
    filtered_path: String,
    /// `/health` answered 404 (the engine has none): not asked again before this.
    health_unsupported_until: Option<Instant>,
    /// When an ejected endpoint's ejection counter was last forgiven.
    last_forgive: Instant,
    /// What its scrapes have shown of its engine's steps.
    steps: Steps,
}

/// How long a clean spell lasts before an endpoint's next ejection starts short again.
const FORGIVE_AFTER: Duration = Duration::from_secs(60);
/// How long an engine without `/health` is not asked again.
const HEALTH_UNSUPPORTED_RETRY: Duration = Duration::from_secs(300);

impl Drop for ScrapeLoop {
    fn drop(&mut self) {
        self.opts.fleet.loops.fetch_sub(1, Ordering::Relaxed);
        if self.timeouts > 0 {
            self.opts.fleet.timing_out.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl ScrapeLoop {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.opts.metrics_interval);
        // A slow scrape delays the next one instead of causing a burst.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.scrape_metrics().await;
            let due = self
                .last_models
                .is_none_or(|t| t.elapsed() >= self.opts.models_interval)
                || self.handle.models_stale.swap(false, Ordering::Relaxed);
            if due {
                self.last_models = Some(Instant::now());
                self.scrape_models().await;
                self.check_engine().await;
            }
            self.passive_recovery().await;
        }
    }

    /// Asks the engine's `/health` (vLLM, SGLang and TensorRT-LLM serve it): a 5xx means the
    /// engine is down even while `/metrics` still answers (vLLM after its engine died).
    /// Returns whether it answered 200 (`None`: no answer, or the engine has no `/health`).
    async fn probe_health(&mut self) -> Option<bool> {
        if self
            .health_unsupported_until
            .is_some_and(|t| Instant::now() < t)
        {
            return None;
        }
        match self.models.get("/health", self.opts.timeout).await {
            Ok(_) => Some(true),
            Err(ScrapeError::Status { status, .. }) if status >= 500 => Some(false),
            Err(ScrapeError::Status { status, .. }) => {
                tracing::debug!(endpoint = %self.handle.address, status, "no /health on this engine; relying on scrapes and answers");
                self.health_unsupported_until = Some(Instant::now() + HEALTH_UNSUPPORTED_RETRY);
                None
            }
            Err(_) => None,
        }
    }

    /// The periodic engine check: marks the engine down or up from `/health`.
    async fn check_engine(&mut self) {
        let Some(up) = self.probe_health().await else {
            return;
        };
        let h = &self.handle;
        let was_down = h.engine_down.swap(!up, Ordering::Relaxed);
        if was_down && up {
            h.forget_sent_adapters();
            tracing::info!(endpoint = %h.address, "engine /health is good again; back in the pool");
        } else if !was_down && !up {
            tracing::warn!(endpoint = %h.address, "engine /health answers 5xx; taken out of the pool until it recovers");
        }
    }

    /// An endpoint ejected for failing answers comes back once its ejection time is over and
    /// it passes a scrape and `/health`; otherwise it stays out for longer.
    async fn passive_recovery(&mut self) {
        let h = self.handle.clone();
        let now = clock_ms();
        if !h.outlier.due_for_check(now) {
            if self.last_forgive.elapsed() >= FORGIVE_AFTER {
                self.last_forgive = Instant::now();
                h.outlier.forgive();
            }
            return;
        }
        let scraped = h.healthy.load(Ordering::Relaxed);
        let health = self.probe_health().await;
        if scraped && health != Some(false) {
            if h.outlier.reinstate() {
                tracing::info!(endpoint = %h.address, "endpoint answers its scrape and /health again; back in the pool");
            }
            h.engine_down.store(false, Ordering::Relaxed);
            self.last_forgive = Instant::now();
        } else {
            h.outlier.extend(&OutlierPolicy::default(), now);
        }
    }

    /// Scrapes `/metrics`, filtered when the server is known to honour the filter, and keeps
    /// the filter state: a filtered answer missing a family the last whole page had (or
    /// refused, or unreadable) is retried whole at once and the filter is set aside.
    async fn fetch_metrics(&mut self) -> Result<Page, Fetch> {
        let now = Instant::now();
        if let NameFilter::On { expect, check_at } = self.filter
            && now < check_at
        {
            let res = fetch(
                &mut self.metrics,
                &self.filtered_path,
                &self.handle,
                &self.opts,
            )
            .await;
            let reason = match &res {
                Ok(page) if page.families.contains(expect) => return res,
                // The server did not answer: nothing learnt about the filter.
                Err(Fetch::Http(e)) if !e.answered() => return res,
                Ok(page) => format!(
                    "the filtered page carried {} of the {} families the whole page has",
                    page.families.len(),
                    expect.len()
                ),
                Err(e) => e.to_string(),
            };
            tracing::info!(endpoint = %self.handle.address, %reason, retry_in = ?FILTER_RETRY_AFTER,
                "model server does not honour the metrics name[] filter; reading its whole page");
            self.filter = NameFilter::Off {
                retry_at: now + FILTER_RETRY_AFTER,
            };
        }
        let res = fetch(&mut self.metrics, "/metrics", &self.handle, &self.opts).await;
        if let Ok(page) = &res {
            self.filter = match self.filter {
                NameFilter::Disabled => NameFilter::Disabled,
                NameFilter::Off { retry_at } if now < retry_at => self.filter,
                _ => NameFilter::On {
                    expect: page.families,
                    check_at: now + FILTER_CHECK_EVERY,
                },
            };
        }
        res
    }

    async fn scrape_metrics(&mut self) {
        let res = self.fetch_metrics().await;
        let h = &self.handle;
        match res {
            Ok(page) => {
                let at = Instant::now();
                let prev = h.scraped.load();
                self.steps.observe(prev.as_deref(), &page.metrics, at);
                let stalled_since = stall_start(prev.as_deref(), &page.metrics, at);
                let stall_after = self.steps.threshold(self.opts.stall_after, at);
                if prev.as_ref().is_some_and(|p| p.stall_after != stall_after) {
                    tracing::debug!(endpoint = %h.address, stall_after_ms = stall_after.as_millis() as u64, "stall threshold follows the server's long steps");
                }
                h.scraped.store(Some(Arc::new(Scraped {
                    metrics: page.metrics,
                    at,
                    in_flight: h.in_flight.load(Ordering::Relaxed),
                    stalled_since,
                    stall_after,
                })));
                h.dispatched_since_scrape.store(0, Ordering::Relaxed);
                if !h.healthy.swap(true, Ordering::Relaxed) {
                    h.forget_sent_adapters();
                    tracing::info!(endpoint = %h.address, after_failures = self.failures, "endpoint healthy again; back in the pool");
                }
                self.failures = 0;
                if self.timeouts > 0 {
                    self.timeouts = 0;
                    self.opts.fleet.timing_out.fetch_sub(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                self.failures += 1;
                self.opts.fleet.errors.inc();
                let timed_out = matches!(e, Fetch::Http(ScrapeError::Timeout(_)));
                if timed_out {
                    if self.timeouts == 0 {
                        self.opts.fleet.timing_out.fetch_add(1, Ordering::Relaxed);
                    }
                    self.timeouts += 1;
                } else if self.timeouts > 0 {
                    self.timeouts = 0;
                    self.opts.fleet.timing_out.fetch_sub(1, Ordering::Relaxed);
                }
                // A refused connection or a bad answer evicts at once; a slow one only when it
                // keeps timing out while at most half the fleet does.
                let evict = !timed_out
                    || (self.timeouts >= EVICT_AFTER_TIMEOUTS && self.opts.fleet.may_evict_slow());
                if evict && h.healthy.swap(false, Ordering::Relaxed) {
                    tracing::warn!(endpoint = %h.address, error = %e, "scrape failed; endpoint taken out of the pool until it answers");
                } else if !evict && self.timeouts == 1 {
                    tracing::debug!(endpoint = %h.address, error = %e, "scrape timed out; kept (its stale metrics count as saturated)");
                }
            }
        }
    }

    async fn scrape_models(&mut self) {
        let began = Instant::now();
        let res = match self.models.get("/v1/models", self.opts.timeout).await {
            Ok(body) => parse_models(body).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match res {
            Ok(actual) => {
                let adapters: HashSet<String> = actual.adapters.into_keys().collect();
                // A load reads the adapter into the server's cache: what the EPP guesses
                // it holds (where it does not report residency) counts it.
                let before = self.handle.models.load();
                for a in &adapters {
                    if before.as_ref().is_none_or(|m| !m.adapters.contains(a)) {
                        self.handle.sent_adapter(adapter_key(a));
                    }
                }
                self.handle.models.store(Some(Arc::new(ServedModels {
                    base: actual.base_models.into_iter().collect(),
                    adapters,
                    read_at: Some(began),
                })))
            }
            Err(e) => {
                tracing::debug!(endpoint = %self.handle.address, error = %e, "model list failed")
            }
        }
    }
}

impl Actor for Scraper {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Context<Self>) {
        self.opts.fleet.loops.fetch_add(1, Ordering::Relaxed);
        let lp = ScrapeLoop {
            handle: self.handle.clone(),
            opts: self.opts.clone(),
            metrics: ScrapeClient::new(self.handle.address.clone()),
            models: ScrapeClient::new(self.handle.address.clone()),
            last_models: None,
            failures: 0,
            timeouts: 0,
            filter: if self.opts.name_filter {
                NameFilter::Probe
            } else {
                NameFilter::Disabled
            },
            health_unsupported_until: None,
            last_forgive: Instant::now(),
            steps: Steps::default(),
            filtered_path: format!(
                "/metrics?{}",
                inferlane_epp::metrics::filter_query(self.handle.engine)
            ),
        };
        self.task = Some(self.opts.threads.next().spawn(lp.run()));
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Handler<StopScraping> for Scraper {
    type Result = ();

    fn handle(&mut self, _: StopScraping, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_endpoints_are_evicted_only_while_at_most_half_the_fleet_is_slow() {
        let f = |loops: usize, timing_out: usize| {
            let s = FleetScrapes::default();
            s.loops.store(loops, Ordering::Relaxed);
            s.timing_out.store(timing_out, Ordering::Relaxed);
            s.may_evict_slow()
        };
        assert!(f(2, 1), "one stuck server of two");
        assert!(f(3, 1));
        assert!(!f(3, 2), "most of the fleet is slow");
        assert!(!f(3, 3));
        assert!(!f(1, 1), "a lone server is kept");
    }
}
