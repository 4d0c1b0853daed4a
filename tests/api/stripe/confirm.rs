//! ConfirmTopUp in Stripe mode: the PaymentIntent's real state decides (the
//! browser completed the challenge with Stripe.js); the webhook settles the
//! same way, in either order; a late success is credited once.

use std::sync::Arc;

use billing::gateway::stripe::signature::{WebhookSecret, sign};
use billing::gateway::stripe::webhook::{WebhookState, handle_webhook};
use billing::proto::{self, TopUpStatus};
use billing::topup::{PolicyConfig, SystemClock};
use http::HeaderMap;
use serde_json::json;
use tokio::sync::Notify;
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::grpc::{mount_setup, stripe_app, token_request};
use super::*;
use crate::helpers::{TestApp, authed};
use crate::payment_methods::{ACCT, add_funds, balance, client, funds, top_up_status};

const SECRET: &str = "whsec_confirm_7Hq2";

/// A Stripe-mode server whose Add Funds of 25.00 answered `requires_action`;
/// returns the top-up id and its attempt's idempotency key.
async fn waiting_top_up(server: &MockServer) -> (TestApp, String, String, String) {
    mount_customer_and_cards(server, &["pm_card"]).await;
    mount_setup(server, "pm_card", "succeeded").await;
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .respond_with(ResponseTemplate::new(200).set_body_json(payment_intent(
            "pi_3ds",
            "requires_action",
            "set-by-test",
            2500,
        )))
        .mount(server)
        .await;
    let (app, token) = stripe_app(server).await;
    client(&app)
        .add_card(authed(&token, token_request("pm_card", "add-pm")))
        .await
        .expect("add card");
    let waiting = add_funds(&app, &token, funds("25.00", "", "funds-3ds"))
        .await
        .expect("add funds");
    assert!(waiting.next_action.unwrap().redirect_url.contains("pi_3ds"));
    let top_up = waiting.top_up.unwrap();
    assert_eq!(top_up_status(&top_up), TopUpStatus::RequiresAction);
    let key = format!("{}:attempt-1", top_up.top_up_id);
    (app, token, top_up.top_up_id, key)
}

async fn intent_now(server: &MockServer, key: &str, status: &str) {
    server.reset().await;
    Mock::given(method("GET"))
        .and(path("/v1/payment_intents/search"))
        .and(query_param(
            "query",
            format!("metadata['idempotency_key']:'{key}'"),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "object": "search_result",
            "url": "/v1/payment_intents/search",
            "has_more": false,
            "data": [payment_intent("pi_3ds", status, key, 2500)]
        })))
        .mount(server)
        .await;
}

async fn confirm(app: &TestApp, token: &str, top_up_id: &str) -> proto::ConfirmTopUpResponse {
    client(app)
        .confirm_top_up(authed(
            token,
            proto::ConfirmTopUpRequest {
                account_id: ACCT.into(),
                top_up_id: top_up_id.into(),
                // Only a hint in Stripe mode: Stripe's own state decides.
                authentication_result: proto::AuthenticationResult::Failed as i32,
            },
        ))
        .await
        .expect("confirm top-up")
        .into_inner()
}

async fn webhook(
    app: &TestApp,
    server: &MockServer,
    id: &str,
    kind: &str,
    key: &str,
    status: &str,
) {
    let state = WebhookState::new(
        app.pool.clone(),
        shared(gateway_for(server, &app.pool)),
        WebhookSecret::new(SECRET),
        PolicyConfig::default(),
        Arc::new(SystemClock),
        Arc::new(Notify::new()),
    );
    let body = serde_json::to_vec(&json!({
        "id": id, "object": "event", "api_version": "2024-06-20",
        "created": chrono::Utc::now().timestamp(), "livemode": false, "pending_webhooks": 1,
        "type": kind, "data": { "object": payment_intent("pi_3ds", status, key, 2500) }
    }))
    .unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(
        "stripe-signature",
        sign(
            &WebhookSecret::new(SECRET),
            chrono::Utc::now().timestamp(),
            &body,
        )
        .parse()
        .unwrap(),
    );
    let (code, text) = handle_webhook(&state, &headers, &body).await;
    assert!(code.is_success(), "{code} {text}");
}

async fn credits(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM ledger_entries WHERE kind = 'top_up'")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn stripe_confirm_top_up_reads_a_succeeded_payment_intent_and_credits_once() {
    let server = MockServer::start().await;
    let (app, token, top_up_id, key) = waiting_top_up(&server).await;
    intent_now(&server, &key, "succeeded").await;
    let confirmed = confirm(&app, &token, &top_up_id).await;
    assert_eq!(
        top_up_status(confirmed.top_up.as_ref().unwrap()),
        TopUpStatus::Succeeded
    );
    assert_eq!(confirmed.balance, "25.00");
    confirm(&app, &token, &top_up_id).await;
    assert_eq!(credits(&app).await, 1);
    app.stop().await;
}

