//! ext_proc message plumbing: building Envoy's answers, reading its messages, and the response stream that drives a handler (shared with bbr and the benchmark floor).

use std::pin::Pin;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpHeaders,
    ImmediateResponse, ProcessingRequest, ProcessingResponse, StreamedBodyResponse,
    TrailersResponse, body_mutation, processing_request, processing_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value::Kind};
use futures::Stream;
use serde_json::json;
use tokio::sync::mpsc;
use tonic::{Response, Status};
use tracing::Instrument;

/// Header carrying the decision to the gateway (and Envoy's ORIGINAL_DST cluster).
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
const LB_NAMESPACE: &str = "envoy.lb";
pub(crate) const STREAM_CHUNK: usize = 64 * 1024;
/// Whether Envoy streams this request's body in FULL_DUPLEX_STREAMED mode (read from the
/// request headers message's protocol config; every later message follows that mode).
pub(crate) fn is_full_duplex(msg: &ProcessingRequest) -> bool {
    msg.protocol_config
        .as_ref()
        .is_some_and(|p| p.request_body_mode == BodySendMode::FullDuplexStreamed as i32)
}

pub(crate) type Tx = mpsc::Sender<Result<ProcessingResponse, Status>>;

pub(crate) fn header_value(h: &HeaderValue) -> String {
    if h.raw_value.is_empty() {
        h.value.clone()
    } else {
        String::from_utf8_lossy(&h.raw_value).into_owned()
    }
}

