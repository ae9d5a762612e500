//! bbr entry point: body-based routing for several InferencePools behind one gateway.

use inferlane::bbr::{self, BbrArgs};
use inferlane::runtime::{self, RuntimeArgs};

/// Body-based router: reads `model` from OpenAI bodies and sets X-Gateway-Model-Name and
/// X-Gateway-Base-Model-Name so the gateway's routes can choose the InferencePool.
#[derive(Debug, clap::Parser)]
#[command(name = "bbr", version, args_override_self = true)]
struct Cli {
    #[command(flatten)]
    bbr: BbrArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn main() -> anyhow::Result<()> {
    // Upstream's spellings (`-poolName`, `-v 4`, `--zap-encoder json`) are accepted too.
    let (cli, notes) = inferlane::flags::parse::<Cli>(bbr::UPSTREAM_FLAGS);
    runtime::init(&cli.runtime)?;
    for n in notes {
        tracing::warn!("{n}");
    }
    runtime::run_system(&cli.runtime, "bbr", || async move {
        let h = bbr::start(cli.bbr.clone()).await?;
        println!(
            "BBR_LISTENING grpc={} health={} metrics={}",
            h.grpc, h.health, h.metrics
        );
        tracing::info!(grpc = %h.grpc, health = %h.health, "bbr started");
        runtime::shutdown_signal().await;
        Ok(())
    })
}
