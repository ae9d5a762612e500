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

/// Why [`send_ok`] got no usable answer.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SendError {
    /// The answer's status, when there was one (not 2xx).
    pub status: Option<u16>,
    pub message: String,
}

impl From<SendError> for String {
    fn from(e: SendError) -> String {
        e.message
    }
}

/// Sends `req` with the token from `file`; an answer other than 2xx is an error naming its
/// status and body (the body's first 512 characters: an error page can be large).
pub async fn send_ok(
    req: reqwest::RequestBuilder,
    file: Option<std::path::PathBuf>,
) -> Result<reqwest::Response, SendError> {
    let r = with_token(req, file)
        .await
        .send()
        .await
        .map_err(|e| SendError {
            status: None,
            message: e.to_string(),
        })?;
    if r.status().is_success() {
        return Ok(r);
    }
    let code = r.status();
    let text = r.text().await.unwrap_or_default();
    let short: String = text.chars().take(512).collect();
    Err(SendError {
        status: Some(code.as_u16()),
        message: format!("{code}: {}", short.trim()),
    })
}
