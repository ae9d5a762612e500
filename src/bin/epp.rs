//! epp entry point: the Endpoint Picker, an Envoy ext_proc server for one InferencePool.

use clap::Parser;
use inferlane::epp::{self, EppArgs};
use inferlane::runtime::{self, RuntimeArgs};

/// Endpoint Picker: picks the model server for each request Envoy sends through ext_proc
/// (model rules, LoRA affinity, load, prefix cache; sheds sheddable work when saturated).
#[derive(Debug, Parser)]
#[command(name = "epp", version)]
struct Cli {
    #[command(flatten)]
    epp: EppArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime::init(&cli.runtime)?;
    runtime::run_system(&cli.runtime, "epp", || async move {
        let h = epp::start(cli.epp.clone()).await?;
        // Tests and scripts started with port 0 read the bound addresses from this line.
        println!(
            "EPP_LISTENING grpc={} health={} metrics={}",
            h.grpc, h.health, h.metrics
        );
        tracing::info!(grpc = %h.grpc, health = %h.health, metrics = %h.metrics, pool = %cli.epp.pool_name, "epp started");
        runtime::shutdown_signal().await;
        Ok(())
    })
}
