//! Body-based routing: a gateway-level ext_proc server that names the base model in headers so HTTPRoutes can pick the pool.

pub mod health;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use arc_swap::ArcSwap;
use clap::Args;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ProcessingRequest,
    processing_request, processing_response,
};
use inferlane_epp::bbr::{BaseModelMap, BbrError, parse_mapping};
use prometheus_client::metrics::counter::Counter;
use thiserror::Error;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

use crate::actors::configmap_watcher::{ConfigMapSource, ConfigMapWatcher};
use crate::actors::file_watcher::{FileWatcher, WatchMetrics, WatchedConfig, WatcherOptions};
use crate::actors::messages::ConfigChanged;
use crate::extproc::proto::{
    ResponseStream, Tx, continue_headers, driven_processor, immediate_error, is_full_duplex,
    pass_through, reply, send, send_streamed_body, set_header,
};
use crate::net::tls;
use crate::runtime::parse_bool;

/// Header naming the model the client asked for.
pub const MODEL_HEADER: &str = "x-gateway-model-name";
/// Header naming its base model (empty when unknown); HTTPRoutes match on it.
pub const BASE_MODEL_HEADER: &str = "x-gateway-base-model-name";

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

/// bbr's Prometheus metrics (upstream's names: `bbr_success_total`,
/// `bbr_model_not_in_body_total`, `bbr_model_not_parsed_total`), plus `bbr_info`.
#[derive(Clone, Debug)]
pub struct BbrMetrics {
    registry: Arc<prometheus_client::registry::Registry>,
    success: Counter,
    not_in_body: Counter,
    not_parsed: Counter,
}

impl BbrMetrics {
    pub fn new() -> Self {
        let mut r = prometheus_client::registry::Registry::default();
        let (success, not_in_body, not_parsed) =
            (Counter::default(), Counter::default(), Counter::default());
        r.register(
            "bbr_success",
            "Requests whose model was read from the body",
            success.clone(),
        );
        r.register(
            "bbr_model_not_in_body",
            "Requests whose JSON body has no model (left to the pool's EPP, which answers 400)",
            not_in_body.clone(),
        );
        r.register(
            "bbr_model_not_parsed",
            "Requests whose body is not a JSON object",
            not_parsed.clone(),
        );
        crate::net::metrics_text::register_info(
            &mut r,
            "bbr",
            &[("version", env!("CARGO_PKG_VERSION"))],
        );
        Self {
            registry: Arc::new(r),
            success,
            not_in_body,
            not_parsed,
        }
    }

    pub fn encode(&self) -> String {
        crate::net::metrics_text::encode(&self.registry)
    }
}

impl Default for BbrMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone)]
struct Bbr {
    map: Arc<ArcSwap<BaseModelMap>>,
    max_body: usize,
    metrics: BbrMetrics,
}

/// What a body says about its model.
enum BodyModel {
    Named(String),
    /// Valid JSON without a usable `model`.
    Missing,
    NotJson,
}

fn model_of(body: &[u8]) -> BodyModel {
    #[derive(serde::Deserialize)]
    struct M {
        model: Option<String>,
    }
    match serde_json::from_slice::<M>(body) {
        Err(_) => BodyModel::NotJson,
        // A name past the EPP's limit is no model: no header carries it, the EPP answers 400.
        Ok(m) => match m
            .model
            .filter(|m| !m.is_empty() && m.len() <= inferlane_epp::request::MAX_MODEL_NAME_BYTES)
        {
            Some(name) => BodyModel::Named(name),
            None => BodyModel::Missing,
        },
    }
}

impl Bbr {
    fn mutation(&self, body: &[u8]) -> HeaderMutation {
        let mut m = HeaderMutation::default();
        let model = match model_of(body) {
            BodyModel::Named(name) => {
                self.metrics.success.inc();
                Some(name)
            }
            BodyModel::Missing => {
                self.metrics.not_in_body.inc();
                None
            }
            BodyModel::NotJson => {
                self.metrics.not_parsed.inc();
                None
            }
        };
        match model {
            Some(model) => {
                let base = self.map.load().base_of(&model).unwrap_or("").to_string();
                if base.is_empty() {
                    tracing::debug!(%model, "no base model known for this model");
                }
                m.set_headers.push(set_header(MODEL_HEADER, &model));
                m.set_headers.push(set_header(BASE_MODEL_HEADER, &base));
            }
            // No model: leave routing alone; the pool's EPP answers the 400.
            None => m.remove_headers = vec![MODEL_HEADER.into(), BASE_MODEL_HEADER.into()],
        }
        m
    }

