//! Logging: text for people, JSON (one object per line) for collectors; with the `otel` feature,
//! traces over OTLP too (a span per reconcile, the KMS calls as its children).

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// A layer of the global subscriber.
pub type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the global subscriber; `level` is an EnvFilter directive (`info`, `kmsgrant=debug`).
pub fn init(level: &str, format: &str) -> Result<(), String> {
    init_with(level, format, Vec::new())
}

fn init_with(level: &str, format: &str, extra: Vec<BoxedLayer>) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(level).map_err(|e| format!("invalid --log-level {level:?}: {e}"))?;
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt: BoxedLayer = match format {
        "json" => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed(),
        _ => fmt.boxed(),
    };
    let mut layers = vec![fmt];
    layers.extend(extra);
    tracing_subscriber::registry()
        .with(layers)
        .with(filter)
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))
}

/// Logs as [`init`], and sends spans to the OTLP/HTTP endpoint (e.g.
/// `http://otel-collector:4318/v1/traces`) in batches. Keep the guard: dropping it flushes.
#[cfg(feature = "otel")]
pub fn init_with_otlp(level: &str, format: &str, endpoint: &str) -> Result<TracesGuard, String> {
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| format!("cannot export traces to {endpoint}: {e}"))?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("kmsgrant-operator")
                .build(),
        )
        .build();
    init_with(level, format, vec![otel_layer(&provider)])?;
    Ok(TracesGuard(provider))
}

/// The layer that turns `tracing` spans into OpenTelemetry spans of `provider`.
#[cfg(feature = "otel")]
pub fn otel_layer(provider: &opentelemetry_sdk::trace::SdkTracerProvider) -> BoxedLayer {
    use opentelemetry::trace::TracerProvider as _;
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("kmsgrant-operator"))
        .boxed()
}

/// Flushes the spans still buffered and stops the exporter when dropped.
#[cfg(feature = "otel")]
pub struct TracesGuard(opentelemetry_sdk::trace::SdkTracerProvider);

#[cfg(feature = "otel")]
impl Drop for TracesGuard {
    fn drop(&mut self) {
        let _ = self.0.shutdown();
    }
}
