//! Who may read `/metrics` when it is served securely: the caller's bearer token is
//! authenticated by the API server (TokenReview) and the user it names is authorized for the
//! request's verb on the non-resource URL (SubjectAccessReview), as controller-runtime's
//! authentication/authorization filter does. Answers are cached briefly, so a scrape costs no API
//! call; a failure to ask is never cached. Probes never pass through here.

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
/// Above this many remembered callers, expired ones are dropped.
const CACHE_LIMIT: usize = 1024;

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

/// Authenticates and authorizes requests through the API server.
pub struct MetricsAuth {
    client: kube::Client,
    remembered: Mutex<HashMap<CacheKey, (Instant, Decision)>>,
}

/// The Kubernetes verb of an HTTP method on a non-resource URL: the method in lower case, as
/// the API server's own request info has it.
fn verb_of(method: &Method) -> String {
    method.as_str().to_ascii_lowercase()
}

/// The token of an `Authorization: Bearer …` header.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl MetricsAuth {
    pub fn new(client: kube::Client) -> Self {
        Self { client, remembered: Mutex::new(HashMap::new()) }
    }

    /// Decides one request; `Err` when the API server could not be asked.
    pub async fn decide(&self, headers: &HeaderMap, method: &Method, path: &str) -> Result<Decision, kube::Error> {
        let Some(token) = bearer_token(headers) else {
            return Ok(Decision::Unauthenticated("a bearer token is required".to_owned()));
        };
        let verb = verb_of(method);
        let key: CacheKey = (Sha256::digest(token.as_bytes()).into(), path.to_owned(), verb.clone());
        if let Some(decision) = self.remembered(&key) {
            return Ok(decision);
        }
        let decision = self.ask(token, &verb, path).await?;
        self.remember(key, decision.clone());
        Ok(decision)
    }

    fn remembered(&self, key: &CacheKey) -> Option<Decision> {
        let remembered = self.remembered.lock().ok()?;
        let (at, decision) = remembered.get(key)?;
        (at.elapsed() < decision.ttl()).then(|| decision.clone())
    }

    fn remember(&self, key: CacheKey, decision: Decision) {
        let Ok(mut remembered) = self.remembered.lock() else { return };
        if remembered.len() >= CACHE_LIMIT {
            remembered.retain(|_, (at, decision)| at.elapsed() < decision.ttl());
            if remembered.len() >= CACHE_LIMIT {
                remembered.clear();
            }
        }
        remembered.insert(key, (Instant::now(), decision));
    }

    async fn ask(&self, token: &str, verb: &str, path: &str) -> Result<Decision, kube::Error> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_owned(), audiences: None },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone()).create(&PostParams::default(), &review).await?;
        let status = reviewed.status.unwrap_or_default();
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

/// Axum middleware: passes allowed requests on, answers 401, 403 or (when the API server cannot
/// be asked) 503 with the reason.
pub async fn require_authorized(State(auth): State<Arc<MetricsAuth>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    match auth.decide(request.headers(), request.method(), &path).await {
        Ok(Decision::Allowed) => next.run(request).await,
        Ok(Decision::Unauthenticated(reason)) => {
            tracing::debug!(%path, %reason, "metrics request unauthenticated");
            (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], format!("Unauthorized: {reason}\n"))
                .into_response()
        }
        Ok(Decision::Forbidden(reason)) => {
            tracing::debug!(%path, %reason, "metrics request forbidden");
            (StatusCode::FORBIDDEN, format!("Forbidden: {reason}\n")).into_response()
        }
        Err(error) => {
            tracing::warn!(%path, %error, "cannot check a metrics caller with the API server");
            (StatusCode::SERVICE_UNAVAILABLE, format!("cannot check the caller with the API server: {error}\n"))
                .into_response()
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
    fn methods_map_to_kubernetes_verbs() {
        assert_eq!(verb_of(&Method::GET), "get");
        assert_eq!(verb_of(&Method::HEAD), "head");
        assert_eq!(verb_of(&Method::POST), "post");
    }
}
