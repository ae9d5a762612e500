//! Filters, weighted scorers and the picker: which endpoint serves a request (pure, deterministic).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::metrics::EndpointMetrics;

/// Scheduler knobs (the `EndpointPickerConfig`-style file sets them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SchedulerConfig {
    pub queue_weight: f64,
    pub kv_cache_weight: f64,
    pub prefix_cache_weight: f64,
    /// Requests in flight per endpoint (running + waiting + dispatched since the scrape),
    /// min-max normalised like the queue score: sees full batches that waiting alone misses.
    pub active_request_weight: f64,
    /// Used only when the target is a LoRA adapter.
    pub lora_affinity_weight: f64,
    /// Queue depth at which an endpoint counts as saturated.
    pub queue_depth_threshold: f64,
    /// KV cache usage at which an endpoint counts as saturated.
    pub kv_cache_util_threshold: f64,
    /// Metrics older than this count as saturated (seconds).
    pub metrics_staleness_threshold: f64,
    /// Extra endpoints returned after the best one, for the gateway to retry on.
    pub fallbacks: usize,
    /// Characters per prefix block (≈ 16 tokens of 4 characters).
    pub prefix_block_chars: usize,
    /// Longest prompt prefix considered, in blocks (upstream default 256: the first 16 KiB).
    pub prefix_max_blocks: usize,
    /// Entries the prefix index may hold (bounded memory, ~100 bytes each).
    pub prefix_index_capacity: usize,
    /// Rendezvous prefix affinity: the prompt's first this-many blocks (fewer if shorter)
    /// name its preferred endpoint by rendezvous hashing, the same on every EPP replica, and
    /// that endpoint scores as a full prefix match and the others as none (adapter requests
    /// keep the replica-local index). 0 turns it off (the replica-local prefix index alone,
    /// as upstream).
    pub rendezvous_blocks: usize,
    /// A preferred endpoint whose load (requests running and waiting) is above this factor
    /// times the mean, plus one, passes the prefix to the next endpoint in rendezvous order.
    /// Wide by default: a miss costs a whole prefill, and [`Self::prefix_balance_factor`]
    /// already spreads the prefixes.
    pub affinity_load_factor: f64,
    /// No endpoint is home to more than this factor times the mean number of active
    /// prefixes (rounded up), so hashing cannot pile more prompts onto one server than its
    /// cache holds ([`crate::affinity::Placement`]). 0 = plain rendezvous homes.
    pub prefix_balance_factor: f64,
    /// When no server lists the requested model, route anyway (servers that load adapters on
    /// first use, e.g. vLLM with a LoRA resolver) instead of answering 503.
    pub adapter_load_on_demand: bool,
    /// How the winner is chosen among the endpoints that pass the filters.
    pub picker: PickerKind,
    /// LoRA affinity filter (used with the LoRA affinity scorer): an adapter request goes to
    /// an endpoint already running the adapter, else to one with a free LoRA slot, as long as
    /// that endpoint's queue (waiting + dispatched since scrape) is below this depth; only when
    /// none qualifies do all endpoints compete on score. 0 turns the filter off.
    pub lora_affinity_queue_threshold: f64,
    /// The model servers run vLLM's `--scheduling-policy priority`: forward each request's
    /// priority in the body (`priority: -objective priority`, so Critical runs first and
    /// Sheddable last). Off by default: a server in FCFS mode rejects a non-zero priority.
    pub forward_priority: bool,
    /// Requests running or queued per endpoint at which it counts as saturated (0 = unused).
    /// Set it a little under the servers' `--max-num-seqs` to shed sheddable work while batch
    /// slots are still free for critical requests (vLLM never preempts a running request for
    /// a more urgent waiting one, so a full batch makes critical work wait for a slot).
    pub running_requests_threshold: f64,
    /// Taken off the score of an endpoint whose engine is reading a LoRA adapter from disk
    /// (a read holds every request there for 200-800 ms; a request sent elsewhere waits for
    /// none), and such an endpoint counts as having no room in the LoRA affinity filter. 0
    /// turns it off.
    pub read_hold_weight: f64,
}

/// Upstream's pickers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PickerKind {
    /// Highest weighted score wins; ties broken at random.
    #[default]
    MaxScore,
    /// Uniformly random among the eligible endpoints (scores ignored): a baseline.
    Random,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            queue_weight: 2.0,
            kv_cache_weight: 2.0,
            prefix_cache_weight: 3.0,
            active_request_weight: 0.0,
            lora_affinity_weight: 1.0,
            queue_depth_threshold: 1.0,
            kv_cache_util_threshold: 0.8,
            metrics_staleness_threshold: 0.2,
            fallbacks: 0,
            prefix_block_chars: 64,
            prefix_max_blocks: 256,
            prefix_index_capacity: 200_000,
            rendezvous_blocks: 8,
            affinity_load_factor: 4.0,
            prefix_balance_factor: 1.25,
            adapter_load_on_demand: false,
            picker: PickerKind::MaxScore,
            lora_affinity_queue_threshold: 2.0,
            forward_priority: false,
            running_requests_threshold: 0.0,
            read_hold_weight: 4.0,
        }
    }
}

/// Whether an endpoint serves the target model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelPresence {
    Yes,
    No,
    /// Its model list has not been read yet.
    Unknown,
}