    async fn handle(
        &self,
        inbound: &mut Streaming<ProcessingRequest>,
        tx: &Tx,
    ) -> Result<(), Status> {
        let mut body = Vec::new();
        let mut full_duplex = false;
        let mut answered = false;
        loop {
            let msg = match inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(_) if answered => break,
                Err(e) => return Err(e),
            };
            let Some(req) = msg.request.as_ref() else {
                continue;
            };
            match req {
                processing_request::Request::RequestHeaders(h) => {
                    full_duplex = is_full_duplex(&msg);
                    if h.end_of_stream || !full_duplex {
                        send(tx, continue_headers()).await?;
                        answered = h.end_of_stream;
                    }
                }
                processing_request::Request::RequestBody(b) => {
                    // Never route on part of a body (the model may come after the cut), nor
                    // send part of it upstream: too large is a 413, as from the EPP.
                    if body.len() + b.body.len() > self.max_body {
                        send(
                            tx,
                            immediate_error(
                                413,
                                "PayloadTooLarge",
                                &format!(
                                    "request body larger than {} bytes (bbr --max-body-bytes)",
                                    self.max_body
                                ),
                            ),
                        )
                        .await?;
                        return Ok(());
                    }
                    body.extend_from_slice(&b.body);
                    if !b.end_of_stream {
                        continue;
                    }
                    let common = CommonResponse {
                        header_mutation: Some(self.mutation(&body)),
                        clear_route_cache: true,
                        ..Default::default()
                    };
                    if full_duplex {
                        send(
                            tx,
                            reply(processing_response::Response::RequestHeaders(
                                HeadersResponse {
                                    response: Some(common),
                                },
                            )),
                        )
                        .await?;
                        send_streamed_body(tx, &body).await?;
                    } else {
                        send(
                            tx,
                            reply(processing_response::Response::RequestBody(BodyResponse {
                                response: Some(common),
                            })),
                        )
                        .await?;
                    }
                    answered = true;
                }
                // bbr only reads request bodies; any other phase passes unchanged.
                other => send(tx, pass_through(other)).await?,
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl ExternalProcessor for Bbr {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let this = self.clone();
        Ok(driven_processor(
            tracing::debug_span!("bbr"),
            move |tx| async move { this.handle(&mut inbound, &tx).await },
        ))
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
    let svc = ExternalProcessorServer::new(Bbr {
        map,
        max_body: args.max_body_bytes,
        metrics,
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

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::HeaderMap;
    use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        HttpBody, HttpHeaders, ProtocolConfiguration,
    };
    use tokio_stream::wrappers::TcpListenerStream;

    fn msg(r: processing_request::Request, full_duplex: bool) -> ProcessingRequest {
        ProcessingRequest {
            request: Some(r),
            protocol_config: full_duplex.then(|| ProtocolConfiguration {
                request_body_mode: BodySendMode::FullDuplexStreamed as i32,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A full-duplex body over --max-body-bytes is answered 413, never sent on truncated and
    /// routed on what was read (which is what bbr did).
    #[tokio::test]
    async fn a_body_over_the_limit_is_a_413_in_both_modes() {
        let map = BaseModelMap::new(
            &parse_mapping("baseModels:\n- baseModel: b\n  adapters: [a]\n").unwrap(),
        )
        .unwrap();
        let svc = ExternalProcessorServer::new(Bbr {
            map: Arc::new(ArcSwap::from_pointee(map)),
            max_body: 1000,
            metrics: BbrMetrics::new(),
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpListenerStream::new(l)),
        );
        let mut client = ExternalProcessorClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        for full_duplex in [true, false] {
            let chunk = |end| {
                msg(
                    processing_request::Request::RequestBody(HttpBody {
                        body: vec![b' '; 600],
                        end_of_stream: end,
                        ..Default::default()
                    }),
                    full_duplex,
                )
            };
            let msgs = vec![
                msg(
                    processing_request::Request::RequestHeaders(HttpHeaders {
                        headers: Some(HeaderMap::default()),
                        ..Default::default()
                    }),
                    full_duplex,
                ),
                chunk(false),
                chunk(true),
            ];
            let mut out = client
                .process(tokio_stream::iter(msgs))
                .await
                .unwrap()
                .into_inner();
            let mut got = None;
            while let Ok(Some(m)) = out.message().await {
                if let Some(processing_response::Response::ImmediateResponse(i)) = m.response {
                    got = Some(i);
                    break;
                }
            }
            let i =
                got.unwrap_or_else(|| panic!("no immediate answer (full duplex {full_duplex})"));
            assert_eq!(i.status.unwrap().code, 413);
            assert!(String::from_utf8_lossy(&i.body).contains("--max-body-bytes"));
        }
    }
}
