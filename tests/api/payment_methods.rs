//! PaymentMethods end to end: cards with 3-D Secure, priority and primary,
//! Add Funds and retry against the sandbox gateway, permissions, bad input,
//! and no card number or CVC anywhere.

mod bad_input;
mod cards;
mod funds;
mod ordering;
mod permissions;
mod sandbox_cards;
mod secrets;

use billing::proto::{self, payment_methods_client::PaymentMethodsClient};
use chrono::Datelike;
use tonic::transport::Channel;

use crate::helpers::{TestApp, authed, spawn_app};

pub const ACCT: &str = "acme";
pub const OTHER: &str = "globex";

pub const VISA: &str = "4242424242424242";
pub const ALWAYS_3DS: &str = "4000002760003184";
pub const SETUP_3DS: &str = "4000002500003155";
pub const AUTH_THEN_INSUFFICIENT: &str = "4000008260003178";
pub const DECLINED_AT_SETUP: &str = "4000000000000002";
pub const DECLINES_CHARGES: &str = "4000000000000341";
pub const EXPIRED: &str = "4000000000000069";
pub const INCORRECT_CVC: &str = "4000000000000127";
pub const PROCESSING_ERROR: &str = "4000000000000119";
pub const TIMES_OUT: &str = "4000000000009904";
pub const OFF_SESSION_3DS: &str = "4000003800000446";
pub const MASTERCARD: &str = "5555555555554444";
pub const AMEX: &str = "378282246310005";

pub fn client(app: &TestApp) -> PaymentMethodsClient<Channel> {
    PaymentMethodsClient::new(app.channel.clone())
}

/// A server with two empty USD accounts, and an admin token for the first.
pub async fn app_with_accounts() -> (TestApp, String) {
    let app = spawn_app().await;
    app.account_with_balance(ACCT, "0").await;
    app.account_with_balance(OTHER, "0").await;
    let token = app.token("admin", Some(ACCT));
    (app, token)
}

pub fn next_year() -> i32 {
    chrono::Utc::now().year() + 1
}

pub fn card(number: &str) -> proto::CardDetails {
    let cvc = if number.starts_with('3') {
        "1234"
    } else {
        "123"
    };
    proto::CardDetails {
        number: number.into(),
        exp_month: 12,
        exp_year: next_year(),
        cvc: cvc.into(),
        holder_name: "Ada Lovelace".into(),
    }
}

pub fn add_card_request(
    account: &str,
    card: proto::CardDetails,
    key: &str,
) -> proto::AddCardRequest {
    proto::AddCardRequest {
        account_id: account.into(),
        source: Some(proto::add_card_request::Source::Card(card)),
        billing_address: Some(proto::BillingAddress {
            line1: "1 Analytical Row".into(),
            city: "London".into(),
            postal_code: "N1 9GU".into(),
            country: "GB".into(),
            ..Default::default()
        }),
        idempotency_key: key.into(),
    }
}

pub async fn add_card(
    app: &TestApp,
    token: &str,
    account: &str,
    number: &str,
) -> proto::AddCardResponse {
    client(app)
        .add_card(authed(
            token,
            add_card_request(account, card(number), &format!("add-{number}")),
        ))
        .await
        .expect("add card")
        .into_inner()
}

/// Adds a card and, when it needs 3-D Secure, passes the challenge.
pub async fn add_active_card(app: &TestApp, token: &str, account: &str, number: &str) -> String {
    let added = add_card(app, token, account, number).await;
    let method = added.payment_method.unwrap();
    if added.next_action.is_some() {
        confirm(app, token, account, &method.payment_method_id, true)
            .await
            .expect("confirm");
    }
    method.payment_method_id
}

pub async fn confirm(
    app: &TestApp,
    token: &str,
    account: &str,
    id: &str,
    passed: bool,
) -> Result<proto::PaymentMethod, tonic::Status> {
    let result = if passed {
        proto::AuthenticationResult::Passed
    } else {
        proto::AuthenticationResult::Failed
    };
    client(app)
        .confirm_card(authed(
            token,
            proto::ConfirmCardRequest {
                account_id: account.into(),
                payment_method_id: id.into(),
                authentication_result: result as i32,
            },
        ))
        .await
        .map(|r| r.into_inner().payment_method.unwrap())
}

pub async fn list(app: &TestApp, token: &str, account: &str) -> Vec<proto::PaymentMethod> {
    client(app)
        .list_payment_methods(authed(
            token,
            proto::ListPaymentMethodsRequest {
                account_id: account.into(),
                ..Default::default()
            },
        ))
        .await
        .expect("list")
        .into_inner()
        .payment_methods
}

pub fn funds(amount: &str, method: &str, key: &str) -> proto::AddFundsRequest {
    proto::AddFundsRequest {
        account_id: ACCT.into(),
        amount: amount.into(),
        payment_method_id: method.into(),
        idempotency_key: key.into(),
    }
}

pub async fn add_funds(
    app: &TestApp,
    token: &str,
    request: proto::AddFundsRequest,
) -> Result<proto::AddFundsResponse, tonic::Status> {
    client(app)
        .add_funds(authed(token, request))
        .await
        .map(|r| r.into_inner())
}

pub async fn balance(app: &TestApp, account: &str) -> String {
    app.balances()
        .get_balance(authed(
            &app.service_token(),
            proto::GetBalanceRequest {
                account_id: account.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .balance
}

pub async fn count_where(app: &TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pool).await.unwrap()
}

/// A Luhn-valid Visa number unique to `n` (for tests that add many cards).
pub fn unique_visa(n: u32) -> String {
    let body = format!("424242424{n:06}");
    let check = (0..10).find(|d| luhn_ok(&format!("{body}{d}"))).unwrap();
    format!("{body}{check}")
}

fn luhn_ok(digits: &str) -> bool {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 1 {
                if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

pub fn status(method: &proto::PaymentMethod) -> proto::PaymentMethodStatus {
    proto::PaymentMethodStatus::try_from(method.status).unwrap()
}

pub fn top_up_status(top_up: &proto::TopUp) -> proto::TopUpStatus {
    proto::TopUpStatus::try_from(top_up.status).unwrap()
}
