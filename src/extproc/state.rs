//! One ext_proc stream's state: the request headers routing reads, the body, what was decided, and what ends with the stream.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use envoy_types::pb::envoy::service::ext_proc::v3::{HttpHeaders, ProcessingResponse};

use super::proto::{header_value, immediate_error};
use super::usage::{ModelRestorer, UsageParser};
use crate::flow_control::{FAIRNESS_HEADER, FlowControl, Pass};
use crate::memory::{Charge, OverBudget, body_stream_cost};
use crate::pool::state::EndpointHandle;

/// Room kept after an announced body for in-place rewrites (target names are at most 256
/// bytes by the CRDs; a priority is a few).
pub(super) const REWRITE_SLACK: usize = 1024;

/// Decrements the endpoint's in-flight counter when the request's stream ends, and tells
/// flow control's dispatcher (if any, and if anything is held) that a server has room.
pub(super) struct InFlight(
    pub(super) Arc<EndpointHandle>,
    pub(super) Option<Arc<FlowControl>>,
);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(fc) = &self.1 {
            fc.room_freed();
        }
    }
}

/// An answer sent instead of forwarding the request.
#[derive(Debug)]
pub(super) struct Reject {
    pub(super) status: u16,
    pub(super) message: String,
    pub(super) code: &'static str,
}

impl Reject {
    pub(super) fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// The answer Envoy sends the client instead of forwarding.
    pub(super) fn answer(&self) -> ProcessingResponse {
        immediate_error(self.status, self.code, &self.message)
    }
}

#[derive(Default)]
pub(super) struct RequestState {
    /// What the stream has charged to the memory budget (its own cost, its body, holding).
    pub(super) charge: Charge,
    /// The largest body message seen: the gRPC decoder keeps a buffer that large.
    pub(super) largest_message: usize,
    pub(super) headers: RequestHeaders,
    pub(super) full_duplex: bool,
    pub(super) body: Vec<u8>,
    pub(super) subset: Option<Vec<String>>,
    pub(super) requested_model: String,
    pub(super) target_model: String,
    /// Metric label values of the two: the name itself when a rule or a server knows it,
    /// otherwise [`crate::pool::labels::OTHER_MODEL`], so clients cannot mint series.
    pub(super) model_label: String,
    pub(super) target_label: String,
    pub(super) in_flight: Option<InFlight>,
    /// Counts the request against its catalogue adapter on its server (drains wait for it).
    pub(super) adapter_flight: Option<crate::lora_fleet::Flight>,
    /// Its server reads the adapter from disk for it: held until its first answer.
    pub(super) read: Option<crate::pool::state::Read>,
    pub(super) usage: Option<UsageParser>,
    /// Set for rewritten requests when --restore-model-name is on.
    pub(super) restorer: Option<ModelRestorer>,
    pub(super) response_status: u16,
    /// A request body phase was opened (a body message arrived): only then does a
    /// full-duplex request get its body streamed back.
    pub(super) body_seen: bool,
    /// Flow control let it through (its flow is charged its usage at the end).
    pub(super) flow_pass: Option<Pass>,
    /// When its request headers arrived (for the end-to-end duration).
    pub(super) started: Option<Instant>,
}

impl RequestState {
    /// Charges the body as it stands (its buffer and the decoder's), a 429 when the memory
    /// budget has no room for it.
    pub(super) fn charge_body(&mut self) -> Result<(), Reject> {
        let want = body_stream_cost(self.body.capacity(), self.largest_message);
        self.charge.grow_to(want).map_err(over_budget)
    }
}

/// The client's answer when the memory budget is full.
pub(super) fn over_budget(e: OverBudget) -> Reject {
    Reject::new(429, "TooManyRequests", e.to_string())
}

/// The request headers routing reads; the others are left unread (no copies, no map).
#[derive(Default)]
pub(super) struct RequestHeaders {
    pub(super) path: Option<String>,
    /// The gateway's `x-request-id`, or the one the EPP generated; carried into the logs.
    pub(super) request_id: Option<String>,
    pub(super) objective: Option<String>,
    pub(super) model_rewrite: Option<String>,
    /// `x-gateway-inference-fairness-id`: the request's flow for flow control.
    pub(super) fairness_id: Option<String>,
    /// The body's announced size, to allocate for it once.
    pub(super) content_length: Option<usize>,
}

