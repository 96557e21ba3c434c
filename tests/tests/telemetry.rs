//! OTLP trace export, received by an in-process OTLP/HTTP receiver (no collector binary is
//! available here): one span per reconcile, carrying controller, object and a trace id.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, ensure};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use crd_types::{MyResource, MyResourceSpec};
use e2e_tests::{OperatorProcess, TEST_LEASE, TestCluster, TestNamespace, eventually, install_crds};
use kube::api::{Api, PostParams};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

/// A received span: name, trace id and string attributes, plus the service name of its resource.
#[derive(Clone, Debug)]
struct ReceivedSpan {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    attributes: Vec<(String, String)>,
}

type Received = Arc<Mutex<Vec<ReceivedSpan>>>;

fn string_value(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

async fn receive(State(received): State<Received>, body: Bytes) -> axum::http::StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return axum::http::StatusCode::BAD_REQUEST;
    };
    let mut spans = received.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .map(|kv| string_value(kv.value.as_ref()))
            .unwrap_or_default();
        for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
            let attributes =
                span.attributes.iter().map(|kv| (kv.key.clone(), string_value(kv.value.as_ref()))).collect();
            spans.push(ReceivedSpan { service: service.clone(), name: span.name, trace_id: span.trace_id, attributes });
        }
    }
    axum::http::StatusCode::OK
}

#[tokio::test]
async fn reconcile_spans_are_exported_over_otlp_when_configured() -> Result<()> {
    let received: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let app = Router::new().route("/v1/traces", post(receive)).with_state(received.clone());
    let receiver = tokio::spawn(async move { axum::serve(listener, app).await });

    let cluster = TestCluster::get()?;
    let client = cluster.admin_client().await?;
    install_crds(&client).await?;
    let namespace = TestNamespace::create(&client, "otlp").await?;
    let ns = namespace.name.clone();
    let endpoint = format!("http://127.0.0.1:{port}");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_SERVICE_NAME", "example-operator-e2e"),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let _operator =
        OperatorProcess::spawn(&cluster.admin_kubeconfig, "traced", "traced-leader", &ns, &TEST_LEASE, &env)?;
    let resources: Api<MyResource> = Api::namespaced(client.clone(), &ns);
    resources
        .create(&PostParams::default(), &MyResource::new("traced", MyResourceSpec { message: "follow me".into() }))
        .await?;

    let span = eventually(Duration::from_secs(60), "a reconcile span for the resource", || async {
        let spans = received.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        Ok(spans
            .into_iter()
            .find(|s| s.name == "reconcile" && s.attributes.iter().any(|(k, v)| k == "object" && v.contains("traced"))))
    })
    .await?;
    ensure!(span.service == "example-operator-e2e", "{span:?}");
    ensure!(span.attributes.iter().any(|(k, v)| k == "controller" && v == "myresource"), "{span:?}");
    ensure!(span.trace_id.len() == 16 && span.trace_id.iter().any(|b| *b != 0), "a real trace id: {span:?}");
    let trace_hex: String = span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
    ensure!(
        span.attributes.iter().any(|(k, v)| k == "trace_id" && *v == trace_hex),
        "the span carries its trace id: {span:?}"
    );
    receiver.abort();
    namespace.delete().await
}
