//! Single-flight reconciler: drives vLLM's adapters to the config, with per-adapter backoff.

pub mod metrics;
mod pass;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use arc_swap::ArcSwap;
use backoff::backoff::Backoff;
use inferlane_sidecar::{Actual, AdapterOp, LoraConfig, Outcome};
use tracing::Instrument;

use crate::actors::messages::{ConfigChanged, ReconcileNow, Trigger};
use metrics::{AdapterErrorLabels, AdapterLabels, AdapterOpLabels, ResultLabels, SidecarMetrics};
use pass::{PassReport, RETRIES_PER_PASS, RETRY_PASS_MIN_GAP, run_pass};

pub use pass::{ReconcileError, ReconcilerOptions};

/// What the request path (readiness probe) reads.
#[derive(Debug, Clone, Default)]
pub struct SyncStatus {
    /// Latches once every `ensureExist` adapter has been loaded: readiness gates start-up.
    /// Afterwards a newly added adapter does not take the pod out of rotation (during a rollout
    /// every pod would leave at once); the picker routes by which adapters a server has.
    pub ready: bool,
    /// Every `ensureExist` adapter is loaded right now.
    pub in_sync: bool,
    /// `ensureExist` adapters not (yet) loaded.
    pub missing: Vec<String>,
    /// Adapters currently failing, with their last error.
    pub failing: BTreeMap<String, String>,
    pub generation: u64,
    pub server_healthy: bool,
}

#[derive(Debug)]
struct AdapterRetry {
    source: String,
    failures: u32,
    backoff: backoff::ExponentialBackoff,
    next_attempt: Instant,
    last_error: String,
    /// The metric label of the last error: `<operation> <status>`, never the text.
    last_class: String,
}

/// The reconciler actor.
pub struct Reconciler {
    opts: ReconcilerOptions,
    client: reqwest::Client,
    config: Option<Arc<LoraConfig>>,
    generation: u64,
    running: bool,
    pending: Option<Trigger>,
    retries: HashMap<String, AdapterRetry>,
    retry_timer: Option<SpawnHandle>,
    status: Arc<ArcSwap<SyncStatus>>,
    metrics: SidecarMetrics,
    passes: u64,
    was_healthy: Option<bool>,
    last_actual: Option<Actual>,
    ever_ready: bool,
    /// When the config the server does not match yet arrived (for the sync-duration metric).
    unsynced_since: Option<Instant>,
}

impl Reconciler {
    pub fn new(
        opts: ReconcilerOptions,
        client: reqwest::Client,
        status: Arc<ArcSwap<SyncStatus>>,
        metrics: SidecarMetrics,
    ) -> Self {
        Self {
            opts,
            client,
            config: None,
            generation: 0,
            running: false,
            pending: None,
            retries: HashMap::new(),
            retry_timer: None,
            status,
            metrics,
            passes: 0,
            was_healthy: None,
            last_actual: None,
            ever_ready: false,
            unsynced_since: None,
        }
    }

    fn new_backoff(&self) -> backoff::ExponentialBackoff {
        backoff::ExponentialBackoff {
            initial_interval: self.opts.retry_initial,
            max_interval: self.opts.retry_max,
            multiplier: 2.0,
            randomization_factor: 0.2,
            max_elapsed_time: None,
            ..Default::default()
        }
    }

