//! An in-memory Lease endpoint for unit tests: answers GET, POST and PUT of one Lease as the
//! API server does (409 on a stale resourceVersion or an existing name), so the election's logic
//! can be tested on tokio's paused clock. The end-to-end tests use the real API server.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff;
use kube::Client;
use prometheus::Registry;
use serde_json::json;

use super::{Elector, LeaderMetrics, holder};
use crate::config::ElectionConfig;
use crate::health::Health;

pub const LEASE: &str = "test-leader";

pub type Hook = Box<dyn FnMut(&mut Option<Lease>) + Send>;

/// One Lease in memory, answering GET, POST and PUT as the API server does (409 on a stale
/// resourceVersion or an existing name). Lists and watches fail, so the elector polls.
#[derive(Default)]
pub struct FakeLeases {
    pub lease: Option<Lease>,
    pub revision: u64,
    /// Runs before a PUT is judged: another writer's request landing first.
    pub before_put: Option<Hook>,
    /// Requests never answer while set (a black-holed connection).
    pub silent: bool,
    /// `(method, holder written)` of every successful write.
    pub writes: Vec<(String, String)>,
}

impl FakeLeases {
    pub fn store(&mut self, mut lease: Lease) -> Lease {
        self.revision += 1;
        lease.metadata.resource_version = Some(self.revision.to_string());
        self.lease = Some(lease.clone());
        lease
    }
}

fn status(code: u16, reason: &str) -> http::Response<String> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": reason, "reason": reason, "code": code});
    http::Response::builder().status(code).body(body.to_string()).unwrap_or_default()
}

fn ok(lease: &Lease) -> http::Response<String> {
    http::Response::new(serde_json::to_string(lease).unwrap_or_default())
}

async fn handle(fake: Arc<Mutex<FakeLeases>>, request: http::Request<kube::client::Body>) -> http::Response<String> {
    let (parts, body) = request.into_parts();
    let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    if fake.lock().map(|f| f.silent).unwrap_or(false) {
        std::future::pending::<()>().await;
    }
    let Ok(mut fake) = fake.lock() else { return status(500, "InternalError") };
    let path = parts.uri.path();
    let named = path.ends_with(&format!("/leases/{LEASE}"));
    let sent: Option<Lease> = serde_json::from_slice(&bytes).ok();
    match (parts.method.as_str(), named, sent) {
        ("GET", true, _) => fake.lease.as_ref().map_or_else(|| status(404, "NotFound"), ok),
        ("POST", false, Some(lease)) => {
            if fake.lease.is_some() {
                return status(409, "AlreadyExists");
            }
            let holder = holder(&lease).to_owned();
            let stored = fake.store(lease);
            fake.writes.push(("POST".into(), holder));
            ok(&stored)
        }
        ("PUT", true, Some(lease)) => {
            if let Some(mut hook) = fake.before_put.take() {
                hook(&mut fake.lease);
                fake.revision += 1;
                let revision = fake.revision.to_string();
                if let Some(current) = fake.lease.as_mut() {
                    current.metadata.resource_version = Some(revision);
                }
            }
            let current = fake.lease.as_ref().and_then(|l| l.metadata.resource_version.clone());
            if current.is_none() {
                return status(404, "NotFound");
            }
            if lease.metadata.resource_version != current {
                return status(409, "Conflict");
            }
            let holder = holder(&lease).to_owned();
            let stored = fake.store(lease);
            fake.writes.push(("PUT".into(), holder));
            ok(&stored)
        }
        _ => status(500, "InternalError"),
    }
}

pub fn fake_client(fake: &Arc<Mutex<FakeLeases>>) -> Client {
    let fake = fake.clone();
    let service = tower::service_fn(move |request| {
        let fake = fake.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(fake, request).await) }
    });
    Client::new(service, "default")
}

/// Lease 4 s, renew deadline 3 s, retry 0.5 s, as the end-to-end tests use.
pub fn config(identity: &str) -> ElectionConfig {
    ElectionConfig {
        lease_name: LEASE.into(),
        lease_namespace: Some("default".into()),
        identity: identity.into(),
        lease_duration: Duration::from_secs(4),
        renew_deadline: Duration::from_secs(3),
        retry_period: Duration::from_millis(500),
        request_timeout: Duration::from_millis(1500),
        reenter_on_loss: false,
    }
}

pub fn elector(fake: &Arc<Mutex<FakeLeases>>, identity: &str) -> Result<Elector, prometheus::Error> {
    let metrics = LeaderMetrics::register(&Registry::new())?;
    Ok(Elector::new(fake_client(fake), "default", config(identity), metrics, Arc::new(Health::new(None))))
}

/// A Lease held by `holder` whose renewTime is `renewed` (any clock's idea of "now").
pub fn held_by(holder: &str, renewed: jiff::Timestamp) -> Lease {
    Lease {
        metadata: ObjectMeta { name: Some(LEASE.into()), namespace: Some("default".into()), ..Default::default() },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(4),
            acquire_time: Some(MicroTime(renewed)),
            renew_time: Some(MicroTime(renewed)),
            lease_transitions: Some(3),
            ..Default::default()
        }),
    }
}

pub fn lease_in(fake: &Arc<Mutex<FakeLeases>>) -> Option<Lease> {
    fake.lock().ok().and_then(|f| f.lease.clone())
}

pub fn holder_in(fake: &Arc<Mutex<FakeLeases>>) -> String {
    lease_in(fake).as_ref().map(|l| holder(l).to_owned()).unwrap_or_default()
}

pub fn seed(fake: &Arc<Mutex<FakeLeases>>, lease: Lease) {
    if let Ok(mut fake) = fake.lock() {
        fake.store(lease);
    }
}
