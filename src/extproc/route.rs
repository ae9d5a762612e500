//! The decision for a complete request: prepare, admit (flow control may hold it), pick, then answer Envoy.

use tonic::Status;

use super::proto::{Tx, send};
use super::state::RequestState;
use super::{ExtProc, Next};
use crate::pool::labels::for_log;

impl ExtProc {
    /// Routes the request once its body (if any) is complete: `Next::Done` when it was
    /// answered in the EPP's name instead.
    pub(super) async fn route(&self, st: &mut RequestState, tx: &Tx) -> Result<Next, Status> {
        let decided = match self.prepare(st) {
            Err(r) => Err(r),
            Ok(prepared) => match self.admit(st, &prepared).await {
                Err(r) => Err(r),
                Ok(admitted) => {
                    let d = self.decide(st, prepared, admitted);
                    if let Some(p) = st.flow_pass.as_mut() {
                        p.picked();
                    }
                    d
                }
            },
        };
        match decided {
            Ok(d) => {
                self.answer_routed(st, d, tx).await?;
                Ok(Next::Continue)
            }
            Err(r) => {
                self.record_error(st, r.status);
                tracing::info!(
                    request_id = for_log(st.headers.request_id()),
                    model = for_log(&st.requested_model),
                    status = r.status,
                    reason = %r.message,
                    path = %st.headers.path(),
                    "request rejected"
                );
                send(tx, r.answer()).await?;
                Ok(Next::Done)
            }
        }
    }
}
