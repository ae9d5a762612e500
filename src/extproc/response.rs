//! The response phases: its status (passive health, errors), its headers (upstream's marker), its body (usage, the client's model name put back).

use std::sync::atomic::Ordering;

use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpBody,
    HttpHeaders, body_mutation, processing_response,
};
use tonic::Status;

use super::proto::{Tx, find_header, reply, send, set_header};
use super::state::RequestState;
use super::{ExtProc, Next};
use crate::pool::metrics::ModelLabels;

impl ExtProc {
    /// Response headers: the server's status feeds passive health and the error counts; a
    /// 404 re-reads the server's model list; the response is marked as upstream's EPP marks it.
    pub(super) async fn on_response_headers(
        &self,
        st: &mut RequestState,
        h: &HttpHeaders,
        tx: &Tx,
    ) -> Result<Next, Status> {
        st.response_status = find_header(h, ":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if st.response_status >= 400 {
            self.record_error(st, st.response_status);
        }
        if let Some(f) = &st.in_flight {
            if st.response_status == 404 {
                // The server no longer has the model: re-read its list now.
                f.0.models_stale.store(true, Ordering::Relaxed);
            }
            self.shared.observe_answer(&f.0, st.response_status);
        }
        // Upstream's EPP marks every response it saw; some tooling checks for it.
        let mut mutation = HeaderMutation {
            set_headers: vec![set_header("x-went-into-resp-headers", "true")],
            ..Default::default()
        };
        if st.restorer.is_some() {
            // The body changes size when the model name is put back.
            mutation.remove_headers.push("content-length".into());
        }
        let common = CommonResponse {
            header_mutation: Some(mutation),
            ..Default::default()
        };
        let answer = reply(processing_response::Response::ResponseHeaders(
            HeadersResponse {
                response: Some(common),
            },
        ));
        send(tx, answer).await?;
        Ok(Next::Continue)
    }

    /// A response body chunk: read for usage, the client's model name put back; at its end
    /// the request's duration and token counts.
    pub(super) async fn on_response_body(
        &self,
        st: &mut RequestState,
        b: &HttpBody,
        tx: &Tx,
    ) -> Result<Next, Status> {
        // Its first answer: the read it needed is done.
        st.read = None;
        if let Some(u) = st.usage.as_mut() {
            u.feed(&b.body);
        }
        let out = st
            .restorer
            .as_mut()
            .map(|r| r.feed(&b.body, b.end_of_stream));
        if b.end_of_stream {
            self.finish_usage(st);
        }
        let common = CommonResponse {
            body_mutation: out.map(|b| BodyMutation {
                mutation: Some(body_mutation::Mutation::Body(b)),
            }),
            ..Default::default()
        };
        let answer = reply(processing_response::Response::ResponseBody(BodyResponse {
            response: Some(common),
        }));
        send(tx, answer).await?;
        Ok(Next::Continue)
    }

    /// A routed request (its usage parser is set when it was counted): its duration, and its
    /// token counts when the response carried usage (charged to its flow too).
    fn finish_usage(&self, st: &mut RequestState) {
        let Some(u) = st.usage.take() else { return };
        let l = ModelLabels {
            model_name: st.model_label.clone(),
            target_model_name: st.target_label.clone(),
        };
        if let Some(t) = st.started {
            self.metrics
                .request_duration
                .get_or_create(&l)
                .observe(t.elapsed().as_secs_f64());
        }
        if let Some((prompt, completion)) = u.finish() {
            self.metrics
                .input_tokens
                .get_or_create(&l)
                .observe(prompt as f64);
            self.metrics
                .output_tokens
                .get_or_create(&l)
                .observe(completion as f64);
            if let Some(pass) = &st.flow_pass {
                pass.charge_usage(prompt, completion);
            }
        }
    }
}
