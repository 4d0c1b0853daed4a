//! Time-driven rules, on a clock the test moves (never by sleeping): the
//! retry back-off and the 5-round stop, the 24 h caps, reconciliation of
//! an unknown outcome; and the cases that must wait for the customer.

use billing::proto::{self, AttemptOutcome, PaymentMethodStatus, TopUpStatus};
use chrono::Duration;

use super::*;
use crate::payment_methods::{list, status};

async fn attempts_of(s: &Scenario) -> usize {
    top_ups(&s.app, &s.admin)
        .await
        .first()
        .map_or(0, |t| t.attempts.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_card_fails_rounds_follow_the_back_off_and_stop_after_five() {
    // Soft declines: the card is retried in every round.
    let (s, _) = scenario("20.00", &[DECLINES]).await;
    apply(&s, settings("10.00", "30.00")).await;
    debit(&s.app, "15.00", "d1").await;
    let first = wait_for_top_up(&s, TopUpStatus::RetryScheduled).await;
    assert_eq!(first.attempts.len(), 1);
    let next = first.next_attempt_at.expect("next attempt scheduled");
    let created = first.created_at.unwrap();
    assert_eq!(
        next.seconds - created.seconds,
        3600,
        "the first retry waits 1 h"
    );

    // Not due yet: nothing happens however long the engine polls.
    s.clock.advance(Duration::minutes(59));
    settle_briefly().await;
    assert_eq!(attempts_of(&s).await, 1);

    let waits = [
        Duration::minutes(1),
        Duration::hours(6),
        Duration::hours(24),
        Duration::hours(24),
    ];
    for (round, wait) in waits.into_iter().enumerate() {
        s.clock.advance(wait);
        let expected = round + 2;
        // The round is over once its result is recorded (not merely its attempt started).
        eventually(&format!("round {expected}"), || async {
            let listed = top_ups(&s.app, &s.admin).await;
            listed.first().is_some_and(|t| {
                t.attempts.len() == expected
                    && matches!(
                        status_of(t),
                        TopUpStatus::RetryScheduled | TopUpStatus::Failed
                    )
            })
        })
        .await;
    }
    let last = wait_for_top_up(&s, TopUpStatus::Failed).await;
    assert_eq!(last.attempts.len(), 5);
    assert!(
        last.attempts
            .iter()
            .all(|a| a.outcome == AttemptOutcome::Declined as i32)
    );
    assert!(last.next_attempt_at.is_none());
    s.clock.advance(Duration::days(7));
    settle_briefly().await;
    assert_eq!(
        attempts_of(&s).await,
        5,
        "a failed top-up is not retried again"
    );
    assert_eq!(balance(&s.app).await, "5.00");
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_card_is_restored_by_a_successful_retry() {
    let (s, cards) = scenario("20.00", &[DECLINES_OFF_SESSION]).await;
    apply(&s, settings("10.00", "30.00")).await;
    debit(&s.app, "15.00", "d1").await;
    wait_for_top_up(&s, TopUpStatus::RetryScheduled).await;
    let methods = list(&s.app, &s.admin, ACCT).await;
    assert_eq!(
        status(&methods[0]),
        PaymentMethodStatus::TemporarilyDisabled
    );
    assert_eq!(methods[0].disabled_reason, "insufficient_funds");

    let retried = crate::payment_methods::client(&s.app)
        .retry_payment_method(authed(
            &s.admin,
            proto::RetryPaymentMethodRequest {
                account_id: ACCT.into(),
                payment_method_id: cards[0].clone(),
                idempotency_key: "retry-1".into(),
                amount: "30.00".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let method = retried.payment_method.unwrap();
    assert_eq!(status(&method), PaymentMethodStatus::Active);
    assert!(method.auto_charge && method.primary);
    assert_eq!(balance(&s.app).await, "35.00");
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_count_cap_stops_automatic_top_ups_and_reports_it() {
    let (s, _) = scenario("20.00", &[VISA]).await;
    apply(
        &s,
        proto::ApplyLowBalanceSettingsRequest {
            max_top_ups_per_day: 1,
            ..settings("10.00", "30.00")
        },
    )
    .await;
    debit(&s.app, "15.00", "d1").await; // 20 -> 5: top-up to 35
    wait_for_top_up(&s, TopUpStatus::Succeeded).await;
    debit(&s.app, "30.00", "d2").await; // 35 -> 5: second crossing, over the cap
    let capped = wait_for_top_up(&s, TopUpStatus::CapReached).await;
    assert!(
        capped
            .failure_reason
            .contains("at most 1 automatic top-ups per 24 hours"),
        "{}",
        capped.failure_reason
    );
    assert!(capped.attempts.is_empty(), "nothing was charged");
    assert_eq!(sandbox_charges(&s.app).await, 1);

    // A day later the cap has rolled over: the stopped crossing resumes on
    // its own (the account is still below), without racing a new one.
    s.clock.advance(Duration::hours(25));
    wait_for_top_up(&s, TopUpStatus::Succeeded).await;
    assert_eq!(sandbox_charges(&s.app).await, 2);
    assert_eq!(balance(&s.app).await, "35.00");
    s.app.stop().await;
}

/// A crossing a cap stopped resumes as soon as the cap is raised — it
/// waited for the rolling window of a cap that no longer held, leaving the
/// account below its threshold for up to a day (found by an attacker
/// helper). Re-applying the same caps starts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_cap_that_stopped_a_crossing_resumes_it_at_once() {
    let (s, _) = scenario("20.00", &[VISA]).await;
    let capped_at = |max_top_ups_per_day| proto::ApplyLowBalanceSettingsRequest {
        max_top_ups_per_day,
        ..settings("10.00", "30.00")
    };
    apply(&s, capped_at(1)).await;
    debit(&s.app, "15.00", "d1").await; // 20 -> 5: top-up to 35
    wait_for_top_up(&s, TopUpStatus::Succeeded).await;
    debit(&s.app, "30.00", "d2").await; // 35 -> 5: over the cap
    wait_for_top_up(&s, TopUpStatus::CapReached).await;

    apply(&s, capped_at(1)).await;
    settle_briefly().await;
    assert_eq!(sandbox_charges(&s.app).await, 1, "the same cap holds");

    apply(&s, capped_at(2)).await;
    wait_for_top_up(&s, TopUpStatus::Succeeded).await;
    assert_eq!(sandbox_charges(&s.app).await, 2);
    assert_eq!(balance(&s.app).await, "35.00");
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_amount_cap_limits_the_amount_stops_the_chain_and_the_chain_resumes_when_the_window_allows()
 {
    let (s, _) = scenario("100.00", &[VISA]).await;
    apply(
        &s,
        proto::ApplyLowBalanceSettingsRequest {
            max_amount_per_day: "90.00".into(),
            ..settings("100.00", "30.00")
        },
    )
    .await;
    // 100 -> 0 needs 4 × 30 to reach 100, but only 3 × 30 fit in the cap.
    debit(&s.app, "100.00", "d1").await;
    let capped = wait_for_top_up(&s, TopUpStatus::CapReached).await;
    assert!(
        capped.failure_reason.contains("90.00 USD"),
        "{}",
        capped.failure_reason
    );
    let listed = top_ups(&s.app, &s.admin).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(status_of(&listed[1]), TopUpStatus::Succeeded);
    assert_eq!(listed[1].amount, "90.00");
    assert_eq!(balance(&s.app).await, "90.00");
    let emailed: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM notifications WHERE account_id = 'acme' AND kind = 'top_up_cap_reached'",
    )
    .fetch_one(&s.app.pool)
    .await
    .unwrap();
    assert_eq!(emailed, 1, "a cap that stops the chain is emailed");

    // Usage meanwhile is the same crossing: nothing more today.
    debit(&s.app, "1.00", "d2").await;
    settle_briefly().await;
    assert_eq!(top_ups(&s.app, &s.admin).await.len(), 2);

    // When the window allows, the chain resumes from the live balance.
    s.clock.advance(Duration::hours(25));
    let resumed = wait_for_top_up(&s, TopUpStatus::Succeeded).await;
    assert_eq!(
        resumed.amount, "30.00",
        "89.00 needs one refill to reach 100.00"
    );
    assert_eq!(balance(&s.app).await, "119.00");
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_outcome_is_reconciled_without_a_second_charge() {
    let (s, _) = scenario("20.00", &[TIMES_OUT, VISA]).await;
    apply(&s, settings("10.00", "30.00")).await;
    debit(&s.app, "15.00", "d1").await;
    let unknown = wait_for_top_up(&s, TopUpStatus::Unknown).await;
    assert_eq!(unknown.attempts.len(), 1);
    assert_eq!(unknown.attempts[0].outcome, AttemptOutcome::Unknown as i32);
    // Nothing else is charged while the outcome is unknown — not even the next card.
    settle_briefly().await;
    assert_eq!(top_ups(&s.app, &s.admin).await[0].attempts.len(), 1);
    assert_eq!(
        balance(&s.app).await,
        "5.00",
        "no credit without a known success"
    );

    s.clock.advance(Duration::seconds(31));
    let settled = wait_for_top_up(&s, TopUpStatus::Succeeded).await;
    assert_eq!(settled.attempts.len(), 1, "reconciled, not charged again");
    assert_eq!(
        settled.attempts[0].outcome,
        AttemptOutcome::Succeeded as i32
    );
    assert_eq!(balance(&s.app).await, "35.00");
    assert_eq!(sandbox_charges(&s.app).await, 1);
    assert_eq!(ledger_top_ups(&s.app).await, 1);
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_off_session_charge_needing_authentication_waits_for_the_customer() {
    // The only card asks for the customer (with another, the round falls through: live_state).
    let (s, _) = scenario("20.00", &[OFF_SESSION_3DS]).await;
    apply(&s, settings("10.00", "30.00")).await;
    debit(&s.app, "15.00", "d1").await;
    let waiting = wait_for_top_up(&s, TopUpStatus::RequiresAction).await;
    assert_eq!(waiting.attempts.len(), 1, "not forced");
    assert_eq!(
        waiting.attempts[0].outcome,
        AttemptOutcome::RequiresAction as i32
    );
    s.clock.advance(Duration::days(2));
    settle_briefly().await;
    assert_eq!(top_ups(&s.app, &s.admin).await[0].attempts.len(), 1);
    assert_eq!(balance(&s.app).await, "5.00");
    s.app.stop().await;
}

/// A manual top-up whose caller went away mid-request (the server died
/// between recording it and recording the charge): once stale, the engine
/// asks the gateway, credits what was charged, closes what was not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_manual_top_ups_are_settled_from_the_gateway_or_closed() {
    use billing::gateway::{ChargeRequest, PaymentGateway, SandboxGateway};
    let (s, cards) = scenario("0", &[VISA]).await;
    let token: String = sqlx::query_scalar(
        "SELECT gateway_token FROM payment_methods WHERE payment_method_id = $1",
    )
    .bind(&cards[0])
    .fetch_one(&s.app.pool)
    .await
    .unwrap();
    let created = billing::topup::Clock::now(s.clock.as_ref());
    for id in ["tu_charged", "tu_never_charged"] {
        sqlx::query(
            "INSERT INTO top_ups (top_up_id, account_id, trigger, status, amount, currency, payment_method_id, created_at, updated_at) \
             VALUES ($1, 'acme', 'MANUAL', 'PENDING', 25, 'USD', $2, $3, $3)",
        )
        .bind(id)
        .bind(&cards[0])
        .bind(created)
        .execute(&s.app.pool)
        .await
        .unwrap();
    }
    // The charge of the first one reached the processor before the crash.
    let gateway = SandboxGateway::new(s.app.pool.clone());
    gateway
        .charge(ChargeRequest {
            token,
            amount: rust_decimal::Decimal::from(25),
            currency: billing::money::Currency::USD,
            idempotency_key: billing::topup::gateway_key("tu_charged", 1),
            off_session: false,
        })
        .await
        .unwrap();
    settle_briefly().await;
    assert_eq!(
        balance(&s.app).await,
        "0.00",
        "not stale yet: the caller may still be waiting"
    );

    s.clock.advance(Duration::minutes(11));
    eventually("both reconciled", || async {
        let listed = top_ups(&s.app, &s.admin).await;
        listed.iter().all(|t| status_of(t) != TopUpStatus::Pending)
    })
    .await;
    let listed = top_ups(&s.app, &s.admin).await;
    let by_id = |id: &str| listed.iter().find(|t| t.top_up_id == id).unwrap().clone();
    assert_eq!(status_of(&by_id("tu_charged")), TopUpStatus::Succeeded);
    assert_eq!(status_of(&by_id("tu_never_charged")), TopUpStatus::Failed);
    assert!(
        by_id("tu_never_charged")
            .failure_reason
            .starts_with("abandoned")
    );
    assert_eq!(balance(&s.app).await, "25.00");
    assert_eq!(ledger_top_ups(&s.app).await, 1);
    s.app.stop().await;
}
