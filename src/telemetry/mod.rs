//! Telemetry: structured logs through `tracing` (text for people, JSON for
//! containers; `RUST_LOG` filters, default `info`; `trace_id` and `span_id`
//! on every line inside a span: `log_ids`), OpenTelemetry traces exported
//! over OTLP/gRPC when an endpoint is configured (`otel`), a span per SQL
//! statement (`db_spans`), links from background work to what caused it
//! (`links`), every payment gateway call timed and traced (`gateway`), the
//! per-RPC span, log line and metrics (`rpc_log`), the Prometheus
//! metrics facade the domain calls (`metrics`), and the summarised log
//! lines of the abuse limits (`limit_log`). docs/ARCHITECTURE.md
//! ("Telemetry") lists the conventions followed.

pub mod db_spans;
pub mod gateway;
pub mod limit_log;
pub mod links;
pub mod log_ids;
pub mod metrics;
pub mod otel;
pub mod rpc_log;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use self::log_ids::{DispatchHandle, WithTraceIds};

use crate::config::LogFormat;

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes it.
#[must_use = "call shutdown() on exit so buffered spans are exported"]
pub struct Telemetry {
    tracer_provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

/// What `RUST_LOG` says, else `info` with the chatty dependencies at `warn`.
fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,sqlx=warn,h2=warn,tower=warn,hyper=warn,opentelemetry=warn")
    })
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

/// Installs the global subscriber: logs in `format` on stdout, and the
/// OpenTelemetry layer — exporting spans (and a span per SQL statement)
/// when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
/// is set, else only giving spans their ids for the logs. Call it inside
/// the tokio runtime: the OTLP/gRPC exporter's channel lives on it.
pub fn init(format: LogFormat) -> Telemetry {
    let (tracer_provider, otel_error) = match otel::configured_endpoint() {
        Some(_) => match otel::build_provider(None) {
            Ok(provider) => (Some(provider), None),
            Err(error) => (None, Some(error)),
        },
        None => (None, None),
    };
    let ids_only = otel::recording_nothing();
    let otel_layer = otel::layer(tracer_provider.as_ref().unwrap_or(&ids_only));
    // Statements are DEBUG events of sqlx: enabled for this layer alone.
    let db_spans = db_spans::DbSpans::new(tracer_provider.as_ref());
    let db_filter = db_spans.filter();
    let result = tracing_subscriber::registry()
        .with(log_layer(format, std::io::stdout).with_filter(env_filter()))
        .with(otel_layer.with_filter(env_filter()))
        .with(db_spans.with_filter(db_filter))
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
    Telemetry {
        tracer_provider: tracer_provider.or(Some(ids_only)),
    }
}

/// The log formatter for `format`, writing to `writer` (stdout in the
/// service; a buffer in tests). Lines inside a span carry its `trace_id`
/// and `span_id` when an OpenTelemetry layer is installed (`log_ids`).
pub fn log_layer<S, W>(format: LogFormat, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let dispatch = DispatchHandle::default();
    let registrar = dispatch.registrar();
    let layer = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_ansi(false)
        .with_writer(writer);
    let events = tracing_subscriber::fmt::format()
        .with_target(true)
        .with_ansi(false);
    match format {
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .event_format(WithTraceIds {
                inner: events.json().flatten_event(true),
                dispatch,
                json: true,
            })
            .and_then(registrar)
            .boxed(),
        LogFormat::Text => layer
            .event_format(WithTraceIds {
                inner: events,
                dispatch,
                json: false,
            })
            .and_then(registrar)
            .boxed(),
    }
}
