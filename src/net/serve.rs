//! ext_proc serving on connection-pinned threads: each gateway connection, and every stream on it, lives on one thread.
//!
//! Envoy multiplexes all of a worker's ext_proc streams over one HTTP/2 connection. On a
//! work-stealing pool the connection task (reading and writing frames) and each stream's
//! handler task land on different threads, so every message crosses threads twice: a futex
//! wake, an eventfd write, contention on h2's stream lock. Here the accept loop hands each
//! connection to one of N threads, each a single-threaded runtime running its own tonic
//! server: the connection and its streams' tasks share a thread and wake each other without
//! a syscall. Several gateway workers (Envoy opens one connection per worker) spread over the
//! threads; one connection is served by one core, as Envoy serves it from one worker.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

/// How the gRPC server is run.
#[derive(Clone)]
pub struct ServeOptions {
    /// Threads serving connections (at least one).
    pub threads: usize,
    /// TLS for every connection, when set.
    pub tls: Option<TlsAcceptor>,
    /// Thread name prefix and log label.
    pub name: &'static str,
    /// Most concurrent streams (requests) one gateway connection may open (HTTP/2
    /// SETTINGS_MAX_CONCURRENT_STREAMS); a gateway opens more connections past it.
    pub max_concurrent_streams: u32,
}

/// Default per-connection stream limit: far above what one Envoy worker keeps open, and a
/// bound on what one client connection can make us hold.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 4096;
/// HTTP/2 PING interval and timeout: a gateway that vanished without closing (node gone,
/// network partition) is noticed and its streams released.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// `--grpc-threads`: 0 means one per core.
pub fn grpc_threads(flag: u16) -> usize {
    match flag {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => usize::from(n),
    }
}

/// A gRPC service tonic's server accepts (the bounds of `Server::add_service`).
pub trait GrpcService:
    Service<
        http::Request<Body>,
        Error = Infallible,
        Response: axum::response::IntoResponse,
        Future: Send + 'static,
    > + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> GrpcService for S where
    S: Service<
            http::Request<Body>,
            Error = Infallible,
            Response: axum::response::IntoResponse,
            Future: Send + 'static,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// Serves `svc` on `listener` from `opts.threads` connection-pinned threads. The accept loop
/// runs on the calling runtime; the threads live as long as the process.
pub fn serve_pinned<S: GrpcService>(
    listener: TcpListener,
    svc: S,
    opts: ServeOptions,
) -> std::io::Result<()> {
    let mut lanes = Vec::new();
    for i in 0..opts.threads.max(1) {
        let (tx, rx) = mpsc::unbounded_channel::<std::net::TcpStream>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let svc = svc.clone();
        let tls = opts.tls.clone();
        let name = opts.name;
        let streams = opts.max_concurrent_streams;
        std::thread::Builder::new()
            .name(format!("{name}-grpc-{i}"))
            .spawn(move || rt.block_on(serve_lane(rx, svc, tls, name, streams)))?;
        lanes.push(tx);
    }
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let tcp = accept_nodelay(&listener).await;
            let std = match tcp.into_std() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot hand an accepted connection over");
                    continue;
                }
            };
            let lane = next.fetch_add(1, Ordering::Relaxed) % lanes.len();
            if lanes[lane].send(std).is_err() {
                tracing::error!(lane, "gRPC serving thread is gone");
            }
        }
    });
    Ok(())
}