/// One endpoint as the picker sees it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub id: u32,
    pub metrics: Option<&'a EndpointMetrics>,
    /// Seconds since the metrics were scraped.
    pub metrics_age: f64,
    pub healthy: bool,
    pub has_model: ModelPresence,
    /// Requests we sent it since its last scrape (bursts see them before the server reports).
    pub dispatched_since_scrape: u64,
    /// Requests we sent it that have not finished, now and when its metrics were scraped:
    /// [`live_busy`] adds ours (current) to what the server had from others (its running and
    /// waiting at the scrape, less ours then), so completions count at once and nothing is
    /// counted twice. Both 0 where the caller does not track them.
    pub in_flight: u64,
    pub in_flight_at_scrape: u64,
    /// Stable key of its address ([`crate::affinity::endpoint_key`]), for rendezvous affinity.
    pub key: u64,
    /// Its engine is reading a LoRA adapter from disk, as far as the caller knows (a request
    /// that reads one was sent there and has not answered, or its sidecar is loading one):
    /// vLLM reads between steps on the engine's loop, so everything sent there waits it out.
    pub reading: bool,
    /// The read under way there is of this request's own adapter (the caller matched it): a
    /// request joining it waits for what it would otherwise read itself elsewhere.
    pub reading_target: bool,
    /// Whether its host-memory cache holds the request's adapter, as the caller infers it
    /// from the adapters it sent there ([`crate::lora_cache`]); used only where the server
    /// does not report residency. `None`: no guess.
    pub cached: Option<bool>,
}

/// Requests running or waiting on an endpoint now, as best known: ours in flight plus the
/// others the server reported at its last scrape.
pub fn live_busy(c: &Candidate<'_>) -> f64 {
    let reported = c.metrics.map_or(0.0, |m| m.running + m.waiting);
    let others = (reported - c.in_flight_at_scrape as f64).max(0.0);
    c.in_flight as f64 + others
}

/// The queue an endpoint has now, as best known: the waiting it reported plus our requests
/// added since that scrape and still in flight (sent-and-finished ones do not count, unlike
/// `dispatched_since_scrape`, which at thousands of short requests per second would read as
/// a deep queue on idle servers).
pub fn live_waiting(c: &Candidate<'_>) -> f64 {
    let waiting = c.metrics.map_or(0.0, |m| m.waiting);
    waiting + c.in_flight.saturating_sub(c.in_flight_at_scrape) as f64
}

/// The request as the picker sees it.
#[derive(Debug, Clone)]
pub struct PickInput<'a> {
    pub target: &'a str,
    pub is_adapter: bool,
    pub sheddable: bool,
    /// Leading prompt blocks each endpoint has served (from the prefix index).
    pub prefix_matches: &'a HashMap<u32, usize>,
    pub total_blocks: usize,
    /// Random value for tie-breaking.
    pub tie_break: u64,
    /// The prompt prefix's rendezvous key (see `SchedulerConfig::rendezvous_blocks`).
    pub affinity_key: Option<u64>,
    /// The endpoint (its key) the prefix is placed on by [`crate::affinity::Placement`];
    /// `None`: its first endpoint in rendezvous order.
    pub affinity_home: Option<u64>,
    /// Flow control dispatched it because the pool has room: it is not shed, and with a
    /// `runningRequestsThreshold` it goes to an endpoint below that threshold when one is
    /// eligible (so it starts at once instead of queueing on a full server).
    pub admitted: bool,
}

/// Why no endpoint was picked.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PickError {
    #[error("the pool has no endpoints")]
    NoEndpoints,
    #[error("no endpoint of the pool is healthy")]
    NoHealthyEndpoints,
    #[error("model {0:?} is not loaded on any server of this pool")]
    ModelUnavailable(String),
    #[error("the pool is saturated; sheddable request dropped")]
    Saturated,
}

impl PickError {
    /// HTTP status the gateway answers with.
    pub fn status(&self) -> u16 {
        match self {
            PickError::Saturated => 429,
            _ => 503,
        }
    }
}

/// Saturation of one endpoint: `max(queue/threshold, kv/threshold)`; stale counts as 1.
fn endpoint_saturation(cfg: &SchedulerConfig, c: &Candidate<'_>) -> f64 {
    match c.metrics {
        Some(m) if c.metrics_age <= cfg.metrics_staleness_threshold => {
            let q = live_waiting(c) / cfg.queue_depth_threshold.max(1e-9);
            let kv = m.kv_usage / cfg.kv_cache_util_threshold.max(1e-9);
            let busy = if cfg.running_requests_threshold > 0.0 {
                live_busy(c) / cfg.running_requests_threshold
            } else {
                0.0
            };
            q.max(kv).max(busy)
        }
        _ => 1.0,
    }
}

