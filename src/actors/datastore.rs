//! Owner of pool membership and model rules; publishes the immutable snapshot the request path reads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::Ordering;

use actix::prelude::*;
use inferlane_epp::ModelRules;
use inferlane_epp::rules::UnknownModelPolicy;

use super::messages::ConfigChanged;
use super::scraper::{ScrapeOptions, Scraper, StopScraping};
use crate::pool::config::{EndpointSpec, PoolFile};
use crate::pool::metrics::EppMetrics;
use crate::pool::state::{EndpointHandle, PoolSnapshot, Shared};

/// Fact: discovery found this set of endpoints (replaces the previous set).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct EndpointsDiscovered(pub Vec<EndpointSpec>);

/// Fact: the model rules changed.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct RulesChanged(pub ModelRules);

/// The datastore actor.
pub struct Datastore {
    shared: Arc<Shared>,
    scrape: ScrapeOptions,
    endpoints: HashMap<String, (Arc<EndpointHandle>, Addr<Scraper>)>,
    rules: ModelRules,
    next_id: u32,
    generation: u64,
    metrics: EppMetrics,
    pool_name: String,
    /// `--unknown-models` when given: for models no rule names, unless the pool file says
    /// otherwise. Without it, discovery's default for the pool's API generation applies.
    unknown_models: Option<UnknownModelPolicy>,
    gauge_interval: Duration,
}

/// Datastore settings from flags.
#[derive(Debug, Clone)]
pub struct DatastoreOptions {
    pub pool_name: String,
    pub unknown_models: Option<UnknownModelPolicy>,
    /// How often the pool-level gauges are recomputed.
    pub gauge_interval: Duration,
}

impl Datastore {
    pub fn new(
        shared: Arc<Shared>,
        scrape: ScrapeOptions,
        metrics: EppMetrics,
        opts: DatastoreOptions,
    ) -> Self {
        Self {
            shared,
            scrape,
            endpoints: HashMap::new(),
            rules: ModelRules::default(),
            next_id: 1,
            generation: 0,
            metrics,
            pool_name: opts.pool_name,
            unknown_models: opts.unknown_models,
            gauge_interval: opts.gauge_interval.max(Duration::from_millis(100)),
        }
    }

    fn set_endpoints(&mut self, specs: Vec<EndpointSpec>) {
        let (metrics, pool_name) = (&self.metrics, self.pool_name.as_str());
        let wanted: HashMap<&str, &EndpointSpec> =
            specs.iter().map(|s| (s.address.as_str(), s)).collect();
        self.endpoints.retain(|addr, (h, scraper)| {
            let keep = wanted
                .get(addr.as_str())
                .is_some_and(|s| s.engine == h.engine && s.identity() == h.identity);
            if !keep {
                tracing::info!(endpoint = %addr, "endpoint left the pool");
                scraper.do_send(StopScraping);
                metrics.forget_pod(pool_name, addr);
            }
            keep
        });
        for s in specs {
            if self.endpoints.contains_key(&s.address) {
                continue;
            }
            let handle = Arc::new(EndpointHandle::new(
                self.next_id,
                s.address.clone(),
                s.engine,
                s.identity(),
            ));
            self.next_id += 1;
            let scraper = Scraper::new(handle.clone(), self.scrape.clone()).start();
            tracing::info!(endpoint = %s.address, engine = ?s.engine, id = handle.id, "endpoint joined the pool");
            self.endpoints.insert(s.address, (handle, scraper));
        }
    }

    fn publish(&mut self) {
        self.generation += 1;
        let mut endpoints: Vec<Arc<EndpointHandle>> =
            self.endpoints.values().map(|(h, _)| h.clone()).collect();
        endpoints.sort_by_key(|h| h.id);
        self.shared.snapshot.store(Arc::new(PoolSnapshot {
            endpoints,
            rules: self.rules.clone(),
            generation: self.generation,
        }));
    }

    /// Pool-level gauges, refreshed on a timer rather than per scrape.
    fn update_gauges(&self) {
        let snap = self.shared.snapshot.load();
        let (mut n, mut kv, mut q) = (0i64, 0.0, 0.0);
        for h in &snap.endpoints {
            let Some(s) = h.scraped.load_full() else {
                continue;
            };
            if !h.is_healthy() {
                continue;
            }
            n += 1;
            kv += s.metrics.kv_usage;
            q += s.metrics.waiting;
            self.metrics
                .set_pod_queue(&self.pool_name, &h.address, s.metrics.waiting);
        }
        self.metrics.set_pool(&self.pool_name, n, kv, q);
    }
}

impl Actor for Datastore {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.gauge_interval, |act, _| act.update_gauges());
    }
}

impl Handler<ConfigChanged<PoolFile>> for Datastore {
    type Result = ();

    fn handle(&mut self, msg: ConfigChanged<PoolFile>, _ctx: &mut Context<Self>) {
        let pool = &msg.config;
        self.rules = pool.rules.clone();
        self.rules.unknown_model = pool
            .unknown_models
            .or(self.unknown_models)
            .unwrap_or_default();
        self.set_endpoints(pool.endpoints.clone());
        self.publish();
        self.shared.pool_synced.store(true, Ordering::Release);
    }
}

impl Handler<EndpointsDiscovered> for Datastore {
    type Result = ();

    fn handle(&mut self, msg: EndpointsDiscovered, _ctx: &mut Context<Self>) {
        self.set_endpoints(msg.0);
        self.publish();
        self.shared.pool_synced.store(true, Ordering::Release);
    }
}

impl Handler<RulesChanged> for Datastore {
    type Result = ();

    fn handle(&mut self, msg: RulesChanged, _ctx: &mut Context<Self>) {
        self.rules = msg.0;
        if let Some(u) = self.unknown_models {
            self.rules.unknown_model = u;
        }
        self.publish();
    }
}
