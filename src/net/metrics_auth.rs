//! `--metrics-endpoint-auth`: the metrics and debug pages answer only callers the API server vouches for (TokenReview + SubjectAccessReview), as upstream's.
//!
//! A caller sends `Authorization: Bearer <token>` (Prometheus: its service account token).
//! The token is reviewed (`authentication.k8s.io/v1` TokenReview), then the user it names is
//! checked for `get` on the non-resource URL asked for (`/metrics`, `/debug/pool`) with a
//! SubjectAccessReview, which is what a ClusterRole `nonResourceURLs: ["/metrics"]` grants.
//! Verdicts are cached (granted 60 s, refused 10 s, 1,024 tokens at most) and the reviews
//! the API server sees are rate-limited, so a client spraying random tokens costs the API
//! server at most [`REVIEWS_PER_SECOND`] calls a second and gets 429s past it.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};

/// Reviews sent to the API server per second at most (burst: twice as many).
pub const REVIEWS_PER_SECOND: f64 = 10.0;
const GRANTED_FOR: Duration = Duration::from_secs(60);
const REFUSED_FOR: Duration = Duration::from_secs(10);
const CACHED_TOKENS: usize = 1_024;
/// Tokens longer than this are refused unread (service account tokens are ~1 KB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// What the API server said about a token and a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Granted,
    /// The token is not valid (401).
    Unauthenticated,
    /// Valid, but its user may not use the path with this verb (403).
    Forbidden,
}

/// Asks the API server; a trait so the cache and the limiter are tested without one.
pub trait Reviewer: Send + Sync {
    /// The verdict for `token` doing `verb` (`get`, `post`) on `path`, or why the API server
    /// could not be asked.
    fn review<'a>(
        &'a self,
        token: &'a str,
        verb: &'a str,
        path: &'a str,
    ) -> BoxFuture<'a, Result<Verdict, String>>;
}

/// TokenReview + SubjectAccessReview through the EPP's own client.
pub struct KubeReviewer(pub Client);

impl Reviewer for KubeReviewer {
    fn review<'a>(
        &'a self,
        token: &'a str,
        verb: &'a str,
        path: &'a str,
    ) -> BoxFuture<'a, Result<Verdict, String>> {
        Box::pin(async move {
            let tr = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_string()),
                    ..Default::default()
                },
                ..Default::default()
            };
            let tr = Api::<TokenReview>::all(self.0.clone())
                .create(&PostParams::default(), &tr)
                .await
                .map_err(|e| format!("TokenReview: {e}"))?;
            let Some(status) = tr.status.filter(|s| s.authenticated == Some(true)) else {
                return Ok(Verdict::Unauthenticated);
            };
            let user = status.user.unwrap_or_default();
            let sar = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: user.username,
                    uid: user.uid,
                    groups: user.groups,
                    extra: user.extra,
                    non_resource_attributes: Some(NonResourceAttributes {
                        path: Some(path.to_string()),
                        verb: Some(verb.to_string()),
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let sar = Api::<SubjectAccessReview>::all(self.0.clone())
                .create(&PostParams::default(), &sar)
                .await
                .map_err(|e| format!("SubjectAccessReview: {e}"))?;
            Ok(if sar.status.is_some_and(|s| s.allowed) {
                Verdict::Granted
            } else {
                Verdict::Forbidden
            })
        })
    }
}

/// Token bucket over the reviews sent.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The gate in front of the metrics server's pages.
pub struct MetricsAuth {
    reviewer: Box<dyn Reviewer>,
    cache: Mutex<lru::LruCache<(String, String), (Verdict, Instant)>>,
    bucket: Mutex<Bucket>,
}

