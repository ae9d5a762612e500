//! Body-based routing: a gateway-level ext_proc server that names the base model in headers so HTTPRoutes can pick the pool.

pub mod health;
mod service;

use service::Bbr;
pub use service::{BASE_MODEL_HEADER, BbrMetrics, MODEL_HEADER};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use arc_swap::ArcSwap;
use clap::Args;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use inferlane_epp::bbr::{BaseModelMap, BbrError, parse_mapping};
use thiserror::Error;
use tokio_stream::wrappers::TcpListenerStream;

use crate::actors::configmap_watcher::{ConfigMapSource, ConfigMapWatcher};
use crate::actors::file_watcher::{FileWatcher, WatchMetrics, WatchedConfig, WatcherOptions};
use crate::actors::messages::ConfigChanged;
use crate::net::tls;
use crate::runtime::parse_bool;

/// Errors that stop BBR from starting.
#[derive(Debug, Error)]
pub enum BbrStartError {
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot start the gRPC serving threads: {0}")]
    GrpcThreads(#[source] std::io::Error),
    #[error("{0} (or give --mapping-file)")]
    Kube(#[source] crate::net::kube_client::KubeClientError),
    #[error(transparent)]
    MemoryBudget(#[from] crate::memory::BudgetError),
}

/// Upstream bbr flags we accept without acting on them (the reason is logged at start);
/// shared flags are matched in either spelling (`-grpcPort`, `--grpc-port`).
pub const UPSTREAM_FLAGS: &[(&str, crate::flags::Upstream)] = {
    use crate::flags::Upstream::Ignored;
    &[
        (
            "streaming",
            Ignored {
                takes_value: false,
                why: "each request is answered in the body mode Envoy uses for it (BUFFERED or FULL_DUPLEX_STREAMED)",
            },
        ),
        (
            "enable-pprof",
            Ignored {
                takes_value: false,
                why: "no pprof handlers",
            },
        ),
    ]
};

/// bbr flags.
#[derive(Debug, Clone, Args)]
pub struct BbrArgs {
    /// ext_proc gRPC port.
    #[arg(long, default_value_t = 9004)]
    pub grpc_port: u16,
    /// gRPC health port.
    #[arg(long, default_value_t = 9005)]
    pub grpc_health_port: u16,
    /// Prometheus metrics port (`/metrics`), as upstream's bbr.
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: String,
    /// Mapping file: `baseModels: [{baseModel, adapters}]`, or ConfigMaps labelled
    /// `inference.networking.k8s.io/bbr-managed: "true"` (multi-document YAML). Watched live.
    /// Without it, bbr watches the labelled ConfigMaps of --namespace through the API.
    #[arg(long, env = "BBR_MAPPING_FILE")]
    pub mapping_file: Option<PathBuf>,
    /// Protect `/metrics` with the API server's TokenReview and SubjectAccessReview, as
    /// upstream. Default: on when watching ConfigMaps through the API, off with --mapping-file.
    #[arg(long, value_parser = crate::runtime::parse_bool, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub metrics_endpoint_auth: Option<bool>,
    /// Kubeconfig file for the API server (upstream's `--kubeconfig`); without it `KUBECONFIG`,
    /// `~/.kube/config` or the pod's service account.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace whose `bbr-managed` ConfigMaps are watched (without --mapping-file).
    #[arg(long, env = "NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Serve ext_proc over TLS (self-signed unless --cert-path).
    #[arg(long, default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub secure_serving: bool,
    #[arg(long)]
    pub cert_path: Option<PathBuf>,
    /// Largest request body read.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Threads serving ext_proc connections (0 = one per core); each connection and its
    /// streams stay on one thread, as in the EPP.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=256))]
    pub grpc_threads: u16,
    /// Memory the process may spend on streams and bodies being read (429 past it): bytes,
    /// a quantity (`256Mi`), or `auto` for 60% of the container's memory limit.
    #[arg(long, default_value = "auto")]
    pub memory_budget: String,
}

/// A validated mapping file.
#[derive(Debug, Clone)]
pub struct MappingFile(pub BaseModelMap);

impl WatchedConfig for MappingFile {
    type Error = BbrError;

    fn parse(text: &str, _validate: bool) -> Result<Self, Self::Error> {
        Ok(MappingFile(BaseModelMap::new(&parse_mapping(text)?)?))
    }

    fn summary(&self) -> String {
        format!("{} model names mapped to base models", self.0.len())
    }
}

/// Receives new mappings and publishes them for the request path.
struct MappingStore(Arc<ArcSwap<BaseModelMap>>);

impl Actor for MappingStore {
    type Context = Context<Self>;
}

impl Handler<ConfigChanged<MappingFile>> for MappingStore {
    type Result = ();

    fn handle(&mut self, msg: ConfigChanged<MappingFile>, _: &mut Context<Self>) {
        self.0.store(Arc::new(msg.config.0.clone()));
    }
}

/// Bound addresses.
#[derive(Debug, Clone)]
pub struct BbrHandle {
    pub grpc: SocketAddr,
    pub health: SocketAddr,
    pub metrics: SocketAddr,
}

async fn bind(
    what: &'static str,
    host: &str,
    port: u16,
) -> Result<(tokio::net::TcpListener, SocketAddr), BbrStartError> {
    let addr = format!("{host}:{port}");
    let l = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| BbrStartError::Bind {
            what,
            addr: addr.clone(),
            source,
        })?;
    let local = l
        .local_addr()
        .map_err(|source| BbrStartError::Bind { what, addr, source })?;
    Ok((l, local))
}

/// Starts BBR. Must run inside an actix `System`.
pub async fn start(args: BbrArgs) -> Result<BbrHandle, BbrStartError> {
    // Before any actor starts, so a bad --cert-path is a clean exit.
    let tls = tls::serving_acceptor(args.secure_serving, args.cert_path.as_deref())?;
    let map = Arc::new(ArcSwap::from_pointee(BaseModelMap::default()));
    let store = MappingStore(map.clone()).start();
    match &args.mapping_file {
        Some(path) => {
            FileWatcher::<MappingFile>::new(
                WatcherOptions {
                    path: path.clone(),
                    validate: true,
                    debounce: Duration::from_millis(10),
                    poll_interval: Duration::from_secs(10),
                },
                store.recipient(),
                WatchMetrics::default(),
            )
            .start();
        }
        None => {
            let client = crate::net::kube_client::kube_client(args.kubeconfig.as_deref())
                .await
                .map_err(BbrStartError::Kube)?;
            ConfigMapWatcher::<MappingFile>::new(
                client,
                ConfigMapSource::Labelled {
                    namespace: args.namespace.clone(),
                    selector: format!("{}=true", inferlane_epp::bbr::BBR_LABEL),
                },
                store.recipient(),
                WatchMetrics::default(),
            )
            .start();
        }
    }
    let (grpc, grpc_addr) = bind("ext_proc gRPC", &args.bind_address, args.grpc_port).await?;
    let (health, health_addr) =
        bind("gRPC health", &args.bind_address, args.grpc_health_port).await?;
    let (metrics_l, metrics_addr) = bind("metrics", &args.bind_address, args.metrics_port).await?;
    let metrics = BbrMetrics::new();
    let page = metrics.clone();
    let mut app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let page = page.clone();
            async move { crate::net::metrics_text::response(page.encode()) }
        }),
    );
    if args
        .metrics_endpoint_auth
        .unwrap_or(args.mapping_file.is_none())
    {
        let client = crate::net::kube_client::kube_client(args.kubeconfig.as_deref())
            .await
            .map_err(BbrStartError::Kube)?;
        app = app.layer(axum::middleware::from_fn_with_state(
            crate::net::metrics_auth::MetricsAuth::new(Box::new(
                crate::net::metrics_auth::KubeReviewer(client),
            )),
            crate::net::metrics_auth::layer,
        ));
    }
    tokio::spawn(async move {
        if let Err(e) = axum::serve(metrics_l, app).await {
            tracing::error!(error = %e, "bbr metrics server stopped");
        }
    });
    let (budget, source) =
        crate::memory::derive_budget(&args.memory_budget, std::path::Path::new("/sys/fs/cgroup"))?;
    tracing::info!(
        bytes = budget,
        ?source,
        "memory budget for streams and bodies"
    );
    let svc = ExternalProcessorServer::new(Bbr {
        map,
        max_body: args.max_body_bytes,
        metrics,
        budget: crate::memory::MemoryBudget::new(budget),
    })
    .max_decoding_message_size(args.max_body_bytes + 64 * 1024);
    crate::net::serve::serve_pinned(
        grpc,
        svc,
        crate::net::serve::ServeOptions {
            threads: crate::net::serve::grpc_threads(args.grpc_threads),
            tls,
            name: "bbr",
            max_concurrent_streams: crate::net::serve::DEFAULT_MAX_CONCURRENT_STREAMS,
        },
    )
    .map_err(BbrStartError::GrpcThreads)?;
    tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(health::BbrHealth.into_server())
            .serve_with_incoming(TcpListenerStream::new(health))
            .await
        {
            tracing::error!(error = %e, "bbr health server stopped");
        }
    });
    Ok(BbrHandle {
        grpc: grpc_addr,
        health: health_addr,
        metrics: metrics_addr,
    })
}
