//! vLLM's two adapter tiers: GPU slots (`--max-loras`) and the CPU cache (`--max-cpu-loras`), both LRU; an adapter in neither is read from disk first (its cost grows with its rank).
//!
//! The GPU tier is a subset of the CPU tier, as in vLLM's LRU worker manager: an adapter
//! evicted from the CPU cache leaves its GPU slot too. `/v1/load_lora_adapter` registers and
//! pre-loads into the CPU tier; `/v1/unload_lora_adapter` on vLLM's Python frontend only
//! forgets the name (the slot stays until evicted), on the Rust frontend it frees both tiers.

use std::collections::HashMap;
use std::num::NonZeroUsize;

use lru::LruCache;

/// Where an adapter was when a request needed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    Gpu,
    Cpu,
    /// In neither tier: read from disk, then activated.
    Cold,
}

/// How the tiers behave and what a miss costs (seconds of driver time).
#[derive(Debug, Clone)]
pub struct TierParams {
    pub max_loras: usize,
    pub max_cpu_loras: usize,
    /// CPU -> GPU activation of a cached adapter.
    pub activate: f64,
    /// Disk read per unit of rank (a rank-64 adapter costs 8x a rank-8 one).
    pub disk_per_rank: f64,
    /// Unload frees the tiers (vLLM's Rust frontend); otherwise it only forgets the name.
    pub unload_frees: bool,
}

/// The two tiers and the ranks of the adapters they know.
#[derive(Debug)]
pub struct LoraTiers {
    params: TierParams,
    gpu: LruCache<String, ()>,
    cpu: LruCache<String, ()>,
    ranks: HashMap<String, u32>,
    /// Seconds each load took (disk read and activation), since last taken.
    loads: Vec<f64>,
}

/// Rank assumed for an adapter whose config gave none.
const DEFAULT_RANK: u32 = 8;

impl LoraTiers {
    pub fn new(params: TierParams) -> Self {
        let gpu = NonZeroUsize::new(params.max_loras.max(1)).unwrap_or(NonZeroUsize::MIN);
        let cpu = NonZeroUsize::new(params.max_cpu_loras.max(params.max_loras).max(1))
            .unwrap_or(NonZeroUsize::MIN);
        Self {
            params,
            gpu: LruCache::new(gpu),
            cpu: LruCache::new(cpu),
            ranks: HashMap::new(),
            loads: Vec::new(),
        }
    }

    /// Makes `name` GPU-resident; returns what that cost and where it was found.
    pub fn bring_in(&mut self, name: &str) -> (f64, Residency) {
        if self.gpu.get(name).is_some() {
            self.cpu.promote(name);
            return (0.0, Residency::Gpu);
        }
        let (cost, found) = if self.cpu.get(name).is_some() {
            (self.params.activate, Residency::Cpu)
        } else {
            let rank = self.ranks.get(name).copied().unwrap_or(DEFAULT_RANK);
            let disk = f64::from(rank) * self.params.disk_per_rank;
            self.put_cpu(name);
            (disk + self.params.activate, Residency::Cold)
        };
        self.gpu.put(name.to_string(), ());
        self.loads.push(cost);
        (cost, found)
    }

    fn put_cpu(&mut self, name: &str) {
        if let Some((evicted, ())) = self.cpu.push(name.to_string(), ())
            && evicted != name
        {
            self.gpu.pop(&evicted);
        }
    }

    /// `/v1/load_lora_adapter`: registered with its rank, read into the CPU tier.
    pub fn preload(&mut self, name: &str, rank: Option<u32>) {
        self.ranks
            .insert(name.to_string(), rank.unwrap_or(DEFAULT_RANK));
        self.put_cpu(name);
    }

    /// Registered with its rank, not read (a LoRA resolver's adapter before its first run).
    pub fn register(&mut self, name: &str, rank: Option<u32>) {
        self.ranks
            .insert(name.to_string(), rank.unwrap_or(DEFAULT_RANK));
    }

