//! lora-sidecar entry point: keeps vLLM's LoRA adapters equal to the mounted ConfigMap.

use clap::Parser;
use inferlane::lora::{self, SidecarArgs};
use inferlane::runtime::{self, RuntimeArgs};

/// Dynamic LoRA adapter sync sidecar for vLLM: watches a `vLLMLoRAConfig` file and loads and
/// unloads adapters through vLLM's runtime LoRA API until the server matches it.
#[derive(Debug, Parser)]
#[command(name = "lora-sidecar", version)]
struct Cli {
    #[command(flatten)]
    sidecar: SidecarArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime::init(&cli.runtime)?;
    runtime::run_system(&cli.runtime, "lora-sidecar", || async move {
        let handle = lora::start(cli.sidecar.clone()).await?;
        // Tests and scripts started with --metrics-port 0 read the address from this line.
        println!("LORA_SIDECAR_LISTENING {}", handle.http_addr);
        tracing::info!(
            config = %cli.sidecar.config.display(),
            status = %handle.http_addr,
            "lora-sidecar started"
        );
        runtime::shutdown_signal().await;
        // Adapters stay loaded: the next sidecar (or nobody) takes over from the server's state.
        tracing::info!("lora-sidecar stopped; adapters left loaded");
        Ok(())
    })
}
