//! `trace_id` and `span_id` on every log line written inside a span: the
//! OpenTelemetry ids of the innermost span, so a log line leads to its trace
//! and a trace to its log lines. JSON lines carry them as the first two
//! fields; text lines end with `trace_id=… span_id=…`. Lines outside any
//! span carry neither.
//!
//! The ids come from the OpenTelemetry layer (`tracing-opentelemetry`);
//! [`super::init`] always installs one — exporting when an OTLP endpoint is
//! configured, else with a sampler that records nothing — so the ids (and
//! a caller's `traceparent`) are in the logs whether traces are exported or not.

use std::fmt;
use std::sync::{Arc, OnceLock};

use opentelemetry::trace::TraceContextExt;
use tracing::dispatcher::WeakDispatch;
use tracing::{Dispatch, Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The dispatch a subscriber was registered as, for the code that must
/// reach the OpenTelemetry layer from inside another layer.
#[derive(Clone, Default)]
pub struct DispatchHandle(Arc<OnceLock<WeakDispatch>>);

impl DispatchHandle {
    /// A layer that only records the dispatch it becomes part of.
    pub fn registrar(&self) -> RegisterDispatch {
        RegisterDispatch(self.clone())
    }

    /// The OpenTelemetry context of span `id` (it starts the span when it
    /// was still being built: call it once its parent is set).
    pub fn otel_context(&self, id: &tracing::span::Id) -> Option<opentelemetry::Context> {
        let dispatch = self.0.get()?.upgrade()?;
        tracing_opentelemetry::get_otel_context(id, &dispatch)
    }

    /// The span `event` happened in: its explicit parent, else the current
    /// span of the whole subscriber (a per-layer filter's own view of the
    /// current span would hide the spans it does not enable).
    pub fn span_of(&self, event: &Event<'_>) -> Option<tracing::span::Id> {
        if let Some(parent) = event.parent() {
            return Some(parent.clone());
        }
        if !event.is_contextual() {
            return None;
        }
        let dispatch = self.0.get()?.upgrade()?;
        dispatch.current_span().id().cloned()
    }

    /// The hex trace id and span id of span `id`, when it has valid ones.
    pub fn ids(&self, id: &tracing::span::Id) -> Option<(String, String)> {
        let context = self.otel_context(id)?;
        let span = context.span();
        let span_context = span.span_context();
        span_context.is_valid().then(|| {
            (
                span_context.trace_id().to_string(),
                span_context.span_id().to_string(),
            )
        })
    }
}

/// See [`DispatchHandle::registrar`].
pub struct RegisterDispatch(DispatchHandle);

impl<S: Subscriber> Layer<S> for RegisterDispatch {
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        let _ = (self.0).0.set(subscriber.downgrade());
    }
}

/// An event format that adds the ids of the event's span to what `inner` writes.
pub struct WithTraceIds<F> {
    pub inner: F,
    pub dispatch: DispatchHandle,
    /// JSON (the ids open the object) or text (they end the line).
    pub json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let span = event.parent().cloned().or_else(|| {
            event
                .is_contextual()
                .then(|| ctx.lookup_current().map(|span| span.id()))
                .flatten()
        });
        let Some((trace_id, span_id)) = span.and_then(|id| self.dispatch.ids(&id)) else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        if self.json
            && let Some(rest) = line.strip_prefix('{')
        {
            return write!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            );
        }
        let body = line.strip_suffix('\n').unwrap_or(&line);
        writeln!(writer, "{body} trace_id={trace_id} span_id={span_id}")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;
    use crate::config::LogFormat;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(format: LogFormat) -> Vec<String> {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let provider = super::super::otel::recording_nothing();
        let subscriber = tracing_subscriber::registry()
            .with(super::super::otel::layer(&provider))
            .with(super::super::log_layer(format, move || writer.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside");
            let span = tracing::info_span!("work", account_id = "acme");
            span.in_scope(|| {
                tracing::info!(answer = 42, "inside");
                tracing::info_span!("nested").in_scope(|| tracing::warn!("deeper"));
            });
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn every_json_line_inside_a_span_has_its_trace_id_and_span_id() {
        let lines: Vec<serde_json::Value> = lines(LogFormat::Json)
            .iter()
            .map(|line| serde_json::from_str(line).expect("valid JSON"))
            .collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].get("trace_id").is_none(), "outside any span");
        let (inside, deeper) = (&lines[1], &lines[2]);
        assert_eq!(inside["answer"], 42);
        assert_eq!(inside["span"]["account_id"], "acme");
        for line in [inside, deeper] {
            assert_eq!(line["trace_id"].as_str().map(str::len), Some(32), "{line}");
            assert_eq!(line["span_id"].as_str().map(str::len), Some(16), "{line}");
        }
        assert_eq!(inside["trace_id"], deeper["trace_id"], "one trace");
        assert_ne!(
            inside["span_id"], deeper["span_id"],
            "each line its own span"
        );
    }

    #[test]
    fn text_lines_inside_a_span_end_with_the_ids() {
        let lines = lines(LogFormat::Text);
        assert!(!lines[0].contains("trace_id="), "{}", lines[0]);
        assert!(lines[1].contains(" trace_id="), "{}", lines[1]);
        assert!(lines[1].contains(" span_id="), "{}", lines[1]);
    }
}
