//! epp wiring: flags, the ext_proc and health gRPC servers, the metrics server, actor start-up.

mod args;
pub mod health;
mod link_reports;
mod pages;
mod placement_election;

pub use args::{EppArgs, UPSTREAM_FLAGS, UnknownModels};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use thiserror::Error;
use tokio_stream::wrappers::TcpListenerStream;

use crate::actors::datastore::{Datastore, DatastoreOptions};
use crate::actors::file_watcher::{FileWatcher, WatchMetrics, WatchedConfig, WatcherOptions};
use crate::actors::kube_discovery::{EndpointSelector, KubeDiscovery, PoolTarget};
use crate::actors::leader::{LeaderElector, LeaseOptions};
use crate::actors::scraper::{ScrapeOptions, ScrapeThreads};
use crate::extproc::{ExtProc, ExtProcOptions};
use crate::memory::MemoryBudget;
use crate::net::{serve, tls};
use crate::pool::config::{self, PoolFile};
use crate::pool::metrics::EppMetrics;
use crate::pool::state::Shared;

/// Errors that stop the EPP from starting.
#[derive(Debug, Error)]
pub enum EppError {
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read --config-file {path}: {source}")]
    ReadConfig {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--config-file {path}: {source}")]
    Config {
        path: String,
        #[source]
        source: config::EppConfigError,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("{0}")]
    Selector(String),
    #[error("{0} (or use --pool-file)")]
    Kube(#[source] crate::net::kube_client::KubeClientError),
    #[error("cannot start the scrape threads: {0}")]
    ScrapeThreads(#[source] std::io::Error),
    #[error("cannot start the gRPC serving threads: {0}")]
    GrpcThreads(#[source] std::io::Error),
    #[error(transparent)]
    MemoryBudget(#[from] crate::memory::BudgetError),
    #[error("{0}")]
    Placement(String),
}

/// Addresses the servers bound (ports may have been 0).
#[derive(Debug, Clone)]
pub struct EppHandle {
    pub grpc: SocketAddr,
    pub health: SocketAddr,
    pub metrics: SocketAddr,
}

async fn bind(
    what: &'static str,
    host: &str,
    port: u16,
) -> Result<tokio::net::TcpListener, EppError> {
    let addr = format!("{host}:{port}");
    tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| EppError::Bind { what, addr, source })
}

async fn kube_client(args: &EppArgs) -> Result<kube::Client, EppError> {
    crate::net::kube_client::kube_client(args.kubeconfig.as_deref())
        .await
        .map_err(EppError::Kube)
}

fn endpoint_selector(args: &EppArgs) -> Result<Option<EndpointSelector>, EppError> {
    let Some(sel) = &args.endpoint_selector else {
        return Ok(None);
    };
    let mut labels = std::collections::BTreeMap::new();
    for part in sel.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                labels.insert(k.trim().to_string(), v.trim().to_string());
            }
            _ => {
                return Err(EppError::Selector(format!(
                    "--endpoint-selector {sel:?}: {part:?} is not key=value"
                )));
            }
        }
    }
    if labels.is_empty() || args.target_ports.is_empty() {
        return Err(EppError::Selector(
            "--endpoint-selector needs at least one key=value label and --target-ports".into(),
        ));
    }
    Ok(Some((labels, args.target_ports.clone())))
}

/// The pool file, as the file watcher reads it.
impl WatchedConfig for PoolFile {
    type Error = config::EppConfigError;

    fn parse(text: &str, _validate: bool) -> Result<Self, Self::Error> {
        PoolFile::parse(text)
    }

