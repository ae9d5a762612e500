//! Actor that owns the simulated vLLM engine: runs its steps on the clock and streams token events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use tokio::sync::mpsc::UnboundedSender;

use crate::sim::engine::{Engine, EngineEvent, EngineRequest, Waited};
use crate::sim::metrics::{Gauges, LoraInfoStyle, MetricsConfig, SimMetrics};
use crate::sim::tiers::Residency;

/// Command: queue a request; its events arrive on `events`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Submit {
    pub req: EngineRequest,
    pub events: UnboundedSender<EngineEvent>,
}

/// Command: the client went away; drop the request.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Abort {
    pub id: u64,
}

/// Fact: `/v1/load_lora_adapter` registered an adapter (read into the CPU tier).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AdapterLoaded {
    pub name: String,
    pub rank: Option<u32>,
}

/// Command: read an adapter from disk through the load API, `secs` long; answers how long
/// until this read is done (reads queue on the engine's loop, as in vLLM).
#[derive(Message)]
#[rtype(result = "f64")]
pub struct AdapterReading {
    pub secs: f64,
}

/// Fact: a LoRA resolver registered an adapter (not read yet).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AdapterRegistered {
    pub name: String,
    pub rank: Option<u32>,
}

/// Fact: `/v1/unload_lora_adapter` forgot an adapter.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AdapterUnloaded {
    pub name: String,
}

/// Command: forget everything, as a restarted vLLM process would. In-flight requests see their
/// event channel close.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Restart;

/// Owns the [`Engine`]; publishes gauges and counters into the shared [`SimMetrics`].
pub struct EngineActor {
    engine: Engine,
    epoch: tokio::time::Instant,
    streams: HashMap<u64, UnboundedSender<EngineEvent>>,
    metrics: Arc<Mutex<SimMetrics>>,
    metrics_cfg: MetricsConfig,
    lora_style: LoraInfoStyle,
    /// Bumped by [`Restart`] so a step timer armed before it is ignored.
    generation: u64,
}

impl EngineActor {
    pub fn new(
        engine: Engine,
        metrics: Arc<Mutex<SimMetrics>>,
        metrics_cfg: MetricsConfig,
        lora_style: LoraInfoStyle,
    ) -> Self {
        Self {
            engine,
            epoch: tokio::time::Instant::now(),
            streams: HashMap::new(),
            metrics,
            metrics_cfg,
            lora_style,
            generation: 0,
        }
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    fn publish(&mut self) {
        let gauges = Gauges {
            running: self.engine.num_running(),
            waiting: self.engine.num_waiting(),
            deferred: self.engine.num_deferred(),
            kv_usage: self.engine.kv_usage(),
        };
        let (running, waiting): (Vec<String>, Vec<String>) = match self.lora_style {
            LoraInfoStyle::V032 => {
                let all: Vec<String> = self.engine.adapters_in_flight().into_iter().collect();
                (all.clone(), all)
            }
            LoraInfoStyle::Split => {
                let running = self.engine.adapters_running();
                let waiting = self
                    .engine
                    .adapters_waiting()
                    .into_iter()
                    .filter(|a| !running.contains(a))
                    .collect();
                (running.into_iter().collect(), waiting)
            }
        };
        let counters = self.engine.take_counters();
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let residency = self.engine.tiers().resident();
        let mut m = self.metrics.lock().expect("metrics lock");
        m.record(counters);
        m.set_gauges(gauges, &running, &waiting, unix);
        m.set_residency(residency);
    }

    fn begin(&mut self, ctx: &mut Context<Self>) {
        if self.engine.is_stepping() {
            return;
        }
        let now = self.now();
        let step = self.engine.begin_step(now);
        self.publish();
        if let Some(d) = step {
            let generation = self.generation;
            ctx.run_later(Duration::from_secs_f64(d), move |act, ctx| {
                if act.generation == generation {
                    act.end(ctx);
                }
            });
        }
    }

    fn end(&mut self, ctx: &mut Context<Self>) {
        let now = self.now();
        for ev in self.engine.end_step(now) {
            if let EngineEvent::FirstToken {
                id,
                at,
                waited,
                adapter,
                ..
            } = &ev
            {
                log_first_token(*id, *at, waited, adapter.as_deref());
            }
            let (id, done) = match &ev {
                EngineEvent::FirstToken { id, .. } | EngineEvent::Token { id, .. } => (*id, false),
                EngineEvent::Finished { id, .. } => (*id, true),
            };
            if let Some(tx) = self.streams.get(&id) {
                // A closed receiver means the client left; the Abort message follows.
                let _ = tx.send(ev);
            }
            if done {
                self.streams.remove(&id);
            }
        }
        self.begin(ctx);
    }
}

/// One request's first token at debug level (`--log-filter warn,vllm_sim::ttft=debug`):
/// its time to it and where that went ([`Waited`]); `scripts/ttft-causes.py` sums a run's.
fn log_first_token(id: u64, at: f64, w: &Waited, adapter: Option<&str>) {
    let found = match w.found {
        None => "none",
        Some(Residency::Gpu) => "gpu",
        Some(Residency::Cpu) => "cpu",
        Some(Residency::Cold) => "disk",
    };
    tracing::debug!(
        target: "vllm_sim::ttft",
        id,
        adapter = adapter.unwrap_or("-"),
        arrival = w.arrival,
        ttft = at - w.arrival,
        found,
        own_load = w.own_load,
        other_reads = w.other_reads,
        api_loads = w.api_loads,
        slot = w.slot,
        queue = w.queue,
        "first token"
    );
}

impl Actor for EngineActor {
    type Context = Context<Self>;
}

impl Handler<Submit> for EngineActor {
    type Result = ();

