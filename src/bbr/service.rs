//! bbr's ext_proc service: reads the body's `model` (whole body, both body modes, within --max-body-bytes and the memory budget) and sets the model and base-model headers routing matches on.

use std::sync::Arc;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ProcessingRequest,
    processing_request, processing_response,
};
use inferlane_epp::bbr::BaseModelMap;
use prometheus_client::metrics::counter::Counter;
use tonic::{Request, Response, Status, Streaming};

use crate::extproc::proto::{
    ResponseStream, Tx, continue_headers, driven_processor, immediate_error, is_full_duplex,
    pass_through, reply, send, send_streamed_body, set_header,
};
use crate::memory::{MemoryBudget, STREAM_COST, body_stream_cost};

/// Header naming the model the client asked for.
pub const MODEL_HEADER: &str = "x-gateway-model-name";
/// Header naming its base model (empty when unknown); HTTPRoutes match on it.
pub const BASE_MODEL_HEADER: &str = "x-gateway-base-model-name";

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
pub(super) struct Bbr {
    pub(super) map: Arc<ArcSwap<BaseModelMap>>,
    pub(super) max_body: usize,
    pub(super) metrics: BbrMetrics,
    /// Streams and bodies being read are charged to it (429 past it).
    pub(super) budget: Arc<MemoryBudget>,
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
        let mut charge = self.budget.charge(STREAM_COST);
        let mut largest = 0;
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
                    largest = largest.max(b.body.len());
                    let want = body_stream_cost(body.capacity(), largest);
                    let charged = match &mut charge {
                        Ok(c) => c.grow_to(want),
                        Err(e) => Err(*e),
                    };
                    if let Err(e) = charged {
                        let r = immediate_error(429, "TooManyRequests", &format!("bbr: {e}"));
                        send(tx, r).await?;
                        return Ok(());
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::HeaderMap;
    use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
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
    /// routed on what was read (which is what bbr did); one past the memory budget, 429.
    #[tokio::test]
    async fn a_body_over_the_limit_or_the_budget_is_refused_in_both_modes() {
        let cases = [
            (1000, MemoryBudget::unlimited(), 413, "--max-body-bytes"),
            (
                10_000,
                MemoryBudget::new(STREAM_COST + 1000),
                429,
                "--memory-budget",
            ),
        ];
        for (max_body, budget, status, says) in cases {
            let map = BaseModelMap::new(
                &inferlane_epp::bbr::parse_mapping(
                    "baseModels:\n- baseModel: b\n  adapters: [a]\n",
                )
                .unwrap(),
            )
            .unwrap();
            let svc = ExternalProcessorServer::new(Bbr {
                map: Arc::new(ArcSwap::from_pointee(map)),
                max_body,
                metrics: BbrMetrics::new(),
                budget: budget.clone(),
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
                let i = first_answer(&mut client, full_duplex).await;
                assert_eq!(i.status.unwrap().code, status);
                assert!(String::from_utf8_lossy(&i.body).contains(says));
            }
            drop(client);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while budget.used() > 0 && std::time::Instant::now() < deadline {
                tokio::task::yield_now().await;
            }
            assert_eq!(budget.used(), 0, "every charge given back");
        }
    }

    /// Sends headers and two 600-byte chunks; the first immediate answer.
    async fn first_answer(
        client: &mut ExternalProcessorClient<tonic::transport::Channel>,
        full_duplex: bool,
    ) -> envoy_types::pb::envoy::service::ext_proc::v3::ImmediateResponse {
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
        while let Ok(Some(m)) = out.message().await {
            if let Some(processing_response::Response::ImmediateResponse(i)) = m.response {
                return i;
            }
        }
        panic!("no immediate answer (full duplex {full_duplex})")
    }
}