    fn summary(&self) -> String {
        format!(
            "pool {} with {} endpoints, {} model rules",
            self.name.as_deref().unwrap_or("(unnamed)"),
            self.endpoints.len(),
            self.rules.model_names().count()
        )
    }
}

/// Starts the EPP. Must run inside an actix `System`.
pub async fn start(args: EppArgs) -> Result<EppHandle, EppError> {
    let (scheduler, flow_settings) = picker_config(&args)?;
    // Before any actor starts: a bad certificate is an error to exit on, not a half-started
    // process to tear down.
    let tls = tls::serving_acceptor(args.secure_serving, args.cert_path.as_deref())?;
    if args.lora_cold_adapters == args::ColdAdapters::Resolver
        && args.lora_placement_mode == args::PlacementMode::Lazy
    {
        return Err(EppError::Placement(
            "--lora-cold-adapters resolver places with the sidecars: drop --lora-placement-mode lazy (lazy already leaves every load to the resolver)".into(),
        ));
    }
    if args.lora_copy_names == args::CopyNames::Versioned
        && args.lora_cold_adapters != args::ColdAdapters::Resolver
    {
        return Err(EppError::Placement(
            "--lora-copy-names versioned names the resolver's copies: add --lora-cold-adapters resolver, or drop it".into(),
        ));
    }
    let budget = memory_budget(&args.memory_budget)?;
    let shared = Arc::new(Shared::new(scheduler));
    let metrics = EppMetrics::new();
    metrics
        .memory_budget
        .set(i64::try_from(budget.limit()).unwrap_or(i64::MAX));
    let grpc = bind("ext_proc gRPC", &args.bind_address, args.grpc_port).await?;
    let health = bind("gRPC health", &args.bind_address, args.grpc_health_port).await?;
    let pages_l = bind("metrics", &args.bind_address, args.metrics_port).await?;
    let handle = EppHandle {
        grpc: local_addr(&grpc, "ext_proc gRPC", &args)?,
        health: local_addr(&health, "gRPC health", &args)?,
        metrics: local_addr(&pages_l, "metrics", &args)?,
    };
    start_pool(&args, &shared, &metrics, handle.metrics.port()).await?;
    start_lora_fleet(&args, &shared, &metrics);
    let serving = Serving {
        flow_settings,
        budget: budget.clone(),
        grpc,
        tls,
    };
    start_extproc(&args, &shared, &metrics, serving)?;
    let health_svc = health::EppHealth::new(shared.clone(), args.ha_enable_leader_election);
    tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(health_svc.into_server())
            .serve_with_incoming(TcpListenerStream::new(health))
            .await
        {
            tracing::error!(error = %e, "health server stopped");
        }
    });
    let auth = pages_auth(&args).await?;
    let app = pages::router(
        pages::Pages {
            metrics,
            shared: shared.clone(),
            leader_election: args.ha_enable_leader_election,
            budget,
            public_debug: args.public_debug_endpoints || auth.is_some(),
        },
        auth,
    );
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(pages_l, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(handle)
}

fn local_addr(
    l: &tokio::net::TcpListener,
    what: &'static str,
    args: &EppArgs,
) -> Result<SocketAddr, EppError> {
    l.local_addr().map_err(|source| EppError::Bind {
        what,
        addr: args.bind_address.clone(),
        source,
    })
}

/// The scheduler's settings and flow control's (when its gate is on) from `--config-text` or
/// `--config-file`; upstream's defaults without either.
fn picker_config(
    args: &EppArgs,
) -> Result<(inferlane_epp::SchedulerConfig, Option<config::FlowSettings>), EppError> {
    let config = match (&args.config_text, &args.config_file) {
        (Some(text), _) => Some(("--config-text".to_string(), text.clone())),
        (None, Some(p)) => {
            let path = p.display().to_string();
            let text = std::fs::read_to_string(p).map_err(|source| EppError::ReadConfig {
                path: path.clone(),
                source,
            })?;
            Some((path, text))
        }
        (None, None) => None,
    };
    let (mut scheduler, flow_settings) = match &config {
        Some((path, text)) => {
            let err = |source| EppError::Config {
                path: path.clone(),
                source,
            };
            (
                config::parse_picker_config(text).map_err(err)?,
                config::parse_flow_control(text).map_err(err)?,
            )
        }
        None => (inferlane_epp::SchedulerConfig::default(), None),
    };
    if let Some(d) = args.metrics_staleness_threshold {
        scheduler.metrics_staleness_threshold = d.as_secs_f64();
    }
    Ok((scheduler, flow_settings))
}

