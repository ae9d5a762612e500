//! lora-sidecar entry point: keeps vLLM's LoRA adapters equal to the mounted ConfigMap.

use inferlane::lora::{self, SidecarArgs};
use inferlane::runtime::{self, RuntimeArgs};

/// Dynamic LoRA adapter sync sidecar for vLLM: watches a `vLLMLoRAConfig` file and loads and
/// unloads adapters through vLLM's runtime LoRA API until the server matches it.
#[derive(Debug, clap::Parser)]
#[command(name = "lora-sidecar", version, args_override_self = true)]
struct Cli {
    #[command(flatten)]
    sidecar: SidecarArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn main() -> anyhow::Result<()> {
    // Upstream's spellings (`-poolName`, `-v 4`, `--zap-encoder json`) are accepted too.
    let (cli, notes) = inferlane::flags::parse::<Cli>(lora::UPSTREAM_FLAGS);
    runtime::init(&cli.runtime)?;
    for n in notes {
        tracing::warn!("{n}");
    }
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
