//! The request phases: headers, then the body in either mode (BUFFERED: one message; FULL_DUPLEX_STREAMED: chunks, ended by the last or by trailers).

use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders, processing_request};
use tonic::Status;

use super::proto::{Tx, continue_headers, pass_through, send};
use super::state::{REWRITE_SLACK, Reject, RequestState};
use super::{ExtProc, Next, models};

impl ExtProc {
    /// Request headers: read what routing needs. A request without a body is routed now; a
    /// buffered one is told to continue (its body comes next); a full-duplex one gets its
    /// headers answer with the decision.
    pub(super) async fn on_request_headers(
        &self,
        st: &mut RequestState,
        h: &HttpHeaders,
        tx: &Tx,
    ) -> Result<Next, Status> {
        st.started = Some(std::time::Instant::now());
        st.headers.read(h);
        // A streamed body arrives in chunks: room for all of it at once (no doubling
        // copies), within the limit, plus slack for a rewrite to patch it in place. A
        // buffered body arrives whole and is moved, not copied.
        if st.full_duplex
            && let Some(n) = st.headers.content_length
            && n <= self.opts.max_body_bytes
        {
            st.body.reserve_exact(n + REWRITE_SLACK);
            if let Err(r) = st.charge_body() {
                return self.refuse(st, r, tx).await;
            }
        }
        if h.end_of_stream {
            // The pool's model list is the EPP's to give: any one server lists only its own.
            if models::is_models_path(st.headers.path()) {
                send(tx, models::models_answer(&self.shared)).await?;
                return Ok(Next::Done);
            }
            return self.route(st, tx).await;
        }
        if !st.full_duplex {
            send(tx, continue_headers()).await?;
        }
        Ok(Next::Continue)
    }

    /// A request body message: the whole body (buffered) or one chunk (streamed), bounded by
    /// `--max-body-bytes`; the request is routed once the body is complete.
    pub(super) async fn on_request_body(
        &self,
        st: &mut RequestState,
        b: HttpBody,
        tx: &Tx,
    ) -> Result<Next, Status> {
        if st.body.len() + b.body.len() > self.opts.max_body_bytes {
            let r = Reject::new(
                413,
                "PayloadTooLarge",
                format!(
                    "request body larger than {} bytes (--max-body-bytes)",
                    self.opts.max_body_bytes
                ),
            );
            return self.refuse(st, r, tx).await;
        }
        st.body_seen = true;
        st.largest_message = st.largest_message.max(b.body.len());
        if st.body.is_empty() && st.body.capacity() < b.body.len() {
            // Moved, not copied; a rewrite that needs more room grows it then.
            st.body = b.body;
        } else {
            st.body.extend_from_slice(&b.body);
        }
        if let Err(r) = st.charge_body() {
            return self.refuse(st, r, tx).await;
        }
        if b.end_of_stream {
            return self.route(st, tx).await;
        }
        Ok(Next::Continue)
    }

    /// Answers the request in the EPP's name (counted as an error under its labels).
    async fn refuse(&self, st: &RequestState, r: Reject, tx: &Tx) -> Result<Next, Status> {
        self.record_error(st, r.status);
        send(tx, r.answer()).await?;
        Ok(Next::Done)
    }

    /// Request trailers end a streamed body that had no last-chunk flag.
    pub(super) async fn on_request_trailers(
        &self,
        st: &mut RequestState,
        req: &processing_request::Request,
        tx: &Tx,
    ) -> Result<Next, Status> {
        if st.in_flight.is_none() && self.route(st, tx).await? == Next::Done {
            return Ok(Next::Done);
        }
        send(tx, pass_through(req)).await?;
        Ok(Next::Continue)
    }
}