pub(crate) fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            // Envoy 1.40 reads raw_value; `value` would arrive empty.
            raw_value: value.as_bytes().to_vec(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn string_value(s: &str) -> PbValue {
    PbValue {
        kind: Some(Kind::StringValue(s.into())),
    }
}

pub(crate) fn lb_metadata(destination: &str) -> Struct {
    let inner = Struct {
        fields: [(DESTINATION_HEADER.to_string(), string_value(destination))]
            .into_iter()
            .collect(),
    };
    Struct {
        fields: [(
            LB_NAMESPACE.to_string(),
            PbValue {
                kind: Some(Kind::StructValue(inner)),
            },
        )]
        .into_iter()
        .collect(),
    }
}

pub(crate) fn subset_hint(req: &ProcessingRequest) -> Option<Vec<String>> {
    let md = req.metadata_context.as_ref()?;
    let ns = md.filter_metadata.get(SUBSET_NAMESPACE)?;
    let v = ns.fields.get(SUBSET_KEY)?;
    match v.kind.as_ref()? {
        Kind::ListValue(l) => Some(
            l.values
                .iter()
                .filter_map(|v| match v.kind.as_ref()? {
                    Kind::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
        ),
        Kind::StringValue(s) => Some(
            s.split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect(),
        ),
        _ => None,
    }
}

/// An immediate answer to the client with a JSON error body (`{"error": {...}}`, as vLLM's).
pub(crate) fn immediate_error(status: u16, code: &str, message: &str) -> ProcessingResponse {
    let body = json!({"error": {"message": message, "type": code, "code": status}}).to_string();
    ProcessingResponse {
        response: Some(processing_response::Response::ImmediateResponse(
            ImmediateResponse {
                status: Some(HttpStatus {
                    code: i32::from(status),
                }),
                headers: Some(HeaderMutation {
                    set_headers: vec![set_header("content-type", "application/json")],
                    ..Default::default()
                }),
                body: body.into_bytes(),
                details: format!("epp_{code}"),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

pub(crate) fn reply(r: processing_response::Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(r),
        ..Default::default()
    }
}

pub(crate) fn with_metadata(mut r: ProcessingResponse, md: Option<Struct>) -> ProcessingResponse {
    r.dynamic_metadata = md;
    r
}

/// The empty answer for a phase: continue unchanged.
pub(crate) fn pass_through(req: &processing_request::Request) -> ProcessingResponse {
    use processing_request::Request as Rq;
    use processing_response::Response as Rs;
    reply(match req {
        Rq::RequestHeaders(_) => Rs::RequestHeaders(HeadersResponse::default()),
        Rq::ResponseHeaders(_) => Rs::ResponseHeaders(HeadersResponse::default()),
        Rq::RequestBody(_) => Rs::RequestBody(BodyResponse::default()),
        Rq::ResponseBody(_) => Rs::ResponseBody(BodyResponse::default()),
        Rq::RequestTrailers(_) => Rs::RequestTrailers(TrailersResponse::default()),
        Rq::ResponseTrailers(_) => Rs::ResponseTrailers(TrailersResponse::default()),
    })
}

pub(crate) fn continue_headers() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(processing_response::Response::RequestHeaders(
            HeadersResponse::default(),
        )),
        ..Default::default()
    }
}

/// One header's value (names compared without case), without building a map of them all.
pub(crate) fn find_header(h: &HttpHeaders, name: &str) -> Option<String> {
    h.headers
        .as_ref()?
        .headers
        .iter()
        .find(|hv| hv.key.eq_ignore_ascii_case(name))
        .map(header_value)
}

/// The answers to a FULL_DUPLEX_STREAMED request body: the (possibly rewritten) body echoed
/// back in <= 64 KiB `streamed_response` chunks, the last one marked end of stream.
pub(crate) fn streamed_body(body: &[u8]) -> impl Iterator<Item = ProcessingResponse> + '_ {
    let n = body.len().div_ceil(STREAM_CHUNK).max(1);
    // An empty body still gets its one end-of-stream answer.
    let empty = body.is_empty().then_some(&[][..]);
    body.chunks(STREAM_CHUNK)
        .chain(empty)
        .enumerate()
        .map(move |(i, chunk)| {
            let r = CommonResponse {
                body_mutation: Some(BodyMutation {
                    mutation: Some(body_mutation::Mutation::StreamedResponse(
                        StreamedBodyResponse {
                            body: chunk.to_vec(),
                            end_of_stream: i + 1 == n,
                            ..Default::default()
                        },
                    )),
                }),
                ..Default::default()
            };
            reply(processing_response::Response::RequestBody(BodyResponse {
                response: Some(r),
            }))
        })
}

/// Sends [`streamed_body`]'s answers.
pub(crate) async fn send_streamed_body(tx: &Tx, body: &[u8]) -> Result<(), Status> {
    for r in streamed_body(body) {
        send(tx, r).await?;
    }
    Ok(())
}

pub(crate) async fn send(tx: &Tx, resp: ProcessingResponse) -> Result<(), Status> {
    tx.send(Ok(resp))
        .await
        .map_err(|_| Status::cancelled("gateway closed the stream"))
}

/// The stream type both ext_proc services answer with.
pub(crate) type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

/// Runs one ext_proc stream's handler inside its response stream and returns its answers as
/// that stream. A handler error ends the stream with that gRPC status: never silently, or
/// Envoy would forward the request without a decision.
///
/// The handler is polled by the task that writes the answers (hyper's per-stream task), not
/// spawned as a task of its own: no second task per request and no cross-task wake-up per
/// answer (measured: docs/benchmarks.md). It makes progress whenever hyper polls for the next
/// answer, which it does until the stream ends; when the gateway resets the stream, hyper
/// drops the response stream and with it the handler and its request state.
pub(crate) fn driven_processor<F, Fut>(span: tracing::Span, run: F) -> Response<ResponseStream>
where
    F: FnOnce(Tx) -> Fut,
    Fut: std::future::Future<Output = Result<(), Status>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    Response::new(Box::pin(Driven {
        handler: Some(Box::pin(run(tx).instrument(span))),
        answers: rx,
        failed: None,
    }))
}

/// A response stream that drives its own handler: see [`driven_processor`].
struct Driven<Fut> {
    handler: Option<Pin<Box<tracing::instrument::Instrumented<Fut>>>>,
    answers: mpsc::Receiver<Result<ProcessingResponse, Status>>,
    /// The handler's error, sent after the answers it queued before failing.
    failed: Option<Status>,
}

impl<Fut> Stream for Driven<Fut>
where
    Fut: std::future::Future<Output = Result<(), Status>>,
{
    type Item = Result<ProcessingResponse, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = &mut *self;
        if let Some(h) = this.handler.as_mut()
            && let Poll::Ready(done) = h.as_mut().poll(cx)
        {
            // Dropping the handler drops its sender: the channel ends once drained.
            this.handler = None;
            if let Err(status) = done {
                if status.code() != tonic::Code::Cancelled {
                    tracing::warn!(error = %status, "ext_proc stream failed");
                }
                this.failed = Some(status);
            }
        }
        match this.answers.poll_recv(cx) {
            Poll::Ready(Some(answer)) => Poll::Ready(Some(answer)),
            Poll::Ready(None) => Poll::Ready(this.failed.take().map(Err)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(body: &[u8]) -> Vec<(usize, bool)> {
        streamed_body(body)
            .map(|r| match r.response {
                Some(processing_response::Response::RequestBody(BodyResponse {
                    response: Some(c),
                })) => match c.body_mutation.and_then(|m| m.mutation) {
                    Some(body_mutation::Mutation::StreamedResponse(s)) => {
                        (s.body.len(), s.end_of_stream)
                    }
                    other => panic!("not a streamed body: {other:?}"),
                },
                other => panic!("not a body answer: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn streamed_bodies_go_back_in_64_kib_chunks_the_last_marked() {
        assert_eq!(chunks(b""), [(0, true)]);
        assert_eq!(chunks(&[b'x'; 10]), [(10, true)]);
        assert_eq!(chunks(&[b'x'; STREAM_CHUNK]), [(STREAM_CHUNK, true)]);
        assert_eq!(
            chunks(&vec![b'x'; 2 * STREAM_CHUNK + 1]),
            [(STREAM_CHUNK, false), (STREAM_CHUNK, false), (1, true)]
        );
    }
}
