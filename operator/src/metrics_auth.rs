//! Who may read `/metrics` when it is served securely: the caller's bearer token is
//! authenticated by the API server (TokenReview) and the user it names is authorized for the
//! request's verb on the non-resource URL (SubjectAccessReview), as controller-runtime's
//! authentication/authorization filter does. Answers are cached briefly, so a scrape costs no API
//! call; a failure to ask is never cached. Probes never pass through here.
//!
//! Whoever reaches the port can send tokens, so asking is bounded: a token that is oversized or
//! not shaped like one is refused without a review, concurrent requests with one token share one
//! review, at most [`MAX_REVIEWS_IN_FLIGHT`] reviews run at once (more callers get 503 at once),
//! and the decision cache evicts the least recently used entry, so a flood of new tokens never
//! pushes out the scraper's. Answers say only 401, 403 or 503; the reason goes to the log.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::Api;
use kube::api::PostParams;
use sha2::{Digest, Sha256};

/// How long an allowed caller is remembered.
const ALLOWED_TTL: Duration = Duration::from_secs(60);
/// How long a refused caller is remembered (short: a role may be bound a moment later).
const REFUSED_TTL: Duration = Duration::from_secs(10);
/// Decisions remembered at most; the least recently used one makes room.
const CACHE_LIMIT: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(1024) {
    Some(limit) => limit,
    None => panic!("the cache limit is not zero"),
};
/// The longest token taken to review: ServiceAccount tokens are about 1 KiB, OIDC ones a few.
pub const MAX_TOKEN_BYTES: usize = 8192;
/// Reviews asked of the API server at once; a caller beyond them is answered 503 at once.
pub const MAX_REVIEWS_IN_FLIGHT: usize = 16;

/// What the API server said about one token, path and verb.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// 401: no usable token.
    Unauthenticated(String),
    /// 403: the user may not do this.
    Forbidden(String),
}

impl Decision {
    fn ttl(&self) -> Duration {
        match self {
            Decision::Allowed => ALLOWED_TTL,
            _ => REFUSED_TTL,
        }
    }
}

type CacheKey = ([u8; 32], String, String);

/// One review under way, shared by every request that carries the same token, path and verb.
type Flight = Arc<tokio::sync::OnceCell<Result<Decision, CheckError>>>;

/// Why a caller could not be checked (503).
#[derive(Clone, Debug, thiserror::Error)]
pub enum CheckError {
    /// The API server could not be asked.
    #[error("the API server could not be asked: {0}")]
    Api(String),
    /// Too many reviews are under way already.
    #[error("{MAX_REVIEWS_IN_FLIGHT} reviews are under way already")]
    Busy,
}

/// Authenticates and authorizes requests through the API server.
pub struct MetricsAuth {
    client: kube::Client,
    /// The audience a token must be issued for; `None` takes the API server's own.
    audience: Option<String>,
    remembered: Mutex<lru::LruCache<CacheKey, (Instant, Decision)>>,
    flights: Mutex<HashMap<CacheKey, Flight>>,
    reviews: Arc<tokio::sync::Semaphore>,
}

/// The Kubernetes verb of an HTTP method on a non-resource URL: the method in lower case, as
/// the API server's own request info has it.
fn verb_of(method: &Method) -> String {
    method.as_str().to_ascii_lowercase()
}

/// True for a token worth a review: not oversized, and made of the characters bearer tokens use
/// (RFC 6750's b64token: letters, digits and `-._~+/=`).
fn shaped_like_a_token(token: &str) -> bool {
    token.len() <= MAX_TOKEN_BYTES
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'='))
}

