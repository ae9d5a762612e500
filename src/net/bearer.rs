//! A bearer token read from a file on every call: kubelet rotates projected service account tokens, so a token read once goes stale.

/// `req` with the bearer token read from `file`, if there is one and it can be read.
pub async fn with_token(
    req: reqwest::RequestBuilder,
    file: Option<std::path::PathBuf>,
) -> reqwest::RequestBuilder {
    match file {
        Some(p) => match tokio::fs::read_to_string(&p).await {
            Ok(t) => req.bearer_auth(t.trim()),
            Err(_) => req,
        },
        None => req,
    }
}
