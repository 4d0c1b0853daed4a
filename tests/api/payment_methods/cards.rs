//! Adding cards: auto-charge of the first, 3-D Secure, duplicates, idempotency, tokens.

use billing::proto::{self, PaymentMethodStatus};
use tonic::Code;

use super::*;
use crate::helpers::{authed, count_rows};

#[tokio::test]
async fn first_card_is_active_with_auto_charge_and_primary() {
    let (app, token) = app_with_accounts().await;
    let added = add_card(&app, &token, ACCT, VISA).await;
    assert!(added.next_action.is_none());
    let method = added.payment_method.unwrap();
    assert_eq!(status(&method), PaymentMethodStatus::Active);
    assert_eq!(
        (method.brand.as_str(), method.last4.as_str()),
        ("visa", "4242")
    );
    assert_eq!((method.exp_month, method.exp_year), (12, next_year()));
    assert_eq!(method.holder_name, "Ada Lovelace");
    assert_eq!(method.billing_address.unwrap().country, "GB");
    assert!(method.auto_charge && method.primary);
    assert_eq!(method.priority, 1);
    let audits: i64 = count_where(
        &app,
        "SELECT COUNT(*) FROM audit_log WHERE action = 'add_card'",
    )
    .await;
    assert_eq!(audits, 1);
    app.stop().await;
}

#[tokio::test]
async fn second_card_starts_with_auto_charge_off() {
    let (app, token) = app_with_accounts().await;
    add_card(&app, &token, ACCT, VISA).await;
    let second = add_card(&app, &token, ACCT, MASTERCARD)
        .await
        .payment_method
        .unwrap();
    assert_eq!(second.brand, "mastercard");
    assert!(!second.auto_charge && !second.primary);
    assert_eq!(second.priority, 2);
    app.stop().await;
}

#[tokio::test]
async fn three_d_secure_card_is_pending_until_the_challenge_passes() {
    let (app, token) = app_with_accounts().await;
    let added = add_card(&app, &token, ACCT, SETUP_3DS).await;
    let method = added.payment_method.unwrap();
    let action = added.next_action.expect("a 3-D Secure challenge");
    assert_eq!(action.r#type, "three_d_secure");
    assert!(!action.challenge_id.is_empty() && !action.redirect_url.is_empty());
    assert_eq!(status(&method), PaymentMethodStatus::PendingAuthentication);
    assert!(method.auto_charge, "first card");
    assert!(!method.primary, "a pending card is never the primary");

    let confirmed = confirm(&app, &token, ACCT, &method.payment_method_id, true)
        .await
        .unwrap();
    assert_eq!(status(&confirmed), PaymentMethodStatus::Active);
    assert!(confirmed.primary);
    // Confirming again with the same result changes nothing.
    let again = confirm(&app, &token, ACCT, &method.payment_method_id, true)
        .await
        .unwrap();
    assert_eq!(status(&again), PaymentMethodStatus::Active);
    let wrong = confirm(&app, &token, ACCT, &method.payment_method_id, false)
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::FailedPrecondition);
    app.stop().await;
}

