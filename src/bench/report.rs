//! Statistics of benchmark runs and their outputs: CSV, JSON, a Markdown table and SVG plots.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;
use thiserror::Error;

use super::driver::Outcome;
use super::workload::Workload;

/// A result file could not be written.
#[derive(Debug, Error)]
pub enum ReportError {
    #[error("writing {path}: {message}")]
    Write { path: String, message: String },
}

fn write(path: &Path, text: &str) -> Result<(), ReportError> {
    std::fs::write(path, text).map_err(|e| ReportError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

use super::stats::{percentile, sorted};

/// Per-class figures (criticality for mixed workloads).
#[derive(Debug, Clone, Serialize)]
pub struct ClassSummary {
    pub sent: usize,
    pub ok: usize,
    pub shed: usize,
    pub shed_rate: f64,
    pub ttft_p50: Option<f64>,
    pub ttft_p90: Option<f64>,
}

/// Figures of one (workload, policy, rate) run. Latencies in seconds; only requests sent
/// after the warm-up count, throughput counts every completed request.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub workload: String,
    pub policy: String,
    pub rate: f64,
    pub seed: u64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub sent: usize,
    pub ok: usize,
    /// 429 answers (shed).
    pub shed: usize,
    /// Every other failure: other statuses, transport errors, timeouts.
    pub errors: usize,
    pub ttft_p50: Option<f64>,
    pub ttft_p90: Option<f64>,
    pub ttft_p99: Option<f64>,
    pub e2e_p50: Option<f64>,
    pub e2e_p90: Option<f64>,
    /// Completion tokens of successful requests per second of run (first send to last token).
    pub output_tokens_per_s: f64,
    /// Cached prompt tokens / prompt tokens (from `usage.prompt_tokens_details`).
    pub prefix_hit_rate: f64,
    /// Requests per server, busiest / mean (1.0 = perfectly even).
    pub load_spread_max_over_mean: f64,
    /// Requests per server, coefficient of variation.
    pub load_spread_cv: f64,
    pub requests_per_server: BTreeMap<String, usize>,
    /// Latest departure behind schedule: above a few ms the load generator could not keep up.
    pub max_send_lag: f64,
    pub classes: BTreeMap<String, ClassSummary>,
    /// LoRA fleet figures (workloads with adapters).
    pub lora: Option<super::lora_report::LoraSummary>,
}

pub fn summarize(w: &Workload, policy: &str, rate: f64, outcomes: &[Outcome]) -> RunSummary {
    let measured: Vec<&Outcome> = outcomes.iter().filter(|o| o.at >= w.warmup_s).collect();
    let ok: Vec<&Outcome> = measured
        .iter()
        .copied()
        .filter(|o| o.status == 200 && o.e2e.is_some())
        .collect();
    let ttft = sorted(ok.iter().filter_map(|o| o.ttft));
    let e2e = sorted(ok.iter().filter_map(|o| o.e2e));
    let all_ok = outcomes
        .iter()
        .filter(|o| o.status == 200 && o.e2e.is_some());
    let tokens: u64 = all_ok.clone().map(|o| o.completion_tokens).sum();
    let span = all_ok
        .map(|o| o.at + o.lag + o.e2e.unwrap_or(0.0))
        .fold(0.0, f64::max);
    let (prompt, cached) = ok.iter().fold((0u64, 0u64), |(p, c), o| {
        (p + o.prompt_tokens, c + o.cached_tokens)
    });
    let mut per_server: BTreeMap<String, usize> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| !o.upstream.is_empty()) {
        *per_server.entry(o.upstream.clone()).or_default() += 1;
    }
    let counts: Vec<f64> = per_server.values().map(|&c| c as f64).collect();
    let (spread, cv) = if counts.is_empty() {
        (0.0, 0.0)
    } else {
        let mean = counts.iter().sum::<f64>() / counts.len() as f64;
        let var = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / counts.len() as f64;
        (
            counts.iter().copied().fold(0.0, f64::max) / mean,
            var.sqrt() / mean,
        )
    };
    let mut classes: BTreeMap<String, Vec<&Outcome>> = BTreeMap::new();
    for o in &measured {
        classes.entry(o.class.clone()).or_default().push(o);
    }
    let classes = classes
        .into_iter()
        .map(|(k, v)| {
            let shed = v.iter().filter(|o| o.status == 429).count();
            let t = sorted(
                v.iter()
                    .filter(|o| o.status == 200 && o.e2e.is_some())
                    .filter_map(|o| o.ttft),
            );
            (
                k,
                ClassSummary {
                    sent: v.len(),
                    ok: t.len(),
                    shed,
                    shed_rate: shed as f64 / v.len().max(1) as f64,
                    ttft_p50: percentile(&t, 50.0),
                    ttft_p90: percentile(&t, 90.0),
                },
            )
        })
        .collect();
    let shed = measured.iter().filter(|o| o.status == 429).count();
    RunSummary {
        workload: w.name.clone(),
        policy: policy.into(),
        rate,
        seed: w.seed,
        duration_s: w.duration_s,
        warmup_s: w.warmup_s,
        sent: measured.len(),
        ok: ok.len(),
        shed,
        errors: measured.len() - ok.len() - shed,
        ttft_p50: percentile(&ttft, 50.0),
        ttft_p90: percentile(&ttft, 90.0),
        ttft_p99: percentile(&ttft, 99.0),
        e2e_p50: percentile(&e2e, 50.0),
        e2e_p90: percentile(&e2e, 90.0),
        output_tokens_per_s: if span > 0.0 {
            tokens as f64 / span
        } else {
            0.0
        },
        prefix_hit_rate: if prompt > 0 {
            cached as f64 / prompt as f64
        } else {
            0.0
        },
        load_spread_max_over_mean: spread,
        load_spread_cv: cv,
        requests_per_server: per_server,
        max_send_lag: outcomes.iter().map(|o| o.lag).fold(0.0, f64::max),
        classes,
        lora: None,
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.6}")).unwrap_or_default()
}