    /// `/v1/unload_lora_adapter`: the name is forgotten; the memory too on the Rust frontend.
    pub fn unload(&mut self, name: &str) {
        self.ranks.remove(name);
        if self.params.unload_frees {
            self.gpu.pop(name);
            self.cpu.pop(name);
        }
    }

    /// Where `name` is now, without touching the LRU order.
    pub fn residency(&self, name: &str) -> Residency {
        if self.gpu.contains(name) {
            Residency::Gpu
        } else if self.cpu.contains(name) {
            Residency::Cpu
        } else {
            Residency::Cold
        }
    }

    /// Adapters in GPU slots, and those only in the CPU cache (each sorted).
    pub fn resident(&self) -> (Vec<String>, Vec<String>) {
        let mut gpu: Vec<String> = self.gpu.iter().map(|(k, _)| k.clone()).collect();
        let mut cpu: Vec<String> = self
            .cpu
            .iter()
            .filter(|(k, _)| !self.gpu.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        gpu.sort_unstable();
        cpu.sort_unstable();
        (gpu, cpu)
    }

    pub fn max_loras(&self) -> usize {
        self.gpu.cap().get()
    }

    /// The loads' durations since the last call.
    pub fn take_loads(&mut self) -> Vec<f64> {
        std::mem::take(&mut self.loads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tiers(gpu: usize, cpu: usize, frees: bool) -> LoraTiers {
        LoraTiers::new(TierParams {
            max_loras: gpu,
            max_cpu_loras: cpu,
            activate: 0.01,
            disk_per_rank: 0.01,
            unload_frees: frees,
        })
    }

    #[test]
    fn a_miss_costs_by_tier_and_rank() {
        let mut t = tiers(1, 2, false);
        t.preload("big", Some(64));
        // Pre-loaded: in the CPU tier, one activation away.
        assert_eq!(t.bring_in("big"), (0.01, Residency::Cpu));
        assert_eq!(t.bring_in("big"), (0.0, Residency::Gpu));
        // Never loaded, no rank known: read from disk at the default rank.
        let (cost, found) = t.bring_in("small");
        assert_eq!(found, Residency::Cold);
        assert!((cost - (0.08 + 0.01)).abs() < 1e-9, "{cost}");
        // "big" lost its slot to "small" but stays cached: an activation again.
        assert_eq!(t.residency("big"), Residency::Cpu);
        assert_eq!(t.bring_in("big"), (0.01, Residency::Cpu));
        // A third adapter pushes the least recent ("small") out of both tiers.
        t.preload("third", Some(8));
        assert_eq!(t.residency("small"), Residency::Cold);
        let (cost, _) = t.bring_in("small");
        assert!((cost - 0.09).abs() < 1e-9, "{cost}");
        assert_eq!(t.take_loads().len(), 4);
    }

    #[test]
    fn unload_forgets_the_name_or_frees_the_slot_by_frontend() {
        let mut python = tiers(2, 2, false);
        python.preload("a", Some(8));
        python.bring_in("a");
        python.unload("a");
        assert_eq!(python.residency("a"), Residency::Gpu, "the slot stays");
        let mut rust = tiers(2, 2, true);
        rust.preload("a", Some(8));
        rust.bring_in("a");
        rust.unload("a");
        assert_eq!(rust.residency("a"), Residency::Cold);
    }

    proptest! {
        /// Whatever the sequence, the tiers stay within their sizes and GPU is within CPU.
        #[test]
        fn tiers_stay_in_budget_and_nested(ops in prop::collection::vec((0u8..3, 0usize..8), 1..200), gpu in 1usize..4, extra in 0usize..4, frees: bool) {
            let mut t = tiers(gpu, gpu + extra, frees);
            for (op, n) in ops {
                let name = format!("a{n}");
                match op {
                    0 => { t.bring_in(&name); }
                    1 => t.preload(&name, Some(8 * (n as u32 + 1))),
                    _ => t.unload(&name),
                }
                let (g, c) = t.resident();
                prop_assert!(g.len() <= gpu);
                prop_assert!(g.len() + c.len() <= gpu + extra);
                for a in &g {
                    prop_assert!(t.cpu.contains(a), "{a} on GPU but not cached");
                }
            }
        }
    }
}
