//! The Stripe gateway against a local HTTP server (wiremock) answering with
//! objects shaped as Stripe documents them; its webhook handler with signed
//! events; and the service end to end over gRPC with the gateway set to stripe.

mod confirm;
mod gateway;
mod grpc;
mod webhook;

use std::sync::Arc;
use std::time::Duration;

use billing::gateway::stripe::SecretKey;
use billing::gateway::{StripeGateway, StripeSettings};
use serde_json::{Value, json};
use sqlx::PgPool;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

pub const SECRET_KEY: &str = "sk_test_51TESTKEYnotreal";
pub const CUSTOMER: &str = "cus_TestCustomer1";

/// A gateway talking to `server`, with a short timeout so timeouts stay fast.
pub fn gateway_for(server: &MockServer, pool: &PgPool) -> StripeGateway {
    let mut settings = StripeSettings::new(server.uri(), SecretKey::new(SECRET_KEY));
    settings.timeout = Duration::from_millis(400);
    settings.return_url = Some("https://panel.example.com/billing/3ds-return".into());
    StripeGateway::new(pool.clone(), settings).expect("stripe gateway")
}

pub fn shared(gateway: StripeGateway) -> Arc<dyn billing::gateway::PaymentGateway> {
    Arc::new(gateway)
}

pub fn payment_method(id: &str, last4: &str) -> Value {
    json!({
        "id": id,
        "object": "payment_method",
        "type": "card",
        "customer": null,
        "livemode": false,
        "card": {
            "brand": "visa",
            "last4": last4,
            "exp_month": 12,
            "exp_year": 2034,
            "fingerprint": format!("fp_{id}"),
            "funding": "credit",
            "country": "US"
        }
    })
}

pub fn setup_intent(id: &str, pm: &str, status: &str) -> Value {
    let next_action = if status == "requires_action" {
        json!({
            "type": "redirect_to_url",
            "redirect_to_url": {
                "url": format!("https://hooks.stripe.com/3d_secure_2/hosted?setup_intent={id}"),
                "return_url": "https://panel.example.com/billing/3ds-return"
            }
        })
    } else {
        Value::Null
    };
    json!({
        "id": id,
        "object": "setup_intent",
        "client_secret": format!("{id}_secret_abc"),
        "customer": CUSTOMER,
        "payment_method": pm,
        "status": status,
        "usage": "off_session",
        "next_action": next_action,
        "last_setup_error": null,
        "livemode": false
    })
}

pub fn payment_intent(id: &str, status: &str, key: &str, amount: i64) -> Value {
    json!({
        "id": id,
        "object": "payment_intent",
        "amount": amount,
        "currency": "usd",
        "customer": CUSTOMER,
        "payment_method": "pm_card",
        "status": status,
        "client_secret": format!("{id}_secret_xyz"),
        "metadata": { "idempotency_key": key },
        "next_action": if status == "requires_action" {
            json!({"type": "redirect_to_url", "redirect_to_url": {"url": format!("https://hooks.stripe.com/3d_secure_2/hosted?payment_intent={id}")}})
        } else { Value::Null },
        "last_payment_error": null,
        "livemode": false
    })
}

/// Stripe's answer to a declined confirmation: HTTP 402 and a `card_error`.
pub fn card_error(code: &str, decline_code: Option<&str>, intent: Value) -> ResponseTemplate {
    let mut error = json!({
        "type": "card_error",
        "code": code,
        "message": "Your card was declined.",
        "payment_intent": intent,
        "doc_url": format!("https://stripe.com/docs/error-codes/{code}")
    });
    if let Some(decline) = decline_code {
        error["decline_code"] = json!(decline);
    }
    ResponseTemplate::new(402).set_body_json(json!({ "error": error }))
}

/// The customer and payment-method endpoints every card set-up calls.
pub async fn mount_customer_and_cards(server: &MockServer, cards: &[&str]) {
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": CUSTOMER, "object": "customer", "livemode": false
        })))
        .mount(server)
        .await;
    for (index, card) in cards.iter().enumerate() {
        Mock::given(method("GET"))
            .and(path(format!("/v1/payment_methods/{card}")))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(payment_method(card, &format!("42{index:02}"))),
            )
            .mount(server)
            .await;
    }
}

/// The requests `server` received for `method path`, bodies as text.
pub async fn requests_to(server: &MockServer, verb: &str, route: &str) -> Vec<Request> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.method.as_str() == verb && r.url.path() == route)
        .collect()
}

pub fn body(request: &Request) -> String {
    String::from_utf8(request.body.clone()).unwrap()
}

/// The decoded form fields of a request.
pub fn form(request: &Request) -> Vec<(String, String)> {
    url::form_urlencoded::parse(&request.body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

pub fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}
