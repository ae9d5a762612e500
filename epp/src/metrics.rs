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
    pub block_size: Option<u32>,
    pub num_gpu_blocks: Option<u32>,
}

/// A scrape that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MetricsError {
    #[error("metric family {0} not found in the scrape (wrong engine type?)")]
    Missing(&'static str),
    #[error("bad sample value on line {line}: {text:?}")]
    BadValue { line: usize, text: String },
}

struct Names {
    waiting: &'static [&'static str],
    running: &'static [&'static str],
    kv: &'static [&'static str],
    waiting_by_reason: &'static str,
    lora_info: &'static str,
    cache_info: &'static str,
    block_label: &'static str,
    blocks_label: &'static str,
}

const VLLM: Names = Names {
    waiting: &["vllm:num_requests_waiting"],
    running: &["vllm:num_requests_running"],
    kv: &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
    waiting_by_reason: "vllm:num_requests_waiting_by_reason",
    lora_info: "vllm:lora_requests_info",
    cache_info: "vllm:cache_config_info",
    block_label: "block_size",
    blocks_label: "num_gpu_blocks",
};

const SGLANG: Names = Names {
    waiting: &["sglang:num_queue_reqs"],
    running: &["sglang:num_running_reqs"],
    kv: &["sglang:token_usage"],
    waiting_by_reason: "",
    lora_info: "",
    cache_info: "sglang:cache_config_info",
    block_label: "page_size",
    blocks_label: "num_pages",
};

const TRTLLM: Names = Names {
    waiting: &["trtllm_num_requests_waiting"],
    running: &["trtllm_num_requests_running"],
    kv: &["trtllm_kv_cache_utilization"],
    waiting_by_reason: "",
    lora_info: "",
    cache_info: "",
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

/// Parses a scrape. Reads only the families routing needs; everything else is skipped after
/// looking at its first bytes.
pub fn parse(engine: EngineType, text: &str) -> Result<EndpointMetrics, MetricsError> {
    let names = match engine {
        EngineType::Vllm => &VLLM,
        EngineType::Sglang => &SGLANG,
        EngineType::TrtLlm => &TRTLLM,
    };
    let prefix = match engine {
        EngineType::Vllm => "vllm:",
        EngineType::Sglang => "sglang:",
        EngineType::TrtLlm => "trtllm_",
    };
    let mut m = EndpointMetrics::default();
    let (mut seen_waiting, mut seen_kv) = (false, false);
    let mut kv_rank = usize::MAX;
    let mut newest_lora = f64::NEG_INFINITY;
    // First byte after the prefix of every wanted family: most lines of a real page are
    // histogram buckets of other families and are rejected on that byte alone.
    let mut wanted = [false; 256];
    for n in names
        .waiting
        .iter()
        .chain(names.running)
        .chain(names.kv)
        .chain([
            &names.waiting_by_reason,
            &names.lora_info,
            &names.cache_info,
        ])
    {
        if let Some(&b) = n.as_bytes().get(prefix.len()) {
            wanted[usize::from(b)] = true;
        }
    }
    for (i, line) in text.lines().enumerate() {
        if !line.starts_with(prefix) {
            continue;
        }
        match line.as_bytes().get(prefix.len()) {
            Some(&b) if wanted[usize::from(b)] => {}
            _ => continue,
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let (label_set, rest) = if line.as_bytes().get(name_end) == Some(&b'{') {
            match line[name_end + 1..].rfind('}') {
                Some(close) => (
                    &line[name_end + 1..name_end + 1 + close],
                    &line[name_end + 2 + close..],
                ),
                None => continue,
            }
        } else {
            ("", &line[name_end..])
        };
        let value = || -> Result<f64, MetricsError> {
            let v = rest.split_whitespace().next().unwrap_or("");
            match v {
                "+Inf" => Ok(f64::INFINITY),
                "-Inf" => Ok(f64::NEG_INFINITY),
                _ => v.parse().map_err(|_| MetricsError::BadValue {
                    line: i + 1,
                    text: line.chars().take(200).collect(),
                }),
            }
        };
        if names.waiting.contains(&name) {
            m.waiting += value()?;
            seen_waiting = true;
        } else if names.running.contains(&name) {
            m.running += value()?;
        } else if let Some(rank) = names.kv.iter().position(|n| *n == name) {
            // Prefer the newer family name when a server exports both; max across engines.
            let v = value()?;
            if rank < kv_rank {
                kv_rank = rank;
                m.kv_usage = v;
            } else if rank == kv_rank {
                m.kv_usage = m.kv_usage.max(v);
            }
            seen_kv = true;
        } else if name == names.waiting_by_reason {
            if label(label_set, "reason").as_deref() == Some("deferred") {
                m.deferred += value()?;
            }
        } else if name == names.lora_info {
            let v = value()?;
            if v > newest_lora {
                newest_lora = v;
                m.max_lora = label(label_set, "max_lora").and_then(|s| s.parse().ok());
                m.running_adapters = label(label_set, "running_lora_adapters")
                    .map(|s| split_list(&s))
                    .unwrap_or_default();
                m.waiting_adapters = label(label_set, "waiting_lora_adapters")
                    .map(|s| split_list(&s))
                    .unwrap_or_default();
            }
        } else if name == names.cache_info {
            m.block_size = label(label_set, names.block_label).and_then(|s| s.parse().ok());
            m.num_gpu_blocks = label(label_set, names.blocks_label).and_then(|s| s.parse().ok());
        }
    }
    if !seen_waiting {
        return Err(MetricsError::Missing(names.waiting[0]));
    }
    if !seen_kv {
        return Err(MetricsError::Missing(names.kv[0]));
    }
    Ok(m)
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
