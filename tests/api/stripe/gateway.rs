//! The gateway alone against wiremock: set-up, charges, declines, timeouts,
//! reconciliation, and exactly what goes over the wire.

use std::str::FromStr;
use std::time::Duration;

use billing::gateway::{CardSource, ChargeRequest, Outcome, PaymentGateway};
use billing::money::Currency;
use rust_decimal::Decimal;
use serde_json::json;
use wiremock::matchers::{body_string_contains, header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::*;
use crate::helpers::fresh_database;

async fn set_up_card(gateway: &StripeGateway, server: &MockServer, pm: &str, status: &str) {
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
    gateway
        .setup_card("acme", CardSource::Token(pm.into()))
        .await
        .expect("set up");
}

fn charge_request(key: &str, off_session: bool) -> ChargeRequest {
    ChargeRequest {
        token: "pm_card".into(),
        amount: Decimal::from_str("12.50").unwrap(),
        currency: Currency::USD,
        idempotency_key: key.into(),
        off_session,
    }
}

/// A gateway with `pm_card` saved for account "acme".
async fn gateway_with_card() -> (MockServer, StripeGateway) {
    let (pool, _) = fresh_database().await;
    let server = MockServer::start().await;
    mount_customer_and_cards(&server, &["pm_card"]).await;
    let gateway = gateway_for(&server, &pool);
    set_up_card(&gateway, &server, "pm_card", "succeeded").await;
    (server, gateway)
}

#[tokio::test]
async fn card_set_up_without_3ds_attaches_off_session_and_creates_the_customer_once() {
    let (pool, _) = fresh_database().await;
    let server = MockServer::start().await;
    mount_customer_and_cards(&server, &["pm_first", "pm_second"]).await;
    let gateway = gateway_for(&server, &pool);
    for pm in ["pm_first", "pm_second"] {
        Mock::given(method("POST"))
            .and(path("/v1/setup_intents"))
            .and(body_string_contains(format!("payment_method={pm}")))
            .respond_with(ResponseTemplate::new(200).set_body_json(setup_intent(
                &format!("seti_{pm}"),
                pm,
                "succeeded",
            )))
            .mount(&server)
            .await;
    }

    let first = gateway
        .setup_card("acme", CardSource::Token("pm_first".into()))
        .await
        .unwrap();
    let second = gateway
        .setup_card("acme", CardSource::Token("pm_second".into()))
        .await
        .unwrap();

    assert_eq!(first.outcome, Outcome::Succeeded);
    assert_eq!(second.outcome, Outcome::Succeeded);
    assert_eq!(first.card.token, "pm_first");
    assert_eq!(
        (first.card.brand.as_str(), first.card.last4.as_str()),
        ("visa", "4200")
    );
    assert_eq!(first.card.fingerprint, "fp_pm_first");
    assert_eq!(requests_to(&server, "POST", "/v1/customers").await.len(), 1);
    let setups = requests_to(&server, "POST", "/v1/setup_intents").await;
    assert_eq!(setups.len(), 2);
    let fields = form(&setups[0]);
    assert_eq!(field(&fields, "customer"), Some(CUSTOMER));
    assert_eq!(field(&fields, "payment_method"), Some("pm_first"));
    assert_eq!(field(&fields, "confirm"), Some("true"));
    assert_eq!(field(&fields, "usage"), Some("off_session"));
    assert_eq!(
        setups[0].headers.get("authorization").unwrap(),
        &format!("Bearer {SECRET_KEY}")
    );
    let customer_id: String =
        sqlx::query_scalar("SELECT customer_id FROM stripe_customers WHERE account_id = 'acme'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(customer_id, CUSTOMER);
}

#[tokio::test]
async fn card_set_up_with_3ds_passes_the_redirect_through_and_confirm_reads_the_setup_intent() {
    let (pool, _) = fresh_database().await;
    let server = MockServer::start().await;
    mount_customer_and_cards(&server, &["pm_3ds"]).await;
    let gateway = gateway_for(&server, &pool);
    Mock::given(method("POST"))
        .and(path("/v1/setup_intents"))
        .respond_with(ResponseTemplate::new(200).set_body_json(setup_intent(
            "seti_3ds",
            "pm_3ds",
            "requires_action",
        )))
        .mount(&server)
        .await;

    let setup = gateway
        .setup_card("acme", CardSource::Token("pm_3ds".into()))
        .await
        .unwrap();

    let Outcome::RequiresAction { challenge } = setup.outcome else {
        panic!("expected requires action, got {:?}", setup.outcome);
    };
    assert_eq!(challenge.challenge_id, "seti_3ds");
    assert_eq!(
        challenge.redirect_url,
        "https://hooks.stripe.com/3d_secure_2/hosted?setup_intent=seti_3ds"
    );
    let setups = requests_to(&server, "POST", "/v1/setup_intents").await;
    assert_eq!(
        field(&form(&setups[0]), "return_url"),
        Some("https://panel.example.com/billing/3ds-return")
    );

    // Still waiting at Stripe: not confirmed however the client insists.
    Mock::given(method("GET"))
        .and(path("/v1/setup_intents/seti_3ds"))
        .respond_with(ResponseTemplate::new(200).set_body_json(setup_intent(
            "seti_3ds",
            "pm_3ds",
            "requires_action",
        )))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    assert!(gateway.confirm_setup("pm_3ds", true).await.is_err());
    Mock::given(method("GET"))
        .and(path("/v1/setup_intents/seti_3ds"))
        .respond_with(ResponseTemplate::new(200).set_body_json(setup_intent(
            "seti_3ds",
            "pm_3ds",
            "succeeded",
        )))
        .mount(&server)
        .await;
    assert_eq!(
        gateway.confirm_setup("pm_3ds", true).await.unwrap(),
        Outcome::Succeeded
    );
}

#[tokio::test]
async fn failed_set_up_intent_confirms_as_a_decline() {
    let (pool, _) = fresh_database().await;
    let server = MockServer::start().await;
    mount_customer_and_cards(&server, &["pm_3ds"]).await;
    let gateway = gateway_for(&server, &pool);
    set_up_card(&gateway, &server, "pm_3ds", "requires_action").await;
    let mut failed = setup_intent("seti_pm_3ds", "pm_3ds", "requires_payment_method");
    failed["last_setup_error"] =
        json!({"type": "card_error", "code": "setup_intent_authentication_failure"});
    Mock::given(method("GET"))
        .and(path("/v1/setup_intents/seti_pm_3ds"))
        .respond_with(ResponseTemplate::new(200).set_body_json(failed))
        .mount(&server)
        .await;
    assert_eq!(
        gateway.confirm_setup("pm_3ds", true).await.unwrap(),
        Outcome::Declined {
            code: "setup_intent_authentication_failure".into(),
            hard: false
        }
    );
}

#[tokio::test]
async fn off_session_charge_succeeds_sending_minor_units_and_the_idempotency_key() {
    let (server, gateway) = gateway_with_card().await;
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .and(header("Idempotency-Key", "tu_abc:attempt-1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(payment_intent(
            "pi_ok",
            "succeeded",
            "tu_abc:attempt-1",
            1250,
        )))
        .mount(&server)
        .await;

    let charge = gateway
        .charge(charge_request("tu_abc:attempt-1", true))
        .await
        .unwrap();

    assert_eq!(charge.outcome, Outcome::Succeeded);
    assert_eq!(charge.charge_id.as_deref(), Some("pi_ok"));
    let sent = requests_to(&server, "POST", "/v1/payment_intents").await;
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].headers.get("content-type").unwrap(),
        "application/x-www-form-urlencoded"
    );
    let fields = form(&sent[0]);
    for (name, value) in [
        ("amount", "1250"),
        ("currency", "usd"),
        ("customer", CUSTOMER),
        ("payment_method", "pm_card"),
        ("confirm", "true"),
        ("off_session", "true"),
        ("metadata[idempotency_key]", "tu_abc:attempt-1"),
    ] {
        assert_eq!(
            field(&fields, name),
            Some(value),
            "{name} in {}",
            body(&sent[0])
        );
    }
    assert_eq!(field(&fields, "return_url"), None);
}

