//! Every payment gateway call timed and traced, whoever makes it (Add
//! Funds, the engine's automatic charges, reconciliation, 3-D Secure
//! confirmations, card set-up, the webhook): [`InstrumentedGateway`] wraps
//! the gateway once, where the server builds it.
//!
//! Each call is a client span `gateway.<operation>` with the gateway's name
//! and the result (never a token, a card or an amount), and an observation
//! of `billing_gateway_request_duration_seconds{operation, result}`; charges
//! also feed `billing_gateway_charge_duration_seconds`.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use tracing::Instrument;

use super::metrics;
use crate::gateway::{
    CardSource, Charge, ChargeRequest, GatewayError, Outcome, PaymentGateway, Setup,
};

/// A gateway whose every call is timed and traced; see the module.
pub struct InstrumentedGateway {
    inner: Arc<dyn PaymentGateway>,
}

impl InstrumentedGateway {
    pub fn wrap(inner: Arc<dyn PaymentGateway>) -> Arc<dyn PaymentGateway> {
        Arc::new(InstrumentedGateway { inner })
    }

    /// Runs `call` in the span of `operation`, then records its result.
    async fn observe<T>(
        &self,
        operation: &'static str,
        off_session: Option<bool>,
        call: impl Future<Output = Result<T, GatewayError>>,
        result_of: impl Fn(&T) -> &'static str,
    ) -> Result<T, GatewayError> {
        let span = tracing::info_span!(
            "gateway.call",
            otel.name = %format_args!("gateway.{operation}"),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            gateway = self.inner.name(),
            operation,
            off_session,
            result = tracing::field::Empty,
        );
        let started = Instant::now();
        let answer = call.instrument(span.clone()).await;
        let result = match &answer {
            Ok(value) => result_of(value),
            Err(_) => "error",
        };
        span.record("result", result);
        if matches!(result, "error" | "unknown") {
            span.record("otel.status_code", "ERROR");
        }
        metrics::gateway_call_observed(operation, result, started.elapsed().as_secs_f64());
        answer
    }
}

fn outcome_result(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Succeeded => "succeeded",
        Outcome::Declined { .. } => "declined",
        Outcome::RequiresAction { .. } => "requires_action",
        Outcome::Unknown => "unknown",
    }
}

#[async_trait]
impl PaymentGateway for InstrumentedGateway {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn accepts_raw_cards(&self) -> bool {
        self.inner.accepts_raw_cards()
    }

    async fn setup_card(
        &self,
        account_reference: &str,
        source: CardSource,
    ) -> Result<Setup, GatewayError> {
        self.observe(
            "setup_card",
            None,
            self.inner.setup_card(account_reference, source),
            |setup| outcome_result(&setup.outcome),
        )
        .await
    }

    async fn confirm_setup(
        &self,
        token: &str,
        authenticated: bool,
    ) -> Result<Outcome, GatewayError> {
        self.observe(
            "confirm_setup",
            None,
            self.inner.confirm_setup(token, authenticated),
            outcome_result,
        )
        .await
    }

    async fn charge(&self, request: ChargeRequest) -> Result<Charge, GatewayError> {
        let off_session = request.off_session;
        self.observe(
            "charge",
            Some(off_session),
            self.inner.charge(request),
            |charge| outcome_result(&charge.outcome),
        )
        .await
    }

    async fn find_charge(&self, idempotency_key: &str) -> Result<Option<Charge>, GatewayError> {
        self.observe(
            "find_charge",
            None,
            self.inner.find_charge(idempotency_key),
            |found| match found {
                Some(charge) => outcome_result(&charge.outcome),
                None => "not_found",
            },
        )
        .await
    }

    async fn confirm_charge(
        &self,
        idempotency_key: &str,
        authenticated: bool,
    ) -> Result<Charge, GatewayError> {
        self.observe(
            "confirm_charge",
            None,
            self.inner.confirm_charge(idempotency_key, authenticated),
            |charge| outcome_result(&charge.outcome),
        )
        .await
    }

    async fn detach(&self, token: &str) -> Result<(), GatewayError> {
        self.observe("detach", None, self.inner.detach(token), |_| "succeeded")
            .await
    }
}
