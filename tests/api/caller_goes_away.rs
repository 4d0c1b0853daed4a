//! A call that reaches the card processor runs to its end when its caller
//! goes away mid-call (a deadline, a closed tab, a dropped connection):
//! tonic drops the handler's future at whatever `.await` it was, and a
//! charge, a 3-D Secure answer or a detach cut there left its top-up or card
//! in flight — for a manual charge the account's gate stayed closed for
//! `--top-up-abandoned-secs` (10 minutes), refusing every other charge of
//! the account. Each test drops its call while a slow processor holds it,
//! then expects the processor's answer recorded within a few seconds.

use std::sync::Arc;
use std::time::Duration;

use billing::proto::{self, PaymentMethodStatus, TopUpStatus};

use crate::helpers::{authed, eventually};
use crate::payment_methods::{add_card, client, funds, status};
use crate::processor::TestProcessor;
use crate::top_ups::{
    ACCT, Scenario, VISA, balance, ledger_top_ups, sandbox_charges, scenario_on, status_of, top_ups,
};

/// How long the processor holds every call after a card's set-up.
const STALL: Duration = Duration::from_secs(4);
/// When the caller gives up: well inside the stall, and long enough for
/// the call to reach the processor on a busy machine.
const PATIENCE: Duration = Duration::from_secs(1);

const ALWAYS_3DS: &str = "4000002760003184";
const SETUP_3DS: &str = "4000002500003155";

/// A server with engines behind a processor that answers every call but
/// set-ups `STALL` late; `acme` holds nothing and has `card` (confirmed when
/// it asks for 3-D Secure at set-up: that takes one stall).
async fn slow_processor_with(card: &str) -> (Scenario, String) {
    let (s, cards) = scenario_on(
        |pool| Arc::new(TestProcessor::new(pool).stalling(STALL)),
        "0",
        &[card],
    )
    .await;
    (s, cards[0].clone())
}

/// Sends `call` and goes away after [`PATIENCE`]; fails if it was answered.
async fn walk_away_from<T: std::fmt::Debug>(call: impl std::future::Future<Output = T>) {
    if let Ok(answer) = tokio::time::timeout(PATIENCE, call).await {
        panic!("answered within {PATIENCE:?}, before the processor did: {answer:?}");
    }
}

/// The account's top-ups once none is in flight (`PENDING` or `UNKNOWN`):
/// far sooner than the 10 minutes a manual charge left in flight waited.
async fn settled_top_ups(s: &Scenario) -> Vec<proto::TopUp> {
    eventually("a top-up, none left in flight", || async {
        let listed = top_ups(&s.app, &s.admin).await;
        !listed.is_empty()
            && listed
                .iter()
                .all(|t| !matches!(status_of(t), TopUpStatus::Pending | TopUpStatus::Unknown))
    })
    .await;
    top_ups(&s.app, &s.admin).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_add_funds_whose_caller_goes_away_mid_charge_is_settled_and_the_gate_opens() {
    let (s, card) = slow_processor_with(VISA).await;
    walk_away_from(crate::payment_methods::add_funds(
        &s.app,
        &s.admin,
        funds("25.00", &card, "gone"),
    ))
    .await;

    let settled = settled_top_ups(&s).await;
    assert_eq!(settled.len(), 1);
    assert_eq!(status_of(&settled[0]), TopUpStatus::Succeeded);
    assert_eq!(balance(&s.app).await, "25.00");
    assert_eq!(sandbox_charges(&s.app).await, 1);
    assert_eq!(ledger_top_ups(&s.app).await, 1);

    // The gate is open: the customer's next Add Funds charges.
    let next = crate::payment_methods::add_funds(&s.app, &s.admin, funds("5.00", &card, "next"))
        .await
        .expect("the gate is open");
    assert_eq!(
        status_of(next.top_up.as_ref().unwrap()),
        TopUpStatus::Succeeded
    );
    assert_eq!(balance(&s.app).await, "30.00");
    assert_eq!(sandbox_charges(&s.app).await, 2);
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_confirmation_whose_caller_goes_away_mid_charge_is_settled() {
    let (s, card) = slow_processor_with(ALWAYS_3DS).await;
    let waiting = crate::payment_methods::add_funds(&s.app, &s.admin, funds("25.00", &card, "3ds"))
        .await
        .unwrap()
        .top_up
        .unwrap();
    assert_eq!(status_of(&waiting), TopUpStatus::RequiresAction);

    walk_away_from(client(&s.app).confirm_top_up(authed(
        &s.admin,
        proto::ConfirmTopUpRequest {
            account_id: ACCT.into(),
            top_up_id: waiting.top_up_id.clone(),
            authentication_result: proto::AuthenticationResult::Passed as i32,
        },
    )))
    .await;
    // Its charge in flight: PENDING, no longer saying it needs authentication.
    let in_flight = top_ups(&s.app, &s.admin).await.remove(0);
    assert_eq!(status_of(&in_flight), TopUpStatus::Pending);
    assert_eq!(in_flight.failure_reason, "");

    eventually("the confirmed top-up succeeded", || async {
        top_ups(&s.app, &s.admin)
            .await
            .iter()
            .all(|t| status_of(t) == TopUpStatus::Succeeded)
    })
    .await;
    assert_eq!(balance(&s.app).await, "25.00");
    assert_eq!(ledger_top_ups(&s.app).await, 1);
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_confirmation_whose_caller_goes_away_is_recorded() {
    let (s, _) = slow_processor_with(VISA).await;
    let added = add_card(&s.app, &s.admin, ACCT, SETUP_3DS).await;
    assert!(added.next_action.is_some(), "the card asks for 3-D Secure");
    let method = added.payment_method.unwrap().payment_method_id;

    walk_away_from(client(&s.app).confirm_card(authed(
        &s.admin,
        proto::ConfirmCardRequest {
            account_id: ACCT.into(),
            payment_method_id: method.clone(),
            authentication_result: proto::AuthenticationResult::Passed as i32,
        },
    )))
    .await;

    eventually("the card is active", || async {
        let listed = crate::payment_methods::list(&s.app, &s.admin, ACCT).await;
        listed
            .iter()
            .any(|m| m.payment_method_id == method && status(m) == PaymentMethodStatus::Active)
    })
    .await;
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_whose_caller_goes_away_still_detaches_the_card_at_the_processor() {
    let (s, card) = slow_processor_with(VISA).await;
    walk_away_from(client(&s.app).remove_payment_method(authed(
        &s.admin,
        proto::RemovePaymentMethodRequest {
            account_id: ACCT.into(),
            payment_method_id: card.clone(),
        },
    )))
    .await;

    eventually("the card is detached at the processor", || async {
        let detached: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sandbox_cards s JOIN payment_methods m ON m.gateway_token = s.token \
              WHERE m.payment_method_id = $1 AND s.detached_at IS NOT NULL",
        )
        .bind(&card)
        .fetch_one(&s.app.pool)
        .await
        .unwrap();
        detached == 1
    })
    .await;
    s.app.stop().await;
}
