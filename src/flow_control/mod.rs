//! Flow control's I/O shell: requests held in the pure queues (`inferlane_epp::flow`) until a dispatcher task finds room in the pool.
//!
//! A request that finds the queues empty and the pool below saturation passes at once (no
//! lock, no task hop). Otherwise it is queued and its ext_proc handler awaits a verdict: the
//! handler is a future polled by hyper's per-stream task, so a held request costs memory
//! only. The dispatcher wakes when a request finishes (room on a server), on every enqueue and
//! every [`TICK`] while anything is held (scrapes change saturation, TTLs expire), and
//! releases requests by strict priority and the bands' fairness while the pool stays below
//! saturation, counting each released-but-not-yet-picked request as load (`reserved`) so a
//! burst of completions does not over-release. When Envoy resets a held request's stream,
//! hyper drops the handler and with it the [`Held`] guard, which takes the item out at once.

mod inner;
mod labels;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use inferlane_epp::flow::{EnqueueError, FlowQueues, Item, ItemId};
use inferlane_epp::scheduler::{Candidate, ModelPresence, dispatch_saturation};
use tokio::sync::oneshot;

use crate::memory::{Charge, HELD_COST, OverBudget};
use crate::pool::config::FlowSettings;
use crate::pool::labels::for_log;
use crate::pool::metrics::{
    EppMetrics, FlowEnqueueLabels, FlowOutcomeLabels, FlowQueueLabels, InferencePoolLabels,
};
use crate::pool::state::Shared;
use inner::{Inner, Verdict, Waiter};

/// How often the dispatcher re-reads saturation and sweeps TTLs while requests are held.
pub const TICK: Duration = Duration::from_millis(10);
/// Header naming a request's fairness flow (upstream's).
pub const FAIRNESS_HEADER: &str = "x-gateway-inference-fairness-id";
/// Flow of requests without the header (upstream's).
pub const DEFAULT_FLOW: &str = "default-flow";
/// Longest fairness id accepted (a longer header is refused with 400).
pub const MAX_FAIRNESS_ID_BYTES: usize = 256;

/// What a client is told when its band or the pool is full.
fn capacity_message(e: EnqueueError) -> String {
    match e {
        EnqueueError::BandFull(p) => format!(
            "flow control: priority band {p} is full (flowControl.priorityBands[].maxRequests/maxBytes)"
        ),
        EnqueueError::PoolFull => {
            "flow control: the queues are full (flowControl.maxRequests/maxBytes)".into()
        }
        EnqueueError::Duplicate(_) => "flow control: duplicate request id".into(),
    }
}

/// Why a held request was not dispatched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowReject {
    #[error("{0}; retry later")]
    Capacity(String),
    #[error(
        "the request waited {0:?} in flow control (defaultRequestTTL) without room in the pool"
    )]
    Expired(Duration),
    #[error("the pool is saturated; sheddable request dropped")]
    Shed,
    /// The memory budget's held share is full (its text says so, and to retry).
    #[error("{0}")]
    Memory(OverBudget),
    #[error(
        "flow control: the queues were full and a higher-priority request took this one's place; retry later"
    )]
    Displaced,
}

impl FlowReject {
    /// The HTTP status and error type the client gets (upstream's codes).
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            FlowReject::Capacity(_)
            | FlowReject::Shed
            | FlowReject::Displaced
            | FlowReject::Memory(_) => (429, "TooManyRequests"),
            FlowReject::Expired(_) => (503, "ServiceUnavailable"),
        }
    }
}

/// One request as flow control sees it.
#[derive(Debug, Clone)]
pub struct FlowRequest {
    pub fairness_id: String,
    pub priority: i32,
    pub bytes: u64,
    pub prompt_tokens: f64,
    pub model_label: String,
    pub target_label: String,
}

/// Why a request could not be held.
enum HoldError {
    Queue(EnqueueError),
    Memory(OverBudget),
}

