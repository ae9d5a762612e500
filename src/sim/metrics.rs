//! vLLM-identical Prometheus page: a real vLLM 0.32 scrape is the template, modelled families are live.
//!
//! Every family of the captured page is rendered in its original order with its original HELP
//! and TYPE lines, so a scrape has the size and shape of a real one. Families the simulator
//! models carry live values; the rest (Python GC, HTTP middleware, multimodal cache ...) are
//! rendered with zero values, which is what an idle real server reports for them.

use std::collections::HashMap;
use std::fmt::Write as _;

use super::engine::{EngineCounters, FinishedStats};
use super::prom_text::escape_label;
use super::residency::ResidencyMetrics;

const TEMPLATE: &str = include_str!("../../tests/data/vllm-0.32-metrics-sample.txt");
const TEMPLATE_MODEL: &str = "model_name=\"tiny-llama\"";

/// Content type a real vLLM answers `/metrics` with.
pub const CONTENT_TYPE: &str = "text/plain; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    /// Label text between the braces, with the model name already substituted.
    labels: String,
    /// The `le` / `reason` / `finished_reason` / `source` label value, if any.
    key: Option<String>,
    template_value: f64,
}

#[derive(Debug, Clone)]
struct Family {
    name: String,
    header: String,
    samples: Vec<Sample>,
}

#[derive(Debug, Clone)]
struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn cumulative(&self, le: &str) -> f64 {
        if le == "+Inf" {
            return self.count as f64;
        }
        let bound: f64 = le.parse().unwrap_or(f64::INFINITY);
        self.bounds
            .iter()
            .position(|b| (*b - bound).abs() < 1e-12)
            .map(|i| self.counts[i] as f64)
            .unwrap_or(self.count as f64)
    }
}

/// Live gauges published by the engine after every step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gauges {
    pub running: usize,
    pub waiting: usize,
    pub deferred: usize,
    pub kv_usage: f64,
}

/// How `lora_requests_info` fills its two adapter labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LoraInfoStyle {
    /// vLLM 0.32: both labels list every adapter with requests in flight.
    #[default]
    V032,
    /// Older vLLM: running adapters and waiting-only adapters in separate labels.
    Split,
}

/// The simulator's Prometheus state.
#[derive(Debug)]
pub struct SimMetrics {
    families: Vec<Family>,
    histograms: HashMap<String, Histogram>,
    model_name: String,
    block_size: u32,
    num_gpu_blocks: u32,
    max_loras: usize,
    enable_lora: bool,
    start_unix: f64,
    gauges: Gauges,
    prompt_tokens: u64,
    generation_tokens: u64,
    prefix_queries: u64,
    prefix_hits: u64,
    preemptions: u64,
    lora_disk_loads: u64,
    lora_swaps: u64,
    success_length: u64,
    aborted: u64,
    /// `lora_requests_info` series in creation order: (running, waiting) -> last set (unix s).
    lora_series: Vec<((String, String), f64)>,
    /// The coming residency families (`--lora-residency-metrics`).
    residency: ResidencyMetrics,
}

/// Static facts the page needs.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub model_name: String,
    pub block_size: u32,
    pub num_gpu_blocks: u32,
    pub max_loras: usize,
    pub enable_lora: bool,
    pub start_unix: f64,
    /// Serve the residency families (`--lora-residency-metrics`).
    pub residency_metrics: bool,
}

fn parse_template(model_name: &str) -> Vec<Family> {
    let model_label = format!("model_name=\"{}\"", escape_label(model_name));
    let mut families: Vec<Family> = Vec::new();
    for line in TEMPLATE.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default().to_string();
            families.push(Family {
                name,
                header: format!("{line}\n"),
                samples: Vec::new(),
            });
            continue;
        }
        let Some(fam) = families.last_mut() else {
            continue;
        };
        if line.starts_with('#') {
            fam.header.push_str(line);
            fam.header.push('\n');
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or((line, "0"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels.replace(TEMPLATE_MODEL, &model_label);
        let key = ["le", "reason", "finished_reason", "source"]
            .iter()
            .find_map(|k| label_value(&labels, k));
        fam.samples.push(Sample {
            name: name.to_string(),
            labels,
            key,
            template_value: value.parse().unwrap_or(0.0),
        });
    }
    families
}

fn label_value(labels: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=\"");
    let mut start = 0;
    while let Some(i) = labels[start..].find(&pat) {
        let at = start + i;
        if at == 0 || labels.as_bytes()[at - 1] == b',' {
            let v = &labels[at + pat.len()..];
            return v.find('"').map(|end| v[..end].to_string());
        }
        start = at + pat.len();
    }
    None
}

