//! Opens idle ext_proc streams against an EPP (connections x streams, none sending a message) and holds them until stdin closes: the memory rows' "idle streams" load (scripts/memory-rows.py).

use std::io::Read;
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use tonic::transport::Endpoint;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9002".into());
    let conns: usize = args.next().map_or(Ok(4), |a| a.parse())?;
    let per_conn: usize = args.next().map_or(Ok(4096), |a| a.parse())?;
    let mut held = Vec::new();
    let (mut open, mut ended) = (0, 0);
    for _ in 0..conns {
        // One endpoint connection each: tonic multiplexes every call on it.
        let ch = Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let calls = (0..per_conn).map(|_| {
            let mut c = ExternalProcessorClient::new(ch.clone());
            async move {
                let silent = futures::stream::pending::<ProcessingRequest>();
                tokio::time::timeout(Duration::from_secs(30), c.process(silent)).await
            }
        });
        for r in futures::future::join_all(calls).await {
            match r {
                Ok(Ok(s)) => {
                    open += 1;
                    held.push(s.into_inner());
                }
                _ => ended += 1,
            }
        }
    }
    println!("OPEN {open} ENDED {ended}");
    // Hold them until told to stop (stdin closed), then count the ones the server ended.
    tokio::task::spawn_blocking(|| {
        let _ = std::io::stdin().read(&mut [0u8; 1]);
    })
    .await?;
    let mut closed = 0;
    for mut s in held {
        // Ended by the server: its trailers (an error status, or the end) are waiting.
        if tokio::time::timeout(Duration::from_millis(1), s.message())
            .await
            .is_ok()
        {
            closed += 1;
        }
    }
    println!("CLOSED_BY_SERVER {closed}");
    Ok(())
}