    fn handle(&mut self, mut msg: Submit, ctx: &mut Context<Self>) {
        msg.req.arrival = self.now();
        self.streams.insert(msg.req.id, msg.events);
        self.engine.submit(msg.req);
        self.begin(ctx);
    }
}

impl Handler<Abort> for EngineActor {
    type Result = ();

    fn handle(&mut self, msg: Abort, _ctx: &mut Context<Self>) {
        self.streams.remove(&msg.id);
        if self.engine.abort(msg.id) {
            self.metrics.lock().expect("metrics lock").record_abort();
            self.publish();
        }
    }
}

impl Handler<AdapterLoaded> for EngineActor {
    type Result = ();

    fn handle(&mut self, msg: AdapterLoaded, _ctx: &mut Context<Self>) {
        self.engine.adapter_loaded(&msg.name, msg.rank);
        self.publish();
    }
}

impl Handler<AdapterReading> for EngineActor {
    type Result = f64;

    fn handle(&mut self, msg: AdapterReading, _ctx: &mut Context<Self>) -> f64 {
        let now = self.now();
        self.engine.block_for(now, msg.secs) - now
    }
}

impl Handler<AdapterRegistered> for EngineActor {
    type Result = ();

    fn handle(&mut self, msg: AdapterRegistered, _ctx: &mut Context<Self>) {
        self.engine.adapter_registered(&msg.name, msg.rank);
        self.publish();
    }
}

impl Handler<AdapterUnloaded> for EngineActor {
    type Result = ();

    fn handle(&mut self, msg: AdapterUnloaded, _ctx: &mut Context<Self>) {
        self.engine.adapter_unloaded(&msg.name);
        self.publish();
    }
}

impl Handler<Restart> for EngineActor {
    type Result = ();

    fn handle(&mut self, _msg: Restart, _ctx: &mut Context<Self>) {
        self.generation += 1;
        self.streams.clear();
        self.engine.reset();
        *self.metrics.lock().expect("metrics lock") = SimMetrics::new(self.metrics_cfg.clone());
    }
}
