//! bbr's gRPC health service: every service name is serving, as upstream's bbr answers (GKE's health check sends none, probes send any).

use std::pin::Pin;

use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// bbr has nothing to sync before it can answer: a request for a model no mapping names
/// gets an empty base-model header, which is what a route with no match expects.
#[derive(Debug, Clone, Copy, Default)]
pub struct BbrHealth;

impl BbrHealth {
    pub fn into_server(self) -> HealthServer<Self> {
        HealthServer::new(self)
    }
}

#[tonic::async_trait]
impl Health for BbrHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        tracing::trace!(service = %request.get_ref().service.chars().take(128).collect::<String>(), "health check");
        Ok(Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
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
