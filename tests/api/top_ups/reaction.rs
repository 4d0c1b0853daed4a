//! The top-up reaction without extra hops (issue 18): a crossing committed by
//! this process is decided and charged at once, in memory, without the
//! balance-policy subscriber and without a pass of the engine.

use std::time::Duration;

use billing::proto::TopUpStatus;

use super::*;

#[tokio::test]
async fn a_crossing_committed_here_is_charged_without_the_subscriber_or_an_engine_pass() {
    // The engine never polls again after its first pass.
    let (s, _) = scenario_with(
        |clock| ServerSettings {
            engine_poll: Duration::from_secs(3600),
            ..engine_settings(clock)
        },
        "12.00",
        &[VISA],
    )
    .await;
    apply(&s, settings("10.00", "50.00")).await;
    crate::helpers::eventually("the balance-policy subscriber is registered", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM event_subscribers WHERE name = 'balance-policy'",
        )
        .fetch_one(&s.app.pool)
        .await
        .unwrap()
            == 1
    })
    .await;
    // The subscriber is held elsewhere: it cannot take the crossing's event
    // (and, holding a transaction id, this also keeps the event horizon back).
    let mut holder = s.app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM event_subscribers WHERE name = 'balance-policy' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();

    debit(&s.app, "7.00", "crossing").await;
    let top_up = wait_for_top_up(&s, TopUpStatus::Succeeded).await;
    assert_eq!(top_up.amount, "50.00");
    assert_eq!(top_up.attempts.len(), 1);
    assert_eq!(balance(&s.app).await, "55.00");
    let cursor: i64 =
        sqlx::query_scalar("SELECT cursor FROM event_subscribers WHERE name = 'balance-policy'")
            .fetch_one(&s.app.pool)
            .await
            .unwrap();
    let crossing_cursor: i64 = sqlx::query_scalar(
        "SELECT cursor FROM balance_events WHERE account_id = $1 AND kind = 'debited'",
    )
    .bind(ACCT)
    .fetch_one(&s.app.pool)
    .await
    .unwrap();
    assert!(
        cursor < crossing_cursor,
        "the subscriber had not seen the crossing when it was charged"
    );
    holder.rollback().await.unwrap();

    // The subscriber then sees the event, and starts nothing more.
    crate::helpers::eventually("the subscriber passes the crossing", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT cursor FROM event_subscribers WHERE name = 'balance-policy'",
        )
        .fetch_one(&s.app.pool)
        .await
        .unwrap()
            >= crossing_cursor
    })
    .await;
    assert_eq!(
        top_ups(&s.app, &s.admin).await.len(),
        1,
        "one top-up per crossing"
    );
    assert_eq!(sandbox_charges(&s.app).await, 1);
    s.app.stop().await;
}
