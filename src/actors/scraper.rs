//! One actor per endpoint: scrapes `/metrics` on a short period and `/v1/models` on a longer one.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix::prelude::*;
use inferlane_sidecar::models::parse_models;

use crate::epp::state::{EndpointHandle, Scraped, ServedModels};

/// Scrape settings.
#[derive(Debug, Clone)]
pub struct ScrapeOptions {
    pub metrics_interval: Duration,
    pub models_interval: Duration,
    pub timeout: Duration,
}

/// Command: stop scraping (the endpoint left the pool).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopScraping;

/// Scrapes one endpoint and writes the results into its [`EndpointHandle`] in place.
pub struct Scraper {
    handle: Arc<EndpointHandle>,
    client: reqwest::Client,
    opts: ScrapeOptions,
    metrics_busy: bool,
    models_busy: bool,
    last_models: Option<Instant>,
    failures: u32,
}

enum ScrapeResult {
    Metrics(Result<inferlane_epp::EndpointMetrics, String>),
    Models(Result<ServedModels, String>),
}

impl Scraper {
    pub fn new(handle: Arc<EndpointHandle>, client: reqwest::Client, opts: ScrapeOptions) -> Self {
        Self {
            handle,
            client,
            opts,
            metrics_busy: false,
            models_busy: false,
            last_models: None,
            failures: 0,
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if !self.metrics_busy {
            self.metrics_busy = true;
            let url = format!("http://{}/metrics", self.handle.address);
            let client = self.client.clone();
            let engine = self.handle.engine;
            let timeout = self.opts.timeout;
            let fut = async move {
                let text = fetch(&client, &url, timeout).await?;
                inferlane_epp::metrics::parse(engine, &text).map_err(|e| e.to_string())
            };
            ctx.spawn(fut.into_actor(self).map(|res, act, _| {
                act.metrics_busy = false;
                act.apply(ScrapeResult::Metrics(res));
            }));
        }
        let models_due = self
            .last_models
            .is_none_or(|t| t.elapsed() >= self.opts.models_interval)
            || self.handle.models_stale.swap(false, Ordering::Relaxed);
        if models_due && !self.models_busy {
            self.models_busy = true;
            self.last_models = Some(Instant::now());
            let url = format!("http://{}/v1/models", self.handle.address);
            let client = self.client.clone();
            let timeout = self.opts.timeout;
            let fut = async move {
                let text = fetch(&client, &url, timeout).await?;
                let actual = parse_models(text.as_bytes()).map_err(|e| e.to_string())?;
                Ok(ServedModels {
                    base: actual.base_models.into_iter().collect(),
                    adapters: actual.adapters.into_keys().collect(),
                })
            };
            ctx.spawn(fut.into_actor(self).map(|res, act, _| {
                act.models_busy = false;
                act.apply(ScrapeResult::Models(res));
            }));
        }
    }

    fn apply(&mut self, res: ScrapeResult) {
        let h = &self.handle;
        match res {
            ScrapeResult::Metrics(Ok(m)) => {
                h.scraped.store(Some(Arc::new(Scraped {
                    metrics: m,
                    at: Instant::now(),
                })));
                h.dispatched_since_scrape.store(0, Ordering::Relaxed);
                if !h.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!(endpoint = %h.address, after_failures = self.failures, "endpoint healthy again; back in the pool");
                }
                self.failures = 0;
            }
            ScrapeResult::Metrics(Err(e)) => {
                self.failures += 1;
                if h.healthy.swap(false, Ordering::Relaxed) {
                    tracing::warn!(endpoint = %h.address, error = %e, "scrape failed; endpoint taken out of the pool until it answers");
                }
            }
            ScrapeResult::Models(Ok(m)) => {
                h.models.store(Some(Arc::new(m)));
            }
            ScrapeResult::Models(Err(e)) => {
                tracing::debug!(endpoint = %h.address, error = %e, "model list failed");
            }
        }
    }
}

async fn fetch(client: &reqwest::Client, url: &str, timeout: Duration) -> Result<String, String> {
    let resp = client
        .get(url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("{url}: status {}", resp.status()));
    }
    resp.text().await.map_err(|e| e.to_string())
}

impl Actor for Scraper {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.tick(ctx);
        ctx.run_interval(self.opts.metrics_interval, |act, ctx| act.tick(ctx));
    }
}

impl Handler<StopScraping> for Scraper {
    type Result = ();

    fn handle(&mut self, _: StopScraping, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
