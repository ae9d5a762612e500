#!/usr/bin/env python3
"""Writes deploy/observability/grafana-dashboard.json (the Grafana dashboard for the EPP, the
lora-sidecar and bbr). Edit the panels here and re-run; tests/observability.rs evaluates every
expression of the JSON against a real Prometheus."""
import json
import pathlib

R = "$__rate_interval"
rows = [
    ("EPP: traffic", [
        ("Requests/s by model and target", f'sum by (model_name, target_model_name) (rate(inference_objective_request_total[{R}]))', "{{model_name}} -> {{target_model_name}}", "reqps"),
        ("Errors/s by model and code", f'sum by (model_name, error_code) (rate(inference_objective_request_error_total[{R}]))', "{{model_name}} {{error_code}}", "reqps"),
        ("Error ratio by code (5m)", 'inferlane:epp_error_ratio:rate5m', "{{error_code}}", "percentunit"),
        ("Picks/s per endpoint", f'sum by (endpoint) (rate(inference_extension_picks_total[{R}]))', "{{endpoint}}", "reqps"),
    ]),
    ("EPP: latency and tokens", [
        ("Pick latency p99", f'histogram_quantile(0.99, sum by (le) (rate(inference_extension_scheduler_e2e_duration_seconds_bucket[{R}])))', "p99", "s"),
        ("Pick latency p50", f'histogram_quantile(0.5, sum by (le) (rate(inference_extension_scheduler_e2e_duration_seconds_bucket[{R}])))', "p50", "s"),
        ("Request duration p90 by model", f'histogram_quantile(0.9, sum by (le, model_name) (rate(inference_objective_request_duration_seconds_bucket[{R}])))', "{{model_name}}", "s"),
        ("Output tokens/s by model", f'sum by (model_name) (rate(inference_objective_output_tokens_sum[{R}]))', "{{model_name}}", "none"),
    ]),
    ("InferencePool", [
        ("Ready model servers", 'inference_pool_ready_pods', "{{name}}", "none"),
        ("Average KV cache utilization", 'inference_pool_average_kv_cache_utilization', "{{name}}", "percentunit"),
        ("Average queue", 'inference_pool_average_queue_size', "{{name}}", "none"),
        ("Queue per model server", 'inference_pool_per_pod_queue_size', "{{model_server_pod}}", "none"),
    ]),
    ("EPP: health", [
        ("EPP up / ready", 'min by (instance) (up{job="inferlane-epp"}) * on (instance) group_left min by (instance) (inference_extension_ready)', "{{instance}}", "none"),
        ("Model-server scrape errors/s", f'sum by (instance) (rate(inference_extension_model_server_scrape_errors_total[{R}]))', "{{instance}}", "none"),
        ("Pool generation (changes)", 'inference_extension_pool_generation', "{{instance}}", "none"),
        ("Build", 'inference_extension_info', "{{build_ref}} {{commit}}", "none"),
    ]),
    ("Flow control", [
        ("Held requests by priority", 'sum by (priority) (inference_extension_flow_control_queue_size)', "priority {{priority}}", "none"),
        ("Held bytes", 'sum by (inference_pool) (inference_extension_flow_control_queue_bytes)', "{{inference_pool}}", "bytes"),
        ("Pool saturation (dispatcher)", 'inference_extension_flow_control_pool_saturation', "{{inference_pool}}", "none"),
        ("Queue time p90 by priority and outcome", f'histogram_quantile(0.9, sum by (le, priority, outcome) (rate(inference_extension_flow_control_request_queue_duration_seconds_bucket[{R}])))', "{{priority}} {{outcome}}", "s"),
        ("Outcomes/s", f'sum by (outcome) (rate(inference_extension_flow_control_request_queue_duration_seconds_count[{R}]))', "{{outcome}}", "reqps"),
    ]),
    ("lora-sidecar", [
        ("Adapters per state", 'count by (instance, state) (label_replace(lora_syncer_adapter_status == 1, "state", "loaded", "", "") or label_replace(lora_syncer_adapter_status == 0, "state", "not loaded", "", ""))', "{{instance}} {{state}}", "none"),
        ("Adapter status", 'lora_syncer_adapter_status', "{{instance}} {{adapter_name}}", "none"),
        ("Reconcile passes/s by result", f'sum by (result) (rate(lora_syncer_reconciles_total[{R}]))', "{{result}}", "none"),
        ("Adapter failures/s", f'sum by (adapter_name, operation) (rate(lora_syncer_adapter_failures_total[{R}])) or vector(0)', "{{adapter_name}} {{operation}}", "none"),
        ("Config to in-sync p90 (swap-to-loaded)", 'histogram_quantile(0.9, sum by (le) (rate(lora_syncer_config_sync_duration_seconds_bucket[1h])))', "p90", "s"),
        ("Server healthy / in sync / config valid", 'min by (instance) (lora_syncer_server_healthy) + min by (instance) (lora_syncer_in_sync) + min by (instance) (lora_syncer_config_valid)', "{{instance}} (3 = all good)", "none"),
    ]),
    ("bbr", [
        ("Requests/s with a model read", f'sum(rate(bbr_success_total[{R}]))', "model read", "reqps"),
        ("Bodies without a model/s", f'sum(rate(bbr_model_not_in_body_total[{R}])) + sum(rate(bbr_model_not_parsed_total[{R}]))', "no model / not JSON", "reqps"),
        ("bbr up", 'up{job="bbr"}', "{{instance}}", "none"),
    ]),
]

panels = []
pid = 1
y = 0
for title, items in rows:
    panels.append({"type": "row", "title": title, "id": pid, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
    pid += 1
    y += 1
    for i, (ptitle, expr, legend, unit) in enumerate(items):
        panels.append({
            "type": "timeseries", "title": ptitle, "id": pid,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 6, "x": (i % 4) * 6, "y": y + (i // 4) * 8},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [{"refId": "A", "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}}],
        })
        pid += 1
    y += 8 * ((len(items) + 3) // 4)

dash = {
    "title": "inferlane: inference gateway (EPP, lora-sidecar, bbr)",
    "uid": "inferlane-gateway",
    "tags": ["inferlane", "inference-gateway"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "refresh": "10s",
    "time": {"from": "now-1h", "to": "now"},
    "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                              "label": "Prometheus", "current": {}}]},
    "annotations": {"list": []},
    "panels": panels,
}
out = pathlib.Path(__file__).resolve().parent.parent / "deploy/observability/grafana-dashboard.json"
out.write_text(json.dumps(dash, indent=2) + "\n")
print(f"wrote {out} ({sum(1 for p in panels if p['type'] != 'row')} panels)")
