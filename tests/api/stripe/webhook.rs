//! The webhook handler, called directly with signed Stripe events.

use std::sync::Arc;

use billing::gateway::stripe::signature::{WebhookSecret, sign};
use billing::gateway::stripe::webhook::{WebhookState, handle_webhook};
use billing::proto::{PaymentMethodStatus, TopUpStatus};
use billing::topup::{PolicyConfig, SystemClock};
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use tokio::sync::Notify;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::grpc::{mount_setup, stripe_app, token_request};
use super::*;
use crate::helpers::{TestApp, authed};
use crate::payment_methods::{ACCT, add_funds, balance, client, funds, status, top_up_status};

const WEBHOOK_SECRET: &str = "whsec_test_5Wq0Jx9";

fn state(app: &TestApp, server: &MockServer) -> WebhookState {
    WebhookState::new(
        app.pool.clone(),
        shared(gateway_for(server, &app.pool)),
        WebhookSecret::new(WEBHOOK_SECRET),
        PolicyConfig::default(),
        Arc::new(SystemClock),
        Arc::new(Notify::new()),
    )
}

fn event(id: &str, kind: &str, object: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id,
        "object": "event",
        "api_version": "2024-06-20",
        "created": chrono::Utc::now().timestamp(),
        "livemode": false,
        "pending_webhooks": 1,
        "type": kind,
        "data": { "object": object }
    }))
    .unwrap()
}

