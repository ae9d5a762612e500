//! The answer to Envoy for a routed request: the destination header and metadata, the request's header changes, and its body when it changed or streams.

use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, body_mutation,
    processing_response,
};
use tonic::Status;

use super::ExtProc;
use super::pick::Decision;
use super::proto::{
    DESTINATION_HEADER, Tx, lb_metadata, reply, send, send_streamed_body, set_header, with_metadata,
};
use super::state::RequestState;
use crate::flow_control::FAIRNESS_HEADER;

impl ExtProc {
    /// Sends the decision: on the headers message for a full-duplex request (then its body
    /// streamed back) or one without a body, else on the body message.
    pub(super) async fn answer_routed(
        &self,
        st: &mut RequestState,
        d: Decision,
        tx: &Tx,
    ) -> Result<(), Status> {
        let common = self.routed_headers(st, &d);
        let metadata = Some(lb_metadata(&d.destination));
        if st.full_duplex || st.body.is_empty() {
            let answer = reply(processing_response::Response::RequestHeaders(
                HeadersResponse {
                    response: Some(common),
                },
            ));
            send(tx, with_metadata(answer, metadata)).await?;
            // A request without a body has no body phase to answer: an answer there is a
            // protocol error to Envoy ("spurious response message").
            if st.full_duplex && st.body_seen {
                let body = std::mem::take(&mut st.body);
                send_streamed_body(tx, &body).await?;
            }
            return Ok(());
        }
        let mut common = common;
        if d.body_changed {
            common.body_mutation = Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::Body(std::mem::take(&mut st.body))),
            });
        }
        let answer = reply(processing_response::Response::RequestBody(BodyResponse {
            response: Some(common),
        }));
        send(tx, with_metadata(answer, metadata)).await
    }

    /// The header changes of a routed request: the destination, the decision's extra
    /// headers, the fairness id removed (the gateway's, not the model server's), and no
    /// content-length when the body goes upstream chunked.
    fn routed_headers(&self, st: &RequestState, d: &Decision) -> CommonResponse {
        let mut set_headers = vec![set_header(DESTINATION_HEADER, &d.destination)];
        set_headers.extend(d.extra_headers.iter().cloned());
        let mut remove_headers = Vec::new();
        if self.flow.is_some() && st.headers.fairness_id.is_some() {
            remove_headers.push(FAIRNESS_HEADER.to_string());
            remove_headers.push(super::state::LLMD_FAIRNESS_HEADER.to_string());
        }
        if st.full_duplex {
            remove_headers.push("content-length".to_string());
        }
        CommonResponse {
            header_mutation: Some(HeaderMutation {
                set_headers,
                remove_headers,
            }),
            clear_route_cache: true,
            ..Default::default()
        }
    }
}