/// The flow-control layer of one EPP.
pub struct FlowControl {
    settings: FlowSettings,
    inner: Mutex<Inner>,
    /// Items held (mirrors the queues, read without the lock on the fast path).
    queued: AtomicUsize,
    /// Released by the dispatcher, not yet picked: counted as load.
    reserved: AtomicU64,
    next_id: AtomicU64,
    epoch: Instant,
    shared: Arc<Shared>,
    metrics: EppMetrics,
    pool: String,
    flow_labels: Mutex<labels::LabelSlots>,
    /// Some band has an over-share ceiling: only then are requests in flight counted per
    /// flow (a lock per request start and end); otherwise the fast path takes no lock.
    track_shares: bool,
}

/// A request allowed through: picking it releases its reservation ([`Pass::picked`]), as
/// does dropping it unpicked (its stream went away or the pick failed).
pub struct Pass {
    fc: Arc<FlowControl>,
    /// Released by the dispatcher and not picked yet (counted as load until then).
    reserved: bool,
    priority: i32,
    fairness_id: String,
    prompt_estimate: f64,
}

impl Pass {
    /// The request has been given an endpoint (its in-flight count now carries its load).
    pub fn picked(&mut self) {
        if std::mem::take(&mut self.reserved) {
            self.fc.release_reservation();
        }
    }

    /// Charges the request's flow what it really cost (VTC): the prompt tokens the server
    /// reported less the estimate charged at dispatch, plus its output tokens.
    pub fn charge_usage(&self, prompt: u64, completion: u64) {
        let mut inner = self.fc.lock();
        let (wi, wo) = {
            let c = inner.queues.config();
            (c.vtc_input_weight, c.vtc_output_weight)
        };
        let amount = (prompt as f64 - self.prompt_estimate) * wi + completion as f64 * wo;
        inner
            .queues
            .charge(self.priority, &self.fairness_id, amount);
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.picked();
        if self.fc.track_shares {
            self.fc
                .inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .finished(self.priority, &self.fairness_id);
        }
    }
}

/// Takes a held item out if its request goes away before a verdict.
struct Held {
    fc: Arc<FlowControl>,
    id: ItemId,
    priority: i32,
    flow: String,
    rx: Option<oneshot::Receiver<Verdict>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        let mut inner = self.fc.lock();
        if let Some(item) = inner.queues.remove(self.id) {
            self.fc.queued.store(inner.queues.len(), Ordering::Relaxed);
            if let Some(w) = inner.waiting.remove(&self.id) {
                drop(inner);
                self.fc.finish(&w, "EvictedContextCancelled");
                tracing::debug!(fairness_id = %for_log(&item.flow), "held request cancelled by the client");
            }
            return;
        }
        // Released (or expired) after the stream went away but before it read the verdict.
        if let Ok(Verdict::Dispatched) = rx.try_recv() {
            if self.fc.track_shares {
                inner.finished(self.priority, &self.flow);
            }
            drop(inner);
            self.fc.release_reservation();
        }
    }
}

impl FlowControl {
    /// The layer, and its dispatcher task (spawned on the current runtime; it ends when the
    /// layer is dropped).
    pub fn start(
        settings: FlowSettings,
        shared: Arc<Shared>,
        metrics: EppMetrics,
        pool: String,
    ) -> Arc<Self> {
        let track_shares = {
            let q = &settings.queues;
            std::iter::once(&q.default_band)
                .chain(&q.bands)
                .any(|b| b.over_share_usage_limit < b.usage_limit)
        };
        let fc = Arc::new(Self {
            inner: Mutex::new(Inner {
                queues: FlowQueues::new(settings.queues.clone()),
                waiting: HashMap::new(),
                in_flight: HashMap::new(),
            }),
            settings,
            queued: AtomicUsize::new(0),
            reserved: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            epoch: Instant::now(),
            shared,
            metrics,
            pool,
            flow_labels: Mutex::new(labels::LabelSlots::new(labels::FLOW_LABEL_IDLE)),
            track_shares,
        });
        let weak = Arc::downgrade(&fc);
        let wake = fc.shared.room_freed.clone();
        tokio::spawn(async move {
            loop {
                let Some(fc) = weak.upgrade() else { return };
                let busy = fc.queued.load(Ordering::Relaxed) > 0;
                drop(fc);
                let idle = if busy { TICK } else { Duration::from_secs(1) };
                let _ = tokio::time::timeout(idle, wake.notified()).await;
                let Some(fc) = weak.upgrade() else { return };
                fc.dispatch_cycle();
            }
        });
        fc
    }