#[tokio::test]
async fn on_session_charge_is_not_off_session_and_carries_the_return_url() {
    let (server, gateway) = gateway_with_card().await;
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .respond_with(ResponseTemplate::new(200).set_body_json(payment_intent(
            "pi_on",
            "succeeded",
            "tu_on:attempt-1",
            1250,
        )))
        .mount(&server)
        .await;
    gateway
        .charge(charge_request("tu_on:attempt-1", false))
        .await
        .unwrap();
    let fields = form(&requests_to(&server, "POST", "/v1/payment_intents").await[0]);
    assert_eq!(field(&fields, "off_session"), None);
    assert_eq!(
        field(&fields, "return_url"),
        Some("https://panel.example.com/billing/3ds-return")
    );
}

#[tokio::test]
async fn insufficient_funds_is_a_soft_decline() {
    let (server, gateway) = gateway_with_card().await;
    let mut intent = payment_intent("pi_nsf", "requires_payment_method", "tu_1:attempt-1", 1250);
    intent["last_payment_error"] =
        json!({"code": "card_declined", "decline_code": "insufficient_funds"});
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .respond_with(card_error(
            "card_declined",
            Some("insufficient_funds"),
            intent,
        ))
        .mount(&server)
        .await;
    let charge = gateway
        .charge(charge_request("tu_1:attempt-1", true))
        .await
        .unwrap();
    assert_eq!(
        charge.outcome,
        Outcome::Declined {
            code: "insufficient_funds".into(),
            hard: false
        }
    );
    assert_eq!(charge.charge_id.as_deref(), Some("pi_nsf"));
}