/// Formats a float the way Python's prometheus_client does (`24.0`, `1.79e+09`).
pub fn go_float(d: f64) -> String {
    if d.is_infinite() {
        return if d > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    if d.is_nan() {
        return "NaN".into();
    }
    let s = python_repr(d);
    if let Some(dot) = s.find('.')
        && d > 0.0
        && dot > 6
        && !s.contains('e')
    {
        let mantissa = format!("{}.{}{}", &s[..1], &s[1..dot], &s[dot + 1..]);
        let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
        return format!("{mantissa}e+0{}", dot - 1);
    }
    s
}

fn python_repr(d: f64) -> String {
    let a = d.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        let s = format!("{d:e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = e.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{m}e{sign}{:02}", exp.abs());
    }
    if d.fract() == 0.0 {
        format!("{d:.1}")
    } else {
        format!("{d}")
    }
}

impl SimMetrics {
    pub fn new(cfg: MetricsConfig) -> Self {
        let families = parse_template(&cfg.model_name);
        let mut histograms = HashMap::new();
        for f in &families {
            if !f.header.contains(" histogram\n") {
                continue;
            }
            let bucket = format!("{}_bucket", f.name);
            let bounds: Vec<f64> = f
                .samples
                .iter()
                .filter(|s| s.name == bucket)
                .filter_map(|s| s.key.as_deref())
                .filter(|k| *k != "+Inf")
                .filter_map(|k| k.parse().ok())
                .collect();
            let n = bounds.len();
            histograms.insert(
                f.name.clone(),
                Histogram {
                    bounds,
                    counts: vec![0; n],
                    sum: 0.0,
                    count: 0,
                },
            );
        }
        Self {
            families,
            histograms,
            model_name: cfg.model_name,
            block_size: cfg.block_size,
            num_gpu_blocks: cfg.num_gpu_blocks,
            max_loras: cfg.max_loras,
            enable_lora: cfg.enable_lora,
            start_unix: cfg.start_unix,
            gauges: Gauges::default(),
            prompt_tokens: 0,
            generation_tokens: 0,
            prefix_queries: 0,
            prefix_hits: 0,
            preemptions: 0,
            lora_disk_loads: 0,
            lora_swaps: 0,
            success_length: 0,
            aborted: 0,
            lora_series: Vec::new(),
            residency: ResidencyMetrics::new(
                cfg.residency_metrics && cfg.enable_lora,
                cfg.max_loras,
            ),
        }
    }

    /// The adapter tiers now: in GPU slots, and only in the CPU cache.
    pub fn set_residency(&mut self, tiers: (Vec<String>, Vec<String>)) {
        self.residency.set(tiers);
    }

