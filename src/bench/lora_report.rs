//! LoRA fleet figures of a run: the tail of adapters' TTFT, disk loads, moves, and how fast a flash crowd's adapter recovers.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::driver::Outcome;
use super::lora::EngineCounts;
use super::stats::{percentile, sorted};
use super::workload::{Traffic, Workload};

/// LoRA figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct LoraSummary {
    /// Adapters with at least 5 measured requests.
    pub adapters_measured: usize,
    /// The 90th percentile, across those adapters, of each one's p90 TTFT (the tail
    /// decile of adapters).
    pub tail_decile_p90: Option<f64>,
    /// 404 answers (a request reached no server that had its adapter).
    pub not_found: usize,
    /// Disk reads on the request path and CPU-to-GPU copies the engines counted; placement
    /// moves.
    pub engine: EngineCounts,
    pub disk_loads_per_min: f64,
    pub crowd: Option<Crowd>,
}

/// The flash crowd's adapter.
#[derive(Debug, Clone, Serialize)]
pub struct Crowd {
    pub adapter: String,
    /// Its p90 TTFT over the second half of the crowd.
    pub steady_p90: Option<f64>,
    /// Seconds from the crowd's start to the end of the first 3-s window whose p90 is
    /// within 2x steady.
    pub recovery_s: Option<f64>,
}

/// The flash crowd's adapter and start, as the plan draws it.
pub fn crowd_adapter(w: &Workload) -> Option<(String, f64)> {
    let Traffic::MultiLora {
        adapters,
        flash_crowd: Some(f),
        ..
    } = &w.traffic
    else {
        return None;
    };
    let tail = (*adapters / 10).max(1);
    let k = *adapters - 1 - (w.seed as usize % tail);
    w.adapters().get(k).map(|n| (n.clone(), f.at_s))
}

pub fn summarize(w: &Workload, outcomes: &[Outcome], engine: EngineCounts) -> LoraSummary {
    let ok = |o: &&Outcome| o.status == 200 && o.ttft.is_some();
    let mut by_adapter: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.at >= w.warmup_s).filter(ok) {
        by_adapter
            .entry(o.model.as_str())
            .or_default()
            .push(o.ttft.unwrap_or(0.0));
    }
    let p90s = sorted(
        by_adapter
            .values_mut()
            .filter(|v| v.len() >= 5)
            .filter_map(|v| {
                v.sort_by(f64::total_cmp);
                percentile(v, 90.0)
            }),
    );
    let crowd = crowd_adapter(w).map(|(adapter, at)| {
        let mine: Vec<&Outcome> = outcomes
            .iter()
            .filter(|o| o.model == adapter)
            .filter(ok)
            .collect();
        let late = at + (w.duration_s - at) / 2.0;
        let steady = percentile(
            &sorted(mine.iter().filter(|o| o.at >= late).filter_map(|o| o.ttft)),
            90.0,
        );
        let recovery_s = steady.and_then(|s| {
            (0..((w.duration_s - at) as usize)).find_map(|i| {
                let from = at + i as f64;
                let win = sorted(
                    mine.iter()
                        .filter(|o| o.at >= from && o.at < from + 3.0)
                        .filter_map(|o| o.ttft),
                );
                (win.len() >= 3 && percentile(&win, 90.0)? <= 2.0 * s).then_some(i as f64 + 3.0)
            })
        });
        Crowd {
            adapter,
            steady_p90: steady,
            recovery_s,
        }
    });
    LoraSummary {
        adapters_measured: p90s.len(),
        tail_decile_p90: percentile(&p90s, 90.0),
        not_found: outcomes.iter().filter(|o| o.status == 404).count(),
        disk_loads_per_min: engine.disk_loads as f64 / (w.duration_s / 60.0),
        engine,
        crowd,
    }
}

fn ms(v: Option<f64>) -> String {
    v.map(|x| format!("{:.0}", x * 1e3)).unwrap_or("-".into())
}

/// One run's row of the LoRA table.
pub struct Row<'a> {
    pub rate: f64,
    pub policy: &'a str,
    pub ttft_p90: Option<f64>,
    pub output_tokens_per_s: f64,
    pub lora: &'a LoraSummary,
}

/// The LoRA table for runs that have figures.
pub fn markdown(runs: &[Row<'_>]) -> String {
    if runs.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\n| rate | policy | TTFT p90 (ms) | adapters' p90, tail decile (ms) | output tok/s | disk loads (/min) | GPU copies | moves | 404 | crowd: steady p90 (ms), back within 2x after (s) |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let l = r.lora;
        let crowd = l.crowd.as_ref().map_or("-".to_string(), |c| {
            format!(
                "{}, {}",
                ms(c.steady_p90),
                c.recovery_s.map_or("never".into(), |x| format!("{x:.0}"))
            )
        });
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.0} | {} ({:.0}) | {} | {} | {} | {} |",
            r.rate,
            r.policy,
            ms(r.ttft_p90),
            ms(l.tail_decile_p90),
            r.output_tokens_per_s,
            l.engine.disk_loads,
            l.disk_loads_per_min,
            l.engine.swaps,
            l.engine.moves,
            l.not_found,
            crowd
        );
    }
    s
}
