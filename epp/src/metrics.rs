//! Prometheus text -> [`EndpointMetrics`]: a single pass that reads only the families routing needs.

use thiserror::Error;

/// Model-server engine, which decides the metric names (pod label
/// `inference.networking.k8s.io/engine-type`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum EngineType {
    #[default]
    Vllm,
    Sglang,
    #[serde(alias = "trtllm", alias = "tensorrt-llm")]
    TrtLlm,
}

impl EngineType {
    /// Parses the pod label value (unknown values fall back to vLLM).
    pub fn from_label(v: &str) -> Self {
        match v.to_ascii_lowercase().as_str() {
            "sglang" => EngineType::Sglang,
            "trtllm" | "trt-llm" | "tensorrt-llm" | "trtllm-serve" => EngineType::TrtLlm,
            _ => EngineType::Vllm,
        }
    }
}

/// What routing knows about one model server from its last scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointMetrics {
    pub waiting: f64,
    pub running: f64,
    /// KV cache usage in `0..=1`.
    pub kv_usage: f64,
    /// Waiting requests blocked by the LoRA slot limit (vLLM `reason="deferred"`).
    pub deferred: f64,
    /// LoRA slots per batch (`max_lora`), when the server runs with LoRA.
    pub max_lora: Option<u32>,
    /// Adapters with requests running (newest `lora_requests_info` series).
    pub running_adapters: Vec<String>,
    /// Adapters with requests waiting.
    pub waiting_adapters: Vec<String>,
    /// Adapters in a GPU slot and in the host-memory cache, from
    /// `vllm:lora_adapter_loaded{adapter_name,level}` (vLLM's coming residency metrics).
    pub gpu_adapters: Vec<String>,
    pub cpu_adapters: Vec<String>,
    /// The server reports residency (else the lists above say nothing).
    pub residency_reported: bool,
    /// Tokens the engine has processed, prompt and generated (vLLM's counters, summed over
    /// engines): unchanged between two scrapes while requests run or wait, the engine made
    /// no step (it is reading a LoRA adapter, or stuck). `None` where not reported.
    pub progress: Option<f64>,
    /// Prompt tokens found in the prefix cache (`vllm:prefix_cache_hits_total`, summed over
    /// engines): the part of `progress` the engine did not compute. `None` where not reported.
    pub cached: Option<f64>,
    pub block_size: Option<u32>,
    pub num_gpu_blocks: Option<u32>,
}

impl EndpointMetrics {
    /// Requests for `adapter` run or wait there (`lora_requests_info`).
    pub fn runs_or_waits(&self, adapter: &str) -> bool {
        self.running_adapters
            .iter()
            .chain(&self.waiting_adapters)
            .any(|a| a == adapter)
    }
}

/// A scrape that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MetricsError {
    #[error("metric family {0} not found in the scrape (wrong engine type?)")]
    Missing(&'static str),
    #[error("bad sample value on line {line}: {text:?}")]
    BadValue { line: usize, text: String },
    /// NaN, an infinity or a negative count: a broken server must not win every pick (NaN
    /// compares false with everything) nor hide saturation.
    #[error("sample on line {line} is not a finite non-negative number: {text:?}")]
    NotFinite { line: usize, text: String },
}

struct Names {
    waiting: &'static [&'static str],
    running: &'static [&'static str],
    kv: &'static [&'static str],
    waiting_by_reason: &'static str,
    lora_info: &'static str,
    residency: &'static str,
    cache_info: &'static str,
    /// Counters that grow with every engine step (see [`EndpointMetrics::progress`]).
    progress: &'static [&'static str],
    /// Counts prompt tokens served from the prefix cache.
    cached: &'static str,
    block_label: &'static str,
    blocks_label: &'static str,
}

