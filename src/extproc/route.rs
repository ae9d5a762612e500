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
                // Counted by code on /metrics; a line per 4xx would grow with what clients
                // send (thousands of 429s a second under overload): the first few each second
                // at info (a client's report can be found by its request id), the rest debug.
                let (id, model) = (
                    for_log(st.headers.request_id()),
                    for_log(&st.requested_model),
                );
                let path = st.headers.path();
                if r.status >= 500 || rejection_log_slot() {
                    tracing::info!(request_id = id, model, status = r.status, reason = %r.message, %path, "request rejected");
                } else {
                    tracing::debug!(request_id = id, model, status = r.status, reason = %r.message, %path, "request rejected");
                }
                send(tx, r.answer()).await?;
                Ok(Next::Done)
            }
        }
    }
}

/// Rejections logged at info per second, at most.
const REJECTIONS_LOGGED_PER_SEC: u32 = 20;

/// Whether this rejection may be logged at info: one of the first
/// [`REJECTIONS_LOGGED_PER_SEC`] this second.
fn rejection_log_slot() -> bool {
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    static SECOND: AtomicU64 = AtomicU64::new(0);
    static COUNT: AtomicU32 = AtomicU32::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if SECOND.swap(now, Ordering::Relaxed) != now {
        COUNT.store(0, Ordering::Relaxed);
    }
    COUNT.fetch_add(1, Ordering::Relaxed) < REJECTIONS_LOGGED_PER_SEC
}
