//! The ext_proc floor: the EPP's message pattern with no routing work, the in-run baseline for EPP CPU per request.
//!
//! It answers every message the way the EPP does (headers CONTINUE, the decision on the last
//! body chunk, full-duplex bodies echoed back, response headers and body passed through) but
//! decides nothing: the destination is the next endpoint of a fixed list. Two stacks:
//! - `tonic` (default): the EPP's own serving stack (connection-pinned threads, TLS, tonic,
//!   the handler driven by its response stream), so the EPP's CPU per request minus the floor's, measured
//!   in the same run, is what routing itself costs;
//! - `h2`: the same answers straight on the `h2` crate (gRPC's 5-byte framing done here, no
//!   hyper, tower or tonic; one task per stream that answers in place, no channel to a second
//!   task), the least a Rust HTTP/2 server does for this
//!   exchange: how far below tonic the transport could go. Benchmark use only: it implements
//!   no gRPC deadlines, compression or error statuses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::{Args, ValueEnum};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ProcessingRequest,
    ProcessingResponse, processing_request, processing_response,
};
use prost::Message;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tonic::{Request, Response, Status, Streaming};

use crate::extproc::proto::{
    DESTINATION_HEADER, ResponseStream, continue_headers, driven_processor, is_full_duplex,
    pass_through, reply, send, set_header, streamed_body,
};
use crate::net::{serve, tls};
use crate::runtime::parse_bool;

/// Which server stack answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Stack {
    /// The EPP's: pinned threads, tonic, the same stream handler.
    Tonic,
    /// Straight on the h2 crate, on one thread.
    H2,
}

/// extproc-floor flags.
#[derive(Debug, Clone, Args)]
pub struct FloorArgs {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind_address: String,
    /// ext_proc gRPC port (0 picks a free one; the bound address is printed).
    #[arg(long, default_value_t = 0)]
    pub grpc_port: u16,
    /// Upstreams (`host:port`), used in turn.
    #[arg(long, value_delimiter = ',', required = true)]
    pub endpoints: Vec<String>,
    /// Serve over TLS with a self-signed certificate, as the EPP does by default.
    #[arg(long, default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub secure_serving: bool,
    /// Serving threads for the tonic stack (0 = one per core), as the EPP's --grpc-threads.
    #[arg(long, default_value_t = 0)]
    pub grpc_threads: u16,
    /// Server stack.
    #[arg(long, value_enum, default_value = "tonic")]
    pub stack: Stack,
}

/// Errors that stop the floor server from starting.
#[derive(Debug, Error)]
pub enum FloorError {
    #[error("cannot bind ext_proc gRPC on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot start the gRPC serving threads: {0}")]
    Threads(std::io::Error),
}

/// The do-nothing picker.
#[derive(Clone)]
struct Floor {
    endpoints: Arc<[String]>,
    next: Arc<AtomicUsize>,
}

/// One stream's state.
#[derive(Default)]
struct StreamState {
    full_duplex: bool,
    body: Vec<u8>,
}

impl Floor {
    fn decision(&self, full_duplex: bool) -> CommonResponse {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        CommonResponse {
            header_mutation: Some(HeaderMutation {
                set_headers: vec![set_header(DESTINATION_HEADER, &self.endpoints[i])],
                remove_headers: if full_duplex {
                    vec!["content-length".into()]
                } else {
                    Vec::new()
                },
            }),
            clear_route_cache: true,
            ..Default::default()
        }
    }

    /// The answers to one message, in order (none while a full-duplex body is collected).
    fn answer(
        &self,
        st: &mut StreamState,
        msg: &ProcessingRequest,
        out: &mut Vec<ProcessingResponse>,
    ) {
        use processing_request::Request as R;
        use processing_response::Response as A;
        let Some(req) = msg.request.as_ref() else {
            return;
        };
        match req {
            R::RequestHeaders(h) => {
                st.full_duplex = is_full_duplex(msg);
                if h.end_of_stream {
                    let response = Some(self.decision(false));
                    out.push(reply(A::RequestHeaders(HeadersResponse { response })));
                } else if !st.full_duplex {
                    out.push(continue_headers());
                }
            }
            R::RequestBody(b) if st.full_duplex => {
                st.body.extend_from_slice(&b.body);
                if b.end_of_stream {
                    let response = Some(self.decision(true));
                    out.push(reply(A::RequestHeaders(HeadersResponse { response })));
                    out.extend(streamed_body(&st.body));
                    st.body.clear();
                }
            }
            R::RequestBody(b) => {
                let response = b.end_of_stream.then(|| self.decision(false));
                out.push(reply(A::RequestBody(BodyResponse { response })));
            }
            R::ResponseHeaders(_) => {
                let response = Some(CommonResponse::default());
                out.push(reply(A::ResponseHeaders(HeadersResponse { response })));
            }
            R::ResponseBody(_) => {
                let response = Some(CommonResponse::default());
                out.push(reply(A::ResponseBody(BodyResponse { response })));
            }
            R::RequestTrailers(_) | R::ResponseTrailers(_) => out.push(pass_through(req)),
        }
    }
}

#[tonic::async_trait]
impl ExternalProcessor for Floor {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let this = self.clone();
        Ok(driven_processor(
            tracing::debug_span!("floor"),
            move |tx| async move {
                let (mut st, mut out) = (StreamState::default(), Vec::new());
                // Envoy resets the stream once the exchange is over: that ends it, as in the EPP.
                while let Ok(Some(msg)) = inbound.message().await {
                    this.answer(&mut st, &msg, &mut out);
                    for r in out.drain(..) {
                        send(&tx, r).await?;
                    }
                }
                Ok(())
            },
        ))
    }
}

