//! Bad input: the right code, the field named first, and nothing written.

use billing::proto;
use tonic::Code;

use super::*;
use crate::helpers::{authed, count_rows};

const WRITTEN_TABLES: [&str; 9] = [
    "payment_methods",
    "sandbox_cards",
    "sandbox_charges",
    "top_ups",
    "top_up_attempts",
    "ledger_entries",
    "idempotency_keys",
    "audit_log",
    "balance_events",
];

async fn row_counts(app: &TestApp) -> Vec<i64> {
    let mut counts = Vec::new();
    for table in WRITTEN_TABLES {
        counts.push(count_rows(&app.pool, table).await);
    }
    counts
}

#[tokio::test]
async fn bad_cards_are_invalid_argument_naming_the_field_and_write_nothing() {
    let (app, token) = app_with_accounts().await;
    let before = row_counts(&app).await;
    let cases = [
        (
            "card.number",
            proto::CardDetails {
                number: "4242424242424241".into(),
                ..card(VISA)
            },
        ),
        (
            "card.number",
            proto::CardDetails {
                number: "not a card".into(),
                ..card(VISA)
            },
        ),
        (
            "card.exp_year",
            proto::CardDetails {
                exp_year: 2020,
                ..card(VISA)
            },
        ),
        (
            "card.exp_month",
            proto::CardDetails {
                exp_month: 13,
                ..card(VISA)
            },
        ),
        (
            "card.cvc",
            proto::CardDetails {
                cvc: "12".into(),
                ..card(VISA)
            },
        ),
        (
            "card.cvc",
            proto::CardDetails {
                cvc: "123".into(),
                ..card(AMEX)
            },
        ),
    ];
    for (n, (field, bad)) in cases.into_iter().enumerate() {
        let error = client(&app)
            .add_card(authed(
                &token,
                add_card_request(ACCT, bad, &format!("bad-{n}")),
            ))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{field}");
        assert!(
            error.message().starts_with(field),
            "{field}: {}",
            error.message()
        );
        assert!(
            !error.message().contains("424242424242"),
            "{}",
            error.message()
        );
    }
    let no_source = proto::AddCardRequest {
        source: None,
        ..add_card_request(ACCT, card(VISA), "no-source")
    };
    let error = client(&app)
        .add_card(authed(&token, no_source))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    let no_key = add_card_request(ACCT, card(VISA), "");
    let error = client(&app)
        .add_card(authed(&token, no_key))
        .await
        .unwrap_err();
    assert!(
        error.message().starts_with("idempotency_key"),
        "{}",
        error.message()
    );
    assert_eq!(row_counts(&app).await, before);
    app.stop().await;
}

#[tokio::test]
async fn bad_amounts_are_invalid_argument_and_charge_nothing_up_to_the_largest_single_charge() {
    let (app, token) = app_with_accounts().await;
    let id = add_active_card(&app, &token, ACCT, VISA).await;
    let before = row_counts(&app).await;
    // Above the largest single charge (`--refill-max`, 10,000.00 USD): a
    // typo never reaches the card.
    let too_large = ["10000.01", "999999999999.99"];
    for amount in ["10.001", "0", "0.00", "-5.00", "1e3", "", "ten"]
        .into_iter()
        .chain(too_large)
    {
        let error = add_funds(&app, &token, funds(amount, "", &format!("amount-{amount}")))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{amount:?}");
        assert!(
            error.message().starts_with("amount"),
            "{amount:?}: {}",
            error.message()
        );
        let error = client(&app)
            .retry_payment_method(authed(
                &token,
                proto::RetryPaymentMethodRequest {
                    account_id: ACCT.into(),
                    payment_method_id: id.clone(),
                    idempotency_key: format!("retry-{amount}"),
                    amount: amount.into(),
                },
            ))
            .await;
        // An empty retry amount means the default, which is fine.
        if !amount.is_empty() {
            assert_eq!(
                error.unwrap_err().code(),
                Code::InvalidArgument,
                "{amount:?}"
            );
        }
    }
    let after: Vec<i64> = row_counts(&app).await;
    // Only the one valid (empty-amount) retry wrote anything.
    assert_eq!(after[3], before[3] + 1, "top_ups");
    let error = add_funds(&app, &token, funds("10.00", "", ""))
        .await
        .unwrap_err();
    assert!(
        error.message().starts_with("idempotency_key"),
        "{}",
        error.message()
    );
    app.stop().await;
}

#[tokio::test]
async fn unknown_or_another_accounts_method_is_not_found_and_nothing_changes() {
    let (app, token) = app_with_accounts().await;
    add_active_card(&app, &token, ACCT, VISA).await;
    let other_token = app.token("admin", Some(OTHER));
    let foreign = add_active_card(&app, &other_token, OTHER, MASTERCARD).await;
    let before = row_counts(&app).await;
    for id in [
        "pm_00000000000000000000000000000000",
        "nonsense",
        foreign.as_str(),
    ] {
        let mut c = client(&app);
        let codes = [
            c.get_payment_method(authed(
                &token,
                proto::GetPaymentMethodRequest {
                    account_id: ACCT.into(),
                    payment_method_id: id.into(),
                },
            ))
            .await
            .map(|_| ()),
            c.confirm_card(authed(
                &token,
                proto::ConfirmCardRequest {
                    account_id: ACCT.into(),
                    payment_method_id: id.into(),
                    authentication_result: proto::AuthenticationResult::Passed as i32,
                },
            ))
            .await
            .map(|_| ()),
            c.set_auto_charge(authed(
                &token,
                proto::SetAutoChargeRequest {
                    account_id: ACCT.into(),
                    payment_method_id: id.into(),
                    enabled: true,
                },
            ))
            .await
            .map(|_| ()),
            c.remove_payment_method(authed(
                &token,
                proto::RemovePaymentMethodRequest {
                    account_id: ACCT.into(),
                    payment_method_id: id.into(),
                },
            ))
            .await
            .map(|_| ()),
            add_funds(&app, &token, funds("10.00", id, &format!("nf-{id}")))
                .await
                .map(|_| ()),
            c.retry_payment_method(authed(
                &token,
                proto::RetryPaymentMethodRequest {
                    account_id: ACCT.into(),
                    payment_method_id: id.into(),
                    idempotency_key: format!("nr-{id}"),
                    amount: String::new(),
                },
            ))
            .await
            .map(|_| ()),
        ];
        for (rpc, result) in codes.into_iter().enumerate() {
            let error = result.unwrap_err();
            assert_eq!(error.code(), Code::NotFound, "rpc #{rpc} with {id}");
            assert_eq!(error.message(), "payment method not found");
        }
    }
    assert_eq!(row_counts(&app).await, before);
    let foreign_method = list(&app, &other_token, OTHER).await;
    assert!(
        foreign_method[0].auto_charge && foreign_method[0].primary,
        "untouched"
    );
    app.stop().await;
}