    /// The served model name in `model_name` labels.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    fn observe(&mut self, family: &str, v: f64) {
        if let Some(h) = self.histograms.get_mut(family) {
            h.observe(v);
        }
    }

    /// Adapter loads that read from disk, and CPU-to-GPU copies, since start.
    pub fn lora_counts(&self) -> (u64, u64) {
        (self.lora_disk_loads, self.lora_swaps)
    }

    /// Folds one step's counters in.
    pub fn record(&mut self, c: EngineCounters) {
        self.prompt_tokens += c.prompt_tokens;
        self.generation_tokens += c.generation_tokens;
        self.prefix_queries += c.prefix_queries;
        self.prefix_hits += c.prefix_hits;
        self.preemptions += c.preemptions;
        self.lora_disk_loads += c.lora_disk_loads;
        self.lora_swaps += c.lora_swaps;
        for t in c.iteration_tokens {
            self.observe("vllm:iteration_tokens_total", f64::from(t));
        }
        for gap in c.inter_token {
            self.observe("vllm:inter_token_latency_seconds", gap);
        }
        for f in c.finished {
            self.record_finished(&f);
        }
        for l in c.lora_loads {
            self.residency.observe_load(l);
        }
    }

    fn record_finished(&mut self, f: &FinishedStats) {
        self.success_length += 1;
        self.observe("vllm:time_to_first_token_seconds", f.ttft);
        self.observe("vllm:e2e_request_latency_seconds", f.e2e);
        self.observe("vllm:request_queue_time_seconds", f.queue);
        self.observe("vllm:request_prefill_time_seconds", f.prefill);
        self.observe("vllm:request_decode_time_seconds", f.decode);
        self.observe("vllm:request_inference_time_seconds", f.inference);
        self.observe("vllm:request_prompt_tokens", f64::from(f.prompt_tokens));
        self.observe(
            "vllm:request_generation_tokens",
            f64::from(f.generation_tokens),
        );
        self.observe("vllm:request_params_max_tokens", f64::from(f.max_tokens));
        self.observe(
            "vllm:request_max_num_generation_tokens",
            f64::from(f.max_tokens),
        );
        self.observe("vllm:request_params_n", 1.0);
        self.observe("vllm:request_num_preemptions", f64::from(f.preemptions));
        if f.generation_tokens > 1 {
            self.observe(
                "vllm:request_time_per_output_token_seconds",
                f.decode / f64::from(f.generation_tokens - 1),
            );
        }
    }

    /// Counts a request that ended without finishing (client gone, restart).
    pub fn record_abort(&mut self) {
        self.aborted += 1;
    }

    /// Publishes the engine's live gauges and, with LoRA on, sets the current
    /// `lora_requests_info` series to `now_unix` (series are never removed, as in vLLM).
    pub fn set_gauges(&mut self, g: Gauges, running: &[String], waiting: &[String], now_unix: f64) {
        self.gauges = g;
        if !self.enable_lora {
            return;
        }
        let key = (running.join(","), waiting.join(","));
        match self.lora_series.iter_mut().find(|(k, _)| *k == key) {
            Some((_, t)) => *t = now_unix,
            None => self.lora_series.push((key, now_unix)),
        }
    }

    /// Current gauges (for tests and the admin API).
    pub fn gauges(&self) -> &Gauges {
        &self.gauges
    }

    fn live_value(&self, s: &Sample) -> f64 {
        let key = s.key.as_deref().unwrap_or("");
        let g = &self.gauges;
        match s.name.as_str() {
            "vllm:num_requests_running" => g.running as f64,
            "vllm:num_requests_waiting" => g.waiting as f64,
            "vllm:num_requests_waiting_by_reason" => match key {
                "deferred" => g.deferred as f64,
                _ => (g.waiting - g.deferred.min(g.waiting)) as f64,
            },
            "vllm:kv_cache_usage_perc" => g.kv_usage,
            "vllm:prefix_cache_queries_total" => self.prefix_queries as f64,
            "vllm:prefix_cache_hits_total" | "vllm:prompt_tokens_cached_total" => {
                self.prefix_hits as f64
            }
            "vllm:num_preemptions_total" => self.preemptions as f64,
            "vllm:prompt_tokens_total" => self.prompt_tokens as f64,
            "vllm:generation_tokens_total" => self.generation_tokens as f64,
            "vllm:prompt_tokens_by_source_total" => match key {
                "local_compute" => self.prompt_tokens.saturating_sub(self.prefix_hits) as f64,
                "local_cache_hit" => self.prefix_hits as f64,
                _ => 0.0,
            },
            "vllm:prompt_tokens_cached_by_source_total" if key == "device" => {
                self.prefix_hits as f64
            }
            "vllm:request_success_total" => match key {
                "length" => self.success_length as f64,
                "abort" => self.aborted as f64,
                _ => 0.0,
            },
            "process_start_time_seconds" => self.start_unix,
            name if name.ends_with("_created") => self.start_unix,
            name => {
                if let Some((base, suffix)) = name.rsplit_once('_')
                    && let Some(h) = self.histograms.get(base)
                {
                    return match suffix {
                        "bucket" => h.cumulative(key),
                        "sum" => h.sum,
                        "count" => h.count as f64,
                        _ => 0.0,
                    };
                }
                // Info-style series (value 1) keep their value; everything else is idle zero.
                if s.template_value == 1.0
                    && (name.ends_with("_info") || name == "vllm:engine_sleep_state")
                {
                    1.0
                } else {
                    0.0
                }
            }
        }
    }

    /// Renders the whole page.
    pub fn render(&self) -> String {
        self.render_filtered(None)
    }

    /// Renders the page, or with `names` only the samples with those exact names, as
    /// prometheus_client's `name[]` filter does: a family's HELP/TYPE lines come with its
    /// first kept sample, and a family with none is left out.
    pub fn render_filtered(&self, names: Option<&[String]>) -> String {
        let keep = |name: &str| names.is_none_or(|n| n.iter().any(|k| k == name));
        let mut out = String::with_capacity(match names {
            None => TEMPLATE.len() + 4096,
            Some(_) => 4096,
        });
        for f in &self.families {
            let mut header = Some(f.header.as_str());
            let mut start = |out: &mut String| {
                if let Some(h) = header.take() {
                    out.push_str(h);
                }
            };
            if names.is_none() && (f.name != "vllm:lora_requests_info" || self.enable_lora) {
                // The whole page lists a family even while it has no series yet.
                start(&mut out);
            }
            match f.name.as_str() {
                "vllm:lora_requests_info" => {
                    if !self.enable_lora || !keep("vllm:lora_requests_info") {
                        continue;
                    }
                    for ((running, waiting), t) in &self.lora_series {
                        start(&mut out);
                        let _ = writeln!(
                            out,
                            "vllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {}",
                            self.max_loras,
                            escape_label(running),
                            escape_label(waiting),
                            go_float(*t)
                        );
                    }
                }
                "vllm:cache_config_info" => {
                    for s in f.samples.iter().filter(|s| keep(&s.name)) {
                        start(&mut out);
                        let labels = self.cache_config_labels(&s.labels);
                        let _ = writeln!(out, "{}{{{}}} 1.0", s.name, labels);
                    }
                }
                _ => {
                    for s in f.samples.iter().filter(|s| keep(&s.name)) {
                        start(&mut out);
                        let v = go_float(self.live_value(s));
                        if s.labels.is_empty() {
                            let _ = writeln!(out, "{} {v}", s.name);
                        } else {
                            let _ = writeln!(out, "{}{{{}}} {v}", s.name, s.labels);
                        }
                    }
                }
            }
        }
        self.residency.render(names, &mut out);
        out
    }

    fn cache_config_labels(&self, labels: &str) -> String {
        let replace = |labels: String, key: &str, value: String| -> String {
            match label_value(&labels, key) {
                Some(old) => labels.replacen(
                    &format!("{key}=\"{old}\""),
                    &format!("{key}=\"{value}\""),
                    1,
                ),
                None => labels,
            }
        };
        let mut l = labels.to_string();
        l = replace(l, "block_size", self.block_size.to_string());
        l = replace(
            l,
            "effective_attention_block_size",
            self.block_size.to_string(),
        );
        l = replace(l, "num_gpu_blocks", self.num_gpu_blocks.to_string());
        l = replace(
            l,
            "kv_cache_size_tokens",
            (u64::from(self.num_gpu_blocks) * u64::from(self.block_size)).to_string(),
        );
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(enable_lora: bool) -> SimMetrics {
        SimMetrics::new(MetricsConfig {
            model_name: "meta-llama/Llama-3.1-8B-Instruct".into(),
            block_size: 16,
            num_gpu_blocks: 1000,
            max_loras: 2,
            enable_lora,
            start_unix: 1_795_312_411.4,
            residency_metrics: false,
        })
    }

    #[test]
    fn python_float_format() {
        assert_eq!(go_float(24.0), "24.0");
        assert_eq!(go_float(0.0), "0.0");
        assert_eq!(go_float(0.002931118710307823), "0.002931118710307823");
        assert_eq!(go_float(1795312416.8468802), "1.7953124168468802e+09");
        assert_eq!(go_float(1_000_000.0), "1e+06");
        assert_eq!(go_float(123456.5), "123456.5");
        assert_eq!(go_float(0.00001), "1e-05");
        assert_eq!(go_float(f64::INFINITY), "+Inf");
    }

    /// A LoRA server with requests running and waiting for adapter `a1`.
    fn busy_metrics() -> SimMetrics {
        let mut m = metrics(true);
        m.set_gauges(
            Gauges {
                running: 3,
                waiting: 2,
                deferred: 1,
                kv_usage: 0.25,
            },
            &["a1".into()],
            &["a1".into()],
            1_795_312_418.0,
        );
        m
    }

    #[test]
    fn page_has_the_real_shape_and_live_values() {
        let m = busy_metrics();
        let page = m.render();
        let real_lines = TEMPLATE.lines().count();
        let lines = page.lines().count();
        assert!(
            lines + 2 >= real_lines,
            "page has {lines} lines, real vLLM {real_lines}"
        );
        let model = "model_name=\"meta-llama/Llama-3.1-8B-Instruct\"";
        assert!(page.contains(&format!(
            "vllm:num_requests_running{{engine=\"0\",{model}}} 3.0"
        )));
        assert!(page.contains(&format!(
            "vllm:num_requests_waiting{{engine=\"0\",{model}}} 2.0"
        )));
        assert!(page.contains(&format!(
            "vllm:num_requests_waiting_by_reason{{engine=\"0\",{model},reason=\"deferred\"}} 1.0"
        )));
        assert!(page.contains(&format!(
            "vllm:num_requests_waiting_by_reason{{engine=\"0\",{model},reason=\"capacity\"}} 1.0"
        )));
        assert!(page.contains(&format!(
            "vllm:kv_cache_usage_perc{{engine=\"0\",{model}}} 0.25"
        )));
        assert!(page.contains("vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"a1\",waiting_lora_adapters=\"a1\"} 1.795312418e+09"));
        assert!(page.contains("block_size=\"16\""));
        assert!(page.contains("num_gpu_blocks=\"1000\""));
        assert!(!page.contains("tiny-llama"));
    }

    #[test]
    fn lora_series_are_kept_and_newest_is_largest() {
        let mut m = metrics(true);
        m.set_gauges(Gauges::default(), &[], &[], 10.0);
        m.set_gauges(Gauges::default(), &["a".into()], &["a".into()], 11.0);
        m.set_gauges(Gauges::default(), &[], &[], 12.0);
        let page = m.render();
        let series: Vec<&str> = page
            .lines()
            .filter(|l| l.starts_with("vllm:lora_requests_info{"))
            .collect();
        assert_eq!(series.len(), 2);
        assert!(series[0].ends_with(" 12.0"), "{series:?}");
        assert!(series[1].ends_with(" 11.0"), "{series:?}");
    }

    #[test]
    fn lora_family_absent_without_enable_lora() {
        let m = metrics(false);
        assert!(!m.render().contains("vllm:lora_requests_info"));
    }

    #[test]
    fn histograms_count_observations() {
        let mut m = metrics(false);
        let f = FinishedStats {
            adapter: None,
            prompt_tokens: 10,
            generation_tokens: 5,
            max_tokens: 5,
            ttft: 0.07,
            e2e: 0.4,
            queue: 0.01,
            prefill: 0.06,
            decode: 0.33,
            inference: 0.39,
            preemptions: 0,
        };
        m.record(EngineCounters {
            finished: vec![f],
            ..Default::default()
        });
        let page = m.render();
        let model = "model_name=\"meta-llama/Llama-3.1-8B-Instruct\"";
        assert!(page.contains(&format!(
            "vllm:time_to_first_token_seconds_bucket{{engine=\"0\",le=\"0.06\",{model}}} 0.0"
        )));
        assert!(page.contains(&format!(
            "vllm:time_to_first_token_seconds_bucket{{engine=\"0\",le=\"0.08\",{model}}} 1.0"
        )));
        assert!(page.contains(&format!(
            "vllm:time_to_first_token_seconds_count{{engine=\"0\",{model}}} 1.0"
        )));
        assert!(page.contains(&format!(
            "vllm:request_success_total{{engine=\"0\",finished_reason=\"length\",{model}}} 1.0"
        )));
    }

    #[test]
    fn name_filter_keeps_only_those_samples_like_prometheus_client() {
        let m = busy_metrics();
        let whole = m.render();
        let names: Vec<String> = [
            "vllm:num_requests_waiting",
            "vllm:lora_requests_info",
            "nope",
        ]
        .map(String::from)
        .to_vec();
        let page = m.render_filtered(Some(&names));
        let expected: Vec<&str> = whole
            .lines()
            .filter(|l| {
                l.starts_with("vllm:num_requests_waiting{")
                    || l.starts_with("vllm:lora_requests_info{")
                    || l.starts_with("# HELP vllm:num_requests_waiting ")
                    || l.starts_with("# TYPE vllm:num_requests_waiting ")
                    || l.starts_with("# HELP vllm:lora_requests_info ")
                    || l.starts_with("# TYPE vllm:lora_requests_info ")
            })
            .collect();
        assert_eq!(page.lines().collect::<Vec<_>>(), expected);
        assert_eq!(expected.len(), 6, "{page}");
        // The EPP's filtered scrape reads what the whole page says.
        let engine = inferlane_epp::metrics::EngineType::Vllm;
        let query = inferlane_epp::metrics::filter_query(engine);
        let wanted: Vec<String> = query
            .split('&')
            .map(|kv| kv.trim_start_matches("name%5B%5D=").replace("%3A", ":"))
            .collect();
        let filtered = m.render_filtered(Some(&wanted));
        assert!(filtered.len() * 10 < whole.len());
        assert_eq!(
            inferlane_epp::metrics::parse_page(engine, filtered.as_bytes()).unwrap(),
            inferlane_epp::metrics::parse_page(engine, whole.as_bytes()).unwrap()
        );
        assert_eq!(m.render_filtered(Some(&[])), "");
    }
}
