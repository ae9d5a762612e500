//! The first step of a decision: the request id, the body parsed (only what routing reads), the model resolved through the rules.

use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use inferlane_epp::RuleError;
use inferlane_epp::request::{self, ApiKind, ParsedRequest};
use inferlane_epp::rules::Resolved;

use super::ExtProc;
use super::proto::set_header;
use super::state::{REQUEST_ID_HEADER, Reject, RequestState};
use crate::pool::labels::model_label;

/// A request read and resolved through the model rules, before it is admitted and picked.
pub(super) struct Prepared {
    pub(super) started: Instant,
    pub(super) parsed: Option<ParsedRequest>,
    pub(super) resolved: Option<Resolved>,
    pub(super) extra_headers: Vec<HeaderValueOption>,
}

impl ExtProc {
    /// Reads the body and resolves the model through the rules (what flow control needs to
    /// queue it: its priority and size).
    pub(super) fn prepare(&self, st: &mut RequestState) -> Result<Prepared, Reject> {
        let started = Instant::now();
        let mut extra_headers = Vec::new();
        if st.headers.request_id.is_none() {
            let id = format!("{:032x}", rand::random::<u128>());
            extra_headers.push(set_header(REQUEST_ID_HEADER, &id));
            st.headers.request_id = Some(id);
        }
        let parsed = self.parse_body(st)?;
        let resolved = match &parsed {
            Some(p) => Some(self.resolve_model(st, p)?),
            None => None,
        };
        Ok(Prepared {
            started,
            parsed,
            resolved,
            extra_headers,
        })
    }

    /// The body's model and the prompt prefix that prefix routing hashes (no more of it).
    fn parse_body(&self, st: &RequestState) -> Result<Option<ParsedRequest>, Reject> {
        if st.body.is_empty() {
            return Ok(None);
        }
        let cfg = self.shared.scheduler.load();
        let prompt_cap = if cfg.prefix_cache_weight > 0.0 {
            cfg.prefix_block_chars.saturating_mul(cfg.prefix_max_blocks)
        } else {
            0
        };
        let api = ApiKind::from_path(st.headers.path());
        request::parse_body_capped(api, &st.body, prompt_cap)
            .map(Some)
            .map_err(|e| Reject::new(400, "BadRequest", e.to_string()))
    }

    /// The requested model through the rules (canary split, objective, rewrite), its names
    /// and metric labels set on the stream.
    fn resolve_model(&self, st: &mut RequestState, p: &ParsedRequest) -> Result<Resolved, Reject> {
        let snap = self.shared.snapshot.load();
        // Named before anything can reject the request, so its errors (404, 429, 503) are
        // counted under the model, as upstream does.
        st.requested_model.clone_from(&p.model);
        st.model_label = model_label(&snap, &p.model);
        let objective = st.headers.objective.as_deref();
        let rewrite = st
            .headers
            .model_rewrite
            .as_deref()
            .filter(|_| self.opts.trust_model_rewrite_header);
        let r = snap
            .rules
            .resolve(&p.model, objective, rewrite, rand::random::<f64>())
            .map_err(|e| match e {
                RuleError::UnknownModel(_) => Reject::new(404, "ModelNotFound", e.to_string()),
                _ => Reject::new(400, "BadRequest", e.to_string()),
            })?;
        st.requested_model.clone_from(&r.requested);
        st.target_model.clone_from(&r.target);
        st.target_label = if r.target == r.requested {
            st.model_label.clone()
        } else {
            model_label(&snap, &r.target)
        };
        Ok(r)
    }
}
