//! Auto top-up decided on the account's live state (issue 12): each rule a
//! test, on a clock the test moves; races with two replicas.

use billing::proto::{self, AttemptOutcome, PaymentMethodStatus, TopUpStatus};
use chrono::Duration;

use super::*;
use crate::payment_methods::{add_card, add_funds, client, confirm, funds, list, status};

const EXPIRED_CARD: &str = "4000000000000069";
const AUTHENTICATES_ON_SETUP: &str = "4000002500003155";

async fn set_auto_charge(s: &Scenario, card: &str, enabled: bool) {
    client(&s.app)
        .set_auto_charge(authed(
            &s.admin,
            proto::SetAutoChargeRequest {
                account_id: ACCT.into(),
                payment_method_id: card.into(),
                enabled,
            },
        ))
        .await
        .expect("set auto-charge");
}

async fn remove(s: &Scenario, card: &str) {
    client(&s.app)
        .remove_payment_method(authed(
            &s.admin,
            proto::RemovePaymentMethodRequest {
                account_id: ACCT.into(),
                payment_method_id: card.into(),
            },
        ))
        .await
        .expect("remove");
}

async fn get_method(s: &Scenario, card: &str) -> proto::PaymentMethod {
    client(&s.app)
        .get_payment_method(authed(
            &s.admin,
            proto::GetPaymentMethodRequest {
                account_id: ACCT.into(),
                payment_method_id: card.into(),
            },
        ))
        .await
        .expect("get payment method")
        .into_inner()
        .payment_method
        .unwrap()
}

/// Sandbox charges of one card (any outcome), by its saved token.
async fn charges_of(s: &Scenario, card: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM sandbox_charges c JOIN payment_methods p ON p.gateway_token = c.token \
          WHERE p.payment_method_id = $1",
    )
    .bind(card)
    .fetch_one(&s.app.pool)
    .await
    .unwrap()
}

async fn retry_without_amount(s: &Scenario, card: &str) -> proto::RetryPaymentMethodResponse {
    client(&s.app)
        .retry_payment_method(authed(
            &s.admin,
            proto::RetryPaymentMethodRequest {
                account_id: ACCT.into(),
                payment_method_id: card.into(),
                idempotency_key: "retry-1".into(),
                amount: String::new(),
            },
        ))
        .await
        .expect("retry")
        .into_inner()
}

async fn automatic_attempts(s: &Scenario) -> usize {
    top_ups(&s.app, &s.admin)
        .await
        .iter()
        .filter(|t| t.trigger == proto::TopUpTrigger::Automatic as i32)
        .map(|t| t.attempts.len())
        .sum()
}

async fn count_notifications(s: &Scenario, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM notifications WHERE account_id = $1 AND kind = $2")
        .bind(ACCT)
        .bind(kind)
        .fetch_one(&s.app.pool)
        .await
        .unwrap()
}