const VLLM: Names = Names {
    waiting: &["vllm:num_requests_waiting"],
    running: &["vllm:num_requests_running"],
    kv: &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
    waiting_by_reason: "vllm:num_requests_waiting_by_reason",
    lora_info: "vllm:lora_requests_info",
    residency: "vllm:lora_adapter_loaded",
    cache_info: "vllm:cache_config_info",
    // Counted per engine step's output (SGLang's and TensorRT-LLM's are not read: not known
    // to be counted per step).
    progress: &["vllm:generation_tokens_total", "vllm:prompt_tokens_total"],
    cached: "vllm:prefix_cache_hits_total",
    block_label: "block_size",
    blocks_label: "num_gpu_blocks",
};

const SGLANG: Names = Names {
    waiting: &["sglang:num_queue_reqs"],
    running: &["sglang:num_running_reqs"],
    kv: &["sglang:token_usage"],
    waiting_by_reason: "",
    lora_info: "",
    residency: "",
    cache_info: "sglang:cache_config_info",
    progress: &[],
    cached: "",
    block_label: "page_size",
    blocks_label: "num_pages",
};

const TRTLLM: Names = Names {
    waiting: &["trtllm_num_requests_waiting"],
    running: &["trtllm_num_requests_running"],
    kv: &["trtllm_kv_cache_utilization"],
    waiting_by_reason: "",
    lora_info: "",
    residency: "",
    cache_info: "",
    progress: &[],
    cached: "",
    block_label: "",
    blocks_label: "",
};

/// Iterates `key="value"` pairs of a label set (handles `\"`, `\\` and `\n` escapes).
pub fn labels(mut s: &str) -> impl Iterator<Item = (&str, std::borrow::Cow<'_, str>)> {
    std::iter::from_fn(move || {
        s = s.trim_start_matches([',', ' ']);
        let eq = s.find('=')?;
        let key = s[..eq].trim();
        let rest = s[eq + 1..].strip_prefix('"')?;
        let bytes = rest.as_bytes();
        let mut i = 0;
        let mut escaped = false;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' => {
                    escaped = true;
                    i += 2;
                    continue;
                }
                b'"' => break,
                _ => i += 1,
            }
        }
        let raw = &rest[..i.min(rest.len())];
        s = rest.get(i + 1..).unwrap_or("");
        let value = if escaped {
            std::borrow::Cow::Owned(
                raw.replace("\\\"", "\"")
                    .replace("\\n", "\n")
                    .replace("\\\\", "\\"),
            )
        } else {
            std::borrow::Cow::Borrowed(raw)
        };
        Some((key, value))
    })
}

fn label<'a>(set: &'a str, key: &str) -> Option<std::borrow::Cow<'a, str>> {
    labels(set).find(|(k, _)| *k == key).map(|(_, v)| v)
}

fn split_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The names one engine's page is read for.
struct Spec {
    names: &'static Names,
    prefix: &'static [u8],
    /// Every family name read, non-empty.
    wanted: Vec<&'static [u8]>,
    /// First byte after the prefix of every wanted family: most lines of a real page are
    /// histogram buckets of other families and are rejected on that byte alone.
    wanted_first: [bool; 256],
    /// Query string asking a prometheus_client server for the wanted samples only.
    filter_query: String,
}

static SPECS: std::sync::LazyLock<[Spec; 3]> = std::sync::LazyLock::new(|| {
    [
        Spec::new(&VLLM, "vllm:"),
        Spec::new(&SGLANG, "sglang:"),
        Spec::new(&TRTLLM, "trtllm_"),
    ]
});

