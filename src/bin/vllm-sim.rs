//! vllm-sim entry point: a vLLM 0.32-compatible model server simulator.

use clap::Parser;
use inferlane::runtime::{self, RuntimeArgs};
use inferlane::sim::{SimArgs, server};

/// A vLLM-compatible model server simulator (OpenAI API, runtime LoRA, Prometheus metrics,
/// continuous-batching latency model, fault injection).
#[derive(Debug, Parser)]
#[command(name = "vllm-sim", version)]
struct Cli {
    #[command(flatten)]
    sim: SimArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime::init(&cli.runtime)?;
    runtime::run_system(&cli.runtime, "vllm-sim", || async move {
        let handle = server::start(cli.sim.clone()).await?;
        // Tests and scripts started with --port 0 read the bound address from this line.
        println!("VLLM_SIM_LISTENING {}", handle.addr);
        tracing::info!(addr = %handle.addr, model = %cli.sim.model, lora = cli.sim.enable_lora, "vllm-sim ready");
        runtime::shutdown_signal().await;
        Ok(())
    })
}
