//! Kubernetes clients of the operator: who they say they are and how long they wait.
//!
//! Every request names this replica in its User-Agent (`example-operator/<version> (<identity>)`),
//! so the API server's audit log and metrics tell replicas apart. Every request has a connect
//! timeout, and every request that is not a watch must get its response headers, and then each
//! piece of its body, within the request timeout, retries included: kube's retries of 429, 503
//! and 504 (honouring Retry-After) run inside that bound, and each attempt is counted in
//! `rest_client_requests_total` with its own code. Watches have no read timeout here: kube-runtime's
//! watcher reconnects a watch that stays silent past the server's watch timeout plus a margin,
//! so an idle watch is never cut and a dead one never hangs. The election gets a client of its
//! own (its own connections), so slow controller traffic never delays a renewal.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use http::header::{HeaderValue, USER_AGENT};
use kube::Client;
use kube::client::retry::RetryPolicy;

use crate::election::TermDeadline;

/// How long any connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests waiting for the one connection pool at once (a tower buffer): beyond it, callers wait.
const REQUEST_BUFFER: usize = 1024;

/// The User-Agent of this replica: the program, its version, and the replica's identity.
pub fn user_agent(identity: &str) -> String {
    format!("example-operator/{} ({identity})", env!("CARGO_PKG_VERSION"))
}

/// Reads a kubeconfig file, or the in-cluster configuration when `path` is `None`.
pub async fn kube_config(path: Option<&Path>) -> Result<kube::Config> {
    match path {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Ok(kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?)
        }
        None => kube::Config::infer().await.context("no kubeconfig and no in-cluster configuration"),
    }
}

/// A client for `config` that names `identity`, bounds every request that is not a watch by
/// `request_timeout` (retries included), and every write also by the end of this replica's
/// leadership term when `term` is given, and counts every attempt in `metrics`.
///
/// From the inside out: kube's connection stack (TLS, auth, User-Agent) without its own retry
/// layer; the request metrics, so each attempt is counted; kube's server-aware retry policy
/// (429/503/504, Retry-After); the request timeout around all of it, so no request is retried
/// past its deadline.
pub fn build(
    mut config: kube::Config,
    identity: &str,
    request_timeout: Duration,
    term: Option<Arc<TermDeadline>>,
    metrics: &reconcilers::Metrics,
) -> Result<Client> {
    let agent = HeaderValue::from_str(&user_agent(identity))
        .with_context(|| format!("the identity {identity:?} cannot be sent in a User-Agent header"))?;
    config.headers.retain(|(name, _)| name != USER_AGENT);
    config.headers.push((USER_AGENT, agent));
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    // kube 5's default: no connection read timeout (it would count a pooled connection's idle
    // time against the next response); the layer below bounds every request that is not a watch.
    config.read_timeout = None;
    config.write_timeout = Some(request_timeout);
    // Retried below, outside the metrics layer, so each attempt is counted.
    config.default_retry = false;
    let host = config.cluster_url.host().unwrap_or_default().to_owned();
    Ok(with_request_layers(
        kube::client::ClientBuilder::try_from(config)?,
        metrics.rest_client_layer(host),
        RequestTimeoutLayer { timeout: request_timeout, term },
    ))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The layers [`build`] puts around kube's connection stack `base`: metrics per attempt, retries,
/// the request timeout.
fn with_request_layers<S>(
    base: kube::client::ClientBuilder<S>,
    metrics: reconcilers::metrics::RestClientMetricsLayer,
    timeout: RequestTimeoutLayer,
) -> Client
where
    S: tower::Service<http::Request<kube::client::Body>, Response = http::Response<Box<kube::client::DynBody>>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + Sync,
{
    base.with_layer(&metrics)
        .with_layer(&tower::buffer::BufferLayer::new(REQUEST_BUFFER))
        .with_layer(&tower::retry::RetryLayer::new(CountedRetries {
            policy: RetryPolicy::server_retry(),
            retries: metrics.retries(),
        }))
        .with_layer(&timeout)
        .build()
}

/// kube's retry policy, counting each retry in `rest_client_request_retries_total` with the
/// code that caused it (client-go counts its retries the same way).
#[derive(Clone)]
struct CountedRetries {
    policy: RetryPolicy,
    retries: reconcilers::metrics::RetryCounter,
}

impl<Res> tower::retry::Policy<http::Request<kube::client::Body>, http::Response<Res>, BoxError> for CountedRetries {
    type Future =
        <RetryPolicy as tower::retry::Policy<http::Request<kube::client::Body>, http::Response<Res>, BoxError>>::Future;

    fn retry(
        &mut self,
        request: &mut http::Request<kube::client::Body>,
        result: &mut Result<http::Response<Res>, BoxError>,
    ) -> Option<Self::Future> {
        let code = match result {
            Ok(response) => response.status().as_str().to_owned(),
            Err(_) => "<error>".to_owned(),
        };
        let retry = self.policy.retry(request, result)?;
        self.retries.count(&code, request.method().as_str());
        Some(retry)
    }

    fn clone_request(
        &mut self,
        request: &http::Request<kube::client::Body>,
    ) -> Option<http::Request<kube::client::Body>> {
        <RetryPolicy as tower::retry::Policy<http::Request<kube::client::Body>, http::Response<Res>, BoxError>>::clone_request(&mut self.policy, request)
    }
}

/// True for a watch request (`?watch=true` or `?watch=1`), whose body may be silent for minutes.
fn is_watch<B>(request: &http::Request<B>) -> bool {
    request.uri().query().is_some_and(|query| query.split('&').any(|pair| pair == "watch=true" || pair == "watch=1"))
}

/// True for a request that writes (anything but GET, HEAD and OPTIONS, and the reviews a
/// `create` asks without storing anything).
fn is_write<B>(request: &http::Request<B>) -> bool {
    let reads = matches!(*request.method(), http::Method::GET | http::Method::HEAD | http::Method::OPTIONS);
    let review = ["/tokenreviews", "/subjectaccessreviews"].iter().any(|r| request.uri().path().ends_with(r));
    !reads && !review
}

/// Bounds how long a request waits for its response headers and, unless it is a watch, for
/// each piece of its body: a half-open connection fails the request instead of hanging it. A
/// write is also given up at the end of the leadership term, when `term` is set: a write of this
/// term never waits past the moment a successor could take over.
#[derive(Clone, Debug)]
pub struct RequestTimeoutLayer {
    /// The bound.
    pub timeout: Duration,
    /// The current term's end, for writes.
    pub term: Option<Arc<TermDeadline>>,
}

impl<S> tower::Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestTimeout { inner, timeout: self.timeout, term: self.term.clone() }
    }
}

