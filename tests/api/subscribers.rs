//! Domain-level readers of the event stream: persisted-cursor subscribers
//! (what the engines build on) with exactly-once processing and rollback
//! re-delivery, and a live watcher whose reader stalls.

use std::time::Duration;

use billing::BillingError;
use billing::events::{
    self, BalanceEvent, EventFeed, EventFilter, EventHandler, EventHub, FeedSettings, HubSettings,
    Subscriber, WatchEnd, WatchSettings,
};
use sqlx::{PgConnection, PgPool};

use crate::helpers::{TestApp, authed, spawn_app};

const WAIT: Duration = Duration::from_secs(10);

/// An engine whose side effect is one row per event it handled.
struct Recorder {
    consumer: &'static str,
}

#[async_trait::async_trait]
impl EventHandler for Recorder {
    async fn handle(
        &self,
        connection: &mut PgConnection,
        event: &BalanceEvent,
    ) -> Result<(), BillingError> {
        sqlx::query("INSERT INTO processed (cursor, consumer) VALUES ($1, $2)")
            .bind(event.cursor)
            .bind(self.consumer)
            .execute(connection)
            .await?;
        Ok(())
    }
}

async fn debits(app: &TestApp, account: &str, count: usize, prefix: &str) {
    for i in 0..count {
        app.balances()
            .debit(authed(
                &app.service_token(),
                billing::proto::DebitRequest {
                    account_id: account.into(),
                    amount: "0.01".into(),
                    idempotency_key: format!("{prefix}-{i}"),
                    ..Default::default()
                },
            ))
            .await
            .expect("debit");
    }
}