impl Spec {
    fn of(engine: EngineType) -> &'static Spec {
        &SPECS[match engine {
            EngineType::Vllm => 0,
            EngineType::Sglang => 1,
            EngineType::TrtLlm => 2,
        }]
    }

    fn new(names: &'static Names, prefix: &'static str) -> Self {
        let wanted: Vec<&'static [u8]> = names
            .waiting
            .iter()
            .chain(names.running)
            .chain(names.kv)
            .chain(names.progress)
            .copied()
            .chain([
                names.waiting_by_reason,
                names.lora_info,
                names.residency,
                names.cache_info,
                names.cached,
            ])
            .filter(|n| !n.is_empty())
            .map(str::as_bytes)
            .collect();
        assert!(wanted.len() <= 16, "FamilySet holds 16 families");
        let mut wanted_first = [false; 256];
        for n in &wanted {
            if let Some(&b) = n.get(prefix.len()) {
                wanted_first[usize::from(b)] = true;
            }
        }
        let filter_query = wanted
            .iter()
            .map(|n| format!("name%5B%5D={}", percent_encode(n)))
            .collect::<Vec<_>>()
            .join("&");
        Self {
            names,
            prefix: prefix.as_bytes(),
            wanted,
            wanted_first,
            filter_query,
        }
    }

    /// Whether samples of `family` can carry a wanted name: every sample name of a family
    /// starts with the family name (`x`, `x_bucket`, `x_total`, ...), so a family whose name
    /// no wanted name starts with holds nothing we read.
    fn may_hold_wanted(&self, family: &[u8]) -> bool {
        if let Some(&b) = family.get(self.prefix.len())
            && !self.wanted_first[usize::from(b)]
        {
            return false;
        }
        self.wanted.iter().any(|n| n.starts_with(family))
    }
}