/// The actors that keep the pool: the datastore (and its scrapers), the placement keeper, and
/// the pool's source: the pool file's watcher, or Kubernetes discovery (and the leader
/// election when asked for).
async fn start_pool(
    args: &EppArgs,
    shared: &Arc<Shared>,
    metrics: &EppMetrics,
    metrics_port: u16,
) -> Result<(), EppError> {
    // Rebuilds of a large prefix table (above 1,024) run here, not on a request.
    crate::actors::placement::PlacementKeeper::new(shared.clone(), Duration::from_millis(250))
        .start();
    let scrape = ScrapeOptions {
        metrics_interval: args.refresh_metrics_interval,
        models_interval: args.refresh_models_interval,
        timeout: args.scrape_timeout,
        name_filter: args.metrics_name_filter,
        threads: Arc::new(
            ScrapeThreads::start(usize::from(args.scrape_threads))
                .map_err(EppError::ScrapeThreads)?,
        ),
        fleet: Arc::new(crate::actors::scraper::FleetScrapes::counting_errors(
            metrics.scrape_errors.clone(),
        )),
        stall_after: args.engine_stall_after,
    };
    let datastore = Datastore::new(
        shared.clone(),
        scrape,
        metrics.clone(),
        DatastoreOptions {
            pool_name: args.pool_name.clone(),
            unknown_models: args.unknown_models.map(Into::into),
            gauge_interval: args.refresh_prometheus_metrics_interval,
        },
    )
    .start();
    let Some(pool_file) = args.pool_file.clone() else {
        return start_kube(args, shared, datastore, metrics_port).await;
    };
    if args.lora_placement_election {
        return Err(EppError::Placement(
            "--lora-placement-election needs Kubernetes (its Lease); with a pool file name the decider with --lora-placement-from".into(),
        ));
    }
    FileWatcher::<PoolFile>::new(
        WatcherOptions {
            path: pool_file,
            validate: true,
            debounce: Duration::from_millis(10),
            poll_interval: Duration::from_secs(10),
        },
        datastore.recipient(),
        WatchMetrics::default(),
    )
    .start();
    Ok(())
}

/// LoRA placement with `--lora-catalog` (deciding) or `--lora-placement-from` (following).
fn start_lora_fleet(args: &EppArgs, shared: &Arc<Shared>, metrics: &EppMetrics) {
    use crate::actors::lora_placer::{LoraPlacer, PlacerOptions};
    use std::sync::atomic::Ordering::Relaxed;
    // Also without placement: what the EPP sent each server names what its cache holds.
    shared
        .fleet
        .max_cpu_loras
        .store(args.lora_max_cpu_loras, Relaxed);
    if args.lora_catalog.is_none() && args.lora_placement_from.is_none() {
        return;
    }
    let resolver = args.lora_cold_adapters == args::ColdAdapters::Resolver;
    shared.fleet.lazy.store(
        args.lora_placement_mode == args::PlacementMode::Lazy,
        Relaxed,
    );
    shared.fleet.resolver.store(resolver, Relaxed);
    shared.fleet.versioned_copies.store(
        resolver && args.lora_copy_names == args::CopyNames::Versioned,
        Relaxed,
    );
    if resolver {
        crate::actors::lora_unloader::CopyUnloader::new(
            shared.clone(),
            metrics.clone(),
            Duration::from_millis(100),
        )
        .start();
    }
    let placer = LoraPlacer::new(
        shared.clone(),
        metrics.clone(),
        PlacerOptions {
            interval: args.lora_placement_interval,
            default_max_loras: args.lora_default_max_loras,
            max_cpu_loras: args.lora_max_cpu_loras,
            follow: args.lora_placement_from.clone(),
            leader_election: args.ha_enable_leader_election,
            election: args.lora_placement_election,
            token_file: Some(std::path::PathBuf::from(placement_election::TOKEN_FILE))
                .filter(|p| args.lora_placement_election && p.exists()),
            min_drain_ticks: 2,
            max_drain: Duration::from_secs(120),
            params: inferlane_epp::fleet::Params {
                cold_homes: !resolver,
                ..Default::default()
            },
        },
    )
    .start();
    if let Some(path) = &args.lora_catalog {
        FileWatcher::<inferlane_sidecar::LoraConfig>::new(
            WatcherOptions {
                path: path.clone(),
                validate: true,
                debounce: Duration::from_millis(10),
                poll_interval: Duration::from_secs(10),
            },
            placer.recipient(),
            WatchMetrics::default(),
        )
        .start();
    }
}

/// This replica's name on leases: its pod's name and a random suffix (a restarted pod is a
/// new holder).
fn lease_identity() -> String {
    format!(
        "{}-{:08x}",
        std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "epp".into()),
        rand::random::<u32>()
    )
}