impl RequestHeaders {
    /// Reads `h` into the wanted fields (names compared without case; a repeated header's
    /// last copy wins, as a map would have kept it).
    pub(super) fn read(&mut self, h: &HttpHeaders) {
        let Some(map) = &h.headers else { return };
        for hv in &map.headers {
            let slot = if hv.key.eq_ignore_ascii_case(":path") {
                &mut self.path
            } else if hv.key.eq_ignore_ascii_case(REQUEST_ID_HEADER) {
                &mut self.request_id
            } else if hv.key.eq_ignore_ascii_case(OBJECTIVE_HEADER)
                || hv.key.eq_ignore_ascii_case(LLMD_OBJECTIVE_HEADER)
            {
                &mut self.objective
            } else if hv.key.eq_ignore_ascii_case(MODEL_REWRITE_HEADER) {
                &mut self.model_rewrite
            } else if hv.key.eq_ignore_ascii_case(FAIRNESS_HEADER)
                || hv.key.eq_ignore_ascii_case(LLMD_FAIRNESS_HEADER)
            {
                &mut self.fairness_id
            } else if hv.key.eq_ignore_ascii_case("content-length") {
                self.content_length = header_value(hv).trim().parse().ok();
                continue;
            } else {
                continue;
            };
            *slot = Some(header_value(hv));
        }
    }

    pub(super) fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("")
    }

    pub(super) fn request_id(&self) -> &str {
        self.request_id.as_deref().unwrap_or("")
    }
}

pub(super) const REQUEST_ID_HEADER: &str = "x-request-id";
pub(super) const OBJECTIVE_HEADER: &str = "x-gateway-inference-objective";
pub(super) const MODEL_REWRITE_HEADER: &str = "x-gateway-model-name-rewrite";
/// llm-d's router's names for the objective and the tenant, accepted beside upstream's (when
/// a request carries both, the one later in the header list wins). Both come from the
/// gateway: the shipped Envoy configs strip every one of them from clients.
pub(super) const LLMD_OBJECTIVE_HEADER: &str = "x-llm-d-inference-objective";
pub(super) const LLMD_FAIRNESS_HEADER: &str = "x-llm-d-inference-fairness-id";

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};

    fn headers(pairs: &[(&str, &str)]) -> HttpHeaders {
        HttpHeaders {
            headers: Some(HeaderMap {
                headers: pairs
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: (*k).into(),
                        raw_value: v.as_bytes().to_vec(),
                        ..Default::default()
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn request_headers_keep_only_what_routing_reads() {
        let mut h = RequestHeaders::default();
        h.read(&headers(&[
            (":path", "/v1/chat/completions"),
            ("X-Request-Id", "abc"),
            ("x-gateway-inference-objective", "first"),
            ("X-Gateway-Inference-Objective", "critical"),
            ("user-agent", "curl"),
        ]));
        assert_eq!(h.path(), "/v1/chat/completions");
        assert_eq!(h.request_id(), "abc");
        assert_eq!(h.objective.as_deref(), Some("critical"));
        assert_eq!(h.model_rewrite, None);

        // llm-d's names are read too.
        let mut h = RequestHeaders::default();
        h.read(&headers(&[
            ("x-llm-d-inference-objective", "premium"),
            ("X-LLM-D-Inference-Fairness-Id", "tenant-a"),
        ]));
        assert_eq!(h.objective.as_deref(), Some("premium"));
        assert_eq!(h.fairness_id.as_deref(), Some("tenant-a"));

        let mut h = RequestHeaders::default();
        h.read(&headers(&[("x-gateway-model-name-rewrite", "fast")]));
        assert_eq!(h.path(), "");
        assert_eq!(h.request_id, None);
        assert_eq!(h.model_rewrite.as_deref(), Some("fast"));
    }
}
