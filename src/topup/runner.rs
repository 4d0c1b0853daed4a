//! The decision loop: the `balance-policy` subscriber of the balance
//! events. Each batch of events is decided in one transaction that also
//! advances the subscriber's cursor; after it commits, the top-ups it
//! started are handed to the reactor to be driven at once (or, without a
//! reactor, the engine is woken).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Notify, mpsc, watch};

use super::PolicyDecider;
use super::react::StartedTopUp;
use crate::events::{EventFeed, Subscriber};

pub const SUBSCRIBER_NAME: &str = "balance-policy";

pub async fn run_policy_decisions(
    pool: PgPool,
    feed: EventFeed,
    decider: PolicyDecider,
    wake: Arc<Notify>,
    started_top_ups: Option<mpsc::Sender<StartedTopUp>>,
    mut stop: watch::Receiver<bool>,
) {
    let pause = Duration::from_secs(1);
    let subscriber = loop {
        match Subscriber::register(&pool, SUBSCRIBER_NAME, 0).await {
            Ok(subscriber) => break subscriber,
            Err(error) => {
                tracing::warn!(%error, "cannot register the balance-policy subscriber; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    };
    let mut horizon = feed.horizon();
    loop {
        let safe = *horizon.borrow_and_update();
        loop {
            let mut batch = match subscriber.next_batch(safe).await {
                Ok(Some(batch)) => batch,
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(%error, "reading balance events failed");
                    break;
                }
            };
            let mut started = Vec::new();
            let mut failed = false;
            let events = batch.events().to_vec();
            let settings = match decider.settings_of(batch.connection(), &events).await {
                Ok(settings) => settings,
                Err(error) => {
                    tracing::warn!(%error, "reading low-balance settings failed; retrying the batch");
                    drop(batch);
                    tokio::time::sleep(pause).await;
                    break;
                }
            };
            for event in events {
                let Some(account_settings) = settings.get(&event.account_id) else {
                    continue;
                };
                match decider
                    .decide(batch.connection(), &event, account_settings)
                    .await
                {
                    Ok(Some(top_up_id)) => started.push(StartedTopUp {
                        account_id: event.account_id.clone(),
                        top_up_id,
                    }),
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(%error, cursor = event.cursor, "balance-policy decision failed; retrying the batch");
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                drop(batch);
                tokio::time::sleep(pause).await;
                break;
            }
            match batch.commit().await {
                Ok(cursor) => {
                    for top_up in started {
                        let handed = started_top_ups
                            .as_ref()
                            .is_some_and(|reactor| reactor.try_send(top_up).is_ok());
                        if !handed {
                            wake.notify_one();
                        }
                    }
                    // Up to the horizon: another read would find nothing
                    // (and cost a transaction) until the horizon moves.
                    if cursor >= safe {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "committing balance-policy decisions failed");
                    break;
                }
            }
        }
        tokio::select! {
            changed = horizon.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
    }
}