impl MetricsAuth {
    pub fn new(reviewer: Box<dyn Reviewer>) -> Arc<Self> {
        Arc::new(Self {
            reviewer,
            cache: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(CACHED_TOKENS).unwrap_or(NonZeroUsize::MIN),
            )),
            bucket: Mutex::new(Bucket {
                tokens: 2.0 * REVIEWS_PER_SECOND,
                at: Instant::now(),
            }),
        })
    }

    fn cached(&self, key: &(String, String)) -> Option<Verdict> {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let (v, until) = *c.get(key)?;
        (Instant::now() < until).then_some(v)
    }

    fn take_review(&self) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * REVIEWS_PER_SECOND)
            .min(2.0 * REVIEWS_PER_SECOND);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The answer for a request with this `Authorization` header value doing `verb` on
    /// `path`.
    pub async fn check(
        &self,
        authorization: Option<&str>,
        verb: &str,
        path: &str,
    ) -> Result<(), Response> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_BYTES);
        let Some(token) = token else {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "send a service account token: Authorization: Bearer <token> (--metrics-endpoint-auth)",
            ));
        };
        let key = (token.to_string(), format!("{verb} {path}"));
        let verdict = match self.cached(&key) {
            Some(v) => v,
            None if !self.take_review() => {
                return Err(refuse(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many token reviews; retry shortly",
                ));
            }
            None => match self.reviewer.review(token, verb, path).await {
                Ok(v) => {
                    let ttl = if v == Verdict::Granted {
                        GRANTED_FOR
                    } else {
                        REFUSED_FOR
                    };
                    self.cache
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .put(key, (v, Instant::now() + ttl));
                    v
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics auth: the API server could not review a token");
                    return Err(refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "cannot review the token now",
                    ));
                }
            },
        };
        match verdict {
            Verdict::Granted => Ok(()),
            Verdict::Unauthenticated => Err(refuse(StatusCode::UNAUTHORIZED, "token not valid")),
            Verdict::Forbidden => Err(refuse(
                StatusCode::FORBIDDEN,
                "this identity may not use this path (grant nonResourceURLs with the request's verb: get, or post to /lora/v1/demand and /lora/v1/links)",
            )),
        }
    }
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from(format!("{message}\n")),
    )
        .into_response()
}

/// axum middleware: `Router::layer(from_fn_with_state(auth, metrics_auth::layer))`.
pub async fn layer(State(auth): State<Arc<MetricsAuth>>, req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    // Kubernetes names a non-resource request's verb by its HTTP method, lowercased.
    let verb = match *req.method() {
        axum::http::Method::GET | axum::http::Method::HEAD => "get",
        axum::http::Method::POST => "post",
        _ => "other",
    };
    match auth.check(header, verb, req.uri().path()).await {
        Ok(()) => next.run(req).await,
        Err(r) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Fake(Arc<AtomicUsize>);

    impl Reviewer for Fake {
        fn review<'a>(
            &'a self,
            token: &'a str,
            verb: &'a str,
            path: &'a str,
        ) -> BoxFuture<'a, Result<Verdict, String>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                Ok(match (token, verb, path) {
                    ("prometheus", "get", "/metrics") => Verdict::Granted,
                    ("prometheus", _, _) => Verdict::Forbidden,
                    _ => Verdict::Unauthenticated,
                })
            })
        }
    }

    #[tokio::test]
    async fn verdicts_are_cached_and_reviews_limited() {
        let calls = Arc::new(AtomicUsize::new(0));
        let auth = MetricsAuth::new(Box::new(Fake(calls.clone())));
        let status = |r: Result<(), Response>| r.err().map(|r| r.status().as_u16());
        assert_eq!(status(auth.check(None, "get", "/metrics").await), Some(401));
        assert_eq!(
            status(auth.check(Some("Basic x"), "get", "/metrics").await),
            Some(401)
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "no review without a bearer token"
        );
        for _ in 0..5 {
            assert_eq!(
                status(
                    auth.check(Some("Bearer prometheus"), "get", "/metrics")
                        .await
                ),
                None
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "granted once, then cached");
        assert_eq!(
            status(
                auth.check(Some("Bearer prometheus"), "get", "/debug/pool")
                    .await
            ),
            Some(403)
        );
        assert_eq!(
            status(
                auth.check(Some("Bearer prometheus"), "post", "/metrics")
                    .await
            ),
            Some(403),
            "a grant to get is not one to post"
        );
        // Random tokens: each a review until the bucket is empty, then 429 without one.
        let mut codes = Vec::new();
        for i in 0..100 {
            codes.push(status(
                auth.check(Some(&format!("Bearer t{i}")), "get", "/metrics")
                    .await,
            ));
        }
        let reviews = calls.load(Ordering::SeqCst);
        assert!(
            reviews <= 2 + 2 * REVIEWS_PER_SECOND as usize,
            "{reviews} reviews"
        );
        assert!(
            codes.contains(&Some(401)) && codes.contains(&Some(429)),
            "{codes:?}"
        );
    }
}