#[tokio::test]
async fn stolen_or_expired_cards_are_hard_declines() {
    let (server, gateway) = gateway_with_card().await;
    let intent = payment_intent("pi_hard", "requires_payment_method", "tu_2:attempt-1", 1250);
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .and(header("Idempotency-Key", "tu_2:attempt-1"))
        .respond_with(card_error(
            "card_declined",
            Some("stolen_card"),
            intent.clone(),
        ))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .and(header("Idempotency-Key", "tu_2:attempt-2"))
        .respond_with(card_error("expired_card", None, intent))
        .mount(&server)
        .await;
    for (key, code) in [
        ("tu_2:attempt-1", "stolen_card"),
        ("tu_2:attempt-2", "expired_card"),
    ] {
        let charge = gateway.charge(charge_request(key, true)).await.unwrap();
        assert_eq!(
            charge.outcome,
            Outcome::Declined {
                code: code.into(),
                hard: true
            }
        );
    }
}

#[tokio::test]
async fn authentication_required_off_session_is_requires_action() {
    let (server, gateway) = gateway_with_card().await;
    let intent = payment_intent("pi_sca", "requires_payment_method", "tu_3:attempt-1", 1250);
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .respond_with(card_error(
            "authentication_required",
            Some("authentication_required"),
            intent,
        ))
        .mount(&server)
        .await;
    let charge = gateway
        .charge(charge_request("tu_3:attempt-1", true))
        .await
        .unwrap();
    let Outcome::RequiresAction { challenge } = charge.outcome else {
        panic!("expected requires action, got {:?}", charge.outcome);
    };
    assert_eq!(challenge.challenge_id, "pi_sca");
}

#[tokio::test]
async fn a_timeout_is_unknown_and_is_reconciled_through_the_search_endpoint() {
    let (server, gateway) = gateway_with_card().await;
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(payment_intent(
                    "pi_late",
                    "succeeded",
                    "tu_4:attempt-1",
                    1250,
                ))
                .set_delay(Duration::from_secs(3)),
        )
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/payment_intents/search"))
        .and(query_param(
            "query",
            "metadata['idempotency_key']:'tu_4:attempt-1'",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "object": "search_result",
            "url": "/v1/payment_intents/search",
            "has_more": false,
            "data": [payment_intent("pi_late", "succeeded", "tu_4:attempt-1", 1250)]
        })))
        .mount(&server)
        .await;

    let charge = gateway
        .charge(charge_request("tu_4:attempt-1", true))
        .await
        .unwrap();
    assert_eq!(charge.outcome, Outcome::Unknown);
    assert_eq!(charge.charge_id, None);

    let found = gateway
        .find_charge("tu_4:attempt-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.outcome, Outcome::Succeeded);
    assert_eq!(found.charge_id.as_deref(), Some("pi_late"));
}

#[tokio::test]
async fn a_server_error_is_unknown_and_nothing_found_is_none() {
    let (server, gateway) = gateway_with_card().await;
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .respond_with(ResponseTemplate::new(500).set_body_json(
            json!({"error": {"type": "api_error", "message": "Something went wrong"}}),
        ))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/payment_intents/search"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"object": "search_result", "has_more": false, "data": []})),
        )
        .mount(&server)
        .await;
    let charge = gateway
        .charge(charge_request("tu_5:attempt-1", true))
        .await
        .unwrap();
    assert_eq!(charge.outcome, Outcome::Unknown);
    assert!(
        gateway
            .find_charge("tu_5:attempt-1")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn detach_posts_to_the_payment_method_and_tolerates_one_already_detached() {
    let (server, gateway) = gateway_with_card().await;
    Mock::given(method("POST"))
        .and(path("/v1/payment_methods/pm_card/detach"))
        .respond_with(ResponseTemplate::new(200).set_body_json(payment_method("pm_card", "4242")))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/payment_methods/pm_card/detach"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {
            "type": "invalid_request_error",
            "code": "payment_method_not_attached",
            "message": "The payment method you provided is not attached to a customer so detachment is impossible."
        }})))
        .mount(&server)
        .await;
    gateway.detach("pm_card").await.unwrap();
    gateway.detach("pm_card").await.unwrap();
    assert_eq!(
        requests_to(&server, "POST", "/v1/payment_methods/pm_card/detach")
            .await
            .len(),
        2
    );
}

#[tokio::test]
async fn raw_cards_and_foreign_tokens_are_never_sent() {
    let (server, gateway) = gateway_with_card().await;
    let before = server.received_requests().await.unwrap().len();
    assert!(
        gateway
            .setup_card("acme", CardSource::Token("tok_visa".into()))
            .await
            .is_err()
    );
    assert!(!gateway.accepts_raw_cards());
    assert_eq!(server.received_requests().await.unwrap().len(), before);
}