/// The service made by [`RequestTimeoutLayer`].
#[derive(Clone, Debug)]
pub struct RequestTimeout<S> {
    inner: S,
    timeout: Duration,
    term: Option<Arc<TermDeadline>>,
}

/// The error of a request that timed out.
#[derive(Debug, thiserror::Error)]
#[error("no response from the API server within {0:?}")]
pub struct TimedOut(pub Duration);

/// A write of a term in flight; counted as abandoned in the term when dropped unanswered.
struct UnansweredWrite {
    term: Arc<TermDeadline>,
    answered: bool,
}

impl Drop for UnansweredWrite {
    fn drop(&mut self) {
        if !self.answered {
            self.term.abandoned_write();
        }
    }
}

/// The error of a write given up when the leadership term it belongs to ended.
#[derive(Debug, thiserror::Error)]
#[error("gave up the write at the renew deadline of the leadership it was sent under")]
pub struct TermEnded;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RequestTimeout<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<IdleTimeoutBody<ResBody>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let timeout = self.timeout;
        let idle = (!is_watch(&request)).then_some(timeout);
        let request_deadline = tokio::time::Instant::now() + timeout;
        let term = self.term.clone().filter(|term| is_write(&request) && term.get().is_some());
        let term_end = term.as_ref().and_then(|term| term.get());
        let cut_by_term = term_end.is_some_and(|end| end < request_deadline);
        let deadline = term_end.map_or(request_deadline, |end| end.min(request_deadline));
        // A write of a term that is given up unanswered (timed out here, or dropped with its
        // reconcile) is counted: its bytes may still reach the API server.
        let mut unanswered = term.map(|term| UnansweredWrite { term, answered: false });
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = match tokio::time::timeout_at(deadline, response).await {
                Ok(Ok(response)) => response,
                // Failed on its connection: the server may still have it, so it stays unanswered.
                Ok(Err(error)) => return Err(error.into()),
                Err(_) if cut_by_term => return Err(Box::new(TermEnded) as BoxError),
                Err(_) => return Err(Box::new(TimedOut(timeout)) as BoxError),
            };
            // Answered: nothing of it is left on the wire.
            if let Some(write) = unanswered.as_mut() {
                write.answered = true;
            }
            Ok(response.map(|body| IdleTimeoutBody::new(body, idle)))
        })
    }
}

