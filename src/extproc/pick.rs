//! The pick: the endpoints the request may go to, as the scheduler sees them, the prompt's prefix and its home, then the scheduler's choice and what it changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use inferlane_epp::request;
use inferlane_epp::rules::Resolved;
use inferlane_epp::scheduler::{
    Candidate, ModelPresence, PickInput, Residency, guessed_residency, pool_saturation, residency,
};
use inferlane_epp::{PickError, SchedulerConfig};

use super::ExtProc;
use super::prepare::Prepared;
use super::proto::set_header;
use super::state::{InFlight, Reject, RequestState};
use super::usage::{ModelRestorer, UsageParser};
use crate::lora_fleet::Target;
use crate::pool::labels::for_log;
use crate::pool::listing::Listing;
use crate::pool::metrics::{EndpointLabels, ModelLabels};
use crate::pool::state::{
    EndpointHandle, PoolSnapshot, Scraped, ServedModels, adapter_key, lock_placement, lock_prefix,
};

/// The routing decision: where to send the request and how to change it.
pub(super) struct Decision {
    pub(super) destination: String,
    pub(super) extra_headers: Vec<HeaderValueOption>,
    /// The request body (rewritten in place) must be sent on.
    pub(super) body_changed: bool,
}

/// What the endpoints reported, loaded once for this pick (candidates borrow from it).
struct FleetView {
    scraped: Vec<Option<Arc<Scraped>>>,
    models: Vec<Option<Arc<ServedModels>>>,
}

impl FleetView {
    fn load(endpoints: &[&Arc<EndpointHandle>]) -> Self {
        Self {
            scraped: endpoints.iter().map(|h| h.scraped.load_full()).collect(),
            models: endpoints.iter().map(|h| h.models.load_full()).collect(),
        }
    }

    /// The target is an adapter: some server lists it as one and none as a base model.
    fn is_adapter(&self, target: Option<&str>) -> bool {
        target.is_some_and(|t| {
            let mut models = self.models.iter().flatten();
            models.clone().any(|m| m.adapters.contains(t)) && !models.any(|m| m.base.contains(t))
        })
    }

    /// The endpoints' lists by address, for LoRA placement (`None` without a table), and
    /// placement's say: where a catalogue adapter may go and under which name (its homes
    /// that list its current version; a home still loading gets nothing yet; an on-demand
    /// adapter's copies or servers to resolve it on), `None` where it has none.
    fn placed<'v>(
        &'v self,
        fleet: &crate::lora_fleet::FleetState,
        endpoints: &'v [&'v Arc<EndpointHandle>],
        target: Option<&str>,
    ) -> (Option<Listing<'v>>, Option<Vec<Target>>) {
        if fleet.table.load().is_none() {
            return (None, None);
        }
        let max_cpu = fleet.max_cpu_loras.load(Ordering::Relaxed) as usize;
        let listing = Listing::new(endpoints, &self.models, &self.scraped, max_cpu);
        let placed = target.and_then(|t| fleet.allowed(t, &listing));
        (Some(listing), placed)
    }

    /// `listing` (with LoRA placement): a candidate whose sidecar loads an adapter counts
    /// as reading (that read holds the engine as a request's does). `adapter_cache` (an
    /// adapter request: `--lora-max-cpu-loras`, 0 for the servers' GPU slots): each
    /// candidate's guess of whether its cache holds the adapter.
    fn candidates<'a>(
        &'a self,
        endpoints: &[&Arc<EndpointHandle>],
        target: Option<&str>,
        placed: Option<&[Target]>,
        listing: Option<(&crate::lora_fleet::FleetState, &Listing<'_>)>,
        adapter_cache: Option<usize>,
    ) -> Vec<Candidate<'a>> {
        let now = Instant::now();
        endpoints
            .iter()
            .enumerate()
            .map(|(i, h)| {
                // Its placed target, if placement has a say (one scan per candidate).
                let home = placed.map(|p| p.iter().find(|t| t.address == h.address));
                let has_model = match (target, &self.models[i]) {
                    (None, _) => ModelPresence::Yes,
                    // Placement checked the listing (lazy placement: a home loads the
                    // adapter on its first request).
                    (Some(_), _) if let Some(home) = home => {
                        if home.is_some() {
                            ModelPresence::Yes
                        } else {
                            ModelPresence::No
                        }
                    }
                    (Some(_), None) => ModelPresence::Unknown,
                    (Some(t), Some(m)) if m.contains(t) => ModelPresence::Yes,
                    (Some(_), Some(_)) => ModelPresence::No,
                };
                // The name this server would serve the request under (a read under way
                // there of that name is one the request can join).
                let served = home.flatten().map_or(target, |t| Some(t.served.as_str()));
                // An adapter request only: what we sent a server names what it holds.
                let key = adapter_cache.and(served).map(adapter_key);
                let max_cpu = adapter_cache.unwrap_or(0);
                let mut c = h.candidate(&self.scraped[i], now, has_model, key, max_cpu);
                if let Some((fleet, l)) = listing
                    && has_model != ModelPresence::No
                    && !c.reading
                {
                    c.reading = fleet.loading(&h.address, l);
                }
                c
            })
            .collect()
    }
}

