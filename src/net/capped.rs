//! JSON from a trusted peer's HTTP answer, read up to a size limit: a peer's bug (or an impostor) cannot make us buffer without bound.

use serde::de::DeserializeOwned;
use thiserror::Error;

/// Reading or decoding the body failed.
#[derive(Debug, Error)]
pub enum CappedError {
    #[error("answer larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("reading the answer: {0}")]
    Read(#[from] reqwest::Error),
    #[error("decoding the answer: {0}")]
    Decode(#[from] serde_json::Error),
}

/// The body of `r` as `T`, refused past `limit` bytes (announced or read).
pub async fn json_capped<T: DeserializeOwned>(
    mut r: reqwest::Response,
    limit: usize,
) -> Result<T, CappedError> {
    if r.content_length().is_some_and(|n| n > limit as u64) {
        return Err(CappedError::TooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = r.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Err(CappedError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves one HTTP answer with `body` (chunked: no length announced) and returns its URL.
    async fn serve(body: String) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", l.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
            let chunk = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
            let _ = s.write_all(format!("{head}{chunk}").as_bytes()).await;
        });
        url
    }

    #[tokio::test]
    async fn reads_up_to_the_limit_and_refuses_past_it() {
        crate::runtime::install_crypto_provider();
        let c = reqwest::Client::new();
        let url = serve(format!("[{}1]", "1,".repeat(100))).await;
        let v: Vec<u32> = json_capped(c.get(&url).send().await.unwrap(), 1024)
            .await
            .unwrap();
        assert_eq!(v.len(), 101);
        let url = serve(format!("[{}1]", "1,".repeat(1000))).await;
        let e = json_capped::<Vec<u32>>(c.get(&url).send().await.unwrap(), 1024)
            .await
            .unwrap_err();
        assert!(matches!(e, CappedError::TooLarge { limit: 1024 }), "{e}");
    }
}