/// Starts the floor server on the current runtime; returns the bound address.
pub async fn start(args: FloorArgs) -> Result<SocketAddr, FloorError> {
    let addr = format!("{}:{}", args.bind_address, args.grpc_port);
    let bind_err = |source| FloorError::Bind {
        addr: addr.clone(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    let floor = Floor {
        endpoints: args.endpoints.into(),
        next: Arc::new(AtomicUsize::new(0)),
    };
    let tls = tls::serving_acceptor(args.secure_serving, None)?;
    match args.stack {
        Stack::Tonic => serve::serve_pinned(
            listener,
            ExternalProcessorServer::new(floor).max_decoding_message_size(64 * 1024 * 1024),
            serve::ServeOptions {
                threads: serve::grpc_threads(args.grpc_threads),
                tls,
                name: "floor",
                max_concurrent_streams: serve::DEFAULT_MAX_CONCURRENT_STREAMS,
            },
        )
        .map_err(FloorError::Threads)?,
        Stack::H2 => {
            tokio::spawn(h2_accept(listener, floor, tls));
        }
    }
    Ok(local)
}

async fn h2_accept(listener: tokio::net::TcpListener, floor: Floor, tls: Option<TlsAcceptor>) {
    loop {
        let tcp = serve::accept_nodelay(&listener).await;
        let (floor, tls) = (floor.clone(), tls.clone());
        tokio::spawn(async move {
            let res = match tls {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(io) => h2_conn(floor, io).await,
                    Err(e) => return tracing::debug!(error = %e, "TLS handshake failed"),
                },
                None => h2_conn(floor, tcp).await,
            };
            if let Err(e) = res {
                tracing::debug!(error = %e, "h2 connection ended");
            }
        });
    }
}

async fn h2_conn<IO>(floor: Floor, io: IO) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = h2::server::handshake(io).await?;
    while let Some(r) = conn.accept().await {
        let (req, respond) = r?;
        let floor = floor.clone();
        tokio::spawn(async move {
            if let Err(e) = h2_stream(floor, req, respond).await {
                tracing::trace!(error = %e, "stream ended");
            }
        });
    }
    Ok(())
}

/// One ext_proc stream: length-prefixed messages in, each message's answers written as they
/// are made, `grpc-status: 0` trailers when the gateway ends its side.
async fn h2_stream(
    floor: Floor,
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) -> Result<(), h2::Error> {
    let mut body = req.into_body();
    let head = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .expect("static response head");
    let mut send = respond.send_response(head, false)?;
    let (mut buf, mut st, mut out) = (BytesMut::new(), StreamState::default(), Vec::new());
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 5 + len {
                break;
            }
            buf.advance(5);
            let Ok(msg) = ProcessingRequest::decode(buf.split_to(len)) else {
                return Ok(());
            };
            floor.answer(&mut st, &msg, &mut out);
            if out.is_empty() {
                continue;
            }
            let mut w = BytesMut::new();
            for r in out.drain(..) {
                let n = r.encoded_len();
                w.reserve(5 + n);
                w.put_u8(0);
                w.put_u32(u32::try_from(n).expect("answers are far below 4 GiB"));
                r.encode(&mut w).expect("capacity reserved");
            }
            send.send_data(w.freeze(), false)?;
        }
    }
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    send.send_trailers(trailers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders};

    fn message(r: processing_request::Request) -> ProcessingRequest {
        ProcessingRequest {
            request: Some(r),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn both_stacks_answer_each_message_and_take_endpoints_in_turn() {
        for stack in [Stack::Tonic, Stack::H2] {
            answers_in_turn(stack).await;
        }
    }

    async fn answers_in_turn(stack: Stack) {
        let addr = start(FloorArgs {
            bind_address: "127.0.0.1".into(),
            grpc_port: 0,
            endpoints: vec!["10.0.0.1:8000".into(), "10.0.0.2:8000".into()],
            secure_serving: false,
            grpc_threads: 1,
            stack,
        })
        .await
        .unwrap();
        let mut client = ExternalProcessorClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        for want in ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.1:8000"] {
            let msgs = vec![
                message(processing_request::Request::RequestHeaders(
                    HttpHeaders::default(),
                )),
                message(processing_request::Request::RequestBody(HttpBody {
                    body: b"{}".to_vec(),
                    end_of_stream: true,
                    ..Default::default()
                })),
                message(processing_request::Request::ResponseHeaders(
                    HttpHeaders::default(),
                )),
            ];
            let mut out = client
                .process(tokio_stream::iter(msgs))
                .await
                .unwrap()
                .into_inner();
            let first = out.message().await.unwrap().unwrap().response;
            assert!(
                matches!(&first, Some(processing_response::Response::RequestHeaders(h)) if h.response.is_none()),
                "{first:?}"
            );
            let second = out.message().await.unwrap().unwrap().response;
            let Some(processing_response::Response::RequestBody(b)) = second else {
                panic!("expected the body answer, got {second:?}");
            };
            let set = b.response.unwrap().header_mutation.unwrap().set_headers;
            let h = set[0].header.as_ref().unwrap();
            assert_eq!(h.key, DESTINATION_HEADER);
            assert_eq!(h.raw_value, want.as_bytes());
            let third = out.message().await.unwrap().unwrap().response;
            assert!(
                matches!(
                    third,
                    Some(processing_response::Response::ResponseHeaders(_))
                ),
                "{third:?}"
            );
            assert!(out.message().await.unwrap().is_none(), "{stack:?}");
        }
    }
}
