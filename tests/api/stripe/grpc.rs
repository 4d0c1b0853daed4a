//! End to end over gRPC with the gateway set to stripe (wiremock behind it).

use billing::proto::{self, PaymentMethodStatus, TopUpStatus};
use billing::server::ServerSettings;
use tonic::Code;
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::*;
use crate::helpers::{TestApp, authed, fresh_database, spawn_app_on};
use crate::payment_methods::{
    ACCT, add_funds, balance, card, client, funds, status, top_up_status,
};

/// A server whose gateway is Stripe at `server`, with an empty USD account and its admin token.
pub async fn stripe_app(server: &MockServer) -> (TestApp, String) {
    let (pool, _) = fresh_database().await;
    let gateway = shared(gateway_for(server, &pool));
    let app = spawn_app_on(
        pool,
        ServerSettings {
            gateway: Some(gateway),
            ..ServerSettings::default()
        },
    )
    .await;
    app.account_with_balance(ACCT, "0").await;
    let token = app.token("admin", Some(ACCT));
    (app, token)
}

pub fn token_request(pm: &str, key: &str) -> proto::AddCardRequest {
    proto::AddCardRequest {
        account_id: ACCT.into(),
        source: Some(proto::add_card_request::Source::GatewayToken(pm.into())),
        billing_address: None,
        idempotency_key: key.into(),
    }
}

pub async fn mount_setup(server: &MockServer, pm: &str, status: &str) {
    Mock::given(method("POST"))
        .and(path("/v1/setup_intents"))
        .and(body_string_contains(format!("payment_method={pm}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(setup_intent(
            &format!("seti_{pm}"),
            pm,
            status,
        )))
        .mount(server)
        .await;
}

#[tokio::test]
async fn stripe_mode_refuses_raw_card_numbers_with_invalid_argument() {
    let server = MockServer::start().await;
    let (app, token) = stripe_app(&server).await;
    let refused = client(&app)
        .add_card(authed(
            &token,
            proto::AddCardRequest {
                account_id: ACCT.into(),
                source: Some(proto::add_card_request::Source::Card(card(
                    "4242424242424242",
                ))),
                billing_address: None,
                idempotency_key: "raw-1".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("pm_"), "{}", refused.message());
    assert!(!refused.message().contains("4242424242424242"));
    assert!(server.received_requests().await.unwrap().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn stripe_mode_add_card_with_a_pm_token_then_add_funds_charges_on_session() {
    let server = MockServer::start().await;
    mount_customer_and_cards(&server, &["pm_card"]).await;
    mount_setup(&server, "pm_card", "succeeded").await;
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .respond_with(ResponseTemplate::new(200).set_body_json(payment_intent(
            "pi_funds",
            "succeeded",
            "set-by-test",
            2500,
        )))
        .mount(&server)
        .await;
    let (app, token) = stripe_app(&server).await;

    let added = client(&app)
        .add_card(authed(&token, token_request("pm_card", "add-pm-1")))
        .await
        .expect("add card")
        .into_inner();
    let method = added.payment_method.unwrap();
    assert_eq!(status(&method), PaymentMethodStatus::Active);
    assert_eq!(method.last4, "4200");
    assert!(method.primary);
    assert!(added.next_action.is_none());

    let response = add_funds(&app, &token, funds("25.00", "", "funds-stripe-1"))
        .await
        .expect("add funds");
    let top_up = response.top_up.unwrap();
    assert_eq!(top_up_status(&top_up), TopUpStatus::Succeeded);
    assert_eq!(balance(&app, ACCT).await, "25.00");

    let sent = requests_to(&server, "POST", "/v1/payment_intents").await;
    assert_eq!(sent.len(), 1);
    let key = format!("{}:attempt-1", top_up.top_up_id);
    assert_eq!(
        sent[0].headers.get("idempotency-key").unwrap(),
        key.as_str()
    );
    let fields = form(&sent[0]);
    assert_eq!(field(&fields, "amount"), Some("2500"));
    assert_eq!(field(&fields, "currency"), Some("usd"));
    assert_eq!(field(&fields, "payment_method"), Some("pm_card"));
    assert_eq!(
        field(&fields, "metadata[idempotency_key]"),
        Some(key.as_str())
    );
    assert_eq!(field(&fields, "off_session"), None);
    app.stop().await;
}
