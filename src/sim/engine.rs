//! Deterministic continuous-batching model of a vLLM engine: scheduling, KV blocks, LoRA slots, prefix cache.
//!
//! The engine is pure: the driver calls [`Engine::begin_step`] and, `duration` later,
//! [`Engine::end_step`]. All times are seconds on the driver's clock (already scaled by
//! `--time-scale`), so tests run it without any real time passing.

use std::collections::{BTreeSet, VecDeque};
use std::num::NonZeroUsize;

use lru::LruCache;

use super::tiers::{LoraTiers, Residency, TierParams};
use super::waited::StepTimes;
pub use super::waited::Waited;

/// Latency and capacity parameters of the simulated server. Costs are in seconds of driver time.
#[derive(Debug, Clone)]
pub struct EngineParams {
    /// At most this many sequences run in one batch (`--max-num-seqs`).
    pub max_num_seqs: usize,
    /// At most this many distinct adapters in one batch (`--max-loras`).
    pub max_loras: usize,
    /// Tokens per KV block (`--block-size`).
    pub block_size: u32,
    /// KV cache size in blocks (`--num-gpu-blocks`).
    pub num_gpu_blocks: u32,
    /// Prefill token budget per step (`--max-num-batched-tokens`).
    pub max_num_batched_tokens: u32,
    /// Cost of one prefill token that is not in the prefix cache.
    pub prefill_per_token: f64,
    /// Fixed cost of a decode step.
    pub decode_base: f64,
    /// Extra decode cost per running sequence (batching makes inter-token time grow).
    pub decode_per_seq: f64,
    /// Cost of bringing an adapter into a GPU LoRA slot from the CPU cache.
    pub lora_load: f64,
    /// Adapters kept in host memory (`--max-cpu-loras`; at least `max_loras`).
    pub max_cpu_loras: usize,
    /// Disk read of an adapter in neither tier, per unit of its rank.
    pub lora_disk_per_rank: f64,
    /// Unload frees the adapter's slot and cache entry (vLLM's Rust frontend).
    pub lora_unload_frees: bool,
    /// vLLM `--scheduling-policy priority`: waiting requests ordered by priority (lower
    /// first), KV-pressure preemption takes the lowest priority (then newest) first.
    pub priority_scheduling: bool,
}

impl Default for EngineParams {
    fn default() -> Self {
        Self {
            max_num_seqs: 256,
            max_loras: 1,
            block_size: 16,
            num_gpu_blocks: 2048,
            max_num_batched_tokens: 8192,
            prefill_per_token: 0.000_1,
            decode_base: 0.008,
            decode_per_seq: 0.000_15,
            lora_load: 0.02,
            max_cpu_loras: 1,
            lora_disk_per_rank: 0.0,
            lora_unload_frees: false,
            priority_scheduling: false,
        }
    }
}

/// One request as the engine sees it.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub id: u64,
    /// `Some(adapter)` for LoRA requests.
    pub adapter: Option<String>,
    pub prompt_tokens: u32,
    /// Chained hashes of the prompt's full blocks (already seeded per adapter).
    pub prompt_blocks: Vec<u64>,
    pub max_tokens: u32,
    pub arrival: f64,
    /// vLLM `priority` (lower runs earlier); only used with priority scheduling.
    pub priority: i64,
}

/// Something a request observes at the end of a step.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// The first token; `cached_tokens` of the prompt came from the prefix cache; `waited`:
    /// where the time to it went (for the request's `adapter`).
    FirstToken {
        id: u64,
        at: f64,
        cached_tokens: u32,
        waited: Waited,
        adapter: Option<String>,
    },
    /// A later token.
    Token { id: u64, at: f64 },
    /// The request is complete (after its last token event).
    Finished { id: u64, at: f64 },
}

/// Why a request is waiting (vLLM's `num_requests_waiting_by_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitReason {
    Capacity,
    Deferred,
}

#[derive(Debug)]
struct Seq {
    req: EngineRequest,
    generated: u32,
    admitted_at: Option<f64>,
    first_token_at: Option<f64>,
    last_token_at: Option<f64>,
    /// Set once the first prefill finished; a preempted sequence recomputes but emits no new
    /// first token.
    started: bool,
    cached_tokens: u32,
    preemptions: u32,
    wait_reason: WaitReason,
    waited: Waited,
}