async fn all_cursors(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT cursor FROM balance_events ORDER BY cursor")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn two_consumers_of_one_subscriber_process_each_event_exactly_once() {
    let app = spawn_app().await;
    sqlx::query("CREATE TABLE processed (cursor BIGINT NOT NULL, consumer TEXT NOT NULL)")
        .execute(&app.pool)
        .await
        .unwrap();
    app.account_with_balance("acme", "100.00").await;
    debits(&app, "acme", 30, "before").await;

    let feed = EventFeed::start(app.pool.clone(), FeedSettings::default());
    let subscriber = Subscriber::register(&app.pool, "test-engine", 0)
        .await
        .unwrap()
        .with_batch_size(7);
    let consumers: Vec<_> = ["one", "two"]
        .into_iter()
        .map(|consumer| {
            let subscriber = subscriber.clone();
            let feed = feed.clone();
            tokio::spawn(async move { subscriber.run(&feed, &Recorder { consumer }).await })
        })
        .collect();
    debits(&app, "acme", 30, "during").await;

    let expected = all_cursors(&app.pool).await;
    assert_eq!(expected.len(), 61);
    let last = *expected.last().unwrap();
    tokio::time::timeout(WAIT, async {
        while subscriber.cursor().await.unwrap() < last {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the subscriber catches up");
    feed.stop();
    for consumer in consumers {
        tokio::time::timeout(WAIT, consumer)
            .await
            .expect("consumers stop with the feed")
            .unwrap();
    }

    let processed: Vec<i64> = sqlx::query_scalar("SELECT cursor FROM processed ORDER BY cursor")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(processed, expected, "every event exactly once");
    app.stop().await;
}

/// The next batch of `subscriber`, waiting (bounded) while another
/// transaction still holds it: a dropped batch's rollback is only queued by
/// sqlx and reaches Postgres from the pool's background task, so right after
/// the drop the subscriber's row can still be locked (under load, for a while).
async fn next_batch_once_released(
    subscriber: &Subscriber,
    horizon: i64,
    what: &str,
) -> events::Batch {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(batch) = subscriber.next_batch(horizon).await.unwrap() {
                return batch;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

fn batch_cursors(batch: &events::Batch) -> Vec<i64> {
    batch.events().iter().map(|e| e.cursor).collect()
}

#[tokio::test]
async fn a_batch_dropped_without_commit_is_delivered_again_and_a_committed_one_is_not() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "100.00").await;
    debits(&app, "acme", 4, "d").await;
    let cursors = all_cursors(&app.pool).await;
    let horizon = *cursors.last().unwrap();
    let subscriber = Subscriber::register(&app.pool, "engine", 0)
        .await
        .unwrap()
        .with_batch_size(3);

    let first = subscriber.next_batch(horizon).await.unwrap().unwrap();
    let first_cursors = batch_cursors(&first);
    assert_eq!(first_cursors, cursors[..3].to_vec());
    // While one consumer holds the subscriber, another gets nothing.
    assert!(subscriber.next_batch(horizon).await.unwrap().is_none());
    drop(first);

    // The rollback of a drop is asynchronous: the same events come back once
    // it has reached Postgres (never a later batch, never nothing for good).
    let again = next_batch_once_released(
        &subscriber,
        horizon,
        "the dropped batch to be delivered again",
    )
    .await;
    assert_eq!(batch_cursors(&again), first_cursors);
    assert_eq!(again.commit().await.unwrap(), cursors[2]);

    let rest = subscriber.next_batch(horizon).await.unwrap().unwrap();
    assert_eq!(batch_cursors(&rest), cursors[3..].to_vec());
    rest.commit().await.unwrap();
    assert!(subscriber.next_batch(horizon).await.unwrap().is_none());
    assert_eq!(subscriber.cursor().await.unwrap(), horizon);

    // Registering again keeps the stored cursor.
    let same = Subscriber::register(&app.pool, "engine", 0).await.unwrap();
    assert_eq!(same.cursor().await.unwrap(), horizon);
    app.stop().await;
}

#[tokio::test]
async fn a_batch_rolled_back_is_delivered_again_at_once() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "100.00").await;
    debits(&app, "acme", 2, "d").await;
    let cursors = all_cursors(&app.pool).await;
    let horizon = *cursors.last().unwrap();
    let subscriber = Subscriber::register(&app.pool, "engine", 0)
        .await
        .unwrap()
        .with_batch_size(2);

    for _ in 0..20 {
        let batch = subscriber.next_batch(horizon).await.unwrap().unwrap();
        assert_eq!(batch_cursors(&batch), cursors[..2].to_vec());
        batch.rollback().await.unwrap();
    }
    assert_eq!(subscriber.cursor().await.unwrap(), 0);
    app.stop().await;
}

#[tokio::test]
async fn a_watcher_whose_reader_stalls_is_ended_with_its_resume_cursor() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "100.00").await;
    debits(&app, "acme", 3, "d").await;
    let cursors = all_cursors(&app.pool).await;
    let feed = EventFeed::start(app.pool.clone(), FeedSettings::default());
    let settings = WatchSettings {
        buffer: 1,
        batch_size: 10,
        stall_timeout: Duration::from_millis(200),
    };
    let hub = EventHub::start(&feed, HubSettings::default());
    let mut watcher = events::watch(&hub, EventFilter::AllAccounts, 0, &settings, None);

    // Nobody reads: one event fills the buffer, the next cannot be handed over.
    let end = tokio::time::timeout(WAIT, &mut watcher.end)
        .await
        .expect("the watcher gives up on its reader")
        .expect("it says why");
    assert_eq!(
        end,
        WatchEnd::TooFarBehind {
            resume_after: cursors[0]
        }
    );
    // What was buffered is still delivered, then the stream ends.
    let buffered = tokio::time::timeout(WAIT, watcher.events.recv())
        .await
        .expect("the buffered event is handed over after the watcher ended")
        .expect("one event was buffered");
    assert_eq!(buffered.cursor, cursors[0]);
    let closed = tokio::time::timeout(WAIT, watcher.events.recv())
        .await
        .expect("the event channel closes after the buffered event");
    assert!(closed.is_none());
    feed.stop();
    app.stop().await;
}
