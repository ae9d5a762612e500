//! extproc-floor entry point: the ext_proc serving floor (the EPP's stack, no routing work) for benchmarks.

use clap::Parser;
use inferlane::bench::floor::{self, FloorArgs};
use inferlane::runtime::{self, RuntimeArgs};

/// Answers Envoy's ext_proc messages as the EPP does, but picks the next endpoint of a fixed
/// list: what the gRPC/HTTP/2/TLS stack alone costs per request (scripts/bench-envoy.sh);
/// `--stack h2` serves the same answers straight on the h2 crate.
#[derive(Debug, Parser)]
#[command(name = "extproc-floor", version)]
struct Cli {
    #[command(flatten)]
    floor: FloorArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime::init(&cli.runtime)?;
    runtime::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr = floor::start(cli.floor).await?;
        println!("FLOOR_LISTENING grpc={addr}");
        runtime::shutdown_signal().await;
        Ok(())
    })
}
