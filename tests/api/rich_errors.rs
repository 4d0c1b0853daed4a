//! The error contract of `proto/billing/v1/errors.proto`, as a client in any
//! language reads it: `ErrorInfo` with a stable reason and the domain
//! `billing.v1`, `BadRequest` naming every bad field, `PreconditionFailure`
//! on FAILED_PRECONDITION — no message parsing. And gzip both ways.

use billing::proto;
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic_types::{ErrorDetails, StatusExt};

use crate::helpers::{authed, spawn_app};
use crate::payment_methods::{ACCT, VISA, add_card_request, app_with_accounts, card, client};

/// The details of `status`, which must carry an `ErrorInfo` of billing.v1; its reason.
fn reason_of(status: &tonic::Status) -> (ErrorDetails, String) {
    let details = status
        .check_error_details()
        .unwrap_or_else(|e| panic!("undecodable details on {status:?}: {e}"));
    let info = details
        .error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo on {status:?}"))
        .clone();
    assert_eq!(info.domain, "billing.v1");
    (details, info.reason)
}

#[tokio::test]
async fn bad_request_lists_every_bad_field_of_a_card_not_only_the_first() {
    let (app, token) = app_with_accounts().await;
    let mut bad_card = card(VISA);
    bad_card.exp_month = 13;
    bad_card.cvc = "1".into();
    let status = client(&app)
        .add_card(authed(&token, add_card_request(ACCT, bad_card, "two-bad")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // The human message keeps its "field: reason" form, one per field.
    assert_eq!(
        status.message(),
        "card.exp_month: must be 1 to 12; card.cvc: must be 3 digits for this card"
    );
    let (details, reason) = reason_of(&status);
    assert_eq!(reason, "INVALID_FIELD");
    let fields: Vec<&str> = details
        .bad_request()
        .expect("BadRequest")
        .field_violations
        .iter()
        .map(|violation| violation.field.as_str())
        .collect();
    assert_eq!(fields, ["card.exp_month", "card.cvc"]);
    app.stop().await;
}

#[tokio::test]
async fn insufficient_funds_is_the_error_info_reason_with_a_precondition_failure() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "1.00").await;
    let status = app
        .balances()
        .debit(authed(
            &app.service_token(),
            proto::DebitRequest {
                account_id: "acme".into(),
                amount: "2.500001".into(),
                idempotency_key: "too-much".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let (details, reason) = reason_of(&status);
    assert_eq!(reason, "INSUFFICIENT_FUNDS");
    let violation = &details
        .precondition_failure()
        .expect("PreconditionFailure")
        .violations[0];
    assert_eq!(violation.r#type, "INSUFFICIENT_FUNDS");
    assert_eq!(violation.subject, "accounts/acme");
    app.stop().await;
}

#[tokio::test]
async fn a_reused_idempotency_key_is_the_error_info_reason_idempotency_key_reused() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "10.00").await;
    let token = app.service_token();
    let debit = |amount: &str| proto::DebitRequest {
        account_id: "acme".into(),
        amount: amount.into(),
        idempotency_key: "same-key".into(),
        ..Default::default()
    };
    app.balances()
        .debit(authed(&token, debit("1.00")))
        .await
        .unwrap();
    let status = app
        .balances()
        .debit(authed(&token, debit("2.00")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(reason_of(&status).1, "IDEMPOTENCY_KEY_REUSED");
    app.stop().await;
}

#[tokio::test]
async fn a_refill_amount_out_of_bounds_is_reported_with_the_other_bad_fields() {
    let (app, token) = app_with_accounts().await;
    let status = proto::balance_policy_client::BalancePolicyClient::new(app.channel.clone())
        .apply_low_balance_settings(authed(
            &token,
            proto::ApplyLowBalanceSettingsRequest {
                account_id: ACCT.into(),
                threshold: "ten".into(),
                refill_amount: "5.00".into(),
                max_top_ups_per_day: -1,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let (details, reason) = reason_of(&status);
    // Violations of different reasons: the overall reason is the general one…
    assert_eq!(reason, "INVALID_FIELD");
    // …and each field says its own.
    let violations: Vec<(&str, &str)> = details
        .bad_request()
        .expect("BadRequest")
        .field_violations
        .iter()
        .map(|v| (v.field.as_str(), v.reason.as_str()))
        .collect();
    assert_eq!(
        violations,
        [
            ("max_top_ups_per_day", "INVALID_FIELD"),
            ("threshold", "INVALID_FIELD"),
            ("refill_amount", "REFILL_OUT_OF_BOUNDS"),
        ]
    );
    app.stop().await;
}

#[tokio::test]
async fn errors_before_the_handler_carry_a_reason_too() {
    let app = spawn_app().await;
    // No token: the auth layer answers.
    let status = app
        .balances()
        .get_balance(proto::GetBalanceRequest {
            account_id: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason_of(&status).1, "BEARER_TOKEN_INVALID");
    // A viewer may not debit.
    let status = app
        .balances()
        .debit(authed(
            &app.token("viewer", Some("acme")),
            proto::DebitRequest::default(),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason_of(&status).1, "ROLE_NOT_ALLOWED");
    // Another account's data is not found, with its reason.
    let status = app
        .balances()
        .get_balance(authed(
            &app.service_token(),
            proto::GetBalanceRequest {
                account_id: "nobody".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(reason_of(&status).1, "ACCOUNT_NOT_FOUND");
    app.stop().await;
}

#[tokio::test]
async fn gzip_compressed_requests_are_accepted_and_responses_come_back_gzipped() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "10.00").await;
    let mut balances = app
        .balances()
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    let response = balances
        .debit(authed(
            &app.service_token(),
            proto::DebitRequest {
                account_id: "acme".into(),
                amount: "0.000001".into(),
                idempotency_key: "gzip".into(),
                description: "x".repeat(400),
                ..Default::default()
            },
        ))
        .await
        .expect("a gzip-compressed request is accepted");
    assert_eq!(
        response
            .metadata()
            .get("grpc-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("gzip"),
        "the response is compressed when the client accepts gzip"
    );
    assert_eq!(response.into_inner().balance, "9.999999");
    app.stop().await;
}
