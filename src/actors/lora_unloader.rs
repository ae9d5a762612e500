//! Unloads the copies vLLM's LoRA resolver made of on-demand adapters for our requests once they are done (`--lora-cold-adapters resolver`), and adopts copies found with no record.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::lora_fleet::on_demand::Timing;
use crate::lora_fleet::{Servers, lock};
use crate::pool::metrics::EppMetrics;
use crate::pool::state::{PoolSnapshot, Shared};

/// How long one unload call may take.
const UNLOAD_TIMEOUT: Duration = Duration::from_secs(5);

/// The unloader actor: a timer over the fleet's on-demand copies.
pub struct CopyUnloader {
    shared: Arc<Shared>,
    metrics: EppMetrics,
    client: reqwest::Client,
    timing: Timing,
    every: Duration,
}

impl CopyUnloader {
    pub fn new(shared: Arc<Shared>, metrics: EppMetrics, every: Duration) -> Self {
        Self {
            shared,
            metrics,
            client: reqwest::Client::new(),
            timing: Timing::default(),
            every,
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let fleet = &self.shared.fleet;
        if !fleet.resolver.load(Ordering::Relaxed) {
            return;
        }
        let snap = self.shared.snapshot.load_full();
        let view = Pool(&snap);
        let now = Instant::now();
        let due = {
            let mut flights = lock(&fleet.flights);
            if fleet.deciding.load(Ordering::Relaxed) {
                for h in &snap.endpoints {
                    let Some(models) = h.models.load_full() else {
                        continue;
                    };
                    for id in models
                        .adapters
                        .iter()
                        .filter(|a| fleet.adoptable(a, &h.address))
                    {
                        flights.adopt(id, &h.address, now);
                    }
                }
            }
            let present = |a: &str| snap.endpoints.iter().any(|h| h.address == a);
            let busy = |a: &str, id: &str| {
                snap.endpoints
                    .iter()
                    .find(|h| h.address == a)
                    .and_then(|h| h.scraped.load_full())
                    .is_some_and(|s| {
                        let m = &s.metrics;
                        m.running_adapters
                            .iter()
                            .chain(&m.waiting_adapters)
                            .any(|x| x == id)
                    })
            };
            flights.due(now, self.timing, &view, present, busy)
        };
        for key in due {
            self.unload(key, ctx);
        }
    }

    /// `POST /v1/unload_lora_adapter` on the copy's server; a server that no longer has it
    /// (404, 400) counts as unloaded.
    fn unload(&self, key: (String, String), ctx: &mut Context<Self>) {
        let url = format!("http://{}/v1/unload_lora_adapter", key.1);
        let req = self
            .client
            .post(url)
            .timeout(UNLOAD_TIMEOUT)
            .json(&serde_json::json!({ "lora_name": key.0 }));
        let fut = async move {
            match req.send().await {
                Ok(r) if r.status().is_success() || matches!(r.status().as_u16(), 400 | 404) => {
                    Ok(())
                }
                Ok(r) => Err(format!("HTTP {}", r.status())),
                Err(e) => Err(e.to_string()),
            }
        };
        let span = tracing::debug_span!("lora_copy_unload", adapter = %key.0, server = %key.1);
        ctx.spawn(
            tracing::Instrument::instrument(fut, span)
                .into_actor(self)
                .map(move |res, a, _| {
                    let mut flights = lock(&a.shared.fleet.flights);
                    let now = Instant::now();
                    match res {
                        Ok(()) => {
                            flights.unloaded(&key, now);
                            a.metrics.lora_copy_unloads.inc();
                            tracing::debug!(adapter = %key.0, server = %key.1, "unloaded an on-demand copy");
                        }
                        Err(e) => {
                            // Tried again after a pause, not every tick.
                            flights.unload_failed(&key, now + Duration::from_secs(5));
                            a.metrics.lora_copy_unload_failures.inc();
                            tracing::warn!(adapter = %key.0, server = %key.1, error = %e, "on-demand copy not unloaded; trying again");
                        }
                    }
                }),
        );
    }
}

impl Actor for CopyUnloader {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.every, |a, ctx| a.tick(ctx));
    }
}

/// The pool's model lists by address, for the copies' bookkeeping.
struct Pool<'a>(&'a PoolSnapshot);

impl Servers for Pool<'_> {
    fn listed(&self, address: &str, name: &str) -> Option<Instant> {
        let h = self.0.endpoints.iter().find(|h| h.address == address)?;
        let m = h.models.load_full()?;
        m.adapters.contains(name).then_some(m.read_at).flatten()
    }

    fn read_at(&self, address: &str) -> Option<Instant> {
        let h = self.0.endpoints.iter().find(|h| h.address == address)?;
        h.models.load_full()?.read_at
    }

    fn addresses(&self) -> impl Iterator<Item = &str> + Clone {
        self.0.endpoints.iter().map(|h| h.address.as_str())
    }
}
