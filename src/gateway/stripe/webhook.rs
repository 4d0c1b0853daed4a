//! `POST /stripe/webhook`: Stripe's events, verified, deduplicated and
//! applied through the same domain functions as the RPCs.
//!
//! - `setup_intent.succeeded` / `setup_intent.setup_failed`: a card waiting
//!   for 3-D Secure (completed or abandoned in the browser) becomes `ACTIVE`
//!   or `FAILED`, as ConfirmCard would make it.
//! - `payment_intent.succeeded` / `.payment_failed` / `.requires_action` /
//!   `.canceled`: the top-up attempt named by `metadata[idempotency_key]`,
//!   if it was left `UNKNOWN` or `REQUIRES_ACTION`, is settled as the
//!   gateway's answer would have settled it (automatic: the engine's path;
//!   Add Funds and retry: the payment-methods path). Anything else about it
//!   was settled by the synchronous answer already.
//!
//! A verified event is recorded by id after it is applied; a replayed id is
//! answered 200 without being applied again. Applying is idempotent anyway
//! (the domain re-checks state under its locks), so two deliveries racing
//! past the check are harmless. A failure to apply answers 500: Stripe retries.

use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use sqlx::PgPool;
use tokio::sync::Notify;

use super::api::{self, PaymentIntent, SetupIntent};
use super::signature::{self, WebhookSecret};
use crate::auth::Caller;
use crate::error::BillingError;
use crate::gateway::{Outcome, PaymentGateway};
use crate::payment_methods::PaymentMethods;
use crate::topup::{self, Clock, PolicyConfig, TopUps};

/// What the webhook needs: the signing secret and the domain it applies events to.
#[derive(Clone)]
pub struct WebhookState {
    pub secret: WebhookSecret,
    pub tolerance_secs: i64,
    pub pool: PgPool,
    pub payment_methods: PaymentMethods,
    pub top_ups: TopUps,
    pub clock: Arc<dyn Clock>,
}

impl WebhookState {
    /// `wake` is the top-up engine's (so a top-up reopened by a decline is driven at once).
    pub fn new(
        pool: PgPool,
        gateway: Arc<dyn PaymentGateway>,
        secret: WebhookSecret,
        policy: PolicyConfig,
        clock: Arc<dyn Clock>,
        wake: Arc<Notify>,
    ) -> Self {
        let top_ups = TopUps::new(pool.clone(), gateway.clone(), clock.clone(), policy, wake);
        Self {
            secret,
            tolerance_secs: signature::DEFAULT_TOLERANCE_SECS,
            payment_methods: PaymentMethods::new(pool.clone(), gateway),
            pool,
            top_ups,
            clock,
        }
    }
}

/// The route, to be mounted on the HTTP (metrics) server.
pub fn webhook_router(state: WebhookState) -> axum::Router {
    axum::Router::new()
        .route("/stripe/webhook", axum::routing::post(receive))
        .with_state(Arc::new(state))
}

async fn receive(
    State(state): State<Arc<WebhookState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> (StatusCode, String) {
    handle_webhook(&state, &headers, &body).await
}

/// The audit log's name for changes made by Stripe's events.
fn webhook_caller() -> Caller {
    Caller::engine("stripe-webhook")
}

#[derive(Debug, Deserialize)]
struct Event {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    data: EventData,
}

#[derive(Debug, Deserialize)]
struct EventData {
    object: serde_json::Value,
}

pub async fn handle_webhook(
    state: &WebhookState,
    headers: &HeaderMap,
    body: &[u8],
) -> (StatusCode, String) {
    let Some(header) = headers
        .get("stripe-signature")
        .and_then(|value| value.to_str().ok())
    else {
        return (
            StatusCode::BAD_REQUEST,
            "missing Stripe-Signature header".into(),
        );
    };
    let now = state.clock.now().timestamp();
    if let Err(error) = signature::verify(&state.secret, header, body, now, state.tolerance_secs) {
        tracing::warn!(%error, "stripe webhook refused");
        return (StatusCode::BAD_REQUEST, error.to_string());
    }
    let event: Event = match serde_json::from_slice(body) {
        Ok(event) => event,
        Err(_) => return (StatusCode::BAD_REQUEST, "not a stripe event".into()),
    };
    match already_processed(&state.pool, &event.id).await {
        Ok(true) => return (StatusCode::OK, "already processed".into()),
        Ok(false) => {}
        Err(error) => return failed(&event, &error),
    }
    let applied = match apply(state, &event).await {
        Ok(applied) => applied,
        Err(error) => return failed(&event, &error),
    };
    if let Err(error) = remember(&state.pool, &event).await {
        return failed(&event, &error);
    }
    tracing::info!(event_id = %event.id, event_type = %event.kind, applied, "stripe webhook processed");
    (
        StatusCode::OK,
        if applied { "applied" } else { "ignored" }.into(),
    )
}

fn failed(event: &Event, error: &dyn std::fmt::Display) -> (StatusCode, String) {
    tracing::error!(event_id = %event.id, event_type = %event.kind, %error, "stripe webhook not applied; stripe will retry");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "not applied; retry later".into(),
    )
}

async fn already_processed(pool: &PgPool, event_id: &str) -> Result<bool, BillingError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM stripe_webhook_events WHERE event_id = $1)",
    )
    .bind(event_id)
    .fetch_one(pool)
    .await?)
}

async fn remember(pool: &PgPool, event: &Event) -> Result<(), BillingError> {
    sqlx::query(
        "INSERT INTO stripe_webhook_events (event_id, event_type) VALUES ($1, $2) \
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(&event.id)
    .bind(&event.kind)
    .execute(pool)
    .await?;
    Ok(())
}

/// Applies one event; false when it concerned nothing waiting here.
async fn apply(state: &WebhookState, event: &Event) -> Result<bool, BillingError> {
    let object = event.data.object.clone();
    match event.kind.as_str() {
        "setup_intent.succeeded" | "setup_intent.setup_failed" => {
            let intent: SetupIntent =
                serde_json::from_value(object).context("reading a setup intent event")?;
            let Some(payment_method) = intent.payment_method.as_deref() else {
                return Ok(false);
            };
            let outcome = match api::outcome_of_setup(&intent) {
                Outcome::Succeeded if event.kind == "setup_intent.succeeded" => Outcome::Succeeded,
                Outcome::Declined { code, hard } => Outcome::Declined { code, hard },
                _ if event.kind == "setup_intent.setup_failed" => Outcome::Declined {
                    code: "authentication_failed".into(),
                    hard: false,
                },
                _ => return Ok(false),
            };
            let settled = state
                .payment_methods
                .settle_authentication(&webhook_caller(), payment_method, outcome)
                .await?;
            Ok(settled.is_some())
        }
        "payment_intent.succeeded"
        | "payment_intent.payment_failed"
        | "payment_intent.requires_action"
        | "payment_intent.canceled" => {
            let intent: PaymentIntent =
                serde_json::from_value(object).context("reading a payment intent event")?;
            let Some((top_up_id, attempt_number)) = intent
                .metadata
                .get("idempotency_key")
                .and_then(|key| topup::parse_gateway_key(key))
            else {
                // Not a charge this service made.
                return Ok(false);
            };
            let charge = api::charge_of_intent(&intent);
            // Manual, retry and automatic top-ups settle through the one charge path.
            state
                .top_ups
                .settle_reported(top_up_id, attempt_number, charge)
                .await
        }
        _ => Ok(false),
    }
}