/// Mean saturation over endpoints; `>= 1` means saturated.
pub fn pool_saturation(cfg: &SchedulerConfig, candidates: &[Candidate<'_>]) -> f64 {
    if candidates.is_empty() {
        return 1.0;
    }
    candidates
        .iter()
        .map(|c| endpoint_saturation(cfg, c))
        .sum::<f64>()
        / candidates.len() as f64
}

/// Pool saturation as flow control's dispatcher sees it: [`pool_saturation`] over the healthy
/// endpoints plus `reserved` requests it dispatched that have not been picked yet, each
/// counted as one more request on an average endpoint (against the running threshold when
/// set, else the queue threshold). No healthy endpoint is saturation 1.
pub fn dispatch_saturation(
    cfg: &SchedulerConfig,
    candidates: &[Candidate<'_>],
    reserved: u64,
) -> f64 {
    let (n, sum) = candidates
        .iter()
        .filter(|c| c.healthy)
        .fold((0usize, 0.0), |(n, s), c| {
            (n + 1, s + endpoint_saturation(cfg, c))
        });
    if n == 0 {
        return 1.0;
    }
    let per_request = if cfg.running_requests_threshold > 0.0 {
        cfg.running_requests_threshold
    } else {
        cfg.queue_depth_threshold
    }
    .max(1e-9);
    (sum + reserved as f64 / per_request) / n as f64
}

/// Where an adapter request would run at once: 0 = the adapter is in the running batch, 1 = a
/// LoRA slot is free, 2 = it would wait for a slot (or the endpoint's metrics say nothing).
fn lora_tier(m: Option<&EndpointMetrics>, target: &str) -> u8 {
    let Some(m) = m else { return 2 };
    if m.running_adapters.iter().any(|a| a == target) {
        return 0;
    }
    let Some(max) = m.max_lora else { return 2 };
    let mut in_use: Vec<&str> = m.running_adapters.iter().map(String::as_str).collect();
    for a in &m.waiting_adapters {
        if !in_use.contains(&a.as_str()) {
            in_use.push(a);
        }
    }
    if (in_use.len() as u32) < max { 1 } else { 2 }
}

/// How soon an adapter request would run here: in the running batch (1.0), else by whether
/// a LoRA slot is free and, when the server reports residency, where the adapter is: a GPU
/// slot (no load), the host-memory cache (a copy), or neither (a disk read first).
fn lora_score(m: Option<&EndpointMetrics>, target: &str, guess: Option<bool>) -> f64 {
    let Some(m) = m else { return 0.5 };
    let active = m.running_adapters.iter().any(|a| a == target);
    if active {
        return 1.0;
    }
    let waiting = m.waiting_adapters.iter().any(|a| a == target);
    let tier = residency_or_guess(m, target, guess);
    match m.max_lora {
        Some(max) => {
            let mut in_use: Vec<&str> = m.running_adapters.iter().map(String::as_str).collect();
            for a in &m.waiting_adapters {
                if !in_use.contains(&a.as_str()) {
                    in_use.push(a);
                }
            }
            let free = (in_use.len() as u32) < max;
            match (free, tier) {
                (true, Some(Residency::Gpu)) => 0.9,
                (true, None | Some(Residency::Cpu)) => 0.8,
                (true, Some(Residency::Cold)) => 0.5,
                (false, _) if waiting => 0.6,
                (false, Some(Residency::Gpu)) => 0.4,
                (false, Some(Residency::Cpu)) => 0.2,
                (false, None | Some(Residency::Cold)) => 0.0,
            }
        }
        None => 0.5,
    }
}

/// The disk reads a request would wait out on a candidate: another read under way there
/// (the engine reads between steps, so everything sent there waits), and its own adapter's
/// when the server reports it cold. Counting its own keeps a request leaving a reading server
/// from going where it must read too (where every adapter is registered everywhere, that
/// doubled the reads under moving popularity); joining a read of its own adapter costs
/// neither.
fn read_holds(c: &Candidate<'_>, input: &PickInput<'_>) -> u8 {
    if c.reading_target {
        return 0;
    }
    let own = input.is_adapter
        && c.metrics
            .and_then(|m| residency_or_guess(m, input.target, c.cached))
            == Some(Residency::Cold);
    u8::from(c.reading) + u8::from(own)
}

/// [`residency`], else the caller's guess of whether the host cache holds it (`guess`).
pub fn residency_or_guess(
    m: &EndpointMetrics,
    target: &str,
    guess: Option<bool>,
) -> Option<Residency> {
    residency(m, target).or(guessed_residency(guess))
}

/// The tier a guess of whether the host cache holds an adapter stands for.
pub fn guessed_residency(guess: Option<bool>) -> Option<Residency> {
    match guess {
        Some(true) => Some(Residency::Cpu),
        Some(false) => Some(Residency::Cold),
        None => None,
    }
}

/// Where a server holds an adapter, when it reports residency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    Gpu,
    Cpu,
    /// Registered only (or not at all): read from disk before it runs.
    Cold,
}

/// The adapter's residency on a server that reports it (`None`: it does not).
pub fn residency(m: &EndpointMetrics, target: &str) -> Option<Residency> {
    if m.running_adapters.iter().any(|a| a == target) || m.gpu_adapters.iter().any(|a| a == target)
    {
        return Some(Residency::Gpu);
    }
    if !m.residency_reported {
        return None;
    }
    Some(if m.cpu_adapters.iter().any(|a| a == target) {
        Residency::Cpu
    } else {
        Residency::Cold
    })
}

fn mix(a: u64, b: u64) -> u64 {
    (a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

/// Picks endpoints for a request: indices into `candidates`, best first, followed by up to
/// `cfg.fallbacks` alternatives.
pub fn pick(
    cfg: &SchedulerConfig,
    candidates: &[Candidate<'_>],
    input: &PickInput<'_>,
) -> Result<Vec<usize>, PickError> {
    if candidates.is_empty() {
        return Err(PickError::NoEndpoints);
    }
    let healthy: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].healthy)
        .collect();
    if healthy.is_empty() {
        return Err(PickError::NoHealthyEndpoints);
    }
    let with_model: Vec<usize> = healthy
        .iter()
        .copied()
        .filter(|&i| candidates[i].has_model == ModelPresence::Yes)
        .collect();
    let eligible = if !with_model.is_empty() {
        with_model
    } else {
        let unknown: Vec<usize> = healthy
            .iter()
            .copied()
            .filter(|&i| candidates[i].has_model == ModelPresence::Unknown)
            .collect();
        if !unknown.is_empty() {
            unknown
        } else if cfg.adapter_load_on_demand {
            healthy
        } else {
            return Err(PickError::ModelUnavailable(input.target.to_string()));
        }
    };
    let eligible = if input.admitted && cfg.running_requests_threshold > 0.0 {
        let room: Vec<usize> = eligible
            .iter()
            .copied()
            .filter(|&i| live_busy(&candidates[i]) < cfg.running_requests_threshold)
            .collect();
        if room.is_empty() { eligible } else { room }
    } else {
        eligible
    };
    if input.sheddable && !input.admitted {
        let view: Vec<Candidate<'_>> = eligible.iter().map(|&i| candidates[i].clone()).collect();
        if pool_saturation(cfg, &view) >= 1.0 {
            return Err(PickError::Saturated);
        }
    }
    if cfg.picker == PickerKind::Random {
        let mut order: Vec<(u64, usize)> = eligible
            .iter()
            .map(|&i| (mix(u64::from(candidates[i].id), input.tie_break), i))
            .collect();
        order.sort_unstable();
        return Ok(order
            .into_iter()
            .take(1 + cfg.fallbacks)
            .map(|(_, i)| i)
            .collect());
    }
    let queue = |i: usize| -> f64 {
        let c = &candidates[i];
        c.metrics.map(|m| m.waiting).unwrap_or(0.0) + c.dispatched_since_scrape as f64
    };
    // LoRA affinity filter: upstream only scores affinity, and a min-max normalised queue
    // score of weight 2 outvotes it on a one-request difference, so adapters spread over every
    // server and each batch is starved by the max-loras limit. Keep each adapter where it runs
    // (or where a slot is free) while that server has room, and spill only when it has not.
    let eligible = if input.is_adapter
        && cfg.lora_affinity_weight > 0.0
        && cfg.lora_affinity_queue_threshold > 0.0
    {
        let mut best = 2u8;
        let tiers: Vec<u8> = eligible
            .iter()
            .map(|&i| {
                let c = &candidates[i];
                let held = read_holds(c, input) > 0 && cfg.read_hold_weight > 0.0;
                let tier = if queue(i) < cfg.lora_affinity_queue_threshold && !held {
                    lora_tier(c.metrics, input.target)
                } else {
                    2
                };
                best = best.min(tier);
                tier
            })
            .collect();
        eligible
            .iter()
            .zip(tiers)
            .filter(|&(_, t)| t == best)
            .map(|(&i, _)| i)
            .collect()
    } else {
        eligible
    };
    let active =
        |i: usize| -> f64 { queue(i) + candidates[i].metrics.map(|m| m.running).unwrap_or(0.0) };
    let (mut qmin, mut qmax) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut amin, mut amax) = (f64::INFINITY, f64::NEG_INFINITY);
    for &i in &eligible {
        let q = queue(i);
        qmin = qmin.min(q);
        qmax = qmax.max(q);
        let a = active(i);
        amin = amin.min(a);
        amax = amax.max(a);
    }
    // Rendezvous affinity: every replica names the same preferred endpoint for a prompt
    // prefix (its home while within the load bound, else the first other endpoint in
    // rendezvous order within it), and that endpoint alone gets the prefix score; the load
    // scorers still outvote it on a busy home, one request at a time (a spill that is not
    // learned). The replica-local index is not scored for such prompts: it holds only this
    // replica's picks, so after a spill it would keep the spill server while the other
    // replicas return to the preferred one, splitting the tenant's cache.
    let preferred = match input.affinity_key {
        Some(key)
            // Not for adapters: where an adapter runs is server truth the LoRA affinity
            // filter already reads (the same on every replica), and a hashed preference
            // fights it.
            if cfg.prefix_cache_weight > 0.0 && cfg.rendezvous_blocks > 0 && !input.is_adapter =>
        {
            let keys: Vec<u64> = eligible.iter().map(|&i| candidates[i].key).collect();
            let loads: Vec<f64> = eligible
                .iter()
                .map(|&i| live_busy(&candidates[i]))
                .collect();
            let bound = crate::affinity::load_bound(&loads, cfg.affinity_load_factor);
            let home = input
                .affinity_home
                .and_then(|h| keys.iter().position(|&k| k == h));
            match home {
                Some(j) if crate::affinity::finite(loads[j]) <= bound => Some(j),
                _ => crate::affinity::preferred_where(
                    key,
                    &keys,
                    &loads,
                    cfg.affinity_load_factor,
                    |j| Some(j) != home,
                ),
            }
            .map(|j| eligible[j])
        }
        _ => None,
    };
    let mut scored: Vec<(f64, u64, usize)> = eligible
        .iter()
        .map(|&i| {
            let c = &candidates[i];
            let q = queue(i);
            let queue_score = if qmax > qmin {
                (qmax - q) / (qmax - qmin)
            } else {
                1.0
            };
            let kv_score = 1.0 - c.metrics.map(|m| m.kv_usage).unwrap_or(1.0).clamp(0.0, 1.0);
            let prefix_score = match preferred {
                Some(p) => f64::from(u8::from(p == i)),
                None if input.total_blocks > 0 => {
                    *input.prefix_matches.get(&c.id).unwrap_or(&0) as f64
                        / input.total_blocks as f64
                }
                None => 0.0,
            };
            let active_score = if amax > amin {
                (amax - active(i)) / (amax - amin)
            } else {
                1.0
            };
            let mut score = cfg.active_request_weight * active_score
                + cfg.queue_weight * queue_score
                + cfg.kv_cache_weight * kv_score
                + cfg.prefix_cache_weight * prefix_score;
            if input.is_adapter {
                score += cfg.lora_affinity_weight * lora_score(c.metrics, input.target, c.cached);
            }
            score -= cfg.read_hold_weight * f64::from(read_holds(c, input));
            (score, mix(u64::from(c.id), input.tie_break), i)
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    Ok(scored
        .into_iter()
        .take(1 + cfg.fallbacks)
        .map(|(_, _, i)| i)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(waiting: f64, kv: f64) -> EndpointMetrics {
        EndpointMetrics {
            waiting,
            kv_usage: kv,
            ..Default::default()
        }
    }

    fn cand<'a>(id: u32, metrics: &'a EndpointMetrics) -> Candidate<'a> {
        Candidate {
            id,
            metrics: Some(metrics),
            metrics_age: 0.01,
            healthy: true,
            has_model: ModelPresence::Yes,
            dispatched_since_scrape: 0,
            in_flight: 0,
            in_flight_at_scrape: 0,
            key: crate::affinity::endpoint_key(&id.to_string()),
            reading: false,
            reading_target: false,
            cached: None,
        }
    }

    fn input<'a>(prefix: &'a HashMap<u32, usize>) -> PickInput<'a> {
        PickInput {
            target: "base",
            is_adapter: false,
            sheddable: false,
            prefix_matches: prefix,
            total_blocks: 0,
            tie_break: 1,
            admitted: false,
            affinity_key: None,
            affinity_home: None,
        }
    }

    #[test]
    fn prefers_short_queue_and_free_kv() {
        let (a, b) = (m(5.0, 0.9), m(0.0, 0.1));
        let p = HashMap::new();
        let cfg = SchedulerConfig::default();
        assert_eq!(
            pick(&cfg, &[cand(1, &a), cand(2, &b)], &input(&p)).unwrap(),
            [1]
        );
    }

    #[test]
    fn dispatched_requests_count_between_scrapes() {
        let (a, b) = (m(0.0, 0.1), m(0.0, 0.1));
        let p = HashMap::new();
        let mut ca = cand(1, &a);
        ca.dispatched_since_scrape = 3;
        let cfg = SchedulerConfig::default();
        assert_eq!(pick(&cfg, &[ca, cand(2, &b)], &input(&p)).unwrap(), [1]);
    }

    #[test]
    fn prefix_affinity_wins_when_load_is_equal() {
        let (a, b) = (m(1.0, 0.2), m(1.0, 0.2));
        let p: HashMap<u32, usize> = [(2, 10)].into_iter().collect();
        let mut inp = input(&p);
        inp.total_blocks = 10;
        let cfg = SchedulerConfig::default();
        assert_eq!(pick(&cfg, &[cand(1, &a), cand(2, &b)], &inp).unwrap(), [1]);
    }

    /// Endpoint ids in rendezvous order for `key` (as `cand` keys them).
    fn rendezvous(key: u64, ids: &[u32]) -> Vec<u32> {
        let keys: Vec<u64> = ids
            .iter()
            .map(|id| crate::affinity::endpoint_key(&id.to_string()))
            .collect();
        crate::affinity::order(key, &keys)
            .into_iter()
            .map(|i| ids[i])
            .collect()
    }

    #[test]
    fn a_prefix_goes_to_its_home_on_every_replica_whatever_its_index_says() {
        let key = 0x5eed;
        let ord = rendezvous(key, &[1, 2, 3]);
        let (first, second) = (ord[0], ord[1]);
        let idle = m(0.0, 0.1);
        // This replica once spilled the prefix to `second` (its index says so): the index is
        // not scored, the home is.
        let p: HashMap<u32, usize> = [(second, 20)].into_iter().collect();
        let mut inp = input(&p);
        inp.total_blocks = 20;
        inp.affinity_key = Some(key);
        let cfg = SchedulerConfig::default();
        let mut cands: Vec<Candidate<'_>> =
            [1u32, 2, 3].iter().map(|&id| cand(id, &idle)).collect();
        for _ in 0..3 {
            let got = pick(&cfg, &cands, &inp).unwrap()[0];
            assert_eq!(cands[got].id, first);
            // Whatever order a replica lists its endpoints in.
            cands.rotate_left(1);
        }
        // A placed home (balanced away from the first choice) wins the same way.
        let home_key = crate::affinity::endpoint_key(&ord[2].to_string());
        inp.affinity_home = Some(home_key);
        let got = pick(&cfg, &cands, &inp).unwrap()[0];
        assert_eq!(cands[got].id, ord[2]);
        // A home over the load bound passes the prefix on, the same way everywhere: to the
        // first other endpoint in rendezvous order.
        inp.affinity_home = None;
        let mut hot = m(0.0, 0.1);
        hot.running = 10.0;
        let tight = SchedulerConfig {
            affinity_load_factor: 1.25,
            ..SchedulerConfig::default()
        };
        let cands: Vec<Candidate<'_>> = [1u32, 2, 3]
            .iter()
            .map(|&id| cand(id, if id == first { &hot } else { &idle }))
            .collect();
        let got = pick(&tight, &cands, &inp).unwrap()[0];
        assert_eq!(cands[got].id, second);
        // Rendezvous off: the local index rules (upstream's behaviour).
        let off = SchedulerConfig {
            rendezvous_blocks: 0,
            ..SchedulerConfig::default()
        };
        let got = pick(&off, &cands, &inp).unwrap()[0];
        assert_eq!(cands[got].id, second);
        // Adapters keep the index (LoRA affinity decides where they run).
        let lp: HashMap<u32, usize> = [(ord[2], 20)].into_iter().collect();
        let mut li = input(&lp);
        li.total_blocks = 20;
        li.affinity_key = Some(key);
        li.is_adapter = true;
        li.target = "fr";
        let mut with = m(0.0, 0.1);
        with.running_adapters = vec!["fr".into()];
        with.max_lora = Some(4);
        let cands: Vec<Candidate<'_>> = [1u32, 2, 3].iter().map(|&id| cand(id, &with)).collect();
        let got = pick(&cfg, &cands, &li).unwrap()[0];
        assert_eq!(cands[got].id, ord[2]);
    }

    #[test]
    fn the_home_gets_the_prefix_score_but_load_still_counts() {
        let key = 0xfeed;
        let ord = rendezvous(key, &[1, 2]);
        let (home, other) = (ord[0], ord[1]);
        let p = HashMap::new();
        let mut inp = input(&p);
        inp.total_blocks = 20;
        inp.affinity_key = Some(key);
        let cfg = SchedulerConfig::default();
        let (a, b) = (m(0.0, 0.1), m(0.0, 0.1));
        let cands = [cand(1, &a), cand(2, &b)];
        assert_eq!(cands[pick(&cfg, &cands, &inp).unwrap()[0]].id, home);
        // A much busier home loses on scores.
        let full = m(0.0, 0.79);
        let cands: Vec<Candidate<'_>> = [1u32, 2]
            .iter()
            .map(|&id| {
                let mut c = cand(id, if id == home { &full } else { &a });
                if id == home {
                    c.dispatched_since_scrape = 3;
                }
                c
            })
            .collect();
        assert_eq!(cands[pick(&cfg, &cands, &inp).unwrap()[0]].id, other);
    }

    #[test]
    fn residency_ranks_gpu_then_cpu_then_cold() {
        let mut m = EndpointMetrics {
            max_lora: Some(2),
            residency_reported: true,
            ..Default::default()
        };
        m.gpu_adapters = vec!["g".into()];
        m.cpu_adapters = vec!["c".into()];
        let s = |m: &EndpointMetrics, t: &str| lora_score(Some(m), t, None);
        assert!(s(&m, "g") > s(&m, "c") && s(&m, "c") > s(&m, "x"));
        m.running_adapters = vec!["r1".into(), "r2".into()];
        assert!(s(&m, "g") > s(&m, "c") && s(&m, "c") > s(&m, "x"));
        assert_eq!(residency(&m, "r1"), Some(Residency::Gpu));
        m.residency_reported = false;
        assert_eq!(residency(&m, "x"), None);
    }

    #[test]
    fn adapter_filter_and_affinity() {
        let mut a = m(0.0, 0.1);
        a.max_lora = Some(1);
        a.running_adapters = vec!["other".into()];
        let mut b = m(0.0, 0.1);
        b.max_lora = Some(1);
        b.running_adapters = vec!["fr".into()];
        let p = HashMap::new();
        let mut inp = input(&p);
        inp.target = "fr";
        inp.is_adapter = true;
        let cfg = SchedulerConfig::default();
        assert_eq!(pick(&cfg, &[cand(1, &a), cand(2, &b)], &inp).unwrap(), [1]);
        // Only endpoints that registered the adapter are eligible.
        let mut ca = cand(1, &a);
        ca.has_model = ModelPresence::No;
        let mut cb = cand(2, &b);
        cb.has_model = ModelPresence::No;
        assert_eq!(
            pick(&cfg, &[ca.clone(), cb.clone()], &inp),
            Err(PickError::ModelUnavailable("fr".into()))
        );
        let on_demand = SchedulerConfig {
            adapter_load_on_demand: true,
            ..Default::default()
        };
        assert_eq!(
            pick(&on_demand, &[ca.clone(), cb.clone()], &inp)
                .unwrap()
                .len(),
            1,
            "load on demand routes even when no server lists the adapter"
        );
        cb.has_model = ModelPresence::Yes;
        let (_, c) = (0, m(0.0, 0.0));
        assert_eq!(
            pick(
                &cfg,
                &[ca, cb, {
                    let mut x = cand(3, &c);
                    x.has_model = ModelPresence::No;
                    x
                }],
                &inp
            )
            .unwrap(),
            [1]
        );
    }

    #[test]
    fn sheddable_is_shed_when_saturated_and_stale_counts_as_saturated() {
        let (a, b) = (m(10.0, 0.5), m(6.0, 0.5));
        let p = HashMap::new();
        let mut inp = input(&p);
        inp.sheddable = true;
        let cfg = SchedulerConfig::default();
        assert_eq!(
            pick(&cfg, &[cand(1, &a), cand(2, &b)], &inp),
            Err(PickError::Saturated)
        );
        let idle = m(0.0, 0.0);
        let mut stale = cand(1, &idle);
        stale.metrics_age = 10.0;
        assert_eq!(
            pick(&cfg, &[stale.clone()], &inp),
            Err(PickError::Saturated)
        );
        // Full batches count when the running threshold is set.
        let mut full = m(0.0, 0.1);
        full.running = 7.0;
        let running = SchedulerConfig {
            running_requests_threshold: 7.0,
            ..Default::default()
        };
        assert!(pick(&cfg, &[cand(1, &full)], &inp).is_ok());
        assert_eq!(
            pick(&running, &[cand(1, &full)], &inp),
            Err(PickError::Saturated)
        );
        // Critical work is still served.
        inp.sheddable = false;
        assert_eq!(pick(&cfg, &[stale], &inp).unwrap(), [0]);
    }

    #[test]
    fn live_busy_counts_our_requests_now_and_others_from_the_scrape() {
        let mut x = m(2.0, 0.1);
        x.running = 6.0;
        let mut c = cand(1, &x);
        // Sent-and-finished requests since the scrape are not load.
        c.dispatched_since_scrape = 4;
        assert_eq!((live_busy(&c), live_waiting(&c)), (8.0, 2.0));
        // 8 reported, 5 of them ours then; 3 of ours now (two finished): 3 + 3 others, and
        // nothing added to the queue since.
        c.in_flight_at_scrape = 5;
        c.in_flight = 3;
        assert_eq!((live_busy(&c), live_waiting(&c)), (6.0, 2.0));
        // Ours arrived after the scrape: never negative others; the new ones queue.
        c.in_flight_at_scrape = 12;
        c.in_flight = 14;
        assert_eq!((live_busy(&c), live_waiting(&c)), (14.0, 4.0));
    }

    #[test]
    fn admitted_requests_go_where_a_batch_slot_is_free_and_are_not_shed() {
        let mut full = m(0.0, 0.1);
        full.running = 8.0;
        let mut room = m(0.0, 0.9);
        room.running = 7.0;
        let cfg = SchedulerConfig {
            running_requests_threshold: 8.0,
            kv_cache_weight: 10.0,
            ..Default::default()
        };
        let p = HashMap::new();
        let mut inp = input(&p);
        inp.sheddable = true;
        let cands = [cand(1, &full), cand(2, &room)];
        // Shed when not admitted (mean saturation 0.94 + kv 0.9/0.8 on one = over 1).
        assert_eq!(pick(&cfg, &cands, &inp), Err(PickError::Saturated));
        inp.admitted = true;
        // The KV scorer prefers the full one; the slot filter wins.
        assert_eq!(pick(&cfg, &cands, &inp).unwrap(), [1]);
        // Saturation for the dispatcher adds reserved requests.
        let s0 = dispatch_saturation(&cfg, &cands, 0);
        let s2 = dispatch_saturation(&cfg, &cands, 2);
        assert!((s2 - s0 - 2.0 / 16.0).abs() < 1e-9, "{s0} {s2}");
        let mut down = cands.clone();
        down.iter_mut().for_each(|c| c.healthy = false);
        assert_eq!(dispatch_saturation(&cfg, &down, 0), 1.0);
    }

    #[test]
    fn unhealthy_and_empty() {
        let a = m(0.0, 0.0);
        let p = HashMap::new();
        let cfg = SchedulerConfig::default();
        assert_eq!(pick(&cfg, &[], &input(&p)), Err(PickError::NoEndpoints));
        let mut c = cand(1, &a);
        c.healthy = false;
        assert_eq!(
            pick(&cfg, &[c], &input(&p)),
            Err(PickError::NoHealthyEndpoints)
        );
    }

    #[test]
    fn lora_affinity_filter_keeps_an_adapter_where_it_runs_until_that_server_is_busy() {
        let lora = |waiting: f64, kv: f64, running: &[&str]| {
            let mut x = m(waiting, kv);
            x.max_lora = Some(2);
            x.running_adapters = running.iter().map(|s| s.to_string()).collect();
            x
        };
        let runs_it = lora(1.0, 0.5, &["fr", "other"]);
        let free_slot = lora(0.0, 0.0, &["other"]);
        let full = lora(0.0, 0.0, &["x", "y"]);
        let p = HashMap::new();
        let mut inp = input(&p);
        inp.target = "fr";
        inp.is_adapter = true;
        let cfg = SchedulerConfig::default();
        let cands = [cand(1, &full), cand(2, &free_slot), cand(3, &runs_it)];
        // Scores alone would pick the idle endpoints; affinity keeps the adapter batched.
        assert_eq!(pick(&cfg, &cands, &inp).unwrap(), [2]);
        // Its server's queue reached the threshold: spill to a free slot, never to a full one.
        let busy = lora(2.0, 0.5, &["fr", "other"]);
        let cands = [cand(1, &full), cand(2, &free_slot), cand(3, &busy)];
        assert_eq!(pick(&cfg, &cands, &inp).unwrap(), [1]);
        // Turned off: plain scoring.
        let off = SchedulerConfig {
            lora_affinity_queue_threshold: 0.0,
            ..Default::default()
        };
        let cands = [cand(1, &full), cand(2, &free_slot), cand(3, &runs_it)];
        assert_ne!(pick(&off, &cands, &inp).unwrap(), [2]);
    }

    fn reading(c: Candidate<'_>) -> Candidate<'_> {
        Candidate { reading: true, ..c }
    }

    fn adapter_input<'a>(p: &'a HashMap<u32, usize>, target: &'a str) -> PickInput<'a> {
        let mut inp = input(p);
        inp.target = target;
        inp.is_adapter = true;
        inp
    }

    #[test]
    fn a_server_reading_an_adapter_gets_only_what_cannot_go_elsewhere() {
        let lora = |running: &[&str]| {
            let mut x = m(0.0, 0.1);
            x.max_lora = Some(2);
            x.running_adapters = running.iter().map(|s| s.to_string()).collect();
            x
        };
        let runs_it = lora(&["fr"]);
        let free_slot = lora(&["other"]);
        let p = HashMap::new();
        let inp = adapter_input(&p, "fr");
        let cfg = SchedulerConfig::default();
        let (runs_it, free_slot) = (&runs_it, &free_slot);
        // Where the adapter runs wins while its engine is free...
        let cands = [cand(1, free_slot), cand(2, runs_it)];
        assert_eq!(pick(&cfg, &cands, &inp).unwrap(), [1]);
        // ...and loses to a free slot while it reads another adapter from disk.
        let cands = [cand(1, free_slot), reading(cand(2, runs_it))];
        assert_eq!(pick(&cfg, &cands, &inp).unwrap(), [0]);
        // Every server reading: the usual order again.
        let cands = [reading(cand(1, free_slot)), reading(cand(2, runs_it))];
        assert_eq!(pick(&cfg, &cands, &inp).unwrap(), [1]);
        // A base-model request leaves its prefix's server while that server reads.
        let base = &m(0.0, 0.1);
        let prefix: HashMap<u32, usize> = [(1, 4)].into();
        let mut inp = input(&prefix);
        inp.total_blocks = 4;
        let cands = [cand(1, base), cand(2, base)];
        assert_eq!(pick(&cfg, &cands, &inp).unwrap(), [0]);
        let cands = [reading(cand(1, base)), cand(2, base)];
        assert_eq!(pick(&cfg, &cands, &inp).unwrap(), [1]);
        // Turned off: the read is not seen.
        let off = SchedulerConfig {
            read_hold_weight: 0.0,
            ..Default::default()
        };
        assert_eq!(pick(&off, &cands, &inp).unwrap(), [0]);
    }

    #[test]
    fn a_request_that_would_read_its_own_adapter_counts_that_read_too() {
        let lora = |cached: &[&str]| {
            let mut x = m(0.0, 0.1);
            x.max_lora = Some(2);
            x.residency_reported = true;
            x.cpu_adapters = cached.iter().map(|s| s.to_string()).collect();
            x
        };
        let (cached, cold) = (&lora(&["fr"]), &lora(&[]));
        let p = HashMap::new();
        let inp = adapter_input(&p, "fr");
        let cfg = SchedulerConfig::default();
        // Leaving a server reading another adapter for one where this one must be read gains
        // nothing: its own read holds as long.
        let cands = [reading(cand(1, cached)), cand(2, cold)];
        assert_eq!(pick(&cfg, &cands, &inp).unwrap(), [0]);
        // A server reading another adapter and cold for this one is worse than one cold only.
        let cands = [reading(cand(1, cold)), cand(2, cold)];
        assert_eq!(pick(&cfg, &cands, &inp).unwrap(), [1]);
        // A read of this very adapter under way: joining it beats reading it again elsewhere,
        // though the server's last scrape still says cold.
        let joining = Candidate {
            reading_target: true,
            ..reading(cand(1, cold))
        };
        let cands = [joining, cand(2, cold)];
        assert_eq!(pick(&cfg, &cands, &inp).unwrap(), [0]);
        // Cached somewhere idle: no read at all wins over a read.
        let cands = [cand(1, cold), cand(2, cached)];
        assert_eq!(pick(&cfg, &cands, &inp).unwrap(), [1]);
        // Servers that do not report residency: only reads we know of count.
        let (mut silent_cold, silent) = (cold.clone(), m(0.0, 0.1));
        silent_cold.residency_reported = false;
        silent_cold.max_lora = Some(2);
        let cands = [cand(1, &silent_cold), reading(cand(2, &silent))];
        assert_eq!(pick(&cfg, &cands, &inp).unwrap(), [0]);
        // ...unless the caller guesses from what it sent each server: a guess that the
        // cache holds it wins over one that it does not, and counts as a read there.
        fn guess(c: Candidate<'_>, held: bool) -> Candidate<'_> {
            Candidate {
                cached: Some(held),
                ..c
            }
        }
        let silent_cold = &silent_cold;
        let cands = [
            guess(cand(1, silent_cold), false),
            guess(cand(2, silent_cold), true),
        ];
        assert_eq!(pick(&cfg, &cands, &inp).unwrap(), [1]);
        let cands = [
            guess(reading(cand(1, silent_cold)), true),
            guess(cand(2, silent_cold), false),
        ];
        assert_eq!(
            pick(&cfg, &cands, &inp).unwrap(),
            [0],
            "its own read holds as long"
        );
        // A server that reports residency is believed over the guess.
        let cands = [guess(cand(1, cold), true), cand(2, cached)];
        assert_eq!(pick(&cfg, &cands, &inp).unwrap(), [1]);
    }

    #[test]
    fn active_request_scorer_sees_full_batches() {
        let (mut full, mut half) = (m(0.0, 0.05), m(0.0, 0.06));
        full.running = 8.0;
        half.running = 4.0;
        let p = HashMap::new();
        let cands = [cand(1, &full), cand(2, &half)];
        // Queue and KV alone prefer the full batch (lower KV, equal queues).
        assert_eq!(
            pick(&SchedulerConfig::default(), &cands, &input(&p)).unwrap(),
            [0]
        );
        let cfg = SchedulerConfig {
            active_request_weight: 2.0,
            ..Default::default()
        };
        assert_eq!(pick(&cfg, &cands, &input(&p)).unwrap(), [1]);
    }

    #[test]
    fn random_picker_ignores_scores_but_not_filters() {
        let (busy, idle) = (m(50.0, 0.9), m(0.0, 0.0));
        let p = HashMap::new();
        let cfg = SchedulerConfig {
            picker: PickerKind::Random,
            ..Default::default()
        };
        let mut wins = [0usize; 3];
        for t in 0..300u64 {
            let mut inp = input(&p);
            inp.tie_break = t.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut gone = cand(3, &idle);
            gone.healthy = false;
            let i = pick(&cfg, &[cand(1, &busy), cand(2, &idle), gone], &inp).unwrap()[0];
            wins[i] += 1;
        }
        assert_eq!(wins[2], 0, "unhealthy endpoints stay filtered");
        assert!(wins[0] > 100 && wins[1] > 100, "{wins:?}");
    }

    #[test]
    fn fallbacks_are_ordered() {
        let (a, b, c) = (m(0.0, 0.0), m(2.0, 0.0), m(4.0, 0.0));
        let p = HashMap::new();
        let cfg = SchedulerConfig {
            fallbacks: 2,
            ..Default::default()
        };
        assert_eq!(
            pick(&cfg, &[cand(1, &c), cand(2, &a), cand(3, &b)], &input(&p)).unwrap(),
            [1, 2, 0]
        );
    }
}
