//! route-bench entry point: the routing-quality benchmark (fleet + EPP + Envoy + open-loop load).

use clap::Parser;
use inferlane::bench::{self, BenchArgs};
use inferlane::runtime::{self, RuntimeArgs};

/// Runs workloads against round-robin, random, least-queue and the default EPP profile on
/// fresh vllm-sim fleets behind a real Envoy; writes CSV/JSON/Markdown results and SVG plots.
#[derive(Debug, Parser)]
#[command(name = "route-bench", version)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime::init(&cli.runtime)?;
    runtime::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let out = cli.bench.out.clone();
    rt.block_on(bench::run(cli.bench))?;
    println!("{}", std::fs::read_to_string(out.join("summary.md"))?);
    println!("results: {}", out.display());
    Ok(())
}