    /// A priority band's saturation ceilings: for its flows, and for a flow over its share.
    fn usage_limits(&self, priority: i32) -> (f64, f64) {
        let q = &self.settings.queues;
        let b = q
            .bands
            .iter()
            .find(|b| b.priority == priority)
            .unwrap_or(&q.default_band);
        (b.usage_limit, b.over_share_usage_limit)
    }

    /// A request finished (a server has room): wake the dispatcher if anything waits for it.
    pub fn room_freed(&self) {
        if self.queued.load(Ordering::Relaxed) > 0 {
            self.shared.room_freed.notify_one();
        }
    }

    /// One released request no longer counts as load (picked, or never to be).
    fn unreserve(&self) {
        let _ = self
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1));
    }

    fn release_reservation(&self) {
        self.unreserve();
        self.shared.room_freed.notify_one();
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The metric label of a fairness id: itself while it has one of the label slots
    /// ([`labels::FLOW_LABELS_MAX`], handed on when an id goes idle), else `other`.
    fn flow_label(&self, id: &str) -> String {
        self.label_slots().label(id, &self.metrics)
    }

    fn label_slots(&self) -> std::sync::MutexGuard<'_, labels::LabelSlots> {
        self.flow_labels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The pool's saturation now, counting released-but-unpicked requests.
    pub fn saturation(&self) -> f64 {
        let snap = self.shared.snapshot.load();
        let cfg = self.shared.scheduler.load();
        let now = Instant::now();
        let scraped: Vec<_> = snap
            .endpoints
            .iter()
            .map(|h| h.scraped.load_full())
            .collect();
        let candidates: Vec<Candidate<'_>> = snap
            .endpoints
            .iter()
            .zip(&scraped)
            .map(|(h, s)| h.candidate(s, now, ModelPresence::Yes, None, 0))
            .collect();
        dispatch_saturation(&cfg, &candidates, self.reserved.load(Ordering::Acquire))
    }

    /// Admits a request: at once when nothing is held and the pool has room, else after
    /// waiting its turn, its `charge` grown by what holding it costs (within the memory
    /// budget's held share). An error is the answer the client gets.
    pub async fn admit(
        self: &Arc<Self>,
        req: FlowRequest,
        charge: &mut Charge,
    ) -> Result<Pass, FlowReject> {
        if self.queued.load(Ordering::Relaxed) == 0 && self.room_now(&req) {
            return Ok(self.pass(&req, false));
        }
        if self.settings.shed_sheddable && req.priority < 0 {
            return Err(FlowReject::Shed);
        }
        let (id, rx) = self.enqueue(&req, charge)?;
        self.shared.room_freed.notify_one();
        let mut held = Held {
            fc: self.clone(),
            id,
            priority: req.priority,
            flow: req.fairness_id.clone(),
            rx: Some(rx),
        };
        // Dropped while waiting (the client went away): `Held` takes it out of the queue.
        let verdict = match held.rx.as_mut() {
            Some(rx) => rx.await,
            None => Ok(Verdict::Expired),
        };
        held.rx = None;
        match verdict {
            Ok(Verdict::Dispatched) => Ok(self.pass(&req, true)),
            Ok(Verdict::Displaced) => Err(FlowReject::Displaced),
            Ok(Verdict::Expired) | Err(_) => Err(FlowReject::Expired(
                self.settings.default_ttl.unwrap_or_default(),
            )),
        }
    }

    fn pass(self: &Arc<Self>, req: &FlowRequest, reserved: bool) -> Pass {
        Pass {
            fc: self.clone(),
            reserved,
            priority: req.priority,
            fairness_id: req.fairness_id.clone(),
            prompt_estimate: req.prompt_tokens,
        }
    }

    /// The fast path (nothing held): the pool is below the band's usage limit, and the flow
    /// is not over its share while above the over-share ceiling.
    fn room_now(&self, req: &FlowRequest) -> bool {
        let (limit, over) = self.usage_limits(req.priority);
        let saturation = self.saturation();
        if saturation >= limit {
            return false;
        }
        if !self.track_shares {
            return true;
        }
        let mut inner = self.lock();
        if saturation < over || !inner.over_share(req.priority, &req.fairness_id) {
            inner.started(req.priority, &req.fairness_id);
            return true;
        }
        false
    }

    /// Queues the request in its band and flow; the receiver gets its verdict. A full band,
    /// pool or memory budget is the client's 429.
    fn enqueue(
        &self,
        req: &FlowRequest,
        charge: &mut Charge,
    ) -> Result<(ItemId, oneshot::Receiver<Verdict>), FlowReject> {
        let started = Instant::now();
        let now = self.now_ms();
        let ttl = self.settings.default_ttl;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let item = Item {
            id,
            flow: req.fairness_id.clone(),
            priority: req.priority,
            bytes: req.bytes,
            prompt_tokens: req.prompt_tokens,
            arrival_ms: now,
            deadline_ms: ttl.map_or(u64::MAX, |t| now.saturating_add(t.as_millis() as u64)),
        };
        let (tx, rx) = oneshot::channel();
        let labels = FlowQueueLabels {
            fairness_id: self.flow_label(&req.fairness_id),
            priority: req.priority.to_string(),
            inference_pool: self.pool.clone(),
            model_name: req.model_label.clone(),
            target_model_name: req.target_label.clone(),
        };
        let outcome = {
            let mut inner = self.lock();
            let r = self.hold(&mut inner, item, charge);
            if r.is_ok() {
                let waiter = Waiter {
                    tx,
                    labels: labels.clone(),
                    bytes: req.bytes,
                    since: started,
                };
                inner.waiting.insert(id, waiter);
                self.label_slots().held(&labels);
                self.queued.store(inner.queues.len(), Ordering::Relaxed);
                self.metrics.flow_queue_size.get_or_create(&labels).inc();
                self.metrics
                    .flow_queue_bytes
                    .get_or_create(&labels)
                    .inc_by(req.bytes as i64);
            }
            r
        };
        self.metrics
            .flow_enqueue_duration
            .get_or_create(&FlowEnqueueLabels {
                fairness_id: labels.fairness_id.clone(),
                priority: labels.priority.clone(),
                outcome: if outcome.is_ok() {
                    "Queued"
                } else {
                    "RejectedCapacity"
                }
                .into(),
            })
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => Ok((id, rx)),
            Err(e) => {
                self.observe_outcome(&labels, "RejectedCapacity", Duration::ZERO);
                Err(match e {
                    HoldError::Queue(e) => FlowReject::Capacity(capacity_message(e)),
                    HoldError::Memory(e) => FlowReject::Memory(e),
                })
            }
        }
    }

    /// Queues `item`, its charge grown by [`HELD_COST`]. When the queues or the memory
    /// budget's held share are full, the lowest-priority held request below it gives way (a
    /// Critical arrival is never refused for sheddable work already held); its memory comes
    /// back as its stream ends.
    fn hold(&self, inner: &mut Inner, item: Item, charge: &mut Charge) -> Result<(), HoldError> {
        let memory = charge.grow_held(HELD_COST);
        let first = match memory {
            Ok(()) => inner.queues.enqueue(item.clone()).map_err(HoldError::Queue),
            Err(e) => Err(HoldError::Memory(e)),
        };
        let full = matches!(
            first,
            Err(HoldError::Memory(_) | HoldError::Queue(EnqueueError::PoolFull))
        );
        if !full {
            return first;
        }
        let Some(victim) = inner.queues.displace(item.priority) else {
            return first;
        };
        if let Some(w) = inner.waiting.remove(&victim.id) {
            self.finish(&w, "EvictedOther");
            let _ = w.tx.send(Verdict::Displaced);
            tracing::debug!(fairness_id = %for_log(&victim.flow), priority = victim.priority, "held request displaced by a higher-priority one");
        }
        if memory.is_err() {
            charge.force(HELD_COST);
        }
        inner.queues.enqueue(item).map_err(HoldError::Queue)
    }

    /// The flow-control state, locked. A poisoned lock is taken as it is: a panic exits the
    /// process (runtime.rs), and the request path must not panic.
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn observe_outcome(&self, l: &FlowQueueLabels, outcome: &str, waited: Duration) {
        self.metrics
            .flow_queue_duration
            .get_or_create(&FlowOutcomeLabels {
                fairness_id: l.fairness_id.clone(),
                priority: l.priority.clone(),
                outcome: outcome.into(),
                inference_pool: l.inference_pool.clone(),
                model_name: l.model_name.clone(),
                target_model_name: l.target_model_name.clone(),
            })
            .observe(waited.as_secs_f64());
    }

    /// A held item left the queue: gauges down, its outcome observed.
    fn finish(&self, w: &Waiter, outcome: &str) {
        // Outcome first: whoever sees the gauge drop sees the outcome counted.
        self.observe_outcome(&w.labels, outcome, w.since.elapsed());
        self.metrics.flow_queue_size.get_or_create(&w.labels).dec();
        self.metrics
            .flow_queue_bytes
            .get_or_create(&w.labels)
            .dec_by(w.bytes as i64);
        self.label_slots().released(&w.labels);
    }

    /// One dispatch cycle: expire what is past its TTL, then release by priority and
    /// fairness while the pool has room.
    pub fn dispatch_cycle(&self) {
        let started = Instant::now();
        let mut inner = self.lock();
        if inner.queues.is_empty() {
            drop(inner);
            // Only the idle tick gets here in steady state (completions wake the dispatcher
            // only while something is held): keep the gauge current for dashboards.
            self.metrics
                .flow_pool_saturation
                .get_or_create(&InferencePoolLabels {
                    inference_pool: self.pool.clone(),
                })
                .set(self.saturation());
            return;
        }
        let now = self.now_ms();
        for item in inner.queues.expire(now) {
            if let Some(w) = inner.waiting.remove(&item.id) {
                self.finish(&w, "EvictedTTL");
                let _ = w.tx.send(Verdict::Expired);
            }
        }
        let mut saturation = self.saturation();
        // Strict priority: the head band waits while saturation is at its ceiling, and so
        // does everything below it.
        while let Some(item) = inner.next_release(saturation, |p| self.usage_limits(p)) {
            let Some(w) = inner.waiting.remove(&item.id) else {
                continue;
            };
            self.finish(&w, "Dispatched");
            self.reserved.fetch_add(1, Ordering::AcqRel);
            if self.track_shares {
                inner.started(item.priority, &item.flow);
            }
            if w.tx.send(Verdict::Dispatched).is_err() {
                if self.track_shares {
                    inner.finished(item.priority, &item.flow);
                }
                // Its stream is going away: the Held guard finds nothing queued and no
                // verdict to read, so the reservation is ours to return.
                self.unreserve();
            }
            saturation = self.saturation();
        }
        self.queued.store(inner.queues.len(), Ordering::Relaxed);
        drop(inner);
        self.metrics
            .flow_pool_saturation
            .get_or_create(&InferencePoolLabels {
                inference_pool: self.pool.clone(),
            })
            .set(saturation);
        self.metrics
            .flow_dispatch_cycle
            .observe(started.elapsed().as_secs_f64());
    }
}
