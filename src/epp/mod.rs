//! epp wiring: flags, the ext_proc and health gRPC servers, the metrics server, actor start-up.

pub mod health;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use clap::Args;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use thiserror::Error;
use tokio_stream::wrappers::TcpListenerStream;

use crate::actors::datastore::{Datastore, DatastoreOptions};
use crate::actors::file_watcher::{FileWatcher, WatchMetrics, WatchedConfig, WatcherOptions};
use crate::actors::kube_discovery::{EndpointSelector, KubeDiscovery, PoolTarget};
use crate::actors::leader::{LeaderElector, LeaseOptions};
use crate::actors::scraper::{ScrapeOptions, ScrapeThreads};
use crate::extproc::{ExtProc, ExtProcOptions};
use crate::net::{serve, tls};
use crate::pool::config::{self, PoolFile};
use crate::pool::metrics::EppMetrics;
use crate::pool::state::Shared;
use crate::runtime::{parse_bool, parse_duration};

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
}

/// epp flags (upstream-compatible names where upstream has them).
#[derive(Debug, Clone, Args)]
pub struct EppArgs {
    /// ext_proc gRPC port.
    #[arg(long, default_value_t = 9002)]
    pub grpc_port: u16,
    /// gRPC health port (services `liveness`, `readiness`, the ExternalProcessor).
    #[arg(long, default_value_t = 9003)]
    pub grpc_health_port: u16,
    /// Prometheus metrics port.
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    /// Address every server binds.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: String,
    /// The InferencePool this EPP serves (labels metrics).
    #[arg(long, default_value = "default-pool")]
    pub pool_name: String,
    /// Namespace of the InferencePool (and of its pods and models); env NAMESPACE as upstream.
    #[arg(long, env = "NAMESPACE", default_value = "default")]
    pub pool_namespace: String,
    /// EndpointPickerConfig file (scorer weights, saturation thresholds).
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// EndpointPickerConfig given as text instead of a file (wins over --config-file).
    #[arg(long)]
    pub config_text: Option<String>,
    /// API group of the InferencePool: `inference.networking.k8s.io` (v1) or
    /// `inference.networking.x-k8s.io` (v1alpha2). Without it, the group the cluster serves
    /// is discovered at start (v1 preferred) and logged.
    #[arg(long)]
    pub pool_group: Option<String>,
    /// Requests for a model no InferenceModel (or pool file rule) names: `route` them as they
    /// are, or `reject` them with 404. Without it, as the pool's API generation did upstream:
    /// a v1alpha2 pool (the InferenceModel era) rejects, a v1 pool or a pool file routes. A
    /// pool file's `unknownModels` wins over this flag.
    #[arg(long, value_enum)]
    pub unknown_models: Option<UnknownModels>,
    /// Put the client's model name back into responses of rewritten requests (canary
    /// splits, rewrites). Off by default: like vLLM and upstream, a response names the model
    /// that served it (`"model": "food-review-1"`), which is how a canary is told apart.
    #[arg(long, default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub restore_model_name: bool,
    /// Honour the request header `x-gateway-model-name-rewrite` (it replaces the target
    /// model, overriding canary splits and `--unknown-models reject`). Off by default: only
    /// turn it on where the gateway strips the client's copy and sets its own.
    #[arg(long, default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub trust_model_rewrite_header: bool,
    /// Metrics older than this count as stale (saturated, not trusted for picking); overrides
    /// the EndpointPickerConfig's saturationDetector.metricsStalenessThreshold.
    #[arg(long, value_parser = parse_duration)]
    pub metrics_staleness_threshold: Option<Duration>,
    /// How often the pool-level gauges (inference_pool_*) are recomputed.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub refresh_prometheus_metrics_interval: Duration,
    /// Standalone on Kubernetes: select pods by labels (`app=vllm,tier=gpu`) instead of
    /// watching an InferencePool; needs --target-ports.
    #[arg(long)]
    pub endpoint_selector: Option<String>,
    /// Ports of each selected pod that are endpoints (with --endpoint-selector), e.g. `8000,8001`.
    #[arg(long, value_delimiter = ',')]
    pub target_ports: Vec<i32>,
    /// Protect `/metrics` and `/debug/*` with the API server's TokenReview and
    /// SubjectAccessReview (a Bearer token whose identity may `get` the path), as upstream.
    /// Default: on against Kubernetes, off with --pool-file (no API server to ask).
    #[arg(long, value_parser = parse_bool, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub metrics_endpoint_auth: Option<bool>,
    /// Kubeconfig file for the API server (upstream's `--kubeconfig`); without it `KUBECONFIG`,
    /// `~/.kube/config` or the pod's service account.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Standalone mode: YAML file with the pool's endpoints and model rules, watched live.
    /// Without it the EPP watches the InferencePool, its pods and models in Kubernetes.
    #[arg(long, env = "EPP_POOL_FILE")]
    pub pool_file: Option<PathBuf>,
    /// Metrics scrape period per endpoint.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub refresh_metrics_interval: Duration,
    /// Period for re-reading each endpoint's /v1/models (adapter availability).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub refresh_models_interval: Duration,
    /// Timeout of one scrape.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub scrape_timeout: Duration,
    /// OS threads that run the scrape loops (endpoints are spread over them); one thread
    /// scrapes a few hundred endpoints every 50 ms. Scraping off the request path's worker
    /// pool keeps its wake-ups from costing the request path.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub scrape_threads: u16,
    /// Threads serving ext_proc connections (0 = one per core). Each gateway connection and
    /// all its streams are served by one thread (no cross-thread hand-offs per message);
    /// Envoy opens one connection per worker, so a gateway with N workers uses up to N.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=256))]
    pub grpc_threads: u16,
    /// Ask model servers for only the metric families routing reads (`/metrics?name[]=...`,
    /// prometheus_client's filter, which vLLM's `/metrics` honours): a ~2 KB answer instead
    /// of a ~50 KB page, less work for the model server and the EPP. Checked against a whole
    /// page at start and every minute; servers that ignore or break the filter are read whole.
    #[arg(long, default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub metrics_name_filter: bool,
    /// Serve ext_proc over TLS (as upstream, on by default; gateways connect without verifying).
    #[arg(long, default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub secure_serving: bool,
    /// Directory with `tls.crt` and `tls.key` for --secure-serving (re-read when they change);
    /// without it a self-signed certificate is generated at start.
    #[arg(long)]
    pub cert_path: Option<PathBuf>,
    /// Several replicas: only the holder of a coordination.k8s.io Lease reports ready (the
    /// others keep scraping, ready to take over). Without it replicas run active-active.
    #[arg(long)]
    pub ha_enable_leader_election: bool,
    /// Lease duration: a dead leader is replaced after this long.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// How often the lease is renewed or tried.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub lease_renew_interval: Duration,
    /// Most concurrent requests one gateway connection may have open (HTTP/2
    /// MAX_CONCURRENT_STREAMS; the gateway opens another connection past it). Idle gateway
    /// connections are checked with HTTP/2 PINGs every 30 s.
    #[arg(long, default_value_t = serve::DEFAULT_MAX_CONCURRENT_STREAMS, value_parser = clap::value_parser!(u32).range(1..))]
    pub grpc_max_concurrent_streams: u32,
    /// Largest request body accepted (413 above).
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
}

