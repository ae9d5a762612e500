//! Unloads the copies vLLM's LoRA resolver made of on-demand adapters for our requests once they are done (`--lora-cold-adapters resolver`), and adopts copies found with no record.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::lora_fleet::lock;
use crate::lora_fleet::on_demand::Timing;
use crate::pool::listing::Listing;
use crate::pool::metrics::EppMetrics;
use crate::pool::state::{EndpointHandle, Shared};

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
        let endpoints: Vec<&Arc<EndpointHandle>> = snap.endpoints.iter().collect();
        let models: Vec<_> = endpoints.iter().map(|h| h.models.load_full()).collect();
        let scraped: Vec<_> = endpoints.iter().map(|h| h.scraped.load_full()).collect();
        let view = Listing::new(&endpoints, &models, &scraped, 0);
        let now = Instant::now();
        let due = {
            let mut flights = lock(&fleet.flights);
            if fleet.deciding.load(Ordering::Relaxed) {
                for (h, m) in endpoints.iter().zip(&models) {
                    let listed = m.iter().flat_map(|m| &m.adapters);
                    for id in listed.filter(|a| fleet.adoptable(a, &h.address)) {
                        flights.adopt(id, &h.address, now);
                    }
                }
            }
            // Another replica's request for it may be running or waiting there.
            let busy =
                |a: &str, id: &str| view.scraped(a).is_some_and(|s| s.metrics.runs_or_waits(id));
            let ours = |a: &str, name: &str| view.has(a) && !fleet.homed(name, a);
            flights.due(now, self.timing, &view, ours, busy)
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
