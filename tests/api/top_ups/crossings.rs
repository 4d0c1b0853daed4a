//! One top-up per crossing; the fallback to the next card; events in order.

use std::collections::HashSet;
use std::time::Duration;

use billing::proto::{self, AttemptOutcome, BalanceEventKind, PaymentMethodStatus, TopUpStatus};
use tokio_stream::StreamExt;

use super::*;
use crate::helpers::count_rows;
use crate::payment_methods::{list, status};

/// The product's promise: threshold 10.00, refill 50.00, two cards (the
/// first declines); a debit from 12.00 to 5.00 gives one top-up whose first
/// attempt is declined and second succeeds, a balance of 55.00, the first
/// card temporarily disabled, and the events in order.
async fn first_card_declines_second_refills(replicas: usize) {
    let (s, cards) = scenario("12.00", &[DECLINES, VISA]).await;
    let mut others = Vec::new();
    for _ in 1..replicas {
        others.push(replica(&s).await);
    }
    apply(&s, settings("10.00", "50.00")).await;
    let mut events = s
        .app
        .balances()
        .watch_balance_events(authed(
            &s.admin,
            proto::WatchBalanceEventsRequest {
                account_id: ACCT.into(),
                after_cursor: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner();

    debit(others.last().unwrap_or(&s.app), "7.00", "call-1").await;
    let top_up = wait_for_top_up(&s, TopUpStatus::Succeeded).await;

    assert_eq!(top_up.amount, "50.00");
    assert_eq!(top_up.trigger, proto::TopUpTrigger::Automatic as i32);
    let outcomes: Vec<(String, i32, String)> = top_up
        .attempts
        .iter()
        .map(|a| {
            (
                a.payment_method_id.clone(),
                a.outcome,
                a.decline_code.clone(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (
                cards[0].clone(),
                AttemptOutcome::Declined as i32,
                "card_declined".to_string()
            ),
            (
                cards[1].clone(),
                AttemptOutcome::Succeeded as i32,
                String::new()
            ),
        ]
    );
    assert_eq!(balance(&s.app).await, "55.00");
    let methods = list(&s.app, &s.admin, ACCT).await;
    assert_eq!(
        status(&methods[0]),
        PaymentMethodStatus::TemporarilyDisabled
    );
    assert_eq!(methods[0].disabled_reason, "card_declined");
    assert!(!methods[0].primary);
    assert!(
        methods[1].primary,
        "the working card is now the one charged first"
    );

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let event = event.event.unwrap();
        seen.push((event.sequence, event.kind, event.balance_after));
    }
    assert_eq!(
        seen,
        vec![
            (1, BalanceEventKind::Credited as i32, "12.00".to_string()),
            (2, BalanceEventKind::Debited as i32, "5.00".to_string()),
            (3, BalanceEventKind::ToppedUp as i32, "55.00".to_string()),
        ]
    );
    settle_briefly().await;
    assert_eq!(top_ups(&s.app, &s.admin).await.len(), 1);
    assert_eq!(ledger_top_ups(&s.app).await, 1);
    for other in others {
        other.stop().await;
    }
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_card_declines_second_refills_and_first_is_temporarily_disabled() {
    first_card_declines_second_refills(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_holds_with_three_replicas() {
    first_card_declines_second_refills(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_debits_crossing_at_once_start_exactly_one_top_up_across_three_replicas() {
    let (s, _) = scenario("100.00", &[VISA]).await;
    let second = replica(&s).await;
    let third = replica(&s).await;
    apply(&s, settings("60.00", "50.00")).await;
    let apps = [&s.app, &second, &third];
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut client = apps[i % 3].balances();
        let token = s.app.service_token();
        tasks.push(tokio::spawn(async move {
            client
                .debit(authed(
                    &token,
                    proto::DebitRequest {
                        account_id: ACCT.into(),
                        amount: "1.00".into(),
                        idempotency_key: format!("burst-{i}"),
                        ..Default::default()
                    },
                ))
                .await
                .map(|_| ())
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    wait_for_top_up(&s, TopUpStatus::Succeeded).await;
    // Every replica's decisions have caught up with every event.
    eventually("the subscriber passed every event", || async {
        let cursor: i64 = sqlx::query_scalar(
            "SELECT cursor FROM event_subscribers WHERE name = 'balance-policy'",
        )
        .fetch_one(&s.app.pool)
        .await
        .unwrap();
        let last: i64 = sqlx::query_scalar("SELECT MAX(cursor) FROM balance_events")
            .fetch_one(&s.app.pool)
            .await
            .unwrap();
        cursor == last
    })
    .await;
    settle_briefly().await;
    assert_eq!(
        top_ups(&s.app, &s.admin).await.len(),
        1,
        "exactly one top-up for one crossing"
    );
    assert_eq!(sandbox_charges(&s.app).await, 1);
    assert_eq!(balance(&s.app).await, "100.00");
    third.stop().await;
    second.stop().await;
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staying_below_the_threshold_is_one_crossing_and_rising_back_rearms() {
    let (s, _) = scenario("30.00", &[DECLINES]).await;
    apply(&s, settings("20.00", "30.00")).await;
    debit(&s.app, "15.00", "d1").await; // 30 -> 15: crossing, every card declines
    wait_for_top_up(&s, TopUpStatus::RetryScheduled).await;
    debit(&s.app, "1.00", "d2").await; // still below: the same crossing
    debit(&s.app, "1.00", "d3").await;
    settle_briefly().await;
    assert_eq!(top_ups(&s.app, &s.admin).await.len(), 1);
    // A manual credit lifts it above; the next fall is a new crossing (once the old one ended).
    sqlx::query("UPDATE top_ups SET status = 'FAILED'")
        .execute(&s.app.pool)
        .await
        .unwrap();
    credit(&s.app, "20.00", "c1").await;
    debit(&s.app, "20.00", "d4").await; // 33 -> 13
    eventually("a second crossing, a second top-up", || async {
        top_ups(&s.app, &s.admin).await.len() == 2
    })
    .await;
    let ids: HashSet<String> = top_ups(&s.app, &s.admin)
        .await
        .into_iter()
        .map(|t| t.top_up_id)
        .collect();
    assert_eq!(ids.len(), 2);
    // The only card was disabled by the first crossing's decline: nothing to charge.
    let newest = wait_for_top_up(&s, TopUpStatus::RetryScheduled).await;
    assert!(newest.attempts.is_empty());
    assert_eq!(
        newest.failure_reason,
        "no active payment method with auto-charge"
    );
    assert_eq!(count_rows(&s.app.pool, "top_up_attempts").await, 1);
    s.app.stop().await;
}
