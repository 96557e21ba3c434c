//! Logs and traces: a tracing subscriber printing text or JSON lines, an OpenTelemetry layer
//! that gives every span (one per reconcile) a trace id, and OTLP export of those spans when the
//! standard OTEL_* variables configure an endpoint. Nothing is exported otherwise.

use anyhow::{Context, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Keeps the tracer provider alive; [`Telemetry::shutdown`] flushes spans not yet exported.
pub struct Telemetry {
    provider: SdkTracerProvider,
    /// True when spans leave the process over OTLP.
    pub exporting: bool,
}

/// True when the OTEL_* environment asks for OTLP trace export.
pub fn otlp_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none");
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Installs the global subscriber. `level` is a filter in RUST_LOG syntax.
pub fn init(format: LogFormat, level: &str) -> Result<Telemetry> {
    let exporting = otlp_configured();
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("example-operator");
    }
    let mut provider = SdkTracerProvider::builder().with_resource(resource.build());
    if exporting {
        // Endpoint, headers, timeout and protocol details come from the OTEL_EXPORTER_OTLP_* variables.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .context("configuring the OTLP span exporter from OTEL_EXPORTER_OTLP_*")?;
        provider = provider.with_batch_exporter(exporter);
    }
    let provider = provider.build();
    let tracer = provider.tracer("example-operator");

    let filter = EnvFilter::try_new(level).with_context(|| format!("invalid --log-level {level:?}"))?;
    let otel = tracing_opentelemetry::layer().with_tracer(tracer);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer()).try_init(),
    }
    .context("installing the tracing subscriber")?;
    Ok(Telemetry { provider, exporting })
}

impl Telemetry {
    /// Exports the spans still buffered; call before the process exits.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("flushing traces failed: {error}");
        }
    }
}