pub const REQUESTS_HEADER: &str = "workload,policy,rate,idx,class,model,at,lag,status,ttft,e2e,prompt_tokens,cached_tokens,completion_tokens,upstream,error,group";

/// Appends one run's outcomes as CSV rows (without the header).
pub fn requests_csv(workload: &str, policy: &str, rate: f64, outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    for o in outcomes {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{:.6},{:.6},{},{},{},{},{},{},{},{},{}",
            csv_field(workload),
            policy,
            rate,
            o.idx,
            csv_field(&o.class),
            csv_field(&o.model),
            o.at,
            o.lag,
            o.status,
            opt(o.ttft),
            opt(o.e2e),
            o.prompt_tokens,
            o.cached_tokens,
            o.completion_tokens,
            csv_field(&o.upstream),
            csv_field(&o.error),
            csv_field(&o.group)
        );
    }
    s
}

pub const SUMMARY_HEADER: &str = "workload,policy,rate,seed,sent,ok,shed,errors,ttft_p50,ttft_p90,ttft_p99,e2e_p50,e2e_p90,output_tokens_per_s,prefix_hit_rate,load_spread_max_over_mean,load_spread_cv,max_send_lag";

fn summary_row(r: &RunSummary) -> String {
    format!(
        "{},{},{},{},{},{},{},{},{},{},{},{},{},{:.1},{:.4},{:.3},{:.3},{:.4}",
        csv_field(&r.workload),
        r.policy,
        r.rate,
        r.seed,
        r.sent,
        r.ok,
        r.shed,
        r.errors,
        opt(r.ttft_p50),
        opt(r.ttft_p90),
        opt(r.ttft_p99),
        opt(r.e2e_p50),
        opt(r.e2e_p90),
        r.output_tokens_per_s,
        r.prefix_hit_rate,
        r.load_spread_max_over_mean,
        r.load_spread_cv,
        r.max_send_lag
    )
}

fn ms(v: Option<f64>) -> String {
    v.map(|x| format!("{:.0}", x * 1000.0))
        .unwrap_or_else(|| "-".into())
}