    fn start_pass(&mut self, trigger: Trigger, ctx: &mut Context<Self>) {
        let Some(config) = self.config.clone() else {
            return;
        };
        if self.running {
            // Coalesce: one follow-up pass, whatever the number of triggers.
            self.pending = Some(self.pending.unwrap_or(trigger));
            return;
        }
        self.running = true;
        self.passes += 1;
        self.metrics.reconcile_in_progress.set(1);
        let now = Instant::now();
        // Adapters still backing off wait; of those due, the longest-waiting few are retried
        // this pass and the rest in the next ones, so thousands of failing adapters cost a
        // bounded number of calls a second (new adapters are never held back).
        let mut due: Vec<(&String, Instant)> = self
            .retries
            .iter()
            .filter(|(_, r)| r.next_attempt <= now)
            .map(|(id, r)| (id, r.next_attempt))
            .collect();
        due.sort_by_key(|(_, at)| *at);
        let deferred: Vec<String> = self
            .retries
            .iter()
            .filter(|(_, r)| r.next_attempt > now)
            .map(|(id, _)| id.clone())
            .chain(
                due.iter()
                    .skip(RETRIES_PER_PASS)
                    .map(|(id, _)| (*id).clone()),
            )
            .collect();
        let span = tracing::info_span!("reconcile", pass = self.passes, trigger = ?trigger, generation = self.generation, server = %config.base_url());
        let client = self.client.clone();
        let opts = self.opts.clone();
        let started = Instant::now();
        let fut = async move { run_pass(&client, &opts, &config, deferred).await }
            .instrument(span.clone());
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            let _entered = span.enter();
            act.metrics
                .reconcile_duration
                .observe(started.elapsed().as_secs_f64());
            act.metrics.reconcile_in_progress.set(0);
            act.running = false;
            act.finish_pass(res, ctx);
            if let Some(t) = act.pending.take() {
                act.start_pass(t, ctx);
            }
        }));
    }

    fn set_healthy(&mut self, healthy: bool) {
        self.metrics.server_healthy.set(i64::from(healthy));
        if self.was_healthy != Some(healthy) {
            self.was_healthy = Some(healthy);
        }
    }

    fn finish_pass(&mut self, res: Result<PassReport, ReconcileError>, ctx: &mut Context<Self>) {
        let Some(config) = self.config.clone() else {
            return;
        };
        let report = match res {
            Ok(r) => r,
            Err(e) => {
                let label = match e {
                    ReconcileError::NotHealthy { .. } => "server_unhealthy",
                    ReconcileError::List { .. } => "list_failed",
                };
                if self.was_healthy != Some(false) {
                    tracing::warn!(error = %e, "reconcile could not reach vLLM; will retry on the next trigger");
                } else {
                    tracing::debug!(error = %e, "vLLM still unreachable");
                }
                self.set_healthy(false);
                self.metrics
                    .reconciles
                    .get_or_create(&ResultLabels {
                        result: label.into(),
                    })
                    .inc();
                self.publish(&config);
                return;
            }
        };
        if self.was_healthy == Some(false) {
            tracing::info!("vLLM reachable again");
        }
        self.set_healthy(true);
        let mut all_ok = report.deferred.is_empty();
        let now = Instant::now();
        for (i, (op, outcome)) in report.results.iter().enumerate() {
            let id = op.id().to_string();
            let operation = match op {
                AdapterOp::Load { inplace: true, .. } => "reload",
                AdapterOp::Load { .. } => "load",
                AdapterOp::Unload { .. } => "unload",
            };
            let result = match outcome {
                Outcome::Done | Outcome::AlreadySo => "success",
                _ => "failure",
            };
            self.metrics
                .adapter_operation_duration
                .get_or_create(&metrics::OperationLabels {
                    operation: operation.into(),
                    result: result.into(),
                })
                .observe(report.durations.get(i).copied().unwrap_or(0.0));
            match outcome {
                Outcome::Done | Outcome::AlreadySo => {
                    if let Some(r) = self.retries.remove(&id) {
                        tracing::info!(adapter = %id, after_failures = r.failures, "{operation} succeeded after earlier failures");
                        self.clear_error_metric(&id, &r.last_class);
                    } else if *outcome == Outcome::Done {
                        tracing::info!(adapter = %id, "{operation} done");
                    }
                    self.metrics
                        .adapter_consecutive_failures
                        .get_or_create(&AdapterLabels {
                            adapter_name: id.clone(),
                        })
                        .set(0);
                }
                Outcome::AdapterFailed { status, message }
                | Outcome::ServerUnavailable { status, message } => {
                    all_ok = false;
                    // Whatever the server or the adapter source says, a bounded text for logs
                    // and /readyz, and a bounded class for the metric label.
                    let message = bounded(&format!("{operation} failed ({status}): {message}"));
                    let class = format!("{operation} {status}");
                    self.metrics
                        .adapter_failures
                        .get_or_create(&AdapterOpLabels {
                            adapter_name: id.clone(),
                            operation: operation.into(),
                        })
                        .inc();
                    let source = match op {
                        AdapterOp::Load { source, .. } => source.clone(),
                        AdapterOp::Unload { .. } => String::new(),
                    };
                    let mut backoff = self.new_backoff();
                    let entry = self.retries.entry(id.clone()).or_insert_with(|| {
                        backoff.reset();
                        AdapterRetry {
                            source,
                            failures: 0,
                            backoff,
                            next_attempt: now,
                            last_error: String::new(),
                            last_class: String::new(),
                        }
                    });
                    entry.failures += 1;
                    let delay = entry.backoff.next_backoff().unwrap_or(self.opts.retry_max);
                    entry.next_attempt = now + delay;
                    let changed = entry.last_error != message;
                    entry.last_error.clone_from(&message);
                    let old = std::mem::replace(&mut entry.last_class, class.clone());
                    let failures = entry.failures;
                    if changed {
                        // Logged when the failure starts or changes, not on every retry.
                        tracing::error!(adapter = %id, error = %message, retry_in_ms = delay.as_millis() as u64, "adapter failed; other adapters proceed");
                        self.clear_error_metric(&id, &old);
                        self.metrics
                            .adapter_last_error
                            .get_or_create(&AdapterErrorLabels {
                                adapter_name: id.clone(),
                                error: class,
                            })
                            .set(1);
                    } else {
                        tracing::debug!(adapter = %id, failures, retry_in_ms = delay.as_millis() as u64, "adapter still failing");
                    }
                    self.metrics
                        .adapter_consecutive_failures
                        .get_or_create(&AdapterLabels {
                            adapter_name: id.clone(),
                        })
                        .set(i64::from(failures));
                }
            }
        }
        self.metrics
            .reconciles
            .get_or_create(&ResultLabels {
                result: if all_ok { "success" } else { "partial" }.into(),
            })
            .inc();
        self.last_actual = Some(report.actual_after);
        self.publish(&config);
        self.arm_retry_timer(ctx);
    }

    fn clear_error_metric(&self, id: &str, error: &str) {
        if !error.is_empty() {
            self.metrics.adapter_last_error.remove(&AdapterErrorLabels {
                adapter_name: id.into(),
                error: error.into(),
            });
        }
    }

    /// Wakes the reconciler when the earliest adapter retry is due.
    fn arm_retry_timer(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.retry_timer.take() {
            ctx.cancel_future(h);
        }
        let Some(next) = self.retries.values().map(|r| r.next_attempt).min() else {
            return;
        };
        // Retries due close together share one pass: with thousands of failing adapters on
        // independent backoffs, one pass per due adapter would be passes back to back.
        let floor = self.opts.retry_initial.min(RETRY_PASS_MIN_GAP);
        let delay = next.saturating_duration_since(Instant::now()).max(floor);
        self.retry_timer = Some(ctx.run_later(delay, |act, ctx| {
            act.retry_timer = None;
            act.start_pass(Trigger::Retry, ctx);
        }));
    }

    /// Publishes readiness and adapter status from the last listing the server gave.
    fn publish(&mut self, config: &LoraConfig) {
        let healthy = self.was_healthy == Some(true);
        let actual = self.last_actual.as_ref();
        let mut missing = Vec::new();
        for a in &config.ensure_exist {
            let loaded = actual.is_some_and(|act| act.adapters.get(&a.id) == Some(&a.source));
            self.metrics
                .adapter_status
                .get_or_create(&AdapterLabels {
                    adapter_name: a.id.clone(),
                })
                .set(i64::from(loaded));
            if !loaded {
                missing.push(a.id.clone());
            }
        }
        for a in &config.ensure_not_exist {
            let present = actual.is_some_and(|act| act.adapters.contains_key(&a.id));
            self.metrics
                .adapter_status
                .get_or_create(&AdapterLabels {
                    adapter_name: a.id.clone(),
                })
                .set(i64::from(present));
        }
        let in_sync = missing.is_empty() && actual.is_some() && healthy;
        self.metrics.in_sync.set(i64::from(in_sync));
        if in_sync && let Some(since) = self.unsynced_since.take() {
            self.metrics
                .config_sync_duration
                .observe(since.elapsed().as_secs_f64());
        }
        if in_sync && !self.ever_ready {
            self.ever_ready = true;
            tracing::info!("every ensureExist adapter is loaded; reporting ready");
        }
        self.metrics.ready.set(i64::from(self.ever_ready));
        self.status.store(Arc::new(SyncStatus {
            ready: self.ever_ready,
            in_sync,
            missing,
            failing: self
                .retries
                .iter()
                .map(|(k, v)| (k.clone(), v.last_error.clone()))
                .collect(),
            generation: self.generation,
            server_healthy: healthy,
        }));
    }
}