/// The server an adapter request goes to, as the pick saw it.
struct Picked<'a> {
    chosen: &'a Arc<EndpointHandle>,
    scraped: Option<&'a Scraped>,
    /// Whether its cache held the adapter, by what we sent it.
    cached: Option<bool>,
}

/// The prompt's prefix as the prefix scorer and affinity read it.
struct Prefix {
    blocks: Vec<u64>,
    matches: HashMap<u32, usize>,
    key: Option<u64>,
    home: Option<u64>,
}

/// The endpoints the gateway allows (its subset hint), else the whole pool.
fn allowed<'a>(
    st: &RequestState,
    snap: &'a PoolSnapshot,
) -> Result<Vec<&'a Arc<EndpointHandle>>, Reject> {
    let Some(list) = &st.subset else {
        return Ok(snap.endpoints.iter().collect());
    };
    if list.is_empty() {
        return Err(Reject::new(
            503,
            "ServiceUnavailable",
            "the gateway's subset hint lists no endpoints",
        ));
    }
    Ok(snap
        .endpoints
        .iter()
        .filter(|h| list.iter().any(|a| *a == h.address))
        .collect())
}

impl ExtProc {
    /// Picks for a prepared request; the only shared writes are atomics and the prefix index.
    pub(super) fn decide(
        &self,
        st: &mut RequestState,
        prepared: Prepared,
        admitted: bool,
    ) -> Result<Decision, Reject> {
        let Prepared {
            started,
            parsed,
            resolved,
            mut extra_headers,
        } = prepared;
        let snap = self.shared.snapshot.load();
        let cfg = self.shared.scheduler.load();
        let prompt = parsed.as_ref().map_or("", |p| p.prompt.as_str());
        let target = resolved.as_ref().map(|r| r.target.as_str());
        let endpoints = allowed(st, &snap)?;
        let view = FleetView::load(&endpoints);
        let fleet = &self.shared.fleet;
        let (listing, placed) = view.placed(fleet, &endpoints, target);
        let is_adapter = placed.is_some() || view.is_adapter(target);
        // Servers report a catalogue adapter under its version's name.
        let served = placed
            .as_ref()
            .and_then(|p| p.first())
            .map(|t| t.served.as_str());
        let with_fleet = listing.as_ref().map(|l| (fleet, l));
        let max_cpu = fleet.max_cpu_loras.load(Ordering::Relaxed) as usize;
        let cache = is_adapter.then_some(max_cpu);
        let candidates = view.candidates(&endpoints, target, placed.as_deref(), with_fleet, cache);
        let prefix = self.prefix(&cfg, target.unwrap_or(""), prompt, &candidates, is_adapter);
        let input = PickInput {
            target: served.or(target).unwrap_or(""),
            is_adapter,
            sheddable: resolved.as_ref().is_some_and(|r| r.sheddable()),
            prefix_matches: &prefix.matches,
            total_blocks: prefix.blocks.len(),
            tie_break: rand::random(),
            admitted,
            affinity_key: prefix.key,
            affinity_home: prefix.home,
        };
        let picked = inferlane_epp::pick(&cfg, &candidates, &input).map_err(|e| {
            let placed = target.is_some_and(|t| self.shared.fleet.knows(t));
            pick_error(e, &snap, st, &cfg, &candidates, placed)
        })?;
        let chosen = endpoints[picked[0]];
        self.commit(st, chosen, &prefix.blocks);
        let scraped = view.scraped[picked[0]].as_deref();
        let served = match target {
            Some(t) if is_adapter => {
                let cached = candidates[picked[0]].cached;
                let picked = Picked {
                    chosen,
                    scraped,
                    cached,
                };
                self.adapter_picked(st, t, placed.as_deref(), picked, prompt.len())
            }
            _ => None,
        };
        let destination = picked
            .iter()
            .map(|&i| endpoints[i].address.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let body_changed = match (&resolved, &parsed) {
            (Some(r), Some(p)) => {
                self.apply_rules(st, r, served, p.priority, &cfg, &mut extra_headers)?
            }
            _ => false,
        };
        self.record_pick(st, chosen, started, &destination);
        Ok(Decision {
            destination,
            extra_headers,
            body_changed,
        })
    }

    /// A pick's metrics and debug line.
    fn record_pick(
        &self,
        st: &RequestState,
        chosen: &EndpointHandle,
        started: Instant,
        destination: &str,
    ) {
        self.metrics
            .picks
            .get_or_create(&EndpointLabels {
                endpoint: chosen.address.clone(),
            })
            .inc();
        self.metrics
            .scheduler_e2e
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(request_id = for_log(st.headers.request_id()), model = for_log(&st.requested_model), target = for_log(&st.target_model), endpoint = %destination, "picked");
    }

    /// An adapter's pick: its demand counted, the request tracked until it ends (drains wait
    /// for it), its tier counted; the served name of the version chosen when it is not the
    /// name asked for.
    fn adapter_picked<'p>(
        &self,
        st: &mut RequestState,
        target: &str,
        placed: Option<&'p [Target]>,
        p: Picked<'_>,
        prompt_chars: usize,
    ) -> Option<&'p str> {
        let Picked {
            chosen,
            scraped,
            cached,
        } = p;
        let picked = placed.and_then(|p| p.iter().find(|t| t.address == chosen.address));
        let served = picked.map(|t| t.served.as_str());
        let name = served.unwrap_or(target);
        self.shared.fleet.count(target, prompt_chars as u64 / 4);
        let on_demand = picked.is_some_and(|t| t.on_demand);
        st.adapter_flight = self
            .shared
            .fleet
            .begin(target, name, &chosen.address, on_demand);
        let key = adapter_key(name);
        let reported = self.count_tier(name, scraped);
        // The server's metrics did not place it (`reported`): the guess, as the pick used it.
        let tier = match (scraped, reported) {
            (Some(_), None) => guessed_residency(cached),
            _ => reported,
        };
        if tier == Some(Residency::Cold) {
            st.read = Some(chosen.begin_read(key));
        }
        chosen.sent_adapter(key);
        served.filter(|s| *s != target)
    }

    /// Where the chosen server held the adapter (`inferlane_epp_lora_requests_total`).
    fn count_tier(&self, target: &str, scraped: Option<&Scraped>) -> Option<Residency> {
        let found = scraped.and_then(|s| residency(&s.metrics, target));
        let tier = match found {
            Some(Residency::Gpu) => "gpu",
            Some(Residency::Cpu) => "cpu",
            Some(Residency::Cold) => "cold",
            None => "unknown",
        };
        self.metrics
            .lora_requests
            .get_or_create(&crate::pool::metrics::TierLabels { tier: tier.into() })
            .inc();
        found
    }

    /// The prompt's blocks, what the prefix index has seen of them, and where the prefix
    /// lives: a function of the active prefixes and the endpoints that can serve it, the
    /// same on every replica (adapters follow LoRA affinity instead).
    fn prefix(
        &self,
        cfg: &SchedulerConfig,
        seed: &str,
        prompt: &str,
        candidates: &[Candidate<'_>],
        is_adapter: bool,
    ) -> Prefix {
        let blocks = if cfg.prefix_cache_weight > 0.0 {
            request::prefix_blocks(seed, prompt, cfg.prefix_block_chars, cfg.prefix_max_blocks)
        } else {
            Vec::new()
        };
        let matches = if blocks.is_empty() {
            HashMap::new()
        } else {
            lock_prefix(&self.shared).match_lengths(&blocks)
        };
        let key = match blocks.len().min(cfg.rendezvous_blocks) {
            0 => None,
            n => Some(blocks[n - 1]),
        };
        let home = match key {
            Some(key) if cfg.prefix_balance_factor > 0.0 && !is_adapter => {
                let keys: Vec<u64> = candidates
                    .iter()
                    .filter(|c| c.healthy && c.has_model != ModelPresence::No)
                    .map(|c| c.key)
                    .collect();
                let mut placement = lock_placement(&self.shared);
                placement.set_factor(cfg.prefix_balance_factor);
                placement.place(key, &keys, self.shared.epoch.elapsed().as_secs_f64())
            }
            _ => None,
        };
        Prefix {
            blocks,
            matches,
            key,
            home,
        }
    }

    /// The chosen endpoint's counters and the prefix index learn of the pick.
    fn commit(&self, st: &mut RequestState, chosen: &Arc<EndpointHandle>, blocks: &[u64]) {
        chosen
            .dispatched_since_scrape
            .fetch_add(1, Ordering::Relaxed);
        chosen.in_flight.fetch_add(1, Ordering::Relaxed);
        st.in_flight = Some(InFlight(chosen.clone(), self.flow.clone()));
        if !blocks.is_empty() {
            lock_prefix(&self.shared).insert(blocks, chosen.id);
        }
    }

    /// What the rules change in a request with a body: the target model (or the served
    /// name of the adapter version placement chose, `served`) and a forwarded or clamped
    /// priority written into the body in place, the client's name kept to put back, the
    /// request counted. True when the body changed.
    fn apply_rules(
        &self,
        st: &mut RequestState,
        r: &Resolved,
        served: Option<&str>,
        body_priority: Option<Option<i64>>,
        cfg: &SchedulerConfig,
        extra_headers: &mut Vec<HeaderValueOption>,
    ) -> Result<bool, Reject> {
        let model = served.unwrap_or(&r.target);
        let renamed = r.rewritten() || served.is_some();
        // A version tag is ours, not the client's: responses always name the adapter.
        let shown = match served {
            _ if r.rewritten() && self.opts.restore_model_name => Some(&r.requested),
            Some(_) => Some(&r.target),
            None => None,
        };
        if let Some(shown) = shown {
            st.restorer = Some(ModelRestorer::new(model, shown));
        }
        let priority = server_priority(r, body_priority, cfg.forward_priority);
        let changed = renamed || priority.is_some();
        if changed {
            request::rewrite_in_place(&mut st.body, model, priority)
                .map_err(|e| Reject::new(400, "BadRequest", e.to_string()))?;
            if !st.full_duplex {
                extra_headers.push(set_header("content-length", &st.body.len().to_string()));
            }
        }
        self.metrics
            .requests
            .get_or_create(&ModelLabels {
                model_name: st.model_label.clone(),
                target_model_name: st.target_label.clone(),
            })
            .inc();
        st.usage = Some(UsageParser::default());
        Ok(changed)
    }
}

