//! Work that must not stop halfway when its caller goes away.

use std::future::Future;

use tracing::Instrument;

use crate::error::BillingError;

/// Runs `work` on a task of its own and waits for its result.
///
/// tonic drops a handler's future when the caller goes away (its deadline,
/// a cancelled call, a dropped connection), at whatever `.await` it was.
/// Work that talks to a payment processor must not stop there: a charge or
/// a card set-up whose answer is never recorded leaves its top-up or card
/// in flight — the account's gate closed — until a reconciler finds it
/// minutes later. On a task of its own the work runs to its end and records
/// what the processor answered, whether or not anyone still waits for the
/// answer; it keeps the caller's span (its logs keep the `trace_id`).
///
/// Errors: the work's own; `Unexpected` naming `what` if its task panicked.
/// A process that dies meanwhile still leaves the work in flight: that is
/// what the reconcilers are for.
pub async fn run_to_end<T, F>(what: &'static str, work: F) -> Result<T, BillingError>
where
    F: Future<Output = Result<T, BillingError>> + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(work.instrument(tracing::Span::current()))
        .await
        .map_err(|error| BillingError::Unexpected(anyhow::anyhow!("{what}: {error}")))?
}
