//! Telemetry: structured logs through `tracing` (text for people, JSON for
//! containers; `RUST_LOG` filters, default `info`), OpenTelemetry traces
//! exported over OTLP/gRPC when an endpoint is configured (`otel`), the
//! per-RPC span, log line and metrics (`rpc_log`), and the Prometheus
//! metrics facade the domain calls (`metrics`), and the summarised log
//! lines of the abuse limits (`limit_log`).

pub mod limit_log;
pub mod metrics;
pub mod otel;
pub mod rpc_log;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes it.
#[must_use = "call shutdown() on exit so buffered spans are exported"]
pub struct Telemetry {
    tracer_provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer_provider
            && let Err(error) = provider.shutdown()
        {
            eprintln!("billing: flushing traces failed: {error}");
        }
    }
}

/// Installs the global subscriber: logs in `format` on stdout, plus the
/// OpenTelemetry layer when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. Call it inside the tokio
/// runtime: the OTLP/gRPC exporter's channel lives on it.
pub fn init(format: LogFormat) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,sqlx=warn,h2=warn,tower=warn,hyper=warn,opentelemetry=warn")
    });
    let (tracer_provider, otel_error) = match otel::configured_endpoint() {
        Some(_) => match otel::build_provider(None) {
            Ok(provider) => (Some(provider), None),
            Err(error) => (None, Some(error)),
        },
        None => (None, None),
    };
    let otel_layer = tracer_provider.as_ref().map(otel::layer);
    let result = tracing_subscriber::registry()
        .with(log_layer(format, std::io::stdout))
        .with(otel_layer)
        .with(filter)
        .try_init();
    // A second init (tests start several servers in one process) keeps the first.
    let _ = result;
    if let Some(error) = otel_error {
        tracing::error!(
            error = format!("{error:#}"),
            "traces disabled: the OTLP exporter could not be built"
        );
    } else if tracer_provider.is_some() {
        tracing::info!(
            endpoint = otel::configured_endpoint().unwrap_or_default(),
            "exporting traces over OTLP/gRPC"
        );
    }
    Telemetry { tracer_provider }
}

/// The log formatter for `format`, writing to `writer` (stdout in the
/// service; a buffer in tests).
pub fn log_layer<S, W>(format: LogFormat, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_writer(writer);
    match format {
        LogFormat::Json => layer.json().flatten_event(true).boxed(),
        LogFormat::Text => layer.boxed(),
    }
}