/// The token of an `Authorization: Bearer …` header.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl MetricsAuth {
    /// Checks callers against the API server `client` talks to; with `audience`, a token must
    /// be issued for it (`--metrics-token-audience`), else for the API server's own audiences.
    pub fn new(client: kube::Client, audience: Option<String>) -> Self {
        Self {
            client,
            audience,
            remembered: Mutex::new(lru::LruCache::new(CACHE_LIMIT)),
            flights: Mutex::new(HashMap::new()),
            reviews: Arc::new(tokio::sync::Semaphore::new(MAX_REVIEWS_IN_FLIGHT)),
        }
    }

    /// Decides one request; `Err` when the caller could not be checked.
    pub async fn decide(&self, headers: &HeaderMap, method: &Method, path: &str) -> Result<Decision, CheckError> {
        let Some(token) = bearer_token(headers) else {
            return Ok(Decision::Unauthenticated("a bearer token is required".to_owned()));
        };
        if !shaped_like_a_token(token) {
            return Ok(Decision::Unauthenticated(format!(
                "a token of {} bytes that is too long or not shaped like a bearer token",
                token.len()
            )));
        }
        let verb = verb_of(method);
        let key: CacheKey = (Sha256::digest(token.as_bytes()).into(), path.to_owned(), verb.clone());
        if let Some(decision) = self.remembered(&key) {
            return Ok(decision);
        }
        // One review per token, path and verb at a time: later callers wait for its answer (if
        // the caller asking goes away, the next waiter asks instead).
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            flights.entry(key.clone()).or_default().clone()
        };
        let answer = flight
            .get_or_init(|| async {
                let Ok(_review) = self.reviews.clone().try_acquire_owned() else {
                    return Err(CheckError::Busy);
                };
                self.ask(token, &verb, path).await.map_err(|error| CheckError::Api(error.to_string()))
            })
            .await
            .clone();
        {
            let mut flights = self.flights.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if flights.get(&key).is_some_and(|current| Arc::ptr_eq(current, &flight)) {
                flights.remove(&key);
            }
        }
        let decision = answer?;
        self.remember(key, decision.clone());
        Ok(decision)
    }

    fn remembered(&self, key: &CacheKey) -> Option<Decision> {
        let mut remembered = self.remembered.lock().ok()?;
        let (at, decision) = remembered.get(key)?;
        (at.elapsed() < decision.ttl()).then(|| decision.clone())
    }

    fn remember(&self, key: CacheKey, decision: Decision) {
        let Ok(mut remembered) = self.remembered.lock() else { return };
        remembered.put(key, (Instant::now(), decision));
    }

    async fn ask(&self, token: &str, verb: &str, path: &str) -> Result<Decision, kube::Error> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_owned(), audiences: self.audience.clone().map(|aud| vec![aud]) },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone()).create(&PostParams::default(), &review).await?;
        let status = reviewed.status.unwrap_or_default();
        // The API server lists the asked-for audiences the token is valid for; one of ours
        // must be there (TokenReview's contract for a client that sets spec.audiences).
        if let Some(audience) = &self.audience
            && status.authenticated == Some(true)
            && !status.audiences.iter().flatten().any(|valid| valid == audience)
        {
            return Ok(Decision::Unauthenticated(format!("the token is not valid for the audience {audience:?}")));
        }
        let user = match (status.authenticated, status.user) {
            (Some(true), Some(user)) => user,
            _ => {
                let reason = status.error.filter(|e| !e.is_empty()).unwrap_or_else(|| "the token is not valid".into());
                return Ok(Decision::Unauthenticated(reason));
            }
        };
        let username = user.username.clone().unwrap_or_default();
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                uid: user.uid,
                groups: user.groups,
                extra: user.extra.map(|extra| extra.into_iter().collect::<BTreeMap<_, _>>()),
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(path.to_owned()),
                    verb: Some(verb.to_owned()),
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let reviewed =
            Api::<SubjectAccessReview>::all(self.client.clone()).create(&PostParams::default(), &access).await?;
        let status = reviewed.status.unwrap_or_default();
        if status.allowed {
            return Ok(Decision::Allowed);
        }
        let mut reason = format!("{username} may not {verb} {path}");
        if let Some(detail) = status.reason.filter(|r| !r.is_empty()) {
            reason.push_str(&format!(": {detail}"));
        }
        Ok(Decision::Forbidden(reason))
    }
}

