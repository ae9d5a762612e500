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
        for i in 0..cli.sim.replicas.max(1) {
            let mut args = cli.sim.clone();
            if args.port != 0 {
                args.port = args.port.saturating_add(i);
            }
            args.seed = args.seed.wrapping_add(u64::from(i));
            let handle = server::start(args).await?;
            // Tests and scripts started with --port 0 read the bound address from this line.
            println!("VLLM_SIM_LISTENING {}", handle.addr);
            tracing::info!(addr = %handle.addr, model = %cli.sim.model, lora = cli.sim.enable_lora, "vllm-sim ready");
        }
        runtime::shutdown_signal().await;
        Ok(())
    })
}