impl Seq {
    fn len(&self) -> u32 {
        self.req.prompt_tokens + self.generated
    }
}

/// Latency samples of one finished request, for the server's histograms.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedStats {
    pub adapter: Option<String>,
    pub prompt_tokens: u32,
    pub generation_tokens: u32,
    pub max_tokens: u32,
    pub ttft: f64,
    pub e2e: f64,
    pub queue: f64,
    pub prefill: f64,
    pub decode: f64,
    pub inference: f64,
    pub preemptions: u32,
}

/// Counters and per-step observations the metrics page renders.
#[derive(Debug, Default, Clone)]
pub struct EngineCounters {
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    pub preemptions: u64,
    /// Tokens processed per step (prefill + decode), for `iteration_tokens_total`.
    pub iteration_tokens: Vec<u32>,
    /// Inter-token gaps observed this step.
    pub inter_token: Vec<f64>,
    /// Adapter loads (disk read and activation, seconds) since the last take.
    pub lora_loads: Vec<f64>,
    /// Loads that had to read the adapter from disk.
    pub lora_disk_loads: u64,
    /// Loads that copied the adapter from the CPU cache into a GPU slot.
    pub lora_swaps: u64,
    pub finished: Vec<FinishedStats>,
}

/// The simulated engine.
#[derive(Debug)]
pub struct Engine {
    params: EngineParams,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// The adapter tiers (GPU slots, CPU cache); a miss costs an activation or a disk read.
    tiers: LoraTiers,
    /// Prefix cache over block hashes (LRU), sized to the KV cache.
    prefix: LruCache<u64, ()>,
    in_step: bool,
    /// The step under way (while `in_step`): a request arriving meanwhile waits for what is
    /// left of it.
    step: StepTimes,
    counters: EngineCounters,
    /// Until when an adapter read through the load API holds the engine: vLLM runs it
    /// between steps on the engine's own loop, so every running request waits for it.
    blocked_until: f64,
}

impl Engine {
    pub fn new(params: EngineParams) -> Self {
        let tiers = LoraTiers::new(TierParams {
            max_loras: params.max_loras,
            max_cpu_loras: params.max_cpu_loras,
            activate: params.lora_load,
            disk_per_rank: params.lora_disk_per_rank,
            unload_frees: params.lora_unload_frees,
        });
        let blocks = NonZeroUsize::new(params.num_gpu_blocks.max(1) as usize).expect("nonzero");
        Self {
            params,
            waiting: VecDeque::new(),
            running: Vec::new(),
            tiers,
            prefix: LruCache::new(blocks),
            in_step: false,
            step: StepTimes::default(),
            counters: EngineCounters::default(),
            blocked_until: 0.0,
        }
    }

    /// `/v1/load_lora_adapter` reads an adapter from disk at `now` for `secs`: the engine
    /// runs no step meanwhile (reads queue behind each other). Returns when this read ends.
    pub fn block_for(&mut self, now: f64, secs: f64) -> f64 {
        if secs.is_finite() && secs > 0.0 {
            self.blocked_until = self.blocked_until.max(now) + secs;
        }
        self.blocked_until.max(now)
    }

    pub fn params(&self) -> &EngineParams {
        &self.params
    }

    /// Queues a request.
    pub fn submit(&mut self, req: EngineRequest) {
        let waited = Waited::arriving(req.arrival, self.in_step.then_some(&self.step));
        // Behind every request of the same or a more urgent priority (FIFO within a level).
        let at = if self.params.priority_scheduling {
            self.waiting
                .iter()
                .position(|w| w.req.priority > req.priority)
                .unwrap_or(self.waiting.len())
        } else {
            self.waiting.len()
        };
        self.waiting.insert(
            at,
            Seq {
                req,
                generated: 0,
                admitted_at: None,
                first_token_at: None,
                last_token_at: None,
                started: false,
                cached_tokens: 0,
                preemptions: 0,
                wait_reason: WaitReason::Capacity,
                waited,
            },
        );
    }

