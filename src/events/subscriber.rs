//! Engines (top-up, alerts) consume the stream through a [`Subscriber`]: a
//! named, persisted cursor in `event_subscribers`. A [`Batch`] is one
//! database transaction that holds the subscriber's row lock, carries the
//! engine's side effects and advances the cursor on commit — so each event's
//! effects commit exactly once, with any number of replicas consuming the
//! same name (`FOR UPDATE SKIP LOCKED`: one holds the batch, the others wait
//! for the next wake-up).
//!
//! Keep a batch short: its transaction id holds back the horizon of every
//! reader until it ends. Slow work (gateway calls) belongs after the commit,
//! driven by rows the batch wrote.

use std::time::Duration;

use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::{BalanceEvent, EventFeed, EventFilter, read_events};
use crate::error::BillingError;

const DEFAULT_BATCH_SIZE: i64 = 100;

/// A named, persisted position in the event stream.
#[derive(Debug, Clone)]
pub struct Subscriber {
    name: String,
    pool: PgPool,
    batch_size: i64,
}

impl Subscriber {
    /// The subscriber `name`, created at `start_after` if it does not exist
    /// (an existing one keeps its cursor).
    pub async fn register(
        pool: &PgPool,
        name: &str,
        start_after: i64,
    ) -> Result<Subscriber, BillingError> {
        if name.is_empty() || start_after < 0 {
            return Err(BillingError::invalid(
                "subscriber",
                "needs a name and a cursor >= 0",
            ));
        }
        sqlx::query(
            "INSERT INTO event_subscribers (name, cursor) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(start_after)
        .execute(pool)
        .await?;
        Ok(Subscriber {
            name: name.to_owned(),
            pool: pool.clone(),
            batch_size: DEFAULT_BATCH_SIZE,
        })
    }

    pub fn with_batch_size(mut self, batch_size: i64) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The persisted cursor: every event up to it has been processed.
    pub async fn cursor(&self) -> Result<i64, BillingError> {
        let cursor = sqlx::query_scalar("SELECT cursor FROM event_subscribers WHERE name = $1")
            .bind(&self.name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(BillingError::NotFound("subscriber"))?;
        Ok(cursor)
    }

    /// The next events after the stored cursor, up to `horizon` (from
    /// [`EventFeed::horizon`]), inside a transaction that holds this
    /// subscriber. `None` when there is nothing to do or another consumer
    /// holds the subscriber right now.
    pub async fn next_batch(&self, horizon: i64) -> Result<Option<Batch>, BillingError> {
        let mut transaction = self.pool.begin().await?;
        let cursor: Option<i64> = sqlx::query_scalar(
            "SELECT cursor FROM event_subscribers WHERE name = $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(&self.name)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(cursor) = cursor else {
            return Ok(None);
        };
        let events = read_events(
            &mut *transaction,
            &EventFilter::AllAccounts,
            cursor,
            horizon,
            self.batch_size,
        )
        .await?;
        if events.is_empty() {
            return Ok(None);
        }
        Ok(Some(Batch {
            subscriber: self.name.clone(),
            transaction,
            events,
        }))
    }

    /// Feeds every event, in cursor order, to `handler`, until the feed
    /// stops. A failing batch is rolled back and retried after a pause.
    pub async fn run<H: EventHandler>(&self, feed: &EventFeed, handler: &H) {
        let mut horizon = feed.horizon();
        let retry_pause = Duration::from_secs(1);
        loop {
            let safe = *horizon.borrow_and_update();
            match self.process_available(safe, handler).await {
                Ok(()) => {}
                Err(error) => {
                    tracing::warn!(subscriber = %self.name, %error, "event batch failed; retrying");
                    tokio::time::sleep(retry_pause).await;
                    continue;
                }
            }
            // Also wake up now and then: another consumer of this name may
            // have rolled back a batch that this one skipped.
            tokio::select! {
                changed = horizon.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(retry_pause) => {}
            }
        }
    }

    async fn process_available<H: EventHandler>(
        &self,
        horizon: i64,
        handler: &H,
    ) -> Result<(), BillingError> {
        while let Some(mut batch) = self.next_batch(horizon).await? {
            for event in batch.events.clone() {
                if let Err(error) = handler.handle(batch.connection(), &event).await {
                    // Release the subscriber now rather than when the pool
                    // gets round to the rollback a drop only queues.
                    if let Err(rollback) = batch.rollback().await {
                        tracing::warn!(subscriber = %self.name, error = %rollback, "rolling back a failed event batch");
                    }
                    return Err(error);
                }
            }
            // Up to the horizon: another read would find nothing (and cost
            // a transaction) until the horizon moves again.
            if batch.commit().await? >= horizon {
                break;
            }
        }
        Ok(())
    }
}

/// What an engine does with one event, inside the batch's transaction.
#[async_trait::async_trait]
pub trait EventHandler: Send + Sync {
    async fn handle(
        &self,
        connection: &mut PgConnection,
        event: &BalanceEvent,
    ) -> Result<(), BillingError>;
}

/// Events handed to one consumer, and the transaction their effects go in.
/// Dropping it without [`Batch::commit`] rolls back and processes nothing —
/// but sqlx only *queues* that rollback: it reaches Postgres when the pool's
/// background task returns the connection, and until then the subscriber's
/// row stays locked (other consumers get `None` and try again on their next
/// wake-up). [`Batch::rollback`] releases it before returning.
pub struct Batch {
    subscriber: String,
    transaction: Transaction<'static, Postgres>,
    events: Vec<BalanceEvent>,
}

impl Batch {
    pub fn events(&self) -> &[BalanceEvent] {
        &self.events
    }

    /// The batch's transaction: write the side effects here.
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.transaction
    }

    /// Advances the subscriber past this batch and commits it with the
    /// side effects. Returns the new cursor.
    pub async fn commit(mut self) -> Result<i64, BillingError> {
        let last = self.events.last().map_or(0, |event| event.cursor);
        debug_assert!(last > 0, "a batch holds at least one event");
        sqlx::query(
            "UPDATE event_subscribers SET cursor = $2, updated_at = now() WHERE name = $1 AND cursor < $2",
        )
        .bind(&self.subscriber)
        .bind(last)
        .execute(&mut *self.transaction)
        .await?;
        self.transaction.commit().await?;
        Ok(last)
    }

    /// Gives the events back: rolls the batch's transaction back (with its
    /// side effects) and releases the subscriber before returning, so the
    /// next [`Subscriber::next_batch`] delivers the same events again.
    pub async fn rollback(self) -> Result<(), BillingError> {
        self.transaction.rollback().await?;
        Ok(())
    }
}