#[tokio::test]
async fn stripe_confirm_top_up_reads_a_failed_payment_intent_and_credits_nothing() {
    let server = MockServer::start().await;
    let (app, token, top_up_id, key) = waiting_top_up(&server).await;
    intent_now(&server, &key, "requires_payment_method").await;
    let confirmed = confirm(&app, &token, &top_up_id).await;
    assert_eq!(
        top_up_status(confirmed.top_up.as_ref().unwrap()),
        TopUpStatus::Failed
    );
    assert_eq!(balance(&app, ACCT).await, "0.00");
    assert_eq!(credits(&app).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn stripe_confirm_top_up_of_a_processing_payment_intent_leaves_the_outcome_unknown_until_stripe_tells()
 {
    let server = MockServer::start().await;
    let (app, token, top_up_id, key) = waiting_top_up(&server).await;
    intent_now(&server, &key, "processing").await;
    let confirmed = confirm(&app, &token, &top_up_id).await;
    // The charge is in flight at Stripe: its outcome is unknown (the gate is
    // closed, the reconciler asks Stripe by key), not waiting for the customer.
    assert_eq!(
        top_up_status(confirmed.top_up.as_ref().unwrap()),
        TopUpStatus::Unknown
    );
    // The webhook then reports the success: credited once.
    webhook(
        &app,
        &server,
        "evt_ok",
        "payment_intent.succeeded",
        &key,
        "succeeded",
    )
    .await;
    assert_eq!(balance(&app, ACCT).await, "25.00");
    intent_now(&server, &key, "succeeded").await;
    let after = confirm(&app, &token, &top_up_id).await;
    assert_eq!(
        top_up_status(after.top_up.as_ref().unwrap()),
        TopUpStatus::Succeeded
    );
    assert_eq!(credits(&app).await, 1);
    app.stop().await;
}

#[tokio::test]
async fn stripe_webhook_after_confirm_top_up_changes_nothing() {
    let server = MockServer::start().await;
    let (app, token, top_up_id, key) = waiting_top_up(&server).await;
    intent_now(&server, &key, "succeeded").await;
    confirm(&app, &token, &top_up_id).await;
    webhook(
        &app,
        &server,
        "evt_late",
        "payment_intent.succeeded",
        &key,
        "succeeded",
    )
    .await;
    assert_eq!(balance(&app, ACCT).await, "25.00");
    assert_eq!(credits(&app).await, 1);
    app.stop().await;
}

/// A waiting top-up ended with `status` and `reason` (as the engine or a
/// refused ConfirmTopUp ends it) while the customer completed 3-D Secure on
/// Stripe's page; Stripe reports the success twice. Checks it is credited
/// once with one receipt and answers SUCCEEDED; returns the server.
async fn success_reported_after_the_top_up_ended(status: &str, reason: &str) -> TestApp {
    let server = MockServer::start().await;
    let (app, token, top_up_id, key) = waiting_top_up(&server).await;
    sqlx::query("UPDATE top_ups SET status = $2, failure_reason = $3 WHERE top_up_id = $1")
        .bind(&top_up_id)
        .bind(status)
        .bind(reason)
        .execute(&app.pool)
        .await
        .unwrap();
    for event in ["evt_1", "evt_2"] {
        webhook(
            &app,
            &server,
            event,
            "payment_intent.succeeded",
            &key,
            "succeeded",
        )
        .await;
    }
    assert_eq!(balance(&app, ACCT).await, "25.00");
    assert_eq!(credits(&app).await, 1);
    let receipts: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM notifications WHERE kind = 'top_up_receipt'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(receipts, 1);
    let after = confirm(&app, &token, &top_up_id).await;
    assert_eq!(
        top_up_status(after.top_up.as_ref().unwrap()),
        TopUpStatus::Succeeded
    );
    app
}

/// The rule: money that moved is credited. A top-up ended `CANCELED` (a
/// refused ConfirmTopUp ends an automatic top-up no longer wanted so) while
/// Stripe charged: the success is credited once (it was only logged for
/// manual handling).
#[tokio::test]
async fn stripe_a_success_reported_after_the_top_up_was_canceled_is_credited_once() {
    success_reported_after_the_top_up_ended("CANCELED", "auto_refill_disabled")
        .await
        .stop()
        .await;
}

#[tokio::test]
async fn stripe_a_success_reported_after_the_top_up_expired_is_credited_once_with_a_receipt() {
    // The customer took too long: the top-up expired (as the engine does it).
    success_reported_after_the_top_up_ended("FAILED", "authentication_expired")
        .await
        .stop()
        .await;
}
