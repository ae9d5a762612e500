//! lora-sidecar wiring: flags, the status/metrics HTTP server, and actor start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Args;
use serde_json::json;
use thiserror::Error;

use crate::actors::configmap_watcher::{ConfigMapSource, ConfigMapWatcher};
use crate::actors::file_watcher::{FileWatcher, WatchMetrics, WatchedConfig, WatcherOptions};
use crate::actors::reconciler::metrics::SidecarMetrics;
use crate::actors::reconciler::{Reconciler, ReconcilerOptions, SyncStatus};
use crate::runtime::{parse_bool, parse_duration};

/// Errors that stop the sidecar from starting.
#[derive(Debug, Error)]
pub enum SidecarError {
    #[error("cannot bind the metrics/health port {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("--configmap {0}")]
    ConfigMapSpec(String),
    #[error("{0}")]
    Placement(String),
    #[error("{0} (needed for --configmap)")]
    Kube(#[source] crate::net::kube_client::KubeClientError),
}

/// Upstream's sidecar (Python argparse) spells every flag we share the same way; `-v` and
/// the zap logging flags are accepted like the other binaries'.
pub const UPSTREAM_FLAGS: &[(&str, crate::flags::Upstream)] = &[];

/// lora-sidecar flags (names and defaults compatible with upstream's manifests).
#[derive(Debug, Clone, Args)]
pub struct SidecarArgs {
    /// The mounted ConfigMap file (`vLLMLoRAConfig`). Its directory is watched, so kubelet's
    /// `..data` symlink swap is seen.
    #[arg(
        long,
        env = "DYNAMIC_LORA_ROLLOUT_CONFIG",
        default_value = "/config/configmap.yaml"
    )]
    pub config: PathBuf,
    /// Read the config from this ConfigMap (`namespace/name`) through the Kubernetes API
    /// instead of a mounted file (needs get/list/watch on configmaps).
    #[arg(long)]
    pub configmap: Option<String>,
    /// Adapter sources that may be handed to vLLM to load (repeatable): a prefix such as
    /// `/models/` or `s3://adapters/`, or `local` (absolute paths) and `hub` (hub ids
    /// `org/name`). Without it, local paths and hub ids only: a source that is a URL or a
    /// relative or `..` path is refused (the adapter reported failing) and never sent.
    #[arg(
        long = "allowed-source",
        env = "LORA_ALLOWED_SOURCES",
        value_delimiter = ','
    )]
    pub allowed_source: Vec<String>,
    /// Kubeconfig file for --configmap; without it `KUBECONFIG`, `~/.kube/config` or the pod's
    /// service account.
    #[arg(long)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Data key holding the config in --configmap.
    #[arg(long, default_value = "configmap.yaml")]
    pub configmap_key: String,
    /// How long one reconcile waits for vLLM's /health to answer 200.
    #[arg(long, default_value = "300", value_parser = parse_duration)]
    pub health_check_timeout: Duration,
    /// Longest pause between /health probes while waiting (probes start 50 ms apart and
    /// back off to at most 200 ms or this, whichever is shorter).
    #[arg(long, default_value = "2", value_parser = parse_duration)]
    pub health_check_interval: Duration,
    /// Periodic resync: re-list the server and repair drift (e.g. a restarted vLLM).
    #[arg(long, default_value = "5", value_parser = parse_duration)]
    pub reconcile_trigger: Duration,
    /// Validate the config beyond its structure (duplicates, empty ids, ports).
    #[arg(long, default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub config_validation: bool,
    /// Port for /metrics, /healthz and /readyz (0 picks a free one, printed on stdout).
    #[arg(long, default_value_t = 8080)]
    pub metrics_port: u16,
    /// Address for the metrics/health server.
    #[arg(long, default_value = "0.0.0.0")]
    pub metrics_host: String,
    /// Timeout of every HTTP call to vLLM.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub http_timeout: Duration,
    /// Load/unload calls in flight at once.
    #[arg(long, default_value_t = 4)]
    pub max_concurrent_ops: usize,
    /// First retry delay of a failing adapter (doubles, jittered).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub retry_initial_backoff: Duration,
    /// Longest retry delay of a failing adapter.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub retry_max_backoff: Duration,
    /// Quiet time after a file event before the config is re-read (kubelet's swap is one
    /// atomic rename plus cleanup events, so a short window is enough).
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    pub debounce: Duration,
    /// Re-read the config on this period too, in case file events are lost.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub config_poll_interval: Duration,
    /// LoRA placement: the EPP's `/lora/v1/placement` URL (e.g.
    /// `http://<pool>-epp:9090/lora/v1/placement`). The catalogue adapters (`onDemand`) it
    /// places on this server are loaded, the others unloaded; while it cannot be reached the
    /// last set is kept.
    #[arg(long, env = "LORA_PLACEMENT_URL")]
    pub placement_url: Option<String>,
    /// This server's id in the EPP's pool: its pod name (`POD_NAME`), else `ip:port`.
    #[arg(long, env = "POD_NAME")]
    pub placement_server: Option<String>,
    /// How often the EPP is asked.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub placement_interval: Duration,
    /// How long an adapter the EPP dropped from this server stays loaded before it is
    /// unloaded: other EPP replicas route by a copy of the table up to a placement tick
    /// (2 s) older. At least the EPP's `--lora-placement-interval`.
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    pub placement_unload_grace: Duration,
    /// Bearer token for an EPP that checks tokens (`--metrics-endpoint-auth`); the pod's
    /// service account token by default, when mounted.
    #[arg(
        long,
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub placement_token_file: PathBuf,
    /// The folder of the server's LoRA resolver (`VLLM_LORA_RESOLVER_CACHE_DIR`, shared with
    /// the vLLM container): the sidecar links each catalogue adapter's served name there to
    /// its source (local absolute paths), for an EPP with `--lora-copy-names versioned`.
    /// Links it no longer wants are removed; other entries are never touched.
    #[arg(long, env = "LORA_RESOLVER_DIR")]
    pub lora_resolver_dir: Option<PathBuf>,
}