#[tokio::test]
async fn failed_three_d_secure_marks_the_card_failed_and_it_cannot_be_charged() {
    let (app, token) = app_with_accounts().await;
    let method = add_card(&app, &token, ACCT, SETUP_3DS)
        .await
        .payment_method
        .unwrap();
    let failed = confirm(&app, &token, ACCT, &method.payment_method_id, false)
        .await
        .unwrap();
    assert_eq!(status(&failed), PaymentMethodStatus::Failed);
    assert_eq!(failed.disabled_reason, "authentication_failed");
    assert!(!failed.auto_charge && !failed.primary);
    let charge = add_funds(
        &app,
        &token,
        funds("10.00", &method.payment_method_id, "f1"),
    )
    .await
    .unwrap_err();
    assert_eq!(charge.code(), Code::FailedPrecondition);
    // The failed card does not block adding it again.
    let again = client(&app)
        .add_card(authed(
            &token,
            add_card_request(ACCT, card(SETUP_3DS), "again"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(again.next_action.is_some());
    app.stop().await;
}

#[tokio::test]
async fn card_pending_authentication_is_never_charged() {
    let (app, token) = app_with_accounts().await;
    let method = add_card(&app, &token, ACCT, SETUP_3DS)
        .await
        .payment_method
        .unwrap();
    let error = add_funds(
        &app,
        &token,
        funds("10.00", &method.payment_method_id, "f1"),
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(
        error.message().contains("3-D Secure"),
        "{}",
        error.message()
    );
    // Nor through the default (it is not the primary).
    let error = add_funds(&app, &token, funds("10.00", "", "f2"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert_eq!(count_rows(&app.pool, "sandbox_charges").await, 0);
    assert_eq!(count_rows(&app.pool, "top_ups").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn duplicate_card_is_already_exists_until_it_is_removed() {
    let (app, token) = app_with_accounts().await;
    let first = add_card(&app, &token, ACCT, VISA)
        .await
        .payment_method
        .unwrap();
    let duplicate = client(&app)
        .add_card(authed(
            &token,
            add_card_request(ACCT, card("4242 4242 4242 4242"), "dup"),
        ))
        .await
        .unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists);
    assert_eq!(count_rows(&app.pool, "payment_methods").await, 1);
    // The same card on another account is not a duplicate.
    let other = app.token("admin", Some(OTHER));
    add_card(&app, &other, OTHER, VISA).await;

    client(&app)
        .remove_payment_method(authed(
            &token,
            proto::RemovePaymentMethodRequest {
                account_id: ACCT.into(),
                payment_method_id: first.payment_method_id.clone(),
            },
        ))
        .await
        .unwrap();
    let re_added = client(&app)
        .add_card(authed(&token, add_card_request(ACCT, card(VISA), "re-add")))
        .await
        .unwrap()
        .into_inner()
        .payment_method
        .unwrap();
    assert_ne!(re_added.payment_method_id, first.payment_method_id);
    assert!(
        re_added.auto_charge,
        "it is again the account's first live card"
    );
    app.stop().await;
}

#[tokio::test]
async fn add_card_is_idempotent_by_key_and_refuses_a_different_request() {
    let (app, token) = app_with_accounts().await;
    let request = add_card_request(ACCT, card(SETUP_3DS), "card-key");
    let first = client(&app)
        .add_card(authed(&token, request.clone()))
        .await
        .unwrap()
        .into_inner();
    let replay = client(&app)
        .add_card(authed(&token, request))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.payment_method, replay.payment_method);
    assert_eq!(first.next_action, replay.next_action);
    assert_eq!(count_rows(&app.pool, "payment_methods").await, 1);
    assert_eq!(count_rows(&app.pool, "sandbox_cards").await, 1);

    let different = client(&app)
        .add_card(authed(
            &token,
            add_card_request(ACCT, card(VISA), "card-key"),
        ))
        .await
        .unwrap_err();
    assert_eq!(different.code(), Code::AlreadyExists);
    assert!(
        different.message().contains("idempotency_key"),
        "{}",
        different.message()
    );
    assert_eq!(count_rows(&app.pool, "payment_methods").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn gateway_tokens_from_client_side_tokenization_are_accepted() {
    let (app, token) = app_with_accounts().await;
    let request = proto::AddCardRequest {
        account_id: ACCT.into(),
        source: Some(proto::add_card_request::Source::GatewayToken(
            "tok_amex".into(),
        )),
        billing_address: None,
        idempotency_key: "tok-1".into(),
    };
    let method = client(&app)
        .add_card(authed(&token, request.clone()))
        .await
        .unwrap()
        .into_inner();
    let method = method.payment_method.unwrap();
    assert_eq!(
        (method.brand.as_str(), method.last4.as_str()),
        ("amex", "0005")
    );
    assert_eq!(status(&method), PaymentMethodStatus::Active);

    let unknown = proto::AddCardRequest {
        source: Some(proto::add_card_request::Source::GatewayToken(
            "tok_nonsense".into(),
        )),
        idempotency_key: "tok-2".into(),
        ..request
    };
    let error = client(&app)
        .add_card(authed(&token, unknown))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().starts_with("gateway_token"),
        "{}",
        error.message()
    );
    app.stop().await;
}

#[tokio::test]
async fn get_returns_a_method_and_removed_ones_for_history() {
    let (app, token) = app_with_accounts().await;
    let id = add_active_card(&app, &token, ACCT, VISA).await;
    let get = |id: String| {
        let app = &app;
        let token = token.clone();
        async move {
            client(app)
                .get_payment_method(authed(
                    &token,
                    proto::GetPaymentMethodRequest {
                        account_id: ACCT.into(),
                        payment_method_id: id,
                    },
                ))
                .await
                .map(|r| r.into_inner().payment_method.unwrap())
        }
    };
    let method = get(id.clone()).await.unwrap();
    assert!(method.primary);
    let removed = client(&app)
        .remove_payment_method(authed(
            &token,
            proto::RemovePaymentMethodRequest {
                account_id: ACCT.into(),
                payment_method_id: id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .payment_method
        .unwrap();
    assert_eq!(status(&removed), PaymentMethodStatus::Removed);
    assert_eq!(
        status(&get(id.clone()).await.unwrap()),
        PaymentMethodStatus::Removed
    );
    assert!(list(&app, &token, ACCT).await.is_empty());
    let detached: i64 = count_where(
        &app,
        "SELECT COUNT(*) FROM sandbox_cards WHERE detached_at IS NOT NULL",
    )
    .await;
    assert_eq!(detached, 1, "removed cards are detached at the gateway");
    app.stop().await;
}
