//! Smoke run of the routing-quality harness: tiny fleet, seconds; checks only that it works.

mod common;

use std::process::Command;

use common::envoy_bin;

#[test]
fn route_bench_smoke_writes_well_formed_results() {
    let out = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let bin = env!("CARGO_BIN_EXE_route-bench");
    let status = Command::new(bin)
        .current_dir(root)
        .args(["bench/workloads/smoke.yaml", "--out"])
        .arg(out.path())
        .arg("--envoy")
        .arg(envoy_bin())
        .args(["--request-timeout", "30", "--log-filter", "warn"])
        .status()
        .expect("route-bench runs");
    assert!(status.success(), "route-bench failed: {status}");

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).unwrap())
            .unwrap();
    let runs = summary.as_array().unwrap();
    let policies: Vec<&str> = runs.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(
        policies,
        [
            "round-robin",
            "random",
            "least-queue",
            "default",
            "flow-vtc"
        ]
    );
    for r in runs {
        let sent = r["sent"].as_u64().unwrap();
        let ok = r["ok"].as_u64().unwrap();
        assert!(sent > 0, "{r}");
        assert_eq!(
            sent,
            ok + r["shed"].as_u64().unwrap() + r["errors"].as_u64().unwrap(),
            "every request is accounted for: {r}"
        );
        assert!(ok > 0, "some requests succeed: {r}");
        assert!(r["ttft_p90"].as_f64().unwrap() >= r["ttft_p50"].as_f64().unwrap());
        assert!(r["output_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(!r["requests_per_server"].as_object().unwrap().is_empty());
    }

    let csv = std::fs::read_to_string(out.path().join("requests.csv")).unwrap();
    let mut lines = csv.lines();
    let header = lines.next().unwrap();
    let cols = header.split(',').count();
    let rows: Vec<&str> = lines.collect();
    assert!(rows.len() >= runs.len());
    for row in &rows {
        // No field of the smoke run holds a comma, so a plain split counts columns.
        assert_eq!(row.split(',').count(), cols, "{row}");
    }
    let summary_csv = std::fs::read_to_string(out.path().join("summary.csv")).unwrap();
    assert_eq!(summary_csv.lines().count(), 1 + runs.len());
    let md = std::fs::read_to_string(out.path().join("summary.md")).unwrap();
    assert!(md.contains("| 8 | default |"), "{md}");
    for plot in [
        "smoke-ttft-cdf.svg",
        "smoke-throughput.svg",
        "smoke-ttft-p90.svg",
    ] {
        let svg = std::fs::read_to_string(out.path().join(plot)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{plot}"
        );
    }
}