    /// Drops a request (client went away). Returns whether it was known.
    pub fn abort(&mut self, id: u64) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.req.id == id) {
            self.waiting.remove(i);
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.req.id == id) {
            self.running.remove(i);
            return true;
        }
        false
    }

    /// True when there is work and no step in flight.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn is_stepping(&self) -> bool {
        self.in_step
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Waiting requests blocked by the LoRA slot limit.
    pub fn num_deferred(&self) -> usize {
        self.waiting
            .iter()
            .filter(|s| s.wait_reason == WaitReason::Deferred)
            .count()
    }

    fn blocks_for(&self, tokens: u32) -> u32 {
        tokens.div_ceil(self.params.block_size)
    }

    fn used_blocks(&self) -> u32 {
        self.running.iter().map(|s| self.blocks_for(s.len())).sum()
    }

    /// Fraction of KV blocks held by running sequences (vLLM's `kv_cache_usage_perc`).
    pub fn kv_usage(&self) -> f64 {
        f64::from(self.used_blocks()) / f64::from(self.params.num_gpu_blocks.max(1))
    }

    /// Adapters with requests in flight (running or waiting), sorted.
    pub fn adapters_in_flight(&self) -> BTreeSet<String> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .filter_map(|s| s.req.adapter.clone())
            .collect()
    }

    /// Adapters in the running batch, sorted.
    pub fn adapters_running(&self) -> BTreeSet<String> {
        self.running
            .iter()
            .filter_map(|s| s.req.adapter.clone())
            .collect()
    }

    /// Adapters only waiting, sorted.
    pub fn adapters_waiting(&self) -> BTreeSet<String> {
        self.waiting
            .iter()
            .filter_map(|s| s.req.adapter.clone())
            .collect()
    }

    /// Takes the counters accumulated since the last call.
    pub fn take_counters(&mut self) -> EngineCounters {
        self.counters.lora_loads = self.tiers.take_loads();
        std::mem::take(&mut self.counters)
    }

    /// The adapter tiers (residency for the metrics page).
    pub fn tiers(&self) -> &LoraTiers {
        &self.tiers
    }

    /// `/v1/load_lora_adapter` succeeded: the adapter is read into the CPU tier.
    pub fn adapter_loaded(&mut self, name: &str, rank: Option<u32>) {
        self.tiers.preload(name, rank);
    }

    /// A LoRA resolver registered an adapter on its first request: known, in neither tier
    /// (the request reads it from disk).
    pub fn adapter_registered(&mut self, name: &str, rank: Option<u32>) {
        self.tiers.register(name, rank);
    }

    /// `/v1/unload_lora_adapter` succeeded.
    pub fn adapter_unloaded(&mut self, name: &str) {
        self.tiers.unload(name);
    }

    /// Forgets everything (a restarted server): queues, slots, prefix cache.
    pub fn reset(&mut self) {
        let params = self.params.clone();
        *self = Engine::new(params);
    }

    /// Starts a step at `now`: admits waiting requests and returns how long the step takes, or
    /// `None` when there is nothing to do.
    pub fn begin_step(&mut self, now: f64) -> Option<f64> {
        if self.in_step || !self.has_work() {
            return None;
        }
        let mut prefill_tokens: u32 = 0;
        let mut load_cost = 0.0;
        let mut active: BTreeSet<String> = self.adapters_running();
        let mut free_blocks = self
            .params
            .num_gpu_blocks
            .saturating_sub(self.used_blocks());
        let mut still_waiting = VecDeque::with_capacity(self.waiting.len());
        let mut blocked = false;
        while let Some(mut seq) = self.waiting.pop_front() {
            if blocked || self.running.len() >= self.params.max_num_seqs {
                seq.wait_reason = WaitReason::Capacity;
                blocked = true;
                still_waiting.push_back(seq);
                continue;
            }
            if let Some(a) = &seq.req.adapter
                && !active.contains(a)
                && active.len() >= self.params.max_loras
            {
                // vLLM skips a request whose adapter has no slot and keeps scanning.
                seq.wait_reason = WaitReason::Deferred;
                still_waiting.push_back(seq);
                continue;
            }
            let need = self.blocks_for(seq.len() + 1);
            let (cached, blocks) = self.lookup_prefix(&seq);
            let uncached = seq.len().saturating_sub(cached);
            let over_budget = prefill_tokens > 0
                && prefill_tokens + uncached > self.params.max_num_batched_tokens;
            if need > free_blocks || over_budget {
                seq.wait_reason = WaitReason::Capacity;
                blocked = true;
                still_waiting.push_back(seq);
                continue;
            }
            free_blocks -= need;
            prefill_tokens += uncached;
            for b in blocks {
                self.prefix.put(b, ());
            }
            if !seq.started {
                seq.cached_tokens = cached;
                self.counters.prefix_queries += u64::from(seq.req.prompt_tokens);
                self.counters.prefix_hits += u64::from(cached);
            }
            if let Some(a) = &seq.req.adapter {
                active.insert(a.clone());
                let (cost, found) = self.tiers.bring_in(a);
                load_cost += cost;
                if !seq.started {
                    seq.waited.own_load = cost;
                    seq.waited.found = Some(found);
                }
                match found {
                    Residency::Cold => self.counters.lora_disk_loads += 1,
                    Residency::Cpu => self.counters.lora_swaps += 1,
                    Residency::Gpu => {}
                }
            }
            if seq.admitted_at.is_none() {
                seq.admitted_at = Some(now);
            }
            self.running.push(seq);
        }
        self.waiting = still_waiting;
        if self.running.is_empty() {
            // Everything is blocked (cannot happen with sane params, but never spin).
            return None;
        }
        let decode =
            self.params.decode_base + self.params.decode_per_seq * self.running.len() as f64;
        let held = (self.blocked_until - now).max(0.0);
        let duration =
            held + decode + self.params.prefill_per_token * f64::from(prefill_tokens) + load_cost;
        for q in &mut self.waiting {
            let deferred = q.wait_reason == WaitReason::Deferred;
            q.waited.waited_step(held, load_cost, duration, deferred);
        }
        for q in self.running.iter_mut().filter(|q| !q.started) {
            q.waited.scheduled(held, load_cost);
        }
        self.step = StepTimes::starting(now, held, load_cost, duration);
        self.counters
            .iteration_tokens
            .push(prefill_tokens + self.running.len() as u32);
        self.in_step = true;
        Some(duration)
    }

    /// Leading cached tokens of `seq` (vLLM always recomputes the last prompt token) and the
    /// block hashes to mark as recently used.
    fn lookup_prefix(&mut self, seq: &Seq) -> (u32, Vec<u64>) {
        let mut hits = 0u32;
        let mut matching = true;
        for b in &seq.req.prompt_blocks {
            if matching && self.prefix.peek(b).is_some() {
                hits += 1;
            } else {
                matching = false;
            }
        }
        let cached = (hits * self.params.block_size).min(seq.req.prompt_tokens.saturating_sub(1));
        (cached, seq.req.prompt_blocks.clone())
    }

    /// Ends the step started by [`Engine::begin_step`] at `now`: every running sequence gets one
    /// token; finished sequences leave and free their blocks; sequences that no longer fit are
    /// preempted (recomputed later, as vLLM does).
    pub fn end_step(&mut self, now: f64) -> Vec<EngineEvent> {
        if !self.in_step {
            return Vec::new();
        }
        self.in_step = false;
        let mut events = Vec::with_capacity(self.running.len());
        let mut keep = Vec::with_capacity(self.running.len());
        for mut seq in std::mem::take(&mut self.running) {
            let id = seq.req.id;
            if seq.generated >= seq.req.max_tokens.max(1) {
                // Preempted and recomputed after already finishing cannot happen; be safe.
                continue;
            }
            seq.generated += 1;
            self.counters.generation_tokens += 1;
            if !seq.started {
                seq.started = true;
                // vLLM counts a prompt when its prefill finishes (IterationStats), the prefix
                // cache's queries and hits when the request is scheduled.
                self.counters.prompt_tokens += u64::from(seq.req.prompt_tokens);
                seq.first_token_at = Some(now);
                events.push(EngineEvent::FirstToken {
                    id,
                    at: now,
                    cached_tokens: seq.cached_tokens,
                    waited: seq.waited,
                    adapter: seq.req.adapter.clone(),
                });
            } else {
                if let Some(last) = seq.last_token_at {
                    self.counters.inter_token.push(now - last);
                }
                events.push(EngineEvent::Token { id, at: now });
            }
            seq.last_token_at = Some(now);
            if seq.generated >= seq.req.max_tokens.max(1) {
                events.push(EngineEvent::Finished { id, at: now });
                let admitted = seq.admitted_at.unwrap_or(seq.req.arrival);
                let first = seq.first_token_at.unwrap_or(now);
                self.counters.finished.push(FinishedStats {
                    adapter: seq.req.adapter.clone(),
                    prompt_tokens: seq.req.prompt_tokens,
                    generation_tokens: seq.generated,
                    max_tokens: seq.req.max_tokens,
                    ttft: first - seq.req.arrival,
                    e2e: now - seq.req.arrival,
                    queue: admitted - seq.req.arrival,
                    prefill: first - admitted,
                    decode: now - first,
                    inference: now - admitted,
                    preemptions: seq.preemptions,
                });
            } else {
                keep.push(seq);
            }
        }
        // Growth may overflow the KV cache: preempt the newest sequences until it fits.
        let mut used: u32 = keep.iter().map(|s| self.blocks_for(s.len() + 1)).sum();
        while used > self.params.num_gpu_blocks && keep.len() > 1 {
            let at = if self.params.priority_scheduling {
                // The least urgent, newest among equals (keep is in admission order).
                let mut at = keep.len() - 1;
                for (i, q) in keep.iter().enumerate() {
                    if q.req.priority >= keep[at].req.priority {
                        at = i;
                    }
                }
                at
            } else {
                keep.len() - 1
            };
            let mut victim = keep.remove(at);
            used -= self.blocks_for(victim.len() + 1);
            victim.preemptions += 1;
            victim.wait_reason = WaitReason::Capacity;
            self.counters.preemptions += 1;
            let back = if self.params.priority_scheduling {
                // Ahead of its own level (it arrived earlier), behind more urgent ones.
                self.waiting
                    .iter()
                    .position(|w| w.req.priority >= victim.req.priority)
                    .unwrap_or(self.waiting.len())
            } else {
                0
            };
            self.waiting.insert(back, victim);
        }
        self.running = keep;
        events
    }
}

