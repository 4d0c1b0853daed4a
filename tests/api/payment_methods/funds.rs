//! Add Funds and retry: the ledger is credited once, only after the charge succeeded.

use billing::proto::{self, PaymentMethodStatus, TopUpStatus, TopUpTrigger};
use tonic::Code;

use super::*;
use crate::helpers::{authed, count_rows};

#[tokio::test]
async fn add_funds_charges_the_primary_card_and_the_balance_rises() {
    let (app, token) = app_with_accounts().await;
    let primary = add_active_card(&app, &token, ACCT, VISA).await;
    add_active_card(&app, &token, ACCT, MASTERCARD).await;
    let response = add_funds(&app, &token, funds("25.00", "", "funds-1"))
        .await
        .unwrap();
    assert!(response.next_action.is_none());
    assert_eq!(response.balance, "25.00");
    let top_up = response.top_up.unwrap();
    assert_eq!(top_up_status(&top_up), TopUpStatus::Succeeded);
    assert_eq!(top_up.trigger, TopUpTrigger::Manual as i32);
    assert_eq!(
        (top_up.amount.as_str(), top_up.currency.as_str()),
        ("25.00", "USD")
    );
    assert_eq!(top_up.attempts.len(), 1);
    assert_eq!(top_up.attempts[0].payment_method_id, primary);
    assert_eq!(
        top_up.attempts[0].outcome,
        proto::AttemptOutcome::Succeeded as i32
    );
    assert!(!top_up.transaction_id.is_empty());
    assert_eq!(balance(&app, ACCT).await, "25.00");
    let kind: String =
        sqlx::query_scalar("SELECT kind FROM ledger_entries WHERE transaction_id = $1::uuid")
            .bind(&top_up.transaction_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(kind, "top_up");
    let (charged_token, amount): (String, rust_decimal::Decimal) =
        sqlx::query_as("SELECT token, amount FROM sandbox_charges")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let primary_token: String = sqlx::query_scalar(
        "SELECT gateway_token FROM payment_methods WHERE payment_method_id = $1",
    )
    .bind(&primary)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(charged_token, primary_token);
    assert_eq!(amount.to_string(), "25.000000");
    app.stop().await;
}

#[tokio::test]
async fn add_funds_retried_with_the_same_key_charges_once_and_credits_once() {
    let (app, token) = app_with_accounts().await;
    add_active_card(&app, &token, ACCT, VISA).await;
    let first = add_funds(&app, &token, funds("10.00", "", "same-key"))
        .await
        .unwrap();
    // Retries, some of them concurrent.
    let retries = (0..4).map(|_| add_funds(&app, &token, funds("10.00", "", "same-key")));
    for retry in futures::future::join_all(retries).await {
        let retry = retry.unwrap();
        assert_eq!(retry.top_up, first.top_up);
    }
    assert_eq!(count_rows(&app.pool, "sandbox_charges").await, 1);
    assert_eq!(count_rows(&app.pool, "top_ups").await, 1);
    assert_eq!(
        count_where(
            &app,
            "SELECT COUNT(*) FROM ledger_entries WHERE kind = 'top_up'"
        )
        .await,
        1
    );
    assert_eq!(balance(&app, ACCT).await, "10.00");

    let different = add_funds(&app, &token, funds("11.00", "", "same-key"))
        .await
        .unwrap_err();
    assert_eq!(different.code(), Code::AlreadyExists);
    assert_eq!(count_rows(&app.pool, "sandbox_charges").await, 1);
    assert_eq!(balance(&app, ACCT).await, "10.00");
    app.stop().await;
}

#[tokio::test]
async fn concurrent_first_requests_with_one_key_charge_once() {
    let (app, token) = app_with_accounts().await;
    add_active_card(&app, &token, ACCT, VISA).await;
    let calls = (0..6).map(|_| add_funds(&app, &token, funds("7.00", "", "race")));
    let results = futures::future::join_all(calls).await;
    let ids: std::collections::HashSet<String> = results
        .into_iter()
        .map(|r| r.unwrap().top_up.unwrap().top_up_id)
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(count_rows(&app.pool, "sandbox_charges").await, 1);
    assert_eq!(balance(&app, ACCT).await, "7.00");
    app.stop().await;
}

#[tokio::test]
async fn add_funds_without_a_primary_card_is_a_failed_precondition() {
    let (app, token) = app_with_accounts().await;
    let error = add_funds(&app, &token, funds("10.00", "", "k"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    let id = add_active_card(&app, &token, ACCT, VISA).await;
    client(&app)
        .set_auto_charge(authed(
            &token,
            proto::SetAutoChargeRequest {
                account_id: ACCT.into(),
                payment_method_id: id.clone(),
                enabled: false,
            },
        ))
        .await
        .unwrap();
    let error = add_funds(&app, &token, funds("10.00", "", "k"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    // Naming the card still works: auto-charge is about automatic charges.
    let named = add_funds(&app, &token, funds("10.00", &id, "k"))
        .await
        .unwrap();
    assert_eq!(
        top_up_status(named.top_up.as_ref().unwrap()),
        TopUpStatus::Succeeded
    );
    app.stop().await;
}

async fn retry(
    app: &TestApp,
    token: &str,
    id: &str,
    amount: &str,
    key: &str,
) -> Result<proto::RetryPaymentMethodResponse, tonic::Status> {
    client(app)
        .retry_payment_method(authed(
            token,
            proto::RetryPaymentMethodRequest {
                account_id: ACCT.into(),
                payment_method_id: id.into(),
                idempotency_key: key.into(),
                amount: amount.into(),
            },
        ))
        .await
        .map(|r| r.into_inner())
}

/// What the auto top-up engine does when an automatic charge is declined.
async fn disable_temporarily(app: &TestApp, id: &str, reason: &str) {
    sqlx::query(
        "UPDATE payment_methods SET status = 'TEMPORARILY_DISABLED', disabled_reason = $2 WHERE payment_method_id = $1",
    )
    .bind(id)
    .bind(reason)
    .execute(&app.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn successful_retry_restores_a_temporarily_disabled_method() {
    let (app, token) = app_with_accounts().await;
    let id = add_active_card(&app, &token, ACCT, VISA).await;
    disable_temporarily(&app, &id, "insufficient_funds").await;
    assert!(!list(&app, &token, ACCT).await[0].primary);

    let response = retry(&app, &token, &id, "", "retry-1").await.unwrap();
    let method = response.payment_method.unwrap();
    assert_eq!(status(&method), PaymentMethodStatus::Active);
    assert!(method.auto_charge && method.primary);
    assert_eq!(method.disabled_reason, "");
    let top_up = response.top_up.unwrap();
    assert_eq!(top_up.trigger, TopUpTrigger::Retry as i32);
    assert_eq!(top_up_status(&top_up), TopUpStatus::Succeeded);
    assert_eq!(top_up.amount, "30.00", "the default retry amount");
    assert_eq!(balance(&app, ACCT).await, "30.00");

    let replay = retry(&app, &token, &id, "", "retry-1").await.unwrap();
    assert_eq!(replay.top_up.unwrap().top_up_id, top_up.top_up_id);
    assert_eq!(count_rows(&app.pool, "sandbox_charges").await, 1);
    assert_eq!(balance(&app, ACCT).await, "30.00");
    app.stop().await;
}

#[tokio::test]
async fn declined_retry_keeps_the_method_disabled_with_the_new_reason_untouched_ledger() {
    let (app, token) = app_with_accounts().await;
    let id = add_active_card(&app, &token, ACCT, DECLINES_CHARGES).await;
    disable_temporarily(&app, &id, "card_declined").await;
    let response = retry(&app, &token, &id, "12.00", "retry-2").await.unwrap();
    let top_up = response.top_up.unwrap();
    assert_eq!(top_up_status(&top_up), TopUpStatus::Failed);
    assert_eq!(top_up.failure_reason, "card_declined");
    assert_eq!(
        status(&response.payment_method.unwrap()),
        PaymentMethodStatus::TemporarilyDisabled
    );
    assert_eq!(count_rows(&app.pool, "ledger_entries").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn manual_add_funds_also_restores_a_temporarily_disabled_method() {
    let (app, token) = app_with_accounts().await;
    let id = add_active_card(&app, &token, ACCT, VISA).await;
    disable_temporarily(&app, &id, "processing_error").await;
    add_funds(&app, &token, funds("5.00", &id, "manual"))
        .await
        .unwrap();
    let method = &list(&app, &token, ACCT).await[0];
    assert_eq!(status(method), PaymentMethodStatus::Active);
    assert!(method.primary);
    app.stop().await;
}