fn signed(secret: &str, timestamp: i64, body: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        "stripe-signature",
        sign(&WebhookSecret::new(secret), timestamp, body)
            .parse()
            .unwrap(),
    );
    headers
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn method_status(app: &TestApp, token: &str, id: &str) -> PaymentMethodStatus {
    let method = client(app)
        .get_payment_method(authed(
            token,
            billing::proto::GetPaymentMethodRequest {
                account_id: ACCT.into(),
                payment_method_id: id.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .payment_method
        .unwrap();
    status(&method)
}

/// A server with a card `pm_3ds` waiting for 3-D Secure; returns its id.
async fn app_with_pending_card(server: &MockServer) -> (TestApp, String, String) {
    mount_customer_and_cards(server, &["pm_3ds"]).await;
    mount_setup(server, "pm_3ds", "requires_action").await;
    let (app, token) = stripe_app(server).await;
    let added = client(&app)
        .add_card(authed(&token, token_request("pm_3ds", "add-3ds")))
        .await
        .unwrap()
        .into_inner();
    let next_action = added.next_action.expect("3-D Secure next action");
    assert_eq!(
        next_action.redirect_url,
        "https://hooks.stripe.com/3d_secure_2/hosted?setup_intent=seti_pm_3ds"
    );
    let id = added.payment_method.unwrap().payment_method_id;
    assert_eq!(
        method_status(&app, &token, &id).await,
        PaymentMethodStatus::PendingAuthentication
    );
    (app, token, id)
}

#[tokio::test]
async fn three_d_secure_completed_in_the_browser_activates_the_card_and_a_replay_is_not_reapplied()
{
    let server = MockServer::start().await;
    let (app, token, id) = app_with_pending_card(&server).await;
    let state = state(&app, &server);
    let body = event(
        "evt_seti_ok",
        "setup_intent.succeeded",
        setup_intent("seti_pm_3ds", "pm_3ds", "succeeded"),
    );

    let (code, text) = handle_webhook(&state, &signed(WEBHOOK_SECRET, now(), &body), &body).await;
    assert_eq!((code, text.as_str()), (StatusCode::OK, "applied"));
    assert_eq!(
        method_status(&app, &token, &id).await,
        PaymentMethodStatus::Active
    );

    // Were the event applied again, this card would become ACTIVE again.
    sqlx::query(
        "UPDATE payment_methods SET status = 'PENDING_AUTHENTICATION' WHERE payment_method_id = $1",
    )
    .bind(&id)
    .execute(&app.pool)
    .await
    .unwrap();
    let (code, text) = handle_webhook(&state, &signed(WEBHOOK_SECRET, now(), &body), &body).await;
    assert_eq!((code, text.as_str()), (StatusCode::OK, "already processed"));
    assert_eq!(
        method_status(&app, &token, &id).await,
        PaymentMethodStatus::PendingAuthentication
    );
    app.stop().await;
}

#[tokio::test]
async fn signature_vectors_wrong_secret_stale_missing_and_several_v1() {
    let server = MockServer::start().await;
    let (app, token, id) = app_with_pending_card(&server).await;
    let state = state(&app, &server);
    let body = event(
        "evt_sig",
        "setup_intent.succeeded",
        setup_intent("seti_pm_3ds", "pm_3ds", "succeeded"),
    );

    let wrong_secret = signed("whsec_someone_else", now(), &body);
    let stale = signed(WEBHOOK_SECRET, now() - 301, &body);
    let mut tampered_body = body.clone();
    tampered_body.extend_from_slice(b" ");
    for (headers, payload) in [
        (wrong_secret, &body),
        (stale, &body),
        (HeaderMap::new(), &body),
        (signed(WEBHOOK_SECRET, now(), &body), &tampered_body),
    ] {
        let (code, _) = handle_webhook(&state, &headers, payload).await;
        assert_eq!(code, StatusCode::BAD_REQUEST);
    }
    assert_eq!(
        method_status(&app, &token, &id).await,
        PaymentMethodStatus::PendingAuthentication,
        "a refused event changes nothing"
    );

    // While a secret is rolled Stripe signs with both: one valid v1 is enough.
    let timestamp = now();
    let valid = sign(&WebhookSecret::new(WEBHOOK_SECRET), timestamp, &body);
    let old = sign(&WebhookSecret::new("whsec_old_secret"), timestamp, &body);
    let header = format!(
        "t={timestamp},v1={},v1={}",
        old.split_once(",v1=").unwrap().1,
        valid.split_once(",v1=").unwrap().1
    );
    let mut headers = HeaderMap::new();
    headers.insert("stripe-signature", header.parse().unwrap());
    let (code, _) = handle_webhook(&state, &headers, &body).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        method_status(&app, &token, &id).await,
        PaymentMethodStatus::Active
    );
    app.stop().await;
}

#[tokio::test]
async fn a_payment_finished_after_3ds_completes_add_funds_and_credits_once() {
    let server = MockServer::start().await;
    mount_customer_and_cards(&server, &["pm_card"]).await;
    mount_setup(&server, "pm_card", "succeeded").await;
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .respond_with(ResponseTemplate::new(200).set_body_json(payment_intent(
            "pi_3ds",
            "requires_action",
            "set-by-test",
            2500,
        )))
        .mount(&server)
        .await;
    let (app, token) = stripe_app(&server).await;
    client(&app)
        .add_card(authed(&token, token_request("pm_card", "add-card")))
        .await
        .unwrap();
    let response = add_funds(&app, &token, funds("25.00", "", "funds-3ds"))
        .await
        .unwrap();
    let top_up = response.top_up.unwrap();
    assert_eq!(top_up_status(&top_up), TopUpStatus::RequiresAction);
    assert_eq!(
        response.next_action.unwrap().redirect_url,
        "https://hooks.stripe.com/3d_secure_2/hosted?payment_intent=pi_3ds"
    );
    assert_eq!(balance(&app, ACCT).await, "0.00");

    let state = state(&app, &server);
    let key = format!("{}:attempt-1", top_up.top_up_id);
    let body = event(
        "evt_pi_ok",
        "payment_intent.succeeded",
        payment_intent("pi_3ds", "succeeded", &key, 2500),
    );
    let (code, text) = handle_webhook(&state, &signed(WEBHOOK_SECRET, now(), &body), &body).await;
    assert_eq!((code, text.as_str()), (StatusCode::OK, "applied"));
    assert_eq!(balance(&app, ACCT).await, "25.00");
    let settled: String = sqlx::query_scalar("SELECT status FROM top_ups WHERE top_up_id = $1")
        .bind(&top_up.top_up_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(settled, "SUCCEEDED");

    // The same event again, and a different event about the same payment: credited once.
    let (code, _) = handle_webhook(&state, &signed(WEBHOOK_SECRET, now(), &body), &body).await;
    assert_eq!(code, StatusCode::OK);
    let other = event(
        "evt_pi_ok_2",
        "payment_intent.succeeded",
        payment_intent("pi_3ds", "succeeded", &key, 2500),
    );
    let (code, text) = handle_webhook(&state, &signed(WEBHOOK_SECRET, now(), &other), &other).await;
    assert_eq!((code, text.as_str()), (StatusCode::OK, "ignored"));
    assert_eq!(balance(&app, ACCT).await, "25.00");
    app.stop().await;
}

#[tokio::test]
async fn events_about_charges_made_elsewhere_are_acknowledged_and_ignored() {
    let server = MockServer::start().await;
    let (app, _) = stripe_app(&server).await;
    let state = state(&app, &server);
    let body = event(
        "evt_foreign",
        "payment_intent.succeeded",
        payment_intent("pi_foreign", "succeeded", "order-42", 999),
    );
    let (code, text) = handle_webhook(&state, &signed(WEBHOOK_SECRET, now(), &body), &body).await;
    assert_eq!((code, text.as_str()), (StatusCode::OK, "ignored"));
    app.stop().await;
}
