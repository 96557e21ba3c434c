//! Kubernetes clients of the operator: who they say they are and how long they wait.
//!
//! Every request names this replica in its User-Agent (`example-operator/<version> (<identity>)`),
//! so the API server's audit log and metrics tell replicas apart. Every request has a connect
//! timeout and a read timeout: a request that is not a watch must get its response headers, and
//! then each piece of its body, within the request timeout; a watch may stay silent for longer
//! than the server's own watch timeout, so idle watches are never cut. The election gets a client
//! of its own (its own connections), so slow controller traffic never delays a renewal.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use http::header::{HeaderValue, USER_AGENT};
use kube::Client;

/// How long any connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection-level read timeout: longer than the server-side watch timeout kube-runtime's
/// watcher asks for (290 s) plus its own idle margin, so an idle watch is never cut here.
pub const WATCH_READ_TIMEOUT: Duration = Duration::from_secs(330);

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

/// A client for `config` that names `identity`, applies the timeouts above with
/// `request_timeout` for requests that are not watches, and counts its requests in `metrics`.
pub fn build(
    mut config: kube::Config,
    identity: &str,
    request_timeout: Duration,
    metrics: &reconcilers::Metrics,
) -> Result<Client> {
    let agent = HeaderValue::from_str(&user_agent(identity))
        .with_context(|| format!("the identity {identity:?} cannot be sent in a User-Agent header"))?;
    config.headers.retain(|(name, _)| name != USER_AGENT);
    config.headers.push((USER_AGENT, agent));
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.read_timeout = Some(WATCH_READ_TIMEOUT);
    config.write_timeout = Some(request_timeout);
    let host = config.cluster_url.host().unwrap_or_default().to_owned();
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&metrics.rest_client_layer(host))
        .with_layer(&RequestTimeoutLayer { timeout: request_timeout })
        .build())
}

/// True for a watch request (`?watch=true` or `?watch=1`), whose body may be silent for minutes.
fn is_watch<B>(request: &http::Request<B>) -> bool {
    request.uri().query().is_some_and(|query| query.split('&').any(|pair| pair == "watch=true" || pair == "watch=1"))
}

/// Bounds how long a request waits for its response headers and, unless it is a watch, for
/// each piece of its body: a half-open connection fails the request instead of hanging it.
#[derive(Clone, Copy, Debug)]
pub struct RequestTimeoutLayer {
    /// The bound.
    pub timeout: Duration,
}

impl<S> tower::Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestTimeout { inner, timeout: self.timeout }
    }
}

/// The service made by [`RequestTimeoutLayer`].
#[derive(Clone, Debug)]
pub struct RequestTimeout<S> {
    inner: S,
    timeout: Duration,
}

/// The error of a request that timed out.
#[derive(Debug, thiserror::Error)]
#[error("no response from the API server within {0:?}")]
pub struct TimedOut(pub Duration);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
        let response = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(timeout, response).await {
                Ok(Ok(response)) => Ok(response.map(|body| IdleTimeoutBody::new(body, idle))),
                Ok(Err(error)) => Err(error.into()),
                Err(_) => Err(Box::new(TimedOut(timeout)) as BoxError),
            }
        })
    }
}

/// A response body that fails when no piece of it arrives within its timeout (`None`: waits
/// as long as the connection's read timeout allows).
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
        let mut service = RequestTimeoutLayer { timeout: Duration::from_secs(5) }.layer(service);
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
}