/// `--unknown-models`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UnknownModels {
    Route,
    Reject,
}

impl From<UnknownModels> for inferlane_epp::rules::UnknownModelPolicy {
    fn from(u: UnknownModels) -> Self {
        match u {
            UnknownModels::Route => Self::Route,
            UnknownModels::Reject => Self::Reject,
        }
    }
}

/// Upstream EPP flags spelled differently from ours, or accepted without effect (the reason
/// is logged at start). Flags we share are matched in either spelling without an entry here.
pub const UPSTREAM_FLAGS: &[(&str, crate::flags::Upstream)] = {
    use crate::flags::Upstream::{Ignored, Rename};
    &[
        (
            "enable-pprof",
            Ignored {
                takes_value: false,
                why: "no pprof handlers (the Rust EPP has no Go runtime)",
            },
        ),
        (
            "health-checking",
            Ignored {
                takes_value: false,
                why: "the gRPC health service always runs",
            },
        ),
        (
            "tracing",
            Ignored {
                takes_value: false,
                why: "no OpenTelemetry export; logs carry x-request-id",
            },
        ),
        (
            "enable-cert-reload",
            Ignored {
                takes_value: false,
                why: "--cert-path is always re-read when it changes",
            },
        ),
        (
            "total-queued-requests-metric",
            Ignored {
                takes_value: true,
                why: "metric names follow each pod's inference.networking.k8s.io/engine-type label",
            },
        ),
        (
            "kv-cache-usage-percentage-metric",
            Ignored {
                takes_value: true,
                why: "metric names follow each pod's inference.networking.k8s.io/engine-type label",
            },
        ),
        (
            "lora-info-metric",
            Ignored {
                takes_value: true,
                why: "metric names follow each pod's inference.networking.k8s.io/engine-type label",
            },
        ),
        (
            "cache-info-metric",
            Ignored {
                takes_value: true,
                why: "metric names follow each pod's inference.networking.k8s.io/engine-type label",
            },
        ),
        (
            "model-server-metrics-port",
            Ignored {
                takes_value: true,
                why: "metrics are read from each endpoint's target port",
            },
        ),
        (
            "model-server-metrics-path",
            Ignored {
                takes_value: true,
                why: "metrics are read from /metrics",
            },
        ),
        (
            "model-server-metrics-scheme",
            Ignored {
                takes_value: true,
                why: "metrics are read over http",
            },
        ),
        (
            "model-server-metrics-https-insecure-skip-verify",
            Ignored {
                takes_value: false,
                why: "metrics are read over http",
            },
        ),
        (
            "target-endpoint-key",
            Ignored {
                takes_value: true,
                why: "the destination header is x-gateway-destination-endpoint",
            },
        ),
        (
            "destination-endpoint-hint-key",
            Ignored {
                takes_value: true,
                why: "the destination header is x-gateway-destination-endpoint",
            },
        ),
        (
            "destination-endpoint-hint-metadata-namespace",
            Ignored {
                takes_value: true,
                why: "the metadata namespace is envoy.lb",
            },
        ),
        ("endpoint-target-ports", Rename("target-ports")),
    ]
};

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

