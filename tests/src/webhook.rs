//! A validating admission webhook served by the test process over HTTPS on loopback, so a test
//! can decide, request by request, what the API server lets through and when: hold one writer's
//! request while another writer changes the object, or answer one namespace later than the others.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The webhook's answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused with this HTTP code and message (the API server returns both to the client).
    Deny {
        code: u16,
        message: String,
    },
}

/// A running webhook and its `ValidatingWebhookConfiguration`; [`Webhook::stop`] removes both.
pub struct Webhook {
    name: String,
    client: Client,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    dir: PathBuf,
}

impl Webhook {
    /// Serves `decide` (called with the AdmissionReview's `request`) and registers it as the
    /// `ValidatingWebhookConfiguration` `name` with one webhook: `matching` gives its rules,
    /// selectors and match conditions (the URL, CA bundle, failure policy, side effects, review
    /// versions and timeout are filled in). Returns once the configuration is created; the API
    /// server may take a moment to call it.
    pub async fn start<F, Fut>(client: &Client, name: &str, matching: Value, decide: F) -> Result<Self>
    where
        F: Fn(Value) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Verdict> + Send + 'static,
    {
        let dir = std::env::temp_dir().join(format!("webhook-{name}"));
        std::fs::create_dir_all(&dir)?;
        let generated = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])?;
        std::fs::write(dir.join("tls.key"), generated.signing_key.serialize_pem())?;
        std::fs::write(dir.join("tls.crt"), generated.cert.pem())?;
        let tls = Arc::new(operator::serving_cert::ServingCert::from_dir(&dir)?).server_config()?;
        let router = axum::Router::new().route(
            "/validate",
            axum::routing::post(move |body: axum::body::Bytes| {
                let decide = decide.clone();
                async move { answer(&body, decide).await }
            }),
        );
        let port = xtask::harness::free_port()?;
        let shutdown = CancellationToken::new();
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let server = operator::http::serve_tls(address, router, tls, shutdown.clone()).await?;

        let mut webhook = json!({
            "name": "validate.e2e.example.com",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/validate")},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 10,
        });
        let fields = matching.as_object().context("the webhook's matching fields are a JSON object")?;
        for (field, value) in fields {
            webhook[field] = value.clone();
        }
        let mut configuration: ValidatingWebhookConfiguration =
            serde_json::from_value(json!({"metadata": {"name": name}, "webhooks": [webhook]}))?;
        for webhook in configuration.webhooks.iter_mut().flatten() {
            webhook.client_config.ca_bundle = Some(k8s_openapi::ByteString(generated.cert.pem().into_bytes()));
        }
        Api::<ValidatingWebhookConfiguration>::all(client.clone())
            .create(&PostParams::default(), &configuration)
            .await
            .with_context(|| format!("registering the webhook {name}"))?;
        Ok(Self { name: name.to_owned(), client: client.clone(), shutdown, server, dir })
    }

    /// Removes the configuration (so nothing calls the webhook any more), then stops serving.
    pub async fn stop(self) -> Result<()> {
        let api: Api<ValidatingWebhookConfiguration> = Api::all(self.client.clone());
        api.delete(&self.name, &DeleteParams::default()).await?;
        self.shutdown.cancel();
        self.server.await?;
        std::fs::remove_dir_all(&self.dir)?;
        Ok(())
    }
}

/// The AdmissionReview answering `body` with `decide`'s verdict.
async fn answer<F, Fut>(body: &[u8], decide: F) -> ([(axum::http::HeaderName, &'static str); 1], String)
where
    F: Fn(Value) -> Fut,
    Fut: Future<Output = Verdict>,
{
    let review: Value = serde_json::from_slice(body).unwrap_or_default();
    let request = review.get("request").cloned().unwrap_or_default();
    let uid = request.get("uid").cloned().unwrap_or_default();
    let response = match decide(request).await {
        Verdict::Allow => json!({"uid": uid, "allowed": true}),
        Verdict::Deny { code, message } => {
            json!({"uid": uid, "allowed": false, "status": {"code": code, "message": message}})
        }
    };
    let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response});
    ([(axum::http::header::CONTENT_TYPE, "application/json")], review.to_string())
}
