//! A lean HTTP/1.1 client for metrics scrapes: one kept-alive hyper connection per endpoint.
//!
//! A scrape every 50 ms of a 52 KB page from 100 endpoints is 2000 requests a second; the
//! pooled general-purpose client spent ~160 us of CPU on each. A dedicated connection per
//! endpoint, driven by hyper directly, avoids the pool and its bookkeeping.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use thiserror::Error;

/// A scrape failed.
#[derive(Debug, Error)]
pub enum ScrapeError {
    #[error("connect {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("{path}: status {status}")]
    Status { path: String, status: u16 },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("bad request: {0}")]
    Request(#[from] hyper::http::Error),
}

/// One endpoint's kept-alive connection.
#[derive(Debug)]
pub struct ScrapeClient {
    addr: String,
    sender: Option<SendRequest<Empty<Bytes>>>,
}

impl ScrapeClient {
    pub fn new(addr: String) -> Self {
        Self { addr, sender: None }
    }

    async fn connect(&mut self) -> Result<&mut SendRequest<Empty<Bytes>>, ScrapeError> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let tcp = tokio::net::TcpStream::connect(&self.addr)
                .await
                .map_err(|source| ScrapeError::Connect {
                    addr: self.addr.clone(),
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(async move {
                // Ends when the server closes or the sender is dropped.
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("just connected"))
    }

    /// GETs `path` and returns the body; any failure drops the connection.
    pub async fn get(&mut self, path: &str, timeout: Duration) -> Result<Bytes, ScrapeError> {
        let res = tokio::time::timeout(timeout, self.get_inner(path)).await;
        match res {
            Ok(Ok(b)) => Ok(b),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e)
            }
            Err(_) => {
                self.sender = None;
                Err(ScrapeError::Timeout(timeout))
            }
        }
    }

    async fn get_inner(&mut self, path: &str) -> Result<Bytes, ScrapeError> {
        let host = self.addr.clone();
        let sender = self.connect().await?;
        sender.ready().await?;
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, host)
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        if !(200..300).contains(&status) {
            return Err(ScrapeError::Status {
                path: path.into(),
                status,
            });
        }
        Ok(body)
    }
}
