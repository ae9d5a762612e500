//! What every binary's `/metrics` shares: the OpenMetrics content type, a registry's text and the build-info metric.

use axum::http::header;
use axum::response::IntoResponse;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Content type of every `/metrics` answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry as OpenMetrics text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// The `/metrics` answer for `text`.
pub fn response(text: String) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text)
}

/// Registers `<prefix>_info{labels} 1`, an OpenMetrics info metric describing the build.
pub fn register_info(r: &mut Registry, prefix: &str, labels: &[(&str, &str)]) {
    let labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    r.register(prefix, "Build information", Info::new(labels));
}