/// A Markdown table of every run of a workload, then per-class rows where classes exist.
pub fn markdown(w: &Workload, runs: &[RunSummary]) -> String {
    let mut s = format!(
        "### {}\n\n{}\n\n| rate (req/s) | policy | TTFT p50 / p90 / p99 (ms) | E2E p50 / p90 (ms) | output tok/s | ok / shed / err | prefix hit | spread max/mean |\n|---|---|---|---|---|---|---|---|\n",
        w.name,
        w.description.trim()
    );
    for r in runs {
        let _ = writeln!(
            s,
            "| {} | {} | {} / {} / {} | {} / {} | {:.0} | {} / {} / {} | {:.1} % | {:.2} |",
            r.rate,
            r.policy,
            ms(r.ttft_p50),
            ms(r.ttft_p90),
            ms(r.ttft_p99),
            ms(r.e2e_p50),
            ms(r.e2e_p90),
            r.output_tokens_per_s,
            r.ok,
            r.shed,
            r.errors,
            r.prefix_hit_rate * 100.0,
            r.load_spread_max_over_mean
        );
    }
    if runs.iter().any(|r| r.classes.len() > 1) {
        s.push_str("\n| rate (req/s) | policy | class | sent | shed rate | TTFT p50 / p90 (ms) |\n|---|---|---|---|---|---|\n");
        for r in runs {
            for (k, c) in &r.classes {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {:.1} % | {} / {} |",
                    r.rate,
                    r.policy,
                    k,
                    c.sent,
                    c.shed_rate * 100.0,
                    ms(c.ttft_p50),
                    ms(c.ttft_p90)
                );
            }
        }
    }
    let rows: Vec<super::lora_report::Row<'_>> = runs
        .iter()
        .filter_map(|r| {
            r.lora.as_ref().map(|lora| super::lora_report::Row {
                rate: r.rate,
                policy: &r.policy,
                ttft_p90: r.ttft_p90,
                output_tokens_per_s: r.output_tokens_per_s,
                lora,
            })
        })
        .collect();
    s.push_str(&super::lora_report::markdown(&rows));
    s
}

const COLORS: [RGBColor; 4] = [
    RGBColor(214, 39, 40),
    RGBColor(127, 127, 127),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
];

fn plot_err(path: &Path, e: impl std::fmt::Display) -> ReportError {
    ReportError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Line plot: one series per policy of (x, y) points.
fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    markers: bool,
) -> Result<(), ReportError> {
    let (mut x_max, mut y_max) = (0.0f64, 0.0f64);
    for (_, pts) in series {
        for &(x, y) in pts {
            x_max = x_max.max(x);
            y_max = y_max.max(y);
        }
    }
    let x_max = if x_max > 0.0 { x_max * 1.05 } else { 1.0 };
    let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| plot_err(path, e))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| plot_err(path, e))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        if markers {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| plot_err(path, e))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))?;
    Ok(())
}