/// The next accepted connection, with Nagle off. A failed accept (out of descriptors, say)
/// is logged and retried after a pause rather than ending the server.
pub async fn accept_nodelay(listener: &TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                // gRPC writes small frames: with Nagle on, each answer waits for the peer's
                // delayed ACK (~40 ms on Linux) whenever a previous segment is unacknowledged.
                let _ = tcp.set_nodelay(true);
                return tcp;
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One thread's server: registers the connections it is handed with its own reactor, does
/// the TLS handshake there, and serves them.
async fn serve_lane<S: GrpcService>(
    conns: mpsc::UnboundedReceiver<std::net::TcpStream>,
    svc: S,
    tls: Option<TlsAcceptor>,
    name: &'static str,
    max_concurrent_streams: u32,
) {
    // h2 counts, for the life of a connection, the streams it resets itself (frames arriving
    // for a stream we already ended, such as the body Envoy is still sending for a request
    // refused at its headers) and sends GOAWAY ENHANCE_YOUR_CALM past 1,024: a burst of
    // refusals, or days of them on one gateway connection, would fail every stream on it
    // with a 500. Our peer is the gateway (the manifests admit only it), and h2's guard
    // against remote rapid resets (max_pending_accept_reset_streams) stays on.
    let router = tonic::transport::Server::builder()
        .http2_max_local_error_reset_streams(None)
        .max_concurrent_streams(Some(max_concurrent_streams.max(1)))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(svc);
    let res = match tls {
        None => {
            let incoming = upgraded(conns, |tcp| async move { Ok(tcp) });
            router.serve_with_incoming(incoming).await
        }
        Some(acceptor) => {
            let incoming = upgraded(conns, move |tcp| {
                let acceptor = acceptor.clone();
                async move {
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                        .await
                        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
                }
            });
            router.serve_with_incoming(incoming).await
        }
    };
    if let Err(e) = res {
        tracing::error!(server = name, error = %e, "gRPC server stopped");
    }
}

/// The connections handed to this thread, registered with its reactor and passed through
/// `upgrade` (the TLS handshake, or nothing). Upgrades run beside the server, so a slow
/// client delays no one; a connection that fails is logged and dropped.
fn upgraded<IO, F, Fut>(
    mut conns: mpsc::UnboundedReceiver<std::net::TcpStream>,
    upgrade: F,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<IO>>
where
    IO: Send + 'static,
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<IO>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(std) = conns.recv().await {
            let tcp = match TcpStream::from_std(std) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot register a connection");
                    continue;
                }
            };
            let peer = tcp.peer_addr().ok();
            let (conn, tx) = (upgrade(tcp), tx.clone());
            tokio::spawn(async move {
                match conn.await {
                    Ok(io) => {
                        let _ = tx.send(Ok(io)).await;
                    }
                    Err(e) => tracing::debug!(?peer, error = %e, "connection setup failed"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::ServingStatus;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    #[tokio::test]
    async fn every_connection_is_served_by_a_pinned_thread() {
        let (reporter, svc) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("x", ServingStatus::Serving)
            .await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        serve_pinned(
            listener,
            svc,
            ServeOptions {
                threads: 2,
                tls: None,
                name: "test",
                max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            },
        )
        .unwrap();
        // Separate connections land on alternating threads; each answers several streams.
        for _ in 0..4 {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut c = HealthClient::new(ch);
            for _ in 0..3 {
                let r = c
                    .check(HealthCheckRequest {
                        service: "x".into(),
                    })
                    .await
                    .unwrap();
                assert_eq!(r.into_inner().status, ServingStatus::Serving as i32);
            }
        }
        // The status lives in the reporter the threads' servers share.
        reporter
            .set_service_status("x", ServingStatus::NotServing)
            .await;
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let r = HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: "x".into(),
            })
            .await
            .unwrap();
        assert_eq!(r.into_inner().status, ServingStatus::NotServing as i32);
    }

    /// One connection cannot hold more than the stream limit: past it, a new stream waits
    /// for a free slot instead of being served.
    #[tokio::test]
    async fn streams_per_connection_are_limited() {
        use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer::new(
            crate::extproc::ExtProc::new(
                Arc::new(crate::pool::state::Shared::new(Default::default())),
                crate::extproc::ExtProcOptions {
                    max_body_bytes: 1024,
                    restore_model_name: false,
                    trust_model_rewrite_header: false,
                },
                crate::pool::metrics::EppMetrics::new(),
            ),
        );
        serve_pinned(
            listener,
            svc,
            ServeOptions {
                threads: 1,
                tls: None,
                name: "test",
                max_concurrent_streams: 2,
            },
        )
        .unwrap();
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut held = Vec::new();
        for _ in 0..2 {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let mut c = ExternalProcessorClient::new(ch.clone());
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                c.process(tokio_stream::wrappers::ReceiverStream::new(rx)),
            )
            .await
            .expect("a stream under the limit is served")
            .unwrap();
            held.push((tx, r));
        }
        let (_tx3, rx3) = tokio::sync::mpsc::channel(1);
        let mut c = ExternalProcessorClient::new(ch.clone());
        let third = tokio::time::timeout(
            Duration::from_millis(500),
            c.process(tokio_stream::wrappers::ReceiverStream::new(rx3)),
        )
        .await;
        assert!(
            third.is_err(),
            "a third stream was served past the limit of 2"
        );
        // A slot freed, the next stream is served.
        held.pop();
        let (_tx4, rx4) = tokio::sync::mpsc::channel(1);
        let mut c = ExternalProcessorClient::new(ch);
        tokio::time::timeout(
            Duration::from_secs(5),
            c.process(tokio_stream::wrappers::ReceiverStream::new(rx4)),
        )
        .await
        .expect("served once a stream ended")
        .unwrap();
    }
}