#[derive(Clone)]
struct HttpState {
    status: Arc<ArcSwap<SyncStatus>>,
    metrics: SidecarMetrics,
}

async fn metrics_handler(State(s): State<HttpState>) -> Response {
    crate::net::metrics_text::response(s.metrics.encode()).into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(s): State<HttpState>) -> Response {
    let st = s.status.load();
    let body = json!({
        "ready": st.ready,
        "in_sync": st.in_sync,
        "generation": st.generation,
        "server_healthy": st.server_healthy,
        "missing": st.missing,
        "failing": st.failing,
    })
    .to_string();
    let code = if st.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn http_client(args: &SidecarArgs) -> Result<reqwest::Client, SidecarError> {
    reqwest::Client::builder()
        .timeout(args.http_timeout)
        .connect_timeout(args.http_timeout.min(Duration::from_secs(5)))
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .map_err(SidecarError::Client)
}

/// A started sidecar.
#[derive(Debug, Clone)]
pub struct SidecarHandle {
    pub http_addr: SocketAddr,
}

/// Starts the reconciler, the config watcher and the HTTP server. Must run inside an actix
/// `System`.
pub async fn start(args: SidecarArgs) -> Result<SidecarHandle, SidecarError> {
    let metrics = SidecarMetrics::new();
    let status = Arc::new(ArcSwap::from_pointee(SyncStatus::default()));
    let addr = format!("{}:{}", args.metrics_host, args.metrics_port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| SidecarError::Bind { addr, source })?;
    let http_addr = listener.local_addr().map_err(|source| SidecarError::Bind {
        addr: args.metrics_host.clone(),
        source,
    })?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(HttpState {
            status: status.clone(),
            metrics: metrics.clone(),
        });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "status server stopped");
        }
    });
    let client = http_client(&args)?;
    let reconciler = Reconciler::new(
        ReconcilerOptions {
            health_check_timeout: args.health_check_timeout,
            health_check_interval: args.health_check_interval,
            resync_interval: args.reconcile_trigger,
            http_timeout: args.http_timeout,
            max_concurrent_ops: args.max_concurrent_ops,
            retry_initial: args.retry_initial_backoff,
            retry_max: args.retry_max_backoff,
            allowed_sources: inferlane_sidecar::SourcePolicy::new(args.allowed_source.clone()),
        },
        client,
        status,
        metrics.clone(),
    )
    .start();
    let links = match (&args.lora_resolver_dir, &args.placement_url) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(SidecarError::Placement(
                "--lora-resolver-dir serves LoRA placement: add --placement-url, or drop it".into(),
            ));
        }
        (Some(dir), Some(_)) if !dir.is_dir() => {
            return Err(SidecarError::Placement(format!(
                "--lora-resolver-dir {}: not a folder; mount the volume vLLM's VLLM_LORA_RESOLVER_CACHE_DIR names there",
                dir.display()
            )));
        }
        (Some(dir), Some(_)) => {
            let linked = crate::actors::resolver_links::Linked::default();
            let actor = crate::actors::resolver_links::ResolverLinks::new(
                dir.clone(),
                inferlane_sidecar::SourcePolicy::new(args.allowed_source.clone()),
                linked.clone(),
            );
            Some((actor.start().recipient(), linked))
        }
    };
    let reconciler = match &args.placement_url {
        None => reconciler.recipient(),
        Some(url) => {
            reqwest::Url::parse(url).map_err(|e| {
                SidecarError::Placement(format!("--placement-url {url:?}: {e}; give the EPP's http://host:port/lora/v1/placement"))
            })?;
            let server = args.placement_server.clone().ok_or_else(|| {
                SidecarError::Placement(
                    "--placement-url needs --placement-server (or POD_NAME): this server's pod name or ip:port in the EPP's pool".into(),
                )
            })?;
            crate::actors::placement_follower::PlacementFollower::new(
                crate::actors::placement_follower::FollowerOptions {
                    url: url.clone(),
                    server,
                    interval: args.placement_interval,
                    unload_grace: args.placement_unload_grace,
                    token_file: args
                        .placement_token_file
                        .exists()
                        .then(|| args.placement_token_file.clone()),
                },
                http_client(&args)?,
                reconciler.recipient(),
                links,
            )
            .start()
            .recipient()
        }
    };
    let watch_metrics = WatchMetrics {
        valid: metrics.config_valid.clone(),
        generation: metrics.config_generation.clone(),
        errors: metrics.config_errors.clone(),
    };
    match &args.configmap {
        Some(spec) => {
            let source = ConfigMapSource::named(spec, &args.configmap_key)
                .map_err(SidecarError::ConfigMapSpec)?;
            let client = crate::net::kube_client::kube_client(args.kubeconfig.as_deref())
                .await
                .map_err(SidecarError::Kube)?;
            ConfigMapWatcher::<inferlane_sidecar::LoraConfig>::new(
                client,
                source,
                reconciler.clone(),
                watch_metrics,
            )
            .start();
        }
        None => {
            FileWatcher::<inferlane_sidecar::LoraConfig>::new(
                WatcherOptions {
                    path: args.config.clone(),
                    validate: args.config_validation,
                    debounce: args.debounce,
                    poll_interval: args.config_poll_interval,
                },
                reconciler.clone(),
                watch_metrics,
            )
            .start();
        }
    }
    Ok(SidecarHandle { http_addr })
}

impl WatchedConfig for inferlane_sidecar::LoraConfig {
    type Error = inferlane_sidecar::ConfigError;

    fn parse(text: &str, validate: bool) -> Result<Self, Self::Error> {
        inferlane_sidecar::parse(text, validate)
    }

    fn summary(&self) -> String {
        format!(
            "{} ensureExist, {} ensureNotExist, server {}",
            self.ensure_exist.len(),
            self.ensure_not_exist.len(),
            self.base_url()
        )
    }

    fn warnings(&self) -> Vec<String> {
        self.conflicts
            .iter()
            .map(|id| format!("adapter {id:?} is listed in both ensureExist and ensureNotExist; leaving it as it is"))
            .collect()
    }
}
