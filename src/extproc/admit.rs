//! Admission: without flow control every request goes on; with it, a request is held while the pool is saturated and dispatched by band and fairness.

use crate::flow_control::{DEFAULT_FLOW, FAIRNESS_HEADER, FlowRequest, MAX_FAIRNESS_ID_BYTES};

use super::ExtProc;
use super::prepare::Prepared;
use super::state::{Reject, RequestState};

impl ExtProc {
    /// `Ok(false)` without flow control, `Ok(true)` once admitted (possibly after being
    /// held), or the answer the client gets.
    pub(super) async fn admit(&self, st: &mut RequestState, p: &Prepared) -> Result<bool, Reject> {
        let Some(fc) = &self.flow else {
            return Ok(false);
        };
        let req = FlowRequest {
            fairness_id: fairness_id(st)?,
            priority: p.resolved.as_ref().map_or(0, |r| r.priority),
            bytes: st.body.len() as u64,
            // ~4 bytes per token: the charge at dispatch, corrected by the reported usage.
            prompt_tokens: st.body.len() as f64 / 4.0,
            model_label: st.model_label.clone(),
            target_label: st.target_label.clone(),
        };
        match fc.admit(req, &mut st.charge).await {
            Ok(pass) => {
                st.flow_pass = Some(pass);
                Ok(true)
            }
            Err(e) => {
                let (status, code) = e.status();
                Err(Reject::new(status, code, e.to_string()))
            }
        }
    }
}

/// The request's flow: its fairness id, the default flow without one, 400 when too long.
fn fairness_id(st: &RequestState) -> Result<String, Reject> {
    match st.headers.fairness_id.as_deref() {
        None | Some("") => Ok(DEFAULT_FLOW.to_string()),
        Some(id) if id.len() > MAX_FAIRNESS_ID_BYTES => Err(Reject::new(
            400,
            "BadRequest",
            format!(
                "{FAIRNESS_HEADER} is longer than {MAX_FAIRNESS_ID_BYTES} bytes; use a shorter tenant id"
            ),
        )),
        Some(id) => Ok(id.to_string()),
    }
}
