//! What the request path reads: an immutable pool snapshot of per-endpoint handles updated in place.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{LazyLock, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use inferlane_epp::lora_cache::AdapterLru;
use inferlane_epp::outlier::{Outlier, OutlierPolicy, Verdict, may_eject};
use inferlane_epp::{
    Candidate, EndpointMetrics, EngineType, ModelPresence, ModelRules, PrefixIndex, SchedulerConfig,
};

/// The process clock passive health keeps its times on, in milliseconds.
pub fn clock_ms() -> u64 {
    static START: LazyLock<Instant> = LazyLock::new(Instant::now);
    u64::try_from(START.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Metrics of one scrape and when it was taken.
#[derive(Debug, Clone)]
pub struct Scraped {
    pub metrics: EndpointMetrics,
    pub at: Instant,
    /// Our requests in flight on it when the scrape landed (see `Candidate::in_flight_at_scrape`).
    pub in_flight: u64,
    /// Since when its engine has been busy without a step (see pool/stall.rs), and how long
    /// that may last before it counts as stalled (`--engine-stall-after`, or above this
    /// server's own long steps): `Scraped::stalled`.
    pub stalled_since: Option<Instant>,
    pub stall_after: Duration,
}

/// Models a server lists in `/v1/models`.
#[derive(Debug, Clone, Default)]
pub struct ServedModels {
    pub base: HashSet<String>,
    pub adapters: HashSet<String>,
    /// When the read that produced this list began (a home placed after it is not known
    /// to be loaded by it).
    pub read_at: Option<Instant>,
}

impl ServedModels {
    pub fn contains(&self, model: &str) -> bool {
        self.base.contains(model) || self.adapters.contains(model)
    }
}

/// One endpoint: identity is fixed, live fields are updated by its scraper in place, so a
/// scrape never rebuilds the pool snapshot.
#[derive(Debug)]
pub struct EndpointHandle {
    pub id: u32,
    /// `ip:port`, as the gateway's ORIGINAL_DST cluster expects it.
    pub address: String,
    /// What prefix placement hashes: its name, else its address.
    pub identity: String,
    /// Rendezvous key of `identity`: the same on every replica.
    pub key: u64,
    pub engine: EngineType,
    pub scraped: ArcSwapOption<Scraped>,
    pub models: ArcSwapOption<ServedModels>,
    /// Its scrapes answer (a refused connection or a broken page clears it).
    pub healthy: AtomicBool,
    /// Its engine says it is down (`/health` answered 5xx) while `/metrics` may still answer,
    /// as vLLM's does after its engine died; cleared by a good `/health`.
    pub engine_down: AtomicBool,
    /// Passive health from the answers it gives our requests.
    pub outlier: Outlier,
    /// Requests we picked it for since its last scrape.
    pub dispatched_since_scrape: AtomicU64,
    /// Requests we picked it for that have not finished.
    pub in_flight: AtomicU64,
    /// Set when a request for a model got 404 here: the model list is re-read at once.
    pub models_stale: AtomicBool,
    /// Our requests sent here that read their adapter from disk and have not answered yet,
    /// and when the last was sent ([`clock_ms`]): while one reads, the engine serves no one.
    reads: AtomicU64,
    read_sent_ms: AtomicU64,
    /// [`adapter_key`] of the adapter the last of them reads (several at once are rare: the
    /// scheduler steers reads apart; a joiner of an earlier one is then seen as reading anew).
    read_key: AtomicU64,
    /// The adapters we sent it, most recent first: what its host cache likely holds when it
    /// does not report residency.
    sent_adapters: Mutex<AdapterLru>,
}

/// The key a read is known by: the adapter's served name, hashed (the same on every call).
pub fn adapter_key(served: &str) -> u64 {
    inferlane_epp::affinity::endpoint_key(served)
}

/// A read counts this long after it was sent at most: a non-streamed answer comes at the
/// request's end, long after the read (vLLM's longest reads are seconds).
pub const READ_HOLD_MAX_MS: u64 = 2_000;

/// One of our requests reading its adapter from disk on an endpoint, until it answers.
#[derive(Debug)]
pub struct Read(Arc<EndpointHandle>);

impl Drop for Read {
    fn drop(&mut self) {
        self.0.reads.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EndpointHandle {
    pub fn new(id: u32, address: String, engine: EngineType, identity: &str) -> Self {
        Self {
            id,
            key: inferlane_epp::affinity::endpoint_key(identity),
            identity: identity.to_string(),
            address,
            engine,
            scraped: ArcSwapOption::empty(),
            models: ArcSwapOption::empty(),
            // Optimistic until the first scrape says otherwise, so a fresh pool is usable.
            healthy: AtomicBool::new(true),
            engine_down: AtomicBool::new(false),
            outlier: Outlier::default(),
            dispatched_since_scrape: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            models_stale: AtomicBool::new(false),
            reads: AtomicU64::new(0),
            read_sent_ms: AtomicU64::new(0),
            read_key: AtomicU64::new(0),
            sent_adapters: Mutex::new(AdapterLru::default()),
        }
    }

    /// A request of ours sent here reads its adapter from disk: the endpoint counts as
    /// reading until the returned guard is dropped (its first answer) or for
    /// [`READ_HOLD_MAX_MS`].
    pub fn begin_read(self: &Arc<Self>, adapter: u64) -> Read {
        self.read_key.store(adapter, Ordering::Relaxed);
        self.read_sent_ms.fetch_max(clock_ms(), Ordering::Relaxed);
        self.reads.fetch_add(1, Ordering::Relaxed);
        Read(self.clone())
    }

    /// An adapter request goes there, or its model list newly lists the adapter (a load
    /// reads it into the cache): its cache now holds it.
    pub fn sent_adapter(&self, adapter: u64) {
        lock_sent(&self.sent_adapters).touch(adapter);
    }

    /// It is back in the pool after its scrapes or its engine failed: it may have restarted,
    /// with an empty cache, so what we sent it before says nothing.
    pub fn forget_sent_adapters(&self) {
        lock_sent(&self.sent_adapters).clear();
    }

    /// Distinct adapters remembered as sent here (`/debug/pool`).
    pub fn sent_adapters_len(&self) -> usize {
        lock_sent(&self.sent_adapters).len()
    }

    /// Whether its cache of `capacity` adapters holds `adapter`, by what we sent it (`None`
    /// without a capacity: no guess).
    fn holds_adapter(&self, adapter: u64, capacity: usize) -> Option<bool> {
        (capacity > 0).then(|| lock_sent(&self.sent_adapters).holds(adapter, capacity))
    }

    /// Its engine is reading an adapter for one of our requests, as far as we know.
    pub fn reading(&self) -> bool {
        self.reading_at(clock_ms())
    }

    /// [`Self::reading`] at `now_ms` ([`clock_ms`]).
    fn reading_at(&self, now_ms: u64) -> bool {
        self.reads.load(Ordering::Relaxed) > 0
            && now_ms.saturating_sub(self.read_sent_ms.load(Ordering::Relaxed)) < READ_HOLD_MAX_MS
    }

    /// Usable for new requests: its scrapes answer, its engine is up and its answers have
    /// not ejected it.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && !self.engine_down.load(Ordering::Relaxed)
            && !self.outlier.is_ejected()
    }

    /// How the picker and the saturation detector see it, from `scraped` (its last scrape,
    /// loaded once by the caller so the metrics borrowed here stay alive) at `now`.
    pub fn candidate<'a>(
        &self,
        scraped: &'a Option<Arc<Scraped>>,
        now: Instant,
        has_model: ModelPresence,
        target: Option<u64>,
        max_cpu_loras: usize,
    ) -> Candidate<'a> {
        let ours = self.reading();
        // A stall is a read we did not cause (another replica's, a sidecar's) or a stuck
        // engine: avoided as our own reads are.
        let reading = ours || scraped.as_ref().is_some_and(|s| s.stalled());
        let capacity = cache_capacity(scraped.as_deref(), max_cpu_loras);
        Candidate {
            id: self.id,
            metrics: scraped.as_ref().map(|s| &s.metrics),
            metrics_age: scraped
                .as_ref()
                .map_or(f64::INFINITY, |s| now.duration_since(s.at).as_secs_f64()),
            healthy: self.is_healthy(),
            has_model,
            dispatched_since_scrape: self.dispatched_since_scrape.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            in_flight_at_scrape: scraped.as_ref().map_or(0, |s| s.in_flight),
            key: self.key,
            reading,
            reading_target: ours
                && target.is_some_and(|t| self.read_key.load(Ordering::Relaxed) == t),
            cached: target.and_then(|t| self.holds_adapter(t, capacity)),
        }
    }
}

/// Adapters a server's host cache holds: `--lora-max-cpu-loras`, else its GPU slots (vLLM's
/// default for `--max-cpu-loras`); 0 when neither is known.
fn cache_capacity(scraped: Option<&Scraped>, max_cpu_loras: usize) -> usize {
    if max_cpu_loras > 0 {
        return max_cpu_loras;
    }
    scraped
        .and_then(|s| s.metrics.max_lora)
        .map_or(0, |m| m as usize)
}

/// A poisoned lock still holds a usable guess (nothing is left half-updated in it).
fn lock_sent(m: &Mutex<AdapterLru>) -> MutexGuard<'_, AdapterLru> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The pool as of the last membership or rules change.
#[derive(Debug, Default)]
pub struct PoolSnapshot {
    pub endpoints: Vec<Arc<EndpointHandle>>,
    pub rules: ModelRules,
    pub generation: u64,
}

/// A prompt prefix unseen this long no longer counts toward its home's share.
const PLACEMENT_WINDOW_S: f64 = 120.0;
/// Active prefixes tracked at most (~40 bytes each): beyond it the oldest leave first.
const PLACEMENT_MAX_KEYS: usize = 16_384;

/// State shared between the actors and the request path.
#[derive(Debug)]
pub struct Shared {
    pub snapshot: ArcSwap<PoolSnapshot>,
    pub scheduler: ArcSwap<SchedulerConfig>,
    /// The only structure the request path writes besides the counters; one short lock per
    /// request.
    pub prefix: Mutex<PrefixIndex>,
    /// Active prompt prefixes and their home endpoints (rendezvous affinity, balanced).
    pub placement: Mutex<inferlane_epp::affinity::Placement>,
    /// The placement's clock.
    pub epoch: std::time::Instant,
    /// Set by the leader elector (only used with --ha-enable-leader-election).
    pub is_leader: Arc<AtomicBool>,
    /// The pool is known and its endpoints have been listed at least once (readiness).
    pub pool_synced: AtomicBool,
    /// Woken when a request finishes (room on a server): flow control's dispatcher waits on it.
    pub room_freed: Arc<tokio::sync::Notify>,
    /// Passive health thresholds.
    pub outlier_policy: OutlierPolicy,
    /// Taken only to eject, so two failing endpoints cannot both pass the pool-wide limit.
    eject_lock: Mutex<()>,
    /// LoRA placement's table and the demand counters (empty without `--lora-catalog`).
    pub fleet: crate::lora_fleet::FleetState,
}

/// The placement, locked. A poisoned lock is taken as it is: a panic exits the process
/// (runtime.rs), so poisoning cannot outlive one, and the request path must not panic.
pub fn lock_placement(
    shared: &Shared,
) -> std::sync::MutexGuard<'_, inferlane_epp::affinity::Placement> {
    shared
        .placement
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The prefix index, locked; poison-tolerant for the same reason as [`lock_placement`].
pub fn lock_prefix(shared: &Shared) -> std::sync::MutexGuard<'_, PrefixIndex> {
    shared
        .prefix
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    pub fn new(scheduler: SchedulerConfig) -> Self {
        let cap = scheduler.prefix_index_capacity;
        let balance = scheduler.prefix_balance_factor;
        Self {
            snapshot: ArcSwap::from_pointee(PoolSnapshot::default()),
            scheduler: ArcSwap::from_pointee(scheduler),
            prefix: Mutex::new(PrefixIndex::new(cap)),
            placement: Mutex::new(inferlane_epp::affinity::Placement::new(
                PLACEMENT_WINDOW_S,
                PLACEMENT_MAX_KEYS,
                balance,
            )),
            epoch: std::time::Instant::now(),
            is_leader: Arc::new(AtomicBool::new(false)),
            pool_synced: AtomicBool::new(false),
            room_freed: Arc::new(tokio::sync::Notify::new()),
            outlier_policy: OutlierPolicy::default(),
            eject_lock: Mutex::new(()),
            fleet: crate::lora_fleet::FleetState::default(),
        }
    }

    /// Passive health: what the endpoint answered one of our requests (its HTTP status, or
    /// 503 for a failed connection). Consecutive 5xx eject it while the pool allows.
    pub fn observe_answer(&self, h: &EndpointHandle, status: u16) {
        if status < 500 {
            h.outlier.success();
            return;
        }
        if h.outlier.failure(&self.outlier_policy) != Verdict::Eject {
            return;
        }
        let _guard: MutexGuard<'_, ()> = self
            .eject_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let snap = self.snapshot.load();
        let ejected = snap
            .endpoints
            .iter()
            .filter(|e| e.outlier.is_ejected())
            .count();
        let usable = snap.endpoints.iter().filter(|e| e.is_healthy()).count();
        if !may_eject(snap.endpoints.len(), ejected, usable) {
            tracing::debug!(endpoint = %h.address, status, "failing answers, but ejecting it would leave too little of the pool");
            return;
        }
        if let Some(ms) = h.outlier.eject(&self.outlier_policy, clock_ms()) {
            tracing::warn!(endpoint = %h.address, status, out_for_ms = ms,
                consecutive = self.outlier_policy.consecutive_failures,
                "endpoint answers with server errors; taken out of the pool until its scrape and /health pass");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_reads_while_a_read_of_ours_has_not_answered() {
        let h = Arc::new(EndpointHandle::new(
            0,
            "10.0.0.1:8000".into(),
            EngineType::Vllm,
            "a",
        ));
        assert!(!h.reading());
        let first = h.begin_read(adapter_key("fr"));
        let second = h.begin_read(adapter_key("de"));
        assert!(h.reading());
        // The candidate a request sees: reading, and whether the read is of its adapter
        // (the last one begun).
        let none = None;
        let c = h.candidate(
            &none,
            Instant::now(),
            ModelPresence::Yes,
            Some(adapter_key("de")),
            0,
        );
        assert!(c.reading && c.reading_target);
        let c = h.candidate(
            &none,
            Instant::now(),
            ModelPresence::Yes,
            Some(adapter_key("fr")),
            0,
        );
        assert!(c.reading && !c.reading_target);
        let c = h.candidate(&none, Instant::now(), ModelPresence::Yes, None, 0);
        assert!(c.reading && !c.reading_target);
        assert_eq!(c.cached, None, "no capacity known: no guess");
        // What we sent it: its cache of two holds the last two.
        for a in ["fr", "de", "it"] {
            h.sent_adapter(adapter_key(a));
        }
        let c = h.candidate(
            &none,
            Instant::now(),
            ModelPresence::Yes,
            Some(adapter_key("it")),
            2,
        );
        assert_eq!(c.cached, Some(true));
        let c = h.candidate(
            &none,
            Instant::now(),
            ModelPresence::Yes,
            Some(adapter_key("fr")),
            2,
        );
        assert_eq!(c.cached, Some(false), "pushed out by two since");
        drop(first);
        assert!(h.reading(), "one read still holds it");
        drop(second);
        assert!(!h.reading());
        // A read never answered (a non-streamed answer comes at the end) stops counting.
        let _stuck = h.begin_read(1);
        let sent = h.read_sent_ms.load(Ordering::Relaxed);
        assert!(h.reading_at(sent + READ_HOLD_MAX_MS - 1));
        assert!(!h.reading_at(sent + READ_HOLD_MAX_MS));
    }
}