/// Encodes a metric name for a query value (`:` and anything but unreserved characters).
fn percent_encode(name: &[u8]) -> String {
    let mut out = String::with_capacity(name.len() + 8);
    for &b in name {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The query string (without `?`) that asks a model server for only the samples routing reads
/// for `engine`: `name[]=` once per sample name, prometheus_client's filter (vLLM and SGLang
/// serve `/metrics` with it). A server that ignores it answers the whole page, which parses
/// the same; one whose filter drops families is caught by comparing [`FamilySet`]s.
pub fn filter_query(engine: EngineType) -> &'static str {
    &Spec::of(engine).filter_query
}

/// Which of the families routing reads a page carried (one bit per wanted name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FamilySet(u16);

impl FamilySet {
    /// Whether every family in `other` is in `self`.
    pub fn contains(self, other: FamilySet) -> bool {
        self.0 & other.0 == other.0
    }

    /// How many families.
    pub fn len(self) -> u32 {
        self.0.count_ones()
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// A parsed scrape and the families it carried.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub metrics: EndpointMetrics,
    pub families: FamilySet,
}

/// What the samples read so far add up to.
struct Acc {
    spec: &'static Spec,
    m: EndpointMetrics,
    families: FamilySet,
    seen_waiting: bool,
    seen_kv: bool,
    kv_rank: usize,
    newest_lora: f64,
    /// A progress (or cached) count was not a finite non-negative number.
    progress_bad: bool,
    cached_bad: bool,
}

/// Adds one engine's count to `sum`. Optional counts (only the stall signal reads them): a
/// bad one leaves this scrape without the sum instead of refusing it.
fn add_count(sum: &mut Option<f64>, bad: &mut bool, v: Result<f64, MetricsError>) {
    match v {
        Ok(v) if !*bad => *sum = Some(sum.unwrap_or(0.0) + v),
        _ => {
            *bad = true;
            *sum = None;
        }
    }
}

/// The family a `# HELP name ...` or `# TYPE name type` line introduces.
fn comment_family(line: &[u8]) -> Option<&[u8]> {
    // Fixed-size compares: no call into memcmp for every comment line.
    let head: [u8; 7] = line.get(..7)?.try_into().ok()?;
    if head != *b"# HELP " && head != *b"# TYPE " {
        return None;
    }
    let rest = &line[7..];
    let end = memchr::memchr(b' ', rest).unwrap_or(rest.len());
    Some(&rest[..end]).filter(|n| !n.is_empty())
}

/// Start of the first line at or after `from` that begins with `#` (or `text.len()`).
fn next_comment_line(text: &[u8], from: usize) -> usize {
    let mut at = from;
    // A `#` inside a label value is not a comment: only one that starts a line counts.
    while let Some(i) = memchr::memchr(b'#', &text[at..]) {
        let hash = at + i;
        if hash == 0 || text[hash - 1] == b'\n' {
            return hash;
        }
        at = hash + 1;
    }
    text.len()
}

impl Acc {
    /// Reads one sample line (at byte `at` of `text`, for error messages).
    fn sample(&mut self, line: &[u8], at: usize, text: &[u8]) -> Result<(), MetricsError> {
        let spec = self.spec;
        let names = spec.names;
        let plen = spec.prefix.len();
        match line.get(plen) {
            Some(&b) if spec.wanted_first[usize::from(b)] && line.starts_with(spec.prefix) => {}
            _ => return Ok(()),
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let name_end = line
            .iter()
            .position(|&b| b == b'{' || b == b' ')
            .unwrap_or(line.len());
        let name = &line[..name_end];
        let Some(bit) = spec.wanted.iter().position(|n| *n == name) else {
            return Ok(());
        };
        self.families.0 |= 1 << bit;
        let (label_set, rest) = if line.get(name_end) == Some(&b'{') {
            match memchr::memrchr(b'}', &line[name_end + 1..]) {
                Some(close) => (
                    &line[name_end + 1..name_end + 1 + close],
                    &line[name_end + 2 + close..],
                ),
                None => return Ok(()),
            }
        } else {
            (&b""[..], &line[name_end..])
        };
        let bad = || MetricsError::BadValue {
            line: memchr::memchr_iter(b'\n', &text[..at]).count() + 1,
            text: String::from_utf8_lossy(line).chars().take(200).collect(),
        };
        let value = || -> Result<f64, MetricsError> {
            let v = std::str::from_utf8(rest)
                .ok()
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("");
            match v {
                "+Inf" => Ok(f64::INFINITY),
                "-Inf" => Ok(f64::NEG_INFINITY),
                _ => v.parse().map_err(|_| bad()),
            }
        };
        // The gauges routing reads: finite and non-negative, or the scrape is refused (the
        // endpoint is then treated as unscraped, not trusted with a poisoned value).
        let gauge = || -> Result<f64, MetricsError> {
            let v = value()?;
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(MetricsError::NotFinite {
                    line: memchr::memchr_iter(b'\n', &text[..at]).count() + 1,
                    text: String::from_utf8_lossy(line).chars().take(200).collect(),
                })
            }
        };
        let label_text = || std::str::from_utf8(label_set).map_err(|_| bad());
        let is = |n: &str| n.as_bytes() == name;
        if names.waiting.iter().any(|n| is(n)) {
            self.m.waiting += gauge()?;
            self.seen_waiting = true;
        } else if names.running.iter().any(|n| is(n)) {
            self.m.running += gauge()?;
        } else if let Some(rank) = names.kv.iter().position(|n| is(n)) {
            // Prefer the newer family name when a server exports both; max across engines.
            let v = gauge()?;
            if rank < self.kv_rank {
                self.kv_rank = rank;
                self.m.kv_usage = v;
            } else if rank == self.kv_rank {
                self.m.kv_usage = self.m.kv_usage.max(v);
            }
            self.seen_kv = true;
        } else if is(names.waiting_by_reason) {
            if label(label_text()?, "reason").as_deref() == Some("deferred") {
                self.m.deferred += gauge()?;
            }
        } else if is(names.lora_info) {
            let v = value()?;
            if v > self.newest_lora {
                let set = label_text()?;
                self.newest_lora = v;
                self.m.max_lora = label(set, "max_lora").and_then(|s| s.parse().ok());
                self.m.running_adapters = label(set, "running_lora_adapters")
                    .map(|s| split_list(&s))
                    .unwrap_or_default();
                self.m.waiting_adapters = label(set, "waiting_lora_adapters")
                    .map(|s| split_list(&s))
                    .unwrap_or_default();
            }
        } else if names.progress.iter().any(|n| is(n)) {
            add_count(&mut self.m.progress, &mut self.progress_bad, gauge());
        } else if !names.cached.is_empty() && is(names.cached) {
            add_count(&mut self.m.cached, &mut self.cached_bad, gauge());
        } else if is(names.residency) {
            let set = label_text()?;
            self.m.residency_reported = true;
            if value()? > 0.0
                && let Some(name) = label(set, "adapter_name")
            {
                match label(set, "level").as_deref() {
                    Some("gpu") => self.m.gpu_adapters.push(name.into_owned()),
                    Some("cpu") => self.m.cpu_adapters.push(name.into_owned()),
                    _ => {}
                }
            }
        } else if is(names.cache_info) {
            let set = label_text()?;
            self.m.block_size = label(set, names.block_label).and_then(|s| s.parse().ok());
            self.m.num_gpu_blocks = label(set, names.blocks_label).and_then(|s| s.parse().ok());
        }
        Ok(())
    }
}

/// Parses a scrape. Reads only the families routing needs; everything else is skipped after
/// looking at its first bytes.
pub fn parse(engine: EngineType, text: &str) -> Result<EndpointMetrics, MetricsError> {
    parse_bytes(engine, text.as_bytes())
}

/// [`parse`] on the raw body: only the few values read are checked for UTF-8.
pub fn parse_bytes(engine: EngineType, text: &[u8]) -> Result<EndpointMetrics, MetricsError> {
    parse_page(engine, text).map(|p| p.metrics)
}

/// [`parse_bytes`], also telling which of the families read the page carried.
///
/// A family introduced by `# HELP`/`# TYPE` that cannot hold a wanted name is jumped over in
/// one vectorised search for the next comment line, instead of line by line (a real vLLM page
/// is mostly histogram buckets). The jump is taken only when the block's first and last
/// lines belong to that family: as the text format requires each family's lines to form one
/// group, the lines between them do too, and samples of an unannotated family that follow
/// (or precede) it are never skipped.
pub fn parse_page(engine: EngineType, text: &[u8]) -> Result<Page, MetricsError> {
    let spec = Spec::of(engine);
    let mut acc = Acc {
        spec,
        m: EndpointMetrics::default(),
        families: FamilySet::default(),
        seen_waiting: false,
        seen_kv: false,
        kv_rank: usize::MAX,
        newest_lora: f64::NEG_INFINITY,
        progress_bad: false,
        cached_bad: false,
    };
    let mut pos = 0;
    while pos < text.len() {
        let end = memchr::memchr(b'\n', &text[pos..]).map_or(text.len(), |i| pos + i);
        let line = &text[pos..end];
        if line.first() == Some(&b'#') {
            if let Some(family) = comment_family(line)
                && !spec.may_hold_wanted(family)
            {
                let block_end = next_comment_line(text, end);
                let mut block = &text[end..block_end];
                while let Some(b) = block.strip_suffix(b"\n") {
                    block = b;
                }
                let block = block.strip_prefix(b"\n").unwrap_or(block);
                let first = memchr::memchr(b'\n', block).map_or(block, |i| &block[..i]);
                let last = memchr::memrchr(b'\n', block).map_or(block, |i| &block[i + 1..]);
                if block.is_empty() || (first.starts_with(family) && last.starts_with(family)) {
                    pos = block_end;
                    continue;
                }
            }
        } else {
            acc.sample(line, pos, text)?;
        }
        pos = end + 1;
    }
    let names = spec.names;
    if !acc.seen_waiting {
        return Err(MetricsError::Missing(names.waiting[0]));
    }
    if !acc.seen_kv {
        return Err(MetricsError::Missing(names.kv[0]));
    }
    Ok(Page {
        metrics: acc.m,
        families: acc.families,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../../tests/data/vllm-0.32-metrics-sample.txt");

    #[test]
    fn parses_real_vllm_page() {
        let m = parse(EngineType::Vllm, SAMPLE).unwrap();
        assert_eq!(m.waiting, 2.0);
        assert_eq!(m.running, 6.0);
        assert!((m.kv_usage - 0.002931118710307823).abs() < 1e-12);
        assert_eq!(m.deferred, 2.0);
        assert_eq!(m.max_lora, Some(2));
        // The newest series (largest timestamp) wins over the older empty one.
        assert_eq!(m.running_adapters, ["a1", "a2"]);
        assert_eq!(m.waiting_adapters, ["a1", "a2"]);
        assert_eq!(m.block_size, Some(128));
        assert_eq!(m.num_gpu_blocks, Some(2048));
        assert_eq!(m.progress, Some(481.0 + 24.0));
        assert_eq!(m.cached, Some(0.0));
    }

    #[test]
    fn old_gpu_cache_name_and_missing_families() {
        let text = "vllm:num_requests_waiting{model_name=\"m\"} 3\nvllm:gpu_cache_usage_perc{model_name=\"m\"} 0.5\n";
        let m = parse(EngineType::Vllm, text).unwrap();
        assert_eq!((m.waiting, m.kv_usage), (3.0, 0.5));
        assert_eq!(
            parse(EngineType::Vllm, "vllm:num_requests_waiting 1\n"),
            Err(MetricsError::Missing("vllm:kv_cache_usage_perc"))
        );
        assert!(matches!(
            parse(EngineType::Vllm, "vllm:num_requests_waiting x\n"),
            Err(MetricsError::BadValue { line: 1, .. })
        ));
    }

    #[test]
    fn non_finite_gauges_are_refused() {
        for bad in ["NaN", "+Inf", "-Inf", "-1"] {
            for fam in [
                "vllm:num_requests_waiting",
                "vllm:num_requests_running",
                "vllm:kv_cache_usage_perc",
            ] {
                let mut page = String::from(
                    "vllm:num_requests_waiting{model_name=\"m\"} 1\nvllm:num_requests_running{model_name=\"m\"} 2\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.5\n",
                );
                page = page.replace(
                    &format!("{fam}{{model_name=\"m\"}} "),
                    &format!("{fam}{{model_name=\"m\"}} {bad} #"),
                );
                let e = parse(EngineType::Vllm, &page).unwrap_err();
                assert!(
                    matches!(e, MetricsError::NotFinite { .. }),
                    "{fam} {bad}: {e}"
                );
            }
        }
        // A broken token count leaves the scrape without a progress count, not refused.
        for bad in ["NaN", "-1", "x"] {
            let page = format!(
                "vllm:num_requests_waiting 1\nvllm:kv_cache_usage_perc 0.5\nvllm:prompt_tokens_total 5\nvllm:generation_tokens_total {bad}\n"
            );
            let m = parse(EngineType::Vllm, &page).unwrap();
            assert_eq!((m.waiting, m.progress), (1.0, None), "{bad}");
            let page = format!(
                "vllm:num_requests_waiting 1\nvllm:kv_cache_usage_perc 0.5\nvllm:prefix_cache_hits_total{{engine=\"0\"}} 3\nvllm:prefix_cache_hits_total{{engine=\"1\"}} {bad}\nvllm:prompt_tokens_total 5\n"
            );
            let m = parse(EngineType::Vllm, &page).unwrap();
            assert_eq!((m.progress, m.cached), (Some(5.0), None), "{bad}");
        }
        let two = "vllm:num_requests_waiting 1\nvllm:kv_cache_usage_perc 0.5\nvllm:prefix_cache_hits_total{engine=\"0\"} 3\nvllm:prefix_cache_hits_total{engine=\"1\"} 4\n";
        assert_eq!(parse(EngineType::Vllm, two).unwrap().cached, Some(7.0));
        // A NaN elsewhere on the page (a histogram sum) is no concern of routing.
        let ok = "vllm:num_requests_waiting 1\nvllm:kv_cache_usage_perc 0.5\nvllm:e2e_request_latency_seconds_sum NaN\n";
        assert_eq!(parse(EngineType::Vllm, ok).unwrap().waiting, 1.0);
    }

    #[test]
    fn sglang_and_trtllm() {
        let s = "sglang:num_queue_reqs{model_name=\"m\"} 4\nsglang:num_running_reqs 2\nsglang:token_usage 0.25\nsglang:cache_config_info{page_size=\"1\",num_pages=\"100\"} 1\n";
        let m = parse(EngineType::Sglang, s).unwrap();
        assert_eq!((m.waiting, m.running, m.kv_usage), (4.0, 2.0, 0.25));
        assert_eq!(m.num_gpu_blocks, Some(100));
        let t = "trtllm_num_requests_waiting 1\ntrtllm_num_requests_running 3\ntrtllm_kv_cache_utilization 0.9\n";
        let m = parse(EngineType::TrtLlm, t).unwrap();
        assert_eq!((m.waiting, m.running, m.kv_usage), (1.0, 3.0, 0.9));
        assert_eq!(EngineType::from_label("SGLang"), EngineType::Sglang);
        assert_eq!(EngineType::from_label("whatever"), EngineType::Vllm);
    }

    /// The page without its comment lines: nothing can be jumped over, every line is read.
    fn uncommented(page: &str) -> String {
        page.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    /// Errors compared without their line numbers (removing comments moves lines).
    fn comparable(r: Result<EndpointMetrics, MetricsError>) -> Result<EndpointMetrics, String> {
        r.map_err(|e| match e {
            MetricsError::BadValue { text, .. } => format!("bad value {text}"),
            MetricsError::NotFinite { text, .. } => format!("not finite {text}"),
            e => e.to_string(),
        })
    }

    #[test]
    fn skipping_families_reads_the_same_as_reading_every_line() {
        assert_eq!(
            parse(EngineType::Vllm, SAMPLE),
            parse(EngineType::Vllm, &uncommented(SAMPLE))
        );
    }

    #[test]
    fn unannotated_samples_after_a_skipped_family_are_read() {
        let page = "# TYPE vllm:iteration_tokens histogram\nvllm:iteration_tokens_bucket{le=\"1\"} 0\nvllm:num_requests_waiting 7\nvllm:kv_cache_usage_perc 0.5\n# TYPE vllm:other gauge\nvllm:other 1\n";
        let m = parse(EngineType::Vllm, page).unwrap();
        assert_eq!((m.waiting, m.kv_usage), (7.0, 0.5));
        // Bytes that are not UTF-8 in a family nobody reads do not fail the scrape.
        let mut raw = b"# TYPE vllm:x gauge\nvllm:x{a=\"\xff\"} 1\n".to_vec();
        raw.extend_from_slice(b"vllm:num_requests_waiting 1\nvllm:kv_cache_usage_perc 0\n");
        assert_eq!(parse_bytes(EngineType::Vllm, &raw).unwrap().waiting, 1.0);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Family names: the wanted ones, names that share their prefixes, and others. A page
        /// holds each at most once, in one group, as the text format requires.
        const FAMILIES: &[&str] = &[
            "vllm:num_requests_waiting",
            "vllm:num_requests_waiting_by_reason",
            "vllm:num_requests_running",
            "vllm:num_requests",
            "vllm:num_preemptions",
            "vllm:kv_cache_usage_perc",
            "vllm:gpu_cache_usage_perc",
            "vllm:lora_requests_info",
            "vllm:cache_config_info",
            "vllm:time_to_first_token_seconds",
            "vllm:e2e_request_latency_seconds",
            "process_cpu_seconds",
        ];
        const SUFFIXES: &[&str] = &["", "_bucket", "_sum", "_count", "_total", "_created"];

        fn sample_line() -> impl Strategy<Value = String> {
            (
                0..SUFFIXES.len(),
                prop::option::of((
                    prop::sample::select(vec![
                        "reason",
                        "max_lora",
                        "running_lora_adapters",
                        "le",
                        "block_size",
                    ]),
                    "[a-z0-9,]{0,6}",
                )),
                prop_oneof![
                    (0u32..1000).prop_map(|v| v.to_string()),
                    Just("+Inf".to_string()),
                    Just("0.25".to_string()),
                    Just("x".to_string()),
                ],
            )
                .prop_map(|(suffix, label, value)| {
                    let labels = label.map_or(String::new(), |(k, v)| format!("{{{k}=\"{v}\"}}"));
                    format!("{}{labels} {value}", SUFFIXES[suffix])
                })
        }

        fn family(name: &'static str) -> impl Strategy<Value = String> {
            (
                any::<bool>(),
                any::<bool>(),
                prop::collection::vec(sample_line(), 0..5),
            )
                .prop_map(move |(help, typ, samples)| {
                    let mut out = String::new();
                    if help {
                        out.push_str(&format!("# HELP {name} Some help.\n"));
                    }
                    if typ {
                        out.push_str(&format!("# TYPE {name} gauge\n"));
                    }
                    for s in samples {
                        out.push_str(&format!("{name}{s}\n"));
                    }
                    out
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            /// Jumping over families is only an optimisation: the result equals reading every
            /// line, for any mix of annotated and unannotated families.
            #[test]
            fn skipping_never_changes_the_result(
                families in prop::sample::subsequence(FAMILIES.to_vec(), 0..=FAMILIES.len())
                    .prop_shuffle()
                    .prop_flat_map(|names| names.into_iter().map(family).collect::<Vec<_>>()),
                stray_comment in any::<bool>(),
            ) {
                let mut page: String = families.concat();
                if stray_comment {
                    page.push_str("# a comment\n");
                }
                prop_assert_eq!(
                    comparable(parse(EngineType::Vllm, &page)),
                    comparable(parse(EngineType::Vllm, &uncommented(&page)))
                );
            }
        }
    }

    /// What prometheus_client answers for `name[]=...`: only samples with those exact names,
    /// under their families' HELP/TYPE lines, families without a matching sample left out.
    fn restricted(page: &str, names: &[&str]) -> String {
        let mut out = String::new();
        let mut header = String::new();
        for line in page.lines() {
            if line.starts_with("# HELP") {
                header.clear();
            }
            if line.starts_with('#') {
                header.push_str(line);
                header.push('\n');
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap_or("");
            if names.contains(&name) {
                out.push_str(&std::mem::take(&mut header));
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    #[test]
    fn filtered_page_reads_the_same_as_the_whole_page() {
        let q = filter_query(EngineType::Vllm);
        assert!(
            q.starts_with(
                "name%5B%5D=vllm%3Anum_requests_waiting&name%5B%5D=vllm%3Anum_requests_running&"
            ),
            "{q}"
        );
        let names: Vec<String> = q
            .split('&')
            .map(|kv| kv.trim_start_matches("name%5B%5D=").replace("%3A", ":"))
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let whole = parse_page(EngineType::Vllm, SAMPLE.as_bytes()).unwrap();
        let filtered_text = restricted(SAMPLE, &names);
        assert!(
            filtered_text.len() < SAMPLE.len() / 10,
            "{}",
            filtered_text.len()
        );
        let filtered = parse_page(EngineType::Vllm, filtered_text.as_bytes()).unwrap();
        assert_eq!(filtered, whole);
        // waiting, running, kv, waiting_by_reason, lora_requests_info, cache_config_info,
        // generation and prompt tokens, prefix cache hits.
        assert_eq!(whole.families.len(), 9);
        // A filter that dropped a family is told apart from one that kept them all.
        let no_lora: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| *n != "vllm:lora_requests_info")
            .collect();
        let partial =
            parse_page(EngineType::Vllm, restricted(SAMPLE, &no_lora).as_bytes()).unwrap();
        assert!(!partial.families.contains(whole.families));
        assert!(whole.families.contains(partial.families));
        assert_eq!(
            filter_query(EngineType::TrtLlm),
            "name%5B%5D=trtllm_num_requests_waiting&name%5B%5D=trtllm_num_requests_running&name%5B%5D=trtllm_kv_cache_utilization"
        );
    }

    #[test]
    fn escaped_labels() {
        let l: Vec<(String, String)> = labels(r#"a="x\"y",b="",c="1,2""#)
            .map(|(k, v)| (k.to_string(), v.into_owned()))
            .collect();
        assert_eq!(
            l,
            [
                ("a".into(), "x\"y".into()),
                ("b".into(), "".into()),
                ("c".into(), "1,2".into())
            ]
        );
    }
}
