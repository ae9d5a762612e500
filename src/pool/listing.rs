//! The pool's model lists and scrapes by address, as LoRA placement's routing and the on-demand copies' unloader ask about them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use inferlane_epp::scheduler::{Residency, residency};

use super::state::{EndpointHandle, Scraped, ServedModels};

/// What the endpoints reported, loaded by the caller once, each server found by address once.
pub struct Listing<'v> {
    endpoints: &'v [&'v Arc<EndpointHandle>],
    models: &'v [Option<Arc<ServedModels>>],
    scraped: &'v [Option<Arc<Scraped>>],
    by_address: HashMap<&'v str, usize>,
    /// `--lora-max-cpu-loras` (0: unknown).
    max_cpu: usize,
}

impl<'v> Listing<'v> {
    /// `models` and `scraped` are `endpoints`' loads, in the same order.
    pub fn new(
        endpoints: &'v [&'v Arc<EndpointHandle>],
        models: &'v [Option<Arc<ServedModels>>],
        scraped: &'v [Option<Arc<Scraped>>],
        max_cpu: usize,
    ) -> Self {
        Self {
            endpoints,
            models,
            scraped,
            by_address: endpoints
                .iter()
                .enumerate()
                .map(|(i, h)| (h.address.as_str(), i))
                .collect(),
            max_cpu,
        }
    }

    /// `address` is in the pool.
    pub fn has(&self, address: &str) -> bool {
        self.by_address.contains_key(address)
    }

    pub fn scraped(&self, address: &str) -> Option<&Scraped> {
        self.scraped[*self.by_address.get(address)?].as_deref()
    }

    fn models(&self, address: &str) -> Option<&ServedModels> {
        self.models[*self.by_address.get(address)?].as_deref()
    }
}

impl crate::lora_fleet::Servers for Listing<'_> {
    fn listed(&self, address: &str, name: &str) -> Option<Instant> {
        self.models(address)
            .filter(|m| m.adapters.contains(name))
            .and_then(|m| m.read_at)
    }

    fn read_at(&self, address: &str) -> Option<Instant> {
        self.models(address).and_then(|m| m.read_at)
    }

    fn addresses(&self) -> impl Iterator<Item = &str> + Clone {
        self.endpoints
            .iter()
            .filter(|h| h.is_healthy())
            .map(|h| h.address.as_str())
    }

    /// Fewer adapters cached than `--lora-max-cpu-loras` (by vLLM's residency metrics;
    /// without them, or without the flag, every server is taken to have room).
    fn room(&self, address: &str) -> bool {
        if !self.has(address) {
            return false;
        }
        let Some(m) = self.scraped(address).map(|s| &s.metrics) else {
            return true;
        };
        if self.max_cpu == 0 || !m.residency_reported {
            return true;
        }
        let cpu_only = m
            .cpu_adapters
            .iter()
            .filter(|a| !m.gpu_adapters.contains(a));
        m.gpu_adapters.len() + cpu_only.count() < self.max_cpu
    }

    fn resident(&self, address: &str, name: &str) -> bool {
        self.scraped(address).is_some_and(|s| {
            let cached = matches!(
                residency(&s.metrics, name),
                Some(Residency::Gpu | Residency::Cpu)
            );
            cached || s.metrics.runs_or_waits(name)
        })
    }
}
