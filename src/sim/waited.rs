//! Where a request's time to its first token went: its own adapter's read, other reads holding the engine, a LoRA slot, the queue.

use super::tiers::Residency;

/// Where a request's time to its first token went, for the simulator's debug log: why a
/// request was slow (its own adapter's read, other adapters' reads holding the engine, a LoRA
/// slot, a full batch) is what placement and routing change, and TTFT alone does not say.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Waited {
    /// When it arrived (driver clock).
    pub arrival: f64,
    /// Its adapter's load in the step that scheduled it: a disk read, or a copy from host
    /// memory (`found` says which).
    pub own_load: f64,
    /// Where its adapter was when it was scheduled (`None`: no adapter).
    pub found: Option<Residency>,
    /// Time the engine spent reading other requests' adapters while this request waited for
    /// its first token.
    pub other_reads: f64,
    /// Time the engine spent on adapter loads through the load API (a sidecar's) meanwhile.
    pub api_loads: f64,
    /// Other waiting for a LoRA slot (vLLM defers the request while `--max-loras` adapters
    /// run).
    pub slot: f64,
    /// Other waiting: a full batch or KV cache, or the step under way when it arrived.
    pub queue: f64,
}

/// One engine step as a request arriving during it sees it: the load API's reads hold it
/// until `api_end`, then its requests' adapter reads until `reads_end`; it ends at `end`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimes {
    pub api_end: f64,
    pub reads_end: f64,
    pub end: f64,
}

impl StepTimes {
    /// A step starting at `now` for `duration`: `api` of it the load API's reads, then
    /// `loads` its requests' adapter reads.
    pub fn starting(now: f64, api: f64, loads: f64, duration: f64) -> Self {
        Self {
            api_end: now + api,
            reads_end: now + api + loads,
            end: now + duration,
        }
    }
}

impl Waited {
    /// A request arriving at `arrival` while `step` (if any) is under way: it waits for
    /// what is left of it.
    pub fn arriving(arrival: f64, step: Option<&StepTimes>) -> Self {
        let mut w = Self {
            arrival,
            ..Self::default()
        };
        if let Some(step) = step {
            let left = |end: f64| (end - arrival).max(0.0);
            w.api_loads = left(step.api_end);
            w.other_reads = left(step.reads_end) - w.api_loads;
            w.queue = left(step.end) - left(step.reads_end);
        }
        w
    }

    /// A step of `duration` went by with the request left waiting (`deferred`: for a LoRA
    /// slot): `api` of it the load API's reads, `loads` other requests' adapter reads.
    pub fn waited_step(&mut self, api: f64, loads: f64, duration: f64, deferred: bool) {
        self.api_loads += api;
        self.other_reads += loads;
        let rest = duration - api - loads;
        if deferred {
            self.slot += rest;
        } else {
            self.queue += rest;
        }
    }

    /// The step that scheduled it (after its `own_load` is set): it waits out the reads of
    /// the other adapters it scheduled, and the load API's.
    pub fn scheduled(&mut self, api: f64, loads: f64) {
        self.api_loads += api;
        self.other_reads += (loads - self.own_load).max(0.0);
    }
}
