#!/usr/bin/env python3
"""What a scrape costs the model server: prometheus_client rendering a vLLM-sized registry whole vs name[]-filtered.

Rebuilds the families of a real vLLM /metrics page (tests/data/vllm-0.32-metrics-sample.txt) as
live prometheus_client metrics (gauges, counters, histograms with the page's buckets and label
sets), then times generate_latest() on the registry and on the restricted registry that a
`/metrics?name[]=...` request gets (the EPP's seven names). Run by scripts/bench-metrics-render.sh.
"""

import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

NAMES = [
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "vllm:num_requests_waiting_by_reason",
    "vllm:lora_requests_info",
    "vllm:cache_config_info",
]


def build(page: str) -> CollectorRegistry:
    reg = CollectorRegistry()
    for fam in text_string_to_metric_families(page):
        samples = [s for s in fam.samples if not s.name.endswith("_created")]
        if not samples:
            continue
        labelnames = sorted({k for s in samples for k in s.labels if k != "le"})
        if fam.type == "histogram":
            bounds = sorted(
                {float(s.labels["le"]) for s in samples if "le" in s.labels and s.labels["le"] != "+Inf"}
            )
            h = Histogram(fam.name, fam.documentation or "x", labelnames, buckets=bounds or (1.0,), registry=reg)
            for key in {tuple(s.labels.get(k, "") for k in labelnames) for s in samples}:
                (h.labels(*key) if labelnames else h).observe(0.5)
        elif fam.type == "counter":
            c = Counter(fam.name, fam.documentation or "x", labelnames, registry=reg)
            for s in samples:
                key = [s.labels.get(k, "") for k in labelnames]
                (c.labels(*key) if labelnames else c).inc(s.value)
        else:
            g = Gauge(fam.name, fam.documentation or "x", labelnames, registry=reg)
            for s in samples:
                key = [s.labels.get(k, "") for k in labelnames]
                (g.labels(*key) if labelnames else g).set(s.value)
    return reg


def per_call(f, seconds=2.0):
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        f()
        n += 1
    return (time.perf_counter() - t0) / n


def main():
    page = open(sys.argv[1]).read()
    reg = build(page)
    restricted = reg.restricted_registry(NAMES)
    whole, filtered = generate_latest(reg), generate_latest(restricted)
    t_whole = per_call(lambda: generate_latest(reg))
    t_filtered = per_call(lambda: generate_latest(restricted))
    print(f"whole page:    {len(whole):6d} bytes, {len(whole.splitlines()):4d} lines, {t_whole * 1e6:8.1f} us per render")
    print(f"name[] filter: {len(filtered):6d} bytes, {len(filtered.splitlines()):4d} lines, {t_filtered * 1e6:8.1f} us per render")
    for hz_per_replica, replicas in [(20, 1), (20, 2)]:
        rate = hz_per_replica * replicas
        print(
            f"at {rate} scrapes/s ({replicas} EPP replica(s), 50 ms): "
            f"{t_whole * rate * 100:.1f} % vs {t_filtered * rate * 100:.2f} % of one core of the API server process"
        )


if __name__ == "__main__":
    main()