impl Actor for Reconciler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let every = self.opts.resync_interval;
        ctx.run_interval(every, |act, ctx| act.start_pass(Trigger::Periodic, ctx));
    }
}

impl Handler<ConfigChanged<LoraConfig>> for Reconciler {
    type Result = ();

    fn handle(&mut self, msg: ConfigChanged<LoraConfig>, ctx: &mut Context<Self>) {
        // A changed (or removed) adapter entry starts over: no stale backoff.
        let cfg = &msg.config;
        self.unsynced_since.get_or_insert_with(Instant::now);
        self.retries.retain(|id, r| {
            let keep = cfg
                .ensure_exist
                .iter()
                .any(|a| a.id == *id && a.source == r.source)
                || (r.source.is_empty() && cfg.ensure_not_exist.iter().any(|a| a.id == *id));
            if !keep {
                self.metrics.adapter_last_error.remove(&AdapterErrorLabels {
                    adapter_name: id.clone(),
                    error: r.last_class.clone(),
                });
                self.metrics
                    .adapter_consecutive_failures
                    .get_or_create(&AdapterLabels {
                        adapter_name: id.clone(),
                    })
                    .set(0);
            }
            keep
        });
        if let Some(old) = &self.config {
            // Adapters no longer in the config are no longer ours to report.
            for a in old.ensure_exist.iter().chain(old.ensure_not_exist.iter()) {
                let listed = cfg
                    .ensure_exist
                    .iter()
                    .chain(cfg.ensure_not_exist.iter())
                    .any(|b| b.id == a.id);
                if !listed {
                    self.metrics.adapter_status.remove(&AdapterLabels {
                        adapter_name: a.id.clone(),
                    });
                }
            }
        }
        let trigger = if self.config.is_none() {
            Trigger::Startup
        } else {
            Trigger::ConfigChanged
        };
        self.config = Some(msg.config.clone());
        self.generation = msg.generation;
        self.publish(&msg.config);
        self.start_pass(trigger, ctx);
    }
}

impl Handler<ReconcileNow> for Reconciler {
    type Result = ();

    fn handle(&mut self, msg: ReconcileNow, ctx: &mut Context<Self>) {
        self.start_pass(msg.trigger, ctx);
    }
}

/// Longest error text kept per adapter (a server or source can send megabytes).
const ERROR_TEXT_MAX: usize = 512;

/// `text` cut to [`ERROR_TEXT_MAX`] bytes at a character boundary.
fn bounded(text: &str) -> String {
    if text.len() <= ERROR_TEXT_MAX {
        return text.to_string();
    }
    let mut end = ERROR_TEXT_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}
