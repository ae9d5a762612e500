//! epp entry point: the Endpoint Picker, an Envoy ext_proc server for one InferencePool.

use inferlane::epp::{self, EppArgs};
use inferlane::runtime::{self, RuntimeArgs};

/// Endpoint Picker: picks the model server for each request Envoy sends through ext_proc
/// (model rules, LoRA affinity, load, prefix cache; sheds sheddable work when saturated).
#[derive(Debug, clap::Parser)]
#[command(name = "epp", version, args_override_self = true)]
struct Cli {
    #[command(flatten)]
    epp: EppArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn main() -> anyhow::Result<()> {
    // Upstream's spellings (`-poolName`, `-v 4`, `--zap-encoder json`) are accepted too.
    let (cli, notes) = inferlane::flags::parse::<Cli>(epp::UPSTREAM_FLAGS);
    runtime::init(&cli.runtime)?;
    for n in notes {
        tracing::warn!("{n}");
    }
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
