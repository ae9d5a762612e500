//! lora-sidecar end to end: config swap -> adapter listed latency, resident memory, idle CPU.
//!
//! Run: `cargo bench --bench sidecar_e2e` (release build; ~80 s). Prints a Markdown table.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

fn proc_status(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the comm field.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: only run for real.
    if !args.iter().any(|a| a == "--bench") {
        println!("sidecar_e2e: skipped (run with cargo bench)");
        return;
    }
    let swaps: usize = std::env::var("SWAPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let idle_secs: u64 = std::env::var("IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let tmp = tempfile::tempdir().unwrap();
    let sim = spawn_sim(
        &[
            "--enable-lora",
            "--max-loras",
            "8",
            "--lora-load-latency-ms",
            "1",
        ],
        tmp.path(),
    );
    let port = port_of(&sim.addr);
    let c = client();
    let paths: Vec<(String, String)> = (0..50)
        .map(|i| {
            (
                format!("ad{i:02}"),
                adapter(tmp.path(), &format!("ad{i:02}"), 8),
            )
        })
        .collect();
    let items = |r: std::ops::Range<usize>| -> Vec<(&str, &str)> {
        paths[r]
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect()
    };
    let mut dir = KubeletDir::new(&tmp.path().join("config"));
    dir.write(&lora_config(port, &items(0..1), &[]));
    // Upstream's defaults, except an ephemeral status port.
    let sidecar = spawn_with_marker(
        &bin("lora-sidecar"),
        &[
            "--config",
            dir.file().to_str().unwrap(),
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            "0",
        ],
        &[("RUST_LOG", "warn")],
        "LORA_SIDECAR_LISTENING",
        tmp.path(),
    );
    let pid = sidecar.child.id();
    let want = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let poll_until = |target: Vec<String>| {
        let c = c.clone();
        let addr = sim.addr.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if adapter_ids(&c, &addr).await.as_ref() == Some(&target) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for {target:?}"
                );
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
        }
    };
    poll_until(want(&["ad00"])).await;

    // 1. Swap latency: alternate ad00 / ad01 through kubelet-style swaps.
    let mut lat = Vec::with_capacity(swaps);
    for i in 0..swaps {
        let (on, off) = if i % 2 == 0 { (1, 0) } else { (0, 1) };
        let t = Instant::now();
        dir.write(&lora_config(port, &items(on..on + 1), &items(off..off + 1)));
        poll_until(want(&[paths[on].0.as_str()])).await;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);

    // 2. Memory idle, then while reconciling 50 adapters (peak RSS).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = proc_status(pid, "VmRSS:");
    dir.write(&lora_config(port, &items(0..50), &[]));
    let all: Vec<String> = paths.iter().map(|p| p.0.clone()).collect();
    poll_until(all).await;
    let rss_peak = proc_status(pid, "VmHWM:");

    // 3. CPU while idle with 5 adapters configured.
    dir.write(&lora_config(port, &items(0..5), &items(5..50)));
    poll_until(want(&["ad00", "ad01", "ad02", "ad03", "ad04"])).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = cpu_ticks(pid);
    let w0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let ticks = cpu_ticks(pid) - t0;
    let wall = w0.elapsed().as_secs_f64();
    let hz = 100.0; // USER_HZ on Linux
    let cpu_pct = ticks as f64 / hz / wall * 100.0;

    println!("| metric | value | target |");
    println!("|---|---|---|");
    println!(
        "| config swap -> adapter listed, p50 ({swaps} swaps) | {:.1} ms | < 50 ms |",
        percentile(&lat, 0.5)
    );
    println!(
        "| config swap -> adapter listed, p99 | {:.1} ms | |",
        percentile(&lat, 0.99)
    );
    println!(
        "| config swap -> adapter listed, max | {:.1} ms | |",
        lat[lat.len() - 1]
    );
    println!(
        "| RSS idle | {:.1} MiB | < 15 MiB |",
        rss_idle as f64 / 1024.0
    );
    println!(
        "| RSS peak while reconciling 50 adapters | {:.1} MiB | < 15 MiB |",
        rss_peak as f64 / 1024.0
    );
    println!(
        "| CPU idle, 5 adapters, {idle_secs} s, 5 s resync | {cpu_pct:.3} % of a core ({ticks} ticks) | < 0.5 % |"
    );
}