/// Kubernetes as the pool's source: discovery, the Lease with `--ha-enable-leader-election`,
/// and the placement lease with `--lora-placement-election`.
async fn start_kube(
    args: &EppArgs,
    shared: &Arc<Shared>,
    datastore: actix::Addr<Datastore>,
    metrics_port: u16,
) -> Result<(), EppError> {
    let client = kube_client(args).await?;
    if args.lora_placement_election {
        placement_election::start(client.clone(), args, shared, lease_identity(), metrics_port)?;
    }
    if args.ha_enable_leader_election {
        let identity = lease_identity();
        LeaderElector::new(
            client.clone(),
            LeaseOptions {
                namespace: args.pool_namespace.clone(),
                name: format!("{}-epp-leader", args.pool_name),
                identity,
                lease_duration: args.lease_duration,
                renew_every: args.lease_renew_interval,
                annotations: Default::default(),
            },
            shared.is_leader.clone(),
        )
        .start();
    }
    KubeDiscovery::new(
        client,
        PoolTarget {
            namespace: args.pool_namespace.clone(),
            name: args.pool_name.clone(),
            group: args.pool_group.clone(),
            endpoint_selector: endpoint_selector(args)?,
        },
        datastore,
    )
    .start();
    Ok(())
}

/// What the ext_proc server is started with besides the flags.
struct Serving {
    flow_settings: Option<config::FlowSettings>,
    budget: Arc<MemoryBudget>,
    grpc: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// The process's memory budget from `--memory-budget` (logged with where it came from).
fn memory_budget(flag: &str) -> Result<Arc<MemoryBudget>, EppError> {
    let (bytes, source) =
        crate::memory::derive_budget(flag, std::path::Path::new("/sys/fs/cgroup"))?;
    tracing::info!(
        bytes,
        ?source,
        "memory budget for streams, bodies and held requests"
    );
    Ok(MemoryBudget::new(bytes))
}

/// The ext_proc service (with flow control when configured) on its pinned serving threads.
fn start_extproc(
    args: &EppArgs,
    shared: &Arc<Shared>,
    metrics: &EppMetrics,
    serving: Serving,
) -> Result<(), EppError> {
    let Serving {
        flow_settings,
        budget,
        grpc,
        tls,
    } = serving;
    let mut extproc = ExtProc::new(
        shared.clone(),
        ExtProcOptions {
            max_body_bytes: args.max_body_bytes,
            restore_model_name: args.restore_model_name,
            trust_model_rewrite_header: args.trust_model_rewrite_header,
        },
        metrics.clone(),
    )
    .with_memory_budget(budget);
    if let Some(settings) = flow_settings {
        tracing::info!(
            bands = settings.queues.bands.len(),
            ttl = ?settings.default_ttl,
            "flow control on: requests are held while the pool is saturated"
        );
        extproc = extproc.with_flow_control(crate::flow_control::FlowControl::start(
            settings,
            shared.clone(),
            metrics.clone(),
            args.pool_name.clone(),
        ));
    }
    let svc = ExternalProcessorServer::new(extproc)
        // A buffered body arrives in one message; allow it past tonic's 4 MiB default.
        .max_decoding_message_size(args.max_body_bytes + 64 * 1024);
    serve::serve_pinned(
        grpc,
        svc,
        serve::ServeOptions {
            threads: serve::grpc_threads(args.grpc_threads),
            tls,
            name: "epp",
            max_concurrent_streams: args.grpc_max_concurrent_streams,
        },
    )
    .map_err(EppError::GrpcThreads)
}

/// `--metrics-endpoint-auth` (default: on against Kubernetes, off with a pool file).
async fn pages_auth(
    args: &EppArgs,
) -> Result<Option<Arc<crate::net::metrics_auth::MetricsAuth>>, EppError> {
    if !args
        .metrics_endpoint_auth
        .unwrap_or(args.pool_file.is_none())
    {
        return Ok(None);
    }
    tracing::info!(
        "metrics and debug pages need a token the API server vouches for (--metrics-endpoint-auth)"
    );
    let reviewer = crate::net::metrics_auth::KubeReviewer(kube_client(args).await?);
    Ok(Some(crate::net::metrics_auth::MetricsAuth::new(Box::new(
        reviewer,
    ))))
}