/// Runs the engine to completion from `now`, returning every event (for tests and benches).
pub fn run_to_completion(engine: &mut Engine, mut now: f64, max_steps: usize) -> Vec<EngineEvent> {
    let mut events = Vec::new();
    for _ in 0..max_steps {
        match engine.begin_step(now) {
            Some(d) => {
                now += d;
                events.extend(engine.end_step(now));
            }
            None => break,
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::blocks::block_hashes;

    fn req(id: u64, adapter: Option<&str>, prompt: &str, max_tokens: u32) -> EngineRequest {
        let seed = adapter.unwrap_or("base");
        EngineRequest {
            id,
            adapter: adapter.map(str::to_string),
            prompt_tokens: (prompt.len() as u32).div_ceil(4).max(1),
            prompt_blocks: block_hashes(seed, prompt, 64),
            max_tokens,
            arrival: 0.0,
            priority: 0,
        }
    }

    fn first_token(events: &[EngineEvent], id: u64) -> (f64, u32) {
        events
            .iter()
            .find_map(|e| match e {
                EngineEvent::FirstToken {
                    id: i,
                    at,
                    cached_tokens,
                    ..
                } if *i == id => Some((*at, *cached_tokens)),
                _ => None,
            })
            .expect("first token")
    }

    #[test]
    fn every_request_gets_exactly_max_tokens_and_finishes() {
        let mut e = Engine::new(EngineParams {
            max_num_seqs: 2,
            ..Default::default()
        });
        for i in 0..5 {
            e.submit(req(i, None, "hello world", 3 + i as u32));
        }
        let events = run_to_completion(&mut e, 0.0, 1000);
        for i in 0..5u64 {
            let tokens = events
                .iter()
                .filter(|ev| matches!(ev, EngineEvent::FirstToken{id,..} | EngineEvent::Token{id,..} if *id == i))
                .count();
            assert_eq!(tokens as u64, 3 + i);
            assert!(
                events.contains(&EngineEvent::Finished {
                    id: i,
                    at: events
                        .iter()
                        .find_map(|ev| match ev {
                            EngineEvent::Finished { id, at } if *id == i => Some(*at),
                            _ => None,
                        })
                        .unwrap()
                })
            );
        }
        assert!(!e.has_work());
        assert_eq!(e.kv_usage(), 0.0);
    }

    #[test]
    fn an_adapter_read_through_the_load_api_holds_every_request() {
        let mut plain = Engine::new(EngineParams::default());
        plain.submit(req(0, None, "hello", 2));
        let (t0, _) = first_token(&run_to_completion(&mut plain, 0.0, 100), 0);
        let mut held = Engine::new(EngineParams::default());
        // Two reads of 0.3 s queue behind each other on the engine's loop.
        held.block_for(0.0, 0.3);
        held.block_for(0.0, 0.3);
        held.submit(req(0, None, "hello", 2));
        let (t1, _) = first_token(&run_to_completion(&mut held, 0.0, 100), 0);
        assert!((t1 - t0 - 0.6).abs() < 1e-9, "{t1} vs {t0} + 0.6");
        // A read long finished holds nothing.
        let mut later = Engine::new(EngineParams::default());
        later.block_for(0.0, 0.3);
        later.submit(req(0, None, "hello", 2));
        let (t2, _) = first_token(&run_to_completion(&mut later, 5.0, 100), 0);
        assert!((t2 - 5.0 - t0).abs() < 1e-9, "{t2}");
    }

    fn waited(events: &[EngineEvent], id: u64) -> (f64, Waited) {
        events
            .iter()
            .find_map(|e| match e {
                EngineEvent::FirstToken {
                    id: i, at, waited, ..
                } if *i == id => Some((*at - waited.arrival, *waited)),
                _ => None,
            })
            .expect("first token")
    }

    #[test]
    fn a_first_token_says_where_its_wait_went() {
        let mut e = Engine::new(EngineParams {
            max_loras: 1,
            max_cpu_loras: 2,
            lora_disk_per_rank: 0.01,
            ..Default::default()
        });
        e.adapter_registered("big", Some(32));
        e.adapter_registered("small", Some(8));
        // "big" is read from disk (0.32 s) in the first step.
        e.submit(req(0, Some("big"), "p", 2));
        let d = e.begin_step(0.0).expect("a step");
        // Two arrive 0.1 s into that step: a base-model request, and one for "small", which
        // waits for the one LoRA slot until "big"'s request is done, then reads its own.
        for (id, adapter) in [(1, None), (2, Some("small"))] {
            let mut r = req(id, adapter, "p", 2);
            r.arrival = 0.1;
            e.submit(r);
        }
        let mut events = e.end_step(d);
        events.extend(run_to_completion(&mut e, d, 100));
        let activate = EngineParams::default().lora_load;
        let (_, big) = waited(&events, 0);
        assert_eq!(big.found, Some(Residency::Cold));
        assert!((big.own_load - 0.32 - activate).abs() < 1e-9, "{big:?}");
        assert_eq!(big.other_reads, 0.0);
        let (_, base) = waited(&events, 1);
        assert_eq!(base.found, None);
        assert!(
            (base.other_reads - (0.32 + activate - 0.1)).abs() < 1e-9,
            "{base:?}"
        );
        assert!(base.slot == 0.0 && base.queue >= 0.0, "{base:?}");
        let (_, small) = waited(&events, 2);
        assert_eq!(small.found, Some(Residency::Cold));
        assert!((small.own_load - 0.08 - activate).abs() < 1e-9, "{small:?}");
        assert!(small.slot > 0.0, "waited for the slot: {small:?}");
        // The parts add up to the time to first token, less the scheduling step's compute.
        for id in 0..3 {
            let (ttft, w) = waited(&events, id);
            let parts = w.own_load + w.other_reads + w.api_loads + w.slot + w.queue;
            assert!(
                ttft >= parts - 1e-9 && ttft - parts < 0.05,
                "{id}: {ttft} vs {w:?}"
            );
        }
        // A load through the API (a sidecar's) holds the next request as long.
        let mut e = Engine::new(EngineParams::default());
        e.block_for(0.0, 0.3);
        e.submit(req(0, None, "p", 1));
        let (_, w) = waited(&run_to_completion(&mut e, 0.0, 10), 0);
        assert!(
            (w.api_loads - 0.3).abs() < 1e-9 && w.other_reads == 0.0,
            "{w:?}"
        );
    }

    #[test]
    fn more_load_means_higher_ttft() {
        let params = EngineParams {
            max_num_seqs: 4,
            ..Default::default()
        };
        let prompt = "x".repeat(2000);
        let mut light = Engine::new(params.clone());
        light.submit(req(0, None, &prompt, 16));
        let ev = run_to_completion(&mut light, 0.0, 10_000);
        let (t_light, _) = first_token(&ev, 0);

        let mut heavy = Engine::new(params);
        for i in 0..12 {
            heavy.submit(req(i, None, &format!("{i}{prompt}"), 16));
        }
        let ev = run_to_completion(&mut heavy, 0.0, 10_000);
        let (t_last, _) = first_token(&ev, 11);
        assert!(
            t_last > 2.0 * t_light,
            "queued request TTFT {t_last} should exceed 2x the unloaded {t_light}"
        );
    }

    #[test]
    fn priority_scheduling_runs_urgent_requests_first() {
        let run = |priority_scheduling: bool| {
            let mut e = Engine::new(EngineParams {
                max_num_seqs: 1,
                priority_scheduling,
                ..Default::default()
            });
            for (id, priority) in [(1, 0), (2, 5), (3, 5), (4, -1)] {
                e.submit(EngineRequest {
                    priority,
                    ..req(id, None, "p", 2)
                });
            }
            let ev = run_to_completion(&mut e, 0.0, 100);
            let mut order: Vec<(f64, u64)> =
                (1..=4).map(|id| (first_token(&ev, id).0, id)).collect();
            order.sort_by(|a, b| a.0.total_cmp(&b.0));
            order.into_iter().map(|(_, id)| id).collect::<Vec<_>>()
        };
        assert_eq!(
            run(true),
            [4, 1, 2, 3],
            "lower priority value first, FIFO within a level"
        );
        assert_eq!(run(false), [1, 2, 3, 4], "fcfs ignores priorities");
    }

    #[test]
    fn adapters_beyond_slots_wait_as_deferred() {
        let mut e = Engine::new(EngineParams {
            max_loras: 2,
            ..Default::default()
        });
        for (i, a) in ["a1", "a2", "a3", "a4"].iter().enumerate() {
            e.submit(req(i as u64, Some(a), "p", 50));
        }
        assert!(e.begin_step(0.0).is_some());
        assert_eq!(e.num_running(), 2);
        assert_eq!(e.num_waiting(), 2);
        assert_eq!(e.num_deferred(), 2);
        assert_eq!(e.adapters_running().len(), 2);
        assert_eq!(e.adapters_in_flight().len(), 4);
    }

    #[test]
    fn repeated_prompt_hits_prefix_cache_and_is_faster() {
        let mut e = Engine::new(EngineParams::default());
        let prompt = "the quick brown fox jumps over the lazy dog ".repeat(100);
        e.submit(req(1, None, &prompt, 4));
        let ev = run_to_completion(&mut e, 0.0, 1000);
        let (t1, c1) = first_token(&ev, 1);
        assert_eq!(c1, 0);
        let start = 100.0;
        e.submit(EngineRequest {
            arrival: start,
            ..req(2, None, &prompt, 4)
        });
        let ev = run_to_completion(&mut e, start, 1000);
        let (t2, c2) = first_token(&ev, 2);
        assert!(c2 > 0, "second request must hit the prefix cache");
        assert!(t2 - start < t1, "cached TTFT {} vs cold {t1}", t2 - start);
        let counters = e.take_counters();
        assert!(counters.prefix_hits > 0);
        // Per-adapter cache: the same prompt on an adapter misses.
        e.submit(EngineRequest {
            arrival: 200.0,
            ..req(3, Some("a1"), &prompt, 4)
        });
        let ev = run_to_completion(&mut e, 200.0, 1000);
        assert_eq!(first_token(&ev, 3).1, 0);
    }

    #[test]
    fn kv_exhaustion_preempts_and_everything_still_finishes() {
        let mut e = Engine::new(EngineParams {
            num_gpu_blocks: 8,
            block_size: 4,
            ..Default::default()
        });
        for i in 0..4 {
            e.submit(req(i, None, &"y".repeat(16), 20));
        }
        let ev = run_to_completion(&mut e, 0.0, 10_000);
        let finished = ev
            .iter()
            .filter(|e| matches!(e, EngineEvent::Finished { .. }))
            .count();
        assert_eq!(finished, 4);
        assert!(e.take_counters().preemptions > 0);
    }

    #[test]
    fn abort_removes_request() {
        let mut e = Engine::new(EngineParams::default());
        e.submit(req(1, None, "p", 5));
        assert!(e.abort(1));
        assert!(!e.has_work());
        assert!(!e.abort(1));
    }
}