/// The `priority` a server gets (vLLM: lower runs first): none of the client's may be more
/// urgent than its objective allows (`-objective priority`); with `forwardPriority` the
/// objective's is written when the client set none.
fn server_priority(r: &Resolved, body: Option<Option<i64>>, forward: bool) -> Option<i64> {
    let allowed = -i64::from(r.priority);
    match body {
        Some(Some(b)) if b >= allowed => None,
        Some(_) => Some(allowed),
        None if forward && r.priority != 0 => Some(allowed),
        None => None,
    }
}

/// The client's answer when nothing was picked. A model no rule names, no server lists and
/// placement does not know does not exist here: 404, as vLLM answers it (a named model
/// whose servers lack it, or a catalogue adapter still loading, is a 503: it may come back).
fn pick_error(
    e: PickError,
    snap: &PoolSnapshot,
    st: &RequestState,
    cfg: &SchedulerConfig,
    candidates: &[Candidate<'_>],
    placed: bool,
) -> Reject {
    if let PickError::ModelUnavailable(m) = &e
        && !snap.rules.knows(&st.requested_model)
        && !placed
    {
        return Reject::new(
            404,
            "ModelNotFound",
            format!(
                "The model `{m}` does not exist in this pool: no InferenceModel names it and no model server lists it."
            ),
        );
    }
    let code = match e {
        PickError::Saturated => "TooManyRequests",
        _ => "ServiceUnavailable",
    };
    if matches!(e, PickError::Saturated) {
        tracing::debug!(saturation = pool_saturation(cfg, candidates), "shedding");
    }
    Reject::new(e.status(), code, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(priority: i32) -> Resolved {
        Resolved {
            requested: "m".into(),
            target: "m".into(),
            priority,
            objective: None,
        }
    }

    #[test]
    fn a_client_priority_is_never_more_urgent_than_its_objective() {
        // A Standard request (0) asking for -100 is written back to 0, forwarded or not.
        assert_eq!(
            server_priority(&resolved(0), Some(Some(-100)), true),
            Some(0)
        );
        assert_eq!(
            server_priority(&resolved(0), Some(Some(-100)), false),
            Some(0)
        );
        // Asking for less urgency than allowed is kept.
        assert_eq!(server_priority(&resolved(10), Some(Some(5)), true), None);
        // Not an integer: replaced by the allowed one.
        assert_eq!(server_priority(&resolved(10), Some(None), false), Some(-10));
        // No priority in the body: forwarded only with forwardPriority, and never 0.
        assert_eq!(server_priority(&resolved(10), None, true), Some(-10));
        assert_eq!(server_priority(&resolved(10), None, false), None);
        assert_eq!(server_priority(&resolved(0), None, true), None);
    }
}