/// Axum middleware: passes allowed requests on, answers 401, 403 or (when the caller cannot be
/// checked) 503 with a generic body; the reason goes to the log, never to the caller.
pub async fn require_authorized(State(auth): State<Arc<MetricsAuth>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    match auth.decide(request.headers(), request.method(), &path).await {
        Ok(Decision::Allowed) => next.run(request).await,
        Ok(Decision::Unauthenticated(reason)) => {
            tracing::debug!(%path, %reason, "metrics request unauthenticated");
            (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "Unauthorized\n").into_response()
        }
        Ok(Decision::Forbidden(reason)) => {
            tracing::info!(%path, %reason, "metrics request forbidden");
            (StatusCode::FORBIDDEN, "Forbidden\n").into_response()
        }
        Err(error) => {
            tracing::warn!(%path, %error, "cannot check a metrics caller");
            (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable\n").into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Ok(value) = authorization.parse() {
            headers.insert(header::AUTHORIZATION, value);
        }
        headers
    }

    #[test]
    fn only_a_non_empty_bearer_token_is_taken() {
        assert_eq!(bearer_token(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&headers("bearer  abc ")), Some("abc"));
        assert_eq!(bearer_token(&headers("Basic abc")), None);
        assert_eq!(bearer_token(&headers("Bearer ")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn only_tokens_of_a_bearer_tokens_shape_and_size_are_reviewed() {
        assert!(shaped_like_a_token("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln-_~+/="));
        assert!(!shaped_like_a_token("a token with spaces"));
        assert!(!shaped_like_a_token("quote\"d"));
        assert!(!shaped_like_a_token(&"a".repeat(MAX_TOKEN_BYTES + 1)));
        assert!(shaped_like_a_token(&"a".repeat(MAX_TOKEN_BYTES)));
    }

    /// An API server that counts TokenReviews and takes `delay` to answer each, approving every
    /// token (and every access).
    fn api_server(reviews: Arc<std::sync::atomic::AtomicUsize>, delay: Duration) -> kube::Client {
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let reviews = reviews.clone();
            async move {
                let body = if request.uri().path().ends_with("/tokenreviews") {
                    reviews.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    r#"{"apiVersion":"authentication.k8s.io/v1","kind":"TokenReview","spec":{},"status":{"authenticated":true,"user":{"username":"scraper"}}}"#
                } else {
                    r#"{"apiVersion":"authorization.k8s.io/v1","kind":"SubjectAccessReview","spec":{},"status":{"allowed":true}}"#
                };
                Ok::<_, std::convert::Infallible>(http::Response::new(body.to_owned()))
            }
        });
        kube::Client::new(service, "default")
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_with_one_token_share_one_review_and_reviews_are_capped() {
        let reviews = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let auth = Arc::new(MetricsAuth::new(api_server(reviews.clone(), Duration::from_secs(1)), None));
        let same: Vec<_> = (0..50)
            .map(|_| {
                let auth = auth.clone();
                tokio::spawn(async move { auth.decide(&headers("Bearer same"), &Method::GET, "/metrics").await })
            })
            .collect();
        for request in same {
            assert!(matches!(request.await, Ok(Ok(Decision::Allowed))));
        }
        assert_eq!(reviews.load(std::sync::atomic::Ordering::SeqCst), 1, "one review for fifty requests");

        let distinct: Vec<_> = (0..100)
            .map(|index| {
                let auth = auth.clone();
                tokio::spawn(async move {
                    auth.decide(&headers(&format!("Bearer token-{index}")), &Method::GET, "/metrics").await
                })
            })
            .collect();
        let mut busy = 0;
        for request in distinct {
            if matches!(request.await, Ok(Err(CheckError::Busy))) {
                busy += 1;
            }
        }
        assert_eq!(busy, 100 - MAX_REVIEWS_IN_FLIGHT, "the rest are answered 503 at once");
        assert_eq!(reviews.load(std::sync::atomic::Ordering::SeqCst), 1 + MAX_REVIEWS_IN_FLIGHT);
    }

    #[tokio::test]
    async fn a_flood_of_new_tokens_never_evicts_the_scrapers_decision() {
        let reviews = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let auth = MetricsAuth::new(api_server(reviews.clone(), Duration::ZERO), None);
        let scraper = headers("Bearer scraper");
        assert_eq!(auth.decide(&scraper, &Method::GET, "/metrics").await.ok(), Some(Decision::Allowed));
        for index in 0..(2 * CACHE_LIMIT.get()) {
            let _ = auth.decide(&headers(&format!("Bearer flood-{index}")), &Method::GET, "/metrics").await;
            if index % 100 == 0 {
                // The scraper keeps scraping meanwhile.
                assert_eq!(auth.decide(&scraper, &Method::GET, "/metrics").await.ok(), Some(Decision::Allowed));
            }
        }
        let before = reviews.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(auth.decide(&scraper, &Method::GET, "/metrics").await.ok(), Some(Decision::Allowed));
        assert_eq!(reviews.load(std::sync::atomic::Ordering::SeqCst), before, "the scraper's decision is still cached");
    }

    /// An API server that asserts each TokenReview asks for the audience `metrics` and answers
    /// that only the token `for-metrics` is valid for it (others authenticate, for another audience).
    fn audience_checking_api_server() -> kube::Client {
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| async move {
            let is_review = request.uri().path().ends_with("/tokenreviews");
            let body = request.into_body().collect_bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            let asked: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let body = if is_review {
                assert_eq!(
                    asked["spec"]["audiences"],
                    serde_json::json!(["metrics"]),
                    "the review asks for the audience"
                );
                let audiences =
                    if asked["spec"]["token"] == "for-metrics" { "metrics" } else { "https://kubernetes.default.svc" };
                format!(
                    r#"{{"apiVersion":"authentication.k8s.io/v1","kind":"TokenReview","spec":{{}},"status":{{"authenticated":true,"audiences":["{audiences}"],"user":{{"username":"scraper"}}}}}}"#
                )
            } else {
                r#"{"apiVersion":"authorization.k8s.io/v1","kind":"SubjectAccessReview","spec":{},"status":{"allowed":true}}"#.to_owned()
            };
            Ok::<_, std::convert::Infallible>(http::Response::new(body))
        });
        kube::Client::new(service, "default")
    }

    #[tokio::test]
    async fn with_an_audience_only_tokens_issued_for_it_are_accepted() {
        let auth = MetricsAuth::new(audience_checking_api_server(), Some("metrics".to_owned()));
        let decision = auth.decide(&headers("Bearer for-metrics"), &Method::GET, "/metrics").await.ok();
        assert_eq!(decision, Some(Decision::Allowed));
        let decision = auth.decide(&headers("Bearer for-the-api-server"), &Method::GET, "/metrics").await.ok();
        assert!(matches!(decision, Some(Decision::Unauthenticated(_))), "{decision:?}");
    }

    #[test]
    fn methods_map_to_kubernetes_verbs() {
        assert_eq!(verb_of(&Method::GET), "get");
        assert_eq!(verb_of(&Method::HEAD), "head");
        assert_eq!(verb_of(&Method::POST), "post");
    }
}