/// Card 0341 (soft decline, auto-charge on) then 4242 (auto-charge off):
/// the first round fails and a retry is scheduled.
async fn retry_scheduled_with_a_spare_card() -> (Scenario, String, String) {
    let (s, cards) = scenario("50.00", &[DECLINES]).await;
    let spare = add_active_card(&s.app, &s.admin, ACCT, VISA).await;
    apply(&s, settings("10.00", "30.00")).await;
    debit(&s.app, "45.00", "usage-1").await;
    wait_for_top_up(&s, TopUpStatus::RetryScheduled).await;
    (s, cards[0].clone(), spare)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_round_after_auto_refill_was_switched_off_charges_nothing() {
    let (s, _, spare) = retry_scheduled_with_a_spare_card().await;
    set_auto_charge(&s, &spare, true).await;
    let mut off = settings("10.00", "30.00");
    off.auto_refill_enabled = false;
    apply(&s, off).await;

    s.clock.advance(Duration::hours(2));
    settle_briefly().await;
    let top_up = top_ups(&s.app, &s.admin).await.remove(0);
    assert_eq!(status_of(&top_up), TopUpStatus::Canceled);
    assert_eq!(top_up.failure_reason, "auto_refill_disabled");
    assert_eq!(
        top_up.attempts.len(),
        1,
        "no attempt after auto refill went off"
    );
    assert_eq!(charges_of(&s, &spare).await, 0);
    assert_eq!(balance(&s.app).await, "5.00");
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_that_finds_the_balance_restored_charges_nothing_and_ends_the_top_up() {
    let (s, _, spare) = retry_scheduled_with_a_spare_card().await;
    set_auto_charge(&s, &spare, true).await;
    let added = add_funds(&s.app, &s.admin, funds("100.00", &spare, "by-hand"))
        .await
        .expect("add funds");
    assert_eq!(added.balance, "105.00");

    s.clock.advance(Duration::hours(2));
    eventually("the automatic top-up ends as not needed", || async {
        let listed = top_ups(&s.app, &s.admin).await;
        listed.iter().any(|t| {
            t.trigger == proto::TopUpTrigger::Automatic as i32
                && status_of(t) == TopUpStatus::Canceled
        })
    })
    .await;
    settle_briefly().await;
    let automatic = top_ups(&s.app, &s.admin)
        .await
        .into_iter()
        .find(|t| t.trigger == proto::TopUpTrigger::Automatic as i32)
        .unwrap();
    assert_eq!(automatic.failure_reason, "balance_restored");
    assert_eq!(automatic.attempts.len(), 1);
    assert_eq!(charges_of(&s, &spare).await, 1, "only the manual 100.00");
    assert_eq!(balance(&s.app).await, "105.00");
    s.app.stop().await;
}

/// Debit 11 (crossing at 39), then at once 39 (to 0): the account ends at
/// or above the threshold however the charge and the debits interleave.
async fn drains_below_the_threshold_then_is_refilled_above_it(replicas: usize) {
    let (s, _) = scenario("50.00", &[VISA]).await;
    let mut others = Vec::new();
    for _ in 1..replicas {
        others.push(replica(&s).await);
    }
    apply(&s, settings("40.00", "30.00")).await;
    debit(&s.app, "11.00", "usage-1").await;
    debit(others.last().unwrap_or(&s.app), "39.00", "usage-2").await;
    eventually("the balance is refilled to the threshold", || async {
        let total: rust_decimal::Decimal = balance(&s.app).await.parse().unwrap();
        total >= rust_decimal::Decimal::from(40)
    })
    .await;
    settle_briefly().await;
    let listed = top_ups(&s.app, &s.admin).await;
    assert!(
        listed
            .iter()
            .all(|t| matches!(status_of(t), TopUpStatus::Succeeded | TopUpStatus::Canceled)),
        "{listed:?}"
    );
    let balance: rust_decimal::Decimal = balance(&s.app).await.parse().unwrap();
    assert!(
        balance >= rust_decimal::Decimal::from(40) && balance < rust_decimal::Decimal::from(70),
        "{balance}"
    );
    for other in others {
        other.stop().await;
    }
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_amount_is_computed_when_charging_and_a_top_up_that_leaves_the_account_below_is_followed_at_once()
 {
    drains_below_the_threshold_then_is_refilled_above_it(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_drained_below_the_threshold_is_refilled_with_two_replicas() {
    drains_below_the_threshold_then_is_refilled_above_it(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_round_charges_what_the_live_balance_needs_after_usage_during_the_back_off() {
    let (s, _) = scenario("50.00", &[DECLINES]).await;
    apply(&s, settings("40.00", "30.00")).await;
    debit(&s.app, "11.00", "usage-1").await;
    wait_for_top_up(&s, TopUpStatus::RetryScheduled).await;
    let visa = add_active_card(&s.app, &s.admin, ACCT, VISA).await;
    set_auto_charge(&s, &visa, true).await;
    debit(&s.app, "39.00", "usage-2").await;
    s.clock.advance(Duration::hours(1));
    let top_up = wait_for_top_up(&s, TopUpStatus::Succeeded).await;
    let entries: Vec<(String, rust_decimal::Decimal, rust_decimal::Decimal)> = sqlx::query_as(
        "SELECT kind, amount, balance_after FROM ledger_entries WHERE account_id = 'acme' ORDER BY entry_id",
    )
    .fetch_all(&s.app.pool)
    .await
    .unwrap();
    assert_eq!(
        top_up.amount,
        "60.00",
        "two refills lift 0.00 to 40.00; top-ups {:?}; ledger {entries:?}",
        top_ups(&s.app, &s.admin).await
    );
    assert_eq!(balance(&s.app).await, "60.00");
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_that_needs_authentication_falls_through_to_the_next_card() {
    let (s, cards) = scenario("20.00", &[OFF_SESSION_3DS, VISA]).await;
    apply(&s, settings("10.00", "30.00")).await;
    debit(&s.app, "15.00", "usage-1").await;
    let top_up = wait_for_top_up(&s, TopUpStatus::Succeeded).await;
    let outcomes: Vec<(String, i32)> = top_up
        .attempts
        .iter()
        .map(|a| (a.payment_method_id.clone(), a.outcome))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (cards[0].clone(), AttemptOutcome::RequiresAction as i32),
            (cards[1].clone(), AttemptOutcome::Succeeded as i32),
        ]
    );
    assert_eq!(balance(&s.app).await, "35.00");
    assert_eq!(count_notifications(&s, "authentication_required").await, 0);
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_when_no_card_succeeded_does_the_top_up_wait_for_the_customer_who_is_told_once() {
    let (s, _) = scenario("20.00", &[OFF_SESSION_3DS]).await;
    apply(&s, settings("10.00", "30.00")).await;
    debit(&s.app, "15.00", "usage-1").await;
    let top_up = wait_for_top_up(&s, TopUpStatus::RequiresAction).await;
    assert_eq!(top_up.attempts.len(), 1);
    // Re-applying the same settings while the crossing is handled starts nothing.
    apply(&s, settings("10.00", "30.00")).await;
    apply(&s, settings("10.00", "30.00")).await;
    settle_briefly().await;
    assert_eq!(top_ups(&s.app, &s.admin).await.len(), 1);
    assert_eq!(count_notifications(&s, "authentication_required").await, 1);
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_applying_settings_while_below_starts_one_top_up_and_one_email() {
    let (s, _) = scenario("5.00", &[OFF_SESSION_3DS]).await;
    let mut started = Vec::new();
    for _ in 0..3 {
        let applied = apply(&s, settings("10.00", "30.00")).await;
        started.push(applied.started_top_up_id.clone());
        settle_briefly().await;
    }
    assert!(!started[0].is_empty(), "the first Apply arms a crossing");
    assert!(
        started[1..].iter().all(String::is_empty),
        "later ones start nothing: {started:?}"
    );
    wait_for_top_up(&s, TopUpStatus::RequiresAction).await;
    assert_eq!(top_ups(&s.app, &s.admin).await.len(), 1);
    assert_eq!(count_notifications(&s, "authentication_required").await, 1);
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_without_an_amount_charges_the_accounts_refill_amount() {
    let (s, cards) = scenario("100.00", &[VISA]).await;
    apply(&s, settings("10.00", "50.00")).await;
    let retried = retry_without_amount(&s, &cards[0]).await;
    assert_eq!(retried.top_up.unwrap().amount, "50.00");
    assert_eq!(balance(&s.app).await, "150.00");
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_without_an_amount_or_settings_charges_the_currencys_smallest_refill() {
    let (s, cards) = scenario("0", &[VISA]).await;
    let retried = retry_without_amount(&s, &cards[0]).await;
    assert_eq!(retried.top_up.unwrap().amount, "30.00");
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_card_to_become_active_gets_auto_charge_even_when_an_earlier_one_failed_3ds() {
    let (s, _) = scenario("0", &[]).await;
    let pending = add_card(&s.app, &s.admin, ACCT, AUTHENTICATES_ON_SETUP)
        .await
        .payment_method
        .unwrap();
    assert_eq!(status(&pending), PaymentMethodStatus::PendingAuthentication);
    let visa = add_active_card(&s.app, &s.admin, ACCT, VISA).await;
    let failed = confirm(&s.app, &s.admin, ACCT, &pending.payment_method_id, false)
        .await
        .expect("a failed challenge is an answer");
    assert_eq!(status(&failed), PaymentMethodStatus::Failed);
    let methods = list(&s.app, &s.admin, ACCT).await;
    let visa = methods
        .iter()
        .find(|m| m.payment_method_id == visa)
        .expect("the visa is listed");
    assert!(visa.auto_charge, "the first ACTIVE card has auto-charge on");
    assert!(visa.primary);
    let added = add_funds(&s.app, &s.admin, funds("30.00", "", "add-1"))
        .await
        .expect("Add Funds charges the primary card");
    assert_eq!(added.balance, "30.00");
    let applied = apply(&s, settings("10.00", "30.00")).await;
    assert!(applied.settings.unwrap().auto_refill_enabled);
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_decline_on_add_funds_takes_the_card_out_of_automatic_charging() {
    let (s, cards) = scenario("50.00", &[EXPIRED_CARD]).await;
    let declined = add_funds(&s.app, &s.admin, funds("30.00", &cards[0], "add-1"))
        .await
        .expect("a decline is an answer");
    assert_eq!(
        top_up_status_of(declined.top_up.as_ref().unwrap()),
        TopUpStatus::Failed
    );
    let card = get_method(&s, &cards[0]).await;
    assert_eq!(status(&card), PaymentMethodStatus::TemporarilyDisabled);
    assert_eq!(card.disabled_reason, "expired_card");
    assert!(!card.primary);
    let refused = policy(&s.app)
        .apply_low_balance_settings(authed(&s.admin, settings("10.00", "30.00")))
        .await
        .expect_err("no card may be charged automatically");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);

    let visa = add_active_card(&s.app, &s.admin, ACCT, VISA).await;
    set_auto_charge(&s, &visa, true).await;
    apply(&s, settings("10.00", "30.00")).await;
    debit(&s.app, "45.00", "usage-1").await;
    let top_up = wait_for_top_up(&s, TopUpStatus::Succeeded).await;
    assert!(
        top_up.attempts.iter().all(|a| a.payment_method_id == visa),
        "the hard-declined card is never charged automatically"
    );
    assert_eq!(charges_of(&s, &cards[0]).await, 1);
    s.app.stop().await;
}

fn top_up_status_of(top_up: &proto::TopUp) -> TopUpStatus {
    status_of(top_up)
}

/// Add Funds on the card that times out: the answer is a top-up whose
/// outcome is unknown, which closes the account's gate.
async fn add_funds_with_unknown_outcome(s: &Scenario, card: &str, amount: &str) {
    let unknown = add_funds(&s.app, &s.admin, funds(amount, card, "add-1"))
        .await
        .expect("an unknown outcome is an answer");
    assert_eq!(
        status_of(unknown.top_up.as_ref().unwrap()),
        TopUpStatus::Unknown
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_a_manual_charge_has_an_unknown_outcome_nothing_else_is_charged_for_the_account() {
    let (s, cards) = scenario("50.00", &[TIMES_OUT, VISA]).await;
    apply(&s, settings("10.00", "30.00")).await;
    add_funds_with_unknown_outcome(&s, &cards[0], "100.00").await;
    debit(&s.app, "45.00", "usage-1").await;
    settle_briefly().await;
    settle_briefly().await;
    assert_eq!(automatic_attempts(&s).await, 0, "the gate is closed");
    assert_eq!(charges_of(&s, &cards[1]).await, 0);

    // Reconciled: the processor did charge 100.00; it is credited once and
    // the automatic top-up is no longer needed.
    s.clock.advance(Duration::minutes(1));
    eventually("the manual charge is reconciled and credited", || async {
        balance(&s.app).await == "105.00"
    })
    .await;
    settle_briefly().await;
    assert_eq!(charges_of(&s, &cards[1]).await, 0);
    assert_eq!(balance(&s.app).await, "105.00");
    let listed = top_ups(&s.app, &s.admin).await;
    assert!(
        listed
            .iter()
            .filter(|t| t.trigger == proto::TopUpTrigger::Automatic as i32)
            .all(|t| status_of(t) == TopUpStatus::Canceled),
        "{listed:?}"
    );
    s.app.stop().await;
}

/// The gate opens for a waiting automatic top-up the moment the other
/// charge's outcome is known. It was parked for `reconcile_after` and, if
/// the engine reached it just before the reconciliation, parked again: an
/// account left below its threshold for no reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_automatic_top_up_waiting_for_an_unknown_outcome_charges_as_soon_as_it_is_known() {
    let (s, cards) = scenario("100.00", &[VISA, TIMES_OUT]).await;
    apply(&s, settings("80.00", "30.00")).await;
    add_funds_with_unknown_outcome(&s, &cards[1], "30.00").await;
    // Reconciled 30 s after it was charged; the automatic top-up, parked
    // 20 s later, would wait until 50 s.
    s.clock.advance(Duration::seconds(20));
    debit(&s.app, "90.00", "usage-1").await;
    eventually("the automatic top-up waits at the closed gate", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM top_ups WHERE trigger = 'AUTOMATIC' AND status = 'PENDING' \
              AND lease_owner IS NULL AND next_attempt_at > created_at",
        )
        .fetch_one(&s.app.pool)
        .await
        .unwrap()
            == 1
    })
    .await;
    assert_eq!(automatic_attempts(&s).await, 0, "the gate is closed");

    // The reconciliation (31 s) comes before the automatic top-up's own
    // wait would end (50 s): the clock is not moved again.
    s.clock.advance(Duration::seconds(11));
    eventually(
        "the automatic top-up charges once the manual charge is known",
        || async {
            top_ups(&s.app, &s.admin).await.iter().any(|t| {
                t.trigger == proto::TopUpTrigger::Automatic as i32
                    && status_of(t) == TopUpStatus::Succeeded
            })
        },
    )
    .await;
    let manual = top_ups(&s.app, &s.admin)
        .await
        .into_iter()
        .find(|t| t.trigger == proto::TopUpTrigger::Manual as i32)
        .unwrap();
    assert_eq!(status_of(&manual), TopUpStatus::Succeeded, "reconciled");
    assert_eq!(charges_of(&s, &cards[0]).await, 1);
    let after: rust_decimal::Decimal = balance(&s.app).await.parse().unwrap();
    assert!(
        after >= rust_decimal::Decimal::from(80),
        "refilled to the threshold: {after}"
    );
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_card_or_one_whose_auto_charge_was_switched_off_is_never_charged_automatically() {
    let (s, cards) = scenario("50.00", &[DECLINES, DECLINES_OFF_SESSION, VISA]).await;
    set_auto_charge(&s, &cards[2], false).await;
    apply(&s, settings("10.00", "30.00")).await;
    debit(&s.app, "45.00", "usage-1").await;
    let first = wait_for_top_up(&s, TopUpStatus::RetryScheduled).await;
    assert_eq!(first.attempts.len(), 2);
    remove(&s, &cards[1]).await;
    set_auto_charge(&s, &cards[0], false).await;
    set_auto_charge(&s, &cards[2], true).await;
    set_auto_charge(&s, &cards[2], false).await;

    s.clock.advance(Duration::hours(1));
    eventually("the second round ends", || async {
        top_ups(&s.app, &s.admin).await.first().is_some_and(|t| {
            t.attempts.len() == 2
                && status_of(t) == TopUpStatus::RetryScheduled
                && t.next_attempt_at != first.next_attempt_at
        })
    })
    .await;
    assert_eq!(
        charges_of(&s, &cards[1]).await,
        1,
        "the removed card is not charged again"
    );
    assert_eq!(charges_of(&s, &cards[0]).await, 1);
    assert_eq!(charges_of(&s, &cards[2]).await, 0);
    let removed = get_method(&s, &cards[1]).await;
    assert_eq!(
        status(&removed),
        PaymentMethodStatus::Removed,
        "a removed card never comes back"
    );
    assert!(
        list(&s.app, &s.admin, ACCT)
            .await
            .iter()
            .all(|m| m.payment_method_id != cards[1])
    );
    // The same card can be added again.
    add_card(&s.app, &s.admin, ACCT, DECLINES_OFF_SESSION).await;
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_card_is_never_charged_automatically() {
    let (s, cards) = scenario("50.00", &[VISA]).await;
    apply(&s, settings("10.00", "30.00")).await;
    // Past the end of the card's expiry month (December next year).
    s.clock.advance(Duration::days(800));
    debit(&s.app, "45.00", "usage-1").await;
    let top_up = wait_for_top_up(&s, TopUpStatus::RetryScheduled).await;
    assert!(top_up.attempts.is_empty());
    assert_eq!(
        top_up.failure_reason,
        "no active payment method with auto-charge"
    );
    assert_eq!(charges_of(&s, &cards[0]).await, 0);
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_key_shaped_like_a_top_up_credit_key_cannot_block_the_credit() {
    let (s, _) = scenario("20.00", &[DECLINES]).await;
    apply(&s, settings("10.00", "30.00")).await;
    debit(&s.app, "15.00", "usage-1").await;
    let top_up = wait_for_top_up(&s, TopUpStatus::RetryScheduled).await;
    // A service that tries to take the credit's key.
    for key in [
        format!("top-up:{}", top_up.top_up_id),
        format!("top-up {}", top_up.top_up_id),
    ] {
        let _ = s
            .app
            .balances()
            .debit(authed(
                &s.app.service_token(),
                proto::DebitRequest {
                    account_id: ACCT.into(),
                    amount: "1.00".into(),
                    idempotency_key: key,
                    ..Default::default()
                },
            ))
            .await;
    }
    let visa = add_active_card(&s.app, &s.admin, ACCT, VISA).await;
    set_auto_charge(&s, &visa, true).await;
    s.clock.advance(Duration::hours(1));
    let settled = wait_for_top_up(&s, TopUpStatus::Succeeded).await;
    assert_eq!(settled.top_up_id, top_up.top_up_id);
    assert_eq!(balance(&s.app).await, "34.00", "5.00 - 1.00 + 30.00");
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_and_a_late_event_never_both_start_a_top_up_for_one_crossing_with_two_replicas() {
    let (s, _) = scenario("20.00", &[DECLINES]).await;
    let other = replica(&s).await;
    apply(&s, settings("10.00", "30.00")).await;
    debit(&other, "15.00", "usage-1").await;
    // Apply again at once on the first replica while the second decides the event.
    apply(&s, settings("10.00", "30.00")).await;
    wait_for_top_up(&s, TopUpStatus::RetryScheduled).await;
    settle_briefly().await;
    assert_eq!(top_ups(&s.app, &s.admin).await.len(), 1);
    other.stop().await;
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_still_unknown_after_the_last_reconciliation_needs_attention_and_keeps_the_gate_closed()
 {
    let clock = std::sync::Arc::new(billing::topup::ManualClock::starting_now());
    let mut server = engine_settings(clock.clone());
    // No reconciliation allowed: the first one already exceeds the bound.
    server.policy.reconcile_max_tries = 0;
    let app = crate::helpers::spawn_app_with(server).await;
    app.account_with_balance(ACCT, "20.00").await;
    let admin = app.token("admin", Some(ACCT));
    let timeout_card = add_active_card(&app, &admin, ACCT, TIMES_OUT).await;
    let visa = add_active_card(&app, &admin, ACCT, VISA).await;
    let s = Scenario { app, clock, admin };
    apply(&s, settings("10.00", "30.00")).await;
    debit(&s.app, "15.00", "usage-1").await;
    wait_for_top_up(&s, TopUpStatus::Unknown).await;

    s.clock.advance(Duration::seconds(31));
    let stuck = wait_for_top_up(&s, TopUpStatus::NeedsAttention).await;
    assert!(
        stuck.failure_reason.starts_with("reconcile_exhausted"),
        "{}",
        stuck.failure_reason
    );
    // Money may have moved: nothing else is charged for the account.
    let refused = add_funds(&s.app, &s.admin, funds("30.00", &visa, "add-1"))
        .await
        .expect_err("the gate is closed");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(charges_of(&s, &visa).await, 0);
    assert_eq!(charges_of(&s, &timeout_card).await, 1);
    assert_eq!(balance(&s.app).await, "5.00");
    s.app.stop().await;
}

/// A fault injected into the real database: every top-up credit row is refused.
const REFUSE_TOP_UP_CREDITS: &str = "
CREATE FUNCTION test_refuse_top_up_credit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'injected fault: no top-up credit may be written';
END $$;
CREATE TRIGGER test_refuse_top_up_credit BEFORE INSERT ON ledger_entries
    FOR EACH ROW WHEN (NEW.kind = 'top_up') EXECUTE FUNCTION test_refuse_top_up_credit();";

/// Issue 13: a charge that succeeded and whose ledger credit cannot be
/// posted is an ERROR, a metric and `NEEDS_ATTENTION` — never a silent loop
/// of retries, never a second charge, and nothing else is charged for the
/// account until an operator resolves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_whose_credit_cannot_be_posted_needs_attention_and_is_never_charged_again() {
    let (s, cards) = scenario("20.00", &[VISA]).await;
    sqlx::raw_sql(REFUSE_TOP_UP_CREDITS)
        .execute(&s.app.pool)
        .await
        .unwrap();
    let needs_attention = [("outcome", "NEEDS_ATTENTION")];
    let counted_before = crate::telemetry::sample(
        &billing::telemetry::metrics::render(),
        "billing_top_ups_total",
        &needs_attention,
    );
    apply(&s, settings("10.00", "30.00")).await;
    debit(&s.app, "15.00", "usage-1").await;

    let stuck = wait_for_top_up(&s, TopUpStatus::NeedsAttention).await;
    assert!(
        stuck.failure_reason.starts_with("credit_failed"),
        "{}",
        stuck.failure_reason
    );
    assert_eq!(charges_of(&s, &cards[0]).await, 1, "charged once");
    assert_eq!(balance(&s.app).await, "5.00", "no credit was posted");
    let counted_after = crate::telemetry::sample(
        &billing::telemetry::metrics::render(),
        "billing_top_ups_total",
        &needs_attention,
    );
    assert!(
        counted_after >= counted_before + 1.0,
        "counted: {counted_before} -> {counted_after}"
    );

    // Hours pass: no retry loop, no second charge, no new top-up.
    s.clock.advance(Duration::hours(3));
    settle_briefly().await;
    assert_eq!(charges_of(&s, &cards[0]).await, 1);
    assert_eq!(top_ups(&s.app, &s.admin).await.len(), 1);
    // The gate stays closed for manual charges too.
    let refused = add_funds(&s.app, &s.admin, funds("30.00", &cards[0], "add-1"))
        .await
        .expect_err("the gate is closed");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(charges_of(&s, &cards[0]).await, 1);
    s.app.stop().await;
}

/// An automatic top-up whose first charge was lost on the way (the
/// processor never saw it: a connection reset, or a crash mid-call),
/// waiting to be reconciled, with the account below its threshold.
async fn automatic_top_up_whose_charge_the_processor_never_saw() -> Scenario {
    let (s, _) = scenario_on(
        |pool| std::sync::Arc::new(crate::processor::TestProcessor::new(pool).losing_charges(1)),
        "0",
        &[VISA],
    )
    .await;
    apply(&s, settings("10.00", "30.00")).await;
    let unknown = wait_for_top_up(&s, TopUpStatus::Unknown).await;
    assert_eq!(unknown.attempts.len(), 1);
    assert_eq!(
        sandbox_charges(&s.app).await,
        0,
        "the processor never saw it"
    );
    s
}

/// Reconciled (the processor never saw the charge), the top-up is refused
/// by the live state: `CANCELED` with `reason`, its attempt closed as not
/// processed, nothing charged.
async fn not_sent_again(s: &Scenario, reason: &str, balance_now: &str) {
    s.clock.advance(Duration::seconds(31));
    let canceled = wait_for_top_up(s, TopUpStatus::Canceled).await;
    assert_eq!(canceled.failure_reason, reason);
    assert_eq!(canceled.attempts.len(), 1);
    assert_eq!(canceled.attempts[0].decline_code, "not_processed");
    settle_briefly().await;
    assert_eq!(sandbox_charges(&s.app).await, 0, "sent again");
    assert_eq!(ledger_top_ups(&s.app).await, 0);
    assert_eq!(balance(&s.app).await, balance_now);
}

/// A charge the processor never saw is sent again with its key only as a
/// charge made now: after auto refill was switched off, it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_the_processor_never_saw_is_not_sent_again_after_auto_refill_was_switched_off() {
    let s = automatic_top_up_whose_charge_the_processor_never_saw().await;
    apply(
        &s,
        proto::ApplyLowBalanceSettingsRequest {
            auto_refill_enabled: false,
            ..settings("10.00", "30.00")
        },
    )
    .await;
    not_sent_again(&s, "auto_refill_disabled", "0.00").await;
    s.app.stop().await;
}

/// …nor after the balance was restored by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_the_processor_never_saw_is_not_sent_again_after_the_balance_was_restored() {
    let s = automatic_top_up_whose_charge_the_processor_never_saw().await;
    credit(&s.app, "500.00", "by-hand").await;
    not_sent_again(&s, "balance_restored", "500.00").await;
    s.app.stop().await;
}

/// …and while it is still wanted, it is sent again with the same key and
/// credited once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_the_processor_never_saw_is_sent_again_with_its_key_while_still_wanted() {
    let s = automatic_top_up_whose_charge_the_processor_never_saw().await;
    s.clock.advance(Duration::seconds(31));
    let succeeded = wait_for_top_up(&s, TopUpStatus::Succeeded).await;
    assert_eq!(
        succeeded.attempts.len(),
        1,
        "the same attempt, the same key"
    );
    assert_eq!(sandbox_charges(&s.app).await, 1);
    assert_eq!(ledger_top_ups(&s.app).await, 1);
    assert_eq!(balance(&s.app).await, "30.00");
    s.app.stop().await;
}

/// The gate counts a manual top-up that is recorded and about to charge
/// (`PENDING`, no attempt yet): another Add Funds meanwhile is refused at
/// once and its key is not spent. It was recorded too and then ended
/// `FAILED` on the first one's charge, so its key answered `FAILED` forever
/// and never charged (found with parallel Add Funds by an attacker helper).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_add_funds_while_another_is_about_to_charge_is_refused_and_its_key_stays_unspent() {
    let (s, cards) = scenario("0", &[VISA]).await;
    // The first Add Funds, between its recording and its first attempt.
    sqlx::query(
        "INSERT INTO top_ups (top_up_id, account_id, trigger, status, amount, currency, payment_method_id, created_at, updated_at) \
         VALUES ('tu_first', 'acme', 'MANUAL', 'PENDING', 5, 'USD', $1, now(), now())",
    )
    .bind(&cards[0])
    .execute(&s.app.pool)
    .await
    .unwrap();

    let refused = add_funds(&s.app, &s.admin, funds("7.00", &cards[0], "second"))
        .await
        .expect_err("the gate is closed");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("tu_first"),
        "{}",
        refused.message()
    );
    assert_eq!(top_ups(&s.app, &s.admin).await.len(), 1, "nothing recorded");
    assert_eq!(sandbox_charges(&s.app).await, 0);

    // The first one ends; the second key, replayed, charges.
    sqlx::query("UPDATE top_ups SET status = 'FAILED' WHERE top_up_id = 'tu_first'")
        .execute(&s.app.pool)
        .await
        .unwrap();
    let charged = add_funds(&s.app, &s.admin, funds("7.00", &cards[0], "second"))
        .await
        .unwrap();
    assert_eq!(
        status_of(charged.top_up.as_ref().unwrap()),
        TopUpStatus::Succeeded
    );
    assert_eq!(balance(&s.app).await, "7.00");
    s.app.stop().await;
}
