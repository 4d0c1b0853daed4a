//! Every sandbox test card through AddCard and AddFunds, and the gateway's
//! off-session behaviours called directly.

use billing::gateway::{ChargeRequest, Outcome, PaymentGateway, SandboxGateway};
use billing::money::Currency;
use billing::proto::{PaymentMethodStatus as Pm, TopUpStatus as Tu};
use rust_decimal::Decimal;

use super::*;
use crate::helpers::count_rows;

struct Case {
    number: &'static str,
    /// Status right after AddCard.
    added: Pm,
    /// Outcome of AddFunds (after a passed challenge); `None` when it cannot be charged.
    funded: Option<(Tu, &'static str, bool)>,
}

const CASES: &[Case] = &[
    Case {
        number: VISA,
        added: Pm::Active,
        funded: Some((Tu::Succeeded, "", false)),
    },
    Case {
        number: ALWAYS_3DS,
        added: Pm::PendingAuthentication,
        funded: Some((Tu::RequiresAction, "", false)),
    },
    Case {
        number: SETUP_3DS,
        added: Pm::PendingAuthentication,
        funded: Some((Tu::Succeeded, "", false)),
    },
    Case {
        number: AUTH_THEN_INSUFFICIENT,
        added: Pm::PendingAuthentication,
        funded: Some((Tu::Failed, "insufficient_funds", false)),
    },
    Case {
        number: DECLINED_AT_SETUP,
        added: Pm::Failed,
        funded: None,
    },
    Case {
        number: DECLINES_CHARGES,
        added: Pm::Active,
        funded: Some((Tu::Failed, "card_declined", false)),
    },
    Case {
        number: EXPIRED,
        added: Pm::Active,
        funded: Some((Tu::Failed, "expired_card", true)),
    },
    Case {
        number: INCORRECT_CVC,
        added: Pm::Active,
        funded: Some((Tu::Failed, "incorrect_cvc", true)),
    },
    Case {
        number: PROCESSING_ERROR,
        added: Pm::Active,
        funded: Some((Tu::Failed, "processing_error", false)),
    },
    // On-session (Add Funds) it succeeds; off-session it needs the customer (see below).
    Case {
        number: OFF_SESSION_3DS,
        added: Pm::Active,
        funded: Some((Tu::Succeeded, "", false)),
    },
    // Last: while its outcome is unknown, nothing else is charged for the account.
    Case {
        number: TIMES_OUT,
        added: Pm::Active,
        funded: Some((Tu::Unknown, "", false)),
    },
];

#[tokio::test]
async fn every_sandbox_card_through_add_card_and_add_funds() {
    let (app, token) = app_with_accounts().await;
    let mut expected_balance = Decimal::ZERO;
    for case in CASES {
        let added = add_card(&app, &token, ACCT, case.number).await;
        let method = added.payment_method.unwrap();
        assert_eq!(status(&method), case.added, "{}", case.number);
        assert_eq!(
            added.next_action.is_some(),
            case.added == Pm::PendingAuthentication,
            "{}",
            case.number
        );
        if case.added == Pm::Failed {
            assert_eq!(method.disabled_reason, "card_declined");
        }
        if added.next_action.is_some() {
            confirm(&app, &token, ACCT, &method.payment_method_id, true)
                .await
                .unwrap();
        }
        let key = format!("funds-{}", case.number);
        let result = add_funds(
            &app,
            &token,
            funds("10.00", &method.payment_method_id, &key),
        )
        .await;
        let Some((want, code, hard)) = case.funded else {
            assert_eq!(
                result.unwrap_err().code(),
                tonic::Code::FailedPrecondition,
                "{}",
                case.number
            );
            continue;
        };
        let response = result.unwrap();
        let top_up = response.top_up.unwrap();
        assert_eq!(top_up_status(&top_up), want, "{}", case.number);
        assert_eq!(
            top_up.failure_reason.is_empty(),
            want == Tu::Succeeded,
            "{}",
            case.number
        );
        let attempt = &top_up.attempts[0];
        assert_eq!(
            (attempt.decline_code.as_str(), attempt.hard_decline),
            (code, hard),
            "{}",
            case.number
        );
        assert_eq!(
            response.next_action.is_some(),
            want == Tu::RequiresAction,
            "{}",
            case.number
        );
        if want == Tu::Succeeded {
            expected_balance += Decimal::new(1000, 2);
        }
        assert_eq!(
            balance(&app, ACCT).await,
            expected_balance.to_string(),
            "{}",
            case.number
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_timed_out_charge_is_reconciled_by_key_when_the_request_is_retried() {
    let (app, token) = app_with_accounts().await;
    let id = add_active_card(&app, &token, ACCT, TIMES_OUT).await;
    let first = add_funds(&app, &token, funds("15.00", &id, "timeout"))
        .await
        .unwrap();
    assert_eq!(top_up_status(first.top_up.as_ref().unwrap()), Tu::Unknown);
    assert_eq!(
        first.balance, "0.00",
        "no credit while the outcome is unknown"
    );
    // The processor did charge: the retried request finds that charge instead of charging again.
    let second = add_funds(&app, &token, funds("15.00", &id, "timeout"))
        .await
        .unwrap();
    let top_up = second.top_up.unwrap();
    assert_eq!(top_up_status(&top_up), Tu::Succeeded);
    assert_eq!(top_up.top_up_id, first.top_up.unwrap().top_up_id);
    assert_eq!(top_up.attempts.len(), 1);
    assert_eq!(second.balance, "15.00");
    assert_eq!(count_rows(&app.pool, "sandbox_charges").await, 1);
    app.stop().await;
}

async fn off_session_charge(gateway: &SandboxGateway, token: &str, key: &str) -> Outcome {
    gateway
        .charge(ChargeRequest {
            token: token.into(),
            amount: Decimal::new(3000, 2),
            currency: Currency::USD,
            idempotency_key: key.into(),
            off_session: true,
        })
        .await
        .unwrap()
        .outcome
}

#[tokio::test]
async fn off_session_charges_need_the_customer_only_for_cards_that_say_so() {
    let (app, token) = app_with_accounts().await;
    let gateway = SandboxGateway::new(app.pool.clone());
    let token_of = |id: String| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT gateway_token FROM payment_methods WHERE payment_method_id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let setup_3ds = token_of(add_active_card(&app, &token, ACCT, SETUP_3DS).await).await;
    let always = token_of(add_active_card(&app, &token, ACCT, ALWAYS_3DS).await).await;
    let off_session = token_of(add_active_card(&app, &token, ACCT, OFF_SESSION_3DS).await).await;
    assert_eq!(
        off_session_charge(&gateway, &setup_3ds, "k1").await,
        Outcome::Succeeded
    );
    assert!(matches!(
        off_session_charge(&gateway, &always, "k2").await,
        Outcome::RequiresAction { .. }
    ));
    assert!(matches!(
        off_session_charge(&gateway, &off_session, "k3").await,
        Outcome::RequiresAction { .. }
    ));
    // The same key returns the first charge.
    assert_eq!(
        off_session_charge(&gateway, &setup_3ds, "k1").await,
        Outcome::Succeeded
    );
    assert_eq!(count_rows(&app.pool, "sandbox_charges").await, 3);
    let found = gateway.find_charge("k1").await.unwrap().unwrap();
    assert_eq!(found.outcome, Outcome::Succeeded);
    assert!(gateway.find_charge("never-used").await.unwrap().is_none());
    app.stop().await;
}
