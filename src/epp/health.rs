//! gRPC health service answering upstream's service names (probes written for any EPP release work unchanged).
//!
//! Upstream's EPP answers `Check` for every service name by whether the pool has synced (the
//! seeds' probes ask for `inference-extension`); with leader election it tells `liveness`
//! (always serving) from readiness (`readiness`, the ext_proc service name, the empty name),
//! and unknown names get SERVICE_UNKNOWN. We answer the same way, with names of every release
//! accepted in both modes.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::pool::state::Shared;

/// Always serving while the process answers.
pub const LIVENESS: &str = "liveness";
/// Names that mean "ready to take traffic", from every upstream release and the seeds.
pub const READINESS_NAMES: &[&str] = &[
    "",
    "readiness",
    "envoy.service.ext_proc.v3.ExternalProcessor",
    "inference-extension",
];

/// The health service: ready once the pool and its endpoints have been read (and, with
/// leader election, while this replica leads).
#[derive(Clone)]
pub struct EppHealth {
    shared: Arc<Shared>,
    leader_election: bool,
}

impl EppHealth {
    pub fn new(shared: Arc<Shared>, leader_election: bool) -> Self {
        Self {
            shared,
            leader_election,
        }
    }

    /// Ready: the pool is known and its endpoints listed (an empty list counts: the pool is
    /// known to be empty), and this replica leads where leader election is on.
    pub fn ready(&self) -> bool {
        self.shared.pool_synced.load(Ordering::Acquire)
            && (!self.leader_election || self.shared.is_leader.load(Ordering::SeqCst))
    }

    /// The status for a service name; `None` for a name upstream would not know.
    pub fn status(&self, service: &str) -> Option<ServingStatus> {
        let serving = |b: bool| {
            if b {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        if service == LIVENESS {
            return Some(ServingStatus::Serving);
        }
        if READINESS_NAMES.contains(&service) || !self.leader_election {
            return Some(serving(self.ready()));
        }
        None
    }

    pub fn into_server(self) -> HealthServer<Self> {
        HealthServer::new(self)
    }
}

#[tonic::async_trait]
impl Health for EppHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = &request.get_ref().service;
        let status = match self.status(service) {
            Some(s) => s,
            None => {
                tracing::debug!(service = %service.chars().take(128).collect::<String>(), "health check for an unknown service");
                ServingStatus::ServiceUnknown
            }
        };
        Ok(Response::new(HealthCheckResponse {
            status: status as i32,
        }))
    }

    type WatchStream =
        Pin<Box<dyn futures::Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    /// As upstream: probes and gateways use `Check`.
    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("Watch is not implemented; use Check"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_modes() {
        let shared = Arc::new(Shared::new(Default::default()));
        let h = EppHealth::new(shared.clone(), false);
        assert_eq!(h.status("liveness"), Some(ServingStatus::Serving));
        assert_eq!(
            h.status("inference-extension"),
            Some(ServingStatus::NotServing)
        );
        shared.pool_synced.store(true, Ordering::Release);
        for name in READINESS_NAMES.iter().chain(&["anything"]) {
            assert_eq!(h.status(name), Some(ServingStatus::Serving), "{name}");
        }
        let le = EppHealth::new(shared.clone(), true);
        assert_eq!(le.status("readiness"), Some(ServingStatus::NotServing));
        assert_eq!(le.status("liveness"), Some(ServingStatus::Serving));
        assert_eq!(le.status("anything"), None);
        shared.is_leader.store(true, Ordering::SeqCst);
        assert_eq!(
            le.status("inference-extension"),
            Some(ServingStatus::Serving)
        );
    }
}
