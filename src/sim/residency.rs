//! vLLM's coming adapter-residency metrics (open vLLM PRs, behind `--lora-residency-metrics`): which adapters sit in GPU slots and which only in the CPU cache, and how long loads take.

use std::fmt::Write;

use super::prom_text::escape_label;

/// Load-duration buckets (seconds): activations take milliseconds, disk reads up to seconds.
const LOAD_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// The residency families' state.
#[derive(Debug, Default)]
pub struct ResidencyMetrics {
    pub on: bool,
    pub max_loras: usize,
    gpu: Vec<String>,
    cpu: Vec<String>,
    /// Cumulative counts per bucket, then the sum and count of all loads.
    buckets: [u64; LOAD_BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl ResidencyMetrics {
    pub fn new(on: bool, max_loras: usize) -> Self {
        Self {
            on,
            max_loras,
            ..Default::default()
        }
    }

    /// The tiers now: adapters in GPU slots, and those only in the CPU cache.
    pub fn set(&mut self, (gpu, cpu): (Vec<String>, Vec<String>)) {
        self.gpu = gpu;
        self.cpu = cpu;
    }

    /// One load's duration (disk read and activation), in seconds.
    pub fn observe_load(&mut self, secs: f64) {
        for (i, b) in LOAD_BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.buckets[i] += 1;
            }
        }
        self.sum += secs;
        self.count += 1;
    }

    /// Appends the families (those `names` keeps, with prometheus_client's filter semantics).
    pub fn render(&self, names: Option<&[String]>, out: &mut String) {
        if !self.on {
            return;
        }
        let keep = |n: &str| names.is_none_or(|k| k.iter().any(|x| x == n));
        let loaded = "vllm:lora_adapter_loaded";
        if keep(loaded) {
            let _ = writeln!(
                out,
                "# HELP {loaded} LoRA adapters resident, by tier (1 per adapter).\n# TYPE {loaded} gauge"
            );
            for (level, names) in [("gpu", &self.gpu), ("cpu", &self.cpu)] {
                for n in names {
                    let _ = writeln!(
                        out,
                        "{loaded}{{adapter_name=\"{}\",level=\"{level}\"}} 1.0",
                        escape_label(n)
                    );
                }
            }
        }
        for (name, help, v) in [
            (
                "vllm:num_gpu_loaded_lora_adapters",
                "LoRA adapters in GPU slots.",
                self.gpu.len(),
            ),
            (
                "vllm:max_gpu_lora_adapters",
                "GPU LoRA slots (--max-loras).",
                self.max_loras,
            ),
        ] {
            if keep(name) {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}.0"
                );
            }
        }
        let h = "vllm:lora_adapter_load_seconds";
        if keep(&format!("{h}_bucket")) || keep(&format!("{h}_count")) || keep(&format!("{h}_sum"))
        {
            let _ = writeln!(
                out,
                "# HELP {h} Time to load a LoRA adapter (disk read and activation).\n# TYPE {h} histogram"
            );
            for (b, c) in LOAD_BUCKETS.iter().zip(self.buckets) {
                let _ = writeln!(out, "{h}_bucket{{le=\"{b}\"}} {c}.0");
            }
            let _ = writeln!(
                out,
                "{h}_bucket{{le=\"+Inf\"}} {}.0\n{h}_count {}.0\n{h}_sum {}",
                self.count, self.count, self.sum
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residency_is_rendered_by_tier_only_when_on() {
        let mut r = ResidencyMetrics::new(true, 4);
        r.set((vec!["a".into()], vec!["b\"q".into()]));
        r.observe_load(0.02);
        r.observe_load(0.6);
        let mut out = String::new();
        r.render(None, &mut out);
        assert!(
            out.contains("vllm:lora_adapter_loaded{adapter_name=\"a\",level=\"gpu\"} 1.0"),
            "{out}"
        );
        assert!(
            out.contains("adapter_name=\"b\\\"q\",level=\"cpu\""),
            "{out}"
        );
        assert!(
            out.contains("vllm:num_gpu_loaded_lora_adapters 1.0"),
            "{out}"
        );
        assert!(out.contains("vllm:max_gpu_lora_adapters 4.0"), "{out}");
        assert!(
            out.contains("vllm:lora_adapter_load_seconds_bucket{le=\"0.025\"} 1.0"),
            "{out}"
        );
        assert!(
            out.contains("vllm:lora_adapter_load_seconds_count 2.0"),
            "{out}"
        );
        let mut filtered = String::new();
        r.render(
            Some(&["vllm:max_gpu_lora_adapters".to_string()]),
            &mut filtered,
        );
        assert_eq!(filtered.lines().count(), 3, "{filtered}");
        let mut off = String::new();
        ResidencyMetrics::new(false, 4).render(None, &mut off);
        assert!(off.is_empty());
    }
}
