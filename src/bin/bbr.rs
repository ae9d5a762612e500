//! bbr entry point: body-based routing for several InferencePools behind one gateway.

use clap::Parser;
use inferlane::bbr::{self, BbrArgs};
use inferlane::runtime::{self, RuntimeArgs};

/// Body-based router: reads `model` from OpenAI bodies and sets X-Gateway-Model-Name and
/// X-Gateway-Base-Model-Name so the gateway's routes can choose the InferencePool.
#[derive(Debug, Parser)]
#[command(name = "bbr", version)]
struct Cli {
    #[command(flatten)]
    bbr: BbrArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime::init(&cli.runtime)?;
    runtime::run_system(&cli.runtime, "bbr", || async move {
        let h = bbr::start(cli.bbr.clone()).await?;
        println!("BBR_LISTENING grpc={} health={}", h.grpc, h.health);
        tracing::info!(grpc = %h.grpc, health = %h.health, "bbr started");
        runtime::shutdown_signal().await;
        Ok(())
    })
}
