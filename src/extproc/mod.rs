//! Envoy ext_proc server: one gRPC stream per HTTP request; picks from the snapshot, never a mailbox.
//!
//! A stream goes through its phases in order, one file each: the request headers and body
//! (`request.rs`, both body modes), then, once the body is complete, `route.rs` runs the
//! decision: the request is read and resolved through the model rules (`prepare.rs`),
//! admitted or held by flow control (`admit.rs`), an endpoint is picked (`pick.rs`), and the
//! answer goes back to Envoy (`answer.rs`); the response's headers and body follow
//! (`response.rs`). `state.rs` is what one stream carries between them, `proto.rs` the
//! ext_proc message plumbing.

mod admit;
mod answer;
mod models;
mod pick;
mod prepare;
pub mod proto;
mod request;
mod response;
mod route;
mod state;
pub mod usage;

use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, processing_request};
use tonic::{Request, Response, Status, Streaming};

use crate::flow_control::FlowControl;
use crate::memory::{MemoryBudget, STREAM_COST};
use crate::pool::metrics::{EppMetrics, ErrorLabels};
use crate::pool::state::Shared;
use proto::{ResponseStream, Tx, driven_processor, is_full_duplex, send, subset_hint};
use state::RequestState;

pub use proto::DESTINATION_HEADER;

/// How long a stream opened past the memory budget may stay silent.
const OVER_BUDGET_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
const OVER_BUDGET_IDLE: &str =
    "the memory budget is full (--memory-budget) and the stream sent no request";

/// Server settings.
#[derive(Debug, Clone)]
pub struct ExtProcOptions {
    /// Largest request body accepted; larger gets 413.
    pub max_body_bytes: usize,
    /// Put the client's model name back into responses of rewritten requests.
    pub restore_model_name: bool,
    /// Honour `x-gateway-model-name-rewrite` (only where the gateway owns that header).
    pub trust_model_rewrite_header: bool,
}

/// The ext_proc service.
#[derive(Clone)]
pub struct ExtProc {
    shared: Arc<Shared>,
    opts: ExtProcOptions,
    metrics: EppMetrics,
    flow: Option<Arc<FlowControl>>,
    budget: Arc<MemoryBudget>,
}

/// What a phase leaves the stream to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Read the next message.
    Continue,
    /// The request was answered in the EPP's name (rejected): nothing more to do.
    Done,
}

impl ExtProc {
    pub fn new(shared: Arc<Shared>, opts: ExtProcOptions, metrics: EppMetrics) -> Self {
        Self {
            shared,
            opts,
            metrics,
            flow: None,
            budget: MemoryBudget::unlimited(),
        }
    }

    /// Charges every stream, body and held request to `budget` (429 past it).
    pub fn with_memory_budget(mut self, budget: Arc<MemoryBudget>) -> Self {
        self.budget = budget;
        self
    }

    /// Admits requests through flow control (held while the pool is saturated).
    pub fn with_flow_control(mut self, flow: Arc<FlowControl>) -> Self {
        self.flow = Some(flow);
        self
    }

    /// One stream, message by message, each handed to its phase.
    async fn handle_stream(
        &self,
        inbound: &mut Streaming<ProcessingRequest>,
        tx: &Tx,
    ) -> Result<(), Status> {
        use processing_request::Request as Rq;
        let charge = match self.budget.charge(STREAM_COST) {
            Ok(c) => c,
            Err(e) => return self.refuse_over_budget(inbound, e, tx).await,
        };
        let mut st = RequestState {
            charge,
            ..RequestState::default()
        };
        loop {
            let msg = match inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                // Envoy resets the stream once the HTTP exchange is over; that is the normal
                // end of a request we already routed.
                Err(e) if st.in_flight.is_some() => {
                    tracing::trace!(error = %e, "gateway ended the stream");
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            if matches!(msg.request, Some(Rq::RequestHeaders(_))) {
                st.full_duplex = is_full_duplex(&msg);
                st.subset = subset_hint(&msg);
            }
            // Owned, so a body chunk is moved into the request state, not copied.
            let Some(req) = msg.request else { continue };
            let next = match req {
                Rq::RequestHeaders(h) => self.on_request_headers(&mut st, &h, tx).await?,
                Rq::RequestBody(b) => self.on_request_body(&mut st, b, tx).await?,
                Rq::RequestTrailers(_) => self.on_request_trailers(&mut st, &req, tx).await?,
                Rq::ResponseHeaders(h) => self.on_response_headers(&mut st, &h, tx).await?,
                Rq::ResponseBody(b) => self.on_response_body(&mut st, &b, tx).await?,
                Rq::ResponseTrailers(_) => {
                    send(tx, proto::pass_through(&req)).await?;
                    Next::Continue
                }
            };
            if next == Next::Done {
                return Ok(());
            }
        }
    }

    /// A stream opened past the memory budget: its first message gets the 429; one that
    /// says nothing within [`OVER_BUDGET_GRACE`] is ended (idle streams would otherwise hold
    /// memory uncharged).
    async fn refuse_over_budget(
        &self,
        inbound: &mut Streaming<ProcessingRequest>,
        e: crate::memory::OverBudget,
        tx: &Tx,
    ) -> Result<(), Status> {
        match tokio::time::timeout(OVER_BUDGET_GRACE, inbound.message()).await {
            Err(_) => Err(Status::resource_exhausted(OVER_BUDGET_IDLE)),
            Ok(Ok(Some(_))) => {
                self.record_error(&RequestState::default(), 429);
                send(tx, state::over_budget(e).answer()).await
            }
            Ok(Ok(None)) => Ok(()),
            Ok(Err(e)) => Err(e),
        }
    }

    /// Counts an error answer under the request's model labels.
    fn record_error(&self, st: &RequestState, status: u16) {
        self.metrics
            .errors
            .get_or_create(&ErrorLabels {
                model_name: st.model_label.clone(),
                target_model_name: st.target_label.clone(),
                error_code: status.to_string(),
            })
            .inc();
    }
}

#[tonic::async_trait]
impl ExternalProcessor for ExtProc {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let this = self.clone();
        Ok(driven_processor(
            tracing::debug_span!("ext_proc"),
            move |tx| async move { this.handle_stream(&mut inbound, &tx).await },
        ))
    }
}
