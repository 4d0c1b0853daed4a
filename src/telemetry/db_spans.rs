//! A database span per SQL statement, following the OpenTelemetry database
//! conventions (`db.system.name` = `postgresql`, `db.query.text`,
//! `db.operation.name`, span kind client), child of the span that ran it
//! (an RPC, an engine decision, a top-up being driven).
//!
//! sqlx 0.9 opens no spans of its own; it logs each statement when it ends
//! (target `sqlx::query`, DEBUG) with its text and duration. This layer —
//! installed only when traces are exported — turns that event into a span
//! that started `elapsed` ago. The text is the SQL as written, with `$1`
//! placeholders: sqlx never logs bound values, so neither card data nor
//! amounts nor account ids reach the span. Statements run outside any span
//! (the metrics refresher) are not traced.

use std::time::{Duration, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::trace::{
    Span as _, SpanKind, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use super::log_ids::{DispatchHandle, RegisterDispatch};

/// The `tracing` target of sqlx's statement events.
pub const SQLX_TARGET: &str = "sqlx::query";

/// The layer; see the module. Install it with [`DbSpans::filter`].
pub struct DbSpans {
    /// `None`: traces are not exported; the layer does nothing.
    tracer: Option<SdkTracer>,
    dispatch: DispatchHandle,
    registrar: RegisterDispatch,
}

impl DbSpans {
    /// Spans of `provider`'s tracer; `None`: a layer that does nothing.
    pub fn new(provider: Option<&SdkTracerProvider>) -> Self {
        let dispatch = DispatchHandle::default();
        Self {
            tracer: provider.map(|provider| provider.tracer("billing.db")),
            registrar: dispatch.registrar(),
            dispatch,
        }
    }

    /// The events this layer needs — sqlx's statements, DEBUG — and only
    /// when it exports (whatever the log filter says of sqlx).
    pub fn filter(&self) -> tracing_subscriber::filter::Targets {
        let targets = tracing_subscriber::filter::Targets::new();
        match self.tracer {
            Some(_) => targets.with_target(SQLX_TARGET, tracing::Level::DEBUG),
            None => targets,
        }
    }
}

/// What sqlx tells of a statement.
#[derive(Default)]
struct Statement {
    /// The first words, with " …" when the statement is longer.
    summary: String,
    /// The whole text when longer than the summary, else empty.
    text: String,
    elapsed_secs: f64,
    rows_returned: i64,
    rows_affected: i64,
}

impl Visit for Statement {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "summary" => self.summary = value.to_owned(),
            "db.statement" => self.text = value.trim().to_owned(),
            _ => {}
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if field.name() == "elapsed_secs" {
            self.elapsed_secs = value;
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        let value = i64::try_from(value).unwrap_or(i64::MAX);
        match field.name() {
            "rows_returned" => self.rows_returned = value,
            "rows_affected" => self.rows_affected = value,
            _ => {}
        }
    }

    fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
}

impl Statement {
    fn query_text(&self) -> &str {
        if self.text.is_empty() {
            &self.summary
        } else {
            &self.text
        }
    }

    /// The span name: the statement's first words (`SELECT currency FROM accounts`).
    fn name(&self) -> String {
        self.summary.trim_end_matches(" …").to_owned()
    }

    /// `SELECT`, `INSERT`, `WITH`, … (the first keyword, upper case).
    fn operation(&self) -> String {
        self.summary
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_uppercase()
    }
}

impl<S> Layer<S> for DbSpans
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        <RegisterDispatch as Layer<S>>::on_register_dispatch(&self.registrar, subscriber);
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let Some(tracer) = &self.tracer else {
            return;
        };
        if event.metadata().target() != SQLX_TARGET {
            return;
        }
        let Some(parent) = self.dispatch.span_of(event) else {
            return;
        };
        let Some(parent) = self.dispatch.otel_context(&parent) else {
            return;
        };
        if !parent.span().span_context().is_valid() {
            return;
        }
        let mut statement = Statement::default();
        event.record(&mut statement);
        let end = SystemTime::now();
        let start = end
            .checked_sub(Duration::from_secs_f64(statement.elapsed_secs.max(0.0)))
            .unwrap_or(end);
        let mut span = tracer
            .span_builder(statement.name())
            .with_kind(SpanKind::Client)
            .with_start_time(start)
            .with_attributes(vec![
                KeyValue::new("db.system.name", "postgresql"),
                KeyValue::new("db.system", "postgresql"),
                KeyValue::new("db.query.text", statement.query_text().to_owned()),
                KeyValue::new("db.operation.name", statement.operation()),
                KeyValue::new("db.response.returned_rows", statement.rows_returned),
                KeyValue::new("db.response.affected_rows", statement.rows_affected),
            ])
            .start_with_context(tracer, &parent);
        span.end_with_timestamp(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_is_named_by_its_first_words_and_keeps_its_placeholders() {
        let statement = Statement {
            summary: "SELECT currency FROM accounts …".into(),
            text: "SELECT currency FROM accounts WHERE account_id = $1 FOR UPDATE".into(),
            ..Default::default()
        };
        assert_eq!(statement.name(), "SELECT currency FROM accounts");
        assert_eq!(statement.operation(), "SELECT");
        assert!(statement.query_text().contains("$1"));
        let short = Statement {
            summary: "COMMIT".into(),
            ..Default::default()
        };
        assert_eq!(short.query_text(), "COMMIT");
    }
}
