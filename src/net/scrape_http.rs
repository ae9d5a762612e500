//! A lean HTTP/1.1 GET client for metrics scrapes: one kept-alive connection per endpoint, one reused buffer.
//!
//! A scrape every 50 ms of a 52 KB page from 100 endpoints is 2,000 requests a second. The
//! pooled general-purpose client spent ~160 us of CPU on each, a hyper connection per endpoint
//! ~70 us: its read buffer starts small and grows, every read becomes a separate `Bytes` chunk
//! and collecting them copies the page once more. Here the page is read straight into one
//! buffer that lives as long as the connection (usually one or two `read` calls), parsed in
//! place, and the head and chunk sizes are parsed by `httparse`.
//!
//! Measured again with the `name[]` filter on (a 2.3 KB page), 2026-12-06, three alternating
//! runs of `scripts/bench-scrape.sh` (100 endpoints every 50 ms, release): this client 0.048-
//! 0.052 cores; hyper's `client::conn::http1` with its connection polled in the same task
//! 0.068-0.070 (+40 %), with the connection on a task of its own 0.077-0.088 (+50 %). Kept:
//! the rule was to go back to hyper within 10 % (docs/benchmarks.md, "Scrape client").

use std::io::ErrorKind;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest body accepted: a model server's page is tens of KB; this bounds memory if an
/// endpoint misbehaves.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Most response-head bytes accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most response headers accepted.
const MAX_HEADERS: usize = 64;
/// Spare room offered to each `read`: a whole page fits, so one wake-up usually reads it all.
const READ_CHUNK: usize = 64 * 1024;
/// A buffer grown past this by one odd response is given back afterwards.
const KEEP_CAPACITY: usize = 1024 * 1024;

/// A scrape failed.
#[derive(Debug, Error)]
pub enum ScrapeError {
    #[error("connect {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: connection closed before the response was complete")]
    Closed { path: String },
    #[error("{path}: malformed response: {reason}")]
    Malformed { path: String, reason: String },
    #[error("{path}: response larger than {limit} bytes")]
    TooLarge { path: String, limit: usize },
    #[error("{path}: status {status}")]
    Status { path: String, status: u16 },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl ScrapeError {
    /// Whether the server answered (with a status, or bytes that are not a usable response),
    /// as opposed to the connection failing or timing out.
    pub fn answered(&self) -> bool {
        matches!(
            self,
            ScrapeError::Status { .. }
                | ScrapeError::Malformed { .. }
                | ScrapeError::TooLarge { .. }
        )
    }
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
struct Head {
    len: usize,
    status: u16,
    framing: Framing,
    close: bool,
}

/// One endpoint's kept-alive connection and its buffer.
#[derive(Debug)]
pub struct ScrapeClient {
    addr: String,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
}

impl ScrapeClient {
    pub fn new(addr: String) -> Self {
        Self {
            addr,
            conn: None,
            buf: Vec::new(),
        }
    }

    /// GETs `path` and returns the body (valid until the next call); any failure drops the
    /// connection, so the next call starts on a fresh one.
    pub async fn get(&mut self, path: &str, timeout: Duration) -> Result<&[u8], ScrapeError> {
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::new();
        }
        let res = tokio::time::timeout(timeout, self.exchange_with_retry(path)).await;
        match res {
            Ok(Ok((start, end, close))) => {
                if close {
                    self.conn = None;
                }
                Ok(&self.buf[start..end])
            }
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                Err(ScrapeError::Timeout(timeout))
            }
        }
    }

    /// One exchange; a kept-alive connection the server closed while idle (nothing received)
    /// is retried once on a new connection, as any HTTP client does.
    async fn exchange_with_retry(
        &mut self,
        path: &str,
    ) -> Result<(usize, usize, bool), ScrapeError> {
        let reused = self.conn.is_some();
        match self.exchange(path).await {
            Err(e) if reused && self.buf.is_empty() && is_stale(&e) => {
                self.conn = None;
                self.exchange(path).await
            }
            other => other,
        }
    }