/// A response body that fails when no piece of it arrives within its timeout (`None`: a watch,
/// which waits as long as the watcher's own idle timeout allows).
pub struct IdleTimeoutBody<B> {
    inner: Pin<Box<B>>,
    timeout: Option<Duration>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> IdleTimeoutBody<B> {
    fn new(inner: B, timeout: Option<Duration>) -> Self {
        Self { inner: Box::pin(inner), timeout, sleep: None }
    }
}

impl<B> http_body::Body for IdleTimeoutBody<B>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep = None;
                Poll::Ready(frame.map(|result| result.map_err(Into::into)))
            }
            Poll::Pending => {
                let Some(timeout) = this.timeout else { return Poll::Pending };
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.sleep = None;
                        Poll::Ready(Some(Err(Box::new(TimedOut(timeout)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::{Layer, Service, ServiceExt};

    fn request(uri: &str) -> http::Request<()> {
        http::Request::get(uri).body(()).unwrap_or_default()
    }

    #[test]
    fn watches_are_told_apart_from_other_requests() {
        assert!(is_watch(&request("/api/v1/configmaps?watch=true&timeoutSeconds=290")));
        assert!(is_watch(&request("/api/v1/configmaps?labelSelector=a&watch=1")));
        assert!(!is_watch(&request("/api/v1/configmaps?labelSelector=watch%3Dtrue")));
        assert!(!is_watch(&request("/api/v1/namespaces/a/configmaps/b")));
    }

    #[test]
    fn the_user_agent_names_the_replica() {
        assert_eq!(user_agent("pod-0"), format!("example-operator/{} (pod-0)", env!("CARGO_PKG_VERSION")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_without_response_headers_times_out() {
        let service = tower::service_fn(|_: http::Request<()>| async {
            std::future::pending::<Result<http::Response<String>, BoxError>>().await
        });
        let mut service = RequestTimeoutLayer { timeout: Duration::from_secs(5), term: None }.layer(service);
        let result = service.ready().await.map(|s| s.call(request("/api/v1/namespaces"))).map_err(|e| e.to_string());
        let error = match result {
            Ok(future) => future.await.err().map(|e| e.to_string()),
            Err(error) => Some(error),
        };
        assert_eq!(error.as_deref(), Some("no response from the API server within 5s"));
    }

    /// A body that never yields.
    struct SilentBody;

    impl http_body::Body for SilentBody {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_body_times_out_unless_it_is_a_watch() {
        let mut body = IdleTimeoutBody::new(SilentBody, Some(Duration::from_secs(5)));
        let frame = body.frame().await;
        assert!(matches!(frame, Some(Err(ref e)) if e.to_string().contains("within 5s")));

        let mut watch = IdleTimeoutBody::new(SilentBody, None);
        let waited = tokio::time::timeout(Duration::from_secs(3600), watch.frame()).await;
        assert!(waited.is_err(), "a watch body may stay silent");
    }

    /// An API server that answers each request with the next of `codes` (200 once they run out),
    /// a Retry-After of `retry_after` seconds on every 429.
    fn api_server(
        codes: Vec<u16>,
        retry_after: &'static str,
    ) -> impl tower::Service<
        http::Request<kube::client::Body>,
        Response = http::Response<Box<kube::client::DynBody>>,
        Error = BoxError,
        Future = impl Future<Output = Result<http::Response<Box<kube::client::DynBody>>, BoxError>> + Send,
    > + Send
    + 'static {
        let codes = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::from(codes)));
        tower::service_fn(move |_: http::Request<kube::client::Body>| {
            let code = codes.lock().map(|mut codes| codes.pop_front().unwrap_or(200)).unwrap_or(500);
            async move {
                let body = http_body_util::Full::new(bytes::Bytes::from_static(b"ok"))
                    .map_err(|never: std::convert::Infallible| -> BoxError { match never {} });
                let mut response = http::Response::new(Box::new(body) as Box<kube::client::DynBody>);
                *response.status_mut() = http::StatusCode::from_u16(code)?;
                if code == 429 {
                    response.headers_mut().insert("Retry-After", HeaderValue::from_static(retry_after));
                }
                Ok::<_, BoxError>(response)
            }
        })
    }

    /// The 5 s request timeout, with the writes of a term ending at `term_end` when given.
    fn timeout(term_end: Option<Duration>) -> RequestTimeoutLayer {
        let term = term_end.map(|end| {
            let term = Arc::new(TermDeadline::default());
            term.set_for_test(Some(tokio::time::Instant::now() + end));
            term
        });
        RequestTimeoutLayer { timeout: Duration::from_secs(5), term }
    }

    /// Writes of a term are given up when it ends (here 2 s, before the 5 s request timeout);
    /// reads are not bound by it.
    #[tokio::test(start_paused = true)]
    async fn a_write_is_given_up_when_its_term_ends_and_a_read_is_not() -> Result<()> {
        let metrics = reconcilers::Metrics::new()?;
        let base = kube::client::ClientBuilder::new(api_server(vec![429; 100], "1"), "default");
        let client = with_request_layers(base, metrics.rest_client_layer("api"), timeout(Some(Duration::from_secs(2))));
        let started = tokio::time::Instant::now();
        let write = http::Request::post("/api/v1/namespaces/a/configmaps").body(b"{}".to_vec())?;
        let error = client.request_text(write).await.err().map(|e| e.to_string());
        assert!(error.as_deref().is_some_and(|e| e.contains("renew deadline of the leadership")), "{error:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(2));

        let started = tokio::time::Instant::now();
        let error = client.request_text(get("/api/v1/namespaces")?).await.err().map(|e| e.to_string());
        assert!(error.as_deref().is_some_and(|e| e.contains("within 5s")), "{error:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        Ok(())
    }

    /// Writes of a term given up unanswered are counted (their bytes may still be on the wire);
    /// answered writes, reads and writes outside a term are not.
    #[tokio::test(start_paused = true)]
    async fn writes_given_up_unanswered_are_counted_in_their_term() -> Result<()> {
        let metrics = reconcilers::Metrics::new()?;
        let layer = timeout(Some(Duration::from_secs(2)));
        let term = layer.term.clone().ok_or_else(|| anyhow::anyhow!("a term"))?;
        let post = || http::Request::post("/api/v1/namespaces/a/configmaps").body(b"{}".to_vec());
        let answered = kube::client::ClientBuilder::new(api_server(vec![], "0"), "default");
        let answered = with_request_layers(answered, metrics.rest_client_layer("api"), layer.clone());
        answered.request_text(post()?).await?;
        answered.request_text(get("/api/v1/namespaces")?).await?;
        assert_eq!(term.last_abandoned_write(), None);

        let throttled = kube::client::ClientBuilder::new(api_server(vec![429; 100], "1"), "default");
        let throttled = with_request_layers(throttled, metrics.rest_client_layer("api"), layer);
        assert!(throttled.request_text(post()?).await.is_err());
        assert_eq!(term.last_abandoned_write(), Some(tokio::time::Instant::now()), "given up at the term's bound");
        term.set_for_test(Some(tokio::time::Instant::now() + Duration::from_secs(60)));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let dropped = tokio::time::timeout(Duration::from_millis(500), throttled.request_text(post()?)).await;
        assert!(dropped.is_err());
        assert_eq!(term.last_abandoned_write(), Some(tokio::time::Instant::now()), "dropped with its caller");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let read = tokio::time::timeout(Duration::from_millis(500), throttled.request_text(get("/api/v1/namespaces")?));
        assert!(read.await.is_err());
        let last = term.last_abandoned_write().ok_or_else(|| anyhow::anyhow!("a write given up"))?;
        assert_eq!(last.elapsed(), Duration::from_millis(1500), "a read is not a write");
        Ok(())
    }

    fn get(path: &str) -> Result<http::Request<Vec<u8>>> {
        Ok(http::Request::get(path).body(Vec::new())?)
    }

    #[tokio::test]
    async fn a_throttled_request_is_retried_and_each_attempt_is_counted() -> Result<()> {
        let metrics = reconcilers::Metrics::new()?;
        let base = kube::client::ClientBuilder::new(api_server(vec![429, 429], "0"), "default");
        let client = with_request_layers(base, metrics.rest_client_layer("api"), timeout(None));
        assert_eq!(client.request_text(get("/api/v1/namespaces")?).await?, "ok");
        assert_eq!(metrics.request_summary(), "GET 200: 1, GET 429: 2");
        let text = metrics.text()?;
        let retries = text.lines().find(|l| l.starts_with("rest_client_request_retries_total{"));
        assert_eq!(retries, Some(r#"rest_client_request_retries_total{code="429",host="api",verb="GET"} 2"#));
        let timed = text.lines().find(|l| l.starts_with("rest_client_request_duration_seconds_count{"));
        assert_eq!(timed, Some(r#"rest_client_request_duration_seconds_count{host="api",verb="GET"} 3"#));
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn no_request_is_retried_past_its_deadline() -> Result<()> {
        let metrics = reconcilers::Metrics::new()?;
        // Throttled for good, each time told to come back in 2 s.
        let base = kube::client::ClientBuilder::new(api_server(vec![429; 100], "2"), "default");
        let client = with_request_layers(base, metrics.rest_client_layer("api"), timeout(None));
        let started = tokio::time::Instant::now();
        let error = client.request_text(get("/api/v1/namespaces")?).await.err().map(|e| e.to_string());
        assert!(error.as_deref().is_some_and(|e| e.contains("within 5s")), "{error:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(5), "the request ends at its deadline");
        // Attempts at 0, 2 and 4 s; none after the deadline.
        assert_eq!(metrics.request_summary(), "GET 429: 3");
        Ok(())
    }
}
