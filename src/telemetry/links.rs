//! Links from background work to what caused it. The engines run outside
//! any request: an `engine.decide` span handles a balance event, a
//! `top_up.drive` span of the engine charges a top-up. Each is a root span
//! of its own trace, with an OpenTelemetry *link* to the span that caused
//! its work — the Debit or Credit RPC that wrote the event, the decision or
//! the ApplyLowBalanceSettings call that started the top-up — so a trace
//! viewer follows an automatic top-up back to the usage that triggered it.
//!
//! The causes are remembered in this process for a bounded number of
//! entries (the newest [`CAPACITY`]): work picked up by another replica, or
//! long after, has no link.

use std::collections::{HashMap, VecDeque};
use std::sync::{LazyLock, Mutex};

use opentelemetry::trace::{SpanContext, TraceContextExt};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

/// How many causes are remembered.
pub const CAPACITY: usize = 10_000;

/// What later work is traced back to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Cause {
    /// The ledger transaction behind a balance event.
    Transaction(Uuid),
    /// The start of a top-up.
    TopUp(String),
}

#[derive(Default)]
struct Causes {
    spans: HashMap<Cause, SpanContext>,
    order: VecDeque<Cause>,
}

static CAUSES: LazyLock<Mutex<Causes>> = LazyLock::new(Mutex::default);

/// Remembers the current span as the cause of `cause` (nothing when the
/// current span has no valid span context: telemetry off).
pub fn remember(cause: Cause) {
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    if !span_context.is_valid() {
        return;
    }
    let span_context = span_context.clone();
    let mut causes = CAUSES.lock().unwrap_or_else(|p| p.into_inner());
    if causes.spans.insert(cause.clone(), span_context).is_none() {
        causes.order.push_back(cause);
    }
    while causes.order.len() > CAPACITY {
        if let Some(oldest) = causes.order.pop_front() {
            causes.spans.remove(&oldest);
        }
    }
}

/// Links the current span to the span remembered for `cause`, if any.
pub fn link_to(cause: &Cause) {
    let found = CAUSES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .spans
        .get(cause)
        .cloned();
    if let Some(span_context) = found {
        tracing::Span::current().add_link(span_context);
    }
}

/// The span context remembered for `cause` (tests).
pub fn remembered(cause: &Cause) -> Option<SpanContext> {
    CAUSES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .spans
        .get(cause)
        .cloned()
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[test]
    fn work_is_linked_to_the_span_that_caused_it_and_causes_are_bounded() {
        let provider = super::super::otel::recording_nothing();
        let subscriber = tracing_subscriber::registry().with(super::super::otel::layer(&provider));
        tracing::subscriber::with_default(subscriber, || {
            let cause = Cause::TopUp("tu_links_test".into());
            let rpc = tracing::info_span!("rpc");
            rpc.in_scope(|| remember(cause.clone()));
            let expected = rpc.context().span().span_context().clone();
            assert_eq!(remembered(&cause), Some(expected));
            // The oldest causes go first.
            for n in 0..CAPACITY {
                tracing::info_span!("other").in_scope(|| remember(Cause::TopUp(format!("tu_{n}"))));
            }
            assert_eq!(remembered(&cause), None);
        });
    }
}