    /// Sends the request and reads the response into `buf`; returns the body's range and
    /// whether the connection must be closed after it.
    async fn exchange(&mut self, path: &str) -> Result<(usize, usize, bool), ScrapeError> {
        self.buf.clear();
        if self.conn.is_none() {
            let tcp =
                TcpStream::connect(&self.addr)
                    .await
                    .map_err(|source| ScrapeError::Connect {
                        addr: self.addr.clone(),
                        source,
                    })?;
            let _ = tcp.set_nodelay(true);
            self.conn = Some(tcp);
        }
        let conn = self.conn.as_mut().expect("connected above");
        let io = |source| ScrapeError::Io {
            path: path.into(),
            source,
        };
        // Prefer the classic text format, as Prometheus does; OpenMetrics is not parsed.
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: inferlane-epp\r\nAccept: text/plain;version=0.0.4;q=1,*/*;q=0.1\r\n\r\n",
            self.addr
        );
        conn.write_all(req.as_bytes()).await.map_err(io)?;

        let head = loop {
            if let Some(head) = parse_head(&self.buf, path)? {
                break head;
            }
            if self.buf.len() > MAX_HEAD_BYTES {
                return Err(ScrapeError::Malformed {
                    path: path.into(),
                    reason: format!("response head longer than {MAX_HEAD_BYTES} bytes"),
                });
            }
            if read_more(conn, &mut self.buf).await.map_err(io)? == 0 {
                return Err(ScrapeError::Closed { path: path.into() });
            }
        };
        let too_large = || ScrapeError::TooLarge {
            path: path.into(),
            limit: MAX_BODY_BYTES,
        };
        let start = head.len;
        let (end, close) = match head.framing {
            Framing::Length(n) => {
                if n > MAX_BODY_BYTES {
                    return Err(too_large());
                }
                self.buf.reserve((start + n).saturating_sub(self.buf.len()));
                while self.buf.len() < start + n {
                    if read_more(conn, &mut self.buf).await.map_err(io)? == 0 {
                        return Err(ScrapeError::Closed { path: path.into() });
                    }
                }
                if self.buf.len() > start + n {
                    return Err(ScrapeError::Malformed {
                        path: path.into(),
                        reason: "bytes after the body of a response we did not ask for".into(),
                    });
                }
                (start + n, head.close)
            }
            Framing::UntilClose => {
                while read_more(conn, &mut self.buf).await.map_err(io)? > 0 {
                    if self.buf.len() - start > MAX_BODY_BYTES {
                        return Err(too_large());
                    }
                }
                (self.buf.len(), true)
            }
            Framing::Chunked => {
                let mut dechunk = Dechunk::new(start);
                loop {
                    match dechunk.step(&mut self.buf, path)? {
                        Some(end) => break (end, head.close),
                        None if dechunk.out - start > MAX_BODY_BYTES => return Err(too_large()),
                        None => {
                            if read_more(conn, &mut self.buf).await.map_err(io)? == 0 {
                                return Err(ScrapeError::Closed { path: path.into() });
                            }
                        }
                    }
                }
            }
        };
        if !(200..300).contains(&head.status) {
            return Err(ScrapeError::Status {
                path: path.into(),
                status: head.status,
            });
        }
        Ok((start, end, close))
    }
}

/// Whether a failure on a reused connection means the server had closed it while idle.
fn is_stale(e: &ScrapeError) -> bool {
    match e {
        ScrapeError::Closed { .. } => true,
        ScrapeError::Io { source, .. } => matches!(
            source.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
        ),
        _ => false,
    }
}

async fn read_more(conn: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    buf.reserve(READ_CHUNK);
    conn.read_buf(buf).await
}

/// Parses the response head once it is complete (`None`: read more).
fn parse_head(buf: &[u8], path: &str) -> Result<Option<Head>, ScrapeError> {
    let malformed = |reason: String| ScrapeError::Malformed {
        path: path.into(),
        reason,
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(malformed(e.to_string())),
    };
    let status = resp.code.unwrap_or(0);
    let mut framing = Framing::UntilClose;
    let mut close = resp.version == Some(0);
    for h in resp.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse()
                .map_err(|_| malformed(format!("bad content-length {value:?}")))?;
            if framing != Framing::Chunked {
                framing = Framing::Length(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if value
                .rsplit(',')
                .next()
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"))
            {
                // Chunked wins over a content-length (RFC 9112 6.3).
                framing = Framing::Chunked;
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = value
                .split(',')
                .any(|v| v.trim().eq_ignore_ascii_case("close"));
        }
    }
    // 1xx, 204 and 304 have no body.
    if status < 200 || status == 204 || status == 304 {
        framing = Framing::Length(0);
    }
    Ok(Some(Head {
        len,
        status,
        framing,
        close,
    }))
}

/// Removes chunked framing in place: chunk data is moved down so the body ends up contiguous
/// right after the head.
#[derive(Debug)]
struct Dechunk {
    /// Where the next decoded byte goes.
    out: usize,
    /// Start of the next unparsed framing byte.
    at: usize,
}

impl Dechunk {
    fn new(start: usize) -> Self {
        Self {
            out: start,
            at: start,
        }
    }

    /// Decodes what has arrived; `Some(end)` once the last chunk and the trailers are in.
    fn step(&mut self, buf: &mut [u8], path: &str) -> Result<Option<usize>, ScrapeError> {
        let malformed = |reason: String| ScrapeError::Malformed {
            path: path.into(),
            reason,
        };
        loop {
            let (consumed, size) = match httparse::parse_chunk_size(&buf[self.at..]) {
                Ok(httparse::Status::Complete((c, s))) => (c, s),
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(_) => return Err(malformed("bad chunk size".into())),
            };
            if size == 0 {
                // Trailers (rarely any) end with an empty line.
                let rest = &buf[self.at + consumed..];
                if rest.starts_with(b"\r\n") {
                    return Ok(Some(self.out));
                }
                return match memchr::memmem::find(rest, b"\r\n\r\n") {
                    Some(_) => Ok(Some(self.out)),
                    None => Ok(None),
                };
            }
            let size = usize::try_from(size)
                .ok()
                .filter(|s| *s <= MAX_BODY_BYTES)
                .ok_or_else(|| malformed(format!("chunk of {size} bytes")))?;
            let data = self.at + consumed;
            if buf.len() < data + size + 2 {
                return Ok(None);
            }
            if &buf[data + size..data + size + 2] != b"\r\n" {
                return Err(malformed("chunk not followed by CRLF".into()));
            }
            buf.copy_within(data..data + size, self.out);
            self.out += size;
            self.at = data + size + 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    const T: Duration = Duration::from_secs(5);

    /// Responses of one connection, each written in the given pieces.
    type Conn = Vec<Vec<Vec<u8>>>;

    /// A loopback server: its n-th connection answers its requests with `conns[n]` in turn,
    /// then closes. Counts connections.
    async fn server(conns: Vec<Conn>) -> (String, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                let responses = conns.get(n).cloned().unwrap_or_default();
                tokio::spawn(async move {
                    for pieces in responses {
                        // Wait for one request head.
                        let mut req = Vec::new();
                        let mut b = [0u8; 1024];
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut b).await {
                                Ok(k) if k > 0 => req.extend_from_slice(&b[..k]),
                                _ => return,
                            }
                        }
                        for p in pieces {
                            if s.write_all(&p).await.is_err() {
                                return;
                            }
                            tokio::task::yield_now().await;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn whole(s: &str) -> Vec<Vec<u8>> {
        vec![s.as_bytes().to_vec()]
    }

    #[tokio::test]
    async fn keeps_the_connection_and_reads_length_delimited_bodies() {
        let (addr, accepted) = server(vec![vec![
            whole("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
            vec![
                b"HTTP/1.1 200 OK\r\nconte".to_vec(),
                b"nt-length: 11\r\n\r\nhello".to_vec(),
                b" world".to_vec(),
            ],
        ]])
        .await;
        let mut c = ScrapeClient::new(addr);
        assert_eq!(c.get("/metrics", T).await.unwrap(), b"hello");
        assert_eq!(c.get("/metrics", T).await.unwrap(), b"hello world");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one kept-alive connection"
        );
    }

    #[tokio::test]
    async fn decodes_chunked_bodies_split_anywhere() {
        let (addr, _) = server(vec![vec![vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel".to_vec(),
            b"lo\r\n6\r".to_vec(),
            b"\n world\r\n0\r\n".to_vec(),
            b"\r\n".to_vec(),
        ]]])
        .await;
        let mut c = ScrapeClient::new(addr);
        assert_eq!(c.get("/metrics", T).await.unwrap(), b"hello world");
    }

    #[tokio::test]
    async fn reads_to_close_without_length_and_reconnects() {
        let (addr, accepted) = server(vec![
            vec![whole("HTTP/1.1 200 OK\r\n\r\nall of it")],
            vec![whole("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")],
        ])
        .await;
        let mut c = ScrapeClient::new(addr);
        assert_eq!(c.get("/metrics", T).await.unwrap(), b"all of it");
        assert_eq!(c.get("/metrics", T).await.unwrap(), b"ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_retried_once() {
        // The first connection answers once and closes; the retry lands on the second.
        let (addr, accepted) = server(vec![
            vec![whole("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")],
            vec![whole("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")],
        ])
        .await;
        let mut c = ScrapeClient::new(addr);
        assert_eq!(c.get("/metrics", T).await.unwrap(), b"a");
        assert_eq!(c.get("/metrics", T).await.unwrap(), b"b");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn errors_name_the_problem() {
        let (addr, _) = server(vec![vec![whole(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy",
        )]])
        .await;
        let mut c = ScrapeClient::new(addr);
        let e = c.get("/metrics", T).await.unwrap_err();
        assert!(matches!(e, ScrapeError::Status { status: 503, .. }), "{e}");

        let (addr, _) = server(vec![vec![whole(&format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        ))]])
        .await;
        let mut c = ScrapeClient::new(addr);
        let e = c.get("/metrics", T).await.unwrap_err();
        assert!(matches!(e, ScrapeError::TooLarge { .. }), "{e}");

        let (addr, _) = server(vec![vec![whole("NOT HTTP\r\n\r\n")]]).await;
        let mut c = ScrapeClient::new(addr);
        let e = c.get("/metrics", T).await.unwrap_err();
        assert!(matches!(e, ScrapeError::Malformed { .. }), "{e}");

        let (addr, _) = server(vec![vec![whole(
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        )]])
        .await;
        let mut c = ScrapeClient::new(addr);
        let e = c.get("/metrics", T).await.unwrap_err();
        assert!(matches!(e, ScrapeError::Closed { .. }), "{e}");

        // Nothing listens on a port just released.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = l.local_addr().unwrap().to_string();
        drop(l);
        let e = ScrapeClient::new(gone)
            .get("/metrics", T)
            .await
            .unwrap_err();
        assert!(matches!(e, ScrapeError::Connect { .. }), "{e}");
    }
}