/// Writes the plots of one workload: the TTFT distribution (CDF) of each policy at the
/// headline rate, p90 TTFT and output throughput against offered load.
pub fn plots(
    dir: &Path,
    w: &Workload,
    runs: &[RunSummary],
    ttfts: &BTreeMap<String, Vec<f64>>,
) -> Result<Vec<String>, ReportError> {
    let mut written = Vec::new();
    let policies: Vec<String> = w.policies.iter().map(|p| p.name().to_string()).collect();
    let cdf: Vec<(String, Vec<(f64, f64)>)> = policies
        .iter()
        .filter_map(|p| {
            let t = ttfts.get(p)?;
            let n = t.len().max(1) as f64;
            // At most ~200 points a curve keeps the SVG small.
            let step = t.len().div_ceil(200).max(1);
            Some((
                p.clone(),
                t.iter()
                    .enumerate()
                    .filter(|(i, _)| i % step == 0 || i + 1 == t.len())
                    .map(|(i, &x)| (x * 1000.0, (i + 1) as f64 / n))
                    .collect(),
            ))
        })
        .collect();
    let name = format!("{}-ttft-cdf.svg", w.name);
    line_plot(
        &dir.join(&name),
        &format!("{}: TTFT distribution at {} req/s", w.name, w.headline()),
        "TTFT (ms)",
        "fraction of requests",
        &cdf,
        false,
    )?;
    written.push(name);
    let by_rate = |f: &dyn Fn(&RunSummary) -> Option<f64>| -> Vec<(String, Vec<(f64, f64)>)> {
        policies
            .iter()
            .map(|p| {
                (
                    p.clone(),
                    runs.iter()
                        .filter(|r| &r.policy == p)
                        .filter_map(|r| f(r).map(|y| (r.rate, y)))
                        .collect(),
                )
            })
            .collect()
    };
    let name = format!("{}-throughput.svg", w.name);
    line_plot(
        &dir.join(&name),
        &format!("{}: output throughput against offered load", w.name),
        "offered load (req/s)",
        "output tokens/s",
        &by_rate(&|r| Some(r.output_tokens_per_s)),
        true,
    )?;
    written.push(name);
    let name = format!("{}-ttft-p90.svg", w.name);
    line_plot(
        &dir.join(&name),
        &format!("{}: p90 TTFT against offered load", w.name),
        "offered load (req/s)",
        "p90 TTFT (ms)",
        &by_rate(&|r| r.ttft_p90.map(|x| x * 1000.0)),
        true,
    )?;
    written.push(name);
    Ok(written)
}

/// Writes the summary files of all runs so far (rewritten after every run, so an interrupted
/// benchmark still leaves its results).
pub fn write_summaries(dir: &Path, runs: &[RunSummary], md: &str) -> Result<(), ReportError> {
    let json = serde_json::to_string_pretty(runs).unwrap_or_default();
    write(&dir.join("summary.json"), &json)?;
    let mut csv = format!("{SUMMARY_HEADER}\n");
    for r in runs {
        csv.push_str(&summary_row(r));
        csv.push('\n');
    }
    write(&dir.join("summary.csv"), &csv)?;
    write(&dir.join("summary.md"), md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 90.0), Some(90.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn csv_fields_are_quoted() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }

    #[test]
    fn plots_are_svg() {
        let dir = tempfile::tempdir().unwrap();
        let w = super::super::workload::Workload::parse("name: t\nseed: 1\nfleet: {max_num_seqs: 2}\nduration_s: 2\nrates: [1, 2]\ntraffic: {kind: sharegpt, prompt: {median: 10}, output: {median: 2}}\n").unwrap();
        let mk = |policy: &str, rate: f64| RunSummary {
            workload: "t".into(),
            policy: policy.into(),
            rate,
            seed: 1,
            duration_s: 2.0,
            warmup_s: 0.0,
            sent: 1,
            ok: 1,
            shed: 0,
            errors: 0,
            ttft_p50: Some(0.01),
            ttft_p90: Some(0.02),
            ttft_p99: Some(0.03),
            e2e_p50: Some(0.1),
            e2e_p90: Some(0.2),
            output_tokens_per_s: 10.0 * rate,
            prefix_hit_rate: 0.0,
            load_spread_max_over_mean: 1.0,
            load_spread_cv: 0.0,
            requests_per_server: BTreeMap::new(),
            max_send_lag: 0.0,
            classes: BTreeMap::new(),
            lora: None,
        };
        let runs = vec![mk("default", 1.0), mk("default", 2.0)];
        let ttfts: BTreeMap<String, Vec<f64>> = [("default".to_string(), vec![0.01, 0.02])]
            .into_iter()
            .collect();
        let files = plots(dir.path(), &w, &runs, &ttfts).unwrap();
        assert_eq!(files.len(), 3);
        for f in files {
            let s = std::fs::read_to_string(dir.path().join(&f)).unwrap();
            assert!(s.starts_with("<svg"), "{f}");
            assert!(s.contains("default"), "{f} has a legend");
        }
    }
}
