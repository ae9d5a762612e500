//! Network plumbing every binary shares: the scrape client, pinned gRPC serving, TLS, the Kubernetes client, metrics pages and their auth.

pub mod bearer;
pub mod capped;
pub mod kube_client;
pub mod metrics_auth;
pub mod metrics_text;
pub mod scrape_http;
pub mod serve;
pub mod tls;