/// What the metrics page reads besides the registry: readiness and the pool's generation
/// are read when scraped, not pushed on every change.
#[derive(Clone)]
struct PageState {
    metrics: EppMetrics,
    shared: Arc<Shared>,
    leader_election: bool,
}

async fn metrics_page(State(p): State<PageState>) -> impl IntoResponse {
    let m = &p.metrics;
    let synced = p
        .shared
        .pool_synced
        .load(std::sync::atomic::Ordering::Acquire);
    let leader = !p.leader_election || p.shared.is_leader.load(std::sync::atomic::Ordering::SeqCst);
    m.ready.set(i64::from(synced && leader));
    m.pool_generation
        .set(i64::try_from(p.shared.snapshot.load().generation).unwrap_or(i64::MAX));
    crate::net::metrics_text::response(m.encode())
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

/// What the picker sees: endpoints (with health) and model names, for operators and tests.
async fn debug_pool(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let snap = shared.snapshot.load();
    let endpoints: Vec<serde_json::Value> = snap
        .endpoints
        .iter()
        .map(|h| serde_json::json!({"address": h.address, "name": h.identity, "engine": format!("{:?}", h.engine), "healthy": h.is_healthy(),
            "engine_down": h.engine_down.load(std::sync::atomic::Ordering::Relaxed),
            "ejected": h.outlier.is_ejected()}))
        .collect();
    // How many prompt prefixes this replica places: replicas that agree hold about as many.
    let prefixes = crate::pool::state::lock_placement(&shared).len();
    let mut models: Vec<&str> = snap.rules.model_names().collect();
    models.sort_unstable();
    let targets: serde_json::Map<String, serde_json::Value> = models
        .iter()
        .map(|m| {
            let t = snap.rules.targets_of(m).unwrap_or_default();
            (
                m.to_string(),
                t.into_iter()
                    .map(|(name, w)| serde_json::json!({"name": name, "weight": w}))
                    .collect(),
            )
        })
        .collect();
    axum::Json(
        serde_json::json!({"generation": snap.generation, "endpoints": endpoints, "models": models,
                           "targets": targets, "active_prefixes": prefixes,
                           "ready": shared.pool_synced.load(std::sync::atomic::Ordering::Acquire),
                           "leader": shared.is_leader.load(std::sync::atomic::Ordering::SeqCst)}),
    )
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
    // Before any actor starts: a bad certificate is an error to exit on, not a half-started
    // process to tear down.
    let tls = tls::serving_acceptor(args.secure_serving, args.cert_path.as_deref())?;
    let shared = Arc::new(Shared::new(scheduler));
    let metrics = EppMetrics::new();

    let grpc = bind("ext_proc gRPC", &args.bind_address, args.grpc_port).await?;
    let health = bind("gRPC health", &args.bind_address, args.grpc_health_port).await?;
    let metrics_l = bind("metrics", &args.bind_address, args.metrics_port).await?;
    let handle = EppHandle {
        grpc: grpc.local_addr().map_err(|source| EppError::Bind {
            what: "ext_proc gRPC",
            addr: args.bind_address.clone(),
            source,
        })?,
        health: health.local_addr().map_err(|source| EppError::Bind {
            what: "gRPC health",
            addr: args.bind_address.clone(),
            source,
        })?,
        metrics: metrics_l.local_addr().map_err(|source| EppError::Bind {
            what: "metrics",
            addr: args.bind_address.clone(),
            source,
        })?,
    };

    // Rebuilds of a large prefix table (above 1,024) run here, not on a request.
    crate::actors::placement::PlacementKeeper::new(shared.clone(), Duration::from_millis(250))
        .start();
    let datastore = Datastore::new(
        shared.clone(),
        ScrapeOptions {
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
        },
        metrics.clone(),
        DatastoreOptions {
            pool_name: args.pool_name.clone(),
            unknown_models: args.unknown_models.map(Into::into),
            gauge_interval: args.refresh_prometheus_metrics_interval,
        },
    )
    .start();
    match args.pool_file.clone() {
        Some(pool_file) => {
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
        }
        None => {
            let client = kube_client(&args).await?;
            if args.ha_enable_leader_election {
                let identity = format!(
                    "{}-{:08x}",
                    std::env::var("POD_NAME")
                        .or_else(|_| std::env::var("HOSTNAME"))
                        .unwrap_or_else(|_| "epp".into()),
                    rand::random::<u32>()
                );
                LeaderElector::new(
                    client.clone(),
                    LeaseOptions {
                        namespace: args.pool_namespace.clone(),
                        name: format!("{}-epp-leader", args.pool_name),
                        identity,
                        lease_duration: args.lease_duration,
                        renew_every: args.lease_renew_interval,
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
                    endpoint_selector: endpoint_selector(&args)?,
                },
                datastore,
            )
            .start();
        }
    }

    let mut extproc = ExtProc::new(
        shared.clone(),
        ExtProcOptions {
            max_body_bytes: args.max_body_bytes,
            restore_model_name: args.restore_model_name,
            trust_model_rewrite_header: args.trust_model_rewrite_header,
        },
        metrics.clone(),
    );
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
    .map_err(EppError::GrpcThreads)?;

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

    let mut app = Router::new()
        .route("/metrics", get(metrics_page))
        .with_state(PageState {
            metrics,
            shared: shared.clone(),
            leader_election: args.ha_enable_leader_election,
        })
        .merge(
            Router::new()
                .route("/debug/pool", get(debug_pool))
                .with_state(shared.clone()),
        );
    if args
        .metrics_endpoint_auth
        .unwrap_or(args.pool_file.is_none())
    {
        let reviewer = crate::net::metrics_auth::KubeReviewer(kube_client(&args).await?);
        app = app.layer(axum::middleware::from_fn_with_state(
            crate::net::metrics_auth::MetricsAuth::new(Box::new(reviewer)),
            crate::net::metrics_auth::layer,
        ));
        tracing::info!(
            "metrics and debug pages need a token the API server vouches for (--metrics-endpoint-auth)"
        );
    }
    tokio::spawn(async move {
        if let Err(e) = axum::serve(metrics_l, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(handle)
}
